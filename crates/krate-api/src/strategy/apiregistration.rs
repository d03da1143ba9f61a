//! apiregistration.k8s.io/v1 APIService: which server answers a group/version, as
//! upstream's kube-aggregator validates and prepares it
//! (`pkg/apis/apiregistration/validation`, `registry/apiservice/strategy.go`). A local
//! APIService (no `spec.service`) is served by the API server itself and is Available
//! from its creation; one backed by a Service gets its condition from the API server's
//! availability checks (`krate-apiserver/src/aggregator/`).

use serde_json::{json, Value};

use super::{Errors, Strategy};
use crate::error::FieldError;
use crate::object::{get_str, set};
use crate::validation::{is_dns1035_label, is_dns1123_subdomain};

pub struct ApiServiceStrategy;

/// The condition every local APIService carries, as upstream words it.
pub fn local_available_condition() -> Value {
    json!({
        "type": "Available",
        "status": "True",
        "lastTransitionTime": crate::object::now_rfc3339(),
        "reason": "Local",
        "message": "Local APIServices are always available",
    })
}

impl Strategy for ApiServiceStrategy {
    fn default(&self, obj: &mut Value) {
        if obj["spec"]["service"].is_object() && obj["spec"]["service"].get("port").is_none() {
            set(obj, &["spec", "service", "port"], json!(443));
        }
    }

    fn initial_status(&self, obj: &Value) -> Option<Value> {
        let local = obj["spec"]["service"].is_null();
        Some(if local { json!({"conditions": [local_available_condition()]}) } else { json!({}) })
    }

    fn validate(&self, obj: &Value, errs: &mut Errors) {
        let spec = &obj["spec"];
        let group = spec["group"].as_str().unwrap_or_default();
        let version = spec["version"].as_str().unwrap_or_default();
        let name = get_str(obj, &["metadata", "name"]).unwrap_or_default();
        let required = format!("{version}.{group}");
        if !name.is_empty() && name != required {
            errs.push(FieldError::invalid(
                "metadata.name",
                &json!(name),
                &format!("must be `spec.version+\".\"+spec.group`: {required:?}"),
            ));
        }
        if group.is_empty() && version != "v1" {
            errs.push(FieldError::required(
                "spec.group",
                "only v1 may have an empty group and it better be legacy kube",
            ));
        }
        if !group.is_empty() {
            for e in is_dns1123_subdomain(group) {
                errs.push(FieldError::invalid("spec.group", &json!(group), &e));
            }
        }
        for e in is_dns1035_label(version) {
            errs.push(FieldError::invalid("spec.version", &json!(version), &e));
        }
        let priority = |field: &str, max: i64| {
            let value = spec[field].as_i64().unwrap_or(0);
            (value <= 0 || value > max).then(|| {
                FieldError::invalid(
                    format!("spec.{field}"),
                    &json!(value),
                    &format!("must be positive and less than {max}"),
                )
            })
        };
        errs.extend(priority("groupPriorityMinimum", 20000));
        errs.extend(priority("versionPriority", 1000));
        let ca_bundle = spec["caBundle"].as_str().unwrap_or_default();
        let insecure = spec["insecureSkipTLSVerify"].as_bool().unwrap_or(false);
        let service = &spec["service"];
        if service.is_null() {
            if !ca_bundle.is_empty() {
                use base64::Engine;
                let bytes =
                    base64::engine::general_purpose::STANDARD.decode(ca_bundle).map_or(ca_bundle.len(), |b| b.len());
                errs.push(FieldError::invalid(
                    "spec.caBundle",
                    &json!(format!("{bytes} bytes")),
                    "local APIServices may not have a caBundle",
                ));
            }
            if insecure {
                errs.push(FieldError::invalid(
                    "spec.insecureSkipTLSVerify",
                    &json!(true),
                    "local APIServices may not have insecureSkipTLSVerify",
                ));
            }
            return;
        }
        for field in ["namespace", "name"] {
            if service[field].as_str().is_none_or(str::is_empty) {
                errs.push(FieldError::required(format!("spec.service.{field}"), ""));
            }
        }
        let port = service["port"].as_i64().unwrap_or(443);
        if !(1..=65535).contains(&port) {
            errs.push(FieldError::invalid(
                "spec.service.port",
                &json!(port),
                "port is not valid: must be between 1 and 65535, inclusive",
            ));
        }
        if insecure && !ca_bundle.is_empty() {
            errs.push(FieldError::invalid(
                "spec.insecureSkipTLSVerify",
                &json!(true),
                "may not be true if caBundle is present",
            ));
        }
    }

    /// Upstream's ValidateAPIServiceStatus.
    fn validate_update(&self, new: &Value, _old: &Value, errs: &mut Errors) {
        self.validate(new, errs);
        let conditions = new["status"]["conditions"].as_array().into_iter().flatten();
        for (i, condition) in conditions.enumerate() {
            let status = condition["status"].as_str().unwrap_or_default();
            if !matches!(status, "True" | "False" | "Unknown") {
                errs.push(FieldError::not_supported(
                    format!("status.conditions[{i}].status"),
                    &json!(status),
                    &["True", "False", "Unknown"],
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(obj: &Value) -> Vec<String> {
        let mut errs = Errors::new();
        ApiServiceStrategy.validate(obj, &mut errs);
        errs.iter().map(|e| format!("{}: {}", e.field, e.message)).collect()
    }

    fn api_service(name: &str, spec: Value) -> Value {
        json!({"metadata": {"name": name}, "spec": spec})
    }

    #[test]
    fn the_name_is_version_dot_group() {
        let spec = json!({"group": "wardle.example.com", "version": "v1alpha1", "groupPriorityMinimum": 2000, "versionPriority": 200});
        assert!(errors(&api_service("v1alpha1.wardle.example.com", spec.clone())).is_empty());
        let errs = errors(&api_service("wardle", spec));
        assert_eq!(
            errs,
            [
                r#"metadata.name: Invalid value: "wardle": must be `spec.version+"."+spec.group`: "v1alpha1.wardle.example.com""#
            ]
        );
    }

    #[test]
    fn priorities_and_service_are_checked() {
        let spec = json!({"group": "g.io", "version": "v1", "groupPriorityMinimum": 0, "versionPriority": 1001,
            "service": {"namespace": "", "name": "api", "port": 0}, "caBundle": "eA==", "insecureSkipTLSVerify": true});
        let errs = errors(&api_service("v1.g.io", spec));
        assert_eq!(
            errs,
            [
                "spec.groupPriorityMinimum: Invalid value: 0: must be positive and less than 20000",
                "spec.versionPriority: Invalid value: 1001: must be positive and less than 1000",
                "spec.service.namespace: Required value",
                "spec.service.port: Invalid value: 0: port is not valid: must be between 1 and 65535, inclusive",
                "spec.insecureSkipTLSVerify: Invalid value: true: may not be true if caBundle is present",
            ]
        );
    }

    #[test]
    fn local_api_services_are_available_from_the_start() {
        let local = api_service("v1.g.io", json!({"group": "g.io", "version": "v1"}));
        let status = ApiServiceStrategy.initial_status(&local).unwrap();
        assert_eq!(status["conditions"][0]["reason"], "Local");
        let mut remote = api_service(
            "v1.g.io",
            json!({"group": "g.io", "version": "v1", "service": {"namespace": "a", "name": "b"}}),
        );
        ApiServiceStrategy.default(&mut remote);
        assert_eq!(remote["spec"]["service"]["port"], 443);
        assert_eq!(ApiServiceStrategy.initial_status(&remote), Some(json!({})));
    }
}

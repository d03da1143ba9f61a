//! Services and the objects that route to pods.

use serde_json::{json, Value};

use super::{Errors, Strategy};
use crate::error::FieldError;
use crate::object::{default, for_each_mut, get, get_str};

const SERVICE_TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];

pub struct ServiceStrategy;

impl Strategy for ServiceStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "type"], json!("ClusterIP"));
        default(obj, &["spec", "sessionAffinity"], json!("None"));
        let service_type = get_str(obj, &["spec", "type"]).unwrap_or_default().to_string();
        for_each_mut(obj, &["spec", "ports"], |p| {
            default(p, &["protocol"], json!("TCP"));
            if let Some(port) = p.get("port").cloned() {
                default(p, &["targetPort"], port);
            }
        });
        if service_type != "ExternalName" {
            default(obj, &["spec", "internalTrafficPolicy"], json!("Cluster"));
        }
        if service_type == "NodePort" || service_type == "LoadBalancer" {
            default(obj, &["spec", "externalTrafficPolicy"], json!("Cluster"));
        }
    }

    fn initial_status(&self, _obj: &Value) -> Option<Value> {
        Some(json!({"loadBalancer": {}}))
    }

    fn validate(&self, obj: &Value, errs: &mut Errors) {
        let service_type = get_str(obj, &["spec", "type"]).unwrap_or("ClusterIP");
        if !SERVICE_TYPES.contains(&service_type) {
            errs.push(FieldError::not_supported("spec.type", &json!(service_type), SERVICE_TYPES));
        }
        let headless = get_str(obj, &["spec", "clusterIP"]) == Some("None");
        let ports = get(obj, &["spec", "ports"]).and_then(Value::as_array).cloned().unwrap_or_default();
        if service_type == "ExternalName" {
            if get_str(obj, &["spec", "externalName"]).is_none_or(str::is_empty) {
                errs.push(FieldError::required("spec.externalName", ""));
            }
        } else if ports.is_empty() && !headless {
            errs.push(FieldError::required("spec.ports", ""));
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in ports.iter().enumerate() {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            if !(1..=65535).contains(&port) {
                errs.push(FieldError::invalid(
                    format!("spec.ports[{i}].port"),
                    &json!(port),
                    "must be between 1 and 65535, inclusive",
                ));
            }
            let name = get_str(p, &["name"]).unwrap_or_default();
            if ports.len() > 1 && name.is_empty() {
                errs.push(FieldError::required(format!("spec.ports[{i}].name"), ""));
            }
            if !name.is_empty() && !names.insert(name.to_string()) {
                errs.push(FieldError::duplicate(format!("spec.ports[{i}].name"), &json!(name)));
            }
            if let Some(protocol) = get_str(p, &["protocol"]) {
                if !["TCP", "UDP", "SCTP"].contains(&protocol) {
                    errs.push(FieldError::not_supported(
                        format!("spec.ports[{i}].protocol"),
                        &json!(protocol),
                        &["SCTP", "TCP", "UDP"],
                    ));
                }
            }
        }
        if let Some(affinity) = get_str(obj, &["spec", "sessionAffinity"]) {
            if !["None", "ClientIP"].contains(&affinity) {
                errs.push(FieldError::not_supported("spec.sessionAffinity", &json!(affinity), &["ClientIP", "None"]));
            }
        }
    }

    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        self.validate(new, errs);
        let old_ip = get_str(old, &["spec", "clusterIP"]).unwrap_or_default();
        let new_ip = get_str(new, &["spec", "clusterIP"]).unwrap_or_default();
        let external = |o: &Value| get_str(o, &["spec", "type"]) == Some("ExternalName");
        if !old_ip.is_empty() && old_ip != new_ip && !external(old) && !external(new) {
            errs.push(FieldError::invalid("spec.clusterIPs[0]", &json!(new_ip), "may not change once set"));
        }
    }
}

pub struct EndpointsStrategy;
impl Strategy for EndpointsStrategy {
    fn default(&self, obj: &mut Value) {
        for_each_mut(obj, &["subsets"], |s| for_each_mut(s, &["ports"], |p| default(p, &["protocol"], json!("TCP"))));
    }
}

pub struct EndpointSliceStrategy;
impl Strategy for EndpointSliceStrategy {
    fn default(&self, obj: &mut Value) {
        for_each_mut(obj, &["ports"], |p| {
            default(p, &["protocol"], json!("TCP"));
            default(p, &["name"], json!(""));
        });
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        match get_str(obj, &["addressType"]) {
            Some("IPv4" | "IPv6" | "FQDN") => {}
            other => errs.push(FieldError::not_supported(
                "addressType",
                &json!(other.unwrap_or_default()),
                &["FQDN", "IPv4", "IPv6"],
            )),
        }
    }
}

pub struct NetworkPolicyStrategy;
impl Strategy for NetworkPolicyStrategy {
    fn default(&self, obj: &mut Value) {
        for direction in ["ingress", "egress"] {
            for_each_mut(obj, &["spec", direction], |rule| {
                for_each_mut(rule, &["ports"], |p| default(p, &["protocol"], json!("TCP")));
            });
        }
        if get(obj, &["spec", "policyTypes"]).is_none() {
            let mut types = vec![json!("Ingress")];
            if get(obj, &["spec", "egress"]).is_some_and(|e| !e.is_null()) {
                types.push(json!("Egress"));
            }
            crate::object::set(obj, &["spec", "policyTypes"], Value::Array(types));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_defaults_and_port_validation() {
        let mut svc = json!({"spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}});
        ServiceStrategy.default(&mut svc);
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
        let mut errs = Vec::new();
        ServiceStrategy.validate(&svc, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        let bad = json!({"spec": {"type": "ClusterIP", "ports": [{"port": 0}, {"port": 81}]}});
        ServiceStrategy.validate(&bad, &mut errs);
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.ports[0].port", "spec.ports[0].name", "spec.ports[1].name"]);
    }
}

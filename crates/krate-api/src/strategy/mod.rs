//! Per-kind behaviour on the generic REST path: defaulting, status rules and validation.
//! Generic rules (metadata, names, status/generation handling) live in the API server's
//! registry; a strategy only says what differs for its kind.

use serde_json::{json, Value};

use crate::error::FieldError;
use crate::object::{default, get, get_str};

mod admissionregistration;
mod apiregistration;
mod certificates;
mod pod;
mod services;
mod workloads;

pub use admissionregistration::{
    MutatingAdmissionPolicyBindingStrategy, MutatingAdmissionPolicyStrategy, ValidatingAdmissionPolicyBindingStrategy,
    ValidatingAdmissionPolicyStrategy, MUTATING_WEBHOOKS, POLICY_VARIABLES, VALIDATING_WEBHOOKS,
};
pub use apiregistration::{local_available_condition, ApiServiceStrategy};
pub use certificates::{
    max_expiration_seconds, validate_signer_name, validate_user_annotations, PodCertificateRequestStrategy, KEY_TYPES,
    MIN_MAX_EXPIRATION_SECONDS,
};
pub use pod::{default_pod_spec, qos_class, take_resize, validate_pod_spec, PodStrategy, PodTemplateStrategy};
pub use services::{
    needs_cluster_ip, needs_health_check_node_port, needs_node_ports, EndpointSliceStrategy, EndpointsStrategy,
    NetworkPolicyStrategy, ServiceStrategy,
};
pub use workloads::{
    CronJobStrategy, DaemonSetStrategy, DeploymentStrategy, JobStrategy, ReplicaSetStrategy,
    ReplicationControllerStrategy, StatefulSetStrategy,
};

pub type Errors = Vec<FieldError>;

pub trait Strategy: Sync {
    /// Defaults filled on every write of the main resource (create, update, patch).
    fn default(&self, _obj: &mut Value) {}
    /// Create-only changes, after defaulting (e.g. admission-style defaults for pods).
    fn prepare_for_create(&self, _obj: &mut Value) {}
    /// Update-only changes of the main resource, after defaulting: what the new object
    /// keeps of the old one when the client left it out (a Service's allocated IPs and
    /// ports), and fields the change made meaningless.
    fn prepare_for_update(&self, _new: &mut Value, _old: &Value) {}
    /// Defaults of the status a status write brings (upstream defaults every decoded
    /// object, status included).
    fn default_status(&self, _obj: &mut Value) {}
    /// Status an object starts with, for kinds with a status subresource (None: empty).
    fn initial_status(&self, _obj: &Value) -> Option<Value> {
        None
    }
    fn validate(&self, _obj: &Value, _errs: &mut Errors) {}
    fn validate_update(&self, new: &Value, _old: &Value, errs: &mut Errors) {
        self.validate(new, errs)
    }
    /// Validation of a write through a subresource that changes part of the spec
    /// (pods' `ephemeralcontainers`), where the main resource's update rules give way.
    fn validate_subresource_update(&self, _subresource: &str, new: &Value, old: &Value, errs: &mut Errors) {
        self.validate_update(new, old, errs)
    }
    /// Whether a deleted object must stay until something else finishes it, beyond
    /// metadata.finalizers (namespaces wait for their content: spec.finalizers).
    fn deletion_blocked(&self, _obj: &Value) -> bool {
        false
    }
    /// Called when a deletion starts (namespaces turn Terminating).
    fn prepare_for_delete(&self, _obj: &mut Value) {}
    /// For kinds deleted gracefully (bound pods): the grace period to wait, if any.
    fn graceful_delete_seconds(&self, _obj: &Value, _requested: Option<i64>) -> Option<i64> {
        None
    }
}

/// Kinds with no special behaviour.
pub struct Plain;
impl Strategy for Plain {}

/// Kinds whose status starts empty on create and is only written through `/status`.
pub struct ResetStatusStrategy;
impl Strategy for ResetStatusStrategy {}

/// Requires `path` to be a non-empty string.
pub(crate) fn require_str(obj: &Value, path: &[&str], field: &str, errs: &mut Errors) {
    if get_str(obj, path).is_none_or(str::is_empty) {
        errs.push(FieldError::required(field, ""));
    }
}

/// Requires an integer at `path`, when present, to be at least `min`.
pub(crate) fn check_min(obj: &Value, path: &[&str], field: &str, min: i64, errs: &mut Errors) {
    if let Some(v) = get(obj, path).and_then(Value::as_i64) {
        if v < min {
            let detail = if min == 0 {
                "must be greater than or equal to 0".to_string()
            } else {
                format!("must be greater than or equal to {min}")
            };
            errs.push(FieldError::invalid(field, &json!(v), &detail));
        }
    }
}

/// Errors when `path` differs between `new` and `old` (immutable fields).
pub(crate) fn immutable(new: &Value, old: &Value, path: &[&str], field: &str, errs: &mut Errors) {
    let (n, o) = (get(new, path), get(old, path));
    if n != o {
        errs.push(FieldError::invalid(field, n.unwrap_or(&Value::Null), "field is immutable"));
    }
}

/// Validates keys of ConfigMap/Secret data maps.
fn validate_data_keys(obj: &Value, fields: &[&str], errs: &mut Errors) {
    for field in fields {
        let Some(Value::Object(map)) = obj.get(*field) else { continue };
        for key in map.keys() {
            let ok = !key.is_empty()
                && key.len() <= 253
                && key != "."
                && key != ".."
                && !key.starts_with("..")
                && key.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
            if !ok {
                errs.push(FieldError::invalid(
                    format!("{field}[{key}]"),
                    &json!(key),
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                ));
            }
        }
    }
}

fn validate_immutable_data(new: &Value, old: &Value, fields: &[&str], errs: &mut Errors) {
    if old.get("immutable") == Some(&json!(true)) {
        for field in fields {
            if new.get(*field) != old.get(*field) {
                errs.push(FieldError::forbidden(*field, "field is immutable when `immutable` is set"));
            }
        }
        if new.get("immutable") != Some(&json!(true)) {
            errs.push(FieldError::forbidden("immutable", "field is immutable when `immutable` is set"));
        }
    }
}

pub struct ConfigMapStrategy;
impl Strategy for ConfigMapStrategy {
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        validate_data_keys(obj, &["data", "binaryData"], errs);
        if let (Some(Value::Object(d)), Some(Value::Object(b))) = (obj.get("data"), obj.get("binaryData")) {
            for key in d.keys().filter(|k| b.contains_key(*k)) {
                errs.push(FieldError::invalid(
                    format!("data[{key}]"),
                    &json!(key),
                    "duplicate of key present in binaryData",
                ));
            }
        }
    }
    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        self.validate(new, errs);
        validate_immutable_data(new, old, &["data", "binaryData"], errs);
    }
}

pub struct SecretStrategy;
impl Strategy for SecretStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["type"], json!("Opaque"));
        // stringData is write-only: merged into data (base64) and dropped.
        if let Some(Value::Object(string_data)) = crate::object::remove(obj, &["stringData"]) {
            use base64::Engine;
            if let Some(data) = crate::object::object_at(obj, &["data"]) {
                for (k, v) in string_data {
                    let raw = v.as_str().unwrap_or_default();
                    data.insert(k, json!(base64::engine::general_purpose::STANDARD.encode(raw)));
                }
            }
        }
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        validate_data_keys(obj, &["data"], errs);
        let data_has = |k: &str| get(obj, &["data", k]).is_some();
        match get_str(obj, &["type"]).unwrap_or_default() {
            "kubernetes.io/service-account-token"
                if get_str(obj, &["metadata", "annotations", "kubernetes.io/service-account.name"]).is_none() =>
            {
                errs.push(FieldError::required("metadata.annotations[kubernetes.io/service-account.name]", ""));
            }
            "kubernetes.io/dockerconfigjson" if !data_has(".dockerconfigjson") => {
                errs.push(FieldError::required("data[.dockerconfigjson]", ""));
            }
            "kubernetes.io/tls" => {
                for key in ["tls.crt", "tls.key"] {
                    if !data_has(key) {
                        errs.push(FieldError::required(format!("data[{key}]"), ""));
                    }
                }
            }
            _ => {}
        }
    }
    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        self.validate(new, errs);
        immutable(new, old, &["type"], "type", errs);
        validate_immutable_data(new, old, &["data"], errs);
    }
}

pub struct NamespaceStrategy;
impl Strategy for NamespaceStrategy {
    fn default(&self, obj: &mut Value) {
        // Upstream labels every namespace with its own name.
        let name = crate::object::name(obj).to_string();
        crate::object::set(obj, &["metadata", "labels", "kubernetes.io/metadata.name"], json!(name));
    }
    /// The `kubernetes` finalizer is added on create only, not as a default, since the
    /// namespace controller removes it over the namespace's life (as upstream).
    fn prepare_for_create(&self, obj: &mut Value) {
        let finalizers = crate::object::object_at(obj, &["spec"])
            .map(|spec| spec.entry("finalizers").or_insert(json!([])))
            .and_then(Value::as_array_mut);
        if let Some(finalizers) = finalizers {
            if !finalizers.iter().any(|f| f == "kubernetes") {
                finalizers.push(json!("kubernetes"));
            }
        }
    }
    /// Finalizers change only through `namespaces/finalize` (upstream's PrepareForUpdate).
    fn prepare_for_update(&self, new: &mut Value, old: &Value) {
        match get(old, &["spec", "finalizers"]) {
            Some(finalizers) => crate::object::set(new, &["spec", "finalizers"], finalizers.clone()),
            None => {
                crate::object::remove(new, &["spec", "finalizers"]);
            }
        }
    }
    fn initial_status(&self, _obj: &Value) -> Option<Value> {
        Some(json!({"phase": "Active"}))
    }
    fn default_status(&self, obj: &mut Value) {
        if get_str(obj, &["status", "phase"]).is_none_or(str::is_empty) {
            crate::object::set(obj, &["status", "phase"], json!("Active"));
        }
    }
    /// Upstream's ValidateNamespaceStatusUpdate: the phase follows the deletion.
    fn validate_update(&self, new: &Value, _old: &Value, errs: &mut Errors) {
        let phase = get_str(new, &["status", "phase"]).unwrap_or_default();
        let (expected, detail) = match get(new, &["metadata", "deletionTimestamp"]).is_some_and(|t| !t.is_null()) {
            false => ("Active", "may only be 'Active' if `deletionTimestamp` is empty"),
            true => ("Terminating", "may only be 'Terminating' if `deletionTimestamp` is not empty"),
        };
        if phase != expected {
            errs.push(FieldError::invalid("status.Phase", &json!(phase), detail));
        }
    }
    fn deletion_blocked(&self, obj: &Value) -> bool {
        get(obj, &["spec", "finalizers"]).and_then(Value::as_array).is_some_and(|f| !f.is_empty())
    }
    fn prepare_for_delete(&self, obj: &mut Value) {
        crate::object::set(obj, &["status", "phase"], json!("Terminating"));
    }
}

pub struct NodeStrategy;
impl Strategy for NodeStrategy {
    /// Node agents create their Node with its status already filled in.
    fn initial_status(&self, obj: &Value) -> Option<Value> {
        obj.get("status").cloned()
    }
}

pub struct PvcStrategy;
impl Strategy for PvcStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "volumeMode"], json!("Filesystem"));
    }
    fn initial_status(&self, _obj: &Value) -> Option<Value> {
        Some(json!({"phase": "Pending"}))
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        if get(obj, &["spec", "accessModes"]).and_then(Value::as_array).is_none_or(Vec::is_empty) {
            errs.push(FieldError::required("spec.accessModes", "at least 1 access mode is required"));
        }
        if get(obj, &["spec", "resources", "requests", "storage"]).is_none()
            && get(obj, &["spec", "dataSourceRef"]).is_none()
        {
            errs.push(FieldError::required("spec.resources[storage]", ""));
        }
    }
}

pub struct PvStrategy;
impl Strategy for PvStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "persistentVolumeReclaimPolicy"], json!("Retain"));
        default(obj, &["spec", "volumeMode"], json!("Filesystem"));
    }
    fn initial_status(&self, _obj: &Value) -> Option<Value> {
        Some(json!({"phase": "Pending"}))
    }
}

pub struct HpaStrategy;
impl Strategy for HpaStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "minReplicas"], json!(1));
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        check_min(obj, &["spec", "maxReplicas"], "spec.maxReplicas", 1, errs);
        check_min(obj, &["spec", "minReplicas"], "spec.minReplicas", 1, errs);
    }
}

pub struct RoleBindingStrategy;
impl Strategy for RoleBindingStrategy {
    fn default(&self, obj: &mut Value) {
        crate::object::for_each_mut(obj, &["subjects"], |s| {
            if matches!(get_str(s, &["kind"]), Some("User" | "Group")) {
                default(s, &["apiGroup"], json!("rbac.authorization.k8s.io"));
            }
        });
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        require_str(obj, &["roleRef", "kind"], "roleRef.kind", errs);
        require_str(obj, &["roleRef", "name"], "roleRef.name", errs);
    }
    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        self.validate(new, errs);
        immutable(new, old, &["roleRef"], "roleRef", errs);
    }
}

pub struct PriorityClassStrategy;
impl Strategy for PriorityClassStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["preemptionPolicy"], json!("PreemptLowerPriority"));
    }
    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        immutable(new, old, &["value"], "value", errs);
    }
}

pub struct StorageClassStrategy;
impl Strategy for StorageClassStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["reclaimPolicy"], json!("Delete"));
        default(obj, &["volumeBindingMode"], json!("Immediate"));
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        require_str(obj, &["provisioner"], "provisioner", errs);
    }
}

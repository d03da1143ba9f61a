//! Pods and pod templates: upstream's PodSpec defaults and validation, shared with every
//! workload kind that embeds a pod template.

use serde_json::{json, Value};

use super::{check_min, Errors, Strategy};
use crate::error::FieldError;
use crate::object::{default, for_each_mut, get, get_str};
use crate::validation;

const CONTAINER_LISTS: &[&str] = &["initContainers", "containers", "ephemeralContainers"];

fn default_probe(probe: &mut Value) {
    if probe.is_null() {
        return;
    }
    default(probe, &["timeoutSeconds"], json!(1));
    default(probe, &["periodSeconds"], json!(10));
    default(probe, &["successThreshold"], json!(1));
    default(probe, &["failureThreshold"], json!(3));
    if probe.get("httpGet").is_some() {
        default(probe, &["httpGet", "scheme"], json!("HTTP"));
        default(probe, &["httpGet", "path"], json!("/"));
    }
}

/// Upstream's default pull policy of an image (containers' and image volumes'): Always
/// for ":latest" or untagged images, IfNotPresent otherwise.
fn default_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or_default();
    let tagged = last.contains(':') && !last.ends_with(":latest");
    if tagged || image.contains('@') {
        "IfNotPresent"
    } else {
        "Always"
    }
}

fn default_container(c: &mut Value) {
    default(c, &["terminationMessagePath"], json!("/dev/termination-log"));
    default(c, &["terminationMessagePolicy"], json!("File"));
    default(c, &["resources"], json!({}));
    let policy = default_pull_policy(get_str(c, &["image"]).unwrap_or_default());
    default(c, &["imagePullPolicy"], json!(policy));
    for_each_mut(c, &["ports"], |p| default(p, &["protocol"], json!("TCP")));
    for_each_mut(c, &["env"], |e| {
        if get(e, &["valueFrom", "fieldRef"]).is_some() {
            default(e, &["valueFrom", "fieldRef", "apiVersion"], json!("v1"));
        }
    });
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe) {
            default_probe(p);
        }
    }
}

/// Pods only (upstream's SetDefaults_Pod, not templates): requests default to limits
/// when only limits are given.
fn default_requests_from_limits(spec: &mut Value) {
    for list in CONTAINER_LISTS {
        for_each_mut(spec, &[list], |c| {
            if let Some(Value::Object(limits)) = get(c, &["resources", "limits"]).cloned() {
                for (resource, quantity) in limits {
                    default(c, &["resources", "requests", &resource], quantity);
                }
            }
        });
    }
}

/// Upstream's SetDefaults for a PodSpec (pods and templates alike).
pub fn default_pod_spec(spec: &mut Value) {
    default(spec, &["restartPolicy"], json!("Always"));
    default(spec, &["terminationGracePeriodSeconds"], json!(30));
    default(spec, &["dnsPolicy"], json!("ClusterFirst"));
    default(spec, &["securityContext"], json!({}));
    default(spec, &["schedulerName"], json!("default-scheduler"));
    default(spec, &["enableServiceLinks"], json!(true));
    for list in CONTAINER_LISTS {
        for_each_mut(spec, &[list], default_container);
    }
    for_each_mut(spec, &["volumes"], |v| {
        for source in ["configMap", "secret"] {
            if v.get(source).is_some() {
                default(v, &[source, "defaultMode"], json!(420));
            }
        }
        if v.get("downwardAPI").is_some() {
            default(v, &["downwardAPI", "defaultMode"], json!(420));
        }
        if v.get("projected").is_some() {
            default(v, &["projected", "defaultMode"], json!(420));
        }
        if v.get("hostPath").is_some() {
            default(v, &["hostPath", "type"], json!(""));
        }
        if let Some(reference) = get_str(v, &["image", "reference"]).map(str::to_string) {
            default(v, &["image", "pullPolicy"], json!(default_pull_policy(&reference)));
        }
    });
}

/// Validates a PodSpec found at `path` (e.g. `spec.template.spec`).
/// Upstream's sysctl name pattern (segments of lowercase alphanumerics, `-` and `_`,
/// separated by `.` or `/`) and length limit.
const SYSCTL_PATTERN: &str = r"^([a-z0-9]([-_a-z0-9]*[a-z0-9])?[\./])*[a-z0-9]([-_a-z0-9]*[a-z0-9])?$";
const SYSCTL_MAX_LENGTH: usize = 253;

/// `securityContext.sysctls`: names well formed and not repeated (whether the node
/// allows them is the node's call).
fn validate_sysctls(spec: &Value, path: &str, errs: &mut Errors) {
    static PATTERN: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(SYSCTL_PATTERN).expect("the sysctl pattern compiles"));
    let Some(sysctls) = spec.pointer("/securityContext/sysctls").and_then(Value::as_array) else { return };
    let mut seen = std::collections::HashSet::new();
    for (i, s) in sysctls.iter().enumerate() {
        let at = format!("{path}.securityContext.sysctls[{i}].name");
        let name = get_str(s, &["name"]).unwrap_or_default();
        if name.is_empty() {
            errs.push(FieldError::required(at, ""));
        } else if name.len() > SYSCTL_MAX_LENGTH || !PATTERN.is_match(name) {
            let msg = format!("must have at most {SYSCTL_MAX_LENGTH} characters and match regex {SYSCTL_PATTERN}");
            errs.push(FieldError::invalid(at, &json!(name), &msg));
        } else if !seen.insert(name) {
            errs.push(FieldError::duplicate(at, &json!(name)));
        }
    }
}

pub fn validate_pod_spec(spec: &Value, path: &str, errs: &mut Errors) {
    let containers = spec.get("containers").and_then(Value::as_array);
    if containers.is_none_or(Vec::is_empty) {
        errs.push(FieldError::required(format!("{path}.containers"), ""));
    }
    let mut names = std::collections::HashSet::new();
    for list in ["initContainers", "containers"] {
        let Some(items) = spec.get(list).and_then(Value::as_array) else { continue };
        for (i, c) in items.iter().enumerate() {
            let at = format!("{path}.{list}[{i}]");
            let name = get_str(c, &["name"]).unwrap_or_default();
            if name.is_empty() {
                errs.push(FieldError::required(format!("{at}.name"), ""));
            } else {
                for msg in validation::is_dns1123_label(name) {
                    errs.push(FieldError::invalid(format!("{at}.name"), &json!(name), &msg));
                }
                if !names.insert(name.to_string()) {
                    errs.push(FieldError::duplicate(format!("{at}.name"), &json!(name)));
                }
            }
            if get_str(c, &["image"]).is_none_or(str::is_empty) {
                errs.push(FieldError::required(format!("{at}.image"), ""));
            }
            if let Some(policy) = get_str(c, &["imagePullPolicy"]) {
                if !["Always", "IfNotPresent", "Never"].contains(&policy) {
                    errs.push(FieldError::not_supported(
                        format!("{at}.imagePullPolicy"),
                        &json!(policy),
                        &["Always", "IfNotPresent", "Never"],
                    ));
                }
            }
            if let Some(ports) = c.get("ports").and_then(Value::as_array) {
                for (j, p) in ports.iter().enumerate() {
                    let port = p.get("containerPort").and_then(Value::as_i64).unwrap_or(0);
                    if !(1..=65535).contains(&port) {
                        errs.push(FieldError::invalid(
                            format!("{at}.ports[{j}].containerPort"),
                            &json!(port),
                            "must be between 1 and 65535, inclusive",
                        ));
                    }
                }
            }
        }
    }
    if let Some(policy) = get_str(spec, &["restartPolicy"]) {
        if !["Always", "OnFailure", "Never"].contains(&policy) {
            errs.push(FieldError::not_supported(
                format!("{path}.restartPolicy"),
                &json!(policy),
                &["Always", "OnFailure", "Never"],
            ));
        }
    }
    if let Some(policy) = get_str(spec, &["dnsPolicy"]) {
        if !["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"].contains(&policy) {
            errs.push(FieldError::not_supported(
                format!("{path}.dnsPolicy"),
                &json!(policy),
                &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"],
            ));
        }
    }
    validate_sysctls(spec, path, errs);
    check_min(spec, &["terminationGracePeriodSeconds"], &format!("{path}.terminationGracePeriodSeconds"), 0, errs);
    check_min(spec, &["activeDeadlineSeconds"], &format!("{path}.activeDeadlineSeconds"), 1, errs);
    let mut volume_names = std::collections::HashSet::new();
    if let Some(volumes) = spec.get("volumes").and_then(Value::as_array) {
        for (i, v) in volumes.iter().enumerate() {
            let name = get_str(v, &["name"]).unwrap_or_default();
            if name.is_empty() {
                errs.push(FieldError::required(format!("{path}.volumes[{i}].name"), ""));
            } else if !volume_names.insert(name.to_string()) {
                errs.push(FieldError::duplicate(format!("{path}.volumes[{i}].name"), &json!(name)));
            }
            validate_pod_certificates(v, &format!("{path}.volumes[{i}].projected.sources"), errs);
        }
    }
    validate_ephemeral_containers(spec, path, &names, errs);
    for list in CONTAINER_LISTS {
        let Some(items) = spec.get(list).and_then(Value::as_array) else { continue };
        for (i, c) in items.iter().enumerate() {
            let Some(mounts) = c.get("volumeMounts").and_then(Value::as_array) else { continue };
            for (j, m) in mounts.iter().enumerate() {
                let name = get_str(m, &["name"]).unwrap_or_default();
                if !volume_names.contains(name) {
                    errs.push(FieldError {
                        reason: "FieldValueNotFound",
                        field: format!("{path}.{list}[{i}].volumeMounts[{j}].name"),
                        message: format!("Not found: \"{name}\""),
                    });
                }
            }
        }
    }
}

/// A projected volume's `podCertificate` sources: a signer name, a key type the node
/// can make, a lifetime within the signer's bounds and at least one file to write.
fn validate_pod_certificates(volume: &Value, path: &str, errs: &mut Errors) {
    use super::certificates::*;
    let Some(sources) = get(volume, &["projected", "sources"]).and_then(Value::as_array) else { return };
    for (i, source) in sources.iter().enumerate() {
        let Some(cert) = source.get("podCertificate") else { continue };
        let at = format!("{path}[{i}].podCertificate");
        let signer = get_str(cert, &["signerName"]).unwrap_or_default();
        validate_signer_name(&format!("{at}.signerName"), signer, errs);
        validate_user_annotations(cert.get("userAnnotations"), &format!("{at}.userAnnotations"), errs);
        let key_type = get_str(cert, &["keyType"]).unwrap_or_default();
        if !KEY_TYPES.contains(&key_type) {
            errs.push(FieldError::not_supported(format!("{at}.keyType"), &json!(key_type), KEY_TYPES));
        }
        if let Some(max) = cert.get("maxExpirationSeconds").and_then(Value::as_i64) {
            if max < MIN_MAX_EXPIRATION_SECONDS {
                let detail = format!("if provided, maxExpirationSeconds must be >= {MIN_MAX_EXPIRATION_SECONDS}");
                errs.push(FieldError::invalid(format!("{at}.maxExpirationSeconds"), &json!(max), &detail));
            }
            let ceiling = max_expiration_seconds(signer);
            if max > ceiling {
                let detail = format!("if provided, maxExpirationSeconds must be <= {ceiling}");
                errs.push(FieldError::invalid(format!("{at}.maxExpirationSeconds"), &json!(max), &detail));
            }
        }
        let paths = ["credentialBundlePath", "keyPath", "certificateChainPath"];
        if paths.iter().all(|p| get_str(cert, &[p]).is_none_or(str::is_empty)) {
            errs.push(FieldError::required(
                at,
                "specify at least one of credentialBundlePath, keyPath, and certificateChainPath",
            ));
        }
    }
}

/// Upstream's QoS class: Guaranteed, Burstable or BestEffort.
pub fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .filter_map(|l| spec.get(*l).and_then(Value::as_array))
        .flatten()
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in &containers {
        let requests = get(c, &["resources", "requests"]).and_then(Value::as_object);
        let limits = get(c, &["resources", "limits"]).and_then(Value::as_object);
        let relevant = |m: Option<&serde_json::Map<String, Value>>| {
            m.map(|m| m.keys().filter(|k| *k == "cpu" || *k == "memory").count()).unwrap_or(0)
        };
        if relevant(requests) + relevant(limits) > 0 {
            any = true;
        }
        for resource in ["cpu", "memory"] {
            let limit = limits.and_then(|l| l.get(resource));
            let request = requests.and_then(|r| r.get(resource));
            if limit.is_none() || (request.is_some() && request != limit) {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

pub struct PodStrategy;

/// Spec fields a pod update may change (upstream's ValidatePodUpdate).
/// What an ephemeral container may set besides these is forbidden: it must not be relied
/// on for the pod's own service (no ports, probes, lifecycle or resources).
const EPHEMERAL_ALLOWED: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "workingDir",
    "envFrom",
    "env",
    "volumeMounts",
    "volumeDevices",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "imagePullPolicy",
    "securityContext",
    "stdin",
    "stdinOnce",
    "tty",
    "targetContainerName",
];

/// Upstream's validateEphemeralContainers: names unique across every container, a target
/// among the pod's own containers, only the allowed fields, no subPath mounts.
fn validate_ephemeral_containers(
    spec: &Value,
    path: &str,
    others: &std::collections::HashSet<String>,
    errs: &mut Errors,
) {
    let Some(items) = spec.get("ephemeralContainers").and_then(Value::as_array) else { return };
    let mut names = others.clone();
    for (i, c) in items.iter().enumerate() {
        let at = format!("{path}.ephemeralContainers[{i}]");
        let name = get_str(c, &["name"]).unwrap_or_default();
        if name.is_empty() {
            errs.push(FieldError::required(format!("{at}.name"), ""));
        } else {
            for msg in validation::is_dns1123_label(name) {
                errs.push(FieldError::invalid(format!("{at}.name"), &json!(name), &msg));
            }
            if !names.insert(name.to_string()) {
                errs.push(FieldError::duplicate(format!("{at}.name"), &json!(name)));
            }
        }
        if get_str(c, &["image"]).is_none_or(str::is_empty) {
            errs.push(FieldError::required(format!("{at}.image"), ""));
        }
        if let Some(target) = get_str(c, &["targetContainerName"]).filter(|t| !t.is_empty()) {
            if !others.contains(target) {
                errs.push(FieldError {
                    reason: "FieldValueNotFound",
                    field: format!("{at}.targetContainerName"),
                    message: format!("Not found: \"{target}\""),
                });
            }
        }
        for (field, value) in c.as_object().into_iter().flatten() {
            let unset = match value {
                Value::Null => true,
                Value::Object(m) => m.is_empty(),
                Value::Array(a) => a.is_empty(),
                _ => false,
            };
            if !unset && !EPHEMERAL_ALLOWED.contains(&field.as_str()) {
                errs.push(FieldError::forbidden(format!("{at}.{field}"), "cannot be set for an Ephemeral Container"));
            }
        }
        for (j, m) in c.get("volumeMounts").and_then(Value::as_array).into_iter().flatten().enumerate() {
            for field in ["subPath", "subPathExpr"] {
                if get_str(m, &[field]).is_some_and(|v| !v.is_empty()) {
                    errs.push(FieldError::forbidden(
                        format!("{at}.volumeMounts[{j}].{field}"),
                        "cannot be set for an Ephemeral Container",
                    ));
                }
            }
        }
    }
}

/// Upstream's ValidatePodEphemeralContainersUpdate: ephemeral containers are only added,
/// never changed or removed, and static pods take none.
fn validate_ephemeral_update(new: &Value, old: &Value, errs: &mut Errors) {
    if get_str(old, &["metadata", "annotations", "kubernetes.io/config.mirror"]).is_some() {
        errs.push(FieldError::forbidden("", "static pods do not support ephemeral containers"));
        return;
    }
    let list = |obj: &Value| get(obj, &["spec", "ephemeralContainers"]).and_then(Value::as_array).cloned();
    let added = list(new).unwrap_or_default();
    for existing in list(old).unwrap_or_default() {
        let name = get_str(&existing, &["name"]).unwrap_or_default();
        match added.iter().find(|c| get_str(c, &["name"]) == Some(name)) {
            None => errs.push(FieldError::forbidden(
                "spec.ephemeralContainers",
                &format!("existing ephemeral containers {name:?} may not be removed\n"),
            )),
            Some(now) if *now != existing => errs.push(FieldError::forbidden(
                "spec.ephemeralContainers",
                &format!("existing ephemeral containers {name:?} may not be changed\n"),
            )),
            Some(_) => {}
        }
    }
}

/// The container lists a resize may change, and the fields of their containers it takes.
const RESIZABLE_LISTS: [&str; 2] = ["containers", "initContainers"];
const RESIZE_FIELDS: [&str; 2] = ["resources", "resizePolicy"];

/// Gives each container of `pod` the resources and resize policy that `body` gives the
/// container of the same name (what a `pods/resize` write keeps of its body).
pub fn take_resize(pod: &mut Value, body: &Value) {
    for list in RESIZABLE_LISTS {
        let given = get(body, &["spec", list]).and_then(Value::as_array).cloned().unwrap_or_default();
        for_each_mut(pod, &["spec", list], |c| {
            let name = get_str(c, &["name"]).unwrap_or_default().to_string();
            let Some(from) = given.iter().find(|g| get_str(g, &["name"]) == Some(name.as_str())) else { return };
            let Some(c) = c.as_object_mut() else { return };
            for field in RESIZE_FIELDS {
                match from.get(field) {
                    Some(v) => c.insert(field.into(), v.clone()),
                    None => c.remove(field),
                };
            }
        });
    }
}

/// Upstream's ValidatePodResize, for what krate's agents can do: static pods keep their
/// resources, the QoS class stays, and only CPU and memory change (of regular containers
/// and sidecars; other init containers have run already).
fn validate_resize(new: &Value, old: &Value, errs: &mut Errors) {
    if get_str(old, &["metadata", "annotations", "kubernetes.io/config.mirror"]).is_some() {
        errs.push(FieldError::forbidden("", "static pods cannot be resized"));
        return;
    }
    let (new_spec, old_spec) = (new.get("spec").unwrap_or(&Value::Null), old.get("spec").unwrap_or(&Value::Null));
    let new_qos = qos_class(new_spec);
    if qos_class(old_spec) != new_qos {
        errs.push(FieldError::invalid("spec", &json!(new_qos), "Pod QOS Class may not change as a result of resizing"));
    }
    // The containers without their CPU and memory: what must not have changed.
    let rest = |c: &Value| {
        let mut c = c.clone();
        for which in ["requests", "limits"] {
            if let Some(map) = crate::object::object_at(&mut c, &["resources", which]) {
                map.remove("cpu");
                map.remove("memory");
                if map.is_empty() {
                    c["resources"].as_object_mut().map(|r| r.remove(which));
                }
            }
        }
        c.as_object_mut().map(|m| m.remove("resizePolicy"));
        c
    };
    for list in RESIZABLE_LISTS {
        let containers = |spec: &Value| spec.get(list).and_then(Value::as_array).cloned().unwrap_or_default();
        for (i, (n, o)) in containers(new_spec).iter().zip(containers(old_spec).iter()).enumerate() {
            let sidecar = get_str(o, &["restartPolicy"]) == Some("Always");
            if list == "initContainers" && !sidecar && n != o {
                errs.push(FieldError::forbidden(
                    format!("spec.initContainers[{i}].resources"),
                    "resize is not supported for non-restartable init containers",
                ));
            } else if rest(n) != rest(o) {
                errs.push(FieldError::forbidden("spec", "only cpu and memory resources are mutable"));
            }
        }
    }
}

fn mutable_pod_spec_view(spec: &Value) -> Value {
    let mut view = spec.clone();
    for list in ["containers", "initContainers"] {
        for_each_mut(&mut view, &[list], |c| {
            if let Some(c) = c.as_object_mut() {
                c.remove("image");
            }
        });
    }
    if let Some(v) = view.as_object_mut() {
        v.remove("activeDeadlineSeconds");
        v.remove("tolerations");
        v.remove("terminationGracePeriodSeconds");
        v.remove("schedulingGates");
    }
    view
}

impl Strategy for PodStrategy {
    fn default(&self, obj: &mut Value) {
        if let Some(spec) = obj.get_mut("spec") {
            default_pod_spec(spec);
            default_requests_from_limits(spec);
        }
    }

    /// What upstream's admission plugins add to a new pod.
    fn prepare_for_create(&self, obj: &mut Value) {
        let spec = crate::object::object_at(obj, &["spec"]).expect("spec is an object");
        let sa = spec
            .get("serviceAccountName")
            .and_then(Value::as_str)
            .or_else(|| spec.get("serviceAccount").and_then(Value::as_str))
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_string();
        spec.insert("serviceAccountName".into(), json!(sa));
        spec.insert("serviceAccount".into(), json!(sa));
        let tolerations = spec.entry("tolerations").or_insert(json!([]));
        if let Some(list) = tolerations.as_array_mut() {
            for key in ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"] {
                let present = list.iter().any(|t| {
                    get_str(t, &["key"]) == Some(key) && get_str(t, &["effect"]).is_none_or(|e| e == "NoExecute")
                });
                if !present {
                    list.push(
                        json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}),
                    );
                }
            }
        }
    }

    fn initial_status(&self, obj: &Value) -> Option<Value> {
        let qos = qos_class(obj.get("spec").unwrap_or(&Value::Null));
        Some(json!({"phase": "Pending", "qosClass": qos}))
    }

    fn validate(&self, obj: &Value, errs: &mut Errors) {
        validate_pod_spec(obj.get("spec").unwrap_or(&Value::Null), "spec", errs);
        // Added later, through pods/ephemeralcontainers, only.
        if get(obj, &["spec", "ephemeralContainers"]).and_then(Value::as_array).is_some_and(|l| !l.is_empty()) {
            errs.push(FieldError::forbidden("spec.ephemeralContainers", "cannot be set on create"));
        }
    }

    fn validate_subresource_update(&self, subresource: &str, new: &Value, old: &Value, errs: &mut Errors) {
        match subresource {
            "ephemeralcontainers" => {
                validate_pod_spec(new.get("spec").unwrap_or(&Value::Null), "spec", errs);
                validate_ephemeral_update(new, old, errs);
            }
            "resize" => {
                validate_pod_spec(new.get("spec").unwrap_or(&Value::Null), "spec", errs);
                validate_resize(new, old, errs);
            }
            _ => self.validate_update(new, old, errs),
        }
    }

    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        validate_pod_spec(new.get("spec").unwrap_or(&Value::Null), "spec", errs);
        let (n, o) = (new.get("spec").unwrap_or(&Value::Null), old.get("spec").unwrap_or(&Value::Null));
        if mutable_pod_spec_view(n) != mutable_pod_spec_view(o) {
            errs.push(FieldError::forbidden(
                "spec",
                "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
            ));
        }
    }

    /// A pod on a node is deleted gracefully: the node agent stops its containers and then
    /// finishes the deletion. Unscheduled pods go at once.
    fn graceful_delete_seconds(&self, obj: &Value, requested: Option<i64>) -> Option<i64> {
        if get_str(obj, &["spec", "nodeName"]).is_none_or(str::is_empty) {
            return None;
        }
        if matches!(get_str(obj, &["status", "phase"]), Some("Succeeded" | "Failed")) {
            return None;
        }
        let grace = requested
            .or_else(|| get(obj, &["spec", "terminationGracePeriodSeconds"]).and_then(Value::as_i64))
            .unwrap_or(30);
        (grace > 0).then_some(grace)
    }
}

pub struct PodTemplateStrategy;
impl Strategy for PodTemplateStrategy {
    fn default(&self, obj: &mut Value) {
        if let Some(spec) = obj.pointer_mut("/template/spec") {
            default_pod_spec(spec);
        }
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        validate_pod_spec(get(obj, &["template", "spec"]).unwrap_or(&Value::Null), "template.spec", errs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_defaults_match_upstream() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "busybox", "ports": [{"containerPort": 80}]},
            {"name": "b", "image": "registry:5000/app:1.2", "livenessProbe": {"httpGet": {"port": 80}}}
        ]}});
        PodStrategy.default(&mut pod);
        PodStrategy.prepare_for_create(&mut pod);
        let spec = &pod["spec"];
        assert_eq!(spec["restartPolicy"], "Always");
        assert_eq!(spec["dnsPolicy"], "ClusterFirst");
        assert_eq!(spec["serviceAccountName"], "default");
        assert_eq!(spec["tolerations"].as_array().unwrap().len(), 2);
        assert_eq!(spec["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(spec["containers"][1]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(spec["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(spec["containers"][1]["livenessProbe"]["periodSeconds"], 10);
        assert_eq!(PodStrategy.initial_status(&pod).unwrap()["qosClass"], "BestEffort");
    }

    #[test]
    fn qos_classes() {
        let guaranteed = json!({"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1", "memory": "1Gi"}}}]});
        assert_eq!(qos_class(&guaranteed), "Guaranteed");
        let burstable = json!({"containers": [{"resources": {"requests": {"cpu": "100m"}}}]});
        assert_eq!(qos_class(&burstable), "Burstable");
    }

    #[test]
    fn pod_validation_reports_fields() {
        let pod = json!({"spec": {"containers": [{"name": "A"}, {"name": "b", "image": "x", "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]}});
        let mut errs = Vec::new();
        PodStrategy.validate(&pod, &mut errs);
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"spec.containers[0].name"));
        assert!(fields.contains(&"spec.containers[0].image"));
        assert!(fields.contains(&"spec.containers[1].volumeMounts[0].name"));
    }

    #[test]
    fn sysctl_names_are_checked_as_upstream_does() {
        let sysctls = json!([{"name": "foo-", "value": "bar"}, {"name": "kernel.shmmax", "value": "1"},
            {"name": "safe-and-unsafe", "value": "1"}, {"name": "bar..", "value": "42"}, {"name": "net/ipv4/ip_forward", "value": "1"}]);
        let pod =
            json!({"spec": {"containers": [{"name": "c", "image": "x"}], "securityContext": {"sysctls": sysctls}}});
        let mut errs = Vec::new();
        PodStrategy.validate(&pod, &mut errs);
        let invalid: Vec<_> = errs.iter().map(|e| (e.field.as_str(), e.reason)).collect();
        assert_eq!(
            invalid,
            [
                ("spec.securityContext.sysctls[0].name", "FieldValueInvalid"),
                ("spec.securityContext.sysctls[3].name", "FieldValueInvalid")
            ]
        );
    }

    #[test]
    fn a_resize_takes_only_resources_and_keeps_the_qos_class() {
        let pod = |cpu: &str, extra: Value| {
            json!({"spec": {"containers": [{"name": "a", "image": "x:1",
                "resources": {"requests": {"cpu": cpu, "example.com/gpu": "1"}}, "resizePolicy": extra}]}})
        };
        let old = pod("20m", json!([]));
        // The body's other fields are not taken; its resources are, by container name.
        let mut new = old.clone();
        let mut body = pod("25m", json!([{"resourceName": "cpu", "restartPolicy": "RestartContainer"}]));
        body["spec"]["containers"][0]["image"] = json!("y:2");
        take_resize(&mut new, &body);
        assert_eq!(new["spec"]["containers"][0]["image"], "x:1");
        assert_eq!(new["spec"]["containers"][0]["resources"]["requests"]["cpu"], "25m");
        assert_eq!(new["spec"]["containers"][0]["resizePolicy"][0]["restartPolicy"], "RestartContainer");
        let errors = |new: &Value| {
            let mut errs = Vec::new();
            PodStrategy.validate_subresource_update("resize", new, &old, &mut errs);
            errs.into_iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>()
        };
        assert_eq!(errors(&new), Vec::<String>::new());
        let mut guaranteed = old.clone();
        guaranteed["spec"]["containers"][0]["resources"] = json!({"limits": {"cpu": "20m", "memory": "1Gi"}});
        assert_eq!(
            errors(&guaranteed),
            [
                "spec: Invalid value: \"Guaranteed\": Pod QOS Class may not change as a result of resizing",
                "spec: Forbidden: only cpu and memory resources are mutable"
            ]
        );
    }

    #[test]
    fn only_images_may_change_on_pod_update() {
        let old = json!({"spec": {"containers": [{"name": "a", "image": "x:1"}]}});
        let ok = json!({"spec": {"containers": [{"name": "a", "image": "x:2"}]}});
        let bad = json!({"spec": {"containers": [{"name": "a", "image": "x:1", "command": ["sh"]}]}});
        let mut errs = Vec::new();
        PodStrategy.validate_update(&ok, &old, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        PodStrategy.validate_update(&bad, &old, &mut errs);
        assert_eq!(errs.len(), 1);
    }
}

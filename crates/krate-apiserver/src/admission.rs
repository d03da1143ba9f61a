//! Admission on create: checks and defaults that need other objects, as upstream's
//! admission plugins do.
//! - Priority: a pod's `priorityClassName` (or the global default class) resolves to
//!   `spec.priority` and `spec.preemptionPolicy`; unknown classes are refused.
//! - PriorityClasses: at most one global default; values above one billion and the
//!   `system-` prefix are reserved for the built-in classes.
//! - ServiceAccount: pods that do not opt out (`automountServiceAccountToken: false`
//!   on the pod or its account) get upstream's `kube-api-access-*` projected volume (a
//!   bound token, the cluster CA, the namespace) mounted in every container at
//!   /var/run/secrets/kubernetes.io/serviceaccount. Mirror pods are left alone.
//! - ResourceQuota: a create that would take a namespace over a quota's `hard` limits
//!   is refused (counts and pod requests/limits).

use krate_api::object::{self, get, get_str};
use krate_api::{ApiError, ApiResult, FieldError, KindInfo};
use serde_json::{json, Value};

use crate::registry::{builtin_kind, storage_prefix, Scope, Storage};

/// The built-in priority classes every cluster has.
pub const SYSTEM_PRIORITY_CLASSES: &[(&str, i64, &str)] = &[
    (
        "system-cluster-critical",
        2_000_000_000,
        "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary.",
    ),
    (
        "system-node-critical",
        2_000_001_000,
        "Used for system critical pods that must not be moved from their current node.",
    ),
];
/// Upstream's name prefix and mount path of the service-account volume.
const API_ACCESS_PREFIX: &str = "kube-api-access-";
const API_ACCESS_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const HIGHEST_USER_PRIORITY: i64 = 1_000_000_000;
/// Attempts at counting a create in a quota that others update concurrently.
const QUOTA_RETRIES: usize = 16;

impl Storage {
    /// The cached objects of `scope`. As upstream's admission reads informers, this does
    /// not wait for the cache to catch up with the store unless `fresh` is asked for.
    pub(crate) async fn cached_objects(&self, scope: &Scope, fresh: bool) -> Vec<Value> {
        let resource_prefix = storage_prefix(&scope.kind);
        let prefix = match scope.namespace.as_deref() {
            Some(ns) => format!("{resource_prefix}{ns}/"),
            None => resource_prefix.clone(),
        };
        if fresh {
            self.cache.sync().await;
        }
        let rc = self.cache.resource(&resource_prefix);
        let state = rc.state.read().expect("cache lock");
        state
            .objects
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, o)| o.parse())
            .collect()
    }

    /// Admission for a new object of `kind` (storage form, defaulted).
    /// (A dry run is checked but counts in no quota.)
    pub(crate) async fn admit_create(&self, kind: &KindInfo, obj: &mut Value, dry_run: bool) -> ApiResult<()> {
        match (kind.group.as_str(), kind.plural.as_str()) {
            ("", "pods") => {
                self.admit_pod_priority(obj).await?;
                self.admit_pod_service_account(obj).await;
            }
            ("scheduling.k8s.io", "priorityclasses") => self.admit_priority_class(obj).await?,
            _ => {}
        }
        self.admit_quota(kind, obj, dry_run).await
    }

    async fn admit_pod_priority(&self, pod: &mut Value) -> ApiResult<()> {
        let name = object::name(pod).to_string();
        let classes_scope = Scope { kind: builtin_kind("scheduling.k8s.io", "v1", "priorityclasses"), namespace: None };
        let mut classes = self.cached_objects(&classes_scope, false).await;
        let wanted = get_str(pod, &["spec", "priorityClassName"]).filter(|c| !c.is_empty());
        if wanted.is_some_and(|w| !classes.iter().any(|c| object::name(c) == w)) {
            // Perhaps created a moment ago.
            classes = self.cached_objects(&classes_scope, true).await;
        }
        let class = match wanted {
            Some(wanted) => Some(classes.iter().find(|c| object::name(c) == wanted).ok_or_else(|| {
                ApiError::forbidden(format!(
                    "pods {name:?} is forbidden: no PriorityClass with name {wanted} was found"
                ))
            })?),
            None => classes.iter().find(|c| c.get("globalDefault") == Some(&json!(true))),
        };
        let priority = class.and_then(|c| c.get("value")).and_then(Value::as_i64).unwrap_or(0);
        if let Some(given) = get(pod, &["spec", "priority"]).and_then(Value::as_i64) {
            if given != priority {
                return Err(ApiError::forbidden(format!(
                    "pods {name:?} is forbidden: the integer value of priority ({given}) must not be provided in pod spec; priority admission controller computed {priority} from the given PriorityClass name"
                )));
            }
        }
        if let Some(class) = class {
            object::set(pod, &["spec", "priorityClassName"], json!(object::name(class)));
        }
        let policy = class.and_then(|c| get_str(c, &["preemptionPolicy"])).unwrap_or("PreemptLowerPriority");
        object::set(pod, &["spec", "priority"], json!(priority));
        if get(pod, &["spec", "preemptionPolicy"]).is_none() {
            object::set(pod, &["spec", "preemptionPolicy"], json!(policy));
        }
        Ok(())
    }

    async fn admit_pod_service_account(&self, pod: &mut Value) {
        if get(pod, &["metadata", "annotations", "kubernetes.io/config.mirror"]).is_some() {
            return;
        }
        let ns = object::namespace(pod).unwrap_or("default").to_string();
        let account = get_str(pod, &["spec", "serviceAccountName"]).unwrap_or("default").to_string();
        let automount = match get(pod, &["spec", "automountServiceAccountToken"]).and_then(Value::as_bool) {
            Some(set) => set,
            None => {
                let account = self
                    .cached(&Scope { kind: builtin_kind("", "v1", "serviceaccounts"), namespace: Some(ns) }, &account);
                account.ok().and_then(|a| a.parse().get("automountServiceAccountToken").and_then(Value::as_bool))
                    != Some(false)
            }
        };
        let volumes = get(pod, &["spec", "volumes"]).and_then(Value::as_array).cloned().unwrap_or_default();
        if !automount
            || volumes
                .iter()
                .any(|v| v.get("name").and_then(Value::as_str).unwrap_or_default().starts_with(API_ACCESS_PREFIX))
        {
            return;
        }
        let volume_name = format!("{API_ACCESS_PREFIX}{}", crate::registry::random_suffix(5));
        let mut volumes = volumes;
        volumes.push(json!({"name": volume_name, "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
        ]}}));
        object::set(pod, &["spec", "volumes"], json!(volumes));
        for list in ["initContainers", "containers"] {
            let Some(containers) = pod.get_mut("spec").and_then(|s| s.get_mut(list)).and_then(Value::as_array_mut)
            else {
                continue;
            };
            for container in containers {
                let mounts = container.as_object_mut().map(|c| c.entry("volumeMounts").or_insert_with(|| json!([])));
                let Some(mounts) = mounts.and_then(Value::as_array_mut) else { continue };
                if !mounts.iter().any(|m| m.get("mountPath").and_then(Value::as_str) == Some(API_ACCESS_PATH)) {
                    mounts.push(json!({"name": volume_name, "readOnly": true, "mountPath": API_ACCESS_PATH}));
                }
            }
        }
    }

    async fn admit_priority_class(&self, class: &mut Value) -> ApiResult<()> {
        let name = object::name(class).to_string();
        let value = class.get("value").and_then(Value::as_i64).unwrap_or(0);
        let builtin = SYSTEM_PRIORITY_CLASSES.iter().any(|(n, v, _)| *n == name && *v == value);
        if !builtin && name.starts_with("system-") {
            return Err(ApiError::forbidden(format!("priorityclasses.scheduling.k8s.io {name:?} is forbidden: priority class names with 'system-' prefix are reserved for system use only")));
        }
        if !builtin && value > HIGHEST_USER_PRIORITY {
            return Err(ApiError::invalid(
                "scheduling.k8s.io",
                "PriorityClass",
                &name,
                &[FieldError::forbidden(
                    "value",
                    &format!("maximum allowed value of a user defined priority is {HIGHEST_USER_PRIORITY}"),
                )],
            ));
        }
        if class.get("preemptionPolicy").is_none() {
            object::set(class, &["preemptionPolicy"], json!("PreemptLowerPriority"));
        }
        if class.get("globalDefault") == Some(&json!(true)) {
            let scope = Scope { kind: builtin_kind("scheduling.k8s.io", "v1", "priorityclasses"), namespace: None };
            let classes = self.cached_objects(&scope, true).await;
            if let Some(other) = classes.iter().find(|c| c.get("globalDefault") == Some(&json!(true))) {
                return Err(ApiError::invalid(
                    "scheduling.k8s.io",
                    "PriorityClass",
                    &name,
                    &[FieldError::invalid(
                        "globalDefault",
                        &json!(true),
                        &format!(
                            "PriorityClass {} is already marked as default. Only one default can exist",
                            object::name(other)
                        ),
                    )],
                ));
            }
        }
        Ok(())
    }

    /// Refuses a create that would take its namespace over a ResourceQuota, and counts
    /// it in the quotas' `status.used` (compare-and-swap, so concurrent creates cannot
    /// both take the last unit); the quota controller later recounts from scratch.
    async fn admit_quota(&self, kind: &KindInfo, obj: &Value, dry_run: bool) -> ApiResult<()> {
        let Some(ns) = get_str(obj, &["metadata", "namespace"]).filter(|_| kind.namespaced).map(String::from) else {
            return Ok(());
        };
        let delta = krate_api::quota::usage(&kind.group, &kind.plural, obj);
        let scope = Scope { kind: builtin_kind("", "v1", "resourcequotas"), namespace: Some(ns.clone()) };
        let quotas = self.cached_objects(&scope, false).await;
        let name = object::name(obj).to_string();
        let forbidden = |detail: String| {
            ApiError::forbidden(format!(
                "{} {name:?} is forbidden: {detail}",
                krate_api::error::qualified(&kind.group, &kind.plural)
            ))
        };
        for quota in quotas {
            let quota_name = object::name(&quota).to_string();
            let mut current = quota;
            for _ in 0..QUOTA_RETRIES {
                let hard = get(&current, &["spec", "hard"]).and_then(Value::as_object).cloned().unwrap_or_default();
                let tracked: Vec<(&str, f64)> = delta.iter().filter(|(r, _)| hard.contains_key(*r)).collect();
                if tracked.is_empty() {
                    break;
                }
                if kind.group.is_empty() && kind.plural == "pods" {
                    let missing = krate_api::quota::missing_pod_amounts(&hard, obj);
                    if !missing.is_empty() {
                        return Err(forbidden(format!(
                            "failed quota: {quota_name}: must specify {}",
                            missing.join(",")
                        )));
                    }
                }
                let used = get(&current, &["status", "used"]).and_then(Value::as_object).cloned().unwrap_or_default();
                let unknown: Vec<&str> = tracked.iter().map(|(r, _)| *r).filter(|r| !used.contains_key(*r)).collect();
                if !unknown.is_empty() {
                    return Err(forbidden(format!(
                        "status unknown for quota: {quota_name}, resources: {}",
                        unknown.join(",")
                    )));
                }
                let amount = |m: &serde_json::Map<String, Value>, r: &str| {
                    m.get(r).and_then(Value::as_str).and_then(krate_api::quantity::parse).unwrap_or(0.0)
                };
                let over: Vec<&(&str, f64)> =
                    tracked.iter().filter(|(r, d)| amount(&used, r) + d > amount(&hard, r) + 1e-9).collect();
                if !over.is_empty() {
                    let list = |f: &dyn Fn(&str, f64) -> String| {
                        over.iter().map(|(r, d)| format!("{r}={}", f(r, *d))).collect::<Vec<_>>().join(",")
                    };
                    return Err(forbidden(format!(
                        "exceeded quota: {quota_name}, requested: {}, used: {}, limited: {}",
                        list(&|_, d| krate_api::quantity::format(d)),
                        list(&|r, _| krate_api::quantity::format(amount(&used, r))),
                        list(&|r, _| krate_api::quantity::format(amount(&hard, r))),
                    )));
                }
                if dry_run {
                    break;
                }
                let mut updated = current.clone();
                for (r, d) in &tracked {
                    object::set(
                        &mut updated,
                        &["status", "used", r],
                        json!(krate_api::quantity::format(amount(&used, r) + d)),
                    );
                }
                let opts = crate::registry::WriteOptions {
                    field_manager: "resourcequota-admission".into(),
                    ..Default::default()
                };
                match self.update(&scope, &quota_name, crate::registry::Subresource::Status, updated, &opts).await {
                    Ok(_) => break,
                    Err(e) if e.code == 409 => current = self.get(&scope, &quota_name).await?.parse(),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

//! Admission: a chain of plugins every write passes through, as upstream's admission
//! plugins: first each plugin's mutating `admit` (before the object is validated), then
//! each plugin's `validate` (after validation, before it is stored; it may only refuse).
//! Creates and updates go through both phases, deletes through `validate` with the
//! object being deleted. Plugins read other objects through the storage's cache. The
//! built-in plugins, all acting on creates only:
//! - NamespaceLifecycle: nothing is created in a namespace that does not exist or is
//!   being deleted; `default`, `kube-system` and `kube-public` cannot be deleted.
//! - Priority: a pod's `priorityClassName` (or the global default class) resolves to
//!   `spec.priority` and `spec.preemptionPolicy`; unknown classes are refused.
//! - RuntimeClass: a pod's `runtimeClassName` must name a RuntimeClass; the class's
//!   `overhead.podFixed` becomes the pod's `spec.overhead` (a different one given is
//!   refused) and its `scheduling` joins the pod's node selector and tolerations.
//! - PriorityClasses: at most one global default; values above one billion and the
//!   `system-` prefix are reserved for the built-in classes.
//! - ServiceAccount: pods that do not opt out (`automountServiceAccountToken: false`
//!   on the pod or its account) get upstream's `kube-api-access-*` projected volume (a
//!   bound token, the cluster CA, the namespace) mounted in every container at
//!   /var/run/secrets/kubernetes.io/serviceaccount. Mirror pods are left alone.
//! - ResourceQuota: a create that would take a namespace over a quota's `hard` limits
//!   is refused (counts and pod requests/limits).
//! - LimitRanger (`limitranger.rs`): LimitRange defaults and bounds for pods and claims.
//! - DefaultStorageClass: a claim that names no class gets the default one.
//! - StorageObjectInUseProtection: new claims and volumes get the protection
//!   finalizers that krate-controllers' `protection.rs` removes once they are unused.
//! - PodSecurity (`podsecurity.rs`): the Pod Security Standards from namespace labels.
//! - NodeRestriction: a node agent (`system:node:<name>`) may create only mirror pods
//!   bound to itself, delete, evict and write the status of only its own pods, and
//!   create or change only its own Node and node Lease.
//! - MutatingAdmissionWebhook and ValidatingAdmissionWebhook (`webhook/`): the
//!   webhooks of admissionregistration.k8s.io/v1 configurations, on every operation.
//! - ValidatingAdmissionPolicy and MutatingAdmissionPolicy (`policy.rs`): CEL
//!   validations and mutations of policies in force through their bindings.
//! - VersionSkew: a node agent more than three minor versions older than its server,
//!   or newer, may not write its Node (krate's skew policy, as upstream's for kubelets).

use k8s_openapi::api::{core::v1 as core, scheduling::v1 as scheduling};
use krate_api::object::{self, get, get_str};
use krate_api::{ApiError, ApiResult, FieldError, KindInfo};
use serde_json::{json, Value};

use std::sync::Arc;

use crate::registry::{storage_prefix, Scope, Storage};
use crate::request::RequestAttributes;

/// What admission is asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
    /// exec, attach, port-forward and proxy: the object is the request's options.
    Connect,
}

/// The request an object comes with, for admission plugins.
pub struct Attributes<'a> {
    pub kind: &'a KindInfo,
    pub operation: Operation,
    /// The stored object an update or delete starts from.
    pub old: Option<&'a Value>,
    /// Who asks and for what; `None` for the server's own writes.
    pub request: Option<&'a RequestAttributes>,
    pub dry_run: bool,
}

impl Attributes<'_> {
    /// Whether a new object of the k8s-openapi type `T` is being created.
    pub fn creates<T: k8s_openapi::Resource>(&self) -> bool {
        self.operation == Operation::Create && self.kind.is::<T>()
    }
}

/// Upstream's refusal by an admission plugin: `pods "p" is forbidden: <why>`.
pub fn forbidden(kind: &KindInfo, obj: &Value, why: impl std::fmt::Display) -> ApiError {
    let resource = krate_api::error::qualified(&kind.group, &kind.plural);
    match object::name(obj) {
        "" => ApiError::forbidden(format!("{resource} is forbidden: {why}")),
        name => ApiError::forbidden(format!("{resource} {name:?} is forbidden: {why}")),
    }
}

/// One admission plugin. Both phases default to doing nothing.
#[async_trait::async_trait]
pub trait Plugin: Send + Sync {
    fn name(&self) -> &'static str;

    /// Mutating phase: may change the object, or refuse it.
    async fn admit(&self, _storage: &Storage, _attrs: &Attributes<'_>, _obj: &mut Value) -> ApiResult<()> {
        Ok(())
    }

    /// Validating phase: sees the validated object and may only refuse it.
    async fn validate(&self, _storage: &Storage, _attrs: &Attributes<'_>, _obj: &Value) -> ApiResult<()> {
        Ok(())
    }
}

/// A plugin's parsed copy of the configuration objects it reads on every request, and
/// the cache revision it was taken at (`Storage::cached_configuration`).
#[derive(Default)]
pub struct ConfigurationMemo(std::sync::Mutex<Option<(krate_store::Revision, Arc<Vec<Value>>)>>);

/// The plugins of a server, in order.
#[derive(Clone)]
pub struct Chain(pub Vec<Arc<dyn Plugin>>);

impl Default for Chain {
    fn default() -> Self {
        Self(vec![
            Arc::new(NamespaceLifecycle),
            Arc::new(crate::limitranger::LimitRanger),
            Arc::new(NodeRestriction),
            Arc::new(VersionSkew),
            Arc::new(crate::podsecurity::PodSecurity),
            Arc::new(Priority),
            Arc::new(RuntimeClass),
            Arc::new(DefaultStorageClass),
            Arc::new(StorageObjectInUseProtection),
            Arc::new(ServiceAccount),
            Arc::new(crate::policy::MutatingAdmissionPolicy::default()),
            Arc::new(crate::webhook::MutatingWebhooks::default()),
            Arc::new(crate::policy::ValidatingAdmissionPolicy::default()),
            Arc::new(crate::webhook::ValidatingWebhooks::default()),
            Arc::new(ResourceQuota),
        ])
    }
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|p| p.name())).finish()
    }
}

impl Chain {
    pub async fn admit(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &mut Value) -> ApiResult<()> {
        for plugin in &self.0 {
            plugin.admit(storage, attrs, obj).await?;
        }
        Ok(())
    }

    pub async fn validate(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
        for plugin in &self.0 {
            plugin.validate(storage, attrs, obj).await?;
        }
        Ok(())
    }
}

/// Nothing new in a namespace that is missing or terminating.
pub struct NamespaceLifecycle;

#[async_trait::async_trait]
impl Plugin for NamespaceLifecycle {
    fn name(&self) -> &'static str {
        "NamespaceLifecycle"
    }

    async fn admit(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &mut Value) -> ApiResult<()> {
        match object::namespace(obj).filter(|_| attrs.operation == Operation::Create && attrs.kind.namespaced) {
            Some(ns) => storage.ensure_namespace_usable(ns).await,
            None => Ok(()),
        }
    }

    async fn validate(&self, _: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
        const IMMORTAL: &[&str] = &["default", "kube-system", "kube-public"];
        let deletes_namespace = attrs.operation == Operation::Delete && attrs.kind.is::<core::Namespace>();
        if deletes_namespace && IMMORTAL.contains(&object::name(obj)) {
            return Err(forbidden(attrs.kind, obj, "this namespace may not be deleted"));
        }
        Ok(())
    }
}

/// A new PersistentVolumeClaim without `storageClassName` gets the default StorageClass
/// (annotated `storageclass.kubernetes.io/is-default-class: "true"`; the newest when
/// several are).
pub struct DefaultStorageClass;

#[async_trait::async_trait]
impl Plugin for DefaultStorageClass {
    fn name(&self) -> &'static str {
        "DefaultStorageClass"
    }

    async fn admit(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &mut Value) -> ApiResult<()> {
        if !attrs.creates::<core::PersistentVolumeClaim>() || obj["spec"].get("storageClassName").is_some() {
            return Ok(());
        }
        let classes =
            storage.cached_objects(&storage.builtin::<k8s_openapi::api::storage::v1::StorageClass>(None), false).await;
        let default = classes
            .iter()
            .filter(|c| {
                ["storageclass.kubernetes.io/is-default-class", "storageclass.beta.kubernetes.io/is-default-class"]
                    .iter()
                    .any(|a| get_str(c, &["metadata", "annotations", a]) == Some("true"))
            })
            .max_by(|a, b| {
                let created =
                    |c: &Value| get_str(c, &["metadata", "creationTimestamp"]).unwrap_or_default().to_string();
                created(a).cmp(&created(b)).then_with(|| object::name(b).cmp(object::name(a)))
            });
        if let Some(class) = default {
            object::set(obj, &["spec", "storageClassName"], json!(object::name(class)));
        }
        Ok(())
    }
}

/// New PersistentVolumeClaims and PersistentVolumes get `kubernetes.io/pvc-protection`
/// and `kubernetes.io/pv-protection`.
pub struct StorageObjectInUseProtection;

#[async_trait::async_trait]
impl Plugin for StorageObjectInUseProtection {
    fn name(&self) -> &'static str {
        "StorageObjectInUseProtection"
    }

    async fn admit(&self, _: &Storage, attrs: &Attributes<'_>, obj: &mut Value) -> ApiResult<()> {
        let finalizer = if attrs.creates::<core::PersistentVolumeClaim>() {
            "kubernetes.io/pvc-protection"
        } else if attrs.creates::<core::PersistentVolume>() {
            "kubernetes.io/pv-protection"
        } else {
            return Ok(());
        };
        let meta = obj.as_object_mut().and_then(|o| o.get_mut("metadata")).and_then(Value::as_object_mut);
        if let Some(meta) = meta {
            let list = meta.entry("finalizers").or_insert(json!([]));
            if let Some(list) = list.as_array_mut().filter(|l| !l.iter().any(|f| f == finalizer)) {
                list.push(json!(finalizer));
            }
        }
        Ok(())
    }
}

/// What a node agent may write (upstream's NodeRestriction, for pods, nodes and leases).
pub struct NodeRestriction;

#[async_trait::async_trait]
impl Plugin for NodeRestriction {
    fn name(&self) -> &'static str {
        "NodeRestriction"
    }

    async fn validate(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
        let Some(request) = attrs.request else { return Ok(()) };
        let Some(node) = crate::rbac::node::node_name(&request.user) else { return Ok(()) };
        let refuse = |why: String| Err(forbidden(attrs.kind, obj, why));
        let bound_here = |pod: &Value| get_str(pod, &["spec", "nodeName"]) == Some(node);
        let op = attrs.operation;
        if attrs.kind.is::<core::Pod>() {
            match (op, request.subresource.as_str()) {
                (Operation::Create, "") => {
                    if get(obj, &["metadata", "annotations", "kubernetes.io/config.mirror"]).is_none() {
                        return refuse(format!(
                            "pod does not have \"kubernetes.io/config.mirror\" annotation, node {node:?} can only create mirror pods"
                        ));
                    }
                    if !bound_here(obj) {
                        return refuse(format!("node {node:?} can only create pods with spec.nodeName set to itself"));
                    }
                }
                (Operation::Delete, _) if !bound_here(obj) => {
                    return refuse(format!("node {node:?} can only delete pods with spec.nodeName set to itself"));
                }
                (Operation::Update, "status") if !attrs.old.is_some_and(bound_here) => {
                    return refuse(format!(
                        "node {node:?} can only update pod status for pods with spec.nodeName set to itself"
                    ));
                }
                (_, "eviction") if !bound_here(attrs.old.unwrap_or(obj)) => {
                    return refuse(format!("node {node} can only evict pods with spec.nodeName set to itself"));
                }
                _ => {}
            }
        } else if attrs.kind.is::<k8s_openapi::api::certificates::v1::PodCertificateRequest>()
            && op == Operation::Create
        {
            if let Some(why) = pod_certificate_refusal(storage, node, obj).await {
                return refuse(why);
            }
        } else if attrs.kind.is::<core::Node>() && op != Operation::Delete && object::name(obj) != node {
            return refuse(format!("node {node:?} is not allowed to modify node {:?}", object::name(obj)));
        } else if attrs.kind.is::<k8s_openapi::api::coordination::v1::Lease>() {
            // Any write: a node keeps its own heartbeat Lease and no other.
            if request.namespace != "kube-node-lease" {
                return refuse("can only access leases in the \"kube-node-lease\" system namespace".into());
            }
            if object::name(obj) != node {
                return refuse("can only access node lease with the same name as the requesting node".into());
            }
        }
        Ok(())
    }
}

/// Why node `node` may not ask for the PodCertificateRequest `pcr`, if it may not: only
/// for a pod bound to itself, naming that pod's UID and service account (upstream's
/// NodeRestriction, which also checks the node's own UID, as this does).
async fn pod_certificate_refusal(storage: &Storage, node: &str, pcr: &Value) -> Option<String> {
    let spec = |field: &str| get_str(pcr, &["spec", field]).unwrap_or_default();
    if spec("nodeName") != node {
        return Some(format!("node {node:?} can only create podcertificaterequests with spec.nodeName set to itself"));
    }
    let namespace = object::namespace(pcr).map(str::to_string);
    let pod = storage.get(&storage.builtin::<core::Pod>(namespace), spec("podName")).await.ok().map(|p| p.parse());
    let matches = pod.as_ref().is_some_and(|pod| {
        object::uid(pod) == spec("podUID")
            && get_str(pod, &["spec", "nodeName"]) == Some(node)
            && get_str(pod, &["spec", "serviceAccountName"]).unwrap_or("default") == spec("serviceAccountName")
    });
    if !matches {
        return Some(format!(
            "node {node:?} can only create podcertificaterequests for pods bound to it, naming their UID and service account"
        ));
    }
    let own = storage.get(&storage.builtin::<core::Node>(None), node).await.ok().map(|n| n.parse());
    if own.as_ref().is_some_and(|n| object::uid(n) != spec("nodeUID")) {
        return Some(format!("node {node:?} can only create podcertificaterequests with spec.nodeUID set to its own"));
    }
    None
}

/// krate's version skew policy for node agents (as upstream's for kubelets): an agent may
/// be up to three minor versions older than its server, never newer. A node agent's
/// writes of its Node carry its version (`status.nodeInfo.kubeletVersion`, krate's in the
/// build metadata, `v1.37.0+krate-v0.3-…`); one outside the policy is refused with what
/// to do, so the operator upgrades in the supported order: servers, then agents.
pub struct VersionSkew;

/// How many minor versions an agent may trail its server.
const AGENT_MINORS_BEHIND: u64 = 3;

#[async_trait::async_trait]
impl Plugin for VersionSkew {
    fn name(&self) -> &'static str {
        "VersionSkew"
    }

    async fn validate(&self, _: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
        let by_node = attrs.request.is_some_and(|r| crate::rbac::node::node_name(&r.user).is_some());
        if !by_node || !attrs.kind.is::<core::Node>() || attrs.operation == Operation::Delete {
            return Ok(());
        }
        let Some(agent) = get_str(obj, &["status", "nodeInfo", "kubeletVersion"]) else { return Ok(()) };
        match skew_refusal(agent, crate::build_info().version) {
            Some(why) => Err(forbidden(attrs.kind, obj, why)),
            None => Ok(()),
        }
    }
}

/// `(major, minor)` of a krate version (`v0.3`, `v0.3-dev`, `v0.3-13-g…-dirty`).
pub(crate) fn krate_minor(version: &str) -> Option<(u64, u64)> {
    let rest = version.strip_prefix('v')?;
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Why an agent reporting `agent` (a kubeletVersion) may not work with a server of krate
/// version `server`; `None` when it may (or either version is not krate's).
fn skew_refusal(agent: &str, server: &str) -> Option<String> {
    let agent_krate = agent.split_once("+krate-")?.1;
    let (a, s) = (krate_minor(agent_krate)?, krate_minor(server)?);
    let (a_text, s_text) = (format!("v{}.{}", a.0, a.1), format!("v{}.{}", s.0, s.1));
    if a > s {
        return Some(format!(
            "node agent krate {a_text} is newer than this API server's krate {s_text}: upgrade the servers first, then the agents"
        ));
    }
    if a.0 < s.0 || s.1 - a.1 > AGENT_MINORS_BEHIND {
        return Some(format!(
            "node agent krate {a_text} is more than {AGENT_MINORS_BEHIND} minor versions older than this API server's krate {s_text}: upgrade the agent"
        ));
    }
    None
}

/// Pod priority from PriorityClasses, and the rules for PriorityClasses themselves.
pub struct Priority;

#[async_trait::async_trait]
impl Plugin for Priority {
    fn name(&self) -> &'static str {
        "Priority"
    }

    async fn admit(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &mut Value) -> ApiResult<()> {
        if attrs.creates::<core::Pod>() {
            storage.admit_pod_priority(obj).await?;
        } else if attrs.creates::<scheduling::PriorityClass>() {
            storage.admit_priority_class(obj).await?;
        }
        Ok(())
    }
}

/// Pods of a RuntimeClass: its overhead and scheduling constraints (upstream's
/// RuntimeClass admission plugin, its messages).
pub struct RuntimeClass;

impl RuntimeClass {
    /// The RuntimeClass a new pod names (a live read when the cache has not seen it
    /// yet); `None` when it names none.
    async fn of(storage: &Storage, attrs: &Attributes<'_>, pod: &Value) -> ApiResult<Option<Value>> {
        if !attrs.creates::<core::Pod>() {
            return Ok(None);
        }
        let Some(name) = get_str(pod, &["spec", "runtimeClassName"]) else { return Ok(None) };
        let scope = storage.builtin::<k8s_openapi::api::node::v1::RuntimeClass>(None);
        let found = match storage.cached(&scope, name) {
            Ok(found) => found,
            Err(_) => storage.get(&scope, name).await.map_err(|e| {
                if e.code == 404 {
                    forbidden(attrs.kind, pod, format!("pod rejected: RuntimeClass {name:?} not found"))
                } else {
                    e
                }
            })?,
        };
        Ok(Some(found.parse()))
    }
}

#[async_trait::async_trait]
impl Plugin for RuntimeClass {
    fn name(&self) -> &'static str {
        "RuntimeClass"
    }

    async fn admit(&self, storage: &Storage, attrs: &Attributes<'_>, pod: &mut Value) -> ApiResult<()> {
        let Some(class) = Self::of(storage, attrs, pod).await? else { return Ok(()) };
        if let Some(fixed) = get(&class, &["overhead", "podFixed"]) {
            if get(pod, &["spec", "overhead"]).is_some_and(|given| given != fixed) {
                return Err(forbidden(
                    attrs.kind,
                    pod,
                    "pod rejected: Pod's Overhead doesn't match RuntimeClass's defined Overhead",
                ));
            }
            object::set(pod, &["spec", "overhead"], fixed.clone());
        }
        if let Some(selector) = get(&class, &["scheduling", "nodeSelector"]).and_then(Value::as_object) {
            for (key, wanted) in selector {
                let given = get(pod, &["spec", "nodeSelector", key]);
                if let Some(given) = given.filter(|g| *g != wanted) {
                    let (wanted, given) = (wanted.as_str().unwrap_or_default(), given.as_str().unwrap_or_default());
                    return Err(forbidden(attrs.kind, pod, format!(
                        "conflict: runtimeClass.scheduling.nodeSelector[{key}] = {wanted}; pod.spec.nodeSelector[{key}] = {given}"
                    )));
                }
                object::set(pod, &["spec", "nodeSelector", key], wanted.clone());
            }
        }
        if let Some(extra) = get(&class, &["scheduling", "tolerations"]).and_then(Value::as_array) {
            let mut tolerations =
                get(pod, &["spec", "tolerations"]).and_then(Value::as_array).cloned().unwrap_or_default();
            for toleration in extra {
                if !tolerations.contains(toleration) {
                    tolerations.push(toleration.clone());
                }
            }
            object::set(pod, &["spec", "tolerations"], json!(tolerations));
        }
        Ok(())
    }

    async fn validate(&self, storage: &Storage, attrs: &Attributes<'_>, pod: &Value) -> ApiResult<()> {
        if !attrs.creates::<core::Pod>() {
            return Ok(());
        }
        let class = Self::of(storage, attrs, pod).await?;
        let given = get(pod, &["spec", "overhead"]);
        match class.as_ref().and_then(|c| get(c, &["overhead", "podFixed"])) {
            Some(fixed) if given != Some(fixed) => Err(forbidden(
                attrs.kind,
                pod,
                "pod rejected: Pod's Overhead doesn't match RuntimeClass's defined Overhead",
            )),
            None if given.is_some() => Err(forbidden(
                attrs.kind,
                pod,
                "pod rejected: Pod Overhead set without corresponding RuntimeClass defined Overhead",
            )),
            _ => Ok(()),
        }
    }
}

/// The service-account token volume in pods.
pub struct ServiceAccount;

#[async_trait::async_trait]
impl Plugin for ServiceAccount {
    fn name(&self) -> &'static str {
        "ServiceAccount"
    }

    async fn admit(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &mut Value) -> ApiResult<()> {
        if attrs.creates::<core::Pod>() {
            storage.admit_pod_service_account(obj).await;
        }
        Ok(())
    }
}

/// ResourceQuota limits, charged as objects are created.
pub struct ResourceQuota;

#[async_trait::async_trait]
impl Plugin for ResourceQuota {
    fn name(&self) -> &'static str {
        "ResourceQuota"
    }

    async fn validate(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
        match attrs.operation {
            Operation::Create => storage.admit_quota(attrs.kind, obj, attrs.dry_run).await,
            Operation::Update | Operation::Delete | Operation::Connect => Ok(()),
        }
    }
}

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
    /// Admission of a connect request (exec, attach, port-forward) on its options
    /// object; built-in plugins leave connects alone, webhooks and policies may refuse.
    pub async fn admit_connect(
        &self,
        kind: &KindInfo,
        request: &RequestAttributes,
        mut options: Value,
    ) -> ApiResult<()> {
        let attrs =
            Attributes { kind, operation: Operation::Connect, old: None, request: Some(request), dry_run: false };
        self.admission.admit(self, &attrs, &mut options).await?;
        self.admission.validate(self, &attrs, &options).await
    }

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

    /// All cached objects of the cluster-scoped built-in kind `T`, in name order (the
    /// cache's keys end in their names), parsed once per change of that kind and kept in
    /// `memo`: for plugins that read their configuration (webhooks, policies) on every
    /// request.
    pub(crate) fn cached_configuration<T: k8s_openapi::Resource>(&self, memo: &ConfigurationMemo) -> Arc<Vec<Value>> {
        let scope = self.builtin::<T>(None);
        let prefix = storage_prefix(&scope.kind);
        let rc = self.cache.resource(&prefix);
        let state = rc.state.read().expect("cache lock");
        let mut memo = memo.0.lock().expect("configuration memo");
        match &*memo {
            Some((revision, objects)) if *revision == state.last_change => objects.clone(),
            _ => {
                let objects: Arc<Vec<Value>> = Arc::new(state.objects.values().map(|o| o.parse()).collect());
                *memo = Some((state.last_change, objects.clone()));
                objects
            }
        }
    }

    async fn ensure_namespace_usable(&self, ns: &str) -> ApiResult<()> {
        let namespaces = self.builtin::<core::Namespace>(None);
        let found = match self.cached(&namespaces, ns) {
            Ok(found) => found,
            Err(_) => self.get(&namespaces, ns).await?,
        };
        if found.parse().pointer("/metadata/deletionTimestamp").is_some() {
            let mut e = ApiError::forbidden(format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ));
            e.details = Some(
                json!({"name": ns, "kind": namespaces.kind.plural, "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]}),
            );
            return Err(e);
        }
        Ok(())
    }

    async fn admit_pod_priority(&self, pod: &mut Value) -> ApiResult<()> {
        let name = object::name(pod).to_string();
        let classes_scope = self.builtin::<scheduling::PriorityClass>(None);
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
                let account = self.cached(&self.builtin::<core::ServiceAccount>(Some(ns)), &account);
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
            let scope = self.builtin::<scheduling::PriorityClass>(None);
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
        let scope = self.builtin::<core::ResourceQuota>(Some(ns.clone()));
        let quotas = self.cached_objects(&scope, false).await;
        let forbidden = |detail: String| forbidden(kind, obj, detail);
        for quota in quotas {
            if !krate_api::quota::in_scope(&quota, &kind.group, &kind.plural, obj) {
                continue;
            }
            let quota_name = object::name(&quota).to_string();
            let mut current = quota;
            for _ in 0..QUOTA_RETRIES {
                let hard = get(&current, &["spec", "hard"]).and_then(Value::as_object).cloned().unwrap_or_default();
                let tracked: Vec<(&str, f64)> = delta.iter().filter(|(r, _)| hard.contains_key(*r)).collect();
                if tracked.is_empty() {
                    break;
                }
                if kind.is::<core::Pod>() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    /// Labels what it admits, refuses ConfigMaps named `refused`, and refuses changing
    /// or deleting ConfigMaps labelled `frozen`.
    struct Stamp;

    #[async_trait::async_trait]
    impl Plugin for Stamp {
        fn name(&self) -> &'static str {
            "Stamp"
        }

        async fn admit(&self, _: &Storage, attrs: &Attributes<'_>, obj: &mut Value) -> ApiResult<()> {
            let user = attrs.request.map(|r| r.user.name.clone()).unwrap_or_default();
            object::set(obj, &["metadata", "labels", "admitted-for"], json!(user));
            Ok(())
        }

        async fn validate(&self, _: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
            let frozen = attrs.old.is_some_and(|old| old.pointer("/metadata/labels/frozen").is_some());
            match (object::name(obj), attrs.operation) {
                ("refused", _) => Err(forbidden(attrs.kind, obj, "not today")),
                (_, Operation::Update) if frozen => Err(forbidden(attrs.kind, obj, "frozen")),
                (_, Operation::Delete) if frozen => Err(forbidden(attrs.kind, obj, "frozen for good")),
                _ => Ok(()),
            }
        }
    }

    async fn api() -> crate::testing::TestApi {
        let mut admission = Chain::default();
        admission.0.push(Arc::new(Stamp));
        crate::testing::TestApi::start(crate::Settings { admission, ..Default::default() }).await
    }

    fn config_map(name: &str) -> Option<Value> {
        Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}))
    }

    #[tokio::test]
    async fn mutating_plugins_change_what_is_stored_and_see_who_asks() {
        let api = api().await;
        let (code, created) =
            api.call("alice", Method::POST, "/api/v1/namespaces/default/configmaps", config_map("c")).await;
        assert_eq!(code, 201, "{created}");
        assert_eq!(created["metadata"]["labels"]["admitted-for"], "alice");
        let (_, stored) = api.call("alice", Method::GET, "/api/v1/namespaces/default/configmaps/c", None).await;
        assert_eq!(stored["metadata"]["labels"]["admitted-for"], "alice");
    }

    #[tokio::test]
    async fn a_refusing_plugin_gives_upstreams_message_and_stores_nothing() {
        let api = api().await;
        let (code, status) =
            api.call("alice", Method::POST, "/api/v1/namespaces/default/configmaps", config_map("refused")).await;
        assert_eq!(code, 403);
        assert_eq!(status["reason"], "Forbidden");
        assert_eq!(status["message"], r#"configmaps "refused" is forbidden: not today"#);
        let (code, _) = api.call("alice", Method::GET, "/api/v1/namespaces/default/configmaps/refused", None).await;
        assert_eq!(code, 404, "nothing was stored");
    }

    #[tokio::test]
    async fn updates_and_deletes_pass_through_admission_with_the_old_object() {
        let api = api().await;
        let frozen =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "f", "labels": {"frozen": "yes"}}});
        let path = "/api/v1/namespaces/default/configmaps/f";
        assert_eq!(api.call("alice", Method::POST, "/api/v1/namespaces/default/configmaps", Some(frozen)).await.0, 201);
        let changed = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "f"}, "data": {"k": "v"}});
        let (code, status) = api.call("bob", Method::PUT, path, Some(changed)).await;
        assert_eq!((code, status["message"].as_str()), (403, Some(r#"configmaps "f" is forbidden: frozen"#)));
        let (code, status) = api.call("bob", Method::DELETE, path, None).await;
        assert_eq!((code, status["message"].as_str()), (403, Some(r#"configmaps "f" is forbidden: frozen for good"#)));
        let (_, stored) = api.call("bob", Method::GET, path, None).await;
        assert_eq!(stored["metadata"]["labels"], json!({"frozen": "yes", "admitted-for": "alice"}));
        assert!(stored.get("data").is_none(), "the refused update changed nothing: {stored}");
    }

    #[tokio::test]
    async fn mutating_plugins_see_updates_too() {
        let api = api().await;
        let path = "/api/v1/namespaces/default/configmaps/c";
        assert_eq!(
            api.call("alice", Method::POST, "/api/v1/namespaces/default/configmaps", config_map("c")).await.0,
            201
        );
        let (code, updated) = api.call("bob", Method::PUT, path, config_map("c")).await;
        assert_eq!((code, updated["metadata"]["labels"]["admitted-for"].as_str()), (200, Some("bob")), "{updated}");
    }

    #[test]
    fn agents_may_trail_their_server_by_three_minors_and_never_lead() {
        use super::skew_refusal;
        let server = "v0.5-3-g0123456789abcd-dirty";
        for ok in
            ["v1.37.0+krate-v0.5", "v1.37.0+krate-v0.5-dev-gabc", "v1.37.0+krate-v0.2-7-gabc", "v1.37.0", "kubelet"]
        {
            assert_eq!(skew_refusal(ok, server), None, "{ok}");
        }
        let newer = skew_refusal("v1.37.0+krate-v0.6", server).unwrap();
        assert!(newer.starts_with("node agent krate v0.6 is newer than this API server's krate v0.5"), "{newer}");
        let older = skew_refusal("v1.37.0+krate-v0.1-dev", server).unwrap();
        assert!(older.contains("more than 3 minor versions older"), "{older}");
        assert!(skew_refusal("v1.37.0+krate-v1.0", server).is_some());
    }
}

//! The table of served kinds. Everything kind-specific the generic REST path needs is
//! here: scope, names, subresources, storage location, the typed schema used for
//! validation, field selectors and the strategy with per-kind defaulting and validation.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::{
    admissionregistration::v1 as admissionregistration, apps::v1 as apps, authentication::v1 as authentication,
    authorization::v1 as authorization, autoscaling::v1 as autoscaling1, autoscaling::v2 as autoscaling2,
    batch::v1 as batch, certificates::v1 as certificates, coordination::v1 as coordination, core::v1 as core,
    discovery::v1 as discovery, events::v1 as events, flowcontrol::v1 as flowcontrol, networking::v1 as networking,
    node::v1 as node, policy::v1 as policy, rbac::v1 as rbac, resource::v1 as resource, scheduling::v1 as scheduling,
    storage::v1 as storage, storagemigration::v1 as storagemigration,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiextensions;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1 as apiregistration;
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope, Resource};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

use crate::convert::{self, Conversion};
use crate::printers::{self, Printer};
use crate::schema::KindSchema;
use crate::strategy::{self, Strategy};
use crate::validation::NameRule;

/// Verbs of a fully served resource.
pub const ALL_VERBS: &[&str] = &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

/// Maps a k8s-openapi scope type to "is namespaced".
pub trait ScopeInfo {
    const NAMESPACED: bool;
}
impl ScopeInfo for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}
impl ScopeInfo for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

/// Checks a JSON object against a typed schema and returns its canonical form (unknown
/// fields dropped), or the decoding error.
pub type TypedRoundTrip = fn(&Value) -> Result<Value, String>;

fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Value, String> {
    let typed = T::deserialize(value).map_err(|e| e.to_string())?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

/// Where a resource's objects live in the store; several served versions may share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StorageResource {
    pub group: &'static str,
    pub resource: &'static str,
}

impl StorageResource {
    /// Where objects of the k8s-openapi type `T` are stored.
    pub fn of<T: Resource>() -> Self {
        Self { group: T::GROUP, resource: T::URL_PATH_SEGMENT }
    }
}

/// A subresource with a write path of its own, beyond `status` and `scale` (which every
/// kind may have and the generic storage path serves).
#[derive(Clone, Copy, Debug)]
pub struct SubresourceInfo {
    pub name: &'static str,
    /// What the API server does with it.
    pub handler: SubresourceHandler,
    /// The kind of object it takes or returns, for discovery, with its group and version
    /// when they differ from the parent's.
    pub kind: &'static str,
    pub group_version: Option<(&'static str, &'static str)>,
    pub verbs: &'static [&'static str],
}

/// The handlers of the API server that subresources map to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubresourceHandler {
    /// `namespaces/finalize`: writes `spec.finalizers`.
    Finalize,
    /// `pods/binding`: assigns a pod to a node.
    Binding,
    /// `pods/eviction`: a deletion that respects disruption budgets.
    Eviction,
    /// `pods/log`: read from the pod's node agent.
    Log,
    /// `pods/exec`, `pods/attach`, `pods/portforward`: upgraded through to the node agent.
    Exec,
    Attach,
    PortForward,
    /// `serviceaccounts/token`: issues a token (TokenRequest), stores nothing.
    Token,
    /// `componentstatuses`: the control plane's health, worked out on each read.
    ComponentStatuses,
    /// `pods/proxy`, `services/proxy` and `nodes/proxy`: the request passed on to the pod,
    /// one of the service's endpoints or the node's agent (any method).
    Proxy,
    /// The review kinds (access, rules, token and self-subject reviews): answered, not
    /// stored.
    Review,
    /// metrics.k8s.io's NodeMetrics and PodMetrics: usage scraped from the node agents.
    ResourceMetrics,
    /// `certificatesigningrequests/approval`: writes the Approved and Denied conditions
    /// (the generic path serves it, as a status-like subresource).
    Approval,
    /// `pods/ephemeralcontainers`: writes only `spec.ephemeralContainers` (the generic
    /// path serves it; `kubectl debug` adds a container this way).
    EphemeralContainers,
    /// `pods/resize`: writes only the containers' resources and resize policies (the
    /// generic path serves it; the node agent applies the change in place).
    Resize,
}

const fn subresource(
    name: &'static str,
    handler: SubresourceHandler,
    kind: &'static str,
    verbs: &'static [&'static str],
) -> SubresourceInfo {
    SubresourceInfo { name, handler, kind, group_version: None, verbs }
}

const NAMESPACE_SUBRESOURCES: &[SubresourceInfo] =
    &[subresource("finalize", SubresourceHandler::Finalize, "Namespace", &["update"])];
const POD_SUBRESOURCES: &[SubresourceInfo] = &[
    subresource("binding", SubresourceHandler::Binding, "Binding", &["create"]),
    subresource("log", SubresourceHandler::Log, "Pod", &["get"]),
    subresource("exec", SubresourceHandler::Exec, "PodExecOptions", &["create", "get"]),
    subresource("attach", SubresourceHandler::Attach, "PodAttachOptions", &["create", "get"]),
    subresource("portforward", SubresourceHandler::PortForward, "PodPortForwardOptions", &["create", "get"]),
    SubresourceInfo {
        group_version: Some(("policy", "v1")),
        ..subresource("eviction", SubresourceHandler::Eviction, "Eviction", &["create"])
    },
    subresource("proxy", SubresourceHandler::Proxy, "PodProxyOptions", PROXY_VERBS),
    subresource("ephemeralcontainers", SubresourceHandler::EphemeralContainers, "Pod", &["get", "patch", "update"]),
    subresource("resize", SubresourceHandler::Resize, "Pod", &["get", "patch", "update"]),
];
const NODE_SUBRESOURCES: &[SubresourceInfo] =
    &[subresource("proxy", SubresourceHandler::Proxy, "NodeProxyOptions", PROXY_VERBS)];
const SERVICE_SUBRESOURCES: &[SubresourceInfo] =
    &[subresource("proxy", SubresourceHandler::Proxy, "ServiceProxyOptions", PROXY_VERBS)];
/// The verbs discovery lists for a proxy subresource (it takes any method).
const PROXY_VERBS: &[&str] = &["create", "delete", "get", "patch", "update"];
const CSR_SUBRESOURCES: &[SubresourceInfo] =
    &[subresource("approval", SubresourceHandler::Approval, "CertificateSigningRequest", &["get", "patch", "update"])];
const SERVICE_ACCOUNT_SUBRESOURCES: &[SubresourceInfo] = &[SubresourceInfo {
    group_version: Some(("authentication.k8s.io", "v1")),
    ..subresource("token", SubresourceHandler::Token, "TokenRequest", &["create"])
}];

/// The scale subresource's view of a kind.
#[derive(Clone, Copy, Debug)]
pub struct ScaleInfo {
    pub spec_replicas: &'static [&'static str],
    pub status_replicas: &'static [&'static str],
    pub selector: &'static [&'static str],
}

pub const STANDARD_SCALE: ScaleInfo = ScaleInfo {
    spec_replicas: &["spec", "replicas"],
    status_replicas: &["status", "replicas"],
    selector: &["spec", "selector"],
};

/// One served group/version/resource.
#[derive(Clone)]
pub struct KindInfo {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub verbs: Vec<String>,
    pub status: bool,
    /// What of `metadata` a write of the status subresource may change. Upstream's older
    /// kinds take the whole object but the spec from a status write (labels,
    /// annotations, finalizers and owner references with it; pods keep their owner
    /// references); newer kinds and custom resources take only the status.
    pub status_metadata: &'static [&'static str],
    pub scale: Option<ScaleInfo>,
    /// Subresources with handlers of their own (pods' binding, eviction, log, ...).
    pub subresources: &'static [SubresourceInfo],
    /// `metadata.generation` moves when anything outside metadata and status changes.
    pub generation: bool,
    pub name_rule: NameRule,
    pub storage: StorageResource,
    /// The version objects are stored in converts from/to this one (None: stored as is).
    pub conversion: Option<&'static dyn Conversion>,
    pub typed: Option<TypedRoundTrip>,
    /// The structural schema (patch strategies, list types, CRD validation).
    pub schema: Option<KindSchema>,
    /// A custom kind's schema as its CRD declares it (published in OpenAPI documents;
    /// built-in kinds publish upstream's definitions instead).
    pub schema_json: Option<Arc<Value>>,
    pub strategy: &'static dyn Strategy,
    /// Extra field selectors beyond metadata.name/metadata.namespace.
    pub field_selectors: &'static [SelectableField],
    /// Set for kinds defined by a CustomResourceDefinition.
    pub custom: Option<crate::custom::CustomKind>,
    /// The columns of its server-side tables (custom kinds: their printer columns first).
    pub printer: &'static Printer,
    /// A DELETE that removes the object answers with the object rather than a `Status`
    /// (upstream's `ReturnDeletedObject`).
    pub returns_deleted_object: bool,
    /// A resource that is not stored but served entirely by a handler (core/v1 Binding).
    pub handler: Option<SubresourceHandler>,
}

impl KindInfo {
    /// The protobuf message this kind is served as, if it has one (custom kinds do not).
    pub fn protobuf_message(&self) -> Option<&'static str> {
        match self.custom {
            Some(_) => None,
            None => crate::protobuf::message_for(&self.api_version(), &self.kind),
        }
    }

    /// Whether this kind stores objects of the k8s-openapi type `T` (whatever version
    /// it serves them in).
    pub fn is<T: Resource>(&self) -> bool {
        self.storage == StorageResource::of::<T>()
    }

    /// A subresource with a handler of its own, by name.
    pub fn subresource(&self, name: &str) -> Option<&'static SubresourceInfo> {
        self.subresources.iter().find(|s| s.name == name)
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The value of a supported field selector on `obj`, or None if unsupported.
    pub fn field_value(&self, obj: &Value, field: &str) -> Option<String> {
        let path: &[&str] = match field {
            "metadata.name" => &["metadata", "name"],
            "metadata.namespace" => &["metadata", "namespace"],
            other => return Some(self.field_selectors.iter().find(|f| f.label == other)?.value(obj)),
        };
        Some(text("", path).value(obj))
    }

    pub fn supports_field(&self, field: &str) -> bool {
        matches!(field, "metadata.name" | "metadata.namespace") || self.field_selectors.iter().any(|f| f.label == field)
    }

    pub fn field_labels(&self) -> Vec<&str> {
        let mut labels = vec!["metadata.name", "metadata.namespace"];
        labels.extend(self.field_selectors.iter().map(|f| f.label));
        labels
    }
}

/// A field selector a kind supports beyond `metadata.name` and `metadata.namespace`: its
/// label, its path into the stored form of the object, and what an absent field selects
/// as. Upstream formats the typed field, so an unset flag is `false` and an unset count `0`
/// (`spec.unschedulable=false` selects a node that never set it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectableField {
    pub label: &'static str,
    pub path: &'static [&'static str],
    pub absent: &'static str,
    /// Where the value comes from when the path holds none (an Event's `source` is its
    /// reporting controller when it has no source component).
    pub fallback: Option<&'static [&'static str]>,
}

impl SelectableField {
    /// The field's value in `obj` as a field selector compares it.
    pub fn value(&self, obj: &Value) -> String {
        let found = match crate::object::get(obj, self.path) {
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::Null) | None => None,
            found => found,
        };
        match found.or_else(|| crate::object::get(obj, self.fallback?)) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => self.absent.to_string(),
            Some(other) => other.to_string(),
        }
    }
}

/// The metadata a status write of most built-in kinds may change.
pub const STATUS_WRITES_METADATA: &[&str] = &["labels", "annotations", "finalizers", "ownerReferences"];

/// A string field (absent: the empty string).
const fn text(label: &'static str, path: &'static [&'static str]) -> SelectableField {
    SelectableField { label, path, absent: "", fallback: None }
}
/// A boolean field (absent: `false`).
const fn flag(label: &'static str, path: &'static [&'static str]) -> SelectableField {
    SelectableField { label, path, absent: "false", fallback: None }
}
/// An integer field (absent: `0`).
const fn count(label: &'static str, path: &'static [&'static str]) -> SelectableField {
    SelectableField { label, path, absent: "0", fallback: None }
}

struct Builder(KindInfo);

/// A kind with every verb, stored under its own group and resource, and no typed form,
/// schema, strategy or printer of its own yet.
fn plain_kind(
    (group, version, kind, plural): (&'static str, &'static str, &str, &'static str),
    namespaced: bool,
) -> KindInfo {
    KindInfo {
        group: group.to_string(),
        version: version.to_string(),
        kind: kind.to_string(),
        plural: plural.to_string(),
        singular: kind.to_lowercase(),
        namespaced,
        short_names: vec![],
        categories: vec![],
        verbs: ALL_VERBS.iter().map(|v| v.to_string()).collect(),
        status: false,
        status_metadata: STATUS_WRITES_METADATA,
        scale: None,
        subresources: &[],
        generation: false,
        name_rule: NameRule::Subdomain,
        storage: StorageResource { group, resource: plural },
        conversion: None,
        typed: None,
        schema: None,
        schema_json: None,
        strategy: &strategy::Plain,
        field_selectors: &[],
        custom: None,
        printer: &printers::DEFAULT,
        returns_deleted_object: false,
        handler: None,
    }
}

/// A kind no k8s-openapi type describes, served by `handler` alone for `verbs`.
fn handled_kind(
    names: (&'static str, &'static str, &str, &'static str),
    namespaced: bool,
    handler: SubresourceHandler,
    verbs: &[&str],
) -> KindInfo {
    Builder(plain_kind(names, namespaced)).handled_by(handler, verbs).0
}

fn kind<T>() -> Builder
where
    T: Resource + DeserializeOwned + Serialize,
    T::Scope: ScopeInfo,
{
    let names = (T::GROUP, T::VERSION, T::KIND, T::URL_PATH_SEGMENT);
    let mut info = plain_kind(names, <T::Scope as ScopeInfo>::NAMESPACED);
    info.typed = Some(round_trip::<T>);
    info.schema = crate::schema::builtin_kind(T::GROUP, T::VERSION, T::KIND);
    Builder(info)
}

impl Builder {
    fn short(mut self, names: &[&str]) -> Self {
        self.0.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }
    fn categories(mut self, categories: &[&str]) -> Self {
        self.0.categories = categories.iter().map(|s| s.to_string()).collect();
        self
    }
    fn all(self) -> Self {
        self.categories(&["all"])
    }
    /// Has a status subresource (and so a generation).
    fn status(mut self) -> Self {
        self.0.status = true;
        self.0.generation = true;
        self
    }
    fn status_only(mut self) -> Self {
        self.0.status = true;
        self
    }
    /// A status write changes the status and these metadata fields only.
    fn status_metadata(mut self, fields: &'static [&'static str]) -> Self {
        self.0.status_metadata = fields;
        self
    }
    fn scale(mut self) -> Self {
        self.0.scale = Some(STANDARD_SCALE);
        self
    }
    fn subresources(mut self, subresources: &'static [SubresourceInfo]) -> Self {
        self.0.subresources = subresources;
        self
    }
    fn names(mut self, rule: NameRule) -> Self {
        self.0.name_rule = rule;
        self
    }
    fn strategy(mut self, s: &'static dyn Strategy) -> Self {
        self.0.strategy = s;
        self
    }
    fn fields(mut self, f: &'static [SelectableField]) -> Self {
        self.0.field_selectors = f;
        self
    }
    fn printer(mut self, printer: &'static Printer) -> Self {
        self.0.printer = printer;
        self
    }
    /// DELETE answers the deleted object instead of a Status (upstream's
    /// `ReturnDeletedObject`, set for these kinds' registries).
    fn returns_deleted_object(mut self) -> Self {
        self.0.returns_deleted_object = true;
        self
    }
    /// Served by `handler` alone, for the given verbs.
    fn handled_by(mut self, handler: SubresourceHandler, verbs: &[&str]) -> Self {
        self.0.handler = Some(handler);
        self.verbs(verbs)
    }
    fn verbs(mut self, verbs: &[&str]) -> Self {
        self.0.verbs = verbs.iter().map(|s| s.to_string()).collect();
        self
    }
    /// Served from another version's storage through `conversion`.
    fn stored_as(mut self, group: &'static str, resource: &'static str, conversion: &'static dyn Conversion) -> Self {
        self.0.storage = StorageResource { group, resource };
        self.0.conversion = Some(conversion);
        self
    }
}

const POD_FIELDS: &[SelectableField] = &[
    text("spec.nodeName", &["spec", "nodeName"]),
    text("spec.restartPolicy", &["spec", "restartPolicy"]),
    text("spec.schedulerName", &["spec", "schedulerName"]),
    text("spec.serviceAccountName", &["spec", "serviceAccountName"]),
    flag("spec.hostNetwork", &["spec", "hostNetwork"]),
    text("status.phase", &["status", "phase"]),
    text("status.podIP", &["status", "podIP"]),
    text("status.nominatedNodeName", &["status", "nominatedNodeName"]),
];
const EVENT_FIELDS: &[SelectableField] = &[
    text("involvedObject.kind", &["involvedObject", "kind"]),
    text("involvedObject.namespace", &["involvedObject", "namespace"]),
    text("involvedObject.name", &["involvedObject", "name"]),
    text("involvedObject.uid", &["involvedObject", "uid"]),
    text("involvedObject.apiVersion", &["involvedObject", "apiVersion"]),
    text("involvedObject.resourceVersion", &["involvedObject", "resourceVersion"]),
    text("involvedObject.fieldPath", &["involvedObject", "fieldPath"]),
    text("reason", &["reason"]),
    text("reportingComponent", &["reportingComponent"]),
    SelectableField { fallback: Some(&["reportingComponent"]), ..text("source", &["source", "component"]) },
    text("type", &["type"]),
];
/// events.k8s.io/v1 selects under its own field names; paths are into the stored (core/v1) form.
const EVENTS_V1_FIELDS: &[SelectableField] = &[
    text("regarding.kind", &["involvedObject", "kind"]),
    text("regarding.namespace", &["involvedObject", "namespace"]),
    text("regarding.name", &["involvedObject", "name"]),
    text("regarding.uid", &["involvedObject", "uid"]),
    text("reason", &["reason"]),
    text("reportingController", &["reportingComponent"]),
    text("type", &["type"]),
];
const SECRET_FIELDS: &[SelectableField] = &[text("type", &["type"])];
const NAMESPACE_FIELDS: &[SelectableField] = &[text("status.phase", &["status", "phase"])];
const NODE_FIELDS: &[SelectableField] = &[flag("spec.unschedulable", &["spec", "unschedulable"])];
const REPLICAS_FIELDS: &[SelectableField] = &[count("status.replicas", &["status", "replicas"])];
const JOB_FIELDS: &[SelectableField] = &[count("status.successful", &["status", "successful"])];
const CSR_FIELDS: &[SelectableField] = &[text("spec.signerName", &["spec", "signerName"])];
const PCR_FIELDS: &[SelectableField] = &[
    text("spec.signerName", &["spec", "signerName"]),
    text("spec.podName", &["spec", "podName"]),
    text("spec.nodeName", &["spec", "nodeName"]),
];
const SERVICE_FIELDS: &[SelectableField] =
    &[text("spec.clusterIP", &["spec", "clusterIP"]), text("spec.type", &["spec", "type"])];

/// metrics.k8s.io/v1beta1's kinds: group, version, kind, resource.
pub const METRICS_NODES: (&str, &str, &str, &str) = ("metrics.k8s.io", "v1beta1", "NodeMetrics", "nodes");
pub const METRICS_PODS: (&str, &str, &str, &str) = ("metrics.k8s.io", "v1beta1", "PodMetrics", "pods");

/// Every built-in kind krate serves.
pub fn builtin_kinds() -> Vec<KindInfo> {
    use strategy::*;
    vec![
        // core/v1
        kind::<core::ConfigMap>().short(&["cm"]).printer(&printers::CONFIG_MAPS).strategy(&ConfigMapStrategy).0,
        kind::<core::Endpoints>().short(&["ep"]).printer(&printers::ENDPOINTS).strategy(&EndpointsStrategy).0,
        kind::<core::Event>().short(&["ev"]).printer(&printers::EVENTS).fields(EVENT_FIELDS).0,
        kind::<core::LimitRange>().short(&["limits"]).0,
        kind::<core::Namespace>()
            .returns_deleted_object()
            .short(&["ns"])
            .printer(&printers::NAMESPACES)
            .status_only()
            .names(NameRule::Label)
            .subresources(NAMESPACE_SUBRESOURCES)
            .fields(NAMESPACE_FIELDS)
            .strategy(&NamespaceStrategy)
            .0,
        kind::<core::Node>()
            .short(&["no"])
            .subresources(NODE_SUBRESOURCES)
            .printer(&printers::NODES)
            .status_only()
            .fields(NODE_FIELDS)
            .strategy(&NodeStrategy)
            .0,
        kind::<core::PersistentVolumeClaim>()
            .short(&["pvc"])
            .returns_deleted_object()
            .status_only()
            .strategy(&PvcStrategy)
            .0,
        kind::<core::PersistentVolume>().short(&["pv"]).returns_deleted_object().status_only().strategy(&PvStrategy).0,
        kind::<core::Pod>()
            .short(&["po"])
            .printer(&printers::PODS)
            .returns_deleted_object()
            .all()
            .status()
            .status_metadata(&["labels", "annotations", "finalizers"])
            .subresources(POD_SUBRESOURCES)
            .fields(POD_FIELDS)
            .strategy(&PodStrategy)
            .0,
        kind::<core::PodTemplate>().returns_deleted_object().strategy(&PodTemplateStrategy).0,
        kind::<core::ReplicationController>()
            .short(&["rc"])
            .printer(&printers::REPLICA_SETS)
            .all()
            .status()
            .scale()
            .fields(REPLICAS_FIELDS)
            .strategy(&ReplicationControllerStrategy)
            .0,
        kind::<core::ResourceQuota>()
            .returns_deleted_object()
            .short(&["quota"])
            .printer(&printers::RESOURCE_QUOTAS)
            .status_only()
            .strategy(&ResetStatusStrategy)
            .0,
        kind::<core::Secret>().printer(&printers::SECRETS).fields(SECRET_FIELDS).strategy(&SecretStrategy).0,
        kind::<core::ServiceAccount>()
            .returns_deleted_object()
            .short(&["sa"])
            .printer(&printers::SERVICE_ACCOUNTS)
            .subresources(SERVICE_ACCOUNT_SUBRESOURCES)
            .0,
        kind::<core::Service>()
            .short(&["svc"])
            .subresources(SERVICE_SUBRESOURCES)
            .printer(&printers::SERVICES)
            .returns_deleted_object()
            .all()
            .status_only()
            .names(NameRule::Dns1035)
            .fields(SERVICE_FIELDS)
            .strategy(&ServiceStrategy)
            .0,
        // admissionregistration.k8s.io/v1
        kind::<admissionregistration::MutatingWebhookConfiguration>()
            .printer(&printers::WEBHOOK_CONFIGURATIONS)
            .strategy(&MUTATING_WEBHOOKS)
            .0,
        kind::<admissionregistration::ValidatingWebhookConfiguration>()
            .printer(&printers::WEBHOOK_CONFIGURATIONS)
            .strategy(&VALIDATING_WEBHOOKS)
            .0,
        kind::<admissionregistration::ValidatingAdmissionPolicy>()
            .status()
            .status_metadata(&[])
            .strategy(&ValidatingAdmissionPolicyStrategy)
            .0,
        kind::<admissionregistration::ValidatingAdmissionPolicyBinding>()
            .strategy(&ValidatingAdmissionPolicyBindingStrategy)
            .0,
        kind::<admissionregistration::MutatingAdmissionPolicy>().strategy(&MutatingAdmissionPolicyStrategy).0,
        kind::<admissionregistration::MutatingAdmissionPolicyBinding>()
            .strategy(&MutatingAdmissionPolicyBindingStrategy)
            .0,
        // apps/v1
        kind::<apps::ControllerRevision>().0,
        kind::<apps::DaemonSet>()
            .short(&["ds"])
            .printer(&printers::DAEMON_SETS)
            .all()
            .status()
            .strategy(&DaemonSetStrategy)
            .0,
        kind::<apps::Deployment>()
            .short(&["deploy"])
            .printer(&printers::DEPLOYMENTS)
            .all()
            .status()
            .scale()
            .strategy(&DeploymentStrategy)
            .0,
        kind::<apps::ReplicaSet>()
            .short(&["rs"])
            .printer(&printers::REPLICA_SETS)
            .all()
            .status()
            .scale()
            .fields(REPLICAS_FIELDS)
            .strategy(&ReplicaSetStrategy)
            .0,
        kind::<apps::StatefulSet>()
            .short(&["sts"])
            .printer(&printers::STATEFUL_SETS)
            .all()
            .status()
            .scale()
            .strategy(&StatefulSetStrategy)
            .0,
        // batch/v1
        kind::<batch::CronJob>()
            .short(&["cj"])
            .printer(&printers::CRON_JOBS)
            .all()
            .status()
            .strategy(&CronJobStrategy)
            .0,
        kind::<batch::Job>().printer(&printers::JOBS).all().status().fields(JOB_FIELDS).strategy(&JobStrategy).0,
        // autoscaling: v2 is the storage version, v1 converts.
        kind::<autoscaling2::HorizontalPodAutoscaler>().short(&["hpa"]).all().status().strategy(&HpaStrategy).0,
        kind::<autoscaling1::HorizontalPodAutoscaler>()
            .short(&["hpa"])
            .all()
            .status()
            .stored_as("autoscaling", "horizontalpodautoscalers", &convert::HPA_V1)
            .strategy(&HpaStrategy)
            .0,
        kind::<coordination::Lease>().printer(&printers::LEASES).0,
        kind::<discovery::EndpointSlice>().printer(&printers::ENDPOINT_SLICES).strategy(&EndpointSliceStrategy).0,
        // events.k8s.io/v1 is a view of core/v1 events.
        kind::<events::Event>()
            .short(&["ev"])
            .printer(&printers::EVENTS_V1)
            .fields(EVENTS_V1_FIELDS)
            .stored_as("", "events", convert::EVENTS_V1)
            .0,
        // networking.k8s.io/v1
        kind::<networking::IngressClass>().0,
        kind::<networking::Ingress>().short(&["ing"]).status_only().strategy(&ResetStatusStrategy).0,
        kind::<networking::NetworkPolicy>().short(&["netpol"]).strategy(&NetworkPolicyStrategy).0,
        kind::<networking::IPAddress>().short(&["ip"]).names(NameRule::IpAddress).0,
        kind::<networking::ServiceCIDR>().status_only().status_metadata(&[]).0,
        kind::<policy::PodDisruptionBudget>()
            .short(&["pdb"])
            .printer(&printers::PDBS)
            .status()
            .strategy(&ResetStatusStrategy)
            .0,
        // rbac.authorization.k8s.io/v1
        kind::<rbac::ClusterRoleBinding>().names(NameRule::PathSegment).strategy(&RoleBindingStrategy).0,
        kind::<rbac::ClusterRole>().names(NameRule::PathSegment).0,
        kind::<rbac::RoleBinding>().names(NameRule::PathSegment).strategy(&RoleBindingStrategy).0,
        kind::<rbac::Role>().names(NameRule::PathSegment).0,
        kind::<scheduling::PriorityClass>()
            .short(&["pc"])
            .printer(&printers::PRIORITY_CLASSES)
            .strategy(&PriorityClassStrategy)
            .0,
        // storage.k8s.io/v1
        kind::<storage::CSIDriver>().returns_deleted_object().0,
        kind::<storage::CSINode>().returns_deleted_object().0,
        kind::<storage::CSIStorageCapacity>().0,
        kind::<storage::StorageClass>().short(&["sc"]).returns_deleted_object().strategy(&StorageClassStrategy).0,
        kind::<storage::VolumeAttachment>().returns_deleted_object().status_only().status_metadata(&[]).0,
        kind::<storage::VolumeAttributesClass>().short(&["vac"]).returns_deleted_object().0,
        kind::<node::RuntimeClass>().0,
        // resource.k8s.io/v1: dynamic resource allocation's objects (served and stored;
        // nothing allocates devices yet).
        kind::<resource::DeviceClass>().0,
        kind::<resource::DeviceTaintRule>().status_only().status_metadata(&[]).strategy(&ResetStatusStrategy).0,
        kind::<resource::ResourceClaim>().status_only().status_metadata(&[]).strategy(&ResetStatusStrategy).0,
        kind::<resource::ResourceClaimTemplate>().0,
        kind::<resource::ResourceSlice>().0,
        // storagemigration.k8s.io/v1: served and stored (krate stores one version per
        // kind, so a migration has nothing to rewrite).
        kind::<storagemigration::StorageVersionMigration>()
            .status_only()
            .status_metadata(&[])
            .strategy(&ResetStatusStrategy)
            .0,
        // flowcontrol.apiserver.k8s.io/v1: API priority and fairness's objects (served and
        // stored; requests are not yet classified by them).
        kind::<flowcontrol::FlowSchema>().status_only().status_metadata(&[]).strategy(&ResetStatusStrategy).0,
        kind::<flowcontrol::PriorityLevelConfiguration>()
            .status_only()
            .status_metadata(&[])
            .strategy(&ResetStatusStrategy)
            .0,
        // apiregistration.k8s.io/v1: which server answers each group/version.
        kind::<apiregistration::APIService>()
            .categories(&["api-extensions"])
            .printer(&printers::API_SERVICES)
            .status_only()
            .names(NameRule::PathSegment)
            .strategy(&ApiServiceStrategy)
            .0,
        kind::<apiextensions::CustomResourceDefinition>()
            .short(&["crd", "crds"])
            .printer(&printers::CRDS)
            .status_only()
            .strategy(&crate::custom::CrdStrategy)
            .0,
        // Trust anchors for pods (the clusterTrustBundle projected volume source).
        kind::<certificates::ClusterTrustBundle>().names(NameRule::PathSegment).0,
        // What node agents ask signers for, for pods' podCertificate projected volumes.
        kind::<certificates::PodCertificateRequest>()
            .status_only()
            .status_metadata(&[])
            .fields(PCR_FIELDS)
            .strategy(&strategy::PodCertificateRequestStrategy)
            .0,
        kind::<certificates::CertificateSigningRequest>()
            .short(&["csr"])
            .printer(&printers::CSRS)
            .status_only()
            .subresources(CSR_SUBRESOURCES)
            .fields(CSR_FIELDS)
            .strategy(&ResetStatusStrategy)
            .0,
        // core/v1 bindings: create-only, used by schedulers (pods/binding is the subresource form).
        kind::<core::Binding>().handled_by(SubresourceHandler::Binding, &["create"]).0,
        kind::<core::ComponentStatus>()
            .short(&["cs"])
            .printer(&printers::COMPONENT_STATUSES)
            .handled_by(SubresourceHandler::ComponentStatuses, &["get", "list"])
            .0,
        // authentication.k8s.io/v1 and authorization.k8s.io/v1: reviews, create-only.
        kind::<authentication::TokenReview>().handled_by(SubresourceHandler::Review, &["create"]).0,
        kind::<authentication::SelfSubjectReview>().handled_by(SubresourceHandler::Review, &["create"]).0,
        kind::<authorization::LocalSubjectAccessReview>().handled_by(SubresourceHandler::Review, &["create"]).0,
        kind::<authorization::SelfSubjectAccessReview>().handled_by(SubresourceHandler::Review, &["create"]).0,
        kind::<authorization::SelfSubjectRulesReview>().handled_by(SubresourceHandler::Review, &["create"]).0,
        kind::<authorization::SubjectAccessReview>().handled_by(SubresourceHandler::Review, &["create"]).0,
        // metrics.k8s.io/v1beta1, as metrics-server serves it (a local APIService that a
        // real metrics-server's may replace).
        handled_kind(METRICS_NODES, false, SubresourceHandler::ResourceMetrics, &["get", "list"]),
        handled_kind(METRICS_PODS, true, SubresourceHandler::ResourceMetrics, &["get", "list"]),
    ]
}

/// Preferred version per group, in upstream's discovery order.
pub const GROUP_ORDER: &[(&str, &str)] = &[
    ("", "v1"),
    ("apps", "v1"),
    ("events.k8s.io", "v1"),
    ("authentication.k8s.io", "v1"),
    ("authorization.k8s.io", "v1"),
    ("autoscaling", "v2"),
    ("batch", "v1"),
    ("certificates.k8s.io", "v1"),
    ("networking.k8s.io", "v1"),
    ("policy", "v1"),
    ("rbac.authorization.k8s.io", "v1"),
    ("storage.k8s.io", "v1"),
    ("scheduling.k8s.io", "v1"),
    ("coordination.k8s.io", "v1"),
    ("node.k8s.io", "v1"),
    ("discovery.k8s.io", "v1"),
    ("flowcontrol.apiserver.k8s.io", "v1"),
    ("apiextensions.k8s.io", "v1"),
];

/// One API group as discovery shows it.
#[derive(Clone, Debug)]
pub struct GroupInfo {
    pub name: String,
    /// Served versions, preferred first.
    pub versions: Vec<String>,
}

/// The lookup structure over served kinds. Immutable; rebuilt when kinds change (CRDs).
pub struct Registry {
    /// Unique per registry built, so caches can tell tables apart.
    generation: u64,
    kinds: Vec<Arc<KindInfo>>,
    by_resource: HashMap<(String, String, String), Arc<KindInfo>>,
    groups: Vec<GroupInfo>,
}

impl Registry {
    pub fn new(kinds: Vec<KindInfo>) -> Self {
        let kinds: Vec<Arc<KindInfo>> = kinds.into_iter().map(Arc::new).collect();
        let by_resource =
            kinds.iter().map(|k| ((k.group.clone(), k.version.clone(), k.plural.clone()), k.clone())).collect();
        let mut groups: Vec<GroupInfo> = Vec::new();
        for (group, preferred) in GROUP_ORDER {
            groups.push(GroupInfo { name: group.to_string(), versions: vec![preferred.to_string()] });
        }
        for k in &kinds {
            match groups.iter_mut().find(|g| g.name == k.group) {
                Some(g) if !g.versions.contains(&k.version) => g.versions.push(k.version.clone()),
                Some(_) => {}
                None => groups.push(GroupInfo { name: k.group.clone(), versions: vec![k.version.clone()] }),
            }
        }
        groups.retain(|g| kinds.iter().any(|k| k.group == g.name));
        static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let generation = GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self { generation, kinds, by_resource, groups }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn builtin() -> Self {
        Self::new(builtin_kinds())
    }

    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<&Arc<KindInfo>> {
        self.by_resource.get(&(group.to_string(), version.to_string(), plural.to_string()))
    }

    /// The served kind of a k8s-openapi type.
    pub fn of<T: Resource>(&self) -> Option<&Arc<KindInfo>> {
        self.lookup(T::GROUP, T::VERSION, T::URL_PATH_SEGMENT)
    }

    pub fn kinds(&self) -> &[Arc<KindInfo>] {
        &self.kinds
    }

    pub fn groups(&self) -> &[GroupInfo] {
        &self.groups
    }

    pub fn group(&self, name: &str) -> Option<&GroupInfo> {
        self.groups.iter().find(|g| g.name == name)
    }

    pub fn kinds_in(&self, group: &str, version: &str) -> impl Iterator<Item = &Arc<KindInfo>> {
        let (group, version) = (group.to_string(), version.to_string());
        self.kinds.iter().filter(move |k| k.group == group && k.version == version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_events_source_is_its_reporting_controller_when_it_has_no_component() {
        let source = EVENT_FIELDS.iter().find(|f| f.label == "source").unwrap();
        let reported = serde_json::json!({"reportingComponent": "test-controller"});
        assert_eq!(source.value(&reported), "test-controller");
        let both = serde_json::json!({"source": {"component": "kubelet"}, "reportingComponent": "x"});
        assert_eq!(source.value(&both), "kubelet");
        assert_eq!(source.value(&serde_json::json!({})), "");
    }

    #[test]
    fn table_has_upstream_scopes_and_names() {
        let r = Registry::builtin();
        let pods = r.lookup("", "v1", "pods").unwrap();
        assert!(pods.namespaced && pods.status && pods.short_names == ["po"]);
        let ns = r.lookup("", "v1", "namespaces").unwrap();
        assert!(!ns.namespaced);
        let deploy = r.lookup("apps", "v1", "deployments").unwrap();
        assert!(deploy.scale.is_some());
        assert_eq!(deploy.singular, "deployment");
        assert_eq!(r.group("autoscaling").unwrap().versions, ["v2", "v1"]);
        let ev = r.lookup("events.k8s.io", "v1", "events").unwrap();
        assert_eq!(ev.storage, StorageResource { group: "", resource: "events" });
        assert!(r.lookup("", "v1", "nosuch").is_none());
        assert!(pods.supports_field("spec.nodeName") && !pods.supports_field("spec.bogus"));
    }

    #[test]
    fn absent_fields_select_as_their_typed_zero() {
        let r = Registry::builtin();
        let node = r.lookup("", "v1", "nodes").unwrap();
        let fresh = serde_json::json!({"metadata": {"name": "n"}, "spec": {}});
        assert_eq!(node.field_value(&fresh, "spec.unschedulable").as_deref(), Some("false"));
        let cordoned = serde_json::json!({"metadata": {"name": "n"}, "spec": {"unschedulable": true}});
        assert_eq!(node.field_value(&cordoned, "spec.unschedulable").as_deref(), Some("true"));
        let rs = r.lookup("apps", "v1", "replicasets").unwrap();
        assert_eq!(rs.field_value(&fresh, "status.replicas").as_deref(), Some("0"));
        let pods = r.lookup("", "v1", "pods").unwrap();
        assert_eq!(pods.field_value(&fresh, "spec.hostNetwork").as_deref(), Some("false"));
        assert_eq!(pods.field_value(&fresh, "spec.nodeName").as_deref(), Some(""));
    }
    #[test]
    fn typed_round_trip_drops_unknown_fields_and_rejects_bad_types() {
        let r = Registry::builtin();
        let deploy = r.lookup("apps", "v1", "deployments").unwrap();
        let typed = deploy.typed.unwrap();
        let out = typed(&serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
            "spec": {"replicas": 2, "bogus": true, "selector": {}, "template": {}}
        }))
        .unwrap();
        assert_eq!(out["spec"]["replicas"], 2);
        assert!(out["spec"].get("bogus").is_none());
        assert!(typed(&serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
            "spec": {"replicas": "two"}
        }))
        .is_err());
    }
}

//! The node authorizer, as upstream's: a node agent (user `system:node:<name>` in group
//! `system:nodes`) may read a Secret, ConfigMap, PersistentVolumeClaim, PersistentVolume
//! or ServiceAccount (and create its tokens) only when a pod bound to that node refers to
//! it; may read only its own Node and node Lease; may list and watch only the pods bound
//! to it. Everything else is judged against the fixed rules of the `system:node` role.
//!
//! Upstream keeps a graph of pods and what they use; here the relationship is looked up
//! in the watch cache when asked (the node's pods in the object's namespace), which is
//! what the graph would say as of the cache's revision.

use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::Resource;
use serde_json::Value;

use super::Rule;
use crate::authz::{Authorizer, Decision};
use crate::cache::WatchCache;
use crate::request::RequestAttributes;

pub const NODES_GROUP: &str = "system:nodes";
const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// The node a user is, if it is one.
pub fn node_name(user: &crate::auth::User) -> Option<&str> {
    let name = user.name.strip_prefix("system:node:")?;
    user.groups.iter().any(|g| g == NODES_GROUP).then_some(name)
}

pub struct NodeAuthorizer {
    cache: Arc<WatchCache>,
    rules: Vec<Rule>,
}

impl std::fmt::Debug for NodeAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeAuthorizer")
    }
}

fn prefix<T: Resource>() -> String {
    crate::registry::storage_prefix_of(krate_api::StorageResource::of::<T>())
}

fn no(reason: impl Into<String>) -> Decision {
    Decision::NoOpinion(reason.into())
}

fn allow() -> Decision {
    Decision::Allow(String::new())
}

/// What a pod refers to, by kind.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Uses {
    Secret,
    ConfigMap,
    Claim,
    ServiceAccount,
}

/// Whether `pod` refers to the object `name` of kind `uses`.
fn pod_uses(pod: &Value, uses: Uses, name: &str) -> bool {
    let spec = &pod["spec"];
    let is = |v: &Value| v.as_str() == Some(name);
    let containers = || {
        ["initContainers", "containers", "ephemeralContainers"]
            .iter()
            .flat_map(|f| spec[*f].as_array().into_iter().flatten())
    };
    let volumes = || spec["volumes"].as_array().into_iter().flatten();
    let projected = || volumes().flat_map(|v| v["projected"]["sources"].as_array().into_iter().flatten());
    match uses {
        Uses::ServiceAccount => {
            let account = spec["serviceAccountName"].as_str().filter(|s| !s.is_empty()).unwrap_or("default");
            account == name
        }
        Uses::Claim => volumes().any(|v| {
            is(&v["persistentVolumeClaim"]["claimName"])
                || (v.get("ephemeral").is_some()
                    && format!(
                        "{}-{}",
                        pod["metadata"]["name"].as_str().unwrap_or_default(),
                        v["name"].as_str().unwrap_or_default()
                    ) == name)
        }),
        Uses::Secret => {
            spec["imagePullSecrets"].as_array().into_iter().flatten().any(|s| is(&s["name"]))
                || volumes().any(|v| {
                    is(&v["secret"]["secretName"])
                        || ["csi", "cephfs", "rbd", "azureFile", "flexVolume", "iscsi", "scaleIO", "storageos"]
                            .iter()
                            .any(|k| is(&v[*k]["nodePublishSecretRef"]["name"]) || is(&v[*k]["secretRef"]["name"]))
                })
                || projected().any(|s| is(&s["secret"]["name"]))
                || containers().any(|c| {
                    c["env"].as_array().into_iter().flatten().any(|e| is(&e["valueFrom"]["secretKeyRef"]["name"]))
                        || c["envFrom"].as_array().into_iter().flatten().any(|e| is(&e["secretRef"]["name"]))
                })
        }
        Uses::ConfigMap => {
            volumes().any(|v| is(&v["configMap"]["name"]))
                || projected().any(|s| is(&s["configMap"]["name"]))
                || containers().any(|c| {
                    c["env"].as_array().into_iter().flatten().any(|e| is(&e["valueFrom"]["configMapKeyRef"]["name"]))
                        || c["envFrom"].as_array().into_iter().flatten().any(|e| is(&e["configMapRef"]["name"]))
                })
        }
    }
}

impl NodeAuthorizer {
    pub fn new(cache: Arc<WatchCache>) -> Arc<Self> {
        Arc::new(Self { cache, rules: super::bootstrap::cluster_role_rules("system:node") })
    }

    /// The pods bound to `node` in `namespace`, parsed (only those of that namespace are
    /// looked at: their keys share its prefix).
    fn pods_on(&self, node: &str, namespace: &str) -> Vec<Value> {
        let pods = prefix::<core::Pod>();
        let in_namespace = format!("{pods}{namespace}/");
        let rc = self.cache.resource(&pods);
        let state = rc.state.read().expect("cache lock");
        state
            .objects
            .range(in_namespace.clone()..)
            .take_while(|(key, _)| key.starts_with(&in_namespace))
            .filter(|(_, o)| o.field("spec.nodeName") == Some(node))
            .map(|(_, o)| o.parse())
            .collect()
    }

    /// Whether pod `namespace/name` is bound to `node` (no parsing: the cache keeps the
    /// field).
    fn pod_on(&self, node: &str, namespace: &str, name: &str) -> bool {
        let pods = prefix::<core::Pod>();
        let rc = self.cache.resource(&pods);
        let state = rc.state.read().expect("cache lock");
        state.objects.get(&format!("{pods}{namespace}/{name}")).is_some_and(|o| o.field("spec.nodeName") == Some(node))
    }

    fn related(&self, node: &str, attrs: &RequestAttributes) -> bool {
        let (ns, name) = (attrs.namespace.as_str(), attrs.name.as_str());
        let uses = |uses| self.pods_on(node, ns).iter().any(|p| pod_uses(p, uses, name));
        match attrs.resource.as_str() {
            "secrets" => uses(Uses::Secret),
            "configmaps" => uses(Uses::ConfigMap),
            "persistentvolumeclaims" => uses(Uses::Claim),
            "serviceaccounts" => uses(Uses::ServiceAccount),
            "pods" => self.pod_on(node, ns, name),
            "persistentvolumes" => {
                let claims = self.cache.resource(&prefix::<core::PersistentVolumeClaim>());
                let state = claims.state.read().expect("cache lock");
                let bound: Vec<Value> =
                    state.objects.values().map(|c| c.parse()).filter(|c| c["spec"]["volumeName"] == name).collect();
                drop(state);
                bound.iter().any(|claim| {
                    let ns = claim["metadata"]["namespace"].as_str().unwrap_or_default();
                    let claim_name = claim["metadata"]["name"].as_str().unwrap_or_default();
                    self.pods_on(node, ns).iter().any(|p| pod_uses(p, Uses::Claim, claim_name))
                })
            }
            _ => false,
        }
    }

    fn relationship(&self, node: &str, attrs: &RequestAttributes) -> Decision {
        if attrs.name.is_empty() {
            return no("No Object name found");
        }
        if self.related(node, attrs) {
            allow()
        } else {
            no(format!("no relationship found between node '{node}' and this object"))
        }
    }

    fn get_only(&self, node: &str, attrs: &RequestAttributes) -> Decision {
        if attrs.verb.as_str() != "get" {
            return no("can only get individual resources of this type");
        }
        if !attrs.subresource.is_empty() {
            return no("cannot get subresource");
        }
        self.relationship(node, attrs)
    }

    fn read_namespaced(&self, node: &str, attrs: &RequestAttributes) -> Decision {
        if !matches!(attrs.verb.as_str(), "get" | "list" | "watch") {
            return no("can only read resources of this type");
        }
        if !attrs.subresource.is_empty() {
            return no("cannot read subresource");
        }
        if attrs.namespace.is_empty() {
            return no("can only read namespaced object of this type");
        }
        self.relationship(node, attrs)
    }

    fn service_account(&self, node: &str, attrs: &RequestAttributes) -> Decision {
        let verb = attrs.verb.as_str();
        if verb == "get" && attrs.subresource.is_empty() {
            return self.read_namespaced(node, attrs);
        }
        if verb != "create" || attrs.name.is_empty() {
            return no("can only create tokens for individual service accounts");
        }
        if attrs.subresource != "token" {
            return no("can only create token subresource of serviceaccount");
        }
        self.relationship(node, attrs)
    }

    fn lease(&self, node: &str, attrs: &RequestAttributes) -> Decision {
        let verb = attrs.verb.as_str();
        if !matches!(verb, "get" | "create" | "update" | "patch" | "delete") {
            return no("can only get, create, update, patch, or delete a node lease");
        }
        if attrs.namespace != NODE_LEASE_NAMESPACE {
            return no(format!("can only access leases in the {NODE_LEASE_NAMESPACE:?} system namespace"));
        }
        if verb != "create" && attrs.name != node {
            return no("can only access node lease with the same name as the requesting node");
        }
        allow()
    }

    fn node(&self, node: &str, attrs: &RequestAttributes) -> Decision {
        match (attrs.subresource.as_str(), attrs.verb.as_str()) {
            ("", "create" | "update" | "patch") | ("status", "update" | "patch") => allow(),
            ("", "get" | "list" | "watch") => match attrs.name.as_str() {
                n if n == node => allow(),
                "" => no(format!("node '{node}' cannot read all nodes, only its own Node object")),
                other => no(format!("node '{node}' cannot read '{other}', only its own Node object")),
            },
            _ => no(""),
        }
    }

    fn pod(&self, node: &str, attrs: &RequestAttributes) -> Decision {
        match (attrs.subresource.as_str(), attrs.verb.as_str()) {
            ("", "get") => self.get_only(node, attrs),
            ("", "list" | "watch") => {
                if attrs.field_selector_pins("spec.nodeName", node) {
                    allow()
                } else if !attrs.name.is_empty() {
                    self.relationship(node, attrs)
                } else {
                    no("can only list/watch pods with spec.nodeName field selector")
                }
            }
            ("", "create" | "delete") | ("status", "update" | "patch") | ("eviction", "create") => allow(),
            _ => no(""),
        }
    }
}

impl Authorizer for NodeAuthorizer {
    fn authorize(&self, attrs: &RequestAttributes) -> Decision {
        let Some(node) = node_name(&attrs.user) else { return no("") };
        if node.is_empty() {
            return no(format!("unknown node for user {:?}", attrs.user.name));
        }
        if attrs.is_resource_request {
            let core = attrs.api_group.is_empty();
            match (attrs.resource.as_str(), core) {
                ("secrets" | "configmaps", true) => return self.read_namespaced(node, attrs),
                ("persistentvolumeclaims", true) if attrs.subresource == "status" => {
                    if !matches!(attrs.verb.as_str(), "update" | "patch") {
                        return no("can only get/update/patch this type");
                    }
                    return self.relationship(node, attrs);
                }
                ("persistentvolumeclaims" | "persistentvolumes", true) => return self.get_only(node, attrs),
                ("serviceaccounts", true) => return self.service_account(node, attrs),
                ("nodes", true) => return self.node(node, attrs),
                ("pods", true) => return self.pod(node, attrs),
                ("leases", false) if attrs.api_group == "coordination.k8s.io" => return self.lease(node, attrs),
                _ => {}
            }
        }
        if self.rules.iter().any(|r| r.allows(attrs)) {
            allow()
        } else {
            no("")
        }
    }

    /// Nodes' permissions depend on their pods, so they cannot be listed (upstream's
    /// answer); other users get nothing from this authorizer.
    fn rules_for(&self, user: &crate::auth::User, _namespace: &str) -> Option<(Vec<Rule>, Vec<String>)> {
        node_name(user).is_none().then(|| (vec![], vec![]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pods_use_what_they_name() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {
            "serviceAccountName": "sa",
            "imagePullSecrets": [{"name": "pull"}],
            "volumes": [
                {"name": "s", "secret": {"secretName": "vol-secret"}},
                {"name": "c", "configMap": {"name": "vol-cm"}},
                {"name": "pr", "projected": {"sources": [{"secret": {"name": "proj-secret"}}, {"configMap": {"name": "proj-cm"}}]}},
                {"name": "claim", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {}}}
            ],
            "containers": [{"name": "c", "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "env-secret", "key": "k"}}}],
                "envFrom": [{"configMapRef": {"name": "env-cm"}}]}]
        }});
        for name in ["pull", "vol-secret", "proj-secret", "env-secret"] {
            assert!(pod_uses(&pod, Uses::Secret, name), "{name}");
        }
        for name in ["vol-cm", "proj-cm", "env-cm"] {
            assert!(pod_uses(&pod, Uses::ConfigMap, name), "{name}");
        }
        assert!(pod_uses(&pod, Uses::Claim, "data") && pod_uses(&pod, Uses::Claim, "p-scratch"));
        assert!(pod_uses(&pod, Uses::ServiceAccount, "sa") && !pod_uses(&pod, Uses::ServiceAccount, "default"));
        assert!(!pod_uses(&pod, Uses::Secret, "vol-cm") && !pod_uses(&pod, Uses::ConfigMap, "vol-secret"));
        assert!(pod_uses(&json!({"spec": {}}), Uses::ServiceAccount, "default"));
    }
}

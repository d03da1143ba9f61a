//! Role-based access control (rbac.authorization.k8s.io/v1), evaluated for every
//! request as upstream's RBAC authorizer: the rules of every ClusterRoleBinding whose
//! subjects name the user, then (for a namespaced request) of the RoleBindings in that
//! namespace; the first rule that covers the request allows it. Nothing is denied
//! outright: a request no rule covers gets no opinion, and the chain refuses it.
//!
//! The policy is read from the watch cache and rebuilt whenever one of the four
//! resources changed since the last build (checked per request, so a new binding counts
//! as soon as the cache has it). `bootstrap` keeps upstream's default roles and bindings;
//! `escalation` refuses roles and bindings that grant more than their author holds;
//! `node` is the node authorizer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::rbac::v1 as rbac;
use krate_store::Revision;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::auth::User;
use crate::authz::{Authorizer, Decision};
use crate::cache::WatchCache;
use crate::request::RequestAttributes;

pub mod bootstrap;
pub mod escalation;
pub mod node;

/// A PolicyRule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub verbs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_names: Vec<String>,
    #[serde(default, rename = "nonResourceURLs", skip_serializing_if = "Vec::is_empty")]
    pub non_resource_urls: Vec<String>,
}

fn covers(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

impl Rule {
    /// Everything on every resource and every path: what `system:masters` holds, and
    /// what an aggregationRule needs.
    pub fn full_authority() -> Vec<Rule> {
        let all = vec!["*".to_string()];
        vec![
            Rule { verbs: all.clone(), api_groups: all.clone(), resources: all.clone(), ..Rule::default() },
            Rule { verbs: all.clone(), non_resource_urls: all, ..Rule::default() },
        ]
    }

    /// Upstream's `RuleAllows`.
    pub fn allows(&self, attrs: &RequestAttributes) -> bool {
        if !covers(&self.verbs, attrs.verb.as_str()) {
            return false;
        }
        if attrs.is_resource_request {
            covers(&self.api_groups, &attrs.api_group)
                && self.resource_matches(&attrs.resource, &attrs.subresource)
                && (self.resource_names.is_empty() || self.resource_names.contains(&attrs.name))
        } else {
            self.url_matches(&attrs.path)
        }
    }

    /// `pods`, `pods/log`, `*` and `*/log` as upstream's `ResourceMatches`.
    fn resource_matches(&self, resource: &str, subresource: &str) -> bool {
        self.resources.iter().any(|r| {
            r == "*"
                || (subresource.is_empty() && r == resource)
                || (!subresource.is_empty()
                    && (r.strip_prefix(resource).and_then(|s| s.strip_prefix('/')) == Some(subresource)
                        || r.strip_prefix("*/") == Some(subresource)))
        })
    }

    fn url_matches(&self, path: &str) -> bool {
        self.non_resource_urls
            .iter()
            .any(|u| u == "*" || u == path || u.strip_suffix('*').is_some_and(|prefix| path.starts_with(prefix)))
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Subject {
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

impl Subject {
    /// Upstream's `appliesToUser`; a service account without a namespace is the
    /// binding's namespace's.
    pub fn applies_to(&self, user: &User, namespace: &str) -> bool {
        match self.kind.as_str() {
            "User" => user.name == self.name,
            "Group" => user.groups.contains(&self.name),
            "ServiceAccount" => {
                let ns = if self.namespace.is_empty() { namespace } else { &self.namespace };
                let account = user.name.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'));
                !ns.is_empty() && account == Some((ns, self.name.as_str()))
            }
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self.kind.as_str() {
            "ServiceAccount" => format!("ServiceAccount \"{}/{}\"", self.namespace, self.name),
            kind => format!("{kind} {:?}", self.name),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct RoleRef {
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Binding {
    #[serde(default)]
    metadata: Meta,
    role_ref: RoleRef,
    #[serde(default)]
    subjects: Vec<Subject>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
}

#[derive(Clone, Debug, Deserialize)]
struct Role {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    rules: Vec<Rule>,
}

/// The roles and bindings at one point of the cache's history.
#[derive(Default, Debug)]
pub struct Policy {
    cluster_roles: HashMap<String, Vec<Rule>>,
    /// Namespace, then name.
    roles: HashMap<String, HashMap<String, Vec<Rule>>>,
    cluster_bindings: Vec<Binding>,
    /// Which cluster bindings name a user (a User subject, or a ServiceAccount subject
    /// under its user name) or a group, so a request looks only at those that can
    /// apply, without building a key.
    by_user: HashMap<String, Vec<usize>>,
    by_group: HashMap<String, Vec<usize>>,
    bindings: HashMap<String, Vec<Binding>>,
}

/// Where a rule that applies to a user comes from (upstream's describer: `RoleBinding
/// "ns/b" of Role "r" to User "u"`).
pub struct Source<'a> {
    binding: &'a Binding,
    subject: &'a Subject,
}

impl std::fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.binding;
        let role = format!("{} {:?}", b.role_ref.kind, b.role_ref.name);
        if b.metadata.namespace.is_empty() {
            write!(f, "ClusterRoleBinding {:?} of {role} to {}", b.metadata.name, self.subject.describe())
        } else {
            let name = format!("{}/{}", b.metadata.namespace, b.metadata.name);
            write!(f, "RoleBinding {name:?} of {role} to {}", self.subject.describe())
        }
    }
}

impl Policy {
    fn from_objects(
        cluster_roles: Vec<Value>,
        roles: Vec<Value>,
        cluster_bindings: Vec<Value>,
        bindings: Vec<Value>,
    ) -> Self {
        fn parse<T: serde::de::DeserializeOwned>(objects: Vec<Value>) -> impl Iterator<Item = T> {
            objects.into_iter().filter_map(|o| serde_json::from_value(o).ok())
        }
        let mut policy = Policy {
            cluster_roles: parse::<Role>(cluster_roles).map(|r| (r.metadata.name, r.rules)).collect(),
            cluster_bindings: parse(cluster_bindings).collect(),
            ..Policy::default()
        };
        for role in parse::<Role>(roles) {
            policy.roles.entry(role.metadata.namespace).or_default().insert(role.metadata.name, role.rules);
        }
        for (i, binding) in policy.cluster_bindings.iter().enumerate() {
            for subject in &binding.subjects {
                let (index, key) = match subject.kind.as_str() {
                    "User" => (&mut policy.by_user, subject.name.clone()),
                    "Group" => (&mut policy.by_group, subject.name.clone()),
                    "ServiceAccount" => {
                        (&mut policy.by_user, format!("system:serviceaccount:{}:{}", subject.namespace, subject.name))
                    }
                    _ => continue,
                };
                let entry = index.entry(key).or_default();
                if entry.last() != Some(&i) {
                    entry.push(i);
                }
            }
        }
        for b in parse::<Binding>(bindings) {
            policy.bindings.entry(b.metadata.namespace.clone()).or_default().push(b);
        }
        policy
    }

    /// The rules a role reference names, or upstream's NotFound message.
    pub fn role_rules(&self, role: &RoleRef, namespace: &str) -> Result<&[Rule], String> {
        match role.kind.as_str() {
            "ClusterRole" => self
                .cluster_roles
                .get(&role.name)
                .map(Vec::as_slice)
                .ok_or_else(|| format!("clusterrole.rbac.authorization.k8s.io {:?} not found", role.name)),
            "Role" => self
                .roles
                .get(namespace)
                .and_then(|roles| roles.get(&role.name))
                .map(Vec::as_slice)
                .ok_or_else(|| format!("role.rbac.authorization.k8s.io {:?} not found", role.name)),
            other => Err(format!("unsupported role reference kind: {other:?}")),
        }
    }

    /// Visits every rule that applies to `user` in `namespace` (cluster-wide bindings
    /// first), until `visit` returns false; returns the roles that bindings name but
    /// that do not exist.
    pub fn visit(&self, user: &User, namespace: &str, mut visit: impl FnMut(&Source, &Rule) -> bool) -> Vec<String> {
        let mut errors = Vec::new();
        // The cluster bindings that name the user, its account or one of its groups, in
        // their order; then the namespace's.
        let mut candidates: Vec<usize> = self.by_user.get(&user.name).cloned().unwrap_or_default();
        for group in &user.groups {
            candidates.extend(self.by_group.get(group).into_iter().flatten());
        }
        candidates.sort_unstable();
        candidates.dedup();
        let cluster = candidates.iter().map(|i| ("", &self.cluster_bindings[*i]));
        let local = self.bindings.get(namespace).filter(|_| !namespace.is_empty()).into_iter().flatten();
        for (ns, binding) in cluster.chain(local.map(|b| (namespace, b))) {
            let Some(subject) = binding.subjects.iter().find(|s| s.applies_to(user, ns)) else { continue };
            match self.role_rules(&binding.role_ref, ns) {
                Ok(rules) => {
                    let source = Source { binding, subject };
                    for rule in rules {
                        if !visit(&source, rule) {
                            return errors;
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Every rule that applies to `user` in `namespace`, and the unresolvable references.
    pub fn rules_for(&self, user: &User, namespace: &str) -> (Vec<Rule>, Vec<String>) {
        let mut rules = Vec::new();
        let errors = self.visit(user, namespace, |_, rule| {
            rules.push(rule.clone());
            true
        });
        (rules, errors)
    }

    /// The RBAC decision, with upstream's reasons: `RBAC: allowed by ...` or the
    /// references that could not be resolved.
    pub fn decide(&self, attrs: &RequestAttributes) -> Decision {
        let mut allowed = None;
        let errors = self.visit(&attrs.user, &attrs.namespace, |source, rule| {
            if rule.allows(attrs) {
                allowed = Some(format!("RBAC: allowed by {source}"));
                false
            } else {
                true
            }
        });
        match allowed {
            Some(reason) => Decision::Allow(reason),
            None if errors.is_empty() => Decision::NoOpinion(String::new()),
            None => Decision::NoOpinion(format!("RBAC: {}", aggregate(&errors))),
        }
    }
}

/// Go's `utilerrors.NewAggregate(...).Error()`: one message as it is, several in brackets.
pub fn aggregate(errors: &[String]) -> String {
    match errors {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    }
}

/// Store prefixes of the four RBAC resources, in `Policy::from_objects`' order.
fn prefixes() -> [String; 4] {
    fn prefix<T: k8s_openapi::Resource>() -> String {
        crate::registry::storage_prefix_of(krate_api::StorageResource::of::<T>())
    }
    [
        prefix::<rbac::ClusterRole>(),
        prefix::<rbac::Role>(),
        prefix::<rbac::ClusterRoleBinding>(),
        prefix::<rbac::RoleBinding>(),
    ]
}

/// What a policy was built from: each resource's cache and its last change.
type Stamp = [(usize, Revision); 4];

/// The RBAC authorizer over the watch cache.
pub struct Rbac {
    cache: Arc<WatchCache>,
    prefixes: [String; 4],
    current: Mutex<(Stamp, Arc<Policy>)>,
}

impl std::fmt::Debug for Rbac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rbac")
    }
}

impl Rbac {
    pub fn new(cache: Arc<WatchCache>) -> Arc<Self> {
        Arc::new(Self { cache, prefixes: prefixes(), current: Mutex::new(([(0, 0); 4], Arc::default())) })
    }

    fn stamp(&self) -> Stamp {
        self.prefixes.each_ref().map(|p| {
            let rc = self.cache.resource(p);
            let last = rc.state.read().expect("cache lock").last_change;
            (Arc::as_ptr(&rc) as usize, last)
        })
    }

    /// The policy as the cache holds it now.
    pub fn policy(&self) -> Arc<Policy> {
        let stamp = self.stamp();
        if let Ok(current) = self.current.lock() {
            if current.0 == stamp {
                return current.1.clone();
            }
        }
        let [a, b, c, d] = self.prefixes.each_ref().map(|p| {
            let rc = self.cache.resource(p);
            let state = rc.state.read().expect("cache lock");
            state.objects.values().map(|o| o.parse()).collect::<Vec<_>>()
        });
        let policy = Arc::new(Policy::from_objects(a, b, c, d));
        if let Ok(mut current) = self.current.lock() {
            *current = (stamp, policy.clone());
        }
        policy
    }
}

impl Authorizer for Rbac {
    fn authorize(&self, attrs: &RequestAttributes) -> Decision {
        self.policy().decide(attrs)
    }

    fn rules_for(&self, user: &User, namespace: &str) -> Option<(Vec<Rule>, Vec<String>)> {
        Some(self.policy().rules_for(user, namespace))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::request;
    use http::Method;
    use serde_json::json;

    fn user(name: &str, groups: &[&str]) -> User {
        User { name: name.into(), groups: groups.iter().map(|g| g.to_string()).collect(), ..Default::default() }
    }

    fn rule(v: Value) -> Rule {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn rules_match_as_upstreams() {
        let bob = user("bob", &[]);
        let pods = rule(json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]}));
        assert!(pods.allows(&request(&bob, Method::GET, "/api/v1/namespaces/a/pods/p")));
        assert!(!pods.allows(&request(&bob, Method::GET, "/api/v1/namespaces/a/pods/p/log")), "subresources are apart");
        assert!(!pods.allows(&request(&bob, Method::DELETE, "/api/v1/namespaces/a/pods/p")));
        assert!(!pods.allows(&request(&bob, Method::GET, "/apis/apps/v1/namespaces/a/deployments/d")));
        let logs = rule(json!({"verbs": ["get"], "apiGroups": [""], "resources": ["*/log"]}));
        assert!(logs.allows(&request(&bob, Method::GET, "/api/v1/namespaces/a/pods/p/log")));
        assert!(!logs.allows(&request(&bob, Method::GET, "/api/v1/namespaces/a/pods/p")));
        let named =
            rule(json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["configmaps"], "resourceNames": ["c"]}));
        assert!(named.allows(&request(&bob, Method::PUT, "/api/v1/namespaces/a/configmaps/c")));
        assert!(!named.allows(&request(&bob, Method::PUT, "/api/v1/namespaces/a/configmaps/d")));
        assert!(!named.allows(&request(&bob, Method::POST, "/api/v1/namespaces/a/configmaps")), "creates name nothing");
        let urls = rule(json!({"verbs": ["get"], "nonResourceURLs": ["/healthz", "/apis/*"]}));
        assert!(urls.allows(&request(&bob, Method::GET, "/healthz")));
        assert!(urls.allows(&request(&bob, Method::GET, "/apis/apps/v1")));
        assert!(!urls.allows(&request(&bob, Method::GET, "/healthz/etcd")));
        assert!(!urls.allows(&request(&bob, Method::GET, "/api/v1/pods")), "resource requests need resource rules");
    }

    fn policy() -> Policy {
        let role =
            |name: &str, ns: &str, rules: Value| json!({"metadata": {"name": name, "namespace": ns}, "rules": rules});
        let binding = |name: &str, ns: &str, kind: &str, role: &str, subjects: Value| json!({"metadata": {"name": name, "namespace": ns}, "roleRef": {"kind": kind, "name": role}, "subjects": subjects});
        Policy::from_objects(
            vec![role("reader", "", json!([{"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods"]}]))],
            vec![role("cm", "a", json!([{"verbs": ["get"], "apiGroups": [""], "resources": ["configmaps"]}]))],
            vec![
                binding("readers", "", "ClusterRole", "reader", json!([{"kind": "Group", "name": "readers"}])),
                binding("broken", "", "ClusterRole", "gone", json!([{"kind": "User", "name": "carol"}])),
            ],
            vec![
                binding("cm", "a", "Role", "cm", json!([{"kind": "ServiceAccount", "name": "bob"}])),
                binding("reader-in-b", "b", "ClusterRole", "reader", json!([{"kind": "User", "name": "carol"}])),
            ],
        )
    }

    #[test]
    fn bindings_grant_their_roles_to_their_subjects() {
        let policy = policy();
        let reader = user("alice", &["readers"]);
        let decision = policy.decide(&request(&reader, Method::GET, "/api/v1/pods"));
        assert_eq!(
            decision,
            Decision::Allow(
                r#"RBAC: allowed by ClusterRoleBinding "readers" of ClusterRole "reader" to Group "readers""#.into()
            )
        );
        let bob = user("system:serviceaccount:a:bob", &[]);
        assert!(matches!(
            policy.decide(&request(&bob, Method::GET, "/api/v1/namespaces/a/configmaps/c")),
            Decision::Allow(_)
        ));
        assert_eq!(
            policy.decide(&request(&bob, Method::GET, "/api/v1/namespaces/b/configmaps/c")),
            Decision::NoOpinion("".into())
        );
        // A ClusterRole bound in one namespace grants only there.
        let carol = user("carol", &[]);
        assert!(matches!(
            policy.decide(&request(&carol, Method::GET, "/api/v1/namespaces/b/pods")),
            Decision::Allow(_)
        ));
        assert_eq!(
            policy.decide(&request(&carol, Method::GET, "/api/v1/namespaces/c/pods")),
            Decision::NoOpinion(r#"RBAC: clusterrole.rbac.authorization.k8s.io "gone" not found"#.into())
        );
    }
}

//! Privilege escalation checks on writes of roles and bindings, as upstream's
//! policy-based REST storage for RBAC: a user may create or change a role only with
//! rules they hold themselves (or with the `escalate` verb on it), and a binding only to
//! a role whose rules they hold (or with the `bind` verb on it). `system:masters` and
//! the server's own writes pass.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::rbac::v1 as rbac;
use k8s_openapi::Resource;
use krate_api::{object, ApiError, ApiResult};
use serde_json::Value;

use super::{Rbac, RoleRef, Rule};
use crate::authz::{Chain, PRIVILEGED_GROUP};
use crate::registry::{Storage, WriteOptions};
use crate::request::{RequestAttributes, Verb};
use crate::rest::{HookTable, Hooks};

/// The rule covers `one` (a rule with one verb, group, resource and name, or one URL and
/// verb), as upstream's `ruleCovers`.
fn rule_covers(owner: &Rule, one: &Rule) -> bool {
    let has = |set: &[String], v: &String| set.iter().any(|s| s == "*" || s == v);
    let verbs = one.verbs.iter().all(|v| has(&owner.verbs, v));
    let groups = one.api_groups.iter().all(|g| has(&owner.api_groups, g));
    let resources = owner.resources.iter().any(|r| r == "*")
        || one.resources.iter().all(|r| {
            owner.resources.contains(r)
                || r.split_once('/').is_some_and(|(_, sub)| owner.resources.contains(&format!("*/{sub}")))
        });
    let urls = one.non_resource_urls.iter().all(|path| {
        owner
            .non_resource_urls
            .iter()
            .any(|o| o == path || o.strip_suffix('*').is_some_and(|prefix| path.starts_with(prefix)))
    });
    let names = owner.resource_names.is_empty()
        || (!one.resource_names.is_empty() && one.resource_names.iter().all(|n| owner.resource_names.contains(n)));
    verbs && groups && resources && urls && names
}

/// `rule` as single-verb, single-resource rules (upstream's `BreakdownRule`).
fn breakdown(rule: &Rule) -> Vec<Rule> {
    let one = |v: &String| vec![v.clone()];
    let mut out = Vec::new();
    for group in &rule.api_groups {
        for resource in &rule.resources {
            for verb in &rule.verbs {
                let base =
                    Rule { api_groups: one(group), resources: one(resource), verbs: one(verb), ..Rule::default() };
                if rule.resource_names.is_empty() {
                    out.push(base);
                } else {
                    out.extend(rule.resource_names.iter().map(|n| Rule { resource_names: one(n), ..base.clone() }));
                }
            }
        }
    }
    for url in &rule.non_resource_urls {
        out.extend(rule.verbs.iter().map(|v| Rule { non_resource_urls: one(url), verbs: one(v), ..Rule::default() }));
    }
    out
}

/// The parts of `wanted` that `owner` does not cover (empty: all covered).
pub fn covers_all(owner: &[Rule], wanted: &[Rule]) -> Vec<Rule> {
    wanted.iter().flat_map(breakdown).filter(|one| !owner.iter().any(|o| rule_covers(o, one))).collect()
}

/// Go's `%q` of a string slice: `["a" "b"]`.
fn go_quoted(list: &[String]) -> String {
    format!("[{}]", list.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(" "))
}

/// Upstream's `CompactString` of each missing rule, verbs of the same resource merged.
fn describe_missing(missing: Vec<Rule>) -> String {
    let mut merged: Vec<Rule> = Vec::new();
    for rule in missing {
        let simple = rule.non_resource_urls.is_empty();
        match merged.iter_mut().find(|m| {
            simple
                && m.non_resource_urls.is_empty()
                && m.api_groups == rule.api_groups
                && m.resources == rule.resources
                && m.resource_names == rule.resource_names
        }) {
            Some(m) => m.verbs.extend(rule.verbs),
            None => merged.push(rule),
        }
    }
    let lines: BTreeSet<String> = merged
        .iter()
        .map(|r| {
            let parts = [
                ("APIGroups", &r.api_groups),
                ("Resources", &r.resources),
                ("NonResourceURLs", &r.non_resource_urls),
                ("ResourceNames", &r.resource_names),
                ("Verbs", &r.verbs),
            ];
            let shown: Vec<String> = parts
                .iter()
                .filter(|(_, l)| !l.is_empty())
                .map(|(name, l)| format!("{name}:{}", go_quoted(l)))
                .collect();
            format!("{{{}}}", shown.join(", "))
        })
        .collect();
    lines.into_iter().collect::<Vec<_>>().join("\n")
}

/// The escalation check of one RBAC kind.
struct Escalation {
    rbac: Arc<Rbac>,
    chain: Arc<Chain>,
    /// `roles`, `clusterroles`, `rolebindings` or `clusterrolebindings`.
    resource: &'static str,
}

/// Registers the checks for the four RBAC kinds.
pub fn register(hooks: &mut HookTable, rbac: Arc<Rbac>, chain: Arc<Chain>) {
    let hook = |resource| Arc::new(Escalation { rbac: rbac.clone(), chain: chain.clone(), resource });
    hooks.register::<rbac::Role>(hook(rbac::Role::URL_PATH_SEGMENT));
    hooks.register::<rbac::ClusterRole>(hook(rbac::ClusterRole::URL_PATH_SEGMENT));
    hooks.register::<rbac::RoleBinding>(hook(rbac::RoleBinding::URL_PATH_SEGMENT));
    hooks.register::<rbac::ClusterRoleBinding>(hook(rbac::ClusterRoleBinding::URL_PATH_SEGMENT));
}

impl Escalation {
    fn forbidden(&self, name: &str, why: String) -> ApiError {
        let group = rbac::Role::GROUP;
        let qualified = krate_api::error::qualified(group, self.resource);
        ApiError::forbidden(format!("{qualified} {name:?} is forbidden: {why}"))
            .with_details(serde_json::json!({"name": name, "group": group, "kind": self.resource}))
    }

    /// Whether the chain lets the requester do `verb` on `resource` named `name`.
    fn may(&self, request: &RequestAttributes, verb: &str, resource: &str, name: &str, namespace: &str) -> bool {
        let attrs = RequestAttributes::resource(
            request.user.clone(),
            Verb::parse(verb),
            rbac::Role::GROUP,
            resource,
            "",
            namespace,
            name,
        );
        self.chain.allows(&attrs)
    }

    /// Refuses `rules` unless the requester holds them all in `namespace`.
    fn confirm_no_escalation(
        &self,
        request: &RequestAttributes,
        namespace: &str,
        name: &str,
        rules: &[Rule],
    ) -> ApiResult<()> {
        let (owner, errors) = self.rbac.policy().rules_for(&request.user, namespace);
        let missing = covers_all(&owner, rules);
        if missing.is_empty() {
            return Ok(());
        }
        let user = &request.user;
        let mut why = format!(
            "user {:?} (groups={}) is attempting to grant RBAC permissions not currently held:\n{}",
            user.name,
            go_quoted(&user.groups),
            describe_missing(missing)
        );
        if !errors.is_empty() {
            why.push_str(&format!("; resolution errors: [{}]", errors.join(" ")));
        }
        Err(self.forbidden(name, why))
    }

    fn check(&self, obj: &Value, old: Option<&Value>, opts: &WriteOptions) -> ApiResult<()> {
        let Some(request) = &opts.request else { return Ok(()) };
        if request.user.groups.iter().any(|g| g == PRIVILEGED_GROUP) {
            return Ok(());
        }
        if old.is_some_and(|old| only_gc_fields_change(old, obj)) {
            return Ok(());
        }
        let name = object::name(obj);
        let namespace = object::namespace(obj).unwrap_or(&request.namespace).to_string();
        let namespace = if self.resource.starts_with("cluster") { String::new() } else { namespace };
        if self.resource.ends_with("bindings") {
            let role_ref: RoleRef = serde_json::from_value(obj["roleRef"].clone())
                .map_err(|e| ApiError::bad_request(format!("roleRef: {e}")))?;
            let role_resource = if role_ref.kind == "ClusterRole" { "clusterroles" } else { "roles" };
            if self.may(request, "bind", role_resource, &role_ref.name, &namespace) {
                return Ok(());
            }
            let policy = self.rbac.policy();
            let rules = policy
                .role_rules(&role_ref, &namespace)
                .map_err(|_| ApiError::not_found(rbac::Role::GROUP, role_resource, &role_ref.name))?;
            self.confirm_no_escalation(request, &namespace, name, rules)
        } else {
            if self.may(request, "escalate", self.resource, name, &namespace) {
                return Ok(());
            }
            let rules: Vec<Rule> = serde_json::from_value(obj["rules"].clone()).unwrap_or_default();
            self.confirm_no_escalation(request, &namespace, name, &rules)?;
            let aggregation = obj.get("aggregationRule").filter(|a| !a.is_null());
            let changed = old.is_none_or(|old| old.get("aggregationRule").filter(|a| !a.is_null()) != aggregation);
            if aggregation.is_some() && changed {
                let held = self.rbac.policy().rules_for(&request.user, "").0;
                if !covers_all(&held, &Rule::full_authority()).is_empty() {
                    return Err(
                        self.forbidden(name, "must have cluster-admin privileges to use the aggregationRule".into())
                    );
                }
            }
            Ok(())
        }
    }
}

/// The update only touches what the garbage collector changes on the way to a delete.
fn only_gc_fields_change(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            for field in ["ownerReferences", "finalizers", "resourceVersion", "managedFields", "generation"] {
                meta.remove(field);
            }
        }
        v
    };
    strip(old) == strip(new)
}

#[async_trait::async_trait]
impl Hooks for Escalation {
    async fn begin_create(&self, _: &Storage, obj: &mut Value, opts: &WriteOptions) -> ApiResult<()> {
        self.check(obj, None, opts)
    }

    async fn begin_update(&self, _: &Storage, old: &Value, new: &mut Value, opts: &WriteOptions) -> ApiResult<()> {
        self.check(new, Some(old), opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(v: Value) -> Rule {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn coverage_follows_upstream() {
        let owner = [
            rule(json!({"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods", "*/log"]})),
            rule(json!({"verbs": ["get"], "nonResourceURLs": ["/logs/*"]})),
        ];
        assert!(covers_all(
            &owner,
            &[rule(json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods", "pods/log"]}))]
        )
        .is_empty());
        assert!(covers_all(
            &owner,
            &[rule(json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"], "resourceNames": ["p"]}))]
        )
        .is_empty());
        assert!(covers_all(&owner, &[rule(json!({"verbs": ["get"], "nonResourceURLs": ["/logs/x"]}))]).is_empty());
        let missing = covers_all(
            &owner,
            &[rule(json!({"verbs": ["get", "delete", "create"], "apiGroups": ["", "apps"], "resources": ["pods"]}))],
        );
        assert_eq!(
            describe_missing(missing),
            "{APIGroups:[\"\"], Resources:[\"pods\"], Verbs:[\"delete\" \"create\"]}\n{APIGroups:[\"apps\"], Resources:[\"pods\"], Verbs:[\"get\" \"delete\" \"create\"]}"
        );
        let named = [rule(json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"], "resourceNames": ["p"]}))];
        assert_eq!(
            covers_all(&named, &[rule(json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]}))]).len(),
            1
        );
    }
}

//! Which webhooks a request selects by their `rules`, as upstream's rule matcher:
//! operation, API group, version, resource and subresource (`*` is every resource but
//! no subresource, `*/*` everything, `pods/*` every subresource of pods, `*/status`
//! the status of everything), and scope (a Namespace counts as cluster-scoped).
//! Under `matchPolicy: Equivalent` a request for another version of the same stored
//! resource (autoscaling/v1 and v2 HPAs, a CRD's versions) matches too, and the
//! webhook is sent the object in the version its rule names.

use std::sync::Arc;

use krate_api::kinds::Registry;
use krate_api::KindInfo;
use serde_json::Value;

use crate::admission::Operation;

fn listed(rule: &Value, key: &str, value: &str) -> bool {
    rule[key].as_array().into_iter().flatten().any(|v| v == "*" || v == value)
}

fn resource_matches(rule: &Value, resource: &str, subresource: &str) -> bool {
    rule["resources"].as_array().into_iter().flatten().filter_map(Value::as_str).any(|entry| {
        let (res, sub) = entry.split_once('/').unwrap_or((entry, ""));
        (res == "*" || res == resource) && (sub == "*" || sub == subresource)
    })
}

fn scope_matches(rule: &Value, kind: &KindInfo) -> bool {
    match rule["scope"].as_str().unwrap_or("*") {
        "Cluster" => !kind.namespaced,
        "Namespaced" => kind.namespaced,
        _ => true,
    }
}

/// Whether one rule selects a request for `kind`'s resource.
pub(super) fn rule_matches(rule: &Value, kind: &KindInfo, subresource: &str, operation: Operation) -> bool {
    let operation = match operation {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    };
    listed(rule, "operations", operation)
        && listed(rule, "apiGroups", &kind.group)
        && listed(rule, "apiVersions", &kind.version)
        && resource_matches(rule, &kind.plural, subresource)
        && scope_matches(rule, kind)
}

/// The version of the resource `rules` select a request for, if they select it: the
/// requested one, or unless `exact` another served version of the same stored resource
/// that a rule names. A rule with `resourceNames` (admission policies') selects only
/// objects of those names.
pub(crate) fn matching_kind(
    kinds: &Registry,
    requested: &KindInfo,
    request: (&str, &str, Operation),
    rules: &[Value],
    exact: bool,
) -> Option<Arc<KindInfo>> {
    let (subresource, name, operation) = request;
    let named = |rule: &Value| {
        rule["resourceNames"].as_array().is_none_or(|names| names.is_empty() || names.iter().any(|n| n == name))
    };
    let selects =
        |kind: &KindInfo| rules.iter().any(|rule| rule_matches(rule, kind, subresource, operation) && named(rule));
    if selects(requested) {
        return kinds.lookup(&requested.group, &requested.version, &requested.plural).cloned();
    }
    if exact {
        return None;
    }
    kinds
        .kinds()
        .iter()
        .filter(|k| k.storage == requested.storage && (k.group != requested.group || k.version != requested.version))
        .find(|k| selects(k))
        .cloned()
}

/// A webhook's choice: its rules under its `matchPolicy`.
pub(super) fn webhook_kind(
    kinds: &Registry,
    requested: &KindInfo,
    subresource: &str,
    operation: Operation,
    hook: &Value,
) -> Option<Arc<KindInfo>> {
    let rules = hook["rules"].as_array().map(Vec::as_slice).unwrap_or_default();
    matching_kind(kinds, requested, (subresource, "", operation), rules, hook["matchPolicy"] == "Exact")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::autoscaling::{v1 as autoscaling1, v2 as autoscaling2};
    use k8s_openapi::api::core::v1 as core;
    use serde_json::json;

    fn registry() -> Registry {
        Registry::new(krate_api::kinds::builtin_kinds())
    }

    fn rule(resources: &[&str]) -> Value {
        json!({"operations": ["CREATE"], "apiGroups": ["*"], "apiVersions": ["*"], "resources": resources, "scope": "*"})
    }

    #[test]
    fn wildcards_select_resources_and_subresources_as_upstreams() {
        let kinds = registry();
        let pods = kinds.of::<core::Pod>().unwrap();
        assert!(rule_matches(&rule(&["*"]), pods, "", Operation::Create));
        assert!(!rule_matches(&rule(&["*"]), pods, "status", Operation::Create));
        assert!(rule_matches(&rule(&["*/*"]), pods, "status", Operation::Create));
        assert!(rule_matches(&rule(&["pods/*"]), pods, "ephemeralcontainers", Operation::Create));
        assert!(rule_matches(&rule(&["*/status"]), pods, "status", Operation::Create));
        assert!(!rule_matches(&rule(&["configmaps"]), pods, "", Operation::Create));
        assert!(!rule_matches(&rule(&["pods"]), pods, "", Operation::Delete));
    }

    #[test]
    fn namespaces_are_cluster_scoped() {
        let kinds = registry();
        let namespaces = kinds.of::<core::Namespace>().unwrap();
        let mut namespaced = rule(&["*"]);
        namespaced["scope"] = json!("Namespaced");
        assert!(!rule_matches(&namespaced, namespaces, "", Operation::Create));
        namespaced["scope"] = json!("Cluster");
        assert!(rule_matches(&namespaced, namespaces, "", Operation::Create));
    }

    #[test]
    fn equivalent_versions_match_unless_the_policy_is_exact() {
        let kinds = registry();
        let v1 = kinds.of::<autoscaling1::HorizontalPodAutoscaler>().unwrap();
        let mut hook = json!({"rules": [{"operations": ["CREATE"], "apiGroups": ["autoscaling"], "apiVersions": ["v2"],
            "resources": ["horizontalpodautoscalers"]}]});
        let matched = webhook_kind(&kinds, v1, "", Operation::Create, &hook).expect("equivalent");
        assert!(matched.is::<autoscaling2::HorizontalPodAutoscaler>());
        hook["matchPolicy"] = json!("Exact");
        assert!(webhook_kind(&kinds, v1, "", Operation::Create, &hook).is_none());
    }
}

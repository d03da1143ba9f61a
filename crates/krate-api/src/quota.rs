//! What objects count against a ResourceQuota: shared by the API server's admission
//! (which refuses creates over `hard`) and the controller that reports `status.used`.

use serde_json::Value;

use crate::quantity::{pod_amounts, Resources};

/// Core resources that quotas may count by their bare plural name.
const LEGACY_COUNTED: &[&str] = &[
    "pods",
    "services",
    "configmaps",
    "secrets",
    "persistentvolumeclaims",
    "replicationcontrollers",
    "resourcequotas",
];

/// The compute resources quotas track on pods, with the request-side aliases.
const POD_COMPUTE: &[&str] = &["cpu", "memory", "ephemeral-storage"];

/// `count/<plural>[.<group>]`.
pub fn count_name(group: &str, plural: &str) -> String {
    if group.is_empty() {
        format!("count/{plural}")
    } else {
        format!("count/{plural}.{group}")
    }
}

fn is_finished_pod(pod: &Value) -> bool {
    matches!(pod.pointer("/status/phase").and_then(Value::as_str), Some("Succeeded" | "Failed"))
}

/// What one object of `group/plural` uses. Finished pods use nothing.
pub fn usage(group: &str, plural: &str, obj: &Value) -> Resources {
    let mut used = Resources::default();
    if group.is_empty() && plural == "pods" && is_finished_pod(obj) {
        return used;
    }
    used.set(&count_name(group, plural), 1.0);
    if group.is_empty() && LEGACY_COUNTED.contains(&plural) {
        used.set(plural, 1.0);
    }
    match (group, plural) {
        ("", "pods") => {
            for (which, amounts) in [("requests", pod_amounts(obj, "requests")), ("limits", pod_amounts(obj, "limits"))]
            {
                for (resource, amount) in amounts.iter() {
                    used.set(&format!("{which}.{resource}"), amount);
                    if which == "requests" && POD_COMPUTE.contains(&resource) {
                        used.set(resource, amount);
                    }
                }
            }
        }
        ("", "services") => {
            let kind = obj.pointer("/spec/type").and_then(Value::as_str).unwrap_or("ClusterIP");
            if kind == "LoadBalancer" {
                used.set("services.loadbalancers", 1.0);
            }
            if matches!(kind, "NodePort" | "LoadBalancer") {
                let ports = obj.pointer("/spec/ports").and_then(Value::as_array).map_or(0, Vec::len);
                used.set("services.nodeports", ports as f64);
            }
        }
        ("", "persistentvolumeclaims") => {
            if let Some(storage) =
                obj.pointer("/spec/resources/requests/storage").and_then(Value::as_str).and_then(crate::quantity::parse)
            {
                used.set("requests.storage", storage);
            }
        }
        _ => {}
    }
    used
}

/// Which resource (group, plural) a quota's `hard` entry counts, for listing.
pub fn counted_resource(name: &str) -> Option<(String, String)> {
    if let Some(rest) = name.strip_prefix("count/") {
        return Some(match rest.split_once('.') {
            Some((plural, group)) => (group.to_string(), plural.to_string()),
            None => (String::new(), rest.to_string()),
        });
    }
    if LEGACY_COUNTED.contains(&name) {
        return Some((String::new(), name.to_string()));
    }
    if name.starts_with("services.") {
        return Some((String::new(), "services".into()));
    }
    if name == "requests.storage" {
        return Some((String::new(), "persistentvolumeclaims".into()));
    }
    if name.starts_with("requests.") || name.starts_with("limits.") || POD_COMPUTE.contains(&name) {
        return Some((String::new(), "pods".into()));
    }
    None
}

/// Compute resources a quota limits that `pod` does not declare: upstream refuses such
/// pods ("must specify ...") since their usage could not be counted.
pub fn missing_pod_amounts(hard: &serde_json::Map<String, Value>, pod: &Value) -> Vec<String> {
    let requests = pod_amounts(pod, "requests");
    let limits = pod_amounts(pod, "limits");
    hard.keys()
        .filter(|k| {
            let (amounts, resource) = match k.split_once('.') {
                Some(("requests", r)) if r != "storage" => (&requests, r),
                Some(("limits", r)) => (&limits, r),
                None if POD_COMPUTE.contains(&k.as_str()) => (&requests, k.as_str()),
                _ => return false,
            };
            amounts.get(resource).is_none()
        })
        .cloned()
        .collect()
}

/// Whether `obj` (of `group/plural`) falls under the scopes of `quota` (its
/// `spec.scopes` and `spec.scopeSelector`, all of which must match, as upstream). The
/// pod scopes (Terminating, NotTerminating, BestEffort, NotBestEffort, PriorityClass,
/// CrossNamespacePodAffinity) match pods only: a quota with one counts nothing else.
pub fn in_scope(quota: &Value, group: &str, plural: &str, obj: &Value) -> bool {
    let mut requirements: Vec<(String, String, Vec<String>)> = quota
        .pointer("/spec/scopes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|scope| (scope.to_string(), "Exists".to_string(), Vec::new()))
        .collect();
    for expr in quota.pointer("/spec/scopeSelector/matchExpressions").and_then(Value::as_array).into_iter().flatten() {
        let field = |k: &str| expr.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        let values = expr.get("values").and_then(Value::as_array).into_iter().flatten();
        let values = values.filter_map(Value::as_str).map(str::to_string).collect();
        requirements.push((field("scopeName"), field("operator"), values));
    }
    if requirements.is_empty() {
        return true;
    }
    let is_pod = group.is_empty() && plural == "pods";
    requirements.iter().all(|(scope, operator, values)| is_pod && pod_in_scope(obj, scope, operator, values))
}

fn pod_in_scope(pod: &Value, scope: &str, operator: &str, values: &[String]) -> bool {
    let terminating = pod.pointer("/spec/activeDeadlineSeconds").and_then(Value::as_i64).is_some_and(|s| s >= 0);
    let best_effort = || crate::strategy::qos_class(pod.get("spec").unwrap_or(&Value::Null)) == "BestEffort";
    match scope {
        "Terminating" => terminating,
        "NotTerminating" => !terminating,
        "BestEffort" => best_effort(),
        "NotBestEffort" => !best_effort(),
        "PriorityClass" => {
            let class = pod.pointer("/spec/priorityClassName").and_then(Value::as_str).filter(|c| !c.is_empty());
            match operator {
                "In" => class.is_some_and(|c| values.iter().any(|v| v == c)),
                "NotIn" => class.is_none_or(|c| !values.iter().any(|v| v == c)),
                "Exists" => class.is_some(),
                "DoesNotExist" => class.is_none(),
                _ => false,
            }
        }
        "CrossNamespacePodAffinity" => {
            let terms = ["podAffinity", "podAntiAffinity"].iter().flat_map(|kind| {
                ["requiredDuringSchedulingIgnoredDuringExecution", "preferredDuringSchedulingIgnoredDuringExecution"]
                    .iter()
                    .filter_map(move |when| pod.pointer(&format!("/spec/affinity/{kind}/{when}")))
                    .filter_map(Value::as_array)
                    .flatten()
            });
            let crosses = terms.into_iter().any(|t| {
                let term = t.get("podAffinityTerm").unwrap_or(t);
                term.get("namespaceSelector").is_some()
                    || term.get("namespaces").and_then(Value::as_array).is_some_and(|n| !n.is_empty())
            });
            crosses == (operator != "DoesNotExist")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn pods_count_requests_and_limits() {
        let pod = json!({"spec": {"containers": [{"resources": {"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi"}}}]}});
        let u = super::usage("", "pods", &pod);
        assert_eq!(u.get("pods"), Some(1.0));
        assert_eq!(u.get("count/pods"), Some(1.0));
        assert_eq!(u.get("requests.cpu"), Some(0.25));
        assert_eq!(u.get("cpu"), Some(0.25));
        assert_eq!(u.get("limits.memory"), Some(1024.0 * 1024.0 * 1024.0));
        assert_eq!(super::usage("", "pods", &json!({"status": {"phase": "Succeeded"}})).get("pods"), None);
        assert_eq!(super::usage("apps", "deployments", &json!({})).get("count/deployments.apps"), Some(1.0));
        let hard = json!({"requests.cpu": "1", "limits.cpu": "2", "pods": "3"});
        assert_eq!(super::missing_pod_amounts(hard.as_object().unwrap(), &pod), vec!["limits.cpu".to_string()]);
        assert_eq!(super::counted_resource("count/deployments.apps"), Some(("apps".into(), "deployments".into())));
    }

    #[test]
    fn scoped_quotas_count_only_the_pods_in_their_scopes() {
        let terminating = json!({"spec": {"scopes": ["Terminating"]}});
        let not_best_effort = json!({"spec": {"scopes": ["NotTerminating", "NotBestEffort"]}});
        let high = json!({"spec": {"scopeSelector": {"matchExpressions": [
            {"scopeName": "PriorityClass", "operator": "In", "values": ["high"]}]}}});
        let plain = json!({"spec": {"containers": [{"name": "c"}]}});
        let deadline = json!({"spec": {"activeDeadlineSeconds": 30, "containers": [{"name": "c"}]}});
        let burstable = json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}],
                                        "priorityClassName": "high"}});
        assert!(!super::in_scope(&terminating, "", "pods", &plain));
        assert!(super::in_scope(&terminating, "", "pods", &deadline));
        assert!(!super::in_scope(&not_best_effort, "", "pods", &plain));
        assert!(super::in_scope(&not_best_effort, "", "pods", &burstable));
        assert!(super::in_scope(&high, "", "pods", &burstable) && !super::in_scope(&high, "", "pods", &plain));
        // Scoped quotas count pods only; unscoped ones count everything.
        assert!(!super::in_scope(&terminating, "", "configmaps", &json!({})));
        assert!(super::in_scope(&json!({"spec": {}}), "", "configmaps", &json!({})));
    }
}

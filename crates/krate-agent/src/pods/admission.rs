//! The node's last word on a new pod, as upstream's eviction admission: under memory
//! pressure a BestEffort pod is refused (unless it tolerates the memory-pressure taint);
//! under disk or PID pressure every pod is; critical pods (static pods, and pods of
//! system-critical priority) still run. A node shutting down refuses every pod.

use k8s_openapi::api::core::v1::{Pod, Taint};

use super::{manifests, status};
use crate::pressure::Condition;

/// Upstream's `system-cluster-critical` priority; `system-node-critical` is above it.
const CRITICAL_PRIORITY: i32 = 2_000_000_000;
const MEMORY_PRESSURE_TAINT: &str = "node.kubernetes.io/memory-pressure";

pub fn is_critical(pod: &Pod) -> bool {
    let source = pod.metadata.annotations.as_ref().and_then(|a| a.get(manifests::CONFIG_SOURCE));
    source.is_some_and(|s| s != "api")
        || pod.spec.as_ref().and_then(|s| s.priority).is_some_and(|p| p >= CRITICAL_PRIORITY)
}

fn tolerates_memory_pressure(pod: &Pod) -> bool {
    let taint = Taint { key: MEMORY_PRESSURE_TAINT.into(), effect: "NoSchedule".into(), ..Default::default() };
    pod.spec
        .iter()
        .flat_map(|s| s.tolerations.iter().flatten())
        .any(|t| krate_api::selectors::toleration_matches(t, &taint))
}

/// Why the pod may not start on a node under `conditions` or `shutting_down`: upstream's
/// (reason, message), or None when it may.
pub fn rejection(pod: &Pod, conditions: &[Condition], shutting_down: bool) -> Option<(&'static str, String)> {
    if shutting_down {
        return Some(("NodeShutdown", "Pod was rejected as the node is shutting down.".into()));
    }
    if conditions.is_empty() || is_critical(pod) {
        return None;
    }
    if conditions == [Condition::Memory] && (status::qos_class(pod) != "BestEffort" || tolerates_memory_pressure(pod)) {
        return None;
    }
    let names: Vec<&str> = conditions.iter().map(|c| c.type_name()).collect();
    Some(("Evicted", format!("The node had condition: [{}]. ", names.join(" "))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A pod with one container and the `metadata` and `spec` fields given.
    fn pod(metadata: serde_json::Value, mut spec: serde_json::Value) -> Pod {
        if spec.get("containers").is_none() {
            spec["containers"] = json!([{"name": "c", "image": "i"}]);
        }
        serde_json::from_value(json!({"metadata": metadata, "spec": spec})).unwrap()
    }

    #[test]
    fn disk_pressure_refuses_every_pod_but_critical_ones() {
        let disk = [Condition::Disk];
        assert_eq!(
            rejection(&pod(json!({}), json!({})), &disk, false),
            Some(("Evicted", "The node had condition: [DiskPressure]. ".to_string()))
        );
        assert_eq!(rejection(&pod(json!({}), json!({})), &[], false), None);
        assert_eq!(
            rejection(&pod(json!({"annotations": {"kubernetes.io/config.source": "file"}}), json!({})), &disk, false),
            None
        );
        assert_eq!(rejection(&pod(json!({}), json!({"priority": 2_000_001_000})), &disk, false), None);
        assert_eq!(
            rejection(&pod(json!({}), json!({})), &[Condition::Memory, Condition::Disk], false).map(|r| r.1).as_deref(),
            Some("The node had condition: [MemoryPressure DiskPressure]. ")
        );
    }

    #[test]
    fn memory_pressure_refuses_best_effort_pods_only() {
        let memory = [Condition::Memory];
        assert!(rejection(&pod(json!({}), json!({})), &memory, false).is_some());
        assert_eq!(
            rejection(&pod(json!({}), json!({"priority": 2_000_001_000})), &[], true).map(|r| r.0),
            Some("NodeShutdown"),
            "a shutting-down node refuses even critical pods"
        );
        let burstable =
            json!({"containers": [{"name": "c", "image": "i", "resources": {"requests": {"memory": "10Mi"}}}]});
        assert_eq!(rejection(&pod(json!({}), burstable), &memory, false), None);
        let tolerating =
            json!({"tolerations": [{"key": MEMORY_PRESSURE_TAINT, "operator": "Exists", "effect": "NoSchedule"}]});
        assert_eq!(rejection(&pod(json!({}), tolerating), &memory, false), None);
    }
}

//! The node's last word on a new pod, as upstream's eviction admission: under memory
//! pressure a BestEffort pod is refused (unless it tolerates the memory-pressure taint);
//! under disk or PID pressure every pod is; critical pods (static pods, and pods of
//! system-critical priority) still run. A node shutting down refuses every pod. A pod
//! asking for a host port another pod of the node holds is refused too (upstream's
//! NodePorts predicate, for pods bound without the scheduler).

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{Pod, Taint};
use krate_api::selectors::{host_ports, HostPort};

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

/// The host ports the node's running pods hold, by pod UID.
#[derive(Default)]
pub struct HostPortClaims(Mutex<HashMap<String, Vec<HostPort>>>);

impl HostPortClaims {
    /// Records the host ports of pod `uid`. A pod not yet admitted (`admitting`) is
    /// refused, holding nothing, when another pod holds one of them: upstream's reason
    /// and message.
    pub fn claim(&self, uid: &str, pod: &Pod, admitting: bool) -> Option<(&'static str, String)> {
        let wanted = host_ports(pod);
        let mut claims = self.0.lock().expect("host port claims");
        let taken = claims.iter().filter(|(holder, _)| *holder != uid).flat_map(|(_, held)| held);
        if admitting && taken.into_iter().any(|held| wanted.iter().any(|w| w.conflicts(held))) {
            let message = "Predicate NodePorts failed: node(s) didn't have free ports for the requested pod ports";
            return Some(("NodePorts", message.into()));
        }
        if wanted.is_empty() {
            claims.remove(uid);
        } else {
            claims.insert(uid.to_string(), wanted);
        }
        None
    }

    /// Pod `uid` finished or is gone: its host ports are free.
    pub fn release(&self, uid: &str) {
        self.0.lock().expect("host port claims").remove(uid);
    }
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
    fn a_pod_asking_for_a_host_port_another_holds_is_refused() {
        let with_port = |ip: &str, protocol: &str| {
            let port = json!({"containerPort": 80, "hostPort": 8080, "hostIP": ip, "protocol": protocol});
            pod(json!({}), json!({"containers": [{"name": "c", "image": "i", "ports": [port]}]}))
        };
        let claims = HostPortClaims::default();
        assert_eq!(claims.claim("a", &with_port("", "TCP"), true), None);
        let refused = claims.claim("b", &with_port("10.0.0.1", "TCP"), true);
        assert_eq!(refused.map(|r| r.0), Some("NodePorts"), "all addresses include 10.0.0.1");
        assert_eq!(claims.claim("c", &with_port("", "UDP"), true), None, "another protocol");
        assert_eq!(claims.claim("a", &with_port("", "TCP"), true), None, "a pod never conflicts with itself");
        // A running pod found after a restart is recorded, not refused.
        assert_eq!(claims.claim("d", &with_port("", "UDP"), false), None);
        claims.release("a");
        assert_eq!(claims.claim("b", &with_port("10.0.0.1", "TCP"), true), None, "free once the holder is gone");
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

//! Preemption: a pod that fits nowhere may evict lower-priority pods from one node, as
//! upstream's DefaultPreemption does. Per node, the victims are the fewest lower-priority
//! pods whose removal lets the pod fit (removing all of them, then giving back the
//! highest-priority ones that are not needed); the chosen node is the one whose worst
//! victim has the lowest priority, then the lowest priority sum, then the fewest victims.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::plugins::{self, Needs, NodeInfo, NodeUsage, Usage};

pub fn priority(pod: &Pod) -> i32 {
    pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

/// May this pod preempt others at all?
pub fn may_preempt(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.preemption_policy.as_deref()) != Some("Never")
}

/// What preempting on one node costs.
#[derive(Debug)]
pub struct Plan {
    pub node: String,
    pub victims: Vec<Arc<Pod>>,
}

/// The pods to evict from `info`'s node so that `pod` fits, if any set does. An empty
/// list means pods already terminating there will make room: wait for them.
fn victims_on(pod: &Pod, needs: &Needs, info: &NodeInfo, usage: &NodeUsage) -> Option<Vec<Arc<Pod>>> {
    let mine = priority(pod);
    if !usage.placed.iter().any(|p| p.metadata.deletion_timestamp.is_some() || priority(p) < mine) {
        return None;
    }
    let mut reduced = usage.clone();
    let mut candidates = Vec::new();
    for placed in &usage.placed {
        let uid = placed.metadata.uid.as_deref().unwrap_or_default();
        if placed.metadata.deletion_timestamp.is_some() {
            reduced.remove(uid);
        } else if priority(placed) < mine {
            reduced.remove(uid);
            candidates.push(placed.clone());
        }
    }
    if plugins::filter(pod, needs, info, &reduced).is_some() {
        return None;
    }
    // Give back as many as possible, the most important first.
    candidates.sort_by_key(|p| std::cmp::Reverse(priority(p)));
    let mut victims = Vec::new();
    for candidate in candidates {
        let mut trial = reduced.clone();
        trial.add(candidate.clone());
        if plugins::filter(pod, needs, info, &trial).is_none() {
            reduced = trial;
        } else {
            victims.push(candidate);
        }
    }
    Some(victims)
}

/// The best node to preempt on, or `None` when preemption cannot help.
pub fn plan(pod: &Pod, nodes: &[Arc<NodeInfo>], usage: &Usage) -> Option<Plan> {
    let needs = Needs::of(pod);
    let empty = NodeUsage::default();
    let mut best: Option<((i32, i64, usize), Plan)> = None;
    for info in nodes {
        let name = info.node.metadata.name.clone().unwrap_or_default();
        let Some(victims) = victims_on(pod, &needs, info, usage.get(&name).unwrap_or(&empty)) else { continue };
        let cost = (
            victims.iter().map(|v| priority(v)).max().unwrap_or(i32::MIN),
            victims.iter().map(|v| i64::from(priority(v))).sum(),
            victims.len(),
        );
        if best.as_ref().is_none_or(|(c, _)| cost < *c) {
            best = Some((cost, Plan { node: name, victims }));
        }
    }
    best.map(|(_, plan)| plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use serde_json::json;

    fn pod(name: &str, cpu: &str, priority: i32) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "uid": name},
                "spec": {"priority": priority, "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]},
            }))
            .unwrap(),
        )
    }

    fn node(name: &str, cpu: &str) -> NodeInfo {
        NodeInfo::new(
            serde_json::from_value::<Node>(
                json!({"metadata": {"name": name}, "status": {"allocatable": {"cpu": cpu, "pods": "110"}}}),
            )
            .unwrap(),
        )
    }

    #[test]
    fn evicts_the_fewest_lowest_priority_pods() {
        let nodes = [Arc::new(node("a", "2")), Arc::new(node("b", "2"))];
        let mut usage = Usage::default();
        let on_a = usage.on("a");
        on_a.add(pod("a-low", "1", 1));
        on_a.add(pod("a-mid", "1", 5));
        let on_b = usage.on("b");
        on_b.add(pod("b-mid1", "1", 5));
        on_b.add(pod("b-mid2", "1", 5));
        let plan = plan(&pod("big", "1", 10), &nodes, &usage).unwrap();
        assert_eq!(plan.node, "a");
        assert_eq!(plan.victims.iter().map(|v| v.metadata.name.clone().unwrap()).collect::<Vec<_>>(), vec!["a-low"]);
        // Nothing of lower priority to evict: no plan.
        assert!(super::plan(&pod("low", "1", 0), &nodes, &usage).is_none());
    }
}

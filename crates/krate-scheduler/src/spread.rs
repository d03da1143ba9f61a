//! Pod topology spread constraints (upstream's PodTopologySpread), computed once per pod
//! to place: per constraint, how many matching pods each topology domain holds.
//! `DoNotSchedule` constraints filter (a node whose domain would exceed `maxSkew` over
//! the least-loaded domain is out); `ScheduleAnyway` ones score (emptier domains win).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::plugins::{matches_node_affinity, selector_matches, NodeInfo, Reason, Usage};

#[derive(Debug)]
struct Domains {
    key: String,
    max_skew: usize,
    hard: bool,
    /// Matching pods per domain value (every eligible domain present, maybe with 0).
    counts: HashMap<String, usize>,
    /// The fewest matching pods in any domain (0 while fewer than minDomains exist).
    min: usize,
    /// The pod being placed matches its own constraint (and so adds one).
    self_match: usize,
}

#[derive(Debug, Default)]
pub struct Spread {
    constraints: Vec<Domains>,
}

/// The constraint's selector, with `matchLabelKeys` turned into the pod's own values.
fn effective_selector(c: &TopologySpreadConstraint, pod: &Pod) -> Option<LabelSelector> {
    let mut selector = c.label_selector.clone()?;
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    for key in c.match_label_keys.iter().flatten() {
        if let Some(v) = labels.get(key) {
            selector.match_labels.get_or_insert_with(BTreeMap::new).insert(key.clone(), v.clone());
        }
    }
    Some(selector)
}

impl Spread {
    pub fn new(pod: &Pod, nodes: &[Arc<NodeInfo>], usage: &Usage) -> Self {
        let constraints = pod.spec.as_ref().and_then(|s| s.topology_spread_constraints.as_deref()).unwrap_or_default();
        if constraints.is_empty() {
            return Self::default();
        }
        let ns = pod.metadata.namespace.clone();
        let own_labels = pod.metadata.labels.clone().unwrap_or_default();
        let mut out = Spread::default();
        for c in constraints {
            let selector = effective_selector(c, pod);
            let honor_affinity = c.node_affinity_policy.as_deref() != Some("Ignore");
            let mut counts: HashMap<String, usize> = HashMap::new();
            for info in nodes {
                let Some(domain) = info.node.metadata.labels.as_ref().and_then(|l| l.get(&c.topology_key)) else {
                    continue;
                };
                if honor_affinity && !matches_node_affinity(pod, &info.node) {
                    continue;
                }
                let name = info.node.metadata.name.as_deref().unwrap_or_default();
                let matching = usage.get(name).map_or(0, |u| {
                    u.placed
                        .iter()
                        .filter(|p| p.metadata.namespace == ns && p.metadata.deletion_timestamp.is_none())
                        .filter(|p| {
                            selector.as_ref().is_some_and(|s| {
                                selector_matches(s, p.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
                            })
                        })
                        .count()
                });
                *counts.entry(domain.clone()).or_default() += matching;
            }
            let min_domains = c.min_domains.unwrap_or(1).max(1) as usize;
            let min = if counts.len() < min_domains { 0 } else { counts.values().copied().min().unwrap_or(0) };
            let self_match = usize::from(selector.as_ref().is_some_and(|s| selector_matches(s, &own_labels)));
            out.constraints.push(Domains {
                key: c.topology_key.clone(),
                max_skew: c.max_skew.max(1) as usize,
                hard: c.when_unsatisfiable != "ScheduleAnyway",
                counts,
                min,
                self_match,
            });
        }
        out
    }

    pub fn is_trivial(&self) -> bool {
        self.constraints.is_empty()
    }

    pub fn filter(&self, node: &Node) -> Option<Reason> {
        for c in self.constraints.iter().filter(|c| c.hard) {
            let Some(domain) = node.metadata.labels.as_ref().and_then(|l| l.get(&c.key)) else {
                return Some("node(s) didn't match pod topology spread constraints (missing required label)".into());
            };
            let count = c.counts.get(domain).copied().unwrap_or(0);
            if count + c.self_match > c.min + c.max_skew {
                return Some("node(s) didn't match pod topology spread constraints".into());
            }
        }
        None
    }

    /// 0..=100 per soft constraint: the fewer matching pods in the node's domain (against
    /// the fullest domain), the higher.
    pub fn score(&self, node: &Node) -> f64 {
        self.constraints
            .iter()
            .filter(|c| !c.hard)
            .map(|c| {
                let most = c.counts.values().copied().max().unwrap_or(0) as f64;
                let here = node
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(&c.key))
                    .and_then(|d| c.counts.get(d))
                    .copied()
                    .unwrap_or(0) as f64;
                if most == 0.0 {
                    100.0
                } else {
                    (most - here) / most * 100.0
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, zone: &str) -> NodeInfo {
        NodeInfo::new(serde_json::from_value(json!({"metadata": {"name": name, "labels": {"zone": zone}}, "status": {"allocatable": {"cpu": "4", "pods": "110"}}})).unwrap())
    }

    fn web(soft: bool) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "w", "namespace": "d", "labels": {"app": "web"}}, "spec": {"containers": [],
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": if soft { "ScheduleAnyway" } else { "DoNotSchedule" },
                "labelSelector": {"matchLabels": {"app": "web"}}}]}})).unwrap()
    }

    #[test]
    fn spreads_over_zones() {
        let (a1, a2, b1) = (Arc::new(node("a1", "a")), Arc::new(node("a2", "a")), Arc::new(node("b1", "b")));
        let mut usage = Usage::default();
        usage.on("a1").add(Arc::new(web(false)));
        let nodes = [a1.clone(), a2.clone(), b1.clone()];
        let spread = Spread::new(&web(false), &nodes, &usage);
        assert_eq!(spread.filter(&a2.node).as_deref(), Some("node(s) didn't match pod topology spread constraints"));
        assert_eq!(spread.filter(&b1.node), None);
        let soft = Spread::new(&web(true), &nodes, &usage);
        assert_eq!(soft.filter(&a2.node), None);
        assert!(soft.score(&b1.node) > soft.score(&a2.node));
    }
}

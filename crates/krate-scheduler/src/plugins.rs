//! Filter and score plugins, as upstream's default profile has them. Pure functions of a
//! pod, a node and what is already placed on the node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodAffinityTerm, Taint, Toleration,
};

use krate_api::selectors::{host_ports, HostPort};

use crate::quantity::{parse, Resources};

/// What is placed on a node (bound or assumed pods).
#[derive(Clone, Debug, Default)]
pub struct NodeUsage {
    pub requested: Resources,
    pub pods: usize,
    pub host_ports: HashSet<HostPort>,
    /// CPU and memory with upstream's defaults for pods that request none (scoring
    /// only, so that such pods spread instead of piling onto one node).
    pub non_zero: (f64, f64),
    /// The pods placed here (for inter-pod affinity).
    pub placed: Vec<Arc<Pod>>,
}

impl NodeUsage {
    pub fn add(&mut self, pod: Arc<Pod>) {
        let requests = pod_requests(&pod);
        let (cpu, memory) = non_zero(&requests);
        self.non_zero.0 += cpu;
        self.non_zero.1 += memory;
        self.requested.add(&requests);
        self.pods += 1;
        self.host_ports.extend(host_ports(&pod));
        self.placed.push(pod);
    }

    /// Takes pod `uid` (counted earlier) off this node.
    pub fn remove(&mut self, uid: &str) {
        let Some(i) = self.placed.iter().position(|p| p.metadata.uid.as_deref() == Some(uid)) else { return };
        let pod = self.placed.swap_remove(i);
        let requests = pod_requests(&pod);
        let (cpu, memory) = non_zero(&requests);
        self.non_zero.0 -= cpu;
        self.non_zero.1 -= memory;
        self.requested.subtract(&requests);
        self.pods -= 1;
        for port in host_ports(&pod) {
            self.host_ports.remove(&port);
        }
    }
}

fn non_zero(requests: &Resources) -> (f64, f64) {
    (
        requests.cpu().filter(|c| *c > 0.0).unwrap_or(DEFAULT_CPU),
        requests.memory().filter(|m| *m > 0.0).unwrap_or(DEFAULT_MEMORY),
    )
}

/// What a pod to place asks of any node, worked out once rather than per node.
#[derive(Clone, Debug)]
pub struct Needs {
    pub requests: Resources,
    host_ports: Vec<HostPort>,
    non_zero: (f64, f64),
    /// The pod's images, normalized.
    images: Vec<String>,
}

impl Needs {
    pub fn of(pod: &Pod) -> Self {
        let requests = pod_requests(pod);
        let images = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .filter_map(|c| c.image.as_deref())
            .map(normalize_image)
            .collect();
        Self { non_zero: non_zero(&requests), host_ports: host_ports(pod), requests, images }
    }
}

/// Why a node was filtered out; counted into upstream's FailedScheduling message.
pub type Reason = std::borrow::Cow<'static, str>;

/// What is placed on each node. Every node name gets a slot for good, so that the search
/// over thousands of nodes per pod reads usage by index (a pass knows each node's slot)
/// rather than hashing and comparing every node's name.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    slots: HashMap<String, usize, foldhash::fast::RandomState>,
    by_slot: Vec<NodeUsage>,
}

impl Usage {
    /// The slot of `node`, given one if it has none.
    pub fn slot(&mut self, node: &str) -> usize {
        if let Some(&slot) = self.slots.get(node) {
            return slot;
        }
        self.by_slot.push(NodeUsage::default());
        self.slots.insert(node.to_string(), self.by_slot.len() - 1);
        self.by_slot.len() - 1
    }

    pub fn at(&self, slot: usize) -> &NodeUsage {
        &self.by_slot[slot]
    }

    pub fn get(&self, node: &str) -> Option<&NodeUsage> {
        self.slots.get(node).map(|&slot| &self.by_slot[slot])
    }

    pub fn get_mut(&mut self, node: &str) -> Option<&mut NodeUsage> {
        self.slots.get(node).map(|&slot| &mut self.by_slot[slot])
    }

    /// The usage of `node`, empty if nothing was placed there yet.
    pub fn on(&mut self, node: &str) -> &mut NodeUsage {
        let slot = self.slot(node);
        &mut self.by_slot[slot]
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &NodeUsage)> {
        self.slots.iter().map(|(node, &slot)| (node.as_str(), &self.by_slot[slot]))
    }

    /// Forgets every placed pod; slots stay valid.
    pub fn clear(&mut self) {
        self.by_slot.iter_mut().for_each(|u| *u = NodeUsage::default());
    }
}

/// The effective requests of a pod: the sum over app containers, at least the largest
/// init container, plus overhead.
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = &pod.spec else { return Resources::default() };
    let requests_of = |r: Option<&k8s_openapi::api::core::v1::ResourceRequirements>| {
        let mut out = Resources::default();
        for (k, v) in r.and_then(|r| r.requests.as_ref()).into_iter().flatten() {
            out.set(k, parse(&v.0).unwrap_or(0.0));
        }
        out
    };
    let mut sum = Resources::default();
    for c in &spec.containers {
        sum.add(&requests_of(c.resources.as_ref()));
    }
    for c in spec.init_containers.iter().flatten() {
        sum.max_with(&requests_of(c.resources.as_ref()));
    }
    for (k, v) in spec.overhead.iter().flatten() {
        sum.add_one(k, parse(&v.0).unwrap_or(0.0));
    }
    sum
}

/// A node with what the plugins read from it parsed once.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub node: Node,
    pub allocatable: Resources,
    /// The node's images: normalized names and size.
    images: Vec<(HashSet<String>, f64)>,
}

impl NodeInfo {
    pub fn new(node: Node) -> Self {
        let mut allocatable = Resources::default();
        for (k, v) in node.status.as_ref().and_then(|s| s.allocatable.as_ref()).into_iter().flatten() {
            allocatable.set(k, parse(&v.0).unwrap_or(0.0));
        }
        let images = node
            .status
            .as_ref()
            .and_then(|s| s.images.as_ref())
            .into_iter()
            .flatten()
            .map(|i| (i.names.iter().flatten().map(|n| normalize_image(n)).collect(), i.size_bytes.unwrap_or(0) as f64))
            .collect();
        Self { node, allocatable, images }
    }
}

fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| krate_api::selectors::toleration_matches(t, taint))
}

/// Does a node selector requirement accept `value` (the node's label or field, if any)?
fn requirement_matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values: &[String] = req.values.as_deref().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) =
                (value.and_then(|v| v.parse::<i64>().ok()), values.first().and_then(|b| b.parse::<i64>().ok()))
            else {
                return false;
            };
            if req.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

pub(crate) fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let labels = node.metadata.labels.as_ref();
    let exprs_ok = term
        .match_expressions
        .iter()
        .flatten()
        .all(|r| requirement_matches(r, labels.and_then(|l| l.get(&r.key)).map(String::as_str)));
    let fields_ok = term
        .match_fields
        .iter()
        .flatten()
        .all(|r| r.key == "metadata.name" && requirement_matches(r, node.metadata.name.as_deref()));
    let non_empty = term.match_expressions.as_ref().is_some_and(|e| !e.is_empty())
        || term.match_fields.as_ref().is_some_and(|f| !f.is_empty());
    non_empty && exprs_ok && fields_ok
}

/// The pod's nodeSelector and required node affinity accept the node.
pub fn matches_node_affinity(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = pod.spec.as_ref() else { return true };
    let no_labels = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&no_labels);
    let selector_ok = spec.node_selector.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    selector_ok
        && spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|na| na.required_during_scheduling_ignored_during_execution.as_ref())
            .is_none_or(|required| required.node_selector_terms.iter().any(|t| term_matches(t, node)))
}

/// The placement filters (node name, cordon, node selector and affinity, taints):
/// `None` when the pod may run on the node at all. DaemonSets use these alone.
pub fn node_selected(pod: &Pod, node: &Node) -> Option<Reason> {
    let spec = pod.spec.as_ref()?;
    let node_name = node.metadata.name.as_deref().unwrap_or_default();
    let tolerations: &[Toleration] = spec.tolerations.as_deref().unwrap_or_default();
    if spec.node_name.as_deref().is_some_and(|n| !n.is_empty() && n != node_name) {
        return Some("node(s) didn't match the requested node name".into());
    }
    let no_spec = Default::default();
    let node_spec = node.spec.as_ref().unwrap_or(&no_spec);
    if node_spec.unschedulable == Some(true) {
        let taint =
            Taint { key: "node.kubernetes.io/unschedulable".into(), effect: "NoSchedule".into(), ..Default::default() };
        if !tolerates(tolerations, &taint) {
            return Some("node(s) were unschedulable".into());
        }
    }
    if !matches_node_affinity(pod, node) {
        return Some("node(s) didn't match Pod's node affinity/selector".into());
    }
    for taint in node_spec.taints.iter().flatten() {
        if matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute") && !tolerates(tolerations, taint) {
            return Some(
                format!("node(s) had untolerated taint {{{}: {}}}", taint.key, taint.value.clone().unwrap_or_default())
                    .into(),
            );
        }
    }
    None
}

/// Runs every filter; `None` when the pod fits the node, else why not.
pub fn filter(pod: &Pod, needs: &Needs, info: &NodeInfo, usage: &NodeUsage) -> Option<Reason> {
    if let Some(reason) = node_selected(pod, &info.node) {
        return Some(reason);
    }
    if needs.host_ports.iter().any(|wanted| usage.host_ports.iter().any(|held| wanted.conflicts(held))) {
        return Some("node(s) didn't have free ports for the requested pod ports".into());
    }
    let max_pods = info.allocatable.pods().unwrap_or(110.0) as usize;
    if usage.pods + 1 > max_pods {
        return Some("Too many pods".into());
    }
    needs
        .requests
        .first_shortfall(&info.allocatable, &usage.requested)
        .map(|resource| format!("Insufficient {resource}").into())
}

pub use krate_client::selectors::selector_matches;

/// Does `term` (declared by a pod in `owner_ns`) select `pod`?
fn term_selects(term: &PodAffinityTerm, owner_ns: &str, pod: &Pod) -> bool {
    static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let namespaces: &[String] = term.namespaces.as_deref().unwrap_or_default();
    let ns_ok = if namespaces.is_empty() && term.namespace_selector.is_none() {
        ns == owner_ns
    } else {
        namespaces.iter().any(|n| n == ns) || term.namespace_selector.is_some()
    };
    let labels = pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS);
    ns_ok && term.label_selector.as_ref().is_some_and(|s| selector_matches(s, labels))
}

fn required_terms(pod: &Pod, anti: bool) -> &[PodAffinityTerm] {
    let affinity = pod.spec.as_ref().and_then(|s| s.affinity.as_ref());
    let terms = if anti {
        affinity
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_deref())
    } else {
        affinity
            .and_then(|a| a.pod_affinity.as_ref())
            .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_deref())
    };
    terms.unwrap_or_default()
}

/// Inter-pod (anti-)affinity, computed once per pod to place: which topology domains
/// (topologyKey, value) it must avoid, and which it must land in.
#[derive(Debug, Default)]
pub struct PodTopology {
    /// Topology key → the domains (label values) a newcomer may not join.
    forbidden: BTreeMap<String, HashSet<String>>,
    /// Per required affinity term: the domains that hold a matching pod (None: the pod
    /// matches its own term and no pod does yet, so any domain will do).
    required: Vec<(String, Option<HashSet<String>>)>,
}

/// For each required (anti-)affinity term met during one scheduling pass: the topology
/// domains that hold a placed pod the term selects. Computed once per term and pass by
/// one scan of the placed pods, then kept current as the pass places pods, so a pass of
/// many pods with the same terms (a ReplicaSet's) does not rescan per pod.
#[derive(Default)]
pub struct TermDomains {
    /// (namespace of the term's owner, the term as JSON) → (term, domains).
    cache: HashMap<String, (PodAffinityTerm, String, HashSet<String>)>,
}

fn domain(nodes: &BTreeMap<String, Arc<NodeInfo>>, node: &str, key: &str) -> Option<String> {
    nodes.get(node).and_then(|n| n.node.metadata.labels.as_ref()?.get(key).cloned())
}

impl TermDomains {
    fn get(
        &mut self,
        term: &PodAffinityTerm,
        ns: &str,
        nodes: &BTreeMap<String, Arc<NodeInfo>>,
        usage: &Usage,
    ) -> &HashSet<String> {
        let key = format!("{ns}\u{0}{}", serde_json::to_string(term).unwrap_or_default());
        &self
            .cache
            .entry(key)
            .or_insert_with(|| {
                let mut domains = HashSet::new();
                for (node, u) in usage.iter() {
                    if u.placed.iter().any(|other| term_selects(term, ns, other)) {
                        domains.extend(domain(nodes, node, &term.topology_key));
                    }
                }
                (term.clone(), ns.to_string(), domains)
            })
            .2
    }

    /// Records that the pass placed `pod` on `node`.
    pub fn placed(&mut self, pod: &Pod, node: &str, nodes: &BTreeMap<String, Arc<NodeInfo>>) {
        for (term, ns, domains) in self.cache.values_mut() {
            if term_selects(term, ns, pod) {
                domains.extend(domain(nodes, node, &term.topology_key));
            }
        }
    }
}

impl PodTopology {
    /// `anti_holders`: placed pods that declare required anti-affinity, with their node
    /// (their rules apply to newcomers too). `terms`: the pass's cache of what the placed
    /// pods' domains are per term.
    pub fn new(
        pod: &Pod,
        nodes: &BTreeMap<String, Arc<NodeInfo>>,
        usage: &Usage,
        anti_holders: &[(String, Arc<Pod>)],
        terms: &mut TermDomains,
    ) -> Self {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let anti = required_terms(pod, true);
        let affinity = required_terms(pod, false);
        let mut out = PodTopology::default();
        for (node, other) in anti_holders {
            let other_ns = other.metadata.namespace.as_deref().unwrap_or_default();
            for term in required_terms(other, true) {
                if term_selects(term, other_ns, pod) {
                    if let Some(v) = domain(nodes, node, &term.topology_key) {
                        out.forbidden.entry(term.topology_key.clone()).or_default().insert(v);
                    }
                }
            }
        }
        for term in anti {
            let domains = terms.get(term, ns, nodes, usage);
            if !domains.is_empty() {
                out.forbidden.entry(term.topology_key.clone()).or_default().extend(domains.iter().cloned());
            }
        }
        for term in affinity {
            let domains = terms.get(term, ns, nodes, usage).clone();
            let self_match = term_selects(term, ns, pod);
            out.required
                .push((term.topology_key.clone(), if domains.is_empty() && self_match { None } else { Some(domains) }));
        }
        out
    }

    /// Whether `pod` declares required anti-affinity (and so constrains newcomers).
    pub fn holds_anti_affinity(pod: &Pod) -> bool {
        !required_terms(pod, true).is_empty()
    }

    pub fn is_trivial(&self) -> bool {
        self.forbidden.is_empty() && self.required.is_empty()
    }

    /// `None` when the node satisfies the pod's inter-pod (anti-)affinity.
    pub fn filter(&self, node: &Node) -> Option<Reason> {
        static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
        let labels = node.metadata.labels.as_ref().unwrap_or(&NO_LABELS);
        if self.forbidden.iter().any(|(key, domains)| labels.get(key).is_some_and(|v| domains.contains(v))) {
            return Some("node(s) didn't match pod anti-affinity rules".into());
        }
        for (key, domains) in &self.required {
            let ok = match (labels.get(key), domains) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(v), Some(d)) => d.contains(v),
            };
            if !ok {
                return Some("node(s) didn't match pod affinity rules".into());
            }
        }
        None
    }
}

/// Upstream's defaults for pods that request nothing, used only for scoring.
const DEFAULT_CPU: f64 = 0.1;
const DEFAULT_MEMORY: f64 = 200.0 * 1024.0 * 1024.0;

/// NodeResourcesFit (least allocated) + NodeResourcesBalancedAllocation + preferred node
/// affinity, each 0..=100.
pub fn score(pod: &Pod, needs: &Needs, info: &NodeInfo, usage: &NodeUsage) -> f64 {
    let (alloc, node) = (&info.allocatable, &info.node);
    let (cpu_req, mem_req) = needs.non_zero;
    let fraction = |cap: Option<f64>, used: f64, add: f64| {
        let cap = cap.unwrap_or(0.0);
        if cap <= 0.0 {
            return 1.0;
        }
        ((used + add) / cap).min(1.0)
    };
    let (cpu, mem) =
        (fraction(alloc.cpu(), usage.non_zero.0, cpu_req), fraction(alloc.memory(), usage.non_zero.1, mem_req));
    let least_allocated = ((1.0 - cpu) + (1.0 - mem)) / 2.0 * 100.0;
    let balanced = (1.0 - (cpu - mem).abs()) * 100.0;
    let preferred: f64 = pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| na.preferred_during_scheduling_ignored_during_execution.as_ref())
        .map(|prefs| prefs.iter().filter(|p| term_matches(&p.preference, node)).map(|p| p.weight as f64).sum())
        .unwrap_or(0.0);
    least_allocated + balanced + preferred + image_locality(needs, info)
}

/// An image reference in full form: registry, repository and tag (`nginx` →
/// `docker.io/library/nginx:latest`), so that node image lists compare.
pub fn normalize_image(image: &str) -> String {
    let (name, suffix) = match image.find('@') {
        Some(i) => (&image[..i], image[i..].to_string()),
        None => match image.rfind(':').filter(|i| !image[*i..].contains('/')) {
            Some(i) => (&image[..i], image[i..].to_string()),
            None => (image, ":latest".to_string()),
        },
    };
    let first = name.split('/').next().unwrap_or_default();
    let has_registry = name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = match (has_registry, name.contains('/')) {
        (true, _) => name.to_string(),
        (false, true) => format!("docker.io/{name}"),
        (false, false) => format!("docker.io/library/{name}"),
    };
    format!("{full}{suffix}")
}

/// ImageLocality, 0..=100: nodes that already hold the pod's images (by size, from
/// 23 MB up to 1000 MB as upstream) score higher, since the pod starts sooner there.
fn image_locality(needs: &Needs, info: &NodeInfo) -> f64 {
    const MIN: f64 = 23.0 * 1024.0 * 1024.0;
    const MAX: f64 = 1000.0 * 1024.0 * 1024.0;
    let present: f64 = needs
        .images
        .iter()
        .filter_map(|w| info.images.iter().find(|(names, _)| names.contains(w)).map(|(_, size)| size))
        .sum();
    if present <= MIN {
        0.0
    } else {
        (present.min(MAX) - MIN) / (MAX - MIN) * 100.0
    }
}

/// Upstream's "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) were unschedulable."
pub fn unschedulable_message(total: usize, reasons: &[Reason]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in reasons {
        *counts.entry(r.as_ref()).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
    if parts.is_empty() {
        format!("0/{total} nodes are available: no nodes available to schedule pods.")
    } else {
        format!("0/{total} nodes are available: {}.", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cpu: &str, extra: serde_json::Value) -> NodeInfo {
        let mut n = json!({"metadata": {"name": name, "labels": {"zone": "a"}}, "spec": {},
            "status": {"allocatable": {"cpu": cpu, "memory": "4Gi", "pods": "3"}}});
        crate::merge(&mut n, &extra);
        NodeInfo::new(serde_json::from_value(n).unwrap())
    }

    fn fits(pod: &Pod, node: &NodeInfo, usage: &NodeUsage) -> Option<Reason> {
        filter(pod, &Needs::of(pod), node, usage)
    }

    fn pod(cpu: &str, extra: serde_json::Value) -> Pod {
        let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}});
        crate::merge(&mut p, &extra);
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn a_host_port_held_on_all_addresses_is_taken_on_each() {
        let with_port = |ip: &str, protocol: &str| {
            let port = json!({"containerPort": 80, "hostPort": 8080, "hostIP": ip, "protocol": protocol});
            let mut p = pod("100m", json!({}));
            p.spec.as_mut().unwrap().containers[0].ports = Some(vec![serde_json::from_value(port).unwrap()]);
            p
        };
        let mut usage = NodeUsage::default();
        // An empty hostIP binds every address of the node.
        usage.add(Arc::new(with_port("", "TCP")));
        let n = node("n", "2", json!({}));
        let taken = Some("node(s) didn't have free ports for the requested pod ports");
        assert_eq!(fits(&with_port("10.0.0.1", "TCP"), &n, &usage).as_deref(), taken);
        assert_eq!(fits(&with_port("10.0.0.1", "UDP"), &n, &usage), None, "another protocol");
    }

    #[test]
    fn filters_explain_themselves() {
        let usage = NodeUsage::default();
        assert_eq!(fits(&pod("1", json!({})), &node("n", "2", json!({})), &usage), None);
        assert_eq!(fits(&pod("3", json!({})), &node("n", "2", json!({})), &usage).as_deref(), Some("Insufficient cpu"));
        let tainted =
            node("n", "2", json!({"spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}}));
        assert_eq!(
            fits(&pod("1", json!({})), &tainted, &usage).as_deref(),
            Some("node(s) had untolerated taint {dedicated: gpu}")
        );
        let tolerant = pod(
            "1",
            json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}}),
        );
        assert_eq!(fits(&tolerant, &tainted, &usage), None);
        let picky = pod("1", json!({"spec": {"nodeSelector": {"zone": "b"}}}));
        assert_eq!(
            fits(&picky, &node("n", "2", json!({})), &usage).as_deref(),
            Some("node(s) didn't match Pod's node affinity/selector")
        );
        let affine = pod(
            "1",
            json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}}),
        );
        assert_eq!(fits(&affine, &node("n", "2", json!({})), &usage), None);
        let cordoned = node("n", "2", json!({"spec": {"unschedulable": true}}));
        assert_eq!(fits(&pod("1", json!({})), &cordoned, &usage).as_deref(), Some("node(s) were unschedulable"));
        let full = NodeUsage { pods: 3, ..Default::default() };
        assert_eq!(fits(&pod("0", json!({})), &node("n", "2", json!({})), &full).as_deref(), Some("Too many pods"));
    }

    #[test]
    fn pod_anti_affinity_keeps_matching_pods_apart() {
        let labeled = |name: &str| node(name, "2", json!({"metadata": {"labels": {"kubernetes.io/hostname": name}}}));
        let (n1, n2) = (labeled("n1"), labeled("n2"));
        let nodes: BTreeMap<String, Arc<NodeInfo>> =
            [("n1".to_string(), Arc::new(n1.clone())), ("n2".to_string(), Arc::new(n2.clone()))].into_iter().collect();
        let mut usage = Usage::default();
        usage.on("n1").add(Arc::new(pod("0", json!({"metadata": {"labels": {"app": "x"}}}))));
        let term = json!({"labelSelector": {"matchLabels": {"app": "x"}}, "topologyKey": "kubernetes.io/hostname"});
        let loner = pod(
            "0",
            json!({"spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}}}),
        );
        let topology = PodTopology::new(&loner, &nodes, &usage, &[], &mut TermDomains::default());
        assert_eq!(topology.filter(&n1.node).as_deref(), Some("node(s) didn't match pod anti-affinity rules"));
        assert_eq!(topology.filter(&n2.node), None);
        let friend = pod(
            "0",
            json!({"spec": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}}}),
        );
        let topology = PodTopology::new(&friend, &nodes, &usage, &[], &mut TermDomains::default());
        assert_eq!(topology.filter(&n1.node), None);
        assert!(topology.filter(&n2.node).is_some());
    }

    #[test]
    fn image_names_normalize_and_present_images_score() {
        assert_eq!(normalize_image("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(normalize_image("user/app:1"), "docker.io/user/app:1");
        assert_eq!(normalize_image("127.0.0.1:5000/test-server"), "127.0.0.1:5000/test-server:latest");
        assert_eq!(normalize_image("registry.k8s.io/pause:3.10"), "registry.k8s.io/pause:3.10");
        let with_image = node(
            "n",
            "2",
            json!({"status": {"images": [{"names": ["docker.io/library/nginx:latest"], "sizeBytes": 500_000_000}]}}),
        );
        let nginx = pod("0", json!({"spec": {"containers": [{"name": "c", "image": "nginx"}]}}));
        let needs = Needs::of(&nginx);
        assert!(image_locality(&needs, &with_image) > 40.0);
        assert_eq!(image_locality(&needs, &node("m", "2", json!({}))), 0.0);
    }

    #[test]
    fn emptier_nodes_score_higher_and_messages_match_upstream() {
        let mut busy = NodeUsage::default();
        busy.add(Arc::new(pod("1500m", json!({}))));
        let n = node("n", "2", json!({}));
        let small = pod("100m", json!({}));
        let r = Needs::of(&small);
        assert!(score(&small, &r, &n, &NodeUsage::default()) > score(&small, &r, &n, &busy));
        let reasons: Vec<Reason> =
            vec!["Insufficient cpu".into(), "node(s) were unschedulable".into(), "Insufficient cpu".into()];
        assert_eq!(
            unschedulable_message(3, &reasons),
            "0/3 nodes are available: 2 Insufficient cpu, 1 node(s) were unschedulable."
        );
    }
}

//! NetworkPolicy (networking.k8s.io/v1), enforced on every node for the pods it runs, in
//! an nftables table of its own (`krate-policy-<bridge>`, rewritten whole in one
//! transaction whenever the outcome changes).
//!
//! Upstream's semantics: a pod is isolated for ingress (egress) once any policy of its
//! namespace selects it with that policy type; it then accepts (sends) only what the
//! union of those policies' rules allows, and replies of allowed connections always
//! pass. A rule allows traffic from (to) its peers — pods by podSelector in the policy's
//! namespace, all pods of namespaces by namespaceSelector, both together, or an ipBlock
//! less its exceptions; no peers: anyone — on its ports (protocol, number or named
//! container port, `endPort` ranges; no ports: all).
//!
//! The filter sits on the forward hook, which both routed traffic (pods of other nodes)
//! and bridged traffic (pods of this node, through br_netfilter) pass, after the service
//! proxy's DNAT: policies see endpoint pod IPs, as upstream's implementations do.
//! Traffic between a pod and its own node (probes, the node's DNS responder) never
//! crosses the forward hook and is not filtered.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use krate_client::selectors::selector_matches;
use kube::{Api, Resource, ResourceExt};
use tokio::sync::Notify;

use crate::watch::Change;

/// What a node needs to know of a pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodInfo {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Option<Ipv4Addr>,
    pub node: Option<String>,
    /// Named container ports: (name, protocol, number).
    pub ports: Vec<(String, String, i32)>,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let finished = matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let ip = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|p| p.ip.as_str())
            .chain(status.and_then(|s| s.pod_ip.as_deref()))
            .find_map(|ip| ip.parse::<Ipv4Addr>().ok())
            .filter(|_| !finished && !host_network);
        let ports = spec
            .into_iter()
            .flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()))
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some((p.name.clone()?, p.protocol.clone().unwrap_or_else(|| "TCP".into()), p.container_port))
            })
            .collect();
        PodInfo {
            namespace: pod.namespace().unwrap_or_default(),
            labels: pod.labels().clone(),
            ip,
            node: spec.and_then(|s| s.node_name.clone()),
            ports,
        }
    }

    fn named_port(&self, name: &str, protocol: &str) -> Option<i32> {
        self.ports.iter().find(|(n, p, _)| n == name && p == protocol).map(|(_, _, number)| *number)
    }
}

/// The cluster as policies see it.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub pods: BTreeMap<(String, String), PodInfo>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub policies: BTreeMap<(String, String), NetworkPolicy>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        }
    }

    /// The address that names the peer: the source of what comes in, the destination of
    /// what goes out.
    fn peer_field(self) -> &'static str {
        match self {
            Direction::Ingress => "ip saddr",
            Direction::Egress => "ip daddr",
        }
    }

    /// The address that names the node's own pod: the other one.
    fn pod_field(self) -> &'static str {
        match self {
            Direction::Ingress => "ip daddr",
            Direction::Egress => "ip saddr",
        }
    }
}

/// The policy types of a policy: as given, else Ingress, plus Egress if it has egress
/// rules (upstream's defaulting).
fn policy_types(policy: &NetworkPolicy) -> Vec<String> {
    let spec = policy.spec.as_ref();
    match spec.and_then(|s| s.policy_types.clone()) {
        Some(types) if !types.is_empty() => types,
        _ => {
            let mut types = vec!["Ingress".to_string()];
            if spec.and_then(|s| s.egress.as_ref()).is_some_and(|e| !e.is_empty()) {
                types.push("Egress".into());
            }
            types
        }
    }
}

fn selects(policy: &NetworkPolicy, pod: &PodInfo) -> bool {
    policy.meta().namespace.as_deref() == Some(pod.namespace.as_str())
        && policy
            .spec
            .as_ref()
            .is_some_and(|s| selector_matches(&s.pod_selector.clone().unwrap_or_default(), &pod.labels))
}

impl View {
    /// The IPs of the pods a selector peer names (namespace of the policy: `ns`).
    fn peer_pods(&self, peer: &NetworkPolicyPeer, ns: &str) -> Vec<&PodInfo> {
        let no_labels = BTreeMap::new();
        self.pods
            .values()
            .filter(|p| p.ip.is_some())
            .filter(|p| match &peer.namespace_selector {
                Some(sel) => selector_matches(sel, self.namespaces.get(&p.namespace).unwrap_or(&no_labels)),
                None => p.namespace == ns,
            })
            .filter(|p| peer.pod_selector.as_ref().is_none_or(|sel| selector_matches(sel, &p.labels)))
            .collect()
    }

    /// The match clauses of one peer (None: it names nothing, so nothing matches).
    fn peer_clause(&self, peer: &NetworkPolicyPeer, ns: &str, dir: Direction) -> Option<String> {
        let field = dir.peer_field();
        if let Some(block) = &peer.ip_block {
            if !block.cidr.contains('.') {
                return None; // IPv6: the pods here are IPv4.
            }
            let except: Vec<&str> =
                block.except.iter().flatten().filter(|e| e.contains('.')).map(String::as_str).collect();
            return Some(if except.is_empty() {
                format!("{field} {}", block.cidr)
            } else {
                format!("{field} {} {field} != {{ {} }}", block.cidr, except.join(", "))
            });
        }
        let ips: BTreeSet<Ipv4Addr> = self.peer_pods(peer, ns).into_iter().filter_map(|p| p.ip).collect();
        (!ips.is_empty()).then(|| {
            let list: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
            format!("{field} {{ {} }}", list.join(", "))
        })
    }

    /// The port clauses of a rule's ports, for traffic to `target` (ingress) or to any
    /// pod (egress, where a named port means each destination pod's own number).
    fn port_clauses(&self, ports: &[NetworkPolicyPort], target: &PodInfo, dir: Direction) -> Vec<String> {
        if ports.is_empty() {
            return vec![String::new()];
        }
        let mut out = Vec::new();
        for port in ports {
            let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
            let proto = protocol.to_lowercase();
            match &port.port {
                None => out.push(format!("meta l4proto {proto}")),
                Some(IntOrString::Int(n)) => match port.end_port {
                    Some(end) if end > *n => out.push(format!("{proto} dport {n}-{end}")),
                    _ => out.push(format!("{proto} dport {n}")),
                },
                Some(IntOrString::String(name)) => match dir {
                    Direction::Ingress => {
                        if let Some(n) = target.named_port(name, &protocol) {
                            out.push(format!("{proto} dport {n}"));
                        }
                    }
                    Direction::Egress => {
                        for pod in self.pods.values() {
                            if let (Some(ip), Some(n)) = (pod.ip, pod.named_port(name, &protocol)) {
                                out.push(format!("ip daddr {ip} {proto} dport {n}"));
                            }
                        }
                    }
                },
            }
        }
        out
    }

    /// The rules of `pod`'s chain for `dir`, if some policy isolates it that way.
    fn chain(&self, pod: &PodInfo, dir: Direction) -> Option<Vec<String>> {
        let policies: Vec<&NetworkPolicy> = self
            .policies
            .values()
            .filter(|p| selects(p, pod) && policy_types(p).iter().any(|t| t == dir.name()))
            .collect();
        if policies.is_empty() {
            return None;
        }
        let mut rules = Vec::new();
        for policy in policies {
            let ns = policy.meta().namespace.clone().unwrap_or_default();
            let spec = policy.spec.as_ref().expect("selected policies have a spec");
            let allowed: Vec<(Option<&Vec<NetworkPolicyPeer>>, &[NetworkPolicyPort])> = match dir {
                Direction::Ingress => spec
                    .ingress
                    .iter()
                    .flatten()
                    .map(|r| (r.from.as_ref(), r.ports.as_deref().unwrap_or_default()))
                    .collect(),
                Direction::Egress => spec
                    .egress
                    .iter()
                    .flatten()
                    .map(|r| (r.to.as_ref(), r.ports.as_deref().unwrap_or_default()))
                    .collect(),
            };
            for (peers, ports) in allowed {
                let peer_clauses: Vec<String> = match peers {
                    Some(peers) if !peers.is_empty() => {
                        peers.iter().filter_map(|p| self.peer_clause(p, &ns, dir)).collect()
                    }
                    _ => vec![String::new()],
                };
                for peer in &peer_clauses {
                    for port in self.port_clauses(ports, pod, dir) {
                        let parts = [peer.as_str(), port.as_str(), "return"];
                        rules.push(parts.iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(" "));
                    }
                }
            }
        }
        rules.dedup();
        rules.push("drop".into());
        Some(rules)
    }
}

fn chain_name(dir: Direction, ip: Ipv4Addr) -> String {
    format!("{}-{}", dir.name().to_lowercase(), ip.to_string().replace('.', "-"))
}

/// The whole table for the pods of `node`: one transaction that replaces the table.
pub fn ruleset(view: &View, node: &str, table: &str) -> String {
    let mut chains: Vec<(String, Vec<String>)> = Vec::new();
    let mut maps: [(Direction, Vec<String>); 2] = [(Direction::Egress, vec![]), (Direction::Ingress, vec![])];
    for pod in view.pods.values().filter(|p| p.node.as_deref() == Some(node)) {
        let Some(ip) = pod.ip else { continue };
        for (dir, entries) in maps.iter_mut() {
            if let Some(rules) = view.chain(pod, *dir) {
                let name = chain_name(*dir, ip);
                entries.push(format!("{ip} : jump {name}"));
                chains.push((name, rules));
            }
        }
    }
    let mut out = format!("table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n");
    out.push_str("  chain forward {\n    type filter hook forward priority filter; policy accept;\n");
    out.push_str("    ct state established,related accept\n");
    for (dir, entries) in &maps {
        if !entries.is_empty() {
            out.push_str(&format!("    {} vmap {{ {} }}\n", dir.pod_field(), entries.join(", ")));
        }
    }
    out.push_str("  }\n");
    for (name, rules) in &chains {
        out.push_str(&format!("  chain {name} {{\n"));
        for rule in rules {
            out.push_str(&format!("    {rule}\n"));
        }
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    out
}

#[derive(Default)]
struct Shared {
    view: Mutex<View>,
    changed: Notify,
    listed: Mutex<BTreeSet<&'static str>>,
}

/// Follows one kind into the shared view (`apply`/`remove` by key), until its watch ends.
async fn follow<K, F, G>(
    api: Api<K>,
    what: &'static str,
    shared: &Shared,
    clear: fn(&mut View),
    apply: F,
    remove: G,
) -> Result<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
    F: Fn(&mut View, &K),
    G: Fn(&mut View, &K),
{
    let mut changes = crate::watch::changes(api, what).boxed();
    while let Some(change) = changes.next().await {
        let mut view = shared.view.lock().unwrap();
        match change {
            Change::Apply(o) => apply(&mut view, &o),
            Change::Delete(o) => remove(&mut view, &o),
            Change::Relisted(all) => {
                // A relist replaces what was known of this kind.
                clear(&mut view);
                for o in &all {
                    apply(&mut view, o);
                }
                shared.listed.lock().unwrap().insert(what);
            }
        }
        drop(view);
        shared.changed.notify_one();
    }
    anyhow::bail!("the {what} watch ended")
}

fn key<K: kube::Resource>(o: &K) -> (String, String) {
    (o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default())
}

/// Enforces the cluster's NetworkPolicies for this node's pods until a watch ends.
pub async fn run(client: kube::Client, node: String, table: String) -> Result<()> {
    let shared = Arc::new(Shared::default());
    let pods = follow(
        Api::<Pod>::all(client.clone()),
        "Pod",
        &shared,
        |v| v.pods.clear(),
        |v, p: &Pod| {
            v.pods.insert(key(p), PodInfo::from_pod(p));
        },
        |v, p: &Pod| {
            v.pods.remove(&key(p));
        },
    );
    let namespaces = follow(
        Api::<Namespace>::all(client.clone()),
        "Namespace",
        &shared,
        |v| v.namespaces.clear(),
        |v, n: &Namespace| {
            v.namespaces.insert(n.name_any(), n.labels().clone());
        },
        |v, n: &Namespace| {
            v.namespaces.remove(&n.name_any());
        },
    );
    let policies = follow(
        Api::<NetworkPolicy>::all(client),
        "NetworkPolicy",
        &shared,
        |v| v.policies.clear(),
        |v, p: &NetworkPolicy| {
            v.policies.insert(key(p), p.clone());
        },
        |v, p: &NetworkPolicy| {
            v.policies.remove(&key(p));
        },
    );
    let enforce = async {
        let mut applied = String::new();
        loop {
            shared.changed.notified().await;
            // Changes come in bursts (a rollout): let them settle a moment.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if shared.listed.lock().unwrap().len() < 3 {
                continue;
            }
            let text = ruleset(&shared.view.lock().unwrap(), &node, &table);
            if text == applied {
                continue;
            }
            match crate::nft_apply(&text).await {
                Ok(()) => applied = text,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot apply the NetworkPolicy rules; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    shared.changed.notify_one();
                }
            }
        }
    };
    tokio::select! {
        r = pods => r,
        r = namespaces => r,
        r = policies => r,
        () = enforce => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, ip: &str, node: &str, labels: &[(&str, &str)]) -> ((String, String), PodInfo) {
        let info = PodInfo {
            namespace: ns.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ip: Some(ip.parse().unwrap()),
            node: Some(node.into()),
            ports: vec![("http".into(), "TCP".into(), 8080)],
        };
        ((ns.into(), name.into()), info)
    }

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> ((String, String), NetworkPolicy) {
        let p = serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
            .unwrap();
        ((ns.into(), name.into()), p)
    }

    fn view(policies: Vec<((String, String), NetworkPolicy)>) -> View {
        View {
            pods: [
                pod("web", "server", "10.42.0.2", "a", &[("app", "server")]),
                pod("web", "client", "10.42.1.2", "b", &[("app", "client")]),
                pod("other", "client", "10.42.1.3", "b", &[("app", "client")]),
                pod("web", "stranger", "10.42.0.3", "a", &[("app", "stranger")]),
            ]
            .into(),
            namespaces: [
                ("web".to_string(), [("team".to_string(), "web".to_string())].into()),
                ("other".to_string(), BTreeMap::new()),
            ]
            .into(),
            policies: policies.into_iter().collect(),
        }
    }

    fn chain<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        let start = text.find(&format!("chain {name} {{")).unwrap_or_else(|| panic!("no chain {name} in\n{text}"));
        text[start..].lines().skip(1).take_while(|l| l.trim() != "}").map(str::trim).collect()
    }

    #[test]
    fn no_policy_isolates_nothing() {
        let text = ruleset(&view(vec![]), "a", "t");
        assert!(!text.contains("vmap"), "{text}");
        assert!(text.starts_with("table ip t {}\ndelete table ip t\n"), "{text}");
    }

    #[test]
    fn default_deny_drops_all_ingress_of_the_namespace_pods_on_this_node() {
        let deny = policy("web", "deny", serde_json::json!({"podSelector": {}}));
        let text = ruleset(&view(vec![deny]), "a", "t");
        assert!(
            text.contains("ip daddr vmap { 10.42.0.2 : jump ingress-10-42-0-2, 10.42.0.3 : jump ingress-10-42-0-3 }"),
            "{text}"
        );
        assert_eq!(chain(&text, "ingress-10-42-0-2"), ["drop"]);
        assert!(!text.contains("ip saddr vmap"), "ingress only: {text}");
        assert!(text.contains("ct state established,related accept"));
    }

    #[test]
    fn a_rule_by_pod_and_namespace_allows_exactly_those_peers_and_ports() {
        let allow = policy(
            "web",
            "allow",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": "http"}]},
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "client"}}}],
                 "ports": [{"protocol": "UDP", "port": 5000, "endPort": 5010}]},
            ]}),
        );
        let text = ruleset(&view(vec![allow]), "a", "t");
        assert_eq!(
            chain(&text, "ingress-10-42-0-2"),
            [
                "ip saddr { 10.42.1.2 } tcp dport 8080 return",
                "ip saddr { 10.42.1.2, 10.42.1.3 } udp dport 5000-5010 return",
                "drop"
            ]
        );
        assert!(!text.contains("ingress-10-42-0-3"), "the stranger is not selected: {text}");
    }

    #[test]
    fn a_namespace_selector_alone_takes_every_pod_of_matching_namespaces() {
        let allow = policy(
            "web",
            "ns",
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]}]}),
        );
        let text = ruleset(&view(vec![allow]), "a", "t");
        assert_eq!(chain(&text, "ingress-10-42-0-2"), ["ip saddr { 10.42.0.2, 10.42.0.3, 10.42.1.2 } return", "drop"]);
    }

    #[test]
    fn egress_to_an_ip_block_with_exceptions_and_types_default_as_upstream() {
        let egress = policy(
            "web",
            "out",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}}, "egress": [
                {"to": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}], "ports": [{"protocol": "TCP"}]},
            ]}),
        );
        // No policyTypes: Ingress, and Egress because it has egress rules.
        let text = ruleset(&view(vec![egress]), "a", "t");
        assert_eq!(
            chain(&text, "egress-10-42-0-2"),
            ["ip daddr 192.0.2.0/24 ip daddr != { 192.0.2.128/25 } meta l4proto tcp return", "drop"]
        );
        assert_eq!(chain(&text, "ingress-10-42-0-2"), ["drop"]);
        let egress_only = policy("web", "out", serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"]}));
        let text = ruleset(&view(vec![egress_only]), "a", "t");
        assert!(text.contains("ip saddr vmap") && !text.contains("ip daddr vmap"), "{text}");
    }

    #[test]
    fn an_empty_rule_allows_everything_and_peers_that_name_nobody_nothing() {
        let all = policy("web", "all", serde_json::json!({"podSelector": {}, "ingress": [{}]}));
        let none = policy(
            "web",
            "none",
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "ghost"}}}]}]}),
        );
        assert_eq!(chain(&ruleset(&view(vec![all]), "a", "t"), "ingress-10-42-0-2"), ["return", "drop"]);
        assert_eq!(chain(&ruleset(&view(vec![none]), "a", "t"), "ingress-10-42-0-2"), ["drop"]);
    }

    #[test]
    fn egress_named_ports_are_each_destination_pods_own() {
        let named = policy(
            "web",
            "named",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Egress"],
              "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": "http"}]}]}),
        );
        let rules = chain(&ruleset(&view(vec![named]), "a", "t"), "egress-10-42-0-2").join("\n");
        assert!(rules.contains("ip daddr { 10.42.1.2 } ip daddr 10.42.1.2 tcp dport 8080 return"), "{rules}");
    }

    #[test]
    fn finished_and_host_network_pods_have_no_policy_address() {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "web"},
            "spec": {"nodeName": "a", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": "10.42.0.9"},
        }))
        .unwrap();
        let info = PodInfo::from_pod(&p);
        assert_eq!(info.ip, Some("10.42.0.9".parse().unwrap()));
        assert_eq!(info.ports, [("http".to_string(), "TCP".to_string(), 80)]);
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert_eq!(PodInfo::from_pod(&p).ip, None);
    }
}

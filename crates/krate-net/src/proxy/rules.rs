//! What the service proxy wants in the kernel, computed from Services and their endpoints
//! without touching the kernel: per service port, its chains (with their rules) and its
//! entries in the dispatch maps, laid out as upstream's kube-proxy nftables mode does
//! (`service-ips` and `service-nodeports` verdict maps send new connections to a chain per
//! service port, which picks an endpoint with `numgen random`; an endpoint chain marks
//! hairpin traffic for masquerade and DNATs). Each service port's share is a [`Share`],
//! so a change rewrites only the shares of the services that changed.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use crate::Cidr;

/// The packet mark that asks for masquerade after routing (upstream's bit 14).
pub const MASQUERADE_MARK: &str = "0x4000";

/// Transport protocols a Service port may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// One address a Service port forwards to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node.
    pub local: bool,
}

/// One port of one Service, with everything that routes to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: Option<Ipv4Addr>,
    pub port: u16,
    pub node_port: Option<u16>,
    /// externalIPs and LoadBalancer ingress addresses: reached like the node port.
    pub external_ips: Vec<Ipv4Addr>,
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub source_ranges: Vec<Cidr>,
    /// ClientIP affinity timeout in seconds.
    pub affinity: Option<u32>,
    pub internal_local: bool,
    pub external_local: bool,
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// A plain TCP ClusterIP port: unnamed, no node port, external addresses, source
    /// ranges, affinity or local traffic policies (what tests and benchmarks start from).
    pub fn cluster_ip(namespace: &str, name: &str, ip: Ipv4Addr, port: u16, endpoints: Vec<Endpoint>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            port_name: String::new(),
            protocol: Protocol::Tcp,
            cluster_ip: Some(ip),
            port,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            source_ranges: vec![],
            affinity: None,
            internal_local: false,
            external_local: false,
            endpoints,
        }
    }

    /// `ns/name/proto/port-name`, upstream's chain name base.
    pub fn id(&self) -> String {
        format!("{}/{}/{}/{}", self.namespace, self.name, self.protocol.nft(), self.port_name)
    }
}

/// The node-wide facts rules depend on.
#[derive(Clone, Debug)]
pub struct NodeContext {
    /// Pod addresses of this node: traffic from elsewhere to a ClusterIP is masqueraded.
    pub pod_cidr: Cidr,
}

/// A named dispatch map of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Map {
    ServiceIps,
    ServiceNodePorts,
    NoEndpointServices,
    NoEndpointNodePorts,
    FirewallIps,
    /// Pods' host ports on any of the node's addresses, and on one of them.
    HostPorts,
    HostIpPorts,
}

impl Map {
    pub const ALL: [Map; 7] = [
        Map::ServiceIps,
        Map::ServiceNodePorts,
        Map::NoEndpointServices,
        Map::NoEndpointNodePorts,
        Map::FirewallIps,
        Map::HostPorts,
        Map::HostIpPorts,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Map::ServiceIps => "service-ips",
            Map::ServiceNodePorts => "service-nodeports",
            Map::NoEndpointServices => "no-endpoint-services",
            Map::NoEndpointNodePorts => "no-endpoint-nodeports",
            Map::FirewallIps => "firewall-ips",
            Map::HostPorts => "host-ports",
            Map::HostIpPorts => "host-ip-ports",
        }
    }

    /// The map's key type.
    pub fn key_type(self) -> &'static str {
        match self {
            Map::ServiceNodePorts | Map::NoEndpointNodePorts | Map::HostPorts => "inet_proto . inet_service",
            _ => "ipv4_addr . inet_proto . inet_service",
        }
    }
}

/// What one service port puts into the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Share {
    /// Chain name → its rules, in order.
    pub chains: BTreeMap<String, Vec<String>>,
    /// (map, key) → verdict.
    pub elements: BTreeMap<(Map, String), String>,
    /// Affinity set name → timeout in seconds.
    pub affinity_sets: BTreeMap<String, u32>,
}

impl Share {
    pub fn merge(&mut self, other: Share) {
        self.chains.extend(other.chains);
        self.elements.extend(other.elements);
        self.affinity_sets.extend(other.affinity_sets);
    }
}

/// `base32(sha256(name))[:8]-name`, cut to fit nftables' name limit (as upstream's
/// hashAndTruncate): unique, stable across restarts, and readable in `nft list`.
pub fn chain_name(prefix: &str, name: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(name.as_bytes());
    let mut bits: u64 = 0;
    for byte in &digest[..5] {
        bits = (bits << 8) | u64::from(*byte);
    }
    let hash: String = (0..8).rev().map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char).collect();
    let mut full = format!("{prefix}-{hash}-{name}");
    if full.len() > 200 {
        full.truncate(197);
        full.push_str("...");
    }
    full
}

fn key(ip: Ipv4Addr, protocol: Protocol, port: u16) -> String {
    format!("{ip} . {} . {port}", protocol.nft())
}

fn node_port_key(protocol: Protocol, port: u16) -> String {
    format!("{} . {port}", protocol.nft())
}

/// Upstream's choice of endpoints: the ready ones, or, when there are none, the ones still
/// serving while they terminate.
fn usable(endpoints: &[&Endpoint]) -> Vec<Endpoint> {
    let ready: Vec<Endpoint> = endpoints.iter().filter(|e| e.ready).map(|e| (*e).clone()).collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints.iter().filter(|e| e.serving && e.terminating).map(|e| (*e).clone()).collect()
}

/// The chain that picks one of `endpoints` at random (ClientIP affinity first).
fn balance(
    share: &mut Share,
    chain: String,
    lead: Vec<String>,
    sp: &ServicePort,
    endpoints: &[Endpoint],
    protocol: Protocol,
) {
    let mut rules = lead;
    let endpoint_chains: Vec<String> = endpoints
        .iter()
        .map(|e| {
            let name = chain_name("endpoint", &format!("{}__{}/{}", sp.id(), e.ip, e.port));
            let affinity_set =
                sp.affinity.map(|_| chain_name("affinity", &format!("{}__{}/{}", sp.id(), e.ip, e.port)));
            if let (Some(set), Some(timeout)) = (&affinity_set, sp.affinity) {
                share.affinity_sets.insert(set.clone(), timeout);
            }
            let mut ep_rules = vec![format!("ip saddr {} jump mark-for-masquerade", e.ip)];
            if let Some(set) = &affinity_set {
                ep_rules.push(format!("update @{set} {{ ip saddr }}"));
            }
            ep_rules.push(format!("meta l4proto {} dnat to {}:{}", protocol.nft(), e.ip, e.port));
            share.chains.insert(name.clone(), ep_rules);
            if let Some(set) = affinity_set {
                rules.push(format!("ip saddr @{set} goto {name}"));
            }
            name
        })
        .collect();
    let choices: Vec<String> = endpoint_chains.iter().enumerate().map(|(i, c)| format!("{i} : goto {c}")).collect();
    rules.push(format!("numgen random mod {} vmap {{ {} }}", endpoint_chains.len(), choices.join(", ")));
    share.chains.insert(chain, rules);
}

/// The share of one pod's host ports: each DNATs to the pod (masqueraded when the pod
/// itself or the node is the client, so that the answer comes back the same way).
pub fn host_ports_share(pod_uid: &str, ports: &[crate::catalog::HostPort]) -> Share {
    let mut share = Share::default();
    for p in ports {
        let Some(protocol) = Protocol::parse(&p.protocol) else { continue };
        let chain = chain_name("hostport", &format!("{pod_uid}/{}/{}", protocol.nft(), p.host_port));
        let mut rules = Vec::new();
        if p.host_ip.is_none() {
            // Any of the node's addresses, and only those.
            rules.push("fib daddr type != local return".to_string());
        }
        rules.extend([
            format!("ip saddr {} jump mark-for-masquerade", p.pod_ip),
            "fib saddr type local jump mark-for-masquerade".to_string(),
            format!("meta l4proto {} dnat to {}:{}", protocol.nft(), p.pod_ip, p.container_port),
        ]);
        share.chains.insert(chain.clone(), rules);
        let element = match p.host_ip {
            Some(ip) => (Map::HostIpPorts, key(ip, protocol, p.host_port)),
            None => (Map::HostPorts, node_port_key(protocol, p.host_port)),
        };
        share.elements.insert(element, format!("goto {chain}"));
    }
    share
}

/// The share of one service port.
pub fn share_of(sp: &ServicePort, node: &NodeContext) -> Share {
    let mut share = Share::default();
    let id = sp.id();
    let all: Vec<&Endpoint> = sp.endpoints.iter().collect();
    let local: Vec<&Endpoint> = sp.endpoints.iter().filter(|e| e.local).collect();
    let cluster_endpoints = usable(&all);
    let local_endpoints = usable(&local);
    let any = !cluster_endpoints.is_empty();
    let service_chain = chain_name("service", &id);
    let local_chain = chain_name("local", &id);
    if any {
        let lead = match sp.cluster_ip {
            // Traffic to the ClusterIP from outside this node's pods leaves masqueraded,
            // so that replies come back through this node.
            Some(ip) => vec![format!("ip daddr {ip} ip saddr != {} jump mark-for-masquerade", node.pod_cidr)],
            None => vec![],
        };
        balance(&mut share, service_chain.clone(), lead, sp, &cluster_endpoints, sp.protocol);
    }
    if !local_endpoints.is_empty() && (sp.internal_local || sp.external_local) {
        balance(&mut share, local_chain.clone(), vec![], sp, &local_endpoints, sp.protocol);
    }
    let refuse = || "goto reject-chain".to_string();
    // ClusterIP.
    if let Some(ip) = sp.cluster_ip {
        let k = key(ip, sp.protocol, sp.port);
        match (any, sp.internal_local, local_endpoints.is_empty()) {
            (false, _, _) => {
                share.elements.insert((Map::NoEndpointServices, k), refuse());
            }
            (true, true, true) => {
                share.elements.insert((Map::NoEndpointServices, k), "drop".into());
            }
            (true, true, false) => {
                share.elements.insert((Map::ServiceIps, k), format!("goto {local_chain}"));
            }
            (true, false, _) => {
                share.elements.insert((Map::ServiceIps, k), format!("goto {service_chain}"));
            }
        }
    }
    // Everything reached from outside: node port, external and load balancer addresses.
    let external_targets: Vec<Ipv4Addr> = sp.external_ips.iter().chain(&sp.load_balancer_ips).copied().collect();
    if sp.node_port.is_none() && external_targets.is_empty() {
        return share;
    }
    let external_chain = chain_name("external", &id);
    let reachable = if sp.external_local { !local_endpoints.is_empty() } else { any };
    if any {
        let rules = if sp.external_local {
            let mut rules = vec![
                format!("ip saddr {} goto {service_chain}", node.pod_cidr),
                "fib saddr type local jump mark-for-masquerade".to_string(),
                format!("fib saddr type local goto {service_chain}"),
            ];
            if !local_endpoints.is_empty() {
                rules.push(format!("goto {local_chain}"));
            }
            rules
        } else {
            vec!["jump mark-for-masquerade".to_string(), format!("goto {service_chain}")]
        };
        share.chains.insert(external_chain.clone(), rules);
    }
    let verdict = if !any {
        Some(refuse())
    } else if !reachable {
        Some("drop".to_string())
    } else {
        None
    };
    if let Some(port) = sp.node_port {
        let k = node_port_key(sp.protocol, port);
        if any {
            share.elements.insert((Map::ServiceNodePorts, k.clone()), format!("goto {external_chain}"));
        }
        if let Some(v) = &verdict {
            share.elements.insert((Map::NoEndpointNodePorts, k), v.clone());
        }
    }
    for ip in &external_targets {
        let k = key(*ip, sp.protocol, sp.port);
        if any {
            share.elements.insert((Map::ServiceIps, k.clone()), format!("goto {external_chain}"));
        }
        if let Some(v) = &verdict {
            share.elements.insert((Map::NoEndpointServices, k), v.clone());
        }
    }
    if !sp.source_ranges.is_empty() && !sp.load_balancer_ips.is_empty() {
        let firewall_chain = chain_name("firewall", &id);
        let ranges: Vec<String> = sp.source_ranges.iter().map(|c| c.to_string()).collect();
        share.chains.insert(firewall_chain.clone(), vec![format!("ip saddr != {{ {} }} drop", ranges.join(", "))]);
        for ip in &sp.load_balancer_ips {
            share.elements.insert((Map::FirewallIps, key(*ip, sp.protocol, sp.port)), format!("goto {firewall_chain}"));
        }
    }
    share
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeContext {
        NodeContext { pod_cidr: "10.42.0.0/24".parse().unwrap() }
    }

    fn endpoint(last: u8, local: bool) -> Endpoint {
        Endpoint {
            ip: Ipv4Addr::new(10, 42, 0, last),
            port: 8080,
            ready: true,
            serving: true,
            terminating: false,
            local,
        }
    }

    fn web(endpoints: Vec<Endpoint>) -> ServicePort {
        ServicePort::cluster_ip("default", "web", Ipv4Addr::new(10, 43, 0, 5), 80, endpoints)
    }

    #[test]
    fn chain_names_are_stable_and_readable() {
        let name = chain_name("service", "default/web/tcp/");
        assert_eq!(name, chain_name("service", "default/web/tcp/"));
        assert!(name.starts_with("service-") && name.ends_with("-default/web/tcp/"), "{name}");
        assert_eq!(name.len(), "service-".len() + 8 + 1 + "default/web/tcp/".len());
        assert!(chain_name("endpoint", &"x".repeat(500)).len() <= 200);
    }

    #[test]
    fn a_cluster_ip_balances_over_ready_endpoints() {
        let share = share_of(&web(vec![endpoint(2, true), endpoint(3, false)]), &node());
        let service = chain_name("service", "default/web/tcp/");
        assert_eq!(share.elements[&(Map::ServiceIps, "10.43.0.5 . tcp . 80".into())], format!("goto {service}"));
        let rules = &share.chains[&service];
        assert_eq!(rules[0], "ip daddr 10.43.0.5 ip saddr != 10.42.0.0/24 jump mark-for-masquerade");
        assert!(rules[1].starts_with("numgen random mod 2 vmap { 0 : goto endpoint-"), "{rules:?}");
        let endpoint_chain = chain_name("endpoint", "default/web/tcp/__10.42.0.2/8080");
        assert_eq!(
            share.chains[&endpoint_chain],
            ["ip saddr 10.42.0.2 jump mark-for-masquerade", "meta l4proto tcp dnat to 10.42.0.2:8080"]
        );
        assert_eq!(share.chains.len(), 3);
    }

    #[test]
    fn no_endpoints_rejects_and_terminating_ones_serve_only_when_none_is_ready() {
        let share = share_of(&web(vec![]), &node());
        assert_eq!(share.elements[&(Map::NoEndpointServices, "10.43.0.5 . tcp . 80".into())], "goto reject-chain");
        assert!(share.chains.is_empty());
        let going = Endpoint { ready: false, terminating: true, ..endpoint(4, true) };
        let share = share_of(&web(vec![going.clone()]), &node());
        assert!(share.elements.contains_key(&(Map::ServiceIps, "10.43.0.5 . tcp . 80".into())));
        let share = share_of(&web(vec![going, endpoint(5, true)]), &node());
        assert!(share.chains.keys().any(|c| c.ends_with("__10.42.0.5/8080")));
        assert!(!share.chains.keys().any(|c| c.ends_with("__10.42.0.4/8080")), "the ready one only");
    }

    #[test]
    fn client_ip_affinity_keeps_a_set_per_endpoint() {
        let mut sp = web(vec![endpoint(2, true)]);
        sp.affinity = Some(10800);
        let share = share_of(&sp, &node());
        let set = chain_name("affinity", "default/web/tcp/__10.42.0.2/8080");
        assert_eq!(share.affinity_sets[&set], 10800);
        let service = &share.chains[&chain_name("service", "default/web/tcp/")];
        assert_eq!(
            service[1],
            format!("ip saddr @{set} goto {}", chain_name("endpoint", "default/web/tcp/__10.42.0.2/8080"))
        );
        let ep = &share.chains[&chain_name("endpoint", "default/web/tcp/__10.42.0.2/8080")];
        assert_eq!(ep[1], format!("update @{set} {{ ip saddr }}"));
    }

    #[test]
    fn node_ports_masquerade_unless_the_policy_keeps_traffic_local() {
        let mut sp = web(vec![endpoint(2, false)]);
        sp.node_port = Some(30080);
        let share = share_of(&sp, &node());
        let external = chain_name("external", "default/web/tcp/");
        assert_eq!(share.elements[&(Map::ServiceNodePorts, "tcp . 30080".into())], format!("goto {external}"));
        assert_eq!(share.chains[&external][0], "jump mark-for-masquerade");
        sp.external_local = true;
        let share = share_of(&sp, &node());
        assert_eq!(share.elements[&(Map::NoEndpointNodePorts, "tcp . 30080".into())], "drop", "no local endpoint");
        let service = chain_name("service", "default/web/tcp/");
        assert_eq!(share.chains[&external][0], format!("ip saddr 10.42.0.0/24 goto {service}"));
        sp.endpoints.push(endpoint(3, true));
        let share = share_of(&sp, &node());
        assert_eq!(
            share.chains[&external].last().unwrap(),
            &format!("goto {}", chain_name("local", "default/web/tcp/"))
        );
        assert!(!share.elements.contains_key(&(Map::NoEndpointNodePorts, "tcp . 30080".into())));
    }

    #[test]
    fn load_balancer_source_ranges_guard_the_ingress_addresses() {
        let mut sp = web(vec![endpoint(2, true)]);
        sp.load_balancer_ips = vec![Ipv4Addr::new(192, 168, 1, 10)];
        sp.source_ranges = vec!["203.0.113.0/25".parse().unwrap()];
        let share = share_of(&sp, &node());
        let firewall = chain_name("firewall", "default/web/tcp/");
        assert_eq!(share.elements[&(Map::FirewallIps, "192.168.1.10 . tcp . 80".into())], format!("goto {firewall}"));
        assert_eq!(share.chains[&firewall], ["ip saddr != { 203.0.113.0/25 } drop"]);
        assert!(share.elements.contains_key(&(Map::ServiceIps, "192.168.1.10 . tcp . 80".into())));
    }
}

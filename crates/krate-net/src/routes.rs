//! The pod network across nodes: every node routes the other nodes' pod CIDRs to them,
//! so that a pod reaches any other pod by its IP and the receiver sees the sender's
//! address (no NAT between pods; the masquerade rule of `pod.rs` leaves destinations in
//! the `pod-cidrs` set alone, which this module keeps equal to every node's pod CIDR).
//!
//! Two ways to a peer, as flannel's backends: **host-gw**, a plain route to the peer's
//! pod CIDR via its InternalIP, when the peer shares a link with this node (nothing is
//! added to the packets, so pods keep the link's full MTU); and **VXLAN**, when the peer
//! is behind a router: one `krate.vxlan` device per node, the peer's pod CIDR routed
//! onlink via the CIDR's network address, whose neighbour entry is the peer's VTEP MAC,
//! whose forwarding entry is the peer's InternalIP. VTEP MACs are derived from the node's
//! InternalIP (`vtep_mac`), so nothing is published on the Node. `auto` picks per peer.
//!
//! Routes carry the kernel route protocol `ROUTE_PROTOCOL`, so the agent finds its own
//! after a restart (and removes those of nodes that left meanwhile) and `krate reset`
//! removes them all. Peers whose InternalIP is an address of this host (several agents on
//! one machine, as tests run them) need no route: their bridges are local.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, ResourceExt};

use crate::watch::Change;
use crate::Cidr;

/// The kernel's route protocol number marking krate's routes (`ip route show proto 75`).
pub const ROUTE_PROTOCOL: &str = "75";
/// The protocol of the routes `krate dev cluster` adds on its host to its nodes' pods:
/// one of their own, so that an agent in the host's namespace (another cluster's, whose
/// first sync removes the protocol-75 routes it does not want) never takes them for its
/// stale ones, which would send the dev cluster's pod traffic to the default route.
pub const DEV_ROUTE_PROTOCOL: &str = "76";
/// The VXLAN device of a node.
pub const VXLAN_DEVICE: &str = "krate.vxlan";
/// What VXLAN adds to each packet (outer IPv4 20, UDP 8, VXLAN 8, inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// How pods reach the pods of other nodes (`--pod-network`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// host-gw to peers on a shared link, VXLAN to the others.
    Auto,
    HostGw,
    Vxlan,
}

impl Backend {
    /// The flag's value (`--pod-network`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::HostGw => "host-gw",
            Backend::Vxlan => "vxlan",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Backend::Auto),
            "host-gw" => Ok(Backend::HostGw),
            "vxlan" => Ok(Backend::Vxlan),
            _ => bail!("{s:?} is not a pod network backend: auto, host-gw or vxlan"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub backend: Backend,
    pub node_name: String,
    pub node_ip: IpAddr,
    /// The nftables table whose `pod-cidrs` set lists every node's pod CIDR.
    pub table: String,
    pub vxlan_port: u16,
    pub vxlan_id: u32,
}

/// How one peer's pods are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// A route via the peer's address on a shared link.
    Gateway,
    /// Through the VXLAN device.
    Vxlan,
}

/// The routes to one peer node's pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub cidrs: Vec<Cidr>,
    pub ip: Ipv4Addr,
    pub via: Via,
}

/// The VTEP MAC of the node with this InternalIP: locally administered, unicast.
pub fn vtep_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("0a:4b:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// A Node's IPv4 pod CIDRs and InternalIP, if it has both.
fn node_route(node: &Node) -> Option<(Vec<Cidr>, Ipv4Addr)> {
    let spec = node.spec.as_ref()?;
    let mut texts: Vec<&String> = spec.pod_cidrs.iter().flatten().collect();
    texts.extend(spec.pod_cidr.iter());
    let mut cidrs: Vec<Cidr> =
        texts.into_iter().filter_map(|c| c.parse::<Cidr>().ok()).filter(|c| c.is_ipv4()).collect();
    cidrs.sort_by_key(|c| c.to_string());
    cidrs.dedup();
    let ip = node.status.as_ref()?.addresses.iter().flatten().find_map(|a| match a.type_.as_str() {
        "InternalIP" => a.address.parse::<Ipv4Addr>().ok(),
        _ => None,
    })?;
    (!cidrs.is_empty()).then_some((cidrs, ip))
}

/// Every node's IPv4 pod CIDRs (this node's too): what masquerade leaves alone.
pub fn cluster_pod_cidrs<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeSet<String> {
    nodes.into_iter().filter_map(node_route).flat_map(|(cidrs, _)| cidrs).map(|c| c.to_string()).collect()
}

/// The peers this node routes to: every other node with a pod CIDR and an InternalIP that
/// is not an address of this host. `shares_link` says whether a peer is reached without a
/// router (host-gw works).
pub fn peers<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    config: &RouteConfig,
    local: &BTreeSet<IpAddr>,
    mut shares_link: impl FnMut(Ipv4Addr) -> bool,
) -> BTreeMap<String, Peer> {
    let mut out = BTreeMap::new();
    for node in nodes {
        let name = node.name_any();
        if name == config.node_name {
            continue;
        }
        let Some((cidrs, ip)) = node_route(node) else { continue };
        if local.contains(&IpAddr::V4(ip)) || IpAddr::V4(ip) == config.node_ip {
            continue;
        }
        let via = match config.backend {
            Backend::HostGw => Via::Gateway,
            Backend::Vxlan => Via::Vxlan,
            Backend::Auto if shares_link(ip) => Via::Gateway,
            Backend::Auto => Via::Vxlan,
        };
        out.insert(name, Peer { cidrs, ip, via });
    }
    out
}

/// Runs `ip` (or `bridge`) and fails with its message.
async fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {program} (apt-get install -y iproute2)"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A link of this host (network namespace): its name, MTU and addresses.
struct Link {
    name: String,
    mtu: u32,
    addresses: Vec<IpAddr>,
}

async fn links() -> Result<Vec<Link>> {
    let text = run("ip", &["-j", "addr", "show"]).await?;
    let links: serde_json::Value = serde_json::from_str(&text).context("reading `ip -j addr show`")?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            let addresses = l["addr_info"].as_array()?.iter().filter_map(|a| a["local"].as_str()?.parse().ok());
            Some(Link {
                name: l["ifname"].as_str()?.to_string(),
                mtu: l["mtu"].as_u64()? as u32,
                addresses: addresses.collect(),
            })
        })
        .collect())
}

/// The addresses of this host (network namespace).
async fn local_addresses() -> Result<BTreeSet<IpAddr>> {
    Ok(links().await?.into_iter().flat_map(|l| l.addresses).collect())
}

/// The link holding `ip` and its MTU.
pub async fn link_of(ip: IpAddr) -> Result<Option<(String, u32)>> {
    Ok(links().await?.into_iter().find(|l| l.addresses.contains(&ip)).map(|l| (l.name, l.mtu)))
}

/// The MTU pods get: the node link's, less VXLAN's overhead unless only host-gw is used.
/// None for a node on loopback (the plugins' default applies).
pub async fn pod_mtu(node_ip: IpAddr, backend: Backend) -> Option<u32> {
    if node_ip.is_loopback() {
        return None;
    }
    let (_, mtu) = link_of(node_ip).await.ok()??;
    Some(match backend {
        Backend::HostGw => mtu,
        Backend::Auto | Backend::Vxlan => mtu.saturating_sub(VXLAN_OVERHEAD),
    })
}

/// Whether `ip` is reached without a router: the kernel's route to it has no gateway.
async fn directly_reachable(ip: Ipv4Addr) -> bool {
    let Ok(text) = run("ip", &["-j", "route", "get", &ip.to_string()]).await else { return false };
    let routes: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    routes.get(0).is_some_and(|r| r.get("gateway").is_none() && r["type"].as_str() != Some("local"))
}

/// What of the Nodes decides the routes: each one's pod CIDRs and InternalIP.
type Routing = BTreeMap<String, (Vec<Cidr>, Ipv4Addr)>;

/// The node's routes to its peers, as applied.
struct Routes {
    config: RouteConfig,
    applied: BTreeMap<String, Peer>,
    pod_cidrs: BTreeSet<String>,
    vxlan_ready: bool,
    /// The Nodes' routing as last applied: most Node updates (status, heartbeats) leave
    /// it alone, and then nothing is looked up or run.
    synced: Option<Routing>,
    /// Whether a peer address is on a shared link, as the kernel said the first time.
    reachable: HashMap<Ipv4Addr, bool>,
}

impl Routes {
    fn new(config: RouteConfig) -> Self {
        Routes {
            config,
            applied: BTreeMap::new(),
            pod_cidrs: BTreeSet::new(),
            vxlan_ready: false,
            synced: None,
            reachable: HashMap::new(),
        }
    }

    async fn ensure_vxlan(&mut self) -> Result<()> {
        if self.vxlan_ready {
            return Ok(());
        }
        let IpAddr::V4(local) = self.config.node_ip else { bail!("VXLAN needs an IPv4 node address") };
        let (link, mtu) = link_of(self.config.node_ip)
            .await?
            .with_context(|| format!("no interface holds the node address {local} (--node-ip)"))?;
        let exists = run("ip", &["link", "show", VXLAN_DEVICE]).await.is_ok();
        if !exists {
            let (id, port) = (self.config.vxlan_id.to_string(), self.config.vxlan_port.to_string());
            let local = local.to_string();
            let args = [
                "link",
                "add",
                VXLAN_DEVICE,
                "type",
                "vxlan",
                "id",
                &id,
                "local",
                &local,
                "dev",
                &link,
                "dstport",
                &port,
            ];
            run("ip", &[&args[..], &["nolearning"]].concat()).await.context("creating the VXLAN device")?;
        }
        let mtu = mtu.saturating_sub(VXLAN_OVERHEAD).to_string();
        let mac = vtep_mac(local);
        run("ip", &["link", "set", VXLAN_DEVICE, "address", &mac, "mtu", &mtu, "up"]).await?;
        self.vxlan_ready = true;
        Ok(())
    }

    async fn add(&mut self, peer: &Peer) -> Result<()> {
        let ip = peer.ip.to_string();
        for cidr in &peer.cidrs {
            let dst = cidr.to_string();
            match peer.via {
                Via::Gateway => {
                    run("ip", &["route", "replace", &dst, "via", &ip, "proto", ROUTE_PROTOCOL]).await?;
                }
                Via::Vxlan => {
                    self.ensure_vxlan().await?;
                    let gw = cidr.network.to_string();
                    let mac = vtep_mac(peer.ip);
                    run("ip", &["neigh", "replace", &gw, "lladdr", &mac, "dev", VXLAN_DEVICE, "nud", "permanent"])
                        .await?;
                    run("bridge", &["fdb", "replace", &mac, "dev", VXLAN_DEVICE, "dst", &ip, "self", "permanent"])
                        .await?;
                    let args = ["route", "replace", &dst, "via", &gw, "dev", VXLAN_DEVICE, "onlink", "proto"];
                    run("ip", &[&args[..], &[ROUTE_PROTOCOL]].concat()).await?;
                }
            }
        }
        Ok(())
    }

    async fn remove(&self, peer: &Peer) -> Result<()> {
        for cidr in &peer.cidrs {
            let dst = cidr.to_string();
            let _ = run("ip", &["route", "del", &dst, "proto", ROUTE_PROTOCOL]).await;
            if peer.via == Via::Vxlan {
                let gw = cidr.network.to_string();
                let _ = run("ip", &["neigh", "del", &gw, "dev", VXLAN_DEVICE]).await;
                let mac = vtep_mac(peer.ip);
                let _ = run("bridge", &["fdb", "del", &mac, "dev", VXLAN_DEVICE, "dst", &peer.ip.to_string(), "self"])
                    .await;
            }
        }
        Ok(())
    }

    /// Brings the routes and the `pod-cidrs` set to what `nodes` say.
    async fn sync(&mut self, nodes: &[&Node]) -> Result<()> {
        let routing: Routing = nodes.iter().filter_map(|n| Some((n.name_any(), node_route(n)?))).collect();
        if self.synced.as_ref() == Some(&routing) {
            return Ok(());
        }
        let first = self.synced.is_none();
        let local = local_addresses().await?;
        for (_, ip) in routing.values() {
            if self.config.backend == Backend::Auto && !self.reachable.contains_key(ip) {
                self.reachable.insert(*ip, directly_reachable(*ip).await);
            }
        }
        let reachable = &self.reachable;
        let desired = peers(nodes.iter().copied(), &self.config, &local, |ip| reachable.get(&ip) == Some(&true));
        let pod_cidrs = cluster_pod_cidrs(nodes.iter().copied());
        if pod_cidrs != self.pod_cidrs {
            crate::pod::set_cluster_pod_cidrs(&self.config.table, &pod_cidrs).await?;
            self.pod_cidrs = pod_cidrs;
        }
        for (name, peer) in std::mem::take(&mut self.applied) {
            match desired.get(&name) {
                Some(want) if *want == peer => {
                    self.applied.insert(name, peer);
                }
                _ => {
                    self.remove(&peer).await?;
                    tracing::info!(node = %name, "removed the routes to a node's pods");
                }
            }
        }
        for (name, peer) in &desired {
            if self.applied.contains_key(name) {
                continue;
            }
            self.add(peer).await.with_context(|| format!("routing to the pods of node {name}"))?;
            tracing::info!(node = %name, ip = %peer.ip, via = ?peer.via, cidrs = ?peer.cidrs.iter().map(Cidr::to_string).collect::<Vec<_>>(), "routed a node's pods");
            self.applied.insert(name.clone(), peer.clone());
        }
        if first {
            remove_stale(&desired).await?;
        }
        self.synced = Some(routing);
        Ok(())
    }
}

/// Removes krate's routes other than to `desired`, and the VXLAN device if no peer is
/// reached through it: what an earlier run left for nodes that are gone.
async fn remove_stale(desired: &BTreeMap<String, Peer>) -> Result<()> {
    let wanted: BTreeSet<String> = desired.values().flat_map(|p| p.cidrs.iter().map(Cidr::to_string)).collect();
    for dst in own_routes().await? {
        if !wanted.contains(&dst) {
            let _ = run("ip", &["route", "del", &dst, "proto", ROUTE_PROTOCOL]).await;
            tracing::info!(cidr = %dst, "removed a route to a node that left");
        }
    }
    if !desired.values().any(|p| p.via == Via::Vxlan) && run("ip", &["link", "show", VXLAN_DEVICE]).await.is_ok() {
        let _ = run("ip", &["link", "del", VXLAN_DEVICE]).await;
    }
    Ok(())
}

/// The destinations of krate's routes in this network namespace.
async fn own_routes() -> Result<Vec<String>> {
    let text = run("ip", &["-j", "route", "show", "proto", ROUTE_PROTOCOL]).await?;
    let routes: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    Ok(routes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["dst"].as_str())
        .map(|d| if d.contains('/') { d.to_string() } else { format!("{d}/32") })
        .collect())
}

/// Follows the Nodes and keeps the routes to their pods until the watch ends.
pub async fn run_routes(client: kube::Client, config: RouteConfig) -> Result<()> {
    let mut changes = crate::watch::changes(Api::<Node>::all(client), "Node").boxed();
    let mut routes = Routes::new(config);
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    while let Some(change) = changes.next().await {
        match change {
            Change::Apply(node) => {
                nodes.insert(node.name_any(), node);
            }
            Change::Delete(node) => {
                nodes.remove(&node.name_any());
            }
            Change::Relisted(all) => nodes = all.into_iter().map(|n| (n.name_any(), n)).collect(),
        }
        let list: Vec<&Node> = nodes.values().collect();
        if let Err(e) = routes.sync(&list).await {
            tracing::warn!(error = %format!("{e:#}"), "cannot route to the other nodes' pods yet");
        }
    }
    bail!("the Node watch ended")
}

/// Removes krate's routes and VXLAN device from this network namespace (`krate reset`).
pub async fn remove_all() -> Result<()> {
    for dst in own_routes().await.unwrap_or_default() {
        let _ = run("ip", &["route", "del", &dst, "proto", ROUTE_PROTOCOL]).await;
    }
    if run("ip", &["link", "show", VXLAN_DEVICE]).await.is_ok() {
        run("ip", &["link", "del", VXLAN_DEVICE]).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: &str, ip: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]},
        }))
        .unwrap()
    }

    fn config(backend: Backend) -> RouteConfig {
        RouteConfig {
            backend,
            node_name: "a".into(),
            node_ip: "172.30.0.11".parse().unwrap(),
            table: "krate-krate0".into(),
            vxlan_port: 8472,
            vxlan_id: 1,
        }
    }

    #[test]
    fn peers_are_the_other_nodes_with_a_cidr_and_an_address() {
        let nodes = [
            node("a", "10.42.0.0/24", "172.30.0.11"),
            node("b", "10.42.1.0/24", "172.30.0.12"),
            node("c", "10.42.2.0/24", "10.9.0.3"),
            node("same-host", "10.42.3.0/24", "127.0.0.1"),
        ];
        let mut no_cidr = node("d", "10.42.4.0/24", "172.30.0.14");
        no_cidr.spec = None;
        let local: BTreeSet<IpAddr> = ["127.0.0.1".parse().unwrap()].into();
        let all: Vec<&Node> = nodes.iter().chain([&no_cidr]).collect();
        let on_link = |ip: Ipv4Addr| ip.octets()[0] == 172;
        let auto = peers(all.iter().copied(), &config(Backend::Auto), &local, on_link);
        assert_eq!(auto.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(auto["b"].via, Via::Gateway);
        assert_eq!(auto["c"].via, Via::Vxlan);
        assert_eq!(auto["b"].cidrs[0].to_string(), "10.42.1.0/24");
        let vxlan = peers(all.iter().copied(), &config(Backend::Vxlan), &local, on_link);
        assert!(vxlan.values().all(|p| p.via == Via::Vxlan));
        let host_gw = peers(all.iter().copied(), &config(Backend::HostGw), &local, on_link);
        assert!(host_gw.values().all(|p| p.via == Via::Gateway));
        assert_eq!(
            cluster_pod_cidrs(all.iter().copied()).into_iter().collect::<Vec<_>>(),
            ["10.42.0.0/24", "10.42.1.0/24", "10.42.2.0/24", "10.42.3.0/24"]
        );
    }

    #[test]
    fn vtep_macs_are_local_unicast_and_follow_the_address() {
        assert_eq!(vtep_mac("172.30.0.12".parse().unwrap()), "0a:4b:ac:1e:00:0c");
        assert_ne!(vtep_mac("172.30.0.12".parse().unwrap()), vtep_mac("172.30.0.13".parse().unwrap()));
    }

    #[test]
    fn backends_parse_by_their_flag_names() {
        assert_eq!("host-gw".parse::<Backend>().unwrap(), Backend::HostGw);
        assert_eq!("vxlan".parse::<Backend>().unwrap(), Backend::Vxlan);
        assert!("flannel".parse::<Backend>().unwrap_err().to_string().contains("auto, host-gw or vxlan"));
    }
}

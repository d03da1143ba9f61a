//! The service proxy of a node, on nftables (as kube-proxy's nftables mode): ClusterIPs,
//! node ports, external and load balancer addresses DNAT to the Services' endpoints,
//! picked at random (or by ClientIP affinity); no endpoints rejects; traffic policies
//! `Local` keep to this node's endpoints.
//!
//! It follows Services and EndpointSlices from the API (a client like any other, through
//! the node's [`Catalog`]) and rewrites only what changed: each change marks its Service,
//! and one transaction per pass replaces the shares of the marked Services (`rules.rs` computes them, `nft.rs`
//! writes them). The first pass, once both watches have listed, is a full sync that
//! replaces whatever the table held without deleting it, so a restarted agent leaves
//! established connections alone. A failed transaction changed nothing; it is retried
//! as a full sync, with back-off, and counted.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use crate::catalog::{Catalog, Key, Known};
use crate::Cidr;

pub mod metrics;
pub mod nft;
pub mod rules;

use rules::{Endpoint, NodeContext, Protocol, ServicePort, Share};

/// How long changes are gathered before a pass (a burst of endpoint changes becomes one
/// transaction; upstream's minSyncPeriod is 1 s).
const GATHER: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A node's proxy settings.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The node's nftables table (shared with the pod network's masquerade).
    pub table: String,
    pub bridge: String,
    pub node_name: String,
    /// Addresses that accept node port and load balancer traffic.
    pub node_ips: Vec<Ipv4Addr>,
    pub pod_cidr: Cidr,
    /// The cluster's service ranges (their addresses never leave the node untranslated).
    pub service_cidrs: Vec<Cidr>,
    /// The cluster DNS address, answered on this node by the DNS responder at the given
    /// address and port instead of by endpoints.
    pub local_dns: Option<LocalDns>,
    /// Told the Services of each pass once its rules are in the kernel (benchmarks and
    /// tests measure programming latency with it).
    pub applied: Option<tokio::sync::broadcast::Sender<Vec<Key>>>,
}

#[derive(Clone, Copy, Debug)]
pub struct LocalDns {
    pub cluster_ip: Ipv4Addr,
    pub responder: Ipv4Addr,
    pub port: u16,
}

/// The ports of a Service as the proxy sees them, with their endpoints.
pub fn service_ports(svc: &Service, slices: &[&EndpointSlice], node_name: &str) -> Vec<ServicePort> {
    let Some(spec) = &svc.spec else { return vec![] };
    if spec.type_.as_deref() == Some("ExternalName") {
        return vec![];
    }
    let v4 = |s: &str| s.parse::<Ipv4Addr>().ok();
    let cluster_ip = spec.cluster_ip.as_deref().and_then(v4);
    let external_ips: Vec<Ipv4Addr> = spec.external_ips.iter().flatten().filter_map(|ip| v4(ip)).collect();
    let load_balancer_ips: Vec<Ipv4Addr> = if spec.type_.as_deref() == Some("LoadBalancer") {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
        ingress.into_iter().flatten().filter_map(|i| i.ip.as_deref().and_then(v4)).collect()
    } else {
        vec![]
    };
    let source_ranges: Vec<Cidr> =
        spec.load_balancer_source_ranges.iter().flatten().filter_map(|r| r.trim().parse().ok()).collect();
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let timeout = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()?.timeout_seconds);
        timeout.unwrap_or(10800).max(1) as u32
    });
    let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some(protocol) = Protocol::parse(port.protocol.as_deref().unwrap_or("TCP")) else { continue };
        let port_name = port.name.clone().unwrap_or_default();
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for slice in slices.iter().filter(|s| s.address_type == "IPv4") {
            let Some(slice_port) = slice.ports.iter().flatten().find(|p| {
                p.name.as_deref().unwrap_or_default() == port_name
                    && p.protocol.as_deref().unwrap_or("TCP") == port.protocol.as_deref().unwrap_or("TCP")
            }) else {
                continue;
            };
            let Some(number) = slice_port.port.and_then(|p| u16::try_from(p).ok()) else { continue };
            for e in slice.endpoints.iter().flatten() {
                let Some(ip) = e.addresses.first().and_then(|a| v4(a)) else { continue };
                let conditions = e.conditions.clone().unwrap_or_default();
                let ready = conditions.ready.unwrap_or(true);
                let endpoint = Endpoint {
                    ip,
                    port: number,
                    ready,
                    serving: conditions.serving.unwrap_or(ready),
                    terminating: conditions.terminating.unwrap_or(false),
                    local: e.node_name.as_deref() == Some(node_name),
                };
                if !endpoints.iter().any(|x| x.ip == endpoint.ip && x.port == endpoint.port) {
                    endpoints.push(endpoint);
                }
            }
        }
        endpoints.sort_by_key(|e| (e.ip, e.port));
        out.push(ServicePort {
            namespace: svc.namespace().unwrap_or_default(),
            name: svc.name_any(),
            port_name,
            protocol,
            cluster_ip,
            port: u16::try_from(port.port).unwrap_or(0),
            node_port: port.node_port.filter(|_| node_ports).and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0),
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            source_ranges: source_ranges.clone(),
            affinity,
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            endpoints,
        });
    }
    out
}

/// The share of the cluster DNS address: this node's responder, whatever the Service's
/// endpoints say.
fn local_dns_share(dns: &LocalDns) -> Share {
    let mut share = Share::default();
    let chain = rules::chain_name("local", "kube-system/kube-dns/dns");
    share
        .chains
        .insert(chain.clone(), vec![format!("meta l4proto {{ tcp, udp }} dnat to {}:{}", dns.responder, dns.port)]);
    for protocol in ["udp", "tcp"] {
        share
            .elements
            .insert((rules::Map::ServiceIps, format!("{} . {protocol} . 53", dns.cluster_ip)), format!("goto {chain}"));
    }
    share
}

/// The share of one Service as the catalog shows it now.
fn share(config: &ProxyConfig, known: &Known, key: &Key, node: &NodeContext) -> Share {
    if let Some(uid) = key.1.strip_prefix("hostports/").filter(|_| key.0.is_empty()) {
        return rules::host_ports_share(uid, known.host_ports.get(uid).map(Vec::as_slice).unwrap_or_default());
    }
    let mut share = Share::default();
    let Some(svc) = known.services.get(key) else { return share };
    let dns = config
        .local_dns
        .filter(|d| svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some(d.cluster_ip.to_string().as_str()));
    if let Some(dns) = dns {
        return local_dns_share(&dns);
    }
    for sp in service_ports(svc, &known.slices_of(key), &config.node_name) {
        share.merge(rules::share_of(&sp, node));
    }
    share
}

/// Runs the proxy on what `catalog` shows, until the task is dropped.
pub async fn run(catalog: &Catalog, config: ProxyConfig) -> Result<()> {
    enable_loopback_endpoints(&config.bridge);
    let changes = catalog.listen();
    let node = NodeContext { pod_cidr: config.pod_cidr };
    let base = nft::Base {
        table: config.table.clone(),
        bridge: config.bridge.clone(),
        node_ips: config.node_ips.clone(),
        service_cidrs: config.service_cidrs.clone(),
    };
    // What the kernel holds, per Service, after the last successful pass.
    let mut applied: HashMap<Key, Share> = HashMap::new();
    let mut full = true;
    let mut backoff = Duration::from_secs(1);
    loop {
        changes.changed().await;
        tokio::time::sleep(GATHER).await;
        if !changes.listed() {
            continue;
        }
        let (changed, old, new) = changes.take(|dirty, known| {
            let changed: Vec<Key> = if full {
                let host_ports = known.host_ports.keys().map(|uid| crate::catalog::host_ports_key(uid));
                let all = known.services.keys().cloned().chain(host_ports).chain(applied.keys().cloned());
                all.collect::<BTreeSet<_>>().into_iter().collect()
            } else {
                dirty
            };
            let mut old = Share::default();
            let mut new = Vec::new();
            for key in &changed {
                if let Some(s) = applied.get(key) {
                    old.merge(s.clone());
                }
                new.push((key.clone(), share(&config, known, key, &node)));
            }
            (changed, old, new)
        });
        let mut wanted = Share::default();
        for (_, share) in &new {
            wanted.merge(share.clone());
        }
        let started = Instant::now();
        let result = apply_pass(&config.table, &base, full, &old, &wanted).await;
        match result {
            Ok(()) => {
                metrics::observe_sync(full, started.elapsed());
                if full {
                    applied.clear();
                    tracing::info!(
                        services = new.len(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "service proxy rules in place"
                    );
                }
                for (key, share) in new {
                    if share == Share::default() {
                        applied.remove(&key);
                    } else {
                        applied.insert(key, share);
                    }
                }
                metrics::programmed();
                if let Some(applied) = &config.applied {
                    let _ = applied.send(changed.clone());
                }
                full = false;
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                metrics::sync_failed();
                tracing::error!(error = %format!("{e:#}"), retry_in_s = backoff.as_secs(), "programming service rules failed; nothing was changed, retrying as a full sync");
                full = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                changes.requeue(changed);
            }
        }
    }
}

/// One transaction: everything (`full`, also rewriting the base), or the change from
/// `old` to `wanted`.
pub async fn apply_pass(table: &str, base: &nft::Base, full: bool, old: &Share, wanted: &Share) -> Result<()> {
    let mut tx = nft::Tx::new(table);
    if full {
        // The base alone first: whatever a Service's share does to the second
        // transaction, the drop for untranslated service addresses is in place.
        let mut base_tx = nft::Tx::new(table);
        base_tx.base(base);
        nft::apply(&base_tx).await?;
        let existing = nft::existing(table).await?;
        tx.full(wanted, &existing);
    } else {
        tx.partial(old, wanted);
    }
    if tx.is_empty() {
        return Ok(());
    }
    nft::apply(&tx).await
}

/// Lets DNAT reach a loopback endpoint (the API server listening on 127.0.0.1) from the
/// pod bridge; the table drops anything else headed there.
fn enable_loopback_endpoints(bridge: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::warn!(path, error = %e, "cannot let pods reach services with loopback endpoints");
    }
}

/// The IPv4 addresses among `ips`.
pub fn ipv4s(ips: &[IpAddr]) -> Vec<Ipv4Addr> {
    ips.iter().filter_map(|ip| if let IpAddr::V4(v4) = ip { Some(*v4) } else { None }).collect()
}

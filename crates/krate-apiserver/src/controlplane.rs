//! What an API server keeps up in the cluster for itself, as upstream's control-plane
//! controllers: the default ServiceCIDR `kubernetes`, the `kubernetes` Service in
//! `default` with its Endpoints and EndpointSlice naming every live API server (so pods
//! reach the API at `kubernetes.default.svc`), the `kube-dns` Service at the cluster DNS
//! address, and the repair pass of the service allocator.
//!
//! Several servers may share one store (etcd). Each keeps an identity Lease in
//! `kube-system` as upstream's API servers do (`apiserver-<hash>`, label
//! `apiserver.kubernetes.io/identity=kube-apiserver`), renewed every 10 s and carrying
//! its advertise address; the `kubernetes` endpoints are the addresses of the Leases
//! renewed within the last 15 s (upstream's lease endpoint reconciler keeps the same TTL
//! on its `masterleases`), so a server that dies drops out of them within 25 s. The Lease
//! also carries the server's krate version (label `krate.dev/version`): a server starting
//! beside live ones more than one minor version away refuses to
//! ([`check_server_versions`]), so servers in HA stay within one minor, as upgrades
//! one server at a time keep them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use krate_api::ApiResult;
use serde_json::{json, Value};

use crate::registry::{self, Scope, Subresource, WriteOptions};
use crate::ApiServer;

/// How often the endpoints of the `kubernetes` Service are checked (upstream: 10 s).
const ENDPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// How long a server counts as live after its last renewal (upstream's masterlease TTL).
const ENDPOINT_TTL: Duration = Duration::from_secs(15);
/// Upstream's identity Leases: their label, and how long one lasts unrenewed.
const IDENTITY_LABEL: &str = "apiserver.kubernetes.io/identity";
const IDENTITY_DURATION_SECONDS: i64 = 3600;
/// The annotation on a server's identity Lease that holds its advertise address.
pub const ADVERTISE_ANNOTATION: &str = "krate.dev/advertise-address";
/// The label on a server's identity Lease that holds its krate version.
pub const VERSION_LABEL: &str = "krate.dev/version";
/// How many minor versions apart servers sharing a store may be.
const SERVER_MINORS_APART: u64 = 1;
/// How often the allocator's reservations are reconciled with the Services.
const REPAIR_INTERVAL: Duration = Duration::from_secs(180);
const MANAGER: &str = "kube-apiserver";

fn write_options() -> WriteOptions {
    WriteOptions { field_manager: MANAGER.into(), ..Default::default() }
}

impl ApiServer {
    /// The ServiceCIDR and the `kubernetes` Service, created if missing.
    pub(crate) async fn bootstrap_services(&self) -> ApiResult<()> {
        let net = &self.settings.service_network;
        let cidrs: Vec<String> = net.cidrs.iter().map(|c| c.to_string()).collect();
        let scope = self.storage.builtin::<ServiceCIDR>(None);
        let cidr = json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
            "metadata": {"name": "kubernetes"}, "spec": {"cidrs": cidrs}});
        self.storage.ensure(&scope, cidr).await?;
        let stored = self.storage.get(&scope, "kubernetes").await?.parse();
        if stored.pointer("/status/conditions").is_none() {
            let mut ready = stored.clone();
            ready["status"] = json!({"conditions": [{"type": "Ready", "status": "True", "reason": "",
                "message": "Kubernetes default Service CIDR is ready", "lastTransitionTime": krate_api::object::now_rfc3339()}]});
            self.storage.update(&scope, "kubernetes", Subresource::Status, ready, &write_options()).await?;
        }
        let port = self.advertised().map(|a| a.port()).unwrap_or(6443);
        let service = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": net.kubernetes_ip().to_string(), "ipFamilyPolicy": "SingleStack",
                "sessionAffinity": "None", "ports": [{"name": "https", "protocol": "TCP", "port": 443, "targetPort": port}]}});
        self.storage.ensure(&self.storage.builtin::<Service>(Some("default".into())), service).await?;
        if let Some(dns) = self.settings.cluster_dns {
            // Answered on every node by the node's own DNS responder, so nothing selects pods.
            let kube_dns = json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "kube-dns", "namespace": "kube-system",
                    "labels": {"k8s-app": "kube-dns", "kubernetes.io/cluster-service": "true", "kubernetes.io/name": "CoreDNS"}},
                "spec": {"type": "ClusterIP", "clusterIP": dns.to_string(), "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]}});
            self.storage.ensure(&self.storage.builtin::<Service>(Some("kube-system".into())), kube_dns).await?;
        }
        match self.advertised() {
            Some(address) => self.write_kubernetes_endpoints(address).await,
            None => Ok(()),
        }
    }

    fn advertised(&self) -> Option<SocketAddr> {
        self.settings.advertise_address.parse().ok()
    }

    /// Keeps the `kubernetes` Endpoints and EndpointSlice on this server's address, and
    /// runs the allocator's repair, until the server stops.
    pub(crate) fn start_control_plane_loops(self: Arc<Self>) {
        // The system namespaces come back when they go (upstream's system namespaces
        // controller): looked at on every change of namespaces, and every minute.
        let server = self.clone();
        tokio::spawn(async move {
            let prefix = registry::storage_prefix_of(krate_api::StorageResource::of::<Namespace>());
            let mut changes = server.storage.cache.resource(&prefix).subscribe();
            loop {
                let _ = tokio::time::timeout(Duration::from_secs(60), changes.changed()).await;
                if let Err(e) = server.ensure_system_namespaces().await {
                    tracing::warn!(error = %format!("{e:#}"), "recreating a system namespace failed");
                }
            }
        });
        let Some(address) = self.advertised() else {
            tracing::warn!(address = %self.settings.advertise_address, "the advertise address is not an IP:port; the kubernetes Service gets no endpoints");
            return;
        };
        let server = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ENDPOINT_INTERVAL).await;
                if let Err(e) = server.write_kubernetes_endpoints(address).await {
                    tracing::warn!(error = %e, "updating the kubernetes Service's endpoints failed");
                }
            }
        });
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REPAIR_INTERVAL).await;
                match self.allocator.repair(&self.storage).await {
                    Ok(r) if r != Default::default() => {
                        tracing::info!(claimed = r.claimed, released = r.released, "service allocations repaired")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "repairing service allocations failed"),
                }
            }
        });
    }

    /// Renews this server's identity Lease, then points the `kubernetes` Service at every
    /// server whose Lease is fresh (this one always among them).
    async fn write_kubernetes_endpoints(&self, address: SocketAddr) -> ApiResult<()> {
        let live = self.renew_identity(address).await?;
        let port = address.port();
        let mut ips: Vec<String> = live.iter().filter(|a| a.port() == port).map(|a| a.ip().to_string()).collect();
        ips.sort();
        ips.dedup();
        let ports = json!([{"name": "https", "port": port, "protocol": "TCP"}]);
        let addresses: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        let endpoints = json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
            "subsets": [{"addresses": addresses, "ports": ports}]});
        self.converge(self.storage.builtin::<Endpoints>(Some("default".into())), endpoints, &["subsets"]).await?;
        let family = if address.is_ipv4() { "IPv4" } else { "IPv6" };
        let slice_endpoints: Vec<Value> =
            ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect();
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": family, "endpoints": slice_endpoints, "ports": ports});
        self.converge(
            self.storage.builtin::<EndpointSlice>(Some("default".into())),
            slice,
            &["addressType", "endpoints", "ports"],
        )
        .await
    }

    /// Writes this server's identity Lease (renewed now) and returns the advertise
    /// addresses of every server whose Lease was renewed within [`ENDPOINT_TTL`].
    async fn renew_identity(&self, address: SocketAddr) -> ApiResult<Vec<SocketAddr>> {
        let digest = ring::digest::digest(&ring::digest::SHA256, address.to_string().as_bytes());
        let hash: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("apiserver-{hash}");
        let scope = self.storage.builtin::<Lease>(Some("kube-system".into()));
        let now = krate_api::object::now_rfc3339_micros();
        let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-system",
                "labels": {IDENTITY_LABEL: "kube-apiserver", "kubernetes.io/hostname": hostname(),
                    VERSION_LABEL: crate::build_info().version},
                "annotations": {ADVERTISE_ANNOTATION: address.to_string()}},
            "spec": {"holderIdentity": format!("{name}_{}", self.identity), "leaseDurationSeconds": IDENTITY_DURATION_SECONDS,
                "renewTime": now}});
        // (The name is derived from the address, so the annotation never changes.)
        self.converge(scope.clone(), lease, &["spec"]).await?;
        let cutoff = jiff::Timestamp::now() - ENDPOINT_TTL;
        let mut live = vec![address];
        for other in self.storage.cached_objects(&scope, false).await {
            if other.pointer("/metadata/labels").and_then(|l| l.get(IDENTITY_LABEL)).is_none() {
                continue;
            }
            let renewed = other
                .pointer("/spec/renewTime")
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<jiff::Timestamp>().ok());
            let advertised = other
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(ADVERTISE_ANNOTATION))
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<SocketAddr>().ok());
            if let (Some(renewed), Some(advertised)) = (renewed, advertised) {
                if renewed >= cutoff {
                    live.push(advertised);
                }
            }
        }
        Ok(live)
    }

    /// Creates `desired`, or rewrites the stored object's `fields` (and labels) where they
    /// differ.
    pub(crate) async fn converge(&self, scope: Scope, desired: Value, fields: &[&str]) -> ApiResult<()> {
        let name = krate_api::object::name(&desired).to_string();
        let current = match self.storage.get(&scope, &name).await {
            Ok(found) => found.parse(),
            Err(e) if e.code == 404 => return self.storage.ensure(&scope, desired).await,
            Err(e) => return Err(e),
        };
        // `desired` is written in its stored form (defaults filled in), so it compares.
        let differs = fields.iter().any(|f| current.get(*f) != desired.get(*f))
            || current.pointer("/metadata/labels") != desired.pointer("/metadata/labels");
        if !differs {
            return Ok(());
        }
        let mut updated = current;
        for f in fields {
            updated[*f] = desired[*f].clone();
        }
        updated["metadata"]["labels"] = desired["metadata"]["labels"].clone();
        self.storage.update(&scope, &name, Subresource::Main, updated, &write_options()).await.map(|_| ())
    }
}

/// Checks, before a server starts on a shared `store`, that every other server live in
/// it (identity Lease renewed within the last minute) runs a krate within one minor
/// version of this one (`advertise` is this server's own address, skipped): the error
/// says which server and what to do.
pub async fn check_server_versions(store: &dyn krate_store::Store, advertise: SocketAddr) -> Result<(), String> {
    let prefix =
        format!("{}kube-system/apiserver-", registry::storage_prefix_of(krate_api::StorageResource::of::<Lease>()));
    let listed = store
        .list(krate_store::ListRequest { prefix, ..Default::default() })
        .await
        .map_err(|e| format!("reading the other servers' identity Leases: {e}"))?;
    let mine = crate::build_info().version;
    let cutoff = jiff::Timestamp::now() - Duration::from_secs(60);
    for kv in listed.items {
        let Ok(lease) = serde_json::from_slice::<Value>(&kv.value) else { continue };
        let address =
            lease.pointer("/metadata/annotations").and_then(|a| a.get(ADVERTISE_ANNOTATION)).and_then(Value::as_str);
        let version = lease.pointer("/metadata/labels").and_then(|l| l.get(VERSION_LABEL)).and_then(Value::as_str);
        let renewed =
            lease.pointer("/spec/renewTime").and_then(Value::as_str).and_then(|t| t.parse::<jiff::Timestamp>().ok());
        let (Some(address), Some(version), Some(renewed)) = (address, version, renewed) else { continue };
        if address == advertise.to_string() || renewed < cutoff {
            continue;
        }
        if let Some(why) = server_skew_refusal(version, mine) {
            return Err(format!("the server at {address} runs krate {version}, this one {mine}: {why}"));
        }
    }
    Ok(())
}

/// Why a server of krate version `mine` may not run beside one of version `other`.
fn server_skew_refusal(other: &str, mine: &str) -> Option<String> {
    let (o, m) = (crate::admission::krate_minor(other)?, crate::admission::krate_minor(mine)?);
    let apart = if o.0 != m.0 { u64::MAX } else { o.1.abs_diff(m.1) };
    (apart > SERVER_MINORS_APART).then(|| {
        format!(
            "servers sharing a datastore must be within {SERVER_MINORS_APART} minor version of each other; \
             upgrade the servers one minor version at a time (stop this one, upgrade the others first)"
        )
    })
}

/// This machine's host name (upstream's identity Leases carry it as a label).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::server_skew_refusal;

    #[test]
    fn servers_may_be_one_minor_version_apart_and_no_more() {
        for other in ["v0.3", "v0.2-dev", "v0.4-7-g0123456789abcd-dirty", "v0.3-dev"] {
            assert_eq!(server_skew_refusal(other, "v0.3-2-gabc"), None, "{other}");
        }
        let far = server_skew_refusal("v0.5", "v0.3").unwrap();
        assert!(far.contains("within 1 minor version") && far.contains("one minor version at a time"), "{far}");
        assert!(server_skew_refusal("v0.1", "v0.3").is_some());
        assert!(server_skew_refusal("v1.3", "v0.3").is_some(), "another major");
        assert_eq!(server_skew_refusal("unknown", "v0.3"), None, "not a krate version: no judgement");
    }
}

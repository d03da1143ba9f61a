//! What an API server keeps up in the cluster for itself, as upstream's control-plane
//! controllers: the default ServiceCIDR `kubernetes`, the `kubernetes` Service in
//! `default` with its Endpoints and EndpointSlice naming this server's advertise address
//! (so pods reach the API at `kubernetes.default.svc`), the `kube-dns` Service at the
//! cluster DNS address, and the repair pass of the service allocator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use krate_api::ApiResult;
use serde_json::{json, Value};

use crate::registry::{self, Scope, Subresource, WriteOptions};
use crate::ApiServer;

/// How often the endpoints of the `kubernetes` Service are checked (upstream: 10 s).
const ENDPOINT_INTERVAL: Duration = Duration::from_secs(10);
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

    async fn write_kubernetes_endpoints(&self, address: SocketAddr) -> ApiResult<()> {
        let (ip, port) = (address.ip().to_string(), address.port());
        let ports = json!([{"name": "https", "port": port, "protocol": "TCP"}]);
        let endpoints = json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
            "subsets": [{"addresses": [{"ip": ip}], "ports": ports}]});
        self.converge(self.storage.builtin::<Endpoints>(Some("default".into())), endpoints, &["subsets"]).await?;
        let family = if address.is_ipv4() { "IPv4" } else { "IPv6" };
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": family, "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}], "ports": ports});
        self.converge(
            self.storage.builtin::<EndpointSlice>(Some("default".into())),
            slice,
            &["addressType", "endpoints", "ports"],
        )
        .await
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

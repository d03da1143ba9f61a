//! The agent's Node: registration with capacity, allocatable, addresses, nodeInfo and
//! conditions read off this machine, the podCIDR the pod network uses, and heartbeats
//! (the Lease every 10 s; the status when a condition changes or every 5 minutes).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use krate_client::now;

use crate::network::Cidr;

pub const MANAGER: &str = "krate-agent";
const STATUS_EVERY: Duration = Duration::from_secs(300);

/// What the agent says about its node.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub name: String,
    pub ip: IpAddr,
    /// Used when the Node has no podCIDR yet.
    pub pod_cidr: Cidr,
    pub max_pods: u32,
    /// Millicores and bytes kept back from pods (system and kube reserved).
    pub reserved_cpu_millis: u64,
    pub reserved_memory_bytes: u64,
    pub labels: BTreeMap<String, String>,
    /// The filesystem whose size is the node's ephemeral-storage.
    pub data_dir: PathBuf,
    pub agent_version: String,
    /// The port of the agent's HTTPS API (logs), published in the Node's daemonEndpoints.
    pub kubelet_port: u16,
}

/// Total and available bytes of the filesystem holding `path`.
pub fn filesystem_bytes(path: &Path) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| (st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize))
}

/// This machine's architecture as Kubernetes and OCI name it (`amd64`, `arm64`).
pub fn arch() -> String {
    std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64")
}

fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.trim().parse::<u64>().ok()).map(|kb| kb * 1024)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")).map(|v| v.trim_matches('"').to_string()).unwrap_or_else(|| "Linux".into())
}

/// The machine's pressure conditions: (type, under pressure, reason, message).
fn pressure(settings: &NodeSettings) -> [(&'static str, bool, &'static str, &'static str); 3] {
    let memory_low = meminfo("MemAvailable").is_some_and(|avail| avail < 100 << 20);
    let disk_low = filesystem_bytes(&settings.data_dir).is_some_and(|(total, avail)| total > 0 && avail * 10 < total);
    [
        if memory_low { ("MemoryPressure", true, "KubeletHasInsufficientMemory", "less than 100Mi of memory available") } else { ("MemoryPressure", false, "KubeletHasSufficientMemory", "kubelet has sufficient memory available") },
        if disk_low { ("DiskPressure", true, "KubeletHasDiskPressure", "less than 10% of the disk available") } else { ("DiskPressure", false, "KubeletHasNoDiskPressure", "kubelet has no disk pressure") },
        ("PIDPressure", false, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
    ]
}

/// The Node's status as this machine reports it.
pub fn status(settings: &NodeSettings, runtime_version: &str) -> Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let memory = meminfo("MemTotal").unwrap_or(0);
    let disk = filesystem_bytes(&settings.data_dir).map(|(total, _)| total).unwrap_or(0);
    let capacity = json!({"cpu": cpus.to_string(), "memory": format!("{}Ki", memory / 1024), "pods": settings.max_pods.to_string(), "ephemeral-storage": format!("{}Ki", disk / 1024)});
    let allocatable = json!({
        "cpu": format!("{}m", (cpus * 1000).saturating_sub(settings.reserved_cpu_millis)),
        "memory": format!("{}Ki", memory.saturating_sub(settings.reserved_memory_bytes) / 1024),
        "pods": settings.max_pods.to_string(),
        "ephemeral-storage": format!("{}Ki", disk * 9 / 10 / 1024),
    });
    let mut conditions: Vec<Value> = pressure(settings)
        .into_iter()
        .map(|(t, on, reason, message)| json!({"type": t, "status": if on { "True" } else { "False" }, "reason": reason, "message": message, "lastHeartbeatTime": now(), "lastTransitionTime": now()}))
        .collect();
    conditions.push(json!({"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status", "lastHeartbeatTime": now(), "lastTransitionTime": now()}));
    json!({
        "capacity": capacity,
        "allocatable": allocatable,
        "addresses": [{"type": "InternalIP", "address": settings.ip.to_string()}, {"type": "Hostname", "address": settings.name}],
        "conditions": conditions,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": settings.kubelet_port}},
        "nodeInfo": {
            "kubeletVersion": settings.agent_version, "kubeProxyVersion": "", "containerRuntimeVersion": runtime_version,
            "osImage": os_image(), "kernelVersion": read_trimmed("/proc/sys/kernel/osrelease"), "operatingSystem": "linux",
            "architecture": arch(),
            "machineID": read_trimmed("/etc/machine-id"), "systemUUID": read_trimmed("/sys/class/dmi/id/product_uuid"), "bootID": read_trimmed("/proc/sys/kernel/random/boot_id"),
        },
    })
}

/// Creates (or re-takes) the Node, reports its status and returns its podCIDR (the one
/// already assigned, else `settings.pod_cidr`, which is then recorded on the Node).
pub async fn register(client: &kube::Client, settings: &NodeSettings, runtime_version: &str) -> Result<Cidr> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut labels = settings.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), settings.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), arch());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": settings.name, "labels": labels},
        "spec": {"podCIDR": settings.pod_cidr.to_string(), "podCIDRs": [settings.pod_cidr.to_string()]},
    }))?;
    krate_client::tolerate(nodes.create(&PostParams::default(), &node).await, &[409]).with_context(|| format!("registering node {}", settings.name))?;
    let current = nodes.get(&settings.name).await?;
    let cidr = match current.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()) {
        Some(assigned) => assigned.parse()?,
        None => {
            let patch = json!({"spec": {"podCIDR": settings.pod_cidr.to_string(), "podCIDRs": [settings.pod_cidr.to_string()]}});
            nodes.patch(&settings.name, &PatchParams::default(), &Patch::Merge(patch)).await?;
            settings.pod_cidr
        }
    };
    nodes
        .patch(&settings.name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": labels}})))
        .await
        .with_context(|| format!("labelling node {}", settings.name))?;
    report_status(&nodes, settings, runtime_version).await?;
    Ok(cidr)
}

async fn report_status(nodes: &Api<Node>, settings: &NodeSettings, runtime_version: &str) -> Result<()> {
    nodes
        .patch_status(&settings.name, &PatchParams::default(), &Patch::Merge(json!({"status": status(settings, runtime_version)})))
        .await
        .with_context(|| format!("reporting the status of node {}", settings.name))?;
    Ok(())
}

/// Renews the node's Lease every 10 s and its status every 5 minutes, forever; failures
/// are logged and retried (the agent coasts while the API server is away).
pub async fn heartbeat(client: kube::Client, settings: NodeSettings, runtime_version: String) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), krate_client::node_lease::NAMESPACE);
    let nodes: Api<Node> = Api::all(client);
    let mut last_status = tokio::time::Instant::now();
    loop {
        if let Err(e) = krate_client::node_lease::renew(&leases, &settings.name, MANAGER).await {
            tracing::warn!(node = %settings.name, error = %e, "renewing the node lease failed");
        }
        if last_status.elapsed() >= STATUS_EVERY {
            match report_status(&nodes, &settings, &runtime_version).await {
                Ok(()) => last_status = tokio::time::Instant::now(),
                Err(e) => tracing::warn!(node = %settings.name, error = %format!("{e:#}"), "reporting node status failed"),
            }
        }
        tokio::time::sleep(krate_client::node_lease::RENEW_EVERY).await;
    }
}

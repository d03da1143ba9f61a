//! The agent's Node: registration with capacity, allocatable, addresses, nodeInfo and
//! conditions read off this machine, the podCIDR the pod network uses, and heartbeats
//! (the Lease every 10 s; the status when a condition changes or every 5 minutes).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use krate_client::now;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::cri::Cri;
use crate::imagegc::ImageGc;
use crate::pressure::{meminfo, Condition, Filesystems, FsStats, Pressure};
use krate_net::Cidr;

pub const MANAGER: &str = "krate-agent";
const STATUS_EVERY: Duration = Duration::from_secs(300);

/// What the agent says about its node.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub name: String,
    pub ip: IpAddr,
    /// The Node's podCIDR when it has none yet (None: wait for the cluster to assign one).
    pub pod_cidr: Option<Cidr>,
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

/// This machine's architecture as Kubernetes and OCI name it (`amd64`, `arm64`).
pub fn arch() -> String {
    std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64")
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

/// What the node offers pods (capacity less what is reserved), as quantities by resource.
pub fn allocatable(settings: &NodeSettings) -> BTreeMap<String, String> {
    allocatable_of(settings, &Machine::read(settings))
}

/// This machine's capacity: CPUs, memory and the agent directory's filesystem, in bytes.
struct Machine {
    cpus: u64,
    memory: u64,
    disk: u64,
}

impl Machine {
    fn read(settings: &NodeSettings) -> Self {
        Self {
            cpus: std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1),
            memory: meminfo("MemTotal").unwrap_or(0),
            disk: FsStats::of(&settings.data_dir).map(|fs| fs.bytes).unwrap_or(0),
        }
    }
}

fn allocatable_of(settings: &NodeSettings, m: &Machine) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("cpu".into(), format!("{}m", (m.cpus * 1000).saturating_sub(settings.reserved_cpu_millis))),
        ("memory".into(), format!("{}Ki", m.memory.saturating_sub(settings.reserved_memory_bytes) / 1024)),
        ("pods".into(), settings.max_pods.to_string()),
        ("ephemeral-storage".into(), format!("{}Ki", m.disk * 9 / 10 / 1024)),
    ])
}

/// The Node's status as this machine reports it, with `conditions`.
pub fn status(settings: &NodeSettings, runtime_version: &str, conditions: Vec<Value>) -> Value {
    let m = Machine::read(settings);
    let capacity = json!({"cpu": m.cpus.to_string(), "memory": format!("{}Ki", m.memory / 1024), "pods": settings.max_pods.to_string(), "ephemeral-storage": format!("{}Ki", m.disk / 1024)});
    let allocatable = json!(allocatable_of(settings, &m));
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

/// The node's conditions: a pressure condition per `Condition`, true for those in
/// `state.pressure`, and Ready (false while the node shuts down or its container runtime
/// is down, with upstream's messages). A condition keeps its lastTransitionTime from
/// `previous` while its status stays.
fn conditions(state: &NodeState, previous: &[Value]) -> Vec<Value> {
    let pressure = &state.pressure;
    let not_ready = if state.shutting_down {
        Some("node is shutting down")
    } else if state.runtime_down {
        Some("container runtime is down")
    } else {
        None
    };
    let now = now();
    let mut out: Vec<Value> = Condition::ALL
        .iter()
        .map(|c| {
            let on = pressure.contains(c);
            let (reason, message) = c.reason_and_message(on);
            (c.type_name(), if on { "True" } else { "False" }, reason, message)
        })
        .chain([match not_ready {
            Some(why) => ("Ready", "False", "KubeletNotReady", why),
            None => ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        }])
        .map(|(type_, status, reason, message)| {
            let before = previous.iter().find(|p| p["type"] == type_ && p["status"] == status);
            let since = before.map(|b| b["lastTransitionTime"].clone()).unwrap_or_else(|| json!(now));
            json!({"type": type_, "status": status, "reason": reason, "message": message, "lastHeartbeatTime": now, "lastTransitionTime": since})
        })
        .collect();
    out.sort_by_key(|c| c["type"] == "Ready");
    out
}

/// Creates (or re-takes) the Node and returns its podCIDR (the one already assigned, else
/// `settings.pod_cidr`, which is then recorded on the Node). The heartbeat reports its
/// status.
pub async fn register(client: &kube::Client, settings: &NodeSettings) -> Result<Cidr> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut labels = settings.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), settings.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), arch());
    let own = settings.pod_cidr.map(|c| json!({"podCIDR": c.to_string(), "podCIDRs": [c.to_string()]}));
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": settings.name, "labels": labels},
        "spec": own.clone().unwrap_or(json!({})),
    }))?;
    krate_client::tolerate(nodes.create(&PostParams::default(), &node).await, &[409])
        .with_context(|| format!("registering node {}", settings.name))?;
    let assigned = |node: &Node| node.spec.as_ref().and_then(|s| s.pod_cidr.clone());
    let current = nodes.get(&settings.name).await?;
    let cidr = match (assigned(&current), own) {
        (Some(assigned), _) => assigned.parse()?,
        (None, Some(own)) => {
            nodes.patch(&settings.name, &PatchParams::default(), &Patch::Merge(json!({"spec": own}))).await?;
            settings.pod_cidr.expect("given")
        }
        (None, None) => wait_for_pod_cidr(&nodes, &settings.name).await?.parse()?,
    };
    nodes
        .patch(&settings.name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": labels}})))
        .await
        .with_context(|| format!("labelling node {}", settings.name))?;
    Ok(cidr)
}

/// Waits for the cluster (its node IPAM controller) to give the Node a podCIDR.
async fn wait_for_pod_cidr(nodes: &Api<Node>, name: &str) -> Result<String> {
    let started = tokio::time::Instant::now();
    let mut told = std::time::Duration::ZERO;
    loop {
        let node = nodes.get(name).await?;
        if let Some(cidr) = node.spec.and_then(|s| s.pod_cidr) {
            return Ok(cidr);
        }
        if started.elapsed() >= told + std::time::Duration::from_secs(10) {
            told = started.elapsed();
            tracing::warn!(node = name, waited_s = told.as_secs(), "no pod CIDR assigned to this node yet: is the server's node IPAM controller running (krate server --cluster-cidr)? Or give the agent --pod-cidr");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// What the agent watches on its node besides the Lease: pressure, the images it may
/// collect and the container logs it rotates.
pub struct Housekeeping {
    pub filesystems: Filesystems,
    pub pressure: Pressure,
    pub image_gc: ImageGc,
    pub log_rotation: crate::logrotate::LogRotation,
    pub cri: Cri,
    /// The pressure conditions now true, for the pod workers' admission.
    pub conditions: watch::Sender<Vec<Condition>>,
    pub events: krate_client::events::Recorder,
}

impl Housekeeping {
    /// One look at the node: returns the pressure conditions now true. Under disk pressure
    /// every unused image goes first (as upstream reclaims node-level resources before it
    /// evicts); otherwise images are collected down to the low threshold when the image
    /// filesystem is over the high one.
    async fn tick(&mut self, node: &ObjectReference) -> Vec<Condition> {
        let observation = self.filesystems.observe();
        let on = self.pressure.update(&observation, tokio::time::Instant::now());
        self.conditions.send_if_modified(|current| std::mem::replace(current, on.clone()) != on);
        let shortfall = if on.contains(&Condition::Disk) {
            self.image_gc.remove_all_unused(&mut self.cri).await.map(|()| None)
        } else {
            let imagefs = FsStats::of(&self.filesystems.imagefs).unwrap_or_default();
            self.image_gc.collect(&mut self.cri, imagefs).await
        };
        match shortfall {
            Ok(Some(message)) => self.events.warning(node, "FreeDiskSpaceFailed", &message).await,
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "image garbage collection failed"),
        }
        if let Err(e) = self.log_rotation.rotate(&mut self.cri).await {
            tracing::warn!(error = %format!("{e:#}"), "rotating container logs failed");
        }
        on
    }

    /// Whether the container runtime answers (its CRI version) within 5 s.
    async fn runtime_answers(&mut self) -> bool {
        let asked = self.cri.runtime.version(crate::cri::api::VersionRequest { version: "v1".into() });
        matches!(tokio::time::timeout(Duration::from_secs(5), asked).await, Ok(Ok(_)))
    }
}

fn node_reference(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.into()),
        uid: Some(name.into()),
        ..Default::default()
    }
}

/// Reports the status for `state`; returns the conditions written.
async fn report_status(
    nodes: &Api<Node>,
    settings: &NodeSettings,
    runtime_version: &str,
    state: &NodeState,
    previous: &[Value],
) -> Result<Vec<Value>> {
    let conditions = conditions(state, previous);
    nodes
        .patch_status(
            &settings.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status(settings, runtime_version, conditions.clone())})),
        )
        .await
        .with_context(|| format!("reporting the status of node {}", settings.name))?;
    Ok(conditions)
}

/// What the status reports besides machine facts.
#[derive(Clone, Debug, PartialEq)]
struct NodeState {
    /// The pressure conditions now true.
    pressure: Vec<Condition>,
    shutting_down: bool,
    /// The runtime has not answered for [`RUNTIME_DOWN_AFTER`].
    runtime_down: bool,
}

/// How long the container runtime may not answer before the node is not Ready
/// (upstream's kubelet: 30 s without a successful runtime status check).
const RUNTIME_DOWN_AFTER: Duration = Duration::from_secs(30);

/// Renews the node's Lease every 10 s and looks after the node as often (pressure, image
/// garbage collection); reports the status when a condition changes (a shutdown at once),
/// and at least every 5 minutes. Failures are logged and retried (the agent coasts while
/// the API server is away).
pub async fn heartbeat(
    client: kube::Client,
    settings: NodeSettings,
    runtime_version: String,
    mut housekeeping: Housekeeping,
    mut shutting_down: watch::Receiver<bool>,
) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), krate_client::node_lease::NAMESPACE);
    let nodes: Api<Node> = Api::all(client);
    let node = node_reference(&settings.name);
    let mut reported: Option<(NodeState, tokio::time::Instant)> = None;
    let mut runtime_answered = tokio::time::Instant::now();
    let mut previous: Vec<Value> = nodes
        .get_opt(&settings.name)
        .await
        .ok()
        .flatten()
        .and_then(|n| n.status?.conditions)
        .into_iter()
        .flatten()
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    loop {
        if let Err(e) = krate_client::node_lease::renew(&leases, &settings.name, MANAGER).await {
            tracing::warn!(node = %settings.name, error = %e, "renewing the node lease failed");
        }
        // A runtime that does not answer (hung, stopped) would hold up the housekeeping's
        // CRI calls: the pressure stays as last seen until it answers again.
        let pressure = if housekeeping.runtime_answers().await {
            runtime_answered = tokio::time::Instant::now();
            housekeeping.tick(&node).await
        } else {
            reported.as_ref().map(|(was, _)| was.pressure.clone()).unwrap_or_default()
        };
        let state = NodeState {
            pressure,
            shutting_down: *shutting_down.borrow_and_update(),
            runtime_down: runtime_answered.elapsed() >= RUNTIME_DOWN_AFTER,
        };
        let due = reported.as_ref().is_none_or(|(was, at)| *was != state || at.elapsed() >= STATUS_EVERY);
        if due {
            match report_status(&nodes, &settings, &runtime_version, &state, &previous).await {
                Ok(written) => {
                    for c in Condition::ALL {
                        let was = reported.as_ref().map(|(was, _)| was.pressure.contains(&c));
                        let on = state.pressure.contains(&c);
                        if was.is_some_and(|was| was != on) {
                            let reason = format!("Node{}", c.reason_and_message(on).0.trim_start_matches("Kubelet"));
                            housekeeping
                                .events
                                .normal(&node, &reason, &format!("Node {} status is now: {reason}", settings.name))
                                .await;
                        }
                    }
                    previous = written;
                    reported = Some((state, tokio::time::Instant::now()));
                }
                Err(e) => {
                    tracing::warn!(node = %settings.name, error = %format!("{e:#}"), "reporting node status failed")
                }
            }
        }
        // A shutdown is reported at once.
        let _ = tokio::time::timeout(krate_client::node_lease::RENEW_EVERY, shutting_down.changed()).await;
    }
}

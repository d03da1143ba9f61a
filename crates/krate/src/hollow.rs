//! `krate hollow-nodes`: simulated nodes (like kwok/kubemark). They register Nodes,
//! renew their Leases, and drive pods bound to them as a node agent would report them:
//! Pending → Running, then Succeeded/Failed for pods annotated to exit, and they finish
//! the deletion of pods that are deleted gracefully. Nothing is actually run.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use krate_client::{node_lease, now};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use serde_json::json;
use tokio::sync::Mutex;

/// Annotation: the exit code a hollow pod's containers report once they have run.
pub const EXIT_CODE_ANNOTATION: &str = "hollow.krate.io/exit-code";
/// Annotation: how long a hollow pod's containers run before exiting (seconds).
pub const RUN_SECONDS_ANNOTATION: &str = "hollow.krate.io/run-seconds";
/// Annotation: a hollow pod runs but never becomes ready (as a container whose image
/// cannot be pulled or whose readiness probe fails holds a rollout).
pub const NOT_READY_ANNOTATION: &str = "hollow.krate.io/not-ready";

const MANAGER: &str = "krate-hollow-node";

/// The label every hollow node carries (`true`).
pub const HOLLOW_LABEL: &str = "node.krate.io/hollow";

/// Whether `node` is a hollow node: its pods have no containers and no network.
pub fn is_hollow(node: &k8s_openapi::api::core::v1::Node) -> bool {
    node.metadata.labels.as_ref().and_then(|l| l.get(HOLLOW_LABEL)).is_some_and(|v| v == "true")
}

#[derive(Args, Debug, Clone)]
pub struct HollowArgs {
    /// How many nodes to simulate.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Node names are `<prefix>-<n>`.
    #[arg(long, default_value = "hollow")]
    pub name_prefix: String,
    /// Kubeconfig of the cluster to join (e.g. /var/lib/krate/admin.kubeconfig).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: std::path::PathBuf,
    /// CPU capacity of each node.
    #[arg(long, default_value = "4")]
    pub cpu: String,
    /// Memory capacity of each node.
    #[arg(long, default_value = "16Gi")]
    pub memory: String,
    /// Pod capacity of each node.
    #[arg(long, default_value_t = 110)]
    pub pods: u32,
    /// Extra node labels, `key=value` (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
}

struct Hollow {
    client: kube::Client,
    args: HollowArgs,
    /// Node name → index (for addresses).
    nodes: HashMap<String, usize>,
    /// Pod IPs handed out per node.
    next_ip: Mutex<HashMap<String, u32>>,
}

impl Hollow {
    fn node_object(&self, name: &str, index: usize) -> serde_json::Value {
        let mut labels: BTreeMap<String, String> = BTreeMap::from([
            ("kubernetes.io/hostname".into(), name.into()),
            ("kubernetes.io/os".into(), "linux".into()),
            ("kubernetes.io/arch".into(), "amd64".into()),
            (HOLLOW_LABEL.into(), "true".into()),
        ]);
        for l in &self.args.labels {
            if let Some((k, v)) = l.split_once('=') {
                labels.insert(k.into(), v.into());
            }
        }
        let resources = json!({"cpu": self.args.cpu, "memory": self.args.memory, "pods": self.args.pods.to_string(), "ephemeral-storage": "100Gi"});
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {"podCIDR": format!("10.{}.{}.0/24", 64 + index / 256, index % 256)},
            "status": {
                "capacity": resources, "allocatable": resources,
                "addresses": [{"type": "InternalIP", "address": format!("172.20.{}.{}", index / 250, index % 250 + 1)}, {"type": "Hostname", "address": name}],
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "hollow node is posting ready status", "lastHeartbeatTime": now(), "lastTransitionTime": now()},
                    {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "lastHeartbeatTime": now(), "lastTransitionTime": now()},
                    {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure", "lastHeartbeatTime": now(), "lastTransitionTime": now()},
                    {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID", "lastHeartbeatTime": now(), "lastTransitionTime": now()},
                ],
                "nodeInfo": {"kubeletVersion": "v1.37.0-krate-hollow", "containerRuntimeVersion": "hollow://0", "osImage": "hollow", "kernelVersion": "hollow",
                             "operatingSystem": "linux", "architecture": "amd64", "machineID": "", "systemUUID": "", "bootID": "", "kubeProxyVersion": ""},
            },
        })
    }

    /// Creates (or re-takes) each Node and brings its status up to date.
    async fn register(&self) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        for (name, index) in &self.nodes {
            let desired = self.node_object(name, *index);
            krate_client::tolerate(
                nodes.create(&PostParams::default(), &serde_json::from_value(desired.clone())?).await,
                &[409],
            )
            .with_context(|| format!("registering node {name}"))?;
            nodes
                .patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": desired["status"]})))
                .await
                .with_context(|| format!("reporting the status of node {name}"))?;
        }
        Ok(())
    }

    /// Renews every node's Lease, forever.
    async fn heartbeat(self: Arc<Self>) -> Result<()> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), node_lease::NAMESPACE);
        loop {
            for name in self.nodes.keys() {
                if let Err(e) = node_lease::renew(&leases, name, MANAGER).await {
                    tracing::warn!(node = %name, error = %e, "renewing the node lease failed");
                }
            }
            tokio::time::sleep(node_lease::RENEW_EVERY).await;
        }
    }

    async fn pod_ip(&self, node: &str) -> String {
        let index = self.nodes.get(node).copied().unwrap_or_default();
        let mut ips = self.next_ip.lock().await;
        let n = ips.entry(node.to_string()).or_insert(1);
        *n += 1;
        format!("10.{}.{}.{}", 64 + index / 256, index % 256, *n % 254 + 1)
    }

    /// Reports a pod as a node agent would after starting (or finishing) it.
    async fn run_pod(self: Arc<Self>, pod: Pod) -> Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let containers: Vec<String> =
            pod.spec.as_ref().map(|s| s.containers.iter().map(|c| c.name.clone()).collect()).unwrap_or_default();
        let images: HashMap<String, String> = pod
            .spec
            .as_ref()
            .map(|s| s.containers.iter().map(|c| (c.name.clone(), c.image.clone().unwrap_or_default())).collect())
            .unwrap_or_default();
        let started = now();
        let ip = self.pod_ip(&node).await;
        let host_ip = format!("172.20.{}.{}", self.nodes[&node] / 250, self.nodes[&node] % 250 + 1);
        let statuses = |state: serde_json::Value, ready: bool| -> Vec<serde_json::Value> {
            containers
                .iter()
                .map(|c| json!({"name": c, "image": images[c], "imageID": format!("hollow://{}", images[c]), "containerID": format!("hollow://{ns}/{name}/{c}"),
                                "ready": ready, "started": ready, "restartCount": 0, "state": state}))
                .collect()
        };
        let condition = |t: &str, s: bool| json!({"type": t, "status": if s { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": now()});
        let ready = !annotations.contains_key(NOT_READY_ANNOTATION);
        let running = json!({"status": {
            "phase": "Running", "hostIP": host_ip, "hostIPs": [{"ip": host_ip}], "podIP": ip, "podIPs": [{"ip": ip}], "startTime": started,
            "conditions": [condition("PodReadyToStartContainers", true), condition("Initialized", true), condition("Ready", ready), condition("ContainersReady", ready), condition("PodScheduled", true)],
            "containerStatuses": statuses(json!({"running": {"startedAt": started}}), ready),
        }});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(running)).await?;

        let Some(code) = annotations.get(EXIT_CODE_ANNOTATION).and_then(|c| c.parse::<i32>().ok()) else {
            return Ok(());
        };
        let seconds = annotations.get(RUN_SECONDS_ANNOTATION).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let finished = now();
        let reason = if code == 0 { "Completed" } else { "Error" };
        let done = json!({"status": {
            "phase": if code == 0 { "Succeeded" } else { "Failed" },
            "conditions": [condition("PodReadyToStartContainers", false), condition("Initialized", true), condition("Ready", false), condition("ContainersReady", false), condition("PodScheduled", true)],
            "containerStatuses": statuses(json!({"terminated": {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": finished}}), false),
        }});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(done)).await?;
        Ok(())
    }

    /// Finishes a graceful deletion (the containers "stopped" at once).
    async fn finish_deletion(&self, pod: &Pod) -> Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), pod.metadata.namespace.as_deref().unwrap_or_default());
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: pod.metadata.uid.clone(), resource_version: None }),
            ..Default::default()
        };
        Ok(krate_client::tolerate(
            api.delete(pod.metadata.name.as_deref().unwrap_or_default(), &params).await,
            &[404, 409],
        )?)
    }

    /// Watches every pod and acts on those bound to one of our nodes.
    async fn pods(self: Arc<Self>) -> Result<()> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let mut started: std::collections::HashSet<String> = Default::default();
        // Back-off keeps the nodes alive across API server restarts, as a kubelet does.
        let mut events =
            watcher::watcher(api, watcher::Config::default().fields("spec.nodeName!=")).default_backoff().boxed();
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(error = %e, "pod watch failed; retrying");
                    continue;
                }
            };
            let pods = match event {
                Event::Apply(p) | Event::InitApply(p) => vec![p],
                Event::Delete(p) => {
                    started.remove(p.metadata.uid.as_deref().unwrap_or_default());
                    continue;
                }
                Event::Init | Event::InitDone => continue,
            };
            for pod in pods {
                let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
                if !self.nodes.contains_key(&node) {
                    continue;
                }
                if pod.metadata.deletion_timestamp.is_some() {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.finish_deletion(&pod).await {
                            tracing::warn!(error = %e, "finishing a pod deletion failed");
                        }
                    });
                    continue;
                }
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                if (phase.is_empty() || phase == "Pending") && started.insert(uid) {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.run_pod(pod).await {
                            tracing::warn!(error = %e, "reporting a hollow pod failed");
                        }
                    });
                }
            }
        }
        Ok(())
    }
}

/// Runs `args.count` hollow nodes until the process is stopped.
pub async fn run(args: HollowArgs) -> Result<()> {
    let client = crate::components::kube_client(&args.kubeconfig).await?;
    let nodes = (0..args.count).map(|i| (format!("{}-{i}", args.name_prefix), i)).collect();
    let hollow = Arc::new(Hollow { client, args: args.clone(), nodes, next_ip: Mutex::new(HashMap::new()) });
    hollow.register().await?;
    eprintln!(
        "{} hollow node(s) registered ({}-0 .. {}-{}); running until stopped",
        args.count,
        args.name_prefix,
        args.name_prefix,
        args.count.saturating_sub(1)
    );
    tokio::select! {
        r = hollow.clone().heartbeat() => r,
        r = hollow.clone().pods() => r,
    }
}

//! `krate agent`: the node agent joined to a cluster by kubeconfig, and the options that
//! `krate server` shares for the agent it embeds.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use krate_agent::{AgentConfig, NodeSettings};

#[derive(Args, Debug, Clone)]
pub struct AgentOptions {
    /// Name of this node (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Address the node reports (status.addresses InternalIP, pods' hostIP).
    #[arg(long, default_value = "127.0.0.1")]
    pub node_ip: IpAddr,
    /// Pod addresses of this node, used when the Node has no podCIDR assigned yet.
    #[arg(long, default_value = "10.42.0.0/24")]
    pub pod_cidr: String,
    /// Linux bridge the pods of this node attach to.
    #[arg(long, default_value = "krate0")]
    pub bridge: String,
    /// Where the CNI plugins are (Debian: containernetworking-plugins).
    #[arg(long, default_value = "/usr/lib/cni")]
    pub cni_bin_dir: PathBuf,
    /// Unix socket of a running CRI runtime to use instead of krate's own containerd.
    #[arg(long)]
    pub container_runtime_endpoint: Option<PathBuf>,
    /// Most pods this node runs.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// CPU kept back from pods for the system and krate (allocatable = capacity - this).
    #[arg(long, default_value = "100m")]
    pub reserved_cpu: String,
    /// Memory kept back from pods for the system and krate.
    #[arg(long, default_value = "256Mi")]
    pub reserved_memory: String,
    /// A registry (`host:port`) to pull from over plain HTTP (repeatable), e.g. a local
    /// registry at 127.0.0.1:5000.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// `registry=mirror-url`: pull images of `registry` from the mirror first (repeatable),
    /// e.g. `docker.io=http://127.0.0.1:5000`.
    #[arg(long = "registry-mirror")]
    pub registry_mirrors: Vec<String>,
    /// Extra node labels, `key=value` (repeatable).
    #[arg(long = "node-label")]
    pub node_labels: Vec<String>,
    /// A directory of image archives (OCI or docker `.tar`) to import at start, for
    /// machines that cannot reach a registry.
    #[arg(long)]
    pub airgap_images: Option<PathBuf>,
    /// Seconds between refreshes of ConfigMap, Secret and downward API volumes (a
    /// changed object shows in running containers within this period).
    #[arg(long, default_value_t = 60)]
    pub sync_frequency_seconds: u64,
    /// Port of the agent's HTTPS API, which the API server reaches for `kubectl logs`,
    /// `exec`, `attach` and `port-forward`.
    #[arg(long, default_value_t = 10250)]
    pub kubelet_port: u16,
    /// Directory of static pod manifests (one Pod per .yaml/.json file) that this node
    /// runs by itself, each shown in the API as a mirror pod named `<name>-<node>`
    /// (default: pod-manifests in the agent's directory).
    #[arg(long)]
    pub pod_manifest_path: Option<PathBuf>,
    /// Seconds between reads of the static pod directory.
    #[arg(long, default_value_t = 20)]
    pub file_check_frequency_seconds: u64,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Kubeconfig of the cluster to join.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// Where the agent keeps containerd's state, the CNI configuration and pod logs.
    #[arg(long, default_value = "/var/lib/krate/agent")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub options: AgentOptions,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_lowercase()).unwrap_or_else(|_| "localhost".into())
}

fn quantity(value: &str, scale: f64, what: &str) -> Result<u64> {
    krate_api::quantity::parse(value).map(|v| (v * scale).round() as u64).with_context(|| format!("{what}: {value:?} is not a quantity (like 100m or 256Mi)"))
}

impl AgentOptions {
    /// `cluster_ca_pem`: the CA whose client certificates may use the agent's API.
    pub fn config(&self, dir: PathBuf, cluster_ca_pem: Option<String>) -> Result<AgentConfig> {
        let pair = |s: &String, what: &str| -> Result<(String, String)> {
            s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).with_context(|| format!("{what} {s:?} must look like key=value"))
        };
        Ok(AgentConfig {
            node: NodeSettings {
                name: self.node_name.clone().unwrap_or_else(host_name),
                ip: self.node_ip,
                pod_cidr: self.pod_cidr.parse()?,
                max_pods: self.max_pods,
                reserved_cpu_millis: quantity(&self.reserved_cpu, 1000.0, "--reserved-cpu")?,
                reserved_memory_bytes: quantity(&self.reserved_memory, 1.0, "--reserved-memory")?,
                labels: self.node_labels.iter().map(|l| pair(l, "--node-label")).collect::<Result<_>>()?,
                data_dir: dir.clone(),
                agent_version: krate_apiserver::version_info()["gitVersion"].as_str().unwrap_or_default().to_string(),
                kubelet_port: self.kubelet_port,
            },
            dir: dir.clone(),
            runtime_endpoint: self.container_runtime_endpoint.clone(),
            cni_bin_dir: self.cni_bin_dir.clone(),
            bridge: self.bridge.clone(),
            insecure_registries: self.insecure_registries.clone(),
            registry_mirrors: self.registry_mirrors.iter().map(|m| pair(m, "--registry-mirror")).collect::<Result<_>>()?,
            airgap_images: self.airgap_images.clone(),
            sync_frequency: std::time::Duration::from_secs(self.sync_frequency_seconds.max(1)),
            cluster_ca_pem,
            pod_manifest_path: self.pod_manifest_path.clone().unwrap_or_else(|| dir.join("pod-manifests")),
            file_check_frequency: std::time::Duration::from_secs(self.file_check_frequency_seconds.max(1)),
        })
    }
}

pub async fn run(args: AgentArgs) -> Result<()> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig).with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let ca = kubeconfig.clusters.first().and_then(|c| c.cluster.as_ref()?.certificate_authority_data.clone());
    let ca_pem = ca.map(|b64| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64.trim())).transpose().context("decoding the kubeconfig's certificate-authority-data")?;
    let config = args.options.config(args.dir, ca_pem.map(|b| String::from_utf8_lossy(&b).into_owned()))?;
    let client = crate::components::kube_client(&args.kubeconfig).await?;
    krate_agent::run(client, config).await
}

/// `krate reset`: undoes the node agent of `data_dir` (see `krate_agent::reset`). The
/// cluster's database and certificates stay.
pub async fn reset(data_dir: PathBuf) -> Result<()> {
    let lock_path = data_dir.join("server.lock");
    if let Ok(lock) = std::fs::File::open(&lock_path) {
        if lock.try_lock().is_err() {
            anyhow::bail!("a krate server is running on {}; stop it first", data_dir.display());
        }
    }
    let dir = data_dir.join("agent");
    krate_agent::reset(&dir).await?;
    println!("removed the node agent's containers, containerd, pod network and {}", dir.display());
    Ok(())
}

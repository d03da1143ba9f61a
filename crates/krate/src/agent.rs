//! `krate agent`: the node agent joined to a cluster by kubeconfig, and the options that
//! `krate server` shares for the agent it embeds.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use krate_agent::{AgentConfig, NodeSettings};

#[derive(Args, Debug, Clone)]
pub struct AgentOptions {
    /// Name of this node (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Address the node reports (status.addresses InternalIP, pods' hostIP), which other
    /// nodes route this node's pods through. Default: the address this machine reaches
    /// the API server from (127.0.0.1 for the agent inside `krate server`).
    #[arg(long)]
    pub node_ip: Option<IpAddr>,
    /// Pod addresses of this node. Default: the pod CIDR the cluster assigns the Node
    /// (from the server's --cluster-cidr); given, the Node is registered with this one.
    #[arg(long)]
    pub pod_cidr: Option<String>,
    /// Linux bridge the pods of this node attach to.
    #[arg(long, default_value = "krate0")]
    pub bridge: String,
    /// How pods reach the pods of other nodes: `host-gw` (a route via the other node's
    /// address; nodes must share a link), `vxlan` (a tunnel over UDP; pods get the
    /// link's MTU less 50), or `auto` (host-gw to nodes on a shared link, VXLAN to the
    /// rest).
    #[arg(long, default_value = "auto")]
    pub pod_network: krate_net::routes::Backend,
    /// UDP port of the VXLAN tunnel between nodes (the same on every node; 8472 as
    /// flannel's).
    #[arg(long, default_value_t = 8472)]
    pub vxlan_port: u16,
    /// The cluster DNS address pods are given (the `kube-dns` Service's; this node's own
    /// DNS responder answers it). Default: 10.43.0.10, or with `krate server`, the tenth
    /// address of --service-cidr.
    #[arg(long)]
    pub cluster_dns: Option<IpAddr>,
    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The resolver configuration pods with dnsPolicy Default get, and where the
    /// cluster DNS sends names outside the cluster.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
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
    /// When the node reports pressure (MemoryPressure, DiskPressure, PIDPressure; new pods
    /// are then refused and the node tainted): `signal<quantity` or `signal<percent%`,
    /// comma-separated. Signals: memory.available, nodefs.available (the agent's
    /// directory), nodefs.inodesFree, imagefs.available (the runtime's image
    /// filesystem), imagefs.inodesFree, pid.available. Empty: never.
    #[arg(long, default_value = krate_agent::pressure::DEFAULT_EVICTION_HARD)]
    pub eviction_hard: String,
    /// How long a pressure condition stays after its signal last crossed the threshold
    /// (keeps a node hovering at a threshold from flapping), e.g. 5m, 30s, 0s.
    #[arg(long, default_value = "5m")]
    pub eviction_pressure_transition_period: String,
    /// Image filesystem usage (percent) above which unused images are removed...
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub image_gc_high_threshold: u8,
    /// ...until usage is below this percent again.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub image_gc_low_threshold: u8,
    /// Images are never removed within this time of being first seen unused, e.g. 2m.
    #[arg(long, default_value = "2m")]
    pub minimum_image_ttl_duration: String,
    /// A container's log is rotated when it reaches this size (a quantity: 10Mi, 500Ki).
    #[arg(long, default_value = "10Mi")]
    pub container_log_max_size: String,
    /// Log files kept per container, the current one included (at least 2).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(2..))]
    pub container_log_max_files: u16,
    /// How long `krate shutdown-node` may take to stop this node's pods before it powers
    /// off; regular pods get this minus the critical pods' share.
    #[arg(long, default_value = "30s")]
    pub shutdown_grace_period: String,
    /// The last part of the shutdown grace period, kept for critical pods (static pods,
    /// system-critical priority).
    #[arg(long, default_value = "10s")]
    pub shutdown_grace_period_critical_pods: String,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Kubeconfig of the cluster to join: best the node's own (`krate kubeconfig --node
    /// NAME` on the server), which the node authorizer limits to what the node's pods use.
    /// Or join with --server, --token and --ca-cert-hash instead.
    #[arg(long, env = "KUBECONFIG", conflicts_with = "server")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server to join, e.g. https://10.0.0.1:6443 (with --token and
    /// --ca-cert-hash: what `krate server` prints at start, or `krate token create
    /// --print-join-command`). The credentials it gets stay in --dir; a restarted agent
    /// needs only --server.
    #[arg(long)]
    pub server: Option<String>,
    /// A bootstrap token (ID.SECRET) to join with.
    #[arg(long, env = "KRATE_TOKEN", requires = "server", hide_env_values = true)]
    pub token: Option<String>,
    /// The expected hash of the cluster CA's public key, `sha256:<hex>` (repeatable);
    /// joining stops if the server's CA does not match.
    #[arg(long = "ca-cert-hash", requires = "server")]
    pub ca_cert_hashes: Vec<String>,
    /// Loopback port of the agent's load balancer over the API servers (a joined agent's
    /// clients go through it, to whichever server is alive; the servers are learned from
    /// the `kubernetes` Service's endpoints).
    #[arg(long, default_value_t = 6444)]
    pub lb_server_port: u16,
    /// Join without checking the CA against --ca-cert-hash: anyone who knows the token
    /// could then pose as the cluster.
    #[arg(long, requires = "server")]
    pub unsafe_skip_ca_verification: bool,
    /// Kubeconfig the node's networking (service proxy, DNS responder, NetworkPolicy)
    /// watches the cluster with. Default: a node joined with --server asks for an
    /// identity of its own (`system:krate:network:<node>`); with --kubeconfig, that one.
    /// With node credentials in --kubeconfig, give it kube-proxy's (`krate kubeconfig
    /// --user system:kube-proxy`): NetworkPolicy must see every pod, a node only its own.
    #[arg(long)]
    pub network_kubeconfig: Option<PathBuf>,
    /// Where the agent keeps containerd's state, the CNI configuration and pod logs.
    #[arg(long, default_value = "/var/lib/krate/agent")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub options: AgentOptions,
    #[command(flatten)]
    pub config: crate::config::ConfigArgs,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .unwrap_or_else(|_| "localhost".into())
}

/// A duration as Kubernetes writes them: `1h30m`, `2m`, `45s`, `500ms`, `0s`.
pub(crate) fn duration(value: &str, what: &str) -> Result<std::time::Duration> {
    let bad = || anyhow::anyhow!("{what}: {value:?} is not a duration (like 5m, 30s or 0s)");
    let mut rest = value.trim();
    if rest == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').ok_or_else(bad)?;
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit_len = rest[digits..].find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len() - digits);
        let seconds = match &rest[digits..digits + unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[digits + unit_len..];
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

fn quantity(value: &str, scale: f64, what: &str) -> Result<u64> {
    krate_api::quantity::parse(value)
        .map(|v| (v * scale).round() as u64)
        .with_context(|| format!("{what}: {value:?} is not a quantity (like 100m or 256Mi)"))
}

impl AgentOptions {
    /// `cluster_ca_pem`: the CA whose client certificates may use the agent's API.
    pub fn config(&self, dir: PathBuf, cluster_ca_pem: Option<String>) -> Result<AgentConfig> {
        let pair = |s: &String, what: &str| -> Result<(String, String)> {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{what} {s:?} must look like key=value"))
        };
        Ok(AgentConfig {
            node: NodeSettings {
                name: self.node_name.clone().unwrap_or_else(host_name),
                ip: self.node_ip.unwrap_or(IpAddr::from([127, 0, 0, 1])),
                pod_cidr: self
                    .pod_cidr
                    .as_deref()
                    .map(|c| krate_net::PodNetwork::parse_cidr(c).context("--pod-cidr"))
                    .transpose()?,
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
            pod_network: self.pod_network,
            vxlan_port: self.vxlan_port,
            insecure_registries: self.insecure_registries.clone(),
            registry_mirrors: self
                .registry_mirrors
                .iter()
                .map(|m| pair(m, "--registry-mirror"))
                .collect::<Result<_>>()?,
            airgap_images: self.airgap_images.clone(),
            sync_frequency: std::time::Duration::from_secs(self.sync_frequency_seconds.max(1)),
            cluster_ca_pem,
            pod_manifest_path: self.pod_manifest_path.clone().unwrap_or_else(|| dir.join("pod-manifests")),
            file_check_frequency: std::time::Duration::from_secs(self.file_check_frequency_seconds.max(1)),
            eviction_hard: krate_agent::pressure::parse_thresholds(&self.eviction_hard).context("--eviction-hard")?,
            eviction_pressure_transition_period: duration(
                &self.eviction_pressure_transition_period,
                "--eviction-pressure-transition-period",
            )?,
            image_gc: self.image_gc_policy()?,
            log_rotation: krate_agent::logrotate::LogRotation {
                max_size: quantity(&self.container_log_max_size, 1.0, "--container-log-max-size")?.max(1),
                max_files: usize::from(self.container_log_max_files),
            },
            shutdown_grace: self.shutdown_grace()?,
            dns: krate_agent::pods::dns::PodDns {
                cluster_dns: Some(self.cluster_dns.unwrap_or(IpAddr::from([10, 43, 0, 10]))),
                domain: self.cluster_domain.trim_end_matches('.').to_string(),
                host: krate_agent::pods::dns::ResolvConf::parse(
                    &std::fs::read_to_string(&self.resolv_conf).unwrap_or_default(),
                ),
            },
        })
    }

    fn shutdown_grace(&self) -> Result<krate_agent::shutdown::ShutdownGrace> {
        let total = duration(&self.shutdown_grace_period, "--shutdown-grace-period")?;
        let critical = duration(&self.shutdown_grace_period_critical_pods, "--shutdown-grace-period-critical-pods")?;
        if critical > total {
            anyhow::bail!("--shutdown-grace-period-critical-pods ({critical:?}) is part of --shutdown-grace-period ({total:?}) and cannot be longer");
        }
        Ok(krate_agent::shutdown::ShutdownGrace { total, critical })
    }

    fn image_gc_policy(&self) -> Result<krate_agent::imagegc::ImageGcPolicy> {
        if self.image_gc_low_threshold > self.image_gc_high_threshold {
            anyhow::bail!(
                "--image-gc-low-threshold ({}) must not be above --image-gc-high-threshold ({})",
                self.image_gc_low_threshold,
                self.image_gc_high_threshold
            );
        }
        Ok(krate_agent::imagegc::ImageGcPolicy {
            high_percent: self.image_gc_high_threshold,
            low_percent: self.image_gc_low_threshold,
            min_age: duration(&self.minimum_image_ttl_duration, "--minimum-image-ttl-duration")?,
        })
    }
}

pub async fn run(args: AgentArgs) -> Result<()> {
    let node_name = args.options.node_name.clone().unwrap_or_else(host_name);
    let joined = args.kubeconfig.is_none();
    let (kubeconfig_path, rotation) = match (&args.kubeconfig, &args.server) {
        (Some(path), _) => (path.clone(), None),
        (None, Some(server)) => {
            let join = crate::join::Join {
                server: server.clone(),
                token: args.token.as_deref().map(str::parse).transpose().map_err(|e: String| anyhow::anyhow!("--token: {e}"))?,
                ca_cert_hashes: args.ca_cert_hashes.clone(),
                unsafe_skip_ca_verification: args.unsafe_skip_ca_verification,
                node_name: node_name.clone(),
            };
            std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
            let creds = crate::join::Credentials::in_dir(&args.dir);
            let path = crate::join::credentials(&join, &creds).await?;
            let target = host_port(server)?;
            let lb = crate::loadbalancer::LoadBalancer::start(args.lb_server_port, &target, &args.dir).await?;
            crate::loadbalancer::point_kubeconfig(&path, &lb.url())?;
            let network = crate::join::Credentials::network_in_dir(&args.dir).kubeconfig;
            if network.exists() {
                crate::loadbalancer::point_kubeconfig(&network, &lb.url())?;
            }
            let rotation = crate::join::Rotation::new(creds, &node_name, crate::join::Identity::Node, None).await?;
            (path, Some((rotation, lb)))
        }
        (None, None) => anyhow::bail!(
            "give --kubeconfig, or --server with --token and --ca-cert-hash to join a cluster (`krate token create --print-join-command` on the server prints the command)"
        ),
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(&kubeconfig_path)
        .with_context(|| format!("reading {}", kubeconfig_path.display()))?;
    let ca = kubeconfig.clusters.first().and_then(|c| c.cluster.as_ref()?.certificate_authority_data.clone());
    let ca_pem = ca
        .map(|b64| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64.trim()))
        .transpose()
        .context("decoding the kubeconfig's certificate-authority-data")?;
    let mut config = args.options.config(args.dir, ca_pem.map(|b| String::from_utf8_lossy(&b).into_owned()))?;
    config.node.name = node_name;
    if args.options.node_ip.is_none() {
        // Where the agent joined, not its load balancer on loopback.
        let server = args.server.clone().unwrap_or_else(|| {
            kubeconfig.clusters.first().and_then(|c| c.cluster.as_ref()?.server.clone()).unwrap_or_default()
        });
        config.node.ip = source_address(&server)
            .await
            .with_context(|| format!("finding the address this machine reaches {server} from; give --node-ip"))?;
    }
    let (client, lb) = match rotation {
        Some((rotation, lb)) => {
            let client = rotation.client();
            tokio::spawn(rotation.run());
            (client, Some(lb))
        }
        None => (crate::components::kube_client(&kubeconfig_path).await?, None),
    };
    let network = match (&args.network_kubeconfig, joined) {
        (Some(path), _) => crate::components::kube_client(path).await?,
        (None, true) => network_client(&client, &kubeconfig_path, &config.dir, &config.node.name).await,
        (None, false) => client.clone(),
    };
    if let Some(lb) = lb {
        tokio::spawn(lb.follow(network.clone()));
    }
    krate_agent::run(krate_agent::Clients { node: client, network }, config).await
}

/// The client of a joined node's networking identity (renewed like the node's), or the
/// node's own where the cluster does not issue one (NetworkPolicy then cannot see pods).
async fn network_client(node: &kube::Client, node_kubeconfig: &Path, dir: &Path, name: &str) -> kube::Client {
    use crate::join::{Credentials, Identity, Rotation};
    let creds = Credentials::network_in_dir(dir);
    let rotation = async {
        crate::join::network_credentials(node, node_kubeconfig, &creds, name).await?;
        Rotation::new(creds, name, Identity::Network, Some(node.clone())).await
    };
    match rotation.await {
        Ok(rotation) => {
            let client = rotation.client();
            tokio::spawn(rotation.run());
            client
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no networking identity; the service proxy, DNS and NetworkPolicy use the node's (NetworkPolicy cannot see other nodes' pods then)");
            node.clone()
        }
    }
}

/// `host:port` of a server URL (port 443 when it names none).
fn host_port(url: &str) -> Result<String> {
    let uri: http::Uri = url.parse().with_context(|| format!("--server {url:?} is not a URL"))?;
    let host = uri.host().context("the server URL has no host")?;
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(443)))
}

/// The local address connections to `url`'s host leave from (no packet is sent).
async fn source_address(url: &str) -> Result<IpAddr> {
    let uri: http::Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
    let host = uri.host().context("the server URL has no host")?.trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(443);
    let target = tokio::net::lookup_host((host, port)).await?.next().context("the server's host has no address")?;
    let socket = std::net::UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    socket.connect(target)?;
    Ok(socket.local_addr()?.ip())
}

/// `krate reset`: undoes the node agent of `data_dir` (see `krate_agent::reset`). The
/// cluster's database and certificates stay.
pub async fn reset(data_dir: PathBuf) -> Result<()> {
    let _lock = crate::server::lock_stopped(&data_dir)?;
    let dir = data_dir.join("agent");
    let mut report = krate_agent::reset(&dir).await;
    // A control-plane server's etcd member leaves its cluster.
    match crate::etcd::leave(&data_dir).await {
        Ok(done) => report.removed.extend(done),
        Err(e) => report.left.push(format!("the etcd member of {}: {e:#}", data_dir.display())),
    }
    for what in &report.removed {
        println!("removed {what}");
    }
    if report.removed.is_empty() && report.left.is_empty() {
        println!("nothing to remove under {}", dir.display());
    }
    for what in &report.left {
        eprintln!("NOT removed: {what}");
    }
    if !report.left.is_empty() {
        anyhow::bail!(
            "{} item(s) left behind (above): remove them by hand, or fix the cause and run krate reset again",
            report.left.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn durations_read_as_kubernetes_writes_them() {
        assert_eq!(super::duration("5m", "x").unwrap(), Duration::from_secs(300));
        assert_eq!(super::duration("1h30m", "x").unwrap(), Duration::from_secs(5400));
        assert_eq!(super::duration("0s", "x").unwrap(), Duration::ZERO);
        assert_eq!(super::duration("0", "x").unwrap(), Duration::ZERO);
        assert_eq!(super::duration("1.5s", "x").unwrap(), Duration::from_millis(1500));
        assert_eq!(super::duration("250ms", "x").unwrap(), Duration::from_millis(250));
        for bad in ["5", "5d", "m", "", "1m x"] {
            let e = super::duration(bad, "--flag").unwrap_err().to_string();
            assert!(e.contains("--flag") && e.contains("is not a duration"), "{bad}: {e}");
        }
    }
}

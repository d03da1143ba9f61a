//! krate's node agent (its kubelet). It registers the Node and keeps its Lease fresh,
//! starts (or adopts) containerd, sets up the node's pod network, and runs the pods bound
//! to the node as containers through CRI v1. It is an API client like any other: `krate
//! agent` runs it against a cluster, `krate server` embeds one for a single-node cluster.
//!
//! Rooms: `containerd.rs` (the supervised runtime), `cri.rs` (the gRPC client and
//! containerd's events), `node.rs` (Node and Lease, status and housekeeping; the pod
//! network itself is `krate-net`'s), `pressure.rs` (eviction signals and the pressure
//! conditions), `images.rs` (pulls, the sandbox image, air-gap imports), `imagegc.rs`
//! (unused images removed when the disk fills), `oci.rs` (building images), `pods/` (the
//! per-pod workers, admission, CRI configs, status), `shutdown.rs` (graceful node
//! shutdown and the control socket), `server.rs` (the HTTPS API the API server calls),
//! `logs.rs` and `streaming/` (logs, exec, attach, port-forward).

pub mod containerd;
pub mod cri;
pub mod imagegc;
pub mod images;
pub mod logrotate;
pub mod logs;
pub mod node;
pub mod oci;
pub mod pods;
pub mod pressure;
pub mod server;
pub mod shutdown;
pub mod stats;
pub mod streaming;
pub mod testimages;

use std::path::PathBuf;

use anyhow::{Context, Result};

pub use node::NodeSettings;

/// Everything the agent needs to run.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The agent's own directory (containerd's state, CNI config, pod logs).
    pub dir: PathBuf,
    pub node: NodeSettings,
    /// Use this running CRI runtime instead of starting krate's containerd.
    pub runtime_endpoint: Option<PathBuf>,
    pub cni_bin_dir: PathBuf,
    /// The Linux bridge pods attach to.
    pub bridge: String,
    /// How this node's pods reach other nodes' pods, and the VXLAN port if they tunnel.
    pub pod_network: krate_net::routes::Backend,
    pub vxlan_port: u16,
    /// Registries (`host:port`) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// `registry=mirror-url` pairs: pulls from `registry` try the mirror first.
    pub registry_mirrors: Vec<(String, String)>,
    /// OCI/docker archives imported at start (for machines without registry access).
    pub airgap_images: Option<PathBuf>,
    /// How often ConfigMap, Secret and downward API volumes are brought up to date.
    pub sync_frequency: std::time::Duration,
    /// The cluster CA (PEM) that signs the API server's client certificate; the agent's
    /// HTTPS API (logs) accepts only clients it signed. None: no agent API.
    pub cluster_ca_pem: Option<String>,
    /// Static pod manifests, and how often the directory is read again.
    pub pod_manifest_path: PathBuf,
    pub file_check_frequency: std::time::Duration,
    /// Signals below these make the node report pressure (`--eviction-hard`).
    pub eviction_hard: Vec<pressure::Threshold>,
    /// How long a pressure condition outlasts the signal's last crossing.
    pub eviction_pressure_transition_period: std::time::Duration,
    pub image_gc: imagegc::ImageGcPolicy,
    /// When container logs rotate and how many files each keeps.
    pub log_rotation: logrotate::LogRotation,
    /// How long the node's shutdown may take (`krate shutdown-node`).
    pub shutdown_grace: shutdown::ShutdownGrace,
    /// Pods' DNS: the cluster DNS address (answered on this node), the cluster domain
    /// and the node's own resolv.conf.
    pub dns: pods::dns::PodDns,
}

impl AgentConfig {
    pub fn containerd_settings(&self) -> containerd::ContainerdSettings {
        containerd::ContainerdSettings {
            dir: self.dir.join("containerd"),
            cni_bin_dir: self.cni_bin_dir.clone(),
            cni_conf_dir: self.dir.join("cni/net.d"),
            sandbox_image: images::SANDBOX_IMAGE.into(),
            registry_config_dir: self.dir.join("containerd/certs.d"),
        }
    }

    pub fn runtime_socket(&self) -> PathBuf {
        self.runtime_endpoint.clone().unwrap_or_else(|| self.containerd_settings().socket())
    }

    /// containerd's `hosts.toml` per registry, for plain-HTTP registries and mirrors.
    fn write_registry_hosts(&self) -> Result<()> {
        let dir = self.containerd_settings().registry_config_dir;
        let mut hosts: std::collections::BTreeMap<String, String> = Default::default();
        for registry in &self.insecure_registries {
            hosts.insert(registry.clone(), format!("server = \"http://{registry}\"\n\n[host.\"http://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n"));
        }
        for (registry, mirror) in &self.registry_mirrors {
            let upstream = if registry == "docker.io" {
                "https://registry-1.docker.io".to_string()
            } else {
                format!("https://{registry}")
            };
            let entry = hosts.entry(registry.clone()).or_insert_with(|| format!("server = \"{upstream}\"\n"));
            entry.push_str(&format!(
                "\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n"
            ));
        }
        for (registry, text) in hosts {
            let d = dir.join(&registry);
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join("hosts.toml"), text)
                .with_context(|| format!("writing the registry configuration of {registry}"))?;
        }
        Ok(())
    }
}

/// The API clients of an agent: the node's own, and the one its service proxy and DNS
/// responder watch Services and endpoints with (kube-proxy's user inside `krate server`;
/// a stand-alone agent uses its kubeconfig's user for both).
pub struct Clients {
    pub node: kube::Client,
    pub network: kube::Client,
}

/// Runs the agent until the process stops.
pub async fn run(clients: Clients, config: AgentConfig) -> Result<()> {
    let client = clients.node;
    std::fs::create_dir_all(&config.dir)
        .with_context(|| format!("creating the agent directory {} (run as root)", config.dir.display()))?;
    let socket = config.runtime_socket();
    let mut cri = match &config.runtime_endpoint {
        Some(endpoint) => cri::Cri::connect(endpoint).await?.0,
        None => {
            containerd::check_installed(&config.cni_bin_dir)?;
            config.write_registry_hosts()?;
            containerd::start_or_adopt(&config.containerd_settings()).await?
        }
    };
    let version = cri.runtime.version(cri::api::VersionRequest { version: "v1".into() }).await?.into_inner();
    let runtime_version = format!("{}://{}", version.runtime_name, version.runtime_version);
    let pod_cidr = node::register(&client, &config.node).await?;
    let mtu = krate_net::routes::pod_mtu(config.node.ip, config.pod_network).await;
    let network = krate_net::PodNetwork { bridge: config.bridge.clone(), pod_cidr, mtu };
    // What `reset` needs to undo, should this process not be there to tell it.
    let state = serde_json::json!({"bridge": config.bridge, "podCIDR": pod_cidr.to_string(), "runtimeEndpoint": config.runtime_endpoint});
    std::fs::write(config.dir.join(STATE_FILE), serde_json::to_vec_pretty(&state)?)?;
    if config.runtime_endpoint.is_none() {
        let settings = config.containerd_settings();
        network.write_cni_config(&settings.cni_conf_dir, &config.dir.join("cni/ipam"))?;
        images::ensure_builtin_images(&mut cri, &socket, &config.dir.join("tmp")).await?;
    }
    network.install_rules().await?;
    network.ensure_bridge().await?;
    let catalog = krate_net::catalog::Catalog::default();
    let networking = serve_networking(clients.network, &config, &network, &catalog);
    if let Some(dir) = &config.airgap_images {
        let n = images::import_dir(&socket, dir).await?;
        tracing::info!(count = n, dir = %dir.display(), "imported air-gap images");
    }
    tracing::info!(node = %config.node.name, pod_cidr = %pod_cidr, mtu = ?mtu, runtime = %runtime_version, "node agent ready");
    if let Some(ca) = &config.cluster_ca_pem {
        let names = vec![config.node.name.clone(), config.node.ip.to_string()];
        let (tls, serving) = server::tls_config(&config.dir.join("pki"), names, ca)?;
        tokio::spawn(serving.keep_signed(
            client.clone(),
            config.dir.join("pki"),
            config.node.name.clone(),
            config.node.ip,
        ));
        let addr = std::net::SocketAddr::new(config.node.ip, config.node.kubelet_port);
        let (api_cri, node_name) = (cri.clone(), config.node.name.clone());
        tokio::spawn(async move {
            if let Err(e) = server::serve(addr, tls, api_cri, &node_name).await {
                tracing::error!(error = %format!("{e:#}"), "the agent API stopped; kubectl logs will not reach this node");
            }
        });
    }
    let (conditions, conditions_rx) = tokio::sync::watch::channel(Vec::new());
    let housekeeping = node::Housekeeping {
        filesystems: pressure::Filesystems {
            nodefs: config.dir.clone(),
            imagefs: image_filesystem(&mut cri).await.unwrap_or_else(|| config.dir.clone()),
        },
        pressure: pressure::Pressure::new(config.eviction_hard.clone(), config.eviction_pressure_transition_period),
        image_gc: imagegc::ImageGc::new(config.image_gc),
        log_rotation: config.log_rotation,
        cri: cri.clone(),
        conditions,
        events: krate_client::events::Recorder::new(client.clone(), "kubelet"),
    };
    let shared = pods::Shared::new(
        client.clone(),
        cri,
        &config.node,
        config.sync_frequency,
        conditions_rx,
        config.dns.clone(),
        catalog.clone(),
    );
    let control = shutdown::serve(&config.dir, shared.clone(), config.shutdown_grace);
    tokio::select! {
        () = networking => Ok(()),
        r = node::heartbeat(client, config.node.clone(), runtime_version, housekeeping, shared.shutting_down.subscribe()) => r,
        r = control => r.context("the agent's control socket failed"),
        r = pods::run(shared, (config.pod_manifest_path.clone(), config.file_check_frequency)) => r,
    }
}

/// The node's routes to other nodes' pods, its NetworkPolicy rules, its service proxy
/// and its cluster DNS responder (the last two on one shared view of Services and
/// endpoints); each restarted on failure (and none stops the pods).
async fn serve_networking(
    client: kube::Client,
    config: &AgentConfig,
    network: &krate_net::PodNetwork,
    catalog: &krate_net::catalog::Catalog,
) {
    use std::net::IpAddr;
    let gateway = network.pod_cidr.gateway();
    let cluster_dns = config.dns.cluster_dns.and_then(|ip| match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    });
    let local_dns = match (cluster_dns, gateway) {
        (Some(cluster_ip), IpAddr::V4(responder)) => {
            Some(krate_net::proxy::LocalDns { cluster_ip, responder, port: 53 })
        }
        _ => None,
    };
    let proxy = krate_net::proxy::ProxyConfig {
        table: network.table(),
        bridge: network.bridge.clone(),
        node_name: config.node.name.clone(),
        node_ips: krate_net::proxy::ipv4s(&[config.node.ip]),
        pod_cidr: network.pod_cidr,
        service_cidrs: service_cidrs(&client).await,
        local_dns,
        applied: None,
    };
    let skip: Vec<IpAddr> = config.dns.cluster_dns.into_iter().chain([gateway]).collect();
    let dns = krate_net::dns::DnsConfig {
        zone: config.dns.domain.clone(),
        listen: std::net::SocketAddr::new(gateway, 53),
        upstreams: krate_net::dns::upstreams(&config.dns.host.servers, &skip),
        ttl: 5,
    };
    let routes = krate_net::routes::RouteConfig {
        backend: config.pod_network,
        node_name: config.node.name.clone(),
        node_ip: config.node.ip,
        table: network.table(),
        vxlan_port: config.vxlan_port,
        vxlan_id: 1,
    };
    tokio::join!(
        krate_client::supervised("pod-routes", || krate_net::routes::run_routes(client.clone(), routes.clone())),
        krate_client::supervised("network-policy", || {
            krate_net::policy::run(client.clone(), config.node.name.clone(), network.policy_table())
        }),
        krate_client::supervised("service-watch", || catalog.run(client.clone())),
        krate_client::supervised("service-proxy", || krate_net::proxy::run(catalog, proxy.clone())),
        krate_client::supervised("cluster-dns", || krate_net::dns::run(catalog, dns.clone())),
    );
}

/// The cluster's service ranges, as its ServiceCIDR objects say (none if the API serves
/// no ServiceCIDRs).
async fn service_cidrs(client: &kube::Client) -> Vec<krate_net::Cidr> {
    use k8s_openapi::api::networking::v1::ServiceCIDR;
    let api = kube::Api::<ServiceCIDR>::all(client.clone());
    match api.list(&Default::default()).await {
        Ok(list) => list
            .items
            .iter()
            .flat_map(|c| c.spec.as_ref().and_then(|s| s.cidrs.clone()).unwrap_or_default())
            .filter_map(|c| c.parse().ok())
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the cluster's ServiceCIDRs; untranslated service addresses may leave the node");
            vec![]
        }
    }
}

/// Where the runtime keeps its images (its image filesystem's mount point, as CRI says).
async fn image_filesystem(cri: &mut cri::Cri) -> Option<PathBuf> {
    let info = cri.images.image_fs_info(cri::api::ImageFsInfoRequest {}).await.ok()?.into_inner();
    let mountpoint = info.image_filesystems.first()?.fs_id.as_ref()?.mountpoint.clone();
    (!mountpoint.is_empty()).then(|| PathBuf::from(mountpoint))
}

const STATE_FILE: &str = "agent.json";

/// Removes everything the agent that used `dir` created on this machine: its pods'
/// sandboxes and containers, its containerd and what it mounted, its bridge and nftables
/// table, the routes to other nodes' pods and the VXLAN device, and then `dir` itself. The agent must be stopped.
/// It goes on past what fails and reports it, so that one stuck item leaves no others.
pub async fn reset(dir: &std::path::Path) -> ResetReport {
    let mut report = ResetReport::default();
    let state: serde_json::Value = match std::fs::read(dir.join(STATE_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            report.left.push(format!(
                "{}: not readable ({e}); its bridge and network, if any, were not identified",
                dir.join(STATE_FILE).display()
            ));
            serde_json::Value::Null
        }),
        Err(_) => serde_json::Value::Null,
    };
    let endpoint = state["runtimeEndpoint"].as_str().map(PathBuf::from);
    let containerd_dir = dir.join("containerd");
    let socket = endpoint.clone().unwrap_or_else(|| containerd_dir.join("containerd.sock"));
    if let Ok((cri, _)) = cri::Cri::connect(&socket).await {
        match cri.clone().sandboxes_labelled(&[(pods::spec::MANAGED_BY, pods::spec::MANAGED_BY_AGENT)]).await {
            Ok(sandboxes) => {
                // All at once: each stop waits for its containers.
                let removals = sandboxes.into_iter().map(|s| {
                    let mut cri = cri.clone();
                    async move {
                        let meta = s.metadata.clone().unwrap_or_default();
                        let removed = cri.remove_sandbox(&s.id).await.map_err(anyhow::Error::from);
                        (format!("pod sandbox {} ({}/{})", s.id, meta.namespace, meta.name), removed)
                    }
                });
                for (what, result) in futures::future::join_all(removals).await {
                    report.record(what, result);
                }
            }
            Err(e) => report.left.push(format!("the pods' containers: listing them failed: {e:#}")),
        }
    } else if socket.exists() {
        report.left.push(format!(
            "the pods' containers: the runtime at {} did not answer, so they may still run (their containerd-shim-runc-v2 processes)",
            socket.display()
        ));
    }
    if endpoint.is_none() && containerd::running_pid(&containerd_dir).is_some() {
        containerd::stop(&containerd_dir).await;
        let stopped = match containerd::running_pid(&containerd_dir) {
            None => Ok(()),
            Some(pid) => Err(anyhow::anyhow!("it did not stop (pid {pid})")),
        };
        report.record(format!("krate's containerd ({})", containerd_dir.display()), stopped);
    }
    if let (Some(bridge), Some(cidr)) = (state["bridge"].as_str(), state["podCIDR"].as_str()) {
        match cidr.parse() {
            Ok(pod_cidr) => {
                let network = krate_net::PodNetwork { bridge: bridge.to_string(), pod_cidr, mtu: None };
                report.record(format!("pod bridge {bridge} and its nftables tables"), network.remove().await);
            }
            Err(e) => report.left.push(format!("pod bridge {bridge}: its CIDR {cidr:?} is not readable ({e})")),
        }
        let routes = krate_net::routes::remove_all().await;
        report.record("routes to other nodes' pods and the VXLAN device".into(), routes);
    }
    match unmount_under(dir) {
        Ok(0) => {}
        Ok(n) => report.removed.push(format!("{n} mounts under {}", dir.display())),
        Err(e) => report.left.push(format!("mounts under {}: {e:#}", dir.display())),
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => report.removed.push(dir.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report.left.push(format!("{}: {e}", dir.display())),
    }
    report
}

/// What `reset` removed and what it could not (each with why), so that nothing is left
/// behind silently.
#[derive(Debug, Default)]
pub struct ResetReport {
    pub removed: Vec<String>,
    pub left: Vec<String>,
}

impl ResetReport {
    /// `what` goes to `removed`, or with why to `left`.
    fn record(&mut self, what: String, result: Result<()>) {
        match result {
            Ok(()) => self.removed.push(what),
            Err(e) => self.left.push(format!("{what}: {e:#}")),
        }
    }
}

/// Unmounts every mount point below `dir`, deepest first, so removing `dir` cannot reach
/// into a mounted filesystem.
fn unmount_under(dir: &std::path::Path) -> Result<usize> {
    let Ok(dir) = std::fs::canonicalize(dir) else { return Ok(0) };
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let count = points.len();
    for p in points {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())?;
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            anyhow::bail!("unmounting {}: {}", p.display(), std::io::Error::last_os_error());
        }
    }
    Ok(count)
}

//! `krate server`: the control plane on one machine.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use krate_apiserver::{auth, ApiServer, Settings};
use krate_store::sqlite::SqliteStore;

use crate::components::{self, ControllerSettings, ElectionArgs, SchedulerSettings};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/krate";
/// Upstream's label of control-plane nodes (`kubectl get nodes` shows the role).
const CONTROL_PLANE_ROLE: &str = "node-role.kubernetes.io/control-plane";

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Where krate keeps its database, certificates and kubeconfigs.
    #[arg(long, default_value = DEFAULT_DATA_DIR, env = "KRATE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address the API server listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_address: IpAddr,
    /// HTTPS port of the API server.
    #[arg(long, default_value_t = 6443)]
    pub port: u16,
    /// The address pods and other nodes reach the API server at (the `kubernetes`
    /// Service's endpoint). Default: the bind address, or this machine's primary address
    /// when binding to all.
    #[arg(long)]
    pub advertise_address: Option<IpAddr>,
    /// Ranges of Service cluster IPs: one, or one per IP family (`10.43.0.0/16,fd00:43::/112`).
    /// The first address is the `kubernetes` Service's.
    #[arg(long, default_value = "10.43.0.0/16")]
    pub service_cidr: String,
    /// Ports NodePort Services get (`low-high`).
    #[arg(long, default_value = "30000-32767")]
    pub service_node_port_range: String,
    /// Extra names or IPs to put in the serving certificate (repeatable).
    #[arg(long = "tls-san")]
    pub tls_san: Vec<String>,
    /// Events kept per resource for resuming watches.
    #[arg(long, default_value_t = 10_000)]
    pub watch_cache_size: usize,
    /// Seconds between compactions of storage history.
    #[arg(long, default_value_t = 300)]
    pub compaction_interval_seconds: u64,
    /// Seconds between bookmarks on watches that allow them.
    #[arg(long, default_value_t = 60)]
    pub bookmark_interval_seconds: u64,
    /// Seconds a node's Lease may go unrenewed before the node is marked unreachable
    /// (NotReady, tainted) and its pods are evicted after their tolerations.
    #[arg(long, default_value_t = 40)]
    pub node_monitor_grace_period_seconds: u64,
    /// The longest lifetime of certificates the cluster CA signs for approved
    /// CertificateSigningRequests (nodes' client and serving certificates), e.g. 8760h.
    /// Agents renew theirs at 80% of it.
    #[arg(long, default_value = "8760h")]
    pub cluster_signing_duration: String,
    /// How long an Event is kept after its last change (upstream's --event-ttl), e.g.
    /// 1h, 30m: Events are the busiest writes of a cluster and must not grow its store.
    #[arg(long, default_value = "1h")]
    pub event_ttl: String,
    /// A CA certificate of your own (PEM), used instead of a generated one: given at the
    /// first start (with --ca-key), it is kept in <data-dir>/pki. Or place ca.crt and
    /// ca.key there before the first start. A pki/ca-bundle.crt, if present, is what
    /// joining nodes are told to trust (old and new CA together, to rotate).
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The private key of --ca-cert (PEM).
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// The range nodes' pod CIDRs are assigned from, one per node (a node whose agent
    /// gives --pod-cidr keeps that one).
    #[arg(long, default_value = "10.42.0.0/16")]
    pub cluster_cidr: String,
    /// The prefix length of each node's pod CIDR (default 24 for IPv4, 64 for IPv6).
    #[arg(long)]
    pub node_cidr_mask_size: Option<u8>,
    /// How new nodes get in: `token`, their bootstrap token's client certificate
    /// request is approved at once; `approve`, it waits for an admin (`kubectl get csr`,
    /// `kubectl certificate approve NAME`); `open`, anyone who reaches the server may
    /// join without a token (`krate agent --server URL --ca-cert-hash HASH`), best with
    /// --node-registration-allow-cidr. Nodes that joined keep working when it changes.
    #[arg(long, default_value = "token", value_parser = ["token", "approve", "open"])]
    pub node_registration: String,
    /// Accept joining nodes' certificate requests only from these addresses
    /// (repeatable CIDR, e.g. 10.0.0.0/8); default: from anywhere.
    #[arg(long = "node-registration-allow-cidr")]
    pub node_registration_allow_cidrs: Vec<String>,
    /// Who may do what, in order (upstream's `--authorization-mode`): `Node` (node agents
    /// reach only what their pods use), `RBAC` (roles and bindings; upstream's default
    /// policy is created and kept at start), or `AlwaysAllow` (every authenticated user
    /// may do everything: for experiments only). Members of `system:masters`, like the
    /// admin kubeconfig's user, may always do everything.
    #[arg(long, default_value = "Node,RBAC", value_parser = parse_authorization_mode)]
    pub authorization_mode: AuthorizationModes,
    /// How Secrets are encrypted in the database: an EncryptionConfiguration file
    /// (upstream's format: aescbc, aesgcm, secretbox or identity providers with named
    /// keys). Default: <data-dir>/pki/encryption-config.yaml, generated with a new AES-CBC
    /// key on first start. Edits are picked up while running (`krate secrets-encrypt
    /// rotate` makes one), and stored values are rewritten under the new first key.
    #[arg(long)]
    pub encryption_provider_config: Option<PathBuf>,
    /// An audit Policy (audit.k8s.io/v1, upstream's format): which requests are logged
    /// at which level (None, Metadata, Request, RequestResponse). Needs --audit-log-path.
    #[arg(long, requires = "audit_log_path")]
    pub audit_policy_file: Option<PathBuf>,
    /// Where audit events go, one JSON line each (audit.k8s.io/v1 Event).
    #[arg(long, requires = "audit_policy_file")]
    pub audit_log_path: Option<PathBuf>,
    /// Megabytes the audit log grows to before it is rotated (0: never).
    #[arg(long, default_value_t = 0)]
    pub audit_log_maxsize: u64,
    /// Rotated audit logs kept (0: all).
    #[arg(long, default_value_t = 0)]
    pub audit_log_maxbackup: usize,
    /// Days a rotated audit log is kept (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub audit_log_maxage: u64,
    /// Run an etcd member on this machine and keep the cluster's state in it instead of
    /// the embedded SQLite database: the first server of a highly available control
    /// plane. The member's data is in <data-dir>/db/etcd, its client and peer TLS come
    /// from the cluster CA, and it is supervised (restarted if it exits, stopped with the
    /// server). Later starts of the same data directory run the member again without
    /// this flag.
    #[arg(long, conflicts_with = "datastore_endpoint")]
    pub cluster_init: bool,
    /// Client port of the managed etcd member.
    #[arg(long, default_value_t = 2379)]
    pub etcd_client_port: u16,
    /// Peer port of the managed etcd member.
    #[arg(long, default_value_t = 2380)]
    pub etcd_peer_port: u16,
    /// Join the control plane of the cluster at this API server (e.g.
    /// https://10.0.0.1:6443) as another server: with --token, --ca-cert-hash and
    /// --certificate-key, what a server on etcd prints at start. The cluster's keys and
    /// an etcd member of its own come from there; later starts need none of these flags.
    #[arg(long, requires_all = ["token", "certificate_key"], conflicts_with_all = ["cluster_init", "datastore_endpoint"])]
    pub server: Option<String>,
    /// A bootstrap token (ID.SECRET) of the cluster, to join with --server.
    #[arg(long, env = "KRATE_TOKEN", requires = "server", hide_env_values = true)]
    pub token: Option<String>,
    /// The expected hash of the cluster CA's public key, `sha256:<hex>` (repeatable).
    #[arg(long = "ca-cert-hash", requires = "server")]
    pub ca_cert_hashes: Vec<String>,
    /// The key the cluster's keys are encrypted under in kube-system/krate-certs (64 hex
    /// digits, printed by a server on etcd).
    #[arg(long, requires = "server", hide_env_values = true, env = "KRATE_CERTIFICATE_KEY")]
    pub certificate_key: Option<String>,
    /// Keep the cluster's state in an etcd cluster instead of the embedded SQLite
    /// database: its client URLs, comma-separated (`https://10.0.0.1:2379,https://...`).
    /// Several krate servers on the same etcd (and the same --ca-cert/--ca-key) serve
    /// the same cluster. Keys are stored under /registry/ as upstream's API server does.
    #[arg(long, value_delimiter = ',')]
    pub datastore_endpoint: Vec<String>,
    /// The CA that signed the etcd members' serving certificates (PEM).
    #[arg(long, requires = "datastore_endpoint")]
    pub datastore_cafile: Option<PathBuf>,
    /// A client certificate for etcd (PEM), with --datastore-keyfile.
    #[arg(long, requires_all = ["datastore_endpoint", "datastore_keyfile"])]
    pub datastore_certfile: Option<PathBuf>,
    /// The key of --datastore-certfile (PEM).
    #[arg(long, requires = "datastore_certfile")]
    pub datastore_keyfile: Option<PathBuf>,
    /// Serve the API only; do not run the built-in controllers and scheduler.
    #[arg(long)]
    pub disable_controllers: bool,
    /// Do not run pods on this machine (no node agent, no containerd): a control plane
    /// only, for nodes that join with `krate agent`.
    #[arg(long)]
    pub disable_agent: bool,
    #[command(flatten)]
    pub agent: crate::agent::AgentOptions,
    #[command(flatten)]
    pub config: crate::config::ConfigArgs,
}

/// The parsed `--authorization-mode`.
#[derive(Clone, Debug)]
pub struct AuthorizationModes(pub Vec<krate_apiserver::authz::Mode>);

fn parse_authorization_mode(text: &str) -> Result<AuthorizationModes, String> {
    krate_apiserver::authz::Mode::parse_list(text).map(AuthorizationModes)
}

pub async fn run(args: ServerArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {} (run as root, or pass --data-dir to a writable place)",
            args.data_dir.display()
        )
    })?;
    let lock_path = args.data_dir.join("server.lock");
    let lock = std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another krate server is already using {} (stop it, or pass a different --data-dir)",
            args.data_dir.display()
        )
    })?;

    // A joining server takes the cluster's keys before anything would make its own.
    let join_endpoints = match (&args.server, &args.certificate_key) {
        (Some(server), Some(key)) if !args.data_dir.join("db/etcd/member").is_dir() => {
            let token =
                args.token.as_deref().unwrap_or_default().parse().map_err(|e| anyhow::anyhow!("--token: {e}"))?;
            let join = crate::join::Join {
                server: server.clone(),
                token: Some(token),
                ca_cert_hashes: args.ca_cert_hashes.clone(),
                unsafe_skip_ca_verification: false,
                node_name: String::new(),
            };
            let pki_dir = args.data_dir.join("pki");
            let endpoints = if pki_dir.join("ca.key").exists() {
                // A join that stopped after taking the keys and before its member
                // started: the endpoints again, from the same cluster.
                eprintln!("fetching the cluster's etcd endpoints from {server} again");
                let fetched = tempfile::tempdir()?;
                let endpoints = crate::serverjoin::download(&join, key, fetched.path()).await?;
                if std::fs::read(fetched.path().join("ca.crt")).ok() != std::fs::read(pki_dir.join("ca.crt")).ok() {
                    anyhow::bail!(
                        "{} holds another cluster's CA than {server}'s: start the joining server with a new --data-dir",
                        args.data_dir.display()
                    );
                }
                endpoints
            } else {
                eprintln!("fetching the cluster's keys from {server}");
                crate::serverjoin::download(&join, key, &pki_dir).await?
            };
            crate::pki::write_private(&pki_dir.join("certificate-key"), key)?;
            Some(endpoints)
        }
        _ => None,
    };
    if let (Some(cert), Some(key)) = (&args.ca_cert, &args.ca_key) {
        crate::pki::Pki::install_ca(&args.data_dir.join("pki"), cert, key).context("--ca-cert and --ca-key")?;
    }
    let pki = crate::pki::Pki::load_or_create(&args.data_dir.join("pki"))?;
    let cluster_cidr = components::cluster_cidr(&args.cluster_cidr, args.node_cidr_mask_size)?;
    let signing_duration = crate::agent::duration(&args.cluster_signing_duration, "--cluster-signing-duration")?;
    let service_network = service_network(&args.service_cidr, &args.service_node_port_range)?;
    let cluster_dns = args.agent.cluster_dns.or_else(|| service_network.cidrs[0].nth(10));

    // Bad agent flags fail before anything starts.
    let agent_config = (!args.disable_agent)
        .then(|| args.agent.config(args.data_dir.join("agent"), Some(pki.ca_cert_pem.clone())))
        .transpose()?
        .map(|mut config| {
            config.dns.cluster_dns = cluster_dns;
            config
        });
    let host = match args.bind_address {
        IpAddr::V4(v4) if v4.is_unspecified() => "127.0.0.1".to_string(),
        ip => ip.to_string(),
    };
    let advertise_ip = match args.advertise_address {
        Some(ip) => ip,
        None if args.bind_address.is_unspecified() => default_advertise_address(),
        None => args.bind_address,
    };
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
        host.clone(),
        advertise_ip.to_string(),
        service_network.kubernetes_ip().to_string(),
    ];
    sans.extend(args.tls_san.iter().cloned());
    sans.dedup();
    let serving = pki.serving_certificate(&sans)?;
    let tls = auth::server_config(&auth::TlsFiles {
        ca_pem: pki.ca_cert_pem.clone(),
        cert_pem: serving.cert_pem,
        key_pem: serving.key_pem,
    })?;

    let member = managed_etcd(&args, &pki, advertise_ip, join_endpoints).await?;
    let store = match &member {
        Some(member) => connect_etcd(&member.datastore().await, &args.data_dir).await?,
        None => open_store(&args).await?,
    };
    if member.is_some() || !args.datastore_endpoint.is_empty() {
        let me = std::net::SocketAddr::new(advertise_ip, args.port);
        krate_apiserver::check_server_versions(&*store, me).await.map_err(anyhow::Error::msg)?;
    }
    let store = encrypted_store(store, &args).await?;
    let advertise = std::net::SocketAddr::new(advertise_ip, args.port).to_string();
    let kubelet_client =
        pki.client_certificate("apiserver-kubelet-client", "kube-apiserver-kubelet-client", &["system:masters"])?;
    let settings = Settings {
        kubelet_client: Some(krate_apiserver::rest::pods::nodeproxy::kubelet_client_config(
            &kubelet_client.cert_pem,
            &kubelet_client.key_pem,
        )?),
        advertise_address: advertise.clone(),
        watch_cache_size: args.watch_cache_size,
        compaction_interval: Duration::from_secs(args.compaction_interval_seconds.max(1)),
        event_ttl: crate::agent::duration(&args.event_ttl, "--event-ttl")?,
        bookmark_interval: Duration::from_secs(args.bookmark_interval_seconds.max(1)),
        service_account_key: pki.service_account_key()?,
        authorization: args.authorization_mode.0.clone(),
        audit: auditor(&args)?,
        front_proxy: Some(pki.front_proxy()?),
        service_network,
        cluster_dns,
        node_registration_allow: args
            .node_registration_allow_cidrs
            .iter()
            .map(|c| c.parse().with_context(|| format!("--node-registration-allow-cidr {c:?} is not a CIDR")))
            .collect::<Result<_>>()?,
        ..Settings::default()
    };
    let server = ApiServer::start(store, settings).await?;
    // The in-process components' cache readiness shows on the API server's /metrics.
    server.metrics.add_source(Box::new(krate_client::caches::render_metrics));
    // The embedded agent's service proxy and DNS responder, under kube-proxy's and
    // CoreDNS's names.
    server.metrics.add_source(Box::new(krate_net::proxy::metrics::render));
    server.metrics.add_source(Box::new(krate_net::dns::metrics::render));
    let listener = tokio::net::TcpListener::bind((args.bind_address, args.port)).await.with_context(|| {
        format!(
            "cannot listen on {}:{} (is another API server running? pick another --port)",
            args.bind_address, args.port
        )
    })?;

    let url = format!("https://{host}:{}", args.port);
    let kubeconfig = args.data_dir.join("admin.kubeconfig");
    pki.write_kubeconfig(&kubeconfig, &url, &pki.admin_certificate()?)?;
    tracing::info!(%url, kubeconfig = %kubeconfig.display(), "krate server is ready");
    println!("krate server is running at {url}");
    println!("Use it with kubectl:");
    println!("    export KUBECONFIG={}", kubeconfig.display());
    println!("    kubectl get namespaces");

    let serving = tokio::spawn(server.clone().serve(listener, tls));
    // What joining nodes discover, and the command they join with: printed once the
    // bootstrap signer (started with the controllers below) has signed cluster-info for
    // the token, so that the command works the moment it shows.
    {
        let admin = kube::Client::new(server.local_service(server_user(), "krate-server"), "default");
        let published = format!("https://{advertise}");
        let ca_pem = pki.ca_bundle_pem();
        let open = args.node_registration == "open";
        // On a managed etcd, other servers may join: the cluster's keys go up sealed.
        let sealing = match &member {
            Some(member) => {
                Some((member.datastore().await, crate::serverjoin::certificate_key(&pki.dir)?, pki.dir.clone()))
            }
            None => None,
        };
        tokio::spawn(async move {
            let joining = async move {
                crate::token::publish_cluster_info(&admin, &published, &ca_pem).await?;
                crate::token::open_registration(&admin, open).await?;
                let token = crate::token::server_token(&admin).await?;
                crate::token::wait_signed(&admin, &token, Duration::from_secs(60)).await?;
                let command = crate::token::join_command(&published, &token, &ca_pem)?;
                let server_command = match sealing {
                    Some((datastore, key, pki_dir)) => {
                        let endpoints = datastore.member_urls().await?;
                        crate::serverjoin::upload(&admin, &pki_dir, &key, &endpoints).await?;
                        Some(crate::serverjoin::join_command(&command, &key))
                    }
                    None => None,
                };
                anyhow::Ok((command, server_command))
            };
            match joining.await {
                Ok((command, server_command)) => {
                    println!("Join more nodes (the token is valid for a day; `krate token create` makes more):");
                    println!("    {command}");
                    if let Some(server_command) = server_command {
                        println!("Join more servers (keep the certificate key secret: it opens the cluster's keys):");
                        println!("    {server_command}");
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "could not publish cluster-info for joining nodes")
                }
            }
        });
    }
    if !args.disable_controllers {
        // One server per data directory (the lock above), so an identity derived from it
        // lets a restarted server take its Leases back without waiting for them to expire.
        let identity = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::canonicalize(&args.data_dir).unwrap_or_else(|_| args.data_dir.clone()).hash(&mut h);
            format!("{}_server-{:016x}", crate::leader::host_name(), h.finish())
        };
        let election = ElectionArgs {
            leader_elect: true,
            leader_elect_lease_duration_seconds: 15,
            leader_elect_identity: Some(identity),
        };
        // In-process components reach the API without TCP and TLS, as the users their
        // stand-alone certificates would name; each controller as its service account.
        let local_client = |user: &str, agent: &'static str| {
            kube::Client::new(server.local_service(component_user(user), agent), "default")
        };
        let controllers = ControllerSettings {
            node_monitor_grace_period_seconds: args.node_monitor_grace_period_seconds,
            terminated_pod_gc_threshold: 12_500,
            election: election.clone(),
        };
        let clients = {
            let server = server.clone();
            let manager = component_user("system:kube-controller-manager");
            const AGENT: &str = "kube-controller-manager/v1.37.0 (krate)";
            krate_controllers::Clients::per_controller(move |account| {
                let service = match account {
                    None => server.local_service(manager.clone(), AGENT),
                    Some(account) => server.local_service_listing_as(
                        auth::User::service_account("kube-system", account),
                        manager.clone(),
                        AGENT,
                    ),
                };
                kube::Client::new(service, "default")
            })
        };
        let root_ca_pem = pki.ca_cert_pem.clone();
        let signing = krate_controllers::certificates::SigningCa {
            cert_pem: pki.ca_cert_pem.clone(),
            key_pem: pki.ca_key_pem(),
            duration: signing_duration,
        };
        let approve_joins = args.node_registration != "approve";
        let config = controllers.config(root_ca_pem, Some(signing), approve_joins, Some(cluster_cidr));
        tokio::spawn(async move {
            if let Err(err) = components::controller_manager(clients, config, &controllers.election).await {
                tracing::error!(error = %format!("{err:#}"), "controllers stopped");
            }
        });
        let scheduler = SchedulerSettings { scheduler_name: krate_scheduler::DEFAULT_SCHEDULER.into(), election };
        let client = local_client("system:kube-scheduler", "kube-scheduler/v1.37.0 (krate)");
        tokio::spawn(async move {
            if let Err(err) = components::scheduler(client, &scheduler).await {
                tracing::error!(error = %format!("{err:#}"), "scheduler stopped");
            }
        });
    }

    if let Some(config) = agent_config {
        let user = auth::User {
            name: format!("system:node:{}", config.node.name),
            groups: vec!["system:nodes".to_string(), "system:authenticated".to_string()],
            ..Default::default()
        };
        let clients = krate_agent::Clients {
            node: kube::Client::new(server.local_service(user, "kubelet/v1.37.0 (krate)"), "default"),
            // The service proxy and DNS as kube-proxy's user (role system:node-proxier).
            network: kube::Client::new(
                server.local_service(component_user("system:kube-proxy"), "kube-proxy/v1.37.0 (krate)"),
                "default",
            ),
        };
        // The server's own node carries upstream's control-plane role (set by the server,
        // as kubeadm does: node restriction keeps nodes from giving themselves roles).
        let admin = kube::Client::new(server.local_service(server_user(), "krate-server"), "default");
        let name = config.node.name.clone();
        tokio::spawn(async move {
            let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(admin);
            let label = serde_json::json!({"metadata": {"labels": {CONTROL_PLANE_ROLE: ""}}});
            for _ in 0..120 {
                let patch = kube::api::Patch::Merge(&label);
                if nodes.patch(&name, &kube::api::PatchParams::default(), &patch).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tracing::warn!(node = %name, "could not label this server's node as control-plane");
        });
        tokio::spawn(async move {
            if let Err(err) = krate_agent::run(clients, config).await {
                tracing::error!(error = %format!("{err:#}"), "the node agent stopped; this server runs no pods (pass --disable-agent to run a control plane only)");
            }
        });
    }

    tokio::select! {
        result = serving => result.context("the API server task failed")?,
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

/// Holds `<data-dir>/server.lock` (if a server ever ran there) for a command that must
/// not run beside a server on the same data directory; fails while one runs.
pub fn lock_stopped(data_dir: &std::path::Path) -> Result<Option<std::fs::File>> {
    let Ok(lock) = std::fs::File::open(data_dir.join("server.lock")) else { return Ok(None) };
    if lock.try_lock().is_err() {
        anyhow::bail!("a krate server is running on {}; stop it first", data_dir.display());
    }
    Ok(Some(lock))
}

/// The etcd member this server runs (with --cluster-init, or when its data directory
/// already holds one), started and supervised.
async fn managed_etcd(
    args: &ServerArgs,
    pki: &crate::pki::Pki,
    advertise: IpAddr,
    join_endpoints: Option<Vec<String>>,
) -> Result<Option<crate::etcd::Supervised>> {
    let dir = args.data_dir.join("db/etcd");
    let member = || crate::etcd::member_config(&dir, pki, advertise, args.etcd_client_port, args.etcd_peer_port);
    if let Some(endpoints) = join_endpoints.filter(|e| !e.is_empty()) {
        let member = member()?;
        eprintln!("joining etcd at {} as member {}", endpoints.join(","), member.name);
        return Ok(Some(crate::etcd::join_member(member, &endpoints).await?));
    }
    if !args.cluster_init && !dir.join("member").is_dir() {
        return Ok(None);
    }
    if args.cluster_init && args.data_dir.join("db/state.db").exists() {
        anyhow::bail!(
            "{} holds a SQLite cluster: --cluster-init starts a new etcd one (move the data directory aside, \
             or run without --cluster-init)",
            args.data_dir.display()
        );
    }
    let member = member()?;
    eprintln!("starting the etcd member {} (client {}, peer {})", member.name, member.client_url, member.peer_url);
    let supervised = crate::etcd::Supervised::start(member).await?;
    crate::etcd::finish_restore(&args.data_dir, &supervised.datastore().await)
        .await
        .context("finishing the restore of an etcd backup")?;
    Ok(Some(supervised))
}

/// The embedded SQLite database under the data directory, or the etcd cluster of
/// --datastore-endpoint.
async fn open_store(args: &ServerArgs) -> Result<Arc<dyn krate_store::Store>> {
    if args.datastore_endpoint.is_empty() {
        let db_dir = args.data_dir.join("db");
        std::fs::create_dir_all(&db_dir)?;
        let store = SqliteStore::open(db_dir.join("state.db")).context("opening the database")?;
        crate::etcd::Datastore::forget(&args.data_dir)?;
        return Ok(Arc::new(store));
    }
    let absolute = |p: &Option<PathBuf>| p.as_deref().map(std::path::absolute).transpose();
    let datastore = crate::etcd::Datastore {
        endpoints: args.datastore_endpoint.clone(),
        ca_file: absolute(&args.datastore_cafile)?,
        cert_file: absolute(&args.datastore_certfile)?,
        key_file: absolute(&args.datastore_keyfile)?,
        managed: false,
        member: None,
        cluster: Vec::new(),
    };
    connect_etcd(&datastore, &args.data_dir).await
}

/// Connects to etcd and records where it is, for `krate doctor` and `krate backup`.
async fn connect_etcd(
    datastore: &crate::etcd::Datastore,
    data_dir: &std::path::Path,
) -> Result<Arc<dyn krate_store::Store>> {
    // A member that just started may still be electing a leader: a little patience.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let store = loop {
        match datastore.connect().await {
            Ok(store) => break store,
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::info!(error = %format!("{e:#}"), "waiting for etcd");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    };
    // Where the other members are, for `krate reset` to leave them later.
    let mut record = datastore.clone();
    if let Ok(status) = store.status().await {
        record.cluster = status.client_urls();
    }
    record.save(data_dir)?;
    let endpoints = datastore.endpoints.join(",");
    tracing::info!(%endpoints, "using etcd as the datastore");
    Ok(Arc::new(store))
}

/// The database behind encryption at rest (see `--encryption-provider-config`): every
/// stored value is checked readable and the ones not under the writing key are
/// rewritten before the server starts.
async fn encrypted_store(store: Arc<dyn krate_store::Store>, args: &ServerArgs) -> Result<Arc<dyn krate_store::Store>> {
    use krate_apiserver::encryption::{self, EncryptedStore};
    let path = match &args.encryption_provider_config {
        Some(path) => path.clone(),
        None => {
            let path = args.data_dir.join("pki/encryption-config.yaml");
            if !path.exists() {
                crate::pki::write_private(&path, &encryption::generated_config())?;
                tracing::info!(path = %path.display(), "generated a key for encrypting Secrets at rest");
            }
            path
        }
    };
    let encrypted = EncryptedStore::open(store, &path).context("loading the encryption configuration")?;
    let rewritten = encrypted.rewrite_stale().await.map_err(|e| {
        anyhow::anyhow!("{e}\nThe database holds values the encryption configuration {} cannot read: start with the configuration (and keys) that wrote them.", path.display())
    })?;
    if rewritten > 0 {
        tracing::info!(rewritten, writer = %encrypted.secrets_writer(), "stored values re-encrypted");
    }
    encrypted.write_status(rewritten);
    encrypted.clone().watch_config();
    Ok(encrypted)
}

/// The audit log of `--audit-policy-file` and `--audit-log-path`, if asked for.
fn auditor(args: &ServerArgs) -> Result<Option<Arc<krate_apiserver::audit::Auditor>>> {
    use krate_apiserver::audit::{Auditor, LogFile, Policy};
    let (Some(policy), Some(path)) = (&args.audit_policy_file, &args.audit_log_path) else { return Ok(None) };
    let policy = Policy::load(policy).context("loading --audit-policy-file")?;
    let log = LogFile {
        path: path.clone(),
        max_size_mb: args.audit_log_maxsize,
        max_backups: args.audit_log_maxbackup,
        max_age_days: args.audit_log_maxage,
    };
    Ok(Some(Arc::new(Auditor::start(policy, log)?)))
}

/// The server's own writes (cluster-info, its join token) as an in-process admin.
fn server_user() -> auth::User {
    let mut user = component_user("system:apiserver");
    user.groups.insert(0, "system:masters".to_string());
    user
}

/// A component's user as its client certificate would name it.
fn component_user(name: &str) -> auth::User {
    auth::User { name: name.to_string(), groups: vec!["system:authenticated".to_string()], ..Default::default() }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The service network of `--service-cidr` and `--service-node-port-range`.
fn service_network(cidrs: &str, ports: &str) -> Result<krate_apiserver::rest::services::ServiceNetwork> {
    let cidrs: Vec<krate_net::Cidr> = cidrs
        .split(',')
        .map(|c| c.trim().parse().with_context(|| format!("--service-cidr {c:?}")))
        .collect::<Result<_>>()?;
    if cidrs.is_empty() || cidrs.len() > 2 || (cidrs.len() == 2 && cidrs[0].is_ipv4() == cidrs[1].is_ipv4()) {
        anyhow::bail!("--service-cidr takes one range, or two of different IP families");
    }
    if let Some(small) = cidrs.iter().find(|c| c.host_bits() < 3) {
        anyhow::bail!("--service-cidr {small} is too small: a service range needs at least 8 addresses");
    }
    let (low, high) = ports
        .split_once('-')
        .and_then(|(l, h)| Some((l.trim().parse::<u16>().ok()?, h.trim().parse::<u16>().ok()?)))
        .filter(|(l, h)| l <= h && *l > 0)
        .with_context(|| format!("--service-node-port-range {ports:?} must look like 30000-32767"))?;
    Ok(krate_apiserver::rest::services::ServiceNetwork { cidrs, node_ports: low..=high, ..Default::default() })
}

/// The address a server advertises unless told (`--advertise-address`): its primary
/// address, else loopback. Commands that prepare a data directory for a server
/// (`krate restore`, `krate datastore migrate`) default to it too.
pub fn default_advertise_address() -> IpAddr {
    primary_address().unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// The address this machine's default route leaves from (no packet is sent: connecting
/// a UDP socket only picks the route).
fn primary_address() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

//! krate's Kubernetes-compatible API server.
//!
//! Request flow: TLS accept ([`auth`]) → [`http::handle`] (request attributes,
//! [`authz`], routing, negotiation, body decoding) → [`registry::Storage`] (the one
//! generic create/get/list/update/patch/delete path, with [`admission`]; per-kind
//! behaviour from `krate_api::kinds` and, where it needs the store or the server, from
//! [`rest`]) → [`krate_store::Store`] for writes; reads and watches come from the
//! [`cache::WatchCache`], which follows the store.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper_util::rt::{TokioExecutor, TokioIo};
use krate_api::kinds::Registry;
use krate_store::Store;
use serde_json::{json, Value};
use tokio::net::TcpListener;

pub mod admission;
pub mod aggregator;
pub mod audit;
pub mod auth;
pub mod authz;
mod bootstraptoken;
pub mod cache;
mod controlplane;
pub use controlplane::check_server_versions;
pub mod crd;
pub mod encryption;
mod expiry;
#[cfg(test)]
mod fuzz;
pub mod http;
pub mod limitranger;
pub mod metrics;
pub mod podsecurity;
pub mod policy;
pub mod rbac;
pub mod registry;
pub mod request;
pub mod rest;
pub mod webhook;

#[cfg(test)]
pub(crate) mod testing;

use cache::WatchCache;
use registry::Storage;

/// Tunables of a running API server.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where bootstrap tokens may request node certificates from (`--node-registration-
    /// allow-cidr`); empty: anywhere.
    pub node_registration_allow: Vec<krate_net::cidr::Cidr>,
    /// The address clients are told to use (discovery's serverAddressByClientCIDRs).
    pub advertise_address: String,
    /// How often watches with `allowWatchBookmarks` get a bookmark.
    pub bookmark_interval: Duration,
    /// Watches without `timeoutSeconds` last between this and twice this.
    pub min_request_timeout: Duration,
    /// Events kept per resource for watches that resume from a resourceVersion.
    pub watch_cache_size: usize,
    /// How often history older than the previous interval is compacted.
    pub compaction_interval: Duration,
    /// How long an Event lives after its last write (`--event-ttl`).
    pub event_ttl: Duration,
    /// TLS client configuration for reaching node agents (`pods/log`); None: not possible.
    pub kubelet_client: Option<Arc<rustls::ClientConfig>>,
    /// What service-account tokens are signed under: an ECDSA P-256 key in PKCS#8 DER,
    /// shared by every server of a cluster so each accepts the others' tokens.
    pub service_account_key: Vec<u8>,
    /// Who may do what (`--authorization-mode`): asked in order for every request,
    /// after `system:masters`.
    pub authorization: Vec<authz::Mode>,
    /// The admission plugins every write passes through.
    pub admission: admission::Chain,
    /// Stateful per-kind hooks beyond the built-in ones (tests add their own).
    pub hooks: rest::HookTable,
    /// Service cluster IPs and node ports.
    pub service_network: rest::services::ServiceNetwork,
    /// The cluster DNS address: the `kube-dns` Service in kube-system gets it.
    pub cluster_dns: Option<std::net::IpAddr>,
    /// The audit log (`--audit-policy-file`, `--audit-log-path`); None: no auditing.
    pub audit: Option<Arc<audit::Auditor>>,
    /// The front proxy's certificates for extension API servers; None: requests to them
    /// carry no client certificate and no authentication ConfigMap is published.
    pub front_proxy: Option<aggregator::FrontProxy>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            node_registration_allow: Vec::new(),
            advertise_address: "127.0.0.1:6443".into(),
            bookmark_interval: Duration::from_secs(60),
            min_request_timeout: Duration::from_secs(1800),
            watch_cache_size: 10_000,
            compaction_interval: Duration::from_secs(300),
            event_ttl: Duration::from_secs(3600),
            kubelet_client: None,
            service_account_key: rest::serviceaccounts::tokens::generate_key(),
            authorization: vec![authz::Mode::AlwaysAllow],
            admission: admission::Chain::default(),
            hooks: rest::HookTable::default(),
            service_network: Default::default(),
            cluster_dns: None,
            audit: None,
            front_proxy: None,
        }
    }
}

pub struct ApiServer {
    pub storage: Storage,
    /// The authorizers of `Settings::authorization`, asked for every request.
    pub authorizer: Arc<authz::Chain>,
    pub documents: http::docs::Documents,
    pub settings: Settings,
    pub metrics: metrics::Metrics,
    pub tokens: rest::serviceaccounts::tokens::Tokens,
    /// Reserves the Services' cluster IPs and node ports.
    pub allocator: Arc<rest::services::Allocator>,
    /// APIServices: which group/versions extension API servers answer.
    pub aggregator: aggregator::Aggregator,
    /// The node agents' usage scraped for metrics.k8s.io.
    pub resource_metrics: rest::resourcemetrics::Scraper,
    /// This process's identity among the API servers of the cluster (a UUID).
    pub identity: String,
}

/// Namespaces every cluster starts with.
const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Field-selector paths per store prefix, from every served kind that stores there.
fn field_paths(kinds: &Registry) -> cache::FieldPaths {
    let mut map: HashMap<String, Vec<krate_api::kinds::SelectableField>> = HashMap::new();
    for k in kinds.kinds() {
        let entry = map.entry(registry::storage_prefix(k)).or_default();
        for field in k.field_selectors.iter() {
            if !entry.iter().any(|f| f.label == field.label) {
                entry.push(*field);
            }
        }
    }
    Arc::new(move |prefix: &str| map.get(prefix).cloned().unwrap_or_default())
}

impl ApiServer {
    /// Loads the watch cache from `store`, creates the system namespaces and starts
    /// background compaction.
    pub async fn start(store: Arc<dyn Store>, settings: Settings) -> anyhow::Result<Arc<Self>> {
        let kinds = Arc::new(Registry::builtin());
        let cache = WatchCache::start(store.clone(), settings.watch_cache_size, field_paths(&kinds)).await?;
        let allocator = rest::services::Allocator::new(settings.service_network.clone());
        let mut hooks = settings.hooks.clone();
        hooks.register::<k8s_openapi::api::core::v1::Service>(allocator.clone());
        hooks.register::<k8s_openapi::api::certificates::v1::CertificateSigningRequest>(Arc::new(rest::CsrHooks {
            allow: settings.node_registration_allow.clone(),
        }));
        let modes = &settings.authorization;
        let rbac = modes.iter().any(|m| matches!(m, authz::Mode::Rbac)).then(|| rbac::Rbac::new(cache.clone()));
        let node = modes
            .iter()
            .any(|m| matches!(m, authz::Mode::Node))
            .then(|| rbac::node::NodeAuthorizer::new(cache.clone()) as Arc<dyn authz::Authorizer>);
        let authorizer = Arc::new(authz::Chain::of(modes, rbac.clone().map(|r| r as Arc<dyn authz::Authorizer>), node));
        if let Some(rbac) = &rbac {
            rbac::escalation::register(&mut hooks, rbac.clone(), authorizer.clone());
        }
        let signers = Arc::new(rest::PodCertificateHooks { authorizer: authorizer.clone() });
        hooks.register::<k8s_openapi::api::certificates::v1::PodCertificateRequest>(signers);
        let server = Arc::new(Self {
            authorizer,
            storage: Storage::new(store, cache, kinds, settings.admission.clone(), hooks),
            allocator,
            documents: Default::default(),
            aggregator: Default::default(),
            resource_metrics: Default::default(),
            identity: registry::uuid_v4(),
            tokens: rest::serviceaccounts::tokens::Tokens::new(&settings.service_account_key)?,
            settings,
            metrics: metrics::Metrics::new(),
        });
        server.bootstrap().await?;
        let repaired = server
            .allocator
            .repair(&server.storage)
            .await
            .map_err(|e| anyhow::anyhow!("repairing service allocations: {e}"))?;
        if repaired != Default::default() {
            tracing::info!(claimed = repaired.claimed, released = repaired.released, "service allocations repaired");
        }
        server.clone().start_control_plane_loops();
        crd::start(server.clone()).await;
        aggregator::start(server.clone());
        server.clone().start_compactor();
        server.clone().start_event_expiry();
        Ok(server)
    }

    pub fn kinds(&self) -> Arc<Registry> {
        self.storage.kinds()
    }

    /// Replaces the served kinds (custom resources came or went), and the fields the
    /// cache keeps for field selectors with them.
    pub fn set_kinds(&self, kinds: Registry) {
        self.storage.cache.set_field_paths(field_paths(&kinds));
        self.storage.set_kinds(kinds)
    }

    /// Creates whichever of the system namespaces is missing.
    async fn ensure_system_namespaces(&self) -> anyhow::Result<()> {
        let namespaces = self.storage.builtin::<k8s_openapi::api::core::v1::Namespace>(None);
        for ns in SYSTEM_NAMESPACES {
            self.storage
                .ensure(&namespaces, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
                .await
                .map_err(|e| anyhow::anyhow!("creating namespace {ns}: {e}"))?;
        }
        Ok(())
    }

    async fn bootstrap(&self) -> anyhow::Result<()> {
        self.ensure_system_namespaces().await?;
        let classes = self.storage.builtin::<k8s_openapi::api::scheduling::v1::PriorityClass>(None);
        for (name, value, description) in admission::SYSTEM_PRIORITY_CLASSES {
            let class = json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}, "value": value, "description": description});
            self.storage
                .ensure(&classes, class)
                .await
                .map_err(|e| anyhow::anyhow!("creating priority class {name}: {e}"))?;
        }
        self.bootstrap_services().await.map_err(|e| anyhow::anyhow!("creating the kubernetes Service: {e}"))?;
        if self.settings.authorization.iter().any(|m| matches!(m, authz::Mode::Rbac)) {
            rbac::bootstrap::reconcile(&self.storage).await?;
        }
        Ok(())
    }

    /// Every interval, compacts history up to the revision seen one interval earlier, so
    /// clients always have at least one interval to resume watches and pages.
    fn start_compactor(self: Arc<Self>) {
        let interval = self.settings.compaction_interval;
        tokio::spawn(async move {
            let mut previous = None;
            loop {
                tokio::time::sleep(interval).await;
                if let Some(rev) = previous {
                    match self.storage.store.compact(rev).await {
                        Ok(()) => {
                            self.storage.cache.compacted(rev);
                            tracing::debug!(revision = rev, "compacted storage history");
                        }
                        Err(err) => tracing::warn!(error = %err, "compaction failed"),
                    }
                }
                previous = self.storage.store.current_revision().await.ok();
            }
        });
    }

    async fn health(&self, check: &str, verbose: bool) -> axum::http::Response<Body> {
        let store_ok = self.storage.store.current_revision().await.is_ok();
        let cache_ok = check != "readyz" || self.storage.cache.sync().await;
        let ok = store_ok && cache_ok;
        let body = if verbose {
            let mark = |b: bool| if b { "ok" } else { "failed" };
            format!(
                "[+]ping ok\n[{}]etcd {}\n[{}]watch-cache {}\n{check} check {}\n",
                if store_ok { "+" } else { "-" },
                mark(store_ok),
                if cache_ok { "+" } else { "-" },
                mark(cache_ok),
                if ok { "passed" } else { "failed" }
            )
        } else if ok {
            "ok".to_string()
        } else {
            format!("{check} check failed")
        };
        http::bytes_response(if ok { 200 } else { 500 }, body.into(), "text/plain; charset=utf-8")
    }

    /// Accepts TLS connections on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) -> anyhow::Result<()> {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let server = self.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let user = auth::User::from_peer(stream.get_ref().1.peer_certificates());
                let service = hyper::service::service_fn(move |mut req: ::http::Request<hyper::body::Incoming>| {
                    let server = server.clone();
                    let user = user.clone();
                    req.extensions_mut().insert(auth::SourceIp(peer.ip()));
                    async move { Ok::<_, Infallible>(http::handle(server, user, req.map(Body::new)).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(err) = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
            });
        }
    }
}

/// An HTTP service that hands requests straight to the API server as `user`, without
/// TCP or TLS: how components running inside `krate server` (controllers, scheduler)
/// reach it. `user_agent` fills in for clients that send none (managedFields names the
/// manager after it).
#[derive(Clone)]
pub struct LocalService {
    server: Arc<ApiServer>,
    user: auth::User,
    /// Who lists and watches, when not `user` (see `local_service_listing_as`).
    lister: Option<auth::User>,
    user_agent: ::http::HeaderValue,
}

impl ApiServer {
    pub fn local_service(self: &Arc<Self>, user: auth::User, user_agent: &'static str) -> LocalService {
        LocalService {
            server: self.clone(),
            user,
            lister: None,
            user_agent: ::http::HeaderValue::from_static(user_agent),
        }
    }

    /// Like `local_service`, but lists and watches go as `lister`: how a controller of
    /// upstream's controller manager reads through the manager's shared informers
    /// (`system:kube-controller-manager` may list and watch everything) while it writes
    /// (and gets single objects) as its own service account.
    pub fn local_service_listing_as(
        self: &Arc<Self>,
        user: auth::User,
        lister: auth::User,
        user_agent: &'static str,
    ) -> LocalService {
        LocalService { lister: Some(lister), ..self.local_service(user, user_agent) }
    }
}

/// A GET of a collection (a list or a watch).
pub fn reads_collection<B>(req: &::http::Request<B>) -> bool {
    req.method() == ::http::Method::GET
        && matches!(http::route::parse_path(req.uri().path()), http::route::Route::Resource(r) if r.name.is_none())
}

impl<B> tower::Service<::http::Request<B>> for LocalService
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = ::http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: ::http::Request<B>) -> Self::Future {
        req.headers_mut().entry(::http::header::USER_AGENT).or_insert_with(|| self.user_agent.clone());
        let user = match &self.lister {
            Some(lister) if reads_collection(&req) => lister.clone(),
            _ => self.user.clone(),
        };
        let server = self.server.clone();
        Box::pin(async move { Ok(http::handle(server, user, req.map(Body::new)).await) })
    }
}

/// Where the running binary came from. The `krate` binary sets it at start from its
/// build (the `krate-version` crate, kept out of the libraries so that its build script,
/// which reruns on every change to the tree, rebuilds only the binary); a server started
/// without it (tests) reports the workspace's version.
#[derive(Clone, Debug)]
pub struct BuildInfo {
    /// krate's own version, `git describe` form (`v0.1-13-g4567bcdef6789a-dirty`).
    pub version: &'static str,
    pub commit: &'static str,
    pub tree_state: &'static str,
    pub build_date: &'static str,
}

static BUILD: std::sync::OnceLock<BuildInfo> = std::sync::OnceLock::new();

/// Records this process's build; the first call wins.
pub fn set_build_info(info: BuildInfo) {
    let _ = BUILD.set(info);
}

pub fn build_info() -> &'static BuildInfo {
    BUILD.get_or_init(|| BuildInfo {
        version: concat!("v", env!("CARGO_PKG_VERSION")),
        commit: "",
        tree_state: "",
        build_date: "1970-01-01T00:00:00Z",
    })
}

/// The Kubernetes version whose API krate serves.
pub const KUBERNETES_VERSION: &str = "v1.37.0";

/// `/version`: the Kubernetes major and minor clients decide by, and krate's own build
/// in `gitVersion`'s semver build metadata (`v1.37.0+krate-v0.1-13-g4567bcdef6789a`, as
/// k3s carries its own) and in the commit, tree state and date fields.
pub fn version_info() -> Value {
    let build = build_info();
    json!({
        "major": "1",
        "minor": "37",
        "emulationMajor": "1",
        "emulationMinor": "37",
        "gitVersion": format!("{KUBERNETES_VERSION}+krate-{}", build.version),
        "gitCommit": build.commit,
        "gitTreeState": build.tree_state,
        "buildDate": build.build_date,
        "goVersion": "n/a (rust)",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, if std::env::consts::ARCH == "x86_64" { "amd64" } else { std::env::consts::ARCH }),
    })
}

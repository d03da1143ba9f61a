//! How `krate agent --server URL --token ID.SECRET --ca-cert-hash sha256:...` gets into
//! a cluster, as kubeadm's token discovery and the kubelet's TLS bootstrap:
//!
//! 1. **Discovery**: read `kube-public/cluster-info` anonymously without trusting the
//!    server yet; its detached JWS for the token's ID must verify under the token's
//!    secret (so the ConfigMap came from a server that knows the token), and the CA
//!    bundle it carries must hold a certificate whose public key matches a pinned hash
//!    (so the CA is the cluster's, not a man in the middle's). Then read it again over
//!    TLS verified with that CA and require the same content.
//! 2. **TLS bootstrap**: with the token, ask for a client certificate for
//!    `system:node:<name>` (a CSR for `kubernetes.io/kube-apiserver-client-kubelet`,
//!    approved automatically for tokens of the default node group, or by an admin),
//!    and wait until it is signed.
//! 3. The key, the certificate and a kubeconfig with them stay in the agent's
//!    directory: a restarted agent uses them without the token, and the agent renews
//!    the certificate with itself before it expires (see [`Rotation`]).
//! 4. The node's networking gets an identity of its own, `system:krate:network:<name>`
//!    in `system:krate:networks` (a `kube-apiserver-client` CSR the node asks for,
//!    approved for exactly that name): NetworkPolicy must see every pod, which the node
//!    authorizer rightly keeps from the node's own identity.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use krate_client::bootstrap::{self, Token};
use krate_client::csr;
use kube::api::Api;

/// What joining needs.
pub struct Join {
    pub server: String,
    pub token: Option<Token>,
    pub ca_cert_hashes: Vec<String>,
    pub unsafe_skip_ca_verification: bool,
    pub node_name: String,
}

/// Where the agent keeps its credentials.
pub struct Credentials {
    pub kubeconfig: PathBuf,
    key: PathBuf,
    cert: PathBuf,
}

impl Credentials {
    pub fn in_dir(dir: &Path) -> Self {
        Credentials {
            kubeconfig: dir.join("kubelet.kubeconfig"),
            key: dir.join("pki/kubelet-client.key"),
            cert: dir.join("pki/kubelet-client.crt"),
        }
    }

    /// The networking identity's.
    pub fn network_in_dir(dir: &Path) -> Self {
        Credentials {
            kubeconfig: dir.join("network.kubeconfig"),
            key: dir.join("pki/network-client.key"),
            cert: dir.join("pki/network-client.crt"),
        }
    }

    /// Stores `cert` (of `user`, for `key`) and a kubeconfig with it for the server and
    /// CA of the kubeconfig at `like`.
    fn store(&self, like: &Path, cert: &str, key: &rcgen::KeyPair, user: &str) -> Result<()> {
        let ca_pem = crate::components::cluster_ca_pem(like)?;
        let stored = kube::config::Kubeconfig::read_from(like)?;
        let server = stored.clusters.first().and_then(|c| c.cluster.as_ref()?.server.clone()).unwrap_or_default();
        std::fs::write(&self.cert, cert)?;
        crate::pki::write_private(&self.kubeconfig, &kubeconfig(&server, &ca_pem, cert, key, user)?)
    }

    /// The stored kubeconfig, while its certificate has not expired.
    fn valid(&self) -> Option<&Path> {
        let (_, expires) = csr::renewal_time(&self.cert).ok()?;
        (expires > jiff::Timestamp::now() && self.kubeconfig.exists()).then_some(self.kubeconfig.as_path())
    }
}

/// Whose certificate: the node's, or its networking's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    Node,
    Network,
}

impl Identity {
    fn user(self, node: &str) -> String {
        match self {
            Identity::Node => format!("system:node:{node}"),
            Identity::Network => csr::network_user(node),
        }
    }

    fn request(self, node: &str) -> csr::Request<'_> {
        let (signer, organization, generate_name) = match self {
            Identity::Node => (csr::KUBELET_CLIENT, "system:nodes", "node-csr-"),
            Identity::Network => (csr::APISERVER_CLIENT, csr::NETWORK_GROUP, "network-csr-"),
        };
        csr::Request {
            signer,
            node,
            common_name: self.user(node),
            organization,
            dns_names: vec![],
            ips: vec![],
            usages: &["digital signature", "client auth"],
            generate_name,
        }
    }
}

/// A client of `server` that trusts nothing yet and presents nothing.
fn insecure_client(server: &str) -> Result<kube::Client> {
    let mut config = kube::Config::new(server.parse().with_context(|| format!("--server {server:?} is not a URL"))?);
    config.accept_invalid_certs = true;
    Ok(kube::Client::try_from(config)?)
}

/// A client of `server` that trusts `ca_pem`, as the token's user (or nobody).
pub(crate) fn verified_client(server: &str, ca_pem: &str, token: Option<&Token>) -> Result<kube::Client> {
    let mut config = kube::Config::new(server.parse()?);
    config.root_cert = Some(bootstrap::pem_certificates(ca_pem));
    if let Some(token) = token {
        config.auth_info.token = Some(token.to_string().into());
    }
    Ok(kube::Client::try_from(config)?)
}

async fn cluster_info(client: kube::Client) -> Result<ConfigMap> {
    let api: Api<ConfigMap> = Api::namespaced(client, bootstrap::CLUSTER_INFO_NAMESPACE);
    api.get(bootstrap::CLUSTER_INFO).await.map_err(|e| match e {
        kube::Error::Api(e) if e.code == 404 => {
            anyhow::anyhow!(
                "the server has no {}/{}: is it a krate (or kubeadm) cluster?",
                bootstrap::CLUSTER_INFO_NAMESPACE,
                bootstrap::CLUSTER_INFO
            )
        }
        kube::Error::Api(e) if e.code == 401 || e.code == 403 => {
            anyhow::anyhow!("the server does not let anonymous users read cluster-info ({})", e.message)
        }
        e => anyhow::Error::new(e).context("reading cluster-info"),
    })
}

/// The CA bundle (PEM) of the cluster behind `join.server`, checked as the module says
/// (without a token, for `--node-registration open`, only against the CA pin).
pub async fn discover(join: &Join, token: Option<&Token>) -> Result<String> {
    let info = cluster_info(insecure_client(&join.server)?).await?;
    let data = info.data.unwrap_or_default();
    let kubeconfig = data.get(bootstrap::KUBECONFIG_KEY).context("cluster-info carries no kubeconfig")?;
    if let Some(token) = token {
        let jws = data.get(&format!("{}{}", bootstrap::JWS_PREFIX, token.id)).with_context(|| {
            format!("cluster-info is not signed for token ID {:?}: the token does not exist, has expired or is not for signing (`krate token list` on the server)", token.id)
        })?;
        if !bootstrap::verify_detached(kubeconfig, jws, token) {
            bail!("cluster-info's signature for token ID {:?} does not match the token's secret: a wrong token, or a server that is not the cluster's", token.id);
        }
    }
    let (_, ca_pem) = bootstrap::read_cluster_info_kubeconfig(kubeconfig)?;
    let hashes: Vec<String> =
        bootstrap::pem_certificates(&ca_pem).iter().map(|der| bootstrap::ca_cert_hash(der)).collect::<Result<_>>()?;
    if hashes.is_empty() {
        bail!("cluster-info carries no CA certificate");
    }
    if join.unsafe_skip_ca_verification {
        tracing::warn!(ca = ?hashes, "trusting the CA cluster-info names without checking its hash (--unsafe-skip-ca-verification): anyone who knows the token could pose as the cluster");
    } else if !hashes.iter().any(|h| join.ca_cert_hashes.iter().any(|pin| pin.eq_ignore_ascii_case(h))) {
        bail!(
            "the cluster's CA is not the pinned one: its public key hash is {}, --ca-cert-hash says {}; refusing to join (a server with another CA, or a wrong hash: `krate token create --print-join-command` on the server prints the right one)",
            hashes.join(", "),
            join.ca_cert_hashes.join(", ")
        );
    }
    // The same content over TLS verified with that CA.
    let again = cluster_info(verified_client(&join.server, &ca_pem, None)?)
        .await
        .context("reading cluster-info again over verified TLS")?;
    if again.data.unwrap_or_default().get(bootstrap::KUBECONFIG_KEY) != Some(kubeconfig) {
        bail!("cluster-info changed between reading it unverified and verified; try again");
    }
    Ok(ca_pem)
}

/// [`discover`], tried again for a minute while the server cannot be reached or drops the
/// connection (it may be starting, or busy), as kubeadm's discovery retries; a refusal
/// (wrong token, CA, signature) ends it at once.
async fn discover_patiently(join: &Join, token: Option<&Token>) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match discover(join, token).await {
            Err(e) if std::time::Instant::now() < deadline && transport_error(&e) => {
                println!("cannot reach {} yet ({e:#}); trying again", join.server);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            result => return result,
        }
    }
}

/// Whether `e` is the connection's failing rather than the server's answer.
fn transport_error(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(cause.downcast_ref::<kube::Error>(), Some(kube::Error::Service(_) | kube::Error::HyperError(_)))
    })
}

/// A kubeconfig for `server` with the CA and a client certificate of `user`.
fn kubeconfig(server: &str, ca_pem: &str, cert_pem: &str, key: &rcgen::KeyPair, user: &str) -> Result<String> {
    let leaf = crate::pki::Leaf { cert_pem: cert_pem.to_string(), key_pem: key.serialize_pem() };
    crate::pki::client_kubeconfig(server, ca_pem, &leaf, user)
}

/// Makes sure `creds` hold the networking identity's kubeconfig: the stored one while
/// valid, else a new one the node asks for with `node_client`, for the server and CA of
/// `node_kubeconfig`.
pub async fn network_credentials(
    node_client: &kube::Client,
    node_kubeconfig: &Path,
    creds: &Credentials,
    node: &str,
) -> Result<()> {
    if creds.valid().is_some() {
        return Ok(());
    }
    let key = csr::key_pair(&creds.key)?;
    let what = Identity::Network.request(node);
    let request = csr::request(node_client, &key, &what);
    let cert = tokio::time::timeout(Duration::from_secs(60), request)
        .await
        .context("the networking identity's certificate was not issued within a minute")??;
    creds.store(node_kubeconfig, &cert, &key, &Identity::Network.user(node))
}

/// The kubeconfig the agent runs with: the stored one while its certificate is valid,
/// otherwise a new one through discovery and TLS bootstrap with the token.
pub async fn credentials(join: &Join, creds: &Credentials) -> Result<PathBuf> {
    if creds.cert.exists() {
        match creds.valid() {
            Some(path) => {
                tracing::info!(kubeconfig = %path.display(), "using the stored client certificate");
                return Ok(path.to_path_buf());
            }
            None => tracing::warn!("the stored client certificate has expired; joining again with the token"),
        }
    }
    // Without a token the request goes as an anonymous user: only a server with
    // `--node-registration open` lets that in.
    let token = join.token.as_ref();
    if join.ca_cert_hashes.is_empty() && !join.unsafe_skip_ca_verification {
        bail!("give --ca-cert-hash sha256:... to check the cluster's CA (or --unsafe-skip-ca-verification, which lets anyone who knows the token pose as the cluster)");
    }
    println!("discovering the cluster at {}", join.server);
    let ca_pem = discover_patiently(join, token).await?;
    let key = csr::key_pair(&creds.key)?;
    println!("asking for a client certificate for node {}", join.node_name);
    let client = verified_client(&join.server, &ca_pem, token)?;
    let cert = csr::request(&client, &key, &Identity::Node.request(&join.node_name)).await.map_err(|e| match token {
        None => e.context("joining without a token (the server lets nodes in without one only with --node-registration open; otherwise give --token: `krate token create --print-join-command` on the server prints the command)"),
        Some(_) => e,
    })?;
    std::fs::write(&creds.cert, &cert)?;
    let user = Identity::Node.user(&join.node_name);
    crate::pki::write_private(&creds.kubeconfig, &kubeconfig(&join.server, &ca_pem, &cert, &key, &user)?)?;
    println!("joined: credentials in {}", creds.kubeconfig.display());
    Ok(creds.kubeconfig.clone())
}

/// A kube client whose requests go through the client of the current certificate:
/// [`Rotation::run`] swaps in a new one after each renewal (open watches carry on over
/// their connections).
#[derive(Clone)]
pub struct Rotation {
    current: Arc<RwLock<kube::Client>>,
    creds: Arc<Credentials>,
    node: String,
    identity: Identity,
    /// Who asks for renewals: the node (for its networking's), else the identity itself.
    requester: Option<kube::Client>,
}

impl Rotation {
    /// The rotation of the stored credentials `creds`.
    pub async fn new(
        creds: Credentials,
        node: &str,
        identity: Identity,
        requester: Option<kube::Client>,
    ) -> Result<Self> {
        let client = crate::components::kube_client(&creds.kubeconfig).await?;
        Ok(Rotation {
            current: Arc::new(RwLock::new(client)),
            creds: Arc::new(creds),
            node: node.to_string(),
            identity,
            requester,
        })
    }

    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    /// Renews the certificate at 80% of its lifetime, for ever.
    pub async fn run(self) {
        loop {
            let wait = match csr::renewal_time(&self.creds.cert) {
                Ok((renew, expires)) => {
                    tracing::info!(identity = ?self.identity, %renew, %expires, "client certificate renewal scheduled");
                    renew.duration_since(jiff::Timestamp::now()).as_secs_f64().max(0.0)
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the client certificate's lifetime; looking again in a minute");
                    60.0
                }
            };
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            match self.renew().await {
                Ok(expires) => tracing::info!(identity = ?self.identity, %expires, "renewed the client certificate"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "renewing the client certificate failed; trying again in 10 s");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            }
        }
    }

    async fn renew(&self) -> Result<jiff::Timestamp> {
        let own = self.current.read().expect("client lock").clone();
        let client = self.requester.clone().unwrap_or(own);
        let key = csr::key_pair(&self.creds.key)?;
        let cert = csr::request(&client, &key, &self.identity.request(&self.node)).await?;
        // The same server and CA as the kubeconfig being replaced.
        let kubeconfig = &self.creds.kubeconfig;
        self.creds.store(kubeconfig, &cert, &key, &self.identity.user(&self.node))?;
        *self.current.write().expect("client lock") = crate::components::kube_client(kubeconfig).await?;
        Ok(csr::renewal_time(&self.creds.cert)?.1)
    }
}

impl tower::Service<http::Request<kube::client::Body>> for Rotation {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, kube::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), kube::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let client = self.current.read().expect("client lock").clone();
        Box::pin(async move { client.send(req).await })
    }
}

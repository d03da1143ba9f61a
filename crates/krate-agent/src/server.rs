//! The agent's HTTPS API, on upstream's kubelet port (10250): what the API server
//! proxies to for `kubectl logs` (`/containerLogs/{namespace}/{pod}/{container}`),
//! `exec`/`attach` (`/exec|attach/{namespace}/{pod}/{container}`) and `port-forward`
//! (`/portForward/{namespace}/{pod}`), resource usage for metrics pipelines
//! (`/metrics/resource`, `/stats/summary`, see `stats.rs`), the process's own metrics
//! (`/metrics`: memory, descriptors, CPU), plus `/healthz`. Clients
//! must present a certificate signed by the cluster CA.
//!
//! The serving certificate comes from the cluster (`kubernetes.io/kubelet-serving`, as
//! a kubelet with `serverTLSBootstrap`): the agent asks for one naming the node and its
//! address, serves it as soon as it is issued and renews it at 80% of its lifetime. Until
//! the first is issued (or where the cluster does not sign serving certificates) it
//! serves a self-signed one, as a kubelet does by default.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::cri::{api, Cri};
use crate::logs::{self, LogOptions};
use crate::pods::spec;
use crate::{stats, streaming};

type Body = BoxBody<Bytes, Infallible>;

/// The certificate the agent's API serves, swapped when a new one is issued.
#[derive(Debug)]
pub struct ServingCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().expect("serving certificate lock").clone())
    }
}

const SIGNED_CERT: &str = "kubelet-serving.crt";
const SIGNED_KEY: &str = "kubelet-serving.key";

fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::sign::CertifiedKey>> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..]).collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])?.context("no private key")?;
    let provider = rustls::crypto::ring::default_provider();
    Ok(Arc::new(rustls::sign::CertifiedKey::from_der(certs, key, &provider)?))
}

impl ServingCert {
    /// The cluster-signed certificate in `dir` if one is valid, else a self-signed one
    /// for `names` (made once and kept there).
    fn load(dir: &Path, names: Vec<String>) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        if let Some(key) = Self::signed(dir) {
            return Ok(ServingCert { current: std::sync::RwLock::new(key) });
        }
        let (cert_path, key_path) = (dir.join("kubelet.crt"), dir.join("kubelet.key"));
        if !cert_path.exists() || !key_path.exists() {
            let cert = rcgen::generate_simple_self_signed(names).context("making the agent's serving certificate")?;
            std::fs::write(&cert_path, cert.cert.pem())?;
            krate_client::csr::write_private(&key_path, &cert.signing_key.serialize_pem())?;
        }
        let key = certified_key(&std::fs::read(&cert_path)?, &std::fs::read(&key_path)?)?;
        Ok(ServingCert { current: std::sync::RwLock::new(key) })
    }

    /// The stored cluster-signed certificate, while it has not expired.
    fn signed(dir: &Path) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let (_, expires) = krate_client::csr::renewal_time(&dir.join(SIGNED_CERT)).ok()?;
        if expires <= jiff::Timestamp::now() {
            return None;
        }
        certified_key(&std::fs::read(dir.join(SIGNED_CERT)).ok()?, &std::fs::read(dir.join(SIGNED_KEY)).ok()?).ok()
    }

    /// Asks the cluster for serving certificates naming `node` and `ip`, and renews them
    /// at 80% of their lifetime, for ever. A cluster that does not answer is asked again
    /// later; meanwhile the current certificate stays.
    pub async fn keep_signed(
        self: Arc<Self>,
        client: kube::Client,
        dir: std::path::PathBuf,
        node: String,
        ip: std::net::IpAddr,
    ) {
        loop {
            let renew = krate_client::csr::renewal_time(&dir.join(SIGNED_CERT)).ok().map(|(renew, _)| renew);
            if let Some(renew) = renew {
                let wait = renew.duration_since(jiff::Timestamp::now()).as_secs_f64().max(0.0);
                tokio::time::sleep(std::time::Duration::from_secs_f64(wait)).await;
            }
            match self.request(&client, &dir, &node, ip).await {
                Ok(()) => tracing::info!(node, "serving the cluster-signed certificate of the agent's API"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "no serving certificate from the cluster; keeping the current one and asking again in a minute");
                    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                }
            }
        }
    }

    async fn request(&self, client: &kube::Client, dir: &Path, node: &str, ip: std::net::IpAddr) -> Result<()> {
        let key = krate_client::csr::key_pair(&dir.join(SIGNED_KEY))?;
        let what = krate_client::csr::Request {
            signer: krate_client::csr::KUBELET_SERVING,
            node,
            common_name: format!("system:node:{node}"),
            organization: "system:nodes",
            dns_names: vec![node.to_string()],
            ips: vec![ip],
            usages: &["digital signature", "server auth"],
            generate_name: "csr-",
        };
        let request = krate_client::csr::request(client, &key, &what);
        let cert = tokio::time::timeout(std::time::Duration::from_secs(120), request).await.context(
            "the serving certificate was not issued within 2 minutes (approve it: kubectl certificate approve)",
        )??;
        let certified = certified_key(cert.as_bytes(), key.serialize_pem().as_bytes())?;
        std::fs::write(dir.join(SIGNED_CERT), &cert)?;
        *self.current.write().expect("serving certificate lock") = certified;
        Ok(())
    }
}

/// The TLS configuration: the serving certificate of `dir` (see [`ServingCert`]), and
/// client certificates required and checked against `cluster_ca_pem`.
pub fn tls_config(
    dir: &Path,
    names: Vec<String>,
    cluster_ca_pem: &str,
) -> Result<(Arc<rustls::ServerConfig>, Arc<ServingCert>)> {
    let serving = Arc::new(ServingCert::load(dir, names)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut cluster_ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving.clone());
    Ok((Arc::new(config), serving))
}

/// What every request of the agent's API may use.
#[derive(Clone)]
struct Shared {
    cri: Cri,
    node: Arc<str>,
    rates: Arc<stats::Rates>,
}

/// Serves until the process stops.
pub async fn serve(addr: SocketAddr, tls: Arc<rustls::ServerConfig>, cri: Cri, node: &str) -> Result<()> {
    let context = Shared { cri, node: node.into(), rates: Default::default() };
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("listening on {addr} for the agent API (is another agent running? pick another --kubelet-port)")
    })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, _) = listener.accept().await?;
        let (acceptor, context) = (acceptor.clone(), context.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else { return };
            let service = hyper::service::service_fn(move |req| {
                let context = context.clone();
                async move { Ok::<_, Infallible>(handle(req, context).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn handle(mut req: Request<Incoming>, context: Shared) -> Response<Body> {
    let cri = context.cri.clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let Some((action, ns, pod, container)) = streaming::route(&parts) {
        return streaming::serve(req, cri, action, &ns, &pod, container.as_deref()).await;
    }
    if req.method() != http::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    match parts.as_slice() {
        ["healthz"] => text(StatusCode::OK, "ok"),
        ["metrics"] => {
            let mut r = text(StatusCode::OK, krate_client::process::render());
            let content_type = http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
            r.headers_mut().insert(http::header::CONTENT_TYPE, content_type);
            r
        }
        ["metrics", "resource"] => match stats::collect(&mut cri.clone()).await {
            Ok(snapshot) => {
                let mut r = text(StatusCode::OK, stats::render_resource_metrics(&snapshot));
                let content_type = http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
                r.headers_mut().insert(http::header::CONTENT_TYPE, content_type);
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        },
        ["stats", "summary"] => match stats::collect(&mut cri.clone()).await {
            Ok(snapshot) => {
                let summary = context.rates.summary(&context.node, &snapshot);
                let mut r = text(StatusCode::OK, summary.to_string());
                r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        },
        ["containerLogs", ns, pod, container] => container_logs(cri, ns, pod, container, &query, &mut req).await,
        _ => text(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// A container's log, as text or (asked for with an upgrade) over a WebSocket.
async fn container_logs(
    mut cri: Cri,
    ns: &str,
    pod: &str,
    container: &str,
    query: &str,
    req: &mut Request<Incoming>,
) -> Response<Body> {
    let opts = match LogOptions::from_query(query) {
        Ok(o) => o,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let list = match cri
        .containers_labelled(&[(spec::POD_NAMESPACE, ns), (spec::POD_NAME, pod), (spec::CONTAINER_NAME, container)])
        .await
    {
        Ok(list) => list,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.message().to_string()),
    };
    let target = if opts.previous { list.get(1) } else { list.first() };
    let Some(target) = target else {
        return if opts.previous {
            text(
                StatusCode::BAD_REQUEST,
                format!("previous terminated container \"{container}\" in pod \"{pod}\" not found"),
            )
        } else {
            text(
                StatusCode::BAD_REQUEST,
                format!("container \"{container}\" in pod \"{pod}\" is waiting to start: ContainerCreating"),
            )
        };
    };
    let id = target.id.clone();
    let status = match cri
        .runtime
        .container_status(api::ContainerStatusRequest { container_id: id.clone(), verbose: false })
        .await
    {
        Ok(r) => r.into_inner().status.unwrap_or_default(),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.message().to_string()),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let running = move || {
        let (mut cri, id) = (cri.clone(), id.clone());
        async move {
            cri.runtime
                .container_status(api::ContainerStatusRequest { container_id: id, verbose: false })
                .await
                .ok()
                .and_then(|r| r.into_inner().status)
                .is_some_and(|s| s.state == api::ContainerState::ContainerRunning as i32)
        }
    };
    tokio::spawn(logs::stream(status.log_path.into(), opts, tx, running));
    if streaming::wants_websocket(req.headers()) {
        return streaming::stream_websocket(req, rx);
    }
    let body =
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    r
}

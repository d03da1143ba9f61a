//! The agent's HTTPS API, on upstream's kubelet port (10250): what the API server
//! proxies to for `kubectl logs` (`/containerLogs/{namespace}/{pod}/{container}`),
//! `exec`/`attach` (`/exec|attach/{namespace}/{pod}/{container}`) and `port-forward`
//! (`/portForward/{namespace}/{pod}`), plus `/healthz`. The serving certificate is self-signed (as a kubelet's is by default, and
//! the API server does not verify it unless told to); clients must present a
//! certificate signed by the cluster CA.

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
use crate::streaming;

type Body = BoxBody<Bytes, Infallible>;

/// The TLS configuration: a self-signed certificate kept in `dir` (made once), and
/// client certificates required and checked against `cluster_ca_pem`.
pub fn tls_config(dir: &Path, names: Vec<String>, cluster_ca_pem: &str) -> Result<Arc<rustls::ServerConfig>> {
    std::fs::create_dir_all(dir)?;
    let (cert_path, key_path) = (dir.join("kubelet.crt"), dir.join("kubelet.key"));
    if !cert_path.exists() || !key_path.exists() {
        let cert = rcgen::generate_simple_self_signed(names).context("making the agent's serving certificate")?;
        std::fs::write(&cert_path, cert.cert.pem())?;
        std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
    }
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut std::fs::read(&cert_path)?.as_slice()).collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut std::fs::read(&key_path)?.as_slice())?.context("no key in kubelet.key")?;
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
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// Serves until the process stops.
pub async fn serve(addr: SocketAddr, tls: Arc<rustls::ServerConfig>, cri: Cri) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("listening on {addr} for the agent API (is another agent running? pick another --kubelet-port)")
    })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, _) = listener.accept().await?;
        let (acceptor, cri) = (acceptor.clone(), cri.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else { return };
            let service = hyper::service::service_fn(move |req| {
                let cri = cri.clone();
                async move { Ok::<_, Infallible>(handle(req, cri).await) }
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

async fn handle(req: Request<Incoming>, cri: Cri) -> Response<Body> {
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
        ["containerLogs", ns, pod, container] => container_logs(cri, ns, pod, container, &query).await,
        _ => text(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

async fn container_logs(mut cri: Cri, ns: &str, pod: &str, container: &str, query: &str) -> Response<Body> {
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
    let body =
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    r
}

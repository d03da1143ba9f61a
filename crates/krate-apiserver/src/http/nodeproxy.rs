//! Requests the API server forwards to a node's agent: `pods/log` today. The pod names
//! its node; the Node names its address and agent port; the agent is reached over TLS
//! with the API server's own client certificate (`Settings::kubelet_client`), and its
//! response is streamed back as it comes.

use std::sync::Arc;

use axum::body::Body;
use http::{header, Request, Response, StatusCode};
use krate_api::{ApiError, ApiResult};
use serde_json::Value;

use super::route::ResourcePath;
use super::Query;
use crate::registry::Scope;
use crate::ApiServer;

/// `GET pods/{name}/log`: the container's log from the pod's node.
pub async fn pod_log(server: &Arc<ApiServer>, pods: &Scope, name: &str, query: &Query) -> ApiResult<Response<Body>> {
    let pod = server.storage.get(pods, name).await?.parse();
    let ns = pods.namespace.clone().unwrap_or_default();
    let containers: Vec<&str> = pod["spec"]["containers"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
    let init: Vec<&str> = pod["spec"]["initContainers"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
    let container = match query.get("container").filter(|c| !c.is_empty()) {
        Some(c) if containers.contains(&c.as_str()) || init.contains(&c.as_str()) => c.clone(),
        Some(c) => return Err(ApiError::bad_request(format!("container {c} is not valid for pod {name}"))),
        None if containers.len() == 1 => containers[0].to_string(),
        None => return Err(ApiError::bad_request(format!("a container name must be specified for pod {name}, choose one of: [{}]", containers.join(" ")))),
    };
    let Some(node_name) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) else {
        return Err(ApiError::bad_request(format!("pod {name} does not have a host assigned")));
    };
    let nodes = super::lookup(server, &ResourcePath { group: String::new(), version: "v1".into(), resource: "nodes".into(), name: None, subresource: None, namespace: None })?;
    let node = server.storage.get(&Scope { kind: nodes, namespace: None }, node_name).await?.parse();
    let (host, port) = agent_address(&node).ok_or_else(|| ApiError::internal(format!("node {node_name} reports no address for its agent")))?;
    let mut forwarded: Vec<(String, String)> = Vec::new();
    for key in ["follow", "previous", "timestamps", "tailLines", "limitBytes", "sinceSeconds", "sinceTime"] {
        if let Some(v) = query.get(key) {
            forwarded.push((key.to_string(), v.clone()));
        }
    }
    let qs = form_urlencoded::Serializer::new(String::new()).extend_pairs(&forwarded).finish();
    let path = format!("/containerLogs/{ns}/{name}/{container}?{qs}");
    let response = get(server, &host, port, &path).await.map_err(|e| ApiError::internal(format!("Get \"https://{host}:{port}{path}\": {e}")))?;
    if response.status() != StatusCode::OK {
        let code = response.status().as_u16();
        let body = http_body_util::BodyExt::collect(response.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
        let message = String::from_utf8_lossy(&body).trim().to_string();
        return Err(if code == 404 { ApiError::new(404, "NotFound", message) } else if code < 500 { ApiError::bad_request(message) } else { ApiError::internal(message) });
    }
    let mut out = Response::new(Body::new(response.into_body()));
    out.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    Ok(out)
}

/// The node's InternalIP (else its first address) and agent port.
fn agent_address(node: &Value) -> Option<(String, u16)> {
    let addresses = node["status"]["addresses"].as_array()?;
    let ip = addresses.iter().find(|a| a["type"] == "InternalIP").or_else(|| addresses.first())?["address"].as_str()?.to_string();
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64().unwrap_or(10250) as u16;
    Some((ip, port))
}

async fn get(server: &ApiServer, host: &str, port: u16, path: &str) -> anyhow::Result<Response<hyper::body::Incoming>> {
    let tls = server.settings.kubelet_client.clone().ok_or_else(|| anyhow::anyhow!("this API server has no client certificate for node agents"))?;
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(10), tokio::net::TcpStream::connect((host, port))).await??;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = Request::get(path).header(header::HOST, format!("{host}:{port}")).body(http_body_util::Empty::<bytes::Bytes>::new())?;
    Ok(sender.send_request(request).await?)
}

/// A client configuration for node agents: the API server's client certificate, and, as
/// upstream does unless given the agents' CA, no verification of their (self-signed)
/// serving certificates beyond the handshake signatures.
pub fn kubelet_client_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())?.ok_or_else(|| anyhow::anyhow!("no private key for the kubelet client certificate"))?;
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(certs, key)?;
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &rustls::pki_types::CertificateDer<'_>, dss: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &rustls::pki_types::CertificateDer<'_>, dss: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

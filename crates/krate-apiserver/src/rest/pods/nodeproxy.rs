//! Requests the API server forwards to a node's agent: `pods/log`, and the upgraded
//! connections of `pods/exec`, `pods/attach` and `pods/portforward`. The pod names its
//! node; the Node names its address and agent port; the agent is reached over TLS with
//! the API server's own client certificate (`Settings::kubelet_client`). Log responses
//! are streamed back as they come; upgrade requests are passed on unchanged (WebSocket
//! or SPDY, the agent speaks both) and, once both sides switched protocols, the two
//! connections are joined byte for byte.

use std::sync::Arc;

use axum::body::Body;
use http::{header, Request, Response, StatusCode};
use krate_api::{ApiError, ApiResult};
use serde_json::Value;

use k8s_openapi::api::core::v1 as core;

use super::Action;
use crate::http::Query;
use crate::registry::Scope;
use crate::ApiServer;

/// `GET pods/{name}/log`: the container's log from the pod's node; a WebSocket
/// request (upstream streams logs to those too) is passed on as an upgrade.
pub async fn pod_log(
    server: &Arc<ApiServer>,
    pods: &Scope,
    name: &str,
    query: &Query,
    req: Request<Body>,
) -> ApiResult<Response<Body>> {
    let pod = server.storage.get(pods, name).await?.parse();
    let ns = pods.namespace.clone().unwrap_or_default();
    let container = container_of(&pod, name, query)?;
    let (host, port) = agent_of(server, &pod, name).await?;
    let mut forwarded: Vec<(String, String)> = Vec::new();
    for key in ["follow", "previous", "timestamps", "tailLines", "limitBytes", "sinceSeconds", "sinceTime"] {
        if let Some(v) = query.get(key) {
            forwarded.push((key.to_string(), v.clone()));
        }
    }
    let qs = form_urlencoded::Serializer::new(String::new()).extend_pairs(&forwarded).finish();
    let path = format!("/containerLogs/{ns}/{name}/{container}?{qs}");
    if req.headers().contains_key(header::UPGRADE) {
        return forward_upgrade(server, &host, port, &path, req).await;
    }
    let request = Request::get(path.as_str()).body(Body::empty()).map_err(|e| ApiError::internal(e.to_string()))?;
    let response = send(server, &host, port, request).await?;
    if response.status() != StatusCode::OK {
        return Err(agent_error(response).await);
    }
    let mut out = Response::new(Body::new(response.into_body()));
    out.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    Ok(out)
}

/// Headers of an upgrade handshake, passed on both ways.
const UPGRADE_HEADERS: &[&str] = &[
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-accept",
    "x-stream-protocol-version",
];

/// `GET|POST pods/{name}/exec|attach|portforward`: the client's upgrade request goes to
/// the pod's node; the agent's answer (101 or an error) comes back.
pub async fn connect(
    server: &Arc<ApiServer>,
    pods: &Scope,
    name: &str,
    action: Action,
    query: &Query,
    req: Request<Body>,
) -> ApiResult<Response<Body>> {
    let pod = server.storage.get(pods, name).await?.parse();
    let ns = pods.namespace.clone().unwrap_or_default();
    let phase = pod["status"]["phase"].as_str().unwrap_or_default();
    if matches!(phase, "Succeeded" | "Failed") && action != Action::PortForward {
        let verb = if action == Action::Exec { "exec into" } else { "attach to" };
        return Err(ApiError::bad_request(format!(
            "cannot {verb} a container in a completed pod; current phase is {phase}"
        )));
    }
    let path = match action {
        Action::PortForward => format!("/portForward/{ns}/{name}"),
        Action::Exec => format!("/exec/{ns}/{name}/{}", container_of(&pod, name, query)?),
        Action::Attach => format!("/attach/{ns}/{name}/{}", container_of(&pod, name, query)?),
    };
    let (host, port) = agent_of(server, &pod, name).await?;
    let path = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    forward_upgrade(server, &host, port, &path, req).await
}

/// Passes an upgrade request on to the agent at `host:port` as `path` and, once it
/// switches protocols, joins the two upgraded connections.
async fn forward_upgrade(
    server: &Arc<ApiServer>,
    host: &str,
    port: u16,
    path: &str,
    mut req: Request<Body>,
) -> ApiResult<Response<Body>> {
    let mut forwarded = Request::builder().method(req.method()).uri(path);
    for name in UPGRADE_HEADERS {
        for value in req.headers().get_all(*name) {
            forwarded = forwarded.header(*name, value);
        }
    }
    let forwarded = forwarded.body(Body::empty()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut response = send(server, host, port, forwarded).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(agent_error(response).await);
    }
    let mut out = Response::new(Body::empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for name in UPGRADE_HEADERS {
        for value in response.headers().get_all(*name) {
            out.headers_mut().append(*name, value.clone());
        }
    }
    let (client, agent) = (hyper::upgrade::on(&mut req), hyper::upgrade::on(&mut response));
    tokio::spawn(async move {
        let (Ok(client), Ok(agent)) = (client.await, agent.await) else { return };
        let (mut client, mut agent) = (hyper_util::rt::TokioIo::new(client), hyper_util::rt::TokioIo::new(agent));
        let _ = tokio::io::copy_bidirectional(&mut client, &mut agent).await;
    });
    Ok(out)
}

/// The container a request names (`container=`), or the pod's only container; any of
/// its init, app and ephemeral containers may be named (upstream's validateContainer).
fn container_of(pod: &Value, name: &str, query: &Query) -> ApiResult<String> {
    let names = |key: &str| -> Vec<String> {
        pod["spec"][key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    };
    let containers = names("containers");
    let all: Vec<String> = [names("initContainers"), containers.clone(), names("ephemeralContainers")].concat();
    match query.get("container").filter(|c| !c.is_empty()) {
        Some(c) if all.contains(c) => Ok(c.clone()),
        Some(c) => Err(ApiError::bad_request(format!("container {c} is not valid for pod {name}"))),
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None if containers.is_empty() => {
            Err(ApiError::bad_request(format!("a container name must be specified for pod {name}")))
        }
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            all.join(" ")
        ))),
    }
}

/// The address and port of the agent on the pod's node.
async fn agent_of(server: &ApiServer, pod: &Value, name: &str) -> ApiResult<(String, u16)> {
    let Some(node_name) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) else {
        return Err(ApiError::bad_request(format!("pod {name} does not have a host assigned")));
    };
    let node = server.storage.get(&server.storage.builtin::<core::Node>(None), node_name).await?.parse();
    agent_address(&node).ok_or_else(|| ApiError::internal(format!("node {node_name} reports no address for its agent")))
}

/// The node's InternalIP (else its first address) and agent port.
pub(crate) fn agent_address(node: &Value) -> Option<(String, u16)> {
    let addresses = node["status"]["addresses"].as_array()?;
    let ip = addresses.iter().find(|a| a["type"] == "InternalIP").or_else(|| addresses.first())?["address"]
        .as_str()?
        .to_string();
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64().unwrap_or(10250) as u16;
    Some((ip, port))
}

/// An agent's error answer as the API error a client sees.
async fn agent_error(response: Response<hyper::body::Incoming>) -> ApiError {
    let code = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
    let message = String::from_utf8_lossy(&body).trim().to_string();
    match code {
        404 => ApiError::new(404, "NotFound", message),
        400..=499 => ApiError::bad_request(message),
        _ => ApiError::internal(message),
    }
}

/// Sends `request` to the agent at `host:port` over TLS (one connection per request,
/// which upgraded requests keep).
async fn send(
    server: &ApiServer,
    host: &str,
    port: u16,
    mut request: Request<Body>,
) -> ApiResult<Response<hyper::body::Incoming>> {
    // Worded as Go's HTTP client words it, e.g. `Get "https://10.0.0.1:10250/...": ...`.
    let method = request.method().as_str();
    let verb = format!("{}{}", &method[..1], method[1..].to_ascii_lowercase());
    let target = format!("{verb} \"https://{host}:{port}{}\"", request.uri());
    let failed = |e: anyhow::Error| ApiError::internal(format!("{target}: {e}"));
    let tls = server
        .settings
        .kubelet_client
        .clone()
        .ok_or_else(|| failed(anyhow::anyhow!("this API server has no client certificate for node agents")))?;
    let mut sender = open_connection(host, port, Some(tls)).await.map_err(failed)?;
    request
        .headers_mut()
        .insert(header::HOST, header::HeaderValue::from_str(&format!("{host}:{port}")).map_err(|e| failed(e.into()))?);
    sender.send_request(request).await.map_err(|e| failed(e.into()))
}

/// An HTTP/1.1 connection to `host:port`, over TLS with `tls` if given, that upgraded
/// requests may keep: one per request, for the agent requests here and the proxy
/// subresources (`rest/proxy`).
pub(crate) async fn open_connection(
    host: &str,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Body>> {
    open_connection_as(host, port, tls, host).await
}

/// `open_connection` with TLS verifying the server as `server_name` (a webhook's
/// `svc.namespace.svc` reached at one of its endpoints).
pub(crate) async fn open_connection_as(
    host: &str,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    server_name: &str,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Body>> {
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(10), tokio::net::TcpStream::connect((host, port)))
        .await
        .map_err(|_| anyhow::anyhow!("dial tcp {host}:{port}: i/o timeout"))??;
    let Some(tls) = tls else {
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn.with_upgrades());
        return Ok(sender);
    };
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    Ok(sender)
}

/// A client configuration for node agents: the API server's client certificate, and, as
/// upstream does unless given the agents' CA, no verification of their (self-signed)
/// serving certificates beyond the handshake signatures.
pub fn kubelet_client_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())?
        .ok_or_else(|| anyhow::anyhow!("no private key for the kubelet client certificate"))?;
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(krate_client::tls::any_server(provider))
        .with_client_auth_cert(certs, key)?;
    Ok(Arc::new(config))
}

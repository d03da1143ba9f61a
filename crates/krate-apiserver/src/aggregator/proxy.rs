//! Passing a request to the extension API server behind a remote APIService: its
//! Service resolved to a ready endpoint (or, for an ExternalName Service, to the name
//! it points at), HTTPS trusting the APIService's `caBundle` (or nothing, with
//! `insecureSkipTLSVerify`) as `name.namespace.svc`, the front proxy's client
//! certificate, and the authenticated user in upstream's request headers. The answer
//! streams back as the extension server wrote it (watches included).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::body::Body;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::auth::User;
use crate::registry::Storage;
use crate::ApiServer;

/// Where and how a remote APIService is reached.
pub(crate) struct Backend {
    pub host: String,
    pub port: u16,
    server_name: String,
    tls: Arc<rustls::ClientConfig>,
}

impl Backend {
    /// A new connection to the backend, verified as the Service's name.
    async fn connect(&self) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Body>> {
        let tls = Some(self.tls.clone());
        crate::rest::pods::nodeproxy::open_connection_as(&self.host, self.port, tls, &self.server_name).await
    }

    /// `https://host:port{path}`, as errors name the URL.
    pub fn url(&self, path: &str) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        format!("https://{host}:{}{path}", self.port)
    }
}

/// Resolves the APIService's Service to an address and builds its TLS configuration.
pub(crate) fn backend(server: &ApiServer, api_service: &Value) -> Result<Backend, String> {
    let service = &api_service["spec"]["service"];
    let (namespace, name) =
        (service["namespace"].as_str().unwrap_or_default(), service["name"].as_str().unwrap_or_default());
    let port = service["port"].as_u64().unwrap_or(443) as u16;
    let (host, port) = resolve(&server.storage, namespace, name, port)?;
    let tls = tls_for(api_service, server.settings.front_proxy.as_ref())?;
    Ok(Backend { host, port, server_name: format!("{name}.{namespace}.svc"), tls })
}

/// A Service's address for `port`, from the watch cache: an ExternalName Service's name,
/// else a ready endpoint (upstream's endpoint routing).
pub(crate) fn resolve(storage: &Storage, namespace: &str, name: &str, port: u16) -> Result<(String, u16), String> {
    let (service, endpoints) = crate::rest::proxy::cached_service(storage, namespace, name)?;
    if service["spec"]["type"] == "ExternalName" {
        let external = service["spec"]["externalName"].as_str().unwrap_or_default();
        return Ok((external.to_string(), port));
    }
    crate::rest::proxy::service_location(&service, endpoints.as_ref(), name, &port.to_string()).map_err(|e| e.message)
}

/// TLS client configurations by what they trust, so requests do not parse bundles.
type TlsKey = (String, bool);
static TLS: LazyLock<Mutex<HashMap<TlsKey, Arc<rustls::ClientConfig>>>> = LazyLock::new(Default::default);

fn tls_for(api_service: &Value, front: Option<&super::FrontProxy>) -> Result<Arc<rustls::ClientConfig>, String> {
    let spec = &api_service["spec"];
    let ca_bundle = spec["caBundle"].as_str().unwrap_or_default().to_string();
    let insecure = spec["insecureSkipTLSVerify"].as_bool().unwrap_or(false);
    let key = (ca_bundle.clone(), insecure);
    if let Some(config) = TLS.lock().expect("aggregator TLS cache").get(&key) {
        return Ok(config.clone());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if insecure {
        builder.dangerous().with_custom_certificate_verifier(krate_client::tls::any_server(provider))
    } else {
        let pem = base64::engine::general_purpose::STANDARD.decode(&ca_bundle).unwrap_or_default();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()).filter_map(Result::ok) {
            roots.add(cert).map_err(|e| format!("unable to load root certificates: {e}"))?;
        }
        builder.with_root_certificates(roots)
    };
    let config = match front {
        Some(front) => {
            let certs = rustls_pemfile::certs(&mut front.client_cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the front proxy's client certificate: {e}"))?;
            let key = rustls_pemfile::private_key(&mut front.client_key_pem.as_bytes())
                .map_err(|e| format!("the front proxy's key: {e}"))?
                .ok_or("the front proxy's key is missing")?;
            builder.with_client_auth_cert(certs, key).map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    let config = Arc::new(config);
    let mut cache = TLS.lock().expect("aggregator TLS cache");
    if cache.len() >= 64 {
        cache.clear();
    }
    cache.insert(key, config.clone());
    Ok(config)
}

/// Sets the user as upstream's front proxy does, after removing whatever the client sent
/// under those names.
fn set_user_headers(headers: &mut http::HeaderMap, user: &User) {
    let theirs: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.starts_with("x-remote-") || k.starts_with("impersonate-")
        })
        .cloned()
        .collect();
    for name in theirs {
        headers.remove(name);
    }
    let mut add = |name: &str, value: &str| {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_str(value)) {
            headers.append(name, value);
        }
    };
    add("x-remote-user", &user.name);
    if !user.uid.is_empty() {
        add("x-remote-uid", &user.uid);
    }
    for group in &user.groups {
        add("x-remote-group", group);
    }
    for (key, values) in &user.extra {
        // Upstream escapes keys as URL path segments (`headerKeyEscape`).
        let escaped: String = form_urlencoded::byte_serialize(key.as_bytes()).collect();
        for value in values {
            add(&format!("x-remote-extra-{escaped}"), value);
        }
    }
}

fn plain(code: StatusCode, text: &str) -> Response<Body> {
    let mut resp = Response::new(Body::from(format!("{text}\n")));
    *resp.status_mut() = code;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp.headers_mut().insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    resp
}

fn available(api_service: &Value) -> bool {
    let conditions = api_service["status"]["conditions"].as_array().into_iter().flatten();
    conditions.into_iter().any(|c| c["type"] == "Available" && c["status"] == "True")
}

/// Serves a request under a remote APIService's group/version.
pub(crate) async fn serve(server: &ApiServer, user: &User, api_service: &Value, req: Request<Body>) -> Response<Body> {
    if !available(api_service) {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "service unavailable");
    }
    let backend = match backend(server, api_service) {
        Ok(backend) => backend,
        Err(e) => {
            tracing::warn!(apiservice = %api_service["metadata"]["name"], error = %e, "resolving an APIService failed");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "service unavailable");
        }
    };
    let (mut parts, body) = req.into_parts();
    let mut headers = crate::rest::proxy::forwarded_headers(&parts.headers);
    set_user_headers(&mut headers, user);
    if let Ok(host) = HeaderValue::from_str(&format!("{}:{}", backend.server_name, backend.port)) {
        headers.insert(header::HOST, host);
    }
    parts.headers = headers;
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    parts.uri = match path_and_query.parse() {
        Ok(uri) => uri,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let request = Request::from_parts(parts, body);
    let sent = async { Ok::<_, anyhow::Error>(backend.connect().await?.send_request(request).await?) };
    match sent.await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            parts.headers = crate::rest::proxy::forwarded_headers(&parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => plain(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    }
}

/// GETs `path` from the backend as the aggregator itself (`system:kube-aggregator` in
/// `system:masters`, as upstream's availability check asks), within `timeout`.
pub(crate) async fn get(backend: &Backend, path: &str, timeout: Duration) -> Result<(StatusCode, Bytes), String> {
    let call = async {
        let mut sender = backend.connect().await.map_err(|e| format!("{e:#}"))?;
        let request = Request::get(path)
            .header(header::HOST, format!("{}:{}", backend.server_name, backend.port))
            .header(header::ACCEPT, "application/json")
            .header("x-remote-user", "system:kube-aggregator")
            .header("x-remote-group", "system:masters")
            .body(Body::empty())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| format!("timed out waiting for {}", backend.url(path)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_replaces_what_the_client_claimed() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-remote-user", HeaderValue::from_static("mallory"));
        headers.insert("x-remote-extra-scopes", HeaderValue::from_static("all"));
        headers.insert("impersonate-user", HeaderValue::from_static("root"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let user = User {
            name: "alice".into(),
            groups: vec!["dev".into(), "system:authenticated".into()],
            uid: String::new(),
            extra: [("example.com/team".to_string(), vec!["blue".to_string()])].into(),
        };
        set_user_headers(&mut headers, &user);
        let all =
            |name: &str| headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>();
        assert_eq!(all("x-remote-user"), ["alice"]);
        assert_eq!(all("x-remote-group"), ["dev", "system:authenticated"]);
        assert_eq!(all("x-remote-extra-example.com%2Fteam"), ["blue"]);
        assert!(all("x-remote-extra-scopes").is_empty() && all("impersonate-user").is_empty());
        assert_eq!(all("accept"), ["application/json"]);
    }

    #[test]
    fn only_an_available_api_service_is_served() {
        let with =
            |status: &str| serde_json::json!({"status": {"conditions": [{"type": "Available", "status": status}]}});
        assert!(available(&with("True")));
        assert!(!available(&with("False")));
        assert!(!available(&serde_json::json!({})));
    }
}

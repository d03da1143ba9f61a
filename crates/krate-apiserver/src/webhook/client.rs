//! Calling a webhook: where its `clientConfig` points (a URL, or a Service resolved to
//! one of its ready endpoints, verified as `name.namespace.svc` as upstream's service
//! resolver names it), HTTPS trusting only the `caBundle`, the time limit, and errors
//! worded as upstream's Go client words them (`Post "https://...?timeout=10s": ...`),
//! since clients and tests match on them.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::body::Body;
use base64::Engine;
use http::{header, Request};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::registry::Storage;

/// Where one call goes.
pub(crate) struct Target {
    /// The URL as upstream reports it in errors (the Service's DNS name, not the endpoint).
    pub url: String,
    connect_host: String,
    connect_port: u16,
    server_name: String,
    host_header: String,
    path_and_query: String,
}

/// Resolves a webhook's client config for a call limited to `timeout`.
pub(crate) fn target(storage: &Storage, config: &Value, timeout: Duration) -> Result<Target, String> {
    let query = format!("?timeout={}s", timeout.as_secs());
    if let Some(url) = config["url"].as_str() {
        let rest = url.strip_prefix("https://").ok_or_else(|| format!("webhook URL {url:?} is not https"))?;
        let (authority, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
        let (host, port) = split_host_port(authority)?;
        return Ok(Target {
            url: format!("{url}{query}"),
            connect_host: host.clone(),
            connect_port: port,
            server_name: host,
            host_header: authority.to_string(),
            path_and_query: format!("{path}{query}"),
        });
    }
    let service = &config["service"];
    let (namespace, name) =
        (service["namespace"].as_str().unwrap_or_default(), service["name"].as_str().unwrap_or_default());
    let port = service["port"].as_u64().unwrap_or(443);
    let path = service["path"].as_str().filter(|p| !p.is_empty()).unwrap_or("/");
    let host = format!("{name}.{namespace}.svc");
    let url = format!("https://{host}:{port}{path}{query}");
    let (object, endpoints) =
        crate::rest::proxy::cached_service(storage, namespace, name).map_err(|e| format!("Post {url:?}: {e}"))?;
    let (ip, target_port) = crate::rest::proxy::service_location(&object, endpoints.as_ref(), name, &port.to_string())
        .map_err(|e| format!("Post {url:?}: {}", e.message))?;
    Ok(Target {
        url,
        connect_host: ip,
        connect_port: target_port,
        server_name: host.clone(),
        host_header: format!("{host}:{port}"),
        path_and_query: format!("{path}{query}"),
    })
}

fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h, p.parse::<u16>().map_err(|_| format!("invalid port in {authority:?}"))?)
        }
        _ => (authority, 443),
    };
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

/// TLS client configurations by caBundle, so a busy webhook does not parse its bundle
/// on every call.
static TLS: LazyLock<Mutex<HashMap<String, Arc<rustls::ClientConfig>>>> = LazyLock::new(Default::default);

fn tls_for(ca_bundle: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut cache = TLS.lock().expect("webhook TLS cache");
    if let Some(config) = cache.get(ca_bundle) {
        return Ok(config.clone());
    }
    let pem =
        base64::engine::general_purpose::STANDARD.decode(ca_bundle).unwrap_or_else(|_| ca_bundle.as_bytes().to_vec());
    let mut roots = rustls::RootCertStore::empty();
    if !pem.is_empty() {
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice()).filter_map(Result::ok).collect();
        if certs.is_empty() {
            return Err(
                "could not get REST client: unable to load root certificates: unable to parse bytes as PEM block"
                    .into(),
            );
        }
        for cert in certs {
            roots.add(cert).map_err(|e| format!("could not get REST client: unable to load root certificates: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let config = Arc::new(config);
    if cache.len() >= 64 {
        cache.clear();
    }
    cache.insert(ca_bundle.to_string(), config.clone());
    Ok(config)
}

/// Idle keep-alive connections to webhooks, by where they go and whom they trust.
type Connection = hyper::client::conn::http1::SendRequest<Body>;
type PoolKey = (String, u16, String, u64);
static POOL: LazyLock<Mutex<HashMap<PoolKey, Vec<Connection>>>> = LazyLock::new(Default::default);
const IDLE_PER_WEBHOOK: usize = 32;

fn pool_key(target: &Target, ca_bundle: &str) -> PoolKey {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    ca_bundle.hash(&mut hasher);
    (target.connect_host.clone(), target.connect_port, target.server_name.clone(), hasher.finish())
}

/// An idle pooled connection that is still open (and true), else a new one.
async fn connection(target: &Target, ca_bundle: &str, key: &PoolKey) -> Result<(Connection, bool), String> {
    loop {
        let idle = POOL.lock().expect("webhook pool").get_mut(key).and_then(Vec::pop);
        match idle {
            Some(mut sender) if !sender.is_closed() => {
                if sender.ready().await.is_ok() {
                    return Ok((sender, true));
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    Ok((connect(target, ca_bundle).await?, false))
}

async fn connect(target: &Target, ca_bundle: &str) -> Result<Connection, String> {
    let tls = tls_for(ca_bundle)?;
    let (host, port, name) = (&target.connect_host, target.connect_port, &target.server_name);
    crate::rest::pods::nodeproxy::open_connection_as(host, port, Some(tls), name).await.map_err(|e| format!("{e:#}"))
}

/// POSTs `body` (an AdmissionReview) and returns the answer's body; every failure is
/// described as upstream's client describes it. Connections are kept for the next call.
pub(crate) async fn post(
    target: &Target,
    ca_bundle: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let key = pool_key(target, ca_bundle);
    let body = bytes::Bytes::from(body);
    let request = || {
        Request::post(&target.path_and_query)
            .header(header::HOST, &target.host_header)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, */*")
            .body(Body::from(body.clone()))
            .map_err(|e| e.to_string())
    };
    let call = async {
        let (mut sender, reused) = connection(target, ca_bundle, &key).await?;
        let response = match sender.send_request(request()?).await {
            Ok(response) => response,
            // A kept connection the webhook closed meanwhile: once more on a new one.
            Err(e) if reused && (e.is_closed() || e.is_canceled()) => {
                (sender, _) = connect(target, ca_bundle).await.map(|s| (s, false))?;
                sender.send_request(request()?).await.map_err(|e| e.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if !sender.is_closed() {
            let mut pool = POOL.lock().expect("webhook pool");
            let idle = pool.entry(key.clone()).or_default();
            if idle.len() < IDLE_PER_WEBHOOK {
                idle.push(sender);
            }
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            return Err(match status.as_u16() {
                500.. => {
                    format!("an error on the server ({:?}) has prevented the request from succeeding", text.trim())
                }
                code => format!("the server responded with the status code {code} but did not return more information"),
            });
        }
        Ok(bytes.to_vec())
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) => Err(format!("Post {:?}: {e}", target.url)),
        Err(_) => Err(format!("Post {:?}: context deadline exceeded", target.url)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports_split_as_urls_write_them() {
        assert_eq!(split_host_port("example.com").unwrap(), ("example.com".into(), 443));
        assert_eq!(split_host_port("127.0.0.1:8443").unwrap(), ("127.0.0.1".into(), 8443));
        assert_eq!(split_host_port("[::1]:9443").unwrap(), ("::1".into(), 9443));
        assert!(split_host_port("h:port").is_err());
    }

    #[test]
    fn a_ca_bundle_without_certificates_is_a_clear_error() {
        let bundle = base64::engine::general_purpose::STANDARD.encode("not a certificate");
        let err = tls_for(&bundle).unwrap_err();
        assert!(err.contains("unable to load root certificates"), "{err}");
    }
}

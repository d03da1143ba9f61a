//! The API server's proxy subresources, as upstream's: `pods/{id}/proxy[/path]`,
//! `services/{id}/proxy[/path]` and `nodes/{id}/proxy[/path]` pass the request on to the
//! pod's IP, to a ready endpoint of the service, or to the node's agent, and stream the
//! answer back (any method; upgrades are not carried). The id is `[scheme:]name[:port]`
//! with scheme `http` (the default) or `https`: a pod without a port is reached on its
//! first declared container port; a service port is named by its number or its name,
//! and the endpoint is picked at random among those that serve it; a node without a
//! port (or with its agent's) is its agent, over HTTPS with the API server's client
//! certificate for agents. Hop-by-hop headers and the client's credentials
//! stay behind; `X-Forwarded-For` and `X-Forwarded-Uri` are added. HTTPS targets are not
//! verified, as upstream's proxy transport does not verify them either.
//!
//! Links in HTML answers and `Location` headers are rewritten to go through the proxy
//! (`rewrite.rs`), as upstream's proxy transport does.

use axum::body::Body;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use k8s_openapi::api::core::v1 as core;
use krate_api::{ApiError, ApiResult};
use rand::Rng;
use serde_json::Value;

use super::pods::nodeproxy::open_connection;
use super::{Call, Handler};

mod rewrite;

/// `pods|services|nodes/{id}/proxy[/path]`.
pub struct Proxy;

#[async_trait::async_trait]
impl Handler for Proxy {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>> {
        let (scheme, name, port) = split_id(call.name)?;
        // The URL up to `.../{id}/proxy` (the prefix links are rewritten under), then the
        // path passed on.
        let marker = format!("/{}/{}/proxy", call.scope.kind.plural, call.name);
        let full_path = call.req.uri().path().to_string();
        let end = full_path.find(&marker).map_or(full_path.len(), |i| i + marker.len());
        let (prefix, rest) = (full_path[..end].to_string(), full_path[end..].to_string());
        let query = call.req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
        let get_or_head = matches!(*call.req.method(), http::Method::GET | http::Method::HEAD);
        if rest.is_empty() && get_or_head {
            // Upstream's answer to a GET of an empty path (issue 4958): the same URL
            // ending in '/'. Other methods go to '/'.
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
            let location = HeaderValue::from_str(&format!("{full_path}/{query}"))
                .map_err(|e| ApiError::bad_request(format!("the proxy path: {e}")))?;
            response.headers_mut().insert(header::LOCATION, location);
            return Ok(response);
        }
        let object = call.server.storage.get(&call.scope, name).await?.parse();
        let unverified = || Some(krate_client::tls::unverified_client_config());
        let mut tls = if scheme == "https" { unverified() } else { None };
        let (host, port) = if call.scope.kind.is::<core::Pod>() {
            pod_location(&object, name, port)?
        } else if call.scope.kind.is::<core::Node>() {
            let (host, agent_port) = super::pods::nodeproxy::agent_address(&object)
                .ok_or_else(|| ApiError::internal(format!("node {name} reports no address for its agent")))?;
            match port {
                // The agent's own port: its HTTPS, with the API server's certificate.
                port if port.is_empty() || port.parse() == Ok(agent_port) => {
                    tls = call.server.settings.kubelet_client.clone().or_else(unverified);
                    (host, agent_port)
                }
                port => (host, port.parse().map_err(|_| ApiError::bad_request(format!("invalid port {port:?}")))?),
            }
        } else {
            let endpoints = call.server.storage.builtin::<core::Endpoints>(call.scope.namespace.clone());
            let endpoints = call.server.storage.get(&endpoints, name).await.ok().map(|e| e.parse());
            service_location(&object, endpoints.as_ref(), name, port)?
        };
        let source = call.attrs.source.map(|ip| ip.to_string());
        // As upstream's path.Join of the prefix and the rest: cleaned, no query.
        let forwarded_uri = rewrite::clean(&full_path);
        let client_host = call.req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string);
        let rest = if rest.is_empty() { "/".to_string() } else { rest };
        let (mut parts, body) = call.req.into_parts();
        let mut headers = forwarded_headers(&parts.headers);
        if let Some(source) = source.and_then(|s| HeaderValue::from_str(&s).ok()) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), source);
        }
        if let Ok(uri) = HeaderValue::from_str(&forwarded_uri) {
            headers.insert(HeaderName::from_static("x-forwarded-uri"), uri);
        }
        let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        headers.insert(header::HOST, HeaderValue::from_str(&authority).map_err(|e| ApiError::internal(e.to_string()))?);
        parts.headers = headers;
        parts.uri =
            format!("{rest}{query}").parse().map_err(|e| ApiError::bad_request(format!("the proxy path: {e}")))?;
        let request = Request::from_parts(parts, body);
        let sent =
            async { Ok::<_, anyhow::Error>(open_connection(&host, port, tls).await?.send_request(request).await?) };
        let response = sent
            .await
            .map_err(|e| ApiError::new(503, "ServiceUnavailable", format!("error trying to reach service: {e:#}")))?;
        let (mut parts, body) = response.into_parts();
        parts.headers = forwarded_headers(&parts.headers);
        let rewriter = rewrite::Rewriter {
            prefix,
            hosts: [Some(authority.clone()), Some(host.clone()), client_host].into_iter().flatten().collect(),
        };
        if let Some(location) = parts.headers.get(header::LOCATION).and_then(|l| l.to_str().ok()) {
            let location = rewriter.url(location);
            if let Ok(value) = HeaderValue::from_str(&location) {
                parts.headers.insert(header::LOCATION, value);
            }
            return Ok(Response::from_parts(parts, Body::new(body)));
        }
        let media_type =
            |v: &HeaderValue| v.to_str().ok().map(|t| t.split(';').next().unwrap_or_default().trim() == "text/html");
        let html = parts.headers.get(header::CONTENT_TYPE).and_then(media_type).unwrap_or(false);
        let encoded = parts.headers.get(header::CONTENT_ENCODING).is_some_and(|e| e != "identity");
        if !html || encoded {
            return Ok(Response::from_parts(parts, Body::new(body)));
        }
        let bytes = http_body_util::BodyExt::collect(body)
            .await
            .map_err(|e| ApiError::new(503, "ServiceUnavailable", format!("error trying to reach service: {e}")))?
            .to_bytes();
        let page = rewriter.html(&String::from_utf8_lossy(&bytes));
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(Response::from_parts(parts, Body::from(page)))
    }
}

/// `[scheme:]name[:port]`, as upstream's `SplitSchemeNamePort`.
fn split_id(id: &str) -> ApiResult<(&str, &str, &str)> {
    let parts: Vec<&str> = id.split(':').collect();
    let (scheme, name, port) = match parts.as_slice() {
        [name] => ("", *name, ""),
        [name, port] => ("", *name, *port),
        [scheme, name, port] => (*scheme, *name, *port),
        _ => ("", "", ""),
    };
    if name.is_empty() || !["", "http", "https"].contains(&scheme) {
        return Err(ApiError::bad_request(format!("invalid request {id:?}")));
    }
    Ok((if scheme.is_empty() { "http" } else { scheme }, name, port))
}

/// The pod's IP and the port to reach: the one asked for, else its first container port.
fn pod_location(pod: &Value, name: &str, port: &str) -> ApiResult<(String, u16)> {
    let ip = pod["status"]["podIP"].as_str().unwrap_or_default();
    let ip: std::net::IpAddr =
        ip.parse().map_err(|_| ApiError::bad_request(format!("address not allowed: pod {name} has no IP yet")))?;
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return Err(ApiError::bad_request(format!("address not allowed: {ip}")));
    }
    let port = match port {
        "" => pod["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|c| c["ports"][0]["containerPort"].as_u64())
            .unwrap_or(80),
        given => given.parse().map_err(|_| ApiError::bad_request(format!("invalid port {given:?}")))?,
    };
    Ok((ip.to_string(), port as u16))
}

/// A Service and its Endpoints as the watch cache has them (how webhooks and extension
/// API servers are reached, as upstream's resolvers read informers: a consistent read
/// would cost a store round trip on every call).
pub(crate) fn cached_service(
    storage: &crate::registry::Storage,
    namespace: &str,
    name: &str,
) -> Result<(Value, Option<Value>), String> {
    let services = storage.builtin::<core::Service>(Some(namespace.to_string()));
    let service =
        storage.cached(&services, name).map_err(|_| format!("service \"{namespace}/{name}\" not found"))?.parse();
    let endpoints = storage.builtin::<core::Endpoints>(Some(namespace.to_string()));
    Ok((service, storage.cached(&endpoints, name).ok().map(|e| e.parse())))
}

/// A random ready endpoint of the service port named (by number or name) in `port`.
pub(crate) fn service_location(
    service: &Value,
    endpoints: Option<&Value>,
    name: &str,
    port: &str,
) -> ApiResult<(String, u16)> {
    let unavailable = |message: String| ApiError::new(503, "ServiceUnavailable", message);
    let mut port_name = port.to_string();
    if let Ok(number) = port.parse::<u64>() {
        let ports = service["spec"]["ports"].as_array().into_iter().flatten();
        let Some(declared) = ports.into_iter().find(|p| p["port"].as_u64() == Some(number)) else {
            return Err(unavailable(format!("no service port {number} found for service {name:?}")));
        };
        port_name = declared["name"].as_str().unwrap_or_default().to_string();
    }
    let subsets: Vec<&Value> = endpoints
        .and_then(|e| e["subsets"].as_array())
        .into_iter()
        .flatten()
        .filter(|s| s["addresses"].as_array().is_some_and(|a| !a.is_empty()))
        .collect();
    let mut rng = rand::rng();
    let start = if subsets.is_empty() { 0 } else { rng.random_range(0..subsets.len()) };
    for i in 0..subsets.len() {
        let subset = subsets[(start + i) % subsets.len()];
        let ports = subset["ports"].as_array().into_iter().flatten();
        let Some(target) = ports.into_iter().find(|p| p["name"].as_str().unwrap_or_default() == port_name) else {
            continue;
        };
        let addresses = subset["addresses"].as_array().expect("filtered above");
        let address = &addresses[rng.random_range(0..addresses.len())];
        if let (Some(ip), Some(port)) = (address["ip"].as_str(), target["port"].as_u64()) {
            return Ok((ip.to_string(), port as u16));
        }
    }
    Err(unavailable(format!("no endpoints available for service {name:?}")))
}

/// `headers` without the hop-by-hop ones (and those a `Connection` header names) and the
/// client's credentials.
pub(crate) fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let named_by_connection: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|n| n.trim().to_ascii_lowercase()))
        .collect();
    let hop_by_hop = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::AUTHORIZATION,
        header::HOST,
    ];
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if !hop_by_hop.contains(name) && !named_by_connection.iter().any(|n| n == name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_name_scheme_and_port() {
        assert_eq!(split_id("web").unwrap(), ("http", "web", ""));
        assert_eq!(split_id("web:8080").unwrap(), ("http", "web", "8080"));
        assert_eq!(split_id("https:web:443").unwrap(), ("https", "web", "443"));
        assert!(split_id("ftp:web:21").is_err());
        assert!(split_id("a:b:c:d").is_err());
    }

    #[test]
    fn service_ports_are_found_by_number_or_name() {
        let service = json!({"spec": {"ports": [{"name": "http", "port": 80}, {"name": "tls", "port": 443}]}});
        let endpoints = json!({"subsets": [{"addresses": [{"ip": "10.0.0.5"}],
            "ports": [{"name": "http", "port": 8080}, {"name": "tls", "port": 8443}]}]});
        assert_eq!(service_location(&service, Some(&endpoints), "s", "80").unwrap(), ("10.0.0.5".into(), 8080));
        assert_eq!(service_location(&service, Some(&endpoints), "s", "tls").unwrap(), ("10.0.0.5".into(), 8443));
        let err = service_location(&service, Some(&endpoints), "s", "81").unwrap_err();
        assert_eq!((err.code, err.message.as_str()), (503, r#"no service port 81 found for service "s""#));
        let err = service_location(&service, None, "s", "80").unwrap_err();
        assert_eq!(err.message, r#"no endpoints available for service "s""#);
    }

    #[test]
    fn hop_by_hop_headers_and_credentials_stay_behind() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer secret"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
        let kept = forwarded_headers(&headers);
        assert_eq!(kept.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);
    }
}

//! The HTTP front: routing, content negotiation, body decoding and the REST verbs,
//! all generic over the kinds table.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use krate_api::patch::PatchType;
use krate_api::selectors::{FieldSelector, LabelSelector};
use krate_api::{ApiError, ApiResult, KindInfo};
use serde_json::{json, Value};

use crate::auth::User;
use crate::registry::{
    self, check_fields, decode_body, served_json, DeleteOptions, FieldValidation, ListOptions, Scope, Subresource,
    WriteOptions, Written,
};
use crate::request::{RequestAttributes, Verb};
use crate::ApiServer;

pub mod discovery;
pub mod docs;
pub mod negotiate;
pub mod openapi;
pub mod route;
pub mod table;
pub mod watch;

use negotiate::Format;
use route::{parse_path, parse_query, ResourcePath, Route};

/// Upstream's limit on request bodies.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Past this, an oversized body is no longer drained and the connection is dropped.
const MAX_DRAINED_BYTES: usize = 64 * 1024 * 1024;

pub type Query = HashMap<String, String>;

/// A JSON body as upstream writes it: followed by a newline, a `Status` in its Go
/// field order.
pub fn json_response(code: u16, body: &Value) -> Response<Body> {
    bytes_response(code, json_body(body), "application/json")
}

/// `body` encoded as upstream's JSON serializer does (see `json_response`).
fn json_body(body: &Value) -> Bytes {
    let mut bytes = krate_api::protobuf::to_go_json(body);
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Already encoded JSON, with the newline upstream's encoder ends each body with.
fn with_newline(json: Bytes) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 1);
    out.put_slice(&json);
    out.put_u8(b'\n');
    out.freeze()
}

pub fn bytes_response(code: u16, body: Bytes, content_type: &str) -> Response<Body> {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("application/json")),
    );
    resp
}

pub fn error_response(err: &ApiError) -> Response<Body> {
    let mut resp = json_response(err.code, &err.to_status());
    if let Some(seconds) = err.retry_after_seconds {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    resp
}

fn with_warnings(mut resp: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        let text = format!("299 - {}", serde_json::to_string(w).unwrap_or_default());
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

/// Entry point for every request.
pub async fn handle(server: Arc<ApiServer>, user: User, req: Request<Body>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = parse_path(&path);
    let (verb, resource) = metrics_labels(&method, &route, req.uri().query());
    // Proxied answers are the backend's, and watches stream: neither is re-indented.
    let passed_through = match &route {
        Route::Resource(r) if r.subresource.as_deref() == Some("proxy") => true,
        // An extension API server's answers are its own.
        Route::Resource(ResourcePath { group, version, .. }) | Route::GroupVersion { group, version } => {
            server.aggregator.remote_for(&server.storage, group, version).is_some()
        }
        _ => false,
    };
    let pretty = verb != "WATCH" && !passed_through && pretty_requested(&req);
    let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let protobuf_wanted = matches!(negotiate::negotiate(accept, true), Ok(Format::Protobuf));
    let req = if passed_through { req } else { read_ahead(req).await };
    let authenticated = match bearer_token(req.headers()) {
        // A client certificate comes first, as upstream's union of authenticators.
        Some(token) if user.is_anonymous() => server.authenticate_token(token).await,
        _ => Ok(user),
    };
    let authenticated =
        authenticated.and_then(|user| crate::auth::impersonate(req.headers(), user, &server.authorizer));
    let (user_name, response) = match authenticated {
        Ok(user) => {
            // Who asks for what, built once and shared by every later stage.
            let query = parse_query(req.uri().query());
            let mut attrs = RequestAttributes::new(user, req.method(), &path, &route, &query);
            attrs.source = req.extensions().get::<crate::auth::SourceIp>().map(|s| s.0);
            let attrs = Arc::new(attrs);
            let response = match &server.settings.audit {
                Some(auditor) => audited(&server, auditor, &attrs, route, query, req).await,
                None => authorized_dispatch(&server, &attrs, route, query, req).await.0,
            };
            (attrs.user.name.clone(), response)
        }
        Err(err) => (User::anonymous().name, error_response(&err)),
    };
    let response = if pretty { prettified(response).await } else { response };
    let response =
        if protobuf_wanted && !passed_through && verb != "WATCH" { in_protobuf(response).await } else { response };
    let code = response.status().as_u16();
    server.metrics.observe_request(&verb, &resource, code, started.elapsed());
    if code >= 500 {
        tracing::warn!(%method, %path, code, user = %user_name, "request failed");
    } else {
        tracing::debug!(%method, %path, code, user = %user_name, elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "request");
    }
    response
}

/// Authorizes, then serves; the response carries the warnings of every stage. Also
/// says whether the authorizer refused it (for the audit log).
async fn authorized_dispatch(
    server: &Arc<ApiServer>,
    attrs: &Arc<RequestAttributes>,
    route: Route,
    query: Query,
    req: Request<Body>,
) -> (Response<Body>, bool) {
    if let Err(err) = server.authorizer.authorize(attrs) {
        return (error_response(&err), true);
    }
    let response = match dispatch(server, attrs, route, query, req).await {
        Ok(resp) => with_warnings(resp, &attrs.take_warnings()),
        Err(err) => error_response(&err),
    };
    (response, false)
}

/// `authorized_dispatch` with its audit events: the request and response bodies are
/// read into memory only at the levels that keep them, and never for watches and
/// upgraded connections.
async fn audited(
    server: &Arc<ApiServer>,
    auditor: &crate::audit::Auditor,
    attrs: &Arc<RequestAttributes>,
    route: Route,
    query: Query,
    req: Request<Body>,
) -> Response<Body> {
    use crate::audit::{Level, Outcome};
    let uri = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    let source = req.extensions().get::<crate::auth::SourceIp>().map(|s| s.0.to_string());
    let agent = req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let Some(record) = auditor.begin(attrs, &uri, source.as_deref().unwrap_or("127.0.0.1"), &agent) else {
        return authorized_dispatch(server, attrs, route, query, req).await.0;
    };
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let streaming_verb = attrs.verb == crate::request::Verb::Watch;
    let (req, request_object) = if record.level_at_least(Level::Request) && !upgrade && req.method() != Method::GET {
        let (parts, body) = req.into_parts();
        match http_body_util::BodyExt::collect(body).await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                // Whatever the body's encoding (JSON, YAML, protobuf), the log shows JSON.
                let object = parse_body(&content_type(&parts.headers), &bytes).ok();
                (Request::from_parts(parts, Body::from(bytes)), object)
            }
            Err(e) => return error_response(&ApiError::bad_request(format!("reading the request body: {e}"))),
        }
    } else {
        (req, None)
    };
    let (mut response, forbidden_by_authorizer) = authorized_dispatch(server, attrs, route, query, req).await;
    let code = response.status().as_u16();
    let streaming = streaming_verb || code == 101;
    let keep_body = !streaming && (code >= 400 || record.level_at_least(Level::RequestResponse));
    let mut response_object = None;
    if keep_body {
        let (parts, body) = response.into_parts();
        let bytes = http_body_util::BodyExt::collect(body).await.map(|c| c.to_bytes()).unwrap_or_default();
        // The log shows JSON whatever the client was answered in.
        response_object = match bytes.starts_with(krate_api::protobuf::MAGIC) {
            true => krate_api::protobuf::decode(&bytes).ok(),
            false => serde_json::from_slice::<Value>(&bytes).ok(),
        };
        response = Response::from_parts(parts, Body::from(bytes));
    }
    if let Ok(id) = HeaderValue::from_str(record.id()) {
        response.headers_mut().insert("audit-id", id);
    }
    auditor.finish(
        record,
        Outcome {
            code,
            request: request_object,
            response: response_object,
            streaming,
            forbidden_by_authorizer,
            annotations: attrs.audit_annotations(),
        },
    );
    response
}

/// Upstream's `isPrettyPrint`: `?pretty=` when given, else a user agent of a browser,
/// curl or Wget.
fn pretty_requested<B>(req: &Request<B>) -> bool {
    let query = req.uri().query().unwrap_or_default();
    if query.contains("pretty") {
        if let Some((_, value)) = form_urlencoded::parse(query.as_bytes()).find(|(k, v)| k == "pretty" && !v.is_empty())
        {
            return matches!(value.as_ref(), "1" | "t" | "T" | "true" | "TRUE" | "True");
        }
    }
    let agent = req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    ["curl", "Wget", "Mozilla/5.0"].iter().any(|p| agent.starts_with(p))
}

/// A JSON answer indented as Go's `json.MarshalIndent(obj, "", "  ")` writes it (no
/// final newline), keeping its fields' order.
async fn prettified(response: Response<Body>) -> Response<Body> {
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !json || response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(collected) = http_body_util::BodyExt::collect(body).await else {
        return error_response(&ApiError::internal("reading the response to indent it"));
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(krate_api::object::indent_json(&collected.to_bytes())))
}

/// A JSON answer (a `Status`, a subresource's object, a handler's) re-encoded as
/// protobuf for a client that prefers it, when its kind has a protobuf form. Objects,
/// lists and watches are encoded directly where they are served.
async fn in_protobuf(response: Response<Body>) -> Response<Body> {
    let plain_json = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v == "application/json");
    if !plain_json || response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(collected) = http_body_util::BodyExt::collect(body).await else {
        return error_response(&ApiError::internal("reading the response to encode it"));
    };
    let json = collected.to_bytes();
    let Some(encoded) = serde_json::from_slice::<Value>(&json).ok().and_then(|v| krate_api::protobuf::encode(&v))
    else {
        return Response::from_parts(parts, Body::from(json));
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(krate_api::protobuf::CONTENT_TYPE));
    Response::from_parts(parts, Body::from(encoded))
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

fn metrics_labels(method: &Method, route: &Route, query: Option<&str>) -> (String, String) {
    let watch = query.is_some_and(|q| q.contains("watch=true") || q.contains("watch=1"));
    match route {
        Route::Resource(r) => {
            let verb = match (method.as_str(), r.name.is_some()) {
                ("GET", _) if watch => "WATCH",
                ("GET", false) => "LIST",
                ("DELETE", false) => "DELETECOLLECTION",
                (m, _) => m,
            };
            let mut resource = r.resource.clone();
            if let Some(sub) = &r.subresource {
                resource = format!("{resource}/{sub}");
            }
            (verb.to_string(), resource)
        }
        _ => (method.as_str().to_string(), String::new()),
    }
}

async fn dispatch(
    server: &Arc<ApiServer>,
    attrs: &Arc<RequestAttributes>,
    route: Route,
    query: Query,
    req: Request<Body>,
) -> ApiResult<Response<Body>> {
    match route {
        Route::Health(check) => Ok(server.health(check, query.contains_key("verbose")).await),
        Route::Version => Ok(json_response(200, &crate::version_info())),
        Route::Metrics => Ok(bytes_response(
            200,
            Bytes::from(server.metrics.render(&server.storage.cache)),
            "text/plain; version=0.0.4; charset=utf-8",
        )),
        Route::LegacyRoot | Route::GroupList => {
            let core = route == Route::LegacyRoot;
            let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
            match discovery::wants_aggregated(accept) {
                Some(media) => {
                    let kinds = server.kinds();
                    let api_version = if media.contains("v=v2beta1") {
                        "apidiscovery.k8s.io/v2beta1"
                    } else {
                        "apidiscovery.k8s.io/v2"
                    };
                    let key = format!("discovery {core} {api_version}");
                    let doc = server.documents.get(&kinds, server.aggregator.generation(), &key, || {
                        Ok(discovery::aggregated(&kinds, &server.aggregator.remotes(), core, api_version))
                    })?;
                    Ok(document_response(&doc, media, req.headers()))
                }
                None if core => Ok(json_response(200, &discovery::legacy_root(&server.settings.advertise_address))),
                None => {
                    let remote = server.aggregator.remote_groups(&server.storage);
                    Ok(json_response(200, &discovery::group_list(&server.kinds(), &remote)))
                }
            }
        }
        Route::Group(group) => {
            let remote = server.aggregator.remote_groups(&server.storage);
            discovery::group(&server.kinds(), &remote, &group).map(|v| json_response(200, &v))
        }
        Route::GroupVersion { group, version } => {
            match server.aggregator.remote_for(&server.storage, &group, &version) {
                Some(api_service) => Ok(crate::aggregator::proxy::serve(server, &attrs.user, &api_service, req).await),
                None => discovery::resource_list(&server.kinds(), &group, &version).map(|v| json_response(200, &v)),
            }
        }
        Route::OpenApiV2 => {
            let kinds = server.kinds();
            let doc = server.documents.get(&kinds, server.aggregator.generation(), "openapi/v2", || {
                let mut doc = openapi::v2(&kinds);
                server.aggregator.merge_openapi_v2(&mut doc);
                Ok(doc)
            })?;
            Ok(document_response(&doc, "application/json", req.headers()))
        }
        // Upstream serves both as application/json (the key set as jwk-set+json).
        Route::OpenIdConfiguration => Ok(json_response(200, &server.tokens.discovery())),
        Route::OpenIdKeys => {
            Ok(bytes_response(200, Bytes::from(server.tokens.jwks().to_string()), "application/jwk-set+json"))
        }
        Route::OpenApiV3Root => {
            let kinds = server.kinds();
            let mut etags = HashMap::new();
            for g in kinds.groups() {
                for v in &g.versions {
                    // A group/version without schemas (metrics.k8s.io) has no document.
                    if let Ok(doc) = openapi_v3_document(server, &kinds, &g.name, v) {
                        etags.insert(route::gv_path(&g.name, v), doc.etag);
                    }
                }
            }
            let mut root = openapi::v3_root(&kinds, |p| etags.get(p).cloned().unwrap_or_default());
            // Remote group/versions: their servers answer for their documents.
            for remote in server.aggregator.remotes() {
                let path = route::gv_path(&remote.group, &remote.version);
                let url = format!("/openapi/v3/{path}?hash={:016X}", server.aggregator.generation());
                root["paths"][path] = json!({"serverRelativeURL": url});
            }
            Ok(json_response(200, &root))
        }
        Route::OpenApiV3 { group, version } => {
            if let Some(api_service) = server.aggregator.remote_for(&server.storage, &group, &version) {
                return Ok(crate::aggregator::proxy::serve(server, &attrs.user, &api_service, req).await);
            }
            let kinds = server.kinds();
            let doc = openapi_v3_document(server, &kinds, &group, &version)?;
            Ok(document_response(&doc, "application/json", req.headers()))
        }
        Route::Resource(path) => match server.aggregator.remote_for(&server.storage, &path.group, &path.version) {
            Some(api_service) => Ok(crate::aggregator::proxy::serve(server, &attrs.user, &api_service, req).await),
            None => resource_request(server, attrs, path, query, req).await,
        },
        Route::NotFound => Err(ApiError::no_such_path()),
    }
}

fn openapi_v3_document(
    server: &ApiServer,
    kinds: &Arc<krate_api::Registry>,
    group: &str,
    version: &str,
) -> ApiResult<docs::Document> {
    server.documents.get(kinds, server.aggregator.generation(), &format!("openapi/v3/{group}/{version}"), || {
        openapi::v3_group_version(kinds, group, version)
    })
}

/// A cached document, or 304 when the client already has this version of it.
fn document_response(doc: &docs::Document, content_type: &str, request: &HeaderMap) -> Response<Body> {
    let etag = format!("\"{}\"", doc.etag);
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        bytes_response(304, Bytes::new(), content_type)
    } else {
        bytes_response(200, doc.body.clone(), content_type)
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp.headers_mut().insert(header::VARY, HeaderValue::from_static("Accept"));
    resp
}

fn lookup(server: &ApiServer, path: &ResourcePath) -> ApiResult<Arc<KindInfo>> {
    let kinds = server.kinds();
    let kind = kinds.lookup(&path.group, &path.version, &path.resource).cloned().ok_or_else(ApiError::no_such_path)?;
    if path.namespace.is_some() && !kind.namespaced {
        return Err(ApiError::no_such_path());
    }
    Ok(kind)
}

/// What serves a request's resource or subresource: the generic storage path, or a
/// handler the kinds table names.
enum Target {
    Generic(Subresource),
    Handler(krate_api::kinds::SubresourceHandler, &'static [&'static str]),
}

fn target(kind: &KindInfo, path: &ResourcePath) -> ApiResult<Target> {
    let Some(name) = path.subresource.as_deref() else {
        return Ok(match kind.handler {
            Some(handler) => Target::Handler(handler, &[]),
            None => Target::Generic(Subresource::Main),
        });
    };
    match name {
        "status" if kind.status => Ok(Target::Generic(Subresource::Status)),
        "scale" if kind.scale.is_some() => Ok(Target::Generic(Subresource::Scale)),
        _ => {
            let declared = kind.subresource(name).ok_or_else(ApiError::no_such_path)?;
            Ok(match declared.handler {
                // Served by the generic path, as a status-like write.
                krate_api::kinds::SubresourceHandler::Approval => Target::Generic(Subresource::Approval),
                krate_api::kinds::SubresourceHandler::EphemeralContainers => {
                    Target::Generic(Subresource::EphemeralContainers)
                }
                krate_api::kinds::SubresourceHandler::Resize => Target::Generic(Subresource::Resize),
                handler => Target::Handler(handler, declared.verbs),
            })
        }
    }
}

fn flag(query: &Query, key: &str) -> bool {
    matches!(query.get(key).map(String::as_str), Some("true" | "1"))
}

/// Upstream's default field manager: the user agent up to its first '/'.
fn default_field_manager(headers: &HeaderMap) -> String {
    let agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    agent.split('/').next().unwrap_or_default().chars().take(128).collect()
}

/// Write parameters. Server-side apply requires an explicit field manager; other
/// writes default to the user agent's.
pub(crate) fn write_options(
    attrs: &Arc<RequestAttributes>,
    query: &Query,
    headers: &HeaderMap,
    apply: bool,
) -> ApiResult<WriteOptions> {
    let dry_run = match query.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: {other:?}: supported values: \"All\""
            )))
        }
    };
    let field_validation = match query.get("fieldValidation").map(String::as_str) {
        None | Some("") | Some("Warn") => FieldValidation::Warn,
        Some("Strict") => FieldValidation::Strict,
        Some("Ignore") => FieldValidation::Ignore,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
            )))
        }
    };
    let field_manager = match query.get("fieldManager") {
        Some(m) if m.chars().count() > 128 => {
            return Err(ApiError::invalid(
                "meta.k8s.io",
                "PatchOptions",
                "",
                &[krate_api::FieldError::too_long("fieldManager", 128)],
            ))
        }
        Some(m) if !m.is_empty() => m.clone(),
        _ if apply => String::new(),
        _ => default_field_manager(headers),
    };
    let force = flag(query, "force");
    Ok(WriteOptions { dry_run, field_validation, field_manager, force, request: Some(attrs.clone()) })
}

pub(crate) fn list_options(kind: &KindInfo, query: &Query) -> ApiResult<ListOptions> {
    let labels = LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    for r in &fields.requirements {
        if !kind.supports_field(&r.field) {
            return Err(ApiError::bad_request(format!("field label not supported: {}", r.field)));
        }
    }
    let limit = match query.get("limit").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(l) => Some(l.parse::<usize>().map_err(|_| ApiError::bad_request(format!("limit: Invalid value: {l:?}")))?),
    };
    Ok(ListOptions {
        labels,
        fields,
        limit,
        continue_token: query.get("continue").filter(|c| !c.is_empty()).cloned(),
        resource_version: query.get("resourceVersion").cloned(),
        resource_version_match: query.get("resourceVersionMatch").filter(|m| !m.is_empty()).cloned(),
    })
}

pub(crate) async fn read_body(req: Request<Body>) -> ApiResult<(HeaderMap, Bytes)> {
    let (parts, body) = req.into_parts();
    if let Some(BodyError(err)) = parts.extensions.get::<BodyError>() {
        return Err(err.clone());
    }
    Ok((parts.headers, collect_bounded(body).await?))
}

/// What reading a body read ahead (`read_ahead`) ran into, kept for the handler to answer.
#[derive(Clone)]
struct BodyError(ApiError);

/// The body in full, refused past `MAX_BODY_BYTES`. Oversized bodies are drained (up to
/// a bound) rather than cut off, so the client reads the 413 instead of a broken
/// connection.
async fn collect_bounded(mut body: Body) -> ApiResult<Bytes> {
    let mut buf = BytesMut::new();
    let mut too_large = false;
    let mut drained = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the request body failed: {e}")))?;
        if let Ok(data) = frame.into_data() {
            drained += data.len();
            if drained > MAX_DRAINED_BYTES {
                return Err(ApiError::too_large());
            }
            if buf.len() + data.len() > MAX_BODY_BYTES {
                too_large = true;
                buf.clear();
            }
            if !too_large {
                buf.extend_from_slice(&data);
            }
        }
    }
    if too_large {
        return Err(ApiError::too_large());
    }
    Ok(buf.freeze())
}

/// Reads a write's body before anything answers the request: an answer given before
/// the handler would have read it (a 406, a 404, a refusal) then leaves the connection
/// reusable, where hyper would close a connection with an unread body. Proxied and
/// upgraded requests keep their streams.
async fn read_ahead(req: Request<Body>) -> Request<Body> {
    let writes = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
    if !writes || req.headers().contains_key(header::UPGRADE) {
        return req;
    }
    let (mut parts, body) = req.into_parts();
    match collect_bounded(body).await {
        Ok(bytes) => Request::from_parts(parts, Body::from(bytes)),
        Err(err) => {
            parts.extensions.insert(BodyError(err));
            Request::from_parts(parts, Body::empty())
        }
    }
}

pub(crate) fn content_type(headers: &HeaderMap) -> String {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json").to_string()
}

/// A key repeated in a YAML (or JSON) mapping, as upstream's strict YAML decoding
/// reports it: `error converting YAML to JSON: yaml: unmarshal errors:\n  line 9: key
/// "foo" already set in map`.
fn yaml_duplicate_key(body: &[u8]) -> Option<String> {
    let err = serde_yaml::from_slice::<serde_yaml::Value>(body).err()?;
    let text = err.to_string();
    let key = text.split_once("duplicate entry with key ")?.1;
    let key = key.split(" at line ").next().unwrap_or(key).trim_matches('"');
    // serde_yaml points at the mapping; upstream names the line of the second key: the
    // mapping's lines at its indentation are searched for it (block style).
    let (start, column) = err.location().map(|l| (l.line(), l.column())).unwrap_or((0, 1));
    let indent = " ".repeat(column.saturating_sub(1));
    let mut seen = 0;
    let line = String::from_utf8_lossy(body)
        .lines()
        .enumerate()
        .skip(start.saturating_sub(1))
        .take_while(|(_, l)| l.trim().is_empty() || l.starts_with(&indent))
        .find(|(_, l)| {
            let own = l.strip_prefix(&indent).filter(|rest| !rest.starts_with(' '));
            let matches = own.is_some_and(|rest| {
                let after = rest.trim_start_matches(['"', '\'']).strip_prefix(key);
                after.is_some_and(|a| a.starts_with([':', '"', '\'']))
            });
            seen += usize::from(matches);
            seen == 2
        })
        .map_or(start, |(n, _)| n + 1);
    Some(format!(
        "error converting YAML to JSON: yaml: unmarshal errors:\n  line {line}: key {key:?} already set in map"
    ))
}

/// Parses a JSON or YAML body into a value.
pub fn parse_body(content_type: &str, body: &[u8]) -> ApiResult<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence == krate_api::protobuf::CONTENT_TYPE {
        return krate_api::protobuf::decode(body)
            .map_err(|e| ApiError::bad_request(format!("the protobuf body could not be decoded: {e}")));
    }
    let yaml = essence.ends_with("yaml");
    let parsed = if yaml {
        serde_yaml::from_slice::<Value>(body).map_err(|e| format!("yaml: {e}"))
    } else {
        serde_json::from_slice::<Value>(body).map_err(|e| format!("json parse error: {e}"))
    };
    parsed.map_err(|e| ApiError::bad_request(format!("couldn't get version/kind; {e}")))
}

pub(crate) fn decode_object_body(
    kind: &KindInfo,
    headers: &HeaderMap,
    body: &[u8],
    opts: &WriteOptions,
) -> ApiResult<(Value, Vec<String>)> {
    let ct = content_type(headers);
    let essence = ct.split(';').next().unwrap_or_default().trim();
    if !matches!(
        essence,
        "application/json"
            | "application/yaml"
            | "application/x-yaml"
            | "text/yaml"
            | ""
            | krate_api::protobuf::CONTENT_TYPE
    ) {
        return Err(ApiError::unsupported_media_type(&ct));
    }
    let value = parse_body(&ct, body)?;
    let duplicate = if essence == "application/json" && opts.field_validation != FieldValidation::Ignore {
        krate_api::validation::duplicate_json_fields(body)
    } else {
        vec![]
    };
    let (canonical, unknown) = decode_body(kind, value)?;
    let warnings = check_fields(kind, &unknown, &duplicate, opts.field_validation)?;
    Ok((canonical, warnings))
}

pub(crate) fn written_response(w: Written, format: &Format, kind: &KindInfo) -> Response<Body> {
    let body = match format {
        Format::Table { .. } => table::object_table(kind, &w.body),
        Format::Metadata => negotiate::partial_metadata(&w.body),
        Format::Protobuf => {
            if let Some(encoded) = krate_api::protobuf::encode(&w.body) {
                let resp = bytes_response(w.code, Bytes::from(encoded), krate_api::protobuf::CONTENT_TYPE);
                return with_warnings(resp, &w.warnings);
            }
            w.body
        }
        Format::Json => w.body,
    };
    let content_type = format.content_type();
    with_warnings(bytes_response(w.code, json_body(&body), &content_type), &w.warnings)
}

async fn resource_request(
    server: &Arc<ApiServer>,
    attrs: &Arc<RequestAttributes>,
    path: ResourcePath,
    query: Query,
    req: Request<Body>,
) -> ApiResult<Response<Body>> {
    let kind = lookup(server, &path)?;
    let target = target(&kind, &path)?;
    let method = req.method().clone();
    let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = negotiate::negotiate(accept, kind.protobuf_message().is_some())?
        .with_include_object(query.get("includeObject").map(String::as_str));
    // Create-only kinds (the reviews) are not stored: upstream has no table for them.
    if matches!(format, Format::Table { .. }) && !kind.verbs.iter().any(|v| v == "get" || v == "list") {
        return Err(ApiError::not_acceptable(
            "only the following media types are accepted: application/json, application/yaml, application/vnd.kubernetes.protobuf",
        ));
    }
    let scope = Scope { kind: kind.clone(), namespace: path.namespace.clone() };
    let storage = &server.storage;
    let not_allowed =
        || ApiError::method_not_allowed("the server does not allow this method on the requested resource");
    let verb = &attrs.verb;
    let named = path.name.is_some();
    // A proxy subresource passes any method on.
    let proxy = matches!(target, Target::Handler(krate_api::kinds::SubresourceHandler::Proxy, _)) && named;
    let allowed = match target {
        _ if proxy => true,
        // A handled subresource takes the verbs the kinds table gives it.
        Target::Handler(_, verbs) if named && path.subresource.is_some() => verbs.contains(&verb.as_str()),
        _ => kind.verbs.iter().any(|v| v == verb.as_str()),
    };
    let fits_path = match verb {
        _ if proxy => true,
        _ if method == Method::HEAD => false,
        Verb::Create if named => matches!(target, Target::Handler(..)),
        Verb::Create => !kind.namespaced || scope.namespace.is_some(),
        Verb::Update | Verb::Patch | Verb::Delete => named,
        Verb::Get | Verb::List | Verb::Watch | Verb::DeleteCollection => true,
        Verb::Other(_) => false,
    };
    if !fits_path || !allowed {
        return Err(not_allowed());
    }
    let name = path.name.as_deref().unwrap_or_default();
    let sub = match target {
        Target::Handler(handler, _) => {
            let call = crate::rest::Call { server, attrs, scope, name, query: &query, format, req };
            return crate::rest::handler(handler).serve(call).await;
        }
        Target::Generic(sub) => sub,
    };
    match verb {
        Verb::Watch => watch::serve(server.clone(), scope, list_options(&kind, &query)?, &query, format).await,
        Verb::List => list_response(&kind, storage.list(&scope, &list_options(&kind, &query)?).await?, &format),
        Verb::Get => {
            let obj = storage.get(&scope, name).await?;
            match sub {
                Subresource::Scale => Ok(json_response(200, &registry::scale_of(&kind, &obj.parse()))),
                _ => object_response(&kind, &obj, &format),
            }
        }
        Verb::Create | Verb::Update => {
            let (headers, body) = read_body(req).await?;
            let opts = write_options(attrs, &query, &headers, false)?;
            let (obj, warnings) = if sub == Subresource::Scale {
                (parse_body(&content_type(&headers), &body)?, vec![])
            } else {
                decode_object_body(&kind, &headers, &body, &opts)?
            };
            let mut written = if *verb == Verb::Create {
                storage.create(&scope, obj, &opts).await?
            } else {
                storage.update(&scope, name, sub, obj, &opts).await?
            };
            written.warnings.extend(warnings);
            Ok(written_response(written, &format, &kind))
        }
        Verb::Patch => {
            let (headers, body) = read_body(req).await?;
            let ct = content_type(&headers);
            let patch_type = PatchType::from_content_type(&ct)
                .ok_or_else(|| ApiError::unsupported_among(&ct, registry::patch_types(&kind)))?;
            let opts = write_options(attrs, &query, &headers, patch_type == PatchType::Apply)?;
            if opts.force && patch_type != PatchType::Apply {
                return Err(ApiError::invalid(
                    "meta.k8s.io",
                    "PatchOptions",
                    "",
                    &[krate_api::FieldError::forbidden("force", "may not be specified for non-apply patch")],
                ));
            }
            if patch_type == PatchType::Apply && opts.field_validation == registry::FieldValidation::Strict {
                if let Some(duplicate) = yaml_duplicate_key(&body) {
                    return Err(ApiError::bad_request(format!("error strict decoding YAML: {duplicate}")));
                }
            }
            let patch = parse_body(&ct, &body)?;
            let written = storage.patch(&scope, name, sub, patch_type, patch, &opts).await?;
            Ok(written_response(written, &format, &kind))
        }
        Verb::Delete => {
            let (headers, body) = read_body(req).await?;
            let opts = DeleteOptions { request: Some(attrs.clone()), ..delete_options(&query, &headers, &body)? };
            let written = storage.delete(&scope, name, &opts).await?;
            Ok(json_response(written.code, &written.body))
        }
        _ => {
            let (headers, body) = read_body(req).await?;
            let opts = DeleteOptions { request: Some(attrs.clone()), ..delete_options(&query, &headers, &body)? };
            let deleted = storage.delete_collection(&scope, &list_options(&kind, &query)?, &opts).await?;
            Ok(json_response(
                200,
                &json!({
                    "kind": kind.list_kind(), "apiVersion": kind.api_version(),
                    "metadata": {"resourceVersion": storage.cache.revision().to_string()}, "items": deleted,
                }),
            ))
        }
    }
}

pub(crate) fn delete_options(query: &Query, headers: &HeaderMap, body: &[u8]) -> ApiResult<DeleteOptions> {
    let from_body =
        if body.iter().all(u8::is_ascii_whitespace) { Value::Null } else { parse_body(&content_type(headers), body)? };
    let field = |name: &str| from_body.get(name).cloned().filter(|v| !v.is_null());
    let grace_period_seconds = match (field("gracePeriodSeconds"), query.get("gracePeriodSeconds")) {
        (Some(v), _) => v.as_i64(),
        (None, Some(q)) => Some(
            q.parse::<i64>().map_err(|_| ApiError::bad_request(format!("gracePeriodSeconds: Invalid value: {q:?}")))?,
        ),
        _ => None,
    };
    let propagation_policy = field("propagationPolicy")
        .and_then(|v| v.as_str().map(str::to_string))
        .or_else(|| query.get("propagationPolicy").cloned());
    if let Some(p) = &propagation_policy {
        if !["Orphan", "Background", "Foreground"].contains(&p.as_str()) {
            return Err(ApiError::invalid(
                "",
                "DeleteOptions",
                "",
                &[krate_api::FieldError::not_supported(
                    "propagationPolicy",
                    &json!(p),
                    &["Foreground", "Background", "Orphan"],
                )],
            ));
        }
    }
    let orphan_dependents = field("orphanDependents")
        .and_then(|v| v.as_bool())
        .or_else(|| query.get("orphanDependents").map(|v| v == "true"));
    let dry_run = field("dryRun").and_then(|v| v.as_array().map(|a| a.iter().any(|x| x == "All"))).unwrap_or(false)
        || query.get("dryRun").is_some_and(|v| v == "All");
    Ok(DeleteOptions {
        grace_period_seconds,
        propagation_policy,
        orphan_dependents,
        precondition_uid: from_body.pointer("/preconditions/uid").and_then(Value::as_str).map(str::to_string),
        precondition_resource_version: from_body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string),
        dry_run,
        request: None,
    })
}

fn object_response(kind: &KindInfo, obj: &crate::cache::CachedObject, format: &Format) -> ApiResult<Response<Body>> {
    Ok(match format {
        Format::Json => bytes_response(200, with_newline(served_json(kind, obj)?), "application/json"),
        Format::Protobuf => match registry::served_proto(kind, obj) {
            Some(raw) => proto_response(200, krate_api::protobuf::envelope(&kind.api_version(), &kind.kind, &raw)),
            None => bytes_response(200, with_newline(served_json(kind, obj)?), "application/json"),
        },
        Format::Table { .. } => {
            json_response(200, &table::object_table(kind, &registry::to_served(kind, obj.parse())?))
        }
        Format::Metadata => {
            bytes_response(200, with_newline(negotiate::partial_metadata_json(&obj.json)), "application/json")
        }
    })
}

fn list_response(kind: &KindInfo, result: registry::ListResult, format: &Format) -> ApiResult<Response<Body>> {
    Ok(match format {
        Format::Table { include_object } => {
            let items: Vec<Value> =
                result.items.iter().map(|o| registry::to_served(kind, o.parse())).collect::<ApiResult<_>>()?;
            let mut t = table::list_table(kind, &items, *include_object);
            t["metadata"] = list_metadata(&result);
            json_response(200, &t)
        }
        Format::Metadata => assembled_list("PartialObjectMetadataList", "meta.k8s.io/v1", &result, None, |o| {
            Ok(negotiate::partial_metadata_json(&o.json))
        })?,
        Format::Protobuf if kind.protobuf_message().is_some() => {
            let items: Vec<Bytes> = result.items.iter().filter_map(|o| registry::served_proto(kind, o)).collect();
            let list_meta = list_metadata(&result);
            proto_response(200, krate_api::protobuf::list(&kind.api_version(), &kind.list_kind(), &list_meta, &items))
        }
        Format::Json | Format::Protobuf => {
            // A typed list's items go without the kind and apiVersion the list carries
            // (upstream's typed lists); custom resources, unstructured there, keep theirs.
            let type_meta = format!("{{\"kind\":\"{}\",\"apiVersion\":\"{}\",", kind.kind, kind.api_version());
            let strip = kind.custom.is_none().then_some(type_meta.as_bytes());
            assembled_list(&kind.list_kind(), &kind.api_version(), &result, strip, |o| served_json(kind, o))?
        }
    })
}

fn proto_response(code: u16, body: Vec<u8>) -> Response<Body> {
    bytes_response(code, Bytes::from(body), krate_api::protobuf::CONTENT_TYPE)
}

/// A list assembled from each item's encoded JSON, without re-encoding objects; items
/// that open with `strip` (their kind and apiVersion, first in Go's field order) go
/// without it.
fn assembled_list(
    list_kind: &str,
    api_version: &str,
    result: &registry::ListResult,
    strip: Option<&[u8]>,
    item: impl Fn(&crate::cache::CachedObject) -> ApiResult<Bytes>,
) -> ApiResult<Response<Body>> {
    let items: Vec<Bytes> = result.items.iter().map(|o| item(o)).collect::<ApiResult<_>>()?;
    let mut out = BytesMut::with_capacity(64 + items.iter().map(|i| i.len() + 1).sum::<usize>() + 1);
    let head = json!({"kind": list_kind, "apiVersion": api_version, "metadata": list_metadata(result)});
    let head = krate_api::protobuf::to_go_json(&head);
    out.put_slice(&head[..head.len() - 1]);
    out.put_slice(b",\"items\":[");
    for (i, encoded) in items.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        match strip.and_then(|prefix| encoded.strip_prefix(prefix)) {
            Some(rest) => {
                out.put_u8(b'{');
                out.put_slice(rest);
            }
            None => out.put_slice(encoded),
        }
    }
    out.put_slice(b"]}\n");
    Ok(bytes_response(200, out.freeze(), "application/json"))
}

fn list_metadata(result: &registry::ListResult) -> Value {
    let mut meta = json!({"resourceVersion": result.revision.to_string()});
    if let Some(token) = &result.continue_token {
        meta["continue"] = json!(token);
    }
    if let Some(remaining) = result.remaining {
        meta["remainingItemCount"] = json!(remaining);
    }
    meta
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::json;

    use crate::testing::TestApi;

    #[test]
    fn a_repeated_yaml_key_is_reported_with_its_line() {
        let body =
            b"\napiVersion: v1\nkind: X\nmetadata:\n  name: a\nspec:\n  unknown: uk1\n  foo: foo1\n  foo: foo2\n";
        assert_eq!(
            super::yaml_duplicate_key(body).as_deref(),
            Some("error converting YAML to JSON: yaml: unmarshal errors:\n  line 9: key \"foo\" already set in map")
        );
        assert_eq!(super::yaml_duplicate_key(b"a: 1\nb: 2\n"), None);
    }

    #[tokio::test]
    async fn built_in_kinds_start_with_an_empty_status_a_json_patch_can_add_to() {
        let api = TestApi::start(Default::default()).await;
        let claim = json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": "c"}, "spec": {}, "status": {"allocation": {}}});
        let path = "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims";
        let (code, created) = api.call("x", Method::POST, path, Some(claim)).await;
        assert_eq!((code, &created["status"]), (201, &json!({})), "{created}");
        let status = "/apis/apps/v1/namespaces/default/deployments/d/status";
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let deployments = "/apis/apps/v1/namespaces/default/deployments";
        assert_eq!(api.call("x", Method::POST, deployments, Some(deployment)).await.0, 201);
        let patch = json!([{"op": "add", "path": "/status/observedGeneration", "value": 1}]);
        let (code, patched) = api.call_patch("x", status, "application/json-patch+json", patch).await;
        assert_eq!((code, &patched["status"]["observedGeneration"]), (200, &json!(1)), "{patched}");
    }

    #[tokio::test]
    async fn subresources_and_their_verbs_come_from_the_kinds_table() {
        let api = TestApi::start(Default::default()).await;
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        assert_eq!(api.call("x", Method::POST, "/api/v1/namespaces/default/configmaps", Some(cm)).await.0, 201);
        // ConfigMaps declare no binding; pods do, for create only.
        let (code, _) = api.call("x", Method::POST, "/api/v1/namespaces/default/configmaps/c/binding", None).await;
        assert_eq!(code, 404);
        let (code, status) = api.call("x", Method::GET, "/api/v1/namespaces/default/pods/p/binding", None).await;
        assert_eq!((code, status["reason"].as_str()), (405, Some("MethodNotAllowed")));
        // namespaces/finalize is update-only, as upstream.
        assert_eq!(api.call("x", Method::GET, "/api/v1/namespaces/default/finalize", None).await.0, 405);
        let (_, list) = api.call("x", Method::GET, "/api/v1", None).await;
        let names: Vec<&str> =
            list["resources"].as_array().unwrap().iter().filter_map(|r| r["name"].as_str()).collect();
        for sub in
            ["pods/binding", "pods/eviction", "pods/log", "pods/exec", "serviceaccounts/token", "namespaces/finalize"]
        {
            assert!(names.contains(&sub), "{sub} in discovery: {names:?}");
        }
        let token =
            list["resources"].as_array().unwrap().iter().find(|r| r["name"] == "serviceaccounts/token").unwrap();
        assert_eq!(
            (token["group"].as_str(), token["kind"].as_str()),
            (Some("authentication.k8s.io"), Some("TokenRequest"))
        );
    }
}

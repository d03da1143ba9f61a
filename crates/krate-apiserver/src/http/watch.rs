//! Watch streams served from the watch cache: newline-delimited JSON events (or
//! length-prefixed protobuf ones), with bookmarks, timeouts and upstream's
//! resourceVersion semantics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderValue, Response};
use krate_api::{ApiError, ApiResult, KindInfo};
use krate_store::Revision;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::negotiate::{partial_metadata_json, Format};
use super::{table, Query};
use crate::cache::{CacheEvent, CachedObject, EventType};
use crate::registry::{self, storage_prefix, ListOptions, Scope};
use crate::ApiServer;

/// Where a watch begins.
pub(crate) enum Start {
    /// Synthetic ADDED events for the current state, then changes after it.
    Snapshot,
    /// Only changes after this revision.
    After(Revision),
}

struct Watcher {
    kind: Arc<KindInfo>,
    namespace: Option<String>,
    opts: ListOptions,
    format: Format,
    bookmarks: bool,
    sent_table_headers: bool,
}

impl Watcher {
    fn matches(&self, obj: &CachedObject) -> bool {
        if let Some(ns) = self.namespace.as_deref().filter(|_| self.kind.namespaced) {
            if obj.namespace.as_deref() != Some(ns) {
                return false;
            }
        }
        self.opts.labels.matches(&obj.labels) && registry::fields_match(&self.kind, obj, &self.opts.fields)
    }

    /// The event type to send for a cache event, given selector transitions.
    fn translate(&self, event: &CacheEvent) -> Option<EventType> {
        let now = self.matches(&event.object);
        let before = event.prev.as_deref().is_some_and(|p| self.matches(p));
        match event.kind {
            EventType::Added if now => Some(EventType::Added),
            EventType::Modified => match (before, now) {
                (true, true) => Some(EventType::Modified),
                (false, true) => Some(EventType::Added),
                (true, false) => Some(EventType::Deleted),
                (false, false) => None,
            },
            EventType::Deleted if before || (event.prev.is_none() && now) => Some(EventType::Deleted),
            _ => None,
        }
    }

    fn encode(&mut self, kind: &str, obj: &CachedObject) -> Bytes {
        let object = match &self.format {
            Format::Protobuf => {
                if let Some(raw) = registry::served_proto(&self.kind, obj) {
                    let object = krate_api::protobuf::envelope(&self.kind.api_version(), &self.kind.kind, &raw);
                    return Bytes::from(krate_api::protobuf::watch_frame(kind, &object));
                }
                registry::served_json(&self.kind, obj)
            }
            Format::Json => registry::served_json(&self.kind, obj),
            Format::Metadata => Ok(partial_metadata_json(&obj.json)),
            Format::Table { include_object } => {
                let served = match registry::to_served(&self.kind, obj.parse()) {
                    Ok(served) => served,
                    Err(e) => return conversion_failed(&e),
                };
                let t = table::event_table(&self.kind, &served, *include_object, !self.sent_table_headers);
                self.sent_table_headers = true;
                return line(kind, &krate_api::protobuf::to_go_json(&t));
            }
        };
        match object {
            Ok(object) => line(kind, &object),
            Err(e) => conversion_failed(&e),
        }
    }

    fn bookmark(&self, revision: Revision, initial_events_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": revision.to_string()});
        if initial_events_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let (kind, api_version) = match self.format {
            Format::Json | Format::Protobuf => (self.kind.kind.clone(), self.kind.api_version()),
            Format::Table { .. } => ("Table".into(), "meta.k8s.io/v1".into()),
            Format::Metadata => ("PartialObjectMetadata".into(), "meta.k8s.io/v1".into()),
        };
        let object = json!({"kind": kind, "apiVersion": api_version, "metadata": meta});
        self.event("BOOKMARK", object)
    }

    fn error(&self, err: &ApiError) -> Bytes {
        self.event("ERROR", err.to_status())
    }

    /// An event around an object built here (bookmarks, errors), in the stream's framing.
    fn event(&self, event_type: &str, object: Value) -> Bytes {
        if self.format == Format::Protobuf {
            if let Some(encoded) = krate_api::protobuf::encode(&object) {
                return Bytes::from(krate_api::protobuf::watch_frame(event_type, &encoded));
            }
        }
        line(event_type, &krate_api::protobuf::to_go_json(&object))
    }
}

/// One JSON watch event, framed around the already-encoded object (upstream's
/// WatchEvent: `type`, then `object`), and the newline that ends it.
/// An object that could not be converted to the watched version (a failing CRD
/// conversion webhook) is sent as an ERROR event with its Status.
fn conversion_failed(error: &krate_api::ApiError) -> Bytes {
    line("ERROR", &krate_api::protobuf::to_go_json(&error.to_status()))
}

fn line(event_type: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(event_type.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn too_old(requested: Revision, oldest: Revision) -> ApiError {
    ApiError::gone(format!("too old resource version: {requested} ({oldest})"))
}

/// Where a watch starts, and whether it sends the initial events, from its parameters
/// (`resourceVersion`, `sendInitialEvents`, `resourceVersionMatch`).
pub(crate) fn start_of(opts: &ListOptions, query: &Query) -> ApiResult<(Start, bool)> {
    let send_initial = query.get("sendInitialEvents").map(String::as_str) == Some("true");
    let rv = opts.resource_version.as_deref().filter(|rv| !rv.is_empty());
    let start = match rv {
        None | Some("0") => Start::Snapshot,
        Some(rv) => {
            let rev = rv
                .parse::<Revision>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?;
            if send_initial {
                Start::Snapshot
            } else {
                Start::After(rev)
            }
        }
    };
    if send_initial && opts.resource_version_match.as_deref() != Some("NotOlderThan") {
        return Err(ApiError::invalid(
            "meta.k8s.io",
            "ListOptions",
            "",
            &[krate_api::FieldError::forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            )],
        ));
    }
    Ok((start, send_initial))
}

/// Opens a watch and returns the streaming response.
pub async fn serve(
    server: Arc<ApiServer>,
    scope: Scope,
    opts: ListOptions,
    query: &Query,
    format: Format,
) -> ApiResult<Response<Body>> {
    let (start, send_initial) = start_of(&opts, query)?;
    let rv = opts.resource_version.clone().filter(|rv| !rv.is_empty());
    // Upstream starts `resourceVersion=""` watches from a consistent snapshot.
    if rv.is_none() {
        server.storage.cache.sync().await;
    }
    let timeout =
        query.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).map(Duration::from_secs).unwrap_or_else(|| {
            // Upstream spreads watch lifetimes over [min, 2*min) to avoid thundering re-lists.
            let base = server.settings.min_request_timeout;
            base + Duration::from_millis(rand::random::<u64>() % base.as_millis().max(1) as u64)
        });
    let watcher = Watcher {
        kind: scope.kind.clone(),
        namespace: scope.namespace.clone(),
        opts,
        format: format.clone(),
        bookmarks: query.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
        sent_table_headers: false,
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let bookmark_interval = server.settings.bookmark_interval;
    server.metrics.watch_opened();
    let metrics_server = server.clone();
    tokio::spawn(async move {
        run(server, watcher, start, send_initial, timeout, bookmark_interval, tx).await;
        metrics_server.metrics.watch_closed();
    });
    let mut resp = Response::new(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)));
    let content_type = match format {
        Format::Protobuf => krate_api::protobuf::WATCH_CONTENT_TYPE.to_string(),
        other => other.content_type(),
    };
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(&content_type).expect("valid header"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    Ok(resp)
}

async fn run(
    server: Arc<ApiServer>,
    mut w: Watcher,
    start: Start,
    send_initial: bool,
    timeout: Duration,
    bookmark_interval: Duration,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let cache = server.storage.cache.clone();
    let rc = cache.resource(&storage_prefix(&w.kind));
    let mut changes = rc.subscribe();
    let deadline = Instant::now() + timeout;
    let send = |bytes: Bytes| {
        let tx = tx.clone();
        async move { tx.send(Ok(bytes)).await.is_ok() }
    };

    // Initial state.
    let mut last: Revision = match start {
        Start::Snapshot => {
            let (objects, revision) = {
                let state = rc.state.read().expect("cache lock");
                let objects: Vec<Arc<CachedObject>> =
                    state.objects.values().filter(|o| w.matches(o)).cloned().collect();
                (objects, cache.revision().max(state.last_change))
            };
            for obj in &objects {
                if !send(w.encode("ADDED", obj)).await {
                    return;
                }
            }
            if send_initial && !send(w.bookmark(revision, true)).await {
                return;
            }
            revision
        }
        Start::After(rev) => {
            let compacted = server.storage.store.compacted_revision().await.unwrap_or(0);
            if rev < compacted {
                let _ = send(w.error(&too_old(rev, compacted))).await;
                return;
            }
            rev
        }
    };

    let mut next_bookmark = Instant::now() + bookmark_interval;
    loop {
        if rc.replaced.load(Ordering::Acquire) {
            let _ = send(w.error(&too_old(last, cache.revision()))).await;
            return;
        }
        // Everything applied up to `applied` is in the window we read next.
        let applied = cache.revision();
        let events = {
            let state = rc.state.read().expect("cache lock");
            state.events_after(last).ok_or(state.window_start)
        };
        let events = match events {
            Ok(events) => events,
            Err(oldest) => {
                let _ = send(w.error(&too_old(last, oldest))).await;
                return;
            }
        };
        for event in &events {
            // A watcher that lags behind a steady stream of writes still gets its bookmarks,
            // placed between revisions so that each covers only events already sent.
            if w.bookmarks && event.revision > last && Instant::now() >= next_bookmark {
                if !send(w.bookmark(last, false)).await {
                    return;
                }
                next_bookmark = Instant::now() + bookmark_interval;
            }
            if let Some(kind) = w.translate(event) {
                if !send(w.encode(kind.as_str(), &event.object)).await {
                    return;
                }
            }
            last = event.revision;
        }
        last = last.max(applied);

        let pre_timeout = deadline.checked_sub(Duration::from_secs(2)).unwrap_or(deadline);
        let bookmark_at = if w.bookmarks { next_bookmark.min(pre_timeout.max(Instant::now())) } else { deadline };
        tokio::select! {
            // A due bookmark goes first: under constant writes `changes` is always ready.
            biased;
            _ = tx.closed() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = tokio::time::sleep_until(bookmark_at), if w.bookmarks && bookmark_at < deadline => {
                // A bookmark may only move past revisions whose events were all sent:
                // changes applied since the last read are sent first (next loop turn).
                let applied = cache.revision();
                let caught_up = rc.state.read().expect("cache lock").events_after(last).is_some_and(|e| e.is_empty());
                if caught_up {
                    last = last.max(applied);
                }
                if !send(w.bookmark(last, false)).await {
                    return;
                }
                next_bookmark = Instant::now() + bookmark_interval;
                if bookmark_at >= pre_timeout {
                    // The pre-timeout bookmark has been sent; wait out the rest quietly.
                    w.bookmarks = false;
                }
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    let _ = send(w.error(&too_old(last, cache.revision()))).await;
                    return;
                }
            }
        }
    }
}

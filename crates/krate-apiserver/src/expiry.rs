//! Events expire (the seeds: bounded disk on the control plane). Upstream writes each
//! Event under an etcd lease of `--event-ttl` (default 1h) renewed by every write, so an
//! Event goes an hour after it last changed. krate's store has no leases: a sweep every
//! half TTL (at most a minute) deletes the Events whose last write is older than the TTL,
//! through the generic delete path, so watchers see them go as they would upstream.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use serde_json::Value;

use crate::registry::{DeleteOptions, ListOptions};
use crate::ApiServer;

impl ApiServer {
    pub(crate) fn start_event_expiry(self: Arc<Self>) {
        let ttl = self.settings.event_ttl;
        let every = (ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match self.expire_events(ttl).await {
                    Ok(0) => {}
                    Ok(expired) => tracing::debug!(expired, "expired events"),
                    Err(e) => tracing::warn!(error = %e.message, "expiring events failed"),
                }
            }
        });
    }

    /// Deletes the Events last written more than `ttl` ago; how many it deleted.
    async fn expire_events(&self, ttl: Duration) -> krate_api::ApiResult<usize> {
        let all = self.storage.builtin::<Event>(None);
        let listed = self.storage.list(&all, &ListOptions::default()).await?;
        let Ok(ttl) = jiff::SignedDuration::try_from(ttl) else { return Ok(0) };
        let cutoff = jiff::Timestamp::now() - ttl;
        let mut expired = 0;
        for item in listed.items {
            let Ok(event) = serde_json::from_slice::<Value>(&item.json) else { continue };
            if last_written(&event).is_none_or(|at| at >= cutoff) {
                continue;
            }
            let scope = self.storage.builtin::<Event>(item.namespace.clone());
            match self.storage.delete(&scope, &item.name, &DeleteOptions::default()).await {
                Ok(_) => expired += 1,
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(expired)
    }
}

/// When an Event was last written: the newest of its timestamps (creation, last seen,
/// series, managed fields' write times).
fn last_written(event: &Value) -> Option<jiff::Timestamp> {
    let pointers = ["/metadata/creationTimestamp", "/lastTimestamp", "/eventTime", "/series/lastObservedTime"];
    let managed = event.pointer("/metadata/managedFields").and_then(Value::as_array).into_iter().flatten();
    pointers
        .iter()
        .filter_map(|p| event.pointer(p))
        .chain(managed.filter_map(|m| m.get("time")))
        .filter_map(Value::as_str)
        .filter_map(|t| t.parse::<jiff::Timestamp>().ok())
        .max()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_last_write_is_the_newest_timestamp() {
        let event = json!({
            "metadata": {"creationTimestamp": "2026-01-01T00:00:00Z",
                         "managedFields": [{"time": "2026-01-01T00:05:00Z"}]},
            "lastTimestamp": "2026-01-01T00:03:00Z",
            "series": {"lastObservedTime": "2026-01-01T00:04:00.123456Z"},
            "eventTime": null,
        });
        assert_eq!(last_written(&event), Some("2026-01-01T00:05:00Z".parse().unwrap()));
        assert_eq!(last_written(&json!({"metadata": {}})), None);
    }

    #[tokio::test]
    async fn events_older_than_the_ttl_are_deleted_and_newer_ones_kept() {
        let api = crate::testing::TestApi::start(Default::default()).await;
        let old = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "old"},
                         "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
                         "reason": "Old", "lastTimestamp": "2026-01-01T00:00:00Z"});
        let path = "/api/v1/namespaces/default/events";
        assert_eq!(api.call("x", http::Method::POST, path, Some(old)).await.0, 201);
        let new = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "new"},
                         "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"}, "reason": "New"});
        assert_eq!(api.call("x", http::Method::POST, path, Some(new)).await.0, 201);
        // "old" was created just now too: with a TTL of an hour nothing goes.
        assert_eq!(api.server.expire_events(Duration::from_secs(3600)).await.unwrap(), 0);
        // Within a zero TTL both are past it.
        assert_eq!(api.server.expire_events(Duration::ZERO).await.unwrap(), 2);
        let (_, list) = api.call("x", http::Method::GET, path, None).await;
        assert_eq!(list["items"], json!([]));
    }
}

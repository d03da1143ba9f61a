//! Events as upstream's components record them: core/v1 Events named
//! `<object>.<hex time>`, with `source.component`, and a repeat of the same event (same
//! object, reason and message) counted on the first one (`count`, `lastTimestamp`)
//! instead of written anew, so `kubectl describe` shows "(x3 over 10s)".

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, ObjectReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::Mutex;

use crate::now;

/// Distinct events remembered for counting repeats (older ones are forgotten).
const REMEMBERED: usize = 4096;

/// (object uid, type, reason, message): what makes two events the same.
type EventKey = (String, String, String, String);
/// Where the first of a kind was written, and how often it happened: (namespace, name, count).
type Written = (String, String, i32);

#[derive(Clone)]
pub struct Recorder {
    client: kube::Client,
    component: String,
    seen: Arc<Mutex<HashMap<EventKey, Written>>>,
}

impl Recorder {
    pub fn new(client: kube::Client, component: &str) -> Self {
        Self { client, component: component.into(), seen: Default::default() }
    }

    pub async fn normal(&self, object: &ObjectReference, reason: &str, message: &str) {
        self.record(object, "Normal", reason, message).await
    }

    pub async fn warning(&self, object: &ObjectReference, reason: &str, message: &str) {
        self.record(object, "Warning", reason, message).await
    }

    /// Records one event; a failure to record is logged, never returned.
    pub async fn record(&self, object: &ObjectReference, type_: &str, reason: &str, message: &str) {
        if let Err(e) = self.try_record(object, type_, reason, message).await {
            tracing::debug!(error = %e, reason, "recording an event failed");
        }
    }

    async fn try_record(
        &self,
        object: &ObjectReference,
        type_: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), kube::Error> {
        let key = (object.uid.clone().unwrap_or_default(), type_.to_string(), reason.to_string(), message.to_string());
        let repeat = self.seen.lock().await.get(&key).cloned();
        if let Some((ns, name, count)) = repeat {
            let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
            let patch = json!({"count": count + 1, "lastTimestamp": now()});
            if api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await.is_ok() {
                self.seen.lock().await.insert(key, (ns, name, count + 1));
                return Ok(());
            }
        }
        let ns = object.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let name = format!("{}.{nanos:x}", object.name.clone().unwrap_or_default());
        let time = now();
        let event: Event = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": object,
            "reason": reason, "message": message, "type": type_, "count": 1,
            "firstTimestamp": time, "lastTimestamp": time,
            "source": {"component": self.component},
            "reportingComponent": self.component, "reportingInstance": self.component,
        }))
        .expect("a well-formed event");
        Api::<Event>::namespaced(self.client.clone(), &ns).create(&PostParams::default(), &event).await?;
        let mut seen = self.seen.lock().await;
        if seen.len() >= REMEMBERED {
            seen.clear();
        }
        seen.insert(key, (ns, name, 1));
        Ok(())
    }
}

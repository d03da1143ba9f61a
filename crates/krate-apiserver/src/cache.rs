//! The watch cache: an in-memory copy of every object plus a window of recent events per
//! resource, fed by a single store watch. Lists, gets and watches are served from here so
//! storage is never re-read per request or per watcher.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use krate_api::kinds::SelectableField;
use krate_store::{Event, KeyValue, ListRequest, Revision, Store, StoreError};
use serde_json::Value;
use tokio::sync::watch;

/// The prefix under which all API objects are stored.
pub const REGISTRY_PREFIX: &str = "/registry/";

/// One object as the cache holds it: its stored JSON (with resourceVersion set) plus what
/// selectors need, extracted once.
#[derive(Debug)]
pub struct CachedObject {
    pub key: String,
    pub namespace: Option<String>,
    pub name: String,
    pub revision: Revision,
    pub json: Bytes,
    pub labels: BTreeMap<String, String>,
    /// Values of the resource's selectable fields (beyond name and namespace).
    pub fields: Vec<(&'static str, String)>,
    /// Its protobuf message, encoded on first demand and shared by every list and watch.
    proto: std::sync::OnceLock<Bytes>,
}

/// Which fields of a resource (by store prefix) field selectors may use: (label, path).
pub type FieldPaths = Arc<dyn Fn(&str) -> Vec<SelectableField> + Send + Sync>;

impl CachedObject {
    /// Parses the stored JSON (for conversions, tables and the like).
    pub fn parse(&self) -> Value {
        serde_json::from_slice(&self.json).unwrap_or(Value::Null)
    }

    /// The object as protobuf message `message` (no envelope), encoded once.
    pub fn proto(&self, message: &str) -> &Bytes {
        self.proto.get_or_init(|| Bytes::from(krate_api::protobuf::message(message, &self.parse())))
    }

    pub fn field(&self, label: &str) -> Option<&str> {
        match label {
            "metadata.name" => Some(&self.name),
            "metadata.namespace" => Some(self.namespace.as_deref().unwrap_or_default()),
            other => self.fields.iter().find(|(l, _)| *l == other).map(|(_, v)| v.as_str()),
        }
    }

    pub fn from_kv(kv: &KeyValue, revision: Revision, field_paths: &[SelectableField]) -> Option<Self> {
        let mut value: Value = match serde_json::from_slice(&kv.value) {
            Ok(v) => v,
            Err(err) => {
                tracing::error!(key = %kv.key, error = %err, "skipping undecodable stored object");
                return None;
            }
        };
        let (_, namespace, name) = split_key(&kv.key)?;
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(revision.to_string()));
        }
        let labels = value
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        let fields = field_paths.iter().map(|f| (f.label, f.value(&value))).collect();
        // Served as stored here: in upstream's field order.
        let json = Bytes::from(krate_api::protobuf::to_go_json(&value));
        Some(Self {
            key: kv.key.clone(),
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
            revision,
            json,
            labels,
            fields,
            proto: Default::default(),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Clone, Debug)]
pub struct CacheEvent {
    pub kind: EventType,
    pub revision: Revision,
    /// The object after the change (for deletions: its last state).
    pub object: Arc<CachedObject>,
    /// The object before the change, for selector transitions.
    pub prev: Option<Arc<CachedObject>>,
}

/// Splits `/registry/{group}/{resource}/[{namespace}/]{name}` into
/// (`/registry/{group}/{resource}/`, namespace, name).
pub fn split_key(key: &str) -> Option<(&str, Option<&str>, &str)> {
    let rest = key.strip_prefix(REGISTRY_PREFIX)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let prefix_len = REGISTRY_PREFIX.len() + parts.first()?.len() + 1 + parts.get(1)?.len() + 1;
    match parts.len() {
        3 => Some((&key[..prefix_len], None, parts[2])),
        4 => Some((&key[..prefix_len], Some(parts[2]), parts[3])),
        _ => None,
    }
}

/// The state of one resource: its objects and its recent events.
#[derive(Default)]
pub struct ResourceState {
    pub objects: BTreeMap<String, Arc<CachedObject>>,
    pub events: VecDeque<CacheEvent>,
    /// Every event with a revision above this one is in `events`.
    pub window_start: Revision,
    /// Revision of the newest event applied to this resource.
    pub last_change: Revision,
}

impl ResourceState {
    /// Events with revision > `after`, or None when that part of history has left the window.
    pub fn events_after(&self, after: Revision) -> Option<Vec<CacheEvent>> {
        if after < self.window_start {
            return None;
        }
        let start = self.events.partition_point(|e| e.revision <= after);
        Some(self.events.range(start..).cloned().collect())
    }
}

pub struct ResourceCache {
    pub state: RwLock<ResourceState>,
    /// Bumped after each applied change, to wake this resource's watchers.
    notify: watch::Sender<Revision>,
    /// Set when a reload replaced this cache: its watchers must end (410) and re-list.
    pub replaced: std::sync::atomic::AtomicBool,
}

impl ResourceCache {
    fn new(window_start: Revision) -> Self {
        Self {
            state: RwLock::new(ResourceState { window_start, last_change: window_start, ..Default::default() }),
            notify: watch::channel(window_start).0,
            replaced: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.notify.subscribe()
    }
}

pub struct WatchCache {
    store: Arc<dyn Store>,
    resources: RwLock<HashMap<String, Arc<ResourceCache>>>,
    /// Newest revision fully applied to the cache.
    revision: watch::Sender<Revision>,
    window: usize,
    /// Which fields to keep per store prefix; replaced when the served kinds change (a
    /// CRD's selectableFields).
    field_paths: RwLock<FieldPaths>,
}

impl WatchCache {
    /// The selectable fields of the objects under `prefix`.
    fn field_paths_of(&self, prefix: &str) -> Vec<SelectableField> {
        (self.field_paths.read().expect("field paths lock"))(prefix)
    }

    /// Keeps `field_paths` from now on (objects written from then on carry the fields).
    pub fn set_field_paths(&self, field_paths: FieldPaths) {
        *self.field_paths.write().expect("field paths lock") = field_paths;
    }

    /// Loads every object from the store and keeps following it in the background.
    pub async fn start(store: Arc<dyn Store>, window: usize, field_paths: FieldPaths) -> Result<Arc<Self>, StoreError> {
        let cache = Arc::new(Self {
            store: store.clone(),
            resources: RwLock::new(HashMap::new()),
            revision: watch::channel(0).0,
            window: window.max(1),
            field_paths: RwLock::new(field_paths),
        });
        let revision = cache.load().await?;
        let follower = cache.clone();
        tokio::spawn(async move { follower.follow(revision).await });
        Ok(cache)
    }

    async fn load(&self) -> Result<Revision, StoreError> {
        let list = self.store.list(ListRequest { prefix: REGISTRY_PREFIX.into(), ..Default::default() }).await?;
        let mut resources: HashMap<String, Arc<ResourceCache>> = HashMap::new();
        for kv in &list.items {
            let Some((prefix, _, _)) = split_key(&kv.key) else { continue };
            let Some(obj) = CachedObject::from_kv(kv, kv.mod_revision, &self.field_paths_of(prefix)) else { continue };
            let rc = resources.entry(prefix.to_string()).or_insert_with(|| Arc::new(ResourceCache::new(list.revision)));
            rc.state.write().expect("cache lock").objects.insert(kv.key.clone(), Arc::new(obj));
        }
        // Replace the maps wholesale; watchers of a replaced resource end with 410 and
        // re-list, as clients do after an upstream watch cache re-initialises.
        let mut current = self.resources.write().expect("cache lock");
        for old in current.values() {
            old.replaced.store(true, std::sync::atomic::Ordering::Release);
            old.notify.send_replace(list.revision);
        }
        *current = resources;
        drop(current);
        self.revision.send_replace(list.revision);
        tracing::info!(objects = list.items.len(), revision = list.revision, "watch cache loaded");
        Ok(list.revision)
    }

    async fn follow(self: Arc<Self>, mut revision: Revision) {
        loop {
            let mut stream = self.store.watch(REGISTRY_PREFIX, revision + 1);
            while let Some(batch) = stream.next().await {
                match batch {
                    Ok(batch) => {
                        revision = revision.max(batch.revision);
                        self.apply(batch.events);
                        self.revision.send_replace(revision);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "store watch failed; reloading the watch cache");
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            match self.load().await {
                Ok(rev) => revision = rev,
                Err(err) => tracing::error!(error = %err, "reloading the watch cache failed; retrying"),
            }
        }
    }

    fn apply(&self, events: Vec<Event>) {
        let mut touched: HashMap<String, (Arc<ResourceCache>, Revision)> = HashMap::new();
        for event in events {
            let Some((prefix, _, _)) = split_key(event.key()) else { continue };
            let rc = self.resource(prefix);
            let paths = self.field_paths_of(prefix);
            let rev = event.revision();
            let mut state = rc.state.write().expect("cache lock");
            let cache_event = match &event {
                Event::Put(kv) => {
                    let Some(obj) = CachedObject::from_kv(kv, rev, &paths) else { continue };
                    let obj = Arc::new(obj);
                    let prev = state.objects.insert(kv.key.clone(), obj.clone());
                    let kind = if prev.is_some() { EventType::Modified } else { EventType::Added };
                    CacheEvent { kind, revision: rev, object: obj, prev }
                }
                Event::Delete { prev, .. } => {
                    let old = state.objects.remove(&prev.key);
                    // The object's last state, stamped with the deletion revision.
                    let last =
                        KeyValue { value: old.as_ref().map_or(prev.value.clone(), |o| o.json.clone()), ..prev.clone() };
                    let Some(obj) = CachedObject::from_kv(&last, rev, &paths) else { continue };
                    CacheEvent { kind: EventType::Deleted, revision: rev, object: Arc::new(obj), prev: old }
                }
            };
            state.events.push_back(cache_event);
            state.last_change = rev;
            while state.events.len() > self.window {
                if let Some(evicted) = state.events.pop_front() {
                    state.window_start = evicted.revision;
                }
            }
            drop(state);
            touched.insert(prefix.to_string(), (rc, rev));
        }
        for (_, (rc, rev)) in touched {
            rc.notify.send_replace(rev);
        }
    }

    /// The cache of one resource prefix (created empty on first use).
    pub fn resource(&self, prefix: &str) -> Arc<ResourceCache> {
        if let Some(rc) = self.resources.read().expect("cache lock").get(prefix) {
            return rc.clone();
        }
        let current = *self.revision.borrow();
        self.resources
            .write()
            .expect("cache lock")
            .entry(prefix.to_string())
            .or_insert_with(|| Arc::new(ResourceCache::new(current)))
            .clone()
    }

    pub fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// Waits until the cache has applied `revision`; false on timeout.
    pub async fn wait_for(&self, revision: Revision, timeout: Duration) -> bool {
        let mut rx = self.revision.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision)).await.is_ok_and(|r| r.is_ok())
    }

    /// Waits until the cache reflects every write acknowledged so far (consistent read).
    pub async fn sync(&self) -> bool {
        match self.store.current_revision().await {
            Ok(rev) => self.wait_for(rev, Duration::from_secs(10)).await,
            Err(_) => false,
        }
    }

    /// Drops history up to `revision` after a store compaction.
    pub fn compacted(&self, revision: Revision) {
        for rc in self.resources.read().expect("cache lock").values() {
            let mut state = rc.state.write().expect("cache lock");
            while state.events.front().is_some_and(|e| e.revision <= revision) {
                state.events.pop_front();
            }
            state.window_start = state.window_start.max(revision);
        }
    }

    pub fn object_count(&self) -> usize {
        self.resources
            .read()
            .expect("cache lock")
            .values()
            .map(|rc| rc.state.read().expect("cache lock").objects.len())
            .sum()
    }

    pub fn counts(&self) -> Vec<(String, usize)> {
        self.resources
            .read()
            .expect("cache lock")
            .iter()
            .map(|(p, rc)| (p.clone(), rc.state.read().expect("cache lock").objects.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_resource_namespace_and_name() {
        assert_eq!(
            split_key("/registry/core/pods/default/web"),
            Some(("/registry/core/pods/", Some("default"), "web"))
        );
        assert_eq!(
            split_key("/registry/core/namespaces/default"),
            Some(("/registry/core/namespaces/", None, "default"))
        );
        assert_eq!(split_key("/elsewhere/x"), None);
    }
}

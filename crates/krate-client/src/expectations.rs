//! What a controller wrote and its cache has not shown yet, as client-go's controller
//! expectations: a controller that reads the objects it owns from an informer must not
//! act again on a cache that lags behind its own writes (a ReplicaSet would create its
//! pods twice). After creating, changing or deleting, the controller records the
//! objects; `satisfied` tells whether the informer has caught up with all of them. An
//! entry that is never met (the object went again before the cache saw it) expires.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;

use crate::informer::{Informer, Watched};

/// How long expectations wait for the cache before they count as met (upstream's
/// ExpectationsTimeout is five minutes; a local watch lags by milliseconds).
pub const TIMEOUT: Duration = Duration::from_secs(60);

struct Pending<K: Watched> {
    /// Created objects (and their uids) the cache has not shown yet.
    creates: Vec<(ObjectRef<K>, String)>,
    /// Changed objects the cache still shows at the resourceVersion before the change.
    updates: Vec<(ObjectRef<K>, String)>,
    /// Deleted objects the cache still shows as live.
    deletes: Vec<(ObjectRef<K>, String)>,
    since: Instant,
}

enum Write {
    Create,
    Update,
    Delete,
}

/// Per-owner expectations, keyed by the owner's uid.
pub struct Expectations<K: Watched> {
    pending: Mutex<HashMap<String, Pending<K>>>,
    timeout: Duration,
}

impl<K: Watched> Default for Expectations<K> {
    fn default() -> Self {
        Self::with_timeout(TIMEOUT)
    }
}

impl<K: Watched> Expectations<K> {
    pub fn with_timeout(timeout: Duration) -> Self {
        Self { pending: Mutex::new(HashMap::new()), timeout }
    }

    fn record(&self, owner: &str, entry: (ObjectRef<K>, String), write: Write) {
        let mut pending = self.pending.lock().expect("expectations lock");
        // Owners that went away leave expectations no one asks about again.
        pending.retain(|_, p| p.since.elapsed() < self.timeout);
        let p = pending.entry(owner.to_string()).or_insert_with(|| Pending {
            creates: Vec::new(),
            updates: Vec::new(),
            deletes: Vec::new(),
            since: Instant::now(),
        });
        p.since = Instant::now();
        match write {
            Write::Create => p.creates.push(entry),
            Write::Update => p.updates.push(entry),
            Write::Delete => p.deletes.push(entry),
        }
    }

    /// `owner` created `obj` (as the API returned it).
    pub fn created(&self, owner: &str, obj: &K) {
        self.record(owner, (ObjectRef::from_obj(obj), obj.meta().uid.clone().unwrap_or_default()), Write::Create)
    }

    /// `owner` changed `before` (the object as it was read): met once the cache shows
    /// another resourceVersion. Record only writes that changed something.
    pub fn updated(&self, owner: &str, before: &K) {
        let rv = before.meta().resource_version.clone().unwrap_or_default();
        self.record(owner, (ObjectRef::from_obj(before), rv), Write::Update)
    }

    /// `owner` deleted `obj`.
    pub fn deleted(&self, owner: &str, obj: &K) {
        self.record(owner, (ObjectRef::from_obj(obj), obj.meta().uid.clone().unwrap_or_default()), Write::Delete)
    }

    /// Whether `informer` shows every create and delete `owner` recorded: a created
    /// object (that uid, or a later one) is there; a deleted one is gone, replaced or
    /// being deleted. Met expectations are forgotten.
    pub fn satisfied(&self, owner: &str, informer: &Informer<K>) -> bool {
        let mut pending = self.pending.lock().expect("expectations lock");
        let Some(p) = pending.get_mut(owner) else { return true };
        let store = informer.store();
        let uid_of =
            |r: &ObjectRef<K>| store.get(r).map(|o| (o.meta().uid.clone(), o.meta().deletion_timestamp.is_some()));
        p.creates.retain(|(r, _)| uid_of(r).is_none());
        p.updates.retain(|(r, rv)| store.get(r).is_some_and(|o| o.meta().resource_version.as_ref() == Some(rv)));
        p.deletes.retain(|(r, uid)| matches!(uid_of(r), Some((Some(seen), false)) if seen == *uid));
        let met = p.creates.is_empty() && p.updates.is_empty() && p.deletes.is_empty();
        if met || p.since.elapsed() >= self.timeout {
            if !met {
                tracing::warn!(
                    owner,
                    kind = %K::kind(&()),
                    creates = p.creates.len(),
                    updates = p.updates.len(),
                    deletes = p.deletes.len(),
                    "expected changes never showed in the cache; acting anyway"
                );
            }
            pending.remove(owner);
            return true;
        }
        false
    }

    /// Whether anything is recorded for `owner` (met or not: `satisfied` tells).
    pub fn pending(&self, owner: &str) -> bool {
        self.pending.lock().expect("expectations lock").contains_key(owner)
    }

    /// Forgets `owner` (it was deleted).
    pub fn forget(&self, owner: &str) {
        self.pending.lock().expect("expectations lock").remove(owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::watcher::Event;

    fn pod(name: &str, uid: &str, deleting: bool) -> Pod {
        let mut meta = serde_json::json!({"name": name, "namespace": "ns", "uid": uid, "resourceVersion": "1"});
        if deleting {
            meta["deletionTimestamp"] = serde_json::json!("2020-01-01T00:00:00Z");
        }
        serde_json::from_value(serde_json::json!({"metadata": meta})).unwrap()
    }

    fn informer(pods: Vec<Pod>) -> Informer<Pod> {
        let informer = Informer::<Pod>::default();
        informer.apply(Event::Init);
        for p in pods {
            informer.apply(Event::InitApply(p));
        }
        informer.apply(Event::InitDone);
        informer
    }

    #[test]
    fn creates_are_met_once_the_cache_shows_them() {
        let e = Expectations::<Pod>::default();
        assert!(e.satisfied("rs", &informer(vec![])), "nothing expected");
        e.created("rs", &pod("a", "1", false));
        e.created("rs", &pod("b", "2", false));
        let lagging = informer(vec![pod("a", "1", false)]);
        assert!(!e.satisfied("rs", &lagging));
        lagging.apply(Event::Apply(pod("b", "2", false)));
        assert!(e.satisfied("rs", &lagging));
        assert!(e.satisfied("other", &lagging), "owners are apart");
    }

    #[test]
    fn deletes_are_met_once_the_object_is_gone_or_going() {
        let e = Expectations::<Pod>::default();
        e.deleted("rs", &pod("a", "1", false));
        e.deleted("rs", &pod("b", "2", false));
        let cache = informer(vec![pod("a", "1", false), pod("b", "2", false)]);
        assert!(!e.satisfied("rs", &cache));
        cache.apply(Event::Apply(pod("a", "1", true)));
        cache.apply(Event::Delete(pod("b", "2", false)));
        assert!(e.satisfied("rs", &cache));
    }

    #[test]
    fn updates_are_met_once_the_cache_shows_another_version() {
        let e = Expectations::<Pod>::default();
        let before = pod("a", "1", false);
        e.updated("rs", &before);
        let cache = informer(vec![before.clone()]);
        assert!(!e.satisfied("rs", &cache));
        let mut after = before;
        after.metadata.resource_version = Some("2".into());
        cache.apply(Event::Apply(after));
        assert!(e.satisfied("rs", &cache));
    }

    #[test]
    fn expectations_never_met_expire() {
        let e = Expectations::<Pod>::with_timeout(Duration::ZERO);
        e.created("rs", &pod("a", "1", false));
        assert!(e.satisfied("rs", &informer(vec![])));
    }
}

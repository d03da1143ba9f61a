//! Readiness of the caches (watches that must list once) a component waits for before it
//! acts, so that a stall can never be silent: a log line when a component's caches are
//! all synced, a warning naming the ones still unsynced after [`WARN_AFTER`] (repeated
//! every [`WARN_EVERY`]), and Prometheus gauges for `/metrics`.
//!
//! Waiting goes through a `tokio::sync::watch` channel, which wakes every waiter.
//! kube-rs's `Store::wait_until_ready` does not: it polls one shared oneshot receiver,
//! which keeps only the waker of the task that polled it last, so with two tasks waiting
//! on the same store one of them may never wake (that stalled the garbage collector on
//! most fresh servers).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long a cache may take to list before its component warns about it.
pub const WARN_AFTER: Duration = Duration::from_secs(30);
/// How often the warning repeats while a cache stays unsynced.
pub const WARN_EVERY: Duration = Duration::from_secs(120);

/// Every component's caches, for `/metrics`.
static ALL: Mutex<Vec<Weak<Caches>>> = Mutex::new(Vec::new());

/// The caches of one component, by name (usually a resource's plural).
pub struct Caches {
    component: String,
    synced: watch::Sender<BTreeMap<String, bool>>,
    since: Mutex<Instant>,
}

impl Caches {
    /// Registers a component's caches, all unsynced, and starts warning about any that
    /// stay so. Needs a tokio runtime.
    pub fn new(component: impl Into<String>, names: impl IntoIterator<Item = impl Into<String>>) -> Arc<Self> {
        let caches = Arc::new(Self::unregistered(component.into()));
        caches.add(names);
        let mut all = ALL.lock().expect("caches registry");
        all.retain(|c| c.strong_count() > 0);
        all.push(Arc::downgrade(&caches));
        drop(all);
        tokio::spawn(warn_while_unsynced(Arc::downgrade(&caches)));
        caches
    }

    fn unregistered(component: String) -> Self {
        Self { component, synced: watch::Sender::new(BTreeMap::new()), since: Mutex::new(Instant::now()) }
    }

    /// Adds caches to wait for (a resource that appeared later); known names are kept.
    pub fn add(&self, names: impl IntoIterator<Item = impl Into<String>>) {
        let mut added = false;
        self.synced.send_modify(|map| {
            for name in names {
                let name = name.into();
                if let std::collections::btree_map::Entry::Vacant(entry) = map.entry(name) {
                    entry.insert(false);
                    added = true;
                }
            }
        });
        if added {
            *self.since.lock().expect("caches clock") = Instant::now();
        }
    }

    /// Notes that cache `name` has listed once; logs when that completes the component.
    pub fn mark_synced(&self, name: &str) {
        let mut completed = false;
        self.synced.send_if_modified(|map| match map.get_mut(name) {
            Some(synced) if !*synced => {
                *synced = true;
                completed = map.values().all(|s| *s);
                true
            }
            _ => false,
        });
        if completed {
            let took = self.since.lock().expect("caches clock").elapsed();
            let (synced, _) = self.counts();
            tracing::info!(component = %self.component, caches = synced, took_ms = took.as_millis() as u64, "caches synced");
        }
    }

    /// Waits until cache `name` has listed once.
    pub async fn wait(&self, name: &str) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|map| map.get(name).copied().unwrap_or(false)).await;
    }

    /// Waits until every cache has listed once.
    pub async fn wait_all(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|map| map.values().all(|s| *s)).await;
    }

    /// Whether cache `name` is one the component waits for.
    pub fn contains(&self, name: &str) -> bool {
        self.synced.borrow().contains_key(name)
    }

    /// Whether every cache has listed once.
    pub fn all_synced(&self) -> bool {
        self.synced.borrow().values().all(|s| *s)
    }

    /// (synced, total).
    pub fn counts(&self) -> (usize, usize) {
        let map = self.synced.borrow();
        (map.values().filter(|s| **s).count(), map.len())
    }

    /// The caches not yet synced.
    pub fn unsynced(&self) -> Vec<String> {
        self.synced.borrow().iter().filter(|(_, s)| !**s).map(|(n, _)| n.clone()).collect()
    }
}

async fn warn_while_unsynced(caches: Weak<Caches>) {
    let mut wait = WARN_AFTER;
    loop {
        tokio::time::sleep(wait).await;
        let Some(caches) = caches.upgrade() else { return };
        let waited = caches.since.lock().expect("caches clock").elapsed();
        let unsynced = caches.unsynced();
        if !unsynced.is_empty() && waited >= WARN_AFTER {
            tracing::warn!(
                component = %caches.component,
                waited_s = waited.as_secs(),
                unsynced = %unsynced.join(","),
                "caches have not synced; the component does not act until they do"
            );
            wait = WARN_EVERY;
        } else {
            wait = WARN_AFTER;
        }
    }
}

/// Prometheus text for every live component's caches.
pub fn render_metrics() -> String {
    let all: Vec<Arc<Caches>> = ALL.lock().expect("caches registry").iter().filter_map(Weak::upgrade).collect();
    render(&all)
}

fn render(all: &[Arc<Caches>]) -> String {
    let mut out = String::new();
    out.push_str("# HELP krate_component_caches Caches (watches) a component waits to have listed before it acts.\n");
    out.push_str("# TYPE krate_component_caches gauge\n");
    for c in all {
        let _ = writeln!(out, "krate_component_caches{{component=\"{}\"}} {}", c.component, c.counts().1);
    }
    out.push_str("# HELP krate_component_caches_synced Caches of a component that have listed once.\n");
    out.push_str("# TYPE krate_component_caches_synced gauge\n");
    for c in all {
        let _ = writeln!(out, "krate_component_caches_synced{{component=\"{}\"}} {}", c.component, c.counts().0);
    }
    out.push_str(
        "# HELP krate_component_cache_synced Whether one cache of a component has listed once (1) or not (0).\n",
    );
    out.push_str("# TYPE krate_component_cache_synced gauge\n");
    for c in all {
        for (name, synced) in c.synced.borrow().iter() {
            let _ = writeln!(
                out,
                "krate_component_cache_synced{{component=\"{}\",cache=\"{name}\"}} {}",
                c.component,
                u8::from(*synced)
            );
        }
    }
    if let Some(gc) = all.iter().find(|c| c.component == "garbagecollector") {
        out.push_str("# HELP garbage_collector_graph_synced Whether the garbage collector's graph has every resource's watch listed (1).\n");
        out.push_str("# TYPE garbage_collector_graph_synced gauge\n");
        let _ = writeln!(out, "garbage_collector_graph_synced {}", u8::from(gc.all_synced()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_waiter_wakes_when_a_cache_syncs() {
        let caches = Caches::new("test-waiters", ["pods", "nodes"]);
        // Several tasks wait on the same cache; kube-rs's store readiness wakes only one.
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let c = caches.clone();
                tokio::spawn(async move { c.wait("pods").await })
            })
            .collect();
        let all = {
            let c = caches.clone();
            tokio::spawn(async move { c.wait_all().await })
        };
        tokio::task::yield_now().await;
        caches.mark_synced("pods");
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w).await.expect("a waiter was not woken").unwrap();
        }
        assert!(!all.is_finished(), "nodes has not synced yet");
        assert_eq!(caches.unsynced(), ["nodes"]);
        caches.mark_synced("nodes");
        tokio::time::timeout(Duration::from_secs(5), all).await.expect("wait_all was not woken").unwrap();
        assert_eq!(caches.counts(), (2, 2));
    }

    #[tokio::test]
    async fn a_cache_added_later_must_sync_again() {
        let caches = Caches::new("test-added", ["a"]);
        caches.mark_synced("a");
        assert!(caches.all_synced());
        caches.add(["a", "b"]);
        assert_eq!(caches.counts(), (1, 2));
        assert_eq!(caches.unsynced(), ["b"]);
    }

    #[test]
    fn metrics_name_each_cache_and_the_collector_graph() {
        let gc = Arc::new(Caches::unregistered("garbagecollector".into()));
        gc.add(["pods", "replicasets"]);
        gc.mark_synced("replicasets");
        let text = render(std::slice::from_ref(&gc));
        assert!(text.contains("krate_component_caches{component=\"garbagecollector\"} 2\n"), "{text}");
        assert!(text.contains("krate_component_caches_synced{component=\"garbagecollector\"} 1\n"), "{text}");
        assert!(
            text.contains("krate_component_cache_synced{component=\"garbagecollector\",cache=\"pods\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("garbage_collector_graph_synced 0\n"), "{text}");
        gc.mark_synced("pods");
        assert!(render(&[gc]).contains("garbage_collector_graph_synced 1\n"));
    }
}

//! Prometheus metrics served on `/metrics`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::cache::WatchCache;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    watchers: Gauge,
    open_watchers: AtomicI64,
    /// Text from other parts of the process (the in-process controllers' cache readiness).
    sources: std::sync::Mutex<Vec<Source>>,
}

/// Renders metrics of another part of the process in Prometheus text format.
pub type Source = Box<dyn Fn() -> String + Send + Sync>;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let latency =
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)));
        let watchers = Gauge::default();
        registry.register("apiserver_request", "Requests by verb, resource and HTTP code", requests.clone());
        registry.register(
            "apiserver_request_duration_seconds",
            "Request latency by verb and resource",
            latency.clone(),
        );
        registry.register("apiserver_registered_watchers", "Open watch streams", watchers.clone());
        Self { registry, requests, latency, watchers, open_watchers: AtomicI64::new(0), sources: Default::default() }
    }

    pub fn observe_request(&self, verb: &str, resource: &str, code: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&vec![
                ("verb", verb.to_string()),
                ("resource", resource.to_string()),
                ("code", code.to_string()),
            ])
            .inc();
        if verb != "WATCH" {
            self.latency
                .get_or_create(&vec![("verb", verb.to_string()), ("resource", resource.to_string())])
                .observe(elapsed.as_secs_f64());
        }
    }

    pub fn watch_opened(&self) {
        self.watchers.set(self.open_watchers.fetch_add(1, Ordering::Relaxed) + 1);
    }

    pub fn watch_closed(&self) {
        self.watchers.set(self.open_watchers.fetch_sub(1, Ordering::Relaxed) - 1);
    }

    /// Adds metrics rendered by another part of the process to every scrape.
    pub fn add_source(&self, source: Source) {
        self.sources.lock().expect("metrics sources").push(source);
    }

    pub fn render(&self, cache: &WatchCache) -> String {
        let mut out = String::new();
        let _ = encode_registry(&mut out, &self.registry);
        out.push_str(&krate_client::process::render());
        // Point-in-time gauges read from the cache.
        out.push_str(
            "# HELP apiserver_storage_objects Objects stored, by resource.\n# TYPE apiserver_storage_objects gauge\n",
        );
        let mut counts = cache.counts();
        counts.sort();
        for (prefix, count) in counts {
            let resource =
                prefix.trim_start_matches(crate::cache::REGISTRY_PREFIX).trim_end_matches('/').replace('/', ".");
            out.push_str(&format!("apiserver_storage_objects{{resource=\"{resource}\"}} {count}\n"));
        }
        out.push_str(&format!(
            "# HELP krate_store_revision Newest revision applied to the watch cache.\n# TYPE krate_store_revision gauge\nkrate_store_revision {}\n",
            cache.revision()
        ));
        for source in self.sources.lock().expect("metrics sources").iter() {
            out.push_str(&source());
        }
        let _ = encode_eof(&mut out);
        out
    }
}

//! The proxy's metrics, under kube-proxy's names (`kubeproxy_*`), rendered into the
//! `/metrics` of the process that runs it.

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use prometheus_client::encoding::text::encode_registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The annotation the endpoints controller stamps with the time of the change behind a
/// slice's last update.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

struct Metrics {
    registry: Registry,
    sync: Histogram,
    full: Histogram,
    partial: Histogram,
    programming: Histogram,
    last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    failures: Counter,
    /// Trigger times of changes not yet in the kernel.
    pending: Mutex<Vec<jiff::Timestamp>>,
}

/// Upstream's network programming buckets: 0, 0.25, 0.5, 1..59, 60..115 by 5, 120..300 by 30.
fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("kubeproxy");
    let sync = Histogram::new(exponential_buckets(0.001, 2.0, 15));
    let full = Histogram::new(exponential_buckets(0.001, 2.0, 15));
    let partial = Histogram::new(exponential_buckets(0.001, 2.0, 15));
    let programming = Histogram::new(programming_buckets());
    let last_sync = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    let failures = Counter::default();
    registry.register("sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", sync.clone());
    registry.register(
        "sync_full_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds for full resyncs",
        full.clone(),
    );
    registry.register(
        "sync_partial_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds for partial resyncs",
        partial.clone(),
    );
    registry.register(
        "network_programming_duration_seconds",
        "In Cluster Network Programming Latency in seconds",
        programming.clone(),
    );
    registry.register(
        "sync_proxy_rules_last_timestamp_seconds",
        "The last time proxy rules were successfully synced",
        last_sync.clone(),
    );
    registry.register(
        "sync_proxy_rules_nftables_sync_failures",
        "Number of times the nftables transaction of a sync failed",
        failures.clone(),
    );
    Metrics { registry, sync, full, partial, programming, last_sync, failures, pending: Mutex::default() }
});

pub fn observe_sync(full: bool, took: Duration) {
    let m = &*METRICS;
    m.sync.observe(took.as_secs_f64());
    if full { &m.full } else { &m.partial }.observe(took.as_secs_f64());
    m.last_sync.set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
}

pub fn sync_failed() {
    METRICS.failures.inc();
}

/// Notes when the change behind a slice's update happened.
pub fn observe_trigger(slice: &EndpointSlice) {
    let at = slice.metadata.annotations.as_ref().and_then(|a| a.get(TRIGGER_TIME)).and_then(|t| t.parse().ok());
    if let Some(at) = at {
        METRICS.pending.lock().expect("metrics lock").push(at);
    }
}

/// The changes seen so far are in the kernel.
pub fn programmed() {
    let now = jiff::Timestamp::now();
    for at in METRICS.pending.lock().expect("metrics lock").drain(..) {
        let seconds = now.duration_since(at).as_secs_f64().max(0.0);
        METRICS.programming.observe(seconds);
    }
}

/// The metrics in Prometheus' text format (no `# EOF`: the caller's page goes on).
pub fn render() -> String {
    let mut out = String::new();
    let _ = encode_registry(&mut out, &METRICS.registry);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn programming_buckets_are_upstreams() {
        let b = super::programming_buckets();
        assert_eq!(b.len(), 81);
        assert_eq!((b[0], b[3], b[61], b[62], b[74], b[80]), (0.0, 1.0, 59.0, 60.0, 120.0, 300.0));
    }

    #[test]
    fn metrics_render_under_kube_proxys_names() {
        super::observe_sync(true, std::time::Duration::from_millis(3));
        let text = super::render();
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket"), "{text}");
        assert!(text.contains("kubeproxy_sync_proxy_rules_nftables_sync_failures_total"), "{text}");
    }
}

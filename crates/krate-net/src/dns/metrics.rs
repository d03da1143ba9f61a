//! The responder's metrics, under CoreDNS's names (`coredns_dns_*`).

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use hickory_proto::rr::RecordType;
use prometheus_client::encoding::text::encode_registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::Transport;

type Labels = Vec<(&'static str, String)>;

struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    responses: Family<Labels, Counter>,
    duration: Family<Labels, Histogram>,
}

static SERVER: OnceLock<String> = OnceLock::new();

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("coredns_dns");
    let requests = Family::<Labels, Counter>::default();
    let responses = Family::<Labels, Counter>::default();
    let duration =
        Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.00025, 2.0, 16)));
    registry.register("requests", "Counter of DNS requests made per zone, protocol and family.", requests.clone());
    registry.register("responses", "Counter of response status codes.", responses.clone());
    registry.register(
        "request_duration_seconds",
        "Histogram of the time (in seconds) each request took.",
        duration.clone(),
    );
    Metrics { registry, requests, responses, duration }
});

/// Names the server in the labels (`dns://10.42.0.1:53`).
pub fn set_server(server: &str) {
    let _ = SERVER.set(server.to_string());
}

/// CoreDNS's query type label.
pub fn type_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::MX => "MX",
        RecordType::SOA => "SOA",
        RecordType::CNAME => "CNAME",
        RecordType::PTR => "PTR",
        RecordType::TXT => "TXT",
        RecordType::NS => "NS",
        RecordType::SRV => "SRV",
        RecordType::HTTPS => "HTTPS",
        RecordType::ANY => "ANY",
        _ => "other",
    }
}

/// The counters and histogram of one label set, resolved once.
struct Handles {
    requests: Counter,
    responses: Counter,
    duration: Histogram,
}

/// (transport, query type, in the cluster zone, rcode).
type Key = (Transport, &'static str, bool, &'static str);

static HANDLES: LazyLock<std::sync::RwLock<std::collections::HashMap<Key, Handles>>> = LazyLock::new(Default::default);

pub fn observe(transport: Transport, qtype: &'static str, zone: &str, rcode: &'static str, took: Duration) {
    let key: Key = (transport, qtype, zone != ".", rcode);
    let record = |h: &Handles| {
        h.requests.inc();
        h.responses.inc();
        h.duration.observe(took.as_secs_f64());
    };
    if let Some(h) = HANDLES.read().expect("dns metrics lock").get(&key) {
        return record(h);
    }
    let m = &*METRICS;
    let server = SERVER.get().cloned().unwrap_or_default();
    let proto = if transport == Transport::Udp { "udp" } else { "tcp" };
    let base = || vec![("server", server.clone()), ("zone", zone.to_string()), ("view", String::new())];
    let mut requests = base();
    requests.extend([("proto", proto.to_string()), ("family", "1".to_string()), ("type", qtype.to_string())]);
    let mut responses = base();
    responses.extend([("rcode", rcode.to_string()), ("plugin", String::new())]);
    let mut duration = base();
    duration.push(("type", qtype.to_string()));
    let h = Handles {
        requests: m.requests.get_or_create(&requests).clone(),
        responses: m.responses.get_or_create(&responses).clone(),
        duration: m.duration.get_or_create(&duration).clone(),
    };
    record(&h);
    HANDLES.write().expect("dns metrics lock").insert(key, h);
}

/// The metrics in Prometheus' text format (no `# EOF`).
pub fn render() -> String {
    let mut out = String::new();
    let _ = encode_registry(&mut out, &METRICS.registry);
    out
}

//! metrics.k8s.io/v1beta1, served by krate itself as metrics-server would serve it:
//! `NodeMetrics` and `PodMetrics` worked out from the node agents' `/metrics/resource`
//! (cumulative CPU seconds and working-set memory with timestamps). CPU is a rate, so
//! each figure needs two scrapes: the [`Scraper`] keeps the last two of every node and
//! scrapes all nodes every [`RESOLUTION`] while someone asks for metrics (`kubectl
//! top`, the HorizontalPodAutoscaler), and stops ten minutes after the last request. A
//! request that finds no two scrapes takes them itself, one second apart, so the first
//! `kubectl top` has figures. A pod is listed once every running container of it has a
//! figure, as metrics-server lists them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{Request, Response};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1 as core;
use krate_api::selectors::{FieldSelector, LabelSelector};
use krate_api::{ApiError, ApiResult};
use serde_json::{json, Value};

use super::{Call, Handler};
use crate::registry::ListOptions;
use crate::ApiServer;

/// How often nodes are scraped while metrics are wanted (metrics-server's default).
pub const RESOLUTION: Duration = Duration::from_secs(15);
/// How long scraping goes on after the last request for metrics.
const ACTIVE_FOR: Duration = Duration::from_secs(600);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// One cumulative CPU figure and a memory figure, at a time (milliseconds).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Point {
    cpu_seconds: f64,
    memory_bytes: f64,
    at_ms: i64,
}

/// What one scrape of a node's agent returned.
#[derive(Clone, Debug, Default, PartialEq)]
struct Scrape {
    node: Option<Point>,
    /// By (namespace, pod, container).
    containers: BTreeMap<(String, String, String), Point>,
}

/// The last two scrapes of every node.
#[derive(Default)]
pub struct Scraper {
    nodes: Mutex<HashMap<String, (Option<Scrape>, Scrape)>>,
    wanted_until: Mutex<Option<Instant>>,
    running: AtomicBool,
}

/// Parses the kubelet's resource metrics (Prometheus text with timestamps).
fn parse(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    let mut set = |key: Option<(String, String, String)>, cpu: Option<f64>, memory: Option<f64>, at_ms: i64| {
        let point = match key {
            None => scrape.node.get_or_insert(Point { cpu_seconds: 0.0, memory_bytes: 0.0, at_ms }),
            Some(key) => scrape.containers.entry(key).or_insert(Point { cpu_seconds: 0.0, memory_bytes: 0.0, at_ms }),
        };
        if let Some(cpu) = cpu {
            point.cpu_seconds = cpu;
            point.at_ms = at_ms;
        }
        if let Some(memory) = memory {
            point.memory_bytes = memory;
        }
    };
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, rest) = match line.find('}') {
            Some(end) => (&line[..=end], &line[end + 1..]),
            None => line.split_once(' ').map_or((line, ""), |(s, r)| (s, r)),
        };
        let mut fields = rest.split_whitespace();
        let Some(value) = fields.next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        let at_ms = fields.next().and_then(|t| t.parse::<i64>().ok()).unwrap_or_default();
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let label = |key: &str| -> String {
            let needle = format!("{key}=\"");
            labels.split(&needle).nth(1).and_then(|v| v.split('"').next()).map(str::to_string).unwrap_or_default()
        };
        let container = || Some((label("namespace"), label("pod"), label("container")));
        match name.trim() {
            "node_cpu_usage_seconds_total" => set(None, Some(value), None, at_ms),
            "node_memory_working_set_bytes" => set(None, None, Some(value), at_ms),
            "container_cpu_usage_seconds_total" => set(container(), Some(value), None, at_ms),
            "container_memory_working_set_bytes" => set(container(), None, Some(value), at_ms),
            _ => {}
        }
    }
    scrape
}

/// Cores in use between two points (None when there is no interval or the counter went
/// back, as after a restart), and the interval.
fn rate(now: &Point, before: &Point) -> Option<(f64, Duration)> {
    let dt = now.at_ms - before.at_ms;
    let dc = now.cpu_seconds - before.cpu_seconds;
    (dt > 0 && dc >= 0.0).then(|| (dc * 1000.0 / dt as f64, Duration::from_millis(dt as u64)))
}

/// CPU as upstream's scaled quantity in nanocores, memory in bytes (`Ki` when whole).
fn usage(cores: f64, memory_bytes: f64) -> Value {
    let nanocores = (cores * 1e9).round() as u64;
    let bytes = memory_bytes as u64;
    let memory = if bytes.is_multiple_of(1024) { format!("{}Ki", bytes / 1024) } else { bytes.to_string() };
    json!({"cpu": format!("{nanocores}n"), "memory": memory})
}

fn timestamp(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default()
}

fn window_text(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}s", s as u64)
    } else {
        format!("{}s", (s * 1000.0).round() / 1000.0)
    }
}

impl Scraper {
    /// Scrapes every node with an agent address once.
    async fn scrape_all(&self, server: &ApiServer) {
        let Some(tls) = server.settings.kubelet_client.clone() else { return };
        let scope = server.storage.builtin::<core::Node>(None);
        let Ok(nodes) = server.storage.list(&scope, &ListOptions::default()).await else { return };
        let scrapes = nodes.items.iter().map(|node| {
            let (node, tls) = (node.parse(), tls.clone());
            async move {
                let name = node["metadata"]["name"].as_str().unwrap_or_default().to_string();
                let (host, port) = super::pods::nodeproxy::agent_address(&node)?;
                let fetch = async {
                    let mut sender = super::pods::nodeproxy::open_connection(&host, port, Some(tls)).await?;
                    let request =
                        Request::get("/metrics/resource").header(http::header::HOST, format!("{host}:{port}"));
                    let response = sender.send_request(request.body(Body::empty())?).await?;
                    anyhow::ensure!(response.status().is_success(), "answered {}", response.status());
                    Ok::<_, anyhow::Error>(response.into_body().collect().await?.to_bytes())
                };
                match tokio::time::timeout(SCRAPE_TIMEOUT, fetch).await {
                    Ok(Ok(body)) => Some((name, parse(&String::from_utf8_lossy(&body)))),
                    Ok(Err(e)) => {
                        tracing::debug!(node = %name, error = %format!("{e:#}"), "scraping resource metrics failed");
                        None
                    }
                    Err(_) => None,
                }
            }
        });
        let results = futures::future::join_all(scrapes).await;
        let mut kept = self.nodes.lock().expect("scraper lock");
        for (name, scrape) in results.into_iter().flatten() {
            let entry = kept.remove(&name);
            let previous = entry.map(|(_, latest)| latest);
            kept.insert(name, (previous, scrape));
        }
    }

    /// Whether every node scraped has two scrapes.
    fn has_rates(&self) -> bool {
        let nodes = self.nodes.lock().expect("scraper lock");
        !nodes.is_empty() && nodes.values().all(|(previous, _)| previous.is_some())
    }

    /// Notes that metrics are wanted: starts the background scrapes if they are not
    /// running, and scrapes twice now when there are no rates yet.
    async fn wanted(&self, server: &Arc<ApiServer>) {
        *self.wanted_until.lock().expect("scraper lock") = Some(Instant::now() + ACTIVE_FOR);
        if !self.has_rates() {
            self.scrape_all(server).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.scrape_all(server).await;
        }
        if !self.running.swap(true, Ordering::SeqCst) {
            let server = server.clone();
            tokio::spawn(async move {
                let scraper = &server.resource_metrics;
                loop {
                    tokio::time::sleep(RESOLUTION).await;
                    let until = *scraper.wanted_until.lock().expect("scraper lock");
                    if until.is_none_or(|t| Instant::now() > t) {
                        scraper.nodes.lock().expect("scraper lock").clear();
                        scraper.running.store(false, Ordering::SeqCst);
                        return;
                    }
                    scraper.scrape_all(&server).await;
                }
            });
        }
    }

    /// NodeMetrics of every node with two scrapes, by name.
    fn node_metrics(&self) -> BTreeMap<String, (Value, i64, Duration)> {
        let nodes = self.nodes.lock().expect("scraper lock");
        let mut out = BTreeMap::new();
        for (name, (previous, latest)) in nodes.iter() {
            let (Some(now), Some(before)) = (latest.node, previous.as_ref().and_then(|p| p.node)) else { continue };
            if let Some((cores, window)) = rate(&now, &before) {
                out.insert(name.clone(), (usage(cores, now.memory_bytes), now.at_ms, window));
            }
        }
        out
    }

    /// Container usage of every pod with a figure for each container, by (namespace,
    /// pod): the containers in name order, the latest timestamp and the window.
    fn pod_metrics(&self) -> BTreeMap<(String, String), (Vec<Value>, i64, Duration)> {
        let nodes = self.nodes.lock().expect("scraper lock");
        let mut out: BTreeMap<(String, String), (Vec<Value>, i64, Duration)> = BTreeMap::new();
        let mut incomplete = Vec::new();
        for (previous, latest) in nodes.values() {
            for ((namespace, pod, container), now) in &latest.containers {
                let key = (namespace.clone(), pod.clone());
                let before = previous
                    .as_ref()
                    .and_then(|p| p.containers.get(&(namespace.clone(), pod.clone(), container.clone())));
                let Some((cores, window)) = before.and_then(|b| rate(now, b)) else {
                    incomplete.push(key);
                    continue;
                };
                let entry = out.entry(key).or_insert((Vec::new(), now.at_ms, window));
                entry.0.push(json!({"name": container, "usage": usage(cores, now.memory_bytes)}));
                entry.1 = entry.1.max(now.at_ms);
                entry.2 = entry.2.max(window);
            }
        }
        for key in incomplete {
            out.remove(&key);
        }
        out
    }
}

/// `GET /apis/metrics.k8s.io/v1beta1/nodes[/{name}]` and `.../[namespaces/{ns}/]pods[/{name}]`.
pub struct ResourceMetrics;

#[async_trait::async_trait]
impl Handler for ResourceMetrics {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>> {
        let server = call.server;
        server.resource_metrics.wanted(server).await;
        let kind = &call.scope.kind;
        let labels = LabelSelector::parse(call.query.get("labelSelector").map(String::as_str).unwrap_or_default())
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(call.query.get("fieldSelector").map(String::as_str).unwrap_or_default())
            .map_err(ApiError::bad_request)?;
        let pods = call.scope.kind.namespaced;
        let mut items = Vec::new();
        if pods {
            let scope = server.storage.builtin::<core::Pod>(call.scope.namespace.clone());
            let listed = server.storage.list(&scope, &ListOptions { labels, ..Default::default() }).await?;
            let metrics = server.resource_metrics.pod_metrics();
            for pod in listed.items.iter().map(|p| p.parse()) {
                let meta = &pod["metadata"];
                let key = (
                    meta["namespace"].as_str().unwrap_or_default().to_string(),
                    meta["name"].as_str().unwrap_or_default().to_string(),
                );
                let Some((containers, at_ms, window)) = metrics.get(&key) else { continue };
                items.push(json!({
                    "kind": "PodMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
                    "metadata": {"name": key.1, "namespace": key.0, "creationTimestamp": timestamp(jiff::Timestamp::now().as_millisecond()), "labels": meta["labels"].clone()},
                    "timestamp": timestamp(*at_ms), "window": window_text(*window), "containers": containers,
                }));
            }
        } else {
            let scope = server.storage.builtin::<core::Node>(None);
            let listed = server.storage.list(&scope, &ListOptions { labels, ..Default::default() }).await?;
            let metrics = server.resource_metrics.node_metrics();
            for node in listed.items.iter().map(|n| n.parse()) {
                let name = node["metadata"]["name"].as_str().unwrap_or_default();
                let Some((usage, at_ms, window)) = metrics.get(name) else { continue };
                items.push(json!({
                    "kind": "NodeMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
                    "metadata": {"name": name, "creationTimestamp": timestamp(jiff::Timestamp::now().as_millisecond()), "labels": node["metadata"]["labels"].clone()},
                    "timestamp": timestamp(*at_ms), "window": window_text(*window), "usage": usage,
                }));
            }
        }
        items.retain(|item| fields.matches(|f| kind.field_value(item, f)));
        // As metrics-server names what it did not find.
        let not_found = || match &call.scope.namespace {
            Some(ns) if pods => ApiError::not_found("metrics.k8s.io", "podmetrics", &format!("{ns}/{}", call.name)),
            _ => ApiError::not_found("metrics.k8s.io", "nodemetrics", call.name),
        };
        super::read_answer(&call, items, not_found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "# HELP container_cpu_usage_seconds_total [STABLE] x\n\
        container_cpu_usage_seconds_total{container=\"burn\",namespace=\"default\",pod=\"cpu\"} 12.5 10000\n\
        container_memory_working_set_bytes{container=\"burn\",namespace=\"default\",pod=\"cpu\"} 1048576 10000\n\
        node_cpu_usage_seconds_total 100 10000\nnode_memory_working_set_bytes 2048 10000\nresource_scrape_error 0\n";

    #[test]
    fn the_kubelets_resource_metrics_parse() {
        let scrape = parse(SCRAPE);
        assert_eq!(scrape.node, Some(Point { cpu_seconds: 100.0, memory_bytes: 2048.0, at_ms: 10000 }));
        let key = ("default".to_string(), "cpu".to_string(), "burn".to_string());
        assert_eq!(scrape.containers[&key], Point { cpu_seconds: 12.5, memory_bytes: 1048576.0, at_ms: 10000 });
    }

    #[test]
    fn usage_is_a_rate_between_two_scrapes() {
        let before = Point { cpu_seconds: 10.0, memory_bytes: 0.0, at_ms: 0 };
        let now = Point { cpu_seconds: 25.0, memory_bytes: 1048576.0, at_ms: 15_000 };
        let (cores, window) = rate(&now, &before).unwrap();
        assert_eq!((cores, window), (1.0, Duration::from_secs(15)));
        assert_eq!(usage(cores, now.memory_bytes), json!({"cpu": "1000000000n", "memory": "1024Ki"}));
        assert_eq!(rate(&before, &now), None, "a counter that went back (a restart) has no rate");
        assert_eq!(window_text(Duration::from_millis(15_250)), "15.25s");
    }

    #[test]
    fn a_pod_is_listed_once_each_container_has_two_scrapes() {
        let scraper = Scraper::default();
        let first = parse(SCRAPE);
        let mut second = parse(&SCRAPE.replace("12.5 10000", "20 25000").replace("100 10000", "115 25000"));
        let extra = ("default".to_string(), "cpu".to_string(), "late".to_string());
        second.containers.insert(extra.clone(), Point { cpu_seconds: 1.0, memory_bytes: 0.0, at_ms: 25000 });
        scraper.nodes.lock().unwrap().insert("n1".into(), (Some(first), second.clone()));
        assert!(scraper.pod_metrics().is_empty(), "container late has one scrape only");
        assert_eq!(scraper.node_metrics()["n1"].0["cpu"], "1000000000n");
        second.containers.remove(&extra);
        scraper.nodes.lock().unwrap().insert("n1".into(), (Some(parse(SCRAPE)), second));
        let pods = scraper.pod_metrics();
        let (containers, _, window) = &pods[&("default".to_string(), "cpu".to_string())];
        assert_eq!(containers[0]["usage"]["cpu"], "500000000n");
        assert_eq!(*window, Duration::from_secs(15));
    }
}

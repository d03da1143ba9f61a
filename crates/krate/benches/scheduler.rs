//! Scheduler benchmark: N nodes (default 5,000) and P pods (default 10,000) per phase
//! against a release `krate server` with its built-in scheduler, in three phases: basic
//! pods, pods with required node affinity, and pods with required pod anti-affinity.
//! Each phase creates its pods with 32 concurrent clients and times creation to binding
//! (observed through a watch). The reference, measured in the same run, is creating the
//! same pods for a scheduler that does not exist (the API's own pod create rate). Last,
//! those pods are scheduled as a backlog by a stand-alone `krate scheduler` (upstream's
//! scheduler_perf shape: pods exist before they are scheduled, so creation does not share
//! the cores with scheduling).
//!
//! `cargo bench -p krate --bench scheduler` (KRATE_BENCH_NODES, KRATE_BENCH_PODS,
//! KRATE_BENCH_ANTI_PODS (default 1,000, as upstream's SchedulingPodAntiAffinity);
//! KRATE_BENCH_SERVER_LOG=<file> keeps the server's log).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::BenchServer;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::{json, Value};
use tokio::sync::{Mutex, Semaphore};

const CONCURRENCY: usize = 32;
const ZONES: usize = 10;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn for_all<F, Fut>(range: std::ops::Range<usize>, op: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let sem = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for i in range {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            op(i).await;
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn pod(phase: &str, i: usize, extra: Value) -> Pod {
    let mut p = json!({
        "metadata": {"name": format!("{phase}-{i:05}"), "labels": {"phase": phase, "group": format!("g{}", i % 50)}},
        "spec": {"containers": [{"name": "c", "image": "x:1", "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}}}]},
    });
    if let (Some(spec), Some(extra)) = (p["spec"].as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(p).unwrap()
}

struct Phase {
    pods_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

/// Creates `count` pods of `phase` and waits until the scheduler has bound them all.
async fn run_phase(pods: &Api<Pod>, phase: &'static str, count: usize, extra: Value) -> Phase {
    let rv = pods.list(&ListParams::default().limit(1)).await.unwrap().metadata.resource_version.unwrap();
    let mut stream =
        pods.watch(&WatchParams::default().labels(&format!("phase={phase}")).timeout(290), &rv).await.unwrap().boxed();
    let created: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let start = Instant::now();
    let api = pods.clone();
    let created_by = created.clone();
    let creator = tokio::spawn(async move {
        for_all(0..count, move |i| {
            let api = api.clone();
            let created = created_by.clone();
            let p = pod(phase, i, extra.clone());
            async move {
                let name = p.metadata.name.clone().unwrap();
                api.create(&PostParams::default(), &p).await.unwrap();
                created.lock().await.entry(name).or_insert_with(Instant::now);
            }
        })
        .await;
    });
    let bound = wait_bound(&mut stream, count).await;
    let elapsed = start.elapsed();
    creator.await.unwrap();
    let created = created.lock().await;
    let mut latencies: Vec<Duration> =
        bound.iter().map(|(n, t)| t.saturating_duration_since(created.get(n).copied().unwrap_or(start))).collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Phase { pods_per_sec: count as f64 / elapsed.as_secs_f64(), p50: pct(0.5), p99: pct(0.99) }
}

/// When each pod of a watch (by name) was first seen bound, once `count` are.
async fn wait_bound(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin),
    count: usize,
) -> HashMap<String, Instant> {
    let mut bound: HashMap<String, Instant> = HashMap::new();
    while bound.len() < count {
        let event = tokio::time::timeout(Duration::from_secs(120), stream.try_next())
            .await
            .expect("pods keep being bound")
            .unwrap();
        if let Some(WatchEvent::Added(p) | WatchEvent::Modified(p)) = event {
            if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                bound.entry(p.metadata.name.clone().unwrap()).or_insert_with(Instant::now);
            }
        }
    }
    bound
}

/// Scheduling a backlog, as upstream's scheduler_perf measures (pods exist before they
/// are scheduled): the reference phase's pods, of scheduler `nobody`, are scheduled by a
/// stand-alone `krate scheduler` of that name started now. Pods per second from its start.
async fn run_backlog(pods: &Api<Pod>, kubeconfig: &std::path::Path, count: usize) -> f64 {
    let rv = pods.list(&ListParams::default().limit(1)).await.unwrap().metadata.resource_version.unwrap();
    let mut stream =
        pods.watch(&WatchParams::default().labels("phase=reference").timeout(290), &rv).await.unwrap().boxed();
    let start = Instant::now();
    let _scheduler = common::Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_krate"))
            .args(["scheduler", "--scheduler-name", "nobody", "--leader-elect=false", "--kubeconfig"])
            .arg(kubeconfig)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start krate scheduler"),
    );
    wait_bound(&mut stream, count).await;
    count as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n_nodes = env("KRATE_BENCH_NODES", 5_000);
    let n_pods = env("KRATE_BENCH_PODS", 10_000);
    let server = BenchServer::start(&["--disable-agent", "--watch-cache-size", "200000"]).await;
    let client = server.client.clone();
    println!("krate scheduler benchmark: {n_nodes} nodes, {n_pods} pods per phase, {CONCURRENCY} concurrent clients, {} cores", std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1));

    let t = Instant::now();
    let nodes: Api<Node> = Api::all(client.clone());
    let api = nodes.clone();
    for_all(0..n_nodes, move |i| {
        let api = api.clone();
        async move {
            let name = format!("node-{i:05}");
            let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "zone": format!("zone-{}", i % ZONES)}}})).unwrap();
            api.create(&PostParams::default(), &node).await.unwrap();
            let resources = json!({"cpu": "32", "memory": "128Gi", "pods": "110"});
            let status = json!({"status": {"capacity": resources, "allocatable": resources, "conditions": [{"type": "Ready", "status": "True"}]}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
        }
    })
    .await;
    println!("registered {n_nodes} nodes in {:.1} s", t.elapsed().as_secs_f64());

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let report = |name: &str, p: &Phase| {
        println!(
            "{:<34} {:>10.0} {:>8.1}ms {:>8.1}ms",
            name,
            p.pods_per_sec,
            p.p50.as_secs_f64() * 1e3,
            p.p99.as_secs_f64() * 1e3
        );
    };
    println!();
    println!("{:<34} {:>10} {:>10} {:>10}", "phase", "pods/s", "p50", "p99");
    let reference = run_reference(&pods, n_pods).await;
    println!("{:<34} {:>10.0} {:>10} {:>10}", "API pod create, no scheduler (ref)", reference, "", "");
    let basic = run_phase(&pods, "basic", n_pods, json!({})).await;
    report("basic", &basic);
    let affinity = run_phase(&pods, "affinity", n_pods, json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["zone-1", "zone-2", "zone-3"]}]}]}}}})).await;
    report("required node affinity", &affinity);
    // Upstream's SchedulingPodAntiAffinity measures 1,000 such pods on 5,000 nodes.
    let anti = run_phase(
        &pods,
        "anti",
        env("KRATE_BENCH_ANTI_PODS", 1_000).min(n_nodes),
        json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"phase": "anti"}}, "topologyKey": "kubernetes.io/hostname"}]}}}),
    )
    .await;
    report("required pod anti-affinity", &anti);
    let backlog = run_backlog(&pods, &server.kubeconfig, n_pods).await;
    println!("{:<34} {:>10.0}", "backlog of basic pods (standalone)", backlog);
    println!();
    println!("scheduled vs created throughput (basic): {:.2}x", basic.pods_per_sec / reference);
    println!("upstream's CI thresholds for the same shapes: 680 / 220 / 60 pods/s; krate here: {:.1}x / {:.1}x / {:.1}x (backlog {:.1}x)",
        basic.pods_per_sec / 680.0, affinity.pods_per_sec / 220.0, anti.pods_per_sec / 60.0, backlog / 680.0);
    drop(server);
}

/// The API's own pod create rate: pods for a scheduler that does not exist.
async fn run_reference(pods: &Api<Pod>, count: usize) -> f64 {
    let start = Instant::now();
    let api = pods.clone();
    for_all(0..count, move |i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &pod("reference", i, json!({"schedulerName": "nobody"}))).await.unwrap();
        }
    })
    .await;
    count as f64 / start.elapsed().as_secs_f64()
}

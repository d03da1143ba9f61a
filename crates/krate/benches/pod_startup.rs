//! Pod-startup benchmark: P pods (default 100) of krate's test-server image against a
//! release `krate server` whose embedded agent runs them on its own containerd; C clients
//! (default 10) each create a pod and wait until a watch sees it Running before creating
//! the next; creation → Running is timed per pod. The
//! reference, measured in the same run on the same containerd, is `ctr run -d` of the same
//! image with the same concurrency: the ratio is krate's own overhead (API, scheduler,
//! sandbox with its network, status). The image is pulled once before either is timed.
//!
//! `cargo bench -p krate --bench pod_startup` (root; needs containerd, runc, the CNI
//! plugins, docker-registry and busybox-static: ./scripts/install-deps).
//! KRATE_BENCH_PODS, KRATE_BENCH_CONCURRENCY.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::registry::TestRegistry;
use common::BenchServer;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;
use tokio::sync::{Mutex, Semaphore};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let pct = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (pct(0.5), pct(0.99))
}

fn ctr(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["--namespace", "k8s.io"])
        .args(args)
        .output()
        .expect("run ctr")
}

/// `ctr run -d` of `image`, `n` times with `concurrency` at once: each start's latency.
async fn ctr_reference(socket: &std::path::Path, image: &str, n: usize, concurrency: usize) -> Vec<Duration> {
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (socket, image) = (socket.to_path_buf(), image.to_string());
        tasks.push(tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let out = ctr(&socket, &["run", "-d", &image, &format!("bench-ref-{i}")]);
            let elapsed = t.elapsed();
            assert!(out.status.success(), "ctr run: {}", String::from_utf8_lossy(&out.stderr));
            drop(permit);
            elapsed
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    for i in 0..n {
        let id = format!("bench-ref-{i}");
        ctr(socket, &["task", "kill", "-s", "KILL", &id]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..n {
        let id = format!("bench-ref-{i}");
        ctr(socket, &["task", "delete", "-f", &id]);
        ctr(socket, &["container", "delete", &id]);
    }
    out
}

#[tokio::main]
async fn main() {
    let n = env("KRATE_BENCH_PODS", 100);
    let concurrency = env("KRATE_BENCH_CONCURRENCY", 10);
    let registry = TestRegistry::start();
    let image = registry.image("test-server");
    let max_pods = (n + 10).to_string();
    let mut server = BenchServer::start(&[
        "--node-name",
        "bench-node",
        "--bridge",
        "kbench0",
        "--pod-cidr",
        "10.250.0.0/24",
        "--insecure-registry",
        &registry.address,
        "--max-pods",
        &max_pods,
        // How full this machine's disk is must not refuse the benchmark's pods.
        "--eviction-hard",
        "memory.available<100Mi,nodefs.available<512Mi,imagefs.available<512Mi",
    ])
    .await;
    let client = server.client.clone();
    let data = server.data.clone();
    let nodes: Api<Node> = Api::all(client.clone());
    loop {
        let ready = nodes
            .get_opt("bench-node")
            .await
            .ok()
            .flatten()
            .and_then(|n| n.status?.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let socket = data.join("agent/containerd/containerd.sock");
    let pull = ctr(&socket, &["images", "pull", "--plain-http", &image]);
    assert!(pull.status.success(), "ctr pull: {}", String::from_utf8_lossy(&pull.stderr));
    println!(
        "krate pod-startup benchmark: {n} pods, {concurrency} concurrent clients, {} cores",
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1)
    );

    let reference = ctr_reference(&socket, &image, n, concurrency).await;

    // The same closed loop as the reference: each client creates a pod and waits until
    // the watch sees it Running before creating the next, so `concurrency` are in flight.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let waiters: Arc<Mutex<HashMap<String, tokio::sync::oneshot::Sender<Instant>>>> = Default::default();
    let mut watch = pods.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    let w = waiters.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(event)) = watch.try_next().await {
            if let WatchEvent::Added(pod) | WatchEvent::Modified(pod) = event {
                if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
                    if let Some(tx) = w.lock().await.remove(pod.metadata.name.as_deref().unwrap_or_default()) {
                        let _ = tx.send(Instant::now());
                    }
                }
            }
        }
    });
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (p, img, w) = (pods.clone(), image.clone(), waiters.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("startup-{i:03}");
            let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": img}], "terminationGracePeriodSeconds": 1}})).unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel();
            w.lock().await.insert(name.clone(), tx);
            let t = Instant::now();
            p.create(&PostParams::default(), &pod).await.unwrap();
            let running = tokio::time::timeout(Duration::from_secs(120), rx).await.expect("pod Running within 120 s").unwrap();
            drop(permit);
            running.saturating_duration_since(t)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.push(t.await.unwrap());
    }
    watcher.abort();
    let (k50, k99) = percentiles(latencies);
    let (r50, r99) = percentiles(reference);
    println!();
    println!("{:<44} {:>9} {:>9}", "", "p50", "p99");
    println!(
        "{:<44} {:>7.0}ms {:>7.0}ms",
        "ctr run -d (reference, same containerd)",
        r50.as_secs_f64() * 1e3,
        r99.as_secs_f64() * 1e3
    );
    println!(
        "{:<44} {:>7.0}ms {:>7.0}ms",
        "krate pod: create → Running (watch)",
        k50.as_secs_f64() * 1e3,
        k99.as_secs_f64() * 1e3
    );
    println!();
    println!(
        "p50 ratio krate / ctr run: {:.2}x (aim: under 2); p99 {:.2} s (upstream SLO: ≤ 5 s)",
        k50.as_secs_f64() / r50.as_secs_f64(),
        k99.as_secs_f64()
    );

    // Clean up: delete the pods, then reset the agent (containers, containerd, bridge).
    let _ = pods.delete_collection(&Default::default(), &ListParams::default()).await;
    server.stop();
    let out = Command::new(env!("CARGO_BIN_EXE_krate"))
        .args(["reset", "--data-dir"])
        .arg(&data)
        .output()
        .expect("krate reset");
    assert!(out.status.success(), "krate reset: {}", String::from_utf8_lossy(&out.stderr));
}

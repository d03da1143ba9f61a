//! Pod-startup benchmark: P pods (default 100) of krate's test-server image, created with
//! C concurrent clients (default 10) against a release `krate server` whose embedded agent
//! runs them on its own containerd; creation → Running is timed through a watch. The
//! reference, measured in the same run on the same containerd, is `ctr run -d` of the same
//! image with the same concurrency: the ratio is krate's own overhead (API, scheduler,
//! sandbox with its network, status). The image is pulled once before either is timed.
//!
//! `cargo bench -p krate --bench pod_startup` (root; needs containerd, runc, the CNI
//! plugins, docker-registry and busybox-static: ./scripts/install-deps).
//! KRATE_BENCH_PODS, KRATE_BENCH_CONCURRENCY.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use tokio::sync::{Mutex, Semaphore};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let pct = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (pct(0.5), pct(0.99))
}

fn ctr(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new("ctr").arg("--address").arg(socket).args(["--namespace", "k8s.io"]).args(args).output().expect("run ctr")
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
    let dir = tempfile::tempdir().unwrap();

    // A registry with the test images.
    let registry_port = free_port();
    let registry_address = format!("127.0.0.1:{registry_port}");
    let config = dir.path().join("registry.yml");
    std::fs::write(&config, format!("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {registry_address}\n", dir.path().join("registry").display())).unwrap();
    let _registry = Killed(Command::new("docker-registry").arg("serve").arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start docker-registry"));
    while std::net::TcpStream::connect(&registry_address).is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    krate_agent::testimages::push_all(&registry_address).expect("push the test images");
    let image = format!("{registry_address}/test-server:1");

    let port = free_port();
    let data = dir.path().join("data");
    let server = Killed(
        Command::new(env!("CARGO_BIN_EXE_krate"))
            .args(["server", "--data-dir", data.to_str().unwrap(), "--port", &port.to_string(), "--node-name", "bench-node", "--bridge", "kbench0", "--pod-cidr", "10.250.0.0/24"])
            .args(["--insecure-registry", &registry_address, "--max-pods", &(n + 10).to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start krate server"),
    );
    let kubeconfig = data.join("admin.kubeconfig");
    while !(kubeconfig.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(&kubeconfig).unwrap(), &KubeConfigOptions::default()).await.unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    loop {
        let ready = nodes.get_opt("bench-node").await.ok().flatten().and_then(|n| n.status?.conditions).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let socket = data.join("agent/containerd/containerd.sock");
    let pull = ctr(&socket, &["images", "pull", "--plain-http", &image]);
    assert!(pull.status.success(), "ctr pull: {}", String::from_utf8_lossy(&pull.stderr));
    println!("krate pod-startup benchmark: {n} pods, {concurrency} concurrent clients, {} cores", std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1));

    let reference = ctr_reference(&socket, &image, n, concurrency).await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let created: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let watch = pods.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    let (c, p, img) = (created.clone(), pods.clone(), image.clone());
    let creator = tokio::spawn(async move {
        let sem = Arc::new(Semaphore::new(concurrency));
        let mut tasks = Vec::new();
        for i in 0..n {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let (c, p, img) = (c.clone(), p.clone(), img.clone());
            tasks.push(tokio::spawn(async move {
                let name = format!("startup-{i:03}");
                let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": img}], "terminationGracePeriodSeconds": 1}})).unwrap();
                let t = Instant::now();
                p.create(&PostParams::default(), &pod).await.unwrap();
                c.lock().await.insert(name, t);
                drop(permit);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let mut running: HashMap<String, Instant> = HashMap::new();
    let mut watch = watch;
    let deadline = Instant::now() + Duration::from_secs(600);
    while running.len() < n && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(30), watch.try_next()).await {
            Ok(Ok(Some(WatchEvent::Added(pod) | WatchEvent::Modified(pod)))) => {
                if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
                    running.entry(pod.metadata.name.clone().unwrap()).or_insert_with(Instant::now);
                }
            }
            Ok(Ok(Some(_))) => {}
            _ => panic!("the watch ended with {} of {n} pods running", running.len()),
        }
    }
    creator.await.unwrap();
    let created = created.lock().await;
    let latencies: Vec<Duration> = running.iter().map(|(name, t)| t.saturating_duration_since(created[name])).collect();
    let (k50, k99) = percentiles(latencies);
    let (r50, r99) = percentiles(reference);
    println!();
    println!("{:<44} {:>9} {:>9}", "", "p50", "p99");
    println!("{:<44} {:>7.0}ms {:>7.0}ms", "ctr run -d (reference, same containerd)", r50.as_secs_f64() * 1e3, r99.as_secs_f64() * 1e3);
    println!("{:<44} {:>7.0}ms {:>7.0}ms", "krate pod: create → Running (watch)", k50.as_secs_f64() * 1e3, k99.as_secs_f64() * 1e3);
    println!();
    println!("p50 ratio krate / ctr run: {:.2}x (aim: under 2); p99 {:.2} s (upstream SLO: ≤ 5 s)", k50.as_secs_f64() / r50.as_secs_f64(), k99.as_secs_f64());

    // Clean up: delete the pods, then reset the agent (containers, containerd, bridge).
    let _ = pods.delete_collection(&Default::default(), &ListParams::default()).await;
    drop(server);
    let out = Command::new(env!("CARGO_BIN_EXE_krate")).args(["reset", "--data-dir"]).arg(&data).output().expect("krate reset");
    assert!(out.status.success(), "krate reset: {}", String::from_utf8_lossy(&out.stderr));
}

//! `krate soak`, the seeds' soak test ("puts lots of pods on each node, and queries
//! each pod via the proxy… run forever"): pins `--pods-per-node` pods of krate's echo
//! image to every Ready node, then, until `--duration` is over or it is interrupted,
//! reaches each pod through the API server's pod proxy (the pods of hollow nodes, which
//! have no network, through a GET of the pod) and checks the answer. Every `--interval`
//! it prints a progress line: requests, errors, latency percentiles, and the resident
//! memory and open file descriptors of the API server and of the nodes' agents (from
//! their `/metrics`). It ends (at `--duration`, or on SIGINT or SIGTERM) with the API
//! server's memory slope and exits non-zero on any error or when that memory grew by
//! more than `--max-memory-growth` percent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// The server's data directory (for its admin kubeconfig).
    #[arg(long, default_value = crate::server::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The kubeconfig to reach the API with (default: the data directory's admin one).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Pods pinned to each Ready node.
    #[arg(long, default_value_t = 10)]
    pub pods_per_node: usize,
    /// How long to run (`90s`, `30m`, `72h`); without it, until interrupted (Ctrl-C).
    #[arg(long)]
    pub duration: Option<String>,
    /// How often a progress line is printed.
    #[arg(long, default_value = "10s")]
    pub interval: String,
    /// The namespace of the soak's pods (created, and deleted at the end unless --keep).
    #[arg(long, default_value = "krate-soak")]
    pub namespace: String,
    /// The pods' image: an HTTP server on port 8080 answering `GET /x` with
    /// `<hostname> /x` (krate's echo image, which every krate node has).
    #[arg(long, default_value = krate_agent::images::ECHO_IMAGE)]
    pub image: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// How often each pod is reached: a round over every pod starts at most this often
    /// (`0s`: as fast as they answer, a load test rather than a soak).
    #[arg(long, default_value = "1s")]
    pub every: String,
    /// Fail when the API server's resident memory grew by more than this many percent
    /// from the first progress line to the last.
    #[arg(long, default_value_t = 50.0)]
    pub max_memory_growth: f64,
    /// Leave the namespace and its pods in place at the end.
    #[arg(long)]
    pub keep: bool,
}

/// Resident memory and open descriptors of one process, from its `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Process {
    rss: f64,
    fds: f64,
}

fn process_of(metrics: &str) -> Option<Process> {
    let value = |name: &str| {
        metrics
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some(Process { rss: value("process_resident_memory_bytes")?, fds: value("process_open_fds").unwrap_or(0.0) })
}

/// The `q` quantile of `sorted` (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Least-squares slope of `(seconds, bytes)` samples, in MiB per hour.
fn slope_mib_per_hour(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (samples.iter().map(|s| s.0).sum::<f64>() / n, samples.iter().map(|s| s.1).sum::<f64>() / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in samples {
        num += (x - mx) * (y - my);
        den += (x - mx) * (x - mx);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den * 3600.0 / (1024.0 * 1024.0)
    }
}

/// Whether the run passed: no error, and memory within bounds.
fn verdict(errors: u64, growth_percent: f64, max_growth: f64) -> Result<(), String> {
    if errors > 0 {
        return Err(format!("{errors} requests failed"));
    }
    if growth_percent > max_growth {
        return Err(format!(
            "the API server's memory grew {growth_percent:.1}% (more than --max-memory-growth {max_growth}%)"
        ));
    }
    Ok(())
}

fn mib(bytes: f64) -> String {
    format!("{:.1}MiB", bytes / (1024.0 * 1024.0))
}

/// One pod of the soak and how it is reached.
#[derive(Clone)]
struct Target {
    name: String,
    node: String,
    hollow: bool,
}

/// What one request showed: its latency, or what went wrong.
async fn probe(client: &kube::Client, namespace: &str, target: &Target) -> Result<Duration, String> {
    let started = Instant::now();
    if target.hollow {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        pods.get(&target.name).await.map_err(|e| format!("GET pod {}: {e}", target.name))?;
        return Ok(started.elapsed());
    }
    let path = format!("/api/v1/namespaces/{namespace}/pods/{}:8080/proxy/soak", target.name);
    let request = http::Request::get(&path).body(Vec::new()).map_err(|e| e.to_string())?;
    let body = client.request_text(request).await.map_err(|e| format!("{path}: {e}"))?;
    // The echo server answers with its hostname (the pod's name, at most 63 characters).
    let hostname: String = target.name.chars().take(63).collect();
    if body.trim() != format!("{hostname} /soak") {
        return Err(format!("{path}: unexpected answer {body:?}"));
    }
    Ok(started.elapsed())
}

/// A pod of `image` (krate's echo server or one like it) pinned to `node`, labelled
/// `app.kubernetes.io/name=<app>`, Ready once its `/readyz` answers (checked every
/// `probe_period` seconds). Soak's and the doctor's probe pods.
pub(crate) fn echo_pod(namespace: &str, name: &str, node: &str, image: &str, app: &str, probe_period: i32) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": app}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "echo", "image": image, "imagePullPolicy": "IfNotPresent",
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": probe_period}}],
        },
    }))
    .expect("a pod")
}

pub(crate) fn pod_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub(crate) fn node_ready(node: &Node) -> bool {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Creates namespace `name` unless it exists.
pub(crate) async fn ensure_namespace(client: &kube::Client, name: &str) -> Result<(), kube::Error> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("a namespace");
    krate_client::tolerate(namespaces.create(&PostParams::default(), &namespace).await, &[409])
}

/// Creates the namespace and the pods, and waits until every pod is Ready.
async fn place(client: &kube::Client, args: &SoakArgs) -> Result<Vec<Target>> {
    ensure_namespace(client, &args.namespace)
        .await
        .with_context(|| format!("creating namespace {}", args.namespace))?;
    let nodes: Api<Node> = Api::all(client.clone());
    let mut targets = Vec::new();
    for node in nodes.list(&ListParams::default()).await.context("listing nodes")?.items {
        let name = node.metadata.name.clone().unwrap_or_default();
        if !node_ready(&node) {
            println!("skipping node {name}: not Ready");
            continue;
        }
        let hollow = crate::hollow::is_hollow(&node);
        for i in 0..args.pods_per_node {
            targets.push(Target { name: format!("soak-{name}-{i}"), node: name.clone(), hollow });
        }
    }
    if targets.is_empty() {
        bail!("no Ready node to put pods on; `kubectl get nodes` shows why");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &args.namespace);
    for t in &targets {
        let pod = echo_pod(&args.namespace, &t.name, &t.node, &args.image, "krate-soak", 5);
        krate_client::tolerate(pods.create(&PostParams::default(), &pod).await, &[409])
            .with_context(|| format!("creating pod {}", t.name))?;
    }
    let nodes = targets.iter().map(|t| &t.node).collect::<std::collections::BTreeSet<_>>().len();
    println!(
        "placed {} pods on {nodes} nodes in namespace {}; waiting for them to be Ready",
        targets.len(),
        args.namespace
    );
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let listed = pods.list(&ListParams::default().labels("app.kubernetes.io/name=krate-soak")).await?.items;
        let ready_count = listed.iter().filter(|p| pod_ready(p)).count();
        if ready_count >= targets.len() {
            println!("all {} pods Ready after {:.0?}", targets.len(), started.elapsed());
            return Ok(targets);
        }
        if started.elapsed() > Duration::from_secs(600) {
            let stuck = listed.iter().find(|p| !pod_ready(p)).map(|p| {
                let status = p.status.clone().unwrap_or_default();
                format!("{} is {}", p.metadata.name.clone().unwrap_or_default(), status.phase.unwrap_or_default())
            });
            bail!(
                "only {ready_count} of {} pods Ready after 10 minutes ({}); `kubectl describe pods -n {}` shows why",
                targets.len(),
                stuck.unwrap_or_default(),
                args.namespace
            );
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            println!("  {ready_count}/{} pods Ready", targets.len());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The API server's and each real node's agent's process figures.
async fn processes(client: &kube::Client, targets: &[Target]) -> (Option<Process>, BTreeMap<String, Process>) {
    let get = |path: String| {
        let client = client.clone();
        async move {
            let request = http::Request::get(&path).body(Vec::new()).ok()?;
            process_of(&client.request_text(request).await.ok()?)
        }
    };
    let server = get("/metrics".to_string()).await;
    let mut agents = BTreeMap::new();
    let nodes: std::collections::BTreeSet<&str> =
        targets.iter().filter(|t| !t.hollow).map(|t| t.node.as_str()).collect();
    for node in nodes {
        if let Some(p) = get(format!("/api/v1/nodes/{node}/proxy/metrics")).await {
            agents.insert(node.to_string(), p);
        }
    }
    (server, agents)
}

pub async fn run(args: SoakArgs) -> Result<()> {
    let kubeconfig = args.kubeconfig.clone().unwrap_or_else(|| args.data_dir.join("admin.kubeconfig"));
    let client = crate::components::kube_client(&kubeconfig)
        .await
        .with_context(|| format!("no client from {}; point --kubeconfig at the cluster's", kubeconfig.display()))?;
    let duration = args.duration.as_deref().map(|d| crate::agent::duration(d, "--duration")).transpose()?;
    let interval = crate::agent::duration(&args.interval, "--interval")?;
    let every = crate::agent::duration(&args.every, "--every")?;
    let targets = place(&client, &args).await?;
    let hollow = targets.iter().filter(|t| t.hollow).count();
    println!(
        "soaking {} pods ({} through the pod proxy, {hollow} on hollow nodes through GET), each every {every:?}, {}; a line every {:?}",
        targets.len(),
        targets.len() - hollow,
        duration.map(|d| format!("for {d:?}")).unwrap_or_else(|| "until interrupted".into()),
        interval
    );
    let requests = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let started = Instant::now();
    let deadline = duration.map(|d| started + d);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The load: every pod, round after round, `--concurrency` at a time.
    let load = {
        let (client, targets, ns) = (client.clone(), targets.clone(), args.namespace.clone());
        let (requests, errors, latencies, first_error, stop) =
            (requests.clone(), errors.clone(), latencies.clone(), first_error.clone(), stop.clone());
        let concurrency = args.concurrency.max(1);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let round_started = Instant::now();
                let round = futures::stream::iter(targets.iter().cloned())
                    .map(|t| {
                        let (client, ns) = (client.clone(), ns.clone());
                        async move { probe(&client, &ns, &t).await }
                    })
                    .buffer_unordered(concurrency);
                futures::pin_mut!(round);
                while let Some(result) = round.next().await {
                    requests.fetch_add(1, Ordering::Relaxed);
                    match result {
                        Ok(latency) => latencies.lock().expect("latencies").push(latency.as_secs_f64() * 1e3),
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            first_error.lock().expect("first error").get_or_insert(e);
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                tokio::time::sleep(every.saturating_sub(round_started.elapsed())).await;
            }
        })
    };
    let mut memory: Vec<(f64, f64)> = Vec::new();
    let mut previous_requests = 0;
    // Ctrl-C or a plain `kill` ends the run with its summary and verdict.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let interrupted = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    };
    futures::pin_mut!(interrupted);
    loop {
        let wait = match deadline {
            Some(d) => interval.min(d.saturating_duration_since(Instant::now())),
            None => interval,
        };
        let stopped = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = &mut interrupted => true,
        };
        let (server, agents) = processes(&client, &targets).await;
        let mut interval_latencies = std::mem::take(&mut *latencies.lock().expect("latencies"));
        interval_latencies.sort_by(f64::total_cmp);
        let total = requests.load(Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        let server_text = match server {
            Some(p) => {
                memory.push((elapsed, p.rss));
                format!("server rss {} fds {:.0}", mib(p.rss), p.fds)
            }
            None => "server metrics unavailable".to_string(),
        };
        let agents_text = if agents.is_empty() {
            String::new()
        } else {
            let rss = agents.values().map(|p| p.rss).fold(0.0, f64::max);
            let fds = agents.values().map(|p| p.fds).fold(0.0, f64::max);
            format!(" | agents (max of {}) rss {} fds {fds:.0}", agents.len(), mib(rss))
        };
        println!(
            "[{:>7.0}s] requests {total} (+{}) errors {} p50 {:.1}ms p99 {:.1}ms | {server_text}{agents_text}",
            elapsed,
            total - previous_requests,
            errors.load(Ordering::Relaxed),
            quantile(&interval_latencies, 0.5),
            quantile(&interval_latencies, 0.99),
        );
        previous_requests = total;
        if stopped || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let errors = errors.load(Ordering::Relaxed);
    let growth = match (memory.first(), memory.last()) {
        (Some(first), Some(last)) if first.1 > 0.0 => (last.1 - first.1) / first.1 * 100.0,
        _ => 0.0,
    };
    println!(
        "done after {:.0}s: {} requests, {errors} errors; API server memory slope {:+.2} MiB/hour, growth {growth:+.1}%",
        started.elapsed().as_secs_f64(),
        requests.load(Ordering::Relaxed),
        slope_mib_per_hour(&memory)
    );
    if let Some(e) = first_error.lock().expect("first error").as_ref() {
        println!("first error: {e}");
    }
    if !args.keep {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        if let Err(e) = namespaces.delete(&args.namespace, &DeleteParams::default()).await {
            println!("warning: deleting namespace {}: {e}", args.namespace);
        }
    }
    verdict(errors, growth, args.max_memory_growth).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_figures_come_from_metrics() {
        let text = "# HELP x\nprocess_resident_memory_bytes 1.048576e+08\nprocess_open_fds 42\n";
        assert_eq!(process_of(text), Some(Process { rss: 104857600.0, fds: 42.0 }));
        assert_eq!(process_of("nothing 1\n"), None);
    }

    #[test]
    fn quantiles_and_slopes() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((quantile(&sorted, 0.5), quantile(&sorted, 0.99)), (50.0, 99.0));
        assert_eq!(quantile(&[], 0.5), 0.0);
        let mib = 1024.0 * 1024.0;
        let growing = [(0.0, 100.0 * mib), (1800.0, 101.0 * mib), (3600.0, 102.0 * mib)];
        assert!((slope_mib_per_hour(&growing) - 2.0).abs() < 1e-9);
        assert_eq!(slope_mib_per_hour(&[(0.0, mib)]), 0.0);
    }

    #[test]
    fn errors_or_memory_growth_fail_the_run() {
        assert_eq!(verdict(0, 10.0, 50.0), Ok(()));
        assert_eq!(verdict(3, 0.0, 50.0).unwrap_err(), "3 requests failed");
        assert!(verdict(0, 60.0, 50.0).unwrap_err().contains("grew 60.0%"));
    }
}

//! Controllers are event-driven: (1) a replica deleted while the system is idle is
//! replaced quickly, and (2) idle CPU with 1,000 objects stays near zero.
//!
//! (1) Deletes one pod of an idle Deployment at a time and times deletion to the
//! replacement's Running status (observed through a watch). Reference, in the same run:
//! creating a bare pod to its Running status (API + scheduler + hollow node, no
//! controller), so the ratio is what the ReplicaSet controller adds.
//! (2) Measures the server's CPU time over a quiet window with no workload (reference),
//! then again with 1,000 objects (a 200-replica Deployment, its pods and ReplicaSet,
//! 10 Services with Endpoints and EndpointSlices, ConfigMaps) on 5 hollow nodes.
//!
//! `cargo bench -p krate --bench controllers`

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BenchServer, Killed};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

const ROUNDS: usize = 20;
const QUIET: Duration = Duration::from_secs(20);

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The share of one core `pid` used over `window`.
async fn cpu_share(pid: u32, window: Duration) -> f64 {
    let before = cpu_seconds(pid);
    tokio::time::sleep(window).await;
    (cpu_seconds(pid) - before) / window.as_secs_f64()
}

fn is_running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none() && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Waits on `stream` until a pod other than `except` runs; returns when it was seen.
async fn next_running(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin),
    except: &str,
) -> Instant {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.try_next())
            .await
            .expect("a pod starts running")
            .unwrap()
            .unwrap();
        if let WatchEvent::Added(p) | WatchEvent::Modified(p) = event {
            if is_running(&p) && p.metadata.name.as_deref() != Some(except) {
                return Instant::now();
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let server = BenchServer::start(&["--disable-agent"]).await;
    let (client, kubeconfig) = (server.client.clone(), server.kubeconfig.clone());
    let pid = server.pid();
    println!(
        "krate controllers benchmark: {} cores",
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1)
    );

    // (2) reference: the server idle with nothing in it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let empty = cpu_share(pid, QUIET).await;

    let _nodes = Killed(
        Command::new(env!("CARGO_BIN_EXE_krate"))
            .args(["hollow-nodes", "--count", "5", "--kubeconfig", kubeconfig.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start hollow nodes"),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let kubectl = |stdin: String| {
        let mut child = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
            .args(["--kubeconfig", kubeconfig.to_str().unwrap(), "apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("kubectl");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), stdin.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
    };
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": 200, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 80}]}]}}}});
    kubectl(deployment.to_string());
    for i in 0..10 {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("web-{i}"), "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
        kubectl(svc.to_string());
    }
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..760 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}, "data": {"k": "v"}})).unwrap();
        maps.create(&PostParams::default(), &cm).await.unwrap();
    }
    loop {
        let running = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .iter()
            .filter(|p| is_running(p))
            .count();
        if running == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let loaded = cpu_share(pid, QUIET).await;

    // (1) reference: a bare pod from create to Running.
    let rv = pods.list(&ListParams::default().limit(1)).await.unwrap().metadata.resource_version.unwrap();
    let mut stream = pods.watch(&WatchParams::default().labels("bench=bare").timeout(290), &rv).await.unwrap().boxed();
    let mut bare = Vec::new();
    for i in 0..ROUNDS {
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": format!("bare-{i}"), "labels": {"bench": "bare"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}})).unwrap();
        let start = Instant::now();
        pods.create(&PostParams::default(), &p).await.unwrap();
        bare.push(next_running(&mut stream, "").await - start);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // (1) a replica deleted while idle, to its replacement Running.
    let rv = pods.list(&ListParams::default().limit(1)).await.unwrap().metadata.resource_version.unwrap();
    let mut stream = pods.watch(&WatchParams::default().labels("app=web").timeout(290), &rv).await.unwrap().boxed();
    let mut replaced = Vec::new();
    for _ in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let victim = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .into_iter()
            .find(is_running)
            .unwrap();
        let name = victim.metadata.name.clone().unwrap();
        let start = Instant::now();
        pods.delete(&name, &DeleteParams::default()).await.unwrap();
        replaced.push(next_running(&mut stream, &name).await - start);
    }
    bare.sort();
    replaced.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    println!("{:<48} {:>9} {:>9}", "", "p50", "max");
    println!(
        "{:<48} {:>7.1}ms {:>7.1}ms",
        "bare pod create -> Running (ref)",
        ms(pct(&bare, 0.5)),
        ms(*bare.last().unwrap())
    );
    println!(
        "{:<48} {:>7.1}ms {:>7.1}ms",
        "replica deleted -> replacement Running",
        ms(pct(&replaced, 0.5)),
        ms(*replaced.last().unwrap())
    );
    println!(
        "replacement vs bare pod start (p50): {:.2}x",
        pct(&replaced, 0.5).as_secs_f64() / pct(&bare, 0.5).as_secs_f64()
    );
    println!();
    println!("server CPU, idle, empty (ref):              {:.2}% of one core", empty * 100.0);
    println!(
        "server CPU, idle, 1,000 objects + 5 nodes:  {:.2}% of one core ({:.2}x the empty server)",
        loaded * 100.0,
        loaded / empty.max(1e-4)
    );
}

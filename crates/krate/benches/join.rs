//! Join benchmark: from `krate agent --server URL --token T --ca-cert-hash H` starting to
//! its Node Ready, N times (default 10, each a fresh agent directory and Node name), p50
//! and max. The reference, measured in the same run against the same release server, is
//! the same agent started with a ready-made node kubeconfig (`krate kubeconfig --node`):
//! the ratio is what discovery, the CSR round trip (approval and signing) and the pod
//! CIDR assignment add to an agent's start.
//!
//! `cargo bench -p krate --bench join` (root; containerd, runc and the CNI plugins:
//! ./scripts/install-deps). KRATE_BENCH_JOINS.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BenchServer, Killed};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Starts an agent with `how` (join flags or a kubeconfig) and times it to its Node
/// Ready; the agent is stopped, reset and its Node deleted afterwards.
async fn time_to_ready(server: &BenchServer, dir: &Path, name: &str, how: &[String]) -> Duration {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("resolv.conf"), "nameserver 127.0.0.53\n").unwrap();
    let nodes: Api<Node> = Api::all(server.client.clone());
    let started = Instant::now();
    let agent = Killed(
        Command::new(env!("CARGO_BIN_EXE_krate"))
            .arg("agent")
            .args(how)
            .args(["--node-name", name, "--dir", data.join("agent").to_str().unwrap(), "--bridge", "kbjoin0"])
            .args(["--kubelet-port", "19251", "--resolv-conf", data.join("resolv.conf").to_str().unwrap()])
            .args(["--eviction-hard", "memory.available<100Mi"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start krate agent"),
    );
    loop {
        if nodes.get_opt(name).await.ok().flatten().is_some_and(|n| ready(&n)) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{name} did not become Ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    drop(agent);
    let reset =
        Command::new(env!("CARGO_BIN_EXE_krate")).args(["reset", "--data-dir", data.to_str().unwrap()]).output();
    assert!(reset.is_ok_and(|o| o.status.success()), "krate reset of {name}");
    nodes.delete(name, &Default::default()).await.expect("delete the node");
    took
}

fn summary(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    let joins: usize = std::env::var("KRATE_BENCH_JOINS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let server = BenchServer::start(&["--disable-agent", "--cluster-cidr", "10.247.0.0/16"]).await;
        let token = Command::new(env!("CARGO_BIN_EXE_krate"))
            .args(["token", "create", "--print-join-command", "--kubeconfig", server.kubeconfig.to_str().unwrap()])
            .output()
            .unwrap();
        let command = String::from_utf8_lossy(&token.stdout).into_owned();
        let join: Vec<String> = command.split_whitespace().skip(2).map(String::from).collect();
        assert!(join.iter().any(|a| a == "--token"), "a join command: {command}");
        // The bootstrap signer must have signed cluster-info for the new token.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let dir = tempfile::tempdir().unwrap();
        let (mut joined, mut reference) = (Vec::new(), Vec::new());
        for i in 0..joins {
            // Alternating, so that a machine getting slower weighs on both alike.
            joined.push(time_to_ready(&server, dir.path(), &format!("join-{i}"), &join).await);
            let name = format!("ref-{i}");
            let kubeconfig = dir.path().join(format!("{name}.kubeconfig"));
            let out = Command::new(env!("CARGO_BIN_EXE_krate"))
                .args(["kubeconfig", "--data-dir", server.data.to_str().unwrap(), "--node", &name])
                .output()
                .unwrap();
            std::fs::write(&kubeconfig, &out.stdout).unwrap();
            let how = vec!["--kubeconfig".to_string(), kubeconfig.display().to_string()];
            reference.push(time_to_ready(&server, dir.path(), &name, &how).await);
        }
        let (jp50, jmax) = summary(joined);
        let (rp50, rmax) = summary(reference);
        println!(
            "join (token to Ready), {joins} joins: p50 {:.0} ms, max {:.0} ms",
            jp50.as_secs_f64() * 1e3,
            jmax.as_secs_f64() * 1e3
        );
        println!(
            "reference (node kubeconfig to Ready): p50 {:.0} ms, max {:.0} ms",
            rp50.as_secs_f64() * 1e3,
            rmax.as_secs_f64() * 1e3
        );
        println!("ratio (p50): {:.2}x", jp50.as_secs_f64() / rp50.as_secs_f64());
    });
}

//! Pod network benchmark: throughput (iperf3, TCP) and request rate (wrk against the
//! test server) from a pod on another node to a server pod, over host-gw and over
//! VXLAN, against the same measurement from a pod on the server's own node, in the same
//! run and the same cluster. Each cluster is a `krate dev cluster` of two nodes (network
//! namespaces on one bridge), so "another node" costs what a real one does in the
//! kernel: a veth, routing (and the tunnel), the bridge, routing, a veth.
//!
//! `cargo bench -p krate --bench podnet` (root; ./scripts/install-deps, and
//! `apt-get install -y iperf3 wrk`). KRATE_BENCH_ROUNDS (default 3; medians are printed).
//! The clients run inside the pods' network namespaces (containerd's, under /run/netns).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn krate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_krate")).args(args).output().expect("run krate")
}

/// A two-node dev cluster, taken down on drop.
struct Cluster {
    name: String,
    dir: PathBuf,
}

impl Cluster {
    fn up(name: &str, backend: &str, octet: u8, images: &Path) -> Cluster {
        let dir = std::env::temp_dir().join(format!("krate-bench-{name}"));
        let (subnet, pods) = (format!("172.30.{octet}.0/24"), format!("10.{octet}.0.0/16"));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
        let airgap = format!("--agent-arg=--airgap-images={}", images.display());
        let eviction = "--agent-arg=--eviction-hard=memory.available<100Mi".to_string();
        let args = [
            "dev",
            "cluster",
            "up",
            "--name",
            name,
            "--nodes",
            "2",
            "--dir",
            dir.to_str().unwrap(),
            "--subnet",
            &subnet,
            "--port",
            &port,
            "--cluster-cidr",
            &pods,
            "--pod-network",
            backend,
            &airgap,
            &eviction,
        ];
        let out = krate(&args);
        assert!(out.status.success(), "krate dev cluster up: {}", String::from_utf8_lossy(&out.stderr));
        Cluster { name: name.into(), dir }
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        use std::io::Write;
        let mut child = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
            .args(args)
            .env("KUBECONFIG", self.dir.join("server/admin.kubeconfig"))
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A test-server pod on `node`; its IP once it runs.
    fn pod(&self, name: &str, node: &str) -> String {
        let manifest = format!(
            r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{name}"}}, "spec": {{"nodeName": "{node}",
                "containers": [{{"name": "web", "image": "krate.local/test-server:1"}}]}}}}"#
        );
        self.kubectl(&["apply", "-f", "-"], Some(&manifest));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ip = self.kubectl(&["get", "pod", name, "-o", "jsonpath={.status.podIP}"], None);
            let phase = self.kubectl(&["get", "pod", name, "-o", "jsonpath={.status.phase}"], None);
            if phase == "Running" && !ip.is_empty() {
                return ip;
            }
            assert!(Instant::now() < deadline, "pod {name} did not run");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let out = krate(&["dev", "cluster", "down", "--name", &self.name, "--dir", self.dir.to_str().unwrap()]);
        if !out.status.success() {
            eprintln!("krate dev cluster down: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// The network namespace (under /run/netns) holding `ip`: a pod's, made by containerd.
fn netns_of(ip: &str) -> String {
    let list =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned();
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let addrs = Command::new("ip").args(["-n", ns, "-o", "addr"]).output().unwrap();
        if String::from_utf8_lossy(&addrs.stdout).contains(&format!(" {ip}/")) {
            return ns.to_string();
        }
    }
    panic!("no network namespace holds {ip}")
}

fn in_netns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// iperf3 from the pod in `client_ns` to `server`: Gbit/s received.
fn iperf(client_ns: &str, server_ns: &str, server: &str) -> f64 {
    let _server = Stopped(
        in_netns(server_ns, "iperf3").args(["-s", "-1", "-p", "5201"]).stdout(Stdio::null()).spawn().expect("iperf3"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let out = in_netns(client_ns, "iperf3").args(["-c", server, "-p", "5201", "-t", "5", "-J"]).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J output");
    let bits = report["end"]["sum_received"]["bits_per_second"].as_f64();
    bits.unwrap_or_else(|| panic!("iperf3 measured nothing: {report}")) / 1e9
}

/// wrk from the pod in `client_ns` against the test server: requests/s (non-2xx fail it).
fn wrk(client_ns: &str, server: &str) -> f64 {
    let url = format!("http://{server}:8080/client");
    let out = in_netns(client_ns, "wrk").args(["-t1", "-c16", "-d5s", &url]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("Non-2xx") && !text.contains("Socket errors"), "wrk saw errors:\n{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk's output:\n{text}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    for tool in ["iperf3", "wrk"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("{tool} is missing: apt-get install -y iperf3 wrk");
            std::process::exit(2);
        }
    }
    let rounds: usize = std::env::var("KRATE_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let images = tempfile::tempdir().unwrap();
    krate_agent::testimages::write_archives(images.path()).unwrap();
    println!("pod network: a pod on the other node vs a pod on the server's node, medians of {rounds} rounds");
    println!(
        "{:<8} {:>14} {:>14} {:>7} {:>12} {:>12} {:>7}",
        "backend", "same Gbit/s", "cross Gbit/s", "ratio", "same req/s", "cross req/s", "ratio"
    );
    for (backend, octet) in [("host-gw", 201u8), ("vxlan", 202u8)] {
        let name = if backend == "vxlan" { "bvx" } else { "bgw" };
        let cluster = Cluster::up(name, backend, octet, images.path());
        let server = cluster.pod("server", "node-1");
        let near = cluster.pod("near", "node-1");
        let far = cluster.pod("far", "node-2");
        let (server_ns, near_ns, far_ns) = (netns_of(&server), netns_of(&near), netns_of(&far));
        let (mut same_bw, mut cross_bw, mut same_rq, mut cross_rq) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            same_bw.push(iperf(&near_ns, &server_ns, &server));
            cross_bw.push(iperf(&far_ns, &server_ns, &server));
            same_rq.push(wrk(&near_ns, &server));
            cross_rq.push(wrk(&far_ns, &server));
        }
        let (sb, cb, sr, cr) = (median(same_bw), median(cross_bw), median(same_rq), median(cross_rq));
        println!("{backend:<8} {sb:>14.2} {cb:>14.2} {:>6.2}x {sr:>12.0} {cr:>12.0} {:>6.2}x", cb / sb, cr / sr);
        drop(cluster);
    }
}

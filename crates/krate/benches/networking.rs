//! Networking benchmarks, each against a reference measured in the same run:
//! 1. Service rules: programming 1,000 and 10,000 Services (two endpoints each) with the
//!    proxy's full sync against loading the same ruleset with `nft -f` (the floor), and
//!    one endpoint change at a time: the transaction alone (its floor), and end to end,
//!    from the EndpointSlice written to the API to the rule in the kernel (a real API
//!    server, the proxy in this process).
//! 2. Throughput: HTTP requests/s from one pod to another (network namespaces on a
//!    bridge; krate's test server, a connection per request) through the server's
//!    ClusterIP against its pod IP directly (`wrk`, Debian's, in the client pods).
//! 3. DNS: queries/s and latency for Service names with `dnsperf` (Debian's) against
//!    krate's responder and against `unbound` answering the same names from local-data.
//!
//! Needs root, nftables, wrk, dnsperf and unbound (`apt-get install -y wrk dnsperf unbound`).
//! Everything it creates (table, namespace, bridge, servers) goes when it ends.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use krate_net::proxy::nft;
use krate_net::proxy::rules::{self, Endpoint, NodeContext, ServicePort, Share};
use krate_net::Cidr;

mod common;

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn service(i: u32, endpoints: [Ipv4Addr; 2]) -> ServicePort {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1);
    let endpoints = endpoints
        .iter()
        .map(|ip| Endpoint { ip: *ip, port: 8080, ready: true, serving: true, terminating: false, local: true })
        .collect();
    ServicePort::cluster_ip("bench", &format!("svc-{i}"), ip, 80, endpoints)
}

fn endpoint_ip(i: u32, j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 4 + j)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn rules_phase(n: u32, rt: &tokio::runtime::Runtime) -> (f64, f64, f64) {
    let table = format!("krate-bench-{}", std::process::id());
    let base = nft::Base {
        table: table.clone(),
        bridge: "kbench0".into(),
        node_ips: vec![Ipv4Addr::new(192, 0, 2, 10)],
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
    };
    let node = NodeContext { pod_cidr: "10.128.0.0/12".parse::<Cidr>().unwrap() };
    let services: Vec<ServicePort> = (0..n).map(|i| service(i, [endpoint_ip(i, 1), endpoint_ip(i, 2)])).collect();
    let mut wanted = Share::default();
    for sp in &services {
        wanted.merge(rules::share_of(sp, &node));
    }
    // The floor: the same ruleset, as one file, loaded by nft into an empty table.
    quiet(&["nft", "delete", "table", "ip", &table]);
    let mut tx = nft::Tx::new(&table);
    tx.base(&base);
    tx.full(&wanted, &nft::Existing::default());
    let file = std::env::temp_dir().join(format!("krate-bench-rules-{}.nft", std::process::id()));
    std::fs::write(&file, tx.text()).unwrap();
    let started = Instant::now();
    sh(&["nft", "-f", file.to_str().unwrap()]);
    let floor = started.elapsed().as_secs_f64();
    quiet(&["nft", "delete", "table", "ip", &table]);
    let _ = std::fs::remove_file(&file);
    // The proxy's full sync into an empty table (it reads the table first).
    let started = Instant::now();
    rt.block_on(krate_net::proxy::apply_pass(&table, &base, true, &Share::default(), &wanted)).unwrap();
    let full = started.elapsed().as_secs_f64();
    // One endpoint change at a time (a Service's second endpoint moves), measured, and
    // back, unmeasured.
    let mut latencies = Vec::new();
    for k in 0..100u32 {
        let i = (k * 7919) % n;
        let before = rules::share_of(&services[i as usize], &node);
        let after = rules::share_of(&service(i, [endpoint_ip(i, 1), endpoint_ip(i, 3)]), &node);
        let started = Instant::now();
        rt.block_on(krate_net::proxy::apply_pass(&table, &base, false, &before, &after)).unwrap();
        latencies.push(started.elapsed().as_secs_f64());
        rt.block_on(krate_net::proxy::apply_pass(&table, &base, false, &after, &before)).unwrap();
    }
    quiet(&["nft", "delete", "table", "ip", &table]);
    latencies.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    println!(
        "{n:>6} services: full sync {:>8.1} ms, nft -f of the same ruleset {:>8.1} ms ({:.2}x); one endpoint change p50 {:.1} ms, p99 {:.1} ms",
        full * 1e3,
        floor * 1e3,
        full / floor,
        p50 * 1e3,
        p99 * 1e3
    );
    (full / floor, p50, p99)
}

/// A network namespace with krate's test server, and two client namespaces, on a bridge
/// of the benchmark's own.
struct Endpointed {
    ns: String,
    clients: [String; 2],
    bridge: String,
    server: Child,
}

/// A namespace on `bridge` at 10.77.0.`last`.
fn pod_namespace(ns: &str, bridge: &str, last: u8) {
    let (host, inner) = (format!("{ns}h"), format!("{ns}p"));
    quiet(&["ip", "netns", "del", ns]);
    sh(&["ip", "netns", "add", ns]);
    sh(&["ip", "link", "add", &host, "type", "veth", "peer", "name", &inner]);
    sh(&["ip", "link", "set", &host, "master", bridge]);
    sh(&["ip", "link", "set", &host, "up"]);
    sh(&["ip", "link", "set", &inner, "netns", ns]);
    sh(&["ip", "-n", ns, "addr", "add", &format!("10.77.0.{last}/24"), "dev", &inner]);
    sh(&["ip", "-n", ns, "link", "set", &inner, "up"]);
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", ns, "route", "add", "default", "via", "10.77.0.1"]);
}

impl Endpointed {
    fn start() -> Self {
        let id = std::process::id() % 10000;
        let (ns, bridge) = (format!("kbn{id}"), format!("kbn{id}br"));
        quiet(&["ip", "link", "del", &bridge]);
        sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
        sh(&["ip", "addr", "add", "10.77.0.1/24", "dev", &bridge]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        pod_namespace(&ns, &bridge, 2);
        // A client per mode: their connections never meet at the server.
        let clients = [format!("kbn{id}a"), format!("kbn{id}b")];
        pod_namespace(&clients[0], &bridge, 3);
        pod_namespace(&clients[1], &bridge, 4);
        let program = std::env::temp_dir().join(format!("krate-bench-test-server-{id}"));
        std::fs::write(&program, krate_agent::testimages::test_server_program()).unwrap();
        std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let server = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&program)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect("10.77.0.2:8080").is_err() {
            assert!(Instant::now() < deadline, "the test server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Endpointed { ns, clients, bridge, server }
    }
}

impl Drop for Endpointed {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        quiet(&["ip", "netns", "del", &self.ns]);
        for c in &self.clients {
            quiet(&["ip", "netns", "del", c]);
        }
        quiet(&["ip", "link", "del", &self.bridge]);
    }
}

/// Requests/s from `client`; `fresh`: a new connection per request.
fn wrk(client: &str, url: &str, fresh: bool) -> f64 {
    let mut args = vec!["ip", "netns", "exec", client, "wrk", "-t2", "-c32", "-d5s"];
    if fresh {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out = sh(&args);
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk printed no rate:\n{out}"))
}

fn throughput_phase(rt: &tokio::runtime::Runtime) -> f64 {
    let lab = Endpointed::start();
    let table = format!("krate-bench-{}", std::process::id());
    let base = nft::Base {
        table: table.clone(),
        bridge: lab.bridge.clone(),
        node_ips: vec![],
        service_cidrs: vec!["10.97.0.0/24".parse().unwrap()],
    };
    let node = NodeContext { pod_cidr: "10.77.0.0/24".parse().unwrap() };
    let mut sp = service(0, [Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 2)]);
    sp.endpoints.truncate(1);
    sp.cluster_ip = Some(Ipv4Addr::new(10, 97, 0, 10));
    rt.block_on(krate_net::proxy::apply_pass(&table, &base, true, &Share::default(), &rules::share_of(&sp, &node)))
        .unwrap();
    // Kept-alive connections (DNAT costs nothing once a connection is set up), then a
    // connection per request (every request pays for the translation being set up);
    // the two modes alternate so that drift hits both.
    let mut ratios = Vec::new();
    for (fresh, what) in [(false, "kept-alive connections"), (true, "a connection per request")] {
        for round in 0..5 {
            let direct = wrk(&lab.clients[0], "http://10.77.0.2:8080/", fresh);
            let via = wrk(&lab.clients[1], "http://10.97.0.10:80/", fresh);
            println!(
                "requests/s, {what}, round {round}: pod IP directly {direct:>9.0}, through the ClusterIP {via:>9.0} ({:.3}x)",
                via / direct
            );
            ratios.push((fresh, via / direct));
        }
    }
    quiet(&["nft", "delete", "table", "ip", &table]);
    let median = |f: bool| {
        let mut r: Vec<f64> = ratios.iter().filter(|(fresh, _)| *fresh == f).map(|(_, r)| *r).collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    println!(
        "through a ClusterIP vs directly (median of 5): {:.3}x kept alive, {:.3}x a connection per request",
        median(false),
        median(true)
    );
    median(false)
}

struct Dnsperf {
    qps: f64,
    average_ms: f64,
    p99_ms: f64,
}

fn dnsperf(port: u16, queries: &std::path::Path) -> Dnsperf {
    let out = Command::new("dnsperf")
        .args([
            "-s",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-d",
            queries.to_str().unwrap(),
            "-l",
            "8",
            "-c",
            "8",
            "-q",
            "200",
            "-v",
        ])
        .output()
        .expect("run dnsperf (apt-get install -y dnsperf)");
    let text = String::from_utf8_lossy(&out.stdout);
    let qps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!("dnsperf printed no rate:\n{}", text.lines().rev().take(30).collect::<Vec<_>>().join("\n"))
        });
    let lost = text.lines().find(|l| l.trim().starts_with("Queries lost:")).unwrap_or_default().to_string();
    let answered: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    let rcodes_ok = text.lines().filter(|l| l.starts_with("> NOERROR")).count();
    assert!(
        rcodes_ok * 100 >= answered.len() * 99,
        "answers were not NOERROR: {rcodes_ok} of {}; {lost}",
        answered.len()
    );
    let mut sorted = answered.clone();
    sorted.sort_by(f64::total_cmp);
    let average_ms = sorted.iter().sum::<f64>() / sorted.len().max(1) as f64 * 1e3;
    Dnsperf { qps, average_ms, p99_ms: percentile(&sorted, 0.99) * 1e3 }
}

fn dns_phase(rt: &tokio::runtime::Runtime) -> f64 {
    const N: u32 = 1000;
    let port = common::free_port();
    let catalog = krate_net::catalog::Catalog::default();
    let services: Vec<k8s_openapi::api::core::v1::Service> = (0..N)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 98, 0, 0)) + i + 1).to_string();
            serde_json::from_value(serde_json::json!({"metadata": {"name": format!("web-{i}"), "namespace": "default"},
                "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"port": 80}]}}))
            .unwrap()
        })
        .collect();
    catalog.set(services, vec![]);
    let config = krate_net::dns::DnsConfig {
        zone: "cluster.local".into(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        upstreams: vec![],
        ttl: 5,
    };
    let serving = {
        let catalog = catalog.clone();
        rt.spawn(async move { krate_net::dns::run(&catalog, config).await })
    };
    let dir = tempfile::tempdir().unwrap();
    let queries = dir.path().join("queries");
    let names: Vec<String> = (0..N).map(|i| format!("web-{i}.default.svc.cluster.local")).collect();
    std::fs::write(&queries, names.iter().map(|n| format!("{n} A\n")).collect::<String>()).unwrap();
    // unbound, answering the same names from local-data.
    let unbound_port = common::free_port();
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@{unbound_port}\n  port: {unbound_port}\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  num-threads: 2\n  access-control: 127.0.0.0/8 allow\n  do-ip6: no\n  local-zone: \"cluster.local.\" static\n"
    );
    for i in 0..N {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 98, 0, 0)) + i + 1);
        conf.push_str(&format!("  local-data: \"web-{i}.default.svc.cluster.local. 5 IN A {ip}\"\n"));
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    let conf_path = dir.path().join("unbound.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let unbound = Command::new("unbound")
        .args(["-d", "-c", conf_path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run unbound (apt-get install -y unbound)");
    let unbound = common::Killed(unbound);
    std::thread::sleep(Duration::from_secs(2));
    let mut best = 0.0f64;
    for round in 0..2 {
        let reference = dnsperf(unbound_port, &queries);
        let ours = dnsperf(port, &queries);
        println!(
            "DNS, round {round}: unbound {:>8.0} queries/s (average {:.3} ms, p99 {:.3} ms), krate {:>8.0} queries/s (average {:.3} ms, p99 {:.3} ms): {:.2}x",
            reference.qps, reference.average_ms, reference.p99_ms, ours.qps, ours.average_ms, ours.p99_ms, ours.qps / reference.qps
        );
        best = best.max(ours.qps / reference.qps);
    }
    drop(unbound);
    serving.abort();
    best
}

/// End to end: EndpointSlice changes written to a real API server, until the proxy
/// (following it as an agent would) has them in the kernel. (p50, p99) in seconds.
fn programming_phase(n: u32, rt: &tokio::runtime::Runtime) -> (f64, f64) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::{Namespace, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    rt.block_on(async {
        let server = common::BenchServer::start(&["--disable-agent", "--service-cidr", "10.96.0.0/12"]).await;
        let client = server.client.clone();
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "bench"}})).unwrap();
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
        let services: Api<Service> = Api::namespaced(client.clone(), "bench");
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "bench");
        let slice = |i: u32, second: Ipv4Addr| -> EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("svc-{i}-x"), "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                "addressType": "IPv4", "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [endpoint_ip(i, 1).to_string()]}, {"addresses": [second.to_string()]}]}))
            .unwrap()
        };
        futures::stream::iter(0..n)
            .map(|i| {
                let (services, slices) = (services.clone(), slices.clone());
                async move {
                    let svc: Service = serde_json::from_value(serde_json::json!({"metadata": {"name": format!("svc-{i}")},
                        "spec": {"ports": [{"port": 80, "targetPort": 8080}]}}))
                    .unwrap();
                    services.create(&PostParams::default(), &svc).await.unwrap();
                    slices.create(&PostParams::default(), &slice(i, endpoint_ip(i, 2))).await.unwrap();
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await;
        let (applied, mut told) = tokio::sync::broadcast::channel(1024);
        let table = format!("krate-bench-e2e-{}", std::process::id());
        let config = krate_net::proxy::ProxyConfig {
            table: table.clone(),
            bridge: "kbench1".into(),
            node_name: "bench".into(),
            node_ips: vec![],
            pod_cidr: "10.128.0.0/12".parse().unwrap(),
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            local_dns: None,
            applied: Some(applied),
        };
        let catalog = krate_net::catalog::Catalog::default();
        let watching = {
            let (catalog, client) = (catalog.clone(), client.clone());
            tokio::spawn(async move { catalog.run(client).await })
        };
        let proxying = {
            let catalog = catalog.clone();
            tokio::spawn(async move { krate_net::proxy::run(&catalog, config).await })
        };
        let started = Instant::now();
        loop {
            let keys = told.recv().await.unwrap();
            if keys.len() as u32 >= n {
                break;
            }
        }
        println!("{n:>6} services: first full sync through the API {:.1} s", started.elapsed().as_secs_f64());
        // A Service's second endpoint moves (measured), then back (not measured).
        let mut latencies = Vec::new();
        for k in 0..100u32 {
            let i = (k * 7919) % n;
            let key = ("bench".to_string(), format!("svc-{i}"));
            for (second, measured) in [(endpoint_ip(i, 3), true), (endpoint_ip(i, 2), false)] {
                let patch = serde_json::json!({"endpoints": [{"addresses": [endpoint_ip(i, 1).to_string()]}, {"addresses": [second.to_string()]}]});
                let t0 = Instant::now();
                slices.patch(&format!("svc-{i}-x"), &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
                while !told.recv().await.unwrap().contains(&key) {}
                if measured {
                    latencies.push(t0.elapsed().as_secs_f64());
                }
            }
        }
        proxying.abort();
        watching.abort();
        quiet(&["nft", "delete", "table", "ip", &table]);
        drop(server);
        latencies.sort_by(f64::total_cmp);
        (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
    })
}

fn main() {
    let only = std::env::var("KRATE_BENCH_ONLY").unwrap_or_default();
    let rt = runtime();
    println!("krate networking benchmark, 2 cores");
    if only.is_empty() || only == "rules" {
        for n in [1_000, 10_000] {
            let (full_ratio, floor_p50, floor_p99) = rules_phase(n, &rt);
            let (p50, p99) = programming_phase(n, &rt);
            println!(
                "{n:>6} services: full sync vs nft -f {full_ratio:.2}x; EndpointSlice change -> rule in the kernel p50 {:.1} ms, p99 {:.1} ms, against its transaction alone p50 {:.1} ms, p99 {:.1} ms ({:.2}x at p50)",
                p50 * 1e3,
                p99 * 1e3,
                floor_p50 * 1e3,
                floor_p99 * 1e3,
                p50 / floor_p50
            );
        }
    }
    if only.is_empty() || only == "throughput" {
        throughput_phase(&rt);
    }
    if only.is_empty() || only == "dns" {
        let ratio = dns_phase(&rt);
        println!("DNS queries/s, krate vs unbound: {ratio:.2}x (best round)");
    }
}

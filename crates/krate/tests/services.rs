//! Services and cluster DNS with real containers: `krate server` with its node agent,
//! whose proxy programs nftables and whose DNS responder answers the pods; clients are
//! pods (busybox's nc and nslookup, kubectl for an in-cluster client-go program) and,
//! for node ports, a network namespace of the test's own outside the node. Each test
//! has its own server, bridge, pod and service ranges and nftables table, reset on drop.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::node::{running_pods, server_with_agent, wait_node_ready};
use common::registry::TestRegistry;
use common::{eventually, TestServer};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, PostParams};
use serde_json::json;

fn kubectl_exec(server: &TestServer, pod: &str, command: &[&str]) -> Output {
    let mut args = vec!["exec", pod, "--"];
    args.extend(command);
    server.kubectl(&args)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A busybox pod that sleeps, to run clients in.
async fn client_pod(
    server: &TestServer,
    client: &kube::Client,
    registry: &TestRegistry,
    name: &str,
    extra: serde_json::Value,
) {
    let mut spec = json!({"containers": [{"name": "c", "image": registry.image("busybox"), "command": ["sleep", "3600"]}],
        "terminationGracePeriodSeconds": 0});
    if let Some(map) = extra.as_object() {
        for (k, v) in map {
            spec[k] = v.clone();
        }
    }
    let pod: Pod =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"role": name}}, "spec": spec})).unwrap();
    Api::<Pod>::namespaced(client.clone(), "default").create(&PostParams::default(), &pod).await.unwrap();
    running_pods(&Api::namespaced(client.clone(), "default"), &format!("role={name}"), 1).await;
    let _ = server;
}

/// The body of an HTTP/1.0 answer, or what went wrong instead.
fn body_of(out: &Output) -> Result<String, String> {
    let text = stdout(out);
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr))),
    }
}

/// What a GET of `path` from `host[:port]` gets in pod `from` (with busybox's nc, which
/// can give up after a timeout: Debian's busybox 1.35 crashes on `wget -T`): the body,
/// or the complaint.
fn get(server: &TestServer, from: &str, host: &str, path: &str) -> Result<String, String> {
    let (host, port) = host.split_once(':').unwrap_or((host, "80"));
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    body_of(&server.kubectl_stdin(&["exec", "-i", from, "--", "nc", "-w", "3", host, port], Some(&request)))
}

fn cluster_ip(server: &TestServer, service: &str) -> String {
    server.kubectl_ok(&["get", "service", service, "-o", "jsonpath={.spec.clusterIP}"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_behind_a_service_is_reached_by_name_and_spreads_over_its_pods() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 21, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    server.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        &format!("--image={}", registry.image("test-server")),
        "--replicas=3",
    ]);
    server.kubectl_ok(&["expose", "deployment", "web", "--port", "80", "--target-port", "8080"]);
    let pods = running_pods(&Api::namespaced(client.clone(), "default"), "app=web", 3).await;
    let names: BTreeSet<String> = pods.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
    client_pod(&server, &client, &registry, "client", json!({})).await;
    let ip = cluster_ip(&server, "web");
    let table = server.kubectl_ok(&["get", "service", "web"]);
    assert!(table.contains(&ip) && table.contains("80/TCP"), "kubectl get svc shows the ClusterIP: {table}");

    // By short name (the search list), by its full name, spread over the three pods.
    eventually(60, "the service answers by name", || async { get(&server, "client", "web", "/").ok() }).await;
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen != names {
        assert!(Instant::now() < deadline, "requests spread over {names:?}, saw {seen:?}");
        let body = get(&server, "client", "web.default.svc.cluster.local", "/").expect("the full name answers");
        seen.insert(body.split_whitespace().next().unwrap().to_string());
    }
    let lookup = stdout(&kubectl_exec(&server, "client", &["nslookup", "web"]));
    assert!(lookup.contains(&ip), "nslookup web names the ClusterIP {ip}: {lookup}");
    // As the README has a new user try it: busybox's wget, by both names.
    for url in ["http://web", "http://web.default.svc.cluster.local/hello"] {
        let out = kubectl_exec(&server, "client", &["wget", "-qO-", url]);
        let body = stdout(&out);
        let pod = body.split_whitespace().next().unwrap_or_default();
        assert!(
            names.contains(pod),
            "wget -qO- {url} answers from one of {names:?}: {body}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // No endpoints: connections are refused at once; endpoints again: answered again.
    server.kubectl_ok(&["scale", "deployment", "web", "--replicas=0"]);
    eventually(60, "connections refused without endpoints", || async {
        let started = Instant::now();
        let err = get(&server, "client", "web", "/").err()?;
        (err.contains("refused") && started.elapsed() < Duration::from_secs(3)).then_some(())
    })
    .await;
    server.kubectl_ok(&["scale", "deployment", "web", "--replicas=3"]);
    eventually(90, "the service answers again", || async { get(&server, "client", "web", "/").ok() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_clients_find_the_api_through_the_kubernetes_service() {
    let registry = TestRegistry::start();
    // kubectl in a pod is a client-go program: with no kubeconfig it uses the in-cluster
    // configuration (KUBERNETES_SERVICE_HOST/PORT, the service account's token and CA).
    let kubectl = std::fs::read(which(&common::kubectl_path())).expect("read the kubectl binary");
    let image = krate_agent::testimages::busybox_with(vec![krate_agent::oci::Entry::File {
        path: "bin/kubectl".into(),
        data: kubectl,
        mode: 0o755,
    }])
    .unwrap();
    image.push(&registry.address, "kubectl", "1").unwrap();
    let server = server_with_agent(&[&registry], 22, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let kubernetes = cluster_ip(&server, "kubernetes");
    // The pod's account reads what the view role lets it (RBAC grants nothing by default).
    server.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "in-cluster-view",
        "--clusterrole=view",
        "--serviceaccount=default:default",
    ]);
    let pod = json!({"metadata": {"name": "in-cluster", "labels": {"role": "in-cluster"}}, "spec": {
        "restartPolicy": "Never",
        "containers": [{"name": "c", "image": registry.image("kubectl"), "command": ["sh", "-c",
            "echo host=$KUBERNETES_SERVICE_HOST port=$KUBERNETES_SERVICE_PORT; kubectl get --raw /api && kubectl get namespaces -o name"]}]}});
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
    let phase = eventually(120, "the in-cluster client finished", || async {
        let p = pods.get("in-cluster").await.ok()?;
        let phase = p.status?.phase?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    })
    .await;
    let logs = server.kubectl_ok(&["logs", "in-cluster"]);
    assert_eq!(phase, "Succeeded", "{logs}");
    assert!(logs.contains(&format!("host={kubernetes} port=443")), "{logs}");
    assert!(logs.contains("\"kind\":\"APIVersions\"") && logs.contains("namespace/kube-system"), "{logs}");
}

fn which(program: &std::path::Path) -> std::path::PathBuf {
    if program.is_absolute() {
        return program.to_path_buf();
    }
    let out = Command::new("sh").arg("-c").arg(format!("command -v {}", program.display())).output().unwrap();
    std::fs::canonicalize(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_names_headless_services_stateful_pods_srv_records_and_external_names() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 23, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let headless = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"}, "spec": {
        "clusterIP": "None", "selector": {"app": "db"}, "ports": [{"name": "http", "port": 8080}]}});
    let external = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "alias"}, "spec": {
        "type": "ExternalName", "externalName": "db.default.svc.cluster.local"}});
    let set = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"}, "spec": {
        "serviceName": "db", "replicas": 2, "selector": {"matchLabels": {"app": "db"}},
        "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": registry.image("test-server")}]}}}});
    for obj in [headless, external, set] {
        server.kubectl_stdin(&["apply", "-f", "-"], Some(&obj.to_string()));
    }
    let pods = running_pods(&Api::namespaced(client.clone(), "default"), "app=db", 2).await;
    let ip_of = |name: &str| {
        pods.iter().find(|p| p.metadata.name.as_deref() == Some(name)).unwrap().status.clone().unwrap().pod_ip.unwrap()
    };
    let (db0, db1) = (ip_of("db-0"), ip_of("db-1"));
    let resolve = |from: &'static str, name: &'static str| {
        let server = &server;
        async move {
            // busybox's nslookup tries every search domain and fails if the last one
            // does: what it printed is the answer.
            let out = kubectl_exec(server, from, &["nslookup", name]);
            Some(stdout(&out)).filter(|text| text.contains("Name:"))
        }
    };
    // A stateful pod finds its peer by hostname.subdomain (busybox's nslookup takes a
    // name with dots as it is; its nc resolves through the search list, as libc does),
    // and the headless name lists both.
    let peer =
        eventually(60, "db-0.db resolves from db-1", || resolve("db-1", "db-0.db.default.svc.cluster.local")).await;
    assert!(peer.contains(&db0), "{peer}");
    let body = get(&server, "db-1", "db-0.db:8080", "/peer").expect("db-1 reaches db-0 by db-0.db");
    assert_eq!(body, "db-0 /peer");
    let all = eventually(30, "db lists both pods", || async {
        resolve("db-0", "db").await.filter(|out| out.contains(&db0) && out.contains(&db1))
    })
    .await;
    let _ = all;
    let srv =
        stdout(&kubectl_exec(&server, "db-0", &["nslookup", "-type=srv", "_http._tcp.db.default.svc.cluster.local"]));
    assert!(srv.contains("db-0.db.default.svc.cluster.local") && srv.contains("8080"), "{srv}");
    let alias = stdout(&kubectl_exec(&server, "db-0", &["nslookup", "alias"]));
    assert!(alias.contains("canonical name = db.default.svc.cluster.local") || alias.contains(&db0), "{alias}");
    let missing = kubectl_exec(&server, "db-0", &["nslookup", "nope.default.svc.cluster.local"]);
    assert!(!missing.status.success() || stdout(&missing).contains("NXDOMAIN"), "{}", stdout(&missing));
    // What the kubelet writes into pods.
    let resolv = server.kubectl_ok(&["exec", "db-0", "--", "cat", "/etc/resolv.conf"]);
    let dns =
        server.kubectl_ok(&["get", "service", "kube-dns", "-n", "kube-system", "-o", "jsonpath={.spec.clusterIP}"]);
    assert!(resolv.starts_with("search default.svc.cluster.local svc.cluster.local cluster.local"), "{resolv}");
    assert!(resolv.contains(&format!("nameserver {dns}\n")) && resolv.contains("options ndots:5"), "{resolv}");
    let hosts = server.kubectl_ok(&["exec", "db-0", "--", "cat", "/etc/hosts"]);
    assert!(hosts.contains(&format!("{db0}\tdb-0.db.default.svc.cluster.local\tdb-0")), "{hosts}");
}

/// A namespace outside the node, with a veth to it: the node's address on the link is
/// the agent's `--node-ip`. Removed on drop.
struct Outside {
    ns: String,
    host_link: String,
    node_ip: String,
    client_ip: String,
}

impl Outside {
    fn new(n: u8) -> Self {
        let id = std::process::id() % 200;
        let ns = format!("kso{n}p{id}");
        let (host_link, inner) = (format!("ksh{n}p{id}"), format!("ksi{n}p{id}"));
        let (node_ip, client_ip) = (format!("10.250.{n}.1"), format!("10.250.{n}.2"));
        let sh = |args: &[&str]| {
            let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &host_link]).output();
        sh(&["ip", "netns", "add", &ns]);
        sh(&["ip", "link", "add", &host_link, "type", "veth", "peer", "name", &inner]);
        sh(&["ip", "addr", "add", &format!("{node_ip}/30"), "dev", &host_link]);
        sh(&["ip", "link", "set", &host_link, "up"]);
        sh(&["ip", "link", "set", &inner, "netns", &ns]);
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{client_ip}/30"), "dev", &inner]);
        sh(&["ip", "-n", &ns, "link", "set", &inner, "up"]);
        sh(&["ip", "-n", &ns, "route", "add", "default", "via", &node_ip]);
        Outside { ns, host_link, node_ip, client_ip }
    }

    /// A GET of /client from outside: the body, or the error.
    fn get(&self, target: &str) -> Result<String, String> {
        let (host, port) = target.split_once(':').unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "busybox", "nc", "-w", "2", host, port])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"GET /client HTTP/1.0\r\n\r\n").unwrap();
        body_of(&child.wait_with_output().unwrap())
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip").args(["link", "del", &self.host_link]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ports_and_load_balancers_answer_outside_clients_and_local_policy_keeps_their_address() {
    let registry = TestRegistry::start();
    let outside = Outside::new(24);
    let server = server_with_agent(&[&registry], 24, &["--node-ip", &outside.node_ip]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    server.kubectl_ok(&["create", "deployment", "web", &format!("--image={}", registry.image("test-server"))]);
    running_pods(&Api::namespaced(client.clone(), "default"), "app=web", 1).await;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let np: Service = serde_json::from_value(json!({"metadata": {"name": "np"}, "spec": {"type": "NodePort",
        "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}))
    .unwrap();
    let created = services.create(&PostParams::default(), &np).await.unwrap();
    let node_port = created.spec.unwrap().ports.unwrap()[0].node_port.unwrap();
    let target = format!("{}:{node_port}", outside.node_ip);
    let body = eventually(60, "the node port answers from outside", || async { outside.get(&target).ok() }).await;
    assert!(!body.ends_with(&outside.client_ip), "cluster policy: the client's address is masqueraded: {body}");
    let patch = json!({"spec": {"externalTrafficPolicy": "Local"}});
    services.patch("np", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(patch)).await.unwrap();
    eventually(30, "local policy keeps the client's address", || async {
        outside.get(&target).ok().filter(|b| b.trim_end().ends_with(&outside.client_ip))
    })
    .await;

    // A LoadBalancer gets the node's address and answers there on its own port.
    let lb: Service = serde_json::from_value(json!({"metadata": {"name": "lb"}, "spec": {"type": "LoadBalancer",
        "selector": {"app": "web"}, "ports": [{"port": 8081, "targetPort": 8080}]}}))
    .unwrap();
    services.create(&PostParams::default(), &lb).await.unwrap();
    eventually(30, "the load balancer's ingress is the node's address", || async {
        let svc = services.get("lb").await.ok()?;
        let ingress = svc.status?.load_balancer?.ingress?;
        (ingress.first()?.ip.as_deref() == Some(outside.node_ip.as_str())).then_some(())
    })
    .await;
    let lb_target = format!("{}:8081", outside.node_ip);
    eventually(30, "the load balancer answers", || async { outside.get(&lb_target).ok() }).await;
    let ranges = json!({"spec": {"loadBalancerSourceRanges": ["192.0.2.0/24"]}});
    services.patch("lb", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(ranges)).await.unwrap();
    eventually(30, "a client outside the source ranges is dropped", || async {
        outside.get(&lb_target).err().filter(|e| !e.contains("refused"))
    })
    .await;
    let listing = server.kubectl_ok(&["get", "service", "lb"]);
    assert!(listing.contains(&outside.node_ip), "EXTERNAL-IP shows the node: {listing}");

    // A pod's hostPort goes through the same table.
    let host_port = 20_000 + (std::process::id() % 5000) as i32;
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "hp", "labels": {"role": "hp"}}, "spec": {
        "containers": [{"name": "c", "image": registry.image("test-server"), "ports": [{"containerPort": 8080, "hostPort": host_port}]}]}}))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), "default").create(&PostParams::default(), &pod).await.unwrap();
    let hp_target = format!("{}:{host_port}", outside.node_ip);
    let body = eventually(60, "the host port answers", || async { outside.get(&hp_target).ok() }).await;
    assert!(body.starts_with("hp "), "{body}");
    server.kubectl_ok(&["delete", "pod", "hp", "--grace-period=0"]);
    eventually(30, "the host port goes with the pod", || async { outside.get(&hp_target).err() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_affinity_and_hairpin_traffic() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 25, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    server.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        &format!("--image={}", registry.image("test-server")),
        "--replicas=3",
    ]);
    server.kubectl_ok(&[
        "expose",
        "deployment",
        "web",
        "--port",
        "80",
        "--target-port",
        "8080",
        "--session-affinity",
        "ClientIP",
    ]);
    let pods = running_pods(&Api::namespaced(client.clone(), "default"), "app=web", 3).await;
    client_pod(&server, &client, &registry, "client", json!({})).await;
    eventually(60, "the service answers", || async { get(&server, "client", "web", "/").ok() }).await;
    let answered: BTreeSet<String> = (0..8)
        .map(|_| get(&server, "client", "web", "/").unwrap().split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(answered.len(), 1, "one client, one pod: {answered:?}");
    // A pod reaches itself through its own Service (masqueraded on the way back).
    server.kubectl_ok(&["scale", "deployment", "web", "--replicas=1"]);
    let one = running_pods(&Api::namespaced(client.clone(), "default"), "app=web", 1).await;
    let name = one[0].metadata.name.clone().unwrap();
    let _ = pods;
    let body =
        eventually(60, "hairpin traffic comes back", || async { get(&server, &name, "web", "/client").ok() }).await;
    assert!(body.starts_with(&name), "{body}");
}

/// Rules that DNAT to an endpoint, as `nft` lists them.
fn dnat_rules(server: &TestServer) -> usize {
    let table = format!("krate-kt{}p{}", 26, std::process::id() % 200);
    let out = Command::new("nft").args(["list", "table", "ip", &table]).output().unwrap();
    let _ = server;
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("dnat to")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_through_a_service_outlives_the_agent_and_a_restart_adds_no_rules() {
    let registry = TestRegistry::start();
    let mut server = server_with_agent(&[&registry], 26, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    server.kubectl_ok(&["create", "deployment", "web", &format!("--image={}", registry.image("test-server"))]);
    server.kubectl_ok(&["expose", "deployment", "web", "--port", "80", "--target-port", "8080"]);
    running_pods(&Api::namespaced(client.clone(), "default"), "app=web", 1).await;
    let ip = cluster_ip(&server, "web");
    // Only once the rules are there does anything go to the ClusterIP (before, a packet
    // could follow the default route off the machine).
    eventually(60, "the service's rules are in the kernel", || async { (dnat_rules(&server) >= 2).then_some(()) })
        .await;
    // From this machine (the node) through the ClusterIP: a line a tenth of a second.
    let stream = eventually(60, "the ClusterIP answers the node", || async {
        let mut s =
            std::net::TcpStream::connect_timeout(&format!("{ip}:80").parse().unwrap(), Duration::from_secs(2)).ok()?;
        write!(s, "GET /stream/30 HTTP/1.1\r\nHost: web\r\n\r\n").ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        Some(s)
    })
    .await;
    let mut lines = BufReader::new(stream).lines();
    let mut read = |n: usize| {
        let mut last = String::new();
        for _ in 0..n {
            last = lines.next().expect("the stream goes on").expect("the stream goes on");
        }
        last
    };
    read(10);
    let rules = dnat_rules(&server);
    assert!(rules >= 2, "the service's rules are in the kernel: {rules}");
    server.kill();
    read(15);
    server.restart();
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last = read(15);
    assert!(last.ends_with(|c: char| c.is_ascii_digit()), "{last}");
    assert_eq!(dnat_rules(&server), rules, "the restarted agent rewrote its rules without duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_servers_proxy_reaches_pods_and_services() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 27, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let image = format!("--image={}", registry.image("test-server"));
    server.kubectl_ok(&["run", "web", &image, "--port=8080", "--labels=app=web"]);
    server.kubectl_ok(&["expose", "pod", "web", "--port=80", "--target-port=8080"]);
    running_pods(&Api::namespaced(client.clone(), "default"), "app=web", 1).await;
    let raw = |path: &str| server.kubectl(&["get", "--raw", path]);

    // A pod on its first container port, or on one named; the path and query go along.
    let answer = stdout(&raw("/api/v1/namespaces/default/pods/web/proxy/hello?x=1"));
    assert_eq!(answer, "web /hello?x=1");
    assert_eq!(stdout(&raw("/api/v1/namespaces/default/pods/http:web:8080/proxy/there")), "web /there");
    // A service by its port's number, through one of its endpoints.
    let answer = eventually(60, "the service's endpoint", || async {
        let out = raw("/api/v1/namespaces/default/services/web:80/proxy/via-service");
        out.status.success().then(|| stdout(&out))
    })
    .await;
    assert_eq!(answer, "web /via-service");
    // Other methods pass through too (the test server echoes any).
    let (code, body) =
        common::raw(&client, "POST", "/api/v1/namespaces/default/pods/web/proxy/posted", "text/plain", b"x".to_vec())
            .await;
    assert_eq!((code, body), (200, json!("web /posted")));

    // An empty path is redirected to the same URL ending in '/'.
    let req =
        http::Request::get("/api/v1/namespaces/default/pods/web/proxy?a=b").body(kube::client::Body::empty()).unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 301);
    assert_eq!(resp.headers()["location"], "/api/v1/namespaces/default/pods/web/proxy/?a=b");
    // A port the service does not have: 503 with upstream's message.
    let out = raw("/api/v1/namespaces/default/services/web:81/proxy/");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(r#"no service port 81 found for service "web""#), "{err}");
    // A node is its agent, over HTTPS with the API server's client certificate.
    let node = server.kubectl_ok(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"]);
    assert_eq!(stdout(&raw(&format!("/api/v1/nodes/{node}/proxy/healthz"))), "ok");
    // Nothing listens there: 503, the server carries on.
    let out = raw("/api/v1/namespaces/default/pods/web:9999/proxy/");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("error trying to reach service"), "{err}");
}

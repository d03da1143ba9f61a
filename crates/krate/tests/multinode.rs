//! Several nodes on one machine (`krate dev cluster up`: each node a network namespace
//! with its own agent and containerd, joined with the server's token): pods reach each
//! other across nodes by pod IP with no NAT, over host-gw and VXLAN; Services reach
//! endpoints on other nodes; routes follow nodes leaving; `krate reset` and `krate dev
//! cluster down` leave nothing behind.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{eventually, kubectl_at, kubectl_at_ok, node};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams};

/// A `krate dev cluster` of its own per test (`n` tells concurrent tests apart: their
/// links, subnets and pod ranges differ); taken down on drop.
struct DevCluster {
    name: String,
    dir: PathBuf,
    /// The krate binary `up` and `down` run.
    program: PathBuf,
    n: u8,
    _images: tempfile::TempDir,
    up: Option<Output>,
}

fn krate(program: &Path, args: &[&str]) -> Output {
    Command::new(program).args(args).output().expect("run krate")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

impl DevCluster {
    fn up(n: u8, nodes: u8, extra: &[&str]) -> Self {
        Self::up_as(Path::new(env!("CARGO_BIN_EXE_krate")), n, nodes, extra)
    }

    /// `up` with the krate binary at `program`.
    fn up_as(program: &Path, n: u8, nodes: u8, extra: &[&str]) -> Self {
        let id = std::process::id() % 1000;
        let name = format!("m{n}{id}");
        let dir = std::env::temp_dir().join(format!("krate-dev-{name}"));
        let images = tempfile::tempdir().unwrap();
        krate_agent::testimages::write_archives(images.path()).expect("write the test images");
        let (subnet, cluster_cidr, service_cidr) = Self::ranges(n);
        let port = common::free_port().to_string();
        let nodes = nodes.to_string();
        let eviction = format!("--agent-arg=--eviction-hard={}", node::LENIENT_EVICTION);
        let airgap = format!("--agent-arg=--airgap-images={}", images.path().display());
        let mut args = vec![
            "dev",
            "cluster",
            "up",
            "--name",
            &name,
            "--nodes",
            &nodes,
            "--dir",
            dir.to_str().unwrap(),
            "--subnet",
            &subnet,
            "--port",
            &port,
            "--cluster-cidr",
            &cluster_cidr,
            "--service-cidr",
            &service_cidr,
            &eviction,
            &airgap,
            "--timeout",
            "240",
        ];
        args.extend_from_slice(extra);
        let out = krate(program, &args);
        let mut cluster = DevCluster { name, dir, program: program.to_path_buf(), n, _images: images, up: None };
        if !out.status.success() {
            // `up` took down what it started and left its logs; they go into the message.
            let logs = cluster.logs();
            let _ = std::fs::remove_dir_all(&cluster.dir);
            panic!("krate dev cluster up:\n{}\n{logs}", text(&out));
        }
        cluster.up = Some(out);
        cluster
    }

    /// The nodes' link, pod and service ranges of test `n`.
    fn ranges(n: u8) -> (String, String, String) {
        let id = std::process::id() % 50;
        (
            format!("172.30.{}.0/24", id * 5 + u32::from(n)),
            format!("10.{}.0.0/16", 230 + n),
            format!("10.{}.0.0/24", 120 + n),
        )
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("server/admin.kubeconfig")
    }

    async fn client(&self) -> kube::Client {
        common::client_for(&self.kubeconfig()).await
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        kubectl_at_ok(&self.kubeconfig(), args)
    }

    fn netns(&self, node: u8) -> String {
        format!("krate-{}-{node}", self.name)
    }

    /// A command run inside node `node`'s network namespace.
    fn on_node(&self, node: u8, args: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.netns(node)]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn node_dir(&self, node: u8) -> PathBuf {
        self.dir.join(format!("node-{node}"))
    }

    fn agent_pid(&self, node: u8) -> u32 {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.dir.join("cluster.json")).unwrap()).unwrap();
        state["nodes"][usize::from(node - 1)]["pid"].as_u64().expect("agent pid") as u32
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            for log in [path.join("agent.log"), path.clone()] {
                if log.extension().is_some_and(|e| e == "log") && log.is_file() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    out.push_str(&format!(
                        "--- {}\n{}\n",
                        log.display(),
                        lines[lines.len().saturating_sub(30)..].join("\n")
                    ));
                }
            }
        }
        out
    }

    fn down(&mut self) -> Output {
        self.up = None;
        krate(&self.program, &["dev", "cluster", "down", "--name", &self.name, "--dir", self.dir.to_str().unwrap()])
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        if self.up.is_some() {
            let out = self.down();
            if !out.status.success() {
                eprintln!("krate dev cluster down {}: {}", self.name, text(&out));
            }
        }
    }
}

/// A Deployment of `replicas` test servers, one per node (topology spread on hostname),
/// with a `FILLER` variable of `filler` bytes (served at `/env/FILLER`).
fn spread_deployment(name: &str, replicas: usize, filler: usize) -> String {
    let filler = "x".repeat(filler);
    format!(
        r#"{{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {{"name": "{name}"}},
 "spec": {{"replicas": {replicas}, "selector": {{"matchLabels": {{"app": "{name}"}}}},
  "template": {{"metadata": {{"labels": {{"app": "{name}"}}}}, "spec": {{
   "topologySpreadConstraints": [{{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
     "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {{"matchLabels": {{"app": "{name}"}}}}}}],
   "containers": [{{"name": "web", "image": "krate.local/test-server:1", "ports": [{{"containerPort": 8080}}],
     "env": [{{"name": "FILLER", "value": "{filler}"}}]}}]}}}}}}}}"#
    )
}

async fn spread_pods(cluster: &DevCluster, name: &str, replicas: usize, filler: usize) -> Vec<Pod> {
    let manifest = spread_deployment(name, replicas, filler);
    let out = kubectl_at(&cluster.kubeconfig(), &["apply", "-f", "-"], Some(&manifest));
    assert!(out.status.success(), "{}", text(&out));
    let pods: Api<Pod> = Api::namespaced(cluster.client().await, "default");
    let running = eventually(180, &format!("{replicas} running {name} pods"), || async {
        let list = pods.list(&ListParams::default().labels(&format!("app={name}"))).await.ok()?.items;
        let ready: Vec<Pod> = list
            .into_iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .collect();
        (ready.len() == replicas).then_some(ready)
    })
    .await;
    let nodes: BTreeSet<&str> = running.iter().filter_map(|p| p.spec.as_ref()?.node_name.as_deref()).collect();
    assert_eq!(nodes.len(), replicas, "one pod per node: {nodes:?}");
    running
}

fn pod_ip(pod: &Pod) -> String {
    pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap()
}

fn pod_name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap()
}

/// `wget` from inside `from` (kubectl exec, through the API server and the agent).
fn fetch(cluster: &DevCluster, from: &Pod, url: &str) -> Option<String> {
    fetch_within(cluster, from, url, 10)
}

/// `wget` from inside `from`, given up after `seconds`.
fn fetch_within(cluster: &DevCluster, from: &Pod, url: &str, seconds: u32) -> Option<String> {
    let (ns, seconds) = (from.metadata.namespace.as_deref().unwrap_or("default"), seconds.to_string());
    let args = ["exec", "-n", ns, &pod_name(from), "--", "timeout", &seconds, "wget", "-qO-", url];
    let out = kubectl_at(&cluster.kubeconfig(), &args, None);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Each pod reaches every other by pod IP, and the other sees the sender's pod IP.
async fn assert_pods_reach_each_other(cluster: &DevCluster, pods: &[Pod]) {
    for from in pods {
        for to in pods.iter().filter(|p| p.metadata.name != from.metadata.name) {
            let url = format!("http://{}:8080/client", pod_ip(to));
            let answer =
                eventually(30, &format!("{} reaching {url}", pod_name(from)), || async { fetch(cluster, from, &url) })
                    .await;
            assert_eq!(answer.trim(), format!("{} {}", pod_name(to), pod_ip(from)), "no NAT between pods");
        }
    }
}

#[tokio::test]
async fn pods_reach_each_other_across_three_nodes_without_nat() {
    let cluster = DevCluster::up(1, 3, &[]);
    let up = text(cluster.up.as_ref().unwrap());
    assert!(up.contains("3/3 nodes Ready") && up.contains("kubectl get nodes -o wide"), "{up}");
    let nodes: Api<Node> = Api::all(cluster.client().await);
    let nodes = nodes.list(&Default::default()).await.unwrap().items;
    let cidrs: BTreeSet<String> = nodes.iter().filter_map(|n| n.spec.as_ref()?.pod_cidr.clone()).collect();
    let (subnet, cluster_cidr, _) = DevCluster::ranges(cluster.n);
    let subnet: krate_net::Cidr = subnet.parse().unwrap();
    let ips: BTreeSet<String> = nodes
        .iter()
        .flat_map(|n| n.status.as_ref().unwrap().addresses.clone().unwrap())
        .filter(|a| a.type_ == "InternalIP")
        .map(|a| a.address)
        .collect();
    assert_eq!(cidrs.len(), 3, "distinct pod CIDRs: {cidrs:?}");
    let cluster_cidr: krate_net::Cidr = cluster_cidr.parse().unwrap();
    assert!(cidrs.iter().all(|c| cluster_cidr.contains(c.parse::<krate_net::Cidr>().unwrap().network)), "{cidrs:?}");
    assert_eq!(ips.len(), 3, "own InternalIPs: {ips:?}");
    assert!(ips.iter().all(|ip| subnet.contains(ip.parse().unwrap())), "{ips:?} in {subnet}");
    let wide = cluster.kubectl_ok(&["get", "nodes", "-o", "wide"]);
    assert!(ips.iter().all(|ip| wide.contains(ip.as_str())), "{wide}");

    let pods = spread_pods(&cluster, "web", 3, 0).await;
    assert_pods_reach_each_other(&cluster, &pods).await;
    // Pods on a shared link use host-gw: the routes go straight via the other nodes.
    let routes = cluster.on_node(1, &["ip", "route", "show", "proto", "75"]);
    assert_eq!(routes.lines().count(), 2, "{routes}");
    assert!(routes.lines().all(|r| r.contains(" via 172.30.") && r.contains("dev eth0")), "{routes}");

    // A Service whose only endpoint is on node-2, reached from a pod on node-1.
    let on = |node: &str| pods.iter().find(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some(node)).unwrap();
    let (client_pod, backend) = (on("node-1"), on("node-2"));
    cluster.kubectl_ok(&["label", "pod", &pod_name(backend), "backend=yes"]);
    let service = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend"},
      "spec": {"selector": {"backend": "yes"}, "ports": [{"port": 80, "targetPort": 8080}]}}"#;
    let out = kubectl_at(&cluster.kubeconfig(), &["apply", "-f", "-"], Some(service));
    assert!(out.status.success(), "{}", text(&out));
    let answer = eventually(60, "the Service on node-2 answering node-1", || async {
        fetch(&cluster, client_pod, "http://backend.default.svc.cluster.local/client")
    })
    .await;
    assert_eq!(answer.trim(), format!("{} {}", pod_name(backend), pod_ip(client_pod)));
}

#[tokio::test]
async fn vxlan_carries_pods_across_nodes_and_down_leaves_nothing() {
    let mut cluster = DevCluster::up(2, 2, &["--pod-network", "vxlan"]);
    let pods = spread_pods(&cluster, "tunnel", 2, 100_000).await;
    assert_pods_reach_each_other(&cluster, &pods).await;
    let link = cluster.on_node(1, &["ip", "-d", "link", "show", "krate.vxlan"]);
    assert!(link.contains("vxlan id 1") && link.contains("dstport 8472") && link.contains("mtu 1450"), "{link}");
    let routes = cluster.on_node(1, &["ip", "route", "show", "proto", "75"]);
    assert!(routes.contains("dev krate.vxlan") && routes.contains("onlink"), "{routes}");
    // The pods' MTU leaves room for the tunnel's 50 bytes.
    let mtu =
        kubectl_at_ok(&cluster.kubeconfig(), &["exec", &pod_name(&pods[0]), "--", "cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.trim(), "1450");
    // Large packets pass whole (no black hole at the MTU).
    let big = format!("http://{}:8080/env/FILLER", pod_ip(&pods[1]));
    let body = fetch(&cluster, &pods[0], &big).expect("a 100 kB answer through the tunnel");
    assert_eq!(body.len(), 100_000);

    let (bridge, netns) = (format!("krd-{}", cluster.name), cluster.netns(1));
    let (_, cluster_cidr, _) = DevCluster::ranges(cluster.n);
    let out = cluster.down();
    assert!(out.status.success(), "{}", text(&out));
    let links = String::from_utf8_lossy(&Command::new("ip").args(["-o", "link"]).output().unwrap().stdout).into_owned();
    assert!(!links.contains(&bridge), "{links}");
    let namespaces =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned();
    assert!(!namespaces.contains(&netns), "{namespaces}");
    let prefix = cluster_cidr.split('.').take(2).collect::<Vec<_>>().join(".");
    let routes = String::from_utf8_lossy(&Command::new("ip").args(["route"]).output().unwrap().stdout).into_owned();
    assert!(!routes.contains(&format!("{prefix}.")), "{routes}");
    assert!(!cluster.dir.exists());
}

/// krate's routes as node `node` has them.
fn routes_on(cluster: &DevCluster, node: u8) -> String {
    cluster.on_node(node, &["ip", "route", "show", "proto", "75"])
}

#[tokio::test]
async fn a_removed_node_loses_its_routes_and_cidr_and_reset_cleans_it() {
    let cluster = DevCluster::up(3, 2, &[]);
    let client = cluster.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let cidr = nodes.get("node-2").await.unwrap().spec.unwrap().pod_cidr.unwrap();
    // node-1 routes to node-2's pods once its agent has seen node-2's Node.
    eventually(30, "node-1's route to node-2's pods", || async {
        routes_on(&cluster, 1).contains(&cidr).then_some(())
    })
    .await;

    // The machine of node-2 goes away: its agent stops, `krate reset` undoes it there.
    let pid = cluster.agent_pid(2);
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    eventually(30, "node-2's agent to stop", || async { (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()) })
        .await;
    let reset = Command::new("ip")
        .args(["netns", "exec", &cluster.netns(2), env!("CARGO_BIN_EXE_krate"), "reset", "--data-dir"])
        .arg(cluster.node_dir(2))
        .output()
        .unwrap();
    assert!(reset.status.success(), "{}", text(&reset));
    // It says what it removed.
    let said = String::from_utf8_lossy(&reset.stdout);
    for what in ["removed krate's containerd", "removed pod bridge krate0", "removed routes to other nodes' pods"] {
        assert!(said.contains(what), "{what:?} in:\n{said}");
    }
    assert_eq!(routes_on(&cluster, 2), "", "no routes left on the reset node");
    let links = cluster.on_node(2, &["ip", "-o", "link"]);
    assert!(!links.contains("krate0") && !links.contains("krate.vxlan"), "{links}");
    let tables = cluster.on_node(2, &["nft", "list", "tables"]);
    assert!(!tables.contains("krate"), "{tables}");

    // Deleting the Node takes its routes off the other nodes and frees its pod CIDR.
    nodes.delete("node-2", &DeleteParams::default()).await.unwrap();
    eventually(30, "node-1 to drop the route to node-2's pods", || async {
        (!routes_on(&cluster, 1).contains(&cidr)).then_some(())
    })
    .await;
    let replacement: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "node-9"}})).unwrap();
    nodes.create(&Default::default(), &replacement).await.unwrap();
    let reused =
        eventually(30, "a pod CIDR for node-9", || async { nodes.get("node-9").await.ok()?.spec?.pod_cidr }).await;
    assert_eq!(reused, cidr, "node-2's released range is handed out again");
}

/// A test-server pod `name` in `ns` on `node`, labelled `app=<app>`, once it runs.
async fn pod_on(cluster: &DevCluster, ns: &str, name: &str, node: &str, app: &str) -> Pod {
    let manifest = format!(
        r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{name}", "namespace": "{ns}", "labels": {{"app": "{app}"}}}},
 "spec": {{"nodeName": "{node}", "containers": [{{"name": "web", "image": "krate.local/test-server:1",
   "ports": [{{"name": "http", "containerPort": 8080}}]}}]}}}}"#
    );
    let out = kubectl_at(&cluster.kubeconfig(), &["apply", "-f", "-"], Some(&manifest));
    assert!(out.status.success(), "{}", text(&out));
    let pods: Api<Pod> = Api::namespaced(cluster.client().await, ns);
    eventually(120, &format!("pod {ns}/{name} running"), || async {
        let pod = pods.get(name).await.ok()?;
        let status = pod.status.as_ref()?;
        (status.phase.as_deref() == Some("Running") && status.pod_ip.is_some()).then_some(pod)
    })
    .await
}

/// Whether `from` gets an answer from `to` (a few seconds' wait for a refusal).
fn reaches(cluster: &DevCluster, from: &Pod, to: &Pod) -> bool {
    fetch_within(cluster, from, &format!("http://{}:8080/client", pod_ip(to)), 3).is_some()
}

/// Waits until `from` reaching `to` is `expected` (rules take a moment to reach nodes).
async fn until_reach(cluster: &DevCluster, from: &Pod, to: &Pod, expected: bool, why: &str) {
    let what =
        format!("{} {} {}: {why}", pod_name(from), if expected { "reaching" } else { "cut off from" }, pod_name(to));
    eventually(60, &what, || async { (reaches(cluster, from, to) == expected).then_some(()) }).await;
}

fn apply_json(cluster: &DevCluster, manifest: &str) {
    let out = kubectl_at(&cluster.kubeconfig(), &["apply", "-f", "-"], Some(manifest));
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test]
async fn network_policies_deny_allow_exact_paths_and_lift() {
    let cluster = DevCluster::up(4, 2, &[]);
    cluster.kubectl_ok(&["create", "namespace", "web"]);
    cluster.kubectl_ok(&["create", "namespace", "friends"]);
    cluster.kubectl_ok(&["label", "namespace", "friends", "team=friends"]);
    // Each node's networking has an identity of its own (a node sees only its pods).
    for node in [1, 2] {
        let network = std::fs::read_to_string(cluster.node_dir(node).join("agent/network.kubeconfig")).unwrap();
        assert!(network.contains(&format!("system:krate:network:node-{node}")), "{network}");
    }
    let server = pod_on(&cluster, "web", "server", "node-1", "server").await;
    let client = pod_on(&cluster, "friends", "client", "node-2", "client").await;
    let stranger = pod_on(&cluster, "friends", "stranger", "node-2", "stranger").await;
    until_reach(&cluster, &client, &server, true, "no policy yet").await;
    assert!(reaches(&cluster, &stranger, &server));

    // Default deny for the server's namespace cuts both off.
    apply_json(
        &cluster,
        r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "deny", "namespace": "web"},
            "spec": {"podSelector": {}}}"#,
    );
    until_reach(&cluster, &client, &server, false, "default deny").await;
    assert!(!reaches(&cluster, &stranger, &server), "default deny");

    // Allowed: app=client pods of namespaces labelled team=friends, on the named port.
    apply_json(
        &cluster,
        r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "friends", "namespace": "web"},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"from": [
              {"namespaceSelector": {"matchLabels": {"team": "friends"}}, "podSelector": {"matchLabels": {"app": "client"}}}],
              "ports": [{"port": "http"}]}]}}"#,
    );
    until_reach(&cluster, &client, &server, true, "allowed by namespace and pod labels").await;
    assert!(!reaches(&cluster, &stranger, &server), "the stranger is still denied");

    // Egress from the client only to the server's address: its neighbour on the same
    // node is cut off, the server still answers.
    let egress = format!(
        r#"{{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {{"name": "out", "namespace": "friends"}},
            "spec": {{"podSelector": {{"matchLabels": {{"app": "client"}}}}, "policyTypes": ["Egress"],
              "egress": [{{"to": [{{"ipBlock": {{"cidr": "{}/32"}}}}]}}]}}}}"#,
        pod_ip(&server)
    );
    assert!(reaches(&cluster, &client, &stranger), "before the egress policy");
    apply_json(&cluster, &egress);
    until_reach(&cluster, &client, &stranger, false, "egress only to the server's ipBlock").await;
    assert!(reaches(&cluster, &client, &server), "egress to the ipBlock");

    // Removing the policies restores every path.
    cluster.kubectl_ok(&["delete", "networkpolicy", "--all", "-n", "web"]);
    cluster.kubectl_ok(&["delete", "networkpolicy", "--all", "-n", "friends"]);
    until_reach(&cluster, &stranger, &server, true, "policies removed").await;
    until_reach(&cluster, &client, &stranger, true, "policies removed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_the_host_leaves_a_dev_clusters_routes_alone() {
    let cluster = DevCluster::up(5, 1, &[]);
    let cidr = cluster.kubectl_ok(&["get", "node", "node-1", "-o", "jsonpath={.spec.podCIDR}"]);
    let host_route = || {
        let out = Command::new("ip").args(["route", "show", cidr.trim()]).output().expect("ip route");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(host_route().contains("proto 76"), "the host routes the dev cluster's pods: {:?}", host_route());
    // Another cluster's agent in the host's namespace removes the protocol-75 routes it
    // does not want when it first syncs; the dev cluster's must survive that.
    let other = node::server_with_agent(&[], 1, &[]);
    let client = other.client().await;
    node::wait_node_ready(&client, &other).await;
    assert!(!host_route().is_empty(), "the other cluster's agent removed the dev cluster's route");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_cluster_comes_up_and_down_from_a_binary_not_named_krate() {
    // Installed under another name (a versioned one, say), krate still knows its own
    // processes: `up` watches the server it started, `down` stops it.
    let bin = tempfile::tempdir().unwrap();
    let program = bin.path().join("krate-v0.9");
    std::fs::copy(env!("CARGO_BIN_EXE_krate"), &program).unwrap();
    let mut cluster = DevCluster::up_as(&program, 6, 1, &[]);
    assert!(cluster.kubectl_ok(&["get", "nodes"]).contains("node-1"));
    let out = cluster.down();
    cluster.up = None;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !std::path::Path::new("/run/netns").join(format!("krate-{}-1", cluster.name)).exists(),
        "the node's namespace is gone"
    );
}

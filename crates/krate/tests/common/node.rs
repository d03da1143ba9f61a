//! Servers with a node agent running real containers, and what tests ask of their pods.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};

use super::registry::TestRegistry;
use super::{eventually, TestServer};

/// The agent port of test `n`: below the ephemeral range, because a port merely free now
/// could be handed to a test's containerd (its streaming server binds port 0) before the
/// agent binds it.
pub fn kubelet_port(n: u8) -> String {
    (20_000 + std::process::id() % 200 * 20 + u32::from(n)).to_string()
}

/// A server whose agent gets a bridge and pod CIDR of its own (`n` tells tests apart),
/// pulling from `registries` over plain HTTP, with `extra` arguments.
pub fn server_with_agent(registries: &[&TestRegistry], n: u8, extra: &[&str]) -> TestServer {
    let args = agent_args(registries, n, extra);
    TestServer::start_with_agent(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

pub fn agent_args(registries: &[&TestRegistry], n: u8, extra: &[&str]) -> Vec<String> {
    let id = std::process::id() % 200;
    let mut args: Vec<String> = vec![
        "--node-name".into(),
        "node-1".into(),
        "--bridge".into(),
        format!("kt{n}p{id}"),
        "--pod-cidr".into(),
        format!("10.{}.{}.0/24", 200 + n, id),
        // Servers of concurrent tests share this machine's netfilter: their Services
        // must not share addresses.
        "--service-cidr".into(),
        format!("10.{}.{}.0/24", 100 + n, id),
        "--kubelet-port".into(),
        kubelet_port(n),
    ];
    // Names outside the cluster go to a resolver on loopback (none listens): the
    // tests' DNS traffic stays on this machine.
    let resolv = std::env::temp_dir().join(format!("krate-test-resolv-{}.conf", std::process::id()));
    std::fs::write(&resolv, "nameserver 127.0.0.53\nsearch krate.test\n").expect("write a resolv.conf");
    args.extend(["--resolv-conf".to_string(), resolv.display().to_string()]);
    for r in registries {
        args.extend(["--insecure-registry".to_string(), r.address.clone()]);
    }
    // How full this machine's disk happens to be must not refuse the tests' pods
    // (the default, nodefs.available<5%, would on a big, mostly full disk).
    if !extra.contains(&"--eviction-hard") {
        args.extend(["--eviction-hard".to_string(), LENIENT_EVICTION.to_string()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

pub const LENIENT_EVICTION: &str = "memory.available<100Mi,nodefs.available<512Mi,imagefs.available<512Mi";

/// One HTTP GET to a pod, straight to its IP on the node's bridge.
pub fn http_get(ip: &str, port: u16, path: &str) -> Option<String> {
    let mut s =
        std::net::TcpStream::connect_timeout(&format!("{ip}:{port}").parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

pub async fn wait_node_ready(client: &kube::Client, server: &TestServer) {
    let nodes: Api<Node> = Api::all(client.clone());
    eventually(60, &format!("node-1 Ready\n{}", server.log()), || async {
        let node = nodes.get_opt("node-1").await.ok()??;
        let ready = node.status?.conditions?.into_iter().any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(())
    })
    .await;
}

pub fn container_status(pod: &Pod) -> Option<serde_json::Value> {
    let status = serde_json::to_value(pod.status.as_ref()?).ok()?;
    status["containerStatuses"].get(0).cloned()
}

/// The Deployment `keep`: two pods of `registry`'s test server (which answers on 8080),
/// running; the pods API of `default` and the pods.
pub async fn keep_deployment(server: &TestServer, registry: &TestRegistry) -> (Api<Pod>, Vec<Pod>) {
    let image = format!("--image={}", registry.image("test-server"));
    server.kubectl_ok(&["create", "deployment", "keep", &image, "--replicas=2"]);
    let pods: Api<Pod> = Api::namespaced(server.client().await, "default");
    let running = running_pods(&pods, "app=keep", 2).await;
    (pods, running)
}

pub async fn running_pods(pods: &Api<Pod>, selector: &str, count: usize) -> Vec<Pod> {
    eventually(120, &format!("{count} running pods ({selector})"), || async {
        let list = pods.list(&ListParams::default().labels(selector)).await.ok()?.items;
        let running: Vec<Pod> = list
            .into_iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
            .collect();
        (running.len() == count && running.iter().all(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()))
            .then_some(running)
    })
    .await
}

/// A listener on `port` of every address of pod `pod`'s network namespace: a server of
/// the test's own then answers on the pod's IP as a container of the pod would (a
/// sidecar sharing its network), behind whatever Service selects the pod. The namespace
/// is found through the pod's containerd task.
pub fn listen_in_pod(server: &TestServer, pod: &str, port: u16) -> std::net::TcpListener {
    let socket = server.data_dir().join("agent/containerd/containerd.sock");
    let ctr = |args: &[&str]| {
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .expect("run ctr");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let filter = format!("labels.\"io.kubernetes.pod.name\"=={pod}");
    let ids = ctr(&["containers", "list", "--quiet", &filter]);
    let tasks = ctr(&["tasks", "list"]);
    let pid = ids
        .lines()
        .find_map(|id| tasks.lines().find(|t| t.starts_with(id)).and_then(|t| t.split_whitespace().nth(1)))
        .unwrap_or_else(|| panic!("no running task of pod {pod}: containers {ids:?}, tasks {tasks:?}"))
        .to_string();
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("the pod's network namespace");
    // Only this thread enters the namespace; the socket stays in it when the thread ends.
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace file descriptor held open above.
        let entered = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "entering the pod's network namespace: {}", std::io::Error::last_os_error());
        std::net::TcpListener::bind(("0.0.0.0", port)).expect("listening in the pod")
    })
    .join()
    .unwrap()
}

/// A stand-alone `krate agent` on this machine with a bridge and port of its own (its pod
/// range the cluster assigns: see `cluster`); its containers, containerd and network are
/// reset on drop.
pub struct Agent {
    child: Option<Child>,
    data: PathBuf,
    log: PathBuf,
}

impl Agent {
    pub fn args(data: &Path, n: u8) -> Vec<String> {
        let id = std::process::id() % 200;
        let resolv = data.join("resolv.conf");
        std::fs::create_dir_all(data).unwrap();
        std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
        [
            "--dir",
            data.join("agent").to_str().unwrap(),
            "--bridge",
            &format!("kj{n}p{id}"),
            "--kubelet-port",
            &kubelet_port(50 + n),
            "--lb-server-port",
            &kubelet_port(100 + n),
            "--resolv-conf",
            resolv.to_str().unwrap(),
            "--eviction-hard",
            LENIENT_EVICTION,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    pub fn start(data: &Path, n: u8, join: &[&str]) -> Self {
        let log = data.join(format!("agent-{n}.log"));
        std::fs::create_dir_all(data).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_krate"))
            .arg("agent")
            .args(join)
            .args(Self::args(data, n))
            .stdout(std::fs::File::create(data.join(format!("agent-{n}.out"))).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start krate agent");
        Agent { child: Some(child), data: data.to_path_buf(), log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let out = Command::new(env!("CARGO_BIN_EXE_krate"))
            .args(["reset", "--data-dir", self.data.to_str().unwrap()])
            .output()
            .expect("run krate reset");
        if !out.status.success() {
            eprintln!("krate reset failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

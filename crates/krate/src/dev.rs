//! `krate dev cluster up|down`: a multi-node cluster on one machine, as kind makes one
//! from containers. The server runs on this machine, bound to the address of a bridge of
//! the cluster's own; every node is a network namespace with a veth on that bridge and
//! its own `krate agent` (and so its own containerd, pod bridge, nftables table and
//! routes), joined with the token the server printed. Nodes share the bridge as machines
//! share a switch, so the pod network between them is the real one (host-gw, or VXLAN
//! with `--pod-network vxlan`).
//!
//! Processes run detached (`up` returns once every node is Ready); `cluster.json` in the
//! cluster's directory records what `up` created, so `down` stops exactly those
//! processes (by PID) and removes exactly those namespaces, links and routes, also after
//! an `up` that failed half-way.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::Node;
use serde::{Deserialize, Serialize};

#[derive(Subcommand, Debug)]
pub enum DevCommand {
    /// A local multi-node cluster: the server on this machine and each node in a network
    /// namespace of its own (see `krate dev cluster up --help`).
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Start a server and N nodes, each node in its own network namespace on a shared
    /// bridge with its own agent and containerd, and wait until every node is Ready.
    /// Needs root. Try: `krate dev cluster up --nodes 3`, then the printed kubectl lines.
    Up(UpArgs),
    /// Stop the cluster's processes and remove its namespaces, bridge, routes and
    /// directory.
    Down(DownArgs),
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Name of the cluster (up to 6 lowercase letters and digits); names its bridge
    /// `krd-NAME` and namespaces `krate-NAME-N`.
    #[arg(long, default_value = "dev")]
    pub name: String,
    /// How many nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=50))]
    pub nodes: u8,
    /// Where the cluster keeps its server's data and its nodes' agents (default:
    /// /var/lib/krate/dev/NAME).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The nodes' link: the bridge takes the first address (the server listens there),
    /// node N the (10+N)th.
    #[arg(long, default_value = "172.30.0.0/24")]
    pub subnet: String,
    /// HTTPS port of the API server.
    #[arg(long, default_value_t = 6443)]
    pub port: u16,
    /// Pod addresses of the cluster (kind's default, so that it stays clear of a `krate
    /// server` on this machine, whose pods have 10.42.0.0/16).
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: String,
    /// Service addresses of the cluster (kind's default).
    #[arg(long, default_value = "10.96.0.0/16")]
    pub service_cidr: String,
    /// The nodes' pod network: auto, host-gw or vxlan (see `krate agent --help`).
    #[arg(long, default_value = "auto")]
    pub pod_network: krate_net::routes::Backend,
    /// An extra argument for `krate server` (repeatable), e.g. `--server-arg=--cluster-cidr=10.60.0.0/16`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// An extra argument for every `krate agent` (repeatable), e.g.
    /// `--agent-arg=--airgap-images=/srv/images`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// How long to wait for the nodes to be Ready, in seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    #[arg(long, default_value = "dev")]
    pub name: String,
    /// The cluster's directory, if `up` was given one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// What `up` created, as `down` must undo it.
#[derive(Serialize, Deserialize, Debug, Default)]
struct State {
    name: String,
    bridge: String,
    subnet: String,
    server_pid: Option<u32>,
    nodes: Vec<NodeState>,
    /// Routes on this machine to the nodes' pod CIDRs.
    routes: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct NodeState {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    pid: Option<u32>,
}

impl NodeState {
    /// The host's end of the node's veth, on the cluster's bridge.
    fn host_link(&self, bridge: &str) -> String {
        format!("{bridge}-{}", self.name.trim_start_matches("node-"))
    }
}

fn cluster_dir(name: &str, dir: &Option<PathBuf>) -> PathBuf {
    dir.clone().unwrap_or_else(|| Path::new("/var/lib/krate/dev").join(name))
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 6 || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        bail!(
            "--name {name:?}: up to 6 lowercase letters and digits (it names network links, which have 15 characters)"
        );
    }
    Ok(())
}

impl State {
    fn path(dir: &Path) -> PathBuf {
        dir.join("cluster.json")
    }

    fn save(&self, dir: &Path) -> Result<()> {
        std::fs::write(Self::path(dir), serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", Self::path(dir).display()))
    }

    fn load(dir: &Path) -> Result<Option<State>> {
        match std::fs::read(Self::path(dir)) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("reading cluster.json")?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Runs a command to completion; fails with its stderr.
fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes `command` start detached (its own session, so it outlives `up`) and, given a
/// namespace, inside that network namespace (only the network: mounts stay this
/// machine's, so `krate reset` sees what the agent mounted).
fn prepare(command: &mut Command, netns: Option<&str>) -> Result<()> {
    let netns = match netns {
        Some(ns) => {
            let path = Path::new("/run/netns").join(ns);
            Some(std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?)
        }
        None => None,
    };
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, setns). The
    // namespace's file lives as long as the command (closed on exec in the child).
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            if let Some(file) = &netns {
                if libc::setns(std::os::fd::AsRawFd::as_raw_fd(file), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

fn alive(pid: u32) -> bool {
    // A PID reused by another program is not ours to stop. Ours run as `krate`, or as
    // this very binary whatever it is called (`krate-v0.2`): `up` starts them with its
    // own path.
    let this = std::env::current_exe().ok().map(|p| p.into_os_string().into_encoded_bytes());
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).next().is_some_and(|a| a.ends_with(b"krate") || this.as_deref() == Some(a)))
}

/// Stops a process `up` started: SIGTERM, then SIGKILL after `grace`.
fn stop(pid: u32, grace: Duration) {
    if !alive(pid) {
        return;
    }
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if alive(pid) {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

pub async fn run(command: DevCommand) -> Result<()> {
    let DevCommand::Cluster(command) = command;
    match command {
        ClusterCommand::Up(args) => up(args).await,
        ClusterCommand::Down(args) => {
            check_name(&args.name)?;
            let dir = cluster_dir(&args.name, &args.dir);
            down(&dir)?;
            println!("krate dev cluster {:?} is down", args.name);
            Ok(())
        }
    }
}

async fn up(args: UpArgs) -> Result<()> {
    check_name(&args.name)?;
    let dir = cluster_dir(&args.name, &args.dir);
    if let Some(state) = State::load(&dir)? {
        if state.server_pid.is_some_and(alive) || state.nodes.iter().any(|n| n.pid.is_some_and(alive)) {
            bail!(
                "krate dev cluster {:?} is already up; `krate dev cluster down --name {}` first",
                args.name,
                args.name
            );
        }
        down(&dir)?;
    }
    let subnet: krate_net::Cidr = args.subnet.parse().context("--subnet")?;
    let services: krate_net::Cidr = args.service_cidr.parse().context("--service-cidr")?;
    let cluster_dns = services.nth(10).context("--service-cidr is too small")?;
    if !subnet.is_ipv4() || subnet.prefix > 26 || subnet.size() < u128::from(args.nodes) + 12 {
        bail!("--subnet {subnet}: an IPv4 range with room for {} nodes", args.nodes);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {} (run as root)", dir.display()))?;
    let mut state = State {
        name: args.name.clone(),
        bridge: format!("krd-{}", args.name),
        subnet: subnet.to_string(),
        ..Default::default()
    };
    state.save(&dir)?;
    match start(&args, &dir, subnet, cluster_dns, &mut state).await {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = state.save(&dir);
            eprintln!("krate dev cluster up failed; removing what it started (logs stay in {})", dir.display());
            let _ = stop_and_remove(&state);
            Err(e)
        }
    }
}

async fn start(args: &UpArgs, dir: &Path, subnet: krate_net::Cidr, dns: IpAddr, state: &mut State) -> Result<()> {
    let gateway = subnet.gateway();
    let exe = std::env::current_exe().context("finding the krate binary")?;
    println!("==> bridge {} with {gateway}/{}", state.bridge, subnet.prefix);
    if sh("ip", &["link", "show", &state.bridge]).is_err() {
        sh("ip", &["link", "add", &state.bridge, "type", "bridge"])?;
    }
    let _ = sh("ip", &["addr", "add", &format!("{gateway}/{}", subnet.prefix), "dev", &state.bridge]);
    sh("ip", &["link", "set", &state.bridge, "up"])?;

    println!("==> krate server on https://{gateway}:{}", args.port);
    let server_dir = dir.join("server");
    let log = std::fs::File::create(dir.join("server.log"))?;
    let mut server = Command::new(&exe);
    server
        .args(["server", "--disable-agent", "--data-dir"])
        .arg(&server_dir)
        .args(["--bind-address", &gateway.to_string(), "--port", &args.port.to_string()])
        .args(["--cluster-cidr", &args.cluster_cidr, "--service-cidr", &args.service_cidr])
        .args(&args.server_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    prepare(&mut server, None)?;
    state.server_pid = Some(server.spawn().context("starting krate server")?.id());
    state.save(dir)?;
    let join = join_command(&dir.join("server.log"), state.server_pid).await?;

    for i in 1..=args.nodes {
        let ip = match subnet.nth(10 + u128::from(i)) {
            Some(IpAddr::V4(ip)) => ip,
            _ => bail!("--subnet {subnet} has no address for node {i}"),
        };
        let node = NodeState {
            name: format!("node-{i}"),
            netns: format!("krate-{}-{i}", args.name),
            ip,
            dir: dir.join(format!("node-{i}")),
            pid: None,
        };
        println!("==> {} in network namespace {} at {ip}", node.name, node.netns);
        state.nodes.push(node.clone());
        state.save(dir)?;
        node_link(&state.bridge, &node, subnet.prefix, gateway)?;
        std::fs::create_dir_all(&node.dir)?;
        let resolv = node.dir.join("resolv.conf");
        if !resolv.exists() {
            // Names outside the cluster: this machine's resolvers, if the namespace can
            // reach them (a loopback resolver it cannot).
            std::fs::copy("/etc/resolv.conf", &resolv).or_else(|_| std::fs::write(&resolv, "").map(|()| 0))?;
        }
        let log = std::fs::File::create(node.dir.join("agent.log"))?;
        let mut agent = Command::new(&exe);
        agent
            .arg("agent")
            .args(&join)
            .arg("--dir")
            .arg(node.dir.join("agent"))
            .args(["--node-name", &node.name, "--node-ip", &ip.to_string()])
            .args(["--pod-network", args.pod_network.as_str(), "--cluster-dns", &dns.to_string()])
            .arg("--resolv-conf")
            .arg(&resolv)
            .args(&args.agent_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        prepare(&mut agent, Some(&node.netns))?;
        let pid = agent.spawn().with_context(|| format!("starting the agent of {}", node.name))?.id();
        state.nodes.last_mut().expect("pushed").pid = Some(pid);
        state.save(dir)?;
    }

    let kubeconfig = server_dir.join("admin.kubeconfig");
    let client = crate::components::kube_client(&kubeconfig).await?;
    let nodes = wait_ready(&client, state, Duration::from_secs(args.timeout)).await?;
    // This machine reaches the pods too (as a node would), e.g. for curl to a pod IP.
    for node in &nodes {
        let (Some(cidr), Some(ip)) = (node.spec.as_ref().and_then(|s| s.pod_cidr.clone()), internal_ip(node)) else {
            continue;
        };
        sh("ip", &["route", "replace", &cidr, "via", &ip, "proto", krate_net::routes::DEV_ROUTE_PROTOCOL])?;
        state.routes.push(cidr);
    }
    state.save(dir)?;
    let name = &args.name;
    println!(
        "\nkrate dev cluster {name:?} is up: {} nodes, each in a network namespace (krate-{name}-1..{}) on bridge {}.",
        args.nodes, args.nodes, state.bridge
    );
    println!("Use it with kubectl:");
    println!("    export KUBECONFIG={}", kubeconfig.display());
    println!("    kubectl get nodes -o wide");
    println!("A shell on a node:    ip netns exec krate-{name}-1 bash");
    println!("Logs:                 {}/server.log, {}/node-N/agent.log", dir.display(), dir.display());
    println!("Remove it:            krate dev cluster down --name {name}");
    Ok(())
}

/// The node's namespace and its veth on the cluster's bridge.
fn node_link(bridge: &str, node: &NodeState, prefix: u8, gateway: IpAddr) -> Result<()> {
    let ns = node.netns.as_str();
    if !Path::new("/run/netns").join(ns).exists() {
        sh("ip", &["netns", "add", ns])?;
    }
    let host_end = node.host_link(bridge);
    if sh("ip", &["link", "show", &host_end]).is_err() {
        sh("ip", &["link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
    }
    sh("ip", &["link", "set", &host_end, "master", bridge, "up"])?;
    let address = format!("{}/{prefix}", node.ip);
    let _ = sh("ip", &["-n", ns, "addr", "add", &address, "dev", "eth0"]);
    sh("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
    sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
    sh("ip", &["-n", ns, "route", "replace", "default", "via", &gateway.to_string()])?;
    Ok(())
}

/// `--server`, `--token` and `--ca-cert-hash` of the join command the server printed.
async fn join_command(log: &Path, pid: Option<u32>) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.trim_start().starts_with("krate agent --server")) {
            return Ok(line.split_whitespace().skip(2).map(String::from).collect());
        }
        if !pid.is_some_and(alive) {
            bail!("krate server stopped; see {}:\n{}", log.display(), tail(&text, 20));
        }
        if Instant::now() > deadline {
            bail!("krate server printed no join command within 60 s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn internal_ip(node: &Node) -> Option<String> {
    let addresses = node.status.as_ref()?.addresses.as_ref()?;
    addresses.iter().find(|a| a.type_ == "InternalIP").map(|a| a.address.clone())
}

/// Waits until every node of the cluster is Ready, printing progress.
async fn wait_ready(client: &kube::Client, state: &State, timeout: Duration) -> Result<Vec<Node>> {
    let api = kube::Api::<Node>::all(client.clone());
    let deadline = Instant::now() + timeout;
    let mut last = usize::MAX;
    loop {
        let nodes = api.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
        let ready = |n: &Node| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                && n.spec.as_ref().is_some_and(|s| s.pod_cidr.is_some())
        };
        let count = state
            .nodes
            .iter()
            .filter(|s| nodes.iter().any(|n| n.metadata.name.as_ref() == Some(&s.name) && ready(n)))
            .count();
        if count != last {
            println!("    {count}/{} nodes Ready", state.nodes.len());
            last = count;
        }
        if count == state.nodes.len() {
            return Ok(nodes);
        }
        for node in &state.nodes {
            if !node.pid.is_some_and(alive) {
                let log = node.dir.join("agent.log");
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("the agent of {} stopped; see {}:\n{}", node.name, log.display(), tail(&text, 20));
            }
        }
        if Instant::now() > deadline {
            bail!("not every node was Ready within {timeout:?}; see the agents' logs under the cluster's directory");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn down(dir: &Path) -> Result<()> {
    let Some(state) = State::load(dir)? else {
        bail!("no cluster at {} (no cluster.json)", dir.display());
    };
    stop_and_remove(&state)?;
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Stops the agents and the server, resets every node inside its namespace, and removes
/// the namespaces, the bridge and this machine's routes.
fn stop_and_remove(state: &State) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut problems = Vec::new();
    for node in &state.nodes {
        if let Some(pid) = node.pid {
            stop(pid, Duration::from_secs(15));
        }
    }
    for node in &state.nodes {
        if Path::new("/run/netns").join(&node.netns).exists() && node.dir.exists() {
            let mut reset = Command::new(&exe);
            reset.arg("reset").arg("--data-dir").arg(&node.dir).stdout(Stdio::null());
            prepare(&mut reset, Some(&node.netns))?;
            match reset.output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    problems.push(format!("resetting {}: {}", node.name, String::from_utf8_lossy(&out.stderr).trim()))
                }
                Err(e) => problems.push(format!("resetting {}: {e}", node.name)),
            }
        }
        // Deleting the host's end takes the pair down at once (a namespace's own links go
        // only when its last user has).
        let host_end = node.host_link(&state.bridge);
        if sh("ip", &["link", "show", &host_end]).is_ok() {
            let _ = sh("ip", &["link", "del", &host_end]);
        }
        if Path::new("/run/netns").join(&node.netns).exists() {
            if let Err(e) = sh("ip", &["netns", "del", &node.netns]) {
                problems.push(e.to_string());
            }
        }
    }
    if let Some(pid) = state.server_pid {
        stop(pid, Duration::from_secs(15));
    }
    for route in &state.routes {
        // Clusters made before the dev routes had a protocol of their own used krate's.
        for protocol in [krate_net::routes::DEV_ROUTE_PROTOCOL, krate_net::routes::ROUTE_PROTOCOL] {
            let _ = sh("ip", &["route", "del", route, "proto", protocol]);
        }
    }
    if !state.bridge.is_empty() && sh("ip", &["link", "show", &state.bridge]).is_ok() {
        if let Err(e) = sh("ip", &["link", "del", &state.bridge]) {
            problems.push(e.to_string());
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

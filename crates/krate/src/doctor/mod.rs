//! `krate doctor`: the seeds' "simple test that can verify whether your cluster is
//! healthy or diagnose why it isn't". Each check says what it found and, when it fails,
//! what to do. Run on a server's machine: it reads the data directory (certificates,
//! store) and this machine's kernel and runtime, and asks the API about the nodes.
//!
//! A failed check (✗) makes the exit code 1; a warning (!) does not. The live probe
//! (`probe.rs`) runs pods to check the network as pods see it.

mod probe;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The server's data directory.
    #[arg(long, default_value = crate::server::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The kubeconfig to reach the API with (default: the data directory's admin one).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// `json`: the checks as a JSON document.
    #[arg(long, short = 'o', value_parser = ["json"])]
    pub output: Option<String>,
    /// Leave out the live probe (a pod on every node reaching the others, a Service's
    /// cluster IP and its DNS name, and telling its node's time).
    #[arg(long)]
    pub no_probe: bool,
    /// The cluster's DNS domain, for the live probe's DNS check.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    Ok,
    Warning,
    Failed,
}

#[derive(Debug, Serialize)]
struct Check {
    name: String,
    outcome: Outcome,
    detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    fix: String,
}

fn check(name: impl Into<String>, outcome: Outcome, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name: name.into(), outcome, detail: detail.into(), fix: fix.into() }
}

pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let mut checks = Vec::new();
    let kubeconfig = args.kubeconfig.clone().unwrap_or_else(|| args.data_dir.join("admin.kubeconfig"));
    let client = api_check(&kubeconfig, &mut checks).await;
    certificate_checks(&args.data_dir.join("pki"), &mut checks);
    match crate::etcd::Datastore::load(&args.data_dir) {
        Ok(Some(datastore)) => etcd_checks(&datastore, &args.data_dir.join("db"), &mut checks).await,
        Ok(None) => store_checks(&args.data_dir.join("db"), &mut checks),
        Err(e) => {
            checks.push(check("store", Outcome::Failed, format!("{e:#}"), "restart krate server, which rewrites it"))
        }
    }
    if let Some(client) = client {
        node_checks(client.clone(), &mut checks).await;
        if !args.no_probe {
            probe::probe_checks(client, &args.cluster_domain, &mut checks).await;
        }
    }
    machine_checks(&mut checks);
    let failed = checks.iter().filter(|c| c.outcome == Outcome::Failed).count();
    if args.output.as_deref() == Some("json") {
        let doc = serde_json::json!({"healthy": failed == 0, "checks": checks});
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let width = checks.iter().map(|c| c.name.chars().count()).max().unwrap_or(0);
        for c in &checks {
            let mark = match c.outcome {
                Outcome::Ok => "✓",
                Outcome::Warning => "!",
                Outcome::Failed => "✗",
            };
            println!("{mark} {:width$}  {}", c.name, c.detail);
            if !c.fix.is_empty() {
                println!("  {:width$}  what to do: {}", "", c.fix);
            }
        }
        let warnings = checks.iter().filter(|c| c.outcome == Outcome::Warning).count();
        println!("{} checks: {failed} failed, {warnings} warnings", checks.len());
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Whether the API answers `/readyz`; the client to ask it more with.
async fn api_check(kubeconfig: &Path, checks: &mut Vec<Check>) -> Option<kube::Client> {
    let name = "API server";
    let client =
        match crate::components::kube_client(kubeconfig).await {
            Ok(client) => client,
            Err(e) => {
                checks.push(check(name, Outcome::Failed, format!("no client from {}: {e:#}", kubeconfig.display()),
                "point --kubeconfig (or --data-dir) at the cluster's admin kubeconfig; `krate kubeconfig` prints it"));
                return None;
            }
        };
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        let version = client.apiserver_version().await?;
        let request = http::Request::get("/readyz").body(Vec::new()).expect("a request");
        let text = client.request_text(request).await?;
        Ok::<_, kube::Error>((version, text))
    })
    .await;
    match ready {
        Ok(Ok((version, text))) if text.trim() == "ok" => {
            checks.push(check(name, Outcome::Ok, format!("ready, {}", version.git_version), ""));
            Some(client)
        }
        Ok(Ok((_, text))) => {
            checks.push(check(name, Outcome::Failed, format!("not ready: {}", text.trim()),
                "see the server's log (journalctl -u krate, or its terminal); `kubectl get --raw '/readyz?verbose'` names the failing part"));
            Some(client)
        }
        Ok(Err(e)) => {
            checks.push(check(
                name,
                Outcome::Failed,
                format!("unreachable: {e}"),
                "start it (krate server), or check that the kubeconfig's server address and port are this cluster's",
            ));
            None
        }
        Err(_) => {
            checks.push(check(
                name,
                Outcome::Failed,
                "no answer within 10 s",
                "the server is overloaded or stuck: see its log",
            ));
            None
        }
    }
}

/// How long each certificate in `pki` is valid.
fn certificate_checks(pki: &Path, checks: &mut Vec<Check>) {
    let Ok(entries) = std::fs::read_dir(pki) else {
        checks.push(check(
            "certificates",
            Outcome::Warning,
            format!("no {} here", pki.display()),
            "run doctor on a server's machine, with its --data-dir",
        ));
        return;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    files.sort();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    for file in files {
        let name = format!("certificate {}", file.file_name().unwrap_or_default().to_string_lossy());
        let pem = std::fs::read_to_string(&file).unwrap_or_default();
        let Some(der) = krate_client::bootstrap::pem_certificates(&pem).into_iter().next() else {
            checks.push(check(
                name,
                Outcome::Failed,
                "holds no PEM certificate",
                "restore it from a backup (krate restore)",
            ));
            continue;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
            checks.push(check(name, Outcome::Failed, "not a readable certificate", "restore it from a backup"));
            continue;
        };
        let until = cert.validity().not_after;
        let days = (until.timestamp() - now) / 86_400;
        let detail = format!("valid until {} ({days} days)", until.to_datetime().date());
        let (outcome, fix) = match days {
            d if d < 0 => (Outcome::Failed, "expired: renew it (remove it and restart krate server, which issues serving and client certificates anew; a CA must be replaced by hand)"),
            d if d < 30 => (Outcome::Warning, "expires within 30 days: renew it before then (remove it and restart krate server)"),
            _ => (Outcome::Ok, ""),
        };
        checks.push(check(name, outcome, detail, fix));
    }
}

/// The etcd cluster: reachable, with a leader, its members, size and revision; and the
/// fsync latency of the managed member's disk.
async fn etcd_checks(datastore: &crate::etcd::Datastore, db_dir: &Path, checks: &mut Vec<Check>) {
    let endpoints = datastore.endpoints.join(",");
    let status = match datastore.connect().await {
        Ok(store) => store.status().await.map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    match status {
        Ok(status) if status.leader == 0 => checks.push(check(
            "store",
            Outcome::Failed,
            format!("etcd at {endpoints} has no leader"),
            "a majority of the etcd members must be up and reach each other: start the stopped servers",
        )),
        Ok(status) => {
            let leader = status.members.iter().find(|m| m.id == status.leader).map_or("?", |m| m.name.as_str());
            let learners = status.members.iter().filter(|m| m.learner).count();
            let members = match learners {
                0 => format!("{} members", status.members.len()),
                n => format!("{} members ({n} learning)", status.members.len()),
            };
            checks.push(check(
                "store",
                Outcome::Ok,
                format!(
                    "etcd {}: {members}, leader {leader}, {} objects at revision {}, {:.1} MB",
                    status.version,
                    status.objects,
                    status.revision,
                    status.db_size as f64 / 1e6
                ),
                "",
            ));
        }
        Err(e) => checks.push(check(
            "store",
            Outcome::Failed,
            format!("{e:#}"),
            "start etcd (or the server that runs it, with its data directory), or fix --datastore-endpoint",
        )),
    }
    if datastore.managed {
        fsync_check(db_dir, checks);
    }
}

/// The store's size, format and revision, and how long an fsync takes on its disk.
fn store_checks(db_dir: &Path, checks: &mut Vec<Check>) {
    let db = db_dir.join("state.db");
    let name = "store";
    match krate_store::sqlite::inspect(&db) {
        Ok(snapshot) => {
            let size = ["", "-wal"]
                .iter()
                .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", db.display())).ok())
                .map(|m| m.len())
                .sum::<u64>();
            checks.push(check(
                name,
                Outcome::Ok,
                format!(
                    "{} objects at revision {}, {:.1} MB, format {}",
                    snapshot.keys,
                    snapshot.revision,
                    size as f64 / 1e6,
                    snapshot.format
                ),
                "",
            ));
        }
        Err(e) => checks.push(check(
            name,
            Outcome::Failed,
            format!("{}: {e}", db.display()),
            "run doctor with the server's --data-dir; a damaged store is restored from a backup (krate restore)",
        )),
    }
    fsync_check(db_dir, checks);
}

/// How long an fsync takes where the store writes.
fn fsync_check(db_dir: &Path, checks: &mut Vec<Check>) {
    match fsync_latency(db_dir) {
        Ok(latency) => {
            let ms = latency.as_secs_f64() * 1000.0;
            let (outcome, fix) = if ms > 100.0 {
                (
                    Outcome::Warning,
                    "writes wait for this on every commit: put the data directory on a faster disk (SSD)",
                )
            } else {
                (Outcome::Ok, "")
            };
            checks.push(check("store fsync", outcome, format!("{ms:.1} ms (median of 5 writes)"), fix));
        }
        Err(e) => checks.push(check(
            "store fsync",
            Outcome::Failed,
            format!("writing in {}: {e}", db_dir.display()),
            "the data directory must be writable: check its filesystem and free space",
        )),
    }
}

fn fsync_latency(dir: &Path) -> std::io::Result<Duration> {
    use std::io::Write;
    let path = dir.join(".doctor-fsync");
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&[0u8; 4096])?;
        file.sync_all()?;
        times.push(started.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    times.sort();
    Ok(times[2])
}

/// How long a node's Lease may go unrenewed (the default of the server's
/// --node-monitor-grace-period-seconds).
const LEASE_GRACE_SECONDS: i64 = 40;

/// Every node Ready, or why not.
async fn node_checks(client: kube::Client, checks: &mut Vec<Check>) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let list = match nodes.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => {
            checks.push(check(
                "nodes",
                Outcome::Failed,
                format!("listing nodes: {e}"),
                "check the kubeconfig's permissions",
            ));
            return;
        }
    };
    if list.is_empty() {
        checks.push(check(
            "nodes",
            Outcome::Warning,
            "none registered: pods cannot run",
            "start krate server without --disable-agent, or join a node: krate token create --print-join-command",
        ));
        return;
    }
    let now = jiff::Timestamp::now();
    for node in list {
        let name = node.metadata.name.clone().unwrap_or_default();
        let conditions = node.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
        let ready = conditions.iter().find(|c| c.type_ == "Ready");
        let pressure: Vec<String> = conditions
            .iter()
            .filter(|c| c.type_.ends_with("Pressure") && c.status == "True")
            .map(|c| c.type_.clone())
            .collect();
        let lease_age = leases
            .get_opt(&name)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.renew_time)
            .and_then(|t| t.0.to_string().parse::<jiff::Timestamp>().ok())
            .map(|t| now.duration_since(t).as_secs());
        let age = lease_age.map_or("no lease".to_string(), |s| format!("lease renewed {s}s ago"));
        let label = format!("node {name}");
        let agent_fix = format!("check the agent on {name} (its log; `krate agent` running, containerd up, the node reaching the API server)");
        match ready {
            // Ready as last reported, but the agent stopped renewing its Lease: the node
            // lifecycle controller marks it Unknown once the grace period is over.
            Some(c) if c.status == "True" && lease_age.is_none_or(|s| s > LEASE_GRACE_SECONDS) => checks.push(check(
                label,
                Outcome::Failed,
                format!("Ready when it last reported, but {age} (more than {LEASE_GRACE_SECONDS}s: the agent stopped renewing it)"),
                agent_fix,
            )),
            Some(c) if c.status == "True" && pressure.is_empty() => {
                checks.push(check(label, Outcome::Ok, format!("Ready, {age}"), ""))
            }
            Some(c) if c.status == "True" => checks.push(check(
                label,
                Outcome::Warning,
                format!("Ready under {}, {age}", pressure.join(", ")),
                "free disk or memory on the node; pods are being evicted and new ones refused",
            )),
            other => {
                let why = other
                    .map(|c| {
                        format!(
                            "{} {}: {}",
                            c.status,
                            c.reason.clone().unwrap_or_default(),
                            c.message.clone().unwrap_or_default()
                        )
                    })
                    .unwrap_or_else(|| "no Ready condition reported yet".into());
                let fix = if why.contains("container runtime is down") {
                    format!("containerd on {name} does not answer: start it again (the agent restarts a containerd that exits; a hung one must be killed), and see its log (the agent's containerd/containerd.log)")
                } else {
                    agent_fix
                };
                checks.push(check(label, Outcome::Failed, format!("not Ready ({why}), {age}"), fix));
            }
        }
    }
}

/// What this machine needs to run pods.
fn machine_checks(checks: &mut Vec<Check>) {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    // cgroup v2 (unified), or v1 with the controllers pods are limited by.
    let v1: Vec<&str> =
        ["cpu", "memory", "pids"].into_iter().filter(|c| Path::new("/sys/fs/cgroup").join(c).is_dir()).collect();
    checks.push(match read("/sys/fs/cgroup/cgroup.controllers") {
        Ok(controllers) => check("cgroups", Outcome::Ok, format!("v2: {controllers}"), ""),
        Err(_) if v1.len() == 3 => check("cgroups", Outcome::Ok, format!("v1: {}", v1.join(" ")), ""),
        Err(_) => check(
            "cgroups",
            Outcome::Failed,
            "neither cgroup v2 nor the v1 cpu, memory and pids controllers under /sys/fs/cgroup",
            "boot with cgroups enabled (systemd mounts them; cgroup v2: systemd.unified_cgroup_hierarchy=1)",
        ),
    });
    checks.push(match read("/proc/sys/net/ipv4/ip_forward").as_deref() {
        Ok("1") => check("IP forwarding", Outcome::Ok, "on", ""),
        _ => check(
            "IP forwarding",
            Outcome::Warning,
            "off (krate's agent turns it on when it starts)",
            "sysctl -w net.ipv4.ip_forward=1, or start the agent",
        ),
    });
    checks.push(match read("/proc/sys/net/bridge/bridge-nf-call-iptables").as_deref() {
        Ok("1") => check("bridge netfilter", Outcome::Ok, "on", ""),
        _ => check(
            "bridge netfilter",
            Outcome::Warning,
            "off or br_netfilter not loaded (the agent loads and turns it on)",
            "modprobe br_netfilter; sysctl -w net.bridge.bridge-nf-call-iptables=1, or start the agent",
        ),
    });
    for (tool, args, package) in
        [("nft", "--version", "nftables"), ("containerd", "--version", "containerd"), ("runc", "--version", "runc")]
    {
        let found = std::process::Command::new(tool).arg(args).output();
        checks.push(match found {
            Ok(out) if out.status.success() => {
                let first = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string();
                check(tool, Outcome::Ok, first, "")
            }
            _ => check(tool, Outcome::Failed, "not found", format!("apt-get install -y {package}")),
        });
    }
}

//! Several krate servers on one etcd cluster: every server serves the same objects and
//! watches, the `kubernetes` Service lists exactly the live servers, and when one server
//! is killed mid-stream of writes the writes go on through another with nothing
//! acknowledged lost.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::backup::{backup_under_writes, check_restored, config_map};
use common::linearizability::{linearizable, Kind, Op, Outcome};
use common::netns::Lan;
use common::node::Agent;
use common::registry::TestRegistry;
use common::{client_for, eventually, free_port, TestServer};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Node, Pod};
use krate_store::etcd::process::{EtcdProcess, MemberConfig};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

/// A one-member etcd in its own directory (dropped last: bind it first).
async fn etcd() -> (tempfile::TempDir, EtcdProcess) {
    let dir = tempfile::tempdir().unwrap();
    let member = MemberConfig::single("etcd-0", &dir.path().join("member"), free_port(), free_port());
    let process = EtcdProcess::start(member, Duration::from_secs(30)).await.expect("etcd starts (Debian etcd-server)");
    (dir, process)
}

/// Servers of one cluster: the first creates the cluster's keys (CA, service-account key,
/// encryption configuration); the others start with a copy of them, as a joining server
/// must hold them.
fn servers(etcd: &EtcdProcess, count: usize) -> Vec<TestServer> {
    let endpoint = etcd.config.client_url.clone();
    let port = free_port();
    let args = ["--datastore-endpoint", endpoint.as_str()];
    let first = TestServer::start_bound("127.0.0.2", port, &args, |_| ());
    let mut all = vec![first];
    for i in 1..count {
        let pki = all[0].data_dir().join("pki");
        let host = format!("127.0.0.{}", i + 2);
        all.push(TestServer::start_bound(&host, port, &args, |dir| copy_dir(&pki, &dir.join("pki"))));
    }
    all
}

#[tokio::test]
async fn a_server_more_than_one_minor_version_from_a_live_one_refuses_to_start() {
    let (_dir, etcd) = etcd().await;
    let running = servers(&etcd, 1).remove(0);
    // A live server of krate v9.9: its identity Lease, renewed now.
    let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.000000Z").to_string();
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "apiserver-far", "namespace": "kube-system",
            "labels": {"apiserver.kubernetes.io/identity": "kube-apiserver", "krate.dev/version": "v9.9"},
            "annotations": {"krate.dev/advertise-address": "127.0.0.99:6443"}},
        "spec": {"holderIdentity": "apiserver-far", "leaseDurationSeconds": 3600, "renewTime": now}});
    let leases: Api<Lease> = Api::namespaced(running.client().await, "kube-system");
    leases.create(&PostParams::default(), &serde_json::from_value(lease).unwrap()).await.unwrap();
    let own: Lease = leases
        .list(&ListParams::default().labels("apiserver.kubernetes.io/identity"))
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|l| l.metadata.name.as_deref() != Some("apiserver-far"))
        .expect("the running server's identity Lease");
    let version = own.metadata.labels.unwrap_or_default().get("krate.dev/version").cloned().unwrap_or_default();
    assert!(version.starts_with('v'), "a server's Lease carries its krate version: {version:?}");

    let endpoint = etcd.config.client_url.clone();
    let pki = running.data_dir().join("pki");
    let args = ["--datastore-endpoint", endpoint.as_str()];
    let log = TestServer::refused_bound("127.0.0.3", free_port(), &args, |dir| copy_dir(&pki, &dir.join("pki")));
    assert!(
        log.contains("the server at 127.0.0.99:6443 runs krate v9.9") && log.contains("within 1 minor version"),
        "{log}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn krate(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_krate")).args(args).output().expect("run krate")
}

async fn endpoint_ips(client: &kube::Client) -> Vec<String> {
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    let Ok(found) = endpoints.get("kubernetes").await else { return Vec::new() };
    let mut ips: Vec<String> = found
        .subsets
        .unwrap_or_default()
        .iter()
        .flat_map(|s| s.addresses.clone().unwrap_or_default())
        .map(|a| a.ip)
        .collect();
    ips.sort();
    ips
}

#[tokio::test]
async fn servers_on_one_etcd_serve_the_same_objects_and_watches() {
    let (_dir, etcd) = etcd().await;
    let servers = servers(&etcd, 2);
    let (a, b) = (servers[0].client().await, servers[1].client().await);
    let on_a: Api<ConfigMap> = Api::namespaced(a, "default");
    let on_b: Api<ConfigMap> = Api::namespaced(b, "default");

    let start = on_b.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    let mut watch = on_b.watch(&WatchParams::default().timeout(30), &start).await.unwrap().boxed();
    let created = on_a.create(&PostParams::default(), &config_map("shared", "1")).await.unwrap();
    let seen = on_b.get("shared").await.unwrap();
    assert_eq!(seen.metadata.uid, created.metadata.uid);
    assert_eq!(seen.metadata.resource_version, created.metadata.resource_version, "resourceVersions are etcd's");
    let added = loop {
        match watch.try_next().await.unwrap().expect("the watch on b ended") {
            WatchEvent::Added(cm) if cm.metadata.name.as_deref() == Some("shared") => break cm,
            _ => continue,
        }
    };
    assert_eq!(added.metadata.resource_version, created.metadata.resource_version);

    // An update through b moves the object on; a's stale copy is a conflict.
    let mut newer = seen.clone();
    newer.data = Some([("v".to_string(), "2".to_string())].into());
    on_b.replace("shared", &PostParams::default(), &newer).await.unwrap();
    let mut stale = created.clone();
    stale.data = Some([("v".to_string(), "3".to_string())].into());
    let err = on_a.replace("shared", &PostParams::default(), &stale).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409), "{err:?}");
}

#[tokio::test]
async fn the_kubernetes_service_lists_exactly_the_live_servers() {
    let (_dir, etcd) = etcd().await;
    let mut servers = servers(&etcd, 2);
    let a = servers[0].client().await;
    eventually(40, "both servers in the kubernetes endpoints", || async {
        (endpoint_ips(&a).await == ["127.0.0.2", "127.0.0.3"]).then_some(())
    })
    .await;
    let leases =
        servers[0].kubectl_ok(&["get", "leases", "-n", "kube-system", "-l", "apiserver.kubernetes.io/identity"]);
    assert_eq!(leases.lines().count(), 3, "one identity Lease per server:\n{leases}");
    servers[1].kill();
    eventually(60, "the killed server to leave the kubernetes endpoints", || async {
        (endpoint_ips(&a).await == ["127.0.0.2"]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn killing_the_first_server_mid_writes_loses_nothing_and_writes_go_on_through_another() {
    // Three machines; the first runs the etcd leader (the member that formed the cluster).
    let lan = Lan::new(3);
    let mut servers = three_machines(&lan, free_port()).await;
    let kubeconfigs = [servers[0].kubeconfig(), servers[1].kubeconfig()];
    let acknowledged: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let failed_over: Arc<Mutex<Option<Instant>>> = Arc::default();
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let (acknowledged, failed_over, kubeconfigs) = (acknowledged.clone(), failed_over.clone(), kubeconfigs.clone());
        writers.push(tokio::spawn(async move {
            // Each writer goes through server a until a write fails, then through b (a
            // client-side failover, as a client with both servers configured does).
            let mut target = 0;
            let mut cms: Api<ConfigMap> = Api::namespaced(client_for(&kubeconfigs[0]).await, "default");
            for i in 0..400 {
                let name = format!("w{w}-{i}");
                loop {
                    match cms.create(&PostParams::default(), &config_map(&name, "x")).await {
                        Ok(created) => {
                            let rv = created.metadata.resource_version.unwrap().parse().unwrap();
                            acknowledged.lock().unwrap().push((name.clone(), rv));
                            if target == 1 {
                                failed_over.lock().unwrap().get_or_insert_with(Instant::now);
                            }
                            break;
                        }
                        // The write may or may not have landed: a retry may find it.
                        Err(kube::Error::Api(s)) if s.code == 409 => break,
                        Err(_) if target == 0 => {
                            target = 1;
                            cms = Api::namespaced(client_for(&kubeconfigs[1]).await, "default");
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        }));
    }
    eventually(30, "writes to be flowing", || async { (acknowledged.lock().unwrap().len() > 100).then_some(()) }).await;
    servers[0].kill();
    *killed_at.lock().unwrap() = Some(Instant::now());
    for w in writers {
        tokio::time::timeout(Duration::from_secs(120), w).await.expect("writers finish").unwrap();
    }
    let pause =
        failed_over.lock().unwrap().zip(*killed_at.lock().unwrap()).map(|(f, k)| f.saturating_duration_since(k));
    eprintln!("writes resumed through the second server {pause:?} after the kill");
    assert!(pause.is_some(), "no write went through the second server");

    let cms: Api<ConfigMap> = Api::namespaced(servers[1].client().await, "default");
    let stored = cms.list(&ListParams::default()).await.unwrap();
    let names: HashSet<String> = stored.items.iter().filter_map(|c| c.metadata.name.clone()).collect();
    let acknowledged = acknowledged.lock().unwrap().clone();
    for (name, _) in &acknowledged {
        assert!(names.contains(name), "acknowledged write {name} was lost");
    }
    assert_eq!(names.iter().filter(|n| n.starts_with('w')).count(), 1600, "every writer finished its 400 writes");

    // The killed server comes back on the same etcd and serves the same state, with
    // revisions past every acknowledged one.
    servers[0].restart();
    let again: Api<ConfigMap> = Api::namespaced(servers[0].client().await, "default");
    let relisted = again.list(&ListParams::default()).await.unwrap();
    assert_eq!(relisted.items.len(), stored.items.len());
    let max_acked = acknowledged.iter().map(|(_, rv)| *rv).max().unwrap();
    let rv: i64 = again
        .create(&PostParams::default(), &config_map("after", "x"))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv > max_acked, "revision {rv} after the restart must exceed {max_acked}");
}

#[tokio::test]
async fn cluster_init_runs_an_etcd_member_that_stops_with_the_server_and_comes_back_with_it() {
    let (client_port, peer_port) = (free_port().to_string(), free_port().to_string());
    let ports = ["--etcd-client-port", client_port.as_str(), "--etcd-peer-port", peer_port.as_str()];
    let mut args = vec!["--cluster-init"];
    args.extend(ports);
    let mut server = TestServer::start_with(&args);
    let member_answers = || std::net::TcpStream::connect(("127.0.0.1", client_port.parse::<u16>().unwrap())).is_ok();
    assert!(member_answers(), "the member listens on its client port");
    assert!(server.data_dir().join("db/etcd/member").is_dir(), "the member's data is in the data directory");
    assert!(!server.data_dir().join("db/state.db").exists(), "no SQLite database beside it");
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    cms.create(&PostParams::default(), &config_map("kept", "1")).await.unwrap();

    // The doctor and backups find the member through the data directory.
    let data_dir = server.data_dir().display().to_string();
    let doctor = krate(&["doctor", "--no-probe", "-o", "json", "--data-dir", &data_dir]);
    let doc: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let store = doc["checks"].as_array().unwrap().iter().find(|c| c["name"] == "store").unwrap().clone();
    assert_eq!(store["outcome"], "ok", "{store}");
    let detail = store["detail"].as_str().unwrap();
    assert!(detail.starts_with("etcd 3.") && detail.contains("1 members, leader krate-127-0-0-1"), "{detail}");
    let file = server.dir.path().join("backup.tar.gz").display().to_string();
    let backup = krate(&["backup", &file, "--data-dir", &data_dir]);
    assert!(backup.status.success(), "{}", String::from_utf8_lossy(&backup.stderr));
    let listing = std::process::Command::new("tar").args(["tzf", &file]).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("db/etcd.snapshot") && listing.contains("pki/ca.key"), "{listing}");

    server.kill();
    eventually(10, "the member to stop with its server", || async { (!member_answers()).then_some(()) }).await;

    // Without --cluster-init: the data directory says it runs a member.
    server.restart_with(&ports);
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    assert_eq!(cms.get("kept").await.unwrap().data.unwrap()["v"], "1");
}

#[tokio::test]
async fn an_etcd_backup_of_10000_objects_under_writes_restores_as_a_new_member_and_resource_versions_go_on() {
    let ports = etcd_ports();
    let mut args = vec!["--cluster-init"];
    args.extend(strs(&ports));
    let mut server = TestServer::start_with(&args);
    let dir = tempfile::tempdir().unwrap();
    let taken = backup_under_writes(&server, 10_000, &dir.path().join("backup.tar.gz")).await;
    server.kill();

    let new_ports = etcd_ports();
    let restored = TestServer::start_prepared(&strs(&new_ports), |dir| {
        let dir = dir.display().to_string();
        let file = taken.file.display().to_string();
        let peer = ["--advertise-address", "127.0.0.1", "--etcd-peer-port", new_ports[3].as_str()];
        let mut args = vec!["restore", file.as_str(), "--data-dir", dir.as_str()];
        args.extend(peer);
        let out = krate(&args);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
        assert!(said.contains("restored") && said.contains("start it with: krate server"), "{said}");
        assert!(std::path::Path::new(&dir).join("db/etcd/member").is_dir(), "an etcd member's data: {said}");
    });
    check_restored(&restored, &taken, 10_000).await;
}

/// `--etcd-client-port P --etcd-peer-port Q` on free ports (every member also listens on
/// loopback, so servers on one machine need their own).
fn etcd_ports() -> Vec<String> {
    let (client, peer) = (free_port().to_string(), free_port().to_string());
    vec!["--etcd-client-port".into(), client, "--etcd-peer-port".into(), peer]
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn three_servers_join_with_one_command_each_and_survive_the_first_ones_death() {
    let port = free_port();
    let mut first_args = vec!["--cluster-init".to_string()];
    first_args.extend(etcd_ports());
    let mut first = TestServer::start_bound("127.0.0.2", port, &strs(&first_args), |_| ());
    let join = printed_join(&first, "krate server").await;
    assert!(join.iter().any(|a| a == "--certificate-key"), "{join:?}");
    let mut others = Vec::new();
    for host in ["127.0.0.3", "127.0.0.4"] {
        let mut args = join.clone();
        args.extend(etcd_ports());
        others.push(TestServer::start_bound(host, port, &strs(&args), |_| ()));
    }
    // They hold the cluster's CA, so the first one's kubeconfig works on every server.
    let ca = std::fs::read(first.data_dir().join("pki/ca.crt")).unwrap();
    for other in &others {
        assert_eq!(std::fs::read(other.data_dir().join("pki/ca.crt")).unwrap(), ca);
    }
    let data_dir = first.data_dir().display().to_string();
    let doctor = krate(&["doctor", "--no-probe", "-o", "json", "--data-dir", &data_dir]);
    let doc: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let store = doc["checks"].as_array().unwrap().iter().find(|c| c["name"] == "store").unwrap().clone();
    assert!(store["detail"].as_str().unwrap().contains("3 members,"), "every member votes: {store}");

    let on_third: Api<ConfigMap> = Api::namespaced(others[1].client().await, "default");
    on_third.create(&PostParams::default(), &config_map("before", "1")).await.unwrap();
    let on_first: Api<ConfigMap> = Api::namespaced(first.client().await, "default");
    assert_eq!(on_first.get("before").await.unwrap().data.unwrap()["v"], "1");

    // The first server (and with it its etcd member) dies: the other two are a majority.
    first.kill();
    let on_second: Api<ConfigMap> = Api::namespaced(others[0].client().await, "default");
    let started = Instant::now();
    eventually(60, "a write through the second server", || async {
        on_second.create(&PostParams::default(), &config_map("after", "2")).await.ok()
    })
    .await;
    eprintln!("the first write after the kill took {:?}", started.elapsed());
    let second = others[0].client().await;
    eventually(60, "the dead server to leave the kubernetes endpoints", || async {
        (endpoint_ips(&second).await == ["127.0.0.3", "127.0.0.4"]).then_some(())
    })
    .await;

    // Back, without any join flag: its member rejoins and catches up.
    let mut again = vec!["--bind-address".to_string(), "127.0.0.2".to_string()];
    again.extend(first_args[1..].iter().cloned());
    first.restart_with(&strs(&again));
    let on_first: Api<ConfigMap> = Api::namespaced(first.client().await, "default");
    eventually(30, "the restarted server to see the write made without it", || async {
        on_first.get("after").await.ok()
    })
    .await;

    // The third server goes away for good: `krate reset` takes its member out of etcd.
    others[1].kill();
    let third = others[1].data_dir().display().to_string();
    let reset = krate(&["reset", "--data-dir", &third]);
    let said = String::from_utf8_lossy(&reset.stdout).into_owned();
    assert!(reset.status.success(), "{said}{}", String::from_utf8_lossy(&reset.stderr));
    assert!(said.contains("removed etcd member krate-127-0-0-4"), "{said}");
    assert!(!others[1].data_dir().join("db/etcd").exists());
    let doctor = krate(&["doctor", "--no-probe", "-o", "json", "--data-dir", &data_dir]);
    let doc: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let store = doc["checks"].as_array().unwrap().iter().find(|c| c["name"] == "store").unwrap().clone();
    assert!(store["detail"].as_str().unwrap().contains("2 members,"), "the member left: {store}");
}

/// The join command a server printed for `what` ("krate agent" or "krate server"), its
/// arguments after the command.
async fn printed_join(server: &TestServer, what: &str) -> Vec<String> {
    let line = eventually(60, &format!("the {what} join command"), || async {
        server.output().lines().find(|l| l.trim_start().starts_with(&format!("{what} --server"))).map(str::to_string)
    })
    .await;
    line.split_whitespace().skip(2).map(str::to_string).collect()
}

#[tokio::test]
async fn an_agent_moves_to_another_server_when_its_server_dies_and_its_pods_keep_running() {
    let registry = TestRegistry::start();
    let id = std::process::id() % 200;
    let port = free_port();
    let ranges = [
        "--cluster-cidr".to_string(),
        format!("10.247.{id}.0/24"),
        "--node-cidr-mask-size".into(),
        "26".into(),
        "--service-cidr".into(),
        format!("10.246.{id}.0/24"),
    ];
    let mut first_args = vec!["--cluster-init".to_string()];
    first_args.extend(etcd_ports());
    first_args.extend(ranges.iter().cloned());
    let mut first = TestServer::start_bound("127.0.0.2", port, &strs(&first_args), |_| ());
    // Three servers: etcd keeps a majority when one dies.
    let mut others = Vec::new();
    for host in ["127.0.0.3", "127.0.0.4"] {
        let mut args = printed_join(&first, "krate server").await;
        args.extend(etcd_ports());
        args.extend(ranges.iter().cloned());
        others.push(TestServer::start_bound(host, port, &strs(&args), |_| ()));
    }
    let second = &others[0];

    let dir = tempfile::tempdir().unwrap();
    let mut join = printed_join(&first, "krate agent").await;
    join.extend(["--node-name".into(), "ha-node".into(), "--insecure-registry".into(), registry.address.clone()]);
    let agent = Agent::start(dir.path(), 6, &strs(&join));
    let client = second.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    eventually(90, "the node Ready", || async {
        let node = nodes.get("ha-node").await.ok()?;
        let ready = node.status?.conditions?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(())
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "steady"}, "spec": {"containers": [{
        "name": "c", "image": registry.image("busybox"), "command": ["sleep", "3600"]}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let running = |pod: &Pod| {
        let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?.clone();
        status.state?.running.is_some().then(|| (status.container_id.clone(), status.restart_count))
    };
    let before = eventually(120, "the pod running", || async { running(&pods.get("steady").await.ok()?) }).await;
    // The agent learns both servers from the kubernetes endpoints.
    let servers_file = dir.path().join("agent/api-servers.json");
    eventually(60, "the agent to know every server", || async {
        let text = std::fs::read_to_string(&servers_file).ok()?;
        ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().all(|ip| text.contains(ip)).then_some(())
    })
    .await;

    first.kill();
    let killed = jiff::Timestamp::now();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renewed = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            let renewed = leases.get("ha-node").await.ok().and_then(|l| l.spec?.renew_time).map(|t| t.0);
            if renewed.is_some_and(|r| r.as_second() > killed.as_second() + 1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(
        renewed.is_ok(),
        "the node's Lease was not renewed through the other server; the agent's log:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("switched server"), "the agent's load balancer switched:\n{}", agent.log());
    let after = running(&pods.get("steady").await.unwrap()).expect("the pod still runs");
    assert_eq!(after, before, "same container, no restart");
    let node = nodes.get("ha-node").await.unwrap();
    let ready = node.status.unwrap().conditions.unwrap().into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "True", "{ready:?}");
}

/// Three servers, each alone in a network namespace (a machine), the first with
/// --cluster-init and the others joined with the command it printed.
async fn three_machines(lan: &Lan, port: u16) -> Vec<TestServer> {
    let first = TestServer::start_in(lan.ns(0), &lan.ip(0), port, &["--cluster-init"]);
    let join = printed_join(&first, "krate server").await;
    let mut servers = vec![first];
    for i in 1..3 {
        servers.push(TestServer::start_in(lan.ns(i), &lan.ip(i), port, &strs(&join)));
    }
    servers
}

#[tokio::test]
async fn a_partitioned_server_refuses_writes_while_the_majority_goes_on_and_it_converges_after() {
    let lan = Lan::new(3);
    let servers = three_machines(&lan, free_port()).await;
    let cut: Api<ConfigMap> = Api::namespaced(servers[0].client().await, "default");
    let majority: Api<ConfigMap> = Api::namespaced(servers[1].client().await, "default");
    cut.create(&PostParams::default(), &config_map("before", "1")).await.unwrap();

    lan.partition(0);
    let started = Instant::now();
    let refused =
        tokio::time::timeout(Duration::from_secs(60), cut.create(&PostParams::default(), &config_map("cut-off", "x")))
            .await
            .expect("the cut-off server answers (an error) within a minute");
    eprintln!("the cut-off server refused a write after {:?}: {refused:?}", started.elapsed());
    assert!(matches!(refused, Err(kube::Error::Api(ref s)) if s.code >= 500), "{refused:?}");
    eventually(60, "a write through the majority", || async {
        majority.create(&PostParams::default(), &config_map("during", "2")).await.ok()
    })
    .await;

    lan.heal(0);
    eventually(60, "the healed server to see the majority's write", || async { cut.get("during").await.ok() }).await;
    eventually(60, "a write through the healed server", || async {
        cut.create(&PostParams::default(), &config_map("after", "3")).await.ok()
    })
    .await;
    assert!(majority.get("cut-off").await.is_err(), "the refused write never landed");
}

fn cas(call: u64, ret: u64, from: &str, to: &str, outcome: Outcome) -> Op {
    Op { call, ret, kind: Kind::Cas { from: from.into(), to: to.into(), outcome } }
}

fn read(call: u64, ret: u64, value: &str) -> Op {
    Op { call, ret, kind: Kind::Read(value.into()) }
}

#[test]
fn the_checker_accepts_overlapping_operations_in_some_order_and_refuses_a_stale_read() {
    // a→b and a read of b overlap: fine in either order that works.
    assert!(linearizable("a", &[read(0, 10, "b"), cas(1, 9, "a", "b", Outcome::Ok)]));
    // A read of a after a→b had returned is stale.
    assert!(!linearizable("a", &[cas(0, 5, "a", "b", Outcome::Ok), read(6, 8, "a")]));
    // Two successful swaps from the same value cannot both have happened.
    assert!(!linearizable("a", &[cas(0, 5, "a", "b", Outcome::Ok), cas(6, 9, "a", "c", Outcome::Ok)]));
    // A conflict is right only if the value had moved on.
    assert!(!linearizable("a", &[cas(0, 5, "a", "b", Outcome::Conflict)]));
    assert!(linearizable("a", &[cas(0, 5, "a", "b", Outcome::Ok), cas(6, 9, "a", "c", Outcome::Conflict)]));
    // An unknown outcome may have happened later, or never.
    assert!(linearizable("a", &[cas(0, 1, "a", "b", Outcome::Unknown), read(50, 60, "b")]));
    assert!(linearizable("a", &[cas(0, 1, "a", "b", Outcome::Unknown), read(50, 60, "a")]));
    assert!(!linearizable("a", &[cas(0, 1, "a", "b", Outcome::Unknown), read(50, 60, "b"), read(70, 80, "a")]));
}

/// What concurrent clients did to one ConfigMap's value through every server.
#[derive(Default)]
struct Recorder {
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn micros(origin: Instant) -> u64 {
        origin.elapsed().as_micros() as u64
    }

    /// Reads, then swaps the value read for one of its own, until `stop`.
    async fn client(&self, api: Api<ConfigMap>, me: usize, origin: Instant, stop: Instant) {
        let mut i = 0;
        while Instant::now() < stop {
            let call = Self::micros(origin);
            let current = match tokio::time::timeout(Duration::from_secs(15), api.get("register")).await {
                Ok(Ok(cm)) => cm,
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let from = current.data.clone().unwrap_or_default().get("v").cloned().unwrap_or_default();
            self.ops.lock().unwrap().push(Op { call, ret: Self::micros(origin), kind: Kind::Read(from.clone()) });
            i += 1;
            let to = format!("c{me}-{i}");
            let mut next = current.clone();
            next.data = Some([("v".to_string(), to.clone())].into());
            let call = Self::micros(origin);
            let result =
                tokio::time::timeout(Duration::from_secs(15), api.replace("register", &PostParams::default(), &next))
                    .await;
            let outcome = match result {
                Ok(Ok(_)) => Outcome::Ok,
                Ok(Err(kube::Error::Api(s))) if s.code == 409 => Outcome::Conflict,
                _ => Outcome::Unknown,
            };
            let failed = outcome == Outcome::Unknown;
            self.ops.lock().unwrap().push(Op {
                call,
                ret: Self::micros(origin),
                kind: Kind::Cas { from, to, outcome },
            });
            // A pace that keeps the history to a few thousand operations.
            tokio::time::sleep(Duration::from_millis(if failed { 200 } else { 60 })).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_swaps_across_three_servers_through_a_partition_and_a_kill_are_linearizable() {
    let lan = Lan::new(3);
    let mut servers = three_machines(&lan, free_port()).await;
    let first: Api<ConfigMap> = Api::namespaced(servers[0].client().await, "default");
    first.create(&PostParams::default(), &config_map("register", "initial")).await.unwrap();
    let recorder = Arc::new(Recorder::default());
    let origin = Instant::now();
    let stop = origin + Duration::from_secs(40);
    let mut clients = Vec::new();
    for me in 0..6 {
        let api: Api<ConfigMap> = Api::namespaced(servers[me % 3].client().await, "default");
        let recorder = recorder.clone();
        clients.push(tokio::spawn(async move { recorder.client(api, me, origin, stop).await }));
    }
    // Seconds 5–15: the first server cut off; from second 25: the third one killed.
    tokio::time::sleep(Duration::from_secs(5)).await;
    lan.partition(0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    lan.heal(0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    servers[2].kill();
    for client in clients {
        client.await.unwrap();
    }
    let ops = recorder.ops.lock().unwrap().clone();
    let count = |f: &dyn Fn(&Op) -> bool| ops.iter().filter(|op| f(op)).count();
    let swapped = count(&|op| matches!(op.kind, Kind::Cas { outcome: Outcome::Ok, .. }));
    let conflicts = count(&|op| matches!(op.kind, Kind::Cas { outcome: Outcome::Conflict, .. }));
    let unknown = count(&|op| matches!(op.kind, Kind::Cas { outcome: Outcome::Unknown, .. }));
    let reads = count(&|op| matches!(op.kind, Kind::Read(_)));
    eprintln!("history: {reads} reads, {swapped} swaps, {conflicts} conflicts, {unknown} unknown outcomes");
    assert!(swapped > 50 && conflicts > 0, "the clients contended ({swapped} swaps, {conflicts} conflicts)");
    let started = Instant::now();
    assert!(linearizable("initial", &ops), "the history of {} operations is not linearizable", ops.len());
    eprintln!("checked in {:?}", started.elapsed());
}

#[tokio::test]
async fn a_sqlite_cluster_migrates_to_etcd_with_every_object_and_revisions_going_on() {
    let mut server = TestServer::start();
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let mut last = 0;
    for i in 0..20 {
        let created = cms.create(&PostParams::default(), &config_map(&format!("m{i}"), &i.to_string())).await.unwrap();
        last = created.metadata.resource_version.unwrap().parse::<i64>().unwrap();
    }
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kept"}, "stringData": {"k": "v"}});
    server.kubectl_stdin(&["apply", "-f", "-"], Some(&secret.to_string()));
    let data_dir = server.data_dir().display().to_string();
    let ports = etcd_ports();
    let mut args = vec!["datastore", "migrate", "--to", "etcd", "--data-dir", &data_dir];
    args.extend(strs(&ports));
    let refused = krate(&args);
    assert!(!refused.status.success(), "a running server's directory is refused");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("stop it first"));

    server.kill();
    let migrated = krate(&args);
    assert!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
    assert!(server.data_dir().join("db/state.db.migrated").exists());
    server.restart_with(&strs(&ports));
    assert!(server.log().contains("using etcd as the datastore"), "{}", server.log());
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let listed = cms.list(&ListParams::default()).await.unwrap();
    for i in 0..20 {
        let cm = listed.items.iter().find(|c| c.metadata.name.as_deref() == Some(&format!("m{i}"))).unwrap();
        assert_eq!(cm.data.as_ref().unwrap()["v"], i.to_string());
        let rv: i64 = cm.metadata.resource_version.as_ref().unwrap().parse().unwrap();
        assert!(rv > last, "resourceVersion {rv} went back (SQLite had {last})");
    }
    let secret = server.get_json(&["secret", "kept"]);
    assert_eq!(secret["data"]["k"], "dg==", "Secrets encrypted at rest read back");
}

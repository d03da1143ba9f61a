//! No acknowledged write is lost: when the server is killed with SIGKILL mid-stream of
//! writes (the page cache survives that), and when the machine loses power (the data
//! directory on `common::lazyfs`, which forgets every write not synced), under SQLite and
//! under etcd. The same power-loss test with fsync switched off loses writes: the test
//! can fail.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::lazyfs::LazyFs;
use common::{client_for, eventually, free_port, TestServer};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

/// Eight writers create ConfigMaps through the server until `stop` kills it; returns
/// the acknowledged ones (name, resourceVersion).
async fn writes_until(server: &mut TestServer, stop: impl FnOnce(&mut TestServer)) -> Vec<(String, i64)> {
    let kubeconfig = server.kubeconfig();
    let acknowledged: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let acknowledged = acknowledged.clone();
        let kubeconfig = kubeconfig.clone();
        writers.push(tokio::spawn(async move {
            let cms: Api<ConfigMap> = Api::namespaced(client_for(&kubeconfig).await, "default");
            for i in 0.. {
                let name = format!("w{w}-{i}");
                let cm: ConfigMap =
                    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"i": i.to_string()}})).unwrap();
                match cms.create(&PostParams::default(), &cm).await {
                    Ok(created) => {
                        let rv = created.metadata.resource_version.unwrap().parse().unwrap();
                        acknowledged.lock().unwrap().push((name, rv));
                    }
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop(server);
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() > 50, "the writers made progress before the end ({} writes)", acknowledged.len());
    acknowledged
}

/// The acknowledged writes the restarted server does not have.
async fn lost(server: &TestServer, acknowledged: &[(String, i64)]) -> Vec<String> {
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let stored = cms.list(&ListParams::default()).await.unwrap();
    let names: HashSet<String> = stored.items.iter().filter_map(|c| c.metadata.name.clone()).collect();
    acknowledged.iter().filter(|(name, _)| !names.contains(name)).map(|(name, _)| name.clone()).collect()
}

#[tokio::test]
async fn acknowledged_writes_survive_sigkill() {
    let mut server = TestServer::start();
    let acknowledged = writes_until(&mut server, TestServer::kill).await;
    server.restart();
    assert_eq!(lost(&server, &acknowledged).await, Vec::<String>::new(), "acknowledged writes were lost");
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let max_acked = acknowledged.iter().map(|(_, rv)| *rv).max().unwrap();
    let next: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "after-restart"}})).unwrap();
    let rv: i64 =
        cms.create(&PostParams::default(), &next).await.unwrap().metadata.resource_version.unwrap().parse().unwrap();
    assert!(rv > max_acked, "revision {rv} after restart must exceed {max_acked}");
    let list_rv: i64 =
        cms.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap().parse().unwrap();
    assert!(list_rv >= max_acked);
}

/// Writes through a server whose data directory is on a lazy file system (fsync
/// ignored under `lying_under`), cuts the power (after `stopped` says every process
/// writing there has gone), brings the machine back and returns what was acknowledged
/// and what of it was lost (all of it if the server does not come back), with the
/// unsynced bytes the power loss dropped.
async fn power_loss_lying(
    args: &[&str],
    envs: &[(&str, &str)],
    lying_under: Option<&Path>,
    stopped: impl Fn() -> bool,
) -> (usize, Vec<String>, usize) {
    let backing = tempfile::tempdir().unwrap();
    let mount = |data: &Path| LazyFs::mount_lying(backing.path(), data, lying_under);
    let (fs, mut server) = TestServer::start_mounted(args, envs, mount);
    let acknowledged = writes_until(&mut server, TestServer::kill).await;
    eventually(20, "every process on the file system to stop", || async { stopped().then_some(()) }).await;
    let dropped = fs.power_loss();
    let _fs = LazyFs::mount(backing.path(), &server.data_dir());
    let lost = match server.try_restart() {
        Ok(()) => lost(&server, &acknowledged).await,
        Err(log) => {
            eprintln!("the server did not come back after the power loss: {log}");
            acknowledged.iter().map(|(name, _)| name.clone()).collect()
        }
    };
    drop(server);
    (acknowledged.len(), lost, dropped)
}

async fn power_loss(args: &[&str], envs: &[(&str, &str)], stopped: impl Fn() -> bool) -> (usize, Vec<String>, usize) {
    power_loss_lying(args, envs, None, stopped).await
}

#[tokio::test]
async fn acknowledged_writes_survive_power_loss_on_sqlite() {
    let (acknowledged, lost, dropped) = power_loss(&[], &[], || true).await;
    eprintln!("{acknowledged} writes acknowledged; the power loss dropped {dropped} unsynced bytes");
    assert_eq!(lost, Vec::<String>::new(), "acknowledged writes were lost");
}

#[tokio::test]
async fn with_fsync_off_a_power_loss_loses_acknowledged_writes() {
    let off = [(krate_store::sqlite::UNSAFE_NO_FSYNC, "1")];
    let (acknowledged, lost, dropped) = power_loss(&[], &off, || true).await;
    eprintln!("{acknowledged} writes acknowledged, {} lost; {dropped} unsynced bytes dropped", lost.len());
    assert!(
        !lost.is_empty(),
        "without fsync, a power loss must lose acknowledged writes (or this test proves nothing)"
    );
}

/// A server on its own etcd member, on fresh ports; and whether that member has stopped
/// (it dies with its server, a moment later).
fn etcd_args() -> (Vec<String>, impl Fn() -> bool) {
    let (client, peer) = (free_port(), free_port());
    let args = ["--cluster-init", "--etcd-client-port", &client.to_string(), "--etcd-peer-port", &peer.to_string()]
        .map(String::from)
        .to_vec();
    (args, move || std::net::TcpStream::connect(("127.0.0.1", client)).is_err())
}

#[tokio::test]
async fn acknowledged_writes_survive_power_loss_on_etcd() {
    let (args, member_gone) = etcd_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (acknowledged, lost, dropped) = power_loss(&args, &[], member_gone).await;
    eprintln!("{acknowledged} writes acknowledged; the power loss dropped {dropped} unsynced bytes");
    assert_eq!(lost, Vec::<String>::new(), "acknowledged writes were lost");
}

/// Debian's etcd cannot switch its fsync off, so the disk lies instead: fsync under the
/// member's directory does nothing.
#[tokio::test]
async fn with_fsync_ignored_under_etcd_a_power_loss_loses_acknowledged_writes() {
    let (args, member_gone) = etcd_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lying = Path::new("db/etcd");
    let (acknowledged, lost, dropped) = power_loss_lying(&args, &[], Some(lying), member_gone).await;
    eprintln!("{acknowledged} writes acknowledged, {} lost; {dropped} unsynced bytes dropped", lost.len());
    assert!(
        !lost.is_empty(),
        "without fsync, a power loss must lose acknowledged writes (or this test proves nothing)"
    );
}

#[test]
fn the_lazy_file_system_keeps_synced_writes_and_forgets_the_rest() {
    use std::io::Write;
    let (backing, mount) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fs = LazyFs::mount(backing.path(), mount.path());
    let dir = mount.path().join("pki");
    std::fs::create_dir(&dir).unwrap();
    let mut synced = std::fs::File::create(dir.join("synced.tmp")).unwrap();
    synced.write_all(b"kept").unwrap();
    synced.sync_all().unwrap();
    std::fs::rename(dir.join("synced.tmp"), dir.join("synced")).unwrap();
    let mut unsynced = std::fs::File::create(dir.join("unsynced")).unwrap();
    unsynced.write_all(b"lost").unwrap();
    // Read back before the power loss: what was written, synced or not.
    assert_eq!(std::fs::read(dir.join("synced")).unwrap(), b"kept");
    assert_eq!(std::fs::read(dir.join("unsynced")).unwrap(), b"lost");
    drop((synced, unsynced));
    assert_eq!(fs.power_loss(), 4, "four unsynced bytes dropped");
    let _fs = LazyFs::mount(backing.path(), mount.path());
    assert_eq!(std::fs::read(dir.join("synced")).unwrap(), b"kept");
    assert_eq!(std::fs::read(dir.join("unsynced")).unwrap(), b"", "created, but its data never synced");
}

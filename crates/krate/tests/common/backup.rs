//! A backup taken while writes go on, and the checks a restore of it must pass: the
//! same scenario for a server on SQLite and one on etcd.
//!
//! The cluster is filled with many ConfigMaps first (the issue asks for 10,000); a writer
//! then creates one after another while `krate backup` runs, recording each name the
//! server acknowledged and when. Every write acknowledged before the backup started must
//! come back; none acknowledged after it finished may.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};

use super::TestServer;

/// What the old cluster acknowledged around its backup.
pub struct TakenUnderWrites {
    pub file: PathBuf,
    /// Acknowledged before `krate backup` started: every one must be restored.
    pub before: Vec<String>,
    /// Acknowledged after it finished: none may be.
    pub after: Vec<String>,
    /// The old cluster's resourceVersion once the writes stopped.
    pub last_revision: i64,
}

pub fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "data": {"v": value}})).unwrap()
}

/// Creates `count` ConfigMaps named `{prefix}-{i}`, 32 at a time; any failure fails the test.
pub async fn fill(cms: &Api<ConfigMap>, prefix: &str, count: usize) {
    let started = Instant::now();
    futures::stream::iter(0..count)
        .map(|i| {
            let cms = cms.clone();
            let name = format!("{prefix}-{i}");
            async move { cms.create(&PostParams::default(), &config_map(&name, "1")).await.map(|_| ()) }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .expect("filling the cluster");
    eprintln!("created {count} ConfigMaps in {:.1} s", started.elapsed().as_secs_f64());
}

/// Fills the server's default namespace with `objects` ConfigMaps, then takes a backup into
/// `file` with `krate backup` while a writer goes on creating more.
pub async fn backup_under_writes(server: &TestServer, objects: usize, file: &Path) -> TakenUnderWrites {
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    // Secrets are encrypted at rest: reading one back needs the restored keys.
    server.kubectl_ok(&["create", "secret", "generic", "token", "--from-literal=key=s3cret"]);
    fill(&cms, "bulk", objects).await;
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (cms, acked, stop) = (cms.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w-{i}");
                if cms.create(&PostParams::default(), &config_map(&name, "1")).await.is_ok() {
                    acked.lock().unwrap().push((name, Instant::now()));
                }
                i += 1;
            }
        })
    };
    super::eventually(30, "writes to be acknowledged", || async { (acked.lock().unwrap().len() >= 20).then_some(()) })
        .await;
    let file = file.to_path_buf();
    let args = [
        "backup".to_string(),
        file.display().to_string(),
        "--data-dir".into(),
        server.data_dir().display().to_string(),
    ];
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_krate")).args(&args).output().expect("run krate backup")
    })
    .await
    .unwrap();
    let finished = Instant::now();
    assert!(out.status.success(), "krate backup: {}", super::stderr(&out));
    eprintln!(
        "backup under writes: {:.2} s, {} bytes: {}",
        (finished - started).as_secs_f64(),
        std::fs::metadata(&file).unwrap().len(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    // Some writes after the backup, then stop.
    let seen = acked.lock().unwrap().len();
    super::eventually(30, "writes after the backup", || async {
        (acked.lock().unwrap().len() >= seen + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let before = acked.iter().filter(|(_, at)| *at < started).map(|(n, _)| n.clone()).collect();
    let after = acked.iter().filter(|(_, at)| *at > finished).map(|(n, _)| n.clone()).collect();
    let list = cms.list(&ListParams::default().limit(1)).await.unwrap();
    let last_revision = list.metadata.resource_version.unwrap().parse().unwrap();
    TakenUnderWrites { file, before, after, last_revision }
}

/// The restored server holds the filled objects and every write acknowledged before the
/// backup, none after it, the Secret decrypts, resourceVersions go on past the old
/// cluster's and a watch from an old one is 410 Gone.
pub async fn check_restored(restored: &TestServer, taken: &TakenUnderWrites, objects: usize) {
    let cms: Api<ConfigMap> = Api::namespaced(restored.client().await, "default");
    let names: HashSet<String> =
        cms.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|c| c.metadata.name).collect();
    let filled = names.iter().filter(|n| n.starts_with("bulk-")).count();
    assert_eq!(filled, objects, "the ConfigMaps made before the backup");
    let lost: Vec<&String> = taken.before.iter().filter(|n| !names.contains(*n)).collect();
    assert!(lost.is_empty(), "acknowledged before the backup, missing after the restore: {lost:?}");
    let back: Vec<&String> = taken.after.iter().filter(|n| names.contains(*n)).collect();
    assert!(back.is_empty(), "written after the backup finished, yet restored: {back:?}");
    let secret = restored.kubectl_ok(&["get", "secret", "token", "-o", "jsonpath={.data.key}"]);
    assert_eq!(secret, "czNjcmV0", "the secret reads back (base64 of s3cret)");
    let created = cms.create(&PostParams::default(), &config_map("after-restore", "1")).await.unwrap();
    let rv: i64 = created.metadata.resource_version.unwrap().parse().unwrap();
    let old = taken.last_revision;
    assert!(rv > old, "resourceVersion went back: {rv} after {old} on the old cluster");
    // A client of the old cluster resuming a watch relists (410 Gone), never misses writes.
    let gone = match cms.watch(&WatchParams::default(), &old.to_string()).await {
        Err(kube::Error::Api(e)) => e.code == 410,
        Ok(stream) => matches!(stream.boxed().next().await, Some(Ok(WatchEvent::Error(e))) if e.code == 410),
        Err(_) => false,
    };
    assert!(gone, "a watch from the old cluster's resourceVersion {old} must get 410 Gone");
}

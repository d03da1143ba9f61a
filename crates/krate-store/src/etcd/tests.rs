use std::sync::Arc;
use std::time::Duration;

use super::process::{EtcdProcess, MemberConfig};
use super::*;

/// A free local port (bound, then released for etcd to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A fresh single-member etcd in a temporary directory, and a store on it.
async fn open() -> ((tempfile::TempDir, EtcdProcess), Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let member = MemberConfig::single("test", &dir.path().join("etcd"), free_port(), free_port());
    let process = EtcdProcess::start(member, Duration::from_secs(30)).await.expect("starting etcd");
    let config = EtcdConfig { endpoints: vec![process.config.client_url.clone()], ..Default::default() };
    let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(&config).await.unwrap());
    ((dir, process), store)
}

crate::contract_tests!(open());

/// The same contract on a cluster whose revisions are offset from etcd's (a restored or
/// migrated one).
mod offset {
    use super::*;

    pub(super) const OFFSET: Revision = 1_000_000;

    pub(super) async fn open_offset() -> ((tempfile::TempDir, EtcdProcess), Arc<dyn Store>) {
        let (guard, _) = open().await;
        let config = EtcdConfig { endpoints: vec![guard.1.config.client_url.clone()], ..Default::default() };
        let client = connect_client(&config).await.unwrap();
        advance_revision_offset(&client, OFFSET).await.unwrap();
        let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(&config).await.unwrap());
        (guard, store)
    }

    crate::contract_tests!(open_offset());
}

#[tokio::test]
async fn an_offset_cluster_hands_out_revisions_past_it_and_calls_older_ones_compacted() {
    let (_guard, store) = offset::open_offset().await;
    let created = store.create("/registry/a", Bytes::from("1")).await.unwrap();
    assert!(created.mod_revision > offset::OFFSET, "{created:?}");
    let old = offset::OFFSET - 5;
    let err = store.list(ListRequest { prefix: "/registry/".into(), revision: Some(old), ..Default::default() }).await;
    assert!(matches!(err, Err(StoreError::Compacted { requested, .. }) if requested == old), "{err:?}");
    let updated = store.update("/registry/a", Bytes::from("2"), created.mod_revision).await.unwrap();
    assert!(updated.mod_revision > created.mod_revision);
    let stale = store.update("/registry/a", Bytes::from("3"), created.mod_revision).await;
    assert!(matches!(stale, Err(StoreError::Conflict { actual, .. }) if actual == updated.mod_revision), "{stale:?}");
}

#[tokio::test]
async fn only_one_of_two_servers_compacts_a_round() {
    let (guard, _) = open().await;
    let config = EtcdConfig { endpoints: vec![guard.1.config.client_url.clone()], ..Default::default() };
    let (a, b) = (EtcdStore::connect(&config).await.unwrap(), EtcdStore::connect(&config).await.unwrap());
    for i in 0..5 {
        a.create(&format!("/x/{i}"), Bytes::from("v")).await.unwrap();
    }
    let current = a.current_revision().await.unwrap();
    a.compact(current - 2).await.unwrap();
    // b has not seen the round a won: it learns it instead of compacting again.
    b.compact(current).await.unwrap();
    assert_eq!(b.compacted_revision().await.unwrap(), current - 2);
    // Next round, b is current and compacts.
    b.compact(current).await.unwrap();
    assert_eq!(a.compacted_revision().await.unwrap(), current);
}

#[tokio::test]
async fn a_dead_cluster_is_a_clear_error_not_a_hang() {
    let (mut guard, store) = open().await;
    guard.1.kill();
    let err = tokio::time::timeout(Duration::from_secs(30), store.get("/a")).await.expect("no answer in 30 s");
    assert!(matches!(err, Err(StoreError::Backend(ref m)) if m.starts_with("etcd: ")), "{err:?}");
}

#[tokio::test]
async fn a_list_and_a_watch_replay_larger_than_four_mebibytes_are_read() {
    use futures::StreamExt;
    let (_guard, store) = open().await;
    // Six values of 1 MiB (etcd takes requests up to 1.5 MiB): 6 MiB in one response.
    let value = Bytes::from(vec![b'x'; 1 << 20]);
    let first = store.create("/registry/big/0", value.clone()).await.unwrap();
    for i in 1..6 {
        store.create(&format!("/registry/big/{i}"), value.clone()).await.unwrap();
    }
    let list = store.list(ListRequest { prefix: "/registry/big/".into(), ..Default::default() }).await.unwrap();
    assert_eq!(list.items.len(), 6);
    let mut watch = store.watch("/registry/big/", first.mod_revision);
    let mut seen = 0;
    while seen < 6 {
        let batch = tokio::time::timeout(Duration::from_secs(30), watch.next()).await.expect("events in 30 s");
        seen += batch.expect("the watch goes on").expect("no error").events.len();
    }
}

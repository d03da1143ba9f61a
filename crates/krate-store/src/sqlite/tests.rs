use futures::StreamExt;

use super::*;

fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(dir.path().join("state.db")).expect("open store")
}

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

#[tokio::test]
async fn create_update_delete_with_compare_and_swap() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let created = store.create("/a/x", b("1")).await.unwrap();
    assert_eq!(created.mod_revision, 1);
    assert_eq!(created.create_revision, 1);
    assert_eq!(store.create("/a/x", b("again")).await, Err(StoreError::AlreadyExists("/a/x".into())));

    let updated = store.update("/a/x", b("2"), 1).await.unwrap();
    assert_eq!((updated.create_revision, updated.mod_revision), (1, 2));
    // A stale expected revision is a conflict and writes nothing.
    assert!(matches!(store.update("/a/x", b("3"), 1).await, Err(StoreError::Conflict { actual: 2, .. })));
    assert_eq!(store.get("/a/x").await.unwrap().unwrap().value, b("2"));
    assert_eq!(store.current_revision().await.unwrap(), 2);

    assert!(matches!(store.delete("/a/x", Some(1)).await, Err(StoreError::Conflict { .. })));
    let (rev, prev) = store.delete("/a/x", Some(2)).await.unwrap();
    assert_eq!(rev, 3);
    assert_eq!(prev.value, b("2"));
    assert_eq!(store.get("/a/x").await.unwrap(), None);
    assert_eq!(store.update("/a/x", b("4"), 3).await, Err(StoreError::NotFound("/a/x".into())));
}

#[tokio::test]
async fn list_by_prefix_with_limit_and_past_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    for name in ["c", "a", "b"] {
        store.create(&format!("/p/{name}"), b(name)).await.unwrap();
    }
    store.create("/q/a", b("other prefix")).await.unwrap();
    let all = store.list(ListRequest { prefix: "/p/".into(), ..Default::default() }).await.unwrap();
    let keys: Vec<_> = all.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/p/a", "/p/b", "/p/c"]);
    assert_eq!(all.revision, 4);
    assert!(!all.more);

    let page = store.list(ListRequest { prefix: "/p/".into(), limit: Some(2), ..Default::default() }).await.unwrap();
    assert_eq!(page.items.len(), 2);
    assert!(page.more);
    let rest = store
        .list(ListRequest {
            prefix: "/p/".into(),
            start_key: Some("/p/b\0".into()),
            revision: Some(page.revision),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].key, "/p/c");

    // Change history, then read the old state back.
    store.update("/p/a", b("a2"), 2).await.unwrap();
    store.delete("/p/b", None).await.unwrap();
    let old = store.list(ListRequest { prefix: "/p/".into(), revision: Some(4), ..Default::default() }).await.unwrap();
    let values: Vec<_> = old.items.iter().map(|kv| kv.value.clone()).collect();
    assert_eq!(values, [b("a"), b("b"), b("c")]);
    assert_eq!(old.revision, 4);
    let now = store.list(ListRequest { prefix: "/p/".into(), ..Default::default() }).await.unwrap();
    let values: Vec<_> = now.items.iter().map(|kv| kv.value.clone()).collect();
    assert_eq!(values, [b("a2"), b("c")]);
    assert!(matches!(
        store.list(ListRequest { prefix: "/p/".into(), revision: Some(99), ..Default::default() }).await,
        Err(StoreError::FutureRevision { .. })
    ));
}

#[tokio::test]
async fn watch_replays_history_then_follows_live_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.create("/w/a", b("1")).await.unwrap();
    store.create("/other/x", b("x")).await.unwrap();
    store.update("/w/a", b("2"), 1).await.unwrap();

    let mut watch = store.watch("/w/", 1);
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.len(), 2, "only events under the prefix: {first:?}");
    assert_eq!(first[0].revision(), 1);
    assert_eq!(first[1].revision(), 3);

    store.delete("/w/a", None).await.unwrap();
    let next = watch.next().await.unwrap().unwrap();
    match &next[0] {
        Event::Delete { revision, prev } => {
            assert_eq!(*revision, 4);
            assert_eq!(prev.value, b("2"));
            assert_eq!(prev.mod_revision, 3);
        }
        other => panic!("expected a delete, got {other:?}"),
    }
}

#[tokio::test]
async fn compaction_expires_old_revisions_but_keeps_current_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.create("/c/a", b("1")).await.unwrap(); // 1
    store.update("/c/a", b("2"), 1).await.unwrap(); // 2
    store.create("/c/b", b("b")).await.unwrap(); // 3
    store.delete("/c/b", None).await.unwrap(); // 4
    store.update("/c/a", b("3"), 2).await.unwrap(); // 5
    store.compact(4).await.unwrap();
    assert_eq!(store.compacted_revision().await.unwrap(), 4);

    let err =
        store.list(ListRequest { prefix: "/c/".into(), revision: Some(2), ..Default::default() }).await.unwrap_err();
    assert!(matches!(err, StoreError::Compacted { requested: 2, compacted: 4 }));
    // Revision 4 itself is still readable: /c/a was "2" then.
    let at4 = store.list(ListRequest { prefix: "/c/".into(), revision: Some(4), ..Default::default() }).await.unwrap();
    assert_eq!(at4.items.len(), 1);
    assert_eq!(at4.items[0].value, b("2"));

    let mut watch = store.watch("/c/", 2);
    assert!(matches!(watch.next().await, Some(Err(StoreError::Compacted { .. }))));
    let mut watch = store.watch("/c/", 5);
    assert_eq!(watch.next().await.unwrap().unwrap()[0].revision(), 5);
}

#[tokio::test]
async fn revisions_survive_a_restart_and_keep_going_up() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir);
        store.create("/r/a", b("1")).await.unwrap();
        store.create("/r/b", b("2")).await.unwrap();
        store.delete("/r/b", None).await.unwrap(); // 3: the newest row is a tombstone
        store.compact(3).await.unwrap();
    }
    let store = open(&dir);
    assert_eq!(store.current_revision().await.unwrap(), 3);
    assert_eq!(store.get("/r/a").await.unwrap().unwrap().value, b("1"));
    let next = store.create("/r/c", b("3")).await.unwrap();
    assert_eq!(next.mod_revision, 4);
}

#[tokio::test]
async fn concurrent_writers_each_get_a_distinct_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        tasks
            .push(tokio::spawn(async move { store.create(&format!("/k/{i:04}"), b("v")).await.unwrap().mod_revision }));
    }
    let mut revisions = Vec::new();
    for task in tasks {
        revisions.push(task.await.unwrap());
    }
    revisions.sort();
    assert_eq!(revisions, (1..=200).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_newer_store_format_is_refused_and_an_older_one_is_moved_forward() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&dir));
    let path = dir.path().join("state.db");
    let conn = Connection::open(&path).unwrap();
    assert_eq!(read_meta(&conn, "format").unwrap(), FORMAT);
    // A file from before formats were recorded is format 1 without the marker.
    conn.execute("DELETE FROM kv_meta WHERE name = 'format'", []).unwrap();
    drop(conn);
    drop(open(&dir));
    let conn = Connection::open(&path).unwrap();
    assert_eq!(read_meta(&conn, "format").unwrap(), FORMAT);
    conn.execute("UPDATE kv_meta SET value = ?1 WHERE name = 'format'", [FORMAT + 1]).unwrap();
    drop(conn);
    let err = SqliteStore::open(&path).err().expect("a newer format must be refused").to_string();
    assert!(err.contains(&format!("was written by a newer krate (store format {};", FORMAT + 1)), "{err}");
}

#[tokio::test]
async fn a_backup_is_a_snapshot_and_a_restore_moves_revisions_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.create("/a/x", b("1")).await.unwrap();
    store.create("/a/y", b("2")).await.unwrap();
    let copy = dir.path().join("copy.db");
    let snapshot = backup(&dir.path().join("state.db"), &copy).unwrap();
    assert_eq!((snapshot.revision, snapshot.keys, snapshot.format), (2, 2, FORMAT));
    store.create("/a/z", b("after")).await.unwrap();

    let restored = prepare_restored(&copy, 1000).unwrap();
    assert_eq!((restored.revision, restored.keys), (1002, 2));
    let store = SqliteStore::open(&copy).unwrap();
    let listed = store.list(ListRequest { prefix: "/a/".into(), ..Default::default() }).await.unwrap();
    let keys: Vec<&str> = listed.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/a/x", "/a/y"], "the write after the backup is not in it");
    assert_eq!(store.current_revision().await.unwrap(), 1002);
    assert_eq!(store.create("/a/w", b("new")).await.unwrap().mod_revision, 1003);
    // A watcher of the old store cannot resume in the restored one: it must relist.
    let mut watch = store.watch("/a/", 2);
    assert!(matches!(watch.next().await, Some(Err(StoreError::Compacted { .. }))));
}

#[test]
fn a_damaged_file_is_not_restored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.db");
    std::fs::write(&path, b"SQLite format 3\0 but not really").unwrap();
    assert!(prepare_restored(&path, 1).is_err());
    let empty = dir.path().join("empty.db");
    Connection::open(&empty).unwrap().execute_batch("CREATE TABLE t(x)").unwrap();
    let err = prepare_restored(&empty, 1).unwrap_err().to_string();
    assert!(err.contains("is not an intact krate database"), "{err}");
}

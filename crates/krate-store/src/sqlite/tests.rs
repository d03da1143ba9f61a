use super::*;

fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(dir.path().join("state.db")).expect("open store")
}

crate::contract_tests!(async {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(open(&dir));
    (dir, store)
});

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
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
    assert!(matches!(crate::contract::next_events(&mut watch).await, Err(StoreError::Compacted { .. })));
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

//! The [`Store`] contract as tests every backend runs (`contract_tests!` in each
//! backend's test module). Revisions are counted from the store's revision when a test
//! starts: a fresh SQLite file is at 0, a fresh etcd cluster at 1.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use crate::{Event, ListRequest, Revision, Store, StoreError, WatchBatch, WatchStream};

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

/// The next batch that carries events (progress notifications are skipped).
pub async fn next_events(watch: &mut WatchStream) -> crate::Result<Vec<Event>> {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), watch.next()).await {
            Ok(Some(Ok(WatchBatch { events, .. }))) if events.is_empty() => continue,
            Ok(Some(batch)) => return batch.map(|b| b.events),
            Ok(None) => panic!("the watch ended without an error"),
            Err(_) => panic!("no watch batch within 10 s"),
        }
    }
}

pub async fn create_update_delete_with_compare_and_swap(store: &dyn Store) {
    let r0 = store.current_revision().await.unwrap();
    let created = store.create("/a/x", b("1")).await.unwrap();
    assert_eq!((created.create_revision, created.mod_revision), (r0 + 1, r0 + 1));
    assert_eq!(store.create("/a/x", b("again")).await, Err(StoreError::AlreadyExists("/a/x".into())));

    let updated = store.update("/a/x", b("2"), r0 + 1).await.unwrap();
    assert_eq!((updated.create_revision, updated.mod_revision), (r0 + 1, r0 + 2));
    // A stale expected revision is a conflict and writes nothing.
    let stale = store.update("/a/x", b("3"), r0 + 1).await;
    assert!(matches!(stale, Err(StoreError::Conflict { actual, .. }) if actual == r0 + 2), "{stale:?}");
    assert_eq!(store.get("/a/x").await.unwrap().unwrap().value, b("2"));
    assert_eq!(store.current_revision().await.unwrap(), r0 + 2);

    assert!(matches!(store.delete("/a/x", Some(r0 + 1)).await, Err(StoreError::Conflict { .. })));
    let (rev, prev) = store.delete("/a/x", Some(r0 + 2)).await.unwrap();
    assert_eq!(rev, r0 + 3);
    assert_eq!((prev.value, prev.mod_revision), (b("2"), r0 + 2));
    assert_eq!(store.get("/a/x").await.unwrap(), None);
    assert_eq!(store.update("/a/x", b("4"), r0 + 3).await, Err(StoreError::NotFound("/a/x".into())));
    assert_eq!(store.delete("/a/x", None).await, Err(StoreError::NotFound("/a/x".into())));
}

pub async fn list_by_prefix_with_limit_and_past_revision(store: &dyn Store) {
    let r0 = store.current_revision().await.unwrap();
    for name in ["c", "a", "b"] {
        store.create(&format!("/p/{name}"), b(name)).await.unwrap();
    }
    store.create("/q/a", b("other prefix")).await.unwrap();
    let all = store.list(ListRequest { prefix: "/p/".into(), ..Default::default() }).await.unwrap();
    let keys: Vec<_> = all.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/p/a", "/p/b", "/p/c"]);
    assert_eq!(all.revision, r0 + 4);
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
    store.update("/p/a", b("a2"), r0 + 2).await.unwrap();
    store.delete("/p/b", None).await.unwrap();
    let at = |revision: Revision| ListRequest { prefix: "/p/".into(), revision: Some(revision), ..Default::default() };
    let old = store.list(at(r0 + 4)).await.unwrap();
    let values: Vec<_> = old.items.iter().map(|kv| kv.value.clone()).collect();
    assert_eq!(values, [b("a"), b("b"), b("c")]);
    assert_eq!(old.revision, r0 + 4);
    let now = store.list(ListRequest { prefix: "/p/".into(), ..Default::default() }).await.unwrap();
    let values: Vec<_> = now.items.iter().map(|kv| kv.value.clone()).collect();
    assert_eq!(values, [b("a2"), b("c")]);
    assert!(matches!(store.list(at(r0 + 99)).await, Err(StoreError::FutureRevision { .. })));
}

pub async fn watch_replays_history_then_follows_live_writes(store: &dyn Store) {
    let r0 = store.current_revision().await.unwrap();
    store.create("/w/a", b("1")).await.unwrap();
    store.create("/other/x", b("x")).await.unwrap();
    store.update("/w/a", b("2"), r0 + 1).await.unwrap();

    let mut watch = store.watch("/w/", r0 + 1);
    let first = next_events(&mut watch).await.unwrap();
    assert_eq!(first.len(), 2, "only events under the prefix: {first:?}");
    assert_eq!(first[0].revision(), r0 + 1);
    assert_eq!(first[1].revision(), r0 + 3);

    store.delete("/w/a", None).await.unwrap();
    let next = next_events(&mut watch).await.unwrap();
    match &next[0] {
        Event::Delete { revision, prev } => {
            assert_eq!(*revision, r0 + 4);
            assert_eq!(prev.value, b("2"));
            assert_eq!(prev.mod_revision, r0 + 3);
        }
        other => panic!("expected a delete, got {other:?}"),
    }
}

/// A follower learns how far history goes even when nothing under its prefix changes
/// (the watch cache's consistent reads wait for exactly that).
pub async fn watch_reports_progress_past_writes_elsewhere(store: &dyn Store) {
    let r0 = store.current_revision().await.unwrap();
    store.create("/seen/a", b("1")).await.unwrap();
    let mut watch = store.watch("/seen/", r0 + 1);
    assert_eq!(next_events(&mut watch).await.unwrap().len(), 1);
    store.create("/elsewhere/b", b("2")).await.unwrap();
    let current = store.current_revision().await.unwrap();
    let reached = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(batch) = watch.next().await {
            if batch.unwrap().revision >= current {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(reached, Ok(true), "the watch never said it had seen revision {current}");
}

pub async fn compaction_expires_old_revisions_but_keeps_current_state(store: &dyn Store) {
    let r0 = store.current_revision().await.unwrap();
    store.create("/c/a", b("1")).await.unwrap(); // r0 + 1
    store.update("/c/a", b("2"), r0 + 1).await.unwrap(); // r0 + 2
    store.create("/c/b", b("b")).await.unwrap(); // r0 + 3
    store.delete("/c/b", None).await.unwrap(); // r0 + 4
    store.update("/c/a", b("3"), r0 + 2).await.unwrap(); // r0 + 5
    store.compact(r0 + 4).await.unwrap();
    assert_eq!(store.compacted_revision().await.unwrap(), r0 + 4);

    let at = |revision: Revision| ListRequest { prefix: "/c/".into(), revision: Some(revision), ..Default::default() };
    let err = store.list(at(r0 + 2)).await.unwrap_err();
    assert_eq!(err, StoreError::Compacted { requested: r0 + 2, compacted: r0 + 4 });
    // The compacted revision itself is still readable: /c/a was "2" then.
    let kept = store.list(at(r0 + 4)).await.unwrap();
    assert_eq!(kept.items.len(), 1);
    assert_eq!(kept.items[0].value, b("2"));

    let mut watch = store.watch("/c/", r0 + 2);
    assert!(matches!(next_events(&mut watch).await, Err(StoreError::Compacted { .. })));
    let mut watch = store.watch("/c/", r0 + 5);
    assert_eq!(next_events(&mut watch).await.unwrap()[0].revision(), r0 + 5);
}

pub async fn concurrent_writers_each_get_a_distinct_revision(store: Arc<dyn Store>) {
    let r0 = store.current_revision().await.unwrap();
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
    assert_eq!(revisions, (r0 + 1..=r0 + 200).collect::<Vec<_>>());
}

/// One `#[tokio::test]` per contract function, each on a fresh store from `$open`
/// (an async expression giving `(guard, Arc<dyn Store>)`; the guard lives as long as
/// the test).
#[macro_export]
#[doc(hidden)]
macro_rules! contract_tests {
    ($open:expr) => {
        $crate::contract_tests!(@each $open;
            create_update_delete_with_compare_and_swap,
            list_by_prefix_with_limit_and_past_revision,
            watch_replays_history_then_follows_live_writes,
            watch_reports_progress_past_writes_elsewhere,
            compaction_expires_old_revisions_but_keeps_current_state);
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_writers_each_get_a_distinct_revision() {
            let (_guard, store) = $open.await;
            $crate::contract::concurrent_writers_each_get_a_distinct_revision(store).await;
        }
    };
    (@each $open:expr; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (_guard, store) = $open.await;
                $crate::contract::$name(&*store).await;
            }
        )*
    };
}

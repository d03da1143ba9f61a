//! The API server driven by kube-rs: CRUD, conflicts, pagination, watches, selectors,
//! subresources and deletion semantics.

mod common;

use std::time::Duration;

use common::TestServer;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::Status;
use serde_json::json;

fn cm(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})).unwrap()
}

fn api_error(err: kube::Error) -> Status {
    match err {
        kube::Error::Api(e) => *e,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn crud_with_optimistic_concurrency() {
    let server = TestServer::start();
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let created = cms.create(&PostParams::default(), &cm("one", json!({"app": "a"}))).await.unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.as_ref().is_some_and(|u| u.len() == 36));
    assert!(meta.creation_timestamp.is_some());
    let rv1 = meta.resource_version.clone().unwrap();

    let got = cms.get("one").await.unwrap();
    assert_eq!(got.metadata.resource_version.as_deref(), Some(rv1.as_str()));
    assert_eq!(got.data.as_ref().unwrap()["k"], "v");

    // Update with the current resourceVersion works; with the stale one it is a 409.
    let mut changed = got.clone();
    changed.data = Some([("k".to_string(), "v2".to_string())].into());
    let updated = cms.replace("one", &PostParams::default(), &changed).await.unwrap();
    let rv2 = updated.metadata.resource_version.clone().unwrap();
    assert!(rv2.parse::<i64>().unwrap() > rv1.parse::<i64>().unwrap());
    let err = api_error(cms.replace("one", &PostParams::default(), &changed).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert!(err.message.contains("the object has been modified"), "{}", err.message);

    // Creating it again is AlreadyExists.
    let err = api_error(cms.create(&PostParams::default(), &cm("one", json!({}))).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));

    // Merge and JSON patches.
    let merged =
        cms.patch("one", &PatchParams::default(), &Patch::Merge(json!({"data": {"extra": "1"}}))).await.unwrap();
    assert_eq!(merged.data.as_ref().unwrap().len(), 2);
    let jp: json_patch::Patch = serde_json::from_value(json!([{"op": "remove", "path": "/data/extra"}])).unwrap();
    let patched = cms.patch("one", &PatchParams::default(), &Patch::<()>::Json(jp)).await.unwrap();
    assert_eq!(patched.data.as_ref().unwrap().len(), 1);

    cms.delete("one", &DeleteParams::default()).await.unwrap();
    let err = api_error(cms.get("one").await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));
    assert_eq!(err.message, "configmaps \"one\" not found");
}

#[tokio::test]
async fn pagination_is_consistent_and_expires_after_compaction() {
    // API only: no controller adds objects (kube-root-ca.crt) to the counts.
    let server = TestServer::start_with(&["--compaction-interval-seconds", "1", "--disable-controllers"]);
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    for i in 0..25 {
        cms.create(&PostParams::default(), &cm(&format!("cm-{i:02}"), json!({"batch": "p"}))).await.unwrap();
    }
    let first = cms.list(&ListParams::default().limit(10)).await.unwrap();
    assert_eq!(first.items.len(), 10);
    assert_eq!(first.metadata.remaining_item_count, Some(15));
    let token = first.metadata.continue_.clone().expect("a continue token");

    // Changes after the first page do not leak into the snapshot.
    cms.create(&PostParams::default(), &cm("cm-99", json!({}))).await.unwrap();
    cms.delete("cm-20", &DeleteParams::default()).await.unwrap();
    let mut names: Vec<String> = first.items.iter().map(|c| c.metadata.name.clone().unwrap()).collect();
    let mut next = Some(token);
    while let Some(token) = next {
        let page = cms.list(&ListParams::default().limit(10).continue_token(&token)).await.unwrap();
        assert_eq!(page.metadata.resource_version, first.metadata.resource_version);
        names.extend(page.items.iter().map(|c| c.metadata.name.clone().unwrap()));
        next = page.metadata.continue_.clone().filter(|t| !t.is_empty());
    }
    let expected: Vec<String> = (0..25).map(|i| format!("cm-{i:02}")).collect();
    assert_eq!(names, expected);

    // Once compaction has passed the snapshot, its token is 410 Gone.
    let stale = cms.list(&ListParams::default().limit(5)).await.unwrap().metadata.continue_.unwrap();
    cms.create(&PostParams::default(), &cm("after", json!({}))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let err = api_error(cms.list(&ListParams::default().limit(5).continue_token(&stale)).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn an_expired_continue_token_offers_an_inconsistent_one_that_goes_on_from_its_key() {
    let server = TestServer::start_with(&["--compaction-interval-seconds", "1", "--disable-controllers"]);
    let client = server.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..12 {
        cms.create(&PostParams::default(), &cm(&format!("cm-{i:02}"), json!({}))).await.unwrap();
    }
    let first = cms.list(&ListParams::default().limit(4)).await.unwrap();
    let token = first.metadata.continue_.clone().expect("a continue token");
    // Nothing changes among the ConfigMaps (upstream's chunking test): other writes move
    // the revision on, and compaction passes the snapshot.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), "default");
    secrets
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "s"}})).unwrap())
        .await
        .unwrap();
    let path = |token: &str| format!("/api/v1/namespaces/default/configmaps?limit=4&continue={token}");
    let status = common::eventually(30, "the snapshot to be compacted away", || async {
        let (code, body) = common::raw(&client, "GET", &path(&token), "application/json", vec![]).await;
        (code == 410).then_some(body)
    })
    .await;
    assert_eq!(status["reason"], "Expired");
    assert!(status["message"].as_str().unwrap().starts_with("The provided continue parameter is too old"));
    let inconsistent = status["metadata"]["continue"].as_str().expect("an inconsistent continue token").to_string();
    // It lists from where the first page stopped, at the newest revision, page by page.
    let page = cms.list(&ListParams::default().limit(4).continue_token(&inconsistent)).await.unwrap();
    let names: Vec<String> = page.items.iter().map(|c| c.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["cm-04", "cm-05", "cm-06", "cm-07"]);
    assert_ne!(page.metadata.resource_version, first.metadata.resource_version);
    assert_eq!(page.metadata.remaining_item_count, Some(4));
}

#[tokio::test]
async fn status_writes_change_the_metadata_upstream_lets_them_change() {
    let server = TestServer::start_with(&["--disable-controllers"]);
    let client = server.client().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d = json!({"metadata": {"name": "d", "labels": {"app": "d"}}, "spec": {"selector": {"matchLabels": {"app": "d"}},
        "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}});
    deployments.create(&PostParams::default(), &serde_json::from_value(d).unwrap()).await.unwrap();
    // A Deployment's status write takes its annotations along (upstream's status strategy
    // keeps only the spec), but never the spec.
    let patch = json!({"metadata": {"annotations": {"patchedstatus": "true"}}, "spec": {"replicas": 7},
        "status": {"observedGeneration": 1}});
    let patched = deployments.patch_status("d", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    assert_eq!(patched.metadata.annotations.unwrap().get("patchedstatus").map(String::as_str), Some("true"));
    assert_eq!(patched.spec.replicas, Some(1));
    assert_eq!(patched.status.unwrap().observed_generation, Some(1));
    // A pod's keeps its owner references.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}});
    pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
    let patch = json!({"metadata": {"labels": {"seen": "yes"}, "ownerReferences": [{"apiVersion": "v1", "kind": "Node",
        "name": "n", "uid": "u"}]}, "status": {"phase": "Pending"}});
    let patched = pods.patch_status("p", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    assert_eq!(patched.metadata.labels.unwrap().get("seen").map(String::as_str), Some("yes"));
    assert!(patched.metadata.owner_references.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn a_graceful_delete_moves_the_generation_on() {
    let server = TestServer::start_with(&["--disable-controllers"]);
    let pods: Api<Pod> = Api::namespaced(server.client().await, "default");
    let pod = json!({"metadata": {"name": "g"}, "spec": {"nodeName": "somewhere", "containers": [{"name": "c", "image": "x"}]}});
    let created = pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    pods.delete("g", &DeleteParams { grace_period_seconds: Some(60), ..Default::default() }).await.unwrap();
    let deleting = pods.get("g").await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    assert_eq!(deleting.metadata.generation, Some(2));
    // A second delete (a shorter grace period) does not move it again.
    pods.delete("g", &DeleteParams { grace_period_seconds: Some(30), ..Default::default() }).await.unwrap();
    assert_eq!(pods.get("g").await.unwrap().metadata.generation, Some(2));
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version_and_follows_selectors() {
    let server = TestServer::start_with(&["--disable-controllers"]);
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let start = cms.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    cms.create(&PostParams::default(), &cm("w", json!({"team": "a"}))).await.unwrap();
    cms.patch("w", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "v2"}}))).await.unwrap();
    cms.patch("w", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"team": "b"}}})))
        .await
        .unwrap();
    cms.delete("w", &DeleteParams::default()).await.unwrap();

    // Everything after `start`, in order.
    let events: Vec<_> =
        cms.watch(&WatchParams::default().timeout(2), &start).await.unwrap().try_collect().await.unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(_) => "ADDED",
            WatchEvent::Modified(_) => "MODIFIED",
            WatchEvent::Deleted(_) => "DELETED",
            WatchEvent::Bookmark(_) => "BOOKMARK",
            WatchEvent::Error(_) => "ERROR",
        })
        .filter(|k| *k != "BOOKMARK")
        .collect();
    assert_eq!(kinds, ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]);

    // With a selector, leaving the selection is a DELETED event.
    let selected: Vec<_> = cms
        .watch(&WatchParams::default().labels("team=a").timeout(2), &start)
        .await
        .unwrap()
        .try_filter(|e| futures::future::ready(!matches!(e, WatchEvent::Bookmark(_))))
        .try_collect()
        .await
        .unwrap();
    assert!(
        matches!(selected.as_slice(), [WatchEvent::Added(_), WatchEvent::Modified(_), WatchEvent::Deleted(_)]),
        "{selected:?}"
    );
}

#[tokio::test]
async fn watch_sends_bookmarks_and_live_events() {
    let server = TestServer::start();
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let rv = cms.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    // The controllers may still be adding the namespace's `kube-root-ca.crt`.
    let not_root_ca = |e: &WatchEvent<ConfigMap>| {
        futures::future::ready(
            !matches!(e, WatchEvent::Added(c) | WatchEvent::Modified(c) if c.metadata.name.as_deref() == Some("kube-root-ca.crt")),
        )
    };
    let mut stream = cms.watch(&WatchParams::default().timeout(3), &rv).await.unwrap().try_filter(not_root_ca).boxed();
    cms.create(&PostParams::default(), &cm("live", json!({}))).await.unwrap();
    let first = stream.try_next().await.unwrap().unwrap();
    assert!(matches!(first, WatchEvent::Added(ref c) if c.metadata.name.as_deref() == Some("live")));
    let rest: Vec<_> = stream.try_collect().await.unwrap();
    assert!(rest.iter().any(|e| matches!(e, WatchEvent::Bookmark(_))), "a bookmark before the timeout: {rest:?}");
}

/// A slow watcher that gets bookmarks while writes pour in must still see every event:
/// a bookmark never moves past changes it has not sent.
#[tokio::test]
async fn bookmarks_never_skip_events_a_slow_watcher_has_not_seen() {
    const COUNT: usize = 1200;
    let server = TestServer::start_with(&["--bookmark-interval-seconds", "1"]);
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let rv = cms.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    let mut stream = cms.watch(&WatchParams::default().timeout(120), &rv).await.unwrap().boxed();
    let writer = cms.clone();
    // Large objects, written over several bookmark intervals, so that the server's side
    // of the watch lags (transport buffers full) when bookmarks fall due.
    let bulk = "x".repeat(16 * 1024);
    let creator = tokio::spawn(async move {
        futures::stream::iter(0..COUNT)
            .for_each_concurrent(4, |i| {
                let api = writer.clone();
                let obj: ConfigMap =
                    serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}, "data": {"bulk": bulk}}))
                        .unwrap();
                async move {
                    api.create(&PostParams::default(), &obj).await.unwrap();
                }
            })
            .await;
    });
    let mut seen = std::collections::HashSet::new();
    let mut bookmarks = 0;
    while seen.len() < COUNT {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.try_next())
            .await
            .unwrap_or_else(|_| panic!("events stopped after {} of {COUNT} ({bookmarks} bookmarks)", seen.len()))
            .unwrap()
            .expect("the watch stays open");
        match event {
            WatchEvent::Added(c) => {
                seen.insert(c.metadata.name.unwrap());
                // Consume slowly, so that changes pile up while bookmarks fall due.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            WatchEvent::Bookmark(_) => bookmarks += 1,
            _ => {}
        }
    }
    creator.await.unwrap();
    assert!(bookmarks > 0, "the watch saw bookmarks while it lagged");
}

#[tokio::test]
async fn watch_from_a_compacted_revision_is_gone() {
    let server = TestServer::start_with(&["--compaction-interval-seconds", "1"]);
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let old =
        cms.create(&PostParams::default(), &cm("c1", json!({}))).await.unwrap().metadata.resource_version.unwrap();
    cms.create(&PostParams::default(), &cm("c2", json!({}))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2600)).await;
    cms.create(&PostParams::default(), &cm("c3", json!({}))).await.unwrap();
    let events: Vec<_> = cms
        .watch(&WatchParams::default().disable_bookmarks().timeout(2), &old)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    match events.as_slice() {
        [WatchEvent::Error(e)] => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a single 410 error event, got {other:?}"),
    }
}

#[tokio::test]
async fn label_and_field_selectors() {
    let server = TestServer::start_with(&["--disable-controllers"]);
    let pods: Api<Pod> = Api::namespaced(server.client().await, "default");
    for (name, node, tier) in [("a", "n1", "web"), ("b", "n2", "web"), ("c", "n1", "db")] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"tier": tier}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    let names = |list: kube::core::ObjectList<Pod>| {
        list.items.into_iter().map(|p| p.metadata.name.unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(names(pods.list(&ListParams::default().labels("tier=web")).await.unwrap()), ["a", "b"]);
    assert_eq!(names(pods.list(&ListParams::default().labels("tier in (db),tier!=web")).await.unwrap()), ["c"]);
    assert_eq!(names(pods.list(&ListParams::default().fields("spec.nodeName=n1")).await.unwrap()), ["a", "c"]);
    assert_eq!(
        names(pods.list(&ListParams::default().fields("spec.nodeName=n1,metadata.name!=a")).await.unwrap()),
        ["c"]
    );
    assert_eq!(
        names(pods.list(&ListParams::default().fields("status.phase=Pending").labels("tier=db")).await.unwrap()),
        ["c"]
    );
    let err = api_error(pods.list(&ListParams::default().fields("spec.bogus=1")).await.unwrap_err());
    assert_eq!(err.code, 400);
    let err = api_error(pods.list(&ListParams::default().labels("tier in web")).await.unwrap_err());
    assert_eq!(err.code, 400);

    // Pods on a node are deleted gracefully: marked, not removed, until their node
    // agent finishes (grace period 0).
    pods.delete("a", &DeleteParams::default()).await.unwrap();
    let pending = pods.get("a").await.unwrap();
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert_eq!(pending.metadata.deletion_grace_period_seconds, Some(30));
    pods.delete("a", &DeleteParams::default().grace_period(0)).await.unwrap();
    assert_eq!(api_error(pods.get("a").await.unwrap_err()).code, 404);
}

#[tokio::test]
async fn status_and_scale_subresources() {
    // API only: the deployment controller would write the status this test writes.
    let server = TestServer::start_with(&["--disable-controllers"]);
    let deploys: Api<Deployment> = Api::namespaced(server.client().await, "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "w", "image": "nginx"}]}}},
        "status": {"replicas": 99}
    }))
    .unwrap();
    let created = deploys.create(&PostParams::default(), &d).await.unwrap();
    assert!(created.status.is_none_or(|s| s.replicas.is_none()), "status is reset on create");
    assert_eq!(created.metadata.generation, Some(1));

    let with_status = deploys
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 2, "readyReplicas": 1}, "spec": {"replicas": 7}})),
        )
        .await
        .unwrap();
    assert_eq!(with_status.status.unwrap().ready_replicas, Some(1));
    assert_eq!(with_status.spec.replicas, Some(2), "the status endpoint ignores spec");
    assert_eq!(with_status.metadata.generation, Some(1));

    let main = deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"readyReplicas": 0}, "spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    assert_eq!(main.status.unwrap().ready_replicas, Some(1), "the main endpoint ignores status");
    assert_eq!(main.metadata.generation, Some(2));

    let scale = deploys.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(3));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=web"));
    deploys.patch_scale("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 5}}))).await.unwrap();
    assert_eq!(deploys.get("web").await.unwrap().spec.replicas, Some(5));
}

#[tokio::test]
async fn finalizers_dry_run_generate_name_and_namespaces() {
    let server = TestServer::start();
    let client = server.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    let mut guarded = cm("guarded", json!({}));
    guarded.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&PostParams::default(), &guarded).await.unwrap();
    cms.delete("guarded", &DeleteParams::default()).await.unwrap();
    let held = cms.get("guarded").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some(), "a finalizer keeps the object");
    let err = api_error(
        cms.patch(
            "guarded",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/hold", "new/one"]}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 422, "no new finalizers while deleting");
    cms.patch("guarded", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}})))
        .await
        .unwrap();
    assert_eq!(api_error(cms.get("guarded").await.unwrap_err()).code, 404, "gone once the last finalizer is removed");

    let dry = cms.create(&PostParams { dry_run: true, ..Default::default() }, &cm("dry", json!({}))).await.unwrap();
    assert_eq!(dry.metadata.name.as_deref(), Some("dry"));
    assert_eq!(api_error(cms.get("dry").await.unwrap_err()).code, 404, "dry run stores nothing");

    let mut generated = cm("", json!({}));
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let made = cms.create(&PostParams::default(), &generated).await.unwrap();
    let name = made.metadata.name.unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), "nope");
    let err = api_error(elsewhere.create(&PostParams::default(), &cm("x", json!({}))).await.unwrap_err());
    assert_eq!((err.code, err.message.as_str()), (404, "namespaces \"nope\" not found"));

    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let n = namespaces.get(ns).await.unwrap();
        assert_eq!(n.status.unwrap().phase.as_deref(), Some("Active"));
    }
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "doomed"}})).unwrap())
        .await
        .unwrap();
    let inside: Api<ConfigMap> = Api::namespaced(client, "doomed");
    let mut held = cm("held", json!({}));
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    inside.create(&PostParams::default(), &held).await.unwrap();
    inside.create(&PostParams::default(), &cm("plain", json!({}))).await.unwrap();
    namespaces.delete("doomed", &DeleteParams::default()).await.unwrap();
    let doomed = namespaces.get("doomed").await.unwrap();
    assert_eq!(doomed.status.unwrap().phase.as_deref(), Some("Terminating"));
    let err = api_error(inside.create(&PostParams::default(), &cm("x", json!({}))).await.unwrap_err());
    assert_eq!(err.code, 403);
    assert!(err.message.contains("being terminated"), "{}", err.message);

    // The namespace controller empties the namespace; the finalizer holds it until removed.
    let mut waited = 0;
    while inside.get_opt("plain").await.unwrap().is_some() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
        assert!(waited < 100, "the namespace controller did not delete the content");
    }
    assert!(namespaces.get_opt("doomed").await.unwrap().is_some(), "held by the finalizer of its content");
    inside
        .patch("held", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}})))
        .await
        .unwrap();
    while namespaces.get_opt("doomed").await.unwrap().is_some() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
        assert!(waited < 200, "the namespace was not finalized");
    }
}

#[tokio::test]
async fn ephemeral_containers_are_only_added_through_their_subresource() {
    let server = TestServer::start();
    let client = server.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = json!({"metadata": {"name": "app"}, "spec": {"containers": [{"name": "app", "image": "busybox"}]}});
    pods.create(&PostParams::default(), &serde_json::from_value(pod.clone()).unwrap()).await.unwrap();

    // Not on create.
    let mut with_debugger = pod.clone();
    with_debugger["metadata"]["name"] = json!("app-2");
    with_debugger["spec"]["ephemeralContainers"] = json!([{"name": "dbg", "image": "busybox"}]);
    let err = api_error(
        pods.create(&PostParams::default(), &serde_json::from_value(with_debugger).unwrap()).await.unwrap_err(),
    );
    assert_eq!(err.code, 422);
    assert!(err.message.contains("spec.ephemeralContainers: Forbidden: cannot be set on create"), "{}", err.message);

    // Added through pods/ephemeralcontainers, as kubectl debug does (a strategic merge
    // patch): defaulted like any container, tracked under its subresource.
    let path = "/api/v1/namespaces/default/pods/app/ephemeralcontainers";
    let add = |name: &str, extra: serde_json::Value| {
        let mut c = json!({"name": name, "image": "busybox", "targetContainerName": "app", "stdin": true, "tty": true});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::to_vec(&json!({"spec": {"ephemeralContainers": [c]}})).unwrap()
    };
    let patch = "application/strategic-merge-patch+json";
    let (status, body) = common::raw(&client, "PATCH", path, patch, add("dbg", json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["kind"], "Pod");
    let added = &body["spec"]["ephemeralContainers"][0];
    assert_eq!((added["name"].as_str(), added["terminationMessagePolicy"].as_str()), (Some("dbg"), Some("File")));
    assert!(body["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["subresource"] == "ephemeralcontainers"));
    let (status, read) = common::raw(&client, "GET", path, "application/json", vec![]).await;
    assert_eq!((status, read["spec"]["ephemeralContainers"][0]["name"].as_str()), (200, Some("dbg")));

    // What upstream refuses: ports, a target that is not one of the pod's containers, a
    // duplicate name, changing or removing one already there, or the main resource
    // changing them.
    let refused = [
        (add("dbg2", json!({"ports": [{"containerPort": 80}]})), "Forbidden: cannot be set for an Ephemeral Container"),
        (add("dbg2", json!({"targetContainerName": "nope"})), "targetContainerName: Not found: \"nope\""),
        (add("app", json!({})), ".name: Duplicate value: \"app\""),
        (add("dbg", json!({"image": "other"})), "existing ephemeral containers \"dbg\" may not be changed"),
    ];
    for (body, expected) in refused {
        let (status, answer) = common::raw(&client, "PATCH", path, patch, body).await;
        assert_eq!(status, 422, "{answer}");
        assert!(answer["message"].as_str().unwrap().contains(expected), "{expected}: {answer}");
    }
    let removal = serde_json::to_vec(&json!({"spec": {"ephemeralContainers": []}})).unwrap();
    let (status, answer) = common::raw(&client, "PATCH", path, "application/merge-patch+json", removal).await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("may not be removed"), "{answer}");
    let mut replaced = pods.get("app").await.unwrap();
    replaced.spec.as_mut().unwrap().ephemeral_containers = None;
    let err = api_error(pods.replace("app", &PostParams::default(), &replaced).await.unwrap_err());
    assert_eq!(err.code, 422, "{}", err.message);
}

#[tokio::test]
async fn a_namespace_status_write_keeps_its_phase_in_step_with_its_deletion() {
    let server = TestServer::start();
    let client = server.client().await;
    let path = "/api/v1/namespaces/default/status";
    let body = |status: serde_json::Value| {
        serde_json::to_vec(
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}, "status": status}),
        )
        .unwrap()
    };
    // No phase: upstream's defaulting makes it Active again.
    let (code, ns) = common::raw(&client, "PUT", path, "application/json", body(json!({}))).await;
    assert_eq!((code, ns["status"]["phase"].as_str()), (200, Some("Active")), "{ns}");
    // Terminating without a deletion: refused.
    let (code, answer) =
        common::raw(&client, "PUT", path, "application/json", body(json!({"phase": "Terminating"}))).await;
    assert_eq!(code, 422, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("may only be 'Active' if `deletionTimestamp` is empty"));
}

/// Bytes of the server's SQLite store (the file and its write-ahead log).
fn store_bytes(server: &TestServer) -> u64 {
    let db = server.data_dir().join("db/state.db");
    ["", "-wal"].iter().filter_map(|s| std::fs::metadata(format!("{}{s}", db.display())).ok()).map(|m| m.len()).sum()
}

/// Rewrites each of 20 ConfigMaps (2 KB each) `rounds` times, one writer per ConfigMap.
async fn churn(cms: &Api<ConfigMap>, rounds: usize) {
    let writers = (0..20).map(|i| {
        let cms = cms.clone();
        async move {
            let name = format!("churn-{i}");
            for round in 0..rounds {
                let value = format!("{round:02048}");
                let patch = json!({"data": {"v": value}});
                cms.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
            }
        }
    });
    futures::future::join_all(writers).await;
}

/// Two phases of the same churn; how much the store grew over the second.
async fn growth_over_churn(server: &TestServer) -> u64 {
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    for i in 0..20 {
        cms.create(&PostParams::default(), &cm(&format!("churn-{i}"), json!({}))).await.unwrap();
    }
    churn(&cms, 100).await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // a compaction or two
    let before = store_bytes(server);
    churn(&cms, 100).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    store_bytes(server).saturating_sub(before)
}

#[tokio::test]
async fn the_store_stops_growing_under_steady_churn_once_history_is_compacted() {
    let compacting = TestServer::start_with(&["--compaction-interval-seconds", "1", "--disable-controllers"]);
    let keeping = TestServer::start_with(&["--compaction-interval-seconds", "3600", "--disable-controllers"]);
    let (compacted, kept) = tokio::join!(growth_over_churn(&compacting), growth_over_churn(&keeping));
    eprintln!(
        "store growth over 2,000 updates of 2 KB: {compacted} bytes compacting every second, {kept} keeping history"
    );
    assert!(
        kept > 2_000_000,
        "without compaction the history shows in the file ({kept} bytes): the measure sees growth"
    );
    assert!(compacted < kept / 4, "compacted, the store reuses its space: grew {compacted} bytes against {kept}");
}

#[tokio::test]
async fn a_review_asked_for_as_a_table_is_not_acceptable() {
    // Upstream has no table for kinds that are never stored: 406, not the review.
    let server = TestServer::start();
    let client = server.client().await;
    let review = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"nonResourceAttributes": {"path": "/", "verb": "get"}}});
    let request = http::Request::post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews")
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&review).unwrap())
        .unwrap();
    match client.request::<serde_json::Value>(request).await {
        Err(kube::Error::Api(e)) => assert_eq!((e.code, e.reason.as_str()), (406, "NotAcceptable"), "{e:?}"),
        other => panic!("expected 406: {other:?}"),
    }
}

#[tokio::test]
async fn a_condition_with_a_null_transition_time_is_accepted_as_go_clients_send_it() {
    // client-go sends a zero metav1.Time as null (the Services conformance test does).
    let server = TestServer::start();
    let client = server.client().await;
    server.kubectl_ok(&["create", "service", "clusterip", "plain", "--tcp=80:80"]);
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), "default");
    let mut service = serde_json::to_value(services.get("plain").await.unwrap()).unwrap();
    // As JSON sends a zero time (null), and as protobuf does (not at all).
    service["status"]["conditions"] = json!([{"type": "StatusUpdate", "status": "True", "reason": "E2E",
        "message": "Set from e2e test", "lastTransitionTime": null},
        {"type": "Other", "status": "True", "reason": "E2E", "message": "no time"}]);
    let request = http::Request::put("/api/v1/namespaces/default/services/plain/status")
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&service).unwrap())
        .unwrap();
    let updated: serde_json::Value = client.request(request).await.expect("the status update is accepted");
    let condition = &updated["status"]["conditions"][0];
    assert_eq!(condition["type"], "StatusUpdate", "{updated}");
    assert!(condition["lastTransitionTime"].is_string(), "{condition}");
    assert!(updated["status"]["conditions"][1]["lastTransitionTime"].is_string(), "{updated}");
}

//! SIGKILL in the middle of a stream of writes loses no acknowledged write, and
//! revisions keep going up after the restart.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{client_for, TestServer};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

#[tokio::test]
async fn acknowledged_writes_survive_sigkill() {
    let mut server = TestServer::start();
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
    server.kill();
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() > 50, "the writers made progress before the kill ({} writes)", acknowledged.len());

    server.restart();
    let cms: Api<ConfigMap> = Api::namespaced(server.client().await, "default");
    let stored = cms.list(&ListParams::default()).await.unwrap();
    let names: std::collections::HashSet<String> =
        stored.items.iter().map(|c| c.metadata.name.clone().unwrap()).collect();
    for (name, _) in &acknowledged {
        assert!(names.contains(name), "acknowledged write {name} was lost");
    }
    let max_acked = acknowledged.iter().map(|(_, rv)| *rv).max().unwrap();
    let next: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "after-restart"}})).unwrap();
    let rv: i64 =
        cms.create(&PostParams::default(), &next).await.unwrap().metadata.resource_version.unwrap().parse().unwrap();
    assert!(rv > max_acked, "revision {rv} after restart must exceed {max_acked}");
    let list_rv: i64 = stored.metadata.resource_version.unwrap().parse().unwrap();
    assert!(list_rv >= max_acked);
}

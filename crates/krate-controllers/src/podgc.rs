//! Pod garbage collection, as upstream's podgc:
//! - pods bound to a node that no longer exists are deleted at once (no agent will ever
//!   finish them);
//! - pods being deleted that were never scheduled are deleted at once;
//! - finished (Succeeded/Failed) pods beyond a threshold are deleted, oldest first.
//!
//! Event-driven: pods are looked at when they or their node change.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use krate_client::caches::Caches;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;

use crate::{tolerate, Error};

struct Context {
    client: kube::Client,
    /// `nodes`: a node missing from a store that has not listed yet is not gone.
    caches: Arc<Caches>,
    nodes: Store<Node>,
    pods: Store<Pod>,
    terminated_threshold: usize,
}

fn is_finished(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

async fn force_delete(client: &kube::Client, pod: &Pod, why: &str) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let params = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() }
        .preconditions(kube::api::Preconditions { uid: pod.uid(), resource_version: None });
    tolerate(api.delete(&pod.name_any(), &params).await, &[404, 409])?;
    tracing::info!(pod = %pod.name_any(), namespace = ?pod.namespace(), reason = why, "pod garbage-collected");
    Ok(())
}

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.caches.wait("nodes").await;
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).filter(|n| !n.is_empty());
    match node {
        Some(node) if ctx.nodes.get(&ObjectRef::new(node)).is_none() => {
            return force_delete(&ctx.client, &pod, "its node is gone").await.map(|_| Action::await_change())
        }
        None if pod.metadata.deletion_timestamp.is_some() => {
            return force_delete(&ctx.client, &pod, "deleted before it was scheduled")
                .await
                .map(|_| Action::await_change())
        }
        _ => {}
    }
    if is_finished(&pod) {
        let mut finished: Vec<Arc<Pod>> = ctx
            .pods
            .state()
            .into_iter()
            .filter(|p| is_finished(p) && p.metadata.deletion_timestamp.is_none())
            .collect();
        if finished.len() > ctx.terminated_threshold {
            finished.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
            let excess = finished.len() - ctx.terminated_threshold;
            for old in finished.into_iter().take(excess) {
                force_delete(&ctx.client, &old, "too many finished pods").await?;
            }
        }
    }
    Ok(Action::await_change())
}

fn error_policy(pod: Arc<Pod>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(pod = %pod.name_any(), error = %err, "pod garbage collection failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

pub async fn run(
    client: kube::Client,
    pod_informer: &crate::Informer<Pod>,
    terminated_threshold: usize,
) -> anyhow::Result<()> {
    let caches = Caches::new("podgc", ["pods", "nodes"]);
    let (nodes, writer) = reflector::store();
    let nodes_synced = caches.clone();
    let node_changes = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(watcher::Event::InitDone) = event {
                nodes_synced.mark_synced("nodes");
            }
        })
        .touched_objects();
    // The controller waits for its store with kube-rs's `wait_until_ready`, which may
    // not wake when other tasks wait on the same shared store: only hand it over ready.
    pod_informer.synced().await;
    caches.mark_synced("pods");
    let controller = Controller::for_shared_stream(pod_informer.subscribe(), pod_informer.store());
    let pods = controller.store();
    let pods_for_mapper = pods.clone();
    // A node that goes (or comes) wakes the pods bound to it.
    let on_node = move |node: Node| {
        let name = node.name_any();
        pods_for_mapper
            .state()
            .into_iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str()))
            .map(|p| ObjectRef::from_obj(&*p))
            .collect::<Vec<_>>()
    };
    controller
        .watches_stream(node_changes, on_node)
        .run(reconcile, error_policy, Arc::new(Context { client, caches, nodes, pods, terminated_threshold }))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

//! Namespace lifecycle: when a namespace is deleted, delete everything in it (pods
//! first), reporting what is left in upstream's deletion conditions, then remove the
//! `kubernetes` finalizer through `namespaces/finalize` so the namespace goes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::discovery::{verbs, Discovery, Scope};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use serde_json::json;

use crate::Error;

/// The finalizer the API server puts on every namespace (spec.finalizers).
const FINALIZER: &str = "kubernetes";

struct Context {
    client: kube::Client,
}

/// What is left in a namespace being emptied, for its status conditions.
#[derive(Default)]
struct Remaining {
    /// Objects left per `resource.group` (upstream's spelling, `pods.` for core).
    resources: BTreeMap<String, usize>,
    /// Objects holding each finalizer.
    finalizers: BTreeMap<String, usize>,
    /// Why deleting failed (pods that must go first, say).
    failure: Option<String>,
}

impl Remaining {
    fn is_empty(&self) -> bool {
        self.resources.values().all(|n| *n == 0)
    }

    fn count(&mut self, resource: &ApiResource, items: &[DynamicObject]) {
        if items.is_empty() {
            return;
        }
        *self.resources.entry(format!("{}.{}", resource.plural, resource.group)).or_default() += items.len();
        for item in items {
            for finalizer in item.metadata.finalizers.iter().flatten() {
                *self.finalizers.entry(finalizer.clone()).or_default() += 1;
            }
        }
    }
}

/// Deletes the content of `ns`, pods first (upstream's ordered namespace deletion: the
/// rest waits until no pod is left, so a pod never outlives what it uses), and reports
/// what is left.
async fn delete_content(client: &kube::Client, ns: &str) -> Result<Remaining, Error> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut resources: Vec<(ApiResource, bool)> = discovery
        .groups()
        .flat_map(|group| group.recommended_resources())
        .filter(|(_, caps)| caps.scope == Scope::Namespaced && caps.supports_operation(verbs::LIST))
        .map(|(resource, caps)| (resource, caps.supports_operation(verbs::DELETE_COLLECTION)))
        .collect();
    let is_pods = |r: &ApiResource| r.group.is_empty() && r.plural == "pods";
    resources.sort_by_key(|(r, _)| !is_pods(r));
    let mut left = Remaining::default();
    for (resource, collection) in resources {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
        if collection {
            api.delete_collection(&DeleteParams::background(), &ListParams::default()).await?;
        }
        let items = api.list(&ListParams::default()).await?.items;
        left.count(&resource, &items);
        if is_pods(&resource) && !items.is_empty() {
            left.failure = Some(format!(
                "Failed to delete all resource types, 1 remaining: unexpected items still remain in namespace: {ns} for gvr: /v1, Resource=pods"
            ));
            break;
        }
    }
    Ok(left)
}

/// Upstream's deletion conditions on a terminating namespace.
fn conditions(left: &Remaining) -> Vec<serde_json::Value> {
    let now = krate_client::now();
    let condition = |type_: &str, status: bool, reason: &str, message: String| json!({"type": type_, "status": if status { "True" } else { "False" }, "lastTransitionTime": now, "reason": reason, "message": message});
    let remaining: Vec<String> =
        left.resources.iter().map(|(r, n)| format!("{r} has {n} resource instances")).collect();
    let finalizers: Vec<String> =
        left.finalizers.iter().map(|(f, n)| format!("{f} in {n} resource instances")).collect();
    vec![
        condition(
            "NamespaceDeletionDiscoveryFailure",
            false,
            "ResourcesDiscovered",
            "All resources successfully discovered".into(),
        ),
        condition(
            "NamespaceDeletionGroupVersionParsingFailure",
            false,
            "ParsedGroupVersions",
            "All legacy kube types successfully parsed".into(),
        ),
        match &left.failure {
            Some(failure) => {
                condition("NamespaceDeletionContentFailure", true, "ContentDeletionFailed", failure.clone())
            }
            None => condition(
                "NamespaceDeletionContentFailure",
                false,
                "ContentDeleted",
                "All content successfully deleted, may be waiting on finalization".into(),
            ),
        },
        if remaining.is_empty() {
            condition("NamespaceContentRemaining", false, "ContentRemoved", "All content successfully removed".into())
        } else {
            condition(
                "NamespaceContentRemaining",
                true,
                "SomeResourcesRemain",
                format!("Some resources are remaining: {}", remaining.join(", ")),
            )
        },
        if finalizers.is_empty() {
            condition(
                "NamespaceFinalizersRemaining",
                false,
                "ContentHasNoFinalizers",
                "All content-preserving finalizers finished".into(),
            )
        } else {
            condition(
                "NamespaceFinalizersRemaining",
                true,
                "SomeFinalizersRemain",
                format!("Some content in the namespace has finalizers remaining: {}", finalizers.join(", ")),
            )
        },
    ]
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let finalizers = ns.spec.as_ref().and_then(|s| s.finalizers.clone()).unwrap_or_default();
    if ns.metadata.deletion_timestamp.is_none() || !finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    let left = delete_content(&ctx.client, &name).await?;
    // The conditions change only with what is left (their times with them).
    let wanted = conditions(&left);
    let strip = |c: &serde_json::Value| json!([c["type"], c["status"], c["reason"], c["message"]]);
    let current: Vec<serde_json::Value> = ns
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|c| c.iter().filter_map(|c| serde_json::to_value(c).ok()).collect())
        .unwrap_or_default();
    if current.iter().map(strip).collect::<Vec<_>>() != wanted.iter().map(strip).collect::<Vec<_>>() {
        // An update, the verb upstream's namespace-controller role grants.
        let mut updated = (*ns).clone();
        updated.status.get_or_insert_default().conditions = Some(serde_json::from_value(json!(wanted))?);
        api.replace_status(&name, &PostParams::default(), &updated).await?;
    }
    if !left.is_empty() {
        tracing::debug!(namespace = %name, remaining = ?left.resources, "waiting for namespace content to go");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let mut finalized = (*ns).clone();
    if let Some(spec) = finalized.spec.as_mut() {
        spec.finalizers = Some(finalizers.into_iter().filter(|f| f != FINALIZER).collect());
    }
    api.replace_subresource("finalize", &name, &PostParams::default(), &finalized).await?;
    tracing::info!(namespace = %name, "namespace content removed; namespace finalized");
    Ok(Action::await_change())
}

fn error_policy(ns: Arc<Namespace>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(namespace = ?ns.metadata.name, error = %err, "namespace cleanup failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(Context { client }))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

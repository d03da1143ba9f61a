//! ResourceQuota usage: `status.hard` mirrors the spec and `status.used` is recounted
//! from the namespace's objects (pods, services and claims wake it when they change;
//! other counted kinds are recounted every five minutes, as upstream resyncs). Admission
//! in the API server refuses creates over the limits and counts them meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, ResourceQuota, Service};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::{json, Value};

use krate_api::quantity::{format, Resources};
use krate_api::quota::{counted_resource, usage};

use crate::Error;

const RESYNC: Duration = Duration::from_secs(300);

struct Context {
    client: kube::Client,
}

/// The API resource for `group/plural` (preferred version).
async fn find_resource(client: &kube::Client, group: &str, plural: &str) -> Result<Option<ApiResource>, Error> {
    let discovered = kube::discovery::group(client, group).await?;
    Ok(discovered.recommended_resources().into_iter().map(|(r, _)| r).find(|r| r.plural == plural))
}

async fn reconcile(quota: Arc<ResourceQuota>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = quota.namespace().unwrap_or_default();
    let hard = quota.spec.as_ref().and_then(|s| s.hard.clone()).unwrap_or_default();
    // Count each resource kind the quota names once.
    let wanted: BTreeSet<(String, String)> = hard.keys().filter_map(|k| counted_resource(k)).collect();
    let mut total = Resources::default();
    for (group, plural) in &wanted {
        let Some(resource) = find_resource(&ctx.client, group, plural).await? else { continue };
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
        for obj in api.list(&ListParams::default()).await?.items {
            total.add(&usage(group, plural, &serde_json::to_value(&obj)?));
        }
    }
    let used: BTreeMap<String, Value> = hard.keys().map(|k| (k.clone(), json!(format(total.get(k).unwrap_or(0.0))))).collect();
    let status = json!({"hard": hard, "used": used});
    if serde_json::to_value(quota.status.clone().unwrap_or_default())? != status {
        let mut updated = (*quota).clone();
        updated.status = Some(serde_json::from_value(status)?);
        let api: Api<ResourceQuota> = Api::namespaced(ctx.client.clone(), &ns);
        api.replace_status(&quota.name_any(), &PostParams::default(), &updated).await?;
    }
    Ok(Action::requeue(RESYNC))
}

fn error_policy(quota: Arc<ResourceQuota>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::debug!(quota = %quota.name_any(), error = %err, "quota recount failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

/// The quotas in the namespace of a changed object.
fn quotas_in(store: Store<ResourceQuota>) -> impl Fn(Option<String>) -> Vec<ObjectRef<ResourceQuota>> {
    move |ns| store.state().into_iter().filter(|q| q.namespace() == ns).map(|q| ObjectRef::from_obj(&*q)).collect()
}

pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    let controller = Controller::new(Api::<ResourceQuota>::all(client.clone()), watcher::Config::default());
    let (pods, services, claims) = (quotas_in(controller.store()), quotas_in(controller.store()), quotas_in(controller.store()));
    controller
        .watches(Api::<PartialObjectMeta<Pod>>::all(client.clone()), watcher::Config::default(), move |o| pods(o.namespace()))
        .watches(Api::<PartialObjectMeta<Service>>::all(client.clone()), watcher::Config::default(), move |o| services(o.namespace()))
        .watches(Api::<PartialObjectMeta<PersistentVolumeClaim>>::all(client.clone()), watcher::Config::default(), move |o| claims(o.namespace()))
        .run(reconcile, error_policy, Arc::new(Context { client }))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

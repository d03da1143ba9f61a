//! ResourceQuota usage: `status.hard` mirrors the spec and `status.used` is recounted
//! from the namespace's objects (pods, services and claims wake it when they change;
//! other counted kinds are recounted every five minutes, as upstream resyncs). Pods are
//! counted from the shared pod informer, other kinds listed at each recount. Admission
//! in the API server refuses creates over the limits and counts them meanwhile.
//!
//! Admission charges a quota just before the object is stored, so a recount can run in
//! between and see one object too few. A recount that would lower usage is therefore
//! written only once the quota has stayed unchanged for a second (`LOWER_AFTER`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Pod, ReplicationController, ResourceQuota, Secret, Service,
};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::{json, Value};

use krate_api::quantity::{format, Resources};
use krate_api::quota::{counted_resource, in_scope, usage};

use crate::{Error, Informer};

const RESYNC: Duration = Duration::from_secs(300);
const LOWER_AFTER: Duration = Duration::from_secs(1);

struct Context {
    client: kube::Client,
    pods: Informer<Pod>,
    /// Quotas whose recount came out lower than their usage: (namespace/name) → the
    /// quota's resourceVersion then, and when.
    lowering: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
}

/// Whether `after` is below `before` for some resource.
fn lowers(
    before: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
    after: &BTreeMap<String, Value>,
) -> bool {
    let amount = |q: Option<&str>| q.and_then(krate_api::quantity::parse).unwrap_or(0.0);
    after.iter().any(|(k, v)| amount(v.as_str()) + 1e-9 < amount(before.and_then(|b| b.get(k)).map(|q| q.0.as_str())))
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
    let quota_json = serde_json::to_value(&*quota)?;
    let mut count = |group: &str, plural: &str, obj: serde_json::Value| {
        if in_scope(&quota_json, group, plural, &obj) {
            total.add(&usage(group, plural, &obj));
        }
    };
    for (group, plural) in &wanted {
        use k8s_openapi::Resource as _;
        if (group.as_str(), plural.as_str()) == (Pod::GROUP, Pod::URL_PATH_SEGMENT) {
            for pod in ctx.pods.in_namespace(&ns) {
                count(group, plural, serde_json::to_value(&*pod)?);
            }
            continue;
        }
        let Some(resource) = find_resource(&ctx.client, group, plural).await? else { continue };
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
        for obj in api.list(&ListParams::default()).await?.items {
            count(group, plural, serde_json::to_value(&obj)?);
        }
    }
    let used: BTreeMap<String, Value> =
        hard.keys().map(|k| (k.clone(), json!(format(total.get(k).unwrap_or(0.0))))).collect();
    let key = format!("{ns}/{}", quota.name_any());
    let rv = quota.resource_version().unwrap_or_default();
    if lowers(quota.status.as_ref().and_then(|s| s.used.as_ref()), &used) {
        let mut lowering = ctx.lowering.lock().unwrap();
        match lowering.get(&key) {
            Some((seen, since)) if *seen == rv && since.elapsed() >= LOWER_AFTER => {
                lowering.remove(&key);
            }
            Some((seen, _)) if *seen == rv => return Ok(Action::requeue(LOWER_AFTER)),
            _ => {
                lowering.insert(key, (rv, std::time::Instant::now()));
                return Ok(Action::requeue(LOWER_AFTER));
            }
        }
    } else {
        ctx.lowering.lock().unwrap().remove(&key);
    }
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

/// `controller`, also recounting a namespace's quotas when an object of `K` changes there.
fn recount_on<K>(controller: Controller<ResourceQuota>, client: &kube::Client) -> Controller<ResourceQuota>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
    PartialObjectMeta<K>: kube::Resource<DynamicType = ()>
        + serde::de::DeserializeOwned
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let quotas = quotas_in(controller.store());
    controller.watches(Api::<PartialObjectMeta<K>>::all(client.clone()), watcher::Config::default(), move |o| {
        quotas(o.namespace())
    })
}

/// The quotas in the namespace of a changed object.
fn quotas_in(store: Store<ResourceQuota>) -> impl Fn(Option<String>) -> Vec<ObjectRef<ResourceQuota>> {
    move |ns| store.state().into_iter().filter(|q| q.namespace() == ns).map(|q| ObjectRef::from_obj(&*q)).collect()
}

pub async fn run(client: kube::Client, pod_informer: &Informer<Pod>) -> anyhow::Result<()> {
    pod_informer.synced().await;
    let pod_changes = pod_informer.subscribe();
    let controller = Controller::new(Api::<ResourceQuota>::all(client.clone()), watcher::Config::default());
    let pods = quotas_in(controller.store());
    let controller = controller.watches_shared_stream(pod_changes, move |o| pods(o.namespace()));
    // Upstream's replenishment: a change to any counted kind recounts its namespace's
    // quotas at once, rather than at the next resync.
    let controller = recount_on::<Service>(controller, &client);
    let controller = recount_on::<PersistentVolumeClaim>(controller, &client);
    let controller = recount_on::<ConfigMap>(controller, &client);
    let controller = recount_on::<Secret>(controller, &client);
    let controller = recount_on::<ReplicationController>(controller, &client);
    recount_on::<ReplicaSet>(controller, &client)
        .run(
            reconcile,
            error_policy,
            Arc::new(Context { client, pods: pod_informer.clone(), lowering: Default::default() }),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    #[test]
    fn only_decreases_count_as_lowering() {
        let before = BTreeMap::from([
            ("pods".to_string(), Quantity("2".into())),
            ("requests.cpu".to_string(), Quantity("900m".into())),
        ]);
        assert!(lowers(Some(&before), &BTreeMap::from([("pods".to_string(), json!("1"))])));
        assert!(!lowers(
            Some(&before),
            &BTreeMap::from([("pods".to_string(), json!("2")), ("requests.cpu".to_string(), json!("1"))])
        ));
        assert!(!lowers(None, &BTreeMap::from([("pods".to_string(), json!("0"))])));
    }
}

//! Storage object in-use protection (upstream's pvc-protection and pv-protection
//! controllers): the StorageObjectInUseProtection admission plugin gives every new
//! claim the `kubernetes.io/pvc-protection` finalizer and every new volume
//! `kubernetes.io/pv-protection`; these controllers take the finalizer away once a
//! deleted claim is used by no pod that may still run, and once a deleted volume is no
//! longer bound, so that nothing pulls storage from under a running pod.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::{Error, Informer};

pub const PVC_FINALIZER: &str = "kubernetes.io/pvc-protection";
pub const PV_FINALIZER: &str = "kubernetes.io/pv-protection";

/// The claims a pod uses (by name), ephemeral volumes' claims included.
fn claims_of(pod: &Pod) -> Vec<String> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
    volumes
        .iter()
        .filter_map(|v| match (&v.persistent_volume_claim, &v.ephemeral) {
            (Some(claim), _) => Some(claim.claim_name.clone()),
            (None, Some(_)) => Some(format!("{}-{}", pod.name_any(), v.name)),
            _ => None,
        })
        .collect()
}

/// A pod that has finished can no longer use its claims.
fn may_run(pod: &Pod) -> bool {
    !matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// `obj` without `finalizer`, written back (an update, as upstream's controllers do).
async fn release<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut without = obj.clone();
    without.meta_mut().finalizers.get_or_insert_with(Vec::new).retain(|f| f != finalizer);
    match api.replace(&obj.name_any(), &PostParams::default(), &without).await {
        Ok(_) => Ok(()),
        // Gone already, or changed meanwhile (the change wakes us again).
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

struct ClaimContext {
    client: kube::Client,
    pods: Informer<Pod>,
}

async fn reconcile_claim(claim: Arc<PersistentVolumeClaim>, ctx: Arc<ClaimContext>) -> Result<Action, Error> {
    let protected = claim.finalizers().iter().any(|f| f == PVC_FINALIZER);
    if claim.metadata.deletion_timestamp.is_none() || !protected {
        return Ok(Action::await_change());
    }
    let ns = claim.namespace().unwrap_or_default();
    let name = claim.name_any();
    let in_use = ctx.pods.in_namespace(&ns).iter().any(|p| may_run(p) && claims_of(p).contains(&name));
    if !in_use {
        release(&Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns), &claim, PVC_FINALIZER).await?;
    }
    Ok(Action::await_change())
}

fn error_policy<K>(_: Arc<K>, err: &Error, _: Arc<impl Send + Sync>) -> Action {
    tracing::warn!(error = %err, "releasing a protected storage object failed");
    Action::requeue(std::time::Duration::from_secs(5))
}

/// The pvc-protection controller.
pub async fn run_claims(client: kube::Client, pods: &Informer<Pod>) -> anyhow::Result<()> {
    pods.synced().await;
    // A pod that changes (finishes, goes) may free the claims it used.
    let freed = |pod: Arc<Pod>| {
        let ns = pod.namespace().unwrap_or_default();
        claims_of(&pod).into_iter().map(|c| ObjectRef::new(&c).within(&ns)).collect::<Vec<_>>()
    };
    Controller::new(Api::<PersistentVolumeClaim>::all(client.clone()), watcher::Config::default())
        .watches_shared_stream(pods.subscribe(), freed)
        .run(reconcile_claim, error_policy, Arc::new(ClaimContext { client, pods: pods.clone() }))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

async fn reconcile_volume(volume: Arc<PersistentVolume>, client: Arc<kube::Client>) -> Result<Action, Error> {
    let protected = volume.finalizers().iter().any(|f| f == PV_FINALIZER);
    let bound = volume.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    if volume.metadata.deletion_timestamp.is_some() && protected && !bound {
        release(&Api::<PersistentVolume>::all((*client).clone()), &volume, PV_FINALIZER).await?;
    }
    Ok(Action::await_change())
}

/// The pv-protection controller.
pub async fn run_volumes(client: kube::Client) -> anyhow::Result<()> {
    Controller::new(Api::<PersistentVolume>::all(client.clone()), watcher::Config::default())
        .run(reconcile_volume, error_policy, Arc::new(client))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pods_use_their_claims_until_they_finish() {
        let pod: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [], "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": "c"}},
            {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
            {"name": "tmp", "emptyDir": {}}
        ]}, "status": {"phase": "Running"}}))
            .unwrap();
        assert_eq!(claims_of(&pod), ["c", "p-scratch"]);
        assert!(may_run(&pod));
        let mut done = pod.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(!may_run(&done));
    }
}

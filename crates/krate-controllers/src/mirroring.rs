//! EndpointSlice mirroring, as upstream's endpointslicemirroring controller: the
//! Endpoints of a Service without a selector (written by hand or by another controller)
//! are mirrored into EndpointSlices, so everything that reads slices (the service proxy,
//! DNS) sees them. One slice per subset and address family, labelled
//! `endpointslice.kubernetes.io/managed-by: endpointslicemirroring-controller.k8s.io`
//! and owned by the Endpoints (so they go with it); Endpoints labelled
//! `endpointslice.kubernetes.io/skip-mirror: "true"` (the `kubernetes` Service's) are
//! left alone.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};

use crate::Error;

const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const MIRRORING: &str = "endpointslicemirroring-controller.k8s.io";
const SERVICE_NAME: &str = "kubernetes.io/service-name";
const SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
/// Annotations of the Endpoints a slice does not carry.
const NOT_MIRRORED: &[&str] =
    &["endpoints.kubernetes.io/last-change-trigger-time", "kubectl.kubernetes.io/last-applied-configuration"];

struct Context {
    client: kube::Client,
}

/// The slices `endpoints` mirrors to: per subset, one per address family of its
/// addresses (ready) and not-ready addresses.
fn desired(endpoints: &Endpoints) -> Vec<Value> {
    let name = endpoints.name_any();
    let mut labels = endpoints.labels().clone();
    labels.insert(MANAGED_BY.into(), MIRRORING.into());
    labels.insert(SERVICE_NAME.into(), name.clone());
    let mut annotations = endpoints.annotations().clone();
    annotations.retain(|k, _| !NOT_MIRRORED.contains(&k.as_str()));
    let owner = endpoints.controller_owner_ref(&()).map(|mut r| {
        r.block_owner_deletion = Some(true);
        r
    });
    let mut slices = Vec::new();
    for subset in endpoints.subsets.iter().flatten() {
        let ports: Vec<Value> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| {
                json!({"name": p.name.clone().unwrap_or_default(), "port": p.port,
                "protocol": p.protocol.clone().unwrap_or_else(|| "TCP".into()), "appProtocol": p.app_protocol})
            })
            .collect();
        let addresses = subset.addresses.iter().flatten().map(|a| (a, true));
        let all: Vec<_> = addresses.chain(subset.not_ready_addresses.iter().flatten().map(|a| (a, false))).collect();
        for family in ["IPv4", "IPv6"] {
            let endpoints: Vec<Value> = all
                .iter()
                .filter(|(a, _)| (family == "IPv6") == a.ip.contains(':'))
                .map(|(a, ready)| {
                    json!({"addresses": [a.ip], "conditions": {"ready": ready}, "hostname": a.hostname,
                        "nodeName": a.node_name, "targetRef": a.target_ref})
                })
                .collect();
            if endpoints.is_empty() {
                continue;
            }
            slices.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"generateName": format!("{name}-"), "labels": labels, "annotations": annotations,
                    "ownerReferences": owner.iter().collect::<Vec<_>>()},
                "addressType": family, "endpoints": endpoints, "ports": ports}));
        }
    }
    slices
}

/// What of a slice mirroring compares (the API fills in defaults and drops nulls).
fn content(slice: &Value) -> Value {
    let strip = |v: &Value| -> Value {
        match v {
            Value::Object(map) => {
                Value::Object(map.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect())
            }
            other => other.clone(),
        }
    };
    let list = |key: &str| -> Vec<Value> { slice[key].as_array().into_iter().flatten().map(strip).collect() };
    json!([slice["addressType"], list("endpoints"), list("ports"), slice["metadata"]["labels"]])
}

async fn reconcile(endpoints: Arc<Endpoints>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = endpoints.namespace().unwrap_or_default();
    let name = endpoints.name_any();
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let ours = ListParams::default().labels(&format!("{SERVICE_NAME}={name},{MANAGED_BY}={MIRRORING}"));
    let existing = slices.list(&ours).await?.items;
    let service = Api::<Service>::namespaced(ctx.client.clone(), &ns).get_opt(&name).await?;
    let selectorless = service
        .as_ref()
        .is_some_and(|s| s.spec.as_ref().and_then(|spec| spec.selector.as_ref()).is_none_or(|sel| sel.is_empty()));
    let mirrored = endpoints.metadata.deletion_timestamp.is_none()
        && endpoints.labels().get(SKIP_MIRROR).map(String::as_str) != Some("true")
        && selectorless;
    let wanted = if mirrored { desired(&endpoints) } else { Vec::new() };
    for (i, want) in wanted.iter().enumerate() {
        match existing.get(i) {
            Some(have) => {
                let current = serde_json::to_value(have)?;
                if content(&current) == content(want) {
                    continue;
                }
                let mut replaced = want.clone();
                replaced["metadata"]["name"] = current["metadata"]["name"].clone();
                replaced["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
                let name = have.name_any();
                slices.replace(&name, &PostParams::default(), &serde_json::from_value(replaced)?).await?;
            }
            None => {
                slices.create(&PostParams::default(), &serde_json::from_value(want.clone())?).await?;
            }
        }
    }
    for extra in existing.iter().skip(wanted.len()) {
        crate::tolerate(slices.delete(&extra.name_any(), &DeleteParams::default()).await, &[404])?;
    }
    Ok(Action::await_change())
}

fn error_policy(endpoints: Arc<Endpoints>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(endpoints = %endpoints.name_any(), error = %err, "mirroring endpoints failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY}={MIRRORING}"));
    Controller::new(Api::<Endpoints>::all(client.clone()), watcher::Config::default())
        .owns(Api::<EndpointSlice>::all(client.clone()), ours)
        // A Service's selector decides whether its Endpoints are mirrored.
        .watches(Api::<Service>::all(client.clone()), watcher::Config::default(), |service| {
            Some(ObjectRef::<Endpoints>::new(&service.name_any()).within(&service.namespace().unwrap_or_default()))
        })
        .run(reconcile, error_policy, Arc::new(Context { client }))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subset_becomes_a_slice_per_address_family() {
        let endpoints: Endpoints = serde_json::from_value(json!({
            "metadata": {"name": "custom", "namespace": "d", "uid": "u", "labels": {"team": "a"}},
            "subsets": [{"addresses": [{"ip": "10.1.2.3"}, {"ip": "fd00::1"}], "notReadyAddresses": [{"ip": "10.1.2.4"}],
                "ports": [{"name": "http", "port": 80}]}]}))
        .unwrap();
        let slices = desired(&endpoints);
        assert_eq!(slices.len(), 2);
        let v4 = &slices[0];
        assert_eq!(v4["addressType"], "IPv4");
        assert_eq!(v4["endpoints"][0]["addresses"], json!(["10.1.2.3"]));
        assert_eq!(v4["endpoints"][1]["conditions"]["ready"], false);
        assert_eq!(v4["ports"][0], json!({"name": "http", "port": 80, "protocol": "TCP", "appProtocol": null}));
        assert_eq!(v4["metadata"]["labels"][MANAGED_BY], MIRRORING);
        assert_eq!(v4["metadata"]["labels"]["team"], "a");
        assert_eq!(slices[1]["addressType"], "IPv6");
    }
}

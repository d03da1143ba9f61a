//! The built-in service load balancer (as k3s's ServiceLB): a Service of type
//! LoadBalancer is reached on every node's address at its own port, so its
//! `status.loadBalancer.ingress` lists the nodes' addresses (ExternalIPs when any node
//! has one, else InternalIPs), and each node's proxy forwards those addresses. Two
//! LoadBalancer Services cannot both take a port: the older one keeps it, the newer one
//! stays pending with a warning event until the port is free. Services with a
//! `loadBalancerClass` belong to another implementation and are left alone.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::json;

use crate::{reference, Error, Recorder};

struct Context {
    client: kube::Client,
    nodes: Store<Node>,
    services: Store<Service>,
    events: Recorder,
}

fn ours(svc: &Service) -> bool {
    svc.spec.as_ref().is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer") && s.load_balancer_class.is_none())
}

/// (protocol, port) pairs a Service takes on every node.
fn ports(svc: &Service) -> BTreeSet<(String, i32)> {
    let ports = svc.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
    ports.into_iter().map(|p| (p.protocol.unwrap_or_else(|| "TCP".into()), p.port)).collect()
}

/// The nodes' addresses a LoadBalancer Service is reached at.
fn node_addresses(nodes: &[Arc<Node>]) -> Vec<String> {
    let of_type = |kind: &str| -> Vec<String> {
        let mut ips: Vec<String> = nodes
            .iter()
            .flat_map(|n| n.status.as_ref().and_then(|s| s.addresses.clone()).unwrap_or_default())
            .filter(|a| a.type_ == kind)
            .map(|a| a.address)
            .collect();
        ips.sort();
        ips.dedup();
        ips
    };
    let external = of_type("ExternalIP");
    if external.is_empty() {
        of_type("InternalIP")
    } else {
        external
    }
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ours(&svc) || svc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let created = |s: &Service| (s.metadata.creation_timestamp.clone().map(|t| t.0), s.namespace(), s.name_any());
    let mine = ports(&svc);
    let holder = ctx
        .services
        .state()
        .into_iter()
        .filter(|other| ours(other) && other.uid() != svc.uid() && created(other) < created(&svc))
        .find(|other| !ports(other).is_disjoint(&mine));
    let ingress: Vec<serde_json::Value> = match &holder {
        Some(_) => vec![],
        None => node_addresses(&ctx.nodes.state()).into_iter().map(|ip| json!({"ip": ip, "ipMode": "VIP"})).collect(),
    };
    let current = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .map(|i| serde_json::to_value(i).unwrap_or_default())
        .unwrap_or(json!([]));
    if current != json!(ingress) {
        let api: Api<Service> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
        let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
        api.patch_status(&svc.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await?;
        match &holder {
            Some(other) => {
                let message = format!(
                    "Port taken by LoadBalancer service {}/{}; this one stays pending until it is free",
                    other.namespace().unwrap_or_default(),
                    other.name_any()
                );
                ctx.events.warning(&reference(&*svc), "UnAvailableLoadBalancer", &message).await;
            }
            None => {
                let ips: Vec<&str> = ingress.iter().filter_map(|i| i["ip"].as_str()).collect();
                let message = format!("Updated LoadBalancer with new IPs: [{}]", ips.join(" "));
                ctx.events.normal(&reference(&*svc), "UpdatedLoadBalancer", &message).await;
            }
        }
    }
    Ok(Action::await_change())
}

fn error_policy(svc: Arc<Service>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(service = %svc.name_any(), error = %err, "service load balancer sync failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    let controller = Controller::new(Api::<Service>::all(client.clone()), watcher::Config::default());
    let services = controller.store();
    let (nodes, writer) = kube::runtime::reflector::store();
    let node_changes = kube::runtime::WatchStreamExt::touched_objects(kube::runtime::WatchStreamExt::reflect(
        kube::runtime::WatchStreamExt::default_backoff(watcher::watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
        )),
        writer,
    ))
    .map(|_| ());
    // A LoadBalancer Service that goes frees its ports for the next in line.
    let freed = services.clone();
    let lbs = controller.store();
    let context =
        Context { events: Recorder::new(client.clone(), "service-lb-controller"), client, nodes, services: lbs };
    controller
        .reconcile_all_on(node_changes)
        .watches(Api::<Service>::all(context.client.clone()), watcher::Config::default(), move |_| {
            freed.state().iter().filter(|s| ours(s)).map(|s| ObjectRef::from_obj(&**s)).collect::<Vec<_>>()
        })
        .run(reconcile, error_policy, Arc::new(context))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

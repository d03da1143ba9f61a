//! Endpoints and EndpointSlices: for every Service with a selector, the addresses of
//! the pods it selects, with the Service's ports resolved against each pod (named target
//! ports look up the pod's container ports). Ready pods are `addresses`, others
//! `notReadyAddresses` (all ready with `publishNotReadyAddresses`); slices also carry
//! terminating pods, marked so. Endpoints share the Service's name and are deleted with
//! it; slices are owned by the Service and go through the garbage collector.
//!
//! Event-driven: a pod change wakes the services that select it now or listed it before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use serde_json::{json, Value};
use tokio::sync::Notify;

use krate_client::caches::Caches;

use crate::owned::{Owned, CACHE_LAG_RETRY};
use crate::replicas::is_ready;
use crate::{tolerate, Error, Informer};

const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const CONTROLLER_NAME: &str = "endpointslice-controller.k8s.io";
const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MAX_ENDPOINTS_PER_SLICE: usize = 100;

type Key = (String, String);

/// One service port resolved against one pod: (name, port, protocol).
type ResolvedPort = (String, i32, String);

struct Member {
    pod: Arc<Pod>,
    ip: String,
    ready: bool,
    terminating: bool,
}

fn key_of<K: kube::Resource>(obj: &K) -> Key {
    (obj.meta().namespace.clone().unwrap_or_default(), obj.meta().name.clone().unwrap_or_default())
}

fn selects(service: &Service, pod: &Pod) -> bool {
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.as_ref()).filter(|s| !s.is_empty()) else {
        return false;
    };
    let selector = LabelSelector { match_labels: Some(selector.clone()), match_expressions: None };
    service.namespace() == pod.namespace() && krate_client::selectors::selector_matches(&selector, pod.labels())
}

/// The service's ports as `pod` serves them; a named target port the pod does not
/// declare leaves that port out for this pod.
fn resolve_ports(service: &Service, pod: &Pod) -> Vec<ResolvedPort> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    let mut ports = Vec::new();
    for port in service.spec.as_ref().and_then(|s| s.ports.as_ref()).into_iter().flatten() {
        let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
        let number = match &port.target_port {
            None => Some(port.port),
            Some(IntOrString::Int(n)) => Some(*n),
            Some(IntOrString::String(name)) => containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str()) && p.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .map(|p| p.container_port),
        };
        if let Some(number) = number {
            ports.push((port.name.clone().unwrap_or_default(), number, protocol));
        }
    }
    ports
}

/// The hostname an endpoint of `service` carries for `pod` (upstream's
/// ShouldSetHostname: the pod names one and its subdomain is this Service), which DNS
/// publishes as `<hostname>.<service>.<ns>.svc`.
fn endpoint_hostname(service: &Service, pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let hostname = spec.hostname.clone().filter(|h| !h.is_empty())?;
    (spec.subdomain.as_deref() == Some(service.name_any().as_str()) && pod.namespace() == service.namespace())
        .then_some(hostname)
}

fn target_ref(pod: &Pod) -> Value {
    json!({"kind": "Pod", "namespace": pod.namespace(), "name": pod.name_any(), "uid": pod.uid()})
}

/// Ports as the API writes them (`null` when there are none, as the API returns them).
fn port_list(ports: &[ResolvedPort]) -> Value {
    if ports.is_empty() {
        return Value::Null;
    }
    ports
        .iter()
        .map(|(name, port, protocol)| {
            let mut p = json!({"port": port, "protocol": protocol});
            if !name.is_empty() {
                p["name"] = json!(name);
            }
            p
        })
        .collect()
}

struct Controller {
    client: kube::Client,
    /// Writes the EndpointSlices.
    slices_client: kube::Client,
    services: Store<Service>,
    pods: Informer<Pod>,
    slices: Owned<EndpointSlice>,
    /// Service → the pods its endpoints listed last time (a pod that stops matching
    /// still wakes the service that listed it).
    listed: Mutex<HashMap<Key, HashSet<Key>>>,
    pending: Mutex<HashSet<Key>>,
    wake: Notify,
    /// When the change that queued a Service happened, for the trigger-time annotation
    /// proxies measure network programming latency from.
    triggers: Mutex<HashMap<Key, String>>,
}

/// Upstream's annotation: when the change behind an Endpoints or EndpointSlice update
/// happened.
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl Controller {
    fn enqueue(&self, keys: impl IntoIterator<Item = Key>) {
        let keys: Vec<Key> = keys.into_iter().collect();
        let now = jiff::Timestamp::now().to_string();
        let mut triggers = self.triggers.lock().unwrap();
        for key in &keys {
            triggers.entry(key.clone()).or_insert_with(|| now.clone());
        }
        drop(triggers);
        self.pending.lock().unwrap().extend(keys);
        self.wake.notify_one();
    }

    fn services_for_pod(&self, pod: &Pod) -> Vec<Key> {
        let pod_key = key_of(pod);
        let listed = self.listed.lock().unwrap();
        self.services
            .state()
            .iter()
            .filter(|s| selects(s, pod) || listed.get(&key_of(&***s)).is_some_and(|pods| pods.contains(&pod_key)))
            .map(|s| key_of(&**s))
            .collect()
    }

    fn members(&self, service: &Service) -> Vec<Member> {
        let publish_not_ready = service.spec.as_ref().and_then(|s| s.publish_not_ready_addresses).unwrap_or(false);
        let mut members: Vec<Member> = self
            .pods
            .in_namespace(&service.namespace().unwrap_or_default())
            .into_iter()
            .filter(|p| selects(service, p))
            .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
            .filter_map(|pod| {
                let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).filter(|ip| !ip.is_empty())?;
                let ready = publish_not_ready || is_ready(&pod);
                let terminating = pod.metadata.deletion_timestamp.is_some();
                Some(Member { pod, ip, ready, terminating })
            })
            .collect();
        members.sort_by(|a, b| a.ip.cmp(&b.ip).then_with(|| a.pod.name_any().cmp(&b.pod.name_any())));
        members
    }

    async fn sync(&self, key: &Key) -> Result<(), Error> {
        let (ns, name) = key;
        let endpoints_api: Api<Endpoints> = Api::namespaced(self.client.clone(), ns);
        let Some(service) = self.services.get(&ObjectRef::new(name).within(ns)) else {
            // Slices are owned by the Service and go with it; Endpoints share its name.
            tolerate(endpoints_api.delete(name, &DeleteParams::default()).await, &[404])?;
            self.forget_service(key);
            return Ok(());
        };
        let spec = service.spec.clone().unwrap_or_default();
        if spec.selector.as_ref().is_none_or(|s| s.is_empty()) || spec.type_.as_deref() == Some("ExternalName") {
            return Ok(());
        }
        let members = self.members(&service);
        self.remember(key, &members);
        // Group pods by their resolved port lists, as upstream's subsets are.
        let mut groups: BTreeMap<Vec<ResolvedPort>, Vec<&Member>> = BTreeMap::new();
        for m in &members {
            groups.entry(resolve_ports(&service, &m.pod)).or_default().push(m);
        }
        let trigger = self.triggers.lock().unwrap().remove(key);
        self.write_endpoints(&service, &groups, trigger.as_deref()).await?;
        self.write_slices(&service, &groups, trigger.as_deref()).await
    }

    fn remember(&self, key: &Key, members: &[Member]) {
        self.listed.lock().unwrap().insert(key.clone(), members.iter().map(|m| key_of(&*m.pod)).collect());
    }

    fn forget_service(&self, key: &Key) {
        self.listed.lock().unwrap().remove(key);
    }

    async fn write_endpoints(
        &self,
        service: &Service,
        groups: &BTreeMap<Vec<ResolvedPort>, Vec<&Member>>,
        trigger: Option<&str>,
    ) -> Result<(), Error> {
        let address = |m: &Member| {
            let mut a = json!({"ip": m.ip, "targetRef": target_ref(&m.pod)});
            if let Some(hostname) = endpoint_hostname(service, &m.pod) {
                a["hostname"] = json!(hostname);
            }
            if let Some(node) = m.pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) {
                a["nodeName"] = json!(node);
            }
            a
        };
        let subsets: Vec<Value> = groups
            .iter()
            .filter_map(|(ports, members)| {
                let live: Vec<&&Member> = members.iter().filter(|m| !m.terminating).collect();
                if live.is_empty() {
                    return None;
                }
                let mut subset = json!({});
                let ready: Vec<Value> = live.iter().filter(|m| m.ready).map(|m| address(m)).collect();
                let not_ready: Vec<Value> = live.iter().filter(|m| !m.ready).map(|m| address(m)).collect();
                if !ready.is_empty() {
                    subset["addresses"] = json!(ready);
                }
                if !not_ready.is_empty() {
                    subset["notReadyAddresses"] = json!(not_ready);
                }
                if !ports.is_empty() {
                    subset["ports"] = port_list(ports);
                }
                Some(subset)
            })
            .collect();
        let (ns, name) = key_of(service);
        let api: Api<Endpoints> = Api::namespaced(self.client.clone(), &ns);
        let labels = service.labels().clone();
        let mut desired = json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": ns, "labels": labels}, "subsets": subsets});
        if let Some(t) = trigger {
            desired["metadata"]["annotations"] = json!({TRIGGER_TIME: t});
        }
        match api.get_opt(&name).await? {
            None => {
                api.create(&PostParams::default(), &serde_json::from_value(desired)?).await?;
            }
            Some(mut current) => {
                let current_subsets = serde_json::to_value(current.subsets.clone().unwrap_or_default())?;
                if current_subsets != json!(subsets) || current.metadata.labels.clone().unwrap_or_default() != labels {
                    current.subsets = serde_json::from_value(json!(subsets))?;
                    current.metadata.labels = Some(labels);
                    if let Some(t) = trigger {
                        current.annotations_mut().insert(TRIGGER_TIME.into(), t.into());
                    }
                    api.replace(&name, &PostParams::default(), &current).await?;
                }
            }
        }
        Ok(())
    }

    async fn write_slices(
        &self,
        service: &Service,
        groups: &BTreeMap<Vec<ResolvedPort>, Vec<&Member>>,
        trigger: Option<&str>,
    ) -> Result<(), Error> {
        let (ns, name) = key_of(service);
        let api: Api<EndpointSlice> = Api::namespaced(self.slices_client.clone(), &ns);
        let mut labels = service.labels().clone();
        labels.insert(SERVICE_NAME.into(), name.clone());
        labels.insert(MANAGED_BY.into(), CONTROLLER_NAME.into());
        let mut desired: Vec<(Value, Value)> = Vec::new();
        for (ports, members) in groups {
            for chunk in members.chunks(MAX_ENDPOINTS_PER_SLICE) {
                let endpoints: Vec<Value> = chunk
                    .iter()
                    .map(|m| {
                        let mut e = json!({
                            "addresses": [m.ip],
                            "conditions": {"ready": m.ready && !m.terminating, "serving": m.ready, "terminating": m.terminating},
                            "targetRef": target_ref(&m.pod),
                        });
                        if let Some(hostname) = endpoint_hostname(service, &m.pod) {
                            e["hostname"] = json!(hostname);
                        }
                        if let Some(node) = m.pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) {
                            e["nodeName"] = json!(node);
                        }
                        e
                    })
                    .collect();
                let mut ports = port_list(ports);
                // Slice ports always carry a name (defaulted to "" by the API).
                for p in ports.as_array_mut().into_iter().flatten().filter_map(Value::as_object_mut) {
                    p.entry("name").or_insert(json!(""));
                }
                desired.push((json!(endpoints), ports));
            }
        }
        if desired.is_empty() {
            // Upstream keeps one empty slice so that consumers see the service exists.
            desired.push((json!([]), Value::Null));
        }
        let selector = format!("{SERVICE_NAME}={name},{MANAGED_BY}={CONTROLLER_NAME}");
        let uid = service.uid().unwrap_or_default();
        let Some(mut existing) = self.slices.of(&uid, Some(&selector)) else { return Err(Error::CacheLag) };
        existing.sort_by_key(|s| s.name_any());
        let owner = json!([{"apiVersion": "v1", "kind": "Service", "name": name, "uid": service.uid(), "controller": true, "blockOwnerDeletion": true}]);
        let address_type = if members_ipv6(groups) { "IPv6" } else { "IPv4" };
        let mut existing = existing.into_iter();
        for (endpoints, ports) in desired {
            match existing.next() {
                Some(mut slice) => {
                    let same = serde_json::to_value(&slice.endpoints)? == endpoints
                        && serde_json::to_value(&slice.ports)? == ports
                        && slice.metadata.labels.as_ref() == Some(&labels);
                    if !same {
                        let before = slice.clone();
                        slice.endpoints = serde_json::from_value(endpoints)?;
                        slice.ports = serde_json::from_value(ports)?;
                        slice.metadata.labels = Some(labels.clone());
                        if let Some(t) = trigger {
                            slice.annotations_mut().insert(TRIGGER_TIME.into(), t.into());
                        }
                        let after = api.replace(&slice.name_any(), &PostParams::default(), &slice).await?;
                        self.slices.updated(&uid, &before, &after);
                    }
                }
                None => {
                    let slice = json!({
                        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"generateName": format!("{name}-"), "namespace": ns, "labels": labels, "ownerReferences": owner,
                            "annotations": trigger.map(|t| json!({TRIGGER_TIME: t}))},
                        "addressType": address_type, "endpoints": endpoints, "ports": ports,
                    });
                    let created = api.create(&PostParams::default(), &serde_json::from_value(slice)?).await?;
                    self.slices.created(&uid, &created);
                }
            }
        }
        for extra in existing {
            tolerate(api.delete(&extra.name_any(), &DeleteParams::default()).await, &[404])?;
            self.slices.deleted(&uid, &extra);
        }
        Ok(())
    }
}

fn members_ipv6(groups: &BTreeMap<Vec<ResolvedPort>, Vec<&Member>>) -> bool {
    groups.values().flatten().next().is_some_and(|m| m.ip.contains(':'))
}

/// Runs the controller: `client` writes Endpoints (upstream's endpoint-controller),
/// `slices_client` EndpointSlices (endpointslice-controller).
pub async fn run(
    client: kube::Client,
    slices_client: kube::Client,
    pod_informer: &Informer<Pod>,
) -> anyhow::Result<()> {
    let caches = Caches::new("endpoints", ["services", "pods", "endpointslices"]);
    let (services, service_writer) = reflector::store::<Service>();
    let slice_informer = Informer::<EndpointSlice>::default();
    let controller = Arc::new(Controller {
        client: client.clone(),
        slices_client: slices_client.clone(),
        services,
        pods: pod_informer.clone(),
        slices: Owned::new(&slice_informer),
        listed: Mutex::default(),
        pending: Mutex::default(),
        wake: Notify::new(),
        triggers: Mutex::default(),
    });
    let service_events = watcher::watcher(Api::<Service>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(service_writer);
    let feeder = {
        let c = controller.clone();
        let caches = caches.clone();
        let services = service_events.map(move |event| match &event {
            Ok(Event::Apply(s) | Event::Delete(s) | Event::InitApply(s)) => c.enqueue([key_of(s)]),
            Ok(Event::InitDone) => caches.mark_synced("services"),
            _ => {}
        });
        let c = controller.clone();
        let pods = pod_informer.subscribe().map(move |p| c.enqueue(c.services_for_pod(&p)));
        // A slice the cache now shows may be what a service's sync waits for; one of
        // ours changed or deleted by someone else is put back (upstream's controller
        // resyncs its service too).
        let c = controller.clone();
        let slices = slice_informer.subscribe().map(move |slice| {
            let owner = krate_client::informer::controller_uid(&*slice).unwrap_or_default();
            let ours = slice.labels().get(MANAGED_BY).map(String::as_str) == Some(CONTROLLER_NAME);
            if ours || c.slices.waiting(&owner) {
                let service = slice.labels().get(SERVICE_NAME).cloned().unwrap_or_default();
                c.enqueue([(slice.namespace().unwrap_or_default(), service)]);
            }
        });
        futures::stream::select(futures::stream::select(services, pods), slices)
            .for_each(|_| futures::future::ready(()))
    };
    let worker = async {
        pod_informer.synced().await;
        caches.mark_synced("pods");
        slice_informer.synced().await;
        caches.mark_synced("endpointslices");
        caches.wait_all().await;
        // Services listed before the pods were known: look at all of them again.
        controller.enqueue(controller.services.state().iter().map(|s| key_of(&**s)));
        loop {
            controller.wake.notified().await;
            let batch: Vec<Key> = controller.pending.lock().unwrap().drain().collect();
            for key in batch {
                if let Err(e) = controller.sync(&key).await {
                    if !matches!(e, Error::CacheLag) {
                        tracing::warn!(namespace = %key.0, service = %key.1, error = %e, "syncing endpoints failed; retrying");
                    }
                    let c = controller.clone();
                    let retry = if matches!(e, Error::CacheLag) { CACHE_LAG_RETRY } else { Duration::from_secs(1) };
                    tokio::spawn(async move {
                        tokio::time::sleep(retry).await;
                        c.enqueue([key]);
                    });
                }
            }
        }
    };
    tokio::select! {
        _ = feeder => anyhow::bail!("the service and pod watches ended"),
        watched = slice_informer.run(Api::all(slices_client.clone())) => watched,
        _ = worker => Ok(()),
    }
}

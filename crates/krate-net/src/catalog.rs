//! The Services and EndpointSlices of the cluster, as one node's networking sees them:
//! one watch of each, shared by the service proxy and the DNS responder, plus the host
//! ports of this node's pods, which the node agent sets. Listeners are told which
//! Services changed (a Service's slices changing counts as the Service changing; a pod's
//! host ports count under [`host_ports_key`]); after a re-list, every Service counts as
//! changed.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::ResourceExt;
use tokio::sync::Notify;

use crate::watch::Change;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service by namespace and name.
pub type Key = (String, String);

/// A port of the node forwarded to a pod (`hostPort`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub protocol: String,
    /// Only this node address (None: any of them).
    pub host_ip: Option<std::net::Ipv4Addr>,
    pub host_port: u16,
    pub pod_ip: std::net::Ipv4Addr,
    pub container_port: u16,
}

/// The key under which a pod's host ports change.
pub fn host_ports_key(pod_uid: &str) -> Key {
    (String::new(), format!("hostports/{pod_uid}"))
}

/// What the watches have shown.
#[derive(Default)]
pub struct Known {
    pub services: HashMap<Key, Service>,
    /// Service → its slices by name.
    pub slices: HashMap<Key, HashMap<String, EndpointSlice>>,
    /// Pod uid → its host ports (this node's pods only).
    pub host_ports: HashMap<String, Vec<HostPort>>,
}

impl Known {
    /// The slices of a Service.
    pub fn slices_of(&self, key: &Key) -> Vec<&EndpointSlice> {
        self.slices.get(key).map(|m| m.values().collect()).unwrap_or_default()
    }
}

/// A listener's view of what changed since it last looked.
struct Listener {
    dirty: BTreeSet<Key>,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct State {
    known: Known,
    services_listed: bool,
    slices_listed: bool,
    listeners: Vec<Listener>,
}

/// The shared view.
#[derive(Clone, Default)]
pub struct Catalog {
    state: Arc<Mutex<State>>,
}

/// One listener's handle: wait for changes, take them, read the catalog.
pub struct Changes {
    catalog: Catalog,
    index: usize,
    wake: Arc<Notify>,
}

impl Changes {
    /// Waits until something changed (or was listed).
    pub async fn changed(&self) {
        self.wake.notified().await
    }

    /// Whether both watches have listed once.
    pub fn listed(&self) -> bool {
        let state = self.catalog.state.lock().expect("catalog lock");
        state.services_listed && state.slices_listed
    }

    /// The Services changed since the last call, and a look at the catalog.
    pub fn take<T>(&self, read: impl FnOnce(Vec<Key>, &Known) -> T) -> T {
        let mut state = self.catalog.state.lock().expect("catalog lock");
        let dirty: Vec<Key> = std::mem::take(&mut state.listeners[self.index].dirty).into_iter().collect();
        read(dirty, &state.known)
    }

    /// A look at the catalog without taking changes.
    pub fn read<T>(&self, read: impl FnOnce(&Known) -> T) -> T {
        read(&self.catalog.state.lock().expect("catalog lock").known)
    }

    /// Marks Services changed again (a pass that failed).
    pub fn requeue(&self, keys: impl IntoIterator<Item = Key>) {
        self.catalog.state.lock().expect("catalog lock").listeners[self.index].dirty.extend(keys);
        self.wake.notify_one();
    }
}

impl Catalog {
    /// A new listener; it starts with every known Service changed.
    pub fn listen(&self) -> Changes {
        let mut state = self.state.lock().expect("catalog lock");
        let wake = Arc::new(Notify::new());
        let dirty = state.known.services.keys().cloned().collect();
        state.listeners.push(Listener { dirty, wake: wake.clone() });
        wake.notify_one();
        Changes { catalog: self.clone(), index: state.listeners.len() - 1, wake }
    }

    fn changed(&self, update: impl FnOnce(&mut State) -> Vec<Key>) {
        let mut state = self.state.lock().expect("catalog lock");
        let keys = update(&mut state);
        for l in &mut state.listeners {
            l.dirty.extend(keys.iter().cloned());
            l.wake.notify_one();
        }
    }

    /// Sets the host ports of a pod of this node (none: it is gone).
    pub fn set_host_ports(&self, pod_uid: &str, ports: Vec<HostPort>) {
        let mut state = self.state.lock().expect("catalog lock");
        let current = state.known.host_ports.get(pod_uid).cloned().unwrap_or_default();
        if current == ports {
            return;
        }
        if ports.is_empty() {
            state.known.host_ports.remove(pod_uid);
        } else {
            state.known.host_ports.insert(pod_uid.to_string(), ports);
        }
        drop(state);
        self.changed(|_| vec![host_ports_key(pod_uid)]);
    }

    /// Follows Services and EndpointSlices until a watch ends.
    pub async fn run(&self, client: kube::Client) -> Result<()> {
        tokio::select! {
            r = self.watch_services(client.clone()) => r,
            r = self.watch_slices(client) => r,
        }
    }

    async fn watch_services(&self, client: kube::Client) -> Result<()> {
        let mut changes = crate::watch::changes(Api::<Service>::all(client), "Service").boxed();
        let key = |svc: &Service| (svc.namespace().unwrap_or_default(), svc.name_any());
        while let Some(change) = changes.next().await {
            match change {
                Change::Apply(svc) => self.changed(|s| {
                    let k = key(&svc);
                    s.known.services.insert(k.clone(), svc);
                    vec![k]
                }),
                Change::Delete(svc) => self.changed(|s| {
                    let k = key(&svc);
                    s.known.services.remove(&k);
                    vec![k]
                }),
                Change::Relisted(all) => self.changed(|s| {
                    let relisted: HashMap<Key, Service> = all.into_iter().map(|svc| (key(&svc), svc)).collect();
                    let mut keys: Vec<Key> = s.known.services.keys().cloned().collect();
                    keys.extend(relisted.keys().cloned());
                    s.known.services = relisted;
                    s.services_listed = true;
                    keys
                }),
            }
        }
        anyhow::bail!("the Service watch ended")
    }

    async fn watch_slices(&self, client: kube::Client) -> Result<()> {
        let mut changes = crate::watch::changes(Api::<EndpointSlice>::all(client), "EndpointSlice").boxed();
        let key = |slice: &EndpointSlice| {
            let service = slice.labels().get(SERVICE_NAME_LABEL)?.clone();
            Some(((slice.namespace().unwrap_or_default(), service), slice.name_any()))
        };
        while let Some(change) = changes.next().await {
            match change {
                Change::Apply(slice) => {
                    let Some((k, name)) = key(&slice) else { continue };
                    crate::proxy::metrics::observe_trigger(&slice);
                    self.changed(|s| {
                        s.known.slices.entry(k.clone()).or_default().insert(name, slice);
                        vec![k]
                    })
                }
                Change::Delete(slice) => {
                    let Some((k, name)) = key(&slice) else { continue };
                    self.changed(|s| {
                        if let Some(m) = s.known.slices.get_mut(&k) {
                            m.remove(&name);
                            if m.is_empty() {
                                s.known.slices.remove(&k);
                            }
                        }
                        vec![k]
                    })
                }
                Change::Relisted(all) => self.changed(|s| {
                    let mut relisted: HashMap<Key, HashMap<String, EndpointSlice>> = HashMap::new();
                    for slice in all {
                        if let Some((k, name)) = key(&slice) {
                            relisted.entry(k).or_default().insert(name, slice);
                        }
                    }
                    let mut keys: Vec<Key> = s.known.slices.keys().cloned().collect();
                    keys.extend(relisted.keys().cloned());
                    s.known.slices = relisted;
                    s.slices_listed = true;
                    keys
                }),
            }
        }
        anyhow::bail!("the EndpointSlice watch ended")
    }

    /// Sets what the watches would have shown (tests).
    pub fn set(&self, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        self.changed(|s| {
            let mut keys: Vec<Key> = s.known.services.keys().cloned().collect();
            s.known = Known::default();
            for svc in services {
                let k = (svc.namespace().unwrap_or_default(), svc.name_any());
                keys.push(k.clone());
                s.known.services.insert(k, svc);
            }
            for slice in slices {
                let Some(service) = slice.labels().get(SERVICE_NAME_LABEL).cloned() else { continue };
                let k = (slice.namespace().unwrap_or_default(), service);
                s.known.slices.entry(k.clone()).or_default().insert(slice.name_any(), slice);
                keys.push(k);
            }
            s.services_listed = true;
            s.slices_listed = true;
            keys
        })
    }
}

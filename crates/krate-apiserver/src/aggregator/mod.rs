//! API aggregation, as upstream's kube-aggregator: APIService objects
//! (apiregistration.k8s.io/v1) say which server answers each group/version.
//!
//! - A *local* APIService (no `spec.service`) is served by krate itself. Every group/
//!   version of the kinds table gets one, kept by [`register`] with upstream's names,
//!   priorities and `kube-aggregator.kubernetes.io/automanaged` label (`onstart` for
//!   built-in groups, `true` for CustomResourceDefinitions', removed when their CRD goes).
//! - A *remote* one names a Service: requests under `/apis/{group}/{version}` are passed
//!   to it ([`proxy`]) over HTTPS, trusting its `caBundle`, authenticated with the front
//!   proxy's client certificate and the user in `X-Remote-User`/`-Group`/`-Extra-`
//!   headers (request-header authentication, which extension servers configure from the
//!   `extension-apiserver-authentication` ConfigMap that [`publish_authentication`]
//!   keeps in kube-system).
//! - Availability ([`available`]): each remote APIService's Service, endpoints and
//!   discovery document are checked on changes and every [`CHECK_INTERVAL`]; the
//!   `Available` condition says why not, with upstream's reasons and messages. The
//!   discovery document a check fetched is what krate's `/apis` documents list for that
//!   group/version, so an unavailable extension server drops out of discovery without
//!   breaking it for the rest.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use serde_json::{json, Value};

use crate::admission::ConfigurationMemo;
use crate::registry::Storage;
use crate::ApiServer;

pub mod available;
pub mod proxy;

/// How often remote APIServices are checked when nothing changes.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// The label upstream puts on the APIServices it keeps itself.
pub const AUTOMANAGED: &str = "kube-aggregator.kubernetes.io/automanaged";

/// The front proxy's identity: what krate presents to extension API servers, and what
/// they are told to trust.
#[derive(Clone)]
pub struct FrontProxy {
    /// The client certificate (CN `front-proxy-client`) and its key, PEM.
    pub client_cert_pem: String,
    pub client_key_pem: String,
    /// The CA that signed it (`requestheader-client-ca-file`).
    pub ca_pem: String,
    /// The CA of the cluster's client certificates (`client-ca-file`).
    pub client_ca_pem: String,
}

impl std::fmt::Debug for FrontProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontProxy").finish_non_exhaustive()
    }
}

/// What the availability checks last learned of a remote group/version.
#[derive(Clone, Debug, PartialEq)]
pub struct Remote {
    pub group: String,
    pub version: String,
    pub group_priority: i64,
    pub version_priority: i64,
    /// The `resources` of its APIResourceList, as last fetched.
    pub resources: Vec<Value>,
}

/// The APIService list a remote subset was drawn from, and that subset.
type RemoteMemo = (Arc<Vec<Value>>, Arc<Vec<Arc<Value>>>);

/// How often a remote server's OpenAPI v2 document is fetched again.
const OPENAPI_REFRESH: Duration = Duration::from_secs(60);

/// The aggregator's state shared by routing and discovery.
#[derive(Default)]
pub struct Aggregator {
    memo: ConfigurationMemo,
    /// The remote APIServices of the memo's list it was drawn from: every request asks
    /// whether its group/version is remote, and the answer is almost always no.
    remote_memo: Mutex<Option<RemoteMemo>>,
    /// Remote group/versions with a discovery document, by APIService name.
    remotes: Mutex<BTreeMap<String, Remote>>,
    /// Remote servers' OpenAPI v2 documents, by APIService name, with when fetched.
    openapi: Mutex<BTreeMap<String, (std::time::Instant, Arc<Value>)>>,
    /// Bumped whenever `remotes` changes, so cached discovery documents are rebuilt.
    generation: AtomicU64,
}

impl Aggregator {
    /// The APIServices as the watch cache has them.
    pub fn api_services(&self, storage: &Storage) -> Arc<Vec<Value>> {
        storage.cached_configuration::<APIService>(&self.memo)
    }

    /// The APIServices that name a Service, as the watch cache has them.
    pub fn remote_api_services(&self, storage: &Storage) -> Arc<Vec<Arc<Value>>> {
        let services = self.api_services(storage);
        let mut memo = self.remote_memo.lock().expect("aggregator lock");
        match &*memo {
            Some((source, remote)) if Arc::ptr_eq(source, &services) => remote.clone(),
            _ => {
                let remote: Arc<Vec<Arc<Value>>> = Arc::new(
                    services.iter().filter(|s| s["spec"]["service"].is_object()).map(|s| Arc::new(s.clone())).collect(),
                );
                *memo = Some((services, remote.clone()));
                remote
            }
        }
    }

    /// The remote APIService that serves `group`/`version`, if one does.
    pub fn remote_for(&self, storage: &Storage, group: &str, version: &str) -> Option<Arc<Value>> {
        if group.is_empty() {
            return None;
        }
        let remote = self.remote_api_services(storage);
        remote.iter().find(|s| s["spec"]["group"] == group && s["spec"]["version"] == version).cloned()
    }

    /// The groups remote APIServices serve (whether available or not, as upstream's
    /// group list), with their versions: best group first, best version first.
    pub fn remote_groups(&self, storage: &Storage) -> Vec<(String, Vec<String>)> {
        let services = self.remote_api_services(storage);
        let mut remote: Vec<&Value> = services.iter().map(|s| &**s).collect();
        let key = |s: &Value| {
            let spec = &s["spec"];
            let priority = |f: &str| -spec[f].as_i64().unwrap_or(0);
            (
                priority("groupPriorityMinimum"),
                spec["group"].as_str().unwrap_or_default().to_string(),
                priority("versionPriority"),
            )
        };
        remote.sort_by_key(|s| key(s));
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for s in remote {
            let (group, version) =
                (s["spec"]["group"].as_str().unwrap_or_default(), s["spec"]["version"].as_str().unwrap_or_default());
            match groups.iter_mut().find(|(g, _)| g == group) {
                Some((_, versions)) => versions.push(version.to_string()),
                None => groups.push((group.to_string(), vec![version.to_string()])),
            }
        }
        groups
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Remote group/versions with their resources, best group first (upstream's order:
    /// group priority, then name; versions by priority).
    pub fn remotes(&self) -> Vec<Remote> {
        let mut remotes: Vec<Remote> = self.remotes.lock().expect("aggregator lock").values().cloned().collect();
        remotes.sort_by(|a, b| {
            (b.group_priority, &a.group, b.version_priority).cmp(&(a.group_priority, &b.group, a.version_priority))
        });
        remotes
    }

    /// Records what a check of `name` learned (None: nothing to list).
    fn set_remote(&self, name: &str, remote: Option<Remote>) {
        let mut remotes = self.remotes.lock().expect("aggregator lock");
        let changed = match remote {
            Some(r) => remotes.insert(name.to_string(), r.clone()).as_ref() != Some(&r),
            None => remotes.remove(name).is_some(),
        };
        if changed {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets remotes whose APIService is gone or became local.
    fn retain(&self, names: &[String]) {
        let mut remotes = self.remotes.lock().expect("aggregator lock");
        let before = remotes.len();
        remotes.retain(|name, _| names.contains(name));
        self.openapi.lock().expect("aggregator lock").retain(|name, _| remotes.contains_key(name));
        if remotes.len() != before {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether `name`'s OpenAPI document is missing or due for a refresh.
    fn openapi_due(&self, name: &str) -> bool {
        let specs = self.openapi.lock().expect("aggregator lock");
        specs.get(name).is_none_or(|(at, _)| at.elapsed() >= OPENAPI_REFRESH)
    }

    /// Keeps `name`'s OpenAPI v2 document (bumping the generation when it changed).
    fn set_openapi(&self, name: &str, spec: Value) {
        let mut specs = self.openapi.lock().expect("aggregator lock");
        let changed = specs.get(name).is_none_or(|(_, old)| **old != spec);
        specs.insert(name.to_string(), (std::time::Instant::now(), Arc::new(spec)));
        if changed {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds the remote group/versions' paths and every definition they bring to an
    /// OpenAPI v2 document (the kinds table's definitions win a name clash), as
    /// upstream's aggregator merges the specs it downloads.
    pub fn merge_openapi_v2(&self, doc: &mut Value) {
        let remotes = self.remotes.lock().expect("aggregator lock").clone();
        let specs = self.openapi.lock().expect("aggregator lock");
        for (name, remote) in &remotes {
            let Some((_, spec)) = specs.get(name) else { continue };
            let prefix = format!("/apis/{}/{}", remote.group, remote.version);
            if let (Some(paths), Some(theirs)) = (doc["paths"].as_object_mut(), spec["paths"].as_object()) {
                for (path, item) in theirs.iter().filter(|(p, _)| p.starts_with(&prefix)) {
                    paths.insert(path.clone(), item.clone());
                }
            }
            if let (Some(defs), Some(theirs)) = (doc["definitions"].as_object_mut(), spec["definitions"].as_object()) {
                for (def, schema) in theirs {
                    defs.entry(def.clone()).or_insert_with(|| schema.clone());
                }
            }
        }
    }
}

/// Upstream's group and version priorities of built-in group/versions (kube-apiserver's
/// `apiVersionPriorities`); others get those of CRDs.
fn priority(group: &str, version: &str) -> (i64, i64) {
    let group_priority = match group {
        "" => return (18000, 1),
        "apiregistration.k8s.io" => 18000,
        "apps" => 17800,
        "events.k8s.io" => 17750,
        "authentication.k8s.io" => 17700,
        "authorization.k8s.io" => 17600,
        "autoscaling" => 17500,
        "batch" => 17400,
        "certificates.k8s.io" => 17300,
        "networking.k8s.io" => 17200,
        "policy" => 17100,
        "rbac.authorization.k8s.io" => 17000,
        "storage.k8s.io" => 16800,
        "apiextensions.k8s.io" | "admissionregistration.k8s.io" => 16700,
        "scheduling.k8s.io" => 16600,
        "coordination.k8s.io" => 16500,
        "node.k8s.io" => 16300,
        "discovery.k8s.io" | "resource.k8s.io" => 16200,
        "flowcontrol.apiserver.k8s.io" => 16100,
        "metrics.k8s.io" => 100,
        _ => return (1000, 100),
    };
    let version_priority = match (group, version) {
        ("autoscaling", "v2") => 30,
        ("flowcontrol.apiserver.k8s.io", "v1") => 21,
        (_, "v1") => 15,
        _ => 9,
    };
    (group_priority, version_priority)
}

/// The local APIServices the kinds table calls for, by name.
fn local_api_services(server: &ApiServer) -> BTreeMap<String, Value> {
    let kinds = server.kinds();
    let mut out = BTreeMap::new();
    for group in kinds.groups() {
        for version in &group.versions {
            let custom = kinds.kinds_in(&group.name, version).all(|k| k.custom.is_some());
            let name = format!("{version}.{}", group.name);
            let (group_priority, version_priority) = priority(&group.name, version);
            let api_service = json!({
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": name, "labels": {AUTOMANAGED: if custom { "true" } else { "onstart" }}},
                "spec": {"group": group.name, "version": version, "groupPriorityMinimum": group_priority, "versionPriority": version_priority},
            });
            out.insert(name, api_service);
        }
    }
    out
}

/// Creates the local APIServices the kinds table calls for and removes the automanaged
/// ones of CRD group/versions no longer served (upstream's autoregister controller).
/// An APIService someone else made for a group/version is left as it is.
pub async fn register(server: &ApiServer) {
    let scope = server.storage.builtin::<APIService>(None);
    let wanted = local_api_services(server);
    let existing = server.aggregator.api_services(&server.storage);
    for (name, api_service) in &wanted {
        if !existing.iter().any(|s| s["metadata"]["name"] == name.as_str()) {
            if let Err(e) = server.storage.ensure(&scope, api_service.clone()).await {
                tracing::warn!(apiservice = %name, error = %e, "registering a local APIService failed");
            }
        }
    }
    for stale in existing.iter() {
        let name = stale["metadata"]["name"].as_str().unwrap_or_default();
        let automanaged = stale["metadata"]["labels"][AUTOMANAGED] == "true";
        if automanaged && stale["spec"]["service"].is_null() && !wanted.contains_key(name) {
            let deleted = server.storage.delete(&scope, name, &Default::default()).await;
            if let Err(e) = deleted.map(|_| ()).or_else(|e| if e.code == 404 { Ok(()) } else { Err(e) }) {
                tracing::warn!(apiservice = %name, error = %e, "removing a stale local APIService failed");
            }
        }
    }
}

/// The ConfigMap extension API servers read their request-header authentication from
/// (kube-system/extension-apiserver-authentication), with upstream's keys.
pub fn authentication_config_map(front: &FrontProxy) -> Value {
    let list = |v: &str| serde_json::to_string(&[v]).expect("a string list");
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system"},
        "data": {
            "client-ca-file": front.client_ca_pem,
            "requestheader-allowed-names": list("front-proxy-client"),
            "requestheader-client-ca-file": front.ca_pem,
            "requestheader-extra-headers-prefix": list("X-Remote-Extra-"),
            "requestheader-group-headers": list("X-Remote-Group"),
            "requestheader-uid-headers": list("X-Remote-Uid"),
            "requestheader-username-headers": list("X-Remote-User"),
        },
    })
}

/// Starts the loop that keeps the local APIServices registered, the authentication
/// ConfigMap published and the remote APIServices' availability current: on changes of
/// APIServices, CRDs, Services and EndpointSlices (at most once a second), and every
/// [`CHECK_INTERVAL`].
pub fn start(server: Arc<ApiServer>) {
    tokio::spawn(async move {
        use k8s_openapi::api::core::v1 as core;
        let prefixes = [
            crate::registry::storage_prefix_of(krate_api::StorageResource::of::<APIService>()),
            crate::registry::storage_prefix_of(krate_api::StorageResource::of::<
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
            >()),
            crate::registry::storage_prefix_of(krate_api::StorageResource::of::<core::Service>()),
            crate::registry::storage_prefix_of(krate_api::StorageResource::of::<
                k8s_openapi::api::discovery::v1::EndpointSlice,
            >()),
        ];
        let mut changes: Vec<_> = prefixes.iter().map(|p| server.storage.cache.resource(p).subscribe()).collect();
        loop {
            if let Some(front) = &server.settings.front_proxy {
                let config_maps = server.storage.builtin::<core::ConfigMap>(Some("kube-system".into()));
                if let Err(e) = server.converge(config_maps, authentication_config_map(front), &["data"]).await {
                    tracing::warn!(error = %e, "publishing extension-apiserver-authentication failed");
                }
            }
            register(&server).await;
            available::check_all(&server).await;
            let any_change = futures::future::select_all(changes.iter_mut().map(|c| Box::pin(c.changed())));
            let _ = tokio::time::timeout(CHECK_INTERVAL, any_change).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            for c in &mut changes {
                c.borrow_and_update();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_upstream() {
        assert_eq!(priority("", "v1"), (18000, 1));
        assert_eq!(priority("apps", "v1"), (17800, 15));
        assert_eq!(priority("autoscaling", "v2"), (17500, 30));
        assert_eq!(priority("stable.example.com", "v1"), (1000, 100));
    }

    #[test]
    fn remotes_are_listed_best_group_first() {
        let aggregator = Aggregator::default();
        let remote = |group: &str, version: &str, gp: i64, vp: i64| Remote {
            group: group.into(),
            version: version.into(),
            group_priority: gp,
            version_priority: vp,
            resources: vec![],
        };
        aggregator.set_remote("v1.b.io", Some(remote("b.io", "v1", 100, 10)));
        aggregator.set_remote("v1.a.io", Some(remote("a.io", "v1", 100, 10)));
        aggregator.set_remote("v2.a.io", Some(remote("a.io", "v2", 100, 20)));
        aggregator.set_remote("v1.z.io", Some(remote("z.io", "v1", 500, 10)));
        let order: Vec<String> = aggregator.remotes().iter().map(|r| format!("{}/{}", r.group, r.version)).collect();
        assert_eq!(order, ["z.io/v1", "a.io/v2", "a.io/v1", "b.io/v1"]);
        let before = aggregator.generation();
        aggregator.set_remote("v1.b.io", Some(remote("b.io", "v1", 100, 10)));
        assert_eq!(aggregator.generation(), before, "an unchanged check changes nothing");
        aggregator.retain(&["v1.a.io".to_string()]);
        assert_eq!(aggregator.remotes().len(), 1);
        assert_eq!(aggregator.generation(), before + 1);
    }
}

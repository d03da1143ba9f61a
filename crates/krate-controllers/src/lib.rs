//! Controllers: API clients (kube-rs watchers and reconcilers) that work against any
//! Kubernetes API server. `krate server` runs them in-process.

pub mod cron;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod gc;
pub mod job;
pub mod namespace;
pub mod nodelifecycle;
pub mod owned;
pub mod perns;
pub mod podgc;
pub mod quota;
pub mod replicas;
pub mod selector;
pub mod servicelb;
pub mod statefulset;

use k8s_openapi::api::core::v1::Pod;
pub use krate_client::informer::{self, Informer};
use kube::api::{Api, ApiResource};

/// Changes of pods from the process's one shared pod watch.
pub type PodChanges = futures::channel::mpsc::UnboundedReceiver<std::sync::Arc<Pod>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("building an object: {0}")]
    Encode(#[from] serde_json::Error),
    /// The informer has not shown this controller's own last writes yet; try again soon.
    #[error("the cache has not caught up with this controller's writes")]
    CacheLag,
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    let api_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    ApiResource { group: group.into(), version: version.into(), api_version, kind: kind.into(), plural: plural.into() }
}

pub(crate) use krate_client::events::Recorder;
pub(crate) use krate_client::tolerate;

/// A reference to `obj` for events.
pub(crate) fn reference<K: kube::Resource<DynamicType = ()>>(obj: &K) -> k8s_openapi::api::core::v1::ObjectReference {
    obj.object_ref(&())
}

/// A short, stable name for a pod template (plus a collision count), in upstream's
/// pod-template-hash alphabet (no vowels, no confusable characters).
pub(crate) fn template_hash(template: &serde_json::Value, collisions: i64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&template.to_string(), &mut hasher);
    std::hash::Hash::hash(&collisions, &mut hasher);
    let mut n = std::hash::Hasher::finish(&hasher);
    (0..10)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// Runs `controller` forever with its own client, restarted when it stops or fails.
async fn supervise<F, Fut>(name: &'static str, client: kube::Client, controller: F)
where
    F: Fn(kube::Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    krate_client::supervised(name, || controller(client.clone())).await
}

/// An int-or-percent field (maxSurge, maxUnavailable, minAvailable) as a count of
/// `total`; percentages round up or down as the field's rules say.
pub(crate) fn int_or_percent(
    value: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
    total: i32,
    round_up: bool,
) -> i32 {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match value {
        IntOrString::Int(n) => *n,
        IntOrString::String(s) => {
            let exact = s.trim_end_matches('%').parse::<f64>().unwrap_or(0.0) * f64::from(total) / 100.0;
            (if round_up { exact.ceil() } else { exact.floor() }) as i32
        }
    }
}

/// Settings of the controllers.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long a node's Lease may go unrenewed before the node is unreachable.
    pub node_monitor_grace_period: std::time::Duration,
    /// Finished pods kept before the oldest are deleted.
    pub terminated_pod_gc_threshold: usize,
    /// The cluster CA (PEM) published in every namespace as `kube-root-ca.crt`.
    pub root_ca_pem: String,
}

/// Runs every controller, each restarted on failure.
pub async fn run(client: kube::Client, config: Config) -> anyhow::Result<()> {
    let grace = config.node_monitor_grace_period;
    let gc_threshold = config.terminated_pod_gc_threshold;
    let root_ca = perns::PerNamespace::root_ca(&config.root_ca_pem);
    let pods = Informer::<Pod>::default();
    tokio::join!(
        supervise("pod-informer", client.clone(), |c| pods.run(Api::all(c))),
        supervise("namespace", client.clone(), namespace::run),
        supervise("deployment", client.clone(), deployment::run),
        supervise("garbagecollector", client.clone(), |c| gc::run(c, pods.clone())),
        supervise("job", client.clone(), |c| job::run(c, &pods)),
        supervise("cronjob", client.clone(), cronjob::run),
        supervise("daemonset", client.clone(), |c| daemonset::run(c, &pods)),
        supervise("statefulset", client.clone(), |c| statefulset::run(c, &pods)),
        supervise("nodelifecycle", client.clone(), |c| nodelifecycle::run(c, grace, &pods)),
        supervise("endpoints", client.clone(), |c| endpoints::run(c, &pods)),
        supervise("disruption", client.clone(), |c| disruption::run(c, &pods)),
        supervise("resourcequota", client.clone(), |c| quota::run(c, &pods)),
        supervise("podgc", client.clone(), |c| podgc::run(c, &pods, gc_threshold)),
        supervise("serviceaccount", client.clone(), |c| perns::run(c, perns::PerNamespace::default_service_account())),
        supervise("service-lb", client.clone(), servicelb::run),
        supervise("root-ca-cert-publisher", client.clone(), |c| perns::run(c, root_ca.clone())),
        supervise("replicaset", client.clone(), |c| replicas::run(
            c,
            &pods,
            resource("apps", "v1", "ReplicaSet", "replicasets")
        )),
        supervise("replicationcontroller", client.clone(), |c| replicas::run(
            c,
            &pods,
            resource("", "v1", "ReplicationController", "replicationcontrollers")
        )),
    );
    Ok(())
}

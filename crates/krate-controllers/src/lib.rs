//! Controllers: API clients (kube-rs watchers and reconcilers) that work against any
//! Kubernetes API server. `krate server` runs them in-process.

pub mod bootstrap;
pub mod certificates;
pub mod cron;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod gc;
mod history;
pub mod hpa;
pub mod job;
pub mod mirroring;
pub mod namespace;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod owned;
pub mod perns;
pub mod podgc;
pub mod protection;
pub mod quota;
pub mod rbacaggregation;
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
/// Boxed: `run` joins some thirty of these, and a join of them unboxed is one state
/// machine large enough (in debug builds) to overflow a worker thread's stack when polled.
fn supervise<'a, F, Fut>(
    name: &'static str,
    client: kube::Client,
    controller: F,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>
where
    F: Fn(kube::Client) -> Fut + Send + Sync + 'a,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'a,
{
    Box::pin(async move { krate_client::supervised(name, || controller(client.clone())).await })
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
    /// The CA approved certificate requests are signed with (None: none are signed).
    pub signing: Option<certificates::SigningCa>,
    /// Approve bootstrap tokens' node client certificate requests at once (`false`:
    /// an admin approves each new node).
    pub approve_joins: bool,
    /// The range node pod CIDRs are assigned from (None: nodes bring their own).
    pub cluster_cidr: Option<nodeipam::ClusterCidr>,
}

/// The API clients the controllers act through. Inside `krate server` each controller
/// is its own service account in kube-system (upstream's controller-manager with
/// `--use-service-account-credentials`), bound by the default RBAC policy to
/// `system:controller:<name>`; its lists and watches go as the manager's own identity
/// (`system:kube-controller-manager`, which may list and watch everything), as
/// upstream's shared informers do. A stand-alone controller manager does the same with
/// tokens it requests for the accounts (`krate/src/accounts.rs`), unless told
/// `--use-service-account-credentials=false`.
#[derive(Clone)]
pub struct Clients(std::sync::Arc<ClientOf>);

/// The client of a controller's account (None: the manager's own).
type ClientOf = dyn Fn(Option<&str>) -> kube::Client + Send + Sync;

impl Clients {
    /// Every controller as `client`.
    pub fn single(client: kube::Client) -> Self {
        Self(std::sync::Arc::new(move |_| client.clone()))
    }

    /// `clients(None)` for the manager, `clients(Some(account))` for each controller.
    pub fn per_controller(clients: impl Fn(Option<&str>) -> kube::Client + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(clients))
    }

    /// The manager's own client (shared watches, leader election).
    pub fn manager(&self) -> kube::Client {
        (self.0)(None)
    }

    /// The client of the controller whose service account is `account`.
    pub fn of(&self, account: &str) -> kube::Client {
        (self.0)(Some(account))
    }
}

/// Runs every controller, each restarted on failure.
pub async fn run(clients: Clients, config: Config) -> anyhow::Result<()> {
    let grace = config.node_monitor_grace_period;
    let gc_threshold = config.terminated_pod_gc_threshold;
    let root_ca = perns::PerNamespace::root_ca(&config.root_ca_pem);
    let pods = Informer::<Pod>::default();
    let c = |account: &str| clients.of(account);
    tokio::join!(
        supervise("pod-informer", clients.manager(), |c| pods.run(Api::all(c))),
        supervise("namespace", c("namespace-controller"), namespace::run),
        supervise("deployment", c("deployment-controller"), deployment::run),
        supervise("garbagecollector", c("generic-garbage-collector"), |c| gc::run(c, pods.clone())),
        supervise("job", c("job-controller"), |jobs| job::run(jobs, c("ttl-after-finished-controller"), &pods)),
        supervise("cronjob", c("cronjob-controller"), cronjob::run),
        supervise("daemonset", c("daemon-set-controller"), |c| daemonset::run(c, &pods)),
        supervise("statefulset", c("statefulset-controller"), |c| statefulset::run(c, &pods)),
        supervise("nodelifecycle", c("node-controller"), |c| nodelifecycle::run(c, grace, &pods)),
        supervise("nodeipam", c("node-controller"), |c| async move {
            match config.cluster_cidr {
                Some(range) => nodeipam::run(c, range).await,
                None => futures::future::pending().await,
            }
        }),
        supervise("endpoints", c("endpoint-controller"), |e| endpoints::run(e, c("endpointslice-controller"), &pods)),
        supervise("endpointslice-mirroring", c("endpointslicemirroring-controller"), mirroring::run),
        supervise("disruption", c("disruption-controller"), |c| disruption::run(c, &pods)),
        supervise("horizontal-pod-autoscaler", c("horizontal-pod-autoscaler"), |c| hpa::run(c, &pods)),
        supervise("resourcequota", c("resourcequota-controller"), |c| quota::run(c, &pods)),
        supervise("podgc", c("pod-garbage-collector"), |c| podgc::run(c, &pods, gc_threshold)),
        supervise("pvc-protection", c("pvc-protection-controller"), |c| protection::run_claims(c, &pods)),
        supervise("pv-protection", c("pv-protection-controller"), protection::run_volumes),
        supervise("serviceaccount", c("service-account-controller"), |c| perns::run(
            c,
            perns::PerNamespace::default_service_account()
        )),
        supervise("service-lb", c("service-lb-controller"), servicelb::run),
        supervise("root-ca-cert-publisher", c("root-ca-cert-publisher"), |c| perns::run(c, root_ca.clone())),
        supervise("clusterrole-aggregation", c("clusterrole-aggregation-controller"), rbacaggregation::run),
        supervise("bootstrap-signer", c("bootstrap-signer"), bootstrap::run_signer),
        supervise("token-cleaner", c("token-cleaner"), bootstrap::run_cleaner),
        supervise("csr-approving", c("certificate-controller"), |c| certificates::run_approver(
            c,
            config.approve_joins
        )),
        supervise("csr-signing", c("certificate-controller"), |c| certificates::run_signer(c, config.signing.clone())),
        supervise("replicaset", c("replicaset-controller"), |c| replicas::run(
            c,
            &pods,
            resource("apps", "v1", "ReplicaSet", "replicasets")
        )),
        supervise("replicationcontroller", c("replication-controller"), |c| replicas::run(
            c,
            &pods,
            resource("", "v1", "ReplicationController", "replicationcontrollers")
        )),
    );
    Ok(())
}

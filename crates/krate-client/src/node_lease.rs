//! Node heartbeats: the Lease in `kube-node-lease` that a node agent (real or hollow)
//! renews and the node lifecycle controller watches.

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

pub const NAMESPACE: &str = "kube-node-lease";
/// Seconds a node's Lease is valid (upstream's default).
pub const DURATION_SECONDS: i32 = 40;
/// How often agents renew it (a quarter of its duration, as upstream).
pub const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Creates or renews the Lease of `node`, held by the node itself.
pub async fn renew(leases: &Api<Lease>, node: &str, manager: &str) -> kube::Result<()> {
    let renew_time = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": node, "namespace": NAMESPACE},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": DURATION_SECONDS, "renewTime": renew_time},
    });
    leases.patch(node, &PatchParams::apply(manager).force(), &Patch::Apply(lease)).await.map(|_| ())
}

//! `componentstatuses` (core/v1, deprecated upstream since 1.19 but still served and
//! still what `kubectl get cs` asks): the health of the control plane's parts, worked
//! out on each read, with upstream's names. The scheduler and the controller manager
//! are healthy while someone holds their leader Lease and renews it in time (they may
//! run in this process or anywhere else); `etcd-0` is the store (SQLite or etcd)
//! answering a read of its current revision, named as upstream (and k3s on SQLite)
//! name the storage backend.

use axum::body::Body;
use http::Response;
use k8s_openapi::api::coordination::v1::Lease;
use krate_api::{ApiError, ApiResult};
use serde_json::{json, Value};

use super::{Call, Handler};
use crate::ApiServer;

/// `GET componentstatuses[/{name}]`.
pub struct ComponentStatuses;

#[async_trait::async_trait]
impl Handler for ComponentStatuses {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>> {
        call.attrs.warn("v1 ComponentStatus is deprecated in v1.19+".into());
        let statuses = statuses(call.server).await;
        // Upstream names the resource in the singular here.
        super::read_answer(&call, statuses, || ApiError::not_found("", "componentstatus", call.name))
    }
}

/// Every component's status, in upstream's order.
async fn statuses(server: &ApiServer) -> Vec<Value> {
    let leases = server.storage.builtin::<Lease>(Some("kube-system".into()));
    let mut out = Vec::new();
    for (component, lease) in [("scheduler", "kube-scheduler"), ("controller-manager", "kube-controller-manager")] {
        let lease = server.storage.get(&leases, lease).await.ok().map(|l| l.parse());
        out.push(status(component, lease_health(component, lease.as_ref(), jiff::Timestamp::now())));
    }
    let store = match server.storage.store.current_revision().await {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("the store did not answer: {e}")),
    };
    out.push(status("etcd-0", store));
    out
}

/// A leader-elected component is healthy while its Lease is held and renewed in time.
fn lease_health(component: &str, lease: Option<&Value>, now: jiff::Timestamp) -> Result<(), String> {
    let spec = lease.map(|l| &l["spec"]).ok_or_else(|| format!("no {component} has ever taken its leader Lease"))?;
    if spec["holderIdentity"].as_str().is_none_or(str::is_empty) {
        return Err(format!("no {component} holds its leader Lease"));
    }
    let renewed: Option<jiff::Timestamp> = spec["renewTime"].as_str().and_then(|t| t.parse().ok());
    let duration = spec["leaseDurationSeconds"].as_i64().unwrap_or(15);
    match renewed {
        Some(at) if now.duration_since(at).as_secs() <= duration => Ok(()),
        Some(at) => Err(format!("its leader Lease was last renewed at {at}, more than {duration}s ago")),
        None => Err("its leader Lease has no renewTime".to_string()),
    }
}

fn status(name: &str, health: Result<(), String>) -> Value {
    let condition = match health {
        Ok(()) => json!({"type": "Healthy", "status": "True", "message": "ok"}),
        Err(error) => json!({"type": "Healthy", "status": "False", "error": error}),
    };
    json!({"kind": "ComponentStatus", "apiVersion": "v1", "metadata": {"name": name}, "conditions": [condition]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_is_healthy_while_its_lease_is_renewed() {
        let now: jiff::Timestamp = "2026-12-03T10:00:30Z".parse().unwrap();
        let lease = |holder: &str, renewed: &str| json!({"spec": {"holderIdentity": holder, "renewTime": renewed, "leaseDurationSeconds": 15}});
        assert_eq!(lease_health("scheduler", Some(&lease("a", "2026-12-03T10:00:20.000000Z")), now), Ok(()));
        let stale = lease_health("scheduler", Some(&lease("a", "2026-12-03T10:00:00.000000Z")), now).unwrap_err();
        assert!(stale.contains("more than 15s ago"), "{stale}");
        assert!(lease_health("scheduler", Some(&lease("", "2026-12-03T10:00:20Z")), now).is_err());
        assert_eq!(lease_health("scheduler", None, now).unwrap_err(), "no scheduler has ever taken its leader Lease");
    }
}

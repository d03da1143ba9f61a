//! `pods/eviction`: a deletion that respects PodDisruptionBudgets (what `kubectl drain`
//! uses). A pod covered by a budget with no disruptions left is refused with 429, as
//! upstream; otherwise the budget's `disruptionsAllowed` is spent (compare-and-swap on
//! its status, so two evictions cannot both spend the last one) and the pod is deleted.

use krate_api::object::{self, get, get_str};
use krate_api::selectors::LabelSelector;
use krate_api::{ApiError, ApiResult};
use serde_json::{json, Value};

use crate::registry::{DeleteOptions, ListOptions, Scope, Storage, Subresource, WriteOptions, Written};

/// Attempts at spending a budget before giving up (each lost race re-reads it).
const BUDGET_RETRIES: usize = 8;

fn too_many_requests(cause: String) -> ApiError {
    let mut err =
        ApiError::new(429, "TooManyRequests", "Cannot evict pod as it would violate the pod's disruption budget.");
    err.details = Some(json!({"causes": [{"reason": "DisruptionBudget", "message": cause}]}));
    err
}

/// Pods that are not running (yet or any more), or already going, need no budget.
fn needs_budget(pod: &Value) -> bool {
    get(pod, &["metadata", "deletionTimestamp"]).is_none() && get_str(pod, &["status", "phase"]) == Some("Running")
}

fn covers(pdb: &Value, pod: &Value) -> bool {
    match get(pdb, &["spec", "selector"]) {
        // policy/v1: a null selector selects nothing, an empty one selects everything.
        None | Some(Value::Null) => false,
        Some(sel) => LabelSelector::from_json(sel).is_ok_and(|s| s.matches_json(get(pod, &["metadata", "labels"]))),
    }
}

impl Storage {
    /// Evicts pod `name`: `pods` is the pods scope, `budgets` the poddisruptionbudgets
    /// scope of the same namespace, `delete` the Eviction's deleteOptions.
    pub async fn evict(&self, pods: &Scope, budgets: &Scope, name: &str, delete: &DeleteOptions) -> ApiResult<Written> {
        let pod = self.get(pods, name).await?.parse();
        let opts =
            WriteOptions { dry_run: delete.dry_run, field_manager: "eviction".into(), ..WriteOptions::default() };
        if needs_budget(&pod) {
            let matching: Vec<Value> = self
                .list(budgets, &ListOptions::default())
                .await?
                .items
                .iter()
                .map(|o| o.parse())
                .filter(|pdb| covers(pdb, &pod))
                .collect();
            match matching.as_slice() {
                [] => {}
                [pdb] => self.spend_budget(budgets, object::name(pdb), name, &opts).await?,
                _ => return Err(ApiError::internal(
                    "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                )),
            }
        }
        self.delete(pods, name, delete).await?;
        // Upstream's create handler fills in the code of the bare Success it gets back.
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201});
        Ok(Written { code: 201, body, warnings: vec![] })
    }

    /// Takes one disruption from budget `pdb_name` for `pod`, or refuses with 429.
    async fn spend_budget(&self, budgets: &Scope, pdb_name: &str, pod: &str, opts: &WriteOptions) -> ApiResult<()> {
        for _ in 0..BUDGET_RETRIES {
            let mut pdb = self.get(budgets, pdb_name).await?.parse();
            let generation = get(&pdb, &["metadata", "generation"]).and_then(Value::as_i64).unwrap_or(0);
            let observed = get(&pdb, &["status", "observedGeneration"]).and_then(Value::as_i64).unwrap_or(0);
            if observed < generation {
                return Err(too_many_requests(format!(
                    "The disruption budget {pdb_name} is still being processed by the server."
                )));
            }
            let allowed = get(&pdb, &["status", "disruptionsAllowed"]).and_then(Value::as_i64).unwrap_or(0);
            if allowed < 0 {
                return Err(ApiError::forbidden("pdb disruptions allowed is negative"));
            }
            if allowed == 0 {
                let desired = get(&pdb, &["status", "desiredHealthy"]).and_then(Value::as_i64).unwrap_or(0);
                let current = get(&pdb, &["status", "currentHealthy"]).and_then(Value::as_i64).unwrap_or(0);
                return Err(too_many_requests(format!(
                    "The disruption budget {pdb_name} needs {desired} healthy pods and has {current} currently"
                )));
            }
            object::set(&mut pdb, &["status", "disruptionsAllowed"], json!(allowed - 1));
            object::set(&mut pdb, &["status", "disruptedPods", pod], json!(object::now_rfc3339()));
            // The resourceVersion read above makes this a compare-and-swap.
            match self.update(budgets, pdb_name, Subresource::Status, pdb, opts).await {
                Ok(_) => return Ok(()),
                Err(e) if e.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        Err(too_many_requests(format!("The disruption budget {pdb_name} is changing too often; try again")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_cover_pods_by_selector() {
        let pod = json!({"metadata": {"labels": {"app": "web"}}, "status": {"phase": "Running"}});
        assert!(covers(&json!({"spec": {"selector": {"matchLabels": {"app": "web"}}}}), &pod));
        assert!(covers(&json!({"spec": {"selector": {}}}), &pod));
        assert!(!covers(&json!({"spec": {}}), &pod));
        assert!(!covers(&json!({"spec": {"selector": {"matchLabels": {"app": "db"}}}}), &pod));
        assert!(needs_budget(&pod));
        assert!(!needs_budget(&json!({"status": {"phase": "Pending"}})));
    }
}

//! ClusterRole aggregation (upstream's clusterrole-aggregation controller): a ClusterRole
//! with an `aggregationRule` gets as its rules those of every ClusterRole its selectors
//! match, in name order, each rule once. This is how `admin`, `edit` and `view` pick up
//! the rules of `system:aggregate-to-*` and of any role labelled for them (CRD
//! installers label theirs `rbac.authorization.k8s.io/aggregate-to-view: "true"`).

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::json;

use crate::Error;

struct Context {
    client: kube::Client,
    roles: Store<ClusterRole>,
}

/// The rules `role` should have, or None if it aggregates nothing.
fn aggregated(role: &ClusterRole, all: &[Arc<ClusterRole>]) -> Option<Vec<PolicyRule>> {
    let selectors = role.aggregation_rule.as_ref()?.cluster_role_selectors.clone().unwrap_or_default();
    let mut sources: Vec<&Arc<ClusterRole>> = all
        .iter()
        .filter(|r| r.name_any() != role.name_any())
        .filter(|r| {
            selectors
                .iter()
                .any(|s| crate::selector::selects(&crate::selector::label_selector_string(&json!(s)), &***r))
        })
        .collect();
    sources.sort_by_key(|r| r.name_any());
    let mut rules: Vec<PolicyRule> = Vec::new();
    for rule in sources.iter().flat_map(|r| r.rules.clone().unwrap_or_default()) {
        if !rules.contains(&rule) {
            rules.push(rule);
        }
    }
    Some(rules)
}

async fn reconcile(role: Arc<ClusterRole>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(rules) = aggregated(&role, &ctx.roles.state()) else { return Ok(Action::await_change()) };
    if role.rules.clone().unwrap_or_default() == rules {
        return Ok(Action::await_change());
    }
    let api: Api<ClusterRole> = Api::all(ctx.client.clone());
    let patch = json!({"rules": rules});
    api.patch(&role.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(Action::await_change())
}

fn error_policy(_: Arc<ClusterRole>, err: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "aggregating a ClusterRole failed");
    Action::requeue(std::time::Duration::from_secs(5))
}

pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    let api: Api<ClusterRole> = Api::all(client.clone());
    let controller = Controller::new(api, watcher::Config::default());
    let roles = controller.store();
    let context = Arc::new(Context { client, roles: roles.clone() });
    // Any change of a role may change what the aggregating roles collect.
    let aggregators = move |_: ClusterRole| {
        roles
            .state()
            .iter()
            .filter(|r| r.aggregation_rule.is_some())
            .map(|r| ObjectRef::from_obj(&**r))
            .collect::<Vec<_>>()
    };
    controller
        .watches(Api::<ClusterRole>::all(context.client.clone()), watcher::Config::default(), aggregators)
        .run(reconcile, error_policy, context)
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn role(name: &str, labels: &[(&str, &str)], verbs: &[&str]) -> Arc<ClusterRole> {
        let mut r = ClusterRole::default();
        r.metadata.name = Some(name.into());
        r.metadata.labels =
            Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>());
        r.rules = Some(vec![PolicyRule {
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            api_groups: Some(vec!["".into()]),
            resources: Some(vec!["pods".into()]),
            ..Default::default()
        }]);
        Arc::new(r)
    }

    #[test]
    fn aggregating_roles_collect_the_rules_they_select() {
        let mut view = (*role("view", &[], &[])).clone();
        view.rules = None;
        view.aggregation_rule =
            Some(serde_json::from_value(json!({"clusterRoleSelectors": [{"matchLabels": {"agg": "true"}}]})).unwrap());
        let all = vec![
            role("b", &[("agg", "true")], &["list"]),
            role("a", &[("agg", "true")], &["get"]),
            role("dup", &[("agg", "true")], &["get"]),
            role("other", &[], &["delete"]),
        ];
        let rules = aggregated(&view, &all).unwrap();
        let verbs: Vec<&str> = rules.iter().map(|r| r.verbs[0].as_str()).collect();
        assert_eq!(verbs, ["get", "list"], "name order, each rule once, only selected roles");
        assert_eq!(aggregated(&all[0], &all), None);
    }
}

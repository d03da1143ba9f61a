//! ControllerRevisions: the pod templates a DaemonSet or StatefulSet has had.
//!
//! Each is kept in upstream's format, `data: {"spec": {"template": {..., "$patch":
//! "replace"}}}` (the patch `kubectl rollout undo` applies to go back to it), numbered in
//! the order the owner moved to it, and labelled with the template's labels. Once an
//! owner has more than its `revisionHistoryLimit` revisions that no pod uses, the oldest
//! go.

use k8s_openapi::api::apps::v1::ControllerRevision;
use kube::api::{Api, DeleteParams};
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::Error;

/// The ControllerRevisions `uid` controls, oldest (lowest number) first.
pub(crate) async fn owned(api: &Api<ControllerRevision>, uid: &str) -> Result<Vec<ControllerRevision>, Error> {
    let mut owned: Vec<ControllerRevision> = api
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|r| r.owner_references().iter().any(|o| o.uid == uid && o.controller == Some(true)))
        .collect();
    owned.sort_by_key(|r| r.revision.unwrap_or(0));
    Ok(owned)
}

/// The pod template a revision keeps.
pub(crate) fn template_of(revision: &ControllerRevision) -> Option<Value> {
    let mut template = revision.data.0.pointer("/spec/template").cloned()?;
    if let Value::Object(t) = &mut template {
        t.remove("$patch");
    }
    Some(template)
}

/// A revision keeping `template`, numbered `number`, controlled by `owner`.
pub(crate) fn revision(
    name: &str,
    owner: Value,
    labels: Value,
    template: &Value,
    number: i64,
) -> Result<ControllerRevision, Error> {
    let mut template = template.clone();
    template["$patch"] = json!("replace");
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
        "data": {"spec": {"template": template}},
        "revision": number,
    }))?)
}

/// Deletes the oldest of `old` beyond `limit`, leaving those `in_use` says pods still run.
pub(crate) async fn prune(
    api: &Api<ControllerRevision>,
    old: &[ControllerRevision],
    in_use: impl Fn(&ControllerRevision) -> bool,
    limit: i32,
) {
    let unused: Vec<&ControllerRevision> = old.iter().filter(|r| !in_use(r)).collect();
    for revision in unused.iter().take(unused.len().saturating_sub(limit.max(0) as usize)) {
        let _ = api.delete(&revision.name_any(), &DeleteParams::background()).await;
    }
}

//! Serving CustomResourceDefinitions: whenever a CRD changes, the kinds table is rebuilt
//! from the built-in kinds plus every accepted CRD; CRDs are then marked NamesAccepted
//! and Established, and a deleted CRD first loses all of its objects.

use std::sync::Arc;

use krate_api::custom::{self, CLEANUP_FINALIZER};
use krate_api::kinds::{builtin_kinds, Registry};
use krate_api::object::{self, get_str};
use krate_api::KindInfo;
use serde_json::{json, Value};

use crate::registry::{self, DeleteOptions, ListOptions, Scope, Subresource, WriteOptions};
use crate::ApiServer;

const MANAGER: &str = "krate-apiextensions-controller";

fn crd_kind(kinds: &Registry) -> Arc<KindInfo> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    kinds.of::<CustomResourceDefinition>().expect("CRDs are built in").clone()
}

/// Runs the CRD loop until the server stops; the first pass completes before returning
/// so CRDs stored earlier are served as soon as the server listens.
pub async fn start(server: Arc<ApiServer>) {
    let prefix = registry::storage_prefix(&crd_kind(&server.kinds()));
    let mut changes = server.storage.cache.resource(&prefix).subscribe();
    reconcile(&server, &prefix).await;
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            reconcile(&server, &prefix).await;
        }
    });
}

/// A CRD whose conversion strategy is Webhook converts every served version through it
/// (objects stored before a storage version change are converted too).
fn with_conversion_webhook(server: &Arc<ApiServer>, crd: &Value, kinds: &mut [KindInfo]) {
    let conversion = &crd["spec"]["conversion"];
    if conversion["strategy"] != "Webhook" {
        return;
    }
    let versions = crd["spec"]["versions"].as_array().into_iter().flatten();
    let Some(storage) = versions.into_iter().find(|v| v["storage"] == true).and_then(|v| v["name"].as_str()) else {
        return;
    };
    let group = crd["spec"]["group"].as_str().unwrap_or_default();
    let storage = format!("{group}/{storage}");
    for kind in kinds {
        let webhook = &conversion["webhook"];
        kind.conversion =
            Some(crate::webhook::conversion::for_version(server, &kind.api_version(), &storage, &kind.kind, webhook));
    }
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": object::now_rfc3339()})
}

async fn reconcile(server: &Arc<ApiServer>, prefix: &str) {
    server.storage.cache.sync().await;
    let crds: Vec<Value> = {
        let rc = server.storage.cache.resource(prefix);
        let state = rc.state.read().expect("cache lock");
        state.objects.values().map(|o| o.parse()).collect()
    };
    let mut kinds = builtin_kinds();
    let mut verdicts = Vec::new();
    for crd in &crds {
        let mut custom = custom::kinds_of(crd);
        with_conversion_webhook(server, crd, &mut custom);
        let clash = custom.iter().find(|c| {
            kinds
                .iter()
                .any(|k| k.group == c.group && k.version == c.version && (k.plural == c.plural || k.kind == c.kind))
        });
        let accepted = clash.is_none();
        if accepted {
            kinds.extend(custom);
        }
        verdicts.push((crd, accepted));
    }
    server.set_kinds(Registry::new(kinds));
    let kinds = server.kinds();
    let crd_kind = crd_kind(&kinds);
    for (crd, accepted) in verdicts {
        let name = object::name(crd).to_string();
        let result = if crd.pointer("/metadata/deletionTimestamp").is_some() {
            clean_up(server, &kinds, &crd_kind, crd).await
        } else {
            update_status(server, &crd_kind, crd, accepted).await
        };
        if let Err(e) = result {
            tracing::warn!(crd = %name, error = %e.message, "reconciling CustomResourceDefinition failed");
        }
    }
}

/// Writes NamesAccepted/Established (and acceptedNames) when they are not yet right.
async fn update_status(
    server: &ApiServer,
    crd_kind: &Arc<KindInfo>,
    crd: &Value,
    accepted: bool,
) -> krate_api::ApiResult<()> {
    let names = crd.pointer("/spec/names").cloned().unwrap_or_default();
    let state = if accepted { "True" } else { "False" };
    let has = |t: &str| {
        crd.pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == t && c["status"] == state))
    };
    if has("NamesAccepted") && has("Established") && (!accepted || crd.pointer("/status/acceptedNames") == Some(&names))
    {
        return Ok(());
    }
    let mut status = crd.get("status").cloned().unwrap_or_else(|| json!({}));
    status["conditions"] = if accepted {
        json!([
            condition("NamesAccepted", "True", "NoConflicts", "no conflicts found"),
            condition("Established", "True", "InitialNamesAccepted", "the initial names have been accepted"),
        ])
    } else {
        json!([
            condition(
                "NamesAccepted",
                "False",
                "ResourceConflict",
                "the resource or kind is already served in this group and version"
            ),
            condition("Established", "False", "NotAccepted", "not all names are accepted"),
        ])
    };
    if accepted {
        status["acceptedNames"] = names;
    }
    let storage = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .and_then(|vs| vs.iter().find(|v| v["storage"] == true))
        .map(|v| v["name"].clone());
    let mut stored: Vec<Value> = status.get("storedVersions").and_then(Value::as_array).cloned().unwrap_or_default();
    if let Some(s) = storage.filter(|s| !stored.contains(s)) {
        stored.push(s);
    }
    status["storedVersions"] = json!(stored);
    let mut body = crd.clone();
    body["status"] = status;
    let scope = Scope { kind: crd_kind.clone(), namespace: None };
    let opts = WriteOptions { field_manager: MANAGER.into(), ..Default::default() };
    server.storage.update(&scope, object::name(crd), Subresource::Status, body, &opts).await.map(|_| ())
}

/// A deleted CRD: delete every object it defines, then release the CRD.
async fn clean_up(
    server: &ApiServer,
    kinds: &Registry,
    crd_kind: &Arc<KindInfo>,
    crd: &Value,
) -> krate_api::ApiResult<()> {
    if !object::finalizers(crd).iter().any(|f| f == CLEANUP_FINALIZER) {
        return Ok(());
    }
    let group = get_str(crd, &["spec", "group"]).unwrap_or_default();
    let plural = get_str(crd, &["spec", "names", "plural"]).unwrap_or_default();
    // Objects go as stored, unconverted: a conversion webhook that is gone must not keep
    // a CRD from being deleted.
    let served = kinds.kinds().iter().find(|k| k.custom.is_some() && k.group == group && k.plural == plural).map(|k| {
        let mut unconverted = KindInfo::clone(k);
        unconverted.conversion = None;
        Arc::new(unconverted)
    });
    if let Some(kind) = served {
        let scope = Scope { kind, namespace: None };
        server.storage.delete_collection(&scope, &ListOptions::default(), &DeleteOptions::default()).await?;
        if !server.storage.list(&scope, &ListOptions::default()).await?.items.is_empty() {
            // Objects with finalizers of their own: try again when the CRD changes next.
            return Ok(());
        }
    }
    let mut body = crd.clone();
    let remaining: Vec<String> = object::finalizers(crd).into_iter().filter(|f| f != CLEANUP_FINALIZER).collect();
    body["metadata"]["finalizers"] = json!(remaining);
    let scope = Scope { kind: crd_kind.clone(), namespace: None };
    let opts = WriteOptions { field_manager: MANAGER.into(), ..Default::default() };
    server.storage.update(&scope, object::name(crd), Subresource::Main, body, &opts).await.map(|_| ())
}

//! Legacy discovery documents (`/api`, `/apis`, `/apis/{group}`, `/api/v1`, ...) and
//! aggregated discovery, each with the group/versions of remote APIServices after the
//! kinds table's (`crate::aggregator`).

use krate_api::kinds::Registry;
use krate_api::{ApiError, ApiResult, KindInfo};
use serde_json::{json, Value};

use crate::aggregator::Remote;

pub fn legacy_root(advertise_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": advertise_address}],
    })
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> =
        versions.iter().map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v})).collect();
    json!({"name": name, "versions": versions, "preferredVersion": versions[0]})
}

/// Remote groups and versions, best first (`Aggregator::remote_groups`).
pub type RemoteGroups = [(String, Vec<String>)];

/// Every named group with its versions: the kinds table's, then remote ones (a remote
/// version of a local group comes after the local versions).
fn all_groups(kinds: &Registry, remote: &RemoteGroups) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> =
        kinds.groups().iter().filter(|g| !g.name.is_empty()).map(|g| (g.name.clone(), g.versions.clone())).collect();
    for (name, versions) in remote {
        match groups.iter_mut().find(|(g, _)| g == name) {
            Some((_, local)) => {
                local.extend(versions.iter().filter(|v| !local.contains(v)).cloned().collect::<Vec<_>>())
            }
            None => groups.push((name.clone(), versions.clone())),
        }
    }
    groups
}

pub fn group_list(kinds: &Registry, remote: &RemoteGroups) -> Value {
    let groups: Vec<Value> =
        all_groups(kinds, remote).iter().map(|(name, versions)| group_json(name, versions)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(kinds: &Registry, remote: &RemoteGroups, name: &str) -> ApiResult<Value> {
    let groups = all_groups(kinds, remote);
    let (name, versions) = groups.iter().find(|(g, _)| g == name).ok_or_else(not_found)?;
    let mut v = group_json(name, versions);
    v["kind"] = json!("APIGroup");
    v["apiVersion"] = json!("v1");
    Ok(v)
}

fn not_found() -> ApiError {
    ApiError::no_such_path()
}

/// The resources and subresources of one kind, as discovery lists them.
pub fn api_resources(k: &KindInfo) -> Vec<Value> {
    let mut main = json!({
        "name": k.plural,
        "singularName": k.singular,
        "namespaced": k.namespaced,
        "kind": k.kind,
        "verbs": k.verbs,
    });
    if !k.short_names.is_empty() {
        main["shortNames"] = json!(k.short_names);
    }
    if !k.categories.is_empty() {
        main["categories"] = json!(k.categories);
    }
    let mut out = vec![main];
    let sub = |name: &str, kind: &str, verbs: &[&str]| json!({"name": format!("{}/{name}", k.plural), "singularName": "", "namespaced": k.namespaced, "kind": kind, "verbs": verbs});
    if k.status {
        out.push(sub("status", &k.kind, &["get", "patch", "update"]));
    }
    if k.scale.is_some() {
        let mut s = sub("scale", "Scale", &["get", "patch", "update"]);
        s["group"] = json!("autoscaling");
        s["version"] = json!("v1");
        out.push(s);
    }
    for extra in k.subresources {
        let mut s = sub(extra.name, extra.kind, extra.verbs);
        if let Some((group, version)) = extra.group_version {
            s["group"] = json!(group);
            s["version"] = json!(version);
        }
        out.push(s);
    }
    out
}

pub fn resource_list(kinds: &Registry, group: &str, version: &str) -> ApiResult<Value> {
    let resources: Vec<Value> = kinds.kinds_in(group, version).flat_map(|k| api_resources(k)).collect();
    if resources.is_empty() {
        return Err(not_found());
    }
    let group_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Ok(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}))
}

/// The media type of aggregated discovery documents, if `accept` asks for one first.
pub fn wants_aggregated(accept: Option<&str>) -> Option<&'static str> {
    for media in accept?.split(',') {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        let has = |p: &str| params.contains(&p);
        if has("g=apidiscovery.k8s.io") && has("as=APIGroupDiscoveryList") {
            if has("v=v2") {
                return Some("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList");
            }
            if has("v=v2beta1") {
                return Some("application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList");
            }
        }
        if params.first().is_some_and(|e| matches!(*e, "application/json" | "*/*" | "application/*"))
            && params.len() == 1
        {
            return None;
        }
    }
    None
}

fn scope(k: &KindInfo) -> &'static str {
    if k.namespaced {
        "Namespaced"
    } else {
        "Cluster"
    }
}

/// One resource in aggregated discovery (`APIResourceDiscovery`).
fn resource_discovery(k: &KindInfo) -> Value {
    let mut r = json!({
        "resource": k.plural,
        "responseKind": {"group": k.group, "version": k.version, "kind": k.kind},
        "scope": scope(k),
        "singularResource": k.singular,
        "verbs": k.verbs,
    });
    if !k.short_names.is_empty() {
        r["shortNames"] = json!(k.short_names);
    }
    if !k.categories.is_empty() {
        r["categories"] = json!(k.categories);
    }
    let subresources: Vec<Value> = api_resources(k)
        .iter()
        .skip(1)
        .map(|s| {
            let name = s["name"].as_str().unwrap_or_default().split_once('/').map(|(_, sub)| sub).unwrap_or_default();
            let group = s.get("group").cloned().unwrap_or(json!(k.group));
            let version = s.get("version").cloned().unwrap_or(json!(k.version));
            json!({"subresource": name, "responseKind": {"group": group, "version": version, "kind": s["kind"]}, "verbs": s["verbs"]})
        })
        .collect();
    if !subresources.is_empty() {
        r["subresources"] = json!(subresources);
    }
    r
}

/// A remote group/version's resources (an APIResourceList's) in aggregated discovery's
/// form: subresources (`parent/sub`) under their parent.
fn remote_discovery(remote: &Remote) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for r in &remote.resources {
        let name = r["name"].as_str().unwrap_or_default();
        let kind = json!({
            "group": r.get("group").cloned().unwrap_or(json!(remote.group)),
            "version": r.get("version").cloned().unwrap_or(json!(remote.version)),
            "kind": r["kind"],
        });
        if let Some((parent, sub)) = name.split_once('/') {
            let subresource = json!({"subresource": sub, "responseKind": kind, "verbs": r["verbs"]});
            if let Some(p) = out.iter_mut().find(|p| p["resource"] == parent) {
                p["subresources"]
                    .as_array_mut()
                    .map(|s| s.push(subresource.clone()))
                    .unwrap_or_else(|| p["subresources"] = json!([subresource]));
            }
            continue;
        }
        let scope = if r["namespaced"].as_bool().unwrap_or(false) { "Namespaced" } else { "Cluster" };
        let mut d = json!({"resource": name, "responseKind": kind, "scope": scope,
            "singularResource": r["singularName"].as_str().unwrap_or_default(), "verbs": r["verbs"]});
        for field in ["shortNames", "categories"] {
            if r[field].as_array().is_some_and(|a| !a.is_empty()) {
                d[field] = r[field].clone();
            }
        }
        out.push(d);
    }
    out
}

/// `APIGroupDiscoveryList` for `/api` (core) or `/apis` (every named group, then the
/// remote group/versions whose servers answered their last check).
pub fn aggregated(kinds: &Registry, remotes: &[Remote], core: bool, api_version: &str) -> Value {
    let mut items: Vec<Value> = kinds
        .groups()
        .iter()
        .filter(|g| g.name.is_empty() == core)
        .map(|g| {
            let versions: Vec<Value> = g
                .versions
                .iter()
                .map(|v| {
                    let resources: Vec<Value> = kinds.kinds_in(&g.name, v).map(|k| resource_discovery(k)).collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": g.name, "creationTimestamp": null}, "versions": versions})
        })
        .collect();
    for remote in remotes.iter().filter(|_| !core) {
        let version = json!({"version": remote.version, "resources": remote_discovery(remote), "freshness": "Current"});
        match items.iter_mut().find(|i| i["metadata"]["name"] == remote.group.as_str()) {
            Some(item) => item["versions"].as_array_mut().expect("versions").push(version),
            None => items
                .push(json!({"metadata": {"name": remote.group, "creationTimestamp": null}, "versions": [version]})),
        }
    }
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": api_version, "metadata": {}, "items": items})
}

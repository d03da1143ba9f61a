//! OpenAPI v3 documents. For now they describe each group/version's operations (paths,
//! verbs, the kind each serves and the query parameters it accepts), which is what
//! `kubectl` reads to decide that the server validates fields itself.

use krate_api::kinds::Registry;
use krate_api::{ApiError, ApiResult, KindInfo};
use serde_json::{json, Map, Value};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

pub fn root(kinds: &Registry) -> Value {
    let mut paths = Map::new();
    for g in kinds.groups() {
        for v in &g.versions {
            let p = gv_path(&g.name, v);
            paths.insert(p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}")}));
        }
    }
    json!({"paths": paths})
}

fn query_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": true}})
}

fn write_params() -> Vec<Value> {
    vec![
        query_param("dryRun", "When present, indicates that modifications should not be persisted."),
        query_param("fieldManager", "fieldManager is a name associated with the actor or entity that is making these changes."),
        query_param("fieldValidation", "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields. Valid values are: Ignore, Warn (default), Strict."),
    ]
}

fn operations(k: &KindInfo) -> Vec<(String, Value)> {
    let gvk = json!({"group": k.group, "version": k.version, "kind": k.kind});
    let base = format!("/{}", gv_path(&k.group, &k.version));
    let ns = if k.namespaced { "/namespaces/{namespace}" } else { "" };
    let collection = format!("{base}{ns}/{}", k.plural);
    let item = format!("{collection}/{{name}}");
    let op = |action: &str, params: Vec<Value>| {
        json!({"x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": {"200": {"description": "OK"}}})
    };
    let verbs = |v: &str| k.verbs.iter().any(|x| x == v);
    let mut out = Vec::new();
    let mut coll = Map::new();
    if verbs("list") {
        coll.insert("get".into(), op("list", vec![]));
    }
    if verbs("create") {
        coll.insert("post".into(), op("post", write_params()));
    }
    if verbs("deletecollection") {
        coll.insert("delete".into(), op("deletecollection", vec![]));
    }
    out.push((collection, Value::Object(coll)));
    let mut it = Map::new();
    if verbs("get") {
        it.insert("get".into(), op("get", vec![]));
    }
    if verbs("update") {
        it.insert("put".into(), op("put", write_params()));
    }
    if verbs("patch") {
        it.insert("patch".into(), op("patch", write_params()));
    }
    if verbs("delete") {
        it.insert("delete".into(), op("delete", vec![]));
    }
    out.push((item.clone(), Value::Object(it)));
    if k.status {
        out.push((format!("{item}/status"), json!({"get": op("get", vec![]), "put": op("put", write_params()), "patch": op("patch", write_params())})));
    }
    out
}

pub fn group_version(kinds: &Registry, group: &str, version: &str) -> ApiResult<Value> {
    let mut paths = Map::new();
    for k in kinds.kinds_in(group, version) {
        for (p, ops) in operations(k) {
            paths.insert(p, ops);
        }
    }
    if paths.is_empty() {
        return Err(ApiError::new(404, "NotFound", "the server could not find the requested resource"));
    }
    Ok(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": crate::version_info()["gitVersion"]},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

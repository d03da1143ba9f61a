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
    // (verb, HTTP method, x-kubernetes-action, takes write parameters)
    let table = |entries: &[(&str, &str, &str, bool)]| {
        let mut ops = Map::new();
        for (verb, method, action, writes) in entries {
            if k.verbs.iter().any(|v| v == verb) {
                ops.insert(method.to_string(), op(action, if *writes { write_params() } else { vec![] }));
            }
        }
        Value::Object(ops)
    };
    let mut out = vec![(
        collection,
        table(&[("list", "get", "list", false), ("create", "post", "post", true), ("deletecollection", "delete", "deletecollection", false)]),
    )];
    let it = table(&[("get", "get", "get", false), ("update", "put", "put", true), ("patch", "patch", "patch", true), ("delete", "delete", "delete", false)]);
    out.push((item.clone(), it));
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

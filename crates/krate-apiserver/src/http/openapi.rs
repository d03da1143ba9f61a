//! OpenAPI documents: v2 (`/openapi/v2`, one document) and v3 (`/openapi/v3`, one per
//! group/version). Both list every served operation with its parameters and the schemas
//! of the kinds, with upstream's descriptions and extensions, so `kubectl explain`,
//! client-side validation and generated clients work.

use std::collections::{BTreeMap, BTreeSet};

use krate_api::kinds::Registry;
use krate_api::schema;
use krate_api::{ApiError, ApiResult, KindInfo};
use serde_json::{json, Map, Value};

const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    V2,
    V3,
}

impl Style {
    fn reference(self, name: &str) -> Value {
        match self {
            Style::V2 => json!({"$ref": format!("#/definitions/{name}")}),
            Style::V3 => json!({"$ref": format!("#/components/schemas/{name}")}),
        }
    }
}

use super::route::gv_path;

/// The definition name of a kind: upstream's for built-ins, the reversed group for
/// custom resources (`com.example.v1.Widget`), as upstream names them.
pub fn definition_name(k: &KindInfo, kind: &str) -> String {
    if let Some(name) = schema::builtin().name_of(&k.group, &k.version, kind) {
        return name.to_string();
    }
    let reversed: Vec<&str> = k.group.split('.').rev().collect();
    format!("{}.{}.{kind}", reversed.join("."), k.version)
}

/// The published schema of a kind and of its list. As upstream's CRD OpenAPI builder:
/// a schema that keeps unknown fields at its root is published in v2 as a bare object
/// (kubectl's v2 validation would otherwise refuse the unknown fields), v2 loses what it
/// cannot say (`allOf`, `oneOf`, `anyOf`, `not`, nullable types), and the boolean
/// `x-kubernetes-*` extensions appear only when true.
fn kind_definitions(k: &KindInfo, style: Style) -> Vec<(String, Value)> {
    let Some(custom) = &k.schema_json else { return vec![] };
    let gvk = |kind: &str| json!([{"group": k.group, "version": k.version, "kind": kind}]);
    let v2 = matches!(style, Style::V2);
    let mut item = if v2 && custom.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true)) {
        json!({"type": "object"})
    } else {
        published(custom, v2)
    };
    if let Some(props) = item.get_mut("properties").and_then(Value::as_object_mut) {
        // Type and object metadata as every built-in kind has them, descriptions
        // included (what `kubectl explain` shows).
        let builtin = schema::builtin().raw("io.k8s.api.core.v1.ConfigMap").and_then(|d| d.get("properties"));
        for (field, fallback) in [
            ("metadata", json!({"$ref": format!("#/definitions/{META}.ObjectMeta")})),
            ("apiVersion", json!({"type": "string"})),
            ("kind", json!({"type": "string"})),
        ] {
            props.insert(field.into(), builtin.and_then(|b| b.get(field)).cloned().unwrap_or(fallback));
        }
    }
    item["x-kubernetes-group-version-kind"] = gvk(&k.kind);
    let list = json!({
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"$ref": format!("#/definitions/{META}.ListMeta")},
            "items": {"type": "array", "items": {"$ref": format!("#/definitions/{}", definition_name(k, &k.kind))}},
        },
        "x-kubernetes-group-version-kind": gvk(&k.list_kind()),
    });
    vec![(definition_name(k, &k.kind), item), (definition_name(k, &k.list_kind()), list)]
}

fn param(style: Style, name: &str, location: &str, kind: &str, description: &str) -> Value {
    let mut p = json!({"name": name, "in": location, "description": description, "uniqueItems": true});
    if location == "path" {
        p["required"] = json!(true);
    }
    match style {
        Style::V2 => p["type"] = json!(kind),
        Style::V3 => p["schema"] = json!({"type": kind, "uniqueItems": true}),
    }
    p
}

fn write_params(style: Style) -> Vec<Value> {
    vec![
        param(style, "dryRun", "query", "string", "When present, indicates that modifications should not be persisted. Valid values are: - All: all dry run stages will be processed"),
        param(style, "fieldManager", "query", "string", "fieldManager is a name associated with the actor or entity that is making these changes."),
        param(style, "fieldValidation", "query", "string", "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn (default) - Strict"),
    ]
}

fn list_params(style: Style) -> Vec<Value> {
    [
        ("allowWatchBookmarks", "boolean", "allowWatchBookmarks requests watch events with type \"BOOKMARK\"."),
        ("continue", "string", "The continue option should be set when retrieving more results from the server."),
        ("fieldSelector", "string", "A selector to restrict the list of returned objects by their fields. Defaults to everything."),
        ("labelSelector", "string", "A selector to restrict the list of returned objects by their labels. Defaults to everything."),
        ("limit", "integer", "limit is a maximum number of responses to return for a list call."),
        ("resourceVersion", "string", "resourceVersion sets a constraint on what resource versions a request may be served from."),
        ("resourceVersionMatch", "string", "resourceVersionMatch determines how resourceVersion is applied to list calls."),
        ("timeoutSeconds", "integer", "Timeout for the list/watch call."),
        ("watch", "boolean", "Watch for changes to the described resources and return them as a stream of add, update, and remove notifications."),
    ]
    .iter()
    .map(|(n, t, d)| param(style, n, "query", t, d))
    .collect()
}

fn body_param(style: Style, schema_name: &str) -> Value {
    json!({"name": "body", "in": "body", "required": true, "schema": style.reference(schema_name)})
}

struct OpSpec<'a> {
    verb: &'a str,
    method: &'a str,
    action: &'a str,
    params: Vec<Value>,
    body: Option<&'a str>,
    response: &'a str,
}

fn operation(style: Style, k: &KindInfo, spec: &OpSpec) -> Value {
    let gvk = json!({"group": k.group, "version": k.version, "kind": k.kind});
    let responses = match style {
        Style::V2 => {
            json!({"200": {"description": "OK", "schema": style.reference(spec.response)}, "401": {"description": "Unauthorized"}})
        }
        Style::V3 => {
            json!({"200": {"description": "OK", "content": {"application/json": {"schema": style.reference(spec.response)}}}, "401": {"description": "Unauthorized"}})
        }
    };
    let mut op = json!({
        "operationId": format!("{}{}", spec.action, k.kind),
        "x-kubernetes-action": spec.action,
        "x-kubernetes-group-version-kind": gvk,
        "parameters": spec.params,
        "responses": responses,
    });
    if let Some(body) = spec.body {
        match style {
            Style::V2 => op["parameters"].as_array_mut().expect("parameters is a list").push(body_param(style, body)),
            Style::V3 => {
                let types: &[&str] = if spec.method == "patch" {
                    &[
                        "application/json-patch+json",
                        "application/merge-patch+json",
                        "application/strategic-merge-patch+json",
                        "application/apply-patch+yaml",
                    ]
                } else {
                    &["application/json", "application/yaml"]
                };
                let content: Map<String, Value> =
                    types.iter().map(|t| (t.to_string(), json!({"schema": style.reference(body)}))).collect();
                op["requestBody"] = json!({"content": content, "required": true});
            }
        }
    }
    if style == Style::V2 && spec.method == "patch" {
        op["consumes"] = json!([
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/apply-patch+yaml"
        ]);
    }
    op
}

/// The paths of one kind with their operations.
fn kind_paths(style: Style, k: &KindInfo) -> Vec<(String, Value)> {
    let item_def = definition_name(k, &k.kind);
    let list_def = definition_name(k, &k.list_kind());
    let status = format!("{META}.Status");
    let base = format!("/{}", gv_path(&k.group, &k.version));
    let ns = if k.namespaced { "/namespaces/{namespace}" } else { "" };
    let collection = format!("{base}{ns}/{}", k.plural);
    let item = format!("{collection}/{{name}}");
    let mut path_params = vec![];
    if k.namespaced {
        path_params.push(param(
            style,
            "namespace",
            "path",
            "string",
            "object name and auth scope, such as for teams and projects",
        ));
    }
    let with_name = {
        let mut p = path_params.clone();
        p.push(param(style, "name", "path", "string", &format!("name of the {}", k.kind)));
        p
    };
    let build = |params: &[Value], specs: Vec<OpSpec>| {
        let mut out = Map::new();
        for spec in specs.iter().filter(|s| k.verbs.iter().any(|v| v == s.verb)) {
            out.insert(spec.method.to_string(), operation(style, k, spec));
        }
        if !out.is_empty() {
            out.insert("parameters".into(), json!(params));
        }
        Value::Object(out)
    };
    let delete_options = format!("{META}.DeleteOptions");
    let mut paths = vec![
        (
            collection,
            build(
                &path_params,
                vec![
                    OpSpec {
                        verb: "list",
                        method: "get",
                        action: "list",
                        params: list_params(style),
                        body: None,
                        response: &list_def,
                    },
                    OpSpec {
                        verb: "create",
                        method: "post",
                        action: "post",
                        params: write_params(style),
                        body: Some(&item_def),
                        response: &item_def,
                    },
                    OpSpec {
                        verb: "deletecollection",
                        method: "delete",
                        action: "deletecollection",
                        params: list_params(style),
                        body: Some(&delete_options),
                        response: &status,
                    },
                ],
            ),
        ),
        (
            item.clone(),
            build(
                &with_name,
                vec![
                    OpSpec {
                        verb: "get",
                        method: "get",
                        action: "get",
                        params: vec![],
                        body: None,
                        response: &item_def,
                    },
                    OpSpec {
                        verb: "update",
                        method: "put",
                        action: "put",
                        params: write_params(style),
                        body: Some(&item_def),
                        response: &item_def,
                    },
                    OpSpec {
                        verb: "patch",
                        method: "patch",
                        action: "patch",
                        params: patch_params(style),
                        body: Some(&format!("{META}.Patch")),
                        response: &item_def,
                    },
                    OpSpec {
                        verb: "delete",
                        method: "delete",
                        action: "delete",
                        params: vec![],
                        body: Some(&delete_options),
                        response: &status,
                    },
                ],
            ),
        ),
    ];
    if k.status {
        paths.push((
            format!("{item}/status"),
            build(
                &with_name,
                vec![
                    OpSpec {
                        verb: "get",
                        method: "get",
                        action: "get",
                        params: vec![],
                        body: None,
                        response: &item_def,
                    },
                    OpSpec {
                        verb: "update",
                        method: "put",
                        action: "put",
                        params: write_params(style),
                        body: Some(&item_def),
                        response: &item_def,
                    },
                    OpSpec {
                        verb: "patch",
                        method: "patch",
                        action: "patch",
                        params: patch_params(style),
                        body: Some(&format!("{META}.Patch")),
                        response: &item_def,
                    },
                ],
            ),
        ));
    }
    paths.retain(|(_, ops)| ops.as_object().is_some_and(|o| !o.is_empty()));
    paths
}

fn patch_params(style: Style) -> Vec<Value> {
    let mut p = write_params(style);
    p.push(param(style, "force", "query", "boolean", "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting fields owned by other people."));
    p
}

/// All definitions a document needs: built-ins plus the custom kinds in `kinds`.
fn definitions<'a>(kinds: impl Iterator<Item = &'a std::sync::Arc<KindInfo>>, style: Style) -> BTreeMap<String, Value> {
    let mut defs = BTreeMap::new();
    for k in kinds {
        defs.extend(kind_definitions(k, style));
    }
    defs
}

/// A custom resource's schema as published (see `kind_definitions`).
fn published(schema: &Value, v2: bool) -> Value {
    let Value::Object(map) = schema else { return schema.clone() };
    let mut out = Map::new();
    let nullable = v2 && map.get("nullable") == Some(&json!(true));
    for (key, value) in map {
        match key.as_str() {
            "x-kubernetes-preserve-unknown-fields"
            | "x-kubernetes-embedded-resource"
            | "x-kubernetes-int-or-string"
                if value != &json!(true) => {}
            "allOf" | "oneOf" | "anyOf" | "not" if v2 => {}
            "nullable" | "type" if nullable => {}
            "properties" | "patternProperties" | "definitions" => {
                let inner = value.as_object().map(|m| m.iter().map(|(k, v)| (k.clone(), published(v, v2))).collect());
                out.insert(key.clone(), inner.map(Value::Object).unwrap_or_else(|| value.clone()));
            }
            "items" | "additionalProperties" | "not" | "additionalItems" => {
                out.insert(key.clone(), published(value, v2));
            }
            "allOf" | "oneOf" | "anyOf" => {
                let inner = value.as_array().map(|a| a.iter().map(|v| published(v, v2)).collect());
                out.insert(key.clone(), inner.map(Value::Array).unwrap_or_else(|| value.clone()));
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    // v2 has no nullable: a nullable property cannot be required.
    if v2 {
        let nullable_props: Vec<String> = map
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.iter().filter(|(_, v)| v["nullable"] == json!(true)).map(|(k, _)| k.clone()).collect())
            .unwrap_or_default();
        if let Some(required) = out.get_mut("required").and_then(Value::as_array_mut) {
            required.retain(|r| !r.as_str().is_some_and(|r| nullable_props.iter().any(|n| n == r)));
            if required.is_empty() {
                out.remove("required");
            }
        }
    }
    Value::Object(out)
}

fn lookup_definition<'a>(custom: &'a BTreeMap<String, Value>, name: &str) -> Option<&'a Value> {
    custom.get(name).or_else(|| schema::builtin().raw(name))
}

/// Rewrites a v2 schema into v3 form: component references, and `allOf` around a
/// reference that has siblings (as upstream publishes them).
fn to_v3(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                let target = json!({"$ref": r.replace("#/definitions/", "#/components/schemas/")});
                if m.len() == 1 {
                    return target;
                }
                let mut out: Map<String, Value> =
                    m.iter().filter(|(k, _)| *k != "$ref").map(|(k, v)| (k.clone(), to_v3(v))).collect();
                out.insert("allOf".into(), json!([target]));
                return Value::Object(out);
            }
            Value::Object(m.iter().map(|(k, v)| (k.clone(), to_v3(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(to_v3).collect()),
        other => other.clone(),
    }
}

/// Names referenced from `roots`, transitively.
fn closure(custom: &BTreeMap<String, Value>, roots: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.into_iter().collect();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some(def) = lookup_definition(custom, &name) {
            collect_refs(def, &mut todo);
        }
    }
    seen
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.rsplit('/').next().unwrap_or_default().to_string());
            }
            m.values().for_each(|v| collect_refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

fn info() -> Value {
    json!({"title": "Kubernetes", "version": crate::version_info()["gitVersion"]})
}

/// Whether a kind has a schema to publish: metrics.k8s.io's kinds have none (upstream's
/// OpenAPI documents do not describe them either; metrics-server publishes its own).
fn has_schema(k: &KindInfo) -> bool {
    k.schema.is_some() || k.schema_json.is_some()
}

/// `/openapi/v2`.
pub fn v2(kinds: &Registry) -> Value {
    let custom = definitions(kinds.kinds().iter(), Style::V2);
    let mut paths = Map::new();
    for k in kinds.kinds().iter().filter(|k| has_schema(k)) {
        paths.extend(kind_paths(Style::V2, k));
    }
    let mut defs: Map<String, Value> =
        schema::builtin().names().map(|n| (n.clone(), schema::builtin().raw(n).cloned().unwrap_or_default())).collect();
    defs.extend(custom);
    json!({"swagger": "2.0", "info": info(), "paths": paths, "definitions": defs})
}

/// `/openapi/v3`: where each group/version's document lives.
pub fn v3_root(kinds: &Registry, hash: impl Fn(&str) -> String) -> Value {
    let mut paths = Map::new();
    for g in kinds.groups() {
        for v in g.versions.iter().filter(|v| kinds.kinds_in(&g.name, v).any(|k| has_schema(k))) {
            let p = gv_path(&g.name, v);
            let url = format!("/openapi/v3/{p}?hash={}", hash(&p));
            paths.insert(p, json!({"serverRelativeURL": url}));
        }
    }
    json!({"paths": paths})
}

/// `/openapi/v3/{api/v1 | apis/group/version}`.
pub fn v3_group_version(kinds: &Registry, group: &str, version: &str) -> ApiResult<Value> {
    let served: Vec<_> = kinds.kinds_in(group, version).filter(|k| has_schema(k)).collect();
    if served.is_empty() {
        return Err(ApiError::no_such_path());
    }
    let custom = definitions(served.iter().copied(), Style::V3);
    let mut paths = Map::new();
    let mut roots = vec![format!("{META}.Status"), format!("{META}.DeleteOptions"), format!("{META}.Patch")];
    for k in &served {
        paths.extend(kind_paths(Style::V3, k));
        roots.push(definition_name(k, &k.kind));
        roots.push(definition_name(k, &k.list_kind()));
    }
    let schemas: Map<String, Value> = closure(&custom, roots)
        .into_iter()
        .filter_map(|name| lookup_definition(&custom, &name).map(|d| (name, to_v3(d))))
        .collect();
    Ok(json!({"openapi": "3.0.0", "info": info(), "paths": paths, "components": {"schemas": schemas}}))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::published;

    #[test]
    fn published_schemas_keep_true_extensions_only_and_v2_drops_what_it_cannot_say() {
        let schema = json!({
            "type": "object", "x-kubernetes-embedded-resource": false, "x-kubernetes-int-or-string": false,
            "required": ["a", "b"],
            "properties": {
                "a": {"type": "string", "nullable": true},
                "b": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            },
        });
        assert_eq!(
            published(&schema, false),
            json!({"type": "object", "required": ["a", "b"], "properties": {
                "a": {"type": "string", "nullable": true},
                "b": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            }})
        );
        assert_eq!(
            published(&schema, true),
            json!({"type": "object", "required": ["b"], "properties": {
                "a": {},
                "b": {"x-kubernetes-int-or-string": true},
            }})
        );
    }
}

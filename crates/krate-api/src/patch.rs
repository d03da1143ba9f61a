//! Patch engines: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and strategic
//! merge patch (lists merged by key, with upstream's `$patch`, `$retainKeys`,
//! `$setElementOrder` and `$deleteFromPrimitiveList` directives).

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::schema::Node;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    StrategicMerge,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        match essence {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::StrategicMerge),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Applies an RFC 6902 JSON patch document.
pub fn apply_json_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let patch: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("the JSON patch is malformed: {e}")))?;
    // Upstream answers a failed test or a missing path with 422 Invalid.
    json_patch::patch(target, &patch).map_err(|e| {
        ApiError::new(422, "Invalid", format!("the server rejected our request due to an error in our request: {e}"))
    })
}

/// Applies an RFC 7386 merge patch.
pub fn apply_merge_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    if !patch.is_object() {
        return Err(ApiError::bad_request("the merge patch must be a JSON object"));
    }
    json_patch::merge(target, patch);
    Ok(())
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k.clone(), strip_directives(v))).collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// Applies a strategic merge patch. How each list merges (by which key, or as a set) and
/// which objects are replaced whole comes from the kind's schema (upstream's
/// `patchStrategy`/`patchMergeKey`); fields the schema does not know merge like JSON
/// merge patch.
pub fn apply_strategic_merge_patch(target: &mut Value, patch: &Value, schema: &Node) -> Result<(), ApiError> {
    if !patch.is_object() {
        return Err(ApiError::bad_request("the strategic merge patch must be a JSON object"));
    }
    merge_map(target, patch, Some(schema))
}

fn merge_map(target: &mut Value, patch: &Value, schema: Option<&Node>) -> Result<(), ApiError> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = strip_directives(patch);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some(other) if other != "merge" => {
            return Err(ApiError::bad_request(format!("unknown patch directive $patch: {other:?}")));
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (key, value) in p {
        if key.starts_with('$') {
            continue;
        }
        let field = schema.and_then(|s| s.field(key));
        match value {
            Value::Null => {
                t.remove(key);
            }
            Value::Object(_) if field.is_some_and(Node::is_atomic_map) => {
                t.insert(key.clone(), strip_directives(value));
            }
            Value::Object(_) => {
                let slot = t.entry(key.clone()).or_insert(Value::Null);
                merge_map(slot, value, field)?;
                if slot.is_null() {
                    t.remove(key);
                }
            }
            Value::Array(items) => {
                let slot = t.entry(key.clone()).or_insert(Value::Array(vec![]));
                merge_list(field, slot, items)?;
            }
            scalar => {
                t.insert(key.clone(), scalar.clone());
            }
        }
    }
    for (key, value) in p {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove: Vec<&Value> = value.as_array().map(|v| v.iter().collect()).unwrap_or_default();
            if let Some(Value::Array(list)) = t.get_mut(field) {
                list.retain(|v| !remove.contains(&v));
            }
        }
    }
    for (key, value) in p {
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            let merge_key = schema.and_then(|s| s.field(field)).and_then(Node::merge_key);
            if let (Some(Value::Array(list)), Some(order)) = (t.get_mut(field), value.as_array()) {
                reorder(merge_key, list, order);
            }
        }
    }
    match p.get("$retainKeys") {
        Some(Value::Array(retain)) => {
            let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
            t.retain(|k, _| keep.contains(&k.as_str()));
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!("$retainKeys must be a list of strings, got {other}")))
        }
        None => {}
    }
    Ok(())
}

fn merge_list(schema: Option<&Node>, target: &mut Value, patch: &[Value]) -> Result<(), ApiError> {
    if patch.iter().any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace")) {
        *target = Value::Array(patch.iter().filter(|i| i.get("$patch").is_none()).map(strip_directives).collect());
        return Ok(());
    }
    if !target.is_array() || !schema.is_some_and(Node::merges) {
        *target = Value::Array(patch.iter().map(strip_directives).collect());
        return Ok(());
    }
    let original = target.as_array().expect("checked above").clone();
    let list = target.as_array_mut().expect("checked above");
    let Some(key) = schema.and_then(Node::merge_key) else {
        // A merging list of scalars is a set.
        for item in patch {
            if !list.contains(item) {
                list.push(item.clone());
            }
        }
        *list = upstream_order(None, std::mem::take(list), &original, patch);
        return Ok(());
    };
    let element = schema.and_then(Node::element);
    for item in patch {
        let Some(id) = item.get(key) else {
            return Err(ApiError::bad_request(format!("map: {item} does not contain declared merge key: {key}")));
        };
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            list.retain(|t| t.get(key) != Some(id));
            continue;
        }
        match list.iter().position(|t| t.get(key) == Some(id)) {
            Some(i) => merge_map(&mut list[i], item, element)?,
            None => {
                let mut fresh = Value::Object(Map::new());
                merge_map(&mut fresh, item, element)?;
                list.push(fresh);
            }
        }
    }
    *list = upstream_order(Some(key), std::mem::take(list), &original, patch);
    Ok(())
}

/// The order upstream's strategic merge leaves a merged list in: the patch's elements in
/// the patch's order, with the live object's other elements put back among them where
/// the live order places them relative to patch elements it also holds; a patch element
/// new to the list goes before a live-only one (upstream's normalizeElementOrder and
/// mergeSortedSlice). So a new container patched into a pod template comes first.
fn upstream_order(key: Option<&str>, merged: Vec<Value>, original: &[Value], patch: &[Value]) -> Vec<Value> {
    let id = |v: &Value| match key {
        Some(k) => v.get(k).cloned(),
        None => Some(v.clone()),
    };
    let position = |list: &[Value], v: &Value| list.iter().position(|o| id(o) == id(v));
    let (mut ours, theirs): (Vec<Value>, Vec<Value>) = merged.into_iter().partition(|v| position(patch, v).is_some());
    ours.sort_by_key(|v| position(patch, v));
    let (mut left, mut right) = (theirs.into_iter().peekable(), ours.into_iter().peekable());
    let mut out = Vec::new();
    loop {
        let take_left = match (left.peek(), right.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(l), Some(r)) => {
                matches!((position(original, l), position(original, r)), (Some(li), Some(ri)) if li < ri)
            }
        };
        out.extend(if take_left { left.next() } else { right.next() });
    }
    out
}

/// Orders `list` as `order` names its elements; elements not named keep their relative
/// order after the named ones.
fn reorder(key: Option<&str>, list: &mut [Value], order: &[Value]) {
    let id = |v: &Value| match key {
        Some(k) => v.get(k).cloned(),
        None => Some(v.clone()),
    };
    list.sort_by_key(|v| {
        let own = id(v);
        order.iter().position(|o| id(o) == own).unwrap_or(usize::MAX)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_and_merge_patches() {
        let mut obj = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"replicas": 1}});
        apply_json_patch(&mut obj, &json!([{"op": "replace", "path": "/spec/replicas", "value": 3}])).unwrap();
        assert_eq!(obj["spec"]["replicas"], 3);
        apply_merge_patch(&mut obj, &json!({"metadata": {"labels": {"a": null, "b": "2"}}})).unwrap();
        assert_eq!(obj["metadata"]["labels"], json!({"b": "2"}));
        let err =
            apply_json_patch(&mut obj, &json!([{"op": "test", "path": "/spec/replicas", "value": 9}])).unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(apply_json_patch(&mut obj, &json!({"not": "a list"})).unwrap_err().code, 400);
    }

    fn schema(group: &str, kind: &str) -> crate::schema::KindSchema {
        crate::schema::builtin_kind(group, "v1", kind).unwrap()
    }

    #[test]
    fn strategic_merge_patch_merges_lists_by_key() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
            {"name": "b", "image": "b:1"}
        ]}, "metadata": {"finalizers": ["f1"]}});
        let patch = json!({
            "spec": {"containers": [
                {"name": "a", "image": "a:2", "env": [{"name": "Y", "$patch": "delete"}]},
                {"name": "c", "image": "c:1"}
            ], "$setElementOrder/containers": [{"name": "c"}, {"name": "a"}, {"name": "b"}]},
            "metadata": {"finalizers": ["f2"]}
        });
        apply_strategic_merge_patch(&mut pod, &patch, &schema("", "Pod")).unwrap();
        let names: Vec<_> =
            pod["spec"]["containers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["c", "a", "b"]);
        assert_eq!(pod["spec"]["containers"][1]["image"], "a:2");
        assert_eq!(pod["spec"]["containers"][1]["env"], json!([{"name": "X", "value": "1"}]));
        // A new element of a merging list goes first, as upstream orders it.
        assert_eq!(pod["metadata"]["finalizers"], json!(["f2", "f1"]));
    }

    #[test]
    fn strategic_merge_keeps_upstreams_element_order() {
        let rs = schema("apps", "ReplicaSet");
        let names = |obj: &Value| -> Vec<String> {
            obj["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        };
        let with = |names: &[&str]| {
            let containers: Vec<Value> = names.iter().map(|n| json!({"name": n, "image": "i"})).collect();
            json!({"spec": {"template": {"spec": {"containers": containers}}}})
        };
        // A new element comes before the live ones (upstream's conformance test of
        // ReplicaSet patches reads the patched container as containers[0]).
        let mut obj = with(&["agnhost"]);
        apply_strategic_merge_patch(&mut obj, &with(&["test-rs"]), &rs).unwrap();
        assert_eq!(names(&obj), ["test-rs", "agnhost"]);
        // Live elements keep their places around the patched ones they precede.
        let mut obj = with(&["a", "b", "c"]);
        apply_strategic_merge_patch(&mut obj, &with(&["c", "x"]), &rs).unwrap();
        assert_eq!(names(&obj), ["a", "b", "c", "x"]);
        let mut obj = with(&["a", "b"]);
        apply_strategic_merge_patch(&mut obj, &with(&["b"]), &rs).unwrap();
        assert_eq!(names(&obj), ["a", "b"]);
    }

    #[test]
    fn strategic_merge_patch_directives() {
        let deploy = schema("apps", "Deployment");
        let mut obj = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}},
            "selector": {"matchLabels": {"a": "1"}},
            "template": {"spec": {"containers": [{"name": "c", "args": ["a", "b"]}]}}}});
        let patch = json!({"spec": {"strategy": {"type": "Recreate", "rollingUpdate": null, "$retainKeys": ["type"]},
            "selector": {"matchLabels": {"b": "2"}},
            "template": {"spec": {"containers": [{"name": "c", "args": ["c"]}]}}}});
        apply_strategic_merge_patch(&mut obj, &patch, &deploy).unwrap();
        assert_eq!(obj["spec"]["strategy"], json!({"type": "Recreate"}));
        // args is not a merging list; the selector is an atomic map.
        assert_eq!(obj["spec"]["template"]["spec"]["containers"][0]["args"], json!(["c"]));
        assert_eq!(obj["spec"]["selector"], json!({"matchLabels": {"b": "2"}}));
        let bad = json!({"spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}});
        assert_eq!(apply_strategic_merge_patch(&mut obj.clone(), &bad, &deploy).unwrap_err().code, 400);
        let mut obj = json!({"data": {"a": "1", "b": "2"}});
        apply_strategic_merge_patch(
            &mut obj,
            &json!({"data": {"$patch": "replace", "c": "3"}}),
            &schema("", "ConfigMap"),
        )
        .unwrap();
        assert_eq!(obj["data"], json!({"c": "3"}));
    }
}

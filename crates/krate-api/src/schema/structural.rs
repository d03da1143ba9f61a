//! Validation, defaulting and pruning of an object against a structural schema, as the
//! API server does for custom resources.

use serde_json::{Map, Value};

use super::{Additional, Node};
use crate::FieldError;

/// What checking an object found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Paths of fields the schema does not know; they were removed.
    pub unknown: Vec<String>,
    pub errors: Vec<FieldError>,
}

/// Defaults, prunes and validates `value` (a whole object) against `schema`.
/// `apiVersion`, `kind` and `metadata` at the root belong to the generic machinery.
pub fn check(schema: &Node, value: &mut Value) -> Checked {
    let mut out = Checked::default();
    walk(schema, value, "", true, &mut out);
    out
}

/// Whether any node of the schema declares a default.
pub fn has_defaults(node: &Node) -> bool {
    node.default.is_some()
        || node.properties.values().any(has_defaults)
        || node.items.as_deref().is_some_and(has_defaults)
        || matches!(&node.additional_properties, Some(super::Additional::Schema(s)) if has_defaults(s))
}

/// Fills missing fields that have defaults, and nothing else (no pruning, no
/// validation): what reading a stored object does.
pub fn apply_defaults(schema: &Node, value: &mut Value) {
    let node = schema.resolve();
    match value {
        Value::Object(map) => {
            for (name, prop) in &node.properties {
                if !map.contains_key(name) {
                    if let Some(default) = prop.default.clone().or_else(|| prop.resolve().default.clone()) {
                        map.insert(name.clone(), default);
                    }
                }
            }
            for (key, child) in map.iter_mut() {
                if let Some(prop) = node.properties.get(key) {
                    apply_defaults(prop, child);
                } else if let Some(super::Additional::Schema(s)) = &node.additional_properties {
                    apply_defaults(s, child);
                }
            }
        }
        Value::Array(items) => {
            if let Some(element) = node.items.as_deref() {
                items.iter_mut().for_each(|item| apply_defaults(element, item));
            }
        }
        _ => {}
    }
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(node: &Node, v: &Value) -> bool {
    if node.int_or_string {
        return matches!(type_name(v), "integer" | "string");
    }
    match node.type_.as_deref() {
        None | Some("") => true,
        Some("number") => v.is_number(),
        Some(t) => type_name(v) == t,
    }
}

fn walk(schema: &Node, value: &mut Value, path: &str, root: bool, out: &mut Checked) {
    let node = schema.resolve();
    let shown = if path.is_empty() { "<root>" } else { path };
    if value.is_null() {
        return;
    }
    if !type_matches(node, value) {
        let t = node.type_.as_deref().unwrap_or("integer or string");
        out.errors.push(FieldError::invalid(
            shown,
            &Value::from(type_name(value)),
            &format!("{shown} in body must be of type {t}: \"{}\"", type_name(value)),
        ));
        return;
    }
    validate_scalar(node, value, shown, out);
    for sub in &node.all_of {
        let mut copy = value.clone();
        walk_validation_only(sub, &mut copy, path, out);
    }
    match value {
        Value::Object(map) => walk_object(node, map, path, root, out),
        Value::Array(items) => {
            if let Some(min) = node.min_items.filter(|m| (items.len() as u64) < *m) {
                out.errors.push(FieldError::invalid(
                    shown,
                    &Value::from(items.len()),
                    &format!("{shown} in body should have at least {min} items"),
                ));
            }
            if let Some(max) = node.max_items.filter(|m| (items.len() as u64) > *m) {
                out.errors.push(FieldError::too_many(shown, items.len(), max));
            }
            if let Some(element) = &node.items {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(element, item, &format!("{path}[{i}]"), false, out);
                }
            }
            check_list_uniqueness(node, items, shown, out);
        }
        _ => {}
    }
}

/// anyOf/oneOf/not and nested allOf only constrain values; they never prune or default.
fn walk_validation_only(schema: &Node, value: &mut Value, path: &str, out: &mut Checked) {
    let mut scratch = Checked::default();
    walk(schema, value, path, false, &mut scratch);
    out.errors.extend(scratch.errors);
}

fn passes(schema: &Node, value: &Value, path: &str) -> bool {
    let mut copy = value.clone();
    let mut scratch = Checked::default();
    walk(schema, &mut copy, path, false, &mut scratch);
    scratch.errors.is_empty()
}

fn validate_scalar(node: &Node, value: &Value, shown: &str, out: &mut Checked) {
    if let Some(allowed) = &node.enum_values {
        if !allowed.contains(value) {
            let names: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
            out.errors.push(FieldError::not_supported_values(shown, value, &names));
        }
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = node.minimum {
            if n < min || (node.exclusive_minimum && n == min) {
                let rel = if node.exclusive_minimum { "greater than" } else { "greater than or equal to" };
                out.errors.push(FieldError::invalid(shown, value, &format!("{shown} in body should be {rel} {min}")));
            }
        }
        if let Some(max) = node.maximum {
            if n > max || (node.exclusive_maximum && n == max) {
                let rel = if node.exclusive_maximum { "less than" } else { "less than or equal to" };
                out.errors.push(FieldError::invalid(shown, value, &format!("{shown} in body should be {rel} {max}")));
            }
        }
        if let Some(m) = node.multiple_of.filter(|m| *m != 0.0 && (n / m).fract() != 0.0) {
            out.errors.push(FieldError::invalid(shown, value, &format!("{shown} in body should be a multiple of {m}")));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = node.min_length.filter(|m| len < *m) {
            out.errors.push(FieldError::invalid(
                shown,
                value,
                &format!("{shown} in body should be at least {min} chars long"),
            ));
        }
        if let Some(max) = node.max_length.filter(|m| len > *m) {
            out.errors.push(FieldError::too_long(shown, max));
        }
        if let Some(p) = &node.pattern {
            if regex::Regex::new(p).is_ok_and(|re| !re.is_match(s)) {
                out.errors.push(FieldError::invalid(shown, value, &format!("{shown} in body should match '{p}'")));
            }
        }
    }
    if !node.any_of.is_empty() && !node.any_of.iter().any(|s| passes(s, value, shown)) {
        out.errors.push(FieldError::invalid(shown, value, "must validate at least one schema (anyOf)"));
    }
    if !node.one_of.is_empty() && node.one_of.iter().filter(|s| passes(s, value, shown)).count() != 1 {
        out.errors.push(FieldError::invalid(shown, value, "must validate one and only one schema (oneOf)"));
    }
    if let Some(not) = &node.not {
        if passes(not, value, shown) {
            out.errors.push(FieldError::invalid(shown, value, "must not validate the schema (not)"));
        }
    }
}

fn walk_object(node: &Node, map: &mut Map<String, Value>, path: &str, root: bool, out: &mut Checked) {
    let shown = if path.is_empty() { "<root>" } else { path };
    let embedded = root || node.embedded_resource;
    // Nulls for fields that are not nullable are dropped before defaulting, as upstream.
    map.retain(|k, v| !v.is_null() || node.properties.get(k).is_some_and(|p| p.resolve().nullable));
    for (name, prop) in &node.properties {
        if !map.contains_key(name) {
            if let Some(default) = prop.default.clone().or_else(|| prop.resolve().default.clone()) {
                map.insert(name.clone(), default);
            }
        }
    }
    for required in &node.required {
        if !map.contains_key(required) {
            out.errors.push(FieldError::required(child_path(path, required), ""));
        }
    }
    if let Some(min) = node.min_properties.filter(|m| (map.len() as u64) < *m) {
        out.errors.push(FieldError::invalid(
            shown,
            &Value::from(map.len()),
            &format!("{shown} in body should have at least {min} properties"),
        ));
    }
    if let Some(max) = node.max_properties.filter(|m| (map.len() as u64) > *m) {
        out.errors.push(FieldError::invalid(
            shown,
            &Value::from(map.len()),
            &format!("{shown} in body should have at most {max} properties"),
        ));
    }
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let p = child_path(path, &key);
        if embedded && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") && !node.properties.contains_key(&key)
        {
            continue;
        }
        if root && key == "metadata" {
            continue;
        }
        let value = map.get_mut(&key).expect("key listed above");
        if let Some(prop) = node.properties.get(&key) {
            walk(prop, value, &p, false, out);
            continue;
        }
        match &node.additional_properties {
            Some(Additional::Schema(s)) => walk(s, value, &p, false, out),
            Some(Additional::Allowed(true)) => {}
            _ if node.preserve_unknown_fields => {}
            _ => {
                map.remove(&key);
                out.unknown.push(p);
            }
        }
    }
}

/// `x-kubernetes-list-type: set|map` forbid duplicates.
fn check_list_uniqueness(node: &Node, items: &[Value], shown: &str, out: &mut Checked) {
    let keys: Vec<Value> = match node.list_type.as_deref() {
        Some("set") => items.to_vec(),
        Some("map") => items
            .iter()
            .map(|i| {
                Value::Array(node.list_map_keys.iter().map(|k| i.get(k).cloned().unwrap_or(Value::Null)).collect())
            })
            .collect(),
        _ => return,
    };
    for (i, k) in keys.iter().enumerate() {
        if keys[..i].contains(k) {
            out.errors.push(FieldError::duplicate(format!("{shown}[{i}]"), &items[i]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(v: Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_prunes_and_validates() {
        let s = schema(json!({
            "type": "object",
            "properties": {
                "spec": {"type": "object", "required": ["size"], "properties": {
                    "size": {"type": "integer", "minimum": 1, "maximum": 10},
                    "color": {"type": "string", "default": "blue", "enum": ["blue", "red"]},
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
                }},
            },
        }));
        let mut obj = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a"},
            "spec": {"size": 3, "bogus": 1, "free": {"anything": {"goes": true}}, "tags": ["a", "b"]}, "extra": true});
        let c = check(&s, &mut obj);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        assert_eq!(c.unknown, ["extra", "spec.bogus"]);
        assert_eq!(obj["spec"]["color"], "blue");
        assert_eq!(obj["spec"]["free"]["anything"]["goes"], true);
        assert!(obj.get("extra").is_none());

        let mut bad = json!({"spec": {"size": 11, "color": "green", "tags": ["a", "a"]}});
        let lines: Vec<String> = check(&s, &mut bad).errors.iter().map(|e| e.to_line()).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[1].contains("spec.size in body should be less than or equal to 10"), "{lines:?}");

        let mut wrong_type = json!({"spec": {"size": "three"}});
        let lines: Vec<String> = check(&s, &mut wrong_type).errors.iter().map(|e| e.to_line()).collect();
        assert!(lines[0].contains("spec.size in body must be of type integer: \"string\""), "{lines:?}");

        let mut missing = json!({"spec": {}});
        let errs = check(&s, &mut missing).errors;
        assert_eq!(errs[0].to_line(), "spec.size: Required value");
    }
}

//! CRD validation rules (`x-kubernetes-validations`): CEL expressions on a schema node,
//! with `self` the value there and, in transition rules, `oldSelf` the value it had
//! before the update. Checked when a CRD is written (each rule compiles; its estimated
//! cost stays under upstream's per-rule limit) and when a custom resource is written
//! (`validate`), with upstream's messages: `spec: Invalid value: <message>` (values of
//! objects and lists are left out, scalars shown), `failed rule: <rule>` without a
//! message. Old values are correlated as upstream does: object fields and map values by
//! key, map-lists by their keys, sets by value; atomic lists not at all (their rules
//! with `oldSelf` then do not run). A value left unchanged by an update is not held to
//! rules that do not look at `oldSelf` (upstream's ratcheting).

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Additional, ListType, Node};
use crate::cel;
use crate::error::FieldError;
use crate::strategy::Errors;

/// One `x-kubernetes-validations` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub rule: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub message_expression: String,
    pub reason: Option<String>,
    #[serde(default)]
    pub field_path: String,
    pub optional_old_self: Option<bool>,
}

const VARIABLES: &[&str] = &["self", "oldSelf"];

/// Upstream's limit on one rule's estimated cost.
pub const STATIC_COST_LIMIT: u64 = 10_000_000;

/// The size upstream assumes for a list or map without maxItems/maxProperties: as many
/// of the smallest elements as fit in a request (3 MiB).
const UNBOUNDED: u64 = 3 * 1024 * 1024 / 2;

/// Checks the rules declared on `node` (only this node; the caller walks the schema):
/// each compiles and stays within the cost limit.
pub fn check_declared(node: &Node, path: &str, errs: &mut Errors) {
    for (i, rule) in node.validations.iter().enumerate() {
        let rule_path = format!("{path}.x-kubernetes-validations[{i}].rule");
        if rule.rule.trim().is_empty() {
            errs.push(FieldError::required(rule_path, "rule is not specified"));
            continue;
        }
        match cel::compile(&rule.rule, VARIABLES) {
            Err(e) => errs.push(FieldError::invalid(rule_path, &json!(rule.rule), &e)),
            Ok(program) => {
                let cost = program.estimated_cost(&|path| range_size(node, path));
                if cost > STATIC_COST_LIMIT {
                    errs.push(FieldError::forbidden(rule_path, &cost_message("estimated rule cost", cost)));
                }
            }
        }
        if !rule.message_expression.trim().is_empty() {
            if let Err(e) = cel::compile(&rule.message_expression, VARIABLES) {
                let path = format!("{path}.x-kubernetes-validations[{i}].messageExpression");
                errs.push(FieldError::invalid(path, &json!(rule.message_expression), &e));
            }
        }
        const REASONS: &[&str] =
            &["FieldValueDuplicate", "FieldValueForbidden", "FieldValueInvalid", "FieldValueRequired"];
        if let Some(reason) = rule.reason.as_deref().filter(|r| !REASONS.contains(r)) {
            let path = format!("{path}.x-kubernetes-validations[{i}].reason");
            errs.push(FieldError::not_supported(path, &json!(reason), REASONS));
        }
    }
}

/// Upstream's `getCostErrorMessage`.
fn cost_message(what: &str, cost: u64) -> String {
    let factor = cost as f64 / STATIC_COST_LIMIT as f64;
    let factor = if factor > 100.0 {
        "more than 100x".to_string()
    } else if factor < 1.5 {
        format!("{factor:.6}x")
    } else {
        format!("{factor:.1}x")
    };
    format!(
        "{what} exceeds budget by factor of {factor} (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"
    )
}

/// How many elements the value at `path` below `node` may have (`self.spec.items`,
/// `[]` for an element of a list or map): its maxItems/maxProperties, else unbounded.
fn range_size(node: &Node, path: &[String]) -> u64 {
    let mut current = node.resolve();
    for step in path.iter().skip(1) {
        let next = if step == "[]" {
            current.items.as_deref().or(match &current.additional_properties {
                Some(Additional::Schema(s)) => Some(s.as_ref()),
                _ => None,
            })
        } else {
            current.properties.get(step)
        };
        match next {
            Some(n) => current = n.resolve(),
            None => return UNBOUNDED,
        }
    }
    current.max_items.or(current.max_properties).unwrap_or(UNBOUNDED)
}

/// Validates `new` (a whole custom resource) against the rules of `schema`, with `old`
/// the stored object on an update.
pub fn validate(schema: &Node, new: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    walk(schema, new, old, "", &mut errs);
    errs
}

fn shown(path: &str) -> &str {
    if path.is_empty() {
        "<nil>"
    } else {
        path
    }
}

fn walk(schema: &Node, new: &Value, old: Option<&Value>, path: &str, errs: &mut Errors) {
    let node = schema.resolve();
    if new.is_null() {
        return;
    }
    let rules = if schema.validations.is_empty() { &node.validations } else { &schema.validations };
    for rule in rules {
        check_rule(rule, node, new, old, path, errs);
    }
    let child = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    match new {
        Value::Object(map) => {
            for (key, value) in map {
                let sub = node.properties.get(key).or(match &node.additional_properties {
                    Some(Additional::Schema(s)) => Some(s.as_ref()),
                    _ => None,
                });
                if let Some(sub) = sub {
                    let old_value = old.and_then(|o| o.get(key));
                    walk(sub, value, old_value, &child(key), errs);
                }
            }
        }
        Value::Array(items) => {
            let Some(element) = node.items.as_deref() else { return };
            let old_items = old.and_then(Value::as_array);
            for (i, item) in items.iter().enumerate() {
                let old_item = old_items.and_then(|olds| correlated(node, item, olds));
                walk(element, item, old_item, &format!("{path}[{i}]"), errs);
            }
        }
        _ => {}
    }
}

/// The old element an element of a list corresponds to: by the map keys of a map-list,
/// by value in a set; none in an atomic list.
fn correlated<'a>(list: &Node, item: &Value, olds: &'a [Value]) -> Option<&'a Value> {
    match list.list_type() {
        ListType::Map(keys) => olds.iter().find(|o| keys.iter().all(|k| o.get(k) == item.get(k))),
        ListType::Set => olds.iter().find(|o| *o == item),
        ListType::Atomic => None,
    }
}

fn check_rule(rule: &Rule, node: &Node, new: &Value, old: Option<&Value>, path: &str, errs: &mut Errors) {
    let Ok(program) = cel::compile_cached(&rule.rule, VARIABLES) else { return };
    let transition = program.references_variable("oldSelf");
    if transition && old.is_none() && rule.optional_old_self != Some(true) {
        return;
    }
    if !transition && old == Some(new) {
        return;
    }
    let null = Value::Null;
    let bound = [("self", new), ("oldSelf", old.unwrap_or(&null))];
    let field = if rule.field_path.is_empty() {
        shown(path).to_string()
    } else {
        let relative = rule.field_path.trim_start_matches('.');
        if path.is_empty() {
            relative.to_string()
        } else {
            format!("{path}.{relative}")
        }
    };
    let type_name = node.type_.as_deref().unwrap_or("object");
    match program.evaluate_bool(&bound) {
        Ok(true) => {}
        Ok(false) => {
            let from_expression = (!rule.message_expression.trim().is_empty())
                .then(|| cel::compile_cached(&rule.message_expression, VARIABLES).ok()?.evaluate(&bound).ok())
                .flatten()
                .and_then(|m| m.as_str().map(str::to_string))
                .filter(|m| !m.trim().is_empty());
            let detail = from_expression.unwrap_or_else(|| match rule.message.trim() {
                "" => format!("failed rule: {}", rule.rule.trim()),
                message => message.to_string(),
            });
            errs.push(match rule.reason.as_deref() {
                Some("FieldValueForbidden") => FieldError::forbidden(field, &detail),
                Some("FieldValueRequired") => FieldError::required(field, &detail),
                Some("FieldValueDuplicate") => FieldError::duplicate(field, new),
                _ if new.is_object() || new.is_array() => FieldError::invalid_omitting_value(field, &detail),
                _ => FieldError::invalid(field, new, &detail),
            });
        }
        Err(e) => {
            let what = if rule.message.trim().is_empty() { rule.rule.trim() } else { rule.message.trim() };
            errs.push(FieldError::invalid(field, &json!(type_name), &format!("{e} evaluating rule: {what}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(value: Value) -> Node {
        serde_json::from_value(value).unwrap()
    }

    fn lines(errs: &[FieldError]) -> Vec<String> {
        errs.iter().map(FieldError::to_line).collect()
    }

    fn widget() -> Node {
        schema(json!({"type": "object", "properties": {"spec": {
        "type": "object",
        "x-kubernetes-validations": [
            {"rule": "self.replicas <= self.max", "message": "replicas must not exceed max"},
            {"rule": "self.replicas >= oldSelf.replicas", "message": "replicas may not go down"},
        ],
        "properties": {
            "replicas": {"type": "integer"},
            "max": {"type": "integer"},
            "name": {"type": "string", "x-kubernetes-validations": [{"rule": "self.startsWith('w-')"}]},
        }}}}))
    }

    #[test]
    fn rules_refuse_with_their_message_or_the_failed_rule() {
        let new = json!({"spec": {"replicas": 5, "max": 3, "name": "x"}});
        assert_eq!(
            lines(&validate(&widget(), &new, None)),
            vec![
                "spec: Invalid value: replicas must not exceed max",
                "spec.name: Invalid value: \"x\": failed rule: self.startsWith('w-')",
            ]
        );
    }

    #[test]
    fn transition_rules_run_on_updates_only() {
        let old = json!({"spec": {"replicas": 3, "max": 9, "name": "w-a"}});
        let down = json!({"spec": {"replicas": 2, "max": 9, "name": "w-a"}});
        assert!(validate(&widget(), &down, None).is_empty(), "a create has no oldSelf");
        assert_eq!(
            lines(&validate(&widget(), &down, Some(&old))),
            vec!["spec: Invalid value: replicas may not go down"]
        );
        let up = json!({"spec": {"replicas": 4, "max": 9, "name": "w-a"}});
        assert!(validate(&widget(), &up, Some(&old)).is_empty());
    }

    #[test]
    fn unchanged_values_are_not_held_to_new_rules() {
        let stored = json!({"spec": {"replicas": 3, "max": 3, "name": "legacy"}});
        let mut changed = stored.clone();
        changed["spec"]["max"] = json!(4);
        assert!(validate(&widget(), &changed, Some(&stored)).is_empty(), "the name did not change");
        changed["spec"]["name"] = json!("renamed");
        assert_eq!(validate(&widget(), &changed, Some(&stored)).len(), 1, "a changed name is checked");
    }

    #[test]
    fn compile_errors_and_costly_rules_are_refused_on_the_crd() {
        let node = schema(json!({"type": "object", "x-kubernetes-validations": [
            {"rule": "self.replicas >"},
            {"rule": "self.lists.all(l, l.all(x, x.all(y, y == 'a')))"},
            {"rule": "size(self.bounded) < 3"},
        ], "properties": {
            "lists": {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}}},
            "bounded": {"type": "array", "maxItems": 5, "items": {"type": "string"}},
        }}));
        let mut errs = Errors::new();
        check_declared(&node, "spec.versions[0].schema.openAPIV3Schema", &mut errs);
        let got = lines(&errs);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0]
            .starts_with("spec.versions[0].schema.openAPIV3Schema.x-kubernetes-validations[0].rule: Invalid value"));
        assert!(got[0].contains("compilation failed"), "{got:?}");
        assert!(got[1].contains("estimated rule cost exceeds budget by factor of more than 100x"), "{got:?}");
    }

    #[test]
    fn map_lists_correlate_old_elements_by_key() {
        let node = schema(json!({"type": "object", "properties": {"ports": {
            "type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
            "items": {"type": "object", "x-kubernetes-validations": [{"rule": "self.port == oldSelf.port", "message": "port is immutable"}],
                "properties": {"name": {"type": "string"}, "port": {"type": "integer"}}}}}}));
        let old = json!({"ports": [{"name": "a", "port": 1}, {"name": "b", "port": 2}]});
        let new = json!({"ports": [{"name": "b", "port": 3}, {"name": "a", "port": 1}, {"name": "c", "port": 9}]});
        assert_eq!(lines(&validate(&node, &new, Some(&old))), vec!["ports[0]: Invalid value: port is immutable"]);
    }
}

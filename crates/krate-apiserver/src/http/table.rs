//! Server-side tables (`as=Table`), as `kubectl get` prints them: the columns and cells
//! come from the kind's printer in the kinds table (`krate_api::printers`), or from a
//! custom kind's `additionalPrinterColumns`.

use krate_api::printers::{human_duration, seconds_since, Column, NAME};
use krate_api::KindInfo;
use serde_json::{json, Value};

use super::negotiate::{partial_metadata, IncludeObject};

/// A custom kind's `additionalPrinterColumns` (Name first), if it declares any.
fn custom_columns(kind: &KindInfo) -> Option<&[krate_api::custom::PrinterColumn]> {
    kind.custom.as_ref().map(|c| c.printer_columns.as_slice()).filter(|c| !c.is_empty())
}

/// Evaluates the simple JSONPath printer columns use: `.a.b`, `.a[0].b`, `.a[*].b`.
fn json_path(obj: &Value, path: &str) -> Vec<Value> {
    let mut current = vec![obj.clone()];
    for segment in path.trim_start_matches('.').split('.').filter(|s| !s.is_empty()) {
        let (field, index) = match segment.split_once('[') {
            Some((f, rest)) => (f, Some(rest.trim_end_matches(']'))),
            None => (segment, None),
        };
        let mut next = Vec::new();
        for v in current {
            let Some(child) = (if field.is_empty() { Some(v) } else { v.get(field).cloned() }) else { continue };
            match (index, child) {
                (None, c) => next.push(c),
                (Some("*"), Value::Array(items)) => next.extend(items),
                (Some(i), Value::Array(items)) => {
                    next.extend(i.parse::<usize>().ok().and_then(|i| items.get(i).cloned()))
                }
                _ => {}
            }
        }
        current = next;
    }
    current
}

fn custom_cell(column: &krate_api::custom::PrinterColumn, obj: &Value) -> Value {
    let values = json_path(obj, &column.json_path);
    match (column.type_.as_str(), values.as_slice()) {
        (_, []) => Value::Null,
        ("date", [Value::String(ts)]) => {
            json!(seconds_since(ts).map(human_duration).unwrap_or_else(|| "<unknown>".into()))
        }
        (_, [one]) => one.clone(),
        (_, many) => json!(many
            .iter()
            .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
            .collect::<Vec<_>>()
            .join(",")),
    }
}

fn column_definition(c: &Column) -> Value {
    json!({"name": c.name, "type": c.ty, "format": c.format, "description": c.description, "priority": c.priority})
}

fn column_definitions(kind: &KindInfo) -> Vec<Value> {
    if let Some(columns) = custom_columns(kind) {
        return std::iter::once(column_definition(&NAME))
            .chain(columns.iter().map(|c| json!({"name": c.name, "type": c.type_, "format": c.format, "description": c.description, "priority": c.priority})))
            .collect();
    }
    kind.printer.columns.iter().map(column_definition).collect()
}

fn row(kind: &KindInfo, obj: &Value, include: IncludeObject) -> Value {
    let cells = match custom_columns(kind) {
        Some(columns) => std::iter::once(json!(krate_api::object::name(obj)))
            .chain(columns.iter().map(|c| custom_cell(c, obj)))
            .collect(),
        None => (kind.printer.cells)(obj),
    };
    let mut row = json!({"cells": cells});
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => row["object"] = partial_metadata(obj),
        IncludeObject::Object => row["object"] = obj.clone(),
    }
    row
}

pub fn list_table(kind: &KindInfo, items: &[Value], include: IncludeObject) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": column_definitions(kind),
        "rows": items.iter().map(|o| row(kind, o, include)).collect::<Vec<_>>(),
    })
}

pub fn object_table(kind: &KindInfo, obj: &Value) -> Value {
    let mut t = list_table(kind, std::slice::from_ref(obj), IncludeObject::Metadata);
    t["metadata"] = json!({"resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""))});
    t
}

/// A table carrying one row (and, unless `headers` is false, the columns): for watches.
pub fn event_table(kind: &KindInfo, obj: &Value, include: IncludeObject, headers: bool) -> Value {
    let mut t = list_table(kind, std::slice::from_ref(obj), include);
    if !headers {
        t["columnDefinitions"] = json!([]);
    }
    t["metadata"] = json!({"resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""))});
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_column_paths() {
        let obj = json!({"spec": {"size": 3, "items": [{"n": "a"}, {"n": "b"}]}});
        assert_eq!(json_path(&obj, ".spec.size"), vec![json!(3)]);
        assert_eq!(json_path(&obj, ".spec.items[1].n"), vec![json!("b")]);
        assert_eq!(json_path(&obj, ".spec.items[*].n"), vec![json!("a"), json!("b")]);
        assert!(json_path(&obj, ".spec.nothing").is_empty());
    }
}

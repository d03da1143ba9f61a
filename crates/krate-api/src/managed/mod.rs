//! Field management: `metadata.managedFields` bookkeeping for every write, and
//! server-side apply (merge, conflict detection between field managers, removal of
//! fields a manager stopped applying).

pub mod fields;

use serde_json::{json, Value};

use crate::object;
use crate::schema::Node;
use crate::ApiError;
use fields::{FieldSet, Path};

/// Who writes, and through which endpoint.
#[derive(Clone, Debug)]
pub struct Manager<'a> {
    pub name: &'a str,
    pub api_version: &'a str,
    /// `Some("status")` for writes through the status subresource.
    pub subresource: Option<&'a str>,
    /// The main resource of a kind with a status subresource does not own status.
    pub ignore_status: bool,
}

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: Option<String>,
    fields: FieldSet,
}

impl Entry {
    fn parse(v: &Value) -> Option<Entry> {
        Some(Entry {
            manager: v.get("manager").and_then(Value::as_str).unwrap_or_default().to_string(),
            operation: v.get("operation").and_then(Value::as_str).unwrap_or("Update").to_string(),
            api_version: v.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string(),
            time: v.get("time").and_then(Value::as_str).unwrap_or_default().to_string(),
            subresource: v.get("subresource").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string),
            fields: FieldSet::from_fields_v1(v.get("fieldsV1").unwrap_or(&Value::Null)),
        })
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": self.fields.to_fields_v1(),
        });
        if let Some(s) = &self.subresource {
            v["subresource"] = json!(s);
        }
        // A request without a field manager or user agent: upstream omits the empty name.
        if self.manager.is_empty() {
            v.as_object_mut().expect("an object").remove("manager");
        }
        v
    }

    fn is(&self, manager: &Manager, operation: &str) -> bool {
        self.manager == manager.name
            && self.operation == operation
            && self.subresource.as_deref() == manager.subresource
    }
}

fn entries(obj: &Value) -> Vec<Entry> {
    object::get(obj, &["metadata", "managedFields"])
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Entry::parse).collect())
        .unwrap_or_default()
}

fn store_entries(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries.iter().filter(|e| !e.fields.is_empty()).map(Entry::to_json).collect();
    if list.is_empty() {
        object::remove(obj, &["metadata", "managedFields"]);
    } else {
        object::set(obj, &["metadata", "managedFields"], Value::Array(list));
    }
}

/// Metadata the system owns; never part of a manager's fields.
const SYSTEM_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// Drops the paths no manager can own through `manager`'s endpoint.
fn scope_fields(set: &mut FieldSet, manager: &Manager) {
    set.retain(|path| {
        let first = path.first().map(String::as_str);
        if matches!(first, Some("f:apiVersion" | "f:kind")) {
            return false;
        }
        if first == Some("f:metadata")
            && path.get(1).is_some_and(|p| SYSTEM_METADATA.iter().any(|s| p == &format!("f:{s}")))
        {
            return false;
        }
        match manager.subresource {
            Some("status") => first == Some("f:status"),
            _ => !(manager.ignore_status && first == Some("f:status")),
        }
    });
    set.remove(&[]);
}

fn now() -> String {
    object::now_rfc3339()
}

/// Records a create, update or non-apply patch by `manager` in `new`'s managedFields:
/// the fields it changed become its own and are taken from every other manager; fields
/// that no longer exist are dropped from all managers.
///
/// A request that sets managedFields itself replaces them (an empty list entry clears
/// them), as upstream allows.
pub fn track_update(schema: Option<&Node>, old: Option<&Value>, new: &mut Value, manager: &Manager) {
    let requested = object::get(new, &["metadata", "managedFields"]).cloned();
    let previous = old.map(entries).unwrap_or_default();
    let mut list = match &requested {
        Some(Value::Array(items))
            if old.and_then(|o| object::get(o, &["metadata", "managedFields"])) != requested.as_ref() =>
        {
            let parsed: Vec<Entry> = items.iter().filter_map(Entry::parse).collect();
            store_entries(new, &parsed);
            return;
        }
        _ => previous,
    };
    let mut changed = fields::changed(schema, old, new);
    scope_fields(&mut changed, manager);
    for entry in &mut list {
        entry.fields = entry.fields.difference(&changed);
        entry.fields.retain(|path| fields::lookup(schema, new, path).is_some());
    }
    if !changed.is_empty() {
        match list.iter_mut().find(|e| e.is(manager, "Update")) {
            Some(entry) => {
                entry.fields.union(&changed);
                entry.time = now();
                entry.api_version = manager.api_version.to_string();
            }
            None => list.push(Entry {
                manager: manager.name.to_string(),
                operation: "Update".into(),
                api_version: manager.api_version.to_string(),
                time: now(),
                subresource: manager.subresource.map(str::to_string),
                fields: changed,
            }),
        }
    }
    store_entries(new, &list);
}

/// Server-side apply of `config` by `manager` onto `live` (None: the object is new).
/// Returns the merged object with updated managedFields, or a 409 listing the fields
/// other managers own with different values (unless `force`, which takes them over).
pub fn apply(
    schema: Option<&Node>,
    live: Option<&Value>,
    config: &Value,
    manager: &Manager,
    force: bool,
) -> Result<Value, ApiError> {
    let mut config = config.clone();
    if let Some(map) = config.as_object_mut() {
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
            meta.remove("resourceVersion");
        }
        match manager.subresource {
            Some("status") => map.retain(|k, _| k == "status"),
            _ if manager.ignore_status => {
                map.remove("status");
            }
            _ => {}
        }
    }
    let mut applied = fields::of_object(schema, &config);
    scope_fields(&mut applied, manager);
    let mut list = live.map(entries).unwrap_or_default();
    let mut merged = live.cloned().unwrap_or_else(|| json!({}));
    fields::merge(schema, &mut merged, &config);

    // Conflicts: leaves whose value changes and that another manager owns.
    let mut conflicts: Vec<(String, String, Path)> = Vec::new();
    if let Some(live) = live {
        // An element's identity is its key; only its fields can conflict.
        for path in applied
            .members()
            .into_iter()
            .filter(|p| p.last().is_some_and(|e| e.starts_with("f:") || e.starts_with("i:")))
        {
            let (Some(before), Some(after)) =
                (fields::lookup(schema, live, &path), fields::lookup(schema, &merged, &path))
            else {
                continue;
            };
            if before == after {
                continue;
            }
            for entry in list.iter().filter(|e| e.manager != manager.name && e.fields.contains(&path)) {
                conflicts.push((entry.manager.clone(), entry.api_version.clone(), path.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(&conflicts));
    }
    for (owner, _, path) in &conflicts {
        for entry in list.iter_mut().filter(|e| &e.manager == owner) {
            entry.fields.remove(path);
        }
    }

    // Fields this manager applied before but not now, and nobody else owns, are removed.
    let previous = list.iter().find(|e| e.is(manager, "Apply")).map(|e| e.fields.clone()).unwrap_or_default();
    let others: Vec<&FieldSet> = list.iter().filter(|e| !e.is(manager, "Apply")).map(|e| &e.fields).collect();
    let mut dropped: Vec<Path> = previous
        .difference(&applied)
        .members()
        .into_iter()
        .filter(|p| !others.iter().any(|o| o.owns_under(p)))
        .collect();
    // Parents first; whatever lies below a removed element goes with it.
    dropped.sort_by_key(Vec::len);
    let mut removed: Vec<Path> = Vec::new();
    for path in dropped {
        if removed.iter().any(|r| path.starts_with(r)) {
            continue;
        }
        if fields::remove_at(schema, &mut merged, &path) {
            removed.push(path);
        }
    }

    match list.iter_mut().find(|e| e.is(manager, "Apply")) {
        Some(entry) => {
            entry.fields = applied;
            entry.time = now();
            entry.api_version = manager.api_version.to_string();
        }
        None => list.push(Entry {
            manager: manager.name.to_string(),
            operation: "Apply".into(),
            api_version: manager.api_version.to_string(),
            time: now(),
            subresource: manager.subresource.map(str::to_string),
            fields: applied,
        }),
    }
    for entry in &mut list {
        entry.fields.retain(|path| fields::lookup(schema, &merged, path).is_some());
    }
    store_entries(&mut merged, &list);
    Ok(merged)
}

fn conflict_error(conflicts: &[(String, String, Path)]) -> ApiError {
    let n = conflicts.len();
    let mut message = format!("Apply failed with {n} conflict{}: ", if n == 1 { "" } else { "s" });
    let mut by_manager: Vec<(&str, &str, Vec<String>)> = Vec::new();
    for (m, v, p) in conflicts {
        match by_manager.iter_mut().find(|(bm, _, _)| bm == m) {
            Some((_, _, paths)) => paths.push(fields::render(p)),
            None => by_manager.push((m, v, vec![fields::render(p)])),
        }
    }
    let parts: Vec<String> = by_manager
        .iter()
        .map(|(m, v, paths)| {
            if paths.len() == 1 {
                format!("conflict with \"{m}\" using {v}: {}", paths[0])
            } else {
                format!("conflicts with \"{m}\" using {v}:\n- {}", paths.join("\n- "))
            }
        })
        .collect();
    message.push_str(&parts.join("\n"));
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(m, v, p)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\" using {v}"), "field": fields::render(p)}))
        .collect();
    let mut err = ApiError::new(409, "Conflict", message);
    err.details = Some(json!({"causes": causes}));
    err
}

#[cfg(test)]
mod tests;

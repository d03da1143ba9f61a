//! Server-side tables (`as=Table`), as `kubectl get` prints them.

use krate_api::object::get_str;
use krate_api::KindInfo;
use serde_json::{json, Value};

use super::negotiate::{partial_metadata, IncludeObject};

/// Upstream's `duration.HumanDuration`, used for AGE columns.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let minutes = s / 60;
    if minutes < 10 {
        return if s % 60 == 0 { format!("{minutes}m") } else { format!("{minutes}m{}s", s % 60) };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = s / 3600;
    if hours < 8 {
        return if minutes % 60 == 0 { format!("{hours}h") } else { format!("{hours}h{}m", minutes % 60) };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        return if hours % 24 == 0 { format!("{}d", hours / 24) } else { format!("{}d{}h", hours / 24, hours % 24) };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let days = (hours / 24) % 365;
        return if days == 0 { format!("{}y", hours / 24 / 365) } else { format!("{}y{}d", hours / 24 / 365, days) };
    }
    format!("{}y", hours / 24 / 365)
}

/// Seconds since an RFC 3339 timestamp.
pub fn seconds_since(ts: &str) -> Option<i64> {
    let t: jiff::Timestamp = ts.parse().ok()?;
    Some(jiff::Timestamp::now().as_second() - t.as_second())
}

pub fn age(obj: &Value) -> String {
    get_str(obj, &["metadata", "creationTimestamp"])
        .and_then(seconds_since)
        .map(human_duration)
        .unwrap_or_else(|| "<unknown>".into())
}

/// One column: (name, type, format, priority, description).
type Column = (&'static str, &'static str, &'static str, u8, &'static str);

const NAME_COLUMN: Column = ("Name", "string", "name", 0, "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names");
const AGE_COLUMN: Column = ("Age", "string", "", 0, "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata");

fn columns_for(_kind: &KindInfo) -> Vec<Column> {
    vec![NAME_COLUMN, AGE_COLUMN]
}

fn cells_for(_kind: &KindInfo, obj: &Value) -> Vec<Value> {
    vec![json!(krate_api::object::name(obj)), json!(age(obj))]
}

fn column_definitions(kind: &KindInfo) -> Vec<Value> {
    columns_for(kind)
        .into_iter()
        .map(|(name, ty, format, priority, description)| {
            json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
        })
        .collect()
}

fn row(kind: &KindInfo, obj: &Value, include: IncludeObject) -> Value {
    let mut row = json!({"cells": cells_for(kind, obj)});
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
    fn human_durations_match_upstream() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 5 * 60), "3h5m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(40 * 86400), "40d");
    }
}

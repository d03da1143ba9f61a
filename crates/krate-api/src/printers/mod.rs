//! Server-side table columns per kind (what `kubectl get` prints), as upstream's printers
//! (`pkg/printers/internalversion`). A kind with columns of its own names its `Printer`
//! in the kinds table; the API server assembles tables from it without knowing kinds.
//! The helpers the printers share (ages, selectors, container lists) live here.

use serde_json::{json, Value};

use crate::object::{get, get_str};

mod cluster;
mod pods;
mod services;
mod workloads;

pub use cluster::{
    API_SERVICES, COMPONENT_STATUSES, CONFIG_MAPS, CRDS, CSRS, EVENTS, EVENTS_V1, LEASES, NAMESPACES, NODES, PDBS,
    PRIORITY_CLASSES, RESOURCE_QUOTAS, SECRETS, SERVICE_ACCOUNTS, WEBHOOK_CONFIGURATIONS,
};
pub use pods::PODS;
pub use services::{ENDPOINTS, ENDPOINT_SLICES, SERVICES};
pub use workloads::{CRON_JOBS, DAEMON_SETS, DEPLOYMENTS, JOBS, REPLICA_SETS, STATEFUL_SETS};

/// One column definition of a Table.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    pub name: &'static str,
    pub ty: &'static str,
    pub format: &'static str,
    /// 0: always shown; 1: shown with `-o wide`.
    pub priority: u8,
    pub description: &'static str,
}

/// A kind's columns and how one object fills them (a cell per column, in order).
pub struct Printer {
    pub columns: &'static [Column],
    pub cells: fn(&Value) -> Vec<Value>,
}

pub const NAME: Column = Column {
    name: "Name",
    ty: "string",
    format: "name",
    priority: 0,
    description: "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
};
pub const AGE: Column = Column {
    name: "Age",
    ty: "string",
    format: "",
    priority: 0,
    description: "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
};

/// A string column without description.
pub const fn string(name: &'static str, priority: u8) -> Column {
    Column { name, ty: "string", format: "", priority, description: "" }
}

/// An integer column without description.
pub const fn integer(name: &'static str, priority: u8) -> Column {
    Column { name, ty: "integer", format: "", priority, description: "" }
}

/// Name and Age: what kinds without columns of their own print.
pub const DEFAULT: Printer = Printer { columns: &[NAME, AGE], cells: |obj| vec![name(obj), json!(age(obj))] };

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

/// The AGE cell: time since creation.
pub fn age(obj: &Value) -> String {
    since(get_str(obj, &["metadata", "creationTimestamp"]))
}

/// Time since a timestamp, `<unknown>` without one.
pub fn since(ts: Option<&str>) -> String {
    ts.and_then(seconds_since).map(human_duration).unwrap_or_else(|| "<unknown>".into())
}

fn name(obj: &Value) -> Value {
    json!(crate::object::name(obj))
}

fn s(obj: &Value, path: &[&str]) -> String {
    get_str(obj, path).unwrap_or_default().to_string()
}

fn int(obj: &Value, path: &[&str]) -> i64 {
    get(obj, path).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(v: String) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v
    }
}

/// The number of entries of a map or list.
fn count(obj: &Value, path: &[&str]) -> i64 {
    match get(obj, path) {
        Some(Value::Object(m)) => m.len() as i64,
        Some(Value::Array(a)) => a.len() as i64,
        _ => 0,
    }
}

/// Containers and images of a pod template, comma separated.
fn containers_and_images(spec: Option<&Value>) -> (String, String) {
    let containers = spec.and_then(|s| s.get("containers")).and_then(Value::as_array).cloned().unwrap_or_default();
    let names: Vec<String> = containers.iter().map(|c| s(c, &["name"])).collect();
    let images: Vec<String> = containers.iter().map(|c| s(c, &["image"])).collect();
    (names.join(","), images.join(","))
}

fn selector_string(obj: &Value, path: &[&str]) -> String {
    get(obj, path)
        .and_then(|sel| crate::selectors::LabelSelector::from_json(sel).ok())
        .map(|sel| sel.to_query())
        .filter(|q| !q.is_empty())
        .unwrap_or_else(|| "<none>".into())
}

/// A string map as `k=v,k=v` (node selectors, service selectors).
fn map_string(obj: &Value, pointer: &str) -> String {
    obj.pointer(pointer)
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

/// The first three entries, then how many more (endpoint lists).
fn first_three(items: &[String]) -> String {
    if items.len() > 3 {
        format!("{} + {} more...", items[..3].join(","), items.len() - 3)
    } else {
        items.join(",")
    }
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

    #[test]
    fn every_printer_fills_every_column() {
        let printers: &[&Printer] = &[
            &DEFAULT,
            &PODS,
            &DEPLOYMENTS,
            &REPLICA_SETS,
            &STATEFUL_SETS,
            &DAEMON_SETS,
            &JOBS,
            &CRON_JOBS,
            &SERVICES,
            &ENDPOINTS,
            &ENDPOINT_SLICES,
            &NAMESPACES,
            &NODES,
            &CONFIG_MAPS,
            &SECRETS,
            &SERVICE_ACCOUNTS,
            &PDBS,
            &PRIORITY_CLASSES,
            &RESOURCE_QUOTAS,
            &LEASES,
            &CRDS,
            &CSRS,
            &EVENTS,
            &EVENTS_V1,
        ];
        let obj = json!({"metadata": {"name": "x", "creationTimestamp": "2020-01-01T00:00:00Z"}});
        for p in printers {
            assert_eq!((p.cells)(&obj).len(), p.columns.len(), "{:?}", p.columns);
        }
    }
}

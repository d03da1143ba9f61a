//! Small helpers for working with objects as JSON values.

use serde_json::{Map, Value};

/// Reads a nested field: `get(obj, &["spec", "replicas"])`.
pub fn get<'a>(obj: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(obj, |v, key| v.get(key))
}

pub fn get_str<'a>(obj: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(obj, path).and_then(Value::as_str)
}

/// Mutable access to a nested object, creating missing objects on the way. Returns
/// `None` if something on the path exists but is not an object.
pub fn object_at<'a>(obj: &'a mut Value, path: &[&str]) -> Option<&'a mut Map<String, Value>> {
    let mut cur = obj;
    for key in path {
        if cur.is_null() {
            *cur = Value::Object(Map::new());
        }
        cur = cur.as_object_mut()?.entry(key.to_string()).or_insert(Value::Object(Map::new()));
    }
    if cur.is_null() {
        *cur = Value::Object(Map::new());
    }
    cur.as_object_mut()
}

/// Sets `path` to `value` unless it is already set (upstream "defaulting"; as in Go, an
/// empty string counts as unset).
pub fn default(obj: &mut Value, path: &[&str], value: Value) {
    let Some((last, parent)) = path.split_last() else { return };
    if let Some(map) = object_at(obj, parent) {
        let slot = map.entry(last.to_string()).or_insert(Value::Null);
        if slot.is_null() || slot.as_str() == Some("") {
            *slot = value;
        }
    }
}

pub fn set(obj: &mut Value, path: &[&str], value: Value) {
    let Some((last, parent)) = path.split_last() else { return };
    if let Some(map) = object_at(obj, parent) {
        map.insert(last.to_string(), value);
    }
}

pub fn remove(obj: &mut Value, path: &[&str]) -> Option<Value> {
    let (last, parent) = path.split_last()?;
    let mut cur = obj;
    for key in parent {
        cur = cur.get_mut(key)?;
    }
    cur.as_object_mut()?.remove(*last)
}

/// Calls `f` on each element of the array at `path` (if any).
pub fn for_each_mut(obj: &mut Value, path: &[&str], mut f: impl FnMut(&mut Value)) {
    let mut cur = Some(obj);
    for key in path {
        cur = cur.and_then(|v| v.get_mut(key));
    }
    if let Some(Value::Array(items)) = cur {
        items.iter_mut().for_each(&mut f);
    }
}

pub fn name(obj: &Value) -> &str {
    get_str(obj, &["metadata", "name"]).unwrap_or_default()
}

pub fn namespace(obj: &Value) -> Option<&str> {
    get_str(obj, &["metadata", "namespace"]).filter(|ns| !ns.is_empty())
}

pub fn resource_version(obj: &Value) -> Option<&str> {
    get_str(obj, &["metadata", "resourceVersion"]).filter(|rv| !rv.is_empty())
}

pub fn uid(obj: &Value) -> &str {
    get_str(obj, &["metadata", "uid"]).unwrap_or_default()
}

/// The finalizers on an object.
pub fn finalizers(obj: &Value) -> Vec<String> {
    get(obj, &["metadata", "finalizers"])
        .and_then(Value::as_array)
        .map(|f| f.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Seconds since the Unix epoch (JWT times, for one).
pub fn unix_seconds() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// RFC 3339 UTC timestamp with second precision, as upstream's `metav1.Time`.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Microsecond precision, as upstream's `metav1.MicroTime`.
pub fn now_rfc3339_micros() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string()
}

/// A timestamp `seconds` from now.
pub fn rfc3339_in(seconds: i64) -> String {
    let t = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(seconds);
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

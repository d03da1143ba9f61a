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

/// JSON text indented with two spaces per level, as Go's `json.MarshalIndent(v, "", "  ")`
/// writes it (`{}` and `[]` stay empty, `": "` after keys, no final newline), without
/// parsing it into a map, so its fields keep their order. Text that is not JSON comes
/// out re-spaced but otherwise as it went in.
pub fn indent_json(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 2);
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let newline = |out: &mut Vec<u8>, depth: usize| {
        out.push(b'\n');
        out.extend(std::iter::repeat_n(b' ', depth * 2));
    };
    let mut bytes = text.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        if in_string {
            out.push(b);
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                out.push(b);
            }
            b'{' | b'[' => {
                out.push(b);
                while bytes.peek().is_some_and(u8::is_ascii_whitespace) {
                    bytes.next();
                }
                if matches!(bytes.peek(), Some(b'}' | b']')) {
                    out.push(bytes.next().unwrap_or_default());
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(b);
            }
            b',' => {
                out.push(b);
                newline(&mut out, depth);
            }
            b':' => out.extend_from_slice(b": "),
            b if b.is_ascii_whitespace() => {}
            _ => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::indent_json;

    #[test]
    fn json_is_indented_as_gos_marshal_indent_in_its_own_order() {
        let text = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"items":[],"details":{"name":"a \"b\" {c}","causes":[{"x":1},{"y":[1,2]}]},"code":404}"#;
        let expected = "{\n  \"kind\": \"Status\",\n  \"apiVersion\": \"v1\",\n  \"metadata\": {},\n  \"items\": [],\n  \"details\": {\n    \"name\": \"a \\\"b\\\" {c}\",\n    \"causes\": [\n      {\n        \"x\": 1\n      },\n      {\n        \"y\": [\n          1,\n          2\n        ]\n      }\n    ]\n  },\n  \"code\": 404\n}";
        assert_eq!(String::from_utf8(indent_json(text)).unwrap(), expected);
        assert_eq!(indent_json(b"{\"a\":1}\n"), b"{\n  \"a\": 1\n}");
    }
}

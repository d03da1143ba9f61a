//! JSON written as upstream's encoder writes it: a built-in object's fields in its Go
//! struct's order (`kind` and `apiVersion` first, embedded structs' fields where the
//! struct is embedded), map keys sorted, and Go's escaping of `<`, `>`, `&`, U+2028 and
//! U+2029 in strings. Custom resources and anything else without a schema are maps to
//! Go too: their keys come sorted.
//!
//! The order is the protobuf schema's declaration order, which go-to-protobuf takes from
//! the Go structs (tags, by contrast, were handed out as fields were added).

use serde_json::{Map, Value};

use super::{schema, Kind};

/// `value` as upstream would encode it (no trailing newline).
pub fn to_go_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let message = match (value.get("apiVersion"), value.get("kind")) {
        (Some(Value::String(api_version)), Some(Value::String(kind))) => super::message_for(api_version, kind),
        _ => None,
    };
    match (message, value) {
        (Some(name), Value::Object(map)) => write_message(name, map, true, &mut out),
        _ => write_value(None, value, &mut out),
    }
    out
}

fn write_value(kind: Option<&Kind>, value: &Value, out: &mut Vec<u8>) {
    match (kind, value) {
        (Some(Kind::Message(name)), Value::Object(map)) if schema().declared.contains_key(name.as_str()) => {
            write_message(name, map, false, out)
        }
        (Some(Kind::Repeated(elem)), Value::Array(items)) => write_array(Some(elem), items, out),
        (Some(Kind::Map(_, values)), Value::Object(map)) => write_map(Some(values), map, out),
        (_, Value::Object(map)) => write_map(None, map, out),
        (_, Value::Array(items)) => write_array(None, items, out),
        (_, Value::String(s)) => write_string(s, out),
        (_, scalar) => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

fn write_array(elem: Option<&Kind>, items: &[Value], out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_value(elem, item, out);
    }
    out.push(b']');
}

/// A Go map: keys sorted (serde_json's maps iterate so).
fn write_map(values: Option<&Kind>, map: &Map<String, Value>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(key, out);
        out.push(b':');
        write_value(values, value, out);
    }
    out.push(b'}');
}

/// A Go struct: its declared fields in order, then whatever it does not declare
/// (sorted), so that nothing a client sent is lost.
fn write_message(name: &str, map: &Map<String, Value>, top: bool, out: &mut Vec<u8>) {
    let declared = &schema().declared[name];
    out.push(b'{');
    let mut first = true;
    let mut entry = |key: &str, kind: Option<&Kind>, value: &Value, out: &mut Vec<u8>| {
        if !first {
            out.push(b',');
        }
        first = false;
        write_string(key, out);
        out.push(b':');
        write_value(kind, value, out);
    };
    let type_meta = ["kind", "apiVersion"];
    if top {
        for key in type_meta {
            if let Some(v) = map.get(key) {
                entry(key, None, v, out);
            }
        }
    }
    for (key, kind) in &declared.fields {
        if let Some(v) = map.get(key) {
            entry(key, Some(kind), v, out);
        }
    }
    for (key, v) in map {
        let written = declared.names.contains(key.as_str()) || (top && type_meta.contains(&key.as_str()));
        if !written {
            entry(key, None, v, out);
        }
    }
    out.push(b'}');
}

/// A string as Go's encoding/json escapes it: as serde_json does, plus HTML-significant
/// characters and the two JavaScript line terminators.
fn write_string(s: &str, out: &mut Vec<u8>) {
    let escaped = serde_json::to_string(s).unwrap_or_default();
    if !escaped.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        out.extend_from_slice(escaped.as_bytes());
        return;
    }
    for c in escaped.chars() {
        match c {
            '<' => out.extend_from_slice(b"\\u003c"),
            '>' => out.extend_from_slice(b"\\u003e"),
            '&' => out.extend_from_slice(b"\\u0026"),
            '\u{2028}' => out.extend_from_slice(b"\\u2028"),
            '\u{2029}' => out.extend_from_slice(b"\\u2029"),
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(v: Value) -> String {
        String::from_utf8(to_go_json(&v)).unwrap()
    }

    #[test]
    fn built_in_objects_come_in_go_struct_order() {
        let cm = json!({"apiVersion": "v1", "data": {"b": "2", "a": "1"}, "kind": "ConfigMap",
                        "metadata": {"uid": "u", "name": "x", "namespace": "default", "creationTimestamp": "2026-12-03T10:00:00Z",
                                     "ownerReferences": [{"uid": "o", "kind": "Deployment", "apiVersion": "apps/v1", "name": "d"}]}});
        assert_eq!(
            text(cm),
            r#"{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"x","namespace":"default","uid":"u","creationTimestamp":"2026-12-03T10:00:00Z","ownerReferences":[{"apiVersion":"apps/v1","kind":"Deployment","name":"d","uid":"o"}]},"data":{"a":"1","b":"2"}}"#
        );
    }

    #[test]
    fn embedded_structs_take_their_place_and_unknown_fields_come_last() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Running"}, "zzz": 1,
                         "spec": {"volumes": [{"configMap": {"name": "c"}, "name": "v"}], "containers": []}, "metadata": {}});
        assert_eq!(
            text(pod),
            r#"{"kind":"Pod","apiVersion":"v1","metadata":{},"spec":{"volumes":[{"name":"v","configMap":{"name":"c"}}],"containers":[]},"status":{"phase":"Running"},"zzz":1}"#
        );
    }

    #[test]
    fn a_status_and_custom_resources() {
        let status = json!({"code": 404, "reason": "NotFound", "message": "a <b> & c", "status": "Failure",
                            "metadata": {}, "apiVersion": "v1", "kind": "Status", "details": {"kind": "pods", "name": "x"}});
        assert_eq!(
            text(status),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"a \u003cb\u003e \u0026 c","reason":"NotFound","details":{"name":"x","kind":"pods"},"code":404}"#
        );
        let widget = json!({"kind": "Widget", "apiVersion": "example.com/v1", "spec": {"z": 1, "a": 2}, "metadata": {"name": "w"}});
        assert_eq!(
            text(widget),
            r#"{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"w"},"spec":{"a":2,"z":1}}"#
        );
    }
}

//! Encoding of the JSON form of built-in objects as Kubernetes protobuf, the mirror of
//! the decoder: client-go's typed clients (the controller manager, the scheduler, most
//! operators) ask for `application/vnd.kubernetes.protobuf` first.
//!
//! Fields go out in tag order, map entries by key, as Go's generated marshallers write
//! them. A JSON field the schema does not know, or of a type its field cannot hold, is
//! left out rather than failing the response: stored objects were validated on the way in.

use base64::Engine;
use serde_json::Value;

use super::{schema, Kind, INLINE, MAGIC};

pub(super) fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn key(tag: u32, wire: u8, out: &mut Vec<u8>) {
    varint(u64::from(tag) << 3 | u64::from(wire), out);
}

/// A length-delimited field.
pub(super) fn bytes_field(tag: u32, data: &[u8], out: &mut Vec<u8>) {
    key(tag, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn varint_field(tag: u32, v: u64, out: &mut Vec<u8>) {
    key(tag, 0, out);
    varint(v, out);
}

/// Go's `time.ParseDuration` for the `metav1.Duration` fields ("1m30s", "500ms").
fn parse_go_duration(s: &str) -> Option<i64> {
    let (negative, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_end..];
    }
    Some(if negative { -total.round() as i64 } else { total.round() as i64 })
}

/// The encoding of a message whose JSON form is not an object, or `None` for the rest.
fn special(name: &str, value: &Value) -> Option<Vec<u8>> {
    let short = name.rsplit('.').next().unwrap_or(name);
    let mut out = Vec::new();
    match name {
        "apimachinery.pkg.apis.meta.v1.Time" | "apimachinery.pkg.apis.meta.v1.MicroTime" => {
            let t: jiff::Timestamp = value.as_str()?.parse().ok()?;
            varint_field(1, t.as_second() as u64, &mut out);
            varint_field(2, t.subsec_nanosecond() as i64 as u64, &mut out);
        }
        "apimachinery.pkg.util.intstr.IntOrString" => match value {
            Value::String(s) => {
                varint_field(1, 1, &mut out);
                varint_field(2, 0, &mut out);
                bytes_field(3, s.as_bytes(), &mut out);
            }
            other => {
                varint_field(1, 0, &mut out);
                varint_field(2, other.as_i64()? as u64, &mut out);
                bytes_field(3, b"", &mut out);
            }
        },
        "apimachinery.pkg.api.resource.Quantity" => match value {
            Value::String(s) => bytes_field(1, s.as_bytes(), &mut out),
            other => bytes_field(1, other.to_string().as_bytes(), &mut out),
        },
        "apimachinery.pkg.apis.meta.v1.Duration" => {
            varint_field(1, parse_go_duration(value.as_str()?)? as u64, &mut out)
        }
        _ if short == "RawExtension"
            || short == "FieldsV1"
            || (short.eq_ignore_ascii_case("json") && name.starts_with("apiextensions")) =>
        {
            bytes_field(1, &serde_json::to_vec(value).ok()?, &mut out)
        }
        _ if short.starts_with("JsonSchemaPropsOr") => {
            let props = name.replace(short, "JsonSchemaProps");
            match (short, value) {
                ("JsonSchemaPropsOrBool", Value::Bool(b)) => varint_field(1, u64::from(*b), &mut out),
                ("JsonSchemaPropsOrBool", schema) => {
                    varint_field(1, 1, &mut out);
                    bytes_field(2, &message(&props, schema), &mut out);
                }
                ("JsonSchemaPropsOrArray", Value::Array(items)) => {
                    for item in items {
                        bytes_field(2, &message(&props, item), &mut out);
                    }
                }
                ("JsonSchemaPropsOrStringArray", Value::Array(items)) => {
                    for item in items.iter().filter_map(Value::as_str) {
                        bytes_field(2, item.as_bytes(), &mut out);
                    }
                }
                (_, schema) => bytes_field(1, &message(&props, schema), &mut out),
            }
        }
        _ if (short == "ExtraValue" || short == "Verbs") && value.is_array() => {
            for item in value.as_array()?.iter().filter_map(Value::as_str) {
                bytes_field(1, item.as_bytes(), &mut out);
            }
        }
        _ => return None,
    }
    Some(out)
}

/// One value of a field of type `kind` under `tag`; nothing when it cannot be held.
fn field(tag: u32, kind: &Kind, value: &Value, out: &mut Vec<u8>) {
    match (kind, value) {
        (_, Value::Null) => {}
        (Kind::String, Value::String(s)) => bytes_field(tag, s.as_bytes(), out),
        (Kind::String, Value::Number(n)) => bytes_field(tag, n.to_string().as_bytes(), out),
        (Kind::Bytes, Value::String(s)) => {
            if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(s) {
                bytes_field(tag, &raw, out)
            }
        }
        (Kind::Bool, Value::Bool(b)) => varint_field(tag, u64::from(*b), out),
        // Negative numbers are sign-extended to ten bytes, as Go writes int32 and int64.
        (Kind::Int32 | Kind::Int64, Value::Number(n)) => {
            if let Some(v) = n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)) {
                varint_field(tag, v as u64, out)
            }
        }
        (Kind::Double, Value::Number(n)) => {
            key(tag, 1, out);
            out.extend_from_slice(&n.as_f64().unwrap_or_default().to_le_bytes());
        }
        (Kind::Message(name), value) => bytes_field(tag, &message(name, value), out),
        (Kind::Repeated(elem), Value::Array(items)) => {
            for item in items {
                field(tag, elem, item, out);
            }
        }
        (Kind::Map(key_kind, value_kind), Value::Object(map)) => {
            // serde_json's maps iterate in key order, the order Go writes map entries in.
            let mut entry = Vec::new();
            for (k, v) in map {
                entry.clear();
                match **key_kind {
                    Kind::String => bytes_field(1, k.as_bytes(), &mut entry),
                    _ => field(1, key_kind, &k.parse::<i64>().map(Value::from).unwrap_or_default(), &mut entry),
                }
                field(2, value_kind, v, &mut entry);
                bytes_field(tag, &entry, out);
            }
        }
        _ => {}
    }
}

/// The bytes of message `name` (no envelope) for its JSON form.
pub fn message(name: &str, value: &Value) -> Vec<u8> {
    if let Some(encoded) = special(name, value) {
        return encoded;
    }
    let mut out = Vec::new();
    let (Some(fields), Some(object)) = (schema().ordered.get(name), value.as_object()) else { return out };
    for (tag, f) in fields {
        if f.json == INLINE {
            // An embedded Go struct: its fields are this object's in JSON.
            field(*tag, &f.kind, value, &mut out);
        } else if let Some(v) = object.get(&f.json) {
            field(*tag, &f.kind, v, &mut out);
        }
    }
    out
}

/// A `runtime.Unknown` envelope, prefixed with the protobuf magic, around `raw`.
pub fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    let mut type_meta = Vec::with_capacity(api_version.len() + kind.len() + 4);
    bytes_field(1, api_version.as_bytes(), &mut type_meta);
    bytes_field(2, kind.as_bytes(), &mut type_meta);
    let mut out = Vec::with_capacity(raw.len() + type_meta.len() + 16);
    out.extend_from_slice(MAGIC);
    bytes_field(1, &type_meta, &mut out);
    bytes_field(2, raw, &mut out);
    // Go writes the two strings even when empty.
    bytes_field(3, b"", &mut out);
    bytes_field(4, b"", &mut out);
    out
}

/// Encodes a whole object (its `apiVersion` and `kind` name the message), enveloped.
/// `None` when the kind has no protobuf form (custom resources, tables).
pub fn encode(value: &Value) -> Option<Vec<u8>> {
    let api_version = value.get("apiVersion")?.as_str()?;
    let kind = value.get("kind")?.as_str()?;
    let name = super::message_for(api_version, kind)?;
    Some(envelope(api_version, kind, &message(name, value)))
}

/// A list body from its items' encoded messages.
pub fn list(api_version: &str, list_kind: &str, list_meta: &Value, items: &[impl AsRef<[u8]>]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(items.iter().map(|i| i.as_ref().len() + 6).sum::<usize>() + 64);
    bytes_field(1, &message("apimachinery.pkg.apis.meta.v1.ListMeta", list_meta), &mut raw);
    for item in items {
        bytes_field(2, item.as_ref(), &mut raw);
    }
    envelope(api_version, list_kind, &raw)
}

/// One frame of a protobuf watch stream: a big-endian length, then a `WatchEvent`
/// whose object is the enveloped encoding of the event's object.
pub fn watch_frame(event_type: &str, enveloped_object: &[u8]) -> Vec<u8> {
    let mut raw_extension = Vec::with_capacity(enveloped_object.len() + 6);
    bytes_field(1, enveloped_object, &mut raw_extension);
    let mut event = Vec::with_capacity(raw_extension.len() + event_type.len() + 8);
    bytes_field(1, event_type.as_bytes(), &mut event);
    bytes_field(2, &raw_extension, &mut event);
    let mut frame = Vec::with_capacity(event.len() + 4);
    frame.extend_from_slice(&(event.len() as u32).to_be_bytes());
    frame.extend_from_slice(&event);
    frame
}

#[cfg(test)]
mod tests {
    use super::super::decode;
    use super::*;
    use serde_json::json;

    fn round_trip(v: Value) {
        let encoded = encode(&v).unwrap_or_else(|| panic!("no protobuf form for {v}"));
        assert_eq!(decode(&encoded).unwrap(), v);
    }

    #[test]
    fn objects_survive_a_round_trip() {
        round_trip(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default", "labels": {"a": "b", "app": "web"},
                         "creationTimestamp": "2026-12-03T10:00:00Z", "resourceVersion": "12",
                         "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"containers": [{"name": "c", "image": "busybox", "ports": [{"containerPort": 80, "protocol": "TCP"}],
                                     "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}},
                                     "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 3},
                                     "livenessProbe": {"tcpSocket": {"port": 8080}}}],
                     "volumes": [{"name": "scratch", "emptyDir": {}}],
                     "terminationGracePeriodSeconds": 30},
            "status": {"phase": "Running", "podIP": "10.42.0.5"}
        }));
        round_trip(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "d"}},
                     "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": [{"name": "c"}]}},
                     "strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}, "type": "RollingUpdate"}}
        }));
        round_trip(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"},
                          "spec": {"renewTime": "2026-12-03T10:00:00.123456Z", "leaseDurationSeconds": -1}}));
    }

    #[test]
    fn a_status_goes_out_as_meta_v1_status() {
        round_trip(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "message": "pods \"x\" not found", "reason": "NotFound",
                          "details": {"name": "x", "kind": "pods"}, "code": 404}));
    }

    #[test]
    fn custom_resources_have_no_protobuf_form() {
        assert!(encode(&json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})).is_none());
        assert!(encode(&json!({"apiVersion": "meta.k8s.io/v1", "kind": "Table"})).is_none());
    }

    #[test]
    fn lists_and_watch_frames_frame_their_items() {
        let pod = json!({"metadata": {"name": "p"}});
        let item = message("api.core.v1.Pod", &pod);
        let body = list("v1", "PodList", &json!({"resourceVersion": "7", "continue": "abc"}), &[&item, &item]);
        assert_eq!(
            decode(&body).unwrap(),
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7", "continue": "abc"},
                   "items": [pod, pod]})
        );
        let frame = watch_frame("ADDED", &envelope("v1", "Pod", &item));
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        let event = super::super::decode_message("apimachinery.pkg.apis.meta.v1.WatchEvent", &frame[4..]).unwrap();
        assert_eq!(event["type"], "ADDED");
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_go_duration("1h0m0s"), Some(3_600_000_000_000));
        assert_eq!(parse_go_duration("500ms"), Some(500_000_000));
        assert_eq!(parse_go_duration("-1.5s"), Some(-1_500_000_000));
        assert_eq!(parse_go_duration("0s"), Some(0));
        assert_eq!(parse_go_duration("5x"), None);
    }
}

//! Content negotiation on the `Accept` header: plain JSON, protobuf for built-in
//! kinds, server-side tables, or metadata-only objects.

use bytes::Bytes;
use krate_api::{ApiError, ApiResult};
use serde_json::{json, Value};

/// What `includeObject` asks tables to carry per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    /// `application/vnd.kubernetes.protobuf`, for kinds with a protobuf form.
    Protobuf,
    Table {
        include_object: IncludeObject,
    },
    /// PartialObjectMetadata / PartialObjectMetadataList.
    Metadata,
}

impl Format {
    pub fn content_type(&self) -> String {
        match self {
            Format::Json => "application/json".to_string(),
            Format::Protobuf => krate_api::protobuf::CONTENT_TYPE.to_string(),
            Format::Table { .. } => "application/json;as=Table;v=v1;g=meta.k8s.io".to_string(),
            Format::Metadata => "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io".to_string(),
        }
    }

    pub fn with_include_object(self, param: Option<&str>) -> Self {
        match self {
            Format::Table { .. } => Format::Table {
                include_object: match param {
                    Some("None") => IncludeObject::None,
                    Some("Object") => IncludeObject::Object,
                    _ => IncludeObject::Metadata,
                },
            },
            other => other,
        }
    }
}

/// Picks the first acceptable media type, as upstream does; 406 when none is.
/// `protobuf` says whether the resource has a protobuf form: custom resources have none
/// and fall back to a later JSON type where upstream would fail (kubernetes#86253).
pub fn negotiate(accept: Option<&str>, protobuf: bool) -> ApiResult<Format> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else { return Ok(Format::Json) };
    let mut protobuf_refused = false;
    for media in accept.split(',') {
        let mut parts = media.split(';').map(str::trim);
        let essence = parts.next().unwrap_or_default();
        let params: Vec<(&str, &str)> =
            parts.filter_map(|p| p.split_once('=')).map(|(k, v)| (k.trim(), v.trim())).collect();
        let param = |name: &str| params.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        if essence == krate_api::protobuf::CONTENT_TYPE && param("as").is_none() {
            if protobuf {
                return Ok(Format::Protobuf);
            }
            protobuf_refused = true;
            continue;
        }
        if !matches!(essence, "application/json" | "application/*" | "*/*" | "application/yaml") {
            continue;
        }
        match (param("as"), param("g"), param("v")) {
            (None, _, _) => return Ok(Format::Json),
            (Some("Table"), Some("meta.k8s.io"), Some("v1" | "v1beta1")) => {
                return Ok(Format::Table { include_object: IncludeObject::Metadata })
            }
            (
                Some("PartialObjectMetadata" | "PartialObjectMetadataList"),
                Some("meta.k8s.io"),
                Some("v1" | "v1beta1"),
            ) => return Ok(Format::Metadata),
            _ => continue,
        }
    }
    if protobuf_refused {
        return Err(ApiError::not_acceptable(
            "object *unstructured.Unstructured does not implement the protobuf marshalling interface and cannot be encoded to a protobuf message",
        ));
    }
    Err(ApiError::not_acceptable(format!(
        "only the following media types are accepted: application/json, application/yaml, application/json;as=Table;v=v1;g=meta.k8s.io (got {accept:?})"
    )))
}

/// The PartialObjectMetadata form of an object.
pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}

/// The same as [`partial_metadata`] from stored JSON, without parsing the whole object:
/// every metadata-only watcher (the garbage collector watches everything so) sends this.
pub fn partial_metadata_json(json: &[u8]) -> Bytes {
    #[derive(serde::Deserialize)]
    struct Metadata<'a> {
        #[serde(borrow)]
        metadata: Option<&'a serde_json::value::RawValue>,
    }
    let metadata = serde_json::from_slice::<Metadata>(json).ok().and_then(|m| m.metadata).map_or("{}", |m| m.get());
    const HEAD: &[u8] = br#"{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":"#;
    let mut out = Vec::with_capacity(HEAD.len() + metadata.len() + 1);
    out.extend_from_slice(HEAD);
    out.extend_from_slice(metadata.as_bytes());
    out.push(b'}');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_from_stored_json_matches_the_parsed_form() {
        let obj = json!({"kind": "Pod", "metadata": {"name": "a", "labels": {"x": "y"}}, "spec": {"containers": [{"name": "c"}]}});
        let bytes = partial_metadata_json(&serde_json::to_vec(&obj).unwrap());
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), partial_metadata(&obj));
        let bare = partial_metadata_json(br#"{"kind":"X"}"#);
        assert_eq!(serde_json::from_slice::<Value>(&bare).unwrap(), partial_metadata(&json!({"kind": "X"})));
    }

    #[test]
    fn kubectl_accept_headers() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(Some(kubectl), true).unwrap(), Format::Table { include_object: IncludeObject::Metadata });
        assert_eq!(negotiate(None, true).unwrap(), Format::Json);
        assert_eq!(
            negotiate(Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"), true).unwrap(),
            Format::Metadata
        );
        assert_eq!(negotiate(Some("application/json;as=Table;v=v9;g=meta.k8s.io"), true).unwrap_err().code, 406);
    }

    #[test]
    fn protobuf_for_kinds_that_have_it_json_for_the_rest() {
        let client_go = "application/vnd.kubernetes.protobuf, application/json";
        assert_eq!(negotiate(Some(client_go), true).unwrap(), Format::Protobuf);
        assert_eq!(negotiate(Some(client_go), false).unwrap(), Format::Json);
        let refused = negotiate(Some("application/vnd.kubernetes.protobuf"), false).unwrap_err();
        assert_eq!(refused.code, 406);
        assert!(
            refused.message.contains("does not implement the protobuf marshalling interface"),
            "{}",
            refused.message
        );
        assert_eq!(
            negotiate(Some("application/json, application/vnd.kubernetes.protobuf"), true).unwrap(),
            Format::Json
        );
    }
}

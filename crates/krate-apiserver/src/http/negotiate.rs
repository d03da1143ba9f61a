//! Content negotiation on the `Accept` header: plain JSON, server-side tables, or
//! metadata-only objects.

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
    Table { include_object: IncludeObject },
    /// PartialObjectMetadata / PartialObjectMetadataList.
    Metadata,
}

impl Format {
    pub fn content_type(&self) -> String {
        match self {
            Format::Json => "application/json".to_string(),
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
pub fn negotiate(accept: Option<&str>) -> ApiResult<Format> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else { return Ok(Format::Json) };
    for media in accept.split(',') {
        let mut parts = media.split(';').map(str::trim);
        let essence = parts.next().unwrap_or_default();
        let params: Vec<(&str, &str)> = parts.filter_map(|p| p.split_once('=')).map(|(k, v)| (k.trim(), v.trim())).collect();
        let param = |name: &str| params.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        if !matches!(essence, "application/json" | "application/*" | "*/*" | "application/yaml") {
            continue;
        }
        match (param("as"), param("g"), param("v")) {
            (None, _, _) => return Ok(Format::Json),
            (Some("Table"), Some("meta.k8s.io"), Some("v1" | "v1beta1")) => {
                return Ok(Format::Table { include_object: IncludeObject::Metadata })
            }
            (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some("meta.k8s.io"), Some("v1" | "v1beta1")) => {
                return Ok(Format::Metadata)
            }
            _ => continue,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_accept_headers() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(Some(kubectl)).unwrap(), Format::Table { include_object: IncludeObject::Metadata });
        assert_eq!(negotiate(Some("application/vnd.kubernetes.protobuf, application/json")).unwrap(), Format::Json);
        assert_eq!(negotiate(None).unwrap(), Format::Json);
        assert_eq!(negotiate(Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")).unwrap(), Format::Metadata);
        assert_eq!(negotiate(Some("application/vnd.kubernetes.protobuf")).unwrap_err().code, 406);
        assert_eq!(negotiate(Some("application/json;as=Table;v=v9;g=meta.k8s.io")).unwrap_err().code, 406);
    }
}

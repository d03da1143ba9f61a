//! Patch engines: JSON patch (RFC 6902) and JSON merge patch (RFC 7386).

use serde_json::Value;

use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    StrategicMerge,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        match essence {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::StrategicMerge),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Applies an RFC 6902 JSON patch document.
pub fn apply_json_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let patch: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("the JSON patch is malformed: {e}")))?;
    // Upstream answers a failed test or a missing path with 422 Invalid.
    json_patch::patch(target, &patch)
        .map_err(|e| ApiError::new(422, "Invalid", format!("the server rejected our request due to an error in our request: {e}")))
}

/// Applies an RFC 7386 merge patch.
pub fn apply_merge_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    if !patch.is_object() {
        return Err(ApiError::bad_request("the merge patch must be a JSON object"));
    }
    json_patch::merge(target, patch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_and_merge_patches() {
        let mut obj = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"replicas": 1}});
        apply_json_patch(&mut obj, &json!([{"op": "replace", "path": "/spec/replicas", "value": 3}])).unwrap();
        assert_eq!(obj["spec"]["replicas"], 3);
        apply_merge_patch(&mut obj, &json!({"metadata": {"labels": {"a": null, "b": "2"}}})).unwrap();
        assert_eq!(obj["metadata"]["labels"], json!({"b": "2"}));
        let err = apply_json_patch(&mut obj, &json!([{"op": "test", "path": "/spec/replicas", "value": 9}])).unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(apply_json_patch(&mut obj, &json!({"not": "a list"})).unwrap_err().code, 400);
    }
}

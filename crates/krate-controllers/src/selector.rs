//! Label selectors as list/watch query strings, and matched against objects read from
//! an informer's cache.

use krate_api::selectors::LabelSelector;
use kube::ResourceExt;
use serde_json::Value;

/// Whether `obj`'s labels satisfy the selector `query` (a malformed one matches nothing).
pub fn selects(query: &str, obj: &impl ResourceExt) -> bool {
    LabelSelector::parse(query).is_ok_and(|s| s.matches(obj.labels()))
}

/// `{"a": "1"}` → `a=1` (ReplicationController and Service selectors).
pub fn map_selector_string(map: &Value) -> String {
    map.as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

/// A `LabelSelector` (matchLabels and matchExpressions) as a query string.
pub fn label_selector_string(selector: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(labels) = selector.get("matchLabels").filter(|m| m.as_object().is_some_and(|o| !o.is_empty())) {
        parts.push(map_selector_string(labels));
    }
    for e in selector.get("matchExpressions").and_then(Value::as_array).into_iter().flatten() {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> =
            e["values"].as_array().map(|v| v.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        parts.push(match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            _ => format!("!{key}"),
        });
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn selectors_render_as_queries() {
        let s = json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}, {"key": "x", "operator": "DoesNotExist"}]});
        assert_eq!(super::label_selector_string(&s), "app=web,tier in (a,b),!x");
        assert_eq!(super::map_selector_string(&json!({"a": "1", "b": "2"})), "a=1,b=2");
    }
}

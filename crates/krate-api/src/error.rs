//! API errors, rendered as upstream `Status` objects.

use serde_json::{json, Value};

/// One invalid field, as upstream's `field.Error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`, `FieldValueForbidden`, ...
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn required(field: impl Into<String>, detail: &str) -> Self {
        let message =
            if detail.is_empty() { "Required value".to_string() } else { format!("Required value: {detail}") };
        Self { reason: "FieldValueRequired", field: field.into(), message }
    }

    pub fn invalid(field: impl Into<String>, value: &Value, detail: &str) -> Self {
        Self {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {}: {detail}", render_value(value)),
        }
    }

    /// `Invalid value: <detail>`, the value left out (upstream's `OmitValueType`, used
    /// for objects and lists).
    pub fn invalid_omitting_value(field: impl Into<String>, detail: &str) -> Self {
        Self { reason: "FieldValueInvalid", field: field.into(), message: format!("Invalid value: {detail}") }
    }

    pub fn not_supported(field: impl Into<String>, value: &Value, allowed: &[&str]) -> Self {
        let allowed: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
        Self::not_supported_values(field, value, &allowed)
    }

    /// Like `not_supported`, with the allowed values already rendered.
    pub fn not_supported_values(field: impl Into<String>, value: &Value, allowed: &[String]) -> Self {
        Self {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!("Unsupported value: {}: supported values: {}", render_value(value), allowed.join(", ")),
        }
    }

    pub fn forbidden(field: impl Into<String>, detail: &str) -> Self {
        Self { reason: "FieldValueForbidden", field: field.into(), message: format!("Forbidden: {detail}") }
    }

    pub fn too_many(field: impl Into<String>, actual: usize, max: u64) -> Self {
        Self {
            reason: "FieldValueTooMany",
            field: field.into(),
            message: format!("Too many: {actual}: must have at most {max} items"),
        }
    }

    pub fn too_long(field: impl Into<String>, max: u64) -> Self {
        Self {
            reason: "FieldValueTooLong",
            field: field.into(),
            message: format!("Too long: may not be more than {max} bytes"),
        }
    }

    pub fn duplicate(field: impl Into<String>, value: &Value) -> Self {
        Self {
            reason: "FieldValueDuplicate",
            field: field.into(),
            message: format!("Duplicate value: {}", render_value(value)),
        }
    }

    /// Upstream's rendering: `spec.replicas: Invalid value: -1: must be ...`.
    pub fn to_line(&self) -> String {
        format!("{}: {}", self.field, self.message)
    }
}

fn render_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

/// An error the API answers with: an HTTP code, an upstream reason, and a message.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
    /// Extra headers such as `Retry-After`.
    pub retry_after_seconds: Option<u64>,
    /// The Status's `metadata.continue`: a list whose continue token expired offers one
    /// that goes on from the same key at the newest revision.
    pub continue_token: Option<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None, retry_after_seconds: None, continue_token: None }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// `pods "x" not found`
    pub fn not_found(group: &str, resource: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", qualified(group, resource)))
            .with_details(details(group, resource, name))
    }

    /// A path the API does not serve (an unknown resource or subresource): upstream's
    /// router answers a generic 404 whose details are empty but present.
    pub fn no_such_path() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource").with_details(json!({}))
    }

    pub fn already_exists(group: &str, resource: &str, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", qualified(group, resource)))
            .with_details(details(group, resource, name))
    }

    pub fn conflict(group: &str, resource: &str, name: &str, detail: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {} \"{name}\": {detail}", qualified(group, resource)),
        )
        .with_details(details(group, resource, name))
    }

    /// The standard optimistic-concurrency conflict.
    pub fn modified(group: &str, resource: &str, name: &str) -> Self {
        Self::conflict(
            group,
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422 with one cause per invalid field: `Deployment.apps "x" is invalid: [...]`.
    pub fn invalid(group: &str, kind: &str, name: &str, errors: &[FieldError]) -> Self {
        let qualified_kind = if group.is_empty() { kind.to_string() } else { format!("{kind}.{group}") };
        let summary = match errors {
            [one] => one.to_line(),
            many => format!("[{}]", many.iter().map(FieldError::to_line).collect::<Vec<_>>().join(", ")),
        };
        let causes: Vec<Value> =
            errors.iter().map(|e| json!({"reason": e.reason, "message": e.message, "field": e.field})).collect();
        let mut d = json!({"name": name, "kind": kind, "causes": causes});
        if !group.is_empty() {
            d["group"] = json!(group);
        }
        Self::new(422, "Invalid", format!("{qualified_kind} \"{name}\" is invalid: {summary}")).with_details(d)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn too_large() -> Self {
        Self::new(413, "RequestEntityTooLarge", "the server rejected our request because the request body is too large")
    }

    /// An object body in a media type the server does not read.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::unsupported_among(
            content_type,
            &["application/json", "application/yaml", "application/vnd.kubernetes.protobuf"],
        )
    }

    /// A body whose media type is not among `accepted` (upstream's 415 wording).
    pub fn unsupported_among(content_type: &str, accepted: &[&str]) -> Self {
        Self::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: {} (got {content_type:?})", accepted.join(", ")))
    }

    pub fn not_acceptable(message: impl Into<String>) -> Self {
        Self::new(406, "NotAcceptable", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", format!("Internal error occurred: {}", message.into()))
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(504, "Timeout", message)
    }

    pub fn service_unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailable", message)
    }

    /// The `Status` object for this error.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        if let Some(seconds) = self.retry_after_seconds {
            status["details"]["retryAfterSeconds"] = json!(seconds);
        }
        if let Some(token) = &self.continue_token {
            status["metadata"]["continue"] = json!(token);
        }
        status
    }
}

/// A `Status` as upstream's JSON serializer writes it: fields in the Go struct's order
/// (`kind`, `apiVersion`, `metadata`, `status`, `message`, `reason`, `details`, `code`;
/// details and causes likewise), then a newline. Clients compare these bodies as text.
pub fn status_bytes(status: &Value) -> Vec<u8> {
    let mut bytes = crate::protobuf::to_go_json(status);
    bytes.push(b'\n');
    bytes
}

/// `deployments.apps` or `pods`.
pub fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

fn details(group: &str, resource: &str, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": resource});
    if !group.is_empty() {
        d["group"] = json!(group);
    }
    d
}

/// A successful `Status`, as returned by deletes.
pub fn success_status(group: &str, resource: &str, name: &str, uid: &str) -> Value {
    let mut d = details(group, resource, name);
    d["uid"] = json!(uid);
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": d})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_written_in_upstreams_field_order() {
        let err = ApiError::not_found("", "configmaps", "x");
        assert_eq!(
            String::from_utf8(status_bytes(&err.to_status())).unwrap(),
            "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\",\"message\":\"configmaps \\\"x\\\" not found\",\"reason\":\"NotFound\",\"details\":{\"name\":\"x\",\"kind\":\"configmaps\"},\"code\":404}\n"
        );
        let invalid =
            ApiError::invalid("apps", "Deployment", "d", &[crate::error::FieldError::required("spec.selector", "")]);
        let text = String::from_utf8(status_bytes(&invalid.to_status())).unwrap();
        assert!(
            text.contains("\"details\":{\"name\":\"d\",\"group\":\"apps\",\"kind\":\"Deployment\",\"causes\":[{\"reason\":\"FieldValueRequired\",\"message\":"),
            "{text}"
        );
        assert!(text.ends_with(",\"code\":422}\n"), "{text}");
        let deleted = success_status("apps", "deployments", "d", "u");
        assert_eq!(
            String::from_utf8(status_bytes(&deleted)).unwrap(),
            "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Success\",\"details\":{\"name\":\"d\",\"group\":\"apps\",\"kind\":\"deployments\",\"uid\":\"u\"}}\n"
        );
    }

    #[test]
    fn messages_match_upstream_wording() {
        assert_eq!(ApiError::not_found("apps", "deployments", "web").message, "deployments.apps \"web\" not found");
        assert_eq!(ApiError::not_found("", "pods", "p").message, "pods \"p\" not found");
        let e = ApiError::invalid(
            "",
            "ConfigMap",
            "Bad_Name",
            &[FieldError::invalid("metadata.name", &json!("Bad_Name"), "must be lower case")],
        );
        assert_eq!(e.code, 422);
        assert_eq!(
            e.message,
            "ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": must be lower case"
        );
        assert_eq!(e.to_status()["details"]["causes"][0]["field"], "metadata.name");
    }
}

//! CRD conversion webhooks (`spec.conversion.strategy: Webhook`): objects stored in one
//! version and served in another are sent to the CRD's webhook in a ConversionReview
//! (apiextensions.k8s.io/v1), as upstream's webhook converter does. The converted
//! object keeps the original's metadata except labels and annotations, which the
//! webhook may change; a failure is upstream's `conversion webhook for <gvk> failed:
//! ...`, an internal error for the request.
//!
//! Conversions are synchronous in the kinds table (`krate_api::convert::Conversion`),
//! so a call blocks its worker thread (`block_in_place`) for the webhook's answer.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, Weak};
use std::time::Duration;

use krate_api::convert::Conversion;
use krate_api::object::get_str;
use serde_json::{json, Value};

use super::client;
use crate::ApiServer;

/// Upstream's time limit for a conversion call.
const TIMEOUT: Duration = Duration::from_secs(30);

/// One served version of a CRD whose conversion strategy is Webhook.
pub(crate) struct WebhookConversion {
    server: Weak<ApiServer>,
    served: String,
    storage: String,
    kind: String,
    client_config: Value,
}

/// The conversions of the kinds table live as long as it may be referenced: interned
/// per server, version, kind and webhook configuration.
type Key = (usize, String, String, String, String);
static INTERNED: LazyLock<Mutex<HashMap<Key, &'static WebhookConversion>>> = LazyLock::new(Default::default);

/// The conversion of `served` objects stored as `storage` through the CRD's webhook.
pub(crate) fn for_version(
    server: &std::sync::Arc<ApiServer>,
    served: &str,
    storage: &str,
    kind: &str,
    webhook: &Value,
) -> &'static dyn Conversion {
    let client_config = webhook["clientConfig"].clone();
    let key = (
        std::sync::Arc::as_ptr(server) as usize,
        served.to_string(),
        storage.to_string(),
        kind.to_string(),
        client_config.to_string(),
    );
    let mut interned = INTERNED.lock().expect("conversion webhooks");
    *interned.entry(key).or_insert_with(|| {
        Box::leak(Box::new(WebhookConversion {
            server: std::sync::Arc::downgrade(server),
            served: served.to_string(),
            storage: storage.to_string(),
            kind: kind.to_string(),
            client_config,
        }))
    })
}

impl Conversion for WebhookConversion {
    fn store(&self, obj: Value) -> Result<Value, String> {
        self.convert(obj, &self.storage)
    }

    fn serve(&self, obj: Value) -> Result<Value, String> {
        self.convert(obj, &self.served)
    }

    fn serves_as_stored(&self, api_version: &str) -> bool {
        api_version == self.served
    }
}

impl WebhookConversion {
    fn convert(&self, obj: Value, desired: &str) -> Result<Value, String> {
        let from = get_str(&obj, &["apiVersion"]).unwrap_or_default().to_string();
        if from == desired {
            return Ok(obj);
        }
        let gvk = format!("{from}, Kind={}", self.kind);
        let failed = |e: String| format!("conversion webhook for {gvk} failed: {e}");
        let handle = tokio::runtime::Handle::try_current().map_err(|e| failed(e.to_string()))?;
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return Err(failed("conversion webhooks need a multi-threaded runtime".into()));
        }
        let server = self.server.upgrade().ok_or_else(|| failed("the API server is shutting down".into()))?;
        let uid = crate::registry::uuid_v4();
        let review = json!({
            "kind": "ConversionReview",
            "apiVersion": "apiextensions.k8s.io/v1",
            "request": {"uid": uid, "desiredAPIVersion": desired, "objects": [obj]},
        });
        let call = async {
            let target = client::target(&server.storage, &self.client_config, TIMEOUT)?;
            let ca_bundle = self.client_config["caBundle"].as_str().unwrap_or_default();
            client::post(&target, ca_bundle, krate_api::protobuf::to_go_json(&review), TIMEOUT).await
        };
        let body = tokio::task::block_in_place(|| handle.block_on(call)).map_err(failed)?;
        let converted = verify(&body, &uid).map_err(failed)?;
        let mut converted = converted.into_iter().next().ok_or_else(|| failed("no objects returned".into()))?;
        if converted["apiVersion"] != desired {
            return Err(format!(
                "conversion webhook for {gvk} returned invalid object at index 0: invalid groupVersion (expected {desired}, received {})",
                converted["apiVersion"].as_str().unwrap_or_default()
            ));
        }
        if converted["kind"] != self.kind.as_str() {
            return Err(format!(
                "conversion webhook for {gvk} returned invalid object at index 0: invalid kind (expected {}, received {})",
                self.kind,
                converted["kind"].as_str().unwrap_or_default()
            ));
        }
        restore_metadata(&obj_metadata(&review), &mut converted)
            .map_err(|e| format!("conversion webhook for {gvk} returned invalid metadata: {e}"))?;
        Ok(converted)
    }
}

fn obj_metadata(review: &Value) -> Value {
    review["request"]["objects"][0]["metadata"].clone()
}

/// The converted objects of a ConversionReview response, checked as upstream does.
fn verify(body: &[u8], uid: &str) -> Result<Vec<Value>, String> {
    let review: Value = serde_json::from_slice(body).map_err(|e| format!("couldn't decode the response: {e}"))?;
    let (version, kind) =
        (get_str(&review, &["apiVersion"]).unwrap_or_default(), get_str(&review, &["kind"]).unwrap_or_default());
    if version != "apiextensions.k8s.io/v1" || kind != "ConversionReview" {
        return Err(format!(
            "expected webhook response of apiextensions.k8s.io/v1, Kind=ConversionReview, got {version}, Kind={kind}"
        ));
    }
    let response = review.get("response").filter(|r| r.is_object()).ok_or("no response provided")?;
    let got = get_str(response, &["uid"]).unwrap_or_default();
    if got != uid {
        return Err(format!("expected response.uid={uid:?}, got {got:?}"));
    }
    let status = get_str(response, &["result", "status"]).unwrap_or_default();
    if status != "Success" {
        let message = get_str(response, &["result", "message"]).unwrap_or_default();
        return Err(format!("response.result.status was '{status}', not 'Success': {message}"));
    }
    Ok(response["convertedObjects"].as_array().cloned().unwrap_or_default())
}

/// The original's metadata with the converted object's labels and annotations (all the
/// webhook may change), as upstream's `restoreObjectMeta`.
fn restore_metadata(original: &Value, converted: &mut Value) -> Result<(), String> {
    let response = converted.get("metadata").filter(|m| m.is_object()).ok_or("missing metadata in converted object")?;
    let mut metadata = if original.is_object() { original.clone() } else { json!({}) };
    for field in ["labels", "annotations"] {
        match response.get(field) {
            None | Some(Value::Null) => {
                metadata.as_object_mut().expect("an object").remove(field);
            }
            Some(Value::Object(values)) => {
                if let Some((k, _)) = values.iter().find(|(_, v)| !v.is_string()) {
                    return Err(format!("metadata.{field}[{k}] must be a string in converted object"));
                }
                metadata[field] = Value::Object(values.clone());
            }
            Some(other) => return Err(format!("invalid metadata.{field} of type {other} in converted object")),
        }
    }
    converted["metadata"] = metadata;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_checked_and_metadata_restored() {
        let ok = br#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview","response":{"uid":"u","convertedObjects":[{"apiVersion":"g/v2"}],"result":{"status":"Success"}}}"#;
        assert_eq!(verify(ok, "u").unwrap(), vec![json!({"apiVersion": "g/v2"})]);
        assert_eq!(verify(ok, "x").unwrap_err(), "expected response.uid=\"x\", got \"u\"");
        let failed = br#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview","response":{"uid":"u","result":{"status":"Failure","message":"no"}}}"#;
        assert_eq!(verify(failed, "u").unwrap_err(), "response.result.status was 'Failure', not 'Success': no");

        let original = json!({"name": "a", "uid": "1", "labels": {"x": "1"}});
        let mut converted = json!({"metadata": {"name": "changed", "labels": {"x": "2"}, "annotations": {"a": "b"}}});
        restore_metadata(&original, &mut converted).unwrap();
        assert_eq!(
            converted["metadata"],
            json!({"name": "a", "uid": "1", "labels": {"x": "2"}, "annotations": {"a": "b"}})
        );
    }
}

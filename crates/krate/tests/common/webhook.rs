//! A small admission webhook server of the tests' own: HTTPS on 127.0.0.1 with a
//! certificate from a CA made for it (its `ca_bundle` goes in the webhook
//! configuration), answering AdmissionReviews by path:
//!   /allow         allowed
//!   /deny          refused (403, "the object carries the label deny=true") when the
//!                  object (or, on DELETE, the old object) has the label deny=true
//!   /mutate        allowed with a JSON patch adding the label mutated=<n>, n counting
//!                  calls (so a reinvocation shows)
//!   /add-init      allowed with a patch adding an init container of only a name and
//!                  an image (the API server must default the rest)
//!   /warn          allowed with the warning "careful"
//!   /slow          allowed after 5 seconds
//!   /garbage       a body that is not an AdmissionReview
//!   /convert       a ConversionReview answered: example.com/v1's spec.replicas is
//!                  v2's spec.count (and back), the label converted=<desired version>
//!   /convert-fail  a ConversionReview refused (result Failure, "cannot convert")
//! Every review received is kept for the test to inspect.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{json, Value};

use super::https::HttpsServer;

pub struct WebhookServer {
    pub port: u16,
    /// The CA's certificate, base64 of its PEM, as `clientConfig.caBundle` takes it.
    pub ca_bundle: String,
    reviews: Arc<Mutex<Vec<(String, Value)>>>,
}

impl WebhookServer {
    pub fn start() -> Self {
        Self::start_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), &["127.0.0.1"])
    }

    /// Serves on `listener` (one in a pod's network namespace) as `names`.
    pub fn start_on(listener: std::net::TcpListener, names: &[&str]) -> Self {
        let reviews: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let kept = reviews.clone();
        let server = HttpsServer::start_on(
            listener,
            names,
            None,
            Arc::new(move |request| {
                let review: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
                kept.lock().unwrap().push((request.path.clone(), review.clone()));
                (200, "application/json", answer(&request.path, &review, calls.fetch_add(1, Ordering::SeqCst) + 1))
            }),
        );
        Self { port: server.port, ca_bundle: server.ca_bundle, reviews }
    }

    /// The URL of one of the paths above.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// The reviews received on `path` so far.
    pub fn reviews(&self, path: &str) -> Vec<Value> {
        self.reviews.lock().unwrap().iter().filter(|(p, _)| p == path).map(|(_, r)| r.clone()).collect()
    }
}

fn patch(operations: Value) -> Value {
    json!(base64::engine::general_purpose::STANDARD.encode(operations.to_string()))
}

/// A ConversionReview's answer: objects renamed between v1 (`replicas`) and v2 (`count`).
fn convert(review: &Value, fail: bool) -> String {
    let request = &review["request"];
    let desired = request["desiredAPIVersion"].as_str().unwrap_or_default();
    let converted: Vec<Value> = request["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|object| {
            let mut object = object.clone();
            let spec = object["spec"].as_object_mut().cloned().unwrap_or_default();
            let (from, to) = if desired.ends_with("/v2") { ("replicas", "count") } else { ("count", "replicas") };
            let mut spec_out = spec.clone();
            if let Some(v) = spec_out.remove(from) {
                spec_out.insert(to.into(), v);
            }
            object["spec"] = Value::Object(spec_out);
            object["apiVersion"] = json!(desired);
            object["metadata"]["labels"]["converted"] = json!(desired.rsplit('/').next().unwrap_or_default());
            object
        })
        .collect();
    let result =
        if fail { json!({"status": "Failure", "message": "cannot convert"}) } else { json!({"status": "Success"}) };
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
        "response": {"uid": request["uid"], "convertedObjects": converted, "result": result}})
    .to_string()
}

fn answer(path: &str, review: &Value, call: usize) -> String {
    match path {
        "/convert" => return convert(review, false),
        "/convert-fail" => return convert(review, true),
        _ => {}
    }
    let request = &review["request"];
    let mut response = json!({"uid": request["uid"], "allowed": true});
    match path {
        "/deny" => {
            let object = if request["operation"] == "DELETE" { &request["oldObject"] } else { &request["object"] };
            if object.pointer("/metadata/labels/deny") == Some(&json!("true")) {
                response["allowed"] = json!(false);
                response["status"] = json!({"code": 403, "message": "the object carries the label deny=true"});
            }
        }
        "/mutate" => {
            let value = json!(call.to_string());
            response["patchType"] = json!("JSONPatch");
            response["patch"] = patch(match request["object"].pointer("/metadata/labels") {
                Some(_) => json!([{"op": "add", "path": "/metadata/labels/mutated", "value": value}]),
                None => json!([{"op": "add", "path": "/metadata/labels", "value": {"mutated": value}}]),
            });
        }
        "/add-init" => {
            let container = json!({"name": "webhook-added", "image": "busybox"});
            response["patchType"] = json!("JSONPatch");
            response["patch"] = patch(json!([{"op": "add", "path": "/spec/initContainers", "value": [container]}]));
        }
        "/warn" => response["warnings"] = json!(["careful"]),
        "/slow" => std::thread::sleep(std::time::Duration::from_secs(5)),
        "/garbage" => return "this is not a review".to_string(),
        _ => {}
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}).to_string()
}

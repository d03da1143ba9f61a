//! A small extension API server of the tests' own: one group/version,
//! `wardle.example.com/v1alpha1`, with namespaced `flunders` (one, `red-flunder`, in
//! every namespace). It authenticates requests as upstream's generic API server does
//! with request-header authentication: the client must present a certificate signed
//! by the front proxy's CA (`requestheader-client-ca-file` of kube-system's
//! `extension-apiserver-authentication`) whose name is in `requestheader-allowed-names`;
//! the user is the `X-Remote-User` header. Lists answer as a Table when asked, with a
//! column naming the user they were served to, so kubectl's output shows who krate said
//! was asking. Every request is kept for the test.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::https::{HttpsServer, Request};

pub const GROUP_VERSION: &str = "wardle.example.com/v1alpha1";

/// What the server saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub client: Option<String>,
    pub user: Option<String>,
    pub groups: Vec<String>,
}

pub struct ExtensionServer {
    pub port: u16,
    pub ca_bundle: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl ExtensionServer {
    /// Serves as `service.namespace.svc`, trusting the front proxy's CA (`front_proxy_ca`,
    /// PEM) and accepting the client names in `allowed`.
    pub fn start(service: &str, namespace: &str, front_proxy_ca: &str, allowed: Vec<String>) -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let kept = seen.clone();
        let name = format!("{service}.{namespace}.svc");
        let server = HttpsServer::start(
            &[&name],
            Some(front_proxy_ca),
            Arc::new(move |request| {
                let user = request.header_values("x-remote-user").into_iter().next();
                kept.lock().unwrap().push(Seen {
                    path: request.path.clone(),
                    client: request.client.clone(),
                    user: user.clone(),
                    groups: request.header_values("x-remote-group"),
                });
                if !request.client.as_ref().is_some_and(|c| allowed.contains(c)) || user.is_none() {
                    return (401, "application/json", status(401, "Unauthorized", "Unauthorized"));
                }
                answer(request, user.as_deref().unwrap_or_default())
            }),
        );
        Self { port: server.port, ca_bundle: server.ca_bundle, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn status(code: u16, reason: &str, message: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
        .to_string()
}

fn flunder(namespace: &str) -> Value {
    json!({"apiVersion": GROUP_VERSION, "kind": "Flunder",
        "metadata": {"name": "red-flunder", "namespace": namespace, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"reference": "blue"}})
}

/// The Flunder schema, as both OpenAPI versions carry it.
fn flunder_schema() -> Value {
    json!({"description": "A flunder of the tests' own.", "type": "object",
        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
            "spec": {"type": "object", "description": "What the flunder is.",
                "properties": {"reference": {"type": "string", "description": "What the flunder refers to."}}}},
        "x-kubernetes-group-version-kind": [{"group": "wardle.example.com", "kind": "Flunder", "version": "v1alpha1"}]})
}

fn answer(request: &Request, user: &str) -> (u16, &'static str, String) {
    let json = "application/json";
    match request.path.as_str() {
        "/openapi/v2" => {
            let spec = json!({"swagger": "2.0", "info": {"title": "wardle", "version": "v1alpha1"},
                "paths": {format!("/apis/{GROUP_VERSION}/namespaces/{{namespace}}/flunders"): {"get": {"description": "list flunders"}},
                    "/apis/other.example.com/v1/things": {"get": {"description": "not this server's group"}}},
                "definitions": {"com.example.wardle.v1alpha1.Flunder": flunder_schema()}});
            return (200, json, spec.to_string());
        }
        "/openapi/v3/apis/wardle.example.com/v1alpha1" => {
            let gvk = json!({"group": "wardle.example.com", "kind": "Flunder", "version": "v1alpha1"});
            let list = json!({"get": {"description": "list flunders", "x-kubernetes-group-version-kind": gvk}});
            let paths = json!({format!("/apis/{GROUP_VERSION}/namespaces/{{namespace}}/flunders"): list});
            let spec = json!({"openapi": "3.0.0", "info": {"title": "wardle", "version": "v1alpha1"}, "paths": paths,
                "components": {"schemas": {"com.example.wardle.v1alpha1.Flunder": flunder_schema()}}});
            return (200, json, spec.to_string());
        }
        _ => {}
    }
    let prefix = format!("/apis/{GROUP_VERSION}");
    let Some(rest) = request.path.strip_prefix(&prefix) else {
        return (404, "application/json", status(404, "NotFound", "the server could not find the requested resource"));
    };
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    match parts.as_slice() {
        [] => {
            let resources = json!([{"name": "flunders", "singularName": "flunder", "namespaced": true, "kind": "Flunder",
                "verbs": ["get", "list"], "shortNames": ["fl"]}]);
            let list = json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GROUP_VERSION, "resources": resources});
            (200, json, list.to_string())
        }
        ["namespaces", namespace, "flunders"] => {
            let item = flunder(namespace);
            let wants_table = request.header_values("accept").iter().any(|a| a.contains("as=Table"));
            if wants_table {
                let columns = json!([
                    {"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0},
                    {"name": "Requested-By", "type": "string", "format": "", "description": "", "priority": 0},
                ]);
                let table = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "columnDefinitions": columns,
                    "rows": [{"cells": ["red-flunder", user], "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": item["metadata"]}}]});
                return (200, json, table.to_string());
            }
            let list = json!({"apiVersion": GROUP_VERSION, "kind": "FlunderList", "metadata": {}, "items": [item]});
            (200, json, list.to_string())
        }
        ["namespaces", namespace, "flunders", "red-flunder"] => (200, json, flunder(namespace).to_string()),
        ["namespaces", _, "flunders", name] => {
            (404, json, status(404, "NotFound", &format!("flunders.wardle.example.com \"{name}\" not found")))
        }
        _ => (404, json, status(404, "NotFound", "the server could not find the requested resource")),
    }
}

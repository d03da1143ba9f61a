//! Pods' own subresources: `binding` (and the `bindings` resource), `eviction`, `log`,
//! and the connections upgraded through to the node agent (`exec`, `attach`,
//! `portforward`).

use axum::body::Body;
use http::Response;
use k8s_openapi::api::{core::v1 as core, policy::v1 as policy};
use krate_api::error::success_status;
use krate_api::managed;
use krate_api::object::{self, get, get_str};
use krate_api::{ApiError, ApiResult, FieldError};
use serde_json::{json, Value};

use super::{Call, Handler};
use crate::admission::Operation;
use crate::http::{content_type, delete_options, json_response, parse_body, read_body, write_options};
use crate::registry::{Mutation, Scope, Storage, Subresource, WriteOptions, Written};

mod eviction;
pub mod nodeproxy;

/// The streaming subresources of pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Exec,
    Attach,
    PortForward,
}

/// The pods of the call's namespace (the URL may name `bindings`).
fn pods(call: &Call<'_>) -> Scope {
    call.server.storage.builtin::<core::Pod>(call.scope.namespace.clone())
}

/// `POST pods/{name}/binding`, or `POST bindings` naming the pod in the body.
pub struct Binding;

#[async_trait::async_trait]
impl Handler for Binding {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>> {
        let pods = pods(&call);
        let (headers, body) = read_body(call.req).await?;
        let opts = write_options(call.attrs, call.query, &headers, false)?;
        let binding = parse_body(&content_type(&headers), &body)?;
        let name = if call.name.is_empty() { object::name(&binding) } else { call.name };
        let written = call.server.storage.bind(&pods, name, &binding, &opts).await?;
        Ok(json_response(written.code, &written.body))
    }
}

/// `POST pods/{name}/eviction`: a deletion that respects disruption budgets.
pub struct Eviction;

#[async_trait::async_trait]
impl Handler for Eviction {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>> {
        let budgets = call.server.storage.builtin::<policy::PodDisruptionBudget>(call.scope.namespace.clone());
        let (headers, body) = read_body(call.req).await?;
        let eviction = parse_body(&content_type(&headers), &body)?;
        let delete_body = serde_json::to_vec(eviction.get("deleteOptions").unwrap_or(&Value::Null)).unwrap_or_default();
        let delete = delete_options(call.query, &http::HeaderMap::new(), &delete_body)?;
        let written = call.server.storage.evict(&call.scope, &budgets, call.name, &delete).await?;
        Ok(json_response(written.code, &written.body))
    }
}

/// `GET pods/{name}/log`.
pub struct Log;

#[async_trait::async_trait]
impl Handler for Log {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>> {
        nodeproxy::pod_log(call.server, &call.scope, call.name, call.query, call.req).await
    }
}

/// `GET|POST pods/{name}/exec|attach|portforward`.
pub struct Connect(pub Action);

#[async_trait::async_trait]
impl Handler for Connect {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>> {
        let options = connect_options(self.0, call.req.uri().query().unwrap_or_default());
        call.server.storage.admit_connect(&call.scope.kind, call.attrs, options).await?;
        nodeproxy::connect(call.server, &call.scope, call.name, self.0, call.query, call.req).await
    }
}

/// The options object a connect request carries in its query (`PodExecOptions`,
/// `PodAttachOptions`, `PodPortForwardOptions`), as admission sees it.
fn connect_options(action: Action, query: &str) -> Value {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let flag = |key: &str| pairs.iter().any(|(k, v)| k == key && matches!(v.as_str(), "1" | "true" | "True"));
    let all = |key: &str| -> Vec<String> { pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect() };
    let container = pairs.iter().find(|(k, _)| k == "container").map(|(_, v)| v.clone()).unwrap_or_default();
    let streams = |kind: &str| {
        let mut options = json!({"kind": kind, "apiVersion": "v1", "stdin": flag("stdin"), "stdout": flag("stdout"),
            "stderr": flag("stderr"), "tty": flag("tty")});
        if !container.is_empty() {
            options["container"] = json!(container);
        }
        options
    };
    match action {
        Action::Attach => streams("PodAttachOptions"),
        Action::Exec => {
            let mut options = streams("PodExecOptions");
            options["command"] = json!(all("command"));
            options
        }
        Action::PortForward => {
            let ports: Vec<Value> =
                all("ports").iter().filter_map(|p| p.parse::<u16>().ok()).map(|p| json!(p)).collect();
            json!({"kind": "PodPortForwardOptions", "apiVersion": "v1", "ports": ports})
        }
    }
}

fn conflict(name: &str, why: &str) -> ApiError {
    ApiError::conflict(core::Pod::GROUP, core::Pod::URL_PATH_SEGMENT, name, why)
}

use k8s_openapi::Resource as _;

impl Storage {
    /// Sets a pod's spec.nodeName once and marks it PodScheduled, as the scheduler's bind
    /// step does upstream.
    pub async fn bind(&self, pods: &Scope, name: &str, binding: &Value, opts: &WriteOptions) -> ApiResult<Written> {
        let kind = pods.kind.clone();
        let node = get_str(binding, &["target", "name"]).unwrap_or_default().to_string();
        if node.is_empty() {
            return Err(ApiError::invalid("", "Binding", name, &[FieldError::required("target.name", "")]));
        }
        let (obj, _) = self
            .guaranteed_update(pods, name, Operation::Update, opts, |current| {
                if get(current, &["metadata", "deletionTimestamp"]).is_some() {
                    return Err(conflict(name, &format!("pod {name} is being deleted, cannot be assigned to a host")));
                }
                if let Some(uid) = get_str(binding, &["metadata", "uid"]).filter(|u| !u.is_empty()) {
                    if object::uid(current) != uid {
                        return Err(conflict(name, "the UID in the binding does not match the pod"));
                    }
                }
                if let Some(assigned) = get_str(current, &["spec", "nodeName"]).filter(|n| !n.is_empty()) {
                    return Err(conflict(name, &format!("pod {name} is already assigned to node \"{assigned}\"")));
                }
                let mut new = current.clone();
                object::set(&mut new, &["spec", "nodeName"], json!(node));
                let mut conditions: Vec<Value> =
                    get(current, &["status", "conditions"]).and_then(Value::as_array).cloned().unwrap_or_default();
                conditions.retain(|c| c["type"] != "PodScheduled");
                conditions.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": object::now_rfc3339()}));
                object::set(&mut new, &["status", "conditions"], json!(conditions));
                let api_version = kind.api_version();
                let manager = crate::registry::manager(&kind, opts, &api_version, Subresource::Main);
                managed::track_update(kind.schema.as_deref(), Some(current), &mut new, &manager);
                Ok((Mutation::Write(new), false))
            })
            .await?;
        Ok(Written {
            code: 201,
            body: success_status(&kind.group, &kind.plural, name, object::uid(&obj)),
            warnings: vec![],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_queries_become_the_options_admission_sees() {
        let exec = connect_options(Action::Exec, "command=sh&command=-c&command=echo%20hi&stdout=true&container=c");
        assert_eq!(
            exec,
            json!({"kind": "PodExecOptions", "apiVersion": "v1", "stdin": false, "stdout": true, "stderr": false,
                "tty": false, "container": "c", "command": ["sh", "-c", "echo hi"]})
        );
        let attach = connect_options(Action::Attach, "stdin=1&tty=1");
        assert_eq!(attach["kind"], "PodAttachOptions");
        assert_eq!((attach["stdin"].clone(), attach["tty"].clone()), (json!(true), json!(true)));
        let forward = connect_options(Action::PortForward, "ports=80&ports=8080");
        assert_eq!(forward, json!({"kind": "PodPortForwardOptions", "apiVersion": "v1", "ports": [80, 8080]}));
    }
}

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
        nodeproxy::pod_log(call.server, &call.scope, call.name, call.query).await
    }
}

/// `GET|POST pods/{name}/exec|attach|portforward`.
pub struct Connect(pub Action);

#[async_trait::async_trait]
impl Handler for Connect {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>> {
        nodeproxy::connect(call.server, &call.scope, call.name, self.0, call.query, call.req).await
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

//! The `Available` condition of remote APIServices, worked out as upstream's
//! AvailableConditionController does: the Service must exist; a ClusterIP Service must
//! declare the APIService's port and have a ready endpoint for it; then the extension
//! server must answer its discovery document (`/apis/{group}/{version}`) with a 2xx
//! within five seconds. The document it answers is what discovery lists for that
//! group/version. The status is written only when the condition changes.

use std::time::Duration;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use serde_json::{json, Value};

use super::{proxy, Remote};
use crate::registry::{Subresource, WriteOptions};
use crate::ApiServer;

const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// An Available condition: status, reason, message.
type Condition = (&'static str, &'static str, String);

/// Checks every remote APIService (concurrently) and records what each showed.
pub async fn check_all(server: &ApiServer) {
    let remote = server.aggregator.remote_api_services(&server.storage);
    let names: Vec<String> =
        remote.iter().map(|s| s["metadata"]["name"].as_str().unwrap_or_default().to_string()).collect();
    let checks = remote.iter().map(|api_service| async move {
        let name = api_service["metadata"]["name"].as_str().unwrap_or_default();
        let (condition, found) = check(server, api_service).await;
        server.aggregator.set_remote(name, found);
        if let Err(e) = write_condition(server, api_service, condition).await {
            tracing::warn!(apiservice = %name, error = %e, "writing an APIService's status failed");
        }
    });
    futures::future::join_all(checks).await;
    server.aggregator.retain(&names);
}

/// The condition of one remote APIService, and its group/version's resources when its
/// server answered.
async fn check(server: &ApiServer, api_service: &Value) -> (Condition, Option<Remote>) {
    let spec = &api_service["spec"];
    let service = &spec["service"];
    let (namespace, name) =
        (service["namespace"].as_str().unwrap_or_default(), service["name"].as_str().unwrap_or_default());
    let port = service["port"].as_i64().unwrap_or(443);
    let services = server.storage.builtin::<core::Service>(Some(namespace.to_string()));
    let Ok(found) = server.storage.cached(&services, name) else {
        return (("False", "ServiceNotFound", format!("service/{name} in {namespace:?} is not present")), None);
    };
    let found = found.parse();
    let kind = found["spec"]["type"].as_str().unwrap_or("ClusterIP");
    if kind == "ClusterIP" {
        let ports = found["spec"]["ports"].as_array().into_iter().flatten();
        let Some(declared) = ports.into_iter().find(|p| p["port"].as_i64() == Some(port)) else {
            let message = format!("service/{name} in {namespace:?} is not listening on port {port}");
            return (("False", "ServicePortError", message), None);
        };
        let port_name = declared["name"].as_str().unwrap_or_default();
        let endpoints = server.storage.builtin::<core::Endpoints>(Some(namespace.to_string()));
        let Ok(endpoints) = server.storage.cached(&endpoints, name) else {
            let message = format!("cannot find endpointslices for service/{name} in {namespace:?}");
            return (("False", "EndpointsNotFound", message), None);
        };
        if !has_ready_endpoint(&endpoints.parse(), port_name) {
            let message = format!(
                "endpointslices for service/{name} in {namespace:?} have no addresses with port name {port_name:?}"
            );
            return (("False", "MissingEndpoints", message), None);
        }
    }
    let (group, version) = (spec["group"].as_str().unwrap_or_default(), spec["version"].as_str().unwrap_or_default());
    let path = format!("/apis/{group}/{version}");
    let failed = |url: &str, e: &str| {
        (("False", "FailedDiscoveryCheck", format!("failing or missing response from {url}: {e}")), None)
    };
    let backend = match proxy::backend(server, api_service) {
        Ok(backend) => backend,
        Err(e) => return failed(&format!("https://{name}.{namespace}.svc:{port}{path}"), &e),
    };
    let url = backend.url(&path);
    let body = match proxy::get(&backend, &path, DISCOVERY_TIMEOUT).await {
        Ok((status, body)) if status.is_success() => body,
        Ok((status, _)) => return failed(&url, &format!("bad status from {url}: {}", status.as_u16())),
        Err(e) => return failed(&url, &e),
    };
    let api_service_name = api_service["metadata"]["name"].as_str().unwrap_or_default();
    if server.aggregator.openapi_due(api_service_name) {
        fetch_openapi(server, api_service_name, &backend).await;
    }
    let resources = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|list| list["resources"].as_array().cloned())
        .unwrap_or_default();
    let remote = Remote {
        group: group.to_string(),
        version: version.to_string(),
        group_priority: spec["groupPriorityMinimum"].as_i64().unwrap_or(0),
        version_priority: spec["versionPriority"].as_i64().unwrap_or(0),
        resources,
    };
    (("True", "Passed", "all checks passed".to_string()), Some(remote))
}

/// Fetches the remote server's OpenAPI v2 document; a server without one (or with one
/// that does not parse) just adds nothing to krate's.
async fn fetch_openapi(server: &ApiServer, name: &str, backend: &proxy::Backend) {
    match proxy::get(backend, "/openapi/v2", DISCOVERY_TIMEOUT).await {
        Ok((status, body)) if status.is_success() => match serde_json::from_slice::<Value>(&body) {
            Ok(spec) => server.aggregator.set_openapi(name, spec),
            Err(e) => {
                tracing::debug!(apiservice = %name, error = %e, "an extension server's OpenAPI document does not parse")
            }
        },
        Ok((status, _)) => {
            tracing::debug!(apiservice = %name, %status, "an extension server has no OpenAPI v2 document")
        }
        Err(e) => {
            tracing::debug!(apiservice = %name, error = %e, "fetching an extension server's OpenAPI document failed")
        }
    }
}

/// Whether some subset has a ready address and a port named `port_name`.
fn has_ready_endpoint(endpoints: &Value, port_name: &str) -> bool {
    let subsets = endpoints["subsets"].as_array().into_iter().flatten();
    subsets.into_iter().any(|s| {
        let ready = s["addresses"].as_array().is_some_and(|a| !a.is_empty());
        let ports = s["ports"].as_array().into_iter().flatten();
        ready && ports.into_iter().any(|p| p["name"].as_str().unwrap_or_default() == port_name)
    })
}

/// Writes the condition when its status, reason or message changed (the transition
/// time moves only with the status).
async fn write_condition(
    server: &ApiServer,
    api_service: &Value,
    (status, reason, message): Condition,
) -> krate_api::ApiResult<()> {
    let conditions = api_service["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let current = conditions.iter().find(|c| c["type"] == "Available");
    if current.is_some_and(|c| c["status"] == status && c["reason"] == reason && c["message"] == message.as_str()) {
        return Ok(());
    }
    let since = match current {
        Some(c) if c["status"] == status => c["lastTransitionTime"].clone(),
        _ => json!(krate_api::object::now_rfc3339()),
    };
    let condition = json!({"type": "Available", "status": status, "lastTransitionTime": since, "reason": reason, "message": message});
    let mut updated = api_service.clone();
    let mut conditions: Vec<Value> = conditions.into_iter().filter(|c| c["type"] != "Available").collect();
    conditions.push(condition);
    updated["status"]["conditions"] = json!(conditions);
    let name = api_service["metadata"]["name"].as_str().unwrap_or_default();
    if status != "True" {
        tracing::info!(apiservice = %name, reason, message = %message, "APIService not available");
    }
    let scope = server.storage.builtin::<APIService>(None);
    let opts = WriteOptions { field_manager: "kube-apiserver".into(), ..Default::default() };
    match server.storage.update(&scope, name, Subresource::Status, updated, &opts).await {
        // Changed meanwhile (or gone): the next check sees the new object.
        Err(e) if e.code == 409 || e.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_counts_when_ready_with_the_port() {
        let endpoints = json!({"subsets": [
            {"notReadyAddresses": [{"ip": "10.0.0.1"}], "ports": [{"name": "https", "port": 443}]},
            {"addresses": [{"ip": "10.0.0.2"}], "ports": [{"name": "metrics", "port": 9090}]},
        ]});
        assert!(!has_ready_endpoint(&endpoints, "https"));
        assert!(has_ready_endpoint(&endpoints, "metrics"));
        assert!(!has_ready_endpoint(&json!({}), ""));
    }
}

//! Controllers: API clients (kube-rs watchers and reconcilers) that work against any
//! Kubernetes API server. `krate server` runs them in-process.

pub mod deployment;
pub mod namespace;
pub mod replicas;
pub mod selector;

use kube::api::ApiResource;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("building an object: {0}")]
    Encode(#[from] serde_json::Error),
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    let api_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    ApiResource { group: group.into(), version: version.into(), api_version, kind: kind.into(), plural: plural.into() }
}

/// Runs every controller until one fails irrecoverably.
pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    tokio::try_join!(
        namespace::run(client.clone()),
        deployment::run(client.clone()),
        replicas::run(client.clone(), resource("apps", "v1", "ReplicaSet", "replicasets")),
        replicas::run(client.clone(), resource("", "v1", "ReplicationController", "replicationcontrollers")),
    )?;
    Ok(())
}

//! Controllers: API clients (kube-rs watchers and reconcilers) that work against any
//! Kubernetes API server. `krate server` runs them in-process.

pub mod namespace;

/// Runs every controller until one fails irrecoverably.
pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    namespace::run(client).await
}

//! Helpers shared by krate's API clients: the scheduler, the controllers and the nodes.

pub mod bootstrap;
pub mod caches;
pub mod csr;
pub mod events;
pub mod expectations;
pub mod informer;
pub mod node_lease;
pub mod process;
pub mod selectors;
pub mod tls;

/// The current time as the API writes timestamps (RFC 3339, whole seconds).
pub fn now() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default()
}

/// Runs `work` forever, starting it again a second after it stops or fails, so that one
/// failing component (watches ended, discovery not ready) does not stop the others.
pub async fn supervised<F, Fut>(what: &str, work: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    loop {
        match work().await {
            Ok(()) => tracing::warn!(component = what, "stopped; starting again"),
            Err(e) => tracing::warn!(component = what, error = %format!("{e:#}"), "failed; starting again"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// `result`, with the API errors of the given HTTP codes counted as success (a 404 on
/// delete, a 409 on create: someone else already did it).
pub fn tolerate<T>(result: Result<T, kube::Error>, codes: &[u16]) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if codes.contains(&e.code) => Ok(()),
        Err(e) => Err(e),
    }
}

//! Helpers shared by krate's API clients: the scheduler, the controllers and the nodes.

pub mod events;

/// `result`, with the API errors of the given HTTP codes counted as success (a 404 on
/// delete, a 409 on create: someone else already did it).
pub fn tolerate<T>(result: Result<T, kube::Error>, codes: &[u16]) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if codes.contains(&e.code) => Ok(()),
        Err(e) => Err(e),
    }
}

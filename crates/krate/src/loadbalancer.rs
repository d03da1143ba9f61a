//! The joined agent's client-side load balancer over the API servers (as k3s's agent
//! has): a TCP proxy on loopback that every client of the agent talks to, passing each
//! connection to the first API server that accepts it, starting with the one that last
//! did. The list of servers follows the `kubernetes` Service's endpoints (the live API
//! servers, each renewing its identity Lease) and is kept in the agent's directory, so a
//! restarted agent reaches the cluster even when the server it joined through is gone.
//!
//! TLS passes through untouched: the servers' certificates name 127.0.0.1, which is
//! where the agent's kubeconfigs point.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

/// How long a server may take to accept a connection before the next one is tried (a
/// dead server's machine refuses at once; a busy or unreachable one takes this long).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Rounds over every server before a client's connection is given up.
const ROUNDS: usize = 3;
/// How often the list of servers is refreshed from the `kubernetes` endpoints.
const REFRESH: Duration = Duration::from_secs(10);
const SERVERS_FILE: &str = "api-servers.json";

pub struct LoadBalancer {
    servers: RwLock<Vec<String>>,
    /// The server the agent joined through: always kept (the endpoints name advertise
    /// addresses, which may not be how this machine reaches a server).
    origin: String,
    /// Index of the server the last connection went to.
    preferred: AtomicUsize,
    local: SocketAddr,
    file: PathBuf,
}

impl LoadBalancer {
    /// Listens on 127.0.0.1:`port` and balances over `server` (host:port) and the servers
    /// remembered in `dir`.
    pub async fn start(port: u16, server: &str, dir: &Path) -> Result<Arc<Self>> {
        let file = dir.join(SERVERS_FILE);
        let mut servers: Vec<String> =
            std::fs::read(&file).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default();
        if !servers.iter().any(|s| s == server) {
            servers.insert(0, server.to_string());
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.with_context(|| {
            format!("the API server load balancer cannot listen on 127.0.0.1:{port}; pick another --lb-server-port")
        })?;
        let lb = Arc::new(Self {
            servers: RwLock::new(servers),
            origin: server.to_string(),
            preferred: AtomicUsize::new(0),
            local: listener.local_addr()?,
            file,
        });
        let accepting = lb.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((inbound, _)) => {
                        tokio::spawn(accepting.clone().pass(inbound));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the API server load balancer could not accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(lb)
    }

    /// The URL the agent's clients use.
    pub fn url(&self) -> String {
        format!("https://{}", self.local)
    }

    pub fn servers(&self) -> Vec<String> {
        self.servers.read().expect("servers lock").clone()
    }

    async fn pass(self: Arc<Self>, mut inbound: tokio::net::TcpStream) {
        let servers = self.servers();
        let first = self.preferred.load(Ordering::Relaxed);
        for k in 0..servers.len() * ROUNDS {
            let index = (first + k) % servers.len();
            let server = &servers[index];
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(server.as_str())).await {
                Ok(Ok(mut outbound)) => {
                    if index != first {
                        self.preferred.store(index, Ordering::Relaxed);
                        tracing::info!(%server, "API server load balancer: switched server");
                    }
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
                Ok(Err(e)) => tracing::debug!(%server, error = %e, "API server refused the connection"),
                Err(_) => tracing::debug!(%server, "API server did not accept in time"),
            }
            if (k + 1) % servers.len() == 0 {
                // A round without an answer: a server may be starting or swamped.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        tracing::warn!(servers = ?servers, "no API server accepts connections");
    }

    /// Replaces the list (kept in the agent's directory); the preferred server stays
    /// preferred while it is listed.
    fn set_servers(&self, mut servers: Vec<String>) {
        servers.push(self.origin.clone());
        servers.sort();
        servers.dedup();
        let mut current = self.servers.write().expect("servers lock");
        if *current == servers {
            return;
        }
        let preferred = current.get(self.preferred.load(Ordering::Relaxed)).cloned();
        let index = preferred.and_then(|p| servers.iter().position(|s| *s == p)).unwrap_or(0);
        tracing::info!(servers = ?servers, "API server load balancer: servers changed");
        *current = servers;
        self.preferred.store(index, Ordering::Relaxed);
        if let Ok(bytes) = serde_json::to_vec(&*current) {
            let _ = std::fs::write(&self.file, bytes);
        }
    }

    /// Follows the `kubernetes` Service's endpoints with `client` (one that may read
    /// EndpointSlices in `default`).
    pub async fn follow(self: Arc<Self>, client: kube::Client) {
        let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
        let params = ListParams::default().labels("kubernetes.io/service-name=kubernetes");
        loop {
            match slices.list(&params).await {
                Ok(list) => {
                    let mut servers = Vec::new();
                    for slice in list.items {
                        let ports = slice.ports.unwrap_or_default();
                        let Some(port) = ports.iter().find_map(|p| p.port) else { continue };
                        for endpoint in slice.endpoints.into_iter().flatten() {
                            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                                continue;
                            }
                            for address in endpoint.addresses {
                                servers
                                    .push(SocketAddr::new(address.parse().unwrap_or([0, 0, 0, 0].into()), port as u16));
                            }
                        }
                    }
                    self.set_servers(
                        servers.iter().filter(|s| !s.ip().is_unspecified()).map(|s| s.to_string()).collect(),
                    );
                }
                Err(e) => tracing::debug!(error = %e, "reading the kubernetes endpoints failed"),
            }
            tokio::time::sleep(REFRESH).await;
        }
    }
}

/// Points the kubeconfig at `path` to `url` (the load balancer), keeping everything else.
pub fn point_kubeconfig(path: &Path, url: &str) -> Result<()> {
    let mut kubeconfig =
        kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    for cluster in &mut kubeconfig.clusters {
        if let Some(cluster) = cluster.cluster.as_mut() {
            cluster.server = Some(url.to_string());
        }
    }
    crate::pki::write_private(path, &serde_yaml::to_string(&kubeconfig)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_to_the_first_server_that_accepts_and_stay_there() {
        let dir = tempfile::tempdir().unwrap();
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let lb = LoadBalancer::start(0, &dead.to_string(), dir.path()).await.unwrap();
        lb.set_servers(vec![dead.to_string(), live.local_addr().unwrap().to_string()]);
        let connect = || tokio::net::TcpStream::connect(lb.local);
        let _client = connect().await.unwrap();
        let (_accepted, _) = tokio::time::timeout(Duration::from_secs(5), live.accept()).await.unwrap().unwrap();
        // The balancer notes its choice just after connecting: give it a moment.
        let live_name = live.local_addr().unwrap().to_string();
        let preferred = || lb.servers()[lb.preferred.load(Ordering::Relaxed)].clone();
        for _ in 0..100 {
            if preferred() == live_name {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(preferred(), live_name, "the live server is preferred now");
        // The list is remembered for the next start.
        let again = LoadBalancer::start(0, &dead.to_string(), dir.path()).await.unwrap();
        assert_eq!(again.servers().len(), 2);
        // The server joined through stays listed whatever the endpoints say.
        again.set_servers(vec![live.local_addr().unwrap().to_string()]);
        assert!(again.servers().contains(&dead.to_string()));
    }
}

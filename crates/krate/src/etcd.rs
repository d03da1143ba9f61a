//! The etcd member a control-plane server runs for itself (`krate server
//! --cluster-init`): its configuration from the data directory and the cluster CA, and a
//! supervisor that restarts it when it exits. The member process dies with the server
//! (parent-death signal), so a crashed server never leaves an etcd behind.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use krate_store::etcd::process::{EtcdProcess, MemberConfig, MemberTls};
use krate_store::etcd::EtcdConfig;
use tokio::sync::Mutex;

/// How long a member may take to answer after it starts (a restarted member replays its
/// write-ahead log first).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// URL of `ip:port` (IPv6 in brackets).
fn url(ip: IpAddr, port: u16) -> String {
    format!("https://{}", std::net::SocketAddr::new(ip, port))
}

/// This machine's member: named after its advertise address, serving clients on
/// loopback and that address, peers on that address, with a fresh certificate from the
/// cluster CA.
pub fn member_config(
    dir: &Path,
    pki: &crate::pki::Pki,
    advertise: IpAddr,
    client_port: u16,
    peer_port: u16,
) -> Result<MemberConfig> {
    let name = format!("krate-{}", advertise.to_string().replace(['.', ':'], "-"));
    let loopback = IpAddr::from([127, 0, 0, 1]);
    let sans = vec!["localhost".to_string(), loopback.to_string(), advertise.to_string()];
    let (cert, key) = pki.etcd_member(&name, &sans)?;
    let mut listen = vec![url(loopback, client_port)];
    if advertise != loopback {
        listen.push(url(advertise, client_port));
    }
    let peer_url = url(advertise, peer_port);
    Ok(MemberConfig {
        initial_cluster: format!("{name}={peer_url}"),
        name,
        data_dir: dir.to_path_buf(),
        client_url: url(loopback, client_port),
        listen_client_urls: listen,
        peer_url,
        existing: false,
        tls: Some(MemberTls { cert, key, ca: pki.ca_file() }),
    })
}

/// A member kept running: restarted (after a pause) whenever it exits.
pub struct Supervised {
    process: Arc<Mutex<EtcdProcess>>,
}

impl Supervised {
    pub async fn start(config: MemberConfig) -> Result<Self> {
        let process = Arc::new(Mutex::new(EtcdProcess::start(config, START_TIMEOUT).await?));
        let watched = process.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut member = watched.lock().await;
                let Some(status) = member.exited() else { continue };
                tracing::error!(%status, "the etcd member exited; starting it again");
                let config = member.config.clone();
                match EtcdProcess::start(config, START_TIMEOUT).await {
                    Ok(again) => *member = again,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "restarting the etcd member failed; retrying");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        });
        Ok(Self { process })
    }

    /// How the API server reaches the member.
    pub async fn client_config(&self) -> Result<EtcdConfig> {
        self.process.lock().await.client_config()
    }
}

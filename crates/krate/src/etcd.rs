//! The etcd member a control-plane server runs for itself (`krate server
//! --cluster-init`): its configuration from the data directory and the cluster CA, and a
//! supervisor that restarts it when it exits. The member process dies with the server
//! (parent-death signal), so a crashed server never leaves an etcd behind.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use krate_store::etcd::process::{EtcdProcess, MemberConfig, MemberTls};
use krate_store::etcd::EtcdConfig;
use tokio::sync::Mutex;

/// Where a server's datastore record is kept, under its data directory.
const RECORD: &str = "db/datastore.json";

/// Which etcd a server's data directory uses, recorded at start so that `krate doctor`
/// and `krate backup` reach the same store without the server's flags. No record: the
/// embedded SQLite database.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Datastore {
    pub endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Whether the server runs the member itself (--cluster-init).
    #[serde(default)]
    pub managed: bool,
}

impl Datastore {
    pub fn load(data_dir: &Path) -> Result<Option<Self>> {
        let path = data_dir.join(RECORD);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let path = data_dir.join(RECORD);
        std::fs::create_dir_all(path.parent().expect("the record is in a directory"))?;
        std::fs::write(&path, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", path.display()))
    }

    /// Removes the record: the data directory is back on SQLite.
    pub fn forget(data_dir: &Path) -> Result<()> {
        match std::fs::remove_file(data_dir.join(RECORD)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The client configuration, with the TLS files read.
    pub fn config(&self) -> Result<EtcdConfig> {
        let read = |path: &Option<PathBuf>| {
            path.as_ref().map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display()))).transpose()
        };
        Ok(EtcdConfig {
            endpoints: self.endpoints.clone(),
            ca_pem: read(&self.ca_file)?,
            client_cert_pem: read(&self.cert_file)?.zip(read(&self.key_file)?),
        })
    }

    pub async fn connect(&self) -> Result<krate_store::etcd::EtcdStore> {
        let endpoints = self.endpoints.join(",");
        krate_store::etcd::EtcdStore::connect(&self.config()?).await.with_context(|| {
            format!("cannot reach etcd at {endpoints} (is it running? check --datastore-endpoint and its TLS files)")
        })
    }
}

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
    pub async fn datastore(&self) -> Datastore {
        let member = &self.process.lock().await.config;
        let tls = member.tls.as_ref();
        Datastore {
            endpoints: vec![member.client_url.clone()],
            ca_file: tls.map(|t| t.ca.clone()),
            cert_file: tls.map(|t| t.cert.clone()),
            key_file: tls.map(|t| t.key.clone()),
            managed: true,
        }
    }
}

//! One etcd member run as a child process: what `krate server --cluster-init` supervises
//! and what the tests start. The binary is `etcd` from `$PATH` (Debian's `etcd-server`)
//! unless `KRATE_ETCD` names another.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{EtcdConfig, EtcdStore};
use crate::Store;

/// How to run one member.
#[derive(Clone, Debug)]
pub struct MemberConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// Where clients connect (`http://127.0.0.1:2379`).
    pub client_url: String,
    /// Where the other members connect.
    pub peer_url: String,
    /// `name=peer_url,...` of every member, this one included.
    pub initial_cluster: String,
    /// Joining a running cluster (`existing`) rather than forming a new one (`new`).
    pub existing: bool,
}

impl MemberConfig {
    /// A single-member cluster on two local ports.
    pub fn single(name: &str, data_dir: &Path, client_port: u16, peer_port: u16) -> Self {
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        Self {
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            client_url: format!("http://127.0.0.1:{client_port}"),
            initial_cluster: format!("{name}={peer_url}"),
            peer_url,
            existing: false,
        }
    }
}

/// A running member; killed when dropped.
pub struct EtcdProcess {
    child: Child,
    pub config: MemberConfig,
}

/// The etcd binary to run.
pub fn binary() -> PathBuf {
    std::env::var_os("KRATE_ETCD").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("etcd"))
}

impl EtcdProcess {
    /// Starts the member and waits until it answers reads (at most `timeout`).
    pub async fn start(config: MemberConfig, timeout: Duration) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let log = std::fs::File::create(config.data_dir.with_extension("log"))
            .with_context(|| format!("creating the etcd log next to {}", config.data_dir.display()))?;
        let mut command = Command::new(binary());
        command
            .arg("--name")
            .arg(&config.name)
            .arg("--data-dir")
            .arg(&config.data_dir)
            .arg("--listen-client-urls")
            .arg(&config.client_url)
            .arg("--advertise-client-urls")
            .arg(&config.client_url)
            .arg("--listen-peer-urls")
            .arg(&config.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&config.peer_url)
            .arg("--initial-cluster")
            .arg(&config.initial_cluster)
            .arg("--initial-cluster-state")
            .arg(if config.existing { "existing" } else { "new" })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = command.spawn().with_context(|| {
            format!("starting {} (install Debian's etcd-server, or set KRATE_ETCD)", binary().display())
        })?;
        let mut process = Self { child, config };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = process.child.try_wait() {
                let log_path = process.config.data_dir.with_extension("log");
                let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                anyhow::bail!("etcd exited ({status}); its log ends: {}", tail.join(" | "));
            }
            let config = EtcdConfig { endpoints: vec![process.config.client_url.clone()], ..Default::default() };
            if let Ok(store) = EtcdStore::connect(&config).await {
                if store.current_revision().await.is_ok() {
                    return Ok(process);
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("etcd did not answer at {} within {timeout:?}", process.config.client_url);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the member (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

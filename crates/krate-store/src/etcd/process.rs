//! One etcd member run as a child process: what `krate server --cluster-init` supervises
//! and what the tests start. The binary is `etcd` from `$PATH` (Debian's `etcd-server`)
//! unless `KRATE_ETCD` names another.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::EtcdConfig;

/// How to run one member.
#[derive(Clone, Debug)]
pub struct MemberConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// Where clients connect (`http://127.0.0.1:2379`): advertised to clients.
    pub client_url: String,
    /// Where the member listens for clients, if not only at `client_url` (loopback and
    /// the advertised address, say).
    pub listen_client_urls: Vec<String>,
    /// Where the other members connect.
    pub peer_url: String,
    /// `name=peer_url,...` of every member, this one included.
    pub initial_cluster: String,
    /// Joining a running cluster (`existing`) rather than forming a new one (`new`).
    pub existing: bool,
    /// Client and peer TLS (required client certificates on both); plain HTTP if None.
    pub tls: Option<MemberTls>,
}

/// The files of a member's TLS: one certificate serves clients and peers alike (it has
/// both the server and the client key usage), and every connection must present a
/// certificate from `ca`.
#[derive(Clone, Debug)]
pub struct MemberTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl MemberConfig {
    /// A single-member cluster on two local ports.
    pub fn single(name: &str, data_dir: &Path, client_port: u16, peer_port: u16) -> Self {
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        Self {
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            client_url: format!("http://127.0.0.1:{client_port}"),
            listen_client_urls: Vec::new(),
            initial_cluster: format!("{name}={peer_url}"),
            peer_url,
            existing: false,
            tls: None,
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
    /// Starts the member and waits until it answers (at most `timeout`).
    pub async fn start(config: MemberConfig, timeout: Duration) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.data_dir.with_extension("log"))
            .with_context(|| format!("creating the etcd log next to {}", config.data_dir.display()))?;
        let mut command = Command::new(binary());
        command
            .arg("--name")
            .arg(&config.name)
            .arg("--data-dir")
            .arg(&config.data_dir)
            .arg("--listen-client-urls")
            .arg(if config.listen_client_urls.is_empty() {
                config.client_url.clone()
            } else {
                config.listen_client_urls.join(",")
            })
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
            // The member's own housekeeping, as upstream's kubeadm sets it.
            .args(["--snapshot-count", "10000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(tls) = &config.tls {
            for (flag, path) in [
                ("--cert-file", &tls.cert),
                ("--key-file", &tls.key),
                ("--trusted-ca-file", &tls.ca),
                ("--peer-cert-file", &tls.cert),
                ("--peer-key-file", &tls.key),
                ("--peer-trusted-ca-file", &tls.ca),
            ] {
                command.arg(flag).arg(path);
            }
            command.args(["--client-cert-auth", "--peer-client-cert-auth"]);
        }
        // The member dies with its supervisor (a killed krate server must not leave an
        // etcd behind holding its ports and data directory).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
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
            // Status, not a read: a learner answers it while it refuses reads.
            if let Ok(mut client) = super::connect_client(&process.client_config()?).await {
                if client.status().await.is_ok() {
                    return Ok(process);
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("etcd did not answer at {} within {timeout:?}", process.config.client_url);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How a client reaches this member (with the member's own certificate, which is
    /// also a client certificate of the cluster's CA).
    pub fn client_config(&self) -> anyhow::Result<EtcdConfig> {
        let mut config = EtcdConfig { endpoints: vec![self.config.client_url.clone()], ..Default::default() };
        if let Some(tls) = &self.config.tls {
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            config.ca_pem = Some(read(&tls.ca)?);
            config.client_cert_pem = Some((read(&tls.cert)?, read(&tls.key)?));
        }
        Ok(config)
    }

    /// The member's exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
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

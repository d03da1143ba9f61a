//! What the benchmarks share: a `krate server` on a free loopback port with its own data
//! directory and a kube-rs client for it, killed on drop; and the tests' registry of
//! krate's test images.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

#[path = "../../tests/common/registry.rs"]
pub mod registry;

#[path = "../../tests/common/goclient.rs"]
pub mod goclient;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct BenchServer {
    child: Option<Killed>,
    pub data: PathBuf,
    pub kubeconfig: PathBuf,
    pub client: kube::Client,
    _dir: tempfile::TempDir,
}

impl BenchServer {
    /// Starts `krate server` with `args` after its data directory and port; its log goes
    /// to `KRATE_BENCH_SERVER_LOG` when that is set.
    pub async fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let data = dir.path().join("data");
        let child = Command::new(env!("CARGO_BIN_EXE_krate"))
            .args(["server", "--data-dir", data.to_str().unwrap(), "--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(match std::env::var_os("KRATE_BENCH_SERVER_LOG") {
                Some(path) => Stdio::from(std::fs::File::create(path).expect("server log file")),
                None => Stdio::null(),
            })
            .spawn()
            .expect("start krate server");
        let kubeconfig = data.join("admin.kubeconfig");
        while !(kubeconfig.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&kubeconfig).unwrap(),
            &KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        BenchServer { child: Some(Killed(child)), data, kubeconfig, client, _dir: dir }
    }

    /// A client of this server that authenticates with a bearer `token` instead of the
    /// admin certificate.
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        let mut kubeconfig = Kubeconfig::read_from(&self.kubeconfig).unwrap();
        for named in &mut kubeconfig.auth_infos {
            named.auth_info =
                Some(kube::config::AuthInfo { token: Some(token.to_string().into()), ..Default::default() });
        }
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
        kube::Client::try_from(config).unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.0.id()).unwrap_or_default()
    }

    /// Kills the server, keeping its data directory (for `krate reset`).
    pub fn stop(&mut self) {
        self.child = None;
    }
}

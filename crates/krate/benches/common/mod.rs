//! What the benchmarks share: a `krate server` on a free loopback port with its own data
//! directory and a kube-rs client for it, killed on drop; and the tests' registry of
//! krate's test images.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Each operation's latency and the whole run's wall time.
pub struct Stats {
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

impl Stats {
    pub fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted[((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1).min(sorted.len() - 1)]
    }
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
    pub fn row(&self, name: &str) {
        println!(
            "{name:<28} {:>8} ops {:>10.0} ops/s   p50 {:>8.2} ms   p99 {:>8.2} ms",
            self.latencies.len(),
            self.rate(),
            self.percentile(0.50).as_secs_f64() * 1e3,
            self.percentile(0.99).as_secs_f64() * 1e3
        );
    }
}

/// Runs `op(i)` for each i of `range` with `concurrency` workers, timing each call.
pub async fn run_with<F, Fut>(concurrency: usize, range: std::ops::Range<usize>, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(range.start));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (op, next, end) = (op.clone(), next.clone(), range.end);
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    return lat;
                }
                let t = Instant::now();
                op(i).await;
                lat.push(t.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await.unwrap());
    }
    Stats { latencies, elapsed: start.elapsed() }
}

//! Liveness, readiness and startup probes: one task per running container and probe
//! kind, on the probe's own period (exec through CRI ExecSync, httpGet and tcpSocket to
//! the pod's IP, grpc health checks). A task reports only verdicts, after the success or
//! failure threshold, and wakes the pod's worker, which acts on them (restart on a failed
//! liveness or startup probe; readiness into the pod's conditions).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, LifecycleHandler, ObjectReference, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::cri::{api, Cri};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    Liveness,
    Readiness,
    Startup,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
            Kind::Startup => "Startup",
        }
    }

    pub fn of(self, c: &Container) -> Option<&Probe> {
        match self {
            Kind::Liveness => c.liveness_probe.as_ref(),
            Kind::Readiness => c.readiness_probe.as_ref(),
            Kind::Startup => c.startup_probe.as_ref(),
        }
    }
}

/// A verdict after the probe's thresholds.
#[derive(Clone, PartialEq, Debug)]
pub enum Verdict {
    Success,
    Failure(String),
}

type Results = Arc<Mutex<HashMap<(String, Kind), Verdict>>>;

/// The probe tasks of one pod and their latest verdicts, by container ID and kind.
#[derive(Default)]
pub struct Probers {
    tasks: HashMap<(String, Kind), JoinHandle<()>>,
    results: Results,
}

/// What a probe task needs to reach its container.
pub struct Target {
    pub cri: Cri,
    pub container: Container,
    pub container_id: String,
    pub pod_ip: String,
    pub events: krate_client::events::Recorder,
    pub object: ObjectReference,
    pub wake: Arc<Notify>,
}

impl Probers {
    pub fn verdict(&self, container_id: &str, kind: Kind) -> Option<Verdict> {
        self.results.lock().unwrap().get(&(container_id.to_string(), kind)).cloned()
    }

    /// Starts the `kind` probe of the target's container unless it runs already.
    pub fn ensure(&mut self, target: Target, kind: Kind) {
        let key = (target.container_id.clone(), kind);
        if self.tasks.contains_key(&key) {
            return;
        }
        let Some(probe) = kind.of(&target.container).cloned() else { return };
        let results = self.results.clone();
        self.tasks.insert(key, tokio::spawn(run(target, kind, probe, results)));
    }

    /// Stops the probes (and forgets the verdicts) of containers not in `running`.
    pub fn retain(&mut self, running: &HashSet<String>) {
        self.tasks.retain(|(id, _), task| {
            let keep = running.contains(id);
            if !keep {
                task.abort();
            }
            keep
        });
        self.results.lock().unwrap().retain(|(id, _), _| running.contains(id));
    }
}

impl Drop for Probers {
    fn drop(&mut self) {
        self.tasks.values().for_each(|t| t.abort());
    }
}

async fn run(target: Target, kind: Kind, probe: Probe, results: Results) {
    let seconds = |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    let period = seconds(probe.period_seconds, 10).max(Duration::from_secs(1));
    let timeout = seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1));
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    tokio::time::sleep(seconds(probe.initial_delay_seconds, 0)).await;
    let (mut successes, mut failures) = (0, 0);
    let key = (target.container_id.clone(), kind);
    loop {
        let outcome = match tokio::time::timeout(timeout, check(&target, &probe, timeout)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timeout after {}s", timeout.as_secs())),
        };
        let verdict = match outcome {
            Ok(()) => {
                successes += 1;
                failures = 0;
                (successes >= success_threshold).then_some(Verdict::Success)
            }
            Err(message) => {
                failures += 1;
                successes = 0;
                target
                    .events
                    .warning(&target.object, "Unhealthy", &format!("{} probe failed: {message}", kind.name()))
                    .await;
                (failures >= failure_threshold).then_some(Verdict::Failure(message))
            }
        };
        if let Some(v) = verdict {
            let changed = results.lock().unwrap().insert(key.clone(), v.clone()) != Some(v.clone());
            if changed {
                target.wake.notify_one();
            }
            // A startup probe is done once it succeeds; a failed liveness or startup
            // probe ends with the container.
            if v == Verdict::Success && kind == Kind::Startup {
                return;
            }
            if matches!(v, Verdict::Failure(_)) && kind != Kind::Readiness {
                return;
            }
        }
        tokio::time::sleep(period).await;
    }
}

/// Runs a lifecycle hook (postStart, preStop) with the probes' handlers, or its sleep.
pub async fn run_hook(target: &Target, hook: &LifecycleHandler, timeout: Duration) -> Result<(), String> {
    if let Some(sleep) = &hook.sleep {
        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64).min(timeout)).await;
        return Ok(());
    }
    let probe = Probe {
        exec: hook.exec.clone(),
        http_get: hook.http_get.clone(),
        tcp_socket: hook.tcp_socket.clone(),
        ..Default::default()
    };
    match tokio::time::timeout(timeout, check(target, &probe, timeout)).await {
        Ok(r) => r,
        Err(_) => Err(format!("the hook did not finish within {}s", timeout.as_secs())),
    }
}

/// A port given by number or by the name of one of the container's ports.
fn port(c: &Container, p: &IntOrString) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .ok_or_else(|| format!("the container has no port named {name:?}")),
    }
}

async fn check(target: &Target, probe: &Probe, timeout: Duration) -> Result<(), String> {
    let c = &target.container;
    if let Some(exec) = &probe.exec {
        let request = api::ExecSyncRequest {
            container_id: target.container_id.clone(),
            cmd: exec.command.clone().unwrap_or_default(),
            timeout: timeout.as_secs() as i64,
        };
        let out =
            target.cri.clone().runtime.exec_sync(request).await.map_err(|e| e.message().to_string())?.into_inner();
        if out.exit_code == 0 {
            return Ok(());
        }
        let output =
            String::from_utf8_lossy(&out.stdout).trim().to_string() + String::from_utf8_lossy(&out.stderr).trim();
        return Err(format!(
            "command {:?} exited with {}: {output}",
            exec.command.clone().unwrap_or_default(),
            out.exit_code
        ));
    }
    if let Some(http) = &probe.http_get {
        let host = http.host.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| target.pod_ip.clone());
        let port = port(c, &http.port)?;
        let https = http.scheme.as_deref() == Some("HTTPS");
        let path = http.path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into());
        let url = format!("{}://{host}:{port}{path}", if https { "https" } else { "http" });
        let stream =
            tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("Get \"{url}\": {e}"))?;
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\nConnection: close\r\n");
        for h in http.http_headers.iter().flatten() {
            request.push_str(&format!("{}: {}\r\n", h.name, h.value));
        }
        request.push_str("\r\n");
        let code = if https {
            // As upstream's kubelet: TLS without verifying the target's certificate.
            let connector = tokio_rustls::TlsConnector::from(krate_client::tls::unverified_client_config());
            let name =
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("Get \"{url}\": {e}"))?;
            let tls = connector.connect(name, stream).await.map_err(|e| format!("Get \"{url}\": {e}"))?;
            status_code(tls, &request).await?
        } else {
            status_code(stream, &request).await?
        };
        return if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP probe failed with statuscode: {code}"))
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let host = tcp.host.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| target.pod_ip.clone());
        let port = port(c, &tcp.port)?;
        tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("dial tcp {host}:{port}: {e}"))?;
        return Ok(());
    }
    if let Some(grpc) = &probe.grpc {
        let port = u16::try_from(grpc.port).map_err(|_| format!("invalid port {}", grpc.port))?;
        return grpc_health(&target.pod_ip, port, grpc.service.clone().unwrap_or_default()).await;
    }
    Err("the probe has no handler".into())
}

/// Sends `request` on `stream` and reads the status code of the response.
async fn status_code<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> Result<u16, String> {
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| "malformed HTTP response".to_string())
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    /// 1 = SERVING.
    #[prost(int32, tag = "1")]
    status: i32,
}

/// The gRPC health checking protocol (`grpc.health.v1.Health/Check`).
async fn grpc_health(ip: &str, port: u16, service: String) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::try_from(format!("http://{ip}:{port}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connecting to {ip}:{port}: {e}"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| e.to_string())?;
    let path = http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
    let response = grpc
        .unary(tonic::Request::new(HealthCheckRequest { service }), path, codec)
        .await
        .map_err(|e| e.message().to_string())?;
    match response.into_inner().status {
        1 => Ok(()),
        s => Err(format!("service unhealthy (responded with status {s})")),
    }
}

//! One task per pod: it drives the pod's sandbox and containers towards its spec (init
//! containers in order, app containers, restarts under the restart policy with
//! CrashLoopBackOff), reports its status, and tears it down when the pod is deleted. It
//! wakes on pod changes, on the runtime's events for its containers, and on back-off
//! deadlines; it never polls. Everything it knows it reads back from the runtime, so an
//! agent restarted mid-way adopts what runs without restarting it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Container, ObjectReference, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::probe::{self, Kind, Probers, Verdict};
use super::status::{self, Observed, Waiting};
use super::{admission, dns, env, spec, volumes, Shared};
use crate::cri::api;

const BACKOFF_START: Duration = Duration::from_secs(10);
/// How long a just exited container's status may wait for the runtime to finish its log
/// (a loaded node's containerd took over 2 s to copy 1.3 MB of output).
const LOG_CLOSE_WAIT: Duration = Duration::from_secs(10);
/// How long a postStart hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long before exiting starts its back-off afresh.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);

/// Exponential back-off per key (a container's restarts, its image pulls), as upstream:
/// the first retry is immediate, then 10 s, 20 s, ... up to 5 minutes after the failure.
#[derive(Default)]
struct Backoffs(HashMap<String, (Duration, Instant)>);

impl Backoffs {
    /// When `key` is in back-off, the instant it ends and its delay. The delay counts
    /// from `since` (a container's exit) or else from the last failure recorded.
    fn waiting(&self, key: &str, since: Option<Instant>) -> Option<(Instant, Duration)> {
        let (delay, last) = self.0.get(key)?;
        let until = since.unwrap_or(*last) + *delay;
        (until > Instant::now()).then_some((until, *delay))
    }
    /// Records a failure (or a restart): the next retry waits longer.
    fn bump(&mut self, key: &str) {
        let entry = self.0.entry(key.to_string()).or_insert((Duration::ZERO, Instant::now()));
        entry.0 = if entry.0.is_zero() { BACKOFF_START } else { (entry.0 * 2).min(BACKOFF_MAX) };
        entry.1 = Instant::now();
    }
    fn reset(&mut self, key: &str) {
        self.0.remove(key);
    }
}

pub(super) struct PodWorker {
    shared: Arc<Shared>,
    uid: String,
    pod_rx: watch::Receiver<Option<Arc<Pod>>>,
    wake: Arc<Notify>,
    backoff: Backoffs,
    waiting: HashMap<String, Waiting>,
    published: Option<Value>,
    /// Write the status even if `published` matches (the API object was replaced).
    republish: Arc<AtomicBool>,
    last: Option<Arc<Pod>>,
    /// Consecutive failed passes (runtime errors): the next retry waits 2^n s, ≤ 60 s.
    failures: u32,
    probers: Probers,
    /// Exited containers (by id) whose logs the runtime has finished writing.
    logs_written: std::collections::HashSet<String>,
    /// The resources each running container (by id) was given, as the pod spec states
    /// them: what its status reports, and what a resize is measured against.
    applied: HashMap<String, Value>,
    /// Set when the node shuts down: stop the pod within the grace period given.
    stop: Arc<std::sync::Mutex<Option<StopRequest>>>,
}

/// Stop the pod for the node's shutdown, within `grace`; `done` tells when it has.
pub(super) struct StopRequest {
    pub grace: Duration,
    pub done: tokio::sync::oneshot::Sender<()>,
}

/// Upstream's words for pods stopped by a node shutdown.
const SHUTDOWN_REASON: &str = "Terminated";
const SHUTDOWN_MESSAGE: &str = "Pod was terminated in response to imminent node shutdown.";
/// Upstream's words for a pod stopped at its `activeDeadlineSeconds`.
const DEADLINE_REASON: &str = "DeadlineExceeded";
const DEADLINE_MESSAGE: &str = "Pod was active on the node longer than the specified deadline";

/// How long `pod` may still run under its `activeDeadlineSeconds` (None: no deadline or
/// not started).
fn deadline_left(pod: &Pod) -> Option<Duration> {
    let deadline = pod.spec.as_ref()?.active_deadline_seconds?;
    let started = pod.status.as_ref()?.start_time.as_ref()?.0.to_string().parse::<jiff::Timestamp>().ok()?;
    let ends = started.checked_add(jiff::SignedDuration::from_secs(deadline)).ok()?;
    let left = ends.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
}

/// The pod's running sandbox, as containers are started in it.
struct Sandbox<'a> {
    id: &'a str,
    config: &'a api::PodSandboxConfig,
    rt: &'a env::Runtime<'a>,
}

/// Asks for the next pass at `at`, unless an earlier one is already due.
fn wake_at(next: &mut Option<Instant>, at: Instant) {
    *next = Some(next.map_or(at, |n| n.min(at)));
}

fn nanos_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

fn reference(pod: &Pod, field: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        uid: pod.metadata.uid.clone(),
        resource_version: pod.metadata.resource_version.clone(),
        field_path: field,
    }
}

/// Which of the pod's container lists a container comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role<'a> {
    Init,
    App,
    /// Added by `kubectl debug`: started once, never restarted; `target` is the id of the
    /// container whose processes it sees (its `targetContainerName`).
    Ephemeral {
        target: Option<&'a str>,
    },
}

fn container_ref(pod: &Pod, c: &Container, role: Role<'_>) -> ObjectReference {
    let list = match role {
        Role::Init => "initContainers",
        Role::App => "containers",
        Role::Ephemeral { .. } => "ephemeralContainers",
    };
    reference(pod, Some(format!("spec.{list}{{{}}}", c.name)))
}

/// An ephemeral container as the container it runs as (the same fields, less the target).
fn ephemeral_as_container(ec: &k8s_openapi::api::core::v1::EphemeralContainer) -> Option<Container> {
    serde_json::to_value(ec).ok().and_then(|v| serde_json::from_value(v).ok())
}

/// Whether the restart policy restarts a container that exited with `code`.
/// A sidecar: an init container with `restartPolicy: Always` (upstream's restartable
/// init container), which keeps running beside the pod's containers.
/// How much of a failed container's log becomes its termination message under
/// `FallbackToLogsOnError` (upstream's limits).
const TERMINATION_LOG_LINES: usize = 80;
const TERMINATION_LOG_BYTES: usize = 2048;

fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

fn restarts(pod: &Pod, code: i32) -> bool {
    match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()).unwrap_or("Always") {
        "Always" => true,
        "OnFailure" => code != 0,
        _ => false,
    }
}

impl PodWorker {
    pub(super) fn new(
        shared: Arc<Shared>,
        uid: String,
        pod_rx: watch::Receiver<Option<Arc<Pod>>>,
        wake: Arc<Notify>,
        republish: Arc<AtomicBool>,
        stop: Arc<std::sync::Mutex<Option<StopRequest>>>,
    ) -> Self {
        PodWorker {
            shared,
            uid,
            pod_rx,
            wake,
            republish,
            stop,
            backoff: Backoffs::default(),
            waiting: HashMap::new(),
            published: None,
            last: None,
            failures: 0,
            probers: Probers::default(),
            applied: HashMap::new(),
            logs_written: Default::default(),
        }
    }

    pub(super) async fn run(mut self) {
        loop {
            let current = self.pod_rx.borrow_and_update().clone();
            let mut next: Option<Instant> = None;
            match current {
                None => {
                    // Gone from the API (deleted, or force-deleted): stop everything.
                    let grace = self.last.as_ref().and_then(|p| p.metadata.deletion_grace_period_seconds).unwrap_or(0);
                    self.teardown(grace).await;
                    break;
                }
                Some(pod) => {
                    self.last = Some(pod.clone());
                    let stop = self.stop.lock().unwrap().take();
                    if let Some(request) = stop.filter(|_| pod.metadata.deletion_timestamp.is_none()) {
                        if let Err(e) = self.stop_pod(&pod, request.grace, (SHUTDOWN_REASON, SHUTDOWN_MESSAGE)).await {
                            tracing::warn!(pod = %pod.metadata.name.as_deref().unwrap_or_default(), error = %format!("{e:#}"), "reporting a pod stopped for the node's shutdown failed");
                        }
                        let _ = request.done.send(());
                    } else if pod.metadata.deletion_timestamp.is_some() {
                        self.teardown(pod.metadata.deletion_grace_period_seconds.unwrap_or(30)).await;
                        self.finish_deletion(&pod).await;
                    } else if deadline_left(&pod).is_some_and(|d| d.is_zero()) && !self.is_terminal() {
                        let grace = Duration::from_secs(u64::MAX >> 2);
                        if let Err(e) = self.stop_pod(&pod, grace, (DEADLINE_REASON, DEADLINE_MESSAGE)).await {
                            tracing::warn!(pod = %pod.metadata.name.as_deref().unwrap_or_default(), error = %format!("{e:#}"), "stopping a pod past its deadline failed");
                            next = Some(Instant::now() + Duration::from_secs(1));
                        }
                    } else {
                        match self.sync(&pod).await {
                            Ok(n) => {
                                self.failures = 0;
                                next = n;
                                if let Some(left) = deadline_left(&pod) {
                                    wake_at(&mut next, Instant::now() + left);
                                }
                            }
                            Err(e) => {
                                let wait = Duration::from_secs(1 << self.failures.min(6)).min(Duration::from_secs(60));
                                self.failures += 1;
                                tracing::warn!(pod = %pod.metadata.name.as_deref().unwrap_or_default(), error = %format!("{e:#}"), retry_in = ?wait, "pod sync failed");
                                next = Some(Instant::now() + wait);
                            }
                        }
                    }
                }
            }
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.pod_rx.changed() => if changed.is_err() { break },
                _ = self.wake.notified() => {}
                _ = sleep => {}
            }
        }
        self.shared.forget_worker(&self.uid);
    }

    fn cri(&self) -> crate::cri::Cri {
        self.shared.cri.clone()
    }

    async fn sandboxes(&self) -> Result<Vec<api::PodSandbox>> {
        let mut list = self.cri().sandboxes_labelled(&[(spec::POD_UID, &self.uid)]).await?;
        list.sort_by_key(|s| s.created_at);
        Ok(list)
    }

    /// The latest two attempts of each container of `pod` in `sandbox_id`, by name.
    async fn observe(&self, pod: &Pod, sandbox_id: &str) -> Result<HashMap<String, Observed>> {
        // Containers whose failure message may come from their log's end.
        let fallback: std::collections::HashSet<&str> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()))
            .filter(|c| c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError"))
            .map(|c| c.name.as_str())
            .collect();
        let filter = api::ContainerFilter { pod_sandbox_id: sandbox_id.to_string(), ..Default::default() };
        let list = self.cri().containers(filter).await?;
        let mut out: HashMap<String, Observed> = HashMap::new();
        let mut stale = Vec::new();
        for c in list {
            let name = c.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
            self.shared.own(&c.id, &self.uid);
            let entry = out.entry(name.clone()).or_default();
            if entry.latest.is_some() && entry.previous.is_some() {
                stale.push(c.id);
                continue;
            }
            let mut st = self
                .cri()
                .runtime
                .container_status(api::ContainerStatusRequest { container_id: c.id.clone(), verbose: false })
                .await?
                .into_inner()
                .status;
            if let Some(st) = st.as_mut().filter(|st| status::is_exited(st)) {
                let attempt = st.metadata.as_ref().map(|m| m.attempt).unwrap_or(0);
                if let Some(message) = volumes::termination_message(&self.shared.volume_root, &self.uid, &name, attempt)
                {
                    st.message = message;
                }
                if st.message.is_empty() && st.exit_code != 0 && fallback.contains(name.as_str()) {
                    st.message = crate::logs::last_lines(
                        std::path::Path::new(&st.log_path),
                        TERMINATION_LOG_LINES,
                        TERMINATION_LOG_BYTES,
                    );
                }
            }
            if entry.latest.is_none() {
                entry.latest = st;
            } else {
                entry.previous = st;
            }
        }
        // Attempts older than the previous one are of no more use (logs --previous
        // reads the previous one only).
        for id in stale {
            let _ = self.cri().runtime.remove_container(api::RemoveContainerRequest { container_id: id.clone() }).await;
            self.shared.disown(&id);
        }
        Ok(out)
    }

    /// A ready sandbox for the pod, creating one (and clearing dead ones) if needed.
    async fn ensure_sandbox(&mut self, pod: &Pod) -> Result<(String, api::PodSandboxConfig, String)> {
        let sandboxes = self.sandboxes().await?;
        let attempt =
            sandboxes.iter().map(|s| s.metadata.as_ref().map(|m| m.attempt + 1).unwrap_or(0)).max().unwrap_or(0);
        let ready = sandboxes.iter().rev().find(|s| s.state == api::PodSandboxState::SandboxReady as i32);
        let (id, config) = match ready {
            Some(s) => (
                s.id.clone(),
                spec::sandbox_config(
                    pod,
                    s.metadata.as_ref().map(|m| m.attempt).unwrap_or(0),
                    &self.shared.log_root,
                    &self.shared.dns,
                ),
            ),
            None => {
                for dead in &sandboxes {
                    self.remove_sandbox(&dead.id).await;
                }
                let config = spec::sandbox_config(pod, attempt, &self.shared.log_root, &self.shared.dns);
                std::fs::create_dir_all(&config.log_directory)
                    .with_context(|| format!("creating {}", config.log_directory))?;
                let id = match self
                    .cri()
                    .runtime
                    .run_pod_sandbox(api::RunPodSandboxRequest {
                        config: Some(config.clone()),
                        runtime_handler: String::new(),
                    })
                    .await
                {
                    Ok(r) => r.into_inner().pod_sandbox_id,
                    Err(e) => {
                        let message = format!("Failed to create pod sandbox: {}", e.message());
                        self.shared.events.warning(&reference(pod, None), "FailedCreatePodSandBox", &message).await;
                        anyhow::bail!(message);
                    }
                };
                self.shared.own(&id, &self.uid);
                (id, config)
            }
        };
        let st = self
            .cri()
            .runtime
            .pod_sandbox_status(api::PodSandboxStatusRequest { pod_sandbox_id: id.clone(), verbose: false })
            .await?
            .into_inner();
        let ip = st.status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
        Ok((id, config, ip))
    }

    async fn remove_sandbox(&self, id: &str) {
        if let Err(e) = self.cri().remove_sandbox(id).await {
            tracing::warn!(sandbox = %id, error = %e.message(), "removing a pod sandbox failed");
        }
        self.shared.disown(id);
    }

    fn is_terminal(&self) -> bool {
        self.published.as_ref().and_then(|s| s["phase"].as_str()).is_some_and(|p| p == "Succeeded" || p == "Failed")
    }

    /// One pass: acts on the runtime, then reports. Returns when to look again (back-off).
    async fn sync(&mut self, pod: &Pod) -> Result<Option<Instant>> {
        if self.published.is_none() {
            self.published =
                pod.status.as_ref().map(serde_json::to_value).transpose()?.filter(|s| s.get("phase").is_some());
        }
        if self.is_terminal() {
            // A finished pod holds no host port (nor forwards one to its stopped sandbox).
            self.shared.host_ports.release(&self.uid);
            self.shared.catalog.set_host_ports(&self.uid, vec![]);
            // A finished pod keeps its containers (for logs) but not its sandbox.
            for s in self.sandboxes().await? {
                if s.state == api::PodSandboxState::SandboxReady as i32 {
                    let _ =
                        self.cri().runtime.stop_pod_sandbox(api::StopPodSandboxRequest { pod_sandbox_id: s.id }).await;
                }
            }
            return Ok(None);
        }
        let new = pod.status.as_ref().and_then(|s| s.start_time.as_ref()).is_none()
            && self.published.as_ref().is_none_or(|p| p.get("startTime").is_none());
        if new {
            let conditions = self.shared.conditions.borrow().clone();
            if let Some((reason, message)) = admission::rejection(pod, &conditions, self.shared.is_shutting_down()) {
                self.reject(pod, reason, &message).await?;
                return Ok(None);
            }
        }
        if let Some((reason, message)) = self.shared.host_ports.claim(&self.uid, pod, new) {
            self.reject(pod, reason, &message).await?;
            return Ok(None);
        }
        let (sandbox_id, sandbox_config, pod_ip) = self.ensure_sandbox(pod).await?;
        self.shared.catalog.set_host_ports(&self.uid, spec::host_ports(pod, &pod_ip));
        let mut next: Option<Instant> = None;
        let observed = self.observe(pod, &sandbox_id).await?;
        let spec = pod.spec.clone().unwrap_or_default();
        let host_ip = self.shared.node_ip.clone();
        let shared = self.shared.clone();
        let rt = env::Runtime { pod_ip: &pod_ip, host_ip: &host_ip, allocatable: &shared.allocatable };
        let sandbox = Sandbox { id: &sandbox_id, config: &sandbox_config, rt: &rt };

        // Init containers: one at a time, each must succeed before the next. A sidecar
        // (an init container with restartPolicy Always) must only have started (its
        // startup probe passed) for the next to start; it runs beside the pod's
        // containers and is restarted whenever it exits, whatever the pod's policy.
        let mut init_done = true;
        let mut init_failed = false;
        let app_started = spec.containers.iter().any(|c| observed.get(&c.name).is_some_and(|o| o.latest.is_some()));
        for c in spec.init_containers.iter().flatten() {
            let o = observed.get(&c.name).cloned().unwrap_or_default();
            if is_sidecar(c) {
                match &o.latest {
                    None => self.start(pod, c, Role::Init, 0, &sandbox, &mut next).await,
                    Some(s) if status::is_exited(s) => {
                        self.restart_or_wait(pod, c, Role::Init, s, &sandbox, &mut next).await;
                        if app_started {
                            continue;
                        }
                    }
                    Some(s) => {
                        self.waiting.remove(&c.name);
                        if status::is_running(s) {
                            self.kill_if_unhealthy(pod, c, s).await;
                            self.resize(pod, c, s).await;
                        }
                        if app_started || self.started(c, &s.id) {
                            continue;
                        }
                    }
                }
                init_done = false;
                break;
            }
            match &o.latest {
                Some(s) if status::is_exited(s) && s.exit_code == 0 => continue,
                Some(s) if status::is_exited(s) => {
                    init_done = false;
                    if !restarts(pod, s.exit_code) {
                        init_failed = true;
                    } else {
                        self.restart_or_wait(pod, c, Role::Init, s, &sandbox, &mut next).await;
                    }
                }
                Some(_) => init_done = false,
                None => {
                    init_done = false;
                    self.start(pod, c, Role::Init, 0, &sandbox, &mut next).await;
                }
            }
            break;
        }
        if init_done {
            for c in &spec.containers {
                let o = observed.get(&c.name).cloned().unwrap_or_default();
                match &o.latest {
                    None => self.start(pod, c, Role::App, 0, &sandbox, &mut next).await,
                    Some(s) if status::is_exited(s) && restarts(pod, s.exit_code) => {
                        self.restart_or_wait(pod, c, Role::App, s, &sandbox, &mut next).await
                    }
                    Some(s) => {
                        self.waiting.remove(&c.name);
                        if status::is_running(s) {
                            self.kill_if_unhealthy(pod, c, s).await;
                            self.resize(pod, c, s).await;
                        }
                    }
                }
            }
        }
        // Ephemeral containers start once each, initialized or not, and are never restarted.
        for ec in spec.ephemeral_containers.iter().flatten() {
            if observed.get(&ec.name).is_some_and(|o| o.latest.is_some()) {
                continue;
            }
            let Some(c) = ephemeral_as_container(ec) else { continue };
            let target = ec.target_container_name.as_ref().and_then(|t| observed.get(t)?.latest.as_ref());
            let role = Role::Ephemeral { target: target.map(|s| s.id.as_str()) };
            self.start(pod, &c, role, 0, &sandbox, &mut next).await;
        }
        if volumes::has_live_content(pod)
            && observed.values().any(|o| o.latest.as_ref().is_some_and(status::is_running))
        {
            // Running containers see ConfigMap/Secret/downward API changes within a period.
            if let Err(e) = volumes::set_up_all(&self.shared.client, pod, &self.shared.volume_root, &rt).await {
                tracing::warn!(pod = %spec::pod_key(pod).1, error = %format!("{e:#}"), "refreshing volumes failed");
            }
            let at = Instant::now() + self.shared.sync_frequency;
            wake_at(&mut next, at);
        }
        let observed = self.observe(pod, &sandbox_id).await?;
        // containerd announces an exit before its CRI plugin records it: look again shortly.
        let exit_pending = observed
            .values()
            .filter_map(|o| o.latest.as_ref())
            .map(|s| self.shared.exit_pending(&s.id, status::is_exited(s)))
            .fold(false, |a, b| a | b);
        if exit_pending {
            let at = Instant::now() + Duration::from_millis(200);
            wake_at(&mut next, at);
        }
        self.update_probes(pod, &observed, &pod_ip);
        let current: std::collections::HashSet<&str> =
            observed.values().filter_map(|o| o.latest.as_ref()).map(|s| s.id.as_str()).collect();
        self.applied.retain(|id, _| current.contains(id.as_str()));
        self.logs_written.retain(|id| current.contains(id.as_str()));
        self.await_logs(&observed).await;
        self.publish(pod, &observed, init_done, init_failed, &pod_ip, None).await?;
        if self.is_terminal() {
            let _ =
                self.cri().runtime.stop_pod_sandbox(api::StopPodSandboxRequest { pod_sandbox_id: sandbox_id }).await;
        }
        Ok(next)
    }

    async fn restart_or_wait(
        &mut self,
        pod: &Pod,
        c: &Container,
        role: Role<'_>,
        last: &api::ContainerStatus,
        sandbox: &Sandbox<'_>,
        next: &mut Option<Instant>,
    ) {
        let key = format!("container/{}", c.name);
        if Duration::from_nanos((last.finished_at - last.started_at).max(0) as u64) > BACKOFF_RESET_AFTER {
            self.backoff.reset(&key);
        }
        let ago = Duration::from_nanos((nanos_now() - last.finished_at).max(0) as u64);
        let exited = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
        match self.backoff.waiting(&key, Some(exited)) {
            None => {
                self.backoff.bump(&key);
                self.start(pod, c, role, status::restart_count(last) + 1, sandbox, next).await;
            }
            Some((until, delay)) => {
                let (ns, name, uid) = spec::pod_key(pod);
                let message = format!(
                    "back-off {}s restarting failed container={} pod={name}_{ns}({uid})",
                    delay.as_secs(),
                    c.name
                );
                if self.waiting.get(&c.name).map(|w| w.reason.as_str()) != Some("CrashLoopBackOff") {
                    self.shared
                        .events
                        .warning(&container_ref(pod, c, role), "BackOff", "Back-off restarting failed container")
                        .await;
                }
                self.waiting.insert(c.name.clone(), Waiting { reason: "CrashLoopBackOff".into(), message });
                wake_at(next, until);
            }
        }
    }

    /// Pulls (per imagePullPolicy), creates and starts one container. Failures become
    /// the container's waiting reason and an event; back-offs set `next`.
    async fn start(
        &mut self,
        pod: &Pod,
        c: &Container,
        role: Role<'_>,
        restart_count: u32,
        sandbox: &Sandbox<'_>,
        next: &mut Option<Instant>,
    ) {
        let rt = sandbox.rt;
        let object = container_ref(pod, c, role);
        let image = c.image.clone().unwrap_or_default();
        let pull_key = format!("image/{}", c.name);
        if let Some((until, _)) = self.backoff.waiting(&pull_key, None) {
            // As upstream (1.30+): the waiting message carries the failed pull's error.
            let back_off = format!("Back-off pulling image \"{image}\"");
            let previous = self.waiting.get(&c.name);
            let started_backing_off = previous.is_none_or(|w| w.reason != "ImagePullBackOff");
            let message = match previous {
                Some(w) if w.reason == "ErrImagePull" => format!("{back_off}: ErrImagePull: {}", w.message),
                Some(w) if w.reason == "ImagePullBackOff" => w.message.clone(),
                _ => back_off.clone(),
            };
            if started_backing_off {
                self.shared.events.normal(&object, "BackOff", &back_off).await;
            }
            self.waiting.insert(c.name.clone(), Waiting { reason: "ImagePullBackOff".into(), message });
            wake_at(next, until);
            return;
        }
        let auth = match crate::images::pull_auth(&self.shared.client, pod, &image).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading imagePullSecrets failed; pulling without them");
                None
            }
        };
        let image_ref = match crate::images::ensure(
            &self.shared,
            &image,
            c.image_pull_policy.as_deref(),
            auth,
            sandbox.config,
            &object,
        )
        .await
        {
            Ok(r) => {
                self.backoff.reset(&pull_key);
                r
            }
            Err(e) => {
                self.backoff.bump(&pull_key);
                let until =
                    self.backoff.waiting(&pull_key, None).map_or(Instant::now() + BACKOFF_START, |(until, _)| until);
                wake_at(next, until);
                self.waiting
                    .insert(c.name.clone(), Waiting { reason: "ErrImagePull".into(), message: format!("{e:#}") });
                return;
            }
        };
        let set_up = async {
            self.mount_image_volumes(pod, sandbox.config, &object).await?;
            volumes::set_up_all(&self.shared.client, pod, &self.shared.volume_root, rt).await
        };
        let volumes = match set_up.await {
            Ok(v) => v,
            Err(e) => {
                let message = format!("{e:#}");
                self.shared.events.warning(&reference(pod, None), "FailedMount", &message).await;
                self.waiting.insert(c.name.clone(), Waiting { reason: "ContainerCreating".into(), message });
                wake_at(next, Instant::now() + BACKOFF_START);
                return;
            }
        };
        let env = match env::resolve(&self.shared.client, pod, c, rt).await {
            Ok(env) => env,
            Err(e) => return self.not_created(&object, c, "CreateContainerConfigError", format!("{e:#}"), next).await,
        };
        let mut mounts = match volumes::mounts(c, &volumes, &env) {
            Ok(m) => m,
            Err(e) => return self.not_created(&object, c, "CreateContainerConfigError", format!("{e:#}"), next).await,
        };
        match volumes::termination_log(&self.shared.volume_root, &self.uid, c, restart_count) {
            Ok(m) => mounts.push(m),
            Err(e) => tracing::warn!(container = %c.name, error = %format!("{e:#}"), "no termination message file"),
        }
        let pod_dir = volumes::pod_dir(&self.shared.volume_root, &self.uid);
        match dns::hosts_mount(&pod_dir, pod, c, rt.pod_ip, &self.shared.dns.domain) {
            Ok(m) => mounts.extend(m),
            Err(e) => tracing::warn!(container = %c.name, error = %format!("{e:#}"), "no managed /etc/hosts"),
        }
        let pid_target = match role {
            Role::Ephemeral { target } => target.map(str::to_string),
            _ => None,
        };
        let plan = spec::ContainerPlan { pod, container: c, image_ref, restart_count, env, mounts, pid_target };
        let created = self
            .cri()
            .runtime
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: sandbox.id.to_string(),
                config: Some(plan.config()),
                sandbox_config: Some(sandbox.config.clone()),
            })
            .await;
        let id = match created {
            Ok(r) => r.into_inner().container_id,
            Err(e) => return self.not_created(&object, c, "CreateContainerError", e.message().to_string(), next).await,
        };
        self.shared.own(&id, &self.uid);
        self.applied.insert(id.clone(), spec::resources_json(c));
        self.shared.events.normal(&object, "Created", &format!("Created container {}", c.name)).await;
        self.waiting.remove(&c.name);
        match self.cri().runtime.start_container(api::StartContainerRequest { container_id: id.clone() }).await {
            Ok(_) => {
                self.shared.events.normal(&object, "Started", &format!("Started container {}", c.name)).await;
                if let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()) {
                    // A failed postStart hook kills the container; the restart policy decides.
                    if let Err(message) =
                        probe::run_hook(&self.target(pod, c, &id, rt.pod_ip), hook, HOOK_TIMEOUT).await
                    {
                        self.shared.events.warning(&object, "FailedPostStartHook", &message).await;
                        let grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30);
                        let _ = self
                            .cri()
                            .runtime
                            .stop_container(api::StopContainerRequest { container_id: id, timeout: grace })
                            .await;
                    }
                }
            }
            // The runtime records the failure as the container's exit (StartError); the
            // next pass restarts it under the back-off.
            Err(e) => self.shared.events.warning(&object, "Failed", &format!("Error: {}", e.message())).await,
        }
    }

    /// Runs the probes of running app containers: the startup probe until it succeeds,
    /// then liveness and readiness.
    fn update_probes(&mut self, pod: &Pod, observed: &HashMap<String, Observed>, pod_ip: &str) {
        let running: std::collections::HashSet<String> = observed
            .values()
            .filter_map(|o| o.latest.as_ref().filter(|s| status::is_running(s)).map(|s| s.id.clone()))
            .collect();
        self.probers.retain(&running);
        let sidecars = pod.spec.iter().flat_map(|s| s.init_containers.iter().flatten()).filter(|c| is_sidecar(c));
        for c in pod.spec.iter().flat_map(|s| s.containers.iter()).chain(sidecars) {
            let Some(s) = observed.get(&c.name).and_then(|o| o.latest.as_ref()).filter(|s| status::is_running(s))
            else {
                continue;
            };
            let kinds: &[Kind] =
                if self.started(c, &s.id) { &[Kind::Liveness, Kind::Readiness] } else { &[Kind::Startup] };
            for kind in kinds {
                let target = self.target(pod, c, &s.id, pod_ip);
                self.probers.ensure(target, *kind);
            }
        }
    }

    /// How probes and hooks reach container `id`.
    fn target(&self, pod: &Pod, c: &Container, id: &str, pod_ip: &str) -> probe::Target {
        probe::Target {
            cri: self.cri(),
            container: c.clone(),
            container_id: id.to_string(),
            pod_ip: pod_ip.to_string(),
            events: self.shared.events.clone(),
            object: container_ref(pod, c, Role::App),
            wake: self.wake.clone(),
        }
    }

    /// Whether the container's startup probe (if any) has succeeded.
    fn started(&self, c: &Container, id: &str) -> bool {
        c.startup_probe.is_none() || self.probers.verdict(id, Kind::Startup) == Some(Verdict::Success)
    }

    /// Whether the running container counts as ready (its readiness probe, if any, passed).
    fn ready(&self, c: &Container, id: &str) -> bool {
        self.started(c, id)
            && (c.readiness_probe.is_none() || self.probers.verdict(id, Kind::Readiness) == Some(Verdict::Success))
    }

    /// Stops a container whose liveness or startup probe failed; its exit then restarts it
    /// under the restart policy.
    async fn kill_if_unhealthy(&mut self, pod: &Pod, c: &Container, s: &api::ContainerStatus) {
        let failed = [Kind::Liveness, Kind::Startup]
            .into_iter()
            .find(|k| matches!(self.probers.verdict(&s.id, *k), Some(Verdict::Failure(_))));
        let Some(kind) = failed else { return };
        let object = container_ref(pod, c, Role::App);
        let message = format!("Container {} failed {} probe, will be restarted", c.name, kind.name().to_lowercase());
        self.shared.events.normal(&object, "Killing", &message).await;
        let grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30);
        if let Err(e) = self
            .cri()
            .runtime
            .stop_container(api::StopContainerRequest { container_id: s.id.clone(), timeout: grace })
            .await
        {
            tracing::warn!(container = %s.id, error = %e.message(), "stopping an unhealthy container failed");
        }
    }

    /// Waits (up to LOG_CLOSE_WAIT) for the runtime to finish writing the logs of containers that
    /// just exited: containerd marks a container exited while its CRI plugin may still
    /// be copying the last output into the log file, which it holds open until done. A
    /// status saying the container finished is read as "its logs are complete" (a
    /// client reads them next), so it waits for the file to be closed.
    async fn await_logs(&mut self, observed: &HashMap<String, Observed>) {
        let exited: Vec<&api::ContainerStatus> = observed
            .values()
            .filter_map(|o| o.latest.as_ref())
            .filter(|s| status::is_exited(s) && !s.log_path.is_empty() && !self.logs_written.contains(&s.id))
            .collect();
        if exited.is_empty() {
            return;
        }
        let runtime = self.shared.cri.runtime_pid();
        for s in exited {
            if let Some(pid) = runtime {
                let path = std::fs::canonicalize(&s.log_path).unwrap_or_else(|_| s.log_path.clone().into());
                let deadline = Instant::now() + LOG_CLOSE_WAIT;
                while crate::cri::holds_open(pid, &path) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            self.logs_written.insert(s.id.clone());
        }
    }

    /// Pulls the images of the pod's image volumes (by their pull policies) and mounts
    /// them, once per pod.
    async fn mount_image_volumes(
        &self,
        pod: &Pod,
        sandbox: &api::PodSandboxConfig,
        object: &ObjectReference,
    ) -> anyhow::Result<()> {
        let shared = &self.shared;
        for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let Some(image) = &v.image else { continue };
            if volumes::image_mounted(&shared.volume_root, &self.uid, &v.name) {
                continue;
            }
            let failed =
                |e: anyhow::Error| anyhow::anyhow!("MountVolume.SetUp failed for volume \"{}\" : {e:#}", v.name);
            let reference = image.reference.as_deref().unwrap_or_default();
            let auth = crate::images::pull_auth(&shared.client, pod, reference).await.unwrap_or(None);
            let policy = image.pull_policy.as_deref();
            let id = crate::images::ensure(shared, reference, policy, auth, sandbox, object).await.map_err(failed)?;
            let (root, socket) = (&shared.volume_root, &shared.cri.socket);
            volumes::mount_image(socket, root, &self.uid, &v.name, &id).await.map_err(failed)?;
        }
        Ok(())
    }

    /// Applies a resize (upstream's in-place pod vertical scaling): a running container
    /// whose spec asks for other CPU or memory than it was given gets them through the
    /// runtime's UpdateContainerResources, or is restarted when its resize policy for a
    /// changed resource says RestartContainer. An agent that restarted knows nothing of
    /// what it gave earlier, so it applies the spec once (the update is idempotent).
    async fn resize(&mut self, pod: &Pod, c: &Container, s: &api::ContainerStatus) {
        let want = spec::resources_json(c);
        let have = self.applied.get(&s.id);
        if have == Some(&want) {
            return;
        }
        let object = container_ref(pod, c, if is_sidecar(c) { Role::Init } else { Role::App });
        if let Some(resource) = have.and_then(|have| spec::resize_restarts(c, have, &want)) {
            let message = format!("Container {} {resource} resize requires restart", c.name);
            self.shared.events.normal(&object, "Killing", &message).await;
            let grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30);
            let stop = api::StopContainerRequest { container_id: s.id.clone(), timeout: grace };
            if let Err(e) = self.cri().runtime.stop_container(stop).await {
                tracing::warn!(container = %s.id, error = %e.message(), "stopping a container to resize it failed");
            }
            self.applied.remove(&s.id);
            return;
        }
        let update = api::UpdateContainerResourcesRequest {
            container_id: s.id.clone(),
            linux: Some(spec::linux_resources(c)),
            ..Default::default()
        };
        match self.cri().runtime.update_container_resources(update).await {
            Ok(_) => {
                self.applied.insert(s.id.clone(), want);
            }
            Err(e) => {
                let message = format!("Resize of container {} failed: {}", c.name, e.message());
                self.shared.events.warning(&object, "ResizeFailed", &message).await;
            }
        }
    }

    /// A container's status with the resources it runs with (upstream reports them for
    /// running containers): `resources` as given, `allocatedResources` its requests.
    fn with_resources(&self, c: &Container, o: &Observed, mut out: Value) -> Value {
        let Some(s) = o.latest.as_ref().filter(|s| status::is_running(s)) else { return out };
        let given = self.applied.get(&s.id).cloned().unwrap_or_else(|| spec::resources_json(c));
        if let Some(requests) = given.get("requests").filter(|r| r.as_object().is_some_and(|m| !m.is_empty())) {
            out["allocatedResources"] = requests.clone();
        }
        out["resources"] = given;
        out
    }

    /// A container that could not be created this pass: a Failed event, its waiting
    /// reason, and another try after the first back-off step.
    async fn not_created(
        &mut self,
        object: &ObjectReference,
        c: &Container,
        reason: &str,
        message: String,
        next: &mut Option<Instant>,
    ) {
        self.shared.events.warning(object, "Failed", &format!("Error: {message}")).await;
        self.waiting.insert(c.name.clone(), Waiting { reason: reason.into(), message });
        wake_at(next, Instant::now() + BACKOFF_START);
    }

    /// Reports the pod's status from what the runtime shows. `ended`: the agent stopped the
    /// pod (node shutdown) and says so: Failed, with this reason and message.
    async fn publish(
        &mut self,
        pod: &Pod,
        observed: &HashMap<String, Observed>,
        init_done: bool,
        init_failed: bool,
        pod_ip: &str,
        ended: Option<(&str, &str)>,
    ) -> Result<()> {
        let spec = pod.spec.clone().unwrap_or_default();
        let app: Vec<(Observed, Option<Waiting>)> = spec
            .containers
            .iter()
            .map(|c| (observed.get(&c.name).cloned().unwrap_or_default(), self.waiting.get(&c.name).cloned()))
            .collect();
        let phase = if ended.is_some() { "Failed" } else { status::phase(pod, init_done, init_failed, &app) };
        let statuses: Vec<Value> = spec
            .containers
            .iter()
            .zip(&app)
            .map(|(c, (o, w))| {
                let id = o.latest.as_ref().map(|s| s.id.as_str()).unwrap_or_default();
                let status =
                    status::container_status(c, o, w.as_ref(), self.started(c, id), self.ready(c, id), !init_done);
                self.with_resources(c, o, status)
            })
            .collect();
        let init_statuses: Vec<Value> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| {
                let o = observed.get(&c.name).cloned().unwrap_or_default();
                if is_sidecar(c) {
                    let running = o.latest.as_ref().filter(|s| status::is_running(s)).map(|s| s.id.as_str());
                    let (started, ready) =
                        running.map_or((false, false), |id| (self.started(c, id), self.ready(c, id)));
                    let status = status::container_status(c, &o, self.waiting.get(&c.name), started, ready, true);
                    return self.with_resources(c, &o, status);
                }
                // An init container that has completed counts as ready (upstream's kubelet).
                let done = o.latest.as_ref().is_some_and(|s| status::is_exited(s) && s.exit_code == 0);
                let mut s = status::container_status(c, &o, self.waiting.get(&c.name), true, false, true);
                if done && !self.waiting.contains_key(&c.name) {
                    s["ready"] = json!(true);
                }
                s
            })
            .collect();
        let ephemeral_statuses: Vec<Value> = spec
            .ephemeral_containers
            .iter()
            .flatten()
            .filter_map(|ec| {
                let c = ephemeral_as_container(ec)?;
                let o = observed.get(&c.name).cloned().unwrap_or_default();
                let id = o.latest.as_ref().map(|s| s.id.clone()).unwrap_or_default();
                // Never ready: nothing probes an ephemeral container.
                Some(status::container_status(&c, &o, self.waiting.get(&c.name), !id.is_empty(), false, false))
            })
            .collect();
        // Upstream's messages name the containers holding a condition back; sidecars'
        // readiness counts towards the pod's, as upstream's.
        let init: Vec<(&Container, &Value)> = spec.init_containers.iter().flatten().zip(&init_statuses).collect();
        let names = |list: &[&Value]| {
            let names: Vec<&str> = list.iter().filter_map(|s| s["name"].as_str()).collect();
            format!("[{}]", names.join(" "))
        };
        let incomplete: Vec<&Value> = init
            .iter()
            .filter(
                |(c, s)| if is_sidecar(c) { s["started"] != true } else { s["state"]["terminated"]["exitCode"] != 0 },
            )
            .map(|(_, s)| *s)
            .collect();
        let sidecars = init.iter().filter(|(c, _)| is_sidecar(c)).map(|(_, s)| *s);
        let unready: Vec<&Value> = sidecars.chain(&statuses).filter(|s| s["ready"] != true).collect();
        let all_ready = unready.is_empty() && phase == "Running";
        let (incomplete, unready) = (names(&incomplete), names(&unready));
        let not_initialized = format!("containers with incomplete status: {incomplete}");
        let not_ready = format!("containers with unready status: {unready}");
        let previous = self.published.as_ref();
        let start_time = previous
            .and_then(|p| p.get("startTime").cloned())
            .filter(|t| !t.is_null())
            .unwrap_or_else(|| json!(status::time(nanos_now())));
        let host_ip = &self.shared.node_ip;
        let mut status = json!({
            "phase": phase,
            "conditions": [
                status::condition("PodReadyToStartContainers", !pod_ip.is_empty() || phase == "Running", None),
                status::condition("Initialized", init_done, Some(("ContainersNotInitialized", &not_initialized))),
                status::condition("Ready", all_ready, Some(("ContainersNotReady", &not_ready))),
                status::condition("ContainersReady", all_ready, Some(("ContainersNotReady", &not_ready))),
                status::condition("PodScheduled", true, None),
            ],
            "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
            "startTime": start_time,
            "qosClass": status::qos_class(pod),
            "containerStatuses": statuses,
        });
        // The pod generation this status describes (upstream's observedGeneration, on the
        // status and on each condition the agent owns).
        if let Some(generation) = pod.metadata.generation {
            status["observedGeneration"] = json!(generation);
            for condition in status["conditions"].as_array_mut().into_iter().flatten() {
                if condition["type"] != "PodScheduled" {
                    condition["observedGeneration"] = json!(generation);
                }
            }
        }
        if !pod_ip.is_empty() {
            status["podIP"] = json!(pod_ip);
            status["podIPs"] = json!([{"ip": pod_ip}]);
        }
        if !init_statuses.is_empty() {
            status["initContainerStatuses"] = json!(init_statuses);
        }
        if !ephemeral_statuses.is_empty() {
            status["ephemeralContainerStatuses"] = json!(ephemeral_statuses);
        }
        if let Some((reason, message)) = ended {
            status["reason"] = json!(reason);
            status["message"] = json!(message);
        }
        // Stopped for the node's shutdown: a disruption, which controllers replace.
        if let Some((_, message)) = ended.filter(|(reason, _)| *reason == SHUTDOWN_REASON) {
            let mut target = status::condition("DisruptionTarget", true, None);
            target["reason"] = json!("TerminationByKubelet");
            target["message"] = json!(message);
            status["conditions"].as_array_mut().into_iter().for_each(|c| c.push(target.clone()));
        }
        let force = self.republish.swap(false, Ordering::Relaxed);
        if !force && Some(&status) == self.published.as_ref() {
            return Ok(());
        }
        // Condition transition times change only when the status does.
        let now = status::time(nanos_now());
        if let Some(conditions) = status["conditions"].as_array_mut() {
            for c in conditions {
                let before = previous
                    .and_then(|p| p["conditions"].as_array())
                    .and_then(|l| l.iter().find(|x| x["type"] == c["type"]));
                let time = match before {
                    Some(b) if b["status"] == c["status"] => b["lastTransitionTime"].clone(),
                    _ => json!(now),
                };
                c["lastTransitionTime"] = time;
            }
        }
        if !force && Some(&status) == self.published.as_ref() {
            return Ok(());
        }
        self.write_status(pod, status).await
    }

    /// Merges `status` into the pod's status in the API and remembers it as published.
    async fn write_status(&mut self, pod: &Pod, status: Value) -> Result<()> {
        let (ns, name, _) = spec::pod_key(pod);
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &ns);
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": status})))
            .await
            .with_context(|| format!("reporting the status of pod {ns}/{name}"))?;
        self.published = Some(status);
        Ok(())
    }

    /// Refuses to run a pod, as upstream's kubelet does: a Warning event, and the pod
    /// Failed with `reason` before any of it ran.
    async fn reject(&mut self, pod: &Pod, reason: &str, message: &str) -> Result<()> {
        self.shared.events.warning(&reference(pod, None), reason, message).await;
        let status = json!({"phase": "Failed", "reason": reason, "message": format!("Pod was rejected: {message}"), "qosClass": status::qos_class(pod)});
        tracing::info!(pod = %spec::pod_key(pod).1, reason, message, "rejected a pod");
        self.write_status(pod, status).await
    }

    /// Stops the pod for the node's shutdown: its containers within `grace` (or the pod's
    /// own shorter grace period), then its sandbox, and reports it Failed as upstream does.
    /// Stops a pod's containers (within `grace` and its own grace period) and reports it
    /// Failed for `why` (reason, message): the node shutting down, or its deadline.
    async fn stop_pod(&mut self, pod: &Pod, grace: Duration, why: (&str, &str)) -> Result<()> {
        let own = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30);
        let grace = own.min(grace.as_secs() as i64);
        self.stop_containers(grace).await;
        let sandboxes = self.sandboxes().await?;
        let Some(sandbox) = sandboxes.last() else { return Ok(()) };
        let _ = self
            .cri()
            .runtime
            .stop_pod_sandbox(api::StopPodSandboxRequest { pod_sandbox_id: sandbox.id.clone() })
            .await;
        let observed = self.observe(pod, &sandbox.id).await?;
        let init_done = self
            .published
            .as_ref()
            .and_then(|p| p["conditions"].as_array()?.iter().find(|c| c["type"] == "Initialized").cloned())
            .is_none_or(|c| c["status"] == "True");
        let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        // No later pass prunes the probes of a terminal pod.
        self.probers = Probers::default();
        self.publish(pod, &observed, init_done, false, &pod_ip, Some(why)).await
    }

    /// Stops the pod's containers (SIGTERM, SIGKILL after `grace` seconds) and removes its
    /// sandboxes with them.
    async fn teardown(&mut self, grace: i64) {
        let Ok(sandboxes) = self.sandboxes().await else { return };
        let containers = self.stop_containers(grace).await;
        self.shared.catalog.set_host_ports(&self.uid, vec![]);
        self.shared.host_ports.release(&self.uid);
        for s in &sandboxes {
            self.remove_sandbox(&s.id).await;
        }
        for c in &containers {
            self.shared.disown(&c.id);
        }
        volumes::tear_down(&self.shared.volume_root, &self.uid, &self.shared.cri.socket);
    }

    /// Stops the pod's running containers: each one's preStop hook, then SIGTERM, then
    /// SIGKILL once `grace` seconds have passed since the start. Returns every container
    /// of the pod.
    async fn stop_containers(&self, grace: i64) -> Vec<api::Container> {
        let containers = self.cri().containers_labelled(&[(spec::POD_UID, &self.uid)]).await.unwrap_or_default();
        let pod = self.last.clone();
        let pod_ip = pod.as_ref().and_then(|p| p.status.as_ref()?.pod_ip.clone()).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(grace.max(0) as u64);
        let stops = containers.iter().filter(|c| c.state == api::ContainerState::ContainerRunning as i32).map(|c| {
            let mut cri = self.cri();
            let id = c.id.clone();
            let name = c.labels.get(spec::CONTAINER_NAME).cloned().unwrap_or_default();
            // The preStop hook runs first, within the grace period; the stop gets the rest.
            let hook = pod.as_ref().filter(|_| grace > 0).and_then(|p| {
                let spec = p.spec.as_ref()?.containers.iter().find(|s| s.name == name)?;
                let hook = spec.lifecycle.as_ref()?.pre_stop.clone()?;
                Some((self.target(p, spec, &id, &pod_ip), hook, container_ref(p, spec, Role::App)))
            });
            let events = self.shared.events.clone();
            async move {
                if let Some((target, hook, object)) = hook {
                    if let Err(message) =
                        probe::run_hook(&target, &hook, deadline.saturating_duration_since(Instant::now())).await
                    {
                        events.warning(&object, "FailedPreStopHook", &message).await;
                    }
                }
                let left = deadline.saturating_duration_since(Instant::now()).as_secs() as i64;
                cri.runtime.stop_container(api::StopContainerRequest { container_id: id, timeout: left }).await
            }
        });
        futures::future::join_all(stops).await;
        containers
    }

    /// Tells the API the pod's containers are gone, so its object can go.
    async fn finish_deletion(&self, pod: &Pod) {
        let (ns, name, uid) = spec::pod_key(pod);
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &ns);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
            ..Default::default()
        };
        if let Err(e) = krate_client::tolerate(api.delete(&name, &params).await, &[404, 409]) {
            tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "finishing a pod deletion failed");
        }
    }
}

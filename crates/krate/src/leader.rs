//! Leader election through a coordination.k8s.io Lease, as upstream's components do it:
//! whoever holds an unexpired Lease runs the work; the others wait and take over when
//! the holder stops renewing. Expiry is judged by when *this* process last saw the Lease
//! change (not by the holder's clock), so clock skew between machines does not matter.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use serde_json::json;

/// Timing of an election (upstream's defaults: 15 s lease, 10 s renew deadline, 2 s retry).
#[derive(Clone, Debug)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

pub struct Election {
    leases: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
}

/// A unique identity for this process: host name plus a random suffix, as upstream.
pub fn identity() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{}_{:08x}{:04x}", host_name(), nanos, std::process::id() & 0xffff)
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "krate".into())
}

fn micro_now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// What a candidate remembers of the Lease: its version and when it was seen to change.
struct Observed {
    resource_version: String,
    at: Instant,
}

impl Election {
    /// An election for Lease `kube-system/<name>`.
    pub fn new(client: kube::Client, name: &str, identity: String, timing: Timing) -> Self {
        Self { leases: Api::namespaced(client, "kube-system"), name: name.into(), identity, timing }
    }

    /// Runs `work` whenever this process leads (started again if it stops while this
    /// process still leads); when leadership is lost the work is dropped (stopped) and
    /// the process campaigns again. Never returns.
    pub async fn run<F, Fut>(&self, work: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        loop {
            self.acquire().await;
            tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
            tokio::select! {
                _ = krate_client::supervised(&self.name, &work) => {}
                lost = self.keep_renewing() => tracing::error!(lease = %self.name, reason = %lost, "lost leadership; stopping work"),
            }
        }
    }

    /// Waits until this process holds the Lease.
    async fn acquire(&self) {
        let mut observed: Option<Observed> = None;
        let mut announced = false;
        loop {
            match self.try_acquire(&mut observed).await {
                Ok(true) => return,
                Ok(false) => {
                    if !announced {
                        tracing::info!(lease = %self.name, "another instance leads; waiting to take over");
                        announced = true;
                    }
                }
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// One attempt: create the Lease, keep it, or take it over once it has expired.
    async fn try_acquire(&self, observed: &mut Option<Observed>) -> Result<bool> {
        let now = micro_now();
        let Some(mut lease) = self.leases.get_opt(&self.name).await? else {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": self.name, "namespace": "kube-system"},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.timing.lease_duration.as_secs(),
                         "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
            }))?;
            return Ok(self.leases.create(&PostParams::default(), &lease).await.is_ok());
        };
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        if observed.as_ref().is_none_or(|o| o.resource_version != rv) {
            *observed = Some(Observed { resource_version: rv, at: Instant::now() });
        }
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let duration =
            spec.lease_duration_seconds.map_or(self.timing.lease_duration, |s| Duration::from_secs(s.max(0) as u64));
        let expired = observed.as_ref().is_some_and(|o| o.at.elapsed() > duration);
        if !holder.is_empty() && holder != self.identity && !expired {
            return Ok(false);
        }
        if holder != self.identity {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.acquire_time = Some(serde_json::from_value(json!(now))?);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.lease_duration_seconds = Some(self.timing.lease_duration.as_secs() as i32);
        spec.renew_time = Some(serde_json::from_value(json!(now))?);
        // The update carries the resourceVersion read above: of several candidates that
        // saw the Lease expire, exactly one wins.
        Ok(self.leases.replace(&self.name, &PostParams::default(), &lease).await.is_ok())
    }

    /// Renews the Lease until that fails for longer than the renew deadline or someone
    /// else holds it; returns why leadership was lost.
    async fn keep_renewing(&self) -> String {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            match self.renew().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => return "another instance holds the lease".into(),
                Err(e) if last_renewal.elapsed() > self.timing.renew_deadline => {
                    return format!("could not renew within the deadline: {e}")
                }
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "renewing the leader lease failed; retrying"),
            }
        }
    }

    async fn renew(&self) -> Result<bool> {
        let mut lease = self.leases.get(&self.name).await?;
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.renew_time = Some(serde_json::from_value(json!(micro_now()))?);
        self.leases.replace(&self.name, &PostParams::default(), &lease).await.map_err(|e| anyhow!(e))?;
        Ok(true)
    }
}

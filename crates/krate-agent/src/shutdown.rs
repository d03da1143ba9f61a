//! Graceful node shutdown, as upstream's kubelet does it: the node reports itself not
//! ready ("node is shutting down") and refuses new pods; the pods it runs are stopped,
//! regular pods first and critical pods last, each group within its share of the grace
//! period, and reported Failed with reason Terminated and a DisruptionTarget condition,
//! so that their controllers replace them elsewhere.
//!
//! Upstream learns of a shutdown from systemd-logind; krate is told through the agent's
//! control socket (`<agent dir>/control.sock`, root only) by `krate shutdown-node`, which a
//! systemd unit ordered before `shutdown.target` runs (see the README). Stopping or
//! restarting the agent itself stops nothing (fail-static).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::pods::{admission, Shared};

pub const CONTROL_SOCKET: &str = "control.sock";
const SHUTDOWN: &str = "shutdown";

/// `--shutdown-grace-period` and `--shutdown-grace-period-critical-pods`.
#[derive(Clone, Copy, Debug)]
pub struct ShutdownGrace {
    /// The whole shutdown: regular pods get this minus the critical pods' share.
    pub total: Duration,
    pub critical: Duration,
}

/// Stops every pod of the node for its shutdown, reporting progress line by line.
pub async fn shut_down(
    shared: &Arc<Shared>,
    grace: ShutdownGrace,
    progress: &mut (impl AsyncWriteExt + Unpin),
) -> Result<()> {
    if shared.shutting_down.send_replace(true) {
        progress.write_all(b"the node is already shutting down\n").await?;
    }
    tracing::warn!(total = ?grace.total, critical = ?grace.critical, "the node is shutting down: stopping its pods");
    let groups = [("regular", false, grace.total.saturating_sub(grace.critical)), ("critical", true, grace.critical)];
    for (kind, critical, period) in groups {
        let (count, stopped) = shared.stop_pods(|p| admission::is_critical(p) == critical, period);
        progress.write_all(format!("stopping {count} {kind} pod(s) within {}s\n", period.as_secs()).as_bytes()).await?;
        // A little beyond the grace period for reporting the statuses.
        if tokio::time::timeout(period + Duration::from_secs(5), stopped).await.is_err() {
            progress
                .write_all(format!("some {kind} pods did not stop within {}s; going on\n", period.as_secs()).as_bytes())
                .await?;
        }
    }
    progress.write_all(b"every pod of this node is stopped; the node can power off\n").await?;
    tracing::warn!("the node's pods are stopped for its shutdown");
    Ok(())
}

/// Serves the control socket: a client that sends `shutdown` starts the node's shutdown
/// and reads its progress until it is done.
pub async fn serve(dir: &Path, shared: Arc<Shared>, grace: ShutdownGrace) -> Result<()> {
    let path = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &shared, grace).await {
                tracing::warn!(error = %format!("{e:#}"), "a control socket client failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, shared: &Arc<Shared>, grace: ShutdownGrace) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    match line.trim() {
        SHUTDOWN => shut_down(shared, grace, &mut write).await,
        other => Ok(write
            .write_all(format!("error: unknown command {other:?}; the agent knows: {SHUTDOWN}\n").as_bytes())
            .await?),
    }
}

/// `krate shutdown-node`: asks the agent of `dir` to shut the node down; prints its
/// progress and returns when every pod is stopped.
pub async fn request(dir: &Path, out: &mut (impl std::io::Write + ?Sized)) -> Result<()> {
    let path = dir.join(CONTROL_SOCKET);
    let mut stream = UnixStream::connect(&path).await.with_context(|| {
        format!("connecting to the node agent at {} (is the agent running on this machine?)", path.display())
    })?;
    stream.write_all(format!("{SHUTDOWN}\n").as_bytes()).await?;
    let mut lines = BufReader::new(stream).lines();
    let mut last = String::new();
    while let Some(line) = lines.next_line().await? {
        writeln!(out, "{line}")?;
        last = line;
    }
    if last.starts_with("error:") || !last.contains("can power off") {
        anyhow::bail!("the agent did not finish the shutdown (its last word: {last:?})");
    }
    Ok(())
}

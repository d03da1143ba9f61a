//! Container log rotation (the seeds: bounded disk on the nodes; upstream's kubelet
//! `containerLogMaxSize` and `containerLogMaxFiles`, 10Mi and 5 by default). On every
//! housekeeping tick, each running container whose log has reached the size is rotated
//! as upstream does: the file is renamed `<log>.<YYYYMMDD-HHMMSS>` (UTC), the runtime is
//! asked to reopen its log (CRI ReopenContainerLog), and rotated files beyond
//! max-files − 1 are removed, oldest first. `kubectl logs` reads the current file, as
//! upstream. (Upstream also gzips the rotated files but the newest; these stay plain.)

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::cri::{api, Cri};
use crate::pods::spec::{MANAGED_BY, MANAGED_BY_AGENT};

/// When logs rotate and how many files a container keeps.
#[derive(Clone, Copy, Debug)]
pub struct LogRotation {
    /// Bytes a log may reach before it is rotated.
    pub max_size: u64,
    /// Files kept per container log, the current one included (at least 2).
    pub max_files: usize,
}

impl Default for LogRotation {
    fn default() -> Self {
        Self { max_size: 10 * 1024 * 1024, max_files: 5 }
    }
}

impl LogRotation {
    /// Rotates the logs of the running containers that need it; how many it rotated.
    pub async fn rotate(&self, cri: &mut Cri) -> Result<usize> {
        let containers = cri.containers_labelled(&[(MANAGED_BY, MANAGED_BY_AGENT)]).await?;
        let mut rotated = 0;
        for container in containers.iter().filter(|c| c.state == api::ContainerState::ContainerRunning as i32) {
            let request = api::ContainerStatusRequest { container_id: container.id.clone(), verbose: false };
            let Ok(status) = cri.runtime.container_status(request).await else { continue };
            let log = status.into_inner().status.map(|s| s.log_path).unwrap_or_default();
            if log.is_empty() {
                continue;
            }
            let log = PathBuf::from(log);
            if std::fs::metadata(&log).is_ok_and(|m| m.len() >= self.max_size)
                && self.rotate_one(cri, container, &log).await
            {
                rotated += 1;
            }
            if let Err(e) = remove_excess(&log, self.max_files) {
                tracing::warn!(log = %log.display(), error = %e, "removing old rotated logs failed");
            }
        }
        Ok(rotated)
    }

    async fn rotate_one(&self, cri: &mut Cri, container: &api::Container, log: &Path) -> bool {
        let stamp = jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string();
        let target = PathBuf::from(format!("{}.{stamp}", log.display()));
        if target.exists() || std::fs::rename(log, &target).is_err() {
            return false; // rotated this second already, or gone: the next tick sees it
        }
        let reopen = api::ReopenContainerLogRequest { container_id: container.id.clone() };
        if let Err(e) = cri.runtime.reopen_container_log(reopen).await {
            // The runtime still writes to the renamed file: give it its name back.
            let _ = std::fs::rename(&target, log);
            tracing::warn!(container = %container.id, error = %e, "reopening a rotated container log failed");
            return false;
        }
        true
    }
}

/// Removes the oldest rotated files of `log` beyond `max_files - 1`.
fn remove_excess(log: &Path, max_files: usize) -> std::io::Result<()> {
    let (Some(dir), Some(name)) = (log.parent(), log.file_name().and_then(|n| n.to_str())) else { return Ok(()) };
    let prefix = format!("{name}.");
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.file_name().and_then(|n| n.to_str()).is_some_and(|n| is_rotated(n, &prefix)))
        .collect();
    // The stamps sort as they were made.
    rotated.sort();
    let keep = max_files.saturating_sub(1).max(1);
    let excess = rotated.len().saturating_sub(keep);
    for old in &rotated[..excess] {
        std::fs::remove_file(old)?;
    }
    Ok(())
}

/// Whether `name` is `<prefix>YYYYMMDD-HHMMSS`.
fn is_rotated(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|stamp| {
        stamp.len() == 15 && stamp.char_indices().all(|(i, c)| if i == 8 { c == '-' } else { c.is_ascii_digit() })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_rotated_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        std::fs::write(&log, "current").unwrap();
        for stamp in ["20261204-100000", "20261204-100010", "20261204-100020", "20261204-100030"] {
            std::fs::write(dir.path().join(format!("0.log.{stamp}")), stamp).unwrap();
        }
        // Not rotations of 0.log: another restart's log and a stranger.
        std::fs::write(dir.path().join("1.log.20261204-090000"), "other").unwrap();
        std::fs::write(dir.path().join("0.log.bak"), "mine").unwrap();
        remove_excess(&log, 3).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(
            left,
            ["0.log", "0.log.20261204-100020", "0.log.20261204-100030", "0.log.bak", "1.log.20261204-090000"]
        );
    }
}

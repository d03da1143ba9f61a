//! Container log rotation (the seeds: bounded disk on the nodes; upstream's kubelet
//! `containerLogMaxSize` and `containerLogMaxFiles`, 10Mi and 5 by default). On every
//! housekeeping tick, each running container whose log has reached the size is rotated
//! as upstream does: the file is renamed `<log>.<YYYYMMDD-HHMMSS>` (UTC), the runtime is
//! asked to reopen its log (CRI ReopenContainerLog), and rotated files beyond
//! max-files − 1 are removed, oldest first. Rotated files but the newest are compressed
//! to `<log>.<stamp>.gz`, as upstream's kubelet does (written to a `.tmp` first, so a
//! crash leaves either the plain file or the whole archive). `kubectl logs` reads the
//! current file, as upstream.

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
            if let Err(e) = compress_older(&log) {
                tracing::warn!(log = %log.display(), error = %e, "compressing rotated logs failed");
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

/// The rotated files of `log` (plain or compressed), oldest first.
fn rotated_files(log: &Path) -> std::io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(name)) = (log.parent(), log.file_name().and_then(|n| n.to_str())) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.file_name().and_then(|n| n.to_str()).is_some_and(|n| is_rotated(n, &prefix)))
        .collect();
    // The stamps sort as they were made (a `.gz` after its stamp changes nothing).
    rotated.sort();
    Ok(rotated)
}

/// Compresses every plain rotated file of `log` but the newest.
fn compress_older(log: &Path) -> std::io::Result<()> {
    let rotated = rotated_files(log)?;
    let plain: Vec<&PathBuf> = rotated.iter().filter(|p| p.extension().is_none_or(|e| e != "gz")).collect();
    let newest = rotated.last();
    for path in plain.into_iter().filter(|p| Some(*p) != newest) {
        let target = PathBuf::from(format!("{}.gz", path.display()));
        let partial = PathBuf::from(format!("{}.gz.tmp", path.display()));
        let mut input = std::fs::File::open(path)?;
        let mut encoder =
            flate2::write::GzEncoder::new(std::fs::File::create(&partial)?, flate2::Compression::default());
        std::io::copy(&mut input, &mut encoder)?;
        encoder.finish()?.sync_all()?;
        std::fs::rename(&partial, &target)?;
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// Removes the oldest rotated files of `log` beyond `max_files - 1`.
fn remove_excess(log: &Path, max_files: usize) -> std::io::Result<()> {
    let rotated = rotated_files(log)?;
    let keep = max_files.saturating_sub(1).max(1);
    let excess = rotated.len().saturating_sub(keep);
    for old in &rotated[..excess] {
        std::fs::remove_file(old)?;
    }
    Ok(())
}

/// Whether `name` is `<prefix>YYYYMMDD-HHMMSS`, or that and `.gz`.
fn is_rotated(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).map(|rest| rest.strip_suffix(".gz").unwrap_or(rest)).is_some_and(|stamp| {
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

    #[test]
    fn rotated_files_but_the_newest_are_compressed_and_still_counted() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        std::fs::write(&log, "current").unwrap();
        for stamp in ["20261204-100000", "20261204-100010", "20261204-100020"] {
            std::fs::write(dir.path().join(format!("0.log.{stamp}")), format!("lines of {stamp}\n")).unwrap();
        }
        compress_older(&log).unwrap();
        let names = |d: &Path| {
            let mut names: Vec<String> =
                std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            names.sort();
            names
        };
        assert_eq!(
            names(dir.path()),
            ["0.log", "0.log.20261204-100000.gz", "0.log.20261204-100010.gz", "0.log.20261204-100020"]
        );
        let mut text = String::new();
        let archive = std::fs::File::open(dir.path().join("0.log.20261204-100010.gz")).unwrap();
        flate2::read::GzDecoder::new(archive).read_to_string(&mut text).unwrap();
        assert_eq!(text, "lines of 20261204-100010\n");
        // Compressed files count towards max-files and go first.
        remove_excess(&log, 3).unwrap();
        assert_eq!(names(dir.path()), ["0.log", "0.log.20261204-100010.gz", "0.log.20261204-100020"]);
    }
}

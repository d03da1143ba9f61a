//! Node pressure, as upstream's eviction manager sees it: the signals `memory.available`,
//! `nodefs.available`, `nodefs.inodesFree`, `imagefs.available`, `imagefs.inodesFree` and
//! `pid.available`, read off the machine and compared with the hard thresholds
//! (`--eviction-hard`), become the MemoryPressure, DiskPressure and PIDPressure
//! conditions. A condition stays true for the transition period after its signal last
//! crossed, so that a node hovering at a threshold does not flap.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::time::Instant;

/// Upstream's signals with k3s's disk thresholds: upstream's 10% and 15% would call a
/// big disk with tens of gigabytes free full.
pub const DEFAULT_EVICTION_HARD: &str =
    "memory.available<100Mi,nodefs.available<5%,nodefs.inodesFree<5%,imagefs.available<5%";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    MemoryAvailable,
    NodefsAvailable,
    NodefsInodesFree,
    ImagefsAvailable,
    ImagefsInodesFree,
    PidAvailable,
}

const SIGNALS: [(&str, Signal); 6] = [
    ("memory.available", Signal::MemoryAvailable),
    ("nodefs.available", Signal::NodefsAvailable),
    ("nodefs.inodesFree", Signal::NodefsInodesFree),
    ("imagefs.available", Signal::ImagefsAvailable),
    ("imagefs.inodesFree", Signal::ImagefsInodesFree),
    ("pid.available", Signal::PidAvailable),
];

impl Signal {
    fn name(self) -> &'static str {
        SIGNALS.iter().find(|(_, s)| *s == self).map(|(n, _)| *n).unwrap_or_default()
    }

    /// The node condition a crossing of this signal sets.
    pub fn condition(self) -> Condition {
        match self {
            Signal::MemoryAvailable => Condition::Memory,
            Signal::PidAvailable => Condition::Pid,
            _ => Condition::Disk,
        }
    }
}

/// The node's pressure conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Condition {
    Memory,
    Disk,
    Pid,
}

impl Condition {
    pub const ALL: [Condition; 3] = [Condition::Memory, Condition::Disk, Condition::Pid];

    pub fn type_name(self) -> &'static str {
        match self {
            Condition::Memory => "MemoryPressure",
            Condition::Disk => "DiskPressure",
            Condition::Pid => "PIDPressure",
        }
    }

    /// Upstream's (reason, message) for the condition when true and when false.
    pub fn reason_and_message(self, on: bool) -> (&'static str, &'static str) {
        match (self, on) {
            (Condition::Memory, true) => ("KubeletHasInsufficientMemory", "kubelet has insufficient memory available"),
            (Condition::Memory, false) => ("KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            (Condition::Disk, true) => ("KubeletHasDiskPressure", "kubelet has disk pressure"),
            (Condition::Disk, false) => ("KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            (Condition::Pid, true) => ("KubeletHasInsufficientPID", "kubelet has insufficient PID available"),
            (Condition::Pid, false) => ("KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Amount {
    /// An absolute quantity (bytes, inodes, PIDs).
    Quantity(f64),
    /// A percentage of the signal's capacity.
    Percent(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Threshold {
    pub signal: Signal,
    pub below: Amount,
}

/// Parses `--eviction-hard`: `signal<quantity` or `signal<percent%`, comma-separated.
pub fn parse_thresholds(text: &str) -> Result<Vec<Threshold>> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((name, value)) = item.split_once('<') else {
            bail!("eviction threshold {item:?} must look like signal<quantity (e.g. nodefs.available<10%)")
        };
        let Some(signal) = SIGNALS.iter().find(|(n, _)| *n == name.trim()).map(|(_, s)| *s) else {
            let known: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            bail!("unknown eviction signal {name:?}; known signals: {}", known.join(", "));
        };
        let value = value.trim();
        let below = match value.strip_suffix('%') {
            Some(p) => {
                let p: f64 =
                    p.parse().with_context(|| format!("eviction threshold {item:?}: {value:?} is not a percentage"))?;
                if !(0.0..=100.0).contains(&p) {
                    bail!("eviction threshold {item:?}: the percentage must be between 0% and 100%");
                }
                Amount::Percent(p)
            }
            None => Amount::Quantity(krate_api::quantity::parse(value).with_context(|| {
                format!("eviction threshold {item:?}: {value:?} is not a quantity (like 100Mi) or a percentage")
            })?),
        };
        out.push(Threshold { signal, below });
    }
    Ok(out)
}

/// A filesystem's size and what is left of it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FsStats {
    pub bytes: u64,
    pub bytes_available: u64,
    pub inodes: u64,
    pub inodes_free: u64,
}

impl FsStats {
    pub fn of(path: &Path) -> Option<FsStats> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some(FsStats {
            bytes: st.f_blocks * st.f_frsize,
            bytes_available: st.f_bavail * st.f_frsize,
            inodes: st.f_files,
            inodes_free: st.f_favail,
        })
    }

    /// Percent of the bytes in use, as the image garbage collector counts.
    pub fn used_percent(&self) -> f64 {
        if self.bytes == 0 {
            return 0.0;
        }
        100.0 - self.bytes_available as f64 * 100.0 / self.bytes as f64
    }
}

/// One reading of every signal: (capacity, available) per signal that could be read.
#[derive(Clone, Debug, Default)]
pub struct Observation(pub HashMap<Signal, (f64, f64)>);

/// A field of /proc/meminfo, in bytes.
pub(crate) fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Where the node's filesystems are: the agent's directory (nodefs) and the runtime's
/// image filesystem (imagefs; the same filesystem when krate runs its own containerd on
/// one disk, as upstream allows).
#[derive(Clone, Debug)]
pub struct Filesystems {
    pub nodefs: PathBuf,
    pub imagefs: PathBuf,
}

impl Filesystems {
    pub fn observe(&self) -> Observation {
        let mut signals = HashMap::new();
        if let (Some(total), Some(available)) = (meminfo("MemTotal"), meminfo("MemAvailable")) {
            signals.insert(Signal::MemoryAvailable, (total as f64, available as f64));
        }
        for (path, bytes, inodes) in [
            (&self.nodefs, Signal::NodefsAvailable, Signal::NodefsInodesFree),
            (&self.imagefs, Signal::ImagefsAvailable, Signal::ImagefsInodesFree),
        ] {
            if let Some(fs) = FsStats::of(path) {
                signals.insert(bytes, (fs.bytes as f64, fs.bytes_available as f64));
                // Filesystems without an inode table (btrfs, some tmpfs) report zero.
                if fs.inodes > 0 {
                    signals.insert(inodes, (fs.inodes as f64, fs.inodes_free as f64));
                }
            }
        }
        if let Some(pids) = pids() {
            signals.insert(Signal::PidAvailable, pids);
        }
        Observation(signals)
    }
}

/// (the most PIDs, PIDs still free): kernel.pid_max against the processes running.
fn pids() -> Option<(f64, f64)> {
    let max: f64 = std::fs::read_to_string("/proc/sys/kernel/pid_max").ok()?.trim().parse().ok()?;
    let running = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .count();
    Some((max, (max - running as f64).max(0.0)))
}

impl Observation {
    /// The thresholds this reading crosses, each with (available, limit).
    pub fn crossed<'a>(&self, thresholds: &'a [Threshold]) -> Vec<(&'a Threshold, f64, f64)> {
        thresholds
            .iter()
            .filter_map(|t| {
                let (capacity, available) = self.0.get(&t.signal)?;
                let limit = match t.below {
                    Amount::Quantity(q) => q,
                    Amount::Percent(p) => capacity * p / 100.0,
                };
                (*available < limit).then_some((t, *available, limit))
            })
            .collect()
    }
}

/// The pressure conditions over time: true from the first crossing until the transition
/// period has passed without one.
#[derive(Debug)]
pub struct Pressure {
    thresholds: Vec<Threshold>,
    transition_period: Duration,
    last_crossed: HashMap<Condition, Instant>,
}

impl Pressure {
    pub fn new(thresholds: Vec<Threshold>, transition_period: Duration) -> Self {
        Pressure { thresholds, transition_period, last_crossed: HashMap::new() }
    }

    /// Takes a reading in; returns the conditions now true.
    pub fn update(&mut self, observation: &Observation, now: Instant) -> Vec<Condition> {
        for (t, available, limit) in observation.crossed(&self.thresholds) {
            let condition = t.signal.condition();
            if self.last_crossed.insert(condition, now).is_none() {
                tracing::warn!(
                    signal = t.signal.name(), available = available as u64, threshold = limit as u64, condition = condition.type_name(),
                    "eviction threshold crossed: the node refuses new pods until the signal recovers (free some space or memory, or change --eviction-hard)"
                );
            }
        }
        self.last_crossed.retain(|_, at| now.duration_since(*at) < self.transition_period || *at == now);
        let mut on: Vec<Condition> = self.last_crossed.keys().copied().collect();
        on.sort();
        on
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_as_upstream_writes_them() {
        let t = parse_thresholds(DEFAULT_EVICTION_HARD).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(
            t[0],
            Threshold { signal: Signal::MemoryAvailable, below: Amount::Quantity(100.0 * 1024.0 * 1024.0) }
        );
        assert_eq!(t[1], Threshold { signal: Signal::NodefsAvailable, below: Amount::Percent(5.0) });
        assert!(parse_thresholds("").unwrap().is_empty());
        let e = parse_thresholds("disk.free<1Gi").unwrap_err().to_string();
        assert!(e.contains("unknown eviction signal \"disk.free\"") && e.contains("imagefs.available"), "{e}");
        assert!(parse_thresholds("nodefs.available>10%").unwrap_err().to_string().contains("signal<quantity"));
        assert!(parse_thresholds("nodefs.available<110%").is_err());
        assert!(parse_thresholds("memory.available<lots").unwrap_err().to_string().contains("not a quantity"));
    }

    #[test]
    fn crossings_set_conditions_that_outlast_them_by_the_transition_period() {
        let thresholds = parse_thresholds("memory.available<100,nodefs.available<10%").unwrap();
        let reading = |mem: f64, disk: f64| {
            Observation(HashMap::from([
                (Signal::MemoryAvailable, (1000.0, mem)),
                (Signal::NodefsAvailable, (1000.0, disk)),
            ]))
        };
        let mut p = Pressure::new(thresholds, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(p.update(&reading(500.0, 500.0), t0).is_empty());
        assert_eq!(p.update(&reading(500.0, 99.0), t0 + Duration::from_secs(10)), vec![Condition::Disk]);
        assert_eq!(
            p.update(&reading(50.0, 500.0), t0 + Duration::from_secs(20)),
            vec![Condition::Memory, Condition::Disk]
        );
        assert_eq!(p.update(&reading(500.0, 500.0), t0 + Duration::from_secs(75)), vec![Condition::Memory]);
        assert!(p.update(&reading(500.0, 500.0), t0 + Duration::from_secs(81)).is_empty());
        // No transition period: the condition follows the signal.
        let mut p = Pressure::new(parse_thresholds("nodefs.available<10%").unwrap(), Duration::ZERO);
        assert_eq!(p.update(&reading(500.0, 50.0), t0), vec![Condition::Disk]);
        assert!(p.update(&reading(500.0, 500.0), t0 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn unread_signals_never_cross() {
        let observation = Observation::default();
        assert!(observation.crossed(&parse_thresholds(DEFAULT_EVICTION_HARD).unwrap()).is_empty());
    }
}

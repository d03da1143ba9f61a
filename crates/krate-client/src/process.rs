//! The process metrics every upstream component serves on `/metrics` (Prometheus'
//! process collector names), read from /proc: what `krate soak` and operators watch
//! for growth in the API server and the node agents.

use std::fmt::Write;

/// Clock ticks per second of /proc/self/stat's times (USER_HZ, 100 on Linux ABIs).
const TICKS: f64 = 100.0;

/// Resident memory in bytes, from /proc/self/status.
fn resident_bytes(status: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? * 1024.0)
}

/// User plus system CPU seconds and the start time in ticks after boot, from
/// /proc/self/stat (fields 14, 15 and 22; the command name may hold spaces).
fn cpu_and_start(stat: &str) -> Option<(f64, f64)> {
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    Some(((ticks(14)? + ticks(15)?) / TICKS, ticks(22)?))
}

/// `process_*` metrics of this process, in the Prometheus text format.
pub fn render() -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    if let Some(rss) = std::fs::read_to_string("/proc/self/status").ok().as_deref().and_then(resident_bytes) {
        gauge("process_resident_memory_bytes", "Resident memory size in bytes.", "gauge", rss);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge("process_open_fds", "Number of open file descriptors.", "gauge", fds.count() as f64);
    }
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    if let Some((cpu, start_ticks)) = stat.as_deref().and_then(cpu_and_start) {
        gauge("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", "counter", cpu);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("btime ")).and_then(|l| l[6..].trim().parse::<f64>().ok()));
        if let Some(boot) = boot {
            let start = boot + start_ticks / TICKS;
            gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                "gauge",
                start,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_read_from_proc() {
        assert_eq!(resident_bytes("Name:\tkrate\nVmRSS:\t  2048 kB\n"), Some(2048.0 * 1024.0));
        let stat = "123 (krate server) S 1 123 123 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 5000 1000 200";
        assert_eq!(cpu_and_start(stat), Some((3.0, 5000.0)));
    }

    #[test]
    fn this_process_has_memory_and_descriptors() {
        let text = render();
        assert!(text.contains("process_resident_memory_bytes ") && text.contains("process_open_fds "), "{text}");
    }
}

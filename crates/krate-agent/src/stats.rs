//! Resource usage of the node and its containers, as the kubelet publishes it for
//! metrics pipelines: `/metrics/resource` (Prometheus text with cumulative CPU seconds
//! and working-set memory, what metrics-server and krate's metrics API scrape) and
//! `/stats/summary` (the summary API's JSON). Containers' figures come from the runtime
//! (CRI `ListContainerStats`), the node's from /proc (CPU time of all processors but
//! idle and I/O wait, memory in use as total less available), so both cgroup versions
//! are covered.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::cri::{api, Cri};
use crate::pods::spec;

/// CPU time and memory of one thing at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Nanoseconds since the epoch.
    pub timestamp: i64,
    pub cpu_nanoseconds: u64,
    pub working_set_bytes: u64,
}

/// One running container's usage.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerUsage {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub container: String,
    /// Nanoseconds since the epoch.
    pub started: i64,
    pub usage: Usage,
}

/// The node's and its running containers' usage.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub node: Usage,
    pub containers: Vec<ContainerUsage>,
}

fn now_nanos() -> i64 {
    jiff::Timestamp::now().as_nanosecond() as i64
}

/// CPU nanoseconds spent by all processors, except idle and I/O wait (`/proc/stat`).
fn node_cpu(proc_stat: &str) -> Option<u64> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    // USER_HZ is 100 on every Linux ABI krate runs on.
    Some((total - idle) * 10_000_000)
}

/// Memory in use, total less available (`/proc/meminfo`, in kB).
fn node_memory(meminfo: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    };
    Some(field("MemTotal:")?.saturating_sub(field("MemAvailable:")?))
}

/// Reads the node's and the running containers' usage.
pub async fn collect(cri: &mut Cri) -> Result<Snapshot> {
    let timestamp = now_nanos();
    let proc_stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let node = Usage {
        timestamp,
        cpu_nanoseconds: node_cpu(&proc_stat).unwrap_or(0),
        working_set_bytes: node_memory(&meminfo).unwrap_or(0),
    };
    let running = api::ContainerFilter {
        state: Some(api::ContainerStateValue { state: api::ContainerState::ContainerRunning as i32 }),
        ..Default::default()
    };
    let started: BTreeMap<String, i64> = cri
        .containers(running)
        .await
        .context("listing containers")?
        .into_iter()
        .map(|c| (c.id, c.created_at))
        .collect();
    let stats = cri
        .runtime
        .list_container_stats(api::ListContainerStatsRequest { filter: None })
        .await
        .context("reading container stats")?
        .into_inner()
        .stats;
    let mut containers = Vec::new();
    for stat in stats {
        let Some(attributes) = &stat.attributes else { continue };
        let Some(&started) = started.get(&attributes.id) else { continue };
        let label = |key: &str| attributes.labels.get(key).cloned().unwrap_or_default();
        let (Some(cpu), Some(memory)) = (&stat.cpu, &stat.memory) else { continue };
        let Some(cpu_nanoseconds) = cpu.usage_core_nano_seconds.as_ref().map(|v| v.value) else { continue };
        containers.push(ContainerUsage {
            namespace: label(spec::POD_NAMESPACE),
            pod: label(spec::POD_NAME),
            pod_uid: label(spec::POD_UID),
            container: label(spec::CONTAINER_NAME),
            started,
            usage: Usage {
                timestamp: if cpu.timestamp > 0 { cpu.timestamp } else { timestamp },
                cpu_nanoseconds,
                working_set_bytes: memory.working_set_bytes.as_ref().map_or(0, |v| v.value),
            },
        });
    }
    containers.sort_by(|a, b| (&a.namespace, &a.pod, &a.container).cmp(&(&b.namespace, &b.pod, &b.container)));
    Ok(Snapshot { node, containers })
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `/metrics/resource`: the kubelet's resource metrics (stable names), timestamps in
/// milliseconds.
pub fn render_resource_metrics(snapshot: &Snapshot) -> String {
    let seconds = |ns: u64| (ns as f64 / 1e9).to_string();
    let mut out = String::new();
    let (node, containers, pods) = (&snapshot.node, &snapshot.containers, pods(snapshot));
    let each_container = |value: &dyn Fn(&ContainerUsage) -> String| {
        containers.iter().map(|c| (container_labels(c), value(c), c.usage.timestamp)).collect::<Vec<_>>()
    };
    let each_pod = |value: &dyn Fn(&Usage) -> String| {
        let labels = |(namespace, pod): &(String, String)| {
            format!("namespace=\"{}\",pod=\"{}\"", escape(namespace), escape(pod))
        };
        pods.iter().map(|(key, usage)| (labels(key), value(usage), usage.timestamp)).collect::<Vec<_>>()
    };
    family(
        &mut out,
        (
            "container_cpu_usage_seconds_total",
            "Cumulative cpu time consumed by the container in core-seconds",
            "counter",
        ),
        each_container(&|c| seconds(c.usage.cpu_nanoseconds)),
    );
    family(
        &mut out,
        ("container_memory_working_set_bytes", "Current working set of the container in bytes", "gauge"),
        each_container(&|c| c.usage.working_set_bytes.to_string()),
    );
    family(
        &mut out,
        ("container_start_time_seconds", "Start time of the container since unix epoch in seconds", "gauge"),
        each_container(&|c| (c.started as f64 / 1e9).to_string()),
    );
    family(
        &mut out,
        ("node_cpu_usage_seconds_total", "Cumulative cpu time consumed by the node in core-seconds", "counter"),
        [(String::new(), seconds(node.cpu_nanoseconds), node.timestamp)],
    );
    family(
        &mut out,
        ("node_memory_working_set_bytes", "Current working set of the node in bytes", "gauge"),
        [(String::new(), node.working_set_bytes.to_string(), node.timestamp)],
    );
    family(
        &mut out,
        ("pod_cpu_usage_seconds_total", "Cumulative cpu time consumed by the pod in core-seconds", "counter"),
        each_pod(&|u| seconds(u.cpu_nanoseconds)),
    );
    family(
        &mut out,
        ("pod_memory_working_set_bytes", "Current working set of the pod in bytes", "gauge"),
        each_pod(&|u| u.working_set_bytes.to_string()),
    );
    family(
        &mut out,
        ("resource_scrape_error", "1 if there was an error while getting container metrics, 0 otherwise", "gauge"),
        [],
    );
    out.push_str("resource_scrape_error 0\n");
    out
}

/// One metric family: its HELP and TYPE lines (name, help, type), then a sample per
/// (labels, value, timestamp in nanoseconds), the timestamp written in milliseconds.
fn family(
    out: &mut String,
    (name, help, kind): (&str, &str, &str),
    samples: impl IntoIterator<Item = (String, String, i64)>,
) {
    let _ = writeln!(out, "# HELP {name} [STABLE] {help}\n# TYPE {name} {kind}");
    for (labels, value, at) in samples {
        let labels = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}{labels} {value} {}", at / 1_000_000);
    }
}

fn container_labels(c: &ContainerUsage) -> String {
    format!("container=\"{}\",namespace=\"{}\",pod=\"{}\"", escape(&c.container), escape(&c.namespace), escape(&c.pod))
}

/// Each pod's containers summed, by namespace and name.
fn pods(snapshot: &Snapshot) -> BTreeMap<(String, String), Usage> {
    let mut pods: BTreeMap<(String, String), Usage> = BTreeMap::new();
    for c in &snapshot.containers {
        let entry = pods.entry((c.namespace.clone(), c.pod.clone())).or_default();
        entry.timestamp = entry.timestamp.max(c.usage.timestamp);
        entry.cpu_nanoseconds += c.usage.cpu_nanoseconds;
        entry.working_set_bytes += c.usage.working_set_bytes;
    }
    pods
}

/// The previous snapshot, for the summary's CPU rates.
#[derive(Default)]
pub struct Rates(Mutex<Option<Snapshot>>);

fn rfc3339(nanos: i64) -> String {
    jiff::Timestamp::from_nanosecond(nanos as i128).map(|t| t.to_string()).unwrap_or_default()
}

impl Rates {
    /// `/stats/summary` for `node`: cumulative CPU, and cores in use since the previous
    /// summary (when there was one).
    pub fn summary(&self, node: &str, snapshot: &Snapshot) -> Value {
        let previous = self.0.lock().expect("stats lock").replace(snapshot.clone());
        let rate = |now: &Usage, before: Option<&Usage>| -> Option<u64> {
            let before = before?;
            let (dt, dc) = (now.timestamp - before.timestamp, now.cpu_nanoseconds.checked_sub(before.cpu_nanoseconds)?);
            (dt > 0).then(|| (dc as f64 * 1e9 / dt as f64) as u64)
        };
        let usage = |now: &Usage, before: Option<&Usage>| {
            let mut cpu = json!({"time": rfc3339(now.timestamp), "usageCoreNanoSeconds": now.cpu_nanoseconds});
            if let Some(cores) = rate(now, before) {
                cpu["usageNanoCores"] = json!(cores);
            }
            (cpu, json!({"time": rfc3339(now.timestamp), "workingSetBytes": now.working_set_bytes}))
        };
        let (cpu, memory) = usage(&snapshot.node, previous.as_ref().map(|p| &p.node));
        let mut by_pod: BTreeMap<(String, String), Vec<&ContainerUsage>> = BTreeMap::new();
        for c in &snapshot.containers {
            by_pod.entry((c.namespace.clone(), c.pod.clone())).or_default().push(c);
        }
        let totals = pods(snapshot);
        let previous_totals = previous.as_ref().map(pods).unwrap_or_default();
        let pod_stats: Vec<Value> = by_pod
            .iter()
            .map(|(key, containers)| {
                let containers_json: Vec<Value> = containers
                    .iter()
                    .map(|c| {
                        let before = previous.as_ref().and_then(|p| {
                            p.containers.iter().find(|b| {
                                b.pod_uid == c.pod_uid && b.container == c.container && b.started == c.started
                            })
                        });
                        let (cpu, memory) = usage(&c.usage, before.map(|b| &b.usage));
                        json!({"name": c.container, "startTime": rfc3339(c.started), "cpu": cpu, "memory": memory})
                    })
                    .collect();
                let (cpu, memory) = usage(&totals[key], previous_totals.get(key));
                let first = containers[0];
                json!({"podRef": {"name": first.pod, "namespace": first.namespace, "uid": first.pod_uid},
                    "startTime": rfc3339(containers.iter().map(|c| c.started).min().unwrap_or_default()),
                    "containers": containers_json, "cpu": cpu, "memory": memory})
            })
            .collect();
        json!({"node": {"nodeName": node, "cpu": cpu, "memory": memory}, "pods": pod_stats})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_usage_comes_from_proc() {
        let stat = "cpu  100 0 50 1000 20 0 0 0 0 0\ncpu0 100 0 50 1000 20 0 0 0 0 0\n";
        assert_eq!(node_cpu(stat), Some(150 * 10_000_000), "user + system, idle and iowait left out");
        let meminfo = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    400 kB\n";
        assert_eq!(node_memory(meminfo), Some(600 * 1024));
    }

    fn snapshot(at_seconds: i64, cpu_seconds: u64) -> Snapshot {
        let usage = Usage {
            timestamp: at_seconds * 1_000_000_000,
            cpu_nanoseconds: cpu_seconds * 1_000_000_000,
            working_set_bytes: 4096,
        };
        let container = |name: &str| ContainerUsage {
            namespace: "default".into(),
            pod: "burn".into(),
            pod_uid: "u1".into(),
            container: name.into(),
            started: 1_000_000_000,
            usage,
        };
        Snapshot { node: usage, containers: vec![container("a"), container("b")] }
    }

    #[test]
    fn resource_metrics_carry_the_kubelets_names_and_pods_sum_their_containers() {
        let text = render_resource_metrics(&snapshot(10, 3));
        assert!(
            text.contains(
                "container_cpu_usage_seconds_total{container=\"a\",namespace=\"default\",pod=\"burn\"} 3 10000\n"
            ),
            "{text}"
        );
        assert!(text.contains("pod_cpu_usage_seconds_total{namespace=\"default\",pod=\"burn\"} 6 10000\n"), "{text}");
        assert!(
            text.contains("pod_memory_working_set_bytes{namespace=\"default\",pod=\"burn\"} 8192 10000\n"),
            "{text}"
        );
        assert!(text.contains("node_memory_working_set_bytes 4096 10000\n"), "{text}");
    }

    #[test]
    fn the_summary_has_rates_from_the_second_call_on() {
        let rates = Rates::default();
        let first = rates.summary("n1", &snapshot(10, 3));
        assert!(first["node"]["cpu"].get("usageNanoCores").is_none());
        let second = rates.summary("n1", &snapshot(20, 8));
        assert_eq!(second["node"]["cpu"]["usageNanoCores"], 500_000_000, "5 CPU seconds in 10 s");
        assert_eq!(second["pods"][0]["cpu"]["usageNanoCores"], 1_000_000_000, "two containers at half a core");
        assert_eq!(second["pods"][0]["containers"][1]["name"], "b");
    }
}

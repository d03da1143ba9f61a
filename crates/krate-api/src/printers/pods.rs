//! Pods: upstream's STATUS reason, readiness and restarts.

use serde_json::{json, Value};

use super::{age, count, human_duration, int, integer, name, or_none, s, seconds_since, string, Printer, AGE, NAME};
use crate::object::{get, get_str};

pub const PODS: Printer = Printer {
    columns: &[
        NAME,
        string("Ready", 0),
        string("Status", 0),
        integer("Restarts", 0),
        AGE,
        string("IP", 1),
        string("Node", 1),
        string("Nominated Node", 1),
        string("Readiness Gates", 1),
    ],
    cells: pod_cells,
};

fn pod_cells(obj: &Value) -> Vec<Value> {
    let pod = pod_summary(obj);
    let restarts = match pod.last_restart {
        Some(ago) => format!("{} ({} ago)", pod.restarts, human_duration(ago)),
        None => pod.restarts.to_string(),
    };
    let gates = count(obj, &["spec", "readinessGates"]);
    vec![
        name(obj),
        json!(format!("{}/{}", pod.ready, pod.total)),
        json!(pod.reason),
        json!(restarts),
        json!(age(obj)),
        json!(or_none(s(obj, &["status", "podIP"]))),
        json!(or_none(s(obj, &["spec", "nodeName"]))),
        json!(or_none(s(obj, &["status", "nominatedNodeName"]))),
        json!(if gates == 0 { "<none>".to_string() } else { format!("0/{gates}") }),
    ]
}

/// What the pod row shows: upstream's STATUS reason, readiness and restarts.
struct PodSummary {
    reason: String,
    ready: i64,
    total: i64,
    restarts: i64,
    /// Seconds since the last container restart, if any.
    last_restart: Option<i64>,
}

fn pod_summary(pod: &Value) -> PodSummary {
    let statuses = |key: &str| get(pod, &["status", key]).and_then(Value::as_array).cloned().unwrap_or_default();
    let mut reason =
        get_str(pod, &["status", "reason"]).or(get_str(pod, &["status", "phase"])).unwrap_or("Pending").to_string();
    let init = statuses("initContainerStatuses");
    let total_init = get(pod, &["spec", "initContainers"]).and_then(Value::as_array).map_or(0, Vec::len);
    let mut restarts = 0;
    let mut initializing = false;
    for (i, c) in init.iter().enumerate() {
        restarts += int(c, &["restartCount"]);
        if let Some(t) = c.pointer("/state/terminated") {
            if int(t, &["exitCode"]) == 0 {
                continue;
            }
            reason = match get_str(t, &["reason"]) {
                Some(r) if !r.is_empty() => format!("Init:{r}"),
                _ => format!("Init:ExitCode:{}", int(t, &["exitCode"])),
            };
        } else if let Some(r) = c
            .pointer("/state/waiting/reason")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty() && *r != "PodInitializing")
        {
            reason = format!("Init:{r}");
        } else {
            reason = format!("Init:{i}/{total_init}");
        }
        initializing = true;
        break;
    }
    let containers = statuses("containerStatuses");
    let total = get(pod, &["spec", "containers"]).and_then(Value::as_array).map_or(0, Vec::len) as i64;
    let mut ready = 0;
    let mut last_restart: Option<String> = None;
    if !initializing {
        let mut running = false;
        for c in containers.iter().rev() {
            restarts += int(c, &["restartCount"]);
            if let Some(t) = c.pointer("/lastState/terminated/finishedAt").and_then(Value::as_str) {
                if last_restart.as_deref().is_none_or(|l| t > l) {
                    last_restart = Some(t.to_string());
                }
            }
            if let Some(r) = c.pointer("/state/waiting/reason").and_then(Value::as_str).filter(|r| !r.is_empty()) {
                reason = r.to_string();
            } else if let Some(t) = c.pointer("/state/terminated") {
                reason = match get_str(t, &["reason"]) {
                    Some(r) if !r.is_empty() => r.to_string(),
                    _ => format!("ExitCode:{}", int(t, &["exitCode"])),
                };
            } else if c.pointer("/state/running").is_some() && c.get("ready") == Some(&Value::Bool(true)) {
                running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && running {
            reason = "Running".into();
        }
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        reason = if get_str(pod, &["status", "reason"]) == Some("NodeLost") {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    let last_restart = last_restart.as_deref().and_then(seconds_since).filter(|_| restarts > 0);
    PodSummary { reason, ready, total, restarts, last_restart }
}

//! The pod status the agent reports, derived from what the runtime says about the pod's
//! containers (upstream's kubelet status rules: container states, phase, conditions,
//! QoS class).

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{json, Value};

use crate::cri::api;

/// The runtime's view of one container of the pod: its latest attempt and the one before.
#[derive(Default, Clone)]
pub struct Observed {
    pub latest: Option<api::ContainerStatus>,
    pub previous: Option<api::ContainerStatus>,
}

/// Why a container is not running yet (image pull back-off, crash loop, create error).
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

pub fn time(nanos: i64) -> String {
    jiff::Timestamp::from_nanosecond(nanos as i128)
        .ok()
        .and_then(|t| t.round(jiff::Unit::Second).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

pub fn is_running(s: &api::ContainerStatus) -> bool {
    s.state == api::ContainerState::ContainerRunning as i32
}

pub fn is_exited(s: &api::ContainerStatus) -> bool {
    s.state == api::ContainerState::ContainerExited as i32
}

pub fn restart_count(s: &api::ContainerStatus) -> u32 {
    s.metadata.as_ref().map(|m| m.attempt).unwrap_or(0)
}

fn terminated(s: &api::ContainerStatus) -> Value {
    let reason = if !s.reason.is_empty() {
        s.reason.clone()
    } else if s.exit_code == 0 {
        "Completed".into()
    } else {
        "Error".into()
    };
    let mut t = json!({
        "exitCode": s.exit_code, "reason": reason, "containerID": format!("containerd://{}", s.id),
        "startedAt": if s.started_at > 0 { json!(time(s.started_at)) } else { Value::Null },
        "finishedAt": time(s.finished_at),
    });
    if !s.message.is_empty() {
        t["message"] = json!(s.message);
    }
    json!({"terminated": t})
}

/// One entry of `containerStatuses`. `started`: its startup probe (if any) passed;
/// `ready`: its readiness probe (if any) passed; `initializing`: the pod's init
/// containers have not all succeeded (a container not created yet waits with upstream's
/// `PodInitializing` rather than `ContainerCreating`).
pub fn container_status(
    spec: &Container,
    observed: &Observed,
    waiting: Option<&Waiting>,
    started: bool,
    ready: bool,
    initializing: bool,
) -> Value {
    let image = spec.image.clone().unwrap_or_default();
    let mut out = json!({"name": spec.name, "image": image, "imageID": "", "ready": false, "started": false, "restartCount": 0, "lastState": {}});
    let state = match (&observed.latest, waiting) {
        (_, Some(w)) => json!({"waiting": {"reason": w.reason, "message": w.message}}),
        (None, None) if initializing => json!({"waiting": {"reason": "PodInitializing"}}),
        (None, None) => json!({"waiting": {"reason": "ContainerCreating"}}),
        (Some(s), None) if is_running(s) => json!({"running": {"startedAt": time(s.started_at)}}),
        (Some(s), None) if is_exited(s) => terminated(s),
        (Some(_), None) => json!({"waiting": {"reason": "ContainerCreating"}}),
    };
    if let Some(s) = &observed.latest {
        out["restartCount"] = json!(restart_count(s));
        out["containerID"] = json!(format!("containerd://{}", s.id));
        out["imageID"] = json!(s.image_ref);
        out["started"] = json!(started && is_running(s) && waiting.is_none());
        out["ready"] = json!(ready && is_running(s) && waiting.is_none());
        // A container waiting to restart shows its last run as lastState.
        if waiting.is_some() && is_exited(s) {
            out["lastState"] = terminated(s);
        }
    }
    if out["lastState"] == json!({}) {
        if let Some(p) = observed.previous.as_ref().filter(|p| is_exited(p)) {
            out["lastState"] = terminated(p);
        }
    }
    out["state"] = state;
    out
}

/// The pod's phase from its containers' states (upstream `getPhase`).
pub fn phase(pod: &Pod, init_done: bool, init_failed: bool, app: &[(Observed, Option<Waiting>)]) -> &'static str {
    let policy = pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()).unwrap_or("Always");
    if init_failed {
        return "Failed";
    }
    if !init_done {
        return "Pending";
    }
    let (mut running, mut never_started, mut failed) = (0, 0, 0);
    for (o, waiting) in app {
        match &o.latest {
            Some(s) if is_running(s) && waiting.is_none() => running += 1,
            Some(s) if is_exited(s) => {
                if s.exit_code != 0 {
                    failed += 1
                }
            }
            _ => never_started += 1,
        }
    }
    if never_started > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    match policy {
        "Always" => "Running",
        "OnFailure" if failed > 0 => "Running",
        _ if failed > 0 => "Failed",
        _ => "Succeeded",
    }
}

/// Guaranteed, Burstable or BestEffort, from requests and limits.
pub fn qos_class(pod: &Pod) -> &'static str {
    let containers: Vec<&Container> =
        pod.spec.iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten())).collect();
    let get = |c: &Container, which: &str, r: &str| {
        let res = c.resources.as_ref()?;
        let map = if which == "limits" { res.limits.as_ref() } else { res.requests.as_ref() }?;
        map.get(r).map(|q| q.0.clone())
    };
    let any = containers
        .iter()
        .any(|c| ["cpu", "memory"].iter().any(|r| get(c, "requests", r).is_some() || get(c, "limits", r).is_some()));
    if !any {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let limit = get(c, "limits", r);
            limit.is_some()
                && get(c, "requests", r).is_none_or(|req| {
                    krate_api::quantity::parse(&req) == limit.as_deref().and_then(krate_api::quantity::parse)
                })
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// A pod condition; `why` (reason, message) says why it does not hold.
pub fn condition(type_: &str, ok: bool, why: Option<(&str, &str)>) -> Value {
    let mut c = json!({"type": type_, "status": if ok { "True" } else { "False" }, "lastProbeTime": null});
    if let Some((reason, message)) = why.filter(|_| !ok) {
        c["reason"] = json!(reason);
        c["message"] = json!(message);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(policy: &str) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p"}, "spec": {"restartPolicy": policy, "containers": [{"name": "c"}]}}),
        )
        .unwrap()
    }

    fn exited(code: i32) -> Observed {
        Observed {
            latest: Some(api::ContainerStatus {
                state: api::ContainerState::ContainerExited as i32,
                exit_code: code,
                ..Default::default()
            }),
            previous: None,
        }
    }

    #[test]
    fn phase_follows_the_restart_policy() {
        let running = Observed {
            latest: Some(api::ContainerStatus {
                state: api::ContainerState::ContainerRunning as i32,
                ..Default::default()
            }),
            previous: None,
        };
        assert_eq!(phase(&pod("Always"), true, false, &[(Observed::default(), None)]), "Pending");
        assert_eq!(phase(&pod("Always"), true, false, &[(running, None)]), "Running");
        assert_eq!(phase(&pod("Never"), true, false, &[(exited(0), None)]), "Succeeded");
        assert_eq!(phase(&pod("Never"), true, false, &[(exited(2), None)]), "Failed");
        assert_eq!(phase(&pod("OnFailure"), true, false, &[(exited(2), None)]), "Running");
        assert_eq!(phase(&pod("OnFailure"), true, false, &[(exited(0), None)]), "Succeeded");
        assert_eq!(phase(&pod("Always"), true, false, &[(exited(0), None)]), "Running");
        assert_eq!(phase(&pod("Always"), false, false, &[(Observed::default(), None)]), "Pending");
    }

    #[test]
    fn qos_classes() {
        let with = |res: Value| -> Pod {
            serde_json::from_value(
                json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "resources": res}]}}),
            )
            .unwrap()
        };
        assert_eq!(qos_class(&with(json!({}))), "BestEffort");
        assert_eq!(qos_class(&with(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))), "Guaranteed");
        assert_eq!(
            qos_class(&with(
                json!({"requests": {"cpu": "1000m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
            )),
            "Guaranteed"
        );
        assert_eq!(qos_class(&with(json!({"requests": {"cpu": "100m"}}))), "Burstable");
    }

    #[test]
    fn a_container_in_back_off_shows_its_last_run() {
        let c: Container = serde_json::from_value(json!({"name": "c", "image": "i"})).unwrap();
        let w = Waiting { reason: "CrashLoopBackOff".into(), message: "back-off 10s".into() };
        let s = container_status(&c, &exited(1), Some(&w), true, true, false);
        assert_eq!(s["state"]["waiting"]["reason"], "CrashLoopBackOff");
        assert_eq!(s["lastState"]["terminated"]["exitCode"], 1);
        assert_eq!(s["lastState"]["terminated"]["reason"], "Error");
        assert_eq!(s["ready"], false);
    }
}

//! Deployments, ReplicaSets and ReplicationControllers, StatefulSets, DaemonSets, Jobs
//! and CronJobs.

use serde_json::{json, Value};

use super::{
    age, containers_and_images, count, human_duration, int, integer, map_string, name, or_none, s, seconds_since,
    selector_string, since, string, Printer, AGE, NAME,
};
use crate::object::{get, get_str};

fn template(obj: &Value) -> (String, String) {
    containers_and_images(obj.pointer("/spec/template/spec"))
}

fn ready_of_desired(obj: &Value) -> Value {
    json!(format!("{}/{}", int(obj, &["status", "readyReplicas"]), int(obj, &["spec", "replicas"])))
}

pub const DEPLOYMENTS: Printer = Printer {
    columns: &[
        NAME,
        string("Ready", 0),
        integer("Up-to-date", 0),
        integer("Available", 0),
        AGE,
        string("Containers", 1),
        string("Images", 1),
        string("Selector", 1),
    ],
    cells: |obj| {
        let (c, i) = template(obj);
        vec![
            name(obj),
            ready_of_desired(obj),
            json!(int(obj, &["status", "updatedReplicas"])),
            json!(int(obj, &["status", "availableReplicas"])),
            json!(age(obj)),
            json!(c),
            json!(i),
            json!(selector_string(obj, &["spec", "selector"])),
        ]
    },
};

/// ReplicaSets and ReplicationControllers.
pub const REPLICA_SETS: Printer = Printer {
    columns: &[
        NAME,
        integer("Desired", 0),
        integer("Current", 0),
        string("Ready", 0),
        AGE,
        string("Containers", 1),
        string("Images", 1),
        string("Selector", 1),
    ],
    cells: |obj| {
        let (c, i) = template(obj);
        vec![
            name(obj),
            json!(int(obj, &["spec", "replicas"])),
            json!(int(obj, &["status", "replicas"])),
            json!(int(obj, &["status", "readyReplicas"])),
            json!(age(obj)),
            json!(c),
            json!(i),
            json!(selector_string(obj, &["spec", "selector"])),
        ]
    },
};

pub const STATEFUL_SETS: Printer = Printer {
    columns: &[NAME, string("Ready", 0), AGE, string("Containers", 1), string("Images", 1)],
    cells: |obj| {
        let (c, i) = template(obj);
        vec![name(obj), ready_of_desired(obj), json!(age(obj)), json!(c), json!(i)]
    },
};

pub const DAEMON_SETS: Printer = Printer {
    columns: &[
        NAME,
        integer("Desired", 0),
        integer("Current", 0),
        string("Ready", 0),
        integer("Up-to-date", 0),
        integer("Available", 0),
        string("Node Selector", 0),
        AGE,
        string("Containers", 1),
        string("Images", 1),
        string("Selector", 1),
    ],
    cells: |obj| {
        let (c, i) = template(obj);
        vec![
            name(obj),
            json!(int(obj, &["status", "desiredNumberScheduled"])),
            json!(int(obj, &["status", "currentNumberScheduled"])),
            json!(int(obj, &["status", "numberReady"])),
            json!(int(obj, &["status", "updatedNumberScheduled"])),
            json!(int(obj, &["status", "numberAvailable"])),
            json!(or_none(map_string(obj, "/spec/template/spec/nodeSelector"))),
            json!(age(obj)),
            json!(c),
            json!(i),
            json!(selector_string(obj, &["spec", "selector"])),
        ]
    },
};

pub const JOBS: Printer = Printer {
    columns: &[
        NAME,
        string("Status", 0),
        string("Completions", 0),
        string("Duration", 0),
        AGE,
        string("Containers", 1),
        string("Images", 1),
        string("Selector", 1),
    ],
    cells: |obj| {
        let (c, i) = template(obj);
        let succeeded = int(obj, &["status", "succeeded"]);
        let completions = match get(obj, &["spec", "completions"]).and_then(Value::as_i64) {
            Some(n) => format!("{succeeded}/{n}"),
            None => format!("{succeeded}/1 of {}", int(obj, &["spec", "parallelism"])),
        };
        let start = get_str(obj, &["status", "startTime"]).and_then(seconds_since);
        let end = get_str(obj, &["status", "completionTime"]).and_then(seconds_since);
        let duration = match (start, end) {
            (Some(s), Some(e)) => human_duration(s - e),
            (Some(s), None) => human_duration(s),
            _ => String::new(),
        };
        vec![
            name(obj),
            json!(job_status(obj)),
            json!(completions),
            json!(duration),
            json!(age(obj)),
            json!(c),
            json!(i),
            json!(selector_string(obj, &["spec", "selector"])),
        ]
    },
};

fn job_status(job: &Value) -> &'static str {
    let conditions = get(job, &["status", "conditions"]).and_then(Value::as_array).cloned().unwrap_or_default();
    let has = |t: &str| {
        conditions.iter().any(|c| get_str(c, &["type"]) == Some(t) && get_str(c, &["status"]) == Some("True"))
    };
    if has("Complete") {
        "Complete"
    } else if has("Failed") {
        "Failed"
    } else if job.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating"
    } else if has("FailureTarget") {
        "FailureTarget"
    } else if has("SuccessCriteriaMet") {
        "SuccessCriteriaMet"
    } else if has("Suspended") {
        "Suspended"
    } else {
        "Running"
    }
}

pub const CRON_JOBS: Printer = Printer {
    columns: &[
        NAME,
        string("Schedule", 0),
        string("Timezone", 0),
        string("Suspend", 0),
        string("Active", 0),
        string("Last Schedule", 0),
        AGE,
        string("Containers", 1),
        string("Images", 1),
        string("Selector", 1),
    ],
    cells: |obj| {
        let (c, i) = containers_and_images(obj.pointer("/spec/jobTemplate/spec/template/spec"));
        let last =
            get_str(obj, &["status", "lastScheduleTime"]).map(|t| since(Some(t))).unwrap_or_else(|| "<none>".into());
        let suspended = get(obj, &["spec", "suspend"]).and_then(Value::as_bool).unwrap_or(false);
        vec![
            name(obj),
            json!(s(obj, &["spec", "schedule"])),
            json!(or_none(s(obj, &["spec", "timeZone"]))),
            json!(if suspended { "True" } else { "False" }),
            json!(count(obj, &["status", "active"])),
            json!(last),
            json!(age(obj)),
            json!(c),
            json!(i),
            json!(selector_string(obj, &["spec", "jobTemplate", "spec", "selector"])),
        ]
    },
};

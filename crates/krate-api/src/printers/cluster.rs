//! Namespaces, Nodes, configuration (ConfigMaps, Secrets, ServiceAccounts), policy
//! (PodDisruptionBudgets, PriorityClasses, ResourceQuotas), Leases, CRDs and Events.

use serde_json::{json, Value};

use super::{age, count, int, integer, name, or_none, s, since, string, Column, Printer, AGE, NAME};
use crate::object::{get, get_str};

pub const NAMESPACES: Printer = Printer {
    columns: &[NAME, string("Status", 0), AGE],
    cells: |obj| vec![name(obj), json!(s(obj, &["status", "phase"])), json!(age(obj))],
};

pub const NODES: Printer = Printer {
    columns: &[
        NAME,
        string("Status", 0),
        string("Roles", 0),
        AGE,
        string("Version", 0),
        string("Internal-IP", 1),
        string("External-IP", 1),
        string("OS-Image", 1),
        string("Kernel-Version", 1),
        string("Container-Runtime", 1),
    ],
    cells: |obj| {
        let (status, roles) = node_status(obj);
        vec![
            name(obj),
            json!(status),
            json!(roles),
            json!(age(obj)),
            json!(s(obj, &["status", "nodeInfo", "kubeletVersion"])),
            json!(node_address(obj, "InternalIP")),
            json!(node_address(obj, "ExternalIP")),
            json!(or_none(s(obj, &["status", "nodeInfo", "osImage"]))),
            json!(or_none(s(obj, &["status", "nodeInfo", "kernelVersion"]))),
            json!(or_none(s(obj, &["status", "nodeInfo", "containerRuntimeVersion"]))),
        ]
    },
};

fn node_status(node: &Value) -> (String, String) {
    let conditions = get(node, &["status", "conditions"]).and_then(Value::as_array).cloned().unwrap_or_default();
    let ready = conditions.iter().find(|c| get_str(c, &["type"]) == Some("Ready"));
    let mut status = match ready.and_then(|c| get_str(c, &["status"])) {
        Some("True") => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if get(node, &["spec", "unschedulable"]) == Some(&Value::Bool(true)) {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = node
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|l| {
            l.keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/").map(str::to_string))
                .filter(|r| !r.is_empty())
                .collect()
        })
        .unwrap_or_default();
    roles.sort();
    (status, or_none(roles.join(",")))
}

fn node_address(node: &Value, kind: &str) -> String {
    node.pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|x| get_str(x, &["type"]) == Some(kind)))
        .map(|x| s(x, &["address"]))
        .map(or_none)
        .unwrap_or_else(|| "<none>".into())
}

pub const CONFIG_MAPS: Printer = Printer {
    columns: &[NAME, integer("Data", 0), AGE],
    cells: |obj| vec![name(obj), json!(count(obj, &["data"]) + count(obj, &["binaryData"])), json!(age(obj))],
};

pub const SECRETS: Printer = Printer {
    columns: &[NAME, string("Type", 0), integer("Data", 0), AGE],
    cells: |obj| vec![name(obj), json!(s(obj, &["type"])), json!(count(obj, &["data"])), json!(age(obj))],
};

/// Upstream's `extractCSRStatus`: the decision (Denied over Approved, else Pending),
/// then Failed and Issued.
fn csr_condition(obj: &Value) -> String {
    let conditions = get(obj, &["status", "conditions"]).and_then(Value::as_array).cloned().unwrap_or_default();
    let has = |t: &str| conditions.iter().any(|c| c["type"] == t);
    let mut status = if has("Denied") {
        "Denied"
    } else if has("Approved") {
        "Approved"
    } else {
        "Pending"
    }
    .to_string();
    if has("Failed") {
        status.push_str(",Failed");
    }
    if get(obj, &["status", "certificate"]).and_then(Value::as_str).is_some_and(|c| !c.is_empty()) {
        status.push_str(",Issued");
    }
    status
}

pub const CSRS: Printer = Printer {
    columns: &[
        NAME,
        AGE,
        string("SignerName", 0),
        string("Requestor", 0),
        string("RequestedDuration", 0),
        string("Condition", 0),
    ],
    cells: |obj| {
        let requested = get(obj, &["spec", "expirationSeconds"])
            .and_then(Value::as_i64)
            .map(super::human_duration)
            .unwrap_or_else(|| "<none>".into());
        vec![
            name(obj),
            json!(age(obj)),
            json!(or_none(s(obj, &["spec", "signerName"]))),
            json!(s(obj, &["spec", "username"])),
            json!(requested),
            json!(csr_condition(obj)),
        ]
    },
};

/// Upstream's: the Healthy condition as Status, its message and error.
pub const COMPONENT_STATUSES: Printer = Printer {
    columns: &[NAME, string("Status", 0), string("Message", 0), string("Error", 0)],
    cells: |obj| {
        let healthy =
            get(obj, &["conditions"]).and_then(Value::as_array).and_then(|c| c.iter().find(|c| c["type"] == "Healthy"));
        let field = |key: &str| json!(healthy.and_then(|c| c[key].as_str()).unwrap_or_default());
        let status = if healthy.is_some_and(|c| c["status"] == "True") { "Healthy" } else { "Unhealthy" };
        vec![name(obj), json!(status), field("message"), field("error")]
    },
};

pub const SERVICE_ACCOUNTS: Printer = Printer {
    columns: &[NAME, integer("Secrets", 0), AGE],
    cells: |obj| vec![name(obj), json!(count(obj, &["secrets"])), json!(age(obj))],
};

pub const PDBS: Printer = Printer {
    columns: &[NAME, string("Min Available", 0), string("Max Unavailable", 0), string("Allowed Disruptions", 0), AGE],
    cells: |obj| {
        let bound = |key: &str| {
            get(obj, &["spec", key])
                .map(|v| v.as_str().map(String::from).unwrap_or_else(|| v.to_string()))
                .unwrap_or_else(|| "N/A".into())
        };
        vec![
            name(obj),
            json!(bound("minAvailable")),
            json!(bound("maxUnavailable")),
            json!(int(obj, &["status", "disruptionsAllowed"])),
            json!(age(obj)),
        ]
    },
};

pub const PRIORITY_CLASSES: Printer = Printer {
    columns: &[NAME, string("Value", 0), string("Global-Default", 0), AGE, string("PreemptionPolicy", 0)],
    cells: |obj| {
        let global = obj.get("globalDefault").and_then(Value::as_bool).unwrap_or(false);
        vec![
            name(obj),
            json!(int(obj, &["value"])),
            json!(global),
            json!(age(obj)),
            json!(s(obj, &["preemptionPolicy"])),
        ]
    },
};

pub const RESOURCE_QUOTAS: Printer = Printer {
    columns: &[NAME, AGE, string("Request", 0), string("Limit", 0)],
    cells: |obj| {
        let used_of = |prefix: Option<&str>| {
            let hard = obj.pointer("/status/hard").and_then(Value::as_object).cloned().unwrap_or_default();
            let mut parts: Vec<String> = hard
                .iter()
                .filter(|(k, _)| match prefix {
                    Some(p) => k.starts_with(p),
                    None => !k.starts_with("limits."),
                })
                .map(|(k, h)| {
                    format!(
                        "{k}: {}/{}",
                        obj.pointer(&format!("/status/used/{k}")).and_then(Value::as_str).unwrap_or("0"),
                        h.as_str().unwrap_or_default()
                    )
                })
                .collect();
            parts.sort();
            parts.join(", ")
        };
        vec![name(obj), json!(age(obj)), json!(used_of(None)), json!(used_of(Some("limits.")))]
    },
};

pub const LEASES: Printer = Printer {
    columns: &[NAME, string("Holder", 0), AGE],
    cells: |obj| vec![name(obj), json!(s(obj, &["spec", "holderIdentity"])), json!(age(obj))],
};

pub const CRDS: Printer = Printer {
    columns: &[NAME, Column { ty: "date", ..string("Created At", 0) }],
    cells: |obj| vec![name(obj), json!(s(obj, &["metadata", "creationTimestamp"]))],
};

const EVENT_COLUMNS: &[Column] = &[
    string("Last Seen", 0),
    string("Type", 0),
    string("Reason", 0),
    string("Object", 0),
    string("Subobject", 1),
    string("Source", 1),
    string("Message", 0),
    string("First Seen", 1),
    integer("Count", 1),
    Column { priority: 1, ..NAME },
];

/// core/v1 Events.
pub const EVENTS: Printer = Printer { columns: EVENT_COLUMNS, cells: event_cells };

/// events.k8s.io/v1 Events, printed from their core/v1 form.
pub const EVENTS_V1: Printer = Printer {
    columns: EVENT_COLUMNS,
    cells: |obj| event_cells(&crate::convert::EVENTS_V1.store(obj.clone()).unwrap_or_else(|_| obj.clone())),
};

fn event_cells(core: &Value) -> Vec<Value> {
    let last = get_str(core, &["lastTimestamp"])
        .or(get_str(core, &["eventTime"]))
        .or(get_str(core, &["metadata", "creationTimestamp"]));
    let first = get_str(core, &["firstTimestamp"]).or(get_str(core, &["eventTime"]));
    let object =
        format!("{}/{}", s(core, &["involvedObject", "kind"]).to_lowercase(), s(core, &["involvedObject", "name"]));
    let source = get_str(core, &["source", "component"]).or(get_str(core, &["reportingComponent"])).unwrap_or_default();
    vec![
        json!(since(last)),
        json!(s(core, &["type"])),
        json!(s(core, &["reason"])),
        json!(object),
        json!(s(core, &["involvedObject", "fieldPath"])),
        json!(source),
        json!(s(core, &["message"])),
        json!(since(first)),
        json!(int(core, &["count"]).max(1)),
        name(core),
    ]
}

/// Mutating and validating webhook configurations: how many webhooks each holds.
pub const WEBHOOK_CONFIGURATIONS: Printer = Printer {
    columns: &[NAME, integer("Webhooks", 0), AGE],
    cells: |obj| vec![name(obj), json!(count(obj, &["webhooks"])), json!(age(obj))],
};

/// APIServices: who serves the group/version (`Local`, or the Service), and the
/// Available condition with its reason when not True, as kube-aggregator prints them.
pub const API_SERVICES: Printer = Printer {
    columns: &[NAME, string("Service", 0), string("Available", 0), AGE],
    cells: |obj| {
        let service = match get(obj, &["spec", "service"]).filter(|s| s.is_object()) {
            Some(svc) => format!("{}/{}", s(svc, &["namespace"]), s(svc, &["name"])),
            None => "Local".to_string(),
        };
        let conditions = get(obj, &["status", "conditions"]).and_then(Value::as_array).into_iter().flatten();
        let available = match conditions.into_iter().find(|c| get_str(c, &["type"]) == Some("Available")) {
            Some(c) if s(c, &["status"]) == "True" || s(c, &["reason"]).is_empty() => s(c, &["status"]).to_string(),
            Some(c) => format!("{} ({})", s(c, &["status"]), s(c, &["reason"])),
            None => "Unknown".to_string(),
        };
        vec![name(obj), json!(service), json!(available), json!(age(obj))]
    },
};

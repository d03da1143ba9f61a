//! Server-side tables (`as=Table`), as `kubectl get` prints them.

use krate_api::object::get_str;
use krate_api::KindInfo;
use serde_json::{json, Value};

use super::negotiate::{partial_metadata, IncludeObject};

/// Upstream's `duration.HumanDuration`, used for AGE columns.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let minutes = s / 60;
    if minutes < 10 {
        return if s % 60 == 0 { format!("{minutes}m") } else { format!("{minutes}m{}s", s % 60) };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = s / 3600;
    if hours < 8 {
        return if minutes % 60 == 0 { format!("{hours}h") } else { format!("{hours}h{}m", minutes % 60) };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        return if hours % 24 == 0 { format!("{}d", hours / 24) } else { format!("{}d{}h", hours / 24, hours % 24) };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let days = (hours / 24) % 365;
        return if days == 0 { format!("{}y", hours / 24 / 365) } else { format!("{}y{}d", hours / 24 / 365, days) };
    }
    format!("{}y", hours / 24 / 365)
}

/// Seconds since an RFC 3339 timestamp.
pub fn seconds_since(ts: &str) -> Option<i64> {
    let t: jiff::Timestamp = ts.parse().ok()?;
    Some(jiff::Timestamp::now().as_second() - t.as_second())
}

pub fn age(obj: &Value) -> String {
    get_str(obj, &["metadata", "creationTimestamp"])
        .and_then(seconds_since)
        .map(human_duration)
        .unwrap_or_else(|| "<unknown>".into())
}

/// One column: (name, type, format, priority, description).
type Column = (&'static str, &'static str, &'static str, u8, &'static str);

const NAME_COLUMN: Column = ("Name", "string", "name", 0, "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names");
const AGE_COLUMN: Column = ("Age", "string", "", 0, "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata");

fn col(name: &'static str, priority: u8) -> Column {
    let ty = if matches!(
        name,
        "Restarts" | "Desired" | "Current" | "Ready " | "Up-to-date" | "Available" | "Data" | "Secrets" | "Count"
    ) {
        "integer"
    } else {
        "string"
    };
    (name, ty, "", priority, "")
}

/// Upstream's columns per kind (pkg/printers/internalversion); Name and Age otherwise.
fn columns_for(kind: &KindInfo) -> Vec<Column> {
    let named = |cols: &[(&'static str, u8)]| {
        let mut out = vec![NAME_COLUMN];
        out.extend(cols.iter().map(|(n, p)| if *n == "Age" { AGE_COLUMN } else { col(n, *p) }));
        out
    };
    match (kind.group.as_str(), kind.plural.as_str()) {
        ("", "pods") => named(&[
            ("Ready", 0),
            ("Status", 0),
            ("Restarts", 0),
            ("Age", 0),
            ("IP", 1),
            ("Node", 1),
            ("Nominated Node", 1),
            ("Readiness Gates", 1),
        ]),
        ("apps", "deployments") => named(&[
            ("Ready", 0),
            ("Up-to-date", 0),
            ("Available", 0),
            ("Age", 0),
            ("Containers", 1),
            ("Images", 1),
            ("Selector", 1),
        ]),
        ("apps", "replicasets") | ("", "replicationcontrollers") => named(&[
            ("Desired", 0),
            ("Current", 0),
            ("Ready", 0),
            ("Age", 0),
            ("Containers", 1),
            ("Images", 1),
            ("Selector", 1),
        ]),
        ("apps", "statefulsets") => named(&[("Ready", 0), ("Age", 0), ("Containers", 1), ("Images", 1)]),
        ("apps", "daemonsets") => named(&[
            ("Desired", 0),
            ("Current", 0),
            ("Ready", 0),
            ("Up-to-date", 0),
            ("Available", 0),
            ("Node Selector", 0),
            ("Age", 0),
            ("Containers", 1),
            ("Images", 1),
            ("Selector", 1),
        ]),
        ("batch", "jobs") => named(&[
            ("Status", 0),
            ("Completions", 0),
            ("Duration", 0),
            ("Age", 0),
            ("Containers", 1),
            ("Images", 1),
            ("Selector", 1),
        ]),
        ("batch", "cronjobs") => named(&[
            ("Schedule", 0),
            ("Timezone", 0),
            ("Suspend", 0),
            ("Active", 0),
            ("Last Schedule", 0),
            ("Age", 0),
            ("Containers", 1),
            ("Images", 1),
            ("Selector", 1),
        ]),
        ("", "services") => {
            named(&[("Type", 0), ("Cluster-IP", 0), ("External-IP", 0), ("Port(s)", 0), ("Age", 0), ("Selector", 1)])
        }
        ("", "namespaces") => named(&[("Status", 0), ("Age", 0)]),
        ("", "nodes") => named(&[
            ("Status", 0),
            ("Roles", 0),
            ("Age", 0),
            ("Version", 0),
            ("Internal-IP", 1),
            ("External-IP", 1),
            ("OS-Image", 1),
            ("Kernel-Version", 1),
            ("Container-Runtime", 1),
        ]),
        ("", "configmaps") => named(&[("Data", 0), ("Age", 0)]),
        ("", "secrets") => named(&[("Type", 0), ("Data", 0), ("Age", 0)]),
        ("", "serviceaccounts") => named(&[("Secrets", 0), ("Age", 0)]),
        ("", "endpoints") => named(&[("Endpoints", 0), ("Age", 0)]),
        ("discovery.k8s.io", "endpointslices") => {
            named(&[("AddressType", 0), ("Ports", 0), ("Endpoints", 0), ("Age", 0)])
        }
        ("policy", "poddisruptionbudgets") => {
            named(&[("Min Available", 0), ("Max Unavailable", 0), ("Allowed Disruptions", 0), ("Age", 0)])
        }
        ("scheduling.k8s.io", "priorityclasses") => {
            named(&[("Value", 0), ("Global-Default", 0), ("Age", 0), ("PreemptionPolicy", 0)])
        }
        ("", "resourcequotas") => named(&[("Age", 0), ("Request", 0), ("Limit", 0)]),
        ("coordination.k8s.io", "leases") => named(&[("Holder", 0), ("Age", 0)]),
        ("apiextensions.k8s.io", "customresourcedefinitions") => vec![NAME_COLUMN, ("Created At", "date", "", 0, "")],
        ("", "events") | ("events.k8s.io", "events") => vec![
            col("Last Seen", 0),
            col("Type", 0),
            col("Reason", 0),
            col("Object", 0),
            col("Subobject", 1),
            col("Source", 1),
            col("Message", 0),
            col("First Seen", 1),
            col("Count", 1),
            NAME_COLUMN_WIDE,
        ],
        _ => vec![NAME_COLUMN, AGE_COLUMN],
    }
}

const NAME_COLUMN_WIDE: Column = ("Name", "string", "name", 1, NAME_COLUMN.4);

fn s(obj: &Value, path: &[&str]) -> String {
    get_str(obj, path).unwrap_or_default().to_string()
}

fn int(obj: &Value, path: &[&str]) -> i64 {
    krate_api::object::get(obj, path).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(v: String) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v
    }
}

/// Containers and images of a pod template, comma separated.
fn containers_and_images(spec: Option<&Value>) -> (String, String) {
    let containers = spec.and_then(|s| s.get("containers")).and_then(Value::as_array).cloned().unwrap_or_default();
    let names: Vec<String> = containers.iter().map(|c| s(c, &["name"])).collect();
    let images: Vec<String> = containers.iter().map(|c| s(c, &["image"])).collect();
    (names.join(","), images.join(","))
}

fn selector_string(obj: &Value, path: &[&str]) -> String {
    krate_api::object::get(obj, path)
        .and_then(|sel| krate_api::selectors::LabelSelector::from_json(sel).ok())
        .map(|sel| sel.to_query())
        .filter(|q| !q.is_empty())
        .unwrap_or_else(|| "<none>".into())
}

fn since(ts: Option<&str>) -> String {
    ts.and_then(seconds_since).map(human_duration).unwrap_or_else(|| "<unknown>".into())
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
    let statuses = |key: &str| {
        krate_api::object::get(pod, &["status", key]).and_then(Value::as_array).cloned().unwrap_or_default()
    };
    let mut reason =
        get_str(pod, &["status", "reason"]).or(get_str(pod, &["status", "phase"])).unwrap_or("Pending").to_string();
    let init = statuses("initContainerStatuses");
    let total_init =
        krate_api::object::get(pod, &["spec", "initContainers"]).and_then(Value::as_array).map_or(0, Vec::len);
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
    let total =
        krate_api::object::get(pod, &["spec", "containers"]).and_then(Value::as_array).map_or(0, Vec::len) as i64;
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

fn service_ports(svc: &Value) -> String {
    let ports = krate_api::object::get(svc, &["spec", "ports"]).and_then(Value::as_array).cloned().unwrap_or_default();
    let rendered: Vec<String> = ports
        .iter()
        .map(|p| {
            let node = int(p, &["nodePort"]);
            let proto = get_str(p, &["protocol"]).unwrap_or("TCP");
            if node > 0 {
                format!("{}:{node}/{proto}", int(p, &["port"]))
            } else {
                format!("{}/{proto}", int(p, &["port"]))
            }
        })
        .collect();
    or_none(rendered.join(","))
}

fn service_external_ip(svc: &Value) -> String {
    let external: Vec<String> = krate_api::object::get(svc, &["spec", "externalIPs"])
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    match get_str(svc, &["spec", "type"]).unwrap_or("ClusterIP") {
        "ExternalName" => s(svc, &["spec", "externalName"]),
        "LoadBalancer" => {
            let ingress: Vec<String> = svc
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|i| get_str(i, &["ip"]).or(get_str(i, &["hostname"])).unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default();
            let all: Vec<String> = ingress.into_iter().chain(external).collect();
            if all.is_empty() {
                "<pending>".into()
            } else {
                all.join(",")
            }
        }
        _ => or_none(external.join(",")),
    }
}

fn node_status(node: &Value) -> (String, String) {
    let conditions =
        krate_api::object::get(node, &["status", "conditions"]).and_then(Value::as_array).cloned().unwrap_or_default();
    let ready = conditions.iter().find(|c| get_str(c, &["type"]) == Some("Ready"));
    let mut status = match ready.and_then(|c| get_str(c, &["status"])) {
        Some("True") => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if krate_api::object::get(node, &["spec", "unschedulable"]) == Some(&Value::Bool(true)) {
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

fn job_status(job: &Value) -> String {
    let conditions =
        krate_api::object::get(job, &["status", "conditions"]).and_then(Value::as_array).cloned().unwrap_or_default();
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
    .into()
}

fn count(obj: &Value, path: &[&str]) -> i64 {
    match krate_api::object::get(obj, path) {
        Some(Value::Object(m)) => m.len() as i64,
        Some(Value::Array(a)) => a.len() as i64,
        _ => 0,
    }
}

fn cells_for(kind: &KindInfo, obj: &Value) -> Vec<Value> {
    let name = json!(krate_api::object::name(obj));
    let age = json!(age(obj));
    let template = obj.pointer("/spec/template/spec");
    match (kind.group.as_str(), kind.plural.as_str()) {
        ("", "pods") => {
            let pod = pod_summary(obj);
            let restarts = match pod.last_restart {
                Some(ago) => format!("{} ({} ago)", pod.restarts, human_duration(ago)),
                None => pod.restarts.to_string(),
            };
            let gates = count(obj, &["spec", "readinessGates"]);
            vec![
                name,
                json!(format!("{}/{}", pod.ready, pod.total)),
                json!(pod.reason),
                json!(restarts),
                age,
                json!(or_none(s(obj, &["status", "podIP"]))),
                json!(or_none(s(obj, &["spec", "nodeName"]))),
                json!(or_none(s(obj, &["status", "nominatedNodeName"]))),
                json!(if gates == 0 { "<none>".to_string() } else { format!("0/{gates}") }),
            ]
        }
        ("apps", "deployments") => {
            let (c, i) = containers_and_images(template);
            vec![
                name,
                json!(format!("{}/{}", int(obj, &["status", "readyReplicas"]), int(obj, &["spec", "replicas"]))),
                json!(int(obj, &["status", "updatedReplicas"])),
                json!(int(obj, &["status", "availableReplicas"])),
                age,
                json!(c),
                json!(i),
                json!(selector_string(obj, &["spec", "selector"])),
            ]
        }
        ("apps", "replicasets") | ("", "replicationcontrollers") => {
            let (c, i) = containers_and_images(template);
            vec![
                name,
                json!(int(obj, &["spec", "replicas"])),
                json!(int(obj, &["status", "replicas"])),
                json!(int(obj, &["status", "readyReplicas"])),
                age,
                json!(c),
                json!(i),
                json!(selector_string(obj, &["spec", "selector"])),
            ]
        }
        ("apps", "statefulsets") => {
            let (c, i) = containers_and_images(template);
            vec![
                name,
                json!(format!("{}/{}", int(obj, &["status", "readyReplicas"]), int(obj, &["spec", "replicas"]))),
                age,
                json!(c),
                json!(i),
            ]
        }
        ("apps", "daemonsets") => {
            let (c, i) = containers_and_images(template);
            let node_selector = obj
                .pointer("/spec/template/spec/nodeSelector")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                name,
                json!(int(obj, &["status", "desiredNumberScheduled"])),
                json!(int(obj, &["status", "currentNumberScheduled"])),
                json!(int(obj, &["status", "numberReady"])),
                json!(int(obj, &["status", "updatedNumberScheduled"])),
                json!(int(obj, &["status", "numberAvailable"])),
                json!(or_none(node_selector)),
                age,
                json!(c),
                json!(i),
                json!(selector_string(obj, &["spec", "selector"])),
            ]
        }
        ("batch", "jobs") => {
            let (c, i) = containers_and_images(template);
            let succeeded = int(obj, &["status", "succeeded"]);
            let completions = match krate_api::object::get(obj, &["spec", "completions"]).and_then(Value::as_i64) {
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
                name,
                json!(job_status(obj)),
                json!(completions),
                json!(duration),
                age,
                json!(c),
                json!(i),
                json!(selector_string(obj, &["spec", "selector"])),
            ]
        }
        ("batch", "cronjobs") => {
            let (c, i) = containers_and_images(obj.pointer("/spec/jobTemplate/spec/template/spec"));
            let last = get_str(obj, &["status", "lastScheduleTime"])
                .map(|t| since(Some(t)))
                .unwrap_or_else(|| "<none>".into());
            vec![
                name,
                json!(s(obj, &["spec", "schedule"])),
                json!(or_none(s(obj, &["spec", "timeZone"]))),
                json!(krate_api::object::get(obj, &["spec", "suspend"])
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                    .to_string()
                    .replace("true", "True")
                    .replace("false", "False")),
                json!(count(obj, &["status", "active"])),
                json!(last),
                age,
                json!(c),
                json!(i),
                json!(selector_string(obj, &["spec", "jobTemplate", "spec", "selector"])),
            ]
        }
        ("", "services") => {
            let selector = obj
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                name,
                json!(s(obj, &["spec", "type"])),
                json!(or_none(s(obj, &["spec", "clusterIP"]))),
                json!(service_external_ip(obj)),
                json!(service_ports(obj)),
                age,
                json!(or_none(selector)),
            ]
        }
        ("", "namespaces") => vec![name, json!(s(obj, &["status", "phase"])), age],
        ("", "nodes") => {
            let (status, roles) = node_status(obj);
            vec![
                name,
                json!(status),
                json!(roles),
                age,
                json!(s(obj, &["status", "nodeInfo", "kubeletVersion"])),
                json!(node_address(obj, "InternalIP")),
                json!(node_address(obj, "ExternalIP")),
                json!(or_none(s(obj, &["status", "nodeInfo", "osImage"]))),
                json!(or_none(s(obj, &["status", "nodeInfo", "kernelVersion"]))),
                json!(or_none(s(obj, &["status", "nodeInfo", "containerRuntimeVersion"]))),
            ]
        }
        ("", "configmaps") => vec![name, json!(count(obj, &["data"]) + count(obj, &["binaryData"])), age],
        ("", "secrets") => vec![name, json!(s(obj, &["type"])), json!(count(obj, &["data"])), age],
        ("", "serviceaccounts") => vec![name, json!(count(obj, &["secrets"])), age],
        ("", "endpoints") => {
            let mut eps = Vec::new();
            for subset in obj.get("subsets").and_then(Value::as_array).into_iter().flatten() {
                let ports: Vec<i64> = subset
                    .get("ports")
                    .and_then(Value::as_array)
                    .map(|p| p.iter().map(|p| int(p, &["port"])).collect())
                    .unwrap_or_default();
                for addr in subset.get("addresses").and_then(Value::as_array).into_iter().flatten() {
                    let ip = s(addr, &["ip"]);
                    if ports.is_empty() {
                        eps.push(ip.clone())
                    } else {
                        eps.extend(ports.iter().map(|p| format!("{ip}:{p}")))
                    }
                }
            }
            let shown = if eps.len() > 3 {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                eps.join(",")
            };
            vec![name, json!(or_none(shown)), age]
        }
        ("discovery.k8s.io", "endpointslices") => {
            let ports: Vec<String> = obj
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| int(p, &["port"]).to_string())
                .collect();
            let addresses: Vec<String> = obj
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|e| e.get("addresses").and_then(Value::as_array).cloned().unwrap_or_default())
                .filter_map(|a| a.as_str().map(String::from))
                .collect();
            let unset = |v: String| if v.is_empty() { "<unset>".to_string() } else { v };
            let shown = if addresses.len() > 3 {
                format!("{} + {} more...", addresses[..3].join(","), addresses.len() - 3)
            } else {
                addresses.join(",")
            };
            vec![name, json!(s(obj, &["addressType"])), json!(unset(ports.join(","))), json!(unset(shown)), age]
        }
        ("policy", "poddisruptionbudgets") => {
            let bound = |key: &str| {
                krate_api::object::get(obj, &["spec", key])
                    .map(|v| v.as_str().map(String::from).unwrap_or_else(|| v.to_string()))
                    .unwrap_or_else(|| "N/A".into())
            };
            vec![
                name,
                json!(bound("minAvailable")),
                json!(bound("maxUnavailable")),
                json!(int(obj, &["status", "disruptionsAllowed"])),
                age,
            ]
        }
        ("scheduling.k8s.io", "priorityclasses") => {
            let global = obj.get("globalDefault").and_then(Value::as_bool).unwrap_or(false);
            vec![name, json!(int(obj, &["value"])), json!(global), age, json!(s(obj, &["preemptionPolicy"]))]
        }
        ("", "resourcequotas") => {
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
            vec![name, age, json!(used_of(None)), json!(used_of(Some("limits.")))]
        }
        ("coordination.k8s.io", "leases") => vec![name, json!(s(obj, &["spec", "holderIdentity"])), age],
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            vec![name, json!(s(obj, &["metadata", "creationTimestamp"]))]
        }
        ("", "events") | ("events.k8s.io", "events") => {
            // Stored form is core/v1 either way for the fields used here.
            let core =
                if kind.group.is_empty() { obj.clone() } else { krate_api::convert::EVENTS_V1.store(obj.clone()) };
            let last = get_str(&core, &["lastTimestamp"])
                .or(get_str(&core, &["eventTime"]))
                .or(get_str(&core, &["metadata", "creationTimestamp"]));
            let first = get_str(&core, &["firstTimestamp"]).or(get_str(&core, &["eventTime"]));
            let object = format!(
                "{}/{}",
                s(&core, &["involvedObject", "kind"]).to_lowercase(),
                s(&core, &["involvedObject", "name"])
            );
            let source = get_str(&core, &["source", "component"])
                .or(get_str(&core, &["reportingComponent"]))
                .unwrap_or_default();
            vec![
                json!(since(last)),
                json!(s(&core, &["type"])),
                json!(s(&core, &["reason"])),
                json!(object),
                json!(s(&core, &["involvedObject", "fieldPath"])),
                json!(source),
                json!(s(&core, &["message"])),
                json!(since(first)),
                json!(int(&core, &["count"]).max(1)),
                name,
            ]
        }
        _ => vec![name, age],
    }
}

/// A custom kind's `additionalPrinterColumns` (Name first), if it declares any.
fn custom_columns(kind: &KindInfo) -> Option<&[krate_api::custom::PrinterColumn]> {
    kind.custom.as_ref().map(|c| c.printer_columns.as_slice()).filter(|c| !c.is_empty())
}

/// Evaluates the simple JSONPath printer columns use: `.a.b`, `.a[0].b`, `.a[*].b`.
fn json_path(obj: &Value, path: &str) -> Vec<Value> {
    let mut current = vec![obj.clone()];
    for segment in path.trim_start_matches('.').split('.').filter(|s| !s.is_empty()) {
        let (field, index) = match segment.split_once('[') {
            Some((f, rest)) => (f, Some(rest.trim_end_matches(']'))),
            None => (segment, None),
        };
        let mut next = Vec::new();
        for v in current {
            let Some(child) = (if field.is_empty() { Some(v) } else { v.get(field).cloned() }) else { continue };
            match (index, child) {
                (None, c) => next.push(c),
                (Some("*"), Value::Array(items)) => next.extend(items),
                (Some(i), Value::Array(items)) => {
                    next.extend(i.parse::<usize>().ok().and_then(|i| items.get(i).cloned()))
                }
                _ => {}
            }
        }
        current = next;
    }
    current
}

fn custom_cell(column: &krate_api::custom::PrinterColumn, obj: &Value) -> Value {
    let values = json_path(obj, &column.json_path);
    match (column.type_.as_str(), values.as_slice()) {
        (_, []) => Value::Null,
        ("date", [Value::String(ts)]) => {
            json!(seconds_since(ts).map(human_duration).unwrap_or_else(|| "<unknown>".into()))
        }
        (_, [one]) => one.clone(),
        (_, many) => json!(many
            .iter()
            .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
            .collect::<Vec<_>>()
            .join(",")),
    }
}

fn column_definitions(kind: &KindInfo) -> Vec<Value> {
    if let Some(columns) = custom_columns(kind) {
        let name = json!({"name": NAME_COLUMN.0, "type": NAME_COLUMN.1, "format": NAME_COLUMN.2, "description": NAME_COLUMN.4, "priority": 0});
        return std::iter::once(name)
            .chain(columns.iter().map(|c| json!({"name": c.name, "type": c.type_, "format": c.format, "description": c.description, "priority": c.priority})))
            .collect();
    }
    columns_for(kind)
        .into_iter()
        .map(|(name, ty, format, priority, description)| {
            json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
        })
        .collect()
}

fn row(kind: &KindInfo, obj: &Value, include: IncludeObject) -> Value {
    let cells = match custom_columns(kind) {
        Some(columns) => std::iter::once(json!(krate_api::object::name(obj)))
            .chain(columns.iter().map(|c| custom_cell(c, obj)))
            .collect(),
        None => cells_for(kind, obj),
    };
    let mut row = json!({"cells": cells});
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => row["object"] = partial_metadata(obj),
        IncludeObject::Object => row["object"] = obj.clone(),
    }
    row
}

pub fn list_table(kind: &KindInfo, items: &[Value], include: IncludeObject) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": column_definitions(kind),
        "rows": items.iter().map(|o| row(kind, o, include)).collect::<Vec<_>>(),
    })
}

pub fn object_table(kind: &KindInfo, obj: &Value) -> Value {
    let mut t = list_table(kind, std::slice::from_ref(obj), IncludeObject::Metadata);
    t["metadata"] = json!({"resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""))});
    t
}

/// A table carrying one row (and, unless `headers` is false, the columns): for watches.
pub fn event_table(kind: &KindInfo, obj: &Value, include: IncludeObject, headers: bool) -> Value {
    let mut t = list_table(kind, std::slice::from_ref(obj), include);
    if !headers {
        t["columnDefinitions"] = json!([]);
    }
    t["metadata"] = json!({"resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""))});
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_column_paths() {
        let obj = json!({"spec": {"size": 3, "items": [{"n": "a"}, {"n": "b"}]}});
        assert_eq!(json_path(&obj, ".spec.size"), vec![json!(3)]);
        assert_eq!(json_path(&obj, ".spec.items[1].n"), vec![json!("b")]);
        assert_eq!(json_path(&obj, ".spec.items[*].n"), vec![json!("a"), json!("b")]);
        assert!(json_path(&obj, ".spec.nothing").is_empty());
    }

    #[test]
    fn human_durations_match_upstream() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 5 * 60), "3h5m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(40 * 86400), "40d");
    }
}

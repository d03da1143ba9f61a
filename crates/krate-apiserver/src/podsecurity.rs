//! PodSecurity admission (the Pod Security Standards), as upstream's plugin: a
//! namespace's `pod-security.kubernetes.io/enforce|audit|warn` labels (with `-version`)
//! pick a level (`privileged`, `baseline`, `restricted`); pods that break the enforce
//! level are refused with upstream's message, and the warn level becomes `Warning`
//! headers, for pods and for the pod templates of workload kinds (which are never
//! refused: their pods are). Checks, their order and their messages are upstream's at
//! version `latest` (1.37). Changing a namespace's enforce level warns about the pods
//! already there that would break it, and leaves them running. Unlabelled namespaces
//! are privileged, as upstream's defaults.

use std::collections::BTreeSet;

use k8s_openapi::api::{apps::v1 as apps, batch::v1 as batch, core::v1 as core};
use krate_api::object;
use krate_api::{ApiError, ApiResult, FieldError, KindInfo};
use serde_json::Value;

use crate::admission::{forbidden, Attributes, Operation, Plugin};
use crate::registry::Storage;

const LABEL_PREFIX: &str = "pod-security.kubernetes.io/";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Privileged,
    Baseline,
    Restricted,
}

impl Level {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "privileged" => Some(Level::Privileged),
            "baseline" => Some(Level::Baseline),
            "restricted" => Some(Level::Restricted),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Level::Privileged => "privileged",
            Level::Baseline => "baseline",
            Level::Restricted => "restricted",
        }
    }
}

/// One mode's level and version (`restricted:latest`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LevelVersion {
    pub level: Level,
    pub version: String,
}

impl std::fmt::Display for LevelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.level.name(), self.version)
    }
}

/// A namespace's policy, and what was wrong with its labels.
#[derive(Clone, Debug)]
pub struct Policy {
    pub enforce: LevelVersion,
    pub audit: LevelVersion,
    pub warn: LevelVersion,
    pub errors: Vec<FieldError>,
}

fn valid_version(v: &str) -> bool {
    v == "latest"
        || v.strip_prefix("v1.").is_some_and(|minor| {
            !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit()) && (minor == "0" || !minor.starts_with('0'))
        })
}

impl Policy {
    /// The policy namespace `labels` give, with upstream's fallbacks for invalid values.
    pub fn from_labels(labels: &Value) -> Self {
        let mut errors = Vec::new();
        let mut mode = |name: &str, invalid_level: Level| -> (LevelVersion, bool) {
            let level_key = format!("{LABEL_PREFIX}{name}");
            let version_key = format!("{level_key}-version");
            let level_label = labels.get(&level_key).and_then(Value::as_str);
            let level = match level_label {
                None => Level::Privileged,
                Some(text) => Level::parse(text).unwrap_or_else(|| {
                    errors.push(FieldError::invalid(
                        format!("metadata.labels[{level_key}]"),
                        &Value::String(text.into()),
                        "must be one of privileged, baseline, restricted",
                    ));
                    invalid_level
                }),
            };
            let version = match labels.get(&version_key).and_then(Value::as_str) {
                None => "latest".to_string(),
                Some(v) if valid_version(v) => v.to_string(),
                Some(v) => {
                    errors.push(FieldError::invalid(
                        format!("metadata.labels[{version_key}]"),
                        &Value::String(v.into()),
                        "must be \"latest\" or \"v1.x\"",
                    ));
                    "latest".to_string()
                }
            };
            let valid_level = level_label.is_some_and(|t| Level::parse(t).is_some());
            (LevelVersion { level, version }, valid_level)
        };
        let (enforce, enforce_valid) = mode("enforce", Level::Restricted);
        let (audit, _) = mode("audit", Level::Privileged);
        let (mut warn, _) = mode("warn", Level::Privileged);
        let warn_labelled = labels.get(format!("{LABEL_PREFIX}warn")).is_some();
        if enforce_valid && !warn_labelled && enforce.level > warn.level {
            warn.level = enforce.level;
            if labels.get(format!("{LABEL_PREFIX}warn-version")).is_none() {
                warn.version.clone_from(&enforce.version);
            }
        }
        Self { enforce, audit, warn, errors }
    }

    fn privileged(&self) -> bool {
        [&self.enforce, &self.audit, &self.warn].iter().all(|m| m.level == Level::Privileged)
    }
}

// ---- formatting helpers -------------------------------------------------------------

fn join_quote<S: AsRef<str>>(items: &[S]) -> String {
    items.iter().map(|s| format!("\"{}\"", s.as_ref())).collect::<Vec<_>>().join(", ")
}

fn plural<'a>(singular: &'a str, plural: &'a str, n: usize) -> &'a str {
    if n == 1 {
        singular
    } else {
        plural
    }
}

/// Sorted and deduplicated.
fn set_list(items: impl IntoIterator<Item = String>) -> Vec<String> {
    items.into_iter().collect::<BTreeSet<_>>().into_iter().collect()
}

/// `container "a"` or `containers "a", "b"`.
fn containers_phrase(names: &[String]) -> String {
    format!("{} {}", plural("container", "containers", names.len()), join_quote(names))
}

/// `pod and containers "a", "b"`: who set a forbidden value.
fn setters(pod: bool, containers: &[String], annotations: usize) -> String {
    let mut parts = Vec::new();
    if pod {
        parts.push("pod".to_string());
    }
    if !containers.is_empty() {
        parts.push(containers_phrase(containers));
    }
    if annotations > 0 {
        parts.push(plural("annotation", "annotations", annotations).to_string());
    }
    parts.join(" and ")
}

// ---- the pod as the checks see it ---------------------------------------------------

struct Pod<'a> {
    metadata: &'a Value,
    spec: &'a Value,
}

impl<'a> Pod<'a> {
    /// Init containers, containers, then ephemeral containers, each in spec order.
    fn containers(&self) -> impl Iterator<Item = &'a Value> {
        let spec = self.spec;
        ["initContainers", "containers", "ephemeralContainers"]
            .into_iter()
            .flat_map(move |f| spec[f].as_array().into_iter().flatten())
    }

    fn names_where(&self, bad: impl Fn(&Value) -> bool) -> Vec<String> {
        self.containers().filter(|c| bad(c)).map(|c| c["name"].as_str().unwrap_or_default().to_string()).collect()
    }

    fn pod_context(&self) -> &'a Value {
        &self.spec["securityContext"]
    }

    fn windows(&self) -> bool {
        self.spec["os"]["name"] == "windows"
    }

    fn host_users_false(&self) -> bool {
        self.spec["hostUsers"] == Value::Bool(false)
    }

    fn volumes(&self) -> impl Iterator<Item = &'a Value> {
        self.spec["volumes"].as_array().into_iter().flatten()
    }
}

fn sc(container: &Value) -> &Value {
    &container["securityContext"]
}

fn text(v: &Value) -> Option<&str> {
    v.as_str()
}

type Check = fn(&Pod) -> Option<(String, String)>;

fn app_armor(pod: &Pod) -> Option<(String, String)> {
    fn bad_type(p: &Value) -> Option<&str> {
        text(&p["type"]).filter(|t| !matches!(*t, "RuntimeDefault" | "Localhost"))
    }
    let pod_bad = bad_type(&pod.pod_context()["appArmorProfile"]);
    let containers = pod.names_where(|c| bad_type(&sc(c)["appArmorProfile"]).is_some());
    let mut types: Vec<String> = pod_bad.into_iter().map(str::to_string).collect();
    types.extend(pod.containers().filter_map(|c| bad_type(&sc(c)["appArmorProfile"]).map(str::to_string)));
    let mut annotations: Vec<String> = pod.metadata["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("container.apparmor.security.beta.kubernetes.io/"))
        .filter_map(|(k, v)| {
            let v = v.as_str().unwrap_or_default();
            let ok = v.is_empty() || v == "runtime/default" || v.starts_with("localhost/");
            (!ok).then(|| format!("{k}={}", serde_json::to_string(v).unwrap_or_default()))
        })
        .collect();
    if pod_bad.is_none() && containers.is_empty() && annotations.is_empty() {
        return None;
    }
    annotations.sort();
    let mut values = set_list(types);
    let annotation_count = annotations.len();
    values.extend(annotations);
    let reason = plural("forbidden AppArmor profile", "forbidden AppArmor profiles", values.len());
    let who = setters(pod_bad.is_some(), &containers, annotation_count);
    Some((reason.into(), format!("{who} must not set AppArmor profile type to {}", join_quote(&values))))
}

fn added(c: &Value) -> impl Iterator<Item = &str> {
    sc(c)["capabilities"]["add"].as_array().into_iter().flatten().filter_map(Value::as_str)
}

fn capabilities_baseline(pod: &Pod) -> Option<(String, String)> {
    const ALLOWED: &[&str] = &[
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    ];
    let bad = |c: &Value| added(c).any(|cap| !ALLOWED.contains(&cap));
    let names = pod.names_where(bad);
    if names.is_empty() {
        return None;
    }
    let caps = set_list(pod.containers().flat_map(added).filter(|c| !ALLOWED.contains(c)).map(str::to_string));
    Some((
        "non-default capabilities".into(),
        format!(
            "{} must not include {} in securityContext.capabilities.add",
            containers_phrase(&names),
            join_quote(&caps)
        ),
    ))
}

fn host_namespaces(pod: &Pod) -> Option<(String, String)> {
    let items: Vec<String> = ["hostNetwork", "hostPID", "hostIPC"]
        .iter()
        .filter(|f| pod.spec[**f] == Value::Bool(true))
        .map(|f| format!("{f}=true"))
        .collect();
    (!items.is_empty()).then(|| ("host namespaces".into(), items.join(", ")))
}

fn volume_names(pod: &Pod, bad: impl Fn(&Value) -> bool) -> Vec<String> {
    pod.volumes().filter(|v| bad(v)).map(|v| v["name"].as_str().unwrap_or_default().to_string()).collect()
}

fn host_path_volumes(pod: &Pod) -> Option<(String, String)> {
    let names = volume_names(pod, |v| v.get("hostPath").is_some_and(|h| !h.is_null()));
    (!names.is_empty()).then(|| {
        ("hostPath volumes".into(), format!("{} {}", plural("volume", "volumes", names.len()), join_quote(&names)))
    })
}

fn host_ports(pod: &Pod) -> Option<(String, String)> {
    let ports_of = |c: &Value| -> Vec<i64> {
        c["ports"].as_array().into_iter().flatten().filter_map(|p| p["hostPort"].as_i64()).filter(|p| *p != 0).collect()
    };
    let names = pod.names_where(|c| !ports_of(c).is_empty());
    if names.is_empty() {
        return None;
    }
    let ports = set_list(pod.containers().flat_map(ports_of).map(|p| p.to_string()));
    Some((
        "hostPort".into(),
        format!(
            "{} {} {} {}",
            containers_phrase(&names),
            plural("uses", "use", names.len()),
            plural("hostPort", "hostPorts", ports.len()),
            ports.join(", ")
        ),
    ))
}

fn probe_hosts(pod: &Pod) -> Option<(String, String)> {
    let hosts_of = |c: &Value| -> Vec<String> {
        let handlers = ["livenessProbe", "readinessProbe", "startupProbe"]
            .iter()
            .map(|p| &c[*p])
            .chain(["postStart", "preStop"].iter().map(|h| &c["lifecycle"][*h]));
        handlers
            .flat_map(|h| [&h["httpGet"]["host"], &h["tcpSocket"]["host"]])
            .filter_map(Value::as_str)
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect()
    };
    let names = set_list(pod.names_where(|c| !hosts_of(c).is_empty()));
    if names.is_empty() {
        return None;
    }
    let hosts = set_list(pod.containers().flat_map(hosts_of));
    Some((
        "probe or lifecycle host".into(),
        format!(
            "{} {} {} {}",
            containers_phrase(&names),
            plural("uses", "use", names.len()),
            plural("probe or lifecycle host", "probe or lifecycle hosts", hosts.len()),
            join_quote(&hosts)
        ),
    ))
}

fn privileged(pod: &Pod) -> Option<(String, String)> {
    let names = pod.names_where(|c| sc(c)["privileged"] == Value::Bool(true));
    (!names.is_empty()).then(|| {
        ("privileged".into(), format!("{} must not set securityContext.privileged=true", containers_phrase(&names)))
    })
}

fn proc_mount_any(pod: &Pod) -> Option<(String, String)> {
    let bad = |c: &Value| text(&sc(c)["procMount"]).filter(|m| *m != "Default").map(str::to_string);
    let names = pod.names_where(|c| bad(c).is_some());
    if names.is_empty() {
        return None;
    }
    let types = set_list(pod.containers().filter_map(bad));
    Some((
        "procMount".into(),
        format!("{} must not set securityContext.procMount to {}", containers_phrase(&names), join_quote(&types)),
    ))
}

fn proc_mount(pod: &Pod) -> Option<(String, String)> {
    if pod.host_users_false() {
        return None;
    }
    proc_mount_any(pod)
}

fn se_linux(pod: &Pod) -> Option<(String, String)> {
    const TYPES: &[&str] = &["", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"];
    let bad_type = |o: &Value| text(&o["type"]).filter(|t| !TYPES.contains(t)).map(str::to_string);
    let set = |o: &Value, f: &str| text(&o[f]).is_some_and(|v| !v.is_empty());
    let bad = |o: &Value| bad_type(o).is_some() || set(o, "user") || set(o, "role");
    let pod_options = &pod.pod_context()["seLinuxOptions"];
    let pod_bad = bad(pod_options);
    let names = pod.names_where(|c| bad(&sc(c)["seLinuxOptions"]));
    if !pod_bad && names.is_empty() {
        return None;
    }
    let options: Vec<&Value> =
        std::iter::once(pod_options).chain(pod.containers().map(|c| &sc(c)["seLinuxOptions"])).collect();
    let types = set_list(options.iter().filter_map(|o| bad_type(o)));
    let mut parts = Vec::new();
    if !types.is_empty() {
        parts.push(format!("{} {}", plural("type", "types", types.len()), join_quote(&types)));
    }
    if options.iter().any(|o| set(o, "user")) {
        parts.push("user may not be set".into());
    }
    if options.iter().any(|o| set(o, "role")) {
        parts.push("role may not be set".into());
    }
    Some((
        "seLinuxOptions".into(),
        format!("{} set forbidden securityContext.seLinuxOptions: {}", setters(pod_bad, &names, 0), parts.join("; ")),
    ))
}

fn seccomp_type(context: &Value) -> Option<&str> {
    context.get("seccompProfile").filter(|p| !p.is_null()).map(|p| p["type"].as_str().unwrap_or_default())
}

fn bad_seccomp(t: &str) -> bool {
    !matches!(t, "RuntimeDefault" | "Localhost")
}

fn seccomp_baseline(pod: &Pod) -> Option<(String, String)> {
    let bad = |ctx: &Value| seccomp_type(ctx).filter(|t| bad_seccomp(t)).map(str::to_string);
    let pod_bad = bad(pod.pod_context());
    let names = pod.names_where(|c| bad(sc(c)).is_some());
    if pod_bad.is_none() && names.is_empty() {
        return None;
    }
    let types = set_list(pod_bad.clone().into_iter().chain(pod.containers().filter_map(|c| bad(sc(c)))));
    Some((
        "seccompProfile".into(),
        format!(
            "{} must not set securityContext.seccompProfile.type to {}",
            setters(pod_bad.is_some(), &names, 0),
            join_quote(&types)
        ),
    ))
}

fn sysctls(pod: &Pod) -> Option<(String, String)> {
    const SAFE: &[&str] = &[
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "net.ipv4.tcp_slow_start_after_idle",
        "net.ipv4.tcp_notsent_lowat",
    ];
    let bad: Vec<&str> = pod.pod_context()["sysctls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .filter(|n| !SAFE.contains(n))
        .collect();
    (!bad.is_empty()).then(|| ("forbidden sysctls".into(), bad.join(", ")))
}

fn windows_host_process(pod: &Pod) -> Option<(String, String)> {
    let on = |ctx: &Value| ctx["windowsOptions"]["hostProcess"] == Value::Bool(true);
    let pod_on = on(pod.pod_context());
    let names = pod.names_where(|c| on(sc(c)));
    (pod_on || !names.is_empty()).then(|| {
        (
            "hostProcess".into(),
            format!("{} must not set securityContext.windowsOptions.hostProcess=true", setters(pod_on, &names, 0)),
        )
    })
}

fn allow_privilege_escalation(pod: &Pod) -> Option<(String, String)> {
    if pod.windows() {
        return None;
    }
    let names = pod.names_where(|c| sc(c)["allowPrivilegeEscalation"] != Value::Bool(false));
    (!names.is_empty()).then(|| {
        (
            "allowPrivilegeEscalation != false".into(),
            format!("{} must set securityContext.allowPrivilegeEscalation=false", containers_phrase(&names)),
        )
    })
}

fn capabilities_restricted(pod: &Pod) -> Option<(String, String)> {
    if pod.windows() {
        return None;
    }
    let caps = |c: &Value| -> Option<Value> { sc(c).get("capabilities").filter(|v| !v.is_null()).cloned() };
    let missing_drop = pod
        .names_where(|c| caps(c).is_none_or(|caps| !caps["drop"].as_array().into_iter().flatten().any(|d| d == "ALL")));
    let forbidden_add = |c: &Value| -> Vec<String> {
        caps(c)
            .map(|caps| {
                caps["add"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .filter(|a| *a != "NET_BIND_SERVICE")
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let adding = pod.names_where(|c| !forbidden_add(c).is_empty());
    if missing_drop.is_empty() && adding.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    if !missing_drop.is_empty() {
        parts
            .push(format!("{} must set securityContext.capabilities.drop=[\"ALL\"]", containers_phrase(&missing_drop)));
    }
    if !adding.is_empty() {
        let added = set_list(pod.containers().flat_map(forbidden_add));
        parts.push(format!(
            "{} must not include {} in securityContext.capabilities.add",
            containers_phrase(&adding),
            join_quote(&added)
        ));
    }
    Some(("unrestricted capabilities".into(), parts.join("; ")))
}

fn restricted_volumes(pod: &Pod) -> Option<(String, String)> {
    const ALLOWED: &[&str] = &[
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "image",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    const NAMED: &[&str] = &[
        "hostPath",
        "gcePersistentDisk",
        "awsElasticBlockStore",
        "gitRepo",
        "nfs",
        "iscsi",
        "glusterfs",
        "rbd",
        "flexVolume",
        "cinder",
        "cephfs",
        "flocker",
        "fc",
        "azureFile",
        "vsphereVolume",
        "quobyte",
        "azureDisk",
        "photonPersistentDisk",
        "portworxVolume",
        "scaleIO",
        "storageos",
    ];
    let has = |v: &Value, f: &str| v.get(f).is_some_and(|s| !s.is_null());
    let allowed = |v: &Value| ALLOWED.iter().any(|f| has(v, f));
    let names = volume_names(pod, |v| !allowed(v));
    if names.is_empty() {
        return None;
    }
    let types = set_list(
        pod.volumes()
            .filter(|v| !allowed(v))
            .map(|v| NAMED.iter().find(|f| has(v, f)).copied().unwrap_or("unknown").to_string()),
    );
    Some((
        "restricted volume types".into(),
        format!(
            "{} {} {} {} {}",
            plural("volume", "volumes", names.len()),
            join_quote(&names),
            plural("uses", "use", names.len()),
            plural("restricted volume type", "restricted volume types", types.len()),
            join_quote(&types)
        ),
    ))
}

fn run_as_non_root(pod: &Pod) -> Option<(String, String)> {
    if pod.host_users_false() {
        return None;
    }
    let pod_value = &pod.pod_context()["runAsNonRoot"];
    let pod_bad = *pod_value == Value::Bool(false);
    let covered = *pod_value == Value::Bool(true);
    let explicit = pod.names_where(|c| sc(c)["runAsNonRoot"] == Value::Bool(false));
    let reason = "runAsNonRoot != true".to_string();
    if pod_bad || !explicit.is_empty() {
        return Some((
            reason,
            format!("{} must not set securityContext.runAsNonRoot=false", setters(pod_bad, &explicit, 0)),
        ));
    }
    let implicit = pod.names_where(|c| sc(c)["runAsNonRoot"].is_null() && !covered);
    (!implicit.is_empty()).then(|| {
        (reason, format!("pod or {} must set securityContext.runAsNonRoot=true", containers_phrase(&implicit)))
    })
}

fn run_as_user(pod: &Pod) -> Option<(String, String)> {
    if pod.host_users_false() {
        return None;
    }
    let root = |ctx: &Value| ctx["runAsUser"].as_i64() == Some(0);
    let pod_root = root(pod.pod_context());
    let names = pod.names_where(|c| root(sc(c)));
    (pod_root || !names.is_empty())
        .then(|| ("runAsUser=0".into(), format!("{} must not set runAsUser=0", setters(pod_root, &names, 0))))
}

fn seccomp_restricted(pod: &Pod) -> Option<(String, String)> {
    if pod.windows() {
        return None;
    }
    let pod_type = seccomp_type(pod.pod_context());
    let pod_bad = pod_type.is_some_and(bad_seccomp);
    let covered = pod_type.is_some_and(|t| !bad_seccomp(t));
    let explicit = pod.names_where(|c| seccomp_type(sc(c)).is_some_and(bad_seccomp));
    let reason = "seccompProfile".to_string();
    if pod_bad || !explicit.is_empty() {
        let types = set_list(
            pod_type
                .filter(|t| bad_seccomp(t))
                .into_iter()
                .chain(pod.containers().filter_map(|c| seccomp_type(sc(c)).filter(|t| bad_seccomp(t))))
                .map(str::to_string),
        );
        return Some((
            reason,
            format!(
                "{} must not set securityContext.seccompProfile.type to {}",
                setters(pod_bad, &explicit, 0),
                join_quote(&types)
            ),
        ));
    }
    let implicit = pod.names_where(|c| seccomp_type(sc(c)).is_none() && !covered);
    (!implicit.is_empty()).then(|| {
        (
            reason,
            format!(
                "pod or {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\"",
                containers_phrase(&implicit)
            ),
        )
    })
}

/// The checks of a level, in upstream's order.
fn checks(level: Level) -> &'static [Check] {
    const BASELINE: &[Check] = &[
        app_armor,
        capabilities_baseline,
        host_namespaces,
        host_path_volumes,
        host_ports,
        probe_hosts,
        privileged,
        proc_mount,
        se_linux,
        seccomp_baseline,
        sysctls,
        windows_host_process,
    ];
    const RESTRICTED: &[Check] = &[
        app_armor,
        host_namespaces,
        host_ports,
        probe_hosts,
        privileged,
        se_linux,
        sysctls,
        windows_host_process,
        allow_privilege_escalation,
        capabilities_restricted,
        proc_mount_any,
        restricted_volumes,
        run_as_non_root,
        run_as_user,
        seccomp_restricted,
    ];
    match level {
        Level::Privileged => &[],
        Level::Baseline => BASELINE,
        Level::Restricted => RESTRICTED,
    }
}

/// What a pod (its metadata and spec) breaks at `level`: (reason, detail) in order.
pub fn violations(level: Level, metadata: &Value, spec: &Value) -> Vec<(String, String)> {
    let pod = Pod { metadata, spec };
    checks(level).iter().filter_map(|check| check(&pod)).collect()
}

fn detailed(found: &[(String, String)]) -> String {
    found
        .iter()
        .map(|(reason, detail)| if detail.is_empty() { reason.clone() } else { format!("{reason} ({detail})") })
        .collect::<Vec<_>>()
        .join(", ")
}

fn reasons(found: &[(String, String)]) -> String {
    found.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>().join(", ")
}

fn field_text(e: &FieldError) -> String {
    format!("{}: {}", e.field, e.message)
}

/// The pod template of a workload kind: (metadata, spec).
fn template(kind: &KindInfo, obj: &Value) -> Option<(Value, Value)> {
    let template = if kind.is::<batch::CronJob>() {
        obj.pointer("/spec/jobTemplate/spec/template")
    } else if kind.is::<core::PodTemplate>() {
        obj.get("template")
    } else {
        obj.pointer("/spec/template")
    }?;
    if template.is_null() {
        return None;
    }
    Some((template["metadata"].clone(), template["spec"].clone()))
}

fn is_workload(kind: &KindInfo) -> bool {
    kind.is::<core::ReplicationController>()
        || kind.is::<core::PodTemplate>()
        || kind.is::<apps::ReplicaSet>()
        || kind.is::<apps::Deployment>()
        || kind.is::<apps::StatefulSet>()
        || kind.is::<apps::DaemonSet>()
        || kind.is::<batch::Job>()
        || kind.is::<batch::CronJob>()
}

/// A pod update that changes what the checks look at (containers or their images).
fn significant_update(old: &Value, new: &Value) -> bool {
    let list = |pod: &Value, f: &str| pod["spec"][f].as_array().cloned().unwrap_or_default();
    for field in ["containers", "initContainers"] {
        let (a, b) = (list(old, field), list(new, field));
        if a.len() != b.len() || a.iter().zip(&b).any(|(x, y)| x["image"] != y["image"]) {
            return true;
        }
    }
    let old_ephemeral = list(old, "ephemeralContainers");
    list(new, "ephemeralContainers")
        .iter()
        .any(|c| !old_ephemeral.iter().any(|o| o["name"] == c["name"] && o["image"] == c["image"]))
}

pub struct PodSecurity;

impl PodSecurity {
    async fn namespace_policy(storage: &Storage, namespace: &str) -> ApiResult<Policy> {
        let scope = storage.builtin::<core::Namespace>(None);
        let labels = match storage.get(&scope, namespace).await {
            Ok(ns) => ns.parse()["metadata"]["labels"].clone(),
            Err(e) if e.code == 404 => Value::Null,
            Err(_) => {
                return Err(ApiError::internal(format!(
                    "Internal error occurred: failed to lookup namespace {namespace:?}"
                )))
            }
        };
        Ok(Policy::from_labels(&labels))
    }

    async fn pod(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
        let ignored = ["exec", "attach", "binding", "eviction", "log", "portforward", "proxy", "status"];
        let subresource = attrs.request.map(|r| r.subresource.as_str()).unwrap_or_default();
        if ignored.contains(&subresource) {
            return Ok(());
        }
        if attrs.operation == Operation::Update && !attrs.old.is_some_and(|old| significant_update(old, obj)) {
            return Ok(());
        }
        let policy = Self::namespace_policy(storage, object::namespace(obj).unwrap_or_default()).await?;
        if let Some(request) = attrs.request {
            request.annotate(&format!("{LABEL_PREFIX}enforce-policy"), policy.enforce.to_string());
        }
        if policy.errors.is_empty() && policy.privileged() {
            return Ok(());
        }
        let broken = violations(policy.enforce.level, &obj["metadata"], &obj["spec"]);
        if !broken.is_empty() {
            return Err(forbidden(
                attrs.kind,
                obj,
                format!("violates PodSecurity {:?}: {}", policy.enforce.to_string(), detailed(&broken)),
            ));
        }
        Self::warn_and_audit(attrs, &policy, &obj["metadata"], &obj["spec"]);
        Ok(())
    }

    /// The warn level's violations become `Warning`s, the audit level's an annotation
    /// of the request's audit event (`pod-security.kubernetes.io/audit-violations`).
    fn warn_and_audit(attrs: &Attributes<'_>, policy: &Policy, metadata: &Value, spec: &Value) {
        let Some(request) = attrs.request else { return };
        let would_violate = |mode: &LevelVersion| {
            let broken = violations(mode.level, metadata, spec);
            (!broken.is_empty())
                .then(|| format!("would violate PodSecurity {:?}: {}", mode.to_string(), detailed(&broken)))
        };
        if let Some(text) = would_violate(&policy.warn) {
            request.warn(text);
        }
        if let Some(text) = would_violate(&policy.audit) {
            request.annotate(&format!("{LABEL_PREFIX}audit-violations"), text);
        }
    }

    async fn namespace(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
        if attrs.request.is_some_and(|r| !r.subresource.is_empty()) {
            return Ok(());
        }
        let new = Policy::from_labels(&obj["metadata"]["labels"]);
        let old = attrs.old.map(|old| Policy::from_labels(&old["metadata"]["labels"]));
        if !new.errors.is_empty() {
            let unchanged = old.as_ref().is_some_and(|o| {
                !o.errors.is_empty()
                    && o.errors.iter().map(field_text).collect::<Vec<_>>()
                        == new.errors.iter().map(field_text).collect::<Vec<_>>()
            });
            if !unchanged {
                return Err(ApiError::invalid("", "Namespace", object::name(obj), &new.errors));
            }
        }
        let Some(old) = old else { return Ok(()) };
        let (was, now) = (&old.enforce, &new.enforce);
        let looser_or_same = was.version == now.version && now.level <= was.level;
        if was == now || now.level == Level::Privileged || looser_or_same {
            return Ok(());
        }
        let Some(request) = attrs.request else { return Ok(()) };
        let namespace = object::name(obj);
        let pods = storage.cached_objects(&storage.builtin::<core::Pod>(Some(namespace.to_string())), false).await;
        let mut groups: std::collections::BTreeMap<String, (String, usize)> = Default::default();
        for pod in &pods {
            let broken = violations(now.level, &pod["metadata"], &pod["spec"]);
            if broken.is_empty() {
                continue;
            }
            let name = object::name(pod).to_string();
            let entry = groups.entry(reasons(&broken)).or_insert_with(|| (name.clone(), 0));
            if name < entry.0 {
                entry.0 = name;
            }
            entry.1 += 1;
        }
        if groups.is_empty() {
            return Ok(());
        }
        request.warn(format!(
            "existing pods in namespace {namespace:?} violate the new PodSecurity enforce level {:?}",
            now.to_string()
        ));
        let mut lines: Vec<String> = groups
            .into_iter()
            .map(|(reasons, (pod, n))| match n {
                1 => format!("{pod}: {reasons}"),
                2 => format!("{pod} (and 1 other pod): {reasons}"),
                n => format!("{pod} (and {} other pods): {reasons}", n - 1),
            })
            .collect();
        lines.sort();
        for line in lines {
            request.warn(line);
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Plugin for PodSecurity {
    fn name(&self) -> &'static str {
        "PodSecurity"
    }

    async fn validate(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
        if !matches!(attrs.operation, Operation::Create | Operation::Update) {
            return Ok(());
        }
        if attrs.kind.is::<core::Pod>() {
            self.pod(storage, attrs, obj).await
        } else if attrs.kind.is::<core::Namespace>() {
            self.namespace(storage, attrs, obj).await
        } else if is_workload(attrs.kind) && attrs.request.is_some_and(|r| r.subresource.is_empty()) {
            let Some((metadata, spec)) = template(attrs.kind, obj) else { return Ok(()) };
            let policy = Self::namespace_policy(storage, object::namespace(obj).unwrap_or_default()).await?;
            if policy.errors.is_empty()
                && policy.warn.level == Level::Privileged
                && policy.audit.level == Level::Privileged
            {
                return Ok(());
            }
            Self::warn_and_audit(attrs, &policy, &metadata, &spec);
            Ok(())
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn found(level: Level, spec: Value) -> String {
        detailed(&violations(level, &json!({}), &spec))
    }

    #[test]
    fn an_empty_pod_breaks_restricted_in_upstreams_words() {
        let spec = json!({"containers": [{"name": "c", "image": "x"}]});
        assert_eq!(found(Level::Baseline, spec.clone()), "");
        assert_eq!(
            found(Level::Restricted, spec),
            r#"allowPrivilegeEscalation != false (container "c" must set securityContext.allowPrivilegeEscalation=false), unrestricted capabilities (container "c" must set securityContext.capabilities.drop=["ALL"]), runAsNonRoot != true (pod or container "c" must set securityContext.runAsNonRoot=true), seccompProfile (pod or container "c" must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")"#
        );
    }

    #[test]
    fn a_locked_down_pod_passes_restricted() {
        let spec = json!({"securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}],
            "volumes": [{"name": "v", "emptyDir": {}}]});
        assert_eq!(found(Level::Restricted, spec), "");
    }

    #[test]
    fn baseline_messages_follow_upstream() {
        let spec = json!({"hostNetwork": true, "hostIPC": true,
            "securityContext": {"sysctls": [{"name": "kernel.foo"}, {"name": "net.ipv4.tcp_syncookies"}, {"name": "a.b"}]},
            "initContainers": [{"name": "init", "ports": [{"containerPort": 1, "hostPort": 9}]}],
            "containers": [
                {"name": "z", "securityContext": {"privileged": true, "capabilities": {"add": ["NET_RAW", "CHOWN", "SYS_ADMIN"]}},
                 "ports": [{"containerPort": 2, "hostPort": 8080}, {"containerPort": 3, "hostPort": 10}]},
                {"name": "a", "securityContext": {"seLinuxOptions": {"type": "bad", "user": "u"}, "procMount": "Unmasked"}}
            ],
            "volumes": [{"name": "h", "hostPath": {"path": "/"}}]});
        assert_eq!(
            found(Level::Baseline, spec),
            concat!(
                r#"non-default capabilities (container "z" must not include "NET_RAW", "SYS_ADMIN" in securityContext.capabilities.add), "#,
                r#"host namespaces (hostNetwork=true, hostIPC=true), "#,
                r#"hostPath volumes (volume "h"), "#,
                r#"hostPort (containers "init", "z" use hostPorts 10, 8080, 9), "#,
                r#"privileged (container "z" must not set securityContext.privileged=true), "#,
                r#"procMount (container "a" must not set securityContext.procMount to "Unmasked"), "#,
                r#"seLinuxOptions (container "a" set forbidden securityContext.seLinuxOptions: type "bad"; user may not be set), "#,
                r#"forbidden sysctls (kernel.foo, a.b)"#
            )
        );
    }

    #[test]
    fn labels_give_the_policy_with_upstreams_fallbacks() {
        let p = Policy::from_labels(&json!({"pod-security.kubernetes.io/enforce": "baseline"}));
        assert_eq!(
            (p.enforce.to_string(), p.warn.to_string(), p.audit.to_string()),
            ("baseline:latest".into(), "baseline:latest".into(), "privileged:latest".into())
        );
        let p = Policy::from_labels(
            &json!({"pod-security.kubernetes.io/enforce": "strict", "pod-security.kubernetes.io/warn-version": "v1.030"}),
        );
        assert_eq!(p.enforce.level, Level::Restricted, "an invalid enforce level fails closed");
        assert_eq!(p.errors.len(), 2);
        assert_eq!(
            field_text(&p.errors[0]),
            r#"metadata.labels[pod-security.kubernetes.io/enforce]: Invalid value: "strict": must be one of privileged, baseline, restricted"#
        );
        assert!(Policy::from_labels(&Value::Null).privileged());
    }
}

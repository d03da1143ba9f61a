//! Audit logging, as upstream's log backend: an audit Policy (audit.k8s.io/v1,
//! `--audit-policy-file`) picks each request's level from its first matching rule
//! (None, Metadata, Request, RequestResponse), and every audited request becomes
//! audit.k8s.io/v1 `Event` JSON lines in `--audit-log-path`: one at `RequestReceived`
//! and one at `ResponseComplete` (`ResponseStarted` for watches and upgraded
//! connections, whose end is not waited for), unless the policy omits the stage. The
//! log rotates at `--audit-log-maxsize` megabytes, keeping `--audit-log-maxbackup` old
//! files named as upstream's (`audit-2026-12-02T03-04-05.000.log`).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::request::RequestAttributes;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub enum Level {
    None,
    Metadata,
    Request,
    RequestResponse,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::None => "None",
            Level::Metadata => "Metadata",
            Level::Request => "Request",
            Level::RequestResponse => "RequestResponse",
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupResources {
    #[serde(default)]
    group: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    level: Level,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    user_groups: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
    #[serde(default)]
    resources: Vec<GroupResources>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default, rename = "nonResourceURLs")]
    non_resource_urls: Vec<String>,
    #[serde(default)]
    omit_stages: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyFile {
    api_version: String,
    kind: String,
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default)]
    omit_stages: Vec<String>,
}

/// A loaded audit Policy.
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    omit_stages: Vec<String>,
}

impl Rule {
    /// Upstream's `ruleMatches`.
    fn matches(&self, attrs: &RequestAttributes) -> bool {
        let user = &attrs.user;
        if !self.users.is_empty() && !self.users.contains(&user.name) {
            return false;
        }
        if !self.user_groups.is_empty() && !user.groups.iter().any(|g| self.user_groups.contains(g)) {
            return false;
        }
        if !self.verbs.is_empty() && !self.verbs.iter().any(|v| v == attrs.verb.as_str()) {
            return false;
        }
        if !self.namespaces.is_empty() || !self.resources.is_empty() {
            return attrs.is_resource_request && self.matches_resource(attrs);
        }
        if !self.non_resource_urls.is_empty() {
            return !attrs.is_resource_request
                && self.non_resource_urls.iter().any(|u| {
                    u == "*" || *u == attrs.path || u.strip_suffix('*').is_some_and(|p| attrs.path.starts_with(p))
                });
        }
        true
    }

    fn matches_resource(&self, attrs: &RequestAttributes) -> bool {
        if !self.namespaces.is_empty() && !self.namespaces.contains(&attrs.namespace) {
            return false;
        }
        if self.resources.is_empty() {
            return true;
        }
        let combined = attrs.resource_and_subresource();
        self.resources.iter().any(|gr| {
            gr.group == attrs.api_group
                && (gr.resources.is_empty()
                    || gr.resources.iter().any(|r| {
                        *r == combined
                            || (attrs.subresource.is_empty() && *r == attrs.resource)
                            || *r == format!("{}/*", attrs.resource)
                            || (!attrs.subresource.is_empty() && *r == format!("*/{}", attrs.subresource))
                    }))
                && (gr.resource_names.is_empty() || gr.resource_names.contains(&attrs.name))
        })
    }
}

impl Policy {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: PolicyFile = serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("not an audit Policy: {e}"))?;
        if file.kind != "Policy" || !file.api_version.starts_with("audit.k8s.io/") {
            anyhow::bail!("expected kind Policy of audit.k8s.io/v1, found {} of {}", file.kind, file.api_version);
        }
        Ok(Self { rules: file.rules, omit_stages: file.omit_stages })
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The level of a request and the stages it leaves out.
    pub fn level(&self, attrs: &RequestAttributes) -> (Level, Vec<String>) {
        match self.rules.iter().find(|r| r.matches(attrs)) {
            Some(rule) => {
                let mut omit = self.omit_stages.clone();
                omit.extend(rule.omit_stages.iter().cloned());
                (rule.level, omit)
            }
            None => (Level::None, vec![]),
        }
    }
}

/// One request's audit record, built as the request goes.
pub struct Record {
    pub level: Level,
    omit: Vec<String>,
    id: String,
    received: String,
    fields: Map<String, Value>,
}

impl Record {
    pub fn level_at_least(&self, level: Level) -> bool {
        self.level >= level
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn event(&self, stage: &str, extra: Map<String, Value>) -> Option<String> {
        if self.omit.iter().any(|s| s == stage) {
            return None;
        }
        let mut event = Map::new();
        event.insert("kind".into(), json!("Event"));
        event.insert("apiVersion".into(), json!("audit.k8s.io/v1"));
        event.insert("level".into(), json!(self.level.name()));
        event.insert("auditID".into(), json!(self.id));
        event.insert("stage".into(), json!(stage));
        for (k, v) in &self.fields {
            event.insert(k.clone(), v.clone());
        }
        for (k, v) in extra {
            event.insert(k, v);
        }
        event.insert("requestReceivedTimestamp".into(), json!(self.received));
        event.insert("stageTimestamp".into(), json!(krate_api::object::now_rfc3339_micros()));
        Some(Value::Object(event).to_string())
    }
}

/// The audit log of a server.
pub struct Auditor {
    policy: Policy,
    writer: std::sync::mpsc::Sender<String>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auditor")
    }
}

/// Where and how much to keep.
#[derive(Clone, Debug)]
pub struct LogFile {
    pub path: PathBuf,
    /// Megabytes before the file is rotated (0: never).
    pub max_size_mb: u64,
    /// Rotated files kept (0: all).
    pub max_backups: usize,
    /// Days a rotated file is kept (0: no limit), as upstream's `--audit-log-maxage`.
    pub max_age_days: u64,
}

impl Auditor {
    /// Starts the writer thread; fails if the log file cannot be opened.
    pub fn start(policy: Policy, log: LogFile) -> anyhow::Result<Self> {
        let open = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("opening the audit log {}: {e}", path.display()))
        };
        if let Some(dir) = log.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = open(&log.path)?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::Builder::new().name("audit-log".into()).spawn(move || {
            let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
            for line in rx {
                if log.max_size_mb > 0 && size + line.len() as u64 + 1 > log.max_size_mb * 1024 * 1024 {
                    if let Err(e) = rotate(&log) {
                        tracing::error!(error = %e, "rotating the audit log failed");
                    }
                    match open(&log.path) {
                        Ok(f) => {
                            file = f;
                            size = 0;
                        }
                        Err(e) => tracing::error!(error = %e, "reopening the audit log failed"),
                    }
                }
                if let Err(e) = writeln!(file, "{line}") {
                    tracing::error!(error = %e, "writing the audit log failed");
                }
                size += line.len() as u64 + 1;
            }
        })?;
        Ok(Self { policy, writer: tx })
    }

    fn write(&self, line: Option<String>) {
        if let Some(line) = line {
            let _ = self.writer.send(line);
        }
    }

    /// The record of a request that arrived, with its `RequestReceived` event written;
    /// None if the policy does not audit it.
    pub fn begin(&self, attrs: &RequestAttributes, uri: &str, source_ip: &str, user_agent: &str) -> Option<Record> {
        let (level, omit) = self.policy.level(attrs);
        if level == Level::None {
            return None;
        }
        let mut fields = Map::new();
        fields.insert("requestURI".into(), json!(uri));
        fields.insert("verb".into(), json!(attrs.verb.as_str()));
        fields.insert("user".into(), attrs.user.info());
        fields.insert("sourceIPs".into(), json!([source_ip]));
        if !user_agent.is_empty() {
            fields.insert("userAgent".into(), json!(user_agent));
        }
        if attrs.is_resource_request {
            let mut object = Map::new();
            object.insert("resource".into(), json!(attrs.resource));
            for (key, value) in [("namespace", &attrs.namespace), ("name", &attrs.name), ("apiGroup", &attrs.api_group)]
            {
                // A namespace's own name is not also its namespace.
                let own_namespace = key == "namespace" && attrs.resource == "namespaces";
                if !value.is_empty() && !own_namespace {
                    object.insert(key.into(), json!(value));
                }
            }
            object.insert("apiVersion".into(), json!(attrs.api_version));
            if !attrs.subresource.is_empty() {
                object.insert("subresource".into(), json!(attrs.subresource));
            }
            fields.insert("objectRef".into(), Value::Object(object));
        }
        let record = Record {
            level,
            omit,
            id: crate::registry::uuid_v4(),
            received: krate_api::object::now_rfc3339_micros(),
            fields,
        };
        self.write(record.event("RequestReceived", Map::new()));
        Some(record)
    }

    /// Writes the record's last event: the response's status, the request and response
    /// objects at the levels that keep them, and the authorization decision.
    pub fn finish(&self, record: Record, outcome: Outcome) {
        let mut extra = Map::new();
        let mut status = Map::new();
        status.insert("metadata".into(), json!({}));
        if outcome.code >= 400 {
            if let Some(Value::Object(body)) = &outcome.response {
                for key in ["status", "message", "reason", "details"] {
                    if let Some(v) = body.get(key) {
                        status.insert(key.into(), v.clone());
                    }
                }
            }
        }
        status.insert("code".into(), json!(outcome.code));
        extra.insert("responseStatus".into(), Value::Object(status));
        if record.level >= Level::Request {
            if let Some(request) = outcome.request {
                extra.insert("requestObject".into(), request);
            }
        }
        if record.level >= Level::RequestResponse && outcome.code < 400 {
            if let Some(response) = outcome.response {
                extra.insert("responseObject".into(), response);
            }
        }
        let decision = if outcome.code == 403 && outcome.forbidden_by_authorizer { "forbid" } else { "allow" };
        let mut annotations = Map::new();
        annotations.insert("authorization.k8s.io/decision".into(), json!(decision));
        for (key, value) in outcome.annotations {
            annotations.insert(key, Value::String(value));
        }
        extra.insert("annotations".into(), Value::Object(annotations));
        let stage = if outcome.streaming { "ResponseStarted" } else { "ResponseComplete" };
        self.write(record.event(stage, extra));
    }
}

/// How a request ended, for its last audit event.
pub struct Outcome {
    pub code: u16,
    /// The request body as JSON (when the level keeps it).
    pub request: Option<Value>,
    /// The response body as JSON (when kept, or an error's Status).
    pub response: Option<Value>,
    /// A watch or an upgraded connection: its response has started, not ended.
    pub streaming: bool,
    /// The authorizer refused it (rather than admission or the REST layer).
    pub forbidden_by_authorizer: bool,
    /// What the stages added (`RequestAttributes::annotate`).
    pub annotations: Vec<(String, String)>,
}

/// Renames the log to `<stem>-<UTC time>.<ext>` and drops the oldest backups beyond
/// the limit.
fn rotate(log: &LogFile) -> std::io::Result<()> {
    let stem = log.path.file_stem().and_then(|s| s.to_str()).unwrap_or("audit").to_string();
    let ext = log.path.extension().and_then(|s| s.to_str()).map(|e| format!(".{e}")).unwrap_or_default();
    let time = jiff::Timestamp::now().strftime("%Y-%m-%dT%H-%M-%S%.3f").to_string();
    std::fs::rename(&log.path, log.path.with_file_name(format!("{stem}-{time}{ext}")))?;
    if log.max_backups == 0 && log.max_age_days == 0 {
        return Ok(());
    }
    let dir = log.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut backups: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with(&format!("{stem}-")) && name.ends_with(&ext) && *p != log.path
        })
        .collect();
    // Oldest first: the names carry the time of their rotation.
    backups.sort();
    if log.max_age_days > 0 {
        let max_age = std::time::Duration::from_secs(log.max_age_days * 86_400);
        let expired = |p: &PathBuf| {
            std::fs::metadata(p).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age > max_age))
        };
        let (old, kept): (Vec<PathBuf>, Vec<PathBuf>) = backups.into_iter().partition(expired);
        for path in old {
            std::fs::remove_file(path)?;
        }
        backups = kept;
    }
    while log.max_backups > 0 && backups.len() > log.max_backups {
        std::fs::remove_file(backups.remove(0))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{authenticated, request};
    use http::Method;

    #[test]
    fn the_first_matching_rule_sets_the_level() {
        let policy = Policy::parse(
            r#"
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  users: ["system:kube-proxy"]
- level: RequestResponse
  resources: [{group: "", resources: ["secrets"]}]
- level: Request
  verbs: [create]
  namespaces: [team]
- level: None
  nonResourceURLs: ["/healthz*"]
- level: Metadata
"#,
        )
        .unwrap();
        let level = |a: &RequestAttributes| policy.level(a).0;
        assert_eq!(level(&request(&authenticated("system:kube-proxy"), Method::GET, "/api/v1/secrets")), Level::None);
        assert_eq!(
            level(&request(&authenticated("bob"), Method::GET, "/api/v1/namespaces/a/secrets/s")),
            Level::RequestResponse
        );
        assert_eq!(
            level(&request(&authenticated("bob"), Method::POST, "/api/v1/namespaces/team/pods")),
            Level::Request
        );
        assert_eq!(
            level(&request(&authenticated("bob"), Method::POST, "/api/v1/namespaces/other/pods")),
            Level::Metadata
        );
        assert_eq!(level(&request(&authenticated("bob"), Method::GET, "/healthz/etcd")), Level::None);
        assert_eq!(
            policy.level(&request(&authenticated("bob"), Method::GET, "/version")).1,
            vec!["RequestReceived".to_string()]
        );
    }

    #[test]
    fn the_log_rotates_and_keeps_its_backups() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile { path: dir.path().join("audit.log"), max_size_mb: 0, max_backups: 2, max_age_days: 0 };
        for _ in 0..4 {
            std::fs::write(&log.path, "x\n").unwrap();
            rotate(&log).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("audit-") && n.ends_with(".log")), "{names:?}");
    }

    #[test]
    fn rotation_drops_backups_older_than_the_maximum_age() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile { path: dir.path().join("audit.log"), max_size_mb: 0, max_backups: 0, max_age_days: 1 };
        let old = dir.path().join("audit-2020-01-01T00-00-00.000.log");
        std::fs::write(&old, "x\n").unwrap();
        let two_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
        std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_days_ago).unwrap();
        std::fs::write(&log.path, "y\n").unwrap();
        rotate(&log).unwrap();
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 1, "only the new backup stays: {names:?}");
        assert_ne!(names[0], "audit-2020-01-01T00-00-00.000.log");
    }
}

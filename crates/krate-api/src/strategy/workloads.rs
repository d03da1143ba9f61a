//! Workload kinds that embed a pod template: defaults and validation as upstream.

use serde_json::{json, Value};

use super::pod::{default_pod_spec, validate_pod_spec};
use super::{check_min, immutable, Errors, Strategy};
use crate::error::FieldError;
use crate::object::{default, get, get_str};
use crate::selectors::LabelSelector;

/// Template defaults at `path` (e.g. spec.template).
fn default_template(obj: &mut Value, path: &[&str]) {
    let mut cur = Some(&mut *obj);
    for key in path {
        cur = cur.and_then(|v| v.get_mut(key));
    }
    if let Some(spec) = cur.and_then(|t| t.get_mut("spec")) {
        default_pod_spec(spec);
    }
}

/// Validates that a selector is present, non-empty and matches the template's labels.
fn validate_selector_and_template(
    obj: &Value,
    selector_path: &[&str],
    template_path: &[&str],
    prefix: &str,
    errs: &mut Errors,
) {
    let selector_field = format!("{prefix}.selector");
    let template = get(obj, template_path);
    let template_field = format!("{prefix}.template");
    match get(obj, selector_path) {
        None | Some(Value::Null) => errs.push(FieldError::required(&selector_field, "")),
        Some(selector) => match LabelSelector::from_json(selector) {
            Err(e) => errs.push(FieldError::invalid(&selector_field, selector, &e)),
            Ok(s) if s.is_empty() => {
                errs.push(FieldError::invalid(&selector_field, selector, "empty selector is invalid for deployment"))
            }
            Ok(s) => {
                let labels = template.and_then(|t| get(t, &["metadata", "labels"]));
                if !s.matches_json(labels) {
                    errs.push(FieldError::invalid(
                        format!("{template_field}.metadata.labels"),
                        labels.unwrap_or(&json!({})),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
        },
    }
    match template {
        None | Some(Value::Null) => errs.push(FieldError::required(&template_field, "")),
        Some(t) => validate_pod_spec(t.get("spec").unwrap_or(&Value::Null), &format!("{template_field}.spec"), errs),
    }
}

/// Checks `spec.replicas` and the usual template/selector rules of a replicated workload.
fn validate_replicated(obj: &Value, errs: &mut Errors) {
    check_min(obj, &["spec", "replicas"], "spec.replicas", 0, errs);
    check_min(obj, &["spec", "minReadySeconds"], "spec.minReadySeconds", 0, errs);
    check_min(obj, &["spec", "revisionHistoryLimit"], "spec.revisionHistoryLimit", 0, errs);
    validate_selector_and_template(obj, &["spec", "selector"], &["spec", "template"], "spec", errs);
}

pub struct DeploymentStrategy;
impl Strategy for DeploymentStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "replicas"], json!(1));
        default(obj, &["spec", "strategy", "type"], json!("RollingUpdate"));
        if get_str(obj, &["spec", "strategy", "type"]) == Some("RollingUpdate") {
            default(obj, &["spec", "strategy", "rollingUpdate", "maxUnavailable"], json!("25%"));
            default(obj, &["spec", "strategy", "rollingUpdate", "maxSurge"], json!("25%"));
        }
        default(obj, &["spec", "revisionHistoryLimit"], json!(10));
        default(obj, &["spec", "progressDeadlineSeconds"], json!(600));
        default_template(obj, &["spec", "template"]);
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        validate_replicated(obj, errs);
        if let Some(t) = get_str(obj, &["spec", "strategy", "type"]) {
            if !["RollingUpdate", "Recreate"].contains(&t) {
                errs.push(FieldError::not_supported("spec.strategy.type", &json!(t), &["Recreate", "RollingUpdate"]));
            }
            if t == "Recreate" && get(obj, &["spec", "strategy", "rollingUpdate"]).is_some() {
                errs.push(FieldError::forbidden(
                    "spec.strategy.rollingUpdate",
                    "may not be specified when strategy `type` is 'Recreate'",
                ));
            }
        }
    }
    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        self.validate(new, errs);
        immutable(new, old, &["spec", "selector"], "spec.selector", errs);
    }
}

pub struct ReplicaSetStrategy;
impl Strategy for ReplicaSetStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "replicas"], json!(1));
        default_template(obj, &["spec", "template"]);
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        validate_replicated(obj, errs);
    }
    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        self.validate(new, errs);
        immutable(new, old, &["spec", "selector"], "spec.selector", errs);
    }
}

pub struct ReplicationControllerStrategy;
impl Strategy for ReplicationControllerStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "replicas"], json!(1));
        // The original replication controller defaults its selector (and its own labels)
        // from the template's labels.
        if let Some(labels) = get(obj, &["spec", "template", "metadata", "labels"]).cloned() {
            if get(obj, &["spec", "selector"]).is_none_or(|s| s.as_object().is_none_or(|m| m.is_empty())) {
                crate::object::set(obj, &["spec", "selector"], labels.clone());
            }
            if get(obj, &["metadata", "labels"]).is_none_or(|l| l.as_object().is_none_or(|m| m.is_empty())) {
                crate::object::set(obj, &["metadata", "labels"], labels);
            }
        }
        default_template(obj, &["spec", "template"]);
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        validate_replicated(obj, errs);
    }
}

pub struct StatefulSetStrategy;
impl Strategy for StatefulSetStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "replicas"], json!(1));
        default(obj, &["spec", "podManagementPolicy"], json!("OrderedReady"));
        default(obj, &["spec", "updateStrategy", "type"], json!("RollingUpdate"));
        if get_str(obj, &["spec", "updateStrategy", "type"]) == Some("RollingUpdate") {
            default(obj, &["spec", "updateStrategy", "rollingUpdate", "partition"], json!(0));
        }
        default(obj, &["spec", "revisionHistoryLimit"], json!(10));
        default(obj, &["spec", "persistentVolumeClaimRetentionPolicy", "whenDeleted"], json!("Retain"));
        default(obj, &["spec", "persistentVolumeClaimRetentionPolicy", "whenScaled"], json!("Retain"));
        crate::object::for_each_mut(obj, &["spec", "volumeClaimTemplates"], |t| {
            default(t, &["spec", "volumeMode"], json!("Filesystem"));
            default(t, &["apiVersion"], json!("v1"));
            default(t, &["kind"], json!("PersistentVolumeClaim"));
        });
        default_template(obj, &["spec", "template"]);
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        validate_replicated(obj, errs);
        if let Some(p) = get_str(obj, &["spec", "podManagementPolicy"]) {
            if !["OrderedReady", "Parallel"].contains(&p) {
                errs.push(FieldError::not_supported(
                    "spec.podManagementPolicy",
                    &json!(p),
                    &["OrderedReady", "Parallel"],
                ));
            }
        }
    }
    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        self.validate(new, errs);
        immutable(new, old, &["spec", "selector"], "spec.selector", errs);
        immutable(new, old, &["spec", "volumeClaimTemplates"], "spec.volumeClaimTemplates", errs);
    }
}

pub struct DaemonSetStrategy;
impl Strategy for DaemonSetStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "updateStrategy", "type"], json!("RollingUpdate"));
        if get_str(obj, &["spec", "updateStrategy", "type"]) == Some("RollingUpdate") {
            default(obj, &["spec", "updateStrategy", "rollingUpdate", "maxUnavailable"], json!(1));
            default(obj, &["spec", "updateStrategy", "rollingUpdate", "maxSurge"], json!(0));
        }
        default(obj, &["spec", "revisionHistoryLimit"], json!(10));
        default_template(obj, &["spec", "template"]);
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        validate_selector_and_template(obj, &["spec", "selector"], &["spec", "template"], "spec", errs);
        if let Some(policy) = get_str(obj, &["spec", "template", "spec", "restartPolicy"]) {
            if policy != "Always" {
                errs.push(FieldError::not_supported("spec.template.spec.restartPolicy", &json!(policy), &["Always"]));
            }
        }
    }
    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        self.validate(new, errs);
        immutable(new, old, &["spec", "selector"], "spec.selector", errs);
    }
}

/// Job defaults that do not depend on the object's identity.
fn default_job_spec(spec: &mut Value) {
    if spec.get("completions").is_none() && spec.get("parallelism").is_none() {
        default(spec, &["completions"], json!(1));
    }
    default(spec, &["parallelism"], json!(1));
    // With a per-index limit the Job-wide one is effectively off (upstream: MaxInt32).
    let per_index = spec.get("backoffLimitPerIndex").is_some_and(|v| !v.is_null());
    default(spec, &["backoffLimit"], json!(if per_index { i32::MAX } else { 6 }));
    default(spec, &["completionMode"], json!("NonIndexed"));
    default(spec, &["suspend"], json!(false));
    if spec.get("podFailurePolicy").is_none() {
        default(spec, &["podReplacementPolicy"], json!("TerminatingOrFailed"));
    } else {
        default(spec, &["podReplacementPolicy"], json!("Failed"));
    }
    if let Some(t) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
        default_pod_spec(t);
    }
}

fn validate_job_spec(spec: &Value, path: &str, errs: &mut Errors) {
    for field in ["parallelism", "completions", "backoffLimit"] {
        check_min(spec, &[field], &format!("{path}.{field}"), 0, errs);
    }
    check_min(spec, &["activeDeadlineSeconds"], &format!("{path}.activeDeadlineSeconds"), 1, errs);
    match get_str(spec, &["template", "spec", "restartPolicy"]) {
        Some("OnFailure" | "Never") => {}
        other => errs.push(FieldError::not_supported(
            format!("{path}.template.spec.restartPolicy"),
            &json!(other.unwrap_or_default()),
            &["OnFailure", "Never"],
        )),
    }
    if let Some(mode) = get_str(spec, &["completionMode"]) {
        if !["NonIndexed", "Indexed"].contains(&mode) {
            errs.push(FieldError::not_supported(
                format!("{path}.completionMode"),
                &json!(mode),
                &["NonIndexed", "Indexed"],
            ));
        }
        if mode == "Indexed" && spec.get("completions").is_none_or(Value::is_null) {
            errs.push(FieldError::required(format!("{path}.completions"), "when completion mode is Indexed"));
        }
    }
}

pub struct JobStrategy;
impl Strategy for JobStrategy {
    fn default(&self, obj: &mut Value) {
        if let Some(spec) = obj.get_mut("spec") {
            default_job_spec(spec);
        }
    }
    /// Without `manualSelector`, upstream generates a selector on the job's UID and
    /// labels the template to match it.
    fn prepare_for_create(&self, obj: &mut Value) {
        if get(obj, &["spec", "manualSelector"]) == Some(&json!(true)) {
            return;
        }
        let uid = crate::object::uid(obj).to_string();
        let name = crate::object::name(obj).to_string();
        crate::object::set(
            obj,
            &["spec", "selector"],
            json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
        );
        if let Some(labels) = crate::object::object_at(obj, &["spec", "template", "metadata", "labels"]) {
            labels.insert("batch.kubernetes.io/controller-uid".into(), json!(uid));
            labels.insert("batch.kubernetes.io/job-name".into(), json!(name));
            labels.insert("controller-uid".into(), json!(uid));
            labels.insert("job-name".into(), json!(name));
        }
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        let spec = obj.get("spec").unwrap_or(&Value::Null);
        validate_job_spec(spec, "spec", errs);
        validate_selector_and_template(obj, &["spec", "selector"], &["spec", "template"], "spec", errs);
    }
    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        self.validate(new, errs);
        immutable(new, old, &["spec", "selector"], "spec.selector", errs);
        immutable(new, old, &["spec", "completionMode"], "spec.completionMode", errs);
        if get(old, &["spec", "suspend"]) != Some(&json!(true)) {
            immutable(new, old, &["spec", "template"], "spec.template", errs);
        }
    }
}

pub struct CronJobStrategy;
impl Strategy for CronJobStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "concurrencyPolicy"], json!("Allow"));
        default(obj, &["spec", "suspend"], json!(false));
        default(obj, &["spec", "successfulJobsHistoryLimit"], json!(3));
        default(obj, &["spec", "failedJobsHistoryLimit"], json!(1));
        if let Some(t) = obj.pointer_mut("/spec/jobTemplate/spec/template/spec") {
            default_pod_spec(t);
        }
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        let schedule = get_str(obj, &["spec", "schedule"]).unwrap_or_default();
        if schedule.is_empty() {
            errs.push(FieldError::required("spec.schedule", ""));
        } else if !valid_cron_schedule(schedule) {
            errs.push(FieldError::invalid("spec.schedule", &json!(schedule), "unparseable schedule"));
        }
        if let Some(p) = get_str(obj, &["spec", "concurrencyPolicy"]) {
            if !["Allow", "Forbid", "Replace"].contains(&p) {
                errs.push(FieldError::not_supported(
                    "spec.concurrencyPolicy",
                    &json!(p),
                    &["Allow", "Forbid", "Replace"],
                ));
            }
        }
        let job_spec = get(obj, &["spec", "jobTemplate", "spec"]).unwrap_or(&Value::Null);
        validate_job_spec(job_spec, "spec.jobTemplate.spec", errs);
        validate_pod_spec(
            get(job_spec, &["template", "spec"]).unwrap_or(&Value::Null),
            "spec.jobTemplate.spec.template.spec",
            errs,
        );
    }
}

/// Accepts the five-field cron syntax and upstream's `@every`/`@hourly`-style macros.
fn valid_cron_schedule(schedule: &str) -> bool {
    let schedule = match schedule.strip_prefix("TZ=").or_else(|| schedule.strip_prefix("CRON_TZ=")) {
        Some(rest) => rest.split_once(' ').map(|(_, s)| s).unwrap_or(""),
        None => schedule,
    };
    if let Some(m) = schedule.strip_prefix('@') {
        return ["yearly", "annually", "monthly", "weekly", "daily", "midnight", "hourly"].contains(&m)
            || m.strip_prefix("every ").is_some();
    }
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    fields.len() == 5
        && fields.iter().all(|f| {
            f.split(',').all(|part| {
                !part.is_empty()
                    && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '*' | '/' | '-' | '?'))
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(labels: Value, selector: Value) -> Value {
        json!({"metadata": {"name": "web"}, "spec": {
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
        }})
    }

    #[test]
    fn deployment_defaults_and_selector_validation() {
        let mut d = deployment(json!({"app": "web"}), json!({"app": "web"}));
        DeploymentStrategy.default(&mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
        let mut errs = Vec::new();
        DeploymentStrategy.validate(&d, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");

        let mismatched = deployment(json!({"app": "db"}), json!({"app": "web"}));
        DeploymentStrategy.validate(&mismatched, &mut errs);
        assert_eq!(errs[0].field, "spec.template.metadata.labels");
    }

    #[test]
    fn job_gets_a_generated_selector_and_rejects_restart_always() {
        let mut job = json!({"metadata": {"name": "pi", "uid": "u-1"}, "spec": {"template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}});
        JobStrategy.default(&mut job);
        JobStrategy.prepare_for_create(&mut job);
        assert_eq!(job["spec"]["completions"], 1);
        assert_eq!(job["spec"]["backoffLimit"], 6);
        assert_eq!(job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"], "u-1");
        assert_eq!(job["spec"]["template"]["metadata"]["labels"]["job-name"], "pi");
        let mut errs = Vec::new();
        JobStrategy.validate(&job, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        job["spec"]["template"]["spec"]["restartPolicy"] = json!("Always");
        JobStrategy.validate(&job, &mut errs);
        assert_eq!(errs[0].field, "spec.template.spec.restartPolicy");
    }

    #[test]
    fn cron_schedules() {
        assert!(valid_cron_schedule("*/5 * * * *"));
        assert!(valid_cron_schedule("@hourly"));
        assert!(valid_cron_schedule("TZ=Etc/UTC 0 3 * * 1-5"));
        assert!(!valid_cron_schedule("every minute"));
        assert!(!valid_cron_schedule("* * *"));
    }
}

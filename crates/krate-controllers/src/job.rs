//! Jobs: run pods to completion. completions/parallelism, backoffLimit,
//! activeDeadlineSeconds, suspend, Indexed completion mode and ttlSecondsAfterFinished,
//! with upstream's conditions (Complete/Failed, SuccessCriteriaMet/FailureTarget).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};

use crate::owned::{OwnedPods, CACHE_LAG_RETRY};
use crate::{reference, tolerate, Error, Informer, Recorder};

const INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";

struct Context {
    client: kube::Client,
    /// Deletes Jobs whose TTL after finishing ran out.
    ttl_client: kube::Client,
    events: Recorder,
    pods: OwnedPods,
}

fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
}

fn index_of(pod: &Pod) -> Option<i32> {
    pod.annotations().get(INDEX_ANNOTATION).and_then(|i| i.parse().ok())
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

fn timestamp(t: jiff::Timestamp) -> String {
    t.round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default()
}

fn finished(job: &Job) -> Option<(String, jiff::Timestamp)> {
    let status = job.status.as_ref()?;
    let cond = status
        .conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")?;
    let at = cond.last_transition_time.as_ref().map(|t| t.0).unwrap_or_else(now);
    Some((cond.type_.clone(), at))
}

/// "0,2-4" from a set of indexes, as upstream's completedIndexes.
/// The indexes `0,2-4` names (upstream's interval list; malformed parts name none).
fn parse_ranges(text: &str) -> BTreeSet<i32> {
    text.split(',')
        .filter_map(|part| match part.trim().split_once('-') {
            Some((a, b)) => Some(a.parse().ok()?..=b.parse().ok()?),
            None => part.trim().parse().ok().map(|i| i..=i),
        })
        .flatten()
        .collect()
}

/// The first rule of an Indexed Job's successPolicy its `completed` indexes meet: all
/// of `succeededIndexes`, at least `succeededCount` indexes, or that many of those.
fn success_rule_met(spec: &k8s_openapi::api::batch::v1::JobSpec, completed: &BTreeSet<i32>) -> Option<usize> {
    let rules = &spec.success_policy.as_ref()?.rules;
    rules.iter().position(|rule| {
        let wanted = rule.succeeded_indexes.as_deref().map(parse_ranges);
        match (wanted, rule.succeeded_count) {
            (Some(wanted), None) => wanted.iter().all(|i| completed.contains(i)),
            (None, Some(count)) => completed.len() as i32 >= count,
            (Some(wanted), Some(count)) => wanted.iter().filter(|i| completed.contains(i)).count() as i32 >= count,
            (None, None) => false,
        }
    })
}

fn index_ranges(indexes: &BTreeSet<i32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = indexes.iter().peekable();
    while let Some(&start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&&(end + 1)) {
            end += 1;
            iter.next();
        }
        out.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
    }
    out.join(",")
}

fn new_pod(job: &Job, index: Option<i32>) -> Result<Pod, Error> {
    let template = serde_json::to_value(job.spec.as_ref().map(|s| &s.template))?;
    let mut metadata = template.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let name = job.name_any();
    let mut spec = template.get("spec").cloned().unwrap_or_default();
    metadata["generateName"] = json!(match index {
        Some(i) => format!("{name}-{i}-"),
        None => format!("{name}-"),
    });
    metadata["namespace"] = json!(job.namespace());
    metadata["ownerReferences"] = json!([job.controller_owner_ref(&()).expect("a stored job has a name and uid")]);
    if let Some(i) = index {
        metadata["annotations"][INDEX_ANNOTATION] = json!(i.to_string());
        metadata["labels"][INDEX_ANNOTATION] = json!(i.to_string());
        spec["hostname"] = json!(format!("{name}-{i}"));
        if let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) {
            for c in containers {
                let env = c.as_object_mut().expect("containers are objects").entry("env").or_insert(json!([]));
                if let Some(list) = env.as_array_mut() {
                    list.push(json!({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": format!("metadata.annotations['{INDEX_ANNOTATION}']")}}}));
                }
            }
        }
    }
    Ok(serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}))?)
}

async fn delete_pods(ctx: &Context, job: &str, api: &Api<Pod>, pods: &[&Pod]) -> Result<(), Error> {
    for pod in pods {
        tolerate(api.delete(&pod.name_any(), &DeleteParams::background()).await, &[404])?;
        ctx.pods.deleted(job, pod);
    }
    Ok(())
}

fn condition(type_: &str, reason: &str, message: &str) -> Value {
    let t = timestamp(now());
    json!({"type": type_, "status": "True", "reason": reason, "message": message, "lastProbeTime": t, "lastTransitionTime": t})
}

/// The first podFailurePolicy rule that matches a failed pod: its action, and upstream's
/// message for it.
fn failure_action(spec: &k8s_openapi::api::batch::v1::JobSpec, pod: &Pod) -> Option<(String, String)> {
    let rules = &spec.pod_failure_policy.as_ref()?.rules;
    let pod_name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
    for (i, rule) in rules.iter().enumerate() {
        if let Some(codes) = &rule.on_exit_codes {
            let hit =
                statuses.iter().filter(|c| codes.container_name.as_ref().is_none_or(|n| *n == c.name)).find_map(|c| {
                    let code = c.state.as_ref()?.terminated.as_ref()?.exit_code;
                    let listed = codes.values.contains(&code);
                    let matches = if codes.operator == "In" { listed } else { !listed && code != 0 };
                    matches.then(|| (c.name.clone(), code))
                });
            if let Some((container, code)) = hit {
                let message = format!("Container {container} for pod {pod_name} failed with exit code {code} matching {} rule at index {i}", rule.action);
                return Some((rule.action.clone(), message));
            }
        }
        for wanted in rule.on_pod_conditions.iter().flatten() {
            let present = pod.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.type_ == wanted.type_ && c.status == wanted.status.clone().unwrap_or_else(|| "True".into())
                })
            });
            if present {
                let message =
                    format!("Pod {pod_name} has condition {} matching {} rule at index {i}", wanted.type_, rule.action);
                return Some((rule.action.clone(), message));
            }
        }
    }
    None
}

async fn reconcile(job: Arc<Job>, ctx: Arc<Context>) -> Result<Action, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = job.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let spec = job.spec.clone().unwrap_or_default();
    if let Some((_, at)) = finished(&job) {
        let Some(ttl) = spec.ttl_seconds_after_finished else { return Ok(Action::await_change()) };
        let expires = at + jiff::SignedDuration::from_secs(ttl as i64);
        if now() >= expires {
            let expired: Api<Job> = Api::namespaced(ctx.ttl_client.clone(), &ns);
            expired.delete(&job.name_any(), &DeleteParams::background()).await?;
            return Ok(Action::await_change());
        }
        let wait = expires.duration_since(now()).as_secs_f64().max(0.0);
        return Ok(Action::requeue(Duration::from_secs_f64(wait)));
    }
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = job.uid().unwrap_or_default();
    let Some(controlled) = ctx.pods.of(&uid, None) else { return Ok(Action::requeue(CACHE_LAG_RETRY)) };
    // Pods that match the Job's selector and no one controls are its own (upstream's
    // claim); those that stopped matching are let go.
    let pods = match &spec.selector {
        Some(selector) => {
            let selector = crate::selector::label_selector_string(&serde_json::to_value(selector)?);
            let owner_ref = crate::owned::controller_reference(&*job, &());
            ctx.pods.claim(&pods_api, &uid, &owner_ref, &ns, &selector, controlled).await?
        }
        None => controlled,
    };
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let completions = spec.completions;
    let parallelism = spec.parallelism.unwrap_or(1);
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let active: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && !matches!(phase(p), "Succeeded" | "Failed"))
        .collect();
    let succeeded_pods: Vec<&Pod> = pods.iter().filter(|p| phase(p) == "Succeeded").collect();
    // podFailurePolicy decides per failed pod: fail the Job, fail its index, ignore the
    // failure, or count it (against the Job's backoffLimit, or its index's
    // backoffLimitPerIndex).
    let per_index = spec.backoff_limit_per_index.filter(|_| indexed);
    let mut fail_job: Option<String> = None;
    let mut failed = 0;
    let mut index_failures: BTreeMap<i32, i32> = BTreeMap::new();
    let mut failed_indexes: BTreeSet<i32> = BTreeSet::new();
    for pod in pods.iter().filter(|p| phase(p) == "Failed") {
        let action = failure_action(&spec, pod);
        match &action {
            Some((action, message)) if action == "FailJob" => {
                fail_job.get_or_insert(message.clone());
            }
            Some((action, _)) if action == "Ignore" => continue,
            _ => {}
        }
        failed += 1;
        if let (Some(limit), Some(i)) = (per_index, index_of(pod)) {
            let count = index_failures.entry(i).or_default();
            *count += 1;
            if *count > limit || action.is_some_and(|(a, _)| a == "FailIndex") {
                failed_indexes.insert(i);
            }
        }
    }
    let completed_indexes: BTreeSet<i32> = succeeded_pods.iter().filter_map(|p| index_of(p)).collect();
    failed_indexes.retain(|i| !completed_indexes.contains(i));
    let succeeded = if indexed { completed_indexes.len() as i32 } else { succeeded_pods.len() as i32 };
    let status = job.status.clone().unwrap_or_default();
    let start = status.start_time.as_ref().map(|t| t.0).unwrap_or_else(now);

    let deadline = spec.active_deadline_seconds.map(|s| start + jiff::SignedDuration::from_secs(s));
    let mut new_conditions = Vec::new();
    let mut completion_time = None;
    let mut requeue = None;
    if let Some(message) = fail_job {
        delete_pods(&ctx, &uid, &pods_api, &active).await?;
        new_conditions = vec![
            condition("FailureTarget", "PodFailurePolicy", &message),
            condition("Failed", "PodFailurePolicy", &message),
        ];
    } else if spec.max_failed_indexes.is_some_and(|max| failed_indexes.len() as i32 > max) {
        delete_pods(&ctx, &uid, &pods_api, &active).await?;
        let message = "Job has exceeded the specified maximal number of failed indexes";
        new_conditions = vec![
            condition("FailureTarget", "MaxFailedIndexesExceeded", message),
            condition("Failed", "MaxFailedIndexesExceeded", message),
        ];
    } else if !failed_indexes.is_empty()
        && active.is_empty()
        && completions.is_some_and(|c| succeeded + failed_indexes.len() as i32 >= c)
    {
        // Every index has ended, some of them failed.
        let message = "Job has failed indexes";
        new_conditions =
            vec![condition("FailureTarget", "FailedIndexes", message), condition("Failed", "FailedIndexes", message)];
    } else if failed > backoff_limit {
        delete_pods(&ctx, &uid, &pods_api, &active).await?;
        let message = "Job has reached the specified backoff limit";
        new_conditions = vec![
            condition("FailureTarget", "BackoffLimitExceeded", message),
            condition("Failed", "BackoffLimitExceeded", message),
        ];
    } else if deadline.is_some_and(|d| now() >= d) {
        delete_pods(&ctx, &uid, &pods_api, &active).await?;
        let message = "Job was active longer than specified deadline";
        new_conditions = vec![
            condition("FailureTarget", "DeadlineExceeded", message),
            condition("Failed", "DeadlineExceeded", message),
        ];
    } else if let Some(rule) = success_rule_met(&spec, &completed_indexes).filter(|_| indexed) {
        // The successPolicy is met: the indexes still running stop, and once their pods
        // are gone the Job is Complete (upstream's interim SuccessCriteriaMet first).
        let message = format!("Matched rules at index {rule}");
        let met = status.conditions.iter().flatten().any(|c| c.type_ == "SuccessCriteriaMet");
        if !met {
            new_conditions.push(condition("SuccessCriteriaMet", "SuccessPolicy", &message));
        }
        delete_pods(&ctx, &uid, &pods_api, &active).await?;
        let terminating = pods.iter().any(|p| p.metadata.deletion_timestamp.is_some());
        if active.is_empty() && !terminating {
            new_conditions.push(condition("Complete", "SuccessPolicy", &message));
            completion_time = Some(timestamp(now()));
        }
    } else if completions.is_some_and(|c| succeeded >= c)
        || (completions.is_none() && succeeded > 0 && active.is_empty())
    {
        let message = "Reached expected number of succeeded pods";
        new_conditions = vec![
            condition("SuccessCriteriaMet", "CompletionsReached", message),
            condition("Complete", "CompletionsReached", message),
        ];
        completion_time = Some(timestamp(now()));
    } else if spec.suspend != Some(true) {
        let remaining = match completions {
            Some(c) => (c - succeeded - failed_indexes.len() as i32 - active.len() as i32).max(0),
            None if succeeded > 0 => 0,
            None => parallelism,
        };
        let to_create = (parallelism - active.len() as i32).min(remaining).max(0);
        if indexed {
            let busy: BTreeSet<i32> = active.iter().filter_map(|p| index_of(p)).collect();
            let free = (0..completions.unwrap_or(parallelism))
                .filter(|i| !completed_indexes.contains(i) && !failed_indexes.contains(i) && !busy.contains(i));
            for i in free.take(to_create as usize) {
                let pod = pods_api.create(&PostParams::default(), &new_pod(&job, Some(i))?).await?;
                ctx.pods.created(&uid, &pod);
                ctx.events
                    .normal(&reference(&*job), "SuccessfulCreate", &format!("Created pod: {}", pod.name_any()))
                    .await;
            }
        } else {
            for _ in 0..to_create {
                let pod = pods_api.create(&PostParams::default(), &new_pod(&job, None)?).await?;
                ctx.pods.created(&uid, &pod);
                ctx.events
                    .normal(&reference(&*job), "SuccessfulCreate", &format!("Created pod: {}", pod.name_any()))
                    .await;
            }
        }
        if let Some(d) = deadline {
            requeue = Some(Duration::from_secs_f64(d.duration_since(now()).as_secs_f64().max(0.0)));
        }
    } else {
        delete_pods(&ctx, &uid, &pods_api, &active).await?;
    }

    let mut conditions: Vec<Value> =
        status.conditions.iter().flatten().filter_map(|c| serde_json::to_value(c).ok()).collect();
    if spec.suspend == Some(true) && !conditions.iter().any(|c| c["type"] == "Suspended") {
        conditions.push(condition("Suspended", "JobSuspended", "Job suspended"));
    }
    if let Some(done) = new_conditions.last() {
        let (reason, message) =
            (done["reason"].as_str().unwrap_or_default(), done["message"].as_str().unwrap_or_default());
        match done["type"].as_str() {
            Some("Complete") => ctx.events.normal(&reference(&*job), "Completed", "Job completed").await,
            _ => ctx.events.warning(&reference(&*job), reason, message).await,
        }
    }
    conditions.extend(new_conditions);
    let ready = active.iter().filter(|p| crate::replicas::is_ready(p)).count();
    let mut patch = json!({"status": {
        "startTime": timestamp(start), "active": active.len(), "succeeded": succeeded.max(status.succeeded.unwrap_or(0)),
        "failed": failed.max(status.failed.unwrap_or(0)), "ready": ready, "terminating": pods.iter().filter(|p| p.metadata.deletion_timestamp.is_some()).count(),
        "conditions": conditions,
    }});
    if indexed {
        patch["status"]["completedIndexes"] = json!(index_ranges(&completed_indexes));
    }
    if per_index.is_some() {
        patch["status"]["failedIndexes"] = json!(index_ranges(&failed_indexes));
    }
    if let Some(t) = completion_time {
        patch["status"]["completionTime"] = json!(t);
    }
    let before = serde_json::to_value(&status)?;
    let changed =
        patch["status"].as_object().expect("status is an object").iter().any(|(k, v)| before.get(k) != Some(v));
    if changed {
        jobs.patch_status(&job.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await?;
    }
    Ok(requeue.map(Action::requeue).unwrap_or_else(Action::await_change))
}

fn error_policy(job: Arc<Job>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(job = %job.name_any(), error = %err, "job sync failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

/// Runs the controller; `ttl_client` deletes finished Jobs whose TTL ran out (upstream's
/// ttl-after-finished-controller).
pub async fn run(client: kube::Client, ttl_client: kube::Client, pods: &Informer<Pod>) -> anyhow::Result<()> {
    let context = Context {
        events: Recorder::new(client.clone(), "job-controller"),
        client: client.clone(),
        ttl_client,
        pods: OwnedPods::new(pods),
    };
    context.pods.synced().await;
    let controller = Controller::new(Api::<Job>::all(client), watcher::Config::default());
    let jobs = controller.store();
    let selector_of = |job: &Job| {
        Some(crate::selector::label_selector_string(&serde_json::to_value(job.spec.as_ref()?.selector.as_ref()?).ok()?))
    };
    controller
        .owns_shared_stream(context.pods.changes())
        .watches_shared_stream(context.pods.changes(), move |pod: Arc<Pod>| {
            crate::owned::adopters(&jobs, &*pod, selector_of)
        })
        .run(reconcile, error_policy, Arc::new(context))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_ranges, success_rule_met, BTreeSet};
    use serde_json::json;

    #[test]
    fn pod_failure_policy_picks_the_first_matching_rule() {
        let spec: k8s_openapi::api::batch::v1::JobSpec =
            serde_json::from_value(serde_json::json!({"template": {}, "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}},
            ]}}))
            .unwrap();
        let failed = |code: i32, conditions: serde_json::Value| -> super::Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "namespace": "d"}, "status": {"phase": "Failed", "conditions": conditions,
                "containerStatuses": [{"name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": code}}}]}})).unwrap()
        };
        let (action, message) = super::failure_action(&spec, &failed(42, serde_json::json!([]))).unwrap();
        assert_eq!(action, "FailJob");
        assert_eq!(message, "Container main for pod d/p failed with exit code 42 matching FailJob rule at index 1");
        assert_eq!(
            super::failure_action(
                &spec,
                &failed(1, serde_json::json!([{"type": "DisruptionTarget", "status": "True"}]))
            )
            .unwrap()
            .0,
            "Ignore"
        );
        assert!(super::failure_action(&spec, &failed(1, serde_json::json!([]))).is_none());
    }

    #[test]
    fn a_success_policy_is_met_by_its_indexes_or_its_count() {
        assert_eq!(parse_ranges("0,2-4, 7"), BTreeSet::from([0, 2, 3, 4, 7]));
        let spec = |rules: serde_json::Value| -> k8s_openapi::api::batch::v1::JobSpec {
            serde_json::from_value(json!({"template": {}, "successPolicy": {"rules": rules}})).unwrap()
        };
        let done = BTreeSet::from([0, 1]);
        assert_eq!(success_rule_met(&spec(json!([{"succeededIndexes": "0-1"}])), &done), Some(0));
        assert_eq!(success_rule_met(&spec(json!([{"succeededIndexes": "0-2"}])), &done), None);
        assert_eq!(success_rule_met(&spec(json!([{"succeededIndexes": "5"}, {"succeededCount": 2}])), &done), Some(1));
        assert_eq!(success_rule_met(&spec(json!([{"succeededIndexes": "1-3", "succeededCount": 1}])), &done), Some(0));
    }

    #[test]
    fn completed_indexes_render_as_ranges() {
        let set = [0, 2, 3, 4, 7].into_iter().collect();
        assert_eq!(super::index_ranges(&set), "0,2-4,7");
    }
}

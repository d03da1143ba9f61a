//! CronJobs: create a Job at each scheduled time (in `timeZone`, UTC by default), with
//! concurrencyPolicy Allow/Forbid/Replace, startingDeadlineSeconds, suspend and the
//! successful/failed history limits. The controller sleeps until the next firing.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::cron::Schedule;
use crate::owned::{beside, Owned, CACHE_LAG_RETRY};
use crate::{reference, Error, Informer, Recorder};

const SCHEDULED_AT: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

struct Context {
    client: kube::Client,
    events: Recorder,
    jobs: Owned<Job>,
}

fn finished(job: &Job) -> Option<&str> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .map(|c| c.type_.as_str())
}

fn timestamp(t: jiff::Timestamp) -> String {
    t.round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default()
}

async fn reconcile(cj: Arc<CronJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    if cj.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = cj.namespace().unwrap_or_default();
    let spec = cj.spec.clone();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = cj.uid().unwrap_or_default();
    let Some(mut jobs) = ctx.jobs.of(&uid, None) else { return Ok(Action::requeue(CACHE_LAG_RETRY)) };
    jobs.sort_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0));

    // History limits.
    for (kind, limit) in [
        ("Complete", spec.successful_jobs_history_limit.unwrap_or(3)),
        ("Failed", spec.failed_jobs_history_limit.unwrap_or(1)),
    ] {
        let done: Vec<&Job> = jobs.iter().filter(|j| finished(j) == Some(kind)).collect();
        let excess = done.len().saturating_sub(limit.max(0) as usize);
        for j in &done[..excess] {
            let _ = jobs_api.delete(&j.name_any(), &DeleteParams::background()).await;
            ctx.jobs.deleted(&uid, j);
        }
    }
    let mut active: Vec<Job> = jobs.iter().filter(|j| finished(j).is_none()).cloned().collect();

    let schedule = match Schedule::parse(&spec.schedule) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(cronjob = %cj.name_any(), error = %e, "unparseable schedule");
            return Ok(Action::await_change());
        }
    };
    let tz = match spec.time_zone.as_deref() {
        None | Some("") => jiff::tz::TimeZone::UTC,
        Some(name) => match jiff::tz::TimeZone::get(name) {
            Ok(tz) => tz,
            Err(e) => {
                tracing::warn!(cronjob = %cj.name_any(), error = %e, "unknown time zone");
                return Ok(Action::await_change());
            }
        },
    };
    let status = cj.status.clone().unwrap_or_default();
    let since = status
        .last_schedule_time
        .as_ref()
        .map(|t| t.0)
        .or(cj.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or_else(jiff::Timestamp::now);
    let now = jiff::Timestamp::now();
    // The most recent missed firing, if any.
    let mut due = None;
    let mut t = since;
    while let Some(next) = schedule.next_after(t, &tz).filter(|n| *n <= now) {
        due = Some(next);
        t = next;
    }
    let mut last_scheduled = status.last_schedule_time.as_ref().map(|t| t.0);
    if let Some(at) = due.filter(|_| spec.suspend != Some(true)) {
        let too_late = spec.starting_deadline_seconds.is_some_and(|d| now.duration_since(at).as_secs() > d);
        let policy = spec.concurrency_policy.as_deref().unwrap_or("Allow");
        let blocked = policy == "Forbid" && !active.is_empty();
        if !too_late && !blocked {
            if policy == "Replace" {
                for j in active.drain(..) {
                    let _ = jobs_api.delete(&j.name_any(), &DeleteParams::background()).await;
                    ctx.jobs.deleted(&uid, &j);
                }
            }
            let mut job = serde_json::to_value(&spec.job_template)?;
            job["apiVersion"] = json!("batch/v1");
            job["kind"] = json!("Job");
            job["metadata"]["name"] = json!(format!("{}-{}", cj.name_any(), at.as_second() / 60));
            job["metadata"]["namespace"] = json!(ns);
            job["metadata"]["annotations"][SCHEDULED_AT] = json!(timestamp(at));
            job["metadata"]["ownerReferences"] =
                json!([cj.controller_owner_ref(&()).expect("a stored cronjob has a name and uid")]);
            match jobs_api.create(&PostParams::default(), &serde_json::from_value(job)?).await {
                Ok(created) => {
                    ctx.jobs.created(&uid, &created);
                    ctx.events
                        .normal(&reference(&*cj), "SuccessfulCreate", &format!("Created job {}", created.name_any()))
                        .await;
                    active.push(created);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !blocked {
            last_scheduled = Some(at);
        }
    }
    let active_refs: Vec<_> = active
        .iter()
        .map(
            |j| json!({"apiVersion": "batch/v1", "kind": "Job", "name": j.name_any(), "namespace": ns, "uid": j.uid()}),
        )
        .collect();
    let last_success = jobs
        .iter()
        .filter(|j| finished(j) == Some("Complete"))
        .filter_map(|j| j.status.as_ref()?.completion_time.as_ref().map(|t| t.0))
        .max();
    let mut patch = json!({"status": {"active": active_refs}});
    if let Some(t) = last_scheduled {
        patch["status"]["lastScheduleTime"] = json!(timestamp(t));
    }
    if let Some(t) = last_success {
        patch["status"]["lastSuccessfulTime"] = json!(timestamp(t));
    }
    let before = serde_json::to_value(&status)?;
    let changed = patch["status"]
        .as_object()
        .expect("status is an object")
        .iter()
        .any(|(k, v)| before.get(k).unwrap_or(&json!([])) != v);
    if changed {
        Api::<CronJob>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&cj.name_any(), &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    let next =
        schedule.next_after(now, &tz).map(|n| n.duration_since(jiff::Timestamp::now()).as_secs_f64().max(0.0) + 0.01);
    Ok(next.map(|s| Action::requeue(Duration::from_secs_f64(s))).unwrap_or_else(Action::await_change))
}

fn error_policy(cj: Arc<CronJob>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(cronjob = %cj.name_any(), error = %err, "cronjob sync failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    let jobs = Informer::<Job>::default();
    let events = Recorder::new(client.clone(), "cronjob-controller");
    let context = Context { events, client: client.clone(), jobs: Owned::new(&jobs) };
    let controller = Controller::new(Api::<CronJob>::all(client.clone()), watcher::Config::default())
        .owns_shared_stream(context.jobs.changes())
        .run(reconcile, error_policy, Arc::new(context))
        .for_each(|_| futures::future::ready(()));
    beside(&jobs, Api::all(client), controller).await
}

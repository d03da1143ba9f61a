//! The HorizontalPodAutoscaler controller (autoscaling/v2), as upstream's: every 15
//! seconds each autoscaler reads its target's `scale` subresource (any kind that has
//! one: Deployments, ReplicaSets, StatefulSets, custom resources), the usage of the
//! target's pods from metrics.k8s.io, and proposes a replica count per metric (resource
//! metrics, as a utilization of the pods' requests or an average value); the largest
//! proposal is stabilized (the highest recommendation of the scale-down window, the
//! lowest of the scale-up window), limited by the behavior's policies against the
//! scale events of their periods, clamped to min/max, and written to `scale`. The
//! status carries upstream's metrics, conditions (AbleToScale, ScalingActive,
//! ScalingLimited) and messages; events say `SuccessfulRescale` with the reason.
//!
//! The arithmetic follows upstream's replica calculator: a 10% tolerance, pods being
//! deleted or failed ignored, pending and (for CPU) unready pods left out, pods
//! without figures counted as idle on the way up and at their request on the way
//! down, and no change when those assumptions reverse the direction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use krate_api::selectors::LabelSelector;
use krate_client::events::Recorder;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::replicas::is_ready;
use crate::{reference, Error, Informer};

/// How often every autoscaler is evaluated (`--horizontal-pod-autoscaler-sync-period`).
pub const SYNC_PERIOD: Duration = Duration::from_secs(15);
/// A usage ratio this close to 1 changes nothing.
const TOLERANCE: f64 = 0.1;
/// The scale-down stabilization window when a behavior names none
/// (`--horizontal-pod-autoscaler-downscale-stabilization`).
const DOWNSCALE_STABILIZATION: i64 = 300;

/// What a scaling direction may do: stabilization window, how policies combine, and
/// the policies as (type, value, period seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    pub window_seconds: i64,
    pub select: String,
    pub policies: Vec<(String, i64, i64)>,
}

/// Upstream's defaults of a direction's rules, overridden by what `rules` says.
fn rules(rules: &Value, up: bool) -> Rules {
    let (window, policies) = if up {
        (0, vec![("Pods".to_string(), 4, 15), ("Percent".to_string(), 100, 15)])
    } else {
        (DOWNSCALE_STABILIZATION, vec![("Percent".to_string(), 100, 15)])
    };
    let policies = match rules["policies"].as_array() {
        Some(listed) => listed
            .iter()
            .map(|p| {
                let (value, period) = (p["value"].as_i64().unwrap_or(0), p["periodSeconds"].as_i64().unwrap_or(15));
                (p["type"].as_str().unwrap_or_default().to_string(), value, period)
            })
            .collect(),
        None => policies,
    };
    Rules {
        window_seconds: rules["stabilizationWindowSeconds"].as_i64().unwrap_or(window),
        select: rules["selectPolicy"].as_str().unwrap_or("Max").to_string(),
        policies,
    }
}

/// What the controller remembers of one autoscaler between evaluations.
#[derive(Default)]
struct History {
    /// Recommendations (before stabilization), when made.
    recommendations: Vec<(Instant, i32)>,
    /// Replicas added and removed, when.
    ups: Vec<(Instant, i32)>,
    downs: Vec<(Instant, i32)>,
    /// The last evaluation and the generation it saw: the controller's own status
    /// writes wake it, and upstream evaluates each autoscaler once per period unless its
    /// spec changed.
    evaluated: Option<(Instant, i64)>,
}

impl History {
    /// The recommendation stabilized by both windows, and whether it changed.
    fn stabilize(&mut self, now: Instant, current: i32, desired: i32, up: &Rules, down: &Rules) -> i32 {
        let within = |at: Instant, seconds: i64| now.duration_since(at) < Duration::from_secs(seconds.max(0) as u64);
        let (mut up_limit, mut down_limit) = (desired, desired);
        for &(at, recommended) in &self.recommendations {
            if within(at, up.window_seconds) {
                up_limit = up_limit.min(recommended);
            }
            if within(at, down.window_seconds) {
                down_limit = down_limit.max(recommended);
            }
        }
        let keep = up.window_seconds.max(down.window_seconds);
        self.recommendations.retain(|&(at, _)| within(at, keep));
        self.recommendations.push((now, desired));
        current.max(up_limit).min(down_limit)
    }

    /// Replicas changed in the last `period` seconds, in `events`.
    fn changed(events: &[(Instant, i32)], now: Instant, period: i64) -> i32 {
        let period = Duration::from_secs(period.max(0) as u64);
        events.iter().filter(|(at, _)| now.duration_since(*at) < period).map(|(_, n)| n).sum()
    }

    /// How far the policies let replicas go from `current` (up or down).
    fn rate_limit(&self, now: Instant, current: i32, rules: &Rules, up: bool) -> i32 {
        if rules.select == "Disabled" {
            return current;
        }
        // For scaling up "Min" selects the smallest change, for scaling down the largest
        // remaining count; "Max" the opposite.
        let pick_lowest = (rules.select == "Min") == up;
        let mut result: Option<i32> = None;
        for (kind, value, period) in &rules.policies {
            let start = current - Self::changed(&self.ups, now, *period) + Self::changed(&self.downs, now, *period);
            let proposed = match (kind.as_str(), up) {
                ("Pods", true) => start + *value as i32,
                ("Pods", false) => start - *value as i32,
                ("Percent", true) => (f64::from(start) * (1.0 + *value as f64 / 100.0)).ceil() as i32,
                (_, _) => (f64::from(start) * (1.0 - *value as f64 / 100.0)) as i32,
            };
            result = Some(match result {
                None => proposed,
                Some(r) if pick_lowest => r.min(proposed),
                Some(r) => r.max(proposed),
            });
        }
        result.unwrap_or(current)
    }

    fn record_scale(&mut self, now: Instant, from: i32, to: i32) {
        let keep = Duration::from_secs(1800);
        self.ups.retain(|(at, _)| now.duration_since(*at) < keep);
        self.downs.retain(|(at, _)| now.duration_since(*at) < keep);
        if to > from {
            self.ups.push((now, to - from));
        } else {
            self.downs.push((now, from - to));
        }
    }
}

/// A condition: status, reason, message.
type Condition = (&'static str, String, String);

/// Stabilizes and limits `desired`; returns the replicas to set and the AbleToScale and
/// ScalingLimited conditions it leads to (upstream's normalizeDesiredReplicasWithBehaviors).
fn normalize(
    history: &mut History,
    now: Instant,
    (current, desired, min, max): (i32, i32, i32, i32),
    up: &Rules,
    down: &Rules,
) -> (i32, Condition, Condition) {
    let stabilized = history.stabilize(now, current, desired, up, down);
    let able = if stabilized != desired {
        if desired >= current {
            (
                "True",
                "ScaleUpStabilized".into(),
                "recent recommendations were lower than current one, applying the lowest recent recommendation".into(),
            )
        } else {
            (
                "True",
                "ScaleDownStabilized".into(),
                "recent recommendations were higher than current one, applying the highest recent recommendation"
                    .into(),
            )
        }
    } else {
        ("True", "ReadyForNewScale".into(), "recommended size matches current size".into())
    };
    let within =
        ("False", "DesiredWithinRange".to_string(), "the desired count is within the acceptable range".to_string());
    let limited = |reason: &str, message: &str| ("True", reason.to_string(), message.to_string());
    if stabilized > current {
        let limit = history.rate_limit(now, current, up, true).max(current);
        let (allowed, condition) = if max > limit {
            (
                limit,
                limited("ScaleUpLimit", "the desired replica count is increasing faster than the maximum scale rate"),
            )
        } else {
            (max, limited("TooManyReplicas", "the desired replica count is more than the maximum replica count"))
        };
        if stabilized > allowed {
            return (allowed, able, condition);
        }
    } else if stabilized < current {
        let limit = history.rate_limit(now, current, down, false).min(current);
        let (allowed, condition) = if min < limit {
            (
                limit,
                limited("ScaleDownLimit", "the desired replica count is decreasing faster than the maximum scale rate"),
            )
        } else {
            (min, limited("TooFewReplicas", "the desired replica count is less than the minimum replica count"))
        };
        if stabilized < allowed {
            return (allowed, able, condition);
        }
    }
    (stabilized, able, within)
}

/// One pod of the target as the replica calculator sees it.
#[derive(Clone, Debug)]
pub struct PodSample {
    pub name: String,
    /// Being deleted, or failed: left out entirely.
    pub ignored: bool,
    /// Pending, or (for CPU) not Ready: left out unless the others say scale up.
    pub unready: bool,
    /// The sum of its containers' requests of the resource; Err names a container
    /// without one.
    pub request: Result<f64, String>,
    /// Its usage of the resource, when metrics.k8s.io has a figure.
    pub usage: Option<f64>,
}

/// What a resource metric aims at.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// A percentage of the pods' requests.
    Utilization(f64),
    /// An average per pod, in the resource's units.
    AverageValue(f64),
}

/// A metric's proposal: replicas, and the current utilization (percent, for
/// utilization targets) and average usage.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    pub replicas: i32,
    pub utilization: Option<i64>,
    pub average: f64,
}

/// Upstream's GetResourceReplicas and GetRawResourceReplicas.
pub fn resource_replicas(current: i32, resource: &str, target: Target, pods: &[PodSample]) -> Result<Proposal, String> {
    if pods.is_empty() {
        return Err("no pods returned by selector while calculating replica count".into());
    }
    let counted: Vec<&PodSample> = pods.iter().filter(|p| !p.ignored).collect();
    let ready: Vec<&PodSample> = counted.iter().copied().filter(|p| !p.unready && p.usage.is_some()).collect();
    let missing: Vec<&PodSample> = counted.iter().copied().filter(|p| !p.unready && p.usage.is_none()).collect();
    let unready: Vec<&PodSample> = counted.iter().copied().filter(|p| p.unready).collect();
    if ready.is_empty() {
        return Err("did not receive metrics for targeted pods (pods might be unready)".into());
    }
    // (usage, request) of each pod taken into account.
    let request = |p: &PodSample| -> Result<f64, String> { p.request.clone() };
    let ratio_of = |samples: &[(f64, f64)]| -> (f64, Option<i64>, f64) {
        let usage: f64 = samples.iter().map(|s| s.0).sum();
        let average = usage / samples.len() as f64;
        match target {
            Target::Utilization(percent) => {
                let requested: f64 = samples.iter().map(|s| s.1).sum();
                let utilization = if requested > 0.0 { usage * 100.0 / requested } else { 0.0 };
                (utilization / percent, Some(utilization as i64), average)
            }
            Target::AverageValue(value) => (average / value, None, average),
        }
    };
    let mut samples = Vec::new();
    for p in &ready {
        let req = if matches!(target, Target::Utilization(_)) {
            request(p).map_err(|c| missing_request(resource, &c, &p.name))?
        } else {
            0.0
        };
        samples.push((p.usage.unwrap_or(0.0), req));
    }
    let (ratio, utilization, average) = ratio_of(&samples);
    let scale_up_with_unready = !unready.is_empty() && ratio > 1.0;
    if !scale_up_with_unready && missing.is_empty() {
        if (1.0 - ratio).abs() <= TOLERANCE {
            return Ok(Proposal { replicas: current, utilization, average });
        }
        return Ok(Proposal { replicas: (ratio * ready.len() as f64).ceil() as i32, utilization, average });
    }
    let mut adjusted = samples.clone();
    for p in &missing {
        let req = match target {
            Target::Utilization(_) => request(p).map_err(|c| missing_request(resource, &c, &p.name))?,
            Target::AverageValue(_) => 0.0,
        };
        let assumed = match target {
            // Scaling down: a pod without a figure counts as using its request (or the
            // target, when that is higher); scaling up, as idle.
            Target::Utilization(percent) if ratio < 1.0 => req * percent.max(100.0) / 100.0,
            Target::AverageValue(value) if ratio < 1.0 => value,
            _ => 0.0,
        };
        adjusted.push((assumed, req));
    }
    if scale_up_with_unready {
        for p in &unready {
            let req = match target {
                Target::Utilization(_) => request(p).map_err(|c| missing_request(resource, &c, &p.name))?,
                Target::AverageValue(_) => 0.0,
            };
            adjusted.push((0.0, req));
        }
    }
    let (new_ratio, _, _) = ratio_of(&adjusted);
    let reversed = (ratio < 1.0 && new_ratio > 1.0) || (ratio > 1.0 && new_ratio < 1.0);
    if (1.0 - new_ratio).abs() <= TOLERANCE || reversed {
        return Ok(Proposal { replicas: current, utilization, average });
    }
    let replicas = (new_ratio * adjusted.len() as f64).ceil() as i32;
    if (new_ratio < 1.0 && replicas > current) || (new_ratio > 1.0 && replicas < current) {
        return Ok(Proposal { replicas: current, utilization, average });
    }
    Ok(Proposal { replicas, utilization, average })
}

fn missing_request(resource: &str, container: &str, pod: &str) -> String {
    format!("missing request for {resource} in container {container} of Pod {pod}")
}

/// What every evaluation shares: the controller's client, the pods, its event recorder,
/// each autoscaler's history, and the API resources of the scale targets' kinds.
struct Context {
    client: kube::Client,
    pods: Informer<Pod>,
    events: Recorder,
    histories: Mutex<HashMap<String, History>>,
    /// By `apiVersion` and `kind`: found by discovery once, not on every evaluation
    /// (upstream's controller keeps a cached REST mapper).
    resources: Mutex<HashMap<(String, String), ApiResource>>,
}

/// A sample of `pod` for `resource` with its usage from `metrics` (PodMetrics by name).
fn sample(pod: &Pod, resource: &str, metrics: &HashMap<String, f64>) -> PodSample {
    let name = pod.name_any();
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_default();
    let containers = pod.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default();
    let mut request = Ok(0.0);
    for c in &containers {
        let amount = c.resources.as_ref().and_then(|r| r.requests.as_ref()).and_then(|r| r.get(resource));
        match (amount.and_then(|q| krate_api::quantity::parse(&q.0)), &mut request) {
            (Some(v), Ok(total)) => *total += v,
            (None, Ok(_)) => request = Err(c.name.clone()),
            _ => {}
        }
    }
    PodSample {
        ignored: pod.metadata.deletion_timestamp.is_some() || phase == "Failed",
        unready: phase == "Pending" || (resource == "cpu" && !is_ready(pod)),
        request,
        usage: metrics.get(&name).copied(),
        name,
    }
}

/// Usage of `resource` per pod (the sum of its containers) for the pods `selector` picks.
async fn pod_usage(
    client: &kube::Client,
    ns: &str,
    selector: &str,
    resource: &str,
) -> Result<HashMap<String, f64>, String> {
    let ar = ApiResource {
        group: "metrics.k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "metrics.k8s.io/v1beta1".into(),
        kind: "PodMetrics".into(),
        plural: "pods".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let list = api.list(&ListParams::default().labels(selector)).await.map_err(|e| {
        format!("unable to get metrics for resource {resource}: unable to fetch metrics from resource metrics API: {e}")
    })?;
    Ok(list
        .items
        .iter()
        .map(|m| {
            let containers = m.data["containers"].as_array().cloned().unwrap_or_default();
            let usage = containers
                .iter()
                .filter_map(|c| c["usage"][resource].as_str().and_then(krate_api::quantity::parse))
                .sum();
            (m.name_any(), usage)
        })
        .collect())
}

/// The API resource of a scale target (`apiVersion` + `kind`) by discovery.
async fn target_resource(ctx: &Context, api_version: &str, kind: &str) -> Result<ApiResource, String> {
    let key = (api_version.to_string(), kind.to_string());
    if let Some(found) = ctx.resources.lock().expect("hpa resources").get(&key) {
        return Ok(found.clone());
    }
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
    let (ar, _) = kube::discovery::pinned_kind(&ctx.client, &gvk)
        .await
        .map_err(|e| format!("unable to determine resource for scale target reference: {e}"))?;
    ctx.resources.lock().expect("hpa resources").insert(key, ar.clone());
    Ok(ar)
}

/// Sets `kind` in `conditions` (keeping its transition time when the status stays).
fn set_condition(conditions: &mut Vec<Value>, kind: &str, (status, reason, message): &Condition) {
    let now = jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default();
    let since = conditions
        .iter()
        .find(|c| c["type"] == kind && c["status"] == *status)
        .map(|c| c["lastTransitionTime"].clone())
        .unwrap_or(json!(now));
    conditions.retain(|c| c["type"] != kind);
    conditions.push(
        json!({"type": kind, "status": status, "lastTransitionTime": since, "reason": reason, "message": message}),
    );
}

/// Converts an amount in the resource's units to a quantity string (CPU in millicores).
fn quantity(resource: &str, amount: f64) -> String {
    if resource == "cpu" {
        format!("{}m", (amount * 1000.0).round() as i64)
    } else {
        format!("{}", amount.round() as i64)
    }
}

async fn reconcile(hpa: Arc<HorizontalPodAutoscaler>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = hpa.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", hpa.name_any());
    let generation = hpa.metadata.generation.unwrap_or(0);
    {
        let mut histories = ctx.histories.lock().expect("hpa histories");
        let history = histories.entry(key.clone()).or_default();
        if let Some((at, seen)) = history.evaluated {
            let since = at.elapsed();
            if seen == generation && since < SYNC_PERIOD {
                return Ok(Action::requeue(SYNC_PERIOD - since));
            }
        }
        history.evaluated = Some((Instant::now(), generation));
    }
    let object = serde_json::to_value(&*hpa)?;
    let spec = &object["spec"];
    let status_before = object["status"].clone();
    let mut conditions: Vec<Value> = status_before["conditions"].as_array().cloned().unwrap_or_default();
    let mut status = json!({"currentReplicas": status_before["currentReplicas"], "desiredReplicas": status_before["desiredReplicas"]});
    if let Some(at) = status_before.get("lastScaleTime") {
        status["lastScaleTime"] = at.clone();
    }
    let href = reference(&*hpa);
    let target = &spec["scaleTargetRef"];
    let (api_version, kind, name) = (
        target["apiVersion"].as_str().unwrap_or_default(),
        target["kind"].as_str().unwrap_or_default(),
        target["name"].as_str().unwrap_or_default(),
    );
    let scale = match target_resource(&ctx, api_version, kind).await {
        Ok(ar) => {
            let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
            api.get_scale(name).await.map(|s| (api, s)).map_err(|e| e.to_string())
        }
        Err(e) => Err(e),
    };
    let (api, scale) = match scale {
        Ok(found) => found,
        Err(e) => {
            ctx.events.warning(&href, "FailedGetScale", &e).await;
            let message = format!("the HPA controller was unable to get the target's current scale: {e}");
            set_condition(&mut conditions, "AbleToScale", &("False", "FailedGetScale".into(), message));
            write_status(&ctx, &hpa, &ns, status, conditions, &status_before).await?;
            return Ok(Action::requeue(SYNC_PERIOD));
        }
    };
    set_condition(
        &mut conditions,
        "AbleToScale",
        &("True", "SucceededGetScale".into(), "the HPA controller was able to get the target's current scale".into()),
    );
    let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let selector = scale.status.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default();
    let min = spec["minReplicas"].as_i64().unwrap_or(1) as i32;
    let max = spec["maxReplicas"].as_i64().unwrap_or(1) as i32;
    status["currentReplicas"] = json!(current);
    let now = Instant::now();
    let mut reason = String::new();
    let desired = if current == 0 && min != 0 {
        set_condition(
            &mut conditions,
            "ScalingActive",
            &(
                "False",
                "ScalingDisabled".into(),
                "scaling is disabled since the replica count of the target is zero".into(),
            ),
        );
        0
    } else if current > max {
        reason = "Current number of replicas above Spec.MaxReplicas".into();
        max
    } else if current < min {
        reason = "Current number of replicas below Spec.MinReplicas".into();
        min
    } else {
        let metrics = match spec["metrics"].as_array() {
            Some(m) if !m.is_empty() => m.clone(),
            _ => vec![
                json!({"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}),
            ],
        };
        let parsed = LabelSelector::parse(&selector).ok().filter(|_| !selector.is_empty());
        let pods: Vec<Arc<Pod>> = match &parsed {
            Some(sel) => ctx.pods.in_namespace(&ns).into_iter().filter(|p| sel.matches(p.labels())).collect(),
            None => Vec::new(),
        };
        let mut best: Option<(i32, String)> = None;
        let mut current_metrics = Vec::new();
        let mut failure: Option<(String, String)> = None;
        if parsed.is_none() {
            failure = Some(("InvalidSelector".into(), "the HPA target's scale is missing a selector".into()));
        }
        for metric in metrics.iter().filter(|_| parsed.is_some()) {
            if metric["type"] != "Resource" {
                failure = Some((
                    "InvalidMetricSourceType".into(),
                    format!(
                        "the HPA was unable to compute the replica count: unsupported metric source type {}",
                        metric["type"]
                    ),
                ));
                continue;
            }
            let resource = metric["resource"]["name"].as_str().unwrap_or("cpu");
            let goal = &metric["resource"]["target"];
            let (target_kind, metric_name) = match goal["type"].as_str() {
                Some("AverageValue") => (
                    Target::AverageValue(
                        goal["averageValue"].as_str().and_then(krate_api::quantity::parse).unwrap_or(0.0),
                    ),
                    format!("{resource} resource"),
                ),
                _ => (
                    Target::Utilization(goal["averageUtilization"].as_f64().unwrap_or(80.0)),
                    format!("{resource} resource utilization (percentage of request)"),
                ),
            };
            let computed = match pod_usage(&ctx.client, &ns, &selector, resource).await {
                Ok(usage) => {
                    let samples: Vec<PodSample> = pods.iter().map(|p| sample(p, resource, &usage)).collect();
                    resource_replicas(current, resource, target_kind, &samples)
                }
                Err(e) => Err(e),
            };
            match computed {
                Ok(proposal) => {
                    let mut value = json!({"averageValue": quantity(resource, proposal.average)});
                    if let Some(u) = proposal.utilization {
                        value["averageUtilization"] = json!(u);
                    }
                    current_metrics.push(json!({"type": "Resource", "resource": {"name": resource, "current": value}}));
                    if best.as_ref().is_none_or(|(r, _)| proposal.replicas > *r) {
                        best = Some((proposal.replicas, metric_name));
                    }
                }
                Err(e) => {
                    let message = format!(
                        "the HPA was unable to compute the replica count: failed to get {resource} utilization: {e}"
                    );
                    failure = Some(("FailedGetResourceMetric".into(), message));
                }
            }
        }
        status["currentMetrics"] = json!(current_metrics);
        let Some((proposed, metric_name)) = best else {
            let (why, message) = failure.unwrap_or_else(|| ("FailedGetResourceMetric".into(), "no metrics".into()));
            ctx.events.warning(&href, "FailedComputeMetricsReplicas", &message).await;
            set_condition(&mut conditions, "ScalingActive", &("False", why, message));
            write_status(&ctx, &hpa, &ns, status, conditions, &status_before).await?;
            return Ok(Action::requeue(SYNC_PERIOD));
        };
        set_condition(
            &mut conditions,
            "ScalingActive",
            &(
                "True",
                "ValidMetricFound".into(),
                format!("the HPA was able to successfully calculate a replica count from {metric_name}"),
            ),
        );
        if proposed > current {
            reason = format!("{metric_name} above target");
        } else if proposed < current {
            reason = "All metrics below target".into();
        }
        let behavior = &spec["behavior"];
        let (up, down) = (rules(&behavior["scaleUp"], true), rules(&behavior["scaleDown"], false));
        let mut histories = ctx.histories.lock().expect("hpa histories");
        let history = histories.entry(key.clone()).or_default();
        if history.recommendations.is_empty() {
            // Upstream's initial recommendation: the current count.
            history.recommendations.push((now, current));
        }
        let (normalized, able, limited) = normalize(history, now, (current, proposed, min, max), &up, &down);
        set_condition(&mut conditions, "AbleToScale", &able);
        set_condition(&mut conditions, "ScalingLimited", &limited);
        normalized
    };
    status["desiredReplicas"] = json!(desired);
    if desired != current && !(current == 0 && min != 0) {
        match update_scale(&api, name, scale, desired).await {
            Ok(_) => {
                ctx.histories
                    .lock()
                    .expect("hpa histories")
                    .entry(key)
                    .or_default()
                    .record_scale(now, current, desired);
                let message = format!("New size: {desired}; reason: {reason}");
                ctx.events.normal(&href, "SuccessfulRescale", &message).await;
                set_condition(
                    &mut conditions,
                    "AbleToScale",
                    &(
                        "True",
                        "SucceededRescale".into(),
                        format!("the HPA controller was able to update the target scale to {desired}"),
                    ),
                );
                status["lastScaleTime"] =
                    json!(jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default());
            }
            Err(e) => {
                let message = format!("New size: {desired}; reason: {reason}; error: {e}");
                ctx.events.warning(&href, "FailedRescale", &message).await;
                set_condition(
                    &mut conditions,
                    "AbleToScale",
                    &(
                        "False",
                        "FailedUpdateScale".into(),
                        format!("the HPA controller was unable to update the target scale: {e}"),
                    ),
                );
            }
        }
    }
    write_status(&ctx, &hpa, &ns, status, conditions, &status_before).await?;
    Ok(Action::requeue(SYNC_PERIOD))
}

/// Updates the target's scale (the verb upstream's role grants), reading it again
/// after a conflict.
async fn update_scale(
    api: &Api<DynamicObject>,
    name: &str,
    mut scale: k8s_openapi::api::autoscaling::v1::Scale,
    replicas: i32,
) -> Result<(), kube::Error> {
    for _ in 0..5 {
        scale.spec.get_or_insert_with(Default::default).replicas = Some(replicas);
        match api.replace_scale(name, &PostParams::default(), &scale).await {
            Err(kube::Error::Api(e)) if e.code == 409 => scale = api.get_scale(name).await?,
            other => return other.map(|_| ()),
        }
    }
    Ok(())
}

/// Writes the status when it changed.
async fn write_status(
    ctx: &Context,
    hpa: &HorizontalPodAutoscaler,
    ns: &str,
    mut status: Value,
    conditions: Vec<Value>,
    before: &Value,
) -> Result<(), Error> {
    let order = ["AbleToScale", "ScalingActive", "ScalingLimited"];
    let mut conditions = conditions;
    conditions.sort_by_key(|c| order.iter().position(|o| c["type"] == *o).unwrap_or(order.len()));
    status["conditions"] = json!(conditions);
    if let Some(generation) = hpa.metadata.generation {
        status["observedGeneration"] = json!(generation);
    }
    if status["currentMetrics"].is_null() {
        status["currentMetrics"] = before["currentMetrics"].clone();
    }
    let status: serde_json::Map<String, Value> =
        status.as_object().cloned().unwrap_or_default().into_iter().filter(|(_, v)| !v.is_null()).collect();
    let status = Value::Object(status);
    if &status == before {
        return Ok(());
    }
    // An update, the verb upstream's role grants; it carries the resourceVersion read,
    // so a status written meanwhile makes this fail and the next evaluation start over.
    let mut updated = hpa.clone();
    updated.status = Some(serde_json::from_value(status)?);
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    api.replace_status(&hpa.name_any(), &PostParams::default(), &updated).await?;
    Ok(())
}

fn error_policy(hpa: Arc<HorizontalPodAutoscaler>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::debug!(hpa = %hpa.name_any(), error = %err, "autoscaler sync failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

pub async fn run(client: kube::Client, pods: &Informer<Pod>) -> anyhow::Result<()> {
    pods.synced().await;
    let context = Context {
        client: client.clone(),
        pods: pods.clone(),
        events: Recorder::new(client.clone(), "horizontal-pod-autoscaler"),
        histories: Mutex::default(),
        resources: Mutex::default(),
    };
    Controller::new(Api::<HorizontalPodAutoscaler>::all(client), watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(context))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, request: f64, usage: Option<f64>) -> PodSample {
        PodSample { name: name.into(), ignored: false, unready: false, request: Ok(request), usage }
    }

    #[test]
    fn utilization_above_target_scales_up_in_proportion() {
        // Two pods at 1 core of 0.5 requested: 200% against 50% wants 8.
        let pods = [pod("a", 0.5, Some(1.0)), pod("b", 0.5, Some(1.0))];
        let p = resource_replicas(2, "cpu", Target::Utilization(50.0), &pods).unwrap();
        assert_eq!((p.replicas, p.utilization), (8, Some(200)));
        // Within the 10% tolerance nothing changes.
        let pods = [pod("a", 1.0, Some(0.52)), pod("b", 1.0, Some(0.52))];
        assert_eq!(resource_replicas(2, "cpu", Target::Utilization(50.0), &pods).unwrap().replicas, 2);
    }

    #[test]
    fn pods_without_figures_damp_the_change() {
        // Scaling down with a pod lacking figures: it counts at its request, so 2 pods
        // at 10% and one at 100% of 1 core is 40% of 50%: ratio 0.8, ceil(2.4) = 3.
        let pods = [pod("a", 1.0, Some(0.1)), pod("b", 1.0, Some(0.1)), pod("c", 1.0, None)];
        assert_eq!(resource_replicas(3, "cpu", Target::Utilization(50.0), &pods).unwrap().replicas, 3);
        // Scaling up with an unready pod: it counts as idle.
        let mut unready = pod("c", 1.0, None);
        unready.unready = true;
        let pods = [pod("a", 1.0, Some(1.0)), pod("b", 1.0, Some(1.0)), unready];
        assert_eq!(resource_replicas(3, "cpu", Target::Utilization(50.0), &pods).unwrap().replicas, 4);
    }

    #[test]
    fn a_pod_without_a_request_is_an_error_with_upstreams_words() {
        let mut p = pod("a", 0.0, Some(1.0));
        p.request = Err("main".into());
        let err = resource_replicas(1, "cpu", Target::Utilization(50.0), &[p]).unwrap_err();
        assert_eq!(err, "missing request for cpu in container main of Pod a");
        assert!(resource_replicas(1, "cpu", Target::Utilization(50.0), &[]).is_err());
    }

    #[test]
    fn average_values_divide_usage_by_the_target() {
        let pods = [pod("a", 0.0, Some(0.3)), pod("b", 0.0, Some(0.5))];
        let p = resource_replicas(2, "cpu", Target::AverageValue(0.2), &pods).unwrap();
        assert_eq!((p.replicas, p.utilization), (4, None));
    }

    #[test]
    fn scale_down_waits_for_its_stabilization_window() {
        let (up, down) = (rules(&Value::Null, true), rules(&json!({"stabilizationWindowSeconds": 60}), false));
        assert_eq!(down.window_seconds, 60);
        let mut history = History::default();
        let t0 = Instant::now();
        history.recommendations.push((t0, 4));
        let (n, able, _) = normalize(&mut history, t0 + Duration::from_secs(30), (4, 1, 1, 10), &up, &down);
        assert_eq!((n, able.1.as_str()), (4, "ScaleDownStabilized"));
        let (n, _, _) = normalize(&mut history, t0 + Duration::from_secs(100), (4, 1, 1, 10), &up, &down);
        assert_eq!(n, 1, "the high recommendation left the window");
    }

    #[test]
    fn scale_up_is_limited_by_the_policies_and_the_maximum() {
        let (up, down) = (rules(&Value::Null, true), rules(&Value::Null, false));
        let mut history = History::default();
        let now = Instant::now();
        // From 1: Pods 4 (to 5) or Percent 100 (to 2), Max picks 5.
        let (n, _, limited) = normalize(&mut history, now, (1, 20, 1, 10), &up, &down);
        assert_eq!((n, limited.1.as_str()), (5, "ScaleUpLimit"));
        history.record_scale(now, 1, 5);
        // Within the same period the start is 1 again: still at most 5.
        let (n, _, _) = normalize(&mut history, now + Duration::from_secs(5), (5, 20, 1, 10), &up, &down);
        assert_eq!(n, 5);
        let (n, _, limited) = normalize(&mut history, now + Duration::from_secs(20), (5, 20, 1, 10), &up, &down);
        assert_eq!((n, limited.1.as_str()), (10, "TooManyReplicas"));
        let disabled = Rules { select: "Disabled".into(), ..up.clone() };
        let (n, _, _) = normalize(&mut History::default(), now, (3, 9, 1, 10), &disabled, &down);
        assert_eq!(n, 3);
    }
}

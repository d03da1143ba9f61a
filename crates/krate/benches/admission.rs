//! Admission benchmark: ConfigMap create latency (p50/p99, one create in flight, and
//! throughput with 16 in flight) through a real `krate server` with nothing extra in the
//! way, with one allowing validating webhook (the tests' HTTPS webhook server on
//! 127.0.0.1), and with one ValidatingAdmissionPolicy (`object.data.size() < 100`), in
//! the same run. Each mode writes into its own namespace; the webhook and the policy
//! select theirs by namespace label, so all three exist throughout and rounds of the
//! three modes alternate (this machine's speed drifts between runs).
//!
//!     cargo bench -p krate --bench admission
//!     KRATE_BENCH_N=200 cargo bench -p krate --bench admission
//!
//! Prints a report; numbers are recorded in BENCHMARKS.md.

mod common;

#[path = "../tests/common/https.rs"]
#[allow(dead_code)]
mod https;
#[path = "../tests/common/webhook.rs"]
mod webhook;

use std::time::Duration;

use common::{run_with, BenchServer, Stats};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use serde_json::json;

const ROUNDS: usize = 5;
const MODES: [&str; 3] = ["none", "webhook", "policy"];

fn configmap(i: usize) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": format!("cm-{i:06}")}, "data": {"key": "value"}})).unwrap()
}

async fn create_dynamic(client: &kube::Client, api_version: &str, kind: &str, plural: &str, body: serde_json::Value) {
    let (group, version) = api_version.split_once('/').unwrap();
    let resource = ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    let object: DynamicObject = serde_json::from_value(body).unwrap();
    Api::<DynamicObject>::all_with(client.clone(), &resource).create(&PostParams::default(), &object).await.unwrap();
}

/// Creates with `concurrency` in flight.
async fn creates(api: &Api<ConfigMap>, range: std::ops::Range<usize>, concurrency: usize) -> Stats {
    let api = api.clone();
    run_with(concurrency, range, move |i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &configmap(i)).await.expect("create");
        }
    })
    .await
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("KRATE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
    let server = BenchServer::start(&["--disable-agent"]).await;
    let client = server.client.clone();
    let hooks = webhook::WebhookServer::start();
    for mode in MODES {
        let namespace: Namespace = serde_json::from_value(
            json!({"metadata": {"name": format!("bench-{mode}"), "labels": {"admission": mode}}}),
        )
        .unwrap();
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await.unwrap();
    }
    create_dynamic(&client, "admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration", "validatingwebhookconfigurations", json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "allow"},
        "webhooks": [{"name": "allow.bench.krate", "clientConfig": {"url": hooks.url("/allow"), "caBundle": hooks.ca_bundle},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]}],
            "namespaceSelector": {"matchLabels": {"admission": "webhook"}},
            "sideEffects": "None", "admissionReviewVersions": ["v1"]}]})).await;
    create_dynamic(&client, "admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy", "validatingadmissionpolicies", json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "small"},
        "spec": {"matchConstraints": {"resourceRules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]}]},
            "validations": [{"expression": "object.data.size() < 100"}]}})).await;
    create_dynamic(
        &client,
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicyBinding",
        "validatingadmissionpolicybindings",
        json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "small"},
        "spec": {"policyName": "small", "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"admission": "policy"}}}}}),
    )
    .await;
    // Everything is in force once the cache has it: a consistent list waits for that.
    Api::<ConfigMap>::all(client.clone()).list(&Default::default()).await.unwrap();

    let apis: Vec<Api<ConfigMap>> =
        MODES.iter().map(|m| Api::namespaced(client.clone(), &format!("bench-{m}"))).collect();
    // Warm-up: connections, caches, the webhook's first TLS handshake.
    for api in &apis {
        creates(api, 10_000_000..10_000_050, 1).await;
    }
    // Per mode: every sequential create's latency, and each round's concurrent rate.
    let mut latency: Vec<Stats> = MODES.iter().map(|_| Stats { latencies: vec![], elapsed: Duration::ZERO }).collect();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    for round in 0..ROUNDS {
        for (m, api) in apis.iter().enumerate() {
            let base = round * 2 * n;
            latency[m].latencies.extend(creates(api, base..base + n, 1).await.latencies);
            rates[m].push(creates(api, base + n..base + 2 * n, 16).await.rate());
        }
    }
    let reviews = hooks.reviews("/allow");
    let webhook_calls = reviews.len();
    let elsewhere = reviews.iter().filter(|r| r["request"]["namespace"] != "bench-webhook").count();
    assert_eq!(elsewhere, 0, "the webhook is called for its namespace only");
    println!("\nConfigMap creates, {ROUNDS} alternating rounds of {n} sequential and {n} with 16 in flight per mode");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut base = (0.0, 0.0, 0.0);
    for (m, mode) in MODES.iter().enumerate() {
        let ms = |p: f64| latency[m].percentile(p).as_secs_f64() * 1e3;
        let (p50, p99, rate) = (ms(0.5), ms(0.99), median(&mut rates[m]));
        if m == 0 {
            base = (p50, p99, rate);
        }
        println!(
            "{mode:<8} p50 {p50:>6.2} ms ({:.2}x)   p99 {p99:>6.2} ms ({:.2}x)   {rate:>6.0} creates/s ({:.2}x)",
            p50 / base.0,
            p99 / base.1,
            rate / base.2
        );
    }
    let expected = ROUNDS * 2 * n + 50;
    println!("webhook calls: {webhook_calls} for {expected} creates in its namespace");
    assert!(webhook_calls >= expected, "every create in the webhook's namespace called it");
    // The policy was in force: a ConfigMap of 100 keys is refused in its namespace.
    let data: serde_json::Map<String, serde_json::Value> = (0..100).map(|i| (format!("k{i}"), json!("v"))).collect();
    let big: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "big"}, "data": data})).unwrap();
    assert!(apis[2].create(&PostParams::default(), &big).await.is_err(), "the policy refuses 100 keys");
}

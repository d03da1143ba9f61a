//! Resource metrics and autoscaling with real containers: the node agent's usage
//! figures reach `kubectl top` through krate's metrics.k8s.io, and the
//! HorizontalPodAutoscaler acts on them.

mod common;

use common::node::{running_pods, server_with_agent, wait_node_ready};
use common::registry::TestRegistry;
use common::{holds_within, TestServer};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use serde_json::json;

/// A pod of busybox running `script` (labelled app=`name`).
fn run_pod(server: &TestServer, registry: &TestRegistry, name: &str, script: &str) {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{"name": "main", "image": registry.image("busybox"), "command": ["sh", "-c", script]}],
            "terminationGracePeriodSeconds": 0}});
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&pod.to_string()));
    assert!(out.status.success(), "creating pod {name}: {}", common::stderr(&out));
}

/// The millicores `kubectl top` printed for `name` (rows of NAME CPU MEMORY).
fn millicores(table: &str, name: &str) -> Option<u64> {
    let row = table.lines().find(|l| l.split_whitespace().next() == Some(name))?;
    row.split_whitespace().nth(1)?.strip_suffix('m')?.parse().ok()
}

/// Spins one CPU.
const BURN: &str = "while :; do :; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_top_shows_what_real_containers_use() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 1, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    run_pod(&server, &registry, "burn", BURN);
    run_pod(&server, &registry, "idle", "sleep 3600");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    running_pods(&pods, "app in (burn,idle)", 2).await;

    // Figures over one scrape interval settle within a few; a pod spinning one CPU reads
    // about 1000m (on a busy machine a little less).
    let mut table = String::new();
    let settled = holds_within(90, || {
        let out = server.kubectl(&["top", "pods"]);
        table = String::from_utf8_lossy(&out.stdout).into_owned();
        millicores(&table, "burn").is_some_and(|m| m >= 700) && millicores(&table, "idle").is_some()
    });
    assert!(settled, "kubectl top pods never showed burn near one CPU:\n{table}");
    let (burn, idle) = (millicores(&table, "burn").unwrap(), millicores(&table, "idle").unwrap());
    assert!(burn <= 1100, "one spinning process reads more than a CPU: {burn}m\n{table}");
    assert!(idle <= 50, "a sleeping pod reads {idle}m\n{table}");

    eprintln!("{table}");
    let containers = server.kubectl_ok(&["top", "pods", "burn", "--containers"]);
    let row = containers.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("burn") && row.split_whitespace().nth(1) == Some("main"), "{containers}");

    let nodes = server.kubectl_ok(&["top", "nodes"]);
    eprintln!("{nodes}");
    let node_cpu = millicores(&nodes, "node-1").unwrap_or_else(|| panic!("no CPU figure for node-1:\n{nodes}"));
    assert!(node_cpu >= 700, "the node runs a spinning pod but reads {node_cpu}m\n{nodes}");
    let row = nodes.lines().find(|l| l.starts_with("node-1")).unwrap();
    let memory: u64 =
        row.split_whitespace().nth(3).and_then(|m| m.strip_suffix("Mi")).and_then(|m| m.parse().ok()).unwrap();
    assert!(memory > 0, "{nodes}");

    // The API as metrics-server serves it: a missing pod is NotFound with its name.
    let missing = server.kubectl(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/nope"]);
    assert!(common::stderr(&missing).contains("NotFound"), "{}", common::stderr(&missing));
    let raw = server.kubectl_ok(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/burn"]);
    let metrics: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(metrics["kind"], "PodMetrics");
    assert_eq!(metrics["metadata"]["labels"]["app"], "burn");
    assert!(metrics["window"].as_str().unwrap().ends_with('s'), "{metrics}");
    let memory = metrics["containers"][0]["usage"]["memory"].as_str().unwrap();
    assert!(memory != "0" && memory != "0Ki", "a running shell uses some memory: {metrics}");
}

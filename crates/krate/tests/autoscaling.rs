//! Resource metrics and autoscaling with real containers: the node agent's usage
//! figures reach `kubectl top` through krate's metrics.k8s.io, and the
//! HorizontalPodAutoscaler acts on them. Each test has its own node number (bridge, pod
//! CIDR, agent port), since the tests of a file run at once.

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
        table = format!("{}{}", String::from_utf8_lossy(&out.stdout), common::stderr(&out));
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

/// The Deployment's replicas as its status counts them.
fn replicas(server: &TestServer, name: &str) -> i64 {
    let out = server.kubectl(&["get", "deployment", name, "-o", "jsonpath={.status.replicas}"]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoscaler_scales_a_busy_deployment_up_and_an_idle_one_back_down() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 2, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    // Each pod spins at its limit, 200m, twice its request: 200% of it, four times the
    // autoscaler's 50% target, while MODE is burn.
    let script = format!("if [ \"$MODE\" = burn ]; then {BURN}; else sleep 3600; fi");
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "burner"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "burner"}},
            "template": {"metadata": {"labels": {"app": "burner"}}, "spec": {"terminationGracePeriodSeconds": 0,
                "containers": [{"name": "main", "image": registry.image("busybox"), "command": ["sh", "-c", script],
                    "env": [{"name": "MODE", "value": "burn"}],
                    "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "200m"}}}]}}}});
    let hpa = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "burner"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "burner"},
            "minReplicas": 1, "maxReplicas": 3,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 20}}}});
    for object in [deployment, hpa] {
        let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&object.to_string()));
        assert!(out.status.success(), "creating {}: {}", object["kind"], common::stderr(&out));
    }
    let scaled_up = holds_within(150, || replicas(&server, "burner") == 3);
    let described = server.kubectl_ok(&["describe", "hpa", "burner"]);
    assert!(scaled_up, "the busy deployment was never scaled to its maximum:\n{described}");
    assert!(
        described.contains("New size: 3; reason: cpu resource utilization (percentage of request) above target"),
        "{described}"
    );
    let status = server.get_json(&["hpa", "burner"])["status"].clone();
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    let active =
        conditions.iter().find(|c| c["type"] == "ScalingActive").cloned().unwrap_or_else(|| panic!("{status}"));
    assert_eq!(active["reason"], "ValidMetricFound", "{status}");
    let utilization = status["currentMetrics"][0]["resource"]["current"]["averageUtilization"].as_i64().unwrap_or(0);
    assert!(utilization > 100, "pods spinning at twice their request read {utilization}%: {status}");

    // The load stops (new pods only sleep): after the 20 s window, back to one.
    server.kubectl_ok(&["set", "env", "deployment/burner", "MODE=idle"]);
    let scaled_down = holds_within(180, || replicas(&server, "burner") == 1);
    let described = server.kubectl_ok(&["describe", "hpa", "burner"]);
    assert!(scaled_down, "the idle deployment was never scaled back down:\n{described}");
    assert!(described.contains("New size: 1; reason: All metrics below target"), "{described}");
}

//! The node agent's container logs, on a server of their own: whether a finished
//! container's log is complete when its pod says it finished (the runtime may still be
//! copying its last output when it marks the container exited).

mod common;

use common::eventually;
use common::node::{server_with_agent, wait_node_ready};
use common::registry::TestRegistry;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "open: the agent's wait for the runtime to close a finished container's log does not always hold (96,059 of 100,000 lines in a full suite run); run with --ignored"]
async fn a_finished_containers_logs_are_complete_when_its_pod_says_it_finished() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 18, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // Output right up to the exit: the runtime may still be copying it into the log when
    // it marks the container exited. Read the logs the moment the pod says Succeeded.
    const LINES: usize = 100_000;
    for round in 0..5 {
        let name = format!("burst-{round}");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": registry.image("busybox"), "command": ["seq", LINES.to_string()]}]}}))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        eventually(60, "the pod to succeed", || async {
            (pods.get(&name).await.ok()?.status?.phase.as_deref() == Some("Succeeded")).then_some(())
        })
        .await;
        let logs = pods.logs(&name, &Default::default()).await.unwrap();
        assert_eq!(logs.lines().count(), LINES, "{name}: every line in the log once the pod Succeeded");
    }
}

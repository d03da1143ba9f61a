//! An upgrade as the README describes it: a running cluster of the previous release's
//! build (`scripts/previous-release`) has its server (and the agent in it) stopped and
//! started again on this build, over the same data directory. Nothing the cluster runs
//! may notice: the same pods, the same containers, not one restarted.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use common::node::{agent_args, container_status, http_get, keep_deployment, running_pods, wait_node_ready};
use common::registry::TestRegistry;
use common::{eventually, TestServer};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;

/// The previous release's krate, built (once, cached) by `scripts/previous-release`.
fn previous_release() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/previous-release");
    let out = Command::new(script).output().expect("run scripts/previous-release");
    assert!(out.status.success(), "scripts/previous-release failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// What `krate version` of `program` says first (`krate v0.1`, say).
fn version_of(program: &std::path::Path) -> String {
    let out = Command::new(program).arg("version").output().expect("run krate version");
    String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string()
}

/// Each pod's UID and its container's ID and start.
fn identities(pods: &[Pod]) -> HashMap<String, (String, String)> {
    pods.iter()
        .map(|p| {
            let status = container_status(p).unwrap();
            let container = (status["containerID"].to_string(), status["state"]["running"]["startedAt"].to_string());
            (p.metadata.uid.clone().unwrap(), container)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_upgraded_from_the_previous_release_keeps_every_pod_running() {
    let previous = previous_release();
    let current = PathBuf::from(env!("CARGO_BIN_EXE_krate"));
    let (old_version, new_version) = (version_of(&previous), version_of(&current));
    assert_ne!(old_version, new_version, "the previous release is another build");

    let registry = TestRegistry::start();
    let args = agent_args(&[&registry], 5, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = TestServer::start_program_with_agent(&previous, &args);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let (_, before) = keep_deployment(&server, &registry).await;
    let node_version = |node: &Node| node.status.as_ref()?.node_info.as_ref().map(|i| i.kubelet_version.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let reported = node_version(&nodes.get("node-1").await.unwrap()).unwrap_or_default();
    let old = old_version.trim_start_matches("krate ").to_string();
    assert!(reported.ends_with(&format!("+krate-{old}")), "the old agent reports {reported}, not {old}");

    server.replace_program(&current);
    let client = server.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let new = new_version.trim_start_matches("krate ").to_string();
    eventually(60, "the node to report the new agent's version", || async {
        let node = nodes.get("node-1").await.ok()?;
        node_version(&node)?.ends_with(&format!("+krate-{new}")).then_some(())
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let after = running_pods(&pods, "app=keep", 2).await;
    assert_eq!(identities(&after), identities(&before), "the same pods and containers, not restarted");
    for pod in &after {
        assert_eq!(container_status(pod).unwrap()["restartCount"], 0, "{pod:?}");
        let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
        assert!(http_get(&ip, 8080, "/").is_some(), "pod {ip} serves after the upgrade");
    }
    // The cluster goes on working on the new build: the Deployment scales.
    server.kubectl_ok(&["scale", "deployment", "keep", "--replicas=3"]);
    running_pods(&pods, "app=keep", 3).await;
}

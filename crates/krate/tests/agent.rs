//! The node agent with real containers: `krate server` with its embedded agent, which
//! starts its own containerd (runc, Debian's CNI bridge plugin), pulls krate's test
//! images from a real registry on 127.0.0.1, and runs pods. Each test has its own
//! server, containerd, bridge, pod CIDR and nftables table, all reset on drop.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use common::node::{
    agent_args, container_status, http_get, keep_deployment, running_pods, server_with_agent, wait_node_ready,
};
use common::registry::TestRegistry;
use common::{eventually, TestServer};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// What the server's containerd lists as `ctr <what> list` shows it (as an operator
/// would look): `containers` (sandboxes too), `images`, `tasks`.
fn containerd_list(server: &TestServer, what: &str, quiet: bool) -> String {
    let socket = server.data_dir().join("agent/containerd/containerd.sock");
    let mut ctr = std::process::Command::new("ctr");
    ctr.arg("--address").arg(&socket).args(["--namespace", "k8s.io", what, "list"]);
    if quiet {
        ctr.arg("--quiet");
    }
    let out = ctr.output().expect("run ctr");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sandboxes and containers the server's containerd still has.
fn containerd_containers(server: &TestServer) -> String {
    containerd_list(server, "containers", true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_runs_as_real_containers_with_their_own_ips() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 1, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let node: Node = Api::all(client.clone()).get("node-1").await.unwrap();
    let info = node.status.as_ref().unwrap().node_info.as_ref().unwrap();
    assert!(info.container_runtime_version.starts_with("containerd://"), "{info:?}");
    assert!(node.status.as_ref().unwrap().allocatable.as_ref().unwrap().contains_key("memory"));
    // The server's own node is a control-plane node, as kubeadm labels it.
    let roles = eventually(30, "the control-plane role", || async {
        let out = server.kubectl_ok(&["get", "nodes", "node-1"]);
        out.contains("control-plane").then_some(out)
    })
    .await;
    assert!(roles.lines().next().unwrap().contains("ROLES"), "{roles}");

    server.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        &format!("--image={}", registry.image("test-server")),
        "--replicas=3",
    ]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let running = running_pods(&pods, "app=web", 3).await;
    let ips: HashSet<String> = running.iter().map(|p| p.status.as_ref().unwrap().pod_ip.clone().unwrap()).collect();
    assert_eq!(ips.len(), 3, "pod IPs are distinct: {ips:?}");
    for pod in &running {
        let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
        let name = pod.metadata.name.clone().unwrap();
        let body =
            eventually(30, "the test server answering on its pod IP", || async { http_get(&ip, 8080, "/hello") }).await;
        assert_eq!(body, format!("{name} /hello"), "the pod's hostname is its name");
        let status = container_status(pod).unwrap();
        assert_eq!(status["restartCount"], 0);
        assert!(status["containerID"].as_str().unwrap().starts_with("containerd://"));
        assert_eq!(pod.status.as_ref().unwrap().qos_class.as_deref(), Some("BestEffort"));
    }

    // The container's process exits: it is restarted, and restartCount says so.
    let victim = running[0].clone();
    let victim_name = victim.metadata.name.clone().unwrap();
    let ip = victim.status.as_ref().unwrap().pod_ip.clone().unwrap();
    http_get(&ip, 8080, "/exit/3");
    let restarted = eventually(60, "the container restarted", || async {
        let pod = pods.get(&victim_name).await.ok()?;
        let s = container_status(&pod)?;
        (s["restartCount"] == 1 && s["state"]["running"].is_object()).then_some(s)
    })
    .await;
    assert_eq!(restarted["lastState"]["terminated"]["exitCode"], 3, "{restarted}");
    assert_eq!(restarted["lastState"]["terminated"]["reason"], "Error");

    // kubectl logs reaches the container's output through the API server and the agent.
    let logs = server.kubectl_ok(&["logs", &victim_name]);
    assert_eq!(logs, "test-server listening on :8080\n");
    let previous = server.kubectl_ok(&["logs", &victim_name, "--previous", "--timestamps"]);
    assert!(previous.ends_with(" test-server listening on :8080\n") && previous.starts_with("20"), "{previous:?}");
    let out = server.kubectl(&["logs", &victim_name, "-c", "nope"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("container nope is not valid for pod"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Deleting the deployment removes every container and sandbox.
    server.kubectl_ok(&["delete", "deployment", "web", "--wait=false"]);
    eventually(90, "every pod gone", || async {
        pods.list(&ListParams::default().labels("app=web")).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    eventually(30, "containerd holds no containers", || async {
        containerd_containers(&server).trim().is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_and_commands_get_clear_statuses_and_the_agent_survives() {
    let registry = TestRegistry::start();
    let private = TestRegistry::start_as(Some("puller:hunter2"));
    let server = server_with_agent(&[&registry, &private], 2, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |name: &str, image: String, command: serde_json::Value, policy: &str| -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"restartPolicy": policy, "containers": [{"name": "c", "image": image, "command": command}]}})).unwrap()
    };
    let missing = format!("{}/does-not-exist:1", registry.address);
    pods.create(&PostParams::default(), &pod("no-image", missing.clone(), json!(null), "Always")).await.unwrap();
    pods.create(
        &PostParams::default(),
        &pod("no-command", registry.image("busybox"), json!(["/no/such/command"]), "Never"),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod(
            "exits-3",
            registry.image("busybox"),
            json!(["sh", "-c", "echo bye; echo -n went wrong > /dev/termination-log; exit 3"]),
            "Never",
        ),
    )
    .await
    .unwrap();
    pods.create(&PostParams::default(), &pod("succeeds", registry.image("busybox"), json!(["true"]), "Never"))
        .await
        .unwrap();

    // A registry that wants credentials: refused without the pod's imagePullSecrets,
    // pulled with them.
    let image = private.image("test-server");
    server.kubectl_ok(&[
        "create",
        "secret",
        "docker-registry",
        "regcred",
        &format!("--docker-server={}", private.address),
        "--docker-username=puller",
        "--docker-password=hunter2",
    ]);
    pods.create(&PostParams::default(), &pod("no-creds", image.clone(), json!(null), "Always")).await.unwrap();
    let mut with_creds = pod("with-creds", image, json!(null), "Always");
    with_creds.metadata.labels = Some([("app".to_string(), "with-creds".to_string())].into());
    with_creds.spec.as_mut().unwrap().image_pull_secrets =
        Some(vec![k8s_openapi::api::core::v1::LocalObjectReference { name: "regcred".into() }]);
    pods.create(&PostParams::default(), &with_creds).await.unwrap();

    let waiting = eventually(60, "an image pull error", || async {
        let s = container_status(&pods.get("no-image").await.ok()?)?;
        let reason = s["state"]["waiting"]["reason"].as_str()?.to_string();
        (reason == "ErrImagePull" || reason == "ImagePullBackOff").then_some(s)
    })
    .await;
    assert!(
        waiting["state"]["waiting"]["message"].as_str().unwrap_or_default().contains("does-not-exist"),
        "{waiting}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    eventually(30, "a Failed event for the pull", || async {
        let list = events.list(&ListParams::default().fields("involvedObject.name=no-image")).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("Failed")
                    && e.message.as_deref().unwrap_or_default().contains("Failed to pull image")
            })
            .then_some(())
    })
    .await;
    let waiting = eventually(60, "ImagePullBackOff", || async {
        let s = container_status(&pods.get("no-image").await.ok()?)?;
        (s["state"]["waiting"]["reason"] == "ImagePullBackOff")
            .then_some(s["state"]["waiting"]["message"].as_str()?.to_string())
    })
    .await;
    assert!(
        waiting.starts_with("Back-off pulling image \"") && waiting.contains(": ErrImagePull: Failed to pull image"),
        "the back-off says what failed: {waiting}"
    );

    running_pods(&pods, "app=with-creds", 1).await;
    eventually(60, "the pull without credentials refused (401)", || async {
        let s = container_status(&pods.get("no-creds").await.ok()?)?;
        s["state"]["waiting"]["reason"].as_str().filter(|r| *r == "ErrImagePull" || *r == "ImagePullBackOff")?;
        let list = events.list(&ListParams::default().fields("involvedObject.name=no-creds")).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Failed") && e.message.as_deref().unwrap_or_default().contains("401"))
            .then_some(())
    })
    .await;

    let phase_of = |name: &'static str| {
        let pods = pods.clone();
        async move { pods.get(name).await.ok()?.status?.phase }
    };
    eventually(60, "exits-3 Failed", || async {
        (phase_of("exits-3").await.as_deref() == Some("Failed")).then_some(())
    })
    .await;
    let s = container_status(&pods.get("exits-3").await.unwrap()).unwrap();
    assert_eq!(s["state"]["terminated"]["exitCode"], 3, "{s}");
    assert_eq!(s["state"]["terminated"]["message"], "went wrong", "the termination message file: {s}");
    assert_eq!(server.kubectl_ok(&["logs", "exits-3", "--tail=1"]), "bye\n");
    let out = server.kubectl(&["logs", "no-image"]);
    assert!(!out.status.success(), "no logs for a container that never started");
    eventually(60, "succeeds Succeeded", || async {
        (phase_of("succeeds").await.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;
    let s = container_status(&pods.get("succeeds").await.unwrap()).unwrap();
    assert_eq!(s["state"]["terminated"]["reason"], "Completed", "{s}");

    let failed = eventually(60, "no-command Failed", || async {
        let p = pods.get("no-command").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Failed")).then_some(p)
    })
    .await;
    let s = container_status(&failed).unwrap();
    assert_ne!(s["state"]["terminated"]["exitCode"], 0, "{s}");
    assert!(s["state"]["terminated"]["message"].as_str().unwrap_or_default().contains("/no/such/command"), "{s}");

    // The agent is still there: a good pod still runs.
    let mut fine = pod("fine", registry.image("test-server"), json!(null), "Always");
    fine.metadata.labels = Some([("app".to_string(), "fine".to_string())].into());
    pods.create(&PostParams::default(), &fine).await.unwrap();
    running_pods(&pods, "app=fine", 1).await;
    for name in ["no-image", "no-command", "exits-3", "succeeds", "fine", "no-creds", "with-creds"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    eventually(90, "every pod gone", || async {
        pods.list(&ListParams::default()).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    eventually(30, "containerd holds no containers", || async {
        containerd_containers(&server).trim().is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_leaves_containers_running_and_the_next_one_adopts_them() {
    let registry = TestRegistry::start();
    let mut server = server_with_agent(&[&registry], 3, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let (_, before) = keep_deployment(&server, &registry).await;
    let ids = |pods: &[Pod]| -> HashSet<String> {
        pods.iter().filter_map(|p| container_status(p)?["containerID"].as_str().map(String::from)).collect()
    };

    server.kill();
    for pod in &before {
        let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
        assert!(http_get(&ip, 8080, "/").is_some(), "pod {ip} keeps serving while the agent is down");
    }
    server.restart();
    let client = server.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = running_pods(&pods, "app=keep", 2).await;
    assert_eq!(ids(&after), ids(&before), "the same containers run");
    for pod in &after {
        assert_eq!(container_status(pod).unwrap()["restartCount"], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_restart_unhealthy_containers_and_gate_readiness_and_oom_kills_are_reported() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 4, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let probe =
        |path: &str| json!({"httpGet": {"path": path, "port": 8080}, "periodSeconds": 1, "failureThreshold": 1});
    let probed: Pod = serde_json::from_value(json!({"metadata": {"name": "probed"}, "spec": {"containers": [{
        "name": "c", "image": registry.image("test-server"),
        "startupProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        "livenessProbe": probe("/healthz"), "readinessProbe": probe("/readyz"),
    }]}}))
    .unwrap();
    let exec_probed: Pod =
        serde_json::from_value(json!({"metadata": {"name": "exec-probed"}, "spec": {"containers": [{
            "name": "c", "image": registry.image("busybox"), "command": ["sh", "-c", "touch /tmp/ready; sleep 3600"],
            "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 1, "failureThreshold": 1},
        }]}}))
        .unwrap();
    let hungry: Pod = serde_json::from_value(json!({"metadata": {"name": "hungry"}, "spec": {"containers": [{
        "name": "c", "image": registry.image("test-server"), "resources": {"limits": {"memory": "32Mi", "cpu": "500m"}},
    }]}}))
    .unwrap();
    for p in [&probed, &exec_probed, &hungry] {
        pods.create(&PostParams::default(), p).await.unwrap();
    }
    let ready = |name: &'static str, want: bool| {
        let pods = pods.clone();
        async move {
            let pod = pods.get(name).await.ok()?;
            let cond = pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready")?.status.clone();
            ((cond == "True") == want).then_some(pod)
        }
    };
    let pod = eventually(60, "probed Ready", || ready("probed", true)).await;
    eventually(30, "exec-probed Ready", || ready("exec-probed", true)).await;
    let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();

    // Readiness failing: not Ready, not restarted.
    http_get(&ip, 8080, "/fail/readyz").unwrap();
    let pod = eventually(30, "probed not Ready", || ready("probed", false)).await;
    assert_eq!(container_status(&pod).unwrap()["restartCount"], 0);
    assert_eq!(container_status(&pod).unwrap()["ready"], false);
    http_get(&ip, 8080, "/ok/readyz").unwrap();
    eventually(30, "probed Ready again", || ready("probed", true)).await;

    // Liveness failing: the container is restarted.
    http_get(&ip, 8080, "/fail/healthz").unwrap();
    eventually(60, "probed restarted by its liveness probe", || async {
        let s = container_status(&pods.get("probed").await.ok()?)?;
        (s["restartCount"] == 1 && s["state"]["running"].is_object()).then_some(())
    })
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let list = events.list(&ListParams::default().fields("involvedObject.name=probed")).await.unwrap();
    assert!(
        list.items.iter().any(|e| e.reason.as_deref() == Some("Unhealthy")
            && e.message.as_deref().unwrap_or_default().starts_with("Liveness probe failed")),
        "{:?}",
        list.items.iter().map(|e| e.message.clone()).collect::<Vec<_>>()
    );
    assert!(list.items.iter().any(|e| e.reason.as_deref() == Some("Killing")));

    // Over its memory limit: OOMKilled, restarted, and reported so.
    let hungry = eventually(60, "hungry running", || async {
        let p = pods.get("hungry").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
    })
    .await;
    assert_eq!(hungry.status.as_ref().unwrap().qos_class.as_deref(), Some("Guaranteed"));
    let hungry_ip = hungry.status.as_ref().unwrap().pod_ip.clone().unwrap();
    eventually(30, "the test server answering", || async { http_get(&hungry_ip, 8080, "/") }).await;
    let _ = http_get(&hungry_ip, 8080, "/alloc/64");
    let s = eventually(60, "an OOM kill reported", || async {
        let s = container_status(&pods.get("hungry").await.ok()?)?;
        (s["lastState"]["terminated"]["reason"] == "OOMKilled").then_some(s)
    })
    .await;
    assert_eq!(s["lastState"]["terminated"]["exitCode"], 137, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_and_environment_reach_the_container_and_follow_their_objects() {
    let registry = TestRegistry::start();
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::write(host_dir.path().join("host.txt"), "from the host").unwrap();
    let server = server_with_agent(&[&registry], 5, &["--sync-frequency-seconds", "1"]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    server.kubectl_ok(&["create", "configmap", "cfg", "--from-literal=greeting=hello", "--from-literal=color=blue"]);
    server.kubectl_ok(&["create", "secret", "generic", "sec", "--from-literal=token=s3cret"]);
    // (Service IPs are not allocated yet: the service names its own.)
    server.kubectl_ok(&["create", "service", "clusterip", "backend", "--tcp=80:8080"]);
    let backend_ip = server.kubectl_ok(&["get", "service", "backend", "-o", "jsonpath={.spec.clusterIP}"]);
    let backend_ip = backend_ip.as_str();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "vols", "labels": {"app": "vols"}}, "spec": {
        "containers": [{
            "name": "c", "image": registry.image("test-server"),
            "env": [
                {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "MESSAGE", "value": "$(GREETING) from $(POD_NAME)"},
            ],
            "envFrom": [{"secretRef": {"name": "sec"}, "prefix": "SEC_"}],
            "lifecycle": {
                "postStart": {"exec": {"command": ["sh", "-c", "echo started > /scratch/post-start"]}},
                "preStop": {"exec": {"command": ["sh", "-c", "echo stopping > /host/pre-stop"]}},
            },
            "volumeMounts": [
                {"name": "cfg", "mountPath": "/cfg"}, {"name": "sec", "mountPath": "/sec", "readOnly": true},
                {"name": "scratch", "mountPath": "/scratch"}, {"name": "mem", "mountPath": "/mem"},
                {"name": "info", "mountPath": "/info"}, {"name": "host", "mountPath": "/host"},
                {"name": "scratch", "mountPath": "/sub", "subPath": "inner"},
            ],
        }],
        "volumes": [
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 256}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
            {"name": "info", "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}, {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
            {"name": "host", "hostPath": {"path": host_dir.path().to_str().unwrap(), "type": "Directory"}},
        ],
    }})).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let running = running_pods(&pods, "app=vols", 1).await;
    let ip = running[0].status.as_ref().unwrap().pod_ip.clone().unwrap();
    let get = |path: &str| http_get(&ip, 8080, path).unwrap_or_default();
    eventually(30, "the test server", || async { http_get(&ip, 8080, "/") }).await;
    assert_eq!(get("/file/cfg/greeting"), "hello");
    assert_eq!(get("/file/sec/token"), "s3cret");
    assert_eq!(get("/file/info/name"), "vols");
    assert_eq!(get("/file/info/labels"), "app=\"vols\"");
    assert_eq!(get("/file/host/host.txt"), "from the host");
    assert_eq!(get("/env/MESSAGE"), "hello from vols");
    assert_eq!(get("/env/SEC_token"), "s3cret");
    assert_eq!(get("/file/scratch/post-start"), "started\n", "the postStart hook ran");
    assert_eq!(get("/env/BACKEND_SERVICE_HOST"), backend_ip, "service environment variables");
    assert_eq!(get("/env/BACKEND_PORT"), format!("tcp://{backend_ip}:80"));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mounts.lines().any(|l| l.contains(&running[0].metadata.uid.clone().unwrap()) && l.contains(" tmpfs ")),
        "the Memory emptyDir is a tmpfs"
    );

    // A changed ConfigMap reaches the running container.
    let patch = json!({"data": {"greeting": "bonjour"}});
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), "default")
        .patch("cfg", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(patch))
        .await
        .unwrap();
    eventually(30, "the updated ConfigMap in the volume", || async {
        (http_get(&ip, 8080, "/file/cfg/greeting")? == "bonjour").then_some(())
    })
    .await;

    // A missing ConfigMap: the pod waits with a clear event, and starts once it exists.
    let waiting: Pod = serde_json::from_value(json!({"metadata": {"name": "needs-cm", "labels": {"app": "needs-cm"}}, "spec": {
        "containers": [{"name": "c", "image": registry.image("test-server"), "volumeMounts": [{"name": "v", "mountPath": "/v"}]}],
        "volumes": [{"name": "v", "configMap": {"name": "later"}}],
    }})).unwrap();
    pods.create(&PostParams::default(), &waiting).await.unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    eventually(30, "a FailedMount event", || async {
        let list = events.list(&ListParams::default().fields("involvedObject.name=needs-cm")).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("FailedMount")
                    && e.message.as_deref().unwrap_or_default().contains("configmap \"later\" not found")
            })
            .then_some(())
    })
    .await;
    server.kubectl_ok(&["create", "configmap", "later", "--from-literal=k=v"]);
    running_pods(&pods, "app=needs-cm", 1).await;

    pods.delete("vols", &DeleteParams::default()).await.unwrap();
    let uid = running[0].metadata.uid.clone().unwrap();
    eventually(60, "vols gone", || async { pods.get_opt("vols").await.ok()?.is_none().then_some(()) }).await;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&uid), "the pod's tmpfs is unmounted");
    assert!(!server.data_dir().join("agent/volumes").join(&uid).exists(), "the pod's volumes are removed");
    assert_eq!(
        std::fs::read_to_string(host_dir.path().join("pre-stop")).unwrap(),
        "stopping\n",
        "the preStop hook ran before the stop"
    );
}

/// Runs kubectl with `env` set, feeding `stdin`.
/// `cat` in `pod` over a WebSocket exec, fed `input` as one text frame and closed:
/// what it wrote to stdout.
async fn exec_cat_with_text_frames(client: &kube::Client, pod: &str, input: &str) -> String {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let uri = format!("/api/v1/namespaces/default/pods/{pod}/exec?command=cat&stdin=true&stdout=true");
    let connection = client.connect(http::Request::get(uri).body(vec![]).unwrap()).await.expect("exec upgrades");
    let mut ws = connection.into_stream();
    ws.send(Message::Text(format!("\u{0}{input}").into())).await.unwrap();
    ws.send(Message::Binary(vec![255, 0].into())).await.unwrap();
    let mut stdout = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(20), ws.next()).await.expect("exec answers in time");
        match next {
            Some(Ok(Message::Binary(data))) if data.first() == Some(&1) => stdout.extend_from_slice(&data[1..]),
            Some(Ok(Message::Binary(data))) if data.first() == Some(&3) => break,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            Some(Ok(_)) => {}
        }
    }
    String::from_utf8_lossy(&stdout).into_owned()
}

fn kubectl_env(server: &TestServer, env: &[(&str, &str)], args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = std::process::Command::new(common::kubectl_path())
        .args(args)
        .env("KUBECONFIG", server.kubeconfig())
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// `kubectl port-forward` (`env` picks WebSocket or SPDY) to `pod`'s 8080 on a free
/// local port: one HTTP GET through it.
fn through_port_forward(server: &TestServer, env: &[(&str, &str)], pod: &str, path: &str) -> String {
    let port = common::free_port();
    let mut child = std::process::Command::new(common::kubectl_path())
        .args(["port-forward", pod, &format!("{port}:8080")])
        .env("KUBECONFIG", server.kubeconfig())
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run kubectl port-forward");
    // kubectl says "Forwarding from 127.0.0.1:<port> -> 8080" once it listens.
    // Its stdout stays open: it reports each connection there.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let body = http_get("127.0.0.1", port, path);
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("Forwarding from"), "{line:?}");
    body.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_attach_cp_and_port_forward_reach_containers_through_the_api_server() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 6, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    server.kubectl_ok(&[
        "run",
        "shell",
        &format!("--image={}", registry.image("busybox")),
        "--labels=app=shell",
        "--",
        "sleep",
        "3600",
    ]);
    server.kubectl_ok(&["run", "web", &format!("--image={}", registry.image("test-server")), "--labels=app=web"]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    running_pods(&pods, "app=shell", 1).await;
    running_pods(&pods, "app=web", 1).await;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    // exec over WebSocket (kubectl's default) and over SPDY (its fallback): separate
    // stdout and stderr, stdin up to its end, and the exit code.
    for env in [&[][..], &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")][..]] {
        let out = kubectl_env(
            &server,
            env,
            &["exec", "-i", "shell", "--", "sh", "-c", "wc -c; echo to-stderr >&2; exit 3"],
            "twelve bytes",
        );
        assert_eq!(out.status.code(), Some(3), "{env:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "12", "{env:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("to-stderr") && stderr.contains("command terminated with exit code 3"),
            "{env:?}: {stderr}"
        );
    }
    // With a terminal (-it): the shell sees a tty and its exit code comes back.
    let script = format!(
        "KUBECONFIG={} {} exec -it shell -- sh",
        server.kubeconfig().display(),
        common::kubectl_path().display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &script, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs kubectl on a terminal");
    child.stdin.take().unwrap().write_all(b"tty; echo answer=$((6*7)); exit 4\n").unwrap();
    let tty = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let shown = text(&tty.stdout);
    assert!(shown.contains("/dev/pts/") && shown.contains("answer=42"), "{shown}");
    assert_eq!(tty.status.code(), Some(4), "{shown}");

    // The Python client's way: stdin in text frames whose first character is the
    // channel; v5's close of stdin ([255, 0]) ends `cat`.
    assert_eq!(exec_cat_with_text_frames(&client, "shell", "hello from text frames").await, "hello from text frames");

    // The pod's service-account volume: a token the API server accepts as the pod's
    // account, the cluster CA and the namespace.
    let secrets = "/var/run/secrets/kubernetes.io/serviceaccount";
    assert_eq!(server.kubectl_ok(&["exec", "shell", "--", "cat", &format!("{secrets}/namespace")]), "default");
    let ca = server.kubectl_ok(&["exec", "shell", "--", "cat", &format!("{secrets}/ca.crt")]);
    assert_eq!(ca, std::fs::read_to_string(server.data_dir().join("pki/ca.crt")).unwrap());
    let token = server.kubectl_ok(&["exec", "shell", "--", "cat", &format!("{secrets}/token")]);
    let as_pod = std::process::Command::new(common::kubectl_path())
        .args(["--kubeconfig", "/dev/null", "--server", &server.url(), "--token", &token, "--certificate-authority"])
        .arg(server.data_dir().join("pki/ca.crt"))
        .args(["auth", "whoami", "-o", "jsonpath={.status.userInfo.username} {.status.userInfo.extra}"])
        .output()
        .unwrap();
    let who = text(&as_pod.stdout);
    assert!(
        who.starts_with("system:serviceaccount:default:default ")
            && who.contains(r#""authentication.kubernetes.io/pod-name":["shell"]"#)
            && who.contains(r#""authentication.kubernetes.io/node-name":["#),
        "the token is the pod's: {who} {}",
        text(&as_pod.stderr)
    );

    // kubectl cp both ways (tar through exec, stdin closed at the end of the archive).
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("in.txt"), "copied in\n").unwrap();
    server.kubectl_ok(&["cp", local.path().join("in.txt").to_str().unwrap(), "shell:/tmp/in.txt"]);
    assert_eq!(server.kubectl_ok(&["exec", "shell", "--", "cat", "/tmp/in.txt"]), "copied in\n");
    server.kubectl_ok(&["cp", "shell:/tmp/in.txt", local.path().join("back.txt").to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(local.path().join("back.txt")).unwrap(), "copied in\n");

    // attach: `kubectl run -i` attaches to the new container's stdin and output.
    let out = kubectl_env(
        &server,
        &[],
        &[
            "run",
            "reader",
            "-i",
            "--rm",
            "--restart=Never",
            &format!("--image={}", registry.image("busybox")),
            "--",
            "sh",
            "-c",
            "read x; echo got $x",
        ],
        "typed\n",
    );
    assert!(text(&out.stdout).contains("got typed"), "stdout: {}\nstderr: {}", text(&out.stdout), text(&out.stderr));

    // port-forward over WebSocket (SPDY tunnelled) and plain SPDY.
    for env in [&[][..], &[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")][..]] {
        assert_eq!(through_port_forward(&server, env, "pod/web", "/hello"), "web /hello", "{env:?}");
    }

    // kube-rs: exec and port-forward over WebSocket channels (v5 and v4's framing).
    let mut exec = pods
        .exec(
            "shell",
            ["sh", "-c", "read line; echo kube-rs says $line"],
            &kube::api::AttachParams::default().stdin(true).stderr(false),
        )
        .await
        .unwrap();
    exec.stdin().unwrap().write_all(b"hi\n").await.unwrap();
    let mut output = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut exec.stdout().unwrap(), &mut output).await.unwrap();
    assert_eq!(output, "kube-rs says hi\n");
    let status = exec.take_status().unwrap().await.unwrap();
    assert_eq!(status.status.as_deref(), Some("Success"), "{status:?}");
    let mut forwarder = pods.portforward("web", &[8080]).await.unwrap();
    let mut stream = forwarder.take_stream(8080).unwrap();
    stream.write_all(b"GET /kube-rs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response).await.unwrap();
    assert!(response.ends_with("web /kube-rs"), "{response}");

    // Bad requests: a container the pod lacks, a command the image lacks.
    let out = server.kubectl(&["exec", "shell", "-c", "nope", "--", "true"]);
    assert!(text(&out.stderr).contains("container nope is not valid for pod shell"), "{}", text(&out.stderr));
    let out = server.kubectl(&["exec", "shell", "--", "/no/such/command"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no such file or directory"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_pods_run_from_manifests_and_show_as_mirror_pods() {
    let registry = TestRegistry::start();
    let manifests = tempfile::tempdir().unwrap();
    let manifest = manifests.path().join("web.yaml");
    let write = |labels: &str| {
        let yaml = format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: static-web\n  labels: {{{labels}}}\nspec:\n  containers:\n  - name: web\n    image: {}\n", registry.image("test-server"));
        std::fs::write(&manifest, yaml).unwrap();
    };
    write("tier: one");
    std::fs::write(manifests.path().join("broken.yaml"), "kind: [").unwrap();
    let dir = manifests.path().to_str().unwrap();
    let server =
        server_with_agent(&[&registry], 7, &["--pod-manifest-path", dir, "--file-check-frequency-seconds", "1"]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let annotation =
        |p: &Pod, key: &str| p.metadata.annotations.as_ref().and_then(|a| a.get(key)).cloned().unwrap_or_default();

    // The manifest runs; the API shows its mirror, owned by the Node, with its status.
    let first = running_pods(&pods, "tier=one", 1).await.remove(0);
    assert_eq!(first.metadata.name.as_deref(), Some("static-web-node-1"));
    assert_eq!(annotation(&first, "kubernetes.io/config.source"), "file");
    assert_eq!(annotation(&first, "kubernetes.io/config.mirror"), annotation(&first, "kubernetes.io/config.hash"));
    let owner = &first.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("Node", "node-1"));
    let ip = first.status.as_ref().unwrap().pod_ip.clone().unwrap();
    assert_eq!(
        eventually(30, "the static pod serving", || async { http_get(&ip, 8080, "/s") }).await,
        "static-web-node-1 /s"
    );
    let container = container_status(&first).unwrap()["containerID"].clone();
    assert_eq!(server.kubectl_ok(&["logs", "static-web-node-1"]), "test-server listening on :8080\n");

    // Deleting the mirror brings it back; the container was never stopped.
    server.kubectl_ok(&["delete", "pod", "static-web-node-1", "--wait=false"]);
    let back = eventually(30, "the mirror pod back", || async {
        let pod = pods.get_opt("static-web-node-1").await.ok()??;
        (pod.metadata.uid != first.metadata.uid && container_status(&pod)?["ready"] == true).then_some(pod)
    })
    .await;
    assert_eq!(container_status(&back).unwrap()["containerID"], container, "same container");
    assert_eq!(container_status(&back).unwrap()["restartCount"], 0);

    // An edited manifest is a new pod; a removed one stops, and its mirror goes.
    write("tier: two");
    let second = running_pods(&pods, "tier=two", 1).await.remove(0);
    assert_ne!(annotation(&second, "kubernetes.io/config.hash"), annotation(&first, "kubernetes.io/config.hash"));
    assert_ne!(container_status(&second).unwrap()["containerID"], container);
    std::fs::remove_file(&manifest).unwrap();
    eventually(60, "the mirror pod gone", || async {
        pods.get_opt("static-web-node-1").await.ok()?.is_none().then_some(())
    })
    .await;
    eventually(60, "containerd holds no containers", || async {
        containerd_containers(&server).trim().is_empty().then_some(())
    })
    .await;

    // The broken manifest was reported once, by name, and disturbed nothing else.
    let log = server.log();
    assert_eq!(log.matches("skipping an invalid static pod manifest").count(), 1, "{log}");
    assert!(log.contains("broken.yaml"));
}

/// A tmpfs mounted for a test (a small disk that can be filled); unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "krate-test"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(dir.to_path_buf())
    }

    fn stats(&self) -> krate_agent::pressure::FsStats {
        krate_agent::pressure::FsStats::of(&self.0).unwrap()
    }

    /// Writes a file of `bytes` (real pages: a sparse file would take no room).
    fn fill(&self, name: &str, bytes: u64) {
        let mut f = std::fs::File::create(self.0.join(name)).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
    }

    /// Fills the disk until `free_percent` of it is left.
    fn fill_to(&self, name: &str, free_percent: u64) {
        let s = self.stats();
        let keep = s.bytes / 100 * free_percent;
        assert!(s.bytes_available > keep, "the disk is fuller already: {s:?}");
        self.fill(name, s.bytes_available - keep);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // The server's reset unmounts it first; this is for when it could not.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// The images the server's containerd holds.
fn containerd_images(server: &TestServer) -> String {
    containerd_list(server, "images", true)
}

fn node_condition(node: &Node, type_: &str) -> Option<(String, String)> {
    let c = node.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == type_)?.clone();
    Some((c.status, c.reason.unwrap_or_default()))
}

fn has_taint(node: &Node, key: &str) -> bool {
    node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|ts| ts.iter().any(|t| t.key == key))
}

async fn events_of(client: &kube::Client, kind: &str, name: &str) -> Vec<Event> {
    let events: Api<Event> = Api::all(client.clone());
    let list = events.list(&ListParams::default()).await.unwrap().items;
    list.into_iter()
        .filter(|e| e.involved_object.kind.as_deref() == Some(kind) && e.involved_object.name.as_deref() == Some(name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_disk_collects_unused_images_then_reports_disk_pressure_and_refuses_new_pods() {
    let registry = TestRegistry::start();
    // 48 MiB of random bytes: an image that takes a fifth of the node's disk to unpack.
    let mut filler = vec![0u8; 48 << 20];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut filler);
    let image = krate_agent::testimages::busybox_with(vec![krate_agent::oci::Entry::File {
        path: "filler".into(),
        data: filler,
        mode: 0o644,
    }])
    .unwrap();
    image.push(&registry.address, "filler", "1").unwrap();
    let filler = registry.image("filler");
    let args = agent_args(
        &[&registry],
        8,
        &[
            "--image-gc-high-threshold",
            "50",
            "--image-gc-low-threshold",
            "40",
            "--minimum-image-ttl-duration",
            "0s",
            "--eviction-hard",
            "nodefs.available<10%,imagefs.available<10%",
            "--eviction-pressure-transition-period",
            "0s",
        ],
    );
    // The agent's directory (containerd's images and containers, pod logs) on a 256 MiB disk.
    let (disk, server) =
        TestServer::start_with_agent_prepared(&args.iter().map(String::as_str).collect::<Vec<_>>(), |data| {
            Tmpfs::mount(&data.join("agent"), 256)
        });
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get("node-1").await.unwrap();
    assert_eq!(
        node.status.as_ref().unwrap().capacity.as_ref().unwrap()["ephemeral-storage"].0,
        "262144Ki",
        "the node's disk is the agent's directory"
    );
    assert_eq!(node_condition(&node, "DiskPressure"), Some(("False".into(), "KubeletHasNoDiskPressure".into())));
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let phase = |name: &'static str, want: &'static str| {
        let pods = pods.clone();
        async move {
            eventually(120, &format!("pod {name} {want}"), || async {
                (pods.get(name).await.ok()?.status?.phase? == want).then_some(())
            })
            .await
        }
    };

    // An image a running container uses, and one no container uses any more.
    server.kubectl_ok(&[
        "run",
        "keeper",
        &format!("--image={}", registry.image("busybox")),
        "--restart=Never",
        "--",
        "sleep",
        "3600",
    ]);
    server.kubectl_ok(&["run", "once", &format!("--image={filler}"), "--restart=Never", "--command", "--", "true"]);
    phase("keeper", "Running").await;
    phase("once", "Succeeded").await;
    server.kubectl_ok(&["delete", "pod", "once"]);
    assert!(containerd_images(&server).contains("/filler:1"), "{}", containerd_images(&server));

    // Past the high threshold: unused images go, down to the low threshold.
    disk.fill_to("ballast-1", 40);
    eventually(60, "the unused image removed", || async {
        (!containerd_images(&server).contains("/filler:1")).then_some(())
    })
    .await;
    let images = containerd_images(&server);
    assert!(images.contains("/busybox:1"), "the image a container uses stays: {images}");
    assert!(images.contains("krate.local/pause:1"), "the sandbox image stays: {images}");
    assert!(disk.stats().used_percent() < 50.0, "{:?}", disk.stats());

    // An image bigger than the space left: the pull fails, and says why.
    disk.fill_to("ballast-2", 14);
    server.kubectl_ok(&["run", "toobig", &format!("--image={filler}"), "--restart=Never", "--command", "--", "true"]);
    let waiting = eventually(120, "the pull failing for want of space", || async {
        let pod = pods.get("toobig").await.ok()?;
        let w = container_status(&pod)?["state"]["waiting"].clone();
        (w["reason"] == "ErrImagePull" || w["reason"] == "ImagePullBackOff").then_some(w)
    })
    .await;
    assert!(waiting["message"].as_str().unwrap().contains("no space left on device"), "{waiting}");
    let events = events_of(&client, "Pod", "toobig").await;
    assert!(
        events.iter().any(|e| e.reason.as_deref() == Some("Failed")
            && e.message.as_deref().unwrap_or_default().contains("no space left on device")),
        "{events:?}"
    );
    server.kubectl_ok(&["delete", "pod", "toobig"]);

    // Under the eviction threshold: DiskPressure, the node tainted, new pods refused,
    // running ones left alone.
    if disk.stats().bytes_available > disk.stats().bytes / 100 * 5 {
        disk.fill_to("ballast-3", 5);
    }
    let node = eventually(60, "DiskPressure", || async {
        let node = nodes.get("node-1").await.ok()?;
        (node_condition(&node, "DiskPressure")? == ("True".into(), "KubeletHasDiskPressure".into())
            && has_taint(&node, "node.kubernetes.io/disk-pressure"))
        .then_some(node)
    })
    .await;
    assert_eq!(node_condition(&node, "Ready").unwrap().0, "True", "a node under pressure is still Ready");
    server.kubectl_ok(&["run", "later", &format!("--image={}", registry.image("busybox")), "--", "sleep", "3600"]);
    let pinned = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pinned"}, "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": registry.image("busybox"), "command": ["sleep", "3600"]}]}});
    pods.create(&PostParams::default(), &serde_json::from_value(pinned).unwrap()).await.unwrap();
    phase("pinned", "Failed").await;
    let status = pods.get("pinned").await.unwrap().status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("Evicted"));
    assert_eq!(status.message.as_deref(), Some("Pod was rejected: The node had condition: [DiskPressure]. "));
    let events = events_of(&client, "Pod", "pinned").await;
    assert!(
        events.iter().any(|e| e.reason.as_deref() == Some("Evicted") && e.type_.as_deref() == Some("Warning")),
        "{events:?}"
    );
    let events = eventually(30, "the scheduler naming the taint", || async {
        let events = events_of(&client, "Pod", "later").await;
        events
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("FailedScheduling")
                    && e.message.as_deref().unwrap_or_default().contains("node.kubernetes.io/disk-pressure")
            })
            .then_some(events)
    })
    .await;
    assert!(pods.get("later").await.unwrap().spec.unwrap().node_name.is_none(), "{events:?}");
    let keeper = pods.get("keeper").await.unwrap();
    assert_eq!(keeper.status.as_ref().unwrap().phase.as_deref(), Some("Running"));
    assert_eq!(container_status(&keeper).unwrap()["restartCount"], 0);
    let sandboxes = containerd_containers(&server);
    assert_eq!(
        sandboxes.lines().count(),
        2,
        "the keeper's sandbox and container only, nothing of the refused or failed pods: {sandboxes}"
    );
    let events = events_of(&client, "Node", "node-1").await;
    assert!(events.iter().any(|e| e.reason.as_deref() == Some("NodeHasDiskPressure")), "{events:?}");

    // Space again: the condition and the taint go, and the waiting pod runs.
    for name in ["ballast-1", "ballast-2", "ballast-3"] {
        let _ = std::fs::remove_file(disk.0.join(name));
    }
    eventually(60, "DiskPressure gone", || async {
        let node = nodes.get("node-1").await.ok()?;
        (node_condition(&node, "DiskPressure")?.0 == "False" && !has_taint(&node, "node.kubernetes.io/disk-pressure"))
            .then_some(())
    })
    .await;
    let later = running_pods(&pods, "run=later", 1).await;
    assert_eq!(later.len(), 1);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_the_node_down_stops_regular_pods_then_critical_ones_and_reports_them_terminated() {
    let registry = TestRegistry::start();
    let manifests = tempfile::tempdir().unwrap();
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: critical\nspec:\n  containers:\n  - name: web\n    image: {}\n",
        registry.image("test-server")
    );
    std::fs::write(manifests.path().join("critical.yaml"), yaml).unwrap();
    let dir = manifests.path().to_str().unwrap();
    let server = server_with_agent(
        &[&registry],
        9,
        &[
            "--pod-manifest-path",
            dir,
            "--file-check-frequency-seconds",
            "1",
            "--shutdown-grace-period",
            "20s",
            "--shutdown-grace-period-critical-pods",
            "5s",
        ],
    );
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let nodes: Api<Node> = Api::all(client.clone());

    // Two regular pods whose preStop hook takes 2 s, and a static (critical) pod.
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{
            "name": "web", "image": registry.image("test-server"),
            "lifecycle": {"preStop": {"exec": {"command": ["sleep", "2"]}}},
        }]}}},
    });
    server.kubectl_stdin(&["apply", "-f", "-"], Some(&deployment.to_string()));
    let regular = running_pods(&pods, "app=web", 2).await;
    running_pods(&pods, "", 3).await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_krate"))
        .args(["shutdown-node", "--data-dir"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        printed.contains("stopping 2 regular pod(s) within 15s\nstopping 1 critical pod(s) within 5s\n")
            && printed.ends_with("the node can power off\n"),
        "{printed}"
    );

    // Every pod Failed as upstream reports a shutdown, regular ones stopped first.
    let finished =
        |p: &Pod| container_status(p).unwrap()["state"]["terminated"]["finishedAt"].as_str().unwrap().to_string();
    let mut regular_finished = Vec::new();
    for name in regular.iter().map(|p| p.metadata.name.clone().unwrap()).chain(["critical-node-1".to_string()]) {
        let pod = eventually(30, &format!("{name} reported stopped"), || async {
            let p = pods.get(&name).await.ok()?;
            (p.status.as_ref()?.phase.as_deref() == Some("Failed")).then_some(p)
        })
        .await;
        let status = pod.status.clone().unwrap();
        assert_eq!(status.reason.as_deref(), Some("Terminated"), "{name}");
        assert_eq!(status.message.as_deref(), Some("Pod was terminated in response to imminent node shutdown."));
        let target = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "DisruptionTarget")
            .expect("a DisruptionTarget condition");
        assert_eq!((target.status.as_str(), target.reason.as_deref()), ("True", Some("TerminationByKubelet")));
        assert_eq!(
            container_status(&pod).unwrap()["state"]["terminated"]["exitCode"],
            0,
            "stopped with SIGTERM, not killed: {name}"
        );
        if name == "critical-node-1" {
            assert!(
                regular_finished.iter().all(|r| *r <= finished(&pod)),
                "critical pods stop last: {regular_finished:?} vs {}",
                finished(&pod)
            );
        } else {
            regular_finished.push(finished(&pod));
        }
    }

    // The node says it is going away, and takes no more pods.
    let node = nodes.get("node-1").await.unwrap();
    let ready = node.status.unwrap().conditions.unwrap().into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref(), ready.message.as_deref()),
        ("False", Some("KubeletNotReady"), Some("node is shutting down"))
    );
    eventually(30, "the not-ready taint", || async {
        has_taint(&nodes.get("node-1").await.ok()?, "node.kubernetes.io/not-ready").then_some(())
    })
    .await;
    let pinned = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pinned"}, "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": registry.image("busybox")}]}});
    pods.create(&PostParams::default(), &serde_json::from_value(pinned).unwrap()).await.unwrap();
    let status = eventually(30, "the pod refused", || async {
        let s = pods.get("pinned").await.ok()?.status?;
        (s.phase.as_deref() == Some("Failed")).then_some(s)
    })
    .await;
    assert_eq!(status.reason.as_deref(), Some("NodeShutdown"));
    assert_eq!(status.message.as_deref(), Some("Pod was rejected: Pod was rejected as the node is shutting down."));
    // The Deployment replaces its pods, but not here.
    let replacements = eventually(30, "replacement pods", || async {
        let list = pods.list(&ListParams::default().labels("app=web")).await.ok()?.items;
        let fresh: Vec<Pod> =
            list.into_iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Failed")).collect();
        (fresh.len() == 2).then_some(fresh)
    })
    .await;
    assert!(
        replacements.iter().all(|p| p.spec.as_ref().unwrap().node_name.is_none()),
        "no pod is scheduled to a node shutting down"
    );
    let tasks = containerd_list(&server, "tasks", false);
    assert!(!tasks.contains("RUNNING"), "nothing runs any more: {tasks}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_debug_runs_an_ephemeral_container_that_sees_its_targets_processes() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 9, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let busybox = registry.image("busybox");
    server.kubectl_ok(&["run", "app", &format!("--image={busybox}"), "--labels=app=debugged", "--", "sleep", "3600"]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    running_pods(&pods, "app=debugged", 1).await;

    // Non-interactive: kubectl adds the container through pods/ephemeralcontainers.
    server.kubectl_ok(&[
        "debug",
        "app",
        &format!("--image={busybox}"),
        "--target=app",
        "--container=debugger",
        "--",
        "ps",
    ]);
    let finished = eventually(120, "the ephemeral container runs to its end", || async {
        let pod = pods.get("app").await.ok()?;
        let status = serde_json::to_value(pod.status?).ok()?;
        let debugger = status["ephemeralContainerStatuses"].as_array()?.iter().find(|s| s["name"] == "debugger")?;
        debugger["state"].get("terminated").cloned()
    })
    .await;
    assert_eq!(finished["exitCode"], 0, "{finished}");
    // It shares the target's process namespace: `ps` there lists the app's sleep.
    let logs = server.kubectl_ok(&["logs", "app", "-c", "debugger"]);
    assert!(logs.contains("sleep 3600"), "{logs}");
    // The pod itself is untouched: still running, its container never restarted.
    let pod = pods.get("app").await.unwrap();
    assert_eq!(pod.status.as_ref().unwrap().phase.as_deref(), Some("Running"));
    assert_eq!(container_status(&pod).unwrap()["restartCount"], 0);
}

/// The directory of `container`'s logs under the agent's (`<ns>_<pod>_<uid>/<container>`),
/// once the pod has one.
fn log_dir(server: &TestServer, pod: &str, container: &str) -> Option<std::path::PathBuf> {
    let prefix = format!("default_{pod}_");
    let entries = std::fs::read_dir(server.data_dir().join("agent/pods")).ok()?;
    let pod_dir = entries.filter_map(Result::ok).find(|e| e.file_name().to_string_lossy().starts_with(&prefix))?;
    Some(pod_dir.path().join(container))
}

/// The files of `container`'s first log (`0.log` and its rotations) under the agent's
/// log directory, with their contents.
fn log_files(server: &TestServer, pod: &str, container: &str) -> Vec<(String, String)> {
    let Some(dir) = log_dir(server, pod, container) else { return Vec::new() };
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("0.log"))
                .map(|name| {
                    let bytes = std::fs::read(dir.join(&name)).unwrap_or_default();
                    // Older rotations are gzipped, as upstream's kubelet leaves them.
                    let text = if name.ends_with(".gz") {
                        let mut text = String::new();
                        let _ = std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text);
                        text
                    } else {
                        String::from_utf8_lossy(&bytes).into_owned()
                    };
                    (name, text)
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[tokio::test]
async fn container_logs_rotate_at_their_size_and_keep_their_file_count() {
    let registry = TestRegistry::start();
    let extra = ["--container-log-max-size", "32Ki", "--container-log-max-files", "3"];
    let server = server_with_agent(&[&registry], 10, &extra);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    // About 4 KB a second: a rotation every housekeeping tick or two.
    let script = "i=0; while true; do for j in $(seq 40); do echo \"line $i $(printf '%080d' 0)\"; i=$((i+1)); done; sleep 1; done";
    let logger: Pod = serde_json::from_value(json!({"metadata": {"name": "logger"}, "spec": {"containers": [{
        "name": "c", "image": registry.image("busybox"), "command": ["sh", "-c", script],
    }]}}))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &logger).await.unwrap();
    eventually(120, "rotations past the file count", || async {
        let files = log_files(&server, "logger", "c");
        // A rotation counts once while it is being compressed (`X` beside `X.gz.tmp`,
        // then `X.gz` for the moment before `X` is removed).
        let stamps: std::collections::BTreeSet<&str> = files
            .iter()
            .filter(|(name, _)| name != "0.log")
            .map(|(name, _)| name.trim_end_matches(".tmp").trim_end_matches(".gz"))
            .collect();
        let rotated = stamps.len();
        assert!(
            rotated <= 2,
            "more than max-files - 1 rotated files kept: {:?}",
            files.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
        // The first lines are gone only once the oldest rotation was removed.
        let first_gone = !files.iter().any(|(_, text)| text.contains(" line 0 "));
        let compressed = files.iter().any(|(name, text)| name.ends_with(".gz") && text.contains("line "));
        (rotated == 2 && first_gone && compressed).then_some(())
    })
    .await;
    for (name, text) in log_files(&server, "logger", "c") {
        assert!(text.len() < 128 * 1024, "{name} grew to {} bytes", text.len());
    }
    // kubectl logs reads the current file (just after a rotation it may be empty for
    // the second until the next burst).
    let logs = eventually(10, "kubectl logs to show the newest lines", || async {
        let logs = server.kubectl_ok(&["logs", "logger", "--tail", "3"]);
        (logs.lines().count() == 3).then_some(logs)
    })
    .await;
    assert!(logs.lines().all(|l| l.starts_with("line ")), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_starts_first_runs_beside_the_containers_and_counts_for_readiness() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 11, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let busybox = registry.image("busybox");
    // The sidecar's startup probe passes once it has written /shared/up: the container
    // after it must see the file when it starts.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "with-sidecar"}, "spec": {
        "volumes": [{"name": "shared", "emptyDir": {}}],
        "initContainers": [{"name": "side", "image": busybox, "restartPolicy": "Always",
            "command": ["sh", "-c", "sleep 2; touch /shared/up; exec sleep 3600"],
            "startupProbe": {"exec": {"command": ["test", "-f", "/shared/up"]}, "periodSeconds": 1, "failureThreshold": 30},
            "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}],
        "containers": [{"name": "main", "image": busybox,
            "command": ["sh", "-c", "test -f /shared/up && echo sidecar was up; exec sleep 3600"],
            "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}]}});
    server.create(&pod.to_string());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let ready = eventually(90, "the pod Running and Ready", || async {
        let pod = pods.get("with-sidecar").await.ok()?;
        let status = pod.status.clone()?;
        let ready = status.conditions?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        (status.phase.as_deref() == Some("Running") && ready).then_some(pod)
    })
    .await;
    let side = &ready.status.as_ref().unwrap().init_container_statuses.as_ref().unwrap()[0];
    assert!(side.state.as_ref().unwrap().running.is_some(), "the sidecar keeps running: {side:?}");
    assert_eq!((side.started, side.ready), (Some(true), true), "{side:?}");
    assert_eq!(server.kubectl_ok(&["logs", "with-sidecar", "-c", "main"]), "sidecar was up\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_fs_group_owns_its_volumes_and_its_processes_are_in_it() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 12, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    server.kubectl_ok(&["create", "secret", "generic", "key", "--from-literal=key=s3cret"]);
    let script =
        "id -G; stat -c '%g %a' /secret/..data/key; cat /secret/key; echo; touch /scratch/f; stat -c %g /scratch/f";
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "grouped"}, "spec": {
        "restartPolicy": "Never",
        "securityContext": {"runAsUser": 1000, "fsGroup": 2000},
        "volumes": [{"name": "secret", "secret": {"secretName": "key", "defaultMode": 0o440}}, {"name": "scratch", "emptyDir": {}}],
        "containers": [{"name": "c", "image": registry.image("busybox"), "command": ["sh", "-c", script],
            "volumeMounts": [{"name": "secret", "mountPath": "/secret"}, {"name": "scratch", "mountPath": "/scratch"}]}]}});
    server.create(&pod.to_string());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let phase = eventually(90, "the pod to finish", || async {
        let phase = pods.get("grouped").await.ok()?.status?.phase?;
        (phase == "Succeeded" || phase == "Failed").then_some(phase)
    })
    .await;
    let logs = server.kubectl_ok(&["logs", "grouped"]);
    assert_eq!(phase, "Succeeded", "{logs}");
    let lines: Vec<&str> = logs.lines().collect();
    assert!(lines[0].split_whitespace().any(|g| g == "2000"), "the process is in the fsGroup: {logs}");
    assert_eq!(&lines[1..], ["2000 440", "s3cret", "2000"], "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_stops_at_its_active_deadline_and_its_status_names_what_holds_it_back() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 13, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let busybox = registry.image("busybox");
    // An init container that never finishes: the pod says which one holds it back.
    let stuck = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stuck"}, "spec": {
        "initContainers": [{"name": "wait", "image": busybox, "command": ["sleep", "3600"]}],
        "containers": [{"name": "main", "image": busybox, "command": ["sleep", "3600"]}]}});
    let deadline = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "deadline"}, "spec": {
        "activeDeadlineSeconds": 30,
        "containers": [{"name": "main", "image": busybox, "command": ["sleep", "3600"]}]}});
    for pod in [stuck, deadline] {
        server.create(&pod.to_string());
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let condition =
        |pod: &Pod, type_: &str| pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == type_).cloned();
    let initialized = eventually(60, "the stuck pod's Initialized condition", || async {
        let pod = pods.get("stuck").await.ok()?;
        let running = pod.status.as_ref()?.init_container_statuses.as_ref()?[0].state.as_ref()?.running.is_some();
        running.then(|| (condition(&pod, "Initialized"), pod))
    })
    .await;
    let (condition_now, pod) = initialized;
    let initialized = condition_now.unwrap();
    assert_eq!(initialized.message.as_deref(), Some("containers with incomplete status: [wait]"), "{initialized:?}");
    let main = &pod.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0];
    assert_eq!(main.state.as_ref().unwrap().waiting.as_ref().unwrap().reason.as_deref(), Some("PodInitializing"));
    assert_eq!(pod.status.as_ref().unwrap().observed_generation, Some(1), "the generation the status is of");

    // Past its deadline (lowered while it runs, as upstream's conformance test does),
    // the pod is stopped and Failed.
    eventually(60, "the deadline pod running", || async {
        (pods.get("deadline").await.ok()?.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    server.kubectl_ok(&["patch", "pod", "deadline", "-p", r#"{"spec": {"activeDeadlineSeconds": 5}}"#]);
    let status = eventually(60, "the pod Failed at its deadline", || async {
        let status = pods.get("deadline").await.ok()?.status?;
        (status.phase.as_deref() == Some("Failed")).then_some(status)
    })
    .await;
    assert_eq!(status.reason.as_deref(), Some("DeadlineExceeded"), "{status:?}");
    assert_eq!(status.message.as_deref(), Some("Pod was active on the node longer than the specified deadline"));
    assert_eq!(status.observed_generation, Some(2), "the patch made generation 2: {status:?}");
}

/// A self-signed certificate's PEM, for trust bundles.
fn certificate_pem(name: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(vec![name.to_string()]).unwrap().self_signed(&key).unwrap().pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projected_trust_bundle_holds_the_certificates_of_its_bundles() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 14, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let (a, b) = (certificate_pem("a"), certificate_pem("b"));
    let bundles = [
        json!({"metadata": {"name": "example.com:signer:one", "labels": {"app": "x"}},
            "spec": {"signerName": "example.com/signer", "trustBundle": format!("{a}{b}")}}),
        json!({"metadata": {"name": "example.com:signer:two", "labels": {"app": "x"}},
            "spec": {"signerName": "example.com/signer", "trustBundle": a}}),
        json!({"metadata": {"name": "example.com:signer:other", "labels": {"app": "y"}},
            "spec": {"signerName": "example.com/signer", "trustBundle": certificate_pem("c")}}),
        json!({"metadata": {"name": "plain"}, "spec": {"trustBundle": certificate_pem("d")}}),
    ];
    for bundle in bundles {
        let mut bundle = bundle;
        bundle["apiVersion"] = json!("certificates.k8s.io/v1");
        bundle["kind"] = json!("ClusterTrustBundle");
        server.create(&bundle.to_string());
    }
    let script = "grep -c BEGIN /b/signer.pem; grep -c BEGIN /b/plain.pem; test -f /b/none.pem && ! test -s /b/none.pem && echo empty";
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "anchors"}, "spec": {
        "restartPolicy": "Never",
        "volumes": [{"name": "b", "projected": {"sources": [
            {"clusterTrustBundle": {"signerName": "example.com/signer", "labelSelector": {"matchLabels": {"app": "x"}}, "path": "signer.pem"}},
            {"clusterTrustBundle": {"name": "plain", "path": "plain.pem"}},
            {"clusterTrustBundle": {"name": "missing", "optional": true, "path": "none.pem"}}]}}],
        "containers": [{"name": "c", "image": registry.image("busybox"), "command": ["sh", "-c", script],
            "volumeMounts": [{"name": "b", "mountPath": "/b"}]}]}});
    server.create(&pod.to_string());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually(90, "the pod to succeed", || async {
        (pods.get("anchors").await.ok()?.status?.phase.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;
    // Two bundles of the signer with label app=x, three certificates, one of them twice;
    // an optional bundle that does not exist is an empty file.
    assert_eq!(server.kubectl_ok(&["logs", "anchors"]), "2\n1\nempty\n");
}

/// The bytes a container's log files take on disk (current, rotated and compressed).
fn log_bytes_on_disk(server: &TestServer, pod: &str, container: &str) -> u64 {
    let Some(entries) = log_dir(server, pod, container).and_then(|dir| std::fs::read_dir(dir).ok()) else { return 0 };
    entries.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
}

#[tokio::test]
async fn a_container_writing_100_mib_keeps_its_logs_within_the_configured_bound() {
    const MIB: u64 = 1024 * 1024;
    let registry = TestRegistry::start();
    let extra = ["--container-log-max-size", "4Mi", "--container-log-max-files", "3"];
    let server = server_with_agent(&[&registry], 8, &extra);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    // 100 MiB of incompressible-ish text (base64 of random bytes), about 1 MiB a second.
    let script = "for i in $(seq 100); do head -c 786432 /dev/urandom | base64; sleep 1; done";
    let writer: Pod = serde_json::from_value(json!({"metadata": {"name": "writer"}, "spec": {"restartPolicy": "Never",
        "containers": [{"name": "c", "image": registry.image("busybox"), "command": ["sh", "-c", script]}]}}))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &writer).await.unwrap();
    // Rotation runs on the agent's 10 s housekeeping tick (upstream's kubelet checks as
    // often), so a file may pass the size by what is written in one tick (10 MiB here,
    // more when the machine is busy): the bound is max-files × (max-size + 16 MiB), 60
    // MiB for the 100 written. Measured: 40.9 MiB at most.
    let bound = 3 * (4 * MIB + 16 * MIB);
    let largest = std::cell::Cell::new(0);
    eventually(300, "the writer to finish", || async {
        let bytes = log_bytes_on_disk(&server, "writer", "c");
        largest.set(largest.get().max(bytes));
        assert!(bytes <= bound, "the logs took {bytes} bytes, over {bound}");
        let pod = pods.get("writer").await.ok()?;
        (pod.status?.phase.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;
    let files = log_files(&server, "writer", "c");
    assert!(
        files.iter().any(|(name, _)| name.ends_with(".gz")),
        "older rotations compressed: {:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    eprintln!("100 MiB written; the logs took at most {:.1} MiB on disk", largest.get() as f64 / MIB as f64);
}

/// Signs a PodCertificateRequest's stub request as a signer would: a certificate for
/// its key, valid from a minute ago for an hour, beginning to refresh after half of it.
fn issue(request: &serde_json::Value) -> serde_json::Value {
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD.decode(request["spec"]["stubPKCS10Request"].as_str().unwrap());
    let csr = rcgen::CertificateSigningRequestParams::from_der(&der.unwrap().into()).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(vec![]).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let not_before = now - 60;
    let mut csr = csr;
    csr.params.not_before = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(not_before);
    csr.params.not_after = csr.params.not_before + Duration::from_secs(3600);
    let leaf = csr.signed_by(&issuer).unwrap().pem();
    let at = |s: u64| jiff::Timestamp::from_second(s as i64).unwrap().to_string();
    let mut issued = request.clone();
    issued["status"] = json!({"certificateChain": leaf, "notBefore": at(not_before), "notAfter": at(not_before + 3600),
        "beginRefreshAt": at(not_before + 1800),
        "conditions": [{"type": "Issued", "status": "True", "reason": "Test", "message": "issued by the test",
            "lastTransitionTime": at(now)}]});
    issued
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_certificate_volume_holds_a_node_made_key_and_the_certificate_its_signer_issued() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 15, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "holder"}, "spec": {
        "restartPolicy": "Never",
        "volumes": [{"name": "tls", "projected": {"sources": [{"podCertificate": {
            "signerName": "example.com/test-signer", "keyType": "ECDSAP256",
            "credentialBundlePath": "bundle.pem", "certificateChainPath": "chain.pem",
            "userAnnotations": {"example.com/purpose": "test"}}}]}}],
        "containers": [{"name": "c", "image": registry.image("busybox"),
            "command": ["sh", "-c", "cat /tls/bundle.pem; echo =====; cat /tls/chain.pem"],
            "volumeMounts": [{"name": "tls", "mountPath": "/tls"}]}]}});
    server.create(&pod.to_string());
    let requests: Api<k8s_openapi::api::certificates::v1::PodCertificateRequest> =
        Api::namespaced(client.clone(), "default");
    // The node asks: for this pod on this node, with the key type's public key and the
    // default lifetime the API server fills in.
    let request = eventually(60, "the node's PodCertificateRequest", || async {
        requests.list(&ListParams::default()).await.ok()?.items.into_iter().next()
    })
    .await;
    let holder: Pod = Api::namespaced(client.clone(), "default").get("holder").await.unwrap();
    let request = serde_json::to_value(&request).unwrap();
    let spec = &request["spec"];
    assert_eq!(spec["podName"], "holder");
    assert_eq!(spec["podUID"].as_str(), holder.metadata.uid.as_deref());
    assert_eq!((&spec["nodeName"], &spec["serviceAccountName"]), (&json!("node-1"), &json!("default")));
    assert_eq!(spec["maxExpirationSeconds"], 86400);
    assert_eq!(spec["unverifiedUserAnnotations"]["example.com/purpose"], "test");
    assert_eq!(request["metadata"]["ownerReferences"][0]["name"], "holder");

    // The signer answers through /status; a second answer is refused (issued is final).
    let issued = issue(&request);
    let name = request["metadata"]["name"].as_str().unwrap();
    let typed = |v: serde_json::Value| serde_json::from_value(v).unwrap();
    requests.replace_status(name, &PostParams::default(), &typed(issued.clone())).await.unwrap();
    let current = serde_json::to_value(requests.get(name).await.unwrap()).unwrap();
    let again = typed(issue(&current));
    let refused = requests.replace_status(name, &PostParams::default(), &again).await.unwrap_err();
    assert!(refused.to_string().contains("immutable after PodCertificateRequest is issued"), "{refused}");

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually(90, "the pod to succeed", || async {
        (pods.get("holder").await.ok()?.status?.phase.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;
    let logs = server.kubectl_ok(&["logs", "holder"]);
    let (bundle, chain) = logs.split_once("=====\n").unwrap();
    let leaf = issued["status"]["certificateChain"].as_str().unwrap();
    assert_eq!(chain, leaf, "the chain as issued");
    // The bundle: the node's private key (PKCS#8), then the chain; the key is the one
    // the certificate certifies.
    assert!(bundle.starts_with("-----BEGIN PRIVATE KEY-----") && bundle.ends_with(leaf), "{bundle}");
    let key_pem = &bundle[..bundle.len() - leaf.len()];
    let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
    let (_, cert) = x509_parser::pem::parse_x509_pem(leaf.as_bytes()).unwrap();
    let cert = cert.parse_x509().unwrap();
    assert_eq!(&cert.public_key().subject_public_key.data[..], key.public_key_raw());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resized_container_gets_its_new_cpu_and_memory_in_place() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 16, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "elastic"}, "spec": {
        "containers": [{"name": "c", "image": registry.image("busybox"), "command": ["sleep", "3600"],
            "resources": {"requests": {"cpu": "20m", "memory": "35Mi"}, "limits": {"cpu": "30m", "memory": "45Mi"}}}]}});
    server.create(&pod.to_string());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let cgroup = |file: &str| server.kubectl_ok(&["exec", "elastic", "--", "cat", file]).trim().to_string();
    let status = eventually(90, "the pod running with its resources reported", || async {
        let s = container_status(&pods.get("elastic").await.ok()?)?;
        s["state"]["running"].is_object().then_some(s)
    })
    .await;
    assert_eq!(status["allocatedResources"], json!({"cpu": "20m", "memory": "35Mi"}));
    assert_eq!(status["resources"]["limits"], json!({"cpu": "30m", "memory": "45Mi"}));
    assert_eq!(cgroup("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), "3000");

    let resize = json!({"spec": {"containers": [{"name": "c",
        "resources": {"requests": {"cpu": "25m", "memory": "40Mi"}, "limits": {"cpu": "35m", "memory": "50Mi"}}}]}});
    let resize_to = |body: serde_json::Value| {
        let pods = pods.clone();
        async move {
            let patch = kube::api::Patch::Strategic(body);
            pods.patch_subresource("resize", "elastic", &kube::api::PatchParams::default(), &patch).await
        }
    };
    let patched = resize_to(resize).await.unwrap();
    assert_eq!(patched.metadata.generation, Some(2), "a resize is a spec change");
    let status = eventually(60, "the resize applied and reported", || async {
        let pod = pods.get("elastic").await.ok()?;
        let s = container_status(&pod)?;
        let observed = pod.status.as_ref()?.observed_generation == Some(2);
        (observed && s["resources"]["limits"]["cpu"] == "35m").then_some(s)
    })
    .await;
    assert_eq!(status["allocatedResources"], json!({"cpu": "25m", "memory": "40Mi"}));
    assert_eq!(status["restartCount"], 0, "resized in place: {status}");
    assert_eq!(cgroup("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), "3500");
    assert_eq!(cgroup("/sys/fs/cgroup/memory/memory.limit_in_bytes"), (50u64 << 20).to_string());
    // GET on pods/resize answers the pod itself.
    let request = http::Request::get("/api/v1/namespaces/default/pods/elastic/resize").body(Vec::new()).unwrap();
    let via_resize: Pod = client.request(request).await.unwrap();
    assert_eq!(via_resize, pods.get("elastic").await.unwrap());
    // Only resources go through pods/resize; the QoS class stays.
    let upgrade = json!({"spec": {"containers": [{"name": "c",
        "resources": {"requests": {"cpu": "35m", "memory": "50Mi"}, "limits": {"cpu": "35m", "memory": "50Mi"}}}]}});
    let err = resize_to(upgrade).await.unwrap_err();
    assert!(err.to_string().contains("Pod QOS Class may not change as a result of resizing"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_volume_shows_the_image_files_read_only_and_goes_with_its_pod() {
    let registry = TestRegistry::start();
    let server = server_with_agent(&[&registry], 17, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let script = "ls /v/test-server; touch /v/new 2>&1; true";
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reader"}, "spec": {
        "restartPolicy": "Never",
        "volumes": [{"name": "v", "image": {"reference": registry.image("test-server"), "pullPolicy": "Always"}}],
        "containers": [{"name": "c", "image": registry.image("busybox"), "command": ["sh", "-c", script],
            "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]}});
    server.create(&pod.to_string());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually(90, "the pod to succeed", || async {
        (pods.get("reader").await.ok()?.status?.phase.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;
    let logs = server.kubectl_ok(&["logs", "reader"]);
    assert_eq!(logs, "/v/test-server\ntouch: /v/new: Read-only file system\n", "the image's files, read-only");
    let views = || containerd_list(&server, "snapshots", false);
    assert!(views().contains("volumes"), "the image's view is a snapshot: {}", views());
    pods.delete("reader", &DeleteParams::default()).await.unwrap();
    eventually(60, "the image volume's view removed with the pod", || async {
        (!views().contains("volumes")).then_some(())
    })
    .await;
}

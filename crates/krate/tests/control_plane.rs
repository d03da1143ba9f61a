//! The rest of the control plane against a real server with hollow nodes: endpoints,
//! per-namespace defaults, disruption budgets and eviction, quotas, priority and
//! preemption, topology spread, pod garbage collection, failure policies, progress
//! deadlines, and leader election of stand-alone schedulers and controller managers.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, HollowNodes, TestServer};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Event, Node, Pod, ResourceQuota, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

fn is_running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none() && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

async fn running(api: &Api<Pod>, selector: &str, n: usize) -> Vec<Pod> {
    eventually(30, &format!("{n} running pods for {selector}"), || async {
        let pods: Vec<Pod> = api
            .list(&ListParams::default().labels(selector))
            .await
            .ok()?
            .items
            .into_iter()
            .filter(is_running)
            .collect();
        (pods.len() == n).then_some(pods)
    })
    .await
}

fn apply(server: &TestServer, manifest: serde_json::Value) {
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest.to_string()));
    assert!(out.status.success(), "kubectl apply failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn deployment(name: &str, replicas: i32, pod_spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec}}})
}

#[tokio::test]
async fn services_get_endpoints_and_namespaces_get_their_defaults() {
    let server = TestServer::start();
    let _nodes = HollowNodes::start(&server, "hollow", 2, &[]);
    let client = server.client().await;

    // Every namespace gets the default ServiceAccount and the cluster CA.
    server.kubectl_ok(&["create", "namespace", "team"]);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "team");
    eventually(15, "the default service account", || async { accounts.get_opt("default").await.ok().flatten() }).await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    let ca =
        eventually(15, "kube-root-ca.crt", || async { maps.get_opt("kube-root-ca.crt").await.ok().flatten() }).await;
    let ca_pem = ca.data.unwrap()["ca.crt"].clone();
    assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(ca_pem, std::fs::read_to_string(server.data_dir().join("pki/ca.crt")).unwrap());
    // Deleted or edited, they come back as they were.
    accounts.delete("default", &DeleteParams::default()).await.unwrap();
    eventually(15, "the service account back", || async { accounts.get_opt("default").await.ok().flatten() }).await;
    server.kubectl_ok(&[
        "-n",
        "team",
        "patch",
        "configmap",
        "kube-root-ca.crt",
        "-p",
        r#"{"data":{"ca.crt":"tampered"}}"#,
    ]);
    eventually(15, "the CA restored", || async {
        (maps.get("kube-root-ca.crt").await.ok()?.data?["ca.crt"] == ca_pem).then_some(())
    })
    .await;

    // A service whose named target port resolves against each pod.
    let container = json!({"name": "web", "image": "nginx", "ports": [{"name": "http", "containerPort": 8080}]});
    apply(&server, deployment("web", 2, json!({"containers": [container]})));
    apply(
        &server,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    running(&pods, "app=web", 2).await;
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    let addresses = |e: &Endpoints| e.subsets.iter().flatten().flat_map(|s| s.addresses.iter().flatten()).count();
    let ep = eventually(15, "two endpoints", || async {
        endpoints.get_opt("web").await.ok().flatten().filter(|e| addresses(e) == 2)
    })
    .await;
    let subset = &ep.subsets.as_ref().unwrap()[0];
    assert_eq!(subset.ports.as_ref().unwrap()[0].port, 8080, "the named target port resolves to the container port");
    assert!(subset
        .addresses
        .as_ref()
        .unwrap()
        .iter()
        .all(|a| a.target_ref.as_ref().unwrap().kind.as_deref() == Some("Pod")));
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let by_service = ListParams::default().labels("kubernetes.io/service-name=web");
    eventually(15, "an EndpointSlice with both pods", || async {
        let list = slices.list(&by_service).await.ok()?.items;
        let endpoints = list.first()?.endpoints.clone()?;
        (list.len() == 1
            && endpoints.len() == 2
            && endpoints.iter().all(|e| e.conditions.as_ref().is_some_and(|c| c.ready == Some(true))))
        .then_some(())
    })
    .await;
    // Scaling shows up in both; kubectl prints them.
    server.kubectl_ok(&["scale", "deployment", "web", "--replicas=3"]);
    eventually(15, "three endpoints", || async {
        endpoints.get_opt("web").await.ok().flatten().filter(|e| addresses(e) == 3)
    })
    .await;
    let table = server.kubectl_ok(&["get", "endpointslices"]);
    assert!(table.contains("IPv4") && table.contains("8080"), "{table}");
    // A slice deleted from under the controller comes back.
    let slice = slices.list(&by_service).await.unwrap().items[0].metadata.name.clone().unwrap();
    slices.delete(&slice, &DeleteParams::default()).await.unwrap();
    eventually(15, "the slice recreated", || async {
        let list = slices.list(&by_service).await.ok()?.items;
        let endpoints = list.iter().map(|s| s.endpoints.as_ref().map_or(0, Vec::len)).sum::<usize>();
        (list.iter().all(|s| s.metadata.name.as_deref() != Some(&slice)) && endpoints == 3).then_some(())
    })
    .await;
    // The service goes, its endpoints and slices go.
    server.kubectl_ok(&["delete", "service", "web"]);
    eventually(15, "endpoints removed", || async {
        endpoints.get_opt("web").await.ok().flatten().is_none().then_some(())
    })
    .await;
    eventually(15, "slices removed", || async { slices.list(&by_service).await.ok()?.items.is_empty().then_some(()) })
        .await;
}

#[tokio::test]
async fn eviction_respects_disruption_budgets() {
    let server = TestServer::start();
    let _nodes = HollowNodes::start(&server, "hollow", 2, &[]);
    let client = server.client().await;
    // Bare pods: nothing replaces an evicted one behind the test's back.
    let db_pod = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"app": "db"}},
        "spec": {"containers": [{"name": "db", "image": "postgres"}]}})
    };
    for name in ["db-0", "db-1", "db-2"] {
        apply(&server, db_pod(name));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let first = running(&pods, "app=db", 3).await;
    server.kubectl_ok(&["create", "poddisruptionbudget", "db", "--selector=app=db", "--min-available=2"]);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    eventually(15, "one disruption allowed", || async {
        let s = budgets.get("db").await.ok()?.status?;
        (s.disruptions_allowed == Some(1)
            && s.current_healthy == Some(3)
            && s.desired_healthy == Some(2)
            && s.expected_pods == Some(3))
        .then_some(())
    })
    .await;

    // The first eviction spends the budget; the second is refused with upstream's 429.
    pods.evict(&first[0].name_any(), &EvictParams::default()).await.expect("first eviction allowed");
    // (kubectl: kube-rs retries 429s with back-off for minutes, as against any server.)
    let second = first[1].name_any();
    let eviction =
        json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": second, "namespace": "default"}})
            .to_string();
    let out = server.kubectl_stdin(
        &["create", "--raw", &format!("/api/v1/namespaces/default/pods/{second}/eviction"), "-f", "-"],
        Some(&eviction),
    );
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "Error from server (TooManyRequests): Cannot evict pod as it would violate the pod's disruption budget."
    );
    assert!(
        pods.get(&first[1].name_any()).await.unwrap().metadata.deletion_timestamp.is_none(),
        "the refused pod keeps running"
    );
    // Once a replacement runs, the budget allows one disruption again.
    eventually(15, "the evicted pod gone", || async {
        pods.get_opt(&first[0].name_any()).await.ok()?.is_none().then_some(())
    })
    .await;
    apply(&server, db_pod("db-3"));
    running(&pods, "app=db", 3).await;
    eventually(15, "the budget replenished", || async {
        (budgets.get("db").await.ok()?.status?.disruptions_allowed == Some(1)).then_some(())
    })
    .await;
    let table = server.kubectl_ok(&["get", "pdb", "db"]);
    assert!(table.contains("ALLOWED DISRUPTIONS"), "{table}");
}

#[tokio::test]
async fn quotas_refuse_creates_over_their_limits_and_count_usage() {
    let server = TestServer::start();
    let client = server.client().await;
    server.kubectl_ok(&["create", "quota", "small", "--hard=pods=2,requests.cpu=1"]);
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), "default");
    let used = |resource: &'static str, value: &'static str| {
        let quotas = quotas.clone();
        async move { (quotas.get("small").await.ok()?.status?.used?.get(resource)?.0 == value).then_some(()) }
    };
    eventually(15, "usage counted", || used("pods", "0")).await;
    let pod = |name: &str, cpu: Option<&str>| {
        let resources = cpu.map(|c| json!({"requests": {"cpu": c}})).unwrap_or(json!({}));
        serde_json::from_value::<Pod>(json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "x", "resources": resources}]}})).unwrap()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let err = pods
        .create(&PostParams::default(), &pod("no-requests", None))
        .await
        .expect_err("a pod without cpu requests is refused");
    assert!(err.to_string().contains("must specify requests.cpu"), "{err}");
    pods.create(&PostParams::default(), &pod("a", Some("500m"))).await.unwrap();
    pods.create(&PostParams::default(), &pod("b", Some("400m"))).await.unwrap();
    let err =
        pods.create(&PostParams::default(), &pod("c", Some("100m"))).await.expect_err("a third pod is over the quota");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403);
            assert_eq!(
                s.message,
                "pods \"c\" is forbidden: exceeded quota: small, requested: pods=1, used: pods=2, limited: pods=2"
            );
        }
        other => panic!("unexpected error {other}"),
    }
    eventually(15, "cpu usage counted", || used("requests.cpu", "900m")).await;
    pods.delete("a", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    eventually(15, "usage recounted after a delete", || used("pods", "1")).await;
    pods.create(&PostParams::default(), &pod("c", Some("100m"))).await.expect("room again");
}

#[tokio::test]
async fn a_replication_controller_over_its_quota_shows_replica_failure_until_it_fits() {
    let server = TestServer::start();
    let client = server.client().await;
    server.kubectl_ok(&["create", "quota", "two-pods", "--hard=pods=2"]);
    let rcs: Api<k8s_openapi::api::core::v1::ReplicationController> = Api::namespaced(client.clone(), "default");
    eventually(15, "the quota counted", || async {
        let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), "default");
        quotas.get("two-pods").await.ok()?.status?.used.map(|_| ())
    })
    .await;
    let rc = json!({"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "condition-test"},
        "spec": {"replicas": 3, "selector": {"name": "condition-test"}, "template": {"metadata": {"labels": {"name": "condition-test"}},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}}});
    rcs.create(&PostParams::default(), &serde_json::from_value(rc).unwrap()).await.unwrap();
    let failure = |present: bool| {
        let rcs = rcs.clone();
        move || {
            let rcs = rcs.clone();
            async move {
                let status = rcs.get("condition-test").await.ok()?.status?;
                let cond = status.conditions.into_iter().flatten().find(|c| c.type_ == "ReplicaFailure");
                match (present, cond) {
                    (true, Some(c)) => Some(Some((c.reason, c.message))),
                    (false, None) => Some(None),
                    _ => None,
                }
            }
        }
    };
    let (reason, message) = eventually(30, "the ReplicaFailure condition", failure(true)).await.unwrap();
    assert_eq!(reason.as_deref(), Some("FailedCreate"));
    assert!(message.unwrap().contains("exceeded quota: two-pods"));
    // Scaled down to what the quota allows: the condition goes.
    server.kubectl_ok(&["scale", "rc", "condition-test", "--replicas=2"]);
    eventually(30, "the ReplicaFailure condition to go", failure(false)).await;
}

#[tokio::test]
async fn higher_priority_pods_preempt_lower_ones() {
    let server = TestServer::start();
    let _nodes = HollowNodes::start(&server, "small", 1, &["--cpu", "2"]);
    let client = server.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let unknown = pods
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {"priorityClassName": "nope", "containers": [{"name": "c", "image": "x"}]}})).unwrap())
        .await
        .expect_err("an unknown priority class is refused");
    assert!(unknown.to_string().contains("no PriorityClass with name nope was found"), "{unknown}");
    apply(
        &server,
        json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "high"}, "value": 1000}),
    );
    let pod = |name: &str, cpu: &str, class: Option<&str>| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"tier": name}},
            "spec": {"priorityClassName": class, "containers": [{"name": "c", "image": "x", "resources": {"requests": {"cpu": cpu}}}]}})
    };
    apply(&server, pod("low-big", "1", None));
    apply(&server, pod("low-small", "900m", None));
    running(&pods, "tier in (low-big,low-small)", 2).await;
    apply(&server, pod("vip", "1", Some("high")));
    assert_eq!(pods.get("vip").await.unwrap().spec.unwrap().priority, Some(1000));
    let vip = running(&pods, "tier=vip", 1).await;
    assert_eq!(vip[0].spec.as_ref().unwrap().node_name.as_deref(), Some("small-0"));
    // The cheapest victim that makes room: the smaller of the two low-priority pods.
    eventually(15, "the victim gone", || async { pods.get_opt("low-small").await.ok()?.is_none().then_some(()) }).await;
    assert!(is_running(&pods.get("low-big").await.unwrap()));
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let preempted = events.list(&ListParams::default().fields("involvedObject.name=low-small")).await.unwrap().items;
    assert!(preempted.iter().any(|e| e.reason.as_deref() == Some("Preempted")), "{preempted:?}");
}

#[tokio::test]
async fn a_pods_runtime_class_gives_it_its_overhead_and_scheduling_and_must_exist() {
    let server = TestServer::start();
    let pods: Api<Pod> = Api::namespaced(server.client().await, "default");
    let pod = |name: &str, class: &str, extra: serde_json::Value| -> Pod {
        let mut spec = json!({"runtimeClassName": class, "nodeSelector": {"disk": "ssd"}, "containers": [{"name": "c", "image": "x"}]});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
    };
    let missing = pods.create(&PostParams::default(), &pod("lost", "nope", json!({}))).await.expect_err("refused");
    assert!(
        missing.to_string().contains(r#"pods "lost" is forbidden: pod rejected: RuntimeClass "nope" not found"#),
        "{missing}"
    );
    apply(
        &server,
        json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "gvisor"}, "handler": "runsc",
            "overhead": {"podFixed": {"cpu": "10m", "memory": "1Mi"}},
            "scheduling": {"nodeSelector": {"sandbox": "yes"}, "tolerations": [{"key": "sandbox", "operator": "Exists"}]}}),
    );
    let created = pods.create(&PostParams::default(), &pod("boxed", "gvisor", json!({}))).await.unwrap();
    let spec = created.spec.unwrap();
    let overhead = spec.overhead.unwrap();
    assert_eq!((overhead["cpu"].0.as_str(), overhead["memory"].0.as_str()), ("10m", "1Mi"));
    let selector = spec.node_selector.unwrap();
    assert_eq!((selector["disk"].as_str(), selector["sandbox"].as_str()), ("ssd", "yes"));
    assert!(spec.tolerations.unwrap().iter().any(|t| t.key.as_deref() == Some("sandbox")));
    // An overhead of its own that differs, or a node selector that conflicts: refused.
    let overhead = json!({"overhead": {"cpu": "1"}});
    let differs = pods.create(&PostParams::default(), &pod("greedy", "gvisor", overhead)).await.expect_err("refused");
    assert!(
        differs.to_string().contains("pod rejected: Pod's Overhead doesn't match RuntimeClass's defined Overhead"),
        "{differs}"
    );
    let conflict = json!({"nodeSelector": {"sandbox": "no"}});
    let conflict = pods.create(&PostParams::default(), &pod("torn", "gvisor", conflict)).await.expect_err("refused");
    assert!(
        conflict.to_string().contains(
            "conflict: runtimeClass.scheduling.nodeSelector[sandbox] = yes; pod.spec.nodeSelector[sandbox] = no"
        ),
        "{conflict}"
    );
}

#[tokio::test]
async fn topology_spread_evens_out_zones() {
    let server = TestServer::start();
    let _zone_a = HollowNodes::start(&server, "a", 3, &["--label", "zone=a"]);
    let _zone_b = HollowNodes::start(&server, "b", 1, &["--label", "zone=b"]);
    let client = server.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    eventually(15, "four nodes", || async {
        (nodes.list(&ListParams::default()).await.ok()?.items.len() == 4).then_some(())
    })
    .await;
    let spread = json!([{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "spread"}}}]);
    apply(
        &server,
        deployment(
            "spread",
            4,
            json!({"topologySpreadConstraints": spread, "containers": [{"name": "c", "image": "x"}]}),
        ),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let placed = running(&pods, "app=spread", 4).await;
    let in_b = placed.iter().filter(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some("b-0")).count();
    assert_eq!(in_b, 2, "zone b (one node) takes half of the pods despite zone a having three nodes");
}

#[tokio::test]
async fn pods_of_a_deleted_node_are_collected() {
    let server = TestServer::start();
    let _nodes = HollowNodes::start(&server, "gone", 1, &[]);
    let client = server.client().await;
    apply(
        &server,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orphan", "namespace": "default"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually(30, "the pod running", || async { pods.get("orphan").await.ok().filter(is_running) }).await;
    server.kubectl_ok(&["delete", "node", "gone-0"]);
    eventually(15, "the pod collected", || async { pods.get_opt("orphan").await.ok()?.is_none().then_some(()) }).await;
}

#[tokio::test]
async fn failure_policies_and_progress_deadlines() {
    let server = TestServer::start();
    let _nodes = HollowNodes::start(&server, "hollow", 1, &[]);
    let client = server.client().await;
    // Exit code 42 fails the Job at once, well before backoffLimit.
    apply(
        &server,
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "fatal", "namespace": "default"}, "spec": {
        "backoffLimit": 6,
        "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}}]},
        "template": {"metadata": {"annotations": {"hollow.krate.io/exit-code": "42"}},
                     "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "x"}]}}}}),
    );
    let jobs: Api<Job> = Api::namespaced(client.clone(), "default");
    let failed = eventually(30, "the job failed", || async {
        let job = jobs.get("fatal").await.ok()?;
        job.status.clone()?.conditions?.into_iter().find(|c| c.type_ == "Failed" && c.status == "True")
    })
    .await;
    assert_eq!(failed.reason.as_deref(), Some("PodFailurePolicy"));
    assert!(failed.message.unwrap().contains("failed with exit code 42 matching FailJob rule at index 0"));
    assert_eq!(jobs.get("fatal").await.unwrap().status.unwrap().failed, Some(1));
    // What the controllers did shows in `kubectl describe`, as upstream's events.
    let described = server.kubectl_ok(&["describe", "job", "fatal"]);
    assert!(
        described.contains("SuccessfulCreate")
            && described.contains("job-controller")
            && described.contains("Created pod: fatal-"),
        "{described}"
    );
    assert!(described.contains("Warning  PodFailurePolicy"), "{described}");

    // A rollout that cannot progress is reported after progressDeadlineSeconds.
    let mut stuck = deployment(
        "stuck",
        1,
        json!({"nodeSelector": {"no": "such-node"}, "containers": [{"name": "c", "image": "x"}]}),
    );
    stuck["spec"]["progressDeadlineSeconds"] = json!(2);
    apply(&server, stuck);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let condition = eventually(20, "the deadline exceeded", || async {
        let d = deployments.get("stuck").await.ok()?;
        d.status?.conditions?.into_iter().find(|c| {
            c.type_.as_deref() == Some("Progressing") && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
    })
    .await;
    assert_eq!(condition.status.as_deref(), Some("False"));
    let described = server.kubectl_ok(&["describe", "deployment", "stuck"]);
    assert!(described.contains("ScalingReplicaSet") && described.contains("from 0 to 1"), "{described}");
    let out = server.kubectl(&["rollout", "status", "deployment/stuck", "--timeout=10s"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exceeded its progress deadline"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A stand-alone component process, killed on drop.
struct Component(Child);

impl Component {
    fn start(server: &TestServer, args: &[&str]) -> Self {
        Self::start_as(&server.kubeconfig(), args)
    }

    /// The component with the credentials of `kubeconfig`.
    fn start_as(kubeconfig: &std::path::Path, args: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_krate"))
            .args(args)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a krate component");
        Self(child)
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn standalone_components_elect_a_leader_and_fail_over() {
    let server = TestServer::start_with(&["--disable-controllers"]);
    let _nodes = HollowNodes::start(&server, "hollow", 2, &[]);
    let client = server.client().await;
    let quick = ["--leader-elect-lease-duration-seconds", "3"];
    let _controllers = Component::start(&server, &[&["controller-manager"][..], &quick].concat());
    let mut one =
        Some(Component::start(&server, &[&["scheduler", "--leader-elect-identity", "one"][..], &quick].concat()));
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    eventually(15, "scheduler one leading", || async {
        (leases.get("kube-scheduler").await.ok()?.spec?.holder_identity? == "one").then_some(())
    })
    .await;
    let _two = Component::start(&server, &[&["scheduler", "--leader-elect-identity", "two"][..], &quick].concat());

    server.kubectl_ok(&["create", "deployment", "web", "--image=nginx", "--replicas=2"]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    running(&pods, "app=web", 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        leases.get("kube-scheduler").await.unwrap().spec.unwrap().holder_identity.as_deref(),
        Some("one"),
        "the standby does not take over a live leader"
    );

    // The leader dies: the standby takes over after the lease expires, and schedules.
    drop(one.take());
    eventually(20, "scheduler two leading", || async {
        (leases.get("kube-scheduler").await.ok()?.spec?.holder_identity? == "two").then_some(())
    })
    .await;
    let lease = leases.get("kube-scheduler").await.unwrap().spec.unwrap();
    assert!(lease.lease_transitions.unwrap_or(0) >= 1);
    server.kubectl_ok(&["scale", "deployment", "web", "--replicas=4"]);
    running(&pods, "app=web", 4).await;
}

#[tokio::test]
async fn a_standalone_controller_manager_acts_as_each_controllers_account() {
    let server = TestServer::start_audited(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
         - level: Metadata\n  verbs: [create]\n- level: None\n",
        &["--disable-controllers"],
    );
    let manager = server.minted_kubeconfig(&["--user", "system:kube-controller-manager"], "manager.kubeconfig");
    let _controllers = Component::start_as(&manager, &["controller-manager", "--leader-elect=false"]);
    server.kubectl_ok(&["create", "deployment", "web", "--image=nginx", "--replicas=2"]);
    let pods: Api<Pod> = Api::namespaced(server.client().await, "default");
    eventually(30, "the deployment's pods", || async {
        (pods.list(&ListParams::default().labels("app=web")).await.ok()?.items.len() == 2).then_some(())
    })
    .await;

    let creates: Vec<serde_json::Value> =
        server.audit_events().into_iter().filter(|e| e["responseStatus"]["code"] == 201).collect();
    let creator = |resource: &str, subresource: Option<&str>| -> Vec<&str> {
        creates
            .iter()
            .filter(|e| e["objectRef"]["resource"] == resource && e["objectRef"]["subresource"].as_str() == subresource)
            .filter_map(|e| e["user"]["username"].as_str())
            .collect()
    };
    let account = |name: &str| format!("system:serviceaccount:kube-system:{name}");
    assert_eq!(creator("replicasets", None), [account("deployment-controller")]);
    assert_eq!(creator("pods", None), vec![account("replicaset-controller"); 2]);
    let tokens = creator("serviceaccounts", Some("token"));
    assert!(!tokens.is_empty() && tokens.iter().all(|u| *u == "system:kube-controller-manager"), "{tokens:?}");
    let accounts: Api<ServiceAccount> = Api::namespaced(server.client().await, "kube-system");
    assert!(accounts.get_opt("replicaset-controller").await.unwrap().is_some(), "the manager creates the accounts");
}

#[tokio::test]
async fn component_statuses_follow_the_leaders_leases_and_the_store() {
    let server = TestServer::start();
    let (table, warnings) = eventually(30, "every component healthy", || async {
        let out = server.kubectl(&["get", "componentstatuses"]);
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        let healthy = table.lines().filter(|l| l.split_whitespace().nth(1) == Some("Healthy")).count();
        (healthy == 3).then(|| (table, String::from_utf8_lossy(&out.stderr).into_owned()))
    })
    .await;
    for component in ["scheduler", "controller-manager", "etcd-0"] {
        assert!(table.contains(component), "{table}");
    }
    assert!(table.starts_with("NAME") && table.contains("MESSAGE") && table.contains("ERROR"), "{table}");
    assert!(warnings.contains("v1 ComponentStatus is deprecated in v1.19+"), "{warnings}");

    // Without controllers nobody takes the scheduler's Lease.
    let bare = TestServer::start_with(&["--disable-controllers"]);
    let row = bare.kubectl_ok(&["get", "cs", "scheduler", "--no-headers"]);
    assert!(row.contains("Unhealthy") && row.contains("no scheduler has ever taken its leader Lease"), "{row}");
    let out = bare.kubectl(&["get", "cs", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("componentstatus \"nope\" not found"));
}

#[tokio::test]
async fn a_namespace_deletes_its_pods_before_the_rest_and_says_what_is_left() {
    let server = TestServer::start();
    let client = server.client().await;
    server.kubectl_ok(&["create", "namespace", "ordered"]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ordered");
    let pod = json!({"metadata": {"name": "held", "finalizers": ["e2e.example.com/finalizer"]},
        "spec": {"containers": [{"name": "c", "image": "x"}]}});
    pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
    server.kubectl_ok(&["create", "configmap", "kept", "-n", "ordered", "--from-literal=a=1"]);
    server.kubectl_ok(&["delete", "namespace", "ordered", "--wait=false"]);
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let failure = eventually(30, "the content failure condition", || async {
        let ns = namespaces.get("ordered").await.ok()?;
        let conditions = ns.status?.conditions?;
        conditions.into_iter().find(|c| c.type_ == "NamespaceDeletionContentFailure" && c.status == "True")
    })
    .await;
    assert!(failure.message.unwrap_or_default().contains("Resource=pods"));
    let ns = namespaces.get("ordered").await.unwrap();
    let conditions = ns.status.unwrap().conditions.unwrap();
    let remaining = conditions.iter().find(|c| c.type_ == "NamespaceFinalizersRemaining").unwrap();
    assert_eq!(
        remaining.message.as_deref(),
        Some(
            "Some content in the namespace has finalizers remaining: e2e.example.com/finalizer in 1 resource instances"
        )
    );
    // The pod is going, the ConfigMap waits for it.
    assert!(pods.get("held").await.unwrap().metadata.deletion_timestamp.is_some());
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "ordered");
    assert!(maps.get_opt("kept").await.unwrap().is_some(), "nothing else goes while a pod is left");

    let release = kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}}));
    pods.patch("held", &kube::api::PatchParams::default(), &release).await.unwrap();
    eventually(60, "the namespace gone", || async {
        namespaces.get_opt("ordered").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn endpoints_of_a_service_without_selector_are_mirrored_into_slices() {
    let server = TestServer::start();
    let client = server.client().await;
    let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "custom"},
        "spec": {"ports": [{"name": "http", "port": 80}]}});
    let endpoints = |ip: &str| {
        json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "custom"},
            "subsets": [{"addresses": [{"ip": ip}], "ports": [{"name": "http", "port": 8080}]}]})
    };
    for object in [service, endpoints("10.9.9.9")] {
        apply(&server, object);
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let mirrored = ListParams::default()
        .labels("kubernetes.io/service-name=custom,endpointslice.kubernetes.io/managed-by=endpointslicemirroring-controller.k8s.io");
    let addresses = || async {
        let list = slices.list(&mirrored).await.ok()?.items;
        let ips: Vec<String> =
            list.iter().flat_map(|s| s.endpoints.iter().flatten().flat_map(|e| e.addresses.clone())).collect();
        Some((ips, list.first().and_then(|s| s.ports.clone()?.first()?.port)))
    };
    eventually(15, "the mirrored slice", || async {
        addresses().await.filter(|(ips, port)| *ips == ["10.9.9.9"] && *port == Some(8080))
    })
    .await;
    apply(&server, endpoints("10.9.9.10"));
    eventually(15, "the slice following the Endpoints", || async {
        addresses().await.filter(|(ips, _)| *ips == ["10.9.9.10"])
    })
    .await;
    // The kubernetes Service's own Endpoints say not to mirror them.
    let kubernetes = ListParams::default()
        .labels("kubernetes.io/service-name=kubernetes,endpointslice.kubernetes.io/managed-by=endpointslicemirroring-controller.k8s.io");
    assert!(slices.list(&kubernetes).await.unwrap().items.is_empty());
    server.kubectl_ok(&["delete", "endpoints", "custom"]);
    eventually(15, "the mirrored slice gone", || async {
        slices.list(&mirrored).await.ok()?.items.is_empty().then_some(())
    })
    .await;
}

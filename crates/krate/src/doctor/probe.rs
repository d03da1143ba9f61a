//! `krate doctor`'s live probe: the network as pods see it. One pod of krate's echo
//! image on each Ready node (hollow nodes have no network and are left out) behind a
//! Service, in a namespace of its own that goes at the end. Through the API server's pod
//! proxy each pod is asked to fetch from the others' pod IPs (the pod network across
//! nodes), from the Service's cluster IP (the service proxy) and from the Service's DNS
//! name (cluster DNS), and for its node's clock (time skew against this machine, the
//! request's round trip allowed for).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use super::{check, Check, Outcome};
use crate::soak::{echo_pod, ensure_namespace, node_ready, pod_ready};

const NAMESPACE: &str = "krate-doctor";
const SERVICE: &str = "probe";
/// A clock further off than this is a warning; ten times this, a failure.
const SKEW_WARNING: Duration = Duration::from_secs(2);

/// What the probe pods are: name, node, IP.
struct ProbePod {
    name: String,
    node: String,
    ip: String,
}

/// GETs `path` of a pod through the API server's proxy.
async fn ask(client: &kube::Client, pod: &str, path: &str) -> Result<String, String> {
    let url = format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}:8080/proxy{path}");
    let request = http::Request::get(&url).body(Vec::new()).map_err(|e| e.to_string())?;
    client.request_text(request).await.map_err(|e| match e {
        kube::Error::Api(s) => s.message,
        e => e.to_string(),
    })
}

/// What `deploy` set up: the Ready probe pods, the Service's cluster IP and DNS name.
type Deployed = (Vec<ProbePod>, String, String);

/// Creates the namespace, a pod per real Ready node and the Service; waits (at most a
/// minute) for the pods to be Ready. None: no node to probe.
async fn deploy(client: &kube::Client, cluster_domain: &str) -> Result<Option<Deployed>, String> {
    ensure_namespace(client, NAMESPACE).await.map_err(|e| format!("creating namespace {NAMESPACE}: {e}"))?;
    let nodes: Api<Node> = Api::all(client.clone());
    let nodes = nodes.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
    let real_ready: Vec<String> = nodes
        .iter()
        .filter(|n| !crate::hollow::is_hollow(n) && node_ready(n))
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    if real_ready.is_empty() {
        return Ok(None);
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    for (i, node) in real_ready.iter().enumerate() {
        let pod = echo_pod(NAMESPACE, &format!("probe-{i}"), node, krate_agent::images::ECHO_IMAGE, "krate-doctor", 1);
        krate_client::tolerate(pods.create(&PostParams::default(), &pod).await, &[409])
            .map_err(|e| format!("creating a probe pod on {node}: {e}"))?;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let service = json!({"metadata": {"name": SERVICE}, "spec": {"selector": {"app.kubernetes.io/name": "krate-doctor"},
        "ports": [{"port": 80, "targetPort": 8080}]}});
    let service: Service = serde_json::from_value(service).expect("a service");
    let cluster_ip = match services.create(&PostParams::default(), &service).await {
        Ok(s) => s.spec.and_then(|s| s.cluster_ip),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            services.get(SERVICE).await.ok().and_then(|s| s.spec).and_then(|s| s.cluster_ip)
        }
        Err(e) => return Err(format!("creating the probe Service: {e}")),
    }
    .ok_or("the probe Service has no cluster IP")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = pods.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
        let ready: Vec<ProbePod> = listed
            .iter()
            .filter(|p| pod_ready(p))
            .map(|p| ProbePod {
                name: p.metadata.name.clone().unwrap_or_default(),
                node: p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
                ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
            })
            .collect();
        if ready.len() == real_ready.len() {
            let dns = format!("{SERVICE}.{NAMESPACE}.svc.{cluster_domain}");
            return Ok(Some((ready, cluster_ip, dns)));
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> = real_ready.iter().filter(|n| !ready.iter().any(|p| &p.node == *n)).collect();
            return Err(format!(
                "the probe pods on {missing:?} were not Ready within a minute (`kubectl describe pods -n {NAMESPACE}`)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The checks of the live probe.
pub async fn probe_checks(client: kube::Client, cluster_domain: &str, checks: &mut Vec<Check>) {
    let result = deploy(&client, cluster_domain).await;
    match result {
        Err(e) => checks.push(check(
            "live probe",
            Outcome::Failed,
            e,
            "check that the nodes run pods (`kubectl get pods -A -o wide`) and have krate's echo image (the agent imports it at start)",
        )),
        Ok(None) => checks.push(check("live probe", Outcome::Warning, "no Ready node with a network to run a probe pod on", "")),
        Ok(Some((pods, cluster_ip, dns))) => {
            pod_network(&client, &pods, checks).await;
            service(&client, &pods, &format!("{cluster_ip}:80"), "Service VIP", checks,
                "check the service proxy on the nodes (`nft list table ip krate` on a node) and the Service's endpoints (`kubectl get endpoints -n krate-doctor`)").await;
            service(&client, &pods, &format!("{dns}:80"), "cluster DNS", checks,
                "check the DNS responder on the nodes (the agent's log, `dns`) and the kube-dns Service (`kubectl get svc -n kube-system kube-dns`)").await;
            clocks(&client, &pods, checks).await;
        }
    }
    let namespaces: Api<Namespace> = Api::all(client);
    let _ = namespaces.delete(NAMESPACE, &DeleteParams::default()).await;
}

async fn pod_network(client: &kube::Client, pods: &[ProbePod], checks: &mut Vec<Check>) {
    let mut failures = Vec::new();
    let mut paths = 0;
    for from in pods {
        for to in pods {
            paths += 1;
            match ask(client, &from.name, &format!("/fetch/{}:8080/doctor", to.ip)).await {
                Ok(body) if body.trim() == format!("{} /doctor", to.name) => {}
                Ok(body) => failures.push(format!("{} → {}: unexpected answer {body:?}", from.node, to.node)),
                Err(e) => failures.push(format!("{} → {} ({}): {e}", from.node, to.node, to.ip)),
            }
        }
    }
    checks.push(if failures.is_empty() {
        check("pod network", Outcome::Ok, format!("{paths} pod-to-pod paths across {} nodes answer", pods.len()), "")
    } else {
        check(
            "pod network",
            Outcome::Failed,
            failures.join("; "),
            "check the routes to other nodes' pod CIDRs on each node (`ip route | grep 'proto 75'`) and that NetworkPolicies allow it",
        )
    });
}

async fn service(
    client: &kube::Client,
    pods: &[ProbePod],
    target: &str,
    name: &str,
    checks: &mut Vec<Check>,
    fix: &str,
) {
    let mut failures = Vec::new();
    for from in pods {
        match ask(client, &from.name, &format!("/fetch/{target}/doctor")).await {
            Ok(body) if body.trim().ends_with(" /doctor") && body.starts_with("probe-") => {}
            Ok(body) => failures.push(format!("from {}: unexpected answer {body:?}", from.node)),
            Err(e) => failures.push(format!("from {}: {e}", from.node)),
        }
    }
    checks.push(if failures.is_empty() {
        check(name, Outcome::Ok, format!("{target} answers from every node's pod"), "")
    } else {
        check(name, Outcome::Failed, failures.join("; "), fix)
    });
}

/// How far a node's clock is from this machine's, by the middle of the request.
async fn clocks(client: &kube::Client, pods: &[ProbePod], checks: &mut Vec<Check>) {
    let mut worst: Option<(f64, String)> = None;
    let mut errors = Vec::new();
    for pod in pods {
        let before = jiff::Timestamp::now().as_millisecond() as f64;
        match ask(client, &pod.name, "/time").await {
            Ok(body) => {
                let after = jiff::Timestamp::now().as_millisecond() as f64;
                let Ok(theirs) = body.trim().parse::<f64>() else { continue };
                let skew = theirs - (before + after) / 2.0;
                if worst.as_ref().is_none_or(|(w, _)| skew.abs() > w.abs()) {
                    worst = Some((skew, pod.node.clone()));
                }
            }
            Err(e) => errors.push(format!("{}: {e}", pod.node)),
        }
    }
    let fix =
        "run a time service (chrony, systemd-timesyncd) on every node: leases, certificates and logs need one clock";
    checks.push(match worst {
        None => check("time skew", Outcome::Warning, format!("no node told its time: {}", errors.join("; ")), ""),
        Some((skew, node)) => {
            let text = format!("at most {:.0} ms between this machine and the nodes ({node})", skew.abs());
            let ms = SKEW_WARNING.as_millis() as f64;
            if skew.abs() > 10.0 * ms {
                check("time skew", Outcome::Failed, text, fix)
            } else if skew.abs() > ms {
                check("time skew", Outcome::Warning, text, fix)
            } else {
                check("time skew", Outcome::Ok, text, "")
            }
        }
    });
}

//! Stock kubectl, run as a subprocess, against a real krate server.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{stderr, TestServer};

const MANIFEST: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: shop
  labels: {app: shop, tier: config}
data:
  color: blue
---
apiVersion: v1
kind: Secret
metadata:
  name: creds
  namespace: shop
stringData:
  password: hunter2
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: registry.local/web:1.0
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
  namespace: shop
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: m
        image: busybox
        command: ["true"]
"#;

#[test]
fn apply_get_and_output_formats() {
    let server = TestServer::start();
    let manifest = server.dir.path().join("shop.yaml");
    std::fs::write(&manifest, format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---{MANIFEST}"))
        .unwrap();
    let manifest = manifest.to_str().unwrap();

    let applied = server.kubectl_ok(&["apply", "-f", manifest]);
    for line in [
        "namespace/shop created",
        "configmap/settings created",
        "secret/creds created",
        "deployment.apps/web created",
        "service/web created",
        "job.batch/migrate created",
    ] {
        assert!(applied.contains(line), "{line:?} in {applied}");
    }
    let again = server.kubectl_ok(&["apply", "-f", manifest]);
    assert!(again.contains("deployment.apps/web unchanged"), "{again}");

    let names = server.kubectl_ok(&["get", "deploy,svc,job,cm", "-n", "shop", "-o", "name"]);
    for n in ["deployment.apps/web", "service/web", "job.batch/migrate", "configmap/settings"] {
        assert!(names.contains(n), "{n} in {names}");
    }
    let table = server.kubectl_ok(&["get", "configmaps", "-A"]);
    assert!(table.lines().next().unwrap().starts_with("NAMESPACE"), "{table}");
    assert!(table.contains("shop") && table.contains("settings"), "{table}");
    let wide = server.kubectl_ok(&["get", "deploy", "-n", "shop", "-o", "wide"]);
    assert!(wide.contains("web"), "{wide}");

    let json: serde_json::Value =
        serde_json::from_str(&server.kubectl_ok(&["get", "cm", "settings", "-n", "shop", "-o", "json"])).unwrap();
    assert_eq!(json["data"]["color"], "blue");
    let yaml = server.kubectl_ok(&["get", "deploy", "web", "-n", "shop", "-o", "yaml"]);
    assert!(
        yaml.contains("maxSurge: 25%") && yaml.contains("revisionHistoryLimit: 10"),
        "defaults are applied:\n{yaml}"
    );
    let secret = server.kubectl_ok(&["get", "secret", "creds", "-n", "shop", "-o", "jsonpath={.data.password}"]);
    assert_eq!(secret, "aHVudGVyMg==", "stringData was merged into data");
    let selector =
        server.kubectl_ok(&["get", "job", "migrate", "-n", "shop", "-o", "jsonpath={.spec.selector.matchLabels}"]);
    assert!(selector.contains("batch.kubernetes.io/controller-uid"), "{selector}");

    let by_label = server.kubectl_ok(&["get", "cm", "-n", "shop", "-l", "tier=config", "-o", "name"]);
    assert_eq!(by_label.trim(), "configmap/settings");
    let none = server.kubectl_ok(&["get", "cm", "-n", "shop", "-l", "tier=nothing", "-o", "name"]);
    assert_eq!(none.trim(), "");
    let by_field = server.kubectl_ok(&["get", "cm", "-A", "--field-selector", "metadata.name=settings", "-o", "name"]);
    assert_eq!(by_field.trim(), "configmap/settings");
    let bad_field = server.kubectl(&["get", "cm", "--field-selector", "data.color=blue"]);
    assert!(
        !bad_field.status.success() && stderr(&bad_field).contains("field label not supported"),
        "{}",
        stderr(&bad_field)
    );

    let described = server.kubectl_ok(&["describe", "deployment", "web", "-n", "shop"]);
    assert!(
        described.contains("Name:")
            && described.contains("registry.local/web:1.0")
            && described.contains("RollingUpdate"),
        "{described}"
    );

    let raw = server.kubectl_ok(&["get", "--raw", "/apis/apps/v1/namespaces/shop/deployments/web"]);
    let raw: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(raw["spec"]["replicas"], 2);

    let resources = server.kubectl_ok(&["api-resources"]);
    for needle in [
        "deployments",
        "deploy",
        "apps/v1",
        "horizontalpodautoscalers",
        "certificatesigningrequests",
        "leases",
        "endpointslices",
        "priorityclasses",
        "runtimeclasses",
    ] {
        assert!(resources.contains(needle), "{needle} in api-resources");
    }
    let versions = server.kubectl_ok(&["api-versions"]);
    for v in [
        "v1",
        "apps/v1",
        "batch/v1",
        "autoscaling/v1",
        "autoscaling/v2",
        "coordination.k8s.io/v1",
        "discovery.k8s.io/v1",
        "events.k8s.io/v1",
        "networking.k8s.io/v1",
        "policy/v1",
        "rbac.authorization.k8s.io/v1",
        "scheduling.k8s.io/v1",
        "storage.k8s.io/v1",
        "node.k8s.io/v1",
        "certificates.k8s.io/v1",
    ] {
        assert!(versions.lines().any(|l| l == v), "{v} in api-versions");
    }
}

#[test]
fn mutate_and_delete() {
    let server = TestServer::start();
    server.kubectl_ok(&["create", "namespace", "shop"]);
    server.kubectl_stdin(&["apply", "-f", "-"], Some(MANIFEST));
    server.kubectl_ok(&["label", "deploy", "web", "-n", "shop", "tier=frontend"]);
    server.kubectl_ok(&["annotate", "deploy", "web", "-n", "shop", "note=hello"]);
    server.kubectl_ok(&["patch", "deploy", "web", "-n", "shop", "--type", "merge", "-p", r#"{"spec":{"replicas":4}}"#]);
    server.kubectl_ok(&[
        "patch",
        "deploy",
        "web",
        "-n",
        "shop",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"registry.local/web:2.0"}]"#,
    ]);
    let got = server.kubectl_ok(&["get", "deploy", "web", "-n", "shop", "-o", "jsonpath={.metadata.labels.tier} {.metadata.annotations.note} {.spec.replicas} {.spec.template.spec.containers[0].image} {.metadata.generation}"]);
    assert_eq!(got, "frontend hello 4 registry.local/web:2.0 3");
    server.kubectl_ok(&["scale", "deploy", "web", "-n", "shop", "--replicas=7"]);
    assert_eq!(server.kubectl_ok(&["get", "deploy", "web", "-n", "shop", "-o", "jsonpath={.spec.replicas}"]), "7");
    server.kubectl_ok(&["label", "deploy", "web", "-n", "shop", "tier-"]);
    assert_eq!(
        server.kubectl_ok(&["get", "deploy", "web", "-n", "shop", "-o", "jsonpath={.metadata.labels}"]),
        r#"{"app":"web"}"#
    );

    let bad = server.kubectl(&[
        "patch",
        "deploy",
        "web",
        "-n",
        "shop",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":"many"}}"#,
    ]);
    assert!(!bad.status.success() && stderr(&bad).contains("cannot be handled as a Deployment"), "{}", stderr(&bad));

    let deleted = server.kubectl_ok(&["delete", "secret", "creds", "-n", "shop"]);
    assert!(deleted.contains("secret \"creds\" deleted"), "{deleted}");
    server.kubectl_ok(&["create", "configmap", "a1", "-n", "shop", "--from-literal=x=1"]);
    server.kubectl_ok(&["label", "configmap", "a1", "-n", "shop", "app=shop"]);
    let by_label = server.kubectl_ok(&["delete", "configmap", "-n", "shop", "-l", "app=shop"]);
    assert!(by_label.contains("\"a1\" deleted") && by_label.contains("\"settings\" deleted"), "{by_label}");
    let manifest = server.dir.path().join("m.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let by_file = server.kubectl(&["delete", "-f", manifest.to_str().unwrap(), "--ignore-not-found"]);
    assert!(by_file.status.success(), "{}", stderr(&by_file));
    // (Every namespace keeps its kube-root-ca.crt, as upstream.)
    let left = server.kubectl_ok(&[
        "get",
        "deploy,svc,job,cm,secret",
        "-n",
        "shop",
        "-o",
        "name",
        "--field-selector",
        "metadata.name!=kube-root-ca.crt",
    ]);
    assert_eq!(left.trim(), "", "everything from the manifest is gone");
    let missing = server.kubectl(&["delete", "deploy", "web", "-n", "shop"]);
    assert!(
        stderr(&missing).contains("NotFound") && stderr(&missing).contains("deployments.apps \"web\" not found"),
        "{}",
        stderr(&missing)
    );

    // Deleting a namespace removes what is in it, then the namespace itself.
    server.kubectl_ok(&["create", "configmap", "leftover", "-n", "shop"]);
    let gone = server.kubectl_ok(&["delete", "namespace", "shop", "--timeout=30s"]);
    assert!(gone.contains("namespace \"shop\" deleted"), "{gone}");
    let after = server.kubectl(&["get", "namespace", "shop"]);
    assert!(stderr(&after).contains("not found"), "{}", stderr(&after));
}

#[test]
fn watch_and_wait() {
    let server = TestServer::start();
    server.kubectl_ok(&["create", "configmap", "watched", "--from-literal=color=blue"]);
    let mut watch = std::process::Command::new(common::kubectl_path())
        .args([
            "get",
            "configmaps",
            "-w",
            "--output-watch-events",
            "-o",
            "jsonpath={.type} configmap/{.object.metadata.name}{\"\\n\"}",
        ])
        .env("KUBECONFIG", server.kubeconfig())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let wait = std::process::Command::new(common::kubectl_path())
        .args(["wait", "--for=jsonpath={.data.color}=green", "configmap/watched", "--timeout=20s"])
        .env("KUBECONFIG", server.kubeconfig())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    server.kubectl_ok(&["patch", "configmap", "watched", "--type", "merge", "-p", r#"{"data":{"color":"green"}}"#]);
    server.kubectl_ok(&["create", "configmap", "later"]);
    server.kubectl_ok(&["delete", "configmap", "later"]);
    let waited = wait.wait_with_output().unwrap();
    assert!(waited.status.success(), "kubectl wait: {}", String::from_utf8_lossy(&waited.stderr));
    assert!(String::from_utf8_lossy(&waited.stdout).contains("condition met"));
    std::thread::sleep(Duration::from_millis(700));
    let _ = watch.kill();
    let out = watch.wait_with_output().unwrap();
    let events = String::from_utf8_lossy(&out.stdout);
    for expected in
        ["ADDED configmap/watched", "MODIFIED configmap/watched", "ADDED configmap/later", "DELETED configmap/later"]
    {
        assert!(
            events.contains(expected),
            "{expected:?} in:\n{events}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn protobuf_clients_and_dry_run() {
    // kubectl's typed clients send built-in objects as protobuf.
    let server = TestServer::start();
    server.kubectl_ok(&["create", "namespace", "proto"]);
    server.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        "-n",
        "proto",
        "--image=registry.local/web:1.0",
        "--replicas=0",
    ]);
    assert_eq!(
        server.kubectl_ok(&["get", "deploy", "web", "-n", "proto", "-o", "jsonpath={.spec.replicas}"]),
        "0",
        "an explicit zero survives protobuf decoding"
    );
    server.kubectl_ok(&["create", "secret", "generic", "s", "-n", "proto", "--from-literal=k=v"]);
    assert_eq!(server.kubectl_ok(&["get", "secret", "s", "-n", "proto", "-o", "jsonpath={.data.k}"]), "dg==");
    server.kubectl_ok(&["create", "job", "j", "-n", "proto", "--image=busybox", "--", "true"]);
    server.kubectl_ok(&["create", "service", "clusterip", "svc", "-n", "proto", "--tcp=80:8080"]);
    assert_eq!(
        server.kubectl_ok(&["get", "svc", "svc", "-n", "proto", "-o", "jsonpath={.spec.ports[0].targetPort}"]),
        "8080"
    );
    let dry = server.kubectl_ok(&["create", "configmap", "dry", "-n", "proto", "--dry-run=server", "-o", "name"]);
    assert_eq!(dry.trim(), "configmap/dry");
    let missing = server.kubectl(&["get", "configmap", "dry", "-n", "proto"]);
    assert!(!missing.status.success());
    let invalid = server.kubectl(&["create", "configmap", "Bad_Name"]);
    assert!(stderr(&invalid).contains("is invalid"), "{}", stderr(&invalid));
}

#[test]
fn service_account_tokens_authenticate_while_their_account_lives() {
    let server = TestServer::start();
    let ca = server.data_dir().join("pki/ca.crt");
    let as_token = |token: &str, args: &[&str]| {
        std::process::Command::new(common::kubectl_path())
            .args(["--kubeconfig", "/dev/null", "--server", &server.url(), "--token", token, "--certificate-authority"])
            .arg(&ca)
            .args(args)
            .output()
            .unwrap()
    };
    server.kubectl_ok(&["create", "serviceaccount", "robot"]);
    let token = server.kubectl_ok(&["create", "token", "robot"]).trim().to_string();
    let who = as_token(&token, &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]);
    assert!(who.status.success(), "{}", stderr(&who));
    assert_eq!(String::from_utf8_lossy(&who.stdout), "system:serviceaccount:default:robot");
    // Authenticated is not authorized: the account holds no role yet.
    let listed = as_token(&token, &["get", "serviceaccounts", "-n", "default", "-o", "name"]);
    assert!(stderr(&listed).contains("cannot list resource \"serviceaccounts\""), "{}", stderr(&listed));

    // A token whose payload was changed no longer matches its signature.
    let (head, rest) = token.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    let forged_payload =
        String::from_utf8(base64_url(payload).into_iter().map(|b| if b == b'r' { b'R' } else { b }).collect()).unwrap();
    let forged = format!("{head}.{}.{signature}", encode_url(forged_payload.as_bytes()));
    let refused = as_token(&forged, &["get", "serviceaccounts"]);
    assert!(!refused.status.success() && stderr(&refused).contains("Unauthorized"), "{}", stderr(&refused));
    let short = server.kubectl(&["create", "token", "robot", "--duration", "1m"]);
    assert!(stderr(&short).contains("may not specify a duration less than 10 minutes"), "{}", stderr(&short));

    // Deleting the account revokes its tokens.
    server.kubectl_ok(&["delete", "serviceaccount", "robot"]);
    let revoked = as_token(&token, &["get", "serviceaccounts"]);
    assert!(!revoked.status.success() && stderr(&revoked).contains("Unauthorized"), "{}", stderr(&revoked));

    // Pods get the API-access volume unless they opt out.
    server.kubectl_ok(&["run", "with-token", "--image=registry.local/web:1.0"]);
    let volumes = server.kubectl_ok(&[
        "get",
        "pod",
        "with-token",
        "-o",
        "jsonpath={.spec.volumes[*].name} {.spec.containers[0].volumeMounts[*].mountPath}",
    ]);
    assert!(
        volumes.starts_with("kube-api-access-") && volumes.ends_with(" /var/run/secrets/kubernetes.io/serviceaccount"),
        "{volumes}"
    );
    server.kubectl_ok(&[
        "run",
        "without",
        "--image=registry.local/web:1.0",
        "--overrides",
        r#"{"spec": {"automountServiceAccountToken": false}}"#,
    ]);
    assert_eq!(server.kubectl_ok(&["get", "pod", "without", "-o", "jsonpath={.spec.volumes}"]), "");
}

fn base64_url(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).unwrap()
}

fn encode_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

//! Nodes joining with a bootstrap token: `krate token`, the token authenticator, the
//! signed `cluster-info`, discovery's refusals, TLS bootstrap through a CSR approved and
//! signed by the controllers, and the agent renewing its certificate.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::node::Agent;
use common::{eventually, raw, TestServer};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use krate_client::bootstrap::{self, Token};
use kube::api::{Api, ListParams};

fn krate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_krate")).args(args).output().expect("run krate")
}

/// `krate` that must end by itself: a server that wrongly starts is stopped after 30 s
/// (and the assertions on its output fail) instead of hanging the test.
fn krate_bounded(args: &[&str]) -> Output {
    Command::new("timeout").arg("30").arg(env!("CARGO_BIN_EXE_krate")).args(args).output().expect("run krate")
}

fn token_cmd(server: &TestServer, args: &[&str]) -> Output {
    let kubeconfig = server.kubeconfig();
    let mut all = vec!["token", "--kubeconfig", kubeconfig.to_str().unwrap()];
    all.extend_from_slice(args);
    krate(&all)
}

fn token_ok(server: &TestServer, args: &[&str]) -> String {
    let out = token_cmd(server, args);
    assert!(out.status.success(), "krate token {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The join command `krate server` printed at start.
async fn printed_join_command(server: &TestServer) -> Vec<String> {
    eventually(30, "the join command in the server's output", || async {
        let out = server.output();
        let line = out.lines().find(|l| l.trim_start().starts_with("krate agent --server"))?;
        Some(line.split_whitespace().map(String::from).collect())
    })
    .await
}

fn flag(command: &[String], name: &str) -> String {
    let at = command.iter().position(|a| a == name).unwrap_or_else(|| panic!("{name} in {command:?}"));
    command[at + 1].clone()
}

/// The `--server`, `--token` and `--ca-cert-hash` of the server's join command, once the
/// token signs `cluster-info`.
async fn join_flags(server: &TestServer) -> (String, String, String) {
    let command = printed_join_command(server).await;
    let (url, token, hash) = (flag(&command, "--server"), flag(&command, "--token"), flag(&command, "--ca-cert-hash"));
    signed(server, &token).await;
    (url, token, hash)
}

/// Waits until `cluster-info` carries a signature for `token`.
async fn signed(server: &TestServer, token: &str) {
    let id = &token[..6];
    let client = server.client().await;
    eventually(30, &format!("cluster-info signed for {id}"), || async {
        cluster_info(&client).await.data?.contains_key(&format!("jws-kubeconfig-{id}")).then_some(())
    })
    .await;
}

async fn cluster_info(client: &kube::Client) -> ConfigMap {
    Api::<ConfigMap>::namespaced(client.clone(), "kube-public").get("cluster-info").await.expect("cluster-info")
}

/// A server whose nodes get pod CIDRs (/26) from a range of its own (`n` tells tests
/// apart), so that concurrent tests' pod networks do not overlap.
fn cluster(n: u8, extra: &[&str]) -> TestServer {
    let args = cluster_args(n, extra);
    TestServer::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn cluster_args(n: u8, extra: &[&str]) -> Vec<String> {
    let range = format!("10.{}.{}.0/24", 248 + n, std::process::id() % 200);
    let mut args: Vec<String> = ["--cluster-cidr", &range, "--node-cidr-mask-size", "26"].map(String::from).into();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A join that must fail before the agent starts anything: its error text.
fn refused_join(data: &Path, join: &[&str]) -> String {
    let mut args = vec!["agent".to_string()];
    args.extend(join.iter().map(|s| s.to_string()));
    args.extend(Agent::args(data, 9));
    let out = Command::new(env!("CARGO_BIN_EXE_krate")).args(&args).stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success(), "the join should have been refused: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!data.join("agent/kubelet.kubeconfig").exists(), "a refused join leaves no credentials");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_new_server_prints_a_join_command_whose_token_signs_cluster_info() {
    let server = TestServer::start();
    let command = printed_join_command(&server).await;
    assert_eq!(flag(&command, "--server"), format!("https://127.0.0.1:{}", server.port));
    let token: Token = flag(&command, "--token").parse().unwrap();
    let client = server.client().await;
    let data = eventually(30, "cluster-info signed", || async {
        let data = cluster_info(&client).await.data?;
        data.contains_key(&format!("jws-kubeconfig-{}", token.id)).then_some(data)
    })
    .await;
    assert!(!server.log().contains("bootstrap token controller"), "signing raced nothing:\n{}", server.log());
    let kubeconfig = &data["kubeconfig"];
    assert!(bootstrap::verify_detached(kubeconfig, &data[&format!("jws-kubeconfig-{}", token.id)], &token));
    let (url, ca) = bootstrap::read_cluster_info_kubeconfig(kubeconfig).unwrap();
    assert_eq!(url, format!("https://127.0.0.1:{}", server.port));
    let ca_hash = bootstrap::ca_cert_hash(&bootstrap::pem_certificates(&ca)[0]).unwrap();
    assert_eq!(flag(&command, "--ca-cert-hash"), ca_hash);
    // The same token again after a restart, not a new one each time.
    let mut server = server;
    server.restart();
    let again = printed_join_command(&server).await;
    assert_eq!(flag(&again, "--token"), token.to_string());
}

#[tokio::test]
async fn tokens_are_created_listed_and_deleted() {
    let server = TestServer::start();
    let token = token_ok(&server, &["create", "--ttl", "2h", "--description", "for rack 4"]).trim().to_string();
    let parsed: Token = token.parse().expect("a token in upstream's form");
    let listed = token_ok(&server, &["list"]);
    let header = listed.lines().next().unwrap();
    assert!(header.starts_with("TOKEN") && header.contains("EXPIRES") && header.contains("EXTRA GROUPS"), "{listed}");
    let row = listed.lines().find(|l| l.starts_with(&token)).unwrap_or_else(|| panic!("{token} in\n{listed}"));
    for part in ["1h", "authentication,signing", "for rack 4", "system:bootstrappers:krate:default-node-token"] {
        assert!(row.contains(part), "{part:?} in {row:?}");
    }
    let secrets: Api<Secret> = Api::namespaced(server.client().await, "kube-system");
    let secret = secrets.get(&parsed.secret_name()).await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("bootstrap.kubernetes.io/token"));

    let created = token_ok(&server, &["create", "abcdef.0123456789abcdef", "--ttl", "0"]);
    assert_eq!(created.trim(), "abcdef.0123456789abcdef");
    let listed = token_ok(&server, &["list"]);
    assert!(listed.lines().any(|l| l.starts_with("abcdef.0123456789abcdef") && l.contains("<forever>")), "{listed}");

    let dup = token_cmd(&server, &["create", "abcdef.0123456789abcdef"]);
    assert!(String::from_utf8_lossy(&dup.stderr).contains("exists already"), "{dup:?}");
    let bad = token_cmd(&server, &["create", "ABCDEF.0123456789abcdef"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("[a-z0-9]{6}.[a-z0-9]{16}"), "{bad:?}");
    let bad_group = token_cmd(&server, &["create", "--groups", "system:masters"]);
    assert!(
        String::from_utf8_lossy(&bad_group.stderr).contains("must start with system:bootstrappers"),
        "{bad_group:?}"
    );

    assert_eq!(token_ok(&server, &["delete", "abcdef"]).trim(), "bootstrap token \"abcdef\" deleted");
    assert_eq!(token_ok(&server, &["delete", &token]).trim(), format!("bootstrap token {:?} deleted", parsed.id));
    let gone = token_cmd(&server, &["delete", "abcdef"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not found"), "{gone:?}");
    assert!(!token_ok(&server, &["list"]).contains("abcdef."));
}

#[tokio::test]
async fn an_expired_token_is_deleted_and_no_longer_signs_cluster_info() {
    let server = TestServer::start();
    let token: Token = token_ok(&server, &["create", "--ttl", "4s"]).trim().parse().unwrap();
    let client = server.client().await;
    let key = format!("jws-kubeconfig-{}", token.id);
    eventually(30, "cluster-info signed with the new token", || async {
        cluster_info(&client).await.data?.contains_key(&key).then_some(())
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    eventually(30, "the expired token's Secret deleted", || async {
        secrets.get_opt(&token.secret_name()).await.ok()?.is_none().then_some(())
    })
    .await;
    eventually(30, "its signature removed from cluster-info", || async {
        (!cluster_info(&client).await.data?.contains_key(&key)).then_some(())
    })
    .await;
}

/// Who the API server says a bearer token is (SelfSubjectReview), or the HTTP status.
async fn whoami(server: &TestServer, token: &str) -> Result<serde_json::Value, u16> {
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.accept_invalid_certs = true;
    config.auth_info.token = Some(token.to_string().into());
    let client = kube::Client::try_from(config).unwrap();
    let body = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"});
    let (code, answer) = raw(
        &client,
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        "application/json",
        body.to_string().into_bytes(),
    )
    .await;
    if code == 201 {
        Ok(answer["status"]["userInfo"].clone())
    } else {
        Err(code)
    }
}

#[tokio::test]
async fn a_bootstrap_token_authenticates_as_a_bootstrapper_until_it_is_deleted() {
    let server = TestServer::start();
    let token = token_ok(&server, &["create"]).trim().to_string();
    let user = whoami(&server, &token).await.expect("the token authenticates");
    let id = &token[..6];
    assert_eq!(user["username"], format!("system:bootstrap:{id}"));
    assert_eq!(
        user["groups"],
        serde_json::json!([
            "system:bootstrappers",
            "system:bootstrappers:krate:default-node-token",
            "system:authenticated"
        ])
    );
    let wrong_secret = format!("{id}.ffffffffffffffff");
    assert_eq!(whoami(&server, &wrong_secret).await, Err(401));
    let signing_only = token_ok(&server, &["create", "--usages", "signing"]).trim().to_string();
    assert_eq!(whoami(&server, &signing_only).await, Err(401), "a token not for authentication");
    // What the default policy lets a bootstrap token do: request certificates, not read secrets.
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.accept_invalid_certs = true;
    config.auth_info.token = Some(token.clone().into());
    let as_token = kube::Client::try_from(config).unwrap();
    let (code, _) = raw(&as_token, "GET", "/api/v1/namespaces/kube-system/secrets", "application/json", vec![]).await;
    assert_eq!(code, 403);
    token_ok(&server, &["delete", id]);
    assert_eq!(whoami(&server, &token).await, Err(401), "a deleted token");
}

#[tokio::test]
async fn joins_are_refused_for_a_wrong_token_or_ca_and_create_nothing() {
    let server = TestServer::start();
    let (url, token, hash) = join_flags(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();

    let unknown =
        refused_join(data, &["--server", &url, "--token", "zzzzzz.0123456789abcdef", "--ca-cert-hash", &hash]);
    assert!(unknown.contains("not signed for token ID \"zzzzzz\""), "{unknown}");
    let wrong_secret = format!("{}.ffffffffffffffff", &token[..6]);
    let forged = refused_join(data, &["--server", &url, "--token", &wrong_secret, "--ca-cert-hash", &hash]);
    assert!(forged.contains("does not match the token's secret"), "{forged}");
    let other_hash = format!("sha256:{}", "0".repeat(64));
    let pinned = refused_join(data, &["--server", &url, "--token", &token, "--ca-cert-hash", &other_hash]);
    assert!(pinned.contains("the cluster's CA is not the pinned one") && pinned.contains(&hash), "{pinned}");
    let unpinned = refused_join(data, &["--server", &url, "--token", &token]);
    assert!(unpinned.contains("--ca-cert-hash"), "{unpinned}");

    // A man in the middle with a CA of its own, who learned the token: the signature
    // holds, the CA does not.
    let mitm = TestServer::start();
    token_ok(&mitm, &["create", &token]);
    signed(&mitm, &token).await;
    let intercepted = refused_join(data, &["--server", &mitm.url(), "--token", &token, "--ca-cert-hash", &hash]);
    assert!(intercepted.contains("the cluster's CA is not the pinned one"), "{intercepted}");

    let client = server.client().await;
    let csrs = Api::<CertificateSigningRequest>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    assert!(csrs.items.is_empty(), "no certificate requests: {csrs:?}");
    assert!(Api::<Node>::all(client).list(&ListParams::default()).await.unwrap().items.is_empty());
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Polls `check` for up to `seconds` (for waits whose failure should show what the
/// agent logged by then).
async fn until<T>(seconds: u64, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..seconds * 10 {
        if let Some(v) = check() {
            return Some(v);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    None
}

async fn wait_ready(client: &kube::Client, name: &str, agent: &Agent) {
    let nodes: Api<Node> = Api::all(client.clone());
    for _ in 0..900 {
        if nodes.get_opt(name).await.ok().flatten().is_some_and(|n| node_ready(&n)) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{name} did not become Ready; the agent's log:\n{}", agent.log());
}

/// The subject and serial of the agent's stored client certificate.
fn stored_certificate(data: &Path) -> (String, String) {
    let pem = std::fs::read_to_string(data.join("agent/pki/kubelet-client.crt")).expect("a stored certificate");
    let der = bootstrap::pem_certificates(&pem).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    (cert.subject().to_string(), cert.raw_serial_as_string())
}

#[tokio::test]
async fn a_node_joins_with_a_token_renews_its_certificate_and_restarts_without_it() {
    let server = cluster(1, &["--cluster-signing-duration", "40s"]);
    let (url, token, hash) = join_flags(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1");
    let join = ["--server", &url, "--token", &token, "--ca-cert-hash", &hash, "--node-name", "joiner-1"];
    let mut agent = Agent::start(&data, 1, &join);
    let client = server.client().await;
    wait_ready(&client, "joiner-1", &agent).await;

    let node = Api::<Node>::all(client.clone()).get("joiner-1").await.unwrap();
    let range = format!("10.249.{}.0/26", std::process::id() % 200);
    assert_eq!(node.spec.unwrap().pod_cidr.as_deref(), Some(range.as_str()), "the node's pod CIDR, assigned");
    assert!(
        agent.log().lines().any(|l| l.contains("node agent ready") && l.contains(&range)),
        "the agent runs its pods in it"
    );
    let (subject, first_serial) = stored_certificate(&data);
    assert_eq!(subject, "CN=system:node:joiner-1, O=system:nodes");
    let csrs = Api::<CertificateSigningRequest>::all(client.clone()).list(&ListParams::default()).await.unwrap().items;
    let first = csrs.iter().find(|c| c.spec.signer_name == "kubernetes.io/kube-apiserver-client-kubelet").unwrap();
    assert_eq!(first.spec.username.as_deref(), Some(&*format!("system:bootstrap:{}", &token[..6])));
    let approved = first.status.as_ref().unwrap().conditions.as_ref().unwrap();
    assert_eq!((approved[0].type_.as_str(), approved[0].reason.as_deref()), ("Approved", Some("AutoApproved")));

    // At 80% of 40 s the agent asks again, as itself, and keeps running.
    let renewed = until(60, || {
        let (_, serial) = stored_certificate(&data);
        (serial != first_serial).then_some(serial)
    })
    .await
    .unwrap_or_else(|| panic!("no renewed certificate; the agent's log:\n{}", agent.log()));
    let csrs = Api::<CertificateSigningRequest>::all(client.clone()).list(&ListParams::default()).await.unwrap().items;
    assert!(
        csrs.iter().any(|c| c.spec.username.as_deref() == Some("system:node:joiner-1")),
        "the renewal was requested by the node itself: {csrs:?}"
    );
    // Still Ready after the renewal (its lease renewed with the new certificate).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    wait_ready(&client, "joiner-1", &agent).await;

    // Restarted without the token, the agent uses what it stored.
    agent.stop();
    let restarted = Agent::start(&data, 1, &["--server", &url, "--node-name", "joiner-1"]);
    assert_eq!(stored_certificate(&data).1, renewed);
    let nodes: Api<Node> = Api::all(client.clone());
    let before = nodes.get("joiner-1").await.unwrap().metadata.resource_version;
    eventually(60, &format!("the restarted agent reporting\n{}", restarted.log()), || async {
        let node = nodes.get("joiner-1").await.ok()?;
        (node.metadata.resource_version != before && node_ready(&node)).then_some(())
    })
    .await;
    drop(restarted);
    drop(agent);

    // A token cannot bring a second machine in under a name that is taken.
    let other = dir.path().join("n2");
    let taken = refused_join(
        &other,
        &["--server", &url, "--token", &token, "--ca-cert-hash", &hash, "--node-name", "joiner-1"],
    );
    assert!(taken.contains("denied") && taken.contains("is in the cluster already"), "{taken}");
}

#[tokio::test]
async fn a_joined_node_serves_a_certificate_the_cluster_signed() {
    let server = cluster(4, &[]);
    let (url, token, hash) = join_flags(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1");
    let join = ["--server", &url, "--token", &token, "--ca-cert-hash", &hash, "--node-name", "serving-1"];
    let agent = Agent::start(&data, 4, &join);
    let client = server.client().await;
    wait_ready(&client, "serving-1", &agent).await;
    let pem =
        until(60, || std::fs::read_to_string(data.join("agent/pki/kubelet-serving.crt")).ok()).await.unwrap_or_else(
            || panic!("no serving certificate; the agent's log:\n{}\nthe server's:\n{}", agent.log(), server.log()),
        );
    let der = bootstrap::pem_certificates(&pem).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let ca_pem = std::fs::read_to_string(server.data_dir().join("pki/ca.crt")).unwrap();
    let ca_der = bootstrap::pem_certificates(&ca_pem).remove(0);
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert_eq!(cert.issuer(), ca.subject(), "issued by the cluster CA");
    assert_eq!(cert.subject().to_string(), "CN=system:node:serving-1, O=system:nodes");
    let sans = format!("{:?}", cert.subject_alternative_name().unwrap().unwrap().value.general_names);
    assert_eq!(sans, r#"[DNSName("serving-1"), IPAddress([127, 0, 0, 1])]"#);
    let csrs = Api::<CertificateSigningRequest>::all(client).list(&ListParams::default()).await.unwrap().items;
    let serving = csrs.iter().find(|c| c.spec.signer_name == "kubernetes.io/kubelet-serving").unwrap();
    assert_eq!(serving.spec.username.as_deref(), Some("system:node:serving-1"), "asked for by the node itself");
    let approved = &serving.status.as_ref().unwrap().conditions.as_ref().unwrap()[0];
    assert_eq!((approved.type_.as_str(), approved.reason.as_deref()), ("Approved", Some("AutoApproved")));
    // The agent's API serves it (the log says it swapped it in).
    let swapped = until(30, || agent.log().contains("serving the cluster-signed certificate").then_some(())).await;
    assert!(swapped.is_some(), "{}", agent.log());
}

#[tokio::test]
async fn in_open_mode_a_node_joins_without_a_token_and_keeps_working_when_the_mode_changes() {
    let mut server = cluster(5, &["--node-registration", "open"]);
    let (url, _, hash) = join_flags(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let agent =
        Agent::start(&dir.path().join("n1"), 5, &["--server", &url, "--ca-cert-hash", &hash, "--node-name", "open-1"]);
    let client = server.client().await;
    wait_ready(&client, "open-1", &agent).await;
    let csrs = Api::<CertificateSigningRequest>::all(client).list(&ListParams::default()).await.unwrap().items;
    let joined = csrs.iter().find(|c| c.spec.signer_name == "kubernetes.io/kube-apiserver-client-kubelet").unwrap();
    assert_eq!(joined.spec.username.as_deref(), Some("system:anonymous"), "no token, no identity");

    // Back to tokens: the node keeps its certificate and stays Ready; a new machine
    // without a token is refused.
    let args = cluster_args(5, &[]);
    server.restart_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(server.client().await, "kube-node-lease");
    let renewed = |l: &k8s_openapi::api::coordination::v1::Lease| l.spec.as_ref()?.renew_time.clone();
    let before = renewed(&leases.get("open-1").await.unwrap());
    eventually(60, &format!("open-1 renewing its lease with its certificate\n{}", agent.log()), || async {
        (renewed(&leases.get("open-1").await.ok()?) != before).then_some(())
    })
    .await;
    assert!(node_ready(&Api::<Node>::all(server.client().await).get("open-1").await.unwrap()));
    let (url, _, hash) = join_flags(&server).await;
    let refused =
        refused_join(&dir.path().join("n2"), &["--server", &url, "--ca-cert-hash", &hash, "--node-name", "open-2"]);
    assert!(
        refused.contains("may not request certificates") && refused.contains("--node-registration open"),
        "{refused}"
    );
}

#[tokio::test]
async fn in_approve_mode_a_new_node_waits_for_kubectl_certificate_approve() {
    let server = cluster(2, &["--node-registration", "approve"]);
    let (url, token, hash) = join_flags(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1");
    let agent = Agent::start(
        &data,
        2,
        &["--server", &url, "--token", &token, "--ca-cert-hash", &hash, "--node-name", "waiting-1"],
    );
    let requestor = format!("system:bootstrap:{}", &token[..6]);
    let row = eventually(30, "a pending request in kubectl get csr", || async {
        let out = server.kubectl_ok(&["get", "csr"]);
        out.lines().find(|l| l.contains(&requestor)).map(String::from)
    })
    .await;
    let header = server.kubectl_ok(&["get", "csr"]).lines().next().unwrap().to_string();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["NAME", "AGE", "SIGNERNAME", "REQUESTOR", "REQUESTEDDURATION", "CONDITION"]
    );
    assert!(row.contains("kubernetes.io/kube-apiserver-client-kubelet") && row.ends_with("Pending"), "{row}");
    // It stays pending: no certificate, no node.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(!data.join("agent/kubelet.kubeconfig").exists());
    let nodes: Api<Node> = Api::all(server.client().await);
    assert!(nodes.get_opt("waiting-1").await.unwrap().is_none());

    let name = row.split_whitespace().next().unwrap().to_string();
    let approved = server.kubectl_ok(&["certificate", "approve", &name]);
    assert_eq!(approved.trim(), format!("certificatesigningrequest.certificates.k8s.io/{name} approved"));
    wait_ready(&server.client().await, "waiting-1", &agent).await;
    let row = server.kubectl_ok(&["get", "csr", &name]);
    assert!(row.lines().nth(1).unwrap().ends_with("Approved,Issued"), "{row}");
}

#[tokio::test]
async fn a_join_from_outside_the_allowed_range_is_refused() {
    let server = TestServer::start_with(&["--node-registration-allow-cidr", "10.0.0.0/8"]);
    let (url, token, hash) = join_flags(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let refused = refused_join(dir.path(), &["--server", &url, "--token", &token, "--ca-cert-hash", &hash]);
    assert!(refused.contains("only from 10.0.0.0/8") && refused.contains("came from 127.0.0.1"), "{refused}");
    let csrs = Api::<CertificateSigningRequest>::all(server.client().await).list(&ListParams::default()).await.unwrap();
    assert!(csrs.items.is_empty());
}

fn pod_cidr(node: &Node) -> Option<String> {
    node.spec.as_ref()?.pod_cidr.clone()
}

#[tokio::test]
async fn nodes_get_free_pod_cidrs_and_release_them_when_deleted() {
    let server = cluster(3, &[]);
    let id = std::process::id() % 200;
    let nodes: Api<Node> = Api::all(server.client().await);
    let create = |name: &str, cidr: Option<String>| {
        let spec = cidr.map(|c| serde_json::json!({"podCIDR": c, "podCIDRs": [c]})).unwrap_or(serde_json::json!({}));
        serde_json::from_value::<Node>(serde_json::json!({"metadata": {"name": name}, "spec": spec})).unwrap()
    };
    let assigned = |name: &'static str| {
        let nodes = nodes.clone();
        async move {
            eventually(30, &format!("a pod CIDR for {name}"), || async { pod_cidr(&nodes.get(name).await.ok()?) }).await
        }
    };
    let pp = kube::api::PostParams::default();
    nodes.create(&pp, &create("n1", None)).await.unwrap();
    assert_eq!(assigned("n1").await, format!("10.251.{id}.0/26"));
    // A node that brings its own CIDR keeps it, and it counts as taken.
    nodes.create(&pp, &create("own", Some(format!("10.251.{id}.64/26")))).await.unwrap();
    nodes.create(&pp, &create("n2", None)).await.unwrap();
    assert_eq!(assigned("n2").await, format!("10.251.{id}.128/26"));
    nodes.create(&pp, &create("n3", None)).await.unwrap();
    assert_eq!(assigned("n3").await, format!("10.251.{id}.192/26"));
    // The range is full: the next node waits...
    nodes.create(&pp, &create("n4", None)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(pod_cidr(&nodes.get("n4").await.unwrap()), None);
    // ...until a node goes and its CIDR with it.
    nodes.delete("n2", &Default::default()).await.unwrap();
    assert_eq!(assigned("n4").await, format!("10.251.{id}.128/26"));
    let wide =
        server.kubectl_ok(&["get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.name}={.spec.podCIDR} {end}"]);
    assert_eq!(wide.split_whitespace().count(), 4, "{wide}");
}

/// A CA made with openssl, as an operator would: (certificate, key) paths.
fn openssl_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30"])
        .args(["-subj", &format!("/CN={name}"), "-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    (cert, key)
}

#[tokio::test]
async fn a_server_uses_a_ca_of_the_operators_own() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = openssl_ca(dir.path(), "my-ca");
    let server = TestServer::start_with(&["--ca-cert", cert.to_str().unwrap(), "--ca-key", key.to_str().unwrap()]);
    let ours = std::fs::read_to_string(&cert).unwrap();
    let hash = bootstrap::ca_cert_hash(&bootstrap::pem_certificates(&ours)[0]).unwrap();
    let command = printed_join_command(&server).await;
    assert_eq!(flag(&command, "--ca-cert-hash"), hash, "joining nodes pin the operator's CA");
    // kubectl verifies the server against it (the admin kubeconfig carries it).
    let kubeconfig = std::fs::read_to_string(server.kubeconfig()).unwrap();
    assert!(kubeconfig.contains(&base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &ours)));
    server.kubectl_ok(&["get", "namespaces"]);

    // The wrong key, or a CA other than the one the cluster has, is refused with why.
    let (_, other_key) = openssl_ca(dir.path(), "other");
    let data = dir.path().join("fresh");
    let mismatched = krate_bounded(&[
        "server",
        "--data-dir",
        data.to_str().unwrap(),
        "--ca-cert",
        cert.to_str().unwrap(),
        "--ca-key",
        other_key.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&mismatched.stderr).contains("is not the key of"), "{mismatched:?}");
    let (other_cert, other_key) = openssl_ca(dir.path(), "other2");
    let mut server = server;
    server.kill();
    let swapped = krate_bounded(&[
        "server",
        "--data-dir",
        server.data_dir().to_str().unwrap(),
        "--ca-cert",
        other_cert.to_str().unwrap(),
        "--ca-key",
        other_key.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&swapped.stderr).contains("already has another CA"), "{swapped:?}");
}

#[tokio::test]
async fn the_approval_subresource_writes_only_conditions() {
    let server = TestServer::start();
    let api: Api<CertificateSigningRequest> = Api::all(server.client().await);
    let key = rcgen::KeyPair::generate().unwrap();
    let request = rcgen::CertificateParams::new(vec!["e2e.example.com".to_string()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let csr: CertificateSigningRequest = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "by-hand"},
        "spec": {"request": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, request), "signerName": "example.com/by-hand", "usages": ["server auth"], "username": "someone-else"},
    }))
    .unwrap();
    let created = api.create(&Default::default(), &csr).await.unwrap();
    assert_eq!(created.spec.username.as_deref(), Some("krate-admin"), "the requester, not what the client claimed");
    let patch = serde_json::json!({
        "metadata": {"annotations": {"patched": "true"}},
        "spec": {"signerName": "example.com/other"},
        "status": {"conditions": [{"type": "Approved", "status": "True", "reason": "ByHand"}], "certificate": "AAAA"},
    });
    let patched = api
        .patch_subresource("approval", "by-hand", &Default::default(), &kube::api::Patch::Merge(&patch))
        .await
        .unwrap();
    let status = patched.status.unwrap();
    let condition = &status.conditions.unwrap()[0];
    assert_eq!((condition.type_.as_str(), condition.reason.as_deref()), ("Approved", Some("ByHand")));
    assert!(condition.last_update_time.is_some(), "timestamps filled in");
    assert_eq!(status.certificate, None, "approval writes no certificate");
    assert_eq!(patched.spec.signer_name, "example.com/by-hand", "nor the spec");
    assert_eq!(patched.metadata.annotations.unwrap()["patched"], "true");
    let both = serde_json::json!({"status": {"conditions": [{"type": "Approved", "status": "True"}, {"type": "Denied", "status": "True"}]}});
    let err = api
        .patch_subresource("approval", "by-hand", &Default::default(), &kube::api::Patch::Merge(&both))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 422 && e.message.contains("mutually exclusive")),
        "{err:?}"
    );
}

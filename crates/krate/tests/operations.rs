//! Operating a cluster: what a build says it is (`krate version`, `/version`), adding a
//! cluster to one's own kubeconfig without clobbering others (`krate kubeconfig
//! --merge`), configuration files, and backup and restore.

mod common;

use std::path::Path;
use std::process::Command;

use common::{kubectl_at_ok, TestServer};
use serde_json::Value;

fn git(args: &[&str]) -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("git").arg("-C").arg(root).args(args).env("TZ", "UTC").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn krate(args: &[&str], kubeconfig: Option<&Path>) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_krate"));
    command.args(args);
    if let Some(path) = kubeconfig {
        command.env("KUBECONFIG", path);
    }
    let out = command.output().expect("run krate");
    assert!(out.status.success(), "krate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `SOURCE_VERSION` of the krate-version crate, read from its source (depending on the
/// crate would rebuild every test on every change).
fn source_version() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../krate-version/src/lib.rs");
    let source = std::fs::read_to_string(path).unwrap();
    let line = source.lines().find_map(|l| l.strip_prefix("pub const SOURCE_VERSION: &str = \"")).unwrap();
    line.trim_end_matches("\";").to_string()
}

#[test]
fn the_version_names_the_commit_it_was_built_from_and_the_server_reports_it() {
    let info: Value = serde_json::from_str(&krate(&["version", "-o", "json"], None)).unwrap();
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        // Built outside git: the source's version, no commit.
        assert_eq!(info["gitCommit"], "");
        return;
    };
    assert_eq!(info["gitCommit"], head.as_str());
    assert!(matches!(info["gitTreeState"].as_str(), Some("clean" | "dirty")), "{info}");
    let described = git(&["describe", "--tags", "--match", "v*", "--abbrev=14", "HEAD"])
        .unwrap_or_else(|| format!("{}-g{}", source_version(), &head[..14]));
    let git_version = info["gitVersion"].as_str().unwrap();
    assert!(git_version.starts_with(&format!("v1.37.0+krate-{described}")), "{git_version} for {described}");
    assert_eq!(git_version.ends_with("-dirty"), info["gitTreeState"] == "dirty", "{info}");
    if std::env::var_os("SOURCE_DATE_EPOCH").is_none() {
        let committed = git(&["log", "-1", "--format=%cd", "--date=format-local:%Y-%m-%dT%H:%M:%SZ", "HEAD"]);
        if let Some(date) = committed {
            assert_eq!(info["buildDate"], date.as_str(), "the build date is the commit's, not the clock's");
        }
    }
    let text = krate(&["version"], None);
    assert!(text.starts_with(&format!("krate {described}")), "{text}");
    assert!(text.contains(&format!("commit:     {head}")), "{text}");

    // The server reports the same build.
    let server = TestServer::start();
    let reported: Value = serde_json::from_str(&server.kubectl_ok(&["version", "-o", "json"])).unwrap();
    assert_eq!(reported["serverVersion"]["gitVersion"], info["gitVersion"]);
    assert_eq!(reported["serverVersion"]["gitCommit"], head.as_str());
    assert_eq!(reported["serverVersion"]["minor"], "37");
}

/// A data directory holding only an admin kubeconfig for `server`.
fn data_dir_for(server: &str, ca: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: krate\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: krate-admin\n  user:\n    token: t-{ca}\ncontexts:\n- name: krate\n  context:\n    cluster: krate\n    user: krate-admin\ncurrent-context: krate\n"
    );
    std::fs::write(dir.path().join("admin.kubeconfig"), config).unwrap();
    dir
}

#[test]
fn merging_a_kubeconfig_adds_a_context_and_keeps_other_clusters() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let target = home.path().join("kube/config");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let theirs = "apiVersion: v1\nkind: Config\nclusters:\n- name: krate-127.0.0.1\n  cluster:\n    server: https://127.0.0.1:7443\nusers:\n- name: prod\n  user:\n    token: secret\ncontexts:\n- name: prod\n  context:\n    cluster: krate-127.0.0.1\n    user: prod\ncurrent-context: prod\n";
    std::fs::write(&target, theirs).unwrap();

    let ours = data_dir_for("https://127.0.0.1:6443", "Q0E=");
    let data_dir = ours.path().to_str().unwrap();
    let said = krate(&["kubeconfig", "--merge", "--data-dir", data_dir], Some(&target));
    assert!(said.contains("added context \"krate-127.0.0.1-2\""), "{said}");
    assert!(said.contains("kubectl config use-context krate-127.0.0.1-2"), "{said}");
    let contexts = kubectl_at_ok(&target, &["config", "get-contexts", "-o", "name"]);
    assert_eq!(contexts.lines().collect::<Vec<_>>(), ["krate-127.0.0.1-2", "prod"]);
    assert_eq!(kubectl_at_ok(&target, &["config", "current-context"]).trim(), "prod");
    let view = kubectl_at_ok(&target, &["config", "view", "--raw", "-o", "json"]);
    let view: Value = serde_json::from_str(&view).unwrap();
    let server_of = |name: &str| {
        view["clusters"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()["cluster"]["server"].clone()
    };
    assert_eq!(server_of("krate-127.0.0.1"), "https://127.0.0.1:7443", "the other cluster is untouched");
    assert_eq!(server_of("krate-127.0.0.1-2"), "https://127.0.0.1:6443");
    assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);

    // Again: the same cluster's entries are refreshed, nothing is added.
    let said = krate(&["kubeconfig", "--merge", "--data-dir", data_dir], Some(&target));
    assert!(said.contains("refreshed context \"krate-127.0.0.1-2\""), "{said}");
    let again = kubectl_at_ok(&target, &["config", "get-contexts", "-o", "name"]);
    assert_eq!(again, contexts);
}

#[test]
fn merging_into_a_broken_kubeconfig_changes_nothing_and_says_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let target = home.path().join("config");
    std::fs::write(&target, "clusters: [unclosed\n").unwrap();
    let ours = data_dir_for("https://127.0.0.1:6443", "Q0E=");
    let out = Command::new(env!("CARGO_BIN_EXE_krate"))
        .args(["kubeconfig", "--merge", "--data-dir", ours.path().to_str().unwrap()])
        .env("KUBECONFIG", &target)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a kubeconfig; fix or move it"), "{err}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "clusters: [unclosed\n");
}

fn krate_output(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_krate")).args(args).env_remove("KRATE_CONFIG_FILE").output().expect("run krate")
}

#[test]
fn a_configuration_file_sets_flags_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, "service-cidr: 10.99.0.0/16\ntls-san: [a.example, b.example]\nwatch-cache-size: 123\n")
        .unwrap();
    std::fs::create_dir(dir.path().join("config.yaml.d")).unwrap();
    std::fs::write(dir.path().join("config.yaml.d/10-cache.yaml"), "watch-cache-size: 456\n").unwrap();
    let file_arg = file.to_str().unwrap();

    let out = krate_output(&["server", "--config", file_arg, "--print-config", "--port", "7777"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    for line in [
        format!("service-cidr: 10.99.0.0/16  # {file_arg}"),
        format!("tls-san: [a.example, b.example]  # {file_arg}"),
        format!("watch-cache-size: 456  # {}/config.yaml.d/10-cache.yaml", dir.path().display()),
        "port: 7777  # command line".to_string(),
        "bind-address: 127.0.0.1  # default".to_string(),
    ] {
        assert!(printed.lines().any(|l| l == line), "{line:?} in:\n{printed}");
    }

    // A server started with it uses it: the kubernetes Service's address comes from
    // the file's service range.
    let server = TestServer::start_with(&["--config", file_arg]);
    let ip = server.kubectl_ok(&["get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"]);
    assert_eq!(ip, "10.99.0.1");
}

#[test]
fn an_unknown_key_or_a_bad_value_in_a_configuration_file_is_refused_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, "prot: 7443\n").unwrap();
    let out = krate_output(&["server", "--config", file.to_str().unwrap(), "--print-config"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}: unknown key \"prot\" (did you mean \"port\"?)", file.display())), "{err}");

    std::fs::write(&file, "port: many\n").unwrap();
    let out = krate_output(&["server", "--config", file.to_str().unwrap(), "--print-config"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid value 'many' for '--port <PORT>'"), "{err}");
    assert!(err.contains(&format!("note: flags were also read from {}", file.display())), "{err}");
}

#[test]
fn install_writes_a_service_running_krate_with_its_flags_that_stops_only_krate() {
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().to_str().unwrap();
    let out =
        krate_output(&["install", "server", "--root", root_arg, "--", "--port", "7443", "--tls-san", "api example"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let unit = std::fs::read_to_string(root.path().join("etc/systemd/system/krate.service")).unwrap();
    assert!(unit.contains("\nExecStart=/usr/local/bin/krate server --port 7443 --tls-san \"api example\"\n"), "{unit}");
    assert!(unit.contains("\nKillMode=process\n") && unit.contains("\nRestart=always\n"), "{unit}");
    let shutdown = std::fs::read_to_string(root.path().join("etc/systemd/system/krate-shutdown.service")).unwrap();
    assert!(
        shutdown.contains("ExecStart=/usr/local/bin/krate shutdown-node")
            && shutdown.contains("Before=shutdown.target")
    );
    let installed = std::fs::metadata(root.path().join("usr/local/bin/krate")).unwrap();
    assert_eq!(installed.len(), std::fs::metadata(env!("CARGO_BIN_EXE_krate")).unwrap().len());
    assert!(std::os::unix::fs::PermissionsExt::mode(&installed.permissions()) & 0o111 != 0, "executable");
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing started (--root)"));

    // A flag the service would refuse is refused now, and nothing is written.
    let other = tempfile::tempdir().unwrap();
    let out = krate_output(&["install", "agent", "--root", other.path().to_str().unwrap(), "--", "--no-such-flag"]);
    let err = common::stderr(&out);
    assert!(
        !out.status.success() && err.contains("the service would not start") && err.contains("--no-such-flag"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 0, "nothing written");
}

#[tokio::test]
async fn a_backup_of_10000_objects_taken_under_writes_restores_them_and_resource_versions_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let taken = {
        let server = TestServer::start();
        common::backup::backup_under_writes(&server, 10_000, &dir.path().join("cluster.tar.gz")).await
    };
    let restored = TestServer::start_prepared(&[], |data_dir| {
        let file = taken.file.to_str().unwrap();
        let said = krate(&["restore", file, "--data-dir", data_dir.to_str().unwrap()], None);
        assert!(said.contains("restored") && said.contains("start it with: krate server"), "{said}");
    });
    common::backup::check_restored(&restored, &taken, 10_000).await;
}

#[test]
fn a_restore_refuses_a_damaged_backup_and_a_directory_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.tar.gz");
    std::fs::write(&bad, b"not a backup").unwrap();
    let fresh = dir.path().join("fresh");
    let out = Command::new(env!("CARGO_BIN_EXE_krate"))
        .args(["restore", bad.to_str().unwrap(), "--data-dir", fresh.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is not a readable krate backup"), "{err}");
    assert!(!fresh.exists(), "a failed restore leaves no data directory behind");

    let in_use = dir.path().join("in-use");
    std::fs::create_dir(&in_use).unwrap();
    std::fs::write(in_use.join("keep"), "x").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_krate"))
        .args(["restore", bad.to_str().unwrap(), "--data-dir", in_use.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("refusing to restore into"), "{err}");
    assert_eq!(std::fs::read_to_string(in_use.join("keep")).unwrap(), "x");
}

#[tokio::test]
async fn events_expire_after_the_event_ttl() {
    let server = TestServer::start_with(&["--event-ttl", "2s"]);
    let event = r#"{"apiVersion": "v1", "kind": "Event", "metadata": {"name": "fleeting"},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"}, "reason": "Fleeting"}"#;
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(event));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(server.kubectl_ok(&["get", "events", "-o", "name"]).contains("event/fleeting"));
    common::eventually(30, "the event to expire", || async {
        (!server.kubectl_ok(&["get", "events", "-o", "name"]).contains("event/fleeting")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_node_agent_newer_than_its_server_is_refused() {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let server = TestServer::start();
    // As the node's own agent would: its own identity, its Node's status.
    let kubeconfig = server.minted_kubeconfig(&["--node", "skewed"], "skewed.kubeconfig");
    let nodes: Api<Node> = Api::all(common::client_for(&kubeconfig).await);
    let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "skewed"}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let report = |version: String| {
        let nodes = nodes.clone();
        async move {
            let status = serde_json::json!({"status": {"nodeInfo": {"kubeletVersion": version}}});
            nodes.patch_status("skewed", &PatchParams::default(), &Patch::Merge(status)).await
        }
    };
    let info: Value = serde_json::from_str(&krate(&["version", "-o", "json"], None)).unwrap();
    report(info["gitVersion"].as_str().unwrap().to_string()).await.expect("an agent of the server's own version");
    let Err(kube::Error::Api(refused)) = report("v1.37.0+krate-v99.0".into()).await else {
        panic!("a newer agent was let in");
    };
    assert_eq!(refused.code, 403);
    assert!(
        refused
            .message
            .starts_with("nodes \"skewed\" is forbidden: node agent krate v99.0 is newer than this API server's krate"),
        "{}",
        refused.message
    );
}

/// `krate doctor -o json` on `data_dir`: its exit code and document.
fn doctor(data_dir: &Path) -> (i32, Value) {
    let out = krate_output(&["doctor", "--data-dir", data_dir.to_str().unwrap(), "-o", "json"]);
    let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().unwrap_or(-1), doc)
}

/// The outcome and fix of the check named `name`.
fn outcome_of(doc: &Value, name: &str) -> (String, String) {
    let check = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {doc}"));
    (check["outcome"].as_str().unwrap().to_string(), check["fix"].as_str().unwrap_or_default().to_string())
}

#[test]
fn doctor_checks_the_cluster_and_says_what_to_do_about_what_fails() {
    let mut server = TestServer::start();
    let (code, doc) = doctor(&server.data_dir());
    for name in ["API server", "certificate ca.crt", "certificate apiserver.crt", "store", "store fsync"] {
        assert_eq!(outcome_of(&doc, name).0, "ok", "{name}: {doc}");
    }
    // A server without its agent has no nodes yet: worth saying, not a failure.
    assert_eq!(outcome_of(&doc, "nodes").0, "warning");
    assert_eq!(code, if doc["healthy"] == true { 0 } else { 1 }, "{doc}");

    // The server down: the API check fails and says to start it; the rest still runs.
    server.kill();
    let out = krate_output(&["doctor", "--data-dir", server.data_dir().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("✗ API server") && text.contains("what to do: start it (krate server)"), "{text}");
    assert!(text.contains("✓ store"), "{text}");
}

#[test]
fn doctor_names_a_node_that_never_reported() {
    let server = TestServer::start();
    let ghost = r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "ghost"}}"#;
    server.create(ghost);
    let (code, doc) = doctor(&server.data_dir());
    let (outcome, fix) = outcome_of(&doc, "node ghost");
    assert_eq!((code, outcome.as_str()), (1, "failed"), "{doc}");
    assert!(fix.contains("check the agent on ghost"), "{fix}");
}

#[test]
fn doctor_names_a_node_whose_lease_expired() {
    // Ready when it last reported, its Lease renewed five minutes ago: the agent is gone.
    let server = TestServer::start();
    let stale = r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "stale"}}"#;
    server.create(stale);
    let now = jiff::Timestamp::now();
    let time = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let ready = serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "True",
        "reason": "KubeletReady", "message": "kubelet is posting ready status",
        "lastHeartbeatTime": time, "lastTransitionTime": time}]}});
    server.kubectl_ok(&["patch", "node", "stale", "--subresource=status", "--type=merge", "-p", &ready.to_string()]);
    let renewed = (now - jiff::SignedDuration::from_mins(5)).strftime("%Y-%m-%dT%H:%M:%S.000000Z").to_string();
    let lease = serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "stale", "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": "stale", "leaseDurationSeconds": 40, "renewTime": renewed}});
    server.create(&lease.to_string());
    let (code, doc) = doctor(&server.data_dir());
    let check = doc["checks"].as_array().unwrap().iter().find(|c| c["name"] == "node stale").unwrap().clone();
    assert_eq!((code, check["outcome"].as_str()), (1, Some("failed")), "{doc}");
    let detail = check["detail"].as_str().unwrap();
    // Either as it stands (Ready, the Lease stale) or once the node lifecycle controller
    // has marked it (Unknown): the Lease's age is named.
    assert!(detail.contains("lease renewed 30"), "{detail}");
    assert!(check["fix"].as_str().unwrap().contains("check the agent on stale"), "{check}");
}

#[test]
fn doctor_warns_of_a_certificate_within_30_days_of_expiry() {
    let server = TestServer::start();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["soon".to_string()]).unwrap();
    let expiry =
        (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 10 + 12)).to_zoned(jiff::tz::TimeZone::UTC);
    params.not_after = rcgen::date_time_ymd(expiry.year() as i32, expiry.month() as u8, expiry.day() as u8);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(server.data_dir().join("pki/soon.crt"), cert.pem()).unwrap();
    let (_, doc) = doctor(&server.data_dir());
    let check = doc["checks"].as_array().unwrap().iter().find(|c| c["name"] == "certificate soon.crt").unwrap().clone();
    assert_eq!(check["outcome"], "warning", "{check}");
    // Valid to the day: 9 to 11 days from now.
    let days = check["detail"].as_str().unwrap().split('(').nth(1).and_then(|d| d.strip_suffix(" days)"));
    assert!(matches!(days, Some("9" | "10" | "11")), "{check}");
    assert!(check["fix"].as_str().unwrap().contains("expires within 30 days: renew it"), "{check}");
    assert_eq!(outcome_of(&doc, "certificate ca.crt").0, "ok", "the others are fine: {doc}");
}

#[test]
fn doctor_names_a_node_whose_container_runtime_does_not_answer() {
    let server = common::node::server_with_agent(&[], 3, &[]);
    assert!(
        common::holds_within(90, || server.kubectl_ok(&["get", "nodes"]).contains(" Ready ")),
        "the node never became Ready"
    );
    // containerd hung (stopped, not exited: the agent restarts one that exits).
    let pid_file = server.data_dir().join("agent/containerd/containerd.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    let _resume = Resume(pid);
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let down = || {
        server.kubectl_ok(&["get", "nodes", "-o", "jsonpath={.items[0].status.conditions[?(@.type=='Ready')].message}"])
    };
    assert!(common::holds_within(90, || down() == "container runtime is down"), "Ready says: {}", down());
    let (code, doc) = doctor(&server.data_dir());
    let node = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap_or_default().starts_with("node "))
        .unwrap()
        .clone();
    assert_eq!((code, node["outcome"].as_str()), (1, Some("failed")), "{doc}");
    assert!(node["detail"].as_str().unwrap().contains("container runtime is down"), "{node}");
    assert!(node["fix"].as_str().unwrap().contains("containerd on "), "{node}");

    // Answering again, the node is Ready again.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let ready = || server.kubectl_ok(&["get", "nodes"]).contains(" Ready ");
    assert!(common::holds_within(60, ready), "{}", server.kubectl_ok(&["get", "nodes"]));
}

/// `krate soak` against `server` with `extra` arguments.
fn soak(server: &TestServer, extra: &[&str]) -> std::process::Output {
    let kubeconfig = server.kubeconfig();
    let mut args =
        vec!["soak", "--kubeconfig", kubeconfig.to_str().unwrap(), "--pods-per-node", "3", "--interval", "4s"];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_krate"))
        .args(&args)
        .env_remove("KRATE_CONFIG_FILE")
        .output()
        .expect("run krate soak")
}

#[test]
fn a_soak_reaches_every_pod_through_the_proxy_and_reports_progress() {
    let server = common::node::server_with_agent(&[], 1, &[]);
    let _hollow = common::HollowNodes::start(&server, "hollow", 2, &[]);
    assert!(
        common::holds_within(90, || server.kubectl_ok(&["get", "nodes"]).matches(" Ready ").count() == 3),
        "three Ready nodes: {}",
        server.kubectl_ok(&["get", "nodes"])
    );
    let out = soak(&server, &["--duration", "14s"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", common::stderr(&out));
    assert!(stdout.contains("all 9 pods Ready"), "{stdout}");
    assert!(
        stdout.contains("soaking 9 pods (3 through the pod proxy, 6 on hollow nodes through GET), each every 1s"),
        "{stdout}"
    );
    let progress: Vec<&str> = stdout.lines().filter(|l| l.starts_with('[')).collect();
    assert!(progress.len() >= 3, "a line every 4 s for 14 s: {stdout}");
    for line in &progress {
        assert!(
            line.contains(" errors 0 ") && line.contains("server rss ") && line.contains("agents (max of 1) rss "),
            "{line}"
        );
    }
    let after = progress.last().unwrap().split("requests ").nth(1).unwrap_or_default();
    let requests: u64 = after.split_whitespace().next().unwrap_or_default().parse().unwrap_or(0);
    assert!(requests >= 9 * 10, "every pod reached about once a second: {stdout}");
    assert!(stdout.contains(", 0 errors; API server memory slope "), "{stdout}");
    // The namespace goes at the end.
    assert!(common::holds_within(60, || !server.kubectl_ok(&["get", "namespaces"]).contains("krate-soak")));

    // Memory growth past the bound fails the run, with the reason.
    let out = soak(&server, &["--duration", "5s", "--max-memory-growth=-100"]);
    assert!(!out.status.success());
    assert!(common::stderr(&out).contains("the API server's memory grew"), "{}", common::stderr(&out));
}

#[test]
fn doctor_probes_the_network_from_a_pod_on_every_node() {
    let server = common::node::server_with_agent(&[], 2, &[]);
    assert!(
        common::holds_within(90, || server.kubectl_ok(&["get", "nodes"]).contains(" Ready ")),
        "the node never became Ready"
    );
    let (_, doc) = doctor(&server.data_dir());
    for name in ["pod network", "Service VIP", "cluster DNS", "time skew"] {
        assert_eq!(outcome_of(&doc, name).0, "ok", "{name}: {doc}");
    }
    // The probe's namespace goes.
    assert!(common::holds_within(60, || !server.kubectl_ok(&["get", "namespaces"]).contains("krate-doctor")));

    // Without the kube-dns Service, pods have no DNS: named, with what to do.
    server.kubectl_ok(&["delete", "service", "kube-dns", "-n", "kube-system"]);
    let (code, doc) = doctor(&server.data_dir());
    let (outcome, fix) = outcome_of(&doc, "cluster DNS");
    assert_eq!((code, outcome.as_str()), (1, "failed"), "{doc}");
    assert!(fix.contains("kube-dns"), "{fix}");
    assert_eq!(outcome_of(&doc, "pod network").0, "ok", "the rest still works: {doc}");
}

//! Who may do what, tried as users would: RBAC on a fresh server (its default policy, a
//! service account's own token, kubectl's `auth` commands, escalation checks,
//! impersonation), the identities of the built-in components, the node authorizer and
//! NodeRestriction, and the namespaces that cannot go.

mod common;

use std::path::PathBuf;

use common::{eventually, raw, HollowNodes, TestServer};
use serde_json::{json, Value};

/// A kubeconfig for the server that authenticates as service account `ns/name` (created
/// if missing) with a fresh token.
fn service_account_kubeconfig(server: &TestServer, ns: &str, name: &str) -> PathBuf {
    let _ = server.kubectl(&["create", "serviceaccount", name, "-n", ns]);
    let token = server.kubectl_ok(&["create", "token", name, "-n", ns]).trim().to_string();
    let admin = std::fs::read_to_string(server.kubeconfig()).unwrap();
    let mut config: Value = serde_yaml::from_str(&admin).unwrap();
    config["users"][0]["user"] = json!({"token": token});
    let path = server.data_dir().join(format!("{ns}-{name}.kubeconfig"));
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    path
}

/// kubectl with another kubeconfig: (succeeded, stdout, stderr).
fn kubectl_with(server: &TestServer, kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = server.kubectl(&all);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A GET with extra headers: (status, body).
async fn as_user(client: &kube::Client, headers: &[(&str, &str)], path: &str) -> (u16, Value) {
    let mut req = http::Request::builder().method("GET").uri(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = client.send(req.body(kube::client::Body::empty()).unwrap()).await.expect("send");
    let code = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// kubectl as the admin, impersonating `as_user` (and groups): the stderr of a refusal.
fn refused_as(server: &TestServer, as_user: &[&str], args: &[&str]) -> String {
    let mut all: Vec<&str> = as_user.to_vec();
    all.extend_from_slice(args);
    let out = server.kubectl(&all);
    assert!(!out.status.success(), "kubectl {all:?} should be refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_service_accounts_token_reads_secrets_only_once_a_binding_grants_it() {
    let server = TestServer::start();
    let bob = service_account_kubeconfig(&server, "default", "bob");
    let client = common::client_for(&bob).await;
    let (code, body) = raw(&client, "GET", "/api/v1/namespaces/kube-system/secrets", "application/json", vec![]).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["message"],
        r#"secrets is forbidden: User "system:serviceaccount:default:bob" cannot list resource "secrets" in API group "" in the namespace "kube-system""#
    );
    let (code, _) = raw(&client, "DELETE", "/api/v1/namespaces/kube-system", "application/json", vec![]).await;
    assert_eq!(code, 403, "a service account cannot delete kube-system");
    server.kubectl_ok(&["create", "role", "secret-reader", "-n", "kube-system", "--verb=list", "--resource=secrets"]);
    server.kubectl_ok(&[
        "create",
        "rolebinding",
        "bob-reads-secrets",
        "-n",
        "kube-system",
        "--role=secret-reader",
        "--serviceaccount=default:bob",
    ]);
    eventually(10, "bob to list secrets", || async {
        let (code, _) = raw(&client, "GET", "/api/v1/namespaces/kube-system/secrets", "application/json", vec![]).await;
        (code == 200).then_some(())
    })
    .await;
    // Only what was granted: not another namespace, not another verb.
    let (code, _) = raw(&client, "GET", "/api/v1/namespaces/default/secrets", "application/json", vec![]).await;
    assert_eq!(code, 403);
    let (code, _) = raw(&client, "GET", "/api/v1/namespaces/kube-system/secrets/x", "application/json", vec![]).await;
    assert_eq!(code, 403, "list does not grant get");
}

#[tokio::test]
async fn can_i_lists_exactly_what_was_granted() {
    let server = TestServer::start();
    let as_bob = ["--as", "system:serviceaccount:default:bob"];
    server.kubectl_ok(&["create", "serviceaccount", "bob"]);
    let can_i = |args: &[&str]| {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        all.extend_from_slice(&as_bob);
        server.kubectl(&all).stdout.starts_with(b"yes")
    };
    assert!(!can_i(&["list", "pods"]));
    assert!(can_i(&["create", "selfsubjectaccessreviews.authorization.k8s.io"]), "everyone may ask");
    server.kubectl_ok(&[
        "create",
        "role",
        "cm-editor",
        "--verb=get,update",
        "--resource=configmaps",
        "--resource-name=app",
    ]);
    server.kubectl_ok(&["create", "rolebinding", "bob-cm", "--role=cm-editor", "--serviceaccount=default:bob"]);
    let list = eventually(10, "the rule to show in can-i --list", || async {
        let mut args = vec!["auth", "can-i", "--list"];
        args.extend_from_slice(&as_bob);
        let out = server.kubectl_ok(&args);
        out.lines().any(|l| l.starts_with("configmaps ")).then_some(out)
    })
    .await;
    let row = list.lines().find(|l| l.starts_with("configmaps ")).unwrap();
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns, ["configmaps", "[]", "[app]", "[get", "update]"], "{list}");
    assert!(!list.lines().any(|l| l.starts_with("pods ") || l.starts_with("secrets ")), "{list}");
    assert!(can_i(&["update", "configmaps/app"]) && !can_i(&["update", "configmaps/other"]));

    // The view role: reads, and nothing more (no secrets, no writes).
    server.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "bob-view",
        "--clusterrole=view",
        "--serviceaccount=default:bob",
    ]);
    eventually(20, "view to be aggregated and bound", || async {
        can_i(&["list", "deployments", "-n", "kube-system"]).then_some(())
    })
    .await;
    assert!(can_i(&["get", "pods", "-A"]));
    assert!(!can_i(&["list", "secrets"]), "view does not read secrets");
    assert!(!can_i(&["delete", "pods"]) && !can_i(&["create", "deployments"]));
}

#[tokio::test]
async fn whoami_shows_the_user_and_groups() {
    let server = TestServer::start();
    let admin = server.kubectl_ok(&["auth", "whoami", "-o", "json"]);
    let admin: Value = serde_json::from_str(&admin).unwrap();
    assert_eq!(admin["kind"], "SelfSubjectReview");
    assert_eq!(admin["status"]["userInfo"]["username"], "krate-admin");
    assert_eq!(admin["status"]["userInfo"]["groups"], json!(["system:masters", "system:authenticated"]));
    let bob = service_account_kubeconfig(&server, "default", "bob");
    let (ok, table, err) = kubectl_with(&server, &bob, &["auth", "whoami"]);
    assert!(ok, "{err}");
    assert!(table.contains("system:serviceaccount:default:bob"), "{table}");
    assert!(table.contains("[system:serviceaccounts system:serviceaccounts:default system:authenticated]"), "{table}");
}

#[tokio::test]
async fn roles_and_bindings_grant_no_more_than_their_author_holds() {
    let server = TestServer::start();
    server.kubectl_ok(&["create", "namespace", "team"]);
    for (account, role) in [("editor", "edit"), ("boss", "admin")] {
        server.kubectl_ok(&["create", "serviceaccount", account, "-n", "team"]);
        let subject = format!("--serviceaccount=team:{account}");
        server.kubectl_ok(&[
            "create",
            "rolebinding",
            account,
            "-n",
            "team",
            &format!("--clusterrole={role}"),
            &subject,
        ]);
    }
    let editor = service_account_kubeconfig(&server, "team", "editor");
    let boss = service_account_kubeconfig(&server, "team", "boss");
    // admin aggregates edit, which aggregates view: wait for a rule from each link.
    eventually(20, "admin to be aggregated", || async {
        let can = |verb: &str, resource: &str| {
            kubectl_with(&server, &boss, &["auth", "can-i", verb, resource, "-n", "team"]).1.starts_with("yes")
        };
        (can("create", "rolebindings") && can("get", "pods")).then_some(())
    })
    .await;
    let (ok, _, err) = kubectl_with(
        &server,
        &editor,
        &["create", "rolebinding", "grab", "-n", "team", "--clusterrole=cluster-admin", "--serviceaccount=team:editor"],
    );
    assert!(!ok && err.contains("cannot create resource \"rolebindings\""), "edit writes no RBAC: {err}");
    let (ok, _, err) = kubectl_with(
        &server,
        &boss,
        &["create", "rolebinding", "grab", "-n", "team", "--clusterrole=cluster-admin", "--serviceaccount=team:boss"],
    );
    assert!(!ok, "binding cluster-admin must be refused");
    assert!(
        err.contains(r#"rolebindings.rbac.authorization.k8s.io "grab" is forbidden: user "system:serviceaccount:team:boss" (groups=["system:serviceaccounts" "system:serviceaccounts:team" "system:authenticated"]) is attempting to grant RBAC permissions not currently held:"#),
        "{err}"
    );
    let (ok, _, err) =
        kubectl_with(&server, &boss, &["create", "role", "nodes", "-n", "team", "--verb=get", "--resource=nodes"]);
    assert!(!ok && err.contains("{APIGroups:[\"\"], Resources:[\"nodes\"], Verbs:[\"get\"]}"), "{err}");
    // What the author holds may be granted.
    let (ok, _, err) =
        kubectl_with(&server, &boss, &["create", "role", "pods", "-n", "team", "--verb=get", "--resource=pods"]);
    assert!(ok, "{err}");
    let (ok, _, err) = kubectl_with(
        &server,
        &boss,
        &["create", "rolebinding", "view", "-n", "team", "--clusterrole=view", "--serviceaccount=team:editor"],
    );
    assert!(ok, "{err}");

    // The bind verb on cluster-admin lets boss bind it, escalate lets boss write any role.
    server.kubectl_ok(&[
        "create",
        "clusterrole",
        "bind-and-escalate",
        "--verb=bind,escalate",
        "--resource=clusterroles,roles.rbac.authorization.k8s.io",
    ]);
    let subject = "--serviceaccount=team:boss";
    server.kubectl_ok(&[
        "create",
        "rolebinding",
        "boss-binds",
        "-n",
        "team",
        "--clusterrole=bind-and-escalate",
        subject,
    ]);
    eventually(20, "boss to hold bind", || async {
        let args = ["create", "rolebinding", "grab", "-n", "team", "--clusterrole=cluster-admin", subject];
        kubectl_with(&server, &boss, &args).0.then_some(())
    })
    .await;
    let (ok, _, err) =
        kubectl_with(&server, &boss, &["create", "role", "nodes", "-n", "team", "--verb=get", "--resource=nodes"]);
    assert!(ok, "escalate lets boss write a role beyond its own rules: {err}");
}

#[tokio::test]
async fn auth_reconcile_creates_and_then_keeps_roles_and_bindings() {
    let server = TestServer::start();
    server.kubectl_ok(&["create", "namespace", "team"]);
    let manifest = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reader, namespace: team}
rules:
- {apiGroups: [""], resources: [configmaps], verbs: [get, list]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader, namespace: team}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}
subjects:
- {kind: User, apiGroup: rbac.authorization.k8s.io, name: jane}
"#;
    let reconcile = || server.kubectl_stdin(&["auth", "reconcile", "-f", "-"], Some(manifest));
    let out = reconcile();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("role.rbac.authorization.k8s.io/reader reconciled"), "{text}");
    let version =
        || server.kubectl_ok(&["get", "role", "reader", "-n", "team", "-o", "jsonpath={.metadata.resourceVersion}"]);
    let created = version();
    let can = server.kubectl_ok(&["auth", "can-i", "list", "configmaps", "-n", "team", "--as", "jane"]);
    assert_eq!(can.trim(), "yes");
    // Once in place, a second run changes nothing.
    let out = reconcile();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(version(), created, "the role is left as it was");
    // Impersonating a uid shows in whoami.
    let who = server.kubectl_ok(&["auth", "whoami", "--as", "jane", "--as-uid", "1234", "-o", "json"]);
    let who: Value = serde_json::from_str(&who).unwrap();
    assert_eq!(
        (&who["status"]["userInfo"]["username"], &who["status"]["userInfo"]["uid"]),
        (&json!("jane"), &json!("1234"))
    );
}

#[tokio::test]
async fn impersonating_needs_the_impersonate_verb() {
    let server = TestServer::start();
    let bob = service_account_kubeconfig(&server, "default", "bob");
    let (code, body) = as_user(&common::client_for(&bob).await, &[("Impersonate-User", "alice")], "/api/v1/pods").await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["message"],
        r#"users "alice" is forbidden: User "system:serviceaccount:default:bob" cannot impersonate resource "users" in API group "" at the cluster scope"#
    );
    server.kubectl_ok(&[
        "create",
        "clusterrole",
        "impersonate-alice",
        "--verb=impersonate",
        "--resource=users",
        "--resource-name=alice",
    ]);
    server.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "bob-as-alice",
        "--clusterrole=impersonate-alice",
        "--serviceaccount=default:bob",
    ]);
    let whoami = eventually(10, "bob to act as alice", || async {
        let (ok, out, _) = kubectl_with(&server, &bob, &["auth", "whoami", "--as", "alice", "-o", "json"]);
        ok.then_some(out)
    })
    .await;
    let whoami: Value = serde_json::from_str(&whoami).unwrap();
    assert_eq!(whoami["status"]["userInfo"], json!({"username": "alice", "groups": ["system:authenticated"]}));
    let (ok, _, err) = kubectl_with(&server, &bob, &["get", "pods", "--as", "alice", "--as-group", "system:masters"]);
    assert!(!ok && err.contains(r#"groups "system:masters" is forbidden"#), "{err}");
}

#[tokio::test]
async fn built_in_components_are_refused_outside_their_roles() {
    let server = TestServer::start();
    server.kubectl_ok(&["create", "secret", "generic", "s", "--from-literal=k=v"]);
    // What each component may not do, asked as the user it runs as.
    let cases: [(&[&str], &[&str], &str); 4] = [
        (
            &["--as", "system:kube-scheduler"],
            &["delete", "node", "n1"],
            r#"User "system:kube-scheduler" cannot delete resource "nodes""#,
        ),
        (&["--as", "system:kube-scheduler"], &["get", "secret", "s"], r#"cannot get resource "secrets""#),
        (
            &["--as", "system:serviceaccount:kube-system:replicaset-controller"],
            &["get", "secret", "s"],
            r#"User "system:serviceaccount:kube-system:replicaset-controller" cannot get resource "secrets""#,
        ),
        (
            &["--as", "system:serviceaccount:kube-system:deployment-controller"],
            &["delete", "namespace", "default"],
            r#"cannot delete resource "namespaces""#,
        ),
    ];
    for (who, what, expected) in cases {
        let err = refused_as(&server, who, what);
        assert!(err.contains(expected), "{who:?} {what:?}: {err}");
    }
    // The same identities do their work: controllers scale a Deployment into pods.
    let _nodes = HollowNodes::start(&server, "worker", 1, &[]);
    server.kubectl_ok(&["create", "deployment", "web", "--image=registry.k8s.io/pause:3.10", "--replicas=2"]);
    eventually(60, "the deployment's pods to be scheduled", || async {
        let out = server.kubectl_ok(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].spec.nodeName}"]);
        (out.split_whitespace().filter(|n| n.starts_with("worker")).count() == 2).then_some(())
    })
    .await;
    let log = server.log();
    assert!(!log.contains("code: 403"), "a built-in component was refused:\n{log}");
}

/// Two registered nodes; a pod on node b uses a Secret.
fn node_b_with_a_pod(server: &TestServer) {
    for node in ["a", "b"] {
        let manifest = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}});
        server.kubectl_stdin(&["create", "-f", "-"], Some(&manifest.to_string()));
    }
    server.kubectl_ok(&["create", "secret", "generic", "b-secret", "--from-literal=k=v"]);
    server.kubectl_ok(&["create", "secret", "generic", "unused", "--from-literal=k=v"]);
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "on-b"}, "spec": {
        "nodeName": "b",
        "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10",
            "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "b-secret", "key": "k"}}}]}]}});
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&pod.to_string()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The kubeconfig `krate kubeconfig --node NAME` mints: node NAME's own credentials.
fn node_kubeconfig(server: &TestServer, node: &str) -> PathBuf {
    server.minted_kubeconfig(&["--node", node], &format!("node-{node}.kubeconfig"))
}

#[tokio::test]
async fn a_node_reaches_only_what_its_own_pods_use() {
    let server = TestServer::start();
    node_b_with_a_pod(&server);
    let (a, b) = (node_kubeconfig(&server, "a"), node_kubeconfig(&server, "b"));
    // Every node may read discovery; list it once so kubectl's discovery cache is warm.
    server.kubectl_ok(&["api-resources", "-o", "name"]);
    let refused = |kubeconfig: &PathBuf, args: &[&str]| {
        let (ok, _, err) = kubectl_with(&server, kubeconfig, args);
        assert!(!ok, "{args:?} must be refused");
        err
    };
    let err = refused(&a, &["get", "secret", "b-secret"]);
    assert!(
        err.contains(r#"secrets "b-secret" is forbidden: User "system:node:a" cannot get resource "secrets" in API group "" in the namespace "default": no relationship found between node 'a' and this object"#),
        "{err}"
    );
    let (ok, _, err) = kubectl_with(&server, &b, &["get", "secret", "b-secret"]);
    assert!(ok, "node b reads its pod's secret: {err}");
    let err = refused(&b, &["get", "secret", "unused"]);
    assert!(err.contains("no relationship found between node 'b'"), "{err}");
    let err = refused(&a, &["get", "pods"]);
    assert!(err.contains("can only list/watch pods with spec.nodeName field selector"), "{err}");
    let (ok, _, err) = kubectl_with(&server, &b, &["get", "pods", "-A", "--field-selector", "spec.nodeName=b"]);
    assert!(ok, "a node lists its own pods: {err}");
    // Writes as the node sends them (kubectl patch would first read node b).
    let client = common::client_for(&a).await;
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "Hijacked"}]}});
    let patch = |node: &str| {
        http::Request::builder()
            .method("PATCH")
            .uri(format!("/api/v1/nodes/{node}/status"))
            .header("Content-Type", "application/merge-patch+json")
            .body(kube::client::Body::from(status.to_string().into_bytes()))
            .unwrap()
    };
    let resp = client.send(patch("b")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["message"], r#"nodes "b" is forbidden: node "a" is not allowed to modify node "b""#);
    assert_eq!(client.send(patch("a")).await.unwrap().status().as_u16(), 200, "a node writes its own status");
    let err = refused(&a, &["delete", "pod", "on-b"]);
    assert!(err.contains(r#"node "a" can only delete pods with spec.nodeName set to itself"#), "{err}");
}

#[tokio::test]
async fn a_node_creates_only_its_own_mirror_pods_and_keeps_only_its_own_lease() {
    let server = TestServer::start();
    node_b_with_a_pod(&server);
    let a = common::client_for(&node_kubeconfig(&server, "a")).await;
    let post = |path: &'static str, object: Value| {
        let a = a.clone();
        async move { raw(&a, "POST", path, "application/json", object.to_string().into_bytes()).await }
    };
    let pod = |name: &str, node: &str, mirror: bool| {
        let annotations = if mirror { json!({"kubernetes.io/config.mirror": "static"}) } else { json!({}) };
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "annotations": annotations},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}})
    };
    let pods = "/api/v1/namespaces/default/pods";
    let (code, body) = post(pods, pod("plain", "a", false)).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["message"],
        r#"pods "plain" is forbidden: pod does not have "kubernetes.io/config.mirror" annotation, node "a" can only create mirror pods"#
    );
    let (code, body) = post(pods, pod("elsewhere", "b", true)).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["message"],
        r#"pods "elsewhere" is forbidden: node "a" can only create pods with spec.nodeName set to itself"#
    );
    let (code, body) = post(pods, pod("static-a", "a", true)).await;
    assert_eq!(code, 201, "a node creates its own mirror pod: {body}");

    let lease = |name: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"}, "spec": {"holderIdentity": name}})
    };
    let leases = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";
    let (code, body) = post(leases, lease("b")).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["message"],
        r#"leases.coordination.k8s.io "b" is forbidden: can only access node lease with the same name as the requesting node"#
    );
    let (code, body) = post(leases, lease("a")).await;
    assert_eq!(code, 201, "a node creates its own lease: {body}");
    // Node b's Lease, made by someone else, stays out of node a's reach.
    server.kubectl_stdin(&["create", "-f", "-"], Some(&lease("b").to_string()));
    let path = format!("{leases}/b");
    let (code, body) = raw(&a, "PUT", &path, "application/json", lease("b").to_string().into_bytes()).await;
    assert_eq!(code, 403, "{body}");
}

#[tokio::test]
async fn system_namespaces_cannot_be_deleted_and_come_back() {
    let mut server = TestServer::start();
    for ns in ["default", "kube-system", "kube-public"] {
        let out = server.kubectl(&["delete", "namespace", ns]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(r#"namespaces "{ns}" is forbidden: this namespace may not be deleted"#)),
            "{ns}: {err}"
        );
    }
    let uid = |server: &TestServer| {
        server.kubectl_ok(&["get", "namespace", "kube-node-lease", "-o", "jsonpath={.metadata.uid}"])
    };
    let before = uid(&server);
    server.kubectl_ok(&["delete", "namespace", "kube-node-lease", "--wait=false"]);
    eventually(60, "kube-node-lease to come back", || async {
        let out = server.kubectl(&["get", "namespace", "kube-node-lease", "-o", "jsonpath={.metadata.uid}"]);
        let now = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && !now.is_empty() && now != before).then_some(())
    })
    .await;

    // Removed from the store behind the server's back (while it is down): back at start.
    server.kill();
    let db = rusqlite::Connection::open(server.data_dir().join("db/state.db")).unwrap();
    let key = "/registry/core/namespaces/kube-node-lease";
    assert_eq!(db.execute("DELETE FROM kv_current WHERE key = ?1", [key]).unwrap(), 1);
    drop(db);
    server.restart();
    eventually(30, "kube-node-lease recreated at start", || async {
        server.kubectl(&["get", "namespace", "kube-node-lease"]).status.success().then_some(())
    })
    .await;
}

#[tokio::test]
async fn access_reviews_answer_for_any_user() {
    let server = TestServer::start();
    let client = server.client().await;
    let review = |user: &str, verb: &str, resource: &str| {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "resourceAttributes": {"verb": verb, "resource": resource, "namespace": "default"}}})
    };
    let path = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
    let ask = |body: Value| {
        let client = client.clone();
        async move { raw(&client, "POST", path, "application/json", body.to_string().into_bytes()).await }
    };
    let (code, body) = ask(review("system:kube-scheduler", "create", "pods/binding")).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["status"]["allowed"], true);
    assert_eq!(
        body["status"]["reason"],
        r#"RBAC: allowed by ClusterRoleBinding "system:kube-scheduler" of ClusterRole "system:kube-scheduler" to User "system:kube-scheduler""#
    );
    let (_, body) = ask(review("nobody", "get", "pods")).await;
    assert_eq!(body["status"], json!({"allowed": false}));
    let (code, body) = ask(json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {"resourceAttributes": {"verb": "get"}}})).await;
    assert_eq!(code, 422, "{body}");
    // TokenReview: a service account's token is recognized, garbage is not.
    let token = server.kubectl_ok(&["create", "token", "default"]).trim().to_string();
    let token_review = |token: &str| json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}});
    let path = "/apis/authentication.k8s.io/v1/tokenreviews";
    let (code, body) =
        raw(&client, "POST", path, "application/json", token_review(&token).to_string().into_bytes()).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["status"]["authenticated"], true);
    assert_eq!(body["status"]["user"]["username"], "system:serviceaccount:default:default");
    let credential = &body["status"]["user"]["extra"]["authentication.kubernetes.io/credential-id"];
    assert!(credential[0].as_str().is_some_and(|c| c.starts_with("JTI=")), "{body}");
    let (_, body) =
        raw(&client, "POST", path, "application/json", token_review("garbage").to_string().into_bytes()).await;
    assert_eq!(body["status"]["authenticated"], false);
}

fn privileged_pod(ns: &str, name: &str) -> String {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": {
        "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "securityContext": {"privileged": true}}]}})
    .to_string()
}

#[tokio::test]
async fn pod_security_labels_refuse_warn_and_leave_running_pods_alone() {
    let server = TestServer::start();
    server.kubectl_ok(&["create", "namespace", "locked"]);
    server.kubectl_ok(&["label", "namespace", "locked", "pod-security.kubernetes.io/enforce=restricted"]);
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&privileged_pod("locked", "p")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a privileged pod must be refused");
    assert!(
        err.contains(r#"pods "p" is forbidden: violates PodSecurity "restricted:latest": privileged (container "c" must not set securityContext.privileged=true), allowPrivilegeEscalation != false (container "c" must set securityContext.allowPrivilegeEscalation=false)"#),
        "{err}"
    );
    // Workloads are warned (warn follows enforce), not refused: their pods are.
    let out = server.kubectl(&["create", "deployment", "web", "-n", "locked", "--image=registry.k8s.io/pause:3.10"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"Warning: would violate PodSecurity "restricted:latest": allowPrivilegeEscalation != false"#),
        "{err}"
    );

    server.kubectl_ok(&["create", "namespace", "watched"]);
    server.kubectl_ok(&["label", "namespace", "watched", "pod-security.kubernetes.io/warn=baseline"]);
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&privileged_pod("watched", "p")));
    assert!(out.status.success(), "warn mode admits the pod");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"Warning: would violate PodSecurity "baseline:latest": privileged (container "c" must not set securityContext.privileged=true)"#),
        "{err}"
    );

    // A stricter level on a namespace with pods: warnings, and the pods stay.
    server.kubectl_ok(&["create", "namespace", "later"]);
    server.kubectl_stdin(&["create", "-f", "-"], Some(&privileged_pod("later", "old")));
    let out = server.kubectl(&["label", "namespace", "later", "pod-security.kubernetes.io/enforce=baseline"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            r#"existing pods in namespace "later" violate the new PodSecurity enforce level "baseline:latest""#
        ),
        "{err}"
    );
    assert!(err.contains("Warning: old: privileged"), "{err}");
    server.kubectl_ok(&["get", "pod", "old", "-n", "later"]);

    let out =
        server.kubectl(&["label", "namespace", "later", "--overwrite", "pod-security.kubernetes.io/enforce=strict"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"metadata.labels[pod-security.kubernetes.io/enforce]: Invalid value: "strict": must be one of privileged, baseline, restricted"#),
        "{err}"
    );
}

#[tokio::test]
async fn pod_security_audit_level_annotates_the_audit_event() {
    let server = TestServer::start_audited(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
         - level: Metadata\n  resources: [{group: \"\", resources: [pods]}]\n- level: None\n",
        &[],
    );
    server.kubectl_ok(&["create", "namespace", "audited"]);
    server.kubectl_ok(&["label", "namespace", "audited", "pod-security.kubernetes.io/audit=baseline"]);
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&privileged_pod("audited", "p")));
    assert!(out.status.success(), "audit mode admits the pod");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("Warning"), "audit mode does not warn");
    let created = eventually(10, "the pod's audit event", || async {
        let events = server.audit_events().into_iter();
        events
            .filter(|e| e["verb"] == "create" && e["objectRef"]["resource"] == "pods")
            .find(|e| e["objectRef"]["namespace"] == "audited")
    })
    .await;
    let annotations = &created["annotations"];
    assert_eq!(
        annotations["pod-security.kubernetes.io/audit-violations"],
        r#"would violate PodSecurity "baseline:latest": privileged (container "c" must not set securityContext.privileged=true)"#,
        "{created}"
    );
    assert_eq!(annotations["pod-security.kubernetes.io/enforce-policy"], "privileged:latest", "{created}");
}

#[tokio::test]
async fn the_audit_log_records_who_did_what() {
    let server = TestServer::start_audited(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
         - level: Metadata\n  resources: [{group: \"\", resources: [secrets]}]\n\
         - level: RequestResponse\n  resources: [{group: \"\", resources: [configmaps]}]\n\
         - level: None\n",
        &[],
    );
    server.kubectl_ok(&["create", "configmap", "audited", "--from-literal=k=v"]);
    server.kubectl_ok(&["create", "secret", "generic", "s", "--from-literal=k=v"]);
    server.kubectl_ok(&["get", "secret", "s"]);
    let bob = service_account_kubeconfig(&server, "default", "bob");
    let (code, _) =
        raw(&common::client_for(&bob).await, "GET", "/api/v1/namespaces/default/secrets", "application/json", vec![])
            .await;
    assert_eq!(code, 403);
    let find = |events: &[Value], verb: &str, resource: &str, user: &str| -> Option<Value> {
        events
            .iter()
            .find(|e| e["verb"] == verb && e["objectRef"]["resource"] == resource && e["user"]["username"] == user)
            .cloned()
    };
    let events = eventually(10, "the audit events", || async {
        let events = server.audit_events();
        find(&events, "list", "secrets", "system:serviceaccount:default:bob").is_some().then_some(events)
    })
    .await;
    for e in &events {
        assert!(e["kind"] == "Event" && e["apiVersion"] == "audit.k8s.io/v1", "{e}");
        // RequestReceived is omitted; watches log when their response starts.
        let stage = if e["verb"] == "watch" { "ResponseStarted" } else { "ResponseComplete" };
        assert_eq!(e["stage"], stage, "{e}");
    }
    let created = find(&events, "create", "configmaps", "krate-admin").expect("the create is logged");
    assert_eq!(
        (created["level"].as_str(), created["responseStatus"]["code"].as_i64()),
        (Some("RequestResponse"), Some(201))
    );
    assert_eq!(created["requestObject"]["data"]["k"], "v");
    assert_eq!(created["responseObject"]["metadata"]["name"], "audited");
    let denied = find(&events, "list", "secrets", "system:serviceaccount:default:bob").unwrap();
    assert_eq!((denied["level"].as_str(), denied["responseStatus"]["code"].as_i64()), (Some("Metadata"), Some(403)));
    assert_eq!(denied["annotations"]["authorization.k8s.io/decision"], "forbid");
    assert_eq!(denied["responseStatus"]["reason"], "Forbidden");
    let read = find(&events, "get", "secrets", "krate-admin").expect("the secret read is logged");
    assert_eq!((read["level"].as_str(), read["responseStatus"]["code"].as_i64()), (Some("Metadata"), Some(200)));
    assert_eq!(read["objectRef"]["name"], "s");
    assert!(read.get("responseObject").is_none() && read.get("requestObject").is_none(), "Metadata keeps no bodies");
    assert!(!events.iter().any(|e| e["objectRef"]["resource"] == "pods"), "level None logs nothing");
}

#[tokio::test]
async fn limit_ranges_default_and_bound_pods() {
    let server = TestServer::start();
    let range = json!({"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "limits"}, "spec": {"limits": [
        {"type": "Container", "max": {"cpu": "1"}, "min": {"memory": "10Mi"}, "default": {"cpu": "500m"}, "defaultRequest": {"cpu": "100m"}}]}});
    server.kubectl_stdin(&["create", "-f", "-"], Some(&range.to_string()));
    let pod = |name: &str, resources: Value| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
            "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "resources": resources}]}})
        .to_string()
    };
    let out =
        server.kubectl_stdin(&["create", "-f", "-"], Some(&pod("defaulted", json!({"requests": {"memory": "20Mi"}}))));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_str(&server.kubectl_ok(&["get", "pod", "defaulted", "-o", "json"])).unwrap();
    assert_eq!(
        got["spec"]["containers"][0]["resources"],
        json!({"limits": {"cpu": "500m"}, "requests": {"cpu": "100m", "memory": "20Mi"}})
    );
    assert_eq!(
        got["metadata"]["annotations"]["kubernetes.io/limit-ranger"],
        "LimitRanger plugin set: cpu request for container c; cpu limit for container c"
    );
    let out = server.kubectl_stdin(
        &["create", "-f", "-"],
        Some(&pod("greedy", json!({"limits": {"cpu": "2"}, "requests": {"memory": "20Mi"}}))),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"pods "greedy" is forbidden: maximum cpu usage per Container is 1, but limit is 2"#),
        "{err}"
    );
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&pod("tiny", json!({"requests": {"memory": "5Mi"}}))));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("minimum memory usage per Container is 10Mi, but request is 5Mi"), "{err}");
    // With no request at all, the min is the default request (upstream's defaulting).
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&pod("bare", json!({}))));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn claims_without_a_class_get_the_default_one() {
    let server = TestServer::start();
    for (name, default) in [("slow", "false"), ("fast", "true")] {
        let class = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "provisioner": "example.com/none",
            "metadata": {"name": name, "annotations": {"storageclass.kubernetes.io/is-default-class": default}}});
        server.kubectl_stdin(&["create", "-f", "-"], Some(&class.to_string()));
    }
    let claim = |name: &str, class: Option<&str>| {
        let mut claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}});
        if let Some(class) = class {
            claim["spec"]["storageClassName"] = json!(class);
        }
        claim.to_string()
    };
    server.kubectl_stdin(&["create", "-f", "-"], Some(&claim("plain", None)));
    server.kubectl_stdin(&["create", "-f", "-"], Some(&claim("none", Some(""))));
    let class = |name: &str| server.kubectl_ok(&["get", "pvc", name, "-o", "jsonpath={.spec.storageClassName}"]);
    assert_eq!(class("plain"), "fast");
    assert_eq!(class("none"), "", "an explicit empty class stays empty");
}

#[tokio::test]
async fn service_accounts_find_the_key_their_tokens_are_signed_with() {
    let server = TestServer::start();
    let bob = service_account_kubeconfig(&server, "default", "bob");
    let client = common::client_for(&bob).await;
    let (code, config) = raw(&client, "GET", "/.well-known/openid-configuration", "application/json", vec![]).await;
    assert_eq!(code, 200, "{config}");
    assert_eq!(config["issuer"], "https://kubernetes.default.svc.cluster.local");
    assert_eq!(config["jwks_uri"], "https://kubernetes.default.svc.cluster.local/openid/v1/jwks");
    let (code, keys) = raw(&client, "GET", "/openid/v1/jwks", "application/json", vec![]).await;
    assert_eq!(code, 200);
    let token = server.kubectl_ok(&["create", "token", "bob"]);
    let header = token.split('.').next().unwrap();
    use base64::Engine;
    let header: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    assert_eq!(keys["keys"][0]["kid"], header["kid"], "the token names the published key");
    // Discovery is for service accounts (and whoever else is bound to the role).
    let admin = std::fs::read_to_string(server.kubeconfig()).unwrap();
    let mut config: Value = serde_yaml::from_str(&admin).unwrap();
    config["users"][0]["user"] = json!({});
    let anonymous = server.data_dir().join("anonymous.kubeconfig");
    std::fs::write(&anonymous, serde_json::to_vec(&config).unwrap()).unwrap();
    let (code, _) =
        raw(&common::client_for(&anonymous).await, "GET", "/openid/v1/jwks", "application/json", vec![]).await;
    assert_eq!(code, 403);
}

#[tokio::test]
async fn a_claim_in_use_stays_until_its_pod_goes() {
    let server = TestServer::start();
    let claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
        "spec": {"storageClassName": "", "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}});
    server.kubectl_stdin(&["create", "-f", "-"], Some(&claim.to_string()));
    let finalizers = server.kubectl_ok(&["get", "pvc", "data", "-o", "jsonpath={.metadata.finalizers}"]);
    assert_eq!(finalizers, r#"["kubernetes.io/pvc-protection"]"#);
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "user"}, "spec": {
        "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}],
        "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}]}});
    server.kubectl_stdin(&["create", "-f", "-"], Some(&pod.to_string()));
    server.kubectl_ok(&["delete", "pvc", "data", "--wait=false"]);
    // Deleting, but kept while the pod may use it.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let deleting = server.kubectl_ok(&["get", "pvc", "data", "-o", "jsonpath={.metadata.deletionTimestamp}"]);
    assert!(!deleting.is_empty(), "the claim is being deleted and still there");
    server.kubectl_ok(&["delete", "pod", "user", "--grace-period=0", "--force"]);
    eventually(30, "the claim to go with its last pod", || async {
        let out = server.kubectl(&["get", "pvc", "data"]);
        String::from_utf8_lossy(&out.stderr).contains("NotFound").then_some(())
    })
    .await;

    let volume = json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "disk"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/tmp/disk"}}});
    server.kubectl_stdin(&["create", "-f", "-"], Some(&volume.to_string()));
    let finalizers = server.kubectl_ok(&["get", "pv", "disk", "-o", "jsonpath={.metadata.finalizers}"]);
    assert_eq!(finalizers, r#"["kubernetes.io/pv-protection"]"#);
    server.kubectl_ok(&["delete", "pv", "disk", "--wait=false"]);
    eventually(30, "an unbound volume to go", || async {
        let out = server.kubectl(&["get", "pv", "disk"]);
        String::from_utf8_lossy(&out.stderr).contains("NotFound").then_some(())
    })
    .await;
}

#[tokio::test]
async fn only_a_user_who_may_sign_for_its_signer_answers_a_pod_certificate_request() {
    use base64::Engine;
    let server = TestServer::start();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let stub = params.serialize_request(&key).unwrap();
    let request = json!({"apiVersion": "certificates.k8s.io/v1", "kind": "PodCertificateRequest",
        "metadata": {"name": "req", "namespace": "default"},
        "spec": {"signerName": "example.com/signer", "podName": "p", "podUID": "u1", "serviceAccountName": "default",
            "serviceAccountUID": "u2", "nodeName": "n", "nodeUID": "u3",
            "stubPKCS10Request": base64::engine::general_purpose::STANDARD.encode(stub.der())}});
    server.create(&request.to_string());
    // bob may write the status of PodCertificateRequests, and nothing about signers.
    server.kubectl_ok(&["create", "serviceaccount", "bob"]);
    server.kubectl_ok(&[
        "create",
        "clusterrole",
        "pcr-status",
        "--verb=get,update",
        "--resource=podcertificaterequests.certificates.k8s.io/status",
    ]);
    server.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "bob-pcr-status",
        "--clusterrole=pcr-status",
        "--serviceaccount=default:bob",
    ]);
    let mut denied = server.get_json(&["podcertificaterequest", "req"]);
    denied["status"] = json!({"conditions": [{"type": "Denied", "status": "True", "reason": "Policy",
        "message": "not for this pod", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
    let as_bob = ["--as", "system:serviceaccount:default:bob"];
    let answer = |server: &TestServer| {
        let mut all: Vec<&str> = as_bob.to_vec();
        all.extend(["replace", "--subresource=status", "-f", "-"]);
        server.kubectl_stdin(&all, Some(&denied.to_string()))
    };
    let out = answer(&server);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(r#"spec.signerName: Forbidden: User "system:serviceaccount:default:bob" is not permitted to "sign" for signer "example.com/signer""#),
        "{stderr}"
    );
    // `sign` for the signer's domain (`example.com/*`) makes bob a signer.
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "signer"},
        "rules": [{"apiGroups": ["certificates.k8s.io"], "resources": ["signers"], "resourceNames": ["example.com/*"],
            "verbs": ["sign"]}]});
    server.create(&role.to_string());
    server.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "bob-signs",
        "--clusterrole=signer",
        "--serviceaccount=default:bob",
    ]);
    let signed =
        eventually(10, "bob to answer as a signer", || async { answer(&server).status.success().then_some(()) });
    signed.await;
    let stored = server.get_json(&["podcertificaterequest", "req"]);
    assert_eq!(stored["status"]["conditions"][0]["reason"], "Policy");
    assert_eq!(stored["spec"]["maxExpirationSeconds"], 86400, "defaulted");
}

//! Bad input gets upstream's status codes and a clear Status; nothing is half-written and
//! the server never panics.

mod common;

use common::{raw, TestServer};
use serde_json::json;

const CMS: &str = "/api/v1/namespaces/default/configmaps";

#[tokio::test]
async fn malformed_and_mismatched_bodies() {
    let server = TestServer::start();
    let client = server.client().await;

    let (code, status) = raw(&client, "POST", CMS, "application/json", b"{not json".to_vec()).await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")), "{status}");
    assert_eq!(status["kind"], "Status");
    assert!(status["message"].as_str().unwrap().contains("json parse error"), "{status}");

    let (code, status) = raw(&client, "POST", CMS, "application/yaml", b"a: [unclosed".to_vec()).await;
    assert_eq!(code, 400, "{status}");

    let wrong_version = json!({"apiVersion": "apps/v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
    let (code, status) = raw(&client, "POST", CMS, "application/json", wrong_version.to_string().into_bytes()).await;
    assert_eq!(code, 400);
    assert!(status["message"].as_str().unwrap().contains("does not match the expected API version"), "{status}");

    let wrong_kind = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}});
    let (code, status) = raw(&client, "POST", CMS, "application/json", wrong_kind.to_string().into_bytes()).await;
    assert_eq!(code, 400);
    assert!(status["message"].as_str().unwrap().contains("does not match the expected kind"), "{status}");

    let wrong_type = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": 5}});
    let (code, status) = raw(&client, "POST", CMS, "application/json", wrong_type.to_string().into_bytes()).await;
    assert_eq!(code, 400);
    assert!(status["message"].as_str().unwrap().contains("cannot be handled as a ConfigMap"), "{status}");

    let (code, _) = raw(&client, "POST", CMS, "text/csv", b"a,b".to_vec()).await;
    assert_eq!(code, 415);

    let (code, list) = raw(&client, "GET", CMS, "application/json", vec![]).await;
    assert_eq!(code, 200);
    // Only what the controllers put in every namespace.
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .filter(|n| *n != "kube-root-ca.crt")
        .collect();
    assert!(names.is_empty(), "nothing was written: {names:?}");
}

#[tokio::test]
async fn invalid_names_missing_namespaces_and_huge_bodies() {
    let server = TestServer::start();
    let client = server.client().await;

    let bad_name = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Bad_Name"}});
    let (code, status) = raw(&client, "POST", CMS, "application/json", bad_name.to_string().into_bytes()).await;
    assert_eq!((code, status["reason"].as_str()), (422, Some("Invalid")), "{status}");
    assert_eq!(status["details"]["causes"][0]["field"], "metadata.name");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .starts_with("ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value"),
        "{status}"
    );

    let no_ns = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
    let (code, status) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/missing/configmaps",
        "application/json",
        no_ns.to_string().into_bytes(),
    )
    .await;
    assert_eq!((code, status["message"].as_str()), (404, Some("namespaces \"missing\" not found")));

    let invalid_deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"replicas": -1, "selector": {"matchLabels": {"app": "a"}},
                 "template": {"metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "c"}]}}}});
    let (code, status) = raw(
        &client,
        "POST",
        "/apis/apps/v1/namespaces/default/deployments",
        "application/json",
        invalid_deploy.to_string().into_bytes(),
    )
    .await;
    assert_eq!(code, 422, "{status}");
    let fields: Vec<&str> =
        status["details"]["causes"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap()).collect();
    for f in ["spec.replicas", "spec.template.metadata.labels", "spec.template.spec.containers[0].image"] {
        assert!(fields.contains(&f), "{f} in {fields:?}");
    }

    let big = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"}, "data": {"k": "x".repeat(3 * 1024 * 1024 + 10)}});
    let (code, status) = raw(&client, "POST", CMS, "application/json", big.to_string().into_bytes()).await;
    assert_eq!((code, status["reason"].as_str()), (413, Some("RequestEntityTooLarge")), "{status}");

    let (code, _) = raw(&client, "GET", "/api/v1/namespaces/default/nosuchthings", "application/json", vec![]).await;
    assert_eq!(code, 404);
    let (code, _) = raw(
        &client,
        "GET",
        "/api/v1/namespaces/default/configmaps?labelSelector=a%20in%20b",
        "application/json",
        vec![],
    )
    .await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn stale_updates_unknown_fields_and_bad_patches() {
    let server = TestServer::start();
    let client = server.client().await;
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}});
    let (code, created) = raw(&client, "POST", CMS, "application/json", body.to_string().into_bytes()).await;
    assert_eq!(code, 201);
    let rv = created["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let mut changed = body.clone();
    changed["data"]["a"] = json!("2");
    let (code, _) =
        raw(&client, "PUT", &format!("{CMS}/c"), "application/json", changed.to_string().into_bytes()).await;
    assert_eq!(code, 200, "an update without resourceVersion is unconditional");

    let mut stale = body.clone();
    stale["metadata"]["resourceVersion"] = json!(rv);
    let (code, status) =
        raw(&client, "PUT", &format!("{CMS}/c"), "application/json", stale.to_string().into_bytes()).await;
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));

    let unknown = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "u"}, "bogus": 1});
    let (code, status) = raw(
        &client,
        "POST",
        &format!("{CMS}?fieldValidation=Strict"),
        "application/json",
        unknown.to_string().into_bytes(),
    )
    .await;
    assert_eq!(code, 400);
    assert!(status["message"].as_str().unwrap().contains("strict decoding error: unknown field \"bogus\""), "{status}");
    // A strict server-side apply fails as upstream's field manager does.
    let (code, status) = raw(
        &client,
        "PATCH",
        &format!("{CMS}/u?fieldValidation=Strict&fieldManager=golden"),
        "application/apply-patch+yaml",
        unknown.to_string().into_bytes(),
    )
    .await;
    assert_eq!(code, 400, "{status}");
    assert_eq!(
        status["message"],
        "failed to create typed patch object (default/u; /v1, Kind=ConfigMap): .bogus: field not declared in schema"
    );
    let (code, stored) = raw(
        &client,
        "POST",
        &format!("{CMS}?fieldValidation=Ignore"),
        "application/json",
        unknown.to_string().into_bytes(),
    )
    .await;
    assert_eq!(code, 201);
    assert!(stored.get("bogus").is_none(), "unknown fields are pruned");
    let duplicate =
        br#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "d"}, "data": {"a": "1", "a": "2"}}"#;
    let (code, status) =
        raw(&client, "POST", &format!("{CMS}?fieldValidation=Strict"), "application/json", duplicate.to_vec()).await;
    assert_eq!(code, 400);
    assert!(
        status["message"].as_str().unwrap().contains("strict decoding error: duplicate field \"data.a\""),
        "{status}"
    );
    let (code, stored) =
        raw(&client, "POST", &format!("{CMS}?fieldValidation=Warn"), "application/json", duplicate.to_vec()).await;
    assert_eq!((code, &stored["data"]), (201, &json!({"a": "2"})), "Warn keeps the last value, as upstream");
    // A strategic merge patch whose list element lacks the merge key.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i:1"}]}});
    let (code, _) =
        raw(&client, "POST", "/api/v1/namespaces/default/pods", "application/json", pod.to_string().into_bytes()).await;
    assert_eq!(code, 201);
    let keyless = br#"{"spec": {"containers": [{"image": "i:2"}]}}"#;
    let (code, status) = raw(
        &client,
        "PATCH",
        "/api/v1/namespaces/default/pods/p",
        "application/strategic-merge-patch+json",
        keyless.to_vec(),
    )
    .await;
    assert_eq!(code, 400, "{status}");
    assert!(status["message"].as_str().unwrap().contains("does not contain declared merge key: name"), "{status}");
    let (_, got) = raw(&client, "GET", "/api/v1/namespaces/default/pods/p", "application/json", vec![]).await;
    assert_eq!(got["spec"]["containers"][0]["image"], "i:1");

    let (code, _) =
        raw(&client, "PATCH", &format!("{CMS}/c"), "application/json-patch+json", b"{\"op\":1}".to_vec()).await;
    assert_eq!(code, 400);
    let (code, _) = raw(
        &client,
        "PATCH",
        &format!("{CMS}/c"),
        "application/json-patch+json",
        br#"[{"op":"test","path":"/data/a","value":"nope"}]"#.to_vec(),
    )
    .await;
    assert_eq!(code, 422);
    let (code, _) = raw(&client, "PATCH", &format!("{CMS}/c"), "application/xml", b"<x/>".to_vec()).await;
    assert_eq!(code, 415);
    let (code, _) =
        raw(&client, "PATCH", &format!("{CMS}/missing"), "application/merge-patch+json", b"{}".to_vec()).await;
    assert_eq!(code, 404);
    let (code, _) = raw(
        &client,
        "DELETE",
        "/api/v1/namespaces/default/configmaps/c",
        "application/json",
        br#"{"preconditions":{"uid":"wrong"}}"#.to_vec(),
    )
    .await;
    assert_eq!(code, 409);

    let (_, got) = raw(&client, "GET", &format!("{CMS}/c"), "application/json", vec![]).await;
    assert_eq!(got["data"], json!({"a": "2"}), "failed writes changed nothing");
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[tokio::test]
async fn anonymous_requests_are_forbidden_except_health() {
    let server = TestServer::start();
    // A client that trusts the cluster CA but presents no certificate.
    let admin = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(server.kubeconfig()).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let mut config = kube::Config::new(admin.cluster_url.clone());
    config.root_cert = admin.root_cert.clone();
    let anonymous = kube::Client::try_from(config).unwrap();
    let (code, body) = raw(&anonymous, "GET", "/readyz", "application/json", vec![]).await;
    assert_eq!((code, body), (200, json!("ok")));
    let (code, _) = raw(&anonymous, "GET", "/version", "application/json", vec![]).await;
    assert_eq!(code, 200);
    let (code, status) = raw(&anonymous, "GET", CMS, "application/json", vec![]).await;
    assert_eq!((code, status["reason"].as_str()), (403, Some("Forbidden")), "{status}");
    assert!(status["message"].as_str().unwrap().contains("system:anonymous"), "{status}");
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
    let (code, _) = raw(&anonymous, "POST", CMS, "application/json", body.to_string().into_bytes()).await;
    assert_eq!(code, 403, "no anonymous writes");
}

/// Bad node agent flags stop `krate server` before it serves anything, saying what is wrong.
#[test]
fn bad_agent_flags_are_refused_at_start() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["--eviction-hard", "disk.free<1Gi"],
            "unknown eviction signal \"disk.free\"; known signals: memory.available",
        ),
        (&["--eviction-hard", "nodefs.available<lots"], "is not a quantity (like 100Mi) or a percentage"),
        (
            &["--eviction-pressure-transition-period", "5 minutes"],
            "--eviction-pressure-transition-period: \"5 minutes\" is not a duration",
        ),
        (
            &["--image-gc-high-threshold", "70", "--image-gc-low-threshold", "90"],
            "--image-gc-low-threshold (90) must not be above --image-gc-high-threshold (70)",
        ),
        (&["--shutdown-grace-period", "10s", "--shutdown-grace-period-critical-pods", "20s"], "cannot be longer"),
    ];
    for (args, message) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_krate"))
            .args(["server", "--port", &common::free_port().to_string(), "--data-dir"])
            .arg(dir.path())
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{args:?}: the server started instead of refusing the flags");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success() && stderr.contains(message), "{args:?}: {stderr}");
        assert!(!dir.path().join("admin.kubeconfig").exists(), "{args:?}: nothing was started");
    }
}

/// The response's status and exact body, a JSON request's.
async fn raw_bytes(client: &kube::Client, method: &str, path: &str, body: &str) -> (u16, String) {
    common::raw_text(client, method, path, "application/json", body.as_bytes().to_vec()).await
}

#[tokio::test]
async fn statuses_are_byte_for_byte_upstreams() {
    let server = TestServer::start();
    let client = server.client().await;
    // Golden bodies, as kube-apiserver writes them (field order of the Go struct, newline).
    let (code, body) = raw_bytes(&client, "GET", "/api/v1/namespaces/default/configmaps/x", "").await;
    assert_eq!(
        (code, body.as_str()),
        (
            404,
            "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\",\"message\":\"configmaps \\\"x\\\" not found\",\"reason\":\"NotFound\",\"details\":{\"name\":\"x\",\"kind\":\"configmaps\"},\"code\":404}\n"
        )
    );
    let cm = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}}"#;
    assert_eq!(raw_bytes(&client, "POST", "/api/v1/namespaces/default/configmaps", cm).await.0, 201);
    let (code, body) = raw_bytes(&client, "POST", "/api/v1/namespaces/default/configmaps", cm).await;
    assert_eq!(
        (code, body.as_str()),
        (
            409,
            "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\",\"message\":\"configmaps \\\"x\\\" already exists\",\"reason\":\"AlreadyExists\",\"details\":{\"name\":\"x\",\"kind\":\"configmaps\"},\"code\":409}\n"
        )
    );
    // Objects end with a newline too.
    let (_, body) = raw_bytes(&client, "GET", "/api/v1/namespaces/default/configmaps/x", "").await;
    assert!(body.ends_with("}\n") && !body.ends_with("}\n\n"), "{body:?}");

    // An eviction's answer: 201 and a bare Success.
    let pod =
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c","image":"i"}]}}"#;
    assert_eq!(raw_bytes(&client, "POST", "/api/v1/namespaces/default/pods", pod).await.0, 201);
    let eviction = r#"{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"p","namespace":"default"}}"#;
    let (code, body) = raw_bytes(&client, "POST", "/api/v1/namespaces/default/pods/p/eviction", eviction).await;
    assert_eq!(
        (code, body.as_str()),
        (201, "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Success\",\"code\":201}\n")
    );
}

#[tokio::test]
async fn a_field_selector_with_non_ascii_characters_is_answered() {
    let server = TestServer::start();
    let client = server.client().await;
    let (code, body) = raw_bytes(
        &client,
        "GET",
        "/api/v1/pods?fieldSelector=metadata.name%3D%C3%A9x%2Cspec.nodeName%21%3D%E6%97%A5",
        "",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"items\":[]"), "{body}");
    assert!(!server.log().contains("panicked"), "the handler panicked");
}

/// Random requests over the API's paths, queries, content types and bodies (a fixed
/// seed, so a failure repeats): every one gets an answer below 500, the log shows no
/// panic, and the server serves as before afterwards.
#[tokio::test]
async fn random_requests_get_answers_and_leave_the_server_healthy() {
    let server = TestServer::start();
    let client = server.client().await;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let paths = [
        "/api/v1/namespaces/default/configmaps",
        "/api/v1/namespaces/default/configmaps/c",
        "/api/v1/namespaces/default/pods",
        "/api/v1/namespaces/default/pods/p",
        "/api/v1/namespaces/default/pods/p/status",
        "/api/v1/namespaces/default/pods/p/eviction",
        "/api/v1/namespaces/default/pods/p/proxy/x",
        "/api/v1/namespaces/default/services/s/proxy/",
        "/api/v1/namespaces/default/serviceaccounts/default/token",
        "/api/v1/nodes",
        "/api/v1/namespaces",
        "/api/v1/namespaces/x%00y",
        "/apis/apps/v1/namespaces/default/deployments/d/scale",
        "/apis/apps/v1/namespaces/default/deployments",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        "/apis/nope/v1/things",
        "/api/v1/componentstatuses",
    ];
    let queries = [
        "",
        "?fieldSelector=metadata.name%3D%C3%A9",
        "?labelSelector=a%20in%20(",
        "?limit=-1",
        "?limit=abc",
        "?continue=%%%",
        "?resourceVersion=abc",
        "?resourceVersionMatch=Exact",
        "?timeoutSeconds=-5",
        "?dryRun=All",
        "?fieldValidation=Nope",
        "?propagationPolicy=Sideways",
        "?gracePeriodSeconds=x",
        "?watch=1&timeoutSeconds=1&resourceVersion=999999999",
    ];
    let types = [
        "application/json",
        "application/yaml",
        "application/vnd.kubernetes.protobuf",
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/json-patch+json",
        "application/apply-patch+yaml",
        "text/plain",
    ];
    let bodies: [&[u8]; 8] = [
        b"",
        b"{",
        b"null",
        b"[{\"op\":\"move\",\"from\":\"/a\",\"path\":\"/a/b\"}]",
        b"{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{\"name\":\"c\"},\"data\":{\"k\":1}}",
        b"k8s\x00\x0a\x05\x0a\x01v\x12\xff\xff",
        b"{\"metadata\":{\"name\":\"\\u0000\"},\"spec\":{\"replicas\":\"many\"}}",
        b"\xff\xfe\xfd",
    ];
    let methods = ["GET", "POST", "PUT", "PATCH", "DELETE"];
    let mut server_errors = Vec::new();
    for _ in 0..600 {
        let method = methods[next(methods.len())];
        let uri = format!("{}{}", paths[next(paths.len())], queries[next(queries.len())]);
        let req = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header("Content-Type", types[next(types.len())])
            .body(kube::client::Body::from(bodies[next(bodies.len())].to_vec()))
            .unwrap();
        let resp = client.send(req).await.unwrap_or_else(|e| panic!("{method} {uri}: the connection failed: {e}"));
        let code = resp.status().as_u16();
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        if code >= 500 {
            server_errors.push(format!("{method} {uri}: {code}"));
        }
    }
    assert!(server_errors.is_empty(), "server errors: {server_errors:#?}");
    assert!(!server.log().contains("panicked"), "a handler panicked:\n{}", server.log());
    server.kubectl_ok(&["create", "configmap", "after", "--from-literal=k=v"]);
    server.kubectl_ok(&["get", "namespace", "kube-system"]);
}

#[tokio::test]
async fn deletes_answer_the_object_where_upstreams_registry_does() {
    let server = TestServer::start();
    let client = server.client().await;
    server.kubectl_ok(&["create", "serviceaccount", "sa"]);
    server.kubectl_ok(&["create", "configmap", "cm"]);
    server.kubectl_ok(&["create", "quota", "q", "--hard=pods=1"]);
    // ServiceAccounts and ResourceQuotas (as Pods, Services, PVs and PVCs, StorageClasses,
    // ...) answer the deleted object; ConfigMaps a Status.
    for (path, kind) in [
        ("/api/v1/namespaces/default/serviceaccounts/sa", "ServiceAccount"),
        ("/api/v1/namespaces/default/resourcequotas/q", "ResourceQuota"),
        ("/api/v1/namespaces/default/configmaps/cm", "Status"),
    ] {
        let (code, body) = raw(&client, "DELETE", path, "application/json", vec![]).await;
        assert_eq!((code, body["kind"].as_str()), (200, Some(kind)), "{path}: {body}");
    }
}

#[tokio::test]
async fn curl_and_pretty_get_indented_answers_in_upstreams_order() {
    let server = TestServer::start();
    let client = server.client().await;
    let get = |agent: &'static str, query: &'static str| {
        let client = client.clone();
        async move {
            let req = http::Request::get(format!("/api/v1/namespaces/default/configmaps/x{query}"))
                .header("User-Agent", agent)
                .body(kube::client::Body::empty())
                .unwrap();
            let resp = client.send(req).await.unwrap();
            let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    };
    let indented = "{\n  \"kind\": \"Status\",\n  \"apiVersion\": \"v1\",\n  \"metadata\": {},\n  \"status\": \"Failure\",\n  \"message\": \"configmaps \\\"x\\\" not found\",\n  \"reason\": \"NotFound\",\n  \"details\": {\n    \"name\": \"x\",\n    \"kind\": \"configmaps\"\n  },\n  \"code\": 404\n}";
    assert_eq!(get("curl/8.5.0", "").await, indented);
    assert_eq!(get("kubectl/v1.37.1", "?pretty=true").await, indented);
    assert!(get("curl/8.5.0", "?pretty=false").await.ends_with("\"code\":404}\n"));
    assert!(get("kubectl/v1.37.1", "").await.ends_with("\"code\":404}\n"));
}

/// Sends two writes on one TLS connection, each body a moment after its headers (as a
/// client streaming it would): the first refused by content negotiation (406) before
/// anything reads its body, the second an ordinary create. Returns what each got.
const TWO_WRITES: &str = r#"
import socket, ssl, sys, time
pki, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tls = ssl.create_default_context(cafile=pki + "/ca.crt")
tls.load_cert_chain(pki + "/admin.crt", pki + "/admin.key")
conn = tls.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1")
body = b'{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}}'
reader = conn.makefile("rb")
for accept in ["text/html", "application/json"]:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: {accept}\r\nContent-Length: {len(body)}\r\n\r\n"
    try:
        conn.sendall(head.encode())
        time.sleep(0.3)
        conn.sendall(body)
        status = reader.readline().split()[1].decode()
        length = 0
        while (line := reader.readline().strip()):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        reader.read(length)
    except (OSError, IndexError) as e:
        status = "dropped"
    print(status)
"#;

#[test]
fn a_write_refused_before_its_body_is_read_keeps_the_connection() {
    let server = TestServer::start();
    let out = std::process::Command::new("python3")
        .args(["-c", TWO_WRITES])
        .arg(server.data_dir().join("pki"))
        .arg(server.port.to_string())
        .arg(CMS)
        .output()
        .expect("run python3");
    let answers = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        answers.split_whitespace().collect::<Vec<_>>(),
        ["406", "201"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

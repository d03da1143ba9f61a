//! API aggregation end to end: an extension API server of the tests' own
//! (`common/extension.rs`) registered by an APIService behind a Service, reached by
//! kubectl through krate with the front proxy's certificate and the user's identity;
//! APIServices that cannot be served show why in their Available condition without
//! breaking discovery of the rest.

mod common;

use common::extension::ExtensionServer;
use common::{holds_within, stderr, TestServer};
use serde_json::{json, Value};

const NAME: &str = "v1alpha1.wardle.example.com";

/// The front proxy's CA and allowed client names, as an extension server reads them.
fn request_header_config(server: &TestServer) -> (String, Vec<String>) {
    let mut config = Value::Null;
    assert!(
        holds_within(30, || {
            let out = server.kubectl(&[
                "get",
                "configmap",
                "-n",
                "kube-system",
                "extension-apiserver-authentication",
                "-o",
                "json",
            ]);
            config = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            out.status.success()
        }),
        "kube-system/extension-apiserver-authentication was never published"
    );
    let data = &config["data"];
    let allowed = serde_json::from_str(data["requestheader-allowed-names"].as_str().unwrap()).unwrap();
    (data["requestheader-client-ca-file"].as_str().unwrap().to_string(), allowed)
}

fn apply(server: &TestServer, object: Value) {
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(&object.to_string()));
    assert!(out.status.success(), "applying {}: {}", object["kind"], stderr(&out));
}

/// An ExternalName Service `wardle` in `default` pointing at this machine.
fn external_service(server: &TestServer) {
    apply(
        server,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "wardle", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "localhost"}}),
    );
}

fn api_service(server: &TestServer, service: &str, port: u16, ca_bundle: &str) {
    apply(
        server,
        json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": NAME},
            "spec": {"group": "wardle.example.com", "version": "v1alpha1", "groupPriorityMinimum": 2000, "versionPriority": 200,
                "service": {"namespace": "default", "name": service, "port": port}, "caBundle": ca_bundle}}),
    );
}

/// The Available condition as `status (reason): message`, once it satisfies `wanted`.
fn available_when(server: &TestServer, wanted: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    let reached = holds_within(60, || {
        let out = server.kubectl(&["get", "apiservice", NAME, "-o", "json"]);
        let object: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let conditions = object["status"]["conditions"].as_array().cloned().unwrap_or_default();
        last = conditions
            .iter()
            .find(|c| c["type"] == "Available")
            .map(|c| {
                format!(
                    "{} ({}): {}",
                    c["status"].as_str().unwrap_or(""),
                    c["reason"].as_str().unwrap_or(""),
                    c["message"].as_str().unwrap_or("")
                )
            })
            .unwrap_or_default();
        wanted(&last)
    });
    assert!(reached, "the APIService's Available condition never became what was wanted; last: {last:?}");
    last
}

#[test]
fn an_extension_api_server_answers_kubectl_through_krate() {
    let server = TestServer::start();
    let (front_proxy_ca, allowed) = request_header_config(&server);
    assert_eq!(allowed, ["front-proxy-client"]);
    let extension = ExtensionServer::start("wardle", "default", &front_proxy_ca, allowed);
    external_service(&server);
    api_service(&server, "wardle", extension.port, &extension.ca_bundle);
    let available = available_when(&server, |c| c.starts_with("True"));
    assert_eq!(available, "True (Passed): all checks passed");

    let listed = server.kubectl_ok(&["get", "apiservices"]);
    let row = listed.lines().find(|l| l.starts_with(NAME)).unwrap_or_default().to_string();
    assert!(row.contains("default/wardle") && row.contains("True"), "{listed}");
    assert!(listed.lines().any(|l| l.starts_with("v1.apps ") && l.contains("Local")), "{listed}");

    let mut resources = String::new();
    assert!(
        holds_within(30, || {
            resources = server.kubectl_ok(&["api-resources", "--api-group", "wardle.example.com"]);
            resources.contains("flunders")
        }),
        "kubectl api-resources never listed flunders: {resources}"
    );
    assert!(resources.contains("fl ") && resources.contains("Flunder"), "{resources}");

    let table = server.kubectl_ok(&["get", "flunders", "-n", "default"]);
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("red-flunder") && row.contains("krate-admin"), "{table}");
    let one = server.get_json(&["flunder", "red-flunder", "-n", "default"]);
    assert_eq!(one["spec"]["reference"], "blue");
    let missing = server.kubectl(&["get", "flunder", "blue-flunder", "-n", "default"]);
    assert!(
        stderr(&missing).contains(r#"flunders.wardle.example.com "blue-flunder" not found"#),
        "{}",
        stderr(&missing)
    );

    // Its OpenAPI documents join krate's: its paths (only its group's) and definitions
    // in v2, its own v3 document for its group/version, which kubectl explain reads.
    let mut v2 = String::new();
    assert!(
        holds_within(30, || {
            v2 = server.kubectl_ok(&["get", "--raw", "/openapi/v2"]);
            v2.contains("com.example.wardle.v1alpha1.Flunder")
        }),
        "the extension server's definitions never reached /openapi/v2"
    );
    assert!(v2.contains("/apis/wardle.example.com/v1alpha1/namespaces/{namespace}/flunders"));
    assert!(!v2.contains("/apis/other.example.com/v1/things"), "another group's path came along");
    assert!(v2.contains("io.k8s.api.core.v1.Pod"), "krate's own definitions are still there");
    let explained = server.kubectl_ok(&["explain", "flunders.spec"]);
    assert!(explained.contains("What the flunder is.") && explained.contains("reference"), "{explained}");

    // krate spoke as the front proxy, for the user kubectl authenticated as.
    let seen = extension.seen();
    let listing = seen.iter().find(|s| s.path.ends_with("/flunders")).expect("the list reached the extension server");
    assert_eq!(listing.client.as_deref(), Some("front-proxy-client"));
    assert_eq!(listing.user.as_deref(), Some("krate-admin"));
    assert!(listing.groups.contains(&"system:masters".to_string()), "{listing:?}");
}

#[test]
fn an_unavailable_api_service_says_why_and_discovery_goes_on() {
    let server = TestServer::start();
    api_service(&server, "wardle", 443, "");
    let missing = available_when(&server, |c| c.starts_with("False"));
    assert_eq!(missing, r#"False (ServiceNotFound): service/wardle in "default" is not present"#);
    let listed = server.kubectl_ok(&["get", "apiservice", NAME]);
    assert!(listed.contains("False (ServiceNotFound)"), "{listed}");

    // A Service whose server is not there: the discovery check fails.
    external_service(&server);
    let closed = common::free_port();
    api_service(&server, "wardle", closed, "");
    let failed = available_when(&server, |c| c.contains("FailedDiscoveryCheck"));
    let expected = format!("False (FailedDiscoveryCheck): failing or missing response from https://localhost:{closed}/apis/wardle.example.com/v1alpha1: ");
    assert!(failed.starts_with(&expected), "{failed}");

    // The rest of the API is discovered and served; the group's own URLs say 503.
    let resources = server.kubectl_ok(&["api-resources"]);
    assert!(resources.lines().any(|l| l.starts_with("pods ")), "{resources}");
    assert!(!resources.contains("flunders"), "{resources}");
    let groups = server.kubectl_ok(&["get", "--raw", "/apis"]);
    assert!(
        groups.contains(r#""name":"wardle.example.com""#),
        "the group list names every APIService's group: {groups}"
    );
    let out = server.kubectl(&["get", "--raw", "/apis/wardle.example.com/v1alpha1/namespaces/default/flunders"]);
    assert!(!out.status.success() && stderr(&out).contains("(ServiceUnavailable)"), "{}", stderr(&out));
    server.kubectl_ok(&["get", "pods", "-A"]);
}

#[test]
fn api_services_are_validated_as_upstream() {
    let server = TestServer::start();
    let bad = json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": "wardle"},
        "spec": {"group": "wardle.example.com", "version": "v1alpha1", "groupPriorityMinimum": 0, "versionPriority": 200,
            "service": {"namespace": "default", "name": "wardle"}}});
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&bad.to_string()));
    let err = stderr(&out);
    assert!(!out.status.success(), "an invalid APIService was accepted");
    assert!(err.contains(r#"metadata.name: Invalid value: "wardle": must be `spec.version+"."+spec.group`: "v1alpha1.wardle.example.com""#), "{err}");
    assert!(err.contains("spec.groupPriorityMinimum: Invalid value: 0: must be positive and less than 20000"), "{err}");
    // A local APIService is Available from its creation.
    let local = server.get_json(&["apiservice", "v1.apps"]);
    assert_eq!(local["status"]["conditions"][0]["reason"], "Local");
    assert_eq!(local["metadata"]["labels"]["kube-aggregator.kubernetes.io/automanaged"], "onstart");
}

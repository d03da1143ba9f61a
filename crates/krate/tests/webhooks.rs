//! Admission webhooks end to end: a real HTTPS webhook server (`common/webhook.rs`)
//! called by the API server for kubectl's requests, with upstream's messages for
//! denials, unreachable webhooks and timeouts.

mod common;

use common::webhook::WebhookServer;
use common::{stderr, TestServer};
use serde_json::{json, Value};

/// One webhook entry for `url`, on `resources` of the core group, CREATE and DELETE.
fn webhook(name: &str, url: &str, ca_bundle: &str, resources: &[&str], extra: Value) -> Value {
    let mut hook = json!({
        "name": name,
        "clientConfig": {"url": url, "caBundle": ca_bundle},
        "rules": [{"operations": ["CREATE", "DELETE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": resources}],
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
    });
    for (k, v) in extra.as_object().unwrap() {
        hook[k] = v.clone();
    }
    hook
}

/// Creates a webhook configuration of `kind` holding `hooks`, and waits until the API
/// server's cache has it (a consistent read).
fn configure(server: &TestServer, kind: &str, name: &str, hooks: Vec<Value>) {
    let config = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": name},
        "webhooks": hooks,
    });
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&config.to_string()));
    assert!(out.status.success(), "creating {kind}: {}", String::from_utf8_lossy(&out.stderr));
    server.kubectl_ok(&["get", &format!("{}s", kind.to_lowercase()), name]);
}

fn create_configmap(server: &TestServer, name: &str, labels: &[&str]) -> std::process::Output {
    let mut labels_json = serde_json::Map::new();
    for label in labels {
        let (k, v) = label.split_once('=').unwrap();
        labels_json.insert(k.into(), json!(v));
    }
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels_json}});
    server.kubectl_stdin(&["create", "-f", "-"], Some(&cm.to_string()))
}

#[test]
fn a_validating_webhook_refuses_with_its_message_and_sees_the_request() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    configure(
        &server,
        "ValidatingWebhookConfiguration",
        "deny",
        vec![webhook("deny.krate.test", &hooks.url("/deny"), &hooks.ca_bundle, &["configmaps"], json!({}))],
    );
    let out = create_configmap(&server, "refused", &["deny=true"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "admission webhook \"deny.krate.test\" denied the request: the object carries the label deny=true"
        ),
        "{}",
        stderr(&out)
    );
    assert!(create_configmap(&server, "accepted", &[]).status.success());
    let reviews = hooks.reviews("/deny");
    let review = reviews.iter().find(|r| r["request"]["name"] == "accepted").expect("the webhook saw the create");
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    let request = &review["request"];
    assert_eq!(request["operation"], "CREATE");
    assert_eq!(request["namespace"], "default");
    assert_eq!(request["kind"], json!({"group": "", "version": "v1", "kind": "ConfigMap"}));
    assert_eq!(request["resource"], json!({"group": "", "version": "v1", "resource": "configmaps"}));
    assert_eq!(request["userInfo"]["username"], "krate-admin");
    assert!(request["userInfo"]["groups"].as_array().unwrap().contains(&json!("system:masters")));
    assert_eq!(request["object"]["metadata"]["name"], "accepted");
    assert_eq!(request["oldObject"], Value::Null);
    assert_eq!(request["options"]["kind"], "CreateOptions");
}

#[test]
fn a_validating_webhook_can_refuse_a_delete() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    assert!(create_configmap(&server, "kept", &["deny=true"]).status.success());
    configure(
        &server,
        "ValidatingWebhookConfiguration",
        "deny",
        vec![webhook("deny.krate.test", &hooks.url("/deny"), &hooks.ca_bundle, &["configmaps"], json!({}))],
    );
    let out = server.kubectl(&["delete", "configmap", "kept"]);
    assert!(stderr(&out).contains("denied the request: the object carries the label deny=true"), "{}", stderr(&out));
    server.kubectl_ok(&["get", "configmap", "kept"]);
    let review = hooks.reviews("/deny").pop().unwrap();
    assert_eq!(review["request"]["operation"], "DELETE");
    assert_eq!(review["request"]["object"], Value::Null);
    assert_eq!(review["request"]["oldObject"]["metadata"]["name"], "kept");
}

#[test]
fn a_mutating_webhook_adds_a_label() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    configure(
        &server,
        "MutatingWebhookConfiguration",
        "mutate",
        vec![webhook("mutate.krate.test", &hooks.url("/mutate"), &hooks.ca_bundle, &["configmaps"], json!({}))],
    );
    assert!(create_configmap(&server, "plain", &[]).status.success());
    let labels = server.kubectl_ok(&["get", "configmap", "plain", "-o", "jsonpath={.metadata.labels}"]);
    assert_eq!(serde_json::from_str::<Value>(&labels).unwrap(), json!({"mutated": "1"}));
}

#[test]
fn a_webhook_asking_to_be_reinvoked_runs_again_after_a_later_change() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    let first = webhook(
        "a.krate.test",
        &hooks.url("/mutate"),
        &hooks.ca_bundle,
        &["configmaps"],
        json!({"reinvocationPolicy": "IfNeeded"}),
    );
    let second = webhook("b.krate.test", &hooks.url("/mutate"), &hooks.ca_bundle, &["configmaps"], json!({}));
    configure(&server, "MutatingWebhookConfiguration", "mutate", vec![first, second]);
    assert!(create_configmap(&server, "twice", &[]).status.success());
    let label = server.kubectl_ok(&["get", "configmap", "twice", "-o", "jsonpath={.metadata.labels.mutated}"]);
    assert_eq!(label, "3", "a, b, then a again");
    assert_eq!(hooks.reviews("/mutate").len(), 3);
}

#[test]
fn a_patched_pod_is_defaulted_again() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    configure(
        &server,
        "MutatingWebhookConfiguration",
        "init",
        vec![webhook("init.krate.test", &hooks.url("/add-init"), &hooks.ca_bundle, &["pods"], json!({}))],
    );
    server.kubectl_ok(&["run", "p", "--image=busybox", "--restart=Never"]);
    let init = server.kubectl_ok(&["get", "pod", "p", "-o", "jsonpath={.spec.initContainers[0]}"]);
    let init: Value = serde_json::from_str(&init).unwrap();
    assert_eq!(init["name"], "webhook-added");
    assert_eq!(init["terminationMessagePolicy"], "File");
    assert_eq!(init["terminationMessagePath"], "/dev/termination-log");
    assert_eq!(init["imagePullPolicy"], "Always");
}

#[test]
fn an_unreachable_webhook_fails_closed_unless_its_policy_is_ignore() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    let down = format!("https://127.0.0.1:{}/allow", common::free_port());
    configure(
        &server,
        "ValidatingWebhookConfiguration",
        "down",
        vec![
            webhook(
                "closed.krate.test",
                &down,
                &hooks.ca_bundle,
                &["configmaps"],
                json!({"objectSelector": {"matchLabels": {"policy": "fail"}}}),
            ),
            webhook("open.krate.test", &down, &hooks.ca_bundle, &["configmaps"], json!({"failurePolicy": "Ignore"})),
        ],
    );
    let out = create_configmap(&server, "closed", &["policy=fail"]);
    let expected = format!(
        "Internal error occurred: failed calling webhook \"closed.krate.test\": failed to call webhook: Post \"{down}?timeout=10s\": "
    );
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    assert!(create_configmap(&server, "open", &[]).status.success(), "Ignore lets the request through");
}

#[test]
fn a_slow_webhook_is_cut_off_at_its_timeout() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    let slow = hooks.url("/slow");
    configure(
        &server,
        "ValidatingWebhookConfiguration",
        "slow",
        vec![webhook("slow.krate.test", &slow, &hooks.ca_bundle, &["configmaps"], json!({"timeoutSeconds": 1}))],
    );
    let out = create_configmap(&server, "late", &[]);
    assert!(
        stderr(&out).contains(&format!("Post \"{slow}?timeout=1s\": context deadline exceeded")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn warnings_from_a_webhook_reach_the_client() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    configure(
        &server,
        "ValidatingWebhookConfiguration",
        "warn",
        vec![webhook("warn.krate.test", &hooks.url("/warn"), &hooks.ca_bundle, &["configmaps"], json!({}))],
    );
    let out = create_configmap(&server, "warned", &[]);
    assert!(out.status.success());
    assert!(stderr(&out).contains("Warning: careful"), "{}", stderr(&out));
}

#[test]
fn match_conditions_select_requests_and_must_compile() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    let conditions =
        json!({"matchConditions": [{"name": "not-skipped", "expression": "object.metadata.name != 'skip-me'"}]});
    configure(
        &server,
        "ValidatingWebhookConfiguration",
        "deny",
        vec![webhook("deny.krate.test", &hooks.url("/deny"), &hooks.ca_bundle, &["configmaps"], conditions)],
    );
    assert!(create_configmap(&server, "skip-me", &["deny=true"]).status.success());
    assert!(!create_configmap(&server, "other", &["deny=true"]).status.success());

    let bad = json!({"matchConditions": [{"name": "bad", "expression": "... [] bad expression"}]});
    let config = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "bad"},
        "webhooks": [webhook("bad.krate.test", &hooks.url("/deny"), &hooks.ca_bundle, &["configmaps"], bad)],
    });
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&config.to_string()));
    assert!(stderr(&out).contains("webhooks[0].matchConditions[0].expression: Invalid value"), "{}", stderr(&out));
    assert!(stderr(&out).contains("compilation failed"), "{}", stderr(&out));
}

#[test]
fn bad_webhook_answers_and_ca_bundles_fail_with_clear_errors() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    let other_ca = WebhookServer::start().ca_bundle;
    configure(
        &server,
        "ValidatingWebhookConfiguration",
        "broken",
        vec![
            webhook(
                "garbage.krate.test",
                &hooks.url("/garbage"),
                &hooks.ca_bundle,
                &["configmaps"],
                json!({"objectSelector": {"matchLabels": {"case": "garbage"}}}),
            ),
            webhook(
                "untrusted.krate.test",
                &hooks.url("/allow"),
                &other_ca,
                &["configmaps"],
                json!({"objectSelector": {"matchLabels": {"case": "untrusted"}}}),
            ),
        ],
    );
    let out = create_configmap(&server, "g", &["case=garbage"]);
    assert!(
        stderr(&out).contains("failed calling webhook \"garbage.krate.test\": received invalid webhook response"),
        "{}",
        stderr(&out)
    );
    let out = create_configmap(&server, "u", &["case=untrusted"]);
    assert!(
        stderr(&out).contains("failed calling webhook \"untrusted.krate.test\": failed to call webhook"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).to_lowercase().contains("certificate"), "{}", stderr(&out));
    assert!(hooks.reviews("/allow").is_empty(), "nothing was sent to a server the bundle does not trust");
}

#[test]
fn webhook_configurations_are_never_sent_to_webhooks_so_a_broken_one_can_be_removed() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    let down = format!("https://127.0.0.1:{}/allow", common::free_port());
    let everything =
        json!({"rules": [{"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*/*"]}]});
    configure(
        &server,
        "ValidatingWebhookConfiguration",
        "everything",
        vec![webhook("everything.krate.test", &down, &hooks.ca_bundle, &["*"], everything)],
    );
    assert!(!create_configmap(&server, "blocked", &[]).status.success());
    server.kubectl_ok(&["delete", "validatingwebhookconfiguration", "everything"]);
    server.kubectl_ok(&["get", "validatingwebhookconfigurations"]);
    assert!(create_configmap(&server, "free", &[]).status.success());
}

fn gadget_crd(hooks: &WebhookServer, path: &str) -> Value {
    let schema = json!({"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}});
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "gadgets.example.com"},
    "spec": {"group": "example.com", "scope": "Namespaced",
        "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
        "conversion": {"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v1"],
            "clientConfig": {"url": hooks.url(path), "caBundle": hooks.ca_bundle}}},
        "versions": [
            {"name": "v1", "served": true, "storage": true, "schema": schema},
            {"name": "v2", "served": true, "storage": false, "schema": schema},
        ]}})
}

#[test]
fn a_conversion_webhook_serves_each_version_converted() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&gadget_crd(&hooks, "/convert").to_string()));
    assert!(out.status.success(), "{}", stderr(&out));
    server.kubectl_ok(&["wait", "--for=condition=Established", "crd/gadgets.example.com"]);
    let served = common::holds_within(10, || server.kubectl(&["get", "gadgets.v2.example.com"]).status.success());
    assert!(served);
    let v1 =
        json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "old"}, "spec": {"replicas": 3}});
    server.kubectl_stdin(&["create", "-f", "-"], Some(&v1.to_string()));
    let as_v2 = server.get_json(&["gadgets.v2.example.com", "old"]);
    assert_eq!(as_v2["apiVersion"], "example.com/v2");
    assert_eq!(as_v2["spec"], json!({"count": 3}));
    assert_eq!(as_v2["metadata"]["labels"]["converted"], "v2", "labels may change in conversion");
    assert_eq!(as_v2["metadata"]["name"], "old");

    let v2 =
        json!({"apiVersion": "example.com/v2", "kind": "Gadget", "metadata": {"name": "new"}, "spec": {"count": 5}});
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&v2.to_string()));
    assert!(out.status.success(), "{}", stderr(&out));
    let as_v1 = server.get_json(&["gadgets.v1.example.com", "new"]);
    assert_eq!(as_v1["spec"], json!({"replicas": 5}), "stored in v1 through the webhook");
    let list = server.get_json(&["gadgets.v2.example.com"]);
    let counts: Vec<&Value> = list["items"].as_array().unwrap().iter().map(|g| &g["spec"]["count"]).collect();
    assert_eq!(counts, vec![&json!(5), &json!(3)]);
    let review = hooks.reviews("/convert").into_iter().next().unwrap();
    assert_eq!(review["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(review["kind"], "ConversionReview");
}

#[test]
fn field_selectors_of_a_converted_version_select_on_its_converted_form() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    // v1 (stored) selects on spec.replicas, v2 on spec.count: a field only the
    // webhook's answer holds.
    let mut crd = gadget_crd(&hooks, "/convert");
    crd["spec"]["versions"][0]["selectableFields"] = json!([{"jsonPath": ".spec.replicas"}]);
    crd["spec"]["versions"][1]["selectableFields"] = json!([{"jsonPath": ".spec.count"}]);
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&crd.to_string()));
    assert!(out.status.success(), "{}", stderr(&out));
    server.kubectl_ok(&["wait", "--for=condition=Established", "crd/gadgets.example.com"]);
    for (name, replicas) in [("three", 3), ("five", 5)] {
        let gadget = json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": name},
            "spec": {"replicas": replicas}});
        let created = common::holds_within(10, || {
            server.kubectl_stdin(&["create", "-f", "-"], Some(&gadget.to_string())).status.success()
        });
        assert!(created, "creating {name}");
    }
    let names = |args: &[&str]| server.kubectl_ok(&[args, &["-o", "name"]].concat());
    assert_eq!(
        names(&["get", "gadgets.v2.example.com", "--field-selector", "spec.count=5"]),
        "gadget.example.com/five\n"
    );
    assert_eq!(
        names(&["get", "gadgets.v1.example.com", "--field-selector", "spec.replicas=3"]),
        "gadget.example.com/three\n"
    );
    assert_eq!(
        names(&["get", "gadgets.v2.example.com", "--field-selector", "spec.count!=5"]),
        "gadget.example.com/three\n"
    );
    // Deleting a collection selects the same way.
    server.kubectl_ok(&["delete", "gadgets.v2.example.com", "--field-selector", "spec.count=3"]);
    assert_eq!(names(&["get", "gadgets.v1.example.com"]), "gadget.example.com/five\n");
}

#[test]
fn a_failing_conversion_webhook_fails_reads_of_other_versions_only() {
    let server = TestServer::start();
    let hooks = WebhookServer::start();
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&gadget_crd(&hooks, "/convert-fail").to_string()));
    assert!(out.status.success(), "{}", stderr(&out));
    server.kubectl_ok(&["wait", "--for=condition=Established", "crd/gadgets.example.com"]);
    let v1 =
        json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}, "spec": {"replicas": 1}});
    let created = common::holds_within(10, || {
        server.kubectl_stdin(&["create", "-f", "-"], Some(&v1.to_string())).status.success()
    });
    assert!(created, "the storage version needs no conversion");
    let out = server.kubectl(&["get", "gadgets.v2.example.com", "g"]);
    assert!(
        stderr(&out).contains(
            "conversion webhook for example.com/v1, Kind=Gadget failed: response.result.status was 'Failure', not 'Success': cannot convert"
        ),
        "{}",
        stderr(&out)
    );
    server.kubectl_ok(&["get", "gadgets.v1.example.com", "g"]);
    server.kubectl_ok(&["delete", "crd", "gadgets.example.com"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_in_a_pod_behind_a_service_refuse_and_mutate() {
    use common::node::{listen_in_pod, running_pods, server_with_agent, wait_node_ready};
    let registry = common::registry::TestRegistry::start();
    let server = server_with_agent(&[&registry], 1, &[]);
    let client = server.client().await;
    wait_node_ready(&client, &server).await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "webhook", "labels": {"app": "webhook"}},
        "spec": {"containers": [{"name": "main", "image": registry.image("busybox"), "command": ["sleep", "3600"]}],
            "terminationGracePeriodSeconds": 0}});
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&pod.to_string()));
    assert!(out.status.success(), "{}", stderr(&out));
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), "default");
    running_pods(&pods, "app=webhook", 1).await;
    // The server answers on the pod's IP, port 8443, as `webhook.default.svc`.
    let hooks = WebhookServer::start_on(listen_in_pod(&server, "webhook", 8443), &["webhook.default.svc"]);
    let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "webhook"},
        "spec": {"selector": {"app": "webhook"}, "ports": [{"port": 443, "targetPort": 8443}]}});
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&service.to_string()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        common::holds_within(30, || server.kubectl_ok(&["get", "endpoints", "webhook"]).contains(":8443")),
        "the Service never got the pod as its endpoint"
    );
    let through_service = |path: &str| json!({"service": {"namespace": "default", "name": "webhook", "path": path}, "caBundle": hooks.ca_bundle});
    let mut deny = webhook("deny.krate.test", "", "", &["configmaps"], json!({}));
    deny["clientConfig"] = through_service("/deny");
    configure(&server, "ValidatingWebhookConfiguration", "deny", vec![deny]);
    let mut mutate = webhook("mutate.krate.test", "", "", &["configmaps"], json!({}));
    mutate["clientConfig"] = through_service("/mutate");
    configure(&server, "MutatingWebhookConfiguration", "mutate", vec![mutate]);

    let out = create_configmap(&server, "refused", &["deny=true"]);
    assert!(
        stderr(&out).contains(
            "admission webhook \"deny.krate.test\" denied the request: the object carries the label deny=true"
        ),
        "{}",
        stderr(&out)
    );
    assert!(create_configmap(&server, "accepted", &[]).status.success());
    let labels = server.get_json(&["configmap", "accepted"])["metadata"]["labels"].clone();
    assert!(labels["mutated"].is_string(), "the mutating webhook's label is on the object: {labels}");
    assert!(!hooks.reviews("/deny").is_empty() && !hooks.reviews("/mutate").is_empty());
}

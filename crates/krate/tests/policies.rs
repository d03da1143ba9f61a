//! CEL in the API end to end through kubectl: ValidatingAdmissionPolicy validations
//! put in force by bindings (upstream's messages, actions, parameters and failure
//! policies), and CRD `x-kubernetes-validations` rules, transition rules included.

mod common;

use common::{stderr, TestServer};
use serde_json::{json, Value};

fn apply(server: &TestServer, object: Value) -> std::process::Output {
    server.kubectl_stdin(&["create", "-f", "-"], Some(&object.to_string()))
}

fn policy(name: &str, spec: Value) -> Value {
    let mut spec = spec;
    spec["matchConstraints"] = json!({"resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
        "operations": ["CREATE", "UPDATE"], "resources": ["deployments"]}]});
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name}, "spec": spec})
}

fn binding(name: &str, policy: &str, spec: Value) -> Value {
    let mut spec = spec;
    spec["policyName"] = json!(policy);
    if spec.get("validationActions").is_none() {
        spec["validationActions"] = json!(["Deny"]);
    }
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name}, "spec": spec})
}

/// Creates the objects and waits until the API server's cache has the binding.
fn put_in_force(server: &TestServer, objects: &[Value]) {
    for object in objects {
        let out = apply(server, object.clone());
        assert!(out.status.success(), "creating {}: {}", object["kind"], stderr(&out));
    }
    server.kubectl_ok(&["get", "validatingadmissionpolicybindings"]);
}

fn deployment(server: &TestServer, namespace: &str, name: &str, replicas: u32) -> std::process::Output {
    let labels = json!({"app": name});
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}});
    apply(server, deployment)
}

#[test]
fn a_policy_bound_to_a_namespace_denies_a_deployment_of_six_replicas() {
    let server = TestServer::start();
    server.kubectl_ok(&["create", "namespace", "limited"]);
    server.kubectl_ok(&["label", "namespace", "limited", "replicas=limited"]);
    server.kubectl_ok(&["create", "namespace", "free"]);
    let validations =
        json!({"validations": [{"expression": "object.spec.replicas <= 5", "message": "at most 5 replicas"}]});
    put_in_force(
        &server,
        &[
            policy("max-replicas", validations),
            binding(
                "max-replicas-limited",
                "max-replicas",
                json!({"matchResources": {"namespaceSelector": {"matchLabels": {"replicas": "limited"}}}}),
            ),
        ],
    );
    let out = deployment(&server, "limited", "big", 6);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "ValidatingAdmissionPolicy 'max-replicas' with binding 'max-replicas-limited' denied request: at most 5 replicas"
        ),
        "{}",
        stderr(&out)
    );
    assert!(deployment(&server, "limited", "small", 5).status.success());
    assert!(deployment(&server, "free", "big", 6).status.success(), "the binding selects only labelled namespaces");
    let out = server.kubectl(&["patch", "deployment", "small", "-n", "limited", "-p", r#"{"spec":{"replicas":7}}"#]);
    assert!(stderr(&out).contains("at most 5 replicas"), "updates are checked too: {}", stderr(&out));
}

#[test]
fn the_denial_is_an_invalid_status_with_the_policys_reason_code() {
    let server = TestServer::start();
    let validations = json!({"validations": [
        {"expression": "object.spec.replicas != 3", "reason": "Forbidden",
         "messageExpression": "'three is not allowed, got ' + string(object.spec.replicas)"},
        {"expression": "object.metadata.name != 'bad'"},
    ]});
    put_in_force(&server, &[policy("p", validations), binding("b", "p", json!({}))]);
    let out = deployment(&server, "default", "three", 3);
    assert!(stderr(&out).contains("Error from server (Forbidden)"), "{}", stderr(&out));
    assert!(stderr(&out).contains("denied request: three is not allowed, got 3"), "{}", stderr(&out));
    let out = deployment(&server, "default", "bad", 1);
    assert!(
        stderr(&out).contains("denied request: failed expression: object.metadata.name != 'bad'"),
        "{}",
        stderr(&out)
    );
    // No reason is Invalid (422), which kubectl reports as such.
    assert!(stderr(&out).contains("The deployments \"bad\" is invalid"), "{}", stderr(&out));
}

#[test]
fn variables_parameters_and_warnings() {
    let server = TestServer::start();
    server.kubectl_ok(&["create", "configmap", "limits", "--from-literal=max=2"]);
    let mut spec = json!({
        "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
        "variables": [{"name": "max", "expression": "int(params.data.max)"}],
        "validations": [{"expression": "object.spec.replicas <= variables.max",
            "messageExpression": "'at most ' + string(variables.max)"}],
    });
    spec["failurePolicy"] = json!("Fail");
    put_in_force(
        &server,
        &[
            policy("from-params", spec),
            binding(
                "warn-only",
                "from-params",
                json!({"validationActions": ["Warn"],
                "paramRef": {"name": "limits", "namespace": "default", "parameterNotFoundAction": "Deny"}}),
            ),
        ],
    );
    let out = deployment(&server, "default", "three", 3);
    assert!(out.status.success(), "Warn does not refuse: {}", stderr(&out));
    assert!(
        stderr(&out).contains("Warning: Validation failed for ValidatingAdmissionPolicy 'from-params' with binding 'warn-only': at most 2"),
        "{}",
        stderr(&out)
    );
    put_in_force(
        &server,
        &[binding(
            "missing-params",
            "from-params",
            json!({
            "paramRef": {"name": "absent", "namespace": "default", "parameterNotFoundAction": "Deny"}}),
        )],
    );
    let out = deployment(&server, "default", "one", 1);
    assert!(
        stderr(&out).contains("no params found for policy binding with `Deny` parameterNotFoundAction"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn expressions_that_do_not_compile_are_refused_and_failing_ones_follow_the_failure_policy() {
    let server = TestServer::start();
    let out = apply(&server, policy("broken", json!({"validations": [{"expression": "object.spec.replicas <="}]})));
    assert!(stderr(&out).contains("spec.validations[0].expression: Invalid value"), "{}", stderr(&out));
    assert!(stderr(&out).contains("compilation failed"), "{}", stderr(&out));
    let out = apply(&server, policy("unknown", json!({"validations": [{"expression": "foo.bar == 1"}]})));
    assert!(stderr(&out).contains("undeclared reference to 'foo'"), "{}", stderr(&out));

    let failing = |policy_name: &str, failure: &str| {
        policy(
            policy_name,
            json!({"failurePolicy": failure, "validations": [{"expression": "object.spec.missing == 1"}]}),
        )
    };
    put_in_force(&server, &[failing("closed", "Fail"), binding("closed", "closed", json!({}))]);
    let out = deployment(&server, "default", "refused", 1);
    assert!(stderr(&out).contains("expression 'object.spec.missing == 1' resulted in error"), "{}", stderr(&out));
    server.kubectl_ok(&["delete", "validatingadmissionpolicybinding", "closed"]);
    put_in_force(&server, &[failing("open", "Ignore"), binding("open", "open", json!({}))]);
    assert!(deployment(&server, "default", "allowed", 1).status.success());
}

fn widget_crd(rules: Value) -> Value {
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object", "properties": {"spec": {"type": "object", "x-kubernetes-validations": rules,
                    "properties": {"replicas": {"type": "integer"},
                        "tags": {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}}}}}}}}}]}})
}

fn widget(server: &TestServer, verb: &str, replicas: i64) -> std::process::Output {
    let widget = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"replicas": replicas}});
    server.kubectl_stdin(&[verb, "-f", "-"], Some(&widget.to_string()))
}

#[test]
fn crd_validation_rules_refuse_violations_and_transition_rules_judge_updates() {
    let server = TestServer::start();
    let costly = widget_crd(json!([{"rule": "self.tags.all(a, a.all(b, b.all(c, c == 'x')))"}]));
    let out = apply(&server, costly);
    assert!(
        stderr(&out).contains("estimated rule cost exceeds budget by factor of more than 100x"),
        "{}",
        stderr(&out)
    );
    let broken = widget_crd(json!([{"rule": "self.replicas <"}]));
    assert!(stderr(&apply(&server, broken)).contains("compilation failed"));

    let rules = json!([
        {"rule": "self.replicas <= 10", "message": "at most 10 replicas"},
        {"rule": "self.replicas >= oldSelf.replicas", "message": "replicas may not decrease"},
    ]);
    assert!(apply(&server, widget_crd(rules)).status.success());
    server.kubectl_ok(&["wait", "--for=condition=Established", "crd/widgets.example.com"]);
    let served = common::holds_within(10, || server.kubectl(&["get", "widgets"]).status.success());
    assert!(served, "widgets are served once the CRD is established");

    let out = widget(&server, "create", 20);
    assert!(
        stderr(&out).contains("The Widget \"w\" is invalid: spec: Invalid value: at most 10 replicas"),
        "{}",
        stderr(&out)
    );
    assert!(widget(&server, "create", 3).status.success());
    assert!(widget(&server, "replace", 5).status.success(), "the transition rule allows an increase");
    let out = widget(&server, "replace", 2);
    assert!(stderr(&out).contains("spec: Invalid value: replicas may not decrease"), "{}", stderr(&out));
    let replicas = server.kubectl_ok(&["get", "widget", "w", "-o", "jsonpath={.spec.replicas}"]);
    assert_eq!(replicas, "5");
}

fn mutating_policy(name: &str, mutations: Value) -> Value {
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {"matchConstraints": {"resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
            "operations": ["CREATE"], "resources": ["deployments"]}]}, "mutations": mutations}})
}

fn mutating_binding(name: &str, policy: &str) -> Value {
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": name}, "spec": {"policyName": policy}})
}

#[test]
fn mutating_policies_apply_configurations_and_json_patches() {
    let server = TestServer::start();
    let scale = json!([{"patchType": "ApplyConfiguration", "applyConfiguration": {
        "expression": "Object{spec: Object.spec{replicas: object.spec.replicas + 10}}"}}]);
    let patch = json!([{"patchType": "JSONPatch", "jsonPatch": {
        "expression": r#"[JSONPatch{op: "add", path: "/metadata/annotations", value: {"mutated-by": "admission-policy"}}]"#}}]);
    for object in [
        mutating_policy("a-scale", scale),
        mutating_binding("a-scale", "a-scale"),
        mutating_policy("b-annotate", patch),
        mutating_binding("b-annotate", "b-annotate"),
    ] {
        let out = apply(&server, object);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    server.kubectl_ok(&["get", "mutatingadmissionpolicybindings"]);
    assert!(deployment(&server, "default", "d", 2).status.success());
    let got = server.get_json(&["deployment", "d"]);
    assert_eq!(got["spec"]["replicas"], 12);
    assert_eq!(got["metadata"]["annotations"]["mutated-by"], "admission-policy");
    assert_eq!(got["spec"]["strategy"]["type"], "RollingUpdate", "the mutated object is defaulted");

    let broken = json!([{"patchType": "ApplyConfiguration", "applyConfiguration": {"expression": "Object{spec: "}}]);
    let out = apply(&server, mutating_policy("broken", broken));
    assert!(
        stderr(&out).contains("spec.mutations[0].applyConfiguration.expression: Invalid value"),
        "{}",
        stderr(&out)
    );
}

//! The API machinery stock clients lean on, driven by kubectl: client-side apply
//! (strategic merge patch), server-side apply, tables, explain, edit, diff, server
//! dry-run and CustomResourceDefinitions.

mod common;

use common::{stderr, TestServer};
use serde_json::json;

fn deployment(containers: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
{containers}"#
    )
}

const TWO_CONTAINERS: &str = r#"      - name: app
        image: app:1
        env:
        - {name: A, value: "1"}
        - {name: B, value: "2"}
      - name: sidecar
        image: sidecar:1
"#;

const EDITED: &str = r#"      - name: sidecar
        image: sidecar:1
      - name: app
        image: app:2
        env:
        - {name: A, value: "1"}
"#;

#[test]
fn client_side_apply_three_way_merge() {
    let server = TestServer::start();
    let file = server.dir.path().join("web.yaml");
    let path = file.to_str().unwrap();
    std::fs::write(&file, deployment(TWO_CONTAINERS)).unwrap();
    server.kubectl_ok(&["apply", "-f", path]);
    // Someone else adds a field the manifest does not mention; apply must keep it.
    server.kubectl_ok(&[
        "patch",
        "deploy",
        "web",
        "--type",
        "strategic",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"app","resources":{"limits":{"cpu":"1"}}}]}}}}"#,
    ]);

    // Change an image, remove an env var, reorder the containers.
    std::fs::write(&file, deployment(EDITED)).unwrap();
    let out = server.kubectl_ok(&["apply", "-f", path]);
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    let d = server.get_json(&["deploy", "web"]);
    let containers = &d["spec"]["template"]["spec"]["containers"];
    let names: Vec<&str> = containers.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["sidecar", "app"], "reordered as the manifest says");
    let app = &containers[1];
    assert_eq!(app["image"], "app:2");
    assert_eq!(app["env"], json!([{"name": "A", "value": "1"}]), "B removed by the three-way merge");
    assert_eq!(app["resources"], json!({"limits": {"cpu": "1"}}), "fields applied by others survive");
    assert_eq!(app["imagePullPolicy"], "IfNotPresent");
    assert_eq!(app["terminationMessagePath"], "/dev/termination-log");
    assert_eq!(d["metadata"]["generation"], 3);

    // Re-applying the same manifest changes nothing.
    let again = server.kubectl_ok(&["apply", "-f", path]);
    assert!(again.contains("deployment.apps/web unchanged"), "{again}");

    // Switching to Recreate drops rollingUpdate ($retainKeys), as upstream.
    let recreate = deployment(EDITED).replace("  replicas: 1\n", "  replicas: 1\n  strategy: {type: Recreate}\n");
    std::fs::write(&file, recreate).unwrap();
    server.kubectl_ok(&["apply", "-f", path]);
    let d = server.get_json(&["deploy", "web"]);
    assert_eq!(d["spec"]["strategy"], json!({"type": "Recreate"}));
}

#[test]
fn server_side_apply_with_two_managers() {
    let server = TestServer::start();
    let file = server.dir.path().join("web.yaml");
    let path = file.to_str().unwrap();
    std::fs::write(&file, deployment(TWO_CONTAINERS)).unwrap();
    let out = server.kubectl_ok(&["apply", "--server-side", "--field-manager", "team-a", "-f", path]);
    assert!(out.contains("deployment.apps/web serverside-applied"), "{out}");

    let changed = deployment(TWO_CONTAINERS).replace("replicas: 1", "replicas: 5");
    std::fs::write(&file, changed).unwrap();
    let conflict = server.kubectl(&["apply", "--server-side", "--field-manager", "team-b", "-f", path]);
    assert!(!conflict.status.success());
    assert!(
        stderr(&conflict)
            .contains(r#"Apply failed with 1 conflict: conflict with "team-a" using apps/v1: .spec.replicas"#),
        "{}",
        stderr(&conflict)
    );
    assert_eq!(server.get_json(&["deploy", "web"])["spec"]["replicas"], 1, "nothing was written");

    server.kubectl_ok(&["apply", "--server-side", "--field-manager", "team-b", "--force-conflicts", "-f", path]);
    let d = server.get_json(&["deploy", "web", "--show-managed-fields"]);
    assert_eq!(d["spec"]["replicas"], 5);
    let managed = d["metadata"]["managedFields"].as_array().unwrap();
    let entry = |m: &str| managed.iter().find(|e| e["manager"] == m).unwrap_or_else(|| panic!("{m} in {managed:?}"));
    assert_eq!(entry("team-b")["operation"], "Apply");
    assert!(entry("team-b")["fieldsV1"]["f:spec"]["f:replicas"].is_object());
    assert!(entry("team-a")["fieldsV1"]["f:spec"].get("f:replicas").is_none(), "team-a lost spec.replicas");
    // Both still share the container image (same value: no conflict).
    let image = |m: &str| {
        entry(m)["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"app\"}"]["f:image"]
            .clone()
    };
    assert!(image("team-a").is_object() && image("team-b").is_object());

    // Without --show-managed-fields kubectl hides them, as upstream.
    let plain = server.kubectl_ok(&["get", "deploy", "web", "-o", "yaml"]);
    assert!(!plain.contains("managedFields"), "{plain}");
}

#[test]
fn tables_explain_edit_diff_and_server_dry_run() {
    let server = TestServer::start();
    server.kubectl_ok(&["create", "deployment", "web", "--image=nginx:1", "--replicas=2"]);
    server.kubectl_ok(&["run", "solo", "--image=busybox", "--restart=Never"]);

    let pods = server.kubectl_ok(&["get", "pods"]);
    let header: Vec<&str> = pods.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "STATUS", "RESTARTS", "AGE"], "{pods}");
    assert!(pods.contains("solo") && pods.contains("0/1") && pods.contains("Pending"), "{pods}");
    let wide = server.kubectl_ok(&["get", "deploy", "-o", "wide"]);
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE", "CONTAINERS", "IMAGES", "SELECTOR"],
        "{wide}"
    );
    assert!(wide.contains("nginx:1") && wide.contains("app=web"), "{wide}");

    let explained = server.kubectl_ok(&["explain", "deployment.spec.strategy"]);
    assert!(
        explained.contains("The deployment strategy to use to replace existing pods with new ones."),
        "{explained}"
    );
    assert!(explained.contains("rollingUpdate") && explained.contains("<RollingUpdateDeployment>"), "{explained}");

    // kubectl edit with a scripted editor.
    let editor = server.dir.path().join("editor.sh");
    std::fs::write(&editor, "#!/bin/sh\nsed -i 's/replicas: 2/replicas: 4/' \"$1\"\n").unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&editor).unwrap().permissions(), 0o755);
    std::process::Command::new("chmod").args(["+x", editor.to_str().unwrap()]).status().unwrap();
    let out = std::process::Command::new(common::kubectl_path())
        .args(["edit", "deploy", "web"])
        .env("KUBECONFIG", server.kubeconfig())
        .env("KUBE_EDITOR", &editor)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let d = server.get_json(&["deploy", "web", "--show-managed-fields"]);
    assert_eq!(d["spec"]["replicas"], 4);
    let managers: Vec<&str> =
        d["metadata"]["managedFields"].as_array().unwrap().iter().map(|e| e["manager"].as_str().unwrap()).collect();
    assert!(managers.contains(&"kubectl-create") && managers.contains(&"kubectl-edit"), "{managers:?}");

    // kubectl diff asks the server for a dry-run apply; exit code 1 means "differs".
    let manifest = server.dir.path().join("cm.yaml");
    std::fs::write(&manifest, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {color: blue}\n")
        .unwrap();
    server.kubectl_ok(&["apply", "-f", manifest.to_str().unwrap()]);
    std::fs::write(&manifest, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {color: red}\n")
        .unwrap();
    let diff = server.kubectl(&["diff", "-f", manifest.to_str().unwrap()]);
    assert_eq!(diff.status.code(), Some(1), "{}", stderr(&diff));
    let text = String::from_utf8_lossy(&diff.stdout);
    assert!(text.contains("-  color: blue") && text.contains("+  color: red"), "{text}");
    assert_eq!(
        server.kubectl_ok(&["get", "cm", "settings", "-o", "jsonpath={.data.color}"]),
        "blue",
        "diff wrote nothing"
    );

    let dry = server.kubectl_ok(&[
        "create",
        "configmap",
        "ghost",
        "--from-literal=a=b",
        "--dry-run=server",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    assert!(!dry.is_empty(), "server dry-run returns a defaulted object");
    assert!(!server.kubectl(&["get", "cm", "ghost"]).status.success(), "and stores nothing");

    // deletecollection.
    server.kubectl_ok(&["create", "configmap", "extra", "--from-literal=a=b"]);
    let out = server.kubectl_ok(&["delete", "configmaps", "--all"]);
    assert!(out.contains("\"settings\" deleted") && out.contains("\"extra\" deleted"), "{out}");
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd], categories: [all]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Color, type: string, jsonPath: .spec.color}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10, description: How big the widget is.}
              color: {type: string, default: blue}
              replicas: {type: integer}
              extra: {type: object, x-kubernetes-preserve-unknown-fields: true}
          status:
            type: object
            properties:
              replicas: {type: integer}
  - name: v1beta1
    served: true
    storage: false
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

#[test]
fn custom_resource_definitions_with_kubectl() {
    let server = TestServer::start();
    server.kubectl_stdin(&["apply", "-f", "-"], Some(CRD));
    server.kubectl_ok(&["wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=20s"]);
    assert!(server.kubectl_ok(&["api-resources", "--api-group=example.com"]).contains("widgets"));
    let crds = server.kubectl_ok(&["get", "crds"]);
    assert!(crds.starts_with("NAME") && crds.lines().next().unwrap().contains("CREATED AT"), "{crds}");
    assert!(crds.contains("widgets.example.com"), "{crds}");

    let widget = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3, extra: {deep: {kept: true}}}\n";
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(widget));
    assert!(out.status.success(), "{}", stderr(&out));
    let table = server.kubectl_ok(&["get", "wd"]);
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows,
        [vec!["NAME", "SIZE", "COLOR"], vec!["w1", "3", "blue"]],
        "printer columns and the defaulted color"
    );
    let w = server.get_json(&["widget", "w1"]);
    assert_eq!(w["spec"]["extra"]["deep"]["kept"], true, "x-kubernetes-preserve-unknown-fields");
    assert!(server.kubectl_ok(&["get", "all"]).contains("widget.example.com/w1"), "category all");
    assert!(server.kubectl_ok(&["explain", "widget.spec.size"]).contains("How big the widget is."));
    let beta = server.kubectl_ok(&["get", "widgets.v1beta1.example.com", "w1", "-o", "jsonpath={.apiVersion}"]);
    assert_eq!(beta, "example.com/v1beta1");

    // Subresources.
    server.kubectl_ok(&["scale", "widget", "w1", "--replicas=4"]);
    server.kubectl_ok(&[
        "patch",
        "widget",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"replicas":4}}"#,
    ]);
    assert_eq!(
        server.kubectl_ok(&["get", "widget", "w1", "-o", "jsonpath={.spec.replicas}/{.status.replicas}"]),
        "4/4"
    );

    // Objects that break the schema are refused with every problem listed.
    let bad = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w2}\nspec: {size: 30, color: 5}\n";
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(bad));
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("spec.size: Invalid value: 30: spec.size in body should be less than or equal to 10"),
        "{err}"
    );
    assert!(
        err.contains(r#"spec.color: Invalid value: "integer": spec.color in body must be of type string: "integer""#),
        "{err}"
    );
    let unknown = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w3}\nspec: {size: 1, bogus: 1}\n";
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(unknown));
    assert!(stderr(&out).contains(r#"unknown field "spec.bogus""#), "{}", stderr(&out));
    assert_eq!(
        server.kubectl_ok(&["get", "widgets", "-o", "name"]).trim(),
        "widget.example.com/w1",
        "nothing half-written"
    );
    // Strategic merge patch is not supported for custom resources, as upstream.
    let smp = server.kubectl(&["patch", "widget", "w1", "--type=strategic", "-p", r#"{"spec":{"size":2}}"#]);
    assert!(!smp.status.success(), "strategic merge patch of a custom resource must fail");
    assert!(stderr(&smp).contains("accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"), "{}", stderr(&smp));

    // An invalid schema is refused.
    let broken = CRD.replace("size: {type: integer,", "size: {type: intger,");
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(&broken));
    assert!(stderr(&out).contains(r#"spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[size].type: Unsupported value: "intger""#), "{}", stderr(&out));

    // Deleting the CRD deletes its objects and stops serving the resource.
    server.kubectl_ok(&["delete", "crd", "widgets.example.com", "--timeout=30s"]);
    assert!(!server.kubectl_ok(&["api-resources"]).contains("widgets"));
    let raw = server.kubectl(&["get", "--raw", "/apis/example.com/v1/namespaces/default/widgets"]);
    assert!(!raw.status.success());
    // Recreating it shows no leftovers.
    server.kubectl_stdin(&["apply", "-f", "-"], Some(CRD));
    server.kubectl_ok(&["wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=20s"]);
    assert_eq!(server.kubectl_ok(&["get", "widgets", "-o", "name"]).trim(), "");
}

#[test]
fn objects_stored_before_a_storage_version_change_are_served_in_each_version() {
    let server = TestServer::start();
    let crd = |storage: &str| {
        let schema = json!({"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}});
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "things", "singular": "thing", "kind": "Thing"},
            "versions": [
                {"name": "v1", "served": true, "storage": storage == "v1", "schema": schema},
                {"name": "v2", "served": true, "storage": storage == "v2", "schema": schema},
            ]}})
    };
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(&crd("v1").to_string()));
    assert!(out.status.success(), "{}", stderr(&out));
    server.kubectl_ok(&["wait", "--for=condition=Established", "crd/things.example.com"]);
    let thing = json!({"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "t"}, "spec": {"n": 1}});
    let created = common::holds_within(10, || {
        server.kubectl_stdin(&["create", "-f", "-"], Some(&thing.to_string())).status.success()
    });
    assert!(created);
    let out = server.kubectl_stdin(&["apply", "-f", "-"], Some(&crd("v2").to_string()));
    assert!(out.status.success(), "{}", stderr(&out));
    // Whether or not the server has switched yet, each version serves the object as its own.
    for version in ["v1", "v2"] {
        let got = server.get_json(&[&format!("things.{version}.example.com"), "t"]);
        assert_eq!(got["apiVersion"], format!("example.com/{version}"));
    }
    server.kubectl_ok(&[
        "patch",
        "things.v2.example.com",
        "t",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/m","value":2}]"#,
    ]);
    let got = server.get_json(&["things.v2.example.com", "t"]);
    assert_eq!(got["spec"], json!({"n": 1, "m": 2}));
}

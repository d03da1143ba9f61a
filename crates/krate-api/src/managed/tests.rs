use serde_json::json;

use super::*;
use crate::schema::builtin_kind;

fn manager(name: &str) -> Manager<'_> {
    Manager { name, api_version: "apps/v1", subresource: None, ignore_status: true }
}

fn deployment(image: &str, replicas: i64) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [
                {"name": "nginx", "image": image, "ports": [{"containerPort": 80}]}]}}}})
}

fn fields_of(obj: &Value, manager: &str) -> Value {
    obj["metadata"]["managedFields"].as_array().unwrap().iter().find(|e| e["manager"] == manager).unwrap()["fieldsV1"]
        .clone()
}

#[test]
fn apply_records_fields_in_upstream_shape() {
    let schema = builtin_kind("apps", "v1", "Deployment").unwrap();
    let obj = apply(Some(&schema), None, &deployment("nginx:1", 2), &manager("alice"), false).unwrap();
    let f = fields_of(&obj, "alice");
    assert_eq!(f["f:spec"]["f:replicas"], json!({}));
    assert_eq!(f["f:spec"]["f:selector"], json!({}), "an atomic map is one field");
    let c = &f["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"nginx\"}"];
    assert_eq!(c["."], json!({}));
    assert_eq!(c["f:image"], json!({}));
    assert!(c["f:ports"]["k:{\"containerPort\":80,\"protocol\":\"TCP\"}"].is_object(), "{c}");
    assert!(f["f:metadata"].get("f:name").is_none());
    assert_eq!(obj["metadata"]["managedFields"][0]["operation"], "Apply");
}

#[test]
fn conflicting_managers_need_force_and_shared_values_do_not_conflict() {
    let schema = builtin_kind("apps", "v1", "Deployment").unwrap();
    let s = Some(&*schema);
    let live = apply(s, None, &deployment("nginx:1", 2), &manager("alice"), false).unwrap();
    // Same values: shared ownership.
    let shared = apply(s, Some(&live), &deployment("nginx:1", 2), &manager("bob"), false).unwrap();
    assert_eq!(shared["metadata"]["managedFields"].as_array().unwrap().len(), 2);
    // A different value for a field alice owns.
    let err = apply(s, Some(&live), &deployment("nginx:2", 2), &manager("bob"), false).unwrap_err();
    assert_eq!(err.code, 409);
    assert_eq!(err.message, "Apply failed with 1 conflict: conflict with \"alice\" using apps/v1: .spec.template.spec.containers[name=\"nginx\"].image");
    let forced = apply(s, Some(&live), &deployment("nginx:2", 2), &manager("bob"), true).unwrap();
    assert_eq!(forced["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:2");
    let alice = fields_of(&forced, "alice");
    assert!(alice["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"nginx\"}"].get("f:image").is_none());
}

#[test]
fn fields_no_longer_applied_are_removed_unless_shared() {
    let schema = builtin_kind("apps", "v1", "Deployment").unwrap();
    let s = Some(&*schema);
    let mut with_env = deployment("nginx:1", 2);
    with_env["spec"]["template"]["spec"]["containers"][0]["env"] =
        json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]);
    let live = apply(s, None, &with_env, &manager("alice"), false).unwrap();
    let mut fewer = deployment("nginx:1", 2);
    fewer["spec"]["template"]["spec"]["containers"][0]["env"] = json!([{"name": "A", "value": "1"}]);
    fewer["metadata"].as_object_mut().unwrap().remove("labels");
    let after = apply(s, Some(&live), &fewer, &manager("alice"), false).unwrap();
    assert_eq!(after["spec"]["template"]["spec"]["containers"][0]["env"], json!([{"name": "A", "value": "1"}]));
    assert!(after["metadata"].get("labels").is_none() || after["metadata"]["labels"].as_object().unwrap().is_empty());
}

#[test]
fn updates_take_ownership_of_what_they_change() {
    let schema = builtin_kind("apps", "v1", "Deployment").unwrap();
    let s = Some(&*schema);
    let live = apply(s, None, &deployment("nginx:1", 2), &manager("alice"), false).unwrap();
    let mut edited = live.clone();
    edited["spec"]["replicas"] = json!(5);
    track_update(s, Some(&live), &mut edited, &manager("kubectl-edit"));
    let editor = fields_of(&edited, "kubectl-edit");
    assert_eq!(editor, json!({"f:spec": {"f:replicas": {}}}));
    assert!(fields_of(&edited, "alice")["f:spec"].get("f:replicas").is_none());
    // Alice re-applying replicas 2 now conflicts with the editor.
    let err = apply(s, Some(&edited), &deployment("nginx:1", 2), &manager("alice"), false).unwrap_err();
    assert!(err.message.contains("conflict with \"kubectl-edit\""), "{}", err.message);
    // A create records every field for the creator, with a marker on new maps.
    let mut created = deployment("nginx:1", 1);
    track_update(s, None, &mut created, &manager("kubectl-create"));
    let f = fields_of(&created, "kubectl-create");
    assert_eq!(f["f:metadata"]["f:labels"], json!({".": {}, "f:app": {}}));
    assert_eq!(created["metadata"]["managedFields"][0]["operation"], "Update");
}

#[test]
fn fields_v1_round_trips() {
    let v = json!({"f:metadata": {"f:labels": {".": {}, "f:app": {}}}, "f:spec": {"f:x": {}}});
    assert_eq!(FieldSet::from_fields_v1(&v).to_fields_v1(), v);
}

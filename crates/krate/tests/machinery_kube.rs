//! Server-side apply, CustomResourceDefinitions and protobuf, driven by kube-rs and
//! client-go as controllers and operators use them.

mod common;

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use common::TestServer;

fn conflict_causes(err: &kube::Error) -> (u16, String, Vec<String>) {
    match err {
        kube::Error::Api(status) => {
            let fields =
                status.details.as_ref().map(|d| d.causes.iter().map(|c| c.field.clone()).collect()).unwrap_or_default();
            (status.code, status.message.clone(), fields)
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn server_side_apply_from_two_managers() {
    let server = TestServer::start();
    let client = server.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let config = |value: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"color": value}});

    let created = cms.patch("shared", &PatchParams::apply("alpha"), &Patch::Apply(config("blue"))).await.unwrap();
    assert_eq!(created.data.unwrap()["color"], "blue");
    // Same value from another manager: shared ownership, no conflict.
    cms.patch("shared", &PatchParams::apply("beta"), &Patch::Apply(config("blue"))).await.unwrap();
    // A different value conflicts with both owners.
    let err = cms.patch("shared", &PatchParams::apply("gamma"), &Patch::Apply(config("red"))).await.unwrap_err();
    let (code, message, fields) = conflict_causes(&err);
    assert_eq!(code, 409);
    assert!(message.starts_with("Apply failed with 2 conflicts"), "{message}");
    assert_eq!(fields, [".data.color", ".data.color"]);
    assert_eq!(cms.get("shared").await.unwrap().data.unwrap()["color"], "blue", "a refused apply writes nothing");

    // Forced: gamma takes the field over.
    let forced = cms.patch("shared", &PatchParams::apply("gamma").force(), &Patch::Apply(config("red"))).await.unwrap();
    assert_eq!(forced.data.as_ref().unwrap()["color"], "red");
    let managers: Vec<(String, bool)> = forced
        .managed_fields()
        .iter()
        .map(|m| {
            (m.manager.clone().unwrap(), m.fields_v1.as_ref().is_some_and(|f| f.0.pointer("/f:data/f:color").is_some()))
        })
        .collect();
    assert_eq!(managers, [("gamma".to_string(), true)], "alpha and beta own nothing any more");

    // A manager that stops applying a field removes it.
    cms.patch(
        "shared",
        &PatchParams::apply("gamma"),
        &Patch::Apply(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"size": "L"}}),
        ),
    )
    .await
    .unwrap();
    let data = cms.get("shared").await.unwrap().data.unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data["size"], "L");

    // Bad input: no field manager; wrong kind; a malformed body.
    let raw_client = server.client().await;
    let (status, body) = common::raw(
        &raw_client,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/shared",
        "application/apply-patch+yaml",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shared}\n".to_vec(),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["message"].as_str().unwrap().contains("fieldManager: Required value"), "{body}");
    let (status, body) = common::raw(
        &raw_client,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/shared?fieldManager=x",
        "application/apply-patch+yaml",
        b"apiVersion: v1\nkind: Secret\nmetadata: {name: shared}\n".to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = common::raw(
        &raw_client,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/shared?fieldManager=x",
        "application/apply-patch+yaml",
        b"data: [unclosed".to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(cms.get("shared").await.unwrap().data.unwrap()["size"], "L");
}

fn default_color() -> String {
    "blue".to_string()
}

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(group = "example.com", version = "v1", kind = "Gadget", namespaced, status = "GadgetStatus", shortname = "gd")]
struct GadgetSpec {
    size: i32,
    #[serde(default = "default_color")]
    color: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
struct GadgetStatus {
    ready: bool,
}

/// Creates the Gadget CRD and waits until it is served.
async fn establish_gadgets(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Gadget::crd()).await.unwrap();
    let established = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let crd = crds.get("gadgets.example.com").await.unwrap();
            let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            if conditions.iter().any(|c| c.type_ == "Established" && c.status == "True") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    established.await.expect("the CRD becomes Established");
}

#[tokio::test]
async fn custom_resource_from_kube_derive() {
    let server = TestServer::start();
    let client = server.client().await;
    establish_gadgets(&client).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());

    let gadgets: Api<Gadget> = Api::namespaced(client.clone(), "default");
    let mut events = gadgets.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    gadgets
        .create(&PostParams::default(), &Gadget::new("g1", GadgetSpec { size: 1, color: "red".into() }))
        .await
        .unwrap();

    // A defaulted field: created without color through the dynamic API.
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Gadget");
    let dynamic: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ApiResource::from_gvk(&gvk));
    let obj: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g2"}, "spec": {"size": 2}}),
    )
    .unwrap();
    dynamic.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(gadgets.get("g2").await.unwrap().spec.color, "blue");

    // An invalid object is refused.
    let bad: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g3"}, "spec": {"size": "big"}}),
    )
    .unwrap();
    let err = dynamic.create(&PostParams::default(), &bad).await.unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422);
            assert!(s.message.contains("spec.size in body must be of type integer"), "{}", s.message);
        }
        other => panic!("{other:?}"),
    }

    let listed = gadgets.list(&ListParams::default()).await.unwrap();
    let names: Vec<String> = listed.items.iter().map(|g| g.name_any()).collect();
    assert_eq!(names, ["g1", "g2"]);

    // Status through the status subresource; the main resource ignores status.
    let patched = gadgets
        .patch_status("g1", &PatchParams::default(), &Patch::Merge(json!({"status": {"ready": true}})))
        .await
        .unwrap();
    assert!(patched.status.unwrap().ready);
    let mut replaced = gadgets.get("g1").await.unwrap();
    replaced.status = Some(GadgetStatus { ready: false });
    replaced.spec.size = 5;
    let after = gadgets.replace("g1", &PostParams::default(), &replaced).await.unwrap();
    assert!(after.status.unwrap().ready, "status is not written through the main resource");
    assert_eq!(after.metadata.generation, Some(2));

    // Server-side apply works on custom resources too: spec.size belongs to whoever
    // replaced the object last, so taking it over needs force.
    let config = Patch::Apply(
        json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g1"}, "spec": {"size": 6}}),
    );
    let err = gadgets.patch("g1", &PatchParams::apply("op"), &config).await.unwrap_err();
    assert_eq!(conflict_causes(&err).2, [".spec.size"]);
    let applied = gadgets.patch("g1", &PatchParams::apply("op").force(), &config).await.unwrap();
    assert_eq!(applied.spec.size, 6);

    // The watch saw both creations and the updates.
    let mut seen = Vec::new();
    while seen.len() < 5 {
        match tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .expect("watch event")
            .unwrap()
            .unwrap()
        {
            WatchEvent::Added(g) => seen.push(format!("ADDED {}", g.name_any())),
            WatchEvent::Modified(g) => seen.push(format!("MODIFIED {}", g.name_any())),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, ["ADDED g1", "ADDED g2", "MODIFIED g1", "MODIFIED g1", "MODIFIED g1"]);

    // Deleting the CRD deletes the gadgets.
    crds.delete("gadgets.example.com", &DeleteParams::default()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while crds.get_opt("gadgets.example.com").await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the CRD goes away after its objects");
    let gone = server.kubectl(&["get", "--raw", "/apis/example.com/v1/namespaces/default/gadgets"]);
    assert!(!gone.status.success(), "gadgets are not served any more");
    // Recreated, the CRD starts empty: the old objects were deleted, not hidden.
    crds.create(&PostParams::default(), &Gadget::crd()).await.unwrap();
    let listed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(list) = gadgets.list(&ListParams::default()).await {
                return list;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("served again");
    assert!(listed.items.is_empty());
}

const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

/// A GET with an `Accept` header: (status, content type, body).
async fn get_accepting(client: &kube::Client, path: &str, accept: &str) -> (u16, String, Vec<u8>) {
    let req = http::Request::builder().uri(path).header("Accept", accept).body(Vec::new()).unwrap();
    let resp = client.send(req.map(kube::client::Body::from)).await.expect("send");
    let status = resp.status().as_u16();
    let content_type = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes().to_vec();
    (status, content_type, body)
}

#[tokio::test]
async fn client_go_writes_reads_and_watches_pods_over_protobuf() {
    let server = TestServer::start();
    let out = std::process::Command::new(common::goclient::path())
        .arg("check")
        .arg(server.kubeconfig())
        .arg("default")
        .output()
        .expect("run the client-go program");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client-go failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    // Every answer client-go got (created, read, listed, patched, watched, refused,
    // deleted) was protobuf, the watch framed as a protobuf stream.
    let answers: Vec<(&str, &str)> = stdout.lines().filter_map(|l| l.split_once(" -> ")).collect();
    assert_eq!(answers.len(), 7, "{stdout}");
    for (request, content_type) in answers {
        let expected =
            if request.starts_with("WATCH") { "application/vnd.kubernetes.protobuf;stream=watch" } else { PROTOBUF };
        assert_eq!(content_type, expected, "{request}");
    }
}

#[tokio::test]
async fn protobuf_lists_carry_what_json_lists_do() {
    let server = TestServer::start();
    let client = server.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for name in ["a", "b"] {
        let cm = json!({"metadata": {"name": name, "labels": {"app": "x"}}, "data": {"k": name}});
        cms.create(&PostParams::default(), &serde_json::from_value(cm).unwrap()).await.unwrap();
    }
    let path = "/api/v1/namespaces/default/configmaps?labelSelector=app%3Dx";
    let (status, content_type, proto) = get_accepting(&client, path, &format!("{PROTOBUF}, application/json")).await;
    assert_eq!((status, content_type.as_str()), (200, PROTOBUF));
    assert!(proto.starts_with(b"k8s\0"), "the protobuf magic leads");
    let decoded = krate_api::protobuf::decode(&proto).unwrap();
    let revision = decoded["metadata"]["resourceVersion"].as_str().unwrap();
    let at_revision = format!("{path}&resourceVersion={revision}&resourceVersionMatch=Exact");
    let (_, _, json) = get_accepting(&client, &at_revision, "application/json").await;
    let mut json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    // Protobuf items carry no type (nor do upstream's JSON ones; krate's do).
    for item in json["items"].as_array_mut().unwrap() {
        let item = item.as_object_mut().unwrap();
        item.remove("kind");
        item.remove("apiVersion");
    }
    assert_eq!(decoded, json);
}

#[tokio::test]
async fn custom_resources_stay_json_for_clients_that_prefer_protobuf() {
    let server = TestServer::start();
    let client = server.client().await;
    establish_gadgets(&client).await;
    let path = "/apis/example.com/v1/namespaces/default/gadgets";
    let (status, content_type, body) = get_accepting(&client, path, &format!("{PROTOBUF}, application/json")).await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"), "{}", String::from_utf8_lossy(&body));
    // Protobuf alone cannot be had: upstream's 406, as a protobuf Status.
    let (status, content_type, body) = get_accepting(&client, path, PROTOBUF).await;
    assert_eq!((status, content_type.as_str()), (406, PROTOBUF));
    let refusal = krate_api::protobuf::decode(&body).unwrap();
    assert_eq!(refusal["reason"], "NotAcceptable");
    assert!(refusal["message"].as_str().unwrap().contains("does not implement the protobuf marshalling interface"));
}

#[tokio::test]
async fn custom_resources_are_listed_and_watched_by_their_selectable_fields() {
    let server = TestServer::start();
    let client = server.client().await;
    let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "shirts.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "shirts", "singular": "shirt", "kind": "Shirt"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "selectableFields": [{"jsonPath": ".spec.color"}],
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object",
                    "properties": {"color": {"type": "string"}, "size": {"type": "string"}}}}}}}]}});
    let out = server.kubectl_stdin(&["create", "-f", "-"], Some(&crd.to_string()));
    assert!(out.status.success(), "{}", common::stderr(&out));
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Shirt");
    let shirts: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ApiResource::from_gvk(&gvk));
    let shirt = |name: &str, color: &str| -> DynamicObject {
        serde_json::from_value(json!({"apiVersion": "example.com/v1", "kind": "Shirt",
            "metadata": {"name": name}, "spec": {"color": color, "size": "M"}}))
        .unwrap()
    };
    common::eventually(20, "the CRD served", || async {
        shirts.create(&PostParams::default(), &shirt("one", "blue")).await.ok()
    })
    .await;
    shirts.create(&PostParams::default(), &shirt("two", "red")).await.unwrap();
    let blue = ListParams::default().fields("spec.color=blue");
    let names: Vec<String> = shirts.list(&blue).await.unwrap().items.iter().map(|s| s.name_any()).collect();
    assert_eq!(names, ["one"]);
    let table = server.kubectl_ok(&["get", "shirts", "--field-selector", "spec.color!=blue", "-o", "name"]);
    assert_eq!(table.trim(), "shirt.example.com/two");
    // A field the CRD does not make selectable is refused, as upstream.
    let refused = shirts.list(&ListParams::default().fields("spec.size=M")).await.unwrap_err();
    assert!(refused.to_string().contains("field label not supported: spec.size"), "{refused}");

    // A watch sees a shirt turn blue as added, and turn red again as deleted.
    let mut events = shirts.watch(&WatchParams::default().fields("spec.color=blue"), "0").await.unwrap().boxed();
    let first = tokio::time::timeout(Duration::from_secs(10), events.try_next()).await.unwrap().unwrap();
    assert!(matches!(first, Some(WatchEvent::Added(ref s)) if s.name_any() == "one"), "{first:?}");
    let paint = |color: &str| Patch::Merge(json!({"spec": {"color": color}}));
    shirts.patch("two", &PatchParams::default(), &paint("blue")).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), events.try_next()).await.unwrap().unwrap();
    assert!(matches!(next, Some(WatchEvent::Added(ref s)) if s.name_any() == "two"), "{next:?}");
    shirts.patch("two", &PatchParams::default(), &paint("red")).await.unwrap();
    let gone = tokio::time::timeout(Duration::from_secs(10), events.try_next()).await.unwrap().unwrap();
    assert!(matches!(gone, Some(WatchEvent::Deleted(ref s)) if s.name_any() == "two"), "{gone:?}");
}

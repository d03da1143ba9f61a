//! Static pods: Pod manifests in a directory (`--pod-manifest-path`) that the agent runs
//! on its own authority, API server or not, as upstream's kubelet does. The directory
//! is read at start and every `--file-check-frequency-seconds` (upstream's 20 s), and
//! at once when the API shows a mirror pod changed.
//!
//! Each static pod is named `<name>-<node>`, its UID is a hash of the manifest and the
//! node (so an edited manifest is a new pod: the old one stops, the new one starts),
//! and it carries upstream's `kubernetes.io/config.*` annotations. The API gets a
//! *mirror pod* of it — same name, `kubernetes.io/config.mirror: <hash>`, owned by the
//! Node — to which the pod's worker reports status. A mirror deleted by a user comes
//! back; the containers keep running. A manifest that cannot be read or is invalid is
//! reported in the agent's log and skipped; the others run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use serde_json::{json, Value};

use super::Shared;

pub const CONFIG_SOURCE: &str = "kubernetes.io/config.source";
pub const CONFIG_HASH: &str = "kubernetes.io/config.hash";
pub const CONFIG_SEEN: &str = "kubernetes.io/config.seen";
pub const CONFIG_MIRROR: &str = "kubernetes.io/config.mirror";

/// Whether an API pod is the mirror of a static pod (its worker is the static pod's).
pub fn is_mirror(pod: &Pod) -> bool {
    mirror_hash(pod).is_some()
}

/// The static pod a manifest describes on `node`.
pub fn static_pod(manifest: &[u8], node: &str) -> Result<Pod> {
    let mut pod: Value = serde_yaml::from_slice(manifest).context("not valid YAML or JSON")?;
    if pod["kind"] != "Pod" || pod["apiVersion"] != "v1" {
        bail!("a static pod manifest holds one v1 Pod, not {} {}", pod["apiVersion"], pod["kind"]);
    }
    let name = pod["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .context("metadata.name: Required value")?
        .to_string();
    // The hash covers what the user wrote, so any edit makes a new pod.
    let canonical = serde_json::to_vec(&pod)?;
    let digest = <sha2::Sha256 as sha2::Digest>::digest([node.as_bytes(), b"\n", &canonical].concat());
    let hash: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let metadata = &mut pod["metadata"];
    metadata["name"] = json!(format!("{name}-{node}"));
    if metadata["namespace"].as_str().is_none_or(str::is_empty) {
        metadata["namespace"] = json!("default");
    }
    metadata["uid"] = json!(hash);
    let annotations = metadata["annotations"].as_object_mut().map(std::mem::take).unwrap_or_default();
    let mut annotations: BTreeMap<String, Value> = annotations.into_iter().collect();
    annotations.insert(CONFIG_SOURCE.into(), json!("file"));
    annotations.insert(CONFIG_HASH.into(), json!(hash));
    annotations.insert(CONFIG_SEEN.into(), json!(krate_client::now()));
    metadata["annotations"] = json!(annotations);
    let spec = &mut pod["spec"];
    if !spec.is_object() {
        bail!("spec: Required value");
    }
    spec["nodeName"] = json!(node);
    krate_api::strategy::default_pod_spec(spec);
    let mut errors = Vec::new();
    krate_api::strategy::validate_pod_spec(spec, "spec", &mut errors);
    if !errors.is_empty() {
        bail!("{}", errors.iter().map(|e| e.to_line()).collect::<Vec<_>>().join("; "));
    }
    pod["status"] = json!({"phase": "Pending"});
    serde_json::from_value(pod).context("not a valid Pod")
}

/// The static pods of `dir` (`.yaml`, `.yml`, `.json`; hidden files skipped). A
/// manifest that fails is skipped, and logged when its error is new (`reported`: the
/// last error logged per file).
fn load(dir: &Path, node: &str, reported: &mut HashMap<PathBuf, String>) -> Vec<Pod> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    let mut pods = Vec::new();
    let mut names = HashSet::new();
    for path in files {
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if file_name.starts_with('.')
            || !matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
        {
            continue;
        }
        let loaded = std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| static_pod(&bytes, node))
            .and_then(|pod| {
                let key = (pod.metadata.namespace.clone(), pod.metadata.name.clone());
                if !names.insert(key) {
                    bail!("another manifest already defines a pod of this name");
                }
                Ok(pod)
            });
        match loaded {
            Ok(pod) => {
                reported.remove(&path);
                pods.push(pod);
            }
            Err(e) => {
                let error = format!("{e:#}");
                if reported.get(&path) != Some(&error) {
                    tracing::warn!(manifest = %path.display(), error = %error, "skipping an invalid static pod manifest");
                    reported.insert(path, error);
                }
            }
        }
    }
    pods
}

/// Runs the static pods of `dir` until the process stops.
pub async fn run(shared: Arc<Shared>, dir: PathBuf, period: Duration) {
    let _ = std::fs::create_dir_all(&dir);
    let mut running: HashSet<String> = HashSet::new();
    let mut reported = HashMap::new();
    loop {
        let pods = load(&dir, &shared.node_name, &mut reported);
        let uids: HashSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        for uid in running.difference(&uids) {
            shared.statics.lock().unwrap().remove(uid);
            shared.gone(uid);
        }
        for pod in &pods {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if running.insert(uid.clone()) {
                shared.statics.lock().unwrap().insert(uid.clone());
                shared.dispatch(pod.clone());
            }
        }
        running = uids;
        if let Err(e) = sync_mirrors(&shared, &pods).await {
            tracing::warn!(error = %format!("{e:#}"), "keeping the mirror pods of static pods failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shared.mirrors_changed.notified() => {}
        }
    }
}

/// Brings the API's mirror pods on this node in line with the static `pods`, from one
/// list of the node's pods: mirrors of static pods that are gone are deleted, missing
/// ones are created, and those being deleted or of an older manifest are replaced.
async fn sync_mirrors(shared: &Shared, pods: &[Pod]) -> Result<()> {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let params = kube::api::ListParams::default().fields(&format!("spec.nodeName={}", shared.node_name));
    let on_node = api.list(&params).await.context("listing the pods of this node")?.items;
    let wanted: HashSet<&str> = pods.iter().filter_map(|p| p.metadata.uid.as_deref()).collect();
    for mirror in on_node.iter().filter(|p| mirror_hash(p).is_some_and(|h| !wanted.contains(h))) {
        if let Err(e) = delete_mirror(shared, mirror).await {
            tracing::warn!(pod = %mirror.metadata.name.as_deref().unwrap_or_default(), error = %format!("{e:#}"), "removing the mirror pod of a removed static pod failed");
        }
    }
    for pod in pods {
        let existing = on_node
            .iter()
            .find(|p| p.metadata.namespace == pod.metadata.namespace && p.metadata.name == pod.metadata.name);
        if let Err(e) = ensure_mirror(shared, pod, existing).await {
            tracing::warn!(pod = %pod.metadata.name.as_deref().unwrap_or_default(), error = %format!("{e:#}"), "keeping the mirror pod of a static pod failed");
        }
    }
    Ok(())
}

fn mirror_hash(pod: &Pod) -> Option<&str> {
    pod.metadata.annotations.as_ref()?.get(CONFIG_MIRROR).map(String::as_str)
}

/// Makes the API hold a current mirror of `pod`, given the pod of its name on this node
/// (`existing`). A fresh mirror gets the status at once.
async fn ensure_mirror(shared: &Shared, pod: &Pod, existing: Option<&Pod>) -> Result<()> {
    let (ns, name, uid) = super::spec::pod_key(pod);
    let not_a_mirror = || {
        anyhow::anyhow!(
            "pod {ns}/{name} exists in the API and is not a mirror pod of this node; the static pod runs without one"
        )
    };
    if let Some(existing) = existing {
        match mirror_hash(existing) {
            Some(h) if h == uid && existing.metadata.deletion_timestamp.is_none() => return Ok(()),
            Some(_) => delete_mirror(shared, existing).await?,
            None => return Err(not_a_mirror()),
        }
    }
    let mut mirror = pod.clone();
    mirror.metadata.uid = None;
    mirror.metadata.resource_version = None;
    mirror.status = None;
    mirror.metadata.annotations.get_or_insert_with(Default::default).insert(CONFIG_MIRROR.into(), uid.clone());
    let nodes: Api<Node> = Api::all(shared.client.clone());
    if let Some(node_uid) = nodes.get_opt(&shared.node_name).await?.and_then(|n| n.metadata.uid) {
        mirror.metadata.owner_references = Some(vec![serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Node", "name": shared.node_name, "uid": node_uid, "controller": true}),
        )?]);
    }
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    match api.create(&PostParams::default(), &mirror).await {
        // The name is held by a pod this node's list did not show.
        Err(kube::Error::Api(e)) if e.code == 409 => return Err(not_a_mirror()),
        other => other?,
    };
    shared.republish(&uid);
    Ok(())
}

/// Deletes a mirror pod at once (that very object: a successor may take its name).
async fn delete_mirror(shared: &Shared, mirror: &Pod) -> Result<()> {
    let (ns, name, _) = super::spec::pod_key(mirror);
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let precondition = Preconditions { uid: mirror.metadata.uid.clone(), resource_version: None };
    let params =
        DeleteParams { grace_period_seconds: Some(0), preconditions: Some(precondition), ..Default::default() };
    Ok(krate_client::tolerate(api.delete(&name, &params).await.map(|_| ()), &[404, 409])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_becomes_a_named_hashed_defaulted_pod_of_this_node() {
        let yaml = b"apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: c\n    image: busybox:1\n";
        let pod = static_pod(yaml, "node-1").unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("web-node-1"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.containers[0].image_pull_policy.as_deref(), Some("IfNotPresent"));
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[CONFIG_SOURCE], "file");
        assert_eq!(annotations[CONFIG_HASH], pod.metadata.uid.clone().unwrap());
        // Same manifest, same UID; an edit or another node, another.
        let again = static_pod(yaml, "node-1").unwrap();
        assert_eq!(again.metadata.uid, pod.metadata.uid);
        let edited = static_pod(&[yaml.as_slice(), b"    command: [sleep, '1']\n"].concat(), "node-1").unwrap();
        assert_ne!(edited.metadata.uid, pod.metadata.uid);
        assert_ne!(static_pod(yaml, "node-2").unwrap().metadata.uid, pod.metadata.uid);
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        let err = |m: &[u8]| format!("{:#}", static_pod(m, "n").unwrap_err());
        assert!(err(b"{{not yaml").contains("not valid YAML"));
        assert!(err(b"apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n").contains("one v1 Pod"));
        assert!(err(b"apiVersion: v1\nkind: Pod\nmetadata: {}\nspec: {containers: [{name: c, image: i}]}\n")
            .contains("metadata.name"));
        assert!(err(b"apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: c}]}\n")
            .contains("spec.containers[0].image: Required value"));
    }
}

//! A pod's volumes on the node: a directory per volume under
//! `<agent dir>/volumes/<pod uid>/<volume>`, bind-mounted into the containers that mount
//! it (CRI mounts, with subPath and readOnly). emptyDir (disk, or tmpfs for
//! `medium: Memory`), hostPath (with its type checks), configMap, secret, downwardAPI and
//! projected (files written atomically: a new timestamped directory, then the `..data`
//! link swapped, so a container never reads half an update; podCertificate sources are
//! `certificates.rs`), persistentVolumeClaim bound to hostPath or local
//! PersistentVolumes, and image (an image's files, read-only: the worker pulls it and
//! `mount_image` mounts containerd's view of it; a marker beside the volume says to
//! remove that view when the pod goes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use k8s_openapi::api::core::v1::{
    ClusterTrustBundleProjection, Container, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
    ServiceAccountTokenProjection, Volume,
};
use kube::Api;

use super::env::{config_map_bytes, field, secret_bytes, Runtime};
use crate::cri::api;

/// Where the volumes of pod `uid` live.
pub fn pod_dir(root: &Path, uid: &str) -> PathBuf {
    root.join(uid)
}

/// Files of a projected-style volume: relative path → (content, mode).
pub(super) type Files = BTreeMap<String, (Vec<u8>, u32)>;

fn key_files(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    what: &str,
    optional: bool,
) -> Result<Files> {
    let mut out = Files::new();
    match items {
        None => {
            for (k, v) in data {
                out.insert(k, (v, default_mode));
            }
        }
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(v) => {
                        out.insert(item.path.clone(), (v.clone(), item.mode.map(|m| m as u32).unwrap_or(default_mode)));
                    }
                    None if optional => {}
                    None => bail!("{what} has no key {:?}", item.key),
                }
            }
        }
    }
    Ok(out)
}

async fn config_map_files(
    client: &kube::Client,
    ns: &str,
    name: &str,
    items: Option<&Vec<KeyToPath>>,
    mode: u32,
    optional: bool,
) -> Result<Files> {
    let data = config_map_bytes(client, ns, name, optional, true).await?;
    key_files(data, items, mode, &format!("configmap \"{name}\""), optional)
}

async fn secret_files(
    client: &kube::Client,
    ns: &str,
    name: &str,
    items: Option<&Vec<KeyToPath>>,
    mode: u32,
    optional: bool,
) -> Result<Files> {
    let data = secret_bytes(client, ns, name, optional).await?;
    key_files(data, items, mode, &format!("secret \"{name}\""), optional)
}

fn downward_files(
    pod: &Pod,
    items: &[k8s_openapi::api::core::v1::DownwardAPIVolumeFile],
    mode: u32,
    rt: &Runtime,
) -> Result<Files> {
    let mut out = Files::new();
    for item in items {
        let value = if let Some(f) = &item.field_ref {
            match f.field_path.as_str() {
                // Whole maps, one `key="value"` per line as upstream writes them.
                "metadata.labels" | "metadata.annotations" => {
                    let map = if f.field_path == "metadata.labels" {
                        &pod.metadata.labels
                    } else {
                        &pod.metadata.annotations
                    };
                    map.iter().flatten().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join("\n")
                }
                path => field(pod, path, rt)?,
            }
        } else if let Some(r) = &item.resource_field_ref {
            let name = r.container_name.as_deref().unwrap_or_default();
            let spec = pod.spec.as_ref();
            let container = spec
                .into_iter()
                .flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()))
                .find(|c| c.name == name)
                .ok_or_else(|| anyhow::anyhow!("resourceFieldRef names no container {name:?} of the pod"))?;
            super::env::resource_field(
                container,
                &r.resource,
                r.divisor.as_ref().map(|d| d.0.as_str()),
                rt.allocatable,
            )?
        } else {
            String::new()
        };
        out.insert(item.path.clone(), (value.into_bytes(), item.mode.map(|m| m as u32).unwrap_or(mode)));
    }
    Ok(out)
}

/// Gives `path` to group `gid` as upstream's volume ownership does for a pod's fsGroup:
/// group-readable (and writable unless `read_only`); a directory also group-searchable
/// and set-group-ID, so what is created in it belongs to the group too.
fn own_by_group(path: &Path, gid: u32, read_only: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::lchown(path, None, Some(gid))
        .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mut mask = if read_only { 0o440 } else { 0o660 };
    if meta.is_dir() {
        mask |= 0o2110;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(meta.permissions().mode() & 0o7777 | mask))?;
    Ok(())
}

/// Writes `files` into `dir` atomically: into `..<timestamp>`, then `..data` is swapped to
/// it, and each top-level name links through `..data`. With `fs_group`, everything is
/// the group's, read-only (upstream's ownership of secret, configMap, downward API and
/// projected volumes).
fn write_atomically(dir: &Path, files: &Files, fs_group: Option<u32>) -> Result<()> {
    use std::os::unix::fs::{symlink, PermissionsExt};
    std::fs::create_dir_all(dir)?;
    let owned: Files;
    let files = match fs_group {
        Some(_) => {
            owned = files.iter().map(|(p, (bytes, mode))| (p.clone(), (bytes.clone(), mode | 0o440))).collect();
            &owned
        }
        None => files,
    };
    let current = std::fs::read_link(dir.join("..data")).ok();
    if let Some(cur) = &current {
        if files_equal(&dir.join(cur), files) {
            return Ok(());
        }
    }
    let stamp = format!("..{}", jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S.%f"));
    let staging = dir.join(&stamp);
    for (path, (bytes, mode)) in files {
        if path.split('/').any(|c| c == ".." || c.is_empty()) {
            bail!("invalid path {path:?} in a volume");
        }
        let target = staging.join(path);
        std::fs::create_dir_all(target.parent().unwrap_or(&staging))?;
        std::fs::write(&target, bytes)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))?;
    }
    std::fs::create_dir_all(&staging)?;
    if let Some(gid) = fs_group {
        own_by_group(dir, gid, true)?;
        for entry in walkdir(&staging)? {
            own_by_group(&entry, gid, true)?;
        }
    }
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    symlink(&stamp, &tmp_link)?;
    std::fs::rename(&tmp_link, dir.join("..data"))?;
    let tops: std::collections::BTreeSet<&str> = files.keys().map(|p| p.split('/').next().unwrap_or(p)).collect();
    for top in &tops {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{top}"), &link)?;
        }
    }
    // Names no longer in the volume go, and so does the previous generation.
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !tops.contains(name.as_str()) {
            let _ = std::fs::remove_file(dir.join(&name));
        }
    }
    if let Some(cur) = current {
        let _ = std::fs::remove_dir_all(dir.join(cur));
    }
    Ok(())
}

/// `dir` and everything below it.
fn walkdir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if std::fs::symlink_metadata(&out[i])?.is_dir() {
            for entry in std::fs::read_dir(&out[i])? {
                out.push(entry?.path());
            }
        }
        i += 1;
    }
    Ok(out)
}

fn files_equal(dir: &Path, files: &Files) -> bool {
    use std::os::unix::fs::PermissionsExt;
    files.iter().all(|(p, (bytes, mode))| {
        let path = dir.join(p);
        std::fs::read(&path).ok().as_ref() == Some(bytes)
            && std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o7777 == *mode)
    }) && count_files(dir) == files.len()
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 }).sum())
        .unwrap_or(0)
}

fn is_mount_point(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&p))
}

fn mount_tmpfs(path: &Path, size: Option<u64>) -> Result<()> {
    if is_mount_point(path) {
        return Ok(());
    }
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let options = std::ffi::CString::new(size.map(|s| format!("size={s}")).unwrap_or_default())?;
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr() as *const libc::c_void,
        )
    };
    if rc != 0 {
        bail!("mounting a tmpfs at {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

fn check_host_path(path: &Path, kind: &str) -> Result<()> {
    let meta = std::fs::metadata(path);
    match kind {
        "DirectoryOrCreate" => std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?,
        "FileOrCreate" if meta.is_err() => {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        "Directory" if !meta.as_ref().is_ok_and(|m| m.is_dir()) => {
            bail!("hostPath type check failed: {} is not a directory", path.display())
        }
        "File" if !meta.as_ref().is_ok_and(|m| m.is_file()) => {
            bail!("hostPath type check failed: {} is not a file", path.display())
        }
        "Socket" | "CharDevice" | "BlockDevice" if meta.is_err() => {
            bail!("hostPath type check failed: {} does not exist", path.display())
        }
        _ => {}
    }
    Ok(())
}

/// Sets up (or refreshes) one volume; returns the host path containers mount.
async fn set_up(client: &kube::Client, pod: &Pod, v: &Volume, dir: &Path, rt: &Runtime<'_>) -> Result<PathBuf> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let path = dir.join(&v.name);
    let fs_group = pod.spec.as_ref().and_then(|s| s.security_context.as_ref()?.fs_group).map(|g| g as u32);
    if let Some(e) = &v.empty_dir {
        std::fs::create_dir_all(&path)?;
        if e.medium.as_deref() == Some("Memory") {
            mount_tmpfs(&path, e.size_limit.as_ref().and_then(|q| krate_api::quantity::parse(&q.0)).map(|b| b as u64))?;
        }
        // World-writable, as upstream's: containers of any user share it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
        if let Some(gid) = fs_group {
            for entry in walkdir(&path)? {
                own_by_group(&entry, gid, false)?;
            }
        }
        return Ok(path);
    }
    if v.image.is_some() {
        if !is_mount_point(&path) {
            bail!("image volume {:?} is not mounted yet", v.name);
        }
        return Ok(path);
    }
    if let Some(h) = &v.host_path {
        let host = PathBuf::from(&h.path);
        check_host_path(&host, h.type_.as_deref().unwrap_or(""))?;
        return Ok(host);
    }
    let files = if let Some(c) = &v.config_map {
        config_map_files(
            client,
            ns,
            &c.name,
            c.items.as_ref(),
            c.default_mode.unwrap_or(0o644) as u32,
            c.optional.unwrap_or(false),
        )
        .await?
    } else if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        secret_files(
            client,
            ns,
            &name,
            s.items.as_ref(),
            s.default_mode.unwrap_or(0o644) as u32,
            s.optional.unwrap_or(false),
        )
        .await?
    } else if let Some(d) = &v.downward_api {
        downward_files(pod, d.items.as_deref().unwrap_or_default(), d.default_mode.unwrap_or(0o644) as u32, rt)?
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.unwrap_or(0o644) as u32;
        let mut all = Files::new();
        for (index, source) in p.sources.iter().flatten().enumerate() {
            let files = if let Some(c) = &source.config_map {
                config_map_files(client, ns, &c.name, c.items.as_ref(), mode, c.optional.unwrap_or(false)).await?
            } else if let Some(s) = &source.secret {
                secret_files(client, ns, &s.name, s.items.as_ref(), mode, s.optional.unwrap_or(false)).await?
            } else if let Some(d) = &source.downward_api {
                downward_files(pod, d.items.as_deref().unwrap_or_default(), mode, rt)?
            } else if let Some(b) = &source.cluster_trust_bundle {
                trust_bundle_files(client, b, mode).await?
            } else if let Some(t) = &source.service_account_token {
                token_files(client, pod, t, &path, mode).await?
            } else if let Some(c) = &source.pod_certificate {
                // Private keys: owner-only when a group or user is given the volume.
                let mode = if fs_group.is_some() { 0o600 } else { mode };
                super::certificates::files(client, pod, c, dir, (&v.name, index), mode).await?
            } else {
                Files::new()
            };
            all.extend(files);
        }
        all
    } else if let Some(claim) = &v.persistent_volume_claim {
        return claim_path(client, ns, &claim.claim_name).await;
    } else {
        bail!("volume {:?}: this volume type is not supported by this agent", v.name);
    };
    write_atomically(&path, &files, fs_group)?;
    Ok(path)
}

/// A clusterTrustBundle projection: the PEM certificates of the ClusterTrustBundle it
/// names, or of every bundle of its signer whose labels its selector matches (no
/// selector: none; an empty one: all), each certificate once, in a stable order.
/// Nothing found fails the volume unless `optional` (then the file is empty).
async fn trust_bundle_files(client: &kube::Client, source: &ClusterTrustBundleProjection, mode: u32) -> Result<Files> {
    use kube::core::SelectorExt;
    let api: Api<ClusterTrustBundle> = Api::all(client.clone());
    let bundles: Vec<ClusterTrustBundle> = match (&source.name, &source.signer_name) {
        (Some(name), _) => api.get_opt(name).await?.into_iter().collect(),
        (None, Some(signer)) => match &source.label_selector {
            None => Vec::new(),
            Some(selector) => {
                let selector = kube::core::Selector::try_from(selector.clone())
                    .map_err(|e| anyhow!("clusterTrustBundle labelSelector: {e}"))?;
                let all = api.list(&Default::default()).await?.items;
                all.into_iter()
                    .filter(|b| b.spec.signer_name.as_deref() == Some(signer.as_str()))
                    .filter(|b| selector.matches(b.metadata.labels.as_ref().unwrap_or(&BTreeMap::new())))
                    .collect()
            }
        },
        (None, None) => bail!("a clusterTrustBundle projection names neither a bundle nor a signer"),
    };
    let certificates: std::collections::BTreeSet<String> = bundles
        .iter()
        .flat_map(|b| b.spec.trust_bundle.split("-----END CERTIFICATE-----"))
        .map(str::trim)
        .filter(|block| block.starts_with("-----BEGIN CERTIFICATE-----"))
        .map(|block| format!("{block}\n-----END CERTIFICATE-----\n"))
        .collect();
    if certificates.is_empty() {
        // Optional: the file is there, empty (upstream's).
        if source.optional == Some(true) {
            return Ok(Files::from([(source.path.clone(), (Vec::new(), mode))]));
        }
        let what = source.name.as_ref().map_or_else(
            || format!("signer {:?}", source.signer_name.as_deref().unwrap_or_default()),
            |n| format!("ClusterTrustBundle {n:?}"),
        );
        bail!("no trust anchors from {what} for the clusterTrustBundle projection to {:?}", source.path);
    }
    let pem: String = certificates.into_iter().collect();
    Ok(Files::from([(source.path.clone(), (pem.into_bytes(), mode))]))
}

/// A projected service-account token: the one already in the volume while it is fresh
/// (younger than 80% of its lifetime, as upstream's token manager), else a new one from
/// the TokenRequest API, bound to the pod. Reading it back from the volume keeps it
/// across agent restarts without asking again.
async fn token_files(
    client: &kube::Client,
    pod: &Pod,
    source: &ServiceAccountTokenProjection,
    volume: &Path,
    mode: u32,
) -> Result<Files> {
    let audiences: Vec<String> = source.audience.iter().filter(|a| !a.is_empty()).cloned().collect();
    let current = std::fs::read_to_string(volume.join(&source.path))
        .ok()
        .filter(|t| token_is_fresh(t, &audiences, krate_api::object::unix_seconds()));
    let token = match current {
        Some(token) => token,
        None => {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            let account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .filter(|a| !a.is_empty())
                .unwrap_or("default");
            let request = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
                "audiences": audiences,
                "expirationSeconds": source.expiration_seconds.unwrap_or(3600),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid},
            }});
            let issued: serde_json::Value = Api::<ServiceAccount>::namespaced(client.clone(), ns)
                .create_subresource("token", account, &Default::default(), &request)
                .await
                .with_context(|| format!("requesting a token for service account {ns}/{account}"))?;
            issued["status"]["token"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("the TokenRequest came back without a token"))?
        }
    };
    Ok(Files::from([(source.path.clone(), (token.into_bytes(), mode))]))
}

/// Whether `token` (a JWT) is for `audiences` (empty: the API server's) and younger than
/// 80% of its lifetime at `now`. Its signature is the API server's business.
fn token_is_fresh(token: &str, audiences: &[String], now: i64) -> bool {
    use base64::Engine;
    let Some(payload) = token.split('.').nth(1) else { return false };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else { return false };
    let Ok(claims) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return false };
    let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) else { return false };
    let aud: Vec<&str> = claims["aud"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).collect();
    let audience_ok = audiences.is_empty() || audiences.iter().all(|a| aud.contains(&a.as_str()));
    audience_ok && now < iat + (exp - iat) * 8 / 10
}

async fn claim_path(client: &kube::Client, ns: &str, claim: &str) -> Result<PathBuf> {
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get_opt(claim)
        .await?
        .ok_or_else(|| anyhow!("persistentvolumeclaim \"{claim}\" not found"))?;
    let volume = pvc
        .spec
        .and_then(|s| s.volume_name)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| anyhow!("persistentvolumeclaim \"{claim}\" is not bound to a volume yet"))?;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&volume)
        .await
        .with_context(|| format!("reading persistentvolume {volume}"))?;
    let spec = pv.spec.unwrap_or_default();
    let path = spec.host_path.map(|h| h.path).or(spec.local.map(|l| l.path)).ok_or_else(|| {
        anyhow!("persistentvolume {volume} is neither hostPath nor local; this agent mounts only those")
    })?;
    std::fs::create_dir_all(&path).with_context(|| format!("creating {path}"))?;
    Ok(PathBuf::from(path))
}

/// Sets up every volume of the pod: volume name → host path.
pub async fn set_up_all(
    client: &kube::Client,
    pod: &Pod,
    root: &Path,
    rt: &Runtime<'_>,
) -> Result<BTreeMap<String, PathBuf>> {
    let dir = pod_dir(root, pod.metadata.uid.as_deref().unwrap_or_default());
    let mut out = BTreeMap::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let path = set_up(client, pod, v, &dir, rt)
            .await
            .map_err(|e| anyhow!("MountVolume.SetUp failed for volume \"{}\" : {e:#}", v.name))?;
        out.insert(v.name.clone(), path);
    }
    Ok(out)
}

/// Whether the pod has volumes whose content follows API objects (refreshed on resync).
pub fn has_live_content(pod: &Pod) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .any(|v| v.config_map.is_some() || v.secret.is_some() || v.projected.is_some() || v.downward_api.is_some())
}

/// The CRI mounts of one container. `env` is the container's environment, which
/// `subPathExpr` is expanded with (`$(VAR)`, as in commands).
pub fn mounts(
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
    env: &[(String, String)],
) -> Result<Vec<api::Mount>> {
    let vars: BTreeMap<String, String> = env.iter().cloned().collect();
    let mut out = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let base = volumes.get(&m.name).ok_or_else(|| anyhow!("volume {:?} is not defined in the pod", m.name))?;
        let mut host = base.clone();
        let expanded = m.sub_path_expr.as_deref().filter(|s| !s.is_empty()).map(|e| super::spec::expand(e, &vars));
        if let Some(sub) = expanded.as_deref().or(m.sub_path.as_deref()).filter(|s| !s.is_empty()) {
            if Path::new(sub).is_absolute() || sub.split('/').any(|c| c == "..") {
                let what = if expanded.is_some() { "subPathExpr" } else { "subPath" };
                bail!("{what} {sub:?} must be a relative path within the volume");
            }
            host = base.join(sub);
            if std::fs::symlink_metadata(&host).is_err() {
                std::fs::create_dir_all(&host).with_context(|| format!("creating subPath {sub}"))?;
            }
        }
        out.push(api::Mount {
            container_path: m.mount_path.clone(),
            host_path: host.display().to_string(),
            readonly: m.read_only.unwrap_or(false),
            ..Default::default()
        });
    }
    Ok(out)
}

/// Most of a termination message the agent reports (upstream's limit).
const TERMINATION_MESSAGE_LIMIT: u64 = 4096;

fn termination_file(root: &Path, uid: &str, container: &str, attempt: u32) -> PathBuf {
    pod_dir(root, uid).join(".termination").join(format!("{container}-{attempt}"))
}

/// An empty host file mounted at the container's terminationMessagePath, one per run.
pub fn termination_log(root: &Path, uid: &str, c: &Container, attempt: u32) -> Result<api::Mount> {
    use std::os::unix::fs::PermissionsExt;
    let file = termination_file(root, uid, &c.name, attempt);
    std::fs::create_dir_all(file.parent().unwrap_or(root))?;
    std::fs::write(&file, b"")?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666))?;
    let path =
        c.termination_message_path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/dev/termination-log".into());
    Ok(api::Mount { container_path: path, host_path: file.display().to_string(), ..Default::default() })
}

/// What a finished container wrote to its termination message file, if anything.
pub fn termination_message(root: &Path, uid: &str, container: &str, attempt: u32) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(termination_file(root, uid, container, attempt))
        .ok()?
        .take(TERMINATION_MESSAGE_LIMIT)
        .read_to_string(&mut text)
        .ok()?;
    (!text.is_empty()).then_some(text)
}

/// Removes the pod's volume directories (unmounting tmpfs volumes first).
/// The marker of image volume `volume` in pod directory `dir`.
fn image_marker(dir: &Path, volume: &str) -> PathBuf {
    dir.join(format!(".image-{volume}"))
}

/// Whether image volume `volume` of pod `uid` is mounted.
pub fn image_mounted(root: &Path, uid: &str, volume: &str) -> bool {
    is_mount_point(&pod_dir(root, uid).join(volume))
}

/// Mounts image `image_id` (pulled) as volume `volume` of pod `uid`.
pub async fn mount_image(socket: &Path, root: &Path, uid: &str, volume: &str, image_id: &str) -> Result<()> {
    let dir = pod_dir(root, uid);
    let path = dir.join(volume);
    if is_mount_point(&path) {
        return Ok(());
    }
    std::fs::create_dir_all(&path)?;
    std::fs::write(image_marker(&dir, volume), image_id)?;
    crate::containerd::mount_image(socket, image_id, &path).await
}

/// Unmounts and removes the volumes of pod `uid` (image volumes' views with them).
pub fn tear_down(root: &Path, uid: &str, runtime_socket: &Path) {
    let dir = pod_dir(root, uid);
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    let entries: Vec<_> = entries.flatten().collect();
    for entry in &entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(volume) = name.strip_prefix(".image-") {
            if let Err(e) = crate::containerd::unmount_image(runtime_socket, &dir.join(volume)) {
                tracing::warn!(error = %format!("{e:#}"), "removing an image volume failed");
            }
        }
    }
    for entry in entries {
        let path = entry.path();
        if is_mount_point(&path) {
            if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "removing a pod's volumes failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projected_tokens_are_reused_until_80_percent_of_their_life() {
        use base64::Engine;
        let jwt = |claims: serde_json::Value| {
            format!("h.{}.s", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string()))
        };
        let token =
            jwt(serde_json::json!({"iat": 1000, "exp": 2000, "aud": ["https://kubernetes.default.svc.cluster.local"]}));
        assert!(token_is_fresh(&token, &[], 1799));
        assert!(!token_is_fresh(&token, &[], 1800));
        assert!(!token_is_fresh(&token, &["vault".to_string()], 1100), "another audience needs another token");
        assert!(!token_is_fresh("garbage", &[], 1100));
    }

    #[test]
    fn atomic_writes_swap_generations_and_drop_removed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("cfg");
        let files =
            Files::from([("a".to_string(), (b"1".to_vec(), 0o644)), ("sub/b".to_string(), (b"2".to_vec(), 0o600))]);
        write_atomically(&v, &files, None).unwrap();
        assert_eq!(std::fs::read_to_string(v.join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(v.join("sub/b")).unwrap(), "2");
        let first = std::fs::read_link(v.join("..data")).unwrap();
        write_atomically(&v, &files, None).unwrap();
        assert_eq!(std::fs::read_link(v.join("..data")).unwrap(), first, "no new generation without a change");
        write_atomically(&v, &Files::from([("a".to_string(), (b"3".to_vec(), 0o644))]), None).unwrap();
        assert_eq!(std::fs::read_to_string(v.join("a")).unwrap(), "3");
        assert!(std::fs::symlink_metadata(v.join("sub")).is_err(), "removed keys go");
        assert!(!v.join(&first).exists(), "the old generation goes");
        assert!(write_atomically(&v, &Files::from([("../x".to_string(), (vec![], 0o644))]), None).is_err());
    }

    #[test]
    fn an_fs_group_owns_a_volume_read_only_and_its_directories_pass_it_on() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("secret");
        let files =
            Files::from([("a".to_string(), (b"1".to_vec(), 0o400)), ("sub/b".to_string(), (b"2".to_vec(), 0o600))]);
        write_atomically(&v, &files, Some(1234)).unwrap();
        for (file, mode) in [("a", 0o440), ("sub/b", 0o640)] {
            let meta = std::fs::metadata(v.join(file)).unwrap();
            assert_eq!((meta.gid(), meta.permissions().mode() & 0o7777), (1234, mode), "{file}");
        }
        let sub = std::fs::metadata(v.join("sub")).unwrap();
        assert_eq!(sub.permissions().mode() & 0o2000, 0o2000, "set-group-ID directory");
        let first = std::fs::read_link(v.join("..data")).unwrap();
        write_atomically(&v, &files, Some(1234)).unwrap();
        assert_eq!(std::fs::read_link(v.join("..data")).unwrap(), first, "unchanged: no new generation");
    }

    #[test]
    fn sub_paths_stay_inside_their_volume() {
        let c: Container = serde_json::from_value(
            serde_json::json!({"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/x", "subPath": "../etc"}]}),
        )
        .unwrap();
        let vols = BTreeMap::from([("v".to_string(), PathBuf::from("/tmp"))]);
        assert!(mounts(&c, &vols, &[]).is_err());
        let missing: Container = serde_json::from_value(
            serde_json::json!({"name": "c", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}),
        )
        .unwrap();
        assert!(mounts(&missing, &vols, &[]).unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn sub_path_exprs_expand_the_environment_and_stay_inside_their_volume() {
        let dir = tempfile::tempdir().unwrap();
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c", "volumeMounts": [
            {"name": "v", "mountPath": "/x", "subPathExpr": "$(ANNOTATION)/$(POD_NAME)"}]}))
        .unwrap();
        let vols = BTreeMap::from([("v".to_string(), dir.path().to_path_buf())]);
        let env = |annotation: &str| vec![("ANNOTATION".into(), annotation.into()), ("POD_NAME".into(), "p".into())];
        let m = mounts(&c, &vols, &env("mypath")).unwrap();
        assert_eq!(m[0].host_path, dir.path().join("mypath/p").display().to_string());
        assert!(dir.path().join("mypath/p").is_dir());
        // An unset variable leaves an absolute path: refused, as upstream's kubelet does.
        let err = mounts(&c, &vols, &env("")).unwrap_err().to_string();
        assert!(err.contains("subPathExpr \"/p\" must be a relative path"), "{err}");
    }

    #[test]
    fn host_path_types_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_host_path(&dir.path().join("missing"), "Directory").is_err());
        check_host_path(&dir.path().join("made"), "DirectoryOrCreate").unwrap();
        assert!(dir.path().join("made").is_dir());
        assert!(check_host_path(&dir.path().join("made"), "File").is_err());
    }
}

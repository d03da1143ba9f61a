//! Images: pulls through the runtime under the container's imagePullPolicy, with the
//! Normal/Warning events upstream's kubelet records; the sandbox image is krate's own,
//! imported rather than pulled; an air-gap directory of archives is imported at start.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use k8s_openapi::api::core::v1::ObjectReference;

use crate::cri::{api, Cri};
use crate::oci;
use crate::pods::Shared;

/// The sandbox image krate builds from its embedded pause program.
pub const SANDBOX_IMAGE: &str = "krate.local/pause:1";
const PAUSE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pause"));

/// Upstream's default policy: Always for `:latest` or untagged images, else IfNotPresent.
pub fn effective_policy(image: &str, policy: Option<&str>) -> String {
    if let Some(p) = policy.filter(|p| !p.is_empty()) {
        return p.to_string();
    }
    let name = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || name.contains(':') && !name.ends_with(":latest") {
        "IfNotPresent".into()
    } else {
        "Always".into()
    }
}

async fn present(cri: &mut Cri, image: &str) -> Result<Option<String>> {
    let status = cri
        .images
        .image_status(api::ImageStatusRequest {
            image: Some(api::ImageSpec { image: image.into(), ..Default::default() }),
            verbose: false,
        })
        .await?
        .into_inner();
    Ok(status.image.map(|i| i.id))
}

/// The registry host of an image reference (`docker.io` for bare names like `busybox`).
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// Credentials for pulling `image` from the pod's imagePullSecrets
/// (`kubernetes.io/dockerconfigjson` or the older `kubernetes.io/dockercfg`).
pub async fn pull_auth(
    client: &kube::Client,
    pod: &k8s_openapi::api::core::v1::Pod,
    image: &str,
) -> Result<Option<api::AuthConfig>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let registry = registry_of(image);
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client.clone(), ns);
    for reference in pod.spec.iter().flat_map(|s| s.image_pull_secrets.iter().flatten()) {
        let Some(secret) = secrets.get_opt(&reference.name).await? else {
            tracing::warn!(secret = %reference.name, "an imagePullSecret does not exist; pulling without it");
            continue;
        };
        let data = secret.data.unwrap_or_default();
        let auths: serde_json::Value = if let Some(json) = data.get(".dockerconfigjson") {
            serde_json::from_slice::<serde_json::Value>(&json.0).unwrap_or_default()["auths"].clone()
        } else if let Some(json) = data.get(".dockercfg") {
            serde_json::from_slice(&json.0).unwrap_or_default()
        } else {
            continue;
        };
        for (server, entry) in auths.as_object().into_iter().flatten() {
            let host = server
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default();
            let host = if host == "index.docker.io" || host == "registry-1.docker.io" { "docker.io" } else { host };
            if host == registry {
                let text = |k: &str| entry[k].as_str().unwrap_or_default().to_string();
                // No server_address: containerd 1.6 cannot parse a bare host:port there, and
                // the credentials are for this one pull anyway.
                return Ok(Some(api::AuthConfig {
                    username: text("username"),
                    password: text("password"),
                    auth: text("auth"),
                    ..Default::default()
                }));
            }
        }
    }
    Ok(None)
}

/// Makes `image` available per `policy`; returns the reference to create containers from.
pub async fn ensure(
    shared: &Shared,
    image: &str,
    policy: Option<&str>,
    auth: Option<api::AuthConfig>,
    sandbox: &api::PodSandboxConfig,
    object: &ObjectReference,
) -> Result<String> {
    let mut cri = shared.cri.clone();
    let policy = effective_policy(image, policy);
    if policy != "Always" {
        if let Some(id) = present(&mut cri, image).await? {
            return Ok(id);
        }
        if policy == "Never" {
            let message = format!("Container image \"{image}\" is not present with pull policy of Never");
            shared.events.warning(object, "ErrImageNeverPull", &message).await;
            return Err(anyhow!(message));
        }
    }
    shared.events.normal(object, "Pulling", &format!("Pulling image \"{image}\"")).await;
    let started = std::time::Instant::now();
    let request = api::PullImageRequest {
        image: Some(api::ImageSpec { image: image.into(), ..Default::default() }),
        auth,
        sandbox_config: Some(sandbox.clone()),
    };
    match cri.images.pull_image(request).await {
        Ok(r) => {
            let reference = r.into_inner().image_ref;
            shared
                .events
                .normal(
                    object,
                    "Pulled",
                    &format!("Successfully pulled image \"{image}\" in {:.3}s", started.elapsed().as_secs_f64()),
                )
                .await;
            Ok(reference)
        }
        Err(e) => {
            let message = format!("Failed to pull image \"{image}\": {}", e.message());
            shared.events.warning(object, "Failed", &message).await;
            Err(anyhow!(message))
        }
    }
}

/// krate's echo image: a small static HTTP server on $PORT (8080) answering `GET /x`
/// with `<hostname> /x` (`testdata/test_server.rs`), on every node so that `krate soak`
/// has pods to reach without a registry.
pub const ECHO_IMAGE: &str = "krate.local/echo:1";

/// Imports krate's sandbox and echo images unless the runtime already has them.
pub async fn ensure_builtin_images(cri: &mut Cri, socket: &Path, scratch: &Path) -> Result<()> {
    let program = |name: &str, data: &[u8]| {
        oci::Image::build(
            &[oci::Entry::File { path: name.into(), data: data.to_vec(), mode: 0o755 }],
            &oci::RunConfig { entrypoint: vec![format!("/{name}")], ..Default::default() },
        )
    };
    for (reference, name, data) in
        [(SANDBOX_IMAGE, "pause", PAUSE), (ECHO_IMAGE, "echo", crate::testimages::test_server_program())]
    {
        if present(cri, reference).await?.is_some() {
            continue;
        }
        std::fs::create_dir_all(scratch)?;
        let archive = scratch.join(format!("{name}.oci.tar"));
        program(name, data)?.write_archive(std::fs::File::create(&archive)?, reference)?;
        crate::containerd::import_archive(socket, &archive)
            .await
            .with_context(|| format!("importing krate's image {reference}"))?;
        let _ = std::fs::remove_file(&archive);
    }
    Ok(())
}

/// Imports every archive (`*.tar`, OCI or docker format) in `dir`.
pub async fn import_dir(socket: &Path, dir: &Path) -> Result<usize> {
    let mut count = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "tar") {
            crate::containerd::import_archive(socket, &path).await?;
            count += 1;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_hosts() {
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("library/busybox:1"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/test-server:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("ghcr.io/a/b"), "ghcr.io");
        assert_eq!(registry_of("localhost/x"), "localhost");
    }

    #[test]
    fn pull_policy_defaults() {
        assert_eq!(effective_policy("busybox", None), "Always");
        assert_eq!(effective_policy("busybox:latest", None), "Always");
        assert_eq!(effective_policy("127.0.0.1:5000/busybox", None), "Always");
        assert_eq!(effective_policy("127.0.0.1:5000/busybox:1", None), "IfNotPresent");
        assert_eq!(effective_policy("busybox@sha256:abc", None), "IfNotPresent");
        assert_eq!(effective_policy("busybox", Some("Never")), "Never");
    }
}

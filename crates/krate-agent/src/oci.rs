//! OCI images built in memory from a few files: krate's sandbox image (imported into
//! containerd as an OCI archive) and the test images (pushed to a registry over the
//! registry HTTP API, as a user's CI would push them).

use std::io::{Read, Write};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// One entry of the image's single layer.
pub enum Entry {
    File { path: String, data: Vec<u8>, mode: u32 },
    Symlink { path: String, target: String },
    Dir { path: String },
}

/// What the image runs by default.
#[derive(Default)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
}

/// A built image: its blobs (config and layer) and its manifest.
pub struct Image {
    pub blobs: Vec<(String, Vec<u8>)>,
    pub manifest: Vec<u8>,
}

fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut hex = String::with_capacity(71);
    hex.push_str("sha256:");
    for b in hash {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

fn layer(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        match entry {
            Entry::File { path, data, mode } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                tar.append_data(&mut header, path, data.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                tar.append_link(&mut header, path, target)?;
            }
            Entry::Dir { path } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                tar.append_data(&mut header, path, std::io::empty())?;
            }
        }
    }
    Ok(tar.into_inner()?)
}

impl Image {
    /// Builds a single-layer linux/amd64 image.
    pub fn build(entries: &[Entry], run: &RunConfig) -> Result<Image> {
        let layer = layer(entries)?;
        let layer_digest = digest(&layer);
        let mut config = json!({"Env": run.env});
        if !run.entrypoint.is_empty() {
            config["Entrypoint"] = json!(run.entrypoint);
        }
        if !run.cmd.is_empty() {
            config["Cmd"] = json!(run.cmd);
        }
        if let Some(dir) = &run.working_dir {
            config["WorkingDir"] = json!(dir);
        }
        let config = serde_json::to_vec(&json!({
            "architecture": crate::node::arch(),
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }))?;
        let config_digest = digest(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": layer.len()}],
        }))?;
        Ok(Image { blobs: vec![(config_digest, config), (layer_digest, layer)], manifest })
    }

    pub fn manifest_digest(&self) -> String {
        digest(&self.manifest)
    }

    /// Writes the image as an OCI archive (a tar of an OCI layout) naming it `name`
    /// (e.g. `krate.local/pause:1`), the form `ctr images import` takes.
    pub fn write_archive(&self, out: impl Write, name: &str) -> Result<()> {
        let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": MANIFEST_MEDIA_TYPE, "digest": self.manifest_digest(), "size": self.manifest.len(),
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
            }],
        }))?;
        let mut tar = tar::Builder::new(out);
        let mut add = |path: String, data: &[u8]| -> Result<()> {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            tar.append_data(&mut header, path, data)?;
            Ok(())
        };
        add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        add("index.json".into(), &index)?;
        add(blob_path(&self.manifest_digest()), &self.manifest)?;
        for (d, bytes) in &self.blobs {
            add(blob_path(d), bytes)?;
        }
        tar.into_inner()?.flush()?;
        Ok(())
    }

    /// Pushes the image to a plain-HTTP registry (`host:port`) as `repository:tag`.
    pub fn push(&self, registry: &str, repository: &str, tag: &str) -> Result<()> {
        self.push_as(registry, repository, tag, None)
    }

    /// Pushes with HTTP basic authentication (`user:password`), as registries with
    /// htpasswd accounts want.
    pub fn push_as(&self, registry: &str, repository: &str, tag: &str, credentials: Option<&str>) -> Result<()> {
        let authorization = credentials
            .map(|c| format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, c)));
        let http = |method: &str, path: &str, content_type: Option<&str>, body: &[u8]| {
            http(registry, method, path, content_type, authorization.as_deref(), body)
        };
        for (d, bytes) in &self.blobs {
            let (status, headers, _) = http("POST", &format!("/v2/{repository}/blobs/uploads/"), None, &[])?;
            if status != 202 {
                bail!("registry {registry} refused to start an upload to {repository} (HTTP {status})");
            }
            let location = header(&headers, "location").context("the registry gave no upload location")?;
            let path = location
                .split_once("://")
                .map(|(_, rest)| rest.find('/').map(|i| &rest[i..]).unwrap_or("/"))
                .unwrap_or(location);
            let sep = if path.contains('?') { '&' } else { '?' };
            let (status, _, body) =
                http("PUT", &format!("{path}{sep}digest={d}"), Some("application/octet-stream"), bytes)?;
            if status != 201 {
                bail!("registry {registry} refused blob {d} (HTTP {status}): {}", String::from_utf8_lossy(&body));
            }
        }
        let (status, _, body) =
            http("PUT", &format!("/v2/{repository}/manifests/{tag}"), Some(MANIFEST_MEDIA_TYPE), &self.manifest)?;
        if status != 201 {
            bail!(
                "registry {registry} refused the manifest of {repository}:{tag} (HTTP {status}): {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }
}

fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
}

/// One HTTP/1.1 request on its own connection: (status, raw headers, body).
fn http(
    host: &str,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    authorization: Option<&str>,
    body: &[u8],
) -> Result<(u16, String, Vec<u8>)> {
    let mut stream =
        std::net::TcpStream::connect(host).with_context(|| format!("connecting to the registry at {host}"))?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if let Some(ct) = content_type {
        request.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    if let Some(a) = authorization {
        request.push_str(&format!("Authorization: {a}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split =
        response.windows(4).position(|w| w == b"\r\n\r\n").context("malformed HTTP response from the registry")?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed HTTP status from the registry")?;
    Ok((status, head, response[split + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_holds_the_layout_and_every_blob() {
        let image = Image::build(
            &[Entry::File { path: "pause".into(), data: b"x".to_vec(), mode: 0o755 }],
            &RunConfig { entrypoint: vec!["/pause".into()], ..Default::default() },
        )
        .unwrap();
        let mut archive = Vec::new();
        image.write_archive(&mut archive, "krate.local/pause:1").unwrap();
        let mut names: Vec<String> = tar::Archive::new(archive.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(names.contains(&"index.json".to_string()) && names.contains(&"oci-layout".to_string()));
        let manifest: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
        assert_eq!(manifest["layers"][0]["digest"], image.blobs[1].0.as_str());
        assert!(names.contains(&blob_path(&image.manifest_digest())));
    }
}

//! How another control-plane server joins a cluster on a managed etcd, as kubeadm's
//! `join --control-plane --certificate-key`:
//!
//! 1. A server on etcd keeps its cluster's keys (CA, service-account key, front-proxy CA,
//!    encryption configuration) in the Secret `kube-system/krate-certs`, each file
//!    encrypted with AES-256-GCM under a *certificate key* that exists only on the
//!    servers' disks (`pki/certificate-key`) and in the join command. Bootstrap tokens
//!    of the node group may read that Secret (a Role and RoleBinding like kubeadm's
//!    `kubeadm:kubeadm-certs`): a token alone opens nothing, the key alone reaches nothing.
//! 2. The joining server discovers the cluster's CA as an agent does (`join::discover`:
//!    cluster-info signed for the token, the CA pinned by its hash), reads the Secret
//!    with the token over verified TLS, decrypts the files into its own `pki/` and checks
//!    that the CA is the one it discovered.
//! 3. It adds its etcd member (`crate::etcd::join_member`) at the etcd endpoints the
//!    Secret names, and runs from then on as every server on etcd does.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use serde_json::json;

/// The Secret holding the encrypted keys, in kube-system.
pub const CERTS_SECRET: &str = "krate-certs";
/// The Secret's key naming the etcd client URLs a joining server adds its member at.
const ETCD_ENDPOINTS: &str = "etcd-endpoints";
/// The pki files every server of a cluster holds the same (those present are shared).
const SHARED: &[&str] = &[
    "ca.crt",
    "ca.key",
    "ca-bundle.crt",
    "service-account.key",
    "front-proxy-ca.crt",
    "front-proxy-ca.key",
    "encryption-config.yaml",
];
const KEY_FILE: &str = "certificate-key";
const FIELD_MANAGER: &str = "krate-server";

/// The cluster's certificate key (64 hex digits), created once in `pki/`.
pub fn certificate_key(pki_dir: &Path) -> Result<String> {
    let path = pki_dir.join(KEY_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(text.trim().to_string());
    }
    let key: [u8; 32] = rand::random();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    crate::pki::write_private(&path, &hex)?;
    Ok(hex)
}

fn aead_key(hex: &str) -> Result<LessSafeKey> {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect::<Option<_>>()
        .filter(|b: &Vec<u8>| b.len() == 32)
        .context("--certificate-key must be 64 hexadecimal digits (what `krate server` printed)")?;
    let key = UnboundKey::new(&aead::AES_256_GCM, &bytes).map_err(|_| anyhow::anyhow!("not an AES-256 key"))?;
    Ok(LessSafeKey::new(key))
}

/// `nonce || ciphertext || tag`.
fn seal(key: &LessSafeKey, plain: &[u8]) -> Result<Vec<u8>> {
    let nonce_bytes: [u8; 12] = rand::random();
    let mut data = plain.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce_bytes), Aad::empty(), &mut data)
        .map_err(|_| anyhow::anyhow!("encrypting failed"))?;
    let mut out = nonce_bytes.to_vec();
    out.extend(data);
    Ok(out)
}

fn open(key: &LessSafeKey, sealed: &[u8]) -> Result<Vec<u8>> {
    if sealed.len() < 12 + 16 {
        bail!("too short");
    }
    let (nonce, data) = sealed.split_at(12);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| anyhow::anyhow!("bad nonce"))?;
    let mut data = data.to_vec();
    let plain = key.open_in_place(nonce, Aad::empty(), &mut data).map_err(|_| {
        anyhow::anyhow!("it does not decrypt under --certificate-key: a wrong key, or the Secret of another cluster")
    })?;
    Ok(plain.to_vec())
}

/// Writes `kube-system/krate-certs` (the shared pki files sealed under `key`, and the
/// etcd endpoints) and lets the node group's bootstrap tokens read it.
pub async fn upload(admin: &kube::Client, pki_dir: &Path, key: &str, etcd_endpoints: &[String]) -> Result<()> {
    let sealing = aead_key(key)?;
    let mut data = BTreeMap::new();
    for name in SHARED {
        if let Ok(plain) = std::fs::read(pki_dir.join(name)) {
            data.insert(name.to_string(), ByteString(seal(&sealing, &plain)?));
        }
    }
    data.insert(ETCD_ENDPOINTS.to_string(), ByteString(etcd_endpoints.join(",").into_bytes()));
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": CERTS_SECRET, "namespace": "kube-system"}, "type": "Opaque",
        "data": data.iter().map(|(k, v)| (k.clone(), json!(base64::engine::general_purpose::STANDARD.encode(&v.0)))).collect::<serde_json::Map<_, _>>()});
    Api::<Secret>::namespaced(admin.clone(), "kube-system").patch(CERTS_SECRET, &apply, &Patch::Apply(secret)).await?;
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "krate:krate-certs", "namespace": "kube-system"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [CERTS_SECRET], "verbs": ["get"]}]});
    Api::<Role>::namespaced(admin.clone(), "kube-system")
        .patch("krate:krate-certs", &apply, &Patch::Apply(role))
        .await?;
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "krate:krate-certs", "namespace": "kube-system"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "krate:krate-certs"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": crate::token::NODE_GROUP}]});
    Api::<RoleBinding>::namespaced(admin.clone(), "kube-system")
        .patch("krate:krate-certs", &apply, &Patch::Apply(binding))
        .await?;
    Ok(())
}

/// The join command for another server.
pub fn join_command(agent_command: &str, key: &str) -> String {
    format!("{} --certificate-key {key}", agent_command.replacen("krate agent", "krate server", 1))
}

/// Fetches the cluster's keys into `pki_dir` (which must not hold a CA yet) and returns
/// the etcd endpoints to join at.
pub async fn download(join: &crate::join::Join, key: &str, pki_dir: &Path) -> Result<Vec<String>> {
    if pki_dir.join("ca.key").exists() {
        bail!(
            "{} already holds a CA: a joining server takes the cluster's; start it with a new --data-dir",
            pki_dir.display()
        );
    }
    let opening = aead_key(key)?;
    let token = join.token.as_ref().context("joining a server needs --token")?;
    let ca_pem = crate::join::discover(join, Some(token)).await?;
    let client = crate::join::verified_client(&join.server, &ca_pem, Some(token))?;
    let secret = Api::<Secret>::namespaced(client, "kube-system").get(CERTS_SECRET).await.map_err(|e| match e {
        kube::Error::Api(e) if e.code == 404 => anyhow::anyhow!(
            "the cluster has no kube-system/{CERTS_SECRET}: only a server on etcd (--cluster-init) can be joined by servers"
        ),
        kube::Error::Api(e) if e.code == 403 => {
            anyhow::anyhow!("the token may not read kube-system/{CERTS_SECRET} ({}): use a node-group token", e.message)
        }
        e => anyhow::Error::new(e).context(format!("reading kube-system/{CERTS_SECRET}")),
    })?;
    let data = secret.data.unwrap_or_default();
    std::fs::create_dir_all(pki_dir)?;
    for (name, sealed) in &data {
        if !SHARED.contains(&name.as_str()) {
            continue;
        }
        let plain = open(&opening, &sealed.0).with_context(|| format!("{name} of kube-system/{CERTS_SECRET}"))?;
        if name == "ca.crt" && !ca_pem.contains(String::from_utf8_lossy(&plain).trim()) {
            bail!("the CA in kube-system/{CERTS_SECRET} is not the cluster's discovered CA; refusing it");
        }
        crate::pki::write_private(&pki_dir.join(name), &String::from_utf8_lossy(&plain))?;
    }
    let endpoints: Vec<String> = data
        .get(ETCD_ENDPOINTS)
        .map(|v| String::from_utf8_lossy(&v.0).split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    if endpoints.is_empty() {
        bail!("kube-system/{CERTS_SECRET} names no etcd endpoints: restart the first server (it publishes them) and join again");
    }
    Ok(endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_files_open_only_under_their_key() {
        let key = "11".repeat(32);
        let sealed = seal(&aead_key(&key).unwrap(), b"secret CA key").unwrap();
        assert_eq!(open(&aead_key(&key).unwrap(), &sealed).unwrap(), b"secret CA key");
        let wrong = open(&aead_key(&"22".repeat(32)).unwrap(), &sealed).unwrap_err().to_string();
        assert!(wrong.contains("does not decrypt under --certificate-key"), "{wrong}");
        assert!(aead_key("abc").is_err(), "a short key is refused");
    }
}

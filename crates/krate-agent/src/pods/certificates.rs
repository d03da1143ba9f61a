//! The `podCertificate` projected volume source: the agent makes a private key on this
//! node, asks the named signer for a certificate with a PodCertificateRequest (an empty
//! PKCS#10 request signed by the key, so the API server knows the agent holds it),
//! and writes the key and the issued chain into the volume. The key never leaves the
//! node. What the volume holds is kept beside it (`.podcertificate-<volume>-<n>.json`
//! in the pod's volume directory, outside what containers see), so a refresh or an
//! agent restart reuses the certificate until the signer's `beginRefreshAt`, and only
//! then asks again, keeping the old one until the new one is issued.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::certificates::v1::{PodCertificateRequest, PodCertificateRequestSpec};
use k8s_openapi::api::core::v1::{Node, Pod, PodCertificateProjection, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use serde::{Deserialize, Serialize};

use super::volumes::Files;

/// How long a volume set-up waits for a new request to be issued before it gives up
/// for this attempt (the pod worker tries again).
const ISSUE_WAIT: Duration = Duration::from_secs(10);

/// What the agent keeps of one projection.
#[derive(Default, Serialize, Deserialize)]
struct Held {
    /// The key and chain the volume holds, and when to ask for a new one (unix seconds).
    key: Option<String>,
    chain: Option<String>,
    refresh_at: i64,
    /// A request asked and not yet answered, with the key it was made for.
    pending: Option<Pending>,
}

#[derive(Serialize, Deserialize)]
struct Pending {
    request: String,
    key: String,
}

fn held_path(pod_dir: &Path, volume: &str, index: usize) -> PathBuf {
    pod_dir.join(format!(".podcertificate-{volume}-{index}.json"))
}

/// The files of `source` (the `index`th source of projected volume `volume`).
pub(super) async fn files(
    client: &kube::Client,
    pod: &Pod,
    source: &PodCertificateProjection,
    pod_dir: &Path,
    (volume, index): (&str, usize),
    mode: u32,
) -> Result<Files> {
    let path = held_path(pod_dir, volume, index);
    let mut held: Held = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let now = krate_api::object::unix_seconds();
    if held.chain.is_none() || now >= held.refresh_at {
        let outcome = renew(client, pod, source, &mut held).await;
        std::fs::create_dir_all(pod_dir)?;
        std::fs::write(&path, serde_json::to_vec(&held)?).with_context(|| format!("writing {}", path.display()))?;
        if let Err(e) = outcome {
            // An expiring certificate is still better than none: keep serving it.
            if held.chain.is_none() {
                return Err(e);
            }
            tracing::warn!(volume, error = %format!("{e:#}"), "refreshing a pod certificate failed; keeping the current one");
        }
    }
    let (Some(key), Some(chain)) = (&held.key, &held.chain) else { bail!("no certificate yet") };
    let mut out = Files::new();
    let mut put = |path: &Option<String>, bytes: Vec<u8>| {
        if let Some(p) = path.as_ref().filter(|p| !p.is_empty()) {
            out.insert(p.clone(), (bytes, mode));
        }
    };
    put(&source.credential_bundle_path, format!("{key}{chain}").into_bytes());
    put(&source.key_path, key.clone().into_bytes());
    put(&source.certificate_chain_path, chain.clone().into_bytes());
    Ok(out)
}

/// Moves `held` on: reads the answer to a pending request, or makes a new request and
/// waits a little for it.
async fn renew(client: &kube::Client, pod: &Pod, source: &PodCertificateProjection, held: &mut Held) -> Result<()> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let api: Api<PodCertificateRequest> = Api::namespaced(client.clone(), ns);
    if held.pending.is_none() {
        let key = new_key(&source.key_type)?;
        let request = api.create(&Default::default(), &request_for(client, pod, source, &key).await?).await;
        let request = request.with_context(|| format!("asking signer {:?} for a certificate", source.signer_name))?;
        let name = request.metadata.name.unwrap_or_default();
        held.pending = Some(Pending { request: name, key: key.serialize_pem() });
    }
    let Some(pending) = held.pending.as_ref() else { return Ok(()) };
    let name = pending.request.clone();
    let deadline = tokio::time::Instant::now() + ISSUE_WAIT;
    loop {
        let Some(request) = api.get_opt(&name).await? else {
            held.pending = None;
            bail!("PodCertificateRequest {ns}/{name} was deleted before it was issued; asking again");
        };
        match answer(&request) {
            Answer::Issued { chain, refresh_at } => {
                let pending = held.pending.take().expect("pending request");
                (held.key, held.chain, held.refresh_at) = (Some(pending.key), Some(chain), refresh_at);
                return Ok(());
            }
            Answer::Refused(why) => {
                held.pending = None;
                bail!("signer {:?} did not issue PodCertificateRequest {ns}/{name}: {why}", source.signer_name);
            }
            Answer::Waiting if tokio::time::Instant::now() >= deadline => {
                bail!("waiting for signer {:?} to issue PodCertificateRequest {ns}/{name}", source.signer_name)
            }
            Answer::Waiting => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

enum Answer {
    Issued { chain: String, refresh_at: i64 },
    Refused(String),
    Waiting,
}

fn answer(request: &PodCertificateRequest) -> Answer {
    let Some(status) = &request.status else { return Answer::Waiting };
    let conditions = status.conditions.iter().flatten().filter(|c| c.status == "True");
    for c in conditions {
        match c.type_.as_str() {
            "Issued" => {
                let refresh_at = status.begin_refresh_at.as_ref().map(|t| t.0.as_second()).unwrap_or(0);
                return Answer::Issued {
                    chain: clean_chain(status.certificate_chain.as_deref().unwrap_or("")),
                    refresh_at,
                };
            }
            "Denied" | "Failed" => return Answer::Refused(format!("{}: {}: {}", c.type_, c.reason, c.message)),
            _ => {}
        }
    }
    Answer::Waiting
}

/// The chain's certificates alone, re-encoded (upstream's agent drops text between the
/// blocks and their headers).
fn clean_chain(chain: &str) -> String {
    use base64::Engine;
    let mut out = String::new();
    for der in rustls_pemfile::certs(&mut chain.as_bytes()).flatten() {
        let text = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in text.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// A new key of `key_type` (the names upstream's projection takes).
fn new_key(key_type: &str) -> Result<rcgen::KeyPair> {
    let algorithm = match key_type {
        "ECDSAP256" => &rcgen::PKCS_ECDSA_P256_SHA256,
        "ECDSAP384" => &rcgen::PKCS_ECDSA_P384_SHA384,
        "ED25519" => &rcgen::PKCS_ED25519,
        other => bail!("key type {other:?} is not made by this node agent; use ECDSAP256, ECDSAP384 or ED25519"),
    };
    rcgen::KeyPair::generate_for(algorithm).map_err(|e| anyhow!("making a {key_type} key: {e}"))
}

/// The request for `pod`: the pod, its service account and node by name and UID, an
/// empty PKCS#10 request signed by `key`, owned by the pod so it goes with it.
async fn request_for(
    client: &kube::Client,
    pod: &Pod,
    source: &PodCertificateProjection,
    key: &rcgen::KeyPair,
) -> Result<PodCertificateRequest> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let spec = pod.spec.as_ref().ok_or_else(|| anyhow!("the pod has no spec"))?;
    let node_name = spec.node_name.clone().unwrap_or_default();
    let account = spec.service_account_name.as_deref().filter(|a| !a.is_empty()).unwrap_or("default").to_string();
    let node = Api::<Node>::all(client.clone()).get(&node_name).await.context("reading this node")?;
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get(&account)
        .await
        .with_context(|| format!("reading service account {ns}/{account}"))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(key).map_err(|e| anyhow!("making the PKCS#10 request: {e}"))?;
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
    Ok(PodCertificateRequest {
        metadata: ObjectMeta {
            generate_name: Some("req-".into()),
            namespace: Some(ns.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: pod_name.clone(),
                uid: pod_uid.clone(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: PodCertificateRequestSpec {
            signer_name: source.signer_name.clone(),
            pod_name,
            pod_uid,
            service_account_name: account,
            service_account_uid: sa.metadata.uid.unwrap_or_default(),
            node_name,
            node_uid: node.metadata.uid.unwrap_or_default(),
            max_expiration_seconds: source.max_expiration_seconds,
            stub_pkc_s10_request: k8s_openapi::ByteString(csr.der().to_vec()),
            unverified_user_annotations: source.user_annotations.clone(),
        },
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_the_types_this_agent_makes_sign_a_request_the_api_server_accepts() {
        for key_type in ["ECDSAP256", "ECDSAP384", "ED25519"] {
            let key = new_key(key_type).unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            let csr = params.serialize_request(&key).unwrap();
            use x509_parser::prelude::FromDer;
            let (_, parsed) =
                x509_parser::certification_request::X509CertificationRequest::from_der(csr.der()).unwrap();
            assert!(parsed.verify_signature().is_ok(), "{key_type}");
            assert!(key.serialize_pem().starts_with("-----BEGIN PRIVATE KEY-----"), "{key_type}: PKCS#8");
        }
        assert!(new_key("RSA3072").unwrap_err().to_string().contains("ECDSAP256"));
    }

    #[test]
    fn a_chain_keeps_its_certificates_and_drops_the_rest() {
        let cert = rcgen::generate_simple_self_signed(vec!["a.example".into()]).unwrap().cert.pem();
        let messy = format!("junk before\n{cert}between\n{cert}");
        let clean = clean_chain(&messy);
        assert_eq!(clean.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert!(!clean.contains("junk") && !clean.contains("between"));
    }
}

//! Certificates through the certificates.k8s.io API, as a node asks for them: a
//! CertificateSigningRequest for a key it keeps, watched until the signer issues it (or
//! someone denies it), and when to ask again (at 80% of the lifetime, as the kubelet).
//! The agent's client certificate (`kube-apiserver-client-kubelet`, `krate/src/join.rs`)
//! and its serving certificate (`kubelet-serving`, `krate-agent/src/server.rs`) both
//! come this way.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestStatus,
};
use kube::api::{Api, PostParams};

pub const KUBELET_CLIENT: &str = "kubernetes.io/kube-apiserver-client-kubelet";
pub const KUBELET_SERVING: &str = "kubernetes.io/kubelet-serving";
pub const APISERVER_CLIENT: &str = "kubernetes.io/kube-apiserver-client";

/// The user a node's networking (service proxy, DNS, NetworkPolicy) acts as: an
/// identity of its own, since NetworkPolicy must see every pod and the node authorizer
/// lets a node see only its own. Its group holds what networking reads.
pub fn network_user(node: &str) -> String {
    format!("{NETWORK_USER_PREFIX}{node}")
}
pub const NETWORK_USER_PREFIX: &str = "system:krate:network:";
pub const NETWORK_GROUP: &str = "system:krate:networks";

/// What a node asks for.
pub struct Request<'a> {
    pub signer: &'a str,
    /// The node's name.
    pub node: &'a str,
    /// The subject: `CN=<common_name>, O=<organization>` (a node's own certificates:
    /// `system:node:<node>`, `system:nodes`).
    pub common_name: String,
    pub organization: &'a str,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub usages: &'a [&'a str],
    /// The request's name prefix (upstream's kubelet: `node-csr-`, `csr-`).
    pub generate_name: &'a str,
}

/// The Denied or Failed condition of a request, if it has one.
pub fn refusal(status: &CertificateSigningRequestStatus) -> Option<&CertificateSigningRequestCondition> {
    status.conditions.iter().flatten().find(|c| c.status == "True" && (c.type_ == "Denied" || c.type_ == "Failed"))
}

/// A key pair kept at `path` (made and written, owner-only, the first time).
pub fn key_pair(path: &Path) -> Result<rcgen::KeyPair> {
    if let Ok(pem) = std::fs::read_to_string(path) {
        return rcgen::KeyPair::from_pem(&pem).with_context(|| format!("reading {}", path.display()));
    }
    std::fs::create_dir_all(path.parent().context("a key path has a directory")?)?;
    let key = rcgen::KeyPair::generate()?;
    write_private(path, &key.serialize_pem())?;
    Ok(key)
}

/// Writes `text` readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    write_synced(path, text, 0o600)
}

/// Writes `text` to `path` readable by all (certificates), durably as `write_private`.
pub fn write_public(path: &Path, text: &str) -> Result<()> {
    write_synced(path, text, 0o644)
}

/// Written beside, synced, then renamed over: after a crash or power loss `path` holds
/// either its old content or the new, never a part.
fn write_synced(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Asks for a certificate for `key` and waits until it is issued (PEM); refused or
/// failed requests end with their reason. Every 30 s of waiting says so on stdout (an
/// admin may have to approve).
pub async fn request(client: &kube::Client, key: &rcgen::KeyPair, what: &Request<'_>) -> Result<String> {
    let mut sans: Vec<String> = what.dns_names.clone();
    sans.extend(what.ips.iter().map(IpAddr::to_string));
    let mut params = rcgen::CertificateParams::new(sans)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, what.common_name.clone());
    params.distinguished_name.push(rcgen::DnType::OrganizationName, what.organization);
    let pem = params.serialize_request(key)?.pem()?;
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pem);
    let csr: CertificateSigningRequest = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": what.generate_name},
        "spec": {"request": encoded, "signerName": what.signer, "usages": what.usages},
    }))?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let created = api.create(&PostParams::default(), &csr).await.map_err(|e| match e {
        kube::Error::Api(e) if e.code == 401 => anyhow::anyhow!(
            "the server refused the credentials: the token does not exist, has expired, or is not for authentication"
        ),
        kube::Error::Api(e) if e.code == 403 => {
            anyhow::anyhow!("this identity may not request certificates: {}", e.message)
        }
        e => anyhow::Error::new(e).context("creating the certificate signing request"),
    })?;
    let name = created.metadata.name.clone().unwrap_or_default();
    tracing::info!(csr = %name, node = what.node, signer = what.signer, "asked for a certificate");
    // Decided: issued, denied or failed.
    let decided = |csr: Option<&CertificateSigningRequest>| {
        csr.and_then(|c| c.status.as_ref()).is_some_and(|s| s.certificate.is_some() || refusal(s).is_some())
    };
    let wait = kube::runtime::wait::await_condition(api.clone(), &name, decided);
    tokio::pin!(wait);
    let csr = loop {
        tokio::select! {
            done = &mut wait => break done.with_context(|| format!("watching the certificate signing request {name}"))?,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                println!("waiting for the certificate signing request {name} to be approved (an admin: kubectl certificate approve {name})");
            }
        }
    };
    let status =
        csr.and_then(|c| c.status).with_context(|| format!("the certificate signing request {name} is gone"))?;
    if let Some(c) = refusal(&status) {
        bail!(
            "the certificate signing request {name} was {}: {}",
            c.type_.to_lowercase(),
            c.message.clone().unwrap_or_default()
        );
    }
    let cert =
        status.certificate.with_context(|| format!("the certificate signing request {name} has no certificate"))?;
    Ok(String::from_utf8(cert.0)?)
}

/// When the certificate stored at `path` should be renewed, and when it expires: at 80%
/// of its lifetime from when it was received (the file's time; signers backdate
/// `notBefore` by minutes, which would leave a short-lived certificate no time at all).
pub fn renewal_time(path: &Path) -> Result<(jiff::Timestamp, jiff::Timestamp)> {
    let pem = std::fs::read_to_string(path)?;
    let der = crate::bootstrap::pem_certificates(&pem).into_iter().next().context("no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| anyhow::anyhow!("{e}"))?;
    let received = std::fs::metadata(path)?.modified()?.duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let (from, to) = (cert.validity().not_before.timestamp().max(received), cert.validity().not_after.timestamp());
    let at = |s: i64| jiff::Timestamp::from_second(s).unwrap_or_default();
    Ok((at(from + (to - from) * 8 / 10), at(to)))
}

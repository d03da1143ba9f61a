//! Authentication: TLS client certificates (CN is the user, O entries are groups), as
//! upstream's x509 authenticator. Connections without a certificate are anonymous.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// An authenticated user, as upstream's `user.Info`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    /// Set for service accounts (the account's uid); empty for certificate users.
    pub uid: String,
    /// Further attributes (service-account tokens: the pod they are bound to).
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

impl User {
    pub fn anonymous() -> Self {
        Self { name: "system:anonymous".into(), groups: vec!["system:unauthenticated".into()], ..Self::default() }
    }

    pub fn is_anonymous(&self) -> bool {
        self.name == "system:anonymous"
    }

    /// The user a verified client certificate names.
    pub fn from_certificate(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
        let mut groups: Vec<String> =
            subject.iter_organization().filter_map(|o| o.as_str().ok().map(str::to_string)).collect();
        groups.push("system:authenticated".into());
        Some(Self { name, groups, ..Self::default() })
    }

    pub fn from_peer(certs: Option<&[CertificateDer<'_>]>) -> Self {
        certs.and_then(|c| c.first()).and_then(|c| Self::from_certificate(c)).unwrap_or_else(Self::anonymous)
    }
}

/// PEM inputs for serving TLS.
pub struct TlsFiles {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A rustls server config that asks for (but does not require) client certificates
/// signed by the cluster CA; unauthenticated connections become anonymous.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut files.ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut files.cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut files.key_pem.as_bytes())?
        .ok_or_else(|| anyhow::anyhow!("no private key in the serving key file"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

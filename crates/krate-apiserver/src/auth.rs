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

    /// The user of service account `name` in `namespace`, as its tokens authenticate.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self {
            name: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            ..Self::default()
        }
    }

    /// authentication.k8s.io's UserInfo (TokenReview, SelfSubjectReview, audit events).
    pub fn info(&self) -> serde_json::Value {
        use serde_json::json;
        let mut info = serde_json::Map::new();
        info.insert("username".into(), json!(self.name));
        if !self.uid.is_empty() {
            info.insert("uid".into(), json!(self.uid));
        }
        info.insert("groups".into(), json!(self.groups));
        if !self.extra.is_empty() {
            info.insert("extra".into(), json!(self.extra));
        }
        serde_json::Value::Object(info)
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

/// The client's address, as request extension (the audit log's `sourceIPs`).
#[derive(Clone, Copy, Debug)]
pub struct SourceIp(pub std::net::IpAddr);

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

/// Upstream's impersonation headers: who the request acts as, each part authorized with
/// the `impersonate` verb for the authenticated user first.
pub fn impersonate(
    headers: &http::HeaderMap,
    user: User,
    authorizer: &crate::authz::Chain,
) -> Result<User, krate_api::ApiError> {
    use crate::request::{RequestAttributes, Verb};
    let values = |name: &str| -> Vec<String> {
        headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).map(str::to_string).collect()
    };
    let name = values("impersonate-user").into_iter().next();
    let groups = values("impersonate-group");
    let uid = values("impersonate-uid").into_iter().next();
    let mut extra = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (key, value) in headers {
        if let Some(k) = key.as_str().strip_prefix("impersonate-extra-") {
            let k = percent_decode(k).to_ascii_lowercase();
            extra.entry(k).or_default().extend(value.to_str().ok().map(str::to_string));
        }
    }
    let Some(name) = name else {
        if groups.is_empty() && uid.is_none() && extra.is_empty() {
            return Ok(user);
        }
        return Err(krate_api::ApiError::bad_request(
            "requested impersonation of groups, a uid or extra fields without impersonating a user",
        ));
    };
    let check = |group: &str, resource: &str, sub: &str, namespace: &str, target: &str| {
        let attrs = RequestAttributes::resource(
            user.clone(),
            Verb::parse("impersonate"),
            group,
            resource,
            sub,
            namespace,
            target,
        );
        authorizer.authorize(&attrs)
    };
    let service_account = name.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'));
    match service_account {
        Some((ns, sa)) => check("", "serviceaccounts", "", ns, sa)?,
        None => check("", "users", "", "", &name)?,
    }
    for group in &groups {
        check("", "groups", "", "", group)?;
    }
    if let Some(uid) = &uid {
        check("authentication.k8s.io", "uids", "", "", uid)?;
    }
    for (key, values) in &extra {
        for value in values {
            check("authentication.k8s.io", "userextras", key, "", value)?;
        }
    }
    let mut groups = groups;
    if let (Some((ns, _)), true) = (service_account, groups.is_empty()) {
        groups = vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}")];
    }
    let everyone = if name == "system:anonymous" { "system:unauthenticated" } else { "system:authenticated" };
    if !groups.iter().any(|g| g == everyone) {
        groups.push(everyone.into());
    }
    Ok(User { name, groups, uid: uid.unwrap_or_default(), extra })
}

/// `%XX` escapes of an impersonated extra key (invalid ones stay as they are).
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_keys_are_unescaped() {
        assert_eq!(percent_decode("example.com%2fscopes"), "example.com/scopes");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
    }
}

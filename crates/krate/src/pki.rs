//! The cluster's built-in certificate authority and the certificates krate serves and
//! hands out: created on first start under `<data-dir>/pki`, reused afterwards.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert_pem: String,
    ca_key: KeyPair,
}

/// A certificate and its key, PEM-encoded.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = jiff::Timestamp::now();
    let to_date = |t: jiff::Timestamp| {
        let d = t.to_zoned(jiff::tz::TimeZone::UTC).date();
        rcgen::date_time_ymd(d.year() as i32, d.month() as u8, d.day() as u8)
    };
    params.not_before = to_date(now - jiff::SignedDuration::from_hours(24));
    params.not_after = to_date(now + jiff::SignedDuration::from_hours(24 * days));
}

pub(crate) use krate_client::csr::{write_private, write_public};

impl Pki {
    /// What service-account tokens are signed under (`service-account.key`, an ECDSA
    /// P-256 key in PKCS#8, created once): kept with the CA, which every API server of
    /// the cluster holds.
    pub fn service_account_key(&self) -> Result<Vec<u8>> {
        let path = self.dir.join("service-account.key");
        if path.exists() {
            let key = KeyPair::from_pem(&fs::read_to_string(&path)?).context("reading service-account.key")?;
            return Ok(key.serialize_der());
        }
        let der = krate_apiserver::rest::serviceaccounts::tokens::generate_key();
        let key = KeyPair::try_from(der.as_slice()).context("encoding the service-account key")?;
        write_private(&path, &key.serialize_pem())?;
        Ok(der)
    }

    /// The CA's private key, PEM (for the CSR signer).
    pub fn ca_key_pem(&self) -> String {
        self.ca_key.serialize_pem()
    }

    /// Puts a CA of the operator's own (certificate and key, PEM) in `dir` before the
    /// first start, after checking that the key is the certificate's and the certificate
    /// a CA. A directory that has a CA already must have this one.
    pub fn install_ca(dir: &Path, cert_file: &Path, key_file: &Path) -> Result<()> {
        let read = |p: &Path| fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        let (cert_pem, key_pem) = (read(cert_file)?, read(key_file)?);
        let der = krate_client::bootstrap::pem_certificates(&cert_pem)
            .into_iter()
            .next()
            .with_context(|| format!("{} holds no PEM certificate", cert_file.display()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow::anyhow!("{} is not a certificate: {e}", cert_file.display()))?;
        if !cert.is_ca() {
            anyhow::bail!("{} is not a CA certificate (its basicConstraints do not say CA:TRUE)", cert_file.display());
        }
        let key = KeyPair::from_pem(&key_pem).with_context(|| {
            format!("{} is not a private key krate can use (PKCS#8 or SEC1 EC, or RSA)", key_file.display())
        })?;
        if key.public_key_raw() != &cert.public_key().subject_public_key.data[..] {
            anyhow::bail!("{} is not the key of {}", key_file.display(), cert_file.display());
        }
        let existing = dir.join("ca.crt");
        if existing.exists() {
            if fs::read_to_string(&existing)?.trim() != cert_pem.trim() {
                anyhow::bail!(
                    "{} already has another CA ({}); a cluster's CA cannot be swapped under it (start a new data directory, or leave out --ca-cert)",
                    dir.display(),
                    existing.display()
                );
            }
            return Ok(());
        }
        fs::create_dir_all(dir)?;
        write_private(&dir.join("ca.key"), &key_pem)?;
        write_public(&existing, &cert_pem)?;
        Ok(())
    }

    /// The CA bundle joining nodes are given (cluster-info): `ca-bundle.crt` when the
    /// operator put one there (old and new CA during a rotation), else the CA.
    pub fn ca_bundle_pem(&self) -> String {
        fs::read_to_string(self.dir.join("ca-bundle.crt")).unwrap_or_else(|_| self.ca_cert_pem.clone())
    }

    /// Loads the CA from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        Self::load_or_create_named(dir, "ca", "krate-ca")
    }

    /// The CA stored as `<file>.crt`/`<file>.key` in `dir`, created (as `common_name`) on
    /// first use.
    fn load_or_create_named(dir: &Path, file: &str, common_name: &str) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (cert_path, key_path) = (dir.join(format!("{file}.crt")), dir.join(format!("{file}.key")));
        if cert_path.exists() && key_path.exists() {
            let ca_cert_pem = fs::read_to_string(&cert_path)?;
            let ca_key = KeyPair::from_pem(&fs::read_to_string(&key_path)?)
                .with_context(|| format!("reading {}", key_path.display()))?;
            return Ok(Self { dir: dir.to_path_buf(), ca_cert_pem, ca_key });
        }
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 3650);
        let cert = params.self_signed(&ca_key)?;
        write_private(&key_path, &ca_key.serialize_pem())?;
        write_public(&cert_path, &cert.pem())?;
        Ok(Self { dir: dir.to_path_buf(), ca_cert_pem: cert.pem(), ca_key })
    }

    /// The front proxy's identity for extension API servers (`front-proxy-ca` and
    /// `front-proxy-client`, upstream's names), a CA of its own so that no other client
    /// certificate of the cluster can speak for users to them.
    pub fn front_proxy(&self) -> Result<krate_apiserver::aggregator::FrontProxy> {
        let ca = Self::load_or_create_named(&self.dir, "front-proxy-ca", "front-proxy-ca")?;
        let client = ca.client_certificate("front-proxy-client", "front-proxy-client", &[])?;
        Ok(krate_apiserver::aggregator::FrontProxy {
            client_cert_pem: client.cert_pem,
            client_key_pem: client.key_pem,
            ca_pem: ca.ca_cert_pem,
            client_ca_pem: self.ca_bundle_pem(),
        })
    }

    fn issue(&self, common_name: &str, organizations: &[&str], sans: &[String], server: bool) -> Result<Leaf> {
        let usage = if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth };
        self.issue_for(common_name, organizations, sans, vec![usage])
    }

    fn issue_for(
        &self,
        common_name: &str,
        organizations: &[&str],
        sans: &[String],
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<Leaf> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        for o in organizations {
            params.distinguished_name.push(DnType::OrganizationName, *o);
        }
        for san in sans {
            params.subject_alt_names.push(match san.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(san.as_str().try_into()?),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = usages;
        validity(&mut params, 365);
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, &self.ca_key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A fresh serving certificate for the API server's names and addresses.
    pub fn serving_certificate(&self, sans: &[String]) -> Result<Leaf> {
        let leaf = self.issue("kube-apiserver", &[], sans, true)?;
        write_public(&self.dir.join("apiserver.crt"), &leaf.cert_pem)?;
        write_private(&self.dir.join("apiserver.key"), &leaf.key_pem)?;
        Ok(leaf)
    }

    /// A client certificate stored as `<file>.crt`/`<file>.key`, created once.
    pub fn client_certificate(&self, file: &str, user: &str, groups: &[&str]) -> Result<Leaf> {
        let (cert_path, key_path) = (self.dir.join(format!("{file}.crt")), self.dir.join(format!("{file}.key")));
        if cert_path.exists() && key_path.exists() {
            return Ok(Leaf { cert_pem: fs::read_to_string(cert_path)?, key_pem: fs::read_to_string(key_path)? });
        }
        let leaf = self.issue(user, groups, &[], false)?;
        write_public(&cert_path, &leaf.cert_pem)?;
        write_private(&key_path, &leaf.key_pem)?;
        Ok(leaf)
    }

    /// A fresh certificate for this machine's etcd member, under `etcd/`: it serves
    /// clients and peers at `sans` and is the client certificate the member's peers and
    /// the local API server present (etcd checks only that the cluster CA signed it).
    /// Returns the certificate and key files.
    pub fn etcd_member(&self, name: &str, sans: &[String]) -> Result<(PathBuf, PathBuf)> {
        let usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = self.issue_for(name, &[], sans, usages)?;
        let dir = self.dir.join("etcd");
        fs::create_dir_all(&dir)?;
        let (cert, key) = (dir.join("member.crt"), dir.join("member.key"));
        write_public(&cert, &leaf.cert_pem)?;
        write_private(&key, &leaf.key_pem)?;
        Ok((cert, key))
    }

    /// The cluster CA's certificate file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The cluster-admin client certificate (group system:masters).
    pub fn admin_certificate(&self) -> Result<Leaf> {
        self.client_certificate("admin", "krate-admin", &["system:masters"])
    }

    /// Writes a kubeconfig for `leaf` that points at `server`.
    pub fn write_kubeconfig(&self, path: &Path, server: &str, leaf: &Leaf) -> Result<()> {
        write_private(path, &self.kubeconfig(server, leaf)?)
    }

    /// A kubeconfig with a fresh client certificate for `user` in `groups`.
    pub fn user_kubeconfig(&self, server: &str, user: &str, groups: &[&str]) -> Result<String> {
        self.kubeconfig(server, &self.issue(user, groups, &[], false)?)
    }

    fn kubeconfig(&self, server: &str, leaf: &Leaf) -> Result<String> {
        client_kubeconfig(server, &self.ca_cert_pem, leaf, "krate-admin")
    }
}

/// A kubeconfig for `server`, trusting `ca_pem`, as the holder of `leaf` (named `user`
/// in it).
pub(crate) fn client_kubeconfig(server: &str, ca_pem: &str, leaf: &Leaf, user: &str) -> Result<String> {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "krate", "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(&leaf.cert_pem), "client-key-data": b64(&leaf.key_pem)}}],
        "contexts": [{"name": "krate", "context": {"cluster": "krate", "user": user}}],
        "current-context": "krate",
        "preferences": {},
    });
    Ok(serde_yaml::to_string(&config)?)
}

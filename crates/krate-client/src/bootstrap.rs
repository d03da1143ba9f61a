//! Bootstrap tokens and the discovery they secure, as upstream's `k8s.io/cluster-bootstrap`
//! defines them, shared by the API server (which authenticates them), the controllers
//! (the token cleaner and the bootstrap signer), `krate token` and the joining agent.
//!
//! A token `ID.SECRET` lives in the Secret `kube-system/bootstrap-token-ID` of type
//! `bootstrap.kubernetes.io/token`. The ConfigMap `kube-public/cluster-info` carries a
//! kubeconfig with the cluster's CA and address, readable by anyone, and for every token
//! usable for signing a detached JWS of that kubeconfig (`jws-kubeconfig-ID`), made with
//! the token's secret: a joining node that knows the token can tell the ConfigMap came
//! from the cluster, and one that pins the CA's public key (`sha256:...`) can tell the CA
//! is the one it expects.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};

pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
pub const SECRET_PREFIX: &str = "bootstrap-token-";
pub const SECRET_NAMESPACE: &str = "kube-system";
/// The ConfigMap of discovery and its namespace.
pub const CLUSTER_INFO: &str = "cluster-info";
pub const CLUSTER_INFO_NAMESPACE: &str = "kube-public";
pub const KUBECONFIG_KEY: &str = "kubeconfig";
pub const JWS_PREFIX: &str = "jws-kubeconfig-";
/// The group every bootstrap token's user is in; extra groups must start with it.
pub const GROUP: &str = "system:bootstrappers";
/// The user name prefix of a token's user: `system:bootstrap:ID`.
pub const USER_PREFIX: &str = "system:bootstrap:";
/// The usages a token may carry (`usage-bootstrap-<name>: "true"` in its Secret).
pub const USAGES: [&str; 2] = ["authentication", "signing"];

/// A bootstrap token, `[a-z0-9]{6}.[a-z0-9]{16}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret never reaches a log.
        write!(f, "Token({}.<redacted>)", self.id)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

fn token_chars(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A token ID alone: six lower-case letters or digits.
pub fn valid_id(id: &str) -> bool {
    token_chars(id, 6)
}

impl FromStr for Token {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('.') {
            Some((id, secret)) if valid_id(id) && token_chars(secret, 16) => {
                Ok(Token { id: id.to_string(), secret: secret.to_string() })
            }
            _ => Err("a bootstrap token looks like abcdef.0123456789abcdef ([a-z0-9]{6}.[a-z0-9]{16})".into()),
        }
    }
}

impl Token {
    /// A new random token.
    pub fn generate() -> Self {
        use ring::rand::SecureRandom;
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let rng = ring::rand::SystemRandom::new();
        let pick = |n: usize| {
            let mut out = String::with_capacity(n);
            while out.len() < n {
                let mut byte = [0u8; 1];
                rng.fill(&mut byte).expect("the system's random source works");
                // 252 = 7 * 36: drop the top bytes so every character is equally likely.
                if byte[0] < 252 {
                    out.push(ALPHABET[byte[0] as usize % ALPHABET.len()] as char);
                }
            }
            out
        };
        Token { id: pick(6), secret: pick(16) }
    }

    pub fn secret_name(&self) -> String {
        format!("{SECRET_PREFIX}{}", self.id)
    }

    /// The token's user.
    pub fn user(&self) -> String {
        format!("{USER_PREFIX}{}", self.id)
    }
}

/// What a bootstrap token Secret says.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenSecret {
    pub token: Token,
    pub description: Option<String>,
    pub expiration: Option<jiff::Timestamp>,
    pub usages: Vec<String>,
    pub extra_groups: Vec<String>,
}

impl TokenSecret {
    /// Reads a Secret (as JSON); `None` unless it is a well-formed bootstrap token Secret
    /// whose name matches its token ID.
    pub fn from_secret(secret: &Value) -> Option<Self> {
        if secret["type"] != SECRET_TYPE {
            return None;
        }
        let data = secret["data"].as_object()?;
        let field = |key: &str| -> Option<String> {
            let bytes = STANDARD.decode(data.get(key)?.as_str()?).ok()?;
            String::from_utf8(bytes).ok()
        };
        let token = Token { id: field("token-id")?, secret: field("token-secret")? };
        if !valid_id(&token.id) || !token_chars(&token.secret, 16) {
            return None;
        }
        if secret["metadata"]["name"].as_str() != Some(token.secret_name().as_str()) {
            return None;
        }
        let expiration = match field("expiration") {
            Some(text) => Some(text.parse::<jiff::Timestamp>().ok()?),
            None => None,
        };
        let usages = USAGES
            .iter()
            .filter(|u| field(&format!("usage-bootstrap-{u}")).as_deref() == Some("true"))
            .map(|u| u.to_string())
            .collect();
        let extra_groups = field("auth-extra-groups")
            .map(|g| g.split(',').map(str::trim).filter(|g| !g.is_empty()).map(String::from).collect())
            .unwrap_or_default();
        Some(TokenSecret { token, description: field("description"), expiration, usages, extra_groups })
    }

    /// The Secret that stores this token.
    pub fn to_secret(&self) -> Value {
        let mut data = serde_json::Map::new();
        let mut put = |key: &str, value: &str| {
            data.insert(key.to_string(), json!(STANDARD.encode(value)));
        };
        put("token-id", &self.token.id);
        put("token-secret", &self.token.secret);
        if let Some(d) = &self.description {
            put("description", d);
        }
        if let Some(e) = &self.expiration {
            put("expiration", &e.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
        }
        for usage in &self.usages {
            put(&format!("usage-bootstrap-{usage}"), "true");
        }
        if !self.extra_groups.is_empty() {
            put("auth-extra-groups", &self.extra_groups.join(","));
        }
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": self.token.secret_name(), "namespace": SECRET_NAMESPACE},
            "type": SECRET_TYPE,
            "data": data,
        })
    }

    pub fn expired(&self, now: jiff::Timestamp) -> bool {
        self.expiration.is_some_and(|e| e <= now)
    }

    pub fn has_usage(&self, usage: &str) -> bool {
        self.usages.iter().any(|u| u == usage)
    }

    /// Whether an extra group is one a token may carry (upstream:
    /// `system:bootstrappers:[a-z0-9:-]{0,255}[a-z0-9]`).
    pub fn valid_group(group: &str) -> bool {
        group.strip_prefix(GROUP).and_then(|rest| rest.strip_prefix(':')).is_some_and(|rest| {
            !rest.is_empty()
                && rest.len() <= 256
                && rest.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b':' || b == b'-')
                && !rest.ends_with([':', '-'])
        })
    }
}

/// Compares two byte strings in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The detached JWS (RFC 7515 appendix F: `header..signature`) of `content` under the
/// token, HS256 with the token's secret as key and its ID as `kid`, byte for byte what
/// upstream's bootstrap signer writes.
pub fn sign_detached(content: &str, token: &Token) -> String {
    sign_detached_with(content, &token.id, &token.secret)
}

fn sign_detached_with(content: &str, id: &str, secret: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"HS256","kid":"{id}"}}"#));
    let payload = URL_SAFE_NO_PAD.encode(content);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let signature = ring::hmac::sign(&key, format!("{header}.{payload}").as_bytes());
    format!("{header}..{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

/// Whether `jws` is the detached signature of `content` under `token`.
pub fn verify_detached(content: &str, jws: &str, token: &Token) -> bool {
    constant_time_eq(sign_detached(content, token).as_bytes(), jws.trim().as_bytes())
}

/// A CA certificate's public key pin as kubeadm writes it: `sha256:` and the hex SHA-256
/// of the certificate's DER SubjectPublicKeyInfo.
pub fn ca_cert_hash(cert_der: &[u8]) -> anyhow::Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| anyhow::anyhow!("the CA certificate cannot be parsed: {e}"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    Ok(format!("sha256:{}", digest.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// The DER certificates of a PEM bundle.
pub fn pem_certificates(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

/// The kubeconfig `cluster-info` publishes: the cluster's address and CA bundle, no user.
pub fn cluster_info_kubeconfig(server: &str, ca_pem: &str) -> String {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "", "cluster": {"certificate-authority-data": STANDARD.encode(ca_pem), "server": server}}],
        "contexts": null,
        "current-context": "",
        "preferences": {},
        "users": null,
    });
    // YAML as upstream writes it; JSON is YAML too, and every kubeconfig reader takes it.
    serde_json::to_string_pretty(&config).expect("a JSON value serializes")
}

/// The server address and CA bundle (PEM) of a `cluster-info` kubeconfig.
pub fn read_cluster_info_kubeconfig(text: &str) -> anyhow::Result<(String, String)> {
    let config: Value = parse_kubeconfig(text)?;
    let cluster = &config["clusters"][0]["cluster"];
    let server = cluster["server"].as_str().ok_or_else(|| anyhow::anyhow!("cluster-info names no server"))?;
    let ca = cluster["certificate-authority-data"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("cluster-info carries no certificate-authority-data"))?;
    let ca = STANDARD.decode(ca.trim()).map_err(|e| anyhow::anyhow!("cluster-info's CA is not base64: {e}"))?;
    Ok((server.to_string(), String::from_utf8(ca)?))
}

/// Reads a kubeconfig as JSON or YAML.
fn parse_kubeconfig(text: &str) -> anyhow::Result<Value> {
    if let Ok(v) = serde_json::from_str(text) {
        return Ok(v);
    }
    let config: kube::config::Kubeconfig =
        kube::config::Kubeconfig::from_yaml(text).map_err(|e| anyhow::anyhow!("cluster-info's kubeconfig: {e}"))?;
    Ok(serde_json::to_value(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_generate_in_upstream_form() {
        let t: Token = "abcdef.0123456789abcdef".parse().unwrap();
        assert_eq!((t.id.as_str(), t.secret.as_str()), ("abcdef", "0123456789abcdef"));
        assert_eq!(t.secret_name(), "bootstrap-token-abcdef");
        assert_eq!(format!("{t:?}"), "Token(abcdef.<redacted>)");
        for bad in [
            "abcdef",
            "ABCDEF.0123456789abcdef",
            "abcde.0123456789abcdef",
            "abcdef.0123456789abcde",
            "abcdef:0123456789abcdef",
            "abcdéf.0123456789abcdef",
        ] {
            assert!(bad.parse::<Token>().is_err(), "{bad}");
        }
        let g = Token::generate();
        assert_eq!(g.to_string().parse::<Token>().unwrap(), g);
        assert_ne!(Token::generate(), g);
    }

    #[test]
    fn secrets_round_trip_and_refuse_mismatched_names() {
        let secret = TokenSecret {
            token: "abcdef.0123456789abcdef".parse().unwrap(),
            description: Some("for node-1".into()),
            expiration: Some("2030-01-02T03:04:05Z".parse().unwrap()),
            usages: vec!["authentication".into(), "signing".into()],
            extra_groups: vec!["system:bootstrappers:krate:default-node-token".into()],
        };
        let json = secret.to_secret();
        assert_eq!(json["data"]["usage-bootstrap-signing"], "dHJ1ZQ==");
        assert_eq!(TokenSecret::from_secret(&json), Some(secret.clone()));
        assert!(!secret.expired("2030-01-02T03:04:04Z".parse().unwrap()));
        assert!(secret.expired("2030-01-02T03:04:05Z".parse().unwrap()));
        let mut renamed = json.clone();
        renamed["metadata"]["name"] = json!("bootstrap-token-zzzzzz");
        assert_eq!(TokenSecret::from_secret(&renamed), None);
        let mut opaque = json;
        opaque["type"] = json!("Opaque");
        assert_eq!(TokenSecret::from_secret(&opaque), None);
    }

    #[test]
    fn extra_groups_must_be_under_system_bootstrappers() {
        assert!(TokenSecret::valid_group("system:bootstrappers:krate:default-node-token"));
        for bad in [
            "system:bootstrappers",
            "system:bootstrappers:",
            "system:masters",
            "system:bootstrappers:a:",
            "system:bootstrappers:A",
        ] {
            assert!(!TokenSecret::valid_group(bad), "{bad}");
        }
    }

    #[test]
    fn detached_signatures_match_upstream_and_refuse_other_tokens() {
        // Upstream's test vector (cluster-bootstrap's jws tests).
        assert_eq!(
            sign_detached_with(
                "Hello from the other side. I must have called a thousand times.",
                "joshua",
                "my voice is my passcode"
            ),
            "eyJhbGciOiJIUzI1NiIsImtpZCI6Impvc2h1YSJ9..VShe2taLd-YTrmWuRkcL_8QTNDHYxQIEBsAYYiIj1_8"
        );
        let token: Token = "abcdef.abcdef0123456789".parse().unwrap();
        let jws = sign_detached("Hello, World!", &token);
        let (header, signature) = jws.split_once("..").unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(header).unwrap(), br#"{"alg":"HS256","kid":"abcdef"}"#);
        assert_eq!(signature.len(), 43);
        assert!(verify_detached("Hello, World!", &jws, &token));
        assert!(!verify_detached("Hello, World?", &jws, &token));
        assert!(!verify_detached("Hello, World!", &jws, &"abcdef.abcdef0123456788".parse().unwrap()));
    }

    #[test]
    fn cluster_info_kubeconfig_round_trips() {
        let text = cluster_info_kubeconfig("https://10.0.0.1:6443", "-----BEGIN CERTIFICATE-----\n");
        let (server, ca) = read_cluster_info_kubeconfig(&text).unwrap();
        assert_eq!(server, "https://10.0.0.1:6443");
        assert_eq!(ca, "-----BEGIN CERTIFICATE-----\n");
    }
}

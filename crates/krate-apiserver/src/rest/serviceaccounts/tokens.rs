//! Service-account tokens: JWTs issued through `serviceaccounts/{name}/token`
//! (TokenRequest) and accepted as bearer tokens, with upstream's claims (`sub`
//! `system:serviceaccount:<ns>:<name>`, the `kubernetes.io` claim naming the account and
//! the pod the token is bound to).
//!
//! Signed ES256 under the cluster's service-account key (`pki/service-account.key`, kept
//! with the CA, so every API server of a cluster issues and accepts the same tokens); the
//! public key is published for OIDC discovery, as upstream's ServiceAccountIssuerDiscovery,
//! so that other systems can check a pod's token without asking the API server.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::Resource as _;
use krate_api::object::unix_seconds;
use krate_api::{ApiError, ApiResult, FieldError};
use serde_json::{json, Value};

use crate::auth::User;
use crate::ApiServer;
use base64::Engine;
use ring::signature;
use serde::{Deserialize, Serialize};

/// The issuer and default audience, as upstream's default `--service-account-issuer`.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Upstream's shortest token lifetime.
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
    /// The node of the pod the token is bound to (upstream adds it since 1.32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<ObjectRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

/// Why a bearer token was refused (logged, never told to the client).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("not a JWT")]
    Malformed,
    #[error("bad signature")]
    Signature,
    #[error("expired or not yet valid")]
    Time,
    #[error("not meant for this API server")]
    Audience,
}

/// The service-account token signer: ES256 (ECDSA P-256) under the cluster's
/// service-account key, so that anyone may check a token against the published key set
/// (`/openid/v1/jwks`, found through `/.well-known/openid-configuration`).
pub struct Tokens {
    /// Tokens whose signature was checked, with their claims: a signature stays good, so
    /// each token's is checked once (times and the account are checked on every use).
    verified: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Claims>>>,
    /// The uids of accounts and pods tokens name, by store key, as of a revision.
    uids: std::sync::Mutex<std::collections::HashMap<String, (krate_store::Revision, String)>>,
    key: signature::EcdsaKeyPair,
    /// The uncompressed public point (65 bytes).
    public: Vec<u8>,
    /// Upstream's key id: base64url of the SHA-256 of the public key's DER (PKIX) form.
    kid: String,
}

/// Entries the token caches keep at most; past it a cache starts over.
const REMEMBERED: usize = 10_000;

/// Inserts into a bounded cache.
fn remember<V>(cache: &mut std::collections::HashMap<String, V>, key: String, value: V) {
    if cache.len() >= REMEMBERED {
        cache.clear();
    }
    cache.insert(key, value);
}

/// DER prefix of a P-256 SubjectPublicKeyInfo before the uncompressed point.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A new service-account signing key (PKCS#8 DER).
pub fn generate_key() -> Vec<u8> {
    let rng = ring::rand::SystemRandom::new();
    signature::EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .expect("generating an ECDSA key")
        .as_ref()
        .to_vec()
}

impl Tokens {
    /// Tokens signed under `pkcs8` (an ECDSA P-256 key in PKCS#8 DER).
    pub fn new(pkcs8: &[u8]) -> anyhow::Result<Self> {
        use signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let key = signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
            .map_err(|e| anyhow::anyhow!("the service-account key is not an ECDSA P-256 PKCS#8 key: {e}"))?;
        let public = key.public_key().as_ref().to_vec();
        let spki = [P256_SPKI_PREFIX, &public].concat();
        let kid = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &spki));
        Ok(Self { verified: Default::default(), uids: Default::default(), key, public, kid })
    }

    pub fn issue(&self, claims: &Claims) -> String {
        let header = serde_json::json!({"alg": "ES256", "kid": self.kid});
        let header = URL_SAFE_NO_PAD.encode(header.to_string());
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims encode"));
        let signed = format!("{header}.{payload}");
        let rng = ring::rand::SystemRandom::new();
        let signature = self.key.sign(&rng, signed.as_bytes()).expect("signing a token");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }

    /// The key set (`/openid/v1/jwks`).
    pub fn jwks(&self) -> Value {
        let (x, y) = self.public[1..].split_at(32);
        json!({"keys": [{"use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}]})
    }

    /// The provider configuration (`/.well-known/openid-configuration`). The key set is
    /// named under the issuer, which pods reach as the `kubernetes` Service.
    pub fn discovery(&self) -> Value {
        json!({
            "issuer": ISSUER,
            "jwks_uri": format!("{ISSUER}/openid/v1/jwks"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }

    /// The claims of a token this cluster issued, valid at `now` (Unix seconds) for the
    /// API server's audience.
    pub fn verify(&self, token: &str, now: i64) -> Result<std::sync::Arc<Claims>, Refused> {
        let known = self.verified.lock().expect("token cache lock").get(token).cloned();
        let claims = match known {
            Some(claims) => claims,
            None => {
                let claims = std::sync::Arc::new(self.check_signature(token)?);
                remember(&mut self.verified.lock().expect("token cache lock"), token.to_string(), claims.clone());
                claims
            }
        };
        if now < claims.nbf || now >= claims.exp {
            return Err(Refused::Time);
        }
        if claims.iss != ISSUER || !claims.aud.iter().any(|a| a == ISSUER) {
            return Err(Refused::Audience);
        }
        Ok(claims)
    }

    /// The claims of a token whose signature is this cluster's.
    fn check_signature(&self, token: &str) -> Result<Claims, Refused> {
        let (signed, signature) = token.rsplit_once('.').ok_or(Refused::Malformed)?;
        let (_, payload) = signed.split_once('.').ok_or(Refused::Malformed)?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| Refused::Malformed)?;
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.public)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| Refused::Signature)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| Refused::Malformed)?;
        serde_json::from_slice(&payload).map_err(|_| Refused::Malformed)
    }
}

impl ApiServer {
    /// Whether the cache holds `object` with its uid. Each object's uid is read once per
    /// revision (tokens are checked on every request; parsing the object each time
    /// showed in the API benchmark).
    fn has_uid<T: k8s_openapi::Resource>(&self, namespace: &str, object: &ObjectRef) -> bool {
        let scope = self.storage.builtin::<T>(Some(namespace.to_string()));
        let Ok(cached) = self.storage.cached(&scope, &object.name) else { return false };
        let mut uids = self.tokens.uids.lock().expect("uid cache lock");
        if let Some((revision, uid)) = uids.get(&cached.key) {
            if *revision == cached.revision {
                return *uid == object.uid;
            }
        }
        let uid = cached.parse()["metadata"]["uid"].as_str().unwrap_or_default().to_string();
        let matches = uid == object.uid;
        remember(&mut uids, cached.key.clone(), (cached.revision, uid));
        matches
    }

    /// A core object from the cache (callers sync it once for all their reads).
    fn object<T: k8s_openapi::Resource>(&self, namespace: &str, name: &str) -> ApiResult<Value> {
        Ok(self.storage.cached(&self.storage.builtin::<T>(Some(namespace.to_string())), name)?.parse())
    }

    /// `POST serviceaccounts/{name}/token`: a token for the account, bound to a pod when
    /// the request names one (it stops working when that pod is gone).
    pub async fn request_token(&self, namespace: &str, name: &str, request: &Value) -> ApiResult<Value> {
        self.storage.cache.sync().await;
        let account = self.object::<core::ServiceAccount>(namespace, name)?;
        let spec = &request["spec"];
        let expiration = spec["expirationSeconds"].as_i64().unwrap_or(DEFAULT_EXPIRATION_SECONDS);
        let invalid = |field: &str, value: Value, detail: &str| {
            ApiError::invalid(
                "authentication.k8s.io",
                "TokenRequest",
                name,
                &[FieldError::invalid(field, &value, detail)],
            )
        };
        if expiration < MIN_EXPIRATION_SECONDS {
            return Err(invalid(
                "spec.expirationSeconds",
                json!(expiration),
                "may not specify a duration less than 10 minutes",
            ));
        }
        if expiration > 1 << 32 {
            return Err(invalid(
                "spec.expirationSeconds",
                json!(expiration),
                "may not specify a duration larger than 2^32 seconds",
            ));
        }
        let audiences: Vec<String> = match spec["audiences"].as_array().filter(|a| !a.is_empty()) {
            Some(list) => list.iter().filter_map(|a| a.as_str().map(str::to_string)).collect(),
            None => vec![ISSUER.to_string()],
        };
        let bound = &spec["boundObjectRef"];
        let pod = match bound["kind"].as_str() {
            None => None,
            Some("Pod") => {
                let pod_name = bound["name"].as_str().unwrap_or_default();
                let pod = self.object::<core::Pod>(namespace, pod_name)?;
                let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
                if bound["uid"].as_str().is_some_and(|wanted| !wanted.is_empty() && wanted != uid) {
                    return Err(ApiError::conflict(core::Pod::GROUP, core::Pod::URL_PATH_SEGMENT, pod_name, &format!(
                        "the UID in the bound object reference ({}) does not match the UID in record. The object might have been deleted and then recreated",
                        bound["uid"].as_str().unwrap_or_default()
                    )));
                }
                let node = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()).and_then(|n| {
                    let node = self.storage.cached(&self.storage.builtin::<core::Node>(None), n).ok()?.parse();
                    Some(ObjectRef { name: n.to_string(), uid: node["metadata"]["uid"].as_str()?.to_string() })
                });
                Some((ObjectRef { name: pod_name.to_string(), uid: uid.to_string() }, node))
            }
            Some(other) => return Err(invalid("spec.boundObjectRef.kind", json!(other), "supported values: \"Pod\"")),
        };
        let now = unix_seconds();
        let claims = Claims {
            iss: ISSUER.to_string(),
            sub: format!("system:serviceaccount:{namespace}:{name}"),
            aud: audiences.clone(),
            exp: now + expiration,
            iat: now,
            nbf: now,
            jti: crate::registry::uuid_v4(),
            kubernetes: KubernetesClaims {
                namespace: namespace.to_string(),
                serviceaccount: ObjectRef {
                    name: name.to_string(),
                    uid: account["metadata"]["uid"].as_str().unwrap_or_default().to_string(),
                },
                pod: pod.as_ref().map(|(pod, _)| pod.clone()),
                node: pod.and_then(|(_, node)| node),
            },
        };
        let expires = jiff::Timestamp::from_second(claims.exp)
            .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default();
        let mut echoed = json!({"audiences": audiences, "expirationSeconds": expiration, "boundObjectRef": null});
        if !bound.is_null() {
            echoed["boundObjectRef"] = bound.clone();
        }
        Ok(json!({
            "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": null},
            "spec": echoed,
            "status": {"token": self.tokens.issue(&claims), "expirationTimestamp": expires},
        }))
    }

    /// The user a bearer token stands for: a bootstrap token's (`ID.SECRET`), or the
    /// service account of a JWT while the account (and the pod it is bound to) still
    /// exist as they were when it was issued. Anything else is 401.
    pub async fn authenticate_token(&self, token: &str) -> ApiResult<User> {
        if let Ok(bootstrap) = token.parse::<krate_client::bootstrap::Token>() {
            return self.authenticate_bootstrap_token(&bootstrap).await;
        }
        let claims = self.tokens.verify(token, unix_seconds()).map_err(|why| {
            tracing::debug!(reason = %why, "bearer token refused");
            ApiError::unauthorized()
        })?;
        let k = &claims.kubernetes;
        let account_lives = || self.has_uid::<core::ServiceAccount>(&k.namespace, &k.serviceaccount);
        let pod_lives = || k.pod.as_ref().is_none_or(|pod| self.has_uid::<core::Pod>(&k.namespace, pod));
        // The cache as it is answers almost always; only a token of an account (or pod)
        // it does not show yet waits for it to catch up with the store.
        if !(account_lives() && pod_lives()) {
            self.storage.cache.sync().await;
            if !account_lives() {
                tracing::debug!(account = %claims.sub, "bearer token of a service account that is gone");
                return Err(ApiError::unauthorized());
            }
            if !pod_lives() {
                tracing::debug!(account = %claims.sub, "bearer token bound to a pod that is gone");
                return Err(ApiError::unauthorized());
            }
        }
        let mut extra = std::collections::BTreeMap::new();
        extra.insert("authentication.kubernetes.io/credential-id".to_string(), vec![format!("JTI={}", claims.jti)]);
        if let Some(pod) = &k.pod {
            extra.insert("authentication.kubernetes.io/pod-name".to_string(), vec![pod.name.clone()]);
            extra.insert("authentication.kubernetes.io/pod-uid".to_string(), vec![pod.uid.clone()]);
        }
        if let Some(node) = &k.node {
            extra.insert("authentication.kubernetes.io/node-name".to_string(), vec![node.name.clone()]);
            extra.insert("authentication.kubernetes.io/node-uid".to_string(), vec![node.uid.clone()]);
        }
        Ok(User {
            name: claims.sub.clone(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", k.namespace),
                "system:authenticated".into(),
            ],
            uid: k.serviceaccount.uid.clone(),
            extra,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(aud: &str) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: "system:serviceaccount:ns:default".into(),
            aud: vec![aud.into()],
            exp: 2000,
            iat: 1000,
            nbf: 1000,
            jti: "j".into(),
            kubernetes: KubernetesClaims {
                namespace: "ns".into(),
                serviceaccount: ObjectRef { name: "default".into(), uid: "u".into() },
                pod: None,
                node: None,
            },
        }
    }

    #[test]
    fn issued_tokens_verify_and_tampering_is_refused() {
        let tokens = Tokens::new(&generate_key()).unwrap();
        let token = tokens.issue(&claims(ISSUER));
        assert_eq!(tokens.verify(&token, 1500).map(|c| (*c).clone()), Ok(claims(ISSUER)));
        assert_eq!(tokens.verify(&token, 2000), Err(Refused::Time));
        assert_eq!(tokens.verify(&token, 999), Err(Refused::Time));
        assert_eq!(Tokens::new(&generate_key()).unwrap().verify(&token, 1500), Err(Refused::Signature));
        let (header, rest) = token.split_once('.').unwrap();
        let (_, signature) = rest.split_once('.').unwrap();
        let mut forged = claims(ISSUER);
        forged.sub = "system:serviceaccount:kube-system:admin".into();
        let forged = format!("{header}.{}.{signature}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap()));
        assert_eq!(tokens.verify(&forged, 1500), Err(Refused::Signature));
        assert_eq!(tokens.verify("not-a-token", 1500), Err(Refused::Malformed));
        assert_eq!(tokens.verify(&tokens.issue(&claims("vault")), 1500), Err(Refused::Audience));
    }

    #[test]
    fn the_published_key_checks_issued_tokens() {
        let tokens = Tokens::new(&generate_key()).unwrap();
        let token = tokens.issue(&claims(ISSUER));
        let jwks = tokens.jwks();
        let key = &jwks["keys"][0];
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!((header["alg"].as_str(), &header["kid"]), (Some("ES256"), &key["kid"]));
        let point = [
            &[4u8][..],
            &URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap(),
            &URL_SAFE_NO_PAD.decode(key["y"].as_str().unwrap()).unwrap(),
        ]
        .concat();
        let (signed, sig) = token.rsplit_once('.').unwrap();
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point)
            .verify(signed.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .expect("the key set verifies the token");
        assert_eq!(tokens.discovery()["jwks_uri"], format!("{ISSUER}/openid/v1/jwks"));
    }
}

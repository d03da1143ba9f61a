//! Service-account tokens: JWTs issued through `serviceaccounts/{name}/token`
//! (TokenRequest) and accepted as bearer tokens, with upstream's claims (`sub`
//! `system:serviceaccount:<ns>:<name>`, the `kubernetes.io` claim naming the account and
//! the pod the token is bound to).
//!
//! Signed with HMAC-SHA256 under a key derived from the cluster CA key, so every API
//! server of a cluster issues and accepts the same tokens without another shared secret.
//! Only API servers verify them; nothing outside needs the key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::Resource as _;
use krate_api::object::unix_seconds;
use krate_api::{ApiError, ApiResult, FieldError};
use serde_json::{json, Value};

use crate::auth::User;
use crate::ApiServer;
use base64::Engine;
use ring::hmac;
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

pub struct Tokens {
    key: hmac::Key,
}

impl Tokens {
    /// Tokens signed under a key derived from `secret` (the CA key).
    pub fn new(secret: &[u8]) -> Self {
        let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, b"krate service account tokens"), secret);
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()) }
    }

    pub fn issue(&self, claims: &Claims) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims encode"));
        let signed = format!("{header}.{payload}");
        let signature = URL_SAFE_NO_PAD.encode(hmac::sign(&self.key, signed.as_bytes()));
        format!("{signed}.{signature}")
    }

    /// The claims of a token this cluster issued, valid at `now` (Unix seconds) for the
    /// API server's audience.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, Refused> {
        let (signed, signature) = token.rsplit_once('.').ok_or(Refused::Malformed)?;
        let (_, payload) = signed.split_once('.').ok_or(Refused::Malformed)?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| Refused::Malformed)?;
        hmac::verify(&self.key, signed.as_bytes(), &signature).map_err(|_| Refused::Signature)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| Refused::Malformed)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| Refused::Malformed)?;
        if now < claims.nbf || now >= claims.exp {
            return Err(Refused::Time);
        }
        if claims.iss != ISSUER || !claims.aud.iter().any(|a| a == ISSUER) {
            return Err(Refused::Audience);
        }
        Ok(claims)
    }
}

impl ApiServer {
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
                Some(ObjectRef { name: pod_name.to_string(), uid: uid.to_string() })
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
                pod,
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

    /// The service account a bearer token stands for, while the account (and the pod it
    /// is bound to) still exist as they were when it was issued. Anything else is 401.
    pub async fn authenticate_token(&self, token: &str) -> ApiResult<User> {
        let claims = self.tokens.verify(token, unix_seconds()).map_err(|why| {
            tracing::debug!(reason = %why, "bearer token refused");
            ApiError::unauthorized()
        })?;
        let k = &claims.kubernetes;
        let uid_of = |obj: ApiResult<Value>| obj.ok().and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string));
        let account_lives = || {
            uid_of(self.object::<core::ServiceAccount>(&k.namespace, &k.serviceaccount.name)).as_deref()
                == Some(k.serviceaccount.uid.as_str())
        };
        let pod_lives = || {
            k.pod.as_ref().is_none_or(|pod| {
                uid_of(self.object::<core::Pod>(&k.namespace, &pod.name)).as_deref() == Some(pod.uid.as_str())
            })
        };
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
        if let Some(pod) = &k.pod {
            extra.insert("authentication.kubernetes.io/pod-name".to_string(), vec![pod.name.clone()]);
            extra.insert("authentication.kubernetes.io/pod-uid".to_string(), vec![pod.uid.clone()]);
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
            },
        }
    }

    #[test]
    fn issued_tokens_verify_and_tampering_is_refused() {
        let tokens = Tokens::new(b"ca key");
        let token = tokens.issue(&claims(ISSUER));
        assert_eq!(tokens.verify(&token, 1500), Ok(claims(ISSUER)));
        assert_eq!(tokens.verify(&token, 2000), Err(Refused::Time));
        assert_eq!(tokens.verify(&token, 999), Err(Refused::Time));
        assert_eq!(Tokens::new(b"another key").verify(&token, 1500), Err(Refused::Signature));
        let (header, rest) = token.split_once('.').unwrap();
        let (_, signature) = rest.split_once('.').unwrap();
        let mut forged = claims(ISSUER);
        forged.sub = "system:serviceaccount:kube-system:admin".into();
        let forged = format!("{header}.{}.{signature}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap()));
        assert_eq!(tokens.verify(&forged, 1500), Err(Refused::Signature));
        assert_eq!(tokens.verify("not-a-token", 1500), Err(Refused::Malformed));
        assert_eq!(tokens.verify(&tokens.issue(&claims("vault")), 1500), Err(Refused::Audience));
    }
}

//! CertificateSigningRequests (certificates.k8s.io/v1): on create, the requester's
//! identity is recorded in `spec.username`, `uid`, `groups` and `extra` whatever the
//! client sent (what approvers decide on, as upstream's strategy), and the request must
//! be a PEM `CERTIFICATE REQUEST` with a signer named. Writes of its conditions (through
//! `approval`, which the generic path serves as `Subresource::Approval`, or `status`)
//! are checked here: Approved and Denied exclude each other, timestamps are filled.
//! PodCertificateRequests are answered only by who may `sign` for their signer.

use base64::Engine;
use krate_api::{object, ApiError, ApiResult, FieldError};
use serde_json::{json, Value};

use super::Hooks;
use crate::registry::{Storage, WriteOptions};

const GROUP: &str = "certificates.k8s.io";
const KIND: &str = "CertificateSigningRequest";

pub struct CsrHooks {
    /// Where bootstrap tokens may ask for certificates from (empty: anywhere).
    pub allow: Vec<krate_net::cidr::Cidr>,
}

fn invalid(obj: &Value, errors: &[FieldError]) -> ApiError {
    ApiError::invalid(GROUP, KIND, object::name(obj), errors)
}

/// Problems with a CSR's spec, as upstream's validation reports them.
fn validate_spec(obj: &Value) -> Vec<FieldError> {
    let spec = &obj["spec"];
    let mut errors = Vec::new();
    match spec["request"].as_str().map(|r| base64::engine::general_purpose::STANDARD.decode(r)) {
        None => errors.push(FieldError::required("spec.request", "")),
        Some(Ok(pem)) if parses_as_csr(&pem) => {}
        Some(_) => errors.push(FieldError::invalid(
            "spec.request",
            &spec["request"],
            "PEM block type must be CERTIFICATE REQUEST",
        )),
    }
    match spec["signerName"].as_str() {
        None | Some("") => errors.push(FieldError::required("spec.signerName", "")),
        Some(name) if !name.contains('/') => errors.push(FieldError::invalid(
            "spec.signerName",
            &spec["signerName"],
            "must be a fully qualified domain and path of the form 'example.com/signer-name'",
        )),
        _ => {}
    }
    if spec["usages"].as_array().is_none_or(Vec::is_empty) {
        errors.push(FieldError::required("spec.usages", ""));
    }
    if let Some(seconds) = spec["expirationSeconds"].as_i64() {
        if seconds < 600 {
            errors.push(FieldError::invalid(
                "spec.expirationSeconds",
                &spec["expirationSeconds"],
                "may not specify a duration less than 600 seconds (10 minutes)",
            ));
        }
    }
    errors
}

fn parses_as_csr(pem: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(pem) else { return false };
    block.label == "CERTIFICATE REQUEST"
        && x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents).is_ok()
}

/// Approved and Denied may not both be set, and each condition type appears once.
fn validate_conditions(obj: &Value) -> Vec<FieldError> {
    let conditions = obj["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let mut errors = Vec::new();
    let mut seen = Vec::new();
    for (i, c) in conditions.iter().enumerate() {
        let kind = c["type"].as_str().unwrap_or_default();
        if kind.is_empty() {
            errors.push(FieldError::required(format!("status.conditions[{i}].type"), ""));
        } else if seen.contains(&kind) {
            errors.push(FieldError::duplicate(format!("status.conditions[{i}].type"), &c["type"]));
        }
        seen.push(kind);
    }
    let holds = |t: &str| conditions.iter().any(|c| c["type"] == t && c["status"] == "True");
    if holds("Approved") && holds("Denied") {
        errors.push(FieldError::invalid(
            "status.conditions",
            &json!(conditions),
            "Approved and Denied conditions are mutually exclusive",
        ));
    }
    errors
}

/// Fills condition timestamps a client left out (upstream's
/// populateConditionTimestamps).
fn stamp_conditions(obj: &mut Value) {
    let now = krate_client::now();
    if let Some(conditions) = obj["status"]["conditions"].as_array_mut() {
        for c in conditions {
            for field in ["lastUpdateTime", "lastTransitionTime"] {
                if c[field].is_null() {
                    c[field] = json!(now);
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Hooks for CsrHooks {
    async fn begin_create(&self, _storage: &Storage, obj: &mut Value, opts: &WriteOptions) -> ApiResult<()> {
        let errors = validate_spec(obj);
        if !errors.is_empty() {
            return Err(invalid(obj, &errors));
        }
        let user = opts.request.as_ref().map(|r| r.user.clone()).unwrap_or_default();
        let source = opts.request.as_ref().and_then(|r| r.source);
        let joining = user.name.starts_with(krate_client::bootstrap::USER_PREFIX) || user.name == "system:anonymous";
        if joining && !self.allow.is_empty() {
            let allowed = source.is_some_and(|ip| self.allow.iter().any(|c| c.contains(ip)));
            if !allowed {
                let from = source.map(|ip| ip.to_string()).unwrap_or_else(|| "an unknown address".into());
                let ranges: Vec<String> = self.allow.iter().map(|c| c.to_string()).collect();
                return Err(ApiError::forbidden(format!(
                    "certificatesigningrequests.certificates.k8s.io is forbidden: nodes may join only from {} (--node-registration-allow-cidr); this request came from {from}",
                    ranges.join(", ")
                )));
            }
        }
        let spec = &mut obj["spec"];
        spec["username"] = json!(user.name);
        for (field, value) in [("uid", json!(user.uid)), ("groups", json!(user.groups)), ("extra", json!(user.extra))] {
            let empty = value.as_str() == Some("")
                || value.as_array().is_some_and(Vec::is_empty)
                || value.as_object().is_some_and(|o| o.is_empty());
            if empty {
                object::remove(spec, &[field]);
            } else {
                spec[field] = value;
            }
        }
        Ok(())
    }

    async fn begin_update(&self, _: &Storage, _old: &Value, new: &mut Value, _: &WriteOptions) -> ApiResult<()> {
        stamp_conditions(new);
        let errors = validate_conditions(new);
        if !errors.is_empty() {
            return Err(invalid(new, &errors));
        }
        Ok(())
    }
}

/// PodCertificateRequests: only a signer may answer one. A status write that changes
/// the status needs the `sign` verb on `signers` for the request's signer name (or
/// its `<domain>/*`), as upstream's status strategy asks of its authorizer.
pub struct PodCertificateHooks {
    pub authorizer: std::sync::Arc<crate::authz::Chain>,
}

impl PodCertificateHooks {
    fn may_sign(&self, request: &crate::request::RequestAttributes, signer: &str) -> bool {
        let domain_wildcard = format!("{}/*", signer.split('/').next().unwrap_or_default());
        for name in [signer, domain_wildcard.as_str()] {
            let verb = crate::request::Verb::parse("sign");
            let user = request.user.clone();
            let attrs = crate::request::RequestAttributes::resource(user, verb, GROUP, "signers", "", "", name);
            if self.authorizer.allows(&attrs) {
                return true;
            }
        }
        false
    }
}

#[async_trait::async_trait]
impl Hooks for PodCertificateHooks {
    async fn begin_update(&self, _: &Storage, old: &Value, new: &mut Value, opts: &WriteOptions) -> ApiResult<()> {
        let Some(request) = opts.request.as_deref() else { return Ok(()) };
        if old.get("status") == new.get("status") {
            return Ok(());
        }
        let signer = object::get_str(old, &["spec", "signerName"]).unwrap_or_default();
        if self.may_sign(request, signer) {
            return Ok(());
        }
        let why = format!("User {:?} is not permitted to \"sign\" for signer {signer:?}", request.user.name);
        Err(ApiError::invalid(
            GROUP,
            "PodCertificateRequest",
            object::name(old),
            &[FieldError::forbidden("spec.signerName", &why)],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approved_and_denied_exclude_each_other() {
        let csr = |conditions: Value| json!({"metadata": {"name": "c"}, "status": {"conditions": conditions}});
        assert!(validate_conditions(&csr(json!([{"type": "Approved", "status": "True"}]))).is_empty());
        let both = validate_conditions(&csr(
            json!([{"type": "Approved", "status": "True"}, {"type": "Denied", "status": "True"}]),
        ));
        assert!(both[0].message.contains("mutually exclusive"), "{both:?}");
        let twice = validate_conditions(&csr(
            json!([{"type": "Approved", "status": "True"}, {"type": "Approved", "status": "True"}]),
        ));
        assert_eq!(twice[0].reason, "FieldValueDuplicate");
    }

    #[test]
    fn a_request_that_is_not_a_csr_is_refused() {
        let spec = |request: &str| json!({"spec": {"request": base64::engine::general_purpose::STANDARD.encode(request), "signerName": "kubernetes.io/kube-apiserver-client", "usages": ["client auth"]}});
        let errors = validate_spec(&spec("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"));
        assert_eq!(errors[0].field, "spec.request");
        let errors = validate_spec(&json!({"spec": {}}));
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.request", "spec.signerName", "spec.usages"]);
    }
}

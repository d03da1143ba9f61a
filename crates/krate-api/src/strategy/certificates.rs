//! certificates.k8s.io/v1 PodCertificateRequest: what a node agent asks a signer for on
//! behalf of a pod with a `podCertificate` projected volume. Upstream's rules: the spec
//! is immutable and its stub PKCS#10 request must be signed by the key it carries (so
//! the requester holds the key); the status moves once, from empty to one terminal
//! condition (Issued, Denied or Failed), and an issued chain must be a certificate for
//! that key whose validity the status repeats, no longer than the request allows.

use serde_json::{json, Value};
use x509_parser::prelude::{FromDer, X509Certificate, X509CertificationRequest};

use super::{immutable, Errors, Strategy};
use crate::error::FieldError;
use crate::object::{default, get, get_str};
use crate::validation;

/// The shortest certificate lifetime a request may ask for (an hour).
pub const MIN_MAX_EXPIRATION_SECONDS: i64 = 3600;
/// The longest for signers outside kubernetes.io (91 days).
pub const MAX_MAX_EXPIRATION_SECONDS: i64 = 91 * 24 * 3600;
/// The longest for the kubernetes.io signers (a day), also the default.
pub const KUBERNETES_MAX_EXPIRATION_SECONDS: i64 = 24 * 3600;
/// Key types a `podCertificate` projection may ask for.
pub const KEY_TYPES: &[&str] = &["RSA3072", "RSA4096", "ECDSAP256", "ECDSAP384", "ECDSAP521", "ED25519"];
/// Terminal condition types; at most one, with status True.
const TERMINAL: &[&str] = &["Issued", "Denied", "Failed"];

/// Whether `signer` is one of the Kubernetes project's (`kubernetes.io` or below).
pub fn is_kubernetes_signer(signer: &str) -> bool {
    let host = signer.split('/').next().unwrap_or_default();
    host == "kubernetes.io" || host.ends_with(".kubernetes.io")
}

/// The longest lifetime a request to `signer` may ask for.
pub fn max_expiration_seconds(signer: &str) -> i64 {
    if is_kubernetes_signer(signer) {
        KUBERNETES_MAX_EXPIRATION_SECONDS
    } else {
        MAX_MAX_EXPIRATION_SECONDS
    }
}

/// Upstream's signer-name rule: `<fully qualified domain>/<path>`.
pub fn validate_signer_name(field: &str, signer: &str, errs: &mut Errors) {
    if signer.is_empty() {
        errs.push(FieldError::required(field, ""));
        return;
    }
    let Some((domain, path)) = signer.split_once('/').filter(|(_, p)| !p.contains('/')) else {
        errs.push(FieldError::invalid(
            field,
            &json!(signer),
            "must be a fully qualified domain and path of the form 'example.com/signer-name'",
        ));
        return;
    };
    if domain.len() > 253 {
        errs.push(FieldError::too_long(field, 253));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if let Some((label, msgs)) =
        labels.iter().map(|l| (l, validation::is_dns1123_label(l))).find(|(_, m)| !m.is_empty())
    {
        for msg in msgs {
            errs.push(FieldError::invalid(field, &json!(domain), &format!("validating label \"{label}\": {msg}")));
        }
    }
    if labels.len() < 2 {
        errs.push(FieldError::invalid(
            field,
            &json!(domain),
            "should be a domain with at least two segments separated by dots",
        ));
    }
    if let Some((label, msgs)) =
        path.split('.').map(|l| (l, validation::is_dns1123_subdomain(l))).find(|(_, m)| !m.is_empty())
    {
        for msg in msgs {
            errs.push(FieldError::invalid(field, &json!(path), &format!("validating label \"{label}\": {msg}")));
        }
    }
    if signer.len() > 253 + 253 + 63 + 2 {
        errs.push(FieldError::too_long(field, 253 + 253 + 63 + 2));
    }
}

/// Keys of `unverifiedUserAnnotations` (and a projection's `userAnnotations`) must be
/// label keys with a prefix (`example.com/key`), case aside (upstream's
/// IsDomainPrefixedKey).
pub fn validate_user_annotations(annotations: Option<&Value>, field: &str, errs: &mut Errors) {
    let Some(Value::Object(map)) = annotations else { return };
    for key in map.keys() {
        let lower = key.to_lowercase();
        let msgs = validation::is_qualified_name(&lower);
        if !msgs.is_empty() {
            errs.extend(msgs.iter().map(|msg| FieldError::invalid(field, &json!(lower), msg)));
        } else if lower.split('/').count() != 2 {
            let detail = "must be a domain-prefixed key (such as \"acme.io/foo\")";
            errs.push(FieldError::invalid(field, &json!(lower), detail));
        }
    }
}

pub struct PodCertificateRequestStrategy;

impl Strategy for PodCertificateRequestStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "maxExpirationSeconds"], json!(KUBERNETES_MAX_EXPIRATION_SECONDS));
    }

    fn validate(&self, obj: &Value, errs: &mut Errors) {
        let signer = get_str(obj, &["spec", "signerName"]).unwrap_or_default();
        validate_signer_name("spec.signerName", signer, errs);
        validate_user_annotations(
            get(obj, &["spec", "unverifiedUserAnnotations"]),
            "spec.unverifiedUserAnnotations",
            errs,
        );
        for (field, check) in [
            ("podName", validation::is_dns1123_subdomain as fn(&str) -> Vec<String>),
            ("serviceAccountName", validation::is_dns1123_subdomain),
            ("nodeName", validation::is_dns1123_subdomain),
        ] {
            let value = get_str(obj, &["spec", field]).unwrap_or_default();
            for msg in check(value) {
                errs.push(FieldError::invalid(format!("spec.{field}"), &json!(value), &msg));
            }
        }
        for field in ["podUID", "serviceAccountUID", "nodeUID"] {
            let value = get_str(obj, &["spec", field]).unwrap_or_default();
            if value.is_empty() {
                errs.push(FieldError::invalid(format!("spec.{field}"), &json!(value), "must not be empty"));
            } else if value.len() > 128 {
                errs.push(FieldError::too_long(format!("spec.{field}"), 128));
            }
        }
        let Some(max) = get(obj, &["spec", "maxExpirationSeconds"]).and_then(Value::as_i64) else {
            errs.push(FieldError::required("spec.maxExpirationSeconds", "must be set"));
            return;
        };
        let ceiling = max_expiration_seconds(signer);
        if !(MIN_MAX_EXPIRATION_SECONDS..=ceiling).contains(&max) {
            errs.push(FieldError::invalid(
                "spec.maxExpirationSeconds",
                &json!(max),
                &format!("must be in the range [{MIN_MAX_EXPIRATION_SECONDS}, {ceiling}]"),
            ));
        }
        match stub_request(obj) {
            Some(der) => validate_stub_request(&der, errs),
            None => errs.push(FieldError::invalid_omitting_value(
                "spec",
                "exactly one of (stubPKCS10Request) or (pkixPublicKey, proofOfPossession) must be set",
            )),
        }
    }

    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        // A main-resource write keeps the old status and a status write the old spec,
        // so one check of each covers both.
        immutable(new, old, &["spec"], "spec", errs);
        validate_status_update(new, old, jiff::Timestamp::now().as_second(), errs);
    }
}

/// The stub request's DER, when the spec carries one (JSON has it in base64).
fn stub_request(obj: &Value) -> Option<Vec<u8>> {
    use base64::Engine;
    let text = get_str(obj, &["spec", "stubPKCS10Request"]).filter(|s| !s.is_empty())?;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

const STUB_FIELD: &str = "spec.stubPKCS10Request";

fn validate_stub_request(der: &[u8], errs: &mut Errors) {
    if der.len() > 100 * 1024 {
        errs.push(FieldError::too_long(STUB_FIELD, 100 * 1024));
        return;
    }
    let Ok((_, request)) = X509CertificationRequest::from_der(der) else {
        errs.push(FieldError::invalid_omitting_value(STUB_FIELD, "must be a valid PKCS#10 CSR"));
        return;
    };
    if let Err(msg) = check_key_type(&request.certification_request_info.subject_pki) {
        errs.push(msg);
        return;
    }
    if request.verify_signature().is_err() {
        errs.push(FieldError::invalid_omitting_value(STUB_FIELD, "invalid signature"));
    }
}

/// The key types upstream accepts: Ed25519, ECDSA on P-256/P-384/P-521, RSA of 3072 or
/// 4096 bits. (This server verifies P-521 signatures not at all, so it turns them away.)
fn check_key_type(spki: &x509_parser::x509::SubjectPublicKeyInfo) -> Result<(), FieldError> {
    use x509_parser::public_key::PublicKey;
    match spki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7" | "1.3.132.0.34") => Ok(()),
                Some("1.3.132.0.35") => Err(FieldError::invalid(
                    STUB_FIELD,
                    &json!("curve P-521"),
                    "this server cannot verify P-521 signatures; use ECDSAP256 or ECDSAP384",
                )),
                other => Err(FieldError::invalid(
                    STUB_FIELD,
                    &json!(format!("curve {}", other.unwrap_or("unknown"))),
                    "elliptic public keys must use curve P256, P384, or P521",
                )),
            }
        }
        Ok(PublicKey::RSA(rsa)) => match rsa.key_size() {
            3072 | 4096 => Ok(()),
            bits => Err(FieldError::invalid(
                STUB_FIELD,
                &json!(format!("{bits}-bit modulus")),
                "RSA keys must have modulus size 3072 or 4096",
            )),
        },
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => Ok(()),
        _ => Err(FieldError::invalid_omitting_value(
            STUB_FIELD,
            "unknown public key type; supported types are Ed25519, ECDSA, and RSA",
        )),
    }
}

fn conditions(obj: &Value) -> &[Value] {
    get(obj, &["status", "conditions"]).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default()
}

/// The terminal condition the status holds, if any.
fn terminal(obj: &Value) -> Option<&str> {
    conditions(obj)
        .iter()
        .find(|c| TERMINAL.contains(&c["type"].as_str().unwrap_or_default()) && c["status"] == "True")
        .and_then(|c| c["type"].as_str())
}

fn status_of(obj: &Value) -> Value {
    get(obj, &["status"]).cloned().filter(|s| s.as_object().is_some_and(|m| !m.is_empty())).unwrap_or(Value::Null)
}

fn validate_status_update(new: &Value, old: &Value, now: i64, errs: &mut Errors) {
    let mut known = 0;
    for (i, c) in conditions(new).iter().enumerate() {
        let kind = c["type"].as_str().unwrap_or_default();
        if TERMINAL.contains(&kind) {
            known += 1;
            if known > 1 {
                errs.push(FieldError::invalid(
                    format!("status.conditions[{i}].type"),
                    &json!(kind),
                    "There may be at most one condition with type \"Issued\", \"Denied\", or \"Failed\"",
                ));
            }
            if c["status"] != "True" {
                errs.push(FieldError::not_supported(format!("status.conditions[{i}].status"), &c["status"], &["True"]));
            }
        } else {
            errs.push(FieldError::not_supported(format!("status.conditions[{i}].type"), &json!(kind), TERMINAL));
        }
    }
    if !errs.is_empty() {
        return;
    }
    let unchanged = |errs: &mut Errors, want: Value, detail: &str| {
        if status_of(new) != want {
            errs.push(FieldError::invalid_omitting_value("status", detail));
        }
    };
    if terminal(old).is_some() {
        return unchanged(errs, status_of(old), "immutable after PodCertificateRequest is issued, denied, or failed");
    }
    match terminal(new) {
        Some("Denied" | "Failed") => unchanged(
            errs,
            json!({"conditions": conditions(new)}),
            "non-condition status fields must be empty when denying or failing the PodCertificateRequest",
        ),
        Some(_) => {
            if let Err(e) = validate_issued(new, old, now) {
                errs.push(e);
            }
        }
        None => unchanged(
            errs,
            status_of(old),
            "status is immutable unless transitioning to \"Issued\", \"Denied\", or \"Failed\"",
        ),
    }
}

/// An issued status: a chain of certificates whose leaf is for the requested key, with
/// the leaf's validity repeated in notBefore/notAfter, a lifetime of at least an hour
/// and at most the request's, and beginRefreshAt at least ten minutes inside it.
fn validate_issued(new: &Value, old: &Value, now: i64) -> Result<(), FieldError> {
    const CHAIN: &str = "status.certificateChain";
    let chain = get_str(new, &["status", "certificateChain"]).unwrap_or_default();
    let invalid_chain = |detail: &str| FieldError::invalid(CHAIN, &json!(chain), detail);
    if chain.len() > 100 * 1024 {
        return Err(FieldError::too_long(CHAIN, 100 * 1024));
    }
    let blocks: Vec<_> = x509_parser::pem::Pem::iter_from_buffer(chain.as_bytes()).collect();
    let Some(Ok(leaf_block)) = blocks.first() else {
        return Err(invalid_chain("issued certificate chain must contain at least one certificate"));
    };
    if blocks.iter().any(|b| b.as_ref().map_or(true, |b| b.label != "CERTIFICATE")) {
        return Err(invalid_chain("issued certificate chain must consist entirely of CERTIFICATE PEM blocks"));
    }
    let Ok((_, leaf)) = X509Certificate::from_der(&leaf_block.contents) else {
        return Err(invalid_chain("leaf certificate does not parse as valid X.509"));
    };
    let requested = stub_request(old);
    let requested = requested.as_deref().and_then(|der| X509CertificationRequest::from_der(der).ok()).map(|(_, r)| r);
    let Some(requested) = requested else {
        return Err(FieldError::invalid_omitting_value(STUB_FIELD, "must be a valid PKCS#10 CSR"));
    };
    if requested.certification_request_info.subject_pki.raw != leaf.public_key().raw {
        return Err(invalid_chain("leaf certificate was not issued to the requested public key"));
    }
    let time = |field: &str| get_str(new, &["status", field]).and_then(|t| t.parse::<jiff::Timestamp>().ok());
    let (not_before, not_after, refresh) = (time("notBefore"), time("notAfter"), time("beginRefreshAt"));
    let (Some(not_before), Some(not_after), Some(refresh)) = (not_before, not_after, refresh) else {
        let (field, detail) = if not_before.is_none() {
            ("status.notBefore", "must be present and consistent with the issued certificate")
        } else if not_after.is_none() {
            ("status.notAfter", "must be present and consistent with the issued certificate")
        } else {
            ("status.beginRefreshAt", "must be present and in the range [notbefore+10min, notafter-10min]")
        };
        return Err(FieldError::required(field, detail));
    };
    let leaf_before = leaf.validity().not_before.timestamp();
    let leaf_after = leaf.validity().not_after.timestamp();
    let rendered = |t: jiff::Timestamp| json!(t.strftime("%Y-%m-%d %H:%M:%S +0000 UTC").to_string());
    if not_before.as_second() != leaf_before {
        return Err(FieldError::invalid(
            "status.notBefore",
            &rendered(not_before),
            "must be set to the NotBefore time encoded in the leaf certificate",
        ));
    }
    if (not_before.as_second() - now).abs() > 5 * 60 {
        return Err(FieldError::invalid(
            "status.notBefore",
            &rendered(not_before),
            "must be set to within 5 minutes of kube-apiserver's current time",
        ));
    }
    if not_after.as_second() != leaf_after {
        return Err(FieldError::invalid(
            "status.notAfter",
            &rendered(not_after),
            "must be set to the NotAfter time encoded in the leaf certificate",
        ));
    }
    let lifetime = leaf_after - leaf_before;
    let max = get(old, &["spec", "maxExpirationSeconds"]).and_then(Value::as_i64).unwrap_or_default();
    if lifetime < 3600 {
        return Err(FieldError::invalid(CHAIN, &json!(lifetime), "leaf certificate lifetime must be >= 1 hour"));
    }
    if lifetime > max {
        return Err(FieldError::invalid(
            CHAIN,
            &json!(lifetime),
            &format!("leaf certificate lifetime must be <= spec.maxExpirationSeconds ({max})"),
        ));
    }
    if refresh.as_second() < not_before.as_second() + 600 {
        return Err(FieldError::invalid(
            "status.beginRefreshAt",
            &rendered(refresh),
            "must be at least 10 minutes after status.notBefore",
        ));
    }
    if refresh.as_second() > not_after.as_second() - 600 {
        return Err(FieldError::invalid(
            "status.beginRefreshAt",
            &rendered(refresh),
            "must be at least 10 minutes before status.notAfter",
        ));
    }
    for block in blocks.iter().skip(1).flatten() {
        if X509Certificate::from_der(&block.contents).is_err() {
            return Err(invalid_chain("intermediate certificate does not parse as valid X.509"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use std::time::Duration;

    /// 2026-01-01T00:00:00Z, the tests' "now".
    const NOW: i64 = 1_767_225_600;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn stub_request(key: &rcgen::KeyPair) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.serialize_request(key).unwrap().der().to_vec()
    }

    fn request(key: &rcgen::KeyPair, signer: &str, max: i64) -> Value {
        json!({"metadata": {"name": "req-1", "namespace": "default"}, "spec": {
            "signerName": signer, "podName": "web", "podUID": "u-1", "serviceAccountName": "default",
            "serviceAccountUID": "u-2", "nodeName": "node-1", "nodeUID": "u-3", "maxExpirationSeconds": max,
            "stubPKCS10Request": b64(&stub_request(key)),
        }})
    }

    /// A certificate for `key` valid from NOW-60s for `lifetime`.
    fn certificate(key: &rcgen::KeyPair, lifetime: Duration) -> String {
        let mut params = rcgen::CertificateParams::default();
        params.not_before = rcgen::date_time_ymd(2026, 1, 1) - Duration::from_secs(60);
        params.not_after = params.not_before + lifetime;
        params.self_signed(key).unwrap().pem()
    }

    fn issued(req: &Value, chain: &str, lifetime: i64) -> Value {
        let at = |s: i64| jiff::Timestamp::from_second(s).unwrap().to_string();
        let (before, after) = (NOW - 60, NOW - 60 + lifetime);
        let mut new = req.clone();
        new["status"] = json!({"certificateChain": chain, "notBefore": at(before), "notAfter": at(after),
            "beginRefreshAt": at(after - 1800),
            "conditions": [{"type": "Issued", "status": "True", "reason": "E2E", "message": "ok",
                "lastTransitionTime": at(NOW)}]});
        new
    }

    fn errors(f: impl FnOnce(&mut Errors)) -> Vec<String> {
        let mut errs = Vec::new();
        f(&mut errs);
        errs.into_iter().map(|e| format!("{}: {}", e.field, e.message)).collect()
    }

    #[test]
    fn a_request_signed_by_its_key_is_accepted_and_its_lifetime_bounded_by_its_signer() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ok = request(&key, "example.com/signer", 3600);
        assert_eq!(errors(|e| PodCertificateRequestStrategy.validate(&ok, e)), Vec::<String>::new());
        let long = request(&key, "kubernetes.io/kube-apiserver-client-pod", 2 * 86400);
        assert_eq!(
            errors(|e| PodCertificateRequestStrategy.validate(&long, e)),
            ["spec.maxExpirationSeconds: Invalid value: 172800: must be in the range [3600, 86400]"]
        );
        let mut unsigned = ok.clone();
        let mut der = stub_request(&key);
        *der.last_mut().unwrap() ^= 1;
        unsigned["spec"]["stubPKCS10Request"] = json!(b64(&der));
        assert_eq!(
            errors(|e| PodCertificateRequestStrategy.validate(&unsigned, e)),
            ["spec.stubPKCS10Request: Invalid value: invalid signature"]
        );
        // Keys are prefixed label keys (the e2e signer's own is `spiffe/path-overriding`).
        let mut annotated = ok.clone();
        annotated["spec"]["unverifiedUserAnnotations"] = json!({"spiffe/path-overriding": "/x", "plain": "y"});
        assert_eq!(
            errors(|e| PodCertificateRequestStrategy.validate(&annotated, e)),
            ["spec.unverifiedUserAnnotations: Invalid value: \"plain\": must be a domain-prefixed key (such as \"acme.io/foo\")"]
        );
        let mut bad_signer = ok;
        bad_signer["spec"]["signerName"] = json!("signer");
        assert!(errors(|e| PodCertificateRequestStrategy.validate(&bad_signer, e))[0]
            .contains("must be a fully qualified domain and path of the form 'example.com/signer-name'"));
    }

    #[test]
    fn an_issued_status_must_hold_a_certificate_for_the_requested_key_within_the_request() {
        let key = rcgen::KeyPair::generate().unwrap();
        let req = request(&key, "example.com/signer", 7200);
        let hour = Duration::from_secs(3600);
        let good = issued(&req, &certificate(&key, hour), 3600);
        assert_eq!(errors(|e| validate_status_update(&good, &req, NOW, e)), Vec::<String>::new());

        let other = rcgen::KeyPair::generate().unwrap();
        let stolen = issued(&req, &certificate(&other, hour), 3600);
        assert!(errors(|e| validate_status_update(&stolen, &req, NOW, e))[0]
            .ends_with("leaf certificate was not issued to the requested public key"));
        let misdated = issued(&req, &certificate(&key, hour), 7200);
        assert_eq!(
            errors(|e| validate_status_update(&misdated, &req, NOW, e)),
            ["status.notAfter: Invalid value: \"2026-01-01 01:59:00 +0000 UTC\": must be set to the NotAfter time encoded in the leaf certificate"]
        );
        let too_long = issued(&req, &certificate(&key, 3 * hour), 3 * 3600);
        assert!(errors(|e| validate_status_update(&too_long, &req, NOW, e))[0]
            .ends_with("leaf certificate lifetime must be <= spec.maxExpirationSeconds (7200)"));
        let late = issued(&req, &certificate(&key, hour), 3600);
        assert!(errors(|e| validate_status_update(&late, &req, NOW + 600, e))[0]
            .ends_with("must be set to within 5 minutes of kube-apiserver's current time"));
    }

    #[test]
    fn a_status_moves_once_to_one_terminal_condition() {
        let key = rcgen::KeyPair::generate().unwrap();
        let req = request(&key, "example.com/signer", 3600);
        let done = issued(&req, &certificate(&key, Duration::from_secs(3600)), 3600);
        let mut changed = done.clone();
        changed["status"]["conditions"][0]["message"] = json!("again");
        assert_eq!(
            errors(|e| validate_status_update(&changed, &done, NOW, e)),
            ["status: Invalid value: immutable after PodCertificateRequest is issued, denied, or failed"]
        );
        let mut denied = req.clone();
        denied["status"] = json!({"certificateChain": "x", "conditions": [{"type": "Denied", "status": "True"}]});
        assert_eq!(
            errors(|e| validate_status_update(&denied, &req, NOW, e)),
            ["status: Invalid value: non-condition status fields must be empty when denying or failing the PodCertificateRequest"]
        );
        let mut two = req.clone();
        two["status"] =
            json!({"conditions": [{"type": "Denied", "status": "True"}, {"type": "Failed", "status": "True"}]});
        assert!(errors(|e| validate_status_update(&two, &req, NOW, e))[0].starts_with("status.conditions[1].type"));
        let mut pending = req.clone();
        pending["status"] = json!({"certificateChain": "x"});
        assert!(errors(|e| validate_status_update(&pending, &req, NOW, e))[0].contains("status is immutable unless"));
    }
}

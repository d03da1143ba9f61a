//! The certificate controllers, as upstream's:
//! - the **approver** approves CSRs for `kubernetes.io/kube-apiserver-client-kubelet`
//!   (a node's client certificate) when the requester may, by a SubjectAccessReview:
//!   `create certificatesigningrequests/selfnodeclient` when renewing its own
//!   certificate, `.../nodeclient` for a first one (bootstrap tokens have it by default).
//!   Anything else waits for `kubectl certificate approve`. A bootstrap token's request
//!   for the name of a node already in the cluster is denied (krate's addition: a
//!   token brings new nodes, it does not take over existing ones). Serving certificates
//!   (`kubernetes.io/kubelet-serving`) are approved when a node asks for its own names
//!   and addresses only (krate's addition, as k3s; upstream leaves them to an admin),
//!   and a node's request for its networking identity (`kube-apiserver-client`,
//!   `system:krate:network:<node>`).
//! - the **signer** issues approved CSRs of the `kubernetes.io/` signers it serves
//!   (`kube-apiserver-client`, `kube-apiserver-client-kubelet`, `kubelet-serving`) with
//!   the cluster CA, after checking the request has the shape its signer requires; one
//!   that does not is marked Failed.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::ResourceExt;
use rcgen::{CertificateSigningRequestParams, DnType, DnValue, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
use serde_json::json;

use crate::Error;

pub const KUBELET_CLIENT: &str = "kubernetes.io/kube-apiserver-client-kubelet";
pub const KUBELET_SERVING: &str = "kubernetes.io/kubelet-serving";
pub const APISERVER_CLIENT: &str = "kubernetes.io/kube-apiserver-client";

/// The CA the signer issues with.
#[derive(Clone)]
pub struct SigningCa {
    pub cert_pem: String,
    pub key_pem: String,
    /// The longest lifetime it gives (upstream's `--cluster-signing-duration`).
    pub duration: Duration,
}

impl std::fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCa").field("duration", &self.duration).finish_non_exhaustive()
    }
}

fn condition(csr: &CertificateSigningRequest, kind: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == kind && c.status == "True"))
}

/// What a request asks for, read from its PEM (its signature checked).
struct Request {
    common_name: String,
    organizations: Vec<String>,
    sans: Vec<SanType>,
    parsed: CertificateSigningRequestParams,
}

fn text(value: &DnValue) -> String {
    match value {
        DnValue::Utf8String(s) => s.clone(),
        DnValue::PrintableString(s) => s.as_str().to_string(),
        DnValue::Ia5String(s) => s.as_str().to_string(),
        DnValue::TeletexString(s) => s.as_str().to_string(),
        _ => String::new(),
    }
}

fn read_request(csr: &CertificateSigningRequest) -> Result<Request, String> {
    let pem = String::from_utf8(csr.spec.request.0.clone()).map_err(|_| "the request is not PEM".to_string())?;
    let parsed =
        CertificateSigningRequestParams::from_pem(&pem).map_err(|e| format!("the request cannot be parsed: {e}"))?;
    let dn = &parsed.params.distinguished_name;
    let common_name = dn.get(&DnType::CommonName).map(text).unwrap_or_default();
    let organizations = dn.iter().filter(|(t, _)| **t == DnType::OrganizationName).map(|(_, v)| text(v)).collect();
    let sans = parsed.params.subject_alt_names.clone();
    Ok(Request { common_name, organizations, sans, parsed })
}

/// The usages of a CSR as a sorted list.
fn usages(csr: &CertificateSigningRequest) -> Vec<String> {
    let mut u = csr.spec.usages.clone().unwrap_or_default();
    u.sort();
    u.dedup();
    u
}

/// Whether `usages` are `required` plus, at most, "key encipherment" (which RSA keys
/// use), as upstream's kubelet validations allow.
fn usages_are(usages: &[String], required: &[&str]) -> bool {
    let mut wanted: Vec<&str> = required.to_vec();
    wanted.sort();
    let without: Vec<&str> = usages.iter().map(String::as_str).filter(|u| *u != "key encipherment").collect();
    without == wanted
}

/// Why a request does not fit its signer, if it does not.
fn misfit(csr: &CertificateSigningRequest, request: &Request) -> Option<String> {
    let usages = usages(csr);
    let node_subject = request.common_name.starts_with("system:node:")
        && request.common_name.len() > "system:node:".len()
        && request.organizations == ["system:nodes"];
    match csr.spec.signer_name.as_str() {
        KUBELET_CLIENT => {
            if !node_subject {
                return Some("subject must be CN=system:node:<name>, O=system:nodes".into());
            }
            if !request.sans.is_empty() {
                return Some("a kubelet client certificate carries no subject alternative names".into());
            }
            if !usages_are(&usages, &["client auth", "digital signature"]) {
                return Some(format!(
                    "usages must be digital signature and client auth (and key encipherment), not {usages:?}"
                ));
            }
        }
        KUBELET_SERVING => {
            if !node_subject {
                return Some("subject must be CN=system:node:<name>, O=system:nodes".into());
            }
            if !request.sans.iter().any(|s| matches!(s, SanType::DnsName(_) | SanType::IpAddress(_))) {
                return Some("a kubelet serving certificate names at least one DNS name or IP address".into());
            }
            if request.sans.iter().any(|s| !matches!(s, SanType::DnsName(_) | SanType::IpAddress(_))) {
                return Some("a kubelet serving certificate names only DNS names and IP addresses".into());
            }
            if !usages_are(&usages, &["digital signature", "server auth"]) {
                return Some(format!(
                    "usages must be digital signature and server auth (and key encipherment), not {usages:?}"
                ));
            }
        }
        APISERVER_CLIENT => {
            if !usages.iter().any(|u| u == "client auth") || usages.iter().any(|u| u == "server auth") {
                return Some(format!("usages must include client auth and not server auth, not {usages:?}"));
            }
        }
        _ => return None,
    }
    None
}

struct Context {
    client: kube::Client,
    ca: Option<SigningCa>,
    /// Whether bootstrap tokens' requests are approved (else an admin approves them).
    approve_joins: bool,
}

async fn put_subresource(ctx: &Context, csr: &CertificateSigningRequest, sub: &str) -> Result<(), Error> {
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    api.replace_subresource(sub, &csr.name_any(), &PostParams::default(), csr).await?;
    Ok(())
}

fn add_condition(csr: &mut CertificateSigningRequest, kind: &str, reason: &str, message: &str) {
    let now = krate_client::now();
    let value = json!({"type": kind, "status": "True", "reason": reason, "message": message, "lastUpdateTime": now, "lastTransitionTime": now});
    let status = csr.status.get_or_insert_with(Default::default);
    status.conditions.get_or_insert_with(Vec::new).push(serde_json::from_value(value).expect("a valid condition"));
}

/// Approves `csr` as the controller does (reason AutoApproved, `message`).
async fn auto_approve(ctx: &Context, csr: &CertificateSigningRequest, message: &str) -> Result<(), Error> {
    let mut approved = csr.clone();
    add_condition(&mut approved, "Approved", "AutoApproved", message);
    put_subresource(ctx, &approved, "approval").await
}

/// Whether the requester may have a node client certificate approved automatically.
async fn may_auto_approve(ctx: &Context, csr: &CertificateSigningRequest, request: &Request) -> Result<bool, Error> {
    let spec = &csr.spec;
    let own = spec.username.as_deref() == Some(request.common_name.as_str());
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {
            "user": spec.username, "uid": spec.uid, "groups": spec.groups, "extra": spec.extra,
            "resourceAttributes": {"group": "certificates.k8s.io", "resource": "certificatesigningrequests",
                "verb": "create", "subresource": if own { "selfnodeclient" } else { "nodeclient" }},
        },
    }))?;
    let answer = Api::<SubjectAccessReview>::all(ctx.client.clone()).create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Why a serving certificate request is not only for its requester's own node, if it is
/// not: the requester must be `system:node:<name>` in `system:nodes`, the subject that
/// node, the DNS names the node's name or its DNS addresses, the IPs its addresses.
fn not_own_serving_request(csr: &CertificateSigningRequest, request: &Request, node: Option<&Node>) -> Option<String> {
    let spec = &csr.spec;
    let Some(node) = node else { return Some("no such node".into()) };
    let name = node.name_any();
    if spec.username.as_deref() != Some(request.common_name.as_str())
        || request.common_name != format!("system:node:{name}")
        || !spec.groups.iter().flatten().any(|g| g == "system:nodes")
    {
        return Some(format!("requested by {:?}, not by node {name}", spec.username.as_deref().unwrap_or_default()));
    }
    let addresses: Vec<&str> =
        node.status.iter().flat_map(|s| s.addresses.iter().flatten()).map(|a| a.address.as_str()).collect();
    let foreign: Vec<String> = request
        .sans
        .iter()
        .filter_map(|san| match san {
            SanType::DnsName(dns) if dns.as_str() == name || addresses.contains(&dns.as_str()) => None,
            SanType::IpAddress(ip) if addresses.contains(&ip.to_string().as_str()) => None,
            other => Some(format!("{other:?}")),
        })
        .collect();
    (!foreign.is_empty()).then(|| format!("names {} besides the node's own names and addresses", foreign.join(", ")))
}

async fn approve(csr: Arc<CertificateSigningRequest>, ctx: Arc<Context>) -> Result<Action, Error> {
    if condition(&csr, "Approved") || condition(&csr, "Denied") {
        return Ok(Action::await_change());
    }
    if csr.spec.signer_name == KUBELET_SERVING {
        return approve_serving(&csr, &ctx).await;
    }
    if csr.spec.signer_name == APISERVER_CLIENT {
        return approve_network_identity(&csr, &ctx).await;
    }
    if csr.spec.signer_name != KUBELET_CLIENT {
        return Ok(Action::await_change());
    }
    let Ok(request) = read_request(&csr) else { return Ok(Action::await_change()) };
    if misfit(&csr, &request).is_some() || !may_auto_approve(&ctx, &csr, &request).await? {
        return Ok(Action::await_change());
    }
    // A token may bring a new node, not take over the name of one that is there.
    let node = request.common_name.trim_start_matches("system:node:");
    // A joining machine: a bootstrap token's user, or nobody (--node-registration open).
    let joining =
        csr.spec.username.as_deref().is_some_and(|u| u.starts_with("system:bootstrap:") || u == "system:anonymous");
    if joining && !ctx.approve_joins {
        tracing::info!(csr = %csr.name_any(), node, "a new node waits for approval (--node-registration approve)");
        return Ok(Action::await_change());
    }
    if joining && Api::<Node>::all(ctx.client.clone()).get_opt(node).await?.is_some() {
        let mut denied = (*csr).clone();
        let message = format!("node {node:?} is in the cluster already; a joining machine cannot take over its name (delete it first, kubectl delete node {node}, to join another machine under it)");
        add_condition(&mut denied, "Denied", "NodeExists", &message);
        put_subresource(&ctx, &denied, "approval").await?;
        tracing::info!(csr = %csr.name_any(), node, "denied a bootstrap request for an existing node's name");
        return Ok(Action::await_change());
    }
    auto_approve(&ctx, &csr, "Auto approving kubelet client certificate after SubjectAccessReview.").await?;
    tracing::info!(csr = %csr.name_any(), user = ?csr.spec.username, "approved a node client certificate");
    Ok(Action::await_change())
}

/// Serving certificates are approved for a node's own names and addresses (krate's
/// addition, as k3s signs its agents' serving certificates: upstream leaves them to an
/// admin or an external approver); anything else waits for `kubectl certificate approve`.
async fn approve_serving(csr: &CertificateSigningRequest, ctx: &Context) -> Result<Action, Error> {
    let Ok(request) = read_request(csr) else { return Ok(Action::await_change()) };
    if misfit(csr, &request).is_some() {
        return Ok(Action::await_change());
    }
    let name = request.common_name.trim_start_matches("system:node:");
    let node = Api::<Node>::all(ctx.client.clone()).get_opt(name).await?;
    if let Some(why) = not_own_serving_request(csr, &request, node.as_ref()) {
        // A node that just registered may not report its addresses yet: look again for
        // a few minutes.
        let age = csr.metadata.creation_timestamp.as_ref().map(|t| jiff::Timestamp::now().duration_since(t.0));
        if age.is_some_and(|a| a < jiff::SignedDuration::from_mins(5)) {
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        tracing::info!(csr = %csr.name_any(), user = ?csr.spec.username, why, "a serving certificate request waits for approval (kubectl certificate approve)");
        return Ok(Action::await_change());
    }
    let message = "Auto approving kubelet serving certificate: it names the requesting node's own names and addresses.";
    auto_approve(ctx, csr, message).await?;
    tracing::info!(csr = %csr.name_any(), node = name, "approved a node serving certificate");
    Ok(Action::await_change())
}

/// Whether a `kube-apiserver-client` request is a node asking for its networking's own
/// identity (`system:krate:network:<node>` in `system:krate:networks`, client usages only).
fn network_identity_request(csr: &CertificateSigningRequest, request: &Request) -> bool {
    let Some(node) = csr.spec.username.as_deref().and_then(|u| u.strip_prefix("system:node:")) else { return false };
    csr.spec.groups.iter().flatten().any(|g| g == "system:nodes")
        && request.common_name == krate_client::csr::network_user(node)
        && request.organizations == [krate_client::csr::NETWORK_GROUP]
        && request.sans.is_empty()
        && usages_are(&usages(csr), &["client auth", "digital signature"])
}

/// A node's request for its networking identity is approved (krate's addition); other
/// `kube-apiserver-client` requests wait for an admin, as upstream.
async fn approve_network_identity(csr: &CertificateSigningRequest, ctx: &Context) -> Result<Action, Error> {
    let Ok(request) = read_request(csr) else { return Ok(Action::await_change()) };
    if !network_identity_request(csr, &request) {
        return Ok(Action::await_change());
    }
    auto_approve(ctx, csr, "Auto approving the node's networking identity: it names the requesting node.").await?;
    tracing::info!(csr = %csr.name_any(), user = %request.common_name, "approved a node networking identity");
    Ok(Action::await_change())
}

/// The certificate for `request` under `ca`, PEM.
fn issue(csr: &CertificateSigningRequest, request: &Request, ca: &SigningCa) -> anyhow::Result<String> {
    let key = rcgen::KeyPair::from_pem(&ca.key_pem)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert_pem, key)?;
    let mut params = request.parsed.params.clone();
    let now = jiff::Timestamp::now();
    let mut lifetime = ca.duration;
    if let Some(seconds) = csr.spec.expiration_seconds {
        lifetime = lifetime.min(Duration::from_secs(seconds.max(600) as u64));
    }
    let at = |t: jiff::Timestamp| time::OffsetDateTime::from_unix_timestamp(t.as_second()).expect("a time in range");
    // As upstream's signer: valid from five minutes ago, for clocks a little behind;
    // a long-lived certificate (8 hours or more) ends that much earlier too.
    let backdate = jiff::SignedDuration::from_mins(5);
    let lifetime = jiff::SignedDuration::try_from(lifetime)?;
    params.not_before = at(now - backdate);
    params.not_after =
        at(if lifetime < jiff::SignedDuration::from_hours(8) { now + lifetime } else { now + lifetime - backdate });
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    // A random serial, as upstream's (rcgen's default derives one from the key, which a
    // renewal keeps).
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params.key_usages = Vec::new();
    params.extended_key_usages = Vec::new();
    for usage in csr.spec.usages.iter().flatten() {
        match usage.as_str() {
            "digital signature" => params.key_usages.push(KeyUsagePurpose::DigitalSignature),
            "key encipherment" => params.key_usages.push(KeyUsagePurpose::KeyEncipherment),
            "client auth" => params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth),
            "server auth" => params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth),
            _ => {}
        }
    }
    params.use_authority_key_identifier_extension = true;
    let signing = CertificateSigningRequestParams { params, public_key: request.parsed.public_key.clone() };
    Ok(signing.signed_by(&issuer)?.pem())
}

async fn sign(csr: Arc<CertificateSigningRequest>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ours = [KUBELET_CLIENT, KUBELET_SERVING, APISERVER_CLIENT].contains(&csr.spec.signer_name.as_str());
    let issued = csr.status.as_ref().is_some_and(|s| s.certificate.is_some());
    if !ours || issued || !condition(&csr, "Approved") || condition(&csr, "Failed") || condition(&csr, "Denied") {
        return Ok(Action::await_change());
    }
    let Some(ca) = &ctx.ca else { return Ok(Action::await_change()) };
    let mut signed = (*csr).clone();
    let outcome = read_request(&csr).and_then(|r| match misfit(&csr, &r) {
        Some(why) => Err(why),
        None => issue(&csr, &r, ca).map_err(|e| format!("signing failed: {e:#}")),
    });
    match outcome {
        Ok(pem) => {
            signed.status.get_or_insert_with(Default::default).certificate =
                Some(k8s_openapi::ByteString(pem.into_bytes()));
            tracing::info!(csr = %csr.name_any(), signer = %csr.spec.signer_name, "issued a certificate");
        }
        Err(why) => {
            add_condition(&mut signed, "Failed", "SignerValidationFailure", &why);
            tracing::info!(csr = %csr.name_any(), reason = %why, "refused to sign");
        }
    }
    put_subresource(&ctx, &signed, "status").await?;
    Ok(Action::await_change())
}

fn error_policy(_: Arc<CertificateSigningRequest>, err: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "a certificate signing request");
    Action::requeue(Duration::from_secs(2))
}

async fn run_with<F, Fut>(context: Context, reconcile: F) -> anyhow::Result<()>
where
    F: FnMut(Arc<CertificateSigningRequest>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    let api: Api<CertificateSigningRequest> = Api::all(context.client.clone());
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(context))
        .for_each(|_| futures::future::ready(()))
        .await;
    Ok(())
}

pub async fn run_approver(client: kube::Client, approve_joins: bool) -> anyhow::Result<()> {
    run_with(Context { client, ca: None, approve_joins }, approve).await
}

/// Issues nothing without a CA (a stand-alone controller manager not given one).
pub async fn run_signer(client: kube::Client, ca: Option<SigningCa>) -> anyhow::Result<()> {
    run_with(Context { client, ca, approve_joins: false }, sign).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn csr(
        signer: &str,
        cn: &str,
        orgs: &[&str],
        sans: &[&str],
        usages: &[&str],
    ) -> (CertificateSigningRequest, Request) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        for o in orgs {
            params.distinguished_name.push(DnType::OrganizationName, *o);
        }
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let csr: CertificateSigningRequest = serde_json::from_value(json!({
            "metadata": {"name": "c"},
            "spec": {"request": base64::engine::general_purpose::STANDARD.encode(&pem), "signerName": signer, "usages": usages, "username": cn},
        }))
        .unwrap();
        let request = read_request(&csr).unwrap();
        (csr, request)
    }

    #[test]
    fn only_a_nodes_own_networking_identity_is_approved() {
        let ask = |requester: &str, cn: &str, org: &str, usages: &[&str]| {
            let (mut c, r) = csr(APISERVER_CLIENT, cn, &[org], &[], usages);
            c.spec.username = Some(requester.into());
            c.spec.groups = Some(vec!["system:nodes".into(), "system:authenticated".into()]);
            network_identity_request(&c, &r)
        };
        let client = ["digital signature", "client auth"];
        assert!(ask("system:node:n1", "system:krate:network:n1", "system:krate:networks", &client));
        assert!(!ask("system:node:n1", "system:krate:network:n2", "system:krate:networks", &client), "another node's");
        assert!(!ask("system:node:n1", "system:kube-proxy", "system:krate:networks", &client), "another user");
        assert!(!ask("system:node:n1", "system:krate:network:n1", "system:masters", &client), "another group");
        assert!(!ask("jane", "system:krate:network:jane", "system:krate:networks", &client), "not a node");
        assert!(!ask("system:node:n1", "system:krate:network:n1", "system:krate:networks", &["server auth"]));
    }

    #[test]
    fn serving_requests_are_approved_only_for_the_nodes_own_names() {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}, {"type": "Hostname", "address": "n1.lan"}]}}))
        .unwrap();
        let usages = ["digital signature", "server auth"];
        let ask = |cn: &str, sans: &[&str], groups: &[&str]| {
            let (mut c, r) = csr(KUBELET_SERVING, cn, &["system:nodes"], sans, &usages);
            c.spec.groups = Some(groups.iter().map(|g| g.to_string()).collect());
            not_own_serving_request(&c, &r, Some(&node)).is_none()
        };
        assert!(ask("system:node:n1", &["n1", "n1.lan", "10.0.0.5"], &["system:nodes"]));
        assert!(!ask("system:node:n1", &["n1", "10.0.0.6"], &["system:nodes"]), "another address");
        assert!(!ask("system:node:n1", &["kubernetes.default"], &["system:nodes"]), "another name");
        assert!(!ask("system:node:n1", &["n1"], &["system:authenticated"]), "not a node");
        assert!(!ask("system:node:n2", &["n1"], &["system:nodes"]), "another node's subject");
    }

    #[test]
    fn node_client_requests_must_have_the_node_shape() {
        let (c, r) =
            csr(KUBELET_CLIENT, "system:node:n1", &["system:nodes"], &[], &["digital signature", "client auth"]);
        assert_eq!(misfit(&c, &r), None);
        let (c, r) =
            csr(KUBELET_CLIENT, "system:node:n1", &["system:masters"], &[], &["digital signature", "client auth"]);
        assert!(misfit(&c, &r).unwrap().contains("O=system:nodes"));
        let (c, r) =
            csr(KUBELET_CLIENT, "system:node:n1", &["system:nodes"], &["n1"], &["digital signature", "client auth"]);
        assert!(misfit(&c, &r).unwrap().contains("alternative names"));
        let (c, r) =
            csr(KUBELET_CLIENT, "system:node:n1", &["system:nodes"], &[], &["digital signature", "server auth"]);
        assert!(misfit(&c, &r).unwrap().contains("usages"));
        let (c, r) =
            csr(KUBELET_SERVING, "system:node:n1", &["system:nodes"], &[], &["digital signature", "server auth"]);
        assert!(misfit(&c, &r).unwrap().contains("at least one"));
    }

    #[test]
    fn issued_certificates_carry_the_requested_subject_under_the_ca() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let ca =
            SigningCa { cert_pem: ca_cert.pem(), key_pem: ca_key.serialize_pem(), duration: Duration::from_secs(3600) };
        let (mut c, r) =
            csr(KUBELET_CLIENT, "system:node:n1", &["system:nodes"], &[], &["digital signature", "client auth"]);
        c.spec.expiration_seconds = Some(900);
        let pem = issue(&c, &r, &ca).unwrap();
        let der = krate_client::bootstrap::pem_certificates(&pem).remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(cert.subject().to_string(), "CN=system:node:n1, O=system:nodes");
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 900 + 300, "expirationSeconds, backdated five minutes");
        assert_eq!(cert.issuer(), x509_parser::parse_x509_certificate(&ca_cert.der()[..]).unwrap().1.subject());
    }
}

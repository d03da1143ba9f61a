//! Admission webhooks (admissionregistration.k8s.io/v1), as upstream's
//! MutatingAdmissionWebhook and ValidatingAdmissionWebhook plugins: the configurations
//! come from the watch cache; each webhook whose rules (`rules.rs`, with `matchPolicy`),
//! namespace and object selectors and CEL `matchConditions` select the request is sent
//! an AdmissionReview v1 over HTTPS (`client.rs`). Mutating webhooks run one after
//! another, their JSON patches applied to the object in the version they asked for and
//! the result decoded and defaulted again (so a patched pod gets its defaults); those
//! with `reinvocationPolicy: IfNeeded` run once more when a later webhook changed the
//! object. Validating webhooks run concurrently on the final object. A webhook that
//! cannot be called fails the request unless its `failurePolicy` is Ignore; a denial
//! reads `admission webhook "name" denied the request: <message>`; warnings go to the
//! client and audit annotations to the audit event.
//!
//! The configuration kinds themselves (and the admission policy kinds) are never sent
//! to webhooks, so a broken webhook can always be removed.

mod client;
pub(crate) mod conversion;
pub(crate) mod rules;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1 as admissionregistration;
use k8s_openapi::api::core::v1 as core;
use krate_api::object::{self, get_str};
use krate_api::selectors::LabelSelector;
use krate_api::{ApiError, ApiResult, KindInfo};
use serde_json::{json, Value};

use crate::admission::{Attributes, ConfigurationMemo, Operation, Plugin};
use crate::registry::{decode_body, to_served, to_storage, Storage};

/// MutatingAdmissionWebhook.
#[derive(Default)]
pub struct MutatingWebhooks(ConfigurationMemo);

/// ValidatingAdmissionWebhook.
#[derive(Default)]
pub struct ValidatingWebhooks(ConfigurationMemo);

#[async_trait::async_trait]
impl Plugin for MutatingWebhooks {
    fn name(&self) -> &'static str {
        "MutatingAdmissionWebhook"
    }

    async fn admit(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &mut Value) -> ApiResult<()> {
        if !applies(attrs) || attrs.operation == Operation::Delete {
            return Ok(());
        }
        let configs = storage.cached_configuration::<admissionregistration::MutatingWebhookConfiguration>(&self.0);
        let hooks = webhooks(&configs);
        if hooks.is_empty() {
            return Ok(());
        }
        // The object after each reinvocable webhook's call; one more round for those
        // whose output was changed by a later webhook.
        let mut reinvocable: Vec<(usize, Value)> = Vec::new();
        for (i, hook) in hooks.iter().enumerate() {
            if call_mutating(storage, attrs, hook, obj).await? && hook.spec["reinvocationPolicy"] == "IfNeeded" {
                reinvocable.push((i, obj.clone()));
            }
        }
        let again: Vec<usize> = reinvocable.into_iter().filter(|(_, seen)| seen != obj).map(|(i, _)| i).collect();
        for i in again {
            call_mutating(storage, attrs, &hooks[i], obj).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Plugin for ValidatingWebhooks {
    fn name(&self) -> &'static str {
        "ValidatingAdmissionWebhook"
    }

    async fn validate(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
        if !applies(attrs) {
            return Ok(());
        }
        let configs = storage.cached_configuration::<admissionregistration::ValidatingWebhookConfiguration>(&self.0);
        let hooks = webhooks(&configs);
        let calls = hooks.iter().map(|hook| async move {
            let Some(invocation) = invocation(storage, attrs, hook, obj).await? else { return Ok(()) };
            let response = call(storage, attrs, hook, &invocation, obj).await?;
            match response {
                Some(r) if r.get("patch").is_some_and(|p| !p.is_null()) => Err(calling_error(
                    hook,
                    "received invalid webhook response: validating webhook may not return response.patch",
                )),
                _ => Ok(()),
            }
        });
        // Every webhook is asked; the first refusal in configuration order answers.
        for result in futures::future::join_all(calls).await {
            result?;
        }
        Ok(())
    }
}

/// Whether a write is subject to webhooks: requests from clients (not the server's own
/// writes), of kinds other than the admission configuration kinds.
pub(crate) fn applies(attrs: &Attributes<'_>) -> bool {
    const EXEMPT: &[&str] = &[
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
        "validatingadmissionpolicies",
        "validatingadmissionpolicybindings",
        "mutatingadmissionpolicies",
        "mutatingadmissionpolicybindings",
    ];
    attrs.request.is_some()
        && !(attrs.kind.group == "admissionregistration.k8s.io" && EXEMPT.contains(&attrs.kind.plural.as_str()))
}

/// One webhook of a configuration.
struct Hook<'a> {
    spec: &'a Value,
}

impl Hook<'_> {
    fn name(&self) -> &str {
        self.spec["name"].as_str().unwrap_or_default()
    }

    fn fails_open(&self) -> bool {
        self.spec["failurePolicy"] == "Ignore"
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.spec["timeoutSeconds"].as_u64().unwrap_or(10).clamp(1, 30))
    }
}

/// The webhooks of `configs` (in name order, as upstream orders configurations), each
/// configuration's in their order.
fn webhooks(configs: &[Value]) -> Vec<Hook<'_>> {
    configs.iter().flat_map(|c| c["webhooks"].as_array().into_iter().flatten()).map(|spec| Hook { spec }).collect()
}

/// A webhook's call for this request: the version of the resource it asked for.
struct Invocation {
    kind: Arc<KindInfo>,
}

/// Decides whether `hook` is called: rules, namespace and object selectors, match
/// conditions. An error only from a match condition that could not be evaluated under
/// `failurePolicy: Fail`.
async fn invocation(
    storage: &Storage,
    attrs: &Attributes<'_>,
    hook: &Hook<'_>,
    obj: &Value,
) -> ApiResult<Option<Invocation>> {
    let request = attrs.request.expect("applies() checked");
    let Some(kind) =
        rules::webhook_kind(&storage.kinds(), attrs.kind, &request.subresource, attrs.operation, hook.spec)
    else {
        return Ok(None);
    };
    let (new, old) = objects(attrs, obj);
    if !namespace_selected(storage, attrs, &hook.spec["namespaceSelector"], new.or(old)).await {
        return Ok(None);
    }
    if !object_selected(&hook.spec["objectSelector"], new, old) {
        return Ok(None);
    }
    let conditions = hook.spec["matchConditions"].as_array().map(Vec::as_slice).unwrap_or_default();
    if conditions.is_empty() {
        return Ok(Some(Invocation { kind }));
    }
    // The variables are the same for every condition: converted once.
    let served = |o: Option<&Value>| o.map(|o| to_served(&kind, o.clone())).transpose();
    let (object, old_object) = (served(new)?.unwrap_or_default(), served(old)?.unwrap_or_default());
    let review = cel_request(attrs, &kind, new, old);
    let bindings =
        krate_api::cel::Bindings::new(&[("object", &object), ("oldObject", &old_object), ("request", &review)]);
    for condition in conditions {
        let expression = condition["expression"].as_str().unwrap_or_default();
        let evaluated = krate_api::cel::compile_cached(expression, krate_api::cel::MATCH_CONDITION_VARIABLES)
            .and_then(|p| p.evaluate_bool_in(&bindings));
        match evaluated {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(_) if hook.fails_open() => return Ok(None),
            Err(e) => {
                let name = condition["name"].as_str().unwrap_or_default();
                return Err(ApiError::forbidden(format!(
                    "failed to evaluate match condition {name:?} of webhook {:?}: {e}",
                    hook.name()
                )));
            }
        }
    }
    Ok(Some(Invocation { kind }))
}

/// The new and the old object of the request (a delete has only an old one).
pub(crate) fn objects<'a>(attrs: &'a Attributes<'_>, obj: &'a Value) -> (Option<&'a Value>, Option<&'a Value>) {
    match attrs.operation {
        Operation::Delete => (None, Some(obj)),
        _ => (Some(obj), attrs.old),
    }
}

/// Upstream's object matcher: the new or the old object's labels satisfy the selector.
pub(crate) fn object_selected(selector: &Value, new: Option<&Value>, old: Option<&Value>) -> bool {
    let selector = LabelSelector::from_json(selector).unwrap_or_default();
    selector.is_empty()
        || [new, old].into_iter().flatten().any(|o| selector.matches_json(o.pointer("/metadata/labels")))
}

/// Upstream's namespace matcher: a namespace is judged by its own labels, a namespaced
/// object by its namespace's, a cluster-scoped object always matches.
pub(crate) async fn namespace_selected(
    storage: &Storage,
    attrs: &Attributes<'_>,
    selector: &Value,
    obj: Option<&Value>,
) -> bool {
    let selector = LabelSelector::from_json(selector).unwrap_or_default();
    if selector.is_empty() {
        return true;
    }
    if attrs.kind.is::<core::Namespace>() {
        return selector.matches_json(obj.and_then(|o| o.pointer("/metadata/labels")));
    }
    if !attrs.kind.namespaced {
        return true;
    }
    let namespace = obj
        .and_then(object::namespace)
        .map(str::to_string)
        .or_else(|| attrs.request.map(|r| r.namespace.clone()).filter(|n| !n.is_empty()));
    let Some(namespace) = namespace else { return true };
    let labels = storage
        .cached(&storage.builtin::<core::Namespace>(None), &namespace)
        .ok()
        .and_then(|ns| ns.parse().pointer("/metadata/labels").cloned());
    selector.matches_json(labels.as_ref())
}

fn group_version_kind(kind: &KindInfo) -> Value {
    json!({"group": kind.group, "version": kind.version, "kind": kind.kind})
}

fn group_version_resource(kind: &KindInfo) -> Value {
    json!({"group": kind.group, "version": kind.version, "resource": kind.plural})
}

/// The `request` of an AdmissionReview, in upstream's field order; the objects only when
/// `with_objects` (CEL's `request` has them as variables of their own).
fn review_request(
    attrs: &Attributes<'_>,
    kind: &KindInfo,
    (new, old): (Option<&Value>, Option<&Value>),
    uid: &str,
    with_objects: bool,
) -> ApiResult<Value> {
    let request = attrs.request.expect("applies() checked");
    let mut review = serde_json::Map::new();
    review.insert("uid".into(), json!(uid));
    let object_kind = match (attrs.operation, new.and_then(|o| o["kind"].as_str())) {
        // A connect's object is its options (`PodExecOptions`), a core/v1 kind.
        (Operation::Connect, Some(options)) => json!({"group": "", "version": "v1", "kind": options}),
        _ => group_version_kind(kind),
    };
    review.insert("kind".into(), object_kind.clone());
    review.insert("resource".into(), group_version_resource(kind));
    if !request.subresource.is_empty() {
        review.insert("subResource".into(), json!(request.subresource));
    }
    let request_kind = if attrs.operation == Operation::Connect { object_kind } else { group_version_kind(attrs.kind) };
    review.insert("requestKind".into(), request_kind);
    review.insert("requestResource".into(), group_version_resource(attrs.kind));
    if !request.subresource.is_empty() {
        review.insert("requestSubResource".into(), json!(request.subresource));
    }
    let name = new.or(old).map(object::name).filter(|n| !n.is_empty()).unwrap_or(&request.name);
    if !name.is_empty() {
        review.insert("name".into(), json!(name));
    }
    let namespace = new.or(old).and_then(object::namespace).unwrap_or(&request.namespace);
    if attrs.kind.namespaced && !namespace.is_empty() {
        review.insert("namespace".into(), json!(namespace));
    }
    let (operation, options) = match attrs.operation {
        Operation::Create => ("CREATE", "CreateOptions"),
        Operation::Update => ("UPDATE", "UpdateOptions"),
        Operation::Delete => ("DELETE", "DeleteOptions"),
        Operation::Connect => ("CONNECT", ""),
    };
    review.insert("operation".into(), json!(operation));
    let user = &request.user;
    let mut user_info = serde_json::Map::new();
    user_info.insert("username".into(), json!(user.name));
    if !user.uid.is_empty() {
        user_info.insert("uid".into(), json!(user.uid));
    }
    if !user.groups.is_empty() {
        user_info.insert("groups".into(), json!(user.groups));
    }
    if !user.extra.is_empty() {
        user_info.insert("extra".into(), json!(user.extra));
    }
    review.insert("userInfo".into(), Value::Object(user_info));
    let served = |o: Option<&Value>| match o {
        Some(o) if attrs.operation == Operation::Connect => Ok(o.clone()),
        Some(o) => to_served(kind, o.clone()),
        None => Ok(Value::Null),
    };
    if with_objects {
        review.insert("object".into(), served(new)?);
        review.insert("oldObject".into(), served(old)?);
    }
    review.insert("dryRun".into(), json!(attrs.dry_run));
    if !options.is_empty() {
        review.insert("options".into(), json!({"kind": options, "apiVersion": "meta.k8s.io/v1"}));
    }
    Ok(Value::Object(review))
}

/// The `request` variable of CEL expressions: the AdmissionReview's request without the
/// objects (they are variables of their own), as upstream's `CreateAdmissionRequest`.
pub(crate) fn cel_request(attrs: &Attributes<'_>, kind: &KindInfo, new: Option<&Value>, old: Option<&Value>) -> Value {
    review_request(attrs, kind, (new, old), "", false).unwrap_or_default()
}

/// `failed calling webhook "name": <why>`, as upstream's ErrCallingWebhook, in the
/// InternalError status a failing-closed webhook answers with.
fn calling_error(hook: &Hook<'_>, why: &str) -> ApiError {
    let message = format!("failed calling webhook {:?}: {why}", hook.name());
    let mut error = ApiError::internal(&message);
    error.details = Some(json!({"causes": [{"message": message}]}));
    error
}

/// Upstream's `ToStatusErr`: a denial as the webhook's status, at least a 400.
fn denial(hook: &Hook<'_>, status: &Value) -> ApiError {
    let denied_by = format!("admission webhook {:?} denied the request", hook.name());
    let message = status["message"].as_str().filter(|m| !m.is_empty());
    let reason = status["reason"].as_str().filter(|r| !r.is_empty());
    let message = match (message, reason) {
        (Some(m), _) => format!("{denied_by}: {m}"),
        (None, Some(r)) => format!("{denied_by}: {r}"),
        (None, None) => format!("{denied_by} without explanation"),
    };
    let code = status["code"].as_u64().filter(|c| *c >= 400).unwrap_or(400) as u16;
    let mut error = ApiError::new(code, known_reason(reason.unwrap_or_default()), message);
    if let Some(details) = status.get("details").filter(|d| d.is_object()) {
        error.details = Some(details.clone());
    }
    error
}

/// The webhook's reason as one of upstream's `StatusReason`s ("" for anything else).
fn known_reason(reason: &str) -> &'static str {
    const REASONS: &[&str] = &[
        "Unauthorized",
        "Forbidden",
        "NotFound",
        "AlreadyExists",
        "Conflict",
        "Gone",
        "Invalid",
        "ServerTimeout",
        "StoreReadError",
        "Timeout",
        "TooManyRequests",
        "BadRequest",
        "MethodNotAllowed",
        "NotAcceptable",
        "RequestEntityTooLarge",
        "UnsupportedMediaType",
        "InternalError",
        "Expired",
        "ServiceUnavailable",
    ];
    REASONS.iter().find(|r| **r == reason).copied().unwrap_or("")
}

/// Calls one webhook. `Ok(None)`: a failing-open webhook could not be called; the
/// response otherwise (allowed, with warnings and audit annotations recorded).
async fn call(
    storage: &Storage,
    attrs: &Attributes<'_>,
    hook: &Hook<'_>,
    invocation: &Invocation,
    obj: &Value,
) -> ApiResult<Option<Value>> {
    let request = attrs.request.expect("applies() checked");
    if attrs.dry_run && !matches!(hook.spec["sideEffects"].as_str(), Some("None" | "NoneOnDryRun")) {
        return Err(ApiError::bad_request(format!("admission webhook {:?} does not support dry run", hook.name())));
    }
    let uid = crate::registry::uuid_v4();
    let (new, old) = objects(attrs, obj);
    let review_version = match hook.spec["admissionReviewVersions"].as_array() {
        Some(v) if !v.iter().any(|v| v == "v1") && v.iter().any(|v| v == "v1beta1") => "admission.k8s.io/v1beta1",
        _ => "admission.k8s.io/v1",
    };
    let review = json!({
        "kind": "AdmissionReview",
        "apiVersion": review_version,
        "request": review_request(attrs, &invocation.kind, (new, old), &uid, true)?,
    });
    let timeout = hook.timeout();
    let sent = async {
        let target = client::target(storage, &hook.spec["clientConfig"], timeout)?;
        let ca_bundle = hook.spec["clientConfig"]["caBundle"].as_str().unwrap_or_default();
        let body = client::post(&target, ca_bundle, krate_api::protobuf::to_go_json(&review), timeout).await?;
        Ok::<_, String>(body)
    };
    let body = match sent.await {
        Ok(body) => body,
        Err(_) if hook.fails_open() => return Ok(None),
        Err(e) => return Err(calling_error(hook, &format!("failed to call webhook: {e}"))),
    };
    let response = match verify_response(&body, &uid, review_version) {
        Ok(r) => r,
        Err(_) if hook.fails_open() => return Ok(None),
        Err(e) => return Err(calling_error(hook, &format!("received invalid webhook response: {e}"))),
    };
    for (key, value) in response["auditAnnotations"].as_object().into_iter().flatten() {
        request.annotate(&format!("{}/{key}", hook.name()), value.as_str().unwrap_or_default().to_string());
    }
    for warning in response["warnings"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        request.warn(warning.to_string());
    }
    if response["allowed"] != true {
        return Err(denial(hook, &response["status"]));
    }
    Ok(Some(response))
}

/// The AdmissionReview's response, checked as upstream's `VerifyAdmissionResponse`.
fn verify_response(body: &[u8], uid: &str, api_version: &str) -> Result<Value, String> {
    let review: Value = serde_json::from_slice(body).map_err(|e| format!("couldn't decode the response: {e}"))?;
    let response = review.get("response").filter(|r| r.is_object()).ok_or("webhook response was absent")?;
    let got_uid = get_str(response, &["uid"]).unwrap_or_default();
    if got_uid != uid {
        return Err(format!("expected response.uid={uid:?}, got {got_uid:?}"));
    }
    let (version, kind) =
        (get_str(&review, &["apiVersion"]).unwrap_or_default(), get_str(&review, &["kind"]).unwrap_or_default());
    if version != api_version || kind != "AdmissionReview" {
        return Err(format!(
            "expected webhook response of {api_version}, Kind=AdmissionReview, got {version}, Kind={kind}"
        ));
    }
    let patch = response.get("patch").is_some_and(|p| !p.is_null() && p != "");
    let patch_type = response.get("patchType").is_some_and(|p| !p.is_null());
    if patch && !patch_type {
        return Err("webhook returned response.patch but not response.patchType".into());
    }
    if !patch && patch_type {
        return Err("webhook returned response.patchType but not response.patch".into());
    }
    Ok(response.clone())
}

/// Calls a mutating webhook if it selects the request and applies its patch to `obj`;
/// true when it was called.
async fn call_mutating(storage: &Storage, attrs: &Attributes<'_>, hook: &Hook<'_>, obj: &mut Value) -> ApiResult<bool> {
    let Some(invocation) = invocation(storage, attrs, hook, obj).await? else { return Ok(false) };
    let Some(response) = call(storage, attrs, hook, &invocation, obj).await? else { return Ok(true) };
    // A connect's options come from its query; krate does not take them back from a
    // patch (upstream would).
    let patch = response["patch"].as_str().filter(|p| !p.is_empty() && attrs.operation != Operation::Connect);
    let Some(patch) = patch else { return Ok(true) };
    let undecodable = |e: String| calling_error(hook, &format!("received undecodable patch in webhook response: {e}"));
    if response["patchType"] != "JSONPatch" {
        return Err(calling_error(hook, &format!("unsupported patch type {:?}", response["patchType"])));
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(patch).map_err(|e| undecodable(e.to_string()))?;
    let operations: Value = serde_json::from_slice(&bytes).map_err(|e| undecodable(e.to_string()))?;
    if operations.as_array().is_none_or(Vec::is_empty) {
        return Ok(true);
    }
    let kind = &invocation.kind;
    let mut served = to_served(kind, obj.clone())?;
    krate_api::patch::apply_json_patch(&mut served, &operations).map_err(|e| ApiError::internal(e.message))?;
    // Decoded and defaulted again, as upstream decodes the patched object into its type
    // and runs the defaulters; custom resources are pruned and defaulted by their schema.
    let (mut patched, _) = decode_body(kind, served).map_err(|e| ApiError::internal(e.message))?;
    kind.strategy.default(&mut patched);
    *obj = to_storage(kind, patched)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    static SPEC: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| json!({"name": "deny.example.com"}));

    fn hook() -> Hook<'static> {
        Hook { spec: &SPEC }
    }

    #[test]
    fn denials_read_as_upstreams() {
        let e = denial(&hook(), &json!({"code": 403, "message": "the pod contains unwanted label"}));
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "admission webhook \"deny.example.com\" denied the request: the pod contains unwanted label"
        );
        let e = denial(&hook(), &json!({"reason": "Forbidden"}));
        assert_eq!((e.code, e.reason), (400, "Forbidden"));
        assert_eq!(e.message, "admission webhook \"deny.example.com\" denied the request: Forbidden");
        let e = denial(&hook(), &Value::Null);
        assert_eq!(e.message, "admission webhook \"deny.example.com\" denied the request without explanation");
    }

    #[test]
    fn responses_are_verified() {
        let ok =
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"u","allowed":true}}"#;
        assert!(verify_response(ok, "u", "admission.k8s.io/v1").is_ok());
        assert_eq!(
            verify_response(ok, "v", "admission.k8s.io/v1").unwrap_err(),
            "expected response.uid=\"v\", got \"u\""
        );
        let absent = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#;
        assert_eq!(verify_response(absent, "u", "admission.k8s.io/v1").unwrap_err(), "webhook response was absent");
        let patch_only = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"u","allowed":true,"patch":"W10="}}"#;
        assert_eq!(
            verify_response(patch_only, "u", "admission.k8s.io/v1").unwrap_err(),
            "webhook returned response.patch but not response.patchType"
        );
    }

    #[test]
    fn calling_errors_are_internal_errors_naming_the_webhook() {
        let e = calling_error(&hook(), "failed to call webhook: Post \"https://x\": context deadline exceeded");
        assert_eq!(e.code, 500);
        assert_eq!(
            e.message,
            "Internal error occurred: failed calling webhook \"deny.example.com\": failed to call webhook: Post \"https://x\": context deadline exceeded"
        );
    }
}

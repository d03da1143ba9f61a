//! ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1), as upstream's plugin of
//! that name: in-process CEL validations instead of a webhook call. A policy says what
//! it applies to (`matchConstraints`, matched as webhook rules are, plus resource
//! names and exclusions) and what must hold (`validations`, over `object`,
//! `oldObject`, `request`, `params`, `namespaceObject` and its own `variables`); a
//! binding puts it in force for part of the cluster (`matchResources`), with
//! parameters (`paramRef` to objects of the policy's `paramKind`) and what a failure
//! does (`validationActions`: Deny refuses with upstream's message, Warn adds a
//! warning, Audit an audit annotation). Expressions that fail to evaluate, and
//! missing parameters, follow the policy's `failurePolicy`.

use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1 as admissionregistration;
use k8s_openapi::api::core::v1 as core;
use krate_api::cel;
use krate_api::object;
use krate_api::selectors::LabelSelector;
use krate_api::strategy::POLICY_VARIABLES;
use krate_api::{ApiError, ApiResult, KindInfo};
use serde_json::{json, Value};

use crate::admission::{forbidden, Attributes, ConfigurationMemo, Plugin};
use crate::registry::{to_served, Scope, Storage};
use crate::webhook::{self, rules};

/// The plugin, with its parsed copies of the bindings and the policies.
#[derive(Default)]
pub struct ValidatingAdmissionPolicy {
    bindings: ConfigurationMemo,
    policies: ConfigurationMemo,
}

#[async_trait::async_trait]
impl Plugin for ValidatingAdmissionPolicy {
    fn name(&self) -> &'static str {
        "ValidatingAdmissionPolicy"
    }

    async fn validate(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &Value) -> ApiResult<()> {
        if !webhook::applies(attrs) {
            return Ok(());
        }
        let bindings =
            storage.cached_configuration::<admissionregistration::ValidatingAdmissionPolicyBinding>(&self.bindings);
        if bindings.is_empty() {
            return Ok(());
        }
        let mut bindings: Vec<&Value> = bindings.iter().collect();
        bindings.sort_by(|a, b| object::name(a).cmp(object::name(b)));
        let policies = storage.cached_configuration::<admissionregistration::ValidatingAdmissionPolicy>(&self.policies);
        let mut policies: Vec<&Value> = policies.iter().collect();
        policies.sort_by(|a, b| object::name(a).cmp(object::name(b)));
        let mut denied: Option<ApiError> = None;
        for policy in &policies {
            let name = object::name(policy);
            let mine = bindings.iter().filter(|b| b["spec"]["policyName"] == name);
            for binding in mine {
                let outcome = evaluate(storage, attrs, obj, policy, binding).await;
                for decision in outcome {
                    if let Some(error) = act(attrs, obj, policy, binding, decision) {
                        denied.get_or_insert(error);
                    }
                }
            }
        }
        denied.map_or(Ok(()), Err)
    }
}

/// What one validation (or a configuration problem) decided.
struct Denial {
    message: String,
    reason: String,
}

/// Applies a binding's `validationActions` to a failed validation; the error to answer
/// with for Deny.
fn act(attrs: &Attributes<'_>, obj: &Value, policy: &Value, binding: &Value, denial: Denial) -> Option<ApiError> {
    let (policy_name, binding_name) = (object::name(policy), object::name(binding));
    let mut error = None;
    for action in binding["spec"]["validationActions"].as_array().into_iter().flatten() {
        match action.as_str() {
            Some("Deny") => {
                let message = format!(
                    "ValidatingAdmissionPolicy '{policy_name}' with binding '{binding_name}' denied request: {}",
                    denial.message
                );
                let reason = if denial.reason.is_empty() { "Invalid" } else { denial.reason.as_str() };
                let mut e = forbidden(attrs.kind, obj, &message);
                (e.code, e.reason) = match reason {
                    "Forbidden" => (403, "Forbidden"),
                    "Unauthorized" => (401, "Unauthorized"),
                    "RequestEntityTooLarge" => (413, "RequestEntityTooLarge"),
                    _ => (422, "Invalid"),
                };
                e.details = Some(json!({
                    "name": object::name(obj),
                    "group": attrs.kind.group,
                    "kind": attrs.kind.plural,
                    "causes": [{"message": message}],
                }));
                error = Some(e);
            }
            Some("Warn") => {
                if let Some(request) = attrs.request {
                    request.warn(format!(
                        "Validation failed for ValidatingAdmissionPolicy '{policy_name}' with binding '{binding_name}': {}",
                        denial.message
                    ));
                }
            }
            Some("Audit") => {
                if let Some(request) = attrs.request {
                    let failure = json!([{"message": denial.message, "policy": policy_name, "binding": binding_name,
                        "validationActions": binding["spec"]["validationActions"]}]);
                    request.annotate("validation.policy.admission.k8s.io/validation_failure", failure.to_string());
                }
            }
            _ => {}
        }
    }
    error
}

/// A configuration problem under the policy's failurePolicy: a denial under Fail.
fn config_error(policy: &Value, message: String) -> Vec<Denial> {
    match policy["spec"]["failurePolicy"].as_str() {
        Some("Ignore") => vec![],
        _ => vec![Denial { message, reason: String::new() }],
    }
}

/// The failed validations of one policy under one binding for this request.
async fn evaluate(
    storage: &Storage,
    attrs: &Attributes<'_>,
    obj: &Value,
    policy: &Value,
    binding: &Value,
) -> Vec<Denial> {
    let Some(kind) = matches(storage, attrs, obj, &policy["spec"]["matchConstraints"]).await else { return vec![] };
    let binding_resources = &binding["spec"]["matchResources"];
    if binding_resources.is_object() && matches(storage, attrs, obj, binding_resources).await.is_none() {
        return vec![];
    }
    let params = match params(storage, attrs, policy, binding).await {
        Ok(Some(params)) => params,
        Ok(None) => return vec![],
        Err(message) => return config_error(policy, message),
    };
    let (new, old) = webhook::objects(attrs, obj);
    let served = |o: Option<&Value>| o.map(|o| to_served(&kind, o.clone())).transpose();
    let (object, old_object) = match (served(new), served(old)) {
        (Ok(new), Ok(old)) => (new.unwrap_or(Value::Null), old.unwrap_or(Value::Null)),
        (Err(e), _) | (_, Err(e)) => return config_error(policy, e.message),
    };
    let request = webhook::cel_request(attrs, &kind, new, old);
    let namespace_object = namespace_object(storage, attrs, obj);
    let mut denials = Vec::new();
    for params in params {
        let bound = [
            ("object", &object),
            ("oldObject", &old_object),
            ("request", &request),
            ("params", &params),
            ("namespaceObject", &namespace_object),
            ("variables", &Value::Object(Default::default())),
        ];
        match validations(policy, cel::Bindings::new(&bound)) {
            Ok(found) => denials.extend(found),
            Err(message) => return config_error(policy, message),
        }
    }
    denials
}

/// Runs a policy's match conditions, variables and validations against `bindings`
/// (one parameter object's); the failed validations, or an error for a match
/// condition that could not be evaluated under `failurePolicy: Fail`.
fn validations(policy: &Value, mut bindings: cel::Bindings) -> Result<Vec<Denial>, String> {
    let spec = &policy["spec"];
    let ignore = spec["failurePolicy"] == "Ignore";
    let program = |expression: &str| cel::compile_cached(expression, POLICY_VARIABLES);
    for condition in spec["matchConditions"].as_array().into_iter().flatten() {
        match program(condition["expression"].as_str().unwrap_or_default()).and_then(|p| p.evaluate_bool_in(&bindings))
        {
            Ok(true) => {}
            Ok(false) => return Ok(vec![]),
            Err(_) if ignore => return Ok(vec![]),
            Err(e) => return Err(format!("failed to evaluate match condition: {e}")),
        }
    }
    // Variables in order, each seeing those before it; one that cannot be evaluated
    // stays unset, and an expression using it then fails, as upstream's lazily
    // evaluated variables do.
    let mut variables = serde_json::Map::new();
    for variable in spec["variables"].as_array().into_iter().flatten() {
        let value = program(variable["expression"].as_str().unwrap_or_default()).and_then(|p| p.evaluate_in(&bindings));
        if let Ok(value) = value {
            variables.insert(variable["name"].as_str().unwrap_or_default().to_string(), value);
            bindings.set("variables", &Value::Object(variables.clone()));
        }
    }
    let mut denials = Vec::new();
    for validation in spec["validations"].as_array().into_iter().flatten() {
        let expression = validation["expression"].as_str().unwrap_or_default();
        let reason = validation["reason"].as_str().unwrap_or_default().to_string();
        match program(expression).and_then(|p| p.evaluate_bool_in(&bindings)) {
            Ok(true) => {}
            Ok(false) => {
                let from_expression = validation["messageExpression"]
                    .as_str()
                    .and_then(|m| program(m).and_then(|p| p.evaluate_in(&bindings)).ok())
                    .and_then(|m| m.as_str().map(str::to_string))
                    .filter(|m| !m.trim().is_empty() && !m.contains('\n'));
                let message = from_expression
                    .or_else(|| validation["message"].as_str().filter(|m| !m.is_empty()).map(str::to_string))
                    .unwrap_or_else(|| format!("failed expression: {}", expression.trim()));
                denials.push(Denial { message, reason });
            }
            Err(_) if ignore => {}
            Err(e) => denials
                .push(Denial { message: format!("expression '{}' resulted in error: {e}", expression.trim()), reason }),
        }
    }
    Ok(denials)
}

/// Whether `match_resources` (a policy's constraints or a binding's resources) select
/// the request; the version of the resource they name if so.
async fn matches(
    storage: &Storage,
    attrs: &Attributes<'_>,
    obj: &Value,
    match_resources: &Value,
) -> Option<Arc<KindInfo>> {
    let (new, old) = webhook::objects(attrs, obj);
    if !webhook::namespace_selected(storage, attrs, &match_resources["namespaceSelector"], new.or(old)).await
        || !webhook::object_selected(&match_resources["objectSelector"], new, old)
    {
        return None;
    }
    let request = attrs.request?;
    let name = new.or(old).map(object::name).filter(|n| !n.is_empty()).unwrap_or(&request.name);
    let exact = match_resources["matchPolicy"] == "Exact";
    let kinds = storage.kinds();
    let rules_at = |key: &str| match_resources[key].as_array().map(Vec::as_slice).unwrap_or_default().to_vec();
    let call = (request.subresource.as_str(), name, attrs.operation);
    if rules::matching_kind(&kinds, attrs.kind, call, &rules_at("excludeResourceRules"), exact).is_some() {
        return None;
    }
    let included = rules_at("resourceRules");
    if included.is_empty() {
        return kinds.lookup(&attrs.kind.group, &attrs.kind.version, &attrs.kind.plural).cloned();
    }
    rules::matching_kind(&kinds, attrs.kind, call, &included, exact)
}

/// The request's namespace as `namespaceObject` (null for cluster-scoped requests and
/// for namespaces themselves).
fn namespace_object(storage: &Storage, attrs: &Attributes<'_>, obj: &Value) -> Value {
    if !attrs.kind.namespaced {
        return Value::Null;
    }
    let namespace = object::namespace(obj).map(str::to_string).or_else(|| attrs.request.map(|r| r.namespace.clone()));
    namespace
        .and_then(|ns| storage.cached(&storage.builtin::<core::Namespace>(None), &ns).ok())
        .map(|ns| ns.parse())
        .unwrap_or(Value::Null)
}

/// The parameter objects of a binding: `[null]` for a policy without `paramKind`,
/// `None` when none are found and the binding allows that, an error otherwise.
async fn params(
    storage: &Storage,
    attrs: &Attributes<'_>,
    policy: &Value,
    binding: &Value,
) -> Result<Option<Vec<Value>>, String> {
    let param_kind = &policy["spec"]["paramKind"];
    if !param_kind.is_object() {
        return Ok(Some(vec![Value::Null]));
    }
    let param_ref = &binding["spec"]["paramRef"];
    if !param_ref.is_object() {
        return Err(format!(
            "ValidatingAdmissionPolicy '{}' has a paramKind, but binding '{}' has no paramRef",
            object::name(policy),
            object::name(binding)
        ));
    }
    let (api_version, kind_name) =
        (param_kind["apiVersion"].as_str().unwrap_or_default(), param_kind["kind"].as_str().unwrap_or_default());
    let kinds = storage.kinds();
    let Some(kind) = kinds.kinds().iter().find(|k| k.api_version() == api_version && k.kind == kind_name).cloned()
    else {
        return Err(format!("failed to find resource referenced by paramKind: '{api_version}, Kind={kind_name}'"));
    };
    let namespace = match param_ref["namespace"].as_str().filter(|n| !n.is_empty()) {
        _ if !kind.namespaced => None,
        Some(ns) => Some(ns.to_string()),
        None => match attrs.request.map(|r| r.namespace.clone()).filter(|n| !n.is_empty()) {
            Some(ns) => Some(ns),
            None => {
                return Err(
                    "cannot use namespaced paramRef in policy binding that matches cluster-scoped resources".into()
                )
            }
        },
    };
    let scope = Scope { kind: kind.clone(), namespace };
    let found: Vec<Value> = match param_ref["name"].as_str().filter(|n| !n.is_empty()) {
        Some(name) => {
            storage.cached(&scope, name).ok().map(|o| to_served(&kind, o.parse())).into_iter().collect::<Result<_, _>>()
        }
        None => {
            let selector = LabelSelector::from_json(&param_ref["selector"]).unwrap_or_default();
            let all = storage.cached_objects(&scope, false).await;
            all.into_iter()
                .filter(|o| selector.matches_json(o.pointer("/metadata/labels")))
                .map(|o| to_served(&kind, o))
                .collect::<Result<_, _>>()
        }
    }
    .map_err(|e| e.message)?;
    match (found.is_empty(), param_ref["parameterNotFoundAction"].as_str()) {
        (false, _) => Ok(Some(found)),
        (true, Some("Allow")) => Ok(None),
        (true, _) => Err("no params found for policy binding with `Deny` parameterNotFoundAction".into()),
    }
}

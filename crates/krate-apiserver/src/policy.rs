//! ValidatingAdmissionPolicy and MutatingAdmissionPolicy (admissionregistration.k8s.io/v1),
//! as upstream's plugins of those names: in-process CEL instead of a webhook call. A policy says what
//! it applies to (`matchConstraints`, matched as webhook rules are, plus resource
//! names and exclusions) and what must hold (`validations`, over `object`,
//! `oldObject`, `request`, `params`, `namespaceObject` and its own `variables`); a
//! binding puts it in force for part of the cluster (`matchResources`), with
//! parameters (`paramRef` to objects of the policy's `paramKind`) and what a failure
//! does (`validationActions`: Deny refuses with upstream's message, Warn adds a
//! warning, Audit an audit annotation). Expressions that fail to evaluate, and
//! missing parameters, follow the policy's `failurePolicy`.
//!
//! A mutating policy's `mutations` build an apply configuration (`Object{spec:
//! Object.spec{replicas: 3}}`, merged into the object by its schema's merge rules) or a
//! list of JSON patch operations, each seeing the result of the ones before; the result
//! is decoded and defaulted again, like a webhook's patch. (Typed object literals are
//! read as maps, `krate_api::cel::object_literals_as_maps`; reinvocation is not done.)

use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1 as admissionregistration;
use k8s_openapi::api::core::v1 as core;
use krate_api::cel;
use krate_api::object;
use krate_api::selectors::LabelSelector;
use krate_api::strategy::POLICY_VARIABLES;
use krate_api::{ApiError, ApiResult, KindInfo};
use serde_json::{json, Value};

use crate::admission::{forbidden, Attributes, ConfigurationMemo, Operation, Plugin};
use crate::registry::{decode_body, to_served, to_storage, Scope, Storage};
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
        let in_force = InForce::of::<
            admissionregistration::ValidatingAdmissionPolicy,
            admissionregistration::ValidatingAdmissionPolicyBinding,
        >(storage, &self.policies, &self.bindings);
        let mut denied: Option<ApiError> = None;
        for (policy, binding) in in_force.pairs() {
            for decision in evaluate(storage, attrs, obj, policy, binding).await {
                if let Some(error) = act(attrs, obj, policy, binding, decision) {
                    denied.get_or_insert(error);
                }
            }
        }
        denied.map_or(Ok(()), Err)
    }
}

/// The policies of a kind with their bindings, read from the cache.
struct InForce {
    policies: Arc<Vec<Value>>,
    bindings: Arc<Vec<Value>>,
}

impl InForce {
    fn of<P: k8s_openapi::Resource, B: k8s_openapi::Resource>(
        storage: &Storage,
        policies: &ConfigurationMemo,
        bindings: &ConfigurationMemo,
    ) -> Self {
        let bindings = storage.cached_configuration::<B>(bindings);
        let policies = if bindings.is_empty() { Arc::default() } else { storage.cached_configuration::<P>(policies) };
        Self { policies, bindings }
    }

    /// Each policy with each of its bindings, both in name order (as the cache holds them).
    fn pairs(&self) -> Vec<(&Value, &Value)> {
        let bindings = &self.bindings;
        self.policies
            .iter()
            .flat_map(|p| {
                bindings.iter().filter(move |b| b["spec"]["policyName"] == object::name(p)).map(move |b| (p, b))
            })
            .collect()
    }
}

/// The plugin, with its parsed copies of the bindings and the policies.
#[derive(Default)]
pub struct MutatingAdmissionPolicy {
    bindings: ConfigurationMemo,
    policies: ConfigurationMemo,
}

#[async_trait::async_trait]
impl Plugin for MutatingAdmissionPolicy {
    fn name(&self) -> &'static str {
        "MutatingAdmissionPolicy"
    }

    async fn admit(&self, storage: &Storage, attrs: &Attributes<'_>, obj: &mut Value) -> ApiResult<()> {
        if !webhook::applies(attrs) || matches!(attrs.operation, Operation::Delete | Operation::Connect) {
            return Ok(());
        }
        let in_force = InForce::of::<
            admissionregistration::MutatingAdmissionPolicy,
            admissionregistration::MutatingAdmissionPolicyBinding,
        >(storage, &self.policies, &self.bindings);
        for (policy, binding) in in_force.pairs() {
            let ignore = policy["spec"]["failurePolicy"] == "Ignore";
            let refused = |message: String| {
                let (p, b) = (object::name(policy), object::name(binding));
                forbidden(attrs.kind, obj, format!("policy '{p}' with binding '{b}' denied request: {message}"))
            };
            let evaluation = match prepare(storage, attrs, obj, policy, binding).await {
                Ok(Some(evaluation)) => evaluation,
                Ok(None) => continue,
                Err(_) if ignore => continue,
                Err(message) => return Err(refused(message)),
            };
            let mut served = evaluation.object.clone();
            for params in &evaluation.params {
                match mutate(policy, evaluation.bindings(params), &mut served, &evaluation.kind) {
                    Ok(()) => {}
                    Err(_) if ignore => {}
                    Err(message) => return Err(refused(message)),
                }
            }
            if served != evaluation.object {
                let kind = &evaluation.kind;
                let (mut patched, _) = decode_body(kind, served).map_err(|e| refused(e.message))?;
                kind.strategy.default(&mut patched);
                *obj = to_storage(kind, patched)?;
            }
        }
        Ok(())
    }
}

/// Applies a mutating policy's mutations to `served` in order, each seeing the result
/// of those before it as `object`.
fn mutate(policy: &Value, mut bindings: cel::Bindings, served: &mut Value, kind: &KindInfo) -> Result<(), String> {
    let spec = &policy["spec"];
    if !selected_with_variables(spec, &mut bindings)? {
        return Ok(());
    }
    for mutation in spec["mutations"].as_array().into_iter().flatten() {
        let (expression, apply) = match mutation["patchType"].as_str() {
            Some("ApplyConfiguration") => (&mutation["applyConfiguration"]["expression"], true),
            _ => (&mutation["jsonPatch"]["expression"], false),
        };
        let expression = expression.as_str().unwrap_or_default();
        let result = cel::compile_cached(expression, POLICY_VARIABLES)
            .and_then(|p| p.evaluate_in(&bindings))
            .map_err(|e| format!("expression '{}' resulted in error: {e}", expression.trim()))?;
        let applied = match (apply, kind.schema.as_deref()) {
            (true, Some(schema)) => krate_api::patch::apply_strategic_merge_patch(served, &result, schema),
            (true, None) => krate_api::patch::apply_merge_patch(served, &result),
            (false, _) => krate_api::patch::apply_json_patch(served, &result),
        };
        applied.map_err(|e| format!("failed to apply the mutation: {}", e.message))?;
        bindings.set("object", served);
    }
    Ok(())
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
/// What a policy's expressions see for one request under one binding: the version of
/// the resource the policy matched, the served objects, the request, the namespace,
/// and the binding's parameter objects (`[null]` without `paramKind`).
struct Evaluation {
    kind: Arc<KindInfo>,
    object: Value,
    old_object: Value,
    request: Value,
    namespace_object: Value,
    params: Vec<Value>,
}

impl Evaluation {
    /// The variables for one parameter object.
    fn bindings(&self, params: &Value) -> cel::Bindings {
        cel::Bindings::new(&[
            ("object", &self.object),
            ("oldObject", &self.old_object),
            ("request", &self.request),
            ("params", params),
            ("namespaceObject", &self.namespace_object),
            ("variables", &Value::Object(Default::default())),
        ])
    }
}

/// Whether a policy under a binding applies to the request, and what it then sees; an
/// error (missing parameters, a failed conversion) goes by the policy's failurePolicy.
async fn prepare(
    storage: &Storage,
    attrs: &Attributes<'_>,
    obj: &Value,
    policy: &Value,
    binding: &Value,
) -> Result<Option<Evaluation>, String> {
    let Some(kind) = matches(storage, attrs, obj, &policy["spec"]["matchConstraints"]).await else { return Ok(None) };
    let binding_resources = &binding["spec"]["matchResources"];
    if binding_resources.is_object() && matches(storage, attrs, obj, binding_resources).await.is_none() {
        return Ok(None);
    }
    let Some(params) = params(storage, attrs, policy, binding).await? else { return Ok(None) };
    let (new, old) = webhook::objects(attrs, obj);
    let served = |o: Option<&Value>| o.map(|o| to_served(&kind, o.clone())).transpose().map_err(|e| e.message);
    let (object, old_object) = (served(new)?.unwrap_or_default(), served(old)?.unwrap_or_default());
    let request = webhook::cel_request(attrs, &kind, new, old);
    let namespace_object = namespace_object(storage, attrs, obj);
    Ok(Some(Evaluation { kind, object, old_object, request, namespace_object, params }))
}

async fn evaluate(
    storage: &Storage,
    attrs: &Attributes<'_>,
    obj: &Value,
    policy: &Value,
    binding: &Value,
) -> Vec<Denial> {
    let evaluation = match prepare(storage, attrs, obj, policy, binding).await {
        Ok(Some(evaluation)) => evaluation,
        Ok(None) => return vec![],
        Err(message) => return config_error(policy, message),
    };
    let mut denials = Vec::new();
    for params in &evaluation.params {
        match validations(policy, evaluation.bindings(params)) {
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
    if !selected_with_variables(spec, &mut bindings)? {
        return Ok(vec![]);
    }
    let program = |expression: &str| cel::compile_cached(expression, POLICY_VARIABLES);
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

/// A policy's match conditions (false: the policy does not apply; an error under
/// `failurePolicy: Fail`), then its variables bound in order, each seeing those before
/// it. A variable that cannot be evaluated stays unset, and an expression using it then
/// fails, as upstream's lazily evaluated variables do.
fn selected_with_variables(spec: &Value, bindings: &mut cel::Bindings) -> Result<bool, String> {
    let ignore = spec["failurePolicy"] == "Ignore";
    let program = |expression: &str| cel::compile_cached(expression, POLICY_VARIABLES);
    for condition in spec["matchConditions"].as_array().into_iter().flatten() {
        match program(condition["expression"].as_str().unwrap_or_default()).and_then(|p| p.evaluate_bool_in(bindings)) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(_) if ignore => return Ok(false),
            Err(e) => return Err(format!("failed to evaluate match condition: {e}")),
        }
    }
    let mut variables = serde_json::Map::new();
    for variable in spec["variables"].as_array().into_iter().flatten() {
        let value = program(variable["expression"].as_str().unwrap_or_default()).and_then(|p| p.evaluate_in(bindings));
        if let Ok(value) = value {
            variables.insert(variable["name"].as_str().unwrap_or_default().to_string(), value);
            bindings.set("variables", &Value::Object(variables.clone()));
        }
    }
    Ok(true)
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

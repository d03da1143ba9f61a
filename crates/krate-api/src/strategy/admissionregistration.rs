//! admissionregistration.k8s.io/v1: webhook configurations and validating admission
//! policies with their bindings; upstream's v1 defaults and validation
//! (`pkg/apis/admissionregistration/validation`), with its messages. The API server's
//! webhook dispatcher (`krate-apiserver/src/webhook/`) and policy plugin (`policy.rs`)
//! rely on what is checked here: every webhook has a client config, known policies and
//! sane rules; every CEL expression of a policy compiles.

use serde_json::{json, Value};

use super::{Errors, Strategy};
use crate::error::FieldError;
use crate::object::default;
use crate::selectors::LabelSelector;
use crate::validation::is_dns1123_subdomain;

/// MutatingWebhookConfiguration (`mutating`) and ValidatingWebhookConfiguration.
pub struct WebhookConfigurationStrategy {
    pub mutating: bool,
}

pub static MUTATING_WEBHOOKS: WebhookConfigurationStrategy = WebhookConfigurationStrategy { mutating: true };
pub static VALIDATING_WEBHOOKS: WebhookConfigurationStrategy = WebhookConfigurationStrategy { mutating: false };

const OPERATIONS: &[&str] = &["*", "CONNECT", "CREATE", "DELETE", "UPDATE"];
const SCOPES: &[&str] = &["*", "Cluster", "Namespaced"];
const FAILURE_POLICIES: &[&str] = &["Fail", "Ignore"];
const MATCH_POLICIES: &[&str] = &["Equivalent", "Exact"];
const SIDE_EFFECTS: &[&str] = &["None", "NoneOnDryRun"];
const REINVOCATION_POLICIES: &[&str] = &["IfNeeded", "Never"];
const REVIEW_VERSIONS: &[&str] = &["v1", "v1beta1"];

impl Strategy for WebhookConfigurationStrategy {
    fn default(&self, obj: &mut Value) {
        let Some(hooks) = obj.get_mut("webhooks").and_then(Value::as_array_mut) else { return };
        for hook in hooks {
            default(hook, &["failurePolicy"], json!("Fail"));
            default(hook, &["matchPolicy"], json!("Equivalent"));
            default(hook, &["namespaceSelector"], json!({}));
            default(hook, &["objectSelector"], json!({}));
            default(hook, &["timeoutSeconds"], json!(10));
            if self.mutating {
                default(hook, &["reinvocationPolicy"], json!("Never"));
            }
            if hook.pointer("/clientConfig/service").is_some_and(Value::is_object) {
                default(hook, &["clientConfig", "service", "port"], json!(443));
            }
            for rule in hook.get_mut("rules").and_then(Value::as_array_mut).into_iter().flatten() {
                default(rule, &["scope"], json!("*"));
            }
        }
    }

    fn validate(&self, obj: &Value, errs: &mut Errors) {
        let mut names = std::collections::HashSet::new();
        for (i, hook) in obj["webhooks"].as_array().into_iter().flatten().enumerate() {
            let path = format!("webhooks[{i}]");
            validate_webhook(hook, &path, self.mutating, errs);
            validate_review_versions(&hook["admissionReviewVersions"], &path, errs);
            if let Some(name) = hook["name"].as_str().filter(|n| !n.is_empty()) {
                if !names.insert(name) {
                    errs.push(FieldError::duplicate(format!("{path}.name"), &json!(name)));
                }
            }
        }
    }
}

/// ValidatingAdmissionPolicy.
pub struct ValidatingAdmissionPolicyStrategy;

/// The variables a policy's expressions may use.
pub const POLICY_VARIABLES: &[&str] =
    &["object", "oldObject", "request", "params", "namespaceObject", "authorizer", "variables"];

/// `matchConstraints` / `matchResources` defaults.
fn default_match_resources(match_resources: &mut Value) {
    if !match_resources.is_object() {
        return;
    }
    default(match_resources, &["matchPolicy"], json!("Equivalent"));
    default(match_resources, &["namespaceSelector"], json!({}));
    default(match_resources, &["objectSelector"], json!({}));
    for key in ["resourceRules", "excludeResourceRules"] {
        for rule in match_resources.get_mut(key).and_then(Value::as_array_mut).into_iter().flatten() {
            default(rule, &["scope"], json!("*"));
        }
    }
}

fn validate_match_resources(match_resources: &Value, path: &str, errs: &mut Errors) {
    check_enum(match_resources, "matchPolicy", path, MATCH_POLICIES, errs);
    for selector in ["namespaceSelector", "objectSelector"] {
        if let Some(s) = match_resources.get(selector).filter(|s| !s.is_null()) {
            if let Err(e) = LabelSelector::from_json(s) {
                errs.push(FieldError::invalid(format!("{path}.{selector}"), s, &e));
            }
        }
    }
    for key in ["resourceRules", "excludeResourceRules"] {
        for (i, rule) in match_resources[key].as_array().into_iter().flatten().enumerate() {
            validate_rule(rule, &format!("{path}.{key}[{i}]"), errs);
        }
    }
}

/// An expression that must compile in the policy environment.
fn check_expression(value: &Value, path: String, required: bool, errs: &mut Errors) {
    match value.as_str().filter(|e| !e.trim().is_empty()) {
        None if required => errs.push(FieldError::required(path, "")),
        None => {}
        Some(expression) => {
            if let Err(e) = crate::cel::compile(expression, POLICY_VARIABLES) {
                errs.push(FieldError::invalid(path, value, &e));
            }
        }
    }
}

/// What both kinds of admission policy share: their defaults, ...
fn default_policy(obj: &mut Value) {
    default(obj, &["spec", "failurePolicy"], json!("Fail"));
    if let Some(constraints) = obj.pointer_mut("/spec/matchConstraints") {
        default_match_resources(constraints);
    }
}

/// ... their failure policy and what they match ...
fn validate_policy_match(spec: &Value, errs: &mut Errors) {
    check_enum(spec, "failurePolicy", "spec", FAILURE_POLICIES, errs);
    match spec.get("matchConstraints").filter(|c| c.is_object()) {
        None => errs.push(FieldError::required("spec.matchConstraints", "")),
        Some(constraints) => {
            if constraints["resourceRules"].as_array().is_none_or(Vec::is_empty) {
                errs.push(FieldError::required("spec.matchConstraints.resourceRules", ""));
            }
            validate_match_resources(constraints, "spec.matchConstraints", errs);
        }
    }
}

/// ... and their variables, match conditions and parameter kind.
fn validate_policy_inputs(spec: &Value, errs: &mut Errors) {
    for (i, v) in spec["variables"].as_array().into_iter().flatten().enumerate() {
        if v["name"].as_str().is_none_or(str::is_empty) {
            errs.push(FieldError::required(format!("spec.variables[{i}].name"), ""));
        }
        check_expression(&v["expression"], format!("spec.variables[{i}].expression"), true, errs);
    }
    for (i, c) in spec["matchConditions"].as_array().into_iter().flatten().enumerate() {
        check_expression(&c["expression"], format!("spec.matchConditions[{i}].expression"), true, errs);
    }
    if let Some(param_kind) = spec.get("paramKind").filter(|p| !p.is_null()) {
        for key in ["apiVersion", "kind"] {
            if param_kind[key].as_str().is_none_or(str::is_empty) {
                errs.push(FieldError::required(format!("spec.paramKind.{key}"), ""));
            }
        }
    }
}

impl Strategy for ValidatingAdmissionPolicyStrategy {
    fn default(&self, obj: &mut Value) {
        default_policy(obj);
    }

    fn validate(&self, obj: &Value, errs: &mut Errors) {
        let spec = &obj["spec"];
        validate_policy_match(spec, errs);
        let validations = spec["validations"].as_array().map_or(0, Vec::len);
        let annotations = spec["auditAnnotations"].as_array().map_or(0, Vec::len);
        if validations == 0 && annotations == 0 {
            let why = "validations or auditAnnotations must contain at least one item";
            errs.push(FieldError::required("spec.validations", why));
            errs.push(FieldError::required("spec.auditAnnotations", why));
        }
        for (i, v) in spec["validations"].as_array().into_iter().flatten().enumerate() {
            check_expression(&v["expression"], format!("spec.validations[{i}].expression"), true, errs);
            check_expression(&v["messageExpression"], format!("spec.validations[{i}].messageExpression"), false, errs);
            const REASONS: &[&str] = &["Forbidden", "Invalid", "RequestEntityTooLarge", "Unauthorized"];
            check_enum(v, "reason", &format!("spec.validations[{i}]"), REASONS, errs);
        }
        for (i, a) in spec["auditAnnotations"].as_array().into_iter().flatten().enumerate() {
            check_expression(&a["valueExpression"], format!("spec.auditAnnotations[{i}].valueExpression"), true, errs);
        }
        validate_policy_inputs(spec, errs);
    }
}

/// MutatingAdmissionPolicy.
pub struct MutatingAdmissionPolicyStrategy;

impl Strategy for MutatingAdmissionPolicyStrategy {
    fn default(&self, obj: &mut Value) {
        default_policy(obj);
    }

    fn validate(&self, obj: &Value, errs: &mut Errors) {
        let spec = &obj["spec"];
        validate_policy_match(spec, errs);
        check_enum(spec, "reinvocationPolicy", "spec", REINVOCATION_POLICIES, errs);
        let mutations = spec["mutations"].as_array().map(Vec::as_slice).unwrap_or_default();
        if mutations.is_empty() {
            errs.push(FieldError::required("spec.mutations", "mutations must contain at least one item"));
        }
        for (i, m) in mutations.iter().enumerate() {
            let path = format!("spec.mutations[{i}]");
            let expression = match m["patchType"].as_str() {
                Some("ApplyConfiguration") => ("applyConfiguration", &m["applyConfiguration"]["expression"]),
                Some("JSONPatch") => ("jsonPatch", &m["jsonPatch"]["expression"]),
                _ => {
                    let allowed = &["ApplyConfiguration", "JSONPatch"];
                    errs.push(FieldError::not_supported(format!("{path}.patchType"), &m["patchType"], allowed));
                    continue;
                }
            };
            check_expression(expression.1, format!("{path}.{}.expression", expression.0), true, errs);
        }
        validate_policy_inputs(spec, errs);
    }
}

/// MutatingAdmissionPolicyBinding.
pub struct MutatingAdmissionPolicyBindingStrategy;

impl Strategy for MutatingAdmissionPolicyBindingStrategy {
    fn default(&self, obj: &mut Value) {
        default_binding(obj);
    }

    fn validate(&self, obj: &Value, errs: &mut Errors) {
        let spec = &obj["spec"];
        validate_binding_target(spec, errs);
        validate_param_ref(spec, errs);
    }
}

/// What both kinds of policy binding share: the defaults of `matchResources`, ...
fn default_binding(obj: &mut Value) {
    if let Some(resources) = obj.pointer_mut("/spec/matchResources") {
        default_match_resources(resources);
    }
}

/// ... the policy they name and what they narrow it to ...
fn validate_binding_target(spec: &Value, errs: &mut Errors) {
    if spec["policyName"].as_str().is_none_or(str::is_empty) {
        errs.push(FieldError::required("spec.policyName", ""));
    }
    if let Some(resources) = spec.get("matchResources").filter(|r| r.is_object()) {
        validate_match_resources(resources, "spec.matchResources", errs);
    }
}

/// ... and `paramRef`: a name or a selector, and what to do without parameters.
fn validate_param_ref(spec: &Value, errs: &mut Errors) {
    let Some(param_ref) = spec.get("paramRef").filter(|p| !p.is_null()) else { return };
    let named = param_ref["name"].as_str().is_some_and(|n| !n.is_empty());
    if named == param_ref.get("selector").is_some_and(|s| !s.is_null()) {
        errs.push(FieldError::required("spec.paramRef", "one of name or selector must be specified"));
    }
    match param_ref.get("parameterNotFoundAction") {
        None | Some(Value::Null) => errs.push(FieldError::required("spec.paramRef.parameterNotFoundAction", "")),
        Some(_) => check_enum(param_ref, "parameterNotFoundAction", "spec.paramRef", &["Allow", "Deny"], errs),
    }
}

/// ValidatingAdmissionPolicyBinding.
pub struct ValidatingAdmissionPolicyBindingStrategy;

impl Strategy for ValidatingAdmissionPolicyBindingStrategy {
    fn default(&self, obj: &mut Value) {
        default_binding(obj);
    }

    fn validate(&self, obj: &Value, errs: &mut Errors) {
        let spec = &obj["spec"];
        validate_binding_target(spec, errs);
        const ACTIONS: &[&str] = &["Audit", "Deny", "Warn"];
        let actions: Vec<&str> =
            spec["validationActions"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        if actions.is_empty() {
            errs.push(FieldError::required("spec.validationActions", ""));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, action) in actions.iter().enumerate() {
            if !ACTIONS.contains(action) {
                errs.push(FieldError::not_supported(format!("spec.validationActions[{i}]"), &json!(action), ACTIONS));
            } else if !seen.insert(action) {
                errs.push(FieldError::duplicate(format!("spec.validationActions[{i}]"), &json!(action)));
            }
        }
        if actions.contains(&"Deny") && actions.contains(&"Warn") {
            errs.push(FieldError::invalid(
                "spec.validationActions",
                &spec["validationActions"],
                "must not contain both Deny and Warn (repeating the same validation failure information in the API response and headers serves no purpose)",
            ));
        }
        validate_param_ref(spec, errs);
    }
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// A field that must be one of `allowed`, if set.
fn check_enum(hook: &Value, key: &str, path: &str, allowed: &[&str], errs: &mut Errors) {
    if let Some(value) = hook.get(key).filter(|v| !v.is_null()) {
        if !value.as_str().is_some_and(|v| allowed.contains(&v)) {
            errs.push(FieldError::not_supported(format!("{path}.{key}"), value, allowed));
        }
    }
}

fn validate_webhook(hook: &Value, path: &str, mutating: bool, errs: &mut Errors) {
    let name = str_at(hook, "name").unwrap_or_default();
    let name_path = format!("{path}.name");
    if name.is_empty() {
        errs.push(FieldError::required(name_path, ""));
    } else if let Some(problems) = Some(is_dns1123_subdomain(name)).filter(|p| !p.is_empty()) {
        errs.push(FieldError::invalid(name_path, &json!(name), &problems.join(",")));
    } else if name.split('.').count() < 3 {
        errs.push(FieldError::invalid(
            name_path,
            &json!(name),
            "should be a domain with at least three segments separated by dots",
        ));
    }
    for (i, rule) in hook["rules"].as_array().into_iter().flatten().enumerate() {
        validate_rule(rule, &format!("{path}.rules[{i}]"), errs);
    }
    check_enum(hook, "failurePolicy", path, FAILURE_POLICIES, errs);
    check_enum(hook, "matchPolicy", path, MATCH_POLICIES, errs);
    match hook.get("sideEffects").filter(|v| !v.is_null()) {
        None => errs.push(FieldError::required(
            format!("{path}.sideEffects"),
            &format!("must specify one of {}", SIDE_EFFECTS.join(", ")),
        )),
        Some(_) => check_enum(hook, "sideEffects", path, SIDE_EFFECTS, errs),
    }
    if mutating {
        check_enum(hook, "reinvocationPolicy", path, REINVOCATION_POLICIES, errs);
    }
    if let Some(timeout) = hook.get("timeoutSeconds").and_then(Value::as_i64) {
        if !(1..=30).contains(&timeout) {
            errs.push(FieldError::invalid(
                format!("{path}.timeoutSeconds"),
                &json!(timeout),
                "the timeout value must be between 1 and 30 seconds",
            ));
        }
    }
    for selector in ["namespaceSelector", "objectSelector"] {
        if let Some(s) = hook.get(selector).filter(|s| !s.is_null()) {
            if let Err(e) = LabelSelector::from_json(s) {
                errs.push(FieldError::invalid(format!("{path}.{selector}"), s, &e));
            }
        }
    }
    validate_client_config(&hook["clientConfig"], &format!("{path}.clientConfig"), errs);
    crate::cel::validate_match_conditions(&hook["matchConditions"], &format!("{path}.matchConditions"), errs);
}

fn validate_review_versions(versions: &Value, path: &str, errs: &mut Errors) {
    let path = format!("{path}.admissionReviewVersions");
    let versions: Vec<&str> = versions.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if versions.is_empty() {
        errs.push(FieldError::required(path, &format!("must specify one of {}", REVIEW_VERSIONS.join(", "))));
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for (i, v) in versions.iter().enumerate() {
        if !seen.insert(v) {
            errs.push(FieldError::invalid(format!("{path}[{i}]"), &json!(v), "duplicate version"));
        }
    }
    if !versions.iter().any(|v| REVIEW_VERSIONS.contains(v)) {
        errs.push(FieldError::invalid(
            path,
            &json!(versions),
            &format!("must include at least one of {}", REVIEW_VERSIONS.join(", ")),
        ));
    }
}

fn strings<'a>(rule: &'a Value, key: &str) -> Vec<&'a str> {
    rule[key].as_array().into_iter().flatten().filter_map(Value::as_str).collect()
}

fn validate_rule(rule: &Value, path: &str, errs: &mut Errors) {
    let operations = strings(rule, "operations");
    if operations.is_empty() {
        errs.push(FieldError::required(format!("{path}.operations"), ""));
    }
    if operations.len() > 1 && operations.contains(&"*") {
        errs.push(FieldError::invalid(
            format!("{path}.operations"),
            &rule["operations"],
            "if '*' is present, must not specify other operations",
        ));
    }
    for (i, op) in operations.iter().enumerate() {
        if !OPERATIONS.contains(op) {
            errs.push(FieldError::not_supported(format!("{path}.operations[{i}]"), &json!(op), OPERATIONS));
        }
    }
    for (key, what) in [("apiGroups", "API groups"), ("apiVersions", "API versions")] {
        let values = strings(rule, key);
        if rule[key].as_array().is_none_or(Vec::is_empty) {
            errs.push(FieldError::required(format!("{path}.{key}"), ""));
        }
        if values.len() > 1 && values.contains(&"*") {
            errs.push(FieldError::invalid(
                format!("{path}.{key}"),
                &rule[key],
                &format!("if '*' is present, must not specify other {what}"),
            ));
        }
    }
    for (i, v) in strings(rule, "apiVersions").iter().enumerate() {
        if v.is_empty() {
            errs.push(FieldError::required(format!("{path}.apiVersions[{i}]"), ""));
        }
    }
    validate_resources(&rule["resources"], &format!("{path}.resources"), errs);
    check_enum(rule, "scope", path, SCOPES, errs);
}

/// Resources with optional subresources: `*`, `*/*`, `pods`, `pods/*`, `*/status`.
fn validate_resources(resources: &Value, path: &str, errs: &mut Errors) {
    let list: Vec<&str> = resources.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if list.is_empty() {
        errs.push(FieldError::required(path, ""));
    }
    let mut double_wildcard = false;
    let mut single_wildcard = false;
    let mut without_subresource = false;
    for (i, resource) in list.iter().enumerate() {
        if resource.is_empty() {
            errs.push(FieldError::required(format!("{path}[{i}]"), ""));
        }
        match resource.split_once('/') {
            Some(("*", "*")) => double_wildcard = true,
            Some(_) => {}
            None if *resource == "*" => single_wildcard = true,
            None => without_subresource = true,
        }
    }
    if list.len() > 1 && double_wildcard {
        errs.push(FieldError::invalid(path, resources, "if '*/*' is present, must not specify other resources"));
    }
    if single_wildcard && without_subresource {
        errs.push(FieldError::invalid(
            path,
            resources,
            "if '*' is present, must not specify other resources without subresources",
        ));
    }
}

fn validate_client_config(cc: &Value, path: &str, errs: &mut Errors) {
    let url = cc.get("url").filter(|v| !v.is_null());
    let service = cc.get("service").filter(|v| !v.is_null());
    match (url, service) {
        (Some(url), None) => validate_url(url.as_str().unwrap_or_default(), &format!("{path}.url"), errs),
        (None, Some(service)) => validate_service(service, &format!("{path}.service"), errs),
        _ => errs.push(FieldError::required(path, "exactly one of url or service is required")),
    }
}

fn validate_url(url: &str, path: &str, errs: &mut Errors) {
    const FORM: &str = "; desired format: https://host[/path]";
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    if scheme != "https" {
        errs.push(FieldError::invalid(path, &json!(scheme), &format!("'https' is the only allowed URL scheme{FORM}")));
    }
    let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = rest.split('/').next().unwrap_or_default();
    let (user, host) = authority.rsplit_once('@').map_or(("", authority), |(u, h)| (u, h));
    if host.is_empty() {
        errs.push(FieldError::invalid(path, &json!(host), &format!("host must be specified{FORM}")));
    }
    if !user.is_empty() {
        errs.push(FieldError::invalid(path, &json!(user), "user information is not permitted in the URL"));
    }
    if !fragment.is_empty() {
        errs.push(FieldError::invalid(path, &json!(fragment), "fragments are not permitted in the URL"));
    }
    if !query.is_empty() {
        errs.push(FieldError::invalid(path, &json!(query), "query parameters are not permitted in the URL"));
    }
}

fn validate_service(service: &Value, path: &str, errs: &mut Errors) {
    for key in ["name", "namespace"] {
        if str_at(service, key).is_none_or(str::is_empty) {
            errs.push(FieldError::required(format!("{path}.{key}"), ""));
        }
    }
    let port = service.get("port").and_then(Value::as_i64).unwrap_or(443);
    if !(1..=65535).contains(&port) {
        errs.push(FieldError::invalid(
            format!("{path}.port"),
            &json!(port),
            "port is not valid: must be between 1 and 65535, inclusive",
        ));
    }
    let url_path = str_at(service, "path").unwrap_or_default();
    if url_path.is_empty() || url_path == "/" {
        return;
    }
    let field = format!("{path}.path");
    if url_path == "//" {
        errs.push(FieldError::invalid(field, &json!(url_path), "segment[0] may not be empty"));
        return;
    }
    if !url_path.starts_with('/') {
        errs.push(FieldError::invalid(field.clone(), &json!(url_path), "must start with a '/'"));
    }
    let trimmed = url_path.strip_prefix('/').unwrap_or(url_path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    for (i, step) in trimmed.split('/').enumerate() {
        if step.is_empty() {
            errs.push(FieldError::invalid(field.clone(), &json!(url_path), &format!("segment[{i}] may not be empty")));
            continue;
        }
        for failure in is_dns1123_subdomain(step) {
            errs.push(FieldError::invalid(field.clone(), &json!(url_path), &format!("segment[{i}]: {failure}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(obj: Value) -> Vec<String> {
        let mut obj = obj;
        VALIDATING_WEBHOOKS.default(&mut obj);
        let mut errs = Errors::new();
        VALIDATING_WEBHOOKS.validate(&obj, &mut errs);
        errs.iter().map(FieldError::to_line).collect()
    }

    fn hook(extra: Value) -> Value {
        let mut hook = json!({
            "name": "deny.example.com",
            "clientConfig": {"service": {"namespace": "ns", "name": "svc", "path": "/deny"}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
        });
        for (k, v) in extra.as_object().unwrap() {
            hook[k] = v.clone();
        }
        json!({"webhooks": [hook]})
    }

    #[test]
    fn a_complete_webhook_is_valid_and_defaulted() {
        let mut obj = hook(json!({}));
        VALIDATING_WEBHOOKS.default(&mut obj);
        assert_eq!(obj["webhooks"][0]["failurePolicy"], "Fail");
        assert_eq!(obj["webhooks"][0]["timeoutSeconds"], 10);
        assert_eq!(obj["webhooks"][0]["clientConfig"]["service"]["port"], 443);
        assert_eq!(obj["webhooks"][0]["rules"][0]["scope"], "*");
        assert_eq!(errors_of(hook(json!({}))), Vec::<String>::new());
    }

    #[test]
    fn names_side_effects_timeouts_and_urls_are_checked_with_upstreams_messages() {
        let bad = hook(json!({"name": "deny", "sideEffects": "Some", "timeoutSeconds": 31,
            "clientConfig": {"url": "http://h/p?q=1"}}));
        let errs = errors_of(bad);
        assert!(errs.contains(&"webhooks[0].name: Invalid value: \"deny\": should be a domain with at least three segments separated by dots".to_string()), "{errs:?}");
        assert!(
            errs.contains(
                &"webhooks[0].sideEffects: Unsupported value: \"Some\": supported values: \"None\", \"NoneOnDryRun\""
                    .to_string()
            ),
            "{errs:?}"
        );
        assert!(
            errs.contains(
                &"webhooks[0].timeoutSeconds: Invalid value: 31: the timeout value must be between 1 and 30 seconds"
                    .to_string()
            ),
            "{errs:?}"
        );
        assert!(errs.iter().any(|e| e.contains("'https' is the only allowed URL scheme")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("query parameters are not permitted")), "{errs:?}");
    }

    #[test]
    fn a_missing_client_config_side_effects_or_review_versions_is_required() {
        let mut obj = hook(json!({}));
        let h = obj["webhooks"][0].as_object_mut().unwrap();
        h.remove("clientConfig");
        h.remove("sideEffects");
        h.remove("admissionReviewVersions");
        let errs = errors_of(obj);
        assert!(errs.contains(
            &"webhooks[0].clientConfig: Required value: exactly one of url or service is required".to_string()
        ));
        assert!(errs
            .contains(&"webhooks[0].sideEffects: Required value: must specify one of None, NoneOnDryRun".to_string()));
        assert!(errs.contains(
            &"webhooks[0].admissionReviewVersions: Required value: must specify one of v1, v1beta1".to_string()
        ));
    }

    #[test]
    fn duplicate_names_and_bad_resources_are_refused() {
        let mut obj = hook(
            json!({"rules": [{"operations": ["*", "CREATE"], "apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*/*", "pods"]}]}),
        );
        let copy = obj["webhooks"][0].clone();
        obj["webhooks"].as_array_mut().unwrap().push(copy);
        let errs = errors_of(obj);
        assert!(errs.contains(&"webhooks[1].name: Duplicate value: \"deny.example.com\"".to_string()), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("if '*/*' is present, must not specify other resources")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("if '*' is present, must not specify other operations")), "{errs:?}");
    }
}

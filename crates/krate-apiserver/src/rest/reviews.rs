//! The review APIs: create-only kinds answered from the request and never stored.
//! authorization.k8s.io/v1 SubjectAccessReview, LocalSubjectAccessReview and
//! SelfSubjectAccessReview ask the server's authorizer chain (`kubectl auth can-i`);
//! SelfSubjectRulesReview lists what the chain grants (`kubectl auth can-i --list`);
//! authentication.k8s.io/v1 TokenReview checks a bearer token and SelfSubjectReview says
//! who the caller is (`kubectl auth whoami`).

use std::collections::BTreeMap;

use axum::body::Body;
use http::Response;
use k8s_openapi::api::{authentication::v1 as authn, authorization::v1 as authz};
use krate_api::{ApiError, ApiResult, FieldError};
use serde_json::{json, Map, Value};

use super::{Call, Handler};
use crate::auth::User;
use crate::http::{content_type, json_response, parse_body, read_body};
use crate::rbac::Rule;
use crate::request::RequestAttributes;
use crate::ApiServer;

pub struct Review;

#[async_trait::async_trait]
impl Handler for Review {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>> {
        let kind = call.scope.kind.clone();
        let (server, requester) = (call.server.clone(), &call.attrs.user);
        let namespace = call.scope.namespace.clone().unwrap_or_default();
        let (headers, body) = read_body(call.req).await?;
        let mut review = parse_body(&content_type(&headers), &body)?;
        if !review.is_object() {
            return Err(ApiError::bad_request(format!("the body of a {} must be an object", kind.kind)));
        }
        review["apiVersion"] = json!(kind.api_version());
        review["kind"] = json!(kind.kind);
        if review.get("metadata").is_none_or(Value::is_null) {
            review["metadata"] = json!({});
        }
        let status = if kind.is::<authz::SelfSubjectAccessReview>() {
            access_review(&server, &kind.kind, requester.clone(), &review, None)?
        } else if kind.is::<authz::SubjectAccessReview>() {
            access_review(&server, &kind.kind, spec_user(&kind.kind, &review)?, &review, None)?
        } else if kind.is::<authz::LocalSubjectAccessReview>() {
            access_review(&server, &kind.kind, spec_user(&kind.kind, &review)?, &review, Some(&namespace))?
        } else if kind.is::<authz::SelfSubjectRulesReview>() {
            rules_review(&server, requester, &review)
        } else if kind.is::<authn::TokenReview>() {
            token_review(&server, &review).await?
        } else if kind.is::<authn::SelfSubjectReview>() {
            json!({"userInfo": requester.info()})
        } else {
            return Err(ApiError::new(405, "MethodNotAllowed", format!("{} is not a review", kind.kind)));
        };
        review["status"] = status;
        Ok(json_response(201, &review))
    }
}

/// The user a SubjectAccessReview asks about.
fn spec_user(kind: &str, review: &Value) -> ApiResult<User> {
    let spec = &review["spec"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
    };
    let user = User {
        name: spec["user"].as_str().unwrap_or_default().to_string(),
        groups: strings(&spec["groups"]),
        uid: spec["uid"].as_str().unwrap_or_default().to_string(),
        extra: spec["extra"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), strings(v)))
            .collect::<BTreeMap<_, _>>(),
    };
    if user.name.is_empty() && user.groups.is_empty() {
        let error = FieldError::invalid("spec.user", &json!(""), "at least one of user or group must be specified");
        return Err(ApiError::invalid("authorization.k8s.io", kind, "", &[error]));
    }
    Ok(user)
}

/// The attributes an access review asks about, validated as upstream does.
fn review_attributes(kind: &str, user: User, spec: &Value, local: Option<&str>) -> ApiResult<RequestAttributes> {
    let resource = spec.get("resourceAttributes").filter(|v| !v.is_null());
    let non_resource = spec.get("nonResourceAttributes").filter(|v| !v.is_null());
    let invalid = |field: &str, detail: &str| {
        ApiError::invalid("authorization.k8s.io", kind, "", &[FieldError::invalid(field, &Value::Null, detail)])
    };
    let text = |v: &Value, field: &str| v[field].as_str().unwrap_or_default().to_string();
    match (resource, non_resource) {
        (Some(_), Some(_)) => {
            Err(invalid("spec.nonResourceAttributes", "cannot be specified in combination with resourceAttributes"))
        }
        (None, None) => Err(invalid(
            "spec.resourceAttributes",
            "exactly one of nonResourceAttributes or resourceAttributes must be specified",
        )),
        (None, Some(_)) if local.is_some() => {
            Err(invalid("spec.nonResourceAttributes", "disallowed on this kind of request"))
        }
        (None, Some(n)) => Ok(RequestAttributes::non_resource(user, &text(n, "verb"), &text(n, "path"))),
        (Some(r), None) => {
            let namespace = text(r, "namespace");
            if let Some(local) = local {
                if namespace != local {
                    return Err(ApiError::bad_request(format!(
                        "spec.resourceAttributes.namespace must match namespace: {local}"
                    )));
                }
            }
            let mut attrs = RequestAttributes::resource(
                user,
                crate::request::Verb::parse(&text(r, "verb")),
                &text(r, "group"),
                &text(r, "resource"),
                &text(r, "subresource"),
                &namespace,
                &text(r, "name"),
            );
            attrs.api_version = text(r, "version");
            attrs.field_selector = text(&r["fieldSelector"], "rawSelector");
            Ok(attrs)
        }
    }
}

fn access_review(server: &ApiServer, kind: &str, user: User, review: &Value, local: Option<&str>) -> ApiResult<Value> {
    let attrs = review_attributes(kind, user, &review["spec"], local)?;
    let verdict = server.authorizer.decide(&attrs);
    let mut status = Map::new();
    status.insert("allowed".into(), json!(verdict.allowed));
    if verdict.denied {
        status.insert("denied".into(), json!(true));
    }
    if !verdict.reason.is_empty() {
        status.insert("reason".into(), json!(verdict.reason));
    }
    Ok(Value::Object(status))
}

fn rules_review(server: &ApiServer, user: &User, review: &Value) -> Value {
    let namespace = review["spec"]["namespace"].as_str().unwrap_or_default();
    let (rules, errors, incomplete) = server.authorizer.rules_for(user, namespace);
    let resource_rules: Vec<Value> = rules
        .iter()
        .filter(|r| !r.resources.is_empty())
        .map(|r| json!(Rule { non_resource_urls: vec![], ..r.clone() }))
        .collect();
    let non_resource_rules: Vec<Value> = rules
        .iter()
        .filter(|r| !r.non_resource_urls.is_empty())
        .map(|r| json!({"verbs": r.verbs, "nonResourceURLs": r.non_resource_urls}))
        .collect();
    let mut status =
        json!({"resourceRules": resource_rules, "nonResourceRules": non_resource_rules, "incomplete": incomplete});
    if !errors.is_empty() {
        status["evaluationError"] = json!(crate::rbac::aggregate(&errors));
    }
    status
}

async fn token_review(server: &ApiServer, review: &Value) -> ApiResult<Value> {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    if token.is_empty() {
        return Err(ApiError::bad_request("token is required for TokenReview in authentication"));
    }
    let audiences: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let own = crate::rest::serviceaccounts::tokens::ISSUER.to_string();
    if !audiences.is_empty() && !audiences.contains(&own) {
        return Ok(json!({"authenticated": false, "error": "token audiences don't match the requested audiences"}));
    }
    Ok(match server.authenticate_token(token).await {
        Ok(user) => json!({"authenticated": true, "user": user.info(), "audiences": [own]}),
        Err(_) => json!({"authenticated": false, "error": "invalid bearer token"}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_reviews_ask_about_one_thing() {
        let user = || User { name: "u".into(), ..Default::default() };
        let both = json!({"resourceAttributes": {"verb": "get"}, "nonResourceAttributes": {"verb": "get"}});
        assert_eq!(review_attributes("SubjectAccessReview", user(), &both, None).unwrap_err().code, 422);
        assert_eq!(review_attributes("SubjectAccessReview", user(), &json!({}), None).unwrap_err().code, 422);
        let other_ns = json!({"resourceAttributes": {"verb": "get", "resource": "pods", "namespace": "b"}});
        let err = review_attributes("LocalSubjectAccessReview", user(), &other_ns, Some("a")).unwrap_err();
        assert_eq!(
            (err.code, err.message.as_str()),
            (400, "spec.resourceAttributes.namespace must match namespace: a")
        );
        let attrs = review_attributes(
            "SubjectAccessReview",
            user(),
            &json!({"resourceAttributes": {"verb": "list", "group": "apps", "resource": "deployments", "subresource": "scale", "namespace": "a"}}),
            None,
        )
        .unwrap();
        assert_eq!((attrs.verb.as_str(), attrs.resource_and_subresource().as_str()), ("list", "deployments/scale"));
        let url = review_attributes(
            "SubjectAccessReview",
            user(),
            &json!({"nonResourceAttributes": {"verb": "get", "path": "/logs"}}),
            None,
        )
        .unwrap();
        assert!(!url.is_resource_request && url.path == "/logs");
        let nobody = json!({"spec": {"resourceAttributes": {"verb": "get"}}});
        assert_eq!(spec_user("SubjectAccessReview", &nobody).unwrap_err().code, 422);
    }
}

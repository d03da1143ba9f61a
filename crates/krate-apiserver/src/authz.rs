//! Authorization: a chain of authorizers asked in order for every request, as
//! upstream's union authorizer. The first to allow or deny decides; a request no
//! authorizer allows is refused with upstream's `Forbidden` message. Today's one plugin
//! lets every authenticated user do everything and anonymous users read only health and
//! version; RBAC and the node authorizer come as further plugins.

use std::sync::Arc;

use krate_api::ApiError;
use serde_json::json;

use crate::request::RequestAttributes;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused, whatever later authorizers would say.
    Deny(String),
    /// Neither: the next authorizer is asked. The reason (if any) is reported when no
    /// authorizer allows.
    NoOpinion(String),
}

pub trait Authorizer: Send + Sync + std::fmt::Debug {
    fn authorize(&self, attrs: &RequestAttributes) -> Decision;
}

/// The authorizers of a server, asked in order.
#[derive(Clone, Debug)]
pub struct Chain(pub Vec<Arc<dyn Authorizer>>);

impl Default for Chain {
    /// krate's behaviour before RBAC: authenticated users may do everything.
    fn default() -> Self {
        Self(vec![Arc::new(PublicInfo), Arc::new(AuthenticatedUsers)])
    }
}

impl Chain {
    /// `Ok` if some authorizer allows the request before any denies it.
    pub fn authorize(&self, attrs: &RequestAttributes) -> Result<(), ApiError> {
        let mut reasons = Vec::new();
        for authorizer in &self.0 {
            match authorizer.authorize(attrs) {
                Decision::Allow => return Ok(()),
                Decision::Deny(reason) => return Err(forbidden(attrs, &reason)),
                Decision::NoOpinion(reason) if !reason.is_empty() => reasons.push(reason),
                Decision::NoOpinion(_) => {}
            }
        }
        Err(forbidden(attrs, &reasons.join("\n")))
    }
}

/// Upstream's refusal: `pods "p" is forbidden: User "x" cannot delete resource "pods" in
/// API group "" in the namespace "y"`, with the authorizer's reason after a colon.
pub fn forbidden(attrs: &RequestAttributes, reason: &str) -> ApiError {
    let user = &attrs.user.name;
    let mut why = if !attrs.is_resource_request {
        format!("User {user:?} cannot {} path {:?}", attrs.verb, attrs.path)
    } else {
        let resource = attrs.resource_and_subresource();
        let (verb, group) = (&attrs.verb, &attrs.api_group);
        match attrs.namespace.as_str() {
            "" => {
                format!("User {user:?} cannot {verb} resource {resource:?} in API group {group:?} at the cluster scope")
            }
            ns => format!(
                "User {user:?} cannot {verb} resource {resource:?} in API group {group:?} in the namespace {ns:?}"
            ),
        }
    };
    if !reason.is_empty() {
        why = format!("{why}: {reason}");
    }
    let qualified = if attrs.is_resource_request {
        krate_api::error::qualified(&attrs.api_group, &attrs.resource)
    } else {
        String::new()
    };
    let message = match (qualified.as_str(), attrs.name.as_str()) {
        ("", _) => format!("forbidden: {why}"),
        (q, "") => format!("{q} is forbidden: {why}"),
        (q, name) => format!("{q} {name:?} is forbidden: {why}"),
    };
    let mut details = serde_json::Map::new();
    for (key, value) in [("name", &attrs.name), ("group", &attrs.api_group), ("kind", &attrs.resource)] {
        if attrs.is_resource_request && !value.is_empty() {
            details.insert(key.into(), json!(value));
        }
    }
    ApiError::forbidden(message).with_details(serde_json::Value::Object(details))
}

/// Anyone, signed in or not, may read health and version (upstream's
/// `system:public-info-viewer`).
#[derive(Debug)]
pub struct PublicInfo;

impl Authorizer for PublicInfo {
    fn authorize(&self, attrs: &RequestAttributes) -> Decision {
        const PUBLIC: &[&str] = &["/healthz", "/livez", "/readyz", "/version"];
        let public = !attrs.is_resource_request
            && attrs.verb.as_str() == "get"
            && PUBLIC
                .iter()
                .any(|p| attrs.path == *p || attrs.path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/')));
        if public {
            Decision::Allow
        } else {
            Decision::NoOpinion(String::new())
        }
    }
}

/// Every authenticated user may do everything (krate before RBAC).
#[derive(Debug)]
pub struct AuthenticatedUsers;

impl Authorizer for AuthenticatedUsers {
    fn authorize(&self, attrs: &RequestAttributes) -> Decision {
        if attrs.user.is_anonymous() {
            Decision::NoOpinion(String::new())
        } else {
            Decision::Allow
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::User;
    use crate::http::route::{parse_path, parse_query};
    use http::Method;

    fn request(user: &str, method: Method, path: &str) -> RequestAttributes {
        let user = User { name: user.into(), groups: vec!["system:authenticated".into()], ..Default::default() };
        RequestAttributes::new(user, &method, path, &parse_path(path), &parse_query(None))
    }

    #[test]
    fn messages_are_upstreams() {
        let err = forbidden(&request("x", Method::DELETE, "/api/v1/namespaces/y/pods/p"), "");
        assert_eq!(err.code, 403);
        assert_eq!(err.reason, "Forbidden");
        assert_eq!(
            err.message,
            r#"pods "p" is forbidden: User "x" cannot delete resource "pods" in API group "" in the namespace "y""#
        );
        assert_eq!(err.details, Some(json!({"name": "p", "kind": "pods"})));
        let err = forbidden(&request("x", Method::GET, "/apis/apps/v1/deployments"), "no RBAC policy matched");
        assert_eq!(
            err.message,
            r#"deployments.apps is forbidden: User "x" cannot list resource "deployments" in API group "apps" at the cluster scope: no RBAC policy matched"#
        );
        let err = forbidden(&request("x", Method::PUT, "/apis/apps/v1/namespaces/y/deployments/d/scale"), "");
        assert!(
            err.message.contains(r#"cannot update resource "deployments/scale" in API group "apps""#),
            "{}",
            err.message
        );
        let err = forbidden(&request("system:anonymous", Method::GET, "/metrics"), "");
        assert_eq!(err.message, r#"forbidden: User "system:anonymous" cannot get path "/metrics""#);
    }

    #[test]
    fn anonymous_users_read_only_public_information() {
        let chain = Chain::default();
        let anonymous = |method, path: &str| {
            RequestAttributes::new(User::anonymous(), &method, path, &parse_path(path), &parse_query(None))
        };
        for path in ["/healthz", "/livez", "/readyz/etcd", "/version"] {
            assert_eq!(chain.authorize(&anonymous(Method::GET, path)), Ok(()), "{path}");
        }
        for path in ["/api/v1/pods", "/apis", "/metrics", "/healthzz", "/openapi/v2"] {
            assert_eq!(chain.authorize(&anonymous(Method::GET, path)).unwrap_err().code, 403, "{path}");
        }
        assert_eq!(chain.authorize(&request("x", Method::DELETE, "/api/v1/namespaces/y/pods/p")), Ok(()));
    }

    /// Refuses one verb, has no opinion on the rest.
    #[derive(Debug)]
    struct DenyVerb(&'static str);
    impl Authorizer for DenyVerb {
        fn authorize(&self, attrs: &RequestAttributes) -> Decision {
            if attrs.verb.as_str() == self.0 {
                Decision::Deny(String::new())
            } else {
                Decision::NoOpinion(String::new())
            }
        }
    }

    #[tokio::test]
    async fn a_denying_authorizer_refuses_the_request_before_it_is_served() {
        let authorizers = Chain(vec![Arc::new(DenyVerb("delete")), Arc::new(AuthenticatedUsers)]);
        let api = crate::testing::TestApi::start(crate::Settings { authorizers, ..Default::default() }).await;
        let (code, body) = api.call("x", Method::DELETE, "/api/v1/namespaces/y/pods/p", None).await;
        assert_eq!(code, 403);
        assert_eq!(body["reason"], "Forbidden");
        assert_eq!(
            body["message"],
            r#"pods "p" is forbidden: User "x" cannot delete resource "pods" in API group "" in the namespace "y""#
        );
        // Other verbs pass authorization and reach storage.
        assert_eq!(api.call("x", Method::GET, "/api/v1/namespaces/y/pods/p", None).await.0, 404);
    }

    #[test]
    fn the_first_decision_wins() {
        #[derive(Debug)]
        struct Says(Decision);
        impl Authorizer for Says {
            fn authorize(&self, _: &RequestAttributes) -> Decision {
                self.0.clone()
            }
        }
        let req = request("x", Method::GET, "/api/v1/pods");
        let deny_first = Chain(vec![Arc::new(Says(Decision::Deny("no".into()))), Arc::new(Says(Decision::Allow))]);
        assert!(deny_first.authorize(&req).unwrap_err().message.ends_with("at the cluster scope: no"));
        let undecided = Chain(vec![
            Arc::new(Says(Decision::NoOpinion("first".into()))),
            Arc::new(Says(Decision::NoOpinion("second".into()))),
        ]);
        assert!(undecided.authorize(&req).unwrap_err().message.ends_with(": first\nsecond"));
        let allow_later =
            Chain(vec![Arc::new(Says(Decision::NoOpinion(String::new()))), Arc::new(Says(Decision::Allow))]);
        assert_eq!(allow_later.authorize(&req), Ok(()));
    }
}

//! Authorization: a chain of authorizers asked in order for every request, as
//! upstream's union authorizer. The first to allow or deny decides; a request no
//! authorizer allows is refused with upstream's `Forbidden` message. The chain always
//! starts with `system:masters` (upstream's privileged group), then the modes of
//! `--authorization-mode`: `Node` and `RBAC` (`crate::rbac`) for `krate server`, or
//! `AlwaysAllow` (every authenticated user may do everything; the default of the
//! library's `Settings`, for tests of other concerns).

use std::sync::Arc;

use krate_api::ApiError;
use serde_json::json;

use crate::auth::User;
use crate::rbac::Rule;
use crate::request::RequestAttributes;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed, with why (reported by SubjectAccessReviews).
    Allow(String),
    /// Refused, whatever later authorizers would say.
    Deny(String),
    /// Neither: the next authorizer is asked. The reason (if any) is reported when no
    /// authorizer allows.
    NoOpinion(String),
}

pub trait Authorizer: Send + Sync + std::fmt::Debug {
    fn authorize(&self, attrs: &RequestAttributes) -> Decision;

    /// The rules this authorizer grants `user` in `namespace` and the references it
    /// could not resolve (SelfSubjectRulesReview), or None if it cannot list them.
    fn rules_for(&self, _user: &User, _namespace: &str) -> Option<(Vec<Rule>, Vec<String>)> {
        None
    }
}

/// One entry of `--authorization-mode`.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Authenticated users may do everything; anonymous ones read health and version.
    AlwaysAllow,
    /// The node authorizer (`crate::rbac::node`).
    Node,
    /// RBAC (`crate::rbac`), with upstream's default policy kept at start.
    Rbac,
    /// An authorizer of the caller's own (tests).
    Custom(Arc<dyn Authorizer>),
}

impl Mode {
    /// `--authorization-mode`'s comma-separated list (`Node,RBAC`).
    pub fn parse_list(text: &str) -> Result<Vec<Mode>, String> {
        text.split(',')
            .map(|m| match m.trim() {
                "AlwaysAllow" => Ok(Mode::AlwaysAllow),
                "Node" => Ok(Mode::Node),
                "RBAC" => Ok(Mode::Rbac),
                other => Err(format!("unknown authorization mode {other:?} (known: Node, RBAC, AlwaysAllow)")),
            })
            .collect()
    }
}

/// The authorizers of a server, asked in order.
#[derive(Clone, Debug, Default)]
pub struct Chain(pub Vec<Arc<dyn Authorizer>>);

/// What the chain says of a request: allowed, denied outright, or neither; with reasons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub denied: bool,
    pub reason: String,
}

impl Chain {
    /// The chain of `modes` behind the privileged group, with `rbac` and `node` as the
    /// implementations of those modes.
    pub fn of(modes: &[Mode], rbac: Option<Arc<dyn Authorizer>>, node: Option<Arc<dyn Authorizer>>) -> Self {
        let mut chain: Vec<Arc<dyn Authorizer>> = vec![Arc::new(PrivilegedGroups)];
        for mode in modes {
            match mode {
                Mode::AlwaysAllow => {
                    chain.extend([Arc::new(PublicInfo) as Arc<dyn Authorizer>, Arc::new(AuthenticatedUsers)])
                }
                Mode::Node => chain.extend(node.clone()),
                Mode::Rbac => chain.extend(rbac.clone()),
                Mode::Custom(a) => chain.push(a.clone()),
            }
        }
        Self(chain)
    }

    /// Asks each authorizer in turn, as upstream's union authorizer.
    pub fn decide(&self, attrs: &RequestAttributes) -> Verdict {
        let mut reasons = Vec::new();
        for authorizer in &self.0 {
            match authorizer.authorize(attrs) {
                Decision::Allow(reason) => return Verdict { allowed: true, denied: false, reason },
                Decision::Deny(reason) => return Verdict { allowed: false, denied: true, reason },
                Decision::NoOpinion(reason) if !reason.is_empty() => reasons.push(reason),
                Decision::NoOpinion(_) => {}
            }
        }
        Verdict { allowed: false, denied: false, reason: reasons.join("\n") }
    }

    /// `Ok` if some authorizer allows the request before any denies it.
    pub fn authorize(&self, attrs: &RequestAttributes) -> Result<(), ApiError> {
        let verdict = self.decide(attrs);
        if verdict.allowed {
            Ok(())
        } else {
            Err(forbidden(attrs, &verdict.reason))
        }
    }

    pub fn allows(&self, attrs: &RequestAttributes) -> bool {
        self.decide(attrs).allowed
    }

    /// The union of what each authorizer can list, and whether that is all
    /// (SelfSubjectRulesReview's `incomplete`).
    pub fn rules_for(&self, user: &User, namespace: &str) -> (Vec<Rule>, Vec<String>, bool) {
        let (mut rules, mut errors, mut incomplete) = (Vec::new(), Vec::new(), false);
        for authorizer in &self.0 {
            match authorizer.rules_for(user, namespace) {
                Some((r, e)) => {
                    rules.extend(r);
                    errors.extend(e);
                }
                None => incomplete = true,
            }
        }
        (rules, errors, incomplete)
    }
}

/// Members of `system:masters` may do everything, whatever else is configured: the
/// group of the admin certificate and of the API server's own privileged clients.
#[derive(Debug)]
pub struct PrivilegedGroups;

pub const PRIVILEGED_GROUP: &str = "system:masters";

impl Authorizer for PrivilegedGroups {
    fn authorize(&self, attrs: &RequestAttributes) -> Decision {
        if attrs.user.groups.iter().any(|g| g == PRIVILEGED_GROUP) {
            Decision::Allow(String::new())
        } else {
            Decision::NoOpinion(String::new())
        }
    }

    fn rules_for(&self, user: &User, _namespace: &str) -> Option<(Vec<Rule>, Vec<String>)> {
        if !user.groups.iter().any(|g| g == PRIVILEGED_GROUP) {
            return Some((vec![], vec![]));
        }
        Some((Rule::full_authority(), vec![]))
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
            Decision::Allow(String::new())
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
            Decision::Allow(String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{authenticated, request};
    use http::Method;

    #[test]
    fn messages_are_upstreams() {
        let err = forbidden(&request(&authenticated("x"), Method::DELETE, "/api/v1/namespaces/y/pods/p"), "");
        assert_eq!(err.code, 403);
        assert_eq!(err.reason, "Forbidden");
        assert_eq!(
            err.message,
            r#"pods "p" is forbidden: User "x" cannot delete resource "pods" in API group "" in the namespace "y""#
        );
        assert_eq!(err.details, Some(json!({"name": "p", "kind": "pods"})));
        let err = forbidden(
            &request(&authenticated("x"), Method::GET, "/apis/apps/v1/deployments"),
            "no RBAC policy matched",
        );
        assert_eq!(
            err.message,
            r#"deployments.apps is forbidden: User "x" cannot list resource "deployments" in API group "apps" at the cluster scope: no RBAC policy matched"#
        );
        let err =
            forbidden(&request(&authenticated("x"), Method::PUT, "/apis/apps/v1/namespaces/y/deployments/d/scale"), "");
        assert!(
            err.message.contains(r#"cannot update resource "deployments/scale" in API group "apps""#),
            "{}",
            err.message
        );
        let err = forbidden(&request(&authenticated("system:anonymous"), Method::GET, "/metrics"), "");
        assert_eq!(err.message, r#"forbidden: User "system:anonymous" cannot get path "/metrics""#);
    }

    #[test]
    fn anonymous_users_read_only_public_information() {
        let chain = Chain::of(&[Mode::AlwaysAllow], None, None);
        let anonymous = |method, path: &str| request(&User::anonymous(), method, path);
        for path in ["/healthz", "/livez", "/readyz/etcd", "/version"] {
            assert_eq!(chain.authorize(&anonymous(Method::GET, path)), Ok(()), "{path}");
        }
        for path in ["/api/v1/pods", "/apis", "/metrics", "/healthzz", "/openapi/v2"] {
            assert_eq!(chain.authorize(&anonymous(Method::GET, path)).unwrap_err().code, 403, "{path}");
        }
        assert_eq!(
            chain.authorize(&request(&authenticated("x"), Method::DELETE, "/api/v1/namespaces/y/pods/p")),
            Ok(())
        );
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
        let authorization = vec![Mode::Custom(Arc::new(DenyVerb("delete"))), Mode::AlwaysAllow];
        let api = crate::testing::TestApi::start(crate::Settings { authorization, ..Default::default() }).await;
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
        let req = request(&authenticated("x"), Method::GET, "/api/v1/pods");
        let deny_first =
            Chain(vec![Arc::new(Says(Decision::Deny("no".into()))), Arc::new(Says(Decision::Allow(String::new())))]);
        assert!(deny_first.authorize(&req).unwrap_err().message.ends_with("at the cluster scope: no"));
        let undecided = Chain(vec![
            Arc::new(Says(Decision::NoOpinion("first".into()))),
            Arc::new(Says(Decision::NoOpinion("second".into()))),
        ]);
        assert!(undecided.authorize(&req).unwrap_err().message.ends_with(": first\nsecond"));
        let allow_later = Chain(vec![
            Arc::new(Says(Decision::NoOpinion(String::new()))),
            Arc::new(Says(Decision::Allow(String::new()))),
        ]);
        assert_eq!(allow_later.authorize(&req), Ok(()));
    }
}

//! What a request asks, parsed once at the front door: who asks (the authenticated user)
//! and what for (verb, API group/version, resource, subresource, namespace, name), as
//! upstream's `RequestInfo` plus `user.Info`. Authorization reads it first; the REST
//! verbs dispatch on its typed verb; admission and storage hooks get it next.

use http::Method;

use crate::auth::User;
use crate::http::route::Route;
use crate::http::Query;

/// The verb of a request, as authorization sees it. Resource requests have the API
/// verbs; other paths (discovery, `/healthz`, `/metrics`) the lowercased HTTP method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
    /// A non-resource request's (or an unusual) HTTP method, lowercased.
    Other(String),
}

impl Verb {
    /// A verb by name (SubjectAccessReviews, `bind`, `escalate`, `impersonate`).
    pub fn parse(verb: &str) -> Self {
        match verb {
            "get" => Verb::Get,
            "list" => Verb::List,
            "watch" => Verb::Watch,
            "create" => Verb::Create,
            "update" => Verb::Update,
            "patch" => Verb::Patch,
            "delete" => Verb::Delete,
            "deletecollection" => Verb::DeleteCollection,
            other => Verb::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
            Verb::Other(method) => method,
        }
    }

    /// Upstream's mapping of a resource request's method (and whether it names an
    /// object, and asks to watch) to an API verb.
    fn of_resource_request(method: &Method, named: bool, watch: bool) -> Self {
        match (method.as_str(), named) {
            ("GET" | "HEAD", false) if watch => Verb::Watch,
            ("GET" | "HEAD", true) => Verb::Get,
            ("GET" | "HEAD", false) => Verb::List,
            ("POST", _) => Verb::Create,
            ("PUT", _) => Verb::Update,
            ("PATCH", _) => Verb::Patch,
            ("DELETE", true) => Verb::Delete,
            ("DELETE", false) => Verb::DeleteCollection,
            (other, _) => Verb::Other(other.to_ascii_lowercase()),
        }
    }
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the later stages need to know about who asks for what.
#[derive(Clone, Debug)]
pub struct RequestAttributes {
    pub user: User,
    pub verb: Verb,
    /// Whether the path names an API resource (`/api/v1/...`, `/apis/g/v/...` below a
    /// group version) rather than discovery, OpenAPI, health or metrics.
    pub is_resource_request: bool,
    pub path: String,
    pub api_group: String,
    pub api_version: String,
    /// The resource's plural name (`pods`).
    pub resource: String,
    pub subresource: String,
    /// The namespace the request is in; for a namespace itself, its own name (as
    /// upstream, so that namespaced permissions can cover their namespace).
    pub namespace: String,
    pub name: String,
    /// The request's `fieldSelector` (the node authorizer lets nodes list their own pods).
    pub field_selector: String,
    /// The client's address, where the request came over the network.
    pub source: Option<std::net::IpAddr>,
    /// Warnings for the client (`Warning` headers), from any stage (admission plugins).
    warnings: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Annotations for the request's audit event, from any stage (PodSecurity's
    /// `pod-security.kubernetes.io/audit-violations`).
    audit_annotations: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl RequestAttributes {
    pub fn new(user: User, method: &Method, path: &str, route: &Route, query: &Query) -> Self {
        let mut attrs = Self {
            user,
            verb: Verb::Other(method.as_str().to_ascii_lowercase()),
            is_resource_request: false,
            path: path.to_string(),
            api_group: String::new(),
            api_version: String::new(),
            resource: String::new(),
            subresource: String::new(),
            namespace: String::new(),
            name: String::new(),
            field_selector: query.get("fieldSelector").cloned().unwrap_or_default(),
            source: None,
            warnings: Default::default(),
            audit_annotations: Default::default(),
        };
        if let Route::Resource(r) = route {
            let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
            attrs.is_resource_request = true;
            attrs.verb = Verb::of_resource_request(method, r.name.is_some(), watch);
            attrs.api_group.clone_from(&r.group);
            attrs.api_version.clone_from(&r.version);
            attrs.resource.clone_from(&r.resource);
            attrs.subresource = r.subresource.clone().unwrap_or_default();
            attrs.name = r.name.clone().unwrap_or_default();
            // A list or watch of one object by name is about that object (resourceNames).
            if matches!(attrs.verb, Verb::List | Verb::Watch) {
                attrs.name = exact_name(query.get("fieldSelector").map(String::as_str).unwrap_or_default());
            }
            use k8s_openapi::{api::core::v1::Namespace, Resource};
            let is_namespace = r.group == Namespace::GROUP && r.resource == Namespace::URL_PATH_SEGMENT;
            attrs.namespace = match (&r.namespace, is_namespace) {
                (Some(ns), _) => ns.clone(),
                (None, true) => attrs.name.clone(),
                (None, false) => String::new(),
            };
        }
        attrs
    }

    /// A resource request that no HTTP request made (access reviews, `bind` and
    /// `escalate` checks, impersonation).
    pub fn resource(
        user: User,
        verb: Verb,
        group: &str,
        resource: &str,
        subresource: &str,
        namespace: &str,
        name: &str,
    ) -> Self {
        Self {
            user,
            verb,
            is_resource_request: true,
            path: String::new(),
            api_group: group.to_string(),
            api_version: "*".to_string(),
            resource: resource.to_string(),
            subresource: subresource.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            field_selector: String::new(),
            source: None,
            warnings: Default::default(),
            audit_annotations: Default::default(),
        }
    }

    /// A non-resource request that no HTTP request made (access reviews).
    pub fn non_resource(user: User, verb: &str, path: &str) -> Self {
        let mut attrs = Self::resource(user, Verb::parse(verb), "", "", "", "", "");
        attrs.is_resource_request = false;
        attrs.api_version.clear();
        attrs.path = path.to_string();
        attrs
    }

    /// Adds a warning for the client, once.
    pub fn warn(&self, text: String) {
        let mut warnings = self.warnings.lock().expect("warnings lock");
        if !warnings.contains(&text) {
            warnings.push(text);
        }
    }

    /// The warnings added so far, taken.
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock().expect("warnings lock"))
    }

    /// Adds (or replaces) an annotation of the request's audit event.
    pub fn annotate(&self, key: &str, value: String) {
        let mut annotations = self.audit_annotations.lock().expect("audit annotations lock");
        annotations.retain(|(k, _)| k != key);
        annotations.push((key.to_string(), value));
    }

    /// The audit annotations added so far.
    pub fn audit_annotations(&self) -> Vec<(String, String)> {
        self.audit_annotations.lock().expect("audit annotations lock").clone()
    }

    /// The field selector requires `field` to equal `value`.
    pub fn field_selector_pins(&self, field: &str, value: &str) -> bool {
        self.field_selector.split(',').any(|term| {
            term.strip_prefix(field)
                .and_then(|rest| rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')))
                .is_some_and(|v| v == value)
        })
    }

    /// `resource/subresource`, as authorization names what is asked for.
    pub fn resource_and_subresource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// The name a field selector pins down (`metadata.name=x`), if it does.
fn exact_name(selector: &str) -> String {
    selector
        .split(',')
        .find_map(|term| term.strip_prefix("metadata.name==").or_else(|| term.strip_prefix("metadata.name=")))
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(method: Method, path_and_query: &str) -> RequestAttributes {
        crate::testing::request(&User::anonymous(), method, path_and_query)
    }

    #[test]
    fn verbs_follow_upstream() {
        let cases = [
            (Method::GET, "/api/v1/namespaces/a/pods", "list"),
            (Method::GET, "/api/v1/namespaces/a/pods?watch=true", "watch"),
            (Method::GET, "/api/v1/namespaces/a/pods/p", "get"),
            (Method::POST, "/api/v1/namespaces/a/pods", "create"),
            (Method::POST, "/api/v1/namespaces/a/pods/p/eviction", "create"),
            (Method::PUT, "/apis/apps/v1/namespaces/a/deployments/d/scale", "update"),
            (Method::PATCH, "/api/v1/nodes/n/status", "patch"),
            (Method::DELETE, "/api/v1/namespaces/a/pods/p", "delete"),
            (Method::DELETE, "/api/v1/namespaces/a/pods", "deletecollection"),
            (Method::GET, "/apis", "get"),
            (Method::POST, "/healthz", "post"),
        ];
        for (method, path, verb) in cases {
            assert_eq!(attrs(method.clone(), path).verb.as_str(), verb, "{method} {path}");
        }
    }

    #[test]
    fn resource_requests_name_their_parts() {
        let a = attrs(Method::PUT, "/apis/apps/v1/namespaces/a/deployments/d/scale");
        assert!(a.is_resource_request);
        assert_eq!((a.api_group.as_str(), a.api_version.as_str()), ("apps", "v1"));
        assert_eq!((a.namespace.as_str(), a.name.as_str()), ("a", "d"));
        assert_eq!(a.resource_and_subresource(), "deployments/scale");
        let ns = attrs(Method::DELETE, "/api/v1/namespaces/kube-system");
        assert_eq!(
            (ns.resource.as_str(), ns.namespace.as_str(), ns.name.as_str()),
            ("namespaces", "kube-system", "kube-system")
        );
        let one = attrs(Method::GET, "/api/v1/namespaces/a/pods?watch=1&fieldSelector=metadata.name%3Dp");
        assert_eq!((one.verb.as_str(), one.name.as_str()), ("watch", "p"));
        let discovery = attrs(Method::GET, "/apis/apps/v1");
        assert!(!discovery.is_resource_request);
        assert_eq!(discovery.path, "/apis/apps/v1");
    }
}

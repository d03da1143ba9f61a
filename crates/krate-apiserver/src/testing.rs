//! Unit-test helpers: an API server on a SQLite store in a temporary directory, called
//! through `http::handle` as a given user (no TCP, no TLS).

use std::sync::Arc;

use axum::body::Body;
use http::Method;
use http_body_util::BodyExt;
use serde_json::Value;

use crate::auth::User;
use crate::{ApiServer, Settings};

/// A user in `system:authenticated`, as a client certificate would give.
pub fn authenticated(name: &str) -> User {
    User { name: name.into(), groups: vec!["system:authenticated".into()], ..Default::default() }
}

/// What a request of `user` to `path_and_query` asks, as the front door parses it.
pub fn request(user: &User, method: Method, path_and_query: &str) -> crate::request::RequestAttributes {
    use crate::http::route::{parse_path, parse_query};
    let (path, query) = path_and_query.split_once('?').map_or((path_and_query, None), |(p, q)| (p, Some(q)));
    crate::request::RequestAttributes::new(user.clone(), &method, path, &parse_path(path), &parse_query(query))
}

pub struct TestApi {
    pub server: Arc<ApiServer>,
    _dir: tempfile::TempDir,
}

impl TestApi {
    pub async fn start(settings: Settings) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(krate_store::sqlite::SqliteStore::open(dir.path().join("state.db")).unwrap());
        let server = ApiServer::start(store, settings).await.unwrap();
        Self { server, _dir: dir }
    }

    /// Sends a JSON request as user `user` (authenticated); the status and parsed body.
    pub async fn call(&self, user: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.send(user, method, path, "application/json", body).await
    }

    /// A PATCH of the given patch type.
    pub async fn call_patch(&self, user: &str, path: &str, content_type: &str, patch: Value) -> (u16, Value) {
        self.send(user, Method::PATCH, path, content_type, Some(patch)).await
    }

    async fn send(
        &self,
        user: &str,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let user = User { name: user.into(), groups: vec!["system:authenticated".into()], ..Default::default() };
        let body = body.map(|b| Body::from(serde_json::to_vec(&b).unwrap())).unwrap_or_else(Body::empty);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(body)
            .unwrap();
        let resp = crate::http::handle(self.server.clone(), user, req).await;
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

//! ServiceAccounts: `serviceaccounts/token` (TokenRequest) and the tokens themselves
//! (`tokens.rs`: issuing, and bearer-token authentication).

use axum::body::Body;
use http::Response;
use krate_api::ApiResult;

use super::{Call, Handler};
use crate::http::{content_type, json_response, parse_body, read_body};

pub mod tokens;

/// `POST serviceaccounts/{name}/token`: issues a token, stores nothing.
pub struct Token;

#[async_trait::async_trait]
impl Handler for Token {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>> {
        let (headers, body) = read_body(call.req).await?;
        let request = parse_body(&content_type(&headers), &body)?;
        let namespace = call.scope.namespace.as_deref().unwrap_or_default();
        let issued = call.server.request_token(namespace, call.name, &request).await?;
        Ok(json_response(201, &issued))
    }
}

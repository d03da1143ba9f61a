//! Namespaces: `namespaces/{name}/finalize`, the update that changes only
//! `spec.finalizers` (what the namespace controller uses to let a namespace go).

use axum::body::Body;
use http::Response;
use krate_api::ApiResult;

use super::{Call, Handler};
use crate::http::{decode_object_body, read_body, write_options, written_response};
use crate::registry::Subresource;

pub struct Finalize;

#[async_trait::async_trait]
impl Handler for Finalize {
    async fn serve(&self, call: Call<'_>) -> ApiResult<Response<Body>> {
        let (headers, body) = read_body(call.req).await?;
        let opts = write_options(call.attrs, call.query, &headers, false)?;
        let (obj, warnings) = decode_object_body(&call.scope.kind, &headers, &body, &opts)?;
        let mut written = call.server.storage.update(&call.scope, call.name, Subresource::Finalize, obj, &opts).await?;
        written.warnings.extend(warnings);
        Ok(written_response(written, &call.format, &call.scope.kind))
    }
}

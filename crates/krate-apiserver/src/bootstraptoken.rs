//! The bootstrap token authenticator, as upstream's: a bearer token of the form
//! `ID.SECRET` is the user `system:bootstrap:ID` in `system:bootstrappers` (and the
//! token's extra groups) while its Secret `kube-system/bootstrap-token-ID` exists, is not
//! being deleted, has not expired, carries the same secret and allows authentication.
//! Joining nodes use it for discovery's second step and for their first CSR; RBAC then
//! decides what the token may do (by default: create CSRs, which are approved
//! automatically for node client certificates).

use k8s_openapi::api::core::v1 as core;
use krate_api::{ApiError, ApiResult};
use krate_client::bootstrap::{self, Token, TokenSecret};

use crate::auth::User;
use crate::ApiServer;

impl ApiServer {
    /// The user of a bootstrap token; 401 for any token that does not hold.
    pub async fn authenticate_bootstrap_token(&self, token: &Token) -> ApiResult<User> {
        let scope = self.storage.builtin::<core::Secret>(Some(bootstrap::SECRET_NAMESPACE.to_string()));
        let lookup = || self.storage.cached(&scope, &token.secret_name()).ok().map(|c| c.parse());
        // A token created a moment ago may not be in the cache yet.
        let secret = match lookup() {
            Some(secret) => Some(secret),
            None => {
                self.storage.cache.sync().await;
                lookup()
            }
        };
        let refuse = |why: &str| {
            tracing::debug!(token_id = %token.id, reason = why, "bootstrap token refused");
            Err(ApiError::unauthorized())
        };
        let Some(secret) = secret else { return refuse("no such token") };
        if !secret["metadata"]["deletionTimestamp"].is_null() {
            return refuse("its Secret is being deleted");
        }
        let Some(stored) = TokenSecret::from_secret(&secret) else { return refuse("its Secret is malformed") };
        if !bootstrap::constant_time_eq(stored.token.secret.as_bytes(), token.secret.as_bytes()) {
            return refuse("wrong secret");
        }
        if stored.expired(jiff::Timestamp::now()) {
            return refuse("expired");
        }
        if !stored.has_usage("authentication") {
            return refuse("not usable for authentication");
        }
        let mut groups = vec![bootstrap::GROUP.to_string()];
        for group in &stored.extra_groups {
            if !TokenSecret::valid_group(group) {
                return refuse("an extra group outside system:bootstrappers");
            }
            if !groups.contains(group) {
                groups.push(group.clone());
            }
        }
        groups.push("system:authenticated".into());
        Ok(User { name: token.user(), groups, uid: String::new(), extra: Default::default() })
    }
}

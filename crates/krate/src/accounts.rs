//! Service-account credentials for the stand-alone controller manager, as upstream's
//! `--use-service-account-credentials`: each controller acts as
//! `system:serviceaccount:kube-system:<controller>` with a token the manager requests for
//! it (TokenRequest, one hour, renewed at 80% of its lifetime), creating the account
//! first when it is missing. Lists and watches still go as the manager's own user, as
//! upstream's shared informers do (and as `krate server`'s in-process controllers do),
//! so a controller's role bounds what it may change, not what it may see.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use http::HeaderValue;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// How long each controller's token lasts (upstream's client builder asks for an hour).
const TOKEN_SECONDS: i64 = 3600;

/// The clients of the controllers' service accounts, over one connection pool.
pub struct AccountClients {
    /// The manager's own client: requests tokens, lists and watches.
    manager: kube::Client,
    /// A client of the same server without credentials; requests carry a token.
    anonymous: kube::Client,
    /// Each account's current `Bearer` header, kept fresh by a task of its own.
    tokens: Mutex<HashMap<String, watch::Receiver<Option<HeaderValue>>>>,
}

impl AccountClients {
    /// Clients for the server and CA of `kubeconfig`, whose user requests the tokens.
    pub async fn new(kubeconfig: &std::path::Path) -> Result<Self> {
        let manager = crate::components::kube_client(kubeconfig).await?;
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
        let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        // A client certificate would win over the token (upstream authenticates x509
        // first), so the accounts' connections present none.
        config.auth_info = Default::default();
        let anonymous = kube::Client::try_from(config).context("building the controllers' client")?;
        Ok(Self { manager, anonymous, tokens: Mutex::default() })
    }

    pub fn manager(&self) -> kube::Client {
        self.manager.clone()
    }

    /// The client of `account` (in kube-system); its token is requested in the
    /// background, and requests wait for the first one.
    pub fn client(&self, account: &str) -> kube::Client {
        let token = self
            .tokens
            .lock()
            .expect("token map lock")
            .entry(account.to_string())
            .or_insert_with(|| {
                let (tx, rx) = watch::channel(None);
                tokio::spawn(keep_token(self.manager.clone(), account.to_string(), tx));
                rx
            })
            .clone();
        let service = AccountService { manager: self.manager.clone(), anonymous: self.anonymous.clone(), token };
        kube::Client::new(service, "default")
    }
}

/// Requests `account`'s token, and a new one at 80% of each one's lifetime, for ever.
async fn keep_token(manager: kube::Client, account: String, tx: watch::Sender<Option<HeaderValue>>) {
    loop {
        match request_token(&manager, &account).await {
            Ok((header, lifetime)) => {
                tx.send_replace(Some(header));
                tracing::debug!(%account, seconds = lifetime.as_secs(), "controller token issued");
                tokio::time::sleep(lifetime.mul_f64(0.8)).await;
            }
            Err(e) => {
                tracing::warn!(%account, error = %format!("{e:#}"), "requesting the controller's token failed; trying again in 10 s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}

/// A token for `kube-system/<account>`, creating the account when it is missing.
async fn request_token(manager: &kube::Client, account: &str) -> Result<(HeaderValue, Duration)> {
    let accounts: Api<ServiceAccount> = Api::namespaced(manager.clone(), "kube-system");
    if accounts.get_opt(account).await?.is_none() {
        let new = ServiceAccount {
            metadata: ObjectMeta { name: Some(account.to_string()), ..Default::default() },
            ..Default::default()
        };
        match accounts.create(&PostParams::default(), &new).await {
            Ok(_) => tracing::info!(%account, "created the controller's service account"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).context("creating the service account"),
        }
    }
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(TOKEN_SECONDS), ..Default::default() }),
        ..Default::default()
    };
    let issued = accounts.create_token_request(account, &PostParams::default(), &request).await?;
    let status = issued.status.context("the TokenRequest came back without a status")?;
    let (Some(token), Some(expires)) = (status.token, status.expiration_timestamp) else {
        anyhow::bail!("the TokenRequest came back without a token or its expiry");
    };
    let lifetime = expires.0.duration_since(jiff::Timestamp::now()).as_secs_f64();
    let header = HeaderValue::from_str(&format!("Bearer {token}")).context("the token is not a header")?;
    Ok((header, Duration::from_secs_f64(lifetime.clamp(60.0, TOKEN_SECONDS as f64))))
}

/// Sends a controller's writes (and single reads) with its token, its lists and watches
/// as the manager.
#[derive(Clone)]
struct AccountService {
    manager: kube::Client,
    anonymous: kube::Client,
    token: watch::Receiver<Option<HeaderValue>>,
}

impl tower::Service<http::Request<kube::client::Body>> for AccountService {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, kube::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), kube::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<kube::client::Body>) -> Self::Future {
        if krate_apiserver::reads_collection(&req) {
            let manager = self.manager.clone();
            return Box::pin(async move { manager.send(req).await });
        }
        let (anonymous, mut token) = (self.anonymous.clone(), self.token.clone());
        Box::pin(async move {
            let header = token
                .wait_for(Option::is_some)
                .await
                .map_err(|e| kube::Error::Service(Box::new(e)))?
                .clone()
                .expect("waited for a token");
            req.headers_mut().insert(http::header::AUTHORIZATION, header);
            anonymous.send(req).await
        })
    }
}

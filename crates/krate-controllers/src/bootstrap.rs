//! The bootstrap token controllers, as upstream's: the **bootstrap signer** keeps
//! `kube-public/cluster-info` signed with every token usable for signing (a detached JWS
//! per token, `jws-kubeconfig-<id>`; stale ones removed), and the **token cleaner**
//! deletes token Secrets once they expire. Both follow the token Secrets with one watch
//! each and act again when the next token expires.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use krate_client::bootstrap::{self, TokenSecret};
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::watcher;

/// What a watch says, reduced to "something changed" (the initial listing's events
/// count once, at its end).
fn changes<K>(api: Api<K>, config: watcher::Config) -> Changes
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, config)
        .filter_map(|event| async move {
            match event {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
                Ok(_) => Some(Ok(())),
                Err(e) => Some(Err(e)),
            }
        })
        .boxed()
}

type Changes = futures::stream::BoxStream<'static, Result<(), watcher::Error>>;

fn conflict(e: &anyhow::Error) -> bool {
    e.downcast_ref::<kube::Error>().is_some_and(|e| matches!(e, kube::Error::Api(a) if a.code == 409))
}

/// Calls `act` after every change of `events` and, at the latest, when `act` says to
/// look again. One loop for all the watches a controller follows, so that its writes
/// never race each other.
async fn on_changes<F, Fut>(mut events: Changes, mut act: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<Duration>>>,
{
    let mut again = Duration::from_secs(3600);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "bootstrap token watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                None => anyhow::bail!("the watch ended"),
            },
            _ = tokio::time::sleep(again) => {}
        }
        again = match act().await {
            Ok(next) => next.unwrap_or(Duration::from_secs(3600)).max(Duration::from_millis(100)),
            // Someone else wrote first (the server publishing cluster-info): look again.
            Err(e) if conflict(&e) => Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "bootstrap token controller");
                Duration::from_secs(5)
            }
        };
    }
}

fn token_watch() -> watcher::Config {
    watcher::Config::default().fields(&format!("type={}", bootstrap::SECRET_TYPE))
}

async fn tokens(secrets: &Api<Secret>) -> anyhow::Result<Vec<(Secret, TokenSecret)>> {
    let list = secrets.list(&ListParams::default().fields(&format!("type={}", bootstrap::SECRET_TYPE))).await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|s| {
            let parsed = TokenSecret::from_secret(&serde_json::to_value(&s).ok()?)?;
            Some((s, parsed))
        })
        .collect())
}

/// How long until the first of these tokens expires.
fn next_expiry<'a>(tokens: impl Iterator<Item = &'a TokenSecret>, now: jiff::Timestamp) -> Option<Duration> {
    tokens
        .filter_map(|t| t.expiration)
        .filter(|e| *e > now)
        .min()
        .map(|e| Duration::try_from(e.duration_since(now)).unwrap_or_default() + Duration::from_millis(50))
}

/// The `jws-kubeconfig-*` entries `cluster-info` should have for these tokens.
pub fn signatures(kubeconfig: &str, tokens: &[TokenSecret], now: jiff::Timestamp) -> BTreeMap<String, String> {
    tokens
        .iter()
        .filter(|t| t.has_usage("signing") && !t.expired(now))
        .map(|t| (format!("{}{}", bootstrap::JWS_PREFIX, t.token.id), bootstrap::sign_detached(kubeconfig, &t.token)))
        .collect()
}

pub async fn run_signer(client: kube::Client) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), bootstrap::SECRET_NAMESPACE);
    let maps: Api<ConfigMap> = Api::namespaced(client, bootstrap::CLUSTER_INFO_NAMESPACE);
    let sign = || async {
        let Some(mut info) = maps.get_opt(bootstrap::CLUSTER_INFO).await? else { return Ok(None) };
        let data = info.data.get_or_insert_with(Default::default);
        let Some(kubeconfig) = data.get(bootstrap::KUBECONFIG_KEY).cloned() else { return Ok(None) };
        let now = jiff::Timestamp::now();
        let tokens: Vec<TokenSecret> = tokens(&secrets).await?.into_iter().map(|(_, t)| t).collect();
        let wanted = signatures(&kubeconfig, &tokens, now);
        let current: BTreeMap<String, String> = data
            .iter()
            .filter(|(k, _)| k.starts_with(bootstrap::JWS_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if current != wanted {
            data.retain(|k, _| !k.starts_with(bootstrap::JWS_PREFIX));
            data.extend(wanted);
            maps.replace(bootstrap::CLUSTER_INFO, &PostParams::default(), &info).await?;
        }
        Ok(next_expiry(tokens.iter(), now))
    };
    // The ConfigMap's own changes matter too (a new kubeconfig must be signed again).
    let info = watcher::Config::default().fields(&format!("metadata.name={}", bootstrap::CLUSTER_INFO));
    let events = futures::stream::select(changes(secrets.clone(), token_watch()), changes(maps.clone(), info)).boxed();
    on_changes(events, sign).await
}

pub async fn run_cleaner(client: kube::Client) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client, bootstrap::SECRET_NAMESPACE);
    on_changes(changes(secrets.clone(), token_watch()), || async {
        let now = jiff::Timestamp::now();
        let mut live = Vec::new();
        for (secret, token) in tokens(&secrets).await? {
            if !token.expired(now) {
                live.push(token);
                continue;
            }
            let name = secret.metadata.name.clone().unwrap_or_default();
            let params = DeleteParams {
                preconditions: Some(Preconditions { uid: secret.metadata.uid.clone(), resource_version: None }),
                ..Default::default()
            };
            match secrets.delete(&name, &params).await {
                Ok(_) => tracing::info!(secret = %name, "deleted an expired bootstrap token"),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(next_expiry(live.iter(), now))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str, usages: &[&str], expires: Option<&str>) -> TokenSecret {
        TokenSecret {
            token: format!("{id}.0123456789abcdef").parse().unwrap(),
            description: None,
            expiration: expires.map(|e| e.parse().unwrap()),
            usages: usages.iter().map(|u| u.to_string()).collect(),
            extra_groups: vec![],
        }
    }

    #[test]
    fn only_live_signing_tokens_sign_cluster_info() {
        let now: jiff::Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let tokens = [
            token("aaaaaa", &["signing", "authentication"], None),
            token("bbbbbb", &["authentication"], None),
            token("cccccc", &["signing"], Some("2029-12-31T23:59:59Z")),
            token("dddddd", &["signing"], Some("2030-01-01T00:10:00Z")),
        ];
        let signed = signatures("kubeconfig", &tokens, now);
        assert_eq!(signed.keys().collect::<Vec<_>>(), ["jws-kubeconfig-aaaaaa", "jws-kubeconfig-dddddd"]);
        assert!(bootstrap::verify_detached("kubeconfig", &signed["jws-kubeconfig-aaaaaa"], &tokens[0].token));
        assert_eq!(next_expiry(tokens.iter(), now), Some(Duration::from_secs(600) + Duration::from_millis(50)));
    }
}

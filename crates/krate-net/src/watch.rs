//! One kind's watch as the node's networking follows it: kube-rs watcher events with a
//! relist (`Init` … `InitDone`) gathered into one `Relisted` that replaces what was known,
//! failures logged and retried with backoff. The catalog, the routes and NetworkPolicy
//! all follow their kinds this way.

use futures::{Stream, StreamExt};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;

/// What changed of one kind.
pub enum Change<K> {
    Apply(K),
    Delete(K),
    /// Everything there is, after a (re)list: what is not here is gone.
    Relisted(Vec<K>),
}

/// The changes of `api`'s objects, for ever (`what` names the kind in logs).
pub fn changes<K>(api: Api<K>, what: &'static str) -> impl Stream<Item = Change<K>> + Send
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .scan(Vec::new(), move |listing, event| {
            let change = match event {
                Ok(Event::Apply(o)) => Some(Change::Apply(o)),
                Ok(Event::Delete(o)) => Some(Change::Delete(o)),
                Ok(Event::Init) => {
                    listing.clear();
                    None
                }
                Ok(Event::InitApply(o)) => {
                    listing.push(o);
                    None
                }
                Ok(Event::InitDone) => Some(Change::Relisted(std::mem::take(listing))),
                Err(e) => {
                    tracing::warn!(error = %e, what, "a watch failed; retrying");
                    None
                }
            };
            futures::future::ready(Some(change))
        })
        .filter_map(futures::future::ready)
}

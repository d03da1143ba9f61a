//! Generated documents (aggregated discovery, OpenAPI) cached per set of served kinds
//! and of remote group/versions, with ETags so clients revalidate instead of refetching.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use krate_api::kinds::Registry;
use krate_api::ApiResult;
use serde_json::Value;

/// A rendered document and its entity tag.
#[derive(Clone)]
pub struct Document {
    pub body: Bytes,
    pub etag: String,
}

#[derive(Default)]
pub struct Documents {
    inner: Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    /// Generations of the registry and of the aggregator's remotes the entries were
    /// built from.
    identity: (u64, u64),
    entries: HashMap<String, Document>,
}

impl Documents {
    /// The document `key`, built by `build` unless cached for this registry and these
    /// remotes (`remotes`: the aggregator's generation).
    pub fn get(
        &self,
        kinds: &Arc<Registry>,
        remotes: u64,
        key: &str,
        build: impl FnOnce() -> ApiResult<Value>,
    ) -> ApiResult<Document> {
        let identity = (kinds.generation(), remotes);
        {
            let mut cached = self.inner.lock().expect("documents lock");
            if cached.identity != identity {
                cached.identity = identity;
                cached.entries.clear();
            }
            if let Some(doc) = cached.entries.get(key) {
                return Ok(doc.clone());
            }
        }
        let body = Bytes::from(serde_json::to_vec(&build()?).unwrap_or_default());
        let mut hasher = DefaultHasher::new();
        body.hash(&mut hasher);
        let doc = Document { etag: format!("{:016X}", hasher.finish()), body };
        let mut cached = self.inner.lock().expect("documents lock");
        if cached.identity == identity {
            cached.entries.insert(key.to_string(), doc.clone());
        }
        Ok(doc)
    }
}

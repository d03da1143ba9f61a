//! Revisioned key-value storage for krate.
//!
//! Every successful write gets the next value of one global, monotonic revision; that
//! revision is what the API exposes as `resourceVersion`. Updates and deletes are
//! compare-and-swap on a key's modification revision, lists can be taken at a past
//! revision (until it is compacted), and watches stream every change from a revision on.
//!
//! The [`Store`] trait is the only thing the API server sees. [`sqlite::SqliteStore`] is
//! the embedded backend of a single server; [`etcd::EtcdStore`] keeps the same contract on
//! an etcd cluster (revisions are etcd's, compare-and-swap is an etcd transaction), so
//! several API servers can share one history.

use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

#[cfg(test)]
mod contract;
pub mod etcd;
pub mod sqlite;

/// A position in the store's history. Revision 0 means "nothing written yet".
pub type Revision = i64;

/// One key's value at one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision at which the key was (last) created.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
}

/// A change to one key, as seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key was created or updated; `kv.create_revision == kv.mod_revision` on creation.
    Put(KeyValue),
    /// The key was deleted at `revision`; `prev` is its last value.
    Delete { revision: Revision, prev: KeyValue },
}

impl Event {
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { prev, .. } => &prev.key,
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("key {0:?} already exists")]
    AlreadyExists(String),
    #[error("key {0:?} not found")]
    NotFound(String),
    #[error("key {key:?} was modified: expected revision {expected}, found {actual}")]
    Conflict { key: String, expected: Revision, actual: Revision },
    #[error("revision {requested} has been compacted; the oldest available revision is {compacted}")]
    Compacted { requested: Revision, compacted: Revision },
    #[error("revision {requested} is newer than the current revision {current}")]
    FutureRevision { requested: Revision, current: Revision },
    #[error("storage backend failure: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A range read: every key starting with `prefix`, in key order.
#[derive(Clone, Debug, Default)]
pub struct ListRequest {
    pub prefix: String,
    /// Only keys `>= start_key` (used for pagination).
    pub start_key: Option<String>,
    /// At most this many items; `more` in the response tells whether some were left.
    pub limit: Option<usize>,
    /// Read as of this revision instead of the newest one.
    pub revision: Option<Revision>,
}

#[derive(Clone, Debug)]
pub struct ListResponse {
    pub items: Vec<KeyValue>,
    /// The revision the list is consistent at.
    pub revision: Revision,
    /// True when `limit` cut the list short.
    pub more: bool,
}

/// What a watch delivers at once: every change under its prefix up to `revision`, in
/// revision order. `events` may be empty: a progress notification, telling a follower
/// (the watch cache) that the store's history has been seen up to `revision` even though
/// nothing under the prefix changed (etcd moves its revision for writes elsewhere too).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchBatch {
    pub events: Vec<Event>,
    /// At least the revision of the last event.
    pub revision: Revision,
}

impl WatchBatch {
    pub fn new(events: Vec<Event>) -> Self {
        let revision = events.last().map_or(0, Event::revision);
        Self { events, revision }
    }
}

/// A stream of batches in revision order. An error ends the stream.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch>> + Send>>;

/// Revisioned key-value storage with compare-and-swap and watch.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    async fn list(&self, request: ListRequest) -> Result<ListResponse>;
    /// Creates `key`; fails with [`StoreError::AlreadyExists`] if it exists.
    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue>;
    /// Replaces `key` if its modification revision is still `expected_revision`.
    async fn update(&self, key: &str, value: Bytes, expected_revision: Revision) -> Result<KeyValue>;
    /// Deletes `key` (if `expected_revision` is given, only at that revision). Returns the
    /// deletion revision and the last value.
    async fn delete(&self, key: &str, expected_revision: Option<Revision>) -> Result<(Revision, KeyValue)>;
    /// Streams every change under `prefix` with revision `>= from_revision`.
    fn watch(&self, prefix: &str, from_revision: Revision) -> WatchStream;
    /// Forgets history before `revision`: lists and watches before it fail with
    /// [`StoreError::Compacted`] from then on.
    async fn compact(&self, revision: Revision) -> Result<()>;
    async fn current_revision(&self) -> Result<Revision>;
    async fn compacted_revision(&self) -> Result<Revision>;
}

/// The smallest string greater than every string starting with `prefix`.
pub fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            return String::from_utf8(bytes).expect("ASCII increment stays UTF-8");
        }
    }
    // Only reached for an empty (or all-0x7f) prefix: everything ASCII sorts before DEL+1.
    "\u{80}".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_bounds_the_range() {
        assert_eq!(prefix_end("/registry/pods/"), "/registry/pods0");
        assert!(*"/registry/pods/zzz" < *prefix_end("/registry/pods/"));
        assert!(*"/registry/podsx" > *prefix_end("/registry/pods/"));
        assert_eq!(prefix_end(""), "\u{80}");
    }
}

//! The etcd backend: the [`Store`] contract on an etcd v3 cluster, so several API servers
//! share one history and survive the loss of any one machine.
//!
//! The mapping is upstream's (`k8s.io/apiserver/pkg/storage/etcd3`): keys are stored as
//! they are (`/registry/...`), revisions are etcd's own, a create is a transaction on
//! `create_revision == 0`, an update or conditional delete one on `mod_revision`, lists
//! are ranges at a revision, and watches are etcd watches with the previous value of each
//! change. Compaction is coordinated as upstream's compactor does: every server proposes
//! one through a transaction on the version of `compact_rev_key`, so among several servers
//! with the same interval only one compacts each round, and the key's value records the
//! newest compacted revision for everyone.
//!
//! A cluster's revisions may be offset from etcd's by the number kept under
//! [`REVISION_OFFSET_KEY`] (written by `krate restore` and `krate datastore migrate`
//! while no server runs, read once at connect): a restored snapshot or a migrated store
//! then hands out resourceVersions past any the old cluster did, while etcd's own count
//! goes on where it was. Every revision is translated where it enters or leaves this file.
//!
//! Every request requires a leader (`require_leader`), so a member cut off from the
//! majority answers with an error instead of serving stale data or hanging.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KvClient, Txn, TxnOp,
    TxnOpResponse, WatchClient, WatchOptions,
};
use futures::StreamExt;

use crate::{
    prefix_end, Event, KeyValue, ListRequest, ListResponse, Result, Revision, Store, StoreError, WatchBatch,
    WatchStream,
};

/// The key whose value is the newest compacted revision and whose version orders
/// compaction rounds among servers (upstream's name).
pub const COMPACT_KEY: &str = "compact_rev_key";

/// The key holding how far this cluster's revisions are ahead of etcd's (absent: 0).
pub const REVISION_OFFSET_KEY: &str = "/krate/revision-offset";

/// How often an idle watch asks etcd how far it has seen, so a follower learns the
/// revision even while nothing under its prefix changes.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Where an etcd cluster is and how to reach it.
#[derive(Clone, Debug, Default)]
pub struct EtcdConfig {
    /// Client URLs (`https://10.0.0.1:2379`); requests are balanced over all of them.
    pub endpoints: Vec<String>,
    /// PEM of the CA that signed the members' serving certificates.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key, for members that require client certificates.
    pub client_cert_pem: Option<(Vec<u8>, Vec<u8>)>,
}

/// An etcd cluster's health, as `krate doctor` shows it.
#[derive(Clone, Debug)]
pub struct ClusterStatus {
    pub version: String,
    /// Bytes of the answering member's database file.
    pub db_size: i64,
    pub revision: Revision,
    /// Member ID of the leader (0: none).
    pub leader: u64,
    /// Keys under /registry/.
    pub objects: i64,
    pub members: Vec<MemberStatus>,
}

impl ClusterStatus {
    /// The client URLs of every member.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().flat_map(|m| m.client_urls.iter().cloned()).collect()
    }
}

#[derive(Clone, Debug)]
pub struct MemberStatus {
    pub id: u64,
    pub name: String,
    pub client_urls: Vec<String>,
    pub learner: bool,
}

/// The largest response the store accepts from etcd: gRPC's default of 4 MiB would fail a
/// list of a kind larger than that (10,000 ConfigMaps), and with it a server's start.
/// Upstream's etcd client accepts up to `math.MaxInt32` bytes too.
const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

pub struct EtcdStore {
    client: Client,
    /// Ranges and watches, whose responses may be large (see [`MAX_RESPONSE_BYTES`]).
    kv: KvClient,
    watcher: WatchClient,
    /// The cluster's revision minus etcd's ([`REVISION_OFFSET_KEY`]).
    offset: Revision,
    /// The version of [`COMPACT_KEY`] this server last saw (its compaction round).
    compact_version: AtomicI64,
}

fn backend(err: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("etcd: {err}"))
}

/// etcd's answer for a read at a revision it no longer or not yet has.
fn revision_error(err: etcd_client::Error, requested: Revision, compacted: Revision, current: Revision) -> StoreError {
    let text = err.to_string();
    if text.contains("required revision has been compacted") {
        StoreError::Compacted { requested, compacted }
    } else if text.contains("required revision is a future revision") {
        StoreError::FutureRevision { requested, current }
    } else {
        backend(text)
    }
}

/// The cluster's revision for etcd's `revision` (0, none, stays 0).
fn up(offset: Revision, revision: Revision) -> Revision {
    if revision > 0 {
        revision + offset
    } else {
        revision
    }
}

fn to_kv(offset: Revision, kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: up(offset, kv.create_revision()),
        mod_revision: up(offset, kv.mod_revision()),
    }
}

fn header_revision(offset: Revision, header: Option<&etcd_client::ResponseHeader>) -> Revision {
    up(offset, header.map_or(0, |h| h.revision()))
}

/// The key-values of the first Get among a transaction's else-branch responses.
fn txn_get(offset: Revision, responses: &[TxnOpResponse]) -> Vec<KeyValue> {
    responses
        .iter()
        .find_map(|r| match r {
            TxnOpResponse::Get(get) => Some(get.kvs().iter().map(|kv| to_kv(offset, kv)).collect()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The revision offset recorded in the cluster (0 when none is).
pub async fn revision_offset(client: &Client) -> Result<Revision> {
    let response = client.clone().get(REVISION_OFFSET_KEY, None).await.map_err(backend)?;
    let Some(kv) = response.kvs().first() else { return Ok(0) };
    let text = String::from_utf8_lossy(kv.value());
    text.trim().parse().map_err(|_| backend(format!("{REVISION_OFFSET_KEY} holds {text:?}, not a revision")))
}

/// Moves the cluster's revisions `by` further ahead of etcd's; returns the new offset.
/// Only while no server is connected: each reads the offset once, when it connects.
pub async fn advance_revision_offset(client: &Client, by: Revision) -> Result<Revision> {
    let offset = revision_offset(client).await? + by;
    client.clone().put(REVISION_OFFSET_KEY, offset.to_string(), None).await.map_err(backend)?;
    Ok(offset)
}

/// A client of the cluster at `config` (requests balanced over its endpoints, each
/// requiring a leader), not yet checked.
pub async fn connect_client(config: &EtcdConfig) -> Result<Client> {
    if config.endpoints.is_empty() {
        return Err(backend("no endpoints given"));
    }
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(15))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if config.ca_pem.is_some() || config.client_cert_pem.is_some() {
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &config.ca_pem {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &config.client_cert_pem {
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls);
    }
    Client::connect(&config.endpoints, Some(options)).await.map_err(backend)
}

/// Turns a failed compare of a write on `key` into the store's error, from the key's
/// current value read in the same transaction.
fn refused(key: &str, expected: Option<Revision>, current: Vec<KeyValue>) -> StoreError {
    match (current.first(), expected) {
        (None, _) => StoreError::NotFound(key.to_string()),
        (Some(kv), Some(expected)) => StoreError::Conflict { key: key.to_string(), expected, actual: kv.mod_revision },
        (Some(_), None) => StoreError::AlreadyExists(key.to_string()),
    }
}

impl EtcdStore {
    /// Connects to the cluster and checks that it answers.
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        let client = connect_client(config).await?;
        let offset = revision_offset(&client).await?;
        let kv = client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
        let watcher = client.watch_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
        Ok(Self { client, kv, watcher, offset, compact_version: AtomicI64::new(0) })
    }

    /// The store's revision as etcd's (0 or less: before this etcd's history).
    fn down(&self, revision: Revision) -> Revision {
        revision - self.offset
    }

    /// What the member answering says about itself and its cluster.
    pub async fn status(&self) -> Result<ClusterStatus> {
        let mut client = self.client.clone();
        let status = client.status().await.map_err(backend)?;
        let members = client.member_list().await.map_err(backend)?;
        let count = client
            .get("/registry/", Some(GetOptions::new().with_range(prefix_end("/registry/")).with_count_only()))
            .await
            .map_err(backend)?;
        Ok(ClusterStatus {
            version: status.version().to_string(),
            db_size: status.db_size(),
            revision: header_revision(self.offset, status.header()),
            leader: status.leader(),
            objects: count.count(),
            members: members
                .members()
                .iter()
                .map(|m| MemberStatus {
                    id: m.id(),
                    name: m.name().to_string(),
                    client_urls: m.client_urls().to_vec(),
                    learner: m.is_learner(),
                })
                .collect(),
        })
    }

    /// Streams a snapshot of the whole database (etcd's own `snapshot save`) into
    /// `out`; returns its size.
    pub async fn snapshot(&self, out: &mut (impl std::io::Write + Send)) -> Result<u64> {
        let mut stream = self.client.clone().snapshot().await.map_err(backend)?;
        let mut size = 0;
        while let Some(part) = stream.message().await.map_err(backend)? {
            out.write_all(part.blob()).map_err(backend)?;
            size += part.blob().len() as u64;
        }
        Ok(size)
    }

    /// The value and version of [`COMPACT_KEY`].
    async fn compact_state(&self) -> Result<(Revision, i64)> {
        let response = self.client.clone().get(COMPACT_KEY, None).await.map_err(backend)?;
        Ok(response
            .kvs()
            .first()
            .map_or((0, 0), |kv| (String::from_utf8_lossy(kv.value()).parse().unwrap_or(0), kv.version())))
    }

    /// Puts `key` if `compare` holds, reading it back in the same transaction (a put's
    /// answer has no create revision).
    async fn put_if(&self, key: &str, value: Bytes, compare: Compare, expected: Option<Revision>) -> Result<KeyValue> {
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, value.to_vec(), None), TxnOp::get(key, None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self.client.clone().txn(txn).await.map_err(backend)?;
        let current = txn_get(self.offset, &response.op_responses());
        if !response.succeeded() {
            return Err(refused(key, expected, current));
        }
        current.into_iter().next().ok_or_else(|| backend(format!("{key:?} was written but not read back")))
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let response = self.client.clone().get(key, None).await.map_err(backend)?;
        Ok(response.kvs().first().map(|kv| to_kv(self.offset, kv)))
    }

    async fn list(&self, request: ListRequest) -> Result<ListResponse> {
        let start = request.start_key.clone().unwrap_or_else(|| request.prefix.clone());
        let mut options = GetOptions::new().with_range(prefix_end(&request.prefix));
        if let Some(limit) = request.limit {
            options = options.with_limit(limit as i64);
        }
        if let Some(revision) = request.revision {
            if self.down(revision) < 1 {
                // Before this etcd's history: a revision of the cluster it was restored
                // or migrated from.
                let compacted = self.compacted_revision().await?.max(self.offset);
                return Err(StoreError::Compacted { requested: revision, compacted });
            }
            options = options.with_revision(self.down(revision));
        }
        let response = match self.kv.clone().get(start, Some(options)).await {
            Ok(response) => response,
            Err(err) => {
                let requested = request.revision.unwrap_or(0);
                let compacted = self.compacted_revision().await.unwrap_or(0);
                let current = self.current_revision().await.unwrap_or(0);
                return Err(revision_error(err, requested, compacted, current));
            }
        };
        Ok(ListResponse {
            items: response.kvs().iter().map(|kv| to_kv(self.offset, kv)).collect(),
            revision: request.revision.unwrap_or_else(|| header_revision(self.offset, response.header())),
            more: response.more(),
        })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        self.put_if(key, value, Compare::create_revision(key, CompareOp::Equal, 0), None).await
    }

    async fn update(&self, key: &str, value: Bytes, expected_revision: Revision) -> Result<KeyValue> {
        let compare = Compare::mod_revision(key, CompareOp::Equal, self.down(expected_revision));
        self.put_if(key, value, compare, Some(expected_revision)).await
    }

    async fn delete(&self, key: &str, expected_revision: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let compare = match expected_revision {
            Some(expected) => Compare::mod_revision(key, CompareOp::Equal, self.down(expected)),
            None => Compare::create_revision(key, CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key()))])
            .or_else([TxnOp::get(key, None)]);
        let response = self.client.clone().txn(txn).await.map_err(backend)?;
        let revision = header_revision(self.offset, response.header());
        let responses = response.op_responses();
        if !response.succeeded() {
            let current = txn_get(self.offset, &responses);
            return Err(match expected_revision {
                Some(_) => refused(key, expected_revision, current),
                None => StoreError::NotFound(key.to_string()),
            });
        }
        let prev = responses.iter().find_map(|r| match r {
            TxnOpResponse::Delete(deleted) => deleted.prev_kvs().first().map(|kv| to_kv(self.offset, kv)),
            _ => None,
        });
        // Only a concurrent delete between compare and delete could leave no previous
        // value, and a transaction excludes that.
        prev.map(|prev| (revision, prev)).ok_or_else(|| StoreError::NotFound(key.to_string()))
    }

    fn watch(&self, prefix: &str, from_revision: Revision) -> WatchStream {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<WatchBatch>>(16);
        let mut client = self.watcher.clone();
        let prefix = prefix.to_string();
        let offset = self.offset;
        // From before this etcd's history: its first revision, which compaction (at a
        // restore or migration) has made too old, so the watcher relists.
        let start = self.down(from_revision).max(1);
        tokio::spawn(async move {
            let options = WatchOptions::new()
                .with_range(prefix_end(&prefix))
                .with_start_revision(start)
                .with_prev_key()
                .with_progress_notify();
            let mut stream = match client.watch(prefix.as_str(), Some(options)).await {
                Ok(stream) => stream,
                Err(err) => {
                    let _ = tx.send(Err(backend(err))).await;
                    return;
                }
            };
            let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
            progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    _ = progress.tick() => {
                        if stream.request_progress().await.is_err() {
                            let _ = tx.send(Err(backend("the watch stream closed"))).await;
                            return;
                        }
                        continue;
                    }
                    _ = tx.closed() => return,
                };
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => {
                        let _ = tx.send(Err(backend("the watch stream ended"))).await;
                        return;
                    }
                    Err(err) => {
                        let _ = tx.send(Err(backend(err))).await;
                        return;
                    }
                };
                if response.compact_revision() > 0 {
                    let compacted = up(offset, response.compact_revision());
                    let _ = tx.send(Err(StoreError::Compacted { requested: from_revision, compacted })).await;
                    return;
                }
                if response.canceled() {
                    let _ = tx.send(Err(backend(format!("watch canceled: {}", response.cancel_reason())))).await;
                    return;
                }
                if response.created() && response.events().is_empty() {
                    continue;
                }
                let events: Vec<Event> = response
                    .events()
                    .iter()
                    .filter_map(|event| {
                        let kv = event.kv()?;
                        Some(match event.event_type() {
                            EventType::Put => Event::Put(to_kv(offset, kv)),
                            EventType::Delete => {
                                let prev = event.prev_kv().map(|kv| to_kv(offset, kv)).unwrap_or_else(|| KeyValue {
                                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                                    value: Bytes::new(),
                                    create_revision: 0,
                                    mod_revision: 0,
                                });
                                Event::Delete { revision: up(offset, kv.mod_revision()), prev }
                            }
                        })
                    })
                    .collect();
                let last = events.last().map_or(0, Event::revision);
                // A progress notification's header says how far the watch has seen; an
                // event batch's header may be ahead of its events (later writes
                // elsewhere), and the next batch may still hold events up to it.
                let revision = if events.is_empty() { header_revision(offset, response.header()) } else { last };
                if tx.send(Ok(WatchBatch { events, revision })).await.is_err() {
                    return;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).fuse())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let revision = self.down(revision);
        if revision < 1 {
            return Ok(());
        }
        // Propose this round: only the server whose view of the key's version is current
        // wins, the others learn the newer version and leave the round to it.
        let seen = self.compact_version.load(Ordering::Acquire);
        let txn = Txn::new()
            .when([Compare::version(COMPACT_KEY, CompareOp::Equal, seen)])
            .and_then([TxnOp::put(COMPACT_KEY, revision.to_string(), None)])
            .or_else([TxnOp::get(COMPACT_KEY, None)]);
        let response = self.client.clone().txn(txn).await.map_err(backend)?;
        if !response.succeeded() {
            let version = response
                .op_responses()
                .iter()
                .find_map(|r| match r {
                    TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.version()),
                    _ => None,
                })
                .unwrap_or(0);
            self.compact_version.store(version, Ordering::Release);
            return Ok(());
        }
        self.compact_version.store(seen + 1, Ordering::Release);
        match self.client.clone().compact(revision, None).await {
            Ok(_) => Ok(()),
            // Someone (an operator, etcd's own auto-compaction) went further already.
            Err(err) if err.to_string().contains("required revision has been compacted") => Ok(()),
            Err(err) => Err(backend(err)),
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        let options = GetOptions::new().with_count_only();
        let response = self.client.clone().get(COMPACT_KEY, Some(options)).await.map_err(backend)?;
        Ok(header_revision(self.offset, response.header()))
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        Ok(up(self.offset, self.compact_state().await?.0))
    }
}

pub mod process;

#[cfg(test)]
mod tests;

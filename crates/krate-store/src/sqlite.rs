//! Embedded SQLite backend.
//!
//! Layout: `kv_log` holds every write (the history, one row per revision) and
//! `kv_current` points each live key at its newest log row. All writes go through one
//! writer thread that commits whatever requests have queued up in a single transaction
//! (group commit): each request still gets its own revision and its own result, but the
//! batch shares one fsync. WAL mode with `synchronous=FULL` means that once a write is
//! acknowledged it survives `kill -9` and power loss.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{oneshot, watch};

use crate::{
    prefix_end, Event, KeyValue, ListRequest, ListResponse, Result, Revision, Store, StoreError, WatchBatch,
    WatchStream,
};

/// Largest number of queued writes committed in one transaction.
const MAX_BATCH: usize = 512;
/// Events read from the log per watch batch.
const WATCH_BATCH: i64 = 1000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv_log (
    rev INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    create_rev INTEGER NOT NULL,
    prev_rev INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    value BLOB
);
CREATE INDEX IF NOT EXISTS kv_log_key_rev ON kv_log(key, rev);
CREATE TABLE IF NOT EXISTS kv_current (
    key TEXT PRIMARY KEY,
    rev INTEGER NOT NULL,
    create_rev INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

enum WriteOp {
    Create { key: String, value: Bytes },
    Update { key: String, value: Bytes, expected: Revision },
    Delete { key: String, expected: Option<Revision> },
    Compact { revision: Revision },
}

enum WriteOutcome {
    Put(KeyValue),
    Deleted(Revision, KeyValue),
    Compacted,
}

struct WriteRequest {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteOutcome>>,
}

/// SQLite-backed [`Store`].
pub struct SqliteStore {
    path: PathBuf,
    writer: mpsc::Sender<WriteRequest>,
    readers: Mutex<Vec<Connection>>,
    revision: watch::Receiver<Revision>,
    compacted: Arc<std::sync::atomic::AtomicI64>,
}

fn backend(err: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(err.to_string())
}

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.busy_timeout(Duration::from_secs(30)).map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
    let synchronous = if std::env::var_os(UNSAFE_NO_FSYNC).is_some() { "OFF" } else { "FULL" };
    conn.pragma_update(None, "synchronous", synchronous).map_err(backend)?;
    Ok(conn)
}

/// Set in the environment, commits are not synced to disk: acknowledged writes can be
/// lost on power loss. Only for the test that proves the power-loss test can fail.
pub const UNSAFE_NO_FSYNC: &str = "KRATE_UNSAFE_NO_FSYNC";

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts its writer thread.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if std::env::var_os(UNSAFE_NO_FSYNC).is_some() {
            tracing::warn!("{UNSAFE_NO_FSYNC} is set: commits are not synced, a power loss loses acknowledged writes");
        }
        let conn = open_connection(&path)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        check_format(&conn, &path)?;
        let max_rev: Revision =
            conn.query_row("SELECT COALESCE(MAX(rev), 0) FROM kv_log", [], |r| r.get(0)).map_err(backend)?;
        let compacted = read_meta(&conn, "compacted")?;
        // The counter also persists in kv_meta so compaction (which may drop the newest
        // tombstones) can never make revisions go backwards after a restart.
        let counter = read_meta(&conn, "revision")?;
        let current = max_rev.max(compacted).max(counter);
        let (rev_tx, rev_rx) = watch::channel(current);
        let (tx, rx) = mpsc::channel::<WriteRequest>();
        let compacted = Arc::new(std::sync::atomic::AtomicI64::new(compacted));
        let writer_compacted = compacted.clone();
        std::thread::Builder::new()
            .name("krate-store-writer".into())
            .spawn(move || writer_loop(conn, rx, current, rev_tx, writer_compacted))
            .map_err(backend)?;
        Ok(Self { path, writer: tx, readers: Mutex::new(Vec::new()), revision: rev_rx, compacted })
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome> {
        let (reply, rx) = oneshot::channel();
        self.writer.send(WriteRequest { op, reply }).map_err(|_| backend("store writer has stopped"))?;
        rx.await.map_err(|_| backend("store writer has stopped"))?
    }

    /// Runs `f` on a pooled read connection on the blocking thread pool.
    async fn read<T: Send + 'static>(&self, f: impl FnOnce(&Connection) -> Result<T> + Send + 'static) -> Result<T> {
        let conn = match self.readers.lock().expect("reader pool poisoned").pop() {
            Some(conn) => conn,
            None => open_connection(&self.path)?,
        };
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = f(&conn);
            (conn, result)
        })
        .await
        .map_err(backend)?;
        let mut pool = self.readers.lock().expect("reader pool poisoned");
        if pool.len() < 8 {
            pool.push(conn);
        }
        result
    }

    fn compacted_now(&self) -> Revision {
        self.compacted.load(std::sync::atomic::Ordering::Acquire)
    }
}

fn write_meta(conn: &Connection, name: &str, value: i64) -> Result<()> {
    conn.execute(
        "INSERT INTO kv_meta(name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        params![name, value],
    )
    .map(drop)
    .map_err(backend)
}

fn read_meta(conn: &Connection, name: &str) -> Result<i64> {
    Ok(conn
        .query_row("SELECT value FROM kv_meta WHERE name = ?1", [name], |r| r.get(0))
        .optional()
        .map_err(backend)?
        .unwrap_or(0))
}

/// The layout version of a database file, kept in `kv_meta` as `format`: a newer krate
/// migrates an older file forward when it opens it; an older krate refuses a newer file
/// rather than misread it (no silent downgrade).
pub const FORMAT: i64 = 1;

/// Refuses a file of a newer format; records this format in an older one (format 0, the
/// files written before formats were recorded, has format 1's layout).
fn check_format(conn: &Connection, path: &Path) -> Result<()> {
    let format = read_meta(conn, "format")?;
    if format > FORMAT {
        return Err(backend(format!(
            "{} was written by a newer krate (store format {format}; this krate reads formats up to {FORMAT}): \
             run that krate version or newer, or restore a backup taken before the upgrade (krate restore)",
            path.display()
        )));
    }
    if format < FORMAT {
        write_meta(conn, "format", FORMAT)?;
    }
    Ok(())
}

/// What a database file holds, for backups' manifests and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The newest revision (the resourceVersion of a list taken there).
    pub revision: Revision,
    /// Live keys (objects).
    pub keys: i64,
    pub format: i64,
}

fn describe(conn: &Connection) -> Result<Snapshot> {
    let max_rev: Revision =
        conn.query_row("SELECT COALESCE(MAX(rev), 0) FROM kv_log", [], |r| r.get(0)).map_err(backend)?;
    let revision = max_rev.max(read_meta(conn, "revision")?).max(read_meta(conn, "compacted")?);
    let keys = conn.query_row("SELECT COUNT(*) FROM kv_current", [], |r| r.get(0)).map_err(backend)?;
    Ok(Snapshot { revision, keys, format: read_meta(conn, "format")? })
}

/// Opens an existing database file (never creating one) with `flags`.
fn open_existing(db: &Path, flags: rusqlite::OpenFlags) -> Result<Connection> {
    Connection::open_with_flags(db, flags).map_err(|e| backend(format!("opening {}: {e}", db.display())))
}

/// What the database at `db` holds, read without writing to it (`krate doctor`).
pub fn inspect(db: &Path) -> Result<Snapshot> {
    let conn = open_existing(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(backend)?;
    describe(&conn)
}

/// Copies the database at `db` to a new file `dest` with SQLite's online backup API, in
/// one step: a consistent copy at one revision, taken while a server goes on writing
/// (WAL readers do not block the writer).
pub fn backup(db: &Path, dest: &Path) -> Result<Snapshot> {
    use rusqlite::OpenFlags;
    let src = open_existing(db, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    src.busy_timeout(Duration::from_secs(30)).map_err(backend)?;
    let mut dst = Connection::open(dest).map_err(|e| backend(format!("creating {}: {e}", dest.display())))?;
    {
        let copy = rusqlite::backup::Backup::new(&src, &mut dst).map_err(backend)?;
        // All pages in one step (-1): one read transaction, so one revision; a step
        // that finds the source locked is tried again.
        loop {
            match copy.step(-1).map_err(backend)? {
                rusqlite::backup::StepResult::Done => break,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    // The copy is an ordinary (rollback-journal) file: one file to archive.
    dst.pragma_update(None, "journal_mode", "DELETE").map_err(backend)?;
    describe(&dst)
}

/// Prepares `db`, a copy of a backup, to serve a restored cluster: checks it is an intact
/// krate database of a format this krate reads, then moves its revision on by `bump` and
/// marks everything before that compacted, as `etcdutl snapshot restore --bump-revision
/// --mark-compacted` does. resourceVersions handed out afterwards are above any the old
/// cluster gave since the backup, and a client watching from an old one gets 410 Gone
/// and lists again instead of missing changes.
pub fn prepare_restored(db: &Path, bump: Revision) -> Result<Snapshot> {
    let conn = open_existing(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    let damaged = |e: rusqlite::Error| backend(format!("{} is not an intact krate database: {e}", db.display()));
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(damaged)?;
    if check != "ok" {
        return Err(backend(format!("{} is damaged: {check}", db.display())));
    }
    for table in ["kv_log", "kv_current", "kv_meta"] {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).map_err(damaged)?;
    }
    check_format(&conn, db)?;
    let before = describe(&conn)?;
    let revision = before.revision + bump;
    for name in ["revision", "compacted"] {
        write_meta(&conn, name, revision)?;
    }
    Ok(Snapshot { revision, ..before })
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<WriteRequest>,
    mut revision: Revision,
    rev_tx: watch::Sender<Revision>,
    compacted: Arc<std::sync::atomic::AtomicI64>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let start_revision = revision;
        let mut new_compaction = None;
        let outcome = (|| -> rusqlite::Result<Vec<Result<WriteOutcome>>> {
            let tx = conn.transaction()?;
            let mut results = Vec::with_capacity(batch.len());
            for request in &batch {
                let result = apply(&tx, &mut revision, &request.op)?;
                if let (WriteOp::Compact { revision }, Ok(_)) = (&request.op, &result) {
                    new_compaction = Some(*revision);
                }
                results.push(result);
            }
            if revision != start_revision {
                tx.execute(
                    "INSERT INTO kv_meta(name, value) VALUES ('revision', ?1)
                     ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    [revision],
                )?;
            }
            tx.commit()?;
            Ok(results)
        })();
        match outcome {
            Ok(results) => {
                if let Some(rev) = new_compaction {
                    compacted.store(rev, std::sync::atomic::Ordering::Release);
                }
                if revision != start_revision {
                    rev_tx.send_replace(revision);
                }
                for (request, result) in batch.into_iter().zip(results) {
                    let _ = request.reply.send(result);
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "store transaction failed; the batch was rolled back");
                revision = start_revision;
                for request in batch {
                    let _ = request.reply.send(Err(backend(&err)));
                }
            }
        }
    }
}

/// Applies one operation inside the writer's transaction. The outer `rusqlite::Result`
/// is for SQLite failures (which roll back the whole batch); the inner one for
/// request-level failures such as conflicts, which write nothing.
fn apply(
    tx: &rusqlite::Transaction<'_>,
    revision: &mut Revision,
    op: &WriteOp,
) -> rusqlite::Result<Result<WriteOutcome>> {
    let current = |key: &str| -> rusqlite::Result<Option<(Revision, Revision)>> {
        tx.query_row("SELECT rev, create_rev FROM kv_current WHERE key = ?1", [key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    };
    match op {
        WriteOp::Create { key, value } => {
            if current(key)?.is_some() {
                return Ok(Err(StoreError::AlreadyExists(key.clone())));
            }
            *revision += 1;
            let rev = *revision;
            tx.execute(
                "INSERT INTO kv_log(rev, key, create_rev, prev_rev, deleted, value) VALUES (?1, ?2, ?1, 0, 0, ?3)",
                params![rev, key, &value[..]],
            )?;
            tx.execute("INSERT INTO kv_current(key, rev, create_rev) VALUES (?1, ?2, ?2)", params![key, rev])?;
            Ok(Ok(WriteOutcome::Put(KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: rev,
                mod_revision: rev,
            })))
        }
        WriteOp::Update { key, value, expected } => {
            let Some((actual, create_rev)) = current(key)? else {
                return Ok(Err(StoreError::NotFound(key.clone())));
            };
            if actual != *expected {
                return Ok(Err(StoreError::Conflict { key: key.clone(), expected: *expected, actual }));
            }
            *revision += 1;
            let rev = *revision;
            tx.execute(
                "INSERT INTO kv_log(rev, key, create_rev, prev_rev, deleted, value) VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                params![rev, key, create_rev, actual, &value[..]],
            )?;
            tx.execute("UPDATE kv_current SET rev = ?2 WHERE key = ?1", params![key, rev])?;
            Ok(Ok(WriteOutcome::Put(KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: create_rev,
                mod_revision: rev,
            })))
        }
        WriteOp::Delete { key, expected } => {
            let Some((actual, create_rev)) = current(key)? else {
                return Ok(Err(StoreError::NotFound(key.clone())));
            };
            if let Some(expected) = expected {
                if actual != *expected {
                    return Ok(Err(StoreError::Conflict { key: key.clone(), expected: *expected, actual }));
                }
            }
            let prev_value: Vec<u8> =
                tx.query_row("SELECT value FROM kv_log WHERE rev = ?1", [actual], |r| r.get(0))?;
            *revision += 1;
            let rev = *revision;
            tx.execute(
                "INSERT INTO kv_log(rev, key, create_rev, prev_rev, deleted, value) VALUES (?1, ?2, ?3, ?4, 1, NULL)",
                params![rev, key, create_rev, actual],
            )?;
            tx.execute("DELETE FROM kv_current WHERE key = ?1", [key])?;
            Ok(Ok(WriteOutcome::Deleted(
                rev,
                KeyValue {
                    key: key.clone(),
                    value: Bytes::from(prev_value),
                    create_revision: create_rev,
                    mod_revision: actual,
                },
            )))
        }
        WriteOp::Compact { revision: target } => {
            let target = (*target).min(*revision);
            // Drop every row that no read at or after `target` can see: tombstones and
            // values superseded by a newer write that is itself at or before `target`.
            tx.execute(
                "DELETE FROM kv_log WHERE rev < ?1 AND (deleted = 1 OR EXISTS (
                    SELECT 1 FROM kv_log newer WHERE newer.key = kv_log.key
                    AND newer.rev > kv_log.rev AND newer.rev <= ?1))",
                [target],
            )?;
            tx.execute(
                "INSERT INTO kv_meta(name, value) VALUES ('compacted', ?1)
                 ON CONFLICT(name) DO UPDATE SET value = MAX(value, excluded.value)",
                [target],
            )?;
            Ok(Ok(WriteOutcome::Compacted))
        }
    }
}

fn row_to_kv(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    let value: Vec<u8> = row.get(3)?;
    Ok(KeyValue {
        key: row.get(0)?,
        create_revision: row.get(1)?,
        mod_revision: row.get(2)?,
        value: Bytes::from(value),
    })
}

fn list_rows(conn: &Connection, req: &ListRequest, at: Option<Revision>) -> Result<Vec<KeyValue>> {
    let start = match &req.start_key {
        Some(start) if start.as_str() > req.prefix.as_str() => start.clone(),
        _ => req.prefix.clone(),
    };
    let end = prefix_end(&req.prefix);
    // One extra row tells whether the limit cut the list short.
    let limit = req.limit.map(|l| l as i64 + 1).unwrap_or(-1);
    let rows = match at {
        None => {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT c.key, c.create_rev, c.rev, l.value FROM kv_current c
                     JOIN kv_log l ON l.rev = c.rev
                     WHERE c.key >= ?1 AND c.key < ?2 ORDER BY c.key LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![start, end, limit], row_to_kv)
                .map_err(backend)?
                .collect::<rusqlite::Result<Vec<_>>>();
            rows
        }
        Some(rev) => {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT l.key, l.create_rev, l.rev, l.value FROM kv_log l
                     WHERE l.key >= ?1 AND l.key < ?2 AND l.deleted = 0
                     AND l.rev = (SELECT MAX(rev) FROM kv_log m WHERE m.key = l.key AND m.rev <= ?3)
                     ORDER BY l.key LIMIT ?4",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![start, end, rev, limit], row_to_kv)
                .map_err(backend)?
                .collect::<rusqlite::Result<Vec<_>>>();
            rows
        }
    };
    rows.map_err(backend)
}

fn read_events(conn: &Connection, prefix: &str, from: Revision) -> Result<Vec<Event>> {
    let end = prefix_end(prefix);
    let mut stmt = conn
        .prepare_cached(
            "SELECT l.key, l.create_rev, l.rev, l.deleted, l.value, l.prev_rev, p.value
             FROM kv_log l LEFT JOIN kv_log p ON p.rev = l.prev_rev AND l.deleted = 1
             WHERE l.rev >= ?1 AND l.key >= ?2 AND l.key < ?3 ORDER BY l.rev LIMIT ?4",
        )
        .map_err(backend)?;
    let events = stmt
        .query_map(params![from, prefix, end, WATCH_BATCH], |row| {
            let key: String = row.get(0)?;
            let create_revision: Revision = row.get(1)?;
            let rev: Revision = row.get(2)?;
            if row.get::<_, i64>(3)? == 0 {
                let value: Vec<u8> = row.get(4)?;
                Ok(Event::Put(KeyValue { key, value: Bytes::from(value), create_revision, mod_revision: rev }))
            } else {
                let prev_value: Option<Vec<u8>> = row.get(6)?;
                Ok(Event::Delete {
                    revision: rev,
                    prev: KeyValue {
                        key,
                        value: Bytes::from(prev_value.unwrap_or_default()),
                        create_revision,
                        mod_revision: row.get(5)?,
                    },
                })
            }
        })
        .map_err(backend)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(backend)?;
    Ok(events)
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        self.read(move |conn| {
            conn.query_row(
                "SELECT c.key, c.create_rev, c.rev, l.value FROM kv_current c
                 JOIN kv_log l ON l.rev = c.rev WHERE c.key = ?1",
                [key],
                row_to_kv,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn list(&self, request: ListRequest) -> Result<ListResponse> {
        let current = *self.revision.borrow();
        if let Some(rev) = request.revision {
            if rev > current {
                return Err(StoreError::FutureRevision { requested: rev, current });
            }
            if rev < self.compacted_now() {
                return Err(StoreError::Compacted { requested: rev, compacted: self.compacted_now() });
            }
        }
        let limit = request.limit;
        let (mut items, revision) = self
            .read(move |conn| {
                // The revision is read in the same read transaction as the rows, so the
                // pair stays consistent while writes commit.
                let tx = conn.unchecked_transaction().map_err(backend)?;
                let newest: Revision = read_meta(&tx, "revision")?
                    .max(tx.query_row("SELECT COALESCE(MAX(rev), 0) FROM kv_log", [], |r| r.get(0)).map_err(backend)?);
                let (at, revision) = match request.revision {
                    Some(rev) if rev < newest => (Some(rev), rev),
                    _ => (None, newest),
                };
                let items = list_rows(&tx, &request, at)?;
                Ok((items, revision))
            })
            .await?;
        let more = limit.is_some_and(|l| items.len() > l);
        if let Some(limit) = limit {
            items.truncate(limit);
        }
        Ok(ListResponse { items, revision, more })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        match self.write(WriteOp::Create { key: key.to_string(), value }).await? {
            WriteOutcome::Put(kv) => Ok(kv),
            _ => unreachable!("create yields a put"),
        }
    }

    async fn update(&self, key: &str, value: Bytes, expected_revision: Revision) -> Result<KeyValue> {
        match self.write(WriteOp::Update { key: key.to_string(), value, expected: expected_revision }).await? {
            WriteOutcome::Put(kv) => Ok(kv),
            _ => unreachable!("update yields a put"),
        }
    }

    async fn delete(&self, key: &str, expected_revision: Option<Revision>) -> Result<(Revision, KeyValue)> {
        match self.write(WriteOp::Delete { key: key.to_string(), expected: expected_revision }).await? {
            WriteOutcome::Deleted(rev, kv) => Ok((rev, kv)),
            _ => unreachable!("delete yields a deletion"),
        }
    }

    fn watch(&self, prefix: &str, from_revision: Revision) -> WatchStream {
        struct State {
            path: PathBuf,
            conn: Option<Connection>,
            prefix: String,
            next: Revision,
            revision: watch::Receiver<Revision>,
            compacted: Arc<std::sync::atomic::AtomicI64>,
            failed: bool,
        }
        let state = State {
            path: self.path.clone(),
            conn: None,
            prefix: prefix.to_string(),
            next: from_revision.max(1),
            revision: self.revision.clone(),
            compacted: self.compacted.clone(),
            failed: false,
        };
        Box::pin(futures::stream::unfold(state, |mut st| async move {
            if st.failed {
                return None;
            }
            loop {
                let compacted = st.compacted.load(std::sync::atomic::Ordering::Acquire);
                if st.next <= compacted {
                    st.failed = true;
                    return Some((Err(StoreError::Compacted { requested: st.next, compacted }), st));
                }
                // Mark the current revision as seen before reading, so a commit that
                // lands during the read wakes the next wait.
                let current = *st.revision.borrow_and_update();
                if current >= st.next {
                    let conn = match st.conn.take() {
                        Some(conn) => conn,
                        None => match open_connection(&st.path) {
                            Ok(conn) => conn,
                            Err(err) => {
                                st.failed = true;
                                return Some((Err(err), st));
                            }
                        },
                    };
                    let (prefix, from) = (st.prefix.clone(), st.next);
                    let joined = tokio::task::spawn_blocking(move || {
                        let events = read_events(&conn, &prefix, from);
                        (conn, events)
                    })
                    .await;
                    let (conn, events) = match joined {
                        Ok(pair) => pair,
                        Err(err) => {
                            st.failed = true;
                            return Some((Err(backend(err)), st));
                        }
                    };
                    st.conn = Some(conn);
                    match events {
                        Ok(events) if !events.is_empty() => {
                            let batch = WatchBatch::new(events);
                            st.next = batch.revision + 1;
                            return Some((Ok(batch), st));
                        }
                        Ok(_) => {
                            // Nothing under our prefix up to `current`: say so, for
                            // followers that wait for a revision.
                            st.next = st.next.max(current + 1);
                            return Some((Ok(WatchBatch { events: Vec::new(), revision: current }), st));
                        }
                        Err(err) => {
                            st.failed = true;
                            return Some((Err(err), st));
                        }
                    }
                }
                if st.revision.changed().await.is_err() {
                    return None;
                }
            }
        }))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.write(WriteOp::Compact { revision }).await.map(|_| ())
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(*self.revision.borrow())
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        Ok(self.compacted_now())
    }
}

#[cfg(test)]
mod tests;

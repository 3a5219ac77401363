//! The MVCC key-value state machine on redb.
//!
//! Tables (one redb file):
//! - `meta`: `format`, `revision`, `compacted` (u64, little endian), plus opaque entries owned by
//!   the Raft layer (`raft.*`), written in the same transaction as the data they describe.
//! - `current`: key → (create, mod, version, value) for every live key: latest reads and
//!   compare-and-swap cost one lookup.
//! - `history`: (key, mod revision) → (tombstone?, create, version, value) for every write
//!   still inside the history window: reads at an older revision, and watch replay.
//! - `events`: (revision, index in transaction) → (kind, key): the change log watchers replay
//!   from disk when they start behind or fall behind.
//!
//! All writes go through [`Mvcc::write`]: one redb write transaction, committed with the
//! durability the caller chooses, then its events are published to watchers in commit order.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, Table, TableDefinition,
    TableError, WriteTransaction,
};
use tokio::sync::broadcast;

use crate::{
    StoreError,
    error::RedbContext,
    snapshot::{Record, SnapshotReader, SnapshotWriter},
    types::{
        Event, EventKind, KeyValue, MAX_KEY_BYTES, MAX_VALUE_BYTES, Op, OpResult, RangeRequest,
        RangeResponse, Revision, Txn, TxnResponse, prefix_end,
    },
};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CURRENT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("current");
const HISTORY: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("history");
const EVENTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("events");

/// On-disk format written by this build. Opening any other is refused.
pub const FORMAT: u64 = 1;

const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// Batches of events published per commit; a watcher further behind replays from disk.
const BROADCAST_BATCHES: usize = 1024;

const TOMBSTONE: u8 = 1;
const KIND_PUT: u8 = 1;
const KIND_DELETE: u8 = 2;

/// A durable MVCC key-value store (one replica's state). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Mvcc {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    path: PathBuf,
    /// Serialises commit + publish so watchers receive batches in commit order.
    write_lock: Mutex<()>,
    events: broadcast::Sender<Arc<Vec<Event>>>,
    /// Latest committed revision, for watchers deciding whether they are caught up.
    revision: AtomicU64,
}

impl Mvcc {
    /// Opens the store at `path`, creating it if the file does not exist. An existing file that
    /// is not a skiff store, or is damaged, is an error naming the path; it is never replaced.
    pub fn open(path: &Path) -> Result<Mvcc, StoreError> {
        let db = crate::db::open_or_create(path, META, META_FORMAT, FORMAT, |wtx| {
            let mut meta = wtx.open_table(META).op("create meta")?;
            for k in [META_REVISION, META_COMPACTED] {
                meta.insert(k, 0u64.to_le_bytes().as_slice())
                    .op("write meta")?;
            }
            wtx.open_table(CURRENT).op("create current")?;
            wtx.open_table(HISTORY).op("create history")?;
            wtx.open_table(EVENTS).op("create events")?;
            Ok(())
        })?;
        let revision = {
            let rtx = db.begin_read().op("begin read")?;
            read_meta_u64(&rtx, META_REVISION)?
        };
        let (events, _) = broadcast::channel(BROADCAST_BATCHES);
        Ok(Mvcc {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                write_lock: Mutex::new(()),
                events,
                revision: AtomicU64::new(revision),
            }),
        })
    }

    /// How many handles (clones) keep the file open, this one included.
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// The file backing this store.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The latest committed revision.
    pub fn revision(&self) -> Revision {
        self.inner.revision.load(Ordering::Acquire)
    }

    /// The compacted revision: history at or below it is gone.
    pub fn compacted(&self) -> Result<Revision, StoreError> {
        let rtx = self.inner.db.begin_read().op("begin read")?;
        read_meta_u64(&rtx, META_COMPACTED)
    }

    /// Subscribes to batches of events committed from now on (one batch per write).
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Vec<Event>>> {
        self.inner.events.subscribe()
    }

    /// Runs `f` in one write transaction and commits it with `durability`; on error nothing is
    /// written. Events of the transaction are published to watchers after the commit.
    ///
    /// `Durability::Immediate` returns only once the data is on disk (fsync). `None` leaves it
    /// to the next immediate commit of the same file; the Raft layer uses that for applying
    /// entries whose log is already durable.
    pub fn write<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _serial = self
            .inner
            .write_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut wtx = self.inner.db.begin_write().op("begin write")?;
        wtx.set_durability(durability)
            .map_err(|e| StoreError::Invalid(format!("durability: {e}")))?;
        let (out, events, revision) = {
            let mut w = Writer::new(&wtx, &self.inner.path)?;
            let out = f(&mut w)?;
            w.finish()?;
            (out, w.events, w.revision)
        };
        // The commit point: with Immediate durability, redb fsyncs before returning.
        wtx.commit().op("commit")?;
        self.inner.revision.store(revision, Ordering::Release);
        if !events.is_empty() {
            // No receivers is fine; lagging receivers catch up from disk.
            let _ = self.inner.events.send(Arc::new(events));
        }
        Ok(out)
    }

    /// Applies one transaction durably (fsync before returning).
    pub fn txn(&self, txn: &Txn) -> Result<TxnResponse, StoreError> {
        self.write(Durability::Immediate, |w| w.txn(txn))
    }

    /// Compacts durably; see [`Writer::compact`].
    pub fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.write(Durability::Immediate, |w| w.compact(revision))
    }

    /// Reads a key or key range at the latest or an older revision.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, StoreError> {
        validate_key(&req.start, "range start")?;
        let rtx = self.inner.db.begin_read().op("begin read")?;
        let revision = read_meta_u64(&rtx, META_REVISION)?;
        let compacted = read_meta_u64(&rtx, META_COMPACTED)?;
        let at = if req.revision == 0 {
            revision
        } else {
            req.revision
        };
        if at > revision {
            return Err(StoreError::FutureRevision {
                requested: at,
                current: revision,
            });
        }
        if at < compacted {
            return Err(StoreError::Compacted {
                requested: at,
                compacted,
            });
        }
        let limit = if req.limit == 0 {
            usize::MAX
        } else {
            req.limit
        };
        let mut kvs = if at == revision {
            range_current(&self.inner.path, &rtx, req, limit)?
        } else {
            range_history(&self.inner.path, &rtx, req, at, limit)?
        };
        let more = kvs.len() > limit;
        kvs.truncate(limit);
        Ok(RangeResponse {
            kvs,
            more,
            revision: at,
        })
    }

    /// Reads a meta entry (e.g. Raft's applied log id) as committed.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rtx = self.inner.db.begin_read().op("begin read")?;
        let table = match rtx.open_table(META) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e).op("open meta"),
        };
        Ok(table.get(name).op("read meta")?.map(|v| v.value().to_vec()))
    }

    /// Events with revision ≥ `from` for keys in `range`, in order, whole revisions at a time,
    /// stopping after about `max` events. Returns them with the last revision scanned (the
    /// caller continues from that + 1).
    pub(crate) fn events_since(
        &self,
        range: &RangeRequest,
        from: Revision,
        max: usize,
    ) -> Result<(Vec<Event>, Revision), StoreError> {
        let rtx = self.inner.db.begin_read().op("begin read")?;
        let revision = read_meta_u64(&rtx, META_REVISION)?;
        let compacted = read_meta_u64(&rtx, META_COMPACTED)?;
        if from <= compacted {
            return Err(StoreError::Compacted {
                requested: from,
                compacted,
            });
        }
        let events = rtx.open_table(EVENTS).op("open events")?;
        let history = rtx.open_table(HISTORY).op("open history")?;
        let mut out = Vec::new();
        let mut through = from.saturating_sub(1).max(compacted);
        for entry in events.range((from, 0u32)..).op("scan events")? {
            let (k, v) = entry.op("scan events")?;
            let (rev, _) = k.value();
            if rev != through && out.len() >= max {
                break;
            }
            through = rev;
            let v = v.value();
            let (kind, key) = (v[0], &v[1..]);
            if !range.contains(key) {
                continue;
            }
            let kind = match kind {
                KIND_PUT => EventKind::Put,
                KIND_DELETE => EventKind::Delete,
                other => {
                    return Err(damaged(
                        &self.inner.path,
                        format!("event kind {other} at revision {rev}"),
                    ));
                }
            };
            let kv = match history.get((key, rev)).op("read history")? {
                Some(rec) => decode_history(&self.inner.path, key, rev, rec.value())?,
                None => {
                    return Err(damaged(
                        &self.inner.path,
                        format!("event log: revision {rev} has no history record"),
                    ));
                }
            };
            let kv = match kv {
                Some(kv) => kv,
                None => KeyValue {
                    key: key.to_vec(),
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: rev,
                    version: 0,
                },
            };
            let prev_kv = previous(&self.inner.path, &history, key, rev)?;
            out.push(Event { kind, kv, prev_kv });
        }
        if out.len() < max {
            through = through.max(revision);
        }
        Ok((out, through))
    }
}

/// The live value of `key` just before `rev`, if any.
fn previous(
    path: &Path,
    history: &impl ReadableTable<(&'static [u8], u64), &'static [u8]>,
    key: &[u8],
    rev: Revision,
) -> Result<Option<KeyValue>, StoreError> {
    let mut before = history.range((key, 0u64)..(key, rev)).op("read history")?;
    match before.next_back() {
        Some(entry) => {
            let (k, v) = entry.op("read history")?;
            let (_, prev_rev) = k.value();
            decode_history(path, key, prev_rev, v.value())
        }
        None => Ok(None),
    }
}

fn read_meta_u64(rtx: &ReadTransaction, name: &str) -> Result<u64, StoreError> {
    let meta = rtx.open_table(META).op("open meta")?;
    let v = meta.get(name).op("read meta")?;
    Ok(v.and_then(|v| decode_u64(v.value())).unwrap_or(0))
}

pub(crate) fn decode_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// `current` value: create(8) mod(8) version(8) value.
fn encode_current(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

/// A damaged record: reported with the file it is in, never skipped.
fn damaged(path: &Path, what: String) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("damaged {what}"),
    }
}

fn decode_current(path: &Path, key: &[u8], b: &[u8]) -> Result<KeyValue, StoreError> {
    let bad = || {
        damaged(
            path,
            format!("current record of {:?}", String::from_utf8_lossy(key)),
        )
    };
    if b.len() < 24 {
        return Err(bad());
    }
    Ok(KeyValue {
        key: key.to_vec(),
        create_revision: decode_u64(&b[0..8]).ok_or_else(bad)?,
        mod_revision: decode_u64(&b[8..16]).ok_or_else(bad)?,
        version: decode_u64(&b[16..24]).ok_or_else(bad)?,
        value: b[24..].to_vec(),
    })
}

/// `history` value: flags(1) create(8) version(8) value.
fn encode_history(kv: Option<&KeyValue>) -> Vec<u8> {
    match kv {
        Some(kv) => {
            let mut out = Vec::with_capacity(17 + kv.value.len());
            out.push(0);
            out.extend_from_slice(&kv.create_revision.to_le_bytes());
            out.extend_from_slice(&kv.version.to_le_bytes());
            out.extend_from_slice(&kv.value);
            out
        }
        None => {
            let mut out = vec![TOMBSTONE];
            out.extend_from_slice(&[0; 16]);
            out
        }
    }
}

/// Decodes a history record: `None` is a tombstone.
fn decode_history(
    path: &Path,
    key: &[u8],
    rev: Revision,
    b: &[u8],
) -> Result<Option<KeyValue>, StoreError> {
    let bad = || damaged(path, format!("history record of revision {rev}"));
    if b.len() < 17 {
        return Err(bad());
    }
    if b[0] & TOMBSTONE != 0 {
        return Ok(None);
    }
    Ok(Some(KeyValue {
        key: key.to_vec(),
        create_revision: decode_u64(&b[1..9]).ok_or_else(bad)?,
        version: decode_u64(&b[9..17]).ok_or_else(bad)?,
        mod_revision: rev,
        value: b[17..].to_vec(),
    }))
}

fn validate_key(key: &[u8], what: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::Invalid(format!("{what}: empty key")));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::Invalid(format!(
            "{what}: key of {} bytes is over the limit of {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

/// Checks a transaction the way applying it would, so a proposer can refuse it with a precise
/// error before it enters the replicated log.
pub(crate) fn validate_txn(txn: &Txn) -> Result<(), StoreError> {
    for c in &txn.compare {
        validate_key(&c.key, "compare")?;
    }
    validate_ops(&txn.success)?;
    validate_ops(&txn.failure)
}

fn validate_ops(ops: &[Op]) -> Result<(), StoreError> {
    let mut written: Vec<&[u8]> = Vec::new();
    let mut prefixes: Vec<&[u8]> = Vec::new();
    for op in ops {
        match op {
            Op::Put { key, value } => {
                validate_key(key, "put")?;
                if value.len() > MAX_VALUE_BYTES {
                    return Err(StoreError::ValueTooLarge {
                        key: String::from_utf8_lossy(key).into_owned(),
                        size: value.len(),
                        limit: MAX_VALUE_BYTES,
                    });
                }
                written.push(key);
            }
            Op::Delete { key } => {
                validate_key(key, "delete")?;
                written.push(key);
            }
            Op::DeletePrefix { prefix } => {
                validate_key(prefix, "delete prefix")?;
                prefixes.push(prefix);
            }
            Op::Get { key } => validate_key(key, "get")?,
        }
    }
    let mut sorted = written.clone();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(StoreError::Invalid(format!(
            "duplicate key {:?} in one transaction",
            String::from_utf8_lossy(w[0])
        )));
    }
    for p in &prefixes {
        if let Some(k) = written.iter().find(|k| k.starts_with(p)) {
            return Err(StoreError::Invalid(format!(
                "key {:?} overlaps a prefix delete in the same transaction",
                String::from_utf8_lossy(k)
            )));
        }
    }
    Ok(())
}

fn range_current(
    path: &Path,
    rtx: &ReadTransaction,
    req: &RangeRequest,
    limit: usize,
) -> Result<Vec<KeyValue>, StoreError> {
    let current = rtx.open_table(CURRENT).op("open current")?;
    let mut out = Vec::new();
    if req.end.is_empty() {
        if let Some(v) = current.get(req.start.as_slice()).op("read current")? {
            out.push(decode_current(path, &req.start, v.value())?);
        }
        return Ok(out);
    }
    let iter = if req.end == [0] {
        current.range(req.start.as_slice()..).op("scan current")?
    } else {
        current
            .range(req.start.as_slice()..req.end.as_slice())
            .op("scan current")?
    };
    for entry in iter {
        if out.len() > limit {
            break;
        }
        let (k, v) = entry.op("scan current")?;
        out.push(decode_current(path, k.value(), v.value())?);
    }
    Ok(out)
}

fn range_history(
    path: &Path,
    rtx: &ReadTransaction,
    req: &RangeRequest,
    at: Revision,
    limit: usize,
) -> Result<Vec<KeyValue>, StoreError> {
    let history = rtx.open_table(HISTORY).op("open history")?;
    let start = req.start.as_slice();
    let iter = if req.end.is_empty() {
        history.range((start, 0u64)..=(start, at))
    } else if req.end == [0] {
        history.range((start, 0u64)..)
    } else {
        history.range((start, 0u64)..(req.end.as_slice(), 0u64))
    }
    .op("scan history")?;
    let mut out = Vec::new();
    // The newest record at or below `at` of the key being scanned.
    let mut candidate: Option<(Vec<u8>, Option<KeyValue>)> = None;
    for entry in iter {
        let (k, v) = entry.op("scan history")?;
        let (key, rev) = k.value();
        let key_changed = candidate
            .as_ref()
            .is_some_and(|(ck, _)| ck.as_slice() != key);
        if key_changed && let Some((_, Some(kv))) = candidate.take() {
            out.push(kv);
            if out.len() > limit {
                return Ok(out);
            }
        }
        if rev <= at {
            let kv = decode_history(path, key, rev, v.value())?;
            candidate = Some((key.to_vec(), kv));
        }
    }
    if let Some((_, Some(kv))) = candidate {
        out.push(kv);
    }
    Ok(out)
}

/// The tables of one write transaction and what it has done so far.
pub struct Writer<'txn> {
    path: &'txn Path,
    meta: Table<'txn, &'static str, &'static [u8]>,
    current: Table<'txn, &'static [u8], &'static [u8]>,
    history: Table<'txn, (&'static [u8], u64), &'static [u8]>,
    events_log: Table<'txn, (u64, u32), &'static [u8]>,
    revision: Revision,
    compacted: Revision,
    events: Vec<Event>,
}

impl std::fmt::Debug for Writer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("revision", &self.revision)
            .field("compacted", &self.compacted)
            .finish_non_exhaustive()
    }
}

impl<'txn> Writer<'txn> {
    fn new(wtx: &'txn WriteTransaction, path: &'txn Path) -> Result<Writer<'txn>, StoreError> {
        let meta = wtx.open_table(META).op("open meta")?;
        let get = |name| -> Result<u64, StoreError> {
            Ok(meta
                .get(name)
                .op("read meta")?
                .and_then(|v| decode_u64(v.value()))
                .unwrap_or(0))
        };
        let (revision, compacted) = (get(META_REVISION)?, get(META_COMPACTED)?);
        Ok(Writer {
            path,
            revision,
            compacted,
            current: wtx.open_table(CURRENT).op("open current")?,
            history: wtx.open_table(HISTORY).op("open history")?,
            events_log: wtx.open_table(EVENTS).op("open events")?,
            meta,
            events: Vec::new(),
        })
    }

    fn finish(&mut self) -> Result<(), StoreError> {
        self.meta
            .insert(META_REVISION, self.revision.to_le_bytes().as_slice())
            .op("write meta")?;
        self.meta
            .insert(META_COMPACTED, self.compacted.to_le_bytes().as_slice())
            .op("write meta")?;
        Ok(())
    }

    /// The revision as of this point in the transaction.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Writes an opaque meta entry (the Raft layer's applied log id, membership).
    pub fn put_meta(&mut self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        debug_assert!(
            name.starts_with("raft."),
            "meta names outside raft.* are the store's"
        );
        self.meta.insert(name, value).op("write meta")?;
        Ok(())
    }

    fn get_current(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        match self.current.get(key).op("read current")? {
            Some(v) => Ok(Some(decode_current(self.path, key, v.value())?)),
            None => Ok(None),
        }
    }

    /// Applies a transaction. Invalid transactions are rejected before anything is written.
    pub fn txn(&mut self, txn: &Txn) -> Result<TxnResponse, StoreError> {
        validate_txn(txn)?;
        let mut succeeded = true;
        for c in &txn.compare {
            let m = self.get_current(&c.key)?.map_or(0, |kv| kv.mod_revision);
            if m != c.mod_revision {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let rev = self.revision + 1;
        let mut sub = 0u32;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    let prev = self.get_current(key)?;
                    let (create_revision, version) = match &prev {
                        Some(p) => (p.create_revision, p.version + 1),
                        None => (rev, 1),
                    };
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision,
                        mod_revision: rev,
                        version,
                    };
                    self.current
                        .insert(key.as_slice(), encode_current(&kv).as_slice())
                        .op("write current")?;
                    self.history
                        .insert((key.as_slice(), rev), encode_history(Some(&kv)).as_slice())
                        .op("write history")?;
                    self.log_event(rev, &mut sub, KIND_PUT, key)?;
                    self.events.push(Event {
                        kind: EventKind::Put,
                        kv,
                        prev_kv: prev.clone(),
                    });
                    results.push(OpResult::Put { prev });
                }
                Op::Delete { key } => {
                    let mut deleted = Vec::new();
                    if let Some(prev) = self.get_current(key)? {
                        self.delete_live(prev.clone(), rev, &mut sub)?;
                        deleted.push(prev);
                    }
                    results.push(OpResult::Delete { deleted });
                }
                Op::DeletePrefix { prefix } => {
                    let end = prefix_end(prefix);
                    let mut victims = Vec::new();
                    {
                        let iter = if end == [0] {
                            self.current.range(prefix.as_slice()..)
                        } else {
                            self.current.range(prefix.as_slice()..end.as_slice())
                        }
                        .op("scan current")?;
                        for entry in iter {
                            let (k, v) = entry.op("scan current")?;
                            victims.push(decode_current(self.path, k.value(), v.value())?);
                        }
                    }
                    for prev in &victims {
                        self.delete_live(prev.clone(), rev, &mut sub)?;
                    }
                    results.push(OpResult::Delete { deleted: victims });
                }
                Op::Get { key } => results.push(OpResult::Get {
                    kv: self.get_current(key)?,
                }),
            }
        }
        if sub > 0 {
            self.revision = rev;
        }
        Ok(TxnResponse {
            succeeded,
            revision: self.revision,
            results,
        })
    }

    fn delete_live(
        &mut self,
        prev: KeyValue,
        rev: Revision,
        sub: &mut u32,
    ) -> Result<(), StoreError> {
        let key = prev.key.as_slice();
        self.current.remove(key).op("delete current")?;
        self.history
            .insert((key, rev), encode_history(None).as_slice())
            .op("write history")?;
        self.log_event(rev, sub, KIND_DELETE, key)?;
        let kv = KeyValue {
            key: prev.key.clone(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: rev,
            version: 0,
        };
        self.events.push(Event {
            kind: EventKind::Delete,
            kv,
            prev_kv: Some(prev),
        });
        Ok(())
    }

    fn log_event(
        &mut self,
        rev: Revision,
        sub: &mut u32,
        kind: u8,
        key: &[u8],
    ) -> Result<(), StoreError> {
        let mut v = Vec::with_capacity(1 + key.len());
        v.push(kind);
        v.extend_from_slice(key);
        self.events_log
            .insert((rev, *sub), v.as_slice())
            .op("write events")?;
        *sub += 1;
        Ok(())
    }

    /// Forgets history below `revision`: reads at older revisions and watches from
    /// `revision` or earlier then fail with [`StoreError::Compacted`]. Compacting at or below
    /// the current compacted revision does nothing.
    pub fn compact(&mut self, revision: Revision) -> Result<(), StoreError> {
        if revision <= self.compacted {
            return Ok(());
        }
        if revision > self.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: self.revision,
            });
        }
        // For each key keep the newest record at or below `revision` if it is live (reads at
        // `revision` need it); drop every older record, and that one too if it is a tombstone.
        let mut doomed: Vec<(Vec<u8>, u64)> = Vec::new();
        {
            let mut last: Option<(Vec<u8>, u64, bool)> = None; // key, rev, tombstone
            for entry in self.history.iter().op("scan history")? {
                let (k, v) = entry.op("scan history")?;
                let (key, rev) = k.value();
                let tomb = v.value().first().is_some_and(|f| f & TOMBSTONE != 0);
                if let Some((lk, lrev, ltomb)) = last.take() {
                    let same = lk.as_slice() == key;
                    if same && rev <= revision {
                        doomed.push((lk, lrev)); // superseded by a newer record ≤ revision
                    } else if ltomb && lrev <= revision {
                        doomed.push((lk, lrev)); // newest ≤ revision and a tombstone
                    }
                }
                last = Some((key.to_vec(), rev, tomb));
            }
            if let Some((lk, lrev, true)) = last
                && lrev <= revision
            {
                doomed.push((lk, lrev));
            }
        }
        for (key, rev) in &doomed {
            self.history
                .remove((key.as_slice(), *rev))
                .op("compact history")?;
        }
        self.events_log
            .retain_in(..=(revision, u32::MAX), |_, _| false)
            .op("compact events")?;
        self.compacted = revision;
        Ok(())
    }
}

impl Mvcc {
    /// Writes every table as of one read transaction to `out` as a snapshot stream
    /// ([`crate::snapshot`]), record by record; `io` turns a write error into the caller's.
    /// Everything the copy holds is on disk in the state file first (an fsync after the read
    /// transaction began), so a snapshot never claims more than a restart would find. Returns
    /// `out` and the meta entries (including the Raft layer's), decoded for the caller.
    pub fn export_to<W: std::io::Write>(
        &self,
        out: W,
        io: impl Fn(std::io::Error) -> StoreError,
    ) -> Result<(W, std::collections::BTreeMap<String, Vec<u8>>), StoreError> {
        let rtx = self.inner.db.begin_read().op("begin read")?;
        self.write(Durability::Immediate, |_| Ok(()))?;
        let mut w = SnapshotWriter::new(out).map_err(&io)?;
        let mut meta = std::collections::BTreeMap::new();
        for e in rtx
            .open_table(META)
            .op("open meta")?
            .iter()
            .op("scan meta")?
        {
            let (k, v) = e.op("scan meta")?;
            let (k, v) = (k.value().to_string(), v.value().to_vec());
            w.record(&Record::Meta(k.clone(), v.clone())).map_err(&io)?;
            meta.insert(k, v);
        }
        for e in rtx
            .open_table(CURRENT)
            .op("open current")?
            .iter()
            .op("scan current")?
        {
            let (k, v) = e.op("scan current")?;
            w.record(&Record::Current(k.value().to_vec(), v.value().to_vec()))
                .map_err(&io)?;
        }
        for e in rtx
            .open_table(HISTORY)
            .op("open history")?
            .iter()
            .op("scan history")?
        {
            let (k, v) = e.op("scan history")?;
            let (key, rev) = k.value();
            w.record(&Record::History(key.to_vec(), rev, v.value().to_vec()))
                .map_err(&io)?;
        }
        for e in rtx
            .open_table(EVENTS)
            .op("open events")?
            .iter()
            .op("scan events")?
        {
            let (k, v) = e.op("scan events")?;
            let (rev, sub) = k.value();
            w.record(&Record::Event(rev, sub, v.value().to_vec()))
                .map_err(&io)?;
        }
        Ok((w.finish().map_err(&io)?, meta))
    }

    /// Replaces the whole store with a snapshot stream, then writes `extra` meta entries, all in
    /// one durable transaction: a stream that is cut short, damaged or of another state format
    /// (checked once the whole stream is read) changes nothing. `seen` is shown each record as it is read (to keep a copy), then `None`
    /// once the whole stream has been read and checked, just before the commit; an error from
    /// it abandons the import. Watchers behind the new history get [`StoreError::Compacted`]
    /// and re-list.
    pub fn import_from<R: std::io::Read>(
        &self,
        stream: &mut SnapshotReader<R>,
        extra: &[(&str, Vec<u8>)],
        mut seen: impl FnMut(Option<&Record>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _serial = self
            .inner
            .write_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let wtx = self.inner.db.begin_write().op("begin write")?;
        let mut revision = 0;
        {
            let mut meta = wtx.open_table(META).op("open meta")?;
            let mut current = wtx.open_table(CURRENT).op("open current")?;
            let mut history = wtx.open_table(HISTORY).op("open history")?;
            let mut events = wtx.open_table(EVENTS).op("open events")?;
            meta.retain(|_, _| false).op("clear meta")?;
            current.retain(|_, _| false).op("clear current")?;
            history.retain(|_, _| false).op("clear history")?;
            events.retain(|_, _| false).op("clear events")?;
            let mut format = None;
            for r in stream {
                let r = r?;
                seen(Some(&r))?;
                match r {
                    Record::Meta(k, v) => {
                        if k == META_FORMAT {
                            format = decode_u64(&v);
                        }
                        if k == META_REVISION {
                            revision = decode_u64(&v).unwrap_or(0);
                        }
                        meta.insert(k.as_str(), v.as_slice()).op("write meta")?;
                    }
                    Record::Current(k, v) => {
                        current
                            .insert(k.as_slice(), v.as_slice())
                            .op("write current")?;
                    }
                    Record::History(k, r, v) => {
                        history
                            .insert((k.as_slice(), r), v.as_slice())
                            .op("write history")?;
                    }
                    Record::Event(r, s, v) => {
                        events.insert((r, s), v.as_slice()).op("write events")?;
                    }
                    // The reader consumes the end record itself.
                    Record::End(..) => {
                        return Err(StoreError::Invalid("snapshot: a second end record".into()));
                    }
                }
            }
            if format != Some(FORMAT) {
                return Err(StoreError::Invalid(format!(
                    "snapshot has format {format:?}, this build reads {FORMAT}"
                )));
            }
            for (k, v) in extra {
                meta.insert(*k, v.as_slice()).op("write meta")?;
            }
        }
        seen(None)?;
        wtx.commit().op("commit")?;
        self.inner.revision.store(revision, Ordering::Release);
        Ok(())
    }
}

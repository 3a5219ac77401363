//! The Raft state machine: committed [`Command`]s applied to [`Mvcc`].

use std::{
    fs,
    io::{BufReader, BufWriter, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use openraft::{
    AnyError, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageIOError, StoredMembership, storage::RaftStateMachine,
};
use redb::Durability;

use super::{Applied, DurablyApplied, NodeId, RaftStorageError, TypeConfig};
use crate::{
    Command, CommandResponse, Mvcc, StoreError,
    snapshot::{Record, SnapshotReader, SnapshotWriter},
};

/// Entries applied without fsync before the state file is synced. Bounded so a crash replays at
/// most this many entries from the log, and so redb can reuse freed pages.
pub const SYNC_EVERY: u64 = 1024;

const APPLIED: &str = "raft.applied";
const MEMBERSHIP: &str = "raft.membership";

type Node = openraft::BasicNode;
/// The applied log id and membership, as stored in the state file.
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, Node>);

/// A snapshot file and what it holds.
#[derive(Clone, Debug)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    path: PathBuf,
}

/// The snapshot directory: the current snapshot's file (`<hex of its id>.snap`) and files being
/// built or installed (`*.tmp`, removed at start).
#[derive(Debug)]
struct Snapshots {
    dir: PathBuf,
    current: Mutex<Option<StoredSnapshot>>,
    /// Numbers snapshot ids and temporary files.
    seq: AtomicU64,
}

/// The state machine. Clones share the store and the snapshot directory.
#[derive(Clone, Debug)]
pub struct StateMachine {
    mvcc: Mvcc,
    snapshots: Arc<Snapshots>,
    unsynced: Arc<Mutex<u64>>,
    durable: DurablyApplied,
}

fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(v).map_err(|e| StoreError::Invalid(format!("encode: {e}")))
}

fn dec<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| StoreError::Invalid(format!("decode: {e}")))
}

fn sm_err(e: StoreError) -> RaftStorageError {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

/// Client-caused refusals, decided the same way on every replica.
fn rejected(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Invalid(_)
            | StoreError::ValueTooLarge { .. }
            | StoreError::FutureRevision { .. }
            | StoreError::Compacted { .. }
    )
}

impl StateMachine {
    /// Wraps `mvcc` (which holds the applied log id and membership in its meta table), with
    /// snapshots in `snapshot_dir` (created if missing). The newest snapshot there becomes the
    /// current one; unfinished files of an earlier run are removed. A snapshot file whose head
    /// cannot be read is an error naming it.
    pub fn open(mvcc: Mvcc, snapshot_dir: &Path) -> Result<StateMachine, StoreError> {
        let io = StoreError::io;
        fs::create_dir_all(snapshot_dir).map_err(io("create directory", snapshot_dir))?;
        let mut found: Vec<StoredSnapshot> = Vec::new();
        for entry in fs::read_dir(snapshot_dir).map_err(io("list", snapshot_dir))? {
            let path = entry.map_err(io("list", snapshot_dir))?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("tmp") => fs::remove_file(&path).map_err(io("remove", &path))?,
                Some("snap") => found.push(check_file(&path)?),
                _ => {}
            }
        }
        found.sort_by_key(|s| s.meta.last_log_id);
        let current = found.pop();
        for old in found {
            fs::remove_file(&old.path).map_err(io("remove", &old.path))?;
        }
        // What the file holds as it is opened is what survived: on disk.
        let (applied, _) = read_applied(&mvcc)?;
        Ok(StateMachine {
            mvcc,
            snapshots: Arc::new(Snapshots {
                dir: snapshot_dir.to_path_buf(),
                current: Mutex::new(current),
                seq: AtomicU64::new(0),
            }),
            unsynced: Arc::new(Mutex::new(0)),
            durable: DurablyApplied::new(applied),
        })
    }

    /// Watches how far the state file is durable; the log store waits for it before purging
    /// ([`super::LogStore::purge_after`]).
    pub fn durably_applied(&self) -> super::DurableWatch {
        self.durable.watch()
    }

    /// The store this state machine applies to (for reads and watches).
    pub fn mvcc(&self) -> &Mvcc {
        &self.mvcc
    }
}

/// The applied log id and membership from their meta entries (absent: none yet).
fn decode_applied(
    applied: Option<&[u8]>,
    membership: Option<&[u8]>,
) -> Result<AppliedState, StoreError> {
    Ok((
        applied.map(dec).transpose()?.flatten(),
        membership.map(dec).transpose()?.unwrap_or_default(),
    ))
}

/// The applied log id and membership the state file holds.
fn read_applied(mvcc: &Mvcc) -> Result<AppliedState, StoreError> {
    decode_applied(
        mvcc.meta(APPLIED)?.as_deref(),
        mvcc.meta(MEMBERSHIP)?.as_deref(),
    )
}

/// Applies one command; client-caused refusals become [`Applied::Rejected`], storage failures
/// are errors (they stop the member).
fn apply_command(w: &mut crate::Writer<'_>, cmd: Command) -> Result<Applied, StoreError> {
    Ok(match cmd {
        Command::Txn(txn) => match w.txn(&txn) {
            Ok(r) => Applied::Done(CommandResponse::Txn(r)),
            Err(e) if rejected(&e) => Applied::Rejected(e.to_string()),
            Err(e) => return Err(e),
        },
        Command::Compact { revision } => match w.compact(revision) {
            Ok(()) => Applied::Done(CommandResponse::Compacted { revision }),
            Err(e) if rejected(&e) => Applied::Rejected(e.to_string()),
            Err(e) => return Err(e),
        },
        Command::Batch(cmds) => Applied::Batch(
            cmds.into_iter()
                .map(|c| apply_command(w, c))
                .collect::<Result<_, _>>()?,
        ),
    })
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<AppliedState, RaftStorageError> {
        read_applied(&self.mvcc)
            .map_err(|e| StorageIOError::read_state_machine(AnyError::new(&e)).into())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let has_membership = entries
            .iter()
            .any(|e| matches!(e.payload, EntryPayload::Membership(_)));
        let durability = {
            let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
            *unsynced += entries.len() as u64;
            if has_membership || *unsynced >= SYNC_EVERY {
                *unsynced = 0;
                Durability::Immediate
            } else {
                Durability::None
            }
        };
        let mvcc = self.mvcc.clone();
        let last = entries.last().map(|e| e.log_id);
        let applied = tokio::task::spawn_blocking(move || {
            mvcc.write(durability, |w| {
                let mut out = Vec::with_capacity(entries.len());
                let mut last = None;
                // Only a batch with a membership entry changes the stored membership.
                let mut membership = None;
                for entry in entries {
                    last = Some(entry.log_id);
                    out.push(match entry.payload {
                        EntryPayload::Blank => Applied::Internal,
                        EntryPayload::Membership(m) => {
                            membership = Some(StoredMembership::new(Some(entry.log_id), m));
                            Applied::Internal
                        }
                        EntryPayload::Normal(cmd) => apply_command(w, cmd)?,
                    });
                }
                w.put_meta(APPLIED, &enc(&last)?)?;
                if let Some(m) = membership {
                    w.put_meta(MEMBERSHIP, &enc(&m)?)?;
                }
                Ok(out)
            })
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        match applied {
            Ok(out) => {
                if matches!(durability, Durability::Immediate) {
                    self.durable.advance(last);
                }
                Ok(out)
            }
            Err(e) => {
                // openraft stops the state machine on this error.
                self.durable.fail();
                Err(sm_err(e))
            }
        }
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    /// A fresh file, already unlinked: a transfer cut off leaves nothing behind.
    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, RaftStorageError> {
        let path = self.snapshots.temp("receiving");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|f| fs::remove_file(&path).map(|()| f))
            .map_err(|e| {
                let e = StoreError::io("create", &path)(e);
                StorageIOError::write_snapshot(None, AnyError::new(&e))
            })?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    /// Imports the stream in one transaction while copying it to this member's own snapshot
    /// file; a damaged or short stream changes nothing.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), RaftStorageError> {
        let fail = |e: StoreError| -> RaftStorageError {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)).into()
        };
        let extra = [
            (APPLIED, enc(&meta.last_log_id).map_err(fail)?),
            (MEMBERSHIP, enc(&meta.last_membership).map_err(fail)?),
        ];
        let file = snapshot.into_std().await;
        let (mvcc, snapshots, id) = (
            self.mvcc.clone(),
            self.snapshots.clone(),
            meta.snapshot_id.clone(),
        );
        let stored = tokio::task::spawn_blocking(move || {
            snapshots.in_temp("installing", |tmp| {
                let mut file = file;
                file.seek(SeekFrom::Start(0)).map_err(|e| {
                    StoreError::Unavailable(format!("reading the received snapshot {id}: {e}"))
                })?;
                let mut stream = SnapshotReader::new(BufReader::new(file), id.clone())?;
                let written = StoreError::io("write", tmp);
                let mut copy = Some(
                    fs::File::create(tmp)
                        .map(BufWriter::new)
                        .and_then(SnapshotWriter::new)
                        .map_err(&written)?,
                );
                mvcc.import_from(&mut stream, &extra, |r| {
                    match (r, copy.as_mut()) {
                        (Some(r), Some(w)) => w.record(r),
                        // The whole stream is in: make the copy durable before the commit.
                        (None, Some(_)) => copy.take().map_or(Ok(()), |w| synced(w.finish()?)),
                        (_, None) => Ok(()),
                    }
                    .map_err(&written)
                })?;
                snapshots.keep(tmp, &id)
            })
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(|e| {
            // openraft stops the state machine on this error.
            self.durable.fail();
            fail(e)
        })?;
        self.durable.advance(meta.last_log_id);
        self.snapshots.set_current(StoredSnapshot {
            meta: meta.clone(),
            path: stored,
        });
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let current = self
            .snapshots
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(s) = current.as_ref() else {
            return Ok(None);
        };
        // Opened under the lock: a newer snapshot replaces the file only after this.
        let file = fs::File::open(&s.path).map_err(|e| {
            let e = StoreError::io("open", &s.path)(e);
            StorageIOError::read_snapshot(Some(s.meta.signature()), AnyError::new(&e))
        })?;
        Ok(Some(Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Syncs the state file first, so the log is never purged past what is on disk, then
    /// streams the store as of one read transaction into a new snapshot file.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let (mvcc, snapshots) = (self.mvcc.clone(), self.snapshots.clone());
        let stored = tokio::task::spawn_blocking(move || {
            snapshots.in_temp("building", |tmp| {
                let written = StoreError::io("write", tmp);
                let out = fs::File::create(tmp)
                    .map(BufWriter::new)
                    .map_err(&written)?;
                let (out, meta) = mvcc.export_to(out, &written)?;
                synced(out).map_err(&written)?;
                let (last_log_id, last_membership) = decode_applied(
                    meta.get(APPLIED).map(Vec::as_slice),
                    meta.get(MEMBERSHIP).map(Vec::as_slice),
                )?;
                let n = snapshots.seq.fetch_add(1, Ordering::Relaxed);
                let snapshot_id = match last_log_id {
                    Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
                    None => format!("empty-{n}"),
                };
                let path = snapshots.keep(tmp, &snapshot_id)?;
                Ok(StoredSnapshot {
                    meta: SnapshotMeta {
                        last_log_id,
                        last_membership,
                        snapshot_id,
                    },
                    path,
                })
            })
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
        // Everything the snapshot holds was synced to the state file before it was copied.
        self.durable.advance(stored.meta.last_log_id);
        let file = fs::File::open(&stored.path).map_err(|e| {
            let e = StoreError::io("open", &stored.path)(e);
            StorageIOError::read_snapshot(Some(stored.meta.signature()), AnyError::new(&e))
        })?;
        let meta = stored.meta.clone();
        self.snapshots.set_current(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

impl Snapshots {
    /// A new temporary file name in the directory.
    fn temp(&self, what: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{what}-{n}.tmp"))
    }

    /// Runs `f` with a new temporary file name; the file is removed if `f` fails (on success
    /// `f` has moved it into place with [`Snapshots::keep`]).
    fn in_temp<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Path) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tmp = self.temp(what);
        let done = f(&tmp);
        if done.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        done
    }

    /// Moves a finished, synced temporary file to the name of snapshot `id` (hex, so an id
    /// from a peer cannot name another path) and syncs the directory.
    fn keep(&self, tmp: &Path, id: &str) -> Result<PathBuf, StoreError> {
        let path = self.dir.join(format!("{}.snap", hex::encode(id)));
        fs::rename(tmp, &path).map_err(StoreError::io("rename", &path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(StoreError::io("sync", &self.dir))?;
        Ok(path)
    }

    /// Makes `new` current unless the current one is newer; the file that loses is removed
    /// (readers that opened it keep reading it).
    fn set_current(&self, new: StoredSnapshot) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let stale = match current.as_ref() {
            Some(c) if c.meta.last_log_id > new.meta.last_log_id => Some(new.path.clone()),
            _ => current.replace(new).map(|old| old.path),
        };
        if let Some(old) = stale.filter(|old| current.as_ref().is_none_or(|c| c.path != *old))
            && let Err(e) = fs::remove_file(&old)
        {
            tracing::warn!(path = %old.display(), error = %e, "removing a superseded snapshot");
        }
    }
}

/// What a snapshot file holds (from the meta records at its head), once the whole stream has
/// been read through and found whole (count and checksum).
fn check_file(path: &Path) -> Result<StoredSnapshot, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let file = fs::File::open(path).map_err(StoreError::io("open", path))?;
    let stream = SnapshotReader::new(BufReader::new(file), path.display().to_string())
        .map_err(|e| corrupt(e.to_string()))?;
    let (mut applied, mut membership) = (None, None);
    for r in stream {
        match r.map_err(|e| corrupt(e.to_string()))? {
            Record::Meta(k, v) if k == APPLIED => applied = Some(v),
            Record::Meta(k, v) if k == MEMBERSHIP => membership = Some(v),
            _ => {}
        }
    }
    let (last_log_id, last_membership) = decode_applied(applied.as_deref(), membership.as_deref())
        .map_err(|e| corrupt(e.to_string()))?;
    let id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| hex::decode(s).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| corrupt("file name is not a hex-encoded snapshot id".into()))?;
    Ok(StoredSnapshot {
        meta: SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id: id,
        },
        path: path.to_path_buf(),
    })
}

/// Flushes a snapshot file's buffer and syncs the file.
fn synced(out: BufWriter<fs::File>) -> std::io::Result<()> {
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

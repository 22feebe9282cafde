//! Durable Raft log on redb.
//!
//! Invariants:
//! - Entries, hard state and conf state of one Ready are written in ONE durable write transaction
//!   (`persist`), so a crash never leaves a hard state pointing past the log.
//! - Appending at index `i` first removes every entry at `>= i` (a new leader may overwrite an
//!   uncommitted suffix).
//! - The metadata (first/last index, hard and conf state) is mirrored in memory so the raft
//!   core's frequent `term`/`last_index` calls do not open transactions; entries are read from
//!   redb, except the newest few thousand, which raft reads right after appending them (to
//!   apply, to replicate): those come from an in-memory copy (`Recent`) that each persist
//!   updates under its lock, so neither a redb read nor a decryption is paid for them.
//!   raft-rs calls `Storage` through `&self`, hence the locks.
//! - Snapshots: each snapshot's data is its own file, `snapshots/snap-<term>-<index>` next to
//!   the database, written to a temporary name, synced, renamed and its directory synced; only
//!   then does the redb transaction that records its metadata name it (`snapshot_file`), and
//!   only after that commit is the previous file deleted. The metadata therefore always names a
//!   complete file holding the store at exactly the index it records: a crash before the commit
//!   leaves the old pair, after it the new one. On open, every other file in `snapshots/` (a
//!   snapshot whose commit never happened, a temporary) is deleted. A snapshot no newer than the
//!   current one is refused. (A log written before this layout names no file: its snapshot is
//!   the single `raft.snap`, used until the next snapshot replaces it.) Compaction keeps a tail of entries behind the snapshot, so a
//!   follower that lags a little catches up from the log rather than with a whole snapshot.
//!   `log_start` (the index just before the first stored entry) and the snapshot's index are
//!   therefore different numbers: `log_start <= snapshot index`.
//! - Modes: the log and the snapshots hold the cluster's secrets (the CA key, the join token
//!   secrets), so every file is created 0600 before anything is written to it (`raft.redb` too,
//!   before redb opens it) and the data dir is 0700 (see [`prepare_data_dir`]).
//! - At rest (opened with [`RedbStorage::open_encrypted`], as every controller is): each log
//!   entry's bytes and each snapshot file are a [`crypt`] record under this controller's data
//!   key, bound to the entry's index or the snapshot's term and index. Hard state, conf state
//!   and snapshot metadata stay clear (indexes and member ids, no secrets). Records without
//!   the magic are plaintext from before encryption: still read, and rewritten by
//!   [`RedbStorage::reencrypt`] (run at start and after every key rotation). Snapshot data in
//!   memory is plaintext.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::crypt::{self, Context, CryptError, DataKeys};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// redb's page cache for the raft log. redb's default is 1 GiB, and it keeps what was written
/// resident up to that: at 5,000 hosts / 150,000 tasks each controller's log grew to ~400 MB and
/// stayed in memory, most of a follower's RSS and a third of the leader's (issue 20; the target
/// is 1 GiB for the whole controller). The log is written once and read back rarely (a follower
/// catching up, from the recent entries kept in memory first, `RECENT_ENTRIES`); the kernel's
/// page cache serves those reads.
const DB_CACHE_BYTES: usize = 64 << 20;

/// Why the raft log or its snapshots could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StorageErr {
    /// redb failed.
    #[error("storage: redb: {0}")]
    Redb(String),
    /// A snapshot file could not be read or written (path, error).
    #[error("storage: snapshot file {0}: {1}")]
    SnapshotFile(PathBuf, std::io::Error),
    /// A record does not decode (which, why).
    #[error("storage: corrupt record {0}: {1}")]
    Corrupt(&'static str, String),
    /// The data dir could not be created or secured (path, error).
    #[error("storage: data dir {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    /// The log could not be opened (path, error).
    #[error("storage: open {0}: {1}")]
    Open(PathBuf, std::io::Error),
    /// A snapshot older than the one held.
    #[error("storage: snapshot at index {index} refused: the current snapshot is at {current}")]
    StaleSnapshot {
        /// The snapshot's index.
        index: u64,
        /// The held snapshot's index.
        current: u64,
    },
    /// A record does not decrypt, or the keys are unusable.
    #[error("storage: {0}")]
    Crypt(#[from] CryptError),
    /// An encrypted record, and no data keys to read it.
    #[error("storage: {0} is encrypted but this log was opened without data keys")]
    NoKeys(String),
}

/// Directory (next to the database) holding the snapshot files.
const SNAPSHOT_DIR: &str = "snapshots";
/// redb META key naming the current snapshot's file in [`SNAPSHOT_DIR`].
const SNAPSHOT_FILE_KEY: &str = "snapshot_file";

/// The file name of the snapshot with this metadata.
pub(crate) fn snapshot_file_name(md: &SnapshotMetadata) -> String {
    format!("snap-{}-{}", md.term, md.index)
}

/// Mode of every directory that holds controller state: the owner only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of every file that holds controller state.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Subdirectories of the data dir made private up front, so that whoever fills them later
/// (the admin credentials of a first controller, the registry's blobs) never has a moment in
/// which they are readable by others.
const PRIVATE_SUBDIRS: &[&str] = &["admin", "registry", "certs"];

/// Creates `dir` (and missing parents) with mode 0700, or tightens an existing one to 0700.
///
/// A looser existing directory is tightened with a warning rather than refused: data dirs made
/// by earlier versions were 0755, and refusing would turn an upgrade into an outage while the
/// fix (chmod) is one the controller can make itself. A path that exists and is not a directory
/// is refused.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("exists and is not a directory"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{mode:o}"),
            "tightening a directory others could read to 0700"
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))?;
    }
    Ok(())
}

/// Makes the controller's data dir and its state subdirectories private (0700), creating
/// them as needed. Called before anything is written into it.
pub fn prepare_data_dir(dir: &Path) -> Result<(), StorageErr> {
    private_dir(dir).map_err(|e| StorageErr::DataDir(dir.to_owned(), e))?;
    for sub in PRIVATE_SUBDIRS {
        let p = dir.join(sub);
        private_dir(&p).map_err(|e| StorageErr::DataDir(p.clone(), e))?;
    }
    Ok(())
}

/// Creates (or opens) `path` as a private file, tightening an existing looser one to 0600.
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PRIVATE_FILE_MODE)
        .open(path)?;
    if f.metadata()?.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
    }
    Ok(f)
}

macro_rules! redb_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageErr {
            fn from(e: $t) -> Self { StorageErr::Redb(e.to_string()) }
        }
    )*};
}
redb_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[derive(Default, Clone)]
struct Meta {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the entry just before the first stored one (0, 0 when nothing was
    /// ever compacted): raft's `first_index() - 1`.
    snapshot_index: u64,
    snapshot_term: u64,
    /// The latest snapshot's metadata (index 0 when there is none).
    snapshot: SnapshotMetadata,
    /// The file holding the latest snapshot's data.
    snapshot_file: Option<PathBuf>,
    last_index: u64,
    last_term: u64,
}

/// The raft log of one controller, on disk.
#[derive(Clone)]
pub struct RedbStorage {
    db: Arc<Database>,
    meta: Arc<RwLock<Meta>>,
    /// Where snapshot files live (`snapshots/` next to the database).
    snap_dir: PathBuf,
    /// The single snapshot file of logs written before snapshots were named by index.
    legacy_snap: PathBuf,
    /// Raft asked for a snapshot the latest one cannot serve (see [`raft::Storage::snapshot`]).
    snapshot_wanted: Arc<std::sync::atomic::AtomicBool>,
    /// The data keys records are sealed with (`None`: a plaintext log, for tests and benches).
    keys: Option<Arc<DataKeys>>,
    /// Held by whoever writes a snapshot file and the metadata naming it (a new snapshot, an
    /// installed one, a re-encryption), so two never interleave their file and metadata.
    snapshot_writer: Arc<std::sync::Mutex<()>>,
    /// The newest persisted entries, plaintext: raft reads what it just appended (to apply it,
    /// to send it to a follower, for its term) from here rather than from redb, decrypting.
    recent: Arc<std::sync::Mutex<Recent>>,
}

/// Entries kept in [`Recent`] at most, and their bytes at most.
const RECENT_ENTRIES: usize = 8192;
const RECENT_BYTES: usize = 16 << 20;

/// A contiguous run of the newest persisted entries (see [`RedbStorage::recent`]). Invariant:
/// every entry here is what redb holds at its index (updated under its lock with each
/// persist; cleared when a snapshot replaces the log).
#[derive(Default)]
struct Recent {
    entries: std::collections::VecDeque<Entry>,
    bytes: usize,
}

impl Recent {
    fn size(e: &Entry) -> usize {
        e.data.len() + e.context.len() + 32
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// After `es` (contiguous) were written: they replace every entry from their first index.
    fn append(&mut self, es: &[Entry]) {
        let Some(first) = es.first() else {
            return;
        };
        match (self.entries.front(), self.entries.back()) {
            (Some(f), Some(b)) if first.index > f.index && first.index <= b.index + 1 => {
                while self.entries.back().is_some_and(|e| e.index >= first.index) {
                    let e = self.entries.pop_back().expect("checked");
                    self.bytes -= Self::size(&e);
                }
            }
            _ => self.clear(),
        }
        for e in es {
            self.bytes += Self::size(e);
            self.entries.push_back(e.clone());
        }
        while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= Self::size(&e);
        }
    }

    /// Entries `low..high` if all are here.
    fn range(&self, low: u64, high: u64) -> Option<std::collections::vec_deque::Iter<'_, Entry>> {
        let first = self.entries.front()?.index;
        let last = self.entries.back()?.index;
        if low < first || high > last + 1 || low >= high {
            return None;
        }
        Some(
            self.entries
                .range((low - first) as usize..(high - first) as usize),
        )
    }
}

/// What one [`RedbStorage::reencrypt`] pass rewrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reencrypted {
    /// Log entries rewritten.
    pub entries: u64,
    /// Whether the snapshot was rewritten.
    pub snapshot: bool,
}

/// Entries re-encrypted per write transaction (each one holds off the Ready loop's writes).
const REENCRYPT_BATCH: usize = 512;

impl RedbStorage {
    /// Opens (or creates) the log at `path`. A fresh log is bootstrapped with `voters` as the
    /// initial configuration; an existing one keeps its own.
    pub fn open(path: &Path, voters: &[u64]) -> Result<Self, StorageErr> {
        Self::open_with(path, voters, None, None)
    }

    /// Like [`RedbStorage::open`], with every entry and snapshot sealed under `keys` (plaintext
    /// records from before are still read).
    pub fn open_encrypted(
        path: &Path,
        voters: &[u64],
        keys: Arc<DataKeys>,
    ) -> Result<Self, StorageErr> {
        Self::open_with(path, voters, Some(keys), None)
    }

    /// A new encrypted log whose first snapshot (index 1, term 1, `voters`) is `store` instead
    /// of the empty store: a cluster restored from a backup. Refused if the log exists.
    pub fn create_restored(
        path: &Path,
        voters: &[u64],
        keys: Arc<DataKeys>,
        store: &rudder_model::Store,
    ) -> Result<Self, StorageErr> {
        if path.exists() {
            return Err(StorageErr::Open(
                path.to_owned(),
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "restore needs a new raft log",
                ),
            ));
        }
        let mut snap = bootstrap_snapshot(voters);
        snap.data = rudder_model::snapshot::encode(store)
            .map_err(|e| StorageErr::Corrupt("restored store", e.to_string()))?
            .into();
        Self::open_with(path, voters, Some(keys), Some(snap))
    }

    fn open_with(
        path: &Path,
        voters: &[u64],
        keys: Option<Arc<DataKeys>>,
        initial: Option<Snapshot>,
    ) -> Result<Self, StorageErr> {
        // redb would create the file 0666 & umask: create it 0600 first (an empty file is a
        // new database to redb).
        drop(private_file(path).map_err(|e| StorageErr::Open(path.to_owned(), e))?);
        let db = redb::Builder::new()
            .set_cache_size(DB_CACHE_BYTES)
            .create(path)?;
        let snap_dir = path.parent().unwrap_or(Path::new(".")).join(SNAPSHOT_DIR);
        private_dir(&snap_dir).map_err(|e| StorageErr::SnapshotFile(snap_dir.clone(), e))?;
        let tx = db.begin_write()?;
        {
            tx.open_table(ENTRIES)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        let s = RedbStorage {
            db: Arc::new(db),
            meta: Default::default(),
            snap_dir: path.parent().unwrap_or(Path::new(".")).join(SNAPSHOT_DIR),
            legacy_snap: path.with_extension("snap"),
            snapshot_wanted: Default::default(),
            keys,
            snapshot_writer: Default::default(),
            recent: Default::default(),
        };
        s.load(voters, initial)?;
        Ok(s)
    }

    fn load(&self, voters: &[u64], initial: Option<Snapshot>) -> Result<(), StorageErr> {
        let tx = self.db.begin_read()?;
        let meta_t = tx.open_table(META)?;
        let entries = tx.open_table(ENTRIES)?;
        let mut m = Meta::default();
        let fresh = meta_t.get("conf_state")?.is_none();
        if let Some(v) = meta_t.get("hard_state")? {
            m.hard_state = HardState::parse_from_bytes(v.value())
                .map_err(|e| StorageErr::Corrupt("hard_state", e.to_string()))?;
        }
        if let Some(v) = meta_t.get("conf_state")? {
            m.conf_state = ConfState::parse_from_bytes(v.value())
                .map_err(|e| StorageErr::Corrupt("conf_state", e.to_string()))?;
        }
        if let Some(v) = meta_t.get("snapshot")? {
            let b = v.value();
            if b.len() == 16 {
                m.snapshot_index = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
                m.snapshot_term = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
            }
        }
        if let Some(v) = meta_t.get("snapshot_meta")? {
            m.snapshot = SnapshotMetadata::parse_from_bytes(v.value())
                .map_err(|e| StorageErr::Corrupt("snapshot_meta", e.to_string()))?;
        }
        if let Some(v) = meta_t.get(SNAPSHOT_FILE_KEY)? {
            let name = std::str::from_utf8(v.value())
                .ok()
                .filter(|n| !n.is_empty() && !n.contains('/') && !n.starts_with('.'))
                .ok_or_else(|| {
                    StorageErr::Corrupt(SNAPSHOT_FILE_KEY, format!("{:?}", v.value()))
                })?;
            m.snapshot_file = Some(self.snap_dir.join(name));
        } else if m.snapshot.index > 0 {
            m.snapshot_file = Some(self.legacy_snap.clone());
        }
        m.last_index = m.snapshot_index;
        m.last_term = m.snapshot_term;
        if let Some((k, v)) = entries.last()? {
            let e = self.decode_entry(k.value(), v.value())?;
            m.last_index = k.value();
            m.last_term = e.term;
        }
        drop((meta_t, entries, tx));
        self.remove_orphan_snapshots(m.snapshot_file.as_deref())?;
        *self.meta.write().expect("meta lock") = m;
        if fresh && !voters.is_empty() {
            // Bootstrap: the initial configuration is a snapshot at index 1 (term 1) of the
            // empty store rather than state only this log knows, so every member that joins
            // later starts from the same point: raft sends it this snapshot first.
            self.install_snapshot(&initial.unwrap_or_else(|| bootstrap_snapshot(voters)))?;
        } else if fresh {
            // A joining member: empty until the leader sends a snapshot.
            self.persist(&[], None, Some(&ConfState::default()))?;
        }
        Ok(())
    }

    /// Writes `hard_state` (a commit index moved, nothing else) without waiting for the disk:
    /// redb's non-durable commit, made durable by the next durable one (every append is). A
    /// crash may lose it; raft learns the commit index again from the leader, and the latest
    /// snapshot (recorded durably) never lies beyond a commit index written before it.
    pub fn persist_commit(&self, hard_state: &HardState) -> Result<(), StorageErr> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(redb::Durability::None)
            .map_err(|e| StorageErr::Redb(e.to_string()))?;
        {
            let mut m = tx.open_table(META)?;
            let b = hard_state
                .write_to_bytes()
                .map_err(|err| StorageErr::Corrupt("hard_state", err.to_string()))?;
            m.insert("hard_state", b.as_slice())?;
        }
        tx.commit()?;
        self.meta.write().expect("meta lock").hard_state = hard_state.clone();
        Ok(())
    }

    /// Writes one Ready's worth of state in a single durable transaction.
    pub fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        conf_state: Option<&ConfState>,
    ) -> Result<(), StorageErr> {
        // Held until `recent` matches redb again: no reader sees an overwritten entry there.
        let mut recent = self.recent.lock().expect("recent lock");
        if let Some(first) = entries.first() {
            // Dropped now, re-added after the commit.
            if recent
                .entries
                .front()
                .is_some_and(|e| e.index >= first.index)
            {
                recent.clear();
            }
            while recent
                .entries
                .back()
                .is_some_and(|e| e.index >= first.index)
            {
                let e = recent.entries.pop_back().expect("checked");
                recent.bytes -= Recent::size(&e);
            }
        }
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(ENTRIES)?;
            if let Some(first) = entries.first() {
                let last = self.meta.read().expect("meta lock").last_index;
                for i in first.index..=last {
                    t.remove(i)?;
                }
                for e in entries {
                    let bytes = self.encode_entry(e)?;
                    t.insert(e.index, bytes.as_slice())?;
                }
            }
            let mut m = tx.open_table(META)?;
            if let Some(hs) = hard_state {
                let b = hs
                    .write_to_bytes()
                    .map_err(|err| StorageErr::Corrupt("hard_state", err.to_string()))?;
                m.insert("hard_state", b.as_slice())?;
            }
            if let Some(cs) = conf_state {
                let b = cs
                    .write_to_bytes()
                    .map_err(|err| StorageErr::Corrupt("conf_state", err.to_string()))?;
                m.insert("conf_state", b.as_slice())?;
            }
        }
        tx.commit()?;
        recent.append(entries);
        drop(recent);
        let mut m = self.meta.write().expect("meta lock");
        if let Some(last) = entries.last() {
            m.last_index = last.index;
            m.last_term = last.term;
        }
        if let Some(hs) = hard_state {
            m.hard_state = hs.clone();
        }
        if let Some(cs) = conf_state {
            m.conf_state = cs.clone();
        }
        Ok(())
    }

    /// The persisted term, vote and commit index.
    pub fn hard_state(&self) -> HardState {
        self.meta.read().expect("meta lock").hard_state.clone()
    }

    /// Whether raft asked for a snapshot the latest one could not serve (and clears the flag).
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// The latest snapshot, data included (`None` when none was ever taken or installed).
    pub fn latest_snapshot(&self) -> Result<Option<Snapshot>, StorageErr> {
        let m = self.meta.read().expect("meta lock");
        let (meta, Some(file)) = (m.snapshot.clone(), m.snapshot_file.clone()) else {
            return Ok(None);
        };
        if meta.index == 0 {
            return Ok(None);
        }
        // Read under the lock: a new snapshot deletes this file only after taking it.
        let raw = std::fs::read(&file).map_err(|e| StorageErr::SnapshotFile(file.clone(), e))?;
        drop(m);
        let data = self.open_record(snapshot_context(&meta), raw)?;
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        snap.data = data.into();
        Ok(Some(snap))
    }

    /// Deletes every snapshot file but `keep`: files of snapshots whose metadata never
    /// committed, temporaries, and the pre-index `raft.snap` once a named file replaced it.
    fn remove_orphan_snapshots(&self, keep: Option<&Path>) -> Result<(), StorageErr> {
        let list = |e| StorageErr::SnapshotFile(self.snap_dir.clone(), e);
        let mut orphans = Vec::new();
        for entry in std::fs::read_dir(&self.snap_dir).map_err(list)? {
            let p = entry.map_err(list)?.path();
            if Some(p.as_path()) != keep {
                orphans.push(p);
            }
        }
        if keep != Some(self.legacy_snap.as_path()) {
            orphans.push(self.legacy_snap.clone());
        }
        orphans.push(self.legacy_snap.with_extension("snap.tmp"));
        for p in orphans {
            match std::fs::remove_file(&p) {
                Ok(()) => tracing::info!(file = %p.display(), "removed an orphan snapshot file"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageErr::SnapshotFile(p, e)),
            }
        }
        if let Some(keep) = keep {
            // Logs from before 0600 snapshots.
            if let Ok(meta) = std::fs::metadata(keep) {
                if meta.permissions().mode() & 0o077 != 0 {
                    std::fs::set_permissions(
                        keep,
                        std::fs::Permissions::from_mode(PRIVATE_FILE_MODE),
                    )
                    .map_err(|e| StorageErr::SnapshotFile(keep.to_owned(), e))?;
                }
            }
        }
        Ok(())
    }

    /// Writes a snapshot's data to its own file, durably (temporary, fsync, rename, fsync of
    /// the directory), and returns the file's name. Nothing refers to it until the metadata
    /// commit that follows.
    fn write_snapshot_file(
        &self,
        md: &SnapshotMetadata,
        data: &[u8],
    ) -> Result<String, StorageErr> {
        let name = snapshot_file_name(md);
        let path = self.snap_dir.join(&name);
        let tmp = self.snap_dir.join(format!("{name}.tmp"));
        let io = |e| StorageErr::SnapshotFile(tmp.clone(), e);
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&tmp)
            .map_err(io)?;
        let sealed;
        let data = match &self.keys {
            Some(k) => {
                sealed = k.seal(snapshot_context(md), data)?;
                &sealed[..]
            }
            None => data,
        };
        f.write_all(data).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| StorageErr::SnapshotFile(path.clone(), e))?;
        std::fs::File::open(&self.snap_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StorageErr::SnapshotFile(self.snap_dir.clone(), e))?;
        Ok(name)
    }

    /// After the metadata naming `name` committed: remembers it and deletes the previous file.
    fn snapshot_committed(&self, m: &mut Meta, name: &str) {
        let new = self.snap_dir.join(name);
        if let Some(old) = m.snapshot_file.replace(new.clone()) {
            if old != new {
                if let Err(e) = std::fs::remove_file(&old) {
                    // Removed again as an orphan on the next start.
                    tracing::warn!(file = %old.display(), %e, "previous snapshot file not removed");
                }
            }
        }
    }

    /// An entry's bytes as stored: sealed when the log has keys.
    fn encode_entry(&self, e: &Entry) -> Result<Vec<u8>, StorageErr> {
        let bytes = e
            .write_to_bytes()
            .map_err(|err| StorageErr::Corrupt("entry", err.to_string()))?;
        match &self.keys {
            Some(k) => Ok(k.seal(Context::Entry(e.index), &bytes)?),
            None => Ok(bytes),
        }
    }

    /// The entry stored at `index` (sealed, or plaintext from before encryption).
    fn decode_entry(&self, index: u64, raw: &[u8]) -> Result<Entry, StorageErr> {
        let parse = |b: &[u8]| {
            Entry::parse_from_bytes(b)
                .map_err(|e| StorageErr::Corrupt("entry", format!("at index {index}: {e}")))
        };
        if crypt::record_key_id(raw).is_none() {
            return parse(raw);
        }
        let Some(k) = &self.keys else {
            return Err(StorageErr::NoKeys(Context::Entry(index).to_string()));
        };
        parse(&k.open(Context::Entry(index), raw)?)
    }

    /// A record's plaintext (plaintext records from before encryption are returned as read).
    fn open_record(&self, ctx: Context, raw: Vec<u8>) -> Result<Vec<u8>, StorageErr> {
        if crypt::record_key_id(&raw).is_none() {
            return Ok(raw);
        }
        match &self.keys {
            Some(k) => Ok(k.open_owned(ctx, raw)?),
            None => Err(StorageErr::NoKeys(ctx.to_string())),
        }
    }

    /// Rewrites every entry and the snapshot that is not under the current data key (plaintext
    /// from before encryption, or an older key after a rotation). Entries go in batches, each
    /// in one write transaction (so a concurrent append or truncation is never undone); the
    /// snapshot is rewritten under the metadata lock, as a new snapshot would be. Records
    /// written with an old key by a Ready that raced the rotation are found by
    /// [`RedbStorage::stale_records`]; the caller repeats until there are none.
    pub fn reencrypt(&self) -> Result<Reencrypted, StorageErr> {
        let mut done = Reencrypted::default();
        let Some(keys) = self.keys.clone() else {
            return Ok(done);
        };
        let mut next = 0u64;
        loop {
            let tx = self.db.begin_write()?;
            let mut last = None;
            let mut rewritten = 0u64;
            {
                let mut t = tx.open_table(ENTRIES)?;
                let batch: Vec<(u64, Vec<u8>)> = t
                    .range(next..)?
                    .take(REENCRYPT_BATCH)
                    .map(|item| item.map(|(k, v)| (k.value(), v.value().to_vec())))
                    .collect::<Result<_, _>>()?;
                for (index, raw) in batch {
                    last = Some(index);
                    if keys.is_stale(&raw) {
                        let e = self.decode_entry(index, &raw)?;
                        t.insert(index, self.encode_entry(&e)?.as_slice())?;
                        rewritten += 1;
                    }
                }
            }
            if rewritten > 0 {
                tx.commit()?;
            } else {
                tx.abort()?;
            }
            done.entries += rewritten;
            match last {
                Some(i) => next = i + 1,
                None => break,
            }
        }
        let _writer = self.snapshot_writer.lock().expect("snapshot writer lock");
        let mut m = self.meta.write().expect("meta lock");
        if let (Some(file), md) = (m.snapshot_file.clone(), m.snapshot.clone()) {
            if md.index > 0 {
                let raw =
                    std::fs::read(&file).map_err(|e| StorageErr::SnapshotFile(file.clone(), e))?;
                if keys.is_stale(&raw) {
                    let data = self.open_record(snapshot_context(&md), raw)?;
                    // Replaces the file of the same name atomically (or a legacy `raft.snap`
                    // with a named file, which the metadata then names).
                    let name = self.write_snapshot_file(&md, &data)?;
                    let tx = self.db.begin_write()?;
                    tx.open_table(META)?
                        .insert(SNAPSHOT_FILE_KEY, name.as_bytes())?;
                    tx.commit()?;
                    self.snapshot_committed(&mut m, &name);
                    done.snapshot = true;
                }
            }
        }
        Ok(done)
    }

    /// How many records (entries and the snapshot) are not under the current data key.
    pub fn stale_records(&self) -> Result<u64, StorageErr> {
        let Some(keys) = &self.keys else {
            return Ok(0);
        };
        let mut n = 0;
        {
            let tx = self.db.begin_read()?;
            let t = tx.open_table(ENTRIES)?;
            for item in t.iter()? {
                let (_, v) = item?;
                n += u64::from(keys.is_stale(v.value()));
            }
        }
        let m = self.meta.read().expect("meta lock");
        if let (Some(file), true) = (&m.snapshot_file, m.snapshot.index > 0) {
            let raw = std::fs::read(file).map_err(|e| StorageErr::SnapshotFile(file.clone(), e))?;
            n += u64::from(keys.is_stale(&raw));
        }
        Ok(n)
    }

    /// Refuses a snapshot no newer than the current one (it would replace newer data).
    fn check_newer(&self, md: &SnapshotMetadata) -> Result<(), StorageErr> {
        let current = self.meta.read().expect("meta lock").snapshot.index;
        if md.index <= current {
            return Err(StorageErr::StaleSnapshot {
                index: md.index,
                current,
            });
        }
        Ok(())
    }

    /// Records a snapshot this node took of its own applied state and drops the entries before
    /// `compact_to` (keeping a tail behind the snapshot for slightly lagging followers).
    pub fn save_snapshot(&self, snap: &Snapshot, compact_to: u64) -> Result<(), StorageErr> {
        let _writer = self.snapshot_writer.lock().expect("snapshot writer lock");
        let md = snap.get_metadata();
        self.check_newer(md)?;
        let name = self.write_snapshot_file(md, &snap.data)?;
        let (start, last) = {
            let m = self.meta.read().expect("meta lock");
            (m.snapshot_index, m.last_index)
        };
        let compact_to = compact_to.min(md.index).min(last);
        let new_start = if compact_to > start + 1 {
            compact_to - 1
        } else {
            start
        };
        let new_start_term = if new_start == start {
            self.meta.read().expect("meta lock").snapshot_term
        } else {
            raft::Storage::term(self, new_start)
                .map_err(|e| StorageErr::Corrupt("compaction point", e.to_string()))?
        };
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(ENTRIES)?;
            for i in start + 1..=new_start {
                t.remove(i)?;
            }
            let mut m = tx.open_table(META)?;
            let b = md
                .write_to_bytes()
                .map_err(|e| StorageErr::Corrupt("snapshot_meta", e.to_string()))?;
            m.insert("snapshot_meta", b.as_slice())?;
            let mut pos = new_start.to_le_bytes().to_vec();
            pos.extend_from_slice(&new_start_term.to_le_bytes());
            m.insert("snapshot", pos.as_slice())?;
            m.insert(SNAPSHOT_FILE_KEY, name.as_bytes())?;
        }
        tx.commit()?;
        let mut m = self.meta.write().expect("meta lock");
        self.snapshot_committed(&mut m, &name);
        m.snapshot = md.clone();
        m.snapshot_index = new_start;
        m.snapshot_term = new_start_term;
        Ok(())
    }

    /// Installs a snapshot received from the leader: it replaces the whole log, and the
    /// snapshot's conf state and index become this node's.
    pub fn install_snapshot(&self, snap: &Snapshot) -> Result<(), StorageErr> {
        let _writer = self.snapshot_writer.lock().expect("snapshot writer lock");
        // The whole log goes.
        self.recent.lock().expect("recent lock").clear();
        let md = snap.get_metadata();
        self.check_newer(md)?;
        let name = self.write_snapshot_file(md, &snap.data)?;
        let (last, mut hs) = {
            let m = self.meta.read().expect("meta lock");
            (m.last_index, m.hard_state.clone())
        };
        hs.commit = hs.commit.max(md.index);
        hs.term = hs.term.max(md.term);
        let start = self.meta.read().expect("meta lock").snapshot_index;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(ENTRIES)?;
            for i in start + 1..=last {
                t.remove(i)?;
            }
            let mut m = tx.open_table(META)?;
            let enc = |what: &'static str, r: protobuf::ProtobufResult<Vec<u8>>| {
                r.map_err(|e| StorageErr::Corrupt(what, e.to_string()))
            };
            m.insert(
                "snapshot_meta",
                enc("snapshot_meta", md.write_to_bytes())?.as_slice(),
            )?;
            m.insert(
                "conf_state",
                enc("conf_state", md.get_conf_state().write_to_bytes())?.as_slice(),
            )?;
            m.insert(
                "hard_state",
                enc("hard_state", hs.write_to_bytes())?.as_slice(),
            )?;
            let mut pos = md.index.to_le_bytes().to_vec();
            pos.extend_from_slice(&md.term.to_le_bytes());
            m.insert("snapshot", pos.as_slice())?;
            m.insert(SNAPSHOT_FILE_KEY, name.as_bytes())?;
        }
        tx.commit()?;
        let mut m = self.meta.write().expect("meta lock");
        self.snapshot_committed(&mut m, &name);
        m.snapshot = md.clone();
        m.snapshot_index = md.index;
        m.snapshot_term = md.term;
        m.last_index = md.index;
        m.last_term = md.term;
        m.conf_state = md.get_conf_state().clone();
        m.hard_state = hs;
        Ok(())
    }
}

/// Where a snapshot's record lives, for its encryption.
fn snapshot_context(md: &SnapshotMetadata) -> Context {
    Context::Snapshot {
        term: md.term,
        index: md.index,
    }
}

/// Whether `snap` can bring member `to` up to `request_index`. A member added after the snapshot
/// was taken is not in its conf state, and raft refuses to install such a snapshot: the node
/// must take a fresh one (the storage then reports `SnapshotTemporarilyUnavailable` and raft
/// asks again on a later probe).
pub fn snapshot_serves(snap: &Snapshot, request_index: u64, to: u64) -> bool {
    let md = snap.get_metadata();
    let cs = md.get_conf_state();
    md.index >= request_index && (cs.voters.contains(&to) || cs.learners.contains(&to))
}

/// The first snapshot of a new cluster: the empty store at index 1, term 1, with `voters`.
pub fn bootstrap_snapshot(voters: &[u64]) -> Snapshot {
    let mut snap = Snapshot {
        data: rudder_model::snapshot::encode(&rudder_model::Store::default())
            .expect("the store serializes")
            .into(),
        ..Default::default()
    };
    let md = snap.mut_metadata();
    md.index = 1;
    md.term = 1;
    md.mut_conf_state().voters = voters.to_vec();
    snap
}

fn store_err(e: StorageErr) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl raft::Storage for RedbStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let m = self.meta.read().expect("meta lock");
        Ok(RaftState::new(m.hard_state.clone(), m.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().unwrap_or(u64::MAX);
        {
            let m = self.meta.read().expect("meta lock");
            if low <= m.snapshot_index {
                return Err(raft::Error::Store(StorageError::Compacted));
            }
            assert!(
                high <= m.last_index + 1,
                "entries({low}, {high}) past last index {}",
                m.last_index
            );
        }
        if let Some(run) = self.recent.lock().expect("recent lock").range(low, high) {
            let mut out = Vec::new();
            let mut size = 0u64;
            for e in run {
                size += u64::from(e.compute_size());
                if !out.is_empty() && size > max_size {
                    break;
                }
                out.push(e.clone());
            }
            return Ok(out);
        }
        let read = || -> Result<Vec<Entry>, StorageErr> {
            let tx = self.db.begin_read()?;
            let t = tx.open_table(ENTRIES)?;
            let mut out = Vec::new();
            let mut size = 0u64;
            for item in t.range(low..high)? {
                let (k, v) = item?;
                let bytes = v.value();
                size += bytes.len() as u64;
                if !out.is_empty() && size > max_size {
                    break;
                }
                out.push(self.decode_entry(k.value(), bytes)?);
            }
            Ok(out)
        };
        let out = read().map_err(store_err)?;
        if out.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let m = self.meta.read().expect("meta lock");
        if idx == m.snapshot_index {
            return Ok(m.snapshot_term);
        }
        if idx < m.snapshot_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > m.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if idx == m.last_index {
            return Ok(m.last_term);
        }
        drop(m);
        if let Some(mut run) = self.recent.lock().expect("recent lock").range(idx, idx + 1) {
            return Ok(run.next().expect("one entry").term);
        }
        let read = || -> Result<Option<u64>, StorageErr> {
            let tx = self.db.begin_read()?;
            let t = tx.open_table(ENTRIES)?;
            let v = t.get(idx)?;
            match v {
                Some(v) => Ok(Some(self.decode_entry(idx, v.value())?.term)),
                None => Ok(None),
            }
        };
        read()
            .map_err(store_err)?
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.meta.read().expect("meta lock").snapshot_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.meta.read().expect("meta lock").last_index)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        match self.latest_snapshot() {
            Ok(Some(s)) if snapshot_serves(&s, request_index, to) => Ok(s),
            Ok(_) => {
                self.snapshot_wanted
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Err(raft::Error::Store(
                    StorageError::SnapshotTemporarilyUnavailable,
                ))
            }
            Err(e) => Err(store_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn survives_reopen_and_truncates_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        {
            let s = RedbStorage::open(&path, &[1]).unwrap();
            assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1]);
            // Bootstrapped from a snapshot at index 1.
            assert_eq!(s.first_index().unwrap(), 2);
            assert_eq!(s.term(1).unwrap(), 1);
            let hs = HardState {
                term: 2,
                commit: 3,
                ..Default::default()
            };
            s.persist(
                &[entry(2, 1, b"a"), entry(3, 2, b"b"), entry(4, 2, b"c")],
                Some(&hs),
                None,
            )
            .unwrap();
            // A new leader overwrites index 4 onwards.
            s.persist(&[entry(4, 3, b"x")], None, None).unwrap();
            assert_eq!(s.last_index().unwrap(), 4);
            assert_eq!(s.term(4).unwrap(), 3);
        }
        let s = RedbStorage::open(&path, &[7]).unwrap();
        let st = s.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1], "existing conf state kept");
        assert_eq!(st.hard_state.commit, 3);
        assert_eq!(s.first_index().unwrap(), 2);
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(3).unwrap(), 2);
        let es = s
            .entries(2, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        let data: Vec<&[u8]> = es.iter().map(|e| &e.data[..]).collect();
        assert_eq!(data, [b"a", b"b", b"x"]);
        let one = s.entries(2, 5, 1, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(one.len(), 1, "max_size still returns one entry");
    }

    /// A commit index written without waiting for the disk is read back at once, and kept
    /// across a restart once a durable write followed it (every append is one).
    #[test]
    fn a_commit_index_written_lazily_is_kept_by_the_next_durable_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        {
            let s = RedbStorage::open(&path, &[1]).unwrap();
            let mut hs = HardState {
                term: 2,
                vote: 1,
                commit: 1,
                ..Default::default()
            };
            s.persist(&[entry(2, 2, b"a"), entry(3, 2, b"b")], Some(&hs), None)
                .unwrap();
            hs.commit = 3;
            s.persist_commit(&hs).unwrap();
            assert_eq!(s.hard_state(), hs);
            assert_eq!(s.initial_state().unwrap().hard_state, hs);
            s.persist(&[entry(4, 2, b"c")], None, None).unwrap();
        }
        let s = RedbStorage::open(&path, &[1]).unwrap();
        let hs = s.initial_state().unwrap().hard_state;
        assert_eq!((hs.term, hs.vote, hs.commit), (2, 1, 3));
        assert_eq!(s.last_index().unwrap(), 4);
    }

    /// Every file and directory under `dir` (itself included) with its mode.
    fn modes(dir: &Path) -> Vec<(PathBuf, u32)> {
        let mut out = vec![(
            dir.to_owned(),
            std::fs::metadata(dir).unwrap().permissions().mode() & 0o777,
        )];
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(modes(&p));
            } else {
                let m = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                out.push((p, m));
            }
        }
        out
    }

    #[tokio::test]
    async fn nothing_under_the_data_dir_is_readable_by_others() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        // A data dir left 0755 by an earlier version, with a 0644 log in it.
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_data_dir(&data).unwrap();
        let path = data.join("raft.redb");
        {
            let s = RedbStorage::open(&path, &[1]).unwrap();
            let es: Vec<Entry> = (2..=10).map(|i| entry(i, 1, b"e")).collect();
            s.persist(&es, None, None).unwrap();
            s.save_snapshot(&snapshot_at(8, 1, &[1], b"secrets"), 5)
                .unwrap();
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = RedbStorage::open(&path, &[1]).unwrap();
        s.install_snapshot(&snapshot_at(20, 2, &[1], b"more secrets"))
            .unwrap();
        let blobs = crate::registry::BlobStore::open(data.join("registry")).unwrap();
        blobs.put_bytes(b"layer").await.unwrap();
        blobs.start_upload("r").await.unwrap();
        let all = modes(&data);
        assert!(all.len() >= 8, "{all:?}");
        for (p, mode) in all {
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        }
    }

    /// A crash after a new snapshot file was renamed into place but before the metadata
    /// naming it committed: the restart keeps the old snapshot with its own index, and the
    /// new file is removed as an orphan.
    #[test]
    fn a_crash_before_the_snapshot_metadata_commit_keeps_the_old_pair() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        {
            let s = RedbStorage::open(&path, &[1]).unwrap();
            let es: Vec<Entry> = (2..=100).map(|i| entry(i, 1, b"e")).collect();
            s.persist(&es, None, None).unwrap();
            s.save_snapshot(&snapshot_at(80, 1, &[1], b"store@80"), 50)
                .unwrap();
            // The first half of saving a snapshot at 95, then the crash.
            let newer = snapshot_at(95, 1, &[1], b"store@95");
            s.write_snapshot_file(newer.get_metadata(), &newer.data)
                .unwrap();
        }
        let s = RedbStorage::open(&path, &[1]).unwrap();
        let snap = s.latest_snapshot().unwrap().unwrap();
        assert_eq!(snap.get_metadata().index, 80);
        assert_eq!(&snap.data[..], b"store@80");
        let files: Vec<String> = std::fs::read_dir(dir.path().join(SNAPSHOT_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, ["snap-1-80"], "the orphan is gone");
        // The next snapshot replaces the file; the old one goes once the metadata names it.
        s.save_snapshot(&snapshot_at(95, 1, &[1], b"store@95"), 60)
            .unwrap();
        let files: Vec<String> = std::fs::read_dir(dir.path().join(SNAPSHOT_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, ["snap-1-95"]);
        // An older snapshot (one serialised before a newer one was installed) is refused.
        let err = s
            .save_snapshot(&snapshot_at(90, 1, &[1], b"store@90"), 60)
            .unwrap_err();
        assert!(
            matches!(
                err,
                StorageErr::StaleSnapshot {
                    index: 90,
                    current: 95
                }
            ),
            "{err}"
        );
        drop(s);
        let s = RedbStorage::open(&path, &[1]).unwrap();
        assert_eq!(&s.latest_snapshot().unwrap().unwrap().data[..], b"store@95");
    }

    /// A log written before snapshots were named by index keeps using `raft.snap` until the
    /// next snapshot, which replaces (and removes) it.
    #[test]
    fn a_legacy_snapshot_file_is_read_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        {
            let s = RedbStorage::open(&path, &[1]).unwrap();
            let es: Vec<Entry> = (2..=100).map(|i| entry(i, 1, b"e")).collect();
            s.persist(&es, None, None).unwrap();
            s.save_snapshot(&snapshot_at(80, 1, &[1], b"store@80"), 50)
                .unwrap();
            // What the old layout looked like: no file name in the metadata, one raft.snap.
            let tx = s.db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .remove(SNAPSHOT_FILE_KEY)
                .unwrap();
            tx.commit().unwrap();
        }
        std::fs::rename(
            dir.path().join(SNAPSHOT_DIR).join("snap-1-80"),
            dir.path().join("raft.snap"),
        )
        .unwrap();
        let s = RedbStorage::open(&path, &[1]).unwrap();
        assert_eq!(&s.latest_snapshot().unwrap().unwrap().data[..], b"store@80");
        s.save_snapshot(&snapshot_at(90, 1, &[1], b"store@90"), 60)
            .unwrap();
        assert!(!dir.path().join("raft.snap").exists());
        drop(s);
        let s = RedbStorage::open(&path, &[1]).unwrap();
        assert_eq!(&s.latest_snapshot().unwrap().unwrap().data[..], b"store@90");
    }

    #[test]
    fn a_file_in_place_of_the_data_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::write(&data, b"").unwrap();
        let err = prepare_data_dir(&data).unwrap_err();
        assert!(err.to_string().starts_with("storage: data dir"), "{err}");
        // A symlink to a directory is a directory (e.g. /var/lib/rudder on another disk).
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        prepare_data_dir(&link).unwrap();
        assert_eq!(
            std::fs::metadata(&real).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    /// Whether `needle` occurs anywhere in the files under `dir`.
    fn found_under(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        let mut hits = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                hits.extend(found_under(&p, needle));
            } else if std::fs::read(&p)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                hits.push(p);
            }
        }
        hits
    }

    fn keys_in(dir: &Path) -> Arc<DataKeys> {
        Arc::new(DataKeys::load_or_create(dir).unwrap())
    }

    #[test]
    fn an_encrypted_log_holds_no_plaintext_and_reopens() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, certs) = (tmp.path().join("data"), tmp.path().join("certs"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&certs).unwrap();
        let path = data.join("raft.redb");
        let marker = b"MARKER-7f3a9c1e-secret";
        {
            let s = RedbStorage::open_encrypted(&path, &[1], keys_in(&certs)).unwrap();
            let es: Vec<Entry> = (2..=100).map(|i| entry(i, 1, marker)).collect();
            s.persist(&es, None, None).unwrap();
            s.save_snapshot(&snapshot_at(80, 1, &[1], marker), 50)
                .unwrap();
        }
        assert_eq!(found_under(&data, marker), Vec::<PathBuf>::new());
        let s = RedbStorage::open_encrypted(&path, &[1], keys_in(&certs)).unwrap();
        assert_eq!(s.last_index().unwrap(), 100);
        let es = s
            .entries(60, 101, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(es.len(), 41);
        assert!(es.iter().all(|e| &e.data[..] == marker));
        assert_eq!(&s.latest_snapshot().unwrap().unwrap().data[..], marker);
        assert_eq!(s.stale_records().unwrap(), 0);
        // Opened without the keys, the log refuses rather than misreads.
        drop(s);
        let err = RedbStorage::open(&path, &[1]).err().unwrap();
        assert!(err.to_string().contains("raft log entry 100"), "{err}");
        // With another controller's key, the error names the record.
        let other = tmp.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        let err = RedbStorage::open_encrypted(&path, &[1], keys_in(&other))
            .err()
            .unwrap();
        assert!(err.to_string().contains("raft log entry 100"), "{err}");
    }

    /// The in-memory run of recent entries always agrees with redb: through appends,
    /// overwrites by a new leader, gaps, compaction and an installed snapshot.
    #[test]
    fn recent_entries_agree_with_the_log() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("raft.redb");
        let s = RedbStorage::open_encrypted(&path, &[1], Arc::new(DataKeys::ephemeral().unwrap()))
            .unwrap();
        let check = |s: &RedbStorage| {
            let (first, last) = (s.first_index().unwrap(), s.last_index().unwrap());
            let from_cache = s
                .entries(first, last + 1, None, GetEntriesContext::empty(false))
                .unwrap();
            // What a restarted controller would read.
            let cold = {
                let tx = s.db.begin_read().unwrap();
                let t = tx.open_table(ENTRIES).unwrap();
                t.range(first..=last)
                    .unwrap()
                    .map(|i| {
                        let (k, v) = i.unwrap();
                        s.decode_entry(k.value(), v.value()).unwrap()
                    })
                    .collect::<Vec<_>>()
            };
            assert_eq!(from_cache, cold);
            for e in &cold {
                assert_eq!(s.term(e.index).unwrap(), e.term);
            }
        };
        let es: Vec<Entry> = (2..=50).map(|i| entry(i, 1, b"a")).collect();
        s.persist(&es, None, None).unwrap();
        check(&s);
        // A new leader overwrites from 40.
        let es: Vec<Entry> = (40..=45).map(|i| entry(i, 2, b"b")).collect();
        s.persist(&es, None, None).unwrap();
        check(&s);
        assert_eq!(s.term(44).unwrap(), 2);
        // And from 2, the first entry in memory.
        s.persist(&[entry(2, 3, b"c")], None, None).unwrap();
        check(&s);
        let es: Vec<Entry> = (3..=(RECENT_ENTRIES as u64 + 100))
            .map(|i| entry(i, 3, b"d"))
            .collect();
        s.persist(&es, None, None).unwrap();
        check(&s);
        s.save_snapshot(&snapshot_at(5000, 3, &[1], b"s"), 4000)
            .unwrap();
        check(&s);
        s.install_snapshot(&snapshot_at(20000, 4, &[1], b"t"))
            .unwrap();
        assert!(s.recent.lock().unwrap().entries.is_empty());
        s.persist(&[entry(20001, 4, b"e")], None, None).unwrap();
        check(&s);
    }

    #[test]
    fn tampered_or_swapped_entries_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("raft.redb");
        let keys = Arc::new(DataKeys::ephemeral().unwrap());
        let s = RedbStorage::open_encrypted(&path, &[1], keys).unwrap();
        s.persist(&[entry(2, 1, b"a"), entry(3, 1, b"b")], None, None)
            .unwrap();
        let raw = |i: u64| -> Vec<u8> {
            let tx = s.db.begin_read().unwrap();
            let t = tx.open_table(ENTRIES).unwrap();
            let v = t.get(i).unwrap().unwrap().value().to_vec();
            v
        };
        let put = |i: u64, b: &[u8]| {
            let tx = s.db.begin_write().unwrap();
            tx.open_table(ENTRIES).unwrap().insert(i, b).unwrap();
            tx.commit().unwrap();
            // Read from disk, as after a restart.
            s.recent.lock().unwrap().clear();
        };
        let (two, three) = (raw(2), raw(3));
        // Swapped: each record is bound to its index.
        put(2, &three);
        let err = s
            .entries(2, 3, None, GetEntriesContext::empty(false))
            .unwrap_err();
        assert!(err.to_string().contains("raft log entry 2"), "{err}");
        // Tampered.
        let mut bad = two.clone();
        let n = bad.len();
        bad[n - 20] ^= 0x40;
        put(2, &bad);
        assert!(s.term(2).is_err());
        put(2, &two);
        assert_eq!(s.term(2).unwrap(), 1);
    }

    #[test]
    fn a_plaintext_log_from_before_is_read_and_reencrypted() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("raft.redb");
        {
            let s = RedbStorage::open(&path, &[1]).unwrap();
            let es: Vec<Entry> = (2..=30).map(|i| entry(i, 1, b"old")).collect();
            s.persist(&es, None, None).unwrap();
            s.save_snapshot(&snapshot_at(20, 1, &[1], b"store@20"), 10)
                .unwrap();
        }
        let s = RedbStorage::open_encrypted(&path, &[1], Arc::new(DataKeys::ephemeral().unwrap()))
            .unwrap();
        assert_eq!(
            s.stale_records().unwrap(),
            22,
            "21 entries and the snapshot"
        );
        s.persist(&[entry(31, 1, b"new")], None, None).unwrap();
        let es = s
            .entries(10, 32, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(es.len(), 22);
        assert_eq!(&es[21].data[..], b"new");
        let done = s.reencrypt().unwrap();
        assert_eq!(
            done,
            Reencrypted {
                entries: 21,
                snapshot: true
            }
        );
        assert_eq!(s.stale_records().unwrap(), 0);
        assert_eq!(&s.latest_snapshot().unwrap().unwrap().data[..], b"store@20");
        let es = s
            .entries(10, 32, None, GetEntriesContext::empty(false))
            .unwrap();
        assert!(es[..21].iter().all(|e| &e.data[..] == b"old"));
        assert_eq!(s.reencrypt().unwrap(), Reencrypted::default());
    }

    #[test]
    fn after_rotation_and_the_pass_the_old_key_reads_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, certs) = (tmp.path().join("data"), tmp.path().join("certs"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&certs).unwrap();
        let path = data.join("raft.redb");
        let keys = keys_in(&certs);
        // The old keyring, kept aside as an attacker who copied it would.
        let stolen = tmp.path().join("stolen");
        std::fs::create_dir_all(&stolen).unwrap();
        std::fs::copy(certs.join(crypt::DEK_FILE), stolen.join(crypt::DEK_FILE)).unwrap();
        let s = RedbStorage::open_encrypted(&path, &[1], keys.clone()).unwrap();
        let es: Vec<Entry> = (2..=1500).map(|i| entry(i, 1, b"v")).collect();
        s.persist(&es, None, None).unwrap();
        s.save_snapshot(&snapshot_at(1400, 1, &[1], b"store@1400"), 1000)
            .unwrap();
        keys.rotate().unwrap();
        s.persist(&[entry(1501, 1, b"w")], None, None).unwrap();
        assert_eq!(
            s.stale_records().unwrap(),
            502,
            "501 entries and the snapshot"
        );
        let done = s.reencrypt().unwrap();
        assert_eq!(done.entries, 501);
        assert!(done.snapshot);
        assert_eq!(s.stale_records().unwrap(), 0);
        assert_eq!(keys.retire().unwrap(), vec![1]);
        drop(s);
        // Everything reads with the new keyring alone.
        let s = RedbStorage::open_encrypted(&path, &[1], keys_in(&certs)).unwrap();
        let es = s
            .entries(1000, 1502, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(es.len(), 502);
        assert_eq!(
            &s.latest_snapshot().unwrap().unwrap().data[..],
            b"store@1400"
        );
        // The old key opens no record and not the snapshot.
        let old = keys_in(&stolen);
        let tx = s.db.begin_read().unwrap();
        for item in tx.open_table(ENTRIES).unwrap().iter().unwrap() {
            let (k, v) = item.unwrap();
            assert!(old.open(Context::Entry(k.value()), v.value()).is_err());
        }
        let file = data.join(SNAPSHOT_DIR).join("snap-1-1400");
        let md = s.latest_snapshot().unwrap().unwrap().get_metadata().clone();
        assert!(old
            .open(snapshot_context(&md), &std::fs::read(file).unwrap())
            .is_err());
    }

    fn snapshot_at(index: u64, term: u64, voters: &[u64], data: &[u8]) -> Snapshot {
        let mut snap = Snapshot {
            data: data.to_vec().into(),
            ..Default::default()
        };
        let md = snap.mut_metadata();
        md.index = index;
        md.term = term;
        md.mut_conf_state().voters = voters.to_vec();
        snap
    }

    #[test]
    fn snapshots_compact_survive_reopen_and_install() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        {
            let s = RedbStorage::open(&path, &[1]).unwrap();
            let es: Vec<Entry> = (2..=100).map(|i| entry(i, 1, b"e")).collect();
            s.persist(&es, None, None).unwrap();
            // A snapshot at 80, compacting up to 50: entries 50.. stay.
            s.save_snapshot(&snapshot_at(80, 1, &[1], b"store@80"), 50)
                .unwrap();
            assert_eq!(s.first_index().unwrap(), 50);
            assert_eq!(s.term(49).unwrap(), 1);
            assert!(matches!(
                s.entries(10, 20, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
            // A member outside the snapshot's conf state cannot be served from it.
            assert!(s.snapshot(0, 1).is_ok());
            assert!(s.snapshot(0, 2).is_err());
            assert!(s.take_snapshot_wanted());
            assert!(!s.take_snapshot_wanted(), "the flag clears");
        }
        let s = RedbStorage::open(&path, &[1]).unwrap();
        assert_eq!(s.first_index().unwrap(), 50);
        assert_eq!(s.last_index().unwrap(), 100);
        let snap = s.latest_snapshot().unwrap().unwrap();
        assert_eq!(snap.get_metadata().index, 80);
        assert_eq!(&snap.data[..], b"store@80");

        // A snapshot from the leader replaces the whole log.
        s.install_snapshot(&snapshot_at(500, 4, &[1, 2], b"store@500"))
            .unwrap();
        assert_eq!(s.first_index().unwrap(), 501);
        assert_eq!(s.last_index().unwrap(), 500);
        assert_eq!(s.term(500).unwrap(), 4);
        let st = s.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1, 2]);
        assert_eq!(st.hard_state.commit, 500);
        drop(s);
        let s = RedbStorage::open(&path, &[1]).unwrap();
        assert_eq!(s.first_index().unwrap(), 501);
        assert_eq!(
            &s.latest_snapshot().unwrap().unwrap().data[..],
            b"store@500"
        );
    }
}

//! Durable Raft log on redb.
//!
//! Invariants:
//! - Entries, hard state and conf state of one Ready are written in ONE durable write transaction
//!   (`persist`), so a crash never leaves a hard state pointing past the log.
//! - Appending at index `i` first removes every entry at `>= i` (a new leader may overwrite an
//!   uncommitted suffix).
//! - The metadata (first/last index, hard and conf state) is mirrored in memory so the raft
//!   core's frequent `term`/`last_index` calls do not open transactions; entries are read from
//!   redb. raft-rs calls `Storage` through `&self`, hence the lock.

use std::path::Path;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
pub enum StorageErr {
    #[error("storage: redb: {0}")]
    Redb(String),
    #[error("storage: corrupt record {0}: {1}")]
    Corrupt(&'static str, String),
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
    /// Index and term of the last entry folded into a snapshot (0, 0 when none).
    snapshot_index: u64,
    snapshot_term: u64,
    last_index: u64,
    last_term: u64,
}

/// The raft log of one controller, on disk.
#[derive(Clone)]
pub struct RedbStorage {
    db: Arc<Database>,
    meta: Arc<RwLock<Meta>>,
}

impl RedbStorage {
    /// Opens (or creates) the log at `path`. A fresh log is bootstrapped with `voters` as the
    /// initial configuration; an existing one keeps its own.
    pub fn open(path: &Path, voters: &[u64]) -> Result<Self, StorageErr> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(ENTRIES)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        let s = RedbStorage {
            db: Arc::new(db),
            meta: Default::default(),
        };
        s.load(voters)?;
        Ok(s)
    }

    fn load(&self, voters: &[u64]) -> Result<(), StorageErr> {
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
        m.last_index = m.snapshot_index;
        m.last_term = m.snapshot_term;
        if let Some((k, v)) = entries.last()? {
            let e = Entry::parse_from_bytes(v.value())
                .map_err(|e| StorageErr::Corrupt("entry", e.to_string()))?;
            m.last_index = k.value();
            m.last_term = e.term;
        }
        drop((meta_t, entries, tx));
        *self.meta.write().expect("meta lock") = m;
        if fresh {
            let cs = ConfState {
                voters: voters.to_vec(),
                ..Default::default()
            };
            self.persist(&[], None, Some(&cs))?;
        }
        Ok(())
    }

    /// Writes one Ready's worth of state in a single durable transaction.
    pub fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        conf_state: Option<&ConfState>,
    ) -> Result<(), StorageErr> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(ENTRIES)?;
            if let Some(first) = entries.first() {
                let last = self.meta.read().expect("meta lock").last_index;
                for i in first.index..=last {
                    t.remove(i)?;
                }
                for e in entries {
                    let bytes = e
                        .write_to_bytes()
                        .map_err(|err| StorageErr::Corrupt("entry", err.to_string()))?;
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

    pub fn hard_state(&self) -> HardState {
        self.meta.read().expect("meta lock").hard_state.clone()
    }
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
        let read = || -> Result<Vec<Entry>, StorageErr> {
            let tx = self.db.begin_read()?;
            let t = tx.open_table(ENTRIES)?;
            let mut out = Vec::new();
            let mut size = 0u64;
            for item in t.range(low..high)? {
                let (_, v) = item?;
                let bytes = v.value();
                size += bytes.len() as u64;
                if !out.is_empty() && size > max_size {
                    break;
                }
                out.push(
                    Entry::parse_from_bytes(bytes)
                        .map_err(|e| StorageErr::Corrupt("entry", e.to_string()))?,
                );
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
        let read = || -> Result<Option<u64>, StorageErr> {
            let tx = self.db.begin_read()?;
            let t = tx.open_table(ENTRIES)?;
            let v = t.get(idx)?;
            match v {
                Some(v) => Ok(Some(
                    Entry::parse_from_bytes(v.value())
                        .map_err(|e| StorageErr::Corrupt("entry", e.to_string()))?
                        .term,
                )),
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

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Snapshots and compaction arrive with multi-member groups; until then a follower never
        // lags behind a compacted log.
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
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
            let hs = HardState {
                term: 2,
                commit: 2,
                ..Default::default()
            };
            s.persist(
                &[entry(1, 1, b"a"), entry(2, 2, b"b"), entry(3, 2, b"c")],
                Some(&hs),
                None,
            )
            .unwrap();
            // A new leader overwrites index 3 onwards.
            s.persist(&[entry(3, 3, b"x")], None, None).unwrap();
            assert_eq!(s.last_index().unwrap(), 3);
            assert_eq!(s.term(3).unwrap(), 3);
        }
        let s = RedbStorage::open(&path, &[7]).unwrap();
        let st = s.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1], "existing conf state kept");
        assert_eq!(st.hard_state.commit, 2);
        assert_eq!(s.first_index().unwrap(), 1);
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.term(2).unwrap(), 2);
        assert_eq!(s.term(0).unwrap(), 0);
        let es = s
            .entries(1, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        let data: Vec<&[u8]> = es.iter().map(|e| &e.data[..]).collect();
        assert_eq!(data, [b"a", b"b", b"x"]);
        let one = s.entries(1, 4, 1, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(one.len(), 1, "max_size still returns one entry");
    }
}

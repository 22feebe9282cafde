//! The encoding of the whole [`Store`]: raft snapshots (files in the controller's `snapshots/`
//! dir, and what a leader sends a lagging follower) and the plain text inside a backup. It is
//! the store's JSON object with a format label first ([`crate::format`]).
//!
//! Invariants (see [`crate::format`]): bytes without a label (every snapshot and backup written
//! before labels, the golden `tests/golden/v1/raft/snapshot.json`) are version 1; a version above
//! [`SNAPSHOT_FORMAT`] is refused with the snapshot's name before it is parsed; version 1 with a
//! label still reads in builds from before labels (the store does not deny unknown fields), so
//! an upgraded leader's snapshot installs on a follower not yet upgraded.

use crate::format::{self, FormatError};
use crate::store::Store;

/// The newest snapshot format this build reads, and the one it writes.
pub const SNAPSHOT_FORMAT: u64 = 1;

/// The store as snapshot bytes of format [`SNAPSHOT_FORMAT`], the label first.
pub fn encode(store: &Store) -> Result<Vec<u8>, FormatError> {
    format::encode("the store", store, SNAPSHOT_FORMAT, false)
}

/// The store in snapshot `bytes` of any format this build reads; `what` names the snapshot
/// (file or message) in errors.
pub fn decode(bytes: &[u8], what: &str) -> Result<Store, FormatError> {
    format::decode(bytes, SNAPSHOT_FORMAT, what).map(|(mut store, _): (Store, _)| {
        store.build_indexes();
        store
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Command;

    fn some_store() -> Store {
        let mut s = Store::default();
        s.apply(
            1,
            Command::PutNode {
                id: "n1".into(),
                hostname: "host1".into(),
                addr: "10.0.0.1:4244".into(),
                labels: [("zone".to_string(), "a".to_string())].into(),
                role: Default::default(),
                resources: serde_json::from_value(serde_json::json!({"cpus": 2000, "memory": 1}))
                    .unwrap(),
                now: 1,
                cert_not_after: 2,
                host_labels: Default::default(),
            },
        )
        .unwrap();
        assert!(!s.nodes.is_empty());
        s
    }

    #[test]
    fn encode_labels_first_and_decodes_back() {
        for store in [Store::default(), some_store()] {
            let bytes = encode(&store).unwrap();
            assert!(
                bytes.starts_with(b"{\"format_version\":1"),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
            assert_eq!(format::version_of(&bytes, "t").unwrap(), 1);
            assert_eq!(decode(&bytes, "t").unwrap(), store);
        }
    }

    /// A decoded store has its node → tasks index before any entry is applied: a member that
    /// installed a snapshot and then leads serves its sessions from the index, not by scans.
    #[test]
    fn a_decoded_store_has_its_node_index() {
        let bytes = encode(&some_store()).unwrap();
        let store = decode(&bytes, "t").unwrap();
        assert!(store.node_tasks.is_built());
        let raw: Store = serde_json::from_slice(&bytes).unwrap();
        assert!(
            !raw.node_tasks.is_built(),
            "not serialized: built on decode"
        );
    }

    /// A build from before labels parses the store straight from the bytes: it must still
    /// read what this build writes (a new leader's snapshot reaches an old follower during a
    /// rolling upgrade).
    #[test]
    fn a_reader_without_labels_reads_a_labelled_snapshot() {
        let store = some_store();
        let bytes = encode(&store).unwrap();
        let old: Store = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(old, store);
    }

    #[test]
    fn no_label_is_version_1() {
        let plain = serde_json::to_vec(&some_store()).unwrap();
        assert_eq!(format::version_of(&plain, "t").unwrap(), 1);
        assert_eq!(decode(&plain, "t").unwrap(), some_store());
        assert_eq!(format::version_of(b"  { \"nodes\": {} }", "t").unwrap(), 1);
    }

    #[test]
    fn a_newer_version_is_refused_by_name_and_number() {
        let bytes = br#"{"format_version":2,"nodes":{},"something_new":[1,2]}"#;
        let err = decode(bytes, "raft snapshot snap-3-42").unwrap_err();
        assert!(matches!(err, FormatError::Newer { found: 2, .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("snap-3-42"), "{msg}");
        assert!(msg.contains("format version 2"), "{msg}");
    }

    /// The label grammar (spacing, bad values) is format.rs's, tested there; a snapshot only
    /// has to pass a bad label's refusal through.
    #[test]
    fn a_bad_label_is_refused() {
        let err = decode(br#"{"format_version":"1"}"#, "f").unwrap_err();
        assert!(matches!(err, FormatError::BadLabel { .. }), "{err}");
    }
}

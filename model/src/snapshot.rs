//! The on-disk and on-wire encoding of the whole [`Store`]: raft snapshots (files in the
//! controller's `snapshots/` dir, and what a leader sends a lagging follower) and the plain text
//! inside a backup. It is the store's JSON object with a format label, `"format_version": N`,
//! as its FIRST key.
//!
//! Invariants:
//! - [`encode`] always writes the label first, so [`format_of`] reads it from the first bytes,
//!   before the store is parsed: a newer format is refused by name and version, never with a
//!   parse error that hides why.
//! - Bytes without the label (every snapshot and backup written before labels existed, and the
//!   golden files in `tests/golden/v1`) are version 1.
//! - Version 1 with a label is version 1 without one plus a key the store ignores (the store
//!   does not deny unknown fields). A build from before labels therefore still reads what this
//!   one writes: during a rolling upgrade a new leader may send its snapshot to an old
//!   follower.
//! - A new format gets a new number; this build reads every number up to [`SNAPSHOT_FORMAT`]
//!   and refuses the others.

use crate::store::Store;

/// The newest snapshot format this build reads, and the one it writes.
pub const SNAPSHOT_FORMAT: u64 = 1;

/// The label's key; always the first key of the object.
const LABEL: &str = "format_version";

/// Longest label value read (digits): a longer run is refused rather than overflowed.
const MAX_LABEL_DIGITS: usize = 19;

/// Why snapshot bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Written by a newer build: refused rather than half understood.
    #[error(
        "snapshot: {what} has format version {found}, newer than this build reads (up to \
         {SNAPSHOT_FORMAT}): run a newer rudder-controller"
    )]
    Newer {
        /// The file or message the bytes came from.
        what: String,
        /// The label's value.
        found: u64,
    },
    /// A label that is not a positive number.
    #[error("snapshot: {what}: bad format label: {reason}")]
    BadLabel {
        /// The file or message the bytes came from.
        what: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A known version whose store does not parse.
    #[error("snapshot: {what} (format version {version}) does not parse: {source}")]
    Parse {
        /// The file or message the bytes came from.
        what: String,
        /// The format version read.
        version: u64,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The store did not serialize (never expected: every field is plain data).
    #[error("snapshot: encoding the store: {0}")]
    Encode(#[source] serde_json::Error),
}

/// The store as snapshot bytes of format [`SNAPSHOT_FORMAT`], the label first.
pub fn encode(store: &Store) -> Result<Vec<u8>, SnapshotError> {
    let prefix = format!("{{\"{LABEL}\":{SNAPSHOT_FORMAT}");
    let mut out = Vec::with_capacity(64 * 1024);
    out.extend_from_slice(prefix.as_bytes());
    // The store's own object follows; its opening brace becomes the comma after the label
    // (in place: a snapshot of a large store is not copied again).
    serde_json::to_writer(&mut out, store).map_err(SnapshotError::Encode)?;
    let at = prefix.len();
    if out.get(at) != Some(&b'{') {
        return Err(SnapshotError::Encode(serde::ser::Error::custom(
            "the store is not a JSON object",
        )));
    }
    if out.len() == at + 2 {
        // `{}`: an object with no fields.
        out.truncate(at);
        out.push(b'}');
    } else {
        out[at] = b',';
    }
    Ok(out)
}

/// The format version of snapshot `bytes`: its label, or 1 when it has none. `what` names the
/// file or message in errors.
pub fn format_of(bytes: &[u8], what: &str) -> Result<u64, SnapshotError> {
    let bad = |reason| SnapshotError::BadLabel {
        what: what.to_string(),
        reason,
    };
    let mut rest = skip_ws(bytes);
    let Some(after_brace) = rest.strip_prefix(b"{") else {
        // Not an object: no label; the parser says what is wrong.
        return Ok(1);
    };
    rest = skip_ws(after_brace);
    let key = format!("\"{LABEL}\"");
    let Some(after_key) = rest.strip_prefix(key.as_bytes()) else {
        return Ok(1);
    };
    rest = skip_ws(after_key);
    let Some(after_colon) = rest.strip_prefix(b":") else {
        return Err(bad("no ':' after the label"));
    };
    rest = skip_ws(after_colon);
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return Err(bad("the label is not a number"));
    }
    if digits > MAX_LABEL_DIGITS {
        return Err(bad("the label is too long"));
    }
    let n: u64 = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("the label is not a number"))?;
    if n == 0 {
        return Err(bad("version 0 does not exist"));
    }
    Ok(n)
}

/// The store in snapshot `bytes` of any format this build reads; `what` names the file or
/// message in errors.
pub fn decode(bytes: &[u8], what: &str) -> Result<Store, SnapshotError> {
    let version = format_of(bytes, what)?;
    if version > SNAPSHOT_FORMAT {
        return Err(SnapshotError::Newer {
            what: what.to_string(),
            found: version,
        });
    }
    serde_json::from_slice(bytes).map_err(|source| SnapshotError::Parse {
        what: what.to_string(),
        version,
        source,
    })
}

fn skip_ws(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .take_while(|c| matches!(c, b' ' | b'\n' | b'\r' | b'\t'))
        .count();
    &b[n..]
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
            assert_eq!(format_of(&bytes, "t").unwrap(), 1);
            assert_eq!(decode(&bytes, "t").unwrap(), store);
        }
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
        assert_eq!(format_of(&plain, "t").unwrap(), 1);
        assert_eq!(decode(&plain, "t").unwrap(), some_store());
        assert_eq!(format_of(b"  { \"nodes\": {} }", "t").unwrap(), 1);
    }

    #[test]
    fn a_newer_version_is_refused_by_name_and_number() {
        let bytes = br#"{"format_version":2,"nodes":{},"something_new":[1,2]}"#;
        let err = decode(bytes, "raft snapshot snap-3-42").unwrap_err();
        assert!(
            matches!(err, SnapshotError::Newer { found: 2, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("snap-3-42"), "{msg}");
        assert!(msg.contains("format version 2"), "{msg}");
        // Spacing does not hide the label.
        let spaced = b" {\n  \"format_version\" : 7 , \"nodes\": {} }";
        assert!(matches!(
            decode(spaced, "f").unwrap_err(),
            SnapshotError::Newer { found: 7, .. }
        ));
    }

    #[test]
    fn bad_labels_are_refused() {
        for bytes in [
            &br#"{"format_version":0}"#[..],
            br#"{"format_version":"1"}"#,
            br#"{"format_version":-1}"#,
            br#"{"format_version" 1}"#,
            br#"{"format_version":99999999999999999999999}"#,
        ] {
            let err = decode(bytes, "f").unwrap_err();
            assert!(
                matches!(err, SnapshotError::BadLabel { .. }),
                "{}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}

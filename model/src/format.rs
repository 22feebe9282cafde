//! Format labels of the JSON files and blobs Rudder keeps between runs (raft snapshots, the
//! agent's task records, rctl's context file): the value's JSON object with
//! `"format_version": N` as its FIRST key.
//!
//! Invariants:
//! - [`encode`] always writes the label first, so [`version_of`] reads it from the first bytes,
//!   before the value is parsed: a newer format is refused by name and version, never with a
//!   parse error that hides why.
//! - Bytes without the label (written before labels existed, like the golden files in
//!   `tests/golden/v1`) are version 1. A label that is not the first key is not looked for.
//! - A label is one more key for a type that does not deny unknown fields, so a build from
//!   before labels still reads a labelled version 1 (a downgrade, or a new leader's snapshot
//!   reaching an old follower during a rolling upgrade).
//! - A changed layout gets a new number; a reader takes every number up to its newest and
//!   refuses the others ([`FormatError::Newer`]).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The label's key; always the first key of the object.
pub const LABEL: &str = "format_version";

/// Longest label value read (digits): a longer run is refused rather than overflowed.
const MAX_LABEL_DIGITS: usize = 19;

/// Why labelled bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Written by a newer build: refused rather than half understood.
    #[error(
        "format: {what} has format version {found}, newer than this build reads (up to \
         {newest}): run a newer build"
    )]
    Newer {
        /// The file or message the bytes came from.
        what: String,
        /// The label's value.
        found: u64,
        /// The newest version this build reads.
        newest: u64,
    },
    /// A label that is not a positive number.
    #[error("format: {what}: bad format label: {reason}")]
    BadLabel {
        /// The file or message the bytes came from.
        what: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A known version whose value does not parse.
    #[error("format: {what} (format version {version}) does not parse: {source}")]
    Parse {
        /// The file or message the bytes came from.
        what: String,
        /// The format version read.
        version: u64,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The value did not serialize, or not to a JSON object.
    #[error("format: encoding {what}: {reason}")]
    Encode {
        /// The kind of value.
        what: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// `value` as JSON with the label `version` first; `pretty` for files people read.
pub fn encode<T: Serialize>(
    what: &'static str,
    value: &T,
    version: u64,
    pretty: bool,
) -> Result<Vec<u8>, FormatError> {
    let enc = |e: serde_json::Error| FormatError::Encode {
        what,
        reason: e.to_string(),
    };
    let prefix = if pretty {
        format!("{{\n  \"{LABEL}\": {version}")
    } else {
        format!("{{\"{LABEL}\":{version}")
    };
    let mut out = Vec::with_capacity(64 * 1024);
    out.extend_from_slice(prefix.as_bytes());
    let at = prefix.len();
    // The value's own object follows; its opening brace becomes the comma after the label, in
    // place (a snapshot of a large store is not copied again).
    if pretty {
        serde_json::to_writer_pretty(&mut out, value).map_err(enc)?;
    } else {
        serde_json::to_writer(&mut out, value).map_err(enc)?;
    }
    if out.get(at) != Some(&b'{') {
        return Err(FormatError::Encode {
            what,
            reason: "not a JSON object".into(),
        });
    }
    let body = &out[at + 1..];
    if body.iter().all(|b| b.is_ascii_whitespace() || *b == b'}') {
        // `{}`: an object with no fields.
        out.truncate(at);
        out.extend_from_slice(if pretty { b"\n}" } else { b"}" });
    } else {
        out[at] = b',';
    }
    Ok(out)
}

/// The format version of `bytes`: its label, or 1 when it has none. `what` names the file or
/// message in errors.
pub fn version_of(bytes: &[u8], what: &str) -> Result<u64, FormatError> {
    let bad = |reason| FormatError::BadLabel {
        what: what.to_string(),
        reason,
    };
    let Some(rest) = skip_ws(bytes).strip_prefix(b"{") else {
        // Not an object: no label; the parser says what is wrong.
        return Ok(1);
    };
    let key = format!("\"{LABEL}\"");
    let Some(rest) = skip_ws(rest).strip_prefix(key.as_bytes()) else {
        return Ok(1);
    };
    let Some(rest) = skip_ws(rest).strip_prefix(b":") else {
        return Err(bad("no ':' after the label"));
    };
    let rest = skip_ws(rest);
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

/// The value in `bytes` and its format version, when that is at most `newest`; `what` names the
/// file or message in errors.
pub fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    newest: u64,
    what: &str,
) -> Result<(T, u64), FormatError> {
    let version = version_of(bytes, what)?;
    if version > newest {
        return Err(FormatError::Newer {
            what: what.to_string(),
            found: version,
            newest,
        });
    }
    let value = serde_json::from_slice(bytes).map_err(|source| FormatError::Parse {
        what: what.to_string(),
        version,
        source,
    })?;
    Ok((value, version))
}

fn skip_ws(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// A type like the ones labelled: it ignores unknown keys, and may serialize to `{}`.
    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    struct Obj {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        a: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        b: Option<u32>,
    }

    fn obj() -> Obj {
        Obj {
            a: Some(1),
            b: Some(2),
        }
    }

    #[test]
    fn encode_puts_the_label_first_compact_and_pretty() {
        for pretty in [false, true] {
            for value in [obj(), Obj::default()] {
                let bytes = encode("t", &value, 3, pretty).unwrap();
                let text = String::from_utf8(bytes.clone()).unwrap();
                let v: serde_json::Value = serde_json::from_slice(&bytes).expect(&text);
                assert_eq!(v[LABEL], 3, "{text}");
                assert_eq!(version_of(&bytes, "t").unwrap(), 3, "{text}");
                let (back, version): (Obj, u64) = decode(&bytes, 3, "t").unwrap();
                assert_eq!((back, version), (value, 3));
            }
        }
        assert_eq!(
            encode("t", &obj(), 1, false).unwrap(),
            br#"{"format_version":1,"a":1,"b":2}"#
        );
    }

    #[test]
    fn no_label_is_version_1_and_a_later_label_is_not_looked_for() {
        assert_eq!(version_of(br#"{"a":1}"#, "t").unwrap(), 1);
        assert_eq!(
            version_of(br#" { "a":1, "format_version": 9}"#, "t").unwrap(),
            1
        );
        assert_eq!(version_of(b"[1]", "t").unwrap(), 1);
        assert_eq!(version_of(b"", "t").unwrap(), 1);
    }

    #[test]
    fn a_newer_version_is_refused_naming_the_file_and_the_version() {
        let err =
            decode::<Obj>(br#"{"format_version":2,"a":"changed"}"#, 1, "/x/task.json").unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::Newer {
                    found: 2,
                    newest: 1,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("/x/task.json") && msg.contains("version 2"),
            "{msg}"
        );
        let spaced = b" {\n  \"format_version\" : 7 , \"a\": 1 }";
        assert!(matches!(
            decode::<Obj>(spaced, 6, "f").unwrap_err(),
            FormatError::Newer { found: 7, .. }
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
            let err = decode::<Obj>(bytes, 5, "f").unwrap_err();
            assert!(
                matches!(err, FormatError::BadLabel { .. }),
                "{}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}

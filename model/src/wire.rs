//! The envelope JSON payloads travel in on the wire (specs, tasks, network maps inside proto
//! `string`s): `{"v":1,"body":...}`. A reader refuses a version it does not know, naming it,
//! instead of guessing at a changed layout; a writer never sends an empty string for a value
//! that failed to serialize.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of the JSON payloads this build writes and reads.
pub const JSON_VERSION: u32 = 1;

/// Why a payload could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The envelope's version is not [`JSON_VERSION`] (a newer or older peer).
    #[error("wire: {what}: payload version {found} is not understood by this build (expected {JSON_VERSION}); upgrade the older side")]
    UnknownVersion {
        /// The payload, as the caller names it (`task`, `network map`).
        what: &'static str,
        /// The version the envelope says.
        found: u32,
    },
    /// Not an envelope, or its body does not decode into the expected type.
    #[error("wire: {what}: malformed payload: {message}")]
    Malformed {
        /// The payload, as the caller names it.
        what: &'static str,
        /// What serde said.
        message: String,
    },
    /// The value could not be serialized.
    #[error("wire: {what}: cannot encode: {message}")]
    Encode {
        /// The payload, as the caller names it.
        what: &'static str,
        /// What serde said.
        message: String,
    },
}

#[derive(Serialize)]
struct Out<'a, T> {
    v: u32,
    body: &'a T,
}

#[derive(Deserialize)]
struct In<T> {
    body: T,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

/// `value` in its envelope. `what` names the payload in errors (`task`, `network map`, …).
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<String, WireError> {
    serde_json::to_string(&Out {
        v: JSON_VERSION,
        body: value,
    })
    .map_err(|e| WireError::Encode {
        what,
        message: e.to_string(),
    })
}

/// The value inside an envelope `encode` made, or why not.
pub fn decode<T: DeserializeOwned>(what: &'static str, json: &str) -> Result<T, WireError> {
    let malformed = |e: serde_json::Error| WireError::Malformed {
        what,
        message: e.to_string(),
    };
    let v: VersionOnly = serde_json::from_str(json).map_err(malformed)?;
    if v.v != JSON_VERSION {
        return Err(WireError::UnknownVersion { what, found: v.v });
    }
    let i: In<T> = serde_json::from_str(json).map_err(malformed)?;
    Ok(i.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_an_unknown_version() {
        let json = encode("list", &vec![1u32, 2]).unwrap();
        assert_eq!(json, r#"{"v":1,"body":[1,2]}"#);
        assert_eq!(decode::<Vec<u32>>("list", &json).unwrap(), vec![1, 2]);
        let e = decode::<Vec<u32>>("list", r#"{"v":2,"body":[1]}"#).unwrap_err();
        assert_eq!(
            e,
            WireError::UnknownVersion {
                what: "list",
                found: 2
            }
        );
        assert!(e.to_string().contains("version 2 is not understood"), "{e}");
        // A bare document (no envelope) is refused, not read as some version.
        let e = decode::<Vec<u32>>("list", "[1]").unwrap_err();
        assert!(matches!(e, WireError::Malformed { .. }), "{e}");
    }
}

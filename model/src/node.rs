//! Nodes: the hosts that run an agent, as the store records them (identity, address, the
//! operator's labels and availability, the host's own labels and the capacity the agent
//! reported). Plain data: the store changes them, placement and the dispatcher read them.
//!
//! Two sets of labels, as Docker keeps node labels apart from engine labels: `labels` belong
//! to the operator (`rctl node update --label-add`, constraint `node.labels.KEY`) and
//! `host_labels` to the host's config file (`[labels]` in rudder.toml, sent in `Register`,
//! constraint `engine.labels.KEY`). A host can set only its own host labels, so a constraint
//! that must hold against a compromised host (where secrets go, say) uses `node.labels`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Whether a node's agent is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Its agent holds a session: it can run tasks.
    Ready,
    /// Its session ended or timed out: its tasks are orphaned.
    Down,
}

/// Whether a node takes new tasks: set by the operator (`rctl node update --availability`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Takes new tasks.
    #[default]
    Active,
    /// Keeps its tasks but gets no new ones.
    Pause,
    /// Gets no new tasks, and its tasks are moved to other nodes.
    Drain,
}

impl Availability {
    /// The lowercase name, as in specs and `rctl node ls`.
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Active => "active",
            Availability::Pause => "pause",
            Availability::Drain => "drain",
        }
    }
}

impl std::str::FromStr for Availability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "active" => Ok(Availability::Active),
            "pause" => Ok(Availability::Pause),
            "drain" => Ok(Availability::Drain),
            _ => Err(format!(
                "unknown availability {s:?} (expected active, pause or drain)"
            )),
        }
    }
}

/// What a node's certificate allows it to be; constraints can select on it (`node.role==manager`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// An agent only.
    #[default]
    Worker,
    /// An agent whose host also runs a controller.
    Manager,
}

impl NodeRole {
    /// The lowercase name, as in constraints (`node.role==manager`).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Worker => "worker",
            NodeRole::Manager => "manager",
        }
    }
}

/// Capacity an agent reports for its host. Zero means unknown, which the scheduler treats as
/// unlimited (a node that reports nothing still takes tasks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResources {
    /// Millicpus (a 4-core host reports 4000).
    #[serde(default)]
    pub cpus: u64,
    /// Bytes of memory.
    #[serde(default)]
    pub memory: u64,
}

/// A host running an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Stable id the agent generated on first start and keeps in its data dir.
    pub id: String,
    /// The host's name, as its agent reports it; constraints and `rctl` use it.
    pub hostname: String,
    /// Where the agent's own API listens (logs, exec), `ip:port`.
    pub addr: String,
    /// Operator-owned (`UpdateNode`); a re-registering agent does not overwrite them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// From the node's certificate.
    #[serde(default)]
    pub role: NodeRole,
    /// Operator-owned, like `labels`.
    #[serde(default)]
    pub availability: Availability,
    /// The host's own labels, from its config file (`[labels]`), replaced at each
    /// registration; never the operator's `labels`. Absent from stores of earlier builds.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_labels: BTreeMap<String, String>,
    /// Reported by the agent when it registers.
    #[serde(default)]
    pub resources: NodeResources,
    /// Whether its agent is connected.
    pub state: NodeState,
    /// Milliseconds since the epoch, stamped by the leader.
    pub updated_at: u64,
    /// Raft index of its last write.
    pub version: u64,
    /// Set when the node was promoted: the raft id its agent is to start a controller with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_id: Option<u64>,
    /// The node's WireGuard public key (base64), as its agent reported it; the private key
    /// never leaves the host.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub overlay_key: String,
    /// When the certificate of the node's current session expires (ms since the epoch), as
    /// the dispatcher read it from that certificate; 0 when unknown. `rctl node ls` warns
    /// before it is reached.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cert_not_after: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Most labels a host may declare.
pub const MAX_HOST_LABELS: usize = 64;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY: usize = 63;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 255;

/// Why a host's labels are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// More than [`MAX_HOST_LABELS`].
    #[error("labels: {0} labels; a host may declare at most {MAX_HOST_LABELS}")]
    TooMany(usize),
    /// A key outside the grammar.
    #[error("labels: key {key:?}: {reason}")]
    Key {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value outside the grammar.
    #[error("labels: {key}: value {value:?}: {reason}")]
    Value {
        /// The label's key.
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Checks one host label. Keys are 1-63 bytes of `[A-Za-z0-9._-]` that start and end with a
/// letter or digit (`zone`, `com.example.rack`), so `engine.labels.KEY` always parses; values
/// are at most 255 bytes without control characters, surrounding spaces, `==` or `!=` (a
/// constraint could not name them otherwise).
pub fn check_label(key: &str, value: &str) -> Result<(), LabelError> {
    let bad_key = |reason| LabelError::Key {
        key: key.to_string(),
        reason,
    };
    if key.is_empty() || key.len() > MAX_LABEL_KEY {
        return Err(bad_key("keys are 1 to 63 bytes long"));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad_key(
            "keys are made of letters, digits, '.', '_' and '-'",
        ));
    }
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !edge(key.bytes().next()) || !edge(key.bytes().last()) {
        return Err(bad_key("keys start and end with a letter or digit"));
    }
    let bad_value = |reason| LabelError::Value {
        key: key.to_string(),
        value: value.chars().take(64).collect(),
        reason,
    };
    if value.len() > MAX_LABEL_VALUE {
        return Err(bad_value("values are at most 255 bytes long"));
    }
    if value.chars().any(char::is_control) {
        return Err(bad_value("values hold no control characters"));
    }
    if value.trim() != value {
        return Err(bad_value("values neither start nor end with a space"));
    }
    if value.contains("==") || value.contains("!=") {
        return Err(bad_value(
            "values hold no '==' or '!=' (constraints compare with them)",
        ));
    }
    Ok(())
}

/// Checks a host's whole label set: [`check_label`] for each, at most [`MAX_HOST_LABELS`].
pub fn check_host_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), LabelError> {
    let mut count = 0;
    for (k, v) in labels {
        check_label(k, v)?;
        count += 1;
    }
    if count > MAX_HOST_LABELS {
        return Err(LabelError::TooMany(count));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_labels_follow_the_grammar_and_the_limits() {
        let long_key = "k".repeat(MAX_LABEL_KEY);
        let too_long_key = "k".repeat(MAX_LABEL_KEY + 1);
        let long_value = "v".repeat(MAX_LABEL_VALUE);
        let too_long_value = "v".repeat(MAX_LABEL_VALUE + 1);
        // (key, value, refusal mentioning, or None when accepted)
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("zone", "eu-1", None),
            ("com.example.rack_2", "r 12", None),
            ("a", "", None),
            (&long_key, &long_value, None),
            ("", "x", Some("1 to 63")),
            (&too_long_key, "x", Some("1 to 63")),
            ("zone/a", "x", Some("letters, digits")),
            ("zone a", "x", Some("letters, digits")),
            ("z\u{e9}ne", "x", Some("letters, digits")),
            (".zone", "x", Some("start and end")),
            ("zone-", "x", Some("start and end")),
            ("zone", &too_long_value, Some("255")),
            ("zone", "a\nb", Some("control")),
            ("zone", " a", Some("space")),
            ("zone", "a==b", Some("'=='")),
            ("zone", "a!=b", Some("'=='")),
        ];
        for (key, value, want) in cases {
            let got = check_label(key, value);
            match want {
                None => assert_eq!(got, Ok(()), "{key:?}={value:?}"),
                Some(needle) => {
                    let e = got
                        .expect_err(&format!("{key:?}={value:?} accepted"))
                        .to_string();
                    assert!(e.contains(needle), "{key:?}={value:?}: {e}");
                }
            }
        }
        let many: BTreeMap<String, String> = (0..=MAX_HOST_LABELS)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert_eq!(
            check_host_labels(&many),
            Err(LabelError::TooMany(MAX_HOST_LABELS + 1))
        );
        let enough: BTreeMap<String, String> = many.into_iter().take(MAX_HOST_LABELS).collect();
        assert_eq!(check_host_labels(&enough), Ok(()));
    }
}

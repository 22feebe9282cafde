//! Nodes: the hosts that run an agent, as the store records them (identity, address, the
//! operator's labels and availability, the capacity the agent reported). Plain data: the store
//! changes them, placement and the dispatcher read them.

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

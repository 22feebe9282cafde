//! The seam between the Raft node and the network: the Ready loop hands every outbound raft
//! message to a [`RaftTransport`] and never waits for it. Inbound messages come back through
//! [`RaftHandle::step`](crate::raft_node::RaftHandle::step).
//!
//! Invariants:
//! - `send` never blocks the Ready loop: delivery is fire-and-forget, and a lost message is
//!   harmless because raft-rs retransmits (heartbeats, append probes, vote retries).
//! - Batching and ordering per peer are the transport's business (the gRPC transport keeps one
//!   stream per peer, DESIGN.md §3); the node only guarantees it calls `send` in Ready order.

use raft::prelude::Message;

/// Carries raft messages to peers. Each message names its destination in `to`.
pub trait RaftTransport: Send + Sync + 'static {
    /// Queues `msgs` for delivery and returns at once.
    fn send(&self, msgs: Vec<Message>);
}

/// The transport of a one-member group: there is nobody to talk to, so messages are discarded.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopTransport;

impl RaftTransport for NoopTransport {
    fn send(&self, msgs: Vec<Message>) {
        if !msgs.is_empty() {
            tracing::trace!(n = msgs.len(), "no peers: discarding raft messages");
        }
    }
}

//! Generated gRPC/protobuf code for Rudder's API (proto/rudder.proto), and the few wire
//! constants both ends must agree on. Conversion to domain types happens at the edges, in the
//! crates that use them.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("rudder.v1");
}

/// Metadata a follower sets when it refuses an agent's session: the leader's gRPC `host:port`.
pub const LEADER_METADATA: &str = "rudder-leader";

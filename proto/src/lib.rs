//! Generated gRPC/protobuf code for Rudder's API (proto/rudder.proto), and the few wire
//! constants both ends must agree on. Conversion to domain types happens at the edges, in the
//! crates that use them.
#![allow(clippy::all)]
#![warn(missing_docs)]

/// The generated types and services of package `rudder.v1`: their docs are the comments in
/// `rudder.proto`, which prost copies where it can.
#[allow(missing_docs)]
pub mod v1 {
    tonic::include_proto!("rudder.v1");
}

#[cfg(feature = "model")]
pub mod model;

/// The encoded `FileDescriptorSet` of rudder.proto: what the descriptor snapshot test renders
/// and compares with `proto/rudder.pb.txt`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rudder_descriptor.bin"));

/// Metadata a follower sets when it refuses an agent's session: the leader's gRPC `host:port`.
pub const LEADER_METADATA: &str = "rudder-leader";

/// `Register.features`: the agent applies `Assignments` that carry only what changed
/// (`changes_only`), so the controller need not re-send a node's whole task list, every spec
/// encoded again, whenever one task is added (issue 20).
pub const FEATURE_ASSIGNMENT_CHANGES: &str = "assignment-changes";

/// An error and its sources, `: `-separated: tonic's transport errors say only "transport
/// error" at the top, and the reason (refused, timed out, a bad certificate) is below. A source
/// whose words its parent already said is left out.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    let mut last = s.clone();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !last.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        last = msg;
        cur = c.source();
    }
    s
}

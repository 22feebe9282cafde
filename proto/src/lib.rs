//! Generated gRPC/protobuf code for Rudder's API (proto/rudder.proto). Nothing else lives here:
//! conversion to domain types happens at the edges, in the crates that use them.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("rudder.v1");
}

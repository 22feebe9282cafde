//! Commands the controller's unit tests build their stores from.

use rudder_model::store::{NodeResources, NodeRole};
use rudder_model::Command;

/// A ready worker node `id` at `10.0.0.<ip>:4243`.
pub fn put_node(id: &str, ip: u8) -> Command {
    Command::PutNode {
        id: id.into(),
        hostname: format!("host-{id}"),
        addr: format!("10.0.0.{ip}:4243"),
        labels: Default::default(),
        role: NodeRole::Worker,
        resources: NodeResources::default(),
        now: 1,
        cert_not_after: 0,
        host_labels: Default::default(),
    }
}

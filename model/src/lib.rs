//! Rudder's pure model: the types users declare (specs, manifests), the replicated store and its
//! deterministic state machine, the scheduler and the reconciler. Nothing here does I/O or reads
//! a clock, so every decision can be replayed and tested with plain data.

#![warn(missing_docs)]

pub mod apply;
pub mod autoscale;
pub mod compat;
pub mod compose;
pub mod depends;
pub mod diff;
pub mod duration;
pub mod events;
pub mod fanout;
pub mod format;
pub mod health;
pub mod job;
pub mod manifest;
pub mod network;
pub mod node;
pub mod ports;
pub mod rebalance;
pub mod reconcile;
pub mod runtime_options;
pub mod scheduler;
pub mod secret;
pub mod shared;
pub mod slotvol;
pub mod snapshot;
pub mod spec;
pub mod stack;
pub mod store;
pub mod task;
pub mod task_record;
pub mod update;
pub mod views;
pub mod volume;
pub mod wire;

pub use manifest::{Manifest, ManifestError};
pub use spec::ServiceSpec;
pub use store::{
    Availability, Command, Envelope, Node, NodeResources, NodeRole, NodeState, Service, Store,
    Task, TaskStatus,
};
pub use task::TaskState;
pub use update::{UpdateConfig, UpdateState, UpdateStatus};

/// A semantic problem with a spec, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The dotted path of the field at fault.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

//! What the Control API's handlers share: the raft handle they read and propose through, the
//! dialer to agents, this controller's registry and data at rest. `api.rs` owns the service
//! that holds one; the `*_api` modules take it by reference, so they depend on this module
//! and never on `api.rs`.

use std::sync::Arc;

use crate::agents::AgentDialer;
use crate::raft_node::RaftHandle;

pub struct ApiContext {
    pub raft: RaftHandle,
    /// The registry's `host:port`, as agents pull from it.
    pub registry: String,
    /// How to reach agents (mutual TLS with this controller's latest certificate).
    pub agents: AgentDialer,
    /// This controller's registry, where `Commit` and `Build` store images.
    pub images: crate::registry::RegistryState,
    /// Nodes running a build, which may pull any image from the registry meanwhile.
    pub pull_leases: Arc<crate::registry::tls::PullLeases>,
    /// This controller's data at rest and its data key (`RotateDataKey`); `None` in tests
    /// without a data dir.
    pub at_rest: Option<Arc<crate::security::AtRest>>,
    /// The tasks' usage samples from the agents' heartbeats (leader only): `Stats`.
    pub usage: Arc<crate::usage::UsageBook>,
    /// The port this controller serves the dashboard on (`DashboardToken` tells `rctl`).
    pub dashboard_port: Option<u16>,
}

//! The replicated store and its state machine.
//!
//! Invariants:
//! - `apply` is pure and deterministic: no clock, randomness or I/O. Times and IDs arrive stamped
//!   inside the command (the leader stamps them before proposing), so every replica that applies
//!   the same log reaches the same store.
//! - Every object's `version` is the Raft index of the command that last wrote it.
//! - Commands travel in a versioned envelope; an unknown version is refused, never guessed at.
//! - A user's spec is stored as given; only the controller writes `desired_state`, only agents'
//!   reports (via the dispatcher) write observed status, and observed states only move forward.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::shared::Shared;
use crate::spec::ServiceSpec;
use crate::task::TaskState;
use crate::update::{UpdateState, UpdateStatus};

pub use crate::node::{Availability, Node, NodeResources, NodeRole, NodeState};

/// Wire version of [`Command`] envelopes this build understands.
pub const COMMAND_VERSION: u32 = 1;

/// The key of a certificate identity in [`Store::revoked`]: its role and its CN. Keyed by both,
/// so that a worker that joined under an admin's name cannot get that admin revoked.
pub fn identity_key(role: &str, cn: &str) -> String {
    format!("{role}:{cn}")
}

/// Why and when an identity (a certificate CN: a node id, `controller-<raft id>`, an admin
/// name) was revoked. Revoked identities are refused at every request and never issued again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Milliseconds since the epoch, stamped by the leader.
    pub at: u64,
    /// Why, as the admin gave it.
    pub reason: String,
}

/// A service: its spec and what the system keeps about its rollouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Generated on creation; tasks refer to it.
    pub id: String,
    /// The spec in force.
    pub spec: ServiceSpec,
    /// Raft index at which the spec last changed in a way that affects tasks (see
    /// `ServiceSpec::same_task_spec`), by `PutService` or `Rollback`. It names the current
    /// rollout: tasks created during it carry the same `spec_version`.
    pub spec_version: u64,
    /// Milliseconds since the epoch, stamped by the leader.
    pub created_at: u64,
    /// Milliseconds since the epoch, stamped by the leader.
    pub updated_at: u64,
    /// Raft index of its last write.
    pub version: u64,
    /// System-owned: the spec in force before the latest task-affecting change, which a
    /// rollback returns to (and which then becomes the spec rolled back from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_spec: Option<ServiceSpec>,
    /// System-owned: the latest rollout's progress; `None` until the spec first changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_status: Option<UpdateStatus>,
    /// System-owned: the service's virtual IP on each of its networks (by network name), for
    /// `endpoint_mode: vip`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vips: BTreeMap<String, std::net::Ipv4Addr>,
    /// System-owned: the last rebalance (`rctl rebalance`, `rebalance: auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<crate::rebalance::RebalanceStatus>,
    /// System-owned: the autoscaler's last decisions, oldest first (at most
    /// `autoscale::KEPT_DECISIONS`), for `rctl describe`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub autoscale_decisions: Vec<crate::autoscale::Decision>,
}

/// What an agent last reported about a task (or what the controller concluded for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// The state reached.
    pub state: TaskState,
    /// Human-readable progress or reason (e.g. why a task is pending or rejected).
    #[serde(default)]
    pub message: String,
    /// Why the task failed or was rejected, if it did.
    #[serde(default)]
    pub error: String,
    /// The runtime's container id, once there is one.
    #[serde(default)]
    pub container_id: String,
    /// The container's exit code, once it exited.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Milliseconds since the epoch when this state was reached.
    pub timestamp: u64,
}

/// One replica slot's attempt on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Generated on creation.
    pub id: String,
    /// The service it belongs to.
    pub service_id: String,
    /// The service's name, kept for display after the service is gone.
    pub service_name: String,
    /// Replica slot, 1-based; a restarted or updated replica keeps its slot. 0 for tasks of
    /// global services, whose identity is `target_node` instead.
    pub slot: u64,
    /// Frozen copy of the spec this task was created from; one copy is shared by the tasks
    /// of a rollout (see [`crate::shared`]).
    pub spec: crate::shared::Shared<ServiceSpec>,
    /// The service's `spec_version` when the task was created: the rollout it belongs to.
    pub spec_version: u64,
    /// The node it is placed on; `None` while pending.
    pub node_id: Option<String>,
    /// Global services only: the node this task exists for. The scheduler considers no other
    /// node, and the reconciler groups a global service's tasks by it (as slots do elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// What the controller wants: `running`, or `shutdown` to stop it.
    pub desired_state: TaskState,
    /// What its agent last reported.
    pub status: TaskStatus,
    /// When the task first reported `running` (its node's timestamp): the start of its rollout
    /// monitor window. Kept after the task ends, to tell an early failure from a late one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_at: Option<u64>,
    /// When the controller asked it to stop (the leader's clock, ms since the epoch): the start
    /// of its stop grace period. A slot's next task waits for this task to be observed ended,
    /// or for its node to be lost and the grace to have passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_requested_at: Option<u64>,
    /// The task's address on each of its spec's networks, given when it is assigned a node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<crate::network::Attachment>,
    /// Milliseconds since the epoch, stamped by the leader.
    pub created_at: u64,
    /// Raft index of its last write.
    pub version: u64,
    /// The manifest digest the spec's image tag named in the cluster registry when the task
    /// was created ([`Store::pinned_digest`]): the agent pulls by digest, so a start needs no
    /// registry round trip when the image is already on the host. `None` for images from
    /// other registries, already pinned, or not (yet) in the cluster registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
}

impl Task {
    /// The reference the agent pulls: the spec's image, pinned to [`Task::image_digest`].
    pub fn image_ref(&self) -> String {
        match &self.image_digest {
            Some(d) => format!("{}@{d}", self.spec.image),
            None => self.spec.image.clone(),
        }
    }

    /// `SERVICE.SLOT.ID-PREFIX` (global: `SERVICE.NODE-PREFIX.ID-PREFIX`), as `rctl ps` shows it.
    pub fn name(&self) -> String {
        let prefix = |s: &str| s.chars().take(8).collect::<String>();
        match &self.target_node {
            Some(node) => format!(
                "{}.{}.{}",
                self.service_name,
                prefix(node),
                prefix(&self.id)
            ),
            None => format!("{}.{}.{}", self.service_name, self.slot, prefix(&self.id)),
        }
    }

    /// The container's hostname: the spec's, else the first 12 characters of the task id (as
    /// Docker uses the container id).
    pub fn hostname(&self) -> String {
        self.spec
            .hostname
            .clone()
            .unwrap_or_else(|| self.id[..self.id.len().min(12)].to_string())
    }

    /// Occupies its node: placed, meant to run and not finished.
    pub fn is_active(&self) -> bool {
        self.node_id.is_some()
            && self.desired_state <= TaskState::Running
            && !self.status.state.is_terminal()
    }

    /// Holds its node's resources (host ports, reservations): placed and not yet observed ended,
    /// whatever its desired state. A task being stopped keeps them until its agent reports it
    /// ended (or its node is lost, which orphans it).
    pub fn holds_resources(&self) -> bool {
        self.node_id.is_some() && !self.status.state.is_terminal()
    }
}

/// A manifest in the cluster registry, by repository and reference (tag or digest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The manifest's digest.
    pub digest: String,
    /// The manifest's media type, as it was pushed.
    pub media_type: String,
}

/// Observed-state report for one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// The task reported on.
    pub task_id: String,
    /// Only reports from the task's own node are applied.
    pub node_id: String,
    /// The task's new status.
    pub status: TaskStatus,
}

impl StatusUpdate {
    /// What `task`'s agent (on `node`) reports when its container (named after the task)
    /// reaches `state` at `now`, with no message or exit code: the report simulated agents in
    /// tests send.
    pub fn of(task: &Task, node: &str, state: TaskState, now: u64) -> StatusUpdate {
        StatusUpdate {
            task_id: task.id.clone(),
            node_id: node.to_string(),
            status: TaskStatus {
                state,
                message: String::new(),
                error: String::new(),
                container_id: task.id.clone(),
                exit_code: None,
                timestamp: now,
            },
        }
    }
}

/// A change to the store: what the raft log carries. Applying one is pure ([`Store::apply`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create or update a service by name. `id` is used only on creation.
    PutService {
        /// The object's id.
        id: String,
        /// The spec as given.
        spec: Box<ServiceSpec>,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// Swap a service's spec with its previous spec (keeping the current `replicas`) and start
    /// rolling back: by hand (`rctl rollback`), or as an update's failure action with `reason`.
    /// The reconciler sets `if_spec_version` to the rollout it judged: if the spec changed since,
    /// the command does nothing.
    Rollback {
        /// The service's name.
        service: String,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
        /// Why, for users to read.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
        /// Apply only if the service is still at this spec version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_spec_version: Option<u64>,
    },
    /// The reconciler's verdict on a rollout (paused, completed). Ignored unless the service is
    /// still at `spec_version`, so a verdict on a superseded rollout never lands on a new one.
    SetUpdateStatus {
        /// The service's name.
        service: String,
        /// The rollout this verdict is about.
        spec_version: u64,
        /// The rollout's new status.
        status: UpdateStatus,
    },
    /// Record a service's rebalance: started (its slots' older tasks are then replaced by the
    /// rollout), completed, or only the nodes `rebalance: auto` has seen.
    SetRebalance {
        /// The service's name.
        service: String,
        /// Applies only if the recorded rebalance still started then (`None`: none recorded),
        /// so a late verdict never overwrites a newer rebalance.
        if_started_at: Option<u64>,
        /// The new status.
        status: crate::rebalance::RebalanceStatus,
    },
    /// The autoscaler's decision: set an autoscaled service's replicas from `decision.from` to
    /// `decision.to` and record it. Ignored when the service no longer autoscales or its count is
    /// no longer `from` (a decision made on a store that has moved on).
    Autoscale {
        /// The service's name.
        service: String,
        /// The change, stamped by the leader.
        decision: crate::autoscale::Decision,
    },
    /// Remove a service; its tasks are asked to shut down and are reaped once stopped.
    RemoveService {
        /// The object's name.
        name: String,
    },
    /// Register or refresh a node, marking it ready. Hostname, address, role and resources are
    /// the agent's to report and always replace the stored ones; `labels` are used only when the
    /// node is new (afterwards labels and availability belong to the operator: `UpdateNode`).
    PutNode {
        /// The object's id.
        id: String,
        /// The host's name, as its agent reports it.
        hostname: String,
        /// The agent API's address, `ip:port`.
        addr: String,
        /// Labels (see the variant for who owns them).
        labels: BTreeMap<String, String>,
        /// The role from the node's certificate.
        #[serde(default)]
        role: NodeRole,
        /// Capacity the agent reports.
        #[serde(default)]
        resources: NodeResources,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
        /// Expiry of the certificate the node's session presented (ms), 0 if unknown.
        #[serde(default)]
        cert_not_after: u64,
        /// The host's own labels (its config's `[labels]`), replacing the node's. A field of
        /// this command rather than a command of its own: a controller of an earlier release
        /// ignores the field and applies the rest, where it would skip an unknown command.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        host_labels: BTreeMap<String, String>,
    },
    /// Operator changes to a node: availability, and labels removed then added.
    UpdateNode {
        /// The object's id.
        id: String,
        /// The new availability, if it changes.
        #[serde(default)]
        availability: Option<Availability>,
        /// Labels to set.
        #[serde(default)]
        labels_add: BTreeMap<String, String>,
        /// Label keys to remove (before `labels_add` is applied).
        #[serde(default)]
        labels_rm: Vec<String>,
    },
    /// Promote (`Some(raft id)`) a node: its agent starts a controller that joins the group.
    SetNodeController {
        /// The object's id.
        id: String,
        /// The raft id its controller starts with.
        raft_id: Option<u64>,
    },
    /// Node went down: its unfinished tasks become orphaned.
    NodeDown {
        /// The object's id.
        id: String,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// `rctl node rm`: the node leaves the cluster for good. Its identity is revoked, its
    /// unfinished tasks are orphaned (and replaced elsewhere), its network slices and volume
    /// copies are forgotten.
    RemoveNode {
        /// The object's id.
        id: String,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// A join token admitted identity `id` of `role` (before its certificate is issued).
    Admit {
        /// The role the token admitted it as.
        role: String,
        /// The identity (CN) admitted.
        id: String,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// `role`'s join token was rotated: every identity it admitted that never registered (or
    /// joined the controller group) is revoked.
    RevokeAdmitted {
        /// The role whose token was rotated.
        role: String,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// Revoke a certificate identity (`id` is [`identity_key`]: role and CN, so that revoking
    /// admin `x` never touches a node named `x`): every request made with it is refused from
    /// now on, and no certificate is issued for it again.
    Revoke {
        /// The identity, as [`identity_key`] makes it.
        id: String,
        /// Why, kept with the revocation.
        reason: String,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// New tasks (placed or pending), from a control-loop pass.
    CreateTasks {
        /// The tasks to create, already placed or pending.
        tasks: Vec<Task>,
    },
    /// Pending tasks placed by the scheduler.
    AssignTasks {
        /// (task id, node id) pairs.
        assignments: Vec<(String, String)>,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// A pending task's reason for not being placed.
    SetPending {
        /// The task.
        task_id: String,
        /// Why, for users to read.
        reason: String,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// New desired states for tasks (shutdown to stop them).
    SetDesired {
        /// (task id, desired state) pairs.
        updates: Vec<(String, TaskState)>,
        /// The leader's clock (ms since the epoch): when a stop was asked for. 0 in entries
        /// written before it existed.
        #[serde(default)]
        now: u64,
    },
    /// Agents' reports on their tasks.
    UpdateStatus {
        /// The reports, applied in order.
        updates: Vec<StatusUpdate>,
    },
    /// Finished tasks beyond the history kept.
    DeleteTasks {
        /// The tasks' ids.
        ids: Vec<String>,
    },
    /// Records manifest `record.digest` in `repo` and, with a tag, points the tag at it.
    PutImage {
        /// The repository.
        repo: String,
        /// The tag to point at it, if any.
        tag: Option<String>,
        /// The manifest's digest and media type.
        record: ImageRecord,
    },
    /// Deletes a tag, or a manifest by digest together with every tag pointing at it.
    DeleteImage {
        /// The repository.
        repo: String,
        /// A tag or a digest.
        reference: String,
    },
    /// Several commands in one log entry, applied in order (one proposal per control-loop pass).
    Batch(Vec<Command>),
    /// The cluster's CA and join tokens: written once at init (`if_absent`), replaced when a
    /// token is rotated. Values are drawn by the proposer, so applying stays pure.
    SetSecrets {
        /// The CA and the join tokens.
        secrets: ClusterSecrets,
        /// Only when none are set yet (init).
        #[serde(default)]
        if_absent: bool,
    },
    /// Create a network, or change an existing one's labels (its shape is fixed: tasks hold
    /// addresses in it). The subnet, when the spec has none, is drawn here from the pool.
    PutNetwork {
        /// The object's id.
        id: String,
        /// The spec as given.
        spec: crate::network::NetworkSpec,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// Remove a network no service uses.
    RemoveNetwork {
        /// The object's name.
        name: String,
    },
    /// A node's agent reported its WireGuard public key.
    SetOverlayKey {
        /// The node's id.
        node: String,
        /// Its public key, base64.
        key: String,
    },
    /// Ask every agent for a new WireGuard key pair (`rctl network rotate-keys`).
    RotateOverlayKeys,
    /// Declare a volume, or change an existing one's labels. (A service that mounts an
    /// undeclared volume declares it too, when its spec is put or rolled back to.)
    PutVolume {
        /// The spec as given.
        spec: crate::volume::VolumeSpec,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// Remove a volume no service mounts; agents then delete their copies of its data.
    RemoveVolume {
        /// The object's name.
        name: String,
    },
    /// The volumes whose data a node's agent holds (its report, replacing the previous one).
    SetVolumeCopies {
        /// The node's id.
        node: String,
        /// Names of the volumes it holds data for.
        volumes: Vec<String>,
    },
    /// Create a secret or config, or give it a new version when `data` differs from the latest
    /// (labels are replaced either way). Every service that references it without a pinned
    /// version then resolves to the new version, which starts its rolling update. `digest`
    /// (`sha256:<hex>` of `data`) is stamped by the proposer.
    PutSecret {
        /// Secret or config.
        kind: crate::secret::ObjectKind,
        /// The object's name.
        name: String,
        /// Labels (see the variant for who owns them).
        #[serde(default)]
        labels: BTreeMap<String, String>,
        /// The content.
        data: crate::secret::SecretData,
        /// `sha256:<hex>` of `data`.
        digest: String,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// Remove a secret or config no service references and no unfinished task uses.
    RemoveSecret {
        /// Secret or config.
        kind: crate::secret::ObjectKind,
        /// The object's name.
        name: String,
    },
    /// Autolock: the cluster's unlock key (`RDRKEK-…`, drawn by the proposer) every controller
    /// wraps its keyring file with; `None` turns autolock off.
    SetUnlockKey {
        /// The new unlock key, or `None` to turn autolock off.
        key: Option<UnlockKeyText>,
    },
    /// Record a stack's deployed version (`rctl stack deploy`, after its objects' commands in
    /// the same batch): one that differs from the version in force replaces it, which becomes
    /// the previous one (see `crate::stack`).
    PutStack {
        /// The stack's name.
        name: String,
        /// The resolved manifests deployed.
        spec: Box<crate::stack::StackSpec>,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// `rctl stack rollback`: the previous version is in force again (its objects' commands
    /// come first in the same batch) and the one rolled back from becomes the previous one.
    RollbackStack {
        /// The stack's name.
        name: String,
        /// The leader's clock (ms since the epoch), stamped by the proposer: applying stays pure.
        now: u64,
    },
    /// Forget a stack's record (`rctl stack rm`, after its services' removal in the same batch).
    RemoveStack {
        /// The stack's name.
        name: String,
    },
    /// The version a node's agent registered with (`rudder_version::full()`), shown by
    /// `rctl node ls`. A controller from before this command refuses it as malformed and goes
    /// on (apply errors leave the store unchanged), so mixed versions keep working.
    SetNodeVersion {
        /// The node.
        id: String,
        /// Its agent's version.
        version: String,
    },
}

/// Autolock's unlock key as text (`RDRKEK-…`); `Debug` never prints it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnlockKeyText(pub String);

impl std::fmt::Debug for UnlockKeyText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnlockKeyText(..)")
    }
}

/// The CA (certificate and signing key, PEM) and the join tokens. Managers only: never sent to
/// agents or clients, never logged.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSecrets {
    /// The CA certificate, PEM.
    pub ca_cert_pem: String,
    /// The CA's signing key, PEM.
    pub ca_key_pem: String,
    /// The join tokens' secrets.
    pub join_tokens: JoinTokenSecrets,
}

/// The join tokens' secrets, one per joinable role, laid out as the controller's `ca` module
/// (`rudder_pki::ca::JoinTokens`) serializes them; the fields are in the order the untyped JSON
/// of earlier builds wrote them (sorted), so the store encodes as before. Every field defaults,
/// so an empty object (tests, a store initialised without tokens) still decodes.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenSecrets {
    /// The CA fingerprint the tokens pin.
    #[serde(default)]
    pub fingerprint: String,
    /// The manager token's secret.
    #[serde(default)]
    pub manager: String,
    /// When the manager token stops admitting (seconds since the epoch); none: until rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager_expires: Option<u64>,
    /// The worker token's secret.
    #[serde(default)]
    pub worker: String,
    /// When the worker token stops admitting, as for `manager_expires`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_expires: Option<u64>,
}

impl std::fmt::Debug for JoinTokenSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTokenSecrets")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ClusterSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSecrets").finish_non_exhaustive()
    }
}

/// What travels in a log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// [`COMMAND_VERSION`] when written; others are refused.
    pub v: u32,
    /// The command.
    pub cmd: Command,
}

impl Envelope {
    /// `cmd` in an envelope of this build's version.
    pub fn new(cmd: Command) -> Self {
        Envelope {
            v: COMMAND_VERSION,
            cmd,
        }
    }
    /// The envelope as JSON, as the log stores it.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("commands always serialize")
    }
    /// An envelope from the log; a version this build does not know is refused first.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, ApplyError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            v: u32,
        }
        let v: VersionOnly =
            serde_json::from_slice(bytes).map_err(|e| ApplyError::Malformed(e.to_string()))?;
        if v.v != COMMAND_VERSION {
            return Err(ApplyError::UnknownVersion(v.v));
        }
        serde_json::from_slice(bytes).map_err(|e| ApplyError::Malformed(e.to_string()))
    }
}

/// Why a command could not be applied (the store is then unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A command of a newer format (a newer controller wrote it).
    #[error(
        "store: command version {0} is not understood by this build (expected {COMMAND_VERSION})"
    )]
    UnknownVersion(u32),
    /// A log entry that does not decode.
    #[error("store: malformed command: {0}")]
    Malformed(String),
    /// The object named does not exist.
    #[error("store: {kind} {name:?} not found")]
    NotFound {
        /// What kind of object.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A rollback of a service that never changed.
    #[error("store: service {0:?} has no previous spec to roll back to")]
    NoPreviousSpec(String),
    /// A network refused (shape, overlap, in use).
    #[error("store: network {name:?}: {message}")]
    Network {
        /// Its name.
        name: String,
        /// Why.
        message: String,
    },
    /// A service refused (its spec, or what it references).
    #[error("store: service {name:?}: {message}")]
    Service {
        /// Its name.
        name: String,
        /// Why.
        message: String,
    },
    /// A volume refused (in use, invalid).
    #[error("store: volume {name:?}: {message}")]
    Volume {
        /// Its name.
        name: String,
        /// Why.
        message: String,
    },
    /// A node refused (unknown, hostname or address taken).
    #[error("store: node {node:?}: {message}")]
    Node {
        /// The node's id.
        node: String,
        /// Why.
        message: String,
    },
    /// A stack refused (too large, nothing to roll back to).
    #[error("store: stack {name:?}: {message}")]
    Stack {
        /// Its name.
        name: String,
        /// Why.
        message: String,
    },
    /// A secret or config refused (in use, too large, invalid).
    #[error("store: {kind} {name:?}: {message}")]
    Secret {
        /// What kind of object.
        kind: crate::secret::ObjectKind,
        /// Its name.
        name: String,
        /// Why.
        message: String,
    },
}

/// The store's tables: persistent ordered maps, so cloning the store (the Ready loop publishes
/// a copy after every batch of commits, and control loops read snapshots) shares structure
/// instead of copying every entry; its cost no longer grows with the store.
pub type Map<K, V> = imbl::OrdMap<K, V>;

/// The whole replicated state. Cheap to clone for control loops (they read a snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    /// By node id.
    pub nodes: Map<String, Node>,
    /// By service name.
    pub services: Map<String, Service>,
    /// By task id.
    pub tasks: Map<String, Task>,
    /// repo → reference (tag, or the manifest's own digest) → manifest. Every manifest of a
    /// repository has an entry under its digest; tags point at those.
    pub images: Map<String, Map<String, ImageRecord>>,
    /// The controllers: raft member id → where to reach it. Changed only by raft membership
    /// changes (the addresses travel in the conf change's context), never by a command.
    #[serde(default)]
    pub managers: Map<u64, ManagerInfo>,
    /// The cluster CA and join tokens (`None` until the first controller initialised them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<ClusterSecrets>,
    /// Overlay networks, by name.
    #[serde(default)]
    pub networks: Map<String, crate::network::Network>,
    /// Generation of the nodes' WireGuard keys (see `RotateOverlayKeys`).
    #[serde(default)]
    pub overlay_key_epoch: u64,
    /// Named volumes, by name.
    #[serde(default)]
    pub volumes: Map<String, crate::volume::Volume>,
    /// Node id → the volumes whose data its host holds, as its agent last reported.
    #[serde(default)]
    pub volume_copies: Map<String, std::collections::BTreeSet<String>>,
    /// Revoked certificate identities ([`identity_key`]), never to be served or issued again.
    #[serde(default)]
    pub revoked: Map<String, Revocation>,
    /// Identities a join token admitted ([`identity_key`] → when, ms) that have not registered
    /// (nodes) or become members (controllers) yet. Rotating a role's token revokes its
    /// admitted ones, so a certificate minted with a leaked token and kept for later dies with
    /// the token.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub admitted: Map<String, u64>,
    /// Users' secrets (`rctl secret`), by name. Values travel only to the nodes whose tasks use
    /// them (see `crate::secret`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub secret_objects: Map<String, crate::secret::SecretObject>,
    /// Users' configs (`rctl config`), by name.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub config_objects: Map<String, crate::secret::SecretObject>,
    /// Autolock's unlock key (`RDRKEK-…`), `None` while autolock is off. Only inside the
    /// log's encryption at rest; never sent to agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlock_key: Option<UnlockKeyText>,
    /// Stacks (`rctl stack deploy`), by name: each one's deployed version and the one before.
    /// Not written while empty, and absent from stores of earlier builds (which still load).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub stacks: Map<String, crate::stack::Stack>,
    /// Node id → the version its agent last registered with ([`Command::SetNodeVersion`]).
    /// Not written while empty, absent from stores of earlier builds.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub node_versions: Map<String, String>,
    /// Index of the last applied entry.
    pub applied: u64,
    /// Node id → the tasks placed there, derived from `tasks` (never serialized).
    #[serde(skip)]
    pub(crate) node_tasks: NodeTasks,
}

/// Node id → ids of the tasks placed on it (any state): what [`Store::tasks_on`] and a node's
/// loss read. Without it each `NodeDown` scanned every task: at 5,000 hosts and 150,000 tasks,
/// thousands of sessions timing out at once cost the leader's raft thread minutes of scans
/// and its proposals timed out (issue 20).
///
/// Derived state: not serialized, and equal to any other (two stores are equal when their
/// tables are). It is built from `tasks` when a store is decoded (`snapshot::decode`, through
/// [`Store::build_indexes`]) or, for a store made otherwise, by its first [`Store::apply`], and kept by the commands that place a task (`CreateTasks`, `AssignTasks`) or
/// delete one (`DeleteTasks`): those are the only writers of a task's `node_id`. Code that
/// edits `tasks` directly (tests) must not change a placed task's node afterwards.
#[derive(Clone, Default)]
pub(crate) struct NodeTasks(Option<Map<String, imbl::OrdSet<String>>>);

impl PartialEq for NodeTasks {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for NodeTasks {}

impl std::fmt::Debug for NodeTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeTasks")
    }
}

impl NodeTasks {
    /// Whether the index was built (a decoded store has none until [`Store::build_indexes`]).
    #[cfg(test)]
    pub(crate) fn is_built(&self) -> bool {
        self.0.is_some()
    }

    fn build(tasks: &Map<String, Task>) -> NodeTasks {
        let mut ix = Map::<String, imbl::OrdSet<String>>::new();
        for t in tasks.values() {
            if let Some(n) = &t.node_id {
                ix.entry(n.clone()).or_default().insert(t.id.clone());
            }
        }
        NodeTasks(Some(ix))
    }

    fn placed(&mut self, node: &str, task: &str) {
        if let Some(ix) = &mut self.0 {
            ix.entry(node.to_string())
                .or_default()
                .insert(task.to_string());
        }
    }

    fn removed(&mut self, node: &str, task: &str) {
        if let Some(ix) = &mut self.0 {
            if let Some(ids) = ix.get_mut(node) {
                ids.remove(task);
                if ids.is_empty() {
                    ix.remove(node);
                }
            }
        }
    }

    /// The ids of the tasks on `node`, once built.
    fn on(&self, node: &str) -> Option<Vec<&String>> {
        let ix = self.0.as_ref()?;
        Some(
            ix.get(node)
                .map(|ids| ids.iter().collect())
                .unwrap_or_default(),
        )
    }
}

/// How to reach one controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerInfo {
    /// gRPC `host:port` (control API, dispatcher, raft peers).
    pub addr: String,
    /// Registry `host:port`.
    pub registry: String,
}

/// The named service, or the `NotFound` error commands report.
fn service_mut<'a>(
    services: &'a mut Map<String, Service>,
    name: &str,
) -> Result<&'a mut Service, ApplyError> {
    services.get_mut(name).ok_or_else(|| ApplyError::NotFound {
        kind: "service",
        name: name.to_string(),
    })
}

/// Makes `t` hold the copy of its spec already in `specs` for its rollout (service id and
/// spec version) when the two are equal, or records its copy there.
fn share_spec(specs: &mut HashMap<(String, u64), Shared<ServiceSpec>>, t: &mut Task) {
    let key = (t.service_id.clone(), t.spec_version);
    match specs.get(&key) {
        Some(s) if Shared::same(s, &t.spec) => {}
        Some(s) if **s == *t.spec => t.spec = s.clone(),
        Some(_) => {}
        None => {
            specs.insert(key, t.spec.clone());
        }
    }
}

impl Store {
    /// Builds the derived indexes a decoded store lacks (they are not serialized). Until then
    /// [`Store::tasks_on`] scans every task: a controller that installed a 150,000-task
    /// snapshot and then won an election did that scan for each of 5,000 agent sessions, and
    /// took half a minute to serve again (issue 20). Idempotent.
    pub fn build_indexes(&mut self) {
        if self.node_tasks.0.is_none() {
            self.node_tasks = NodeTasks::build(&self.tasks);
        }
    }

    /// Folds the equal specs of each rollout's tasks into one shared copy: a decoded store
    /// (a snapshot, a backup) holds one copy per task, as the format has one per task.
    pub fn share_task_specs(&mut self) {
        let mut specs = HashMap::new();
        let ids: Vec<String> = self.tasks.keys().cloned().collect();
        for id in ids {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            let key = (t.service_id.clone(), t.spec_version);
            match specs.get(&key) {
                None => {
                    specs.insert(key, t.spec.clone());
                }
                Some(s) if !Shared::same(s, &t.spec) && **s == *t.spec => {
                    let s = s.clone();
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.spec = s;
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// Records a membership change applied at `index`: `Some` adds or updates the member,
    /// `None` removes it.
    pub fn set_manager(&mut self, index: u64, id: u64, info: Option<ManagerInfo>) {
        self.applied = index;
        match info {
            Some(i) => {
                self.admitted
                    .remove(&identity_key("manager", &format!("controller-{id}")));
                self.managers.insert(id, i);
            }
            None => {
                self.managers.remove(&id);
            }
        }
        // A node's role follows the controllers on its host (placement sees `node.role`).
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        for n in ids {
            let runs = self
                .nodes
                .get(&n)
                .is_some_and(|node| self.runs_controller(node));
            if let Some(node) = self.nodes.get_mut(&n) {
                let role = if runs {
                    NodeRole::Manager
                } else {
                    NodeRole::Worker
                };
                if node.role != role {
                    node.role = role;
                    node.version = index;
                }
            }
        }
    }

    /// Applies one committed entry. Errors leave the store unchanged for that command (a batch
    /// applies what it can: its parts race with other writers by design).
    pub fn apply(&mut self, index: u64, cmd: Command) -> Result<(), ApplyError> {
        self.applied = index;
        self.build_indexes();
        // Commands that can leave a secret's or config's old version unused.
        let releases = matches!(
            cmd,
            Command::PutService { .. }
                | Command::Rollback { .. }
                | Command::RemoveService { .. }
                | Command::PutSecret { .. }
                | Command::UpdateStatus { .. }
                | Command::DeleteTasks { .. }
                | Command::NodeDown { .. }
                | Command::RemoveNode { .. }
                | Command::Batch(_)
        );
        let r = self.apply_one(index, cmd);
        if releases {
            self.prune_secret_versions();
        }
        r
    }

    fn apply_one(&mut self, index: u64, cmd: Command) -> Result<(), ApplyError> {
        match cmd {
            Command::PutService { id, mut spec, now } => {
                self.check_service(&spec)?;
                let name = spec.name.clone();
                self.resolve_refs(&mut spec);
                self.put_service(index, id, spec, now);
                self.assign_vips(&name);
                self.declare_volumes(index, &name, now);
            }
            Command::PutVolume { spec, now } => self.put_volume(index, spec, now),
            Command::PutStack { name, spec, now } => {
                crate::stack::put(self, index, name, *spec, now)?
            }
            Command::RollbackStack { name, now } => {
                crate::stack::rollback(self, index, &name, now)?
            }
            Command::SetNodeVersion { id, version } => {
                if !self.nodes.contains_key(&id) {
                    return Err(ApplyError::NotFound {
                        kind: "node",
                        name: id,
                    });
                }
                self.node_versions.insert(id, version);
            }
            Command::RemoveStack { name } => {
                self.stacks.remove(&name).ok_or(ApplyError::NotFound {
                    kind: "stack",
                    name,
                })?;
            }
            Command::RemoveVolume { name } => {
                let users = self.volume_users(&name);
                if !users.is_empty() {
                    return Err(ApplyError::Volume {
                        message: format!("in use by service(s) {}", users.join(", ")),
                        name,
                    });
                }
                if let Some(task) = crate::slotvol::live_user(self, &name) {
                    return Err(ApplyError::Volume {
                        message: format!("in use by task {task}"),
                        name,
                    });
                }
                self.volumes.remove(&name).ok_or(ApplyError::NotFound {
                    kind: "volume",
                    name,
                })?;
            }
            Command::SetVolumeCopies { node, volumes } => {
                let volumes: std::collections::BTreeSet<String> = volumes.into_iter().collect();
                if volumes.is_empty() {
                    self.volume_copies.remove(&node);
                } else if self.volume_copies.get(&node) != Some(&volumes) {
                    self.volume_copies.insert(node, volumes);
                }
            }
            Command::PutNetwork { id, spec, now } => self.put_network(index, id, spec, now)?,
            Command::RemoveNetwork { name } => {
                if let Some(svc) = self
                    .services
                    .values()
                    .find(|s| s.spec.networks.contains(&name))
                {
                    return Err(ApplyError::Network {
                        name,
                        message: format!("in use by service {:?}", svc.spec.name),
                    });
                }
                self.networks.remove(&name).ok_or(ApplyError::NotFound {
                    kind: "network",
                    name,
                })?;
            }
            Command::SetOverlayKey { node, key } => {
                let n = self.nodes.get_mut(&node).ok_or(ApplyError::NotFound {
                    kind: "node",
                    name: node.clone(),
                })?;
                if n.overlay_key != key {
                    n.overlay_key = key;
                    n.version = index;
                }
            }
            Command::RotateOverlayKeys => self.overlay_key_epoch += 1,
            Command::Rollback {
                service,
                now,
                reason,
                if_spec_version,
            } => {
                let svc = service_mut(&mut self.services, &service)?;
                if if_spec_version.is_some_and(|v| v != svc.spec_version) {
                    return Ok(());
                }
                let mut back = svc
                    .previous_spec
                    .take()
                    .ok_or_else(|| ApplyError::NoPreviousSpec(service.clone()))?;
                // Scaling is not part of a rollout (it replaces nothing), so it is not undone.
                back.replicas = svc.spec.replicas;
                svc.previous_spec = Some(std::mem::replace(&mut svc.spec, back));
                svc.spec_version = index;
                svc.update_status = Some(UpdateStatus {
                    state: UpdateState::RollbackStarted,
                    message: if reason.is_empty() {
                        "rollback requested".into()
                    } else {
                        reason
                    },
                    started_at: now,
                    completed_at: None,
                });
                svc.updated_at = now;
                svc.version = index;
                self.assign_vips(&service);
                self.declare_volumes(index, &service, now);
            }
            Command::SetUpdateStatus {
                service,
                spec_version,
                status,
            } => {
                let svc = service_mut(&mut self.services, &service)?;
                if svc.spec_version == spec_version && svc.update_status.as_ref() != Some(&status) {
                    svc.update_status = Some(status);
                    svc.version = index;
                }
            }
            Command::SetRebalance {
                service,
                if_started_at,
                status,
            } => {
                let svc = service_mut(&mut self.services, &service)?;
                let current = svc.rebalance.as_ref().map(|r| r.started_at);
                if current == if_started_at && svc.rebalance.as_ref() != Some(&status) {
                    svc.rebalance = Some(status);
                    svc.version = index;
                }
            }
            Command::Autoscale { service, decision } => {
                let svc = service_mut(&mut self.services, &service)?;
                crate::autoscale::apply(svc, index, decision);
            }
            Command::RemoveService { name } => {
                let svc = self.services.remove(&name).ok_or(ApplyError::NotFound {
                    kind: "service",
                    name: name.clone(),
                })?;
                // Only the tasks that change are touched (the map shares the rest).
                let ids: Vec<String> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| {
                        t.service_id == svc.id && t.desired_state < TaskState::Shutdown
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for id in ids {
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.desired_state = TaskState::Shutdown;
                        t.version = index;
                    }
                }
            }
            Command::PutNode {
                id,
                hostname,
                addr,
                labels,
                role,
                resources,
                now,
                cert_not_after,
                host_labels,
            } => {
                // One node per hostname and per host address, checked here so that two
                // registrations racing cannot both pass (constraints, `--node` and the
                // controller-host rule go by them).
                let ip = |a: &str| a.rsplit_once(':').map_or(a, |(h, _)| h).to_string();
                if let Some(other) = self.nodes.values().find(|n| {
                    n.id != id
                        && ((!hostname.is_empty() && n.hostname == hostname)
                            || (!ip(&addr).is_empty() && ip(&n.addr) == ip(&addr)))
                }) {
                    let what = if other.hostname == hostname {
                        format!("hostname {hostname}")
                    } else {
                        format!("address {}", ip(&addr))
                    };
                    return Err(ApplyError::Node {
                        node: id,
                        message: format!(
                            "{what} belongs to node {} already; remove it (`rctl node rm`) first",
                            other.id
                        ),
                    });
                }
                if self
                    .nodes
                    .values()
                    .any(|n| n.id != id && !n.hostname.is_empty() && n.hostname == id)
                {
                    return Err(ApplyError::Node {
                        node: id.clone(),
                        message: format!("{id} is another node's hostname"),
                    });
                }
                // Registered: no longer an admitted identity waiting (see `admitted`).
                for role in ["worker", "manager"] {
                    self.admitted.remove(&identity_key(role, &id));
                }
                match self.nodes.get_mut(&id) {
                    Some(node) => {
                        node.hostname = hostname;
                        node.addr = addr;
                        node.role = role;
                        node.resources = resources;
                        node.cert_not_after = cert_not_after;
                        node.host_labels = host_labels;
                        node.state = NodeState::Ready;
                        node.updated_at = now;
                        node.version = index;
                    }
                    None => {
                        let node = Node {
                            id: id.clone(),
                            hostname,
                            addr,
                            labels,
                            host_labels,
                            role,
                            availability: Availability::Active,
                            resources,
                            state: NodeState::Ready,
                            updated_at: now,
                            version: index,
                            controller_id: None,
                            overlay_key: String::new(),
                            cert_not_after,
                        };
                        // Every node has a slice of every network, so it can route and publish
                        // for all of them.
                        let names: Vec<String> = self.networks.keys().cloned().collect();
                        for n in names {
                            if let Some(net) = self.networks.get_mut(&n) {
                                net.ensure_slice(&id);
                            }
                        }
                        self.nodes.insert(id, node);
                    }
                }
            }
            Command::UpdateNode {
                id,
                availability,
                labels_add,
                labels_rm,
            } => {
                let node = self.nodes.get_mut(&id).ok_or(ApplyError::NotFound {
                    kind: "node",
                    name: id.clone(),
                })?;
                if let Some(a) = availability {
                    node.availability = a;
                }
                for k in labels_rm {
                    node.labels.remove(&k);
                }
                node.labels.extend(labels_add);
                node.version = index;
            }
            Command::NodeDown { id, now } => {
                let node = self.nodes.get_mut(&id).ok_or(ApplyError::NotFound {
                    kind: "node",
                    name: id.clone(),
                })?;
                node.state = NodeState::Down;
                node.updated_at = now;
                node.version = index;
                self.orphan_tasks_on(index, &id, "node down", now);
            }
            Command::RemoveNode { id, now } => {
                if self.nodes.remove(&id).is_none() {
                    return Err(ApplyError::NotFound {
                        kind: "node",
                        name: id,
                    });
                }
                self.orphan_tasks_on(index, &id, "node removed", now);
                let names: Vec<String> = self.networks.keys().cloned().collect();
                for n in names {
                    if let Some(net) = self.networks.get_mut(&n) {
                        net.slices.remove(&id);
                    }
                }
                self.volume_copies.remove(&id);
                self.node_versions.remove(&id);
                // An agent's certificate is a worker's, or a manager's if it joined with a
                // manager token: both go.
                for role in ["worker", "manager"] {
                    self.revoked.insert(
                        identity_key(role, &id),
                        Revocation {
                            at: now,
                            reason: "node removed".into(),
                        },
                    );
                }
            }
            Command::Admit { role, id, now } => {
                self.admitted.insert(identity_key(&role, &id), now);
            }
            Command::RevokeAdmitted { role, now } => {
                let prefix = identity_key(&role, "");
                let stale: Vec<String> = self
                    .admitted
                    .keys()
                    .filter(|k| k.starts_with(&prefix))
                    .cloned()
                    .collect();
                for k in stale {
                    self.admitted.remove(&k);
                    self.revoked.entry(k).or_insert(Revocation {
                        at: now,
                        reason: format!("admitted by a {role} join token since rotated"),
                    });
                }
            }
            Command::Revoke { id, reason, now } => {
                self.revoked
                    .entry(id)
                    .or_insert(Revocation { at: now, reason });
            }
            Command::CreateTasks { tasks } => {
                // Tasks of one rollout share one copy of their spec.
                let mut specs: HashMap<(String, u64), Shared<ServiceSpec>> = HashMap::new();
                for mut t in tasks {
                    share_spec(&mut specs, &mut t);
                    t.version = index;
                    if self.tasks.contains_key(&t.id) {
                        continue;
                    }
                    // Placed on a node that went down since the placement was decided (see
                    // `AssignTasks`): created unplaced instead, for the scheduler's next pass.
                    if t.status.state == TaskState::Assigned && self.placed_on_down_node(&t) {
                        t.node_id = None;
                        t.status.state = TaskState::Pending;
                        t.status.message = "waiting for a node".into();
                    }
                    // Tasks placed as they are created get their addresses now.
                    let placed = t
                        .node_id
                        .clone()
                        .filter(|_| !t.spec.networks.is_empty() && t.networks.is_empty());
                    let (id, now) = (t.id.clone(), t.status.timestamp);
                    let claims = t.node_id.is_some();
                    if let Some(n) = &t.node_id {
                        self.node_tasks.placed(n, &id);
                    }
                    self.tasks.insert(id.clone(), t);
                    if claims {
                        self.claim_slot_volumes(index, &id, now);
                    }
                    if let Some(node) = placed {
                        self.attach_or_reject(&id, &node, now);
                    }
                }
            }
            Command::AssignTasks { assignments, now } => {
                for (task_id, node_id) in assignments {
                    // Placed from a view in which the node was still ready, committed after
                    // it went down: nothing would ever orphan the task (the node's tasks were
                    // orphaned already), so its slot would never run. It stays unplaced and
                    // the scheduler's next pass places it again.
                    if self.node_is_down(&node_id) {
                        continue;
                    }
                    let Some(t) = self.tasks.get_mut(&task_id) else {
                        continue;
                    };
                    if t.node_id.is_some() || t.desired_state > TaskState::Running {
                        continue;
                    }
                    t.node_id = Some(node_id.clone());
                    self.node_tasks.placed(&node_id, &task_id);
                    t.status = TaskStatus {
                        state: TaskState::Assigned,
                        message: "assigned".into(),
                        error: String::new(),
                        container_id: String::new(),
                        exit_code: None,
                        timestamp: now,
                    };
                    t.version = index;
                    let networked = !t.spec.networks.is_empty();
                    self.claim_slot_volumes(index, &task_id, now);
                    if networked {
                        self.attach_or_reject(&task_id, &node_id, now);
                    }
                }
            }
            Command::SetPending {
                task_id,
                reason,
                now,
            } => {
                if let Some(t) = self.tasks.get_mut(&task_id) {
                    if t.node_id.is_none() {
                        t.status.state = TaskState::Pending;
                        t.status.message = reason;
                        t.status.timestamp = now;
                        t.version = index;
                    }
                }
            }
            Command::SetDesired { updates, now } => {
                for (task_id, state) in updates {
                    if let Some(t) = self.tasks.get_mut(&task_id) {
                        // Desired state also only moves forward.
                        if state > t.desired_state {
                            if state >= TaskState::Shutdown && t.stop_requested_at.is_none() {
                                t.stop_requested_at = Some(now);
                            }
                            t.desired_state = state;
                            t.version = index;
                        }
                    }
                }
            }
            Command::UpdateStatus { updates } => {
                for u in updates {
                    if let Some(t) = self.tasks.get_mut(&u.task_id) {
                        // An orphaned task's own node, back again, may still tell how it
                        // really ended (its exit code would be lost otherwise).
                        let settles_orphan = t.status.state == TaskState::Orphaned
                            && u.status.state.is_terminal()
                            && u.status.state != TaskState::Orphaned;
                        if t.node_id.as_deref() == Some(u.node_id.as_str())
                            && (t.status.state.can_advance_to(u.status.state) || settles_orphan)
                        {
                            if u.status.state == TaskState::Running && t.running_at.is_none() {
                                t.running_at = Some(u.status.timestamp);
                            }
                            t.status = u.status;
                            t.version = index;
                        }
                    }
                }
            }
            Command::DeleteTasks { ids } => {
                for id in ids {
                    if let Some(Task {
                        node_id: Some(n), ..
                    }) = self.tasks.remove(&id)
                    {
                        self.node_tasks.removed(&n, &id);
                    }
                }
            }
            Command::PutImage { repo, tag, record } => {
                let refs = self.images.entry(repo).or_default();
                refs.insert(record.digest.clone(), record.clone());
                if let Some(tag) = tag {
                    refs.insert(tag, record);
                }
            }
            Command::SetNodeController { id, raft_id } => {
                let node = self.nodes.get_mut(&id).ok_or(ApplyError::NotFound {
                    kind: "node",
                    name: id.clone(),
                })?;
                node.controller_id = raft_id;
                // It runs a controller from now on (placement sees `node.role`), or no longer.
                node.role = if raft_id.is_some() {
                    NodeRole::Manager
                } else {
                    NodeRole::Worker
                };
                node.version = index;
            }
            Command::SetSecrets { secrets, if_absent } => {
                if !(if_absent && self.secrets.is_some()) {
                    self.secrets = Some(secrets);
                }
            }
            Command::DeleteImage { repo, reference } => {
                let tags = self.images.get_mut(&repo).ok_or(ApplyError::NotFound {
                    kind: "repository",
                    name: repo.clone(),
                })?;
                let gone = tags.remove(&reference).ok_or(ApplyError::NotFound {
                    kind: "image",
                    name: format!("{repo}:{reference}"),
                })?;
                if reference == gone.digest {
                    let stale: Vec<String> = tags
                        .iter()
                        .filter(|(_, r)| r.digest == gone.digest)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in stale {
                        tags.remove(&k);
                    }
                }
                if tags.is_empty() {
                    self.images.remove(&repo);
                }
            }
            Command::Batch(cmds) => {
                for c in cmds {
                    // Parts of a batch are independent; a missing object skips only its part.
                    let _ = self.apply_one(index, c);
                }
            }
            Command::PutSecret {
                kind,
                name,
                labels,
                data,
                digest,
                now,
            } => self.put_secret(index, kind, name, labels, data, digest, now)?,
            Command::SetUnlockKey { key } => {
                self.unlock_key = key;
            }
            Command::RemoveSecret { kind, name } => {
                let users = self.secret_users(kind, &name);
                if !users.is_empty() {
                    return Err(ApplyError::Secret {
                        kind,
                        name,
                        message: format!("in use by service(s) {}", users.join(", ")),
                    });
                }
                self.objects_mut(kind)
                    .remove(&name)
                    .ok_or(ApplyError::NotFound {
                        kind: kind.as_str(),
                        name,
                    })?;
            }
        }
        Ok(())
    }

    /// Tasks of one service, by service id.
    /// Node `id` is known and down (its tasks were orphaned when it went down).
    fn node_is_down(&self, id: &str) -> bool {
        self.nodes
            .get(id)
            .is_some_and(|n| n.state == NodeState::Down)
    }

    /// Task `t` names a node that is down.
    fn placed_on_down_node(&self, t: &Task) -> bool {
        t.node_id.as_deref().is_some_and(|n| self.node_is_down(n))
    }

    /// Marks the unfinished tasks of node `id` orphaned (their node is gone, for `why`): the
    /// reconciler replaces them elsewhere.
    fn orphan_tasks_on(&mut self, index: u64, id: &str, why: &str, now: u64) {
        let orphans: Vec<String> = self
            .tasks_on(id)
            .filter(|t| !t.status.state.is_terminal())
            .map(|t| t.id.clone())
            .collect();
        for k in &orphans {
            if let Some(t) = self.tasks.get_mut(k) {
                t.status = TaskStatus {
                    state: TaskState::Orphaned,
                    message: why.into(),
                    error: String::new(),
                    container_id: t.status.container_id.clone(),
                    exit_code: None,
                    timestamp: now,
                };
                t.version = index;
            }
        }
    }

    /// The secrets or the configs.
    pub fn objects(
        &self,
        kind: crate::secret::ObjectKind,
    ) -> &Map<String, crate::secret::SecretObject> {
        match kind {
            crate::secret::ObjectKind::Secret => &self.secret_objects,
            crate::secret::ObjectKind::Config => &self.config_objects,
        }
    }

    fn objects_mut(
        &mut self,
        kind: crate::secret::ObjectKind,
    ) -> &mut Map<String, crate::secret::SecretObject> {
        match kind {
            crate::secret::ObjectKind::Secret => &mut self.secret_objects,
            crate::secret::ObjectKind::Config => &mut self.config_objects,
        }
    }

    /// The value a task of a spec resolved to (kind, name, version), if still kept.
    pub fn secret_value(
        &self,
        kind: crate::secret::ObjectKind,
        name: &str,
        version: u64,
    ) -> Option<&crate::secret::SecretVersion> {
        self.objects(kind).get(name)?.versions.get(&version)
    }

    /// Services whose spec references the object, and services with unfinished tasks that
    /// use it (a removed service's tasks still stopping).
    pub fn secret_users(&self, kind: crate::secret::ObjectKind, name: &str) -> Vec<String> {
        let mut users: std::collections::BTreeSet<String> = self
            .services
            .values()
            .filter(|s| crate::secret::uses(&s.spec, kind, name))
            .map(|s| s.spec.name.clone())
            .collect();
        users.extend(
            self.tasks
                .values()
                .filter(|t| !t.status.state.is_terminal())
                .filter(|t| crate::secret::uses(&t.spec, kind, name))
                .map(|t| t.service_name.clone()),
        );
        users.into_iter().collect()
    }

    /// Writes the version each secret/config reference of `spec` resolves to (a pin, else the
    /// latest; 0 when the object or version does not exist — the API refuses such a spec, so
    /// that happens only in a race with a removal, and the task is then rejected on its node).
    pub fn resolve_refs(&self, spec: &mut ServiceSpec) {
        let mut resolved = BTreeMap::new();
        for (kind, source) in crate::secret::refs_of(spec) {
            let (name, pin) = match source.split_once(':') {
                Some((n, v)) => (n, v.parse::<u64>().ok()),
                None => (source, None),
            };
            let v = match (self.objects(kind).get(name), pin) {
                (Some(o), Some(p)) if o.versions.contains_key(&p) => p,
                (Some(o), None) => o.latest,
                _ => 0,
            };
            resolved.insert(crate::secret::ref_key(kind, source), v);
        }
        spec.resolved_refs = resolved;
    }

    #[allow(clippy::too_many_arguments)] // one command's fields
    fn put_secret(
        &mut self,
        index: u64,
        kind: crate::secret::ObjectKind,
        name: String,
        labels: BTreeMap<String, String>,
        data: crate::secret::SecretData,
        digest: String,
        now: u64,
    ) -> Result<(), ApplyError> {
        if let Err(e) = crate::secret::validate_object_name("name", &name)
            .and_then(|_| crate::secret::check_size("data", data.0.len()))
        {
            return Err(ApplyError::Secret {
                kind,
                name,
                message: e.to_string(),
            });
        }
        let version = crate::secret::SecretVersion {
            data,
            digest,
            created_at: now,
        };
        let objects = self.objects_mut(kind);
        match objects.get_mut(&name) {
            Some(o) => {
                let same = o
                    .versions
                    .get(&o.latest)
                    .is_some_and(|v| v.data == version.data);
                if same && o.labels == labels {
                    return Ok(());
                }
                if !same {
                    o.latest += 1;
                    o.versions.insert(o.latest, version);
                }
                o.labels = labels;
                o.updated_at = now;
                o.version = index;
            }
            None => {
                objects.insert(
                    name.clone(),
                    crate::secret::SecretObject {
                        kind,
                        name: name.clone(),
                        labels,
                        versions: [(1, version)].into(),
                        latest: 1,
                        created_at: now,
                        updated_at: now,
                        version: index,
                    },
                );
            }
        }
        // Roll every service whose references now resolve differently (unpinned ones).
        let users: Vec<(String, ServiceSpec)> = self
            .services
            .values()
            .filter(|s| crate::secret::uses(&s.spec, kind, &name))
            .map(|s| (s.id.clone(), s.spec.clone()))
            .collect();
        for (id, mut spec) in users {
            self.resolve_refs(&mut spec);
            self.put_service(index, id, Box::new(spec), now);
        }
        Ok(())
    }

    /// Drops versions that are not the latest and that no service spec (current or previous)
    /// nor unfinished task resolves to.
    fn prune_secret_versions(&mut self) {
        let old =
            |m: &Map<String, crate::secret::SecretObject>| m.values().any(|o| o.versions.len() > 1);
        if !old(&self.secret_objects) && !old(&self.config_objects) {
            return;
        }
        let mut used = std::collections::BTreeSet::new();
        let specs = self
            .services
            .values()
            .flat_map(|s| std::iter::once(&s.spec).chain(s.previous_spec.as_ref()))
            .chain(
                self.tasks
                    .values()
                    .filter(|t| !t.status.state.is_terminal())
                    .map(|t| &*t.spec),
            );
        for spec in specs {
            used.extend(crate::secret::needs(spec));
        }
        for kind in [
            crate::secret::ObjectKind::Secret,
            crate::secret::ObjectKind::Config,
        ] {
            let stale: Vec<(String, u64)> = self
                .objects(kind)
                .values()
                .flat_map(|o| {
                    o.versions
                        .keys()
                        .filter(|v| **v != o.latest && !used.contains(&(kind, o.name.clone(), **v)))
                        .map(|v| (o.name.clone(), *v))
                })
                .collect();
            for (name, v) in stale {
                if let Some(o) = self.objects_mut(kind).get_mut(&name) {
                    o.versions.remove(&v);
                }
            }
        }
    }

    fn put_service(&mut self, index: u64, id: String, mut spec: Box<ServiceSpec>, now: u64) {
        crate::autoscale::keep_replicas(self.services.get(&spec.name).map(|s| &s.spec), &mut spec);
        match self.services.get_mut(&spec.name) {
            Some(svc) => {
                if svc.spec != *spec {
                    // Replicas and the update configs alone leave tasks current; any other
                    // change starts a new rollout. Any change to a job starts a new iteration
                    // (`crate::job`), which has no rollout.
                    if !svc.spec.same_task_spec(&spec) || spec.mode.is_job() {
                        svc.spec_version = index;
                        svc.previous_spec = Some(svc.spec.clone());
                        svc.update_status = (!spec.mode.is_job()).then(|| UpdateStatus {
                            state: UpdateState::Updating,
                            message: "update in progress".into(),
                            started_at: now,
                            completed_at: None,
                        });
                    }
                    svc.spec = *spec;
                    svc.updated_at = now;
                    svc.version = index;
                }
            }
            None => {
                self.services.insert(
                    spec.name.clone(),
                    Service {
                        id,
                        spec: *spec,
                        spec_version: index,
                        created_at: now,
                        updated_at: now,
                        version: index,
                        previous_spec: None,
                        update_status: None,
                        vips: BTreeMap::new(),
                        rebalance: None,
                        autoscale_decisions: Vec::new(),
                    },
                );
            }
        }
    }

    /// Declares the volumes service `name` mounts that are not declared yet (Docker's implicit
    /// creation), so every volume a current spec mounts is in the store.
    fn declare_volumes(&mut self, index: u64, name: &str, now: u64) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let missing: Vec<String> = crate::volume::volumes_of(&svc.spec)
            .filter(|v| !self.volumes.contains_key(*v))
            .map(String::from)
            .collect();
        for v in missing {
            self.put_volume(index, crate::volume::VolumeSpec::named(&v), now);
        }
    }

    fn put_volume(&mut self, index: u64, spec: crate::volume::VolumeSpec, now: u64) {
        match self.volumes.get_mut(&spec.name) {
            Some(v) => {
                if v.spec != spec {
                    v.spec = spec;
                    v.version = index;
                }
            }
            None => {
                self.volumes.insert(
                    spec.name.clone(),
                    crate::volume::Volume {
                        spec,
                        created_at: now,
                        version: index,
                        owner: None,
                    },
                );
            }
        }
    }

    /// Gives the service a virtual IP on each of its networks (endpoint mode `vip`), and drops
    /// those on networks it left.
    fn assign_vips(&mut self, name: &str) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let want: Vec<String> = if svc.spec.endpoint_mode.is_vip() {
            svc.spec.networks.clone()
        } else {
            vec![]
        };
        let mut vips = svc.vips.clone();
        vips.retain(|n, _| want.contains(n));
        for n in &want {
            if vips.contains_key(n) {
                continue;
            }
            let Some(net) = self.networks.get(n) else {
                continue;
            };
            let used: std::collections::BTreeSet<std::net::Ipv4Addr> = self
                .services
                .values()
                .filter_map(|s| s.vips.get(n).copied())
                .chain(vips.get(n).copied())
                .collect();
            if let Some(ip) = net.allocate_vip(&used) {
                vips.insert(n.clone(), ip);
            }
        }
        if let Some(svc) = self.services.get_mut(name) {
            svc.vips = vips;
        }
    }

    fn put_network(
        &mut self,
        index: u64,
        id: String,
        spec: crate::network::NetworkSpec,
        now: u64,
    ) -> Result<(), ApplyError> {
        use crate::network::{next_default_subnet, overlaps, parse_subnet, Network};
        let err = |message: String| ApplyError::Network {
            name: spec.name.clone(),
            message,
        };
        if let Some(existing) = self.networks.get_mut(&spec.name) {
            if !existing.spec.same_shape(&spec) {
                return Err(err(format!(
                    "driver, subnet, encrypted and internal cannot change once it exists (it is \
                     {}, {}{}); remove it first",
                    existing.subnet,
                    if existing.spec.encrypted {
                        "encrypted"
                    } else {
                        "unencrypted"
                    },
                    if existing.spec.internal {
                        ", internal"
                    } else {
                        ""
                    }
                )));
            }
            if existing.spec.labels != spec.labels {
                existing.spec.labels = spec.labels;
                existing.version = index;
            }
            return Ok(());
        }
        let subnet = match &spec.subnet {
            Some(s) => {
                let net = parse_subnet(s).map_err(|m| err(format!("subnet: {m}")))?;
                if let Some(other) = self.networks.values().find(|n| overlaps(n.subnet, net)) {
                    return Err(err(format!(
                        "subnet: {net} overlaps network {:?} ({})",
                        other.spec.name, other.subnet
                    )));
                }
                net
            }
            None => {
                next_default_subnet(&self.networks.values().map(|n| n.subnet).collect::<Vec<_>>())
                    .ok_or_else(|| err("the default pool is used up; give a subnet".into()))?
            }
        };
        let vni = self.networks.values().map(|n| n.vni).max().unwrap_or(4095) + 1;
        let mut net = Network {
            id,
            spec,
            subnet,
            vni,
            slices: Default::default(),
            cursors: Default::default(),
            created_at: now,
            version: index,
        };
        for node in self.nodes.keys() {
            net.ensure_slice(node);
        }
        self.networks.insert(net.spec.name.clone(), net);
        // Services that named the network before it existed get their VIPs now.
        let names: Vec<String> = self.services.keys().cloned().collect();
        for n in names {
            self.assign_vips(&n);
        }
        Ok(())
    }

    /// What a service spec must agree with in the rest of the store, checked when it is put
    /// (and by the API before a rollback to it): each of its networks exists; its names (its
    /// own and its aliases) are not another service's on a network they share, since DNS
    /// answers one of them; every secret and config it references exists, with the pinned
    /// version if any.
    pub fn check_service(&self, spec: &ServiceSpec) -> Result<(), ApplyError> {
        let err = |message: String| ApplyError::Service {
            name: spec.name.clone(),
            message,
        };
        for (i, n) in spec.networks.iter().enumerate() {
            if !self.networks.contains_key(n) {
                return Err(err(format!(
                    "networks[{i}]: network {n:?} does not exist (declare it with `kind: \
                     Network` or see `rctl network ls`)"
                )));
            }
        }
        for o in self.services.values().map(|s| &s.spec) {
            if o.name == spec.name {
                continue;
            }
            let Some(net) = spec.networks.iter().find(|n| o.networks.contains(n)) else {
                continue;
            };
            let taken = |name: &str| {
                o.name.eq_ignore_ascii_case(name)
                    || o.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
            };
            if let Some((i, a)) = spec.aliases.iter().enumerate().find(|(_, a)| taken(a)) {
                return Err(err(format!(
                    "aliases[{i}]: {a:?} is already a name of service {:?} on network {net:?}",
                    o.name
                )));
            }
            if o.aliases.iter().any(|a| a.eq_ignore_ascii_case(&spec.name)) {
                return Err(err(format!(
                    "its name is already an alias of service {:?} on network {net:?}",
                    o.name
                )));
            }
        }
        self.check_refs(spec).map_err(err)
    }

    /// Every secret and config `spec` references exists (with the pinned version, if any).
    fn check_refs(&self, spec: &ServiceSpec) -> Result<(), String> {
        use crate::secret::{parse_source, ObjectKind};
        let fields = spec
            .secrets
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    format!("secrets[{i}].source"),
                    ObjectKind::Secret,
                    &r.source,
                )
            })
            .chain(spec.configs.iter().enumerate().map(|(i, r)| {
                (
                    format!("configs[{i}].source"),
                    ObjectKind::Config,
                    &r.source,
                )
            }))
            .chain(
                spec.env_from_secret
                    .iter()
                    .map(|(k, s)| (format!("env_from_secret.{k}"), ObjectKind::Secret, s)),
            );
        for (field, kind, source) in fields {
            let (name, pin) = parse_source(&field, source).map_err(|e| e.to_string())?;
            match (self.objects(kind).get(&name), pin) {
                (None, _) => {
                    return Err(format!(
                        "{field}: {kind} {name:?} not found (create it with `rctl {kind} create \
                         {name} FILE`)"
                    ))
                }
                (Some(o), Some(p)) if !o.versions.contains_key(&p) => {
                    return Err(format!(
                        "{field}: {kind} {name:?} has no version {p} (kept: {})",
                        o.versions
                            .keys()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// [`Self::attach`], or the task is rejected with the reason (the reconciler replaces it).
    fn attach_or_reject(&mut self, task_id: &str, node: &str, now: u64) {
        if let Err(error) = self.attach(task_id, node) {
            if let Some(t) = self.tasks.get_mut(task_id) {
                t.status = TaskStatus {
                    state: TaskState::Rejected,
                    message: "no network address".into(),
                    error,
                    container_id: String::new(),
                    exit_code: None,
                    timestamp: now,
                };
            }
        }
    }

    /// Gives a task just placed on `node` an address on each of its networks. A network that is
    /// missing or full is the task's error (it fails, and the reconciler replaces it).
    fn attach(&mut self, task_id: &str, node: &str) -> Result<(), String> {
        let Some(t) = self.tasks.get(task_id) else {
            return Ok(());
        };
        let wanted = t.spec.networks.clone();
        let mut attachments = Vec::new();
        for name in wanted {
            let used: std::collections::BTreeSet<std::net::Ipv4Addr> = self
                .tasks
                .values()
                .filter(|t| !t.status.state.is_terminal())
                .flat_map(|t| t.networks.iter())
                .filter(|a| a.network == name)
                .map(|a| a.address)
                .collect();
            let net = self
                .networks
                .get_mut(&name)
                .ok_or_else(|| format!("network {name:?} does not exist"))?;
            if !net.ensure_slice(node) {
                return Err(format!("network {name:?} has no slice left for this node"));
            }
            let address = net
                .allocate(node, &used)
                .ok_or_else(|| format!("network {name:?} has no free address on this node"))?;
            attachments.push(crate::network::Attachment {
                network: name,
                address,
            });
        }
        if let Some(t) = self.tasks.get_mut(task_id) {
            t.networks = attachments;
        }
        Ok(())
    }

    /// Services whose spec mounts volume `name`, by name.
    pub fn volume_users(&self, name: &str) -> Vec<&str> {
        self.services
            .values()
            .filter(|s| crate::volume::volumes_of(&s.spec).any(|v| v == name))
            .map(|s| s.spec.name.as_str())
            .collect()
    }

    /// The digest `image` names in the cluster registry now, when it is a reference to it: no
    /// registry host (a first component with `.` or `:`, or `localhost`, names another), no
    /// digest already, and a tag (default `latest`) the registry holds. Pure: the registry's
    /// tags are replicated in [`Store::images`].
    pub fn pinned_digest(&self, image: &str) -> Option<String> {
        if image.contains('@') {
            return None;
        }
        if let Some((first, _)) = image.split_once('/') {
            if first.contains('.') || first.contains(':') || first == "localhost" {
                return None;
            }
        }
        let (repo, tag) = match image.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, tag),
            _ => (image, "latest"),
        };
        self.images
            .get(repo)
            .and_then(|tags| tags.get(tag))
            .map(|r| r.digest.clone())
            .filter(|d| d.starts_with("sha256:"))
    }

    /// The tasks of a service (any state).
    pub fn tasks_of<'a>(&'a self, service_id: &'a str) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks
            .values()
            .filter(move |t| t.service_id == service_id)
    }

    /// The tasks a node should know about: placed there and not yet forgotten.
    /// Whether certificates of `role` (worker, manager, admin) naming `id` (a CN) were revoked.
    pub fn is_revoked(&self, role: &str, id: &str) -> bool {
        self.revoked.contains_key(&identity_key(role, id))
    }

    /// Whether the node runs a controller: promoted (`controller_id`), or a current member
    /// listens on the node's host. Placement and the dispatcher take a node's role from here,
    /// never from what its agent says.
    pub fn runs_controller(&self, node: &Node) -> bool {
        if node.controller_id.is_some() {
            return true;
        }
        let host = |a: &str| a.rsplit_once(':').map_or(a, |(h, _)| h).to_string();
        let mine = host(&node.addr);
        self.managers.values().any(|m| host(&m.addr) == mine)
    }

    /// The node whose host runs controller `raft_id`, if any.
    pub fn node_of_controller(&self, raft_id: u64) -> Option<&Node> {
        let host = |a: &str| a.rsplit_once(':').map_or(a, |(h, _)| h).to_string();
        let by_id = self
            .nodes
            .values()
            .find(|n| n.controller_id == Some(raft_id));
        by_id.or_else(|| {
            let m = host(&self.managers.get(&raft_id)?.addr);
            self.nodes.values().find(|n| host(&n.addr) == m)
        })
    }

    /// The tasks placed on a node (any state).
    pub fn tasks_on<'a>(&'a self, node_id: &'a str) -> Box<dyn Iterator<Item = &'a Task> + 'a> {
        let scan = move || {
            self.tasks
                .values()
                .filter(move |t| t.node_id.as_deref() == Some(node_id))
        };
        let Some(ids) = self.node_tasks.on(node_id) else {
            return Box::new(scan());
        };
        // The index must say what a scan would (tests that edit `tasks` directly break it).
        debug_assert_eq!(
            ids.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            scan().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            "node index of {node_id}"
        );
        Box::new(ids.into_iter().filter_map(|id| self.tasks.get(id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registration of worker `id` with `hostname` at `addr`.
    fn node_at(id: &str, hostname: &str, addr: &str, now: u64) -> Command {
        Command::PutNode {
            id: id.into(),
            hostname: hostname.into(),
            addr: addr.into(),
            labels: Default::default(),
            role: NodeRole::Worker,
            resources: Default::default(),
            now,
            cert_not_after: 0,
            host_labels: Default::default(),
        }
    }
    use crate::spec::tests_support::spec;

    /// Service `web` of `replicas` (index 1) and workers n1 and n2 (index 2).
    fn web_on_two_nodes(replicas: u64) -> (Store, Service) {
        let mut s = Store::default();
        s.apply(
            1,
            Command::PutService {
                id: "s1".into(),
                spec: Box::new(spec("web", replicas)),
                now: 1,
            },
        )
        .unwrap();
        let node = |id: &str| node_at(id, &format!("h-{id}"), &format!("a-{id}"), 2);
        s.apply(2, Command::Batch(vec![node("n1"), node("n2")]))
            .unwrap();
        let svc = s.services["web"].clone();
        (s, svc)
    }

    fn task(id: &str, svc: &Service, slot: u64) -> Task {
        Task {
            id: id.into(),
            service_id: svc.id.clone(),
            service_name: svc.spec.name.clone(),
            slot,
            spec: svc.spec.clone().into(),
            spec_version: svc.spec_version,
            node_id: None,
            target_node: None,
            desired_state: TaskState::Running,
            status: TaskStatus {
                state: TaskState::New,
                message: String::new(),
                error: String::new(),
                container_id: String::new(),
                exit_code: None,
                timestamp: 1,
            },
            running_at: None,
            stop_requested_at: None,
            networks: Vec::new(),
            created_at: 1,
            version: 0,
            image_digest: None,
        }
    }

    #[test]
    fn a_cluster_registry_tag_pins_to_its_digest_and_nothing_else_does() {
        let mut store = Store::default();
        let rec = |d: &str| ImageRecord {
            digest: d.into(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        };
        let mut tags = Map::new();
        tags.insert("latest".to_string(), rec("sha256:aa"));
        tags.insert("1.36".to_string(), rec("sha256:bb"));
        store.images.insert("busybox".to_string(), tags);
        let mut tags = Map::new();
        tags.insert("v1".to_string(), rec("sha256:cc"));
        store.images.insert("team/app".to_string(), tags);
        for (image, want) in [
            ("busybox", Some("sha256:aa")),
            ("busybox:latest", Some("sha256:aa")),
            ("busybox:1.36", Some("sha256:bb")),
            ("team/app:v1", Some("sha256:cc")),
            ("busybox:2", None),
            ("busybox@sha256:aa", None),
            ("busybox:latest@sha256:aa", None),
            ("registry.example:5000/busybox:latest", None),
            ("localhost/busybox", None),
            ("10.0.0.1:5000/busybox", None),
            ("other", None),
        ] {
            assert_eq!(store.pinned_digest(image).as_deref(), want, "{image}");
        }
    }
    #[test]
    fn join_tokens_written_untyped_by_earlier_builds_still_decode() {
        // A store as an earlier build wrote it (join tokens as free JSON, keys sorted), as
        // raft snapshots and backups hold it.
        let old = r#"{"nodes":{},"services":{},"tasks":{},"images":{},"applied":9,
            "secrets":{"ca_cert_pem":"C","ca_key_pem":"K","join_tokens":{
            "fingerprint":"f","manager":"m","manager_expires":5,"worker":"w"}}}"#;
        let s: Store = serde_json::from_str(old).unwrap();
        let t = &s.secrets.as_ref().unwrap().join_tokens;
        assert_eq!(
            (
                t.fingerprint.as_str(),
                t.manager.as_str(),
                t.worker.as_str()
            ),
            ("f", "m", "w")
        );
        assert_eq!((t.manager_expires, t.worker_expires), (Some(5), None));
        // And encodes as it did.
        let json = serde_json::to_string(t).unwrap();
        assert_eq!(
            json,
            r#"{"fingerprint":"f","manager":"m","manager_expires":5,"worker":"w"}"#
        );
        assert!(!format!("{t:?}").contains("\"m\""));
        let empty: JoinTokenSecrets = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, JoinTokenSecrets::default());
    }

    #[test]
    fn envelope_versions() {
        let e = Envelope::new(Command::RemoveService { name: "x".into() });
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        let bad = br#"{"v":99,"cmd":{"RemoveService":{"name":"x"}}}"#;
        assert_eq!(Envelope::decode(bad), Err(ApplyError::UnknownVersion(99)));
        assert!(matches!(
            Envelope::decode(b"{}"),
            Err(ApplyError::Malformed(_))
        ));
    }

    #[test]
    fn service_lifecycle_and_versions() {
        let mut s = Store::default();
        s.apply(
            1,
            Command::PutService {
                id: "s1".into(),
                spec: Box::new(spec("web", 2)),
                now: 10,
            },
        )
        .unwrap();
        assert_eq!(s.services["web"].spec_version, 1);
        assert_eq!(s.services["web"].update_status, None);
        // Scaling keeps the spec version: running tasks stay current.
        s.apply(
            2,
            Command::PutService {
                id: "ignored".into(),
                spec: Box::new(spec("web", 5)),
                now: 11,
            },
        )
        .unwrap();
        assert_eq!(s.services["web"].spec_version, 1);
        assert_eq!(s.services["web"].id, "s1");
        assert_eq!(s.services["web"].version, 2);
        let mut changed = spec("web", 5);
        changed.args = vec!["x".into()];
        s.apply(
            3,
            Command::PutService {
                id: "s1".into(),
                spec: Box::new(changed),
                now: 12,
            },
        )
        .unwrap();
        assert_eq!(s.services["web"].spec_version, 3);
        let st = s.services["web"].update_status.clone().unwrap();
        assert_eq!((st.state, st.started_at), (UpdateState::Updating, 12));
        let prev = s.services["web"].previous_spec.clone().unwrap();
        assert!(prev.args.is_empty() && prev.replicas == 5);

        let svc = s.services["web"].clone();
        s.apply(
            4,
            Command::CreateTasks {
                tasks: vec![task("t1", &svc, 1)],
            },
        )
        .unwrap();
        s.apply(5, Command::RemoveService { name: "web".into() })
            .unwrap();
        assert_eq!(s.tasks["t1"].desired_state, TaskState::Shutdown);
        assert_eq!(
            s.apply(6, Command::RemoveService { name: "web".into() }),
            Err(ApplyError::NotFound {
                kind: "service",
                name: "web".into()
            })
        );
    }

    #[test]
    fn status_only_from_own_node_and_forward() {
        let mut s = Store::default();
        s.apply(
            1,
            Command::PutService {
                id: "s1".into(),
                spec: Box::new(spec("web", 1)),
                now: 1,
            },
        )
        .unwrap();
        let svc = s.services["web"].clone();
        s.apply(
            2,
            Command::Batch(vec![
                Command::CreateTasks {
                    tasks: vec![task("t1", &svc, 1)],
                },
                Command::AssignTasks {
                    assignments: vec![("t1".into(), "n1".into())],
                    now: 2,
                },
            ]),
        )
        .unwrap();
        assert_eq!(s.tasks["t1"].status.state, TaskState::Assigned);
        let st = |state| TaskStatus {
            state,
            message: String::new(),
            error: String::new(),
            container_id: "c".into(),
            exit_code: None,
            timestamp: 3,
        };
        let up = |node: &str, state| Command::UpdateStatus {
            updates: vec![StatusUpdate {
                task_id: "t1".into(),
                node_id: node.into(),
                status: st(state),
            }],
        };
        s.apply(3, up("n2", TaskState::Running)).unwrap();
        assert_eq!(s.tasks["t1"].status.state, TaskState::Assigned);
        s.apply(4, up("n1", TaskState::Running)).unwrap();
        assert_eq!(s.tasks["t1"].status.state, TaskState::Running);
        assert_eq!(s.tasks["t1"].running_at, Some(3));
        s.apply(5, up("n1", TaskState::Starting)).unwrap();
        assert_eq!(s.tasks["t1"].status.state, TaskState::Running);
        s.apply(
            6,
            Command::NodeDown {
                id: "n1".into(),
                now: 6,
            },
        )
        .unwrap_err(); // node never registered
        s.apply(
            7,
            Command::PutNode {
                id: "n1".into(),
                hostname: "h1".into(),
                addr: "a".into(),
                labels: Default::default(),
                role: NodeRole::Worker,
                resources: Default::default(),
                now: 7,
                cert_not_after: 0,
                host_labels: Default::default(),
            },
        )
        .unwrap();
        s.apply(
            8,
            Command::NodeDown {
                id: "n1".into(),
                now: 8,
            },
        )
        .unwrap();
        assert_eq!(s.tasks["t1"].status.state, TaskState::Orphaned);
        assert_eq!(s.nodes["n1"].state, NodeState::Down);
        assert_eq!(s.applied, 8);
        // Back again, the node may settle the orphan with how it really ended, not revive it.
        s.apply(9, up("n1", TaskState::Running)).unwrap();
        assert_eq!(s.tasks["t1"].status.state, TaskState::Orphaned);
        s.apply(10, up("n1", TaskState::Failed)).unwrap();
        assert_eq!(s.tasks["t1"].status.state, TaskState::Failed);
    }

    /// The fleet simulator's finding: a placement decided while the node was ready but
    /// committed after its `NodeDown` left the task assigned to a down node for ever (its
    /// orphaning had passed), so its slot never ran again.
    #[test]
    fn an_assignment_to_a_node_already_down_leaves_the_task_unplaced() {
        let (mut s, svc) = web_on_two_nodes(1);
        s.apply(
            3,
            Command::CreateTasks {
                tasks: vec![task("t1", &svc, 1)],
            },
        )
        .unwrap();
        s.apply(
            4,
            Command::NodeDown {
                id: "n1".into(),
                now: 4,
            },
        )
        .unwrap();
        let assign = |node: &str| Command::AssignTasks {
            assignments: vec![("t1".into(), node.into())],
            now: 5,
        };
        s.apply(5, assign("n1")).unwrap();
        assert_eq!(s.tasks["t1"].node_id, None);
        assert_ne!(s.tasks["t1"].status.state, TaskState::Assigned);
        // The next pass places it on a ready node.
        s.apply(6, assign("n2")).unwrap();
        assert_eq!(s.tasks["t1"].node_id.as_deref(), Some("n2"));
        assert_eq!(s.tasks["t1"].status.state, TaskState::Assigned);
        // The same for a task created already placed (a replacement).
        let mut placed = task("t2", &svc, 2);
        placed.node_id = Some("n1".into());
        placed.status.state = TaskState::Assigned;
        s.apply(
            7,
            Command::CreateTasks {
                tasks: vec![placed],
            },
        )
        .unwrap();
        assert_eq!(s.tasks["t2"].node_id, None);
        assert_eq!(s.tasks["t2"].status.state, TaskState::Pending);
    }

    /// The node index follows placement at creation and by assignment, and deletion; a
    /// decoded store (a snapshot) rebuilds it on its next apply; a node's loss orphans
    /// exactly its own unfinished tasks either way.
    #[test]
    fn the_node_index_follows_placement_and_survives_decoding() {
        let (mut s, svc) = web_on_two_nodes(4);
        let mut placed = task("t1", &svc, 1);
        placed.node_id = Some("n1".into());
        placed.status.state = TaskState::Assigned;
        s.apply(
            3,
            Command::Batch(vec![
                Command::CreateTasks {
                    tasks: vec![
                        placed,
                        task("t2", &svc, 2),
                        task("t3", &svc, 3),
                        task("t4", &svc, 4),
                    ],
                },
                Command::AssignTasks {
                    assignments: vec![
                        ("t2".into(), "n1".into()),
                        ("t3".into(), "n2".into()),
                        ("t4".into(), "n1".into()),
                    ],
                    now: 3,
                },
                Command::DeleteTasks {
                    ids: vec!["t4".into()],
                },
            ]),
        )
        .unwrap();
        let on = |s: &Store, n: &str| s.tasks_on(n).map(|t| t.id.clone()).collect::<Vec<_>>();
        assert_eq!(on(&s, "n1"), ["t1", "t2"]);
        assert_eq!(on(&s, "n2"), ["t3"]);
        // A snapshot: decoded without its index, which the next apply builds again.
        let mut d: Store = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(d, s);
        assert_eq!(on(&d, "n1"), ["t1", "t2"], "read before any apply: a scan");
        d.apply(
            4,
            Command::NodeDown {
                id: "n1".into(),
                now: 4,
            },
        )
        .unwrap();
        let state = |id: &str| d.tasks[id].status.state;
        assert_eq!(state("t1"), TaskState::Orphaned);
        assert_eq!(state("t2"), TaskState::Orphaned);
        assert_eq!(state("t3"), TaskState::Assigned, "another node's task");
        assert_eq!(on(&d, "n2"), ["t3"]);
    }

    #[test]
    fn remove_node_revokes_it_and_orphans_its_tasks() {
        let mut s = Store::default();
        s.apply(
            1,
            Command::PutService {
                id: "s1".into(),
                spec: Box::new(spec("web", 1)),
                now: 1,
            },
        )
        .unwrap();
        let svc = s.services["web"].clone();
        s.apply(
            2,
            Command::PutNode {
                id: "n1".into(),
                hostname: "h1".into(),
                addr: "10.0.0.1:4245".into(),
                labels: Default::default(),
                role: NodeRole::Worker,
                resources: Default::default(),
                now: 2,
                // Recorded from the session's certificate.
                cert_not_after: 99,
                host_labels: Default::default(),
            },
        )
        .unwrap();
        assert_eq!(s.nodes["n1"].cert_not_after, 99);
        s.apply(
            3,
            Command::Batch(vec![
                Command::CreateTasks {
                    tasks: vec![task("t1", &svc, 1)],
                },
                Command::AssignTasks {
                    assignments: vec![("t1".into(), "n1".into())],
                    now: 3,
                },
            ]),
        )
        .unwrap();
        assert!(!s.is_revoked("worker", "n1"));
        s.apply(
            4,
            Command::RemoveNode {
                id: "n1".into(),
                now: 4,
            },
        )
        .unwrap();
        assert!(!s.nodes.contains_key("n1"));
        assert!(s.is_revoked("worker", "n1"));
        assert!(s.is_revoked("manager", "n1"));
        assert!(
            !s.is_revoked("admin", "n1"),
            "an admin named n1 is someone else"
        );
        assert_eq!(s.revoked["worker:n1"].at, 4);
        assert_eq!(s.tasks["t1"].status.state, TaskState::Orphaned);
        // Removing it again names what is missing.
        let err = s
            .apply(
                5,
                Command::RemoveNode {
                    id: "n1".into(),
                    now: 5,
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("n1"), "{err}");
        // A revocation is kept as first recorded.
        s.apply(
            6,
            Command::Revoke {
                id: identity_key("worker", "n1"),
                reason: "again".into(),
                now: 6,
            },
        )
        .unwrap();
        assert_eq!(s.revoked["worker:n1"].reason, "node removed");
        s.apply(
            7,
            Command::Revoke {
                id: identity_key("manager", "controller-3"),
                reason: "removed from the controller group".into(),
                now: 7,
            },
        )
        .unwrap();
        assert!(s.is_revoked("manager", "controller-3"));
    }

    #[test]
    fn hostnames_and_host_addresses_belong_to_one_node() {
        let mut s = Store::default();
        let put = |id: &str, host: &str, addr: &str| node_at(id, host, addr, 1);
        s.apply(1, put("n1", "h1", "10.0.0.1:4245")).unwrap();
        // The same node again (a restart): fine.
        s.apply(2, put("n1", "h1", "10.0.0.1:4245")).unwrap();
        let e = s.apply(3, put("n2", "h1", "10.0.0.2:4245")).unwrap_err();
        assert!(
            e.to_string().contains("hostname h1 belongs to node n1"),
            "{e}"
        );
        let e = s.apply(4, put("n2", "h2", "10.0.0.1:4299")).unwrap_err();
        assert!(
            e.to_string()
                .contains("address 10.0.0.1 belongs to node n1"),
            "{e}"
        );
        let e = s.apply(5, put("h1", "h3", "10.0.0.3:4245")).unwrap_err();
        assert!(e.to_string().contains("another node's hostname"), "{e}");
        assert_eq!(s.nodes.len(), 1);
    }

    #[test]
    fn a_rotated_token_revokes_what_it_admitted_and_never_registered() {
        let mut s = Store::default();
        for (i, id) in ["dormant", "n1"].iter().enumerate() {
            s.apply(
                i as u64 + 1,
                Command::Admit {
                    role: "worker".into(),
                    id: id.to_string(),
                    now: 1,
                },
            )
            .unwrap();
        }
        s.apply(
            3,
            Command::Admit {
                role: "manager".into(),
                id: "controller-2".into(),
                now: 1,
            },
        )
        .unwrap();
        // n1 registers, controller-2 becomes a member: neither waits any more.
        s.apply(4, node_at("n1", "h1", "10.0.0.1:4245", 4)).unwrap();
        s.set_manager(5, 2, Some(ManagerInfo::default()));
        assert_eq!(s.admitted.len(), 1);
        s.apply(
            6,
            Command::RevokeAdmitted {
                role: "worker".into(),
                now: 6,
            },
        )
        .unwrap();
        assert!(s.is_revoked("worker", "dormant"));
        assert!(!s.is_revoked("worker", "n1"));
        assert!(s.admitted.is_empty());
        // The manager token's rotation touches no member.
        s.apply(
            7,
            Command::RevokeAdmitted {
                role: "manager".into(),
                now: 7,
            },
        )
        .unwrap();
        assert!(!s.is_revoked("manager", "controller-2"));
    }

    #[test]
    fn a_node_runs_a_controller_by_promotion_or_by_a_member_on_its_host() {
        let mut s = Store::default();
        s.apply(1, node_at("n1", "h1", "10.0.0.1:4245", 1)).unwrap();
        assert!(!s.runs_controller(&s.nodes["n1"]));
        s.set_manager(
            2,
            1,
            Some(ManagerInfo {
                addr: "10.0.0.1:4243".into(),
                registry: "10.0.0.1:5000".into(),
            }),
        );
        assert!(s.runs_controller(&s.nodes["n1"]));
        assert_eq!(
            s.nodes["n1"].role,
            NodeRole::Manager,
            "as soon as it is a member"
        );
        assert_eq!(s.node_of_controller(1).map(|n| n.id.as_str()), Some("n1"));
        s.set_manager(3, 1, None);
        assert!(!s.runs_controller(&s.nodes["n1"]));
        assert_eq!(s.nodes["n1"].role, NodeRole::Worker);
        s.apply(
            4,
            Command::SetNodeController {
                id: "n1".into(),
                raft_id: Some(7),
            },
        )
        .unwrap();
        assert!(s.runs_controller(&s.nodes["n1"]));
        assert_eq!(s.nodes["n1"].role, NodeRole::Manager);
        assert_eq!(s.node_of_controller(7).map(|n| n.id.as_str()), Some("n1"));
        s.apply(
            5,
            Command::SetNodeController {
                id: "n1".into(),
                raft_id: None,
            },
        )
        .unwrap();
        assert_eq!(s.nodes["n1"].role, NodeRole::Worker);
    }

    #[test]
    fn networks_give_slices_vips_and_addresses() {
        use crate::network::NetworkSpec;
        use crate::views::map_for_node;
        let mut s = Store::default();
        let mut i = 0;
        let mut apply = |s: &mut Store, c: Command| {
            i += 1;
            s.apply(i, c)
        };
        for n in ["n1", "n2"] {
            apply(
                &mut s,
                Command::PutNode {
                    id: n.into(),
                    hostname: n.into(),
                    addr: format!("10.213.0.{}:4245", &n[1..]),
                    labels: Default::default(),
                    role: NodeRole::Worker,
                    resources: Default::default(),
                    now: 0,
                    cert_not_after: 0,
                    host_labels: Default::default(),
                },
            )
            .unwrap();
        }
        let net = |name: &str, subnet: Option<&str>| NetworkSpec {
            name: name.into(),
            driver: Default::default(),
            subnet: subnet.map(String::from),
            encrypted: true,
            internal: false,
            labels: Default::default(),
        };
        apply(
            &mut s,
            Command::PutNetwork {
                id: "a".into(),
                spec: net("front", None),
                now: 0,
            },
        )
        .unwrap();
        apply(
            &mut s,
            Command::PutNetwork {
                id: "b".into(),
                spec: net("back", Some("10.50.0.0/16")),
                now: 0,
            },
        )
        .unwrap();
        // Overlapping and reshaping are refused.
        assert!(apply(
            &mut s,
            Command::PutNetwork {
                id: "c".into(),
                spec: net("x", Some("10.50.128.0/17")),
                now: 0
            }
        )
        .is_err());
        let mut plain = net("back", None);
        plain.encrypted = false;
        assert!(apply(
            &mut s,
            Command::PutNetwork {
                id: "b".into(),
                spec: plain,
                now: 0
            }
        )
        .is_err());
        assert_eq!(s.networks["front"].subnet.to_string(), "10.96.0.0/16");
        assert_eq!(
            s.networks["back"].node_slice("n2").unwrap().to_string(),
            "10.50.2.0/24"
        );

        let mut sp = spec("web", 2);
        sp.networks = vec!["back".into()];
        apply(
            &mut s,
            Command::PutService {
                id: "svc".into(),
                spec: Box::new(sp),
                now: 0,
            },
        )
        .unwrap();
        assert_eq!(s.services["web"].vips["back"].to_string(), "10.50.0.2");
        let svc = s.services["web"].clone();
        apply(
            &mut s,
            Command::CreateTasks {
                tasks: vec![task("t1", &svc, 1), task("t2", &svc, 2)],
            },
        )
        .unwrap();
        apply(
            &mut s,
            Command::AssignTasks {
                assignments: vec![("t1".into(), "n1".into()), ("t2".into(), "n2".into())],
                now: 0,
            },
        )
        .unwrap();
        assert_eq!(s.tasks["t1"].networks[0].address.to_string(), "10.50.1.2");
        assert_eq!(s.tasks["t2"].networks[0].address.to_string(), "10.50.2.2");
        assert!(apply(
            &mut s,
            Command::RemoveNetwork {
                name: "back".into()
            }
        )
        .is_err());

        // Only running tasks are endpoints; the map names the peer with its slices.
        let m = map_for_node(&s, "n1");
        let back = m.networks.iter().find(|n| n.name == "back").unwrap();
        assert_eq!(back.gateway.to_string(), "10.50.1.1");
        assert!(back.services[0].tasks.is_empty());
        assert_eq!(m.peers.len(), 1);
        assert_eq!(m.peers[0].underlay.to_string(), "10.213.0.2");
        assert_eq!(m.peers[0].slices["b"].to_string(), "10.50.2.0/24");
        let running = |id: &str| StatusUpdate {
            task_id: id.into(),
            node_id: if id == "t1" { "n1".into() } else { "n2".into() },
            status: TaskStatus {
                state: TaskState::Running,
                message: String::new(),
                error: String::new(),
                container_id: String::new(),
                exit_code: None,
                timestamp: 1,
            },
        };
        apply(
            &mut s,
            Command::UpdateStatus {
                updates: vec![running("t1"), running("t2")],
            },
        )
        .unwrap();
        let m = map_for_node(&s, "n1");
        let back = m.networks.iter().find(|n| n.name == "back").unwrap();
        assert_eq!(back.services[0].tasks.len(), 2);
        apply(
            &mut s,
            Command::SetDesired {
                updates: vec![("t2".into(), TaskState::Shutdown)],
                now: 0,
            },
        )
        .unwrap();
        let m = map_for_node(&s, "n1");
        let back = m.networks.iter().find(|n| n.name == "back").unwrap();
        assert_eq!(
            back.services[0].tasks.len(),
            1,
            "a task asked to stop leaves at once"
        );
    }

    #[test]
    fn put_node_keeps_operator_fields_and_update_node_changes_them() {
        let mut s = Store::default();
        let put = |labels: &[(&str, &str)], cpus| Command::PutNode {
            id: "n1".into(),
            hostname: "h1".into(),
            addr: "a".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            role: NodeRole::Manager,
            resources: NodeResources {
                cpus,
                memory: 1 << 30,
            },
            now: 1,
            cert_not_after: 0,
            host_labels: Default::default(),
        };
        s.apply(1, put(&[("zone", "a"), ("disk", "ssd")], 2000))
            .unwrap();
        assert_eq!(s.nodes["n1"].labels["zone"], "a");
        assert_eq!(s.nodes["n1"].role, NodeRole::Manager);
        s.apply(
            2,
            Command::UpdateNode {
                id: "n1".into(),
                availability: Some(Availability::Drain),
                labels_add: [("zone".to_string(), "b".to_string())].into(),
                labels_rm: vec!["disk".into(), "absent".into()],
            },
        )
        .unwrap();
        let n = &s.nodes["n1"];
        assert_eq!(n.availability, Availability::Drain);
        assert_eq!(
            n.labels,
            [("zone".to_string(), "b".to_string())]
                .into_iter()
                .collect()
        );
        assert_eq!(n.version, 2);
        // The agent re-registers (after a restart) with its original labels and more cpus.
        s.apply(
            3,
            Command::NodeDown {
                id: "n1".into(),
                now: 2,
            },
        )
        .unwrap();
        s.apply(4, put(&[("zone", "a")], 4000)).unwrap();
        let n = &s.nodes["n1"];
        assert_eq!(n.state, NodeState::Ready);
        assert_eq!(n.availability, Availability::Drain);
        assert_eq!(n.labels["zone"], "b");
        assert_eq!(n.resources.cpus, 4000);
        // Availability untouched when not given; unknown nodes are refused.
        s.apply(
            5,
            Command::UpdateNode {
                id: "n1".into(),
                availability: None,
                labels_add: Default::default(),
                labels_rm: vec![],
            },
        )
        .unwrap();
        assert_eq!(s.nodes["n1"].availability, Availability::Drain);
        assert!(s
            .apply(
                6,
                Command::UpdateNode {
                    id: "nx".into(),
                    availability: None,
                    labels_add: Default::default(),
                    labels_rm: vec![],
                },
            )
            .is_err());
        // Old log entries without the new fields still decode.
        let old = br#"{"v":1,"cmd":{"PutNode":{"id":"n","hostname":"h","addr":"a","labels":{},"now":1}}}"#;
        assert!(matches!(
            Envelope::decode(old).unwrap().cmd,
            Command::PutNode {
                role: NodeRole::Worker,
                ..
            }
        ));
    }

    #[test]
    fn host_labels_are_the_registrations_and_never_the_operators() {
        let mut s = Store::default();
        let put = |host: &[(&str, &str)]| Command::PutNode {
            id: "n1".into(),
            hostname: "h1".into(),
            addr: "10.0.0.1:4245".into(),
            labels: Default::default(),
            role: NodeRole::Worker,
            resources: Default::default(),
            now: 1,
            cert_not_after: 0,
            host_labels: host
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        s.apply(1, put(&[("zone", "host")])).unwrap();
        s.apply(
            2,
            Command::UpdateNode {
                id: "n1".into(),
                availability: None,
                labels_add: map(&[("zone", "operator")]),
                labels_rm: vec![],
            },
        )
        .unwrap();
        // A registration replaces the host's labels (a key dropped from the file goes) and
        // leaves the operator's alone, even under the same key.
        s.apply(3, put(&[("disk", "ssd")])).unwrap();
        let n = &s.nodes["n1"];
        assert_eq!(n.labels, map(&[("zone", "operator")]));
        assert_eq!(n.host_labels, map(&[("disk", "ssd")]));
        // An operator's update leaves the host's alone.
        s.apply(
            4,
            Command::UpdateNode {
                id: "n1".into(),
                availability: None,
                labels_add: Default::default(),
                labels_rm: vec!["zone".into(), "disk".into()],
            },
        )
        .unwrap();
        assert_eq!(s.nodes["n1"].host_labels, map(&[("disk", "ssd")]));
        // Not written while empty: a node without host labels encodes as before them, and
        // an entry of a build before them decodes with none.
        let entry = Envelope::new(put(&[])).encode();
        assert!(!String::from_utf8_lossy(&entry).contains("host_labels"));
        s.apply(5, put(&[])).unwrap();
        let json = serde_json::to_string(&s.nodes["n1"]).unwrap();
        assert!(!json.contains("host_labels"), "{json}");
        // And an entry with them decodes on a build that knows them, field for field.
        let with = Envelope::new(put(&[("disk", "ssd")])).encode();
        assert!(matches!(
            Envelope::decode(&with).unwrap().cmd,
            Command::PutNode { host_labels, .. } if host_labels == map(&[("disk", "ssd")])
        ));
    }

    #[test]
    fn images() {
        let mut s = Store::default();
        let rec = ImageRecord {
            digest: "sha256:aa".into(),
            media_type: "m".into(),
        };
        s.apply(
            1,
            Command::PutImage {
                repo: "hello".into(),
                tag: Some("latest".into()),
                record: rec.clone(),
            },
        )
        .unwrap();
        assert_eq!(s.images["hello"]["latest"], rec);
        assert_eq!(s.images["hello"]["sha256:aa"], rec);
        s.apply(
            2,
            Command::DeleteImage {
                repo: "hello".into(),
                reference: "sha256:aa".into(),
            },
        )
        .unwrap();
        assert!(s.images.is_empty());
    }

    fn put_secret(s: &mut Store, index: u64, name: &str, value: &[u8]) -> Result<(), ApplyError> {
        s.apply(
            index,
            Command::PutSecret {
                kind: crate::secret::ObjectKind::Secret,
                name: name.into(),
                labels: Default::default(),
                data: crate::secret::SecretData(value.to_vec()),
                digest: "sha256:test".into(),
                now: index,
            },
        )
    }

    #[test]
    fn secret_versions_roll_unpinned_services_and_are_kept_while_used() {
        let mut s = Store::default();
        put_secret(&mut s, 1, "db", b"one").unwrap();
        let mut web = spec("web", 1);
        web.secrets.push(crate::secret::FileRef {
            source: "db".into(),
            target: None,
            uid: None,
            gid: None,
            mode: None,
        });
        let mut pinned = spec("pinned", 1);
        pinned.env_from_secret.insert("PW".into(), "db:1".into());
        for (i, sp) in [web, pinned].into_iter().enumerate() {
            s.apply(
                2 + i as u64,
                Command::PutService {
                    id: format!("s{i}"),
                    spec: Box::new(sp),
                    now: 2,
                },
            )
            .unwrap();
        }
        assert_eq!(s.services["web"].spec.resolved_refs["secret:db"], 1);
        assert_eq!(s.services["pinned"].spec.resolved_refs["secret:db:1"], 1);
        // A running task of web holds version 1.
        let t = task("t1", &s.services["web"], 1);
        s.apply(4, Command::CreateTasks { tasks: vec![t] }).unwrap();
        // Same value: nothing changes.
        put_secret(&mut s, 5, "db", b"one").unwrap();
        assert_eq!(s.secret_objects["db"].latest, 1);
        put_secret(&mut s, 6, "db", b"two").unwrap();
        let web = &s.services["web"];
        assert_eq!(web.spec.resolved_refs["secret:db"], 2);
        assert_eq!(web.spec_version, 6, "the new version starts a rollout");
        assert_eq!(
            web.previous_spec.as_ref().unwrap().resolved_refs["secret:db"],
            1
        );
        assert_eq!(
            s.services["pinned"].spec_version, 3,
            "a pinned service stays"
        );
        assert_eq!(
            crate::secret::needs(&web.spec),
            vec![(crate::secret::ObjectKind::Secret, "db".into(), 2)]
        );
        put_secret(&mut s, 7, "db", b"three").unwrap();
        // 1: pinned and the running task; 2: web's previous spec; 3: latest.
        assert_eq!(
            s.secret_objects["db"]
                .versions
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        // A rollback returns to the version the previous spec resolved to (kept for it).
        let mut rolled = s.clone();
        rolled
            .apply(
                100,
                Command::Rollback {
                    service: "web".into(),
                    now: 100,
                    reason: String::new(),
                    if_spec_version: None,
                },
            )
            .unwrap();
        assert_eq!(rolled.services["web"].spec.resolved_refs["secret:db"], 2);
        assert_eq!(rolled.services["web"].spec_version, 100);
        s.apply(
            8,
            Command::RemoveService {
                name: "pinned".into(),
            },
        )
        .unwrap();
        s.apply(
            9,
            Command::DeleteTasks {
                ids: vec!["t1".into()],
            },
        )
        .unwrap();
        assert_eq!(
            s.secret_objects["db"]
                .versions
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        // Removal is refused while web uses it, and names the user.
        let e = s
            .apply(
                10,
                Command::RemoveSecret {
                    kind: crate::secret::ObjectKind::Secret,
                    name: "db".into(),
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("in use by service(s) web"), "{e}");
        s.apply(11, Command::RemoveService { name: "web".into() })
            .unwrap();
        s.apply(
            12,
            Command::RemoveSecret {
                kind: crate::secret::ObjectKind::Secret,
                name: "db".into(),
            },
        )
        .unwrap();
        assert!(s.secret_objects.is_empty());
    }

    #[test]
    fn an_oversized_secret_is_refused_when_applied_and_values_stay_out_of_debug() {
        let mut s = Store::default();
        let e = put_secret(&mut s, 1, "big", &vec![b'x'; crate::secret::MAX_DATA + 1]).unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");
        assert!(s.secret_objects.is_empty());
        put_secret(&mut s, 2, "pw", b"s3cr3t-value-xyz").unwrap();
        assert!(!format!("{s:?}").contains("s3cr3t-value-xyz"));
        // The store's JSON (raft snapshots) keeps the value, in base64.
        let json = serde_json::to_string(&s).unwrap();
        let back: Store = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn the_unlock_key_is_set_and_cleared_and_stays_out_of_debug() {
        let mut s = Store::default();
        let key = UnlockKeyText("RDRKEK-00112233445566778899aabbccddeeff".into());
        s.apply(
            1,
            Command::SetUnlockKey {
                key: Some(key.clone()),
            },
        )
        .unwrap();
        assert_eq!(s.unlock_key, Some(key));
        assert!(!format!("{s:?}").contains("RDRKEK-0011"));
        let back: Store = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        s.apply(2, Command::SetUnlockKey { key: None }).unwrap();
        assert_eq!(s.unlock_key, None);
        // A store from before autolock reads as autolock off.
        assert!(!serde_json::to_string(&s).unwrap().contains("unlock_key"));
    }
}

//! Conversions between the wire (rudder.proto) and the model, in one place for the controller:
//! summaries the Control API lists, the proto enums of states, roles and actions, and the
//! `Status` a raft or store error becomes.

use rudder_model::apply::Action;
use rudder_model::apply::{Manifests, SecretPut};
use rudder_model::secret::{self, ObjectKind, SecretData};
use rudder_model::store::ApplyError;
use rudder_model::{Availability, Node, NodeRole, NodeState, Store, Task, TaskState, UpdateState};
use rudder_proto::v1 as wire;
use rudder_proto::v1::{ApplyRequest, NodeSummary, PutSecretRequest, TaskSummary};
use serde::de::DeserializeOwned;
use sha2::Digest;
use tonic::Status;

use crate::raft_node::RaftError;

/// The `Status` a failed proposal or read becomes: a store refusal is the caller's to fix, a
/// lost leader or a timeout is worth a retry.
pub fn raft_status(e: RaftError) -> Status {
    match e {
        RaftError::NotLeader(_) => Status::unavailable(e.to_string()),
        RaftError::Timeout => Status::deadline_exceeded(e.to_string()),
        RaftError::Apply(a) => apply_status(a),
        other => Status::internal(other.to_string()),
    }
}

/// The `Status` a store refusal becomes (from a proposal, or from an apply's dry run).
pub fn apply_status(e: ApplyError) -> Status {
    match e {
        ApplyError::NotFound { .. } => Status::not_found(e.to_string()),
        ApplyError::Network { .. } | ApplyError::Service { .. } => {
            Status::invalid_argument(e.to_string())
        }
        ApplyError::Volume { .. } | ApplyError::Secret { .. } => {
            Status::failed_precondition(e.to_string())
        }
        other => Status::internal(other.to_string()),
    }
}

/// One JSON document of `what` (`service`, `network`, …), the `n`th of its kind, decoded and
/// validated on its own.
fn document<T: DeserializeOwned>(
    what: &'static str,
    n: usize,
    json: &str,
    name: impl Fn(&T) -> &str,
    validate: impl Fn(&T) -> Result<(), rudder_model::ValidationError>,
) -> Result<T, Status> {
    let v: T = rudder_model::wire::decode(what, json)
        .map_err(|e| Status::invalid_argument(format!("{what} #{}: {e}", n + 1)))?;
    validate(&v).map_err(|e| Status::invalid_argument(format!("{what} {:?}: {e}", name(&v))))?;
    Ok(v)
}

/// An `Apply` request as the model's manifests.
pub fn manifests(req: ApplyRequest) -> Result<Manifests, Status> {
    let mut m = Manifests::default();
    for (i, json) in req.service_specs_json.iter().enumerate() {
        m.services.push(document(
            "service",
            i,
            json,
            |s: &rudder_model::ServiceSpec| &s.name,
            |s| s.validate(),
        )?);
    }
    for (i, json) in req.network_specs_json.iter().enumerate() {
        m.networks.push(document(
            "network",
            i,
            json,
            |s: &rudder_model::network::NetworkSpec| &s.name,
            |s| s.validate(),
        )?);
    }
    for (i, json) in req.volume_specs_json.iter().enumerate() {
        m.volumes.push(document(
            "volume",
            i,
            json,
            |s: &rudder_model::volume::VolumeSpec| &s.name,
            |s| s.validate(),
        )?);
    }
    for put in req.secrets {
        m.secrets.push(secret_put(put)?.0);
    }
    Ok(m)
}

/// A secret's or config's kind on the wire.
pub fn object_kind(kind: &str) -> Result<ObjectKind, Status> {
    ObjectKind::parse(kind).ok_or_else(|| {
        Status::invalid_argument(format!(
            "secrets: kind {kind:?} is neither \"secret\" nor \"config\""
        ))
    })
}

/// A put of a secret or config, checked (name, size), and its mode (`create`, `update`, or
/// empty for either).
pub fn secret_put(req: PutSecretRequest) -> Result<(SecretPut, String), Status> {
    let kind = object_kind(&req.kind)?;
    secret::validate_object_name("name", &req.name)
        .map_err(|e| Status::invalid_argument(format!("{kind} {:?}: {e}", req.name)))?;
    secret::check_size("data", req.data.len())
        .map_err(|e| Status::invalid_argument(format!("{kind} {:?}: {e}", req.name)))?;
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&req.data)));
    Ok((
        SecretPut {
            kind,
            name: req.name,
            labels: req.labels.into_iter().collect(),
            data: SecretData(req.data),
            digest,
        },
        req.mode,
    ))
}

/// One object's outcome of an apply, for the wire.
pub fn apply_result(r: &rudder_model::apply::ApplyResult) -> rudder_proto::v1::ApplyResult {
    rudder_proto::v1::ApplyResult {
        kind: r.kind.as_str().into(),
        name: r.name.clone(),
        action: action_to_wire(r.action).into(),
    }
}

pub fn task_summary(store: &Store, t: &Task) -> TaskSummary {
    let node = t
        .node_id
        .as_ref()
        .and_then(|n| store.nodes.get(n))
        .map(|n| n.hostname.clone())
        .unwrap_or_default();
    TaskSummary {
        id: t.id.clone(),
        name: t.name(),
        service: t.service_name.clone(),
        slot: t.slot,
        node_id: t.node_id.clone().unwrap_or_default(),
        node,
        desired_state: task_state_to_wire(t.desired_state).into(),
        state: task_state_to_wire(t.status.state).into(),
        message: t.status.message.clone(),
        error: t.status.error.clone(),
        container_id: t.status.container_id.clone(),
        has_exit_code: t.status.exit_code.is_some(),
        exit_code: t.status.exit_code.unwrap_or(0),
        timestamp_ms: t.status.timestamp,
        image: t.spec.image.clone(),
    }
}

pub fn node_summary(store: &Store, n: &Node) -> NodeSummary {
    let active: Vec<&Task> = store.tasks_on(&n.id).filter(|t| t.is_active()).collect();
    NodeSummary {
        id: n.id.clone(),
        hostname: n.hostname.clone(),
        addr: n.addr.clone(),
        state: node_state_to_wire(&n.state).into(),
        tasks: active.len() as u64,
        availability: availability_to_wire(n.availability).into(),
        role: node_role_to_wire(n.role).into(),
        labels: n.labels.clone().into_iter().collect(),
        cpus_milli: n.resources.cpus,
        memory_bytes: n.resources.memory,
        reserved_cpus_milli: active
            .iter()
            .map(|t| t.spec.resources.reservations.cpus)
            .sum(),
        reserved_memory_bytes: active
            .iter()
            .map(|t| t.spec.resources.reservations.memory)
            .sum(),
        cert_not_after_ms: n.cert_not_after,
    }
}

// ---- enums: model ↔ wire ----------------------------------------------------------------

/// A wire enum value this build does not know (a newer peer, or garbage).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("wire: {what} {value} is not known to this build")]
pub struct UnknownEnum {
    pub what: &'static str,
    pub value: i32,
}

impl From<UnknownEnum> for Status {
    fn from(e: UnknownEnum) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

pub fn task_state_to_wire(s: TaskState) -> wire::TaskState {
    match s {
        TaskState::New => wire::TaskState::New,
        TaskState::Pending => wire::TaskState::Pending,
        TaskState::Assigned => wire::TaskState::Assigned,
        TaskState::Preparing => wire::TaskState::Preparing,
        TaskState::Starting => wire::TaskState::Starting,
        TaskState::Running => wire::TaskState::Running,
        TaskState::Complete => wire::TaskState::Complete,
        TaskState::Failed => wire::TaskState::Failed,
        TaskState::Shutdown => wire::TaskState::Shutdown,
        TaskState::Rejected => wire::TaskState::Rejected,
        TaskState::Orphaned => wire::TaskState::Orphaned,
    }
}

pub fn task_state(v: i32) -> Result<TaskState, UnknownEnum> {
    let unknown = UnknownEnum {
        what: "task state",
        value: v,
    };
    Ok(
        match wire::TaskState::try_from(v).map_err(|_| unknown.clone())? {
            wire::TaskState::Unspecified => return Err(unknown),
            wire::TaskState::New => TaskState::New,
            wire::TaskState::Pending => TaskState::Pending,
            wire::TaskState::Assigned => TaskState::Assigned,
            wire::TaskState::Preparing => TaskState::Preparing,
            wire::TaskState::Starting => TaskState::Starting,
            wire::TaskState::Running => TaskState::Running,
            wire::TaskState::Complete => TaskState::Complete,
            wire::TaskState::Failed => TaskState::Failed,
            wire::TaskState::Shutdown => TaskState::Shutdown,
            wire::TaskState::Rejected => TaskState::Rejected,
            wire::TaskState::Orphaned => TaskState::Orphaned,
        },
    )
}

pub fn node_state_to_wire(s: &NodeState) -> wire::NodeState {
    match s {
        NodeState::Ready => wire::NodeState::Ready,
        NodeState::Down => wire::NodeState::Down,
    }
}

pub fn availability_to_wire(a: Availability) -> wire::Availability {
    match a {
        Availability::Active => wire::Availability::Active,
        Availability::Pause => wire::Availability::Pause,
        Availability::Drain => wire::Availability::Drain,
    }
}

/// An availability from the wire; `None` for UNSPECIFIED (leave it as it is).
pub fn availability(v: i32) -> Result<Option<Availability>, UnknownEnum> {
    let unknown = UnknownEnum {
        what: "availability",
        value: v,
    };
    Ok(
        match wire::Availability::try_from(v).map_err(|_| unknown)? {
            wire::Availability::Unspecified => None,
            wire::Availability::Active => Some(Availability::Active),
            wire::Availability::Pause => Some(Availability::Pause),
            wire::Availability::Drain => Some(Availability::Drain),
        },
    )
}

pub fn node_role_to_wire(r: NodeRole) -> wire::NodeRole {
    match r {
        NodeRole::Worker => wire::NodeRole::Worker,
        NodeRole::Manager => wire::NodeRole::Manager,
    }
}

/// A role from the wire (a claim: the store decides a node's role); UNSPECIFIED is a worker.
pub fn node_role(v: i32) -> Result<NodeRole, UnknownEnum> {
    match wire::NodeRole::try_from(v) {
        Ok(wire::NodeRole::Manager) => Ok(NodeRole::Manager),
        Ok(wire::NodeRole::Worker | wire::NodeRole::Unspecified) => Ok(NodeRole::Worker),
        Err(_) => Err(UnknownEnum {
            what: "node role",
            value: v,
        }),
    }
}

pub fn update_state_to_wire(s: Option<UpdateState>) -> wire::UpdateState {
    match s {
        None => wire::UpdateState::Unspecified,
        Some(UpdateState::Updating) => wire::UpdateState::Updating,
        Some(UpdateState::Paused) => wire::UpdateState::Paused,
        Some(UpdateState::Completed) => wire::UpdateState::Completed,
        Some(UpdateState::RollbackStarted) => wire::UpdateState::RollbackStarted,
        Some(UpdateState::RollbackPaused) => wire::UpdateState::RollbackPaused,
        Some(UpdateState::RollbackCompleted) => wire::UpdateState::RollbackCompleted,
    }
}

pub fn action_to_wire(a: Action) -> wire::Action {
    match a {
        Action::Created => wire::Action::Created,
        Action::Updated => wire::Action::Updated,
        Action::Unchanged => wire::Action::Unchanged,
    }
}

/// An enveloped JSON payload (`rudder_model::wire`) for a reply; a value that cannot be
/// encoded is an internal error, never an empty string.
pub fn json<T: serde::Serialize>(what: &'static str, v: &T) -> Result<String, Status> {
    rudder_model::wire::encode(what, v).map_err(|e| Status::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_state_round_trips_and_unknown_values_are_refused() {
        use TaskState::*;
        for s in [
            New, Pending, Assigned, Preparing, Starting, Running, Complete, Failed, Shutdown,
            Rejected, Orphaned,
        ] {
            assert_eq!(task_state(task_state_to_wire(s) as i32), Ok(s));
            // The wire names follow the model's.
            let name = task_state_to_wire(s).as_str_name().to_lowercase();
            assert_eq!(name, format!("task_state_{s}"));
        }
        assert!(task_state(0).is_err() && task_state(99).is_err());
        for a in [
            Availability::Active,
            Availability::Pause,
            Availability::Drain,
        ] {
            assert_eq!(availability(availability_to_wire(a) as i32), Ok(Some(a)));
        }
        assert_eq!(availability(0), Ok(None));
        assert!(availability(42).is_err());
        for r in [NodeRole::Worker, NodeRole::Manager] {
            assert_eq!(node_role(node_role_to_wire(r) as i32), Ok(r));
        }
    }
}

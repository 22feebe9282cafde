//! Conversions between the wire (rudder.proto) and the model, in one place for the controller:
//! summaries the Control API lists, the proto enums of states, roles and actions, and the
//! `Status` a raft or store error becomes.

use rudder_model::apply::{Manifests, SecretPut};
use rudder_model::secret::{self, ObjectKind, SecretData};
use rudder_model::store::ApplyError;
use rudder_model::{Node, NodeRole, Store, Task, TaskState};
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
        ApplyError::Volume { .. } | ApplyError::Secret { .. } | ApplyError::Stack { .. } => {
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
        action: wire::Action::from(r.action).into(),
        changes: r
            .changes
            .iter()
            .map(|c| {
                let json = |v: &Option<serde_json::Value>| {
                    v.as_ref().map(ToString::to_string).unwrap_or_default()
                };
                rudder_proto::v1::FieldChange {
                    path: c.path.clone(),
                    old_json: json(&c.old),
                    new_json: json(&c.new),
                }
            })
            .collect(),
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
        desired_state: wire::TaskState::from(t.desired_state).into(),
        state: wire::TaskState::from(t.status.state).into(),
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
        state: wire::NodeState::from(n.state.clone()).into(),
        tasks: active.len() as u64,
        availability: wire::Availability::from(n.availability).into(),
        role: wire::NodeRole::from(n.role).into(),
        labels: n.labels.clone().into_iter().collect(),
        host_labels: n.host_labels.clone().into_iter().collect(),
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
        version: store.node_versions.get(&n.id).cloned().unwrap_or_default(),
    }
}

// ---- enums: model ↔ wire (the tables are `rudder_proto::model`'s, shared by every side) ----

pub use rudder_proto::model::UnknownEnum;

/// The refusal of a request that carries an enum value this build does not know.
pub fn unknown_status(e: UnknownEnum) -> Status {
    Status::invalid_argument(e.to_string())
}

/// A task state an agent reported: UNSPECIFIED is as unknown as a value from a newer build.
pub fn task_state(v: i32) -> Result<TaskState, UnknownEnum> {
    rudder_proto::model::task_state(v)?.ok_or(UnknownEnum {
        what: "task state",
        value: v,
    })
}

/// A role an agent claims (a claim: the store decides a node's role); UNSPECIFIED is a worker.
pub fn node_role(v: i32) -> Result<NodeRole, UnknownEnum> {
    Ok(rudder_proto::model::node_role(v)?.unwrap_or(NodeRole::Worker))
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
    fn unspecified_task_states_are_refused_and_roles_default_to_worker() {
        use TaskState::*;
        for s in [
            New, Pending, Assigned, Preparing, Starting, Running, Complete, Failed, Shutdown,
            Rejected, Orphaned,
        ] {
            assert_eq!(task_state(wire::TaskState::from(s) as i32), Ok(s));
            // The wire names follow the model's.
            let name = wire::TaskState::from(s).as_str_name().to_lowercase();
            assert_eq!(name, format!("task_state_{s}"));
        }
        assert!(task_state(0).is_err() && task_state(99).is_err());
        assert_eq!(node_role(0), Ok(NodeRole::Worker));
        assert!(node_role(42).is_err());
    }
}

//! Conversions between the wire (rudder.proto) and the model on the agent's side: the task
//! states it reports, the role it claims, and the enveloped JSON payloads it receives
//! (`rudder_model::wire`). Nothing else in the agent reads a wire enum or a JSON payload.

use rudder_model::network::NetworkMap;
use rudder_model::wire::WireError;
use rudder_model::{Task, TaskState};
use rudder_proto::v1 as wire;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("wire: {what} {value} is not known to this build")]
    UnknownEnum { what: &'static str, value: i32 },
}

/// A task state as the dispatcher reads it.
pub fn task_state_to_wire(s: TaskState) -> i32 {
    let w = match s {
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
    };
    w.into()
}

/// A task state the controller sent.
pub fn task_state(v: i32) -> Result<TaskState, ConvertError> {
    let unknown = || ConvertError::UnknownEnum {
        what: "task state",
        value: v,
    };
    Ok(match wire::TaskState::try_from(v).map_err(|_| unknown())? {
        wire::TaskState::Unspecified => return Err(unknown()),
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
    })
}

/// The role the agent claims when it registers (`manager` when its host runs a controller).
pub fn role_to_wire(manager: bool) -> i32 {
    if manager {
        wire::NodeRole::Manager.into()
    } else {
        wire::NodeRole::Worker.into()
    }
}

/// One assigned task: its enveloped JSON, with the desired state the typed field says.
pub fn assignment(a: &wire::Assignment) -> Result<Task, ConvertError> {
    let mut t: Task = rudder_model::wire::decode("task", &a.task_json)?;
    t.desired_state = task_state(a.desired_state)?;
    Ok(t)
}

/// The overlay's desired state for this host.
pub fn network_map(m: &wire::NetworkMap) -> Result<NetworkMap, ConvertError> {
    Ok(rudder_model::wire::decode("network map", &m.map_json)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_states_round_trip_and_unknown_ones_are_refused() {
        for v in 1..=11 {
            let s = task_state(v).unwrap();
            assert_eq!(task_state_to_wire(s), v);
        }
        assert!(task_state(0).is_err() && task_state(12).is_err());
    }

    #[test]
    fn an_assignment_in_an_unknown_envelope_is_refused() {
        let a = wire::Assignment {
            task_id: "t".into(),
            desired_state: wire::TaskState::Running.into(),
            task_json: r#"{"v":9,"body":{}}"#.into(),
        };
        let e = assignment(&a).unwrap_err().to_string();
        assert!(e.contains("version 9 is not understood"), "{e}");
    }
}

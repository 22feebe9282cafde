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
    #[error("{0}")]
    UnknownEnum(#[from] rudder_proto::model::UnknownEnum),
}

/// A task state as the dispatcher reads it.
pub fn task_state_to_wire(s: TaskState) -> i32 {
    wire::TaskState::from(s).into()
}

/// A task state the controller sent: UNSPECIFIED is as unknown as a value from a newer build.
pub fn task_state(v: i32) -> Result<TaskState, ConvertError> {
    let unknown = rudder_proto::model::UnknownEnum {
        what: "task state",
        value: v,
    };
    Ok(rudder_proto::model::task_state(v)?.ok_or(unknown)?)
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

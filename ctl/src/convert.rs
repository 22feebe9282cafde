//! Conversions between the wire (rudder.proto) and what rctl shows or sends: the proto enums
//! become the model's states, roles and actions (printed by their model names, so output and
//! `--json` read as before), and JSON payloads go in and out of their versioned envelope
//! (`rudder_model::wire`). No command compares a wire value with a string literal.

use anyhow::Context as _;
use rudder_model::apply::Action;
pub use rudder_model::{Availability, NodeRole, NodeState, TaskState, UpdateState};
use rudder_proto::v1 as wire;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A task state from the wire; `None` for one this build does not know.
pub fn task_state(v: i32) -> Option<TaskState> {
    rudder_proto::model::task_state(v).ok().flatten()
}

/// How a task state prints (`running`), or `unknown(N)`.
pub fn task_state_name(v: i32) -> String {
    task_state(v).map_or_else(|| format!("unknown({v})"), |s| s.to_string())
}

pub fn node_state_name(v: i32) -> String {
    match rudder_proto::model::node_state(v) {
        Ok(Some(s)) => format!("{s:?}").to_lowercase(),
        _ => format!("unknown({v})"),
    }
}

pub fn availability(v: i32) -> Option<Availability> {
    rudder_proto::model::availability(v).ok().flatten()
}

pub fn availability_name(v: i32) -> String {
    availability(v).map_or_else(|| format!("unknown({v})"), |a| a.as_str().to_string())
}

/// An availability to send (`active`, `pause`, `drain`), checked here so a typo is refused
/// before anything is sent.
pub fn availability_to_wire(a: &str) -> anyhow::Result<i32> {
    let a: Availability = a.parse().map_err(anyhow::Error::msg)?;
    Ok(wire::Availability::from(a).into())
}

pub fn role_name(v: i32) -> String {
    match rudder_proto::model::node_role(v) {
        Ok(Some(r)) => r.as_str().to_string(),
        _ => format!("unknown({v})"),
    }
}

/// A service's last rollout; `None` when there was none (or it is unknown to this build).
pub fn update_state(v: i32) -> Option<UpdateState> {
    rudder_proto::model::update_state(v).ok().flatten()
}

/// How a rollout state prints (`rollback_started`); empty for none.
pub fn update_state_name(v: i32) -> String {
    update_state(v)
        .map(|s| s.as_str().to_string())
        .unwrap_or_default()
}

/// A job's progress; `None` for services that are not jobs (or a state unknown to this build).
pub fn job_progress(svc: &rudder_proto::v1::ServiceSummary) -> Option<rudder_model::job::Progress> {
    svc.job
        .as_ref()
        .and_then(|j| rudder_proto::model::job_progress(j).ok().flatten())
}

pub fn action(v: i32) -> Option<Action> {
    rudder_proto::model::action(v).ok().flatten()
}

pub fn action_name(v: i32) -> String {
    action(v).map_or_else(|| format!("unknown({v})"), |a| a.as_str().to_string())
}

/// A JSON payload from the controller, out of its envelope.
pub fn from_json<T: DeserializeOwned>(what: &'static str, json: &str) -> anyhow::Result<T> {
    rudder_model::wire::decode(what, json).context("reading the controller's answer")
}

/// A JSON payload for the controller, in its envelope.
pub fn to_json<T: Serialize>(what: &'static str, v: &T) -> anyhow::Result<String> {
    Ok(rudder_model::wire::encode(what, v)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_models() {
        assert_eq!(task_state_name(wire::TaskState::Running.into()), "running");
        assert_eq!(task_state_name(77), "unknown(77)");
        assert_eq!(node_state_name(wire::NodeState::Down.into()), "down");
        assert_eq!(
            availability_name(availability_to_wire("drain").unwrap()),
            "drain"
        );
        assert!(availability_to_wire("sleepy").is_err());
        assert_eq!(
            update_state_name(wire::UpdateState::RollbackStarted.into()),
            "rollback_started"
        );
        assert_eq!(update_state_name(0), "");
        assert_eq!(action_name(wire::Action::Unchanged.into()), "unchanged");
        assert_eq!(role_name(wire::NodeRole::Manager.into()), "manager");
    }
}

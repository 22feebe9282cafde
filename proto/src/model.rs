//! The model's enums on the wire and back, one table per enum for every side (controller,
//! agent, rctl): a state added to the model is mapped here once, and the compiler points at
//! this file when it is missing. Encoding is total (`From`); decoding says which of three a
//! value is: known, unspecified (`Ok(None)`: the field was left unset), or unknown to this
//! build (a newer peer, or garbage) — each side decides what the last two mean for it.

use rudder_model::apply::Action;
use rudder_model::job::{JobState, Progress};
use rudder_model::{Availability, NodeRole, NodeState, TaskState, UpdateState};

use crate::v1 as wire;

/// A wire enum value this build does not know (a newer peer, or garbage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownEnum {
    /// Which enum (`task state`, `availability`, ...).
    pub what: &'static str,
    /// The value received.
    pub value: i32,
}

impl std::fmt::Display for UnknownEnum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wire: {} {} is not known to this build",
            self.what, self.value
        )
    }
}

impl std::error::Error for UnknownEnum {}

/// Decodes `v` as `W`, then maps it with `known` (`None` for UNSPECIFIED).
fn decode<W: TryFrom<i32>, T>(
    what: &'static str,
    v: i32,
    known: impl FnOnce(W) -> Option<T>,
) -> Result<Option<T>, UnknownEnum> {
    W::try_from(v)
        .map(known)
        .map_err(|_| UnknownEnum { what, value: v })
}

impl From<TaskState> for wire::TaskState {
    fn from(s: TaskState) -> Self {
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
}

/// A task state from the wire.
pub fn task_state(v: i32) -> Result<Option<TaskState>, UnknownEnum> {
    decode("task state", v, |w| {
        Some(match w {
            wire::TaskState::Unspecified => return None,
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
    })
}

impl From<NodeState> for wire::NodeState {
    fn from(s: NodeState) -> Self {
        match s {
            NodeState::Ready => wire::NodeState::Ready,
            NodeState::Down => wire::NodeState::Down,
        }
    }
}

/// A node state from the wire.
pub fn node_state(v: i32) -> Result<Option<NodeState>, UnknownEnum> {
    decode("node state", v, |w| match w {
        wire::NodeState::Unspecified => None,
        wire::NodeState::Ready => Some(NodeState::Ready),
        wire::NodeState::Down => Some(NodeState::Down),
    })
}

impl From<Availability> for wire::Availability {
    fn from(a: Availability) -> Self {
        match a {
            Availability::Active => wire::Availability::Active,
            Availability::Pause => wire::Availability::Pause,
            Availability::Drain => wire::Availability::Drain,
        }
    }
}

/// An availability from the wire.
pub fn availability(v: i32) -> Result<Option<Availability>, UnknownEnum> {
    decode("availability", v, |w| match w {
        wire::Availability::Unspecified => None,
        wire::Availability::Active => Some(Availability::Active),
        wire::Availability::Pause => Some(Availability::Pause),
        wire::Availability::Drain => Some(Availability::Drain),
    })
}

impl From<NodeRole> for wire::NodeRole {
    fn from(r: NodeRole) -> Self {
        match r {
            NodeRole::Worker => wire::NodeRole::Worker,
            NodeRole::Manager => wire::NodeRole::Manager,
        }
    }
}

/// A node role from the wire.
pub fn node_role(v: i32) -> Result<Option<NodeRole>, UnknownEnum> {
    decode("node role", v, |w| match w {
        wire::NodeRole::Unspecified => None,
        wire::NodeRole::Worker => Some(NodeRole::Worker),
        wire::NodeRole::Manager => Some(NodeRole::Manager),
    })
}

impl From<Option<UpdateState>> for wire::UpdateState {
    fn from(s: Option<UpdateState>) -> Self {
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
}

/// A service's last rollout from the wire; `Ok(None)`: none yet.
pub fn update_state(v: i32) -> Result<Option<UpdateState>, UnknownEnum> {
    decode("update state", v, |w| {
        Some(match w {
            wire::UpdateState::Unspecified => return None,
            wire::UpdateState::Updating => UpdateState::Updating,
            wire::UpdateState::Paused => UpdateState::Paused,
            wire::UpdateState::Completed => UpdateState::Completed,
            wire::UpdateState::RollbackStarted => UpdateState::RollbackStarted,
            wire::UpdateState::RollbackPaused => UpdateState::RollbackPaused,
            wire::UpdateState::RollbackCompleted => UpdateState::RollbackCompleted,
        })
    })
}

impl From<JobState> for wire::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Running => wire::JobState::Running,
            JobState::Complete => wire::JobState::Complete,
            JobState::Failed => wire::JobState::Failed,
        }
    }
}

/// A job's state from the wire; `Ok(None)`: not a job.
pub fn job_state(v: i32) -> Result<Option<JobState>, UnknownEnum> {
    decode("job state", v, |w| match w {
        wire::JobState::Unspecified => None,
        wire::JobState::Running => Some(JobState::Running),
        wire::JobState::Complete => Some(JobState::Complete),
        wire::JobState::Failed => Some(JobState::Failed),
    })
}

impl From<Progress> for wire::JobProgress {
    fn from(p: Progress) -> Self {
        wire::JobProgress {
            state: wire::JobState::from(p.state).into(),
            completed: p.completed,
            total: p.total,
            running: p.running,
            failed: p.failed,
        }
    }
}

/// A job's progress from the wire.
pub fn job_progress(p: &wire::JobProgress) -> Result<Option<Progress>, UnknownEnum> {
    Ok(job_state(p.state)?.map(|state| Progress {
        completed: p.completed,
        total: p.total,
        running: p.running,
        failed: p.failed,
        state,
    }))
}

impl From<Action> for wire::Action {
    fn from(a: Action) -> Self {
        match a {
            Action::Created => wire::Action::Created,
            Action::Updated => wire::Action::Updated,
            Action::Unchanged => wire::Action::Unchanged,
        }
    }
}

/// What an apply did to an object, from the wire.
pub fn action(v: i32) -> Result<Option<Action>, UnknownEnum> {
    decode("action", v, |w| match w {
        wire::Action::Unspecified => None,
        wire::Action::Created => Some(Action::Created),
        wire::Action::Updated => Some(Action::Updated),
        wire::Action::Unchanged => Some(Action::Unchanged),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every model value goes out and comes back as itself; UNSPECIFIED and unknown values
    /// are told apart.
    #[test]
    fn every_value_round_trips() {
        use TaskState as T;
        for s in [
            T::New,
            T::Pending,
            T::Assigned,
            T::Preparing,
            T::Starting,
            T::Running,
            T::Complete,
            T::Failed,
            T::Shutdown,
            T::Rejected,
            T::Orphaned,
        ] {
            assert_eq!(task_state(wire::TaskState::from(s).into()), Ok(Some(s)));
        }
        for s in [NodeState::Ready, NodeState::Down] {
            assert_eq!(
                node_state(wire::NodeState::from(s.clone()).into()),
                Ok(Some(s))
            );
        }
        for a in [
            Availability::Active,
            Availability::Pause,
            Availability::Drain,
        ] {
            assert_eq!(
                availability(wire::Availability::from(a).into()),
                Ok(Some(a))
            );
        }
        for r in [NodeRole::Worker, NodeRole::Manager] {
            assert_eq!(node_role(wire::NodeRole::from(r).into()), Ok(Some(r)));
        }
        use UpdateState as U;
        for s in [
            U::Updating,
            U::Paused,
            U::Completed,
            U::RollbackStarted,
            U::RollbackPaused,
            U::RollbackCompleted,
        ] {
            assert_eq!(
                update_state(wire::UpdateState::from(Some(s)).into()),
                Ok(Some(s))
            );
        }
        for s in [JobState::Running, JobState::Complete, JobState::Failed] {
            assert_eq!(job_state(wire::JobState::from(s).into()), Ok(Some(s)));
            let p = Progress {
                completed: 2,
                total: 5,
                running: 1,
                failed: 3,
                state: s,
            };
            assert_eq!(job_progress(&wire::JobProgress::from(p)), Ok(Some(p)));
        }
        for a in [Action::Created, Action::Updated, Action::Unchanged] {
            assert_eq!(action(wire::Action::from(a).into()), Ok(Some(a)));
        }
        assert_eq!(task_state(0), Ok(None));
        let e = task_state(77).unwrap_err();
        assert_eq!(
            e.to_string(),
            "wire: task state 77 is not known to this build"
        );
    }
}

//! Task states and their order. A task only moves forward; the agent reports observed states,
//! the controller alone writes `desired_state`.

use serde::{Deserialize, Serialize};

/// Life of a task, in order. `Complete`, `Failed`, `Shutdown` and `Rejected` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Created by the orchestrator, not yet placed.
    New,
    /// Waiting for the scheduler (has a reason when unplaceable).
    Pending,
    /// Placed on a node; the agent has not acted yet.
    Assigned,
    /// The agent is pulling the image and preparing the bundle.
    Preparing,
    /// The runtime is starting the container.
    Starting,
    /// The container runs (and, with a health check, has passed it once).
    Running,
    /// Exited with code 0.
    Complete,
    /// Exited non-zero or could not start.
    Failed,
    /// Stopped because the controller asked.
    Shutdown,
    /// Could not be run on its node at all (e.g. the image does not exist).
    Rejected,
    /// The task's node went away; its fate is unknown.
    Orphaned,
}

impl TaskState {
    /// Whether the task has ended: it never changes state again.
    pub fn is_terminal(self) -> bool {
        self >= TaskState::Complete
    }

    /// The lowercase name, as shown by `rctl ps`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::New => "new",
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Preparing => "preparing",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Complete => "complete",
            TaskState::Failed => "failed",
            TaskState::Shutdown => "shutdown",
            TaskState::Rejected => "rejected",
            TaskState::Orphaned => "orphaned",
        }
    }

    /// Whether an observed-state report may replace `self`: states only move forward, so a late,
    /// reordered report can never resurrect a finished task.
    pub fn can_advance_to(self, next: TaskState) -> bool {
        next > self || (next == self && !self.is_terminal())
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| format!("unknown task state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_only_move_forward() {
        use TaskState::*;
        assert!(Assigned.can_advance_to(Preparing));
        assert!(Running.can_advance_to(Running));
        assert!(Running.can_advance_to(Failed));
        assert!(!Running.can_advance_to(Starting));
        assert!(!Failed.can_advance_to(Running));
        assert!(!Complete.can_advance_to(Complete));
        assert!(Rejected.is_terminal() && !Running.is_terminal());
        assert_eq!("running".parse::<TaskState>().unwrap(), Running);
        assert!("nope".parse::<TaskState>().is_err());
    }
}

//! Rolling updates: how a spec change rolls out (`update_config`, and `rollback_config` for the way
//! back), and the system-owned progress of the latest rollout (`UpdateStatus`). The rollout itself
//! is planned by `reconcile`; the status is written only through the store's commands.
//!
//! Invariants: a config is plain data with Swarm's defaults (one task at a time, no delay,
//! stop-first, pause on failure, 5 s monitor, no failures tolerated); a default config is not
//! written back, so specs stored before these fields existed read and compare unchanged.

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// How tasks are replaced when a service's spec changes (or changes back, for `rollback_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// Slots replaced per batch; 0 replaces every slot at once.
    #[serde(default = "one")]
    pub parallelism: u64,
    /// Wait between batches, counted from the moment the last task of a batch reached `running`.
    #[serde(default, with = "crate::duration")]
    pub delay: u64,
    /// Stop the old task first, or start the new one first.
    #[serde(default)]
    pub order: UpdateOrder,
    /// What happens when too many new tasks fail.
    #[serde(default)]
    pub failure_action: FailureAction,
    /// After a new task reaches `running`, how long its failure still counts against the update
    /// (milliseconds). The update completes only once the last batch has run this long.
    #[serde(default = "default_monitor", with = "crate::duration")]
    pub monitor: u64,
    /// Failed new tasks tolerated, as a fraction of the tasks updated so far (0 to 1).
    #[serde(default)]
    pub max_failure_ratio: FailureRatio,
}

fn one() -> u64 {
    1
}

fn default_monitor() -> u64 {
    5_000
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            parallelism: 1,
            delay: 0,
            order: UpdateOrder::default(),
            failure_action: FailureAction::default(),
            monitor: default_monitor(),
            max_failure_ratio: FailureRatio::default(),
        }
    }
}

impl UpdateConfig {
    pub(crate) fn is_default(&self) -> bool {
        *self == UpdateConfig::default()
    }

    /// `field` is `update_config` or `rollback_config`, to name the field at fault.
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        if self.max_failure_ratio.0 > 1000 {
            return Err(ValidationError::new(
                format!("{field}.max_failure_ratio"),
                format!("{} is not between 0 and 1", self.max_failure_ratio),
            ));
        }
        if field == "rollback_config" && self.failure_action == FailureAction::Rollback {
            return Err(ValidationError::new(
                "rollback_config.failure_action",
                "a rollback cannot roll back: use pause or continue",
            ));
        }
        Ok(())
    }

    /// Slots per batch, with 0 meaning all of `outdated`.
    pub fn batch_size(&self, outdated: usize) -> usize {
        match self.parallelism {
            0 => outdated,
            p => usize::try_from(p).unwrap_or(usize::MAX).min(outdated),
        }
    }
}

/// Whether the old task stops before its replacement starts (never more tasks than replicas), or
/// after the replacement runs (never fewer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// Stop the old task, then start its replacement (never more tasks than replicas).
    #[default]
    StopFirst,
    /// Start the replacement, then stop the old task once it runs (never fewer).
    StartFirst,
}

/// What a rollout does when too many new tasks fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    /// Stop starting batches and say why; the user applies a fix or rolls back.
    #[default]
    Pause,
    /// Ignore failures and carry on.
    Continue,
    /// Go back to the previous spec (with `rollback_config`). Not allowed in `rollback_config`.
    Rollback,
}

/// A fraction between 0 and 1 kept as whole thousandths, so specs stay `Eq`. Written as a number
/// (`0.25`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct FailureRatio(pub u32);

impl FailureRatio {
    /// The ratio in thousandths.
    pub fn per_mille(self) -> u32 {
        self.0
    }

    /// Whether `failures` out of `total` is more than this ratio.
    pub fn exceeded_by(self, failures: u64, total: u64) -> bool {
        failures > 0 && failures * 1000 > u64::from(self.0) * total.max(1)
    }
}

impl std::fmt::Display for FailureRatio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", f64::from(self.0) / 1000.0)
    }
}

impl Serialize for FailureRatio {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(f64::from(self.0) / 1000.0)
    }
}

impl<'de> Deserialize<'de> for FailureRatio {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = FailureRatio;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a fraction between 0 and 1, such as 0.2")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FailureRatio, E> {
                self.visit_f64(v as f64)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FailureRatio, E> {
                self.visit_f64(v as f64)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<FailureRatio, E> {
                // Out-of-range values parse (up to a bound) so `validate` can name the field.
                if !v.is_finite() || !(0.0..=1_000_000.0).contains(&v) {
                    return Err(E::custom(format!("{v} is not between 0 and 1")));
                }
                Ok(FailureRatio((v * 1000.0).round() as u32))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where the latest rollout of a service stands. Written by `PutService` (a task-affecting change
/// starts `Updating`), `Rollback` (`RollbackStarted`) and the reconciler (`SetUpdateStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// Where the rollout is.
    pub state: UpdateState,
    /// Why the rollout is in this state: for a pause or an automatic rollback, the failed task
    /// and its error.
    #[serde(default)]
    pub message: String,
    /// Milliseconds since the epoch, stamped by the leader.
    pub started_at: u64,
    /// When it completed, if it did (milliseconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<u64>,
}

/// The state of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    /// Replacing tasks batch by batch.
    Updating,
    /// Too many failures with `failure_action: pause`: no batch starts until a new spec is
    /// applied or the service is rolled back.
    Paused,
    /// Every task runs the new spec.
    Completed,
    /// Going back to the previous spec, by hand (`rctl rollback`) or as a failure action.
    RollbackStarted,
    /// A rollback that itself saw too many failures: paused.
    RollbackPaused,
    /// Every task runs the previous spec again.
    RollbackCompleted,
}

impl UpdateState {
    /// The snake_case name, as shown by `rctl get`.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::Updating => "updating",
            UpdateState::Paused => "paused",
            UpdateState::Completed => "completed",
            UpdateState::RollbackStarted => "rollback_started",
            UpdateState::RollbackPaused => "rollback_paused",
            UpdateState::RollbackCompleted => "rollback_completed",
        }
    }

    /// Still moving: batches may start and failures are counted.
    pub fn is_in_progress(self) -> bool {
        matches!(self, UpdateState::Updating | UpdateState::RollbackStarted)
    }

    /// Whether no batch may start until the user acts.
    pub fn is_paused(self) -> bool {
        matches!(self, UpdateState::Paused | UpdateState::RollbackPaused)
    }

    /// Whether the rollout goes back to the previous spec.
    pub fn is_rollback(self) -> bool {
        matches!(
            self,
            UpdateState::RollbackStarted
                | UpdateState::RollbackPaused
                | UpdateState::RollbackCompleted
        )
    }
}

impl std::fmt::Display for UpdateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let c: UpdateConfig = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(c, UpdateConfig::default());
        assert_eq!(
            (c.parallelism, c.delay, c.monitor),
            (1, 0, 5000),
            "Swarm's defaults"
        );
        let c: UpdateConfig = serde_json::from_value(serde_json::json!({
            "parallelism": 2, "delay": "10s", "order": "start-first",
            "failure_action": "rollback", "monitor": "30s", "max_failure_ratio": 0.25
        }))
        .unwrap();
        assert_eq!(c.parallelism, 2);
        assert_eq!(c.delay, 10_000);
        assert_eq!(c.order, UpdateOrder::StartFirst);
        assert_eq!(c.failure_action, FailureAction::Rollback);
        assert_eq!(c.monitor, 30_000);
        assert_eq!(c.max_failure_ratio, FailureRatio(250));
        c.validate("update_config").unwrap();
        assert_eq!(
            c.validate("rollback_config").unwrap_err().field,
            "rollback_config.failure_action"
        );
        let json = serde_json::to_value(c).unwrap();
        assert_eq!(json["max_failure_ratio"], 0.25);
        assert_eq!(json["delay"], "10s");
        let big: UpdateConfig =
            serde_json::from_value(serde_json::json!({"max_failure_ratio": 1.5})).unwrap();
        assert_eq!(
            big.validate("update_config").unwrap_err().field,
            "update_config.max_failure_ratio"
        );
        assert!(serde_json::from_value::<UpdateConfig>(
            serde_json::json!({"max_failure_ratio": -1})
        )
        .is_err());
        assert!(serde_json::from_value::<UpdateConfig>(serde_json::json!({"order": "x"})).is_err());
    }

    #[test]
    fn ratio_and_batches() {
        let r = FailureRatio(200);
        assert!(!r.exceeded_by(0, 0));
        assert!(!r.exceeded_by(1, 5));
        assert!(r.exceeded_by(2, 5));
        assert!(FailureRatio(0).exceeded_by(1, 10));
        assert!(!FailureRatio(1000).exceeded_by(10, 10));
        let c = UpdateConfig::default();
        assert_eq!(c.batch_size(10), 1);
        let all = UpdateConfig {
            parallelism: 0,
            ..c
        };
        assert_eq!(all.batch_size(10), 10);
        assert_eq!(all.batch_size(0), 0);
    }
}

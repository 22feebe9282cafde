//! Autoscaling: the `autoscale:` block of a replicated service and the pure policy that turns
//! usage samples into a replica count.
//!
//! Semantics (as Kubernetes' HorizontalPodAutoscaler, built in):
//! - `cpu_percent` / `memory_percent` are targets for each task's average usage, as a share of
//!   the task's **reservation** when the spec sets one, else of its **limit**; a target with
//!   neither is refused at validation. Usage may exceed 100 % of a reservation.
//! - Each evaluation averages every running task's samples over `window`, and for each target
//!   recommends `ceil(replicas × average / target)` (tasks without samples yet count as using
//!   nothing when scaling up and as exactly on target when scaling down, so a starting task never
//!   causes a second scale-up nor a premature scale-down); within 10 % of the target nothing
//!   changes. Several targets: the highest recommendation wins.
//! - Stabilisation: a scale-up goes only as far as the lowest recommendation of the last
//!   `scale_up_delay`, a scale-down only as far as the highest of the last `scale_down_delay`,
//!   so a load that comes and goes keeps the replicas it needed at its peak until it has been
//!   gone for the whole delay: the replicas never flap.
//! - Rate: a scale-up at most doubles the replicas (or adds 4, whichever is more) per 15 s.
//! - The result is clamped to `min..=max`; a replica count outside the bounds (the bounds
//!   changed) is brought inside at once.
//!
//! The policy's memory (past recommendations and scale events) is plain data in [`Policy`]; the
//! controller keeps one per service on the leader, and a new one (a new leader) starts with the
//! current replicas as its only recommendation, so it never scales down before a whole
//! `scale_down_delay` of samples.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::spec::{Resources, ServiceMode, ServiceSpec};
use crate::ValidationError;

/// Within this many percent of the target, the replicas stay (HPA's default tolerance).
pub const TOLERANCE_PERCENT: u64 = 10;
/// The period over which scale-ups are rate-limited.
pub const RATE_PERIOD_MS: u64 = 15_000;
/// A scale-up adds at most `max(replicas, RATE_MIN_STEP)` per rate period.
pub const RATE_MIN_STEP: u64 = 4;
/// Decisions a service keeps for `rctl describe`.
pub const KEPT_DECISIONS: usize = 10;
/// The highest `max` (as `replicas`).
pub const MAX_REPLICAS: u64 = 10_000;

/// `autoscale:` on a replicated service: the replica count follows the tasks' usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    /// Fewest replicas, at least 1.
    pub min: u64,
    /// Most replicas, at least `min`.
    pub max: u64,
    /// Target average cpu usage per task, percent of its cpu reservation (else its limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<u64>,
    /// Target average memory usage per task, percent of its memory reservation (else limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_percent: Option<u64>,
    /// The averaging window over each task's samples (default 30 s).
    #[serde(default = "default_window", with = "crate::duration")]
    pub window: u64,
    /// Scale-up stabilisation: how long a higher recommendation must hold (default 15 s).
    #[serde(default = "default_up", with = "crate::duration")]
    pub scale_up_delay: u64,
    /// Scale-down stabilisation: how long a lower recommendation must hold (default 2 min).
    #[serde(default = "default_down", with = "crate::duration")]
    pub scale_down_delay: u64,
}

fn default_window() -> u64 {
    30_000
}
fn default_up() -> u64 {
    15_000
}
fn default_down() -> u64 {
    120_000
}

/// What a target measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Millicpus.
    Cpu,
    /// Bytes.
    Memory,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::Memory => "memory",
        }
    }
}

/// One target with what its percentage is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// What is measured.
    pub metric: Metric,
    /// Target percent of `basis`.
    pub percent: u64,
    /// The task's reservation (or limit) of the metric: millicpus or bytes.
    pub basis: u64,
    /// `"reservation"` or `"limit"`.
    pub basis_name: &'static str,
}

impl Autoscale {
    /// Checks the bounds and targets against the service (mode, resources); errors name the
    /// field under `autoscale.`.
    pub fn validate(&self, spec: &ServiceSpec) -> Result<(), ValidationError> {
        if spec.mode != ServiceMode::Replicated {
            return Err(ValidationError::new(
                "autoscale",
                "only a replicated service scales (a global service runs one task per node)",
            ));
        }
        if self.min < 1 {
            return Err(ValidationError::new("autoscale.min", "at least 1"));
        }
        if self.max < self.min {
            return Err(ValidationError::new(
                "autoscale.max",
                format!("at least min ({})", self.min),
            ));
        }
        if self.max > MAX_REPLICAS {
            return Err(ValidationError::new(
                "autoscale.max",
                format!("at most {MAX_REPLICAS}"),
            ));
        }
        if self.cpu_percent.is_none() && self.memory_percent.is_none() {
            return Err(ValidationError::new(
                "autoscale",
                "set a target: cpu_percent, memory_percent or both",
            ));
        }
        for (field, p) in [
            ("cpu_percent", self.cpu_percent),
            ("memory_percent", self.memory_percent),
        ] {
            if let Some(p) = p {
                if !(1..=100).contains(&p) {
                    return Err(ValidationError::new(
                        format!("autoscale.{field}"),
                        "a percentage from 1 to 100",
                    ));
                }
            }
        }
        if self.cpu_percent.is_some() && basis(&spec.resources, Metric::Cpu).is_none() {
            return Err(ValidationError::new(
                "autoscale.cpu_percent",
                "is a share of each task's cpu reservation (or limit): set \
                 resources.reservations.cpus or resources.limits.cpus",
            ));
        }
        if self.memory_percent.is_some() && basis(&spec.resources, Metric::Memory).is_none() {
            return Err(ValidationError::new(
                "autoscale.memory_percent",
                "is a share of each task's memory reservation (or limit): set \
                 resources.reservations.memory or resources.limits.memory",
            ));
        }
        if !(1_000..=600_000).contains(&self.window) {
            return Err(ValidationError::new("autoscale.window", "from 1s to 10m"));
        }
        if self.scale_up_delay > 600_000 {
            return Err(ValidationError::new(
                "autoscale.scale_up_delay",
                "at most 10m",
            ));
        }
        if self.scale_down_delay > 3_600_000 {
            return Err(ValidationError::new(
                "autoscale.scale_down_delay",
                "at most 1h",
            ));
        }
        Ok(())
    }

    /// The targets set, each with its basis (validation guarantees one exists).
    pub fn targets(&self, res: &Resources) -> Vec<Target> {
        [
            (Metric::Cpu, self.cpu_percent),
            (Metric::Memory, self.memory_percent),
        ]
        .into_iter()
        .filter_map(|(metric, p)| {
            let (basis, basis_name) = basis(res, metric)?;
            Some(Target {
                metric,
                percent: p?,
                basis,
                basis_name,
            })
        })
        .collect()
    }

    /// `n` brought inside `min..=max`.
    pub fn clamp(&self, n: u64) -> u64 {
        n.clamp(self.min, self.max.max(self.min))
    }
}

/// The reservation of `metric`, else its limit, with its name; `None` when neither is set.
fn basis(res: &Resources, metric: Metric) -> Option<(u64, &'static str)> {
    let (r, l) = match metric {
        Metric::Cpu => (res.reservations.cpus, res.limits.cpus),
        Metric::Memory => (res.reservations.memory, res.limits.memory),
    };
    if r > 0 {
        Some((r, "reservation"))
    } else if l > 0 {
        Some((l, "limit"))
    } else {
        None
    }
}

/// An autoscaled service's replicas are the autoscaler's: a re-applied spec keeps the current
/// count (brought inside the new bounds), a new one starts at its `replicas` inside them. Called
/// wherever a spec is put, so `rctl apply` and the store agree on what changes.
pub fn keep_replicas(current: Option<&ServiceSpec>, spec: &mut ServiceSpec) {
    if let Some(a) = &spec.autoscale {
        let n = current.map_or(spec.replicas, |c| c.replicas);
        spec.replicas = a.clamp(n);
    }
}

/// Applies the autoscaler's `decision` to `svc` at raft `index` (`Command::Autoscale`): only
/// while the service autoscales and still has `decision.from` replicas; the count is kept
/// inside the bounds in force.
pub(crate) fn apply(svc: &mut crate::Service, index: u64, decision: Decision) {
    let Some(a) = &svc.spec.autoscale else {
        return;
    };
    if svc.spec.replicas != decision.from {
        return;
    }
    let to = a.clamp(decision.to);
    if to == svc.spec.replicas {
        return;
    }
    svc.spec.replicas = to;
    svc.updated_at = decision.at;
    svc.version = index;
    svc.autoscale_decisions.push(Decision { to, ..decision });
    let extra = svc.autoscale_decisions.len().saturating_sub(KEPT_DECISIONS);
    svc.autoscale_decisions.drain(..extra);
}

/// One usage sample of one task, as the controller received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// When it was received (ms since the epoch, the controller's clock).
    pub at: u64,
    /// CPU used since the previous sample, in millicpus (1000 = one cpu busy).
    pub cpu_millis: u64,
    /// Memory in use (working set: without the inactive page cache), bytes.
    pub memory_bytes: u64,
}

/// A running task and its recent samples (oldest first; may be empty for a task just started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSamples {
    /// The task's id.
    pub task: String,
    /// Its samples, oldest first.
    pub samples: Vec<Sample>,
}

/// A change of the replica count and why, as `rctl describe` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// When (ms since the epoch, stamped by the leader).
    pub at: u64,
    /// Replicas before.
    pub from: u64,
    /// Replicas after.
    pub to: u64,
    /// Why, e.g. "cpu 180% of reservation over 30s, target 50%".
    pub reason: String,
}

impl Decision {
    /// `scaled 1→3: cpu 180% of reservation over 30s, target 50%`.
    pub fn describe(&self) -> String {
        format!("scaled {}→{}: {}", self.from, self.to, self.reason)
    }
}

/// What one target says about the service now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reading {
    target: Target,
    /// The tasks' average usage, percent of the basis.
    percent: u64,
    /// Replicas this target asks for (before stabilisation, rate and bounds).
    replicas: u64,
}

/// The policy's memory for one service: recent recommendations and scale-ups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// When this policy first evaluated (its history starts there).
    since: Option<u64>,
    /// When it last changed the replicas: older samples measured another number of tasks.
    last_change: Option<u64>,
    /// `(at, replicas)` recommended, oldest first, kept as long as the longer delay.
    recommendations: VecDeque<(u64, u64)>,
    /// `(at, added)` of recent scale-ups, for the rate limit.
    ups: VecDeque<(u64, u64)>,
}

impl Policy {
    /// Evaluates the service at `now`: `Some` decision when the replica count should change.
    /// `replicas` is the service's current count; `tasks` its running tasks with their samples.
    pub fn evaluate(
        &mut self,
        spec: &Autoscale,
        resources: &Resources,
        replicas: u64,
        tasks: &[TaskSamples],
        now: u64,
    ) -> Option<Decision> {
        let keep = spec.scale_up_delay.max(spec.scale_down_delay);
        let since = *self.since.get_or_insert(now);
        while self
            .recommendations
            .front()
            .is_some_and(|(at, _)| at.saturating_add(keep) < now)
        {
            self.recommendations.pop_front();
        }
        while self
            .ups
            .front()
            .is_some_and(|(at, _)| at.saturating_add(RATE_PERIOD_MS) <= now)
        {
            self.ups.pop_front();
        }
        if replicas < spec.min || replicas > spec.max {
            let to = spec.clamp(replicas);
            self.recommendations.push_back((now, to));
            let why = if replicas < spec.min {
                format!("below min {}", spec.min)
            } else {
                format!("above max {}", spec.max)
            };
            return self.decided(now, replicas, to, why);
        }
        // Samples from before the last change, or from before the newest task's first one,
        // measured another set of tasks (a task that carried the load alone would count it
        // again once its peers share it): the window starts after both.
        let newest = tasks
            .iter()
            .filter_map(|t| t.samples.first().map(|s| s.at))
            .max()
            .unwrap_or(0);
        let from = now
            .saturating_sub(spec.window)
            .max(self.last_change.map_or(0, |c| c + 1))
            .max(newest);
        let readings: Vec<Reading> = spec
            .targets(resources)
            .into_iter()
            .filter_map(|t| read(t, replicas, tasks, from, now))
            .collect();
        // No samples at all: no opinion (as HPA when metrics are missing).
        let lead = readings.iter().max_by_key(|r| r.replicas)?.clone();
        let recommended = lead.replicas;
        self.recommendations.push_back((now, recommended));
        let within = |delay: u64| {
            self.recommendations
                .iter()
                .filter(move |(at, _)| at.saturating_add(delay) >= now)
                .map(|(_, n)| *n)
        };
        let mut up_bound = within(spec.scale_up_delay).min().unwrap_or(recommended);
        let mut down_bound = within(spec.scale_down_delay).max().unwrap_or(recommended);
        // A fresh policy (new service, new leader) has no history yet: until it has a whole
        // delay of its own, the current count stands for what it did not see.
        if now < since.saturating_add(spec.scale_up_delay) {
            up_bound = up_bound.min(replicas);
        }
        if now < since.saturating_add(spec.scale_down_delay) {
            down_bound = down_bound.max(replicas);
        }
        let mut to = replicas;
        let mut notes = Vec::new();
        if to < up_bound {
            to = up_bound;
            if up_bound < recommended {
                notes.push(format!(
                    "{} asked, lowest of the last {}",
                    recommended,
                    crate::duration::format(spec.scale_up_delay)
                ));
            }
        }
        if to > down_bound {
            to = down_bound;
            if down_bound > recommended {
                notes.push(format!(
                    "{} asked, highest of the last {}",
                    recommended,
                    crate::duration::format(spec.scale_down_delay)
                ));
            }
        }
        // Bounds first, so the rate limit is named only when it is what holds the count back
        // (the current count is inside them, so the order changes nothing else).
        let bounded = spec.clamp(to);
        if bounded != to {
            notes.push(if bounded < to {
                format!("max {}", spec.max)
            } else {
                format!("min {}", spec.min)
            });
            to = bounded;
        }
        if to > replicas {
            let added: u64 = self.ups.iter().map(|(_, n)| n).sum();
            // The count at the start of the period may grow by itself (or by 4).
            let base = replicas.saturating_sub(added);
            let cap = (base + base.max(RATE_MIN_STEP)).max(replicas);
            if to > cap {
                to = cap;
                notes.push(format!(
                    "at most +{} per {}",
                    base.max(RATE_MIN_STEP),
                    crate::duration::format(RATE_PERIOD_MS)
                ));
            }
        }
        if to > replicas {
            self.ups.push_back((now, to - replicas));
        }
        let mut reason = format!(
            "{} {}% of {} over {}, target {}%",
            lead.target.metric.name(),
            lead.percent,
            lead.target.basis_name,
            crate::duration::format(spec.window),
            lead.target.percent
        );
        if !notes.is_empty() {
            reason.push_str(&format!(" ({})", notes.join("; ")));
        }
        self.decided(now, replicas, to, reason)
    }

    /// The decision to go `from` → `to` at `now`, if that is a change (remembered).
    fn decided(&mut self, now: u64, from: u64, to: u64, reason: String) -> Option<Decision> {
        if to == from {
            return None;
        }
        self.last_change = Some(now);
        Some(Decision {
            at: now,
            from,
            to,
            reason,
        })
    }
}

/// One target's reading: the tasks' average usage over `since..=now` and the replicas it asks
/// for, HPA's way: `None` when no task has a sample then.
fn read(t: Target, replicas: u64, tasks: &[TaskSamples], since: u64, now: u64) -> Option<Reading> {
    let averages: Vec<u128> = tasks
        .iter()
        .filter_map(|ts| {
            let vals: Vec<u128> = ts
                .samples
                .iter()
                .filter(|s| s.at >= since && s.at <= now)
                .map(|s| {
                    u128::from(match t.metric {
                        Metric::Cpu => s.cpu_millis,
                        Metric::Memory => s.memory_bytes,
                    })
                })
                .collect();
            (!vals.is_empty()).then(|| vals.iter().sum::<u128>() / vals.len() as u128)
        })
        .collect();
    if averages.is_empty() {
        return None;
    }
    let ready = averages.len() as u128;
    let usage: u128 = averages.iter().sum();
    // In units of basis × percent, so every comparison stays in integers.
    let target = u128::from(t.basis) * u128::from(t.percent);
    let used = usage * 100;
    let percent = (used / (ready * u128::from(t.basis))) as u64;
    let within = |used: u128, n: u128| {
        used * 100 >= n * target * u128::from(100 - TOLERANCE_PERCENT)
            && used * 100 <= n * target * u128::from(100 + TOLERANCE_PERCENT)
    };
    let current = u128::from(replicas);
    if within(used, ready) {
        return Some(Reading {
            target: t,
            percent,
            replicas,
        });
    }
    let up = used > ready * target;
    // Tasks without samples (starting): none when scaling up, on target when scaling down.
    let missing = current.saturating_sub(ready);
    let (used, n) = if up {
        (used, ready + missing)
    } else {
        (used + missing * target, ready + missing)
    };
    let still = if up {
        used > n * target
    } else {
        used < n * target
    };
    let asked = if within(used, n) || !still {
        replicas
    } else {
        u64::try_from(used.div_ceil(target)).unwrap_or(u64::MAX)
    };
    Some(Reading {
        target: t,
        percent,
        replicas: asked,
    })
}

#[cfg(test)]
mod tests;

//! Jobs (Swarm 20.10's `replicated-job` and `global-job`, Kubernetes' Job): services whose tasks
//! run to completion instead of running for ever. The reconciler hands job services to
//! `reconcile` here, which returns the same `Plan` as for services; `progress` tells `rctl ps`
//! and `rctl describe` where the job stands.
//!
//! A replicated job has `completions` slots (1..=completions) and runs at most `parallelism` of
//! them at a time, lowest slot first, until every slot has a task that exited 0. A global job has
//! one slot per eligible node (ready, active, passing the constraints; keyed by the task's
//! `target_node`, as a global service), nodes joining later included; a paused node keeps what it
//! runs and gets nothing new.
//!
//! Within a slot: a task that exited 0 (`complete`) finishes the slot for good, it is never
//! restarted. A task that ended otherwise is replaced as the restart policy says (`delay` with
//! backoff, `max_attempts` within `window`); for a job, `any` means `on-failure`, since a
//! completed task is never restarted (Swarm does the same). A slot waiting for its retry keeps its
//! share of `parallelism`, so retries come before new slots and at most `parallelism` containers
//! ever run. A slot whose policy gives up (condition `none`, or `max_attempts` used) fails the
//! job: no task is created any more, and the tasks still running run to their end. A task moved
//! off a drained node (or one that no longer matches the constraints) is stopped and its slot
//! gets a new task once it has ended, which is not an attempt.
//!
//! Iterations: a job's iteration is its service's `spec_version`, which the store moves on every
//! change to a job's spec (not only task-affecting ones); re-applying an unchanged spec changes
//! nothing. Only tasks of the current iteration count. A new iteration has no rolling update:
//! the old iteration's tasks are stopped (and forgotten once ended), and a slot's new task starts
//! once the old one of that slot has been observed ended (as stop-first does, see
//! `crate::reconcile`).
//!
//! Invariants: pure (time comes in as an argument); a task that exited 0 in the current
//! iteration is never stopped, restarted or forgotten; per slot at most one task of the current
//! iteration is meant to run; a replicated job never has more than `parallelism` slots running
//! or waiting for a retry.

use std::collections::{BTreeMap, BTreeSet};

use crate::reconcile::{
    eligible, forget_old, may_stay, newest_first, restart_delay, still_stopping, stop_all, Key,
    Pass, Plan,
};
use crate::spec::{ServiceMode, ServiceSpec};
use crate::store::{Map, Node, NodeState, Service, Task};
use crate::task::TaskState;
use crate::ValidationError;

/// Upper bound of `completions` and `parallelism`, as of `replicas`: a replicated job keeps one
/// completed task per slot.
pub const MAX_COMPLETIONS: u64 = 10_000;

/// Tasks run at a time, at most: `parallelism`, 1 when unset (Swarm's `max_concurrent`).
pub fn parallelism(spec: &ServiceSpec) -> u64 {
    spec.parallelism.unwrap_or(1)
}

/// Tasks that must exit 0: `completions`, `parallelism` when unset (Swarm's `total_completions`
/// defaults to `max_concurrent`).
pub fn completions(spec: &ServiceSpec) -> u64 {
    spec.completions.unwrap_or_else(|| parallelism(spec))
}

/// The job fields' checks, named by field.
pub fn validate(spec: &ServiceSpec) -> Result<(), ValidationError> {
    let check = |field: &str, v: Option<u64>| match v {
        Some(0) => Err(ValidationError::new(field, "must be at least 1")),
        Some(n) if n > MAX_COMPLETIONS => Err(ValidationError::new(
            field,
            format!("at most {MAX_COMPLETIONS}"),
        )),
        _ => Ok(()),
    };
    match spec.mode {
        ServiceMode::ReplicatedJob => {
            check("completions", spec.completions)?;
            check("parallelism", spec.parallelism)?;
        }
        ServiceMode::GlobalJob => {
            for (field, v) in [
                ("completions", spec.completions),
                ("parallelism", spec.parallelism),
            ] {
                if v.is_some() {
                    return Err(ValidationError::new(
                        field,
                        "a global-job runs one task per eligible node: only replicated-job \
                         takes completions and parallelism",
                    ));
                }
            }
        }
        ServiceMode::Replicated | ServiceMode::Global => {
            for (field, v) in [
                ("completions", spec.completions),
                ("parallelism", spec.parallelism),
            ] {
                if v.is_some() {
                    return Err(ValidationError::new(
                        field,
                        "only with mode: replicated-job (a service's rollout parallelism is \
                         update_config.parallelism)",
                    ));
                }
            }
        }
    }
    if spec.auto_remove && !spec.mode.is_job() {
        return Err(ValidationError::new(
            "auto_remove",
            "only with mode: replicated-job or global-job (a service runs until it is removed)",
        ));
    }
    if spec.mode.is_job() && spec.replicas != 1 {
        return Err(ValidationError::new(
            "replicas",
            "not with jobs: a replicated-job takes completions and parallelism, a global-job \
             runs one task per eligible node",
        ));
    }
    Ok(())
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Tasks are still to run (or, for a global job, a node still has to run one).
    Running,
    /// Every slot has a task that exited 0.
    Complete,
    /// A slot's restart policy gave up: the job creates no task any more.
    Failed,
}

impl JobState {
    /// The lowercase name, as `rctl ps` and `rctl describe` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Complete => "complete",
            JobState::Failed => "failed",
        }
    }
}

/// How long a finished `auto_remove` job is kept: the client that started it (`rctl run
/// --rm`) reads its output and exit code, then removes it at once; the cluster removes it
/// only when that client is gone (killed, disconnected), like Docker's daemon-side
/// `AutoRemove`. Removing it at once would race the client for the job's last output.
pub const AUTO_REMOVE_GRACE_MS: u64 = 10_000;

/// Whether `service` is an `auto_remove` job that finished (complete or failed) at least
/// [`AUTO_REMOVE_GRACE_MS`] ago, by its tasks' last reports.
pub fn auto_remove_due(
    service: &Service,
    tasks: &[&Task],
    nodes: &Map<String, Node>,
    now: u64,
) -> bool {
    if !service.spec.auto_remove {
        return false;
    }
    let finished = progress(service, tasks, nodes).is_some_and(|p| p.state != JobState::Running);
    let last = tasks.iter().map(|t| t.status.timestamp).max().unwrap_or(0);
    finished && now.saturating_sub(last) >= AUTO_REMOVE_GRACE_MS
}

/// The current iteration's progress, as `rctl ps` and `rctl describe` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Slots whose task exited 0.
    pub completed: u64,
    /// Slots to complete: `completions`, or a global job's eligible nodes (and nodes that
    /// completed).
    pub total: u64,
    /// Tasks meant to run that have not ended (pending ones included).
    pub running: u64,
    /// Runs that ended by themselves other than with exit 0 (failed, rejected), as far as the
    /// bounded history keeps them.
    pub failed: u64,
    /// Running, complete or failed.
    pub state: JobState,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}/{} completed, {} running, {} failed",
            self.state.as_str(),
            self.completed,
            self.total,
            self.running,
            self.failed
        )
    }
}

/// Where one slot (or node) of the current iteration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// A task exited 0.
    Done,
    /// A task is meant to run (pending, starting, running, or being moved).
    Active,
    /// The last task ended otherwise; a retry is due now (`due`) or after the policy's delay.
    Retry { due: bool },
    /// The restart policy gave up: the job has failed.
    GaveUp,
    /// No task yet.
    Unstarted,
    /// Nothing wanted (a paused node, or a node gone with no completed task).
    Idle,
}

impl SlotState {
    /// Counts against `parallelism`.
    fn busy(self) -> bool {
        matches!(self, SlotState::Active | SlotState::Retry { .. })
    }

    /// Counts in a global job's total.
    fn wanted(self) -> bool {
        self != SlotState::Idle
    }
}

/// One slot (or node): its key, state, and its tasks of every iteration (newest first).
struct Slot<'a> {
    key: Key<'a>,
    state: SlotState,
    /// Tasks of the current iteration, newest first.
    current: Vec<&'a Task>,
    /// Every task of the slot (older iterations too), for the wait on stopping ones.
    all: Vec<&'a Task>,
}

/// Whether a task is meant to run and has not ended.
fn live(t: &Task) -> bool {
    t.desired_state <= TaskState::Running && !t.status.state.is_terminal()
}

/// Judges one slot of the current iteration (`current`, newest first) and stops what must stop:
/// duplicates, and (`must_move`) a task on a node it may no longer stay on.
fn judge(
    plan: &mut Plan,
    service: &Service,
    current: &[&Task],
    wants_new: bool,
    now: u64,
    must_move: impl Fn(&Task) -> bool,
) -> SlotState {
    if let Some(done) = current
        .iter()
        .find(|t| t.status.state == TaskState::Complete)
    {
        plan.shutdown.extend(
            current
                .iter()
                .filter(|t| t.id != done.id && live(t))
                .map(|t| t.id.clone()),
        );
        return SlotState::Done;
    }
    let mut running = current.iter().filter(|t| live(t));
    if let Some(keep) = running.next() {
        plan.shutdown.extend(running.map(|t| t.id.clone()));
        if must_move(keep) {
            plan.shutdown.push(keep.id.clone());
        }
        return SlotState::Active;
    }
    let Some(last) = current.first() else {
        return if wants_new {
            SlotState::Unstarted
        } else {
            SlotState::Idle
        };
    };
    if !wants_new {
        return SlotState::Idle;
    }
    let stopped_on_request = last.status.state == TaskState::Shutdown
        || (!last.status.state.is_terminal() && last.desired_state > TaskState::Running);
    if stopped_on_request {
        // Stopped (or being stopped) because the controller asked, moved off its node: not an
        // attempt. Its successor waits until it has ended (`reconcile`).
        return SlotState::Retry { due: true };
    }
    match restart_delay(service, last, current) {
        None => SlotState::GaveUp,
        Some(d) => SlotState::Retry {
            due: now >= last.status.timestamp.saturating_add(d),
        },
    }
}

/// Splits `tasks` into the slots of the current iteration, stopping and forgetting what belongs
/// to no slot or to an older iteration. `plan` collects the stops; the states say what to create.
fn survey<'a>(
    plan: &mut Plan,
    service: &Service,
    tasks: &[&'a Task],
    nodes: &'a Map<String, Node>,
    now: u64,
) -> Vec<Slot<'a>> {
    let iteration = service.spec_version;
    let global = service.spec.mode.is_global();
    let mut by_key: BTreeMap<Key<'a>, Vec<&'a Task>> = BTreeMap::new();
    let mut strays = Vec::new();
    for &t in tasks {
        match (global, t.target_node.as_deref()) {
            (true, Some(n)) => by_key.entry(Key::Node(n)).or_default().push(t),
            (false, None) if t.slot >= 1 => by_key.entry(Key::Slot(t.slot)).or_default().push(t),
            // Left from an incarnation of another mode.
            _ => strays.push(t),
        }
    }
    stop_all(plan, &strays);
    let wanted_nodes: BTreeSet<&str> = if global {
        nodes
            .values()
            .filter(|n| eligible(service, n))
            .map(|n| n.id.as_str())
            .collect()
    } else {
        BTreeSet::new()
    };
    let total = completions(&service.spec);
    if global {
        for n in &wanted_nodes {
            by_key.entry(Key::Node(n)).or_default();
        }
    } else {
        for slot in 1..=total {
            by_key.entry(Key::Slot(slot)).or_default();
        }
    }
    let mut slots = Vec::new();
    for (key, mut all) in by_key {
        newest_first(&mut all);
        let (current, old): (Vec<&Task>, Vec<&Task>) =
            all.iter().partition(|t| t.spec_version == iteration);
        // A new iteration replaces the old one's tasks.
        stop_all(plan, &old);
        let state = match key {
            Key::Slot(slot) if slot > total => {
                stop_all(plan, &current);
                continue;
            }
            Key::Slot(_) => judge(plan, service, &current, true, now, |t| {
                t.node_id
                    .as_deref()
                    .is_some_and(|n| !may_stay(service, nodes.get(n)))
            }),
            Key::Node(id) => {
                let node = nodes.get(id);
                let stays =
                    may_stay(service, node) && node.is_some_and(|n| n.state == NodeState::Ready);
                if stays {
                    judge(
                        plan,
                        service,
                        &current,
                        wanted_nodes.contains(id),
                        now,
                        |_| false,
                    )
                } else if node.is_none() {
                    // Gone from the cluster: stop what runs, forget what has finished.
                    stop_all(plan, &current);
                    continue;
                } else {
                    // Down, drained or no longer matching: stop what runs. A completed task
                    // still counts while its node exists.
                    plan.shutdown
                        .extend(current.iter().filter(|t| live(t)).map(|t| t.id.clone()));
                    if current
                        .iter()
                        .any(|t| t.status.state == TaskState::Complete)
                    {
                        SlotState::Done
                    } else {
                        SlotState::Idle
                    }
                }
            }
        };
        forget_old(plan, service, &current);
        slots.push(Slot {
            key,
            state,
            current,
            all,
        });
    }
    slots
}

/// Plans one job service: what to stop, forget and create. `tasks` are all its tasks.
pub(crate) fn reconcile(
    service: &Service,
    tasks: &[&Task],
    nodes: &Map<String, Node>,
    now: u64,
) -> Plan {
    let mut plan = Plan::default();
    let slots = survey(&mut plan, service, tasks, nodes, now);
    if slots.iter().any(|s| s.state == SlotState::GaveUp) {
        // Failed: nothing new; what runs runs to its end.
        return plan;
    }
    let pass = Pass { nodes, now };
    // Whether a task the slot stops (before this pass or in it) may still run: its successor
    // waits, so a slot never runs two containers at once.
    let blocked = |plan: &Plan, s: &Slot| {
        s.all.iter().any(|t| {
            let asked = t.desired_state > TaskState::Running || plan.shutdown.contains(&t.id);
            asked && still_stopping(t, &pass)
        })
    };
    let mut budget = if service.spec.mode.is_global() {
        u64::MAX
    } else {
        let busy = slots.iter().filter(|s| s.state.busy()).count() as u64;
        parallelism(&service.spec).saturating_sub(busy)
    };
    let mut create = Vec::new();
    for s in &slots {
        let start = match s.state {
            SlotState::Retry { due } => due,
            SlotState::Unstarted if budget > 0 => {
                // A slot waiting for an old task to stop still takes its share.
                budget -= 1;
                true
            }
            _ => false,
        };
        if start && !blocked(&plan, s) {
            create.push(s);
        }
    }
    for s in create {
        // The failed task is dealt with: mark it, so its slot's history can be bounded.
        if let Some(last) = s.current.first() {
            if last.desired_state <= TaskState::Running {
                plan.shutdown.push(last.id.clone());
            }
        }
        plan.create_at(s.key);
    }
    plan
}

/// The current iteration's progress, `None` for services that are not jobs.
pub fn progress(service: &Service, tasks: &[&Task], nodes: &Map<String, Node>) -> Option<Progress> {
    if !service.spec.mode.is_job() {
        return None;
    }
    // The states do not depend on time but for whether a retry is due, which is not shown.
    let slots = survey(&mut Plan::default(), service, tasks, nodes, 0);
    let count = |f: &dyn Fn(SlotState) -> bool| slots.iter().filter(|s| f(s.state)).count() as u64;
    let completed = count(&|s| s == SlotState::Done);
    let total = if service.spec.mode.is_global() {
        count(&|s| s.wanted())
    } else {
        completions(&service.spec)
    };
    let current = || slots.iter().flat_map(|s| s.current.iter());
    let running = current().filter(|t| live(t)).count() as u64;
    let failed = current()
        .filter(|t| matches!(t.status.state, TaskState::Failed | TaskState::Rejected))
        .count() as u64;
    let state = if slots.iter().any(|s| s.state == SlotState::GaveUp) {
        JobState::Failed
    } else if completed >= total {
        JobState::Complete
    } else {
        JobState::Running
    };
    Some(Progress {
        completed,
        total,
        running,
        failed,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests_support::spec;

    #[test]
    fn validation_names_the_field() {
        let job = |mode, completions, parallelism, replicas| {
            let mut s = spec("batch", replicas);
            s.mode = mode;
            s.completions = completions;
            s.parallelism = parallelism;
            s
        };
        use ServiceMode::*;
        let cases = [
            (job(ReplicatedJob, Some(0), None, 1), Some("completions")),
            (job(ReplicatedJob, None, Some(0), 1), Some("parallelism")),
            (
                job(ReplicatedJob, Some(10_001), None, 1),
                Some("completions"),
            ),
            (job(ReplicatedJob, None, None, 3), Some("replicas")),
            (job(GlobalJob, None, None, 2), Some("replicas")),
            (job(GlobalJob, Some(2), None, 1), Some("completions")),
            (job(GlobalJob, None, Some(2), 1), Some("parallelism")),
            (job(Replicated, None, Some(2), 3), Some("parallelism")),
            (job(Global, Some(2), None, 1), Some("completions")),
            (job(ReplicatedJob, Some(5), Some(2), 1), None),
            (job(ReplicatedJob, None, None, 1), None),
            (job(GlobalJob, None, None, 1), None),
        ];
        for (s, want) in cases {
            let got = s.validate().err().map(|e| e.field);
            assert_eq!(got.as_deref(), want, "{:?} {:?}", s.mode, s);
        }
        let e = job(ReplicatedJob, Some(0), None, 1).validate().unwrap_err();
        assert_eq!(e.to_string(), "completions: must be at least 1");
    }

    #[test]
    fn manifest_errors_point_at_the_job_field() {
        for (yaml, field, line) in [
            ("mode: replicated-job\ncompletions: 0\n", "completions", 5),
            ("replicas: 3\nmode: global-job\n", "replicas", 4),
            ("parallelism: 2\n", "parallelism", 4),
        ] {
            let text = format!("kind: Service\nname: b\nimage: x\n{yaml}");
            let e = crate::manifest::parse("f.yaml", &text).unwrap_err();
            assert_eq!((e.field.as_str(), e.line), (field, line), "{e}");
        }
    }

    #[test]
    fn defaults_follow_swarm() {
        let mut s = spec("batch", 1);
        s.mode = ServiceMode::ReplicatedJob;
        assert_eq!((completions(&s), parallelism(&s)), (1, 1));
        s.parallelism = Some(4);
        assert_eq!((completions(&s), parallelism(&s)), (4, 4));
        s.completions = Some(10);
        assert_eq!((completions(&s), parallelism(&s)), (10, 4));
    }

    #[test]
    fn modes_read_from_yaml() {
        let s: ServiceSpec = serde_yaml::from_str(
            "name: b\nimage: x\nmode: replicated-job\ncompletions: 4\nparallelism: 2\n",
        )
        .unwrap();
        assert_eq!(s.mode, ServiceMode::ReplicatedJob);
        assert_eq!((s.completions, s.parallelism), (Some(4), Some(2)));
        s.validate().unwrap();
        let g: ServiceSpec = serde_yaml::from_str("name: b\nimage: x\nmode: global-job\n").unwrap();
        assert!(g.mode.is_job() && g.mode.is_global());
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["mode"], "replicated-job");
        assert_eq!(serde_json::from_value::<ServiceSpec>(json).unwrap(), s);
        // Services are written as before.
        let plain = serde_json::to_value(spec("web", 2)).unwrap();
        assert!(plain.get("completions").is_none() && plain.get("parallelism").is_none());
    }
}

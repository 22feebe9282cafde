//! The reconciler: compares each service's spec with its tasks and returns a plan — which slots
//! need a new task, which tasks must stop, which finished tasks can be forgotten, and where the
//! service's rollout stands. `plan_pass` turns the plans of all services plus the scheduler's
//! decisions into one batch command, the only thing the leader's control loop proposes.
//!
//! Replicated services keep tasks in slots 1..=replicas. Global services keep one task per
//! eligible node (ready, active, passing the constraints), keyed by `Task::target_node`; a node
//! that joins gets a task, a node that leaves, is drained or stops matching loses it, and a
//! paused node keeps what it runs but gets nothing new. A replicated task on a drained node, or on
//! a node that no longer passes the constraints, moves start-first: its replacement is created in
//! the same slot and the old task stops only once the replacement runs, so a drain never drops a
//! service below its replicas where capacity allows (an unplaceable replacement stays pending with
//! the scheduler's reason, and the old task keeps serving). A global task there simply stops: its
//! node is its slot. Tasks of a down node are orphaned (lost already) and replaced at once.
//!
//! Restarts follow the spec's `RestartPolicy`: a finished task's slot gets a new task after
//! `delay`, doubled for each consecutive crash (a run of the current spec shorter than
//! `CRASH_RUN_MS`) up to `max_delay`, until more than `max_attempts` runs (within `window`, when
//! set) have ended by themselves.
//!
//! Rolling updates (Swarm's semantics). A task is *current* when its frozen spec matches the
//! service's (`ServiceSpec::same_task_spec`: replicas and update configs aside); the tasks created
//! since the spec last changed carry the service's `spec_version` and make up the rollout. A slot
//! whose task is outdated but still `running` is replaced in batches of `parallelism` (stop-first:
//! stop, then create; start-first: create, and stop the old task once the new one runs); a batch
//! starts only when no slot is in flight (an old task still stopping, or a current task on its
//! way to `running`) and `delay` has passed since the last new task got there.
//!
//! Stop-first is honest: a slot's next task is created only once every task the slot is stopping
//! has been observed ended by its agent (or, its node lost, once its stop grace has passed; or,
//! its agent silent, grace plus `STOP_REPORT_TIMEOUT_MS`). Until then the stopping task still
//! counts on its node for the scheduler (`Task::holds_resources`: host ports, reservations), so a
//! slot never runs an old and a new container at once. The same holds for restarts, scaling and
//! moves; start-first keeps the old task running (not stopping) until the new one runs. Outdated tasks that serve nothing (not yet running, or
//! finished) are replaced at once, as are empty slots. A new task that ends (other than by a
//! requested shutdown, or its node being lost) before it has run for `monitor` is a failure; once
//! failures exceed `max_failure_ratio` of the tasks updated so far, the failure action applies:
//! pause, continue, or roll back (a `Rollback` command; the spec goes back and the rollout
//! proceeds with `rollback_config`). Healthy tasks of the spec rolled back to are current again,
//! so a rollback never touches them. A rollout completes once no slot is outdated or on its way
//! and the last new task has run for `monitor`.
//!
//! Invariants: pure (time and ids come in as arguments); only a rollback rewrites a user's spec;
//! only `desired_state`, task records and the update status change; per slot (or per node, for
//! global services) at most one task is meant to run, except that a start-first update or a move
//! off a drained node keeps the old task until its replacement runs; a slot gets no new task while
//! one it stops may still run.

use std::collections::{BTreeMap, BTreeSet};

use crate::scheduler::{schedule_pinned, Decision};
use crate::spec::{RestartCondition, ServiceMode, CRASH_RUN_MS};
use crate::store::{Availability, Command, Node, NodeState, Service, Store, Task, TaskStatus};
use crate::task::TaskState;
use crate::update::{FailureAction, UpdateConfig, UpdateOrder, UpdateState, UpdateStatus};

/// Finished tasks kept per slot for `rctl ps` history (the live one included).
pub const HISTORY_PER_SLOT: usize = 5;

/// What one reconcile pass decides for a service.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Slots that need a new task now (replicated services).
    pub create: Vec<u64>,
    /// Nodes that need a new task now (global services).
    pub create_on: Vec<String>,
    /// Tasks whose desired state becomes `shutdown`.
    pub shutdown: Vec<String>,
    /// Finished tasks to forget.
    pub delete: Vec<String>,
    /// The rollout's new status, when it changes (paused, completed).
    pub status: Option<UpdateStatus>,
    /// Roll back to the previous spec, for this reason. The rest of the plan is then empty: it
    /// waits for the spec it would be made from.
    pub rollback: Option<String>,
}

/// A replica slot or, for global services, a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Key<'a> {
    Slot(u64),
    Node(&'a str),
}

impl Plan {
    pub(crate) fn create_at(&mut self, key: Key) {
        match key {
            Key::Slot(s) => self.create.push(s),
            Key::Node(n) => self.create_on.push(n.to_string()),
        }
    }
}

/// Where a wanted slot stands in the rollout after this pass's immediate actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState<'a> {
    /// Current and running, or finished (restarts follow the restart policy), or empty on
    /// purpose (a paused node).
    Settled,
    /// A current task is on its way to `running` (created now, pending, starting...).
    InFlight,
    /// A task the slot stops has not been observed ended yet: the slot's next task waits for it
    /// (see `create_or_wait`). Counts against `parallelism` like `InFlight`.
    Stopping,
    /// An outdated task is serving: the next batch may replace it (and create its successor
    /// unless the slot is a paused node).
    Outdated { task: &'a Task, wants_new: bool },
}

/// Whether a task of `service` may keep running on `node`: the node exists, is not drained and
/// passes the service's constraints. (A down node's tasks are orphaned by the store already.)
pub(crate) fn may_stay(service: &Service, node: Option<&Node>) -> bool {
    node.is_some_and(|n| {
        n.availability != Availability::Drain
            && service
                .spec
                .placement
                .constraints
                .iter()
                .all(|c| c.matches(n))
    })
}

/// Whether `t` (a task of `service`) was made from the spec in force, replicas and update
/// configs aside (`ServiceSpec::same_task_spec`). A task of the service's `spec_version` was:
/// the version changes with every change of the spec that `same_task_spec` tells apart
/// (`PutService`, `Rollback`), and that relation is an equivalence. So only older tasks' specs
/// are compared; comparing every task's whole spec was the pass's main cost at 30,000 tasks.
pub(crate) fn of_current_spec(service: &Service, t: &Task) -> bool {
    t.spec_version == service.spec_version || t.spec.same_task_spec(&service.spec)
}

/// Whether a global service wants a new task on `node`.
pub(crate) fn eligible(service: &Service, node: &Node) -> bool {
    node.state == NodeState::Ready
        && node.availability == Availability::Active
        && may_stay(service, Some(node))
}

/// Plans one service. `tasks` are all tasks of the service; `nodes` the cluster's nodes.
pub fn reconcile<'a>(
    service: &Service,
    tasks: &[&'a Task],
    nodes: &'a crate::store::Map<String, Node>,
    now: u64,
) -> Plan {
    let mut plan = Plan::default();
    let slots = match service.spec.mode {
        ServiceMode::Replicated => reconcile_replicated(&mut plan, service, tasks, nodes, now),
        ServiceMode::Global => reconcile_global(&mut plan, service, tasks, nodes, now),
        // Jobs run to completion and have no rollout: see `crate::job`.
        ServiceMode::ReplicatedJob | ServiceMode::GlobalJob => {
            return crate::job::reconcile(service, tasks, nodes, now)
        }
    };
    roll_out(plan, service, tasks, slots, now)
}

pub(crate) fn newest_first(history: &mut [&Task]) {
    history.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
}

fn reconcile_replicated<'a>(
    plan: &mut Plan,
    service: &Service,
    tasks: &[&'a Task],
    nodes: &'a crate::store::Map<String, Node>,
    now: u64,
) -> Vec<(Key<'a>, SlotState<'a>)> {
    let mut slots: BTreeMap<u64, Vec<&Task>> = BTreeMap::new();
    for t in tasks {
        // Tasks left from a global incarnation of the service have slot 0: scaled away below.
        let slot = if t.target_node.is_some() { 0 } else { t.slot };
        slots.entry(slot).or_default().push(t);
    }
    let replicas = service.spec.replicas;
    let pass = Pass { nodes, now };
    for slot in 1..=replicas {
        slots.entry(slot).or_default();
    }
    let mut states = Vec::new();
    for (slot, mut history) in slots {
        newest_first(&mut history);
        if slot == 0 || slot > replicas {
            // Scaled away: stop what runs, forget what has finished.
            stop_all(plan, &history);
            continue;
        }
        let key = Key::Slot(slot);
        let state = plan_slot(plan, service, key, &history, true, &pass, |t| {
            // Placed on a node that was drained or no longer matches: move it.
            t.node_id
                .as_ref()
                .is_some_and(|n| !may_stay(service, nodes.get(n)))
        });
        states.push((key, state));
        forget_old(plan, service, &history);
    }
    states
}

/// Stops every live task of a slot that is going away and forgets its finished ones.
pub(crate) fn stop_all(plan: &mut Plan, history: &[&Task]) {
    for t in history {
        if t.desired_state <= TaskState::Running {
            plan.shutdown.push(t.id.clone());
        } else if finished(t) {
            plan.delete.push(t.id.clone());
        }
    }
}

/// What a pass knows besides a service and its tasks.
pub(crate) struct Pass<'a> {
    pub(crate) nodes: &'a crate::store::Map<String, Node>,
    pub(crate) now: u64,
}

/// How long past its stop grace a stopping task on a node that is still up may go unreported
/// before its slot's next task stops waiting for it (Swarm's old-task timeout is a minute). Its
/// resources stay counted on its node until it is reported ended, so the next task goes
/// elsewhere if that node has no room.
pub const STOP_REPORT_TIMEOUT_MS: u64 = 60_000;

/// Whether `t`, asked to stop, may still be running and hold its node's resources: it is placed
/// and not observed ended, and its stop grace (counted from the request; from `now` for a request
/// made in this pass) has not passed on a lost node, or grace plus `STOP_REPORT_TIMEOUT_MS` on a
/// node that is still up. A node declared down orphans its tasks, which ends them.
pub(crate) fn still_stopping(t: &Task, pass: &Pass) -> bool {
    let Some(node) = t.node_id.as_deref() else {
        return false;
    };
    if t.status.state.is_terminal() {
        return false;
    }
    let asked = t.stop_requested_at.unwrap_or(pass.now);
    let grace = t.spec.stop_grace_period.saturating_mul(1000);
    let node_up = pass
        .nodes
        .get(node)
        .is_some_and(|n| n.state == NodeState::Ready);
    let wait = if node_up {
        grace.saturating_add(STOP_REPORT_TIMEOUT_MS)
    } else {
        grace
    };
    pass.now < asked.saturating_add(wait)
}

/// Stop-first, honestly: the slot's next task is created only once every task the slot is
/// stopping (asked before this pass, or in `plan.shutdown[mark..]` by it) has been observed
/// ended, so a slot never runs an old and a new container at once and the scheduler sees the
/// old one's ports and reservations as used until then. A task kept running (start-first) is
/// not stopping and holds nothing up.
fn create_or_wait<'a>(
    plan: &mut Plan,
    key: Key,
    history: &[&Task],
    mark: usize,
    pass: &Pass,
) -> SlotState<'a> {
    let stopping = history.iter().any(|t| {
        let asked = t.desired_state > TaskState::Running || plan.shutdown[mark..].contains(&t.id);
        asked && still_stopping(t, pass)
    });
    if stopping {
        return SlotState::Stopping;
    }
    plan.create_at(key);
    SlotState::InFlight
}

/// Plans one wanted slot (or node): everything that does not wait for a rollout batch. `history`
/// is newest first; `wants_new` is false for a paused global node (keeps, never gets, a task);
/// `must_move` says whether a live task has to leave its node. A new task for the slot waits
/// until the tasks it stops have ended (`create_or_wait`).
fn plan_slot<'a>(
    plan: &mut Plan,
    service: &Service,
    key: Key,
    history: &[&'a Task],
    wants_new: bool,
    pass: &Pass,
    must_move: impl Fn(&Task) -> bool,
) -> SlotState<'a> {
    let now = pass.now;
    let mark = plan.shutdown.len();
    let (current, outdated): (Vec<&Task>, Vec<&Task>) = history
        .iter()
        .filter(|t| t.desired_state <= TaskState::Running)
        // (A slot being rebalanced counts its older tasks as outdated: the rollout moves them.)
        .partition(|t| of_current_spec(service, t) && !crate::rebalance::moves(service, t));
    let serving = |t: &&Task| t.status.state == TaskState::Running;

    let live: Vec<&Task> = current
        .iter()
        .copied()
        .filter(|t| !t.status.state.is_terminal())
        .collect();
    // The task the slot keeps: one running where it may stay, else the newest live one (maybe a
    // replacement on its way), else the newest finished one.
    if let Some(&c) = live
        .iter()
        .find(|t| serving(t) && !must_move(t))
        .or(live.first())
        .or(current.first())
    {
        let c_runs = c.status.state == TaskState::Running;
        let c_moves = !c.status.state.is_terminal() && must_move(c);
        if c_moves && c_runs && wants_new {
            // Moving start-first: the replacement comes first, and this task stops once it runs
            // (below, on a later pass), so a drain never leaves the slot empty while there is
            // room elsewhere; if there is none, the replacement waits with the scheduler's
            // reason and this task keeps serving. Current tasks newer than this one are
            // replacements that ended: the next one waits as the restart policy says.
            let pos = current
                .iter()
                .position(|t| t.id == c.id)
                .expect("c is current");
            let (newer, older) = (&current[..pos], &current[pos + 1..]);
            plan.shutdown.extend(older.iter().map(|t| t.id.clone()));
            plan.shutdown.extend(outdated.iter().map(|t| t.id.clone()));
            if let Some(failed) = newer.first() {
                if !should_restart(service, failed, history, now) {
                    return SlotState::Settled;
                }
            }
            plan.shutdown.extend(newer.iter().map(|t| t.id.clone()));
            return create_or_wait(plan, key, history, mark, pass);
        }
        // Duplicates of the current spec: keep one, and a task leaving its node until `c` runs.
        let leaving = |t: &&Task| serving(t) && must_move(t);
        plan.shutdown.extend(
            current
                .iter()
                .filter(|t| t.id != c.id && (c_runs || !leaving(t)))
                .map(|t| t.id.clone()),
        );
        // Outdated tasks go once the current one runs; until then (start-first) only the ones
        // that serve nothing.
        plan.shutdown.extend(
            outdated
                .iter()
                .filter(|t| c_runs || !serving(t))
                .map(|t| t.id.clone()),
        );
        if c.status.state.is_terminal() {
            if wants_new && should_restart(service, c, history, now) {
                plan.shutdown.push(c.id.clone());
                return create_or_wait(plan, key, history, mark, pass);
            }
            return SlotState::Settled;
        }
        if c_moves {
            // Not serving yet (or a paused global node, which gets no replacement): nothing to
            // keep.
            plan.shutdown.push(c.id.clone());
            if wants_new {
                return create_or_wait(plan, key, history, mark, pass);
            }
            return SlotState::Settled;
        }
        return if c_runs {
            SlotState::Settled
        } else {
            SlotState::InFlight
        };
    }

    // Only outdated tasks (or none). Keep the newest serving one for a rollout batch; the rest
    // serve nothing and are replaced now.
    let keep = outdated.iter().copied().find(serving);
    plan.shutdown.extend(
        outdated
            .iter()
            .filter(|t| Some(t.id.as_str()) != keep.map(|k| k.id.as_str()))
            .map(|t| t.id.clone()),
    );
    match keep {
        Some(k) if !must_move(k) => SlotState::Outdated { task: k, wants_new },
        // Moving start-first, as above: the old task serves until its replacement runs.
        Some(_) if wants_new => create_or_wait(plan, key, history, mark, pass),
        Some(k) => {
            plan.shutdown.push(k.id.clone());
            SlotState::Settled
        }
        None if wants_new => create_or_wait(plan, key, history, mark, pass),
        None => SlotState::Settled,
    }
}

/// Bounded history: forget the oldest finished tasks of a slot (or node). A slot keeps enough to
/// count `restart.max_attempts`.
pub(crate) fn forget_old(plan: &mut Plan, service: &Service, history: &[&Task]) {
    let attempts = service.spec.restart.max_attempts.saturating_add(1);
    let keep = HISTORY_PER_SLOT.max(usize::try_from(attempts).unwrap_or(usize::MAX));
    plan.delete.extend(
        history
            .iter()
            .skip(keep)
            .filter(|t| t.desired_state >= TaskState::Shutdown && finished(t))
            .map(|t| t.id.clone()),
    );
}

fn reconcile_global<'a>(
    plan: &mut Plan,
    service: &Service,
    tasks: &[&'a Task],
    nodes: &'a crate::store::Map<String, Node>,
    now: u64,
) -> Vec<(Key<'a>, SlotState<'a>)> {
    let mut by_node: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    let mut strays = Vec::new();
    for t in tasks {
        match t.target_node.as_deref() {
            Some(n) => by_node.entry(n).or_default().push(t),
            // Left from a replicated incarnation of the service.
            None => strays.push(*t),
        }
    }
    stop_all(plan, &strays);
    let wanted: BTreeSet<&str> = nodes
        .values()
        .filter(|n| eligible(service, n))
        .map(|n| n.id.as_str())
        .collect();
    for id in &wanted {
        by_node.entry(id).or_default();
    }
    let mut states = Vec::new();
    let pass = Pass { nodes, now };
    for (node_id, mut history) in by_node {
        newest_first(&mut history);
        let node = nodes.get(node_id);
        let stays = may_stay(service, node) && node.is_some_and(|n| n.state == NodeState::Ready);
        if !stays {
            // Gone, down, drained or no longer matching: stop it, forget what has finished.
            stop_all(plan, &history);
            continue;
        }
        // Paused nodes keep their task but get no new one.
        let key = Key::Node(node_id);
        let wants_new = wanted.contains(node_id);
        let state = plan_slot(plan, service, key, &history, wants_new, &pass, |_| false);
        states.push((key, state));
        forget_old(plan, service, &history);
    }
    states
}

/// A task is finished once its container is gone, or it never reached a node.
pub(crate) fn finished(t: &Task) -> bool {
    t.status.state.is_terminal() || t.node_id.is_none()
}

/// Whether a run ended by itself (exit, crash, rejection), rather than because the controller
/// asked or its node was lost: only those count as restart attempts and crashes.
fn ended_by_itself(t: &Task) -> bool {
    matches!(
        t.status.state,
        TaskState::Complete | TaskState::Failed | TaskState::Rejected
    )
}

/// The wait before the slot whose newest task is the finished `t` gets a new task, or `None`
/// when the policy says it gets none. `history` is the slot's, newest first.
pub(crate) fn restart_delay(service: &Service, t: &Task, history: &[&Task]) -> Option<u64> {
    let policy = &service.spec.restart;
    let wanted = match policy.condition {
        RestartCondition::None => false,
        RestartCondition::OnFailure => t.status.state != TaskState::Complete,
        RestartCondition::Any => true,
    };
    if !wanted {
        return None;
    }
    // Finished runs of the current spec, newest first (`t` among them).
    let runs = history
        .iter()
        .filter(|h| h.status.state.is_terminal() && of_current_spec(service, h));
    if policy.max_attempts > 0 {
        // Counted back from `t`'s end rather than from now, so giving up is final.
        let since = match policy.window {
            0 => 0,
            w => t.status.timestamp.saturating_sub(w),
        };
        let attempts = runs
            .clone()
            .filter(|h| ended_by_itself(h) && h.status.timestamp >= since)
            .count() as u64;
        // The first run is not a restart.
        if attempts > policy.max_attempts {
            return None;
        }
    }
    // Orphaned tasks (node lost) are replaced at once: the delay protects against crash loops,
    // and a lost node is not a crash.
    if t.status.state == TaskState::Orphaned {
        return Some(0);
    }
    let mut crashes = 0;
    for h in runs {
        let ran = h.running_at.map(|r| h.status.timestamp.saturating_sub(r));
        if ran.is_some_and(|d| d >= CRASH_RUN_MS) {
            break;
        }
        if ended_by_itself(h) {
            crashes += 1;
        }
    }
    Some(policy.backoff(crashes.max(1)))
}

fn should_restart(service: &Service, t: &Task, history: &[&Task], now: u64) -> bool {
    restart_delay(service, t, history).is_some_and(|d| now >= t.status.timestamp.saturating_add(d))
}

/// How long a rollout task may wait for a node before it counts as failed, so that a rollout
/// no node can take still ends (paused or rolled back) instead of waiting forever.
pub const UNPLACEABLE_DEADLINE_MS: u64 = 30_000;

/// Whether a task of the current rollout counts against it: it ended, other than by a requested
/// shutdown or the loss of its node, before running for `monitor` (or without ever running); or
/// it has found no node for `UNPLACEABLE_DEADLINE_MS`.
fn rollout_failure(t: &Task, monitor: u64, now: u64) -> bool {
    let ended = t.status.state;
    let unplaceable = t.node_id.is_none()
        && t.desired_state <= TaskState::Running
        && now >= t.created_at.saturating_add(UNPLACEABLE_DEADLINE_MS);
    unplaceable
        || (ended.is_terminal()
            && ended != TaskState::Shutdown
            && ended != TaskState::Orphaned
            && t.running_at
                .is_none_or(|r| t.status.timestamp < r.saturating_add(monitor)))
}

/// `web.1.abcd1234 rejected: image "x" not found`.
fn describe_failure(t: &Task) -> String {
    let why = if !t.status.error.is_empty() {
        t.status.error.clone()
    } else if let Some(code) = t.status.exit_code {
        format!("exit code {code}")
    } else if !t.status.message.is_empty() {
        t.status.message.clone()
    } else {
        "no details".into()
    };
    format!("task {} {}: {why}", t.name(), t.status.state)
}

/// The rollout part of a plan: judge the failures of the current rollout, start the next batch
/// when the previous one runs and the delay has passed, and say when the rollout is over.
fn roll_out<'a>(
    mut plan: Plan,
    service: &Service,
    tasks: &[&'a Task],
    slots: Vec<(Key<'a>, SlotState<'a>)>,
    now: u64,
) -> Plan {
    let status = service.update_status.as_ref();
    let state = status.map(|s| s.state);
    let rolling_back = state.is_some_and(UpdateState::is_rollback);
    let cfg: &UpdateConfig = if rolling_back {
        &service.spec.rollback_config
    } else {
        &service.spec.update_config
    };
    // Tasks created since the spec last changed: the rollout's own (restarts included).
    let ours: Vec<&Task> = tasks
        .iter()
        .copied()
        .filter(|t| t.spec_version == service.spec_version)
        .collect();
    let last_running = ours.iter().filter_map(|t| t.running_at).max();
    let mut paused = state.is_some_and(UpdateState::is_paused);

    if let Some(st) = status.filter(|s| s.state.is_in_progress()) {
        let mut failed: Vec<&Task> = ours
            .iter()
            .copied()
            .filter(|t| rollout_failure(t, cfg.monitor, now))
            .collect();
        let (failures, updated) = (failed.len() as u64, ours.len() as u64);
        if cfg.failure_action != FailureAction::Continue
            && cfg.max_failure_ratio.exceeded_by(failures, updated)
        {
            failed.sort_by_key(|t| (t.status.timestamp, t.id.as_str()));
            let worst = describe_failure(failed.last().expect("failures > 0"));
            let tally = format!(
                "{failures} of {updated} new tasks failed, max_failure_ratio {}",
                cfg.max_failure_ratio
            );
            let can_roll_back = !rolling_back && service.previous_spec.is_some();
            if cfg.failure_action == FailureAction::Rollback && can_roll_back {
                return Plan {
                    rollback: Some(format!("update failed, rolling back: {worst} ({tally})")),
                    ..Plan::default()
                };
            }
            paused = true;
            let (state, what) = if rolling_back {
                (UpdateState::RollbackPaused, "rollback paused")
            } else {
                (UpdateState::Paused, "update paused")
            };
            plan.status = Some(UpdateStatus {
                state,
                message: format!("{what}: {worst} ({tally})"),
                started_at: st.started_at,
                completed_at: None,
            });
        }
    }

    let outdated: Vec<(Key, &Task, bool)> = slots
        .iter()
        .filter_map(|(k, s)| match s {
            SlotState::Outdated { task, wants_new } => Some((*k, *task, *wants_new)),
            _ => None,
        })
        .collect();
    // Slots in flight: an old task stopping or a new one on its way to `running`.
    let in_flight = slots
        .iter()
        .filter(|(_, s)| matches!(s, SlotState::InFlight | SlotState::Stopping))
        .count();
    let rested = |wait: u64| last_running.is_none_or(|r| now >= r.saturating_add(wait));

    if !paused && in_flight == 0 && !outdated.is_empty() && rested(cfg.delay) {
        for &(key, old, wants_new) in outdated.iter().take(cfg.batch_size(outdated.len())) {
            if cfg.order == UpdateOrder::StopFirst || !wants_new {
                // Stop-first: only the stop now. `plan_slot` creates the successor on a later
                // pass, once this task is observed ended (`create_or_wait`).
                plan.shutdown.push(old.id.clone());
            } else {
                // Start-first: the successor now; `plan_slot` stops this task once it runs.
                plan.create_at(key);
            }
        }
        return plan;
    }

    if let Some(st) = status.filter(|s| s.state.is_in_progress() && !paused) {
        if in_flight == 0 && outdated.is_empty() && rested(cfg.monitor) {
            let message = if rolling_back {
                format!("rollback completed ({})", st.message)
            } else {
                "update completed".into()
            };
            plan.status = Some(UpdateStatus {
                state: if rolling_back {
                    UpdateState::RollbackCompleted
                } else {
                    UpdateState::Completed
                },
                message,
                started_at: st.started_at,
                completed_at: Some(now),
            });
        }
    }
    plan
}

/// Which services a pass reconciles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every service, and the finished tasks of removed services.
    All,
    /// Only these services (by name), e.g. the ones whose tasks changed since a pass that found
    /// nothing to do for the others ([`touched`]).
    Services(BTreeSet<String>),
}

impl Scope {
    fn covers(&self, service: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Services(names) => names.contains(service),
        }
    }
}

/// What changed from `old` to `new`, as the scope of the next pass: the services whose record
/// or tasks were added, changed or removed, or `All` when anything else changed (nodes,
/// networks, volumes, images... feed every service's plan).
///
/// A pass over `touched(old, new)` at time `now` decides what a pass over every service would,
/// provided the services out of scope had nothing to do on `old` at `now`: a service's plan
/// depends on its own record and tasks, the nodes and the time (and, for `rebalance: auto`, on
/// the room other services leave). What waits on time alone (restart delays, a rollout's delay
/// and monitor, stop and unplaceable deadlines) or on other services' tasks is left to the
/// caller's full passes (the control loop runs one at least every second).
pub fn touched(old: &Store, new: &Store) -> Scope {
    use imbl::ordmap::DiffItem;
    let mut rest = old.clone();
    rest.tasks = new.tasks.clone();
    rest.services = new.services.clone();
    rest.applied = new.applied;
    if rest != *new {
        return Scope::All;
    }
    let mut names = BTreeSet::new();
    for d in old.services.diff(&new.services) {
        match d {
            DiffItem::Add(name, _) | DiffItem::Remove(name, _) => {
                names.insert(name.clone());
            }
            DiffItem::Update { new: (name, _), .. } => {
                names.insert(name.clone());
            }
        }
    }
    for d in old.tasks.diff(&new.tasks) {
        match d {
            DiffItem::Add(_, t) | DiffItem::Remove(_, t) => {
                names.insert(t.service_name.clone());
            }
            DiffItem::Update {
                old: (_, a),
                new: (_, b),
            } => {
                names.insert(a.service_name.clone());
                names.insert(b.service_name.clone());
            }
        }
    }
    Scope::Services(names)
}

/// The most tasks one pass creates. A pass's batch is one raft entry, replicated in one
/// message and written in one transaction: 150,000 tasks at once (issue 20's 5,000-host run)
/// made an entry of about 80 MB that the peers refused (their 64 MiB message limit), and the
/// leader lost its quorum. Services past the cap are planned by a later pass (at the latest
/// the control loop's next pass over every service); a service whose plan stops tasks is
/// planned whole, so the cap never turns a start-first update into a stop-first one.
pub const MAX_CREATE_PER_PASS: usize = 10_000;

/// One pass of the control loops over a store snapshot: reconcile every service, reap tasks of
/// removed services, schedule pending tasks. Returns `None` when nothing needs to change.
pub fn plan_pass(store: &Store, now: u64, new_id: &mut dyn FnMut() -> String) -> Option<Command> {
    plan_pass_in(store, &Scope::All, now, new_id)
}

/// [`plan_pass`] reconciling only the services of `scope` (scheduling still considers every
/// task waiting for a node: a change to one service's tasks can free room for another's).
pub fn plan_pass_in(
    store: &Store,
    scope: &Scope,
    now: u64,
    new_id: &mut dyn FnMut() -> String,
) -> Option<Command> {
    let mut by_service: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for t in store.tasks.values() {
        if scope.covers(&t.service_name) {
            by_service.entry(t.service_id.as_str()).or_default().push(t);
        }
    }
    let services: Box<dyn Iterator<Item = &Service>> = match scope {
        Scope::All => Box::new(store.services.values()),
        Scope::Services(names) => Box::new(names.iter().filter_map(|n| store.services.get(n))),
    };
    let mut created: Vec<Task> = Vec::new();
    let mut shutdown = Vec::new();
    let mut delete = Vec::new();
    let mut rollouts = Vec::new();
    for svc in services {
        let tasks = by_service.remove(svc.id.as_str()).unwrap_or_default();
        if created.len() >= MAX_CREATE_PER_PASS {
            continue;
        }
        if crate::job::auto_remove_due(svc, &tasks, &store.nodes, now) {
            // Its tasks are forgotten with the service's, once they are seen ended.
            rollouts.push(Command::RemoveService {
                name: svc.spec.name.clone(),
            });
            continue;
        }
        let mut plan = reconcile(svc, &tasks, &store.nodes, now);
        let budget = MAX_CREATE_PER_PASS - created.len();
        if plan.shutdown.is_empty() && plan.create.len() + plan.create_on.len() > budget {
            plan.create.truncate(budget);
            plan.create_on.truncate(budget - plan.create.len());
        }
        if let Some(reason) = plan.rollback {
            rollouts.push(Command::Rollback {
                service: svc.spec.name.clone(),
                now,
                reason,
                if_spec_version: Some(svc.spec_version),
            });
        }
        if let Some(status) = plan.status {
            rollouts.push(Command::SetUpdateStatus {
                service: svc.spec.name.clone(),
                spec_version: svc.spec_version,
                status,
            });
        }
        rollouts.extend(
            crate::rebalance::progress(store, svc, &tasks, now)
                .or_else(|| crate::rebalance::auto(store, svc, now)),
        );
        shutdown.extend(plan.shutdown);
        delete.extend(plan.delete);
        // Looked up only when the pass makes tasks: most passes make none.
        let pin = (!plan.create.is_empty() || !plan.create_on.is_empty())
            .then(|| store.pinned_digest(&svc.spec.image))
            .flatten();
        for slot in plan.create {
            let mut t = new_task(svc, slot, None, now, new_id());
            t.image_digest.clone_from(&pin);
            created.push(t);
        }
        for node in plan.create_on {
            let mut t = new_task(svc, 0, Some(node), now, new_id());
            t.image_digest.clone_from(&pin);
            created.push(t);
        }
    }
    // Whatever is left belongs to removed services: forget it once finished.
    for tasks in by_service.values() {
        delete.extend(tasks.iter().filter(|t| finished(t)).map(|t| t.id.clone()));
    }

    // Schedule: tasks waiting for a node (unless being stopped now), then the ones created in
    // this pass.
    let stopping: BTreeSet<&str> = shutdown.iter().map(String::as_str).collect();
    // Tasks being stopped still hold their ports and reservations until they are seen ended.
    let placed = store.tasks.values().filter(|t| t.holds_resources());
    let waiting: Vec<&Task> = store
        .tasks
        .values()
        .filter(|t| {
            t.node_id.is_none()
                && t.desired_state <= TaskState::Running
                && !stopping.contains(t.id.as_str())
        })
        .chain(created.iter())
        .collect();
    // `depends_on`: a service whose dependencies do not hold yet keeps its new tasks pending,
    // with the reason, instead of placing them.
    let mut holds: BTreeMap<&str, Option<String>> = BTreeMap::new();
    let mut held: Vec<(String, String)> = Vec::new();
    let waiting: Vec<&Task> = waiting
        .into_iter()
        .filter(|t| {
            let why = holds.entry(t.service_id.as_str()).or_insert_with(|| {
                store
                    .services
                    .get(&t.service_name)
                    .filter(|s| s.id == t.service_id)
                    .and_then(|s| crate::depends::waiting(store, &s.spec))
            });
            match why {
                Some(why) => {
                    held.push((t.id.clone(), why.clone()));
                    false
                }
                None => true,
            }
        })
        .collect();
    let pins: Vec<_> = waiting
        .iter()
        .map(|t| crate::slotvol::pin(store, t))
        .collect();
    // Nothing waits (most passes): the node loads need not be counted.
    let decisions = if waiting.is_empty() {
        Vec::new()
    } else {
        schedule_pinned(&store.nodes, placed, &waiting, &pins)
    };
    let mut assign = Vec::new();
    let mut pending = Vec::new();
    let mut placed_new: BTreeMap<String, String> = BTreeMap::new();
    for d in decisions {
        match d {
            Decision::Assign { task_id, node_id } => {
                if store.tasks.contains_key(&task_id) {
                    assign.push((task_id, node_id));
                } else {
                    placed_new.insert(task_id, node_id);
                }
            }
            Decision::Unplaceable { task_id, reason } => held.push((task_id, reason)),
        }
    }
    for (task_id, reason) in held {
        let unchanged = store
            .tasks
            .get(&task_id)
            .is_some_and(|t| t.status.message == reason);
        if !unchanged {
            pending.push((task_id, reason));
        }
    }
    for t in &mut created {
        if let Some(node) = placed_new.remove(&t.id) {
            t.node_id = Some(node);
            t.status.state = TaskState::Assigned;
            t.status.message = "assigned".into();
        }
    }

    let mut cmds = Vec::new();
    if !created.is_empty() {
        cmds.push(Command::CreateTasks { tasks: created });
    }
    if !assign.is_empty() {
        cmds.push(Command::AssignTasks {
            assignments: assign,
            now,
        });
    }
    for (task_id, reason) in pending {
        if store.tasks.contains_key(&task_id) {
            cmds.push(Command::SetPending {
                task_id,
                reason,
                now,
            });
        } else if let Some(Command::CreateTasks { tasks }) = cmds.first_mut() {
            if let Some(t) = tasks.iter_mut().find(|t| t.id == task_id) {
                t.status.message = reason;
            }
        }
    }
    if !shutdown.is_empty() {
        cmds.push(Command::SetDesired {
            now,
            updates: shutdown
                .into_iter()
                .map(|id| (id, TaskState::Shutdown))
                .collect(),
        });
    }
    if !delete.is_empty() {
        cmds.push(Command::DeleteTasks { ids: delete });
    }
    cmds.extend(rollouts);
    (!cmds.is_empty()).then_some(Command::Batch(cmds))
}

fn new_task(svc: &Service, slot: u64, target_node: Option<String>, now: u64, id: String) -> Task {
    Task {
        id,
        service_id: svc.id.clone(),
        service_name: svc.spec.name.clone(),
        slot,
        spec: svc.spec.clone().into(),
        spec_version: svc.spec_version,
        node_id: None,
        target_node,
        desired_state: TaskState::Running,
        status: TaskStatus {
            state: TaskState::Pending,
            message: "waiting for a node".into(),
            error: String::new(),
            container_id: String::new(),
            exit_code: None,
            timestamp: now,
        },
        running_at: None,
        stop_requested_at: None,
        networks: Vec::new(),
        created_at: now,
        version: 0,
        image_digest: None,
    }
}

#[cfg(test)]
mod tests {
    use super::sim::put_node;
    use super::*;
    use crate::spec::tests_support::spec;
    use crate::store::{StatusUpdate, Store};

    /// A store with `nodes` ready nodes and one service; ids are deterministic.
    fn setup(nodes: usize, replicas: u64) -> (Store, u64) {
        let mut s = Store::default();
        let mut idx = 0;
        for i in 1..=nodes {
            idx += 1;
            s.apply(idx, put_node(&format!("n{i}"), &[], 0)).unwrap();
        }
        idx += 1;
        s.apply(
            idx,
            Command::PutService {
                id: "svc".into(),
                spec: Box::new(spec("web", replicas)),
                now: 0,
            },
        )
        .unwrap();
        (s, idx)
    }

    /// Runs passes until nothing changes; returns the number of passes.
    fn converge(s: &mut Store, idx: &mut u64, now: u64, ids: &mut u64) -> usize {
        for pass in 0..20 {
            let mut gen = || {
                *ids += 1;
                format!("t{ids:03}")
            };
            match plan_pass(s, now, &mut gen) {
                Some(cmd) => {
                    *idx += 1;
                    s.apply(*idx, cmd).unwrap();
                }
                None => return pass,
            }
        }
        panic!("did not converge");
    }

    fn report(s: &mut Store, idx: &mut u64, state: TaskState, now: u64) {
        let updates = s
            .tasks
            .values()
            .filter(|t| t.desired_state == TaskState::Running && !t.status.state.is_terminal())
            .map(|t| StatusUpdate::of(t, t.node_id.as_deref().unwrap(), state, now))
            .collect();
        *idx += 1;
        s.apply(*idx, Command::UpdateStatus { updates }).unwrap();
    }

    /// The agents report every task asked to stop as ended.
    fn report_stopped(s: &mut Store, idx: &mut u64, now: u64) {
        let updates = s
            .tasks
            .values()
            .filter(|t| t.desired_state > TaskState::Running && t.holds_resources())
            .map(|t| StatusUpdate::of(t, t.node_id.as_deref().unwrap(), TaskState::Shutdown, now))
            .collect();
        *idx += 1;
        s.apply(*idx, Command::UpdateStatus { updates }).unwrap();
    }

    #[test]
    fn a_task_is_of_the_current_spec_by_version_or_by_comparison() {
        let (mut s, mut idx) = setup(1, 1);
        let mut ids = 0;
        converge(&mut s, &mut idx, 1, &mut ids);
        let task = s.tasks.values().next().expect("a task").clone();
        let put = |s: &mut Store, idx: &mut u64, f: &dyn Fn(&mut crate::spec::ServiceSpec)| {
            let mut sp = s.services.values().next().expect("svc").spec.clone();
            f(&mut sp);
            *idx += 1;
            s.apply(
                *idx,
                Command::PutService {
                    id: "svc".into(),
                    spec: Box::new(sp),
                    now: 2,
                },
            )
            .expect("put");
        };
        let svc = |s: &Store| s.services.values().next().expect("svc").clone();
        // (change, the first task still current)
        type Change = fn(&mut crate::spec::ServiceSpec);
        let table: [(&str, Change, bool); 3] = [
            ("replicas only: same version", |sp| sp.replicas = 3, true),
            (
                "the image: a new version",
                |sp| sp.image = "busybox:2".into(),
                false,
            ),
            (
                "back to the first image",
                |sp| sp.image = "busybox:latest".into(),
                true,
            ),
        ];
        for (what, change, current) in table {
            put(&mut s, &mut idx, &change);
            let svc = svc(&s);
            assert_eq!(of_current_spec(&svc, &task), current, "{what}");
            assert_eq!(
                of_current_spec(&svc, &task),
                task.spec.same_task_spec(&svc.spec),
                "{what}: the version agrees with the comparison"
            );
        }
        assert!(svc(&s).spec_version > task.spec_version);
    }

    #[test]
    fn new_tasks_are_pinned_to_the_digest_their_tag_names_in_the_cluster_registry() {
        let (mut s, mut idx) = setup(1, 1);
        let mut ids = 0;
        converge(&mut s, &mut idx, 1, &mut ids);
        let before: Vec<_> = s.tasks.values().map(|t| t.image_digest.clone()).collect();
        assert_eq!(before, [None], "the tag is not in the registry yet");
        idx += 1;
        let image = s.services.values().next().expect("svc").spec.image.clone();
        let (repo, tag) = image.split_once(':').unwrap_or((&image, "latest"));
        s.apply(
            idx,
            Command::PutImage {
                repo: repo.into(),
                tag: Some(tag.into()),
                record: crate::store::ImageRecord {
                    digest: "sha256:1234".into(),
                    media_type: String::new(),
                },
            },
        )
        .unwrap();
        let mut spec = s.services.values().next().expect("svc").spec.clone();
        spec.replicas = 2;
        idx += 1;
        s.apply(
            idx,
            Command::PutService {
                id: "svc".into(),
                spec: Box::new(spec),
                now: 2,
            },
        )
        .unwrap();
        converge(&mut s, &mut idx, 2, &mut ids);
        let t = s.tasks.values().find(|t| t.slot == 2).expect("slot 2");
        assert_eq!(t.image_digest.as_deref(), Some("sha256:1234"));
        assert_eq!(t.image_ref(), format!("{image}@sha256:1234"));
    }

    fn live(s: &Store) -> Vec<&Task> {
        s.tasks
            .values()
            .filter(|t| t.desired_state == TaskState::Running)
            .collect()
    }

    #[test]
    fn a_pass_creates_at_most_the_cap_and_the_next_passes_the_rest() {
        let cap = MAX_CREATE_PER_PASS as u64;
        let (mut s, mut idx) = setup(3, cap + 7);
        idx += 1;
        s.apply(
            idx,
            Command::PutService {
                id: "svc2".into(),
                spec: Box::new(spec("zz", 5)),
                now: 0,
            },
        )
        .unwrap();
        let mut ids = 0u64;
        let mut pass = |s: &mut Store, idx: &mut u64| {
            let mut gen = || {
                ids += 1;
                format!("t{ids:06}")
            };
            let cmd = plan_pass(s, 1, &mut gen).expect("a batch");
            *idx += 1;
            s.apply(*idx, cmd).unwrap();
            s.tasks.len() as u64
        };
        // The first service fills the budget (its plan cut to it), the second waits.
        assert_eq!(pass(&mut s, &mut idx), cap);
        assert!(s.tasks.values().all(|t| t.service_name == "web"));
        // The next pass makes the rest of both.
        assert_eq!(pass(&mut s, &mut idx), cap + 7 + 5);
        let mut ids = 1_000_000;
        converge(&mut s, &mut idx, 1, &mut ids);
        assert_eq!(s.tasks.len() as u64, cap + 12);
        assert!(s.tasks.values().all(|t| t.node_id.is_some()));
    }

    #[test]
    fn creates_spreads_and_scales() {
        let (mut s, mut idx) = setup(3, 6);
        let mut ids = 0;
        converge(&mut s, &mut idx, 1000, &mut ids);
        assert_eq!(live(&s).len(), 6);
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for t in live(&s) {
            *per_node.entry(t.node_id.as_deref().unwrap()).or_default() += 1;
        }
        assert_eq!(per_node.values().copied().collect::<Vec<_>>(), [2, 2, 2]);
        let slots: Vec<u64> = live(&s).iter().map(|t| t.slot).collect();
        assert_eq!(slots.len(), 6);

        report(&mut s, &mut idx, TaskState::Running, 1000);
        // Scale down to 2: slots 3..6 are shut down, then forgotten once finished.
        idx += 1;
        s.apply(
            idx,
            Command::PutService {
                id: "svc".into(),
                spec: Box::new(spec("web", 2)),
                now: 2000,
            },
        )
        .unwrap();
        converge(&mut s, &mut idx, 2000, &mut ids);
        assert_eq!(live(&s).len(), 2);
        assert!(live(&s).iter().all(|t| t.slot <= 2));
        let stopping: Vec<String> = s
            .tasks
            .values()
            .filter(|t| t.desired_state == TaskState::Shutdown)
            .map(|t| t.id.clone())
            .collect();
        assert_eq!(stopping.len(), 4);
        // Agents report them stopped: they are reaped.
        idx += 1;
        let updates = stopping
            .iter()
            .map(|id| StatusUpdate {
                task_id: id.clone(),
                node_id: s.tasks[id].node_id.clone().unwrap(),
                status: TaskStatus {
                    state: TaskState::Shutdown,
                    message: String::new(),
                    error: String::new(),
                    container_id: String::new(),
                    exit_code: None,
                    timestamp: 2100,
                },
            })
            .collect();
        s.apply(idx, Command::UpdateStatus { updates }).unwrap();
        converge(&mut s, &mut idx, 2200, &mut ids);
        assert_eq!(s.tasks.len(), 2);
    }

    /// One past run of a slot for `restart_backoff_table`: how it ended, when (ms), and for how
    /// long it had been running (`None`: never ran).
    type Run = (TaskState, u64, Option<u64>);

    #[test]
    fn restart_backoff_table() {
        use crate::spec::RestartPolicy;
        struct Case {
            name: &'static str,
            policy: RestartPolicy,
            /// Oldest first; the last one is the task whose slot wants a new task.
            runs: Vec<Run>,
            want: Option<u64>,
        }
        let p = |delay, max_delay, max_attempts, window| RestartPolicy {
            delay,
            max_delay,
            max_attempts,
            window,
            ..RestartPolicy::default()
        };
        let crash = |at| (TaskState::Failed, at, Some(1000));
        let cases = vec![
            Case {
                name: "first crash waits delay",
                policy: p(1000, 60_000, 0, 0),
                runs: vec![crash(0)],
                want: Some(1000),
            },
            Case {
                name: "a task that never ran is a crash too",
                policy: p(1000, 60_000, 0, 0),
                runs: vec![crash(0), (TaskState::Rejected, 10, None)],
                want: Some(2000),
            },
            Case {
                name: "the fourth consecutive crash waits 8x",
                policy: p(1000, 60_000, 0, 0),
                runs: vec![crash(0), crash(10), crash(20), crash(30)],
                want: Some(8000),
            },
            Case {
                name: "backoff is capped at max_delay",
                policy: p(5000, 12_000, 0, 0),
                runs: vec![crash(0), crash(10), crash(20), crash(30)],
                want: Some(12_000),
            },
            Case {
                name: "a run of 10 s or more ends the streak",
                policy: p(1000, 60_000, 0, 0),
                runs: vec![
                    crash(0),
                    crash(10),
                    (TaskState::Failed, 99_000, Some(10_000)),
                ],
                want: Some(1000),
            },
            Case {
                name: "crashes before a long run do not count",
                policy: p(1000, 60_000, 0, 0),
                runs: vec![
                    crash(0),
                    crash(10),
                    (TaskState::Failed, 99_000, Some(60_000)),
                    crash(100_000),
                    crash(101_000),
                ],
                want: Some(2000),
            },
            Case {
                name: "requested stops and lost nodes are not crashes",
                policy: p(1000, 60_000, 0, 0),
                runs: vec![
                    crash(0),
                    (TaskState::Shutdown, 10, Some(1)),
                    (TaskState::Orphaned, 20, None),
                    crash(30),
                ],
                want: Some(2000),
            },
            Case {
                name: "an orphaned task is replaced at once",
                policy: p(1000, 60_000, 0, 0),
                runs: vec![crash(0), crash(10), (TaskState::Orphaned, 20, Some(1))],
                want: Some(0),
            },
            Case {
                name: "max_attempts: the first run is not a restart",
                policy: p(1000, 60_000, 2, 0),
                runs: vec![crash(0), crash(10)],
                want: Some(2000),
            },
            Case {
                name: "max_attempts reached",
                policy: p(1000, 60_000, 2, 0),
                runs: vec![crash(0), crash(10), crash(20)],
                want: None,
            },
            Case {
                name: "max_attempts counts the whole history without a window",
                policy: p(1000, 60_000, 2, 0),
                runs: vec![crash(0), crash(500_000), crash(900_000)],
                want: None,
            },
            Case {
                name: "max_attempts ignores requested stops",
                policy: p(1000, 60_000, 2, 0),
                runs: vec![crash(0), (TaskState::Shutdown, 10, Some(1)), crash(20)],
                want: Some(2000),
            },
            Case {
                name: "with a window, only the runs that ended within it count",
                policy: p(1000, 60_000, 2, 60_000),
                runs: vec![crash(0), crash(500_000), crash(900_000)],
                want: Some(4000),
            },
            Case {
                name: "window: too many within it",
                policy: p(1000, 60_000, 2, 60_000),
                runs: vec![crash(0), crash(900_000), crash(910_000), crash(920_000)],
                want: None,
            },
        ];
        for c in cases {
            let mut sp = spec("web", 1);
            sp.restart = c.policy;
            let svc = Service {
                id: "svc".into(),
                spec: sp,
                spec_version: 1,
                created_at: 0,
                updated_at: 0,
                version: 0,
                previous_spec: None,
                update_status: None,
                vips: Default::default(),
                rebalance: None,
                autoscale_decisions: Default::default(),
            };
            let tasks: Vec<Task> = c
                .runs
                .iter()
                .enumerate()
                .map(|(i, &(state, at, ran))| {
                    let at = at + 1_000_000;
                    let mut t = new_task(&svc, 1, None, at, format!("t{i:03}"));
                    t.node_id = Some("n1".into());
                    t.created_at = i as u64;
                    t.running_at = ran.map(|r| at - r);
                    t.status.state = state;
                    t.status.timestamp = at;
                    t
                })
                .collect();
            let mut history: Vec<&Task> = tasks.iter().collect();
            newest_first(&mut history);
            assert_eq!(
                restart_delay(&svc, history[0], &history),
                c.want,
                "{}",
                c.name
            );
        }
        let mut policy = p(1000, 60_000, 0, 0);
        assert_eq!(policy.backoff(1), 1000);
        assert_eq!(policy.backoff(64), 60_000);
        policy.max_delay = 10;
        assert_eq!(policy.backoff(3), 1000, "max_delay below delay: delay");
    }

    /// Fake clock and a fake agent: the slot's task runs for `ran` ms, then fails; the next one
    /// comes exactly after the backoff.
    #[test]
    fn restart_backoff_over_time_and_bounded_history() {
        let (mut s, mut idx) = setup(1, 1);
        let mut ids = 0;
        converge(&mut s, &mut idx, 0, &mut ids);
        let mut now = 0;
        // (how long the task runs, the wait before the next one)
        let rounds = [
            (1000, 5000),
            (1000, 10_000),
            (1000, 20_000),
            (1000, 40_000),
            (1000, 60_000),
            (1000, 60_000),
            // Served for a minute: the streak ends, back to `delay`.
            (60_000, 5000),
            (1000, 5000),
            (1000, 10_000),
        ];
        for (round, (ran, wait)) in rounds.into_iter().enumerate() {
            report(&mut s, &mut idx, TaskState::Running, now);
            now += ran;
            report(&mut s, &mut idx, TaskState::Failed, now);
            assert_eq!(
                converge(&mut s, &mut idx, now + wait - 1, &mut ids),
                0,
                "round {round}: too early"
            );
            converge(&mut s, &mut idx, now + wait, &mut ids);
            assert_eq!(live(&s).len(), 1, "round {round}");
            assert_eq!(live(&s)[0].status.state, TaskState::Assigned);
            now += wait;
        }
        // 10 tasks ever created for the slot, history keeps 5.
        assert_eq!(ids, 10);
        assert_eq!(s.tasks.len(), HISTORY_PER_SLOT);
    }

    #[test]
    fn max_attempts_gives_up_and_keeps_enough_history_to_count() {
        let (mut s, mut idx) = setup(1, 1);
        let mut sp = spec("web", 1);
        sp.restart.max_attempts = 7;
        sp.restart.delay = 1;
        put_service(&mut s, &mut idx, sp);
        let mut ids = 0;
        let mut now = 0;
        converge(&mut s, &mut idx, now, &mut ids);
        for _ in 0..7 {
            report(&mut s, &mut idx, TaskState::Failed, now);
            now += 1000;
            converge(&mut s, &mut idx, now, &mut ids);
            assert_eq!(live(&s).len(), 1);
        }
        // The eighth failure is the seventh restart's: the slot gives up, for good.
        report(&mut s, &mut idx, TaskState::Failed, now);
        converge(&mut s, &mut idx, now + 3_600_000, &mut ids);
        assert_eq!(s.tasks.len(), 8, "all 8 runs kept to count them");
        assert!(s
            .tasks
            .values()
            .all(|t| t.status.state == TaskState::Failed));
        assert_eq!(ids, 8);
    }

    #[test]
    fn restart_none_and_on_failure() {
        for (cond, state, restarts) in [
            (RestartCondition::None, TaskState::Failed, false),
            (RestartCondition::OnFailure, TaskState::Complete, false),
            (RestartCondition::OnFailure, TaskState::Failed, true),
            (RestartCondition::Any, TaskState::Complete, true),
        ] {
            let (mut s, mut idx) = setup(1, 1);
            let mut sp = spec("web", 1);
            sp.restart.condition = cond;
            idx += 1;
            s.apply(
                idx,
                Command::PutService {
                    id: "svc".into(),
                    spec: Box::new(sp),
                    now: 0,
                },
            )
            .unwrap();
            let mut ids = 0;
            converge(&mut s, &mut idx, 0, &mut ids);
            report(&mut s, &mut idx, state, 0);
            converge(&mut s, &mut idx, 60_000, &mut ids);
            assert_eq!(s.tasks.len() == 2, restarts, "{cond:?} {state:?}");
        }
    }

    #[test]
    fn spec_change_replaces_tasks_and_removal_reaps() {
        let (mut s, mut idx) = setup(2, 2);
        let mut ids = 0;
        converge(&mut s, &mut idx, 0, &mut ids);
        let old: Vec<String> = live(&s).iter().map(|t| t.id.clone()).collect();
        let mut sp = spec("web", 2);
        sp.args = vec!["new".into()];
        idx += 1;
        s.apply(
            idx,
            Command::PutService {
                id: "svc".into(),
                spec: Box::new(sp),
                now: 0,
            },
        )
        .unwrap();
        converge(&mut s, &mut idx, 0, &mut ids);
        // Stop-first: the old tasks are asked to stop, and replaced once they have.
        assert!(live(&s).is_empty());
        report_stopped(&mut s, &mut idx, 0);
        converge(&mut s, &mut idx, 0, &mut ids);
        let now_live: Vec<String> = live(&s).iter().map(|t| t.id.clone()).collect();
        assert_eq!(now_live.len(), 2);
        assert!(now_live.iter().all(|id| !old.contains(id)));
        assert!(live(&s).iter().all(|t| t.spec.args == ["new"]));

        idx += 1;
        s.apply(idx, Command::RemoveService { name: "web".into() })
            .unwrap();
        converge(&mut s, &mut idx, 0, &mut ids);
        assert!(live(&s).is_empty());
        // Not reaped until the agents report them stopped (the old ones already have).
        assert_eq!(s.tasks.len(), 2);
        let keys: Vec<String> = s.tasks.keys().cloned().collect();
        for k in keys {
            if let Some(t) = s.tasks.get_mut(&k) {
                t.status.state = TaskState::Shutdown;
            }
        }
        converge(&mut s, &mut idx, 0, &mut ids);
        assert!(s.tasks.is_empty());
    }

    #[test]
    fn unplaceable_tasks_keep_a_reason_and_place_when_a_node_joins() {
        let (mut s, mut idx) = setup(0, 2);
        let mut ids = 0;
        converge(&mut s, &mut idx, 0, &mut ids);
        assert_eq!(s.tasks.len(), 2);
        assert!(s
            .tasks
            .values()
            .all(|t| t.status.state == TaskState::Pending
                && t.status.message == "no nodes have joined the cluster"));
        idx += 1;
        s.apply(
            idx,
            Command::PutNode {
                id: "n1".into(),
                hostname: "h1".into(),
                addr: String::new(),
                labels: Default::default(),
                role: Default::default(),
                resources: Default::default(),
                now: 0,
                cert_not_after: 0,
                host_labels: Default::default(),
            },
        )
        .unwrap();
        converge(&mut s, &mut idx, 0, &mut ids);
        assert!(s
            .tasks
            .values()
            .all(|t| t.node_id.as_deref() == Some("n1") && t.status.state == TaskState::Assigned));
    }

    #[test]
    fn orphaned_tasks_are_replaced_at_once_elsewhere() {
        let (mut s, mut idx) = setup(2, 2);
        let mut ids = 0;
        converge(&mut s, &mut idx, 0, &mut ids);
        report(&mut s, &mut idx, TaskState::Running, 0);
        idx += 1;
        s.apply(
            idx,
            Command::NodeDown {
                id: "n1".into(),
                now: 1,
            },
        )
        .unwrap();
        converge(&mut s, &mut idx, 1, &mut ids);
        let l = live(&s);
        assert_eq!(l.len(), 2);
        assert!(l.iter().all(|t| t.node_id.as_deref() == Some("n2")));
    }

    fn update_node(
        id: &str,
        availability: Option<Availability>,
        add: &[(&str, &str)],
        rm: &[&str],
    ) -> Command {
        Command::UpdateNode {
            id: id.into(),
            availability,
            labels_add: add
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            labels_rm: rm.iter().map(|k| k.to_string()).collect(),
        }
    }

    fn apply_all(s: &mut Store, idx: &mut u64, cmds: Vec<Command>) {
        for c in cmds {
            *idx += 1;
            s.apply(*idx, c).unwrap();
        }
    }

    fn put_service(s: &mut Store, idx: &mut u64, sp: crate::spec::ServiceSpec) {
        apply_all(
            s,
            idx,
            vec![Command::PutService {
                id: "svc".into(),
                spec: Box::new(sp),
                now: 0,
            }],
        );
    }

    /// Node id → id of the live task there (placed, meant to run).
    fn live_by_node(s: &Store) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for t in live(s) {
            let Some(node) = t.node_id.clone() else {
                continue;
            };
            assert!(
                m.insert(node, t.id.clone()).is_none(),
                "two live tasks on one node"
            );
        }
        m
    }

    fn global(constraints: &[&str]) -> crate::spec::ServiceSpec {
        let mut sp = spec("agent", 1);
        sp.mode = ServiceMode::Global;
        sp.placement.constraints = constraints.iter().map(|c| c.parse().unwrap()).collect();
        sp
    }

    #[test]
    fn global_services_follow_nodes() {
        struct Case {
            name: &'static str,
            constraints: Vec<&'static str>,
            /// Applied before the service exists.
            before: Vec<Command>,
            want_before: Vec<&'static str>,
            /// Applied once the service has converged.
            change: Vec<Command>,
            want_after: Vec<&'static str>,
            /// Nodes whose task must be the same one before and after.
            kept: Vec<&'static str>,
        }
        let zone = |z| [("zone", z)];
        let cases = vec![
            Case {
                name: "one task per node; a joining node gets one",
                constraints: vec![],
                before: vec![put_node("n1", &[], 0), put_node("n2", &[], 0)],
                want_before: vec!["n1", "n2"],
                change: vec![put_node("n3", &[], 0)],
                want_after: vec!["n1", "n2", "n3"],
                kept: vec!["n1", "n2"],
            },
            Case {
                name: "a node that goes down loses its task, and gets a new one when back",
                constraints: vec![],
                before: vec![put_node("n1", &[], 0), put_node("n2", &[], 0)],
                want_before: vec!["n1", "n2"],
                change: vec![Command::NodeDown {
                    id: "n2".into(),
                    now: 1,
                }],
                want_after: vec!["n1"],
                kept: vec!["n1"],
            },
            Case {
                name: "drain stops the task",
                constraints: vec![],
                before: vec![put_node("n1", &[], 0), put_node("n2", &[], 0)],
                want_before: vec!["n1", "n2"],
                change: vec![update_node("n2", Some(Availability::Drain), &[], &[])],
                want_after: vec!["n1"],
                kept: vec!["n1"],
            },
            Case {
                name: "pause keeps the task",
                constraints: vec![],
                before: vec![put_node("n1", &[], 0), put_node("n2", &[], 0)],
                want_before: vec!["n1", "n2"],
                change: vec![update_node("n2", Some(Availability::Pause), &[], &[])],
                want_after: vec!["n1", "n2"],
                kept: vec!["n1", "n2"],
            },
            Case {
                name: "a paused node gets no task; reactivated, it does",
                constraints: vec![],
                before: vec![
                    put_node("n1", &[], 0),
                    put_node("n2", &[], 0),
                    update_node("n2", Some(Availability::Pause), &[], &[]),
                ],
                want_before: vec!["n1"],
                change: vec![update_node("n2", Some(Availability::Active), &[], &[])],
                want_after: vec!["n1", "n2"],
                kept: vec!["n1"],
            },
            Case {
                name: "constraints pick nodes and follow label changes",
                constraints: vec!["node.labels.zone==a"],
                before: vec![
                    put_node("n1", &zone("a"), 0),
                    put_node("n2", &zone("b"), 0),
                    put_node("n3", &zone("a"), 0),
                ],
                want_before: vec!["n1", "n3"],
                change: vec![
                    update_node("n1", None, &[], &["zone"]),
                    update_node("n2", None, &zone("a"), &[]),
                ],
                want_after: vec!["n2", "n3"],
                kept: vec!["n3"],
            },
        ];
        for c in cases {
            let mut s = Store::default();
            let mut idx = 0;
            let mut ids = 0;
            apply_all(&mut s, &mut idx, c.before);
            put_service(&mut s, &mut idx, global(&c.constraints));
            converge(&mut s, &mut idx, 0, &mut ids);
            let before = live_by_node(&s);
            assert_eq!(
                before.keys().map(String::as_str).collect::<Vec<_>>(),
                c.want_before,
                "{}",
                c.name
            );
            assert!(live(&s).iter().all(|t| t.slot == 0
                && t.target_node == t.node_id
                && t.status.state == TaskState::Assigned));
            report(&mut s, &mut idx, TaskState::Running, 0);
            apply_all(&mut s, &mut idx, c.change);
            converge(&mut s, &mut idx, 1, &mut ids);
            let after = live_by_node(&s);
            assert_eq!(
                after.keys().map(String::as_str).collect::<Vec<_>>(),
                c.want_after,
                "{}",
                c.name
            );
            for n in c.kept {
                assert_eq!(
                    before.get(n),
                    after.get(n),
                    "{}: task on {n} replaced",
                    c.name
                );
            }
            // Every task that is no longer live was asked to stop (or, once finished, reaped).
            for (n, id) in &before {
                if after.get(n) != Some(id) {
                    let t = s.tasks.get(id);
                    assert!(
                        t.is_none_or(|t| t.desired_state == TaskState::Shutdown),
                        "{}: {t:?}",
                        c.name
                    );
                }
            }
        }
    }

    #[test]
    fn global_node_returns_after_down() {
        let mut s = Store::default();
        let (mut idx, mut ids) = (0, 0);
        apply_all(&mut s, &mut idx, vec![put_node("n1", &[], 0)]);
        put_service(&mut s, &mut idx, global(&[]));
        converge(&mut s, &mut idx, 0, &mut ids);
        report(&mut s, &mut idx, TaskState::Running, 0);
        let first = live_by_node(&s)["n1"].clone();
        apply_all(
            &mut s,
            &mut idx,
            vec![Command::NodeDown {
                id: "n1".into(),
                now: 1,
            }],
        );
        converge(&mut s, &mut idx, 1, &mut ids);
        assert!(live_by_node(&s).is_empty());
        apply_all(&mut s, &mut idx, vec![put_node("n1", &[], 0)]);
        converge(&mut s, &mut idx, 2, &mut ids);
        let second = &live_by_node(&s)["n1"];
        assert_ne!(&first, second);
    }

    #[test]
    fn global_task_waits_for_capacity_with_a_reason() {
        let mut s = Store::default();
        let (mut idx, mut ids) = (0, 0);
        apply_all(
            &mut s,
            &mut idx,
            vec![put_node("n1", &[], 4 << 30), put_node("n2", &[], 1 << 30)],
        );
        let mut sp = global(&[]);
        sp.resources.reservations.memory = 2 << 30;
        put_service(&mut s, &mut idx, sp);
        converge(&mut s, &mut idx, 0, &mut ids);
        assert_eq!(live_by_node(&s).keys().collect::<Vec<_>>(), ["n1"]);
        let waiting: Vec<&Task> = s.tasks.values().filter(|t| t.node_id.is_none()).collect();
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].target_node.as_deref(), Some("n2"));
        assert_eq!(
            waiting[0].status.message,
            "global task cannot run on node h-n2: no suitable node (1 node has insufficient \
             memory: 2 GiB needed)"
        );
        // The agent re-registers with more memory: the same task is placed.
        let id = waiting[0].id.clone();
        apply_all(&mut s, &mut idx, vec![put_node("n2", &[], 8 << 30)]);
        converge(&mut s, &mut idx, 1, &mut ids);
        assert_eq!(live_by_node(&s)["n2"], id);
    }

    #[test]
    fn switching_modes_replaces_tasks() {
        let (mut s, mut idx) = setup(3, 2);
        let mut ids = 0;
        converge(&mut s, &mut idx, 0, &mut ids);
        let replicated: Vec<String> = live(&s).iter().map(|t| t.id.clone()).collect();
        let mut sp = spec("web", 2);
        sp.mode = ServiceMode::Global;
        put_service(&mut s, &mut idx, sp);
        converge(&mut s, &mut idx, 0, &mut ids);
        assert!(replicated
            .iter()
            .all(|id| s.tasks[id].desired_state == TaskState::Shutdown));
        report_stopped(&mut s, &mut idx, 0);
        converge(&mut s, &mut idx, 0, &mut ids);
        assert_eq!(live_by_node(&s).len(), 3);
        // And back: global tasks are scaled away, slots 1..=2 come back.
        put_service(&mut s, &mut idx, spec("web", 2));
        converge(&mut s, &mut idx, 0, &mut ids);
        report_stopped(&mut s, &mut idx, 0);
        converge(&mut s, &mut idx, 0, &mut ids);
        let mut slots: Vec<u64> = live(&s).iter().map(|t| t.slot).collect();
        slots.sort();
        assert_eq!(slots, [1, 2]);
    }

    #[test]
    fn drain_moves_replicated_tasks_and_pause_keeps_them() {
        let (mut s, mut idx) = setup(3, 3);
        let mut ids = 0;
        converge(&mut s, &mut idx, 0, &mut ids);
        report(&mut s, &mut idx, TaskState::Running, 0);
        let on_n1 = live_by_node(&s)["n1"].clone();
        let slot = s.tasks[&on_n1].slot;

        // Pause: nothing moves, and scaling up avoids the node.
        apply_all(
            &mut s,
            &mut idx,
            vec![update_node("n1", Some(Availability::Pause), &[], &[])],
        );
        assert_eq!(converge(&mut s, &mut idx, 0, &mut ids), 0);
        put_service(&mut s, &mut idx, spec("web", 5));
        converge(&mut s, &mut idx, 0, &mut ids);
        let on = |s: &Store, n: &str| {
            live(s)
                .iter()
                .filter(|t| t.node_id.as_deref() == Some(n))
                .count()
        };
        assert_eq!((on(&s, "n1"), on(&s, "n2"), on(&s, "n3")), (1, 2, 2));
        report(&mut s, &mut idx, TaskState::Running, 0);

        // Drain: the task leaves n1 and its slot is refilled elsewhere.
        apply_all(
            &mut s,
            &mut idx,
            vec![update_node("n1", Some(Availability::Drain), &[], &[])],
        );
        converge(&mut s, &mut idx, 0, &mut ids);
        // Start-first: the old task serves until its replacement runs.
        assert_eq!(s.tasks[&on_n1].desired_state, TaskState::Running);
        assert_eq!(live(&s).iter().filter(|t| t.slot == slot).count(), 2);
        report(&mut s, &mut idx, TaskState::Running, 1);
        converge(&mut s, &mut idx, 1, &mut ids);
        assert_eq!(s.tasks[&on_n1].desired_state, TaskState::Shutdown);
        assert_eq!(on(&s, "n1"), 0);
        assert_eq!(live(&s).len(), 5);
        assert_eq!(live(&s).iter().filter(|t| t.slot == slot).count(), 1);
    }

    #[test]
    fn tasks_move_off_nodes_that_stop_matching() {
        let mut s = Store::default();
        let (mut idx, mut ids) = (0, 0);
        apply_all(
            &mut s,
            &mut idx,
            vec![
                put_node("n1", &[("zone", "a")], 0),
                put_node("n2", &[("zone", "a")], 0),
            ],
        );
        let mut sp = spec("web", 2);
        sp.placement.constraints = vec!["node.labels.zone==a".parse().unwrap()];
        put_service(&mut s, &mut idx, sp);
        converge(&mut s, &mut idx, 0, &mut ids);
        assert_eq!(live_by_node(&s).len(), 2);
        apply_all(
            &mut s,
            &mut idx,
            vec![update_node("n1", None, &[("zone", "b")], &[])],
        );
        converge(&mut s, &mut idx, 0, &mut ids);
        report_stopped(&mut s, &mut idx, 0);
        converge(&mut s, &mut idx, 0, &mut ids);
        let l = live(&s);
        assert_eq!(l.len(), 2);
        assert!(l.iter().all(|t| t.node_id.as_deref() == Some("n2")));
    }
}

#[cfg(test)]
mod depends_tests;
#[cfg(test)]
mod drain_tests;
#[cfg(test)]
mod job_tests;
#[cfg(test)]
mod rebalance_tests;
#[cfg(test)]
mod rollout_tests;
#[cfg(test)]
mod scope_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod stop_first_tests;

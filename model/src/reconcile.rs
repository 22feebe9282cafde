//! The reconciler: compares each service's spec with its tasks and returns a plan — which slots
//! need a new task, which tasks must stop, which finished tasks can be forgotten. `plan_pass`
//! turns the plans of all services plus the scheduler's decisions into one batch command, the only
//! thing the leader's control loop proposes.
//!
//! Invariants: pure (time and ids come in as arguments); a user spec is never rewritten; only
//! `desired_state` and task records change; per slot at most one task is meant to run.

use std::collections::BTreeMap;

use crate::scheduler::{schedule, Decision};
use crate::spec::RestartCondition;
use crate::store::{Command, Service, Store, Task, TaskStatus};
use crate::task::TaskState;

/// Finished tasks kept per slot for `rctl ps` history (the live one included).
pub const HISTORY_PER_SLOT: usize = 5;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Slots that need a new task now.
    pub create: Vec<u64>,
    /// Tasks whose desired state becomes `shutdown`.
    pub shutdown: Vec<String>,
    /// Finished tasks to forget.
    pub delete: Vec<String>,
}

/// Plans one service. `tasks` are all tasks of the service.
pub fn reconcile(service: &Service, tasks: &[&Task], now: u64) -> Plan {
    let mut plan = Plan::default();
    let mut slots: BTreeMap<u64, Vec<&Task>> = BTreeMap::new();
    for t in tasks {
        slots.entry(t.slot).or_default().push(t);
    }
    let replicas = service.spec.replicas;
    for slot in 1..=replicas {
        slots.entry(slot).or_default();
    }
    for (slot, mut history) in slots {
        // Newest first.
        history.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        let mut live = history
            .iter()
            .filter(|t| t.desired_state <= TaskState::Running);
        let current = live.next();
        // More than one live task in a slot: keep the newest.
        plan.shutdown.extend(live.map(|t| t.id.clone()));

        if slot > replicas {
            // Scaled away: stop what runs, forget what has finished.
            plan.shutdown.extend(current.map(|t| t.id.clone()));
            plan.delete.extend(
                history
                    .iter()
                    .filter(|t| t.desired_state >= TaskState::Shutdown && finished(t))
                    .map(|t| t.id.clone()),
            );
            continue;
        }

        match current {
            None => plan.create.push(slot),
            Some(t) if t.spec_version != service.spec_version => {
                // The spec changed: replace (stop-first, all at once until rolling updates).
                plan.shutdown.push(t.id.clone());
                plan.create.push(slot);
            }
            Some(t) if t.status.state.is_terminal() => {
                if should_restart(service, t, &history, now) {
                    plan.shutdown.push(t.id.clone());
                    plan.create.push(slot);
                }
            }
            Some(_) => {}
        }

        // Bounded history: forget the oldest finished tasks of the slot.
        plan.delete.extend(
            history
                .iter()
                .skip(HISTORY_PER_SLOT)
                .filter(|t| t.desired_state >= TaskState::Shutdown && finished(t))
                .map(|t| t.id.clone()),
        );
    }
    plan
}

/// A task is finished once its container is gone, or it never reached a node.
fn finished(t: &Task) -> bool {
    t.status.state.is_terminal() || t.node_id.is_none()
}

fn should_restart(service: &Service, t: &Task, history: &[&Task], now: u64) -> bool {
    let policy = &service.spec.restart;
    let wanted = match policy.condition {
        RestartCondition::None => false,
        RestartCondition::OnFailure => t.status.state != TaskState::Complete,
        RestartCondition::Any => true,
    };
    if !wanted {
        return false;
    }
    if policy.max_attempts > 0 {
        let attempts = history
            .iter()
            .filter(|h| h.spec_version == service.spec_version && h.status.state.is_terminal())
            .count() as u64;
        // The first run is not a restart.
        if attempts > policy.max_attempts {
            return false;
        }
    }
    // Orphaned tasks (node lost) are replaced at once: the delay protects against crash loops,
    // and a lost node is not a crash.
    t.status.state == TaskState::Orphaned
        || now
            >= t.status
                .timestamp
                .saturating_add(policy.delay.saturating_mul(1000))
}

/// One pass of the control loops over a store snapshot: reconcile every service, reap tasks of
/// removed services, schedule pending tasks. Returns `None` when nothing needs to change.
pub fn plan_pass(store: &Store, now: u64, new_id: &mut dyn FnMut() -> String) -> Option<Command> {
    let mut by_service: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for t in store.tasks.values() {
        by_service.entry(t.service_id.as_str()).or_default().push(t);
    }
    let mut created: Vec<Task> = Vec::new();
    let mut shutdown = Vec::new();
    let mut delete = Vec::new();
    for svc in store.services.values() {
        let tasks = by_service.remove(svc.id.as_str()).unwrap_or_default();
        let plan = reconcile(svc, &tasks, now);
        shutdown.extend(plan.shutdown);
        delete.extend(plan.delete);
        for slot in plan.create {
            created.push(new_task(svc, slot, now, new_id()));
        }
    }
    // Whatever is left belongs to removed services: forget it once finished.
    for tasks in by_service.values() {
        delete.extend(tasks.iter().filter(|t| finished(t)).map(|t| t.id.clone()));
    }

    // Schedule: tasks waiting for a node, then the ones created in this pass.
    let placed = store.tasks.values().filter(|t| t.is_active());
    let waiting: Vec<&Task> = store
        .tasks
        .values()
        .filter(|t| t.node_id.is_none() && t.desired_state <= TaskState::Running)
        .chain(created.iter())
        .collect();
    let decisions = schedule(&store.nodes, placed, &waiting);
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
            Decision::Unplaceable { task_id, reason } => {
                let unchanged = store
                    .tasks
                    .get(&task_id)
                    .is_some_and(|t| t.status.message == reason);
                if !unchanged {
                    pending.push((task_id, reason));
                }
            }
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
            updates: shutdown
                .into_iter()
                .map(|id| (id, TaskState::Shutdown))
                .collect(),
        });
    }
    if !delete.is_empty() {
        cmds.push(Command::DeleteTasks { ids: delete });
    }
    (!cmds.is_empty()).then_some(Command::Batch(cmds))
}

fn new_task(svc: &Service, slot: u64, now: u64, id: String) -> Task {
    Task {
        id,
        service_id: svc.id.clone(),
        service_name: svc.spec.name.clone(),
        slot,
        spec: svc.spec.clone(),
        spec_version: svc.spec_version,
        node_id: None,
        desired_state: TaskState::Running,
        status: TaskStatus {
            state: TaskState::Pending,
            message: "waiting for a node".into(),
            error: String::new(),
            container_id: String::new(),
            exit_code: None,
            timestamp: now,
        },
        created_at: now,
        version: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests_support::spec;
    use crate::store::{StatusUpdate, Store};

    /// A store with `nodes` ready nodes and one service; ids are deterministic.
    fn setup(nodes: usize, replicas: u64) -> (Store, u64) {
        let mut s = Store::default();
        let mut idx = 0;
        for i in 1..=nodes {
            idx += 1;
            s.apply(
                idx,
                Command::PutNode {
                    id: format!("n{i}"),
                    hostname: format!("h{i}"),
                    addr: String::new(),
                    labels: Default::default(),
                    now: 0,
                },
            )
            .unwrap();
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
            .map(|t| StatusUpdate {
                task_id: t.id.clone(),
                node_id: t.node_id.clone().unwrap(),
                status: TaskStatus {
                    state,
                    message: String::new(),
                    error: String::new(),
                    container_id: t.id.clone(),
                    exit_code: None,
                    timestamp: now,
                },
            })
            .collect();
        *idx += 1;
        s.apply(*idx, Command::UpdateStatus { updates }).unwrap();
    }

    fn live(s: &Store) -> Vec<&Task> {
        s.tasks
            .values()
            .filter(|t| t.desired_state == TaskState::Running)
            .collect()
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

    #[test]
    fn restart_policy_delay_and_history() {
        let (mut s, mut idx) = setup(1, 1);
        let mut ids = 0;
        converge(&mut s, &mut idx, 0, &mut ids);
        for round in 0..8u64 {
            let t0 = round * 10_000;
            report(&mut s, &mut idx, TaskState::Failed, t0);
            // Before the delay: nothing new.
            assert_eq!(converge(&mut s, &mut idx, t0 + 1000, &mut ids), 0);
            converge(&mut s, &mut idx, t0 + 5000, &mut ids);
            assert_eq!(live(&s).len(), 1);
            assert_eq!(live(&s)[0].status.state, TaskState::Assigned);
        }
        // 9 tasks ever created for the slot, history keeps 5.
        assert_eq!(s.tasks.len(), HISTORY_PER_SLOT);
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
        let now_live: Vec<String> = live(&s).iter().map(|t| t.id.clone()).collect();
        assert_eq!(now_live.len(), 2);
        assert!(now_live.iter().all(|id| !old.contains(id)));
        assert!(live(&s).iter().all(|t| t.spec.args == ["new"]));

        idx += 1;
        s.apply(idx, Command::RemoveService { name: "web".into() })
            .unwrap();
        converge(&mut s, &mut idx, 0, &mut ids);
        assert!(live(&s).is_empty());
        // Not reaped until the agents report them stopped.
        assert_eq!(s.tasks.len(), 4);
        for t in s.tasks.values_mut() {
            t.status.state = TaskState::Shutdown;
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
                now: 0,
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
}

//! A simulated cluster for the reconciler's tests: the control loop's passes applied to a store,
//! fake agents that step tasks one state per tick (or reject a bad image, or crash), and a fake
//! clock.

use std::collections::BTreeSet;

use super::plan_pass;
use crate::spec::tests_support::spec;
use crate::spec::ServiceSpec;
use crate::store::{ApplyError, Command, StatusUpdate, Store, Task};
use crate::task::TaskState;
use crate::update::UpdateState;

pub(super) const TICK: u64 = 1000;
pub(super) const BAD: &str = "bad:1";
/// Runs, then exits non-zero `CRASH_AFTER` ms later.
pub(super) const CRASHY: &str = "crashy:1";
pub(super) const CRASH_AFTER: u64 = 2000;
/// Runs, then exits 0 `CRASH_AFTER` ms later (a job's task).
pub(super) const DONE: &str = "done:1";
/// Like `DONE`, but the first two runs of each slot (or node) exit non-zero.
pub(super) const FLAKY: &str = "flaky:1";

pub(super) struct Sim {
    pub(super) s: Store,
    pub(super) idx: u64,
    pub(super) ids: u64,
    pub(super) now: u64,
    /// How long a container takes to stop once asked (its PID 1 ignoring SIGTERM for the
    /// whole grace, say); 0 stops it on the agents' next step.
    pub(super) stop_ms: u64,
    /// Nodes whose agents no longer report anything (cut off, not yet declared down).
    pub(super) silent: BTreeSet<String>,
}

impl Sim {
    pub(super) fn new(nodes: usize, sp: ServiceSpec) -> Sim {
        let mut sim = Sim {
            s: Store::default(),
            idx: 0,
            ids: 0,
            now: 1_000_000,
            stop_ms: 0,
            silent: BTreeSet::new(),
        };
        for i in 1..=nodes {
            sim.apply(put_node(&format!("n{i}"), &[], 0)).unwrap();
        }
        sim.put(sp);
        sim.run(30, |_| {});
        sim
    }

    pub(super) fn apply(&mut self, cmd: Command) -> Result<(), ApplyError> {
        self.idx += 1;
        self.s.apply(self.idx, cmd)
    }

    pub(super) fn put(&mut self, sp: ServiceSpec) {
        let now = self.now;
        self.apply(Command::PutService {
            id: "svc".into(),
            spec: Box::new(sp),
            now,
        })
        .unwrap();
    }

    pub(super) fn svc(&self) -> &crate::store::Service {
        self.s.services.values().next().unwrap()
    }

    pub(super) fn state(&self) -> Option<UpdateState> {
        self.svc().update_status.as_ref().map(|s| s.state)
    }

    /// Control-loop passes until nothing changes; `check` sees the store after each apply.
    pub(super) fn settle(&mut self, check: &mut dyn FnMut(&Store)) {
        for _ in 0..20 {
            let ids = &mut self.ids;
            let mut gen = || {
                *ids += 1;
                format!("t{ids:03}")
            };
            match plan_pass(&self.s, self.now, &mut gen) {
                Some(cmd) => {
                    self.apply(cmd).unwrap();
                    check(&self.s);
                }
                None => return,
            }
        }
        panic!("control loop did not settle");
    }

    /// Every agent moves each of its tasks one step.
    pub(super) fn agents(&mut self, check: &mut dyn FnMut(&Store)) {
        let now = self.now;
        let mut updates = Vec::new();
        for t in self.s.tasks.values() {
            let Some(node) = &t.node_id else { continue };
            if t.status.state.is_terminal() || self.silent.contains(node) {
                continue;
            }
            let (state, error) = if t.desired_state >= TaskState::Shutdown {
                let asked = t.stop_requested_at.unwrap_or(0);
                if now < asked.saturating_add(self.stop_ms) {
                    continue;
                }
                (TaskState::Shutdown, "")
            } else {
                match (t.status.state, t.spec.image.as_str()) {
                    (_, BAD) => (TaskState::Rejected, "image \"bad:1\" not found"),
                    (TaskState::Running, CRASHY) if now >= t.running_at.unwrap() + CRASH_AFTER => {
                        (TaskState::Failed, "exit status 3")
                    }
                    (TaskState::Running, DONE) if now >= t.running_at.unwrap() + CRASH_AFTER => {
                        (TaskState::Complete, "")
                    }
                    (TaskState::Running, FLAKY) if now >= t.running_at.unwrap() + CRASH_AFTER => {
                        let failed_before = self
                            .s
                            .tasks
                            .values()
                            .filter(|o| {
                                o.slot == t.slot
                                    && o.target_node == t.target_node
                                    && o.spec_version == t.spec_version
                                    && o.status.state == TaskState::Failed
                            })
                            .count();
                        if failed_before < 2 {
                            (TaskState::Failed, "exit status 1")
                        } else {
                            (TaskState::Complete, "")
                        }
                    }
                    (TaskState::Running, _) => continue,
                    (s, _) if s < TaskState::Starting => (TaskState::Starting, ""),
                    _ => (TaskState::Running, ""),
                }
            };
            let mut update = StatusUpdate::of(t, node, state, now);
            update.status.error = error.into();
            updates.push(update);
        }
        if !updates.is_empty() {
            self.apply(Command::UpdateStatus { updates }).unwrap();
            check(&self.s);
        }
    }

    /// `ticks` rounds of: time passes, agents step, the control loop settles.
    pub(super) fn run(&mut self, ticks: usize, mut check: impl FnMut(&Store)) {
        for _ in 0..ticks {
            self.settle(&mut check);
            self.now += TICK;
            self.agents(&mut check);
            self.settle(&mut check);
        }
    }

    /// Runs until the rollout leaves `Updating`/`RollbackStarted`; panics after `max` ticks.
    pub(super) fn run_rollout(&mut self, max: usize, mut check: impl FnMut(&Store)) {
        for _ in 0..max {
            if !self.state().is_some_and(UpdateState::is_in_progress) {
                return;
            }
            self.run(1, &mut check);
        }
        panic!(
            "rollout still {:?} after {max} ticks",
            self.svc().update_status
        );
    }
}

/// Tasks meant to run.
pub(super) fn live(s: &Store) -> Vec<&Task> {
    s.tasks
        .values()
        .filter(|t| t.desired_state == TaskState::Running)
        .collect()
}

/// Meant to run and running.
pub(super) fn serving(s: &Store) -> usize {
    live(s)
        .iter()
        .filter(|t| t.status.state == TaskState::Running)
        .count()
}

/// Slots with a task of `image` meant to run but not running yet.
pub(super) fn in_flight(s: &Store, image: &str) -> usize {
    live(s)
        .iter()
        .filter(|t| t.spec.image == image && t.status.state < TaskState::Running)
        .map(|t| t.slot)
        .collect::<BTreeSet<_>>()
        .len()
}

pub(super) fn live_ids(s: &Store) -> BTreeSet<String> {
    live(s).iter().map(|t| t.id.clone()).collect()
}

pub(super) fn with(image: &str, f: impl FnOnce(&mut ServiceSpec)) -> ServiceSpec {
    let mut sp = spec("web", 10);
    sp.image = image.into();
    f(&mut sp);
    sp
}

/// A node registering with `labels` and `memory` bytes (0: unknown) of capacity.
pub(super) fn put_node(id: &str, labels: &[(&str, &str)], memory: u64) -> Command {
    Command::PutNode {
        id: id.into(),
        hostname: format!("h-{id}"),
        addr: String::new(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        role: Default::default(),
        resources: crate::store::NodeResources { cpus: 0, memory },
        now: 0,
        cert_not_after: 0,
        host_labels: Default::default(),
    }
}

//! Honest stop-first: a slot's new task is created only once its old task has been observed
//! ended (or, its agent silent, once the stop grace and the report timeout have passed; on a lost
//! node, once the grace has), and parallelism counts slots whose old task is still stopping.
//! First a table over `reconcile` (slot states × order × parallelism → actions), then the
//! simulated cluster with containers that take the whole grace to stop.

use std::collections::{BTreeMap, BTreeSet};

use super::sim::*;
use super::{reconcile, STOP_REPORT_TIMEOUT_MS};

use crate::node::NodeState;
use crate::ports::{PortConfig, PortMode};
use crate::spec::ServiceSpec;
use crate::store::{Command, Store, Task};
use crate::task::TaskState;
use crate::update::{UpdateOrder, UpdateState};

const GRACE_MS: u64 = 10_000;

/// Two replicas of `v1` running on one node, and `v2` just applied with `order` and
/// `parallelism`.
fn updating(order: UpdateOrder, parallelism: u64) -> Sim {
    let cfg = move |s: &mut ServiceSpec| {
        s.replicas = 2;
        s.stop_grace_period = GRACE_MS / 1000;
        s.update_config.order = order;
        s.update_config.parallelism = parallelism;
    };
    let mut sim = Sim::new(1, with("v1", cfg));
    sim.put(with("v2", cfg));
    assert_eq!(sim.state(), Some(UpdateState::Updating));
    sim
}

fn task_of<'a>(s: &'a Store, image: &str, slot: u64) -> &'a Task {
    s.tasks
        .values()
        .find(|t| t.spec.image == image && t.slot == slot)
        .expect("task")
}

fn edit(sim: &mut Sim, image: &str, slot: u64, f: impl FnOnce(&mut Task)) {
    let id = task_of(&sim.s, image, slot).id.clone();
    f(sim.s.tasks.get_mut(&id).expect("task"));
}

/// The old task of `slot` was asked to stop at `sim.now` and still runs.
fn stopping(sim: &mut Sim, slot: u64) {
    let now = sim.now;
    edit(sim, "v1", slot, |t| {
        t.desired_state = TaskState::Shutdown;
        t.stop_requested_at = Some(now);
    });
}

/// ... and has been reported ended.
fn stopped(sim: &mut Sim, slot: u64) {
    stopping(sim, slot);
    edit(sim, "v1", slot, |t| t.status.state = TaskState::Shutdown);
}

/// A new task in `slot`, in `state`.
fn new_task(sim: &mut Sim, slot: u64, state: TaskState) {
    let mut t = task_of(&sim.s, "v1", slot).clone();
    t.id = format!("new{slot}");
    t.spec = sim.svc().spec.clone().into();
    t.spec_version = sim.svc().spec_version;
    t.desired_state = TaskState::Running;
    t.status.state = state;
    t.stop_requested_at = None;
    t.running_at = (state == TaskState::Running).then_some(sim.now);
    sim.s.tasks.insert(t.id.clone(), t);
}

fn node_down_without_orphaning(sim: &mut Sim) {
    sim.s.nodes.get_mut("n1").expect("n1").state = NodeState::Down;
}

type Setup = fn(&mut Sim);

/// (case, order, parallelism, setup, ms after the stop request, slots created, tasks stopped as
/// image.slot)
type Row = (
    &'static str,
    UpdateOrder,
    u64,
    Setup,
    u64,
    &'static [u64],
    &'static [&'static str],
);

#[test]
fn slot_states_order_and_parallelism_decide_the_actions() {
    use TaskState::*;
    use UpdateOrder::*;
    let table: &[Row] = &[
        ("batch starts", StopFirst, 1, |_| {}, 0, &[], &["v1.1"]),
        (
            "batch of 2",
            StopFirst,
            2,
            |_| {},
            0,
            &[],
            &["v1.1", "v1.2"],
        ),
        (
            "all at once",
            StopFirst,
            0,
            |_| {},
            0,
            &[],
            &["v1.1", "v1.2"],
        ),
        ("start-first", StartFirst, 1, |_| {}, 0, &[1], &[]),
        (
            "start-first batch of 2",
            StartFirst,
            2,
            |_| {},
            0,
            &[1, 2],
            &[],
        ),
        (
            "old still stopping",
            StopFirst,
            1,
            |s| stopping(s, 1),
            0,
            &[],
            &[],
        ),
        (
            "old stopping, batch of 2 waits",
            StopFirst,
            2,
            |s| stopping(s, 1),
            0,
            &[],
            &[],
        ),
        ("old ended", StopFirst, 1, |s| stopped(s, 1), 0, &[1], &[]),
        (
            "silent agent, within grace + timeout",
            StopFirst,
            1,
            |s| stopping(s, 1),
            GRACE_MS + STOP_REPORT_TIMEOUT_MS - 1,
            &[],
            &[],
        ),
        (
            "silent agent, grace + timeout passed",
            StopFirst,
            1,
            |s| stopping(s, 1),
            GRACE_MS + STOP_REPORT_TIMEOUT_MS,
            &[1],
            &[],
        ),
        (
            "lost node, within grace",
            StopFirst,
            1,
            |s| {
                stopping(s, 1);
                node_down_without_orphaning(s);
            },
            GRACE_MS - 1,
            &[],
            &[],
        ),
        (
            "lost node, grace passed",
            StopFirst,
            1,
            |s| {
                stopping(s, 1);
                node_down_without_orphaning(s);
            },
            GRACE_MS,
            &[1],
            &[],
        ),
        (
            "new task starting",
            StopFirst,
            1,
            |s| {
                stopped(s, 1);
                new_task(s, 1, Starting);
            },
            0,
            &[],
            &[],
        ),
        (
            "new task running: next batch",
            StopFirst,
            1,
            |s| {
                stopped(s, 1);
                new_task(s, 1, Running);
            },
            0,
            &[],
            &["v1.2"],
        ),
        (
            "start-first, new running: old stops, next batch",
            StartFirst,
            1,
            |s| new_task(s, 1, Running),
            0,
            &[2],
            &["v1.1"],
        ),
        (
            "start-first, old stopping does not hold the next batch",
            StartFirst,
            1,
            |s| {
                stopping(s, 1);
                new_task(s, 1, Running);
            },
            0,
            &[2],
            &[],
        ),
    ];
    for &(case, order, parallelism, setup, after, create, stop) in table {
        let mut sim = updating(order, parallelism);
        setup(&mut sim);
        let tasks: Vec<&Task> = sim.s.tasks.values().collect();
        let plan = reconcile(sim.svc(), &tasks, &sim.s.nodes, sim.now + after);
        let stopped: Vec<String> = plan
            .shutdown
            .iter()
            .map(|id| {
                let t = &sim.s.tasks[id];
                format!("{}.{}", t.spec.image, t.slot)
            })
            .collect();
        assert_eq!(
            (plan.create.as_slice(), stopped),
            (create, stop.iter().map(|s| s.to_string()).collect()),
            "{case}"
        );
    }
}

/// Slots whose old task is asked to stop but still holds its node, or whose new task is not
/// running yet.
fn busy_slots(s: &Store) -> BTreeSet<u64> {
    s.tasks
        .values()
        .filter(|t| {
            (t.spec.image == "v1" && t.desired_state > TaskState::Running && t.holds_resources())
                || (t.spec.image == "v2"
                    && t.desired_state == TaskState::Running
                    && t.status.state < TaskState::Running)
        })
        .map(|t| t.slot)
        .collect()
}

#[test]
fn a_slot_never_has_its_old_and_new_task_at_once_and_batches_wait_for_stops() {
    let cfg = |s: &mut ServiceSpec| {
        s.replicas = 10;
        s.update_config.parallelism = 2;
    };
    let mut sim = Sim::new(3, with("v1", cfg));
    // PID 1 ignores SIGTERM: each old container lives out its 3 s grace.
    sim.stop_ms = 3 * TICK;
    sim.put(with("v2", cfg));
    let started = sim.now;
    let mut most = 0;
    sim.run_rollout(400, |s| {
        for slot in 1..=10 {
            let old_alive = s
                .tasks
                .values()
                .any(|t| t.slot == slot && t.spec.image == "v1" && t.holds_resources());
            let new = s
                .tasks
                .values()
                .any(|t| t.slot == slot && t.spec.image == "v2");
            assert!(!(old_alive && new), "slot {slot}: old and new at once");
        }
        most = most.max(busy_slots(s).len());
    });
    assert_eq!(sim.state(), Some(UpdateState::Completed));
    assert_eq!(most, 2, "parallelism 2");
    let new: Vec<&Task> = sim
        .s
        .tasks
        .values()
        .filter(|t| t.spec.image == "v2")
        .collect();
    assert_eq!(new.len(), 10);
    // Every new task was created after its slot's old task was reported ended.
    for t in &new {
        let old = task_of(&sim.s, "v1", t.slot);
        assert_eq!(old.status.state, TaskState::Shutdown);
        assert!(t.created_at >= old.status.timestamp, "slot {}", t.slot);
    }
    let batches: BTreeMap<u64, usize> = new.iter().fold(BTreeMap::new(), |mut m, t| {
        *m.entry(t.created_at).or_default() += 1;
        m
    });
    assert_eq!(batches.values().copied().collect::<Vec<_>>(), [2; 5]);
    // Five batches, each waiting out its old containers' stop.
    let last = new.iter().map(|t| t.created_at).max().unwrap();
    assert!(last - started >= 5 * 3 * TICK, "{}", last - started);
}

#[test]
fn a_host_port_is_handed_over_on_one_node_without_a_conflict() {
    let cfg = |s: &mut ServiceSpec| {
        s.replicas = 1;
        s.ports = vec![PortConfig {
            target: 8080,
            published: Some(8080),
            protocol: Default::default(),
            mode: PortMode::Host,
        }];
    };
    let mut sim = Sim::new(1, with("v1", cfg));
    sim.stop_ms = 5 * TICK;
    sim.put(with("v2", cfg));
    sim.run_rollout(100, |s| {
        // The old task holds the port until it is seen ended; only then is the new one created
        // and placed on the same node.
        let holders = s.tasks.values().filter(|t| t.holds_resources()).count();
        assert!(holders <= 1, "{:?}", s.tasks);
        assert!(s
            .tasks
            .values()
            .all(|t| t.status.state != TaskState::Pending));
    });
    assert_eq!(sim.state(), Some(UpdateState::Completed));
    assert_eq!(task_of(&sim.s, "v2", 1).status.state, TaskState::Running);
}

#[test]
fn a_lost_node_does_not_hold_the_update() {
    let cfg = |s: &mut ServiceSpec| {
        s.replicas = 2;
        s.update_config.parallelism = 2;
    };
    let mut sim = Sim::new(2, with("v1", cfg));
    sim.stop_ms = 3 * TICK;
    let on_n1 = task_of(&sim.s, "v1", 1).node_id.clone().unwrap();
    // The node is cut off as the update starts: its agent reports nothing more.
    sim.silent.insert(on_n1.clone());
    sim.put(with("v2", cfg));
    sim.run(5, |_| {});
    // Declared down (as the dispatcher does after its heartbeat grace): its tasks are orphaned,
    // which ends them, and the update goes on on the other node.
    let now = sim.now;
    sim.apply(Command::NodeDown {
        id: on_n1.clone(),
        now,
    })
    .unwrap();
    sim.run_rollout(30, |_| {});
    assert_eq!(sim.state(), Some(UpdateState::Completed));
    let new: Vec<&Task> = live(&sim.s);
    assert_eq!(new.len(), 2);
    assert!(new
        .iter()
        .all(|t| t.spec.image == "v2" && t.node_id.as_deref() != Some(on_n1.as_str())));
}

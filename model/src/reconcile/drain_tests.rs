//! Moving tasks off drained (or no longer matching) nodes, in the simulated cluster
//! (`super::sim`): start-first, so a service never drops below its replicas where capacity
//! allows, and an unplaceable replacement leaves the old task running.

use std::collections::BTreeSet;

use super::sim::*;
use crate::spec::tests_support::spec;
use crate::spec::ServiceSpec;
use crate::store::{Availability, Command, StatusUpdate, Store, Task, TaskStatus};
use crate::task::TaskState;
use crate::update::{UpdateOrder, UpdateState};

const GIB: u64 = 1 << 30;

/// A node in `zone` with `memory` bytes of capacity.
fn zoned(id: &str, zone: &str, memory: u64) -> Command {
    super::sim::put_node(id, &[("zone", zone)], memory)
}

fn availability(id: &str, a: Availability) -> Command {
    Command::UpdateNode {
        id: id.into(),
        availability: Some(a),
        labels_add: Default::default(),
        labels_rm: Default::default(),
    }
}

fn relabel(id: &str, zone: &str) -> Command {
    Command::UpdateNode {
        id: id.into(),
        availability: None,
        labels_add: [("zone".to_string(), zone.to_string())].into(),
        labels_rm: Default::default(),
    }
}

/// A cluster of `nodes` (zone a, `memory` each; 0 is unlimited) running `sp`.
fn cluster(nodes: &[&str], memory: u64, sp: ServiceSpec) -> Sim {
    let mut sim = Sim::new(0, sp);
    for n in nodes {
        sim.apply(zoned(n, "a", memory)).unwrap();
    }
    sim.run(10, |_| {});
    sim
}

fn on(s: &Store, node: &str) -> Vec<String> {
    live(s)
        .iter()
        .filter(|t| t.node_id.as_deref() == Some(node))
        .map(|t| t.id.clone())
        .collect()
}

#[test]
fn moves_never_drop_below_replicas_when_capacity_allows() {
    struct Case {
        name: &'static str,
        change: Vec<Command>,
        /// Nodes that must end up with no task.
        emptied: Vec<&'static str>,
    }
    let cases = vec![
        Case {
            name: "drain one node",
            change: vec![availability("n1", Availability::Drain)],
            emptied: vec!["n1"],
        },
        Case {
            name: "drain two nodes at once",
            change: vec![
                availability("n1", Availability::Drain),
                availability("n2", Availability::Drain),
            ],
            emptied: vec!["n1", "n2"],
        },
        Case {
            name: "a node stops matching the constraints",
            change: vec![relabel("n3", "b")],
            emptied: vec!["n3"],
        },
    ];
    for c in cases {
        let mut sp = spec("web", 6);
        sp.placement.constraints = vec!["node.labels.zone==a".parse().unwrap()];
        let mut sim = cluster(&["n1", "n2", "n3", "n4"], 0, sp);
        assert_eq!(serving(&sim.s), 6, "{}", c.name);
        let moved: BTreeSet<String> = c.emptied.iter().flat_map(|n| on(&sim.s, n)).collect();
        assert!(!moved.is_empty(), "{}: spread puts tasks there", c.name);
        for cmd in c.change {
            sim.apply(cmd).unwrap();
        }
        let mut least = usize::MAX;
        sim.run(10, |s| least = least.min(serving(s)));
        assert_eq!(least, 6, "{}: dropped below the spec", c.name);
        for n in &c.emptied {
            assert!(on(&sim.s, n).is_empty(), "{}: {n} still has tasks", c.name);
        }
        assert_eq!((serving(&sim.s), live(&sim.s).len()), (6, 6), "{}", c.name);
        for id in &moved {
            assert_eq!(sim.s.tasks[id].desired_state, TaskState::Shutdown);
        }
        let slots: BTreeSet<u64> = live(&sim.s).iter().map(|t| t.slot).collect();
        assert_eq!(slots, (1..=6).collect(), "{}", c.name);
    }
}

#[test]
fn an_unplaceable_replacement_leaves_the_old_task_running() {
    // What frees the drained tasks in the end: room elsewhere, or the node back in service.
    type End = Box<dyn Fn(&mut Sim)>;
    let ends: Vec<(&str, End, bool)> = vec![
        (
            "a node with room joins",
            Box::new(|sim| sim.apply(zoned("n3", "a", 8 * GIB)).unwrap()),
            true,
        ),
        (
            "the node is made active again",
            Box::new(|sim| sim.apply(availability("n1", Availability::Active)).unwrap()),
            false,
        ),
    ];
    for (name, end, moves) in ends {
        let mut sp = spec("web", 4);
        sp.resources.reservations.memory = 2 * GIB;
        let mut sim = cluster(&["n1", "n2"], 4 * GIB, sp);
        assert_eq!(serving(&sim.s), 4);
        let old = on(&sim.s, "n1");
        assert_eq!(old.len(), 2);

        sim.apply(availability("n1", Availability::Drain)).unwrap();
        let mut least = usize::MAX;
        sim.run(10, |s| least = least.min(serving(s)));
        assert_eq!(least, 4, "{name}: no room elsewhere, nothing stops");
        assert_eq!(on(&sim.s, "n1"), old, "{name}");
        let waiting: Vec<&Task> = live(&sim.s)
            .into_iter()
            .filter(|t| t.node_id.is_none())
            .collect();
        assert_eq!(waiting.len(), 2, "{name}: one replacement per moved slot");
        let old_slots: BTreeSet<u64> = old.iter().map(|id| sim.s.tasks[id].slot).collect();
        for t in &waiting {
            assert!(old_slots.contains(&t.slot), "{name}");
            assert_eq!(t.status.state, TaskState::Pending);
            assert!(
                t.status.message.contains("insufficient memory"),
                "{name}: {}",
                t.status.message
            );
        }
        let waiting: Vec<String> = waiting.iter().map(|t| t.id.clone()).collect();

        end(&mut sim);
        let mut least = usize::MAX;
        sim.run(10, |s| least = least.min(serving(s)));
        assert_eq!(least, 4, "{name}");
        assert_eq!((serving(&sim.s), live(&sim.s).len()), (4, 4), "{name}");
        if moves {
            assert!(on(&sim.s, "n1").is_empty(), "{name}");
            assert!(waiting.iter().all(|id| sim.s.tasks[id].node_id.is_some()));
        } else {
            // Back in service: the old tasks stay, the replacements are dropped.
            assert_eq!(on(&sim.s, "n1"), old, "{name}");
            assert!(waiting.iter().all(|id| sim
                .s
                .tasks
                .get(id)
                .is_none_or(|t| t.desired_state == TaskState::Shutdown)));
        }
    }
}

#[test]
fn drain_during_a_rollout() {
    for order in [UpdateOrder::StopFirst, UpdateOrder::StartFirst] {
        let cfg = |s: &mut ServiceSpec| {
            s.update_config.parallelism = 2;
            s.update_config.order = order;
        };
        let mut sim = Sim::new(3, with("v1", cfg));
        sim.put(with("v2", cfg));
        sim.run(3, |_| {});
        assert_eq!(sim.state(), Some(UpdateState::Updating), "{order:?}");
        sim.apply(availability("n1", Availability::Drain)).unwrap();
        let floor = match order {
            UpdateOrder::StopFirst => 8,
            UpdateOrder::StartFirst => 10,
        };
        let mut least = usize::MAX;
        sim.run_rollout(200, |s| least = least.min(serving(s)));
        assert!(least >= floor, "{order:?}: {least} serving at worst");
        sim.run(5, |_| {});
        assert_eq!(sim.state(), Some(UpdateState::Completed), "{order:?}");
        assert!(on(&sim.s, "n1").is_empty(), "{order:?}");
        assert_eq!(serving(&sim.s), 10, "{order:?}");
        assert!(live(&sim.s).iter().all(|t| t.spec.image == "v2"));
    }
}

#[test]
fn a_failed_replacement_is_retried_per_the_restart_policy_while_the_old_task_serves() {
    let mut sp = spec("web", 1);
    sp.restart.delay = 3 * TICK;
    let mut sim = cluster(&["n1", "n2"], 0, sp);
    let old = live(&sim.s)[0].clone();
    let from = old.node_id.clone().unwrap();
    sim.apply(availability(&from, Availability::Drain)).unwrap();
    sim.run(1, |_| {});
    let repl = live(&sim.s)
        .into_iter()
        .find(|t| t.id != old.id)
        .expect("a replacement")
        .clone();
    assert!(repl.status.state < TaskState::Running);
    let now = sim.now;
    sim.apply(Command::UpdateStatus {
        updates: vec![StatusUpdate {
            task_id: repl.id.clone(),
            node_id: repl.node_id.clone().unwrap(),
            status: TaskStatus {
                state: TaskState::Rejected,
                message: String::new(),
                error: "no space left on device".into(),
                container_id: String::new(),
                exit_code: None,
                timestamp: now,
            },
        }],
    })
    .unwrap();
    // Within the restart delay: no new replacement, the old task keeps serving.
    sim.run(2, |_| panic!("nothing to do within the delay"));
    assert_eq!(serving(&sim.s), 1);
    assert_eq!(sim.s.tasks.len(), 2);
    assert_eq!(sim.s.tasks[&old.id].desired_state, TaskState::Running);
    // After it: a new replacement, and the old task stops once that one runs.
    let mut least = usize::MAX;
    sim.run(5, |s| least = least.min(serving(s)));
    assert_eq!(least, 1);
    assert_eq!(sim.s.tasks.len(), 3);
    assert_eq!(sim.s.tasks[&old.id].desired_state, TaskState::Shutdown);
    assert!(on(&sim.s, &from).is_empty());
    assert_eq!(serving(&sim.s), 1);
}

//! Rebalancing carried out by the control loop (`crate::rebalance`), on the simulated cluster:
//! a rebalance is a rolling update of the moved slots (parallelism respected, stop-first), it
//! completes with the spread it reached, `rebalance: auto` starts one when a node comes back,
//! and per-slot volume pins keep their slots where they are.

use std::collections::BTreeMap;

use super::sim::{live, put_node, serving, with, Sim};
use crate::rebalance::{plan_service, start, RebalanceMode};
use crate::store::{Command, Store};
use crate::task::TaskState;

fn spread(s: &Store) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in live(s)
        .into_iter()
        .filter(|t| t.status.state == TaskState::Running)
    {
        *m.entry(t.node_id.clone().unwrap_or_default()).or_default() += 1;
    }
    m
}

fn four(f: impl FnOnce(&mut crate::ServiceSpec)) -> crate::ServiceSpec {
    with("app:1", |sp| {
        sp.replicas = 4;
        f(sp);
    })
}

#[test]
fn rebalance_is_a_rolling_update_of_the_moved_slots() {
    let mut sim = Sim::new(1, four(|_| {}));
    assert_eq!(spread(&sim.s), [("n1".to_string(), 4)].into());
    sim.apply(put_node("n2", &[], 0)).unwrap();
    sim.run(5, |_| {});
    assert_eq!(
        spread(&sim.s),
        [("n1".to_string(), 4)].into(),
        "manual: no move"
    );

    let kept = |s: &Store| -> Vec<String> {
        let mut ids: Vec<String> = live(s)
            .iter()
            .filter(|t| t.slot <= 2)
            .map(|t| t.id.clone())
            .collect();
        ids.sort();
        ids
    };
    let first = kept(&sim.s);
    let planned = plan_service(&sim.s, sim.svc()).unwrap();
    let cmd = start(&sim.s, sim.svc(), &planned, "rctl rebalance", sim.now).unwrap();
    sim.apply(cmd).unwrap();
    let r = sim.svc().rebalance.clone().unwrap();
    assert_eq!(r.slots, vec![3, 4]);
    assert_eq!(
        r.message,
        "rctl rebalance: moving slots 3, 4 (h-n1 4 → 2, h-n2 0 → 2)"
    );
    // Parallelism 1, stop-first: at most one slot is down at any time.
    let mut lowest = usize::MAX;
    for _ in 0..30 {
        sim.run(1, |s| lowest = lowest.min(serving(s)));
        if sim.svc().rebalance.as_ref().unwrap().completed_at.is_some() {
            break;
        }
    }
    assert_eq!(lowest, 3, "one slot at a time");
    let r = sim.svc().rebalance.clone().unwrap();
    assert!(r.completed_at.is_some(), "{r:?}");
    assert!(
        r.message.ends_with("completed: h-n1 2, h-n2 2"),
        "{}",
        r.message
    );
    assert_eq!(
        spread(&sim.s),
        [("n1".to_string(), 2), ("n2".to_string(), 2)].into()
    );
    // Slots 1 and 2 kept their first tasks; nothing else moves afterwards.
    sim.run(5, |_| {});
    assert_eq!(kept(&sim.s), first);
    assert_eq!(live(&sim.s).len(), 4);
    assert!(plan_service(&sim.s, sim.svc()).unwrap().moves.is_empty());
}

#[test]
fn auto_rebalances_when_a_node_comes_back() {
    let mut sim = Sim::new(2, four(|sp| sp.rebalance = RebalanceMode::Auto));
    assert_eq!(
        spread(&sim.s),
        [("n1".to_string(), 2), ("n2".to_string(), 2)].into()
    );
    let now = sim.now;
    sim.apply(Command::NodeDown {
        id: "n2".into(),
        now,
    })
    .unwrap();
    sim.run(10, |_| {});
    assert_eq!(spread(&sim.s), [("n1".to_string(), 4)].into());
    assert_eq!(
        sim.svc().rebalance.as_ref().unwrap().nodes_seen,
        vec!["n1".to_string()]
    );
    // n2's agent registers again: the service spreads without being asked.
    sim.apply(put_node("n2", &[], 0)).unwrap();
    sim.run(20, |_| {});
    assert_eq!(
        spread(&sim.s),
        [("n1".to_string(), 2), ("n2".to_string(), 2)].into()
    );
    let r = sim.svc().rebalance.clone().unwrap();
    assert!(
        r.message
            .starts_with("auto, node h-n2 ready: moving slots 3, 4"),
        "{}",
        r.message
    );
    assert!(r.completed_at.is_some());
}

#[test]
fn pinned_slots_and_busy_services_do_not_move() {
    let mut sim = Sim::new(
        1,
        four(|sp| {
            sp.mounts = vec![crate::volume::Mount {
                typ: crate::volume::MountType::Volume,
                source: "d-{{.Task.Slot}}".into(),
                target: "/d".into(),
                readonly: false,
                tmpfs_size: 0,
                nocopy: false,
            }];
        }),
    );
    sim.apply(put_node("n2", &[], 0)).unwrap();
    sim.run(3, |_| {});
    let planned = plan_service(&sim.s, sim.svc()).unwrap();
    assert!(planned.moves.is_empty(), "{planned:?}");
    assert!(start(&sim.s, sim.svc(), &planned, "x", sim.now).is_none());

    // Not every replica runs: refused, saying so.
    let mut sim = Sim::new(1, four(|_| {}));
    sim.put(four(|sp| sp.replicas = 5));
    let e = plan_service(&sim.s, sim.svc()).unwrap_err();
    assert!(e.to_string().contains("runs 4 of 5 replicas"), "{e}");
}

#[test]
fn auto_rebalances_when_a_node_joins_and_binpack_is_refused() {
    let mut sim = Sim::new(1, four(|sp| sp.rebalance = RebalanceMode::Auto));
    assert_eq!(spread(&sim.s), [("n1".to_string(), 4)].into());
    sim.apply(put_node("n2", &[], 0)).unwrap();
    sim.run(20, |_| {});
    assert_eq!(
        spread(&sim.s),
        [("n1".to_string(), 2), ("n2".to_string(), 2)].into()
    );

    let mut sim = Sim::new(
        1,
        four(|sp| sp.placement.strategy = crate::spec::Strategy::Binpack),
    );
    sim.apply(put_node("n2", &[], 0)).unwrap();
    let e = plan_service(&sim.s, sim.svc()).unwrap_err();
    assert!(e.to_string().contains("binpack"), "{e}");
}

//! Scoped passes (`plan_pass_in` over `touched`): which services a change concerns, and, in the
//! simulated cluster (`super::sim`), that every scoped pass the control loop would make decides
//! exactly what a pass over every service decides.

use std::collections::BTreeSet;

use super::sim::*;
use super::{plan_pass, plan_pass_in, touched, Scope};
use crate::spec::tests_support::spec;
use crate::spec::{ServiceMode, ServiceSpec};
use crate::store::{Availability, Command, StatusUpdate, Store};
use crate::task::TaskState;

fn put(sim: &mut Sim, id: &str, sp: ServiceSpec) {
    let now = sim.now;
    sim.apply(Command::PutService {
        id: id.into(),
        spec: Box::new(sp),
        now,
    })
    .expect("service");
}

/// Two nodes, `web` (2) and `api` (1) running.
fn two_services() -> Sim {
    let mut sim = Sim::new(2, spec("web", 2));
    put(&mut sim, "svc-api", spec("api", 1));
    sim.run(5, |_| {});
    assert_eq!(serving(&sim.s), 3);
    sim
}

fn names(v: &[&str]) -> Scope {
    Scope::Services(v.iter().map(|s| s.to_string()).collect())
}

fn task_of<'a>(s: &'a Store, service: &str) -> &'a crate::store::Task {
    s.tasks
        .values()
        .find(|t| t.service_name == service)
        .expect("a task")
}

#[test]
fn a_change_concerns_the_services_of_the_tasks_it_touched_or_all() {
    type Change = fn(&Store) -> Command;
    let table: [(&str, Change, Scope); 9] = [
        ("nothing", |_| Command::Batch(vec![]), names(&[])),
        (
            "a status report",
            |s| {
                let t = task_of(s, "api");
                Command::UpdateStatus {
                    updates: vec![StatusUpdate::of(
                        t,
                        t.node_id.as_deref().expect("placed"),
                        TaskState::Failed,
                        9,
                    )],
                }
            },
            names(&["api"]),
        ),
        (
            "a desired state",
            |s| Command::SetDesired {
                now: 9,
                updates: vec![(task_of(s, "web").id.clone(), TaskState::Shutdown)],
            },
            names(&["web"]),
        ),
        (
            "a forgotten task",
            |s| Command::DeleteTasks {
                ids: vec![task_of(s, "web").id.clone()],
            },
            names(&["web"]),
        ),
        (
            "a node lost (its tasks orphaned)",
            |_| Command::NodeDown {
                id: "n1".into(),
                now: 9,
            },
            Scope::All,
        ),
        (
            "a node drained",
            |_| Command::UpdateNode {
                id: "n2".into(),
                availability: Some(Availability::Drain),
                labels_add: Default::default(),
                labels_rm: Default::default(),
            },
            Scope::All,
        ),
        (
            "a spec",
            |_| Command::PutService {
                id: "svc-api".into(),
                spec: Box::new(spec("api", 3)),
                now: 9,
            },
            names(&["api"]),
        ),
        (
            "a service removed (its tasks asked to stop)",
            |_| Command::RemoveService { name: "api".into() },
            names(&["api"]),
        ),
        (
            "a new service",
            |_| Command::PutService {
                id: "svc-db".into(),
                spec: Box::new(spec("db", 1)),
                now: 9,
            },
            names(&["db"]),
        ),
    ];
    for (what, change, want) in table {
        let mut sim = two_services();
        let old = sim.s.clone();
        let cmd = change(&sim.s);
        sim.apply(cmd).expect(what);
        assert_eq!(touched(&old, &sim.s), want, "{what}");
    }
}

#[test]
fn a_scoped_pass_leaves_services_out_of_scope_alone() {
    // `api` misses a replica, but only `web` is in scope: nothing is made for `api` (the
    // control loop's full passes are what see it).
    let mut sim = two_services();
    let now = sim.now;
    sim.apply(Command::PutService {
        id: "svc-api".into(),
        spec: Box::new(spec("api", 2)),
        now,
    })
    .expect("api");
    let mut n = 0;
    let mut ids = || {
        n += 1;
        format!("x{n}")
    };
    assert_eq!(plan_pass_in(&sim.s, &names(&["web"]), now, &mut ids), None);
    assert!(plan_pass_in(&sim.s, &names(&["api"]), now, &mut ids).is_some());
    assert!(plan_pass(&sim.s, now, &mut ids).is_some());
}

/// Passes until nothing changes, at the sim's current time, as the control loop makes them:
/// the first over every service when `last` is `None` (time moved since), then each over what
/// changed since the store the previous pass planned on. Each scoped pass is checked against
/// a pass over every service, ids included.
fn settle_scoped(sim: &mut Sim, last: &mut Option<Store>, scoped_passes: &mut usize) {
    for _ in 0..20 {
        let scope = last.as_ref().map_or(Scope::All, |old| touched(old, &sim.s));
        let (mut a, mut b) = (sim.ids, sim.ids);
        let full = plan_pass(&sim.s, sim.now, &mut || {
            a += 1;
            format!("t{a:03}")
        });
        let scoped = plan_pass_in(&sim.s, &scope, sim.now, &mut || {
            b += 1;
            format!("t{b:03}")
        });
        if scope != Scope::All {
            *scoped_passes += 1;
        }
        assert_eq!(scoped, full, "scope {scope:?}");
        sim.ids = b;
        *last = Some(sim.s.clone());
        match scoped {
            Some(cmd) => sim.apply(cmd).expect("plan applies"),
            None => return,
        }
    }
    panic!("control loop did not settle");
}

/// `ticks` rounds of: a full pass and scoped passes; the agents step at the same time; scoped
/// passes again; then time moves.
fn run_scoped(sim: &mut Sim, ticks: usize, scoped_passes: &mut usize) {
    for _ in 0..ticks {
        let mut last = None;
        settle_scoped(sim, &mut last, scoped_passes);
        sim.agents(&mut |_| {});
        settle_scoped(sim, &mut last, scoped_passes);
        sim.now += TICK;
    }
}

#[test]
fn scoped_passes_decide_what_full_passes_decide_through_a_cluster_s_life() {
    // Four services on three nodes: a crash-looping one (restarts with back-off), a global
    // one, a rolling update, a scale, a node lost and a node drained, a service removed.
    let mut sim = Sim::new(3, spec("web", 4));
    let mut passes = 0;
    put(&mut sim, "svc-api", spec("api", 2));
    let mut crashy = spec("crashy", 2);
    crashy.image = CRASHY.into();
    put(&mut sim, "svc-crashy", crashy);
    let mut mon = spec("mon", 0);
    mon.mode = ServiceMode::Global;
    put(&mut sim, "svc-mon", mon);
    run_scoped(&mut sim, 8, &mut passes);

    let mut v2 = spec("web", 4);
    v2.image = "busybox:2".into();
    put(&mut sim, "svc", v2);
    run_scoped(&mut sim, 15, &mut passes);
    put(&mut sim, "svc-api", spec("api", 5));
    run_scoped(&mut sim, 5, &mut passes);
    let now = sim.now;
    sim.apply(Command::NodeDown {
        id: "n1".into(),
        now,
    })
    .expect("n1 down");
    run_scoped(&mut sim, 5, &mut passes);
    sim.apply(Command::UpdateNode {
        id: "n2".into(),
        availability: Some(Availability::Drain),
        labels_add: Default::default(),
        labels_rm: Default::default(),
    })
    .expect("drain n2");
    run_scoped(&mut sim, 10, &mut passes);
    sim.apply(Command::RemoveService {
        name: "crashy".into(),
    })
    .expect("rm crashy");
    run_scoped(&mut sim, 5, &mut passes);

    assert!(
        passes > 50,
        "the scoped path was exercised: {passes} passes"
    );
    // Everything ended where full passes take it: web v2 and api on n3 only.
    let live = live(&sim.s);
    let on: BTreeSet<&str> = live.iter().filter_map(|t| t.node_id.as_deref()).collect();
    assert_eq!(on, BTreeSet::from(["n3"]), "{live:?}");
    let web: Vec<_> = live.iter().filter(|t| t.service_name == "web").collect();
    assert_eq!(web.len(), 4);
    assert!(web.iter().all(|t| t.spec.image == "busybox:2"));
    assert_eq!(live.iter().filter(|t| t.service_name == "api").count(), 5);
    assert!(live.iter().all(|t| t.service_name != "crashy"));
}

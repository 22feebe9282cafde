//! `depends_on` over the simulated cluster (`sim`): a dependent's tasks are placed only once its
//! dependency is started, healthy or completed, and otherwise stay pending with the reason.

use super::sim::{Sim, BAD, DONE};
use crate::depends::{Condition, Dependency};
use crate::spec::tests_support::spec;
use crate::spec::{ServiceMode, ServiceSpec};
use crate::store::{Command, Store};
use crate::task::TaskState;

fn dependency(image: &str, job: bool, check: bool) -> ServiceSpec {
    let mut sp = spec("db", 1);
    sp.image = image.into();
    if job {
        sp.mode = ServiceMode::ReplicatedJob;
        sp.restart.delay = 1000;
    }
    if check {
        sp.healthcheck = Some(
            serde_json::from_value(serde_json::json!({"exec": ["true"], "interval": "1s"}))
                .unwrap(),
        );
    }
    sp
}

fn web(on: &str, condition: Condition, required: bool) -> ServiceSpec {
    let mut sp = spec("web", 2);
    sp.depends_on = vec![Dependency {
        service: on.into(),
        condition,
        required,
    }];
    sp
}

fn put(sim: &mut Sim, id: &str, sp: ServiceSpec) {
    let now = sim.now;
    sim.apply(Command::PutService {
        id: id.into(),
        spec: Box::new(sp),
        now,
    })
    .unwrap();
}

fn web_tasks(s: &Store) -> Vec<&crate::Task> {
    s.tasks
        .values()
        .filter(|t| t.service_name == "web")
        .collect()
}

#[test]
fn dependents_wait_for_their_condition_table() {
    struct Case {
        name: &'static str,
        /// The dependency (`None`: no such service).
        db: Option<ServiceSpec>,
        on: &'static str,
        condition: Condition,
        required: bool,
        /// Web's tasks run in the end; otherwise they stay pending with this reason.
        runs: bool,
        reason: &'static str,
    }
    use Condition::*;
    let cases = [
        Case {
            name: "started",
            db: Some(dependency("ok:1", false, false)),
            on: "db",
            condition: Started,
            required: true,
            runs: true,
            reason: "",
        },
        Case {
            name: "healthy",
            db: Some(dependency("ok:1", false, true)),
            on: "db",
            condition: Healthy,
            required: true,
            runs: true,
            reason: "",
        },
        Case {
            name: "never healthy",
            db: Some(dependency(BAD, false, true)),
            on: "db",
            condition: Healthy,
            required: true,
            runs: false,
            reason: "waiting for db: not healthy",
        },
        Case {
            name: "never started",
            db: Some(dependency(BAD, false, false)),
            on: "db",
            condition: Started,
            required: true,
            runs: false,
            reason: "waiting for db: not started",
        },
        Case {
            name: "job completed",
            db: Some(dependency(DONE, true, false)),
            on: "db",
            condition: CompletedSuccessfully,
            required: true,
            runs: true,
            reason: "",
        },
        Case {
            name: "job never completes",
            db: Some(dependency(BAD, true, false)),
            on: "db",
            condition: CompletedSuccessfully,
            required: true,
            runs: false,
            reason: "waiting for db: ",
        },
        Case {
            name: "missing, required",
            db: None,
            on: "ghost",
            condition: Started,
            required: true,
            runs: false,
            reason: "waiting for ghost: no such service",
        },
        Case {
            name: "missing, optional",
            db: None,
            on: "ghost",
            condition: Healthy,
            required: false,
            runs: true,
            reason: "",
        },
    ];
    for c in cases {
        let mut sim = Sim::new(3, spec("idle", 0));
        let web_spec = web(c.on, c.condition, c.required);
        // Declared together, dependent first: the order of declaration does not matter.
        put(&mut sim, "web", web_spec.clone());
        if let Some(db) = c.db.clone() {
            put(&mut sim, "db", db);
        }
        let mut placed_too_early = None;
        sim.run(30, |s| {
            let placed = web_tasks(s).iter().any(|t| t.node_id.is_some());
            if placed && placed_too_early.is_none() {
                // The first store where web is placed: its dependency held then.
                placed_too_early = Some(crate::depends::waiting(s, &web_spec));
            }
        });
        let tasks = web_tasks(&sim.s);
        assert_eq!(tasks.len(), 2, "{}", c.name);
        if c.runs {
            assert_eq!(placed_too_early, Some(None), "{}", c.name);
            assert!(
                tasks.iter().all(|t| t.status.state == TaskState::Running),
                "{}: {tasks:?}",
                c.name
            );
        } else {
            assert_eq!(placed_too_early, None, "{}: placed", c.name);
            for t in tasks {
                assert!(t.node_id.is_none(), "{}", c.name);
                assert!(
                    t.status.message.starts_with(c.reason),
                    "{}: {:?}",
                    c.name,
                    t.status.message
                );
            }
        }
    }
}

#[test]
fn a_dependent_starts_once_its_dependency_appears_and_is_healthy() {
    let mut sim = Sim::new(2, spec("idle", 0));
    let web_spec = web("db", Condition::Healthy, true);
    put(&mut sim, "web", web_spec);
    sim.run(5, |_| {});
    assert!(web_tasks(&sim.s)
        .iter()
        .all(|t| t.status.message == "waiting for db: no such service"));
    put(&mut sim, "db", dependency("ok:1", false, true));
    sim.run(1, |_| {});
    // db is not running yet: web now waits for its health.
    assert!(web_tasks(&sim.s)
        .iter()
        .all(|t| t.node_id.is_none() && t.status.message == "waiting for db: not healthy"));
    sim.run(10, |_| {});
    assert!(web_tasks(&sim.s)
        .iter()
        .all(|t| t.status.state == TaskState::Running));
}

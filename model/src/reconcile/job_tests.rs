//! Jobs over the simulated cluster (`sim`): parallelism, completions, retries, global jobs
//! following nodes, iterations.

use std::collections::{BTreeMap, BTreeSet};

use super::sim::{put_node, Sim, BAD, CRASHY, DONE, FLAKY, TICK};
use crate::job::{progress, JobState, Progress};
use crate::spec::tests_support::spec;
use crate::spec::{RestartCondition, ServiceMode, ServiceSpec};
use crate::store::{Availability, Command, Store, Task};
use crate::task::TaskState;

fn job(image: &str, f: impl FnOnce(&mut ServiceSpec)) -> ServiceSpec {
    let mut sp = spec("batch", 1);
    sp.image = image.into();
    sp.mode = ServiceMode::ReplicatedJob;
    sp.restart.delay = 1000;
    f(&mut sp);
    sp
}

fn prog(s: &Store) -> Progress {
    let svc = s.services.values().next().unwrap();
    let tasks: Vec<&Task> = s.tasks.values().collect();
    progress(svc, &tasks, &s.nodes).unwrap()
}

/// Tasks of the service's current iteration.
fn current(s: &Store) -> Vec<&Task> {
    let v = s.services.values().next().unwrap().spec_version;
    s.tasks.values().filter(|t| t.spec_version == v).collect()
}

/// Tasks that may be running a container: placed and not observed ended.
fn containers(s: &Store) -> usize {
    s.tasks.values().filter(|t| t.holds_resources()).count()
}

/// A cluster of `nodes` that starts with an empty service, then gets `sp`: the job's whole life
/// is watched.
fn start(nodes: usize, sp: ServiceSpec) -> Sim {
    let mut sim = Sim::new(nodes, spec("batch", 0));
    sim.put(sp);
    sim
}

#[test]
fn replicated_jobs_table() {
    struct Case {
        name: &'static str,
        spec: ServiceSpec,
        /// Progress once settled.
        want: Progress,
        /// Tasks created in all.
        created: usize,
        /// Most containers at once.
        max_at_once: usize,
    }
    let p = |state, completed, total, failed| Progress {
        completed,
        total,
        running: 0,
        failed,
        state,
    };
    let cases = vec![
        Case {
            name: "five completions two at a time",
            spec: job(DONE, |s| {
                s.completions = Some(5);
                s.parallelism = Some(2);
            }),
            want: p(JobState::Complete, 5, 5, 0),
            created: 5,
            max_at_once: 2,
        },
        Case {
            name: "defaults: parallelism 1, completions = parallelism",
            spec: job(DONE, |_| {}),
            want: p(JobState::Complete, 1, 1, 0),
            created: 1,
            max_at_once: 1,
        },
        Case {
            name: "completions default to parallelism",
            spec: job(DONE, |s| s.parallelism = Some(3)),
            want: p(JobState::Complete, 3, 3, 0),
            created: 3,
            max_at_once: 3,
        },
        Case {
            name: "parallelism above completions runs only completions",
            spec: job(DONE, |s| {
                s.completions = Some(2);
                s.parallelism = Some(4);
            }),
            want: p(JobState::Complete, 2, 2, 0),
            created: 2,
            max_at_once: 2,
        },
        Case {
            name: "failures are retried (default policy: any acts as on-failure)",
            spec: job(FLAKY, |s| {
                s.completions = Some(3);
                s.parallelism = Some(2);
            }),
            want: p(JobState::Complete, 3, 3, 6),
            created: 9,
            max_at_once: 2,
        },
        Case {
            name: "on-failure with max_attempts 2 is enough for two failures",
            spec: job(FLAKY, |s| {
                s.restart.condition = RestartCondition::OnFailure;
                s.restart.max_attempts = 2;
            }),
            want: p(JobState::Complete, 1, 1, 2),
            created: 3,
            max_at_once: 1,
        },
        Case {
            name: "max_attempts exhausted fails the job; no further slot starts",
            spec: job(CRASHY, |s| {
                s.completions = Some(3);
                s.restart.max_attempts = 1;
            }),
            want: p(JobState::Failed, 0, 3, 2),
            created: 2,
            max_at_once: 1,
        },
        Case {
            name: "restart none: one failure fails the job (rctl run)",
            spec: job(CRASHY, |s| s.restart.condition = RestartCondition::None),
            want: p(JobState::Failed, 0, 1, 1),
            created: 1,
            max_at_once: 1,
        },
        Case {
            name: "a rejected task is a failure too",
            spec: job(BAD, |s| s.restart.condition = RestartCondition::None),
            want: p(JobState::Failed, 0, 1, 1),
            created: 1,
            max_at_once: 1,
        },
    ];
    for c in cases {
        let mut sim = start(3, c.spec);
        let mut max = 0;
        let mut created = BTreeSet::new();
        sim.run(80, |s| {
            max = max.max(containers(s));
            created.extend(s.tasks.keys().cloned());
        });
        assert_eq!(prog(&sim.s), c.want, "{}", c.name);
        assert_eq!(created.len(), c.created, "{}", c.name);
        assert_eq!(max, c.max_at_once, "{}", c.name);
        // Each slot has at most one task that exited 0, and no other task meant to run.
        let mut done: BTreeMap<u64, usize> = BTreeMap::new();
        for t in current(&sim.s) {
            if t.status.state == TaskState::Complete {
                *done.entry(t.slot).or_default() += 1;
            }
        }
        assert!(done.values().all(|n| *n == 1), "{}: {done:?}", c.name);
        // Settled for good: more time creates nothing and restarts nothing.
        let before = sim.s.tasks.clone();
        sim.run(30, |_| {});
        assert_eq!(sim.s.tasks.len(), before.len(), "{}", c.name);
        assert!(
            sim.s.tasks.keys().all(|id| before.contains_key(id)),
            "{}",
            c.name
        );
    }
}

#[test]
fn parallelism_is_respected_while_retrying() {
    // Retries keep their slot's share: never more than two containers, and the slots are
    // started lowest first.
    let mut sim = start(
        2,
        job(FLAKY, |s| {
            s.completions = Some(4);
            s.parallelism = Some(2);
        }),
    );
    let mut busy_slots_max = 0;
    sim.run(120, |s| {
        let busy: BTreeSet<u64> = s
            .tasks
            .values()
            .filter(|t| t.holds_resources())
            .map(|t| t.slot)
            .collect();
        busy_slots_max = busy_slots_max.max(busy.len());
    });
    assert_eq!(busy_slots_max, 2);
    assert_eq!(prog(&sim.s).state, JobState::Complete);
    assert_eq!(prog(&sim.s).completed, 4);
    let first: Vec<u64> = {
        let mut t: Vec<&Task> = sim.s.tasks.values().collect();
        t.sort_by_key(|t| (t.created_at, t.slot));
        t.iter().take(2).map(|t| t.slot).collect()
    };
    assert_eq!(first, [1, 2]);
}

#[test]
fn progress_while_running() {
    let mut sim = start(
        2,
        job(DONE, |s| {
            s.completions = Some(3);
            s.parallelism = Some(2);
        }),
    );
    sim.run(1, |_| {});
    let p = prog(&sim.s);
    assert_eq!(
        (p.state, p.completed, p.total, p.running),
        (JobState::Running, 0, 3, 2)
    );
    assert_eq!(p.to_string(), "running: 0/3 completed, 2 running, 0 failed");
    sim.run(4, |_| {});
    let p = prog(&sim.s);
    assert_eq!((p.completed, p.running), (2, 1), "{p}");
}

fn global_job(image: &str) -> ServiceSpec {
    job(image, |s| s.mode = ServiceMode::GlobalJob)
}

/// Completed tasks by node.
fn done_by_node(s: &Store) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in current(s) {
        if t.status.state == TaskState::Complete {
            m.entry(t.node_id.clone().unwrap())
                .or_default()
                .push(t.id.clone());
        }
    }
    m
}

#[test]
fn global_job_runs_once_per_node_and_on_nodes_that_join() {
    let mut sim = start(2, global_job(DONE));
    let mut max_per_node = 0;
    sim.run(10, |s| {
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for t in s.tasks.values().filter(|t| t.holds_resources()) {
            *per.entry(t.node_id.as_deref().unwrap()).or_default() += 1;
        }
        max_per_node = max_per_node.max(per.values().copied().max().unwrap_or(0));
    });
    assert_eq!(max_per_node, 1);
    let p = prog(&sim.s);
    assert_eq!((p.state, p.completed, p.total), (JobState::Complete, 2, 2));
    let first = done_by_node(&sim.s);
    assert_eq!(first.keys().collect::<Vec<_>>(), ["n1", "n2"]);
    assert!(first.values().all(|v| v.len() == 1));

    // A node joins: it gets one task; the others are not run again.
    sim.apply(put_node("n3", &[], 0)).unwrap();
    sim.settle(&mut |_| {});
    assert_eq!(prog(&sim.s).state, JobState::Running);
    assert_eq!(prog(&sim.s).total, 3);
    sim.run(10, |_| {});
    let after = done_by_node(&sim.s);
    assert_eq!(after.keys().collect::<Vec<_>>(), ["n1", "n2", "n3"]);
    assert_eq!(after["n1"], first["n1"]);
    assert_eq!(after["n2"], first["n2"]);
    assert_eq!(sim.s.tasks.len(), 3);
    let p = prog(&sim.s);
    assert_eq!((p.state, p.completed, p.total), (JobState::Complete, 3, 3));
}

#[test]
fn global_job_retries_on_its_node_and_skips_paused_nodes() {
    let mut sim = Sim::new(3, spec("batch", 0));
    sim.apply(Command::UpdateNode {
        id: "n3".into(),
        availability: Some(Availability::Pause),
        labels_add: Default::default(),
        labels_rm: vec![],
    })
    .unwrap();
    sim.put(global_job(FLAKY));
    sim.run(40, |_| {});
    let p = prog(&sim.s);
    assert_eq!(
        (p.state, p.completed, p.total, p.failed),
        (JobState::Complete, 2, 2, 4)
    );
    // Every run of a node's slot ran on that node.
    assert!(sim
        .s
        .tasks
        .values()
        .all(|t| t.node_id == t.target_node && t.node_id.as_deref() != Some("n3")));
}

#[test]
fn re_apply_unchanged_is_a_no_op_and_changed_runs_a_new_iteration() {
    let sp = job(DONE, |s| {
        s.completions = Some(2);
        s.parallelism = Some(2);
    });
    let mut sim = start(2, sp.clone());
    sim.run(10, |_| {});
    assert_eq!(prog(&sim.s).state, JobState::Complete);
    let version = sim.svc().spec_version;
    let first: BTreeSet<String> = sim.s.tasks.keys().cloned().collect();

    sim.put(sp.clone());
    sim.run(10, |_| {});
    assert_eq!(sim.svc().spec_version, version);
    assert_eq!(sim.s.tasks.keys().cloned().collect::<BTreeSet<_>>(), first);

    // Changing only the job's counts is a change too: a new iteration, of three.
    let mut changed = sp;
    changed.completions = Some(3);
    sim.put(changed);
    assert_ne!(sim.svc().spec_version, version);
    assert_eq!(sim.svc().update_status, None, "jobs have no rollout");
    sim.settle(&mut |_| {});
    let p = prog(&sim.s);
    assert_eq!((p.state, p.completed, p.total), (JobState::Running, 0, 3));
    sim.run(10, |_| {});
    let p = prog(&sim.s);
    assert_eq!((p.state, p.completed, p.total), (JobState::Complete, 3, 3));
    // The old iteration's tasks are gone, none of the new ones is old.
    let now: BTreeSet<String> = sim.s.tasks.keys().cloned().collect();
    assert!(now.is_disjoint(&first), "{now:?}");
    assert_eq!(now.len(), 3);
}

#[test]
fn a_new_iteration_stops_the_old_tasks_first() {
    // An iteration still running is replaced: its tasks are stopped, and a slot's new task is
    // created only once the old one has ended (here after 3 s of grace).
    let sp = job(super::sim::CRASHY, |s| {
        s.completions = Some(2);
        s.parallelism = Some(2);
        s.restart.condition = RestartCondition::None;
    });
    let mut sim = start(2, sp.clone());
    sim.stop_ms = 3 * TICK;
    sim.run(1, |_| {});
    let old: BTreeSet<String> = sim.s.tasks.keys().cloned().collect();
    assert_eq!(old.len(), 2);
    let mut changed = sp;
    changed.image = DONE.into();
    sim.put(changed);
    let mut bad = Vec::new();
    sim.run(15, |s| {
        for t in s.tasks.values().filter(|t| !old.contains(&t.id)) {
            let same_slot_old_alive = s
                .tasks
                .values()
                .any(|o| old.contains(&o.id) && o.slot == t.slot && o.holds_resources());
            if same_slot_old_alive {
                bad.push(t.id.clone());
            }
        }
    });
    assert!(bad.is_empty(), "{bad:?}");
    let p = prog(&sim.s);
    assert_eq!((p.state, p.completed, p.total), (JobState::Complete, 2, 2));
}

#[test]
fn a_drained_node_s_job_task_moves_without_counting_as_an_attempt() {
    let sp = job(DONE, |s| s.restart.condition = RestartCondition::None);
    let mut sim = Sim::new(2, spec("batch", 0));
    sim.put(sp);
    // Placed and running, not yet done.
    sim.run(2, |_| {});
    let t = current(&sim.s)[0].clone();
    assert_eq!(t.status.state, TaskState::Running);
    sim.apply(Command::UpdateNode {
        id: t.node_id.clone().unwrap(),
        availability: Some(Availability::Drain),
        labels_add: Default::default(),
        labels_rm: vec![],
    })
    .unwrap();
    sim.stop_ms = 2 * TICK;
    let mut states = BTreeSet::new();
    sim.run(10, |s| {
        states.insert(prog(s).state.as_str());
    });
    assert!(!states.contains("failed"), "{states:?}");
    let p = prog(&sim.s);
    assert_eq!((p.state, p.completed), (JobState::Complete, 1), "{p}");
    let done = current(&sim.s)
        .into_iter()
        .find(|t| t.status.state == TaskState::Complete)
        .unwrap();
    assert_ne!(done.node_id, t.node_id);
}

#[test]
fn an_auto_remove_job_is_removed_once_finished_and_its_grace_passed() {
    use crate::job::AUTO_REMOVE_GRACE_MS;
    for image in [DONE, BAD] {
        let mut sim = start(
            2,
            job(image, |s| {
                s.auto_remove = true;
                s.restart.condition = RestartCondition::None;
            }),
        );
        // (first tick the job was seen finished, first tick it was seen removed)
        let (mut ended, mut removed) = (None, None);
        for _ in 0..40 {
            sim.run(1, |_| {});
            match sim.s.services.values().next() {
                Some(_) if prog(&sim.s).state != JobState::Running => {
                    ended.get_or_insert(sim.now);
                }
                Some(_) => assert!(ended.is_none(), "{image}: finished, then running again"),
                None => {
                    removed.get_or_insert(sim.now);
                }
            }
        }
        let (ended, removed) = (ended.expect("finished"), removed.expect("removed"));
        let kept = removed - ended;
        assert!(
            (AUTO_REMOVE_GRACE_MS..=AUTO_REMOVE_GRACE_MS + 2 * TICK).contains(&kept),
            "{image}: kept {kept} ms after it finished"
        );
        assert!(sim.s.tasks.is_empty(), "{image}: its tasks forgotten");
    }
}

#[test]
fn auto_remove_is_for_jobs_only() {
    let mut sp = spec("web", 1);
    sp.auto_remove = true;
    let e = crate::job::validate(&sp).unwrap_err();
    assert_eq!(e.field, "auto_remove");
    sp.mode = ServiceMode::ReplicatedJob;
    crate::job::validate(&sp).unwrap();
}

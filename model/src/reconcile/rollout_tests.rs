//! Rolling updates in the simulated cluster (`super::sim`).

use std::collections::{BTreeMap, BTreeSet};

use super::sim::*;

use crate::spec::{RestartCondition, ServiceMode, ServiceSpec};
use crate::store::{ApplyError, Command, Task};
use crate::task::TaskState;
use crate::update::{FailureAction, FailureRatio, UpdateOrder, UpdateState};

#[test]
fn parallelism_two_over_ten_replicas_takes_five_batches() {
    let mut sim = Sim::new(3, with("v1", |s| s.update_config.parallelism = 2));
    assert_eq!(serving(&sim.s), 10);
    assert_eq!(sim.state(), None, "creating a service is not an update");
    let started = sim.now;
    sim.put(with("v2", |s| s.update_config.parallelism = 2));
    assert_eq!(sim.state(), Some(UpdateState::Updating));
    let mut most = 0;
    sim.run_rollout(200, |s| {
        most = most.max(in_flight(s, "v2"));
        assert!(serving(s) >= 8, "stop-first: at most 2 slots down");
    });
    assert_eq!(most, 2);
    let new: Vec<&Task> = sim
        .s
        .tasks
        .values()
        .filter(|t| t.spec.image == "v2")
        .collect();
    assert_eq!(new.len(), 10, "one new task per slot, no restarts");
    let batches: BTreeMap<u64, usize> = new.iter().fold(BTreeMap::new(), |mut m, t| {
        *m.entry(t.created_at).or_default() += 1;
        m
    });
    assert_eq!(batches.values().copied().collect::<Vec<_>>(), [2; 5]);
    let st = sim.svc().update_status.clone().unwrap();
    assert_eq!(st.state, UpdateState::Completed);
    assert_eq!(st.started_at, started);
    // Completed only after the last batch ran for the monitor period (5 s).
    let last_running = new.iter().filter_map(|t| t.running_at).max().unwrap();
    assert!(st.completed_at.unwrap() >= last_running + 5000);
    assert!(live(&sim.s).iter().all(|t| t.spec.image == "v2"));
    assert_eq!(sim.svc().previous_spec.as_ref().unwrap().image, "v1");
}

#[test]
fn delay_separates_batches() {
    let cfg = |s: &mut ServiceSpec| {
        s.replicas = 4;
        s.update_config.parallelism = 2;
        s.update_config.delay = 10_000;
    };
    let mut sim = Sim::new(2, with("v1", cfg));
    sim.put(with("v2", cfg));
    sim.run_rollout(200, |_| {});
    assert_eq!(sim.state(), Some(UpdateState::Completed));
    let new: Vec<&Task> = sim
        .s
        .tasks
        .values()
        .filter(|t| t.spec.image == "v2")
        .collect();
    let first = new.iter().map(|t| t.created_at).min().unwrap();
    let (b1, b2): (Vec<&&Task>, Vec<&&Task>) = new.iter().partition(|t| t.created_at == first);
    assert_eq!((b1.len(), b2.len()), (2, 2));
    let b1_running = b1.iter().map(|t| t.running_at.unwrap()).max().unwrap();
    let b2_created = b2[0].created_at;
    assert!(
        b2_created >= b1_running + 10_000,
        "{b2_created} vs {b1_running}"
    );
    assert!(
        b2_created <= b1_running + 10_000 + TICK,
        "no more than the delay"
    );
}

#[test]
fn stop_first_and_start_first_keep_their_promises() {
    for order in [UpdateOrder::StopFirst, UpdateOrder::StartFirst] {
        let cfg = |s: &mut ServiceSpec| {
            s.replicas = 6;
            s.update_config.parallelism = 2;
            s.update_config.order = order;
        };
        let mut sim = Sim::new(3, with("v1", cfg));
        sim.put(with("v2", cfg));
        let (mut least, mut most_live) = (usize::MAX, 0);
        sim.run_rollout(200, |s| {
            least = least.min(serving(s));
            most_live = most_live.max(live(s).len());
        });
        assert_eq!(sim.state(), Some(UpdateState::Completed), "{order:?}");
        match order {
            UpdateOrder::StopFirst => {
                assert_eq!(least, 4, "replicas - parallelism");
                assert_eq!(most_live, 6, "never more tasks than replicas");
            }
            UpdateOrder::StartFirst => {
                assert_eq!(least, 6, "never fewer than replicas");
                assert_eq!(most_live, 8, "replicas + parallelism");
            }
        }
        assert_eq!(live(&sim.s).len(), 6);
        assert!(live(&sim.s).iter().all(|t| t.spec.image == "v2"));
    }
}

#[test]
fn bad_image_rolls_back_without_touching_healthy_old_tasks() {
    for order in [UpdateOrder::StopFirst, UpdateOrder::StartFirst] {
        let cfg = |s: &mut ServiceSpec| {
            s.replicas = 6;
            s.update_config.parallelism = 2;
            s.update_config.order = order;
            s.update_config.failure_action = FailureAction::Rollback;
            s.rollback_config.parallelism = 0;
        };
        let mut sim = Sim::new(3, with("v1", cfg));
        let old = live_ids(&sim.s);
        let slot_of: BTreeMap<String, u64> = live(&sim.s)
            .iter()
            .map(|t| (t.id.clone(), t.slot))
            .collect();
        sim.put(with(BAD, cfg));
        let mut stopped: BTreeSet<String> = BTreeSet::new();
        sim.run_rollout(100, |s| {
            for id in &old {
                if s.tasks[id].desired_state != TaskState::Running {
                    stopped.insert(id.clone());
                }
            }
        });
        let st = sim.svc().update_status.clone().unwrap();
        assert_eq!(
            st.state,
            UpdateState::RollbackCompleted,
            "{order:?}: {st:?}"
        );
        assert!(
            st.message
                .contains("update failed, rolling back: task web.")
                && st.message.contains("rejected: image \"bad:1\" not found"),
            "{}",
            st.message
        );
        assert_eq!(sim.svc().spec.image, "v1");
        assert_eq!(sim.svc().previous_spec.as_ref().unwrap().image, BAD);
        // Only the first batch's slots were touched (stop-first), or none (start-first).
        let touched: BTreeSet<u64> = stopped.iter().map(|id| slot_of[id]).collect();
        match order {
            UpdateOrder::StopFirst => assert_eq!(touched.len(), 2, "{touched:?}"),
            UpdateOrder::StartFirst => assert!(touched.is_empty(), "{touched:?}"),
        }
        let now_live = live_ids(&sim.s);
        assert_eq!(now_live.len(), 6);
        for id in &old {
            assert_eq!(
                now_live.contains(id),
                !stopped.contains(id),
                "{order:?}: untouched old tasks keep running"
            );
        }
        // Replaced slots are back on the old spec, and everything runs.
        assert!(live(&sim.s).iter().all(|t| t.spec.image == "v1"));
        assert_eq!(serving(&sim.s), 6);
        // Only one batch of the bad image was ever tried.
        let bad = sim.s.tasks.values().filter(|t| t.spec.image == BAD).count();
        assert!(bad <= 2, "{bad}");
    }
}

#[test]
fn failure_action_pause_stops_with_a_reason() {
    let cfg = |s: &mut ServiceSpec| {
        s.replicas = 4;
        s.restart.condition = RestartCondition::None;
    };
    let mut sim = Sim::new(2, with("v1", cfg));
    let old = live_ids(&sim.s);
    sim.put(with(BAD, cfg));
    sim.run_rollout(50, |_| {});
    let st = sim.svc().update_status.clone().unwrap();
    assert_eq!(st.state, UpdateState::Paused);
    assert!(
        st.message.starts_with("update paused: task web.")
            && st.message.contains("rejected: image \"bad:1\" not found")
            && st.message.contains("1 of 1 new tasks failed"),
        "{}",
        st.message
    );
    assert_eq!(st.completed_at, None);
    // Paused: nothing moves, however long we wait.
    let before = sim.s.tasks.clone();
    sim.run(30, |_| {});
    assert_eq!(sim.s.tasks, before);
    assert_eq!(sim.state(), Some(UpdateState::Paused));
    assert_eq!(live_ids(&sim.s).intersection(&old).count(), 3);
    // A fixed spec starts a new update, which completes.
    sim.put(with("v2", cfg));
    assert_eq!(sim.state(), Some(UpdateState::Updating));
    sim.run_rollout(100, |_| {});
    assert_eq!(sim.state(), Some(UpdateState::Completed));
    assert!(live(&sim.s).iter().all(|t| t.spec.image == "v2"));
    assert_eq!(serving(&sim.s), 4);
}

#[test]
fn paused_updates_still_restart_updated_tasks() {
    // The default restart policy (any, 5 s) keeps retrying the failed slot; other slots stay.
    let cfg = |s: &mut ServiceSpec| s.replicas = 3;
    let mut sim = Sim::new(1, with("v1", cfg));
    let old = live_ids(&sim.s);
    sim.put(with(BAD, cfg));
    sim.run(20, |_| {});
    assert_eq!(sim.state(), Some(UpdateState::Paused));
    let bad: Vec<&Task> = sim
        .s
        .tasks
        .values()
        .filter(|t| t.spec.image == BAD)
        .collect();
    assert!(bad.len() >= 3, "restarted per policy: {}", bad.len());
    assert!(bad.iter().all(|t| t.slot == bad[0].slot), "one slot only");
    assert_eq!(live_ids(&sim.s).intersection(&old).count(), 2);
}

#[test]
fn max_failure_ratio_and_continue() {
    // Failures tolerated up to the ratio: continue ignores them, and the rollout still ends.
    let cfg = |s: &mut ServiceSpec| {
        s.replicas = 4;
        s.update_config.parallelism = 2;
        s.update_config.failure_action = FailureAction::Continue;
        s.restart.condition = RestartCondition::None;
    };
    let mut sim = Sim::new(2, with("v1", cfg));
    sim.put(with(BAD, cfg));
    sim.run_rollout(100, |_| {});
    assert_eq!(sim.state(), Some(UpdateState::Completed));
    let bad = sim.s.tasks.values().filter(|t| t.spec.image == BAD).count();
    assert_eq!(bad, 4, "every slot was updated");

    // Pause with a ratio of 0.5: crashy tasks fail 2 s after running, inside the monitor.
    let cfg = |s: &mut ServiceSpec| {
        s.replicas = 4;
        s.update_config.max_failure_ratio = FailureRatio(500);
        s.restart.condition = RestartCondition::None;
    };
    let mut sim = Sim::new(2, with("v1", cfg));
    sim.put(with(CRASHY, cfg));
    sim.run_rollout(100, |_| {});
    let st = sim.svc().update_status.clone().unwrap();
    assert_eq!(st.state, UpdateState::Paused);
    assert!(
        st.message.contains("failed: exit status 3"),
        "{}",
        st.message
    );
}

#[test]
fn failures_after_the_monitor_period_are_left_to_the_restart_policy() {
    let cfg = |s: &mut ServiceSpec| {
        s.replicas = 2;
        s.update_config.monitor = 1000;
    };
    let mut sim = Sim::new(1, with("v1", cfg));
    sim.put(with(CRASHY, cfg));
    sim.run_rollout(100, |_| {});
    assert_eq!(sim.state(), Some(UpdateState::Completed));
    sim.run(20, |_| {});
    assert_eq!(sim.state(), Some(UpdateState::Completed));
    let crashy = sim
        .s
        .tasks
        .values()
        .filter(|t| t.spec.image == CRASHY)
        .count();
    assert!(crashy > 2, "restarted: {crashy}");
}

#[test]
fn manual_rollback() {
    let cfg = |s: &mut ServiceSpec| {
        s.replicas = 6;
        s.rollback_config.parallelism = 3;
    };
    let mut sim = Sim::new(3, with("v1", cfg));
    let now = sim.now;
    assert_eq!(
        sim.apply(Command::Rollback {
            service: "web".into(),
            now,
            reason: String::new(),
            if_spec_version: None,
        }),
        Err(ApplyError::NoPreviousSpec("web".into()))
    );
    sim.put(with("v2", cfg));
    sim.run_rollout(100, |_| {});
    assert_eq!(sim.state(), Some(UpdateState::Completed));
    // Scaled after the update: the rollback keeps the replica count.
    sim.put(with("v2", |s| {
        cfg(s);
        s.replicas = 7;
    }));
    sim.run(5, |_| {});
    let now = sim.now;
    sim.apply(Command::Rollback {
        service: "web".into(),
        now,
        reason: String::new(),
        if_spec_version: None,
    })
    .unwrap();
    let st = sim.svc().update_status.clone().unwrap();
    assert_eq!(st.state, UpdateState::RollbackStarted);
    assert_eq!(st.message, "rollback requested");
    let mut most = 0;
    sim.run_rollout(100, |s| most = most.max(in_flight(s, "v1")));
    assert_eq!(most, 3, "rollback_config.parallelism");
    let st = sim.svc().update_status.clone().unwrap();
    assert_eq!(st.state, UpdateState::RollbackCompleted);
    assert!(st.completed_at.is_some());
    assert_eq!(sim.svc().spec.image, "v1");
    assert_eq!(sim.svc().spec.replicas, 7);
    assert_eq!(sim.svc().previous_spec.as_ref().unwrap().image, "v2");
    assert_eq!(live(&sim.s).len(), 7);
    assert!(live(&sim.s).iter().all(|t| t.spec.image == "v1"));
}

#[test]
fn stale_rollout_verdicts_are_ignored() {
    let mut sim = Sim::new(1, with("v1", |s| s.replicas = 1));
    sim.put(with("v2", |s| s.replicas = 1));
    let gen = sim.svc().spec_version;
    sim.put(with("v3", |s| s.replicas = 1));
    let now = sim.now;
    sim.apply(Command::Rollback {
        service: "web".into(),
        now,
        reason: "old news".into(),
        if_spec_version: Some(gen),
    })
    .unwrap();
    sim.apply(Command::SetUpdateStatus {
        service: "web".into(),
        spec_version: gen,
        status: crate::update::UpdateStatus {
            state: UpdateState::Paused,
            message: "old news".into(),
            started_at: 0,
            completed_at: None,
        },
    })
    .unwrap();
    assert_eq!(sim.svc().spec.image, "v3");
    assert_eq!(sim.state(), Some(UpdateState::Updating));
}

#[test]
fn update_config_and_replicas_changes_replace_nothing() {
    let mut sim = Sim::new(2, with("v1", |s| s.replicas = 4));
    let before = live_ids(&sim.s);
    let gen = sim.svc().spec_version;
    sim.put(with("v1", |s| {
        s.replicas = 5;
        s.update_config.parallelism = 3;
        s.update_config.order = UpdateOrder::StartFirst;
        s.rollback_config.failure_action = FailureAction::Continue;
    }));
    sim.run(10, |_| {});
    let after = live_ids(&sim.s);
    assert_eq!(after.len(), 5);
    assert!(before.is_subset(&after));
    assert_eq!(sim.svc().spec_version, gen);
    assert_eq!(sim.state(), None);
    assert!(sim.svc().previous_spec.is_none());
}

#[test]
fn global_services_update_one_node_at_a_time() {
    let global = |image: &str| {
        with(image, |s| {
            s.mode = ServiceMode::Global;
        })
    };
    let mut sim = Sim::new(4, global("v1"));
    assert_eq!(live(&sim.s).len(), 4);
    sim.put(global("v2"));
    let mut most = 0;
    sim.run_rollout(100, |s| {
        let nodes = live(s)
            .iter()
            .filter(|t| t.spec.image == "v2" && t.status.state < TaskState::Running)
            .count();
        most = most.max(nodes);
        assert!(serving(s) >= 3);
    });
    assert_eq!(most, 1);
    assert_eq!(sim.state(), Some(UpdateState::Completed));
    let nodes: BTreeSet<_> = live(&sim.s)
        .iter()
        .map(|t| (t.spec.image.clone(), t.target_node.clone().unwrap()))
        .collect();
    assert_eq!(nodes.len(), 4);
    assert!(nodes.iter().all(|(image, _)| image == "v2"));
}

#[test]
fn a_rollout_no_node_can_take_still_ends() {
    // The new spec asks for a label no node has: its first task waits for a node, and after
    // the deadline the rollout ends (paused, with the scheduler's reason) instead of hanging.
    let cfg = |s: &mut ServiceSpec| s.replicas = 2;
    let mut sim = Sim::new(2, with("v1", cfg));
    let old = live_ids(&sim.s);
    let mut bad = with("v2", cfg);
    bad.placement.constraints = vec!["node.labels.zone==nowhere".parse().unwrap()];
    sim.put(bad);
    sim.run((super::UNPLACEABLE_DEADLINE_MS / TICK) as usize + 5, |_| {});
    let st = sim.svc().update_status.clone().unwrap();
    assert_eq!(st.state, UpdateState::Paused, "{}", st.message);
    assert!(
        st.message
            .contains("fail constraint node.labels.zone==nowhere"),
        "{}",
        st.message
    );
    // The old tasks' nodes no longer match the new constraints, so they are moved start-first:
    // with nowhere to go, both keep serving.
    assert_eq!(live_ids(&sim.s).intersection(&old).count(), 2);
}

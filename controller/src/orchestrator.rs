//! The leader's control loop: whenever the store changes (or a second passes, for time-based
//! decisions such as restart delays), run the pure `plan_pass_in` over a store snapshot and
//! propose its one batch. A pass after a change looks only at the services whose tasks the
//! change touched (`touched`; every service when anything else changed), and at least once
//! per `FULL_PASS_EVERY` a pass looks at every service: at 1,000 hosts a pass over all 30,000
//! tasks after every status batch kept a core busy. Passes are sequential: the next pass starts only after the previous batch
//! was applied, so a plan is never proposed twice. Wall time comes from a clock seam (`now_ms`
//! in production, the paused tokio clock in tests): stop graces and restart delays are counted
//! on it.

use std::time::{Duration, Instant};

use std::sync::Arc;

use rudder_model::reconcile::{plan_pass_in, touched, Scope};
use rudder_model::Store;
use tracing::{debug, warn};

use crate::raft_node::{Proposal, RaftHandle};
use crate::{new_id, now_ms};
use rudder_model::store::Envelope;

pub async fn run(raft: RaftHandle) {
    run_with_clock(raft, now_ms).await
}

/// At least this often a pass looks at every service (what waits on time alone: restart
/// delays, a rollout's delay and monitor, stop and unplaceable deadlines); the passes between
/// look only at the services whose tasks changed since the previous pass
/// (`rudder_model::reconcile::touched`).
pub const FULL_PASS_EVERY: Duration = Duration::from_secs(1);

/// `run` with `clock` (milliseconds since the epoch) as the time each pass plans at.
pub async fn run_with_clock(raft: RaftHandle, clock: impl Fn() -> u64) {
    let mut store_rx = raft.watch_store();
    let mut status_rx = raft.watch_status();
    // The term in which this node, as leader, has applied everything committed before it.
    let mut caught_up_term = 0;
    // The store the previous pass planned on (its plan, if any, applied since), and when the
    // last pass over every service was; `None`: the next pass looks at every service.
    let mut last: Option<Arc<Store>> = None;
    let mut full_at: Option<tokio::time::Instant> = None;
    loop {
        let st = status_rx.borrow_and_update().clone();
        if st.is_leader && caught_up_term != st.term {
            last = None;
            // A new leader may not have applied its predecessor's last entries yet; planning on
            // that store could place a task twice. A read index resolves once it has.
            match raft.read_index().await {
                Ok(_) => caught_up_term = st.term,
                Err(e) => {
                    warn!(%e, "new leader not caught up yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        if st.is_leader {
            let store = store_rx.borrow_and_update().clone();
            let due = full_at.is_none_or(|t| t.elapsed() >= FULL_PASS_EVERY);
            let scope = match &last {
                Some(old) if !due => touched(old, &store),
                _ => {
                    full_at = Some(tokio::time::Instant::now());
                    Scope::All
                }
            };
            let began = Instant::now();
            let services = match &scope {
                Scope::All => store.services.len(),
                Scope::Services(s) => s.len(),
            };
            // Planned and encoded off the async workers: a pass that places 10,000 tasks takes
            // seconds, and on a worker it held up the sessions and the inbound raft messages
            // that share the runtime (at 5,000 hosts the leader lost its quorum: issue 20).
            let (now, planning) = (clock(), store.clone());
            let planned = tokio::task::spawn_blocking(move || {
                let mut ids = new_id;
                let planned = plan_pass_in(&planning, &scope, now, &mut ids);
                let plan_ms = began.elapsed().as_millis() as u64;
                (planned.map(|cmd| Envelope::new(cmd).encode()), plan_ms)
            })
            .await;
            let (planned, plan_ms) = match planned {
                Ok(p) => p,
                Err(e) => {
                    warn!(%e, "control-loop pass failed");
                    last = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            last = Some(store);
            if let Some(bytes) = planned {
                // Never forwarded: a plan made by a leader that lost its role is dropped.
                let (size, encode_ms) = (bytes.len(), began.elapsed().as_millis() as u64);
                let r = raft.propose_local(Proposal::Command(bytes)).await;
                let commit_ms = began.elapsed().as_millis() as u64;
                debug!(
                    services,
                    plan_ms, encode_ms, commit_ms, size, "control-loop batch"
                );
                if let Err(e) = r {
                    warn!(%e, "control-loop batch not committed");
                    // Whatever it held is planned again, by a pass over every service.
                    last = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                continue;
            }
            debug!(services, plan_ms, "control-loop pass: nothing to do");
        } else {
            last = None;
        }
        tokio::select! {
            r = store_rx.changed() => if r.is_err() { return },
            r = status_rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(FULL_PASS_EVERY) => {}
        }
    }
}

/// The control loop against a one-member raft group on in-memory storage (the real Ready loop)
/// on a paused clock: what it proposes is observed in the applied store.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft_sim::SimStorage;
    use crate::test_support::put_node;
    use crate::transport::NoopTransport;
    use rudder_model::{Command, ServiceSpec, Store, TaskState};

    fn put_service(name: &str, replicas: u64) -> Command {
        let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": name, "image": "busybox:latest", "replicas": replicas,
        }))
        .expect("spec");
        Command::PutService {
            id: format!("svc-{name}"),
            spec: Box::new(spec),
            now: now_ms(),
        }
    }

    /// Tasks of `service` that should run, by node id.
    fn placed(store: &Store, service: &str) -> Vec<String> {
        let mut v: Vec<String> = store
            .tasks
            .values()
            .filter(|t| t.service_name == service && t.desired_state == TaskState::Running)
            .filter_map(|t| t.node_id.clone())
            .collect();
        v.sort();
        v
    }

    async fn group() -> RaftHandle {
        let raft = crate::raft_node::start(1, SimStorage::new(vec![1]), Arc::new(NoopTransport))
            .expect("start raft");
        tokio::spawn(run(raft.clone()));
        raft
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_service_is_placed_on_ready_nodes_in_one_pass() {
        let raft = group().await;
        raft.propose(put_node("n1", 1)).await.expect("n1");
        raft.propose(put_node("n2", 2)).await.expect("n2");
        raft.propose(put_service("web", 4)).await.expect("web");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let p = placed(&raft.store(), "web");
        assert_eq!(p.len(), 4, "{p:?}");
        // Spread: two per node.
        assert_eq!(p.iter().filter(|n| *n == "n1").count(), 2, "{p:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_of_a_lost_node_are_replaced_on_the_others() {
        let raft = group().await;
        raft.propose(put_node("n1", 1)).await.expect("n1");
        raft.propose(put_node("n2", 2)).await.expect("n2");
        raft.propose(put_service("web", 2)).await.expect("web");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(placed(&raft.store(), "web"), ["n1", "n2"]);
        raft.propose(Command::NodeDown {
            id: "n1".into(),
            now: now_ms(),
        })
        .await
        .expect("n1 down");
        // Within the loop's one-second tick at the latest, on the paused clock.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(placed(&raft.store(), "web"), ["n2", "n2"]);
    }

    // Rolling updates, stop-first, over the real loop: fake agents step tasks on the test clock,
    // and a stopping container lives out its whole grace (PID 1 ignoring SIGTERM).

    use rudder_model::store::{StatusUpdate, Task};
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;

    /// Milliseconds since the epoch on tokio's (paused) clock.
    fn test_clock() -> impl Fn() -> u64 + Copy + Send + Sync + 'static {
        let start = tokio::time::Instant::now();
        let base = now_ms();
        move || base + start.elapsed().as_millis() as u64
    }

    async fn group_with(clock: impl Fn() -> u64 + Send + 'static) -> RaftHandle {
        let raft = crate::raft_node::start(1, SimStorage::new(vec![1]), Arc::new(NoopTransport))
            .expect("start raft");
        tokio::spawn(run_with_clock(raft.clone(), clock));
        raft
    }

    fn versioned(name: &str, image: &str, extra: serde_json::Value, now: u64) -> Command {
        let mut spec = serde_json::json!({
            "name": name, "image": image, "replicas": 2, "stop_grace_period": 2,
        });
        if let (Some(o), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        let spec: ServiceSpec = serde_json::from_value(spec).expect("spec");
        Command::PutService {
            id: format!("svc-{name}"),
            spec: Box::new(spec),
            now,
        }
    }

    /// Agents on every node not in `silent`: every 100 ms each of their tasks moves one step
    /// (to `running`), or, asked to stop, ends once its `stop_ms` have passed since the request.
    fn fake_agents(
        raft: RaftHandle,
        clock: impl Fn() -> u64 + Send + 'static,
        stop_ms: u64,
        silent: Arc<Mutex<BTreeSet<String>>>,
    ) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = clock();
                let store = raft.store();
                let silent = silent.lock().expect("silent").clone();
                let updates: Vec<StatusUpdate> = store
                    .tasks
                    .values()
                    .filter_map(|t| {
                        let node = t.node_id.clone()?;
                        if t.status.state.is_terminal() || silent.contains(&node) {
                            return None;
                        }
                        let state = if t.desired_state > TaskState::Running {
                            let asked = t.stop_requested_at.unwrap_or(0);
                            (now >= asked + stop_ms).then_some(TaskState::Shutdown)?
                        } else if t.status.state < TaskState::Starting {
                            TaskState::Starting
                        } else if t.status.state == TaskState::Starting {
                            TaskState::Running
                        } else {
                            return None;
                        };
                        Some(StatusUpdate::of(t, &node, state, now))
                    })
                    .collect();
                if !updates.is_empty() {
                    // A lost proposal is retried on the next step.
                    let _ = raft.propose(Command::UpdateStatus { updates }).await;
                }
            }
        });
    }

    /// Watches every store the group applies and fails (by recording) whenever a slot has an
    /// old task that may still run beside a new task of the same slot.
    fn watch_slots(raft: &RaftHandle, old: &'static str) -> Arc<Mutex<Vec<String>>> {
        let bad = Arc::new(Mutex::new(Vec::new()));
        let mut rx = raft.watch_store();
        let seen = bad.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let store = rx.borrow_and_update().clone();
                let mut slots: BTreeMap<u64, Vec<&Task>> = BTreeMap::new();
                for t in store.tasks.values() {
                    slots.entry(t.slot).or_default().push(t);
                }
                for (slot, tasks) in slots {
                    let old_alive = tasks
                        .iter()
                        .any(|t| t.spec.image == old && t.holds_resources());
                    let new = tasks.iter().any(|t| t.spec.image != old);
                    if old_alive && new {
                        seen.lock()
                            .expect("bad")
                            .push(format!("slot {slot}: {tasks:?}"));
                    }
                }
            }
        });
        bad
    }

    fn tasks_of<'a>(store: &'a Store, image: &str) -> Vec<&'a Task> {
        store
            .tasks
            .values()
            .filter(|t| t.spec.image == image)
            .collect()
    }

    fn update_state(store: &Store, service: &str) -> Option<rudder_model::UpdateState> {
        store
            .services
            .values()
            .find(|s| s.spec.name == service)
            .and_then(|s| s.update_status.as_ref())
            .map(|s| s.state)
    }

    /// Starts `web` (v1) with `extra` spec fields on `nodes`, waits until it runs, applies v2.
    async fn roll(
        nodes: usize,
        extra: serde_json::Value,
        stop_ms: u64,
        silent: Arc<Mutex<BTreeSet<String>>>,
    ) -> (RaftHandle, Arc<Mutex<Vec<String>>>) {
        let clock = test_clock();
        let raft = group_with(clock).await;
        for i in 1..=nodes {
            raft.propose(put_node(&format!("n{i}"), i as u8))
                .await
                .expect("node");
        }
        fake_agents(raft.clone(), clock, stop_ms, silent);
        raft.propose(versioned("web", "v1", extra.clone(), clock()))
            .await
            .expect("v1");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(tasks_of(&raft.store(), "v1")
            .iter()
            .all(|t| t.status.state == TaskState::Running));
        let bad = watch_slots(&raft, "v1");
        raft.propose(versioned("web", "v2", extra, clock()))
            .await
            .expect("v2");
        (raft, bad)
    }

    #[tokio::test(start_paused = true)]
    async fn stop_first_starts_a_slot_s_new_task_only_after_its_old_one_reported_ended() {
        let silent = Arc::new(Mutex::new(BTreeSet::new()));
        let (raft, bad) = roll(2, serde_json::json!({}), 2_000, silent).await;
        // While the first old task lives out its grace, nothing new exists.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let store = raft.store();
        assert!(tasks_of(&store, "v2").is_empty(), "{:?}", store.tasks);
        assert_eq!(
            tasks_of(&store, "v1")
                .iter()
                .filter(|t| t.desired_state == TaskState::Shutdown)
                .count(),
            1,
            "parallelism 1"
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        let store = raft.store();
        assert_eq!(
            update_state(&store, "web"),
            Some(rudder_model::UpdateState::Completed)
        );
        assert!(bad.lock().expect("bad").is_empty(), "{:?}", bad);
        for new in tasks_of(&store, "v2") {
            let old = tasks_of(&store, "v1")
                .into_iter()
                .find(|t| t.slot == new.slot)
                .expect("old");
            assert_eq!(old.status.state, TaskState::Shutdown);
            assert!(new.created_at >= old.status.timestamp);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn parallelism_two_over_ten_replicas_runs_five_batches() {
        let silent = Arc::new(Mutex::new(BTreeSet::new()));
        let extra = serde_json::json!({"replicas": 10, "update_config": {"parallelism": 2}});
        let (raft, bad) = roll(3, extra, 2_000, silent).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let store = raft.store();
        assert_eq!(
            update_state(&store, "web"),
            Some(rudder_model::UpdateState::Completed)
        );
        assert!(bad.lock().expect("bad").is_empty(), "{:?}", bad);
        let mut created: Vec<u64> = tasks_of(&store, "v2")
            .iter()
            .map(|t| t.created_at)
            .collect();
        created.sort();
        assert_eq!(created.len(), 10);
        // Five batches of two, each begun after the previous batch's old tasks lived out their
        // 2 s grace and its new tasks ran.
        let batches: Vec<&[u64]> = created.chunks(2).collect();
        for pair in batches.windows(2) {
            assert!(pair[1][0] >= pair[0][1] + 2_000, "{created:?}");
        }
        for b in &batches {
            assert!(b[1] - b[0] < 1_000, "one batch: {created:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_node_s_old_task_does_not_block_the_update_forever() {
        // Three nodes, a host port: the slot on the node whose agent goes silent is replaced
        // once its grace and the report timeout have passed, on the node with the port free
        // (the silent node's port still counts as taken).
        let silent = Arc::new(Mutex::new(BTreeSet::new()));
        let extra = serde_json::json!({
            "ports": [{"target": 8080, "mode": "host"}], "update_config": {"parallelism": 1},
        });
        let clock = test_clock();
        let raft = group_with(clock).await;
        for i in 1..=3 {
            raft.propose(put_node(&format!("n{i}"), i as u8))
                .await
                .expect("node");
        }
        fake_agents(raft.clone(), clock, 2_000, silent.clone());
        raft.propose(versioned("web", "v1", extra.clone(), clock()))
            .await
            .expect("v1");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let store = raft.store();
        let first = tasks_of(&store, "v1")
            .into_iter()
            .find(|t| t.slot == 1)
            .and_then(|t| t.node_id.clone())
            .expect("slot 1 placed");
        silent.lock().expect("silent").insert(first.clone());
        raft.propose(versioned("web", "v2", extra, clock()))
            .await
            .expect("v2");
        let grace_and_timeout = 2_000 + rudder_model::reconcile::STOP_REPORT_TIMEOUT_MS;
        tokio::time::sleep(Duration::from_millis(grace_and_timeout - 1_000)).await;
        assert!(tasks_of(&raft.store(), "v2").is_empty(), "still waiting");
        tokio::time::sleep(Duration::from_secs(30)).await;
        let store = raft.store();
        assert_eq!(
            update_state(&store, "web"),
            Some(rudder_model::UpdateState::Completed)
        );
        let new = tasks_of(&store, "v2");
        assert_eq!(new.len(), 2);
        assert!(new.iter().all(|t| t.status.state == TaskState::Running
            && t.node_id.as_deref() != Some(first.as_str())));
    }
}

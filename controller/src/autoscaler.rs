//! The leader's autoscaler: every `PERIOD` it runs the pure policy (`model::autoscale::Policy`)
//! of each autoscaled service over the usage book's samples of its running tasks, and proposes
//! each decision as `Command::Autoscale` (the replica count changes as with `rctl scale`, and the
//! decision is recorded with its reason for `rctl describe`). Only the leader decides; the
//! policies' memory is dropped when leadership (the term) changes, and a proposal is never
//! forwarded, so a deposed leader's decision is lost rather than applied late. A decision made
//! on a store that moved on is ignored by the state machine (it names the count it started
//! from).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rudder_model::autoscale::{Policy, TaskSamples};
use rudder_model::store::Envelope;
use rudder_model::{Command, Store, TaskState};
use tracing::{info, warn};

use crate::now_ms;
use crate::raft_node::{Proposal, RaftHandle};
use crate::usage::UsageBook;

/// How often the policies run.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Runs the autoscaler on wall time.
pub async fn run(raft: RaftHandle, book: Arc<UsageBook>) {
    run_with_clock(raft, book, now_ms).await
}

/// `run` with `clock` (ms since the epoch) as the time policies and decisions see.
pub async fn run_with_clock(raft: RaftHandle, book: Arc<UsageBook>, clock: impl Fn() -> u64) {
    let mut policies: HashMap<String, Policy> = HashMap::new();
    let mut term = 0;
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let st = raft.status();
        if !st.is_leader || st.term != term {
            if !policies.is_empty() {
                policies.clear();
            }
            if !st.is_leader {
                // Samples reach only the leader: anything kept would be stale by the next term.
                book.clear();
                term = 0;
                continue;
            }
            term = st.term;
        }
        let store = raft.store();
        let now = clock();
        book.prune(now, |id| store.tasks.contains_key(id));
        for cmd in pass(&store, &book, &mut policies, now) {
            let proposal = Proposal::Command(Envelope::new(cmd).encode());
            if let Err(e) = raft.propose_local(proposal).await {
                warn!(%e, "autoscale decision not committed");
            }
        }
    }
}

/// One evaluation of every autoscaled service: the commands to propose. Policies of services
/// that are gone or no longer autoscale are dropped.
fn pass(
    store: &Store,
    book: &UsageBook,
    policies: &mut HashMap<String, Policy>,
    now: u64,
) -> Vec<Command> {
    policies.retain(|name, _| {
        store
            .services
            .get(name)
            .is_some_and(|s| s.spec.autoscale.is_some())
    });
    let mut cmds = Vec::new();
    if policies.is_empty() && !store.services.values().any(|s| s.spec.autoscale.is_some()) {
        return cmds;
    }
    // Running tasks by service, in one walk over the tasks.
    let mut running: HashMap<&str, Vec<&rudder_model::Task>> = HashMap::new();
    for t in store.tasks.values() {
        if t.desired_state == TaskState::Running && t.status.state == TaskState::Running {
            running.entry(t.service_id.as_str()).or_default().push(t);
        }
    }
    for svc in store.services.values() {
        let Some(a) = &svc.spec.autoscale else {
            continue;
        };
        let since = now.saturating_sub(a.window);
        let tasks: Vec<TaskSamples> = running
            .get(svc.id.as_str())
            .into_iter()
            .flatten()
            .map(|t| TaskSamples {
                task: t.id.clone(),
                samples: book.since(&t.id, since),
            })
            .collect();
        let policy = policies.entry(svc.spec.name.clone()).or_default();
        if let Some(d) = policy.evaluate(a, &svc.spec.resources, svc.spec.replicas, &tasks, now) {
            info!(service = %svc.spec.name, "autoscale: {}", d.describe());
            cmds.push(Command::Autoscale {
                service: svc.spec.name.clone(),
                decision: d,
            });
        }
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft_sim::SimStorage;
    use crate::transport::NoopTransport;
    use rudder_model::store::{NodeResources, NodeRole, StatusUpdate};
    use rudder_model::{ServiceSpec, TaskStatus};
    use rudder_proto::v1::TaskUsage;

    fn test_clock() -> impl Fn() -> u64 + Copy + Send + Sync + 'static {
        let start = tokio::time::Instant::now();
        let base = now_ms();
        move || base + start.elapsed().as_millis() as u64
    }

    /// The real Ready loop, the orchestrator and the autoscaler on a paused clock; a fake agent
    /// on n1 reports every task it is given running, and `load(task)` millicpus for each every
    /// second on its heartbeat.
    #[tokio::test(start_paused = true)]
    async fn scales_up_under_load_and_back_down_after_it() {
        let clock = test_clock();
        let raft = crate::raft_node::start(1, SimStorage::new(vec![1]), Arc::new(NoopTransport))
            .expect("start raft");
        let book = Arc::new(UsageBook::default());
        tokio::spawn(crate::orchestrator::run_with_clock(raft.clone(), clock));
        tokio::spawn(run_with_clock(raft.clone(), book.clone(), clock));
        raft.propose(Command::PutNode {
            id: "n1".into(),
            hostname: "h1".into(),
            addr: "10.0.0.1:4243".into(),
            labels: Default::default(),
            role: NodeRole::Worker,
            resources: NodeResources {
                cpus: 8000,
                memory: 8 << 30,
            },
            now: clock(),
            cert_not_after: 0,
            host_labels: Default::default(),
        })
        .await
        .expect("node");
        let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": "web", "image": "busybox:latest", "replicas": 1,
            "resources": {"reservations": {"cpus": 0.2}},
            "autoscale": {"min": 1, "max": 3, "cpu_percent": 50, "window": "4s",
                          "scale_up_delay": "0s", "scale_down_delay": "10s"},
        }))
        .expect("spec");
        raft.propose(Command::PutService {
            id: "s".into(),
            spec: Box::new(spec),
            now: clock(),
        })
        .await
        .expect("service");
        let burn = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The fake agent: every task placed on n1 runs; the first slot burns when asked.
        {
            let (raft, book, burn) = (raft.clone(), book.clone(), burn.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let store = raft.store();
                    let mut updates = Vec::new();
                    let mut usage = Vec::new();
                    for t in store.tasks.values() {
                        let state = if t.desired_state == TaskState::Running {
                            TaskState::Running
                        } else {
                            TaskState::Shutdown
                        };
                        if t.status.state != state {
                            updates.push(StatusUpdate {
                                task_id: t.id.clone(),
                                node_id: "n1".into(),
                                status: TaskStatus {
                                    state,
                                    message: String::new(),
                                    error: String::new(),
                                    container_id: String::new(),
                                    exit_code: None,
                                    timestamp: clock(),
                                },
                            });
                        } else if state == TaskState::Running {
                            let hot = t.slot == 1 && burn.load(std::sync::atomic::Ordering::SeqCst);
                            usage.push(TaskUsage {
                                task_id: t.id.clone(),
                                cpu_milli: if hot { 2000 } else { 5 },
                                memory_bytes: 1 << 20,
                            });
                        }
                    }
                    if !updates.is_empty() {
                        let _ = raft.propose(Command::UpdateStatus { updates }).await;
                    }
                    book.record(&raft.store(), "n1", &usage, clock());
                }
            });
        }
        let replicas = |raft: &RaftHandle| raft.store().services["web"].spec.replicas;
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(replicas(&raft), 1, "idle: stays at min");
        burn.store(true, std::sync::atomic::Ordering::SeqCst);
        let t0 = tokio::time::Instant::now();
        while replicas(&raft) < 3 {
            assert!(t0.elapsed() < Duration::from_secs(10), "no scale-up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let svc = raft.store().services["web"].clone();
        let d = svc.autoscale_decisions.last().expect("decision recorded");
        assert_eq!((d.from, d.to), (1, 3), "{d:?}");
        assert!(
            d.reason.starts_with("cpu ")
                && d.reason
                    .ends_with("% of reservation over 4s, target 50% (max 3)"),
            "{d:?}"
        );
        // Load gone: back to 1 only after the 10 s scale-down delay.
        burn.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(replicas(&raft), 3, "down delay not over");
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(replicas(&raft), 1);
        let svc = raft.store().services["web"].clone();
        let d = svc.autoscale_decisions.last().expect("decision recorded");
        assert_eq!((d.from, d.to), (3, 1), "{d:?}");
    }
}

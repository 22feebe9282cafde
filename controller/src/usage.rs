//! The leader's book of task usage samples: what agents piggy-back on their heartbeats, kept in
//! memory per task for the autoscaler's window and `rctl stats`. Soft state, never in raft: a
//! new leader starts empty and fills up with the next heartbeats (its autoscaler starts fresh
//! too, see `model::autoscale`).
//!
//! Invariants: a sample is kept only for a task the store places on the reporting node (the
//! node id comes from the session's certificate); each task keeps at most `MAX_PER_TASK`
//! samples and none older than `RETAIN_MS`; tasks gone from the store are dropped on `prune`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use rudder_model::autoscale::Sample;
use rudder_model::Store;
use rudder_proto::v1::TaskUsage;

/// Samples older than this are dropped: longer than the longest averaging window (10 min).
pub const RETAIN_MS: u64 = 11 * 60 * 1000;
/// At most this many samples per task (a sample every 2 s over `RETAIN_MS` is 330).
pub const MAX_PER_TASK: usize = 400;
/// At most this many samples are taken from one heartbeat.
pub const MAX_PER_HEARTBEAT: usize = 10_000;

/// Samples by task id.
#[derive(Default)]
pub struct UsageBook {
    tasks: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl UsageBook {
    /// Records `usage` reported by `node` at `now` (ms, this controller's clock); samples of
    /// tasks not placed on `node` are dropped. Returns how many were kept.
    pub fn record(&self, store: &Store, node: &str, usage: &[TaskUsage], now: u64) -> usize {
        let mut tasks = self.tasks.lock().expect("usage lock");
        let mut kept = 0;
        for u in usage.iter().take(MAX_PER_HEARTBEAT) {
            let placed_here = store
                .tasks
                .get(&u.task_id)
                .is_some_and(|t| t.node_id.as_deref() == Some(node));
            if !placed_here {
                continue;
            }
            let q = tasks.entry(u.task_id.clone()).or_default();
            q.push_back(Sample {
                at: now,
                cpu_millis: u.cpu_milli,
                memory_bytes: u.memory_bytes,
            });
            while q.len() > MAX_PER_TASK {
                q.pop_front();
            }
            kept += 1;
        }
        kept
    }

    /// Task `id`'s samples received at or after `since`, oldest first.
    pub fn since(&self, id: &str, since: u64) -> Vec<Sample> {
        let tasks = self.tasks.lock().expect("usage lock");
        tasks
            .get(id)
            .map(|q| q.iter().filter(|s| s.at >= since).copied().collect())
            .unwrap_or_default()
    }

    /// Task `id`'s latest sample.
    pub fn latest(&self, id: &str) -> Option<Sample> {
        let tasks = self.tasks.lock().expect("usage lock");
        tasks.get(id).and_then(|q| q.back().copied())
    }

    /// Drops samples older than `RETAIN_MS` and tasks for which `keep` is false.
    pub fn prune(&self, now: u64, keep: impl Fn(&str) -> bool) {
        let mut tasks = self.tasks.lock().expect("usage lock");
        tasks.retain(|id, q| {
            while q
                .front()
                .is_some_and(|s| s.at.saturating_add(RETAIN_MS) < now)
            {
                q.pop_front();
            }
            !q.is_empty() && keep(id)
        });
    }

    /// Forgets everything (this controller stopped leading: its book would go stale).
    pub fn clear(&self) {
        self.tasks.lock().expect("usage lock").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::store::NodeResources;
    use rudder_model::{Command, ServiceSpec};

    fn usage(task: &str, cpu: u64) -> TaskUsage {
        TaskUsage {
            task_id: task.into(),
            cpu_milli: cpu,
            memory_bytes: 1,
        }
    }

    /// A store with service web (1 replica) placed on n1.
    fn store() -> (Store, String) {
        let mut s = Store::default();
        s.apply(
            1,
            Command::PutNode {
                id: "n1".into(),
                hostname: "h1".into(),
                addr: "10.0.0.1:1".into(),
                labels: Default::default(),
                role: Default::default(),
                resources: NodeResources {
                    cpus: 4000,
                    memory: 1 << 30,
                },
                now: 1,
                cert_not_after: 0,
                host_labels: Default::default(),
            },
        )
        .unwrap();
        let spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({"name": "web", "image": "x"})).unwrap();
        s.apply(
            2,
            Command::PutService {
                id: "s".into(),
                spec: Box::new(spec),
                now: 1,
            },
        )
        .unwrap();
        let mut ids = 0;
        let cmd = rudder_model::reconcile::plan_pass(&s, 2, &mut || {
            ids += 1;
            format!("t{ids}")
        })
        .unwrap();
        s.apply(3, cmd).unwrap();
        let id = s.tasks.keys().next().unwrap().clone();
        (s, id)
    }

    #[test]
    fn keeps_only_samples_of_tasks_on_the_reporting_node() {
        let (s, id) = store();
        let book = UsageBook::default();
        assert_eq!(book.record(&s, "n2", &[usage(&id, 5)], 10), 0);
        assert_eq!(book.record(&s, "n1", &[usage("nope", 5)], 10), 0);
        assert_eq!(book.record(&s, "n1", &[usage(&id, 5)], 10), 1);
        assert_eq!(book.record(&s, "n1", &[usage(&id, 7)], 20), 1);
        assert_eq!(book.latest(&id).unwrap().cpu_millis, 7);
        assert_eq!(book.since(&id, 15).len(), 1);
        for k in 0..MAX_PER_TASK as u64 + 10 {
            book.record(&s, "n1", &[usage(&id, k)], 30 + k);
        }
        assert_eq!(book.since(&id, 0).len(), MAX_PER_TASK);
        // Old samples and tasks gone from the store are dropped.
        book.prune(RETAIN_MS + 100, |_| true);
        assert!(book.since(&id, 0).len() < MAX_PER_TASK);
        book.prune(0, |_| false);
        assert!(book.latest(&id).is_none());
    }
}

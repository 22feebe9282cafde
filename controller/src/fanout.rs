//! The dispatcher's fan-out of store changes: one task follows the published store and wakes
//! only the sessions whose node a change concerns ([`rudder_model::fanout::changed`]); a
//! session reads its node's tasks from the store's own node → tasks index. Before, every
//! session woke on every applied batch and scanned the whole task table for its node's tasks
//! (hosts × tasks per change), which at 1,000 hosts and 30,000 tasks kept the leader's cores
//! busy enough to lose its leadership (issue 20).
//!
//! Invariants: a session that subscribed before it took a [`Fanout::snapshot`] is woken for
//! every later change that concerns its node (or all nodes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rudder_model::Store;
use tokio::sync::watch;

use crate::raft_node::RaftHandle;

struct Inner {
    /// The latest published store.
    store: Arc<Store>,
    /// Node id → a counter bumped whenever a change concerns the node.
    wake: HashMap<String, watch::Sender<u64>>,
}

/// Shared by every session of one dispatcher.
#[derive(Clone)]
pub struct Fanout {
    inner: Arc<Mutex<Inner>>,
}

impl Fanout {
    /// Follows `raft`'s published store from now on (a task on the current runtime).
    pub fn start(raft: &RaftHandle) -> Fanout {
        let mut rx = raft.watch_store();
        let store = rx.borrow_and_update().clone();
        let f = Fanout {
            inner: Arc::new(Mutex::new(Inner {
                store,
                wake: HashMap::new(),
            })),
        };
        let me = f.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let new = rx.borrow_and_update().clone();
                me.advance(new);
            }
        });
        f
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn advance(&self, new: Arc<Store>) {
        let mut g = self.lock();
        let old = g.store.clone();
        let changed = rudder_model::fanout::changed(&old, &new);
        g.store = new;
        // Sessions gone: their counters go too.
        g.wake.retain(|_, tx| tx.receiver_count() > 0);
        let bump = |tx: &watch::Sender<u64>| tx.send_modify(|n| *n = n.wrapping_add(1));
        if changed.all {
            g.wake.values().for_each(bump);
        } else {
            for n in &changed.nodes {
                if let Some(tx) = g.wake.get(n) {
                    bump(tx);
                }
            }
        }
    }

    /// Wakes (`changed()`) whenever a change concerns `node`; subscribe before the first
    /// [`Fanout::snapshot`].
    pub fn subscribe(&self, node: &str) -> watch::Receiver<u64> {
        let mut g = self.lock();
        if let Some(tx) = g.wake.get(node) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(0);
        g.wake.insert(node.to_string(), tx);
        rx
    }

    /// The latest store the fan-out has seen (a node's tasks in it: [`Store::tasks_on`], one
    /// lookup each; copying their ids out here to look each up again was a tenth of the
    /// leader's CPU in a paced 1,000-host deploy).
    pub fn snapshot(&self) -> Arc<Store> {
        self.lock().store.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft_sim::SimStorage;
    use crate::test_support::put_node;
    use crate::transport::NoopTransport;
    use rudder_model::Command;
    use std::time::Duration;

    /// Only the node a task change concerns is woken; a node change wakes every session.
    #[tokio::test(start_paused = true)]
    async fn sessions_wake_only_for_changes_that_concern_their_node() {
        let raft = crate::raft_node::start(1, SimStorage::new(vec![1]), Arc::new(NoopTransport))
            .expect("start raft");
        raft.propose(put_node("n1", 1)).await.expect("n1");
        raft.propose(put_node("n2", 2)).await.expect("n2");
        let f = Fanout::start(&raft);
        let mut w1 = f.subscribe("n1");
        let mut w2 = f.subscribe("n2");
        assert_eq!(f.snapshot().tasks_on("n1").count(), 0);
        let spec: rudder_model::ServiceSpec =
            serde_json::from_value(serde_json::json!({"name": "web", "image": "busybox"}))
                .expect("spec");
        let t = rudder_model::Task {
            id: "t1".into(),
            service_id: "s".into(),
            service_name: "web".into(),
            slot: 1,
            spec: spec.into(),
            spec_version: 1,
            node_id: Some("n1".into()),
            target_node: None,
            desired_state: rudder_model::TaskState::Running,
            status: rudder_model::TaskStatus {
                state: rudder_model::TaskState::Assigned,
                message: String::new(),
                error: String::new(),
                container_id: String::new(),
                exit_code: None,
                timestamp: 1,
            },
            running_at: None,
            stop_requested_at: None,
            networks: Vec::new(),
            created_at: 1,
            version: 0,
            image_digest: None,
        };
        raft.propose(Command::CreateTasks { tasks: vec![t] })
            .await
            .expect("create");
        tokio::time::timeout(Duration::from_secs(1), w1.changed())
            .await
            .expect("n1 woken")
            .expect("open");
        assert!(!w2.has_changed().expect("open"), "n2 not concerned");
        let ids: Vec<String> = f.snapshot().tasks_on("n1").map(|t| t.id.clone()).collect();
        assert_eq!(ids, ["t1"]);
        raft.propose(Command::NodeDown {
            id: "n2".into(),
            now: 2,
        })
        .await
        .expect("down");
        tokio::time::timeout(Duration::from_secs(1), w2.changed())
            .await
            .expect("n2 woken by a node change")
            .expect("open");
    }
}

//! The status batcher: folds the task status reports of every agent session into one
//! `UpdateStatus` proposal per batch, and re-proposes a batch that did not commit while this
//! controller still leads.
//!
//! Why a failed batch is kept: an agent sends each status once per session (it re-sends every
//! task's last status only when it opens a new session). A batch dropped on a commit timeout
//! while the leader and the sessions live on was lost for good: the controller kept listing the
//! task in its old state (a slot could be listed running twice, its new task running and its
//! old one never seen ended). Re-proposing is safe: the state machine applies a status only
//! when it advances the task (`TaskState::can_advance_to`), so a report that commits late, or
//! twice, changes nothing it should not.
//!
//! Invariants: reports keep their arrival order (a retried batch goes before newer reports);
//! a batch is dropped only when the store refused it (it would be refused again), when this
//! controller no longer leads (sessions then end and agents re-send to the new leader), or
//! after `MAX_ATTEMPTS`; one proposal is in flight at a time.

use std::time::Duration;

use rudder_model::store::StatusUpdate;
use rudder_model::Command;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::raft_node::{RaftError, RaftHandle};

/// Attempts of one batch before it is dropped (each waits up to the raft call timeout).
pub const MAX_ATTEMPTS: u32 = 5;
/// Pause before a failed batch is proposed again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Where batches go: the raft group (`RaftSink`), or a recording fake in tests.
pub trait StatusSink: Send + Sync + 'static {
    /// Proposes one batch and waits until it is applied.
    fn propose(
        &self,
        updates: Vec<StatusUpdate>,
    ) -> impl std::future::Future<Output = Result<(), RaftError>> + Send;
    /// Whether this controller leads now.
    fn is_leader(&self) -> bool;
}

/// The real sink: proposals through this controller's raft node.
pub struct RaftSink(pub RaftHandle);

impl StatusSink for RaftSink {
    async fn propose(&self, updates: Vec<StatusUpdate>) -> Result<(), RaftError> {
        self.0.propose(Command::UpdateStatus { updates }).await
    }
    fn is_leader(&self) -> bool {
        self.0.status().is_leader
    }
}

/// Whether a batch that failed with `err` on its `attempt`-th try is proposed again.
pub fn retry(err: &RaftError, leader: bool, attempt: u32) -> bool {
    let refused = matches!(err, RaftError::Apply(_));
    leader && !refused && attempt < MAX_ATTEMPTS
}

/// Runs until every sender is gone: one proposal per batch of whatever reports are queued.
pub async fn run<S: StatusSink>(sink: S, mut rx: mpsc::Receiver<StatusUpdate>) {
    let mut updates: Vec<StatusUpdate> = Vec::new();
    let mut attempt = 0;
    loop {
        if updates.is_empty() {
            match rx.recv().await {
                Some(u) => updates.push(u),
                None => return,
            }
        }
        while let Ok(u) = rx.try_recv() {
            updates.push(u);
        }
        attempt += 1;
        let (n, began) = (updates.len(), std::time::Instant::now());
        let r = sink.propose(updates.clone()).await;
        debug!(
            n,
            attempt,
            commit_ms = began.elapsed().as_millis() as u64,
            "status batch"
        );
        match r {
            Ok(()) => {
                updates.clear();
                attempt = 0;
            }
            Err(e) if retry(&e, sink.is_leader(), attempt) => {
                warn!(%e, n, attempt, "status batch not committed: proposing it again");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(e) => {
                warn!(%e, n, attempt, "status batch dropped (agents re-send on their next session)");
                updates.clear();
                attempt = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::store::ApplyError;
    use rudder_model::{TaskState, TaskStatus};
    use std::sync::{Arc, Mutex};

    fn report(task: &str, state: TaskState) -> StatusUpdate {
        StatusUpdate {
            task_id: task.into(),
            node_id: "n1".into(),
            status: TaskStatus {
                state,
                message: String::new(),
                error: String::new(),
                container_id: String::new(),
                exit_code: None,
                timestamp: 1,
            },
        }
    }

    /// Records every proposal; fails the first `fail` of them with `err`.
    struct FakeSink {
        seen: Arc<Mutex<Vec<Vec<String>>>>,
        fail: Arc<Mutex<u32>>,
        err: fn() -> RaftError,
        leader: bool,
    }

    impl StatusSink for FakeSink {
        async fn propose(&self, updates: Vec<StatusUpdate>) -> Result<(), RaftError> {
            self.seen
                .lock()
                .expect("seen")
                .push(updates.iter().map(|u| u.task_id.clone()).collect());
            let mut fail = self.fail.lock().expect("fail");
            if *fail > 0 {
                *fail -= 1;
                return Err((self.err)());
            }
            Ok(())
        }
        fn is_leader(&self) -> bool {
            self.leader
        }
    }

    /// Sends `t1`, `t2` at once and `t3` after the first proposal; returns what was proposed.
    async fn drive(fail: u32, err: fn() -> RaftError, leader: bool) -> Vec<Vec<String>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = FakeSink {
            seen: seen.clone(),
            fail: Arc::new(Mutex::new(fail)),
            err,
            leader,
        };
        let (tx, rx) = mpsc::channel(16);
        tx.send(report("t1", TaskState::Starting))
            .await
            .expect("t1");
        tx.send(report("t2", TaskState::Running)).await.expect("t2");
        let batcher = tokio::spawn(run(sink, rx));
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send(report("t3", TaskState::Running)).await.expect("t3");
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(tx);
        batcher.await.expect("batcher");
        let v = seen.lock().expect("seen").clone();
        v
    }

    fn ids(v: &[&[&str]]) -> Vec<Vec<String>> {
        v.iter()
            .map(|b| b.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    #[test]
    fn which_failures_are_retried() {
        let timeout = RaftError::Timeout;
        let refused = RaftError::Apply(ApplyError::Malformed("x".into()));
        // (error, leader, attempt) → retried
        let table = [
            (&timeout, true, 1, true),
            (&timeout, true, MAX_ATTEMPTS - 1, true),
            (&timeout, true, MAX_ATTEMPTS, false),
            (&timeout, false, 1, false),
            (&refused, true, 1, false),
        ];
        for (err, leader, attempt, want) in table {
            assert_eq!(
                retry(err, leader, attempt),
                want,
                "{err} {leader} {attempt}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_commits_is_proposed_once() {
        let seen = drive(0, || RaftError::Timeout, true).await;
        assert_eq!(seen, ids(&[&["t1", "t2"], &["t3"]]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_batch_is_proposed_again_before_and_with_newer_reports() {
        // The first proposal times out; the leader lives on: the same reports go again, now
        // with the one that arrived meanwhile, in arrival order.
        let seen = drive(1, || RaftError::Timeout, true).await;
        assert_eq!(seen, ids(&[&["t1", "t2"], &["t1", "t2", "t3"]]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_dropped_when_refused_or_no_longer_leading() {
        let refused = || RaftError::Apply(ApplyError::Malformed("x".into()));
        assert_eq!(
            drive(1, refused, true).await,
            ids(&[&["t1", "t2"], &["t3"]])
        );
        assert_eq!(
            drive(1, || RaftError::Timeout, false).await,
            ids(&[&["t1", "t2"], &["t3"]])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_dropped_after_the_last_attempt() {
        // Still failing after the last attempt: nothing is proposed any more.
        let seen = drive(MAX_ATTEMPTS + 1, || RaftError::Timeout, true).await;
        assert_eq!(seen.len(), MAX_ATTEMPTS as usize, "{seen:?}");
    }
}

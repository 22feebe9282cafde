//! `WatchTasks`: a service's task listing, sent again each time a committed change alters it.
//! Clients that wait for a task's state (`rctl run` above all) get the change as soon as this
//! controller applies it, instead of polling `ListTasks`.
//!
//! Invariants: a listing comes from one applied store (never a mix of two); a listing equal to
//! the last one sent is not sent again; at most [`MAX_WATCHES`] streams are open per
//! controller (each holds a task and a store snapshot), the next is refused with
//! `resource_exhausted`; the stream ends after an empty listing once the service is removed;
//! only a named service is watched.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::Stream;
use rudder_model::{Store, Task};
use rudder_proto::v1::{ListTasksResponse, TaskSummary};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::debug;

use crate::raft_node::RaftHandle;

/// The most `WatchTasks` streams one controller serves at once.
pub const MAX_WATCHES: usize = 256;

/// What a `WatchTasks` call streams.
pub type WatchTasksStream = Pin<Box<dyn Stream<Item = Result<ListTasksResponse, Status>> + Send>>;

/// The count of open watches, shared by the handler and the streams it starts.
#[derive(Debug, Default, Clone)]
pub struct Watches(Arc<AtomicUsize>);

/// One open watch; the count goes down when the stream's task ends, however it ends.
struct Slot(Arc<AtomicUsize>);

impl Watches {
    fn take(&self) -> Result<Slot, Status> {
        let n = self.0.fetch_add(1, Ordering::AcqRel);
        if n >= MAX_WATCHES {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return Err(Status::resource_exhausted(format!(
                "watch: this controller already serves {MAX_WATCHES} task watches; retry later"
            )));
        }
        Ok(Slot(self.0.clone()))
    }

    /// Streams open now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The tasks of `service` (every service when empty), ordered by service, slot, newest first;
/// `not_found` when the service does not exist.
pub fn task_list(store: &Store, service: &str) -> Result<Vec<TaskSummary>, Status> {
    let mut tasks: Vec<&Task> = if service.is_empty() {
        store.tasks.values().collect()
    } else {
        let svc = crate::resolve::find_service(store, service)?;
        store.tasks_of(&svc.id).collect()
    };
    tasks.sort_by(|a, b| {
        (&a.service_name, a.slot, std::cmp::Reverse(a.created_at)).cmp(&(
            &b.service_name,
            b.slot,
            std::cmp::Reverse(b.created_at),
        ))
    });
    Ok(tasks
        .into_iter()
        .map(|t| crate::convert::task_summary(store, t))
        .collect())
}

/// Starts a watch of `service`: `not_found` at once if it does not exist. A service must be
/// named: a watch of every task would send the whole cluster's listing on each commit, which
/// at scale outgrows a message (and a reader's patience); `ListTasks` lists them all once.
pub fn watch_tasks(
    raft: &RaftHandle,
    watches: &Watches,
    service: String,
) -> Result<WatchTasksStream, Status> {
    if service.is_empty() {
        return Err(Status::invalid_argument(
            "watch: service: name the service to watch (ListTasks lists every task)",
        ));
    }
    let mut store_rx = raft.watch_store();
    let first = task_list(&store_rx.borrow_and_update(), &service)?;
    let slot = watches.take()?;
    // One listing in flight is enough: a slow reader gets the newest listing, not a backlog.
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let _slot = slot;
        let mut last = first;
        if tx
            .send(Ok(ListTasksResponse {
                tasks: last.clone(),
            }))
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                changed = store_rx.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
            let store = store_rx.borrow_and_update().clone();
            let (now, gone) = match task_list(&store, &service) {
                Ok(t) => (t, false),
                Err(_) => (Vec::new(), true),
            };
            if now != last || gone {
                last = now;
                let msg = ListTasksResponse {
                    tasks: last.clone(),
                };
                if tx.send(Ok(msg)).await.is_err() || gone {
                    debug!(%service, gone, "task watch ended");
                    return;
                }
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_are_bounded_and_released() {
        let w = Watches::default();
        let slots: Vec<Slot> = (0..MAX_WATCHES).map(|_| w.take().unwrap()).collect();
        let Err(refused) = w.take() else {
            panic!("one more than the limit was allowed");
        };
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(w.open(), MAX_WATCHES);
        drop(slots);
        assert_eq!(w.open(), 0);
        assert!(w.take().is_ok());
    }

    /// A watch must name its service (a cluster-wide one would resend every task on each
    /// commit); one of a service that does not exist is refused at once; neither takes a slot.
    #[tokio::test(start_paused = true)]
    async fn a_watch_names_an_existing_service() {
        let raft = crate::raft_node::start(
            1,
            crate::raft_sim::SimStorage::new(vec![1]),
            Arc::new(crate::transport::NoopTransport),
        )
        .expect("start raft");
        let w = Watches::default();
        let Err(e) = watch_tasks(&raft, &w, String::new()) else {
            panic!("a cluster-wide watch was started");
        };
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("service"), "{e}");
        let Err(e) = watch_tasks(&raft, &w, "nope".into()) else {
            panic!("a watch of a missing service was started");
        };
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert_eq!(w.open(), 0);
    }
}

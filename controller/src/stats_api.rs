//! `Stats` (`rctl stats`) and the autoscaler's part of service summaries: the usage book's
//! latest sample per running task, and the recorded scale decisions in wire form.

use rudder_model::{Store, TaskState};
use rudder_proto::v1::{AutoscaleDecision, StatsResponse, TaskStats};
use tonic::Status;

use crate::raft_node::RaftHandle;
use crate::usage::UsageBook;

/// The latest sample of each running task of `service` (every service when empty). Samples
/// reach only the leader: a follower says so rather than answer with nothing.
pub fn stats(
    raft: &RaftHandle,
    book: &UsageBook,
    service: &str,
    now: u64,
) -> Result<StatsResponse, Status> {
    if !raft.status().is_leader {
        return Err(Status::failed_precondition(
            "usage samples are kept by the leader only: ask the leader (rctl cluster info)",
        ));
    }
    let store = raft.store();
    if !service.is_empty() {
        crate::resolve::find_service(&store, service)?;
    }
    Ok(StatsResponse {
        tasks: running(&store, service)
            .filter_map(|t| {
                let s = book.latest(&t.id)?;
                let node = t
                    .node_id
                    .as_ref()
                    .and_then(|n| store.nodes.get(n))
                    .map(|n| n.hostname.clone())
                    .unwrap_or_default();
                Some(TaskStats {
                    task_id: t.id.clone(),
                    name: t.name(),
                    node,
                    cpu_milli: s.cpu_millis,
                    memory_bytes: s.memory_bytes,
                    age_ms: now.saturating_sub(s.at),
                })
            })
            .collect(),
    })
}

fn running<'a>(store: &'a Store, service: &'a str) -> impl Iterator<Item = &'a rudder_model::Task> {
    store.tasks.values().filter(move |t| {
        (service.is_empty() || t.service_name == service)
            && t.desired_state == TaskState::Running
            && t.status.state == TaskState::Running
    })
}

/// A service's recorded decisions, oldest first, for its summary.
pub fn decisions(svc: &rudder_model::Service) -> Vec<AutoscaleDecision> {
    svc.autoscale_decisions
        .iter()
        .map(|d| AutoscaleDecision {
            at_ms: d.at,
            from: d.from,
            to: d.to,
            reason: d.reason.clone(),
        })
        .collect()
}

//! The leader's control loop: whenever the store changes (or a second passes, for time-based
//! decisions such as restart delays), run the pure `plan_pass` over a store snapshot and propose
//! its one batch. Passes are sequential: the next pass starts only after the previous batch
//! was applied, so a plan is never proposed twice.

use std::time::Duration;

use rudder_model::reconcile::plan_pass;
use tracing::{debug, warn};

use crate::raft_node::{Proposal, RaftHandle};
use crate::{new_id, now_ms};
use rudder_model::store::Envelope;

pub async fn run(raft: RaftHandle) {
    let mut store_rx = raft.watch_store();
    let mut status_rx = raft.watch_status();
    // The term in which this node, as leader, has applied everything committed before it.
    let mut caught_up_term = 0;
    loop {
        let st = status_rx.borrow_and_update().clone();
        if st.is_leader && caught_up_term != st.term {
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
            let mut ids = new_id;
            if let Some(cmd) = plan_pass(&store, now_ms(), &mut ids) {
                debug!("proposing control-loop batch");
                // Never forwarded: a plan made by a leader that lost its role is dropped.
                let proposal = Proposal::Command(Envelope::new(cmd).encode());
                if let Err(e) = raft.propose_local(proposal).await {
                    warn!(%e, "control-loop batch not committed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                continue;
            }
        }
        tokio::select! {
            r = store_rx.changed() => if r.is_err() { return },
            r = status_rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The control loop against a one-member raft group on in-memory storage (the real Ready loop)
/// on a paused clock: what it proposes is observed in the applied store.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft_sim::SimStorage;
    use crate::transport::NoopTransport;
    use rudder_model::store::{NodeResources, NodeRole};
    use rudder_model::{Command, ServiceSpec, Store, TaskState};

    fn put_node(id: &str, ip: u8) -> Command {
        Command::PutNode {
            id: id.into(),
            hostname: format!("host-{id}"),
            addr: format!("10.0.0.{ip}:4243"),
            labels: Default::default(),
            role: NodeRole::Worker,
            resources: NodeResources::default(),
            now: 1,
            cert_not_after: 0,
        }
    }

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

    use std::sync::Arc;

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
}

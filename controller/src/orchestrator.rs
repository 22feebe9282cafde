//! The leader's control loop: whenever the store changes (or a second passes, for time-based
//! decisions such as restart delays), run the pure `plan_pass` over a store snapshot and propose
//! its one batch. Passes are sequential: the next pass starts only after the previous batch
//! was applied, so a plan is never proposed twice.

use std::time::Duration;

use rudder_model::reconcile::plan_pass;
use tracing::{debug, warn};

use crate::raft_node::RaftHandle;
use crate::{new_id, now_ms};

pub async fn run(raft: RaftHandle) {
    let mut store_rx = raft.watch_store();
    let mut status_rx = raft.watch_status();
    loop {
        if status_rx.borrow_and_update().is_leader {
            let store = store_rx.borrow_and_update().clone();
            let mut ids = new_id;
            if let Some(cmd) = plan_pass(&store, now_ms(), &mut ids) {
                debug!("proposing control-loop batch");
                if let Err(e) = raft.propose(cmd).await {
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

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

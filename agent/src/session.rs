//! The agent's one stream to the controller: register, heartbeat, report status in batches,
//! receive the full assignment set. Reconnects with backoff whenever the stream breaks, and
//! re-sends every task's last status on a new stream so nothing reported is lost.

use std::sync::Arc;
use std::time::Duration;

use rudder_model::Task;
use rudder_proto::v1::agent_message::Msg as Up;
use rudder_proto::v1::controller_message::Msg as Down;
use rudder_proto::v1::dispatcher_client::DispatcherClient;
use rudder_proto::v1::*;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::worker::Worker;

pub struct Identity {
    pub node_id: String,
    pub hostname: String,
    pub addr: String,
    /// Capacity offered to the scheduler.
    pub cpus_milli: u64,
    pub memory_bytes: u64,
    /// `worker` or `manager`.
    pub role: String,
}

pub async fn run(
    controller: String,
    me: Identity,
    worker: Arc<Worker>,
    mut status_rx: mpsc::UnboundedReceiver<TaskStatusReport>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&controller, &me, &worker, &mut status_rx).await {
            Ok(()) => info!("session ended"),
            Err(e) => warn!(%e, controller = %controller, "session failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn session(
    controller: &str,
    me: &Identity,
    worker: &Arc<Worker>,
    status_rx: &mut mpsc::UnboundedReceiver<TaskStatusReport>,
) -> Result<(), String> {
    let endpoint = tonic::transport::Endpoint::from_shared(controller.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_keepalive(Some(Duration::from_secs(5)));
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut client = DispatcherClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(64);
    tx.send(AgentMessage {
        msg: Some(Up::Register(Register {
            node_id: me.node_id.clone(),
            hostname: me.hostname.clone(),
            addr: me.addr.clone(),
            cpus_milli: me.cpus_milli,
            memory_bytes: me.memory_bytes,
            role: me.role.clone(),
        })),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut down = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    info!(controller, "session open");
    let resend = worker.last_statuses();
    if !resend.is_empty() {
        let _ = tx
            .send(AgentMessage {
                msg: Some(Up::Status(StatusBatch { reports: resend })),
            })
            .await;
    }
    let mut heartbeat = tokio::time::interval(Duration::from_millis(1000));
    loop {
        tokio::select! {
            msg = down.message() => {
                let Some(msg) = msg.map_err(|e| e.message().to_string())? else {
                    return Ok(());
                };
                match msg.msg {
                    Some(Down::Welcome(w)) => {
                        *worker.ctx().registry.lock().expect("registry lock") = w.registry;
                        heartbeat = tokio::time::interval(Duration::from_millis(
                            u64::from(w.heartbeat_period_ms.max(100)),
                        ));
                    }
                    Some(Down::Assignments(a)) => {
                        let tasks: Vec<Task> = a
                            .tasks
                            .iter()
                            .filter_map(|t| match serde_json::from_str(&t.task_json) {
                                Ok(t) => Some(t),
                                Err(e) => {
                                    warn!(task = %t.task_id, %e, "unreadable assignment");
                                    None
                                }
                            })
                            .collect();
                        worker.sync(tasks);
                    }
                    None => {}
                }
            }
            r = status_rx.recv() => {
                let Some(first) = r else { return Ok(()) };
                let mut reports = vec![first];
                while let Ok(r) = status_rx.try_recv() {
                    reports.push(r);
                }
                tx.send(AgentMessage { msg: Some(Up::Status(StatusBatch { reports })) })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            _ = heartbeat.tick() => {
                tx.send(AgentMessage { msg: Some(Up::Heartbeat(Heartbeat {})) })
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
}

//! Exec, cp and inspect in the Control API: a task named by id, id prefix or name is found in
//! the store, and the call is relayed to the agent of the task's host (mutual TLS, as logs).
//!
//! Invariants: only a task observed running is exec'd into or copied from/to — anything else
//! is refused with its state, before any host is dialled; an unreachable host is an error
//! naming it, within seconds, never a hang; a caller that goes away mid-call resets the
//! agent's call too (the agent then ends the command, or drops a half-received upload).

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use rudder_proto::v1::{
    copy_to_input, exec_input, CopyFromRequest, CopyToInput, CopyToResponse, ExecInput, ExecOutput,
    InspectContainerRequest, InspectRequest, InspectResponse, TarChunk,
};
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use crate::agents::AgentAt;
use crate::context::ApiContext;
use crate::convert::node_summary;
use crate::resolve::{one_task, running_task};

pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecOutput, Status>> + Send>>;
pub type TarStream = Pin<Box<dyn Stream<Item = Result<TarChunk, Status>> + Send>>;

/// How long a host may take to say what it knows of a container.
const INSPECT: Duration = Duration::from_secs(5);

/// An agent's verdict on a copy, said about the task: a missing path is named.
fn copy_status(s: Status, task: &str, at: &AgentAt) -> Status {
    match s.code() {
        tonic::Code::NotFound => {
            Status::not_found(format!("no such file in {task}: {}", s.message()))
        }
        _ => crate::agents::relay_error(at, task, s),
    }
}

pub async fn exec(
    api: &ApiContext,
    req: Request<Streaming<ExecInput>>,
) -> Result<Response<ExecStream>, Status> {
    let mut input = req.into_inner();
    let mut start = match input.message().await? {
        Some(ExecInput {
            msg: Some(exec_input::Msg::Start(s)),
        }) => s,
        _ => {
            return Err(Status::invalid_argument(
                "exec: the first message must name the task and the command",
            ))
        }
    };
    if start.cmd.is_empty() {
        return Err(Status::invalid_argument("exec: no command given"));
    }
    let store = api.raft.store();
    let (task, at) = running_task(&store, &start.task)?;
    let name = task.name();
    start.task = task.id.clone();
    let mut client = api.agents.dial_kept(&at, None).await?;
    info!(task = %name, host = %at.host, cmd = ?start.cmd, "exec");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let _ = tx
        .send(ExecInput {
            msg: Some(exec_input::Msg::Start(start)),
        })
        .await;
    // The caller's inputs go on to the agent; when the caller goes away, tonic drops the
    // response stream below, which resets the agent's call.
    tokio::spawn(async move {
        while let Some(Ok(m)) = input.next().await {
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let out = client
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| crate::agents::relay_error(&at, &name, s))?
        .into_inner();
    Ok(Response::new(Box::pin(out)))
}

pub async fn copy_from(
    api: &ApiContext,
    req: Request<CopyFromRequest>,
) -> Result<Response<TarStream>, Status> {
    let mut req = req.into_inner();
    let store = api.raft.store();
    let (task, at) = running_task(&store, &req.task)?;
    let name = task.name();
    req.task = task.id.clone();
    let mut client = api.agents.dial_kept(&at, None).await?;
    info!(task = %name, path = %req.path, "copy from container");
    let stream = client
        .copy_from(req)
        .await
        .map_err(|s| copy_status(s, &name, &at))?
        .into_inner();
    Ok(Response::new(Box::pin(
        stream.map(move |r| r.map_err(|s| copy_status(s, &name, &at))),
    )))
}

pub async fn copy_to(
    api: &ApiContext,
    req: Request<Streaming<CopyToInput>>,
) -> Result<Response<CopyToResponse>, Status> {
    let mut input = req.into_inner();
    let mut start = match input.message().await? {
        Some(CopyToInput {
            msg: Some(copy_to_input::Msg::Start(s)),
        }) => s,
        _ => {
            return Err(Status::invalid_argument(
                "copy: the first message must name the task and the destination",
            ))
        }
    };
    let store = api.raft.store();
    let (task, at) = running_task(&store, &start.task)?;
    let name = task.name();
    start.task = task.id.clone();
    let mut client = api.agents.dial_kept(&at, None).await?;
    info!(task = %name, path = %start.path, "copy into container");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let _ = tx
        .send(CopyToInput {
            msg: Some(copy_to_input::Msg::Start(start)),
        })
        .await;
    // An upload that breaks off must not look complete to the agent: the call is dropped
    // (which resets it) instead of ending its stream.
    let (broke_tx, broke_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        loop {
            match input.next().await {
                Some(Ok(m)) => {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    let _ = broke_tx.send(e.message().to_string());
                    return;
                }
                None => return,
            }
        }
    });
    let call = client.copy_to(tokio_stream::wrappers::ReceiverStream::new(rx));
    tokio::select! {
        r = call => r.map_err(|s| copy_status(s, &name, &at)),
        Ok(why) = broke_rx => Err(Status::aborted(format!("copy: the upload broke off: {why}"))),
    }
}

pub async fn inspect(
    api: &ApiContext,
    req: Request<InspectRequest>,
) -> Result<Response<InspectResponse>, Status> {
    let target = req.into_inner().task;
    let store = api.raft.store();
    let task = one_task(&store, &target)?;
    let node = task.node_id.as_ref().and_then(|n| store.nodes.get(n));
    let mut resp = InspectResponse {
        task_json: crate::convert::json("task", task)?,
        node: node.map(|n| node_summary(&store, n)),
        container: None,
        warning: String::new(),
    };
    let Some(node) = node else {
        resp.warning = "the task has no node yet".into();
        return Ok(Response::new(resp));
    };
    let ask = async {
        let mut client = api.agents.dial_kept(&node.into(), None).await?;
        client
            .inspect_container(InspectContainerRequest {
                task_id: task.id.clone(),
            })
            .await
            .map(|r| r.into_inner())
    };
    match tokio::time::timeout(INSPECT, ask).await {
        Ok(Ok(info)) => resp.container = Some(info),
        Ok(Err(s)) => {
            resp.warning = format!("host {}: {}", node.hostname, s.message());
        }
        Err(_) => {
            resp.warning = format!(
                "host {} ({}) did not answer within {INSPECT:?}",
                node.hostname, node.addr
            );
        }
    }
    Ok(Response::new(resp))
}

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
use rudder_model::{Store, Task, TaskState};
use rudder_proto::v1::agent_api_client::AgentApiClient;
use rudder_proto::v1::{
    copy_to_input, exec_input, CopyFromRequest, CopyToInput, CopyToResponse, ExecInput, ExecOutput,
    InspectContainerRequest, InspectRequest, InspectResponse, TarChunk,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use crate::api::{node_summary, resolve_tasks, ControlApi};

pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecOutput, Status>> + Send>>;
pub type TarStream = Pin<Box<dyn Stream<Item = Result<TarChunk, Status>> + Send>>;

/// How long dialling a host may take.
const CONNECT: Duration = Duration::from_secs(2);
/// How long a host may take to say what it knows of a container.
const INSPECT: Duration = Duration::from_secs(5);

/// The one task `target` names: by id, name or id prefix, `SERVICE.SLOT` (its running
/// task, else its latest), or a service with exactly one running task.
pub fn one_task<'a>(store: &'a Store, target: &str) -> Result<&'a Task, Status> {
    let mut tasks = resolve_tasks(store, target);
    if tasks.is_empty() {
        if let Some(t) = by_slot(store, target) {
            tasks.push(t);
        }
    }
    match tasks.as_slice() {
        [] => Err(Status::not_found(format!(
            "no task named {target:?} (see `rctl ps`)"
        ))),
        [t] => Ok(t),
        many => {
            let running: Vec<&&Task> = many
                .iter()
                .filter(|t| {
                    t.status.state == TaskState::Running && t.desired_state == TaskState::Running
                })
                .collect();
            if store.services.contains_key(target) && running.len() == 1 {
                return Ok(running[0]);
            }
            let names: Vec<String> = running.iter().map(|t| t.name()).collect();
            Err(Status::invalid_argument(format!(
                "{target:?} names {} tasks; name one{}",
                many.len(),
                if names.is_empty() {
                    String::new()
                } else {
                    format!(" (running: {})", names.join(", "))
                }
            )))
        }
    }
}

/// `SERVICE.SLOT`: the slot's running task, else its most recent one.
fn by_slot<'a>(store: &'a Store, target: &str) -> Option<&'a Task> {
    let (service, slot) = target.rsplit_once('.')?;
    let slot: u64 = slot.parse().ok()?;
    let svc = store.services.get(service)?;
    let mut tasks: Vec<&Task> = store.tasks_of(&svc.id).filter(|t| t.slot == slot).collect();
    tasks.sort_by_key(|t| {
        (
            t.status.state == TaskState::Running && t.desired_state == TaskState::Running,
            t.created_at,
        )
    });
    tasks.pop()
}

/// Which agent to dial: the node id its certificate must name, its address, its hostname.
#[derive(Debug, Clone)]
pub(crate) struct AgentAt {
    pub id: String,
    pub addr: String,
    pub host: String,
}

impl From<&rudder_model::store::Node> for AgentAt {
    fn from(n: &rudder_model::store::Node) -> Self {
        AgentAt {
            id: n.id.clone(),
            addr: n.addr.clone(),
            host: n.hostname.clone(),
        }
    }
}

/// A task that must be running, and its host's agent.
fn running_task<'a>(store: &'a Store, target: &str) -> Result<(&'a Task, AgentAt), Status> {
    let t = one_task(store, target)?;
    if t.status.state != TaskState::Running {
        return Err(Status::failed_precondition(format!(
            "task {} is not running (state: {})",
            t.name(),
            t.status.state
        )));
    }
    let node = t
        .node_id
        .as_ref()
        .and_then(|n| store.nodes.get(n))
        .ok_or_else(|| Status::failed_precondition(format!("task {} has no node", t.name())))?;
    Ok((t, node.into()))
}

/// A client of the agent `at`, or an error naming the host. The agent must present a
/// certificate for `at.id` (C1: a node that registered another's address cannot answer).
pub(crate) async fn agent(
    api: &ControlApi,
    at: &AgentAt,
) -> Result<AgentApiClient<Channel>, Status> {
    let certs = api.agent_tls.read().expect("agent tls lock").clone();
    let (addr, host) = (&at.addr, &at.host);
    // Not `unavailable`: that would read as this controller being down.
    let unreachable =
        |e: String| Status::failed_precondition(format!("cannot reach host {host} ({addr}): {e}"));
    let endpoint = agent_endpoint(certs.as_ref(), at)
        .map_err(&unreachable)?
        .connect_timeout(CONNECT)
        .tcp_keepalive(Some(Duration::from_secs(5)))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    match tokio::time::timeout(CONNECT * 2, endpoint.connect()).await {
        Ok(Ok(ch)) => Ok(AgentApiClient::new(ch)),
        Ok(Err(e)) => Err(unreachable(rudder_proto::error_chain(&e))),
        Err(_) => Err(unreachable("timed out".into())),
    }
}

/// An endpoint for the agent `at`: mutual TLS that accepts only `at.id`'s certificate (plain
/// http only in tests that run without certificates).
pub(crate) fn agent_endpoint(
    certs: Option<&rudder_pki::tls::NodeCerts>,
    at: &AgentAt,
) -> Result<tonic::transport::Endpoint, String> {
    let scheme = if certs.is_some() { "https" } else { "http" };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", at.addr))
        .map_err(|e| e.to_string())?;
    match certs {
        Some(c) => {
            rudder_pki::tls::node_endpoint(endpoint, c, rudder_pki::ca::Role::Worker, &at.id)
                .map_err(|e| e.to_string())
        }
        None => Ok(endpoint),
    }
}

/// An agent's verdict on a copy, said about the task: a missing path is named.
fn copy_status(s: Status, task: &str) -> Status {
    match s.code() {
        tonic::Code::NotFound => {
            Status::not_found(format!("no such file in {task}: {}", s.message()))
        }
        code => Status::new(code, format!("{task}: {}", s.message())),
    }
}

pub async fn exec(
    api: &ControlApi,
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
    let mut client = agent(api, &at).await?;
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
        .map_err(|s| Status::new(s.code(), format!("{name}: {}", s.message())))?
        .into_inner();
    Ok(Response::new(Box::pin(out)))
}

pub async fn copy_from(
    api: &ControlApi,
    req: Request<CopyFromRequest>,
) -> Result<Response<TarStream>, Status> {
    let mut req = req.into_inner();
    let store = api.raft.store();
    let (task, at) = running_task(&store, &req.task)?;
    let name = task.name();
    req.task = task.id.clone();
    let mut client = agent(api, &at).await?;
    info!(task = %name, path = %req.path, "copy from container");
    let stream = client
        .copy_from(req)
        .await
        .map_err(|s| copy_status(s, &name))?
        .into_inner();
    Ok(Response::new(Box::pin(
        stream.map(move |r| r.map_err(|s| copy_status(s, &name))),
    )))
}

pub async fn copy_to(
    api: &ControlApi,
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
    let mut client = agent(api, &at).await?;
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
        r = call => r.map_err(|s| copy_status(s, &name)),
        Ok(why) = broke_rx => Err(Status::aborted(format!("copy: the upload broke off: {why}"))),
    }
}

pub async fn inspect(
    api: &ControlApi,
    req: Request<InspectRequest>,
) -> Result<Response<InspectResponse>, Status> {
    let target = req.into_inner().task;
    let store = api.raft.store();
    let task = one_task(&store, &target)?;
    let node = task.node_id.as_ref().and_then(|n| store.nodes.get(n));
    let mut resp = InspectResponse {
        task_json: serde_json::to_string(task)
            .map_err(|e| Status::internal(format!("inspect: {e}")))?,
        node: node.map(|n| node_summary(&store, n)),
        container: None,
        warning: String::new(),
    };
    let Some(node) = node else {
        resp.warning = "the task has no node yet".into();
        return Ok(Response::new(resp));
    };
    let ask = async {
        let mut client = agent(api, &node.into()).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::{Command, ServiceSpec};
    use serde_json::json;

    /// Service web: slot 1 has a finished and a running task, slot 2 a failed one.
    fn store() -> Store {
        let mut s = Store::default();
        let spec: ServiceSpec =
            serde_json::from_value(json!({"name": "web", "image": "busybox", "replicas": 2}))
                .unwrap();
        s.apply(
            1,
            Command::PutService {
                id: "svc".into(),
                spec: Box::new(spec.clone()),
                now: 0,
            },
        )
        .unwrap();
        let task = |id: &str, slot: u64, state: &str, created: u64| -> Task {
            serde_json::from_value(json!({
                "id": id, "service_id": "svc", "service_name": "web", "slot": slot,
                "spec": spec, "spec_version": 1, "node_id": null, "desired_state": "running",
                "status": {"state": state, "timestamp": 0}, "created_at": created, "version": 0,
            }))
            .unwrap()
        };
        let tasks = vec![
            task("aaaa1111", 1, "complete", 1),
            task("bbbb2222", 1, "running", 2),
            task("cccc3333", 2, "failed", 3),
        ];
        s.apply(2, Command::CreateTasks { tasks }).unwrap();
        s
    }

    #[test]
    fn a_task_is_named_by_name_id_prefix_slot_or_its_service() {
        let s = store();
        let id = |target: &str| one_task(&s, target).map(|t| t.id.clone());
        assert_eq!(id("web.1.bbbb2222").unwrap(), "bbbb2222");
        assert_eq!(id("aaaa").unwrap(), "aaaa1111");
        // A slot: its running task, else its latest.
        assert_eq!(id("web.1").unwrap(), "bbbb2222");
        assert_eq!(id("web.2").unwrap(), "cccc3333");
        // A service with one running task.
        assert_eq!(id("web").unwrap(), "bbbb2222");
        assert_eq!(id("nope").unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(id("web.3").unwrap_err().code(), tonic::Code::NotFound);
    }

    #[test]
    fn a_task_that_is_not_running_is_refused_with_its_state() {
        let s = store();
        let e = running_task(&s, "web.2").unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            e.message(),
            "task web.2.cccc3333 is not running (state: failed)"
        );
        // Running, but not placed: nowhere to go.
        let e = running_task(&s, "web.1").unwrap_err();
        assert_eq!(e.message(), "task web.1.bbbb2222 has no node");
    }
}

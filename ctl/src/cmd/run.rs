//! `rctl run [--rm] [--node NODE] [--name NAME] IMAGE [CMD…]`: a one-off container, like
//! `docker run`. It is a job of one completion that is never retried (`replicated-job`,
//! restart `none`: the cluster places, starts, logs and reports it like any task, and `rctl
//! ps` shows the job complete or failed); rctl streams its output and exits with the
//! container's exit code. `--rm` removes the job afterwards; the job is also marked
//! `auto_remove`, so the cluster removes it a little later if this client is killed first.

use std::io::Write;
use std::time::Duration;

use rudder_model::spec::{RestartCondition, ServiceSpec};
use rudder_model::TaskState;
use rudder_proto::v1::{
    ApplyRequest, ListTasksRequest, ListTasksResponse, LogsRequest, RemoveServiceRequest,
    TaskSummary,
};

use crate::Client;

use crate::context::Context;

pub struct RunArgs<'a> {
    pub image: &'a str,
    pub command: &'a [String],
    pub node: Option<&'a str>,
    pub name: Option<&'a str>,
    pub rm: bool,
    pub env: &'a [String],
    pub network_mode: Option<&'a str>,
}

/// Runs the container to its end; returns its exit code.
pub async fn run(ctx: &Context, a: RunArgs<'_>) -> anyhow::Result<i32> {
    let name = match a.name {
        Some(n) => n.to_string(),
        None => format!("run-{:06x}", rand_suffix()),
    };
    let mut spec = serde_json::json!({
        "name": name,
        "image": a.image,
        "mode": "replicated-job",
        "restart": {"condition": "none"},
        "stop_grace_period": 2,
    });
    if a.rm {
        // The cluster removes it too, should this client die before it can (see below).
        spec["auto_remove"] = true.into();
    }
    if !a.command.is_empty() {
        spec["command"] = serde_json::json!(a.command);
    }
    if let Some(n) = a.node {
        spec["placement"] = serde_json::json!({"constraints": [format!("node.hostname=={n}")]});
    }
    if let Some(m) = a.network_mode {
        spec["network_mode"] = serde_json::json!(m);
    }
    let mut env = serde_json::Map::new();
    for kv in a.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--env {kv:?}: expected KEY=VALUE"))?;
        env.insert(k.to_string(), v.into());
    }
    if !env.is_empty() {
        spec["env"] = env.into();
    }
    let spec: ServiceSpec = serde_json::from_value(spec)?;
    debug_assert_eq!(spec.restart.condition, RestartCondition::None);
    debug_assert_eq!(rudder_model::job::completions(&spec), 1);
    spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    // One connection for the whole run: apply, the task watch, the logs and the removal
    // share it (each new mutual-TLS connection costs a handshake and a credentials read).
    let mut client = crate::connect(ctx).await?;
    client
        .apply(ApplyRequest {
            service_specs_json: vec![crate::convert::to_json("service", &spec)?],
            ..Default::default()
        })
        .await
        .map_err(crate::status_err)?;

    let result = follow(&mut client, &name).await;
    if a.rm {
        let _ = client
            .remove_service(RemoveServiceRequest { name: name.clone() })
            .await;
    }
    result
}

/// The newest task of a service, as committed changes arrive (`WatchTasks`: no polling).
struct TaskWatch {
    service: String,
    stream: tonic::Streaming<ListTasksResponse>,
}

impl TaskWatch {
    async fn start(client: &mut Client, service: &str) -> anyhow::Result<TaskWatch> {
        let stream = client
            .watch_tasks(ListTasksRequest {
                service: service.to_string(),
            })
            .await
            .map_err(crate::status_err)?
            .into_inner();
        Ok(TaskWatch {
            service: service.to_string(),
            stream,
        })
    }

    /// The service's newest task once `until` holds for its state (or it is terminal).
    async fn until(
        &mut self,
        until: impl Fn(TaskState) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<TaskSummary> {
        let mut newest: Option<TaskSummary> = None;
        let wait = async {
            while let Some(list) = self.stream.message().await.map_err(crate::status_err)? {
                if let Some(t) = list.tasks.into_iter().max_by_key(|t| t.timestamp_ms) {
                    let state = crate::convert::task_state(t.state);
                    if state.is_some_and(|s| until(s) || s.is_terminal()) {
                        return Ok(t);
                    }
                    newest = Some(t);
                }
            }
            anyhow::bail!("{}: the service was removed", self.service)
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => match &newest {
                Some(t) => anyhow::bail!(
                    "{}: still {} ({})",
                    t.name,
                    crate::convert::task_state_name(t.state),
                    t.message
                ),
                None => anyhow::bail!("{}: no task was created", self.service),
            },
        }
    }
}

/// Waits for the task to start, streams its output, then returns its exit code.
async fn follow(client: &mut Client, name: &str) -> anyhow::Result<i32> {
    let mut watch = TaskWatch::start(client, name).await?;
    let started = watch
        .until(|s| s >= TaskState::Running, Duration::from_secs(120))
        .await?;
    if crate::convert::task_state(started.state) == Some(TaskState::Rejected) {
        anyhow::bail!(
            "{}: rejected: {} {}",
            started.name,
            started.message,
            started.error
        );
    }
    let mut stream = client
        .logs(LogsRequest {
            target: started.id.clone(),
            tail: 0,
            follow: true,
            timestamps: false,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let mut out = std::io::stdout();
    let mut exit_code = None;
    while let Some(chunk) = stream.message().await.map_err(crate::status_err)? {
        if !chunk.warning.is_empty() {
            eprintln!("warning: {}", chunk.warning);
            continue;
        }
        if chunk.has_exit_code {
            exit_code = Some(chunk.exit_code);
        }
        out.write_all(&chunk.data)?;
        out.flush()?;
    }
    // The log's end carries the exit code: no need to wait for the agent's report of it
    // to be committed and watched.
    if let Some(code) = exit_code {
        return Ok(code);
    }
    let done = if crate::convert::task_state(started.state).is_some_and(|s| s.is_terminal()) {
        started
    } else {
        watch
            .until(|s| s.is_terminal(), Duration::from_secs(30))
            .await?
    };
    if crate::convert::task_state(done.state) == Some(TaskState::Failed) && !done.has_exit_code {
        anyhow::bail!("{}: {} {}", done.name, done.message, done.error);
    }
    Ok(if done.has_exit_code {
        done.exit_code
    } else {
        0
    })
}

fn rand_suffix() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ std::process::id().rotate_left(12)) & 0xff_ffff
}

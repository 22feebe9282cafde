//! `rctl inspect TASK`: one task as JSON — its spec, status, node and network addresses from
//! the cluster's store, and what its host knows of its container (pids, paths). When the host
//! cannot be asked, the store's part is still printed, with a warning.

use rudder_proto::v1::{ContainerInfo, InspectRequest};

use crate::context::Context;
use crate::output::OutputFormat;

fn container_json(c: &ContainerInfo) -> serde_json::Value {
    serde_json::json!({
        "id": c.container_id,
        "running": c.running,
        "pid": c.pid,
        "shim_pid": c.shim_pid,
        "exit_code": c.has_exit_code.then_some(c.exit_code),
        "runtime": c.runtime,
        "dir": c.dir,
        "bundle": c.bundle,
        "rootfs": c.rootfs,
        "log_path": c.log_path,
    })
}

pub async fn run(ctx: &Context, task: &str, output: OutputFormat) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .inspect(InspectRequest {
            task: task.to_string(),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let parsed: rudder_model::Task = crate::convert::from_json("task", &resp.task_json)?;
    let mut out = serde_json::json!({
        "name": parsed.name(),
        "id": parsed.id,
        "service": parsed.service_name,
        "state": parsed.status.state.to_string(),
        "desired_state": parsed.desired_state.to_string(),
        "node": resp.node.as_ref().map(super::node::to_json),
        "networks": parsed.networks,
        "container": resp.container.as_ref().map(container_json),
        "task": crate::convert::from_json::<serde_json::Value>("task", &resp.task_json)?,
    });
    if !resp.warning.is_empty() {
        eprintln!("warning: {}", resp.warning);
        out["warning"] = resp.warning.into();
    }
    crate::output::print_object(output, &out)
}

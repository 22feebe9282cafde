//! `rctl ps [SERVICE]`: every task with its node, state, container and error (history
//! included, newest first per slot), then each job's progress (`batch: job running: 2/5
//! completed, 1 running, 0 failed`).

use rudder_proto::v1::TaskSummary;

use std::io::Write;

use crate::context::Context;
use crate::convert::{task_state, task_state_name};
use crate::output::{self, OutputFormat};
use rudder_model::TaskState;

pub fn to_json(t: &TaskSummary) -> serde_json::Value {
    serde_json::json!({
        "id": t.id, "name": t.name, "service": t.service, "slot": t.slot,
        "node": t.node, "node_id": t.node_id,
        "desired_state": task_state_name(t.desired_state),
        "state": task_state_name(t.state), "message": t.message, "error": t.error,
        "container_id": t.container_id,
        "exit_code": if t.has_exit_code { Some(t.exit_code) } else { None },
        "timestamp_ms": t.timestamp_ms, "image": t.image,
    })
}

/// The table of `rctl ps`: a task's state says what it is heading for when that is not
/// running, and a pending task's message says why it waits.
pub fn write_table(w: &mut dyn Write, tasks: &[TaskSummary]) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let state = task_state(t.state);
            let terminal = state.is_some_and(|s| s.is_terminal());
            let state_name = if !terminal && task_state(t.desired_state) != Some(TaskState::Running)
            {
                format!(
                    "{} (desired {})",
                    task_state_name(t.state),
                    task_state_name(t.desired_state)
                )
            } else {
                task_state_name(t.state)
            };
            let mut err = t.error.clone();
            if err.is_empty() && state == Some(TaskState::Pending) {
                err = t.message.clone();
            }
            vec![
                t.name.clone(),
                t.image.clone(),
                if t.node.is_empty() {
                    "-".into()
                } else {
                    t.node.clone()
                },
                state_name,
                if t.container_id.is_empty() {
                    "-".into()
                } else {
                    t.container_id[..t.container_id.len().min(12)].to_string()
                },
                err,
            ]
        })
        .collect();
    output::write_table(
        w,
        &["TASK", "IMAGE", "NODE", "STATE", "CONTAINER", "ERROR"],
        &rows,
    )
}

pub async fn run(ctx: &Context, service: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let tasks = crate::tasks(&mut client, service.unwrap_or_default()).await?;
    let v: Vec<_> = tasks.iter().map(to_json).collect();
    output::print(output, &v, |w| write_table(w, &tasks))?;
    if output == OutputFormat::Table {
        let jobs: Vec<String> = crate::services(&mut client)
            .await?
            .iter()
            .filter(|s| service.is_none_or(|n| n == s.name))
            .filter_map(|s| crate::convert::job_progress(s).map(|p| format!("{}: job {p}", s.name)))
            .collect();
        if !jobs.is_empty() {
            println!("\n{}", jobs.join("\n"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_as_json_and_as_a_row() {
        let t = TaskSummary {
            id: "t1".into(),
            name: "web.1.t1".into(),
            service: "web".into(),
            image: "busybox".into(),
            state: rudder_proto::v1::TaskState::Pending as i32,
            desired_state: rudder_proto::v1::TaskState::Running as i32,
            message: "no node fits".into(),
            ..Default::default()
        };
        let v = to_json(&t);
        assert_eq!(v["name"], "web.1.t1");
        assert_eq!(v["state"], task_state_name(t.state));
        assert!(v["exit_code"].is_null());
        let mut out = Vec::new();
        write_table(&mut out, &[t]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("TASK "), "{text}");
        assert!(text.contains("no node fits"), "{text}");
    }
}

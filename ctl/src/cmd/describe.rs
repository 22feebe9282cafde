//! `rctl describe SERVICE`: the spec, the last rollout's state and reason, and every task with
//! its state and message (a pending task says why it is not placed).

use super::print_table;
use crate::context::Context;
use crate::output::OutputFormat;

/// `-o json|yaml`: `{"service": <as rctl get services shows it>, "tasks": [<as rctl ps>]}`;
/// the default is the text view below.
pub async fn run(ctx: &Context, service: &str, output: OutputFormat) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = crate::services(&mut client).await?;
    let svc = list
        .iter()
        .find(|s| s.name == service)
        .ok_or_else(|| anyhow::anyhow!("service {service:?} not found"))?;
    if output != OutputFormat::Table {
        let tasks = crate::tasks(&mut client, service).await?;
        let v = serde_json::json!({
            "service": super::get::to_json(svc)?,
            "tasks": tasks.iter().map(super::ps::to_json).collect::<Vec<_>>(),
        });
        return crate::output::print_object(output, &v);
    }
    println!("Name:      {}", svc.name);
    println!("ID:        {}", svc.id);
    println!("Image:     {}", svc.image);
    if let Some(p) = crate::convert::job_progress(svc) {
        println!(
            "Job:       {}{}",
            p,
            if svc.global { " (global)" } else { "" }
        );
    } else {
        println!(
            "Replicas:  {}/{} running{}",
            svc.running,
            svc.desired,
            if svc.global { " (global)" } else { "" }
        );
    }
    if let Some(u) = crate::convert::update_state(svc.update_state) {
        println!(
            "Update:    {}{}",
            u.as_str().replace('_', " "),
            if svc.update_message.is_empty() {
                String::new()
            } else {
                format!(": {}", svc.update_message)
            }
        );
    }
    if !svc.rebalance_message.is_empty() {
        let state = if svc.rebalance_completed_ms == 0 {
            "in progress"
        } else {
            "completed"
        };
        println!("Rebalance: {state}: {}", svc.rebalance_message);
    }
    super::stats::print_decisions(&svc.autoscale_decisions);
    let spec: serde_json::Value = crate::convert::from_json("service spec", &svc.spec_json)?;
    println!("Spec:\n{}", serde_json::to_string_pretty(&spec)?);
    let tasks = crate::tasks(&mut client, service).await?;
    println!("Tasks:");
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                if t.node.is_empty() {
                    "-".into()
                } else {
                    t.node.clone()
                },
                crate::convert::task_state_name(t.desired_state),
                crate::convert::task_state_name(t.state),
                if t.error.is_empty() {
                    t.message.clone()
                } else {
                    t.error.clone()
                },
            ]
        })
        .collect();
    print_table(&["TASK", "NODE", "DESIRED", "STATE", "MESSAGE"], &rows);
    Ok(())
}

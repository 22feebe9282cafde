//! `rctl describe SERVICE`: the spec, the last rollout's state and reason, and every task with
//! its state and message (a pending task says why it is not placed).

use super::print_table;
use crate::context::Context;

pub async fn run(ctx: &Context, service: &str) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = crate::services(&mut client).await?;
    let svc = list
        .iter()
        .find(|s| s.name == service)
        .ok_or_else(|| anyhow::anyhow!("service {service:?} not found"))?;
    println!("Name:      {}", svc.name);
    println!("ID:        {}", svc.id);
    println!("Image:     {}", svc.image);
    println!(
        "Replicas:  {}/{} running{}",
        svc.running,
        svc.desired,
        if svc.global { " (global)" } else { "" }
    );
    if !svc.update_state.is_empty() {
        println!(
            "Update:    {}{}",
            svc.update_state.replace('_', " "),
            if svc.update_message.is_empty() {
                String::new()
            } else {
                format!(": {}", svc.update_message)
            }
        );
    }
    let spec: serde_json::Value = serde_json::from_str(&svc.spec_json)?;
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
                t.desired_state.clone(),
                t.state.clone(),
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

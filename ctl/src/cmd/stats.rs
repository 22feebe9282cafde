//! `rctl stats [SERVICE] [--json]`: each running task's latest usage sample (cpu as a share of
//! a cpu over the agent's last sample period, memory as the working set), as the leader holds
//! them; the autoscaler decides on the same samples.

use rudder_proto::v1::StatsRequest;

use super::print_table;
use crate::context::Context;

pub async fn run(ctx: &Context, service: Option<&str>, json: bool) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let mut tasks = client
        .stats(StatsRequest {
            service: service.unwrap_or_default().to_string(),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner()
        .tasks;
    tasks.sort_by(|a, b| a.name.cmp(&b.name));
    if json {
        let v: Vec<_> = tasks
            .iter()
            .map(|t| {
                serde_json::json!({
                    "id": t.task_id, "name": t.name, "node": t.node,
                    "cpu_milli": t.cpu_milli, "memory_bytes": t.memory_bytes, "age_ms": t.age_ms,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.node.clone(),
                format!("{:.1}%", t.cpu_milli as f64 / 10.0),
                rudder_model::spec::human_bytes(t.memory_bytes),
                format!("{:.0}s", t.age_ms as f64 / 1000.0),
            ]
        })
        .collect();
    print_table(&["TASK", "NODE", "CPU", "MEMORY", "AGE"], &rows);
    Ok(())
}

/// `rctl describe`'s lines for the autoscaler's last decisions (nothing when there are none).
pub fn print_decisions(decisions: &[rudder_proto::v1::AutoscaleDecision]) {
    if decisions.is_empty() {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    println!("Autoscale:");
    for d in decisions {
        println!(
            "  {:>6}s ago  scaled {}→{}: {}",
            now.saturating_sub(d.at_ms) / 1000,
            d.from,
            d.to,
            d.reason
        );
    }
}

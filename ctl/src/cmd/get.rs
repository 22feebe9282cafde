//! `rctl get services|nodes`: desired and running replicas per service; nodes and their state.

use rudder_proto::v1::{ListNodesRequest, ListServicesRequest};

use super::{print_table, Output};
use crate::context::Context;

pub async fn services(ctx: &Context, output: Output) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = client
        .list_services(ListServicesRequest {})
        .await
        .map_err(crate::status_err)?
        .into_inner()
        .services;
    match output {
        Output::Json => {
            let v: Vec<_> = list
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "id": s.id, "name": s.name, "image": s.image,
                        "replicas": {"desired": s.desired, "running": s.running},
                        "version": s.version,
                        "spec": serde_json::from_str::<serde_json::Value>(&s.spec_json).unwrap_or_default(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        format!("{}/{}", s.running, s.desired),
                        s.image.clone(),
                        s.id[..s.id.len().min(12)].to_string(),
                    ]
                })
                .collect();
            print_table(&["NAME", "REPLICAS", "IMAGE", "ID"], &rows);
        }
    }
    Ok(())
}

pub async fn nodes(ctx: &Context, output: Output) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = client
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(crate::status_err)?
        .into_inner()
        .nodes;
    match output {
        Output::Json => {
            let v: Vec<_> = list
                .iter()
                .map(|n| serde_json::json!({"id": n.id, "hostname": n.hostname, "addr": n.addr, "state": n.state, "tasks": n.tasks}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|n| {
                    vec![
                        n.hostname.clone(),
                        n.state.clone(),
                        n.tasks.to_string(),
                        n.addr.clone(),
                        n.id.clone(),
                    ]
                })
                .collect();
            print_table(&["HOSTNAME", "STATE", "TASKS", "ADDRESS", "ID"], &rows);
        }
    }
    Ok(())
}

//! `rctl get services|nodes`: desired and running replicas per service (nodes: `cmd::node`).

use super::{print_table, Output};
use crate::context::Context;

pub async fn services(ctx: &Context, output: Output) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = crate::services(&mut client).await?;
    match output {
        Output::Json => {
            let v: Vec<_> = list
                .iter()
                .map(|s| {
                    Ok(serde_json::json!({
                        "id": s.id, "name": s.name, "image": s.image,
                        "replicas": {"desired": s.desired, "running": s.running},
                        "version": s.version,
                        "update": {
                            "state": crate::convert::update_state_name(s.update_state),
                            "message": s.update_message,
                        },
                        "spec": crate::convert::from_json::<serde_json::Value>(
                            "service spec",
                            &s.spec_json,
                        )?,
                    }))
                })
                .collect::<anyhow::Result<_>>()?;
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

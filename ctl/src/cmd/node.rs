//! `rctl node ls|inspect|update`: the cluster's hosts, and the operator's part of them
//! (availability active|pause|drain, labels used by placement constraints). `HOST LABELS`
//! are the host's own, from its rudder.toml (`engine.labels.KEY` in constraints); `update`
//! never changes them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rudder_proto::v1::{NodeSummary, RemoveNodeRequest, UpdateNodeRequest};

use std::io::Write;

use crate::context::Context;
use crate::convert::{availability_name, availability_to_wire, node_state_name, role_name};
use crate::output::{self, OutputFormat};

pub fn to_json(n: &NodeSummary) -> serde_json::Value {
    serde_json::json!({
        "id": n.id, "hostname": n.hostname, "addr": n.addr,
        "state": node_state_name(n.state),
        "availability": availability_name(n.availability), "role": role_name(n.role),
        "labels": n.labels,
        "host_labels": n.host_labels,
        "tasks": n.tasks,
        "resources": {"cpus_milli": n.cpus_milli, "memory_bytes": n.memory_bytes},
        "reserved": {"cpus_milli": n.reserved_cpus_milli, "memory_bytes": n.reserved_memory_bytes},
        "cert_not_after_ms": n.cert_not_after_ms,
        "version": n.version,
    })
}

/// A warning for a node whose certificate expires within [`super::admin::WARN_BEFORE`] (or
/// has expired): its agent renews on its own, so this means renewal is failing.
pub fn cert_warning(n: &NodeSummary, now: SystemTime) -> Option<String> {
    if n.cert_not_after_ms == 0 {
        return None;
    }
    let at = UNIX_EPOCH + Duration::from_millis(n.cert_not_after_ms);
    match at.duration_since(now) {
        Err(_) => Some(format!(
            "warning: {}'s certificate has expired: restart its agent with a join token \
             (RUDDER_JOIN_TOKEN) to re-admit it",
            n.hostname
        )),
        Ok(left) if left < super::admin::WARN_BEFORE => Some(format!(
            "warning: {}'s certificate expires in {}; its agent should have renewed it (see \
             its log)",
            n.hostname,
            super::human_duration(left)
        )),
        Ok(_) => None,
    }
}

/// `rctl node rm NODE [--force]`.
pub async fn rm(ctx: &Context, node: &str, force: bool) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let r = client
        .remove_node(RemoveNodeRequest {
            node: node.to_string(),
            force,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    println!(
        "{} ({}) removed: its certificates are revoked",
        r.hostname, r.id
    );
    Ok(())
}

/// A reported version as a table shows it: `-` for an agent too old to report one.
pub fn version_cell(v: &str) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.into()
    }
}

fn write_table(w: &mut dyn Write, list: &[NodeSummary]) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|n| {
            let pairs = |m: &std::collections::HashMap<String, String>| {
                let mut l: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                l.sort();
                l.join(",")
            };
            vec![
                n.hostname.clone(),
                node_state_name(n.state),
                availability_name(n.availability),
                role_name(n.role),
                n.tasks.to_string(),
                n.addr.clone(),
                n.id.clone(),
                version_cell(&n.version),
                pairs(&n.labels),
                pairs(&n.host_labels),
            ]
        })
        .collect();
    output::write_table(
        w,
        &[
            "HOSTNAME",
            "STATE",
            "AVAILABILITY",
            "ROLE",
            "TASKS",
            "ADDRESS",
            "ID",
            "VERSION",
            "LABELS",
            "HOST LABELS",
        ],
        &rows,
    )
}

pub async fn ls(ctx: &Context, output: OutputFormat) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = crate::nodes(&mut client).await?;
    let v: Vec<_> = list.iter().map(to_json).collect();
    output::print(output, &v, |w| write_table(w, &list))?;
    if output == OutputFormat::Table {
        let now = SystemTime::now();
        for w in list.iter().filter_map(|n| cert_warning(n, now)) {
            eprintln!("{w}");
        }
    }
    Ok(())
}

/// One node (id, id prefix or hostname); `-o table` shows its fields one per line.
pub async fn inspect(ctx: &Context, node: &str, output: OutputFormat) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = crate::nodes(&mut client).await?;
    let found: Vec<&NodeSummary> = list
        .iter()
        .filter(|n| {
            n.id == node || n.hostname == node || (node.len() >= 4 && n.id.starts_with(node))
        })
        .collect();
    match found.as_slice() {
        [n] => output::print_object(output, &to_json(n)),
        [] => anyhow::bail!("no node {node:?}"),
        _ => anyhow::bail!("{node:?} names {} nodes; use the node id", found.len()),
    }
}

pub async fn update(
    ctx: &Context,
    node: &str,
    availability: Option<&str>,
    label_add: &[String],
    label_rm: &[String],
) -> anyhow::Result<()> {
    let mut labels_add = std::collections::HashMap::new();
    for kv in label_add {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--label-add {kv:?}: expected KEY=VALUE"))?;
        labels_add.insert(k.to_string(), v.to_string());
    }
    let mut client = crate::connect(ctx).await?;
    let n = client
        .update_node(UpdateNodeRequest {
            node: node.to_string(),
            availability: availability
                .map(availability_to_wire)
                .transpose()?
                .unwrap_or(0),
            labels_add,
            labels_rm: label_rm.to_vec(),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    println!(
        "node/{} updated ({}, {})",
        n.hostname,
        availability_name(n.availability),
        {
            let l: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if l.is_empty() {
                "no labels".to_string()
            } else {
                l.join(",")
            }
        }
    );
    Ok(())
}

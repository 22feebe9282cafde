//! `rctl network ls|inspect|rm|rotate-keys`: overlay networks (declared with `kind: Network`
//! in a manifest and created by `rctl apply`).

use rudder_model::network::Network;
use rudder_proto::v1::{ListNetworksRequest, RemoveNetworkRequest, RotateNetworkKeysRequest};

use std::io::Write;

use crate::context::Context;
use crate::output::{self, OutputFormat};

async fn list(ctx: &Context) -> anyhow::Result<Vec<Network>> {
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .list_networks(ListNetworksRequest {})
        .await
        .map_err(crate::status_err)?
        .into_inner();
    resp.networks_json
        .iter()
        .map(|j| crate::convert::from_json("network", j))
        .collect()
}

fn write_table(w: &mut dyn Write, nets: &[Network]) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = nets
        .iter()
        .map(|n| {
            vec![
                n.id.chars().take(12).collect(),
                n.spec.name.clone(),
                "overlay".into(),
                n.subnet.to_string(),
                match (n.spec.encrypted, n.spec.internal) {
                    (true, false) => "wireguard".into(),
                    (true, true) => "wireguard, internal".into(),
                    (false, false) => format!("vxlan {}", n.vni),
                    (false, true) => format!("vxlan {}, internal", n.vni),
                },
                n.slices.len().to_string(),
            ]
        })
        .collect();
    output::write_table(
        w,
        &["ID", "NAME", "DRIVER", "SUBNET", "ENCAPSULATION", "HOSTS"],
        &rows,
    )
}

/// `-o json|yaml`: each network as the store keeps it (spec, subnet, vni, node slices).
pub async fn ls(ctx: &Context, output: OutputFormat) -> anyhow::Result<()> {
    let nets = list(ctx).await?;
    output::print(output, &nets, |w| write_table(w, &nets))
}

/// The network as `inspect` shows it, with each node's slice spelled out.
pub fn to_json(n: &Network) -> serde_json::Value {
    let slices: serde_json::Map<String, serde_json::Value> = n
        .slices
        .iter()
        .map(|(node, i)| (node.clone(), n.slice(*i).to_string().into()))
        .collect();
    serde_json::json!({
        "id": n.id,
        "name": n.spec.name,
        "driver": "overlay",
        "subnet": n.subnet.to_string(),
        "encrypted": n.spec.encrypted,
        "encapsulation": if n.spec.encrypted { "wireguard" } else { "vxlan" },
        "internal": n.spec.internal,
        "vni": n.vni,
        "mtu": n.mtu(),
        "virtual_ips": n.slice(0).to_string(),
        "node_slices": slices,
        "labels": n.spec.labels,
    })
}

pub async fn inspect(ctx: &Context, name: &str, output: OutputFormat) -> anyhow::Result<()> {
    let nets = list(ctx).await?;
    let n = nets
        .iter()
        .find(|n| n.spec.name == name || (name.len() >= 4 && n.id.starts_with(name)))
        .ok_or_else(|| anyhow::anyhow!("network {name:?} not found (see `rctl network ls`)"))?;
    output::print_object(output, &to_json(n))
}

pub async fn rm(ctx: &Context, names: &[String]) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    for name in names {
        client
            .remove_network(RemoveNetworkRequest { name: name.clone() })
            .await
            .map_err(crate::status_err)?;
        println!("{name}");
    }
    Ok(())
}

pub async fn rotate_keys(ctx: &Context) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let r = client
        .rotate_network_keys(RotateNetworkKeysRequest {})
        .await
        .map_err(crate::status_err)?
        .into_inner();
    println!(
        "key epoch {}: every agent makes a new WireGuard key pair and its peers are updated",
        r.epoch
    );
    Ok(())
}

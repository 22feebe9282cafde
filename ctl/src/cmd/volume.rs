//! `rctl volume create|ls|inspect|rm`: named volumes (driver `local`: a directory on each host
//! that runs a task mounting it). Also declared with `kind: Volume` in a manifest, or
//! implicitly by a service that mounts one.

use rudder_model::volume::{Volume, VolumeDriver, VolumeSpec};
use rudder_proto::v1::{ApplyRequest, ListVolumesRequest, RemoveVolumeRequest, VolumeSummary};

use std::io::Write;

use crate::context::Context;
use crate::output::{self, OutputFormat};

/// A volume with what the controller knows about it.
struct Listed {
    volume: Volume,
    hosts: Vec<String>,
    services: Vec<String>,
}

async fn list(ctx: &Context) -> anyhow::Result<Vec<Listed>> {
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .list_volumes(ListVolumesRequest {})
        .await
        .map_err(crate::status_err)?
        .into_inner();
    resp.volumes
        .into_iter()
        .map(
            |VolumeSummary {
                 volume_json,
                 hosts,
                 services,
             }| {
                Ok(Listed {
                    volume: crate::convert::from_json("volume", &volume_json)?,
                    hosts,
                    services,
                })
            },
        )
        .collect()
}

fn to_json(l: &Listed) -> serde_json::Value {
    serde_json::json!({
        "name": l.volume.spec.name,
        "driver": "local",
        "labels": l.volume.spec.labels,
        "created_at_ms": l.volume.created_at,
        // Each host keeps its own copy, made when a task first mounts the volume there.
        "mountpoint": format!("<agent data>/volumes/{}/_data", l.volume.spec.name),
        "hosts": l.hosts,
        "services": l.services,
        // Per-slot volumes: the service slot that owns it; its node holds the data.
        "owner": l.volume.owner,
    })
}

/// `rctl volume create NAME [--label K=V]…`: declares a new volume; a name that is taken is
/// refused (`rctl apply` of a `kind: Volume` is the declarative, idempotent way).
pub async fn create(ctx: &Context, name: &str, labels: &[String]) -> anyhow::Result<()> {
    let mut spec = VolumeSpec {
        name: name.to_string(),
        driver: VolumeDriver::Local,
        labels: Default::default(),
    };
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--label {l:?}: expected KEY=VALUE"))?;
        spec.labels.insert(k.to_string(), v.to_string());
    }
    spec.validate()
        .map_err(|e| anyhow::anyhow!("volume {name:?}: {e}"))?;
    // Creating by hand names a new volume; a taken name is an error, not a silent reuse
    // (manifests, which declare, stay idempotent through `rctl apply`).
    if list(ctx).await?.iter().any(|l| l.volume.spec.name == name) {
        anyhow::bail!(
            "volume {name:?} already exists (see `rctl volume inspect {name}`; remove it first \
             to start empty)"
        );
    }
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .apply(ApplyRequest {
            volume_specs_json: vec![crate::convert::to_json("volume", &spec)?],
            ..Default::default()
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    for r in resp.results {
        println!(
            "{}/{} {}",
            r.kind.to_lowercase(),
            r.name,
            crate::convert::action_name(r.action)
        );
    }
    Ok(())
}

fn write_table(w: &mut dyn Write, vols: &[Listed]) -> std::io::Result<()> {
    let dash = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|l| {
            vec![
                l.volume.spec.name.clone(),
                "local".into(),
                dash(&l.hosts),
                dash(&l.services),
                l.volume
                    .owner
                    .as_ref()
                    .map_or("-".into(), |o| format!("{}.{}", o.service, o.slot)),
            ]
        })
        .collect();
    output::write_table(w, &["NAME", "DRIVER", "HOSTS", "SERVICES", "OWNER"], &rows)
}

pub async fn ls(ctx: &Context, output: OutputFormat) -> anyhow::Result<()> {
    let vols = list(ctx).await?;
    let v: Vec<serde_json::Value> = vols.iter().map(to_json).collect();
    output::print(output, &v, |w| write_table(w, &vols))
}

/// The volume: labels, the hosts holding a copy, the services mounting it.
pub async fn inspect(ctx: &Context, name: &str, output: OutputFormat) -> anyhow::Result<()> {
    let vols = list(ctx).await?;
    let l = vols
        .iter()
        .find(|l| l.volume.spec.name == name)
        .ok_or_else(|| anyhow::anyhow!("volume {name:?} not found (see `rctl volume ls`)"))?;
    output::print_object(output, &to_json(l))
}

/// Removes volumes (refused while a service mounts one, or, for a per-slot volume, while its
/// slot's task runs); each host deletes its copy once no container there uses it. Removing a
/// per-slot volume releases its slot from the node that held it: the slot's next task goes
/// anywhere, with a new, empty volume.
pub async fn rm(ctx: &Context, names: &[String]) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    for name in names {
        client
            .remove_volume(RemoveVolumeRequest { name: name.clone() })
            .await
            .map_err(crate::status_err)?;
        println!("{name}");
    }
    Ok(())
}

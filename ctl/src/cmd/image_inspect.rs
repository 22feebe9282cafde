//! `rctl image inspect REF` and `rctl image history REF`: an image of the cluster registry as
//! its manifest and config describe it, like `docker image inspect` and `docker history`.
//! Read straight from the registry (manifest, then config blob); an index resolves to this
//! host's platform, as a pull would.

use rudder_image::oci::{Index, Manifest, ManifestKind};
use rudder_image::usage::human_bytes;
use rudder_image::Reference;
use serde_json::{json, Value};

use crate::context::Context;
use crate::output::{self, OutputFormat};

/// Configs larger than this are not images anyone built.
const MAX_CONFIG: usize = 8 << 20;

/// An image as fetched: its manifest's digest, the manifest and the config.
struct Fetched {
    reference: String,
    digest: String,
    manifest: Manifest,
    config: Value,
}

async fn fetch(ctx: &Context, reference: &str) -> anyhow::Result<Fetched> {
    let r = Reference::parse(reference)?;
    anyhow::ensure!(
        r.registry.is_none(),
        "{reference}: inspect reads the cluster registry; `rctl image pull` an outside image first"
    );
    let client = super::image::registry_client(ctx)?;
    let not_found = |e: rudder_image::ImageError| {
        if e.is_not_found() {
            anyhow::anyhow!("image {reference} not found in the cluster registry")
        } else {
            anyhow::anyhow!("{reference}: {e}")
        }
    };
    let (media_type, mut bytes, mut digest) = client
        .get_manifest(&r.repository, r.reference_str())
        .await
        .map_err(not_found)?;
    if ManifestKind::detect(&media_type, &bytes)? == ManifestKind::Index {
        let index = Index::parse(&bytes)?;
        let pick = index
            .pick_platform()
            .ok_or_else(|| anyhow::anyhow!("{reference}: an index with no manifests"))?;
        (_, bytes, digest) = client
            .get_manifest(&r.repository, &pick.digest)
            .await
            .map_err(not_found)?;
    }
    let manifest = Manifest::parse(&bytes)?;
    let config = client
        .get_blob_bytes(&r.repository, &manifest.config.digest, MAX_CONFIG)
        .await
        .map_err(not_found)?;
    let config: Value = serde_json::from_slice(&config)
        .map_err(|e| anyhow::anyhow!("{reference}: its config is not JSON: {e}"))?;
    Ok(Fetched {
        reference: format!("{}:{}", r.repository, r.reference_str()),
        digest,
        manifest,
        config,
    })
}

pub async fn inspect(ctx: &Context, reference: &str, output: OutputFormat) -> anyhow::Result<()> {
    let f = fetch(ctx, reference).await?;
    let c = &f.config;
    let size: u64 = f.manifest.layers.iter().map(|l| l.size).sum::<u64>() + f.manifest.config.size;
    let v = json!({
        "reference": f.reference,
        "digest": f.digest,
        "media_type": f.manifest.media_type,
        "created": c["created"],
        "author": c.get("author").cloned().unwrap_or(Value::Null),
        "architecture": c["architecture"],
        "os": c["os"],
        "size": size,
        "config": c.get("config").cloned().unwrap_or(Value::Null),
        "config_digest": f.manifest.config.digest,
        "layers": f.manifest.layers.iter().map(|l| json!({
            "digest": l.digest, "size": l.size, "media_type": l.media_type,
        })).collect::<Vec<_>>(),
        "diff_ids": c["rootfs"]["diff_ids"],
    });
    output::print_object(output, &v)
}

/// What the image runs by default: its ENTRYPOINT and CMD (each empty when unset).
pub async fn entrypoint_and_cmd(
    ctx: &Context,
    reference: &str,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let f = fetch(ctx, reference).await?;
    let list = |key: &str| -> Vec<String> {
        f.config["config"][key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok((list("Entrypoint"), list("Cmd")))
}

/// One entry of `history`: a history entry with the layer it made (if any), newest first,
/// as docker prints it; layers no history entry accounts for (an image made without history)
/// come last-made first too.
fn entries(manifest: &Manifest, config: &Value) -> Vec<Value> {
    let history = config["history"].as_array().cloned().unwrap_or_default();
    let mut layers = manifest.layers.iter();
    let mut out: Vec<Value> = history
        .iter()
        .map(|h| {
            let empty = h["empty_layer"].as_bool().unwrap_or(false);
            let layer = if empty { None } else { layers.next() };
            json!({
                "layer": layer.map(|l| l.digest.clone()),
                "created": h["created"].as_str().unwrap_or(""),
                "created_by": h["created_by"].as_str().unwrap_or(""),
                "size": layer.map_or(0, |l| l.size),
                "comment": h["comment"].as_str().unwrap_or(""),
            })
        })
        .collect();
    for l in layers {
        out.push(json!({
            "layer": l.digest, "created": "", "created_by": "", "size": l.size, "comment": "",
        }));
    }
    out.reverse();
    out
}

/// The table rows of [`entries`].
fn rows(entries: &[Value], no_trunc: bool) -> Vec<Vec<String>> {
    entries
        .iter()
        .map(|e| {
            let created_by = e["created_by"].as_str().unwrap_or("").replace('\n', " ");
            let created_by = if no_trunc || created_by.chars().count() <= 45 {
                created_by
            } else {
                created_by.chars().take(44).collect::<String>() + "…"
            };
            vec![
                e["layer"].as_str().map_or("<none>".into(), short),
                e["created"].as_str().unwrap_or("").to_string(),
                created_by,
                human_bytes(e["size"].as_u64().unwrap_or(0)),
                e["comment"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect()
}

fn short(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect()
}

pub async fn history(
    ctx: &Context,
    reference: &str,
    no_trunc: bool,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let f = fetch(ctx, reference).await?;
    let e = entries(&f.manifest, &f.config);
    output::print(output, &e, |w| {
        output::write_table(
            w,
            &["LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
            &rows(&e, no_trunc),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_image::oci::Descriptor;

    #[test]
    fn history_rows_match_layers_newest_first() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let m = Manifest::oci(
            Descriptor::new("c", d('c'), 10),
            vec![
                Descriptor::new("l", d('a'), 2048),
                Descriptor::new("l", d('b'), 5),
            ],
        );
        let config = json!({"history": [
            {"created": "t1", "created_by": "rudder import"},
            {"created": "t2", "created_by": "ENV A=1", "empty_layer": true},
            {"created": "t3", "created_by": "rctl commit", "comment": "fix"},
        ]});
        let e = entries(&m, &config);
        assert_eq!(e[0]["layer"], d('b'));
        assert_eq!(e[0]["size"], 5);
        let r = rows(&e, false);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0][0], "b".repeat(12));
        assert_eq!(r[0][4], "fix");
        assert_eq!(r[1][0], "<none>");
        assert_eq!(r[1][2], "ENV A=1");
        assert_eq!(r[2][0], "a".repeat(12));
        let long = json!({"history": [{"created_by": "x".repeat(80)}]});
        assert_eq!(rows(&entries(&m, &long), false)[1][2].chars().count(), 45);
        assert_eq!(rows(&entries(&m, &long), true)[1][2].chars().count(), 80);
    }
}

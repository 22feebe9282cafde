//! `rctl secret|config create|update|ls|inspect|rm`: named values services mount as files
//! (and take environment values from). `update` makes a new version, which rolls every service
//! using it unpinned. A secret's value is never shown; a config's only with `inspect --data`.

use std::io::{Read, Write};
use std::path::Path;

use rudder_model::secret::{SecretMeta, MAX_DATA};
use rudder_proto::v1::{
    InspectSecretRequest, ListSecretsRequest, PutSecretRequest, RemoveSecretRequest, SecretSummary,
};

use crate::context::Context;
use crate::output::{self, OutputFormat};

/// Reads a value from `path` (`-`: stdin), refusing more than 500 KiB before reading it all.
pub fn read_value(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    let limit = MAX_DATA as u64 + 1;
    if path.as_os_str() == "-" {
        std::io::stdin().take(limit).read_to_end(&mut data)?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut data))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    if data.len() > MAX_DATA {
        anyhow::bail!(
            "{}: more than {MAX_DATA} bytes (500 KiB), the limit of a secret or config",
            path.display()
        );
    }
    Ok(data)
}

fn labels_of(labels: &[String]) -> anyhow::Result<std::collections::HashMap<String, String>> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--label {l:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// `create` (refused when the name exists) or `update` (a new version; refused when it does
/// not exist).
pub async fn put(
    ctx: &Context,
    kind: &str,
    mode: &str,
    name: &str,
    file: &Path,
    labels: &[String],
) -> anyhow::Result<()> {
    let data = read_value(file)?;
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .put_secret(PutSecretRequest {
            kind: kind.into(),
            name: name.into(),
            labels: labels_of(labels)?,
            data,
            mode: mode.into(),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    println!(
        "{kind}/{name} {} (version {})",
        crate::convert::action_name(resp.action),
        resp.version
    );
    for s in resp.rolled {
        eprintln!("service {s}: rolling to version {}", resp.version);
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn parse(s: SecretSummary) -> anyhow::Result<(SecretMeta, Vec<String>)> {
    Ok((
        crate::convert::from_json("secret metadata", &s.meta_json)?,
        s.services,
    ))
}

fn to_json(meta: &SecretMeta, services: &[String]) -> serde_json::Value {
    serde_json::json!({
        "name": meta.name,
        "kind": meta.kind,
        "labels": meta.labels,
        "version": meta.latest,
        "created_at_ms": meta.created_at,
        "updated_at_ms": meta.updated_at,
        "versions": meta.versions,
        "services": services,
    })
}

fn write_table(
    w: &mut dyn Write,
    items: &[(SecretMeta, Vec<String>)],
    now: u64,
) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|(m, services)| {
            let latest = m.versions.iter().find(|v| v.version == m.latest);
            vec![
                m.name.clone(),
                m.latest.to_string(),
                latest.map(|v| v.size.to_string()).unwrap_or_default(),
                super::human_duration(std::time::Duration::from_millis(
                    now.saturating_sub(m.updated_at),
                )) + " ago",
                if services.is_empty() {
                    "-".into()
                } else {
                    services.join(",")
                },
            ]
        })
        .collect();
    output::write_table(
        w,
        &["NAME", "VERSION", "SIZE", "UPDATED", "SERVICES"],
        &rows,
    )
}

pub async fn ls(ctx: &Context, kind: &str, output: OutputFormat) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let items = client
        .list_secrets(ListSecretsRequest { kind: kind.into() })
        .await
        .map_err(crate::status_err)?
        .into_inner()
        .items
        .into_iter()
        .map(parse)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let v: Vec<_> = items.iter().map(|(m, s)| to_json(m, s)).collect();
    output::print(output, &v, |w| write_table(w, &items, now_ms()))
}

/// Metadata; `--data` (configs only) prints the latest value instead.
pub async fn inspect(
    ctx: &Context,
    kind: &str,
    name: &str,
    data: bool,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .inspect_secret(InspectSecretRequest {
            kind: kind.into(),
            name: name.into(),
            with_data: data,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    if data {
        std::io::stdout().write_all(&resp.data)?;
        return Ok(());
    }
    let (meta, services) = parse(resp.summary.unwrap_or_default())?;
    output::print_object(output, &to_json(&meta, &services))
}

pub async fn rm(ctx: &Context, kind: &str, names: &[String]) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    for name in names {
        client
            .remove_secret(RemoveSecretRequest {
                kind: kind.into(),
                name: name.clone(),
            })
            .await
            .map_err(crate::status_err)?;
        println!("{name}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::secret::VersionMeta;

    #[test]
    fn metadata_output_never_carries_a_value() {
        let meta: SecretMeta = serde_json::from_value(serde_json::json!({
            "kind": "secret", "name": "db", "labels": {}, "latest": 2,
            "created_at": 1, "updated_at": 2,
            "versions": [{"version": 2, "size": 6, "digest": "sha256:ab", "created_at": 2}],
        }))
        .unwrap();
        let _: &VersionMeta = &meta.versions[0];
        let v = to_json(&meta, &["web".into()]);
        assert_eq!(v["name"], "db");
        assert_eq!(v["versions"][0]["size"], 6);
        let text = v.to_string();
        assert!(!text.contains("\"data\""), "{text}");
        let mut out = Vec::new();
        write_table(&mut out, &[(meta, vec!["web".into()])], 2 + 90_000).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("db    2        6     90s ago  web"), "{text}");
    }
}

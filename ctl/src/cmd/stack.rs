//! `rctl stack deploy|config|ls|services|ps|rm`: compose files as stacks. The conversion is
//! `rudder_model::compose` (pure); this module reads the files, prints the warnings and goes
//! through the ordinary apply path. A stack is, for now, the objects labelled
//! `rudder.stack=NAME` (no stack object in the store yet, so no `stack rollback`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rudder_model::compose::{self, Source, SERVICE_LABEL, STACK_LABEL};
use rudder_model::manifest::Manifest;
use rudder_model::ServiceSpec;
use rudder_proto::v1::{
    ListNetworksRequest, ListSecretsRequest, RemoveNetworkRequest, RemoveSecretRequest,
    RemoveServiceRequest,
};

use super::{print_table, Output};
use crate::context::Context;

/// `env_file:` paths, read relative to the project directory, at most 1 MiB each.
struct DiskFiles {
    root: PathBuf,
}

impl compose::Files for DiskFiles {
    fn read(&self, path: &str) -> Result<String, String> {
        let p = self.root.join(path);
        read_limited(&p).map_err(|e| format!("{}: {e}", p.display()))
    }
}

fn read_limited(p: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(p).map_err(|e| e.to_string())?;
    if meta.len() > compose::MAX_FILE as u64 {
        return Err("over 1 MiB".into());
    }
    std::fs::read_to_string(p).map_err(|e| e.to_string())
}

/// Converts the compose files (the first one's directory holds `.env` and is what relative
/// paths start from), printing one `warning:` line per key not honoured.
pub fn load(files: &[PathBuf], stack: &str) -> anyhow::Result<Vec<Manifest>> {
    let mut sources = Vec::new();
    for f in files {
        let text = read_limited(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        sources.push(Source {
            name: f.display().to_string(),
            text,
        });
    }
    let root = files
        .first()
        .and_then(|f| f.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let dotenv_path = root.join(".env");
    let dotenv = if dotenv_path.exists() {
        Some(
            read_limited(&dotenv_path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", dotenv_path.display()))?,
        )
    } else {
        None
    };
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let stack = compose::convert(&compose::Input {
        stack,
        sources: &sources,
        dotenv: dotenv.as_deref(),
        env: &env,
        files: &DiskFiles { root },
    })?;
    for w in &stack.warnings {
        eprintln!("warning: {w}");
    }
    Ok(stack.manifests)
}

/// `rctl stack config`: the resolved manifests, as `rctl apply -f` reads them.
pub fn config(files: &[PathBuf], stack: &str) -> anyhow::Result<()> {
    print!("{}", compose::to_yaml(&load(files, stack)?));
    Ok(())
}

/// `rctl stack deploy`: converts, then applies as `rctl apply` does (and waits unless detached).
pub async fn deploy(
    ctx: &Context,
    files: &[PathBuf],
    stack: &str,
    detach: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let manifests = load(files, stack)?;
    let base = files.first().cloned().unwrap_or_default();
    let docs = manifests.into_iter().map(|m| (base.clone(), m)).collect();
    super::apply::apply_manifests(ctx, docs, detach, timeout).await
}

/// The stack's services (by label) with their summaries.
async fn stack_services(
    client: &mut crate::Client,
    stack: Option<&str>,
) -> anyhow::Result<Vec<(ServiceSpec, rudder_proto::v1::ServiceSummary)>> {
    let mut out = Vec::new();
    for s in crate::services(client).await? {
        let spec: ServiceSpec = crate::convert::from_json("service", &s.spec_json)?;
        match (spec.labels.get(STACK_LABEL), stack) {
            (Some(l), Some(want)) if l == want => out.push((spec, s)),
            (Some(_), None) => out.push((spec, s)),
            _ => {}
        }
    }
    Ok(out)
}

/// `rctl stack ls`: each stack with its number of services.
pub async fn ls(ctx: &Context, output: Output) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let mut stacks: BTreeMap<String, usize> = BTreeMap::new();
    for (spec, _) in stack_services(&mut client, None).await? {
        *stacks.entry(spec.labels[STACK_LABEL].clone()).or_default() += 1;
    }
    match output {
        Output::Json => {
            let v: Vec<_> = stacks
                .iter()
                .map(|(n, c)| serde_json::json!({"name": n, "services": c}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = stacks
                .iter()
                .map(|(n, c)| vec![n.clone(), c.to_string()])
                .collect();
            print_table(&["NAME", "SERVICES"], &rows);
        }
    }
    Ok(())
}

/// `rctl stack services NAME`.
pub async fn services(ctx: &Context, stack: &str, output: Output) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = stack_services(&mut client, Some(stack)).await?;
    if list.is_empty() {
        anyhow::bail!("stack {stack:?} has no services (see `rctl stack ls`)");
    }
    match output {
        Output::Json => {
            let v: Vec<_> = list
                .iter()
                .map(|(spec, s)| {
                    serde_json::json!({
                        "name": s.name, "compose_name": spec.labels.get(SERVICE_LABEL),
                        "image": s.image, "desired": s.desired, "running": s.running,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|(spec, s)| {
                    vec![
                        s.name.clone(),
                        spec.labels.get(SERVICE_LABEL).cloned().unwrap_or_default(),
                        s.image.clone(),
                        format!("{}/{}", s.running, s.desired),
                    ]
                })
                .collect();
            print_table(&["NAME", "COMPOSE NAME", "IMAGE", "REPLICAS"], &rows);
        }
    }
    Ok(())
}

/// `rctl stack ps NAME`: the tasks of the stack's services.
pub async fn ps(ctx: &Context, stack: &str, output: Output) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = stack_services(&mut client, Some(stack)).await?;
    if list.is_empty() {
        anyhow::bail!("stack {stack:?} has no services (see `rctl stack ls`)");
    }
    let mut tasks = Vec::new();
    for (_, s) in &list {
        tasks.extend(crate::tasks(&mut client, &s.name).await?);
    }
    match output {
        Output::Json => {
            let v: Vec<_> = tasks.iter().map(super::ps::to_json).collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = tasks
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        t.image.clone(),
                        if t.node.is_empty() {
                            "-".into()
                        } else {
                            t.node.clone()
                        },
                        crate::convert::task_state_name(t.desired_state),
                        crate::convert::task_state_name(t.state),
                        t.error.clone(),
                    ]
                })
                .collect();
            print_table(
                &["NAME", "IMAGE", "NODE", "DESIRED", "STATE", "ERROR"],
                &rows,
            );
        }
    }
    Ok(())
}

/// `rctl stack rm NAME`: removes the stack's services, then its networks, secrets and configs
/// (retried while the services' tasks still hold them); volumes stay, as Docker keeps them.
pub async fn rm(ctx: &Context, stack: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = stack_services(&mut client, Some(stack)).await?;
    for (_, s) in &list {
        client
            .remove_service(RemoveServiceRequest {
                name: s.name.clone(),
            })
            .await
            .map_err(crate::status_err)?;
        println!("service/{} removed", s.name);
    }
    let is_ours = |labels: &BTreeMap<String, String>| {
        labels.get(STACK_LABEL).map(String::as_str) == Some(stack)
    };
    let mut rest: Vec<(String, String)> = Vec::new();
    let nets = client
        .list_networks(ListNetworksRequest {})
        .await
        .map_err(crate::status_err)?
        .into_inner();
    for j in &nets.networks_json {
        let n: rudder_model::network::Network = crate::convert::from_json("network", j)?;
        if is_ours(&n.spec.labels) {
            rest.push(("network".into(), n.spec.name));
        }
    }
    for kind in ["secret", "config"] {
        let items = client
            .list_secrets(ListSecretsRequest { kind: kind.into() })
            .await
            .map_err(crate::status_err)?
            .into_inner()
            .items;
        for i in items {
            let m: rudder_model::secret::SecretMeta =
                crate::convert::from_json("secret metadata", &i.meta_json)?;
            if is_ours(&m.labels) {
                rest.push((kind.into(), m.name));
            }
        }
    }
    if list.is_empty() && rest.is_empty() {
        anyhow::bail!("stack {stack:?} not found (see `rctl stack ls`)");
    }
    let start = std::time::Instant::now();
    while !rest.is_empty() {
        let mut left = Vec::new();
        let mut last_err = String::new();
        for (kind, name) in rest {
            let r = if kind == "network" {
                client
                    .remove_network(RemoveNetworkRequest { name: name.clone() })
                    .await
                    .map(|_| ())
            } else {
                client
                    .remove_secret(RemoveSecretRequest {
                        kind: kind.clone(),
                        name: name.clone(),
                    })
                    .await
                    .map(|_| ())
            };
            match r {
                Ok(()) => println!("{kind}/{name} removed"),
                Err(e) => {
                    last_err = format!("{kind}/{name}: {}", e.message());
                    left.push((kind, name));
                }
            }
        }
        rest = left;
        if !rest.is_empty() {
            if start.elapsed() > timeout {
                anyhow::bail!("stack {stack}: not removed after {timeout:?}: {last_err}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
    Ok(())
}

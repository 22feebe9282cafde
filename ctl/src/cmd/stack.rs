//! `rctl stack deploy|config|ls|services|ps|rollback|rm`: compose files as stacks. The
//! conversion is `rudder_model::compose` (pure); this module reads the files, prints the
//! warnings and sends the resolved manifests to `DeployStack`, which records them as the
//! stack's new version in the store (`rudder_model::stack`). `ls|services|ps` read the stack
//! objects; a stack deployed by an earlier build (objects labelled `rudder.stack=NAME` only) is
//! still listed and removed by its labels.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use rudder_model::compose::{self, Source, SERVICE_LABEL, STACK_LABEL};
use rudder_model::manifest::Manifest;
use rudder_model::stack::Stack;
use rudder_model::ServiceSpec;
use rudder_proto::v1::{
    DeployStackRequest, DeployStackResponse, ListNetworksRequest, ListSecretsRequest,
    ListStacksRequest, RemoveNetworkRequest, RemoveSecretRequest, RemoveServiceRequest,
    RemoveStackRequest, RollbackStackRequest,
};

use crate::context::Context;
use crate::output::{self, OutputFormat};

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

/// The directory relative paths start from: the first compose file's.
fn project_dir(files: &[PathBuf]) -> PathBuf {
    files
        .first()
        .and_then(|f| f.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Converts the compose files (the first one's directory holds `.env` and is what relative
/// paths start from), printing one `warning:` line per key not honoured. Images to build are
/// refused: only `rctl stack deploy` builds them.
pub fn load(files: &[PathBuf], stack: &str) -> anyhow::Result<Vec<Manifest>> {
    let s = load_stack(files, stack)?;
    if let Some(b) = s.builds.first() {
        anyhow::bail!(
            "services.{}.build: images are built by `rctl stack deploy` (one compose file, \
             or `rctl stack deploy -c FILE… NAME`)",
            b.compose_name
        );
    }
    Ok(s.manifests)
}

/// [`load`], with the images to build.
pub fn load_stack(files: &[PathBuf], stack: &str) -> anyhow::Result<compose::Stack> {
    let mut sources = Vec::new();
    for f in files {
        let text = read_limited(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        sources.push(Source {
            name: f.display().to_string(),
            text,
        });
    }
    let root = project_dir(files);
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
    Ok(stack)
}

/// `rctl stack config`: the resolved manifests, as `rctl apply -f` reads them (images to build
/// are named by their tag; `stack deploy` pins them to the built digest).
pub fn config(files: &[PathBuf], stack: &str) -> anyhow::Result<()> {
    let s = load_stack(files, stack)?;
    for b in &s.builds {
        println!(
            "# services.{}.build: {} is built from {} by `rctl stack deploy`",
            b.compose_name, b.tag, b.context
        );
    }
    print!("{}", compose::to_yaml(&s.manifests));
    Ok(())
}

/// Builds `b` through `rctl build` (its progress printed) and returns the reference that pins
/// the built image: `REPOSITORY@DIGEST`.
async fn build_image(
    ctx: &Context,
    root: &Path,
    b: &compose::build::Build,
) -> anyhow::Result<String> {
    let dir = root.join(&b.context);
    let args = super::build::BuildArgs {
        tag: b.tag.clone(),
        file: b.dockerfile.as_ref().map(|d| dir.join(d)),
        build_args: b
            .args
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            })
            .collect(),
        secrets: Vec::new(),
        no_cache: false,
        target: b.target.clone(),
        node: None,
        allow_cluster_urls: false,
        quiet: false,
        dir,
    };
    eprintln!("building {} for service {}", b.tag, b.compose_name);
    super::build::run(ctx, &args)
        .await
        .map_err(|e| e.context(format!("services.{}.build", b.compose_name)))?;
    let r = rudder_image::Reference::parse(&b.tag)?;
    let tag = r.tag.clone().unwrap_or_else(|| "latest".into());
    let mut client = crate::connect(ctx).await?;
    let images = client
        .list_images(rudder_proto::v1::ListImagesRequest {
            all: false,
            node: String::new(),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner()
        .images;
    let digest = images
        .iter()
        .find(|i| i.repository == r.repository && i.tag == tag)
        .map(|i| i.digest.clone())
        .with_context(|| format!("{}: built, but not found in the registry", b.tag))?;
    let host = r.registry.map(|h| format!("{h}/")).unwrap_or_default();
    Ok(format!("{host}{}@{digest}", r.repository))
}

/// `rctl stack deploy`: converts, then deploys the manifests as the stack's new version (and
/// waits unless detached).
pub async fn deploy(
    ctx: &Context,
    files: &[PathBuf],
    stack: &str,
    detach: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let loaded = load_stack(files, stack)?;
    let mut manifests = loaded.manifests;
    // Images first: each built service is pinned to its image's digest, so the stack's version
    // names exactly what runs (and a rollback returns to the previous build).
    let root = project_dir(files);
    for b in &loaded.builds {
        let pinned = build_image(ctx, &root, b).await?;
        for m in &mut manifests {
            if let Manifest::Service(s) = m {
                if s.name == b.service {
                    s.image = pinned.clone();
                }
            }
        }
    }
    let base = files.first().cloned().unwrap_or_default();
    let docs = manifests.into_iter().map(|m| (base.clone(), m)).collect();
    let apply = super::apply::request(docs)?;
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .deploy_stack(DeployStackRequest {
            name: stack.to_string(),
            apply: Some(apply),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    report(ctx, stack, resp, detach, timeout).await
}

/// `rctl stack rollback NAME`: the whole stack back to its previous version.
pub async fn rollback(
    ctx: &Context,
    stack: &str,
    detach: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .rollback_stack(RollbackStackRequest {
            name: stack.to_string(),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    report(ctx, stack, resp, detach, timeout).await
}

/// Prints what a deploy or rollback did, then waits for the services it changed.
async fn report(
    ctx: &Context,
    stack: &str,
    resp: DeployStackResponse,
    detach: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    for s in &resp.removed_services {
        println!("service/{s} removed");
    }
    let previous = match resp.previous_version {
        0 => String::new(),
        v => format!(" (previous {v})"),
    };
    eprintln!("stack {stack}: version {}{previous}", resp.version);
    super::apply::finish(ctx, resp.results, detach, timeout).await
}

/// The stack objects, by name.
async fn stack_objects(client: &mut crate::Client) -> anyhow::Result<BTreeMap<String, Stack>> {
    let resp = client
        .list_stacks(ListStacksRequest {})
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let mut out = BTreeMap::new();
    for j in &resp.stacks_json {
        let s: Stack = crate::convert::from_json("stack", j)?;
        out.insert(s.name.clone(), s);
    }
    Ok(out)
}

/// The stack's services with their summaries: those of its version in force, or (a stack
/// deployed by an earlier build, or `stack` `None`: every stack's) those labelled with it.
async fn stack_services(
    client: &mut crate::Client,
    stack: Option<&str>,
) -> anyhow::Result<Vec<(ServiceSpec, rudder_proto::v1::ServiceSummary)>> {
    let objects = stack_objects(client).await?;
    let declared = stack.and_then(|n| objects.get(n));
    let mut out = Vec::new();
    for s in crate::services(client).await? {
        let spec: ServiceSpec = crate::convert::from_json("service", &s.spec_json)?;
        let ours = match (declared, spec.labels.get(STACK_LABEL), stack) {
            (Some(d), _, _) => d.current.spec.has_service(&s.name),
            (None, Some(l), Some(want)) => l == want,
            (None, Some(_), None) => true,
            _ => false,
        };
        if ours {
            out.push((spec, s));
        }
    }
    Ok(out)
}

/// `rctl stack ls`: each stack with its version in force, the previous one and its number of
/// services (`-` versions: a stack an earlier build deployed, known by its labels only).
pub async fn ls(ctx: &Context, output: OutputFormat) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let objects = stack_objects(&mut client).await?;
    // name -> (version, previous, services)
    let mut stacks: BTreeMap<String, (Option<u64>, Option<u64>, usize)> = objects
        .values()
        .map(|s| {
            (
                s.name.clone(),
                (
                    Some(s.current.version),
                    s.previous.as_ref().map(|p| p.version),
                    s.current.spec.services.len(),
                ),
            )
        })
        .collect();
    for (spec, _) in stack_services(&mut client, None).await? {
        let name = spec.labels[STACK_LABEL].clone();
        if !objects.contains_key(&name) {
            stacks.entry(name).or_default().2 += 1;
        }
    }
    let show = |v: &Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let v: Vec<_> = stacks
        .iter()
        .map(|(n, (v, p, c))| {
            serde_json::json!({"name": n, "version": v, "previous_version": p, "services": c})
        })
        .collect();
    output::print(output, &v, |w| {
        let rows: Vec<Vec<String>> = stacks
            .iter()
            .map(|(n, (v, p, c))| vec![n.clone(), show(v), show(p), c.to_string()])
            .collect();
        output::write_table(w, &["NAME", "VERSION", "PREVIOUS", "SERVICES"], &rows)
    })
}

/// `rctl stack services NAME`.
pub async fn services(ctx: &Context, stack: &str, output: OutputFormat) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = stack_services(&mut client, Some(stack)).await?;
    if list.is_empty() {
        anyhow::bail!("stack {stack:?} has no services (see `rctl stack ls`)");
    }
    let v: Vec<_> = list
        .iter()
        .map(|(spec, s)| {
            serde_json::json!({
                "name": s.name, "compose_name": spec.labels.get(SERVICE_LABEL),
                "image": s.image, "desired": s.desired, "running": s.running,
                "spec": spec,
            })
        })
        .collect();
    output::print(output, &v, |w| {
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
        output::write_table(w, &["NAME", "COMPOSE NAME", "IMAGE", "REPLICAS"], &rows)
    })
}

/// `rctl stack ps NAME`: the tasks of the stack's services.
pub async fn ps(ctx: &Context, stack: &str, output: OutputFormat) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = stack_services(&mut client, Some(stack)).await?;
    if list.is_empty() {
        anyhow::bail!("stack {stack:?} has no services (see `rctl stack ls`)");
    }
    let mut tasks = Vec::new();
    for (_, s) in &list {
        tasks.extend(crate::tasks(&mut client, &s.name).await?);
    }
    let v: Vec<_> = tasks.iter().map(super::ps::to_json).collect();
    output::print(output, &v, |w| {
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
        output::write_table(
            w,
            &["NAME", "IMAGE", "NODE", "DESIRED", "STATE", "ERROR"],
            &rows,
        )
    })
}

/// `rctl stack rm NAME`: removes the stack's services, then its networks, secrets and configs
/// (retried while the services' tasks still hold them); volumes stay, as Docker keeps them.
pub async fn rm(ctx: &Context, stack: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let removed = client
        .remove_stack(RemoveStackRequest {
            name: stack.to_string(),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    for s in &removed.removed_services {
        println!("service/{s} removed");
    }
    // What is left labelled with it (services an earlier build deployed).
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
    if !removed.found && list.is_empty() && rest.is_empty() {
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

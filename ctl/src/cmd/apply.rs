//! `rctl apply -f FILE…`: declarative and idempotent. Every file is parsed and validated before
//! anything is sent, so a bad file changes nothing. Then it waits, showing progress, until the
//! services run as declared (`--detach` returns at once).

use std::path::PathBuf;

use rudder_model::manifest::{self, Manifest};
use rudder_proto::v1::ApplyRequest;

use crate::context::Context;
use crate::convert::{
    action, action_name, task_state, task_state_name, to_json, update_state, TaskState, UpdateState,
};
use rudder_model::apply::Action;
use rudder_model::job::JobState;

/// What the files of an apply hold.
enum Loaded {
    /// One compose file alone: a stack deploy of that stack name.
    Stack(String),
    /// Manifest documents, each with the file it came from.
    Docs(Vec<(PathBuf, Manifest)>),
}

/// Reads and parses every file (`-` is stdin) before anything is sent.
fn load(files: &[PathBuf]) -> anyhow::Result<Loaded> {
    let mut docs = Vec::new();
    for f in files {
        let (name, text) = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            ("<stdin>".to_string(), s)
        } else {
            let text =
                std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            (f.display().to_string(), text)
        };
        if rudder_model::compose::is_compose(&text) {
            // A compose file: a stack named by its `name:` or its directory (`rctl stack
            // deploy` names it explicitly).
            let dir = std::path::absolute(f).unwrap_or_else(|_| f.clone());
            let dir_name = dir
                .parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let stack = rudder_model::compose::default_stack_name(&text, &dir_name);
            eprintln!("{name}: a compose file, deployed as stack {stack:?}");
            if files.len() == 1 {
                // Alone, it is a stack deploy (a stack object, so `stack rollback` works).
                return Ok(Loaded::Stack(stack));
            }
            for m in crate::cmd::stack::load(std::slice::from_ref(f), &stack)? {
                docs.push((f.clone(), m));
            }
            continue;
        }
        for m in manifest::parse(&name, &text)? {
            docs.push((f.clone(), m));
        }
    }
    Ok(Loaded::Docs(docs))
}

pub async fn run(
    ctx: &Context,
    files: &[PathBuf],
    detach: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    match load(files)? {
        Loaded::Stack(stack) => {
            crate::cmd::stack::deploy(ctx, files, &stack, detach, timeout).await
        }
        Loaded::Docs(docs) => apply_manifests(ctx, docs, detach, timeout).await,
    }
}

/// `rctl apply --dry-run` and `rctl diff`: asks the controller what applying `files` would do
/// (the same plan, not proposed) and prints it, with the fields each updated object changes.
/// Returns whether anything would change.
pub async fn preview(ctx: &Context, files: &[PathBuf]) -> anyhow::Result<bool> {
    let mut client = crate::connect(ctx).await?;
    let (results, removed) = match load(files)? {
        Loaded::Stack(stack) => {
            let manifests = crate::cmd::stack::load(files, &stack)?;
            let base = files.first().cloned().unwrap_or_default();
            let docs = manifests.into_iter().map(|m| (base.clone(), m)).collect();
            let mut apply = request(docs)?;
            apply.dry_run = true;
            let resp = client
                .deploy_stack(rudder_proto::v1::DeployStackRequest {
                    name: stack,
                    apply: Some(apply),
                })
                .await
                .map_err(crate::status_err)?
                .into_inner();
            (resp.results, resp.removed_services)
        }
        Loaded::Docs(docs) => {
            let mut req = request(docs)?;
            req.dry_run = true;
            let resp = client
                .apply(req)
                .await
                .map_err(crate::status_err)?
                .into_inner();
            (resp.results, Vec::new())
        }
    };
    let text = preview_text(&results, &removed);
    print!("{text}");
    Ok(!removed.is_empty()
        || results
            .iter()
            .any(|r| action(r.action) != Some(Action::Unchanged)))
}

/// The text of a preview: one line per object, then its changed fields indented, then the
/// services a stack deploy would remove.
pub fn preview_text(results: &[rudder_proto::v1::ApplyResult], removed: &[String]) -> String {
    let mut out = String::new();
    let json = |s: &str| {
        if s.is_empty() {
            "(unset)".to_string()
        } else {
            s.to_string()
        }
    };
    for r in results {
        out.push_str(&format!(
            "{}/{} {}\n",
            r.kind.to_lowercase(),
            r.name,
            action_name(r.action)
        ));
        for c in &r.changes {
            out.push_str(&format!(
                "  {}: {} -> {}\n",
                c.path,
                json(&c.old_json),
                json(&c.new_json)
            ));
        }
    }
    for s in removed {
        out.push_str(&format!("service/{s} removed\n"));
    }
    out
}

/// The apply request for `docs` (each with the file it came from, which `file:` paths are
/// relative to); `file:` values are read here.
pub fn request(docs: Vec<(PathBuf, Manifest)>) -> anyhow::Result<ApplyRequest> {
    let mut specs = Vec::new();
    let mut networks = Vec::new();
    let mut volumes = Vec::new();
    let mut secrets = Vec::new();
    for (f, m) in docs {
        match m {
            Manifest::Service(s) => specs.push(to_json("service", &s)?),
            Manifest::Network(n) => networks.push(to_json("network", &n)?),
            Manifest::Volume(v) => volumes.push(to_json("volume", &v)?),
            Manifest::Secret(s) => secrets.push(secret_put(&f, "secret", s)?),
            Manifest::Config(s) => secrets.push(secret_put(&f, "config", s)?),
        }
    }
    if specs.is_empty() && networks.is_empty() && volumes.is_empty() && secrets.is_empty() {
        anyhow::bail!("nothing to apply: the files hold no documents");
    }
    Ok(ApplyRequest {
        service_specs_json: specs,
        network_specs_json: networks,
        volume_specs_json: volumes,
        secrets,
        dry_run: false,
    })
}

/// Sends `docs` (each with the file it came from, which `file:` paths are relative to) in one
/// apply, then waits for the services to converge unless `detach`.
pub async fn apply_manifests(
    ctx: &Context,
    docs: Vec<(PathBuf, Manifest)>,
    detach: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let req = request(docs)?;
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .apply(req)
        .await
        .map_err(crate::status_err)?
        .into_inner();
    finish(ctx, resp.results, detach, timeout).await
}

/// Prints an apply's results, then waits for the services it changed unless `detach`.
pub async fn finish(
    ctx: &Context,
    results: Vec<rudder_proto::v1::ApplyResult>,
    detach: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let mut names = Vec::new();
    for r in results {
        println!(
            "{}/{} {}",
            r.kind.to_lowercase(),
            r.name,
            action_name(r.action)
        );
        if r.kind == "Service" {
            names.push((r.name, action(r.action) != Some(Action::Unchanged)));
        }
    }
    if detach {
        return Ok(());
    }
    wait_converged(ctx, &names, timeout).await
}

/// A `kind: Secret|Config` document as the API takes it: its `data`, or its `file` (relative
/// to the manifest's directory) read here, at most 500 KiB.
fn secret_put(
    manifest: &std::path::Path,
    kind: &str,
    spec: rudder_model::secret::SecretSpec,
) -> anyhow::Result<rudder_proto::v1::PutSecretRequest> {
    let data = match (spec.data, spec.file) {
        (Some(d), _) => d.0.into_bytes(),
        (None, Some(file)) => {
            let base = manifest.parent().unwrap_or(std::path::Path::new("."));
            crate::cmd::secret::read_value(&base.join(file))?
        }
        (None, None) => anyhow::bail!("{kind} {:?}: no data", spec.name),
    };
    Ok(rudder_proto::v1::PutSecretRequest {
        kind: kind.into(),
        name: spec.name,
        labels: spec.labels.into_iter().collect(),
        data,
        mode: String::new(),
    })
}

/// Waits until every named service runs its desired replicas and its rollout (if any) has
/// completed, printing progress as it changes. Fails when a rollout pauses, when a rollout this
/// apply started was rolled back, when a new service's task cannot run at all (rejected: e.g.
/// its image does not exist), or after `timeout`. `services` pairs a name with whether this
/// apply changed it.
pub async fn wait_converged(
    ctx: &Context,
    services: &[(String, bool)],
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let start = std::time::Instant::now();
    let mut last: std::collections::BTreeMap<String, String> = Default::default();
    // Woken by the services' task watches, so a change is seen when it commits rather than
    // at the next poll; the poll stays as the fallback (and for service-level changes).
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());
    let _watches = watch_changes(&mut client, services, &changed).await;
    // A spinner with the time waited under the status lines, on a terminal only.
    let names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    let waiting =
        crate::progress::Progress::start(format!("waiting for {}", names.join(", ")), None);
    loop {
        let list = crate::services(&mut client).await?;
        let mut done = true;
        for (name, changed) in services {
            let Some(svc) = list.iter().find(|s| &s.name == name) else {
                continue;
            };
            let tasks = crate::tasks(&mut client, name).await?;
            if let Some(p) = crate::convert::job_progress(svc) {
                // A job converges once it has completed (Swarm waits for jobs the same way).
                let line = format!("{name}: job {p}");
                if last.get(name) != Some(&line) {
                    waiting.eprintln(&line);
                    last.insert(name.clone(), line);
                }
                match p.state {
                    JobState::Complete => {}
                    JobState::Running => done = false,
                    JobState::Failed => {
                        let why = tasks
                            .iter()
                            .filter(|t| {
                                matches!(
                                    task_state(t.state),
                                    Some(TaskState::Failed | TaskState::Rejected)
                                )
                            })
                            .max_by_key(|t| t.timestamp_ms)
                            .map(|t| format!(" (last failure: {} {})", t.name, t.error))
                            .unwrap_or_default();
                        anyhow::bail!("job {name} failed: {p}{why}");
                    }
                }
                continue;
            }
            let live: Vec<_> = tasks
                .iter()
                .filter(|t| task_state(t.desired_state) == Some(TaskState::Running))
                .collect();
            let desired = if svc.global {
                live.len() as u64
            } else {
                svc.desired
            };
            let running = live
                .iter()
                .filter(|t| task_state(t.state) == Some(TaskState::Running))
                .count() as u64;
            let update = update_state(svc.update_state);
            let rolling = matches!(
                update,
                Some(UpdateState::Updating | UpdateState::RollbackStarted)
            );
            let converged = running == desired && live.len() as u64 == desired && !rolling;
            let rejected = live
                .iter()
                .find(|t| task_state(t.state) == Some(TaskState::Rejected));
            let failing = tasks
                .iter()
                .filter(|t| {
                    matches!(
                        task_state(t.state),
                        Some(TaskState::Failed | TaskState::Rejected)
                    )
                })
                .max_by_key(|t| t.timestamp_ms);
            let mut line = format!("{name}: {running}/{desired} running");
            if let Some(u) = update.filter(|u| *u != UpdateState::Completed) {
                line.push_str(&format!(", update {}", u.as_str().replace('_', " ")));
            }
            if !converged {
                if let Some(f) = failing {
                    line.push_str(&format!(
                        " (last failure: {} {}: {})",
                        f.name,
                        task_state_name(f.state),
                        f.error
                    ));
                }
            }
            if last.get(name) != Some(&line) {
                waiting.eprintln(&line);
                last.insert(name.clone(), line);
            }
            match update {
                Some(u @ (UpdateState::Paused | UpdateState::RollbackPaused)) => anyhow::bail!(
                    "service {name}: {} {}",
                    u.as_str().replace('_', " "),
                    svc.update_message
                ),
                Some(UpdateState::RollbackCompleted) if *changed => anyhow::bail!(
                    "service {name}: the update was rolled back: {}",
                    svc.update_message
                ),
                _ => {}
            }
            // A rollout handles its own failures (pause, rollback); a new service cannot.
            if let Some(r) = rejected.filter(|_| update.is_none()) {
                anyhow::bail!(
                    "service {name}: task {} was rejected: {}",
                    r.name,
                    if r.error.is_empty() {
                        &r.message
                    } else {
                        &r.error
                    }
                );
            }
            done &= converged;
        }
        if done {
            return Ok(());
        }
        if start.elapsed() > timeout {
            anyhow::bail!(
                "not converged after {timeout:?}: {}",
                last.values().cloned().collect::<Vec<_>>().join("; ")
            );
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
        }
    }
}

/// Watches the tasks of `services` (`WatchTasks`), notifying `changed` on every update. The
/// watches end when the returned guard drops. A watch that cannot start is left out (the
/// caller polls anyway).
async fn watch_changes(
    client: &mut crate::Client,
    services: &[(String, bool)],
    changed: &std::sync::Arc<tokio::sync::Notify>,
) -> WatchGuard {
    let mut tasks = Vec::new();
    for (name, _) in services {
        let req = rudder_proto::v1::ListTasksRequest {
            service: name.clone(),
        };
        let Ok(stream) = client.watch_tasks(req).await else {
            continue;
        };
        let mut stream = stream.into_inner();
        let changed = changed.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {
                changed.notify_one();
            }
        }));
    }
    WatchGuard(tasks)
}

/// Ends the watches of [`watch_changes`] when dropped.
struct WatchGuard(Vec<tokio::task::JoinHandle<()>>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_proto::v1::{ApplyResult, FieldChange};

    #[test]
    fn preview_lists_objects_their_changed_fields_and_removals() {
        let r = |name: &str, a: Action, changes: Vec<FieldChange>| ApplyResult {
            kind: "Service".into(),
            name: name.into(),
            action: rudder_proto::v1::Action::from(a).into(),
            changes,
        };
        let results = vec![
            r(
                "web",
                Action::Updated,
                vec![
                    FieldChange {
                        path: "image".into(),
                        old_json: r#""a:1""#.into(),
                        new_json: r#""a:2""#.into(),
                    },
                    FieldChange {
                        path: "command".into(),
                        old_json: String::new(),
                        new_json: r#"["sh"]"#.into(),
                    },
                ],
            ),
            r("db", Action::Unchanged, vec![]),
        ];
        assert_eq!(
            preview_text(&results, &["old".into()]),
            "service/web updated\n  image: \"a:1\" -> \"a:2\"\n  command: (unset) -> [\"sh\"]\n\
             service/db unchanged\nservice/old removed\n"
        );
    }
}

//! The worker: turns the controller's assignment set into running containers and reports what
//! happens. Each task advances one step at a time — preparing (pull image), starting (rootfs +
//! bundle + shim), running, then an exit state — and every step's outcome is reported.
//!
//! Invariants: the assignment set is authoritative (a task absent from it is stopped and its
//! files removed); only this node's tasks are touched; a container started by an earlier agent
//! process is re-adopted from its directory, not restarted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rudder_image::client::RegistryClient;
use rudder_image::reference::Reference;
use rudder_image::store::ImageStore;
use rudder_model::spec::NetworkMode;
use rudder_model::{Task, TaskState};
use rudder_proto::v1::TaskStatusReport;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::bundle::{self, ContainerDir};
use crate::runtime::{self, ContainerRuntime};

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What tasks need from the host.
pub struct Ctx {
    pub containers: PathBuf,
    pub images: ImageStore,
    pub runtime: Arc<dyn ContainerRuntime>,
    pub cgroup_parent: String,
    /// Registry `host:port`, learned from the controller's welcome.
    pub registry: Mutex<String>,
    /// This node's certificate (the latest) for the cluster registry's mutual TLS; plain HTTP
    /// when `None`.
    pub registry_tls: Option<tokio::sync::watch::Receiver<rudder_pki::tls::NodeCerts>>,
    pub status_tx: mpsc::UnboundedSender<TaskStatusReport>,
    /// Overlay networks on this host (tasks with `networks` join them).
    pub overlay: Option<Arc<crate::net::Overlay>>,
    /// Named volumes' copies on this host, and the tasks' mounts.
    pub volumes: crate::volume::Volumes,
    /// The secret and config values this node's tasks use (memory only).
    pub secrets: crate::secrets::Values,
}

struct Local {
    stop: watch::Sender<bool>,
    /// Set when the task left the assignment set: remove its files once stopped.
    forget: Arc<std::sync::atomic::AtomicBool>,
}

pub struct Worker {
    ctx: Arc<Ctx>,
    local: Mutex<HashMap<String, Local>>,
    /// Last status reported per task, re-sent after a reconnect.
    last: Arc<Mutex<HashMap<String, TaskStatusReport>>>,
}

impl Worker {
    pub fn new(ctx: Ctx) -> Arc<Self> {
        Arc::new(Worker {
            ctx: Arc::new(ctx),
            local: Mutex::default(),
            last: Arc::default(),
        })
    }

    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    pub fn container_dir(&self, task_id: &str) -> PathBuf {
        self.ctx.containers.join(task_id)
    }

    /// Every task's last status, for a fresh session.
    pub fn last_statuses(&self) -> Vec<TaskStatusReport> {
        self.last
            .lock()
            .expect("last lock")
            .values()
            .cloned()
            .collect()
    }

    /// Re-adopts containers left by an earlier agent process.
    pub fn adopt(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(&self.ctx.containers) else {
            return;
        };
        for e in entries.flatten() {
            let dir = e.path();
            let Ok(bytes) = std::fs::read(dir.join("task.json")) else {
                continue;
            };
            let Ok(task) = serde_json::from_slice::<Task>(&bytes) else {
                continue;
            };
            let running = runtime::shim_pid(&dir).is_some_and(|p| runtime::shim_alive(p, &dir));
            let exited = runtime::exit_code(&dir).is_some();
            if running || exited {
                info!(task = %task.name(), running, "re-adopting container");
                self.spawn(task, true);
            }
        }
    }

    /// Applies the full assignment set from the controller.
    pub fn sync(self: &Arc<Self>, tasks: Vec<Task>) {
        let mut wanted = HashMap::new();
        for t in tasks {
            wanted.insert(t.id.clone(), t);
        }
        let mut to_spawn = Vec::new();
        let assigned: std::collections::HashSet<String> = wanted.keys().cloned().collect();
        {
            let local = self.local.lock().expect("local lock");
            for (id, l) in local.iter() {
                match wanted.get(id) {
                    None => {
                        l.forget.store(true, std::sync::atomic::Ordering::SeqCst);
                        l.stop.send_replace(true);
                    }
                    Some(t) if t.desired_state > TaskState::Running => {
                        l.stop.send_replace(true);
                    }
                    Some(_) => {}
                }
            }
            for (id, t) in wanted {
                if !local.contains_key(&id)
                    && t.desired_state <= TaskState::Running
                    && !t.status.state.is_terminal()
                    && t.status.state <= TaskState::Assigned
                {
                    to_spawn.push(t);
                }
            }
        }
        for t in to_spawn {
            self.spawn(t, false);
        }
        // Files of tasks the controller forgot and that run nowhere here.
        self.remove_stale_dirs(&assigned);
    }

    /// Removes the dirs of tasks absent from the assignment set whose shim is gone. A finished
    /// task still assigned keeps its dir: its log is served until the controller forgets it.
    fn remove_stale_dirs(&self, assigned: &std::collections::HashSet<String>) {
        let local = self.local.lock().expect("local lock");
        let Ok(entries) = std::fs::read_dir(&self.ctx.containers) else {
            return;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            if !local.contains_key(&id) && !assigned.contains(&id) {
                let dir = e.path();
                let alive = runtime::shim_pid(&dir).is_some_and(|p| runtime::shim_alive(p, &dir));
                if !alive {
                    bundle::unmount_rootfs(&ContainerDir { dir: dir.clone() });
                    let _ = std::fs::remove_dir_all(&dir);
                    // Its network namespace, if it had one (see `net::Overlay::netns_path`).
                    if let Some(data) = self.ctx.containers.parent() {
                        crate::net::remove_netns(&data.join("netns").join(&id));
                    }
                }
            }
        }
    }

    fn spawn(self: &Arc<Self>, task: Task, adopted: bool) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let forget = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.local.lock().expect("local lock").insert(
            task.id.clone(),
            Local {
                stop: stop_tx,
                forget: forget.clone(),
            },
        );
        let volumes = crate::volume::volume_names(&task);
        self.ctx.volumes.acquire(&volumes);
        let me = self.clone();
        tokio::spawn(async move {
            let id = task.id.clone();
            let dir = me.container_dir(&id);
            run_task(&me, task, adopted, stop_rx).await;
            me.local.lock().expect("local lock").remove(&id);
            if !volumes.is_empty() {
                // Its container is gone: volumes removed meanwhile may go now.
                let me = me.clone();
                let _ = tokio::task::spawn_blocking(move || me.ctx.volumes.release(&volumes)).await;
            }
            if forget.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = std::fs::remove_dir_all(&dir);
                me.last.lock().expect("last lock").remove(&id);
            }
        });
    }

    fn report(&self, task: &Task, state: TaskState, message: &str, error: &str, exit: Option<i32>) {
        let r = TaskStatusReport {
            task_id: task.id.clone(),
            state: crate::convert::task_state_to_wire(state),
            message: message.to_string(),
            error: error.to_string(),
            // A container exists from `starting` on, unless the task never got that far.
            container_id: if state >= TaskState::Starting && state != TaskState::Rejected {
                task.id.clone()
            } else {
                String::new()
            },
            has_exit_code: exit.is_some(),
            exit_code: exit.unwrap_or(0),
            timestamp_ms: now_ms(),
        };
        self.last
            .lock()
            .expect("last lock")
            .insert(task.id.clone(), r.clone());
        let _ = self.ctx.status_tx.send(r);
    }
}

/// Runs one task through its steps until it ends or is stopped.
async fn run_task(w: &Arc<Worker>, task: Task, adopted: bool, mut stop: watch::Receiver<bool>) {
    let ctx = w.ctx.clone();
    let c = ContainerDir {
        dir: w.container_dir(&task.id),
    };
    let name = task.name();
    if !adopted {
        w.report(&task, TaskState::Preparing, "pulling image", "", None);
        let image = match pull(&ctx, &task).await {
            Ok(i) => i,
            Err(e) => {
                warn!(task = %name, %e, "rejected");
                w.report(&task, TaskState::Rejected, "image not available", &e, None);
                return;
            }
        };
        if *stop.borrow() {
            w.report(&task, TaskState::Shutdown, "stopped before start", "", None);
            return;
        }
        // Volumes and bind sources first: a missing one rejects the task with nothing to undo.
        let mounts = match ctx.volumes.prepare(&task) {
            Ok(m) => m,
            Err(e) => {
                warn!(task = %name, %e, "rejected");
                w.report(
                    &task,
                    TaskState::Rejected,
                    "cannot prepare mounts",
                    &e.to_string(),
                    None,
                );
                return;
            }
        };
        // Private: the spec holds the task's env (`crate::datadir`).
        let prepared = crate::datadir::private_dir(&c.dir)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                crate::datadir::write_private(
                    &c.dir.join("task.json"),
                    &serde_json::to_vec(&task).unwrap_or_default(),
                )
                .map_err(|e| e.to_string())
            })
            // The image the container runs, for `rctl commit` (`commit::IMAGE_FILE`).
            .and_then(|_| {
                crate::datadir::write_private(&c.image_file(), image.manifest_digest.as_bytes())
                    .map_err(|e| e.to_string())
            })
            // A task with secrets or configs gets its bundle on a tmpfs (values and config.json
            // stay in memory), mounted before the root filesystem below it.
            .and_then(|_| {
                if crate::secrets::uses_any(&task) {
                    crate::secrets::mount_bundle(&c, &task, &ctx.secrets).map_err(|e| e.to_string())
                } else {
                    Ok(())
                }
            })
            .and_then(|_| bundle::mount_rootfs(&c, &image.layers).map_err(|e| e.to_string()));
        // Empty volumes get the image's files at their targets, before anything runs there.
        let prepared = match prepared {
            Ok(()) => {
                let (ctx2, task2, rootfs) = (ctx.clone(), task.clone(), c.rootfs());
                tokio::task::spawn_blocking(move || ctx2.volumes.fill_from_image(&task2, &rootfs))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            }
            e => e,
        };
        let netns = match (&prepared, &ctx.overlay, task.networks.is_empty()) {
            (Ok(()), Some(o), false) => match o.attach(&task, &c.dir).await {
                Ok(p) => Some(p),
                Err(e) => {
                    warn!(task = %name, %e, "cannot attach to its networks");
                    o.detach(&task).await;
                    bundle::unmount_rootfs(&c);
                    w.report(
                        &task,
                        TaskState::Rejected,
                        "cannot attach to networks",
                        &e.to_string(),
                        None,
                    );
                    return;
                }
            },
            (Ok(()), Some(o), true) if task.spec.network_mode == NetworkMode::Bridge => {
                match o.attach_bridge(&task, &c.dir).await {
                    Ok(p) => Some(p),
                    Err(e) => {
                        warn!(task = %name, %e, "cannot attach to the local bridge");
                        o.detach_bridge(&task, &c.dir).await;
                        bundle::unmount_rootfs(&c);
                        w.report(
                            &task,
                            TaskState::Rejected,
                            "cannot attach to the bridge",
                            &e.to_string(),
                            None,
                        );
                        return;
                    }
                }
            }
            (Ok(()), _, true) if matches!(task.spec.network_mode, NetworkMode::Container(_)) => {
                match shared_netns(&ctx.containers, &task, &c.dir).await {
                    Ok(p) => Some(p),
                    Err(e) => {
                        warn!(task = %name, %e, "no namespace to share");
                        bundle::unmount_rootfs(&c);
                        w.report(
                            &task,
                            TaskState::Rejected,
                            "no namespace to share",
                            &e,
                            None,
                        );
                        return;
                    }
                }
            }
            (Ok(()), None, false) => {
                bundle::unmount_rootfs(&c);
                w.report(
                    &task,
                    TaskState::Rejected,
                    "no overlay support on this host",
                    "",
                    None,
                );
                return;
            }
            _ => None,
        };
        let prepared = prepared.and_then(|_| {
            let (mut all, env) = if crate::secrets::uses_any(&task) {
                crate::secrets::materialise(&c, &task, &ctx.secrets).map_err(|e| e.to_string())?
            } else {
                Default::default()
            };
            // The task's own mounts come after, as before; a secret's target is its own.
            all.splice(0..0, mounts.iter().cloned());
            bundle::write_config(
                &c,
                &task,
                &image.config,
                &ctx.cgroup_parent,
                netns.as_deref(),
                &all,
                &env,
            )
            .map_err(|e| e.to_string())
        });
        if let Err(e) = prepared {
            warn!(task = %name, %e, "rejected");
            bundle::unmount_rootfs(&c);
            if let (Some(o), Some(_)) = (&ctx.overlay, &netns) {
                o.detach(&task).await;
                o.detach_bridge(&task, &c.dir).await;
            }
            w.report(
                &task,
                TaskState::Rejected,
                "cannot prepare container",
                &e,
                None,
            );
            return;
        }
        w.report(&task, TaskState::Starting, "starting", "", None);
        // A failed earlier attempt may have left a record with this id.
        let _ = ctx.runtime.delete(&task.id, &c.dir).await;
        match ctx.runtime.start(&task.id, &c.dir).await {
            Ok(pid) => {
                info!(task = %name, pid, "running");
                if task.spec.healthcheck.is_some() {
                    // Counts as running only once healthy: the monitor below reports it.
                    w.report(
                        &task,
                        TaskState::Starting,
                        "waiting for health check",
                        "",
                        None,
                    );
                } else {
                    w.report(&task, TaskState::Running, "running", "", None);
                }
            }
            Err(e) => {
                warn!(task = %name, %e, "failed to start");
                w.report(
                    &task,
                    TaskState::Failed,
                    "failed to start",
                    &e.to_string(),
                    None,
                );
                cleanup(&ctx, &task, &c).await;
                return;
            }
        }
    } else if runtime::exit_code(&c.dir).is_none() {
        w.report(&task, TaskState::Running, "running (re-adopted)", "", None);
    }

    enum End {
        Exited,
        Stopped,
        Unhealthy(String),
    }
    let health = async {
        match &task.spec.healthcheck {
            Some(check) => {
                let on_healthy = || {
                    info!(task = %name, "healthy");
                    w.report(&task, TaskState::Running, "running (healthy)", "", None);
                };
                crate::health::monitor(&*ctx.runtime, &task.id, &c.dir, check, on_healthy).await
            }
            None => std::future::pending().await,
        }
    };
    let (code, end) = tokio::select! {
        r = ctx.runtime.wait(&task.id, &c.dir) => (r, End::Exited),
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            (stop_container(&ctx, &task, &c).await, End::Stopped)
        }
        why = health => {
            warn!(task = %name, %why, "unhealthy: stopping");
            (stop_container(&ctx, &task, &c).await, End::Unhealthy(why))
        }
    };
    match (end, code) {
        (End::Unhealthy(why), code) => w.report(
            &task,
            TaskState::Failed,
            "unhealthy",
            &format!("unhealthy: {why}"),
            code.ok(),
        ),
        (End::Stopped, Ok(code)) => w.report(&task, TaskState::Shutdown, "stopped", "", Some(code)),
        (End::Exited, Ok(0)) => w.report(&task, TaskState::Complete, "exited", "", Some(0)),
        (End::Exited, Ok(code)) if runtime::oom_killed(&c.dir) => w.report(
            &task,
            TaskState::Failed,
            "out of memory",
            &format!(
                "killed by the OOM killer: memory limit {} reached (exit code {code})",
                rudder_model::spec::human_bytes(task.spec.resources.limits.memory)
            ),
            Some(code),
        ),
        (End::Exited, Ok(code)) => w.report(
            &task,
            TaskState::Failed,
            "exited",
            &format!("exit code {code}"),
            Some(code),
        ),
        (_, Err(e)) => w.report(&task, TaskState::Failed, "lost", &e.to_string(), None),
    }
    cleanup(&ctx, &task, &c).await;
}

/// SIGTERM, then SIGKILL after the grace period.
async fn stop_container(
    ctx: &Ctx,
    task: &Task,
    c: &ContainerDir,
) -> Result<i32, runtime::RuntimeError> {
    let _ = ctx.runtime.kill(&task.id, "TERM").await;
    let grace = Duration::from_secs(task.spec.stop_grace_period);
    match tokio::time::timeout(grace, ctx.runtime.wait(&task.id, &c.dir)).await {
        Ok(r) => r,
        Err(_) => {
            let _ = ctx.runtime.kill(&task.id, "KILL").await;
            ctx.runtime.wait(&task.id, &c.dir).await
        }
    }
}

async fn cleanup(ctx: &Ctx, task: &Task, c: &ContainerDir) {
    if let Err(e) = ctx.runtime.delete(&task.id, &c.dir).await {
        warn!(task = %task.name(), %e, "runtime delete");
    }
    bundle::unmount_rootfs(c);
    if let (Some(o), false) = (&ctx.overlay, task.networks.is_empty()) {
        o.detach(task).await;
    }
    let on_bridge = task.networks.is_empty() && task.spec.network_mode == NetworkMode::Bridge;
    if let (Some(o), true) = (&ctx.overlay, on_bridge) {
        o.detach_bridge(task, &c.dir).await;
    }
    // The writable layer goes with the container; the log stays until the task is forgotten.
    let _ = std::fs::remove_dir_all(c.upper());
    let _ = std::fs::remove_dir_all(c.work());
}

/// `network_mode: container:X`: the network namespace of a running task of X on this host
/// (`X` a service, or a task's name or id prefix), waiting up to 15 s for one to start. Its
/// resolv.conf and hosts are copied next to this task's bundle, so DNS works the same.
async fn shared_netns(containers: &Path, task: &Task, dir: &Path) -> Result<PathBuf, String> {
    let NetworkMode::Container(target) = &task.spec.network_mode else {
        return Err("not network_mode: container".into());
    };
    let service = task.spec.network_mode.shared_service().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let found = std::fs::read_dir(containers)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let t: Task =
                    serde_json::from_slice(&std::fs::read(e.path().join("task.json")).ok()?)
                        .ok()?;
                let matches = t.service_name == service
                    && (target.as_str() == service
                        || t.name().starts_with(target.as_str())
                        || t.id.starts_with(target.as_str()));
                if !matches || runtime::exit_code(&e.path()).is_some() {
                    return None;
                }
                let pid: i32 = std::fs::read_to_string(e.path().join("pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                std::path::Path::new(&format!("/proc/{pid}"))
                    .exists()
                    .then(|| (e.path(), pid))
            })
            // Prefer the task in the same slot (sidecar 2 with main 2).
            .min_by_key(|(p, _)| {
                let same = std::fs::read(p.join("task.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Task>(&b).ok())
                    .is_some_and(|t| t.slot == task.slot);
                !same
            });
        if let Some((other, pid)) = found {
            for f in ["resolv.conf", "hosts"] {
                if other.join(f).exists() {
                    let _ = std::fs::copy(other.join(f), dir.join(f));
                }
            }
            return Ok(PathBuf::from(format!("/proc/{pid}/ns/net")));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "network_mode: container:{target}: no running task of {service} on this host"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn pull(ctx: &Ctx, task: &Task) -> Result<rudder_image::store::PulledImage, String> {
    let registry = ctx.registry.lock().expect("registry lock").clone();
    let reference = Reference::parse(&task.spec.image).map_err(|e| e.to_string())?;
    let client = registry_client(&registry, &ctx.registry_tls)?;
    ctx.images
        .pull(&client, &reference)
        .await
        .map_err(|e| e.to_string())
}

/// The registry client for the cluster registry at `addr`.
pub fn registry_client(
    addr: &str,
    tls: &Option<tokio::sync::watch::Receiver<rudder_pki::tls::NodeCerts>>,
) -> Result<RegistryClient, String> {
    match tls {
        Some(certs) => {
            let c = certs.borrow().clone();
            let tls = rudder_image::ClientTls {
                ca_pem: c.ca().pem().to_string(),
                cert_pem: c.cert_pem().to_string(),
                key_pem: c.key_pem().to_string(),
                server_name: rudder_pki::ca::Role::Manager.server_name().to_string(),
            };
            RegistryClient::with_tls(addr, &tls)
        }
        None => RegistryClient::new(addr),
    }
    .map_err(|e| e.to_string())
}

//! The task lifecycle as a state machine over ports (STYLE 8, swarmkit's `exec.Do`): each call
//! of [`step`] performs one operation for one task and returns the status to report. The worker
//! (`crate::worker`) drives it until [`Phase::is_done`], reporting each status that changed.
//!
//! ```text
//!  Assigned ──► Pulling ──pull──► Pulled ──mounts──► MountsReady ──rootfs──► RootfsReady
//!                                   │ (stop asked: Shutdown, done)                │
//!                                   ▼                                   networks  ▼
//!  Adopted ──(exit file?)──┐     Created ◄──config.json── NetworksAttached ◄──────┘
//!      │ running           │        │ start
//!      ▼                   │        ▼
//!   Started/Running ◄──────┼── Started (health pending) ──healthy──► Running
//!      │ exit / stop (TERM, grace, KILL) / unhealthy                    │
//!      ▼                   ▼                                            ▼
//!   Exited ──cleanup (runtime delete, unmount, detach, discard layer)──► Cleaned
//! ```
//!
//! A preparation error rejects the task ([`StepError`], state `rejected`) after undoing what
//! that step had done; a start error fails it and leaves it in `Exited` for the cleanup.
//!
//! Invariants: `step` never reports (the worker does) and never blocks longer than its one
//! operation; the only long operation is waiting on a started container, which ends at its
//! exit, at a stop request, or at a health event. Cleanup releases in the reverse order of
//! preparation: runtime record, root filesystem, networks, writable layer.

pub mod ports;

#[cfg(test)]
pub mod fake;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use oci_spec::runtime::Mount as OciMount;
use rudder_model::{Task, TaskState, TaskStatus};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::bundle::ContainerDir;
use crate::health::{HealthEvent, Monitor};
use crate::runtime::{ContainerRuntime, RuntimeError};
use ports::{
    Clock, Image, ImagePortError, ImageStore, Mounts, MountsError, NetAttachError, NetPlan,
    TaskNetworks,
};

/// The ports a task acts through, shared by every task of the worker.
#[derive(Clone)]
pub struct Ports {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub images: Arc<dyn ImageStore>,
    pub mounts: Arc<dyn Mounts>,
    pub networks: Arc<dyn TaskNetworks>,
    pub clock: Arc<dyn Clock>,
}

/// Where one task is in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Received from the controller; nothing done yet.
    Assigned,
    /// Found on disk by a new agent process: its container may still run.
    Adopted,
    /// Reported `preparing`; the image is pulled next.
    Pulling,
    /// The image is local.
    Pulled,
    /// Volume directories exist, bind sources checked.
    MountsReady,
    /// The root filesystem is mounted (and the secrets tmpfs, and volumes filled).
    RootfsReady,
    /// The task has its network namespace (or needs none).
    NetworksAttached,
    /// `config.json` is written; reported `starting`.
    Created,
    /// The container runs; with a health check, it is not counted running before healthy.
    Started,
    /// The container runs and counts as running.
    Running,
    /// The container is gone (or never started); its resources are released next.
    Exited,
    /// Everything released: the end.
    Cleaned,
    /// Ended before anything needed releasing (rejected, or stopped before start).
    Done,
}

impl Phase {
    /// The worker stops stepping.
    pub fn is_done(&self) -> bool {
        matches!(self, Phase::Cleaned | Phase::Done)
    }

    /// The container may be started: everything it needs is in place.
    pub fn can_start(&self) -> bool {
        *self == Phase::Created
    }

    /// A container may exist for this task (so a stop must signal it).
    pub fn has_container(&self) -> bool {
        matches!(self, Phase::Adopted | Phase::Started | Phase::Running)
    }

    /// Host resources (mounts, namespace) may be held, so the end must release them.
    pub fn needs_cleanup(&self) -> bool {
        matches!(
            self,
            Phase::RootfsReady
                | Phase::NetworksAttached
                | Phase::Created
                | Phase::Started
                | Phase::Running
                | Phase::Adopted
                | Phase::Exited
        )
    }
}

/// Why a step ended the task. The message and the error text are what the controller shows.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("task: image not available: {0}")]
    Pull(#[from] ImagePortError),
    #[error("task: cannot prepare mounts: {0}")]
    Mounts(#[source] MountsError),
    #[error("task: cannot prepare container: {0}")]
    Prepare(#[source] MountsError),
    #[error("task: cannot attach to networks: {0}")]
    Networks(#[source] NetAttachError),
    #[error("task: cannot attach to the bridge: {0}")]
    Bridge(#[source] NetAttachError),
    #[error("task: no namespace to share: {0}")]
    Shared(#[source] NetAttachError),
    #[error("task: no overlay support on this host")]
    NoOverlay,
    #[error("task: failed to start: {0}")]
    Start(#[source] RuntimeError),
}

impl StepError {
    /// The state the task ends in: rejected before a start was tried, failed after.
    pub fn state(&self) -> TaskState {
        match self {
            StepError::Start(_) => TaskState::Failed,
            _ => TaskState::Rejected,
        }
    }

    /// The status message (short, fixed per cause).
    pub fn message(&self) -> &'static str {
        match self {
            StepError::Pull(_) => "image not available",
            StepError::Mounts(_) => "cannot prepare mounts",
            StepError::Prepare(_) => "cannot prepare container",
            StepError::Networks(_) => "cannot attach to networks",
            StepError::Bridge(_) => "cannot attach to the bridge",
            StepError::Shared(_) => "no namespace to share",
            StepError::NoOverlay => "no overlay support on this host",
            StepError::Start(_) => "failed to start",
        }
    }

    /// The status error: the cause's own text.
    pub fn detail(&self) -> String {
        match self {
            StepError::Pull(e) => e.to_string(),
            StepError::Mounts(e) | StepError::Prepare(e) => e.to_string(),
            StepError::Networks(e) | StepError::Bridge(e) | StepError::Shared(e) => e.to_string(),
            StepError::NoOverlay => String::new(),
            StepError::Start(e) => e.to_string(),
        }
    }

    /// The status to report for this error.
    pub fn status(&self, task: &Task, now: u64) -> TaskStatus {
        status(
            task,
            self.state(),
            self.message(),
            &self.detail(),
            None,
            now,
        )
    }
}

/// One task's working state between steps.
pub struct TaskCtx {
    pub ports: Ports,
    pub phase: Phase,
    pub dir: ContainerDir,
    /// The controller wants the task stopped (desired state past running, or forgotten).
    stop: watch::Receiver<bool>,
    image: Option<Image>,
    mounts: Vec<OciMount>,
    netns: Option<PathBuf>,
    health: Option<Monitor>,
    /// The last status a step produced (a cleanup step repeats it: nothing new to report).
    last: Option<TaskStatus>,
}

impl TaskCtx {
    /// A task to run from the start (`adopted`: found running by a new agent process).
    pub fn new(ports: Ports, dir: PathBuf, stop: watch::Receiver<bool>, adopted: bool) -> Self {
        TaskCtx {
            ports,
            phase: if adopted {
                Phase::Adopted
            } else {
                Phase::Assigned
            },
            dir: ContainerDir::new(dir),
            stop,
            image: None,
            mounts: Vec::new(),
            netns: None,
            health: None,
            last: None,
        }
    }

    fn stop_requested(&self) -> bool {
        *self.stop.borrow()
    }
}

/// A status of `task` at `now` (the container id is the task's from `starting` on).
pub fn status(
    task: &Task,
    state: TaskState,
    message: &str,
    error: &str,
    exit_code: Option<i32>,
    now: u64,
) -> TaskStatus {
    TaskStatus {
        state,
        message: message.to_string(),
        error: error.to_string(),
        container_id: if state >= TaskState::Starting && state != TaskState::Rejected {
            task.id.clone()
        } else {
            String::new()
        },
        exit_code,
        timestamp: now,
    }
}

/// How a started container ended.
enum End {
    Exited,
    Stopped,
    Unhealthy(String),
}

/// Advances `task` by one operation. Returns the status to report (the worker skips it when
/// it equals the last one), or the error that ended the task.
pub async fn step(task: &Task, cx: &mut TaskCtx) -> Result<TaskStatus, StepError> {
    let r = step_once(task, cx).await;
    cx.last = Some(match &r {
        Ok(s) => s.clone(),
        Err(e) => e.status(task, cx.ports.clock.now_ms()),
    });
    r
}

async fn step_once(task: &Task, cx: &mut TaskCtx) -> Result<TaskStatus, StepError> {
    let p = cx.ports.clone();
    let now = || p.clock.now_ms();
    let st = |state, message: &str| status(task, state, message, "", None, now());
    match cx.phase.clone() {
        Phase::Assigned => {
            cx.phase = Phase::Pulling;
            Ok(st(TaskState::Preparing, "pulling image"))
        }
        Phase::Pulling => match p.images.pull(&task.image_ref()).await {
            Ok(image) => {
                cx.image = Some(image);
                cx.phase = Phase::Pulled;
                Ok(st(TaskState::Preparing, "pulling image"))
            }
            Err(e) => {
                cx.phase = Phase::Done;
                Err(StepError::Pull(e))
            }
        },
        Phase::Pulled if cx.stop_requested() => {
            cx.phase = Phase::Done;
            Ok(st(TaskState::Shutdown, "stopped before start"))
        }
        // Volumes and bind sources first: a missing one rejects the task with nothing to undo.
        Phase::Pulled => match p.mounts.prepare(task) {
            Ok(m) => {
                cx.mounts = m;
                cx.phase = Phase::MountsReady;
                Ok(st(TaskState::Preparing, "pulling image"))
            }
            Err(e) => {
                cx.phase = Phase::Done;
                Err(StepError::Mounts(e))
            }
        },
        Phase::MountsReady => {
            let image = cx.image.clone().unwrap_or_default();
            match p.mounts.rootfs(task, &cx.dir, &image).await {
                Ok(()) => {
                    cx.phase = Phase::RootfsReady;
                    Ok(st(TaskState::Preparing, "pulling image"))
                }
                Err(e) => {
                    p.mounts.unmount(&cx.dir);
                    cx.phase = Phase::Done;
                    Err(StepError::Prepare(e))
                }
            }
        }
        Phase::RootfsReady => {
            let plan = NetPlan::of(task, p.networks.available());
            let attached = match plan {
                NetPlan::Nothing => Ok(None),
                NetPlan::Overlay => match p.networks.attach_networks(task, &cx.dir.dir).await {
                    Ok(ns) => Ok(Some(ns)),
                    Err(e) => {
                        warn!(%e, "cannot attach to its networks");
                        p.networks.detach_networks(task).await;
                        Err(StepError::Networks(e))
                    }
                },
                NetPlan::Bridge => match p.networks.attach_bridge(task, &cx.dir.dir).await {
                    Ok(ns) => Ok(Some(ns)),
                    Err(e) => {
                        warn!(%e, "cannot attach to the local bridge");
                        p.networks.detach_bridge(task, &cx.dir.dir).await;
                        Err(StepError::Bridge(e))
                    }
                },
                NetPlan::Shared => match p.networks.shared(task, &cx.dir.dir).await {
                    Ok(ns) => Ok(Some(ns)),
                    Err(e) => {
                        warn!(%e, "no namespace to share");
                        Err(StepError::Shared(e))
                    }
                },
                NetPlan::Unsupported => Err(StepError::NoOverlay),
            };
            match attached {
                Ok(ns) => {
                    cx.netns = ns;
                    cx.phase = Phase::NetworksAttached;
                    Ok(st(TaskState::Preparing, "pulling image"))
                }
                Err(e) => {
                    p.mounts.unmount(&cx.dir);
                    cx.phase = Phase::Done;
                    Err(e)
                }
            }
        }
        Phase::NetworksAttached => {
            let image = cx.image.clone().unwrap_or_default();
            match p
                .mounts
                .write_bundle(task, &cx.dir, &image, cx.netns.as_deref(), &cx.mounts)
            {
                Ok(()) => {
                    cx.phase = Phase::Created;
                    Ok(st(TaskState::Starting, "starting"))
                }
                Err(e) => {
                    p.mounts.unmount(&cx.dir);
                    detach(task, cx).await;
                    cx.phase = Phase::Done;
                    Err(StepError::Prepare(e))
                }
            }
        }
        Phase::Created => {
            debug_assert!(cx.phase.can_start());
            // A failed earlier attempt may have left a record with this id.
            let _ = p.runtime.delete(&task.id, &cx.dir.dir).await;
            match p.runtime.start(&task.id, &cx.dir.dir).await {
                Ok(pid) => {
                    info!(pid, "running");
                    cx.phase = Phase::Started;
                    Ok(match &task.spec.healthcheck {
                        Some(check) => {
                            cx.health = Some(Monitor::new(check.clone(), p.clock.instant()));
                            // Counts as running only once healthy.
                            st(TaskState::Starting, "waiting for health check")
                        }
                        None => {
                            cx.phase = Phase::Running;
                            st(TaskState::Running, "running")
                        }
                    })
                }
                Err(e) => {
                    warn!(%e, "failed to start");
                    cx.phase = Phase::Exited;
                    Err(StepError::Start(e))
                }
            }
        }
        Phase::Adopted => {
            cx.health = task
                .spec
                .healthcheck
                .clone()
                .map(|c| Monitor::new(c, p.clock.instant()));
            cx.phase = if cx.health.is_some() {
                Phase::Started
            } else {
                Phase::Running
            };
            if cx.dir.read_exit_code().is_none() {
                Ok(st(TaskState::Running, "running (re-adopted)"))
            } else {
                // It ended while no agent watched: the wait below returns its code at once.
                run(task, cx).await
            }
        }
        Phase::Started | Phase::Running => run(task, cx).await,
        Phase::Exited => {
            cleanup(task, cx).await;
            cx.phase = Phase::Cleaned;
            Ok(cx
                .last
                .clone()
                .unwrap_or_else(|| st(TaskState::Shutdown, "cleaned")))
        }
        Phase::Cleaned | Phase::Done => Ok(cx
            .last
            .clone()
            .unwrap_or_else(|| st(TaskState::Shutdown, "done"))),
    }
}

/// Waits on the started container: its exit, a stop request, or a health event.
async fn run(task: &Task, cx: &mut TaskCtx) -> Result<TaskStatus, StepError> {
    enum Woke {
        Exit(Result<i32, RuntimeError>),
        Stop,
        Health(HealthEvent),
    }
    debug_assert!(cx.phase.has_container());
    let p = cx.ports.clone();
    let dir = cx.dir.dir.clone();
    let mut stop = cx.stop.clone();
    let woke = {
        let monitor = &mut cx.health;
        let health = async {
            match monitor.as_mut() {
                Some(m) => m.next_event(&*p.runtime, &*p.clock, &task.id, &dir).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = p.runtime.wait(&task.id, &dir) => Woke::Exit(r),
            _ = stop.wait_for(|s| *s) => Woke::Stop,
            ev = health => Woke::Health(ev),
        }
    };
    let (code, end) = match woke {
        Woke::Exit(r) => (r, End::Exited),
        Woke::Stop => match drain(&p, task, &dir).await {
            Some(exited) => (exited, End::Stopped),
            None => (stop_container(&p, task, &dir).await, End::Stopped),
        },
        Woke::Health(HealthEvent::Healthy) => {
            info!("healthy");
            cx.phase = Phase::Running;
            let now = p.clock.now_ms();
            return Ok(status(
                task,
                TaskState::Running,
                "running (healthy)",
                "",
                None,
                now,
            ));
        }
        Woke::Health(HealthEvent::Unhealthy(why)) => {
            warn!(%why, "unhealthy: stopping");
            (stop_container(&p, task, &dir).await, End::Unhealthy(why))
        }
    };
    cx.phase = Phase::Exited;
    let now = p.clock.now_ms();
    let s =
        |state, message: &str, error: &str, code| status(task, state, message, error, code, now);
    Ok(match (end, code) {
        (End::Unhealthy(why), code) => s(
            TaskState::Failed,
            "unhealthy",
            &format!("unhealthy: {why}"),
            code.ok(),
        ),
        (End::Stopped, Ok(code)) => s(TaskState::Shutdown, "stopped", "", Some(code)),
        (End::Exited, Ok(0)) => s(TaskState::Complete, "exited", "", Some(0)),
        (End::Exited, Ok(code)) if cx.dir.oom_killed() => s(
            TaskState::Failed,
            "out of memory",
            &format!(
                "killed by the OOM killer: memory limit {} reached (exit code {code})",
                rudder_model::spec::human_bytes(task.spec.resources.limits.memory)
            ),
            Some(code),
        ),
        (End::Exited, Ok(code)) => s(
            TaskState::Failed,
            "exited",
            &format!("exit code {code}"),
            Some(code),
        ),
        (_, Err(e)) => s(TaskState::Failed, "lost", &e.to_string(), None),
    })
}

/// The service's `stop_signal` (validated by the model), else SIGTERM.
pub fn stop_signal(task: &Task) -> &'static str {
    task.spec
        .stop_signal
        .as_deref()
        .and_then(rudder_model::runtime_options::signal)
        .unwrap_or("TERM")
}

/// Before the stop signal of a task other hosts may send connections to (one with an overlay
/// address), waits [`crate::churn::DRAIN`]: the controller took it out of the network map
/// when it asked for the stop, and every host needs that long to stop sending it new
/// connections. Returns the exit code when the container exits meanwhile.
async fn drain(p: &Ports, task: &Task, dir: &std::path::Path) -> Option<Result<i32, RuntimeError>> {
    if task.networks.is_empty() {
        return None;
    }
    tokio::select! {
        r = p.runtime.wait(&task.id, dir) => Some(r),
        _ = p.clock.sleep(crate::churn::DRAIN) => None,
    }
}

/// The stop signal (SIGTERM unless the service sets `stop_signal`), then SIGKILL after the
/// task's grace period.
async fn stop_container(
    p: &Ports,
    task: &Task,
    dir: &std::path::Path,
) -> Result<i32, RuntimeError> {
    let _ = p.runtime.kill(&task.id, stop_signal(task)).await;
    let grace = Duration::from_secs(task.spec.stop_grace_period);
    tokio::select! {
        r = p.runtime.wait(&task.id, dir) => return r,
        _ = p.clock.sleep(grace) => {}
    }
    let _ = p.runtime.kill(&task.id, "KILL").await;
    p.runtime.wait(&task.id, dir).await
}

/// Releases the task's namespace as its plan made it.
async fn detach(task: &Task, cx: &TaskCtx) {
    let p = &cx.ports;
    match NetPlan::of(task, p.networks.available()) {
        NetPlan::Overlay => p.networks.detach_networks(task).await,
        NetPlan::Bridge => p.networks.detach_bridge(task, &cx.dir.dir).await,
        NetPlan::Nothing | NetPlan::Shared | NetPlan::Unsupported => {}
    }
}

/// Runtime record, root filesystem, namespace, writable layer: the reverse of preparation.
async fn cleanup(task: &Task, cx: &TaskCtx) {
    debug_assert!(cx.phase.needs_cleanup());
    let p = &cx.ports;
    if let Err(e) = p.runtime.delete(&task.id, &cx.dir.dir).await {
        warn!(%e, "runtime delete");
    }
    p.mounts.unmount(&cx.dir);
    detach(task, cx).await;
    p.mounts.discard_layer(&cx.dir);
}

#[cfg(test)]
mod tests;

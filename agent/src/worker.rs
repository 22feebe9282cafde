//! The worker: turns the controller's assignment set into running containers and reports what
//! happens. Each task is driven through the state machine of [`crate::task`] (pull, mounts,
//! networks, bundle, start, health, wait, cleanup), one [`step`] at a time, and every status
//! that changed is reported, inside one tracing span per task.
//!
//! Invariants: the assignment set is authoritative (a task absent from it is stopped and its
//! files removed); only this node's tasks are touched; a container started by an earlier agent
//! process is re-adopted from its directory, not restarted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rudder_image::client::RegistryClient;
use rudder_model::{Task, TaskState, TaskStatus};
use rudder_proto::v1::TaskStatusReport;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::bundle::{self, ContainerDir};
use crate::runtime::{self, ContainerRuntime};
use crate::task::ports::{OverlayNetworks, SystemClock};
use crate::task::{step, Ports, TaskCtx};

/// What the worker is built from on a real host (see [`Ctx::on_host`]).
pub struct Host {
    pub containers: PathBuf,
    pub images: rudder_image::store::ImageStore,
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

/// What tasks need from the host: the ports they act through, and the host state the session
/// feeds (shared with the ports' real implementations).
pub struct Ctx {
    pub containers: PathBuf,
    pub ports: Ports,
    pub status_tx: mpsc::UnboundedSender<TaskStatusReport>,
    /// Registry `host:port`, learned from the controller's welcome.
    pub registry: Arc<Mutex<String>>,
    /// Overlay networks on this host, for the session (network maps, keys).
    pub overlay: Option<Arc<crate::net::Overlay>>,
    /// Named volumes' copies on this host, for the session (declared set, copies).
    pub volumes: Arc<crate::volume::Volumes>,
    /// The secret and config values this node's tasks use (memory only).
    pub secrets: crate::secrets::Values,
}

impl Ctx {
    /// The real ports over this host's runtime, content store, mounts, overlay and clock.
    pub fn on_host(h: Host) -> Ctx {
        let registry = Arc::new(h.registry);
        // Compiled once here rather than by the runtime on every start.
        let seccomp_bpf = h
            .runtime
            .takes_seccomp_bpf()
            .then(|| crate::seccomp::Precompiled::compile(&crate::seccomp::default_profile()))
            .and_then(|r| {
                r.map_err(|e| warn!(%e, "the runtime compiles seccomp profiles itself"))
                    .ok()
            })
            .map(Arc::new);
        let volumes = Arc::new(h.volumes);
        let ports = Ports {
            runtime: h.runtime,
            images: Arc::new(crate::images::RegistryImageStore::new(
                h.images,
                registry.clone(),
                h.registry_tls,
            )),
            mounts: Arc::new(crate::volume::HostMounts {
                volumes: volumes.clone(),
                secrets: h.secrets.clone(),
                cgroup_parent: h.cgroup_parent,
                seccomp_bpf,
            }),
            networks: Arc::new(OverlayNetworks {
                overlay: h.overlay.clone(),
                containers: h.containers.clone(),
            }),
            clock: Arc::new(SystemClock),
        };
        Ctx {
            containers: h.containers,
            ports,
            status_tx: h.status_tx,
            registry,
            overlay: h.overlay,
            volumes,
            secrets: h.secrets,
        }
    }
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
    /// Tasks this process drove to their end that are still assigned: never started again.
    /// (A controller that sends only changes leaves the agent's copy of a task as first sent,
    /// `assigned`, after the task ended here; the copy alone would start it a second time.)
    ended: Mutex<std::collections::HashSet<String>>,
}

impl Worker {
    pub fn new(ctx: Ctx) -> Arc<Self> {
        Arc::new(Worker {
            ctx: Arc::new(ctx),
            local: Mutex::default(),
            last: Arc::default(),
            ended: Mutex::default(),
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
            let task = match crate::task_record::read(&ContainerDir::new(&dir)) {
                None => continue,
                Some(Ok(task)) => task,
                Some(Err(err)) => {
                    // A newer agent's record (a downgrade) or a damaged one: the container is
                    // left alone, not adopted under a guess.
                    warn!(%err, "not adopting a container");
                    continue;
                }
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
            let mut ended = self.ended.lock().expect("ended lock");
            ended.retain(|id| wanted.contains_key(id));
            for (id, t) in wanted {
                if !local.contains_key(&id)
                    && !ended.contains(&id)
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
                    let c = ContainerDir::new(&dir);
                    bundle::unmount_rootfs(&c);
                    let _ = c.remove();
                    // Its network namespace, if it had one (see `net::Overlay::netns_path`).
                    if let Some(data) = self.ctx.containers.parent() {
                        for ns in crate::rundir::netns_paths(data, &id) {
                            crate::net::remove_netns(&ns);
                        }
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
        self.ctx.ports.mounts.hold(&task);
        let me = self.clone();
        let span = info_span!("task", task = %task.name());
        tokio::spawn(
            async move {
                let id = task.id.clone();
                let dir = me.container_dir(&id);
                me.drive(&task, adopted, stop_rx).await;
                {
                    let mut local = me.local.lock().expect("local lock");
                    local.remove(&id);
                    if !forget.load(std::sync::atomic::Ordering::SeqCst) {
                        me.ended.lock().expect("ended lock").insert(id.clone());
                    }
                }
                me.ctx.ports.mounts.release(&task).await;
                if forget.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = ContainerDir::new(&dir).remove();
                    me.last.lock().expect("last lock").remove(&id);
                }
            }
            .instrument(span),
        );
    }

    /// Steps one task until it is done, reporting each status that changed.
    async fn drive(&self, task: &Task, adopted: bool, stop: watch::Receiver<bool>) {
        let dir = self.container_dir(&task.id);
        let mut cx = TaskCtx::new(self.ctx.ports.clone(), dir, stop, adopted);
        let mut sent: Option<TaskStatus> = None;
        while !cx.phase.is_done() {
            let began = std::time::Instant::now();
            let phase = cx.phase.clone();
            let r = step(task, &mut cx).await;
            debug!(?phase, us = began.elapsed().as_micros() as u64, "step");
            let s = match r {
                Ok(s) => s,
                Err(e) => {
                    warn!(%e, "task ended");
                    e.status(task, self.ctx.ports.clock.now_ms())
                }
            };
            let same = |a: &TaskStatus| {
                (a.state, &a.message, &a.error, a.exit_code)
                    == (s.state, &s.message, &s.error, s.exit_code)
            };
            if !sent.as_ref().is_some_and(same) {
                self.report(task, &s);
                sent = Some(s);
            }
        }
    }

    fn report(&self, task: &Task, s: &TaskStatus) {
        let r = TaskStatusReport {
            task_id: task.id.clone(),
            state: crate::convert::task_state_to_wire(s.state),
            message: s.message.clone(),
            error: s.error.clone(),
            container_id: s.container_id.clone(),
            has_exit_code: s.exit_code.is_some(),
            exit_code: s.exit_code.unwrap_or(0),
            timestamp_ms: s.timestamp,
        };
        self.last
            .lock()
            .expect("last lock")
            .insert(task.id.clone(), r.clone());
        let _ = self.ctx.status_tx.send(r);
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::convert::task_state_to_wire as wire;
    use crate::task::fake::{self, Fakes};

    fn worker(
        f: &Fakes,
        dir: &std::path::Path,
    ) -> (Arc<Worker>, mpsc::UnboundedReceiver<TaskStatusReport>) {
        let (status_tx, rx) = mpsc::unbounded_channel();
        let w = Worker::new(Ctx {
            containers: dir.join("containers"),
            ports: f.ports(),
            status_tx,
            registry: Arc::default(),
            overlay: None,
            volumes: Arc::new(crate::volume::Volumes::new(
                dir.join("volumes"),
                "h1".into(),
            )),
            secrets: Default::default(),
        });
        (w, rx)
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<TaskStatusReport>) -> (i32, String) {
        let r = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("a report")
            .expect("a report");
        (r.state, r.message)
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_left_out_of_the_assignments_is_stopped_released_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fakes::new(false);
        let (w, mut rx) = worker(&f, dir.path());
        w.sync(vec![fake::task("t1")]);
        let want = [
            TaskState::Preparing,
            TaskState::Starting,
            TaskState::Running,
        ]
        .map(wire);
        for state in want {
            assert_eq!(next(&mut rx).await.0, state);
        }
        let container = w.container_dir("t1");
        std::fs::create_dir_all(&container).unwrap();
        assert_eq!(w.last_statuses().len(), 1);
        w.sync(vec![]);
        let (state, message) = next(&mut rx).await;
        assert_eq!(
            (state, message.as_str()),
            (wire(TaskState::Shutdown), "stopped")
        );
        // The spawned task releases its mounts and forgets the task once it is cleaned.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!container.exists());
        assert!(w.last_statuses().is_empty());
        let calls = f.journal.calls();
        assert_eq!(calls.first().unwrap(), "mounts.hold t1");
        assert_eq!(calls.last().unwrap(), "mounts.release t1");
        // A second sync does not start it again.
        w.sync(vec![]);
        assert_eq!(f.journal.of("runtime.start").len(), 1);
    }

    /// A controller that sends only changes leaves the agent's copy of a task as first sent
    /// (`assigned`); once the task ended here, that copy must not start it again.
    #[tokio::test(start_paused = true)]
    async fn a_task_that_ended_here_is_not_started_again_from_its_first_copy() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fakes::new(false);
        *f.images.fail.lock().unwrap() = Some("no such image".into());
        let (w, mut rx) = worker(&f, dir.path());
        w.sync(vec![fake::task("t1")]);
        let mut states = Vec::new();
        while states.last() != Some(&wire(TaskState::Rejected)) {
            states.push(next(&mut rx).await.0);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        w.sync(vec![fake::task("t1")]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            f.journal.of("images.pull").len(),
            1,
            "{:?}",
            f.journal.calls()
        );
        assert!(rx.try_recv().is_err(), "no report of a second start");
    }

    #[tokio::test(start_paused = true)]
    async fn reports_carry_the_clock_time_and_the_container_id_from_starting_on() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fakes::new(false);
        let (w, mut rx) = worker(&f, dir.path());
        w.sync(vec![fake::task("t1")]);
        let r = rx.recv().await.unwrap();
        assert_eq!(
            (r.state, r.container_id.as_str()),
            (wire(TaskState::Preparing), "")
        );
        assert_eq!(r.timestamp_ms, fake::FakeClock::EPOCH_MS);
        let r = rx.recv().await.unwrap();
        assert_eq!(
            (r.state, r.container_id.as_str()),
            (wire(TaskState::Starting), "t1")
        );
    }
}

//! Hollow agents, for the fleet simulator (`rudder-fleetsim`): the agent's own session
//! ([`crate::session`]) and worker ([`crate::worker`]), driving the task state machine
//! ([`crate::task`]) over ports that do nothing on the host. A hollow host registers,
//! heartbeats, receives its assignments and reports every task state (preparing, starting,
//! running, then exited or failed) exactly as a real agent does, over its own mutual-TLS
//! session with its own node certificate, but starts no container: [`HollowRuntime`] only
//! waits a start latency and fails a share of starts.
//!
//! Many hollow hosts share one process. A host can be cut off and brought back
//! ([`HollowHost::disconnect`], [`HollowHost::connect`]): its worker and its "containers"
//! live on, as on a host whose network was lost, and the next session re-sends every task's
//! last status, as a real agent's does.
//!
//! Each host keeps a [`Timeline`] per task it was assigned (when the leader created it, when
//! the worker first saw it, when its start began and ended), from which the simulator splits
//! a scheduling delay into its stages.
//!
//! Invariants: nothing here touches the host (no files are written under `dir` unless the
//! controller declares volumes, no processes, no namespaces); randomness comes from the
//! seed in [`Behaviour`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_spec::runtime::Mount as OciMount;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rudder_model::Task;
use rudder_pki::tls::NodeCerts;
use rudder_proto::v1::TaskStatusReport;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::bundle::ContainerDir;
use crate::runtime::{ContainerRuntime, ContainerState, ExecIo, RunState, RuntimeError};
use crate::task::ports::{
    Image, ImagePortError, ImageStore, Mounts, MountsError, NetAttachError, SystemClock,
    TaskNetworks,
};
use crate::task::Ports;
use crate::worker::{Ctx, Worker};

/// How a hollow host's "containers" behave.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// How long a start takes (the runtime's `start`, before `running` is reported).
    pub start_latency: Duration,
    /// Share of starts that fail (0.0..=1.0): the task is reported `failed`.
    pub fail_rate: f64,
    /// A started container exits by itself (code 0) after this long; `None`: it runs until
    /// stopped.
    pub run_for: Option<Duration>,
    /// Seed of the host's failure draws.
    pub seed: u64,
    /// Register without the "assignment-changes" feature, as an agent older than it: the
    /// controller then sends the whole task set every time (before/after runs).
    pub full_assignments: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            start_latency: Duration::from_millis(50),
            fail_rate: 0.0,
            run_for: None,
            seed: 1,
            full_assignments: false,
        }
    }
}

/// When one task reached a hollow host, in milliseconds since the epoch (one machine, one
/// clock: the controllers and the hosts share it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeline {
    /// When the leader's control loop created the task (its `created_at`).
    pub created_ms: u64,
    /// When this host's worker first saw it in an assignment (`Mounts::hold`).
    pub seen_ms: u64,
    /// When the runtime's start was called (the task prepared), if it was.
    pub start_ms: Option<u64>,
    /// When the runtime's start returned (before `running` is reported), if it did.
    pub started_ms: Option<u64>,
}

/// Task id → [`Timeline`], shared by one host's ports.
#[derive(Debug, Default)]
struct Timelines(Mutex<HashMap<String, Timeline>>);

impl Timelines {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Timeline>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn seen(&self, task: &Task) {
        self.lock().entry(task.id.clone()).or_insert(Timeline {
            created_ms: task.created_at,
            seen_ms: wall_ms(),
            ..Timeline::default()
        });
    }

    fn start(&self, id: &str, f: impl FnOnce(&mut Timeline)) {
        if let Some(t) = self.lock().get_mut(id) {
            f(t);
        }
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A [`ContainerRuntime`] without containers: `start` waits [`Behaviour::start_latency`] and
/// fails [`Behaviour::fail_rate`] of the time; a started container runs until killed (exit
/// 128+signal) or until [`Behaviour::run_for`] has passed (exit 0).
pub struct HollowRuntime {
    behaviour: Behaviour,
    rng: Mutex<StdRng>,
    /// Started containers: their exit code once they ended.
    containers: Mutex<HashMap<String, watch::Sender<Option<i32>>>>,
    next_pid: AtomicU32,
    timelines: Arc<Timelines>,
}

impl HollowRuntime {
    /// A runtime behaving as `behaviour` says.
    pub fn new(behaviour: Behaviour) -> HollowRuntime {
        HollowRuntime {
            rng: Mutex::new(StdRng::seed_from_u64(behaviour.seed)),
            behaviour,
            containers: Mutex::default(),
            next_pid: AtomicU32::new(1000),
            timelines: Arc::default(),
        }
    }

    /// How many containers run now.
    pub fn running(&self) -> usize {
        self.lock()
            .values()
            .filter(|c| c.borrow().is_none())
            .count()
    }

    /// The ids of the containers that run now (a container's id is its task's).
    pub fn running_ids(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, c)| c.borrow().is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<Option<i32>>>> {
        self.containers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn exit(&self, id: &str, code: i32) {
        if let Some(c) = self.lock().get(id) {
            c.send_if_modified(|e| e.is_none() && e.replace(code).is_none());
        }
    }

    fn unsupported(what: &str) -> RuntimeError {
        RuntimeError::Start(format!("hollow: {what} is not simulated"))
    }
}

/// The number of a signal's name, as the kernel numbers it (TERM when unknown).
fn signal_number(name: &str) -> i32 {
    match name.trim_start_matches("SIG") {
        "KILL" => 9,
        "INT" => 2,
        "HUP" => 1,
        "QUIT" => 3,
        "USR1" => 10,
        "USR2" => 12,
        _ => 15,
    }
}

#[async_trait::async_trait]
impl ContainerRuntime for HollowRuntime {
    fn name(&self) -> &str {
        "hollow"
    }

    async fn start(&self, id: &str, _dir: &Path) -> Result<u32, RuntimeError> {
        self.timelines.start(id, |t| t.start_ms = Some(wall_ms()));
        tokio::time::sleep(self.behaviour.start_latency).await;
        self.timelines.start(id, |t| t.started_ms = Some(wall_ms()));
        let fail = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            self.behaviour.fail_rate > 0.0 && rng.random::<f64>() < self.behaviour.fail_rate
        };
        if fail {
            return Err(RuntimeError::Start(
                "hollow: injected start failure".to_string(),
            ));
        }
        let (tx, _) = watch::channel(None);
        self.lock().insert(id.to_string(), tx);
        Ok(self.next_pid.fetch_add(1, Ordering::Relaxed))
    }

    fn run_attached(
        &self,
        _id: &str,
        _bundle: &Path,
    ) -> Result<tokio::process::Child, RuntimeError> {
        Err(Self::unsupported("a foreground run"))
    }

    async fn wait(&self, id: &str, _dir: &Path) -> Result<i32, RuntimeError> {
        let mut rx = self
            .lock()
            .get(id)
            .map(|c| c.subscribe())
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        let ended = async {
            match rx.wait_for(|e| e.is_some()).await {
                Ok(code) => Ok((*code).unwrap_or(0)),
                Err(_) => Err(RuntimeError::NotFound(id.to_string())),
            }
        };
        match self.behaviour.run_for {
            Some(d) => {
                tokio::select! {
                    r = ended => r,
                    _ = tokio::time::sleep(d) => {
                        self.exit(id, 0);
                        Ok(0)
                    }
                }
            }
            None => ended.await,
        }
    }

    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.exit(id, 128 + signal_number(signal));
        Ok(())
    }

    async fn exec(
        &self,
        _id: &str,
        _dir: &Path,
        _cmd: &[String],
        _timeout: Duration,
    ) -> Result<(i32, String), RuntimeError> {
        Err(Self::unsupported("exec"))
    }

    fn exec_attached(
        &self,
        _id: &str,
        _process: &Path,
        _io: ExecIo,
    ) -> Result<tokio::process::Child, RuntimeError> {
        Err(Self::unsupported("exec"))
    }

    async fn pause(&self, _id: &str) -> Result<(), RuntimeError> {
        Err(Self::unsupported("pause"))
    }

    async fn resume(&self, _id: &str) -> Result<(), RuntimeError> {
        Err(Self::unsupported("resume"))
    }

    async fn delete(&self, id: &str, _dir: &Path) -> Result<(), RuntimeError> {
        let mut c = self.lock();
        if c.get(id).is_some_and(|e| e.borrow().is_some()) {
            c.remove(id);
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.lock().keys().cloned().collect())
    }

    async fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        let ended = self
            .lock()
            .get(id)
            .map(|e| *e.borrow())
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        Ok(match ended {
            None => ContainerState {
                status: RunState::Running,
                pid: 1,
            },
            Some(_) => ContainerState {
                status: RunState::Stopped,
                pid: 0,
            },
        })
    }
}

/// Every image is local and empty.
struct HollowImages;

#[async_trait::async_trait]
impl ImageStore for HollowImages {
    async fn pull(&self, image: &str) -> Result<Image, ImagePortError> {
        Ok(Image {
            manifest_digest: format!("hollow:{image}"),
            ..Image::default()
        })
    }
}

/// No filesystem: every preparation succeeds and mounts nothing. (`hold`, the worker's first
/// sight of a task, is when the host saw it.)
struct HollowMounts(Arc<Timelines>);

#[async_trait::async_trait]
impl Mounts for HollowMounts {
    fn hold(&self, task: &Task) {
        self.0.seen(task);
    }
    async fn release(&self, _task: &Task) {}
    fn prepare(&self, _task: &Task) -> Result<Vec<OciMount>, MountsError> {
        Ok(Vec::new())
    }
    async fn rootfs(
        &self,
        _task: &Task,
        _c: &ContainerDir,
        _image: &Image,
    ) -> Result<(), MountsError> {
        Ok(())
    }
    fn write_bundle(
        &self,
        _task: &Task,
        _c: &ContainerDir,
        _image: &Image,
        _netns: Option<&Path>,
        _mounts: &[OciMount],
    ) -> Result<(), MountsError> {
        Ok(())
    }
    fn unmount(&self, _c: &ContainerDir) {}
    fn discard_layer(&self, _c: &ContainerDir) {}
}

/// An overlay that attaches every task at once, to no namespace of its own.
struct HollowNetworks;

#[async_trait::async_trait]
impl TaskNetworks for HollowNetworks {
    fn available(&self) -> bool {
        true
    }
    async fn attach_networks(&self, task: &Task, _dir: &Path) -> Result<PathBuf, NetAttachError> {
        Ok(PathBuf::from(format!("/hollow/netns/{}", task.id)))
    }
    async fn detach_networks(&self, _task: &Task) {}
    async fn attach_bridge(&self, task: &Task, _dir: &Path) -> Result<PathBuf, NetAttachError> {
        Ok(PathBuf::from(format!("/hollow/netns/{}", task.id)))
    }
    async fn detach_bridge(&self, _task: &Task, _dir: &Path) {}
    async fn shared(&self, task: &Task, _dir: &Path) -> Result<PathBuf, NetAttachError> {
        Ok(PathBuf::from(format!("/hollow/netns/{}", task.id)))
    }
}

/// Who a hollow host is.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Its node id (the one its certificate names).
    pub node_id: String,
    /// Its host name.
    pub hostname: String,
    /// The address it registers (nothing listens there).
    pub addr: String,
    /// Capacity offered to the scheduler.
    pub cpus_milli: u64,
    /// Bytes of memory offered to the scheduler.
    pub memory_bytes: u64,
}

/// The session of the moment and where the worker's reports go.
#[derive(Default)]
struct Link {
    /// The current session's status channel; `None` while cut off.
    tx: Option<mpsc::UnboundedSender<TaskStatusReport>>,
    session: Option<JoinHandle<()>>,
}

/// One hollow host: a real worker over hollow ports, and a real session while connected.
pub struct HollowHost {
    spec: HostSpec,
    controllers: Vec<String>,
    worker: Arc<Worker>,
    runtime: Arc<HollowRuntime>,
    /// Kept so that the sessions' receivers stay open.
    certs: watch::Sender<NodeCerts>,
    link: Arc<Mutex<Link>>,
    forward: JoinHandle<()>,
}

impl HollowHost {
    /// A host with certificate `certs` (from a join) that will talk to `controllers` (URLs);
    /// `dir` is where volume copies would go (nothing is written unless volumes are
    /// declared). Not connected yet: see [`HollowHost::connect`].
    pub fn new(
        spec: HostSpec,
        certs: NodeCerts,
        controllers: Vec<String>,
        behaviour: Behaviour,
        dir: &Path,
    ) -> HollowHost {
        let runtime = Arc::new(HollowRuntime::new(behaviour));
        let (status_tx, mut status_rx) = mpsc::unbounded_channel();
        let worker = Worker::new(Ctx {
            containers: dir.join("containers"),
            ports: Ports {
                runtime: runtime.clone(),
                images: Arc::new(HollowImages),
                mounts: Arc::new(HollowMounts(runtime.timelines.clone())),
                networks: Arc::new(HollowNetworks),
                clock: Arc::new(SystemClock),
            },
            status_tx,
            registry: Arc::default(),
            overlay: None,
            volumes: Arc::new(crate::volume::Volumes::new(
                dir.join("volumes"),
                spec.hostname.clone(),
            )),
            secrets: Default::default(),
        });
        let link = Arc::new(Mutex::new(Link::default()));
        let forward = tokio::spawn({
            let link = link.clone();
            async move {
                while let Some(r) = status_rx.recv().await {
                    let l = link.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(tx) = &l.tx {
                        // A session that just ended: its successor re-sends the last statuses.
                        let _ = tx.send(r);
                    }
                }
            }
        });
        let (certs, _) = watch::channel(certs);
        HollowHost {
            spec,
            controllers,
            worker,
            runtime,
            certs,
            link,
            forward,
        }
    }

    /// Who this host is.
    pub fn spec(&self) -> &HostSpec {
        &self.spec
    }

    /// How many of its "containers" run now.
    pub fn running(&self) -> usize {
        self.runtime.running()
    }

    /// The task ids of its "containers" that run now.
    pub fn running_ids(&self) -> Vec<String> {
        self.runtime.running_ids()
    }

    /// Every task this host was assigned, with its [`Timeline`].
    pub fn timelines(&self) -> Vec<(String, Timeline)> {
        self.runtime
            .timelines
            .lock()
            .iter()
            .map(|(id, t)| (id.clone(), *t))
            .collect()
    }

    /// Opens a session (the agent's [`crate::session::run`], which finds the leader and keeps
    /// a session for as long as the host stays connected). Does nothing when connected.
    pub fn connect(&self) {
        let mut l = self.link.lock().unwrap_or_else(|e| e.into_inner());
        if l.session.as_ref().is_some_and(|s| !s.is_finished()) {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        l.tx = Some(tx);
        let me = crate::session::Identity {
            node_id: self.spec.node_id.clone(),
            hostname: self.spec.hostname.clone(),
            addr: self.spec.addr.clone(),
            cpus_milli: self.spec.cpus_milli,
            memory_bytes: self.spec.memory_bytes,
            role: "worker".to_string(),
            labels: Default::default(),
            data_dir: None,
            tls: Some(self.certs.subscribe()),
            trusted: None,
            usage: None,
            features: if self.runtime.behaviour.full_assignments {
                Vec::new()
            } else {
                crate::session::features()
            },
        };
        l.session = Some(tokio::spawn(crate::session::run(
            self.controllers.clone(),
            me,
            self.worker.clone(),
            rx,
        )));
    }

    /// Cuts the host off: its session ends at once (the controller sees the stream close),
    /// its tasks keep "running".
    pub fn disconnect(&self) {
        let mut l = self.link.lock().unwrap_or_else(|e| e.into_inner());
        l.tx = None;
        if let Some(s) = l.session.take() {
            s.abort();
        }
    }
}

impl Drop for HollowHost {
    fn drop(&mut self) {
        self.disconnect();
        self.forward.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn behaviour(fail_rate: f64, run_for: Option<Duration>) -> Behaviour {
        Behaviour {
            start_latency: Duration::from_millis(20),
            fail_rate,
            run_for,
            seed: 7,
            full_assignments: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_takes_the_latency_and_runs_until_killed() {
        let rt = HollowRuntime::new(behaviour(0.0, None));
        let began = tokio::time::Instant::now();
        rt.start("t1", Path::new("/none")).await.unwrap();
        assert_eq!(began.elapsed(), Duration::from_millis(20));
        assert_eq!(rt.running(), 1);
        let wait = rt.wait("t1", Path::new("/none"));
        let kill = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            rt.kill("t1", "TERM").await.unwrap();
        };
        let (code, ()) = tokio::join!(wait, kill);
        assert_eq!(code.unwrap(), 143);
        assert_eq!(rt.running(), 0);
        rt.delete("t1", Path::new("/none")).await.unwrap();
        assert!(rt.list().await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_with_a_run_time_exits_zero() {
        let rt = HollowRuntime::new(behaviour(0.0, Some(Duration::from_secs(3))));
        rt.start("t1", Path::new("/none")).await.unwrap();
        assert_eq!(rt.wait("t1", Path::new("/none")).await.unwrap(), 0);
        // Waiting again returns the same end.
        assert_eq!(rt.wait("t1", Path::new("/none")).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_rate_is_honoured_and_seeded() {
        let draw = || async {
            let rt = HollowRuntime::new(behaviour(0.3, None));
            let mut failed = Vec::new();
            for i in 0..200 {
                failed.push(
                    rt.start(&format!("t{i}"), Path::new("/none"))
                        .await
                        .is_err(),
                );
            }
            failed
        };
        let a = draw().await;
        assert_eq!(a, draw().await, "same seed, same draws");
        let n = a.iter().filter(|f| **f).count();
        assert!((30..=90).contains(&n), "{n} of 200 failed at a 30% rate");
        let never = HollowRuntime::new(behaviour(0.0, None));
        for i in 0..50 {
            never
                .start(&format!("t{i}"), Path::new("/none"))
                .await
                .unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_worker_drives_a_task_to_running_and_stops_it_through_hollow_ports() {
        use crate::convert::task_state_to_wire as wire;
        use rudder_model::TaskState;
        let dir = tempfile::tempdir().unwrap();
        let (status_tx, mut rx) = mpsc::unbounded_channel();
        let runtime = Arc::new(HollowRuntime::new(behaviour(0.0, None)));
        let w = Worker::new(Ctx {
            containers: dir.path().join("containers"),
            ports: Ports {
                runtime: runtime.clone(),
                images: Arc::new(HollowImages),
                mounts: Arc::new(HollowMounts(runtime.timelines.clone())),
                networks: Arc::new(HollowNetworks),
                clock: Arc::new(SystemClock),
            },
            status_tx,
            registry: Arc::default(),
            overlay: None,
            volumes: Arc::new(crate::volume::Volumes::new(
                dir.path().join("volumes"),
                "h1".into(),
            )),
            secrets: Default::default(),
        });
        w.sync(vec![crate::task::fake::task("t1")]);
        let mut states = Vec::new();
        while states.last() != Some(&wire(TaskState::Running)) {
            states.push(rx.recv().await.unwrap().state);
        }
        states.dedup();
        assert_eq!(
            states,
            [
                TaskState::Preparing,
                TaskState::Starting,
                TaskState::Running
            ]
            .map(wire)
        );
        assert_eq!(runtime.running(), 1);
        // Its timeline: created by the leader, seen, started, in that order.
        let t = runtime
            .timelines
            .lock()
            .get("t1")
            .copied()
            .expect("a timeline");
        let task = crate::task::fake::task("t1");
        assert_eq!(t.created_ms, task.created_at);
        let (start, started) = (t.start_ms.expect("start"), t.started_ms.expect("started"));
        assert!(
            t.seen_ms > 0 && t.seen_ms <= start && start <= started,
            "{t:?}"
        );
        w.sync(vec![]);
        assert_eq!(rx.recv().await.unwrap().state, wire(TaskState::Shutdown));
        assert_eq!(runtime.running(), 0);
        // Nothing was written on the host.
        assert!(!dir.path().join("containers").exists());
    }
}

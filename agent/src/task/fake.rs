//! Recording fakes of the task ports, for tests without root. Every fake appends what it was
//! asked to one shared [`Journal`], so a test can assert the order across ports (cleanup
//! releases the runtime record, then the root filesystem, then the namespace).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_spec::runtime::Mount as OciMount;
use rudder_model::Task;

use super::ports::{
    Clock, Image, ImagePortError, ImageStore, Mounts, MountsError, NetAttachError, TaskNetworks,
};
use super::Ports;
use crate::bundle::ContainerDir;
use crate::runtime::fake::FakeRuntime;
use crate::runtime::{ContainerRuntime, ContainerState, ExecIo, RuntimeError};

/// The calls made on the fakes, in order.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    pub fn push(&self, s: impl Into<String>) {
        self.0.lock().expect("journal").push(s.into());
    }
    pub fn calls(&self) -> Vec<String> {
        self.0.lock().expect("journal").clone()
    }
    /// The calls that start with `prefix` (one port's).
    pub fn of(&self, prefix: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.starts_with(prefix))
            .collect()
    }
}

/// The runtime fake ([`FakeRuntime`]) with its start, kill, exec and delete also written to
/// the journal, so their order against the other ports shows.
pub struct JournaledRuntime {
    inner: Arc<FakeRuntime>,
    journal: Journal,
}

#[async_trait::async_trait]
impl ContainerRuntime for JournaledRuntime {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn start(&self, id: &str, dir: &Path) -> Result<u32, RuntimeError> {
        self.journal.push(format!("runtime.start {id}"));
        self.inner.start(id, dir).await
    }
    fn run_attached(&self, id: &str, bundle: &Path) -> Result<tokio::process::Child, RuntimeError> {
        self.inner.run_attached(id, bundle)
    }
    async fn wait(&self, id: &str, dir: &Path) -> Result<i32, RuntimeError> {
        self.inner.wait(id, dir).await
    }
    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.journal.push(format!("runtime.kill {id} {signal}"));
        self.inner.kill(id, signal).await
    }
    async fn exec(
        &self,
        id: &str,
        dir: &Path,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<(i32, String), RuntimeError> {
        self.journal
            .push(format!("runtime.exec {id} {}", cmd.join(" ")));
        self.inner.exec(id, dir, cmd, timeout).await
    }
    fn exec_attached(
        &self,
        id: &str,
        process: &Path,
        io: ExecIo,
    ) -> Result<tokio::process::Child, RuntimeError> {
        self.inner.exec_attached(id, process, io)
    }
    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.pause(id).await
    }
    async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.resume(id).await
    }
    async fn delete(&self, id: &str, dir: &Path) -> Result<(), RuntimeError> {
        self.journal.push(format!("runtime.delete {id}"));
        self.inner.delete(id, dir).await
    }
    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        self.inner.list().await
    }
    async fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        self.inner.state(id).await
    }
}

/// An image store with every image local, or none (`fail`).
pub struct FakeImages {
    journal: Journal,
    pub fail: Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl ImageStore for FakeImages {
    async fn pull(&self, image: &str) -> Result<Image, ImagePortError> {
        self.journal.push(format!("images.pull {image}"));
        if let Some(e) = self.fail.lock().expect("fake").clone() {
            return Err(ImagePortError::Client(e));
        }
        Ok(Image {
            manifest_digest: "sha256:feed".into(),
            layers: vec![PathBuf::from("/layers/1")],
            config: Default::default(),
        })
    }
}

/// Mounts that only record; `fail` names the operations that fail.
pub struct FakeMounts {
    journal: Journal,
    pub fail: Mutex<HashSet<&'static str>>,
}

impl FakeMounts {
    fn io(&self, op: &'static str) -> Result<(), MountsError> {
        self.journal.push(format!("mounts.{op}"));
        if self.fail.lock().expect("fake").contains(op) {
            return Err(MountsError::Io {
                op,
                err: std::io::Error::other("injected"),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Mounts for FakeMounts {
    fn hold(&self, task: &Task) {
        self.journal.push(format!("mounts.hold {}", task.id));
    }
    async fn release(&self, task: &Task) {
        self.journal.push(format!("mounts.release {}", task.id));
    }
    fn prepare(&self, _task: &Task) -> Result<Vec<OciMount>, MountsError> {
        self.io("prepare").map(|_| Vec::new())
    }
    async fn rootfs(
        &self,
        _task: &Task,
        _c: &ContainerDir,
        _image: &Image,
    ) -> Result<(), MountsError> {
        self.io("rootfs")
    }
    fn write_bundle(
        &self,
        _task: &Task,
        _c: &ContainerDir,
        _image: &Image,
        netns: Option<&Path>,
        _mounts: &[OciMount],
    ) -> Result<(), MountsError> {
        self.journal.push(format!(
            "mounts.netns {}",
            netns.map(|n| n.display().to_string()).unwrap_or_default()
        ));
        self.io("write_bundle")
    }
    fn unmount(&self, _c: &ContainerDir) {
        self.journal.push("mounts.unmount");
    }
    fn discard_layer(&self, _c: &ContainerDir) {
        self.journal.push("mounts.discard_layer");
    }
}

/// Networks that only record; `fail` makes every attach fail.
pub struct FakeNetworks {
    journal: Journal,
    pub overlay: bool,
    pub fail: Mutex<bool>,
}

impl FakeNetworks {
    fn attach(&self, what: &str, task: &Task) -> Result<PathBuf, NetAttachError> {
        self.journal.push(format!("net.attach_{what} {}", task.id));
        if *self.fail.lock().expect("fake") {
            return Err(NetAttachError::NoShared(format!("injected {what}")));
        }
        Ok(PathBuf::from(format!("/netns/{}", task.id)))
    }
}

#[async_trait::async_trait]
impl TaskNetworks for FakeNetworks {
    fn available(&self) -> bool {
        self.overlay
    }
    async fn attach_networks(&self, task: &Task, _dir: &Path) -> Result<PathBuf, NetAttachError> {
        self.attach("networks", task)
    }
    async fn detach_networks(&self, task: &Task) {
        self.journal
            .push(format!("net.detach_networks {}", task.id));
    }
    async fn attach_bridge(&self, task: &Task, _dir: &Path) -> Result<PathBuf, NetAttachError> {
        self.attach("bridge", task)
    }
    async fn detach_bridge(&self, task: &Task, _dir: &Path) {
        self.journal.push(format!("net.detach_bridge {}", task.id));
    }
    async fn shared(&self, task: &Task, _dir: &Path) -> Result<PathBuf, NetAttachError> {
        self.attach("shared", task)
    }
}

/// Wall time that starts at a fixed epoch and follows tokio's (paused) clock.
pub struct FakeClock {
    epoch_ms: u64,
    start: tokio::time::Instant,
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeClock {
    pub const EPOCH_MS: u64 = 1_700_000_000_000;

    pub fn new() -> FakeClock {
        FakeClock {
            epoch_ms: Self::EPOCH_MS,
            start: tokio::time::Instant::now(),
        }
    }
}

#[async_trait::async_trait]
impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.epoch_ms + self.start.elapsed().as_millis() as u64
    }
}

/// One set of fakes sharing a journal.
pub struct Fakes {
    pub journal: Journal,
    pub runtime: Arc<FakeRuntime>,
    pub images: Arc<FakeImages>,
    pub mounts: Arc<FakeMounts>,
    pub networks: Arc<FakeNetworks>,
    pub clock: Arc<FakeClock>,
}

impl Fakes {
    /// Fakes of a host with (`overlay`) or without an overlay.
    pub fn new(overlay: bool) -> Fakes {
        let journal = Journal::default();
        Fakes {
            runtime: Arc::new(FakeRuntime::new()),
            images: Arc::new(FakeImages {
                journal: journal.clone(),
                fail: Mutex::default(),
            }),
            mounts: Arc::new(FakeMounts {
                journal: journal.clone(),
                fail: Mutex::default(),
            }),
            networks: Arc::new(FakeNetworks {
                journal: journal.clone(),
                overlay,
                fail: Mutex::new(false),
            }),
            clock: Arc::new(FakeClock::new()),
            journal,
        }
    }

    pub fn ports(&self) -> Ports {
        Ports {
            runtime: Arc::new(JournaledRuntime {
                inner: self.runtime.clone(),
                journal: self.journal.clone(),
            }),
            images: self.images.clone(),
            mounts: self.mounts.clone(),
            networks: self.networks.clone(),
            clock: self.clock.clone(),
        }
    }
}

/// A minimal task (host network, no health check) assigned to this node.
pub fn task(id: &str) -> Task {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "service_id": "svc",
        "service_name": "web",
        "slot": 1,
        "spec": {"name": "web", "image": "busybox:latest", "network_mode": "host"},
        "spec_version": 1,
        "node_id": "n1",
        "desired_state": "running",
        "status": {"state": "assigned", "timestamp": 0},
        "created_at": 0,
        "version": 1,
    }))
    .expect("a valid task")
}

/// An attachment to network `name`.
pub fn attachment(name: &str) -> rudder_model::network::Attachment {
    rudder_model::network::Attachment {
        network: name.into(),
        address: std::net::Ipv4Addr::new(10, 0, 0, 2),
    }
}

//! The ports the task state machine ([`super::step`]) acts through, one trait per host concern,
//! each with its real implementation and a recording fake (`super::fake`, tests only):
//!
//! | port | real implementation | what it owns |
//! |---|---|---|
//! | [`crate::runtime::ContainerRuntime`] | `OciCliRuntime` | start, wait, kill, exec, delete |
//! | [`ImageStore`] | [`crate::images::RegistryImageStore`] | pull and unpack the task's image |
//! | [`Mounts`] | [`crate::volume::HostMounts`] | volumes, binds, tmpfs, secrets, rootfs, `config.json` |
//! | [`TaskNetworks`] | [`OverlayNetworks`] | the task's namespace: networks, bridge, shared |
//! | [`Clock`] | [`SystemClock`] | wall time for reports, sleeps |
//!
//! Invariants: a port never reports to the controller (only the worker does); every method
//! that undoes (`unmount`, `detach_*`, `release`) is idempotent and best effort, so cleanup
//! can run after any partial preparation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use oci_spec::runtime::Mount as OciMount;
use rudder_image::ImageConfig;
use rudder_model::spec::NetworkMode;
use rudder_model::Task;

use crate::bundle::ContainerDir;

/// An image ready to run: its unpacked layers (bottom first) and its runtime defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// Digest of the manifest (recorded next to the container for `rctl commit` and GC).
    pub manifest_digest: String,
    pub layers: Vec<PathBuf>,
    pub config: ImageConfig,
}

/// Why an image could not be had. The text is what the controller shows as the task's error.
#[derive(Debug, thiserror::Error)]
pub enum ImagePortError {
    #[error("{0}")]
    Reference(String),
    #[error("{0}")]
    Client(String),
    #[error("{0}")]
    Pull(#[from] rudder_image::ImageError),
}

/// Where a task's image comes from.
#[async_trait::async_trait]
pub trait ImageStore: Send + Sync + 'static {
    /// Pulls what is missing of `image` (a reference) and returns it unpacked.
    async fn pull(&self, image: &str) -> Result<Image, ImagePortError>;
}

/// Why the container's filesystem could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum MountsError {
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error("mounts: {op}: {err}")]
    Io {
        op: &'static str,
        err: std::io::Error,
    },
}

/// The container's filesystem: volumes, bind sources, tmpfs, secrets and configs, the root
/// filesystem and the bundle's `config.json`.
#[async_trait::async_trait]
pub trait Mounts: Send + Sync + 'static {
    /// The task is live on this host: its volumes are not collected until [`Mounts::release`].
    fn hold(&self, task: &Task);
    /// The task's container is gone: its volumes may be collected. (May block.)
    async fn release(&self, task: &Task);
    /// Makes the task's volume directories, checks its bind sources; its OCI mounts.
    fn prepare(&self, task: &Task) -> Result<Vec<OciMount>, MountsError>;
    /// Writes the task's record next to its bundle, mounts the secrets tmpfs and the root
    /// filesystem over the image's layers, and fills empty volumes from the image.
    async fn rootfs(&self, task: &Task, c: &ContainerDir, image: &Image)
        -> Result<(), MountsError>;
    /// Materialises secrets and writes `config.json` with `mounts` and the namespace `netns`.
    fn write_bundle(
        &self,
        task: &Task,
        c: &ContainerDir,
        image: &Image,
        netns: Option<&Path>,
        mounts: &[OciMount],
    ) -> Result<(), MountsError>;
    /// Unmounts the root filesystem (and the secrets tmpfs).
    fn unmount(&self, c: &ContainerDir);
    /// Removes the writable layer; the log stays until the task is forgotten.
    fn discard_layer(&self, c: &ContainerDir);
}

/// How a task gets its network namespace: a pure function of its spec and the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetPlan {
    /// `host` or `none`: the runtime's default, nothing to attach.
    Nothing,
    /// Its own namespace on its overlay networks.
    Overlay,
    /// Its own namespace on the host's local bridge.
    Bridge,
    /// Another running task's namespace (`network_mode: container:X`).
    Shared,
    /// It has networks and this host has no overlay: rejected.
    Unsupported,
}

impl NetPlan {
    pub fn of(task: &Task, overlay: bool) -> NetPlan {
        match (overlay, task.networks.is_empty(), &task.spec.network_mode) {
            (true, false, _) => NetPlan::Overlay,
            (false, false, _) => NetPlan::Unsupported,
            (true, true, NetworkMode::Bridge) => NetPlan::Bridge,
            (_, true, NetworkMode::Container(_)) => NetPlan::Shared,
            _ => NetPlan::Nothing,
        }
    }
}

/// Why a task could not get its network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetAttachError {
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    /// `network_mode: container:X` with no running task of X here.
    #[error("{0}")]
    NoShared(String),
    #[error("network: no overlay support on this host")]
    NoOverlay,
}

/// Attaches and detaches a task's network namespace.
#[async_trait::async_trait]
pub trait TaskNetworks: Send + Sync + 'static {
    /// Whether this host runs the overlay (and so the local bridge).
    fn available(&self) -> bool;
    /// Its namespace on its overlay networks; writes resolv.conf and hosts into `dir`.
    async fn attach_networks(&self, task: &Task, dir: &Path) -> Result<PathBuf, NetAttachError>;
    async fn detach_networks(&self, task: &Task);
    /// Its namespace on the local bridge.
    async fn attach_bridge(&self, task: &Task, dir: &Path) -> Result<PathBuf, NetAttachError>;
    async fn detach_bridge(&self, task: &Task, dir: &Path);
    /// The namespace of the running task it shares (`network_mode: container:X`).
    async fn shared(&self, task: &Task, dir: &Path) -> Result<PathBuf, NetAttachError>;
}

/// Wall time and sleeps. Tests run on tokio's paused clock and a [`super::fake::FakeClock`].
#[async_trait::async_trait]
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the epoch, stamped on reports.
    fn now_ms(&self) -> u64;
    /// Monotonic time, for intervals (a health check's start period).
    fn instant(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
    }
    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await
    }
}

/// The host's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

#[async_trait::async_trait]
impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// [`TaskNetworks`] over the host's overlay ([`crate::net::Overlay`]), when it runs one.
pub struct OverlayNetworks {
    pub overlay: Option<Arc<crate::net::Overlay>>,
    /// The containers' directories, where a shared namespace's owner is looked for.
    pub containers: PathBuf,
}

#[async_trait::async_trait]
impl TaskNetworks for OverlayNetworks {
    fn available(&self) -> bool {
        self.overlay.is_some()
    }

    async fn attach_networks(&self, task: &Task, dir: &Path) -> Result<PathBuf, NetAttachError> {
        let Some(o) = &self.overlay else {
            return Err(NetAttachError::NoOverlay);
        };
        Ok(o.attach(task, dir).await?)
    }

    async fn detach_networks(&self, task: &Task) {
        if let Some(o) = &self.overlay {
            o.detach(task).await;
        }
    }

    async fn attach_bridge(&self, task: &Task, dir: &Path) -> Result<PathBuf, NetAttachError> {
        let Some(o) = &self.overlay else {
            return Err(NetAttachError::NoOverlay);
        };
        Ok(o.attach_bridge(task, dir).await?)
    }

    async fn detach_bridge(&self, task: &Task, dir: &Path) {
        if let Some(o) = &self.overlay {
            o.detach_bridge(task, dir).await;
        }
    }

    async fn shared(&self, task: &Task, dir: &Path) -> Result<PathBuf, NetAttachError> {
        shared_netns(&self.containers, task, dir).await
    }
}

/// `network_mode: container:X`: the network namespace of a running task of X on this host
/// (`X` a service, or a task's name or id prefix), waiting up to 15 s for one to start. Its
/// resolv.conf and hosts are copied next to this task's bundle, so DNS works the same.
async fn shared_netns(
    containers: &Path,
    task: &Task,
    dir: &Path,
) -> Result<PathBuf, NetAttachError> {
    let NetworkMode::Container(target) = &task.spec.network_mode else {
        return Err(NetAttachError::NoShared(
            "not network_mode: container".into(),
        ));
    };
    let service = task.spec.network_mode.shared_service().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let found = std::fs::read_dir(containers)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let other = ContainerDir::new(e.path());
                let t: Task = crate::task_record::task_of(&other)?;
                let matches = t.service_name == service
                    && (target.as_str() == service
                        || t.name().starts_with(target.as_str())
                        || t.id.starts_with(target.as_str()));
                if !matches || other.has_exited() {
                    return None;
                }
                let pid = other.read_pid()?;
                Path::new(&format!("/proc/{pid}")).exists().then_some((
                    other,
                    pid,
                    t.slot == task.slot,
                ))
            })
            // Prefer the task in the same slot (sidecar 2 with main 2).
            .min_by_key(|(_, _, same)| !same);
        if let Some((other, pid, _)) = found {
            let mine = ContainerDir::new(dir);
            let _ = mine.make_net_dir();
            for (from, to) in [
                (other.resolv_conf(), mine.resolv_conf()),
                (other.hosts(), mine.hosts()),
            ] {
                if from.exists() {
                    let _ = std::fs::copy(from, to);
                }
            }
            return Ok(PathBuf::from(format!("/proc/{pid}/ns/net")));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(NetAttachError::NoShared(format!(
                "network_mode: container:{target}: no running task of {service} on this host"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_plan_follows_networks_then_mode() {
        let mut t = super::super::fake::task("t1");
        let cases = [
            (NetworkMode::Host, false, true, NetPlan::Nothing),
            (NetworkMode::None, false, true, NetPlan::Nothing),
            (NetworkMode::Bridge, false, true, NetPlan::Bridge),
            (NetworkMode::Bridge, false, false, NetPlan::Nothing),
            (
                NetworkMode::Container("x".into()),
                false,
                true,
                NetPlan::Shared,
            ),
            (
                NetworkMode::Container("x".into()),
                false,
                false,
                NetPlan::Shared,
            ),
            (NetworkMode::Bridge, true, true, NetPlan::Overlay),
            (NetworkMode::Host, true, false, NetPlan::Unsupported),
        ];
        for (mode, networks, overlay, want) in cases {
            t.spec.network_mode = mode.clone();
            t.networks = if networks {
                vec![super::super::fake::attachment("front")]
            } else {
                vec![]
            };
            assert_eq!(
                NetPlan::of(&t, overlay),
                want,
                "{mode:?} {networks} {overlay}"
            );
        }
    }
}

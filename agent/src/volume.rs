//! Volumes and mounts on this host. A task's `mounts` become OCI mounts in its `config.json`:
//! named volumes are directories `<data>/volumes/<name>/_data` (Docker's local driver), made
//! when a task first mounts the volume here; bind mounts take a host path, which must exist;
//! tmpfs mounts are memory, optionally capped.
//!
//! Invariants:
//! - A copy is deleted only when the controller no longer declares the volume *and* no live
//!   task of this agent mounts it; nothing is deleted before the first declared set arrives
//!   (after a restart, adopted containers count as live first).
//! - Deleting is a rename out of the way under the lock (so a task preparing the same volume
//!   meanwhile gets a fresh directory, never a half-deleted one), then removal outside it.
//! - The set of copies held here is published (`watch_copies`) and reported to the controller.
//! - An empty copy is filled with what the task's image holds at the mount's target before the
//!   container starts ([`Volumes::fill_from_image`], Docker's copy-up), one fill at a time per
//!   host, so two tasks starting on a new volume do not both fill it. Both trees are touched
//!   only by `fs-helper` children chrooted into them: nothing the image holds (a symlink to
//!   `/etc`, say) can make the agent read or write outside them.
//! - A fill is crash-safe: a marker (`volumes/NAME/.filling`) is made durable before the first
//!   byte is copied and removed only once the copy is synced. A copy found with the marker is
//!   a fill that never finished (the agent or the host died): it is emptied and filled again,
//!   never taken as the volume's data. The directory stays the same inode throughout, so a
//!   container that already mounts it keeps seeing it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use oci_spec::runtime::{Mount as OciMount, MountBuilder};
use rudder_model::volume::{normalize_path, MountType};
use rudder_model::Task;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::bundle::ContainerDir;
use crate::task::ports::{Image, MountsError};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("mounts: bind mount source {path} does not exist on {host}")]
    MissingBindSource { path: String, host: String },
    #[error("mounts: {op} {path}: {err}")]
    Io {
        op: &'static str,
        path: String,
        err: std::io::Error,
    },
    #[error("mounts: {0}")]
    Spec(String),
    #[error("mounts: cannot fill volume {volume} with the image's {target}: {message}")]
    Fill {
        volume: String,
        target: String,
        message: String,
    },
}

/// This host's volume copies and the bookkeeping that decides when one may go.
pub struct Volumes {
    /// `<data>/volumes`.
    root: PathBuf,
    /// For error messages: a user reads which host lacked a bind source.
    hostname: String,
    state: Mutex<State>,
    copies: watch::Sender<BTreeSet<String>>,
    /// Held while a copy is filled from an image.
    fill: Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The volumes the controller declares; `None` until it first said.
    declared: Option<BTreeSet<String>>,
    /// Volume → live local tasks that mount it.
    users: BTreeMap<String, usize>,
}

/// Names of the volumes a task mounts (a per-slot source rendered for the task's slot).
pub fn volume_names(task: &Task) -> Vec<String> {
    rudder_model::slotvol::task_mounts(task)
        .into_iter()
        .filter(|m| m.typ == MountType::Volume)
        .map(|m| m.source)
        .collect()
}

impl Volumes {
    pub fn new(root: PathBuf, hostname: String) -> Volumes {
        let (copies, _) = watch::channel(BTreeSet::new());
        let v = Volumes {
            root,
            hostname,
            state: Mutex::default(),
            copies,
            fill: Mutex::default(),
        };
        v.publish();
        v
    }

    /// The volumes this host holds a copy of, whenever that changes.
    pub fn watch_copies(&self) -> watch::Receiver<BTreeSet<String>> {
        self.copies.subscribe()
    }

    /// Where volume `name`'s data lives on this host.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.root.join(name).join("_data")
    }

    /// Present while volume `name`'s copy is being filled from an image.
    fn fill_marker(&self, name: &str) -> PathBuf {
        self.root.join(name).join(FILLING)
    }

    /// A task of this agent is live (from spawn until its container is deleted): its
    /// volumes stay.
    pub fn acquire(&self, names: &[String]) {
        let mut st = self.state.lock().expect("volumes lock");
        for n in names {
            *st.users.entry(n.clone()).or_default() += 1;
        }
    }

    /// The task is over: its volumes may go if nothing else wants them. (Blocking I/O.)
    pub fn release(&self, names: &[String]) {
        {
            let mut st = self.state.lock().expect("volumes lock");
            for n in names {
                if let Some(c) = st.users.get_mut(n) {
                    *c -= 1;
                    if *c == 0 {
                        st.users.remove(n);
                    }
                }
            }
        }
        if !names.is_empty() {
            self.collect();
        }
    }

    /// The controller's declared volumes. (Blocking I/O: deletes undeclared copies.)
    pub fn set_declared(&self, names: Vec<String>) {
        self.state.lock().expect("volumes lock").declared = Some(names.into_iter().collect());
        self.collect();
    }

    /// Makes the task's volume directories, checks its bind sources, and returns its mounts
    /// for `config.json`, parents before children.
    pub fn prepare(&self, task: &Task) -> Result<Vec<OciMount>, VolumeError> {
        // Per-slot sources (`data-{{.Task.Slot}}`) name this slot's volume.
        let all = rudder_model::slotvol::task_mounts(task);
        let mut mounts: Vec<&rudder_model::volume::Mount> = all.iter().collect();
        // `/a` before `/a/b`, whatever the order written.
        mounts.sort_by_key(|m| normalize_path(&m.target).matches('/').count());
        let mut out = Vec::new();
        for m in mounts {
            let mut options = Vec::new();
            let (typ, source) = match m.typ {
                MountType::Volume => {
                    let dir = self.data_dir(&m.source);
                    {
                        // Under the lock: never racing a collection of the same name.
                        let _st = self.state.lock().expect("volumes lock");
                        if !dir.is_dir() {
                            // `volumes/NAME` is private; `_data` is the mount's root in the
                            // container, with the usual 0755 (or the image's, once filled).
                            crate::datadir::private_dir(&self.root.join(&m.source))
                                .and_then(|_| std::fs::create_dir(&dir))
                                .map_err(|err| VolumeError::Io {
                                    op: "create volume directory",
                                    path: dir.display().to_string(),
                                    err,
                                })?;
                            info!(volume = %m.source, "volume copy created");
                        }
                    }
                    self.publish();
                    options.extend(["rbind".to_string(), "rprivate".to_string()]);
                    ("bind", dir)
                }
                MountType::Bind => {
                    let src = PathBuf::from(&m.source);
                    if !src.exists() {
                        return Err(VolumeError::MissingBindSource {
                            path: m.source.clone(),
                            host: self.hostname.clone(),
                        });
                    }
                    options.extend(["rbind".to_string(), "rprivate".to_string()]);
                    ("bind", src)
                }
                MountType::Tmpfs => {
                    options.extend(["nosuid", "nodev", "mode=1777"].map(String::from));
                    if m.tmpfs_size > 0 {
                        options.push(format!("size={}", m.tmpfs_size));
                    }
                    ("tmpfs", PathBuf::from("tmpfs"))
                }
            };
            if m.readonly {
                options.push("ro".into());
                if typ == "bind" {
                    // Recursively (L1): `ro` alone makes only the top mount read-only, and a
                    // read-only bind of `/` would leave `/proc`, `/sys` and every submount
                    // writable. `rro` is mount_setattr(AT_RECURSIVE) in runc and crun.
                    options.push("rro".into());
                }
            }
            out.push(
                MountBuilder::default()
                    .destination(normalize_path(&m.target))
                    .typ(typ)
                    .source(source)
                    .options(options)
                    .build()
                    .map_err(|e| VolumeError::Spec(e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// Fills each of the task's empty volume copies with what its image holds at the mount's
    /// target (`rootfs`: the container's root filesystem, mounted), owners, modes and links
    /// kept, as Docker does on a volume's first use; `nocopy` mounts are left empty. A target
    /// the image does not have leaves the copy empty. Blocking: it waits for other fills.
    pub fn fill_from_image(&self, task: &Task, rootfs: &Path) -> Result<(), VolumeError> {
        for m in &rudder_model::slotvol::task_mounts(task) {
            if m.typ != MountType::Volume {
                continue;
            }
            let _one_at_a_time = self.fill.lock().expect("volumes fill lock");
            let dir = self.data_dir(&m.source);
            let marker = self.fill_marker(&m.source);
            let err = |op: &'static str, path: &Path| {
                let path = path.display().to_string();
                move |err| VolumeError::Io { op, path, err }
            };
            if marker.exists() {
                warn!(volume = %m.source, "a fill that never finished is discarded");
                empty_dir(&dir).map_err(err("empty a half-filled volume", &dir))?;
                if m.nocopy {
                    remove_durably(&marker).map_err(err("remove fill marker", &marker))?;
                    continue;
                }
            } else {
                let mut entries =
                    std::fs::read_dir(&dir).map_err(err("read volume directory", &dir))?;
                if m.nocopy || entries.next().is_some() {
                    continue;
                }
            }
            create_durably(&marker).map_err(err("write fill marker", &marker))?;
            let target = normalize_path(&m.target);
            let started = std::time::Instant::now();
            match copy_in(rootfs, &target, &dir) {
                Ok(copied) => {
                    // The data on disk before the marker goes.
                    sync_fs(&dir).map_err(err("sync volume", &dir))?;
                    remove_durably(&marker).map_err(err("remove fill marker", &marker))?;
                    if copied {
                        info!(
                            volume = %m.source,
                            %target,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "volume filled from the image"
                        );
                    }
                }
                Err(message) => {
                    // Emptied again, so the next task's start fills it afresh rather than find
                    // a half-filled copy and take it as the volume's data. If that fails, the
                    // marker stays and says so.
                    if empty_dir(&dir).is_ok() {
                        let _ = remove_durably(&marker);
                    }
                    return Err(VolumeError::Fill {
                        volume: m.source.clone(),
                        target,
                        message,
                    });
                }
            }
        }
        Ok(())
    }

    /// Deletes the copies of volumes neither declared nor mounted by a live local task.
    fn collect(&self) {
        let mut doomed = Vec::new();
        {
            let st = self.state.lock().expect("volumes lock");
            let Some(declared) = &st.declared else {
                return;
            };
            for name in self.list() {
                if declared.contains(&name) || st.users.contains_key(&name) {
                    continue;
                }
                let from = self.root.join(&name);
                let to = self
                    .root
                    .join(format!(".removing-{name}-{}", std::process::id()));
                match std::fs::rename(&from, &to) {
                    Ok(()) => doomed.push((name, to)),
                    Err(e) => warn!(volume = %name, %e, "cannot remove volume copy"),
                }
            }
        }
        for (name, dir) in doomed {
            info!(volume = %name, "volume removed: deleting this host's copy");
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                warn!(volume = %name, %e, "cannot delete volume copy");
            }
        }
        // Leftovers of an interrupted deletion.
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".removing-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        self.publish();
    }

    /// Volume copies on disk (directories with a valid volume name).
    fn list(&self) -> BTreeSet<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| rudder_model::spec::validate_name("volume", n).is_ok())
            .collect()
    }

    fn publish(&self) {
        let now = self.list();
        self.copies.send_if_modified(|c| {
            if *c == now {
                false
            } else {
                *c = now;
                true
            }
        });
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Name of the marker of a fill in progress, next to a volume's `_data`.
const FILLING: &str = ".filling";

/// Removes everything in `dir`, keeping `dir` itself (a container may mount it). Symlinks
/// are removed, never followed.
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if std::fs::symlink_metadata(&p)?.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// fsync of the directory `dir` (a new or removed entry in it is on disk).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates the empty file `path` (0600) and makes it durable.
fn create_durably(path: &Path) -> std::io::Result<()> {
    crate::datadir::write_private(path, b"")?;
    std::fs::File::open(path)?.sync_all()?;
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

/// Removes the file `path` durably.
fn remove_durably(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

/// Writes out everything cached of the filesystem holding `dir` (the files a fill wrote).
fn sync_fs(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir)?;
    // SAFETY: syncfs on an fd we own, valid for the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Copies `target` of the image tree `rootfs` (its contents, and the directory's own owner and
/// mode) into the empty directory `dir`: an `fs-helper pack` chrooted into `rootfs` piped into
/// an `fs-helper unpack` chrooted into `dir`. `Ok(false)`: the image has no `target`.
fn copy_in(rootfs: &Path, target: &str, dir: &Path) -> Result<bool, String> {
    use crate::fs_helper::{HelperArgs, Op, EXIT_NOT_FOUND};
    use std::process::Stdio;
    let exe = std::env::current_exe().map_err(|e| format!("find own executable: {e}"))?;
    let helper = |root: &Path, op: Op| {
        let args = HelperArgs {
            root: root.to_path_buf(),
            expect: root.to_path_buf(),
            op,
        };
        let mut cmd = args.command(&exe);
        cmd.stderr(Stdio::piped());
        cmd
    };
    let pack_op = Op::Pack {
        path: target.to_string(),
        // A target that is a link in the image (`/var/run` → `/run`) is filled from where it
        // points, inside the image.
        follow_link: true,
    };
    let mut pack = helper(rootfs, pack_op)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start fs-helper: {e}"))?;
    let tar = pack.stdout.take().ok_or("fs-helper: no stdout")?;
    let unpack_op = Op::Unpack {
        dest: "/".into(),
        contents: true,
        raw: false,
        owners: true,
    };
    let unpacked = helper(dir, unpack_op)
        .stdin(Stdio::from(tar))
        .stdout(Stdio::null())
        .spawn()
        .and_then(|c| c.wait_with_output());
    let packed = pack
        .wait_with_output()
        .map_err(|e| format!("fs-helper: {e}"))?;
    if packed.status.code() == Some(EXIT_NOT_FOUND) {
        return Ok(false);
    }
    let said = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).trim().to_string();
    let unpacked = unpacked.map_err(|e| format!("fs-helper: {e}"))?;
    // When one side fails the other usually sees a broken pipe or a cut tar: say both.
    match (packed.status.success(), unpacked.status.success()) {
        (true, true) => Ok(true),
        (false, true) => Err(format!("reading the image: {}", said(&packed))),
        (true, false) => Err(format!("writing the volume: {}", said(&unpacked))),
        (false, false) => Err(format!(
            "writing the volume: {}; reading the image: {}",
            said(&unpacked),
            said(&packed)
        )),
    }
}

/// The task port [`crate::task::ports::Mounts`] on this host: volume copies ([`Volumes`]),
/// secrets and configs ([`crate::secrets`]), the overlayfs root filesystem and `config.json`
/// ([`crate::bundle`]).
pub struct HostMounts {
    pub volumes: std::sync::Arc<Volumes>,
    pub secrets: crate::secrets::Values,
    /// The cgroup every container is placed under.
    pub cgroup_parent: String,
    /// The default seccomp profile compiled once, for a runtime that takes it (crun).
    pub seccomp_bpf: Option<std::sync::Arc<crate::seccomp::Precompiled>>,
}

#[async_trait::async_trait]
impl crate::task::ports::Mounts for HostMounts {
    fn hold(&self, task: &Task) {
        self.volumes.acquire(&volume_names(task));
    }

    async fn release(&self, task: &Task) {
        let names = volume_names(task);
        if names.is_empty() {
            return;
        }
        // Its container is gone: volumes removed meanwhile may go now.
        let volumes = self.volumes.clone();
        let _ = tokio::task::spawn_blocking(move || volumes.release(&names)).await;
    }

    fn prepare(&self, task: &Task) -> Result<Vec<OciMount>, MountsError> {
        Ok(self.volumes.prepare(task)?)
    }

    async fn rootfs(
        &self,
        task: &Task,
        c: &ContainerDir,
        image: &Image,
    ) -> Result<(), MountsError> {
        let io = |op| move |err| MountsError::Io { op, err };
        // Private: the spec holds the task's env (`crate::datadir`).
        crate::datadir::private_dir(&c.dir).map_err(io("create container dir"))?;
        let record = rudder_model::task_record::encode(task).map_err(|e| MountsError::Io {
            op: "encode task.json",
            err: std::io::Error::other(e),
        })?;
        crate::datadir::write_private(&c.task_file(), &record).map_err(io("write task.json"))?;
        // The image the container runs, for `rctl commit`.
        crate::datadir::write_private(&c.image_file(), image.manifest_digest.as_bytes())
            .map_err(io("write image record"))?;
        // A task with secrets or configs gets its bundle on a tmpfs (values and config.json
        // stay in memory), mounted before the root filesystem below it.
        if crate::secrets::uses_any(task) {
            crate::secrets::mount_bundle(c, task, &self.secrets)?;
        }
        crate::bundle::mount_rootfs(c, &image.layers)?;
        // Empty volumes get the image's files at their targets, before anything runs there.
        let (volumes, task, rootfs) = (self.volumes.clone(), task.clone(), c.rootfs());
        tokio::task::spawn_blocking(move || volumes.fill_from_image(&task, &rootfs))
            .await
            .map_err(|e| MountsError::Io {
                op: "fill volumes",
                err: std::io::Error::other(e.to_string()),
            })??;
        Ok(())
    }

    fn write_bundle(
        &self,
        task: &Task,
        c: &ContainerDir,
        image: &Image,
        netns: Option<&Path>,
        mounts: &[OciMount],
    ) -> Result<(), MountsError> {
        let (mut all, env) = if crate::secrets::uses_any(task) {
            crate::secrets::materialise(c, task, &self.secrets)?
        } else {
            Default::default()
        };
        // The task's own mounts come first; a secret's target is its own.
        all.splice(0..0, mounts.iter().cloned());
        crate::bundle::write_config(
            c,
            task,
            &image.config,
            &crate::bundle::HostSpec {
                cgroup_parent: &self.cgroup_parent,
                seccomp_bpf: self.seccomp_bpf.as_deref(),
            },
            netns,
            &all,
            &env,
        )?;
        Ok(())
    }

    fn unmount(&self, c: &ContainerDir) {
        crate::bundle::unmount_rootfs(c);
    }

    fn discard_layer(&self, c: &ContainerDir) {
        let _ = std::fs::remove_dir_all(c.upper());
        let _ = std::fs::remove_dir_all(c.work());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(mounts: serde_json::Value) -> Task {
        serde_json::from_value(serde_json::json!({
            "id": "abcdef0123456789", "service_id": "s", "service_name": "web", "slot": 1,
            "spec": {"name": "web", "image": "x", "mounts": mounts},
            "spec_version": 1, "node_id": "n", "desired_state": "running",
            "status": {"state": "assigned", "timestamp": 0}, "created_at": 0, "version": 1
        }))
        .unwrap()
    }

    #[test]
    fn mounts_become_oci_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::new(dir.path().join("volumes"), "h2".into());
        let t = task(serde_json::json!([
            {"type": "volume", "source": "data", "target": "/data/"},
            {"type": "tmpfs", "target": "/data/tmp", "tmpfs_size": "64M", "readonly": true},
            {"type": "bind", "source": dir.path(), "target": "/host", "readonly": true},
        ]));
        let mounts = v.prepare(&t).unwrap();
        let show: Vec<(String, String, String, Vec<String>)> = mounts
            .iter()
            .map(|m| {
                (
                    m.destination().display().to_string(),
                    m.typ().clone().unwrap(),
                    m.source().clone().unwrap().display().to_string(),
                    m.options().clone().unwrap(),
                )
            })
            .collect();
        let data = dir.path().join("volumes/data/_data");
        assert!(data.is_dir());
        assert_eq!(
            show,
            vec![
                (
                    "/data".into(),
                    "bind".into(),
                    data.display().to_string(),
                    vec!["rbind".into(), "rprivate".into()]
                ),
                (
                    "/host".into(),
                    "bind".into(),
                    dir.path().display().to_string(),
                    vec!["rbind".into(), "rprivate".into(), "ro".into(), "rro".into()]
                ),
                (
                    "/data/tmp".into(),
                    "tmpfs".into(),
                    "tmpfs".into(),
                    ["nosuid", "nodev", "mode=1777", "size=67108864", "ro"]
                        .map(String::from)
                        .to_vec()
                ),
            ]
        );
        assert_eq!(*v.watch_copies().borrow(), BTreeSet::from(["data".into()]));
        let e = v
            .prepare(&task(serde_json::json!([
                {"type": "bind", "source": "/nope/nowhere", "target": "/x"}
            ])))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "mounts: bind mount source /nope/nowhere does not exist on h2"
        );
    }

    #[test]
    fn per_slot_sources_name_the_slots_volume() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::new(dir.path().join("volumes"), "h1".into());
        let mut t = task(serde_json::json!([
            {"source": "data-{{ .Task.Slot }}", "target": "/data", "nocopy": true}
        ]));
        t.slot = 3;
        assert_eq!(volume_names(&t), vec!["data-3".to_string()]);
        let mounts = v.prepare(&t).unwrap();
        let data = dir.path().join("volumes/data-3/_data");
        assert!(data.is_dir());
        assert_eq!(mounts[0].source().clone().unwrap(), data);
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        v.fill_from_image(&t, &rootfs).unwrap();
        assert_eq!(v.list(), BTreeSet::from(["data-3".to_string()]));
    }

    #[test]
    fn a_fill_that_never_finished_is_not_data() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::new(dir.path().join("volumes"), "h1".into());
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        let t = task(serde_json::json!([{"source": "v", "target": "/v", "nocopy": true}]));
        v.prepare(&t).unwrap();
        let data = v.data_dir("v");
        // What a task wrote stays.
        std::fs::write(data.join("mine"), "x").unwrap();
        v.fill_from_image(&t, &rootfs).unwrap();
        assert!(data.join("mine").exists());
        // A half copy (the marker still there) goes; the directory is the same inode.
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(&data).unwrap().ino();
        std::fs::create_dir_all(data.join("half/deep")).unwrap();
        std::os::unix::fs::symlink("/etc", data.join("link")).unwrap();
        std::fs::write(v.fill_marker("v"), "").unwrap();
        v.fill_from_image(&t, &rootfs).unwrap();
        assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);
        assert!(!v.fill_marker("v").exists());
        assert_eq!(std::fs::metadata(&data).unwrap().ino(), ino);
        assert!(std::path::Path::new("/etc").is_dir());
        assert_eq!(v.list(), BTreeSet::from(["v".to_string()]));
    }

    #[test]
    fn copies_go_only_when_undeclared_and_unused() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::new(dir.path().join("volumes"), "h1".into());
        let t = task(serde_json::json!([{"source": "keep", "target": "/k"}]));
        let names = volume_names(&t);
        v.acquire(&names);
        v.prepare(&t).unwrap();
        std::fs::write(v.data_dir("keep").join("f"), "x").unwrap();
        std::fs::create_dir_all(v.data_dir("old")).unwrap();
        // Nothing goes before the controller said what is declared.
        v.release(&[]);
        assert!(v.data_dir("old").exists());
        // Undeclared, but mounted: stays; unused: goes.
        v.set_declared(vec![]);
        assert!(v.data_dir("keep").join("f").exists());
        assert!(!v.root().join("old").exists());
        v.release(&names);
        assert!(!v.root().join("keep").exists());
        assert!(v.watch_copies().borrow().is_empty());
        // Declared copies stay after their last task.
        v.set_declared(vec!["keep".into()]);
        v.acquire(&names);
        v.prepare(&t).unwrap();
        v.release(&names);
        assert!(v.data_dir("keep").exists());
        let left: Vec<_> = std::fs::read_dir(v.root()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "no leftovers: {left:?}");
    }
}

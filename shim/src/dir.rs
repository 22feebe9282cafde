//! The container directory: the one on-disk contract between the agent and a container's shim.
//!
//! `<data>/containers/<task id>/` holds what the agent prepares (the task, the bundle) and what
//! the shim reports (its pid, the container's pid, exit code, output). Both processes reach
//! every file through [`ContainerDir`], so each name is spelled once, here.
//!
//! A task's network files (its bridge address, `resolv.conf`, `hosts`) live apart, in
//! `<data>/run/containers/<task id>/` ([`volatile_dir`]): the agent keeps `<data>/run` on a
//! tmpfs, because these files mean nothing after a reboot and are made and removed with every
//! container. On an ext4 without a journal every new inode is checked against the inodes
//! deleted in the last minute (`recently_deleted`), so each file a start makes on disk costs
//! more the faster containers come and go; measured on this project's machines, a bridge
//! start made six more inodes than a host start, and a burst of 50 bridge starts paid about
//! 2 ms a container for them. Any other directory (a build step's, a test's) keeps them
//! inside itself. A record an older agent left inside the container directory is still read
//! ([`ContainerDir::read_bridge_addr`]), so an upgrade strands no running container.
//!
//! Invariants: files the shim writes are replaced atomically (temp file + rename, mode 0600),
//! so a reader never sees half of one; readers cap what they read ([`SMALL_FILE_MAX`],
//! [`TASK_FILE_MAX`]); a missing or unreadable file reads as `None`, never as a default value.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Mode of the files the shim and the agent write here (logs and the task hold whatever the
/// container prints and its environment).
pub const PRIVATE_FILE: u32 = 0o600;

/// Largest pid, exit-code or address file read (they hold one short line).
pub const SMALL_FILE_MAX: u64 = 4096;
/// Largest `task.json` read (a task's frozen spec; the controller limits specs far below).
pub const TASK_FILE_MAX: u64 = 4 << 20;

/// Every name in a container directory. Private to this module: callers ask for paths.
mod name {
    pub const TASK: &str = "task.json";
    pub const IMAGE: &str = "image";
    pub const SHIM_PID: &str = "shim.pid";
    pub const PID: &str = "pid";
    pub const EXIT: &str = "exit";
    pub const OOM: &str = "oom";
    pub const LOG: &str = "log";
    pub const RUNTIME_LOG: &str = "runc.log";
    pub const BUNDLE: &str = "bundle";
    pub const ROOTFS: &str = "rootfs";
    pub const CONFIG: &str = "config.json";
    pub const UPPER: &str = "upper";
    pub const WORK: &str = "work";
    pub const BRIDGE_ADDR: &str = "bridge_addr";
    pub const RESOLV_CONF: &str = "resolv.conf";
    pub const HOSTS: &str = "hosts";
    pub const PAUSED: &str = "paused";
    /// The parent of task directories, and the run dir's mirror of it.
    pub const CONTAINERS: &str = "containers";
    /// The agent's tmpfs below its data dir.
    pub const RUN: &str = "run";
}

/// Where the volatile network files of the container directory `dir` live: for a task's
/// directory `<data>/containers/<id>`, `<data>/run/containers/<id>` (on the agent's tmpfs);
/// for any other directory, `dir` itself.
pub fn volatile_dir(dir: &Path) -> PathBuf {
    let task_dir = |d: &Path| {
        let id = d.file_name()?;
        let parent = d.parent()?;
        (parent.file_name()? == name::CONTAINERS).then_some(())?;
        Some(
            parent
                .parent()?
                .join(name::RUN)
                .join(name::CONTAINERS)
                .join(id),
        )
    };
    task_dir(dir).unwrap_or_else(|| dir.to_path_buf())
}

/// The files of a container's directory that are the agent's own record (its spec, its image,
/// its logs, the runtime's messages, the init pid): private, tightened by the agent on start.
/// Not `resolv.conf` or `hosts`, which the container's users read through bind mounts.
pub fn is_private_record(file_name: &str) -> bool {
    [name::TASK, name::IMAGE, name::RUNTIME_LOG, name::PID].contains(&file_name)
        || file_name.starts_with(name::LOG)
}

/// One container's directory and every file in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDir {
    /// The directory (`<data>/containers/<task id>`); its files are reached through methods.
    pub dir: PathBuf,
    /// Where its network files live ([`volatile_dir`]).
    net: PathBuf,
}

impl ContainerDir {
    /// The container directory at `dir` (nothing is created).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let net = volatile_dir(&dir);
        ContainerDir { dir, net }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The directory of its network files ([`volatile_dir`]); may be the directory itself.
    pub fn net_dir(&self) -> &Path {
        &self.net
    }

    /// Makes the directory of its network files (0700) if it is not the directory itself.
    pub fn make_net_dir(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        if self.net == self.dir {
            return Ok(());
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.net)
    }

    /// Removes the directory and its network files (what is missing is no error).
    pub fn remove(&self) -> std::io::Result<()> {
        let gone = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        };
        if self.net != self.dir {
            gone(fs::remove_dir_all(&self.net))?;
        }
        gone(fs::remove_dir_all(&self.dir))
    }

    // --- What the agent prepares.

    /// The task as assigned (JSON of `rudder_model::Task`), written when the task is started.
    pub fn task_file(&self) -> PathBuf {
        self.dir.join(name::TASK)
    }
    /// The task's bytes, at most [`TASK_FILE_MAX`].
    pub fn read_task(&self) -> Option<Vec<u8>> {
        read_capped(&self.task_file(), TASK_FILE_MAX)
    }
    /// The digest of the image the container runs (for `rctl commit`).
    pub fn image_file(&self) -> PathBuf {
        self.dir.join(name::IMAGE)
    }
    /// The OCI bundle: `config.json` and the `rootfs` mount point.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join(name::BUNDLE)
    }
    /// The container's root filesystem mount point, inside the bundle.
    pub fn rootfs(&self) -> PathBuf {
        self.bundle().join(name::ROOTFS)
    }
    /// The bundle's OCI `config.json`.
    pub fn config(&self) -> PathBuf {
        self.bundle().join(name::CONFIG)
    }
    /// The overlay's upper and work dirs (the container's changes).
    pub fn upper(&self) -> PathBuf {
        self.dir.join(name::UPPER)
    }
    /// See [`Self::upper`].
    pub fn work(&self) -> PathBuf {
        self.dir.join(name::WORK)
    }
    /// The address the container has on the host's local bridge, while attached.
    pub fn bridge_addr_file(&self) -> PathBuf {
        self.net.join(name::BRIDGE_ADDR)
    }
    /// Where an older agent recorded it: inside the container directory.
    fn legacy_bridge_addr_file(&self) -> PathBuf {
        self.dir.join(name::BRIDGE_ADDR)
    }
    /// The bridge address, if the container is attached (also as an older agent recorded it).
    pub fn read_bridge_addr(&self) -> Option<String> {
        read_line(&self.bridge_addr_file()).or_else(|| read_line(&self.legacy_bridge_addr_file()))
    }
    /// Whether a bridge address is recorded (also as an older agent recorded it).
    pub fn has_bridge_addr(&self) -> bool {
        self.bridge_addr_file().exists() || self.legacy_bridge_addr_file().exists()
    }
    /// Forgets the bridge address, wherever it was recorded.
    pub fn remove_bridge_addr(&self) {
        let _ = fs::remove_file(self.bridge_addr_file());
        let _ = fs::remove_file(self.legacy_bridge_addr_file());
    }
    /// The `/etc/resolv.conf` and `/etc/hosts` written for the container's networks.
    pub fn resolv_conf(&self) -> PathBuf {
        self.net.join(name::RESOLV_CONF)
    }
    /// See [`Self::resolv_conf`].
    pub fn hosts(&self) -> PathBuf {
        self.net.join(name::HOSTS)
    }
    /// The `/etc` files the agent writes for a container's networks, by their name in `/etc`.
    pub fn etc_files(&self) -> [(&'static str, PathBuf); 2] {
        [
            (name::RESOLV_CONF, self.resolv_conf()),
            (name::HOSTS, self.hosts()),
        ]
    }
    /// Present while a commit may have the container frozen: health checks wait.
    pub fn paused_marker(&self) -> PathBuf {
        self.dir.join(name::PAUSED)
    }

    // --- What the shim reports.

    /// The shim's own pid, written by the shim when it starts.
    pub fn shim_pid_file(&self) -> PathBuf {
        self.dir.join(name::SHIM_PID)
    }
    /// The shim's pid, once written.
    pub fn read_shim_pid(&self) -> Option<i32> {
        read_number(&self.shim_pid_file())
    }
    /// Records the shim's pid (atomically).
    pub fn write_shim_pid(&self, pid: u32) -> std::io::Result<()> {
        write_atomic(&self.shim_pid_file(), &format!("{pid}\n"))
    }
    /// The container init's host pid (the runtime's `--pid-file`).
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join(name::PID)
    }
    /// The container init's pid, once the runtime wrote it.
    pub fn read_pid(&self) -> Option<u32> {
        read_number(&self.pid_file())
    }
    /// The container's exit code, written by the shim when the container ends.
    pub fn exit_file(&self) -> PathBuf {
        self.dir.join(name::EXIT)
    }
    /// The container's exit code (128+signal when killed; -1 when it never started), once
    /// the shim wrote it.
    pub fn read_exit_code(&self) -> Option<i32> {
        read_number(&self.exit_file())
    }
    /// Whether the shim recorded an exit code.
    pub fn has_exited(&self) -> bool {
        self.exit_file().exists()
    }
    /// Records the exit code (atomically): what the agent waits for.
    pub fn write_exit_code(&self, code: i32) -> std::io::Result<()> {
        write_atomic(&self.exit_file(), &format!("{code}\n"))
    }
    /// Whether the shim saw the container killed by the OOM killer.
    pub fn oom_killed(&self) -> bool {
        self.dir.join(name::OOM).exists()
    }
    /// Records that the OOM killer ended the container.
    pub fn mark_oom_killed(&self) -> std::io::Result<()> {
        write_atomic(&self.dir.join(name::OOM), "1\n")
    }
    /// The container's output: `log`, then `log.1` … as it rotates (`index` 0 is `log`).
    pub fn log(&self) -> PathBuf {
        self.rotated_log(0)
    }
    /// Log file `index` of the rotation (0: `log`, n: `log.n`).
    pub fn rotated_log(&self, index: u32) -> PathBuf {
        if index == 0 {
            self.dir.join(name::LOG)
        } else {
            self.dir.join(format!("{}.{index}", name::LOG))
        }
    }
    /// The runtime's own messages (`--log`).
    pub fn runtime_log(&self) -> PathBuf {
        self.dir.join(name::RUNTIME_LOG)
    }
}

/// Writes `contents` to `path` atomically (temp file + rename, mode 0600), so readers never
/// see half.
pub fn write_atomic(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(&tmp)?
        .write_all(contents.as_bytes())?;
    fs::rename(&tmp, path)
}

fn read_capped(path: &Path, max: u64) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    fs::File::open(path)
        .ok()?
        .take(max)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

fn read_line(path: &Path) -> Option<String> {
    let bytes = read_capped(path, SMALL_FILE_MAX)?;
    let text = String::from_utf8(bytes).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn read_number<T: std::str::FromStr>(path: &Path) -> Option<T> {
    read_line(path)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shims_reports_round_trip_and_missing_files_read_as_none() {
        let t = tempfile::tempdir().unwrap();
        let c = ContainerDir::new(t.path());
        assert_eq!(c.read_exit_code(), None);
        assert!(!c.has_exited() && !c.oom_killed());
        c.write_shim_pid(42).unwrap();
        c.write_exit_code(137).unwrap();
        c.mark_oom_killed().unwrap();
        fs::write(c.pid_file(), "77\n").unwrap();
        assert_eq!(c.read_shim_pid(), Some(42));
        assert_eq!(c.read_exit_code(), Some(137));
        assert_eq!(c.read_pid(), Some(77));
        assert!(c.has_exited() && c.oom_killed());
        fs::write(c.bridge_addr_file(), "10.0.0.2/24\n").unwrap();
        assert_eq!(c.read_bridge_addr().as_deref(), Some("10.0.0.2/24"));
        fs::write(c.exit_file(), "garbage").unwrap();
        assert_eq!(c.read_exit_code(), None);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(c.shim_pid_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, PRIVATE_FILE);
    }

    #[test]
    fn reads_are_bounded() {
        let t = tempfile::tempdir().unwrap();
        let c = ContainerDir::new(t.path());
        fs::write(c.pid_file(), "1".repeat(SMALL_FILE_MAX as usize + 10)).unwrap();
        assert_eq!(c.read_pid(), None, "a huge pid file is not a pid");
        fs::write(c.task_file(), vec![b'x'; TASK_FILE_MAX as usize + 10]).unwrap();
        assert_eq!(c.read_task().unwrap().len() as u64, TASK_FILE_MAX);
    }

    #[test]
    fn the_layout_is_stable() {
        // Running shims and containers made by an older agent use these names: changing one
        // strands them.
        let c = ContainerDir::new("/d");
        assert_eq!(c.config(), Path::new("/d/bundle/config.json"));
        assert_eq!(c.rootfs(), Path::new("/d/bundle/rootfs"));
        assert_eq!(c.rotated_log(2), Path::new("/d/log.2"));
        assert_eq!(c.runtime_log(), Path::new("/d/runc.log"));
        assert!(is_private_record("log.1") && is_private_record("task.json"));
        assert!(!is_private_record("resolv.conf"));
        assert_eq!(
            c.hosts(),
            Path::new("/d/hosts"),
            "outside containers/: kept inside"
        );
    }

    #[test]
    fn a_tasks_network_files_live_on_the_run_dir() {
        let c = ContainerDir::new("/var/lib/rudder/containers/t1");
        assert_eq!(c.net_dir(), Path::new("/var/lib/rudder/run/containers/t1"));
        assert_eq!(
            c.bridge_addr_file(),
            Path::new("/var/lib/rudder/run/containers/t1/bridge_addr")
        );
        assert_eq!(
            c.etc_files().map(|(_, p)| p),
            [
                PathBuf::from("/var/lib/rudder/run/containers/t1/resolv.conf"),
                PathBuf::from("/var/lib/rudder/run/containers/t1/hosts"),
            ]
        );
        // What the shim reads and writes stays in the container directory.
        assert_eq!(c.log(), Path::new("/var/lib/rudder/containers/t1/log"));
    }

    #[test]
    fn an_older_agents_bridge_record_is_read_and_removed() {
        let t = tempfile::tempdir().unwrap();
        let c = ContainerDir::new(t.path().join("containers").join("t1"));
        fs::create_dir_all(c.path()).unwrap();
        assert!(!c.has_bridge_addr());
        fs::write(c.path().join("bridge_addr"), "10.0.0.9\n").unwrap();
        assert!(c.has_bridge_addr());
        assert_eq!(c.read_bridge_addr().as_deref(), Some("10.0.0.9"));
        c.make_net_dir().unwrap();
        fs::write(c.bridge_addr_file(), "10.0.0.3\n").unwrap();
        assert_eq!(
            c.read_bridge_addr().as_deref(),
            Some("10.0.0.3"),
            "the new record wins"
        );
        c.remove_bridge_addr();
        assert!(!c.has_bridge_addr());
        fs::write(c.resolv_conf(), "x").unwrap();
        c.remove().unwrap();
        assert!(!c.path().exists() && !c.net_dir().exists());
        c.remove().unwrap();
    }
}

//! The agent's run dir, `<data>/run`: what means nothing after a reboot and comes and goes with
//! every container, kept on a tmpfs the agent mounts there.
//!
//! It holds the tasks' network namespaces (`netns/<task id>`, bind mounts), the ready
//! namespaces of the pool (`netns-pool/`) and each task's network files
//! (`containers/<task id>/`: bridge address, `resolv.conf`, `hosts`; the layout is
//! `rudder_shim::dir`'s). Why a tmpfs: on an ext4 without a journal every new inode is checked
//! against the inodes deleted in the last minute (`recently_deleted`), so a file made on disk
//! costs more the faster containers come and go. A burst of 50 bridge starts, each making six
//! such files more than a host start, was 1.2x slower than the same burst in host mode; on a
//! tmpfs the two were alike. A tmpfs also forgets, at a reboot, namespaces and addresses that
//! no longer exist.
//!
//! Invariants: the tmpfs is private to root (0700, `nosuid,nodev,noexec`) and small (its files
//! are a few hundred bytes a task); an agent that finds one mounted keeps it (its namespaces
//! belong to running containers); where no tmpfs can be mounted the agent warns and keeps the
//! same layout on disk. Namespaces an older agent bound under `<data>/netns/` are still found
//! ([`netns_paths`]) and its pool under `<data>/netns-pool/` is emptied ([`drop_legacy_pool`]).

use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// The run dir below a data dir.
pub const RUN: &str = "run";
/// Its size bound: a task's files take well under a KiB, a namespace's bind mount nothing.
const TMPFS_SIZE: &str = "64m";

/// What can go wrong making the run dir.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// The directory could not be made or made private.
    #[error("run dir: {op} {path}: {err}")]
    Io {
        op: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    /// The tmpfs could not be mounted.
    #[error("run dir: mount a tmpfs on {path}: {err}")]
    Mount { path: PathBuf, err: nix::Error },
}

/// `<data>/run`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(RUN)
}

/// Where tasks' network namespaces are bound.
pub fn netns_dir(data_dir: &Path) -> PathBuf {
    path(data_dir).join("netns")
}

/// The namespace pool's directory.
pub fn pool_dir(data_dir: &Path) -> PathBuf {
    path(data_dir).join("netns-pool")
}

/// Where task `id`'s namespace may be bound: on the run dir, and where an older agent bound it.
pub fn netns_paths(data_dir: &Path, id: &str) -> [PathBuf; 2] {
    [
        netns_dir(data_dir).join(id),
        data_dir.join("netns").join(id),
    ]
}

/// Makes `<data>/run` (0700) and mounts a private tmpfs on it unless one is there. `Ok(false)`
/// when it stays on disk because it already holds something (never hidden under a mount).
pub fn prepare(data_dir: &Path) -> Result<bool, RunDirError> {
    let dir = path(data_dir);
    crate::datadir::private_dir(&dir).map_err(|err| RunDirError::Io {
        op: "make",
        path: dir.clone(),
        err,
    })?;
    if crate::secrets::is_tmpfs(&dir) {
        return Ok(true);
    }
    let busy = std::fs::read_dir(&dir)
        .map_err(|err| RunDirError::Io {
            op: "read",
            path: dir.clone(),
            err,
        })?
        .next()
        .is_some();
    if busy {
        return Ok(false);
    }
    nix::mount::mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some(format!("mode=0700,size={TMPFS_SIZE}").as_str()),
    )
    .map_err(|err| RunDirError::Mount {
        path: dir.clone(),
        err,
    })?;
    info!(path = %dir.display(), "run dir on a tmpfs");
    Ok(true)
}

/// [`prepare`], warning instead of failing: the agent works with the run dir on disk, slower.
pub fn prepare_or_warn(data_dir: &Path) {
    match prepare(data_dir) {
        Ok(true) => {}
        Ok(false) => warn!(
            path = %path(data_dir).display(),
            "run dir: not empty and not a tmpfs; keeping it on disk"
        ),
        Err(e) => warn!(%e, "run dir stays on disk"),
    }
}

/// Deletes the namespaces an older agent's pool left in `<data>/netns-pool` (no task uses a
/// pooled namespace), and the directory.
pub fn drop_legacy_pool(data_dir: &Path) {
    let dir = data_dir.join("netns-pool");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        crate::net::remove_netns(&e.path());
    }
    let _ = std::fs::remove_dir(&dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_and_the_older_agents_paths() {
        let d = Path::new("/var/lib/rudder");
        assert_eq!(pool_dir(d), Path::new("/var/lib/rudder/run/netns-pool"));
        assert_eq!(
            netns_paths(d, "t1"),
            [
                PathBuf::from("/var/lib/rudder/run/netns/t1"),
                PathBuf::from("/var/lib/rudder/netns/t1"),
            ]
        );
        // The task files the shim's layout puts on the run dir are below the same dir.
        let c = crate::shim::ContainerDir::new(d.join("containers").join("t1"));
        assert!(c.net_dir().starts_with(path(d)));
    }

    #[test]
    fn a_run_dir_that_holds_something_is_never_hidden() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(path(t.path())).unwrap();
        std::fs::write(path(t.path()).join("x"), "").unwrap();
        assert!(!prepare(t.path()).unwrap());
        assert!(path(t.path()).join("x").exists());
    }

    #[test]
    fn an_older_agents_pool_dir_is_emptied_and_removed() {
        let t = tempfile::tempdir().unwrap();
        let legacy = t.path().join("netns-pool");
        std::fs::create_dir_all(&legacy).unwrap();
        std::fs::write(legacy.join("n1"), "").unwrap();
        drop_legacy_pool(t.path());
        assert!(!legacy.exists());
        drop_legacy_pool(t.path());
    }
}

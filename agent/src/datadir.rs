//! The agent's data directory is private to root: containers' upper dirs and image layers
//! hold whatever a container or an image put there (setuid binaries, device nodes), task
//! specs and logs hold secrets. So (Docker's answer to CVE-2021-41091):
//!
//! * `<data>` and the agent's subtrees (`containers/`, `volumes/`, `builds/`, `build-cache/`,
//!   the runtime's state) are 0700; nothing below needs an unprivileged user to traverse them
//!   (runc enters a rootfs and mounts volumes as root before it switches to the container's
//!   user);
//! * files the agent writes there (`task.json`, `bundle/config.json`, the image digest) are
//!   0600, and so are the shim's logs;
//! * on start, [`secure`] tightens what an older agent left looser.
//!
//! Exceptions, on purpose: a container's `upper` dir keeps 0755, because overlayfs shows its
//! mode as the container's `/`; a volume's `_data` keeps the mode its contents need, because
//! it is the root of the mount inside the container. Both sit below 0700 directories.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the agent's directories.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files the agent writes in them.
pub const FILE_MODE: u32 = 0o600;

/// Creates `path` (and missing parents) 0700, or tightens it to 0700 when it exists with any
/// group or other bits. Never follows a symlink at `path`.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)?;
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            path.display()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(path, Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` as a 0600 file (an existing one is truncated and made 0600; a
/// symlink at `path` is refused).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    f.write_all(bytes)
}

/// Makes `data_dir` and the agent's subtrees private (see the module doc), and tightens the
/// files of containers an older agent left behind. `runtime_root`: the OCI runtime's state.
pub fn secure(data_dir: &Path, runtime_root: &Path) -> std::io::Result<()> {
    private_dir(data_dir)?;
    for sub in ["containers", "volumes", "builds", "build-cache"] {
        private_dir(&data_dir.join(sub))?;
    }
    private_dir(runtime_root)?;
    let tighten = |p: &Path, mode: u32| match fs::symlink_metadata(p) {
        Ok(m) if !m.file_type().is_symlink() && m.permissions().mode() & 0o077 != 0 => {
            fs::set_permissions(p, Permissions::from_mode(mode))
        }
        _ => Ok(()),
    };
    for dir in ["containers", "volumes"] {
        for e in fs::read_dir(data_dir.join(dir))?.flatten() {
            let p = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            tighten(&p, DIR_MODE)?;
            if dir == "volumes" {
                continue;
            }
            // A container's own files (not its rootfs, upper or work: the container's).
            let c = crate::shim::ContainerDir::new(&p);
            tighten(&c.bundle(), DIR_MODE)?;
            tighten(&c.config(), FILE_MODE)?;
            tighten(&c.work(), DIR_MODE)?;
            // Its spec, image and logs; not `resolv.conf` or `hosts`, which the container's
            // users read through their bind mounts.
            for f in fs::read_dir(&p)?.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let private = crate::shim::dir::is_private_record(&name);
                if private && f.file_type().is_ok_and(|t| t.is_file()) {
                    tighten(&f.path(), FILE_MODE)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn an_old_data_dir_is_tightened() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        let c = d.join("containers").join("abc");
        fs::create_dir_all(c.join("bundle/rootfs")).unwrap();
        fs::create_dir_all(c.join("upper")).unwrap();
        fs::create_dir_all(d.join("volumes/v/_data")).unwrap();
        for f in [
            "task.json",
            "log",
            "log.1",
            "bundle/config.json",
            "resolv.conf",
        ] {
            fs::write(c.join(f), "{}").unwrap();
            fs::set_permissions(c.join(f), Permissions::from_mode(0o644)).unwrap();
        }
        for p in [&d, &d.join("containers"), &c, &c.join("upper")] {
            fs::set_permissions(p, Permissions::from_mode(0o755)).unwrap();
        }
        secure(&d, &d.join("runc")).unwrap();
        for p in ["", "containers", "volumes", "builds", "build-cache", "runc"] {
            assert_eq!(mode(&d.join(p)), 0o700, "{p}");
        }
        assert_eq!(mode(&c), 0o700);
        assert_eq!(mode(&c.join("bundle")), 0o700);
        assert_eq!(mode(&d.join("volumes/v")), 0o700);
        for f in ["task.json", "log", "log.1", "bundle/config.json"] {
            assert_eq!(mode(&c.join(f)), 0o600, "{f}");
        }
        // The container's root stays as overlayfs needs it, and its resolv.conf readable.
        assert_eq!(mode(&c.join("upper")), 0o755);
        assert_eq!(mode(&c.join("resolv.conf")), 0o644);
        // Files are written private, also over a looser one; a symlink is refused.
        write_private(&c.join("task.json"), b"x").unwrap();
        assert_eq!(mode(&c.join("task.json")), 0o600);
        std::os::unix::fs::symlink("/etc/passwd", c.join("evil")).unwrap();
        assert!(write_private(&c.join("evil"), b"x").is_err());
    }
}

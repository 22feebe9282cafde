//! Mounting overlayfs over an image's layers, for containers (`bundle`) and builds (`build`).
//!
//! The classic `mount(2)` takes every lower dir in one option string of at most a page, so
//! with absolute layer paths an image of more than about 40 layers cannot be mounted (docker
//! has 125-layer images). Kernels from 6.8 take the lower dirs one by one (`lowerdir+`)
//! through the new mount API (fsopen, fsconfig, fsmount, move_mount), with no such limit;
//! older kernels get the classic call. `/proc/self/mountinfo` then shows one `lowerdir+=PATH`
//! per layer rather than `lowerdir=A:B` (the image GC reads both: `images::mounted_layers`).
//!
//! Options the kernel does not know (`redirect_dir`, `metacopy` on old kernels) are dropped
//! rather than failing the mount: they only keep overlayfs from features a layer cannot
//! express, and kernels without them do not have those features on.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

// The new mount API's syscalls have the same numbers on every architecture.
const SYS_MOVE_MOUNT: libc::c_long = 429;
const SYS_FSOPEN: libc::c_long = 430;
const SYS_FSCONFIG: libc::c_long = 431;
const SYS_FSMOUNT: libc::c_long = 432;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// An overlay mount to make.
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    /// Lower dirs, the top one first (as in `lowerdir=`). None: an empty dir is needed.
    pub lower: Vec<PathBuf>,
    /// Upper and work dirs; without them the mount is read-only.
    pub upper: Option<(PathBuf, PathBuf)>,
    /// Options worth having where the kernel knows them (`redirect_dir=off`).
    pub optional: Vec<(&'static str, &'static str)>,
}

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

fn fsconfig(fd: &OwnedFd, key: &str, value: &[u8]) -> io::Result<()> {
    let (k, v) = (cstr(key.as_bytes())?, cstr(value)?);
    // SAFETY: valid descriptor and NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::syscall(
            SYS_FSCONFIG,
            fd.as_raw_fd(),
            FSCONFIG_SET_STRING,
            k.as_ptr(),
            v.as_ptr(),
            0,
        )
    };
    if rc < 0 {
        return Err(last_error());
    }
    Ok(())
}

/// The new mount API, one `lowerdir+` per layer. `Ok(false)`: this kernel lacks it.
fn mount_new_api(o: &Overlay, target: &Path) -> io::Result<bool> {
    let fstype = cstr(b"overlay")?;
    // SAFETY: a NUL-terminated string; the returned descriptor is owned below.
    let fd = unsafe { libc::syscall(SYS_FSOPEN, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    if fd < 0 {
        return Ok(false);
    }
    // SAFETY: fsopen returned a fresh descriptor we alone own.
    let fs = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    match o.lower.first() {
        Some(first) => match fsconfig(&fs, "lowerdir+", first.as_os_str().as_bytes()) {
            Ok(()) => {}
            // Before 6.8: no `lowerdir+`.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
            Err(e) => return Err(e),
        },
        None => return Ok(false),
    }
    for l in &o.lower[1..] {
        fsconfig(&fs, "lowerdir+", l.as_os_str().as_bytes())?;
    }
    if let Some((upper, work)) = &o.upper {
        fsconfig(&fs, "upperdir", upper.as_os_str().as_bytes())?;
        fsconfig(&fs, "workdir", work.as_os_str().as_bytes())?;
    }
    for (k, v) in &o.optional {
        let _ = fsconfig(&fs, k, v.as_bytes());
    }
    // SAFETY: valid descriptor; no strings.
    let rc = unsafe {
        libc::syscall(
            SYS_FSCONFIG,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    if rc < 0 {
        return Err(last_error());
    }
    let attrs = if o.upper.is_none() {
        MOUNT_ATTR_RDONLY
    } else {
        0
    };
    // SAFETY: valid descriptor; the returned one is owned below.
    let mfd = unsafe { libc::syscall(SYS_FSMOUNT, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) };
    if mfd < 0 {
        return Err(last_error());
    }
    // SAFETY: fsmount returned a fresh descriptor we alone own.
    let mnt = unsafe { OwnedFd::from_raw_fd(mfd as i32) };
    let (empty, to) = (cstr(b"")?, cstr(target.as_os_str().as_bytes())?);
    // SAFETY: valid descriptor and NUL-terminated strings.
    let rc = unsafe {
        libc::syscall(
            SYS_MOVE_MOUNT,
            mnt.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(last_error());
    }
    Ok(true)
}

/// The classic call: every lower dir in one option string.
fn mount_classic(o: &Overlay, target: &Path) -> io::Result<()> {
    let lower: Vec<String> = o.lower.iter().map(|p| p.display().to_string()).collect();
    let mut opts = format!("lowerdir={}", lower.join(":"));
    if let Some((upper, work)) = &o.upper {
        opts.push_str(&format!(
            ",upperdir={},workdir={}",
            upper.display(),
            work.display()
        ));
    }
    let flags = if o.upper.is_none() {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    let with: String = o
        .optional
        .iter()
        .map(|(k, v)| format!(",{k}={v}"))
        .collect();
    let attempt = |opts: &str| mount(Some("overlay"), target, Some("overlay"), flags, Some(opts));
    attempt(&format!("{opts}{with}"))
        .or_else(|_| attempt(&opts))
        .map_err(io::Error::from)
}

/// Mounts `o` at `target`.
pub fn mount_overlay(o: &Overlay, target: &Path) -> io::Result<()> {
    if mount_new_api(o, target)? {
        return Ok(());
    }
    mount_classic(o, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn many_layers_mount_and_stack_in_order() {
        if !is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        // Long paths, as a real content store has, and more layers than one page of
        // `lowerdir=` could hold.
        let t = tempfile::tempdir().unwrap();
        let long = t.path().join("x".repeat(60));
        let mut lower = Vec::new();
        for i in 0..80 {
            let d = long.join(format!("{:064x}", i));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(format!("f{i}")), format!("{i}")).unwrap();
            std::fs::write(d.join("top"), format!("{i}")).unwrap();
            lower.push(d);
        }
        lower.reverse(); // top first: layer 79 wins
        let (upper, work, root) = (t.path().join("u"), t.path().join("w"), t.path().join("m"));
        for d in [&upper, &work, &root] {
            std::fs::create_dir(d).unwrap();
        }
        let o = Overlay {
            lower,
            upper: Some((upper.clone(), work)),
            optional: vec![("redirect_dir", "off"), ("metacopy", "off")],
        };
        let mounted = mount_overlay(&o, &root);
        let check = || {
            assert_eq!(std::fs::read_to_string(root.join("top")).unwrap(), "79");
            assert_eq!(std::fs::read_to_string(root.join("f0")).unwrap(), "0");
            std::fs::write(root.join("new"), "n").unwrap();
            assert!(upper.join("new").exists());
        };
        match mounted {
            Ok(()) => {
                let r = std::panic::catch_unwind(check);
                let _ = nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH);
                r.unwrap();
            }
            // An old kernel: only the classic call, which cannot take this many.
            Err(e) => eprintln!("skipped: this kernel has no lowerdir+ ({e})"),
        }
    }
}

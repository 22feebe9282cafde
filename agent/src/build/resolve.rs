//! Paths, users and owners resolved inside an image's root, as in a chroot: nothing is read
//! through a symlink that leaves the root.

use super::*;

// ---- paths inside a root -------------------------------------------------------------------

/// The normal components of `path` (absolute or not), `..` clamped at the root like a chroot.
pub(super) fn clean(path: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n.to_string_lossy().into_owned()),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Resolves `path` inside `root` as a process chrooted there would: every symlink on the way
/// (the last one too when `follow_last`) stays inside `root`. Returns the host path, which
/// need not exist.
pub(super) fn resolve_in_root(root: &Path, path: &str, follow_last: bool) -> io::Result<PathBuf> {
    // Components still to walk, last first; `..` pops what was walked (never above root).
    let raw = |p: &str| -> Vec<String> {
        let mut v: Vec<String> = Path::new(p)
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
                Component::ParentDir => Some("..".to_string()),
                _ => None,
            })
            .collect();
        v.reverse();
        v
    };
    let mut todo = raw(path);
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            done.pop();
            continue;
        }
        let mut host = root.to_path_buf();
        host.extend(&done);
        host.push(&c);
        let last = todo.is_empty();
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() && (!last || follow_last) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::other(format!("too many symlinks in {path}")));
                }
                let target = fs::read_link(&host)?;
                let target = target.to_string_lossy();
                if target.starts_with('/') {
                    done.clear();
                }
                todo.extend(raw(&target));
            }
            _ => done.push(c),
        }
    }
    let mut host = root.to_path_buf();
    host.extend(&done);
    Ok(host)
}

/// The directories of `dir` (absolute, in the image at `root`) that do not exist yet, top
/// first, as tar member names.
pub(super) fn missing_dirs(root: &Path, dir: &str) -> Vec<String> {
    let parts = clean(dir);
    let mut out = Vec::new();
    for i in 1..=parts.len() {
        let p = parts[..i].join("/");
        let exists = resolve_in_root(root, &p, true).is_ok_and(|h| h.is_dir());
        if !exists {
            out.push(p);
        }
    }
    out
}

/// Who a RUN runs as: `user` (`USER`: `name`, `uid`, `name:group`, `uid:gid`, ...) resolved
/// in the image's /etc/passwd and /etc/group as for containers (`crate::user`).
pub(super) fn resolve_user(root: &Path, user: &str) -> Result<crate::user::ExecUser, String> {
    crate::user::resolve_in_rootfs(root, user).map_err(|e| e.to_string())
}

/// `COPY --chown`: as [`resolve_user`], except that a uid without a group means that number
/// as the gid too (docker's rule), not the user's primary group.
pub(super) fn resolve_chown(root: &Path, owner: &str) -> Result<(u32, u32), String> {
    resolve_owner(root, owner, true)
}

/// A small regular file's text: never a FIFO or device (which could block), at most 1 MiB.
pub(super) fn read_small_file(path: &Path) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    f.take(1 << 20).read_to_string(&mut text).ok()?;
    Some(text)
}

pub(super) fn resolve_owner(
    root: &Path,
    user: &str,
    uid_is_gid: bool,
) -> Result<(u32, u32), String> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let read = |file: &str| {
        resolve_in_root(root, file, true)
            .ok()
            .and_then(|p| read_small_file(&p))
            .unwrap_or_default()
    };
    let passwd = read("/etc/passwd");
    let (uid, primary) = match u.parse::<u32>() {
        Ok(uid) if uid_is_gid => (uid, uid),
        Ok(uid) => {
            let primary = passwd.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[2] == u)
                    .then(|| f[3].parse().ok())
                    .flatten()
            });
            (uid, primary.unwrap_or(0))
        }
        Err(_) => passwd
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[0] == u)
                    .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                    .flatten()
            })
            .ok_or_else(|| format!("unknown user {u:?} (not in the image's /etc/passwd)"))?,
    };
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => read("/etc/group")
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() > 2 && f[0] == g)
                        .then(|| f[2].parse().ok())
                        .flatten()
                })
                .ok_or_else(|| format!("unknown group {g:?} (not in the image's /etc/group)"))?,
        },
    };
    Ok((uid, gid))
}

//! Container users: a `USER` / `user:` / `--user` string (`name`, `uid`, `name:group`,
//! `uid:gid`, `name:gid`, `uid:group`, or empty for root) resolved against the container's own
//! `/etc/passwd` and `/etc/group`, with the semantics of runc's `user.GetExecUser` as Docker
//! uses it:
//!
//! * a numeric user is always a uid; it need not be in passwd (then its gid is 0 unless one is
//!   given, and it has no supplementary groups);
//! * a name must be in passwd: `unable to find user NAME: no matching entries in passwd file`,
//!   never a fallback to root;
//! * the first matching line wins; the user's gid and home come from it;
//! * without an explicit group, the supplementary groups are every group that lists the user by
//!   name; with one (numeric, or a name that must be in group), there are none;
//! * ids must be in `0..=2^31-1`.
//!
//! One deliberate difference: runc reads a malformed number in a matching passwd line as 0
//! (root); here such a line is an error.
//!
//! Invariants: the container's files are untrusted. They are opened with `openat2` and
//! `RESOLVE_IN_ROOT` (symlinks and `..` resolve inside the container's root, never the host's),
//! non-blocking (a FIFO cannot hang the agent), must be regular files, and at most
//! [`MAX_FILE`] bytes.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

/// The largest `/etc/passwd` or `/etc/group` read from a container.
pub const MAX_FILE: u64 = 1 << 20;
/// The largest uid or gid (runc's `maxID`).
const MAX_ID: i64 = (1 << 31) - 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user: unable to find user {0}: no matching entries in passwd file")]
    NoUser(String),
    #[error("user: unable to find group {0}: no matching entries in group file")]
    NoGroup(String),
    #[error("user: {0} is out of range (uids and gids are 0 to 2147483647)")]
    Range(String),
    #[error("user: the {file} entry for {name} has a malformed {field}")]
    Malformed {
        file: &'static str,
        name: String,
        field: &'static str,
    },
    #[error("user: cannot read {path} in the container: {msg}")]
    Read { path: &'static str, msg: String },
}

/// Who a container process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (without `gid` unless a group lists the user).
    pub sgids: Vec<u32>,
    /// From passwd when the user is there; `/` otherwise (runc's default).
    pub home: String,
}

impl ExecUser {
    /// `uid`, `gid` and `sgids` plus `extra` (a spec's `group_add`), deduplicated, in order.
    pub fn additional_gids(&self, extra: &[u32]) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for g in self.sgids.iter().chain(extra) {
            if !out.contains(g) {
                out.push(*g);
            }
        }
        out
    }
}

/// `user` resolved against `passwd` and `group` (the files' text; `None` when the container
/// has no such file, which runc tolerates: then only numbers resolve).
pub fn resolve(
    user: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ExecUser, UserError> {
    let mut parts = user.split(':');
    let user_arg = parts.next().unwrap_or("");
    let group_arg = parts.next().unwrap_or("");
    let uid_num = user_arg.parse::<i64>().ok();
    let gid_num = group_arg.parse::<i64>().ok();
    let id = |n: i64, what: &str| {
        u32::try_from(n)
            .ok()
            .filter(|&v| i64::from(v) <= MAX_ID)
            .ok_or_else(|| UserError::Range(format!("{what} {n}")))
    };

    let mut out = ExecUser {
        uid: 0,
        gid: 0,
        sgids: Vec::new(),
        home: "/".into(),
    };
    // The first passwd line that matches: by uid for a number (or root for an empty user),
    // by name otherwise.
    let matched = passwd.and_then(|text| {
        lines(text).find(|f| match (user_arg, uid_num) {
            ("", _) => f.get(2).is_some_and(|u| u.parse::<i64>().ok() == Some(0)),
            (_, Some(n)) => f.get(2).is_some_and(|u| u.parse::<i64>().ok() == Some(n)),
            (name, None) => f[0] == name,
        })
    });
    let mut matched_name = None;
    match (matched, uid_num) {
        (Some(f), _) => {
            let field = |i: usize, field: &'static str| {
                f.get(i)
                    .and_then(|v| v.parse::<i64>().ok())
                    .ok_or_else(|| UserError::Malformed {
                        file: "passwd",
                        name: f[0].to_string(),
                        field,
                    })
            };
            out.uid = id(field(2, "uid")?, "uid")?;
            out.gid = id(field(3, "gid")?, "gid")?;
            out.home = f.get(5).map(|h| h.to_string()).unwrap_or_default();
            matched_name = Some(f[0].to_string());
        }
        (None, Some(n)) => out.uid = id(n, "uid")?,
        (None, None) if user_arg.is_empty() => {}
        (None, None) => return Err(UserError::NoUser(user_arg.to_string())),
    }

    if !group_arg.is_empty() {
        let found = group.and_then(|text| {
            lines(text).find(|f| match gid_num {
                Some(n) => f.get(2).is_some_and(|g| g.parse::<i64>().ok() == Some(n)),
                None => f[0] == group_arg,
            })
        });
        out.gid = match (found, gid_num) {
            (Some(f), _) => id(
                f.get(2)
                    .and_then(|g| g.parse::<i64>().ok())
                    .ok_or_else(|| UserError::Malformed {
                        file: "group",
                        name: f[0].to_string(),
                        field: "gid",
                    })?,
                "gid",
            )?,
            (None, Some(n)) => id(n, "gid")?,
            (None, None) => return Err(UserError::NoGroup(group_arg.to_string())),
        };
    } else if let (Some(name), Some(text)) = (&matched_name, group) {
        for f in lines(text) {
            let listed = f
                .get(3)
                .is_some_and(|members| members.split(',').any(|m| m == name));
            if listed {
                // A member line with a bad gid is skipped rather than taken as 0.
                if let Some(g) = f.get(2).and_then(|g| g.parse::<i64>().ok()) {
                    out.sgids.push(id(g, "gid")?);
                }
            }
        }
    }
    Ok(out)
}

/// The `:`-separated fields of each non-empty line.
fn lines(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.split(':').collect())
}

/// `user` resolved against the passwd and group files of the container root filesystem at
/// `rootfs` (a host path).
pub fn resolve_in_rootfs(rootfs: &Path, user: &str) -> Result<ExecUser, UserError> {
    let passwd = read_in_root(rootfs, "/etc/passwd")?;
    let group = read_in_root(rootfs, "/etc/group")?;
    resolve(user, passwd.as_deref(), group.as_deref())
}

/// The text of `path` inside `root`, resolved as the container would (`RESOLVE_IN_ROOT`);
/// `None` when it does not exist.
pub fn read_in_root(root: &Path, path: &'static str) -> Result<Option<String>, UserError> {
    let err = |msg: String| UserError::Read { path, msg };
    let dir = std::fs::File::open(root).map_err(|e| err(format!("{}: {e}", root.display())))?;
    let Some(file) = openat2_in_root(&dir, path).map_err(|e| err(e.to_string()))? else {
        return Ok(None);
    };
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() > MAX_FILE {
        return Err(err(format!(
            "{} bytes, more than the {} allowed",
            meta.len(),
            MAX_FILE
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(err(format!("more than the {MAX_FILE} bytes allowed")));
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` read-only under `dir` with every component resolved inside it.
fn openat2_in_root(dir: &std::fs::File, path: &str) -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let c = CString::new(path.trim_start_matches('/')).map_err(std::io::Error::other)?;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads `how` (size given) and the NUL-terminated path, both alive for the
    // call; a non-negative result is a new fd we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: see above.
    Ok(Some(std::fs::File::from(unsafe {
        OwnedFd::from_raw_fd(fd as i32)
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
        app:x:1000:1001:App:/home/app:/bin/sh\n\
        \n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
        dup:x:2000:2000::/first:/bin/sh\n\
        dup:x:2001:2001::/second:/bin/sh\n\
        bad:x:notanumber:0::/:/bin/sh\n";
    const GROUP: &str = "root:x:0:root\n\
        wheel:x:10:root,app\n\
        staff:x:50:\n\
        audio:x:29:app\n\
        nogroup:x:65534:\n";

    fn u(uid: u32, gid: u32, sgids: &[u32], home: &str) -> Result<ExecUser, UserError> {
        Ok(ExecUser {
            uid,
            gid,
            sgids: sgids.to_vec(),
            home: home.into(),
        })
    }

    #[test]
    fn users_resolve_as_runc_does() {
        let cases: Vec<(&str, Result<ExecUser, UserError>)> = vec![
            ("", u(0, 0, &[0, 10], "/root")),
            ("root", u(0, 0, &[0, 10], "/root")),
            ("nobody", u(65534, 65534, &[], "/nonexistent")),
            ("app", u(1000, 1001, &[10, 29], "/home/app")),
            ("1000", u(1000, 1001, &[10, 29], "/home/app")),
            // An explicit group: no supplementary groups.
            ("app:staff", u(1000, 50, &[], "/home/app")),
            ("app:77", u(1000, 77, &[], "/home/app")),
            ("1000:audio", u(1000, 29, &[], "/home/app")),
            (":staff", u(0, 50, &[], "/root")),
            // A number not in passwd: gid 0 unless given, home /.
            ("4242", u(4242, 0, &[], "/")),
            ("4242:4343", u(4242, 4343, &[], "/")),
            ("4242:wheel", u(4242, 10, &[], "/")),
            // The first match wins.
            ("dup", u(2000, 2000, &[], "/first")),
            ("nosuch", Err(UserError::NoUser("nosuch".into()))),
            ("app:nosuch", Err(UserError::NoGroup("nosuch".into()))),
            ("-1", Err(UserError::Range("uid -1".into()))),
            ("2147483648", Err(UserError::Range("uid 2147483648".into()))),
            ("1:-5", Err(UserError::Range("gid -5".into()))),
            (
                "bad",
                Err(UserError::Malformed {
                    file: "passwd",
                    name: "bad".into(),
                    field: "uid",
                }),
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(resolve(spec, Some(PASSWD), Some(GROUP)), want, "{spec:?}");
        }
        assert_eq!(
            UserError::NoUser("nobody".into()).to_string(),
            "user: unable to find user nobody: no matching entries in passwd file"
        );
    }

    #[test]
    fn without_files_only_numbers_resolve() {
        assert_eq!(resolve("", None, None), u(0, 0, &[], "/"));
        assert_eq!(resolve("7:8", None, None), u(7, 8, &[], "/"));
        assert_eq!(resolve("7", None, None), u(7, 0, &[], "/"));
        assert_eq!(
            resolve("nobody", None, None),
            Err(UserError::NoUser("nobody".into()))
        );
        assert_eq!(
            resolve("7:staff", Some(PASSWD), None),
            Err(UserError::NoGroup("staff".into()))
        );
        let eu = resolve("app", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!(eu.additional_gids(&[29, 5]), vec![10, 29, 5]);
    }

    #[test]
    fn files_are_read_inside_the_root_only() {
        let t = tempfile::tempdir().unwrap();
        let host = t.path().join("host");
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("passwd"), "nobody:x:0:0::/:/bin/sh\n").unwrap();
        // An absolute symlink and `..` out of the root both stay inside it.
        std::os::unix::fs::symlink(host.join("passwd"), root.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("../../../../../host/passwd", root.join("etc/group")).unwrap();
        assert_eq!(read_in_root(&root, "/etc/passwd").unwrap(), None);
        assert_eq!(read_in_root(&root, "/etc/group").unwrap(), None);
        assert_eq!(
            resolve_in_rootfs(&root, "nobody"),
            Err(UserError::NoUser("nobody".into()))
        );
        // A symlink inside the root is followed there.
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        std::fs::create_dir_all(root.join("host")).unwrap();
        std::fs::write(
            root.join("host/passwd"),
            "nobody:x:65534:65534::/:/bin/sh\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/host/passwd", root.join("etc/passwd")).unwrap();
        assert_eq!(resolve_in_rootfs(&root, "nobody").unwrap().uid, 65534);
        // A FIFO does not block, a big file is refused.
        std::fs::remove_file(root.join("etc/group")).unwrap();
        nix::unistd::mkfifo(
            &root.join("etc/group"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        assert!(matches!(
            resolve_in_rootfs(&root, "nobody"),
            Err(UserError::Read {
                path: "/etc/group",
                ..
            })
        ));
        std::fs::remove_file(root.join("etc/group")).unwrap();
        std::fs::write(root.join("etc/group"), vec![b'#'; MAX_FILE as usize + 1]).unwrap();
        let e = resolve_in_rootfs(&root, "nobody").unwrap_err().to_string();
        assert!(e.contains("/etc/group") && e.contains("allowed"), "{e}");
    }
}

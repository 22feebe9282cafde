//! Host tuning of the cgroup2 hierarchy for fast container starts: `favordynmods`.
//!
//! Starting a container moves its init process into the container's cgroup. By default the
//! kernel guards every migration with a per-CPU rwsem whose write side waits for an RCU grace
//! period: on this class of machine 6–12 ms per container start (measured by writing a pid to
//! `cgroup.procs`), most of the runtime's own time. The cgroup2 mount option `favordynmods`
//! (Linux ≥ 6.0; the lock is global, so one cgroup2 mount covers the v1 hierarchies of a
//! hybrid host too) makes a migration take about 0.3 ms, at the cost of a slightly slower
//! fork and exit, which a host that starts containers can afford. systemd does not set it;
//! the agent does at start (`--cgroup-favor-dynmods=false` leaves the host alone).
//!
//! The plan is a pure function of `/proc/self/mountinfo`; applying it is one `mount(2)`
//! remount that keeps the mount's flags and its other superblock options (`nsdelegate`,
//! `memory_recursiveprot`, ...), since a remount replaces both.

use std::path::PathBuf;

use nix::mount::MsFlags;
use tracing::{debug, info, warn};

/// One remount of a cgroup2 mount that lacks `favordynmods`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remount {
    /// The cgroup2 mount point.
    pub target: PathBuf,
    /// The mount's own flags (`nosuid`, `nodev`, `noexec`, atime and read-only flags).
    pub flags: MsFlags,
    /// Superblock options: the existing ones plus `favordynmods`.
    pub data: String,
}

/// Why the tuning could not be applied (the agent goes on without it).
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    /// `/proc/self/mountinfo` could not be read.
    #[error("cgroup tuning: read mountinfo: {0}")]
    Read(std::io::Error),
    /// The kernel refused the remount (before Linux 6.0 it has no `favordynmods`).
    #[error("cgroup tuning: remount {target} with favordynmods: {err}")]
    Remount {
        /// The mount point.
        target: String,
        /// The error of `mount(2)`.
        err: nix::Error,
    },
}

/// The remount that gives the host's cgroup2 mount `favordynmods`, or `None` when it has it
/// already or there is no cgroup2 mount (a pure-v1 host: nothing to do with this kernel knob).
/// `/sys/fs/cgroup` is preferred over a hybrid host's `/sys/fs/cgroup/unified`.
pub fn plan(mountinfo: &str) -> Option<Remount> {
    let mut best: Option<(u8, Remount)> = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint mount-options [optional…] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 6 || right.len() < 3 || right[0] != "cgroup2" {
            continue;
        }
        let target = unescape(left[4]);
        let rank = match target.as_str() {
            "/sys/fs/cgroup" => 0,
            "/sys/fs/cgroup/unified" => 1,
            _ => 2,
        };
        let supers: Vec<&str> = right[2].split(',').collect();
        if supers.contains(&"favordynmods") {
            return None;
        }
        if best.as_ref().is_some_and(|(r, _)| *r <= rank) {
            continue;
        }
        let mut data: Vec<&str> = supers
            .into_iter()
            .filter(|o| *o != "rw" && *o != "ro" && !o.is_empty())
            .collect();
        data.push("favordynmods");
        best = Some((
            rank,
            Remount {
                target: PathBuf::from(target),
                flags: mount_flags(left[5]),
                data: data.join(","),
            },
        ));
    }
    best.map(|(_, r)| r)
}

/// The `MsFlags` a remount must repeat to keep the mount's per-mount options as they are.
fn mount_flags(opts: &str) -> MsFlags {
    let mut f = MsFlags::empty();
    for o in opts.split(',') {
        f |= match o {
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            _ => MsFlags::empty(),
        };
    }
    f
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Gives the host's cgroup2 mount `favordynmods` if it lacks it. Errors are for the caller to
/// log: an older kernel refuses the option, and the agent works without it.
pub fn favor_dynmods() -> Result<(), TuneError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(TuneError::Read)?;
    let Some(r) = plan(&info) else {
        debug!("cgroup2 already favours dynamic modifications (or is not mounted)");
        return Ok(());
    };
    nix::mount::mount(
        None::<&str>,
        &r.target,
        None::<&str>,
        MsFlags::MS_REMOUNT | r.flags,
        Some(r.data.as_str()),
    )
    .map_err(|err| TuneError::Remount {
        target: r.target.display().to_string(),
        err,
    })?;
    info!(target = %r.target.display(), options = %r.data,
        "cgroup2 remounted with favordynmods: moving a container's init into its cgroup no longer waits for an RCU grace period");
    Ok(())
}

/// [`favor_dynmods`], logging a failure as a warning.
pub fn favor_dynmods_or_warn() {
    if let Err(e) = favor_dynmods() {
        warn!(%e, "container starts stay slower by one RCU grace period each");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,memory
";

    #[test]
    fn a_hybrid_host_remounts_its_unified_hierarchy_keeping_flags_and_options() {
        let r = plan(HYBRID).expect("remount");
        assert_eq!(r.target, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(r.data, "nsdelegate,favordynmods");
        assert_eq!(
            r.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RELATIME
        );
    }

    #[test]
    fn nothing_to_do_with_the_option_set_or_without_cgroup2() {
        let set = HYBRID.replace("rw,nsdelegate", "rw,nsdelegate,favordynmods");
        assert_eq!(plan(&set), None);
        let v1_only: String = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(plan(&v1_only), None);
        assert_eq!(plan(""), None);
        assert_eq!(plan("garbage line\n- - -\n"), None);
    }

    #[test]
    fn a_pure_v2_host_remounts_sys_fs_cgroup_first() {
        let info = "\
40 30 0:50 / /run/other/cgroup rw,relatime - cgroup2 cgroup2 rw
35 30 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        let r = plan(info).expect("remount");
        assert_eq!(r.target, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(r.data, "nsdelegate,memory_recursiveprot,favordynmods");
    }

    #[test]
    fn escaped_mount_points_are_unescaped() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\\"), r"/a\\");
        assert_eq!(unescape("/plain"), "/plain");
    }
}

//! The OCI runtime's command line (runc, crun): every argv Rudder passes to it, built in one
//! place for the shim (which runs the container as its parent) and the agent's
//! `OciCliRuntime` (everything else).
//!
//! Invariants: every command carries this agent's private `--root`, so agents on one machine
//! never see each other's containers; every command of one `RuntimeCli` sees the same cgroup
//! view (with [`RuntimeCli::hide_unified`], each runs in a private mount namespace without the
//! hybrid host's cgroup2 mount, see [`UNIFIED`]); the builder only builds (no process is
//! started here, no stdio is set), so callers choose how to run it and tests can read the argv.
//!
//! `exec` takes only a full OCI process file: crun's `exec ID ARGS…` does not run the command
//! as the container's process does (it runs as uid 0 with the runtime's default rlimits and no
//! `noNewPrivileges`, and `--env` replaces the container's environment), so Rudder always
//! states the process (user, env, cwd, capabilities, rlimits) itself, for runc as for crun.

use std::ffi::{CStr, OsStr, OsString};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// Where a hybrid cgroup host mounts its cgroup2 (unified) hierarchy.
///
/// Debian's crun 1.8 refuses a hybrid host whose unified hierarchy holds any controller ("cgroups
/// in hybrid mode not supported"), whatever its options. Without that mount it sees a cgroup v1
/// host, which it supports: every v1 controller (memory, cpu, pids, freezer…) stays mounted and
/// is where the container's limits go, as with runc, which on such a host puts limits in v1 too.
pub const UNIFIED: &CStr = c"/sys/fs/cgroup/unified";

/// One OCI runtime binary and its state dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeCli {
    /// Binary name or path (`runc`, `crun`).
    pub binary: String,
    /// The runtime's `--root`, private to this agent.
    pub root: PathBuf,
    /// Run every command in a private mount namespace where [`UNIFIED`] is unmounted (crun on
    /// a hybrid cgroup host). The namespace is a slave of the host's, so mounts the agent makes
    /// later (a container's rootfs, a volume) still reach the runtime; nothing done inside it
    /// reaches the host.
    pub hide_unified: bool,
}

impl RuntimeCli {
    /// The runtime `binary` with state dir `root`, seeing the host's cgroups as they are.
    pub fn new(binary: impl Into<String>, root: impl Into<PathBuf>) -> Self {
        RuntimeCli {
            binary: binary.into(),
            root: root.into(),
            hide_unified: false,
        }
    }

    /// The same runtime, with every command run without the unified hierarchy when `hide`.
    pub fn hiding_unified(mut self, hide: bool) -> Self {
        self.hide_unified = hide;
        self
    }

    /// `binary --root ROOT args…`, for a verb this type has no method for (tests, benches).
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root).args(args);
        if self.hide_unified {
            hide_unified(&mut cmd);
        }
        cmd
    }

    /// `run --detach`: creates and starts the container of `bundle`, writes its init's pid to
    /// `pid_file` and the runtime's messages to `log`. The caller becomes the init's parent
    /// only as a child subreaper (the runtime double-forks).
    pub fn run_detached(&self, id: &str, bundle: &Path, pid_file: &Path, log: &Path) -> Command {
        let mut cmd = self.command([OsStr::new("--log"), log.as_os_str()]);
        cmd.args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id);
        cmd
    }

    /// `run` in the foreground: the runtime lives as long as the container and exits with
    /// its code; the container's stdio is the command's.
    pub fn run_foreground(&self, id: &str, bundle: &Path) -> Command {
        let mut cmd = self.command(["run", "--bundle"]);
        cmd.arg(bundle).arg(id);
        cmd
    }

    /// `exec --process FILE`: the OCI process in `process` (args, user, env, cwd, terminal…)
    /// in the running container `id`.
    pub fn exec(&self, id: &str, process: &Path) -> Command {
        let mut cmd = self.command(["exec", "--process"]);
        cmd.arg(process).arg(id);
        cmd
    }

    /// `kill`: sends `signal` (a name, `TERM`, or a number) to the container's init.
    pub fn kill(&self, id: &str, signal: &str) -> Command {
        self.command(["kill", id, signal])
    }

    /// Whether the runtime loads a seccomp program compiled ahead, given in the spec's
    /// annotation `run.oci.seccomp_bpf_data` (crun), instead of compiling the profile with
    /// libseccomp on every start (some 15 ms for Docker's default profile).
    pub fn takes_seccomp_bpf(&self) -> bool {
        Path::new(&self.binary)
            .file_name()
            .is_some_and(|n| n == "crun")
    }

    /// `delete --force`: kills what is left and removes the runtime's record.
    pub fn delete_force(&self, id: &str) -> Command {
        self.command(["delete", "--force", id])
    }

    /// `pause` (freeze every process of the container) or `resume`.
    pub fn pause(&self, id: &str, freeze: bool) -> Command {
        self.command([if freeze { "pause" } else { "resume" }, id])
    }

    /// `list --quiet`: the ids of this root's containers, one a line.
    pub fn list(&self) -> Command {
        self.command(["list", "--quiet"])
    }

    /// `state`: the container's OCI state as JSON.
    pub fn state(&self, id: &str) -> Command {
        self.command(["state", id])
    }
}

/// Whether a command of a runtime with [`RuntimeCli::hide_unified`] can start here: runs
/// `binary --version` that way (which needs the right to make a mount namespace, and
/// [`UNIFIED`] to be a mount point).
pub fn can_hide_unified(binary: &str) -> bool {
    let mut cmd = Command::new(binary);
    cmd.arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    hide_unified(&mut cmd);
    cmd.status().is_ok_and(|s| s.success())
}

/// Makes `cmd` run in a private mount namespace without [`UNIFIED`].
fn hide_unified(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec; it calls only unshare, mount and umount2
    // (async-signal-safe syscalls) on static C strings and allocates nothing (nix hands a
    // `CStr` through as is, and its errors are plain errno values).
    unsafe {
        cmd.pre_exec(hide_unified_hierarchy);
    }
}

/// Between fork and exec: a private mount namespace, a slave of the one it came from, without
/// the cgroup2 mount at [`UNIFIED`].
fn hide_unified_hierarchy() -> std::io::Result<()> {
    let err = |e: nix::errno::Errno| std::io::Error::from_raw_os_error(e as i32);
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(err)?;
    // Slave, not private: mounts made on the host from now on still propagate in (the agent
    // mounts a container's rootfs before starting it, but may mount volumes meanwhile), and
    // the unmount below does not propagate out.
    nix::mount::mount(
        None::<&CStr>,
        c"/",
        None::<&CStr>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&CStr>,
    )
    .map_err(err)?;
    nix::mount::umount2(UNIFIED, MntFlags::MNT_DETACH).map_err(err)
}

/// The argv of `cmd` after the program, for messages and tests.
pub fn argv(cmd: &Command) -> Vec<OsString> {
    cmd.get_args().map(OsStr::to_os_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &Command) -> Vec<String> {
        argv(cmd)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn every_command_carries_the_private_root() {
        for hide in [false, true] {
            let cli = RuntimeCli::new("runc", "/r").hiding_unified(hide);
            for cmd in [
                cli.run_detached("c", Path::new("/b"), Path::new("/p"), Path::new("/l")),
                cli.run_foreground("c", Path::new("/b")),
                cli.exec("c", Path::new("/p.json")),
                cli.kill("c", "TERM"),
                cli.delete_force("c"),
                cli.pause("c", true),
                cli.list(),
                cli.state("c"),
                cli.command(["ps", "c"]),
            ] {
                assert_eq!(cmd.get_program(), "runc");
                assert_eq!(args(&cmd)[..2], ["--root", "/r"], "{cmd:?}");
            }
        }
    }

    #[test]
    fn argv_shapes() {
        let cli = RuntimeCli::new("crun", "/r");
        assert_eq!(
            args(&cli.run_detached("c", Path::new("/b"), Path::new("/p"), Path::new("/l"))),
            [
                "--root",
                "/r",
                "--log",
                "/l",
                "run",
                "--detach",
                "--bundle",
                "/b",
                "--pid-file",
                "/p",
                "c"
            ]
        );
        // Never `exec ID ARGS…`: crun would not run them as the container's process.
        assert_eq!(
            args(&cli.exec("c", Path::new("/p")))[2..],
            ["exec", "--process", "/p", "c"]
        );
        assert_eq!(args(&cli.pause("c", false))[2..], ["resume", "c"]);
        // Hiding the unified hierarchy changes no argument, only where the command runs.
        let hidden = cli.clone().hiding_unified(true);
        assert!(hidden.hide_unified && !cli.hide_unified);
        assert_eq!(args(&hidden.list()), args(&cli.list()));
    }

    #[test]
    fn the_hidden_view_needs_a_runtime_that_starts() {
        assert!(!can_hide_unified("/nonexistent/crun"));
    }
}

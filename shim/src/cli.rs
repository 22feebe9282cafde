//! The OCI runtime's command line (runc, crun): every argv Rudder passes to it, built in one
//! place for the shim (which runs the container as its parent) and the agent's
//! `OciCliRuntime` (everything else).
//!
//! Invariants: every command carries this agent's private `--root`, so agents on one machine
//! never see each other's containers; the builder only builds (no process is started here, no
//! stdio is set), so callers choose how to run it and tests can read the argv.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One OCI runtime binary and its state dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeCli {
    /// Binary name or path (`runc`, `crun`).
    pub binary: String,
    /// The runtime's `--root`, private to this agent.
    pub root: PathBuf,
}

/// What `exec` runs in a container.
#[derive(Debug, Clone, Copy)]
pub enum ExecProcess<'a> {
    /// A full OCI process file (`--process`): user, env, terminal, args.
    File(&'a Path),
    /// `argv` as the container's own process runs, on a terminal when `tty` (with
    /// `TERM=xterm`).
    Args {
        /// The command and its arguments.
        argv: &'a [String],
        /// Whether it runs on a terminal.
        tty: bool,
    },
}

impl RuntimeCli {
    /// The runtime `binary` with state dir `root`.
    pub fn new(binary: impl Into<String>, root: impl Into<PathBuf>) -> Self {
        RuntimeCli {
            binary: binary.into(),
            root: root.into(),
        }
    }

    fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root).args(args);
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

    /// `exec`: a process in the running container `id`.
    pub fn exec(&self, id: &str, process: ExecProcess<'_>) -> Command {
        let mut cmd = self.command(["exec"]);
        match process {
            ExecProcess::File(p) => {
                cmd.arg("--process").arg(p).arg(id);
            }
            ExecProcess::Args { argv, tty } => {
                if tty {
                    cmd.args(["--tty", "--env", "TERM=xterm"]);
                }
                cmd.arg(id).args(argv);
            }
        }
        cmd
    }

    /// `kill`: sends `signal` (a name, `TERM`, or a number) to the container's init.
    pub fn kill(&self, id: &str, signal: &str) -> Command {
        self.command(["kill", id, signal])
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
        let cli = RuntimeCli::new("runc", "/r");
        let tty = ["sh".to_string()];
        for cmd in [
            cli.run_detached("c", Path::new("/b"), Path::new("/p"), Path::new("/l")),
            cli.run_foreground("c", Path::new("/b")),
            cli.exec("c", ExecProcess::File(Path::new("/p.json"))),
            cli.exec(
                "c",
                ExecProcess::Args {
                    argv: &tty,
                    tty: true,
                },
            ),
            cli.kill("c", "TERM"),
            cli.delete_force("c"),
            cli.pause("c", true),
            cli.list(),
            cli.state("c"),
        ] {
            assert_eq!(cmd.get_program(), "runc");
            assert_eq!(args(&cmd)[..2], ["--root", "/r"], "{cmd:?}");
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
        let argv = ["ls".to_string(), "-l".to_string()];
        assert_eq!(
            args(&cli.exec(
                "c",
                ExecProcess::Args {
                    argv: &argv,
                    tty: true
                }
            ))[2..],
            ["exec", "--tty", "--env", "TERM=xterm", "c", "ls", "-l"]
        );
        assert_eq!(
            args(&cli.exec("c", ExecProcess::File(Path::new("/p"))))[2..],
            ["exec", "--process", "/p", "c"]
        );
        assert_eq!(args(&cli.pause("c", false))[2..], ["resume", "c"]);
    }
}

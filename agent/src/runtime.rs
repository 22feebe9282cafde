//! Container runtime port. [`ContainerRuntime`] is every verb the agent uses on a container
//! (start under a shim, run attached, exec with or without a terminal, pause/resume, kill,
//! delete, list, state). `OciCliRuntime` drives an OCI runtime CLI (runc, or crun where the
//! host allows it), with the argv built by the shim crate's `RuntimeCli`, the one builder the
//! shim uses too; [`fake::FakeRuntime`] (tests, or the `fake` feature) records calls and
//! plays scripted results. Workers, exec, cp, commit and build's RUN all go through the port.
//!
//! Invariants: the agent never forks container processes itself (its process is
//! multi-threaded); a container's fate is read from its shim's files, so it survives an agent
//! restart; `--root` is per agent, so agents on one machine never see each other's containers.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tracing::debug;

use crate::shim::{ContainerDir, RuntimeCli, ShimArgs, NOTIFY_FD};

#[cfg(any(test, feature = "fake"))]
pub mod fake;

/// The most output kept of each stream of a command run for a health check: its first and
/// last half (Docker keeps 4096 bytes of a health check's output).
pub const EXEC_OUTPUT_MAX: usize = 4096;

/// The first and last `half` bytes of a stream, and how long it was: bounded memory however
/// much a command prints.
#[derive(Debug, Default)]
struct Capped {
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    total: u64,
    half: usize,
}

impl Capped {
    fn new(max: usize) -> Capped {
        Capped {
            half: max / 2,
            ..Default::default()
        }
    }

    fn push(&mut self, mut buf: &[u8]) {
        self.total += buf.len() as u64;
        let room = self.half.saturating_sub(self.head.len());
        let n = room.min(buf.len());
        self.head.extend_from_slice(&buf[..n]);
        buf = &buf[n..];
        if buf.len() > self.half {
            buf = &buf[buf.len() - self.half..];
        }
        self.tail.extend(buf);
        let excess = self.tail.len().saturating_sub(self.half);
        self.tail.drain(..excess);
    }

    fn text(&self) -> String {
        let mut out = String::from_utf8_lossy(&self.head).into_owned();
        let kept = (self.head.len() + self.tail.len()) as u64;
        if self.total > kept {
            out.push_str(&format!(
                "\n[... {} bytes left out ...]\n",
                self.total - kept
            ));
        }
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        out.push_str(&String::from_utf8_lossy(&tail));
        out
    }
}

async fn read_capped(r: Option<impl tokio::io::AsyncRead + Unpin>, max: usize) -> Capped {
    use tokio::io::AsyncReadExt;
    let mut c = Capped::new(max);
    let Some(mut r) = r else {
        return c;
    };
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        c.push(&buf[..n]);
    }
    c
}

/// Runs `cmd` (stdin empty) for at most `timeout`; its exit code and its stdout then stderr,
/// each cut to [`EXEC_OUTPUT_MAX`] as it streams (never buffered whole). Killed on timeout.
async fn run_capped(
    mut cmd: tokio::process::Command,
    timeout: Duration,
) -> Result<(i32, String), RuntimeError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(io("exec runtime"))?;
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let run = async {
        tokio::join!(
            read_capped(out, EXEC_OUTPUT_MAX),
            read_capped(err, EXEC_OUTPUT_MAX),
            child.wait()
        )
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((out, err, Ok(status))) => {
            let mut text = out.text();
            text.push_str(&err.text());
            Ok((status.code().unwrap_or(-1), text))
        }
        Ok((_, _, Err(e))) => Err(io("wait for exec")(e)),
        Err(_) => Ok((-1, format!("timed out after {timeout:?}"))),
    }
}

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The container could not be started.
    #[error("runtime: {0}")]
    Start(String),
    /// A file or process operation failed.
    #[error("runtime: {op}: {err}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The underlying error.
        err: std::io::Error,
    },
    /// The runtime ran and refused (its exit code was not 0); `stderr` says why.
    #[error("runtime: {cmd} failed: {stderr}")]
    Command {
        /// The runtime command.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// The runtime knows no container of this id.
    #[error("runtime: no container {0}")]
    NotFound(String),
    /// The runtime did not answer in time.
    #[error("runtime: {cmd} timed out after {after:?}")]
    Timeout {
        /// The runtime command.
        cmd: String,
        /// How long it was given.
        after: Duration,
    },
    /// The exec process could not be made from the container's bundle.
    #[error("runtime: exec process from {path}: {detail}")]
    Process {
        /// The bundle's config or the process file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The runtime's output does not parse.
    #[error("runtime: {cmd}: unexpected output: {detail}")]
    Output {
        /// The runtime command.
        cmd: String,
        /// What was wrong.
        detail: String,
    },
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> RuntimeError {
    move |err| RuntimeError::Io { op, err }
}

/// Which OCI runtime to use, with its state dir `root`.
///
/// crun starts a container in about a third of runc's time, but Debian's crun (1.8) refuses a
/// hybrid cgroup host whose unified hierarchy has any controller ("cgroups in hybrid mode not
/// supported, drop all controllers from cgroupv2"), and no option (`--cgroup-manager=disabled`
/// included) gets past that check. On such a host every crun command runs in a private mount
/// namespace without `/sys/fs/cgroup/unified` ([`RuntimeCli::hide_unified`]): crun then sees a
/// cgroup v1 host and puts the limits in the v1 hierarchies (memory, cpu, pids, freezer…),
/// where runc puts them too (the unified hierarchy holds only `hugetlb` here, which Rudder
/// never limits). Hiding it is safe: the namespace is a slave of the host's, so the host's
/// mounts, and those the agent makes later (a rootfs, a volume), still reach the runtime and
/// the container; the unmount stays inside; each command's namespace ends with it (a
/// container's own mount namespace is built from it, minus the unified mount it never had).
///
/// `auto` takes crun where it is installed and runs here as is (pure cgroup v2, hybrid with an
/// empty unified hierarchy, v1 only) or with the unified hierarchy hidden (checked by starting
/// `crun --version` that way, which needs the right to make a mount namespace); runc
/// elsewhere. `crun` takes crun, hiding the unified hierarchy where the host needs it.
pub fn pick_runtime(choice: &str, root: impl Into<PathBuf>) -> RuntimeCli {
    let cgroups = Path::new("/sys/fs/cgroup");
    match choice {
        "auto" if which("crun") => match crun_view(cgroups) {
            CrunView::AsIs => RuntimeCli::new("crun", root),
            CrunView::HideUnified if crate::shim::can_hide_unified("crun") => {
                RuntimeCli::new("crun", root).hiding_unified(true)
            }
            CrunView::HideUnified => RuntimeCli::new("runc", root),
        },
        "auto" => RuntimeCli::new("runc", root),
        "crun" => RuntimeCli::new("crun", root)
            .hiding_unified(crun_view(cgroups) == CrunView::HideUnified),
        other => RuntimeCli::new(other, root),
    }
}

/// The most a runtime state tmpfs ([`memory_state`]) may hold: crun keeps a `config.json` and
/// a status file a container.
const STATE_TMPFS_SIZE: &str = "128m";

/// Makes `cli`'s state dir live in memory, for crun: crun keeps a copy of each container's
/// `config.json` there, environment included — values from secrets too, which must never reach
/// a disk (runc's state holds no process environment). A dir already on a tmpfs is kept; an
/// empty one gets a private tmpfs (`nosuid,nodev,noexec`, 0700); a non-empty one on disk
/// (another runtime's containers) is refused. Other runtimes are left as they are.
pub fn memory_state(cli: &RuntimeCli) -> Result<(), RuntimeError> {
    if cli.binary != "crun" || crate::secrets::is_tmpfs(&cli.root) {
        return Ok(());
    }
    let busy = std::fs::read_dir(&cli.root)
        .map_err(io("read the runtime root"))?
        .next()
        .is_some();
    if busy {
        return Err(RuntimeError::Start(format!(
            "crun keeps each container's environment in its state dir, which must be a tmpfs: \
             {} is on disk and not empty",
            cli.root.display()
        )));
    }
    nix::mount::mount(
        Some("tmpfs"),
        &cli.root,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some(format!("mode=0700,size={STATE_TMPFS_SIZE}").as_str()),
    )
    .map_err(|e| io("mount a tmpfs on the runtime root")(e.into()))
}

/// How crun must see the cgroup hierarchy mounted at `cgroup_root`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrunView {
    /// As it is: pure v2, hybrid with no controller on the unified hierarchy, or v1 only.
    AsIs,
    /// Without the unified hierarchy: hybrid with a controller on it.
    HideUnified,
}

fn crun_view(cgroup_root: &Path) -> CrunView {
    if cgroup_root.join("cgroup.controllers").exists() {
        return CrunView::AsIs;
    }
    match std::fs::read_to_string(cgroup_root.join("unified").join("cgroup.controllers")) {
        Ok(c) if !c.trim().is_empty() => CrunView::HideUnified,
        _ => CrunView::AsIs,
    }
}

/// The container's own process, from its bundle's `config.json`, running `argv` (on a
/// terminal, with `TERM=xterm`, when `tty`): what `runc exec ID ARGS…` runs — the container's
/// user, env, cwd, capabilities, rlimits — stated in full so that every runtime runs the same
/// (crun's `exec ID ARGS…` would run as uid 0 with its own defaults).
pub fn exec_process(
    config: &Path,
    argv: &[String],
    tty: bool,
) -> Result<oci_spec::runtime::Process, RuntimeError> {
    let err = |detail: String| RuntimeError::Process {
        path: config.to_path_buf(),
        detail,
    };
    let spec = oci_spec::runtime::Spec::load(config).map_err(|e| err(e.to_string()))?;
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| err("no process".into()))?;
    if tty {
        let mut env = process.env().clone().unwrap_or_default();
        env.retain(|e| !e.starts_with("TERM="));
        env.push("TERM=xterm".into());
        process.set_env(Some(env));
    }
    process
        .set_args(Some(argv.to_vec()))
        .set_terminal(Some(tty));
    Ok(process)
}

/// Writes `process` to a 0600 file in `bundle` (a task with secrets has its bundle on a tmpfs,
/// and the file holds its env) for `exec --process`; the file goes when the path is dropped.
pub fn write_process(
    bundle: &Path,
    process: &oci_spec::runtime::Process,
) -> Result<tempfile::TempPath, RuntimeError> {
    let err = |detail: String| RuntimeError::Process {
        path: bundle.to_path_buf(),
        detail,
    };
    let file = tempfile::Builder::new()
        .prefix("exec-")
        .suffix(".json")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(bundle)
        .map_err(|e| err(e.to_string()))?;
    serde_json::to_writer(file.as_file(), process).map_err(|e| err(e.to_string()))?;
    Ok(file.into_temp_path())
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// A container's state as the runtime reports it (OCI `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Being created.
    Creating,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Frozen.
    Paused,
    /// Ended.
    Stopped,
}

impl std::str::FromStr for RunState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "creating" => RunState::Creating,
            "created" => RunState::Created,
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "stopped" => RunState::Stopped,
            other => return Err(format!("unknown status {other:?}")),
        })
    }
}

/// A container's state and init pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerState {
    /// Its status.
    pub status: RunState,
    /// The init's host pid (0 once stopped).
    pub pid: u32,
}

/// Where an attached exec's stdio goes.
#[derive(Debug)]
pub enum ExecIo {
    /// A pty's slave: the process's stdin, stdout, stderr and controlling terminal (the
    /// runtime leads a new session on it, so it gets SIGWINCH and SIGHUP from the master).
    Pty(OwnedFd),
    /// Pipes for stdout and stderr, and for stdin when `stdin` (else /dev/null).
    Pipes {
        /// Whether stdin is a pipe too.
        stdin: bool,
    },
}

/// The OCI runtime as the agent uses it: every verb on a container goes through here, so a
/// runtime feature (a flag, a verb, another runtime) touches one implementation.
#[async_trait::async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// The runtime's name, as shown by `rctl inspect` (`runc`, `crun`, `fake`).
    fn name(&self) -> &str;
    /// Whether a container's spec may carry its seccomp profile compiled ahead
    /// ([`crate::seccomp::Precompiled`]), which the runtime then loads as is.
    fn takes_seccomp_bpf(&self) -> bool {
        false
    }
    /// Creates and starts the container whose bundle is in `dir/bundle` under a shim that
    /// outlives the agent; returns its init pid once running.
    async fn start(&self, id: &str, dir: &Path) -> Result<u32, RuntimeError>;
    /// Creates and starts the container of `bundle` in the foreground, as a child of the
    /// agent: its stdout and stderr are the returned child's pipes, its exit code the
    /// child's. For short-lived containers the agent watches itself (build's RUN); kill
    /// with [`kill`](Self::kill), then [`delete`](Self::delete).
    fn run_attached(&self, id: &str, bundle: &Path) -> Result<tokio::process::Child, RuntimeError>;
    /// Waits for the container to exit and returns its exit code (128+signal if killed).
    async fn wait(&self, id: &str, dir: &Path) -> Result<i32, RuntimeError>;
    /// Sends `signal` (a name: `TERM`, `KILL`) to the container's init.
    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError>;
    /// Runs `cmd` inside the running container whose dir is `dir`, as its own process runs
    /// ([`exec_process`]); returns its exit code and combined output. Killed after `timeout`.
    async fn exec(
        &self,
        id: &str,
        dir: &Path,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<(i32, String), RuntimeError>;
    /// Starts the OCI process in the file `process` (args, user, env, terminal…, see
    /// [`exec_process`]) in the running container with `io` (a terminal or pipes) and returns
    /// the runtime's exec process: it lives as long as the command, forwards signals to it and
    /// exits with its code. The file must stay until the command ends.
    fn exec_attached(
        &self,
        id: &str,
        process: &Path,
        io: ExecIo,
    ) -> Result<tokio::process::Child, RuntimeError>;
    /// Freezes every process of the container.
    async fn pause(&self, id: &str) -> Result<(), RuntimeError>;
    /// Thaws a paused container.
    async fn resume(&self, id: &str) -> Result<(), RuntimeError>;
    /// Removes the runtime's record of a stopped container (idempotent), killing what is
    /// left. The shim normally did it already once the container exited: wait for the shim
    /// in `dir`, if any, then clean up what is left.
    async fn delete(&self, id: &str, dir: &Path) -> Result<(), RuntimeError>;
    /// The ids of the containers the runtime knows.
    async fn list(&self) -> Result<Vec<String>, RuntimeError>;
    /// The container's status and init pid.
    async fn state(&self, id: &str) -> Result<ContainerState, RuntimeError>;
}

/// How long a verb that should take milliseconds (pause, kill, state) may take.
const VERB_TIMEOUT: Duration = Duration::from_secs(10);

/// The [`ContainerRuntime`] that runs an OCI runtime's CLI (`runc`, `crun`) through the
/// shim.
pub struct OciCliRuntime {
    /// The runtime's binary and `--root`, private to this agent.
    pub cli: RuntimeCli,
    /// This agent's executable (the shim binary is looked for next to it).
    pub self_exe: PathBuf,
    /// Read ends of the shims' notification pipes, by container id: EOF means the container
    /// exited and its code is on disk. Gone after an agent restart; `wait` then watches the
    /// shim process instead.
    pub exit_pipes: std::sync::Mutex<std::collections::HashMap<String, std::fs::File>>,
}

impl OciCliRuntime {
    /// A runtime for `cli` (its `--root` is created 0700).
    pub fn new(cli: RuntimeCli) -> Result<Self, RuntimeError> {
        crate::datadir::private_dir(&cli.root).map_err(io("create runtime root"))?;
        let self_exe = std::env::current_exe().map_err(io("find own executable"))?;
        Ok(OciCliRuntime {
            cli,
            self_exe,
            exit_pipes: Default::default(),
        })
    }

    /// Runs `cmd` to its end (at most [`VERB_TIMEOUT`]); its stdout, or its stderr as the
    /// error.
    async fn output(&self, cmd: std::process::Command) -> Result<Vec<u8>, RuntimeError> {
        let shown = shown(&cmd);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        let out = tokio::time::timeout(VERB_TIMEOUT, cmd.output())
            .await
            .map_err(|_| RuntimeError::Timeout {
                cmd: shown.clone(),
                after: VERB_TIMEOUT,
            })?
            .map_err(io("exec runtime"))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(refusal(shown, stderr))
    }
}

/// A refusal as [`RuntimeError::NotFound`] when the container is unknown (runc: "does not
/// exist", crun: "not found", or "error opening file `ROOT/ID/status`: No such file…").
fn refusal(cmd: String, stderr: String) -> RuntimeError {
    if stderr.contains("does not exist")
        || stderr.contains("not found")
        || stderr.contains("/status`: No such file")
    {
        let id = cmd.rsplit(' ').next().unwrap_or_default().to_string();
        return RuntimeError::NotFound(id);
    }
    RuntimeError::Command { cmd, stderr }
}

/// `binary verb args…` without `--root`, for messages.
fn shown(cmd: &std::process::Command) -> String {
    let args: Vec<String> = cmd
        .get_args()
        .skip(2)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!("{} {}", cmd.get_program().to_string_lossy(), args.join(" "))
}

/// Spawns `cmd` on `io`: a pty's slave as its stdio and controlling terminal (it leads a new
/// session), or pipes. Killed when the child is dropped.
pub fn spawn_attached(
    cmd: std::process::Command,
    io: ExecIo,
) -> std::io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let slave = match io {
        ExecIo::Pipes { stdin } => {
            cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            return cmd.spawn();
        }
        ExecIo::Pty(slave) => slave,
    };
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // The process leads a new session whose controlling terminal is the slave, so it
            // gets SIGWINCH when the master is resized, and SIGHUP when the master closes.
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The command holds the slave's copies until it is dropped: the master sees EOF only
    // once every one is closed.
    cmd.spawn()
}

/// Reads the shim's pid from its container dir.
pub fn shim_pid(dir: &Path) -> Option<i32> {
    ContainerDir::new(dir).read_shim_pid()
}

/// The recorded exit code, once the shim wrote it.
pub fn exit_code(dir: &Path) -> Option<i32> {
    ContainerDir::new(dir).read_exit_code()
}

/// Whether the shim saw the container killed by the OOM killer.
pub fn oom_killed(dir: &Path) -> bool {
    ContainerDir::new(dir).oom_killed()
}

/// Whether `pid` is alive and is a shim of the container in `dir` (pids get reused).
pub fn shim_alive(pid: i32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("shim") && c.contains(&*dir.to_string_lossy())
        })
        .unwrap_or(false)
}

#[async_trait::async_trait]
impl ContainerRuntime for OciCliRuntime {
    fn name(&self) -> &str {
        &self.cli.binary
    }

    fn takes_seccomp_bpf(&self) -> bool {
        self.cli.takes_seccomp_bpf()
    }

    async fn start(&self, id: &str, dir: &Path) -> Result<u32, RuntimeError> {
        let (log_max_size, log_max_files) = log_limits(&ContainerDir::new(dir));
        let args = ShimArgs {
            dir: dir.to_path_buf(),
            id: id.to_string(),
            runtime: self.cli.binary.clone(),
            root: self.cli.root.clone(),
            log_max_size,
            log_max_files,
            hide_unified: self.cli.hide_unified,
        };
        let (rd, wr) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io("pipe")(e.into()))?;
        let wr_fd = wr.as_raw_fd();
        // The small `rudder-shim` next to the agent; the agent itself (`rudder-agent shim`)
        // where it is missing.
        let small = self.self_exe.with_file_name("rudder-shim");
        let exe = if small.exists() {
            &small
        } else {
            &self.self_exe
        };
        let mut cmd = std::process::Command::new(exe);
        cmd.args(args.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(wr_fd, NOTIFY_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(io("spawn shim"))?;
        drop(wr);
        // The first shim process exits at once after forking the real shim.
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        let (line, pipe) = tokio::task::spawn_blocking(move || {
            // Byte by byte: nothing after the line may be consumed from the pipe.
            let mut pipe = std::fs::File::from(rd);
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while let Ok(1) = std::io::Read::read(&mut pipe, &mut b) {
                if b[0] == b'\n' {
                    break;
                }
                line.push(b[0]);
            }
            (String::from_utf8_lossy(&line).into_owned(), pipe)
        })
        .await
        .map_err(|e| RuntimeError::Start(e.to_string()))?;
        let line = line.trim();
        if let Some(pid) = line.strip_prefix("ok ") {
            debug!(id, pid, "container running");
            self.exit_pipes
                .lock()
                .expect("exit pipes lock")
                .insert(id.to_string(), pipe);
            return pid
                .parse()
                .map_err(|_| RuntimeError::Start(format!("shim said {line:?}")));
        }
        let msg = line.strip_prefix("err ").unwrap_or(line);
        Err(RuntimeError::Start(if msg.is_empty() {
            "shim exited without a word".into()
        } else {
            msg.to_string()
        }))
    }

    fn run_attached(&self, id: &str, bundle: &Path) -> Result<tokio::process::Child, RuntimeError> {
        let mut cmd = tokio::process::Command::from(self.cli.run_foreground(id, bundle));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("start the runtime"))
    }

    async fn wait(&self, id: &str, dir: &Path) -> Result<i32, RuntimeError> {
        let pipe = self.exit_pipes.lock().expect("exit pipes lock").remove(id);
        if let Some(pipe) = pipe {
            wait_eof(pipe).await;
            if let Some(code) = exit_code(dir) {
                return Ok(code);
            }
        }
        loop {
            if let Some(code) = exit_code(dir) {
                return Ok(code);
            }
            let Some(pid) = shim_pid(dir) else {
                return Err(RuntimeError::Start("no shim for container".into()));
            };
            if !shim_alive(pid, dir) {
                // The shim died without writing an exit code (e.g. killed).
                return exit_code(dir)
                    .ok_or_else(|| RuntimeError::Start("shim died; exit code unknown".into()));
            }
            wait_pid_exit(pid).await;
        }
    }

    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.output(self.cli.kill(id, signal)).await.map(drop)
    }

    async fn exec(
        &self,
        id: &str,
        dir: &Path,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<(i32, String), RuntimeError> {
        let dir = ContainerDir::new(dir);
        let process = exec_process(&dir.config(), cmd, false)?;
        let file = write_process(&dir.bundle(), &process)?;
        run_capped(self.cli.exec(id, &file).into(), timeout).await
    }

    fn exec_attached(
        &self,
        id: &str,
        process: &Path,
        io_: ExecIo,
    ) -> Result<tokio::process::Child, RuntimeError> {
        spawn_attached(self.cli.exec(id, process), io_).map_err(io("start the runtime's exec"))
    }

    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.output(self.cli.pause(id, true)).await.map(drop)
    }

    async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.output(self.cli.pause(id, false)).await.map(drop)
    }

    async fn delete(&self, id: &str, dir: &Path) -> Result<(), RuntimeError> {
        if let Some(pid) = shim_pid(dir).filter(|p| shim_alive(*p, dir)) {
            let _ = tokio::time::timeout(Duration::from_secs(5), wait_pid_exit(pid)).await;
        }
        if !self.cli.root.join(id).exists() {
            return Ok(());
        }
        match self.output(self.cli.delete_force(id)).await {
            Err(RuntimeError::NotFound(_)) => Ok(()),
            r => r.map(drop),
        }
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let out = self.output(self.cli.list()).await?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    async fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        let cmd = self.cli.state(id);
        let shown = shown(&cmd);
        let out = self.output(cmd).await?;
        parse_state(&out).map_err(|detail| RuntimeError::Output { cmd: shown, detail })
    }
}

/// The OCI state JSON's status and pid.
fn parse_state(json: &[u8]) -> Result<ContainerState, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let status = v["status"]
        .as_str()
        .ok_or("no status")?
        .parse::<RunState>()?;
    let pid = v["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0);
    Ok(ContainerState { status, pid })
}

/// Waits until the writer closes `pipe`.
async fn wait_eof(pipe: std::fs::File) {
    let fd: OwnedFd = pipe.into();
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    // SAFETY: the fd is owned by the AsyncFd for its whole registration.
    let Ok(afd) = (unsafe { AsyncFd::register(fd) }) else {
        return;
    };
    let mut buf = [0u8; 64];
    loop {
        let Ok(mut guard) = afd.readable().await else {
            return;
        };
        // SAFETY: read into a stack buffer of the given length.
        let n = unsafe {
            libc::read(
                afd.get_ref().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n == 0 {
            return;
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
            guard.clear_ready();
            continue;
        }
        if n < 0 {
            return;
        }
    }
}

/// Waits until process `pid` exits, without being its parent: a pidfd becomes readable then.
/// Falls back to polling where pidfd_open is unavailable.
async fn wait_pid_exit(pid: i32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd >= 0 {
        // SAFETY: fd was just returned by pidfd_open and is owned here.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the fd is owned by the AsyncFd for its whole registration.
        if let Ok(afd) = unsafe { AsyncFd::register(owned) } {
            let _ = afd.readable().await;
            return;
        }
    }
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Log rotation for the container in `dir`: its service's `logging` settings (from the
/// task written next to the bundle), else the defaults.
fn log_limits(dir: &ContainerDir) -> (u64, u32) {
    let spec = dir
        .read_task()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let get = |k: &str| {
        spec.as_ref()
            .and_then(|t| t["spec"]["logging"][k].as_u64())
            .filter(|v| *v > 0)
    };
    (
        get("max_size").unwrap_or(crate::shim::LOG_MAX_SIZE),
        get("max_file")
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(crate::shim::LOG_MAX_FILES),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_output_keeps_its_first_and_last_bytes() {
        let mut c = Capped::new(8);
        c.push(b"abc");
        assert_eq!(c.text(), "abc");
        c.push(b"defgh");
        assert_eq!(c.text(), "abcdefgh");
        c.push(b"ijklmnopqrstuvwxyz");
        assert_eq!(c.text(), "abcd\n[... 18 bytes left out ...]\nwxyz");
        assert_eq!(c.head.len() + c.tail.len(), 8);
    }

    #[test]
    fn crun_hides_the_unified_hierarchy_only_where_it_holds_a_controller() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        assert_eq!(crun_view(root), CrunView::AsIs, "cgroup v1 only");
        std::fs::create_dir(root.join("unified")).unwrap();
        std::fs::write(root.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        assert_eq!(
            crun_view(root),
            CrunView::HideUnified,
            "hybrid with a v2 controller"
        );
        std::fs::write(root.join("unified/cgroup.controllers"), "\n").unwrap();
        assert_eq!(
            crun_view(root),
            CrunView::AsIs,
            "hybrid, empty unified hierarchy"
        );
        std::fs::write(root.join("cgroup.controllers"), "cpu memory\n").unwrap();
        assert_eq!(crun_view(root), CrunView::AsIs, "pure v2");
        // Whatever the host, runc never hides anything.
        assert!(!pick_runtime("runc", "/r").hide_unified);
    }

    #[test]
    fn states_and_refusals_are_typed() {
        let s = parse_state(br#"{"ociVersion":"1.0.2","id":"a","status":"paused","pid":42}"#);
        assert_eq!(
            s,
            Ok(ContainerState {
                status: RunState::Paused,
                pid: 42
            })
        );
        assert!(parse_state(br#"{"status":"dancing"}"#).is_err());
        assert!(matches!(
            refusal("runc kill abc".into(), "container does not exist".into()),
            RuntimeError::NotFound(id) if id == "abc"
        ));
        assert!(matches!(
            refusal("runc pause abc".into(), "cgroup frozen".into()),
            RuntimeError::Command { .. }
        ));
    }

    /// A stand-in runtime binary that logs its argv and answers `list` and `state`.
    fn script_runtime(dir: &Path) -> OciCliRuntime {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("fake-runc");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\necho \"$@\" >> {log}\ncase \"$3\" in\n\
                 list) printf 'a\\nb\\n';;\n\
                 state) echo '{{\"status\":\"running\",\"pid\":7}}';;\n\
                 pause) echo 'container does not exist' >&2; exit 1;;\n\
                 esac\n",
                log = dir.join("argv").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        OciCliRuntime {
            cli: RuntimeCli::new(bin.display().to_string(), dir.join("root")),
            self_exe: "/bin/false".into(),
            exit_pipes: Default::default(),
        }
    }

    #[tokio::test]
    async fn the_cli_runtime_speaks_through_the_shared_argv_builder() {
        let t = tempfile::tempdir().unwrap();
        let rt = script_runtime(t.path());
        assert_eq!(rt.list().await.unwrap(), ["a", "b"]);
        assert_eq!(
            rt.state("a").await.unwrap(),
            ContainerState {
                status: RunState::Running,
                pid: 7
            }
        );
        rt.kill("a", "TERM").await.unwrap();
        rt.resume("a").await.unwrap();
        assert!(matches!(
            rt.pause("a").await,
            Err(RuntimeError::NotFound(_))
        ));
        // exec states the container's process in full: its user and env, our argv.
        let dir = ContainerDir::new(t.path().join("c"));
        std::fs::create_dir_all(dir.bundle()).unwrap();
        std::fs::write(
            dir.config(),
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":1000,"gid":1000},
                "cwd":"/srv","env":["PATH=/bin","A=b"],"args":["sleep","1"]}}"#,
        )
        .unwrap();
        let (code, out) = rt
            .exec("a", dir.path(), &["ls".into()], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((code, out.as_str()), (0, ""));
        let p = exec_process(&dir.config(), &["sh".into()], true).unwrap();
        assert_eq!(p.args().as_deref(), Some(&["sh".to_string()][..]));
        assert_eq!(
            (p.user().uid(), p.cwd().display().to_string()),
            (1000, "/srv".into())
        );
        assert_eq!(
            p.env().as_deref(),
            Some(&["PATH=/bin".to_string(), "A=b".into(), "TERM=xterm".into()][..])
        );
        assert_eq!(p.terminal(), Some(true));
        let root = t.path().join("root").display().to_string();
        let argv = std::fs::read_to_string(t.path().join("argv")).unwrap();
        let want: Vec<String> = [
            "list --quiet",
            "state a",
            "kill a TERM",
            "resume a",
            "pause a",
        ]
        .iter()
        .map(|v| format!("--root {root} {v}"))
        .collect();
        let lines: Vec<&str> = argv.lines().collect();
        assert_eq!(lines[..5], want);
        let exec = format!("--root {root} exec --process {}", dir.bundle().display());
        assert!(
            lines[5].starts_with(&exec) && lines[5].ends_with(".json a"),
            "{}",
            lines[5]
        );
        // The process file lived only as long as the exec.
        assert_eq!(std::fs::read_dir(dir.bundle()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn a_health_check_that_prints_without_end_is_bounded() {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args([
            "-c",
            "head -c 50000000 /dev/zero | tr '\\0' x; echo; echo oops >&2; exit 3",
        ]);
        let (code, text) = run_capped(cmd, Duration::from_secs(60)).await.unwrap();
        assert_eq!(code, 3);
        assert!(text.len() < 2 * EXEC_OUTPUT_MAX + 200, "{}", text.len());
        assert!(text.starts_with("xxxx"), "{text:.20}");
        assert!(text.contains("bytes left out"));
        assert!(text.ends_with("x\noops\n"), "{}", &text[text.len() - 20..]);
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("10");
        let (code, text) = run_capped(cmd, Duration::from_millis(200)).await.unwrap();
        assert_eq!((code, text.as_str()), (-1, "timed out after 200ms"));
    }
}

//! `rctl exec` on the host: runs a command in a running container through the OCI runtime's
//! `exec`, streaming stdin in and stdout/stderr out, and ends with the command's exit code.
//! Also this host's view of a container for `rctl inspect`.
//!
//! With a terminal, the agent opens a pty pair and runs `runc exec --tty` with the pty's slave
//! as runc's stdin, stdout, stderr and controlling terminal (runc then makes a pty inside the
//! container, puts ours in raw mode and copies between the two): the command gets a real
//! controlling terminal, so ^C, job control and resizes (SIGWINCH, which runc forwards) work.
//! Without one, plain pipes.
//!
//! Invariants: every fd the agent opens for a session is close-on-exec (the agent forks shims
//! and health checks concurrently, and a leaked pty slave would keep a session from ever
//! seeing EOF); a caller that goes away ends the command (SIGHUP with a terminal, SIGTERM
//! otherwise, both forwarded by runc; SIGKILL to runc after a grace period); the exit code is
//! always the last output.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use rudder_proto::v1::exec_input::Msg as In;
use rudder_proto::v1::exec_output::Msg as Out;
use rudder_proto::v1::{ContainerInfo, ExecInput, ExecOutput, ExecStart, TerminalSize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Response, Status};
use tracing::{debug, info, warn};

use crate::runtime::{ContainerRuntime, ExecIo, RuntimeError};
use crate::shim::ContainerDir;

/// How long a command may take to end after its caller went away before runc is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);
/// How long output still in flight is drained after the command exited (a background process
/// that inherited stdout may hold it open forever).
const DRAIN: Duration = Duration::from_secs(2);

/// Why exec, cp, commit or inspect cannot reach a container (mapped to a gRPC status only at
/// the API edge, `crate::api`).
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("bad task id")]
    BadId,
    #[error("task {0} has no container on this host")]
    NoContainer(String),
    #[error("task {0} is not running")]
    NotRunning(String),
    #[error("task {task}: cannot pause its container ({err}); --pause=false commits it running")]
    Pause { task: String, err: RuntimeError },
    #[error("task {task}: cannot resume its container: {err}")]
    Resume { task: String, err: RuntimeError },
    #[error("exec: the first message must name the task and the command")]
    NoStart,
    #[error("exec: no command given")]
    NoCommand,
    #[error("exec: --user is longer than {MAX_USER} bytes")]
    UserTooLong,
    #[error("exec: --env {0}")]
    Env(String),
    #[error("exec: --workdir {0}")]
    Workdir(String),
    #[error("exec: {0}")]
    User(#[from] crate::user::UserError),
    #[error("exec: {what} of task {task}: {detail}")]
    Internal {
        what: &'static str,
        task: String,
        detail: String,
    },
    #[error("exec: starting {runtime}: {err}")]
    Start { runtime: String, err: RuntimeError },
    /// The caller's stream failed before the exec started.
    #[error("exec: {0}")]
    Input(String),
}

/// What exec, cp and inspect need to reach this host's containers.
#[derive(Clone)]
pub struct ContainerAccess {
    /// `<data>/containers`: one directory per task id (shim files, bundle).
    pub containers: PathBuf,
    /// The OCI runtime, the same the worker starts containers with.
    pub runtime: Arc<dyn ContainerRuntime>,
    /// This agent's executable, re-run as `fs-helper`.
    pub agent_exe: PathBuf,
}

impl ContainerAccess {
    /// The container directory of task `id`, which must exist.
    pub fn dir(&self, id: &str) -> Result<ContainerDir, AccessError> {
        if id.is_empty() || id.contains('/') || id.contains("..") {
            return Err(AccessError::BadId);
        }
        let dir = self.containers.join(id);
        if !dir.is_dir() {
            return Err(AccessError::NoContainer(id.into()));
        }
        Ok(ContainerDir::new(dir))
    }

    /// The host pid of task `id`'s container init, while it runs.
    pub fn running_pid(&self, id: &str) -> Result<u32, AccessError> {
        let dir = self.dir(id)?;
        let not_running = || AccessError::NotRunning(id.into());
        if dir.has_exited() {
            return Err(not_running());
        }
        let pid = dir.read_pid().ok_or_else(not_running)?;
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(not_running());
        }
        Ok(pid)
    }

    /// Freezes (`freeze`) or thaws task `id`'s running container (the runtime's pause and
    /// resume). While it may be frozen, the dir's paused marker tells the health monitor to
    /// wait; a thaw removes it whatever the outcome (a container left frozen then fails its
    /// checks and is replaced, rather than hang unnoticed).
    pub async fn pause(&self, id: &str, freeze: bool) -> Result<(), AccessError> {
        let marker = self.dir(id)?.paused_marker();
        if freeze {
            std::fs::write(&marker, b"").map_err(|e| AccessError::Internal {
                what: "marking it paused",
                task: id.into(),
                detail: e.to_string(),
            })?;
        }
        let done = if freeze {
            self.runtime.pause(id).await
        } else {
            self.runtime.resume(id).await
        };
        if !freeze {
            let _ = std::fs::remove_file(&marker);
        }
        done.map_err(|err| {
            warn!(task = id, freeze, %err, "runtime refused");
            let task = id.to_string();
            if freeze {
                AccessError::Pause { task, err }
            } else {
                AccessError::Resume { task, err }
            }
        })
    }

    /// What this host knows of task `id`'s container.
    pub fn info(&self, id: &str) -> Result<ContainerInfo, AccessError> {
        let dir = self.dir(id)?;
        let exit = dir.read_exit_code();
        let pid = dir.read_pid().unwrap_or(0);
        let shim_pid = dir
            .read_shim_pid()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        let running = exit.is_none() && pid > 0 && Path::new(&format!("/proc/{pid}")).exists();
        Ok(ContainerInfo {
            running,
            pid,
            shim_pid,
            has_exit_code: exit.is_some(),
            exit_code: exit.unwrap_or(0),
            dir: dir.path().display().to_string(),
            rootfs: dir.rootfs().display().to_string(),
            bundle: dir.bundle().display().to_string(),
            log_path: dir.log().display().to_string(),
            runtime: self.runtime.name().to_string(),
            container_id: id.to_string(),
        })
    }
}

pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecOutput, Status>> + Send>>;

/// The session's stdio on the agent's side.
pub(crate) enum Stdio3 {
    Pty(Arc<AsyncFd<OwnedFd>>),
    Pipes {
        stdin: Option<tokio::process::ChildStdin>,
        stdout: tokio::process::ChildStdout,
        stderr: tokio::process::ChildStderr,
    },
}

/// Serves one exec: the first input must start it; the command runs until it exits or the
/// caller goes away.
pub async fn exec<S>(
    access: &ContainerAccess,
    mut input: S,
) -> Result<Response<ExecStream>, AccessError>
where
    S: Stream<Item = Result<ExecInput, Status>> + Unpin + Send + 'static,
{
    let start = match input.next().await {
        Some(Ok(ExecInput {
            msg: Some(In::Start(s)),
        })) => s,
        Some(Err(e)) => return Err(AccessError::Input(e.message().to_string())),
        _ => return Err(AccessError::NoStart),
    };
    if start.cmd.is_empty() || start.cmd[0].is_empty() {
        return Err(AccessError::NoCommand);
    }
    access.running_pid(&start.task)?;
    let process = process_file(access, &start)?;
    let (child, stdio) = spawn(access, &start, &process).map_err(|err| AccessError::Start {
        runtime: access.runtime.name().to_string(),
        err,
    })?;
    info!(task = %start.task, cmd = ?start.cmd, tty = start.tty, user = %start.user, "exec");
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        session(child, stdio, input, tx).await;
        // The runtime read the process file when it started; it goes with the session.
        drop(process);
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

/// The longest `--user` taken.
const MAX_USER: usize = 256;

/// The process `start` runs, written to a 0600 file in the container's bundle for the
/// runtime's `exec --process`: the task's own process (from its bundle: user, env, cwd,
/// capabilities) with `start`'s command and terminal ([`crate::runtime::exec_process`]), and
/// with `--user`, that user instead (resolved in the container's own /etc/passwd and
/// /etc/group, with its supplementary groups, as `docker exec --user`; HOME follows the user
/// unless the service sets it).
fn process_file(
    access: &ContainerAccess,
    start: &ExecStart,
) -> Result<tempfile::TempPath, AccessError> {
    if start.user.len() > MAX_USER {
        return Err(AccessError::UserTooLong);
    }
    let dir = access.dir(&start.task)?;
    let internal = |what: &'static str, e: &dyn std::fmt::Display| AccessError::Internal {
        what,
        task: start.task.clone(),
        detail: e.to_string(),
    };
    let mut process = crate::runtime::exec_process(&dir.config(), &start.cmd, start.tty)
        .map_err(|e| internal("reading the bundle", &e))?;
    if !start.user.is_empty() {
        as_user(&dir, &mut process, &start.user)?;
    }
    with_overrides(&mut process, &start.env, &start.workdir)?;
    crate::runtime::write_process(&dir.bundle(), &process)
        .map_err(|e| internal("writing the process file", &e))
}

/// At most this many `--env` entries, each at most [`MAX_ENV_ENTRY`] bytes.
const MAX_ENV: usize = 256;
const MAX_ENV_ENTRY: usize = 32 * 1024;
/// `--workdir` at most this long (PATH_MAX).
const MAX_WORKDIR: usize = 4096;

/// `process` with `env` (`KEY=VALUE`, replacing the task's value of KEY) and `workdir`
/// (absolute; empty: unchanged), as `docker exec --env/--workdir`. Bad entries are refused,
/// named, before anything runs.
fn with_overrides(
    process: &mut oci_spec::runtime::Process,
    env: &[String],
    workdir: &str,
) -> Result<(), AccessError> {
    if env.len() > MAX_ENV {
        return Err(AccessError::Env(format!(
            "has {} entries; at most {MAX_ENV}",
            env.len()
        )));
    }
    let mut vars: Vec<String> = process.env().clone().unwrap_or_default();
    for e in env {
        let shown: String = e.chars().take(40).collect();
        if e.len() > MAX_ENV_ENTRY {
            return Err(AccessError::Env(format!(
                "{shown}…: longer than {MAX_ENV_ENTRY} bytes"
            )));
        }
        let Some((key, _)) = e.split_once('=') else {
            return Err(AccessError::Env(format!("{shown:?}: expected KEY=VALUE")));
        };
        if key.is_empty() || e.contains('\0') {
            return Err(AccessError::Env(format!(
                "{shown:?}: the name must be non-empty and nothing may hold a NUL"
            )));
        }
        let prefix = format!("{key}=");
        vars.retain(|v| !v.starts_with(&prefix));
        vars.push(e.clone());
    }
    process.set_env(Some(vars));
    if !workdir.is_empty() {
        if workdir.len() > MAX_WORKDIR || !workdir.starts_with('/') || workdir.contains('\0') {
            return Err(AccessError::Workdir(format!(
                "{:?}: must be an absolute path of at most {MAX_WORKDIR} bytes",
                workdir.chars().take(40).collect::<String>()
            )));
        }
        process.set_cwd(workdir.into());
    }
    Ok(())
}

/// `process` run as `user` (`user[:group]`) of the container's own files.
fn as_user(
    dir: &ContainerDir,
    process: &mut oci_spec::runtime::Process,
    user: &str,
) -> Result<(), AccessError> {
    let eu = crate::user::resolve_in_rootfs(&dir.rootfs(), user)?;
    let service_home =
        crate::task_record::task_of(dir).is_some_and(|t| t.spec.env.contains_key("HOME"));
    let mut env: Vec<String> = process.env().clone().unwrap_or_default();
    if !service_home {
        env.retain(|e| !e.starts_with("HOME="));
        env.push(format!("HOME={}", eu.home));
    }
    let mut u = process.user().clone();
    u.set_uid(eu.uid)
        .set_gid(eu.gid)
        .set_additional_gids(Some(eu.additional_gids(&[])));
    process.set_env(Some(env)).set_user(u);
    Ok(())
}

/// Starts the runtime's exec of the process file `process` for `start`, on a pty or on pipes.
fn spawn(
    access: &ContainerAccess,
    start: &ExecStart,
    process: &Path,
) -> Result<(tokio::process::Child, Stdio3), RuntimeError> {
    let size = start.size.unwrap_or(TerminalSize { rows: 24, cols: 80 });
    spawn_on(
        access.runtime.as_ref(),
        &start.task,
        process,
        start.tty.then_some(size),
        start.stdin,
    )
}

/// Starts `process` in container `id` on a new pty of `size` (the runtime's exec leads a
/// session on it), or on pipes (stdin only when `stdin`).
fn spawn_on(
    rt: &dyn ContainerRuntime,
    id: &str,
    process: &Path,
    tty: Option<TerminalSize>,
    stdin: bool,
) -> Result<(tokio::process::Child, Stdio3), RuntimeError> {
    let pty_err = |err| RuntimeError::Io {
        op: "open a terminal",
        err,
    };
    let Some(size) = tty else {
        let mut child = rt.exec_attached(id, process, ExecIo::Pipes { stdin })?;
        let stdio = Stdio3::Pipes {
            stdin: child.stdin.take(),
            stdout: child.stdout.take().expect("piped stdout"),
            stderr: child.stderr.take().expect("piped stderr"),
        };
        return Ok((child, stdio));
    };
    let (master, slave) = open_pty(size).map_err(pty_err)?;
    let child = rt.exec_attached(id, process, ExecIo::Pty(slave))?;
    // SAFETY: the fd is owned by the AsyncFd for its whole registration.
    let master = unsafe { AsyncFd::register(master) }
        .map_err(|e| pty_err(std::io::Error::other(e.to_string())))?;
    Ok((child, Stdio3::Pty(Arc::new(master))))
}

/// A pty pair, both ends close-on-exec, the slave raw, the master non-blocking, with the
/// given size.
fn open_pty(size: TerminalSize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    // SAFETY: the raw fd was just released by `master`, which owned it.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // Raw from the start: runc makes it raw too, but only once the command already runs,
    // and its first output would be translated twice (`\r\r\n`) meanwhile.
    let mut t = nix::sys::termios::tcgetattr(&slave)?;
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &t)?;
    let flags = nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_GETFL)?;
    nix::fcntl::fcntl(
        &master,
        nix::fcntl::FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )?;
    resize(&master, size);
    Ok((master, slave))
}

/// Sets the terminal size (the kernel signals the session's foreground group).
fn resize(master: &impl AsRawFd, size: TerminalSize) {
    let ws = libc::winsize {
        ws_row: size.rows.clamp(1, u16::MAX as u32) as u16,
        ws_col: size.cols.clamp(1, u16::MAX as u32) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which outlives the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

type OutTx = mpsc::Sender<Result<ExecOutput, Status>>;

fn out(msg: Out) -> Result<ExecOutput, Status> {
    Ok(ExecOutput { msg: Some(msg) })
}

/// Runs one exec session to its end; the last output is the exit code.
async fn session<S>(mut child: tokio::process::Child, stdio: Stdio3, mut input: S, tx: OutTx)
where
    S: Stream<Item = Result<ExecInput, Status>> + Unpin + Send + 'static,
{
    let tty = matches!(stdio, Stdio3::Pty(_));
    let mut readers = tokio::task::JoinSet::new();
    let mut writer = None;
    let (stdin_tx, mut stdin_rx) = mpsc::channel::<Vec<u8>>(8);
    let master = match stdio {
        Stdio3::Pty(master) => {
            readers.spawn(read_pty(master.clone(), tx.clone()));
            let m = master.clone();
            writer = Some(tokio::spawn(async move {
                while let Some(data) = stdin_rx.recv().await {
                    if write_pty(&m, &data).await.is_err() {
                        break;
                    }
                }
            }));
            Some(master)
        }
        Stdio3::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            readers.spawn(read_pipe(stdout, tx.clone(), Out::Stdout));
            readers.spawn(read_pipe(stderr, tx.clone(), Out::Stderr));
            if let Some(mut stdin) = stdin {
                writer = Some(tokio::spawn(async move {
                    while let Some(data) = stdin_rx.recv().await {
                        if stdin.write_all(&data).await.is_err() {
                            break;
                        }
                    }
                    // Dropping stdin closes the pipe: the command reads EOF.
                }));
            }
            None
        }
    };
    // The caller's inputs; `gone` fires when its stream breaks.
    let (gone_tx, mut gone_rx) = tokio::sync::oneshot::channel::<()>();
    let pump = tokio::spawn(async move {
        let mut stdin_tx = Some(stdin_tx);
        while let Some(msg) = input.next().await {
            match msg.map(|m| m.msg) {
                Ok(Some(In::Stdin(data))) => {
                    if let Some(t) = &stdin_tx {
                        let _ = t.send(data).await;
                    }
                }
                Ok(Some(In::CloseStdin(_))) => {
                    // On a terminal, end of input is ^D; on a pipe, closing it.
                    if let (true, Some(t)) = (tty, &stdin_tx) {
                        let _ = t.send(vec![4]).await;
                    }
                    if !tty {
                        stdin_tx = None;
                    }
                }
                Ok(Some(In::Resize(size))) => {
                    if let Some(m) = &master {
                        resize(m.get_ref(), size);
                    }
                }
                Ok(Some(In::Start(_)) | None) => {}
                Err(_) => {
                    let _ = gone_tx.send(());
                    return;
                }
            }
        }
        // The caller finished sending (it may still read): a pipe's stdin ends here; a
        // terminal stays as it is.
        drop(stdin_tx);
        std::future::pending::<()>().await;
    });
    let pid = child.id();
    let status = tokio::select! {
        s = child.wait() => s,
        _ = &mut gone_rx => terminate(&mut child, pid, tty).await,
        _ = tx.closed() => terminate(&mut child, pid, tty).await,
    };
    pump.abort();
    if let Some(w) = writer {
        w.abort();
    }
    let code = match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(e) => {
            let _ = tx
                .send(Err(Status::internal(format!("exec: waiting: {e}"))))
                .await;
            return;
        }
    };
    let _ = tokio::time::timeout(DRAIN, async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    readers.abort_all();
    debug!(code, "exec done");
    let _ = tx.send(out(Out::ExitCode(code))).await;
}

/// Ends a session whose caller went away: a hangup (terminal) or SIGTERM, which runc
/// forwards to the command; SIGKILL to runc if that is not enough.
async fn terminate(
    child: &mut tokio::process::Child,
    pid: Option<u32>,
    tty: bool,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(pid) = pid {
        let sig = if tty { libc::SIGHUP } else { libc::SIGTERM };
        // SAFETY: kill with a pid of our own unreaped child and a signal number.
        unsafe { libc::kill(pid as i32, sig) };
    }
    match tokio::time::timeout(TERMINATE_GRACE, child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            let _ = child.kill().await;
            child.wait().await
        }
    }
}

async fn read_pipe(mut r: impl AsyncRead + Unpin, tx: OutTx, kind: fn(Vec<u8>) -> Out) {
    let mut buf = vec![0u8; 32 * 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 || tx.send(out(kind(buf[..n].to_vec()))).await.is_err() {
            break;
        }
    }
}

async fn read_pty(master: Arc<AsyncFd<OwnedFd>>, tx: OutTx) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let Ok(mut guard) = master.readable().await else {
            return;
        };
        match guard.try_io(|fd| Ok(nix::unistd::read(fd.get_ref().as_fd(), &mut buf)?)) {
            // EIO: every slave copy is closed (runc exited).
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                if tx.send(out(Out::Stdout(buf[..n].to_vec()))).await.is_err() {
                    return;
                }
            }
            Err(_would_block) => continue,
        }
    }
}

async fn write_pty(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|fd| Ok(nix::unistd::write(fd.get_ref(), data)?)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_workdir_override_the_tasks_and_bad_ones_are_refused_by_name() {
        let mut p = oci_spec::runtime::Process::default();
        p.set_env(Some(vec!["PATH=/bin".into(), "A=1".into()]));
        p.set_cwd("/srv".into());
        with_overrides(&mut p, &["A=2".into(), "B=x=y".into()], "/tmp").unwrap();
        assert_eq!(
            p.env().clone().unwrap(),
            ["PATH=/bin", "A=2", "B=x=y"],
            "KEY replaced, a value may hold '='"
        );
        assert_eq!(p.cwd(), std::path::Path::new("/tmp"));
        // Nothing given: unchanged.
        let before = p.clone();
        with_overrides(&mut p, &[], "").unwrap();
        assert_eq!(p, before);

        let refused = |env: &[&str], dir: &str| {
            let env: Vec<String> = env.iter().map(|e| e.to_string()).collect();
            with_overrides(&mut p.clone(), &env, dir)
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&["NOVALUE"], "").contains("--env \"NOVALUE\": expected KEY=VALUE"));
        assert!(refused(&["=v"], "").contains("--env"));
        assert!(refused(&["A=b\0c"], "").contains("NUL"));
        let long = format!("A={}", "x".repeat(MAX_ENV_ENTRY));
        assert!(refused(&[long.as_str()], "").contains("longer than"));
        let many: Vec<String> = (0..=MAX_ENV).map(|i| format!("K{i}=v")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(refused(&many, "").contains("at most 256"));
        assert!(refused(&[], "relative").contains("--workdir \"relative\""));
        assert!(refused(&[], &format!("/{}", "d".repeat(MAX_WORKDIR))).contains("--workdir"));
    }

    fn start_input() -> ExecInput {
        ExecInput {
            msg: Some(In::Start(ExecStart::default())),
        }
    }

    /// A process file running `argv` (on a terminal when `tty`), as the fake runtime reads it.
    fn fake_process(argv: &[&str], tty: bool) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let p = serde_json::json!({"args": argv, "terminal": tty});
        std::fs::write(f.path(), p.to_string()).unwrap();
        f
    }

    /// Runs `sh -c script` through a session fed `inputs`; returns (stdout, stderr, code).
    async fn run(script: &str, tty: bool, inputs: Vec<In>) -> (Vec<u8>, Vec<u8>, i32) {
        let rt = crate::runtime::fake::FakeRuntime::new();
        let size = TerminalSize {
            rows: 33,
            cols: 101,
        };
        let process = fake_process(&["sh", "-c", script], tty);
        let (child, stdio) = spawn_on(&rt, "t", process.path(), tty.then_some(size), true).unwrap();
        assert_eq!(rt.verbs(), ["exec_attached"]);
        let (in_tx, in_rx) = mpsc::channel(8);
        for i in inputs {
            in_tx.send(Ok(ExecInput { msg: Some(i) })).await.unwrap();
        }
        let (tx, mut rx) = mpsc::channel(16);
        let input = tokio_stream::wrappers::ReceiverStream::new(in_rx);
        tokio::spawn(session(child, stdio, input, tx));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = loop {
            match rx.recv().await.expect("an exit code").unwrap().msg.unwrap() {
                Out::Stdout(b) => out.extend(b),
                Out::Stderr(b) => err.extend(b),
                Out::ExitCode(c) => break c,
            }
        };
        drop(in_tx);
        (out, err, code)
    }

    #[test]
    fn exec_user_is_resolved_in_the_container() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("containers").join("abc");
        let c = ContainerDir::new(&dir);
        let rootfs = c.rootfs();
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/home/nobody:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(rootfs.join("etc/group"), "audio:x:29:nobody\n").unwrap();
        let process = oci_spec::runtime::ProcessBuilder::default()
            .args(vec!["sleep".to_string()])
            .env(vec!["PATH=/bin".to_string(), "HOME=/root".to_string()])
            .cwd("/srv")
            .build()
            .unwrap();
        let mut spec = oci_spec::runtime::Spec::default();
        spec.set_process(Some(process));
        spec.save(c.config()).unwrap();
        let access = ContainerAccess {
            containers: t.path().join("containers"),
            runtime: Arc::new(crate::runtime::fake::FakeRuntime::new()),
            agent_exe: "/bin/false".into(),
        };
        let start = ExecStart {
            task: "abc".into(),
            cmd: vec!["id".into(), "-u".into()],
            tty: true,
            user: "nobody".into(),
            ..Default::default()
        };
        let file = process_file(&access, &start).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let p: oci_spec::runtime::Process =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(p.user().uid(), 65534);
        assert_eq!(p.user().gid(), 65534);
        assert_eq!(p.user().additional_gids().clone(), Some(vec![29]));
        assert_eq!(p.args().clone().unwrap(), vec!["id", "-u"]);
        assert_eq!(p.terminal(), Some(true));
        assert_eq!(p.cwd(), &PathBuf::from("/srv"));
        let env = p.env().clone().unwrap();
        assert!(env.contains(&"HOME=/home/nobody".to_string()), "{env:?}");
        assert!(env.contains(&"TERM=xterm".to_string()), "{env:?}");
        // Without --user: the task's own user, env and cwd, with our command.
        let own = ExecStart {
            user: String::new(),
            tty: false,
            ..start.clone()
        };
        let p: oci_spec::runtime::Process =
            serde_json::from_slice(&std::fs::read(process_file(&access, &own).unwrap()).unwrap())
                .unwrap();
        assert_eq!(p.user().uid(), 0);
        assert_eq!(p.args().clone().unwrap(), vec!["id", "-u"]);
        assert_eq!(p.cwd(), &PathBuf::from("/srv"));
        assert_eq!(p.env().clone().unwrap(), ["PATH=/bin", "HOME=/root"]);
        let user = |u: &str| ExecStart {
            user: u.into(),
            ..start.clone()
        };
        let e = process_file(&access, &user("nosuch")).unwrap_err();
        assert!(matches!(e, AccessError::User(_)), "{e:?}");
        assert!(e.to_string().contains("unable to find user nosuch"), "{e}");
        let e = process_file(&access, &user(&"x".repeat(300))).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }

    #[tokio::test]
    async fn pause_goes_through_the_runtime_and_marks_the_container() {
        use crate::runtime::fake::FakeRuntime;
        let t = tempfile::tempdir().unwrap();
        let rt = Arc::new(FakeRuntime::new());
        let access = ContainerAccess {
            containers: t.path().to_path_buf(),
            runtime: rt.clone(),
            agent_exe: "/bin/false".into(),
        };
        assert!(matches!(access.dir("../x"), Err(AccessError::BadId)));
        assert!(matches!(access.dir("t1"), Err(AccessError::NoContainer(_))));
        std::fs::create_dir(t.path().join("t1")).unwrap();
        let c = access.dir("t1").unwrap();
        assert!(matches!(
            access.running_pid("t1"),
            Err(AccessError::NotRunning(_))
        ));
        rt.start("t1", c.path()).await.unwrap();
        access.pause("t1", true).await.unwrap();
        assert!(
            c.paused_marker().exists(),
            "health checks wait while frozen"
        );
        rt.fail_next("resume", "cgroup gone");
        let e = access.pause("t1", false).await.unwrap_err();
        assert!(matches!(e, AccessError::Resume { .. }), "{e:?}");
        assert!(e.to_string().contains("cgroup gone"), "{e}");
        assert!(
            !c.paused_marker().exists(),
            "a thaw clears the marker whatever happens"
        );
        rt.fail_next("pause", "no freezer");
        let e = access.pause("t1", true).await.unwrap_err();
        assert!(e.to_string().contains("--pause=false"), "{e}");
        assert_eq!(rt.verbs(), ["start", "pause", "resume", "pause"]);
        let info = access.info("t1").unwrap();
        assert_eq!(info.runtime, "fake");
        assert!(!info.running);
    }

    #[tokio::test]
    async fn pipes_carry_stdin_stdout_stderr_and_the_exit_code() {
        let (out, err, code) = run(
            "cat; echo oops >&2; exit 3",
            false,
            vec![
                In::Stdin(b"hello ".to_vec()),
                In::Stdin(b"world".to_vec()),
                In::CloseStdin(true),
            ],
        )
        .await;
        assert_eq!(out, b"hello world");
        assert_eq!(err, b"oops\n");
        assert_eq!(code, 3);
        let (_, _, code) = run("kill -9 $$", false, vec![]).await;
        assert_eq!(code, 128 + 9);
    }

    #[tokio::test]
    async fn a_terminal_has_its_size_and_is_the_controlling_one() {
        let (out, _, _) = run("stty size", true, vec![]).await;
        assert_eq!(String::from_utf8_lossy(&out).trim(), "33 101");
        // Inputs apply in order: the resize before the line is read.
        let (out, _, code) = run(
            "read line; stty size; echo got $line; exec 3</dev/tty && exit 5",
            true,
            vec![
                In::Resize(TerminalSize {
                    rows: 40,
                    cols: 120,
                }),
                In::Stdin(b"abc\n".to_vec()),
            ],
        )
        .await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("40 120\ngot abc"), "{out:?}");
        // /dev/tty opens only for a process with a controlling terminal.
        assert_eq!(code, 5, "{out:?}");
        // A start message later on is ignored; a caller that goes away ends the command.
        let rt = crate::runtime::fake::FakeRuntime::new();
        let process = fake_process(&["sleep", "100"], false);
        let (child, stdio) = spawn_on(&rt, "t", process.path(), None, true).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let input = futures::stream::iter(vec![
            Ok(start_input()),
            Err(Status::cancelled("caller gone")),
        ]);
        tokio::spawn(session(child, stdio, input, tx));
        let code = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Out::ExitCode(c) = rx.recv().await.unwrap().unwrap().msg.unwrap() {
                    return c;
                }
            }
        })
        .await
        .expect("the command ended");
        assert_eq!(code, 128 + libc::SIGTERM);
    }
}

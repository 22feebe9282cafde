//! Container runtime seam. `OciCliRuntime` drives an OCI runtime CLI (runc, or crun where the
//! host allows it) through one shim per container; tests of pure logic can use a fake.
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

use crate::shim::{ShimArgs, NOTIFY_FD};

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

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runtime: {0}")]
    Start(String),
    #[error("runtime: {op}: {err}")]
    Io {
        op: &'static str,
        err: std::io::Error,
    },
    #[error("runtime: {cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> RuntimeError {
    move |err| RuntimeError::Io { op, err }
}

/// Which OCI runtime binary to use. crun is faster, but Debian's crun refuses hybrid cgroup
/// hosts ("cgroups in hybrid mode not supported"), so `auto` takes crun only on a pure cgroup v2
/// host where it is installed.
pub fn pick_runtime(choice: &str) -> String {
    match choice {
        "auto" => {
            let pure_v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
            if pure_v2 && which("crun") {
                "crun".into()
            } else {
                "runc".into()
            }
        }
        other => other.into(),
    }
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

#[async_trait::async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Starts the container whose bundle is in `dir/bundle`; returns its init pid once running.
    async fn start(&self, id: &str, dir: &Path) -> Result<u32, RuntimeError>;
    /// Waits for the container to exit and returns its exit code (128+signal if killed).
    async fn wait(&self, id: &str, dir: &Path) -> Result<i32, RuntimeError>;
    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError>;
    /// Runs `cmd` inside the running container; returns its exit code and combined output.
    /// Killed after `timeout`.
    async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<(i32, String), RuntimeError>;
    /// Removes the runtime's record of a stopped container (idempotent). The shim normally did
    /// it already once the container exited: wait for the shim, then clean up what is left.
    async fn delete(&self, id: &str, dir: &Path) -> Result<(), RuntimeError>;
}

pub struct OciCliRuntime {
    /// Binary name or path (`runc`, `crun`).
    pub binary: String,
    /// The runtime's `--root` state dir, private to this agent.
    pub root: PathBuf,
    /// This agent's executable (the shim binary is looked for next to it).
    pub self_exe: PathBuf,
    /// Read ends of the shims' notification pipes, by container id: EOF means the container
    /// exited and its code is on disk. Gone after an agent restart; `wait` then watches the
    /// shim process instead.
    pub exit_pipes: std::sync::Mutex<std::collections::HashMap<String, std::fs::File>>,
}

impl OciCliRuntime {
    pub fn new(binary: String, root: PathBuf) -> Result<Self, RuntimeError> {
        crate::datadir::private_dir(&root).map_err(io("create runtime root"))?;
        let self_exe = std::env::current_exe().map_err(io("find own executable"))?;
        Ok(OciCliRuntime {
            binary,
            root,
            self_exe,
            exit_pipes: Default::default(),
        })
    }

    async fn cli(&self, args: &[&str]) -> Result<(), RuntimeError> {
        let out = tokio::process::Command::new(&self.binary)
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io("exec runtime"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(RuntimeError::Command {
                cmd: format!("{} {}", self.binary, args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

/// Reads the shim's pid from its container dir.
pub fn shim_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("shim.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The recorded exit code, once the shim wrote it.
pub fn exit_code(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("exit"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the shim saw the container killed by the OOM killer.
pub fn oom_killed(dir: &Path) -> bool {
    dir.join("oom").exists()
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
    async fn start(&self, id: &str, dir: &Path) -> Result<u32, RuntimeError> {
        let args = ShimArgs {
            dir: dir.to_path_buf(),
            id: id.to_string(),
            runtime: self.binary.clone(),
            root: self.root.clone(),
            log_max_size: log_limits(dir).0,
            log_max_files: log_limits(dir).1,
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
        self.cli(&["kill", id, signal]).await
    }

    async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<(i32, String), RuntimeError> {
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .arg("--root")
            .arg(&self.root)
            .args(["exec", id])
            .args(cmd);
        run_capped(command, timeout).await
    }

    async fn delete(&self, id: &str, dir: &Path) -> Result<(), RuntimeError> {
        if let Some(pid) = shim_pid(dir).filter(|p| shim_alive(*p, dir)) {
            let _ = tokio::time::timeout(Duration::from_secs(5), wait_pid_exit(pid)).await;
        }
        if !self.root.join(id).exists() {
            return Ok(());
        }
        match self.cli(&["delete", "--force", id]).await {
            Err(RuntimeError::Command { stderr, .. }) if stderr.contains("does not exist") => {
                Ok(())
            }
            r => r,
        }
    }
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
fn log_limits(dir: &Path) -> (u64, u32) {
    let spec = std::fs::read(dir.join("task.json"))
        .ok()
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

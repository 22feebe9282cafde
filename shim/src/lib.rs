//! The per-container shim: a small single-threaded process that owns one container so the
//! container outlives the agent.
//!
//! The agent starts `rudder-shim …`, a binary of its own so that an idle shim costs little
//! memory (or re-executes itself as `rudder-agent shim …` when that binary is missing). The
//! shim forks once (the parent returns at once, so the agent reaps it and never holds a
//! zombie), calls setsid and becomes child subreaper, runs `runc run --detach` with the
//! container's stdio on pipes it reads, tells the agent the result through an inherited pipe,
//! then waits: as subreaper it receives the container's exit status — the only way to learn
//! the exit code of a detached container — writes it atomically to `exit`, closes the pipe
//! (the agent's wake-up), then deletes the runtime's record of the container and exits. It
//! runs before any async runtime exists: forking a multi-threaded process is unsafe, so it
//! must stay single-threaded.
//!
//! Files in the container dir (all through [`ContainerDir`]): the shim's pid, the container
//! init's pid, its exit code, its output and the runtime's own messages. The runtime's argv
//! comes from [`RuntimeCli`], which the agent uses too.
//!
//! The container's stdout and stderr are pipes the shim reads: each line goes to `log` as
//! `<RFC 3339 time> <stdout|stderr> <line>`, so `rctl logs --timestamps` can show when it was
//! written, and `log` rotates by size (`log` → `log.1` → … up to `--log-max-files`). The shim
//! owns the pipes, so logging goes on while the agent is down.

#![warn(missing_docs)]

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, setsid, ForkResult, Pid};

pub mod cli;
pub mod dir;

pub use cli::{can_hide_unified, RuntimeCli};
pub use dir::{write_atomic, ContainerDir, PRIVATE_FILE};

/// Fd number on which the shim inherits the agent's notification pipe.
pub const NOTIFY_FD: i32 = 3;

/// What the shim needs to supervise one container: `rudder-agent shim` and `rudder-shim` parse
/// the same flags ([`ShimArgs::to_args`] writes them).
#[derive(Debug, Clone)]
pub struct ShimArgs {
    /// The container directory (task.json, pid, exit, log): the shim's only state.
    pub dir: PathBuf,
    /// The container id the OCI runtime knows it by.
    pub id: String,
    /// The OCI runtime binary (`runc`, `crun`).
    pub runtime: String,
    /// The runtime's `--root`, so the agent's containers stay apart from others on the host.
    pub root: PathBuf,
    /// Rotate `log` when it reaches this many bytes.
    pub log_max_size: u64,
    /// Files kept: `log` plus `log.1` … `log.<n-1>`.
    pub log_max_files: u32,
    /// Run the runtime without the hybrid host's unified cgroup mount
    /// ([`RuntimeCli::hide_unified`]), as the agent does for the same runtime.
    pub hide_unified: bool,
}

/// Defaults for rotation (Docker's json-file driver with `max-size: 10m, max-file: 3`).
pub const LOG_MAX_SIZE: u64 = 10 << 20;
/// See [`LOG_MAX_SIZE`].
pub const LOG_MAX_FILES: u32 = 3;

impl ShimArgs {
    /// The runtime this shim drives.
    pub fn cli(&self) -> RuntimeCli {
        RuntimeCli::new(self.runtime.clone(), self.root.clone()).hiding_unified(self.hide_unified)
    }

    /// The command line that starts a shim with these arguments (after the program name).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "shim".into(),
            "--dir".into(),
            self.dir.display().to_string(),
            "--id".into(),
            self.id.clone(),
            "--runtime".into(),
            self.runtime.clone(),
            "--root".into(),
            self.root.display().to_string(),
            "--log-max-size".into(),
            self.log_max_size.to_string(),
            "--log-max-files".into(),
            self.log_max_files.to_string(),
        ];
        if self.hide_unified {
            args.extend(["--hide-unified".into(), "true".into()]);
        }
        args
    }
}

/// Entry point of `rudder-agent shim`. Never returns to the caller's main logic.
pub fn main(args: ShimArgs) -> ! {
    // SAFETY: the shim is single-threaded here (no runtime started), so fork is sound.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => std::process::exit(0),
        Ok(ForkResult::Child) => {}
        Err(_) => std::process::exit(1),
    }
    // SAFETY: NOTIFY_FD was set up by the agent for exactly this process and is used only here.
    let notify = unsafe { OwnedFd::from_raw_fd(NOTIFY_FD) };
    // Close-on-exec: runc and the container must not inherit the pipe.
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(NOTIFY_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut notify = File::from(notify);
    let _ = setsid();
    // SAFETY: plain prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let dir = ContainerDir::new(&args.dir);
    let code = match run(&args, &dir, &mut notify) {
        Ok(code) => code,
        Err(msg) => {
            let _ = writeln!(notify, "err {msg}");
            drop(notify);
            let _ = dir.write_exit_code(-1);
            std::process::exit(1);
        }
    };
    if code == 128 + libc::SIGKILL && oom_killed(&dir) {
        let _ = dir.mark_oom_killed();
    }
    let _ = dir.write_exit_code(code);
    // Closing the pipe tells a waiting agent the exit code is there.
    drop(notify);
    // The exit is reported first (it is what callers wait for); then the runtime's record of
    // the stopped container is removed, off the caller's critical path.
    let _ = args
        .cli()
        .delete_force(&args.id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    std::process::exit(0)
}

fn run(args: &ShimArgs, dir: &ContainerDir, notify: &mut File) -> Result<i32, String> {
    dir.write_shim_pid(std::process::id())
        .map_err(|e| format!("write the shim's pid: {e}"))?;
    let mut log = LogWriter::open(dir, args.log_max_size, args.log_max_files)
        .map_err(|e| format!("open log: {e}"))?;
    let (out_r, out_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let runc_log = dir.runtime_log();
    // Made here, 0600, so the runtime appends to a private file rather than create one.
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(PRIVATE_FILE)
        .open(&runc_log)
        .map_err(|e| format!("create the runtime's log: {e}"))?;
    // The write ends go to runc (and through it to the container); ours close when `Command`
    // is dropped, so EOF comes once every process of the container has closed them.
    let status = args
        .cli()
        .run_detached(&args.id, &dir.bundle(), &dir.pid_file(), &runc_log)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .status()
        .map_err(|e| format!("exec {}: {e}", args.runtime))?;
    if !status.success() {
        return Err(runtime_error(&runc_log)
            .unwrap_or_else(|| format!("{} run exited with {status}", args.runtime)));
    }
    // The runtime writes its pid file 0644: private like the rest of the dir.
    let _ = fs::set_permissions(
        dir.pid_file(),
        std::os::unix::fs::PermissionsExt::from_mode(PRIVATE_FILE),
    );
    let pid = dir
        .read_pid()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| format!("{} wrote no pid", args.runtime))?;
    let _ = writeln!(notify, "ok {pid}");
    let _ = notify.flush();
    let mut streams = [Stream::new(out_r, "stdout"), Stream::new(err_r, "stderr")];
    let mut code: Option<i32> = None;
    let mut exited_at: Option<std::time::Instant> = None;
    loop {
        // Output first, then reap: until the init exits and its output is drained (or, when a
        // daemonised descendant keeps the pipes open, a moment after the exit).
        pump(&mut streams, &mut log, 250);
        // With no output left to read, block on the exit instead of polling for it.
        let flags = if code.is_none() && streams.iter().all(|s| s.eof) {
            None
        } else {
            Some(WaitPidFlag::WNOHANG)
        };
        loop {
            let blocking = flags.is_none();
            match waitpid(Pid::from_raw(-1), flags) {
                Ok(WaitStatus::Exited(p, c)) if p.as_raw() == pid => {
                    code = Some(c);
                    if blocking {
                        break;
                    }
                }
                Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => {
                    code = Some(128 + sig as i32);
                    if blocking {
                        break;
                    }
                }
                Ok(WaitStatus::StillAlive) => break,
                // Another process (an orphan we adopted) reaped: keep going. Once the init
                // is known to have exited, a blocking wait must not wait for the orphans.
                Ok(_) if blocking && code.is_some() => break,
                Ok(_) => continue,
                // ECHILD: nothing left to reap; the init is not ours (should not happen).
                Err(_) => {
                    code.get_or_insert(-1);
                    break;
                }
            }
        }
        if let Some(c) = code {
            let at = *exited_at.get_or_insert_with(std::time::Instant::now);
            let drained = streams.iter().all(|s| s.eof);
            if drained || at.elapsed() > std::time::Duration::from_millis(500) {
                for s in &mut streams {
                    s.flush_partial(&mut log);
                }
                return Ok(c);
            }
        }
    }
}

/// One of the container's output pipes, with its unfinished line.
struct Stream {
    fd: OwnedFd,
    name: &'static str,
    partial: Vec<u8>,
    eof: bool,
}

/// A line longer than this is written in pieces (a runaway line must not grow the shim).
const MAX_LINE: usize = 16 * 1024;

impl Stream {
    fn new(fd: OwnedFd, name: &'static str) -> Self {
        Stream {
            fd,
            name,
            partial: Vec::new(),
            eof: false,
        }
    }

    fn flush_partial(&mut self, log: &mut LogWriter) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            log.line(self.name, &line);
        }
    }
}

/// Waits up to `timeout_ms` for output and writes every complete line read.
fn pump(streams: &mut [Stream; 2], log: &mut LogWriter, timeout_ms: u16) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let open: Vec<usize> = (0..streams.len()).filter(|i| !streams[*i].eof).collect();
    if open.is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(u64::from(timeout_ms)));
        return;
    }
    let mut fds: Vec<PollFd> = open
        .iter()
        .map(|i| PollFd::new(streams[*i].fd.as_fd(), PollFlags::POLLIN))
        .collect();
    if poll(&mut fds, PollTimeout::from(timeout_ms)).unwrap_or(0) <= 0 {
        return;
    }
    let ready: Vec<bool> = fds
        .iter()
        .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
        .collect();
    drop(fds);
    let mut buf = [0u8; 16 * 1024];
    for (k, i) in open.into_iter().enumerate() {
        if !ready[k] {
            continue;
        }
        let s = &mut streams[i];
        match nix::unistd::read(&s.fd, &mut buf) {
            Ok(0) => {
                s.eof = true;
                s.flush_partial(log);
            }
            Ok(n) => {
                s.partial.extend_from_slice(&buf[..n]);
                while let Some(pos) = s.partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = s.partial.drain(..=pos).collect();
                    log.line(s.name, &line[..line.len() - 1]);
                }
                while s.partial.len() >= MAX_LINE {
                    let piece: Vec<u8> = s.partial.drain(..MAX_LINE).collect();
                    log.line(s.name, &piece);
                }
            }
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
            Err(_) => s.eof = true,
        }
    }
}

/// The container's log file: timestamped lines, rotated by size.
struct LogWriter {
    dir: ContainerDir,
    file: File,
    size: u64,
    max_size: u64,
    max_files: u32,
}

impl LogWriter {
    fn open(dir: &ContainerDir, max_size: u64, max_files: u32) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(PRIVATE_FILE)
            .open(dir.log())?;
        // A log an older shim made readable by all.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(PRIVATE_FILE))?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            dir: dir.clone(),
            file,
            size,
            max_size: max_size.max(1024),
            max_files: max_files.max(1),
        })
    }

    fn line(&mut self, stream: &str, line: &[u8]) {
        let mut rec = Vec::with_capacity(line.len() + 48);
        rec.extend_from_slice(rfc3339_now().as_bytes());
        rec.push(b' ');
        rec.extend_from_slice(stream.as_bytes());
        rec.push(b' ');
        rec.extend_from_slice(line);
        rec.push(b'\n');
        if self.size > 0 && self.size + rec.len() as u64 > self.max_size {
            self.rotate();
        }
        if self.file.write_all(&rec).is_ok() {
            self.size += rec.len() as u64;
        }
    }

    /// `log.<n-2>` → `log.<n-1>` … `log` → `log.1`, then a fresh `log`. Readers that follow
    /// notice the new file by its inode.
    fn rotate(&mut self) {
        let name = |i: u32| self.dir.rotated_log(i);
        if self.max_files == 1 {
            let _ = self.file.set_len(0);
            self.size = 0;
            return;
        }
        for i in (0..self.max_files - 1).rev() {
            let _ = fs::rename(name(i), name(i + 1));
        }
        if let Ok(f) = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(PRIVATE_FILE)
            .open(name(0))
        {
            self.file = f;
            self.size = 0;
        }
    }
}

/// The current time as RFC 3339 with nanoseconds, UTC (`2026-11-23T16:55:00.123456789Z`).
pub fn rfc3339_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_nanos())
}

/// Seconds since the epoch as RFC 3339 in UTC with `nanos` as nine fraction digits (the
/// one calendar conversion of the workspace: rctl's event times use it too).
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Whether the kernel's OOM killer struck in the container's memory cgroup. Must be read before
/// the runtime deletes the cgroup.
fn oom_killed(dir: &ContainerDir) -> bool {
    let Ok(cfg) = fs::read(dir.config()) else {
        return false;
    };
    let Ok(cfg) = serde_json::from_slice::<serde_json::Value>(&cfg) else {
        return false;
    };
    let Some(path) = cfg["linux"]["cgroupsPath"].as_str() else {
        return false;
    };
    let path = path.trim_start_matches('/');
    let count = |file: String| {
        fs::read_to_string(file).ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
    };
    // cgroup v1, then v2 (pure or the hybrid unified mount).
    [
        format!("/sys/fs/cgroup/memory/{path}/memory.oom_control"),
        format!("/sys/fs/cgroup/{path}/memory.events"),
        format!("/sys/fs/cgroup/unified/{path}/memory.events"),
    ]
    .into_iter()
    .any(|f| count(f).is_some_and(|n| n > 0))
}

/// The last error line runc wrote to its log, without the JSON/text decoration.
fn runtime_error(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("level=error") || l.contains("\"error\""))?;
    let msg = line
        .split("msg=")
        .nth(1)
        .map(|m| m.trim().trim_matches('"').replace("\\\"", "\""))
        .unwrap_or_else(|| line.to_string());
    Some(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_795_279_500, 7), "2026-11-21T16:45:00.000000007Z");
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn the_log_rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let c = ContainerDir::new(dir.path());
        let mut w = LogWriter::open(&c, 1024, 3).unwrap();
        for i in 0..100 {
            w.line(
                "stdout",
                format!("line {i:03} {}", "x".repeat(40)).as_bytes(),
            );
        }
        let cur = fs::read_to_string(c.log()).unwrap();
        assert!(cur.len() <= 1024, "{}", cur.len());
        assert!(cur
            .lines()
            .last()
            .unwrap()
            .ends_with(&format!("line 099 {}", "x".repeat(40))));
        assert!(c.rotated_log(1).exists() && c.rotated_log(2).exists());
        assert!(!c.rotated_log(3).exists(), "at most 3 files");
        let first = cur.lines().next().unwrap();
        let mut parts = first.splitn(3, ' ');
        assert!(parts.next().unwrap().ends_with('Z'));
        assert_eq!(parts.next(), Some("stdout"));
        // Logs hold what the container prints: root's only, also a log an older shim left
        // readable by all.
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: PathBuf| fs::metadata(f).unwrap().permissions().mode() & 0o777;
        for i in 0..3 {
            assert_eq!(mode(c.rotated_log(i)), 0o600, "log {i}");
        }
        fs::set_permissions(c.log(), fs::Permissions::from_mode(0o644)).unwrap();
        drop(w);
        LogWriter::open(&c, 1024, 3).unwrap();
        assert_eq!(mode(c.log()), 0o600);
        c.write_exit_code(0).unwrap();
        assert_eq!(mode(c.exit_file()), 0o600);
    }
}

//! The per-container shim: a small single-threaded process that owns one container so the
//! container outlives the agent.
//!
//! The agent re-executes its own binary as `rudder-agent shim …`. The shim forks once (the
//! parent returns at once, so the agent reaps it and never holds a zombie), calls setsid and
//! becomes child subreaper, runs `runc run --detach` with the container's stdio on its log file,
//! tells the agent the result through an inherited pipe, then waits: as subreaper it receives
//! the container's exit status — the only way to learn the exit code of a detached container —
//! writes it atomically to `exit`, closes the pipe (the agent's wake-up), then deletes the runtime's record of the container and exits. It runs before any tokio runtime exists: forking a
//! multi-threaded process is unsafe, so this must stay single-threaded.
//!
//! Files in the container dir: `shim.pid`, `pid` (container init), `exit` (exit code),
//! `log` (container output), `runc.log` (the runtime's own messages).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, setsid, ForkResult, Pid};

/// Fd number on which the shim inherits the agent's notification pipe.
pub const NOTIFY_FD: i32 = 3;

#[derive(Debug, Clone)]
pub struct ShimArgs {
    pub dir: PathBuf,
    pub id: String,
    pub runtime: String,
    pub root: PathBuf,
}

impl ShimArgs {
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "shim".into(),
            "--dir".into(),
            self.dir.display().to_string(),
            "--id".into(),
            self.id.clone(),
            "--runtime".into(),
            self.runtime.clone(),
            "--root".into(),
            self.root.display().to_string(),
        ]
    }
}

/// Writes `contents` to `path` atomically (temp file + rename), so readers never see half.
pub fn write_atomic(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, path)
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
    let code = match run(&args, &mut notify) {
        Ok(code) => code,
        Err(msg) => {
            let _ = writeln!(notify, "err {msg}");
            drop(notify);
            let _ = write_atomic(&args.dir.join("exit"), "-1\n");
            std::process::exit(1);
        }
    };
    if code == 128 + libc::SIGKILL && oom_killed(&args.dir) {
        let _ = write_atomic(&args.dir.join("oom"), "1\n");
    }
    let _ = write_atomic(&args.dir.join("exit"), &format!("{code}\n"));
    // Closing the pipe tells a waiting agent the exit code is there.
    drop(notify);
    // The exit is reported first (it is what callers wait for); then the runtime's record of
    // the stopped container is removed, off the caller's critical path.
    let _ = Command::new(&args.runtime)
        .arg("--root")
        .arg(&args.root)
        .args(["delete", "--force"])
        .arg(&args.id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    std::process::exit(0)
}

fn run(args: &ShimArgs, notify: &mut File) -> Result<i32, String> {
    let dir = &args.dir;
    fs::write(dir.join("shim.pid"), format!("{}\n", std::process::id()))
        .map_err(|e| format!("write shim.pid: {e}"))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .map_err(|e| format!("open log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let runc_log = dir.join("runc.log");
    let status = Command::new(&args.runtime)
        .arg("--root")
        .arg(&args.root)
        .arg("--log")
        .arg(&runc_log)
        .args(["run", "--detach", "--bundle"])
        .arg(dir.join("bundle"))
        .arg("--pid-file")
        .arg(dir.join("pid"))
        .arg(&args.id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .status()
        .map_err(|e| format!("exec {}: {e}", args.runtime))?;
    if !status.success() {
        return Err(runtime_error(&runc_log)
            .unwrap_or_else(|| format!("{} run exited with {status}", args.runtime)));
    }
    let pid: i32 = fs::read_to_string(dir.join("pid"))
        .map_err(|e| format!("read pid file: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("bad pid file: {e}"))?;
    let _ = writeln!(notify, "ok {pid}");
    let _ = notify.flush();
    // Reap until the container's init exits; other orphans reparented to us are reaped too.
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => return Ok(code),
            Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => return Ok(128 + sig as i32),
            Ok(_) => continue,
            // ECHILD: the init is not ours (should not happen); report unknown.
            Err(_) => return Ok(-1),
        }
    }
}

/// Whether the kernel's OOM killer struck in the container's memory cgroup. Must be read before
/// the runtime deletes the cgroup.
fn oom_killed(dir: &Path) -> bool {
    let Ok(cfg) = fs::read(dir.join("bundle").join("config.json")) else {
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

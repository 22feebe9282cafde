//! A promoted host runs a controller too: when the leader says so (`RunController`, after
//! `rctl node promote`), the agent starts `rudder-controller` next to its own binary, as a
//! detached process (its own session, like the containers' shims) so that it outlives the
//! agent. It joins the group with the manager token it was sent; its data lives in
//! `<agent data>/controller`, its output in `<agent data>/controller.log`, its pid in
//! `<agent data>/controller.pid`. Starting is idempotent: a live controller is left alone, and
//! one that has state already restarts without joining again. The manager token goes to the
//! controller in `RUDDER_JOIN_TOKEN`, never on its command line (`/proc/<pid>/cmdline` is
//! readable by every local user for as long as the controller runs); the log is 0600.

use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use rudder_proto::v1::RunController;
use tracing::{info, warn};

pub const CONTROLLER_PORT: u16 = 4243;
pub const REGISTRY_PORT: u16 = 5000;
/// The environment variable `rudder-controller` reads its join token from.
pub const TOKEN_ENV: &str = "RUDDER_JOIN_TOKEN";

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The pid of the controller this agent started, if it still runs.
pub fn running(data_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(data_dir.join("controller.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    alive(pid).then_some(pid)
}

/// Starts the controller for `rc` unless one runs already. `agent_addr` is the agent's
/// `ip:port`; the controller listens on the same ip.
pub fn start(data_dir: &Path, agent_addr: &str, rc: &RunController) -> Result<(), String> {
    if let Some(pid) = running(data_dir) {
        info!(pid, "controller already running on this host");
        return Ok(());
    }
    let ip = agent_addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .ok_or_else(|| format!("agent address {agent_addr:?} has no port"))?;
    if ip == "0.0.0.0" {
        return Err("the agent listens on 0.0.0.0; promote needs a concrete address".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("rudder-controller");
    let dir = data_dir.join("controller");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(data_dir.join("controller.log"))
        .map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--data-dir")
        .arg(&dir)
        .arg("--listen")
        .arg(format!("{ip}:{CONTROLLER_PORT}"))
        .arg("--registry-listen")
        .arg(format!("{ip}:{REGISTRY_PORT}"))
        .arg("--raft-id")
        .arg(rc.raft_id.to_string())
        .env_remove(TOKEN_ENV)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    if !dir.join("raft.redb").exists() {
        cmd.arg("--join").arg(&rc.join).env(TOKEN_ENV, &rc.token);
    }
    // Its own session: the controller outlives this agent, like a shim.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let pid = child.id();
    crate::shim::write_atomic(&data_dir.join("controller.pid"), &pid.to_string())
        .map_err(|e| e.to_string())?;
    // Reap it if it ends while this agent runs.
    std::thread::spawn(move || {
        let mut child = child;
        match child.wait() {
            Ok(s) => warn!(%s, "controller on this host ended"),
            Err(e) => warn!(%e, "controller on this host: wait failed"),
        }
    });
    info!(
        pid,
        raft_id = rc.raft_id,
        "started a controller on this promoted host"
    );
    Ok(())
}

//! Local lab: a multi-host Rudder cluster on one machine (DESIGN §7), behind `rctl local up|down`
//! and under every multi-host test (`rudder-tests`). Its own crate so that the CLI does not carry
//! the test harness's host plumbing, and the tests do not depend on the CLI for it.
//!
//! `up` builds an underlay bridge (`br0`) inside its own network namespace, one network namespace
//! per host wired to that bridge with a veth pair, and a veth from the root namespace into the
//! bridge so tools in the root namespace reach every host. Each host gets its own data dir,
//! runtime root and cgroup parent, runs `rudder-agent`, and the first `managers` hosts also run
//! `rudder-controller`. `down` removes every trace.
//!
//! Invariants:
//! - Every name this module creates is derived from the lab name and the subnet index, and is
//!   written to `<root>/<name>/lab.json` *before* the thing is created, so `down` can undo a
//!   partial `up` (even one that crashed).
//! - `down` never fails because something is already gone, and an error in one step never stops
//!   the later steps. It also finds leftovers by name (namespaces, cgroups) and by the lab's
//!   state path in process command lines, so it works without `lab.json`.
//! - `down` only signals a process after checking that its command line mentions the lab's own
//!   state dir (or that it sits in one of the lab's cgroups); it never matches by program name.
//! - Join tokens never appear in a command line (`/proc/<pid>/cmdline` is world-readable): lab
//!   processes get them in `RUDDER_JOIN_TOKEN`. The lab dir is 0700 and `lab.json` (which keeps
//!   the tokens, for restarts) and `context.json` are 0600.
//! - Lab processes stay in the root mount namespace (we `setns` only the network namespace), so
//!   mounts they make under the lab dir are visible here and `down` can detach them.

#![warn(missing_docs)]

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::mount::{umount2, MntFlags};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// State root used when neither the caller nor `RUDDER_LAB_ROOT` names one.
pub const DEFAULT_ROOT: &str = "/var/lib/rudder-lab";
/// Environment variable overriding [`DEFAULT_ROOT`].
pub const ROOT_ENV: &str = "RUDDER_LAB_ROOT";
/// Port the controller's API listens on, on each manager host's underlay address.
pub const CONTROLLER_PORT: u16 = 4243;
/// Port of the controller's built-in registry.
pub const REGISTRY_PORT: u16 = 5000;
/// Port of each agent's API.
pub const AGENT_PORT: u16 = 4245;
/// Hosts take the addresses `.1..=.250`; `.254` is the root namespace.
pub const MAX_NODES: u32 = 250;

const RECORD_FILE: &str = "lab.json";
/// The environment variable `rudder-agent` and `rudder-controller` read their join token from.
pub const TOKEN_ENV: &str = "RUDDER_JOIN_TOKEN";
/// Mode of the lab dir: it holds the lab's tokens and every host's state.
const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of `lab.json` and `context.json`.
const PRIVATE_FILE_MODE: u32 = 0o600;
const CONTEXT_FILE: &str = "context.json";
const ROOT_LOCK: &str = ".lock";
/// Interface names (`rdr<k>`) and addresses are machine-wide, so labs under *different* roots
/// must also agree on subnet choice: they meet at this lock.
const MACHINE_LOCK: &str = "/run/rudder-lab.lock";
const NETNS_DIR: &str = "/run/netns";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const SUBNET_FIRST_OCTETS: [u8; 2] = [10, 213];
const MAX_SUBNET: u8 = 250;
const ROOT_OCTET: u8 = 254;
const BRIDGE: &str = "br0";
const HOST_IFACE: &str = "eth0";
/// nftables table [`Lab::set_loss`] makes in a host's namespace.
const CHAOS_TABLE: &str = "rudder_chaos";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const TERM_GRACE: Duration = Duration::from_secs(3);
const KILL_GRACE: Duration = Duration::from_secs(2);
const CGROUP_RMDIR_PATIENCE: Duration = Duration::from_secs(3);
const LINK_GONE_PATIENCE: Duration = Duration::from_secs(3);

/// What `rctl local up` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabConfig {
    /// Lab name, `[a-z0-9-]{1,12}`; short so derived interface and namespace names stay short.
    pub name: String,
    /// Number of hosts (1..=250).
    pub nodes: u32,
    /// The first `managers` hosts also run `rudder-controller` (1..=nodes).
    pub managers: u32,
    /// State root; each lab lives in `<root>/<name>/`.
    pub root: PathBuf,
    /// Path of `rudder-agent`.
    pub agent_bin: PathBuf,
    /// Path of `rudder-controller`.
    pub controller_bin: PathBuf,
    /// Path of `rudder`: each host is set up with `rudder init` (the first) or `rudder join`
    /// (the others), as an operator would, and its daemons start with `--config` and the file
    /// that wrote. `None`: the daemons get every setting as a flag (the lab's own tests, whose
    /// stand-in daemons read flags).
    pub rudder_bin: Option<PathBuf>,
    /// `auto`, `runc` or `crun`; passed to every agent.
    pub runtime: String,
    /// Appended to every agent's command line.
    pub extra_agent_args: Vec<String>,
    /// Appended to every controller's command line at `up`.
    pub extra_controller_args: Vec<String>,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self {
            name: "rudder".into(),
            nodes: 1,
            managers: 1,
            root: default_root(),
            agent_bin: sibling_binary("rudder-agent"),
            controller_bin: sibling_binary("rudder-controller"),
            rudder_bin: Some(sibling_binary("rudder")),
            runtime: "auto".into(),
            extra_agent_args: Vec::new(),
            extra_controller_args: Vec::new(),
        }
    }
}

impl LabConfig {
    /// Checks everything that can be checked without touching the machine.
    pub fn validate(&self) -> Result<(), LabError> {
        validate_name(&self.name)?;
        if self.nodes == 0 || self.nodes > MAX_NODES {
            return Err(LabError::Invalid(format!(
                "nodes must be in 1..={MAX_NODES}, got {}",
                self.nodes
            )));
        }
        if self.managers == 0 || self.managers > self.nodes {
            return Err(LabError::Invalid(format!(
                "managers must be in 1..={} (nodes), got {}",
                self.nodes, self.managers
            )));
        }
        if !matches!(self.runtime.as_str(), "auto" | "runc" | "crun") {
            return Err(LabError::Invalid(format!(
                "runtime must be auto, runc or crun, got {:?}",
                self.runtime
            )));
        }
        Ok(())
    }
}

/// `RUDDER_LAB_ROOT` if set and non-empty, else [`DEFAULT_ROOT`].
pub fn default_root() -> PathBuf {
    match std::env::var_os(ROOT_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_ROOT),
    }
}

/// `<dir of the running executable>/<name>` if that file exists, else plain `name` (PATH lookup).
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A built lab, as recorded in `lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lab {
    /// The lab's name: every namespace, link and cgroup it makes is derived from it.
    pub name: String,
    /// `<root>/<name>`, absolute and canonical.
    pub dir: PathBuf,
    /// `k` in `10.213.k.0/24`.
    pub subnet_index: u8,
    /// The hosts, in index order.
    pub hosts: Vec<LabHost>,
    /// `<dir>/context.json`: where rctl finds the controller and registry.
    pub context_path: PathBuf,
    /// Join tokens the first controller wrote at init (agents and further controllers join
    /// with them on their first start).
    #[serde(default)]
    pub worker_token: String,
    /// See `worker_token`: the token further controllers join with.
    #[serde(default)]
    pub manager_token: String,
    /// The hosts were set up with `rudder init`/`rudder join`: their daemons (re)start with
    /// `--config <host dir>/rudder.toml` ([`LabConfig::rudder_bin`]).
    #[serde(default)]
    pub configured: bool,
}

/// One simulated host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabHost {
    /// 1-based.
    pub index: u32,
    /// `h<index>`; also the agent's hostname and the controller's node name.
    pub name: String,
    /// Network namespace, `rdr-<lab>-h<index>` (a file in /run/netns).
    pub netns: String,
    /// Underlay address `10.213.k.<index>` on `eth0`.
    pub addr: Ipv4Addr,
    /// The agent's `--data-dir`, `<lab dir>/h<index>/agent`.
    pub data_dir: PathBuf,
    /// The agent's OCI runtime `--root`, so hosts do not see each other's containers.
    pub runtime_root: PathBuf,
    /// `/rudder-<lab>-h<index>`, relative to every cgroup hierarchy.
    pub cgroup_parent: String,
    /// The running agent, when this process started it (restarts update it).
    pub agent_pid: Option<i32>,
    /// The running controller on a manager host, as for `agent_pid`.
    pub controller_pid: Option<i32>,
    /// Runs a controller (the first `managers` hosts).
    #[serde(default)]
    pub manager: bool,
}

impl LabHost {
    /// `<lab dir>/h<i>`.
    pub fn dir(&self) -> PathBuf {
        self.data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }
    /// `<host dir>/agent.log`: the agent's stderr.
    pub fn agent_log(&self) -> PathBuf {
        self.dir().join("agent.log")
    }
    /// `<host dir>/controller.log`: the controller's stderr.
    pub fn controller_log(&self) -> PathBuf {
        self.dir().join("controller.log")
    }
    /// The controller's data dir (only used on manager hosts).
    pub fn controller_data_dir(&self) -> PathBuf {
        self.dir().join("controller")
    }
    /// `<host dir>/rudder.toml`: the host config `rudder init`/`join` wrote.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("rudder.toml")
    }
    /// The agent's API, on the host's underlay address.
    pub fn agent_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr, AGENT_PORT)
    }
    /// The controller's API, on the host's underlay address (manager hosts only).
    pub fn controller_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr, CONTROLLER_PORT)
    }
}

impl Lab {
    /// `http://10.213.k.1:4243`.
    pub fn controller_url(&self) -> String {
        format!("http://{}", self.first_controller_addr())
    }
    /// `10.213.k.1:5000`.
    pub fn registry(&self) -> String {
        format!("{}:{REGISTRY_PORT}", host_addr(self.subnet_index, 1))
    }
    /// The first host's controller: the one that started the cluster.
    pub fn first_controller_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(host_addr(self.subnet_index, 1), CONTROLLER_PORT)
    }
    /// Every manager host's controller URL, the first host's first.
    pub fn controller_urls(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|h| h.manager)
            .map(|h| format!("http://{}", h.controller_addr()))
            .collect()
    }
    /// Cuts (`up == false`) or restores host `index`'s link to the underlay, as a pulled cable
    /// would: its processes keep running but reach nobody.
    pub fn set_link(&self, index: usize, up: bool) -> Result<(), LabError> {
        let host = self
            .hosts
            .get(index)
            .ok_or_else(|| LabError::Invalid(format!("no host with index {index}")))?;
        ip(&[
            "-n",
            &host.netns,
            "link",
            "set",
            HOST_IFACE,
            if up { "up" } else { "down" },
        ])?;
        if up {
            // Bringing the link up drops its routes; the subnet route comes back with the
            // address, but the address must be re-added if the kernel removed it.
            let _ = ip(&["-n", &host.netns, "link", "set", "lo", "up"]);
        }
        Ok(())
    }
    /// Drops `percent` % of host `index`'s underlay packets, at random, both ways (an nftables
    /// table `rudder_chaos` in the host's namespace, on `eth0`); `0` removes it. A lossy cable
    /// for the chaos soak: `tc netem` would add delay too, but `sch_netem` is not in every
    /// kernel (not in the CI machine's), and nftables is already a lab dependency.
    pub fn set_loss(&self, index: usize, percent: u8) -> Result<(), LabError> {
        let host = self
            .hosts
            .get(index)
            .ok_or_else(|| LabError::Invalid(format!("no host with index {index}")))?;
        if percent > 100 {
            return Err(LabError::Invalid(format!("loss {percent}% is over 100%")));
        }
        let ns = host.netns.as_str();
        let nft = |args: &[&str]| {
            let mut v = vec!["netns", "exec", ns, "nft"];
            v.extend_from_slice(args);
            ip(&v)
        };
        // Idempotent: start from no table (absent is fine).
        let _ = nft(&["delete", "table", "inet", CHAOS_TABLE]);
        if percent == 0 {
            return Ok(());
        }
        nft(&["add", "table", "inet", CHAOS_TABLE])?;
        let pct = percent.to_string();
        for (chain, hook, dir) in [
            ("in", "input", "iifname"),
            ("out", "output", "oifname"),
            ("fwd_in", "forward", "iifname"),
            ("fwd_out", "forward", "oifname"),
        ] {
            let spec = format!("{{ type filter hook {hook} priority -10; }}");
            nft(&["add", "chain", "inet", CHAOS_TABLE, chain, &spec])?;
            nft(&[
                "add",
                "rule",
                "inet",
                CHAOS_TABLE,
                chain,
                dir,
                HOST_IFACE,
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                &pct,
                "drop",
            ])?;
        }
        Ok(())
    }
    /// Freezes (`SIGSTOP`, `paused == true`) or thaws (`SIGCONT`) host `index`'s controller or
    /// agent: a hung process with its sockets open. Returns the pid signalled (none recorded or
    /// not alive: an error).
    pub fn pause(&self, index: usize, role: Role, paused: bool) -> Result<i32, LabError> {
        let pid = self
            .live_pid(index, role)?
            .ok_or_else(|| LabError::Invalid(format!("no live {role:?} on host {index}")))?;
        let sig = if paused {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        signal(pid, sig).map_err(LabError::Invalid)?;
        Ok(pid)
    }
    /// The pid of host `index`'s controller or agent when it is one this lab started and it is
    /// still alive (`None` when it is not running); an error only for an unknown host.
    fn live_pid(&self, index: usize, role: Role) -> Result<Option<i32>, LabError> {
        let host = self
            .hosts
            .get(index)
            .ok_or_else(|| LabError::Invalid(format!("no host with index {index}")))?;
        let pid = match role {
            Role::Controller => host.controller_pid,
            Role::Agent => host.agent_pid,
        };
        Ok(pid.filter(|p| signalable(*p) && pid_alive(*p)))
    }
    /// The root namespace's underlay address, `10.213.k.254`.
    pub fn root_addr(&self) -> Ipv4Addr {
        host_addr(self.subnet_index, u32::from(ROOT_OCTET))
    }
    /// Root-namespace interface into the underlay, `rdr<k>`.
    pub fn root_link(&self) -> String {
        root_link_name(self.subnet_index)
    }
    /// Namespace holding the bridge, `rdr-<name>-ul`.
    pub fn underlay_netns(&self) -> String {
        underlay_netns_name(&self.name)
    }
    /// Bridge port (in the underlay namespace) of host `index`; cutting it partitions the host.
    pub fn host_port(&self, index: u32) -> String {
        host_port_name(self.subnet_index, index)
    }
    /// The host with this 1-based `index`.
    pub fn host(&self, index: u32) -> Option<&LabHost> {
        self.hosts.iter().find(|h| h.index == index)
    }
}

/// What `lab.json` holds: the lab plus every name `down` must undo.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LabRecord {
    #[serde(flatten)]
    lab: Lab,
    underlay_netns: String,
    bridge: String,
    root_link: String,
    root_peer: String,
    host_ports: Vec<String>,
    /// False until `up` returned successfully.
    complete: bool,
}

/// What `down` removed, and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DownReport {
    /// The lab torn down.
    pub name: String,
    /// Recorded agent/controller pids that were signalled.
    pub processes_stopped: Vec<i32>,
    /// Other pids killed: processes in the lab's cgroups, shims.
    pub processes_killed: Vec<i32>,
    /// Mounts detached under the lab dir (overlays, volumes).
    pub unmounted: Vec<PathBuf>,
    /// Cgroups removed (the hosts' parents and everything under them).
    pub cgroups_removed: Vec<PathBuf>,
    /// Network namespaces removed (hosts and underlay).
    pub netns_removed: Vec<String>,
    /// Links removed from the root namespace.
    pub links_removed: Vec<String>,
    /// The lab dir, once removed.
    pub state_dir_removed: Option<PathBuf>,
    /// One line per failed action; `down` returns [`LabError::Teardown`] when non-empty.
    pub errors: Vec<String>,
}

impl DownReport {
    /// True when `down` found nothing to remove.
    pub fn is_empty(&self) -> bool {
        self.processes_stopped.is_empty()
            && self.processes_killed.is_empty()
            && self.unmounted.is_empty()
            && self.cgroups_removed.is_empty()
            && self.netns_removed.is_empty()
            && self.links_removed.is_empty()
            && self.state_dir_removed.is_none()
    }
}

impl fmt::Display for DownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() && self.errors.is_empty() {
            return write!(f, "lab {}: nothing to remove", self.name);
        }
        write!(f, "lab {}:", self.name)?;
        let pids = |v: &[i32]| v.iter().map(i32::to_string).collect::<Vec<_>>().join(" ");
        if !self.processes_stopped.is_empty() {
            write!(
                f,
                "\n  stopped processes: {}",
                pids(&self.processes_stopped)
            )?;
        }
        if !self.processes_killed.is_empty() {
            write!(f, "\n  killed processes: {}", pids(&self.processes_killed))?;
        }
        for m in &self.unmounted {
            write!(f, "\n  unmounted {}", m.display())?;
        }
        for c in &self.cgroups_removed {
            write!(f, "\n  removed cgroup {}", c.display())?;
        }
        for n in &self.netns_removed {
            write!(f, "\n  removed netns {n}")?;
        }
        for l in &self.links_removed {
            write!(f, "\n  removed link {l}")?;
        }
        if let Some(d) = &self.state_dir_removed {
            write!(f, "\n  removed {}", d.display())?;
        }
        for e in &self.errors {
            write!(f, "\n  error: {e}")?;
        }
        Ok(())
    }
}

/// Why a lab could not be built, loaded or removed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A config or argument the lab refuses (a name, a host index).
    #[error("lab: invalid config: {0}")]
    Invalid(String),
    /// `up` of a name that already has a lab under this root.
    #[error("lab: {name:?} already exists under {}; run `rctl local down --name {name}` first", root.display())]
    Exists {
        /// The lab's name.
        name: String,
        /// The state root searched.
        root: PathBuf,
    },
    /// No lab of that name under this root.
    #[error("lab: no lab named {name:?} under {}", root.display())]
    NotFound {
        /// The lab's name.
        name: String,
        /// The state root searched.
        root: PathBuf,
    },
    /// Every subnet index is taken by another lab.
    #[error("lab: no free subnet: 10.213.1.0/24 to 10.213.{MAX_SUBNET}.0/24 are all taken")]
    NoSubnet,
    /// A file or directory operation failed.
    #[error("lab: {context}: {source}")]
    Io {
        /// What was being done, and to which path.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A command (`ip`) exited with an error.
    #[error("lab: `{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// How it exited.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// `lab.json` could not be written or read back.
    #[error("lab: bad record {}: {source}", path.display())]
    Record {
        /// The record's path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A lab process could not be started.
    #[error("lab: cannot start {what} ({}): {source}", bin.display())]
    Spawn {
        /// Which process (`agent h1`, `controller h1`).
        what: String,
        /// The binary started.
        bin: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A lab process exited before it was ready.
    #[error("lab: {what} exited during startup ({status}); tail of {}:\n{log_tail}", log.display())]
    Exited {
        /// Which process (`agent h1`, `controller h1`).
        what: String,
        /// How it exited.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },
    /// The controller never accepted connections.
    #[error("lab: controller did not accept connections on {addr} within {}s; tail of {}:\n{log_tail}", timeout.as_secs(), log.display())]
    NotReady {
        /// The address polled.
        addr: SocketAddrV4,
        /// How long it was given.
        timeout: Duration,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },
    /// `down` could not remove everything; the report says what is left.
    #[error("lab: teardown of {:?} left errors: {}", report.name, report.errors.join("; "))]
    Teardown {
        /// What was removed, and the errors.
        report: Box<DownReport>,
    },
    /// `up` failed, and so did removing what it had built.
    #[error("{cause}; cleaning up the half-built lab also failed: {}", cleanup.join("; "))]
    UpCleanup {
        /// Why `up` failed.
        cause: Box<LabError>,
        /// One line per cleanup step that failed.
        cleanup: Vec<String>,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
    let context = context.into();
    move |source| LabError::Io { context, source }
}

/// Lab names are `[a-z0-9-]{1,12}`: they end up in namespace, cgroup and path names.
pub fn validate_name(name: &str) -> Result<(), LabError> {
    let ok = (1..=12).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LabError::Invalid(format!(
            "lab name must match [a-z0-9-]{{1,12}}, got {name:?}"
        )))
    }
}

// ---- names ------------------------------------------------------------------------------------

fn host_netns_name(lab: &str, i: u32) -> String {
    format!("rdr-{lab}-h{i}")
}
fn underlay_netns_name(lab: &str) -> String {
    format!("rdr-{lab}-ul")
}
fn root_link_name(k: u8) -> String {
    format!("rdr{k}")
}
fn root_peer_name(k: u8) -> String {
    format!("v{k}up")
}
fn host_port_name(k: u8, i: u32) -> String {
    format!("v{k}h{i}")
}
fn cgroup_parent_name(lab: &str, i: u32) -> String {
    format!("/rudder-{lab}-h{i}")
}
fn host_addr(k: u8, i: u32) -> Ipv4Addr {
    let [a, b] = SUBNET_FIRST_OCTETS;
    Ipv4Addr::new(a, b, k, i as u8)
}
/// True when `candidate` is `prefix` followed by a host number (`rdr-x-h12` for `rdr-x-h`).
fn is_indexed(candidate: &str, prefix: &str) -> bool {
    candidate
        .strip_prefix(prefix)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

fn plan(cfg: &LabConfig, dir: &Path, k: u8) -> LabRecord {
    let hosts = (1..=cfg.nodes)
        .map(|i| {
            let hdir = dir.join(format!("h{i}"));
            LabHost {
                index: i,
                name: format!("h{i}"),
                netns: host_netns_name(&cfg.name, i),
                addr: host_addr(k, i),
                data_dir: hdir.join("data"),
                runtime_root: hdir.join("runc"),
                cgroup_parent: cgroup_parent_name(&cfg.name, i),
                agent_pid: None,
                controller_pid: None,
                manager: i <= cfg.managers,
            }
        })
        .collect();
    LabRecord {
        lab: Lab {
            name: cfg.name.clone(),
            dir: dir.to_path_buf(),
            subnet_index: k,
            hosts,
            context_path: dir.join(CONTEXT_FILE),
            worker_token: String::new(),
            manager_token: String::new(),
            configured: cfg.rudder_bin.is_some(),
        },
        underlay_netns: underlay_netns_name(&cfg.name),
        bridge: BRIDGE.into(),
        root_link: root_link_name(k),
        root_peer: root_peer_name(k),
        host_ports: (1..=cfg.nodes).map(|i| host_port_name(k, i)).collect(),
        complete: false,
    }
}

// ---- record and locks -------------------------------------------------------------------------

fn write_record(rec: &LabRecord) -> Result<(), LabError> {
    let path = rec.lab.dir.join(RECORD_FILE);
    let tmp = rec.lab.dir.join(format!("{RECORD_FILE}.tmp"));
    let body = serde_json::to_vec_pretty(rec).map_err(|source| LabError::Record {
        path: path.clone(),
        source,
    })?;
    write_private(&tmp, &body)?;
    fs::rename(&tmp, &path).map_err(io_err(format!("writing {}", path.display())))
}

/// Writes `body` to a fresh 0600 file at `path` (replacing any file there).
fn write_private(path: &Path, body: &[u8]) -> Result<(), LabError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let ctx = || format!("writing {}", path.display());
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(ctx())(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
        .map_err(io_err(ctx()))?;
    f.write_all(body).map_err(io_err(ctx()))
}

fn read_record(dir: &Path) -> Result<Option<LabRecord>, LabError> {
    let path = dir.join(RECORD_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| LabError::Record { path, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
    }
}

fn lock(path: &Path) -> Result<Flock<File>, LabError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(format!("opening lock {}", path.display())))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| io_err(format!("locking {}", path.display()))(e.into()))
}

/// Canonical form of `root` when it exists (so the state path in command lines and mountinfo is
/// the real one), else `root` as given.
fn canonical_root(root: &Path) -> PathBuf {
    root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
}

/// Names of the labs under `root` (directories holding a `lab.json`), sorted.
pub fn list(root: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join(RECORD_FILE).is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| validate_name(n).is_ok())
        .collect();
    names.sort();
    names
}

/// The lab `name` under `root`, as recorded.
pub fn load(root: &Path, name: &str) -> Result<Lab, LabError> {
    validate_name(name)?;
    let root = canonical_root(root);
    match read_record(&root.join(name))? {
        Some(rec) => Ok(rec.lab),
        None => Err(LabError::NotFound {
            name: name.into(),
            root,
        }),
    }
}

/// Lowest `k` not used by a lab under `root` and without a root-namespace `rdr<k>`. Call with
/// both locks held.
fn choose_subnet(root: &Path) -> Result<u8, LabError> {
    let used: BTreeSet<u8> = list(root)
        .iter()
        .filter_map(|n| read_record(&root.join(n)).ok().flatten())
        .map(|r| r.lab.subnet_index)
        .collect();
    (1..=MAX_SUBNET)
        .find(|k| !used.contains(k) && !root_link_exists(&root_link_name(*k)))
        .ok_or(LabError::NoSubnet)
}

fn root_link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

// ---- commands ---------------------------------------------------------------------------------

fn ip(args: &[&str]) -> Result<(), LabError> {
    ip_output(args).map(drop)
}

fn ip_output(args: &[&str]) -> Result<String, LabError> {
    debug!(cmd = %format!("ip {}", args.join(" ")), "lab: running");
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("running ip (is iproute2 installed?)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Command {
            cmd: format!("ip {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Writes `value` to `/proc/sys/<key>` as seen from namespace `ns`, from a short-lived thread
/// that joins the namespace (network namespaces are per thread).
fn sysctl_in_netns(ns: &str, key: &'static str, value: &'static str) -> Result<(), LabError> {
    let path = netns_path(ns);
    let file = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
    let ctx = format!("setting {key}={value} in {ns}");
    std::thread::spawn(move || -> io::Result<()> {
        setns(&file, CloneFlags::CLONE_NEWNET)?;
        fs::write(Path::new("/proc/sys").join(key.replace('.', "/")), value)
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("thread panicked")))
    .map_err(io_err(ctx))
}

// ---- up ---------------------------------------------------------------------------------------

/// Builds the lab described by `cfg` and starts its processes. On any failure midway, tears down
/// what was made and returns the error.
pub fn up(cfg: &LabConfig) -> Result<Lab, LabError> {
    cfg.validate()?;
    let _span = tracing::info_span!("lab", name = %cfg.name).entered();
    fs::create_dir_all(&cfg.root).map_err(io_err(format!("creating {}", cfg.root.display())))?;
    let root = cfg
        .root
        .canonicalize()
        .map_err(io_err(format!("resolving {}", cfg.root.display())))?;

    let mut rec = {
        let _machine = lock(Path::new(MACHINE_LOCK))?;
        let _root = lock(&root.join(ROOT_LOCK))?;
        let dir = root.join(&cfg.name);
        if dir.exists() {
            return Err(LabError::Exists {
                name: cfg.name.clone(),
                root,
            });
        }
        let k = choose_subnet(&root)?;
        let rec = plan(cfg, &dir, k);
        {
            use std::os::unix::fs::DirBuilderExt as _;
            fs::DirBuilder::new()
                .mode(PRIVATE_DIR_MODE)
                .create(&dir)
                .map_err(io_err(format!("creating {}", dir.display())))?;
        }
        // From here on every failure must be undone by `down`. The underlay (with `rdr<k>`) is
        // built under the machine lock, so another root's lab never picks the same `k`.
        if let Err(e) = write_record(&rec).and_then(|()| build_underlay(&rec)) {
            return Err(cleanup_after_failure(&root, &cfg.name, e));
        }
        rec
    };
    info!(subnet = rec.lab.subnet_index, "lab: underlay ready");

    let mut children = Vec::new();
    let result = build_hosts(cfg, &mut rec, &mut children);
    // Reap our children whenever they exit, so long-lived callers (tests) collect no zombies.
    for child in children {
        reap_detached(child);
    }
    match result {
        Ok(()) => {
            info!(hosts = rec.lab.hosts.len(), controller = %rec.lab.controller_url(), "lab: up");
            Ok(rec.lab)
        }
        Err(e) => Err(cleanup_after_failure(&root, &cfg.name, e)),
    }
}

fn cleanup_after_failure(root: &Path, name: &str, cause: LabError) -> LabError {
    warn!(%cause, "lab: start failed, tearing down");
    match down(root, name) {
        Ok(_) => cause,
        Err(LabError::Teardown { report }) => LabError::UpCleanup {
            cause: Box::new(cause),
            cleanup: report.errors,
        },
        Err(other) => LabError::UpCleanup {
            cause: Box::new(cause),
            cleanup: vec![other.to_string()],
        },
    }
}

fn build_underlay(rec: &LabRecord) -> Result<(), LabError> {
    let ul = rec.underlay_netns.as_str();
    let k = rec.lab.subnet_index;
    let root_cidr = format!("{}/24", rec.lab.root_addr());
    ip(&["netns", "add", ul])?;
    ip(&["-n", ul, "link", "set", "lo", "up"])?;
    ip(&["-n", ul, "link", "add", &rec.bridge, "type", "bridge"])?;
    ip(&["-n", ul, "link", "set", &rec.bridge, "up"])?;
    ip(&[
        "link",
        "add",
        &rec.root_link,
        "type",
        "veth",
        "peer",
        "name",
        &rec.root_peer,
        "netns",
        ul,
    ])?;
    ip(&[
        "-n",
        ul,
        "link",
        "set",
        &rec.root_peer,
        "master",
        &rec.bridge,
        "up",
    ])?;
    ip(&["addr", "add", &root_cidr, "dev", &rec.root_link])?;
    ip(&["link", "set", &rec.root_link, "up"])?;
    debug!(k, "lab: root link up");
    Ok(())
}

fn build_host(rec: &LabRecord, host: &LabHost, port: &str) -> Result<(), LabError> {
    let ul = rec.underlay_netns.as_str();
    let ns = host.netns.as_str();
    let cidr = format!("{}/24", host.addr);
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    // Create both ends directly in their namespaces: no transient names in the root namespace.
    ip(&[
        "link", "add", HOST_IFACE, "netns", ns, "type", "veth", "peer", "name", port, "netns", ul,
    ])?;
    ip(&["-n", ul, "link", "set", port, "master", &rec.bridge, "up"])?;
    ip(&["-n", ns, "addr", "add", &cidr, "dev", HOST_IFACE])?;
    ip(&["-n", ns, "link", "set", HOST_IFACE, "up"])?;
    sysctl_in_netns(ns, "net.ipv4.ip_forward", "1")?;
    for d in [&host.data_dir, &host.runtime_root] {
        fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
    }
    Ok(())
}

fn build_hosts(
    cfg: &LabConfig,
    rec: &mut LabRecord,
    children: &mut Vec<Child>,
) -> Result<(), LabError> {
    for idx in 0..rec.lab.hosts.len() {
        let host = rec.lab.hosts[idx].clone();
        build_host(rec, &host, &rec.host_ports[idx])?;
        debug!(host = %host.name, addr = %host.addr, "lab: host network ready");
    }

    for idx in 0..cfg.managers as usize {
        rec.lab.hosts[idx].manager = true;
    }
    let controller_urls = rec.lab.controller_urls().join(",");
    let first_addr = rec.lab.first_controller_addr();
    let mut first_controller = None;
    for idx in 0..cfg.managers as usize {
        let host = rec.lab.hosts[idx].clone();
        if let Some(rudder) = &cfg.rudder_bin {
            // The first host makes the cluster; the others join it as managers.
            let (args, token) = if idx == 0 {
                (bootstrap_args("init", &host, &rec.lab, &cfg.runtime), None)
            } else {
                let mut args = bootstrap_args("join", &host, &rec.lab, &cfg.runtime);
                args.extend([
                    "--raft-id".into(),
                    (idx + 1).to_string(),
                    first_addr.to_string(),
                ]);
                (args, Some(rec.lab.manager_token.as_str()))
            };
            run_rudder(rudder, &args, token, &host)?;
        }
        let cdir = host.controller_data_dir();
        fs::create_dir_all(&cdir).map_err(io_err(format!("creating {}", cdir.display())))?;
        let mut args = controller_args(&host, idx, first_addr, rec.lab.configured);
        args.extend(cfg.extra_controller_args.iter().cloned());
        let what = format!("controller on {}", host.name);
        let child = spawn_in_netns(
            &what,
            &cfg.controller_bin,
            &args,
            controller_token(idx, &rec.lab.manager_token),
            &host.netns,
            &host.controller_log(),
        )?;
        let pid = child_pid(&child);
        children.push(child);
        if first_controller.is_none() {
            first_controller = Some(children.len() - 1);
        }
        rec.lab.hosts[idx].controller_pid = Some(pid);
        write_record(rec)?;
        info!(host = %host.name, pid, "lab: controller started");
        if idx == 0 {
            // The others join the first; it must be serving before they ask. It wrote the
            // admin credentials and the join tokens before it started serving.
            wait_for_controller(
                host.controller_addr(),
                children.last_mut().expect("just pushed"),
                &host.controller_log(),
                READY_TIMEOUT,
            )?;
            let admin = host.controller_data_dir().join("admin");
            let read = |f: &str| {
                fs::read_to_string(admin.join(f))
                    .map(|t| t.trim().to_string())
                    .map_err(io_err(format!("reading {}", admin.join(f).display())))
            };
            rec.lab.worker_token = read("worker.token")?;
            rec.lab.manager_token = read("manager.token")?;
            write_record(rec)?;
            // Kept in lab.json now: the token files were a one-time hand-off, and outside the
            // store's encryption the tokens must not stay in the controller's data dir.
            for f in ["worker.token", "manager.token"] {
                fs::remove_file(admin.join(f))
                    .map_err(io_err(format!("removing {}", admin.join(f).display())))?;
            }
        }
    }

    for idx in 0..rec.lab.hosts.len() {
        let host = rec.lab.hosts[idx].clone();
        if let (Some(rudder), false) = (&cfg.rudder_bin, host.manager) {
            let mut args = bootstrap_args("join", &host, &rec.lab, &cfg.runtime);
            args.push(first_addr.to_string());
            run_rudder(rudder, &args, Some(&rec.lab.worker_token), &host)?;
        }
        let mut args = agent_args(&host, &controller_urls, &cfg.runtime, rec.lab.configured);
        args.extend(cfg.extra_agent_args.iter().cloned());
        let what = format!("agent on {}", host.name);
        let child = spawn_in_netns(
            &what,
            &cfg.agent_bin,
            &args,
            Some(&rec.lab.worker_token),
            &host.netns,
            &host.agent_log(),
        )?;
        let pid = child_pid(&child);
        children.push(child);
        rec.lab.hosts[idx].agent_pid = Some(pid);
        write_record(rec)?;
        info!(host = %host.name, pid, "lab: agent started");
    }

    let first = rec.lab.hosts[0].clone();
    if let Some(ci) = first_controller {
        wait_for_controller(
            first.controller_addr(),
            &mut children[ci],
            &first.controller_log(),
            READY_TIMEOUT,
        )?;
    }

    let admin = first.controller_data_dir().join("admin");
    let context = serde_json::json!({
        "name": rec.lab.name,
        "controller": rec.lab.controller_url(),
        "controllers": rec.lab.controller_urls(),
        "registry": rec.lab.registry(),
        "ca": admin.join("ca.pem"),
        "cert": admin.join("admin.pem"),
        "key": admin.join("admin-key.pem"),
    });
    let body = serde_json::to_vec_pretty(&context).map_err(|source| LabError::Record {
        path: rec.lab.context_path.clone(),
        source,
    })?;
    write_private(&rec.lab.context_path, &body)?;
    rec.complete = true;
    write_record(rec)
}

/// The token controller `index` is started with: the first one makes the cluster and needs
/// none; the others join with the manager token.
fn controller_token(index: usize, manager_token: &str) -> Option<&str> {
    (index > 0).then_some(manager_token)
}

/// The settings `rudder init`/`rudder join` (`cmd`) write into host `host`'s config: the same
/// ones the daemons get as flags without it. The token goes in the environment, never here.
fn bootstrap_args(cmd: &str, host: &LabHost, lab: &Lab, runtime: &str) -> Vec<String> {
    vec![
        cmd.into(),
        "--start".into(),
        "none".into(),
        "--config".into(),
        path_arg(&host.config_path()),
        "--advertise-addr".into(),
        host.addr.to_string(),
        "--listen-addr".into(),
        host.addr.to_string(),
        "--data-dir".into(),
        path_arg(&host.dir()),
        "--agent-data-dir".into(),
        path_arg(&host.data_dir),
        "--runtime-root".into(),
        path_arg(&host.runtime_root),
        "--node-name".into(),
        host.name.clone(),
        "--cgroup-parent".into(),
        host.cgroup_parent.clone(),
        "--runtime".into(),
        runtime.into(),
        "--controllers".into(),
        lab.controller_urls().join(","),
    ]
}

/// Runs `rudder ARGS` (init or join, which return in seconds), the token in [`TOKEN_ENV`].
fn run_rudder(
    bin: &Path,
    args: &[String],
    token: Option<&str>,
    host: &LabHost,
) -> Result<(), LabError> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_remove(TOKEN_ENV)
        .stdin(Stdio::null())
        .current_dir("/");
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        cmd.env(TOKEN_ENV, t);
    }
    let what = format!(
        "rudder {} on {}",
        args.first().map_or("", String::as_str),
        host.name
    );
    let out = cmd.output().map_err(|source| LabError::Spawn {
        what: what.clone(),
        bin: bin.to_path_buf(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    debug!(host = %host.name, out = %String::from_utf8_lossy(&out.stdout).trim(), "lab: host set up");
    Ok(())
}

/// The first manager (index 0) starts the cluster; the others join it on their first start
/// (a restarted controller keeps its own state and ignores `--join`). The manager token goes
/// in the environment ([`controller_token`]), never here. A `configured` host's config (from
/// `rudder init`/`join`) says all of it.
fn controller_args(
    host: &LabHost,
    index: usize,
    first: SocketAddrV4,
    configured: bool,
) -> Vec<String> {
    if configured {
        return vec!["--config".into(), path_arg(&host.config_path())];
    }
    let mut args = vec![
        "--data-dir".into(),
        path_arg(&host.controller_data_dir()),
        "--listen".into(),
        host.controller_addr().to_string(),
        "--registry-listen".into(),
        format!("{}:{REGISTRY_PORT}", host.addr),
        "--raft-id".into(),
        (index + 1).to_string(),
        "--node-name".into(),
        host.name.clone(),
    ];
    if index > 0 {
        args.extend(["--join".into(), first.to_string()]);
    }
    args
}

/// The worker token goes in the environment, never here. A `configured` host's config says
/// the rest (a restart may change the runtime).
fn agent_args(
    host: &LabHost,
    controller_url: &str,
    runtime: &str,
    configured: bool,
) -> Vec<String> {
    if configured {
        return vec![
            "--config".into(),
            path_arg(&host.config_path()),
            "--runtime".into(),
            runtime.into(),
        ];
    }
    vec![
        "--data-dir".into(),
        path_arg(&host.data_dir),
        "--controller".into(),
        controller_url.into(),
        "--listen".into(),
        host.agent_addr().to_string(),
        "--hostname".into(),
        host.name.clone(),
        "--runtime-root".into(),
        path_arg(&host.runtime_root),
        "--cgroup-parent".into(),
        host.cgroup_parent.clone(),
        "--runtime".into(),
        runtime.into(),
        "--role".into(),
        if host.manager { "manager" } else { "worker" }.into(),
    ]
}

/// Which of a host's processes to restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `rudder-controller` (manager hosts only).
    Controller,
    /// `rudder-agent`.
    Agent,
}

impl Lab {
    /// SIGKILLs the controller or agent of host `index` (0-based) and waits until it is gone,
    /// as a crash would. `restart` starts it again.
    pub fn kill(&self, index: usize, role: Role) -> Result<(), LabError> {
        if let Some(pid) = self.live_pid(index, role)? {
            let _ = signal(pid, Signal::SIGKILL);
            wait_gone(&[pid], KILL_GRACE);
        }
        Ok(())
    }

    /// Stops (SIGTERM, SIGKILL after a grace period) and starts again the controller or agent of
    /// host `index` (0-based) with the same data dir — how tests show that state survives a
    /// restart and that containers outlive their agent. `kill9` skips the SIGTERM. The agent's
    /// extra arguments given at `up` are not repeated.
    pub fn restart(
        &mut self,
        index: usize,
        role: Role,
        bin: &Path,
        runtime: &str,
        kill9: bool,
    ) -> Result<i32, LabError> {
        let host = self
            .hosts
            .get(index)
            .cloned()
            .ok_or_else(|| LabError::Invalid(format!("no host with index {index}")))?;
        let old = match role {
            Role::Controller => host.controller_pid,
            Role::Agent => host.agent_pid,
        };
        if let Some(pid) = old.filter(|p| signalable(*p) && pid_alive(*p)) {
            if !kill9 {
                let _ = signal(pid, Signal::SIGTERM);
                wait_gone(&[pid], TERM_GRACE);
            }
            if pid_alive(pid) {
                let _ = signal(pid, Signal::SIGKILL);
                wait_gone(&[pid], KILL_GRACE);
            }
        }
        let (args, token, log, what) = match role {
            Role::Controller => (
                controller_args(&host, index, self.first_controller_addr(), self.configured),
                controller_token(index, &self.manager_token),
                host.controller_log(),
                format!("controller on {}", host.name),
            ),
            Role::Agent => (
                agent_args(
                    &host,
                    &self.controller_urls().join(","),
                    runtime,
                    self.configured,
                ),
                Some(self.worker_token.as_str()),
                host.agent_log(),
                format!("agent on {}", host.name),
            ),
        };
        let mut child = spawn_in_netns(&what, bin, &args, token, &host.netns, &log)?;
        let pid = child_pid(&child);
        match role {
            Role::Controller => self.hosts[index].controller_pid = Some(pid),
            Role::Agent => self.hosts[index].agent_pid = Some(pid),
        }
        if let Some(mut rec) = read_record(&self.dir)? {
            rec.lab.hosts[index] = self.hosts[index].clone();
            write_record(&rec)?;
        }
        let ready = if role == Role::Controller {
            wait_for_controller(host.controller_addr(), &mut child, &log, READY_TIMEOUT)
        } else {
            Ok(())
        };
        reap_detached(child);
        ready.map(|()| pid)
    }
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn child_pid(child: &Child) -> i32 {
    // Linux pids fit in i32 (pid_max <= 2^22).
    i32::try_from(child.id()).unwrap_or(i32::MAX)
}

/// Starts `bin` detached (own session, stdin null, output appended to `log`) inside network
/// namespace `ns`, staying in our mount namespace.
/// Starts `bin` in network namespace `ns`, its own session, output appended to `log`; `token`
/// (a join token) is passed in [`TOKEN_ENV`], never on the command line.
fn spawn_in_netns(
    what: &str,
    bin: &Path,
    args: &[String],
    token: Option<&str>,
    ns: &str,
    log: &Path,
) -> Result<Child, LabError> {
    let ns_path = netns_path(ns);
    let ns_file = File::open(&ns_path).map_err(io_err(format!("opening {}", ns_path.display())))?;
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(format!("opening {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(io_err(format!("opening {}", log.display())))?;
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "info".into());
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .current_dir("/")
        .env("RUST_LOG", rust_log)
        .env_remove(TOKEN_ENV)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        cmd.env(TOKEN_ENV, token);
    }
    let fd = ns_file.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only makes two async-signal-safe
    // syscalls without memory arguments, on an fd that stays open in the parent until `spawn`
    // returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| LabError::Spawn {
        what: what.into(),
        bin: bin.to_path_buf(),
        source,
    })?;
    drop(ns_file);
    Ok(child)
}

fn reap_detached(mut child: Child) {
    let spawned = std::thread::Builder::new()
        .name("lab-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    if let Err(e) = spawned {
        warn!(%e, "lab: cannot start reaper thread; the child will be reaped at exit");
    }
}

fn wait_for_controller(
    addr: SocketAddrV4,
    child: &mut Child,
    log: &Path,
    timeout: Duration,
) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LabError::Exited {
                what: "controller".into(),
                status: status.to_string(),
                log: log.to_path_buf(),
                log_tail: log_tail(log),
            });
        }
        if TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_millis(500)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::NotReady {
                addr,
                timeout,
                log: log.to_path_buf(),
                log_tail: log_tail(log),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Last 20 lines (at most 4 KiB) of `path`.
fn log_tail(path: &Path) -> String {
    const MAX: u64 = 4096;
    let Ok(mut f) = File::open(path) else {
        return "(no log)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    if tail.is_empty() {
        "(empty log)".into()
    } else {
        tail
    }
}

// ---- down -------------------------------------------------------------------------------------

/// Removes every trace of lab `name` under `root`: processes, mounts, cgroups, namespaces,
/// interfaces and the state dir. Idempotent; works on a half-built lab and without `lab.json`.
/// Returns [`LabError::Teardown`] (carrying the report) when some action failed.
pub fn down(root: &Path, name: &str) -> Result<DownReport, LabError> {
    validate_name(name)?;
    let _span = tracing::info_span!("lab", name).entered();
    let root = canonical_root(root);
    let dir = root.join(name);
    let mut report = DownReport {
        name: name.into(),
        ..DownReport::default()
    };
    let rec = match read_record(&dir) {
        Ok(r) => r,
        Err(e) => {
            report
                .errors
                .push(format!("{e} (continuing from names alone)"));
            None
        }
    };
    let marker = LabMarker::new(&dir);

    // Namespaces: hosts first, then the underlay.
    let mut netns: Vec<String> = Vec::new();
    let mut push_ns = |n: String| {
        if !netns.contains(&n) {
            netns.push(n);
        }
    };
    if let Some(r) = &rec {
        r.lab.hosts.iter().for_each(|h| push_ns(h.netns.clone()));
    }
    let host_prefix = format!("rdr-{name}-h");
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        let mut found: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| is_indexed(n, &host_prefix))
            .collect();
        found.sort();
        found.into_iter().for_each(&mut push_ns);
    }
    push_ns(underlay_netns_name(name));

    // The root link is ours only while its peer lives in our underlay namespace.
    let ul = underlay_netns_name(name);
    let root_link = rec
        .as_ref()
        .map(|r| r.root_link.clone())
        .filter(|l| link_peer_in(l, &ul));

    let cgroup_parents = cgroup_parents(name, rec.as_ref());
    let hierarchies = cgroup_hierarchies();
    let cgroup_roots: Vec<PathBuf> = hierarchies
        .iter()
        .flat_map(|h| {
            cgroup_parents
                .iter()
                .map(move |p| h.join(p.trim_start_matches('/')))
        })
        .filter(|p| p.is_dir())
        .collect();

    // (1) Stop the recorded agents and controllers: TERM, then KILL.
    let recorded: Vec<i32> = rec
        .iter()
        .flat_map(|r| &r.lab.hosts)
        .flat_map(|h| [h.agent_pid, h.controller_pid])
        .flatten()
        .collect();
    stop_recorded(&recorded, &marker, &mut report);

    // (2) Kill whatever is left in the lab's cgroups, and the shims; then the hosts'
    // userspace WireGuard processes (they outlive agents on purpose, like containers).
    kill_leftovers(&cgroup_roots, &marker, &mut report);
    stop_wireguard(&dir, &mut report);

    // (3) Detach every mount under the lab dir, deepest first.
    unmount_under(&dir, &mut report);

    // (4) Remove the cgroups, deepest first.
    remove_cgroups(&cgroup_roots, &mut report);

    // (5) Namespaces and the root link.
    for ns in &netns {
        if !netns_path(ns).exists() {
            continue;
        }
        match ip(&["netns", "del", ns]) {
            Ok(()) => report.netns_removed.push(ns.clone()),
            Err(e) if !netns_path(ns).exists() => debug!(%e, "lab: netns vanished meanwhile"),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    if let Some(link) = root_link {
        remove_root_link(&link, &mut report);
    }

    // (6) The state dir, unless something is still mounted below it (never delete through a
    // mount).
    if dir.exists() {
        let still_mounted = mounts_under(&dir);
        if still_mounted.is_empty() {
            match fs::remove_dir_all(&dir) {
                Ok(()) => report.state_dir_removed = Some(dir.clone()),
                Err(e) => report
                    .errors
                    .push(format!("removing {}: {e}", dir.display())),
            }
        } else {
            report.errors.push(format!(
                "kept {}: still mounted below it: {}",
                dir.display(),
                still_mounted
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }

    if report.errors.is_empty() {
        info!(removed = !report.is_empty(), "lab: down");
        Ok(report)
    } else {
        warn!(errors = report.errors.len(), "lab: down left errors");
        Err(LabError::Teardown {
            report: Box::new(report),
        })
    }
}

/// Matches command lines that mention a path inside the lab dir. Matching `<dir>/` (or `<dir>`
/// as a whole argument) keeps lab `a` from matching lab `ab`.
struct LabMarker {
    with_slash: Vec<u8>,
    whole_arg: Vec<u8>,
}

impl LabMarker {
    fn new(dir: &Path) -> Self {
        let d = dir.as_os_str().as_bytes();
        let mut with_slash = d.to_vec();
        with_slash.push(b'/');
        let mut whole_arg = d.to_vec();
        whole_arg.push(0);
        Self {
            with_slash,
            whole_arg,
        }
    }
    fn matches(&self, cmdline: &[u8]) -> bool {
        contains(cmdline, &self.with_slash) || contains(cmdline, &self.whole_arg)
    }
    fn matches_pid(&self, pid: i32) -> bool {
        fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| self.matches(&c))
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Never signal init, process groups (pid <= 0) or ourselves.
fn signalable(pid: i32) -> bool {
    pid > 1 && pid != std::process::id() as i32
}

fn signal(pid: i32, sig: Signal) -> Result<bool, String> {
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(format!("sending {sig} to {pid}: {e}")),
    }
}

fn wait_gone(pids: &[i32], patience: Duration) {
    let deadline = Instant::now() + patience;
    while pids.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop_recorded(pids: &[i32], marker: &LabMarker, report: &mut DownReport) {
    let mut termed = Vec::new();
    for &pid in pids {
        if !signalable(pid) || !pid_alive(pid) || !marker.matches_pid(pid) {
            continue;
        }
        match signal(pid, Signal::SIGTERM) {
            Ok(true) => termed.push(pid),
            Ok(false) => {}
            Err(e) => report.errors.push(e),
        }
    }
    wait_gone(&termed, TERM_GRACE);
    let mut killed = Vec::new();
    for &pid in &termed {
        if pid_alive(pid) && marker.matches_pid(pid) {
            match signal(pid, Signal::SIGKILL) {
                Ok(true) => killed.push(pid),
                Ok(false) => {}
                Err(e) => report.errors.push(e),
            }
        }
    }
    wait_gone(&killed, KILL_GRACE);
    for &pid in &termed {
        if pid_alive(pid) && marker.matches_pid(pid) {
            report
                .errors
                .push(format!("process {pid} survived SIGKILL"));
        }
    }
    report.processes_stopped.extend(termed);
}

fn cgroup_parents(name: &str, rec: Option<&LabRecord>) -> BTreeSet<String> {
    let mut parents: BTreeSet<String> = rec
        .iter()
        .flat_map(|r| &r.lab.hosts)
        .map(|h| h.cgroup_parent.clone())
        .collect();
    let prefix = format!("rudder-{name}-h");
    for h in cgroup_hierarchies() {
        if let Ok(entries) = fs::read_dir(&h) {
            for e in entries.flatten() {
                if let Some(n) = e.file_name().to_str() {
                    if is_indexed(n, &prefix) {
                        parents.insert(format!("/{n}"));
                    }
                }
            }
        }
    }
    parents
}

/// Every mounted cgroup hierarchy: the v1 controllers, `unified`, or `/sys/fs/cgroup` itself on
/// a pure cgroup2 machine; symlinked aliases (`cpu` -> `cpu,cpuacct`) counted once.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let base = Path::new(CGROUP_ROOT);
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut candidates = vec![base.to_path_buf()];
    if let Ok(entries) = fs::read_dir(base) {
        let mut v: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        v.sort();
        candidates.extend(v);
    }
    for c in candidates {
        let Ok(real) = c.canonicalize() else { continue };
        if real.join("cgroup.procs").is_file() && seen.insert(real.clone()) {
            out.push(real);
        }
    }
    out
}

/// Every cgroup directory at or below `roots`, deepest first.
fn cgroup_tree(roots: &[PathBuf]) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        out.push(dir.to_path_buf());
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut out = Vec::new();
    for r in roots {
        if r.is_dir() {
            walk(r, &mut out);
        }
    }
    out.sort_by(|a, b| {
        b.components()
            .count()
            .cmp(&a.components().count())
            .then_with(|| b.cmp(a))
    });
    out.dedup();
    out
}

fn cgroup_pids(roots: &[PathBuf]) -> BTreeSet<i32> {
    cgroup_tree(roots)
        .iter()
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Pids whose command line mentions the lab dir, outside our own network namespace (lab
/// processes always live in a lab namespace; a `tail -f` of a lab log in the root namespace is
/// left alone).
fn marked_pids(marker: &LabMarker) -> BTreeSet<i32> {
    let own_ns = fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let Ok(entries) = fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| signalable(pid) && marker.matches_pid(pid))
        .filter(|&pid| {
            let ns = fs::metadata(format!("/proc/{pid}/ns/net"))
                .ok()
                .map(|m| (m.dev(), m.ino()));
            ns.is_none() || ns != own_ns
        })
        .collect()
}

fn kill_leftovers(cgroup_roots: &[PathBuf], marker: &LabMarker, report: &mut DownReport) {
    let mut killed: BTreeSet<i32> = BTreeSet::new();
    for _round in 0..30 {
        let mut targets = cgroup_pids(cgroup_roots);
        targets.extend(marked_pids(marker));
        let targets: Vec<i32> = targets
            .into_iter()
            .filter(|p| signalable(*p) && pid_alive(*p))
            .collect();
        if targets.is_empty() {
            break;
        }
        for pid in &targets {
            match signal(*pid, Signal::SIGKILL) {
                Ok(true) => {
                    killed.insert(*pid);
                }
                Ok(false) => {}
                Err(e) => report.errors.push(e),
            }
        }
        wait_gone(&targets, Duration::from_millis(500));
    }
    let survivors: Vec<i32> = cgroup_pids(cgroup_roots)
        .into_iter()
        .chain(marked_pids(marker))
        .filter(|p| signalable(*p) && pid_alive(*p))
        .collect();
    if !survivors.is_empty() {
        report
            .errors
            .push(format!("processes survived SIGKILL: {survivors:?}"));
    }
    report.processes_killed.extend(
        killed
            .into_iter()
            .filter(|p| !report.processes_stopped.contains(p)),
    );
}

/// Directory where userspace WireGuard keeps its sockets (the `wg` tool's convention).
const WG_RUN_DIR: &str = "/var/run/wireguard";

/// Stops each lab host's userspace WireGuard child (found by the host's node id, from which
/// the agent names its interface) and removes its socket, pid and log files.
fn stop_wireguard(dir: &Path, report: &mut DownReport) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(id) = fs::read_to_string(e.path().join("data").join("node_id")) else {
            continue;
        };
        let iface = format!("rwg-{}", id.trim().chars().take(8).collect::<String>());
        let run = Path::new(WG_RUN_DIR);
        let pid = fs::read_to_string(run.join(format!("{iface}.pid")))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let ours = fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| contains(&c, b"wg-userspace\0") && contains(&c, iface.as_bytes()));
            if ours && signalable(pid) {
                match signal(pid, Signal::SIGKILL) {
                    Ok(true) => {
                        wait_gone(&[pid], KILL_GRACE);
                        report.processes_killed.push(pid);
                    }
                    Ok(false) => {}
                    Err(e) => report.errors.push(e),
                }
            }
        }
        for ext in ["sock", "pid", "log", "name"] {
            let _ = fs::remove_file(run.join(format!("{iface}.{ext}")));
        }
    }
}

/// Undoes the octal escapes (`\040` for space) of /proc/self/mountinfo.
fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

fn mounts_in(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by(|a, b| {
        b.components()
            .count()
            .cmp(&a.components().count())
            .then_with(|| b.cmp(a))
    });
    v
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|mi| mounts_in(&mi, dir))
        .unwrap_or_default()
}

fn unmount_under(dir: &Path, report: &mut DownReport) {
    // Stacked mounts show up once per layer; a few rounds peel them all.
    for _round in 0..8 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        let mut progress = false;
        for m in mounts {
            match umount2(&m, MntFlags::MNT_DETACH) {
                Ok(()) => {
                    progress = true;
                    if !report.unmounted.contains(&m) {
                        report.unmounted.push(m);
                    }
                }
                Err(Errno::EINVAL | Errno::ENOENT) => {}
                Err(e) => report
                    .errors
                    .push(format!("unmounting {}: {e}", m.display())),
            }
        }
        if !progress {
            break;
        }
    }
}

fn remove_cgroups(roots: &[PathBuf], report: &mut DownReport) {
    for dir in cgroup_tree(roots) {
        let deadline = Instant::now() + CGROUP_RMDIR_PATIENCE;
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => {
                    report.cgroups_removed.push(dir.clone());
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                // A cgroup whose last process is still exiting is busy for a moment.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    report
                        .errors
                        .push(format!("removing cgroup {}: {e}", dir.display()));
                    break;
                }
            }
        }
    }
}

/// True when root-namespace link `link` is a veth whose peer sits in namespace `ns`.
fn link_peer_in(link: &str, ns: &str) -> bool {
    if !root_link_exists(link) {
        return false;
    }
    ip_output(&["-o", "link", "show", "dev", link]).is_ok_and(|out| {
        out.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w == ["link-netns", ns])
    })
}

fn remove_root_link(link: &str, report: &mut DownReport) {
    // Deleting the underlay namespace destroys the veth pair, asynchronously; wait, then insist.
    let deadline = Instant::now() + LINK_GONE_PATIENCE;
    while root_link_exists(link) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if root_link_exists(link) {
        if let Err(e) = ip(&["link", "del", link]) {
            if root_link_exists(link) {
                report.errors.push(e.to_string());
                return;
            }
        }
    }
    report.links_removed.push(link.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_validate() {
        for ok in ["rudder", "a", "t1-1234567", "abcdefghijkl", "0-9"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "abcdefghijklm", "A", "a_b", "a/b", "..", "a b"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn interface_names_fit_ifnamsiz() {
        for name in [
            root_link_name(250),
            root_peer_name(250),
            host_port_name(250, 250),
        ] {
            assert!(name.len() <= 15, "{name}");
        }
        assert_eq!(host_port_name(3, 2), "v3h2");
        assert_eq!(host_addr(7, 2), Ipv4Addr::new(10, 213, 7, 2));
    }

    #[test]
    fn config_validation() {
        let base = LabConfig {
            nodes: 2,
            ..LabConfig::default()
        };
        assert!(base.validate().is_ok());
        for bad in [
            LabConfig {
                nodes: 0,
                ..base.clone()
            },
            LabConfig {
                nodes: 251,
                ..base.clone()
            },
            LabConfig {
                managers: 0,
                ..base.clone()
            },
            LabConfig {
                managers: 3,
                ..base.clone()
            },
            LabConfig {
                runtime: "docker".into(),
                ..base.clone()
            },
            LabConfig {
                name: "Bad".into(),
                ..base.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn marker_does_not_match_sibling_lab() {
        let m = LabMarker::new(Path::new("/var/lib/rudder-lab/a"));
        assert!(m.matches(b"agent\0--data-dir\0/var/lib/rudder-lab/a/h1/data\0"));
        assert!(m.matches(b"x\0/var/lib/rudder-lab/a\0"));
        assert!(!m.matches(b"agent\0--data-dir\0/var/lib/rudder-lab/ab/h1/data\0"));
        assert!(!m.matches(b"tail\0/var/lib/rudder-lab/a"));
    }

    #[test]
    fn indexed_names() {
        assert!(is_indexed("rdr-x-h12", "rdr-x-h"));
        assert!(!is_indexed("rdr-x-h", "rdr-x-h"));
        assert!(!is_indexed("rdr-x-h1-h1", "rdr-x-h"));
        assert!(!is_indexed("rdr-x-ul", "rdr-x-h"));
    }

    #[test]
    fn mountinfo_parsing_is_deepest_first_and_unescaped() {
        let mi = "\
22 1 0:21 / /proc rw - proc proc rw
90 22 0:50 / /lab/x/h1/data/mnt rw - tmpfs none rw
91 90 0:51 / /lab/x/h1/data/mnt/deeper rw - tmpfs none rw
92 22 0:52 / /lab/x/h1/with\\040space rw - tmpfs none rw
93 22 0:53 / /lab/xy/h1 rw - tmpfs none rw
";
        let got = mounts_in(mi, Path::new("/lab/x"));
        assert_eq!(
            got,
            vec![
                PathBuf::from("/lab/x/h1/data/mnt/deeper"),
                PathBuf::from("/lab/x/h1/data/mnt"),
                PathBuf::from("/lab/x/h1/with space"),
            ]
        );
    }

    #[test]
    fn log_tail_keeps_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let body: String = (0..100).map(|i| format!("line {i}\n")).collect();
        fs::write(&p, body).unwrap();
        let tail = log_tail(&p);
        assert!(tail.starts_with("line 80"), "{tail}");
        assert!(tail.ends_with("line 99"));
        assert_eq!(log_tail(&dir.path().join("missing")), "(no log)");
    }

    // ---- real labs (root, network namespaces) --------------------------------------------------

    /// Stand-in binaries: python scripts that keep their arguments in their command line (so
    /// `down` can recognise them) and do the few things the real binaries do that `down` must
    /// undo.
    struct StandIns {
        agent: PathBuf,
        controller: PathBuf,
    }

    const AGENT_SCRIPT: &str = r#"
import json, os, subprocess, sys, time
args = sys.argv[1:]
def opt(n):
    return args[args.index(n) + 1]
data = opt("--data-dir")
if "--test-extras" in args:
    # Like a real agent: a container process in the lab's cgroups, a shim naming its
    # container dir, and a mount under the data dir.
    cg = opt("--cgroup-parent")
    dirs = ["/sys/fs/cgroup/pids" + cg + "/c1", "/sys/fs/cgroup/memory" + cg + "/c1"]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    ctr = subprocess.Popen(["sleep", "1000"])
    for d in dirs:
        with open(d + "/cgroup.procs", "w") as f:
            f.write(str(ctr.pid))
    cdir = data + "/containers/c1"
    os.makedirs(cdir, exist_ok=True)
    shim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)",
                             "shim", "--dir", cdir], start_new_session=True)
    mnt = data + "/mnt"
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", mnt], check=True)
    with open(data + "/extras.json.tmp", "w") as f:
        json.dump({"ctr": ctr.pid, "shim": shim.pid, "mnt": mnt, "cgroups": dirs}, f)
    os.rename(data + "/extras.json.tmp", data + "/extras.json")
time.sleep(1000)
"#;

    const CONTROLLER_SCRIPT: &str = r#"
import os, socket, sys
args = sys.argv[1:]
# Like a first controller: the admin credentials and join tokens, before serving.
admin = os.path.join(args[args.index("--data-dir") + 1], "admin")
os.makedirs(admin, exist_ok=True)
for name in ("worker.token", "manager.token"):
    with open(os.path.join(admin, name), "w") as f:
        f.write("RDR1-test")
host, port = args[args.index("--listen") + 1].rsplit(":", 1)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port)))
s.listen(16)
while True:
    c, _ = s.accept()
    c.close()
"#;

    fn python() -> String {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        fs::write(&p, format!("#!{}\n{body}", python())).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// Fields drop in order: the lab guard runs `down` before the temp dirs go.
    struct TestLab {
        guard: Option<DownGuard>,
        root: tempfile::TempDir,
        _bins: tempfile::TempDir,
        bins: StandIns,
        name: String,
    }

    struct DownGuard {
        root: PathBuf,
        name: String,
    }

    impl Drop for DownGuard {
        fn drop(&mut self) {
            if let Err(e) = down(&self.root, &self.name) {
                eprintln!("cleanup guard: {e}");
            }
        }
    }

    impl TestLab {
        fn new(tag: &str) -> Self {
            let bins_dir = tempfile::tempdir().unwrap();
            let bins = StandIns {
                agent: write_script(bins_dir.path(), "rudder-agent", AGENT_SCRIPT),
                controller: write_script(bins_dir.path(), "rudder-controller", CONTROLLER_SCRIPT),
            };
            let root = tempfile::tempdir().unwrap();
            let name = format!("{tag}-{}", std::process::id());
            Self {
                guard: Some(DownGuard {
                    root: root.path().to_path_buf(),
                    name: name.clone(),
                }),
                root,
                _bins: bins_dir,
                bins,
                name,
            }
        }

        fn config(&self, nodes: u32) -> LabConfig {
            LabConfig {
                name: self.name.clone(),
                nodes,
                managers: 1,
                root: self.root.path().to_path_buf(),
                agent_bin: self.bins.agent.clone(),
                controller_bin: self.bins.controller.clone(),
                rudder_bin: None,
                runtime: "auto".into(),
                extra_agent_args: Vec::new(),
                extra_controller_args: Vec::new(),
            }
        }
    }

    fn netns_ino(ns: &str) -> u64 {
        fs::metadata(netns_path(ns)).unwrap().ino()
    }

    fn pid_netns_ino(pid: i32) -> u64 {
        fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino()
    }

    fn lab_netns(name: &str) -> Vec<String> {
        let hosts = format!("rdr-{name}-h");
        let ul = underlay_netns_name(name);
        fs::read_dir(NETNS_DIR)
            .map(|it| {
                it.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| *n == ul || is_indexed(n, &hosts))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn wait_until(what: &str, patience: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + patience;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ip_forward_in(ns: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "cat", "/proc/sys/net/ipv4/ip_forward"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn up_builds_a_reachable_lab_and_down_removes_every_trace() {
        let mut t = TestLab::new("t1");
        let mut cfg = t.config(2);
        cfg.extra_agent_args = vec!["--test-extras".into()];
        let lab = up(&cfg).expect("up");
        let k = lab.subnet_index;

        // Record, listing, context.
        assert_eq!(load(t.root.path(), &t.name).unwrap(), lab);
        assert_eq!(list(t.root.path()), vec![t.name.clone()]);
        let ctx: serde_json::Value =
            serde_json::from_slice(&fs::read(&lab.context_path).unwrap()).unwrap();
        assert_eq!(ctx["controller"], format!("http://10.213.{k}.1:4243"));
        assert_eq!(ctx["registry"], format!("10.213.{k}.1:5000"));
        assert_eq!(ctx["name"], t.name.as_str());

        // Namespaces and links.
        let mut ns = lab_netns(&t.name);
        ns.sort();
        assert_eq!(
            ns,
            vec![
                format!("rdr-{}-h1", t.name),
                format!("rdr-{}-h2", t.name),
                format!("rdr-{}-ul", t.name),
            ]
        );
        assert!(root_link_exists(&lab.root_link()));
        assert_eq!(ip_forward_in(&lab.hosts[1].netns), "1");

        // Host to host across the bridge, and root namespace to the controller.
        let ping = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.hosts[1].netns,
                "busybox",
                "ping",
                "-c1",
                "-W1",
            ])
            .arg(lab.hosts[0].addr.to_string())
            .output()
            .unwrap();
        assert!(ping.status.success(), "{ping:?}");
        TcpStream::connect_timeout(
            &SocketAddr::V4(lab.first_controller_addr()),
            Duration::from_secs(2),
        )
        .expect("controller reachable from the root namespace");

        // Processes alive, each in its host's namespace.
        let ctrl = lab.hosts[0].controller_pid.expect("controller pid");
        assert_eq!(lab.hosts[1].controller_pid, None);
        assert!(pid_alive(ctrl));
        assert_eq!(pid_netns_ino(ctrl), netns_ino(&lab.hosts[0].netns));
        for h in &lab.hosts {
            let pid = h.agent_pid.expect("agent pid");
            assert!(pid_alive(pid));
            assert_eq!(pid_netns_ino(pid), netns_ino(&h.netns), "{}", h.name);
        }
        // Same mount namespace as us: mounts made by lab processes are visible here.
        assert_eq!(
            fs::metadata(format!("/proc/{ctrl}/ns/mnt")).unwrap().ino(),
            fs::metadata("/proc/self/ns/mnt").unwrap().ino()
        );

        // A second lab with the same name is refused and leaves the first untouched.
        assert!(matches!(up(&cfg), Err(LabError::Exists { .. })));
        assert!(pid_alive(ctrl));

        // Things the agents made, which down must undo.
        // Every agent makes its extras (one mount each): wait for all, not just the first.
        for h in &lab.hosts {
            let p = h.data_dir.join("extras.json");
            wait_until("agent extras", Duration::from_secs(10), || p.is_file());
        }
        let extras_path = lab.hosts[0].data_dir.join("extras.json");
        let extras: serde_json::Value =
            serde_json::from_slice(&fs::read(&extras_path).unwrap()).unwrap();
        let ctr = extras["ctr"].as_i64().unwrap() as i32;
        let shim = extras["shim"].as_i64().unwrap() as i32;
        assert!(pid_alive(ctr) && pid_alive(shim));
        assert!(!mounts_under(&lab.dir).is_empty());

        let report = down(t.root.path(), &t.name).expect("down");
        t.guard = None;
        assert!(report.errors.is_empty(), "{report}");
        assert!(report.processes_stopped.contains(&ctrl), "{report}");
        assert!(report.processes_killed.contains(&ctr), "{report}");
        assert!(report.processes_killed.contains(&shim), "{report}");
        assert_eq!(report.netns_removed.len(), 3, "{report}");
        assert_eq!(report.links_removed, vec![lab.root_link()]);
        assert_eq!(report.state_dir_removed.as_deref(), Some(lab.dir.as_path()));
        assert!(report.unmounted.len() >= 2, "{report}");
        assert!(report.cgroups_removed.len() >= 4, "{report}");

        assert!(lab_netns(&t.name).is_empty());
        assert!(!root_link_exists(&lab.root_link()));
        assert!(!lab.dir.exists());
        assert!(mounts_under(&lab.dir).is_empty());
        for pid in lab
            .hosts
            .iter()
            .filter_map(|h| h.agent_pid)
            .chain([ctrl, ctr, shim])
        {
            assert!(!pid_alive(pid), "pid {pid} survived");
        }
        for h in cgroup_hierarchies() {
            for host in &lab.hosts {
                let cg = h.join(host.cgroup_parent.trim_start_matches('/'));
                assert!(!cg.exists(), "{}", cg.display());
            }
        }
        assert!(list(t.root.path()).is_empty());

        // Idempotent.
        let again = down(t.root.path(), &t.name).expect("second down");
        assert!(again.is_empty(), "{again}");
    }

    #[test]
    fn down_of_a_missing_lab_is_ok() {
        let root = tempfile::tempdir().unwrap();
        let report = down(root.path(), "nosuch").expect("down");
        assert!(report.is_empty(), "{report}");
        let report = down(&root.path().join("not-even-a-root"), "nosuch").expect("down");
        assert!(report.is_empty());
        assert!(matches!(
            load(root.path(), "nosuch"),
            Err(LabError::NotFound { .. })
        ));
    }

    #[test]
    fn failed_up_tears_down_the_half_built_lab() {
        let t = TestLab::new("tf");
        let mut cfg = t.config(2);
        cfg.agent_bin = t.root.path().join("no-such-agent");
        let err = up(&cfg).expect_err("up must fail");
        assert!(matches!(err, LabError::Spawn { .. }), "{err}");

        let dir = canonical_root(t.root.path()).join(&t.name);
        assert!(!dir.exists(), "state dir left behind");
        assert!(lab_netns(&t.name).is_empty(), "{:?}", lab_netns(&t.name));
        // The controller had started before the agent failed: it must be gone too.
        assert!(marked_pids(&LabMarker::new(&dir)).is_empty());
    }

    #[test]
    fn controller_that_exits_fails_up_with_its_log() {
        let t = TestLab::new("tc");
        let bins = tempfile::tempdir().unwrap();
        let bad = bins.path().join("rudder-controller");
        fs::write(&bad, "#!/bin/sh\necho 'boom: cannot bind' >&2\nexit 3\n").unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&bad, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut cfg = t.config(1);
        cfg.controller_bin = bad;
        let err = up(&cfg).expect_err("up must fail");
        assert!(matches!(err, LabError::Exited { .. }), "{err}");
        assert!(err.to_string().contains("boom: cannot bind"), "{err}");
        assert!(lab_netns(&t.name).is_empty());
        assert!(!canonical_root(t.root.path()).join(&t.name).exists());
    }

    #[test]
    fn down_without_a_record_still_cleans_up_and_labs_share_a_root() {
        let t = TestLab::new("tr");
        let lab = up(&t.config(1)).expect("up");
        // A second lab in the same root takes a different subnet.
        let other_name = format!("{}-b", t.name);
        let _other_guard = DownGuard {
            root: t.root.path().to_path_buf(),
            name: other_name.clone(),
        };
        let other = up(&LabConfig {
            name: other_name.clone(),
            ..t.config(1)
        })
        .expect("second lab");
        assert_ne!(other.subnet_index, lab.subnet_index);
        let mut names = list(t.root.path());
        names.sort();
        assert_eq!(names, vec![t.name.clone(), other_name.clone()]);

        // Lose the record: down must still find namespaces by name and processes by path.
        fs::remove_file(lab.dir.join(RECORD_FILE)).unwrap();
        let report = down(t.root.path(), &t.name).expect("down");
        assert_eq!(report.netns_removed.len(), 2, "{report}");
        for pid in lab
            .hosts
            .iter()
            .flat_map(|h| [h.agent_pid, h.controller_pid])
            .flatten()
        {
            assert!(report.processes_killed.contains(&pid), "{report}");
            assert!(!pid_alive(pid));
        }
        assert!(lab_netns(&t.name).is_empty());
        assert!(!lab.dir.exists());
        // The underlay went with its namespace, taking the root link with it.
        wait_until("root link gone", Duration::from_secs(3), || {
            !root_link_exists(&lab.root_link())
        });

        // The other lab is untouched.
        assert!(other
            .hosts
            .iter()
            .all(|h| h.agent_pid.is_some_and(pid_alive)));
        assert_eq!(lab_netns(&other_name).len(), 2);
        down(t.root.path(), &other_name).expect("down other");
        assert!(lab_netns(&other_name).is_empty());
    }
}

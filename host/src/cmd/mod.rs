//! The `rudder` commands, one file each, and what they share: the host flags `init` and `join`
//! take, writing the config, starting and stopping the units, joining the agent.

pub mod config_check;
pub mod init;
pub mod join;
pub mod leave;

use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::advertise::{self, SourceProbe, Target};
use crate::config::{self, HostConfig};

/// The packaged units (`pkg`): `ExecStart=/usr/bin/rudder-<daemon> --config /etc/rudder/rudder.toml`.
pub const CONTROLLER_UNIT: &str = "rudder-controller";
/// See [`CONTROLLER_UNIT`].
pub const AGENT_UNIT: &str = "rudder-agent";
/// Written beside the config by `rudder join` on a manager: the controller joins with it on
/// its first start.
pub const JOIN_TOKEN_FILE: &str = "join.token";
/// How long `init`/`join` wait for a controller to serve.
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Who starts the daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Start {
    /// systemd when it runs this host (`/run/systemd/system`), else refuse.
    Auto,
    /// `systemctl enable --now` the units.
    Systemd,
    /// Nobody: the caller runs the daemons with `--config` (the lab does).
    None,
}

impl Start {
    /// `Auto` decided.
    pub fn resolve(self) -> anyhow::Result<Start> {
        match self {
            Start::Auto if Path::new("/run/systemd/system").is_dir() => Ok(Start::Systemd),
            Start::Auto => bail!(
                "systemd does not run this host: pass --start none and start rudder-controller \
                 and rudder-agent with --config yourself"
            ),
            s => Ok(s),
        }
    }
}

/// The settings `init` and `join` take; each becomes a key of the config file they write (the
/// flags of the top layer, over what the file already says).
#[derive(Debug, Clone, clap::Args)]
pub struct HostOpts {
    /// The config file to write (read first when it exists: its settings are kept).
    #[arg(long, default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Who starts the daemons.
    #[arg(long, value_enum, default_value = "auto")]
    pub start: Start,
    /// The address the other hosts reach this one at.
    #[arg(long)]
    pub advertise_addr: Option<IpAddr>,
    /// Bind every listener (gRPC, registry, agent API) to this address instead of 0.0.0.0.
    #[arg(long)]
    pub listen_addr: Option<IpAddr>,
    /// Root of this host's state [default: /var/lib/rudder].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The agent's own data dir [default: <data-dir>/agent].
    #[arg(long)]
    pub agent_data_dir: Option<PathBuf>,
    /// The OCI runtime's state root [default: <agent data dir>/runc].
    #[arg(long)]
    pub runtime_root: Option<PathBuf>,
    /// The host's name [default: the kernel's host name].
    #[arg(long)]
    pub node_name: Option<String>,
    /// `auto`, `runc`, `crun` or a path.
    #[arg(long)]
    pub runtime: Option<String>,
    /// Cgroup parent of the containers [default: /rudder].
    #[arg(long)]
    pub cgroup_parent: Option<String>,
    /// Controllers the agent starts with (comma-separated URLs or host:port) [default: init
    /// this host's, join ADDR]; it learns the others from them.
    #[arg(long)]
    pub controllers: Option<String>,
    /// Raft id of this host's controller (managers only) [default: init 1, join a random one].
    #[arg(long)]
    pub raft_id: Option<u64>,
    /// A label of this host (repeatable), written to `[labels]`; placement constraints name
    /// it `engine.labels.KEY`. Any `--label` replaces the file's labels.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = config::parse_label)]
    pub labels: Vec<(String, String)>,
}

impl HostOpts {
    /// The flags as a config layer; `manager` gives it a `[controller]` section.
    pub fn layer(&self, manager: bool) -> HostConfig {
        let at = |port: u16| self.listen_addr.map(|ip| SocketAddr::new(ip, port));
        HostConfig {
            data_dir: self.data_dir.clone(),
            node_name: self.node_name.clone(),
            advertise_addr: self.advertise_addr,
            log_level: None,
            labels: (!self.labels.is_empty()).then(|| self.labels.iter().cloned().collect()),
            controller: manager.then(|| config::ControllerSection {
                listen: at(config::CONTROLLER_PORT),
                registry_listen: at(config::REGISTRY_PORT),
                raft_id: self.raft_id,
                ..Default::default()
            }),
            agent: config::AgentSection {
                data_dir: self.agent_data_dir.clone(),
                controllers: self
                    .controllers
                    .as_ref()
                    .map(|l| l.split(',').map(|s| s.trim().to_string()).collect()),
                listen: at(config::AGENT_PORT),
                runtime: self.runtime.clone(),
                runtime_root: self.runtime_root.clone(),
                cgroup_parent: self.cgroup_parent.clone(),
                ..Default::default()
            },
            join: Default::default(),
        }
    }
}

/// `opts` with the advertise address filled in when neither they nor the file give the
/// daemons one: the address this host reaches `towards` from (printed). Done before anything
/// is written or joined, so a host without a usable address is refused untouched.
pub fn with_advertise(
    opts: &HostOpts,
    file: &HostConfig,
    towards: &[Target],
    manager: bool,
    probe: &dyn SourceProbe,
) -> anyhow::Result<HostOpts> {
    let mut c = config::merge(&[opts.layer(manager), file.clone()]);
    let mut opts = opts.clone();
    if let Some(d) = advertise::fill(&mut c, probe, towards, manager, true)? {
        println!("{d}");
        opts.advertise_addr = Some(d.addr);
    }
    Ok(opts)
}

/// What the file at `path` says already (nothing when it does not exist).
pub fn existing(path: &Path) -> anyhow::Result<HostConfig> {
    if !path.exists() {
        return Ok(HostConfig::default());
    }
    Ok(config::load(path)?)
}

/// Refuses a host that is already part of a cluster: its agent has a certificate, or its
/// controller has state.
pub fn refuse_member(c: &HostConfig) -> anyhow::Result<()> {
    let agent = c.agent()?;
    let certs = agent.data_dir.join("certs");
    let controller = c.controller()?.data_dir;
    let busy = |d: &Path| {
        d.read_dir()
            .map(|mut e| e.next().is_some())
            .unwrap_or(false)
    };
    for (dir, what) in [
        (&certs, "an agent certificate"),
        (&controller, "controller state"),
    ] {
        if busy(dir) {
            bail!(
                "this host is already part of a cluster ({what} in {}): run `rudder leave` \
                 first, or remove that directory if the cluster is gone",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Makes `dir` (and missing parents) and sets it to `mode`.
pub fn make_dir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// Writes the config (0600: it may name a token file, and only root reads it) and makes the
/// data dirs (0700).
pub fn write_config(path: &Path, c: &HostConfig) -> anyhow::Result<()> {
    c.validate()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            make_dir(parent, 0o755)?;
        }
    }
    let body = format!(
        "# Rudder host config, written by `rudder`; see `rudder config check`.\n{}",
        c.to_toml()?
    );
    rudder_pki::ca::write_atomic(path, body.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    make_dir(&c.data_dir(), 0o700)?;
    make_dir(&c.agent()?.data_dir, 0o700)?;
    if c.controller.is_some() {
        make_dir(&c.controller()?.data_dir, 0o700)?;
    }
    Ok(())
}

/// Runs `systemctl ARGS`.
pub fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("systemctl")
        .args(args)
        .status()
        .context("running systemctl")?;
    if !status.success() {
        bail!("systemctl {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// An address to dial for a listener bound to `listen` (the unspecified address: loopback).
pub fn dial_addr(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), listen.port())
    } else {
        listen
    }
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_serving(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the controller at {addr} did not serve within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Checks that `addr` (`host:port`) takes TCP connections, for a clear error before a join.
pub fn reachable(addr: &str) -> anyhow::Result<()> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("{addr:?} is not a host:port of a controller"))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(3)) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => bail!("cannot reach the controller at {addr}: {e}"),
        None => bail!("{addr:?} resolves to no address"),
    }
}

/// Joins this host's agent with `token` through the controller at `addr` (`host:port`): a new
/// node id and key, the certificate saved where the agent looks for it, so the agent starts
/// already a member and never needs the token. Returns the role the token granted.
pub fn join_agent(
    agent_data_dir: &Path,
    addr: &str,
    token: &str,
) -> anyhow::Result<rudder_pki::ca::Role> {
    let node_id_path = agent_data_dir.join("node_id");
    let node_id = match std::fs::read_to_string(&node_id_path) {
        Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
        _ => hex::encode(rand::random::<[u8; 8]>()),
    };
    let url = format!("https://{addr}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (certs, token_role) = rt
        // A manager token too gives the agent a worker certificate: controllers dial agents
        // as workers (the host's controller joins with the token's own role).
        .block_on(rudder_pki::join::join_cluster_as(
            &url,
            token,
            &node_id,
            rudder_pki::ca::Role::Worker,
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    make_dir(agent_data_dir, 0o700)?;
    rudder_pki::ca::write_atomic(&node_id_path, node_id.as_bytes(), 0o600)?;
    certs.save(&agent_data_dir.join("certs"))?;
    Ok(token_role)
}

/// Waits for the controller of `c` to serve (after its unit started).
pub fn wait_controller(c: &HostConfig) -> anyhow::Result<()> {
    wait_serving(dial_addr(c.controller()?.listen), SERVE_TIMEOUT)
}

//! The host config file, `/etc/rudder/rudder.toml`: one file per host that both daemons read
//! (`--config PATH`) and that `rudder init`/`rudder join` write.
//!
//! Every setting comes from four layers, highest first: command-line flags, the environment
//! (`RUDDER_*`, see [`ENV_KEYS`]), the file, built-in defaults. Each layer is a [`HostConfig`]
//! whose fields are all optional; [`merge`] stacks them (pure, table-tested) and
//! [`HostConfig::controller`] / [`HostConfig::agent`] fill in the defaults.
//!
//! Invariants:
//! - An unknown key or a bad value in the file is an error naming the key and its line
//!   (`deny_unknown_fields` plus toml's spans); so is a bad `RUDDER_*` variable, by name.
//! - The file is at most [`MAX_FILE_SIZE`] bytes, and is refused when group or others may
//!   write it (they could point the daemons, which run as root, anywhere), or — when it holds a
//!   join token — read it.
//! - A token is never printed: [`HostConfig::redacted`] is what `rudder config check` shows.
//! - `[labels]` follow the host-label grammar and limits (`rudder_model::node::check_label`,
//!   at most 64); a bad one is refused here, naming the key and its line, before the
//!   controller would refuse the agent's registration for it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the packaged units look for the file.
pub const DEFAULT_PATH: &str = "/etc/rudder/rudder.toml";
/// Largest config file read; a host config is a few hundred bytes.
pub const MAX_FILE_SIZE: u64 = 64 * 1024;
/// Default root of the host's state; the controller and agent each get a subdirectory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/rudder";
/// The controller's gRPC port (rctl, agents, the other controllers' raft traffic).
pub const CONTROLLER_PORT: u16 = 4243;
/// The controller's OCI registry port.
pub const REGISTRY_PORT: u16 = 5000;
/// The agent's API port (logs, exec, cp, stats from the controllers).
pub const AGENT_PORT: u16 = 4245;
/// The controller's HTTPS `/metrics` port.
pub const CONTROLLER_METRICS_PORT: u16 = 4246;
/// The agent's HTTPS `/metrics` port.
pub const AGENT_METRICS_PORT: u16 = 4247;
/// The WireGuard UDP port of encrypted overlay networks.
pub const WG_PORT: u16 = 51820;
/// What replaces a token wherever a config is shown.
pub const REDACTED: &str = "<redacted>";

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {path} is {size} bytes; a host config may be at most {MAX_FILE_SIZE}")]
    TooLarge { path: PathBuf, size: u64 },
    #[error(
        "config: {path} has mode {mode:04o}: group or others may write it, and the daemons \
         that read it run as root; chmod go-w {path}"
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "config: {path} holds a join token but has mode {mode:04o}: anyone who can read it can \
         join the cluster; chmod 600 {path}"
    )]
    TokenReadable { path: PathBuf, mode: u32 },
    #[error("config: {path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("config: environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config: {0}")]
    Invalid(String),
    #[error("config: reading the token file: {0}")]
    TokenFile(#[from] rudder_pki::ca::CaError),
}

/// A `host:port` that can also be `off` (metrics, dashboard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Listen(pub Option<SocketAddr>);

impl TryFrom<String> for Listen {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        rudder_pki::scrape::parse_listen(&s).map(|l| Listen(l.0))
    }
}

impl From<Listen> for String {
    fn from(l: Listen) -> String {
        l.to_string()
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("off"),
        }
    }
}

/// A `tracing` filter such as `info` or `info,rudder_agent=debug`, checked when read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LogLevel(String);

impl LogLevel {
    /// The filter text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for LogLevel {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        tracing_subscriber::EnvFilter::try_new(&s)
            .map(|_| LogLevel(s.clone()))
            .map_err(|e| format!("{s:?} is not a log filter ({e}); for example info or debug"))
    }
}

impl From<LogLevel> for String {
    fn from(l: LogLevel) -> String {
        l.0
    }
}

/// Whether the host's agent also runs a controller (placement's `node.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Worker,
    Manager,
}

impl Role {
    /// `worker` or `manager`, as the agent's `--role` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Manager => "manager",
        }
    }
}

/// One layer of settings: the file's layout, every field optional. Flags and the environment
/// are turned into this type too, so one [`merge`] serves all layers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Root of this host's state: the controller uses `<data_dir>/controller`, the agent
    /// `<data_dir>/agent` (each can be moved by its own section's `data_dir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// The host's name (the agent's hostname, the controller's log name); default: the
    /// kernel's host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The address other hosts reach this one at; the default advertise address of both
    /// daemons and the address the agent listens on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<IpAddr>,
    /// Log filter, unless `RUST_LOG` is set (default `info`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
    /// The host's own labels (`[labels]`), sent by the agent when it registers; placement
    /// constraints name them `engine.labels.KEY`. The operator's labels (`rctl node update
    /// --label-add`, `node.labels.KEY`) are kept apart and never set from here. A layer that
    /// sets labels replaces the whole set of the layers below it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Present when this host runs a controller (a manager).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<ControllerSection>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub agent: AgentSection,
    #[serde(default, skip_serializing_if = "is_default")]
    pub join: JoinSection,
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

/// `[controller]`: the controller of a manager host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// gRPC API (rctl, agents, raft between controllers); default `0.0.0.0:4243`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `host:port` the others reach the gRPC API at; default `<advertise_addr>:<listen port>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// OCI registry; default `0.0.0.0:5000`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_advertise: Option<String>,
    /// Unique in the controller group, never reused; default 1 (the first controller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raft_id: Option<u64>,
    /// gRPC `host:port` of a controller to join on the first start (with the join token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<Listen>,
    /// Plain-HTTP `/metrics` for anyone who reaches it; off unless set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// Web dashboard; default off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dashboard_listen: Option<Listen>,
}

/// `[agent]`: the agent every host runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Controller URLs or `host:port`s; any live one leads to the leader.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controllers: Option<Vec<String>>,
    /// Agent API; default `<advertise_addr>:4245`, else `0.0.0.0:4245`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Default: `manager` when the file has a `[controller]` section, else `worker`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// `auto`, `runc`, `crun` or a path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_root: Option<PathBuf>,
    /// Cgroup under which every container's cgroup is made; default `/rudder`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_parent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_favor_dynmods: Option<bool>,
    /// UDP port of the WireGuard interface; default 51820.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wg_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<Listen>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
}

/// `[join]`: the token a daemon joins with on its first start (afterwards its certificate in
/// the data dir is used). Set `token_file` (a 0600 file) rather than `token`.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl fmt::Debug for JoinSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinSection")
            .field("token", &self.token.as_ref().map(|_| REDACTED))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// Where a daemon's join token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    Inline(String),
    File(PathBuf),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Inline(_) => f.write_str("Inline(<redacted>)"),
            TokenSource::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl TokenSource {
    /// The token (reads a token file, refusing one others may read).
    pub fn load(&self) -> Result<String, ConfigError> {
        match self {
            TokenSource::Inline(t) => Ok(t.clone()),
            TokenSource::File(p) => Ok(rudder_pki::ca::read_token_file(p)?),
        }
    }
}

/// A `--label KEY=VALUE` flag, checked as a config's label is.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    rudder_model::node::check_label(k, v).map_err(|e| e.to_string())?;
    Ok((k.to_string(), v.to_string()))
}

/// Stacks layers, highest first: each field takes the value of the first layer that sets it.
/// `token` and `token_file` count as one setting, so a flag's `--token-file` beats a file's
/// `token`.
pub fn merge(layers: &[HostConfig]) -> HostConfig {
    fn first<T: Clone>(
        layers: &[HostConfig],
        get: impl Fn(&HostConfig) -> Option<&T>,
    ) -> Option<T> {
        layers.iter().find_map(|l| get(l).cloned())
    }
    let controller = if layers.iter().any(|l| l.controller.is_some()) {
        let c = |l: &HostConfig| l.controller.clone().unwrap_or_default();
        let cs: Vec<ControllerSection> = layers.iter().map(c).collect();
        Some(ControllerSection {
            data_dir: cs.iter().find_map(|s| s.data_dir.clone()),
            listen: cs.iter().find_map(|s| s.listen),
            advertise: cs.iter().find_map(|s| s.advertise.clone()),
            registry_listen: cs.iter().find_map(|s| s.registry_listen),
            registry_advertise: cs.iter().find_map(|s| s.registry_advertise.clone()),
            raft_id: cs.iter().find_map(|s| s.raft_id),
            join: cs.iter().find_map(|s| s.join.clone()),
            metrics_listen: cs.iter().find_map(|s| s.metrics_listen),
            metrics_addr: cs.iter().find_map(|s| s.metrics_addr),
            dashboard_listen: cs.iter().find_map(|s| s.dashboard_listen),
        })
    } else {
        None
    };
    let a: Vec<&AgentSection> = layers.iter().map(|l| &l.agent).collect();
    let agent = AgentSection {
        data_dir: a.iter().find_map(|s| s.data_dir.clone()),
        controllers: a.iter().find_map(|s| s.controllers.clone()),
        listen: a.iter().find_map(|s| s.listen),
        role: a.iter().find_map(|s| s.role),
        runtime: a.iter().find_map(|s| s.runtime.clone()),
        runtime_root: a.iter().find_map(|s| s.runtime_root.clone()),
        cgroup_parent: a.iter().find_map(|s| s.cgroup_parent.clone()),
        cgroup_favor_dynmods: a.iter().find_map(|s| s.cgroup_favor_dynmods),
        wg_port: a.iter().find_map(|s| s.wg_port),
        metrics_listen: a.iter().find_map(|s| s.metrics_listen),
        metrics_addr: a.iter().find_map(|s| s.metrics_addr),
    };
    let join = layers
        .iter()
        .map(|l| &l.join)
        .find(|j| j.token.is_some() || j.token_file.is_some())
        .cloned()
        .unwrap_or_default();
    HostConfig {
        data_dir: first(layers, |l| l.data_dir.as_ref()),
        node_name: first(layers, |l| l.node_name.as_ref()),
        advertise_addr: first(layers, |l| l.advertise_addr.as_ref()),
        log_level: first(layers, |l| l.log_level.as_ref()),
        labels: first(layers, |l| l.labels.as_ref()),
        controller,
        agent,
        join,
    }
}

/// Everything `rudder-controller` needs from the config, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerSettings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    pub registry_listen: SocketAddr,
    pub registry_advertise: Option<String>,
    pub raft_id: u64,
    pub join: Option<String>,
    pub token: Option<TokenSource>,
    pub node_name: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub dashboard_listen: Option<SocketAddr>,
    pub log_level: String,
}

/// Everything `rudder-agent` needs from the config, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSettings {
    pub data_dir: PathBuf,
    pub controllers: Vec<String>,
    pub listen: SocketAddr,
    pub hostname: Option<String>,
    pub role: Role,
    pub runtime: String,
    pub runtime_root: PathBuf,
    pub cgroup_parent: String,
    pub cgroup_favor_dynmods: bool,
    pub wg_port: u16,
    pub token: Option<TokenSource>,
    pub metrics_listen: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub log_level: String,
    /// The host's labels, checked.
    pub labels: BTreeMap<String, String>,
}

fn unspecified() -> IpAddr {
    IpAddr::from([0, 0, 0, 0])
}

impl HostConfig {
    /// The host's state root.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }

    /// The join token's source, if any.
    pub fn token(&self) -> Result<Option<TokenSource>, ConfigError> {
        match (&self.join.token, &self.join.token_file) {
            (Some(_), Some(_)) => Err(ConfigError::Invalid(
                "[join] sets both token and token_file: keep one (token_file, a 0600 file, is \
                 safer)"
                    .into(),
            )),
            (Some(t), None) => Ok(Some(TokenSource::Inline(t.clone()))),
            (None, Some(p)) => Ok(Some(TokenSource::File(p.clone()))),
            (None, None) => Ok(None),
        }
    }

    fn log_level_or_default(&self) -> String {
        self.log_level
            .as_ref()
            .map_or_else(|| "info".to_string(), |l| l.as_str().to_string())
    }

    /// The controller's settings (the `[controller]` section may be absent: all defaults).
    pub fn controller(&self) -> Result<ControllerSettings, ConfigError> {
        let c = self.controller.clone().unwrap_or_default();
        let listen = c
            .listen
            .unwrap_or_else(|| SocketAddr::new(unspecified(), CONTROLLER_PORT));
        let registry_listen = c
            .registry_listen
            .unwrap_or_else(|| SocketAddr::new(unspecified(), REGISTRY_PORT));
        let around = |port: u16| {
            self.advertise_addr
                .map(|ip| SocketAddr::new(ip, port).to_string())
        };
        Ok(ControllerSettings {
            data_dir: c
                .data_dir
                .unwrap_or_else(|| self.data_dir().join("controller")),
            listen,
            advertise: c.advertise.or_else(|| around(listen.port())),
            registry_listen,
            registry_advertise: c
                .registry_advertise
                .or_else(|| around(registry_listen.port())),
            raft_id: match c.raft_id {
                Some(0) => {
                    return Err(ConfigError::Invalid(
                        "[controller] raft_id must be at least 1".into(),
                    ))
                }
                Some(id) => id,
                None => 1,
            },
            join: c.join,
            token: self.token()?,
            node_name: self.node_name.clone(),
            metrics_listen: c.metrics_listen.map_or_else(
                || Some(SocketAddr::new(unspecified(), CONTROLLER_METRICS_PORT)),
                |l| l.0,
            ),
            metrics_addr: c.metrics_addr,
            dashboard_listen: c.dashboard_listen.and_then(|l| l.0),
            log_level: self.log_level_or_default(),
        })
    }

    /// The agent's settings.
    pub fn agent(&self) -> Result<AgentSettings, ConfigError> {
        let a = &self.agent;
        let data_dir = a
            .data_dir
            .clone()
            .unwrap_or_else(|| self.data_dir().join("agent"));
        let controllers = match &a.controllers {
            Some(c) if c.is_empty() => {
                return Err(ConfigError::Invalid(
                    "[agent] controllers is empty: name at least one controller".into(),
                ))
            }
            Some(c) => c.clone(),
            None => vec![format!("http://127.0.0.1:{CONTROLLER_PORT}")],
        };
        let role = a.role.unwrap_or(if self.controller.is_some() {
            Role::Manager
        } else {
            Role::Worker
        });
        Ok(AgentSettings {
            runtime_root: a
                .runtime_root
                .clone()
                .unwrap_or_else(|| data_dir.join("runc")),
            data_dir,
            controllers,
            listen: a.listen.unwrap_or_else(|| {
                SocketAddr::new(self.advertise_addr.unwrap_or_else(unspecified), AGENT_PORT)
            }),
            hostname: self.node_name.clone(),
            role,
            runtime: a.runtime.clone().unwrap_or_else(|| "auto".into()),
            cgroup_parent: a.cgroup_parent.clone().unwrap_or_else(|| "/rudder".into()),
            cgroup_favor_dynmods: a.cgroup_favor_dynmods.unwrap_or(true),
            wg_port: a.wg_port.unwrap_or(WG_PORT),
            token: self.token()?,
            metrics_listen: a.metrics_listen.map_or_else(
                || Some(SocketAddr::new(unspecified(), AGENT_METRICS_PORT)),
                |l| l.0,
            ),
            metrics_addr: a.metrics_addr,
            log_level: self.log_level_or_default(),
            labels: self.labels()?,
        })
    }

    /// The host's labels, checked (grammar, sizes, count); none when unset.
    pub fn labels(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        let labels = self.labels.clone().unwrap_or_default();
        rudder_model::node::check_host_labels(&labels)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(labels)
    }

    /// A copy safe to print: the inline token replaced.
    pub fn redacted(&self) -> HostConfig {
        let mut c = self.clone();
        if c.join.token.is_some() {
            c.join.token = Some(REDACTED.into());
        }
        c
    }

    /// The file text (TOML).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Invalid(format!("serializing: {e}")))
    }

    /// Checks what no single key's type can: both settings of the token, a zero raft id, an
    /// empty controller list.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.agent()?;
        if self.controller.is_some() {
            self.controller()?;
        }
        Ok(())
    }
}

/// Parses a config file's text; errors name `path`, the line and the column.
pub fn parse(path: &Path, text: &str) -> Result<HostConfig, ConfigError> {
    let cfg = toml::from_str::<HostConfig>(text).map_err(|e| {
        let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
        let message = e.message().trim().to_string();
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: match key_at(text, line) {
                Some(key) => format!("{key}: {message}"),
                None => message,
            },
        }
    })?;
    if cfg.labels.is_some() {
        check_label_lines(path, text)?;
    }
    Ok(cfg)
}

/// Checks `[labels]` with the span of each key, so a bad label names its line. (The
/// labels' own type carries no spans: the other layers are not TOML text.)
fn check_label_lines(path: &Path, text: &str) -> Result<(), ConfigError> {
    #[derive(Deserialize)]
    struct Spans {
        labels: BTreeMap<toml::Spanned<String>, toml::Spanned<String>>,
    }
    let spans: Spans = toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let at = |offset: usize, message: String| {
        let (line, column) = line_col(text, offset);
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message,
        }
    };
    let mut labels: Vec<_> = spans.labels.iter().collect();
    labels.sort_by_key(|(k, _)| k.span().start);
    for (i, (k, v)) in labels.into_iter().enumerate() {
        if i == rudder_model::node::MAX_HOST_LABELS {
            return Err(at(
                k.span().start,
                format!(
                    "labels: {} labels; a host may declare at most {}",
                    spans.labels.len(),
                    rudder_model::node::MAX_HOST_LABELS
                ),
            ));
        }
        rudder_model::node::check_label(k.get_ref(), v.get_ref())
            .map_err(|e| at(k.span().start, e.to_string()))?;
    }
    Ok(())
}

/// The key set on `line` (1-based), with its `[section]`: `agent.wg_port`.
fn key_at(text: &str, line: usize) -> Option<String> {
    let mut section = String::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.starts_with('[') {
            section = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
        if i + 1 == line {
            let (key, _) = l.split_once('=')?;
            let key = key.trim();
            return Some(if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            });
        }
    }
    None
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Reads and checks the file at `path`: size, mode, syntax, keys, values.
pub fn load(path: &Path) -> Result<HostConfig, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let io = |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if meta.len() > MAX_FILE_SIZE {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(ConfigError::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = String::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    let cfg = parse(path, &text)?;
    if cfg.join.token.is_some() && mode & 0o077 != 0 {
        return Err(ConfigError::TokenReadable {
            path: path.to_path_buf(),
            mode,
        });
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The daemons' one call: `flags` (what the command line set) over the `RUDDER_*` environment
/// (`vars`) over the file at `path` (none: no file) over the defaults.
pub fn resolve(
    flags: HostConfig,
    path: Option<&Path>,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<HostConfig, ConfigError> {
    let env = from_env(vars)?;
    let file = match path {
        Some(p) => load(p)?,
        None => HostConfig::default(),
    };
    let merged = merge(&[flags, env, file]);
    merged.validate()?;
    Ok(merged)
}

/// How a `RUDDER_*` value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Bool,
    /// Comma-separated list.
    List,
    /// Comma-separated `key=value` pairs.
    Map,
}

/// The environment variables the config reads: name, section (`""`: top level), key, kind.
pub const ENV_KEYS: &[(&str, &str, &str)] = &[
    ("RUDDER_DATA_DIR", "", "data_dir"),
    ("RUDDER_NODE_NAME", "", "node_name"),
    ("RUDDER_ADVERTISE_ADDR", "", "advertise_addr"),
    ("RUDDER_LOG_LEVEL", "", "log_level"),
    ("RUDDER_LABELS", "", "labels"),
    ("RUDDER_CONTROLLER_DATA_DIR", "controller", "data_dir"),
    ("RUDDER_CONTROLLER_LISTEN", "controller", "listen"),
    ("RUDDER_CONTROLLER_ADVERTISE", "controller", "advertise"),
    (
        "RUDDER_CONTROLLER_REGISTRY_LISTEN",
        "controller",
        "registry_listen",
    ),
    (
        "RUDDER_CONTROLLER_REGISTRY_ADVERTISE",
        "controller",
        "registry_advertise",
    ),
    ("RUDDER_CONTROLLER_RAFT_ID", "controller", "raft_id"),
    ("RUDDER_CONTROLLER_JOIN", "controller", "join"),
    (
        "RUDDER_CONTROLLER_METRICS_LISTEN",
        "controller",
        "metrics_listen",
    ),
    (
        "RUDDER_CONTROLLER_METRICS_ADDR",
        "controller",
        "metrics_addr",
    ),
    (
        "RUDDER_CONTROLLER_DASHBOARD_LISTEN",
        "controller",
        "dashboard_listen",
    ),
    ("RUDDER_AGENT_DATA_DIR", "agent", "data_dir"),
    ("RUDDER_AGENT_CONTROLLERS", "agent", "controllers"),
    ("RUDDER_AGENT_LISTEN", "agent", "listen"),
    ("RUDDER_AGENT_ROLE", "agent", "role"),
    ("RUDDER_AGENT_RUNTIME", "agent", "runtime"),
    ("RUDDER_AGENT_RUNTIME_ROOT", "agent", "runtime_root"),
    ("RUDDER_AGENT_CGROUP_PARENT", "agent", "cgroup_parent"),
    (
        "RUDDER_AGENT_CGROUP_FAVOR_DYNMODS",
        "agent",
        "cgroup_favor_dynmods",
    ),
    ("RUDDER_AGENT_WG_PORT", "agent", "wg_port"),
    ("RUDDER_AGENT_METRICS_LISTEN", "agent", "metrics_listen"),
    ("RUDDER_AGENT_METRICS_ADDR", "agent", "metrics_addr"),
    ("RUDDER_JOIN_TOKEN", "join", "token"),
    ("RUDDER_JOIN_TOKEN_FILE", "join", "token_file"),
];

fn kind_of(key: &str) -> Kind {
    match key {
        "raft_id" | "wg_port" => Kind::Int,
        "cgroup_favor_dynmods" => Kind::Bool,
        "controllers" => Kind::List,
        "labels" => Kind::Map,
        _ => Kind::Str,
    }
}

/// The environment layer from `vars` (pass `std::env::vars()`); other variables are ignored.
pub fn from_env(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<HostConfig, ConfigError> {
    let vars: BTreeMap<String, String> = vars.into_iter().collect();
    let mut layers = Vec::new();
    for (var, section, key) in ENV_KEYS {
        let Some(raw) = vars.get(*var) else { continue };
        if raw.is_empty() {
            continue;
        }
        let err = |message: String| ConfigError::Env {
            var: (*var).to_string(),
            message,
        };
        let value = match kind_of(key) {
            Kind::Str => toml::Value::String(raw.clone()),
            Kind::Int => raw
                .trim()
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|e| err(format!("{raw:?} is not a number: {e}")))?,
            Kind::Bool => raw
                .trim()
                .parse::<bool>()
                .map(toml::Value::Boolean)
                .map_err(|_| err(format!("{raw:?} is not true or false")))?,
            Kind::List => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
            Kind::Map => {
                let mut table = toml::Table::new();
                for pair in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .ok_or_else(|| err(format!("{pair:?}: expected key=value")))?;
                    table.insert(k.trim().to_string(), toml::Value::String(v.to_string()));
                }
                toml::Value::Table(table)
            }
        };
        let mut table = toml::Table::new();
        if section.is_empty() {
            table.insert((*key).to_string(), value);
        } else {
            let mut inner = toml::Table::new();
            inner.insert((*key).to_string(), value);
            table.insert((*section).to_string(), toml::Value::Table(inner));
        }
        let layer: HostConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| err(e.message().trim().to_string()))?;
        layers.push(layer);
    }
    Ok(merge(&layers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn with_listen(listen: &str) -> HostConfig {
        HostConfig {
            agent: AgentSection {
                listen: Some(addr(listen)),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn merge_takes_each_field_from_the_highest_layer_that_sets_it() {
        let flags = with_listen("10.0.0.1:1");
        let env = HostConfig {
            data_dir: Some("/env".into()),
            ..with_listen("10.0.0.1:2")
        };
        let file = HostConfig {
            data_dir: Some("/file".into()),
            node_name: Some("file-name".into()),
            ..with_listen("10.0.0.1:3")
        };
        // (layers, expected listen, expected data dir, expected node name)
        type Case = (
            Vec<HostConfig>,
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                vec![flags.clone(), env.clone(), file.clone()],
                "10.0.0.1:1",
                Some("/env"),
                Some("file-name"),
            ),
            (
                vec![HostConfig::default(), env.clone(), file.clone()],
                "10.0.0.1:2",
                Some("/env"),
                Some("file-name"),
            ),
            (
                vec![HostConfig::default(), HostConfig::default(), file.clone()],
                "10.0.0.1:3",
                Some("/file"),
                Some("file-name"),
            ),
            (
                vec![flags.clone(), HostConfig::default(), HostConfig::default()],
                "10.0.0.1:1",
                None,
                None,
            ),
        ];
        for (i, (layers, listen, data_dir, name)) in cases.into_iter().enumerate() {
            let m = merge(&layers);
            assert_eq!(m.agent.listen, Some(addr(listen)), "case {i}");
            assert_eq!(m.data_dir.as_deref(), data_dir.map(Path::new), "case {i}");
            assert_eq!(m.node_name.as_deref(), name, "case {i}");
        }
    }

    #[test]
    fn defaults_fill_what_no_layer_sets() {
        let m = merge(&[HostConfig::default()]);
        let a = m.agent().unwrap();
        assert_eq!(a.data_dir, Path::new("/var/lib/rudder/agent"));
        assert_eq!(a.runtime_root, Path::new("/var/lib/rudder/agent/runc"));
        assert_eq!(a.listen, addr("0.0.0.0:4245"));
        assert_eq!(a.role, Role::Worker);
        assert_eq!(a.wg_port, WG_PORT);
        assert_eq!(a.controllers, vec!["http://127.0.0.1:4243".to_string()]);
        let c = m.controller().unwrap();
        assert_eq!(c.data_dir, Path::new("/var/lib/rudder/controller"));
        assert_eq!(c.raft_id, 1);
        assert_eq!(c.advertise, None);
        assert_eq!(c.dashboard_listen, None);
        assert_eq!(c.metrics_listen, Some(addr("0.0.0.0:4246")));
        assert_eq!(c.log_level, "info");
    }

    #[test]
    fn advertise_addr_gives_the_advertised_addresses_and_a_controller_makes_a_manager() {
        let m = HostConfig {
            advertise_addr: Some("10.1.2.3".parse().unwrap()),
            controller: Some(ControllerSection {
                listen: Some(addr("0.0.0.0:7000")),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = m.controller().unwrap();
        assert_eq!(c.advertise.as_deref(), Some("10.1.2.3:7000"));
        assert_eq!(c.registry_advertise.as_deref(), Some("10.1.2.3:5000"));
        let a = m.agent().unwrap();
        assert_eq!(a.listen, addr("10.1.2.3:4245"));
        assert_eq!(a.role, Role::Manager);
    }

    #[test]
    fn the_highest_token_setting_wins_as_one() {
        let file = HostConfig {
            join: JoinSection {
                token: Some("from-file".into()),
                token_file: None,
            },
            ..Default::default()
        };
        let flags = HostConfig {
            join: JoinSection {
                token: None,
                token_file: Some("/flag.token".into()),
            },
            ..Default::default()
        };
        let m = merge(&[flags, HostConfig::default(), file.clone()]);
        assert_eq!(
            m.token().unwrap(),
            Some(TokenSource::File("/flag.token".into()))
        );
        let m = merge(&[HostConfig::default(), file]);
        assert_eq!(
            m.token().unwrap(),
            Some(TokenSource::Inline("from-file".into()))
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_line() {
        let p = Path::new("/etc/rudder/rudder.toml");
        let cases = [
            ("data_dir = \"/x\"\n\n[agent]\nwg_prot = 1\n", 4, "wg_prot"),
            (
                "[controller]\nlisten = \"nowhere\"\n",
                2,
                "invalid socket address",
            ),
            ("[agent]\nrole = \"boss\"\n", 2, "boss"),
            ("log_level = \"info\"\nlabels = 3\n", 2, "labels"),
            ("[controller]\nmetrics_listen = \"x\"\n", 2, "or off"),
            ("[agent]\nwg_port = 70000\n", 2, "wg_port"),
        ];
        for (text, line, needle) in cases {
            let e = parse(p, text).unwrap_err().to_string();
            assert!(
                e.contains(&format!("rudder.toml:{line}:")),
                "{text:?}: want line {line}: {e}"
            );
            assert!(e.contains(needle), "{text:?}: want {needle:?}: {e}");
        }
    }

    #[test]
    fn labels_are_checked_with_the_key_and_its_line() {
        let p = Path::new("/etc/rudder/rudder.toml");
        let ok = parse(
            p,
            "[labels]\nzone = \"eu-1\"\n\"com.example.rack\" = \"r12\"\n",
        )
        .unwrap();
        let labels = ok.agent().unwrap().labels;
        assert_eq!(labels["zone"], "eu-1");
        assert_eq!(labels["com.example.rack"], "r12");
        let long = "v".repeat(rudder_model::node::MAX_LABEL_VALUE + 1);
        let cases = [
            (
                "[labels]\nzone = \"a\"\n\"bad key\" = \"x\"\n".to_string(),
                3,
                "bad key",
            ),
            (
                "node_name = \"s1\"\n\n[labels]\nzone = \"a==b\"\n".to_string(),
                4,
                "'=='",
            ),
            (
                format!("[labels]\nok = \"1\"\nbig = \"{long}\"\n"),
                3,
                "255",
            ),
            (
                "labels = { \"-x\" = \"1\" }\n".to_string(),
                1,
                "start and end",
            ),
            ("[labels]\nzone = 1\n".to_string(), 2, "labels.zone"),
        ];
        for (text, line, needle) in cases {
            let e = parse(p, &text).unwrap_err().to_string();
            assert!(
                e.contains(&format!("rudder.toml:{line}:")),
                "{text:?}: want line {line}: {e}"
            );
            assert!(e.contains(needle), "{text:?}: want {needle:?}: {e}");
        }
        let mut many = String::from("[labels]\n");
        for i in 0..=rudder_model::node::MAX_HOST_LABELS {
            many.push_str(&format!("k{i} = \"v\"\n"));
        }
        let e = parse(p, &many).unwrap_err().to_string();
        assert!(e.contains(":66:") && e.contains("at most 64"), "{e}");
    }

    #[test]
    fn labels_from_the_environment_replace_the_files() {
        let env =
            from_env([("RUDDER_LABELS".to_string(), "zone=b, disk=ssd".to_string())]).unwrap();
        let file = parse(Path::new("x"), "[labels]\nzone = \"a\"\nrack = \"r1\"\n").unwrap();
        let m = merge(&[HostConfig::default(), env, file]);
        let labels = m.agent().unwrap().labels;
        assert_eq!(labels.len(), 2, "{labels:?}");
        assert_eq!(labels["zone"], "b");
        assert_eq!(labels["disk"], "ssd");
        let e = from_env([("RUDDER_LABELS".to_string(), "zone".to_string())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("RUDDER_LABELS") && e.contains("key=value"),
            "{e}"
        );
        let bad = from_env([("RUDDER_LABELS".to_string(), "a b=1".to_string())]).unwrap();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("\"a b\""), "{e}");
    }

    #[test]
    fn a_full_file_round_trips() {
        let text = r#"
data_dir = "/srv/rudder"
node_name = "s1"
advertise_addr = "192.0.2.10"
log_level = "info,rudder_agent=debug"

[controller]
raft_id = 2
join = "192.0.2.1:4243"
dashboard_listen = "off"
metrics_listen = "0.0.0.0:4246"

[agent]
controllers = ["http://192.0.2.1:4243"]
runtime = "crun"
wg_port = 51821

[join]
token_file = "/etc/rudder/join.token"

[labels]
zone = "eu-1"
"com.example.rack" = "r12"
"#;
        let c = parse(Path::new("x"), text).unwrap();
        assert_eq!(c.controller.as_ref().unwrap().raft_id, Some(2));
        let again = parse(Path::new("x"), &c.to_toml().unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn environment_variables_are_typed_and_named_in_errors() {
        let env = |pairs: &[(&str, &str)]| {
            from_env(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        };
        let m = env(&[
            ("RUDDER_AGENT_WG_PORT", "51999"),
            ("RUDDER_AGENT_CONTROLLERS", "10.0.0.1:4243, 10.0.0.2:4243"),
            ("RUDDER_AGENT_CGROUP_FAVOR_DYNMODS", "false"),
            ("RUDDER_CONTROLLER_RAFT_ID", "3"),
            ("RUDDER_JOIN_TOKEN", "t"),
            ("RUDDER_LAB_ROOT", "/not/ours"),
        ])
        .unwrap();
        assert_eq!(m.agent.wg_port, Some(51999));
        assert_eq!(m.agent.controllers.as_ref().unwrap().len(), 2);
        assert_eq!(m.agent.cgroup_favor_dynmods, Some(false));
        assert_eq!(m.controller.as_ref().unwrap().raft_id, Some(3));
        assert_eq!(m.join.token.as_deref(), Some("t"));
        for (var, value) in [
            ("RUDDER_AGENT_WG_PORT", "lots"),
            ("RUDDER_AGENT_LISTEN", "nowhere"),
            ("RUDDER_AGENT_ROLE", "boss"),
        ] {
            let e = env(&[(var, value)]).unwrap_err().to_string();
            assert!(e.contains(var), "{e}");
        }
    }

    #[test]
    fn redacted_hides_the_token() {
        let c = HostConfig {
            join: JoinSection {
                token: Some("RDR1-secret".into()),
                token_file: None,
            },
            ..Default::default()
        };
        let shown = c.redacted().to_toml().unwrap();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains(REDACTED));
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn load_refuses_loose_modes_and_large_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rudder.toml");
        let set = |text: &str, mode: u32| {
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        set("[join]\ntoken = \"t\"\n", 0o644);
        let e = load(&p).unwrap_err().to_string();
        assert!(
            e.contains("holds a join token") && e.contains("0644"),
            "{e}"
        );
        set("[join]\ntoken = \"t\"\n", 0o600);
        assert!(load(&p).is_ok());
        set("data_dir = \"/x\"\n", 0o664);
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("may write it"), "{e}");
        set("data_dir = \"/x\"\n", 0o644);
        assert!(load(&p).is_ok());
        set(&"#".repeat(MAX_FILE_SIZE as usize + 1), 0o600);
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn both_token_settings_and_zero_raft_id_are_refused() {
        let e = parse(
            Path::new("x"),
            "[join]\ntoken = \"a\"\ntoken_file = \"/b\"\n",
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
        let e = parse(Path::new("x"), "[controller]\nraft_id = 0\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("raft_id"), "{e}");
    }
}

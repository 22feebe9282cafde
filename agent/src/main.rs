//! `rudder-agent`: the host agent, or (as `rudder-agent shim …`) one container's shim. The shim
//! is dispatched before any async runtime starts, because it forks.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use rudder_host::{advertise, config};

#[derive(Parser)]
#[command(name = "rudder-agent", version, about = "Rudder host agent")]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// The host config file (`/etc/rudder/rudder.toml`); flags and `RUDDER_*` variables
    /// override it (`rudder config check` shows the result).
    #[arg(long)]
    config: Option<PathBuf>,
    /// [default: <data_dir>/agent]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Controller URL, or a comma-separated list of them (any live one leads to the leader)
    /// [default: http://127.0.0.1:4243].
    #[arg(long)]
    controller: Option<String>,
    /// [default: <advertise_addr>:4245, else 0.0.0.0:4245]
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[arg(long)]
    hostname: Option<String>,
    #[arg(long)]
    runtime_root: Option<PathBuf>,
    /// [default: /rudder]
    #[arg(long)]
    cgroup_parent: Option<String>,
    /// [default: auto]
    #[arg(long)]
    runtime: Option<String>,
    /// `manager` when this host also runs a controller (placement constraints use it)
    /// [default: manager when the config has a [controller] section, else worker].
    #[arg(long, value_parser = ["worker", "manager"])]
    role: Option<String>,
    /// Join token for the first start (`rctl cluster join-token worker`). Prefer the
    /// environment or --token-file: a command line is readable by every local user.
    #[arg(long, env = rudder_pki::ca::TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
    /// File holding the join token (must not be readable by group or others).
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// UDP port of the WireGuard interface that carries encrypted overlay networks
    /// [default: 51820].
    #[arg(long)]
    wg_port: Option<u16>,
    /// Serve Prometheus metrics at `https://ADDR/metrics` (a client certificate of an admin or
    /// manager is required); `off` to not serve them [default: 0.0.0.0:4247].
    #[arg(long, value_parser = listen)]
    metrics_listen: Option<config::Listen>,
    /// Also serve `/metrics` over plain HTTP at this address, to anyone who reaches it
    /// (bind it to an address only the scraper reaches). Off unless given.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Remount the host's cgroup2 hierarchy with `favordynmods` if it lacks it: moving a new
    /// container's init into its cgroup then no longer waits for an RCU grace period (6–12 ms
    /// per container start). `false` leaves the host's mount options alone [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    cgroup_favor_dynmods: Option<bool>,
    /// Log filter when RUST_LOG is not set [default: info].
    #[arg(long)]
    log_level: Option<String>,
    /// A label of this host (repeatable; any replaces the config's `[labels]`), sent when
    /// registering; placement constraints name it `engine.labels.KEY`.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = config::parse_label)]
    labels: Vec<(String, String)>,
}

fn listen(s: &str) -> Result<config::Listen, String> {
    config::Listen::try_from(s.to_string())
}

impl Args {
    /// What the command line sets, as the top layer of the host config.
    fn layer(&self) -> anyhow::Result<config::HostConfig> {
        Ok(config::HostConfig {
            node_name: self.hostname.clone(),
            log_level: self
                .log_level
                .clone()
                .map(config::LogLevel::try_from)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--log-level: {e}"))?,
            labels: (!self.labels.is_empty()).then(|| self.labels.iter().cloned().collect()),
            agent: config::AgentSection {
                data_dir: self.data_dir.clone(),
                controllers: self
                    .controller
                    .as_ref()
                    .map(|c| c.split(',').map(|s| s.trim().to_string()).collect()),
                listen: self.listen,
                role: self.role.as_deref().map(|r| {
                    if r == "manager" {
                        config::Role::Manager
                    } else {
                        config::Role::Worker
                    }
                }),
                runtime: self.runtime.clone(),
                runtime_root: self.runtime_root.clone(),
                cgroup_parent: self.cgroup_parent.clone(),
                cgroup_favor_dynmods: self.cgroup_favor_dynmods,
                wg_port: self.wg_port,
                metrics_listen: self.metrics_listen,
                metrics_addr: self.metrics_addr,
            },
            join: config::JoinSection {
                token: self.token.clone(),
                token_file: self.token_file.clone(),
            },
            ..Default::default()
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Internal: supervise one container (started by the agent).
    Shim {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        runtime: String,
        #[arg(long)]
        root: PathBuf,
        #[arg(long, default_value_t = rudder_agent::shim::LOG_MAX_SIZE)]
        log_max_size: u64,
        #[arg(long, default_value_t = rudder_agent::shim::LOG_MAX_FILES)]
        log_max_files: u32,
        #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
        hide_unified: bool,
    },
    /// Internal: run userspace WireGuard for one interface (started by the agent when the
    /// kernel has no WireGuard).
    #[command(hide = true)]
    WgUserspace {
        #[arg(long)]
        iface: String,
    },
    /// Internal: pack or unpack a tar inside a container's root, for `rctl cp` (started by
    /// the agent).
    #[command(hide = true)]
    FsHelper(rudder_agent::fs_helper::HelperArgs),
}

fn main() -> anyhow::Result<()> {
    let mut a = Args::parse();
    // The shim and helpers below need no config; the agent's is read after them, but the
    // environment (a layer of it) is kept until then.
    let env: Vec<(String, String)> = std::env::vars().collect();
    // Still single-threaded: no child (shim, runc, controller) inherits the token.
    std::env::remove_var(rudder_pki::ca::TOKEN_ENV);
    let notify = rudder_sdnotify::Notifier::from_env();
    if let Some(Cmd::FsHelper(args)) = &a.cmd {
        // Before any runtime: it chroots, and must stay single-threaded.
        rudder_agent::fs_helper::main(args);
    }
    if let Some(Cmd::WgUserspace { iface }) = &a.cmd {
        // Before any runtime: boringtun's signal handling relies on threads it starts itself.
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .init();
        std::process::exit(rudder_agent::wg::userspace_main(iface));
    }
    if let Some(Cmd::Shim {
        dir,
        id,
        runtime,
        root,
        log_max_size,
        log_max_files,
        hide_unified,
    }) = a.cmd.take()
    {
        rudder_agent::shim::main(rudder_agent::shim::ShimArgs {
            dir,
            id,
            runtime,
            root,
            log_max_size,
            log_max_files,
            hide_unified,
        });
    }
    let mut host = config::resolve(a.layer()?, a.config.as_deref(), env)?;
    // No address to give the controllers: the one this host reaches them from.
    let mut towards: Vec<advertise::Target> = host
        .agent()?
        .controllers
        .into_iter()
        .map(advertise::Target::Addr)
        .collect();
    towards.push(advertise::Target::DefaultRoute);
    let detected = advertise::fill(&mut host, &advertise::UdpProbe, &towards, false, true)?;
    let s = host.agent()?;
    let token = s.token.as_ref().map(|t| t.load()).transpose()?;
    // Colours only on a terminal: the log usually goes to a file or a journal. The journal
    // (systemd unit) gets each line's priority and keeps its own time stamps.
    let journal = rudder_sdnotify::journal::stdout_is_journal();
    let logs = tracing_subscriber::fmt()
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(log_filter(&s.log_level));
    if journal {
        logs.event_format(rudder_sdnotify::journal::JournalFormat::new())
            .init();
    } else {
        logs.init();
    }
    if let Some(d) = detected {
        tracing::info!("{d}");
    }
    let hostname = match s.hostname {
        Some(h) => h,
        None => nix::unistd::gethostname()?.to_string_lossy().to_string(),
    };
    let cfg = rudder_agent::Config {
        runtime_root: s.runtime_root,
        data_dir: s.data_dir,
        controllers: rudder_agent::session::parse_controllers(&s.controllers.join(","))?,
        listen: s.listen,
        hostname,
        cgroup_parent: s.cgroup_parent,
        runtime: s.runtime,
        role: s.role.as_str().to_string(),
        token,
        wg_port: s.wg_port,
        metrics_listen: s.metrics_listen,
        metrics_addr: s.metrics_addr,
        cgroup_favor_dynmods: s.cgroup_favor_dynmods,
        labels: s.labels,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async move {
            // systemd (Type=notify): ready once the agent API accepts (joined, serving).
            notify.ready_when_listening(cfg.listen, format!("serving on {}", cfg.listen));
            let shutdown = async move {
                shutdown_signal().await;
                notify.stopping();
            };
            rudder_agent::run(cfg, shutdown).await?;
            anyhow::Ok(())
        })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `RUST_LOG`, else `level` (the config's `log_level`); netlink-packet-route's warnings about attributes newer than the
/// crate (one per link on every dump, on any recent kernel) are always dropped: they say
/// nothing about this host and drown the agent's own log.
fn log_filter(level: &str) -> tracing_subscriber::EnvFilter {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    match "netlink_packet_route=error".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    }
}

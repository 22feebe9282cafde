//! `rudder-controller`: parses flags, installs tracing, runs the controller until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use rudder_host::{advertise, config};

#[derive(Parser)]
#[command(name = "rudder-controller", version, about = "Rudder controller")]
struct Args {
    /// The host config file (`/etc/rudder/rudder.toml`); flags and `RUDDER_*` variables
    /// override it (`rudder config check` shows the result).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the raft log and registry blobs live [default: <data_dir>/controller].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC API address (rctl and agents) [default: 0.0.0.0:4243].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// OCI registry address [default: 0.0.0.0:5000].
    #[arg(long)]
    registry_listen: Option<SocketAddr>,
    /// Raft member id (unique per controller) [default: 1].
    #[arg(long)]
    raft_id: Option<u64>,
    /// gRPC `host:port` others reach this controller at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Registry `host:port` others reach this controller's registry at.
    #[arg(long)]
    registry_advertise: Option<String>,
    /// Join the cluster of the controller at this gRPC `host:port` (first start only).
    #[arg(long)]
    join: Option<String>,
    /// Manager join token, with --join (`rctl cluster join-token manager`). Prefer the
    /// environment or --token-file: a command line is readable by every local user.
    #[arg(long, env = rudder_pki::ca::TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
    /// File holding the manager join token (must not be readable by group or others).
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Lifetime in seconds of the node certificates this controller issues (tests shorten it
    /// to watch renewal).
    #[arg(long, default_value_t = 90 * 24 * 3600, hide = true)]
    node_cert_validity: u64,
    /// Start a NEW one-member cluster from this backup file (`rctl cluster backup`), in an
    /// empty --data-dir; the key from RUDDER_BACKUP_KEY or --backup-key-file. Use the raft id
    /// and address of a controller the agents knew, so they reconnect.
    #[arg(long)]
    restore: Option<PathBuf>,
    /// File holding the backup key (hex; must not be readable by group or others).
    #[arg(long, requires = "restore")]
    backup_key_file: Option<PathBuf>,
    /// Host name, for logs.
    #[arg(long)]
    node_name: Option<String>,
    /// Log filter when RUST_LOG is not set [default: info].
    #[arg(long)]
    log_level: Option<String>,
    /// Serve Prometheus metrics at `https://ADDR/metrics` (a client certificate of an admin or
    /// manager is required); `off` to not serve them [default: 0.0.0.0:4246].
    #[arg(long, value_parser = listen)]
    metrics_listen: Option<config::Listen>,
    /// Also serve `/metrics` over plain HTTP at this address, to anyone who reaches it
    /// (bind it to an address only the scraper reaches). Off unless given.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Serve the web dashboard at `https://ADDR/` (log in with an admin certificate or a
    /// token from `rctl dashboard token`), for example 0.0.0.0:4249; `off` (the default) to
    /// not serve it.
    #[arg(long, value_parser = listen)]
    dashboard_listen: Option<config::Listen>,
    /// Raft election timeout in milliseconds (210..=60000) [default: 700]. A longer one keeps
    /// a leader through the load of thousands of agents on a busy machine, and makes a
    /// failover take as much longer; every controller of a group should use the same.
    #[arg(long)]
    election_timeout_ms: Option<u64>,
}

fn listen(s: &str) -> Result<config::Listen, String> {
    config::Listen::try_from(s.to_string())
}

impl Args {
    /// What the command line sets, as the top layer of the host config.
    fn layer(&self) -> anyhow::Result<config::HostConfig> {
        Ok(config::HostConfig {
            node_name: self.node_name.clone(),
            log_level: self
                .log_level
                .clone()
                .map(config::LogLevel::try_from)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--log-level: {e}"))?,
            controller: Some(config::ControllerSection {
                data_dir: self.data_dir.clone(),
                listen: self.listen,
                advertise: self.advertise.clone(),
                registry_listen: self.registry_listen,
                registry_advertise: self.registry_advertise.clone(),
                raft_id: self.raft_id,
                join: self.join.clone(),
                metrics_listen: self.metrics_listen,
                metrics_addr: self.metrics_addr,
                dashboard_listen: self.dashboard_listen,
            }),
            join: config::JoinSection {
                token: self.token.clone(),
                token_file: self.token_file.clone(),
            },
            ..Default::default()
        })
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // Before the environment is scrubbed: RUDDER_* variables are a layer of the config.
    let mut host = config::resolve(a.layer()?, a.config.as_deref(), std::env::vars())?;
    // No address to give the others: the one this host reaches the cluster from.
    let mut towards = Vec::new();
    if let Some(join) = host.controller()?.join {
        towards.push(advertise::Target::Addr(join));
    }
    towards.push(advertise::Target::DefaultRoute);
    let detected = advertise::fill(&mut host, &advertise::UdpProbe, &towards, true, false)?;
    let settings = host.controller()?;
    // Before the runtime starts threads: scrub the token from this process's environment.
    std::env::remove_var(rudder_pki::ca::TOKEN_ENV);
    let notify = rudder_sdnotify::Notifier::from_env();
    let token = settings.token.as_ref().map(|t| t.load()).transpose()?;
    let env_key = std::env::var(rudder_pki::backup::KEY_ENV).ok();
    std::env::remove_var(rudder_pki::backup::KEY_ENV);
    let restore = match &a.restore {
        Some(file) => Some(std::sync::Arc::new(read_backup(
            file,
            a.backup_key_file.as_deref(),
            env_key,
        )?)),
        None => None,
    };
    let validity = std::time::Duration::from_secs(a.node_cert_validity);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(
            settings,
            token,
            validity,
            restore,
            notify,
            a.election_timeout_ms,
            detected,
        ))
}

/// Reads and decrypts a backup file into the store it holds.
fn read_backup(
    file: &std::path::Path,
    key_file: Option<&std::path::Path>,
    env_key: Option<String>,
) -> anyhow::Result<rudder_model::Store> {
    use rudder_pki::backup;
    let key = match (key_file, env_key) {
        (Some(f), _) => backup::BackupKey::read_file(f)?,
        (None, Some(k)) => backup::BackupKey::parse(&k)?,
        (None, None) => anyhow::bail!(
            "restore: no backup key: set {} or pass --backup-key-file",
            backup::KEY_ENV
        ),
    };
    let plain = backup::open(&key, backup::read_file(file)?)?;
    let what = format!("the store in backup {}", file.display());
    rudder_model::snapshot::decode(&plain, &what).map_err(|e| anyhow::anyhow!("restore: {e}"))
}

async fn run(
    s: config::ControllerSettings,
    token: Option<String>,
    node_cert_validity: std::time::Duration,
    restore: Option<std::sync::Arc<rudder_model::Store>>,
    notify: rudder_sdnotify::Notifier,
    election_timeout_ms: Option<u64>,
    detected: Option<advertise::Detected>,
) -> anyhow::Result<()> {
    // Colours only on a terminal: the log usually goes to a file or a journal. The journal
    // (systemd unit) gets each line's priority and keeps its own time stamps.
    let journal = rudder_sdnotify::journal::stdout_is_journal();
    let logs = tracing_subscriber::fmt()
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| s.log_level.as_str().into()),
        );
    if journal {
        logs.event_format(rudder_sdnotify::journal::JournalFormat::new())
            .init();
    } else {
        logs.init();
    }
    if let Some(n) = &s.node_name {
        tracing::info!(node = %n, "starting");
    }
    if let Some(d) = detected {
        tracing::info!("{d}");
    }
    let cfg = rudder_controller::Config {
        data_dir: s.data_dir,
        listen: s.listen,
        registry_listen: s.registry_listen,
        raft_id: s.raft_id,
        advertise: s.advertise,
        registry_advertise: s.registry_advertise,
        join: s.join,
        restore,
        token,
        node_cert_validity,
        metrics_listen: s.metrics_listen,
        metrics_addr: s.metrics_addr,
        dashboard_listen: s.dashboard_listen,
        election_timeout: election_timeout_ms.map(std::time::Duration::from_millis),
    };
    // systemd (Type=notify): ready once the gRPC port accepts, which is after raft started.
    notify.ready_when_listening(cfg.listen, format!("serving the API on {}", cfg.listen));
    let shutdown = async move {
        shutdown_signal().await;
        notify.stopping();
    };
    rudder_controller::run(cfg, shutdown).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

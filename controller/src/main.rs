//! `rudder-controller`: parses flags, installs tracing, runs the controller until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "rudder-controller", version, about = "Rudder controller")]
struct Args {
    /// Where the raft log and registry blobs live.
    #[arg(long)]
    data_dir: PathBuf,
    /// gRPC API address (rctl and agents).
    #[arg(long, default_value = "0.0.0.0:4243")]
    listen: SocketAddr,
    /// OCI registry address.
    #[arg(long, default_value = "0.0.0.0:5000")]
    registry_listen: SocketAddr,
    /// Raft member id (unique per controller).
    #[arg(long, default_value_t = 1)]
    raft_id: u64,
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
    /// Serve Prometheus metrics at `https://ADDR/metrics` (a client certificate of an admin or
    /// manager is required); `off` to not serve them.
    #[arg(long, default_value = "0.0.0.0:4246", value_parser = rudder_pki::scrape::parse_listen)]
    metrics_listen: rudder_pki::scrape::Listen,
    /// Also serve `/metrics` over plain HTTP at this address, to anyone who reaches it
    /// (bind it to an address only the scraper reaches). Off unless given.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Serve the web dashboard at `https://ADDR/` (log in with an admin certificate or a
    /// token from `rctl dashboard token`), for example 0.0.0.0:4249; `off` (the default) to
    /// not serve it.
    #[arg(long, default_value = "off", value_parser = rudder_pki::scrape::parse_listen)]
    dashboard_listen: rudder_pki::scrape::Listen,
}

fn main() -> anyhow::Result<()> {
    let mut a = Args::parse();
    // Before the runtime starts threads: scrub the token from this process's environment.
    std::env::remove_var(rudder_pki::ca::TOKEN_ENV);
    let notify = rudder_sdnotify::Notifier::from_env();
    if let Some(path) = &a.token_file {
        a.token = Some(rudder_pki::ca::read_token_file(path)?);
    }
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
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(a, restore, notify))
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
    serde_json::from_slice(&plain)
        .map_err(|e| anyhow::anyhow!("restore: the backup's store does not parse: {e}"))
}

async fn run(
    a: Args,
    restore: Option<std::sync::Arc<rudder_model::Store>>,
    notify: rudder_sdnotify::Notifier,
) -> anyhow::Result<()> {
    // Colours only on a terminal: the log usually goes to a file or a journal.
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    if let Some(n) = &a.node_name {
        tracing::info!(node = %n, "starting");
    }
    let cfg = rudder_controller::Config {
        data_dir: a.data_dir,
        listen: a.listen,
        registry_listen: a.registry_listen,
        raft_id: a.raft_id,
        advertise: a.advertise,
        registry_advertise: a.registry_advertise,
        join: a.join,
        restore,
        token: a.token,
        node_cert_validity: std::time::Duration::from_secs(a.node_cert_validity),
        metrics_listen: a.metrics_listen.0,
        metrics_addr: a.metrics_addr,
        dashboard_listen: a.dashboard_listen.0,
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

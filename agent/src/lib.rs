//! Rudder agent: owns one host. Keeps a stream to the leading controller (`session`), runs
//! assigned tasks as OCI containers (`worker`, `bundle`, `runtime`, `shim`), pulls images into
//! the host's content store, and serves logs to controllers (`api`).

#![warn(missing_docs)]

mod addurl;
mod api;
mod build;
pub mod bundle;
pub mod cgroup_tune;
mod churn;
mod commit;
mod convert;
mod copy;
mod datadir;
pub mod dns;
mod exec;
pub mod fs_helper;
mod health;
pub mod hollow;
mod hostnet;
mod images;
mod manager;
mod mesh;
pub mod metrics;
pub mod net;
pub mod netpool;
mod overlayfs;
mod rundir;
pub mod runtime;
mod seccomp;
mod secrets;
pub mod session;
mod stats;
mod task;
mod task_record;
mod top;
mod trusted;
mod user;
/// The per-container shim (its own crate and binary, `rudder-shim`).
pub use rudder_shim as shim;
mod volume;
pub mod wg;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rudder_pki::ca::Role;
use rudder_pki::tls::{self, NodeCerts};
use rudder_proto::v1::agent_api_server::AgentApiServer;
use serde::Deserialize;
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A file under the data dir could not be read or written (what, error).
    #[error("agent: {0}: {1}")]
    Io(&'static str, std::io::Error),
    /// The OCI runtime could not be set up.
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    /// The content store could not be opened.
    #[error(transparent)]
    Image(#[from] rudder_image::ImageError),
    /// The agent's API server failed.
    #[error("agent: api server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The node certificate could not be loaded or renewed.
    #[error("agent: certificates: {0}")]
    Tls(rudder_pki::tls::TlsError),
    /// Joining the cluster failed.
    #[error("agent: joining the cluster: {0}")]
    Join(String),
}

/// The agent's configuration, from `rudder-agent`'s flags.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the agent keeps its state (node id, certificates, images, containers).
    pub data_dir: PathBuf,
    /// Controller URLs, e.g. `http://10.0.0.1:4243`: any of them will do, the session finds
    /// the leader (and learns the rest from it).
    pub controllers: Vec<String>,
    /// Where this agent's API listens; controllers reach it here.
    pub listen: SocketAddr,
    /// The host's name, as the cluster shows it.
    pub hostname: String,
    /// The OCI runtime's `--root`.
    pub runtime_root: PathBuf,
    /// Cgroup path under which containers' cgroups are created.
    pub cgroup_parent: String,
    /// `auto`, `runc` or `crun`.
    pub runtime: String,
    /// `worker`, or `manager` when this host also runs a controller.
    pub role: String,
    /// Join token for the first start (`rctl cluster join-token worker`); afterwards the
    /// certificate in `<data>/certs` is used.
    #[serde(default)]
    pub token: Option<String>,
    /// UDP port of this host's WireGuard interface (overlay networks).
    #[serde(default = "default_wg_port")]
    pub wg_port: u16,
    /// Where `/metrics` is served over HTTPS (client certificate of an admin or manager
    /// required); `None`: not served.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Where `/metrics` is also served over plain HTTP, to anyone who reaches the address;
    /// `None` (the default): not served.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Give the host's cgroup2 mount `favordynmods` at start ([`cgroup_tune`]): container
    /// starts skip an RCU grace period each.
    #[serde(default = "yes")]
    pub cgroup_favor_dynmods: bool,
    /// The host's own labels (`[labels]` in rudder.toml), sent when registering: the
    /// controllers store them apart from the operator's (constraint `engine.labels.KEY`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// WireGuard's usual port, used unless `--wg-port` says otherwise.
pub const DEFAULT_WG_PORT: u16 = 51820;

fn default_wg_port() -> u16 {
    DEFAULT_WG_PORT
}

/// This agent's certificate: from `<data>/certs`, or obtained by joining with the token.
async fn agent_certs(cfg: &Config, node_id: &str) -> Result<NodeCerts, AgentError> {
    let dir = cfg.data_dir.join("certs");
    let previous = NodeCerts::load_if_present(&dir).map_err(AgentError::Tls)?;
    if let Some(c) = &previous {
        if c.identity(std::time::SystemTime::now()).is_ok() {
            return Ok(c.clone());
        }
        // Off for longer than its certificate's lifetime: nobody accepts it any more, not
        // even for renewal. A join token re-admits it under its id, with proof of its key.
        tracing::warn!("the node certificate expired; re-joining with the join token");
    }
    let token = cfg.token.as_deref().ok_or_else(|| {
        AgentError::Join(if previous.is_some() {
            "this host's certificate expired: start the agent with a join token \
             (RUDDER_JOIN_TOKEN; `rctl cluster join-token worker`) to be re-admitted"
                .into()
        } else {
            "this host has no certificate yet: start the agent with a join token \
             (RUDDER_JOIN_TOKEN; `rctl cluster join-token worker`)"
                .into()
        })
    })?;
    let mut last = String::new();
    for attempt in 0..30 {
        for url in &cfg.controllers {
            let url = url.replacen("http://", "https://", 1);
            let joined = match &previous {
                Some(p) => rudder_pki::join::rejoin_cluster(&url, token, p).await,
                // Controllers dial agents as workers, whichever token the host joined with.
                None => rudder_pki::join::join_cluster_as(
                    &url,
                    token,
                    node_id,
                    rudder_pki::ca::Role::Worker,
                )
                .await
                .map(|(certs, _)| certs),
            };
            match joined {
                Ok(c) => {
                    c.save(&dir).map_err(AgentError::Tls)?;
                    return Ok(c);
                }
                Err(e) => last = e.to_string(),
            }
        }
        if attempt == 0 {
            tracing::warn!(%last, "joining the cluster failed; retrying");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    Err(AgentError::Join(last))
}

/// This host's capacity: CPUs (thousandths) and memory (bytes) from the kernel.
pub fn host_capacity() -> (u64, u64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64 * 1000)
        .unwrap_or(1000);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    (cpus, mem)
}

/// This node's stable id: generated once, kept in the data dir.
fn node_id(data_dir: &std::path::Path) -> Result<String, AgentError> {
    let path = data_dir.join("node_id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        if !id.trim().is_empty() {
            return Ok(id.trim().to_string());
        }
    }
    let id = hex::encode(rand::random::<[u8; 8]>());
    shim::write_atomic(&path, &id).map_err(|e| AgentError::Io("write node id", e))?;
    Ok(id)
}

/// Runs the agent until `shutdown` completes: joins (first start), serves its API, and keeps a
/// session with the leader.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let containers = cfg.data_dir.join("containers");
    // Private to root (0700 dirs, 0600 files), tightened if an older agent left it looser.
    datadir::secure(&cfg.data_dir, &cfg.runtime_root)
        .map_err(|e| AgentError::Io("make the data dir private", e))?;
    rundir::prepare_or_warn(&cfg.data_dir);
    let node_id = node_id(&cfg.data_dir)?;
    let certs = agent_certs(&cfg, &node_id).await?;
    let (certs_tx, certs_rx) = tokio::sync::watch::channel(certs);
    let renew_from: Vec<String> = cfg.controllers.clone();
    tokio::spawn(rudder_pki::renew::run(
        cfg.data_dir.join("certs"),
        move || renew_from.clone(),
        certs_tx,
        std::time::Duration::from_secs(5),
    ));
    let images = rudder_image::store::ImageStore::open(&cfg.data_dir.join("images"))?;
    if cfg.cgroup_favor_dynmods {
        cgroup_tune::favor_dynmods_or_warn();
    }
    let mut cli = runtime::pick_runtime(&cfg.runtime, cfg.runtime_root.clone());
    if let Err(e) = runtime::memory_state(&cli) {
        if cfg.runtime != "auto" {
            return Err(e.into());
        }
        warn!(error = %e, "crun cannot keep its state in memory here; using runc");
        cli = runtime::pick_runtime("runc", cfg.runtime_root.clone());
    }
    info!(
        node = %node_id,
        hostname = %cfg.hostname,
        runtime = %cli.binary,
        hide_unified_cgroup = cli.hide_unified,
        "agent starting"
    );
    let rt: Arc<dyn runtime::ContainerRuntime> = Arc::new(runtime::OciCliRuntime::new(cli)?);
    let access = exec::ContainerAccess {
        containers: containers.clone(),
        runtime: rt.clone(),
        agent_exe: std::env::current_exe()
            .map_err(|e| AgentError::Io("find the agent binary", e))?,
    };
    let (status_tx, status_rx) = tokio::sync::mpsc::unbounded_channel();
    let agent_exe =
        std::env::current_exe().map_err(|e| AgentError::Io("find the agent binary", e))?;
    let overlay = net::Overlay::start(&cfg.data_dir, &node_id, cfg.wg_port, agent_exe)
        .map_err(|e| AgentError::Join(e.to_string()))?;
    let pool_owner = overlay.clone();
    let builder = Arc::new(build::Builder {
        images: images.clone(),
        access: access.clone(),
        cgroup_parent: cfg.cgroup_parent.clone(),
        scratch: cfg.data_dir.join("builds"),
        cache: cfg.data_dir.join("build-cache"),
        registry_tls: Some(certs_rx.clone()),
        net: Some(overlay.clone()),
    });
    builder.sweep().await;
    let worker = worker::Worker::new(worker::Ctx::on_host(worker::Host {
        containers: containers.clone(),
        images: images.clone(),
        runtime: rt,
        cgroup_parent: cfg.cgroup_parent.clone(),
        registry: Mutex::new(String::new()),
        registry_tls: Some(certs_rx.clone()),
        status_tx,
        overlay: Some(overlay),
        volumes: volume::Volumes::new(cfg.data_dir.join("volumes"), cfg.hostname.clone()),
        secrets: secrets::Values::default(),
    }));
    worker.adopt();
    let (usage_tx, usage_rx) = tokio::sync::watch::channel(Vec::new());
    tokio::spawn(stats::run(
        worker.clone(),
        Arc::new(stats::CgroupStats::new(
            "/sys/fs/cgroup",
            &cfg.cgroup_parent,
        )),
        stats::SAMPLE_PERIOD,
        usage_tx,
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    serve_metrics(&cfg, worker.clone(), certs_rx.clone(), &stop_rx).await;
    let (cpus_milli, memory_bytes) = host_capacity();
    let trusted = Arc::new(trusted::TrustedControllers::load(
        &cfg.data_dir.join("trusted-controllers.json"),
    ));
    let me = session::Identity {
        node_id,
        hostname: cfg.hostname.clone(),
        addr: cfg.listen.to_string(),
        cpus_milli,
        memory_bytes,
        role: cfg.role.clone(),
        labels: cfg.labels.clone(),
        tls: Some(certs_rx.clone()),
        data_dir: Some(cfg.data_dir.clone()),
        trusted: Some(trusted.clone()),
        usage: Some(usage_rx),
        features: session::features(),
    };
    let session = tokio::spawn(session::run(cfg.controllers.clone(), me, worker, status_rx));
    // `rctl stats` and `rctl top` (AgentApi.TaskStats, TaskTop).
    let live: Arc<dyn stats::LiveSource> = Arc::new(stats::CgroupLive::new(
        "/sys/fs/cgroup",
        &cfg.cgroup_parent,
        "/proc",
        memory_bytes,
    ));
    let procs: Arc<dyn top::ProcessSource> = Arc::new(top::ProcFs::new(
        "/sys/fs/cgroup",
        &cfg.cgroup_parent,
        "/proc",
    ));
    // Only controllers (manager certificates) may call the agent. The server restarts with
    // each renewed certificate.
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    rudder_pki::renew::serve_renewing(cfg.listen, certs_rx, stop_rx, |certs, server| {
        server.add_service(InterceptedService::new(
            AgentApiServer::new(api::AgentApiImpl {
                containers: containers.clone(),
                access: access.clone(),
                images: images.clone(),
                builder: builder.clone(),
                live: live.clone(),
                procs: procs.clone(),
            }),
            // Per request: a manager certificate of a current member of the group.
            tls::guard_checked(
                Arc::new(certs.ca().clone()),
                &[Role::Manager],
                "AgentApi",
                {
                    let trusted = trusted.clone();
                    Arc::new(move |id| trusted.check(id))
                },
            ),
        ))
    })
    .await?;
    // Containers keep running: they belong to their shims, not to this process.
    session.abort();
    pool_owner.shutdown().await;
    info!("agent stopped");
    Ok(())
}

/// Serves `/metrics` on the configured listeners until `stop`. A listener that cannot be
/// bound is logged and skipped: metrics are not worth refusing to run tasks.
async fn serve_metrics(
    cfg: &Config,
    worker: Arc<worker::Worker>,
    certs: tokio::sync::watch::Receiver<NodeCerts>,
    stop: &tokio::sync::watch::Receiver<bool>,
) {
    use rudder_pki::scrape;
    let stats = stats::CgroupStats::new("/sys/fs/cgroup", &cfg.cgroup_parent);
    let io = metrics::CgroupIo::new("/sys/fs/cgroup", &cfg.cgroup_parent, "/proc");
    let render: scrape::Render = Arc::new(move || {
        let service_of = |id: &str| {
            task_record::task_of(&bundle::ContainerDir::new(worker.container_dir(id)))
                .map(|t| t.service_name)
                .unwrap_or_default()
        };
        metrics::collect(&worker.last_statuses(), &service_of, &stats, &io)
    });
    // Admins and managers (see `role_may_scrape`). An agent does not know which admin
    // certificates were revoked: bind the listener where only the scraper reaches it if
    // that matters.
    let admit: scrape::Admit = Arc::new(|id| scrape::role_may_scrape(id.role));
    scrape::spawn_listeners(
        cfg.metrics_listen,
        cfg.metrics_addr,
        certs,
        admit,
        render,
        stop,
    )
    .await;
}

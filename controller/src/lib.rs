//! Rudder controller: a raft-rs node with a durable redb log replicating the cluster store, the
//! leader's control loops (reconcile + schedule), the dispatcher agents dial into, the Control
//! API for `rctl`, and the OCI registry agents pull images from.
//!
//! Data flow: rctl → Control API → Raft proposal → committed → `Store::apply` → watch channel →
//! orchestrator proposes tasks/placements → dispatcher streams each node its tasks → agents
//! report status → batched into one proposal.

#![warn(missing_docs)]

mod agents;
mod api;
mod autoscaler;
mod build_api;
#[cfg(test)]
mod test_support;
pub use rudder_pki::ca;
mod cluster_api;
mod commit_api;
mod context;
mod convert;
pub use rudder_pki::crypt;
mod dashboard;
mod dispatcher;
mod events_api;
mod exec_api;
mod fanout;
mod image_api;
mod image_tags;
mod leave_api;
mod locked;
pub mod metrics;
mod orchestrator;
pub mod peer;
pub mod raft_node;
#[cfg(test)]
mod raft_sim;
pub mod registry;
mod resolve;
mod secret_api;
mod security;
mod slog_bridge;
mod stack_api;
mod stats_api;
mod status_batch;
pub mod storage;
mod tls_conn;
pub use rudder_pki::tls;
pub mod transport;
mod usage;
mod watch_api;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rudder_proto::v1::cluster_server::ClusterServer;
use rudder_proto::v1::control_server::ControlServer;
use rudder_proto::v1::dispatcher_server::DispatcherServer;
use rudder_proto::v1::raft_peer_server::RaftPeerServer;
use rudder_proto::v1::registry_gc_server::RegistryGcServer;
use serde::Deserialize;
use tonic::service::interceptor::InterceptedService;
use tracing::info;

/// Milliseconds since the epoch. Only the leader calls this, to stamp commands.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh random id (24 hex characters). Only the leader calls this, to stamp commands.
pub fn new_id() -> String {
    hex::encode(rand::random::<[u8; 12]>())
}

/// Why the controller could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The configuration is invalid.
    #[error("controller: config: {0}")]
    Config(String),
    /// A file under the data dir could not be read or written (what, error).
    #[error("controller: {0}: {1}")]
    Io(&'static str, std::io::Error),
    /// The raft node failed.
    #[error(transparent)]
    Raft(#[from] raft_node::RaftError),
    /// The raft log could not be opened or written.
    #[error(transparent)]
    Storage(#[from] storage::StorageErr),
    /// The registry could not start.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// A gRPC server failed.
    #[error("controller: grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The cluster CA or certificates could not be set up.
    #[error(transparent)]
    Security(#[from] security::SecurityError),
    /// The data keys could not be loaded (locked, wrong unlock key).
    #[error(transparent)]
    Crypt(#[from] crypt::CryptError),
    /// The raft loop ended (a storage error): the controller cannot go on.
    #[error("controller: the raft loop stopped (storage error); restart after fixing the disk")]
    RaftStopped,
}

/// The controller's configuration, from `rudder-controller`'s flags.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the controller keeps its state (raft log, snapshots, keys, registry blobs).
    pub data_dir: PathBuf,
    /// gRPC API for rctl and agents.
    pub listen: SocketAddr,
    /// OCI registry.
    pub registry_listen: SocketAddr,
    /// This controller's raft id, unique in the group and never reused.
    pub raft_id: u64,
    /// Manager join token (with `join`, first start only).
    pub token: Option<String>,
    /// Lifetime of the certificates this controller issues (joins and renewals).
    pub node_cert_validity: std::time::Duration,
    /// `host:port` the other controllers and agents reach this one's gRPC at (default: listen).
    pub advertise: Option<String>,
    /// `host:port` of this controller's registry for the others (default: registry_listen).
    pub registry_advertise: Option<String>,
    /// gRPC `host:port` of a controller of an existing cluster: join it instead of starting a
    /// new one. Ignored once this controller has state.
    pub join: Option<String>,
    /// A decrypted backup's store: start a new one-member cluster from it (`--restore`).
    #[serde(skip)]
    pub restore: Option<Arc<rudder_model::Store>>,
    /// Where `/metrics` is served over HTTPS (client certificate of an admin or manager
    /// required); `None`: not served.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Where `/metrics` is also served over plain HTTP, to anyone who reaches the address;
    /// `None` (the default): not served.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Where the web dashboard is served over HTTPS (`dashboard` module); `None` (the
    /// default): not served.
    #[serde(default)]
    pub dashboard_listen: Option<SocketAddr>,
    /// Raft election timeout (`None`: [`raft_node::ELECTION_TIMEOUT`], 700 ms). A follower
    /// that hears no leader for this long (up to twice, randomized) campaigns, and a leader
    /// that hears from no quorum for this long steps down; raise it for fleets of thousands
    /// of hosts on busy machines, where a leader's heartbeats can be late by more than that.
    #[serde(default)]
    pub election_timeout: Option<std::time::Duration>,
}

impl Config {
    /// What the other controllers record about this one.
    pub fn me(&self) -> rudder_model::store::ManagerInfo {
        rudder_model::store::ManagerInfo {
            addr: self
                .advertise
                .clone()
                .unwrap_or_else(|| self.listen.to_string()),
            registry: self
                .registry_advertise
                .clone()
                .unwrap_or_else(|| self.registry_listen.to_string()),
        }
    }

    /// Checks the values that cannot be checked by their type.
    pub fn validate(&self) -> Result<(), ControllerError> {
        if self.raft_id == 0 {
            return Err(ControllerError::Config("raft id must be > 0".into()));
        }
        if self.listen.port() == self.registry_listen.port()
            && self.listen.ip() == self.registry_listen.ip()
        {
            return Err(ControllerError::Config(
                "listen and registry-listen must differ".into(),
            ));
        }
        if let Some(t) = self.election_timeout {
            if t < raft_node::TICK * 3 || t > raft_node::MAX_ELECTION_TIMEOUT {
                return Err(ControllerError::Config(format!(
                    "election-timeout-ms: {} ms is outside {}..={} ms",
                    t.as_millis(),
                    (raft_node::TICK * 3).as_millis(),
                    raft_node::MAX_ELECTION_TIMEOUT.as_millis()
                )));
            }
        }
        Ok(())
    }
}

/// Runs the controller until `shutdown` completes.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    cfg.validate()?;
    if cfg.restore.is_some() {
        check_restore_dir(&cfg.data_dir)?;
    }
    // 0700 before anything is written: the log and snapshots hold the CA key.
    storage::prepare_data_dir(&cfg.data_dir)?;
    let raft_path = cfg.data_dir.join("raft.redb");
    let fresh = !raft_path.exists();
    // A new controller either starts a cluster (bootstrapping itself as the only voter) or
    // joins one (empty until the leader sends it a snapshot).
    let voters: Vec<u64> = if cfg.join.is_some() {
        vec![]
    } else {
        vec![cfg.raft_id]
    };
    // Certificates first: a joining controller needs its manager certificate before it can
    // talk to anyone.
    let node_name = security::controller_cn(cfg.raft_id);
    // This controller's data key: it seals the raft log, the snapshots and the CA key.
    let certs_dir = cfg.data_dir.join("certs");
    let mut shutdown = Box::pin(shutdown);
    let keys = match crypt::DataKeys::load_or_create(&certs_dir) {
        // Autolock: locked until `rctl cluster unlock` sends the key.
        Err(crypt::CryptError::Locked(_)) => {
            match locked::wait_for_unlock(cfg.listen, &cfg.me().addr, &certs_dir, &mut shutdown)
                .await?
            {
                Some(keys) => Arc::new(keys),
                None => {
                    info!("controller stopping (still locked)");
                    return Ok(());
                }
            }
        }
        r => Arc::new(r?),
    };
    let (boot, storage) = if let Some(backup) = &cfg.restore {
        let store = restored_store(backup, cfg.raft_id, cfg.me())?;
        let secrets = store.secrets.as_ref().ok_or_else(|| {
            ControllerError::Config("restore: the backup holds no cluster ca".into())
        })?;
        let certs = security::restore_certs(&cfg.data_dir, &keys, &node_name, secrets)?;
        let storage = storage::RedbStorage::create_restored(
            &raft_path,
            &[cfg.raft_id],
            keys.clone(),
            &store,
        )?;
        info!(
            services = store.services.len(),
            nodes = store.nodes.len(),
            "restored the store from a backup: a new one-member cluster"
        );
        let boot = security::Bootstrap {
            certs,
            initial: None,
        };
        (boot, storage)
    } else {
        let boot = security::controller_certs(
            &cfg.data_dir,
            &keys,
            &node_name,
            cfg.join.as_deref().filter(|_| fresh),
            cfg.join.as_deref(),
            cfg.token.as_deref(),
        )
        .await?;
        let storage = storage::RedbStorage::open_encrypted(&raft_path, &voters, keys.clone())?;
        (boot, storage)
    };
    let certs = boot.certs;
    let peer_tls = tls::client_tls(&certs, ca::Role::Manager);

    let at_rest = security::AtRest::new(storage.clone(), keys.clone(), certs_dir);
    // Rewrites plaintext records of a log from before encryption, and finishes a key rotation
    // a restart interrupted.
    tokio::spawn(at_rest.clone().reencrypt());
    let transport = peer::GrpcTransport::with_tls(Some(peer_tls.clone()));
    let election = cfg.election_timeout.unwrap_or(raft_node::ELECTION_TIMEOUT);
    let raft = raft_node::start_with_options(
        cfg.raft_id,
        storage,
        transport.clone(),
        raft_node::Options {
            election_ticks: raft_node::election_ticks(election),
            own_runtime: true,
            ..Default::default()
        },
    )?;
    transport.attach(raft.clone());
    let forwarder = peer::GrpcForwarder::new(raft.clone(), Some(peer_tls));
    raft.set_forwarder(forwarder.clone());
    if let Some(initial) = boot.initial {
        tokio::spawn(security::record_initial_secrets(raft.clone(), initial));
    }
    tokio::spawn(orchestrator::run(raft.clone()));
    let usage: Arc<usage::UsageBook> = Default::default();
    tokio::spawn(autoscaler::run(raft.clone(), usage.clone()));
    // Autolock: the keyring file follows the store's unlock key (wrapped, re-wrapped, plain).
    tokio::spawn(security::follow_autolock(raft.clone(), keys));
    let me = cfg.me();
    tokio::spawn(keep_membership(raft.clone(), me.clone()));

    let registry_addr = me.registry.clone();
    let pull_leases: Arc<registry::tls::PullLeases> = Default::default();
    let registry_tls = registry::RegistryTls::new(&certs)
        .map_err(|e| ControllerError::Config(format!("registry tls: {e}")))?
        .with_policy(Arc::new(ClusterAccess {
            raft: raft.clone(),
            leases: pull_leases.clone(),
        }));
    // The registry's own certificate names the addresses it is reached at, once the store
    // holds the CA key to sign it with.
    let registry_ips = advertised_ips(&cfg, &me);
    {
        let (raft, registry_tls, certs, ips) = (
            raft.clone(),
            registry_tls.clone(),
            certs.clone(),
            registry_ips.clone(),
        );
        tokio::spawn(async move {
            let mut store = raft.watch_store();
            while store.borrow_and_update().secrets.is_none() {
                if store.changed().await.is_err() {
                    return;
                }
            }
            if let Err(e) = registry_tls.renew(&registry_certs(&raft, &certs, &ips)) {
                tracing::warn!(%e, "registry keeps the node certificate");
            }
        });
    }
    let metrics = metrics::ControllerMetrics {
        raft: raft.metrics(),
        ..Default::default()
    };
    tokio::spawn(metrics::observe_scheduling(raft.clone(), metrics.clone()));
    let blobs = registry::BlobStore::open(cfg.data_dir.join("registry"))?;
    let reg_state = registry::RegistryState::new(
        blobs,
        Arc::new(image_tags::RaftTagStore { raft: raft.clone() }),
    )
    .with_tls_peers(
        Arc::new(ManagerRegistries {
            raft: raft.clone(),
            me: cfg.raft_id,
        }),
        &registry_tls,
    )?
    .with_metrics(metrics.registry.clone());
    tokio::spawn(replicate_images(raft.clone(), reg_state.clone()));
    let reg_listener = tokio::net::TcpListener::bind(cfg.registry_listen)
        .await
        .map_err(|e| ControllerError::Io("bind registry", e))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut reg_stop = stop_rx.clone();
    let reg = tokio::spawn(registry::serve_tls(
        reg_listener,
        reg_state.clone(),
        registry_tls.clone(),
        async move {
            let _ = reg_stop.wait_for(|s| *s).await;
        },
    ));

    let agent_tls = Arc::new(std::sync::RwLock::new(Some(certs.clone())));
    let registry_gc = Arc::new(image_api::RegistryGcApi {
        raft: raft.clone(),
        registry: reg_state.clone(),
    });
    let control = Arc::new(api::ControlApi::new(context::ApiContext {
        raft: raft.clone(),
        registry: registry_addr.clone(),
        agents: agents::AgentDialer::new(agent_tls.clone()),
        images: reg_state,
        pull_leases,
        at_rest: Some(at_rest),
        usage: usage.clone(),
        dashboard_port: cfg.dashboard_listen.map(|a| a.port()),
    }));
    let cluster = Arc::new(
        cluster_api::ClusterApi::new(Arc::new(security::RaftSecrets { raft: raft.clone() }))
            .with_validity(cfg.node_cert_validity)
            .with_local_ca(certs.ca().clone()),
    );
    let dispatcher = Arc::new(dispatcher::DispatcherApi::new(
        raft.clone(),
        registry_addr,
        usage,
    ));
    let peer_api = Arc::new(peer::PeerApi {
        raft: raft.clone(),
        require_identity: true,
    });
    info!(listen = %cfg.listen, registry = %cfg.registry_listen, "controller starting");

    // Certificates renew on their own; every client and the servers pick up the new one.
    let (certs_tx, certs_rx) = tokio::sync::watch::channel(certs.clone());
    {
        let (raft, me_addr) = (raft.clone(), me.addr.clone());
        tokio::spawn(rudder_pki::renew::run(
            cfg.data_dir.join("certs"),
            move || {
                let mut v = vec![me_addr.clone()];
                v.extend(raft.store().managers.values().map(|m| m.addr.clone()));
                v
            },
            certs_tx,
            std::time::Duration::from_secs(5),
        ));
    }
    {
        let mut rx = certs_rx.clone();
        let (transport, forwarder, registry_tls, raft) = (
            transport.clone(),
            forwarder.clone(),
            registry_tls.clone(),
            raft.clone(),
        );
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let c = rx.borrow_and_update().clone();
                transport.set_tls(Some(tls::client_tls(&c, ca::Role::Manager)));
                forwarder.set_tls(Some(tls::client_tls(&c, ca::Role::Manager)));
                *agent_tls.write().expect("agent tls lock") = Some(c.clone());
                if let Err(e) = registry_tls.renew(&registry_certs(&raft, &c, &registry_ips)) {
                    tracing::warn!(%e, "registry keeps its old certificate");
                }
            }
        });
    }
    serve_metrics(&cfg, &raft, metrics, certs_rx.clone(), &stop_rx).await;
    if let Some(addr) = cfg.dashboard_listen {
        let dash = Arc::new(dashboard::Dash {
            raft: raft.clone(),
            control: control.clone(),
            used: Default::default(),
        });
        dashboard::spawn(addr, certs_rx.clone(), dash, stop_rx.clone()).await;
    }
    // Mutual TLS on every service; each admits only the roles it serves.
    let guard_raft = raft.clone();
    let grpc = rudder_pki::renew::serve_renewing(
        cfg.listen,
        certs_rx,
        stop_rx.clone(),
        move |certs, server| {
            use ca::Role::{Admin, Manager, Worker};
            let ca_cert = Arc::new(certs.ca().clone());
            // Every request: a certificate of the right role that is not revoked; the
            // caller's identity travels with the request to the handler.
            let guard = |roles, service| {
                security::guard_checked(
                    ca_cert.clone(),
                    roles,
                    service,
                    security::not_revoked(guard_raft.clone()),
                )
            };
            server
                .add_service(InterceptedService::new(
                    ControlServer::from_arc(control.clone()),
                    guard(&[Admin], "Control"),
                ))
                .add_service(InterceptedService::new(
                    DispatcherServer::from_arc(dispatcher.clone()),
                    guard(&[Worker, Manager], "Dispatcher"),
                ))
                .add_service(InterceptedService::new(
                    RaftPeerServer::from_arc(peer_api.clone())
                        .max_decoding_message_size(64 * 1024 * 1024),
                    guard(&[Manager], "RaftPeer"),
                ))
                .add_service(InterceptedService::new(
                    RegistryGcServer::from_arc(registry_gc.clone()),
                    guard(&[Manager], "RegistryGc"),
                ))
                .add_service(ClusterServer::from_arc(cluster.clone()))
        },
    );
    let grpc = tokio::spawn(grpc);
    if let (Some(join), true) = (&cfg.join, fresh) {
        let (join, id, transport) = (join.clone(), cfg.raft_id, transport.clone());
        tokio::spawn(async move { peer::join(&join, id, &me, &transport).await });
    }
    // Fail-stop (L8): a raft loop that ended (a storage error) leaves a store that no longer
    // follows the log; serving it would answer with stale data. Stop instead, and say so.
    let failed = tokio::select! {
        _ = &mut shutdown => false,
        _ = raft.stopped() => true,
    };
    if failed {
        tracing::error!("the raft loop stopped (see the error above): stopping the controller");
    } else {
        info!("controller stopping");
    }
    let _ = stop_tx.send(true);
    // A graceful stop waits for open calls, but agent sessions and raft streams never end on
    // their own: give them a moment, then stop anyway (every write is already on disk).
    let grace = std::time::Duration::from_secs(1);
    let _ = tokio::time::timeout(grace, async { tokio::join!(grpc, reg) }).await;
    if failed {
        return Err(ControllerError::RaftStopped);
    }
    Ok(())
}

/// Serves `/metrics` on the configured listeners until `stop`. A listener that cannot be
/// bound is logged and skipped: metrics are not worth refusing to run the cluster.
async fn serve_metrics(
    cfg: &Config,
    raft: &raft_node::RaftHandle,
    metrics: metrics::ControllerMetrics,
    certs: tokio::sync::watch::Receiver<tls::NodeCerts>,
    stop: &tokio::sync::watch::Receiver<bool>,
) {
    use rudder_pki::scrape;
    let render: scrape::Render = {
        let raft = raft.clone();
        Arc::new(move || metrics.render(&raft.store(), &raft.status()))
    };
    let raft = raft.clone();
    // Admins and managers, unless their certificate was revoked.
    let admit: scrape::Admit = Arc::new(move |id| {
        scrape::role_may_scrape(id.role)?;
        if raft.store().is_revoked(id.role.as_str(), &id.node) {
            return Err(format!(
                "metrics: the certificate of {} was revoked",
                id.node
            ));
        }
        Ok(())
    });
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

/// `--restore` starts a new cluster: refused on a data dir that holds anything.
fn check_restore_dir(dir: &std::path::Path) -> Result<(), ControllerError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(ControllerError::Config(format!(
                    "restore: data dir {} is not empty; restore into a new or empty directory",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ControllerError::Io("restore: read the data dir", e)),
    }
}

/// The backup's store as the first state of a new one-member cluster: this controller is the
/// only manager; every node is unknown until its agent reconnects.
pub fn restored_store(
    backup: &rudder_model::Store,
    raft_id: u64,
    me: rudder_model::store::ManagerInfo,
) -> Result<rudder_model::Store, ControllerError> {
    let mut store = backup.clone();
    store.managers = [(raft_id, me)].into_iter().collect();
    store.applied = 1;
    Ok(store)
}

/// Keeps this controller's addresses in the replicated membership: the first controller of a
/// cluster records itself once it leads; a controller whose address changed re-records it.
async fn keep_membership(raft: raft_node::RaftHandle, me: rudder_model::store::ManagerInfo) {
    let id = raft.status().id;
    let mut status = raft.watch_status();
    loop {
        let st = status.borrow_and_update().clone();
        let known = raft.store().managers.get(&id) == Some(&me);
        if st.is_leader && !known {
            match raft.add_member(id, &me).await {
                Ok(_) => info!(addr = %me.addr, "recorded this controller's address"),
                Err(e) => tracing::warn!(%e, "could not record this controller's address"),
            }
            continue;
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// What the registry asks at every request: revocations from the store; a worker reads the
/// repositories of the tasks placed on it, and anything while it runs a build (L4).
struct ClusterAccess {
    raft: raft_node::RaftHandle,
    leases: Arc<registry::tls::PullLeases>,
}

impl registry::tls::AccessPolicy for ClusterAccess {
    fn revoked(&self, role: ca::Role, node: &str) -> bool {
        self.raft.store().is_revoked(role.as_str(), node)
    }

    fn worker_may_read(&self, node: &str, repo: &str) -> bool {
        if self.leases.held(node) {
            return true;
        }
        self.raft.store().tasks_on(node).any(|t| {
            rudder_image::reference::Reference::parse(&t.spec.image)
                .is_ok_and(|r| r.repository == repo)
        })
    }
}

/// The addresses this controller's registry is reached at: the advertised registry and gRPC
/// hosts and the listen address, where they are IP addresses.
fn advertised_ips(cfg: &Config, me: &rudder_model::store::ManagerInfo) -> Vec<std::net::IpAddr> {
    let host = |a: &str| -> Option<std::net::IpAddr> {
        let h = a.rsplit_once(':').map_or(a, |(h, _)| h);
        h.trim_start_matches('[').trim_end_matches(']').parse().ok()
    };
    let mut ips: Vec<std::net::IpAddr> = [host(&me.registry), host(&me.addr)]
        .into_iter()
        .flatten()
        .chain(Some(cfg.registry_listen.ip()))
        .filter(|ip| !ip.is_unspecified())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The registry's server certificate: this controller's identity and lifetime, also naming
/// `ips`, signed here with the CA key from the store; the node certificate until the store
/// has the key (or if signing fails).
fn registry_certs(
    raft: &raft_node::RaftHandle,
    node: &tls::NodeCerts,
    ips: &[std::net::IpAddr],
) -> tls::NodeCerts {
    let Some(secrets) = raft.store().secrets.clone() else {
        return node.clone();
    };
    let issue = || -> Result<tls::NodeCerts, String> {
        let ca = ca::ClusterCa::from_pem(&secrets.ca_cert_pem, &secrets.ca_key_pem)
            .map_err(|e| e.to_string())?;
        let who = node.names().map_err(|e| e.to_string())?;
        let now = std::time::SystemTime::now();
        let left = who
            .not_after
            .duration_since(now)
            .map_err(|e| e.to_string())?;
        let (key, csr) = ca::node_csr(&who.node).map_err(|e| e.to_string())?;
        let cert = ca
            .issue_for_addresses(&csr, who.role, &who.node, now, left, ips)
            .map_err(|e| e.to_string())?;
        tls::NodeCerts::new(ca.cert_pem(), &cert, &key, None).map_err(|e| e.to_string())
    };
    issue().unwrap_or_else(|e| {
        tracing::warn!(%e, "registry certificate with addresses not issued");
        node.clone()
    })
}

/// The other managers' registries, from the replicated membership.
struct ManagerRegistries {
    raft: raft_node::RaftHandle,
    me: u64,
}

impl registry::PeerRegistries for ManagerRegistries {
    fn peers(&self) -> Vec<String> {
        let store = self.raft.store();
        let leader = self.raft.status().leader_id;
        let mut peers: Vec<(bool, String)> = store
            .managers
            .iter()
            .filter(|(id, _)| **id != self.me)
            .map(|(id, m)| (*id != leader, format!("https://{}", m.registry)))
            .collect();
        // The leader first: it most likely took the push.
        peers.sort();
        peers.into_iter().map(|(_, p)| p).collect()
    }
}

/// Copies every image recorded in the store into this controller's blob store, so an image
/// survives the loss of the manager it was pushed to.
async fn replicate_images(raft: raft_node::RaftHandle, state: registry::RegistryState) {
    let mut seen = std::collections::HashSet::new();
    let mut store_rx = raft.watch_store();
    loop {
        let store = store_rx.borrow_and_update().clone();
        for (repo, refs) in &store.images {
            for rec in refs.values() {
                if seen.insert((repo.clone(), rec.digest.clone())) {
                    let (state, repo, digest) = (state.clone(), repo.clone(), rec.digest.clone());
                    tokio::spawn(async move {
                        match registry::replicate_manifest(&state, &repo, &digest).await {
                            Ok(0) => {}
                            Ok(n) => info!(%repo, %digest, blobs = n, "image replicated"),
                            Err(e) => tracing::warn!(%repo, %digest, %e, "image not replicated"),
                        }
                    });
                }
            }
        }
        if store_rx.changed().await.is_err() {
            return;
        }
    }
}

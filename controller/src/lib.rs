//! Rudder controller: a raft-rs node with a durable redb log replicating the cluster store, the
//! leader's control loops (reconcile + schedule), the dispatcher agents dial into, the Control
//! API for `rctl`, and the OCI registry agents pull images from.
//!
//! Data flow: rctl → Control API → Raft proposal → committed → `Store::apply` → watch channel →
//! orchestrator proposes tasks/placements → dispatcher streams each node its tasks → agents
//! report status → batched into one proposal.

pub mod api;
pub mod ca;
pub mod cluster_api;
pub mod dispatcher;
pub mod image_tags;
pub mod orchestrator;
pub mod raft_node;
#[cfg(test)]
mod raft_sim;
pub mod registry;
mod slog_bridge;
pub mod storage;
pub mod tls;
pub mod transport;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rudder_proto::v1::control_server::ControlServer;
use rudder_proto::v1::dispatcher_server::DispatcherServer;
use serde::Deserialize;
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

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("controller: config: {0}")]
    Config(String),
    #[error("controller: {0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error(transparent)]
    Raft(#[from] raft_node::RaftError),
    #[error(transparent)]
    Storage(#[from] storage::StorageErr),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error("controller: grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    /// gRPC API for rctl and agents.
    pub listen: SocketAddr,
    /// OCI registry.
    pub registry_listen: SocketAddr,
    pub raft_id: u64,
}

impl Config {
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
        Ok(())
    }
}

/// Runs the controller until `shutdown` completes.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| ControllerError::Io("create data dir", e))?;
    let storage = storage::RedbStorage::open(&cfg.data_dir.join("raft.redb"), &[cfg.raft_id])?;
    let raft = raft_node::start(cfg.raft_id, storage, Arc::new(transport::NoopTransport))?;
    tokio::spawn(orchestrator::run(raft.clone()));

    let registry_addr = cfg.registry_listen.to_string();
    let blobs = registry::BlobStore::open(cfg.data_dir.join("registry"))?;
    let reg_state = registry::RegistryState::new(
        blobs,
        Arc::new(image_tags::RaftTagStore { raft: raft.clone() }),
    );
    let reg_listener = tokio::net::TcpListener::bind(cfg.registry_listen)
        .await
        .map_err(|e| ControllerError::Io("bind registry", e))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut reg_stop = stop_rx.clone();
    let reg = tokio::spawn(registry::serve(reg_listener, reg_state, async move {
        let _ = reg_stop.wait_for(|s| *s).await;
    }));

    let control = api::ControlApi {
        raft: raft.clone(),
        registry: registry_addr.clone(),
    };
    let dispatcher = dispatcher::DispatcherApi::new(raft.clone(), registry_addr);
    info!(listen = %cfg.listen, registry = %cfg.registry_listen, "controller starting");
    let mut grpc_stop = stop_rx;
    let grpc = tonic::transport::Server::builder()
        .add_service(ControlServer::new(control))
        .add_service(DispatcherServer::new(dispatcher))
        .serve_with_shutdown(cfg.listen, async move {
            let _ = grpc_stop.wait_for(|s| *s).await;
        });
    let grpc = tokio::spawn(grpc);
    shutdown.await;
    info!("controller stopping");
    let _ = stop_tx.send(true);
    let _ = grpc.await;
    let _ = reg.await;
    Ok(())
}

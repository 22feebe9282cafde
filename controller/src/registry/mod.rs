//! The controller's OCI distribution-spec registry (`/v2/`, default port 5000), so that an
//! image pushed once (skopeo, podman, docker) can be pulled by every agent.
//!
//! Parts:
//! - [`blob`]: content-addressed files on disk plus resumable uploads ([`BlobStore`]);
//! - [`tags`]: the [`TagStore`] seam mapping `repo:tag` / `repo@digest` to manifests. In a
//!   cluster it is implemented over Raft by the controller; [`MemTagStore`] serves tests and
//!   a standalone registry;
//! - [`manifest`]: pure parsing of pushed manifests (media type, referenced blobs);
//! - [`names`]: pure validation of repository names, tags and digests;
//! - `peers`: a blob upload is acknowledged once a majority of the managers hold the blob
//!   (pushed to the other managers' registries, [`PeerRegistries`]); blobs missing here are
//!   read through from them and copied ahead of need by [`replicate_manifest`];
//! - `http`: the endpoints;
//! - `tls`: mutual TLS ([`serve_tls`]): every cluster certificate may pull, only managers and
//!   admins may push or delete; managers read through from each other over it too.
//!
//! Invariants: manifests are stored as ordinary blobs (their digest is over the exact bytes
//! pushed) and are published in the tag store only after those bytes and every blob they
//! reference are on disk; blobs are shared by all repositories, while manifests and tags
//! belong to one repository. Blob bytes are not replicated through Raft: an upload is
//! acknowledged once a majority of the managers hold its blob, and a controller that lacks one
//! fetches it from a peer and stores it only once it hashes to its digest.

pub mod blob;
mod error;
pub mod gc;
pub mod http;
pub mod manifest;
pub mod names;
mod peers;
pub mod tags;
pub mod tls;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::any;

pub use blob::{BlobStore, UploadLimits};
pub use error::RegistryError;
pub use http::store_manifest;
pub use names::Digest;
pub use peers::{replicate_manifest, replicate_to_majority, PeerRegistries, StaticPeers};
pub use tags::{ManifestRef, MemTagStore, TagStore};
pub use tls::{serve_tls, Peer, RegistryTls, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES};

/// The port a registry listens on unless configured otherwise.
pub const DEFAULT_PORT: u16 = 5000;

/// Everything the registry's handlers share. Cheap to clone.
#[derive(Clone)]
pub struct RegistryState {
    blobs: BlobStore,
    tags: Arc<dyn TagStore>,
    /// Where missing blobs are fetched from; `None` for a registry on its own.
    peers: Option<Arc<peers::PeerFetcher>>,
    /// How long an upload waits for a majority of managers to hold its blob, beyond the time
    /// its bytes take to travel.
    quorum_grace: std::time::Duration,
    /// Keeps a collection from deleting the blobs of a manifest being recorded.
    gc: Arc<gc::GcGuard>,
    /// Body bytes in and out, for `/metrics`.
    metrics: Arc<crate::metrics::RegistryMetrics>,
}

impl RegistryState {
    /// A registry with no peers: a blob missing here is unknown.
    pub fn new(blobs: BlobStore, tags: Arc<dyn TagStore>) -> Self {
        Self {
            blobs,
            tags,
            peers: None,
            quorum_grace: peers::QUORUM_GRACE,
            gc: Default::default(),
            metrics: Default::default(),
        }
    }

    /// Counts body bytes into `metrics` (the controller's `/metrics` serves them).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::RegistryMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Sets how long an upload waits for a majority of managers to hold its blob before it is
    /// refused with a 503, beyond the time its bytes take to travel (default 20 s).
    pub fn with_quorum_grace(mut self, grace: std::time::Duration) -> Self {
        self.quorum_grace = grace;
        self
    }

    /// Reads blobs missing here through from `peers` (the other managers' registries).
    pub fn with_peers(mut self, peers: Arc<dyn PeerRegistries>) -> Result<Self, RegistryError> {
        self.peers = Some(Arc::new(peers::PeerFetcher::new(peers)?));
        Ok(self)
    }

    /// Reads blobs missing here through from `peers` over mutual TLS, presenting `tls`'s node
    /// certificate (renewals included). Peer base URLs are then `https://host:port`.
    pub fn with_tls_peers(
        mut self,
        peers: Arc<dyn PeerRegistries>,
        tls: &RegistryTls,
    ) -> Result<Self, RegistryError> {
        let client = tls.peer_client()?;
        self.peers = Some(Arc::new(peers::PeerFetcher::with_client(peers, client)));
        Ok(self)
    }

    /// The blob store, e.g. for replicating blobs between controllers or purging uploads.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// The tag store this registry writes through.
    pub fn tags(&self) -> &Arc<dyn TagStore> {
        &self.tags
    }

    /// What keeps a collection and manifests being recorded apart.
    pub fn gc_guard(&self) -> &gc::GcGuard {
        &self.gc
    }
}

impl std::fmt::Debug for RegistryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryState")
            .field("blobs", &self.blobs)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// The registry's HTTP routes. Body size limits are off (blobs can be gigabytes); manifest
/// bodies are limited by their handler.
pub fn router(state: RegistryState) -> axum::Router {
    routes(state, false)
}

/// The routes, with writes limited by certificate role when `authorize` (behind
/// [`serve_tls`], which supplies the role).
fn routes(state: RegistryState, authorize: bool) -> axum::Router {
    let mut app = axum::Router::new()
        .route("/v2", any(http::dispatch))
        .route("/v2/", any(http::dispatch))
        .route("/v2/{*rest}", any(http::dispatch))
        .layer(DefaultBodyLimit::disable());
    if authorize {
        app = app.layer(axum::middleware::from_fn(tls::authorize));
    }
    app.layer(axum::middleware::map_response(http::api_version_header))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::count_registry_bytes,
        ))
        .with_state(state)
}

/// Serves the registry over plain HTTP, with no authorization, on `listener` until `shutdown`
/// completes, then drains in-flight requests. For tests and development; a cluster serves
/// [`serve_tls`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: RegistryState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RegistryError> {
    let addr = listener
        .local_addr()
        .map_err(RegistryError::io("registry listener address"))?;
    tracing::info!(%addr, "registry listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(RegistryError::io("serve registry"))
}

//! Blobs between the managers' registries: a quorum before an upload is acknowledged,
//! read-through on a miss, and replication ahead of need.
//!
//! Tags and manifest records are replicated through Raft, but blob bytes (layers, configs and
//! the manifests' own bytes) are not. A finished blob upload is acknowledged only once a
//! majority of the managers (this one counted) hold the blob ([`replicate_to_majority`] pushes
//! it to the peers that lack it), so an acknowledged blob survives the loss of any minority.
//! When one is missing here, [`PeerFetcher`] asks the peers in order
//! (`GET <peer>/v2/<repo>/blobs/<digest>`), streams the answer to a scratch file while hashing
//! it, and commits it only if it hashes to the digest asked for. [`replicate_manifest`] does the
//! same ahead of time for a manifest and everything it references.
//!
//! Invariants:
//! - nothing is stored that does not hash to its name ([`BlobStore::put_stream`] checks); a peer
//!   sending wrong bytes is skipped and the next one asked;
//! - a request to a peer carries the [`LOCAL_ONLY`] header, and a request carrying it is
//!   answered from local disk only, so managers missing the same blob never ask each other in
//!   a loop; an upload carrying it is stored here and acknowledged without a quorum of its own
//!   (it is one manager's part of another's quorum);
//! - a single manager (no peers) acknowledges at once; a blob that no majority could be given
//!   within the deadline is refused (503) and, if this upload brought it, removed again, so a
//!   retrying client uploads it anew instead of finding it present;
//! - at most one download per digest runs at a time in this process; later requests for it wait
//!   and then find it on disk;
//! - a download runs in its own task, so a client hanging up does not abandon it half-way.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderName;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::time::Instant;
use tracing::Instrument;

use super::manifest::{self, MAX_MANIFEST_BYTES};
use super::names::{validate_name, Digest};
use super::{BlobStore, RegistryError, RegistryState};

/// Marks a request from a peer's read-through: answer from local disk, never ask further.
pub(crate) const LOCAL_ONLY: HeaderName = HeaderName::from_static("rudder-local-only");

/// A peer that does not accept a connection within this is skipped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a peer may take to answer with its headers.
const HEADERS_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause allowed between two pieces of a body.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A whole body of known length must arrive within this plus its length at [`MIN_RATE`].
const BODY_GRACE: Duration = Duration::from_secs(30);
/// Slowest transfer rate tolerated between managers, in bytes per second.
const MIN_RATE: u64 = 1 << 20;
/// How long an upload waits for a majority of managers to hold its blob, on top of the time
/// its bytes take at [`MIN_RATE`], unless the registry is configured otherwise.
pub(crate) const QUORUM_GRACE: Duration = Duration::from_secs(20);

/// Where the other managers' registries are. Membership changes over time, so it is asked
/// again on every miss.
pub trait PeerRegistries: Send + Sync + 'static {
    /// Base URLs of the other managers' registries (`https://10.0.0.2:5000` behind
    /// [`serve_tls`](super::serve_tls), `http://` otherwise), in the order to try them. Never
    /// this controller's own registry.
    fn peers(&self) -> Vec<String>;
}

/// A fixed list of peers.
#[derive(Clone, Debug, Default)]
pub struct StaticPeers(pub Vec<String>);

impl PeerRegistries for StaticPeers {
    fn peers(&self) -> Vec<String> {
        self.0.clone()
    }
}

/// Fetches missing blobs from peers; shared by all of a registry's handlers.
pub(crate) struct PeerFetcher {
    peers: Arc<dyn PeerRegistries>,
    client: reqwest::Client,
    /// One lock per digest being fetched; an entry lives while some task holds or awaits it.
    in_flight: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for PeerFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerFetcher").finish_non_exhaustive()
    }
}

/// Why one peer could not supply a blob. Only [`FetchError::Local`] stops the search.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("registry: peer does not hold the blob")]
    NotFound,
    #[error("registry: peer answered {0}")]
    Status(reqwest::StatusCode),
    #[error("registry: peer request: {0}")]
    Http(#[from] reqwest::Error),
    #[error("registry: peer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("registry: peer body stalled or exceeded its deadline")]
    BodyTimeout,
    #[error("registry: peer offered {0} bytes, more than the {1} allowed")]
    TooLarge(u64, u64),
    /// The peer's bytes were refused: wrong digest, wrong length, broken body.
    #[error("registry: peer sent a bad blob: {0}")]
    Refused(RegistryError),
    /// This controller could not store the blob (disk); asking other peers would not help.
    #[error(transparent)]
    Local(RegistryError),
}

impl PeerFetcher {
    pub(crate) fn new(peers: Arc<dyn PeerRegistries>) -> Result<Self, RegistryError> {
        let client = client_builder()
            .build()
            .map_err(|e| RegistryError::PeerClient(e.to_string()))?;
        Ok(Self::with_client(peers, client))
    }

    /// Fetches through `client`, e.g. one speaking mutual TLS (see `RegistryTls::peer_client`).
    pub(crate) fn with_client(peers: Arc<dyn PeerRegistries>, client: reqwest::Client) -> Self {
        Self {
            peers,
            client,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<tokio::sync::Mutex<()>>>> {
        // Each update is a single insert or remove, so a poisoned map is still consistent.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches `digest` from the first peer that has it, unless it is (or becomes, through a
    /// concurrent fetch) present locally first. Returns whether the blob is on disk now.
    async fn fetch(
        self: Arc<Self>,
        blobs: BlobStore,
        repo: String,
        digest: Digest,
        limit: Option<u64>,
    ) -> Result<bool, RegistryError> {
        let slot = InFlight::join(&self, &digest);
        let _held = slot.lock.lock().await;
        if blobs.stat(&digest).await?.is_some() {
            return Ok(true);
        }
        for peer in self.peers.peers() {
            let span = tracing::info_span!("peer", %peer);
            let fetched = self
                .fetch_from(&blobs, &peer, &repo, &digest, limit)
                .instrument(span)
                .await;
            match fetched {
                Ok(size) => {
                    tracing::info!(%peer, %digest, size, "blob fetched from peer");
                    return Ok(true);
                }
                Err(FetchError::Local(err)) => return Err(err),
                Err(FetchError::NotFound) => {
                    tracing::debug!(%peer, %digest, "peer does not hold the blob");
                }
                Err(err) => tracing::warn!(%peer, %digest, %err, "fetching a blob from a peer"),
            }
        }
        Ok(false)
    }

    /// Downloads `digest` from one peer into the blob store; returns its size.
    async fn fetch_from(
        &self,
        blobs: &BlobStore,
        peer: &str,
        repo: &str,
        digest: &Digest,
        limit: Option<u64>,
    ) -> Result<u64, FetchError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", peer.trim_end_matches('/'));
        let request = self.client.get(&url).header(LOCAL_ONLY, "1").send();
        let resp = tokio::time::timeout(HEADERS_TIMEOUT, request)
            .await
            .map_err(|_| FetchError::Timeout(HEADERS_TIMEOUT))??;
        match resp.status() {
            reqwest::StatusCode::OK => {}
            reqwest::StatusCode::NOT_FOUND => return Err(FetchError::NotFound),
            status => return Err(FetchError::Status(status)),
        }
        let len = resp.content_length();
        if let (Some(len), Some(limit)) = (len, limit) {
            if len > limit {
                return Err(FetchError::TooLarge(len, limit));
            }
        }
        let deadline =
            len.map(|len| Instant::now() + BODY_GRACE + Duration::from_secs(len / MIN_RATE));
        let body = guarded(resp.bytes_stream(), deadline, limit);
        blobs
            .put_stream(digest, len, body)
            .await
            .map_err(|err| match err {
                RegistryError::Io { .. } => FetchError::Local(err),
                refused => FetchError::Refused(refused),
            })
    }
}

impl PeerFetcher {
    /// Makes sure `peer` holds blob `digest` (of `size` bytes, on local disk): if a local-only
    /// HEAD does not find it there, uploads it in one POST, marked local-only so that the peer
    /// stores it without seeking a quorum of its own. The request must finish by `deadline`.
    async fn push_to(
        &self,
        blobs: &BlobStore,
        peer: &str,
        repo: &str,
        digest: &Digest,
        size: u64,
        deadline: Instant,
    ) -> Result<(), FetchError> {
        let base = peer.trim_end_matches('/');
        let left = || deadline.saturating_duration_since(Instant::now());
        let timed_out = |limit: Duration| {
            move |err: reqwest::Error| {
                if err.is_timeout() {
                    FetchError::Timeout(limit)
                } else {
                    FetchError::Http(err)
                }
            }
        };
        let limit = left().min(HEADERS_TIMEOUT);
        let head = self
            .client
            .head(format!("{base}/v2/{repo}/blobs/{digest}"))
            .header(LOCAL_ONLY, "1")
            .timeout(limit)
            .send()
            .await
            .map_err(timed_out(limit))?;
        match head.status() {
            reqwest::StatusCode::OK => return Ok(()),
            reqwest::StatusCode::NOT_FOUND => {}
            status => return Err(FetchError::Status(status)),
        }
        let (file, len) = blobs
            .open_blob(digest)
            .await
            .map_err(FetchError::Local)?
            .ok_or_else(|| FetchError::Local(RegistryError::BlobUnknown(digest.to_string())))?;
        if len != size {
            return Err(FetchError::Local(RegistryError::SizeInvalid(format!(
                "{digest} changed size on disk from {size} to {len} bytes"
            ))));
        }
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let limit = left();
        let resp = self
            .client
            .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}"))
            .header(LOCAL_ONLY, "1")
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .timeout(limit)
            .body(body)
            .send()
            .await
            .map_err(timed_out(limit))?;
        match resp.status() {
            reqwest::StatusCode::CREATED => Ok(()),
            status => Err(FetchError::Status(status)),
        }
    }
}

/// Waits until a majority of the managers, this one counted, hold blob `digest` (already on
/// local disk), pushing it to every peer that lacks it. Returns as soon as the majority is
/// reached; pushes to the remaining peers go on in the background. A registry without peers,
/// or one manager alone, returns at once.
///
/// Fails with [`RegistryError::NoQuorum`] when too many peers fail or the deadline (the
/// registry's quorum grace, [`QUORUM_GRACE`] by default, plus the blob's size at [`MIN_RATE`])
/// passes first.
#[tracing::instrument(skip(state))]
pub async fn replicate_to_majority(
    state: &RegistryState,
    repo: &str,
    digest: &Digest,
) -> Result<(), RegistryError> {
    let Some(fetcher) = state.peers.clone() else {
        return Ok(());
    };
    let peers = fetcher.peers.peers();
    let total = peers.len() + 1;
    let needed = total / 2 + 1;
    if needed <= 1 {
        return Ok(());
    }
    let size = state
        .blobs
        .stat(digest)
        .await?
        .ok_or_else(|| RegistryError::BlobUnknown(digest.to_string()))?;
    let span = state.quorum_grace + Duration::from_secs(size / MIN_RATE);
    let deadline = Instant::now() + span;
    let mut pushes: futures::stream::FuturesUnordered<_> = peers
        .into_iter()
        .map(|peer| {
            let (fetcher, blobs) = (fetcher.clone(), state.blobs.clone());
            let (repo, digest) = (repo.to_owned(), digest.clone());
            let span = tracing::info_span!("peer", %peer);
            // Each push in its own task: one that outlives the quorum (or a client hanging
            // up) still completes, so every manager ends up with the blob.
            tokio::spawn(
                async move {
                    let pushed = fetcher
                        .push_to(&blobs, &peer, &repo, &digest, size, deadline)
                        .await;
                    match &pushed {
                        Ok(()) => tracing::debug!(%digest, "peer holds the blob"),
                        Err(err) => tracing::warn!(%digest, %err, "pushing a blob to a peer"),
                    }
                    (peer, pushed)
                }
                .instrument(span),
            )
        })
        .collect();
    let mut held = 1;
    let mut failed = Vec::new();
    while held < needed {
        let next = tokio::time::timeout_at(deadline, pushes.next()).await;
        match next {
            Ok(Some(Ok((_, Ok(()))))) => held += 1,
            Ok(Some(Ok((peer, Err(err))))) => failed.push(format!("{peer}: {err}")),
            Ok(Some(Err(join))) => failed.push(format!("push task: {join}")),
            Ok(None) => break,
            Err(_) => {
                failed.push(format!("no majority within {span:?}"));
                break;
            }
        }
    }
    if held >= needed {
        tracing::debug!(held, total, "blob held by a majority of managers");
        return Ok(());
    }
    Err(RegistryError::NoQuorum {
        digest: digest.to_string(),
        held,
        needed,
        total,
        why: failed.join("; "),
    })
}

/// The settings every client for peer registries shares.
pub(crate) fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        // Manager-to-manager traffic stays inside the cluster, whatever the environment says.
        .no_proxy()
        .user_agent(concat!("rudder-controller/", env!("CARGO_PKG_VERSION")))
}

/// A task's membership in the fetch of one digest: holds that digest's lock alive and removes
/// it from the map when the last interested task leaves.
struct InFlight<'a> {
    fetcher: &'a PeerFetcher,
    digest: Digest,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> InFlight<'a> {
    fn join(fetcher: &'a PeerFetcher, digest: &Digest) -> Self {
        let lock = fetcher
            .in_flight()
            .entry(digest.clone())
            .or_default()
            .clone();
        Self {
            fetcher,
            digest: digest.clone(),
            lock,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut map = self.fetcher.in_flight();
        // Two references, the map's and ours, means nobody else holds or awaits the lock; the
        // count only grows under the map's mutex, which we hold.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.digest);
        }
    }
}

/// Bounds a peer's body: each piece must come within [`STALL_TIMEOUT`] and before
/// `deadline`, and no more than `limit` bytes in all.
fn guarded(
    body: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
    deadline: Option<Instant>,
    limit: Option<u64>,
) -> impl Stream<Item = Result<Bytes, FetchError>> + Send + Unpin {
    let state = (Box::pin(body), 0u64, false);
    Box::pin(futures::stream::unfold(
        state,
        move |(mut body, mut seen, failed)| async move {
            if failed {
                return None;
            }
            let stall = Instant::now() + STALL_TIMEOUT;
            let until = deadline.map_or(stall, |d| d.min(stall));
            let item = match tokio::time::timeout_at(until, body.next()).await {
                Err(_) => Err(FetchError::BodyTimeout),
                Ok(None) => return None,
                Ok(Some(Err(e))) => Err(FetchError::Http(e)),
                Ok(Some(Ok(chunk))) => {
                    seen += chunk.len() as u64;
                    match limit {
                        Some(limit) if seen > limit => Err(FetchError::TooLarge(seen, limit)),
                        _ => Ok(chunk),
                    }
                }
            };
            let failed = item.is_err();
            Some((item, (body, seen, failed)))
        },
    ))
}

/// Makes sure blob `digest` is on local disk, fetching it from a peer if it is not; `limit`
/// caps how many bytes a peer may send. Returns whether the blob is present now (`false`: no
/// peer has it, or there are no peers).
pub(crate) async fn ensure_local(
    state: &RegistryState,
    repo: &str,
    digest: &Digest,
    limit: Option<u64>,
) -> Result<bool, RegistryError> {
    if state.blobs.stat(digest).await?.is_some() {
        return Ok(true);
    }
    let Some(fetcher) = state.peers.clone() else {
        return Ok(false);
    };
    let task = fetcher.fetch(state.blobs.clone(), repo.to_owned(), digest.clone(), limit);
    tokio::spawn(task.in_current_span())
        .await
        .map_err(|e| RegistryError::io("peer fetch task")(std::io::Error::other(e)))?
}

/// Makes sure the manifest `repo@digest`, its config and layers (and, for an index, every
/// child manifest with its own blobs) are on local disk, fetching missing ones from peers.
/// Idempotent; returns how many blobs were fetched (0 when everything was already here).
///
/// Meant to be spawned when a follower applies a new manifest record, so that the image can
/// be pulled from this controller even after the one that received the push is gone. Stops at
/// the first blob no peer holds ([`RegistryError::BlobUnknown`]); what was fetched stays, so a
/// retry only fetches the rest.
#[tracing::instrument(skip(state))]
pub async fn replicate_manifest(
    state: &RegistryState,
    repo: &str,
    digest: &str,
) -> Result<usize, RegistryError> {
    validate_name(repo)?;
    let root = Digest::parse(digest)?;
    let media_type = state.tags.resolve(repo, digest).map(|m| m.media_type);
    let mut fetched = 0;
    let mut seen = HashSet::new();
    // (digest, is a manifest)
    let mut todo = vec![(root.clone(), true)];
    while let Some((digest, is_manifest)) = todo.pop() {
        if !seen.insert(digest.clone()) {
            continue;
        }
        if state.blobs.stat(&digest).await?.is_none() {
            let limit = is_manifest.then_some(MAX_MANIFEST_BYTES as u64);
            if !ensure_local(state, repo, &digest, limit).await? {
                return Err(RegistryError::BlobUnknown(digest.to_string()));
            }
            fetched += 1;
        }
        if !is_manifest {
            continue;
        }
        let bytes = state
            .blobs
            .read(&digest, MAX_MANIFEST_BYTES as u64)
            .await?
            .ok_or_else(|| RegistryError::BlobUnknown(digest.to_string()))?;
        let content_type = if digest == root {
            media_type.as_deref()
        } else {
            None
        };
        let parsed = manifest::parse(&bytes, content_type)?;
        for reference in parsed.references {
            let child = parsed.children.contains(&reference);
            todo.push((reference, child));
        }
    }
    if fetched > 0 {
        tracing::info!(fetched, "manifest replicated from peers");
    }
    Ok(fetched)
}

//! Garbage collection of this manager's blobs, and the inventory `rctl image ls` reports.
//!
//! Tags and manifest records are replicated through Raft; the blobs they reference live on
//! each manager's disk. `rctl image rm` only removes records (as a distribution registry's
//! DELETE does); the bytes go when [`collect`] runs on every manager: it reads every recorded
//! manifest (fetching it from a peer when it is missing here, since a follower may not have
//! replicated it yet), marks the manifest, its config, its layers and, for an index, its child
//! manifests with theirs, and deletes every other blob older than the grace period.
//!
//! Invariants:
//! - a blob referenced by any record this manager's store holds is never deleted; a record
//!   whose manifest cannot be read here nor from any peer stops the collection (its
//!   references are unknown, so nothing is safe to delete);
//! - an unreferenced blob younger than the grace period stays: a push uploads its blobs before
//!   the manifest that references them, and a commit stores its layer before its record;
//! - a manifest recorded while a collection runs never loses a blob: `store_manifest` checks
//!   its blobs, records it and marks them ([`GcGuard::recorded`]) under the guard's read lock,
//!   and the collection re-checks each candidate under its write lock right before deleting it
//!   (a blob marked by a manifest that is still recorded, or written or touched within the
//!   grace period, stays). Either the mark comes first and the blob stays, or the delete comes first
//!   and the manifest is refused for the missing blob (the push can be retried);
//! - a push that skips an old blob because HEAD (or a mount) said it exists touches it, so a
//!   collection with a grace period keeps it until the manifest comes;
//! - marks live in memory on the manager that recorded the manifest: another manager's
//!   collection may still drop its own copy, which pulls then read through from the first.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rudder_image::usage::{self, ImageBlobs, StoredBlob};
use serde_json::Value;

use super::manifest::{self, MAX_MANIFEST_BYTES};
use super::names::Digest;
use super::{peers, RegistryError, RegistryState};

/// Largest config blob read for its `created` time.
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Index nesting followed at most (guards against reference cycles).
const MAX_DEPTH: usize = 4;
/// Marks older than this are swept: no collection runs that long (callers give up after 60 s),
/// and a manifest recorded before a collection read its records is among them.
const RECORDED_KEEP: Duration = Duration::from_secs(600);
/// Marks kept before old ones are swept on insert.
const MAX_MARKS: usize = 4096;

/// Serialises a collection's deletes with manifests being recorded, and remembers which
/// manifests lately recorded reference which blobs (see the module doc). One per registry.
#[derive(Debug, Default)]
pub struct GcGuard {
    lock: tokio::sync::RwLock<()>,
    /// Blob digest → when it was last marked, and the `(repository, manifest digest)` of the
    /// manifests that marked it.
    recorded: Mutex<HashMap<String, (Instant, Vec<ManifestOf>)>>,
}

/// `(repository, manifest digest)`.
type ManifestOf = (String, String);

impl GcGuard {
    /// Held by whoever checks a manifest's blobs and records it, until it is recorded.
    pub async fn recording(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.lock.read().await
    }

    /// Marks `blobs` (the manifest itself included) as referenced by manifest `repo@manifest`,
    /// just recorded.
    pub fn recorded<'a>(
        &self,
        repo: &str,
        manifest: &str,
        blobs: impl IntoIterator<Item = &'a str>,
    ) {
        let now = Instant::now();
        let mut m = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
        for d in blobs {
            let (at, owners) = m.entry(d.to_string()).or_insert_with(|| (now, Vec::new()));
            *at = now;
            let owner = (repo.to_string(), manifest.to_string());
            if !owners.contains(&owner) {
                owners.push(owner);
            }
        }
        if m.len() > MAX_MARKS {
            m.retain(|_, (at, _)| now.duration_since(*at) < RECORDED_KEEP);
        }
    }

    /// Whether a manifest that marked `digest` lately is still recorded in `tags`: recorded
    /// after the collection read its records, so they do not show it. (One removed since, e.g.
    /// by `rctl image rm` before a prune, protects nothing.)
    fn still_recorded(&self, digest: &str, tags: &dyn super::TagStore) -> bool {
        let m = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
        m.get(digest).is_some_and(|(at, owners)| {
            at.elapsed() < RECORDED_KEEP
                && owners
                    .iter()
                    .any(|(repo, manifest)| tags.resolve(repo, manifest).is_some())
        })
    }
}

/// Test seam: runs between the inventory and the deletes of a collection.
pub(crate) type BeforeDelete<'a> =
    &'a (dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync);

/// Why an inventory or a collection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// A manifest no registry holds: its blobs are unknown, so nothing is collected.
    #[error("registry gc: manifest {digest} of {repo} is neither here nor on any peer; not collecting (its blobs are unknown)")]
    ManifestMissing {
        /// The repository.
        repo: String,
        /// The manifest's or blob's digest.
        digest: String,
    },
    /// A manifest could not be read.
    #[error("registry gc: manifest {digest} of {repo}: {source}")]
    Manifest {
        /// The repository.
        repo: String,
        /// The manifest's or blob's digest.
        digest: String,
        /// The underlying error.
        source: RegistryError,
    },
    /// The blob directory could not be listed.
    #[error("registry gc: list {path}: {source}")]
    List {
        /// The directory listed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A blob could not be deleted.
    #[error("registry gc: delete blob {digest}: {source}")]
    Delete {
        /// The manifest's or blob's digest.
        digest: String,
        /// The underlying error.
        source: RegistryError,
    },
    /// The registry failed otherwise.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// One manifest record of the tag store: `repo:reference`, `reference` a tag or the
/// manifest's own digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The repository.
    pub repo: String,
    /// A tag, or the manifest's digest.
    pub reference: String,
    /// The manifest's digest.
    pub digest: String,
    /// The manifest's media type.
    pub media_type: String,
}

/// A manifest as this registry holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestInfo {
    /// Configs and layers (of every child, for an index), with their sizes as stored.
    pub blobs: Vec<(String, u64)>,
    /// The manifest's own digest and, for an index, its children's.
    pub manifests: Vec<String>,
    /// The config's digest (an image manifest only).
    pub config: Option<String>,
}

/// Everything [`inventory`] found: the records' manifests and the blobs on disk.
#[derive(Debug, Default)]
pub struct Inventory {
    /// By manifest digest.
    pub manifests: HashMap<String, ManifestInfo>,
    /// The blob files found on disk.
    pub on_disk: Vec<StoredBlob>,
}

impl Inventory {
    /// The images (one per distinct manifest) with their blobs, for [`usage`].
    pub fn images(&self) -> Vec<ImageBlobs> {
        let mut v: Vec<ImageBlobs> = self
            .manifests
            .iter()
            .map(|(id, m)| ImageBlobs {
                id: id.clone(),
                blobs: m.blobs.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Manifest blobs (records' and index children's): referenced though no image lists
    /// them as a config or layer.
    pub fn manifest_digests(&self) -> BTreeSet<String> {
        self.manifests
            .values()
            .flat_map(|m| m.manifests.iter().cloned())
            .collect()
    }
}

/// Reads every record's manifest (from a peer when missing here) and lists the blobs on disk.
pub async fn inventory(state: &RegistryState, records: &[Record]) -> Result<Inventory, GcError> {
    let mut inv = Inventory::default();
    for r in records {
        if inv.manifests.contains_key(&r.digest) {
            continue;
        }
        let info = read_manifest(state, &r.repo, &r.digest, Some(&r.media_type), 0).await?;
        inv.manifests.insert(r.digest.clone(), info);
    }
    inv.on_disk = list_blobs(state).await?;
    Ok(inv)
}

/// The blobs `repo@digest` needs, following an index's children.
async fn read_manifest(
    state: &RegistryState,
    repo: &str,
    digest: &str,
    media_type: Option<&str>,
    depth: usize,
) -> Result<ManifestInfo, GcError> {
    let bad = |source: RegistryError| GcError::Manifest {
        repo: repo.to_string(),
        digest: digest.to_string(),
        source,
    };
    let d = Digest::parse(digest).map_err(bad)?;
    let limit = MAX_MANIFEST_BYTES as u64;
    if !peers::ensure_local(state, repo, &d, Some(limit))
        .await
        .map_err(bad)?
    {
        return Err(GcError::ManifestMissing {
            repo: repo.to_string(),
            digest: digest.to_string(),
        });
    }
    let bytes = state
        .blobs()
        .read(&d, limit)
        .await
        .map_err(bad)?
        .ok_or_else(|| GcError::ManifestMissing {
            repo: repo.to_string(),
            digest: digest.to_string(),
        })?;
    let parsed = manifest::parse(&bytes, media_type).map_err(bad)?;
    let sizes = descriptor_sizes(&bytes);
    let mut info = ManifestInfo {
        manifests: vec![digest.to_string()],
        ..Default::default()
    };
    let doc: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    info.config = doc
        .pointer("/config/digest")
        .and_then(Value::as_str)
        .map(str::to_string);
    for r in &parsed.references {
        if parsed.children.contains(r) {
            if depth >= MAX_DEPTH {
                return Err(bad(RegistryError::ManifestInvalid(format!(
                    "indexes nested more than {MAX_DEPTH} deep"
                ))));
            }
            let child = Box::pin(read_manifest(state, repo, r.as_str(), None, depth + 1)).await?;
            info.blobs.extend(child.blobs);
            info.manifests.extend(child.manifests);
        } else {
            let size = sizes.get(r.as_str()).copied().unwrap_or(0);
            info.blobs.push((r.to_string(), size));
        }
    }
    Ok(info)
}

/// digest → size of every descriptor (config, layers, manifests, blobs) in a manifest.
fn descriptor_sizes(bytes: &[u8]) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let Ok(doc) = serde_json::from_slice::<Value>(bytes) else {
        return out;
    };
    let mut descriptors: Vec<&Value> = doc.get("config").into_iter().collect();
    for key in ["layers", "manifests", "blobs"] {
        if let Some(list) = doc.get(key).and_then(Value::as_array) {
            descriptors.extend(list);
        }
    }
    for d in descriptors {
        if let (Some(digest), Some(size)) = (
            d.get("digest").and_then(Value::as_str),
            d.get("size").and_then(Value::as_u64),
        ) {
            out.insert(digest.to_string(), size);
        }
    }
    out
}

/// The config's `created` time (RFC 3339), if the config is here and says.
pub async fn created(state: &RegistryState, config: &str) -> Option<String> {
    let d = Digest::parse(config).ok()?;
    let bytes = state.blobs().read(&d, MAX_CONFIG_BYTES).await.ok()??;
    let doc: Value = serde_json::from_slice(&bytes).ok()?;
    doc.get("created")?.as_str().map(str::to_string)
}

/// Every finished blob on this manager's disk (`blobs/sha256/<hex>`, see `blob`), with its
/// size and when it was last written.
async fn list_blobs(state: &RegistryState) -> Result<Vec<StoredBlob>, GcError> {
    let dir = state.blobs().root().join("blobs").join("sha256");
    tokio::task::spawn_blocking(move || {
        let list = |source| GcError::List {
            path: dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(list)? {
            let entry = entry.map_err(list)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
                continue;
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Deleted meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(list(e)),
            };
            out.push(StoredBlob {
                digest: digest.to_string(),
                size: meta.len(),
                modified: last_written(&meta),
            });
        }
        Ok(out)
    })
    .await
    .map_err(|e| GcError::Registry(RegistryError::io("list blobs")(std::io::Error::other(e))))?
}

/// The later of a file's mtime and ctime: a rename or a touch counts as a write.
pub fn last_written(meta: &std::fs::Metadata) -> SystemTime {
    let ctime = SystemTime::UNIX_EPOCH
        + Duration::new(
            meta.ctime().max(0) as u64,
            meta.ctime_nsec().clamp(0, 999_999_999) as u32,
        );
    meta.modified().map_or(ctime, |m| m.max(ctime))
}

/// What one collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs deleted.
    pub blobs: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Unreferenced blobs kept for being younger than the grace period.
    pub kept_young: u64,
}

/// Deletes the blobs on this manager that no record references and that are older than
/// `grace`. `records` must be every manifest record of an up-to-date store.
#[tracing::instrument(skip(state, records), fields(records = records.len()))]
pub async fn collect(
    state: &RegistryState,
    records: &[Record],
    grace: Duration,
) -> Result<GcReport, GcError> {
    collect_with(state, records, grace, None).await
}

/// [`collect`], running `before_delete` between the inventory and the deletes.
pub(crate) async fn collect_with(
    state: &RegistryState,
    records: &[Record],
    grace: Duration,
    before_delete: Option<BeforeDelete<'_>>,
) -> Result<GcReport, GcError> {
    let inv = inventory(state, records).await?;
    let referenced = usage::referenced(&inv.images(), &inv.manifest_digests());
    let plan = usage::collect(&inv.on_disk, &referenced, SystemTime::now(), grace);
    let mut report = GcReport {
        kept_young: plan.young.len() as u64,
        ..Default::default()
    };
    if let Some(hook) = before_delete {
        hook().await;
    }
    for b in &plan.remove {
        let d = Digest::parse(&b.digest)?;
        // Re-checked under the write lock: no manifest is between its blob check and its
        // record meanwhile, and one recorded since the inventory marked its blobs.
        let _exclusive = state.gc_guard().lock.write().await;
        if state
            .gc_guard()
            .still_recorded(d.as_str(), state.tags().as_ref())
            || state.blobs().touched_within(&d, grace).await
        {
            tracing::debug!(digest = %d, "blob recorded or touched during the collection; kept");
            report.kept_young += 1;
            continue;
        }
        let existed = state
            .blobs()
            .delete(&d)
            .await
            .map_err(|source| GcError::Delete {
                digest: b.digest.clone(),
                source,
            })?;
        if existed {
            report.blobs += 1;
            report.bytes += b.size;
        }
    }
    tracing::info!(
        blobs = report.blobs,
        bytes = report.bytes,
        kept_young = report.kept_young,
        "registry blobs collected"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::registry::{BlobStore, MemTagStore};

    fn manifest(config: &Digest, config_size: u64, layers: &[(&Digest, u64)]) -> Vec<u8> {
        let layers: Vec<Value> = layers
            .iter()
            .map(|(d, s)| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": d.to_string(), "size": s
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.to_string(), "size": config_size
            },
            "layers": layers,
        }))
        .unwrap()
    }

    // A blob's ctime cannot be set back, so "old" is a grace of zero and "young" a long one.
    #[tokio::test]
    async fn collects_only_unreferenced_blobs_past_grace() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(tmp.path()).unwrap();
        let state = RegistryState::new(blobs.clone(), Arc::new(MemTagStore::new()));
        let config =
            br#"{"created":"2026-11-23T10:00:00Z","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cfg = blobs.put_bytes(config).await.unwrap();
        let base = blobs.put_bytes(b"base layer").await.unwrap();
        let top = blobs.put_bytes(b"top layer").await.unwrap();
        let orphan = blobs.put_bytes(b"orphan layer").await.unwrap();
        let m = manifest(&cfg, config.len() as u64, &[(&base, 10), (&top, 9)]);
        let md = blobs.put_bytes(&m).await.unwrap();
        let records = vec![
            Record {
                repo: "box".into(),
                reference: "v1".into(),
                digest: md.to_string(),
                media_type: manifest::OCI_MANIFEST.into(),
            },
            Record {
                repo: "box".into(),
                reference: md.to_string(),
                digest: md.to_string(),
                media_type: manifest::OCI_MANIFEST.into(),
            },
        ];

        let inv = inventory(&state, &records).await.unwrap();
        assert_eq!(inv.manifests.len(), 1);
        assert_eq!(inv.on_disk.len(), 5);
        let info = &inv.manifests[md.as_str()];
        assert_eq!(info.config.as_deref(), Some(cfg.as_str()));
        assert_eq!(
            info.blobs,
            vec![
                (cfg.to_string(), config.len() as u64),
                (base.to_string(), 10),
                (top.to_string(), 9)
            ]
        );
        assert_eq!(
            created(&state, cfg.as_str()).await.as_deref(),
            Some("2026-11-23T10:00:00Z")
        );

        // Young: everything stays.
        let r = collect(&state, &records, Duration::from_secs(600))
            .await
            .unwrap();
        assert_eq!(
            r,
            GcReport {
                blobs: 0,
                bytes: 0,
                kept_young: 1
            }
        );
        // Past the grace period, only the orphan goes.
        let r = collect(&state, &records, Duration::ZERO).await.unwrap();
        assert_eq!(
            r,
            GcReport {
                blobs: 1,
                bytes: 12,
                kept_young: 0
            }
        );
        assert!(blobs.stat(&orphan).await.unwrap().is_none());
        for d in [&cfg, &base, &top, &md] {
            assert!(blobs.stat(d).await.unwrap().is_some(), "{d} kept");
        }
        // Without records, everything is garbage.
        let r = collect(&state, &[], Duration::ZERO).await.unwrap();
        assert_eq!(r.blobs, 4);
        assert!(list_blobs(&state).await.unwrap().is_empty());
    }

    /// The interleaving of SECURITY-AUDIT M6: a collection reads its records, a push then
    /// records a manifest over an old blob no record referenced (it skipped the upload since
    /// the blob was there), then the collection deletes. The manifest's blobs must stay.
    #[tokio::test]
    async fn a_manifest_recorded_during_a_collection_keeps_its_blobs() {
        use futures::FutureExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(tmp.path()).unwrap();
        let state = RegistryState::new(blobs.clone(), Arc::new(MemTagStore::new()));
        let config = br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cfg = blobs.put_bytes(config).await.unwrap();
        let old = blobs.put_bytes(b"old layer").await.unwrap();
        let orphan = blobs.put_bytes(b"orphan layer").await.unwrap();
        let m = manifest(&cfg, config.len() as u64, &[(&old, 9)]);
        let (push_state, pushed) = (state.clone(), m.clone());
        let push = move || {
            let (state, m) = (push_state.clone(), pushed.clone());
            async move {
                super::super::store_manifest(
                    &state,
                    "box",
                    Some("v1"),
                    &m,
                    Some(manifest::OCI_MANIFEST),
                    false,
                )
                .await
                .unwrap();
            }
            .boxed()
        };
        // No records when the collection read them: every blob was garbage then.
        let r = collect_with(&state, &[], Duration::ZERO, Some(&push))
            .await
            .unwrap();
        assert!(
            blobs.stat(&orphan).await.unwrap().is_none(),
            "the orphan goes"
        );
        for d in [&cfg, &old, &Digest::of(&m)] {
            assert!(blobs.stat(d).await.unwrap().is_some(), "{d} kept");
        }
        assert_eq!((r.blobs, r.kept_young), (1, 2));
        // Once recorded, the next collection (with the record) keeps them as referenced.
        let records = vec![Record {
            repo: "box".into(),
            reference: "v1".into(),
            digest: Digest::of(&m).to_string(),
            media_type: manifest::OCI_MANIFEST.into(),
        }];
        let r = collect(&state, &records, Duration::ZERO).await.unwrap();
        assert_eq!(r.blobs, 0);
        // Removed again (`rctl image rm`), its marks protect nothing: a prune takes it all.
        let md = Digest::of(&m);
        assert!(state.tags().delete("box", md.as_str()).await.unwrap());
        let r = collect(&state, &[], Duration::ZERO).await.unwrap();
        assert_eq!(r.blobs, 3);
        assert!(list_blobs(&state).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_missing_manifest_stops_the_collection() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(tmp.path()).unwrap();
        let state = RegistryState::new(blobs.clone(), Arc::new(MemTagStore::new()));
        let keep = blobs.put_bytes(b"some layer").await.unwrap();
        let missing = Digest::of(b"a manifest that is nowhere");
        let records = vec![Record {
            repo: "box".into(),
            reference: "v1".into(),
            digest: missing.to_string(),
            media_type: manifest::OCI_MANIFEST.into(),
        }];
        let err = collect(&state, &records, Duration::ZERO).await.unwrap_err();
        assert!(matches!(err, GcError::ManifestMissing { .. }), "{err}");
        assert!(err.to_string().contains(missing.as_str()), "{err}");
        assert!(blobs.stat(&keep).await.unwrap().is_some());
    }
}

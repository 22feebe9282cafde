//! The per-host content store the agent runs containers from.
//!
//! Layout under `root`:
//! - `blobs/sha256/<hex>`: manifests, configs and layer blobs, named by their digest;
//! - `layers/<hex of the layer's chain id>/`: that layer unpacked, an overlayfs lower dir (a
//!   snapshot). Named by chain id ([`digest::chain_ids`]), as containerd and BuildKit do, so
//!   two byte-identical layers of one image get two directories (one directory twice in
//!   `lowerdir` fails with `ELOOP`). Stores written before this named them by blob digest;
//!   those directories are left to the image GC, and what an image needs is unpacked again
//!   under its chain id from the blob (fetched when missing);
//! - `tmp/`: scratch space for unpacking, on the same filesystem so renames are atomic;
//! - `.lock`: held (`flock`) by the process that has the store open.
//!
//! The root and those directories are 0700 (tightened when found looser): unpacked layers hold
//! what images ship — setuid binaries, device nodes — which no unprivileged host user may
//! reach (CVE-2021-41091). Overlayfs reads lower dirs with the mounter's (root's) credentials,
//! so containers are unaffected. A layer's own directories keep the modes the image declares.
//!
//! Opening the store takes its lock; the process that gets it is the only one using the store,
//! so whatever temporary files a crash left (`tmp/layer-*`, `tmp/.layer-*`, `tmp/removing-*`,
//! `blobs/sha256/.partial-*`) belong to nobody and are removed then. A second opener (a
//! second agent on the same data dir) sweeps nothing. Each layer is unpacked within
//! [`LayerLimits`].
//!
//! Invariants: a blob file exists only once its content has been verified against its digest,
//! and a layer directory exists only once it is completely unpacked (both are renamed into
//! place). So "exists" means "complete", and a pull fetches and unpacks only what is missing.
//! Concurrent pulls in one process share the work per layer digest through an async mutex;
//! across processes, the losing rename is detected and its copy discarded.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use tracing::{debug, info, instrument, warn};

use crate::client::RegistryClient;
use crate::layer::LayerLimits;
use crate::oci::{Index, Manifest, ManifestKind};
use crate::{digest, layer, ImageError, Reference, Result};

pub use crate::oci::ImageConfig;

/// How many layers of one image are fetched and unpacked at the same time.
const PARALLEL_LAYERS: usize = 3;
/// Indexes nested deeper than this are refused (guards against reference cycles).
const MAX_INDEX_DEPTH: usize = 4;
/// Mode of the store root and its directories: root only.
const PRIVATE_DIR_MODE: u32 = 0o700;
/// The store's own directories, the root first.
const STORE_DIRS: [&str; 5] = ["", "blobs", "blobs/sha256", "layers", "tmp"];
/// Prefixes of what unpacks, builds and removals leave in `tmp/` when interrupted.
const TMP_LEFTOVERS: [&str; 3] = ["layer-", ".layer-", "removing-"];
/// Prefix of a blob being written in `blobs/sha256/`.
const PARTIAL_BLOB: &str = ".partial-";

/// An image ready to be stacked with overlayfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// Digest of the image manifest (the platform manifest when the tag named an index).
    pub manifest_digest: String,
    /// Digest of the image config.
    pub config_digest: String,
    /// Unpacked layer directories, bottom layer first (overlayfs wants them reversed).
    pub layers: Vec<PathBuf>,
    /// What a container needs from the image config.
    pub config: ImageConfig,
    /// Bytes downloaded by this pull: zero when everything was already local.
    pub bytes_fetched: u64,
}

/// The content store. Cheap to clone; clones share the per-layer locks.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    /// One async mutex per layer digest, so that one process fetches and unpacks a layer once
    /// even when several pulls need it at the same time. Entries are tiny and never removed.
    layer_locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// Pulls hold it shared, garbage collection (`rudder-agent`'s prune) exclusively: a layer
    /// a pull found present is never removed under it.
    gc_lock: Arc<tokio::sync::RwLock<()>>,
    /// How far one layer may expand when unpacked.
    limits: LayerLimits,
    /// `.lock`, flocked while any clone lives, when this process got it.
    _owner: Option<Arc<fs::File>>,
}

impl ImageStore {
    /// Opens (creating if needed) a store rooted at `root`, with the default [`LayerLimits`].
    pub fn open(root: &Path) -> Result<ImageStore> {
        ImageStore::open_with(root, LayerLimits::default())
    }

    /// Opens (creating if needed) a store rooted at `root` whose layers are unpacked within
    /// `limits`. Its directories are made private (0700), and when no other process has the
    /// store open, leftovers of interrupted unpacks and downloads are removed.
    pub fn open_with(root: &Path, limits: LayerLimits) -> Result<ImageStore> {
        for dir in STORE_DIRS {
            private_dir(&root.join(dir))?;
        }
        let owner = take_lock(root)?;
        if owner.is_some() {
            sweep_leftovers(root);
        } else {
            warn!(
                store = %root.display(),
                "another process has the image store open; leaving its temporary files alone"
            );
        }
        Ok(ImageStore {
            root: root.to_path_buf(),
            layer_locks: Arc::default(),
            gc_lock: Arc::default(),
            limits,
            _owner: owner.map(Arc::new),
        })
    }

    /// The limits each layer is unpacked within.
    pub fn layer_limits(&self) -> &LayerLimits {
        &self.limits
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives (whether or not it is there yet).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(digest::hex_of(digest)?))
    }

    /// Whether the blob is in the store.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.is_file())
    }

    /// Where the layer with this chain id is unpacked. An invalid digest maps to a name no
    /// layer can have (it starts with a dot), so a bad digest can never point outside `layers/`.
    pub fn layer_dir(&self, chain_id: &str) -> PathBuf {
        let name = digest::hex_of(chain_id).unwrap_or(".invalid");
        self.root.join("layers").join(name)
    }

    /// Is the layer with this chain id completely unpacked?
    pub fn has_layer(&self, chain_id: &str) -> bool {
        digest::validate(chain_id).is_ok() && self.layer_dir(chain_id).is_dir()
    }

    /// Reads a blob from the store.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        fs::read(&path).map_err(|e| ImageError::io_path("read", &path, e))
    }

    /// A manifest (or index) by tag or digest, with its media type (empty when read locally:
    /// the bytes say it) and digest. A tag is always asked of the registry, since tags move;
    /// content named by digest never changes, so a manifest already here and intact is read
    /// from disk, and starting a task pinned to a digest costs no round trip.
    async fn manifest(
        &self,
        client: &RegistryClient,
        repo: &str,
        reference: &str,
    ) -> Result<(String, Vec<u8>, String)> {
        if digest::validate(reference).is_ok() && self.has_blob(reference) {
            if let Ok(bytes) = self.read_blob(reference) {
                if digest::of_bytes(&bytes) == reference {
                    debug!(digest = reference, "manifest found locally");
                    return Ok((String::new(), bytes, reference.to_string()));
                }
                warn!(
                    digest = reference,
                    "stored manifest does not match its digest; fetching it again"
                );
                if let Ok(path) = self.blob_path(reference) {
                    let _ = fs::remove_file(path);
                }
            }
        }
        client.get_manifest(repo, reference).await
    }

    /// Pulls an image: resolves an index to this platform's manifest, fetches the config and the
    /// layers that are missing, and unpacks each layer once.
    #[instrument(skip(self, client), fields(registry = client.base(), image = %reference))]
    pub async fn pull(
        &self,
        client: &RegistryClient,
        reference: &Reference,
    ) -> Result<PulledImage> {
        let _pulling = self.hold_off_gc().await;
        self.pull_held(client, reference, &_pulling).await
    }

    /// [`ImageStore::pull`] by a caller that already holds GC off (a build, for all its
    /// steps): taking the lock again could wait behind a queued collection forever.
    pub async fn pull_held(
        &self,
        client: &RegistryClient,
        reference: &Reference,
        _held: &tokio::sync::OwnedRwLockReadGuard<()>,
    ) -> Result<PulledImage> {
        let repo = reference.repository.as_str();
        let (mut media_type, mut bytes, mut manifest_digest) = self
            .manifest(client, repo, reference.reference_str())
            .await?;
        let mut depth = 0;
        while ManifestKind::detect(&media_type, &bytes)? == ManifestKind::Index {
            depth += 1;
            if depth > MAX_INDEX_DEPTH {
                return Err(ImageError::invalid(
                    "index",
                    format!("{reference}: indexes nested more than {MAX_INDEX_DEPTH} deep"),
                ));
            }
            let index = Index::parse(&bytes)?;
            let chosen = index.pick_platform().ok_or_else(|| {
                ImageError::invalid("index", format!("{reference}: index lists no manifests"))
            })?;
            debug!(digest = %chosen.digest, platform = ?chosen.platform, "index resolved");
            (media_type, bytes, manifest_digest) =
                self.manifest(client, repo, &chosen.digest).await?;
        }
        let manifest = Manifest::parse(&bytes)?;
        self.write_blob(&manifest_digest, &bytes)?;
        // The manifest's time is when the image was last pulled: a collection spares images
        // pulled within its grace period, whose container may not exist yet.
        let path = self.blob_path(&manifest_digest)?;
        fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()))
            .map_err(|e| ImageError::io_path("touch", &path, e))?;

        let mut bytes_fetched = self
            .ensure_blob(client, repo, &manifest.config.digest)
            .await?;
        let config_bytes = self.read_blob(&manifest.config.digest)?;
        let config = ImageConfig::from_json(&config_bytes)?;
        let diff_ids = crate::oci::diff_ids(&config_bytes)?;
        if diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::invalid(
                "image config",
                format!(
                    "{reference}: its config lists {} diff_ids for {} layers",
                    diff_ids.len(),
                    manifest.layers.len()
                ),
            ));
        }
        let chain_ids = digest::chain_ids(&diff_ids)?;

        // Fetch and unpack a few layers at once; `buffered` keeps the bottom-first order.
        // Owned digests keep the future `Send` (borrowed stream items trip a higher-ranked
        // lifetime limitation of the compiler when the pull is spawned).
        let digests: Vec<(String, String)> = manifest
            .layers
            .iter()
            .zip(chain_ids)
            .map(|(l, chain)| (chain, l.digest.clone()))
            .collect();
        let results: Vec<(PathBuf, u64)> =
            futures::stream::iter(digests)
                .map(|(chain, digest)| async move {
                    self.ensure_layer(client, repo, &chain, &digest).await
                })
                .buffered(PARALLEL_LAYERS)
                .try_collect()
                .await?;
        let mut layers = Vec::with_capacity(results.len());
        for (dir, fetched) in results {
            layers.push(dir);
            bytes_fetched += fetched;
        }
        info!(%manifest_digest, layers = layers.len(), bytes_fetched, "pulled image");
        Ok(PulledImage {
            manifest_digest,
            config_digest: manifest.config.digest.clone(),
            layers,
            config,
            bytes_fetched,
        })
    }

    /// Fetches a blob unless the store has it; returns the bytes downloaded.
    pub async fn ensure_blob(
        &self,
        client: &RegistryClient,
        repo: &str,
        digest: &str,
    ) -> Result<u64> {
        let path = self.blob_path(digest)?;
        if path.is_file() {
            return Ok(0);
        }
        client.get_blob_to_file(repo, digest, &path).await
    }

    /// Makes sure the layer with this chain id is unpacked from the blob `digest`, fetching the
    /// blob if needed. Returns the layer directory and the bytes downloaded. A layer already
    /// unpacked needs no blob at all.
    pub async fn ensure_layer(
        &self,
        client: &RegistryClient,
        repo: &str,
        chain_id: &str,
        digest: &str,
    ) -> Result<(PathBuf, u64)> {
        digest::validate(digest)?;
        digest::validate(chain_id)?;
        let dir = self.layer_dir(chain_id);
        if dir.is_dir() {
            return Ok((dir, 0));
        }
        let lock = self.layer_lock(chain_id);
        let _guard = lock.lock().await;
        if dir.is_dir() {
            // Someone unpacked it while we waited.
            return Ok((dir, 0));
        }
        let fetched = self.ensure_blob(client, repo, digest).await?;
        let dir = self.unpack_layer_locked(chain_id, digest).await?;
        Ok((dir, fetched))
    }

    /// Unpacks the layer with this chain id from its blob `digest`, which is already in the
    /// store (a build step's layer, an import). Returns its directory.
    pub async fn unpack_layer(&self, chain_id: &str, digest: &str) -> Result<PathBuf> {
        digest::validate(digest)?;
        digest::validate(chain_id)?;
        let lock = self.layer_lock(chain_id);
        let _guard = lock.lock().await;
        if self.has_layer(chain_id) {
            return Ok(self.layer_dir(chain_id));
        }
        self.unpack_layer_locked(chain_id, digest).await
    }

    async fn unpack_layer_locked(&self, chain_id: &str, digest: &str) -> Result<PathBuf> {
        let blob = self.blob_path(digest)?;
        let tmp_root = self.root.join("tmp");
        let dest = self.layer_dir(chain_id);
        let digest = digest.to_string();
        let limits = self.limits;
        tokio::task::spawn_blocking(move || {
            unpack_into_place(&blob, &tmp_root, &dest, &digest, &limits)
        })
        .await
        .map_err(ImageError::task)?
    }

    /// Exclusive use of the store for garbage collection: waits for running pulls and holds
    /// new ones back until dropped.
    pub async fn lock_for_gc(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.gc_lock.clone().write_owned().await
    }

    /// Holds garbage collection off while the guard lives, for work that uses blobs or layers
    /// no container records yet (a pull holds it itself; a build can hold it between steps).
    pub async fn hold_off_gc(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.gc_lock.clone().read_owned().await
    }

    /// Removes an unpacked layer (call under [`ImageStore::lock_for_gc`]). It is renamed into
    /// `tmp/` first, so a half-removed layer never looks complete. Returns whether it existed.
    pub fn remove_layer(&self, digest: &str) -> Result<bool> {
        digest::validate(digest)?;
        let dir = self.layer_dir(digest);
        let doomed = self
            .root
            .join("tmp")
            .join(format!("removing-{}", digest::hex_of(digest)?));
        // Left over from a removal that was interrupted.
        let _ = fs::remove_dir_all(&doomed);
        match fs::rename(&dir, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(ImageError::io_path("rename away", &dir, e)),
        }
        fs::remove_dir_all(&doomed).map_err(|e| ImageError::io_path("remove", &doomed, e))?;
        Ok(true)
    }

    fn layer_lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.layer_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(digest.to_string()).or_default().clone()
    }

    /// Stores small content we already hold in memory (a manifest), verified and atomically.
    fn write_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let path = self.blob_path(digest)?;
        if path.is_file() {
            return Ok(());
        }
        let actual = digest::of_bytes(bytes);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: "blob".into(),
                expected: digest.to_string(),
                actual,
            });
        }
        let dir = path.parent().expect("blob path has a parent");
        let mut tmp = tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(dir)
            .map_err(|e| ImageError::io_path("create temporary file in", dir, e))?;
        tmp.write_all(bytes)
            .and_then(|_| tmp.as_file().sync_data())
            .map_err(|e| ImageError::io_path("write", tmp.path(), e))?;
        tmp.persist(&path)
            .map_err(|e| ImageError::io_path("rename into", &path, e.error))?;
        Ok(())
    }
}

/// Creates `path` (and missing parents) 0700, or tightens it to 0700 when it exists with
/// looser bits.
fn private_dir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(path)
        .map_err(|e| ImageError::io_path("create", path, e))?;
    let meta = fs::metadata(path).map_err(|e| ImageError::io_path("stat", path, e))?;
    if meta.permissions().mode() & 0o7777 != PRIVATE_DIR_MODE {
        fs::set_permissions(path, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
            .map_err(|e| ImageError::io_path("chmod", path, e))?;
    }
    Ok(())
}

/// Takes the store's lock without waiting: `None` when another process holds it.
fn take_lock(root: &Path) -> Result<Option<fs::File>> {
    let path = root.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| ImageError::io_path("open", &path, e))?;
    // SAFETY: the descriptor is valid for the lifetime of `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(ImageError::io_path("lock", &path, err))
}

/// Removes what interrupted unpacks, builds, removals and downloads left behind. Call only
/// with the store's lock just taken: nothing of this process is in flight yet. Best effort.
fn sweep_leftovers(root: &Path) {
    let mut removed = 0u64;
    for (dir, prefixes) in [
        (root.join("tmp"), &TMP_LEFTOVERS[..]),
        (root.join("blobs/sha256"), &[PARTIAL_BLOB][..]),
    ] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !prefixes.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            let path = entry.path();
            let gone = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            match gone {
                Ok(()) => removed += 1,
                Err(err) => warn!(%err, path = %path.display(), "could not remove a leftover"),
            }
        }
    }
    if removed > 0 {
        info!(removed, store = %root.display(), "removed leftovers of interrupted unpacks and downloads");
    }
}

/// Unpacks `blob` into a fresh directory under `tmp_root`, then renames it to `dest`. If `dest`
/// appeared meanwhile (another process won), our copy is thrown away.
fn unpack_into_place(
    blob: &Path,
    tmp_root: &Path,
    dest: &Path,
    digest: &str,
    limits: &LayerLimits,
) -> Result<PathBuf> {
    let hex = digest::hex_of(digest)?;
    let started = std::time::Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix(&format!("layer-{}-", &hex[..12]))
        .tempdir_in(tmp_root)
        .map_err(|e| ImageError::io_path("create temporary directory in", tmp_root, e))?;
    // tempdir creates 0700; a layer root without its own "./" entry should be a normal 0755 dir.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
        .map_err(|e| ImageError::io_path("chmod", tmp.path(), e))?;
    layer::unpack_file_limited(blob, tmp.path(), digest, limits).map_err(|e| match e {
        // Name the layer: the entry alone does not say which image to blame.
        ImageError::UnsafeEntry { path, reason } => ImageError::LayerRefused {
            layer: digest.to_string(),
            reason: format!("its entry {path:?} is unsafe: {reason}"),
        },
        e => e,
    })?;
    // Flush the unpacked files before the directory becomes visible as complete.
    sync_filesystem(tmp.path())?;
    match fs::rename(tmp.path(), dest) {
        Ok(()) => {
            let _ = tmp.keep();
            debug!(
                layer = hex,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "unpacked layer"
            );
            Ok(dest.to_path_buf())
        }
        Err(_) if dest.is_dir() => {
            debug!(
                layer = hex,
                "layer unpacked concurrently elsewhere; discarding our copy"
            );
            Ok(dest.to_path_buf())
        }
        Err(e) => Err(ImageError::io_path("rename layer into", dest, e)),
    }
}

fn sync_filesystem(path: &Path) -> Result<()> {
    let dir = fs::File::open(path).map_err(|e| ImageError::io_path("open", path, e))?;
    // SAFETY: the descriptor is valid for the lifetime of `dir`.
    let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
    if rc != 0 {
        return Err(ImageError::io_path(
            "sync filesystem of",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_are_content_addressed_and_safe() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        for dir in ["blobs/sha256", "layers", "tmp"] {
            assert!(tmp.path().join(dir).is_dir());
        }
        let d = digest::of_bytes(b"layer");
        assert_eq!(
            store.layer_dir(&d),
            tmp.path().join("layers").join(digest::hex_of(&d).unwrap())
        );
        assert!(!store.has_layer(&d));
        // A hostile digest never leaves layers/.
        let bad = store.layer_dir("sha256:../../etc");
        assert!(bad.starts_with(tmp.path().join("layers")));
        assert!(!store.has_layer("sha256:../../etc"));
        assert!(store.blob_path("sha256:../../etc").is_err());
    }

    #[tokio::test]
    async fn unpacks_a_local_blob_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(2);
        b.append_data(&mut h, "etc/hostname", &b"x\n"[..]).unwrap();
        let blob = b.into_inner().unwrap();
        let d = digest::of_bytes(&blob);
        store.write_blob(&d, &blob).unwrap();
        assert!(matches!(
            store.write_blob(&digest::of_bytes(b"other"), &blob),
            Err(ImageError::DigestMismatch { .. })
        ));

        let (a, b) = tokio::join!(store.unpack_layer(&d, &d), store.unpack_layer(&d, &d));
        assert_eq!(a.unwrap(), b.unwrap());
        assert!(store.has_layer(&d));
        assert_eq!(
            fs::read(store.layer_dir(&d).join("etc/hostname")).unwrap(),
            b"x\n"
        );
        assert_eq!(
            fs::metadata(store.layer_dir(&d))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);

        // The same blob again on top of itself (a repeated `mkdir -p`): its own directory, so
        // the two can stand in one `lowerdir`.
        let chain = digest::chain_ids(&[d.clone(), d.clone()]).unwrap();
        let second = store.unpack_layer(&chain[1], &d).await.unwrap();
        assert_ne!(second, store.layer_dir(&d));
        assert_eq!(fs::read(second.join("etc/hostname")).unwrap(), b"x\n");
    }

    #[tokio::test]
    async fn removes_a_layer_whole_under_the_gc_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(1);
        b.append_data(&mut h, "a/b/c", &b"x"[..]).unwrap();
        let blob = b.into_inner().unwrap();
        let d = digest::of_bytes(&blob);
        store.write_blob(&d, &blob).unwrap();
        store.unpack_layer(&d, &d).await.unwrap();
        let _gc = store.lock_for_gc().await;
        assert!(store.remove_layer(&d).unwrap());
        assert!(!store.has_layer(&d));
        assert!(!store.remove_layer(&d).unwrap());
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);
        assert!(store.remove_layer("sha256:../../etc").is_err());
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// The audit's `mk_dev_suid_layer.py`: a world-writable block device and a setuid-root
    /// shell. The layer keeps them (images ship /dev entries and setuid binaries), but no
    /// directory above the layer lets an unprivileged host user reach them.
    #[tokio::test]
    async fn h2_store_directories_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("images");
        // A store made by an older agent: everything 0755.
        for dir in ["blobs/sha256", "layers", "tmp"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        for dir in STORE_DIRS {
            fs::set_permissions(root.join(dir), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let store = ImageStore::open(&root).unwrap();
        for dir in STORE_DIRS {
            assert_eq!(mode_of(&root.join(dir)), 0o700, "{dir:?}");
        }
        // A fresh store is created private.
        let fresh = tmp.path().join("fresh/images");
        ImageStore::open(&fresh).unwrap();
        for dir in STORE_DIRS {
            assert_eq!(mode_of(&fresh.join(dir)), 0o700, "{dir:?}");
        }

        let mut b = tar::Builder::new(Vec::new());
        for dir in ["dev", "bin"] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, dir, std::io::empty()).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Block);
        h.set_mode(0o666);
        h.set_size(0);
        h.set_device_major(8).unwrap();
        h.set_device_minor(0).unwrap();
        b.append_data(&mut h, "dev/sda", std::io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o4755);
        h.set_size(2);
        b.append_data(&mut h, "bin/rootsh", &b"#!"[..]).unwrap();
        let blob = b.into_inner().unwrap();
        let d = digest::of_bytes(&blob);
        store.write_blob(&d, &blob).unwrap();
        let layer = store.unpack_layer(&d, &d).await.unwrap();
        assert_eq!(mode_of(&layer.join("bin/rootsh")), 0o4755);
        // Every directory from the store root down to the layer is root's alone.
        let mut p = layer.parent().unwrap();
        while p.starts_with(&root) {
            assert_eq!(
                mode_of(p) & 0o077,
                0,
                "{} is reachable by others",
                p.display()
            );
            p = p.parent().unwrap();
        }
    }

    /// Leftovers of a crash are swept when the store is opened, by the process that holds it
    /// alone; a second opener leaves them.
    #[test]
    fn l11_open_sweeps_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        ImageStore::open(root).unwrap();
        let leftovers = [
            root.join("tmp/layer-0123456789ab-XyZ"),
            root.join("tmp/removing-0123"),
            root.join("tmp/.layer-abc"),
        ];
        for dir in &leftovers {
            fs::create_dir_all(dir.join("usr/bin")).unwrap();
            fs::write(dir.join("usr/bin/x"), b"x").unwrap();
        }
        let partial = root.join("blobs/sha256/.partial-AbC");
        fs::write(&partial, b"half a blob").unwrap();
        let blob = digest::of_bytes(b"whole");
        let kept = root
            .join("blobs/sha256")
            .join(digest::hex_of(&blob).unwrap());
        fs::write(&kept, b"whole").unwrap();

        let first = ImageStore::open(root).unwrap();
        for dir in &leftovers {
            assert!(!dir.exists(), "{} was not swept", dir.display());
        }
        assert!(!partial.exists());
        assert!(kept.is_file(), "a complete blob was swept");
        assert!(first.has_blob(&blob));

        // While the first store lives, another opener sweeps nothing.
        fs::write(&partial, b"in flight").unwrap();
        let _second = ImageStore::open(root).unwrap();
        assert!(
            partial.exists(),
            "a second opener swept the first one's download"
        );
        drop(first);
        drop(_second);
        ImageStore::open(root).unwrap();
        assert!(!partial.exists());
    }

    /// A layer that expands past the store's limit is refused by digest, and nothing of it
    /// stays in `tmp/` or `layers/`.
    #[tokio::test]
    async fn m5_store_refuses_a_layer_over_its_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = LayerLimits {
            max_bytes: 64 << 10,
            min_free: 0,
        };
        let store = ImageStore::open_with(tmp.path(), limits).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(128 << 10);
        b.append_data(&mut h, "zeros", &vec![0u8; 128 << 10][..])
            .unwrap();
        let blob = b.into_inner().unwrap();
        let d = digest::of_bytes(&blob);
        store.write_blob(&d, &blob).unwrap();
        let err = store.unpack_layer(&d, &d).await.unwrap_err();
        assert!(matches!(err, ImageError::LayerRefused { .. }), "{err}");
        assert!(err.to_string().contains(&d), "{err}");
        assert!(!store.has_layer(&d));
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);
    }
}

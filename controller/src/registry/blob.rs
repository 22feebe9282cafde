//! Content-addressed blob storage on local disk, and the resumable uploads that fill it.
//!
//! Layout under the root directory:
//! - `blobs/sha256/<hex>`: finished blobs (layers, configs and manifests alike);
//! - `uploads/<id>`: an upload in progress, `<id>` being 32 random lowercase hex digits;
//! - `uploads/tmp-<random>`: scratch files of [`BlobStore::put_bytes`] and
//!   [`BlobStore::put_stream`].
//!
//! Invariants:
//! - a file under `blobs/sha256/` always holds exactly the bytes whose sha256 is its name: it
//!   appears only by an atomic rename, after its hash was checked and its data synced to disk;
//! - an upload's bytes are appended strictly in order; a chunk that fails midway (broken body,
//!   wrong length) is rolled back, so the upload stays at its previous size;
//! - the sha256 of an upload is computed while it is written and kept in memory beside its
//!   size; after a restart an upload found on disk is re-hashed before use;
//! - appends, finishing and cancelling one upload are serialized by a per-upload lock; once
//!   finished or cancelled an upload is unknown.
//!
//! Limits ([`UploadLimits`]): one blob is at most `max_blob_bytes`; no write may leave less than
//! `min_free_bytes` free on the store's filesystem; at most `max_open_uploads` uploads are open
//! at once; an upload not written to for `stale_after` is deleted by a purger that runs every
//! `purge_every` for as long as the store lives (started by [`BlobStore::open`] inside a tokio
//! runtime, else by the first upload).
//!
//! Blobs are global, not per repository: any repository can read a blob that any other
//! repository uploaded (which makes cross-repository mounts free).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};

use super::names::Digest;
use super::RegistryError;

/// Buffer between the request body and the upload file: big enough to batch hyper's small
/// frames into few blocking-pool writes.
const WRITE_BUFFER: usize = 1 << 20;

/// Free space is re-checked after this many bytes of one write.
const FREE_CHECK_EVERY: u64 = 64 << 20;

/// What a blob store accepts: sizes, disk use and open uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    /// Largest blob accepted (an upload, or one fetched from a peer).
    pub max_blob_bytes: u64,
    /// Writes are refused when they would leave less than this free on the filesystem.
    pub min_free_bytes: u64,
    /// Uploads open at once (started, neither finished, cancelled nor purged).
    pub max_open_uploads: usize,
    /// An upload not written to for this long is deleted.
    pub stale_after: Duration,
    /// How often stale uploads are looked for.
    pub purge_every: Duration,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_blob_bytes: 10 << 30,
            min_free_bytes: 512 << 20,
            max_open_uploads: 256,
            stale_after: Duration::from_secs(3600),
            purge_every: Duration::from_secs(600),
        }
    }
}

/// Content-addressed blob files plus in-progress uploads under one root directory. Cheap to
/// clone; clones share state.
#[derive(Clone, Debug)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// Uploads this process has touched, by id.
    uploads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Upload>>>>,
    limits: UploadLimits,
    /// The stale-upload purger was started.
    purger: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Upload {
    /// The repository the upload was started in; `None` after recovery from disk.
    repo: Option<String>,
    /// Bytes written so far; the next chunk must start here.
    size: u64,
    /// Running sha256 of those bytes.
    hasher: Sha256,
    /// Set by finish/cancel, so that a request already waiting on the lock sees it is gone.
    done: bool,
}

impl BlobStore {
    /// Opens (creating if needed) a blob store rooted at `root`, with the default limits.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, RegistryError> {
        Self::open_with(root, UploadLimits::default())
    }

    /// Opens (creating if needed) a blob store rooted at `root`, with `limits`.
    pub fn open_with(
        root: impl Into<PathBuf>,
        limits: UploadLimits,
    ) -> Result<Self, RegistryError> {
        let root = root.into();
        // Private like the rest of the controller's data (0700; files 0600): blobs of
        // private images must not be readable by other local users.
        for dir in [
            root.clone(),
            root.join("blobs"),
            root.join("blobs").join("sha256"),
        ] {
            crate::storage::private_dir(&dir)
                .map_err(RegistryError::io("create blob directory"))?;
        }
        crate::storage::private_dir(&root.join("uploads"))
            .map_err(RegistryError::io("create upload directory"))?;
        let store = Self {
            inner: Arc::new(Inner {
                root,
                uploads: Mutex::new(HashMap::new()),
                limits,
                purger: Default::default(),
            }),
        };
        store.start_purger();
        Ok(store)
    }

    /// The upload limits in force.
    pub fn limits(&self) -> &UploadLimits {
        &self.inner.limits
    }

    /// Starts the stale-upload purger once, if a tokio runtime is at hand. It ends when the
    /// last clone of the store is dropped.
    fn start_purger(&self) {
        use std::sync::atomic::Ordering;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.purger.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let every = self.inner.limits.purge_every;
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let store = BlobStore { inner };
                let max_age = store.inner.limits.stale_after;
                match store.purge_stale_uploads(SystemTime::now(), max_age).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(uploads = n, "registry: purged stale uploads"),
                    Err(err) => tracing::warn!(%err, "registry: purging stale uploads"),
                }
            }
        });
    }

    /// Refuses to write `more` bytes (0: any write) when that would leave less than the floor
    /// free on the store's filesystem.
    fn check_free(&self, more: u64) -> Result<(), RegistryError> {
        check_free(&self.inner.root, self.inner.limits.min_free_bytes, more)
    }

    /// The blob store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner
            .root
            .join("blobs")
            .join("sha256")
            .join(digest.hex())
    }

    fn upload_path(&self, id: &str) -> PathBuf {
        self.inner.root.join("uploads").join(id)
    }

    /// The size of a blob, or `None` if it is absent.
    pub async fn stat(&self, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        match tokio::fs::metadata(self.blob_path(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RegistryError::io("stat blob")(e)),
        }
    }

    /// Opens a blob for streaming, with its size.
    pub async fn open_blob(
        &self,
        digest: &Digest,
    ) -> Result<Option<(tokio::fs::File, u64)>, RegistryError> {
        let file = match tokio::fs::File::open(self.blob_path(digest)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RegistryError::io("open blob")(e)),
        };
        let len = file
            .metadata()
            .await
            .map_err(RegistryError::io("stat blob"))?
            .len();
        Ok(Some((file, len)))
    }

    /// Reads a small blob (a manifest) whole; refuses blobs larger than `limit`.
    pub async fn read(&self, digest: &Digest, limit: u64) -> Result<Option<Bytes>, RegistryError> {
        let Some((file, len)) = self.open_blob(digest).await? else {
            return Ok(None);
        };
        if len > limit {
            return Err(RegistryError::TooLarge(format!("{digest} is {len} bytes")));
        }
        let mut buf = Vec::with_capacity(len as usize);
        file.take(limit + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(RegistryError::io("read blob"))?;
        Ok(Some(buf.into()))
    }

    /// Stores `bytes` as a blob and returns its digest. Idempotent.
    pub async fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, RegistryError> {
        let digest = Digest::of(bytes);
        if self.stat(&digest).await?.is_some() {
            return Ok(digest);
        }
        self.check_free(bytes.len() as u64)?;
        let tmp = self.upload_path(&format!("tmp-{}", random_id()));
        let result = async {
            let mut f = create_private(&tmp)
                .await
                .map_err(RegistryError::io("create blob file"))?;
            f.write_all(bytes)
                .await
                .map_err(RegistryError::io("write blob"))?;
            f.sync_all().await.map_err(RegistryError::io("sync blob"))?;
            self.commit(&tmp, &digest).await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result.map(|()| digest)
    }

    /// Stores a blob streamed from `body` (e.g. fetched from a peer registry) if its content
    /// hashes to `expected`; `len`, when known, must be exactly what the body delivers. The
    /// bytes go to a scratch file while they are hashed; on a mismatch or a broken body the
    /// scratch file is removed and nothing is stored. Idempotent. Returns the blob's size.
    pub async fn put_stream<S, E>(
        &self,
        expected: &Digest,
        len: Option<u64>,
        body: S,
    ) -> Result<u64, RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp = self.upload_path(&format!("tmp-{}", random_id()));
        create_private(&tmp)
            .await
            .map_err(RegistryError::io("create blob file"))?;
        let result = async {
            let mut hasher = Sha256::new();
            let size = write_chunk(self, &tmp, 0, len, body, &mut hasher).await?;
            let actual = Digest::from_hasher(hasher);
            if &actual != expected {
                return Err(RegistryError::DigestMismatch {
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
            self.commit_upload(&tmp, expected).await?;
            Ok(size)
        }
        .await;
        // Committed (renamed away), refused, or the blob was already there: the scratch file
        // is no longer needed either way.
        match tokio::fs::remove_file(&tmp).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(%err, "removing a scratch blob file"),
        }
        result
    }

    /// Atomically moves a synced file into place as the blob `digest`.
    async fn commit(&self, from: &Path, digest: &Digest) -> Result<(), RegistryError> {
        let to = self.blob_path(digest);
        tokio::fs::rename(from, &to)
            .await
            .map_err(RegistryError::io("move blob into place"))?;
        let dir = to.parent().map(Path::to_path_buf).unwrap_or_default();
        tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
            .await
            .map_err(|e| RegistryError::io("sync blob directory")(std::io::Error::other(e)))?
            .map_err(RegistryError::io("sync blob directory"))
    }

    /// Marks a blob as just used (its mtime becomes now), so a collection's grace period
    /// counts from now. Best effort: a blob that cannot be touched is only logged.
    pub async fn touch(&self, digest: &Digest) {
        let path = self.blob_path(digest);
        let r = tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_modified(SystemTime::now())
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::debug!(%digest, %err, "touching a blob"),
            Err(err) => tracing::debug!(%digest, %err, "touching a blob"),
        }
    }

    /// Whether a blob was written or touched less than `grace` ago (false when absent).
    pub async fn touched_within(&self, digest: &Digest, grace: Duration) -> bool {
        match tokio::fs::metadata(self.blob_path(digest)).await {
            Ok(meta) => {
                let at = super::gc::last_written(&meta);
                SystemTime::now().duration_since(at).unwrap_or_default() < grace
            }
            Err(_) => false,
        }
    }

    /// Removes a blob. Returns whether it existed.
    pub async fn delete(&self, digest: &Digest) -> Result<bool, RegistryError> {
        match tokio::fs::remove_file(self.blob_path(digest)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(RegistryError::io("delete blob")(e)),
        }
    }

    /// Starts an empty upload for `repo`; returns its id.
    pub async fn start_upload(&self, repo: &str) -> Result<String, RegistryError> {
        self.start_purger();
        self.check_free(0)?;
        let id = random_id();
        let upload = Upload {
            repo: Some(repo.to_owned()),
            size: 0,
            hasher: Sha256::new(),
            done: false,
        };
        {
            // Counted and reserved under one lock, so concurrent starts cannot overshoot.
            let mut uploads = self.uploads();
            let max = self.inner.limits.max_open_uploads;
            if uploads.len() >= max {
                return Err(RegistryError::TooManyUploads(format!(
                    "{} uploads are open and the limit is {max}; finish or cancel one, or retry \
                     later",
                    uploads.len()
                )));
            }
            uploads.insert(id.clone(), Arc::new(tokio::sync::Mutex::new(upload)));
        }
        if let Err(e) = create_private(self.upload_path(&id)).await {
            self.uploads().remove(&id);
            return Err(RegistryError::io("create upload")(e));
        }
        Ok(id)
    }

    fn uploads(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<Upload>>>> {
        self.inner.uploads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finds an upload of `repo`, recovering it from disk if this process has not seen it.
    async fn upload(
        &self,
        repo: &str,
        id: &str,
    ) -> Result<Arc<tokio::sync::Mutex<Upload>>, RegistryError> {
        let unknown = || RegistryError::UploadUnknown(id.to_owned());
        if !valid_upload_id(id) {
            return Err(unknown());
        }
        let known = self.uploads().get(id).cloned();
        let upload = match known {
            Some(u) => u,
            None => {
                let (size, hasher) = match hash_file(&self.upload_path(id)).await {
                    Ok(found) => found,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(unknown()),
                    Err(e) => return Err(RegistryError::io("recover upload")(e)),
                };
                tracing::debug!(id, size, "recovered upload from disk");
                let recovered = Upload {
                    repo: None,
                    size,
                    hasher,
                    done: false,
                };
                self.uploads()
                    .entry(id.to_owned())
                    .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(recovered)))
                    .clone()
            }
        };
        let same_repo = upload
            .lock()
            .await
            .repo
            .as_deref()
            .is_none_or(|r| r == repo);
        if same_repo {
            Ok(upload)
        } else {
            Err(unknown())
        }
    }

    /// How many bytes an upload holds.
    pub async fn upload_size(&self, repo: &str, id: &str) -> Result<u64, RegistryError> {
        let upload = self.upload(repo, id).await?;
        let u = upload.lock().await;
        if u.done {
            return Err(RegistryError::UploadUnknown(id.to_owned()));
        }
        Ok(u.size)
    }

    /// Appends a chunk streamed from `body` to an upload and returns the upload's new size.
    ///
    /// `start`, when the client sent a Content-Range, must equal the current size; `len`, when
    /// known, must equal the number of bytes the body delivers. `location` is echoed in a
    /// range error so the client can resume. On any error the chunk is rolled back.
    pub async fn append<S, E>(
        &self,
        repo: &str,
        id: &str,
        start: Option<u64>,
        len: Option<u64>,
        location: &str,
        body: S,
    ) -> Result<u64, RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let upload = self.upload(repo, id).await?;
        let mut u = upload.lock().await;
        if u.done {
            return Err(RegistryError::UploadUnknown(id.to_owned()));
        }
        if let Some(start) = start {
            if start != u.size {
                return Err(RegistryError::RangeInvalid {
                    start,
                    size: u.size,
                    location: location.to_owned(),
                });
            }
        }
        let path = self.upload_path(id);
        let mut hasher = u.hasher.clone();
        let before = u.size;
        match write_chunk(self, &path, before, len, body, &mut hasher).await {
            Ok(written) => {
                u.size = before + written;
                u.hasher = hasher;
                Ok(u.size)
            }
            Err(e) => {
                // Roll back to the last good size; the kept hasher still matches it.
                if let Ok(f) = tokio::fs::OpenOptions::new().write(true).open(&path).await {
                    if let Err(err) = f.set_len(before).await {
                        tracing::warn!(id, %err, "rolling back a failed chunk");
                    }
                }
                Err(e)
            }
        }
    }

    /// Finishes an upload: checks that its content hashes to `expected`, then moves it into
    /// place as a blob. On a mismatch the upload is discarded and nothing is stored.
    /// Returns the blob's size.
    pub async fn finish(
        &self,
        repo: &str,
        id: &str,
        expected: &Digest,
    ) -> Result<u64, RegistryError> {
        let upload = self.upload(repo, id).await?;
        let mut u = upload.lock().await;
        if u.done {
            return Err(RegistryError::UploadUnknown(id.to_owned()));
        }
        let actual = Digest::from_hasher(u.hasher.clone());
        let path = self.upload_path(id);
        let result = if &actual != expected {
            Err(RegistryError::DigestMismatch {
                expected: expected.to_string(),
                actual: actual.to_string(),
            })
        } else {
            self.commit_upload(&path, expected).await.map(|()| u.size)
        };
        // Finished, refused or failed to commit: the upload is over either way.
        u.done = true;
        drop(u);
        self.uploads().remove(id);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(id, %err, "removing a finished upload"),
        }
        result
    }

    /// Syncs a verified upload file and moves it into place, unless the blob already exists
    /// (content-addressed, so it is identical).
    async fn commit_upload(&self, path: &Path, digest: &Digest) -> Result<(), RegistryError> {
        if self.stat(digest).await?.is_some() {
            // Uploaded again: as fresh as if it were new, for a collection's grace period.
            self.touch(digest).await;
            return Ok(());
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(RegistryError::io("open upload"))?;
        file.sync_all()
            .await
            .map_err(RegistryError::io("sync upload"))?;
        self.commit(path, digest).await
    }

    /// Cancels an upload and deletes its data. Returns whether it existed.
    pub async fn cancel(&self, repo: &str, id: &str) -> Result<bool, RegistryError> {
        let upload = match self.upload(repo, id).await {
            Ok(u) => u,
            Err(RegistryError::UploadUnknown(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut u = upload.lock().await;
        if u.done {
            return Ok(false);
        }
        u.done = true;
        self.uploads().remove(id);
        match tokio::fs::remove_file(self.upload_path(id)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(RegistryError::io("delete upload")(e)),
        }
    }

    /// Deletes uploads (and scratch files) last written more than `max_age` before `now`.
    /// Returns how many were removed. Meant to run periodically.
    pub async fn purge_stale_uploads(
        &self,
        now: SystemTime,
        max_age: Duration,
    ) -> Result<usize, RegistryError> {
        let dir = self.inner.root.join("uploads");
        let mut entries = tokio::fs::read_dir(&dir)
            .await
            .map_err(RegistryError::io("list uploads"))?;
        let mut removed = 0;
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(RegistryError::io("list uploads"))?
        {
            let Ok(meta) = entry.metadata().await else {
                continue;
            };
            let Ok(modified) = meta.modified() else {
                continue;
            };
            if now.duration_since(modified).unwrap_or_default() <= max_age {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let lock = self.uploads().remove(&name);
            if let Some(lock) = lock {
                lock.lock().await.done = true;
            }
            if tokio::fs::remove_file(entry.path()).await.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Bytes available to this process on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Result<u64, RegistryError> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| RegistryError::io("check free disk space")(e.into()))?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Refuses when writing `more` bytes under `root` would leave less than `floor` free.
fn check_free(root: &Path, floor: u64, more: u64) -> Result<(), RegistryError> {
    let free = free_bytes(root)?;
    if free.saturating_sub(more) < floor {
        return Err(RegistryError::DiskFull(format!(
            "{free} bytes free, and the registry keeps at least {floor} free (writing {more} \
             more was refused)"
        )));
    }
    Ok(())
}

/// Writes `body` at offset `at` of `path`, feeding `hasher`; returns the bytes written. Refuses
/// (before reading when `len` says so, else as soon as it happens) to make the file larger
/// than the store's blob limit or to leave its disk below the free-space floor.
async fn write_chunk<S, E>(
    store: &BlobStore,
    path: &Path,
    at: u64,
    len: Option<u64>,
    mut body: S,
    hasher: &mut Sha256,
) -> Result<u64, RegistryError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let max = store.inner.limits.max_blob_bytes;
    let too_large = || {
        RegistryError::TooLarge(format!(
            "a blob is limited to {max} bytes (this one would exceed it)"
        ))
    };
    if len.is_some_and(|len| at.saturating_add(len) > max) {
        return Err(too_large());
    }
    store.check_free(len.unwrap_or(0))?;
    let mut checked_free_at = 0u64;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .await
        .map_err(RegistryError::io("open upload"))?;
    file.seek(std::io::SeekFrom::Start(at))
        .await
        .map_err(RegistryError::io("seek upload"))?;
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut written: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| RegistryError::Body(e.to_string()))?;
        written += chunk.len() as u64;
        if len.is_some_and(|len| written > len) {
            break;
        }
        if at + written > max {
            return Err(too_large());
        }
        if len.is_none() && written - checked_free_at >= FREE_CHECK_EVERY {
            store.check_free(0)?;
            checked_free_at = written;
        }
        hasher.update(&chunk);
        out.write_all(&chunk)
            .await
            .map_err(RegistryError::io("write upload"))?;
    }
    if let Some(len) = len {
        if written != len {
            return Err(RegistryError::SizeInvalid(format!(
                "chunk declared {len} bytes but the body {} them",
                if written > len {
                    "exceeded"
                } else {
                    "fell short of"
                }
            )));
        }
    }
    out.flush()
        .await
        .map_err(RegistryError::io("write upload"))?;
    Ok(written)
}

/// Re-hashes an upload file found on disk.
async fn hash_file(path: &Path) -> std::io::Result<(u64, Sha256)> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok((size, hasher));
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
}

/// Creates a new file 0600 (blobs and uploads are as private as the rest of the data dir).
async fn create_private(path: impl AsRef<Path>) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(crate::storage::PRIVATE_FILE_MODE)
        .open(path)
        .await
}

fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn valid_upload_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn chunks_hash_and_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let id = store.start_upload("r").await.unwrap();
        assert_eq!(
            store
                .append("r", &id, Some(0), None, "", body(&[b"hel", b"lo"]))
                .await
                .unwrap(),
            5
        );
        // Wrong start is refused and changes nothing.
        let err = store
            .append("r", &id, Some(3), None, "", body(&[b"x"]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::RangeInvalid { size: 5, .. }),
            "{err}"
        );
        // Short body is rolled back.
        let err = store
            .append("r", &id, None, Some(10), "", body(&[b" wor"]))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::SizeInvalid(_)), "{err}");
        assert_eq!(store.upload_size("r", &id).await.unwrap(), 5);
        // Another repository cannot see it.
        assert!(store.upload_size("other", &id).await.is_err());
        store
            .append("r", &id, None, Some(6), "", body(&[b" world"]))
            .await
            .unwrap();
        let digest = Digest::of(b"hello world");
        assert_eq!(store.finish("r", &id, &digest).await.unwrap(), 11);
        assert_eq!(
            std::fs::read(store.blob_path(&digest)).unwrap(),
            b"hello world"
        );
        assert!(store.upload_size("r", &id).await.is_err());
        assert!(std::fs::read_dir(dir.path().join("uploads"))
            .unwrap()
            .next()
            .is_none());
    }

    #[tokio::test]
    async fn recovers_upload_after_restart_and_refuses_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let store = BlobStore::open(dir.path()).unwrap();
            let id = store.start_upload("r").await.unwrap();
            store
                .append("r", &id, None, None, "", body(&[b"abc"]))
                .await
                .unwrap();
            id
        };
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(store.upload_size("r", &id).await.unwrap(), 3);
        let wrong = Digest::of(b"abd");
        let err = store.finish("r", &id, &wrong).await.unwrap_err();
        assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
        assert_eq!(store.stat(&wrong).await.unwrap(), None);
        assert_eq!(store.stat(&Digest::of(b"abc")).await.unwrap(), None);
        assert!(matches!(
            store.upload_size("r", &id).await,
            Err(RegistryError::UploadUnknown(_))
        ));
    }

    #[tokio::test]
    async fn put_stream_checks_digest_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = Digest::of(b"hello world");
        // Wrong content, short body, broken body: nothing stored, no scratch file left.
        let wrong = store
            .put_stream(&digest, None, body(&[b"hello there"]))
            .await;
        assert!(
            matches!(wrong, Err(RegistryError::DigestMismatch { .. })),
            "{wrong:?}"
        );
        let short = store
            .put_stream(&digest, Some(20), body(&[b"hello world"]))
            .await;
        assert!(
            matches!(short, Err(RegistryError::SizeInvalid(_))),
            "{short:?}"
        );
        let broken = futures::stream::iter(vec![Ok(Bytes::from_static(b"hello")), Err("reset")]);
        let broken = store.put_stream(&digest, None, broken).await;
        assert!(matches!(broken, Err(RegistryError::Body(_))), "{broken:?}");
        assert_eq!(store.stat(&digest).await.unwrap(), None);
        assert!(std::fs::read_dir(dir.path().join("uploads"))
            .unwrap()
            .next()
            .is_none());

        for _ in 0..2 {
            let stored = store
                .put_stream(&digest, Some(11), body(&[b"hello", b" world"]))
                .await
                .unwrap();
            assert_eq!(stored, 11);
        }
        assert_eq!(
            std::fs::read(store.blob_path(&digest)).unwrap(),
            b"hello world"
        );
        assert!(std::fs::read_dir(dir.path().join("uploads"))
            .unwrap()
            .next()
            .is_none());
    }

    #[tokio::test]
    async fn put_bytes_delete_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = store.put_bytes(b"{}").await.unwrap();
        assert_eq!(d, store.put_bytes(b"{}").await.unwrap());
        assert_eq!(store.read(&d, 100).await.unwrap().unwrap(), &b"{}"[..]);
        assert!(matches!(
            store.read(&d, 1).await,
            Err(RegistryError::TooLarge(_))
        ));
        assert!(store.delete(&d).await.unwrap());
        assert!(!store.delete(&d).await.unwrap());
        let id = store.start_upload("r").await.unwrap();
        let now = SystemTime::now();
        assert_eq!(
            store
                .purge_stale_uploads(now, Duration::from_secs(60))
                .await
                .unwrap(),
            0
        );
        let later = now + Duration::from_secs(120);
        assert_eq!(
            store
                .purge_stale_uploads(later, Duration::from_secs(60))
                .await
                .unwrap(),
            1
        );
        assert!(store.upload_size("r", &id).await.is_err());
        assert!(!valid_upload_id("../../etc/passwd0000000000000000"));
    }
}

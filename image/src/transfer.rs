//! Copying an image from one registry (or repository) to another: what `rctl image tag`, `push`
//! and `pull` do. The manifest is fetched from the source, each blob it references is sent
//! only if the destination lacks it (HEAD first; within one registry a cross-repository mount
//! instead of a copy), and the manifest's exact bytes are PUT last, so its digest is the same
//! on both sides and a tag never points at an image whose blobs are missing.
//!
//! An index (multi-platform image) is either copied whole (every platform's manifest and blobs,
//! then the index; `rctl image push`) or narrowed to this host's `linux/<arch>` manifest
//! ([`CopyOptions::pick_platform`]; `rctl image pull`, since agents only run that one).
//!
//! Blob bytes stream straight from the source's response into the destination's upload body:
//! nothing is held in memory beyond a network buffer, nothing touches the disk. The stream is
//! hashed on the way and ends in an error if the bytes do not match their digest, so a
//! corrupt source cannot make the destination store a blob under the wrong name (the
//! destination registry checks too).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tracing::{debug, info, instrument};

use crate::oci::{self, Descriptor, Index, Manifest, ManifestKind, OCI_MANIFEST};
use crate::{digest, ImageError, Reference, RegistryClient};

/// How [`copy_image`] treats an index.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyOptions {
    /// Copy only the `linux/<this host's architecture>` manifest of an index, and tag that
    /// manifest (instead of the whole index).
    pub pick_platform: bool,
}

/// What [`copy_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReport {
    /// Digest of the manifest (or index) the destination tag now points at.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Blob bytes sent to the destination (manifests not counted).
    pub bytes: u64,
    /// Blobs sent.
    pub blobs_moved: usize,
    /// Blobs the destination already had (including those mounted from another repository).
    pub blobs_skipped: usize,
}

/// Why a copy failed, and on which side: callers word "not found" differently for the
/// source ("no such image") and the destination.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Reading from the source registry failed (a missing manifest is
    /// [`ImageError::is_not_found`]).
    #[error("{0}")]
    Source(#[source] ImageError),
    /// Writing to (or asking) the destination registry failed.
    #[error("{0}")]
    Destination(#[source] ImageError),
    /// The source's index has no manifest for this host's platform.
    #[error("image: {reference}: no linux/{arch} image in its index (it has: {available})")]
    NoPlatform {
        /// The reference as given.
        reference: String,
        /// This host's architecture (GOARCH).
        arch: String,
        /// The platforms the index has.
        available: String,
    },
    /// The destination reference cannot be written to (a digest instead of a tag).
    #[error("image: {reference}: {reason}")]
    BadDestination {
        /// The reference as given.
        reference: String,
        /// Why.
        reason: String,
    },
}

impl TransferError {
    /// The underlying image error, whichever side it came from.
    pub fn image_error(&self) -> Option<&ImageError> {
        match self {
            TransferError::Source(e) | TransferError::Destination(e) => Some(e),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, TransferError>;

/// Copies `src_ref` (tag or digest) from `src` to `dst` under `dst_ref`'s repository and tag.
/// The registry hosts named in the references are ignored: the clients say where to go.
#[instrument(skip(src, dst), fields(src = %src.base(), dst = %dst.base(), from = %src_ref.short(), to = %dst_ref.short()))]
pub async fn copy_image(
    src: &RegistryClient,
    src_ref: &Reference,
    dst: &RegistryClient,
    dst_ref: &Reference,
    options: CopyOptions,
) -> Result<TransferReport> {
    let tag = match (&dst_ref.tag, &dst_ref.digest) {
        (Some(tag), None) => tag.clone(),
        _ => {
            return Err(TransferError::BadDestination {
                reference: dst_ref.to_string(),
                reason: "the destination needs a tag, not a digest".into(),
            })
        }
    };
    let src_repo = src_ref.repository.as_str();
    let dst_repo = dst_ref.repository.as_str();
    let (media_type, bytes, digest) = src
        .get_manifest(src_repo, src_ref.reference_str())
        .await
        .map_err(TransferError::Source)?;
    let kind = ManifestKind::detect(&media_type, &bytes).map_err(TransferError::Source)?;
    let mut copy = Copy {
        src,
        dst,
        src_repo,
        dst_repo,
        report: TransferReport {
            digest: String::new(),
            media_type: String::new(),
            bytes: 0,
            blobs_moved: 0,
            blobs_skipped: 0,
        },
        seen: HashSet::new(),
    };
    let (media_type, bytes, digest) = match kind {
        ManifestKind::Index if options.pick_platform => {
            let picked = copy.pick(&bytes, 0).await?.ok_or_else(|| {
                let available = Index::parse(&bytes)
                    .map(|i| platforms(&i))
                    .unwrap_or_default();
                TransferError::NoPlatform {
                    reference: src_ref.to_string(),
                    arch: oci::host_architecture().to_string(),
                    available,
                }
            })?;
            copy.manifest_blobs(&picked.1).await?;
            picked
        }
        _ => {
            copy.whole(kind, &bytes, 0).await?;
            (media_type, bytes, digest)
        }
    };
    let media_type = manifest_type(&media_type, &bytes);
    let pushed = dst
        .push_manifest(dst_repo, &tag, &media_type, bytes)
        .await
        .map_err(TransferError::Destination)?;
    debug_assert_eq!(pushed, digest);
    let mut report = copy.report;
    report.digest = digest;
    report.media_type = media_type;
    info!(
        digest = %report.digest,
        bytes = report.bytes,
        moved = report.blobs_moved,
        skipped = report.blobs_skipped,
        "copied image"
    );
    Ok(report)
}

/// One copy in progress.
struct Copy<'a> {
    src: &'a RegistryClient,
    dst: &'a RegistryClient,
    src_repo: &'a str,
    dst_repo: &'a str,
    report: TransferReport,
    /// Blobs already handled (platforms of an index share layers).
    seen: HashSet<String>,
}

/// Indexes nest (an OCI layout's index may point at an index); deeper than this is refused.
const MAX_INDEX_DEPTH: usize = 4;

impl Copy<'_> {
    /// Copies everything a manifest or index references: a manifest's blobs; an index's
    /// manifests (and nested indexes), each PUT by digest once its own content is there.
    async fn whole(&mut self, kind: ManifestKind, bytes: &[u8], depth: usize) -> Result<()> {
        if kind == ManifestKind::Manifest {
            return self.manifest_blobs(bytes).await;
        }
        if depth >= MAX_INDEX_DEPTH {
            return Err(TransferError::Source(ImageError::invalid(
                "index",
                format!("indexes nested deeper than {MAX_INDEX_DEPTH}"),
            )));
        }
        let index = Index::parse(bytes).map_err(TransferError::Source)?;
        for entry in &index.manifests {
            if !self.seen.insert(entry.digest.clone()) {
                continue;
            }
            let (mt, child, child_digest) = self
                .src
                .get_manifest(self.src_repo, &entry.digest)
                .await
                .map_err(TransferError::Source)?;
            let child_kind = ManifestKind::detect(&mt, &child).map_err(TransferError::Source)?;
            Box::pin(self.whole(child_kind, &child, depth + 1)).await?;
            let mt = manifest_type(&mt, &child);
            self.dst
                .push_manifest(self.dst_repo, &child_digest, &mt, child)
                .await
                .map_err(TransferError::Destination)?;
        }
        Ok(())
    }

    /// This host's `linux/<arch>` manifest in an index, looking into nested indexes:
    /// (media type, bytes, digest), or `None` when there is none.
    async fn pick(
        &mut self,
        index: &[u8],
        depth: usize,
    ) -> Result<Option<(String, Vec<u8>, String)>> {
        if depth >= MAX_INDEX_DEPTH {
            return Ok(None);
        }
        let index = Index::parse(index).map_err(TransferError::Source)?;
        let mut candidates: Vec<&Descriptor> = pick_linux(&index).into_iter().collect();
        // Entries that may be indexes themselves: by media type, or unlabelled.
        candidates.extend(index.manifests.iter().filter(|d| {
            d.platform.is_none()
                && (d.media_type == oci::OCI_INDEX
                    || d.media_type == oci::DOCKER_MANIFEST_LIST
                    || d.media_type.is_empty())
        }));
        for entry in candidates {
            let (mt, child, child_digest) = self
                .src
                .get_manifest(self.src_repo, &entry.digest)
                .await
                .map_err(TransferError::Source)?;
            match ManifestKind::detect(&mt, &child).map_err(TransferError::Source)? {
                ManifestKind::Manifest if entry.platform.is_some() => {
                    debug!(digest = %child_digest, "picked this host's platform from the index");
                    return Ok(Some((mt, child, child_digest)));
                }
                ManifestKind::Manifest => {}
                ManifestKind::Index => {
                    if let Some(found) = Box::pin(self.pick(&child, depth + 1)).await? {
                        return Ok(Some(found));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Makes sure the destination has every blob `manifest` references.
    async fn manifest_blobs(&mut self, manifest: &[u8]) -> Result<()> {
        let manifest = Manifest::parse(manifest).map_err(TransferError::Source)?;
        for blob in manifest.blobs() {
            if self.seen.insert(blob.digest.clone()) {
                self.blob(blob).await?;
            }
        }
        Ok(())
    }

    async fn blob(&mut self, blob: &Descriptor) -> Result<()> {
        let (src, dst) = (self.src, self.dst);
        let d = blob.digest.as_str();
        if dst
            .blob_exists(self.dst_repo, d)
            .await
            .map_err(TransferError::Destination)?
        {
            debug!(digest = d, "blob already there");
            self.report.blobs_skipped += 1;
            return Ok(());
        }
        if src.same_registry(dst)
            && self.src_repo != self.dst_repo
            && dst
                .mount_blob(self.dst_repo, d, self.src_repo)
                .await
                .map_err(TransferError::Destination)?
        {
            self.report.blobs_skipped += 1;
            return Ok(());
        }
        let resp = src
            .open_blob(self.src_repo, d)
            .await
            .map_err(TransferError::Source)?;
        let (body, fault) = verified_body(src, resp, d, blob.size);
        if let Err(e) = dst.upload_blob(self.dst_repo, d, body, blob.size).await {
            // The source stream's own failure (digest or size mismatch, broken connection)
            // surfaces as a failed upload; report it as what it is.
            let source_fault = fault.lock().unwrap_or_else(|p| p.into_inner()).take();
            return Err(match source_fault {
                Some(src_err) => TransferError::Source(src_err),
                None => TransferError::Destination(e),
            });
        }
        self.report.blobs_moved += 1;
        self.report.bytes += blob.size;
        Ok(())
    }
}

/// The source response as an upload body that fails (and so aborts the upload) when the
/// bytes do not hash to `digest` or are not `size` long. What went wrong is also left in the
/// returned slot, to be reported as the source's fault rather than the upload's.
fn verified_body(
    src: &RegistryClient,
    resp: reqwest::Response,
    digest: &str,
    size: u64,
) -> (reqwest::Body, Arc<Mutex<Option<ImageError>>>) {
    struct Verify<S> {
        inner: std::pin::Pin<Box<S>>,
        hasher: Sha256,
        len: u64,
        done: bool,
    }
    let slot: Arc<Mutex<Option<ImageError>>> = Arc::default();
    let (registry, want, fault) = (src.base().to_string(), digest.to_string(), slot.clone());
    let fail = move |err: ImageError| {
        let msg = err.to_string();
        *fault.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
        std::io::Error::other(msg)
    };
    let start = Verify {
        inner: Box::pin(resp.bytes_stream()),
        hasher: Sha256::new(),
        len: 0,
        done: false,
    };
    let stream = futures::stream::unfold(start, move |mut v| {
        let (registry, want, fail) = (registry.clone(), want.clone(), fail.clone());
        async move {
            if v.done {
                return None;
            }
            let mismatch = |got: String, len: u64| ImageError::DigestMismatch {
                what: format!("blob from {registry} ({len} of {size} bytes)"),
                expected: want.clone(),
                actual: got,
            };
            match v.inner.next().await {
                Some(Ok(chunk)) => {
                    v.hasher.update(&chunk);
                    v.len += chunk.len() as u64;
                    if v.len > size {
                        v.done = true;
                        let err = fail(mismatch("more bytes than its size".into(), v.len));
                        return Some((Err(err), v));
                    }
                    // Checked before the last chunk goes out: once the declared length is
                    // sent, the upload completes without asking the stream again.
                    if v.len == size {
                        v.done = true;
                        let got = digest::finish(std::mem::take(&mut v.hasher));
                        if got != want {
                            return Some((Err(fail(mismatch(got, v.len))), v));
                        }
                    }
                    Some((Ok(chunk), v))
                }
                Some(Err(e)) => {
                    v.done = true;
                    let err = fail(ImageError::Http {
                        registry: registry.clone(),
                        source: e,
                    });
                    Some((Err(err), v))
                }
                None => {
                    v.done = true;
                    let got = digest::finish(std::mem::take(&mut v.hasher));
                    // Short (a full-length stream was checked at its last chunk).
                    if v.len != size || got != want {
                        let err = fail(mismatch(got, v.len));
                        return Some((Err(err), v));
                    }
                    None
                }
            }
        }
    });
    (reqwest::Body::wrap_stream(stream), slot)
}

/// The media type to PUT a manifest with: the one the source sent, unless it was generic,
/// then the document's own `mediaType`.
fn manifest_type(sent: &str, bytes: &[u8]) -> String {
    match sent {
        oci::OCI_MANIFEST | oci::OCI_INDEX | oci::DOCKER_MANIFEST | oci::DOCKER_MANIFEST_LIST => {
            sent.to_string()
        }
        _ => {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Probe {
                media_type: Option<String>,
            }
            serde_json::from_slice::<Probe>(bytes)
                .ok()
                .and_then(|p| p.media_type)
                .unwrap_or_else(|| match ManifestKind::detect(sent, bytes) {
                    Ok(ManifestKind::Index) => oci::OCI_INDEX.to_string(),
                    _ => OCI_MANIFEST.to_string(),
                })
        }
    }
}

/// This host's `linux/<arch>` entry (strictly: unlike [`Index::pick_platform`], no fallback to
/// the first entry, which would store an image the agents cannot run).
fn pick_linux(index: &Index) -> Option<&Descriptor> {
    let arch = oci::host_architecture();
    index.manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
    })
}

fn platforms(index: &Index) -> String {
    let list: Vec<String> = index
        .manifests
        .iter()
        .map(|d| match &d.platform {
            Some(p) => match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            },
            None => "unknown".to_string(),
        })
        .collect();
    if list.is_empty() {
        "nothing".into()
    } else {
        list.join(", ")
    }
}

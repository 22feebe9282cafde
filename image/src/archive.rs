//! Producing images from local files and pushing them to a registry:
//! - [`import_rootfs`]: a root filesystem tarball becomes a one-layer image;
//! - [`load_archive`]: an OCI image layout archive (skopeo/podman/buildah `oci-archive`, docker
//!   25+ `docker save`) or a classic docker-save tarball is pushed as-is (OCI layout) or
//!   converted to OCI manifests (docker-save).
//!
//! Reading is separate from pushing: [`Archive::open`] indexes the tar once (member offsets,
//! links resolved) and parses every image, so it is testable without a registry, and blobs are
//! then uploaded straight from their byte range in the archive without extracting them.
//!
//! Invariants: every blob an image references is present in the archive before anything is
//! pushed; blobs go before the manifests that reference them, child manifests before the index
//! that lists them; imports are deterministic (same tarball, same digests).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::client::{BlobSource, RegistryClient};
use crate::digest::{self, HashingReader, HashingWriter};
use crate::layer::Compression;
use crate::oci::{
    host_architecture, Descriptor, Index, Manifest, ManifestKind, ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME, DEFAULT_PATH_ENV, OCI_CONFIG, OCI_INDEX, OCI_LAYER_TAR,
    OCI_LAYER_TAR_GZIP, OCI_MANIFEST,
};
use crate::{ImageError, Reference, Result};

/// JSON documents (index, manifests, configs) larger than this are refused.
const MAX_JSON_BYTES: u64 = 64 << 20;
/// Symlink/hard-link chains inside an archive longer than this are refused (cycles).
const MAX_LINK_HOPS: usize = 16;
const MAX_INDEX_DEPTH: usize = 4;

/// What pushing one image under one name did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// `repository:tag` as pushed (the registry is the client's).
    pub reference: String,
    /// Digest of the manifest (or index) the tag now points to.
    pub manifest_digest: String,
    /// Bytes sent to the registry (blobs it already had are not counted).
    pub bytes_uploaded: u64,
    /// Blobs sent to the registry.
    pub blobs_uploaded: usize,
    /// Blobs the registry already had (or that this load already pushed).
    pub blobs_skipped: usize,
}

/// Result of [`import_rootfs`].
pub type ImportReport = PushReport;
/// One image (under one name) pushed by [`load_archive`].
pub type LoadedImage = PushReport;

/// A manifest or index exactly as it will be pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveManifest {
    /// Its media type, the `Content-Type` of the push.
    pub media_type: String,
    /// The document, byte for byte: its digest is over these bytes.
    pub bytes: Vec<u8>,
    /// `sha256:` digest of `bytes`.
    pub digest: String,
}

/// One image found in an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveImage {
    /// Names it carries (RepoTags, annotations); empty when untagged.
    pub names: Vec<Reference>,
    /// What the names point to: an image manifest or an index.
    pub root: ArchiveManifest,
    /// Manifests under an index, pushed by digest before `root`, children before parents.
    pub children: Vec<ArchiveManifest>,
    /// Every config and layer blob referenced, each once, in push order.
    pub blobs: Vec<Descriptor>,
}

/// Which kind of archive was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// An OCI image layout (`oci-layout`, `index.json`, `blobs/`).
    OciLayout,
    /// A `docker save` tarball (`manifest.json`).
    DockerSave,
}

/// Where a member's bytes sit in the (uncompressed) archive file.
#[derive(Debug, Clone, Copy)]
struct Member {
    offset: u64,
    size: u64,
}

/// A parsed image archive; blobs are read from it by digest.
#[derive(Debug)]
pub struct Archive {
    /// The uncompressed tar the offsets refer to.
    path: PathBuf,
    /// Holds the decompressed copy of a gzipped archive alive while the archive is used.
    _decompressed: Option<tempfile::NamedTempFile>,
    members: HashMap<String, Member>,
    /// digest → member path.
    blobs: HashMap<String, String>,
    format: ArchiveFormat,
    images: Vec<ArchiveImage>,
}

impl Archive {
    /// Reads and parses an archive (blocking: it reads the whole file once, hashing layers of
    /// docker-save tarballs). A gzip-compressed archive is decompressed to a temporary file.
    pub fn open(path: &Path) -> Result<Archive> {
        let (tar_path, decompressed) = match Compression::of_file(path)? {
            Compression::None => (path.to_path_buf(), None),
            Compression::Gzip => {
                let tmp = decompress_to_temp(path)?;
                (tmp.path().to_path_buf(), Some(tmp))
            }
            Compression::Zstd => {
                return Err(ImageError::archive(
                    path,
                    "zstd-compressed archives are not supported",
                ))
            }
        };
        let members = index_tar(&tar_path).map_err(|e| match e {
            ImageError::Io { source, .. } => {
                ImageError::archive(path, format!("not a readable tar archive: {source}"))
            }
            other => other,
        })?;
        let mut archive = Archive {
            path: tar_path,
            _decompressed: decompressed,
            members,
            blobs: HashMap::new(),
            format: ArchiveFormat::OciLayout,
            images: Vec::new(),
        };
        if archive.members.contains_key("index.json") {
            archive.read_oci_layout(path)?;
        } else if archive.members.contains_key("manifest.json") {
            archive.format = ArchiveFormat::DockerSave;
            archive.read_docker_save(path)?;
        } else {
            return Err(ImageError::archive(
                path,
                "neither an OCI image layout (index.json) nor a docker-save tarball (manifest.json)",
            ));
        }
        if archive.images.is_empty() {
            return Err(ImageError::archive(path, "holds no images"));
        }
        Ok(archive)
    }

    /// Which kind of archive this is.
    pub fn format(&self) -> ArchiveFormat {
        self.format
    }

    /// The images found, in the archive's order.
    pub fn images(&self) -> &[ArchiveImage] {
        &self.images
    }

    /// Whether the archive holds the blob with this digest.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blobs.contains_key(digest)
    }

    /// The blob's byte range in the archive, for uploading without extracting.
    pub fn blob_source(&self, digest: &str) -> Result<BlobSource> {
        let member = self.blob_member(digest)?;
        Ok(BlobSource::FileRange {
            path: self.path.clone(),
            offset: member.offset,
            len: member.size,
        })
    }

    /// Reads a whole blob into memory (for JSON documents and tests).
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let member = self.blob_member(digest)?;
        self.read_range(member, u64::MAX)
    }

    fn blob_member(&self, digest: &str) -> Result<Member> {
        let name = self
            .blobs
            .get(digest)
            .ok_or_else(|| ImageError::archive(&self.path, format!("is missing blob {digest}")))?;
        Ok(self.members[name])
    }

    fn read_member(&self, name: &str) -> Result<Vec<u8>> {
        let member = *self
            .members
            .get(name)
            .ok_or_else(|| ImageError::archive(&self.path, format!("has no {name}")))?;
        self.read_range(member, MAX_JSON_BYTES)
    }

    fn read_range(&self, member: Member, limit: u64) -> Result<Vec<u8>> {
        if member.size > limit {
            return Err(ImageError::archive(
                &self.path,
                format!(
                    "member of {} bytes is larger than the {limit} allowed",
                    member.size
                ),
            ));
        }
        let mut file = self.open_range(member)?;
        let mut out = Vec::with_capacity(member.size as usize);
        file.read_to_end(&mut out)
            .map_err(|e| ImageError::io_path("read", &self.path, e))?;
        Ok(out)
    }

    fn open_range(&self, member: Member) -> Result<io::Take<fs::File>> {
        let mut file =
            fs::File::open(&self.path).map_err(|e| ImageError::io_path("open", &self.path, e))?;
        file.seek(SeekFrom::Start(member.offset))
            .map_err(|e| ImageError::io_path("seek in", &self.path, e))?;
        Ok(file.take(member.size))
    }

    // ---- OCI image layout ----

    fn read_oci_layout(&mut self, shown: &Path) -> Result<()> {
        for name in self.members.keys() {
            if let Some(rest) = name.strip_prefix("blobs/") {
                if let Some((alg, hex)) = rest.split_once('/') {
                    let digest = format!("{alg}:{hex}");
                    if digest::validate(&digest).is_ok() {
                        self.blobs.insert(digest, name.clone());
                    }
                }
            }
        }
        let index_bytes = self.read_member("index.json")?;
        let index = Index::parse(&index_bytes)
            .map_err(|e| ImageError::archive(shown, format!("index.json: {e}")))?;

        // Several entries may name the same manifest (one per tag): one image, many names.
        let mut order: Vec<&Descriptor> = Vec::new();
        let mut names: HashMap<&str, Vec<Reference>> = HashMap::new();
        for desc in &index.manifests {
            if !names.contains_key(desc.digest.as_str()) {
                order.push(desc);
            }
            let entry = names.entry(desc.digest.as_str()).or_default();
            if let Some(name) = name_from_annotations(desc)
                .map_err(|e| ImageError::archive(shown, e.to_string()))?
            {
                if !entry.contains(&name) {
                    entry.push(name);
                }
            }
        }
        let mut images = Vec::new();
        for desc in order {
            let mut children = Vec::new();
            let mut blobs = Vec::new();
            let mut seen = HashSet::new();
            let root = self.collect(shown, desc, 0, &mut children, &mut blobs, &mut seen)?;
            images.push(ArchiveImage {
                names: names.remove(desc.digest.as_str()).unwrap_or_default(),
                root,
                children,
                blobs,
            });
        }
        self.images = images;
        Ok(())
    }

    /// Reads the manifest or index `desc` points to, gathering what must be pushed before it.
    /// An index whose children are not all in the archive (a single-platform save of a
    /// multi-platform image) is replaced by its best child present.
    fn collect(
        &self,
        shown: &Path,
        desc: &Descriptor,
        depth: usize,
        children: &mut Vec<ArchiveManifest>,
        blobs: &mut Vec<Descriptor>,
        seen: &mut HashSet<String>,
    ) -> Result<ArchiveManifest> {
        if depth > MAX_INDEX_DEPTH {
            return Err(ImageError::archive(shown, "indexes nested too deep"));
        }
        let bytes = self.read_blob(&desc.digest)?;
        let actual = digest::of_bytes(&bytes);
        if actual != desc.digest {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest in archive {}", shown.display()),
                expected: desc.digest.clone(),
                actual,
            });
        }
        let kind = ManifestKind::detect(&desc.media_type, &bytes)?;
        let media_type = media_type_of(&desc.media_type, &bytes, kind);
        match kind {
            ManifestKind::Manifest => {
                let manifest = Manifest::parse(&bytes)?;
                for blob in manifest.blobs() {
                    if !self.has_blob(&blob.digest) {
                        return Err(ImageError::archive(
                            shown,
                            format!(
                                "is missing blob {} of manifest {}",
                                blob.digest, desc.digest
                            ),
                        ));
                    }
                    if seen.insert(blob.digest.clone()) {
                        blobs.push(blob.clone());
                    }
                }
            }
            ManifestKind::Index => {
                let index = Index::parse(&bytes)?;
                let present: Vec<&Descriptor> = index
                    .manifests
                    .iter()
                    .filter(|d| self.has_blob(&d.digest))
                    .collect();
                if present.is_empty() {
                    return Err(ImageError::archive(
                        shown,
                        format!(
                            "index {} lists no manifest present in the archive",
                            desc.digest
                        ),
                    ));
                }
                if present.len() < index.manifests.len() {
                    let arch = host_architecture();
                    let best = present
                        .iter()
                        .find(|d| {
                            d.platform
                                .as_ref()
                                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
                        })
                        .unwrap_or(&present[0]);
                    warn!(
                        index = %desc.digest,
                        using = %best.digest,
                        "archive holds only part of a multi-platform index; pushing one platform"
                    );
                    return self.collect(shown, best, depth + 1, children, blobs, seen);
                }
                for child in &index.manifests {
                    let manifest = self.collect(shown, child, depth + 1, children, blobs, seen)?;
                    if !children.iter().any(|c| c.digest == manifest.digest) {
                        children.push(manifest);
                    }
                }
            }
        }
        Ok(ArchiveManifest {
            media_type,
            bytes,
            digest: actual,
        })
    }

    // ---- docker save ----

    fn read_docker_save(&mut self, shown: &Path) -> Result<()> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
            layers: Vec<String>,
        }
        let bytes = self.read_member("manifest.json")?;
        let entries: Vec<Entry> = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::archive(shown, format!("manifest.json: {e}")))?;
        // Layers shared between images are hashed once.
        let mut hashed: HashMap<String, (String, u64, &'static str)> = HashMap::new();
        let mut images = Vec::new();
        for entry in entries {
            let config_name = normalize_member(&entry.config)
                .ok_or_else(|| ImageError::archive(shown, format!("bad path {}", entry.config)))?;
            let config_bytes = self.read_member(&config_name)?;
            let config_digest = digest::of_bytes(&config_bytes);
            self.blobs.insert(config_digest.clone(), config_name);
            let config = Descriptor::new(OCI_CONFIG, config_digest, config_bytes.len() as u64);

            let mut layers = Vec::with_capacity(entry.layers.len());
            for layer in &entry.layers {
                let name = normalize_member(layer)
                    .ok_or_else(|| ImageError::archive(shown, format!("bad path {layer}")))?;
                let (digest, size, media_type) = match hashed.get(&name) {
                    Some(h) => h.clone(),
                    None => {
                        let h = self.hash_layer(&name)?;
                        hashed.insert(name.clone(), h.clone());
                        h
                    }
                };
                self.blobs.insert(digest.clone(), name);
                layers.push(Descriptor::new(media_type, digest, size));
            }
            let manifest = Manifest::oci(config, layers);
            let bytes = manifest.to_bytes();
            let names = entry
                .repo_tags
                .unwrap_or_default()
                .iter()
                .map(|t| parse_name(t))
                .collect::<Result<Vec<_>>>()
                .map_err(|e| ImageError::archive(shown, e.to_string()))?;
            images.push(ArchiveImage {
                names,
                root: ArchiveManifest {
                    media_type: OCI_MANIFEST.to_string(),
                    digest: digest::of_bytes(&bytes),
                    bytes,
                },
                children: Vec::new(),
                blobs: manifest.blobs().cloned().collect(),
            });
        }
        self.images = images;
        Ok(())
    }

    /// Digest, size and media type (plain or gzip tar, by magic bytes) of a layer member.
    fn hash_layer(&self, name: &str) -> Result<(String, u64, &'static str)> {
        let member = *self
            .members
            .get(name)
            .ok_or_else(|| ImageError::archive(&self.path, format!("has no layer {name}")))?;
        let mut reader = BufReader::with_capacity(256 << 10, self.open_range(member)?);
        let head = io::BufRead::fill_buf(&mut reader)
            .map_err(|e| ImageError::io_path("read", &self.path, e))?;
        let media_type = match Compression::detect(head) {
            Compression::Gzip => OCI_LAYER_TAR_GZIP,
            Compression::None => OCI_LAYER_TAR,
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        let (digest, size) =
            digest::of_reader(reader).map_err(|e| ImageError::io_path("read", &self.path, e))?;
        Ok((digest, size, media_type))
    }
}

/// The media type to push a manifest with: its descriptor's, else its own `mediaType`, else
/// the OCI type for its kind.
fn media_type_of(declared: &str, bytes: &[u8], kind: ManifestKind) -> String {
    if !declared.is_empty() {
        return declared.to_string();
    }
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes)
        .ok()
        .and_then(|p| p.media_type)
        .unwrap_or_else(|| match kind {
            ManifestKind::Manifest => OCI_MANIFEST.to_string(),
            ManifestKind::Index => OCI_INDEX.to_string(),
        })
}

/// The name an index.json entry carries. containerd's full name wins over the OCI ref.name,
/// which docker fills with just the tag.
fn name_from_annotations(desc: &Descriptor) -> Result<Option<Reference>> {
    let name = desc
        .annotation(ANNOTATION_CONTAINERD_NAME)
        .or_else(|| desc.annotation(ANNOTATION_REF_NAME));
    name.map(parse_name).transpose()
}

/// Parses an image name found in an archive. Docker Hub's implicit parts (`docker.io/`,
/// `library/`) and podman's `localhost/` are dropped: `docker save hello` must load as `hello`.
pub fn parse_name(name: &str) -> Result<Reference> {
    let mut reference = Reference::parse(name)?;
    match reference.registry.as_deref() {
        Some("docker.io" | "index.docker.io" | "registry-1.docker.io") => {
            reference.registry = None;
            if let Some(rest) = reference.repository.strip_prefix("library/") {
                reference.repository = rest.to_string();
            }
        }
        Some("localhost") => reference.registry = None,
        _ => {}
    }
    Ok(reference)
}

/// A member path as stored in the index: no leading `./` or `/`, no `..`.
fn normalize_member(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(p) => parts.push(p.to_str()?),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

enum RawMember {
    Data(Member),
    /// Target relative to the member's own directory.
    Symlink(String),
    /// Target relative to the archive root.
    Hardlink(String),
}

/// Indexes the members of an uncompressed tar: path → byte range, links resolved.
fn index_tar(path: &Path) -> Result<HashMap<String, Member>> {
    let file = fs::File::open(path).map_err(|e| ImageError::io_path("open", path, e))?;
    let mut archive = tar::Archive::new(file);
    let mut raw: HashMap<String, RawMember> = HashMap::new();
    let entries = archive
        .entries_with_seek()
        .map_err(|e| ImageError::io_path("read", path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io_path("read", path, e))?;
        let entry_path = entry
            .path()
            .map_err(|e| ImageError::io_path("read", path, e))?;
        let Some(name) = entry_path.to_str().and_then(normalize_member) else {
            continue;
        };
        let kind = entry.header().entry_type();
        let link = || -> Result<String> {
            let target = entry
                .link_name()
                .map_err(|e| ImageError::io_path("read", path, e))?
                .unwrap_or_default();
            Ok(target.to_string_lossy().into_owned())
        };
        let member = if kind.is_file() || kind == tar::EntryType::Continuous {
            RawMember::Data(Member {
                offset: entry.raw_file_position(),
                size: entry.size(),
            })
        } else if kind.is_symlink() {
            RawMember::Symlink(link()?)
        } else if kind.is_hard_link() {
            RawMember::Hardlink(link()?)
        } else {
            continue;
        };
        raw.insert(name, member);
    }

    let mut members = HashMap::new();
    for name in raw.keys() {
        let mut current = name.clone();
        for _ in 0..MAX_LINK_HOPS {
            match raw.get(&current) {
                Some(RawMember::Data(m)) => {
                    members.insert(name.clone(), *m);
                    break;
                }
                Some(RawMember::Symlink(target)) => {
                    let base = current.rsplit_once('/').map_or("", |(dir, _)| dir);
                    let joined = if target.starts_with('/') {
                        target.clone()
                    } else {
                        format!("{base}/{target}")
                    };
                    match normalize_member(&joined) {
                        Some(next) => current = next,
                        None => break,
                    }
                }
                Some(RawMember::Hardlink(target)) => match normalize_member(target) {
                    Some(next) => current = next,
                    None => break,
                },
                None => break,
            }
        }
    }
    Ok(members)
}

fn decompress_to_temp(path: &Path) -> Result<tempfile::NamedTempFile> {
    let file = fs::File::open(path).map_err(|e| ImageError::io_path("open", path, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix("rudder-archive-")
        .tempfile()
        .map_err(|e| ImageError::io("create temporary file", e))?;
    let mut decoder = MultiGzDecoder::new(BufReader::with_capacity(256 << 10, file));
    io::copy(&mut decoder, &mut BufWriter::new(tmp.as_file_mut()))
        .map_err(|e| ImageError::io_path("decompress", path, e))?;
    Ok(tmp)
}

/// Pushes every image of an archive (see the module doc). Images without a name take
/// `default_repo_for_untagged`; without one, an untagged image is an error.
pub async fn load_archive(
    client: &RegistryClient,
    path: &Path,
    default_repo_for_untagged: Option<&Reference>,
) -> Result<Vec<LoadedImage>> {
    let owned = path.to_path_buf();
    let archive = tokio::task::spawn_blocking(move || Archive::open(&owned))
        .await
        .map_err(ImageError::task)??;
    let untagged = archive
        .images()
        .iter()
        .filter(|i| i.names.is_empty())
        .count();
    match (untagged, default_repo_for_untagged) {
        (0, _) => {}
        (_, None) => {
            return Err(ImageError::archive(
                path,
                format!(
                    "{untagged} image(s) carry no name (no RepoTags or \
                     org.opencontainers.image.ref.name annotation); give a name to load it under"
                ),
            ))
        }
        (1, Some(_)) => {}
        (n, Some(name)) => {
            return Err(ImageError::archive(
                path,
                format!("{n} images carry no name; only one can be loaded as {name}"),
            ))
        }
    }

    let mut pushed: HashSet<(String, String)> = HashSet::new();
    let mut reports = Vec::new();
    for image in archive.images() {
        let names: Vec<Reference> = if image.names.is_empty() {
            default_repo_for_untagged.into_iter().cloned().collect()
        } else {
            image.names.clone()
        };
        for name in names {
            let report = push_image(client, &archive, image, &name, &mut pushed).await?;
            reports.push(report);
        }
    }
    Ok(reports)
}

async fn push_image(
    client: &RegistryClient,
    archive: &Archive,
    image: &ArchiveImage,
    name: &Reference,
    pushed: &mut HashSet<(String, String)>,
) -> Result<PushReport> {
    let repo = name.repository.as_str();
    let mut report = PushReport {
        reference: name.short(),
        manifest_digest: image.root.digest.clone(),
        bytes_uploaded: 0,
        blobs_uploaded: 0,
        blobs_skipped: 0,
    };
    for blob in &image.blobs {
        let key = (repo.to_string(), blob.digest.clone());
        if pushed.contains(&key) {
            report.blobs_skipped += 1;
            continue;
        }
        let source = archive.blob_source(&blob.digest)?;
        if client.push_blob(repo, &blob.digest, source).await? {
            report.blobs_uploaded += 1;
            report.bytes_uploaded += blob.size;
        } else {
            report.blobs_skipped += 1;
        }
        pushed.insert(key);
    }
    for child in &image.children {
        client
            .push_manifest(repo, &child.digest, &child.media_type, child.bytes.clone())
            .await?;
    }
    // A name with a tag moves the tag; a digest-only name just stores the manifest.
    let target = name.tag.as_deref().unwrap_or(&image.root.digest);
    client
        .push_manifest(
            repo,
            target,
            &image.root.media_type,
            image.root.bytes.clone(),
        )
        .await?;
    info!(image = %report.reference, digest = %report.manifest_digest, bytes = report.bytes_uploaded, "loaded image");
    Ok(report)
}

// ---- import of a root filesystem ----

/// The one layer made from a root filesystem tarball.
#[derive(Debug)]
pub struct RootfsLayer {
    /// Digest of the gzip blob.
    pub digest: String,
    /// Size of the gzip blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar (goes into the config's rootfs.diff_ids).
    pub diff_id: String,
    /// The blob: the input itself when it was already gzip, else a compressed temporary copy.
    pub blob: BlobFile,
}

/// Where a root filesystem layer's gzip blob is, and who owns the file.
#[derive(Debug)]
pub enum BlobFile {
    /// The input file itself (already gzip): left in place.
    Original(PathBuf),
    /// A compressed copy, removed when dropped.
    Temp(tempfile::NamedTempFile),
}

impl BlobFile {
    /// The blob's path, to upload from.
    pub fn path(&self) -> &Path {
        match self {
            BlobFile::Original(p) => p,
            BlobFile::Temp(t) => t.path(),
        }
    }
}

/// Makes the gzip layer blob for a rootfs tarball (blocking). A gzip input is used as-is; a
/// plain tar is compressed once while both digests are computed in the same pass.
pub fn rootfs_layer(tar_path: &Path) -> Result<RootfsLayer> {
    let open = || fs::File::open(tar_path).map_err(|e| ImageError::io_path("open", tar_path, e));
    match Compression::of_file(tar_path)? {
        Compression::Zstd => Err(ImageError::Unsupported {
            what: "rootfs compression".into(),
            detail: "zstd; give a plain or gzip tarball".into(),
        }),
        Compression::Gzip => {
            check_tar_header(MultiGzDecoder::new(open()?), tar_path)?;
            let (digest, size) = digest::of_reader(BufReader::with_capacity(256 << 10, open()?))
                .map_err(|e| ImageError::io_path("read", tar_path, e))?;
            let (diff_id, _) = digest::of_reader(MultiGzDecoder::new(BufReader::with_capacity(
                256 << 10,
                open()?,
            )))
            .map_err(|e| ImageError::io_path("decompress", tar_path, e))?;
            Ok(RootfsLayer {
                digest,
                size,
                diff_id,
                blob: BlobFile::Original(tar_path.to_path_buf()),
            })
        }
        Compression::None => {
            check_tar_header(open()?, tar_path)?;
            let tmp = tempfile::Builder::new()
                .prefix("rudder-layer-")
                .tempfile()
                .map_err(|e| ImageError::io("create temporary file", e))?;
            let out = tmp
                .as_file()
                .try_clone()
                .map_err(|e| ImageError::io("open temporary file", e))?;
            let mut input = HashingReader::new(BufReader::with_capacity(256 << 10, open()?));
            let hashing_out = HashingWriter::new(BufWriter::with_capacity(256 << 10, out));
            // mtime 0 in the gzip header (flate2's default) keeps imports reproducible.
            let mut encoder = GzEncoder::new(hashing_out, flate2::Compression::default());
            io::copy(&mut input, &mut encoder)
                .map_err(|e| ImageError::io_path("compress", tar_path, e))?;
            let hashing_out = encoder
                .finish()
                .map_err(|e| ImageError::io("write layer", e))?;
            let (mut buffered, digest, size) = hashing_out.finish();
            buffered
                .flush()
                .map_err(|e| ImageError::io("write layer", e))?;
            let (diff_id, _) = input.finish();
            Ok(RootfsLayer {
                digest,
                size,
                diff_id,
                blob: BlobFile::Temp(tmp),
            })
        }
    }
}

/// Refuses input that is not a tar archive before hashing or uploading anything.
fn check_tar_header(mut reader: impl Read, path: &Path) -> Result<()> {
    let mut header = [0u8; 512];
    let mut filled = 0;
    while filled < header.len() {
        match reader.read(&mut header[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io_path("read", path, e)),
        }
    }
    if filled < 512 || &header[257..262] != b"ustar" {
        return Err(ImageError::archive(
            path,
            "is not a tar archive (no ustar header)",
        ));
    }
    Ok(())
}

/// The OCI image config for an imported rootfs: this platform, default PATH, one layer.
pub fn rootfs_config(diff_id: &str) -> Vec<u8> {
    let config = serde_json::json!({
        "architecture": host_architecture(),
        "os": "linux",
        "config": { "Env": [DEFAULT_PATH_ENV] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [ { "created_by": "rudder import" } ],
    });
    serde_json::to_vec(&config).expect("config serializes")
}

/// Imports a root filesystem tarball (plain or gzip) as a one-layer image under `reference`'s
/// tag: pushes the layer, the config, then the manifest.
pub async fn import_rootfs(
    client: &RegistryClient,
    tar_path: &Path,
    reference: &Reference,
) -> Result<ImportReport> {
    let tag = reference
        .tag
        .clone()
        .ok_or_else(|| ImageError::InvalidReference {
            reference: reference.to_string(),
            reason: "an import needs a tag to push under, not a digest".into(),
        })?;
    let repo = reference.repository.as_str();
    let owned = tar_path.to_path_buf();
    let layer = tokio::task::spawn_blocking(move || rootfs_layer(&owned))
        .await
        .map_err(ImageError::task)??;
    debug!(digest = %layer.digest, diff_id = %layer.diff_id, size = layer.size, "built layer");

    let config = rootfs_config(&layer.diff_id);
    let config_digest = digest::of_bytes(&config);
    let manifest = Manifest::oci(
        Descriptor::new(OCI_CONFIG, config_digest.clone(), config.len() as u64),
        vec![Descriptor::new(
            OCI_LAYER_TAR_GZIP,
            layer.digest.clone(),
            layer.size,
        )],
    );

    let mut report = PushReport {
        reference: format!("{repo}:{tag}"),
        manifest_digest: String::new(),
        bytes_uploaded: 0,
        blobs_uploaded: 0,
        blobs_skipped: 0,
    };
    if client
        .push_blob(repo, &layer.digest, layer.blob.path())
        .await?
    {
        report.blobs_uploaded += 1;
        report.bytes_uploaded += layer.size;
    } else {
        report.blobs_skipped += 1;
    }
    let config_len = config.len() as u64;
    if client.push_blob(repo, &config_digest, config).await? {
        report.blobs_uploaded += 1;
        report.bytes_uploaded += config_len;
    } else {
        report.blobs_skipped += 1;
    }
    report.manifest_digest = client
        .push_manifest(repo, &tag, OCI_MANIFEST, manifest.to_bytes())
        .await?;
    info!(image = %report.reference, digest = %report.manifest_digest, "imported rootfs");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Platform, DOCKER_MANIFEST_LIST};

    /// A tar with the given members (files, and symlinks when `data` starts with "->").
    fn write_tar(path: &Path, members: &[(&str, Vec<u8>)]) {
        let mut b = tar::Builder::new(fs::File::create(path).unwrap());
        for (name, data) in members {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_mtime(0);
            if let Some(target) = data.strip_prefix(b"->") {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, name, std::str::from_utf8(target).unwrap())
                    .unwrap();
            } else {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, &data[..]).unwrap();
            }
        }
        b.into_inner().unwrap();
    }

    /// A small layer: a plain tar with one file.
    fn layer_tar(file: &str, content: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(content.len() as u64);
        b.append_data(&mut h, file, content).unwrap();
        b.into_inner().unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    fn hex(digest: &str) -> &str {
        digest::hex_of(digest).unwrap()
    }

    #[test]
    fn reads_docker_save_tarball() {
        let tmp = tempfile::tempdir().unwrap();
        let config = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
        let config_digest = digest::of_bytes(&config);
        let plain = layer_tar("a.txt", b"a");
        let gzipped = gzip(&layer_tar("b.txt", b"b"));
        let manifest_json = serde_json::json!([
            {
                "Config": format!("{}.json", hex(&config_digest)),
                "RepoTags": ["hello:latest", "docker.io/library/hello:v2"],
                "Layers": ["l1/layer.tar", "l2/layer.tar"]
            },
            {
                "Config": format!("{}.json", hex(&config_digest)),
                "RepoTags": null,
                // Older docker writes a repeated layer as a symlink to the first copy.
                "Layers": ["l3/layer.tar"]
            }
        ]);
        let path = tmp.path().join("save.tar");
        write_tar(
            &path,
            &[
                ("manifest.json", serde_json::to_vec(&manifest_json).unwrap()),
                (&format!("{}.json", hex(&config_digest)), config.clone()),
                ("l1/layer.tar", plain.clone()),
                ("l2/layer.tar", gzipped.clone()),
                ("l3/layer.tar", b"->../l1/layer.tar".to_vec()),
            ],
        );

        let archive = Archive::open(&path).unwrap();
        assert_eq!(archive.format(), ArchiveFormat::DockerSave);
        let images = archive.images();
        assert_eq!(images.len(), 2);

        let first = &images[0];
        let names: Vec<String> = first.names.iter().map(|n| n.short()).collect();
        assert_eq!(names, ["hello:latest", "hello:v2"]);
        assert_eq!(first.root.media_type, OCI_MANIFEST);
        assert_eq!(first.root.digest, digest::of_bytes(&first.root.bytes));
        let manifest = Manifest::parse(&first.root.bytes).unwrap();
        assert_eq!(manifest.media_type.as_deref(), Some(OCI_MANIFEST));
        assert_eq!(manifest.config.media_type, OCI_CONFIG);
        assert_eq!(manifest.config.digest, config_digest);
        assert_eq!(manifest.config.size, config.len() as u64);
        assert_eq!(
            manifest.layers,
            vec![
                Descriptor::new(OCI_LAYER_TAR, digest::of_bytes(&plain), plain.len() as u64),
                Descriptor::new(
                    OCI_LAYER_TAR_GZIP,
                    digest::of_bytes(&gzipped),
                    gzipped.len() as u64
                ),
            ]
        );
        assert_eq!(first.blobs.len(), 3, "config and two layers");
        assert_eq!(archive.read_blob(&config_digest).unwrap(), config);
        assert_eq!(
            archive.read_blob(&digest::of_bytes(&gzipped)).unwrap(),
            gzipped
        );
        assert!(matches!(
            archive.blob_source(&digest::of_bytes(&plain)).unwrap(),
            BlobSource::FileRange { len, .. } if len == plain.len() as u64
        ));

        let second = &images[1];
        assert!(second.names.is_empty());
        let manifest = Manifest::parse(&second.root.bytes).unwrap();
        assert_eq!(
            manifest.layers[0].digest,
            digest::of_bytes(&plain),
            "symlink resolved"
        );
    }

    /// Writes an OCI layout archive: blobs are stored under blobs/sha256/<hex>.
    struct Layout {
        members: Vec<(String, Vec<u8>)>,
    }

    impl Layout {
        fn new() -> Layout {
            Layout {
                members: vec![(
                    "oci-layout".into(),
                    br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
                )],
            }
        }

        fn blob(&mut self, bytes: &[u8]) -> String {
            let d = digest::of_bytes(bytes);
            self.members
                .push((format!("blobs/sha256/{}", hex(&d)), bytes.to_vec()));
            d
        }

        fn image(&mut self, file: &str) -> Descriptor {
            let config = self.blob(b"{\"os\":\"linux\"}");
            let layer = gzip(&layer_tar(file, b"x"));
            let layer_digest = self.blob(&layer);
            let manifest = Manifest::oci(
                Descriptor::new(OCI_CONFIG, config, 15),
                vec![Descriptor::new(
                    OCI_LAYER_TAR_GZIP,
                    layer_digest,
                    layer.len() as u64,
                )],
            );
            let bytes = manifest.to_bytes();
            Descriptor::new(OCI_MANIFEST, self.blob(&bytes), bytes.len() as u64)
        }

        fn index(&mut self, media_type: &str, manifests: Vec<Descriptor>) -> Descriptor {
            let index = Index {
                schema_version: 2,
                media_type: Some(media_type.into()),
                manifests,
                annotations: None,
            };
            let bytes = serde_json::to_vec(&index).unwrap();
            Descriptor::new(media_type, self.blob(&bytes), bytes.len() as u64)
        }

        fn write(mut self, path: &Path, top: Vec<Descriptor>) {
            let index = Index {
                schema_version: 2,
                media_type: Some(OCI_INDEX.into()),
                manifests: top,
                annotations: None,
            };
            self.members
                .push(("index.json".into(), serde_json::to_vec(&index).unwrap()));
            let members: Vec<(&str, Vec<u8>)> = self
                .members
                .iter()
                .map(|(n, d)| (n.as_str(), d.clone()))
                .collect();
            write_tar(path, &members);
        }
    }

    fn annotated(mut d: Descriptor, pairs: &[(&str, &str)]) -> Descriptor {
        d.annotations = Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        d
    }

    fn with_platform(mut d: Descriptor, arch: &str) -> Descriptor {
        d.platform = Some(Platform {
            architecture: arch.into(),
            os: "linux".into(),
            variant: None,
        });
        d
    }

    #[test]
    fn reads_oci_layout_with_nested_indexes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut layout = Layout::new();
        let amd = with_platform(layout.image("amd"), "amd64");
        let arm = with_platform(layout.image("arm"), "arm64");
        let inner = layout.index(OCI_INDEX, vec![amd.clone(), arm.clone()]);
        let outer = layout.index(OCI_INDEX, vec![inner.clone()]);
        let single = layout.image("single");
        let path = tmp.path().join("oci.tar");
        layout.write(
            &path,
            vec![
                annotated(outer.clone(), &[(ANNOTATION_REF_NAME, "hello:v1")]),
                annotated(
                    outer.clone(),
                    &[(ANNOTATION_REF_NAME, "localhost/hello:v2")],
                ),
                annotated(
                    single.clone(),
                    &[
                        (ANNOTATION_CONTAINERD_NAME, "docker.io/library/busy:1"),
                        (ANNOTATION_REF_NAME, "1"),
                    ],
                ),
            ],
        );

        let archive = Archive::open(&path).unwrap();
        assert_eq!(archive.format(), ArchiveFormat::OciLayout);
        let images = archive.images();
        assert_eq!(images.len(), 2, "two entries for one index make one image");

        let multi = &images[0];
        let names: Vec<String> = multi.names.iter().map(|n| n.short()).collect();
        assert_eq!(names, ["hello:v1", "hello:v2"]);
        assert_eq!(multi.root.digest, outer.digest);
        assert_eq!(multi.root.media_type, OCI_INDEX);
        let children: Vec<&str> = multi.children.iter().map(|c| c.digest.as_str()).collect();
        assert_eq!(
            children,
            [
                amd.digest.as_str(),
                arm.digest.as_str(),
                inner.digest.as_str()
            ],
            "children come before the index that lists them"
        );
        assert_eq!(multi.blobs.len(), 3, "one shared config, two layers");
        for blob in &multi.blobs {
            assert!(archive.has_blob(&blob.digest));
        }

        let busy = &images[1];
        assert_eq!(busy.names[0].short(), "busy:1");
        assert_eq!(busy.root.digest, single.digest);
        assert!(busy.children.is_empty());
    }

    #[test]
    fn partial_index_falls_back_to_a_present_platform() {
        let tmp = tempfile::tempdir().unwrap();
        let mut layout = Layout::new();
        let here = with_platform(layout.image("here"), host_architecture());
        let missing = with_platform(
            Descriptor::new(OCI_MANIFEST, digest::of_bytes(b"not in archive"), 3),
            "s390x",
        );
        let index = layout.index(DOCKER_MANIFEST_LIST, vec![missing, here.clone()]);
        let path = tmp.path().join("partial.tar");
        layout.write(
            &path,
            vec![annotated(index, &[(ANNOTATION_REF_NAME, "p:1")])],
        );
        let archive = Archive::open(&path).unwrap();
        let image = &archive.images()[0];
        assert_eq!(image.root.digest, here.digest);
        assert_eq!(image.root.media_type, OCI_MANIFEST);
        assert!(image.children.is_empty());
    }

    #[test]
    fn missing_blob_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut layout = Layout::new();
        let desc = layout.image("x");
        let manifest = Manifest::parse(&layout.members.last().unwrap().1).unwrap();
        let layer_digest = manifest.layers[0].digest.clone();
        let layer_member = format!("blobs/sha256/{}", hex(&layer_digest));
        layout.members.retain(|(n, _)| *n != layer_member);
        let path = tmp.path().join("broken.tar");
        layout.write(&path, vec![desc]);
        let err = Archive::open(&path).unwrap_err().to_string();
        assert!(err.contains(&layer_digest), "{err}");
        assert!(err.starts_with("image: archive "), "{err}");
    }

    #[test]
    fn reads_gzipped_archive_and_refuses_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        let mut layout = Layout::new();
        let desc = layout.image("x");
        let path = tmp.path().join("oci.tar");
        layout.write(&path, vec![desc.clone()]);
        let gz_path = tmp.path().join("oci.tar.gz");
        fs::write(&gz_path, gzip(&fs::read(&path).unwrap())).unwrap();
        let archive = Archive::open(&gz_path).unwrap();
        assert_eq!(archive.images()[0].root.digest, desc.digest);
        assert!(archive.images()[0].names.is_empty());

        let junk = tmp.path().join("junk.tar");
        fs::write(&junk, b"definitely not a tar").unwrap();
        assert!(Archive::open(&junk).is_err());
    }

    #[test]
    fn rootfs_layer_from_plain_and_gzip_tar() {
        let tmp = tempfile::tempdir().unwrap();
        let plain = layer_tar("bin/true", b"#!/bin/sh\n");
        let plain_path = tmp.path().join("rootfs.tar");
        fs::write(&plain_path, &plain).unwrap();

        let layer = rootfs_layer(&plain_path).unwrap();
        assert!(matches!(layer.blob, BlobFile::Temp(_)));
        let blob = fs::read(layer.blob.path()).unwrap();
        assert_eq!(layer.digest, digest::of_bytes(&blob));
        assert_eq!(layer.size, blob.len() as u64);
        assert_eq!(layer.diff_id, digest::of_bytes(&plain));
        let mut unzipped = Vec::new();
        MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut unzipped)
            .unwrap();
        assert_eq!(unzipped, plain);
        // Deterministic: the same input gives the same digest.
        assert_eq!(rootfs_layer(&plain_path).unwrap().digest, layer.digest);

        let gz_path = tmp.path().join("rootfs.tar.gz");
        let gz = gzip(&plain);
        fs::write(&gz_path, &gz).unwrap();
        let layer = rootfs_layer(&gz_path).unwrap();
        assert!(matches!(layer.blob, BlobFile::Original(_)));
        assert_eq!(layer.digest, digest::of_bytes(&gz));
        assert_eq!(layer.diff_id, digest::of_bytes(&plain));

        let config: serde_json::Value =
            serde_json::from_slice(&rootfs_config(&layer.diff_id)).unwrap();
        assert_eq!(config["os"], "linux");
        assert_eq!(config["architecture"], host_architecture());
        assert_eq!(config["rootfs"]["diff_ids"][0], layer.diff_id.as_str());
        assert_eq!(config["config"]["Env"][0], DEFAULT_PATH_ENV);

        let junk = tmp.path().join("junk");
        fs::write(&junk, vec![7u8; 2048]).unwrap();
        assert!(rootfs_layer(&junk).is_err());
    }

    #[test]
    fn names_drop_docker_hub_defaults() {
        for (name, want) in [
            ("docker.io/library/hello:latest", "hello:latest"),
            ("docker.io/team/app:1", "team/app:1"),
            ("localhost/hello:latest", "hello:latest"),
            ("10.0.0.1:5000/x/y:2", "x/y:2"),
        ] {
            assert_eq!(parse_name(name).unwrap().short(), want);
        }
        assert_eq!(
            parse_name("10.0.0.1:5000/x/y:2")
                .unwrap()
                .registry
                .as_deref(),
            Some("10.0.0.1:5000")
        );
    }
}

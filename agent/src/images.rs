//! This host's content store for `rctl image ls --node` and `rctl image prune`
//! (`AgentApi.ListHostImages`, `AgentApi.PruneHostImages`).
//!
//! The store (`rudder_image::store`) holds manifests, configs and layer blobs by digest and
//! each layer unpacked once, shared by every image that lists it. An image is *in use* when a
//! container directory on this host records it (`<containers>/<task>/image`, written before
//! the rootfs is mounted and removed with the task's files), or when it was pulled within the
//! grace period (a pull touches its manifest; its container may not exist yet). A prune
//! removes every blob and unpacked layer no image in use needs.
//!
//! Invariants:
//! - a prune holds the store's GC lock: no pull runs meanwhile, so a layer a pull found
//!   present is never removed under it;
//! - an unpacked layer that any overlay mount on this host uses as a lower dir is never
//!   removed, whatever the container directories say;
//! - blobs and layer directories younger than the grace period stay;
//! - a layer directory is renamed away before it is deleted (`ImageStore::remove_layer`), so
//!   a half-deleted layer never looks complete.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rudder_image::oci::Manifest;
use rudder_image::usage::{self, ImageBlobs, StoredBlob};
use rudder_image::{ImageStore, Reference};
use rudder_proto::v1::{ImageSummary, ListImagesResponse, PruneResult};
use tracing::{info, warn};

use crate::task::ports::ImagePortError;

/// Blobs larger than this are layers, not manifests; they are not read to find out.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Blobs younger than this survive a prune unless the request says otherwise.
const DEFAULT_GRACE: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error("images: {doing} {path}: {source}")]
    Io {
        doing: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("images: {0}")]
    Store(#[from] rudder_image::ImageError),
    #[error("images: worker thread: {0}")]
    Join(String),
    #[error("images: a build or pull is using the content store; try again when it is done")]
    Busy,
}

/// How long a prune waits for the content store before giving up on this host.
const GC_LOCK_WAIT: Duration = Duration::from_secs(5);

fn io(doing: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImagesError {
    let path = path.to_path_buf();
    move |source| ImagesError::Io {
        doing,
        path,
        source,
    }
}

/// What the store and the container directories hold, read once.
#[derive(Debug, Default)]
pub struct Scan {
    pub blobs: Vec<StoredBlob>,
    /// Image manifests among the blobs, by digest.
    pub manifests: BTreeMap<String, Manifest>,
    /// Unpacked layers: directory name as a digest (a chain id; a blob digest in stores
    /// written before snapshots were keyed by chain id) → when the directory was put in place.
    pub layers: BTreeMap<String, SystemTime>,
    /// Manifest digest → the chain ids of its layers, bottom first (from its config's
    /// `rootfs.diff_ids`; absent when the config is missing or unreadable).
    pub chains: BTreeMap<String, Vec<String>>,
    /// Manifest digest → the tasks whose container directory records it, with the image
    /// reference each task's spec names.
    pub users: BTreeMap<String, Vec<(String, String)>>,
    /// Layers (digests) some overlay mount uses as a lower dir.
    pub mounted: BTreeSet<String>,
}

/// What a prune removes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub blobs: Vec<StoredBlob>,
    /// Manifests among `blobs`: the images removed.
    pub images: usize,
    pub layers: Vec<String>,
    /// Unreferenced blobs kept for their youth.
    pub kept_young: u64,
}

/// Decides what to remove: everything no in-use image needs, except young or mounted things.
pub fn plan(scan: &Scan, now: SystemTime, grace: Duration) -> Plan {
    let young = |t: SystemTime| now.duration_since(t).unwrap_or(Duration::ZERO) < grace;
    let mut roots: BTreeSet<&str> = scan.users.keys().map(String::as_str).collect();
    for b in &scan.blobs {
        if scan.manifests.contains_key(&b.digest) && young(b.modified) {
            roots.insert(&b.digest);
        }
    }
    let mut keep_blobs: BTreeSet<String> = BTreeSet::new();
    let mut keep_layers: BTreeSet<String> = scan.mounted.clone();
    for root in &roots {
        keep_blobs.insert(root.to_string());
        if let Some(m) = scan.manifests.get(*root) {
            keep_blobs.extend(m.blobs().map(|d| d.digest.clone()));
            // Directories of older stores are named by blob digest: kept while in use.
            keep_layers.extend(m.layers.iter().map(|d| d.digest.clone()));
            keep_layers.extend(scan.chains.get(*root).into_iter().flatten().cloned());
        }
    }
    let c = usage::collect(&scan.blobs, &keep_blobs, now, grace);
    Plan {
        images: c
            .remove
            .iter()
            .filter(|b| scan.manifests.contains_key(&b.digest))
            .count(),
        blobs: c.remove,
        layers: scan
            .layers
            .iter()
            .filter(|(d, t)| !keep_layers.contains(*d) && !young(**t))
            .map(|(d, _)| d.clone())
            .collect(),
        kept_young: c.young.len() as u64,
    }
}

/// Reads the store, the container directories and the mount table.
pub fn scan(store: &ImageStore, containers: &Path) -> Result<Scan, ImagesError> {
    let mut out = Scan::default();
    let blob_dir = store.root().join("blobs").join("sha256");
    for entry in std::fs::read_dir(&blob_dir).map_err(io("list", &blob_dir))? {
        let entry = entry.map_err(io("list", &blob_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let digest = format!("sha256:{name}");
        // Scratch files of a write in progress are not blobs yet.
        if rudder_image::digest::validate(&digest).is_err() {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if meta.len() <= MAX_MANIFEST_BYTES {
            if let Some(m) = read_manifest(&entry.path()) {
                out.manifests.insert(digest.clone(), m);
            }
        }
        out.blobs.push(StoredBlob {
            digest,
            size: meta.len(),
            modified: last_written(&meta),
        });
    }
    for (digest, m) in &out.manifests {
        let chain = store
            .read_blob(&m.config.digest)
            .ok()
            .and_then(|c| rudder_image::oci::diff_ids(&c).ok())
            .filter(|d| d.len() == m.layers.len())
            .and_then(|d| rudder_image::digest::chain_ids(&d).ok());
        if let Some(chain) = chain {
            out.chains.insert(digest.clone(), chain);
        }
    }
    let layer_dir = store.root().join("layers");
    for entry in std::fs::read_dir(&layer_dir).map_err(io("list", &layer_dir))? {
        let entry = entry.map_err(io("list", &layer_dir))?;
        let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
        if rudder_image::digest::validate(&digest).is_err() {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        out.layers.insert(digest, last_written(&meta));
    }
    if let Ok(entries) = std::fs::read_dir(containers) {
        for entry in entries.flatten() {
            let dir = crate::shim::ContainerDir::new(entry.path());
            let Ok(image) = std::fs::read_to_string(dir.image_file()) else {
                continue;
            };
            let (name, reference) = crate::task_record::task_of(&dir)
                .map(|t| (t.name(), t.spec.image.clone()))
                .unwrap_or_else(|| {
                    (
                        entry.file_name().to_string_lossy().into_owned(),
                        String::new(),
                    )
                });
            out.users
                .entry(image.trim().to_string())
                .or_default()
                .push((name, reference));
        }
    }
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(table) => out.mounted = mounted_layers(&table, &layer_dir),
        Err(err) => warn!(%err, "cannot read the mount table; relying on container directories"),
    }
    Ok(out)
}

/// The image manifest at `path`, if that blob is one. Layers (gzip, tar) are told by their
/// first byte, without reading them.
fn read_manifest(path: &Path) -> Option<Manifest> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut bytes = vec![0u8; 1];
    f.read_exact(&mut bytes).ok()?;
    if bytes[0] != b'{' {
        return None;
    }
    f.take(MAX_MANIFEST_BYTES).read_to_end(&mut bytes).ok()?;
    Manifest::parse(&bytes).ok()
}

/// The later of a file's mtime and ctime: a rename or a touch counts as a write.
fn last_written(meta: &std::fs::Metadata) -> SystemTime {
    let ctime = SystemTime::UNIX_EPOCH
        + Duration::new(
            meta.ctime().max(0) as u64,
            meta.ctime_nsec().clamp(0, 999_999_999) as u32,
        );
    meta.modified().map_or(ctime, |m| m.max(ctime))
}

/// Digests of the layers under `layer_dir` that a mount in `mountinfo` (the text of
/// `/proc/self/mountinfo`) uses as an overlayfs lower dir.
pub fn mounted_layers(mountinfo: &str, layer_dir: &Path) -> BTreeSet<String> {
    let mut roots = vec![layer_dir.to_path_buf()];
    if let Ok(c) = layer_dir.canonicalize() {
        roots.push(c);
    }
    let mut out = BTreeSet::new();
    for line in mountinfo.lines() {
        // `lowerdir=A:B` (the classic mount call) or one `lowerdir+=A` per layer (the new
        // mount API: `overlayfs`).
        let classic = line
            .match_indices("lowerdir=")
            .map(|(i, _)| i + "lowerdir=".len());
        let one_by_one = line
            .match_indices("lowerdir+=")
            .map(|(i, _)| i + "lowerdir+=".len());
        for start in classic.chain(one_by_one) {
            let rest = &line[start..];
            let value = rest.split([',', ' ']).next().unwrap_or_default();
            for dir in value.split(':') {
                let p = Path::new(dir);
                if roots.iter().any(|r| p.parent() == Some(r.as_path())) {
                    if let Some(name) = p.file_name() {
                        out.insert(format!("sha256:{}", name.to_string_lossy()));
                    }
                }
            }
        }
    }
    out
}

/// Bytes of the regular files under `dir` (hard links once).
fn tree_bytes(dir: &Path) -> u64 {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                todo.push(e.path());
            } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
                total += meta.len();
            }
        }
    }
    total
}

/// The host's images with their sizes (blobs as stored here) and unpacked bytes.
pub fn list(store: &ImageStore, containers: &Path) -> Result<ListImagesResponse, ImagesError> {
    let scan = scan(store, containers)?;
    let sizes: HashMap<&str, u64> = scan
        .blobs
        .iter()
        .map(|b| (b.digest.as_str(), b.size))
        .collect();
    let images: Vec<ImageBlobs> = scan
        .manifests
        .iter()
        .map(|(id, m)| ImageBlobs {
            id: id.clone(),
            blobs: m
                .blobs()
                .map(|d| {
                    (
                        d.digest.clone(),
                        sizes.get(d.digest.as_str()).copied().unwrap_or(0),
                    )
                })
                .collect(),
        })
        .collect();
    let per_image = usage::usage(&images);
    let keep: BTreeSet<String> = scan.manifests.keys().cloned().collect();
    let totals = usage::totals(&images, &scan.blobs, &keep);
    let unpacked: HashMap<&str, u64> = scan
        .layers
        .keys()
        .map(|d| (d.as_str(), tree_bytes(&store.layer_dir(d))))
        .collect();
    let mut rows = Vec::new();
    for (digest, m) in &scan.manifests {
        let u = per_image.get(digest).copied().unwrap_or_default();
        let created = store
            .read_blob(&m.config.digest)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("created")?.as_str().map(str::to_string))
            .unwrap_or_default();
        let row = |repository: String, tag: String, tasks: Vec<String>| ImageSummary {
            repository,
            tag,
            digest: digest.clone(),
            created: created.clone(),
            size: u.size,
            shared: u.shared,
            unique: u.unique,
            unpacked: match scan.chains.get(digest) {
                Some(chain) => chain
                    .iter()
                    .zip(&m.layers)
                    .filter_map(|(c, l)| {
                        unpacked
                            .get(c.as_str())
                            .or_else(|| unpacked.get(l.digest.as_str()))
                    })
                    .sum(),
                None => m
                    .layers
                    .iter()
                    .filter_map(|l| unpacked.get(l.digest.as_str()))
                    .sum(),
            },
            tasks,
        };
        // One row per reference the host's tasks run it as; one unnamed row when none does.
        let mut by_ref: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for (task, reference) in scan.users.get(digest).into_iter().flatten() {
            let name = Reference::parse(reference)
                .map(|r| (r.repository, r.tag.unwrap_or_default()))
                .unwrap_or_default();
            by_ref.entry(name).or_default().push(task.clone());
        }
        if by_ref.is_empty() {
            rows.push(row(String::new(), String::new(), vec![]));
        }
        for ((repo, tag), tasks) in by_ref {
            rows.push(row(repo, tag, tasks));
        }
    }
    let plan = plan(&scan, SystemTime::now(), Duration::ZERO);
    let reclaimable = plan.blobs.iter().map(|b| b.size).sum::<u64>()
        + plan
            .layers
            .iter()
            .filter_map(|d| unpacked.get(d.as_str()))
            .sum::<u64>();
    Ok(ListImagesResponse {
        images: rows,
        place: String::new(),
        image_count: totals.images,
        blobs: totals.blobs,
        disk_bytes: totals.disk_bytes,
        undeduplicated_bytes: totals.undeduplicated_bytes,
        reclaimable_bytes: reclaimable,
        layers: scan.layers.len() as u64,
        unpacked_bytes: unpacked.values().sum(),
    })
}

/// Removes what no image in use needs (see the module doc); `grace_ms` absent: 10 minutes.
pub async fn prune(
    store: &ImageStore,
    containers: &Path,
    grace_ms: Option<u64>,
) -> Result<PruneResult, ImagesError> {
    let grace = grace_ms.map_or(DEFAULT_GRACE, Duration::from_millis);
    // A build holds the store for all its steps; waiting for it would also hold back every
    // pull (and so every container start) queued behind this collection. Give up instead.
    let Ok(_gc) = tokio::time::timeout(GC_LOCK_WAIT, store.lock_for_gc()).await else {
        return Err(ImagesError::Busy);
    };
    let (store, containers) = (store.clone(), containers.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let scan = scan(&store, &containers)?;
        let plan = plan(&scan, SystemTime::now(), grace);
        let mut result = PruneResult {
            images: plan.images as u64,
            kept_young: plan.kept_young,
            ..Default::default()
        };
        for b in &plan.blobs {
            let path = store.blob_path(&b.digest)?;
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    result.blobs += 1;
                    result.bytes += b.size;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &path)(e)),
            }
        }
        for d in &plan.layers {
            let bytes = tree_bytes(&store.layer_dir(d));
            if store.remove_layer(d)? {
                result.layers += 1;
                result.bytes += bytes;
            }
        }
        info!(
            images = result.images,
            blobs = result.blobs,
            layers = result.layers,
            bytes = result.bytes,
            "content store pruned"
        );
        Ok(result)
    })
    .await
    .map_err(|e| ImagesError::Join(e.to_string()))?
}

/// The task port [`crate::task::ports::ImageStore`] over this host's content store and the
/// cluster registry: pulls what is missing, with this node's certificate when there is one.
pub struct RegistryImageStore {
    pub store: ImageStore,
    /// Registry `host:port`, learned from the controller's welcome.
    pub registry: Arc<Mutex<String>>,
    /// This node's certificate (the latest) for the registry's mutual TLS; plain HTTP when
    /// `None`.
    pub tls: Option<tokio::sync::watch::Receiver<rudder_pki::tls::NodeCerts>>,
    /// The last client made, with the registry and certificate it was made for: its
    /// connections stay open between pulls, so a task start costs a request, not a mutual-TLS
    /// handshake. Replaced when the registry moves or the certificate is renewed.
    pub client: Mutex<Option<CachedClient>>,
}

/// A registry client and what it was made for.
pub struct CachedClient {
    registry: String,
    cert_pem: String,
    client: rudder_image::RegistryClient,
}

impl RegistryImageStore {
    /// A store pulling from `registry` with `tls`; no client made yet.
    pub fn new(
        store: ImageStore,
        registry: Arc<Mutex<String>>,
        tls: Option<tokio::sync::watch::Receiver<rudder_pki::tls::NodeCerts>>,
    ) -> Self {
        RegistryImageStore {
            store,
            registry,
            tls,
            client: Mutex::new(None),
        }
    }

    /// The client for the current registry and certificate, made only when either changed.
    fn client(&self) -> Result<rudder_image::RegistryClient, String> {
        let registry = self.registry.lock().expect("registry lock").clone();
        let cert_pem = self
            .tls
            .as_ref()
            .map(|t| t.borrow().cert_pem().to_string())
            .unwrap_or_default();
        let mut cached = self.client.lock().expect("client lock");
        if let Some(c) = cached.as_ref() {
            if c.registry == registry && c.cert_pem == cert_pem {
                return Ok(c.client.clone());
            }
        }
        let client = crate::worker::registry_client(&registry, &self.tls)?;
        *cached = Some(CachedClient {
            registry,
            cert_pem,
            client: client.clone(),
        });
        Ok(client)
    }
}

#[async_trait::async_trait]
impl crate::task::ports::ImageStore for RegistryImageStore {
    async fn pull(&self, image: &str) -> Result<crate::task::ports::Image, ImagePortError> {
        let reference =
            Reference::parse(image).map_err(|e| ImagePortError::Reference(e.to_string()))?;
        let client = self.client().map_err(ImagePortError::Client)?;
        let pulled = self.store.pull(&client, &reference).await?;
        Ok(crate::task::ports::Image {
            manifest_digest: pulled.manifest_digest,
            layers: pulled.layers,
            config: pulled.config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_image::oci::Descriptor;

    fn desc(digest: &str) -> Descriptor {
        serde_json::from_value(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": 1
        }))
        .unwrap()
    }

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn manifest(config: &str, layers: &[&str]) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: None,
            config: desc(config),
            layers: layers.iter().map(|l| desc(l)).collect(),
            annotations: None,
        }
    }

    #[test]
    fn keeps_the_chain_id_snapshots_of_images_in_use() {
        let now = SystemTime::now();
        let old = now - Duration::from_secs(3600);
        // An image whose one layer b appears twice: two snapshots by chain id; a directory
        // named by the blob digest (an older store) is kept too while the image is in use.
        let (m, c, b) = (d('1'), d('c'), d('b'));
        let chain = rudder_image::digest::chain_ids(&[d('f'), d('f')]).unwrap();
        let mut scan = Scan::default();
        scan.manifests.insert(m.clone(), manifest(&c, &[&b, &b]));
        scan.chains.insert(m.clone(), chain.clone());
        for l in [&chain[0], &chain[1], &b, &d('9')] {
            scan.layers.insert(l.clone(), old);
        }
        scan.users
            .insert(m.clone(), vec![("web.1".into(), "box:v1".into())]);
        let p = plan(&scan, now, Duration::from_secs(60));
        assert_eq!(p.layers, vec![d('9')]);
        scan.users.clear();
        let p = plan(&scan, now, Duration::ZERO);
        assert_eq!(p.layers.len(), 4, "unused: every snapshot goes");
    }

    #[test]
    fn keeps_what_images_in_use_need() {
        let now = SystemTime::now();
        let old = now - Duration::from_secs(3600);
        // Image 1 (in use) and image 2 (not) share layer b; image 2 alone has layer e.
        let (m1, c1, b, m2, c2, e) = (d('1'), d('c'), d('b'), d('2'), d('d'), d('e'));
        let mut scan = Scan::default();
        scan.manifests.insert(m1.clone(), manifest(&c1, &[&b]));
        scan.manifests.insert(m2.clone(), manifest(&c2, &[&b, &e]));
        for (digest, size) in [(&m1, 1), (&c1, 2), (&b, 30), (&m2, 4), (&c2, 5), (&e, 60)] {
            scan.blobs.push(StoredBlob {
                digest: digest.clone(),
                size,
                modified: old,
            });
        }
        scan.layers.insert(b.clone(), old);
        scan.layers.insert(e.clone(), old);
        scan.users
            .insert(m1.clone(), vec![("web.1".into(), "box:v1".into())]);
        let p = plan(&scan, now, Duration::from_secs(60));
        let names: Vec<&str> = p.blobs.iter().map(|b| b.digest.as_str()).collect();
        assert_eq!(names, [m2.as_str(), c2.as_str(), e.as_str()]);
        assert_eq!(p.images, 1);
        assert_eq!(p.layers, vec![e.clone()]);

        // A mounted layer stays whatever the container directories say.
        scan.mounted.insert(e.clone());
        assert!(plan(&scan, now, Duration::from_secs(60)).layers.is_empty());
        scan.mounted.clear();

        // An image pulled within the grace period (its manifest touched) is in use.
        scan.blobs[3].modified = now;
        let p = plan(&scan, now, Duration::from_secs(60));
        assert!(p.blobs.is_empty(), "{p:?}");
        assert!(p.layers.is_empty());

        // Nothing in use and no grace: everything goes.
        scan.users.clear();
        let p = plan(&scan, now, Duration::ZERO);
        assert_eq!(p.blobs.len(), 6);
        assert_eq!(p.images, 2);
        assert_eq!(p.layers.len(), 2);
    }

    #[test]
    fn lower_dirs_of_overlay_mounts() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let table = format!(
            "36 35 98:0 / /mnt rw - ext4 /dev/root rw\n\
             99 28 0:52 / /data/containers/t1/rootfs rw,relatime - overlay overlay \
             rw,lowerdir=/data/images/layers/{b}:/data/images/layers/{a},upperdir=/data/c/upper,workdir=/data/c/work\n\
             100 28 0:53 / /other rw - overlay overlay rw,lowerdir=/elsewhere/layers/{a}\n"
        );
        let found = mounted_layers(&table, Path::new("/data/images/layers"));
        assert_eq!(found, [format!("sha256:{a}"), format!("sha256:{b}")].into());
    }

    #[test]
    fn lower_dirs_given_one_by_one() {
        let (a, b, c) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        let table = format!(
            "46 27 0:39 / /data/builds/x/rootfs rw,relatime - overlay none \
             rw,lowerdir+=/data/images/layers/{c},lowerdir+=/data/images/layers/{b},upperdir=/u,workdir=/w,uuid=on\n\
             47 27 0:40 / /y rw - overlay none rw,lowerdir+=/elsewhere/layers/{a}\n"
        );
        let found = mounted_layers(&table, Path::new("/data/images/layers"));
        assert_eq!(found, [format!("sha256:{b}"), format!("sha256:{c}")].into());
    }
}

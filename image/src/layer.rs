//! Unpacking one image layer into a directory that overlayfs can use as a lower dir.
//!
//! Invariants:
//! - nothing is ever written outside the destination: entry paths are made relative (a leading
//!   `/` is stripped), `..` is refused, and no write goes through a symlink — every parent
//!   directory of an entry (and of a hard link's source) must be a real directory inside the
//!   layer, and existing files are removed, never opened, before being replaced;
//! - OCI whiteouts become overlayfs whiteouts: `.wh.NAME` is a 0:0 character device `NAME`, and
//!   `.wh..wh..opq` marks its directory opaque with the `trusted.overlay.opaque=y` xattr. The
//!   hidden `NAME` must be one plain name (not empty, `.` or `..`): `.wh...` would otherwise
//!   whiteout — remove — the parent of the layer directory, so such a layer is refused;
//! - modes, numeric ownership (when running as root), mtimes, symlinks, hard links, device nodes
//!   and `SCHILY.xattr.*` extended attributes are preserved, except the xattrs only the kernel
//!   or the host should set: `trusted.*` (overlayfs' own `trusted.overlay.*` would steer the
//!   overlay mount: opaque dirs, redirects, metacopy) and `security.*` other than
//!   `security.capability` (file capabilities). Directory metadata is applied last, since
//!   creating their children would change their mtimes;
//! - a layer is held to [`LayerLimits`]: the decompressed tar stream (gzip and zstd bombs) and
//!   the sum of its files' sizes (a GNU sparse file counts its full size, checked from its
//!   header before anything is written) may not exceed `max_bytes`, and no file is written that
//!   would leave less than `min_free` bytes free. Sparse files are written with holes.
//!
//! The compression of a layer blob is detected from its first bytes, not its media type: gzip,
//! zstd (every frame of the stream) and plain tar.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use flate2::read::MultiGzDecoder;
use tar::EntryType;
use tracing::{debug, warn};

use crate::{ImageError, Result};

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
/// Prefix of aufs bookkeeping entries (`.wh..wh.plnk` etc.), which carry no meaning for us.
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";
/// The one `security.*` xattr a layer may carry: file capabilities (`setcap` binaries).
const CAPABILITY_XATTR: &str = "security.capability";

/// Default for [`LayerLimits::max_bytes`]: 16 GiB, far above any real layer (base images are
/// tens to hundreds of MiB; the largest common ones, CUDA and ML stacks, a few GiB).
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 16 << 30;
/// Default for [`LayerLimits::min_free`]: what an unpack leaves free on the store's filesystem.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 512 << 20;

/// How far one layer may expand when unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLimits {
    /// Most bytes the layer's uncompressed tar stream may have, and, separately, most bytes its
    /// files may add up to (a sparse file counted at its full size: whatever reads it later —
    /// a commit, `rctl cp`, an export — reads that many bytes).
    pub max_bytes: u64,
    /// Bytes that must stay free on the destination's filesystem after each file is written.
    pub min_free: u64,
}

impl Default for LayerLimits {
    fn default() -> Self {
        LayerLimits {
            max_bytes: DEFAULT_MAX_LAYER_BYTES,
            min_free: DEFAULT_MIN_FREE_BYTES,
        }
    }
}

/// How a blob is compressed, from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`1f 8b`).
    Gzip,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

impl Compression {
    /// The compression of a blob that starts with `head` (a few bytes suffice).
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// Detects the compression of a file from its first bytes.
    pub fn of_file(path: &Path) -> Result<Compression> {
        let mut head = [0u8; 4];
        let mut file = fs::File::open(path).map_err(|e| ImageError::io_path("open", path, e))?;
        let mut n = 0;
        while n < head.len() {
            match file.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ImageError::io_path("read", path, e)),
            }
        }
        Ok(Compression::detect(&head[..n]))
    }
}

/// Wraps a reader so that it yields the uncompressed tar stream, whatever the compression.
pub fn decompressed<'a>(reader: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
    let mut buffered = BufReader::with_capacity(256 << 10, reader);
    let head = buffered
        .fill_buf()
        .map_err(|e| ImageError::io("read layer", e))?;
    match Compression::detect(head) {
        Compression::None => Ok(Box::new(buffered)),
        Compression::Gzip => Ok(Box::new(MultiGzDecoder::new(buffered))),
        Compression::Zstd => Ok(Box::new(
            zstd::stream::read::Decoder::with_buffer(buffered)
                .map_err(|e| ImageError::io("start zstd decoding", e))?,
        )),
    }
}

/// Unpacks a layer blob file (gzip, zstd or plain tar) into `dest`, which must exist, within
/// the default [`LayerLimits`].
pub fn unpack_file(blob: &Path, dest: &Path) -> Result<()> {
    let name = blob.display().to_string();
    unpack_file_limited(blob, dest, &name, &LayerLimits::default())
}

/// [`unpack_file`] within `limits`; `layer` names the layer (its digest) in errors.
pub fn unpack_file_limited(
    blob: &Path,
    dest: &Path,
    layer: &str,
    limits: &LayerLimits,
) -> Result<()> {
    let file = fs::File::open(blob).map_err(|e| ImageError::io_path("open layer", blob, e))?;
    unpack_limited(decompressed(file)?, dest, layer, limits)
}

/// Metadata applied to a directory once all entries are written.
struct DirMeta {
    rel: PathBuf,
    mode: u32,
    owner: Option<(u32, u32)>,
    mtime: u64,
}

/// Unpacks an uncompressed tar stream into `dest`, which must exist, within the default
/// [`LayerLimits`].
pub fn unpack(reader: impl Read, dest: &Path) -> Result<()> {
    unpack_limited(reader, dest, "layer", &LayerLimits::default())
}

/// Unpacks an uncompressed tar stream into `dest`, which must exist, within `limits`; `layer`
/// names the layer (its digest) in errors.
pub fn unpack_limited(
    reader: impl Read,
    dest: &Path,
    layer: &str,
    limits: &LayerLimits,
) -> Result<()> {
    let over = Rc::new(Cell::new(false));
    let counted = Counted {
        inner: reader,
        read: 0,
        max: limits.max_bytes,
        over: over.clone(),
    };
    let mut unpacker = Unpacker {
        dest,
        layer,
        limits,
        expanded: 0,
        as_root: is_root(),
        known_dirs: HashSet::new(),
        dirs: Vec::new(),
    };
    let result = (|| -> Result<()> {
        let mut archive = tar::Archive::new(counted);
        let entries = archive
            .entries()
            .map_err(|e| ImageError::io("read layer", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io("read layer entry", e))?;
            unpacker.entry(entry)?;
        }
        Ok(())
    })();
    // Whatever error the cut-off stream caused (a short read, a broken entry), the reason is
    // the limit.
    if over.get() {
        return Err(ImageError::LayerRefused {
            layer: layer.to_string(),
            reason: format!(
                "it decompresses to more than {} (the content store's limit per layer)",
                human(limits.max_bytes)
            ),
        });
    }
    result?;
    unpacker.finish_dirs()
}

/// Counts the bytes of the uncompressed stream and fails the read that goes past `max`.
struct Counted<R> {
    inner: R,
    read: u64,
    max: u64,
    over: Rc<Cell<bool>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Never ask for more than one byte past the limit.
        let room = self.max.saturating_sub(self.read).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.read += n as u64;
        if self.read > self.max {
            self.over.set(true);
            return Err(io::Error::other("layer stream exceeds its size limit"));
        }
        Ok(n)
    }
}

/// `16 GiB`, `512 MiB`, or plain bytes when not a whole number of either.
fn human(n: u64) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

struct Unpacker<'a> {
    dest: &'a Path,
    /// The layer's name (digest) for errors.
    layer: &'a str,
    limits: &'a LayerLimits,
    /// Sum of the sizes of the files written so far (sparse files at their full size).
    expanded: u64,
    /// Ownership is only applied as root; unprivileged unpacking (tests, tools) keeps ours.
    as_root: bool,
    /// Relative paths verified (or created) as real directories, to spare an lstat per
    /// component per entry. Invalidated when a directory is replaced.
    known_dirs: HashSet<PathBuf>,
    dirs: Vec<DirMeta>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let raw = entry
            .path()
            .map_err(|e| ImageError::io("read layer entry path", e))?
            .into_owned();
        let rel = sanitize(&raw)?;
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let mtime = header.mtime().unwrap_or(0);
        let owner = match (header.uid(), header.gid()) {
            (Ok(uid), Ok(gid)) => Some((id32(uid, &raw)?, id32(gid, &raw)?)),
            _ => None,
        };
        let owner = owner.filter(|_| self.as_root);

        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }

        if rel.as_os_str().is_empty() {
            // The layer root itself ("./"): only its metadata matters.
            if kind == EntryType::Directory {
                self.dirs.push(DirMeta {
                    rel,
                    mode,
                    owner,
                    mtime,
                });
            }
            return Ok(());
        }

        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let name = rel
            .file_name()
            .expect("non-empty sanitized path has a name");
        let name_str = name.to_string_lossy();

        if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
            self.ensure_dir(&parent_rel, &raw)?;
            let parent = self.dest.join(&parent_rel);
            if name_str == WHITEOUT_OPAQUE {
                set_xattr(&parent, OPAQUE_XATTR, b"y")?;
            } else if name_str.starts_with(WHITEOUT_META_PREFIX) {
                debug!(path = %raw.display(), "skipping aufs metadata entry");
            } else {
                let target_rel = whiteout_target(&parent_rel, hidden, &raw)?;
                self.remove_existing(&target_rel)?;
                let target = self.dest.join(&target_rel);
                mknod(&target, libc::S_IFCHR, 0, 0, 0)?;
                if let Some((uid, gid)) = owner {
                    lchown(&target, uid, gid)?;
                }
            }
            return Ok(());
        }

        self.ensure_dir(&parent_rel, &raw)?;
        let target = self.dest.join(&rel);
        let xattrs = pax_xattrs(&mut entry)?;

        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        self.remove_existing(&rel)?;
                        mkdir(&target)?;
                    }
                    Err(_) => mkdir(&target)?,
                }
                self.known_dirs.insert(rel.clone());
                apply_xattrs(&target, &xattrs);
                self.dirs.push(DirMeta {
                    rel,
                    mode,
                    owner,
                    mtime,
                });
                return Ok(());
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let sparse = kind == EntryType::GNUSparse;
                // For a sparse entry `size` is the real (expanded) size, from its header; only
                // `entry_size` bytes of data are in the archive.
                let size = entry.size();
                let stored = if sparse {
                    header.entry_size().unwrap_or(size)
                } else {
                    size
                };
                self.charge(&raw, size, stored)?;
                self.remove_existing(&rel)?;
                if sparse {
                    if entry.path_bytes().ends_with(b"/") {
                        return Err(unsafe_entry(&raw, "a sparse file named like a directory"));
                    }
                    // The tar crate seeks over the holes instead of writing zeros.
                    entry
                        .unpack(&target)
                        .map_err(|e| ImageError::io_path("write", &target, e))?;
                } else {
                    let mut file = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&target)
                        .map_err(|e| ImageError::io_path("create", &target, e))?;
                    io::copy(&mut entry, &mut file)
                        .map_err(|e| ImageError::io_path("write", &target, e))?;
                }
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| ImageError::io("read symlink target", e))?
                    .ok_or_else(|| unsafe_entry(&raw, "symlink without a target"))?;
                self.remove_existing(&rel)?;
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(|e| ImageError::io_path("create symlink", &target, e))?;
                if let Some((uid, gid)) = owner {
                    lchown(&target, uid, gid)?;
                }
                set_mtime(&target, mtime)?;
                return Ok(());
            }
            EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| ImageError::io("read hard link target", e))?
                    .ok_or_else(|| unsafe_entry(&raw, "hard link without a target"))?
                    .into_owned();
                let source_rel = sanitize(&link)?;
                if source_rel.as_os_str().is_empty() {
                    return Err(unsafe_entry(&raw, "hard link to the layer root"));
                }
                // The source must be reached through real directories only, or the link could
                // pull a host file into the layer.
                self.check_dir(source_rel.parent().unwrap_or(Path::new("")), &raw)?;
                let source = self.dest.join(&source_rel);
                match fs::symlink_metadata(&source) {
                    Ok(meta) if !meta.is_dir() => {}
                    _ => {
                        return Err(unsafe_entry(
                            &raw,
                            "hard link source is missing or a directory",
                        ))
                    }
                }
                if source_rel == rel {
                    return Ok(());
                }
                self.remove_existing(&rel)?;
                fs::hard_link(&source, &target)
                    .map_err(|e| ImageError::io_path("create hard link", &target, e))?;
                // A hard link shares its inode: metadata came with the source entry.
                return Ok(());
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let file_type = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                self.remove_existing(&rel)?;
                mknod(&target, file_type, mode, major, minor)?;
            }
            other => {
                debug!(path = %raw.display(), kind = ?other, "skipping unsupported tar entry type");
                return Ok(());
            }
        }

        // Order matters: chown clears setuid bits and file capabilities, so mode and xattrs
        // come after it.
        if let Some((uid, gid)) = owner {
            lchown(&target, uid, gid)?;
        }
        fs::set_permissions(&target, fs::Permissions::from_mode(mode))
            .map_err(|e| ImageError::io_path("chmod", &target, e))?;
        apply_xattrs(&target, &xattrs);
        set_mtime(&target, mtime)
    }

    /// Counts a file of `size` bytes (`stored` of them real data) against the layer's limits,
    /// before it is written.
    fn charge(&mut self, raw: &Path, size: u64, stored: u64) -> Result<()> {
        self.expanded = self.expanded.saturating_add(size);
        if self.expanded > self.limits.max_bytes {
            return Err(ImageError::LayerRefused {
                layer: self.layer.to_string(),
                reason: format!(
                    "its files add up to more than {} (the content store's limit per layer) \
                     at {:?} ({size} bytes)",
                    human(self.limits.max_bytes),
                    raw.display().to_string()
                ),
            });
        }
        if stored > 0 {
            let free = free_bytes(self.dest)?;
            if free < stored.saturating_add(self.limits.min_free) {
                return Err(ImageError::LayerRefused {
                    layer: self.layer.to_string(),
                    reason: format!(
                        "writing {:?} ({stored} bytes) would leave less than {} free on {} \
                         ({free} bytes free)",
                        raw.display().to_string(),
                        human(self.limits.min_free),
                        self.dest.display()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Makes sure `rel` is a real directory under dest, creating missing components; refuses
    /// a component that is a symlink or another non-directory.
    fn ensure_dir(&mut self, rel: &Path, raw: &Path) -> Result<()> {
        self.walk_dirs(rel, raw, true)
    }

    /// Like `ensure_dir` but never creates anything.
    fn check_dir(&mut self, rel: &Path, raw: &Path) -> Result<()> {
        self.walk_dirs(rel, raw, false)
    }

    fn walk_dirs(&mut self, rel: &Path, raw: &Path, create: bool) -> Result<()> {
        if rel.as_os_str().is_empty() || self.known_dirs.contains(rel) {
            return Ok(());
        }
        let mut cur = PathBuf::new();
        for component in rel.components() {
            cur.push(component);
            if self.known_dirs.contains(&cur) {
                continue;
            }
            let path = self.dest.join(&cur);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(unsafe_entry(
                        raw,
                        &format!("{} is a symlink", cur.display()),
                    ))
                }
                Ok(_) => {
                    return Err(unsafe_entry(
                        raw,
                        &format!("{} is not a directory", cur.display()),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => mkdir(&path)?,
                Err(e) => return Err(ImageError::io_path("stat", &path, e)),
            }
            self.known_dirs.insert(cur.clone());
        }
        Ok(())
    }

    /// Removes whatever exists at `rel` (a directory with its contents), so that the new entry
    /// is created fresh and never written through an old symlink.
    fn remove_existing(&mut self, rel: &Path) -> Result<()> {
        let path = self.dest.join(rel);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                fs::remove_dir_all(&path).map_err(|e| ImageError::io_path("remove", &path, e))?;
                self.known_dirs.retain(|d| !d.starts_with(rel));
                Ok(())
            }
            Ok(_) => fs::remove_file(&path).map_err(|e| ImageError::io_path("remove", &path, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io_path("stat", &path, e)),
        }
    }

    /// Applies directory metadata, deepest first, to directories that are still directories.
    fn finish_dirs(mut self) -> Result<()> {
        self.dirs
            .sort_by_key(|d| std::cmp::Reverse(d.rel.components().count()));
        for dir in &self.dirs {
            let path = self.dest.join(&dir.rel);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                _ => continue, // replaced by a later entry
            }
            if let Some((uid, gid)) = dir.owner {
                lchown(&path, uid, gid)?;
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(dir.mode))
                .map_err(|e| ImageError::io_path("chmod", &path, e))?;
            set_mtime(&path, dir.mtime)?;
        }
        Ok(())
    }
}

/// Makes an entry path relative to the layer root: strips `/` and `.`, refuses `..`.
fn sanitize(path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return Err(unsafe_entry(path, "path contains '..'")),
            Component::Normal(name) => out.push(name),
        }
    }
    Ok(out)
}

/// Where the whiteout `.wh.HIDDEN` in `parent_rel` points: `HIDDEN` must be one plain name, and
/// the result goes through [`sanitize`] like any entry path.
fn whiteout_target(parent_rel: &Path, hidden: &str, raw: &Path) -> Result<PathBuf> {
    if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
        return Err(unsafe_entry(
            raw,
            &format!("whiteout of {hidden:?}, which is not a plain name"),
        ));
    }
    let target = sanitize(&parent_rel.join(hidden))?;
    if target.parent() != Some(parent_rel) || target.file_name() != Some(OsStr::new(hidden)) {
        return Err(unsafe_entry(
            raw,
            "whiteout points outside its own directory",
        ));
    }
    Ok(target)
}

/// Bytes available to us on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Result<u64> {
    let c = cpath(path)?;
    // SAFETY: an all-zero statvfs is a valid value for the kernel to fill in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path, `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(ImageError::io_path(
            "statvfs",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Whether a layer may set this extended attribute: not `trusted.*` (overlayfs reads its own
/// `trusted.overlay.*` from lower dirs) and no `security.*` but file capabilities.
fn xattr_allowed(name: &str) -> bool {
    if name.starts_with("trusted.") {
        return false;
    }
    if name.starts_with("security.") {
        return name == CAPABILITY_XATTR;
    }
    true
}

fn unsafe_entry(path: &Path, reason: &str) -> ImageError {
    ImageError::UnsafeEntry {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn id32(id: u64, raw: &Path) -> Result<u32> {
    u32::try_from(id).map_err(|_| unsafe_entry(raw, "uid/gid out of range"))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn mkdir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(path)
        .map_err(|e| ImageError::io_path("create directory", path, e))
}

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| unsafe_entry(path, "path contains a NUL byte"))
}

fn mknod(path: &Path, file_type: libc::mode_t, mode: u32, major: u32, minor: u32) -> Result<()> {
    let c = cpath(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), file_type | (mode & 0o7777), dev) };
    if rc != 0 {
        return Err(ImageError::io_path(
            "mknod",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn lchown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| ImageError::io_path("chown", path, e))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let c = cpath(path)?;
    let cname = CString::new(name).map_err(|_| unsafe_entry(path, "xattr name contains NUL"))?;
    // SAFETY: both strings are NUL-terminated and live across the call; value points to
    // value.len() readable bytes.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(ImageError::io_path(
            &format!("set xattr {name} on"),
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Sets atime and mtime without following a symlink.
fn set_mtime(path: &Path, mtime: u64) -> Result<()> {
    let c = cpath(path)?;
    let secs = libc::time_t::try_from(mtime).unwrap_or(libc::time_t::MAX);
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: `c` is a valid path, `times` is an array of two timespecs as utimensat expects.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(ImageError::io_path(
            "set mtime of",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| ImageError::io("read pax headers", e))?
    else {
        return Ok(out);
    };
    for ext in exts {
        let ext = ext.map_err(|e| ImageError::io("read pax headers", e))?;
        if let Ok(key) = ext.key() {
            if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                if xattr_allowed(name) {
                    out.push((name.to_string(), ext.value_bytes().to_vec()));
                } else {
                    debug!(xattr = name, "dropping a layer xattr only the host may set");
                }
            }
        }
    }
    Ok(out)
}

/// Extended attributes are best effort: a filesystem without xattr support must not make a
/// whole image unusable, but losing e.g. a file capability is worth a warning.
fn apply_xattrs(path: &Path, xattrs: &[(String, Vec<u8>)]) {
    for (name, value) in xattrs {
        if let Err(err) = set_xattr(path, name, value) {
            warn!(%err, "could not restore extended attribute");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn header(kind: EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    }

    fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
        let mut h = header(EntryType::Regular, mode, data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, mtime: u64) {
        let mut h = header(EntryType::Directory, mode, 0);
        h.set_mtime(mtime);
        b.append_data(&mut h, path, io::empty()).unwrap();
    }

    fn add_link(b: &mut tar::Builder<Vec<u8>>, kind: EntryType, path: &str, target: &str) {
        let mut h = header(kind, 0o777, 0);
        b.append_link(&mut h, path, target).unwrap();
    }

    /// An entry whose raw name is written as-is (the builder refuses `..`, attackers don't).
    fn add_raw(b: &mut tar::Builder<Vec<u8>>, kind: EntryType, name: &str, link: &str) {
        add_raw_data(b, kind, name, link, b"");
    }

    fn add_raw_data(
        b: &mut tar::Builder<Vec<u8>>,
        kind: EntryType,
        name: &str,
        link: &str,
        data: &[u8],
    ) {
        let mut h = header(kind, 0o644, data.len() as u64);
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn sample_layer() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        add_dir(&mut b, "./", 0o755, 1_000);
        add_dir(&mut b, "etc", 0o750, 1_000);
        let mut h = header(EntryType::Regular, 0o640, 2);
        h.set_uid(1234);
        h.set_gid(4321);
        b.append_data(&mut h, "etc/hello", &b"hi"[..]).unwrap();
        add_link(&mut b, EntryType::Symlink, "etc/link", "hello");
        add_link(&mut b, EntryType::Symlink, "etc/abs", "/etc/passwd");
        add_link(&mut b, EntryType::Link, "etc/hard", "etc/hello");
        add_file(&mut b, "etc/.wh.gone", b"", 0o644);
        add_file(&mut b, "opaque/.wh..wh..opq", b"", 0o644);
        add_file(&mut b, "opaque/kept", b"k", 0o644);
        add_file(&mut b, "bin/su", b"#!", 0o4755);
        add_raw_data(&mut b, EntryType::Regular, "/abs/file", "", b"a");
        let mut h = header(EntryType::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        b.append_data(&mut h, "dev/null", io::empty()).unwrap();
        // A later entry replaces an earlier one.
        add_file(&mut b, "etc/replaced", b"old", 0o644);
        add_link(&mut b, EntryType::Symlink, "etc/replaced", "hello");
        b.into_inner().unwrap()
    }

    fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let c = cpath(path).unwrap();
        let n = CString::new(name).unwrap();
        let mut buf = [0u8; 64];
        // SAFETY: valid C strings; buf has buf.len() writable bytes.
        let rc =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        (rc >= 0).then(|| buf[..rc as usize].to_vec())
    }

    fn check_sample(dest: &Path) {
        let hello = dest.join("etc/hello");
        let meta = fs::symlink_metadata(&hello).unwrap();
        assert_eq!(fs::read(&hello).unwrap(), b"hi");
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
        assert_eq!(meta.mtime(), 1_600_000_000);

        assert_eq!(
            fs::read_link(dest.join("etc/link")).unwrap(),
            Path::new("hello")
        );
        // Absolute symlink targets are kept verbatim: they resolve inside the container.
        assert_eq!(
            fs::read_link(dest.join("etc/abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        let hard = fs::metadata(dest.join("etc/hard")).unwrap();
        assert_eq!(hard.ino(), meta.ino(), "hard link shares the inode");

        let gone = fs::symlink_metadata(dest.join("etc/gone")).unwrap();
        assert!(
            gone.file_type().is_char_device(),
            "whiteout is a char device"
        );
        assert_eq!(gone.rdev(), 0, "whiteout is 0:0");
        assert!(!dest.join("etc/.wh.gone").exists());

        assert_eq!(
            get_xattr(&dest.join("opaque"), OPAQUE_XATTR).as_deref(),
            Some(&b"y"[..])
        );
        assert!(!dest.join("opaque/.wh..wh..opq").exists());
        assert!(dest.join("opaque/kept").is_file());

        assert_eq!(
            fs::metadata(dest.join("bin/su")).unwrap().mode() & 0o7777,
            0o4755
        );
        assert_eq!(fs::read(dest.join("abs/file")).unwrap(), b"a");
        let null = fs::metadata(dest.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), libc::makedev(1, 3));
        assert!(fs::symlink_metadata(dest.join("etc/replaced"))
            .unwrap()
            .file_type()
            .is_symlink());

        // Directory metadata is applied after the children were written.
        let etc = fs::metadata(dest.join("etc")).unwrap();
        assert_eq!(etc.mode() & 0o7777, 0o750);
        assert_eq!(etc.mtime(), 1_000);
        assert_eq!(fs::metadata(dest).unwrap().mtime(), 1_000);
    }

    #[test]
    fn unpacks_plain_layer_with_links_whiteouts_and_devices() {
        let tmp = tempfile::tempdir().unwrap();
        let blob = tmp.path().join("layer.tar");
        fs::write(&blob, sample_layer()).unwrap();
        let dest = tmp.path().join("out");
        fs::create_dir(&dest).unwrap();
        unpack_file(&blob, &dest).unwrap();
        check_sample(&dest);
    }

    #[test]
    fn unpacks_gzip_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let blob = tmp.path().join("layer.tar.gz");
        let mut gz = flate2::write::GzEncoder::new(
            fs::File::create(&blob).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(&sample_layer()).unwrap();
        gz.finish().unwrap();
        assert_eq!(Compression::of_file(&blob).unwrap(), Compression::Gzip);
        let dest = tmp.path().join("out");
        fs::create_dir(&dest).unwrap();
        unpack_file(&blob, &dest).unwrap();
        check_sample(&dest);
    }

    fn unpack_bytes(bytes: Vec<u8>) -> (tempfile::TempDir, Result<()>) {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out");
        fs::create_dir(&dest).unwrap();
        let result = unpack(&bytes[..], &dest);
        (tmp, result)
    }

    #[test]
    fn refuses_parent_dir_escape() {
        let mut b = tar::Builder::new(Vec::new());
        add_raw(&mut b, EntryType::Regular, "../evil", "");
        let (tmp, result) = unpack_bytes(b.into_inner().unwrap());
        let err = result.unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
        assert!(err.to_string().contains(".."), "{err}");
        assert!(!tmp.path().join("evil").exists());
    }

    #[test]
    fn refuses_writing_through_a_symlink() {
        let outside = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        add_link(
            &mut b,
            EntryType::Symlink,
            "sneaky",
            outside.path().to_str().unwrap(),
        );
        add_file(&mut b, "sneaky/owned", b"x", 0o644);
        let (_tmp, result) = unpack_bytes(b.into_inner().unwrap());
        assert!(matches!(result, Err(ImageError::UnsafeEntry { .. })));
        assert!(!outside.path().join("owned").exists());
    }

    #[test]
    fn refuses_hard_link_out_of_the_layer() {
        let mut b = tar::Builder::new(Vec::new());
        add_raw(&mut b, EntryType::Link, "passwd", "../../../../etc/passwd");
        let (tmp, result) = unpack_bytes(b.into_inner().unwrap());
        assert!(matches!(result, Err(ImageError::UnsafeEntry { .. })));
        assert!(!tmp.path().join("out/passwd").exists());

        // Through a symlinked parent directory, too.
        let mut b = tar::Builder::new(Vec::new());
        add_link(&mut b, EntryType::Symlink, "etc", "/etc");
        add_link(&mut b, EntryType::Link, "passwd", "etc/passwd");
        let (tmp, result) = unpack_bytes(b.into_inner().unwrap());
        assert!(matches!(result, Err(ImageError::UnsafeEntry { .. })));
        assert!(!tmp.path().join("out/passwd").exists());
    }

    #[test]
    fn zstd_layers_decode_across_frames() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(5);
        b.append_data(&mut h, "etc/zstd", &b"hello"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        // Two frames, as a chunked zstd layer has: the tar cut in the middle of its header.
        let (one, two) = tar.split_at(100);
        let mut blob = zstd::encode_all(one, 3).unwrap();
        blob.extend(zstd::encode_all(two, 3).unwrap());
        assert_eq!(Compression::detect(&blob), Compression::Zstd);
        let mut out = Vec::new();
        decompressed(&blob[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, tar);
        let dir = tempfile::tempdir().unwrap();
        let (file, dest) = (dir.path().join("layer"), dir.path().join("out"));
        fs::write(&file, &blob).unwrap();
        fs::create_dir(&dest).unwrap();
        unpack_file(&file, &dest).unwrap();
        assert_eq!(fs::read(dest.join("etc/zstd")).unwrap(), b"hello");
    }

    /// A header number: octal as the appendix's scripts write it, or GNU base-256 when it
    /// does not fit (sizes of 8 GiB and more).
    fn octal(field: &mut [u8], n: u64) {
        let w = field.len() - 1;
        let text = format!("{n:0w$o}");
        if text.len() == w {
            field[..w].copy_from_slice(text.as_bytes());
            field[w] = 0;
        } else {
            field.fill(0);
            let len = field.len();
            field[len - 8..].copy_from_slice(&n.to_be_bytes());
            field[0] = 0x80;
        }
    }

    /// A GNU sparse entry (port of the audit's `mk_sparse_bomb.py`): `blocks` are (offset,
    /// length) of the data stored after the header, `real` the file's expanded size.
    fn add_sparse(b: &mut tar::Builder<Vec<u8>>, name: &str, real: u64, blocks: &[(u64, u64)]) {
        let stored: u64 = blocks.iter().map(|(_, n)| n).sum();
        let mut h = header(EntryType::GNUSparse, 0o644, stored);
        h.set_path(name).unwrap();
        let gnu = h.as_gnu_mut().unwrap();
        for (i, (off, n)) in blocks.iter().enumerate() {
            octal(&mut gnu.sparse[i].offset, *off);
            octal(&mut gnu.sparse[i].numbytes, *n);
        }
        octal(&mut gnu.realsize, real);
        h.set_cksum();
        let data: Vec<u8> = (0..stored).map(|i| (i % 251) as u8 + 1).collect();
        b.append(&h, &data[..]).unwrap();
    }

    /// A PAX extended header carrying `records` for the entry that follows it.
    fn add_pax(b: &mut tar::Builder<Vec<u8>>, records: &[(&str, &[u8])]) {
        let mut data = Vec::new();
        for (key, value) in records {
            let body = key.len() + value.len() + 3; // ' ', '=', '\n'
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(EntryType::XHeader);
        h.set_size(data.len() as u64);
        h.set_path("PaxHeader").unwrap();
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }

    /// The audit's `mk_wh_escape.py`, for each way a whiteout could name `.`/`..`/nothing:
    /// the layer is refused and nothing beside the layer directory is touched.
    #[test]
    fn m3_whiteout_dotdot_is_refused() {
        for name in [".wh...", ".wh..", ".wh.", "sub/.wh...", "sub/.wh.."] {
            let mut b = tar::Builder::new(Vec::new());
            add_dir(&mut b, "./", 0o755, 1_000);
            add_dir(&mut b, "sub", 0o755, 1_000);
            add_file(&mut b, "keep", b"ok", 0o644);
            add_raw(&mut b, EntryType::Regular, name, "");
            let tmp = tempfile::tempdir().unwrap();
            let canary = tmp.path().join("canary");
            fs::write(&canary, b"alive").unwrap();
            let dest = tmp.path().join("out");
            fs::create_dir(&dest).unwrap();
            let err = unpack(&b.into_inner().unwrap()[..], &dest).unwrap_err();
            assert!(
                matches!(err, ImageError::UnsafeEntry { .. }),
                "{name}: {err}"
            );
            assert!(err.to_string().contains("whiteout"), "{name}: {err}");
            assert!(
                canary.exists(),
                "{name}: the whiteout removed a sibling of the layer"
            );
            assert!(
                dest.join("keep").exists(),
                "{name}: the layer dir was emptied"
            );
            assert!(dest.join("sub").is_dir(), "{name}");
        }
    }

    #[test]
    fn m3_opaque_and_plain_whiteouts_still_work() {
        let mut b = tar::Builder::new(Vec::new());
        add_file(&mut b, "d/.wh..wh..opq", b"", 0o644);
        add_file(&mut b, "d/.wh.gone", b"", 0o644);
        add_file(&mut b, ".wh..hidden", b"", 0o644);
        let (tmp, result) = unpack_bytes(b.into_inner().unwrap());
        result.unwrap();
        let dest = tmp.path().join("out");
        assert_eq!(
            get_xattr(&dest.join("d"), OPAQUE_XATTR).as_deref(),
            Some(&b"y"[..])
        );
        for gone in ["d/gone", ".hidden"] {
            let meta = fs::symlink_metadata(dest.join(gone)).unwrap();
            assert!(meta.file_type().is_char_device(), "{gone}");
        }
    }

    /// The audit's `mk_sparse_bomb.py`: one header, no data, 32 GiB of holes. Refused from the
    /// header, before anything is written.
    #[test]
    fn m5_sparse_bomb_is_refused() {
        let real = 32 << 30;
        let mut b = tar::Builder::new(Vec::new());
        add_sparse(&mut b, "bomb", real, &[(real, 0)]);
        let tmp = tempfile::tempdir().unwrap();
        let blob = tmp.path().join("sparse-bomb.tar");
        fs::write(&blob, b.into_inner().unwrap()).unwrap();
        let dest = tmp.path().join("out");
        fs::create_dir(&dest).unwrap();
        let err =
            unpack_file_limited(&blob, &dest, "sha256:bomb", &LayerLimits::default()).unwrap_err();
        assert!(matches!(err, ImageError::LayerRefused { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("sha256:bomb") && msg.contains("16 GiB"),
            "{msg}"
        );
        assert!(!dest.join("bomb").exists());
    }

    /// A sparse file under the limit keeps its holes: 1 GiB long, one 512-byte block of data.
    #[test]
    fn m5_sparse_file_is_written_with_holes() {
        let real: u64 = 1 << 30;
        let mut b = tar::Builder::new(Vec::new());
        add_sparse(&mut b, "big", real, &[(real - 512, 512)]);
        let (tmp, result) = unpack_bytes(b.into_inner().unwrap());
        result.unwrap();
        let path = tmp.path().join("out/big");
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), real);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "{} bytes allocated for a file of holes",
            meta.blocks() * 512
        );
        let mut f = fs::File::open(&path).unwrap();
        std::io::Seek::seek(&mut f, io::SeekFrom::Start(real - 512)).unwrap();
        let mut tail = Vec::new();
        f.read_to_end(&mut tail).unwrap();
        assert_eq!(tail.len(), 512);
        assert_eq!(&tail[..3], &[1, 2, 3]);
    }

    /// A header claiming a file beyond the limit is refused before its data is read (a gzip
    /// bomb's tar says how big its file is).
    #[test]
    fn m5_oversized_file_is_refused_from_its_header() {
        let mut h = header(EntryType::Regular, 0o644, 17 << 30);
        h.set_path("huge").unwrap();
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 4096]); // the rest of the data never comes
        let (tmp, result) = unpack_bytes(bytes);
        let err = result.unwrap_err();
        assert!(matches!(err, ImageError::LayerRefused { .. }), "{err}");
        assert!(!tmp.path().join("out/huge").exists());

        // Files that each fit but add up to more (sparse: the stream itself stays small).
        let limits = LayerLimits {
            max_bytes: 3000,
            min_free: 0,
        };
        let mut b = tar::Builder::new(Vec::new());
        for name in ["a", "b", "c"] {
            add_sparse(&mut b, name, 1024, &[(1024, 0)]);
        }
        let tmp = tempfile::tempdir().unwrap();
        let err = unpack_limited(
            &b.into_inner().unwrap()[..],
            tmp.path(),
            "sha256:x",
            &limits,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("add up to more than 3000 bytes"),
            "{err}"
        );
        assert!(!tmp.path().join("c").exists());
    }

    /// A gzip bomb whose bytes are not file data (a 2 MiB PAX header, which the tar reader
    /// would hold in memory) is cut off by the count of decompressed bytes.
    #[test]
    fn m5_gzip_bomb_is_cut_at_the_limit() {
        let mut b = tar::Builder::new(Vec::new());
        add_pax(&mut b, &[("comment", &vec![b'z'; 2 << 20][..])]);
        add_file(&mut b, "x", b"x", 0o644);
        let tmp = tempfile::tempdir().unwrap();
        let blob = tmp.path().join("bomb.tar.gz");
        let mut gz = flate2::write::GzEncoder::new(
            fs::File::create(&blob).unwrap(),
            flate2::Compression::best(),
        );
        gz.write_all(&b.into_inner().unwrap()).unwrap();
        gz.finish().unwrap();
        assert!(fs::metadata(&blob).unwrap().len() < 64 << 10);
        let dest = tmp.path().join("out");
        fs::create_dir(&dest).unwrap();
        let limits = LayerLimits {
            max_bytes: 1 << 20,
            min_free: 0,
        };
        let err = unpack_file_limited(&blob, &dest, "sha256:gz", &limits).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::LayerRefused { .. }), "{msg}");
        assert!(msg.contains("sha256:gz") && msg.contains("1 MiB"), "{msg}");
        // Under a larger limit the same layer unpacks.
        unpack_file(&blob, &dest).unwrap();
        assert!(dest.join("x").is_file());
    }

    #[test]
    fn m5_unpack_leaves_free_space() {
        let limits = LayerLimits {
            max_bytes: DEFAULT_MAX_LAYER_BYTES,
            min_free: u64::MAX / 2,
        };
        let mut b = tar::Builder::new(Vec::new());
        add_file(&mut b, "f", b"data", 0o644);
        let tmp = tempfile::tempdir().unwrap();
        let err = unpack_limited(
            &b.into_inner().unwrap()[..],
            tmp.path(),
            "sha256:d",
            &limits,
        )
        .unwrap_err();
        assert!(err.to_string().contains("would leave less than"), "{err}");
        assert!(!tmp.path().join("f").exists());
    }

    /// `trusted.*` (overlayfs' own attributes) and `security.*` but file capabilities are not
    /// taken from a layer; other xattrs are.
    #[test]
    fn l6_trusted_and_security_xattrs_are_dropped() {
        // vfs_cap_data v2, effective, CAP_NET_BIND_SERVICE permitted.
        let mut cap = Vec::new();
        for word in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
            cap.extend_from_slice(&word.to_le_bytes());
        }
        let mut b = tar::Builder::new(Vec::new());
        add_pax(
            &mut b,
            &[
                ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
                ("SCHILY.xattr.user.kept", b"1"),
            ],
        );
        add_dir(&mut b, "d", 0o755, 1_000);
        add_pax(
            &mut b,
            &[
                ("SCHILY.xattr.trusted.overlay.metacopy", b""),
                (
                    "SCHILY.xattr.security.selinux",
                    b"system_u:object_r:shadow_t:s0",
                ),
                ("SCHILY.xattr.security.capability", &cap[..]),
            ],
        );
        add_file(&mut b, "d/ping", b"#!", 0o755);
        let (tmp, result) = unpack_bytes(b.into_inner().unwrap());
        result.unwrap();
        let d = tmp.path().join("out/d");
        assert_eq!(get_xattr(&d, OPAQUE_XATTR), None);
        assert_eq!(get_xattr(&d, "trusted.overlay.redirect"), None);
        assert_eq!(get_xattr(&d, "user.kept").as_deref(), Some(&b"1"[..]));
        let ping = d.join("ping");
        assert_eq!(get_xattr(&ping, "trusted.overlay.metacopy"), None);
        assert_eq!(get_xattr(&ping, "security.selinux"), None);
        assert_eq!(
            get_xattr(&ping, "security.capability").as_deref(),
            Some(&cap[..])
        );
    }
}

//! Unpacking one image layer into a directory that overlayfs can use as a lower dir.
//!
//! Invariants:
//! - nothing is ever written outside the destination: entry paths are made relative (a leading
//!   `/` is stripped), `..` is refused, and no write goes through a symlink — every parent
//!   directory of an entry (and of a hard link's source) must be a real directory inside the
//!   layer, and existing files are removed, never opened, before being replaced;
//! - OCI whiteouts become overlayfs whiteouts: `.wh.NAME` is a 0:0 character device `NAME`, and
//!   `.wh..wh..opq` marks its directory opaque with the `trusted.overlay.opaque=y` xattr;
//! - modes, numeric ownership (when running as root), mtimes, symlinks, hard links, device nodes
//!   and `SCHILY.xattr.*` extended attributes (file capabilities) are preserved. Directory
//!   metadata is applied last, since creating their children would change their mtimes.
//!
//! The compression of a layer blob is detected from its first bytes, not its media type: gzip,
//! zstd (every frame of the stream) and plain tar.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

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

/// How a blob is compressed, from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
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

/// Unpacks a layer blob file (gzip, zstd or plain tar) into `dest`, which must exist.
pub fn unpack_file(blob: &Path, dest: &Path) -> Result<()> {
    let file = fs::File::open(blob).map_err(|e| ImageError::io_path("open layer", blob, e))?;
    unpack(decompressed(file)?, dest)
}

/// Metadata applied to a directory once all entries are written.
struct DirMeta {
    rel: PathBuf,
    mode: u32,
    owner: Option<(u32, u32)>,
    mtime: u64,
}

/// Unpacks an uncompressed tar stream into `dest`, which must exist.
pub fn unpack(reader: impl Read, dest: &Path) -> Result<()> {
    let mut unpacker = Unpacker {
        dest,
        as_root: is_root(),
        known_dirs: HashSet::new(),
        dirs: Vec::new(),
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| ImageError::io("read layer", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io("read layer entry", e))?;
        unpacker.entry(entry)?;
    }
    unpacker.finish_dirs()
}

struct Unpacker<'a> {
    dest: &'a Path,
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
                let target_rel = parent_rel.join(hidden);
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
                self.remove_existing(&rel)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .map_err(|e| ImageError::io_path("create", &target, e))?;
                io::copy(&mut entry, &mut file)
                    .map_err(|e| ImageError::io_path("write", &target, e))?;
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
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
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
                out.push((name.to_string(), ext.value_bytes().to_vec()));
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
}

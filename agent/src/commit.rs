//! `rctl commit` on the host: a container's changes — its overlayfs upper dir — become one OCI
//! layer (tar+gzip), streamed to the controller after a header naming the base image (the
//! manifest the worker recorded in the container dir when it mounted the rootfs) and the
//! layer's digests.
//!
//! The upper dir is turned into a layer by [`write_changes`]: added and changed files as they
//! are, a deletion (overlayfs: a 0/0 character device) as the OCI whiteout `.wh.NAME`, and an
//! opaque directory (xattr `trusted.overlay.opaque=y`: recreated over a lower one) as the
//! directory followed by `.wh..wh..opq`.
//!
//! Invariants: the walk never follows a symlink — every directory and file is opened relative
//! to its parent's descriptor with `O_NOFOLLOW`, so a container that swaps a directory for a
//! link while it runs cannot make the agent read host files into the image; an entry's header
//! comes from the descriptor that is read, and a file that shrinks meanwhile is padded, so the
//! tar is always well formed; entries come sorted by name, parents first (the same upper dir
//! makes the same layer); overlayfs' own xattrs (`trusted.overlay.*`) never reach the layer,
//! other xattrs (file capabilities) do; what overlayfs records in a way a layer cannot say
//! (a renamed directory's `redirect`, a `metacopy` file whose data stays below) is refused by
//! name. A running container is frozen (`runtime pause`) while its upper dir is read, and thawed
//! however that ends, so no file is caught half-written; with `--pause=false` it runs on, and
//! a file written meanwhile may be caught half-way, as with `docker commit --pause=false`.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures::Stream;
use nix::fcntl::{openat, readlinkat, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use rudder_image::digest::HashingWriter;
use rudder_image::ImageStore;
use rudder_proto::v1::commit_chunk::Msg;
use rudder_proto::v1::{CommitChunk, CommitHeader};
use tar::{EntryType, Header};
use tokio::io::AsyncReadExt;
use tonic::{Response, Status};
use tracing::info;

use crate::exec::{AccessError, ContainerAccess};
use crate::shim::ContainerDir;

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
const OVERLAY_XATTRS: &str = "trusted.overlay.";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const REDIRECT_XATTR: &str = "trusted.overlay.redirect";
const METACOPY_XATTR: &str = "trusted.overlay.metacopy";
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("commit: {op} {path}: {err}")]
    Io {
        op: &'static str,
        path: String,
        err: io::Error,
    },
    #[error("commit: {path}: {what} cannot be expressed in an image layer")]
    Unsupported { path: String, what: &'static str },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CommitError {
    let path = path.display().to_string();
    move |err| CommitError::Io { op, path, err }
}

fn nix_err(op: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> CommitError {
    let f = io_err(op, path);
    move |e| f(io::Error::from(e))
}

/// What a layer holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    /// Files, directories, links and devices added or changed.
    pub changed: u64,
    /// Whiteouts: deleted files, and opaque directories.
    pub deleted: u64,
}

/// The layer blob made by [`make_layer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub digest: String,
    pub size: u64,
    pub diff_id: String,
    pub changes: Changes,
}

/// Writes the changes recorded in the overlayfs upper dir `upper` as layer entries into `out`
/// (without finishing the archive).
pub fn write_changes<W: Write>(
    upper: &Path,
    out: &mut tar::Builder<W>,
) -> Result<Changes, CommitError> {
    let root = nix::fcntl::open(
        upper,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(nix_err("open", upper))?;
    let mut walk = Walk {
        out,
        changes: Changes::default(),
        links: HashMap::new(),
        upper,
    };
    walk.dir(&root, Path::new(""))?;
    Ok(walk.changes)
}

struct Walk<'a, W: Write> {
    out: &'a mut tar::Builder<W>,
    changes: Changes,
    /// (dev, inode) of files with several links → the first one's path in the layer.
    links: HashMap<(u64, u64), PathBuf>,
    upper: &'a Path,
}

impl<W: Write> Walk<'_, W> {
    fn host_path(&self, rel: &Path) -> PathBuf {
        self.upper.join(rel)
    }

    fn write<R: Read>(&mut self, header: &mut Header, rel: &Path, data: R) -> io::Result<()> {
        self.out.append_data(header, rel, data)
    }

    /// Every entry of the directory `fd` (at `rel` in the layer), sorted by name.
    fn dir(&mut self, fd: &OwnedFd, rel: &Path) -> Result<(), CommitError> {
        let host = self.host_path(rel);
        // Listed through the descriptor (the magic link is the directory itself, whatever
        // happened to its path meanwhile).
        let listing = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let mut names: Vec<OsString> = std::fs::read_dir(&listing)
            .and_then(|d| d.map(|e| e.map(|e| e.file_name())).collect())
            .map_err(io_err("read directory", &host))?;
        names.sort();
        for name in names {
            self.entry(fd, rel, &name)?;
        }
        Ok(())
    }

    fn entry(&mut self, parent: &OwnedFd, rel: &Path, name: &OsStr) -> Result<(), CommitError> {
        let path = rel.join(name);
        let host = self.host_path(&path);
        let st = match fstatat(parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Deleted by the running container since the directory was listed.
            Err(nix::Error::ENOENT) => return Ok(()),
            Err(e) => return Err(nix_err("stat", &host)(e)),
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let tar_err = |e| io_err("archive", &host)(e);
        match kind {
            SFlag::S_IFDIR => {
                let fd = match openat(
                    parent,
                    name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(nix::Error::ENOENT) => return Ok(()),
                    Err(e) => return Err(nix_err("open", &host)(e)),
                };
                let st = fstat(&fd).map_err(nix_err("stat", &host))?;
                let xattrs = xattrs(&fd).map_err(io_err("read xattrs of", &host))?;
                if xattrs.iter().any(|(k, _)| k == REDIRECT_XATTR) {
                    return Err(CommitError::Unsupported {
                        path: path.display().to_string(),
                        what: "a renamed directory (overlayfs redirect_dir)",
                    });
                }
                let opaque = xattrs
                    .iter()
                    .any(|(k, v)| k == OPAQUE_XATTR && v.as_slice() == b"y");
                self.pax(&path, &xattrs).map_err(tar_err)?;
                let mut h = header(&st, EntryType::Directory);
                self.write(&mut h, &path, io::empty()).map_err(tar_err)?;
                self.changes.changed += 1;
                if opaque {
                    let mut h = whiteout_header();
                    self.write(&mut h, &path.join(WHITEOUT_OPAQUE), io::empty())
                        .map_err(tar_err)?;
                    self.changes.deleted += 1;
                }
                self.dir(&fd, &path)
            }
            SFlag::S_IFREG => {
                let fd = match openat(
                    parent,
                    name,
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(nix::Error::ENOENT) => return Ok(()),
                    Err(e) => return Err(nix_err("open", &host)(e)),
                };
                let st = fstat(&fd).map_err(nix_err("stat", &host))?;
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
                    // Replaced by something else since the stat above: take it as it is now.
                    return self.entry(parent, rel, name);
                }
                let xattrs = xattrs(&fd).map_err(io_err("read xattrs of", &host))?;
                if xattrs.iter().any(|(k, _)| k == METACOPY_XATTR) {
                    return Err(CommitError::Unsupported {
                        path: path.display().to_string(),
                        what: "a metadata-only copy-up (overlayfs metacopy)",
                    });
                }
                self.changes.changed += 1;
                if st.st_nlink > 1 {
                    let key = (st.st_dev, st.st_ino);
                    if let Some(first) = self.links.get(&key) {
                        let mut h = header(&st, EntryType::Link);
                        h.set_size(0);
                        let first = first.clone();
                        return self.out.append_link(&mut h, &path, first).map_err(tar_err);
                    }
                    self.links.insert(key, path.clone());
                }
                self.pax(&path, &xattrs).map_err(tar_err)?;
                let size = st.st_size as u64;
                let mut h = header(&st, EntryType::Regular);
                h.set_size(size);
                // Exactly `size` bytes whatever the file does meanwhile.
                let data = File::from(fd).take(size).chain(io::repeat(0)).take(size);
                self.write(&mut h, &path, data).map_err(tar_err)
            }
            SFlag::S_IFLNK => {
                let target = match readlinkat(parent, name) {
                    Ok(t) => t,
                    Err(nix::Error::ENOENT) => return Ok(()),
                    Err(e) => return Err(nix_err("read link", &host)(e)),
                };
                let mut h = header(&st, EntryType::Symlink);
                self.changes.changed += 1;
                self.out
                    .append_link(&mut h, &path, Path::new(&target))
                    .map_err(tar_err)
            }
            SFlag::S_IFCHR if st.st_rdev == 0 => {
                // overlayfs' whiteout: the name is deleted.
                let mut wh = OsString::from(WHITEOUT_PREFIX);
                wh.push(name);
                let mut h = whiteout_header();
                self.changes.deleted += 1;
                self.write(&mut h, &rel.join(wh), io::empty())
                    .map_err(tar_err)
            }
            SFlag::S_IFCHR | SFlag::S_IFBLK | SFlag::S_IFIFO => {
                let t = match kind {
                    SFlag::S_IFCHR => EntryType::Char,
                    SFlag::S_IFBLK => EntryType::Block,
                    _ => EntryType::Fifo,
                };
                let mut h = header(&st, t);
                if kind != SFlag::S_IFIFO {
                    let major = libc::major(st.st_rdev);
                    let minor = libc::minor(st.st_rdev);
                    h.set_device_major(major).map_err(tar_err)?;
                    h.set_device_minor(minor).map_err(tar_err)?;
                }
                self.changes.changed += 1;
                self.write(&mut h, &path, io::empty()).map_err(tar_err)
            }
            // Sockets belong to a running process, not to an image.
            _ => Ok(()),
        }
    }

    /// A PAX header carrying `xattrs` (as `SCHILY.xattr.NAME`) for the next entry, if any.
    fn pax(&mut self, path: &Path, xattrs: &[(String, Vec<u8>)]) -> io::Result<()> {
        let mut data = Vec::new();
        for (k, v) in xattrs {
            if k.starts_with(OVERLAY_XATTRS) {
                continue;
            }
            data.extend(pax_record(&format!("SCHILY.xattr.{k}"), v));
        }
        if data.is_empty() {
            return Ok(());
        }
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        // The name is informative only; keep it short enough for a plain header.
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().chars().take(80).collect::<String>())
            .unwrap_or_default();
        self.out
            .append_data(&mut h, format!("PaxHeaders/{name}"), data.as_slice())
    }
}

/// `"<len> key=value\n"`, where len counts the whole record, itself included.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn header(st: &FileStat, kind: EntryType) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(st.st_uid as u64);
    h.set_gid(st.st_gid as u64);
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_size(0);
    h
}

fn whiteout_header() -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(0);
    h
}

/// The extended attributes of an open file or directory.
fn xattrs(fd: &impl AsFd) -> io::Result<Vec<(String, Vec<u8>)>> {
    let raw = fd.as_fd().as_raw_fd();
    // SAFETY: a null buffer of size 0 asks for the size only.
    let n = unsafe { libc::flistxattr(raw, std::ptr::null_mut(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    let mut names = vec![0u8; n as usize];
    // SAFETY: `names` has room for `names.len()` bytes.
    let n = unsafe { libc::flistxattr(raw, names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let c = CString::new(name).expect("no NUL inside a name");
        // SAFETY: as above.
        let len = unsafe { libc::fgetxattr(raw, c.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            // Removed meanwhile.
            continue;
        }
        let mut value = vec![0u8; len as usize];
        // SAFETY: `value` has room for `value.len()` bytes.
        let len =
            unsafe { libc::fgetxattr(raw, c.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if len < 0 {
            continue;
        }
        value.truncate(len as usize);
        out.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    Ok(out)
}

/// Makes the layer blob (tar+gzip) of the upper dir `upper` in `dest`; returns its digests.
pub fn make_layer(upper: &Path, dest: &File) -> Result<LayerInfo, CommitError> {
    let out = HashingWriter::new(BufWriter::with_capacity(256 << 10, dest));
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(HashingWriter::new(gz));
    let changes = write_changes(upper, &mut tar)?;
    let write_err = io_err("write layer for", upper);
    let diff = tar.into_inner().map_err(write_err)?;
    let (gz, diff_id, _) = diff.finish();
    let out = gz.finish().map_err(io_err("compress layer for", upper))?;
    let (mut buffered, digest, size) = out.finish();
    buffered.flush().map_err(io_err("write layer for", upper))?;
    Ok(LayerInfo {
        digest,
        size,
        diff_id,
        changes,
    })
}

pub type CommitStream = Pin<Box<dyn Stream<Item = Result<CommitChunk, Status>> + Send>>;

/// The base image task `task`'s container runs: its manifest digest and bytes, and its config.
fn base_image(
    images: &ImageStore,
    dir: &ContainerDir,
    task: &str,
) -> Result<(String, Vec<u8>, Vec<u8>), Status> {
    let digest = std::fs::read_to_string(dir.image_file()).map_err(|_| {
        Status::failed_precondition(format!(
            "task {task}: its container does not record its image (started by an older agent); \
             restart the task to commit it"
        ))
    })?;
    let digest = digest.trim().to_string();
    let gone = |what: &str, e: rudder_image::ImageError| {
        Status::failed_precondition(format!("task {task}: the image's {what} is gone: {e}"))
    };
    let manifest = images.read_blob(&digest).map_err(|e| gone("manifest", e))?;
    let parsed = rudder_image::oci::Manifest::parse(&manifest).map_err(|e| gone("manifest", e))?;
    let config = images
        .read_blob(&parsed.config.digest)
        .map_err(|e| gone("config", e))?;
    Ok((digest, manifest, config))
}

/// A container frozen for a commit. Thawed by [`Frozen::thaw`], or, should the commit be
/// dropped first (its client gone, a deadline), in the background when this is dropped: a
/// commit never leaves a task frozen.
struct Frozen {
    access: ContainerAccess,
    task: String,
    thawed: bool,
}

impl Frozen {
    /// Thaws the container, trying a few times.
    async fn thaw(mut self) -> Result<(), AccessError> {
        self.thawed = true;
        thaw(&self.access, &self.task).await
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed {
            let (access, task) = (self.access.clone(), std::mem::take(&mut self.task));
            tokio::spawn(async move {
                let _ = thaw(&access, &task).await;
            });
        }
    }
}

async fn thaw(access: &ContainerAccess, task: &str) -> Result<(), AccessError> {
    let mut last = Ok(());
    for attempt in 1..=3u64 {
        last = access.pause(task, false).await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300 * attempt)).await;
    }
    last
}

/// Streams task `task`'s container changes as a layer, after a header; `pause`: freeze a
/// running container while its changes are read.
pub async fn commit(
    access: &ContainerAccess,
    images: &ImageStore,
    task: &str,
    pause: bool,
) -> Result<Response<CommitStream>, Status> {
    let dir = access.dir(task)?;
    let upper = dir.upper();
    if !upper.is_dir() {
        return Err(Status::failed_precondition(format!(
            "task {task}: its container is gone (the writable layer goes when a task ends)"
        )));
    }
    let (base_digest, base_manifest, base_config) = base_image(images, &dir, task)?;
    // An unnamed file next to the container: gone when closed, whatever happens.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir.path())
        .map_err(|e| Status::internal(format!("commit: create a scratch file: {e}")))?;
    let started = std::time::Instant::now();
    // Only a running container is frozen; one that has exited has nothing left to write.
    let frozen = if pause && access.running_pid(task).is_ok() {
        let guard = Frozen {
            access: access.clone(),
            task: task.to_string(),
            thawed: false,
        };
        if let Err(e) = access.pause(task, true).await {
            // It may be half frozen (a timeout): thaw once, and say why it failed.
            guard.thaw().await.ok();
            return Err(e.into());
        }
        Some(guard)
    } else {
        None
    };
    let was_frozen = frozen.is_some();
    let made = tokio::task::spawn_blocking(move || {
        let layer = make_layer(&upper, &file)?;
        Ok::<_, CommitError>((file, layer))
    })
    .await;
    if let Some(guard) = frozen {
        guard.thaw().await?;
    }
    let (file, layer) = made
        .map_err(|e| Status::internal(format!("commit: {e}")))?
        .map_err(|e| match e {
            CommitError::Unsupported { .. } => Status::failed_precondition(e.to_string()),
            CommitError::Io { .. } => Status::internal(e.to_string()),
        })?;
    info!(
        task,
        digest = %layer.digest,
        size = layer.size,
        changed = layer.changes.changed,
        deleted = layer.changes.deleted,
        elapsed_ms = started.elapsed().as_millis() as u64,
        paused = was_frozen,
        "commit: layer made"
    );
    let header = CommitHeader {
        base_digest,
        base_manifest,
        base_config,
        layer_digest: layer.digest,
        layer_size: layer.size,
        diff_id: layer.diff_id,
        created: crate::shim::rfc3339_now(),
        changed: layer.changes.changed,
        deleted: layer.changes.deleted,
    };
    let mut file = file;
    file.rewind()
        .map_err(|e| Status::internal(format!("commit: {e}")))?;
    let mut file = tokio::fs::File::from_std(file);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let first = CommitChunk {
            msg: Some(Msg::Header(header)),
        };
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            match file.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    let chunk = CommitChunk {
                        msg: Some(Msg::Data(buf[..n].to_vec())),
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!(
                            "commit: read the layer: {e}"
                        ))))
                        .await;
                    return;
                }
            }
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{symlink, MetadataExt};

    /// (path, kind, size, link target) of every entry, in order; PAX headers applied.
    fn entries(upper: &Path) -> (Vec<(String, char, u64, String)>, Changes) {
        let mut b = tar::Builder::new(Vec::new());
        let changes = write_changes(upper, &mut b).unwrap();
        let bytes = b.into_inner().unwrap();
        let mut a = tar::Archive::new(bytes.as_slice());
        let list = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let kind = match e.header().entry_type() {
                    EntryType::Regular => 'f',
                    EntryType::Directory => 'd',
                    EntryType::Symlink => 'l',
                    EntryType::Link => 'h',
                    EntryType::Char => 'c',
                    EntryType::Fifo => 'p',
                    other => panic!("unexpected {other:?}"),
                };
                let link = e
                    .link_name()
                    .unwrap()
                    .map(|l| l.display().to_string())
                    .unwrap_or_default();
                let path = e.path().unwrap().display().to_string();
                (path, kind, e.header().size().unwrap(), link)
            })
            .collect();
        (list, changes)
    }

    fn mknod(path: &Path, kind: SFlag, dev: u64) {
        nix::sys::stat::mknod(path, kind, Mode::from_bits_truncate(0o600), dev).unwrap();
    }

    fn setxattr(path: &Path, name: &str, value: &[u8]) {
        let p = CString::new(path.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        // SAFETY: valid C strings and a buffer of the given length.
        let rc = unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(rc, 0, "setxattr {name}: {}", io::Error::last_os_error());
    }

    /// An upper dir as overlayfs leaves it: a new file, a changed one with a hard link, a
    /// deleted file (0/0 char device), an opaque directory, a new directory, a symlink, a fifo.
    fn upper() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let u = t.path();
        std::fs::create_dir_all(u.join("etc")).unwrap();
        std::fs::write(u.join("etc/motd"), b"hello\n").unwrap();
        std::fs::hard_link(u.join("etc/motd"), u.join("etc/motd.link")).unwrap();
        std::fs::create_dir_all(u.join("bin")).unwrap();
        mknod(&u.join("bin/vi"), SFlag::S_IFCHR, 0);
        std::fs::create_dir_all(u.join("srv/data")).unwrap();
        std::fs::write(u.join("srv/data/new"), b"x").unwrap();
        setxattr(&u.join("srv/data"), OPAQUE_XATTR, b"y");
        std::fs::create_dir_all(u.join("newdir")).unwrap();
        symlink("/etc/motd", u.join("newdir/link")).unwrap();
        nix::unistd::mkfifo(&u.join("newdir/fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        // A real device keeps its numbers.
        mknod(&u.join("newdir/null"), SFlag::S_IFCHR, libc::makedev(1, 3));
        t
    }

    #[test]
    fn overlay_changes_become_oci_whiteouts() {
        let t = upper();
        let (list, changes) = entries(t.path());
        let got: Vec<(&str, char)> = list.iter().map(|(p, k, _, _)| (p.as_str(), *k)).collect();
        assert_eq!(
            got,
            [
                ("bin", 'd'),
                ("bin/.wh.vi", 'f'),
                ("etc", 'd'),
                ("etc/motd", 'f'),
                ("etc/motd.link", 'h'),
                ("newdir", 'd'),
                ("newdir/fifo", 'p'),
                ("newdir/link", 'l'),
                ("newdir/null", 'c'),
                ("srv", 'd'),
                ("srv/data", 'd'),
                ("srv/data/.wh..wh..opq", 'f'),
                ("srv/data/new", 'f'),
            ]
        );
        let find = |p: &str| list.iter().find(|e| e.0 == p).unwrap();
        assert_eq!(find("etc/motd").2, 6);
        assert_eq!(find("etc/motd.link").3, "etc/motd");
        assert_eq!(find("newdir/link").3, "/etc/motd");
        assert_eq!(find("bin/.wh.vi").2, 0);
        assert_eq!(
            changes,
            Changes {
                changed: 11,
                deleted: 2
            }
        );
    }

    #[test]
    fn the_layer_unpacks_back_to_the_same_overlay_tree() {
        // What the agent's own unpacker makes of the layer is the upper dir again: the
        // whiteout a 0/0 device, the opaque directory marked, the data and links in place.
        let t = upper();
        let file = tempfile::tempfile().unwrap();
        let layer = make_layer(t.path(), &file).unwrap();
        assert_eq!(layer.size, file.metadata().unwrap().len());
        let mut blob = Vec::new();
        let mut f = file;
        f.rewind().unwrap();
        f.read_to_end(&mut blob).unwrap();
        assert_eq!(layer.digest, rudder_image::digest::of_bytes(&blob));
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(blob.as_slice())
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(layer.diff_id, rudder_image::digest::of_bytes(&tar));

        let out = tempfile::tempdir().unwrap();
        rudder_image::layer::unpack(
            rudder_image::layer::decompressed(blob.as_slice()).unwrap(),
            out.path(),
        )
        .unwrap();
        let o = out.path();
        let vi = std::fs::symlink_metadata(o.join("bin/vi")).unwrap();
        assert_eq!(vi.mode() & libc::S_IFMT, libc::S_IFCHR);
        assert_eq!(vi.rdev(), 0);
        assert_eq!(std::fs::read(o.join("etc/motd")).unwrap(), b"hello\n");
        assert_eq!(
            std::fs::metadata(o.join("etc/motd")).unwrap().ino(),
            std::fs::metadata(o.join("etc/motd.link")).unwrap().ino()
        );
        assert_eq!(
            std::fs::read_link(o.join("newdir/link")).unwrap(),
            Path::new("/etc/motd")
        );
        let opaque = xattrs(&File::open(o.join("srv/data")).unwrap()).unwrap();
        assert!(opaque.contains(&(OPAQUE_XATTR.to_string(), b"y".to_vec())));
        assert!(xattrs(&File::open(o.join("etc")).unwrap())
            .unwrap()
            .is_empty());
        assert_eq!(
            std::fs::metadata(o.join("newdir/null")).unwrap().rdev(),
            libc::makedev(1, 3)
        );
    }

    #[test]
    fn xattrs_travel_but_overlay_bookkeeping_does_not() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("ping");
        std::fs::write(&f, b"bin").unwrap();
        setxattr(&f, "user.origin", b"commit");
        setxattr(&f, "trusted.overlay.origin", b"lower");
        let file = tempfile::tempfile().unwrap();
        let layer = make_layer(t.path(), &file).unwrap();
        let mut blob = Vec::new();
        let mut f2 = file;
        f2.rewind().unwrap();
        f2.read_to_end(&mut blob).unwrap();
        let out = tempfile::tempdir().unwrap();
        rudder_image::layer::unpack(
            rudder_image::layer::decompressed(blob.as_slice()).unwrap(),
            out.path(),
        )
        .unwrap();
        let got = xattrs(&File::open(out.path().join("ping")).unwrap()).unwrap();
        assert_eq!(got, [("user.origin".to_string(), b"commit".to_vec())]);
        assert_eq!(layer.changes.changed, 1);
    }

    #[test]
    fn symlinked_directories_are_never_followed_and_odd_overlay_state_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let secret = tempfile::tempdir().unwrap();
        std::fs::write(secret.path().join("key"), b"host secret").unwrap();
        symlink(secret.path(), t.path().join("evil")).unwrap();
        let (list, _) = entries(t.path());
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].1, 'l');

        std::fs::create_dir(t.path().join("moved")).unwrap();
        setxattr(&t.path().join("moved"), REDIRECT_XATTR, b"/old");
        let mut b = tar::Builder::new(Vec::new());
        let e = write_changes(t.path(), &mut b).unwrap_err();
        assert!(e.to_string().contains("moved: a renamed directory"), "{e}");
    }

    #[test]
    fn pax_records_count_their_own_length() {
        assert_eq!(pax_record("a", b"b"), b"6 a=b\n");
        let r = pax_record("SCHILY.xattr.user.x", &[b'v'; 90]);
        let len: usize = std::str::from_utf8(&r[..r.iter().position(|b| *b == b' ').unwrap()])
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, r.len());
    }
}

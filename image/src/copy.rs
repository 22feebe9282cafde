//! Tar archives for `rctl cp`, on both ends: the agent's fs-helper (chrooted into a container)
//! and `rctl` (on the user's machine) pack and unpack with the same rules.
//!
//! [`pack`] writes one top-level member named after the copied path: a file, a symlink (never
//! followed below the top), or a directory with everything under it. [`unpack`] places an
//! archive like `docker cp` does ([`Layout`]).
//!
//! Invariants: a member lands only under the destination: names are checked component by
//! component (no `..`, no absolute names), hard links must point inside the archive, and —
//! unless the caller is confined (chrooted: any path it can reach is fair game) — nothing is
//! written through a symlink below the destination, so an archive cannot plant a link and
//! then write through it. A top-level member that is not a directory is the archive's only
//! member. Packing never blocks on a FIFO or device and never follows a symlink below the top.
//!
//! An archive from a container unpacked on the user's machine ([`unpack_untrusted`], `rctl cp
//! TASK:PATH DEST`) is trusted less, since a compromised agent answers with whatever tar it
//! likes: its top-level member must carry the name of the path asked for
//! ([`top_name_in_root`]), setuid and setgid bits are dropped, owners are not kept, and device
//! nodes and FIFOs become empty files, as everywhere in this module.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Why `rctl cp` could not pack or unpack.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The source path does not exist.
    #[error("no such file or directory: {0}")]
    NotFound(String),
    /// A path component that should be a directory is not.
    #[error("not a directory: {0}")]
    NotADirectory(String),
    /// A directory would replace a file.
    #[error("cannot overwrite non-directory {0} with a directory")]
    NotOverwritable(String),
    /// A member that would land outside the destination, or a kind refused.
    #[error("copy: refusing archive member {member:?}: {why}")]
    Unsafe {
        /// The member's path in the archive.
        member: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// The archive does not read as tar.
    #[error("copy: bad archive: {0}")]
    BadArchive(String),
    /// The archive's top-level member is not the path asked for.
    #[error(
        "copy: refusing archive: its top-level member is {got:?}, not {want:?} (the name of \
         the path asked for)"
    )]
    ForeignTop {
        /// The top-level member found.
        got: String,
        /// The name it should have (the path asked for).
        want: String,
    },
    /// A file operation failed.
    #[error("copy: {op} {path}: {err}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The path concerned.
        path: String,
        /// The underlying error.
        err: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CopyError {
    let path = path.display().to_string();
    move |err| CopyError::Io { op, path, err }
}

/// The name a copied path gets in the archive: its last component (`/` itself: `rootfs`).
pub fn top_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rootfs".into())
}

/// The top-level name the agent gives `path` inside a container (relative paths are taken
/// from its root): what an archive of it must be named.
pub fn top_name_in_root(path: &str) -> String {
    top_name(&Path::new("/").join(path))
}

/// Whether the user asked for a directory's contents (`DIR/.`, as `docker cp`).
pub fn wants_contents(path: &str) -> bool {
    path == "." || path.ends_with("/.")
}

/// Writes a tar of `src` to `out`, its top-level member named `name`. `follow` archives what
/// a symlink `src` points to instead of the link. Errors before anything is written when
/// `src` does not exist.
pub fn pack(src: &Path, name: &str, follow: bool, out: impl Write) -> Result<(), CopyError> {
    let shown = src.display().to_string();
    let meta = if follow {
        fs::metadata(src)
    } else {
        fs::symlink_metadata(src)
    };
    let meta = match meta {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CopyError::NotFound(shown)),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(CopyError::NotADirectory(shown))
        }
        Err(e) => return Err(io_err("stat", src)(e)),
    };
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    // Depth first, without recursion: (path on disk, name in the archive, metadata).
    let mut todo = vec![(src.to_path_buf(), PathBuf::from(name), meta, follow)];
    while let Some((path, member, meta, follow_top)) = todo.pop() {
        let ft = meta.file_type();
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        if ft.is_dir() {
            h.set_size(0);
            b.append_data(&mut h, &member, io::empty())
                .map_err(io_err("write archive", &path))?;
            let mut children = Vec::new();
            let rd = match fs::read_dir(&path) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read directory", &path)(e)),
            };
            for e in rd {
                let e = e.map_err(io_err("read directory", &path))?;
                children.push(e.file_name());
            }
            // Reverse order on the stack: members come out sorted.
            children.sort();
            for c in children.into_iter().rev() {
                let p = path.join(&c);
                match fs::symlink_metadata(&p) {
                    Ok(m) => todo.push((p, member.join(&c), m, false)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("stat", &p)(e)),
                }
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(io_err("read link", &path))?;
            h.set_size(0);
            b.append_link(&mut h, &member, &target)
                .map_err(io_err("write archive", &path))?;
        } else if ft.is_file() {
            // No blocking open (a FIFO swapped in meanwhile), no following a swapped-in link;
            // what is archived is what was opened.
            let mut flags = libc::O_NONBLOCK;
            if !follow_top {
                flags |= libc::O_NOFOLLOW;
            }
            let f = match fs::OpenOptions::new()
                .read(true)
                .custom_flags(flags)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("open", &path)(e)),
            };
            let meta = f.metadata().map_err(io_err("stat", &path))?;
            if !meta.is_file() {
                continue;
            }
            h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let size = meta.len();
            // Exactly `size` bytes, even if the file changes while it is read.
            let data = f.take(size).chain(io::repeat(0)).take(size);
            b.append_data(&mut h, &member, data)
                .map_err(io_err("write archive", &path))?;
        } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
            h.set_size(0);
            b.append_data(&mut h, &member, io::empty())
                .map_err(io_err("write archive", &path))?;
        }
        // Sockets are not archived (as tar does).
    }
    b.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(io_err("write archive", src))?;
    Ok(())
}

/// Where an archive's members land under the destination `dest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One top-level member (as [`pack`] makes): into `dest` when that is a directory, else
    /// as `dest` (whose parent must exist), like `docker cp SRC DEST`.
    Named,
    /// The top-level directory's contents go into `dest`, created if missing
    /// (`docker cp DIR/. DEST`).
    Contents,
    /// Every member as named, into the existing directory `dest` (`docker cp - DEST`).
    Raw,
}

/// What [`unpack`] wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// Where the top-level member landed (`dest` itself for contents and raw).
    pub root: PathBuf,
    /// Members unpacked.
    pub members: u64,
}

/// Unpacks `archive` under `dest` (see [`Layout`]). `confined`: the caller is chrooted into
/// the tree it writes, so symlinks there may be followed (they cannot leave it); otherwise no
/// member is written through a symlink below `dest`.
pub fn unpack(
    archive: impl Read,
    dest: &Path,
    layout: Layout,
    confined: bool,
) -> Result<Unpacked, CopyError> {
    unpack_owned(archive, dest, layout, confined, false)
}

/// [`unpack`], and with `keep_owners` the members' uid and gid are kept (a build's
/// `COPY --chown`); otherwise files belong to whoever unpacks them, as with `docker cp`.
pub fn unpack_owned(
    archive: impl Read,
    dest: &Path,
    layout: Layout,
    confined: bool,
    keep_owners: bool,
) -> Result<Unpacked, CopyError> {
    unpack_with(archive, dest, layout, confined, keep_owners, None)
}

/// [`unpack`] of an archive that comes from a container onto this machine, not confined:
/// its (single) top-level member must be named `top` ([`top_name_in_root`] of the path asked
/// for), and setuid/setgid bits are dropped. Files belong to whoever unpacks them.
pub fn unpack_untrusted(
    archive: impl Read,
    dest: &Path,
    layout: Layout,
    top: &str,
) -> Result<Unpacked, CopyError> {
    unpack_with(archive, dest, layout, false, false, Some(top))
}

/// Mode bits an archive from a container never sets on this machine.
const SET_ID_BITS: u32 = 0o6000;

fn unpack_with(
    archive: impl Read,
    dest: &Path,
    layout: Layout,
    confined: bool,
    keep_owners: bool,
    expect_top: Option<&str>,
) -> Result<Unpacked, CopyError> {
    let mask = if expect_top.is_some() { SET_ID_BITS } else { 0 };
    let mut ar = tar::Archive::new(archive);
    ar.set_preserve_ownerships(keep_owners);
    ar.set_preserve_permissions(true);
    ar.set_mask(mask);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    let mut root: Option<(String, PathBuf)> = None;
    // Whether the top-level member is a directory, the only kind with members below it.
    let mut top_is_dir = false;
    let mut done = Unpacked::default();
    // Directories get their modes last, deepest first, so a read-only one does not stop its
    // own contents.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    let entries = ar
        .entries()
        .map_err(|e| CopyError::BadArchive(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| CopyError::BadArchive(e.to_string()))?;
        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let parts = components(&raw_name)?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            continue;
        }
        // Where the archive's names are rooted: fixed by the first member.
        let (top, base) = match &root {
            Some(r) => {
                if !top_is_dir && layout != Layout::Raw {
                    // Below a file or a symlink there is nothing; a member there could only
                    // be written through the link.
                    return Err(CopyError::Unsafe {
                        member: raw_name,
                        why: "the top-level member is not a directory, so it must be alone",
                    });
                }
                r.clone()
            }
            None => {
                if let Some(want) = expect_top {
                    if parts.len() != 1 || parts[0] != want {
                        return Err(CopyError::ForeignTop {
                            got: raw_name,
                            want: want.to_string(),
                        });
                    }
                }
                top_is_dir = kind.is_dir();
                let r = place(dest, layout, &parts, kind.is_dir())?;
                done.root = r.1.clone();
                root = Some(r.clone());
                r
            }
        };
        let rel = relative(&top, &parts, &raw_name)?;
        // (`join("")` would add a trailing slash.)
        let target = if rel.as_os_str().is_empty() {
            base.clone()
        } else {
            base.join(&rel)
        };
        if !confined {
            no_symlink_between(dest, &target, &raw_name)?;
        }
        if kind.is_dir() {
            ensure_dir(&target, confined)?;
            if keep_owners {
                // The tar crate only sets owners on what it unpacks itself (not directories).
                if let (Ok(uid), Ok(gid)) = (entry.header().uid(), entry.header().gid()) {
                    std::os::unix::fs::lchown(&target, Some(uid as u32), Some(gid as u32))
                        .map_err(io_err("chown", &target))?;
                }
            }
            if let Ok(mode) = entry.header().mode() {
                dir_modes.push((target, mode & 0o7777 & !mask));
            }
        } else if kind.is_hard_link() {
            let link = entry
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| CopyError::BadArchive(format!("{raw_name}: link without target")))?;
            let src_rel = relative(&top, &components(&link)?, &link)?;
            if src_rel.as_os_str().is_empty() {
                return Err(CopyError::Unsafe {
                    member: raw_name,
                    why: "a hard link to the top-level member",
                });
            }
            let src = base.join(src_rel);
            if !confined {
                no_symlink_between(dest, &src, &raw_name)?;
            }
            remove_non_dir(&target)?;
            fs::hard_link(&src, &target).map_err(io_err("link", &target))?;
        } else {
            // Files, symlinks, FIFOs (devices become empty files): the tar crate replaces
            // whatever non-directory is there, without following it.
            if target == base && layout == Layout::Named && is_dir(&target, confined) {
                return Err(CopyError::NotOverwritable(target.display().to_string()));
            }
            entry.unpack(&target).map_err(|e| CopyError::Io {
                op: "write",
                path: target.display().to_string(),
                err: e,
            })?;
        }
        done.members += 1;
    }
    if root.is_none() && layout != Layout::Raw {
        return Err(CopyError::BadArchive("it is empty".into()));
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(mode));
    }
    Ok(done)
}

/// The normal components of a member name (`.` dropped); anything else is refused.
fn components(name: &str) -> Result<Vec<String>, CopyError> {
    let mut out = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(n) => out.push(n.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => {
                return Err(CopyError::Unsafe {
                    member: name.to_string(),
                    why: "absolute or with `..`",
                })
            }
        }
    }
    Ok(out)
}

/// Decides, from the first member, which top-level name the archive has and where that lands.
fn place(
    dest: &Path,
    layout: Layout,
    first: &[String],
    first_is_dir: bool,
) -> Result<(String, PathBuf), CopyError> {
    let shown = || dest.display().to_string();
    let dest_meta = fs::metadata(dest);
    let dest_is_dir = dest_meta.as_ref().is_ok_and(|m| m.is_dir());
    let parent_ok = || {
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        match fs::metadata(parent) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(CopyError::NotADirectory(parent.display().to_string())),
            Err(_) => Err(CopyError::NotFound(parent.display().to_string())),
        }
    };
    match layout {
        Layout::Raw => {
            if !dest_is_dir {
                return Err(if dest_meta.is_ok() {
                    CopyError::NotADirectory(shown())
                } else {
                    CopyError::NotFound(shown())
                });
            }
            Ok((String::new(), dest.to_path_buf()))
        }
        Layout::Named | Layout::Contents => {
            let Some(top) = first.first().cloned() else {
                return Err(CopyError::BadArchive("a member without a name".into()));
            };
            if first.len() != 1 {
                return Err(CopyError::BadArchive(format!(
                    "its first member {:?} is not its top-level one",
                    first.join("/")
                )));
            }
            if layout == Layout::Contents {
                if !first_is_dir {
                    return Err(CopyError::NotADirectory(top));
                }
                if dest_meta.is_ok() && !dest_is_dir {
                    return Err(CopyError::NotOverwritable(shown()));
                }
                if !dest_is_dir {
                    parent_ok()?;
                }
                return Ok((top, dest.to_path_buf()));
            }
            if dest_is_dir {
                return Ok((top.clone(), dest.join(top)));
            }
            // A trailing slash says the user meant a directory that is not there.
            if dest.as_os_str().to_string_lossy().ends_with('/') {
                return Err(if dest_meta.is_ok() {
                    CopyError::NotADirectory(shown())
                } else {
                    CopyError::NotFound(shown())
                });
            }
            if first_is_dir && dest_meta.is_ok() {
                return Err(CopyError::NotOverwritable(shown()));
            }
            parent_ok()?;
            Ok((top, dest.to_path_buf()))
        }
    }
}

/// A member's path below the archive's root (`top` stripped).
fn relative(top: &str, parts: &[String], name: &str) -> Result<PathBuf, CopyError> {
    if top.is_empty() {
        return Ok(parts.iter().collect());
    }
    match parts.split_first() {
        Some((first, rest)) if first == top => Ok(rest.iter().collect()),
        _ => Err(CopyError::Unsafe {
            member: name.to_string(),
            why: "outside the archive's top-level member",
        }),
    }
}

/// Refuses when a component of `target` strictly below `dest` is a symlink (but the last,
/// which is replaced, not followed).
fn no_symlink_between(dest: &Path, target: &Path, member: &str) -> Result<(), CopyError> {
    let Ok(below) = target.strip_prefix(dest) else {
        return Ok(());
    };
    let comps: Vec<_> = below.components().collect();
    let mut p = dest.to_path_buf();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        p.push(c);
        if fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(CopyError::Unsafe {
                member: member.to_string(),
                why: "it would be written through a symlink",
            });
        }
    }
    Ok(())
}

fn is_dir(p: &Path, follow: bool) -> bool {
    let m = if follow {
        fs::metadata(p)
    } else {
        fs::symlink_metadata(p)
    };
    m.is_ok_and(|m| m.is_dir())
}

/// A directory at `p`: kept if there (followed through a symlink only when confined), made
/// otherwise; a non-directory in the way is an error.
fn ensure_dir(p: &Path, confined: bool) -> Result<(), CopyError> {
    if is_dir(p, confined) {
        return Ok(());
    }
    match fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() && !confined => {
            // A link planted where a directory goes: replace it, never follow it.
            fs::remove_file(p).map_err(io_err("remove", p))?;
        }
        Ok(_) => return Err(CopyError::NotOverwritable(p.display().to_string())),
        Err(_) => {}
    }
    fs::create_dir(p).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CopyError::NotFound(p.parent().unwrap_or(p).display().to_string())
        } else {
            io_err("create directory", p)(e)
        }
    })
}

fn remove_non_dir(p: &Path) -> Result<(), CopyError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Err(CopyError::NotOverwritable(p.display().to_string())),
        Ok(_) => fs::remove_file(p).map_err(io_err("remove", p)),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("d/sub")).unwrap();
        fs::write(root.join("d/a.txt"), b"alpha").unwrap();
        fs::write(root.join("d/sub/b.txt"), b"beta").unwrap();
        symlink("../a.txt", root.join("d/sub/link")).unwrap();
        fs::write(root.join("f.txt"), b"file").unwrap();
    }

    fn packed(src: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        pack(src, &top_name(src), false, &mut v).unwrap();
        v
    }

    #[test]
    fn a_directory_lands_inside_an_existing_one_or_as_a_new_name() {
        let t = tempfile::tempdir().unwrap();
        tree(t.path());
        let ar = packed(&t.path().join("d"));
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        let u = unpack(&ar[..], &out, Layout::Named, false).unwrap();
        assert_eq!(u.root, out.join("d"));
        assert_eq!(fs::read(out.join("d/sub/b.txt")).unwrap(), b"beta");
        assert_eq!(
            fs::read_link(out.join("d/sub/link")).unwrap(),
            Path::new("../a.txt")
        );
        // A new name: the directory becomes it.
        unpack(&ar[..], &t.path().join("copy"), Layout::Named, false).unwrap();
        assert_eq!(fs::read(t.path().join("copy/a.txt")).unwrap(), b"alpha");
        // Contents: into the destination itself.
        unpack(&ar[..], &t.path().join("flat"), Layout::Contents, false).unwrap();
        assert_eq!(fs::read(t.path().join("flat/a.txt")).unwrap(), b"alpha");
        // Onto a file: refused.
        let e = unpack(&ar[..], &t.path().join("f.txt"), Layout::Named, false).unwrap_err();
        assert!(matches!(e, CopyError::NotOverwritable(_)), "{e}");
    }

    #[test]
    fn a_file_replaces_a_file_or_goes_into_a_directory() {
        let t = tempfile::tempdir().unwrap();
        tree(t.path());
        let ar = packed(&t.path().join("f.txt"));
        unpack(&ar[..], &t.path().join("d/a.txt"), Layout::Named, false).unwrap();
        assert_eq!(fs::read(t.path().join("d/a.txt")).unwrap(), b"file");
        unpack(&ar[..], &t.path().join("d"), Layout::Named, false).unwrap();
        assert_eq!(fs::read(t.path().join("d/f.txt")).unwrap(), b"file");
        let e = unpack(&ar[..], &t.path().join("nope/x"), Layout::Named, false).unwrap_err();
        assert!(matches!(e, CopyError::NotFound(_)), "{e}");
        let e = unpack(&ar[..], &t.path().join("nope/"), Layout::Named, false).unwrap_err();
        assert!(matches!(e, CopyError::NotFound(_)), "{e}");
    }

    #[test]
    fn missing_sources_are_named() {
        let t = tempfile::tempdir().unwrap();
        let e = pack(&t.path().join("nope"), "nope", false, io::sink()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "no such file or directory: {}",
                t.path().join("nope").display()
            )
        );
    }

    /// A hostile archive: a member that climbs out, and a symlink then a write through it.
    #[test]
    fn members_never_leave_the_destination() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let dest = t.path().join("dest");
        fs::create_dir(&dest).unwrap();

        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        b.append_data(&mut h, "top", io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "top/esc", &outside).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        b.append_data(&mut h, "top/esc/pwned", &b"evil"[..])
            .unwrap();
        let ar = b.into_inner().unwrap();
        let e = unpack(&ar[..], &dest, Layout::Named, false).unwrap_err();
        assert!(matches!(e, CopyError::Unsafe { .. }), "{e}");
        assert!(!outside.join("pwned").exists());

        // `..` in a name (written raw: the tar crate refuses to make one).
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        h.as_gnu_mut().unwrap().name[..10].copy_from_slice(b"top/../../");
        h.set_cksum();
        b.append(&h, &b"evil"[..]).unwrap();
        let ar = b.into_inner().unwrap();
        assert!(unpack(&ar[..], &dest, Layout::Named, false).is_err());

        // A hard link to a file outside.
        fs::write(outside.join("secret"), b"s").unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        b.append_data(&mut h, "top", io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "top/l", outside.join("secret"))
            .unwrap();
        let ar = b.into_inner().unwrap();
        assert!(unpack(&ar[..], &dest.join("x"), Layout::Named, false).is_err());
    }

    #[test]
    fn symlinks_are_archived_as_links_unless_followed() {
        let t = tempfile::tempdir().unwrap();
        tree(t.path());
        let link = t.path().join("d/sub/link");
        let ar = packed(&link);
        let out = t.path().join("o1");
        unpack(&ar[..], &out, Layout::Named, false).unwrap();
        assert!(fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
        let mut v = Vec::new();
        pack(&link, "link", true, &mut v).unwrap();
        let out = t.path().join("o2");
        unpack(&v[..], &out, Layout::Named, false).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"alpha");
    }

    #[test]
    fn raw_archives_unpack_as_named() {
        let t = tempfile::tempdir().unwrap();
        tree(t.path());
        let mut v = Vec::new();
        {
            let mut b = tar::Builder::new(&mut v);
            b.append_dir_all("x", t.path().join("d")).unwrap();
            b.append_path_with_name(t.path().join("f.txt"), "y.txt")
                .unwrap();
            b.finish().unwrap();
        }
        let dest = t.path().join("raw");
        assert!(unpack(&v[..], &dest, Layout::Raw, false).is_err());
        fs::create_dir(&dest).unwrap();
        unpack(&v[..], &dest, Layout::Raw, false).unwrap();
        assert_eq!(fs::read(dest.join("x/sub/b.txt")).unwrap(), b"beta");
        assert_eq!(fs::read(dest.join("y.txt")).unwrap(), b"file");
    }

    fn member(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, mode: u32) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        let data: &[u8] = if kind == tar::EntryType::Regular {
            b"data"
        } else {
            b""
        };
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    }

    /// A compromised agent answers `rctl cp web.1:/etc/hostname ~/` with `.bashrc`, or with
    /// `.ssh/authorized_keys`: refused, nothing written.
    #[test]
    fn m9_cp_refuses_foreign_top_name() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        fs::create_dir(&home).unwrap();
        let want = top_name_in_root("/etc/hostname");
        assert_eq!(want, "hostname");

        let mut b = tar::Builder::new(Vec::new());
        member(&mut b, tar::EntryType::Regular, ".bashrc", 0o644);
        let ar = b.into_inner().unwrap();
        let e = unpack_untrusted(&ar[..], &home, Layout::Named, &want).unwrap_err();
        assert!(matches!(e, CopyError::ForeignTop { .. }), "{e}");
        assert!(e.to_string().contains(".bashrc") && e.to_string().contains("hostname"));
        assert!(!home.join(".bashrc").exists());

        let mut b = tar::Builder::new(Vec::new());
        member(&mut b, tar::EntryType::Directory, ".ssh", 0o700);
        member(
            &mut b,
            tar::EntryType::Regular,
            ".ssh/authorized_keys",
            0o600,
        );
        let ar = b.into_inner().unwrap();
        assert!(unpack_untrusted(&ar[..], &home, Layout::Named, &want).is_err());
        assert!(!home.join(".ssh").exists());

        // The right name, then a second top-level member: refused at the second.
        let mut b = tar::Builder::new(Vec::new());
        member(&mut b, tar::EntryType::Regular, "hostname", 0o644);
        member(&mut b, tar::EntryType::Regular, ".bashrc", 0o644);
        let ar = b.into_inner().unwrap();
        assert!(unpack_untrusted(&ar[..], &home, Layout::Named, &want).is_err());
        assert!(!home.join(".bashrc").exists());

        // What the agent really sends lands as before.
        fs::write(t.path().join("hostname"), b"web-1\n").unwrap();
        let ar = packed(&t.path().join("hostname"));
        unpack_untrusted(&ar[..], &home, Layout::Named, &want).unwrap();
        assert_eq!(fs::read(home.join("hostname")).unwrap(), b"web-1\n");
        // `DIR/.` is named after DIR.
        assert_eq!(top_name_in_root("app/."), "app");
        assert_eq!(top_name_in_root("/"), "rootfs");
    }

    /// A setuid-root binary, a setgid directory, a block device and a FIFO from a container:
    /// the bits are dropped and no special file is made on this machine.
    #[test]
    fn m9_cp_drops_setuid_and_makes_no_devices() {
        let t = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        member(&mut b, tar::EntryType::Directory, "d", 0o2775);
        member(&mut b, tar::EntryType::Regular, "d/rootsh", 0o4755);
        member(&mut b, tar::EntryType::Regular, "d/sgid", 0o2711);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Block);
        h.set_mode(0o666);
        h.set_size(0);
        h.set_device_major(8).unwrap();
        h.set_device_minor(0).unwrap();
        b.append_data(&mut h, "d/sda", io::empty()).unwrap();
        member(&mut b, tar::EntryType::Fifo, "d/fifo", 0o644);
        let ar = b.into_inner().unwrap();
        let out = t.path().join("out");
        unpack_untrusted(&ar[..], &out, Layout::Named, "d").unwrap();
        let mode = |p: &str| fs::metadata(out.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("rootsh"), 0o755);
        assert_eq!(mode("sgid"), 0o711);
        assert_eq!(mode(""), 0o775);
        for special in ["sda", "fifo"] {
            let m = fs::symlink_metadata(out.join(special)).unwrap();
            assert!(m.file_type().is_file(), "{special} is {:?}", m.file_type());
            assert_eq!(m.len(), 0);
        }
        // Inside a container (the agent's confined unpack) the bits stay.
        let inside = t.path().join("inside");
        unpack(&ar[..], &inside, Layout::Named, true).unwrap();
        assert_eq!(
            fs::metadata(inside.join("rootsh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o4755
        );
    }

    /// A symlink as the top-level member, then a member "below" it: that would be written
    /// through the link, outside the destination.
    #[test]
    fn m9_nothing_goes_below_a_top_level_symlink() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "hostname", &outside).unwrap();
        member(&mut b, tar::EntryType::Regular, "hostname/pwned", 0o644);
        let ar = b.into_inner().unwrap();
        let dest = t.path().join("newname");
        let e = unpack(&ar[..], &dest, Layout::Named, false).unwrap_err();
        assert!(matches!(e, CopyError::Unsafe { .. }), "{e}");
        assert!(!outside.join("pwned").exists());
        let e = unpack_untrusted(&ar[..], &t.path().join("other"), Layout::Named, "hostname");
        assert!(e.is_err());
        assert!(!outside.join("pwned").exists());
    }
}

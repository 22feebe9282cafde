//! `COPY` and `ADD`: sources from the context, another stage or a URL, hashed for the cache
//! and written as a tar unpacked by the fs-helper.

use super::*;

// ---- COPY and ADD --------------------------------------------------------------------------

/// What a step does to the image's files.
pub(super) enum FsOp {
    /// `WORKDIR`: make the directory if it is missing.
    Mkdir(String),
    Run {
        argv: Vec<String>,
        env: Vec<String>,
        line: usize,
        mounts: Vec<StepMount>,
        network: RunNetwork,
    },
    Copy(CopyJob),
}

pub(super) struct CopyJob {
    pub(super) src_root: PathBuf,
    pub(super) srcs: Vec<String>,
    pub(super) dest: String,
    pub(super) chown: Option<String>,
    pub(super) chmod: Option<String>,
    pub(super) unpack: bool,
    pub(super) line: usize,
    pub(super) add: bool,
    /// `srcs` are file names, not patterns (files an ADD fetched).
    pub(super) literal: bool,
    /// `--exclude` and `--parents`.
    pub(super) filter: CopyFilter,
}

/// `COPY --exclude=PATTERN…` and `--parents`.
#[derive(Clone, Default)]
pub(super) struct CopyFilter {
    /// The patterns (`.dockerignore` syntax, without exceptions' meaning changed).
    excludes: Option<rudder_image::build_context::DockerIgnore>,
    /// Sources keep their directories (below a `/./` pivot).
    pub(super) parents: bool,
}

impl CopyFilter {
    pub(super) fn new(excludes: &[String], parents: bool) -> CopyFilter {
        CopyFilter {
            excludes: (!excludes.is_empty())
                .then(|| rudder_image::build_context::DockerIgnore::parse(&excludes.join("\n"))),
            parents,
        }
    }

    /// Whether a pattern excludes `rel` below a source whose path from the root is `src_rel`
    /// (`rel` empty: the source itself): matched against the path from the root (`docs/*.md`)
    /// and from the source (`*.md`), as BuildKit matches `--exclude`.
    pub(super) fn excluded(&self, src_rel: &str, rel: &Path) -> bool {
        let Some(ig) = &self.excludes else {
            return false;
        };
        let rel = rel.to_string_lossy();
        if rel.is_empty() {
            // A source itself (a glob's match): by its path or by its name (`*.md` leaves
            // the `.md` files out of `pkg/*`).
            let name = src_rel.rsplit('/').next().unwrap_or_default();
            return ig.is_excluded(src_rel) || ig.is_excluded(name);
        }
        let full = join_member(src_rel.trim_matches('/'), &rel);
        ig.is_excluded(&full) || ig.is_excluded(&rel)
    }
}

impl CopyJob {
    pub(super) fn name(&self) -> &'static str {
        if self.add {
            "ADD"
        } else {
            "COPY"
        }
    }
}

/// The source files a COPY names in `root`: globs expanded (unless `literal`: files an ADD
/// fetched, named by their URLs), paths resolved inside the root.
pub(super) fn sources(
    root: &Path,
    srcs: &[String],
    line: usize,
    literal: bool,
    filter: &CopyFilter,
) -> Result<Vec<Source>, BuildError> {
    let mut out = Vec::new();
    for s in srcs {
        // `--parents`: what is above a `/./` pivot is not kept.
        let pivot = match s.find("/./") {
            Some(p) if filter.parents => clean(&s[..p]).join("/"),
            _ => String::new(),
        };
        if s.contains("://") {
            return Err(BuildError::Invalid(format!(
                "line {line}: {s}: only ADD fetches URLs"
            )));
        }
        let not_found = || {
            BuildError::Step(format!(
                "line {line}: file not found in build context: {s:?}"
            ))
        };
        // A plain path is resolved directly (symlinks on the way followed inside the root);
        // a pattern is expanded first.
        let found = if !literal && s.contains(['*', '?', '[']) {
            rudder_image::build_context::expand_sources(root, s)
                .map_err(|e| BuildError::Step(format!("line {line}: {e}")))?
        } else {
            vec![root.join(clean(s).join("/"))]
        };
        for f in found {
            let rel = f
                .strip_prefix(root)
                .unwrap_or(&f)
                .to_string_lossy()
                .into_owned();
            // As docker: a source that is a link is copied as what it points to.
            let path = resolve_in_root(root, &rel, true).map_err(io_err("resolve", &f))?;
            if fs::symlink_metadata(&path).is_err() {
                return Err(not_found());
            }
            let rel = clean(&rel).join("/");
            if filter.excluded(&rel, Path::new("")) {
                continue;
            }
            let name = if filter.parents {
                rel.strip_prefix(&pivot)
                    .map(|r| r.trim_start_matches('/'))
                    .unwrap_or(&rel)
                    .to_string()
            } else {
                Path::new(&rel)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            out.push(Source { path, name, rel });
        }
    }
    Ok(out)
}

/// Free space an `ADD <url>` leaves on the build's disk.
pub(super) const FETCH_RESERVE: u64 = 512 << 20;

/// A URL as shown in progress and errors: without the user and password it may carry.
pub(super) fn redacted(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// A COPY source: where it is, and the name it is copied under.
pub(super) struct Source {
    pub(super) path: PathBuf,
    /// Its name in the destination (with `--parents`, its path below the pivot).
    pub(super) name: String,
    /// Its path from the root, cleaned (for `--exclude`).
    pub(super) rel: String,
}

/// A digest of the sources (names, modes, owners, contents, link targets; not times).
pub(super) fn hash_sources(
    root: &Path,
    srcs: &[String],
    line: usize,
    literal: bool,
    filter: &CopyFilter,
) -> Result<String, BuildError> {
    let mut h = Sha256::new();
    for src in sources(root, srcs, line, literal, filter)? {
        let rel = PathBuf::from(&src.name);
        walk(&src.path, Path::new(""), &mut |path, name, meta| {
            if filter.excluded(&src.rel, name) {
                return Ok(());
            }
            h.update(rel.join(name).to_string_lossy().as_bytes());
            h.update([0]);
            h.update(meta.mode().to_le_bytes());
            h.update(meta.uid().to_le_bytes());
            h.update(meta.gid().to_le_bytes());
            if meta.file_type().is_symlink() {
                h.update(fs::read_link(path)?.to_string_lossy().as_bytes());
            } else if meta.is_file() {
                let mut f = fs::File::open(path)?;
                io::copy(&mut f, &mut HashWrite(&mut h))?;
            }
            h.update([0]);
            Ok(())
        })
        .map_err(io_err("read", &src.path))?;
    }
    Ok(digest::finish(h))
}

pub(super) struct HashWrite<'a>(&'a mut Sha256);
impl Write for HashWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Visits `path` and, for a directory, everything below it (sorted, never following a
/// symlink): `f(host path, name relative to path, metadata)`.
pub(super) fn walk(
    path: &Path,
    rel: &Path,
    f: &mut dyn FnMut(&Path, &Path, &fs::Metadata) -> io::Result<()>,
) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    f(path, rel, &meta)?;
    if meta.is_dir() {
        let mut names: Vec<_> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for n in names {
            walk(&path.join(&n), &rel.join(&n), f)?;
        }
    }
    Ok(())
}

/// Whether a file is a tar archive (plain or compressed) ADD should unpack.
pub(super) fn is_archive(path: &Path) -> bool {
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    let Ok(mut r) = rudder_image::layer::decompressed(f) else {
        return false;
    };
    let mut head = [0u8; 512];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return false,
        }
    }
    got == 512 && &head[257..262] == b"ustar"
}

/// The COPY/ADD as a tar whose members are named from the image's root.
pub(super) fn copy_tar(root: &Path, job: &CopyJob, out: &mut dyn Write) -> Result<(), BuildError> {
    let srcs = sources(&job.src_root, &job.srcs, job.line, job.literal, &job.filter)?;
    let parents = job.filter.parents;
    let name = job.name();
    let dest_is_dir_syntax = job.dest.ends_with('/') || parents;
    let dest_exists_dir = resolve_in_root(root, &job.dest, true).is_ok_and(|h| h.is_dir());
    if srcs.len() > 1 && !dest_is_dir_syntax && !dest_exists_dir {
        return Err(BuildError::Step(format!(
            "{name} (line {}): when using {name} with more than one source file, the destination must be a directory and end with a /",
            job.line
        )));
    }
    let owner =
        match &job.chown {
            Some(c) => Some(resolve_chown(root, c).map_err(|e| {
                BuildError::Step(format!("{name} --chown (line {}): {e}", job.line))
            })?),
            None => None,
        };
    let chmod = match &job.chmod {
        Some(m) => Some(u32::from_str_radix(m, 8).map_err(|_| {
            BuildError::Invalid(format!(
                "{name} --chmod (line {}): {m:?} is not an octal mode",
                job.line
            ))
        })?),
        None => None,
    };
    let dest = clean(&job.dest).join("/");
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    // Parents the image lacks, made like docker does (0755, root).
    let mut made: HashSet<String> = HashSet::new();
    let mut ensure_parents =
        |b: &mut tar::Builder<&mut dyn Write>, member: &str| -> io::Result<()> {
            let parts: Vec<&str> = member.split('/').collect();
            for i in 1..parts.len() {
                let p = parts[..i].join("/");
                if made.contains(&p) {
                    continue;
                }
                made.insert(p.clone());
                if resolve_in_root(root, &p, true).is_ok_and(|h| h.is_dir()) {
                    continue;
                }
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                let (uid, gid) = owner.unwrap_or((0, 0));
                h.set_uid(uid as u64);
                h.set_gid(gid as u64);
                b.append_data(&mut h, &p, io::empty())?;
            }
            Ok(())
        };
    let tar_err = |e: io::Error| BuildError::Other(format!("{name}: {e}"));
    for Source {
        path: src,
        name: base,
        rel: src_rel,
    } in &srcs
    {
        let meta = fs::symlink_metadata(src).map_err(io_err("stat", src))?;
        if meta.is_dir() {
            // A directory's contents go into dest (with --parents, into its path there).
            let dest = if parents && !base.is_empty() {
                join_member(&dest, base)
            } else {
                dest.clone()
            };
            walk(src, Path::new(""), &mut |path, rel, m| {
                if job.filter.excluded(src_rel, rel) {
                    return Ok(());
                }
                if rel.as_os_str().is_empty() {
                    if dest.is_empty() {
                        return Ok(());
                    }
                    ensure_parents(&mut b, &format!("{dest}/x"))?;
                    return Ok(());
                }
                let member = join_member(&dest, &rel.to_string_lossy());
                ensure_parents(&mut b, &member)?;
                append(&mut b, path, &member, m, owner, chmod)
            })
            .map_err(tar_err)?;
        } else if job.unpack && meta.is_file() && is_archive(src) {
            let f = fs::File::open(src).map_err(io_err("open", src))?;
            let r = rudder_image::layer::decompressed(f).map_err(other)?;
            let mut ar = tar::Archive::new(r);
            for e in ar.entries().map_err(tar_err)? {
                let mut e = e.map_err(tar_err)?;
                let rel = clean(&String::from_utf8_lossy(&e.path_bytes())).join("/");
                if rel.is_empty() {
                    continue;
                }
                let member = join_member(&dest, &rel);
                ensure_parents(&mut b, &member).map_err(tar_err)?;
                // A fresh header: the archive's may have fields a strict reader refuses.
                let src_h = e.header();
                let kind = src_h.entry_type();
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_mode(chmod.unwrap_or(src_h.mode().unwrap_or(0o644)));
                h.set_mtime(src_h.mtime().unwrap_or(0));
                let (uid, gid) = owner.unwrap_or((
                    src_h.uid().unwrap_or(0) as u32,
                    src_h.gid().unwrap_or(0) as u32,
                ));
                h.set_uid(uid as u64);
                h.set_gid(gid as u64);
                if let (Ok(major), Ok(minor)) = (src_h.device_major(), src_h.device_minor()) {
                    let _ = h.set_device_major(major.unwrap_or(0));
                    let _ = h.set_device_minor(minor.unwrap_or(0));
                }
                let link = e
                    .link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned());
                h.set_size(e.size());
                match (kind, link) {
                    (k, Some(link)) if k.is_hard_link() => {
                        let target = join_member(&dest, &clean(&link).join("/"));
                        h.set_size(0);
                        b.append_link(&mut h, &member, target).map_err(tar_err)?;
                    }
                    (k, Some(link)) if k.is_symlink() => {
                        h.set_size(0);
                        b.append_link(&mut h, &member, link).map_err(tar_err)?;
                    }
                    // The member's bytes stream through (a sparse one reads as its full size).
                    (k, _) if k.is_file() || k == tar::EntryType::GNUSparse => {
                        h.set_entry_type(tar::EntryType::Regular);
                        b.append_data(&mut h, &member, &mut e).map_err(tar_err)?
                    }
                    _ => {
                        h.set_size(0);
                        b.append_data(&mut h, &member, io::empty())
                            .map_err(tar_err)?
                    }
                }
            }
        } else {
            let member = if dest_is_dir_syntax || dest_exists_dir || srcs.len() > 1 {
                join_member(&dest, base)
            } else {
                dest.clone()
            };
            ensure_parents(&mut b, &member).map_err(tar_err)?;
            append(&mut b, src, &member, &meta, owner, chmod).map_err(tar_err)?;
        }
    }
    b.into_inner().map_err(tar_err)?;
    Ok(())
}

pub(super) fn join_member(dest: &str, rel: &str) -> String {
    if dest.is_empty() {
        rel.to_string()
    } else {
        format!("{dest}/{rel}")
    }
}

/// One file, directory or link as a member (owner root or `--chown`, mode or `--chmod`).
pub(super) fn append(
    b: &mut tar::Builder<&mut dyn Write>,
    path: &Path,
    member: &str,
    meta: &fs::Metadata,
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    let (uid, gid) = owner.unwrap_or((0, 0));
    h.set_uid(uid as u64);
    h.set_gid(gid as u64);
    h.set_username("").ok();
    h.set_groupname("").ok();
    if let Some(m) = chmod {
        if !meta.file_type().is_symlink() {
            h.set_mode(m);
        }
    }
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path)?;
        h.set_size(0);
        b.append_link(&mut h, member, target)
    } else if ft.is_dir() {
        h.set_size(0);
        b.append_data(&mut h, member, io::empty())
    } else if ft.is_file() {
        let f = fs::File::open(path)?;
        b.append_data(&mut h, member, f)
    } else {
        // FIFOs, sockets and devices are not copied, as docker skips what it cannot read.
        Ok(())
    }
}

impl Run<'_> {
    /// `COPY`/`ADD`: the sources as a tar, unpacked into the mounted image at `root`.
    pub(super) async fn copy(&self, root: PathBuf, job: CopyJob) -> Result<(), BuildError> {
        let r = root.clone();
        self.unpack_from(&root, move |out| copy_tar(&r, &job, out))
            .await
    }
}

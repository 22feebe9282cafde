//! `RUN --mount`: what each mount is on this host, as OCI mounts of the step's container.
//! - `bind`: a path of the context (default) or of a stage or image (`from=`), resolved inside
//!   its root (a `..` that leaves it is refused; symlinks resolve inside it), read-only; `rw`
//!   gives the step a writable overlay of it whose writes are thrown away with the step.
//! - `cache`: `<data>/build-cache/mounts/<sha256(id)>` (the parent 0700), made on first use
//!   with the mount's mode (default 0755) and owner, seeded from `from`/`source` then; kept
//!   across builds and never part of a layer. One RUN at a time uses a cache dir (`sharing`
//!   `locked`; `shared` and `private` are honoured as `locked`).
//! - `tmpfs`: a tmpfs, `size` bytes at most.
//! - `secret`: the bytes `rctl build --secret` sent, written 0400 (or `mode`) owned by
//!   `uid`/`gid` into the step's 0700 dir and bind-mounted read-only; `env=` also gives it as
//!   a variable. Never in a layer, the cache key or the history.
//!
//! Invariant: the mount points the runtime makes in the image (a missing target and its
//! parents) are taken out of the step's upper dir after it ran, so only what the command
//! wrote reaches the layer; a secret's mount point made inside a cache dir is removed too.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{LazyLock, Mutex};

use oci_spec::runtime::{Mount as OciMount, MountBuilder};
use rudder_image::dockerfile::{MountKind, RunMount};

use super::*;

/// The most bytes of secrets one build may carry (each secret also at most the secret limit).
pub(super) const MAX_SECRETS_BYTES: usize = 2 << 20;
/// The most secrets one build may carry.
pub(super) const MAX_SECRETS: usize = 64;

/// One lock per cache dir on this host: RUNs of concurrent builds that share a cache id take
/// turns (`sharing=locked`). Process-wide because one agent serves every build of its host.
static CACHE_LOCKS: LazyLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A mount of a RUN with what it needs from the host, found before the step runs.
#[derive(Debug, Clone)]
pub(super) struct StepMount {
    pub(super) mount: RunMount,
    /// bind: the source on the host; cache: what seeds a new cache dir (`from=`).
    pub(super) host: Option<PathBuf>,
}

/// Checks the secrets a build was given: ids as a RUN names them, sizes within the limits.
pub(super) fn check_secrets(
    secrets: &[rudder_proto::v1::BuildSecret],
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    if secrets.len() > MAX_SECRETS {
        return Err(format!(
            "build: {} secrets: at most {MAX_SECRETS}",
            secrets.len()
        ));
    }
    let mut total = 0;
    let mut out = BTreeMap::new();
    for s in secrets {
        let valid = !s.id.is_empty()
            && s.id.len() <= 128
            && !s.id.starts_with('.')
            && s.id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            return Err(format!(
                "build: secret id {:?}: use letters, digits, '-', '_' and '.'",
                s.id
            ));
        }
        rudder_model::secret::check_size(&format!("secret {}", s.id), s.data.len())
            .map_err(|e| format!("build: {e}"))?;
        total += s.data.len();
        if total > MAX_SECRETS_BYTES {
            return Err(format!(
                "build: the secrets total over {MAX_SECRETS_BYTES} bytes"
            ));
        }
        if out.insert(s.id.clone(), s.data.clone()).is_some() {
            return Err(format!("build: secret {:?} given twice", s.id));
        }
    }
    Ok(out)
}

/// A bind source: `source` in `root`, refused when it leaves the root lexically (`../`),
/// resolved inside it otherwise (a symlink cannot point out of it), and present.
pub(super) fn bind_source(root: &Path, source: &str, line: usize) -> Result<PathBuf, BuildError> {
    let mut depth = 0i32;
    for c in Path::new(source).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(BuildError::Invalid(format!(
                        "RUN --mount (line {line}): source {source:?} leaves the build context"
                    )));
                }
            }
            _ => {}
        }
    }
    let path = resolve_in_root(root, source, true).map_err(|e| {
        BuildError::Step(format!("RUN --mount (line {line}): source {source:?}: {e}"))
    })?;
    if fs::symlink_metadata(&path).is_err() {
        return Err(BuildError::Step(format!(
            "RUN --mount (line {line}): source {source:?} not found"
        )));
    }
    Ok(path)
}

/// What [`Run::prepare_mounts`] made: the OCI mounts, secret variables, the cache locks held
/// while the step runs, and what to clean after it.
#[derive(Default)]
pub(super) struct Prepared {
    pub(super) oci: Vec<OciMount>,
    pub(super) env: Vec<String>,
    pub(super) _locks: Vec<tokio::sync::OwnedMutexGuard<()>>,
    /// Targets relative to `/` that the image lacked: mount points to take out of the upper.
    created: Vec<String>,
    /// Existing directories above a target, with their (mode, uid, gid): copied up when the
    /// runtime made a mount point below them.
    above: Vec<(String, (u32, u32, u32))>,
    /// Mount points inside a cache dir (a secret or bind target below a cache target) that
    /// did not exist before: removed from the cache dir after the step.
    in_cache: Vec<PathBuf>,
}

fn opt(options: &[&str]) -> Vec<String> {
    options.iter().map(|o| o.to_string()).collect()
}

fn oci_mount(
    target: &str,
    typ: &str,
    source: &Path,
    options: Vec<String>,
) -> Result<OciMount, BuildError> {
    MountBuilder::default()
        .destination(target)
        .typ(typ)
        .source(source)
        .options(options)
        .build()
        .map_err(other)
}

/// Copies `from` (a file or a directory tree) into `to`, keeping modes and owners; symlinks
/// are copied as links.
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    walk(from, Path::new(""), &mut |path, rel, meta| {
        let dest = if rel.as_os_str().is_empty() {
            to.to_path_buf()
        } else {
            to.join(rel)
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            if !dest.is_dir() {
                fs::create_dir(&dest)?;
            }
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(path)?, &dest)?;
            return Ok(());
        } else if ft.is_file() {
            fs::copy(path, &dest)?;
        } else {
            return Ok(());
        }
        fs::set_permissions(&dest, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        std::os::unix::fs::chown(&dest, Some(meta.uid()), Some(meta.gid()))
    })
}

impl Run<'_> {
    /// The host side of a RUN's mounts (see the module doc); `root` is the mounted image,
    /// `step` the step's scratch dir.
    pub(super) async fn prepare_mounts(
        &self,
        root: &Path,
        step: &Path,
        mounts: &[StepMount],
        line: usize,
    ) -> Result<Prepared, BuildError> {
        let at = |m: String| BuildError::Step(format!("RUN --mount (line {line}): {m}"));
        let mut p = Prepared::default();
        // Parents before children: a secret inside a cache dir is mounted over the cache.
        let mut mounts: Vec<&StepMount> = mounts.iter().collect();
        mounts.sort_by_key(|m| clean(&m.mount.target).len());
        let mut cache_targets: Vec<(String, PathBuf)> = Vec::new();
        let mut locked: Vec<PathBuf> = Vec::new();
        for (n, sm) in mounts.iter().enumerate() {
            let m = &sm.mount;
            if m.kind == MountKind::Secret && m.target.is_empty() && m.env.is_none() {
                continue;
            }
            let secret = match m.kind {
                MountKind::Secret => {
                    let id = m.id.clone().unwrap_or_default();
                    match self.secrets.get(&id) {
                        Some(data) => Some(data),
                        None if m.required => {
                            return Err(at(format!(
                                "secret {id:?} is required: pass it with `rctl build --secret id={id},src=FILE`"
                            )))
                        }
                        None => continue,
                    }
                }
                _ => None,
            };
            if let (Some(var), Some(data)) = (&m.env, secret) {
                let value = std::str::from_utf8(data).map_err(|_| {
                    at(format!(
                        "secret {:?} is not text: it cannot be env={var}",
                        m.id
                    ))
                })?;
                p.env.push(format!("{var}={value}"));
            }
            if m.target.is_empty() {
                continue;
            }
            // The mount point, and what the runtime will create for it.
            let rel = clean(&m.target).join("/");
            let missing = missing_dirs(root, &m.target);
            let target_exists =
                resolve_in_root(root, &rel, true).is_ok_and(|h| fs::symlink_metadata(h).is_ok());
            if !target_exists || !missing.is_empty() {
                let parts = clean(&m.target);
                for i in 1..parts.len() {
                    let a = parts[..i].join("/");
                    if missing.contains(&a) {
                        break;
                    }
                    if let Ok(meta) = resolve_in_root(root, &a, true).and_then(fs::metadata) {
                        p.above.push((a, (meta.mode(), meta.uid(), meta.gid())));
                    }
                }
                p.created.extend(missing.iter().cloned());
                if !missing.contains(&rel) {
                    p.created.push(rel.clone());
                }
                // Below a cache target: the mount point is made in the cache dir.
                for (ct, dir) in &cache_targets {
                    if let Some(below) = rel.strip_prefix(&format!("{ct}/")) {
                        let host = dir.join(below);
                        if fs::symlink_metadata(&host).is_err() {
                            p.in_cache.push(host);
                        }
                    }
                }
            }
            let mount = match m.kind {
                MountKind::Bind => {
                    let src = sm.host.clone().ok_or_else(|| at("no source".into()))?;
                    if m.readonly {
                        oci_mount(&m.target, "bind", &src, opt(&["rbind", "rprivate", "ro"]))?
                    } else {
                        // Writes go to a copy thrown away with the step.
                        let copy = step.join(format!("bind-rw-{n}"));
                        let (from, to) = (src.clone(), copy.clone());
                        tokio::task::spawn_blocking(move || copy_tree(&from, &to))
                            .await
                            .map_err(other)?
                            .map_err(io_err("copy a bind source to", &copy))?;
                        oci_mount(&m.target, "bind", &copy, opt(&["rbind", "rprivate"]))?
                    }
                }
                MountKind::Tmpfs => {
                    let mut o = opt(&["nosuid", "nodev"]);
                    if let Some(size) = m.size_bytes() {
                        o.push(format!("size={size}"));
                    }
                    oci_mount(&m.target, "tmpfs", Path::new("tmpfs"), o)?
                }
                MountKind::Cache => {
                    let dir = self.cache_dir(m, sm.host.as_deref()).await?;
                    if !locked.contains(&dir) {
                        let lock = CACHE_LOCKS
                            .lock()
                            .map_err(|_| other("the cache locks are poisoned"))?
                            .entry(dir.clone())
                            .or_default()
                            .clone();
                        if lock.try_lock().is_err() {
                            self.progress
                                .line(format!(
                                    " ---> waiting for cache {:?}",
                                    m.id.as_deref().unwrap_or_default()
                                ))
                                .await;
                        }
                        p._locks.push(lock.lock_owned().await);
                        locked.push(dir.clone());
                    }
                    cache_targets.push((rel.clone(), dir.clone()));
                    let mut o = opt(&["rbind", "rprivate"]);
                    if m.readonly {
                        o.push("ro".into());
                    }
                    oci_mount(&m.target, "bind", &dir, o)?
                }
                MountKind::Secret => {
                    let data = secret.expect("a secret's data");
                    let dir = step.join("secrets");
                    crate::datadir::private_dir(&dir).map_err(io_err("create", &dir))?;
                    let file = dir.join(n.to_string());
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o400)
                        .open(&file)
                        .map_err(io_err("create", &file))?;
                    f.write_all(data).map_err(io_err("write", &file))?;
                    let (uid, gid) = m.owner();
                    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                        .map_err(io_err("chown", &file))?;
                    f.set_permissions(fs::Permissions::from_mode(m.mode_or(0o400)))
                        .map_err(io_err("chmod", &file))?;
                    oci_mount(
                        &m.target,
                        "bind",
                        &file,
                        opt(&["rbind", "rprivate", "ro", "nosuid", "nodev", "noexec"]),
                    )?
                }
            };
            p.oci.push(mount);
        }
        Ok(p)
    }

    /// The cache dir of a cache mount, made on first use (mode, owner, seeded from `seed`).
    async fn cache_dir(&self, m: &RunMount, seed: Option<&Path>) -> Result<PathBuf, BuildError> {
        let parent = self.b.cache.join("mounts");
        crate::datadir::private_dir(&parent).map_err(io_err("create", &parent))?;
        let id = m.id.clone().unwrap_or_else(|| m.target.clone());
        let dir = parent.join(hex::encode(Sha256::digest(id.as_bytes())));
        if dir.is_dir() {
            return Ok(dir);
        }
        let tmp = parent.join(format!(
            ".new-{}",
            hex::encode(Sha256::digest(self.dir.display().to_string().as_bytes()))
        ));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(io_err("create", &tmp))?;
        if let Some(seed) = seed {
            let (from, to) = (seed.to_path_buf(), tmp.clone());
            tokio::task::spawn_blocking(move || copy_tree(&from, &to))
                .await
                .map_err(other)?
                .map_err(io_err("seed", &tmp))?;
        }
        let (uid, gid) = m.owner();
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).map_err(io_err("chown", &tmp))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(m.mode_or(0o755)))
            .map_err(io_err("chmod", &tmp))?;
        if let Err(e) = fs::rename(&tmp, &dir) {
            // Another build made it meanwhile.
            let _ = fs::remove_dir_all(&tmp);
            if !dir.is_dir() {
                return Err(io_err("create", &dir)(e));
            }
        }
        Ok(dir)
    }
}

/// Whether a directory of the upper dir is opaque (recreated over a lower one).
fn opaque(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return true;
    };
    let name = c"trusted.overlay.opaque";
    // SAFETY: both are NUL-terminated; a null buffer of size 0 asks for the size only.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    n >= 0
}

impl Prepared {
    /// Takes the mount points the runtime made out of the step's upper dir (empty ones only:
    /// what the command wrote there stays) and out of the cache dirs.
    pub(super) fn clean_after(&self, upper: &Path) {
        let mut created = self.created.clone();
        created.sort_by_key(|r| std::cmp::Reverse(r.len()));
        created.dedup();
        for rel in &created {
            let p = upper.join(rel);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() && m.len() == 0 => {
                    let _ = fs::remove_file(&p);
                }
                Ok(m) if m.is_dir() && !opaque(&p) => {
                    let _ = fs::remove_dir(&p);
                }
                _ => {}
            }
        }
        let mut above = self.above.clone();
        above.sort_by_key(|(r, _)| std::cmp::Reverse(r.len()));
        for (rel, before) in &above {
            let p = upper.join(rel);
            let unchanged = fs::symlink_metadata(&p)
                .is_ok_and(|m| m.is_dir() && (m.mode(), m.uid(), m.gid()) == *before);
            if unchanged && !opaque(&p) {
                let _ = fs::remove_dir(&p);
            }
        }
        for p in &self.in_cache {
            if fs::symlink_metadata(p).is_ok_and(|m| (m.is_file() && m.len() == 0) || m.is_dir()) {
                let _ = fs::remove_file(p).or_else(|_| fs::remove_dir(p));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_sources_stay_in_the_context() {
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        fs::create_dir_all(ctx.join("src")).unwrap();
        fs::write(ctx.join("src/a"), "a").unwrap();
        fs::write(t.path().join("outside"), "host file").unwrap();
        std::os::unix::fs::symlink("../../outside", ctx.join("src/up")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", ctx.join("abs")).unwrap();
        assert_eq!(bind_source(&ctx, "src/a", 3).unwrap(), ctx.join("src/a"));
        assert_eq!(bind_source(&ctx, "/", 3).unwrap(), ctx.clone());
        let e = bind_source(&ctx, "../outside", 3).unwrap_err().to_string();
        assert_eq!(
            e,
            "RUN --mount (line 3): source \"../outside\" leaves the build context"
        );
        assert!(bind_source(&ctx, "src/../../outside", 3).is_err());
        // Symlinks resolve inside the context: neither reaches the host's files.
        assert!(bind_source(&ctx, "src/up", 3).is_err());
        assert!(bind_source(&ctx, "abs", 3).is_err());
    }

    #[test]
    fn copy_parents_and_excludes_pick_sources() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for f in ["pkg/a/one.txt", "pkg/a/no.md", "docs/x.md", "docs/keep.txt"] {
            fs::create_dir_all(r.join(f).parent().unwrap()).unwrap();
            fs::write(r.join(f), f).unwrap();
        }
        let names = |srcs: &[&str], f: &CopyFilter| -> Vec<String> {
            let srcs: Vec<String> = srcs.iter().map(|s| s.to_string()).collect();
            sources(r, &srcs, 1, false, f)
                .unwrap()
                .into_iter()
                .map(|s| s.name)
                .collect()
        };
        let parents = CopyFilter::new(&["*.md".into()], true);
        assert_eq!(names(&["./pkg/./a/*"], &parents), ["a/one.txt"]);
        assert_eq!(names(&["pkg/a/one.txt"], &parents), ["pkg/a/one.txt"]);
        let plain = CopyFilter::default();
        assert_eq!(names(&["pkg/a/one.txt"], &plain), ["one.txt"]);
        // Excluded files are not part of the key: changing one changes nothing.
        let ex = CopyFilter::new(&["*.md".into()], false);
        let key = hash_sources(r, &["docs".into()], 1, false, &ex).unwrap();
        fs::write(r.join("docs/x.md"), "changed").unwrap();
        assert_eq!(
            hash_sources(r, &["docs".into()], 1, false, &ex).unwrap(),
            key
        );
        fs::write(r.join("docs/keep.txt"), "changed").unwrap();
        assert_ne!(
            hash_sources(r, &["docs".into()], 1, false, &ex).unwrap(),
            key
        );
    }

    #[test]
    fn secrets_are_checked() {
        let s = |id: &str, n: usize| rudder_proto::v1::BuildSecret {
            id: id.into(),
            data: vec![b'x'; n],
            name: String::new(),
        };
        assert_eq!(check_secrets(&[s("token", 3)]).unwrap()["token"], b"xxx");
        assert!(check_secrets(&[s("../x", 1)]).is_err());
        assert!(check_secrets(&[s("a", 1), s("a", 1)]).is_err());
        let e = check_secrets(&[s("big", 600 << 10)]).unwrap_err();
        assert!(e.contains("over the limit"), "{e}");
    }

    #[test]
    fn mount_points_leave_the_upper_dir() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let upper = t.path().join("upper");
        fs::create_dir_all(root.join("root")).unwrap();
        let p = Prepared {
            created: vec![
                "root/.cache".into(),
                "run".into(),
                "run/secrets".into(),
                "run/secrets/k".into(),
                "keep".into(),
            ],
            above: vec![("root".into(), {
                let m = fs::metadata(root.join("root")).unwrap();
                (m.mode(), m.uid(), m.gid())
            })],
            ..Prepared::default()
        };
        fs::create_dir_all(upper.join("root/.cache")).unwrap();
        fs::create_dir_all(upper.join("run/secrets")).unwrap();
        fs::write(upper.join("run/secrets/k"), "").unwrap();
        fs::create_dir_all(upper.join("keep")).unwrap();
        fs::write(upper.join("keep/written"), "by the command").unwrap();
        fs::set_permissions(
            upper.join("root"),
            fs::metadata(root.join("root")).unwrap().permissions(),
        )
        .unwrap();
        p.clean_after(&upper);
        let left: Vec<_> = fs::read_dir(&upper)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["keep"]);
    }
}

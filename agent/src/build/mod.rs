//! `rctl build` on the host: a Dockerfile and its context become an image, step by step, with
//! a layer cache.
//!
//! The controller relays the inputs (parameters, then the context tar) and stores what this
//! module sends back: progress lines, each blob the cluster registry lacks, then the image's
//! config and manifest. The Dockerfile is parsed and its variables resolved by the pure
//! `rudder_image::dockerfile`; this module does what touches files and processes:
//! - `FROM`: a previous stage, `scratch`, or an image pulled from the cluster registry into
//!   the host's content store (layers unpacked once, shared with the containers).
//! - `RUN`: a container (the OCI runtime's `run`, in the foreground) over an overlayfs of the
//!   layers so far with a fresh upper dir; the host's bridge (or, `--network=none`, only
//!   loopback); `--mount`s of caches, secrets, binds and tmpfs (`mounts`); output streamed as
//!   progress.
//! - `COPY`/`ADD`: a tar made here from the context (or another stage's files), unpacked by
//!   `rudder-agent fs-helper` chrooted into the same kind of overlay mount, so nothing is
//!   written through a symlink of the image. `ADD` unpacks local tar archives, and fetches
//!   `http(s)://` URLs (https checked against the system's roots) into the build's scratch
//!   directory first, then copies them like context files (never unpacked; mode 0600; the
//!   server's Last-Modified as mtime).
//! - `WORKDIR` makes its directory when the image lacks it.
//! - `ONBUILD` triggers recorded in a registry base image run right after its FROM, before the
//!   stage's own steps and cached like them; the new image does not inherit them.
//! - Metadata steps change the image config only.
//!
//! A step that changes files becomes one layer: its upper dir, written as a tar+gzip blob
//! (deletions as whiteouts, `commit::make_layer`) into the content store and unpacked there.
//!
//! **Cache.** Each step has a key: the previous step's key, the step as resolved (variables
//! substituted, the image settings after it) and, for COPY/ADD, a digest of the source files
//! (names, modes, owners, contents and link targets; not mtimes; for a URL, the bytes fetched,
//! so a changed file at the same address rebuilds). A key seen before, whose
//! layer is still in the store, reuses that layer and the time it was made, so a fully
//! cached build produces the same image digest again. `--no-cache` rebuilds every step (and
//! records the new results).
//!
//! Invariants: nothing of the context or of another stage is read through a symlink that
//! leaves its root (paths resolve inside the root, as in a chroot); every mount and scratch
//! directory of a build is removed when it ends, however it ends; a RUN's container is
//! deleted even when the build is abandoned.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use rudder_image::dockerfile::{
    self, Action, Dockerfile, Instr, MountKind, RunNetwork, Settings, Stage, StageBuilder,
};
use rudder_image::oci::{Descriptor, Manifest, OCI_CONFIG, OCI_LAYER_TAR_GZIP, OCI_MANIFEST};
use rudder_image::{digest, ImageStore, Reference, RegistryClient};
use rudder_proto::v1::build_input::Msg as In;
use rudder_proto::v1::build_output::Msg as Out;
use rudder_proto::v1::{BuildBlob, BuildImage, BuildInput, BuildOutput, BuildParams};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Response, Status, Streaming};
use tracing::{info, warn};

use crate::exec::ContainerAccess;
use crate::fs_helper::{HelperArgs, Op};
use crate::runtime::ContainerRuntime;
use crate::shim::ContainerDir;

mod cache;
mod copy;
mod mounts;
mod resolve;
mod run;

use cache::*;
use copy::*;
use mounts::*;
use resolve::*;
#[cfg(test)]
use run::*;

/// What a build sends back.
pub type BuildStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<BuildOutput, Status>> + Send>>;

const CHUNK: usize = 256 * 1024;
/// How many symlinks one path may pass through while resolved inside a root.
const MAX_LINKS: usize = 40;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What builds on this host need.
#[derive(Clone)]
pub struct Builder {
    pub images: ImageStore,
    pub access: ContainerAccess,
    pub cgroup_parent: String,
    /// `<data>/builds`: one scratch directory per build.
    pub scratch: PathBuf,
    /// `<data>/build-cache`: one small JSON file per step key.
    pub cache: PathBuf,
    /// This node's certificate for the cluster registry (plain HTTP when `None`).
    pub registry_tls: Option<tokio::sync::watch::Receiver<rudder_pki::tls::NodeCerts>>,
    /// The host's networks: a RUN joins the local bridge. `None` (tests): the host's network.
    pub net: Option<Arc<crate::net::Overlay>>,
}

impl Builder {
    /// Removes what builds interrupted by an agent restart left: their mounts (deepest
    /// first), then their scratch directories.
    pub async fn sweep(&self) {
        // RUN containers an interrupted build left running (ids `build-…`).
        let rt = &self.access.runtime;
        for id in rt.list().await.unwrap_or_default() {
            if id.starts_with("build-") {
                info!(
                    id,
                    "build: removing a RUN container an interrupted build left"
                );
                let _ = rt.delete(&id, &self.scratch).await;
            }
        }
        let Ok(entries) = fs::read_dir(&self.scratch) else {
            return;
        };
        let prefix = format!("{}/", self.scratch.display());
        let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = umount2(Path::new(&m), MntFlags::MNT_DETACH);
        }
        for e in entries.flatten() {
            info!(dir = %e.path().display(), "build: removing what an interrupted build left");
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile or an argument is wrong: the user's to fix.
    #[error("{0}")]
    Invalid(String),
    /// A step failed (a RUN's exit code, a COPY source missing).
    #[error("{0}")]
    Step(String),
    #[error("build: {op} {path}: {err}")]
    Io {
        op: &'static str,
        path: String,
        err: io::Error,
    },
    #[error("build: {0}")]
    Other(String),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BuildError {
    let path = path.display().to_string();
    move |err| BuildError::Io { op, path, err }
}

fn other(e: impl std::fmt::Display) -> BuildError {
    BuildError::Other(e.to_string())
}

/// A layer of the image being built.
/// Sends progress lines; a caller that went away does not stop the build.
#[derive(Clone)]
struct Progress(mpsc::Sender<Result<BuildOutput, Status>>);

impl Progress {
    async fn line(&self, s: impl Into<String>) {
        let _ = self
            .0
            .send(Ok(BuildOutput {
                msg: Some(Out::Progress(s.into())),
            }))
            .await;
    }
    async fn send(&self, msg: Out) -> Result<(), BuildError> {
        self.0
            .send(Ok(BuildOutput { msg: Some(msg) }))
            .await
            .map_err(|_| BuildError::Other("the controller went away".into()))
    }
}

/// Serves `AgentApi.Build`.
pub async fn build(
    b: Arc<Builder>,
    mut inputs: Streaming<BuildInput>,
) -> Result<Response<BuildStream>, Status> {
    let params = match inputs.message().await? {
        Some(BuildInput {
            msg: Some(In::Params(p)),
        }) => p,
        _ => return Err(Status::invalid_argument("build: parameters first")),
    };
    let name = if params.dockerfile_name.is_empty() {
        "Dockerfile".to_string()
    } else {
        params.dockerfile_name.clone()
    };
    let df = dockerfile::parse(&params.dockerfile)
        .map_err(|e| Status::invalid_argument(format!("{name}: {e}")))?;
    let secrets = check_secrets(&params.secrets).map_err(Status::invalid_argument)?;
    crate::datadir::private_dir(&b.scratch)
        .and_then(|()| crate::datadir::private_dir(&b.cache))
        .map_err(|e| Status::internal(format!("build: create scratch dirs: {e}")))?;
    let dir = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&b.scratch)
        .map_err(|e| Status::internal(format!("build: scratch dir: {e}")))?;
    // The context, as it streams in.
    let tar_path = dir.path().join("context.tar");
    let mut tar = tokio::fs::File::create(&tar_path)
        .await
        .map_err(|e| Status::internal(format!("build: context file: {e}")))?;
    let mut context_bytes = 0u64;
    while let Some(m) = inputs.message().await? {
        if let Some(In::Context(data)) = m.msg {
            context_bytes += data.len() as u64;
            tar.write_all(&data)
                .await
                .map_err(|e| Status::internal(format!("build: context file: {e}")))?;
        }
    }
    tar.flush()
        .await
        .map_err(|e| Status::internal(format!("build: context file: {e}")))?;
    if context_bytes != params.context_size {
        return Err(Status::cancelled(format!(
            "build: the context arrived incomplete ({context_bytes} of {} bytes): the client went away",
            params.context_size
        )));
    }
    drop(tar);
    let context = dir.path().join("context");
    let (tp, cp) = (tar_path.clone(), context.clone());
    tokio::task::spawn_blocking(move || unpack_context(&tp, &cp))
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
    let _ = fs::remove_file(&tar_path);

    let (tx, rx) = mpsc::channel(64);
    let progress = Progress(tx.clone());
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let run = Run {
            b: &b,
            params: &params,
            // BuildKit's automatic platform args (TARGETARCH, BUILDPLATFORM, …) for this host.
            build_args: dockerfile::with_host_platform_args(
                params.build_args.clone().into_iter().collect(),
            ),
            df: &df,
            dir: dir.path(),
            context: &context,
            progress: progress.clone(),
            mounts: Vec::new(),
            secrets,
            gc_guard: b.images.hold_off_gc().await,
        };
        let result = run.all(context_bytes).await;
        match result {
            Ok(()) => info!(
                image = %params.reference,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "build done"
            ),
            Err(e) => {
                warn!(image = %params.reference, error = %e, "build failed");
                let _ = tx.send(Err(Status::from(e))).await;
            }
        }
        // The scratch dir goes only once every mount under it is gone.
        drop(dir);
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

/// Unpacks the context tar: paths stay inside `dest`; owners are not kept (COPY sets them).
fn unpack_context(tar_path: &Path, dest: &Path) -> Result<(), BuildError> {
    fs::create_dir_all(dest).map_err(io_err("create", dest))?;
    let f = fs::File::open(tar_path).map_err(io_err("open", tar_path))?;
    let mut ar = tar::Archive::new(io::BufReader::new(f));
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    ar.unpack(dest)
        .map_err(|e| BuildError::Invalid(format!("build: the context is not a valid tar: {e}")))
}

/// One build in progress.
struct Run<'a> {
    b: &'a Builder,
    params: &'a BuildParams,
    /// `params.build_args`, ordered.
    build_args: BTreeMap<String, String>,
    df: &'a Dockerfile,
    dir: &'a Path,
    context: &'a Path,
    progress: Progress,
    /// Mounts made for `COPY --from` sources, removed at the end.
    mounts: Vec<PathBuf>,
    /// `--secret`s by id: only ever written into a step's 0700 dir while it runs.
    secrets: BTreeMap<String, Vec<u8>>,
    /// Holds the host's image garbage collection off while the build uses layers no
    /// container records (cached ones, new ones). A prune meanwhile gives up on this host
    /// rather than wait (see `images::prune`).
    gc_guard: tokio::sync::OwnedRwLockReadGuard<()>,
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = umount2(&m, MntFlags::MNT_DETACH);
        }
    }
}

impl Run<'_> {
    async fn all(mut self, context_bytes: u64) -> Result<(), BuildError> {
        let df = self.df;
        let invalid = |e: dockerfile::DockerfileError| BuildError::Invalid(e.to_string());
        let target = df
            .target((!self.params.target.is_empty()).then_some(self.params.target.as_str()))
            .map_err(invalid)?;
        // Only the stages the target needs, each after those it depends on.
        let order = df.build_order(target, &self.build_args).map_err(invalid)?;
        let mut froms = Vec::new();
        for s in &df.stages {
            froms.push(
                dockerfile::resolve_from(s, &df.global_args, &self.build_args).map_err(invalid)?,
            );
        }
        let total: usize = order.iter().map(|i| df.stages[*i].steps.len() + 1).sum();
        self.progress
            .line(format!(
                "Sending build context to the host: {}",
                human(context_bytes)
            ))
            .await;
        let unused = df.unused_build_args(&self.build_args);
        if !unused.is_empty() {
            self.progress
                .line(format!(
                    "[Warning] build args declared by no ARG: {}",
                    unused.join(", ")
                ))
                .await;
        }
        let client = crate::worker::registry_client(&self.params.registry, &self.b.registry_tls)
            .map_err(BuildError::Other)?;
        let mut built: Vec<Option<StageImage>> = vec![None; df.stages.len()];
        let mut n = 0;
        let (mut steps, mut cached) = (0u32, 0u32);
        for &i in &order {
            let stage = &df.stages[i];
            n += 1;
            self.progress
                .line(format!("Step {n}/{total} : {}", from_text(stage)))
                .await;
            let mut image = self.from(i, stage.line, &froms[i], &built, &client).await?;
            // A base image's ONBUILD triggers run first, and its children do not inherit them.
            let from_image = df.base_stage(i, &froms[i]).is_none() && froms[i] != "scratch";
            let triggers = if from_image {
                std::mem::take(&mut image.settings.onbuild)
            } else {
                Vec::new()
            };
            let mut vars =
                StageBuilder::new(&df.global_args, &self.build_args, image.settings.clone());
            if !triggers.is_empty() {
                self.progress
                    .line(format!("# Executing {} build trigger(s)", triggers.len()))
                    .await;
            }
            for trigger in &triggers {
                // Every failure of a trigger names it, not only the FROM line it ran at.
                let at = format!("FROM {} (line {}): ONBUILD {trigger}", froms[i], stage.line);
                let bad = |m: String| BuildError::Invalid(format!("{at}: {m}"));
                let parsed = dockerfile::parse_instructions(trigger).map_err(|e| bad(e.message))?;
                for mut step in parsed {
                    step.line = stage.line;
                    steps += 1;
                    self.progress
                        .line(format!(" ---> trigger: {}", step.text))
                        .await;
                    let action = vars.step(&step).map_err(|e| bad(e.message))?;
                    image.settings = vars.settings().clone();
                    let ran = self.step(stage, &step, &action, &mut image, &built).await;
                    let ran = ran.map_err(|e| match e {
                        BuildError::Step(m) => BuildError::Step(format!("{at}: {m}")),
                        BuildError::Invalid(m) => bad(m),
                        e => e,
                    });
                    if ran? {
                        cached += 1;
                    }
                }
            }
            for step in &stage.steps {
                n += 1;
                steps += 1;
                self.progress
                    .line(format!("Step {n}/{total} : {}", step.text))
                    .await;
                let action = vars
                    .step(step)
                    .map_err(|e| BuildError::Invalid(e.to_string()))?;
                image.settings = vars.settings().clone();
                if self.step(stage, step, &action, &mut image, &built).await? {
                    cached += 1;
                }
            }
            built[i] = Some(image);
        }
        let image = built[target].take().expect("the target was built");
        self.push(&client, image, steps, cached).await
    }

    /// The image a stage starts from.
    async fn from(
        &mut self,
        index: usize,
        line: usize,
        from: &str,
        built: &[Option<StageImage>],
        client: &RegistryClient,
    ) -> Result<StageImage, BuildError> {
        if let Some(j) = self.df.base_stage(index, from) {
            let image = built[j].clone().expect("stages build in order");
            self.progress.line(format!(" ---> stage {from}")).await;
            return Ok(image);
        }
        if from == "scratch" {
            return Ok(StageImage::scratch());
        }
        let at = |e: String| BuildError::Step(format!("FROM {from} (line {line}): {e}"));
        let reference = Reference::parse(from).map_err(|e| at(e.to_string()))?;
        let pulled = self
            .b
            .images
            .pull_held(client, &reference, &self.gc_guard)
            .await
            .map_err(|e| match e {
                e if e.is_not_found() => at(format!(
                    "not in the cluster registry ({e}); bring an outside image in with \
                     `rctl image pull HOST/{}`",
                    reference.short()
                )),
                e => at(e.to_string()),
            })?;
        let manifest = self
            .b
            .images
            .read_blob(&pulled.manifest_digest)
            .and_then(|m| Manifest::parse(&m))
            .map_err(|e| at(e.to_string()))?;
        let config_bytes = self
            .b
            .images
            .read_blob(&pulled.config_digest)
            .map_err(|e| at(e.to_string()))?;
        let config: Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| at(format!("its config is not JSON: {e}")))?;
        let diff_ids: Vec<String> = config
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if diff_ids.len() != manifest.layers.len() {
            return Err(at(format!(
                "its config lists {} diff_ids for {} layers",
                diff_ids.len(),
                manifest.layers.len()
            )));
        }
        let layers = manifest
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(l, diff_id)| LayerRef {
                digest: l.digest.clone(),
                diff_id,
                size: l.size,
                media_type: oci_layer_type(&l.media_type),
            })
            .collect();
        let settings =
            dockerfile::Settings::from_config_json(&config_bytes).map_err(|e| at(e.to_string()))?;
        let history = config
            .get("history")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let created = config
            .get("created")
            .and_then(Value::as_str)
            .map(str::to_string);
        self.progress
            .line(format!(
                " ---> {} ({})",
                short(&pulled.manifest_digest),
                if pulled.bytes_fetched == 0 {
                    "already on this host".to_string()
                } else {
                    format!("pulled {}", human(pulled.bytes_fetched))
                }
            ))
            .await;
        Ok(StageImage {
            layers,
            config,
            settings,
            history,
            created,
            key: chain("from", &[pulled.manifest_digest.as_bytes()]),
        })
    }

    /// Runs (or reuses) one step. Returns whether it came from the cache.
    async fn step(
        &mut self,
        stage: &Stage,
        step: &dockerfile::Step,
        action: &Action,
        image: &mut StageImage,
        built: &[Option<StageImage>],
    ) -> Result<bool, BuildError> {
        let action_json = serde_json::to_vec(action).expect("action serializes");
        let settings_json = serde_json::to_vec(&image.settings).expect("settings serialize");
        // ADD <url>: fetched first, so that the bytes (not the address) make the cache key;
        // then copied like files of the context.
        let fetched = match action {
            Action::Copy { srcs, checksum, .. }
                if srcs.first().is_some_and(|s| dockerfile::is_url(s)) =>
            {
                Some(self.fetch(step.line, srcs, checksum.as_deref()).await?)
            }
            Action::Copy { heredocs, .. } if !heredocs.is_empty() => {
                Some(self.heredoc_files(step.line, heredocs)?)
            }
            _ => None,
        };
        // RUN --mount: the host side of bind sources (and cache seeds), found now; a bind's
        // files are part of the key, as BuildKit's are.
        let mut step_mounts = Vec::new();
        let mut mount_inputs = String::new();
        if let Action::Run { mounts, .. } = action {
            for m in mounts {
                let host = match m.kind {
                    MountKind::Bind | MountKind::Cache
                        if m.kind == MountKind::Bind || m.from.is_some() =>
                    {
                        let (root, key) = self.source_root(stage, m.from.as_deref(), built).await?;
                        let src = m.source.clone().unwrap_or_else(|| "/".into());
                        let host = bind_source(&root, &src, step.line)?;
                        match key {
                            Some(k) => mount_inputs.push_str(&k),
                            None if m.kind == MountKind::Bind => {
                                let (r, s, line) = (root.clone(), vec![src.clone()], step.line);
                                let h = tokio::task::spawn_blocking(move || {
                                    hash_sources(&r, &s, line, true, &CopyFilter::default())
                                })
                                .await
                                .map_err(other)??;
                                mount_inputs.push_str(&h);
                            }
                            None => {}
                        }
                        Some(host)
                    }
                    _ => None,
                };
                step_mounts.push(StepMount {
                    mount: m.clone(),
                    host,
                });
            }
        }
        let inputs = match action {
            Action::Run { .. } => mount_inputs,
            Action::Copy {
                srcs,
                from,
                excludes,
                parents,
                ..
            } => {
                let filter = CopyFilter::new(excludes, *parents);
                let (root, srcs) = match &fetched {
                    Some(f) => f.clone(),
                    None => {
                        let (root, _) = self.source_root(stage, from.as_deref(), built).await?;
                        (root, srcs.clone())
                    }
                };
                let line = step.line;
                let literal = fetched.is_some();
                tokio::task::spawn_blocking(move || {
                    hash_sources(&root, &srcs, line, literal, &filter)
                })
                .await
                .map_err(other)??
            }
            _ => String::new(),
        };
        let key = chain(
            &image.key,
            &[&action_json, &settings_json, inputs.as_bytes()],
        );
        let cache_file = self.b.cache.join(format!("{key}.json"));
        if !self.params.no_cache {
            if let Some(entry) = self.cached(&cache_file).await {
                self.progress.line(" ---> Using cache").await;
                apply(image, step, entry, key);
                return Ok(true);
            }
        }
        let op = match action {
            Action::Config => match &step.instr {
                Instr::Workdir(_) if !image.settings.working_dir.is_empty() => {
                    Some(FsOp::Mkdir(image.settings.working_dir.clone()))
                }
                _ => None,
            },
            Action::Run {
                argv, env, network, ..
            } => Some(FsOp::Run {
                argv: argv.clone(),
                env: env.clone(),
                line: step.line,
                mounts: step_mounts,
                network: *network,
            }),
            Action::Copy {
                srcs,
                dest,
                chown,
                chmod,
                from,
                unpack,
                parents,
                excludes,
                ..
            } => {
                // A fetched file is never unpacked, as in docker.
                let (src_root, srcs, unpack) = match &fetched {
                    Some((root, names)) => (root.clone(), names.clone(), false),
                    None => {
                        let (root, _) = self.source_root(stage, from.as_deref(), built).await?;
                        (root, srcs.clone(), *unpack)
                    }
                };
                Some(FsOp::Copy(CopyJob {
                    src_root,
                    srcs,
                    dest: dest.clone(),
                    chown: chown.clone(),
                    chmod: chmod.clone(),
                    unpack,
                    line: step.line,
                    add: matches!(step.instr, Instr::Add(_)),
                    literal: fetched.is_some(),
                    filter: CopyFilter::new(excludes, *parents),
                }))
            }
        };
        let layer = match op {
            Some(op) => self.in_overlay(image, op).await?,
            None => None,
        };
        let entry = CacheEntry {
            layer,
            created: crate::shim::rfc3339_now(),
        };
        if let Some(l) = &entry.layer {
            self.progress
                .line(format!(
                    " ---> layer {} ({})",
                    short(&l.digest),
                    human(l.size)
                ))
                .await;
        }
        let bytes = serde_json::to_vec(&entry).expect("cache entry serializes");
        let tmp = cache_file.with_extension("tmp");
        if let Err(e) =
            crate::datadir::write_private(&tmp, &bytes).and_then(|()| fs::rename(&tmp, &cache_file))
        {
            warn!(error = %e, "build: could not record a cache entry");
        }
        apply(image, step, entry, key);
        Ok(false)
    }

    /// Downloads an ADD's URLs into a fresh directory of this build; returns it and the
    /// sources to copy from it. As in docker, a file is named after the URL path's last
    /// segment (percent-decoded), has mode 0600, and the server's Last-Modified as its mtime.
    /// A URL is shown without its credentials; a download that would leave the host's disk
    /// nearly full, or that stalls for a minute, fails the step.
    async fn fetch(
        &mut self,
        line: usize,
        urls: &[String],
        checksum: Option<&str>,
    ) -> Result<(PathBuf, Vec<String>), BuildError> {
        let root = self.dir.join(format!("fetched-{line}"));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).map_err(io_err("create", &root))?;
        // Never this host's own, loopback or link-local addresses, redirects included
        // (`crate::addurl`).
        // Nor any other host or controller of the cluster, as the controller listed them.
        let mut own = crate::addurl::host_addresses();
        own.extend(
            self.params
                .cluster_addresses
                .iter()
                .filter_map(|a| a.parse::<std::net::IpAddr>().ok()),
        );
        let client = crate::addurl::client(own.clone()).map_err(other)?;
        // What may be written: the free space, less a margin for everything else on the disk.
        let free = nix::sys::statvfs::statvfs(&root)
            .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
            .unwrap_or(u64::MAX);
        let mut budget = free.saturating_sub(FETCH_RESERVE);
        let mut sources = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            let parsed = reqwest::Url::parse(url);
            let shown = parsed
                .as_ref()
                .map(redacted)
                .unwrap_or_else(|_| url.clone());
            let failed = |why: String| BuildError::Step(format!("line {line}: ADD {shown}: {why}"));
            let parsed = parsed.map_err(|e| failed(format!("not a URL: {e}")))?;
            crate::addurl::check_url(&parsed, &own).map_err(|e| failed(e.to_string()))?;
            let name = parsed
                .path_segments()
                .and_then(|mut p| p.next_back().map(str::to_string))
                .map(|n| {
                    percent_encoding::percent_decode_str(&n)
                        .decode_utf8_lossy()
                        .into_owned()
                })
                .filter(|n| !n.is_empty() && n != "." && n != ".." && !n.contains('/'))
                .ok_or_else(|| failed("its path names no file (it ends with /)".into()))?;
            // A directory per URL: two URLs may end in the same name.
            let rel = format!("{i}/{name}");
            let path = root.join(&rel);
            let dir = root.join(i.to_string());
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
            let web_err = |e: reqwest::Error| {
                failed(if e.is_timeout() {
                    format!(
                        "the download took longer than {} s",
                        crate::addurl::TIMEOUT.as_secs()
                    )
                } else {
                    rudder_proto::error_chain(&e.without_url())
                })
            };
            let mut resp = client.get(parsed).send().await.map_err(web_err)?;
            if !resp.status().is_success() {
                return Err(failed(format!("the server answered {}", resp.status())));
            }
            let too_big = |n: u64| {
                failed(format!(
                    "{} would leave this host's disk nearly full ({} free)",
                    human(n),
                    human(free)
                ))
            };
            if let Some(n) = resp.content_length().filter(|n| *n > budget) {
                return Err(too_big(n));
            }
            let modified = resp
                .headers()
                .get(reqwest::header::LAST_MODIFIED)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok());
            let mut file = tokio::fs::File::create(&path)
                .await
                .map_err(io_err("create", &path))?;
            let mut size = 0u64;
            let mut sum = Sha256::new();
            while let Some(chunk) = resp.chunk().await.map_err(web_err)? {
                size += chunk.len() as u64;
                sum.update(&chunk);
                if size > budget {
                    return Err(too_big(size));
                }
                file.write_all(&chunk)
                    .await
                    .map_err(io_err("write", &path))?;
            }
            budget -= size;
            file.flush().await.map_err(io_err("write", &path))?;
            // `ADD --checksum`: the bytes must be the ones the Dockerfile names.
            let got = digest::finish(sum);
            if let Some(want) = checksum.filter(|w| *w != got) {
                return Err(failed(format!(
                    "checksum mismatch: the Dockerfile expects {want}, the download is {got}"
                )));
            }
            let file = file.into_std().await;
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_err("chmod", &path))?;
            if let Some(t) = modified {
                file.set_modified(t)
                    .map_err(io_err("set the mtime of", &path))?;
            }
            self.progress
                .line(format!(" ---> fetched {shown} ({})", human(size)))
                .await;
            sources.push(rel);
        }
        Ok((root, sources))
    }

    /// `COPY <<NAME` / `ADD <<NAME`: each here-document as a file NAME (0644) in a fresh
    /// directory of this build; returns it and the names to copy from it.
    fn heredoc_files(
        &self,
        line: usize,
        heredocs: &[dockerfile::HeredocFile],
    ) -> Result<(PathBuf, Vec<String>), BuildError> {
        let root = self.dir.join(format!("heredoc-{line}"));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).map_err(io_err("create", &root))?;
        let mut names = Vec::with_capacity(heredocs.len());
        for h in heredocs {
            let path = root.join(&h.name);
            fs::write(&path, &h.data).map_err(io_err("write", &path))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
                .map_err(io_err("chmod", &path))?;
            names.push(h.name.clone());
        }
        Ok((root, names))
    }

    /// Where COPY sources come from: the context, another stage's files (mounted read-only
    /// for the rest of the build), or an image's.
    async fn source_root(
        &mut self,
        stage: &Stage,
        from: Option<&str>,
        built: &[Option<StageImage>],
    ) -> Result<(PathBuf, Option<String>), BuildError> {
        let Some(from) = from else {
            return Ok((self.context.to_path_buf(), None));
        };
        let source = self
            .df
            .copy_source(stage.index, from, stage.line)
            .map_err(|e| BuildError::Invalid(e.to_string()))?;
        let image = match source {
            dockerfile::Source::Stage(j) => built[j]
                .clone()
                .ok_or_else(|| BuildError::Other(format!("stage {from} was not built")))?,
            dockerfile::Source::Image(_) => {
                let client =
                    crate::worker::registry_client(&self.params.registry, &self.b.registry_tls)
                        .map_err(BuildError::Other)?;
                self.from(stage.index, stage.line, from, built, &client)
                    .await?
            }
        };
        let dirs = self.layer_dirs(&image).await?;
        let key = chain("source", &[image.key.as_bytes()]);
        let at = self.dir.join(format!("from-{}", &key[..16]));
        if at.is_dir() {
            return Ok((at, Some(image.key)));
        }
        fs::create_dir_all(&at).map_err(io_err("create", &at))?;
        match dirs.len() {
            0 => {}
            1 => {
                mount(
                    Some(&dirs[0]),
                    &at,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| BuildError::Other(format!("bind {}: {e}", at.display())))?;
                self.mounts.push(at.clone());
                // A bind is made read-only only by remounting it.
                mount(
                    None::<&str>,
                    &at,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .map_err(|e| BuildError::Other(format!("make {} read-only: {e}", at.display())))?;
            }
            _ => {
                let o = crate::overlayfs::Overlay {
                    lower: dirs.iter().rev().cloned().collect(),
                    upper: None,
                    optional: Vec::new(),
                };
                crate::overlayfs::mount_overlay(&o, &at)
                    .map_err(|e| BuildError::Other(format!("mount {}: {e}", at.display())))?;
                self.mounts.push(at.clone());
            }
        }
        Ok((at, Some(image.key)))
    }

    /// The image's layers unpacked (bottom first), each under its chain id: a layer that
    /// appears twice (the same change made by two steps) gets two directories, as one
    /// directory twice in `lowerdir` fails the mount with `ELOOP`. What is not unpacked yet
    /// (a step's new layer, a cache hit) is unpacked from its blob here.
    async fn layer_dirs(&self, image: &StageImage) -> Result<Vec<PathBuf>, BuildError> {
        let diff_ids: Vec<String> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
        let chain = digest::chain_ids(&diff_ids).map_err(other)?;
        let mut dirs = Vec::with_capacity(chain.len());
        for (l, c) in image.layers.iter().zip(&chain) {
            dirs.push(
                self.b
                    .images
                    .unpack_layer(c, &l.digest)
                    .await
                    .map_err(other)?,
            );
        }
        Ok(dirs)
    }

    /// Mounts the image so far with a fresh upper dir at a scratch root, does `op` there,
    /// unmounts, and turns the upper dir into a layer (`None` when nothing changed).
    async fn in_overlay(
        &self,
        image: &StageImage,
        op: FsOp,
    ) -> Result<Option<LayerRef>, BuildError> {
        let base = tempfile::Builder::new()
            .prefix("step-")
            .tempdir_in(self.dir)
            .map_err(io_err("create a step dir in", self.dir))?;
        // A step dir is laid out as a container dir (`upper`, `work`, `bundle`), with the
        // mounted image at `rootfs` next to them.
        let step = ContainerDir::new(base.path());
        let (root, upper, work, empty) = (
            base.path().join("rootfs"),
            step.upper(),
            step.work(),
            base.path().join("empty"),
        );
        for d in [&root, &upper, &work, &empty] {
            fs::create_dir_all(d).map_err(io_err("create", d))?;
        }
        fs::set_permissions(&upper, fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod", &upper))?;
        let mut lower = self.layer_dirs(image).await?;
        lower.reverse();
        if lower.is_empty() {
            lower.push(empty.clone());
        }
        // A layer cannot say what a redirected directory or a metacopy file means, so those
        // are off where the kernel knows them.
        let o = crate::overlayfs::Overlay {
            lower,
            upper: Some((upper.clone(), work.clone())),
            optional: vec![("redirect_dir", "off"), ("metacopy", "off")],
        };
        crate::overlayfs::mount_overlay(&o, &root)
            .map_err(|e| BuildError::Other(format!("mount overlay at {}: {e}", root.display())))?;
        let result = match op {
            FsOp::Mkdir(dir) => self.mkdir(root.clone(), &dir).await,
            FsOp::Run {
                argv,
                env,
                line,
                mounts,
                network,
            } => {
                self.run(
                    root.clone(),
                    &argv,
                    &env,
                    &image.settings,
                    line,
                    &mounts,
                    network,
                )
                .await
            }
            FsOp::Copy(job) => self.copy(root.clone(), job).await,
        };
        let _ = umount2(&root, MntFlags::MNT_DETACH);
        result?;
        self.layer_from(image, &upper).await
    }

    /// The upper dir `upper` as a layer in the content store, or `None` when it is empty.
    /// The layer is unpacked (under its chain id on top of `image`) at once: that is where a
    /// hostile entry (a whiteout of `..`) is refused, so a build never tags such a layer.
    async fn layer_from(
        &self,
        image: &StageImage,
        upper: &Path,
    ) -> Result<Option<LayerRef>, BuildError> {
        let empty = fs::read_dir(upper)
            .map_err(io_err("read", upper))?
            .next()
            .is_none();
        if empty {
            return Ok(None);
        }
        let tmp_dir = self.b.images.root().join("tmp");
        let file = tempfile::Builder::new()
            .prefix(".layer-")
            .tempfile_in(&tmp_dir)
            .map_err(io_err("create a layer file in", &tmp_dir))?;
        let up = upper.to_path_buf();
        let (file, info) = tokio::task::spawn_blocking(move || {
            let info = crate::commit::make_layer(&up, file.as_file())
                .map_err(|e| BuildError::Other(e.to_string()))?;
            file.as_file()
                .sync_data()
                .map_err(io_err("sync", file.path()))?;
            Ok::<_, BuildError>((file, info))
        })
        .await
        .map_err(other)??;
        let dest = self.b.images.blob_path(&info.digest).map_err(other)?;
        if !dest.is_file() {
            file.persist(&dest).map_err(|e| BuildError::Io {
                op: "store layer",
                path: dest.display().to_string(),
                err: e.error,
            })?;
        }
        let mut diff_ids: Vec<String> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
        diff_ids.push(info.diff_id.clone());
        let chain = digest::chain_ids(&diff_ids).map_err(other)?;
        if let Some(top) = chain.last() {
            self.b
                .images
                .unpack_layer(top, &info.digest)
                .await
                .map_err(other)?;
        }
        Ok(Some(LayerRef {
            digest: info.digest,
            diff_id: info.diff_id,
            size: info.size,
            media_type: OCI_LAYER_TAR_GZIP.to_string(),
        }))
    }

    /// `WORKDIR`: makes the directory when the image lacks it.
    async fn mkdir(&self, root: PathBuf, dir: &str) -> Result<(), BuildError> {
        let missing = missing_dirs(&root, dir);
        if missing.is_empty() {
            return Ok(());
        }
        let mut b = tar::Builder::new(Vec::new());
        for d in &missing {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(0);
            b.append_data(&mut h, d, io::empty())
                .map_err(io_err("write tar", Path::new(d)))?;
        }
        let bytes = b.into_inner().map_err(io_err("write tar", &root))?;
        self.unpack_into(&root, bytes).await
    }

    /// Unpacks a tar (members named from `/`) into the mounted image at `root`, through an
    /// fs-helper chrooted there.
    async fn unpack_into(&self, root: &Path, tar: Vec<u8>) -> Result<(), BuildError> {
        self.unpack_from(root, move |out| out.write_all(&tar).map_err(other))
            .await
    }

    /// As [`Run::unpack_into`], with the tar written by `produce` straight into the helper's
    /// stdin on a blocking thread, so a large COPY never sits in memory.
    async fn unpack_from<F>(&self, root: &Path, produce: F) -> Result<(), BuildError>
    where
        F: FnOnce(&mut dyn Write) -> Result<(), BuildError> + Send + 'static,
    {
        let args = HelperArgs {
            root: root.to_path_buf(),
            expect: root.to_path_buf(),
            op: Op::Unpack {
                dest: "/".into(),
                contents: false,
                raw: true,
                owners: true,
            },
        };
        let mut child = tokio::process::Command::from(args.command(&self.b.access.agent_exe))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BuildError::Other(format!("start the fs helper: {e}")))?;
        let stdin = child
            .stdin
            .take()
            .expect("piped stdin")
            .into_owned_fd()
            .map_err(other)?;
        let writer = tokio::task::spawn_blocking(move || {
            let mut out = io::BufWriter::with_capacity(CHUNK, fs::File::from(stdin));
            produce(&mut out)?;
            out.flush().map_err(other)
        });
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr).await;
        }
        let status = child.wait().await.map_err(other)?;
        let produced = writer.await.map_err(other)?;
        if !status.success() {
            return Err(BuildError::Step(format!(
                "copy into the image: {}",
                stderr.trim()
            )));
        }
        produced
    }

    /// Sends the blobs the cluster registry lacks, then the image.
    async fn push(
        &self,
        client: &RegistryClient,
        image: StageImage,
        steps: u32,
        cached: u32,
    ) -> Result<(), BuildError> {
        let repo = Reference::parse(&self.params.reference)
            .map(|r| r.repository)
            .map_err(|e| BuildError::Invalid(e.to_string()))?;
        let config = image.config_bytes();
        let config_desc =
            Descriptor::new(OCI_CONFIG, digest::of_bytes(&config), config.len() as u64);
        let layers: Vec<Descriptor> = image
            .layers
            .iter()
            .map(|l| Descriptor::new(&l.media_type, l.digest.clone(), l.size))
            .collect();
        let manifest = Manifest::oci(config_desc, layers).to_bytes();
        let mut sent = 0u64;
        let mut seen = HashSet::new();
        for l in &image.layers {
            if !seen.insert(l.digest.clone()) {
                continue;
            }
            if client.blob_exists(&repo, &l.digest).await.unwrap_or(false) {
                continue;
            }
            let path = self.b.images.blob_path(&l.digest).map_err(other)?;
            let mut f = tokio::fs::File::open(&path).await.map_err(|e| {
                BuildError::Other(format!(
                    "layer {} is not on this host to send ({e})",
                    l.digest
                ))
            })?;
            self.progress
                .send(Out::Blob(BuildBlob {
                    digest: l.digest.clone(),
                    size: l.size,
                }))
                .await?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = f.read(&mut buf).await.map_err(io_err("read", &path))?;
                if n == 0 {
                    break;
                }
                sent += n as u64;
                self.progress.send(Out::Data(buf[..n].to_vec())).await?;
            }
        }
        self.progress
            .send(Out::Image(BuildImage {
                config,
                manifest,
                media_type: OCI_MANIFEST.to_string(),
                steps,
                cached,
                bytes_sent: sent,
            }))
            .await
    }
}

/// A RUN's output as progress lines: any bytes (invalid UTF-8 shown lossily), split at
/// newlines and carriage returns, a line cut at 16 KiB; read to the end whatever happens, so
/// the command never writes into a closed pipe.
async fn relay_output(pipe: impl tokio::io::AsyncRead + Unpin, progress: Progress) {
    const MAX_LINE: usize = 16 << 10;
    let mut r = tokio::io::BufReader::new(pipe);
    let mut line = Vec::new();
    // A "\r\n" ends one line, not two.
    let mut after_cr = false;
    loop {
        let buf = match r.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(b) => b,
        };
        let n = buf.len();
        let mut start = 0;
        for (i, &c) in buf.iter().enumerate() {
            if c == b'\n' || c == b'\r' {
                line.extend_from_slice(&buf[start..i]);
                start = i + 1;
                if !(c == b'\n' && after_cr && line.is_empty()) {
                    progress.line(String::from_utf8_lossy(&line)).await;
                }
                line.clear();
                after_cr = c == b'\r';
                continue;
            }
            after_cr = false;
            if line.len() + (i - start) >= MAX_LINE {
                line.extend_from_slice(&buf[start..i]);
                start = i;
                progress.line(String::from_utf8_lossy(&line)).await;
                line.clear();
            }
        }
        line.extend_from_slice(&buf[start..]);
        r.consume(n);
    }
    if !line.is_empty() {
        progress.line(String::from_utf8_lossy(&line)).await;
    }
}

/// The FROM line as progress shows it.
fn from_text(stage: &Stage) -> String {
    match &stage.name {
        Some(n) => format!("FROM {} AS {n}", stage.from),
        None => format!("FROM {}", stage.from),
    }
}

/// Docker layer media types become their OCI twins (same bytes) in an OCI manifest.
fn oci_layer_type(t: &str) -> String {
    match t {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => OCI_LAYER_TAR_GZIP.to_string(),
        "application/vnd.docker.image.rootfs.diff.tar" => {
            rudder_image::oci::OCI_LAYER_TAR.to_string()
        }
        other => other.to_string(),
    }
}

fn short(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("sha256:{}", &hex[..hex.len().min(12)])
}

/// Bytes as people read them (1000-based, like docker).
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn paths_resolve_inside_their_root() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("usr/lib")).unwrap();
        symlink("/usr/lib", r.join("lib")).unwrap();
        symlink("../../..", r.join("usr/lib/up")).unwrap();
        symlink("/etc/shadow", r.join("shadow")).unwrap();
        assert_eq!(
            resolve_in_root(r, "/lib/x", true).unwrap(),
            r.join("usr/lib/x")
        );
        assert_eq!(
            resolve_in_root(r, "lib/up/etc", true).unwrap(),
            r.join("etc")
        );
        assert_eq!(
            resolve_in_root(r, "../../shadow", true).unwrap(),
            r.join("etc/shadow")
        );
        assert_eq!(
            resolve_in_root(r, "shadow", false).unwrap(),
            r.join("shadow")
        );
        symlink("loop", r.join("loop")).unwrap();
        assert!(resolve_in_root(r, "loop/x", true).is_err());
        assert_eq!(
            missing_dirs(r, "/usr/lib/a/b"),
            vec!["usr/lib/a", "usr/lib/a/b"]
        );
        assert_eq!(missing_dirs(r, "/lib"), Vec::<String>::new());
    }

    #[test]
    fn run_steps_are_confined_and_limited() {
        assert_eq!(run_limits(2 << 30).memory, 1 << 30);
        assert_eq!(run_limits(64 << 30).memory, RUN_MEMORY);
        assert_eq!(run_limits(0).memory, RUN_MEMORY);
        assert_eq!(run_limits(0).pids, RUN_PIDS);
        let t = tempfile::tempdir().unwrap();
        let user = resolve_user(t.path(), "").unwrap();
        let argv = ["true".to_string()];
        let step = ContainerDir::new(t.path());
        fs::create_dir(step.bundle()).unwrap();
        write_run_config(
            &step,
            t.path(),
            &argv,
            &[],
            "/",
            &user,
            "rudder",
            "build-x",
            &RunNet::default(),
            &[],
        )
        .unwrap();
        let spec = oci_spec::runtime::Spec::load(step.config()).unwrap();
        let linux = spec.linux().clone().unwrap();
        assert!(linux.seccomp().is_some());
        let r = linux.resources().clone().unwrap();
        assert_eq!(r.pids().unwrap().limit(), RUN_PIDS as i64);
        assert!(r.memory().unwrap().limit().unwrap() > 0);
    }

    #[test]
    fn users_resolve_by_name_or_number() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("etc")).unwrap();
        fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(t.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let ids = |u: &str| resolve_user(t.path(), u).map(|u| (u.uid, u.gid));
        assert_eq!(ids("").unwrap(), (0, 0));
        assert_eq!(ids("app").unwrap(), (1000, 1001));
        assert_eq!(ids("1000").unwrap(), (1000, 1001));
        assert_eq!(ids("app:staff").unwrap(), (1000, 50));
        assert_eq!(ids("7:8").unwrap(), (7, 8));
        // A uid not in passwd has gid 0, as in docker.
        assert_eq!(ids("7").unwrap(), (7, 0));
        // --chown: a bare uid is also the gid (docker's rule); a name keeps its group.
        assert_eq!(resolve_chown(t.path(), "1000").unwrap(), (1000, 1000));
        assert_eq!(resolve_chown(t.path(), "app").unwrap(), (1000, 1001));
        assert!(resolve_user(t.path(), "nobody")
            .unwrap_err()
            .contains("unable to find user nobody: no matching entries in passwd file"));
    }

    #[tokio::test]
    async fn run_output_becomes_lines_whatever_its_bytes() {
        let (tx, mut rx) = mpsc::channel(64);
        let long = vec![b'x'; 20 << 10];
        let mut input = b"one\r\ntwo\rthree\n\xff\xfebad\n\nlast".to_vec();
        input.push(b'\n');
        input.extend_from_slice(&long);
        relay_output(&input[..], Progress(tx)).await;
        let mut got = Vec::new();
        while let Ok(Ok(BuildOutput {
            msg: Some(Out::Progress(l)),
        })) = rx.try_recv()
        {
            got.push(l);
        }
        assert_eq!(
            &got[..5],
            ["one", "two", "three", "\u{fffd}\u{fffd}bad", ""]
        );
        assert_eq!(got[5], "last");
        assert_eq!(got[6].len(), 16 << 10);
        assert_eq!(got[7].len(), 4 << 10);
        assert_eq!(got.len(), 8);
    }

    #[test]
    fn cache_keys_chain() {
        let a = chain("k", &[b"x", b"y"]);
        assert_ne!(a, chain("k", &[b"xy"]));
        assert_ne!(a, chain("j", &[b"x", b"y"]));
        assert_eq!(a, chain("k", &[b"x", b"y"]));
        assert_eq!(human(999), "999 B");
        assert_eq!(human(1_500_000), "1.5 MB");
    }

    #[test]
    fn source_digests_ignore_times_but_not_contents() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        fs::write(t.path().join("d/a"), "1").unwrap();
        let srcs = vec!["d".to_string()];
        let one = hash_sources(t.path(), &srcs, 1, false, &CopyFilter::default()).unwrap();
        let f = fs::File::options()
            .write(true)
            .open(t.path().join("d/a"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(
            hash_sources(t.path(), &srcs, 1, false, &CopyFilter::default()).unwrap(),
            one
        );
        fs::write(t.path().join("d/a"), "2").unwrap();
        assert_ne!(
            hash_sources(t.path(), &srcs, 1, false, &CopyFilter::default()).unwrap(),
            one
        );
    }
}

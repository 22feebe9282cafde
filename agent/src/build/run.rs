//! `RUN`: the command in a container (the runtime port's `run_attached`) over the mounted
//! image, its own network namespace on the host's bridge, its spec from `bundle::spec`.

use super::*;

/// A RUN's network: its namespace (on the host's bridge) and the `/etc` files to mount.
#[derive(Default)]
pub(super) struct RunNet {
    pub(super) netns: Option<PathBuf>,
    pub(super) etc: Vec<(&'static str, PathBuf)>,
}

impl Run<'_> {
    /// `RUN`: the command in a container over the mounted image at `root`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run(
        &self,
        root: PathBuf,
        argv: &[String],
        env: &[String],
        settings: &Settings,
        line: usize,
        mounts: &[StepMount],
        network: RunNetwork,
    ) -> Result<(), BuildError> {
        let step = ContainerDir::new(root.parent().expect("step dir"));
        let bundle = step.bundle();
        fs::create_dir_all(&bundle).map_err(io_err("create", &bundle))?;
        let id = format!(
            "build-{}",
            &hex::encode(Sha256::digest(bundle.display().to_string().as_bytes()))[..16]
        );
        let user = resolve_user(&root, &settings.user)
            .map_err(|e| BuildError::Step(format!("RUN (line {line}): {e}")))?;
        let cwd = if settings.working_dir.is_empty() {
            "/".to_string()
        } else {
            settings.working_dir.clone()
        };
        let mut env = env.to_vec();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, format!("PATH={DEFAULT_PATH}"));
        }
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push(format!("HOME={}", user.home));
        }
        // Its own network namespace on the host's bridge, as docker builds get by default:
        // outbound traffic is masqueraded, nothing reaches in, the host's loopback services
        // are not the container's.
        let net_id = format!("bld{}", &id["build-".len()..]);
        let mut net = RunNet::default();
        let missing_etc: Vec<&str> = step
            .etc_files()
            .map(|(name, _)| name)
            .into_iter()
            .filter(|f| {
                !resolve_in_root(&root, &format!("/etc/{f}"), true).is_ok_and(|p| p.exists())
            })
            .collect();
        let owner_mode = |m: fs::Metadata| (m.mode(), m.uid(), m.gid());
        let etc_before = resolve_in_root(&root, "/etc", true)
            .and_then(fs::metadata)
            .ok()
            .map(owner_mode);
        // `--mount`s: made before the network, whose /etc files are mounted over them.
        let prepared = self
            .prepare_mounts(&root, step.path(), mounts, line)
            .await?;
        env.extend(prepared.env.iter().cloned());
        // `--network=none`: a namespace of its own with only loopback (no bridge, no
        // resolvers: the image's own /etc files).
        let bridge = self
            .b
            .net
            .as_ref()
            .filter(|_| network == RunNetwork::Default);
        if let Some(o) = bridge {
            let ns = o
                .attach_bridge_as(
                    &net_id,
                    "rudder-build",
                    &format!("build step (line {line})"),
                    self.dir,
                )
                .await
                .map_err(|e| BuildError::Other(format!("RUN (line {line}): network: {e}")))?;
            net.netns = Some(ns);
            // `attach_bridge_as` wrote them into the build's dir, laid out as a container's.
            net.etc = ContainerDir::new(self.dir).etc_files().into();
        }
        let written = write_run_config(
            &step,
            &root,
            argv,
            &env,
            &cwd,
            &user,
            &self.b.cgroup_parent,
            &id,
            &net,
            &prepared.oci,
        )
        .and(Ok(()));
        let result = match written {
            Ok(()) => self.run_container(&bundle, &id, argv, line).await,
            Err(e) => Err(e),
        };
        if let Some(o) = bridge {
            o.detach_bridge_as(&net_id, self.dir).await;
        }
        prepared.clean_after(&step.upper());
        drop(prepared);
        // runc made mount points for the /etc files the image lacks: not part of the image.
        let upper = step.upper();
        for f in missing_etc {
            let p = upper.join("etc").join(f);
            if fs::symlink_metadata(&p).is_ok_and(|m| m.is_file() && m.len() == 0) {
                let _ = fs::remove_file(&p);
            }
        }
        // And the copy-up of /etc that making them caused, if nothing else landed there
        // (remove_dir fails on a non-empty directory) and the RUN did not change its owner or
        // mode.
        let etc = upper.join("etc");
        let unchanged = match (etc_before, fs::metadata(&etc).ok().map(owner_mode)) {
            (Some(before), Some(after)) => before == after,
            (None, Some(_)) => true,
            _ => false,
        };
        if unchanged {
            let _ = fs::remove_dir(&etc);
        }
        result
    }

    /// Runs a RUN's container (prepared in `bundle`) in the foreground, its output relayed as
    /// progress. Stops it when the build's caller went away.
    pub(super) async fn run_container(
        &self,
        bundle: &Path,
        id: &str,
        argv: &[String],
        line: usize,
    ) -> Result<(), BuildError> {
        let rt = &self.b.access.runtime;
        let mut child = rt
            .run_attached(id, bundle)
            .map_err(|e| BuildError::Other(format!("RUN (line {line}): {e}")))?;
        // However this ends, the container goes: deleted below, or, should the build be
        // dropped first (its caller gone), in the background when this guard is dropped.
        struct Cleanup(Option<(Arc<dyn ContainerRuntime>, String, PathBuf)>);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                if let Some((rt, id, bundle)) = self.0.take() {
                    tokio::spawn(async move {
                        let _ = rt.delete(&id, &bundle).await;
                    });
                }
            }
        }
        let mut cleanup = Cleanup(Some((rt.clone(), id.to_string(), bundle.to_path_buf())));
        let status = self.wait_run(&mut child, id).await;
        cleanup.0 = None;
        if let Err(e) = rt.delete(id, bundle).await {
            warn!(id, %e, "build: removing a RUN container");
        }
        let status = status?;
        if !status.success() {
            let code = status.code().unwrap_or(-1);
            let shown = argv.join(" ");
            return Err(BuildError::Step(format!(
                "RUN (line {line}) failed: `{shown}` returned a non-zero code: {code}"
            )));
        }
        Ok(())
    }

    /// Relays a RUN's output until its container exits; kills it when the build's caller went
    /// away.
    pub(super) async fn wait_run(
        &self,
        child: &mut tokio::process::Child,
        id: &str,
    ) -> Result<std::process::ExitStatus, BuildError> {
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let p1 = self.progress.clone();
        let p2 = self.progress.clone();
        let a = tokio::spawn(relay_output(out, p1));
        let b = tokio::spawn(relay_output(err, p2));
        let status = tokio::select! {
            s = child.wait() => s.map_err(other)?,
            () = self.progress.0.closed() => {
                // Nobody waits for this build any more: stop the container (the caller
                // deletes it) rather than let it run on.
                let _ = self.b.access.runtime.kill(id, "KILL").await;
                let _ = child.wait().await;
                return Err(BuildError::Other("the build was cancelled".into()));
            }
        };
        let _ = tokio::join!(a, b);
        Ok(status)
    }
}

/// Processes a RUN step may have at once.
pub(super) const RUN_PIDS: u64 = 4096;
/// The most memory a RUN step may use (less on a small host: half its memory).
pub(super) const RUN_MEMORY: u64 = 4 << 30;

/// A RUN step's cgroup limits on a host with `host_memory` bytes (0: unknown).
pub(super) fn run_limits(host_memory: u64) -> rudder_model::spec::Limits {
    let memory = match host_memory {
        0 => RUN_MEMORY,
        m => (m / 2).min(RUN_MEMORY),
    };
    rudder_model::spec::Limits {
        cpus: 0,
        memory,
        pids: RUN_PIDS,
    }
}

/// This host's memory in bytes (0 when unknown).
pub(super) fn host_memory() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|i| i.ram_total())
        .unwrap_or(0)
}

/// The config.json of a RUN: the image's files at `root`, its own network namespace on the
/// host's bridge (`net`) with the resolv.conf and hosts written for it (read-only), docker's
/// default capabilities and seccomp profile, and limits so that a RUN cannot fork-bomb or
/// exhaust the building host. Built by the containers' own spec builder (`bundle::spec`).
#[allow(clippy::too_many_arguments)]
pub(super) fn write_run_config(
    step: &ContainerDir,
    root: &Path,
    argv: &[String],
    env: &[String],
    cwd: &str,
    user: &crate::user::ExecUser,
    cgroup_parent: &str,
    id: &str,
    net: &RunNet,
    mounts: &[oci_spec::runtime::Mount],
) -> Result<(), BuildError> {
    let options = crate::bundle::SpecOptions {
        argv: argv.to_vec(),
        env: env.to_vec(),
        cwd: cwd.to_string(),
        user,
        no_new_privileges: false,
        hostname: "rudder-build".into(),
        rootfs: root,
        cgroups_path: PathBuf::from(format!("{}/{id}", cgroup_parent.trim_end_matches('/'))),
        netns: net.netns.as_deref(),
        host_network: false,
        limits: &run_limits(host_memory()),
        seccomp: Some(crate::seccomp::default_profile()),
        seccomp_bpf: None,
        etc: net.etc.clone(),
        etc_readonly: true,
        mounts,
    };
    let spec = crate::bundle::spec(&options).map_err(|e| BuildError::Other(e.to_string()))?;
    crate::bundle::write_spec(&step.config(), &spec).map_err(|e| BuildError::Other(e.to_string()))
}

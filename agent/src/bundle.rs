//! OCI bundles: the container's root filesystem (overlayfs over the image's unpacked layers,
//! with a private upper dir) and its `config.json`, built with `oci-spec` from the task's frozen
//! spec merged over the image's config (Docker's rules: the spec's entrypoint/command replace the
//! image's, env merges by name).

use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilities, LinuxNamespaceType, ProcessBuilder, RootBuilder,
    Spec, UserBuilder,
};
use rudder_image::ImageConfig;
use rudder_model::spec::NetworkMode;
use rudder_model::Task;

pub mod options;

/// Why a container's bundle could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file operation failed.
    #[error("bundle: {op}: {err}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The underlying error.
        err: std::io::Error,
    },
    /// The root filesystem's overlay could not be mounted.
    #[error("bundle: mount overlay at {path}: {err}")]
    Mount {
        /// The mount point.
        path: String,
        /// The underlying error.
        err: nix::Error,
    },
    /// The task's spec cannot be turned into an OCI config.
    #[error("bundle: {0}")]
    Spec(String),
    /// There is nothing to run.
    #[error("bundle: no command to run: neither the service nor the image sets one")]
    NoCommand,
    /// The user or group could not be resolved in the image.
    #[error("bundle: {0}")]
    User(#[from] crate::user::UserError),
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> BundleError {
    move |err| BundleError::Io { op, err }
}

/// One container's directory: the shim crate's type, which owns every file name in it.
pub use crate::shim::ContainerDir;

/// Mounts overlayfs: `layers` bottom first (overlay wants the top first), plus upper/work.
pub fn mount_rootfs(c: &ContainerDir, layers: &[PathBuf]) -> Result<(), BundleError> {
    // `upper`'s mode is the container's `/` (0755); the rest is the agent's, private.
    for d in [c.bundle(), c.work()] {
        crate::datadir::private_dir(&d).map_err(io("create container dirs"))?;
    }
    for d in [c.rootfs(), c.upper()] {
        std::fs::create_dir_all(&d).map_err(io("create container dirs"))?;
    }
    if is_mounted(&c.rootfs()) {
        return Ok(());
    }
    let o = crate::overlayfs::Overlay {
        lower: layers.iter().rev().cloned().collect(),
        upper: Some((c.upper(), c.work())),
        optional: Vec::new(),
    };
    crate::overlayfs::mount_overlay(&o, &c.rootfs()).map_err(|err| BundleError::Mount {
        path: c.rootfs().display().to_string(),
        err: nix::Error::from_raw(err.raw_os_error().unwrap_or(libc::EIO)),
    })
}

/// Unmounts the root filesystem, and the bundle's tmpfs of a task with secrets or configs
/// (`crate::secrets`), which takes their values out of memory.
pub fn unmount_rootfs(c: &ContainerDir) {
    let _ = umount2(&c.rootfs(), MntFlags::MNT_DETACH);
    if is_mounted(&c.bundle()) {
        let _ = umount2(&c.bundle(), MntFlags::MNT_DETACH);
    }
}

fn is_mounted(path: &Path) -> bool {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(p.as_str())))
        .unwrap_or(false)
}

/// Docker's default capability set.
const CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// The runtime's default namespaces, the network one joining `netns` (the namespace the agent
/// prepared, with the interfaces in it) when given, or left out for the host's network.
pub fn namespaces(
    defaults: &oci_spec::runtime::Linux,
    netns: Option<&Path>,
    host_network: bool,
) -> Vec<oci_spec::runtime::LinuxNamespace> {
    defaults
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !(host_network && n.typ() == LinuxNamespaceType::Network))
        .map(|n| match netns {
            Some(p) if n.typ() == LinuxNamespaceType::Network => {
                let mut n = n.clone();
                n.set_path(Some(p.to_path_buf()));
                n
            }
            _ => n,
        })
        .collect()
}

/// Whether the capabilities every container gets ([`CAPS`]) let it reconfigure its network
/// namespace (addresses, routes, links, firewall rules): the namespace pool then never reuses
/// a task's namespace.
pub(crate) fn caps_reconfigure_network() -> bool {
    CAPS.iter()
        .any(|c| matches!(c, Capability::NetAdmin | Capability::SysAdmin))
}

/// [`CAPS`] as a container process's bounding, effective and permitted sets.
pub fn capabilities() -> LinuxCapabilities {
    let caps: oci_spec::runtime::Capabilities = CAPS.iter().copied().collect();
    LinuxCapabilities::default()
        .set_bounding(Some(caps.clone()))
        .set_effective(Some(caps.clone()))
        .set_permitted(Some(caps))
        .set_inheritable(None)
        .set_ambient(None)
        .clone()
}

/// The process a task runs: Docker's merge of entrypoint/cmd/args.
pub fn command_line(task: &Task, image: &ImageConfig) -> Result<Vec<String>, BundleError> {
    let s = &task.spec;
    let entrypoint = s
        .entrypoint
        .clone()
        .unwrap_or_else(|| image.entrypoint.clone());
    let mut cmd = match (&s.command, &s.entrypoint) {
        (Some(c), _) => c.clone(),
        // A new entrypoint drops the image's CMD, as in Docker.
        (None, Some(_)) => vec![],
        (None, None) => image.cmd.clone(),
    };
    cmd.extend(s.args.iter().cloned());
    let mut argv = entrypoint;
    argv.extend(cmd);
    if argv.is_empty() {
        return Err(BundleError::NoCommand);
    }
    Ok(argv)
}

/// What of a container's spec comes from its host rather than its task.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostSpec<'a> {
    /// The cgroup every container is placed under.
    pub cgroup_parent: &'a str,
    /// The default seccomp profile compiled for the runtime, when it takes one (crun).
    pub seccomp_bpf: Option<&'a crate::seccomp::Precompiled>,
}

/// Builds and writes `config.json` for the task into `c.bundle()`. `task_mounts` are its own
/// (volumes, binds, tmpfs: `crate::volume::Volumes::prepare`), mounted after the defaults and
/// after the network files, so a user's mount wins.
pub fn write_config(
    c: &ContainerDir,
    task: &Task,
    image: &ImageConfig,
    host: &HostSpec<'_>,
    netns: Option<&Path>,
    task_mounts: &[oci_spec::runtime::Mount],
    secret_env: &[(String, String)],
) -> Result<(), BundleError> {
    let s = &task.spec;
    let argv = command_line(task, image)?;
    let mut env: Vec<(String, String)> = Vec::new();
    for kv in &image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        env.push((k.to_string(), v.to_string()));
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(
            0,
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
        );
    }
    for (k, v) in &s.env {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) => e.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    // Values from secrets (`env_from_secret`): this config.json is then on the task's tmpfs.
    for (k, v) in secret_env {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) => e.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    let hostname = task.hostname();
    env.push(("HOSTNAME".into(), hostname.clone()));
    // Names resolve in the container's own passwd and group files (as Docker does); an
    // unknown name rejects the task rather than run it as root.
    let user = s.user.clone().unwrap_or_else(|| image.user.clone());
    let user = crate::user::resolve_in_rootfs(&c.rootfs(), &user)?;
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), user.home.clone()));
    }
    let cwd = s
        .workdir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| Some(image.working_dir.clone()).filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());

    // The agent wrote these for the task's networks (the embedded DNS, and its address); the
    // service's `dns*` and `extra_hosts` go into them.
    let etc = options::etc_files(
        c,
        s,
        netns,
        !task.networks.is_empty(),
        Path::new("/etc/resolv.conf"),
    )?;
    let options = SpecOptions {
        argv,
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd,
        user: &user,
        no_new_privileges: true,
        hostname,
        rootfs: &c.rootfs(),
        cgroups_path: PathBuf::from(format!(
            "{}/{}",
            host.cgroup_parent.trim_end_matches('/'),
            task.id
        )),
        netns,
        host_network: s.network_mode == NetworkMode::Host && netns.is_none(),
        limits: &s.resources.limits,
        seccomp: crate::seccomp::for_task(&s.security_opt),
        seccomp_bpf: host.seccomp_bpf,
        etc,
        etc_readonly: false,
        mounts: task_mounts,
    };
    let mut spec = spec(&options)?;
    options::apply(&mut spec, s, Path::new(options::HOST_INIT))?;
    // Private: it holds the task's env.
    write_spec(&c.config(), &spec)
}

/// What makes a container's OCI spec: the one builder for tasks' containers and build steps'.
pub(crate) struct SpecOptions<'a> {
    pub argv: Vec<String>,
    /// `KEY=value`.
    pub env: Vec<String>,
    pub cwd: String,
    pub user: &'a crate::user::ExecUser,
    /// Tasks: set (setuid programs gain nothing). Build steps: not, as docker builds (a RUN
    /// may use sudo or su).
    pub no_new_privileges: bool,
    pub hostname: String,
    /// The root filesystem (resolved here: runc refuses a rootfs that is a symlink).
    pub rootfs: &'a Path,
    pub cgroups_path: PathBuf,
    /// The network namespace the agent prepared; `None` and not `host_network`: one of its own.
    pub netns: Option<&'a Path>,
    pub host_network: bool,
    pub limits: &'a rudder_model::spec::Limits,
    pub seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    /// The runtime takes this program compiled ahead (crun); given to the container when its
    /// profile is the one it was compiled from.
    pub seccomp_bpf: Option<&'a crate::seccomp::Precompiled>,
    /// Files bind-mounted at `/etc/<name>` (resolv.conf, hosts), read-only when
    /// `etc_readonly`; after the runtime's default mounts.
    pub etc: Vec<(&'static str, PathBuf)>,
    pub etc_readonly: bool,
    /// The container's own mounts, last, so a user's mount wins.
    pub mounts: &'a [oci_spec::runtime::Mount],
}

/// The OCI spec of a container: the runtime's defaults (namespaces, masked and read-only
/// paths, default mounts), Docker's default capabilities, and `o`.
pub(crate) fn spec(o: &SpecOptions<'_>) -> Result<Spec, BundleError> {
    let spec_err = |e: oci_spec::OciSpecError| BundleError::Spec(e.to_string());
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(o.argv.clone())
        .env(o.env.clone())
        .cwd(o.cwd.clone())
        .user(
            UserBuilder::default()
                .uid(o.user.uid)
                .gid(o.user.gid)
                .additional_gids(o.user.additional_gids(&[]))
                .build()
                .map_err(spec_err)?,
        )
        .capabilities(capabilities())
        .no_new_privileges(o.no_new_privileges)
        .build()
        .map_err(spec_err)?;
    let mut spec = Spec::default();
    let defaults = spec.linux().clone().unwrap_or_default();
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces(&defaults, o.netns, o.host_network))
        .cgroups_path(o.cgroups_path.clone())
        .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
        .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default())
        .resources(limits(
            o.limits,
            defaults.resources().clone().unwrap_or_default(),
        )?)
        .build()
        .map_err(spec_err)?;
    linux.set_seccomp(o.seccomp.clone());
    let mut annotations = spec.annotations().clone().unwrap_or_default();
    if let (Some(bpf), Some(profile)) = (o.seccomp_bpf, &o.seccomp) {
        if bpf.profile == *profile {
            annotations.insert(crate::seccomp::ANNOTATION.to_string(), bpf.base64.clone());
        }
    }
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
    if o.etc_readonly {
        options.push("ro".into());
    }
    for (name, src) in &o.etc {
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(format!("/etc/{name}"))
                .typ("bind")
                .source(src)
                .options(options.clone())
                .build()
                .map_err(spec_err)?,
        );
    }
    mounts.extend(o.mounts.iter().cloned());
    spec.set_mounts(Some(mounts))
        .set_hostname(Some(o.hostname.clone()))
        .set_process(Some(process))
        .set_linux(Some(linux))
        .set_annotations(Some(annotations))
        .set_root(Some(
            RootBuilder::default()
                .path(o.rootfs.canonicalize().map_err(io("resolve rootfs"))?)
                .readonly(false)
                .build()
                .map_err(spec_err)?,
        ));
    Ok(spec)
}

/// Writes `spec` as `path` (a bundle's config.json), private: it holds the container's env.
pub fn write_spec(path: &Path, spec: &Spec) -> Result<(), BundleError> {
    let json = serde_json::to_vec(spec).map_err(|e| BundleError::Spec(e.to_string()))?;
    crate::datadir::write_private(path, &json).map_err(io("write config.json"))
}

/// The spec's limits as cgroup settings: cpu quota over a 100 ms period, memory, pids.
pub(crate) fn limits(
    l: &rudder_model::spec::Limits,
    mut r: oci_spec::runtime::LinuxResources,
) -> Result<oci_spec::runtime::LinuxResources, BundleError> {
    use oci_spec::runtime::{LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder};
    let spec_err = |e: oci_spec::OciSpecError| BundleError::Spec(e.to_string());
    const PERIOD_US: u64 = 100_000;
    if l.cpus > 0 {
        let quota = (l.cpus * PERIOD_US / 1000) as i64;
        r.set_cpu(Some(
            LinuxCpuBuilder::default()
                .period(PERIOD_US)
                .quota(quota)
                .build()
                .map_err(spec_err)?,
        ));
    }
    if l.memory > 0 {
        let bytes = i64::try_from(l.memory).unwrap_or(i64::MAX);
        r.set_memory(Some(
            LinuxMemoryBuilder::default()
                .limit(bytes)
                // No swap beyond the limit: the limit is what the task gets.
                .swap(bytes)
                .build()
                .map_err(spec_err)?,
        ));
    }
    if l.pids > 0 {
        r.set_pids(Some(
            LinuxPidsBuilder::default()
                .limit(i64::try_from(l.pids).unwrap_or(i64::MAX))
                .build()
                .map_err(spec_err)?,
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(entrypoint: Option<Vec<&str>>, command: Option<Vec<&str>>, args: Vec<&str>) -> Task {
        let mut spec: rudder_model::ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": "web", "image": "x"
        }))
        .unwrap();
        spec.entrypoint = entrypoint.map(|v| v.into_iter().map(String::from).collect());
        spec.command = command.map(|v| v.into_iter().map(String::from).collect());
        spec.args = args.into_iter().map(String::from).collect();
        serde_json::from_value(serde_json::json!({
            "id": "abcdef0123456789", "service_id": "s", "service_name": "web", "slot": 1,
            "spec": spec, "spec_version": 1, "node_id": "n", "desired_state": "running",
            "status": {"state": "assigned", "timestamp": 0}, "created_at": 0, "version": 1
        }))
        .unwrap()
    }

    #[test]
    fn docker_command_merge() {
        let img = ImageConfig {
            entrypoint: vec!["/ep".into()],
            cmd: vec!["default".into()],
            ..Default::default()
        };
        let cases = [
            (task(None, None, vec![]), vec!["/ep", "default"]),
            (task(None, Some(vec!["run"]), vec![]), vec!["/ep", "run"]),
            (task(None, None, vec!["x"]), vec!["/ep", "default", "x"]),
            (task(Some(vec!["/sh"]), None, vec![]), vec!["/sh"]),
            (
                task(Some(vec!["/sh"]), Some(vec!["-c", "true"]), vec![]),
                vec!["/sh", "-c", "true"],
            ),
        ];
        for (t, want) in cases {
            assert_eq!(command_line(&t, &img).unwrap(), want);
        }
        assert!(matches!(
            command_line(&task(None, None, vec![]), &ImageConfig::default()),
            Err(BundleError::NoCommand)
        ));
    }

    #[test]
    fn tasks_get_the_default_seccomp_profile_unless_unconfined() {
        let t = tempfile::tempdir().unwrap();
        let c = ContainerDir::new(t.path());
        std::fs::create_dir_all(c.rootfs()).unwrap();
        let img = ImageConfig {
            cmd: vec!["true".into()],
            ..Default::default()
        };
        let mut task = task(None, None, vec![]);
        let bpf = crate::seccomp::Precompiled {
            profile: crate::seccomp::default_profile(),
            base64: "AAAAAAAAAAA=".into(),
        };
        // The profile, and the program compiled from it when the runtime takes one.
        let seccomp = |task: &Task, host: &HostSpec| {
            write_config(&c, task, &img, host, None, &[], &[]).unwrap();
            let spec = Spec::load(c.config()).unwrap();
            let program = spec
                .annotations()
                .clone()
                .unwrap_or_default()
                .get(crate::seccomp::ANNOTATION)
                .cloned();
            (spec.linux().clone().unwrap().seccomp().clone(), program)
        };
        let crun = HostSpec {
            cgroup_parent: "rudder",
            seccomp_bpf: Some(&bpf),
        };
        let runc = HostSpec {
            cgroup_parent: "rudder",
            seccomp_bpf: None,
        };
        let default = Some(crate::seccomp::default_profile());
        assert_eq!(seccomp(&task, &runc), (default.clone(), None));
        assert_eq!(
            seccomp(&task, &crun),
            (default, Some("AAAAAAAAAAA=".to_string()))
        );
        task.spec.security_opt = vec!["seccomp=unconfined".into()];
        assert_eq!(seccomp(&task, &runc), (None, None));
        // No profile, no program: an unconfined task is not given the default's.
        assert_eq!(seccomp(&task, &crun), (None, None));
    }

    #[test]
    fn users_resolve_in_the_containers_passwd() {
        let t = tempfile::tempdir().unwrap();
        let c = ContainerDir::new(t.path());
        std::fs::create_dir_all(c.rootfs().join("etc")).unwrap();
        std::fs::write(
            c.rootfs().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home/nobody:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(c.rootfs().join("etc/group"), "users:x:100:nobody\n").unwrap();
        let user_of = |image_user: &str, spec_user: Option<&str>| {
            let img = ImageConfig {
                cmd: vec!["true".into()],
                user: image_user.into(),
                ..Default::default()
            };
            let mut t = task(None, None, vec![]);
            t.spec.user = spec_user.map(String::from);
            let rudder = HostSpec {
                cgroup_parent: "rudder",
                seccomp_bpf: None,
            };
            write_config(&c, &t, &img, &rudder, None, &[], &[])?;
            let spec = Spec::load(c.config()).unwrap();
            let p = spec.process().clone().unwrap();
            let home = p
                .env()
                .clone()
                .unwrap()
                .into_iter()
                .find(|e| e.starts_with("HOME="))
                .unwrap();
            let u = p.user();
            Ok::<_, BundleError>((
                u.uid(),
                u.gid(),
                u.additional_gids().clone().unwrap_or_default(),
                home,
            ))
        };
        assert_eq!(
            user_of("nobody", None).unwrap(),
            (65534, 65534, vec![100], "HOME=/home/nobody".into())
        );
        // The service's user wins over the image's; a bare uid not in passwd gets gid 0.
        assert_eq!(
            user_of("nobody", Some("4000")).unwrap(),
            (4000, 0, vec![], "HOME=/".into())
        );
        assert_eq!(
            user_of("", None).unwrap(),
            (0, 0, vec![], "HOME=/root".into())
        );
        let e = user_of("nosuch", None).unwrap_err().to_string();
        assert_eq!(
            e,
            "bundle: user: unable to find user nosuch: no matching entries in passwd file"
        );
    }
}

//! A task's runtime options (`rudder_model::runtime_options`) in its OCI config: capabilities,
//! rlimits, namespaced sysctls, a read-only root, the size of /dev/shm, an init process as
//! PID 1, and the `/etc/hosts` and `/etc/resolv.conf` entries the service adds.
//!
//! Invariants: the spec was validated by the model (every name here is a known one; an unknown
//! one is still refused with [`BundleError::Spec`], never dropped); the text functions are pure
//! and idempotent (applying them to their own output changes nothing), so a bundle written twice
//! has the same files.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Capabilities, LinuxCapabilities, MountBuilder, PosixRlimit, Spec};
use rudder_model::runtime_options as ro;
use rudder_model::spec::NetworkMode;
use rudder_model::ServiceSpec;

use super::{BundleError, ContainerDir};

/// Where Debian's `tini` package puts its static build, the init `init: true` runs.
pub const HOST_INIT: &str = "/usr/bin/tini-static";
/// Where the init is bound in the container (Docker's path for its `docker-init`).
pub const INIT_IN_CONTAINER: &str = "/sbin/docker-init";

fn spec_err(e: impl std::fmt::Display) -> BundleError {
    BundleError::Spec(e.to_string())
}

/// The container's capabilities (`cap_add`/`cap_drop` over Docker's defaults) as its bounding,
/// effective and permitted sets.
pub fn capabilities(s: &ServiceSpec) -> Result<LinuxCapabilities, BundleError> {
    let mut caps = Capabilities::new();
    for name in ro::effective_capabilities(&s.cap_add, &s.cap_drop) {
        let c: oci_spec::runtime::Capability =
            serde_json::from_value(serde_json::Value::String(format!("CAP_{name}")))
                .map_err(|_| spec_err(format!("cap_add: unknown capability {name}")))?;
        caps.insert(c);
    }
    Ok(LinuxCapabilities::default()
        .set_bounding(Some(caps.clone()))
        .set_effective(Some(caps.clone()))
        .set_permitted(Some(caps))
        .set_inheritable(None)
        .set_ambient(None)
        .clone())
}

/// Whether a task with this spec could reconfigure its network namespace (a capability that
/// allows it, or `net.*` sysctls): its pooled namespace is then never given to another task.
pub fn reconfigures_network(s: &ServiceSpec) -> bool {
    ro::effective_capabilities(&s.cap_add, &s.cap_drop)
        .iter()
        .any(|c| c == "NET_ADMIN" || c == "SYS_ADMIN")
        || s.sysctls
            .keys()
            .any(|k| ro::sysctl_scope(k) == Some(ro::SysctlScope::Net))
}

/// `ulimits` as the process's rlimits (`RLIMIT_NOFILE`, ...), in name order.
pub fn rlimits(s: &ServiceSpec) -> Result<Vec<PosixRlimit>, BundleError> {
    s.ulimits
        .iter()
        .map(|(name, u)| {
            let typ: oci_spec::runtime::PosixRlimitType = serde_json::from_value(
                serde_json::Value::String(format!("RLIMIT_{}", name.to_ascii_uppercase())),
            )
            .map_err(|_| spec_err(format!("ulimits.{name}: unknown limit")))?;
            oci_spec::runtime::PosixRlimitBuilder::default()
                .typ(typ)
                .soft(u.soft)
                .hard(u.hard)
                .build()
                .map_err(spec_err)
        })
        .collect()
}

/// Applies the task's runtime options to `spec` (made by `super::spec`). `init` is the host's
/// init binary, bound read-only at [`INIT_IN_CONTAINER`] when the task asks for one.
pub fn apply(spec: &mut Spec, s: &ServiceSpec, init: &Path) -> Result<(), BundleError> {
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_capabilities(Some(capabilities(s)?));
    if !s.ulimits.is_empty() {
        // The service's limits replace those of the same type the spec had.
        let mine = rlimits(s)?;
        let mut all: Vec<PosixRlimit> = process
            .rlimits()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| !mine.iter().any(|m| m.typ() == r.typ()))
            .collect();
        all.extend(mine);
        process.set_rlimits(Some(all));
    }
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    if s.init {
        if !init.is_file() {
            return Err(spec_err(format!(
                "init: {} not found on this host (install Debian's tini package)",
                init.display()
            )));
        }
        let mut args = vec![INIT_IN_CONTAINER.to_string(), "--".to_string()];
        args.extend(process.args().clone().unwrap_or_default());
        process.set_args(Some(args));
        mounts.push(
            MountBuilder::default()
                .destination(INIT_IN_CONTAINER)
                .typ("bind")
                .source(init)
                .options(vec![
                    "bind".into(),
                    "ro".into(),
                    "nosuid".into(),
                    "nodev".into(),
                ])
                .build()
                .map_err(spec_err)?,
        );
    }
    if s.shm_size > 0 {
        let size = format!("size={}k", s.shm_size.div_ceil(1024));
        for m in mounts.iter_mut() {
            if m.destination() == Path::new("/dev/shm") {
                let mut opts: Vec<String> = m
                    .options()
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|o| !o.starts_with("size="))
                    .collect();
                opts.push(size.clone());
                m.set_options(Some(opts));
            }
        }
    }
    spec.set_mounts(Some(mounts));
    spec.set_process(Some(process));
    if !s.sysctls.is_empty() {
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_sysctl(Some(
            s.sysctls
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ));
        spec.set_linux(Some(linux));
    }
    if s.read_only {
        if let Some(mut root) = spec.root().clone() {
            root.set_readonly(Some(true));
            spec.set_root(Some(root));
        }
    }
    Ok(())
}

/// Whether the service adds to its resolv.conf or hosts.
pub fn changes_etc(s: &ServiceSpec) -> bool {
    !s.dns.is_empty()
        || !s.dns_search.is_empty()
        || !s.dns_opt.is_empty()
        || !s.extra_hosts.is_empty()
}

/// The container's resolv.conf: `base` (what the network wrote) with the service's `dns`,
/// `dns_search` and `dns_opt`. With `keep_base_servers` (overlay networks: the embedded DNS,
/// which service discovery needs) the base's nameservers stay first and the service's follow;
/// otherwise the service's replace them, as Docker does off its own networks. Search domains
/// replace the base's; options override the base's of the same name.
pub fn resolv_conf(base: &str, s: &ServiceSpec, keep_base_servers: bool) -> String {
    let mut comments = Vec::new();
    let mut servers: Vec<String> = Vec::new();
    let mut search: Vec<String> = Vec::new();
    let mut options: Vec<String> = Vec::new();
    for line in base.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => servers.extend(words.next().map(String::from)),
            Some("search") | Some("domain") => search = words.map(String::from).collect(),
            Some("options") => options.extend(words.map(String::from)),
            Some(w) if w.starts_with('#') || w.starts_with(';') => comments.push(line.to_string()),
            _ => {}
        }
    }
    if !s.dns.is_empty() {
        if !keep_base_servers {
            servers.clear();
        }
        for d in &s.dns {
            if !servers.contains(d) {
                servers.push(d.clone());
            }
        }
    }
    if !s.dns_search.is_empty() {
        // `.` alone means "no search domains" (Docker's convention).
        search = s.dns_search.iter().filter(|d| *d != ".").cloned().collect();
    }
    let opt_name = |o: &str| o.split(':').next().unwrap_or(o).to_string();
    for o in &s.dns_opt {
        options.retain(|b| opt_name(b) != opt_name(o));
        options.push(o.clone());
    }
    let mut out = String::new();
    for c in comments {
        out.push_str(&c);
        out.push('\n');
    }
    for ns in servers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

/// The container's hosts file: `base` plus a line for each `extra_hosts` entry not there yet.
pub fn hosts(base: &str, s: &ServiceSpec) -> String {
    let mut out = base.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for e in &s.extra_hosts {
        if let Ok((host, ip)) = ro::extra_host(e) {
            let line = format!("{ip}\t{host}");
            if !out.lines().any(|l| l == line) {
                out.push_str(&line);
                out.push('\n');
            }
        }
    }
    out
}

/// The `/etc` files bound into the container: those its network wrote (`c.etc_files()`, when
/// it has a namespace of the agent's), rewritten with the service's `dns*` and `extra_hosts`;
/// for a task without them (`host` or `none` networking) that sets any, written here from the
/// host's resolv.conf (`host` only) and a loopback-only hosts file.
pub fn etc_files(
    c: &ContainerDir,
    s: &ServiceSpec,
    netns: Option<&Path>,
    overlay: bool,
    host_resolv_conf: &Path,
) -> Result<Vec<(&'static str, PathBuf)>, BundleError> {
    let io = |op| move |err| BundleError::Io { op, err };
    if !changes_etc(s) {
        return Ok(match netns {
            Some(_) => c
                .etc_files()
                .into_iter()
                .filter(|(_, src)| src.exists())
                .collect(),
            None => Vec::new(),
        });
    }
    let [(_, resolv_path), (_, hosts_path)] = c.etc_files();
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    let base_resolv = match (netns, &s.network_mode) {
        (Some(_), _) => read(&resolv_path).unwrap_or_default(),
        (None, NetworkMode::Host) => read(host_resolv_conf).unwrap_or_default(),
        (None, _) => String::new(),
    };
    let base_hosts = netns.and_then(|_| read(&hosts_path)).unwrap_or_else(|| {
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_string()
    });
    c.make_net_dir()
        .map_err(io("make the network files' dir"))?;
    for (path, text) in [
        (&resolv_path, resolv_conf(&base_resolv, s, overlay)),
        (&hosts_path, hosts(&base_hosts, s)),
    ] {
        // Readable by the container's users, as /etc files are; replaced whole.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(path)
            .map_err(io("write resolv.conf/hosts"))?;
        f.write_all(text.as_bytes())
            .map_err(io("write resolv.conf/hosts"))?;
    }
    Ok(c.etc_files().into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::runtime_options::Ulimit;

    fn svc() -> ServiceSpec {
        serde_json::from_value(serde_json::json!({"name": "web", "image": "x"})).unwrap()
    }

    fn base_spec(t: &Path) -> Spec {
        let mut spec = Spec::default();
        spec.set_root(Some(
            oci_spec::runtime::RootBuilder::default()
                .path(t)
                .readonly(false)
                .build()
                .unwrap(),
        ));
        let mut p = spec.process().clone().unwrap();
        p.set_args(Some(vec!["/app".into(), "run".into()]));
        p.set_rlimits(None);
        spec.set_process(Some(p));
        spec
    }

    #[test]
    fn options_in_the_oci_config() {
        let t = tempfile::tempdir().unwrap();
        let init = t.path().join("tini");
        std::fs::write(&init, b"x").unwrap();
        type Check = Box<dyn Fn(&Spec)>;
        type Mutate = Box<dyn Fn(&mut ServiceSpec)>;
        let cases: Vec<(&str, Mutate, Check)> = vec![
            (
                "defaults: Docker's capabilities, nothing else",
                Box::new(|_| {}),
                Box::new(|spec| {
                    let p = spec.process().clone().unwrap();
                    let caps = p.capabilities().clone().unwrap();
                    assert_eq!(
                        caps.effective().clone().unwrap().len(),
                        ro::DEFAULT_CAPABILITIES.len()
                    );
                    assert_eq!(p.args().clone().unwrap(), ["/app", "run"]);
                    assert!(p.rlimits().clone().unwrap_or_default().is_empty());
                    assert!(spec.linux().clone().unwrap().sysctl().is_none());
                    assert_eq!(spec.root().clone().unwrap().readonly(), Some(false));
                }),
            ),
            (
                "cap_drop ALL, cap_add NET_ADMIN",
                Box::new(|s| {
                    s.cap_drop = vec!["ALL".into()];
                    s.cap_add = vec!["net_admin".into()];
                }),
                Box::new(|spec| {
                    let caps = spec
                        .process()
                        .clone()
                        .unwrap()
                        .capabilities()
                        .clone()
                        .unwrap();
                    for set in [caps.bounding(), caps.effective(), caps.permitted()] {
                        let set = set.clone().unwrap();
                        assert_eq!(set.len(), 1);
                        assert!(set.contains(&oci_spec::runtime::Capability::NetAdmin));
                    }
                }),
            ),
            (
                "ulimits as rlimits",
                Box::new(|s| {
                    s.ulimits.insert(
                        "nofile".into(),
                        Ulimit {
                            soft: 1024,
                            hard: 2048,
                        },
                    );
                    s.ulimits
                        .insert("nproc".into(), Ulimit { soft: 50, hard: 50 });
                }),
                Box::new(|spec| {
                    let r = spec.process().clone().unwrap().rlimits().clone().unwrap();
                    let got: Vec<(String, u64, u64)> = r
                        .iter()
                        .map(|l| (format!("{:?}", l.typ()), l.soft(), l.hard()))
                        .collect();
                    assert_eq!(
                        got,
                        [
                            ("RlimitNofile".to_string(), 1024, 2048),
                            ("RlimitNproc".to_string(), 50, 50)
                        ]
                    );
                }),
            ),
            (
                "sysctls, read-only root, shm size",
                Box::new(|s| {
                    s.sysctls.insert("net.core.somaxconn".into(), "1024".into());
                    s.read_only = true;
                    s.shm_size = 128 << 20;
                }),
                Box::new(|spec| {
                    let sys = spec.linux().clone().unwrap().sysctl().clone().unwrap();
                    assert_eq!(sys["net.core.somaxconn"], "1024");
                    assert_eq!(spec.root().clone().unwrap().readonly(), Some(true));
                    let shm = spec
                        .mounts()
                        .clone()
                        .unwrap()
                        .into_iter()
                        .find(|m| m.destination() == Path::new("/dev/shm"))
                        .unwrap();
                    let opts = shm.options().clone().unwrap();
                    assert!(opts.contains(&"size=131072k".to_string()), "{opts:?}");
                    assert_eq!(opts.iter().filter(|o| o.starts_with("size=")).count(), 1);
                }),
            ),
            (
                "init: tini first, bound read-only",
                Box::new(|s| s.init = true),
                Box::new(|spec| {
                    let args = spec.process().clone().unwrap().args().clone().unwrap();
                    assert_eq!(args, [INIT_IN_CONTAINER, "--", "/app", "run"]);
                    let m = spec
                        .mounts()
                        .clone()
                        .unwrap()
                        .into_iter()
                        .find(|m| m.destination() == Path::new(INIT_IN_CONTAINER))
                        .unwrap();
                    assert!(m.options().clone().unwrap().contains(&"ro".to_string()));
                    assert_eq!(m.typ().as_deref(), Some("bind"));
                }),
            ),
        ];
        for (name, mutate, check) in cases {
            let mut s = svc();
            mutate(&mut s);
            let mut spec = base_spec(t.path());
            apply(&mut spec, &s, &init).unwrap_or_else(|e| panic!("{name}: {e}"));
            check(&spec);
        }
        // No init binary on the host: refused, naming what to install.
        let mut s = svc();
        s.init = true;
        let e = apply(&mut base_spec(t.path()), &s, &t.path().join("none")).unwrap_err();
        assert!(e.to_string().contains("tini"), "{e}");
    }

    #[test]
    fn resolv_conf_and_hosts() {
        let overlay =
            "# Rudder's embedded DNS on network front\nnameserver 10.200.0.1\noptions ndots:0\n";
        let host = "nameserver 192.0.2.53\nsearch lan\noptions edns0\n";
        let mut s = svc();
        s.dns = vec!["10.0.0.53".into()];
        s.dns_search = vec!["corp.example".into(), "example".into()];
        s.dns_opt = vec!["ndots:2".into(), "use-vc".into()];
        for (base, keep, want) in [
            (
                overlay,
                true,
                "# Rudder's embedded DNS on network front\nnameserver 10.200.0.1\n\
                 nameserver 10.0.0.53\nsearch corp.example example\noptions ndots:2 use-vc\n",
            ),
            (
                host,
                false,
                "nameserver 10.0.0.53\nsearch corp.example example\noptions edns0 ndots:2 use-vc\n",
            ),
            (
                "",
                false,
                "nameserver 10.0.0.53\nsearch corp.example example\noptions ndots:2 use-vc\n",
            ),
        ] {
            let got = resolv_conf(base, &s, keep);
            assert_eq!(got, want);
            assert_eq!(resolv_conf(&got, &s, keep), got, "idempotent");
        }
        // Only options: the base's servers and search stay.
        let mut o = svc();
        o.dns_opt = vec!["timeout:1".into()];
        assert_eq!(
            resolv_conf(host, &o, false),
            "nameserver 192.0.2.53\nsearch lan\noptions edns0 timeout:1\n"
        );
        let mut h = svc();
        h.extra_hosts = vec!["db:10.0.0.5".into(), "v6:::1".into()];
        let base = "127.0.0.1\tlocalhost\n10.200.0.7\tabc\n";
        let got = hosts(base, &h);
        assert_eq!(got, format!("{base}10.0.0.5\tdb\n::1\tv6\n"));
        assert_eq!(hosts(&got, &h), got, "idempotent");
    }

    #[test]
    fn etc_files_for_each_network_kind() {
        let t = tempfile::tempdir().unwrap();
        let c = ContainerDir::new(t.path());
        let host_resolv = t.path().join("host-resolv.conf");
        std::fs::write(&host_resolv, "nameserver 127.0.0.53\n").unwrap();
        let mut s = svc();
        // Nothing asked: what the network wrote, or nothing without a namespace.
        assert!(etc_files(&c, &s, None, false, &host_resolv)
            .unwrap()
            .is_empty());
        s.extra_hosts = vec!["db:10.0.0.5".into()];
        s.network_mode = NetworkMode::Host;
        let files = etc_files(&c, &s, None, false, &host_resolv).unwrap();
        assert_eq!(files.len(), 2);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&c.resolv_conf()), "nameserver 127.0.0.53\n");
        assert!(read(&c.hosts()).ends_with("10.0.0.5\tdb\n"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(c.hosts()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        // On an overlay: the embedded DNS stays first.
        std::fs::write(c.resolv_conf(), "nameserver 10.200.0.1\n").unwrap();
        s.network_mode = NetworkMode::Bridge;
        s.dns = vec!["10.0.0.53".into()];
        etc_files(
            &c,
            &s,
            Some(Path::new("/proc/self/ns/net")),
            true,
            &host_resolv,
        )
        .unwrap();
        assert_eq!(
            read(&c.resolv_conf()),
            "nameserver 10.200.0.1\nnameserver 10.0.0.53\n"
        );
    }
}

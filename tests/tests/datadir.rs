//! The agent's data directory is private (audit H2) on a real lab: after a task with a volume
//! ran and a RUN step was built, no file the agent, the shim or the runtime keeps there is
//! readable by other users, and no directory is traversable by them, but for the documented
//! exceptions below 0700 directories (`agent/src/datadir.rs`): a container's `upper` (its
//! `/`), a volume's `_data` (the mount's root) and the `resolv.conf`/`hosts` bind-mounted
//! into containers. Container and image contents (the rootfs, upper and work trees, layers,
//! volume data) are the container's and not looked into. An agent restarted on a data dir left
//! 0755/0644 by an older agent tightens it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rudder_tests::{lab_with_busybox, pinned_service, running_task};

/// Every path below `dir` (not following links) that other users may read or traverse,
/// except the exceptions, with its mode.
fn open_to_others(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = m.permissions().mode() & 0o7777;
        let ft = m.file_type();
        if ft.is_symlink() {
            continue;
        }
        let parent = dir.file_name().unwrap_or_default().to_string_lossy();
        let content = (parent == "bundle" && name == "rootfs")
            || name == "upper"
            || name == "work"
            || name == "_data"
            || (parent == "images" && name == "layers")
            || name == "netns"
            || name == "netns-pool";
        // `netns` (the network's bind-mounted namespaces) and the certificates (public) are
        // other subsystems'; the 0700 data dir covers them. The pooled namespaces in
        // `netns-pool` are nsfs mounts, whose mode (0444) is the kernel's and cannot be
        // changed: the directory itself is checked, not its entries.
        let exception = name == "upper"
            || (name == "netns" && ft.is_dir())
            || (parent == "certs" && (name == "ca.pem" || name == "node.pem"))
            || name == "_data"
            || name == "resolv.conf"
            || name == "hosts"
            || (parent == "bundle" && name == "rootfs");
        let open = if ft.is_dir() {
            mode & 0o001 != 0
        } else {
            mode & 0o004 != 0
        };
        if open && !exception {
            out.push(format!("{} {:o}", p.display(), mode));
        }
        if ft.is_dir() && !content {
            open_to_others(&p, out);
        }
    }
}

#[test]
fn the_agent_data_dir_is_private() -> anyhow::Result<()> {
    let (mut lab, tmp) = lab_with_busybox("dd", 1)?;
    let host = lab.lab.hosts[0].clone();
    let mut svc = pinned_service("priv", "busybox:latest", &host.name);
    svc.push_str(
        "env: {SECRET: hunter2}\nmounts: [{type: volume, source: privdata, target: /data}]\n",
    );
    lab.apply(tmp.path(), "priv.yaml", &svc)?;
    let task = running_task(&lab, "priv")?;
    let name = task["name"].as_str().unwrap().to_string();
    lab.rctl(&[
        "exec",
        &name,
        "--",
        "sh",
        "-c",
        "echo hello; echo x > /data/f",
    ])?;
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx)?;
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:latest\nRUN echo built\n",
    )?;
    lab.rctl(&["build", "-t", "priv:1", ctx.to_str().unwrap()])?;

    let data = &host.data_dir;
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o7777);
    assert_eq!(mode(data)?, 0o700);
    let cdir = data.join("containers").join(task["id"].as_str().unwrap());
    for f in ["task.json", "log", "bundle/config.json"] {
        assert_eq!(mode(&cdir.join(f))?, 0o600, "{f}");
    }
    // The run dir (namespaces, network files) is the agent's private tmpfs, and the task's
    // network files are there, not in the container directory.
    let run = data.join("run");
    assert_eq!(mode(&run)?, 0o700);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(
        mountinfo.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(4) == Some(&run.to_str().unwrap())
                && l.split(" - ")
                    .nth(1)
                    .is_some_and(|t| t.starts_with("tmpfs "))
                && f.get(5)
                    .is_some_and(|o| o.contains("nosuid") && o.contains("noexec"))
        }),
        "{} is not a nosuid,noexec tmpfs",
        run.display()
    );
    let netfiles = run.join("containers").join(task["id"].as_str().unwrap());
    assert!(netfiles.join("hosts").exists() && !cdir.join("hosts").exists());
    assert_eq!(mode(&netfiles.join("bridge_addr"))?, 0o600);
    let mut open = Vec::new();
    open_to_others(data, &mut open);
    assert!(open.is_empty(), "open to other users:\n{}", open.join("\n"));

    // An older agent's loose data dir is tightened when the agent starts.
    for p in [data.clone(), data.join("containers"), cdir.clone()] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::set_permissions(
        cdir.join("task.json"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    let index = lab.host_index(&host.name);
    lab.restart(index, rudder_tests::lab::Role::Agent, false)?;
    rudder_tests::wait_for(
        std::time::Duration::from_secs(30),
        "the data dir tightened",
        || Ok((mode(data)? == 0o700 && mode(&cdir.join("task.json"))? == 0o600).then_some(())),
    )?;
    assert_eq!(mode(&data.join("containers"))?, 0o700);
    assert_eq!(mode(&cdir)?, 0o700);
    Ok(())
}

//! Rolling upgrade over a real lab, from the previous commit's binaries to this build's.
//!
//! The previous commit's `rudder`, `rudder-controller`, `rudder-agent` and `rudder-shim`, built
//! by this test from git, set up and run a lab of five hosts (three run a controller, every host
//! an agent) with a service's containers on every host. Then each controller in turn is stopped,
//! swapped for this build's and started (the cluster keeps taking writes after each), then each
//! agent. No container is restarted (same task ids, same container and shim pids, same start
//! times), the service answers on every host after every step, and `rctl node ls` /
//! `rctl cluster info` show the versions moving to this build's, one host at a time.
//!
//! The base: `RUDDER_UPGRADE_FROM` (a git revision, default `HEAD~1`). A checkout without it
//! (a shallow clone) fails with how to fetch it; the test never skips. It is checked out with
//! `git worktree add --detach` into `target/upgrade-base/src` (removed afterwards) and built
//! with its own target dir, `target/upgrade-base/target`, so `target/debug` is never written;
//! only the four binaries' packages are built. The binaries are kept in
//! `target/upgrade-base/<commit>/`: a second run from the same base builds nothing. The worktree
//! path is fixed so that cargo's package ids (which include the path) stay the same from one base
//! to the next, and a later base rebuilds only the crates that changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rudder_tests::{bin, bin_dir, busybox_rootfs, lab, lab_runtime, pid_alive, wait_for, LabGuard};
use serde_json::Value;

/// The binaries of the base a lab needs, and the packages they come from.
const BASE_BINS: [&str; 4] = ["rudder", "rudder-controller", "rudder-agent", "rudder-shim"];
const BASE_PACKAGES: [&str; 4] = [
    "rudder-host",
    "rudder-controller",
    "rudder-agent",
    "rudder-shim",
];
/// A bound on the base build (a cold one on a busy 2-core machine takes minutes).
const BUILD_TIMEOUT: Duration = Duration::from_secs(45 * 60);
const HOSTS: u32 = 5;
const MANAGERS: u32 = 3;

/// One task per host (a host-mode port allows no more), each answering on its host's port 8080.
const WEB: &str = "kind: Service\nname: web\nimage: busybox:latest\nreplicas: 5\n\
stop_grace_period: 1\n\
command: [\"/bin/sh\", \"-c\", \"mkdir -p /tmp/w; echo upgrade-ok > /tmp/w/index.html; exec httpd -f -p 8080 -h /tmp/w\"]\n\
ports: [{target: 8080, mode: host}]\n";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn git(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .current_dir(repo_root())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run git")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The base revision's full commit id, or an error saying how to get it when the checkout's
/// history lacks it (a shallow clone, a first commit).
fn base_commit() -> anyhow::Result<String> {
    let rev = std::env::var("RUDDER_UPGRADE_FROM")
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "HEAD~1".into());
    match git(&[
        "rev-parse",
        "--verify",
        "--quiet",
        &format!("{rev}^{{commit}}"),
    ]) {
        Ok(c) if c.len() == 40 => Ok(c),
        _ => {
            let shallow = git(&["rev-parse", "--is-shallow-repository"]).unwrap_or_default();
            let how = if shallow == "true" {
                "this is a shallow clone: fetch the history it needs (`git fetch --deepen=1`, \
                 or `git fetch --unshallow`)"
            } else {
                "fetch it, or name a commit this checkout has"
            };
            bail!(
                "upgrade: the base revision {rev:?} (RUDDER_UPGRADE_FROM, default HEAD~1) is \
                 not in {}'s git history: {how}; or set RUDDER_UPGRADE_FROM to a commit it has",
                repo_root().display()
            )
        }
    }
}

/// Removes the base's worktree (and git's record of it) when dropped, also on failure.
struct Worktree(PathBuf);

impl Worktree {
    fn add(path: PathBuf, commit: &str) -> anyhow::Result<Worktree> {
        Worktree::remove(&path);
        let w = Worktree(path);
        git(&["worktree", "add", "--detach", &w.path_str(), commit])?;
        Ok(w)
    }
    fn path_str(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
    fn remove(path: &Path) {
        let _ = git(&["worktree", "remove", "--force", &path.to_string_lossy()]);
        let _ = std::fs::remove_dir_all(path);
        let _ = git(&["worktree", "prune"]);
    }
}

impl Drop for Worktree {
    fn drop(&mut self) {
        Worktree::remove(&self.0);
    }
}

/// Runs `cmd` with its output in `log` (never a pipe we wait on), within `timeout`.
fn run_logged(mut cmd: Command, log: &Path, timeout: Duration, what: &str) -> anyhow::Result<()> {
    let out = std::fs::File::create(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("start {what}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            if st.success() {
                return Ok(());
            }
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{what} failed ({st}); {}:\n{}",
                log.display(),
                tail.join("\n")
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} took over {timeout:?}; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The base commit's binaries, built once per commit into `target/upgrade-base/<commit>/`.
fn base_binaries(commit: &str) -> anyhow::Result<PathBuf> {
    let root = bin_dir()
        .parent()
        .context("the target dir")?
        .join("upgrade-base");
    std::fs::create_dir_all(&root)?;
    // One build at a time (two test runs in one checkout would share the target dir).
    let lock = std::fs::File::create(root.join(".lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("lock {}: {e}", root.display()))?;
    let out = root.join(commit);
    if BASE_BINS.iter().all(|b| out.join(b).is_file()) {
        eprintln!("upgrade: base {commit} already built in {}", out.display());
        return Ok(out);
    }
    // Only the latest base's binaries are kept (the target dir is shared by all bases).
    for e in std::fs::read_dir(&root)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.len() == 40 && n.chars().all(|c| c.is_ascii_hexdigit()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let tree = Worktree::add(root.join("src"), commit)?;
    for p in ["host", "controller", "agent", "shim"] {
        anyhow::ensure!(
            tree.0.join(p).join("Cargo.toml").is_file(),
            "upgrade: base {commit} has no {p}/ crate: it is older than the bootstrap \
             commands; set RUDDER_UPGRADE_FROM to a later commit"
        );
    }
    let log = root.join("build.log");
    let started = Instant::now();
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(&tree.0)
        .args(["build", "--locked", "--bins"])
        .args(BASE_PACKAGES.iter().flat_map(|p| ["-p", p]))
        .env("CARGO_TARGET_DIR", root.join("target"))
        .env("CARGO_INCREMENTAL", "0")
        .env("RUDDER_GIT_COMMIT", &commit[..12]);
    run_logged(cmd, &log, BUILD_TIMEOUT, "the base build")?;
    eprintln!(
        "upgrade: built base {commit} in {:.0?} (log {})",
        started.elapsed(),
        log.display()
    );
    drop(tree);
    let staging = root.join(format!("{commit}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    for b in BASE_BINS {
        std::fs::copy(root.join("target/debug").join(b), staging.join(b))
            .with_context(|| format!("copy the base {b}"))?;
    }
    std::fs::rename(&staging, &out)?;
    Ok(out)
}

/// The start time of process `pid` (clock ticks since boot): a restarted container has a new one
/// even if its pid were reused.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 2..)?;
    after.split(' ').nth(19)?.parse().ok()
}

/// Task id → (node, container pid, its start time, shim pid).
type Containers = BTreeMap<String, (String, i32, u64, i32)>;

fn containers(g: &LabGuard) -> anyhow::Result<Containers> {
    let mut m = Containers::new();
    for t in g.running_of("web")? {
        let id = t["id"].as_str().context("task id")?.to_string();
        let pid = g.task_pid(&t, "pid").context("container pid")?;
        let shim = g.task_pid(&t, "shim.pid").context("shim pid")?;
        let start = start_time(pid).context("container start time")?;
        let node = t["node"].as_str().unwrap_or_default().to_string();
        m.insert(id, (node, pid, start, shim));
    }
    Ok(m)
}

/// Every host serves the page on its host port.
fn answers(g: &LabGuard) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    for h in &g.lab.hosts {
        let addr = std::net::SocketAddr::from((h.addr, 8080));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("{} does not answer", h.name))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        if !body.contains("upgrade-ok") {
            bail!("{}: {body}", h.name);
        }
    }
    Ok(())
}

/// Hostname → reported version (`rctl node ls -o json`).
fn node_versions(g: &LabGuard) -> anyhow::Result<BTreeMap<String, String>> {
    let nodes: Vec<Value> = serde_json::from_str(&g.rctl(&["node", "ls", "-o", "json"])?)?;
    Ok(nodes
        .iter()
        .map(|n| {
            (
                n["hostname"].as_str().unwrap_or_default().to_string(),
                n["version"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// Raft id → version of each controller (`rctl cluster info -o json`).
fn controller_versions(g: &LabGuard) -> anyhow::Result<BTreeMap<u64, String>> {
    let info: Value = serde_json::from_str(&g.rctl(&["cluster", "info", "-o", "json"])?)?;
    Ok(info["managers"]
        .as_array()
        .context("managers")?
        .iter()
        .map(|m| {
            (
                m["raft_id"].as_u64().unwrap_or_default(),
                m["version"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// A write goes through (a label on a node), retried while a new leader is elected.
fn write_succeeds(g: &LabGuard, step: &str) -> anyhow::Result<()> {
    let label = format!("upgraded-{step}=yes");
    wait_for(
        Duration::from_secs(60),
        &format!("a write after {step}"),
        || {
            Ok(g.rctl(&["node", "update", "h1", "--label-add", &label])
                .ok()
                .map(|_| ()))
        },
    )
}

fn unchanged(g: &LabGuard, before: &Containers, step: &str) -> anyhow::Result<()> {
    // Reads may briefly fail while a controller restarts: retry, then compare.
    let now = wait_for(Duration::from_secs(30), "the task list", || {
        Ok(containers(g).ok().filter(|c| c.len() == before.len()))
    })
    .with_context(|| format!("after {step}"))?;
    assert_eq!(&now, before, "containers changed after {step}");
    for (id, (_, pid, _, shim)) in before {
        assert!(
            pid_alive(*pid) && pid_alive(*shim),
            "{id} died after {step}"
        );
    }
    answers(g).with_context(|| format!("the service after {step}"))
}

#[test]
fn rolling_upgrade_from_the_previous_commit_keeps_containers() -> anyhow::Result<()> {
    let commit = base_commit()?;
    let base = base_binaries(&commit)?;
    let new_version = rudder_version::full();
    eprintln!("upgrade: from {commit} to {new_version}");

    let name = format!("up{}", std::process::id() % 100000);
    let root = lab::default_root();
    let runtime = lab_runtime();
    let cfg = lab::LabConfig {
        name: name.clone(),
        nodes: HOSTS,
        managers: MANAGERS,
        root: root.clone(),
        agent_bin: base.join("rudder-agent"),
        controller_bin: base.join("rudder-controller"),
        rudder_bin: Some(base.join("rudder")),
        runtime: runtime.clone(),
        extra_agent_args: vec![],
        extra_controller_args: vec![],
    };
    let _ = lab::down(&root, &name);
    let mut g = LabGuard {
        lab: lab::up(&cfg)?,
        root,
    };
    let tmp = tempfile::tempdir()?;
    let tar = tmp.path().join("busybox.tar");
    busybox_rootfs(&tar)?;
    g.rctl(&[
        "image",
        "import",
        tar.to_str().context("utf-8 path")?,
        "busybox:latest",
    ])?;
    g.apply(tmp.path(), "web.yaml", WEB)?;
    let before = wait_for(Duration::from_secs(120), "5 web tasks running", || {
        Ok(containers(&g).ok().filter(|c| c.len() == HOSTS as usize))
    })?;
    wait_for(Duration::from_secs(30), "the service answering", || {
        Ok(answers(&g).ok())
    })?;
    let old_nodes = wait_for(Duration::from_secs(30), "every node's version", || {
        let v = node_versions(&g)?;
        Ok((v.len() == HOSTS as usize && v.values().all(|v| !v.is_empty())).then_some(v))
    })?;
    eprintln!("upgrade: before: nodes {old_nodes:?}");
    assert!(
        old_nodes.values().all(|v| *v != new_version),
        "the base already reports this build's version: {old_nodes:?}"
    );
    let old_controllers = controller_versions(&g)?;
    assert!(
        old_controllers.values().all(|v| *v != new_version) && old_controllers.len() == 3,
        "{old_controllers:?}"
    );

    // Controllers, one by one: stop, swap, start; the cluster keeps taking writes.
    let step_started = Instant::now();
    for i in 0..MANAGERS as usize {
        let step = format!("controller-{}", i + 1);
        g.lab.restart(
            i,
            lab::Role::Controller,
            &bin("rudder-controller"),
            &runtime,
            false,
        )?;
        write_succeeds(&g, &step)?;
        unchanged(&g, &before, &step)?;
        let cv = wait_for(
            Duration::from_secs(30),
            &format!("controller {} reporting {new_version}", i + 1),
            || {
                let cv = controller_versions(&g)?;
                Ok((cv.get(&(i as u64 + 1)) == Some(&new_version)).then_some(cv))
            },
        )?;
        eprintln!("upgrade: {step} upgraded: controllers {cv:?}");
        // The ones not yet upgraded still run the base.
        for later in i + 1..MANAGERS as usize {
            assert_ne!(cv.get(&(later as u64 + 1)), Some(&new_version), "{cv:?}");
        }
    }
    eprintln!(
        "upgrade: controllers upgraded in {:.0?}",
        step_started.elapsed()
    );

    // Then agents, one by one; each comes back reporting the new version, the others keep theirs.
    for i in 0..HOSTS as usize {
        let host = g.lab.hosts[i].name.clone();
        g.lab
            .restart(i, lab::Role::Agent, &bin("rudder-agent"), &runtime, false)?;
        let seen = wait_for(
            Duration::from_secs(60),
            &format!("{host} reporting {new_version}"),
            || {
                let v = node_versions(&g)?;
                Ok((v.get(&host) == Some(&new_version)).then_some(v))
            },
        )?;
        eprintln!("upgrade: agent on {host} upgraded: nodes {seen:?}");
        for later in &g.lab.hosts[i + 1..] {
            assert_eq!(
                seen.get(&later.name),
                old_nodes.get(&later.name),
                "{seen:?}"
            );
        }
        write_succeeds(&g, &format!("agent-{}", i + 1))?;
        unchanged(&g, &before, &format!("agent on {host} upgraded"))?;
    }

    // Past the heartbeat deadline: still the same containers, every node ready and new.
    std::thread::sleep(Duration::from_secs(5));
    unchanged(&g, &before, "the upgrade")?;
    let tasks = g.tasks("web")?;
    assert_eq!(tasks.len(), HOSTS as usize, "replacement tasks: {tasks:#?}");
    let nodes: Vec<Value> = serde_json::from_str(&g.rctl(&["node", "ls", "-o", "json"])?)?;
    for n in &nodes {
        assert_eq!(n["state"], "ready", "{n}");
        assert_eq!(n["version"], new_version.as_str(), "{n}");
    }
    let table = g.rctl(&["node", "ls"])?;
    assert!(
        table.contains("VERSION") && table.contains(&new_version),
        "{table}"
    );
    Ok(())
}

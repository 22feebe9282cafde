//! The packaged units under a real systemd (issue 21). Two throwaway machines, each this host's
//! own systemd booted as PID 1 of fresh namespaces (`scripts/systemd-machine.sh`), joined by a
//! veth pair. On the first, the .deb is installed with dpkg and `rudder init` starts both
//! units through systemctl; on the second, the release tarball's `install.sh` and `rudder join`.
//! What is checked is what a real host relies on:
//!
//! - `Type=notify`: systemd takes READY=1 from each daemon (the controller's from a thread,
//!   accepted under `NotifyAccess=main`) and calls the unit started only after it;
//! - the controller's hardening lets it run: it starts, serves, writes its data dir;
//! - `Restart=on-failure` brings a SIGKILLed controller and agent back;
//! - the agent's containers (and their shims) outlive `systemctl restart rudder-agent`, a
//!   SIGKILL of the agent and `systemctl stop rudder-agent` (`KillMode=process`, `Delegate=yes`);
//! - the journal holds each daemon's logs under its unit and identifier;
//! - `rudder leave` on the worker drains it, stops and disables its unit and removes the node;
//!   the only manager's `leave` is refused;
//! - `systemctl stop` gets STOPPING=1 from both daemons and a clean exit (status 0).
//!
//! Prerequisites (root, systemd, util-linux's unshare and nsenter, iproute2, dpkg, runc or
//! crun, busybox) are checked first: a missing one fails the test, naming it. The machines are
//! killed (SIGKILL of their PID 1 ends every process in them, containers included), their
//! cgroups removed and their directories deleted when the test ends, also on failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rudder_tests::{bin, bin_dir, busybox_rootfs, wait_for};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The link between the two machines.
const ADDR_A: &str = "192.168.213.1";
const ADDR_B: &str = "192.168.213.2";
/// `rudder init`'s controller port (`rudder_host::config::CONTROLLER_PORT`).
const CONTROLLER_PORT: u16 = 4243;

/// Two sleeping containers on `host` (pinned: the second machine joins later, and none may move).
fn idle_service(host: &str) -> String {
    format!(
        "kind: Service\nname: idle\nimage: busybox:latest\nreplicas: 2\nstop_grace_period: 1\n\
         placement: {{constraints: [\"node.hostname=={host}\"]}}\n\
         command: [\"/bin/sleep\", \"1000000\"]\n"
    )
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd` (stdin closed) and fails with its output unless it succeeds.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    Ok(text(&out.stdout))
}

/// Fails, naming what is missing, unless this host can boot a systemd machine.
fn check_prerequisites() {
    let uid = run(Command::new("id").arg("-u")).unwrap_or_default();
    assert_eq!(uid.trim(), "0", "systemd_units must run as root");
    for (path, package) in [
        ("/lib/systemd/systemd", "systemd"),
        ("/usr/bin/unshare", "util-linux"),
        ("/usr/bin/nsenter", "util-linux"),
        ("/usr/bin/dpkg-deb", "dpkg"),
        ("/usr/bin/tar", "tar"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} missing: apt-get install {package} (see .ci/install-deps)"
        );
    }
    for (tool, package) in [("ip", "iproute2"), ("busybox", "busybox-static")] {
        assert!(
            run(Command::new("sh").args(["-c", &format!("command -v {tool}")])).is_ok(),
            "{tool} missing: apt-get install {package} (see .ci/install-deps)"
        );
    }
    assert!(
        run(Command::new("sh").args(["-c", "command -v runc || command -v crun"])).is_ok(),
        "no OCI runtime: apt-get install runc (see .ci/install-deps)"
    );
    let cgroups = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(
        cgroups.contains(" - cgroup"),
        "no cgroup hierarchy is mounted on this host"
    );
}

/// This host's cgroup hierarchies' mount points.
fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let at = left.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(at))
        })
        .collect()
}

/// Removes the cgroup directory `dir` and everything below it, deepest first. Only empty
/// cgroups can go: fails while a process is left.
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// A systemd booted by `scripts/systemd-machine.sh`. Dropping it kills the machine (SIGKILL
/// of its PID 1: the kernel then kills every process of its pid namespace, nested container
/// namespaces included), removes its cgroups and its directory.
struct Machine {
    name: String,
    /// The `unshare` process (parent of the machine's PID 1).
    unshare: Child,
    /// systemd, as this host's pid namespace numbers it.
    pid: i32,
    dir: PathBuf,
    /// Print the end of the machine's journal when it is dropped (unless the test passed).
    dump: bool,
}

impl Machine {
    /// Boots machine `name` in `dir` with `share` at `/srv/share`, waiting until systemd says
    /// it is running.
    fn boot(name: &str, dir: &Path, share: &Path) -> anyhow::Result<Machine> {
        // Leftovers of an earlier run killed before it could clean up.
        for h in hierarchies() {
            let _ = remove_cgroup_tree(&h.join(format!("rudder-machine-{name}")));
        }
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("console.log"))?;
        let mut cmd = Command::new(repo().join("scripts/systemd-machine.sh"));
        cmd.arg(name)
            .arg(dir.join("m"))
            .arg(share)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // The machine dies with this test (unshare runs with --kill-child).
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let unshare = cmd.spawn().context("starting systemd-machine.sh")?;
        let mut m = Machine {
            name: name.to_string(),
            pid: 0,
            unshare,
            dir: dir.to_path_buf(),
            dump: true,
        };
        let upid = m.unshare.id();
        m.pid = wait_for(Duration::from_secs(20), "the machine's PID 1", || {
            if let Some(st) = m.unshare.try_wait()? {
                bail!("systemd-machine.sh exited ({st}): {}", m.console());
            }
            let children = std::fs::read_to_string(format!("/proc/{upid}/task/{upid}/children"))?;
            let Some(pid) = children.split_whitespace().next() else {
                return Ok(None);
            };
            let pid: i32 = pid.parse()?;
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            Ok(exe.ends_with("systemd").then_some(pid))
        })?;
        let state = wait_for(Duration::from_secs(60), "systemd to finish booting", || {
            if let Some(st) = m.unshare.try_wait()? {
                bail!("the machine stopped ({st}): {}", m.console());
            }
            let out = m.try_sh("systemctl is-system-running")?;
            let state = text(&out.stdout).trim().to_string();
            Ok(matches!(state.as_str(), "running" | "degraded").then_some(state))
        })?;
        if state == "degraded" {
            bail!(
                "{name} booted degraded: {}",
                m.sh("systemctl --failed --no-pager; journalctl -b --no-pager | tail -n 50")?
            );
        }
        Ok(m)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// `sh -c script` inside the machine (all its namespaces, its root).
    fn try_sh(&self, script: &str) -> anyhow::Result<Output> {
        Command::new("nsenter")
            .arg("-t")
            .arg(self.pid.to_string())
            .args([
                "-a",
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root",
            ])
            .args(["sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .context("running nsenter")
    }

    /// [`Machine::try_sh`], failing with the output unless the script succeeds.
    fn sh(&self, script: &str) -> anyhow::Result<String> {
        let out = self.try_sh(script)?;
        if !out.status.success() {
            bail!(
                "{}: `{script}` failed ({}): {}\n{}",
                self.name,
                out.status,
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        Ok(text(&out.stdout))
    }

    /// `systemctl show UNIT` as a map.
    fn show(&self, unit: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let out = self.sh(&format!("systemctl show {unit}"))?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// One property of a unit.
    fn prop(&self, unit: &str, key: &str) -> anyhow::Result<String> {
        Ok(self
            .sh(&format!("systemctl show {unit} -p {key} --value"))?
            .trim()
            .to_string())
    }

    /// systemd's own messages of this boot (PID 1's journal entries), in order.
    fn manager_log(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .sh("journalctl -b _PID=1 -o cat --no-pager")?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Whether the machine's process `pid` (its own pid namespace's number) is alive.
    fn alive(&self, pid: i32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/root/proc/{pid}/stat", self.pid));
        stat.map(|s| s.split(' ').nth(2) != Some("Z"))
            .unwrap_or(false)
    }

    /// A path of the machine's file system, from this host.
    fn path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{p}", self.pid))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.dump && self.pid > 0 {
            let journal = self
                .try_sh(
                    "journalctl -b -p warning --no-pager -o short-monotonic | tail -n 100; \
                     echo ---; journalctl -b --no-pager -o short-monotonic | tail -n 150",
                )
                .map(|o| text(&o.stdout))
                .unwrap_or_default();
            eprintln!(
                "--- {} console:\n{}\n--- {} journal (end):\n{journal}",
                self.name,
                self.console(),
                self.name
            );
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        let cg = format!("rudder-machine-{}", self.name);
        let deadline = Instant::now() + Duration::from_secs(10);
        for h in hierarchies() {
            // The kernel kills the namespace's processes asynchronously: wait until they are
            // gone from the cgroups.
            while let Err(e) = remove_cgroup_tree(&h.join(&cg)) {
                if Instant::now() > deadline {
                    eprintln!(
                        "{}: cannot remove {}: {e}",
                        self.name,
                        h.join(&cg).display()
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("{}: cannot remove {}: {e}", self.name, self.dir.display());
        }
    }
}

/// Index of the first line of `log` containing every one of `words`.
fn find(log: &[String], words: &[&str]) -> Option<usize> {
    log.iter().position(|l| words.iter().all(|w| l.contains(w)))
}

/// systemd's record of a notification from `pid` carrying `what` (at debug level).
fn notified(log: &[String], unit: &str, pid: &str, what: &str) -> Option<usize> {
    find(
        log,
        &[
            &format!("{unit}.service: Got notification message from PID {pid} "),
            what,
        ],
    )
}

/// SIGKILLs `unit`'s main process `old` and waits until systemd has restarted it
/// (`Restart=on-failure`: one more restart counted, active again); returns the new main pid.
fn kill_and_wait_restarted(m: &Machine, unit: &str, old: &str) -> anyhow::Result<String> {
    let restarts: u32 = m.prop(unit, "NRestarts")?.parse()?;
    m.sh(&format!("kill -9 {old}"))?;
    let restarts = restarts + 1;
    wait_for(
        Duration::from_secs(60),
        &format!("{unit} restarted"),
        || {
            let s = m.show(unit)?;
            let pid = s.get("MainPID").cloned().unwrap_or_default();
            Ok((s.get("ActiveState").map(String::as_str) == Some("active")
                && s.get("NRestarts") == Some(&restarts.to_string())
                && pid != old
                && pid != "0")
                .then_some(pid))
        },
    )
}

/// The journal holds the output of `unit`'s process `pid` as the unit's: every line carries
/// `_SYSTEMD_UNIT=<unit>.service` and `SYSLOG_IDENTIFIER=<unit>` (so `journalctl -u` and `-t`
/// find it), its level as the entry's priority (`journalctl -p warning` finds the warnings)
/// and no time stamp of its own.
fn assert_journal(m: &Machine, unit: &str, pid: &str) -> anyhow::Result<()> {
    let entries = wait_for(Duration::from_secs(20), "log lines in the journal", || {
        let out = m.sh(&format!("journalctl _PID={pid} -o json --no-pager"))?;
        let entries = out
            .lines()
            .map(serde_json::from_str::<serde_json::Value>)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((entries.len() >= 3).then_some(entries))
    })?;
    let mut infos = 0;
    for e in &entries {
        assert_eq!(e["_SYSTEMD_UNIT"], format!("{unit}.service"), "{e}");
        assert_eq!(e["SYSLOG_IDENTIFIER"], unit, "{e}");
        let message = e["MESSAGE"].as_str().unwrap_or_default();
        let want = match message.split_whitespace().next() {
            Some("ERROR") => "3",
            Some("WARN") => "4",
            Some("INFO") => "6",
            Some("DEBUG" | "TRACE") => "7",
            _ => panic!("{unit}: a line without its level (or with a time stamp): {e}"),
        };
        assert_eq!(e["PRIORITY"], want, "{e}");
        infos += usize::from(want == "6");
    }
    assert!(infos > 0, "{unit}: no info line");
    Ok(())
}

/// The machine's running tasks of `service`: (task id, container pid in the machine).
fn running_containers(
    m: &Machine,
    ctx: &str,
    service: &str,
) -> anyhow::Result<BTreeMap<String, i32>> {
    let out = m.sh(&format!("rctl --context {ctx} ps {service} -o json"))?;
    let tasks: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    let mut got = BTreeMap::new();
    for t in tasks
        .iter()
        .filter(|t| t["state"] == "running" && t["desired_state"] == "running")
    {
        let id = t["id"].as_str().context("task id")?.to_string();
        let pid =
            std::fs::read_to_string(m.path(&format!("/var/lib/rudder/agent/containers/{id}/pid")))?;
        got.insert(id, pid.trim().parse()?);
    }
    Ok(got)
}

#[test]
fn units_run_under_systemd() -> anyhow::Result<()> {
    check_prerequisites();
    let started = Instant::now();
    let tag = std::process::id() % 100000;
    let tmp = tempfile::tempdir()?;
    let share = tmp.path().join("share");
    std::fs::create_dir_all(&share)?;

    // The artifacts a user installs: the .deb and the tarball, of the debug binaries.
    let dist = share.join("dist");
    run(Command::new(repo().join("scripts/release.sh"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .args(["--arch", "amd64", "--out"])
        .arg(&dist))?;
    busybox_rootfs(&share.join("busybox.tar"))?;
    bin("rudder");
    let packaged = started.elapsed();

    let a = Machine::boot(&format!("sd{tag}a"), &tmp.path().join("a"), &share)?;
    let b = Machine::boot(&format!("sd{tag}b"), &tmp.path().join("b"), &share)?;
    let booted = started.elapsed();
    let (veth_a, veth_b) = (format!("sd{tag}a0"), format!("sd{tag}b0"));
    run(Command::new("ip").args([
        "link",
        "add",
        &veth_a,
        "netns",
        &a.pid.to_string(),
        "type",
        "veth",
        "peer",
        "name",
        &veth_b,
        "netns",
        &b.pid.to_string(),
    ]))?;
    for (m, dev, addr) in [(&a, &veth_a, ADDR_A), (&b, &veth_b, ADDR_B)] {
        m.sh(&format!(
            "ip link set lo up && ip addr add {addr}/24 dev {dev} && ip link set {dev} up"
        ))?;
        // systemd logs every notification it gets (and what it makes of it) at debug level.
        m.sh("systemctl log-level debug")?;
    }

    // --- a: the .deb, then `rudder init` (systemd starts both units) -------------------------
    let deb = format!("/srv/share/dist/rudder_{VERSION}_amd64.deb");
    a.sh(&format!("dpkg -i {deb}"))?;
    assert_eq!(
        a.sh("systemctl is-enabled rudder-controller rudder-agent || true")?
            .trim(),
        "disabled\ndisabled",
        "installing must not enable anything"
    );
    let init = a.sh(&format!("rudder init --advertise-addr {ADDR_A}"))?;
    assert!(init.contains("rudder join --token"), "{init}");
    let worker_token = init
        .lines()
        .find(|l| l.contains("rudder join --token"))
        .and_then(|l| l.split_whitespace().nth(3))
        .context("no worker join command")?
        .to_string();
    for unit in ["rudder-controller", "rudder-agent"] {
        let s = a.show(unit)?;
        assert_eq!(s["Type"], "notify", "{unit}");
        assert_eq!(s["ActiveState"], "active", "{unit}: {s:?}");
        assert_eq!(s["SubState"], "running", "{unit}");
        assert_eq!(s["UnitFileState"], "enabled", "{unit}");
    }
    // READY=1 arrived (from the controller's probe thread) and only then was the unit started.
    let ctl_pid = a.prop("rudder-controller", "MainPID")?;
    let agent_pid = a.prop("rudder-agent", "MainPID")?;
    let log = a.manager_log()?;
    let ctl_ready = notified(&log, "rudder-controller", &ctl_pid, "READY=1")
        .with_context(|| format!("no READY=1 from the controller:\n{}", log.join("\n")))?;
    let ctl_started = find(&log, &["Started rudder-controller.service"]).context("not started")?;
    assert!(ctl_ready < ctl_started, "{}", log.join("\n"));
    assert_eq!(
        a.prop("rudder-controller", "StatusText")?,
        format!("serving the API on 0.0.0.0:{CONTROLLER_PORT}")
    );
    let agent_ready = notified(&log, "rudder-agent", &agent_pid, "READY=1")
        .with_context(|| format!("no READY=1 from the agent:\n{}", log.join("\n")))?;
    let agent_started = find(&log, &["Started rudder-agent.service"]).context("not started")?;
    assert!(agent_ready < agent_started, "{}", log.join("\n"));
    // The confined controller wrote its data dir (0700, under the unit's StateDirectory).
    let data = a.path("/var/lib/rudder/controller");
    assert!(data.join("admin/ca.pem").is_file());

    // --- Restart=on-failure after SIGKILL; the journal -------------------------------------
    // At systemd's debug level its own logging delays moving a forked service into its cgroup
    // (252 attaches in the parent after logging "Forked"), so journald may record a new
    // process's first lines under init.scope. What the journal holds is checked at the usual
    // level.
    a.sh("systemctl log-level info")?;
    let ctl_pid2 = kill_and_wait_restarted(&a, "rudder-controller", &ctl_pid)?;
    let log = a.manager_log()?;
    assert!(
        find(
            &log,
            &["rudder-controller.service: Main process exited, code=killed, status=9/KILL"]
        )
        .is_some()
            && find(&log, &["rudder-controller.service: Scheduled restart job"]).is_some(),
        "{}",
        log.join("\n")
    );
    assert_journal(&a, "rudder-controller", &ctl_pid2)?;

    // --- the agent's containers outlive the agent --------------------------------------------
    let admin = "/var/lib/rudder/controller/admin";
    std::fs::write(
        share.join("ctx.json"),
        serde_json::json!({
            "controller": format!("http://{ADDR_A}:{CONTROLLER_PORT}"),
            "registry": format!("{ADDR_A}:5000"),
            "ca": format!("{admin}/ca.pem"),
            "cert": format!("{admin}/admin.pem"),
            "key": format!("{admin}/admin-key.pem"),
        })
        .to_string(),
    )?;
    let ctx = "/srv/share/ctx.json";
    a.sh(&format!(
        "rctl --context {ctx} image import /srv/share/busybox.tar busybox:latest"
    ))?;
    std::fs::write(share.join("idle.yaml"), idle_service(&a.name))?;
    a.sh(&format!(
        "rctl --context {ctx} apply --detach -f /srv/share/idle.yaml"
    ))?;
    let containers = wait_for(Duration::from_secs(90), "2 idle containers", || {
        let c = running_containers(&a, ctx, "idle")?;
        Ok((c.len() == 2).then_some(c))
    })?;
    let survive = |what: &str| -> anyhow::Result<()> {
        for (id, pid) in &containers {
            assert!(
                a.alive(*pid),
                "{id}'s container (pid {pid}) died with {what}"
            );
        }
        Ok(())
    };
    a.sh("systemctl restart rudder-agent")?;
    let agent_pid2 = a.prop("rudder-agent", "MainPID")?;
    assert_ne!(agent_pid2, agent_pid);
    survive("systemctl restart rudder-agent")?;
    assert_journal(&a, "rudder-agent", &agent_pid2)?;
    let log = a.manager_log()?;
    // KillMode=process: the stop signalled the agent only; the shims stayed in the unit.
    assert!(
        find(
            &log,
            &[
                "rudder-agent.service: Found left-over process",
                "(rudder-shim)"
            ]
        )
        .is_some(),
        "{}",
        log.join("\n")
    );
    let agent_pid3 = kill_and_wait_restarted(&a, "rudder-agent", &agent_pid2)?;
    survive("a SIGKILLed agent")?;
    // The restarted agent adopted them: the same tasks run, nothing was replaced.
    let again = wait_for(
        Duration::from_secs(30),
        "the idle tasks after restarts",
        || {
            let c = running_containers(&a, ctx, "idle")?;
            Ok((c == containers).then_some(c))
        },
    )?;
    assert_eq!(again, containers);

    // --- b: install.sh from the tarball, `rudder join`, `rudder leave` -------------------------
    let installed = b.sh(&format!(
        "mkdir -p /tmp/rel && tar -xzf /srv/share/dist/rudder-{VERSION}-amd64.tar.gz -C /tmp/rel \
         && /tmp/rel/rudder-{VERSION}-amd64/install.sh"
    ))?;
    assert!(installed.contains("reloaded systemd"), "{installed}");
    let joined = b.sh(&format!(
        "rudder join --token {worker_token} --advertise-addr {ADDR_B} {ADDR_A}:{CONTROLLER_PORT}"
    ))?;
    let s = b.show("rudder-agent")?;
    assert_eq!(s["ActiveState"], "active", "{joined}\n{s:?}");
    assert_eq!(s["UnitFileState"], "enabled");
    assert_eq!(
        b.sh("systemctl is-enabled rudder-controller || true")?
            .trim(),
        "disabled",
        "a worker runs no controller"
    );
    let nodes = |m: &Machine| -> anyhow::Result<usize> {
        let out = m.sh(&format!("rctl --context {ctx} node ls -o json"))?;
        Ok(serde_json::from_str::<Vec<serde_json::Value>>(&out)?.len())
    };
    wait_for(Duration::from_secs(30), "2 nodes", || {
        Ok((nodes(&a)? == 2).then_some(()))
    })?;
    // The worker leaves with the admin's credentials (copied to it, as an operator would).
    let admin_b = share.join("admin");
    std::fs::create_dir_all(&admin_b)?;
    for f in ["ca.pem", "admin.pem", "admin-key.pem"] {
        std::fs::copy(a.path(&format!("{admin}/{f}")), admin_b.join(f))?;
    }
    std::fs::write(
        share.join("ctx-b.json"),
        serde_json::json!({
            "controller": format!("http://{ADDR_A}:{CONTROLLER_PORT}"),
            "registry": format!("{ADDR_A}:5000"),
            "ca": "/srv/share/admin/ca.pem",
            "cert": "/srv/share/admin/admin.pem",
            "key": "/srv/share/admin/admin-key.pem",
        })
        .to_string(),
    )?;
    let left = b.sh("rudder leave --context /srv/share/ctx-b.json")?;
    assert!(left.contains("left the cluster"), "{left}");
    let s = b.show("rudder-agent")?;
    assert_eq!(s["ActiveState"], "inactive", "{s:?}");
    assert_eq!(s["UnitFileState"], "disabled");
    assert_eq!(s["Result"], "success", "{s:?}");
    assert!(!b.path("/var/lib/rudder/agent/certs").exists());
    assert_eq!(nodes(&a)?, 1);
    // The cluster's only manager may not leave.
    let refused = a.try_sh("rudder leave")?;
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("only manager"),
        "{}",
        text(&refused.stderr)
    );

    // --- systemctl stop: STOPPING=1 and a clean exit; containers stay -------------------------
    a.sh("systemctl log-level debug")?;
    a.sh("systemctl stop rudder-agent rudder-controller")?;
    survive("systemctl stop rudder-agent")?;
    let log = a.manager_log()?;
    for (unit, pid) in [
        ("rudder-agent", &agent_pid3),
        ("rudder-controller", &ctl_pid2),
    ] {
        let s = a.show(unit)?;
        assert_eq!(s["ActiveState"], "inactive", "{unit}: {s:?}");
        assert_eq!(s["Result"], "success", "{unit}: {s:?}");
        assert_eq!(s["ExecMainStatus"], "0", "{unit}: {s:?}");
        assert!(
            notified(&log, unit, pid, "STOPPING=1").is_some(),
            "{unit}: no STOPPING=1 from {pid}:\n{}",
            log.join("\n")
        );
    }
    // RUDDER_SYSTEMD_DUMP=1 prints the machines' journals also when the test passes.
    let dump = std::env::var_os("RUDDER_SYSTEMD_DUMP").is_some();
    let (mut a, mut b) = (a, b);
    a.dump = dump;
    b.dump = dump;
    eprintln!(
        "systemd_units: packaged in {packaged:?}, machines booted at {booted:?}, done in {:?}",
        started.elapsed()
    );
    Ok(())
}

//! Helpers for multi-host tests and benches: locate the built binaries, bring up a lab with a
//! guard that tears it down even when a test panics, run `rctl` against it, make test images.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
pub use rudder_lab as lab;

pub mod chaos;
pub mod linearizability;

/// The cargo target directory holding the workspace's binaries (`cargo build --bins` first).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RUDDER_BIN_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    // Prefer the profile this test was built with.
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    target.join(profile)
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// The OCI runtime the lab's agents are told to use: `RUDDER_LAB_RUNTIME` (`auto`, `runc` or
/// `crun`), `auto` when unset.
pub fn lab_runtime() -> String {
    std::env::var("RUDDER_LAB_RUNTIME")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "auto".into())
}

/// The runtime the lab's agents use (see [`lab_runtime`]), with state dir `root`: the same
/// binary and cgroup view, so tests see their containers as the agents do.
pub fn runtime_cli(root: &Path) -> rudder_agent::shim::RuntimeCli {
    rudder_agent::runtime::pick_runtime(&lab_runtime(), root)
}

/// A lab that is torn down when dropped, also on panic.
pub struct LabGuard {
    pub lab: lab::Lab,
    pub root: PathBuf,
}

impl LabGuard {
    /// The tasks of `service` running and meant to run.
    pub fn running_of(&self, service: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        Ok(running_tasks(&self.tasks(service)?)
            .into_iter()
            .cloned()
            .collect())
    }

    pub fn up(name: &str, nodes: u32) -> anyhow::Result<LabGuard> {
        Self::up_with(name, nodes, 1)
    }

    /// A lab whose first `managers` hosts run controllers (one raft group).
    pub fn up_with(name: &str, nodes: u32, managers: u32) -> anyhow::Result<LabGuard> {
        Self::up_args(name, nodes, managers, &[])
    }

    /// [`LabGuard::up_with`], with extra arguments for every controller.
    pub fn up_args(
        name: &str,
        nodes: u32,
        managers: u32,
        controller_args: &[&str],
    ) -> anyhow::Result<LabGuard> {
        let root = std::env::var_os("RUDDER_LAB_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/rudder-lab"));
        let cfg = lab::LabConfig {
            name: name.to_string(),
            nodes,
            managers,
            root: root.clone(),
            agent_bin: bin("rudder-agent"),
            controller_bin: bin("rudder-controller"),
            rudder_bin: Some(bin("rudder")),
            runtime: lab_runtime(),
            extra_agent_args: vec![],
            extra_controller_args: controller_args.iter().map(|a| a.to_string()).collect(),
        };
        let _ = lab::down(&root, name);
        let lab = lab::up(&cfg)?;
        Ok(LabGuard { lab, root })
    }

    /// Runs `rctl ARGS` against this lab; returns stdout, or an error with stderr.
    pub fn rctl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.rctl_with(args, &[], None)
    }

    /// [`LabGuard::rctl`] with extra environment variables and, when given, `stdin` fed in.
    pub fn rctl_with(
        &self,
        args: &[&str],
        env: &[(&str, &Path)],
        stdin: Option<&str>,
    ) -> anyhow::Result<String> {
        use std::io::Write as _;
        use std::process::Stdio;
        let mut cmd = Command::new(bin("rctl"));
        cmd.arg("--context").arg(&self.lab.context_path).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = match stdin {
            None => cmd.output().context("run rctl")?,
            Some(input) => {
                let mut child = cmd
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("run rctl")?;
                child
                    .stdin
                    .take()
                    .context("rctl stdin")?
                    .write_all(input.as_bytes())?;
                child.wait_with_output()?
            }
        };
        if !out.status.success() {
            // What rctl printed on stdout before failing (a per-place report, say) is
            // often the part that says why.
            bail!(
                "rctl {} failed: {}\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `rctl ps SERVICE -o json` parsed.
    pub fn tasks(&self, service: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let out = self.rctl(&["ps", service, "-o", "json"])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Restarts host `index`'s controller or agent (same data dir); returns the new pid.
    pub fn restart(&mut self, index: usize, role: lab::Role, kill9: bool) -> anyhow::Result<i32> {
        let b = match role {
            lab::Role::Controller => bin("rudder-controller"),
            lab::Role::Agent => bin("rudder-agent"),
        };
        Ok(self.lab.restart(index, role, &b, "auto", kill9)?)
    }

    pub fn host(&self, hostname: &str) -> &lab::LabHost {
        self.lab
            .hosts
            .iter()
            .find(|h| h.name == hostname)
            .unwrap_or_else(|| panic!("no host {hostname}"))
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        // `RUDDER_LAB_LOGS=DIR` keeps each host's agent and controller logs for a post-mortem.
        if let Some(keep) = std::env::var_os("RUDDER_LAB_LOGS") {
            let dir = PathBuf::from(keep).join(&self.lab.name);
            let _ = std::fs::create_dir_all(&dir);
            for h in &self.lab.hosts {
                for log in [h.agent_log(), h.controller_log()] {
                    if let Some(f) = log.file_name() {
                        let to = dir.join(format!("{}-{}", h.name, f.to_string_lossy()));
                        let _ = std::fs::copy(&log, to);
                    }
                }
            }
        }
        if let Err(e) = lab::down(&self.root, &self.lab.name) {
            eprintln!("lab down {}: {e}", self.lab.name);
        }
    }
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with the last observation.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e.to_string(),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes a busybox root filesystem tarball (bin/busybox + applet symlinks) to `out`.
pub fn busybox_rootfs(out: &Path) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/busybox-rootfs.sh");
    let st = Command::new("bash").arg(script).arg(out).status()?;
    if !st.success() {
        bail!("busybox-rootfs.sh failed");
    }
    Ok(())
}

/// Inode of a namespace file (`/proc/PID/ns/net` or `/run/netns/NAME`).
pub fn ns_inode(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split(' ').nth(2) == Some("Z"))
            .unwrap_or(true)
}

/// Tasks both observed and desired `running`, from `rctl ps -o json`.
pub fn running_tasks(tasks: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    tasks
        .iter()
        .filter(|t| t["state"] == "running" && t["desired_state"] == "running")
        .collect()
}

/// The autoscaling service of the autoscale test and bench: `burn` burns a cpu (up to its 0.5
/// cpu limit) while /tmp/burn exists; the reservation, 0.1 cpu, is what `cpu_percent` is a
/// share of. Short windows keep a run under a minute.
pub const BURN_MANIFEST: &str = "kind: Service\nname: burn\nimage: busybox:latest\nreplicas: 1\n\
     stop_grace_period: 1\n\
     command: [\"/bin/sh\", \"-c\", \"while :; do if [ -f /tmp/burn ]; then \
     while [ -f /tmp/burn ]; do :; done; else sleep 1; fi; done\"]\n\
     resources:\n  reservations: {cpus: 0.1}\n  limits: {cpus: 0.5}\n\
     autoscale: {min: 1, max: 3, cpu_percent: 50, window: 4s, scale_up_delay: 0s, \
     scale_down_delay: 10s}\n";

impl LabGuard {
    /// Writes `yaml` to `dir/<file>` and runs `rctl apply --detach -f` on it (tests poll for
    /// the states they expect); returns rctl's output.
    pub fn apply(&self, dir: &Path, file: &str, yaml: &str) -> anyhow::Result<String> {
        let path = dir.join(file);
        std::fs::write(&path, yaml)?;
        self.rctl(&[
            "apply",
            "--detach",
            "-f",
            path.to_str().context("utf-8 path")?,
        ])
    }

    /// Imports `<name>:latest`: the busybox image of `tmp/busybox.tar` plus `/bin/<name>`,
    /// compiled statically from the C program `source` (tests' tiny servers).
    pub fn import_c_tool(&self, tmp: &Path, name: &str, source: &str) -> anyhow::Result<()> {
        let src = tmp.join(format!("{name}.c"));
        std::fs::write(&src, source)?;
        let add = tmp.join(format!("{name}-add"));
        std::fs::create_dir_all(add.join("bin"))?;
        let st = Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(add.join("bin").join(name))
            .arg(&src)
            .status()
            .context("cc")?;
        anyhow::ensure!(st.success(), "cc -static {name}.c failed");
        let tar = tmp.join(format!("{name}.tar"));
        std::fs::copy(tmp.join("busybox.tar"), &tar)?;
        let st = Command::new("tar")
            .arg("-C")
            .arg(&add)
            .arg("-rf")
            .arg(&tar)
            .arg(format!("./bin/{name}"))
            .status()?;
        anyhow::ensure!(st.success(), "tar -rf failed");
        self.rctl(&[
            "image",
            "import",
            tar.to_str().context("utf-8 path")?,
            &format!("{name}:latest"),
        ])?;
        Ok(())
    }

    /// A pid recorded in a task's container dir on its host (`pid` for the container's init,
    /// `shim.pid` for its shim).
    pub fn task_pid(&self, task: &serde_json::Value, file: &str) -> Option<i32> {
        let host = self.host(task["node"].as_str()?);
        let dir = host.data_dir.join("containers").join(task["id"].as_str()?);
        std::fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Index (0-based) of the host named `hostname`.
    pub fn host_index(&self, hostname: &str) -> usize {
        self.lab
            .hosts
            .iter()
            .position(|h| h.name == hostname)
            .unwrap_or_else(|| panic!("no host {hostname}"))
    }

    /// Sends `signal` (a `kill` name: STOP, CONT, …) to host `index`'s agent, the pid the lab
    /// recorded. SIGSTOP freezes it with its connections open, as a hung or cut-off host.
    pub fn signal_agent(&self, index: usize, signal: &str) -> anyhow::Result<i32> {
        let pid = self.lab.hosts[index]
            .agent_pid
            .context("no agent pid recorded")?;
        anyhow::ensure!(pid > 1, "bad agent pid {pid}");
        let st = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(st.success(), "kill -{signal} {pid} failed");
        Ok(pid)
    }

    /// SIGKILLs host `index`'s agent (the pid the lab recorded) and waits until it is gone;
    /// returns that pid. Its containers keep running: they belong to their shims.
    pub fn kill9_agent(&self, index: usize) -> anyhow::Result<i32> {
        let pid = self.signal_agent(index, "KILL")?;
        wait_for(Duration::from_secs(10), "killed agent gone", || {
            Ok((!pid_alive(pid)).then_some(()))
        })?;
        Ok(pid)
    }
}

/// A lab of `nodes` hosts named `<prefix><pid>`, with `busybox:latest` imported. The temp dir
/// holds the rootfs tarball (`busybox.tar`) and whatever manifests the test writes.
pub fn lab_with_busybox(prefix: &str, nodes: u32) -> anyhow::Result<(LabGuard, tempfile::TempDir)> {
    lab_with_busybox_managers(prefix, nodes, 1)
}

/// [`lab_with_busybox`] with `managers` controllers.
pub fn lab_with_busybox_managers(
    prefix: &str,
    nodes: u32,
    managers: u32,
) -> anyhow::Result<(LabGuard, tempfile::TempDir)> {
    lab_with_busybox_args(prefix, nodes, managers, &[])
}

/// [`lab_with_busybox_managers`] whose controllers get `controller_args` too.
pub fn lab_with_busybox_args(
    prefix: &str,
    nodes: u32,
    managers: u32,
    controller_args: &[&str],
) -> anyhow::Result<(LabGuard, tempfile::TempDir)> {
    let lab = LabGuard::up_args(
        &format!("{prefix}{}", std::process::id() % 100000),
        nodes,
        managers,
        controller_args,
    )?;
    let tmp = tempfile::tempdir()?;
    let tar = tmp.path().join("busybox.tar");
    busybox_rootfs(&tar)?;
    lab.rctl(&[
        "image",
        "import",
        tar.to_str().context("utf-8 path")?,
        "busybox:latest",
    ])?;
    Ok((lab, tmp))
}

/// Runs `cmd` inside `task`'s container (its host's OCI runtime `exec`, as its own process,
/// as health checks do); returns whether it succeeded and its stdout followed by its stderr.
pub fn exec(
    lab: &LabGuard,
    task: &serde_json::Value,
    cmd: &[&str],
) -> anyhow::Result<(bool, String)> {
    let host = lab.host(task["node"].as_str().context("task has a node")?);
    let id = task["id"].as_str().context("task id")?;
    let dir = rudder_agent::shim::ContainerDir::new(host.data_dir.join("containers").join(id));
    let argv: Vec<String> = cmd.iter().map(|a| a.to_string()).collect();
    let process = rudder_agent::runtime::exec_process(&dir.config(), &argv, false)?;
    let file = rudder_agent::runtime::write_process(&dir.bundle(), &process)?;
    let out = runtime_cli(&host.runtime_root)
        .exec(id, &file)
        .stdin(std::process::Stdio::null())
        .output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// Waits (up to 60 s) for a running task of `service` and returns it (`rctl ps -o json`).
pub fn running_task(lab: &LabGuard, service: &str) -> anyhow::Result<serde_json::Value> {
    wait_for(
        Duration::from_secs(60),
        &format!("{service} running"),
        || {
            let t = lab.tasks(service)?;
            Ok(running_tasks(&t).first().map(|t| (*t).clone()))
        },
    )
}

/// Runs `sh -c script` in `task` through `rctl exec` (relayed by the controller); its stdout,
/// which must come with exit code 0.
pub fn sh(lab: &LabGuard, task: &str, script: &str) -> anyhow::Result<String> {
    lab.rctl(&["exec", task, "--", "sh", "-c", script])
}

/// The name of `service`'s running task, once one runs on `host` (up to 60 s).
pub fn running_on(lab: &LabGuard, service: &str, host: &str) -> anyhow::Result<String> {
    wait_for(
        Duration::from_secs(60),
        &format!("{service} running on {host}"),
        || {
            let t = lab.tasks(service)?;
            Ok(running_tasks(&t)
                .into_iter()
                .find(|t| t["node"] == host)
                .and_then(|t| t["name"].as_str().map(str::to_string)))
        },
    )
}

/// A one-replica service of `image` that sleeps, pinned to `host`.
pub fn pinned_service(name: &str, image: &str, host: &str) -> String {
    format!(
        "kind: Service\nname: {name}\nimage: {image}\nstop_grace_period: 1\n\
         placement: {{constraints: [\"node.hostname=={host}\"]}}\n\
         command: [\"/bin/sleep\", \"1000000\"]\n"
    )
}

/// Debian's `docker-registry` (the reference distribution registry) serving on a free
/// loopback port from a temp dir, for tests of Rudder's client against it. Killed (exactly
/// that pid) and its storage removed when dropped, also when a test panics (its log is
/// printed then).
pub struct DistributionRegistry {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
    log_path: PathBuf,
    dir: tempfile::TempDir,
}

impl DistributionRegistry {
    /// Starts it with `auth` (a YAML block at the config's top level, e.g. `auth:\n  htpasswd:
    /// …`) after `files` (name, contents) are written into its dir; `{dir}` in `auth` is that
    /// dir. Waits (10 s at most) until it listens.
    pub fn start(auth: &str, files: &[(&str, &[u8])]) -> anyhow::Result<DistributionRegistry> {
        use std::process::Stdio;
        let dir = tempfile::tempdir()?;
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents)?;
        }
        // A free port: bind, note it, let go (the registry binds it right after).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        // `info` so that the registry's reasons for refusals land in the log.
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n  secret: rudder-test\n{}",
            dir.path().join("data").display(),
            auth.replace("{dir}", &dir.path().display().to_string())
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log_path = dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context(
                "start docker-registry (apt-get install docker-registry; see .ci/install-deps)",
            )?;
        let mut r = DistributionRegistry {
            child,
            addr,
            log_path,
            dir,
        };
        let up = wait_for(Duration::from_secs(10), "docker-registry listening", || {
            if let Some(status) = r.child.try_wait()? {
                bail!("docker-registry exited: {status}");
            }
            Ok(std::net::TcpStream::connect(addr).ok().map(|_| ()))
        });
        if let Err(e) = up {
            bail!("{e}; registry log:\n{}", r.log());
        }
        Ok(r)
    }

    /// `host:port`, as a reference names it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for DistributionRegistry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("registry log:\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny web server for lab tests, bound to `ip` (the lab's root address is reachable from
/// every host of the lab), serving what [`WebServer::put`] gave it by path (a query is
/// ignored); 404 for anything else. Every answer has the same Last-Modified. Its thread ends
/// with the test process.
pub struct WebServer {
    pub addr: std::net::SocketAddr,
    files: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>,
}

/// 2023-11-14T22:13:20Z.
pub const LAST_MODIFIED: (&str, u64) = ("Tue, 14 Nov 2023 22:13:20 GMT", 1_700_000_000);

impl WebServer {
    pub fn start(ip: std::net::Ipv4Addr) -> anyhow::Result<WebServer> {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?;
        let files: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>> =
            Default::default();
        let served = files.clone();
        // Ends with the test process.
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req);
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let path = path.split('?').next().unwrap_or(path).to_string();
                let body = served.lock().unwrap().get(&path).cloned();
                let head = match &body {
                    Some(b) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: {}\r\n\
                         Connection: close\r\n\r\n",
                        b.len(),
                        LAST_MODIFIED.0
                    ),
                    None => {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_string()
                    }
                };
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(body.as_deref().unwrap_or_default());
            }
        });
        Ok(WebServer { addr, files })
    }

    pub fn put(&self, path: &str, body: &[u8]) {
        self.files
            .lock()
            .unwrap()
            .insert(path.into(), body.to_vec());
    }
}

/// A TLS client connection to `addr` whose server certificate must name `server_name` under
/// the cluster CA `ca_pem`, presenting `who` (certificate and key, PEM) if given; connecting
/// waits at most 5 s, reads and writes `io`. For tests that speak HTTPS to a listener by hand.
pub fn tls_connect(
    addr: std::net::SocketAddr,
    server_name: &str,
    ca_pem: &str,
    who: Option<(&str, &str)>,
    io: Duration,
) -> anyhow::Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let cfg = match who {
        Some((cert, key)) => rudder_pki::ca::client_config(ca_pem, cert, key)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let ca = rudder_pki::ca::CaCert::from_pem(ca_pem)?;
            roots.add(rustls::pki_types::CertificateDer::from(ca.der().to_vec()))?;
            rustls::ClientConfig::builder_with_provider(rudder_pki::ca::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name)?;
    let tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(io))?;
    tcp.set_write_timeout(Some(io))?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

//! The controller group: three (or `n`) real `rudder-controller` processes on loopback, the
//! first making the cluster and the others joining it with the manager token, as the lab
//! (`rudder_lab`) starts them, but without network namespaces (every controller gets its own
//! ports on 127.0.0.1). Processes are ours: they are stopped by their pid (SIGKILL) when the
//! group is dropped, and each one's output goes to `<dir>/c<i>.log`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// The environment variable the controllers read their join token from.
const TOKEN_ENV: &str = "RUDDER_JOIN_TOKEN";
/// How long a controller may take to listen.
const READY: Duration = Duration::from_secs(60);

/// One controller process.
pub struct Member {
    /// Its raft id (1-based).
    pub raft_id: u64,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// Its output.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `http://addr` (agents and rctl switch to https with certificates).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the process (SIGKILL, by its pid) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Resident memory of the process in bytes (`/proc/<pid>/status`), if it runs.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// CPU time the process has used since it started (user and system, `/proc/<pid>/stat`),
    /// if it runs: what a change costs the leader, apart from how the run was paced.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        cpu_seconds_of(&stat, clock_ticks())
    }

    /// Bytes of files under its data dir, and of those named like raft logs and snapshots.
    pub fn disk(&self) -> DiskUse {
        let mut d = DiskUse::default();
        walk(&self.data_dir, &mut d);
        d
    }
}

/// Clock ticks per second of `/proc/<pid>/stat`'s times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User plus system time, in seconds, of one `/proc/<pid>/stat` line (fields 14 and 15,
/// counted after the command name, which may hold spaces and parentheses).
fn cpu_seconds_of(stat: &str, ticks: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks)
}

#[cfg(test)]
mod cpu_tests {
    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "4242 (rudder (c) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0";
        assert_eq!(super::cpu_seconds_of(stat, 100.0), Some(3.0));
        assert_eq!(super::cpu_seconds_of("4242 (x) S 1", 100.0), None);
        assert_eq!(super::cpu_seconds_of("no parenthesis", 100.0), None);
    }
}

/// Bytes a controller keeps on disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskUse {
    /// Everything under the data dir.
    pub total: u64,
    /// The raft log database (`raft.redb`).
    pub raft_log: u64,
    /// Files whose name says snapshot.
    pub snapshots: u64,
}

fn walk(dir: &Path, d: &mut DiskUse) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            walk(&e.path(), d);
        } else {
            let name = e.file_name().to_string_lossy().to_string();
            d.total += m.len();
            if name.starts_with("raft") {
                d.raft_log += m.len();
            }
            if name.contains("snap") {
                d.snapshots += m.len();
            }
        }
    }
}

/// The running group and what the first controller handed out.
pub struct Group {
    /// The members, by raft id - 1.
    pub members: Vec<Member>,
    /// Token hosts join with.
    pub worker_token: String,
    /// Token controllers join with (a member added later needs it).
    manager_token: String,
    /// The controller binary and the run's directory, for members added later.
    bin: PathBuf,
    dir: PathBuf,
    /// The admin credentials (ca.pem, admin.pem, admin-key.pem).
    pub admin_dir: PathBuf,
    /// More flags every controller gets, members added later included.
    args: Vec<String>,
}

/// A free port on 127.0.0.1 (bound and released: good enough on a machine we share only
/// with ourselves for this run's ports).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(addr: SocketAddr, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY;
    loop {
        if let Some(s) = child.try_wait()? {
            bail!(
                "fleetsim: the controller at {addr} exited ({s}); see {}",
                log.display()
            );
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "fleetsim: the controller at {addr} did not listen within {READY:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_file(path: &Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + READY;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return Ok(s.trim().to_string());
            }
        }
        if Instant::now() > deadline {
            bail!("fleetsim: {} was not written in time", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How to start one more controller process.
struct Spawn<'a> {
    bin: &'a Path,
    dir: &'a Path,
    raft_id: u64,
    rust_log: &'a str,
    /// A member to join through, and the manager token (none for the first controller).
    join: Option<(SocketAddr, &'a str)>,
    /// More flags for every controller (`--election-timeout-ms`).
    args: &'a [String],
}

impl Spawn<'_> {
    /// Starts the process; returns its member record once its port is bound (a process that
    /// does not bind in time is killed).
    fn start(self) -> anyhow::Result<Member> {
        let data_dir = self.dir.join(format!("c{}", self.raft_id));
        std::fs::create_dir_all(&data_dir)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log = self.dir.join(format!("c{}.log", self.raft_id));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = Command::new(self.bin);
        cmd.arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--registry-listen")
            .arg(format!("127.0.0.1:{}", free_port()?))
            .arg("--metrics-listen")
            .arg("off")
            .arg("--raft-id")
            .arg(self.raft_id.to_string())
            .arg("--node-name")
            .arg(format!("c{}", self.raft_id))
            .args(self.args)
            .env("RUST_LOG", self.rust_log)
            .env_remove(TOKEN_ENV)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if let Some((via, token)) = self.join {
            cmd.arg("--join").arg(via.to_string()).env(TOKEN_ENV, token);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let ready = wait_listening(addr, &mut child, &log);
        let mut member = Member {
            raft_id: self.raft_id,
            addr,
            data_dir,
            log,
            child: Some(child),
        };
        if let Err(e) = ready {
            member.kill();
            return Err(e);
        }
        Ok(member)
    }
}

impl Group {
    /// Starts `n` controllers from `bin` with data under `dir`; `rust_log` is their log filter.
    pub fn start(bin: &Path, dir: &Path, n: u64, rust_log: &str) -> anyhow::Result<Group> {
        Self::start_with(bin, dir, n, rust_log, Vec::new())
    }

    /// [`Group::start`], every controller started with the flags `args` too.
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        n: u64,
        rust_log: &str,
        args: Vec<String>,
    ) -> anyhow::Result<Group> {
        let mut group = Group {
            args,
            members: Vec::new(),
            worker_token: String::new(),
            manager_token: String::new(),
            admin_dir: dir.join("c1").join("admin"),
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
        };
        for raft_id in 1..=n {
            let join = group
                .members
                .first()
                .map(|m| (m.addr, group.manager_token.as_str()));
            let member = Spawn {
                bin,
                dir,
                raft_id,
                rust_log,
                join,
                args: &group.args,
            }
            .start()?;
            group.members.push(member);
            if raft_id == 1 {
                let admin = &group.admin_dir;
                group.worker_token = wait_file(&admin.join("worker.token"))?;
                group.manager_token = wait_file(&admin.join("manager.token"))?;
                for f in ["worker.token", "manager.token"] {
                    let _ = std::fs::remove_file(admin.join(f));
                }
            }
        }
        Ok(group)
    }

    /// Starts one more controller (the next raft id) that joins through `via` with the
    /// manager token, logging with `rust_log`; returns its raft id once it listens.
    pub fn add(&mut self, via: SocketAddr, rust_log: &str) -> anyhow::Result<u64> {
        let raft_id = self.members.iter().map(|m| m.raft_id).max().unwrap_or(0) + 1;
        let member = Spawn {
            bin: &self.bin,
            dir: &self.dir,
            raft_id,
            rust_log,
            join: Some((via, &self.manager_token)),
            args: &self.args,
        }
        .start()?;
        self.members.push(member);
        Ok(raft_id)
    }

    /// Every member's URL.
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(Member::url).collect()
    }

    /// The member with raft id `id`.
    pub fn member_mut(&mut self, id: u64) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.raft_id == id)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}

//! Engine footprint and latency benchmarks on a one-host lab (run as root, after
//! `cargo build --release --workspace --bins`: `cargo bench -p rudder-tests --bench engine`).
//!
//! 1. Memory of one idle shim (target <= 2 MiB RSS) and of the idle agent (target <= 30 MiB
//!    RSS), with 0, 5 and 50 idle `sleep` containers, ~5 s after they all run: VmRSS from
//!    /proc/PID/status, and Pss and private (USS) from /proc/PID/smaps_rollup, since a shim is
//!    a re-exec of the agent binary and shares its text pages with the agent and other shims.
//! 2. `rctl apply` of 50 replicas on one host -> all 50 `running`, 3 rounds per network mode,
//!    host and bridge alternating (the service is removed between rounds and its containers
//!    waited out).
//! 3. Exec round trip: `rctl exec TASK -- true` as a process, against raw `runc exec`, and in
//!    process (the same `rudder_ctl` code, so without rctl's process start) split into the TLS
//!    connect and the exec, with a unary RPC on an open connection for scale.
//!
//! 4. `rctl run --rm busybox true` end to end in host and bridge mode, beside `podman run`,
//!    `docker run` (where a daemon runs) and raw `runc run`/`crun run` of a prepared bundle.
//!
//! `RUDDER_BENCH_ONLY=memory|start|exec|run` runs one part (memory with 50 containers belongs to
//! `start`); `RUDDER_LAB_LOGS=DIR` keeps the lab's logs; `RUDDER_LAB_RUNTIME=auto|runc|crun`
//! picks the agent's OCI runtime (auto: crun where the host allows it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rudder_tests::{bin, busybox_rootfs, lab_with_busybox, wait_for, LabGuard};

const SHIM_TARGET_KIB: u64 = 2 * 1024;
const AGENT_TARGET_KIB: u64 = 30 * 1024;
const SETTLE: Duration = Duration::from_secs(5);
const START_ROUNDS: usize = 3;
/// Pause after a round's containers are gone, in both network modes, so each round starts on
/// a settled host: a bridge host recycles the namespaces of the round before (scrubs them
/// and puts them back in its pool) for a few hundred milliseconds after they are gone.
/// Measured on 2026-12-07 it changed little (bridge/host 1.21x with it, 1.25x without). The
/// bridge's extra was ext4's check of each new inode against those deleted in the last minute:
/// with the agent's network files and namespaces on its run dir's tmpfs, and the modes
/// alternating, bridge/host measured 1.01x.
/// `RUDDER_BENCH_ROUND_GAP_MS=0` measures without it.
const ROUND_GAP: Duration = Duration::from_secs(2);
const START_REPLICAS: usize = 50;
const EXEC_RUNS: usize = 30;

// ---------------------------------------------------------------------------------------------
// Statistics and formatting

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (median, p90, min) of `v`.
fn stats(v: &[Duration]) -> (Duration, Duration, Duration) {
    let mut s = v.to_vec();
    s.sort();
    let n = s.len();
    (s[n / 2], s[(n * 9 / 10).min(n - 1)], s[0])
}

fn mib(kib: u64) -> String {
    format!("{:.2}", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// Memory

/// One process's memory, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss: u64,
    /// VmRSS split: anonymous (heap, stacks) and file-backed (binary and libraries).
    anon: u64,
    file: u64,
    pss: u64,
    /// Private_Clean + Private_Dirty: what the process alone costs (USS).
    private: u64,
    threads: u64,
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn mem(pid: i32) -> anyhow::Result<Mem> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("/proc/{pid}/smaps_rollup"))?;
    Ok(Mem {
        rss: kib_field(&status, "VmRSS").context("VmRSS")?,
        anon: kib_field(&status, "RssAnon").unwrap_or(0),
        file: kib_field(&status, "RssFile").unwrap_or(0),
        threads: kib_field(&status, "Threads").unwrap_or(0),
        pss: kib_field(&rollup, "Pss").context("Pss")?,
        private: kib_field(&rollup, "Private_Clean").unwrap_or(0)
            + kib_field(&rollup, "Private_Dirty").unwrap_or(0),
    })
}

/// Resident KiB of `pid` by mapping (path, or `[heap]`, `[stack]`, `[anon]`), largest first.
fn rss_by_mapping(pid: i32) -> anyhow::Result<Vec<(String, u64)>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    let mut cur = String::new();
    for l in smaps.lines() {
        let mut w = l.split_whitespace();
        let first = w.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: range perms offset dev inode [path].
            let path = w.nth(4).unwrap_or("[anon]");
            cur = Path::new(path)
                .file_name()
                .filter(|_| path.starts_with('/'))
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.to_string());
        } else if first == "Rss:" {
            *by.entry(cur.clone()).or_default() +=
                w.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let mut v: Vec<(String, u64)> = by.into_iter().filter(|(_, k)| *k > 0).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    Ok(v)
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort();
    v[v.len() / 2]
}

struct MemRow {
    what: String,
    n: usize,
    /// Median, and max for RSS.
    rss: u64,
    rss_max: u64,
    anon: u64,
    file: u64,
    pss: u64,
    private: u64,
    threads: u64,
    target: Option<u64>,
}

impl MemRow {
    fn of(what: String, ms: &[Mem], target: Option<u64>) -> MemRow {
        MemRow {
            what,
            n: ms.len(),
            rss: median_u64(ms.iter().map(|m| m.rss).collect()),
            rss_max: ms.iter().map(|m| m.rss).max().unwrap_or(0),
            anon: median_u64(ms.iter().map(|m| m.anon).collect()),
            file: median_u64(ms.iter().map(|m| m.file).collect()),
            pss: median_u64(ms.iter().map(|m| m.pss).collect()),
            private: median_u64(ms.iter().map(|m| m.private).collect()),
            threads: median_u64(ms.iter().map(|m| m.threads).collect()),
            target,
        }
    }
}

fn print_mem(rows: &[MemRow]) {
    println!();
    println!("== memory (MiB; medians over the n processes, RSS max too) ==");
    println!(
        "{:<38} {:>3} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6}  verdict",
        "process", "n", "RSS", "RSS max", "anon", "file", "Pss", "USS", "threads", "target"
    );
    for r in rows {
        let verdict = match r.target {
            Some(t) if r.rss_max <= t => "ok".to_string(),
            Some(t) => format!("MISSED by {} MiB", mib(r.rss_max - t)),
            None => "-".to_string(),
        };
        println!(
            "{:<38} {:>3} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6}  {}",
            r.what,
            r.n,
            mib(r.rss),
            mib(r.rss_max),
            mib(r.anon),
            mib(r.file),
            mib(r.pss),
            mib(r.private),
            r.threads,
            r.target.map(mib).unwrap_or_else(|| "-".into()),
            verdict
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Lab helpers

/// What the bench needs of one task (from the controller's task list).
#[derive(Debug, Clone)]
struct TaskRow {
    id: String,
    state: String,
    desired: String,
    timestamp_ms: u64,
}

/// A controller connection kept open for polling (cheaper and steadier than `rctl ps` each
/// 50 ms, which would compete with the agent for the two cores).
struct Ctl {
    rt: tokio::runtime::Runtime,
    ctx: rudder_ctl::context::Context,
}

impl Ctl {
    fn new(lab: &LabGuard) -> anyhow::Result<Ctl> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ctx = rudder_ctl::context::load(&lab.lab.context_path)?;
        Ok(Ctl { rt, ctx })
    }

    /// Tasks of `service` (all services: `""`), over a connection made for the call.
    fn tasks(&self, service: &str) -> anyhow::Result<Vec<TaskRow>> {
        self.rt.block_on(async {
            let mut c = rudder_ctl::connect(&self.ctx).await?;
            let ts = rudder_ctl::tasks(&mut c, service).await?;
            Ok(ts
                .into_iter()
                .map(|t| TaskRow {
                    id: t.id,
                    state: rudder_ctl::convert::task_state_name(t.state),
                    desired: rudder_ctl::convert::task_state_name(t.desired_state),
                    timestamp_ms: t.timestamp_ms,
                })
                .collect())
        })
    }
}

fn running(ts: &[TaskRow]) -> Vec<&TaskRow> {
    ts.iter()
        .filter(|t| t.state == "running" && t.desired == "running")
        .collect()
}

fn manifest(service: &str, replicas: usize) -> String {
    manifest_in(service, replicas, "host")
}

/// `replicas` idle busybox containers in network mode `mode` (`host` or `bridge`).
fn manifest_in(service: &str, replicas: usize, mode: &str) -> String {
    format!(
        "kind: Service\nname: {service}\nimage: busybox:latest\nstop_grace_period: 1\n\
         network_mode: {mode}\ncommand: [\"/bin/sleep\", \"1000000\"]\nreplicas: {replicas}\n"
    )
}

fn wait_running(ctl: &Ctl, service: &str, n: usize) -> anyhow::Result<Vec<TaskRow>> {
    wait_for(
        Duration::from_secs(300),
        &format!("{n} tasks of {service} running"),
        || {
            let ts = ctl.tasks(service)?;
            let r: Vec<TaskRow> = running(&ts).into_iter().cloned().collect();
            Ok((r.len() == n).then_some(r))
        },
    )
}

/// Containers the host's runc still knows.
fn runc_containers(lab: &LabGuard) -> anyhow::Result<usize> {
    let out = rudder_tests::runtime_cli(&lab.lab.hosts[0].runtime_root)
        .list()
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

/// `rctl rm SERVICE`, then waits until the controller lists no task and runc no container.
fn remove(lab: &LabGuard, ctl: &Ctl, service: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    lab.rctl(&["rm", service])?;
    wait_for(
        Duration::from_secs(180),
        "tasks and containers gone",
        || Ok((ctl.tasks("")?.is_empty() && runc_containers(lab)? == 0).then_some(())),
    )?;
    Ok(t.elapsed())
}

fn shim_pid(data_dir: &Path, task: &str) -> anyhow::Result<i32> {
    let p = data_dir.join("containers").join(task).join("shim.pid");
    std::fs::read_to_string(&p)
        .with_context(|| p.display().to_string())?
        .trim()
        .parse()
        .with_context(|| format!("pid in {}", p.display()))
}

/// Memory of the agent and of the shims of `tasks`.
fn measure(lab: &LabGuard, tasks: &[TaskRow], label: &str) -> anyhow::Result<Vec<MemRow>> {
    let host = &lab.lab.hosts[0];
    let agent = host.agent_pid.context("no agent pid recorded")?;
    let mut rows = vec![MemRow::of(
        format!("agent, {label}"),
        &[mem(agent)?],
        Some(AGENT_TARGET_KIB),
    )];
    if !tasks.is_empty() {
        let shims = tasks
            .iter()
            .map(|t| mem(shim_pid(&host.data_dir, &t.id)?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let one = shim_pid(&host.data_dir, &tasks[0].id)?;
        let parts: Vec<String> = rss_by_mapping(one)?
            .iter()
            .take(6)
            .map(|(m, k)| format!("{m} {}", mib(*k)))
            .collect();
        println!(
            "one shim's RSS by mapping ({label}, MiB): {}",
            parts.join(", ")
        );
        rows.push(MemRow::of(
            format!("shim (each), {label}"),
            &shims,
            Some(SHIM_TARGET_KIB),
        ));
    }
    if let Some(c) = host.controller_pid {
        rows.push(MemRow::of(
            format!("controller (info), {label}"),
            &[mem(c)?],
            None,
        ));
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Parts

/// The modes of the start part, in the order round `round` (from 1) runs them: host first in
/// odd rounds, bridge first in even ones. Each round leaves the filesystem and the kernel a
/// little different (inodes just deleted, namespaces being torn down), so running all of one
/// mode before the other charged the second mode with the first one's aftermath; alternating
/// gives both the same history.
fn start_order(round: usize) -> [&'static str; 2] {
    match round % 2 {
        1 => ["host", "bridge"],
        _ => ["bridge", "host"],
    }
}

/// One round: 50 containers in `mode` -> (apply to all running as polled, apply to the last
/// task's running timestamp as the controller recorded it); then removes them.
fn start_round(
    lab: &LabGuard,
    ctl: &Ctl,
    dir: &Path,
    mode: &str,
    round: usize,
    mem_rows: &mut Vec<MemRow>,
) -> anyhow::Result<(Duration, Duration)> {
    let t0_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let t = Instant::now();
    lab.apply(
        dir,
        "fifty.yaml",
        &manifest_in("fifty", START_REPLICAS, mode),
    )?;
    let applied = t.elapsed();
    let ts = wait_running(ctl, "fifty", START_REPLICAS)?;
    let polled = t.elapsed();
    // The controller's own record of the last task turning running (same clock: same host).
    let last = ts.iter().map(|t| t.timestamp_ms).max().unwrap_or(0);
    let recorded = Duration::from_millis(last.saturating_sub(t0_wall));
    println!(
        "start {START_REPLICAS} ({mode}), round {round}: apply returned {:.0} ms; all running \
         seen {:.2} s (last task's running timestamp at {:.2} s)",
        ms(applied),
        polled.as_secs_f64(),
        recorded.as_secs_f64()
    );
    if round == START_ROUNDS && mode == "host" {
        std::thread::sleep(SETTLE);
        mem_rows.extend(measure(lab, &ts, "50 idle containers")?);
    }
    let gone = remove(lab, ctl, "fifty")?;
    println!(
        "  rm fifty -> all 50 containers gone: {:.2} s",
        gone.as_secs_f64()
    );
    std::thread::sleep(round_gap());
    Ok((polled, recorded))
}

/// Prints one mode's rounds; returns the median of "apply -> all running (polled)".
fn start_report(mode: &str, rounds: &[(Duration, Duration)]) -> Duration {
    let mut seen: Vec<Duration> = rounds.iter().map(|r| r.0).collect();
    let mut rec: Vec<Duration> = rounds.iter().map(|r| r.1).collect();
    seen.sort();
    rec.sort();
    println!();
    println!(
        "== start {START_REPLICAS} containers on 1 host (2 cores), network {mode} \
         (rounds {} ms apart, modes alternating) ==",
        round_gap().as_millis()
    );
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>8}",
        "", "round 1", "round 2", "round 3", "median"
    );
    let line = |name: &str, v: Vec<Duration>, m: Duration| {
        let cells: Vec<String> = v
            .iter()
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .collect();
        println!(
            "{:<44} {:>8} {:>8} {:>8} {:>8}",
            name,
            cells[0],
            cells[1],
            cells[2],
            format!("{:.2} s", m.as_secs_f64())
        );
    };
    line(
        "apply -> all running (polled, 50 ms)",
        rounds.iter().map(|r| r.0).collect(),
        seen[seen.len() / 2],
    );
    line(
        "apply -> last running timestamp (controller)",
        rounds.iter().map(|r| r.1).collect(),
        rec[rec.len() / 2],
    );
    println!(
        "per container (median, polled): {:.0} ms",
        ms(seen[seen.len() / 2]) / START_REPLICAS as f64
    );
    seen[seen.len() / 2]
}

fn round_gap() -> Duration {
    std::env::var("RUDDER_BENCH_ROUND_GAP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(ROUND_GAP, Duration::from_millis)
}

fn timed(mut cmd: Command) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let st = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    let d = t.elapsed();
    if !st.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&st.stderr).trim()
        );
    }
    Ok(d)
}

fn exec_bench(lab: &LabGuard, ctl: &Ctl, task: &str) -> anyhow::Result<()> {
    let host = &lab.lab.hosts[0];
    let runtime = rudder_tests::runtime_cli(&host.runtime_root);
    let rctl = bin("rctl");
    let context = lab.lab.context_path.clone();
    let rctl_cmd = |args: &[&str]| {
        let mut c = Command::new(&rctl);
        c.arg("--context").arg(&context).args(args);
        c
    };
    let runc_exec = || runtime.command(["exec", task, "true"]);
    let cmd = vec!["true".to_string()];
    let in_process_exec = || -> anyhow::Result<Duration> {
        let t = Instant::now();
        let code = ctl.rt.block_on(rudder_ctl::cmd::exec::run(
            &ctl.ctx,
            task,
            &cmd,
            Default::default(),
        ))?;
        let d = t.elapsed();
        anyhow::ensure!(code == 0, "exec exit code {code}");
        Ok(d)
    };
    let connect = || -> anyhow::Result<Duration> {
        let t = Instant::now();
        let c = ctl.rt.block_on(rudder_ctl::connect(&ctl.ctx))?;
        let d = t.elapsed();
        drop(c);
        Ok(d)
    };
    let mut client = ctl.rt.block_on(rudder_ctl::connect(&ctl.ctx))?;
    let mut unary = || -> anyhow::Result<Duration> {
        let t = Instant::now();
        ctl.rt.block_on(rudder_ctl::tasks(&mut client, "idle"))?;
        Ok(t.elapsed())
    };

    // Warm-up: page cache, the controller's and agent's first-use paths.
    for _ in 0..3 {
        timed(rctl_cmd(&["exec", task, "--", "true"]))?;
        timed(runc_exec())?;
        in_process_exec()?;
    }
    // Interleaved, so background load (the 5 idle containers' shims, raft ticks) hits all alike.
    let names = [
        "rctl exec TASK -- true (process)",
        "runc --root R exec ID true (process)",
        "rctl --version (process start only)",
        "rctl ps idle -o json (process, unary)",
        "in-process: connect + Exec (rctl's code)",
        "in-process: connect (TCP + mTLS) only",
        "in-process: unary ListTasks, open conn",
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    for _ in 0..EXEC_RUNS {
        samples[0].push(timed(rctl_cmd(&["exec", task, "--", "true"]))?);
        samples[1].push(timed(runc_exec())?);
        let mut v = Command::new(&rctl);
        v.arg("--version");
        samples[2].push(timed(v)?);
        samples[3].push(timed(rctl_cmd(&["ps", "idle", "-o", "json"]))?);
        samples[4].push(in_process_exec()?);
        samples[5].push(connect()?);
        samples[6].push(unary()?);
    }
    println!();
    println!("== exec round trip, n={EXEC_RUNS} each, interleaved (ms) ==");
    println!("{:<42} {:>8} {:>8} {:>8}", "", "median", "p90", "min");
    let mut med = Vec::new();
    for (name, v) in names.iter().zip(&samples) {
        let (m, p, lo) = stats(v);
        med.push(m);
        println!("{:<42} {:>8.1} {:>8.1} {:>8.1}", name, ms(m), ms(p), ms(lo));
    }
    // rctl's own share, measured directly (subtracting two noisy exec medians is not stable):
    // its process start and its connect. The rest of `rctl exec` is the Exec call itself.
    let own = med[2] + med[5];
    let exec_call = med[0].saturating_sub(own);
    println!(
        "split of `rctl exec` (medians): rctl's own process start {:.1} + mTLS connect {:.1} = \
         {:.1} ms; the Exec call {:.1} ms (in process, connect excluded: {:.1} ms), of which \
         runc exec {:.1} ms and relay (controller -> agent dial, streams, runc spawn) ~{:.1} ms",
        ms(med[2]),
        ms(med[5]),
        ms(own),
        ms(exec_call),
        ms(med[4].saturating_sub(med[5])),
        ms(med[1]),
        ms(exec_call) - ms(med[1]),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One-off container end to end: `rctl run --rm IMAGE true` beside podman, docker and the raw
// runtimes, in one sitting (the anchors: podman 110 ms, docker 138 ms, runc 24 ms,
// crun 9 ms on this machine).

const RUN_ROUNDS: usize = 20;
const RUN_WARMUP: usize = 2;

/// `rounds` timings of `make()`, after `RUN_WARMUP` untimed runs; every run must exit 0.
fn sample(rounds: usize, mut make: impl FnMut() -> Command) -> anyhow::Result<Vec<Duration>> {
    let mut v = Vec::with_capacity(rounds);
    for i in 0..rounds + RUN_WARMUP {
        let d = timed(make())?;
        if i >= RUN_WARMUP {
            v.push(d);
        }
    }
    Ok(v)
}

/// An OCI bundle at `dir` whose process is `/bin/true` from busybox, made with the runtime's
/// own `spec` (no terminal, no network namespace so the runtime does not wait on one).
fn raw_bundle(dir: &Path, runtime: &str, rootfs_tar: &Path) -> anyhow::Result<()> {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    let st = Command::new("tar")
        .arg("-xf")
        .arg(rootfs_tar)
        .arg("-C")
        .arg(&rootfs)
        .status()?;
    if !st.success() {
        bail!("untar busybox rootfs");
    }
    let st = Command::new(runtime)
        .args(["spec", "--bundle"])
        .arg(dir)
        .status()?;
    if !st.success() {
        bail!("{runtime} spec failed");
    }
    let path = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/true"]);
    spec["root"]["readonly"] = true.into();
    std::fs::write(&path, serde_json::to_vec(&spec)?)?;
    Ok(())
}

fn run_bench(lab: &LabGuard, dir: &Path) -> anyhow::Result<()> {
    let rctl = bin("rctl");
    // The runtime the lab's agent picked (`RUDDER_LAB_RUNTIME`, default auto).
    let runtime = rudder_tests::runtime_cli(Path::new("/")).binary;
    let mut rows: Vec<(String, Vec<Duration>, &str)> = Vec::new();
    for mode in ["host", "bridge"] {
        let v = sample(RUN_ROUNDS, || {
            let mut c = Command::new(&rctl);
            c.arg("--context").arg(&lab.lab.context_path).args([
                "run",
                "--rm",
                "--network",
                mode,
                "busybox:latest",
                "true",
            ]);
            c
        })?;
        let target = if mode == "host" {
            "<= 60 ms"
        } else {
            "<= 70 ms"
        };
        rows.push((
            format!("rctl run --rm --network {mode} busybox true ({runtime})"),
            v,
            target,
        ));
    }

    let tar = dir.join("busybox-rootfs.tar");
    if !tar.exists() {
        busybox_rootfs(&tar)?;
    }
    // Raw runtimes on a prepared bundle: the floor under any engine.
    for runtime in ["runc", "crun"] {
        let Ok(path) = which(runtime) else {
            println!("{runtime}: not installed, skipped");
            continue;
        };
        let bundle = dir.join(format!("bundle-{runtime}"));
        raw_bundle(&bundle, &path, &tar)?;
        // As the agent runs it: crun on a hybrid cgroup host without the unified hierarchy.
        let cli = rudder_agent::runtime::pick_runtime(runtime, dir.join(format!("root-{runtime}")));
        let mut n = 0u32;
        let mut make = || {
            n += 1;
            cli.run_foreground(&format!("bench-{runtime}-{n}"), &bundle)
        };
        match timed(make()) {
            Ok(_) => rows.push((
                format!("{runtime} run (prepared bundle, no engine)"),
                sample(RUN_ROUNDS, make)?,
                "",
            )),
            Err(e) => println!("{runtime} run: does not work on this host: {e}"),
        }
    }
    // The engines users compare with, on the same image, with no network (their fastest).
    for engine in ["podman", "docker"] {
        let Ok(path) = which(engine) else {
            println!("{engine}: not installed, skipped");
            continue;
        };
        let image = format!("localhost/rudder-bench-busybox:{}", std::process::id());
        let st = Command::new(&path)
            .arg("import")
            .arg(&tar)
            .arg(&image)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        if !st.status.success() {
            println!(
                "{engine}: cannot import an image here, skipped: {}",
                String::from_utf8_lossy(&st.stderr).trim()
            );
            continue;
        }
        let make = || {
            let mut c = Command::new(&path);
            c.args(["run", "--rm", "--network", "none"]);
            if engine == "podman" {
                // podman's default crun fails on this host's RLIMIT_NOFILE, and runc on its
                // default RLIMIT_NPROC: runc, with explicit limits.
                c.args([
                    "--runtime",
                    "runc",
                    "--ulimit",
                    "nofile=1024:1024",
                    "--ulimit",
                    "nproc=4096:4096",
                ]);
            }
            c.args([image.as_str(), "true"]);
            c
        };
        let res = sample(RUN_ROUNDS, make);
        let _ = Command::new(&path)
            .args(["rmi", "-f", &image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match res {
            Ok(v) => rows.push((
                format!("{engine} run --rm --network none busybox true"),
                v,
                "",
            )),
            Err(e) => println!("{engine}: failed here, skipped: {e}"),
        }
    }

    println!();
    println!(
        "== one-off container end to end ({RUN_ROUNDS} runs each, after {RUN_WARMUP} warm-up) =="
    );
    println!(
        "{:<52} {:>9} {:>9} {:>9}  target",
        "", "median", "p90", "min"
    );
    for (name, v, target) in &rows {
        let (med, p90, min) = stats(v);
        println!(
            "{:<52} {:>6.1} ms {:>6.1} ms {:>6.1} ms  {}",
            name,
            ms(med),
            ms(p90),
            ms(min),
            target
        );
    }
    let median_of = |prefix: &str| {
        rows.iter()
            .find(|r| r.0.starts_with(prefix))
            .map(|r| stats(&r.1).0)
    };
    if let (Some(r), Some(p)) = (
        median_of("rctl run --rm --network host"),
        median_of("podman"),
    ) {
        println!(
            "rudder (host) / podman: {:.2}x",
            r.as_secs_f64() / p.as_secs_f64()
        );
    }
    if let (Some(r), Some(p)) = (
        median_of("rctl run --rm --network bridge"),
        median_of("podman"),
    ) {
        println!(
            "rudder (bridge) / podman: {:.2}x",
            r.as_secs_f64() / p.as_secs_f64()
        );
    }
    Ok(())
}

/// The path of `prog` on $PATH.
fn which(prog: &str) -> anyhow::Result<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .output()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || p.is_empty() {
        bail!("{prog} not found");
    }
    Ok(p)
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` would run us with no flag: skip then.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let only = std::env::var("RUDDER_BENCH_ONLY").unwrap_or_default();
    let part = |p: &str| only.is_empty() || only == p;

    let (lab, tmp) = lab_with_busybox("en", 1)?;
    let ctl = Ctl::new(&lab)?;
    let dir: PathBuf = tmp.path().to_path_buf();
    let mut mem_rows = Vec::new();
    println!(
        "lab {} (1 host), binaries from {}, {} cpus",
        lab.lab.name,
        rudder_tests::bin_dir().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    if part("memory") || part("exec") {
        if part("memory") {
            std::thread::sleep(SETTLE);
            mem_rows.extend(measure(&lab, &[], "no containers")?);
        }
        lab.apply(&dir, "idle.yaml", &manifest("idle", 5))?;
        let ts = wait_running(&ctl, "idle", 5)?;
        std::thread::sleep(SETTLE);
        if part("memory") {
            mem_rows.extend(measure(&lab, &ts, "5 idle containers")?);
        }
        if part("exec") {
            exec_bench(&lab, &ctl, &ts[0].id)?;
        }
        remove(&lab, &ctl, "idle")?;
    }
    if part("start") {
        let (mut host, mut bridge) = (Vec::new(), Vec::new());
        for round in 1..=START_ROUNDS {
            for mode in start_order(round) {
                let r = start_round(&lab, &ctl, &dir, mode, round, &mut mem_rows)?;
                match mode {
                    "host" => host.push(r),
                    _ => bridge.push(r),
                }
            }
        }
        let host = start_report("host", &host);
        let bridge = start_report("bridge", &bridge);
        println!(
            "\n50 to running, medians: host {:.2} s, bridge {:.2} s: bridge/host {:.2}x \
             (target <= 1.10x)",
            host.as_secs_f64(),
            bridge.as_secs_f64(),
            bridge.as_secs_f64() / host.as_secs_f64()
        );
    }
    if part("run") {
        run_bench(&lab, &dir)?;
    }
    if !mem_rows.is_empty() {
        print_mem(&mem_rows);
        println!(
            "(RSS counts the shared binary pages in every process; Pss splits them among the \
             processes mapping them; USS = private pages only)"
        );
    }
    Ok(())
}

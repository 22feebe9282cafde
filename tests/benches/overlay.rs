//! Overlay benchmarks on a two-host lab (run as root, after `cargo build --release --workspace
//! --bins`: `cargo bench -p rudder-tests --bench overlay`; needs /usr/bin/iperf3).
//!
//! 1. TCP throughput between containers on h1 and h2 with iperf3 (5 s runs), over an encrypted
//!    network (WireGuard: Rudder's userspace device, `agent/src/wg/device.rs`;
//!    `RUDDER_WG_OFFLOAD=0` in the environment measures it without offloads) and an unencrypted one (VXLAN): to the
//!    server task's address with one stream (3 runs), two and four streams (`-P 2`, `-P 4`),
//!    and to the service's virtual IP; the underlay (h1's namespace to h2's, no overlay) the
//!    same way. Then request/response latency (64-byte TCP ping-pong from h1's container to an
//!    echo server in h2's, both threads of this bench inside the containers' namespaces),
//!    idle and under an iperf3 load, on the same three paths. Last, one side-by-side table:
//!    medians, the encrypted/VXLAN ratios, and CPU seconds per GB (whole machine, and the
//!    WireGuard children's alone). The image is scripts/iperf-rootfs.sh's (busybox + iperf3
//!    and its libraries).
//! 2. How long a stopped replica of a 3-replica service stays in DNS and behind the VIP, as h1
//!    sees them: its DNS server on the network's gateway (`tasks.web`, polled every ~1 ms from
//!    h1's namespace) and its nftables `prerouting` chain (polled back to back). Once after a
//!    SIGKILL of the container's process, once after `rctl scale web=2` (graceful stop), 5
//!    rounds each.
//!
//! DNS answer latency itself is `cargo bench -p rudder-agent --bench dns`. Set
//! `RUDDER_BENCH_ONLY=throughput` (or `latency`, `removal`) to run one part; `RUDDER_LAB_LOGS=DIR` keeps
//! the lab's logs.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rudder_tests::{exec, lab_with_busybox, ns_inode, running_tasks, wait_for, LabGuard};

const ROUNDS: usize = 5;
const IPERF_SECONDS: u32 = 5;
/// How long a removal may take before a round counts as failed.
const REMOVAL_TIMEOUT: Duration = Duration::from_secs(20);

// The C library's calls this bench needs (std links it; no extra crate, so Cargo.lock stays).
extern "C" {
    fn setns(fd: i32, nstype: i32) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
}
const CLONE_NEWNET: i32 = 0x4000_0000;
const SIGKILL: i32 = 9;
/// Linux's USER_HZ, the unit of /proc/PID/stat times.
const TICKS_PER_SECOND: f64 = 100.0;

const WEB: &str = "[\"/bin/sh\", \"-c\", \"mkdir -p /www; hostname > /www/index.html; \
                   exec httpd -f -p 80 -h /www\"]";

// ---------------------------------------------------------------------------------------------
// Lab helpers

/// Addresses `name` resolves to inside the container (busybox nslookup).
fn resolve(lab: &LabGuard, task: &serde_json::Value, name: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let (_, out) = exec(lab, task, &["nslookup", name])?;
    // busybox prints the server first ("Address: 10.96.1.1:53"), then the answers.
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("Address:"))
        .filter_map(|a| a.trim().parse().ok())
        .collect())
}

fn running(lab: &LabGuard, service: &str, n: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    wait_for(
        Duration::from_secs(90),
        &format!("{n} tasks of {service} running"),
        || {
            let t = lab.tasks(service)?;
            let r: Vec<serde_json::Value> = running_tasks(&t).into_iter().cloned().collect();
            Ok((r.len() == n).then_some(r))
        },
    )
}

/// The container's own address on its (only) overlay interface.
fn task_addr(lab: &LabGuard, task: &serde_json::Value) -> anyhow::Result<Ipv4Addr> {
    let (_, out) = exec(lab, task, &["ip", "-4", "-o", "addr", "show", "eth0"])?;
    out.split_whitespace()
        .find(|w| w.contains('/'))
        .and_then(|w| w.split('/').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("address of task {}: {out}", task["id"]))
}

/// `rctl network inspect NAME`.
fn network(lab: &LabGuard, name: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(
        &lab.rctl(&["network", "inspect", name])?,
    )?)
}

/// The gateway (bridge) address of network `name` on host `hostname`: its embedded DNS server.
fn gateway(lab: &LabGuard, hostname: &str, name: &str) -> anyhow::Result<Ipv4Addr> {
    let id = network(lab, name)?["id"]
        .as_str()
        .context("network id")?
        .to_string();
    let br = rudder_agent::net::bridge_name(&id);
    let out = Command::new("ip")
        .args([
            "-n",
            &lab.host(hostname).netns,
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
        ])
        .arg(&br)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no inet on {br} in {hostname}: {text}"))
}

/// Moves the calling thread (only) into network namespace `netns` (a name in /run/netns).
/// Sockets made afterwards belong to it, and so do the processes the thread spawns.
fn enter_netns(netns: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(Path::new("/run/netns").join(netns))
        .with_context(|| format!("open netns {netns}"))?;
    // SAFETY: a plain syscall on a descriptor we own; it changes this thread's namespace only.
    let rc = unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns {netns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Busy fraction of all CPUs between two `/proc/stat` samples.
fn cpu_sample() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total, idle)
}

fn busy_between(a: (u64, u64), b: (u64, u64)) -> f64 {
    let total = b.0.saturating_sub(a.0) as f64;
    let idle = b.1.saturating_sub(a.1) as f64;
    if total == 0.0 {
        0.0
    } else {
        100.0 * (1.0 - idle / total)
    }
}

/// Pids of the lab's userspace WireGuard processes (`rudder-agent wg-userspace`), by host.
fn wg_pids(lab: &LabGuard) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let hosts: Vec<(String, Option<u64>)> = lab
        .lab
        .hosts
        .iter()
        .map(|h| (h.name.clone(), ns_inode(&format!("/run/netns/{}", h.netns))))
        .collect();
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !cmd.split(|b| *b == 0).any(|a| a == b"wg-userspace") {
            continue;
        }
        let ns = ns_inode(&format!("/proc/{pid}/ns/net"));
        if let Some((name, _)) = hosts.iter().find(|(_, i)| i.is_some() && *i == ns) {
            out.push((name.clone(), pid));
        }
    }
    out.sort();
    out
}

/// utime + stime of `pid` in clock ticks (all threads).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that ends the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

// ---------------------------------------------------------------------------------------------
// 1. Throughput

struct Iperf {
    sent_gbps: f64,
    received_gbps: f64,
    retransmits: u64,
    /// Host CPU busy over the run, % of all cores.
    cpu_busy: f64,
    /// CPU of the lab's wg-userspace processes over the run, % of one core, by host.
    wg_cpu: Vec<(String, f64)>,
    /// Machine CPU seconds (all cores busy time) per GB received.
    cpu_s_per_gb: f64,
    /// The wg-userspace processes' CPU seconds (both hosts) per GB received.
    wg_s_per_gb: f64,
}

/// One iperf3 client run: `run` executes the client command line (in a container or a host's
/// namespace) and returns its success and stdout.
fn iperf(
    lab: &LabGuard,
    run: impl FnOnce(&[&str]) -> anyhow::Result<(bool, String)>,
    server: Ipv4Addr,
    extra: &[&str],
) -> anyhow::Result<Iperf> {
    let secs = IPERF_SECONDS.to_string();
    let server = server.to_string();
    let mut cmd = vec!["timeout", "60", "iperf3", "-c", &server, "-t", &secs, "-J"];
    cmd.extend_from_slice(extra);
    let wg = wg_pids(lab);
    let wg_before: Vec<u64> = wg.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let c0 = cpu_sample();
    let t0 = Instant::now();
    let (ok, out) = run(&cmd)?;
    let wall = t0.elapsed().as_secs_f64();
    let c1 = cpu_sample();
    let wg_cpu: Vec<(String, f64)> = wg
        .iter()
        .zip(wg_before)
        .map(|((h, p), b)| {
            (
                h.clone(),
                100.0 * cpu_ticks(*p).saturating_sub(b) as f64 / TICKS_PER_SECOND / wall,
            )
        })
        .collect();
    let json: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("iperf3 output (exit ok: {ok}): {out}"))?;
    if let Some(e) = json["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let end = &json["end"];
    let gbps = |v: &serde_json::Value| v["bits_per_second"].as_f64().unwrap_or(f64::NAN) / 1e9;
    let received_gbps = gbps(&end["sum_received"]);
    let cpu_busy = busy_between(c0, c1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let gb = received_gbps * wall / 8.0;
    let wg_s: f64 = wg_cpu
        .iter()
        .map(|(_, p): &(String, f64)| p / 100.0 * wall)
        .sum();
    Ok(Iperf {
        sent_gbps: gbps(&end["sum_sent"]),
        received_gbps,
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        cpu_busy,
        cpu_s_per_gb: cpu_busy / 100.0 * cores * wall / gb,
        wg_s_per_gb: wg_s / gb,
        wg_cpu,
    })
}

/// iperf3 between h1's and h2's own namespaces over the underlay (no overlay): the ceiling of
/// this machine's veth + bridge path, for reference.
fn underlay(lab: &LabGuard, extra: &[&str]) -> anyhow::Result<Iperf> {
    let (h1, h2) = (lab.host("h1"), lab.host("h2"));
    let mut server = Command::new("ip")
        .args([
            "netns", "exec", &h2.netns, "iperf3", "-s", "-1", "-p", "5299",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let r = iperf(
        lab,
        |cmd| {
            let out = Command::new("ip")
                .args(["netns", "exec", &h1.netns])
                .args(cmd)
                .args(["-p", "5299"])
                .stdin(Stdio::null())
                .output()?;
            Ok((
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ))
        },
        h2.addr,
        extra,
    );
    if server.try_wait()?.is_none() {
        let _ = server.kill();
    }
    let _ = server.wait();
    r
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

struct NetCase {
    label: &'static str,
    network: &'static str,
    server: &'static str,
    client: &'static str,
    target_gbps: f64,
}

fn row(label: &str, mtu: &str, run: &str, r: &anyhow::Result<Iperf>) {
    match r {
        Ok(r) => {
            let wg: Vec<String> = r
                .wg_cpu
                .iter()
                .map(|(h, p)| format!("{h} {p:.0}%"))
                .collect();
            println!(
                "{label:<22} {mtu:>4} {run:<22} {:>9.2} {:>9.2} {:>7} {:>7.0}%  {}",
                r.sent_gbps,
                r.received_gbps,
                r.retransmits,
                r.cpu_busy,
                if wg.is_empty() || !label.starts_with("WireGuard") {
                    "-".to_string()
                } else {
                    wg.join(", ")
                }
            );
        }
        Err(e) => println!("{label:<22} {mtu:>4} {run:<22} FAILED: {e:#}"),
    }
}

/// Throughput and latency on every path; with `latency_only`, latency alone (no iperf3 runs
/// but the loads under which latency is measured), a quicker loop when tuning the data path.
fn throughput(lab: &LabGuard, latency_only: bool) -> anyhow::Result<()> {
    let cases = [
        NetCase {
            label: "WireGuard (userspace)",
            network: "wgnet",
            server: "iperf-wg",
            client: "client-wg",
            target_gbps: 0.5,
        },
        NetCase {
            label: "VXLAN",
            network: "vxnet",
            server: "iperf-vx",
            client: "client-vx",
            target_gbps: 10.0,
        },
    ];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    println!(
        "== TCP throughput, container on h1 -> iperf3 -s on h2 ({IPERF_SECONDS} s runs; \
         {cores} CPUs; load average before: {}) ==",
        loadavg()
    );
    println!(
        "{:<22} {:>4} {:<22} {:>9} {:>9} {:>7} {:>8}  wg child CPU (1 core = 100%)",
        "network", "MTU", "run", "sent Gb/s", "recv Gb/s", "retr", "CPU busy"
    );
    let mut summary = Vec::new();
    let mut figures: Vec<(&str, PathFigures)> = Vec::new();
    for c in &cases {
        let _ = running(lab, c.server, 1)?;
        let client = running(lab, c.client, 1)?.remove(0);
        let mtu = network(lab, c.network)?["mtu"]
            .as_u64()
            .map_or("?".to_string(), |m| m.to_string());
        let tasks = wait_for(Duration::from_secs(30), "server in DNS", || {
            let a = resolve(lab, &client, &format!("tasks.{}", c.server))?;
            Ok((a.len() == 1).then_some(a))
        })?;
        let vip = wait_for(Duration::from_secs(30), "server VIP in DNS", || {
            let a = resolve(lab, &client, c.server)?;
            Ok((a.len() == 1).then_some(a))
        })?;
        // The server takes one test at a time; it may still be starting.
        wait_for(Duration::from_secs(30), "iperf3 server answering", || {
            let (ok, _) = exec(
                lab,
                &client,
                &[
                    "timeout",
                    "5",
                    "iperf3",
                    "-c",
                    &tasks[0].to_string(),
                    "-t",
                    "1",
                ],
            )?;
            Ok(ok.then_some(()))
        })?;
        let mut runs: Vec<(String, Ipv4Addr, Vec<&str>)> = vec![
            (format!("task {} #1", tasks[0]), tasks[0], vec![]),
            (format!("task {} #2", tasks[0]), tasks[0], vec![]),
            (format!("task {} #3", tasks[0]), tasks[0], vec![]),
            ("task, -P 2".to_string(), tasks[0], vec!["-P", "2"]),
            ("task, -P 4".to_string(), tasks[0], vec!["-P", "4"]),
            (format!("VIP {}", vip[0]), vip[0], vec![]),
        ];
        if latency_only {
            runs.clear();
        }
        let mut single = Vec::new();
        let mut best: f64 = 0.0;
        let mut path = PathFigures::default();
        for (name, addr, extra) in runs {
            let r = iperf(lab, |cmd| exec(lab, &client, cmd), addr, &extra);
            row(c.label, &mtu, &name, &r);
            if let Ok(r) = r {
                if extra.is_empty() && name.starts_with("task") {
                    single.push(r.received_gbps);
                    path.single.push(r.received_gbps);
                    path.cpu_s_per_gb.push(r.cpu_s_per_gb);
                    path.wg_s_per_gb.push(r.wg_s_per_gb);
                }
                if extra == ["-P", "4"] {
                    path.p4.push(r.received_gbps);
                }
                best = best.max(r.received_gbps);
            }
        }
        let server_task = running(lab, c.server, 1)?.remove(0);
        let (idle, loaded) = latency_pair(lab, &client, &server_task, tasks[0])?;
        path.idle = idle;
        path.loaded = loaded;
        figures.push((c.label, path));
        single.sort_by(f64::total_cmp);
        let med = single.get(single.len() / 2).copied().unwrap_or(f64::NAN);
        summary.push((c.label, med, best, c.target_gbps));
    }
    let mut under = PathFigures::default();
    let underlay_runs: &[(&str, &[&str])] = if latency_only {
        &[]
    } else {
        &[
            ("h1 -> h2 netns #1", &[]),
            ("h1 -> h2 netns #2", &[]),
            ("h1 -> h2 netns #3", &[]),
            ("h1 -> h2 netns, -P 4", &["-P", "4"]),
        ]
    };
    for &(name, extra) in underlay_runs {
        let r = underlay(lab, extra);
        row("underlay, no overlay", "1500", name, &r);
        if let Ok(r) = r {
            if extra.is_empty() {
                under.single.push(r.received_gbps);
                under.cpu_s_per_gb.push(r.cpu_s_per_gb);
            } else {
                under.p4.push(r.received_gbps);
            }
        }
    }
    let (idle, loaded) = underlay_latency(lab)?;
    under.idle = idle;
    under.loaded = loaded;
    figures.push(("underlay, no overlay", under));
    side_by_side(&figures);
    println!();
    for (label, med, best, target) in summary {
        println!(
            "{label}: median single-stream {med:.2} Gbit/s received, best of all runs {best:.2} \
             (target >= {target} Gbit/s: {})",
            if med >= target {
                "met"
            } else if best >= target {
                "met only by the best run"
            } else {
                "MISSED"
            }
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1b. Latency and the side-by-side table

/// Round trips per latency sample.
const PINGS: usize = 2000;
/// Port of the bench's echo server inside the server container's namespace.
const ECHO_PORT: u16 = 7777;
/// Bytes of each request and response.
const PING_BYTES: usize = 64;

/// What one path measured, for the side-by-side table.
#[derive(Default)]
struct PathFigures {
    /// Single-stream runs, Gbit/s received.
    single: Vec<f64>,
    /// `-P 4` runs.
    p4: Vec<f64>,
    cpu_s_per_gb: Vec<f64>,
    wg_s_per_gb: Vec<f64>,
    /// Round-trip times idle, and under an iperf3 load on the same path.
    idle: Latency,
    loaded: Latency,
}

#[derive(Default, Clone, Copy)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// p50 and p99 of round-trip times.
fn percentiles(mut rtts: Vec<Duration>) -> Latency {
    rtts.sort();
    let at = |q: f64| {
        rtts.get(((rtts.len() as f64 * q) as usize).min(rtts.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
    };
    Latency {
        p50_us: at(0.50),
        p99_us: at(0.99),
    }
}

/// Moves the calling thread into the namespace at `path` (a file, not a /run/netns name).
fn enter_netns_path(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("open netns {}", path.display()))?;
    // SAFETY: a plain syscall on a descriptor we own; it changes this thread's namespace only.
    let rc = unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A task's network namespace file (the agent's bind mount).
fn task_netns(lab: &LabGuard, task: &serde_json::Value) -> anyhow::Result<std::path::PathBuf> {
    let host = lab.host(task["node"].as_str().context("task has a node")?);
    let id = task["id"].as_str().context("task id")?;
    // On the agent's run dir (`<data>/run/netns`), or where an older agent bound it.
    [
        host.data_dir.join("run/netns").join(id),
        host.data_dir.join("netns").join(id),
    ]
    .into_iter()
    .find(|p| p.exists())
    .with_context(|| format!("no network namespace of task {id}"))
}

/// An echo server in namespace `ns` on `ECHO_PORT`, serving connections one at a time until
/// `stop` is set (checked between connections and every 200 ms while idle).
fn echo_server(
    ns: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let listener = enter_netns_path(&ns)
            .and_then(|()| Ok(std::net::TcpListener::bind(("0.0.0.0", ECHO_PORT))?));
        let listener = match listener {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = listener.set_nonblocking(true);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((mut c, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            let _ = c.set_nonblocking(false);
            let _ = c.set_nodelay(true);
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; PING_BYTES];
            while c.read_exact(&mut buf).is_ok() {
                if c.write_all(&buf).is_err() {
                    break;
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("echo server did not start")??;
    Ok(h)
}

/// `PINGS` round trips from namespace `ns` to `server:ECHO_PORT`.
fn ping_pong(ns: std::path::PathBuf, server: Ipv4Addr) -> anyhow::Result<Latency> {
    use std::io::{Read, Write};
    std::thread::spawn(move || -> anyhow::Result<Latency> {
        enter_netns_path(&ns)?;
        let addr = SocketAddr::from((server, ECHO_PORT));
        let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect {addr}"))?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let req = [7u8; PING_BYTES];
        let mut resp = [0u8; PING_BYTES];
        // Warm-up: the first exchanges include the handshake and any cold path.
        for _ in 0..50 {
            c.write_all(&req)?;
            c.read_exact(&mut resp)?;
        }
        let mut rtts = Vec::with_capacity(PINGS);
        for _ in 0..PINGS {
            let t = Instant::now();
            c.write_all(&req)?;
            c.read_exact(&mut resp)?;
            rtts.push(t.elapsed());
        }
        Ok(percentiles(rtts))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("ping thread panicked"))?
}

/// Latency between two namespaces idle, then while `load` (an iperf3 run on the same path,
/// started in a thread) runs. Prints one line per sample.
fn latency_between(
    label: &str,
    client_ns: std::path::PathBuf,
    server_ns: std::path::PathBuf,
    server: Ipv4Addr,
    load: impl FnOnce() -> anyhow::Result<f64> + Send + 'static,
) -> anyhow::Result<(Latency, Latency)> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let srv = echo_server(server_ns, stop.clone())?;
    let result = (|| {
        let idle = ping_pong(client_ns.clone(), server)?;
        let loader = std::thread::spawn(load);
        std::thread::sleep(Duration::from_secs(1));
        let loaded = ping_pong(client_ns, server);
        // The load's own throughput shows it ran (NaN: it failed).
        let gbps = loader
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?
            .unwrap_or(f64::NAN);
        Ok::<_, anyhow::Error>((idle, loaded?, gbps))
    })();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = srv.join();
    let (idle, loaded, gbps) = result?;
    println!(
        "{label:<22} latency ({PINGS} x {PING_BYTES} B TCP ping-pong): idle p50 {:.0} us p99 {:.0} \
         us; under an iperf3 load of {gbps:.2} Gbit/s p50 {:.0} us p99 {:.0} us",
        idle.p50_us, idle.p99_us, loaded.p50_us, loaded.p99_us
    );
    Ok((idle, loaded))
}

/// Gbit/s received of an `iperf3 -J` run.
fn iperf_gbps(json: &[u8]) -> anyhow::Result<f64> {
    let v: serde_json::Value = serde_json::from_slice(json).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3: no sum_received")
}

/// Latency over an overlay: h1's client container to the iperf3 server's container on h2.
fn latency_pair(
    lab: &LabGuard,
    client: &serde_json::Value,
    server_task: &serde_json::Value,
    server: Ipv4Addr,
) -> anyhow::Result<(Latency, Latency)> {
    let label = format!("-> {}", server_task["service"].as_str().unwrap_or("server"));
    let client_ns = task_netns(lab, client)?;
    let server_ns = task_netns(lab, server_task)?;
    // The load: the same iperf3 as above, run through the runtime from this thread.
    let host = lab.host(client["node"].as_str().context("task has a node")?);
    let (id, root, data) = (
        client["id"].as_str().context("task id")?.to_string(),
        host.runtime_root.clone(),
        host.data_dir.clone(),
    );
    let srv = server.to_string();
    let load = move || -> anyhow::Result<f64> {
        let dir = rudder_agent::shim::ContainerDir::new(data.join("containers").join(&id));
        let argv: Vec<String> = ["timeout", "30", "iperf3", "-c", &srv, "-t", "6", "-J"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        let process = rudder_agent::runtime::exec_process(&dir.config(), &argv, false)?;
        let file = rudder_agent::runtime::write_process(&dir.bundle(), &process)?;
        let out = rudder_tests::runtime_cli(&root)
            .exec(&id, &file)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()?;
        iperf_gbps(&out.stdout)
    };
    latency_between(&label, client_ns, server_ns, server, load)
}

/// Latency between h1's and h2's own namespaces (the underlay).
fn underlay_latency(lab: &LabGuard) -> anyhow::Result<(Latency, Latency)> {
    let (h1, h2) = (lab.host("h1"), lab.host("h2"));
    let ns = |n: &str| Path::new("/run/netns").join(n);
    let (n1, n2, addr) = (h1.netns.clone(), h2.netns.clone(), h2.addr);
    let load = move || -> anyhow::Result<f64> {
        let mut server = Command::new("ip")
            .args(["netns", "exec", &n2, "iperf3", "-s", "-1", "-p", "5298"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new("ip")
            .args(["netns", "exec", &n1, "timeout", "30", "iperf3", "-c"])
            .arg(addr.to_string())
            .args(["-p", "5298", "-t", "6", "-J"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        if server.try_wait()?.is_none() {
            let _ = server.kill();
        }
        let _ = server.wait();
        iperf_gbps(&out?.stdout)
    };
    latency_between(
        "underlay, no overlay",
        ns(&h1.netns),
        ns(&h2.netns),
        h2.addr,
        load,
    )
}

/// The one table the issue asks for: every path side by side, medians, ratios.
fn side_by_side(figures: &[(&str, PathFigures)]) {
    println!();
    println!(
        "== Side by side (medians of the runs above; a busy machine makes them noisy, ratios \
         count) =="
    );
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "path",
        "1 strm",
        "-P 4",
        "CPU s/GB",
        "wg s/GB",
        "p50 idle",
        "p99 idle",
        "p50 load",
        "p99 load"
    );
    for (label, f) in figures {
        println!(
            "{label:<22} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8.0}u {:>8.0}u {:>8.0}u {:>8.0}u",
            median(&f.single),
            median(&f.p4),
            median(&f.cpu_s_per_gb),
            median(&f.wg_s_per_gb),
            f.idle.p50_us,
            f.idle.p99_us,
            f.loaded.p50_us,
            f.loaded.p99_us
        );
    }
    let find = |p: &str| {
        figures
            .iter()
            .find(|(l, _)| l.starts_with(p))
            .map(|(_, f)| f)
    };
    if let (Some(wg), Some(vx)) = (find("WireGuard"), find("VXLAN")) {
        let pct = |a: f64, b: f64| 100.0 * a / b;
        let x = |a: f64, b: f64| a / b;
        println!(
            "encrypted / VXLAN: throughput 1 stream {:.1}%, -P 4 {:.1}% (target >= 25%); \
             latency p50 idle {:.2}x, p99 idle {:.2}x, p50 load {:.2}x, p99 load {:.2}x \
             (target <= 1.5x); CPU s/GB {:.2}x",
            pct(median(&wg.single), median(&vx.single)),
            pct(median(&wg.p4), median(&vx.p4)),
            x(wg.idle.p50_us, vx.idle.p50_us),
            x(wg.idle.p99_us, vx.idle.p99_us),
            x(wg.loaded.p50_us, vx.loaded.p50_us),
            x(wg.loaded.p99_us, vx.loaded.p99_us),
            x(median(&wg.cpu_s_per_gb), median(&vx.cpu_s_per_gb)),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A stopped replica leaving DNS and the VIP

/// A DNS client in h1's namespace asking the network's embedded server directly.
struct Dns {
    sock: UdpSocket,
    server: SocketAddr,
    id: u16,
}

impl Dns {
    fn new(netns: &str, server: Ipv4Addr) -> anyhow::Result<Dns> {
        let ns = netns.to_string();
        let sock = std::thread::spawn(move || -> anyhow::Result<UdpSocket> {
            enter_netns(&ns)?;
            Ok(UdpSocket::bind("0.0.0.0:0")?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))??;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(Dns {
            sock,
            server: SocketAddr::from((server, 53)),
            id: 1,
        })
    }

    /// The A records of `name` (empty on NXDOMAIN).
    fn a(&mut self, name: &str) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
        self.id = self.id.wrapping_add(1);
        let mut q = Vec::with_capacity(64);
        q.extend_from_slice(&self.id.to_be_bytes());
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        self.sock.send_to(&q, self.server)?;
        let mut buf = [0u8; 1500];
        loop {
            let n = self.sock.recv(&mut buf)?;
            if n >= 12 && buf[..2] == self.id.to_be_bytes() {
                return parse_a(&buf[..n]);
            }
        }
    }
}

/// Skips a (possibly compressed) name at `i`; returns the offset after it.
fn skip_name(m: &[u8], mut i: usize) -> anyhow::Result<usize> {
    loop {
        let len = *m.get(i).context("truncated name")? as usize;
        if len == 0 {
            return Ok(i + 1);
        }
        if len & 0xc0 == 0xc0 {
            return Ok(i + 2);
        }
        i += 1 + len;
    }
}

fn parse_a(m: &[u8]) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
    let rcode = m[3] & 0x0f;
    if rcode == 3 {
        return Ok(BTreeSet::new());
    }
    anyhow::ensure!(rcode == 0, "rcode {rcode}");
    let qd = u16::from_be_bytes([m[4], m[5]]);
    let an = u16::from_be_bytes([m[6], m[7]]);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(m, i)? + 4;
    }
    let mut out = BTreeSet::new();
    for _ in 0..an {
        i = skip_name(m, i)?;
        let h = m.get(i..i + 10).context("truncated record")?;
        let (ty, len) = (
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[8], h[9]]) as usize,
        );
        i += 10;
        let d = m.get(i..i + len).context("truncated rdata")?;
        if ty == 1 && len == 4 {
            out.insert(Ipv4Addr::new(d[0], d[1], d[2], d[3]));
        }
        i += len;
    }
    Ok(out)
}

/// The backends of `vip` in the `prerouting` chain listing (empty when it has no rule).
fn vip_backends(chain: &str, vip: Ipv4Addr) -> BTreeSet<Ipv4Addr> {
    let key = format!("ip daddr {vip} dnat");
    chain
        .lines()
        .filter(|l| l.contains(&key))
        .flat_map(|l| {
            let after = &l[l.find(&key).unwrap_or(0) + key.len()..];
            after
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter_map(|w| w.parse::<Ipv4Addr>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `nft list chain ip rudder prerouting`; call from a thread inside the host's namespace.
fn nft_chain() -> anyhow::Result<String> {
    let out = Command::new("nft")
        .args(["list", "chain", "ip", "rudder", "prerouting"])
        .stdin(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// When (after `t0`) each view first lost an address of `before`, and which address.
struct Removal {
    dns: Option<(Duration, Ipv4Addr)>,
    vip: Option<(Duration, Ipv4Addr)>,
    dns_polls: u32,
    nft_polls: u32,
}

impl Removal {
    /// The mean time between polls of each view, up to the removal.
    fn polling(&self) -> String {
        let every = |f: Option<(Duration, Ipv4Addr)>, n: u32| {
            f.map_or("?".to_string(), |(d, _)| {
                format!("{:.1} ms", ms(d) / f64::from(n.max(1)))
            })
        };
        format!(
            "polled DNS every {}, nft every {}",
            every(self.dns, self.dns_polls),
            every(self.vip, self.nft_polls)
        )
    }
}

/// Polls h1's DNS (from this thread) and nftables (from a thread in h1's namespace) until
/// each has dropped an address of `before`; `trigger` runs once both pollers are going, and
/// returns the instant to measure from.
fn watch_removal(
    dns: &mut Dns,
    netns: &str,
    vip: Ipv4Addr,
    before: &BTreeSet<Ipv4Addr>,
    trigger: impl FnOnce() -> anyhow::Result<Instant>,
) -> anyhow::Result<Removal> {
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    let ns = netns.to_string();
    let before_nft = before.clone();
    let nft = std::thread::spawn(
        move || -> anyhow::Result<(Option<(Duration, Ipv4Addr)>, u32)> {
            enter_netns(&ns)?;
            let t0 = rx.recv()?;
            let mut polls = 0;
            while t0.elapsed() < REMOVAL_TIMEOUT {
                let now = vip_backends(&nft_chain()?, vip);
                polls += 1;
                if let Some(gone) = before_nft.iter().find(|a| !now.contains(a)) {
                    return Ok((Some((t0.elapsed(), *gone)), polls));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok((None, polls))
        },
    );
    let t0 = match trigger() {
        Ok(t0) => t0,
        Err(e) => {
            drop(tx);
            let _ = nft.join();
            return Err(e);
        }
    };
    let _ = tx.send(t0);
    let mut dns_found = None;
    let mut dns_polls = 0;
    while t0.elapsed() < REMOVAL_TIMEOUT {
        dns_polls += 1;
        if let Ok(now) = dns.a("tasks.web") {
            if let Some(gone) = before.iter().find(|a| !now.contains(a)) {
                dns_found = Some((t0.elapsed(), *gone));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (vip_found, nft_polls) = nft
        .join()
        .map_err(|_| anyhow::anyhow!("nft poller panicked"))??;
    Ok(Removal {
        dns: dns_found,
        vip: vip_found,
        dns_polls,
        nft_polls,
    })
}

/// Running tasks of `web` with their overlay addresses.
type Replicas = Vec<(serde_json::Value, Ipv4Addr)>;

/// Waits until `web` has 3 running tasks and h1's DNS and VIP both list exactly their
/// addresses; returns the tasks with their addresses, and the set of those.
fn steady(
    lab: &LabGuard,
    dns: &mut Dns,
    netns: &str,
    vip: Ipv4Addr,
) -> anyhow::Result<(Replicas, BTreeSet<Ipv4Addr>)> {
    let mut tasks = Vec::new();
    for t in running(lab, "web", 3)? {
        let a = task_addr(lab, &t)?;
        tasks.push((t, a));
    }
    let addrs: BTreeSet<Ipv4Addr> = tasks.iter().map(|(_, a)| *a).collect();
    let ns = netns.to_string();
    wait_for(Duration::from_secs(30), "DNS and VIP list 3 tasks", || {
        let d = dns.a("tasks.web")?;
        let ns = ns.clone();
        let chain = std::thread::spawn(move || -> anyhow::Result<String> {
            enter_netns(&ns)?;
            nft_chain()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("nft thread panicked"))??;
        let v = vip_backends(&chain, vip);
        if d == addrs && v == addrs {
            Ok(Some(()))
        } else {
            bail!("DNS {d:?}, VIP {v:?}, tasks {addrs:?}")
        }
    })?;
    Ok((tasks, addrs))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stats(v: &[Duration]) -> String {
    if v.is_empty() {
        return "no data".into();
    }
    let mut s = v.to_vec();
    s.sort();
    format!(
        "median {:>7.1} ms   max {:>7.1} ms   (n={})",
        ms(s[s.len() / 2]),
        ms(s[s.len() - 1]),
        s.len()
    )
}

fn removal(lab: &LabGuard) -> anyhow::Result<()> {
    let h1 = lab.host("h1").netns.clone();
    let gw = gateway(lab, "h1", "wgnet")?;
    let mut dns = Dns::new(&h1, gw)?;
    let vip = wait_for(Duration::from_secs(30), "web VIP", || {
        let v = dns.a("web")?;
        Ok((v.len() == 1).then(|| *v.iter().next().unwrap()))
    })?;
    println!();
    println!(
        "== A stopped replica of web (3 replicas, network wgnet) leaving h1's DNS \
         ({gw}:53, tasks.web) and VIP {vip} (nft prerouting on h1) =="
    );
    let mut results: Vec<(&str, Vec<Duration>, Vec<Duration>)> = Vec::new();

    // SIGKILL of a replica's container process, on h2 when one runs there (so the news of its
    // exit goes h2's agent -> controller -> h1's agent).
    let (mut kd, mut kv) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let (tasks, before) = steady(lab, &mut dns, &h1, vip)?;
        std::thread::sleep(Duration::from_millis(500));
        let (victim, addr) = tasks
            .iter()
            .find(|(t, _)| t["node"] == "h2")
            .unwrap_or(&tasks[0])
            .clone();
        let pid = lab.task_pid(&victim, "pid").context("victim pid")?;
        anyhow::ensure!(pid > 1, "bad pid {pid}");
        let r = watch_removal(&mut dns, &h1, vip, &before, || {
            let t0 = Instant::now();
            // SAFETY: plain kill(2) of the container's init, a pid the agent recorded.
            let rc = unsafe { kill(pid, SIGKILL) };
            anyhow::ensure!(rc == 0, "kill {pid}: {}", std::io::Error::last_os_error());
            Ok(t0)
        })?;
        let line = |what: &str, f: Option<(Duration, Ipv4Addr)>, out: &mut Vec<Duration>| match f {
            Some((d, a)) if a == addr => {
                out.push(d);
                format!("{what} {:.1} ms", ms(d))
            }
            Some((d, a)) => format!("{what} dropped {a}, not the victim, after {:.1} ms", ms(d)),
            None => format!("{what} still there after {REMOVAL_TIMEOUT:?}"),
        };
        println!(
            "  SIGKILL round {round}: victim {addr} on {}: {}, {} ({})",
            victim["node"].as_str().unwrap_or("?"),
            line("DNS", r.dns, &mut kd),
            line("VIP", r.vip, &mut kv),
            r.polling()
        );
    }
    results.push(("SIGKILL of the container", kd, kv));

    // Graceful: `rctl scale web=2` (the stopped task is the controller's choice), back to 3.
    let (mut gd, mut gv) = (Vec::new(), Vec::new());
    let mut rctl_times = Vec::new();
    for round in 1..=ROUNDS {
        let (tasks, before) = steady(lab, &mut dns, &h1, vip)?;
        std::thread::sleep(Duration::from_millis(500));
        let node_of = |a: Ipv4Addr| {
            tasks
                .iter()
                .find(|(_, x)| *x == a)
                .and_then(|(t, _)| t["node"].as_str())
                .unwrap_or("?")
                .to_string()
        };
        let mut rctl_took = Duration::ZERO;
        let r = watch_removal(&mut dns, &h1, vip, &before, || {
            let t0 = Instant::now();
            lab.rctl(&["scale", "web=2"])?;
            rctl_took = t0.elapsed();
            Ok(t0)
        })?;
        rctl_times.push(rctl_took);
        let same = match (r.dns, r.vip) {
            (Some((_, a)), Some((_, b))) => a == b,
            _ => false,
        };
        let fmt = |what: &str, f: Option<(Duration, Ipv4Addr)>, out: &mut Vec<Duration>| match f {
            Some((d, a)) => {
                out.push(d);
                format!("{what} {:.1} ms ({a} on {})", ms(d), node_of(a))
            }
            None => format!("{what} still there after {REMOVAL_TIMEOUT:?}"),
        };
        let d = fmt("DNS", r.dns, &mut gd);
        let v = fmt("VIP", r.vip, &mut gv);
        println!(
            "  scale 3->2 round {round}: {d}, {v}{} (rctl scale returned after {:.1} ms; {})",
            if same { "" } else { " [different addresses!]" },
            ms(rctl_took),
            r.polling()
        );
        lab.rctl(&["scale", "web=3"])?;
    }
    results.push(("graceful stop (rctl scale 3->2)", gd, gv));
    let _ = steady(lab, &mut dns, &h1, vip)?;

    println!();
    println!(
        "{:<34} {:<6} time until gone on h1",
        "how the replica stopped", "view"
    );
    for (how, d, v) in &results {
        println!("{how:<34} {:<6} {}", "DNS", stats(d));
        println!("{:<34} {:<6} {}", "", "VIP", stats(v));
    }
    println!(
        "(measured from kill(2) / from spawning `rctl scale`, which itself returned after {})",
        stats(&rctl_times).trim_start_matches("median").trim()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` would run us with no flag: skip then.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let (lab, tmp) = lab_with_busybox("obn", 2)?;
    let tar = tmp.path().join("iperf.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/iperf-rootfs.sh");
    let st = Command::new("bash").arg(script).arg(&tar).status()?;
    anyhow::ensure!(st.success(), "iperf-rootfs.sh failed");
    lab.rctl(&[
        "image",
        "import",
        tar.to_str().context("utf-8 path")?,
        "iperf:latest",
    ])?;
    let on = |host: &str| format!("placement:\n  constraints: [\"node.hostname=={host}\"]\n");
    let sleep = "command: [\"/bin/sleep\", \"1000000\"]\n";
    let mut yaml = String::from(
        "kind: Network\nname: wgnet\n---\nkind: Network\nname: vxnet\nencrypted: false\n",
    );
    for (net, suffix) in [("wgnet", "wg"), ("vxnet", "vx")] {
        yaml.push_str(&format!(
            "---\nkind: Service\nname: iperf-{suffix}\nimage: iperf:latest\nnetworks: [{net}]\n\
             stop_grace_period: 1\n{}command: [\"/usr/bin/iperf3\", \"-s\"]\n",
            on("h2")
        ));
        yaml.push_str(&format!(
            "---\nkind: Service\nname: client-{suffix}\nimage: iperf:latest\nnetworks: [{net}]\n\
             stop_grace_period: 1\n{}{sleep}",
            on("h1")
        ));
    }
    yaml.push_str(&format!(
        "---\nkind: Service\nname: web\nimage: busybox:latest\nreplicas: 3\nnetworks: [wgnet]\n\
         stop_grace_period: 1\ncommand: {WEB}\n"
    ));
    lab.apply(tmp.path(), "bench.yaml", &yaml)?;
    // `RUDDER_BENCH_ONLY=throughput`, `=latency` (its latency part alone) or `=removal` runs
    // one part.
    let only = std::env::var("RUDDER_BENCH_ONLY").unwrap_or_default();
    let t = if only.is_empty() || only == "throughput" || only == "latency" {
        throughput(&lab, only == "latency")
    } else {
        Ok(())
    };
    // `RUDDER_BENCH_HOLD=SECONDS` keeps the lab up that long before teardown (to look at it).
    if let Some(secs) = std::env::var("RUDDER_BENCH_HOLD")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        println!("holding the lab for {secs} s");
        std::thread::sleep(Duration::from_secs(secs.min(3600)));
    }
    if let Err(e) = &t {
        println!("throughput: FAILED: {e:#}");
    }
    let r = if only.is_empty() || only == "removal" {
        removal(&lab)
    } else {
        Ok(())
    };
    if let Err(e) = &r {
        println!("removal: FAILED: {e:#}");
    }
    drop(lab);
    drop(tmp);
    t.and(r)
}

//! The routing mesh under churn: a steady request loop through ingress-published ports while
//! the service scales up (2→5), down (5→2) and rolls to a new version. Requests to replicas
//! that stay must not fail; every failure is classified by whether the replica that served it
//! (or was to serve it) stayed through the phase, and the counts are printed.
//!
//! The replicas run `churnecho`, a tiny static server compiled here from C: each TCP line and
//! each UDP datagram gets `<hostname> <its own address>`; a TCP connection stays open for more
//! lines. It exits at SIGTERM, as most servers do, so a replica that leaves stops answering at
//! once. The client is the lab's root namespace: short requests (a new TCP connection, a new
//! UDP socket each) alternately through `h1` and `h2`, plus long-lived TCP connections and a
//! long-lived UDP flow (one source port) asking every 100 ms. A failed short request's replica
//! is read from the ingress host's conntrack table (the DNAT of the client's source port).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rudder_tests::{lab_with_busybox, running_tasks, wait_for, LabGuard};

const CHURNECHO_C: &str = r#"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <unistd.h>

static char host[64] = "?";

static void bye(int sig) { (void)sig; _exit(0); }

static int answer(int fd, char *out, size_t len) {
  struct sockaddr_in me;
  socklen_t l = sizeof me;
  if (getsockname(fd, (void *)&me, &l)) return -1;
  return snprintf(out, len, "%s %s\n", host, inet_ntoa(me.sin_addr));
}

int main(int argc, char **argv) {
  int port = argc > 1 ? atoi(argv[1]) : 7, one = 1;
  signal(SIGTERM, bye);
  signal(SIGCHLD, SIG_IGN);
  gethostname(host, sizeof host - 1);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  int t = socket(AF_INET, SOCK_STREAM, 0), u = socket(AF_INET, SOCK_DGRAM, 0);
  setsockopt(t, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  setsockopt(u, IPPROTO_IP, IP_PKTINFO, &one, sizeof one);
  if (bind(t, (void *)&a, sizeof a) || listen(t, 128) || bind(u, (void *)&a, sizeof a)) {
    perror("churnecho: bind");
    return 1;
  }
  char out[160], buf[512];
  for (;;) {
    fd_set r;
    FD_ZERO(&r);
    FD_SET(t, &r);
    FD_SET(u, &r);
    if (select((t > u ? t : u) + 1, &r, 0, 0, 0) < 0) continue;
    if (FD_ISSET(t, &r)) {
      int c = accept(t, 0, 0);
      if (c >= 0 && fork() == 0) {
        close(t);
        close(u);
        FILE *in = fdopen(c, "r");
        while (in && fgets(buf, sizeof buf, in)) {
          int n = answer(c, out, sizeof out);
          if (n < 0 || write(c, out, n) != n) break;
        }
        _exit(0);
      }
      if (c >= 0) close(c);
    }
    if (FD_ISSET(u, &r)) {
      struct sockaddr_in p;
      char cbuf[256];
      struct iovec io = {buf, sizeof buf};
      struct msghdr m = {&p, sizeof p, &io, 1, cbuf, sizeof cbuf, 0};
      if (recvmsg(u, &m, 0) < 0) continue;
      struct in_addr to = {0};
      for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO)
          to = ((struct in_pktinfo *)CMSG_DATA(c))->ipi_addr;
      int n = snprintf(out, sizeof out, "%s %s\n", host, inet_ntoa(to));
      sendto(u, out, n, 0, (void *)&p, sizeof p);
    }
  }
}
"#;

/// TCP and UDP ports published by the service (TCP `PORT`, UDP `PORT + 1`).
const PORT: u16 = 9101;
/// How long a request may take before it counts as failed.
const TIMEOUT: Duration = Duration::from_secs(2);

fn manifest(replicas: u32, version: u32) -> String {
    format!(
        "kind: Network\nname: mesh\n---\nkind: Service\nname: web\nimage: churnecho:latest\n\
         replicas: {replicas}\nnetworks: [mesh]\nstop_grace_period: 5\n\
         env: {{VERSION: \"{version}\"}}\n\
         command: [\"/bin/churnecho\", \"7\"]\n\
         update_config: {{parallelism: 1, delay: 1s}}\nports:\n\
         \x20 - {{target: 7, published: {PORT}, mode: ingress}}\n\
         \x20 - {{target: 7, published: {}, protocol: udp, mode: ingress}}\n",
        PORT + 1
    )
}

/// What one request got.
#[derive(Debug, Clone)]
enum Outcome {
    /// Answered (by the replica with this hostname).
    Ok(#[allow(dead_code)] String),
    /// Failed; the replica it went to, by hostname or (from conntrack) by address, if known.
    Failed { why: String, replica: Replica },
}

#[derive(Debug, Clone)]
enum Replica {
    Host(String),
    Addr(Ipv4Addr),
    Unknown,
}

/// Everything the loops saw, by kind of request.
#[derive(Default)]
struct Log {
    /// (phase, kind, outcome)
    events: Vec<(usize, &'static str, Outcome)>,
    /// Replica addresses learned from answers.
    addrs: BTreeMap<Ipv4Addr, String>,
}

struct Shared {
    log: Mutex<Log>,
    phase: std::sync::atomic::AtomicUsize,
    stop: AtomicBool,
}

impl Shared {
    fn record(&self, kind: &'static str, o: Outcome) {
        let phase = self.phase.load(Ordering::SeqCst);
        self.log
            .lock()
            .expect("log lock")
            .events
            .push((phase, kind, o));
    }

    /// Parses `<hostname> <address>`, learning the address.
    fn answer(&self, line: &str) -> Option<String> {
        let (host, addr) = line.trim().split_once(' ')?;
        if let Ok(a) = addr.parse() {
            self.log
                .lock()
                .expect("log lock")
                .addrs
                .insert(a, host.to_string());
        }
        Some(host.to_string())
    }
}

/// The DNAT destination of the client's connection from `sport` in host `ns`'s conntrack.
fn conntrack_backend(ns: &str, proto: &str, sport: u16, dport: u16) -> Option<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/nf_conntrack"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("sport={sport} dport={dport} ");
    text.lines()
        .filter(|l| l.contains(&format!(" {proto} ")) && l.contains(&want))
        .find_map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.strip_prefix("src="))
                .nth(1)
                .and_then(|a| a.parse().ok())
        })
}

fn tcp_short(to: SocketAddrV4) -> (Result<String, String>, u16) {
    let mut port = 0;
    let r = (|| {
        let mut s = TcpStream::connect_timeout(&to.into(), TIMEOUT).map_err(|e| e.to_string())?;
        port = s.local_addr().map(|a| a.port()).unwrap_or(0);
        s.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        s.write_all(b"?\n").map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.is_empty() {
            return Err("closed".to_string());
        }
        Ok(line)
    })();
    (r, port)
}

fn udp_ask(s: &UdpSocket, to: SocketAddrV4) -> Result<String, String> {
    s.send_to(b"?", to).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// New connection (and new UDP socket) per request, alternating ingress hosts.
fn short_loop(sh: Arc<Shared>, hosts: Vec<(Ipv4Addr, String)>) {
    let mut i = 0usize;
    while !sh.stop.load(Ordering::SeqCst) {
        let (addr, ns) = &hosts[i % hosts.len()];
        i += 1;
        let (r, port) = tcp_short(SocketAddrV4::new(*addr, PORT));
        let o = match r.map(|l| sh.answer(&l)) {
            Ok(Some(h)) => Outcome::Ok(h),
            Ok(None) => Outcome::Failed {
                why: "garbled".into(),
                replica: Replica::Unknown,
            },
            Err(why) => Outcome::Failed {
                why,
                replica: conntrack_backend(ns, "tcp", port, PORT)
                    .map_or(Replica::Unknown, Replica::Addr),
            },
        };
        sh.record("tcp", o);
        let o = match UdpSocket::bind("0.0.0.0:0").and_then(|s| {
            s.set_read_timeout(Some(TIMEOUT))?;
            Ok(s)
        }) {
            Ok(s) => {
                let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
                match udp_ask(&s, SocketAddrV4::new(*addr, PORT + 1)).map(|l| sh.answer(&l)) {
                    Ok(Some(h)) => Outcome::Ok(h),
                    Ok(None) => Outcome::Failed {
                        why: "garbled".into(),
                        replica: Replica::Unknown,
                    },
                    Err(why) => Outcome::Failed {
                        why,
                        replica: conntrack_backend(ns, "udp", port, PORT + 1)
                            .map_or(Replica::Unknown, Replica::Addr),
                    },
                }
            }
            Err(e) => Outcome::Failed {
                why: e.to_string(),
                replica: Replica::Unknown,
            },
        };
        sh.record("udp", o);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One TCP connection asked every 100 ms; a new one after a failure.
fn long_tcp_loop(sh: Arc<Shared>, to: SocketAddrV4) {
    while !sh.stop.load(Ordering::SeqCst) {
        let Ok(s) = TcpStream::connect_timeout(&to.into(), TIMEOUT) else {
            sh.record(
                "tcp-long",
                Outcome::Failed {
                    why: "connect".into(),
                    replica: Replica::Unknown,
                },
            );
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let _ = s.set_read_timeout(Some(TIMEOUT));
        let Ok(w) = s.try_clone() else { return };
        let mut w = w;
        let mut r = BufReader::new(s);
        let mut server: Option<String> = None;
        while !sh.stop.load(Ordering::SeqCst) {
            let mut line = String::new();
            let asked = Instant::now();
            let got = w
                .write_all(b"?\n")
                .map_err(|e| e.to_string())
                .and_then(|_| r.read_line(&mut line).map_err(|e| e.to_string()))
                .and_then(|n| if n == 0 { Err("closed".into()) } else { Ok(()) });
            match got.map(|_| sh.answer(&line)) {
                Ok(Some(h)) => {
                    server.get_or_insert(h.clone());
                    sh.record("tcp-long", Outcome::Ok(h));
                }
                other => {
                    let why = match other {
                        Err(e) => e,
                        _ => "garbled".to_string(),
                    };
                    sh.record(
                        "tcp-long",
                        Outcome::Failed {
                            why: format!("{why} after {:?}", asked.elapsed()),
                            replica: server.map_or(Replica::Unknown, Replica::Host),
                        },
                    );
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One UDP flow (one source port) asked every 100 ms.
fn long_udp_loop(sh: Arc<Shared>, to: SocketAddrV4) {
    let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut last: Option<String> = None;
    while !sh.stop.load(Ordering::SeqCst) {
        match udp_ask(&s, to).map(|l| sh.answer(&l)) {
            Ok(Some(h)) => {
                last = Some(h.clone());
                sh.record("udp-long", Outcome::Ok(h));
            }
            _ => sh.record(
                "udp-long",
                Outcome::Failed {
                    why: "no answer".into(),
                    replica: last.clone().map_or(Replica::Unknown, Replica::Host),
                },
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Hostnames (task id prefixes) of `web`'s running tasks.
fn running_replicas(lab: &LabGuard) -> anyhow::Result<BTreeSet<String>> {
    Ok(running_tasks(&lab.tasks("web")?)
        .iter()
        .filter_map(|t| {
            t["id"]
                .as_str()
                .map(|id| id[..id.len().min(12)].to_string())
        })
        .collect())
}

fn wait_replicas(lab: &LabGuard, n: usize, version: Option<&str>) -> anyhow::Result<()> {
    wait_for(
        Duration::from_secs(120),
        &format!("{n} replicas of web running"),
        || {
            let tasks = lab.tasks("web")?;
            let running = running_tasks(&tasks);
            // Every other task finished (no replica still stopping).
            let settled = tasks
                .iter()
                .all(|t| t["desired_state"] == "running" || t["state"] != "running");
            let updated = version.is_none_or(|_| {
                let v: serde_json::Value = serde_json::from_str(
                    &lab.rctl(&["get", "services", "-o", "json"])
                        .unwrap_or_default(),
                )
                .unwrap_or_default();
                v.as_array()
                    .and_then(|a| a.iter().find(|s| s["name"] == "web"))
                    .is_some_and(|s| s["update"]["state"] == "completed")
            });
            Ok((running.len() == n && settled && updated).then_some(()))
        },
    )
}

/// Requests and failures of one kind in one phase.
#[derive(Debug, Default)]
struct Counts {
    requests: usize,
    /// To a replica running before and after the phase.
    staying: usize,
    /// To a replica that left in this phase, or that joined in it.
    leaving_or_new: usize,
    /// To a replica gone before the phase began (a stale translation), or to one unknown.
    stale_or_unknown: usize,
}

/// Counts of one phase by kind; `before` and `after` are its replicas.
fn classify(
    log: &Log,
    phase: usize,
    before: &BTreeSet<String>,
    after: &BTreeSet<String>,
) -> BTreeMap<&'static str, Counts> {
    let mut out: BTreeMap<&'static str, Counts> = BTreeMap::new();
    for (p, kind, o) in &log.events {
        if *p != phase {
            continue;
        }
        let e = out.entry(kind).or_default();
        e.requests += 1;
        let Outcome::Failed { why, replica } = o else {
            continue;
        };
        let host = match replica {
            Replica::Host(h) => Some(h.clone()),
            Replica::Addr(a) => log.addrs.get(a).cloned(),
            Replica::Unknown => None,
        };
        let class = match &host {
            Some(h) if before.contains(h) && after.contains(h) => {
                e.staying += 1;
                "staying"
            }
            Some(h) if before.contains(h) || after.contains(h) => {
                e.leaving_or_new += 1;
                "leaving/new"
            }
            _ => {
                e.stale_or_unknown += 1;
                "gone earlier or unknown"
            }
        };
        eprintln!("phase {phase}: {kind} to {class} replica {host:?} ({replica:?}) failed: {why}");
    }
    out
}

/// Scales 2→5, 5→2 and rolls the service under a steady request loop; no request to a replica
/// that stays may fail.
#[test]
fn requests_to_staying_replicas_survive_churn() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("mch", 3)?;
    lab.import_c_tool(tmp.path(), "churnecho", CHURNECHO_C)?;
    lab.apply(tmp.path(), "web.yaml", &manifest(2, 1))?;
    wait_replicas(&lab, 2, None)?;
    let h1 = lab.host("h1");
    let h2 = lab.host("h2");
    // Every ingress host answers before the loop starts.
    for h in [h1, h2] {
        let to = SocketAddrV4::new(h.addr, PORT);
        wait_for(Duration::from_secs(40), &format!("{to} answers"), || {
            Ok(tcp_short(to).0.ok())
        })?;
    }
    let sh = Arc::new(Shared {
        log: Mutex::default(),
        phase: 0.into(),
        stop: AtomicBool::new(false),
    });
    let mut threads = Vec::new();
    {
        let sh = sh.clone();
        let hosts = vec![(h1.addr, h1.netns.clone()), (h2.addr, h2.netns.clone())];
        threads.push(std::thread::spawn(move || short_loop(sh, hosts)));
    }
    for i in 0..4 {
        let sh = sh.clone();
        let to = SocketAddrV4::new(if i % 2 == 0 { h1.addr } else { h2.addr }, PORT);
        threads.push(std::thread::spawn(move || long_tcp_loop(sh, to)));
    }
    {
        let sh = sh.clone();
        let to = SocketAddrV4::new(h1.addr, PORT + 1);
        threads.push(std::thread::spawn(move || long_udp_loop(sh, to)));
    }
    let settle = Duration::from_secs(3);
    std::thread::sleep(settle);

    let phases: [(&str, u32, u32); 3] = [("scale 2→5", 5, 1), ("scale 5→2", 2, 1), ("roll", 2, 2)];
    let mut sets = Vec::new();
    let mut result = Ok(());
    for (i, (name, replicas, version)) in phases.iter().enumerate() {
        let before = running_replicas(&lab)?;
        sh.phase.store(i + 1, Ordering::SeqCst);
        let began = Instant::now();
        lab.apply(tmp.path(), "web.yaml", &manifest(*replicas, *version))?;
        let r = wait_replicas(&lab, *replicas as usize, (*version > 1).then_some("rolled"));
        std::thread::sleep(settle);
        let after = running_replicas(&lab)?;
        eprintln!(
            "{name}: {:?}; before {before:?}, after {after:?}",
            began.elapsed()
        );
        sets.push((before, after));
        if r.is_err() {
            result = r;
            break;
        }
    }
    sh.stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    result?;

    let log = sh.log.lock().expect("log lock");
    let mut bad = 0;
    let mut total_failed = 0;
    let mut udp_long_lost = 0;
    for (i, (name, _, _)) in phases.iter().enumerate() {
        let (before, after) = &sets[i];
        for (kind, c) in classify(&log, i + 1, before, after) {
            eprintln!(
                "{name:>10} {kind:>8}: {:5} requests, failed: {} to staying replicas, {} to \
                 leaving or new ones, {} to replicas gone earlier or unknown",
                c.requests, c.staying, c.leaving_or_new, c.stale_or_unknown
            );
            bad += c.staying + c.stale_or_unknown;
            if kind == "udp-long" {
                // The flow is moved to a remaining replica before its own one stops: at most
                // a datagram or two lost while the ingress host catches up.
                udp_long_lost = udp_long_lost.max(c.leaving_or_new);
            }
            total_failed += c.staying + c.leaving_or_new + c.stale_or_unknown;
        }
    }
    eprintln!("failed requests in all: {total_failed}");
    anyhow::ensure!(
        udp_long_lost <= 2,
        "the long-lived UDP flow lost {udp_long_lost} datagrams when its replica left"
    );
    anyhow::ensure!(
        bad == 0,
        "{bad} requests to replicas that stayed, or to replicas already gone, failed"
    );
    Ok(())
}

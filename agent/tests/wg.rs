//! Real WireGuard between two simulated hosts: two network namespaces joined by a veth pair,
//! each with its own `Wg` (userspace on a kernel without WireGuard). Needs root, `ip`,
//! /dev/net/tun. Checks that traffic passes and is only WireGuard UDP on the wire, that
//! `set_peers` leaves unchanged peers alone and re-adds changed ones, that a killed child is
//! restarted with its configuration, that a new `ensure` adopts a running device, key
//! rotation, and that `shutdown` leaves nothing behind.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use rudder_agent::wg::{generate_key, load_or_create_key, Backend, KeyPair, Wg, WgPeer};
use wireguard_control::{Device, InterfaceName};

const PORT: u16 = 51820;

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn enter_netns(ns: &str) {
    let f = File::open(format!("/var/run/netns/{ns}")).expect("open netns");
    nix::sched::setns(&f, CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Runs `f` on a new thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns);
        f()
    })
}

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One simulated host: a thread in the host's netns with a current-thread runtime, so the
/// `Wg` calls, its `ip` commands, its child and its supervisor all live in that netns.
struct Host {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Host {
    fn new(ns: &str) -> Host {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = in_netns(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            while let Ok(job) = rx.recv() {
                rt.block_on(job);
            }
        });
        Host {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .as_ref()
            .unwrap()
            .send(Box::pin(async move {
                let _ = rtx.send(fut.await);
            }))
            .expect("host thread gone");
        rrx.recv().expect("host job panicked")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_dir_file(iface: &str, ext: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{iface}.{ext}"))
}

fn child_pid(iface: &str) -> Option<i32> {
    std::fs::read_to_string(run_dir_file(iface, "pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a live (not zombie) `wg-userspace` child for `iface`.
fn child_alive(pid: i32, iface: &str) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_none_or(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    text.contains("wg-userspace") && text.contains(&format!("--iface {iface}")) && !zombie
}

/// Removes namespaces, children, sockets and links even when the test fails.
struct Cleanup {
    netns: Vec<String>,
    ifaces: Vec<(String, String)>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (ns, iface) in &self.ifaces {
            if let Some(pid) = child_pid(iface).filter(|p| child_alive(*p, iface)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            for ext in ["sock", "pid", "log", "log.1"] {
                let _ = std::fs::remove_file(run_dir_file(iface, ext));
            }
            let _ = run_ok(&["ip", "-n", ns, "link", "del", "dev", iface]);
        }
        for ns in &self.netns {
            let _ = run_ok(&["ip", "netns", "del", ns]);
        }
    }
}

/// The device's public key as its socket reports it (wireguard-control's parser does not
/// know boringtun's `own_public_key`).
fn own_public_key(iface: &str) -> Option<String> {
    let mut s = std::os::unix::net::UnixStream::connect(run_dir_file(iface, "sock")).ok()?;
    s.write_all(b"get=1\n\n").ok()?;
    let mut answer = String::new();
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut buf = [0u8; 4096];
    while !answer.contains("errno=") {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        answer.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    answer
        .lines()
        .find_map(|l| l.strip_prefix("own_public_key="))
        .map(str::to_string)
}

fn hex_key(k: &KeyPair) -> Option<String> {
    Some(hex::encode(k.public.as_bytes()))
}

fn device(iface: &str) -> Device {
    let name: InterfaceName = iface.parse().unwrap();
    Device::get(&name, wireguard_control::Backend::Userspace).expect("Device::get")
}

/// Sends a marked message from `from` to `to` over TCP and expects it echoed back.
fn tcp_echo(from_ns: &str, to_ns: &str, to: SocketAddr, marker: &str, wait: Duration) -> bool {
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = in_netns(to_ns, move || {
        let l = TcpListener::bind(to).expect("bind echo server");
        l.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut buf = [0u8; 256];
                    let n = s.read(&mut buf).unwrap_or(0);
                    let _ = s.write_all(&buf[..n]);
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    ready_rx.recv().unwrap();
    let msg = marker.to_string();
    let client = in_netns(from_ns, move || {
        let mut s = TcpStream::connect_timeout(&to, wait).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(msg.as_bytes()).ok()?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).ok()?;
        Some(buf == msg.as_bytes())
    });
    let ok = client.join().unwrap() == Some(true);
    let _ = server.join();
    ok
}

/// Captures every frame on `dev` in `ns` (an AF_PACKET socket) until stopped.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Vec<u8>>>,
}

impl Capture {
    fn start(ns: &str, dev: &str) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let dev = std::ffi::CString::new(dev).unwrap();
        let stop2 = stop.clone();
        let thread = in_netns(ns, move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket calls on a descriptor owned by this thread; buffers are
            // valid for the lengths passed.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                assert!(fd >= 0, "AF_PACKET socket");
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = libc::if_nametoindex(dev.as_ptr()) as i32;
                assert!(sll.sll_ifindex > 0, "capture device index");
                let r = libc::bind(
                    fd,
                    &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(r, 0, "bind AF_PACKET");
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const libc::timeval as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                ready_tx.send(()).unwrap();
                let mut frames = Vec::new();
                let mut buf = vec![0u8; 65536];
                while !stop2.load(Ordering::SeqCst) {
                    let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
                    if n > 0 {
                        frames.push(buf[..n as usize].to_vec());
                    }
                }
                libc::close(fd);
                frames
            }
        });
        ready_rx.recv().unwrap();
        Capture { stop, thread }
    }

    fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// (IP protocol, source port, destination port) of an Ethernet/IPv4 frame.
fn ipv4_summary(frame: &[u8]) -> Option<(u8, u16, u16)> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let proto = frame[23];
    let l4 = 14 + ihl;
    let (sp, dp) = if frame.len() >= l4 + 4 {
        (
            u16::from_be_bytes([frame[l4], frame[l4 + 1]]),
            u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]),
        )
    } else {
        (0, 0)
    };
    Some((proto, sp, dp))
}

fn peer(key: &KeyPair, endpoint: &str, nets: &[(Ipv4Addr, u8)]) -> WgPeer {
    WgPeer {
        public_key: key.public.to_base64(),
        endpoint: endpoint.parse().unwrap(),
        allowed_ips: nets.to_vec(),
    }
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_hosts_talk_over_userspace_wireguard() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let pid = std::process::id();
    let (ns_a, ns_b) = (format!("rdrwgt-{pid}-a"), format!("rdrwgt-{pid}-b"));
    let (if_a, if_b) = (format!("rwt{pid:x}a"), format!("rwt{pid:x}b"));
    let (veth_a, veth_b) = (format!("rwv{pid:x}a"), format!("rwv{pid:x}b"));
    let _cleanup = Cleanup {
        netns: vec![ns_a.clone(), ns_b.clone()],
        ifaces: vec![(ns_a.clone(), if_a.clone()), (ns_b.clone(), if_b.clone())],
    };
    run(&["ip", "netns", "add", &ns_a]);
    run(&["ip", "netns", "add", &ns_b]);
    run(&[
        "ip", "link", "add", &veth_a, "netns", &ns_a, "type", "veth", "peer", "name", &veth_b,
        "netns", &ns_b,
    ]);
    for (ns, veth, addr) in [
        (&ns_a, &veth_a, "192.168.77.1/24"),
        (&ns_b, &veth_b, "192.168.77.2/24"),
    ] {
        run(&["ip", "-n", ns, "addr", "add", addr, "dev", veth]);
        run(&["ip", "-n", ns, "link", "set", veth, "up"]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    let keys = tempfile::tempdir().unwrap();
    let key_a = load_or_create_key(&keys.path().join("a/wg.key")).unwrap();
    let key_b = load_or_create_key(&keys.path().join("b/wg.key")).unwrap();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_rudder-agent"));
    let host_a = Host::new(&ns_a);
    let host_b = Host::new(&ns_b);
    let ensure = |host: &Host, iface: &str, key: &KeyPair| {
        let (iface, key, exe) = (iface.to_string(), key.clone(), exe.clone());
        host.run(async move { Wg::ensure(&iface, PORT, &key, 1420, &exe).await })
            .unwrap_or_else(|e| panic!("ensure: {e}"))
    };
    let wa = ensure(&host_a, &if_a, &key_a);
    let wb = ensure(&host_b, &if_b, &key_b);
    let kernel_wg = wa.backend() == Backend::Kernel;
    if kernel_wg {
        eprintln!("this kernel has WireGuard: the userspace checks below are skipped");
        let (a, b) = (wa.clone(), wb.clone());
        host_a.run(a.shutdown());
        host_b.run(b.shutdown());
        return;
    }
    assert_eq!(wb.backend(), Backend::Userspace);
    let pid_a = child_pid(&if_a).expect("pid file");
    assert!(child_alive(pid_a, &if_a));
    // Idempotent: a second `ensure` neither starts another child nor fails.
    drop(ensure(&host_a, &if_a, &key_a));
    assert_eq!(child_pid(&if_a), Some(pid_a));
    assert!(child_alive(pid_a, &if_a));
    assert!(run_dir_file(&if_a, "sock").exists());
    let link = run(&["ip", "-n", &ns_a, "-o", "link", "show", "dev", &if_a]);
    assert!(link.contains("mtu 1420"), "{link}");
    assert!(device(&if_a).listen_port == Some(PORT));
    assert_eq!(own_public_key(&if_a), hex_key(&key_a));

    for (ns, iface, addr, other) in [
        (&ns_a, &if_a, "10.99.1.1/24", "10.99.2.0/24"),
        (&ns_b, &if_b, "10.99.2.1/24", "10.99.1.0/24"),
    ] {
        run(&["ip", "-n", ns, "addr", "add", addr, "dev", iface]);
        run(&["ip", "-n", ns, "route", "add", other, "dev", iface]);
    }
    let net_a = (Ipv4Addr::new(10, 99, 1, 0), 24);
    let net_b = (Ipv4Addr::new(10, 99, 2, 0), 24);
    let net_b2 = (Ipv4Addr::new(10, 99, 3, 0), 24);
    let set_peers = |host: &Host, wg: &Wg, peers: Vec<WgPeer>| {
        let wg = wg.clone();
        host.run(async move { wg.set_peers(&peers).await })
            .unwrap_or_else(|e| panic!("set_peers: {e}"));
    };
    let peers_a = vec![peer(&key_b, "192.168.77.2:51820", &[net_b])];
    set_peers(&host_a, &wa, peers_a.clone());
    set_peers(
        &host_b,
        &wb,
        vec![peer(&key_a, "192.168.77.1:51820", &[net_a])],
    );

    // Traffic passes, and the underlay carries only WireGuard UDP: no plaintext.
    let to_b: SocketAddr = "10.99.2.1:7000".parse().unwrap();
    let marker = format!("rudder-wg-plaintext-marker-{pid}");
    let capture = Capture::start(&ns_b, &veth_b);
    assert!(
        tcp_echo(&ns_a, &ns_b, to_b, &marker, Duration::from_secs(8)),
        "no TCP echo across the tunnel"
    );
    let frames = capture.finish();
    let ipv4: Vec<(u8, u16, u16)> = frames.iter().filter_map(|f| ipv4_summary(f)).collect();
    assert!(!ipv4.is_empty(), "capture saw no IPv4 frames");
    for (proto, sp, dp) in &ipv4 {
        assert!(
            *proto == 17 && (*sp == PORT || *dp == PORT),
            "non-WireGuard IPv4 on the veth: proto {proto} {sp} -> {dp}"
        );
    }
    assert!(
        !frames
            .iter()
            .any(|f| f.windows(marker.len()).any(|w| w == marker.as_bytes())),
        "plaintext payload seen on the veth"
    );
    if run_ok(&["sh", "-c", "command -v ping"]) {
        run(&[
            "ip",
            "netns",
            "exec",
            &ns_a,
            "ping",
            "-c",
            "2",
            "-W",
            "2",
            "10.99.2.1",
        ]);
    }

    // Same peers again: nothing is touched (a re-added peer would have zero counters).
    let before = device(&if_a).peers[0].stats.rx_bytes;
    assert!(before > 0);
    set_peers(&host_a, &wa, peers_a.clone());
    let dev = device(&if_a);
    assert_eq!(dev.peers.len(), 1);
    assert!(
        dev.peers[0].stats.rx_bytes >= before,
        "unchanged peer was re-added"
    );

    // Changed allowed IPs: removed and re-added (fresh counters), the child survives it.
    set_peers(
        &host_a,
        &wa,
        vec![peer(&key_b, "192.168.77.2:51820", &[net_b, net_b2])],
    );
    let dev = device(&if_a);
    assert_eq!(dev.peers.len(), 1);
    let mut ips: Vec<String> = dev.peers[0]
        .config
        .allowed_ips
        .iter()
        .map(|a| format!("{}/{}", a.address, a.cidr))
        .collect();
    ips.sort();
    assert_eq!(ips, ["10.99.2.0/24", "10.99.3.0/24"]);
    assert_eq!(dev.peers[0].stats.rx_bytes, 0, "peer was changed in place");
    assert_eq!(child_pid(&if_a), Some(pid_a));
    assert!(child_alive(pid_a, &if_a));
    assert!(tcp_echo(
        &ns_a,
        &ns_b,
        to_b,
        &marker,
        Duration::from_secs(8)
    ));

    // No peers: no traffic. Then back.
    set_peers(&host_a, &wa, vec![]);
    assert!(device(&if_a).peers.is_empty());
    assert!(!tcp_echo(
        &ns_a,
        &ns_b,
        to_b,
        &marker,
        Duration::from_secs(2)
    ));
    set_peers(&host_a, &wa, peers_a.clone());
    assert!(tcp_echo(
        &ns_a,
        &ns_b,
        to_b,
        &marker,
        Duration::from_secs(8)
    ));

    // The child dies: the supervisor starts a new one and gives it key, port and peers; the
    // persistent TUN kept its addresses and routes.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_a),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let if_a2 = if_a.clone();
    let new_pid = host_a.run(async move {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(p) = child_pid(&if_a2).filter(|p| *p != pid_a) {
                let name: InterfaceName = if_a2.parse().unwrap();
                let configured = Device::get(&name, wireguard_control::Backend::Userspace)
                    .is_ok_and(|d| d.peers.len() == 1 && d.listen_port == Some(PORT));
                if configured {
                    return p;
                }
            }
            assert!(Instant::now() < deadline, "child was not restarted");
        }
    });
    assert!(child_alive(new_pid, &if_a));
    let addrs = run(&["ip", "-n", &ns_a, "addr", "show", "dev", &if_a]);
    assert!(addrs.contains("10.99.1.1/24"), "{addrs}");
    assert!(tcp_echo(
        &ns_a,
        &ns_b,
        to_b,
        &marker,
        Duration::from_secs(8)
    ));

    // The agent goes away (handle dropped) and comes back: the running child is adopted.
    drop(wa);
    let wa = ensure(&host_a, &if_a, &key_a);
    assert_eq!(child_pid(&if_a), Some(new_pid));
    assert!(child_alive(new_pid, &if_a));
    assert_eq!(device(&if_a).peers.len(), 1);
    set_peers(&host_a, &wa, peers_a.clone());
    assert!(tcp_echo(
        &ns_a,
        &ns_b,
        to_b,
        &marker,
        Duration::from_secs(8)
    ));

    // Key rotation on A; B learns A's new public key.
    let key_a2 = generate_key(&keys.path().join("a/wg.key")).unwrap();
    assert_ne!(key_a2.public, key_a.public);
    let (wa2, k) = (wa.clone(), key_a2.clone());
    host_a
        .run(async move { wa2.set_key(&k).await })
        .unwrap_or_else(|e| panic!("set_key: {e}"));
    assert_eq!(own_public_key(&if_a), hex_key(&key_a2));
    set_peers(
        &host_b,
        &wb,
        vec![peer(&key_a2, "192.168.77.1:51820", &[net_a])],
    );
    assert_eq!(
        device(&if_b).peers[0].config.public_key,
        key_a2.public.clone()
    );
    assert!(tcp_echo(
        &ns_a,
        &ns_b,
        to_b,
        &marker,
        Duration::from_secs(8)
    ));

    // Shutdown leaves no child, socket, pid file or link.
    host_a.run(wa.shutdown());
    host_b.run(wb.shutdown());
    for (ns, iface) in [(&ns_a, &if_a), (&ns_b, &if_b)] {
        assert!(!run_dir_file(iface, "sock").exists());
        assert!(!run_dir_file(iface, "pid").exists());
        assert!(!run_ok(&["ip", "-n", ns, "link", "show", "dev", iface]));
    }
    wait_until("children to exit", Duration::from_secs(5), || {
        !child_alive(new_pid, &if_a)
    });
}

#[test]
fn wg_userspace_subcommand_stays_in_foreground_until_sigterm() {
    let pid = std::process::id();
    let ns = format!("rdrwgt-{pid}-s");
    let iface = format!("rwt{pid:x}s");
    let _cleanup = Cleanup {
        netns: vec![ns.clone()],
        ifaces: vec![(ns.clone(), iface.clone())],
    };
    run(&["ip", "netns", "add", &ns]);
    let exe = env!("CARGO_BIN_EXE_rudder-agent");
    // `ip netns exec` execs the command, so this pid is the child's.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns, exe, "wg-userspace", "--iface", &iface])
        .spawn()
        .unwrap();
    let sock = run_dir_file(&iface, "sock");
    let child_pid = child.id() as i32;
    let up = (|| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })();
    if !up {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no socket at {}", sock.display());
    }
    assert!(run_ok(&["ip", "-n", &ns, "link", "show", "dev", &iface]));
    assert!(child.try_wait().unwrap().is_none(), "it did not stay up");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("SIGTERM did not stop it");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(!Path::new(&sock).exists(), "socket left behind");
}

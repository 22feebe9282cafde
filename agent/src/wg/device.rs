//! Rudder's userspace WireGuard device: the `rudder-agent wg-userspace --iface NAME` child,
//! built around boringtun's `noise::Tunn` (handshakes, keys, replay protection) with its own
//! data path and configuration socket.
//!
//! Why not boringtun's `device`: it moves one packet per syscall on both sides (a TUN read or
//! write and a UDP send or receive for each 1420-byte packet), which a profile showed to be
//! ~80 % of its time. Here:
//!
//! - the TUN queue is opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD` (`TUN_F_CSUM`,
//!   `TUN_F_TSO4`): one read returns up to 64 KiB of one TCP flow, cut into MTU-sized packets
//!   by [`super::segment`] and encrypted as a batch under one lock of the peer;
//! - the batch leaves with one `sendmsg` per [`super::batch::gso_batches`] batch
//!   (`UDP_SEGMENT`); the socket has `UDP_GRO`, so one `recvmsg` returns many datagrams
//!   ([`super::batch::gro_split`]), and several receives are decrypted before the TUN is
//!   written;
//! - decrypted TCP segments are merged into super-packets by [`super::coalesce`] and written
//!   with one TUN write each;
//! - the two directions run on two threads (each its own core when there are two), so a
//!   peer's packets stay in order in each direction; a third thread runs boringtun's timers,
//!   a fourth serves the configuration socket ([`super::uapi`]);
//! - a data thread moves what one read returned at once (no waiting for a batch to fill), and
//!   for [`SPIN`] after it last moved a packet it polls instead of blocking, yielding its core
//!   to anything runnable, so a request/response exchange does not pay a wake-up of a halted
//!   vCPU per packet.
//!
//! Every offload falls back on its own when the kernel refuses it (the TUN's, `UDP_GRO`,
//! `UDP_SEGMENT` on a device without checksum offload), with a log line saying which;
//! `RUDDER_WG_OFFLOAD=0` turns them all off (one packet per syscall, as before). Invariants:
//! a decrypted packet reaches the TUN only if its source is in the sending peer's allowed
//! IPs; nothing is sent in clear; buffers are allocated at start (or grown once), not per
//! packet on the hot path; the socket file is 0600 and the process exits when it is removed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use tracing::{debug, info, warn};

use super::batch::{gro_split, gso_batches};
use super::coalesce::coalesce;
use super::segment::{segment, MAX_PACKET, MAX_SEGMENTS, VNET_HDR_LEN};
use super::uapi::{self, PeerSet, PeerView, Request, SetRequest};

/// Handshakes per second before cookies are asked for (boringtun's device uses the same).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// WireGuard's data overhead: 16 bytes of header, 16 of tag.
const DATA_OVERHEAD: usize = 32;
/// Socket buffers: at the default (~208 KiB) a receiver dropped ~14 % of datagrams under one
/// TCP stream. A full buffer is also a queue a request waits in under load (8 MiB at
/// 4 Gbit/s is up to 16 ms), so `RUDDER_WG_SOCKBUF_KIB` overrides it for measurements.
const UDP_BUFFER: libc::c_int = 8 << 20;
/// Bounds of `RUDDER_WG_SOCKBUF_KIB`.
const SOCKBUF_KIB: std::ops::RangeInclusive<u32> = 64..=65536;
/// The TUN's queueing discipline when the kernel has it ([`super::qdisc`]).
const TUN_QDISC: &str = "fq_codel";
/// How often boringtun's timers run (its device's period).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Bound on a blocking receive, so a changed listen port is picked up.
const RECV_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on one configuration exchange.
const UAPI_TIMEOUT: Duration = Duration::from_secs(3);
/// After one blocking receive, up to this many more that do not block before the TUN is
/// written. None: one `UDP_GRO` receive already holds up to 64 datagrams of one flow, and
/// every packet of a batch waits for the whole batch to be decrypted. (With 7 more receives
/// and 256 packets the bench showed no measurable difference either way, within its noise.)
const RX_EXTRA_READS: usize = 0;
/// Stop reading once this many packets wait for the TUN.
const RX_MAX_PACKETS: usize = 128;
/// After a data thread last moved a packet, it polls (non-blocking reads, yielding the core
/// to anything runnable) this long before it blocks. Why: blocking costs a wake-up per
/// packet, and on a VM an idle vCPU halts, so a wake-up is an interrupt to a halted vCPU:
/// with both data threads blocking, a 64-byte request/response over the tunnel measured
/// ~110 µs at p50 on a quiet 2-vCPU machine against ~20 µs while other work kept the vCPUs
/// awake. A request/response exchange comes back well within this window, so the thread
/// that carries it is still awake; a thread with nothing to do stops polling after it.
/// `RUDDER_WG_SPIN_US` overrides it (`0`: always block, as before).
const SPIN: Duration = Duration::from_micros(50);
/// Upper bound of `RUDDER_WG_SPIN_US`.
const MAX_SPIN_US: u64 = 1000;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;

/// Which offloads to try (`RUDDER_WG_OFFLOAD=0` turns all off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// TUN with `IFF_VNET_HDR` and TSO/checksum offload.
    pub tun: bool,
    /// `UDP_SEGMENT` sends.
    pub gso: bool,
    /// `UDP_GRO` receives.
    pub gro: bool,
}

impl Offloads {
    /// From `RUDDER_WG_OFFLOAD`'s value: unset or `1` for all, `0` for none.
    pub fn parse(v: Option<&str>) -> Result<Offloads, String> {
        let on = match v.map(str::trim) {
            None | Some("") | Some("1") => true,
            Some("0") => false,
            Some(other) => return Err(format!("RUDDER_WG_OFFLOAD={other:?}: expected 0 or 1")),
        };
        Ok(Offloads {
            tun: on,
            gso: on,
            gro: on,
        })
    }
}

/// How long a data thread polls before it blocks ([`SPIN`]), from `RUDDER_WG_SPIN_US`'s
/// value (microseconds, at most [`MAX_SPIN_US`]).
pub fn parse_spin(v: Option<&str>) -> Result<Duration, String> {
    match v.map(str::trim) {
        None | Some("") => Ok(SPIN),
        Some(us) => match us.parse::<u64>() {
            Ok(n) if n <= MAX_SPIN_US => Ok(Duration::from_micros(n)),
            _ => Err(format!(
                "RUDDER_WG_SPIN_US={us:?}: expected microseconds, 0 to {MAX_SPIN_US}"
            )),
        },
    }
}

/// Whether a data thread still polls: it moved a packet less than `spin` ago.
#[derive(Debug, Clone, Copy)]
struct Poller {
    spin: Duration,
    last: Option<std::time::Instant>,
}

impl Poller {
    fn new(spin: Duration) -> Poller {
        Poller { spin, last: None }
    }

    /// A packet moved now.
    fn busy(&mut self) {
        if !self.spin.is_zero() {
            self.last = Some(std::time::Instant::now());
        }
    }

    /// Nothing to read: `true` to try again at once (after yielding the core to anything
    /// runnable), `false` to block.
    fn idle(&mut self) -> bool {
        match self.last {
            Some(t) if t.elapsed() < self.spin => {
                std::thread::yield_now();
                true
            }
            _ => {
                self.last = None;
                false
            }
        }
    }
}

/// The UDP socket buffer size in bytes, from `RUDDER_WG_SOCKBUF_KIB`'s value (unset:
/// [`UDP_BUFFER`]).
pub fn parse_sockbuf(v: Option<&str>) -> Result<libc::c_int, String> {
    match v.map(str::trim) {
        None | Some("") => Ok(UDP_BUFFER),
        Some(k) => match k.parse::<u32>() {
            Ok(n) if SOCKBUF_KIB.contains(&n) => Ok(n as libc::c_int * 1024),
            _ => Err(format!(
                "RUDDER_WG_SOCKBUF_KIB={k:?}: expected KiB, {} to {}",
                SOCKBUF_KIB.start(),
                SOCKBUF_KIB.end()
            )),
        },
    }
}

/// This device's private key and what derives from it.
struct Keys {
    private: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
}

struct Peer {
    key: [u8; 32],
    index: u32,
    state: Mutex<PeerState>,
}

struct PeerState {
    tunn: Tunn,
    endpoint: Option<SocketAddrV4>,
    allowed: Vec<(Ipv4Addr, u8)>,
    keepalive: u16,
}

impl PeerState {
    fn allows(&self, ip: Ipv4Addr) -> bool {
        self.allowed
            .iter()
            .any(|(net, len)| uapi::normalize(ip, *len) == *net)
    }
}

#[derive(Default)]
struct Config {
    keys: Option<Keys>,
    listen_port: u16,
    peers: HashMap<[u8; 32], Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    /// Allowed IPs to peers, longest prefix first.
    routes: Vec<(Ipv4Addr, u8, Arc<Peer>)>,
    next_index: u32,
}

impl Config {
    fn route(&self, dst: Ipv4Addr) -> Option<&Arc<Peer>> {
        self.routes
            .iter()
            .find(|(net, len, _)| uapi::normalize(dst, *len) == *net)
            .map(|(_, _, p)| p)
    }

    fn rebuild_routes(&mut self) {
        let mut routes = Vec::new();
        for p in self.peers.values() {
            let st = lock(&p.state);
            for (net, len) in &st.allowed {
                routes.push((*net, *len, Arc::clone(p)));
            }
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.1));
        self.routes = routes;
    }

    fn new_index(&mut self) -> u32 {
        loop {
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if !self.by_index.contains_key(&self.next_index) {
                return self.next_index;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Device {
    iface: String,
    offloads: Offloads,
    /// How long data threads poll before they block ([`SPIN`]).
    spin: Duration,
    /// UDP socket buffer size ([`UDP_BUFFER`]).
    sockbuf: libc::c_int,
    cfg: RwLock<Config>,
    udp: RwLock<Option<Arc<UdpSocket>>>,
    /// `UDP_SEGMENT` still accepted by the kernel.
    gso: AtomicBool,
    /// The interface's MTU, refreshed by the timer thread.
    mtu: AtomicUsize,
}

impl Device {
    fn udp(&self) -> Option<Arc<UdpSocket>> {
        self.udp.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn cfg(&self) -> std::sync::RwLockReadGuard<'_, Config> {
        self.cfg.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `buf`, datagrams of `lens` bytes back to back, to `to`: batched with
    /// `UDP_SEGMENT` while the kernel accepts it, one by one otherwise.
    fn send_datagrams(&self, udp: &UdpSocket, to: SocketAddrV4, buf: &[u8], lens: &[usize]) {
        let mut off = 0;
        for r in gso_batches(lens) {
            let len: usize = lens[r.clone()].iter().sum();
            let chunk = &buf[off..off + len];
            off += len;
            if r.len() > 1 && self.gso.load(Ordering::Relaxed) {
                match send_msg(udp.as_raw_fd(), to, chunk, Some(lens[r.start] as u16)) {
                    Ok(()) => continue,
                    Err(e) if gso_refused(&e) => {
                        warn!(iface = %self.iface, %e, "UDP_SEGMENT refused; sending datagrams one by one");
                        self.gso.store(false, Ordering::Relaxed);
                    }
                    Err(e) => {
                        debug!(%e, "udp send");
                        continue;
                    }
                }
            }
            let mut o = 0;
            for l in &lens[r] {
                if let Err(e) = send_msg(udp.as_raw_fd(), to, &chunk[o..o + l], None) {
                    debug!(%e, "udp send");
                }
                o += l;
            }
        }
    }
}

/// Whether a `UDP_SEGMENT` send failed because the kernel or the route cannot do it (as
/// opposed to a full buffer or an unreachable peer).
fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP)
    )
}

/// Entry point of the child: runs the device for `iface` until SIGTERM/SIGINT or until its
/// socket file is removed. Returns the exit code. Call before any other thread starts.
pub fn run(iface: &str, socket: &Path) -> i32 {
    let offloads = match Offloads::parse(std::env::var("RUDDER_WG_OFFLOAD").ok().as_deref()) {
        Ok(o) => o,
        Err(msg) => {
            tracing::error!(iface, "{msg}");
            return 2;
        }
    };
    let spin = match parse_spin(std::env::var("RUDDER_WG_SPIN_US").ok().as_deref()) {
        Ok(s) => s,
        Err(msg) => {
            tracing::error!(iface, "{msg}");
            return 2;
        }
    };
    let sockbuf = match parse_sockbuf(std::env::var("RUDDER_WG_SOCKBUF_KIB").ok().as_deref()) {
        Ok(s) => s,
        Err(msg) => {
            tracing::error!(iface, "{msg}");
            return 2;
        }
    };
    // Blocked here, so every thread started below inherits it and only `wait` takes them.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        tracing::error!(iface, %e, "blocking signals");
        return 1;
    }
    let (tun, tun_offload) = match open_tun(iface, offloads.tun) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(iface, %e, "opening the TUN device");
            return 1;
        }
    };
    let offloads = Offloads {
        tun: tun_offload,
        ..offloads
    };
    // Small packets should not wait behind bulk super-packets in the TUN's queue; a kernel
    // without the qdisc keeps its default (said once, here).
    let qdisc = match super::qdisc::set_root(iface, TUN_QDISC) {
        Ok(()) => TUN_QDISC.to_string(),
        Err(e) => {
            info!(iface, %e, "the TUN keeps the kernel's default queueing discipline");
            "default".to_string()
        }
    };
    let listener = match bind_socket(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(iface, socket = %socket.display(), %e, "binding the configuration socket");
            return 1;
        }
    };
    let dev = Arc::new(Device {
        iface: iface.to_string(),
        offloads,
        spin,
        sockbuf,
        cfg: RwLock::new(Config {
            next_index: rand::random::<u32>() & 0x00ff_ffff,
            ..Config::default()
        }),
        udp: RwLock::new(None),
        gso: AtomicBool::new(offloads.gso),
        mtu: AtomicUsize::new(iface_mtu(iface).unwrap_or(MAX_PACKET)),
    });
    let tun = Arc::new(tun);
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new().name(name.into()).spawn(f)
    };
    let started = [
        spawn("wg-tx", {
            let (d, t) = (Arc::clone(&dev), Arc::clone(&tun));
            Box::new(move || tx_loop(&d, &t))
        }),
        spawn("wg-rx", {
            let (d, t) = (Arc::clone(&dev), Arc::clone(&tun));
            Box::new(move || rx_loop(&d, &t))
        }),
        spawn("wg-timers", {
            let (d, s) = (Arc::clone(&dev), socket.to_path_buf());
            Box::new(move || timer_loop(&d, &s))
        }),
        spawn("wg-uapi", {
            let d = Arc::clone(&dev);
            Box::new(move || uapi_loop(&d, listener))
        }),
    ];
    if let Some(Err(e)) = started.into_iter().find(Result::is_err) {
        tracing::error!(iface, %e, "starting threads");
        return 1;
    }
    info!(
        iface,
        pid = std::process::id(),
        tun_offload = offloads.tun,
        udp_gso = offloads.gso,
        udp_gro = offloads.gro,
        spin_us = spin.as_micros() as u64,
        sockbuf_kib = sockbuf / 1024,
        %qdisc,
        "userspace wireguard running"
    );
    let sig = signals.wait();
    info!(iface, signal = ?sig, "userspace wireguard stopping");
    let _ = std::fs::remove_file(socket);
    0
}

/// `struct ifreq`: a name and a 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(iface: &str) -> io::Result<IfReq> {
        if iface.is_empty() || iface.len() >= libc::IFNAMSIZ {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..iface.len()].copy_from_slice(iface.as_bytes());
        Ok(r)
    }
}

/// One queue of the multi-queue TUN device `iface` (created if missing), and whether it has
/// the virtio header with TSO: asked for with `offload`, dropped (with a warning) when the
/// kernel refuses `TUNSETOFFLOAD`.
fn open_tun(iface: &str, offload: bool) -> io::Result<(Tun, bool)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq::new(iface)?;
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE;
    if offload {
        flags |= libc::IFF_VNET_HDR;
    }
    req.data[..2].copy_from_slice(&(flags as libc::c_short).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes), which `req` is, alive
    // and exclusively borrowed for the call; the fd is an open /dev/net/tun.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let set_offload = |bits: libc::c_uint| {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is open and attached.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, bits as libc::c_ulong) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let mut vnet = offload;
    if offload {
        if let Err(e) = set_offload(TUN_F_CSUM | TUN_F_TSO4) {
            warn!(iface, %e, "TUN offloads refused; one packet per read");
            // The virtio header stays (the queue was attached with it) but carries nothing.
            let _ = set_offload(0);
        }
    } else {
        // A previous child may have turned them on, and they are per device.
        set_offload(0)?;
        vnet = false;
    }
    // Reads poll (see [`SPIN`]) and block in `poll(2)`; writes never block on a TUN anyway.
    // SAFETY: F_GETFL/F_SETFL on an open fd we own, with integer arguments.
    unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((Tun { file, vnet }, vnet))
}

/// Blocks until `fd` is readable or `timeout` passes (either way the caller reads again).
fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one live pollfd, exclusively borrowed for the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// The interface's MTU (`SIOCGIFMTU`, so in this process's network namespace).
fn iface_mtu(iface: &str) -> Option<usize> {
    let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
    let mut req = IfReq::new(iface).ok()?;
    // SAFETY: SIOCGIFMTU reads the name and writes an int into the `struct ifreq` `req`,
    // alive and exclusively borrowed for the call.
    let r = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFMTU as _,
            &mut req as *mut IfReq,
        )
    };
    (r == 0)
        .then(|| i32::from_ne_bytes([req.data[0], req.data[1], req.data[2], req.data[3]]))
        .and_then(|m| usize::try_from(m).ok())
        .filter(|m| (68..=MAX_PACKET).contains(m))
}

struct Tun {
    file: File,
    /// Reads and writes carry a `virtio_net_hdr`.
    vnet: bool,
}

impl Tun {
    /// One read into `buf`, always behind a virtio header (a zero one when the queue has
    /// none). Returns the length including the header.
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.vnet {
            (&self.file).read(buf)
        } else {
            buf[..VNET_HDR_LEN].fill(0);
            Ok(VNET_HDR_LEN + (&self.file).read(&mut buf[VNET_HDR_LEN..])?)
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

/// TUN to network: read, cut, encrypt per peer, send in batches.
fn tx_loop(dev: &Device, tun: &Tun) {
    let mut read = vec![0u8; VNET_HDR_LEN + MAX_PACKET];
    let mut segs: Vec<Vec<u8>> = Vec::with_capacity(MAX_SEGMENTS);
    // Every segment plus its overhead, and room for a handshake message.
    let mut out = vec![0u8; MAX_PACKET + MAX_SEGMENTS * DATA_OVERHEAD + 256];
    let mut lens: Vec<usize> = Vec::with_capacity(MAX_SEGMENTS);
    let mut failures = 0u32;
    let mut poller = Poller::new(dev.spin);
    loop {
        let n = match tun.read(&mut read) {
            Ok(n) => {
                failures = 0;
                poller.busy();
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !poller.idle() {
                    wait_readable(tun.file.as_raw_fd(), RECV_TIMEOUT);
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                failures += 1;
                if failures > 100 {
                    tracing::error!(iface = %dev.iface, %e, "TUN reads keep failing; exiting");
                    std::process::exit(1);
                }
                warn!(iface = %dev.iface, %e, "TUN read");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        segs.clear();
        let mtu = dev.mtu.load(Ordering::Relaxed);
        if let Err(e) = segment(&read[..n], mtu, &mut segs) {
            debug!(%e, "dropping a packet from the TUN");
            continue;
        }
        let Some(udp) = dev.udp() else { continue };
        let mut i = 0;
        while i < segs.len() {
            let Some(dst) = dst_v4(&segs[i]) else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < segs.len() && dst_v4(&segs[j]) == Some(dst) {
                j += 1;
            }
            let peer = dev.cfg().route(dst).cloned();
            if let Some(peer) = peer {
                encrypt_and_send(dev, &udp, &peer, &segs[i..j], &mut out, &mut lens);
            }
            i = j;
        }
    }
}

/// The destination of an IPv4 packet.
fn dst_v4(p: &[u8]) -> Option<Ipv4Addr> {
    (p.len() >= 20 && p[0] >> 4 == 4).then(|| Ipv4Addr::new(p[16], p[17], p[18], p[19]))
}

/// The source of an IPv4 packet.
fn src_v4(p: &[u8]) -> Option<Ipv4Addr> {
    (p.len() >= 20 && p[0] >> 4 == 4).then(|| Ipv4Addr::new(p[12], p[13], p[14], p[15]))
}

/// Encrypts `segs` for `peer` under one lock and sends them as batches.
fn encrypt_and_send(
    dev: &Device,
    udp: &UdpSocket,
    peer: &Peer,
    segs: &[Vec<u8>],
    out: &mut [u8],
    lens: &mut Vec<usize>,
) {
    lens.clear();
    let mut off = 0;
    let mut st = lock(&peer.state);
    let Some(to) = st.endpoint else { return };
    for seg in segs {
        if off + seg.len() + DATA_OVERHEAD + 148 > out.len() {
            break;
        }
        match st.tunn.encapsulate(seg, &mut out[off..]) {
            TunnResult::WriteToNetwork(p) if p.first() == Some(&4) => {
                off += p.len();
                lens.push(p.len());
            }
            // A handshake initiation (the segment is queued until the session exists).
            TunnResult::WriteToNetwork(p) => {
                let _ = send_msg(udp.as_raw_fd(), to, p, None);
            }
            TunnResult::Err(e) => debug!(?e, "encapsulate"),
            _ => {}
        }
    }
    drop(st);
    dev.send_datagrams(udp, to, &out[..off], lens);
}

/// Network to TUN: receive (coalesced), decrypt, check the source, coalesce, write.
fn rx_loop(dev: &Device, tun: &Tun) {
    let mut recv = vec![0u8; 1 << 16];
    // Decrypted packets: slot buffers reused across rounds, grown when a datagram is larger.
    let mut slots: Vec<Vec<u8>> = Vec::new();
    let mut pkts: Vec<(usize, usize)> = Vec::with_capacity(RX_MAX_PACKETS);
    let mut scratch = vec![0u8; 2048];
    let mut poller = Poller::new(dev.spin);
    loop {
        let Some(udp) = dev.udp() else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        pkts.clear();
        let mut received = false;
        for round in 0..=RX_EXTRA_READS {
            // While polling, the first receive does not block either.
            let flags = if round == 0 && poller.last.is_none() {
                0
            } else {
                libc::MSG_DONTWAIT
            };
            let (n, from, seg) = match recv_msg(udp.as_raw_fd(), &mut recv, flags) {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    break
                }
                Err(e) => {
                    debug!(%e, "udp receive");
                    break;
                }
            };
            received = true;
            let ranges = match gro_split(n, seg) {
                Ok(r) => r,
                Err(e) => {
                    debug!(%e, "dropping a receive");
                    continue;
                }
            };
            for r in ranges {
                let slot = pkts.len();
                if slot == slots.len() {
                    slots.push(vec![0u8; 2048]);
                }
                if slots[slot].len() < r.len() {
                    slots[slot].resize(r.len(), 0);
                }
                if let Some(len) =
                    receive_one(dev, &udp, from, &recv[r], &mut slots[slot], &mut scratch)
                {
                    pkts.push((slot, len));
                }
            }
            if pkts.len() >= RX_MAX_PACKETS {
                break;
            }
        }
        if received {
            poller.busy();
        } else if poller.last.is_some() {
            // Polling: keep at it until the window closes, then block on the next round.
            poller.idle();
        }
        if pkts.is_empty() {
            continue;
        }
        let packets: Vec<&[u8]> = pkts.iter().map(|(s, l)| &slots[*s][..*l]).collect();
        if tun.vnet {
            for w in coalesce(&packets) {
                if let Err(e) = tun.write(&w) {
                    debug!(%e, "TUN write");
                }
            }
        } else {
            for p in packets {
                if let Err(e) = tun.write(p) {
                    debug!(%e, "TUN write");
                }
            }
        }
    }
}

/// Handles one datagram from `from`: answers handshakes, decrypts data into `slot`. Returns
/// the length of a decrypted IPv4 packet the peer may send (its source in the peer's
/// allowed IPs), to be written to the TUN.
fn receive_one(
    dev: &Device,
    udp: &UdpSocket,
    from: SocketAddrV4,
    dg: &[u8],
    slot: &mut [u8],
    scratch: &mut [u8],
) -> Option<usize> {
    let peer = {
        let cfg = dev.cfg();
        let keys = cfg.keys.as_ref()?;
        match Tunn::parse_incoming_packet(dg).ok()? {
            Packet::HandshakeInit(p) => {
                // Rate-limit (cookie) before the expensive key agreement.
                match keys
                    .limiter
                    .verify_packet(Some((*from.ip()).into()), dg, scratch)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        let _ = send_msg(udp.as_raw_fd(), from, cookie, None);
                        return None;
                    }
                    Err(_) => return None,
                }
                let half = parse_handshake_anon(&keys.private, &keys.public, &p).ok()?;
                cfg.peers.get(&half.peer_static_public)?.clone()
            }
            Packet::HandshakeResponse(p) => cfg.by_index.get(&(p.receiver_idx >> 8))?.clone(),
            Packet::PacketCookieReply(p) => cfg.by_index.get(&(p.receiver_idx >> 8))?.clone(),
            Packet::PacketData(p) => cfg.by_index.get(&(p.receiver_idx >> 8))?.clone(),
        }
    };
    let mut st = lock(&peer.state);
    let result = match st.tunn.decapsulate(Some((*from.ip()).into()), dg, slot) {
        TunnResult::Done => None,
        TunnResult::Err(e) => {
            debug!(?e, "decapsulate");
            return None;
        }
        TunnResult::WriteToNetwork(p) => {
            let _ = send_msg(udp.as_raw_fd(), from, p, None);
            // Packets queued while the handshake was under way.
            while let TunnResult::WriteToNetwork(p) = st.tunn.decapsulate(None, &[], slot) {
                let _ = send_msg(udp.as_raw_fd(), from, p, None);
            }
            None
        }
        TunnResult::WriteToTunnelV4(p, _) => {
            let len = p.len();
            src_v4(&slot[..len])
                .filter(|src| st.allows(*src))
                .map(|_| len)
        }
        TunnResult::WriteToTunnelV6(..) => None,
    };
    // It authenticated: this is where the peer is now (roaming).
    st.endpoint = Some(from);
    result
}

/// boringtun's timers for every peer (handshake retries, keepalives, expiry), the handshake
/// rate limiter's reset, the MTU, and the socket file's presence.
fn timer_loop(dev: &Device, socket: &Path) {
    let mut buf = vec![0u8; 2048];
    let mut tick = 0u64;
    loop {
        std::thread::sleep(TIMER_TICK);
        tick += 1;
        let peers: Vec<Arc<Peer>> = dev.cfg().peers.values().cloned().collect();
        let udp = dev.udp();
        for p in peers {
            let mut st = lock(&p.state);
            let to = st.endpoint;
            if let TunnResult::WriteToNetwork(pkt) = st.tunn.update_timers(&mut buf) {
                if let (Some(to), Some(udp)) = (to, &udp) {
                    let _ = send_msg(udp.as_raw_fd(), to, pkt, None);
                }
            }
        }
        if tick.is_multiple_of(4) {
            if let Some(k) = dev.cfg().keys.as_ref() {
                k.limiter.reset_count();
            }
            if let Some(m) = iface_mtu(&dev.iface) {
                dev.mtu.store(m, Ordering::Relaxed);
            }
            if !socket.exists() {
                info!(iface = %dev.iface, "configuration socket removed; exiting");
                std::process::exit(0);
            }
        }
    }
}

/// Binds the configuration socket (0600). Its directory is made here too (0700), since the
/// `wg-userspace` subcommand may be started without the agent that usually makes it.
fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

fn uapi_loop(dev: &Device, listener: UnixListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(c) => {
                if let Err(e) = serve(dev, c) {
                    debug!(%e, "configuration request");
                }
            }
            Err(e) => {
                warn!(%e, "configuration socket accept");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves requests on one connection until it closes.
fn serve(dev: &Device, conn: UnixStream) -> io::Result<()> {
    conn.set_read_timeout(Some(UAPI_TIMEOUT))?;
    conn.set_write_timeout(Some(UAPI_TIMEOUT))?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn).take(uapi::MAX_REQUEST as u64);
    loop {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                break;
            }
            lines.push(line.to_string());
        }
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let answer = match uapi::parse(&refs) {
            Ok(Request::Get) => format!("{}errno=0\n\n", get(dev)),
            Ok(Request::Set(set)) => match apply(dev, set) {
                Ok(()) => "errno=0\n\n".to_string(),
                Err((errno, msg)) => {
                    warn!(iface = %dev.iface, "refused configuration: {msg}");
                    format!("errno={errno}\n\n")
                }
            },
            Err(msg) => {
                warn!(iface = %dev.iface, "refused configuration: {msg}");
                format!("errno={}\n\n", uapi::EINVAL)
            }
        };
        writer.write_all(answer.as_bytes())?;
    }
}

fn get(dev: &Device) -> String {
    let cfg = dev.cfg();
    let peers: Vec<PeerView> = cfg
        .peers
        .values()
        .map(|p| {
            let st = lock(&p.state);
            let (since, tx, rx, _, _) = st.tunn.stats();
            PeerView {
                key: p.key,
                endpoint: st.endpoint,
                allowed_ips: st.allowed.clone(),
                rx_bytes: rx as u64,
                tx_bytes: tx as u64,
                since_handshake: since,
                keepalive: st.keepalive,
            }
        })
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let public = cfg.keys.as_ref().map(|k| k.public.to_bytes());
    uapi::render_get(public.as_ref(), cfg.listen_port, &peers, now)
}

/// Applies a set request. `Err` is the errno to answer and a message for the log.
fn apply(dev: &Device, set: SetRequest) -> Result<(), (i32, String)> {
    let mut cfg = dev.cfg.write().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = set.private_key {
        let private = StaticSecret::from(k);
        let public = PublicKey::from(&private);
        if cfg.keys.as_ref().map(|k| k.public) != Some(public) {
            let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
            for p in cfg.peers.values() {
                lock(&p.state).tunn.set_static_private(
                    private.clone(),
                    public,
                    Some(Arc::clone(&limiter)),
                );
            }
            cfg.keys = Some(Keys {
                private,
                public,
                limiter,
            });
        }
    }
    if let Some(port) = set.listen_port {
        let have = dev.udp().is_some();
        if !have || cfg.listen_port != port {
            let sock = bind_udp(port, dev.offloads.gro, dev.sockbuf, &dev.iface).map_err(|e| {
                (
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("udp port {port}: {e}"),
                )
            })?;
            cfg.listen_port = sock.local_addr().map(|a| a.port()).unwrap_or(port);
            *dev.udp.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(sock));
        }
    }
    if set.replace_peers {
        cfg.peers.clear();
        cfg.by_index.clear();
    }
    for p in set.peers {
        apply_peer(&mut cfg, p)?;
    }
    cfg.rebuild_routes();
    Ok(())
}

fn apply_peer(cfg: &mut Config, p: PeerSet) -> Result<(), (i32, String)> {
    if p.remove {
        if let Some(old) = cfg.peers.remove(&p.key) {
            cfg.by_index.remove(&old.index);
        }
        return Ok(());
    }
    if let Some(peer) = cfg.peers.get(&p.key) {
        let mut st = lock(&peer.state);
        if let Some(e) = p.endpoint {
            st.endpoint = Some(e);
        }
        if p.replace_allowed_ips {
            st.allowed.clear();
        }
        for a in p.allowed_ips {
            if !st.allowed.contains(&a) {
                st.allowed.push(a);
            }
        }
        if let Some(k) = p.keepalive {
            st.keepalive = k;
        }
        return Ok(());
    }
    if p.update_only {
        return Ok(());
    }
    let Some(keys) = cfg.keys.as_ref() else {
        return Err((
            uapi::EINVAL,
            "a peer before the device's private key".into(),
        ));
    };
    let private = keys.private.clone();
    let limiter = Arc::clone(&keys.limiter);
    let index = cfg.new_index();
    let keepalive = p.keepalive.unwrap_or(0);
    let tunn = Tunn::new(
        private,
        PublicKey::from(p.key),
        None,
        (keepalive > 0).then_some(keepalive),
        index,
        Some(limiter),
    );
    let mut allowed = Vec::new();
    for a in p.allowed_ips {
        if !allowed.contains(&a) {
            allowed.push(a);
        }
    }
    let peer = Arc::new(Peer {
        key: p.key,
        index,
        state: Mutex::new(PeerState {
            tunn,
            endpoint: p.endpoint,
            allowed,
            keepalive,
        }),
    });
    cfg.by_index.insert(index, Arc::clone(&peer));
    cfg.peers.insert(p.key, peer);
    Ok(())
}

/// The device's UDP socket on `port` (all IPv4 addresses), with large buffers and, if asked
/// and the kernel has it, `UDP_GRO`.
fn bind_udp(port: u16, gro: bool, buffer: libc::c_int, iface: &str) -> io::Result<UdpSocket> {
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
    sock.set_read_timeout(Some(RECV_TIMEOUT))?;
    let fd = sock.as_raw_fd();
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        if let Err(e) = setsockopt_int(fd, libc::SOL_SOCKET, opt, buffer) {
            debug!(%e, "enlarging a udp buffer");
        }
    }
    if gro {
        if let Err(e) = setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1) {
            warn!(iface, %e, "UDP_GRO refused; one datagram per receive");
        }
    }
    Ok(sock)
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// One `sendmsg` of `buf` to `to`; with `segment`, as datagrams of that size (`UDP_SEGMENT`).
fn send_msg(fd: RawFd, to: SocketAddrV4, buf: &[u8], segment: Option<u16>) -> io::Result<()> {
    let mut addr = sockaddr(to);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is valid (no name, no iov, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(seg) = segment {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
        // SAFETY: `msg` points at `control`, 32 bytes (8-aligned), enough for one cmsghdr
        // with 2 bytes of data (CMSG_SPACE(2) = 24); CMSG_FIRSTHDR is then non-null and
        // CMSG_DATA points inside `control`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
        }
    }
    // SAFETY: every pointer in `msg` (address, iov over `buf`, control) is live for the call.
    let r = unsafe { libc::sendmsg(fd, &msg, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One `recvmsg` into `buf`: the length, the sender, and the GRO segment size if the kernel
/// coalesced datagrams.
fn recv_msg(
    fd: RawFd,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<(usize, SocketAddrV4, Option<usize>)> {
    // SAFETY: all-zero sockaddr_in and msghdr are valid.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` is live and exclusively borrowed for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut segment = None;
    // SAFETY: the kernel filled `control` up to `msg_controllen`; the CMSG macros walk it
    // within that bound, and CMSG_DATA of a UDP_GRO message holds an int.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                segment = usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    );
    Ok((n as usize, from, segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_switch() {
        assert!(Offloads::parse(None).unwrap().tun);
        assert!(Offloads::parse(Some("1")).unwrap().gso);
        let off = Offloads::parse(Some("0")).unwrap();
        assert!(!off.tun && !off.gso && !off.gro);
        assert!(Offloads::parse(Some("yes")).is_err());
    }

    #[test]
    fn sockbuf_switch() {
        assert_eq!(parse_sockbuf(None).unwrap(), UDP_BUFFER);
        assert_eq!(parse_sockbuf(Some("1024")).unwrap(), 1 << 20);
        assert!(parse_sockbuf(Some("1")).is_err());
        assert!(parse_sockbuf(Some("999999")).is_err());
        assert!(parse_sockbuf(Some("lots")).is_err());
    }

    #[test]
    fn spin_switch() {
        assert_eq!(parse_spin(None).unwrap(), SPIN);
        assert_eq!(parse_spin(Some("0")).unwrap(), Duration::ZERO);
        assert_eq!(parse_spin(Some(" 20 ")).unwrap(), Duration::from_micros(20));
        assert!(parse_spin(Some("1001")).is_err());
        assert!(parse_spin(Some("-1")).is_err());
        // With no window, an idle thread blocks at once.
        let mut p = Poller::new(Duration::ZERO);
        p.busy();
        assert!(!p.idle());
        // Within the window it polls; after it, it blocks.
        let mut p = Poller::new(Duration::from_millis(50));
        assert!(!p.idle(), "nothing moved yet: block");
        p.busy();
        assert!(p.idle());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!p.idle());
        assert!(p.last.is_none());
    }

    #[test]
    fn routes_take_the_longest_prefix() {
        let mut cfg = Config::default();
        let keys = StaticSecret::from([7u8; 32]);
        let public = PublicKey::from(&keys);
        cfg.keys = Some(Keys {
            private: keys,
            public,
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
        });
        let peer = |key: u8, ips: Vec<(Ipv4Addr, u8)>| PeerSet {
            key: [key; 32],
            remove: false,
            update_only: false,
            endpoint: Some("192.168.0.9:51820".parse().unwrap()),
            replace_allowed_ips: false,
            allowed_ips: ips,
            keepalive: None,
        };
        apply_peer(&mut cfg, peer(1, vec![(Ipv4Addr::new(10, 0, 0, 0), 8)])).unwrap();
        apply_peer(&mut cfg, peer(2, vec![(Ipv4Addr::new(10, 2, 0, 0), 16)])).unwrap();
        cfg.rebuild_routes();
        let key_of = |cfg: &Config, ip: [u8; 4]| cfg.route(Ipv4Addr::from(ip)).map(|p| p.key[0]);
        assert_eq!(key_of(&cfg, [10, 2, 3, 4]), Some(2));
        assert_eq!(key_of(&cfg, [10, 3, 3, 4]), Some(1));
        assert_eq!(key_of(&cfg, [11, 0, 0, 1]), None);
        // Removal drops the peer's routes and index.
        let mut rm = peer(2, vec![]);
        rm.remove = true;
        apply_peer(&mut cfg, rm).unwrap();
        cfg.rebuild_routes();
        assert_eq!(key_of(&cfg, [10, 2, 3, 4]), Some(1));
        assert_eq!(cfg.by_index.len(), 1);
        // A peer's allowed IPs decide what it may send.
        let p1 = cfg.peers[&[1u8; 32]].clone();
        assert!(lock(&p1.state).allows(Ipv4Addr::new(10, 200, 0, 1)));
        assert!(!lock(&p1.state).allows(Ipv4Addr::new(192, 168, 0, 1)));
    }

    #[test]
    fn a_peer_before_the_key_is_refused() {
        let mut cfg = Config::default();
        let p = PeerSet {
            key: [1; 32],
            remove: false,
            update_only: false,
            endpoint: None,
            replace_allowed_ips: false,
            allowed_ips: vec![],
            keepalive: None,
        };
        assert!(apply_peer(&mut cfg, p).is_err());
    }
}

//! The real [`HostNet`]: rtnetlink (`netlink-packet-route` messages over a `netlink-sys`
//! socket) for links, addresses, routes, neighbours and forwarding entries, and one `nft -f`
//! transaction per ruleset.
//!
//! The host's socket is opened once per process and kept ([`NetlinkHostNet::shared`]); a
//! container's namespace gets a socket of its own for the time of one apply, made by a
//! short-lived thread that enters the namespace (a netlink socket stays in the namespace it
//! was made in, whatever thread uses it later). Calls are synchronous request/ack exchanges
//! run on the blocking pool; the socket's send and receive timeouts bound each one, and an
//! outer timeout bounds the whole batch.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::rule::{
    RuleAction, RuleAttribute, RuleHeader, RuleMessage, RulePortRange,
};
use netlink_packet_route::{AddressFamily, IpProtocol, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::{
    HostNet, HostNetError, LinkState, NetOp, Ns, Observed, ObservedRoute, Occupancy, Route,
    RouteKind, Rule, OP_TIMEOUT,
};

/// Bound on one `nft -f` run (a large table takes a while to load).
const NFT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest datagram a dump answers with (the kernel sends at most a page-sized chunk or 32k).
const RECV_BUF: usize = 64 * 1024;

/// Host networking over rtnetlink.
pub struct NetlinkHostNet {
    /// The connection to the caller's own namespace ([`Ns::Host`]), by the namespace's inode:
    /// in the agent that is always the host's one; a test that runs hosts on threads in
    /// namespaces of their own gets one per host.
    hosts: Mutex<HashMap<u64, Arc<Conn>>>,
}

static SHARED: Mutex<Option<Arc<NetlinkHostNet>>> = Mutex::new(None);

impl NetlinkHostNet {
    /// The process's one instance (its connections are opened on first use, and a failed
    /// open is retried by the next caller).
    pub fn shared() -> Result<Arc<NetlinkHostNet>, HostNetError> {
        let mut g = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        let h = g.get_or_insert_with(|| {
            Arc::new(NetlinkHostNet {
                hosts: Mutex::new(HashMap::new()),
            })
        });
        Ok(h.clone())
    }

    /// The kept connection to the calling thread's namespace.
    fn host(&self) -> Result<Arc<Conn>, HostNetError> {
        use std::os::unix::fs::MetadataExt;
        let netns_err = |source| HostNetError::Netns {
            ns: "host".into(),
            source,
        };
        let ino = std::fs::metadata("/proc/thread-self/ns/net")
            .map_err(netns_err)?
            .ino();
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = hosts.get(&ino) {
            return Ok(c.clone());
        }
        let c = Arc::new(Conn::new(open_socket().map_err(netns_err)?));
        hosts.insert(ino, c.clone());
        Ok(c)
    }

    /// Runs `f` on the blocking pool against `ns`'s connection, bounded by `budget`.
    async fn blocking<T: Send + 'static>(
        &self,
        ns: &Ns,
        what: String,
        budget: Duration,
        f: impl FnOnce(&Conn) -> Result<T, HostNetError> + Send + 'static,
    ) -> Result<T, HostNetError> {
        // The host's kept connection, or the namespace to open one in (on the blocking pool).
        let (host, path) = match ns {
            Ns::Host => (Some(self.host()?), PathBuf::new()),
            Ns::Path(p) => (None, p.clone()),
        };
        let run = tokio::task::spawn_blocking(move || {
            let conn = match host {
                Some(c) => c,
                None => Arc::new(Conn::new(socket_in(&path).map_err(|source| {
                    HostNetError::Netns {
                        ns: path.display().to_string(),
                        source,
                    }
                })?)),
            };
            f(&conn)
        });
        match tokio::time::timeout(budget, run).await {
            Err(_) => Err(HostNetError::Timeout {
                op: what,
                ns: ns.to_string(),
                after: budget,
            }),
            Ok(Err(e)) => Err(HostNetError::Netns {
                ns: ns.to_string(),
                source: io::Error::other(format!("netlink worker failed: {e}")),
            }),
            Ok(Ok(r)) => r.map_err(|e| in_ns(e, ns)),
        }
    }

    /// The kind of link `name` in the host's namespace (`wireguard`, `tun`, ...), `Ok(None)`
    /// when there is no such link, `Ok(Some(""))` for a link of no kind.
    pub async fn link_kind(&self, name: &str) -> Result<Option<String>, HostNetError> {
        let name = name.to_string();
        let what = format!("link show {name}");
        self.blocking(&Ns::Host, what.clone(), OP_TIMEOUT * 2, move |c| {
            match c.get_link(&name) {
                Ok(Some(m)) => Ok(Some(link_state(&m).1.kind.unwrap_or_default())),
                Ok(None) => Ok(None),
                Err(source) => Err(c.err(&what, &name, source)),
            }
        })
        .await
    }
}

#[async_trait::async_trait]
impl HostNet for NetlinkHostNet {
    async fn observe(&self, ns: &Ns) -> Result<Observed, HostNetError> {
        self.blocking(ns, "observe".into(), OP_TIMEOUT * 3, |c| {
            c.observe().map_err(|source| c.err("observe", "-", source))
        })
        .await
    }

    async fn apply(&self, ns: &Ns, ops: &[NetOp]) -> Result<(), HostNetError> {
        if ops.is_empty() {
            return Ok(());
        }
        let ops = ops.to_vec();
        let budget = OP_TIMEOUT * (ops.len() as u32 + 2);
        let what = format!("{} ops starting with `{}`", ops.len(), ops[0]);
        self.blocking(ns, what, budget, move |c| {
            let mut idx = HashMap::new();
            for op in &ops {
                c.run(op, &mut idx)
                    .map_err(|source| c.err(&op.to_string(), op.link(), source))?;
            }
            Ok(())
        })
        .await
    }

    async fn create_netns(&self, path: &Path) -> Result<(), HostNetError> {
        let p = path.to_path_buf();
        let err = |source| HostNetError::Netns {
            ns: path.display().to_string(),
            source,
        };
        match tokio::time::timeout(
            OP_TIMEOUT,
            tokio::task::spawn_blocking(move || new_netns(&p)),
        )
        .await
        {
            Err(_) => Err(HostNetError::Timeout {
                op: "create netns".into(),
                ns: path.display().to_string(),
                after: OP_TIMEOUT,
            }),
            Ok(Err(e)) => Err(err(io::Error::other(e.to_string()))),
            Ok(Ok(r)) => r.map_err(err),
        }
    }

    async fn move_netns(&self, from: &Path, to: &Path) -> Result<(), HostNetError> {
        let (f, t) = (from.to_path_buf(), to.to_path_buf());
        blocking_ns(from, "move netns", move || move_netns(&f, &t)).await
    }

    async fn occupancy(&self, path: &Path) -> Result<Occupancy, HostNetError> {
        let p = path.to_path_buf();
        blocking_ns(path, "netns occupancy", move || occupancy(&p)).await
    }

    async fn delete_conntrack(
        &self,
        filters: &[super::conntrack::CtFilter],
    ) -> Result<usize, HostNetError> {
        if filters.is_empty() {
            return Ok(0);
        }
        let err = |source| HostNetError::Netlink {
            op: "conntrack delete".into(),
            link: "-".into(),
            ns: Ns::Host.to_string(),
            source,
        };
        // Made here, so in the caller's namespace (the pool's threads may be elsewhere).
        let sock = super::conntrack::open(OP_TIMEOUT).map_err(err)?;
        let filters = filters.to_vec();
        let run =
            tokio::task::spawn_blocking(move || super::conntrack::delete_matching(&sock, &filters));
        // The dump and each deletion are bounded by the socket's timeouts; the whole by this.
        let budget = OP_TIMEOUT * 10;
        match tokio::time::timeout(budget, run).await {
            Err(_) => Err(HostNetError::Timeout {
                op: "conntrack delete".into(),
                ns: Ns::Host.to_string(),
                after: budget,
            }),
            Ok(Err(e)) => Err(err(io::Error::other(format!("netlink worker failed: {e}")))),
            Ok(Ok(r)) => r.map_err(err),
        }
    }

    async fn load_nft(&self, ruleset: &str) -> Result<(), HostNetError> {
        let script = format!("table ip rudder {{}}\ndelete table ip rudder\n{ruleset}");
        let run = async {
            let mut child = tokio::process::Command::new("nft")
                .args(["-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            if let Some(mut w) = child.stdin.take() {
                w.write_all(script.as_bytes()).await?;
            }
            child.wait_with_output().await
        };
        let out = tokio::time::timeout(NFT_TIMEOUT, run)
            .await
            .map_err(|_| HostNetError::Nft(format!("timed out after {}s", NFT_TIMEOUT.as_secs())))?
            .map_err(|e| HostNetError::Nft(e.to_string()))?;
        if !out.status.success() {
            return Err(HostNetError::Nft(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }
}

/// A new network namespace kept alive by a bind mount at `path`: made on a thread of its own
/// (unshare changes the calling thread's namespace), which exits afterwards.
fn new_netns(path: &Path) -> io::Result<()> {
    File::create(path)?;
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &p,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(io::Error::from)
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// Runs `f` on the blocking pool, bounded by [`OP_TIMEOUT`], its errors about namespace `ns`.
async fn blocking_ns<T: Send + 'static>(
    ns: &Path,
    what: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, HostNetError> {
    let err = |source| HostNetError::Netns {
        ns: ns.display().to_string(),
        source,
    };
    match tokio::time::timeout(OP_TIMEOUT, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(HostNetError::Timeout {
            op: what.into(),
            ns: ns.display().to_string(),
            after: OP_TIMEOUT,
        }),
        Ok(Err(e)) => Err(err(io::Error::other(e.to_string()))),
        Ok(Ok(r)) => r.map_err(err),
    }
}

/// Moves the bind mount that keeps a namespace from `from` to `to`: a second bind mount of
/// the same namespace at `to` (a file made 0600), then `from` unmounted and removed. The
/// namespace is referenced throughout, so it never dies in between.
fn move_netns(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    let bound = nix::mount::mount(
        Some(from),
        to,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    );
    if let Err(e) = bound {
        let _ = std::fs::remove_file(to);
        return Err(e.into());
    }
    nix::mount::umount2(from, nix::mount::MntFlags::MNT_DETACH)?;
    std::fs::remove_file(from)
}

/// The `/proc/net` tables that list a namespace's sockets (one header line each).
const SOCKET_TABLES: &[&str] = &[
    "tcp", "tcp6", "udp", "udp6", "udplite", "udplite6", "raw", "raw6", "packet", "unix",
];

/// Who uses the namespace kept at `path`: any process whose `/proc/PID/ns/net` is it, and
/// any socket its `/proc/net` tables list (read by a thread that enters it).
fn occupancy(path: &Path) -> io::Result<Occupancy> {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata(path)?;
    let same = |m: &std::fs::Metadata| m.ino() == me.ino() && m.dev() == me.dev();
    let processes = std::fs::read_dir("/proc")?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .any(|e| std::fs::metadata(e.path().join("ns/net")).is_ok_and(|m| same(&m)));
    let ns = File::open(path)?;
    // In the namespace's thread: whether any of its socket tables lists one.
    let sockets = || -> io::Result<bool> {
        for t in SOCKET_TABLES {
            let f = match File::open(format!("/proc/thread-self/net/{t}")) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut lines = BufReader::new(f).lines();
            lines.next().transpose()?;
            if lines
                .next()
                .transpose()?
                .is_some_and(|l| !l.trim().is_empty())
            {
                return Ok(true);
            }
        }
        Ok(false)
    };
    let (sockets, tcp_seen) = std::thread::spawn(move || -> io::Result<(bool, bool)> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
        Ok((sockets()?, tcp_opens(&snmp) != Some(0)))
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))??;
    Ok(Occupancy {
        processes,
        sockets,
        tcp_seen,
    })
}

/// ActiveOpens + PassiveOpens of a namespace's `/proc/net/snmp` (its TCP connections ever
/// opened, IPv4 and IPv6 alike); `None` if the table does not say.
fn tcp_opens(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let names: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let values: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let get = |k: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == k)?;
        values.get(i)?.parse().ok()
    };
    Some(get("ActiveOpens")? + get("PassiveOpens")?)
}

/// Names the namespace in an error made where it was not known.
fn in_ns(e: HostNetError, in_ns: &Ns) -> HostNetError {
    match e {
        HostNetError::Netlink {
            op,
            link,
            ns,
            source,
        } if ns.is_empty() => HostNetError::Netlink {
            op,
            link,
            ns: in_ns.to_string(),
            source,
        },
        HostNetError::Timeout { op, ns, after } if ns.is_empty() => HostNetError::Timeout {
            op,
            ns: in_ns.to_string(),
            after,
        },
        e => e,
    }
}

/// A netlink socket, bound, connected to the kernel, with send and receive timeouts.
fn open_socket() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_ROUTE)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    set_timeouts(&s, OP_TIMEOUT)?;
    Ok(s)
}

/// Bounds every send and receive on a netlink socket by `t` (SO_SNDTIMEO / SO_RCVTIMEO), so a
/// kernel that never answers becomes a timeout error rather than a hung agent thread.
pub(crate) fn set_timeouts(s: &Socket, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: the fd is a live socket owned by `s`; `tv` is a valid timeval that outlives
        // the call and its size is passed.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A netlink socket inside the namespace kept at `path`: made on a thread of its own that
/// enters the namespace and exits afterwards (the socket stays in it).
fn socket_in(path: &Path) -> io::Result<Socket> {
    let ns = File::open(path)?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        open_socket()
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// One socket and its sequence numbers.
struct Conn {
    sock: Mutex<(Socket, Vec<u8>)>,
    seq: AtomicU32,
}

fn empty_link() -> LinkMessage {
    LinkMessage::default()
}

impl Conn {
    fn new(sock: Socket) -> Conn {
        Conn {
            sock: Mutex::new((sock, Vec::with_capacity(RECV_BUF))),
            seq: AtomicU32::new(1),
        }
    }

    fn err(&self, op: &str, link: &str, source: io::Error) -> HostNetError {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            return HostNetError::Timeout {
                op: op.to_string(),
                ns: String::new(),
                after: OP_TIMEOUT,
            };
        }
        HostNetError::Netlink {
            op: op.to_string(),
            link: link.to_string(),
            ns: String::new(),
            source,
        }
    }

    /// Sends `msg` and collects the answers: until the ack (or refusal) of a request, until
    /// the end of a dump. Answers to earlier requests (one that timed out) are skipped.
    fn exchange(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut g = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let (sock, rbuf) = &mut *g;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            rbuf.clear();
            let n = sock.recv(rbuf, 0)?;
            let n = n.min(rbuf.len());
            let mut off = 0;
            while off < n {
                let b = NetlinkBuffer::new_checked(&rbuf[off..n])
                    .map_err(|e| io::Error::other(format!("netlink reply: {e}")))?;
                let len = b.length() as usize;
                let this_seq = b.sequence_number();
                let frame = &rbuf[off..off + len];
                off += (len + 3) & !3;
                if len == 0 {
                    break;
                }
                if this_seq != seq {
                    continue;
                }
                let parsed = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(frame) {
                    Ok(p) => p,
                    Err(e) => {
                        debug!(%e, "netlink: skipping an answer that does not parse");
                        continue;
                    }
                };
                match parsed.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(i) => out.push(i),
                    _ => {}
                }
            }
        }
    }

    /// Sends a request, tolerating `ok_errno` (what "already so" looks like for it).
    fn request(&self, msg: RouteNetlinkMessage, flags: u16, ok_errno: &[i32]) -> io::Result<()> {
        match self.exchange(msg, flags) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error().is_some_and(|c| ok_errno.contains(&c)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn get_link(&self, name: &str) -> io::Result<Option<LinkMessage>> {
        let mut m = empty_link();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.exchange(RouteNetlinkMessage::GetLink(m), 0) {
            Ok(v) => Ok(v.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The index of link `name`, cached for one apply (links made or removed by it drop out).
    fn index(&self, name: &str, idx: &mut HashMap<String, u32>) -> io::Result<u32> {
        if let Some(i) = idx.get(name) {
            return Ok(*i);
        }
        let i = self
            .get_link(name)?
            .map(|m| m.header.index)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
        idx.insert(name.to_string(), i);
        Ok(i)
    }

    fn observe(&self) -> io::Result<Observed> {
        let mut seen = Observed::default();
        let mut names = HashMap::new();
        for m in self.exchange(RouteNetlinkMessage::GetLink(empty_link()), NLM_F_DUMP)? {
            if let RouteNetlinkMessage::NewLink(l) = m {
                let (name, st) = link_state(&l);
                names.insert(st.index, name.clone());
                seen.links.insert(name, st);
            }
        }
        let mut q = RouteMessage::default();
        q.header.address_family = AddressFamily::Inet;
        for m in self.exchange(RouteNetlinkMessage::GetRoute(q), NLM_F_DUMP)? {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            let mut table = u32::from(r.header.table);
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
                continue;
            }
            let Ok(dst) = Ipv4Net::new(dst, r.header.destination_prefix_length) else {
                continue;
            };
            seen.routes.push(ObservedRoute {
                dst,
                kind: match r.header.kind {
                    RouteType::Unicast => RouteKind::Unicast,
                    RouteType::Unreachable => RouteKind::Unreachable,
                    _ => RouteKind::Other,
                },
                dev: oif.and_then(|i| names.get(&i).cloned()),
                proto: u8::from(r.header.protocol),
            });
        }
        Ok(seen)
    }

    fn run(&self, op: &NetOp, idx: &mut HashMap<String, u32>) -> io::Result<()> {
        let create = NLM_F_CREATE | NLM_F_EXCL;
        let replace = NLM_F_CREATE | NLM_F_REPLACE;
        match op {
            NetOp::AddBridge { name } => {
                let m = new_link(name, vec![LinkInfo::Kind(InfoKind::Bridge)]);
                self.request(RouteNetlinkMessage::NewLink(m), create, &[libc::EEXIST])
            }
            NetOp::AddWireguard { name } => {
                let m = new_link(name, vec![LinkInfo::Kind(InfoKind::Wireguard)]);
                self.request(RouteNetlinkMessage::NewLink(m), create, &[libc::EEXIST])
            }
            NetOp::AddTun { name } => match add_tun(name) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
                r => r,
            },
            NetOp::AddVxlan { name, vni, port } => {
                let m = new_link(
                    name,
                    vec![
                        LinkInfo::Kind(InfoKind::Vxlan),
                        LinkInfo::Data(InfoData::Vxlan(vec![
                            InfoVxlan::Id(*vni),
                            InfoVxlan::Port(*port),
                            InfoVxlan::Learning(false),
                        ])),
                    ],
                );
                self.request(RouteNetlinkMessage::NewLink(m), create, &[libc::EEXIST])
            }
            NetOp::AddVxlanFrom {
                name,
                vni,
                port,
                local,
            } => {
                let m = new_link(
                    name,
                    vec![
                        LinkInfo::Kind(InfoKind::Vxlan),
                        LinkInfo::Data(InfoData::Vxlan(vec![
                            InfoVxlan::Id(*vni),
                            InfoVxlan::Local(*local),
                            InfoVxlan::Port(*port),
                            InfoVxlan::Learning(false),
                        ])),
                    ],
                );
                self.request(RouteNetlinkMessage::NewLink(m), create, &[libc::EEXIST])
            }
            NetOp::ReplaceTableRoute { table, route } => {
                let mut m = self.route_message(route, false, idx)?;
                set_table(&mut m, *table);
                self.request(RouteNetlinkMessage::NewRoute(m), replace, &[])
            }
            NetOp::AddRule(r) => self.request(
                RouteNetlinkMessage::NewRule(rule_message(r)),
                create,
                &[libc::EEXIST],
            ),
            NetOp::DelRule(r) => self.request(
                RouteNetlinkMessage::DelRule(rule_message(r)),
                0,
                &[libc::ENOENT],
            ),
            NetOp::AddVeth {
                name,
                mtu,
                peer,
                peer_ns,
            } => {
                // Kept open until the kernel has answered.
                let ns_file = peer_ns.as_deref().map(File::open).transpose()?;
                let mut p = empty_link();
                p.attributes.push(LinkAttribute::IfName(peer.clone()));
                if let Some(m) = mtu {
                    p.attributes.push(LinkAttribute::Mtu(*m));
                }
                if let Some(f) = &ns_file {
                    p.attributes.push(LinkAttribute::NetNsFd(f.as_raw_fd()));
                }
                let mut m = new_link(
                    name,
                    vec![
                        LinkInfo::Kind(InfoKind::Veth),
                        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
                    ],
                );
                if let Some(mtu) = mtu {
                    m.attributes.push(LinkAttribute::Mtu(*mtu));
                }
                idx.remove(name);
                let r = self.request(RouteNetlinkMessage::NewLink(m), create, &[]);
                drop(ns_file);
                r
            }
            NetOp::DelLink { name } => {
                idx.remove(name);
                let mut m = empty_link();
                m.attributes.push(LinkAttribute::IfName(name.clone()));
                self.request(RouteNetlinkMessage::DelLink(m), 0, &[libc::ENODEV])
            }
            NetOp::SetLink { name, set } => {
                let mut m = empty_link();
                m.header.index = self.index(name, idx)?;
                if let Some(up) = set.up {
                    m.header.change_mask = LinkFlags::Up;
                    if up {
                        m.header.flags = LinkFlags::Up;
                    }
                }
                if let Some(master) = &set.master {
                    m.attributes
                        .push(LinkAttribute::Controller(self.index(master, idx)?));
                }
                if let Some(mac) = &set.mac {
                    m.attributes.push(LinkAttribute::Address(mac.to_vec()));
                }
                if let Some(mtu) = set.mtu {
                    m.attributes.push(LinkAttribute::Mtu(mtu));
                }
                if let Some(q) = set.txqlen {
                    m.attributes.push(LinkAttribute::TxQueueLen(q));
                }
                self.request(RouteNetlinkMessage::SetLink(m), 0, &[])
            }
            NetOp::FlushAddrs { dev } => {
                let index = self.index(dev, idx)?;
                let mut q = AddressMessage::default();
                q.header.family = AddressFamily::Inet;
                for m in self.exchange(RouteNetlinkMessage::GetAddress(q), NLM_F_DUMP)? {
                    if let RouteNetlinkMessage::NewAddress(a) = m {
                        if a.header.index == index {
                            self.request(
                                RouteNetlinkMessage::DelAddress(a),
                                0,
                                &[libc::EADDRNOTAVAIL],
                            )?;
                        }
                    }
                }
                Ok(())
            }
            NetOp::ReplaceAddr { dev, addr, prefix } => {
                let mut m = AddressMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.prefix_len = *prefix;
                m.header.index = self.index(dev, idx)?;
                m.attributes
                    .push(AddressAttribute::Local(IpAddr::V4(*addr)));
                m.attributes
                    .push(AddressAttribute::Address(IpAddr::V4(*addr)));
                self.request(RouteNetlinkMessage::NewAddress(m), replace, &[])
            }
            NetOp::ReplaceRoute(r) => {
                let m = self.route_message(r, false, idx)?;
                self.request(RouteNetlinkMessage::NewRoute(m), replace, &[])
            }
            NetOp::DelRoute(r) => {
                let m = match self.route_message(r, true, idx) {
                    Ok(m) => m,
                    // Its device is gone, and the route with it.
                    Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
                    Err(e) => return Err(e),
                };
                self.request(RouteNetlinkMessage::DelRoute(m), 0, &[libc::ESRCH])
            }
            NetOp::ReplaceNeigh { dev, ip, mac } => {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.ifindex = self.index(dev, idx)?;
                m.header.state = NeighbourState::Permanent;
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*ip)));
                m.attributes
                    .push(NeighbourAttribute::LinkLocalAddress(mac.to_vec()));
                self.request(RouteNetlinkMessage::NewNeighbour(m), replace, &[])
            }
            NetOp::ReplaceFdb { dev, mac, dst } => {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = self.index(dev, idx)?;
                m.header.state = NeighbourState::Permanent;
                m.header.flags = NeighbourFlags::Own;
                m.attributes
                    .push(NeighbourAttribute::LinkLocalAddress(mac.to_vec()));
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        *dst,
                    )));
                self.request(RouteNetlinkMessage::NewNeighbour(m), replace, &[])
            }
            NetOp::Sysctl { key, value } => {
                let path = PathBuf::from("/proc/sys").join(key);
                if let Err(e) = std::fs::write(&path, value) {
                    debug!(path = %path.display(), %e, "sysctl");
                }
                Ok(())
            }
        }
    }

    /// The message of a route, as `ip route` builds it: a route without a gateway is on the
    /// link; a deletion matches any scope.
    fn route_message(
        &self,
        r: &Route,
        delete: bool,
        idx: &mut HashMap<String, u32>,
    ) -> io::Result<RouteMessage> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = r.dst.prefix_len();
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::from(r.proto);
        m.header.kind = match (r.kind, delete) {
            (RouteKind::Unreachable, _) => RouteType::Unreachable,
            (_, true) => RouteType::Unspec,
            _ => RouteType::Unicast,
        };
        m.header.scope = if delete {
            RouteScope::NoWhere
        } else if r.scope_link || (r.kind == RouteKind::Unicast && r.via.is_none()) {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        if r.onlink {
            m.header.flags = RouteFlags::Onlink;
        }
        if r.dst.prefix_len() > 0 {
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(
                    r.dst.network(),
                )));
        }
        if let Some(via) = r.via {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(via)));
        }
        if let Some(dev) = &r.dev {
            m.attributes
                .push(RouteAttribute::Oif(self.index(dev, idx)?));
        }
        Ok(m)
    }
}

/// The table number a header carries when the real one (in an attribute) does not fit.
const RT_TABLE_COMPAT: u8 = 252;

/// Puts a route message into routing table `table` (the header holds 8 bits, the attribute
/// all 32).
fn set_table(m: &mut RouteMessage, table: u32) {
    m.header.table = u8::try_from(table).unwrap_or(RT_TABLE_COMPAT);
    m.attributes.push(RouteAttribute::Table(table));
}

/// The message of a policy routing rule, as `ip rule` builds it.
fn rule_message(r: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header = RuleHeader {
        family: AddressFamily::Inet,
        table: u8::try_from(r.table).unwrap_or(RT_TABLE_COMPAT),
        action: RuleAction::ToTable,
        ..Default::default()
    };
    m.attributes.push(RuleAttribute::Priority(r.priority));
    m.attributes.push(RuleAttribute::Table(r.table));
    if let Some(mark) = r.fwmark {
        m.attributes.push(RuleAttribute::FwMark(mark));
        m.attributes.push(RuleAttribute::FwMask(u32::MAX));
    }
    if let Some(iif) = &r.iif {
        m.attributes.push(RuleAttribute::Iifname(iif.clone()));
    }
    if let Some((start, end)) = r.udp_dports {
        m.attributes
            .push(RuleAttribute::IpProtocol(IpProtocol::Udp));
        m.attributes
            .push(RuleAttribute::DestinationPortRange(RulePortRange {
                start,
                end,
            }));
    }
    m
}

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags (the rest of the union unused).
#[repr(C)]
struct TunReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// Makes a persistent multi-queue TUN device `name` in the calling thread's namespace, as
/// `ip tuntap add dev NAME mode tun multi_queue` does: attach to `/dev/net/tun` under that
/// name, mark it persistent, let go. An existing device of another kind answers EBUSY/EINVAL.
fn add_tun(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = TunReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `tun` is an open /dev/net/tun; TUNSETIFF reads and writes a `struct ifreq`
    // (40 bytes), which `req` is, alive and exclusively borrowed for the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req as *mut TunReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes its argument by value; the fd is still open and attached.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn new_link(name: &str, info: Vec<LinkInfo>) -> LinkMessage {
    let mut m = empty_link();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m.attributes.push(LinkAttribute::LinkInfo(info));
    m
}

/// A link's name and state from its message.
fn link_state(l: &LinkMessage) -> (String, LinkState) {
    let mut name = String::new();
    let mut st = LinkState {
        index: l.header.index,
        up: l.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Mtu(m) => st.mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        st.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    (name, st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostnet::plan::{self, Veth, RTPROT_RUDDER};
    use crate::hostnet::LinkSet;

    #[test]
    fn tcp_opens_are_read_from_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 2 64\n\
                    Tcp: RtoAlgorithm RtoMin ActiveOpens PassiveOpens AttemptFails\n\
                    Tcp: 1 200 3 4 0\n";
        assert_eq!(tcp_opens(snmp), Some(7));
        assert_eq!(tcp_opens(&snmp.replace(" 3 4 ", " 0 0 ")), Some(0));
        assert_eq!(tcp_opens("Ip: a\nIp: 1\n"), None);
    }

    /// Every kind of op against the kernel, inside namespaces this test makes (nothing of the
    /// host's is touched). Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for the namespaces).
    #[tokio::test]
    async fn ops_reach_the_kernel_inside_a_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let net = NetlinkHostNet::shared().unwrap();
        net.create_netns(&a).await.unwrap();
        net.create_netns(&b).await.unwrap();
        let ns = Ns::Path(a.clone());
        let gw: Ipv4Addr = "10.77.1.1".parse().unwrap();
        let mut ops = plan::local_bridge("tbr0", gw, 24);
        // Again: idempotent.
        ops.extend(plan::local_bridge("tbr0", gw, 24));
        ops.push(NetOp::AddVxlan {
            name: "tvx0".into(),
            vni: 77,
            port: 4789,
        });
        ops.push(NetOp::AddVxlan {
            name: "tvx0".into(),
            vni: 77,
            port: 4789,
        });
        ops.push(NetOp::SetLink {
            name: "tvx0".into(),
            set: LinkSet {
                up: Some(true),
                mtu: Some(1450),
                mac: Some([2, 77, 10, 77, 1, 1]),
                ..Default::default()
            },
        });
        let peer_gw: Ipv4Addr = "10.77.2.1".parse().unwrap();
        ops.push(NetOp::ReplaceNeigh {
            dev: "tvx0".into(),
            ip: peer_gw,
            mac: [2, 77, 10, 77, 2, 1],
        });
        ops.push(NetOp::ReplaceFdb {
            dev: "tvx0".into(),
            mac: [2, 77, 10, 77, 2, 1],
            dst: "192.0.2.2".parse().unwrap(),
        });
        ops.push(NetOp::ReplaceRoute(Route {
            onlink: true,
            ..Route::via("10.77.2.0/24".parse().unwrap(), Some(peer_gw), "tvx0")
        }));
        let unreachable = Route {
            dst: "10.78.0.0/16".parse().unwrap(),
            kind: RouteKind::Unreachable,
            via: None,
            dev: None,
            scope_link: false,
            onlink: false,
            proto: RTPROT_RUDDER,
        };
        ops.push(NetOp::ReplaceRoute(unreachable.clone()));
        net.apply(&ns, &ops).await.unwrap();
        // A container in namespace b, on the bridge of namespace a.
        let veth = Veth {
            host: "tveth0".into(),
            inside: "eth0".into(),
            mtu: Some(1400),
            master: "tbr0".into(),
            addr: "10.77.1.2".parse().unwrap(),
            prefix: 32,
            routes: plan::overlay_veths(
                &["x".into()],
                &["10.77.1.2".parse().unwrap()],
                &[rudder_model::network::NetworkView {
                    id: "n".into(),
                    name: "n".into(),
                    subnet: "10.77.0.0/16".parse().unwrap(),
                    encrypted: false,
                    internal: false,
                    vni: 77,
                    mtu: 1400,
                    local_slice: "10.77.1.0/24".parse().unwrap(),
                    gateway: gw,
                    services: vec![],
                }],
                0,
            )
            .remove(0)
            .routes,
        };
        let p = plan::attach(&b, &[veth]);
        // Twice: the second deletes the first's pair and makes it again.
        for _ in 0..2 {
            net.apply(&ns, &p.host).await.unwrap();
            net.apply(&Ns::Path(b.clone()), &p.inside).await.unwrap();
        }
        let seen_a = net.observe(&ns).await.unwrap();
        assert_eq!(seen_a.links["tbr0"].kind.as_deref(), Some("bridge"));
        assert!(seen_a.links["tbr0"].up);
        assert_eq!(seen_a.links["tvx0"].kind.as_deref(), Some("vxlan"));
        assert_eq!(seen_a.links["tvx0"].mtu, 1450);
        assert_eq!(seen_a.links["tveth0"].kind.as_deref(), Some("veth"));
        assert!(!seen_a.links.contains_key("eth0"), "{seen_a:?}");
        let has = |seen: &Observed, dst: &str, kind: RouteKind, dev: Option<&str>| {
            seen.routes
                .iter()
                .any(|r| r.dst.to_string() == dst && r.kind == kind && r.dev.as_deref() == dev)
        };
        assert!(has(
            &seen_a,
            "10.77.2.0/24",
            RouteKind::Unicast,
            Some("tvx0")
        ));
        assert!(has(&seen_a, "10.78.0.0/16", RouteKind::Unreachable, None));
        let seen_b = net.observe(&Ns::Path(b.clone())).await.unwrap();
        assert_eq!(seen_b.links["eth0"].mtu, 1400);
        assert!(seen_b.links["eth0"].up && seen_b.links["lo"].up);
        assert!(has(&seen_b, "0.0.0.0/0", RouteKind::Unicast, Some("eth0")));
        assert!(has(
            &seen_b,
            "10.77.0.0/16",
            RouteKind::Unicast,
            Some("eth0")
        ));
        assert!(has(
            &seen_b,
            "10.77.1.1/32",
            RouteKind::Unicast,
            Some("eth0")
        ));

        // Deletions, twice (the second finds nothing and is fine with it).
        let del = vec![
            NetOp::DelRoute(unreachable),
            NetOp::DelRoute(Route::via("10.77.2.0/24".parse().unwrap(), None, "tvx0")),
            NetOp::DelLink {
                name: "tveth0".into(),
            },
        ];
        net.apply(&ns, &del).await.unwrap();
        net.apply(&ns, &del).await.unwrap();
        let seen_a = net.observe(&ns).await.unwrap();
        assert!(!seen_a.links.contains_key("tveth0"));
        assert!(!has(&seen_a, "10.78.0.0/16", RouteKind::Unreachable, None));
        assert!(!has(
            &seen_a,
            "10.77.2.0/24",
            RouteKind::Unicast,
            Some("tvx0")
        ));
        let seen_b = net.observe(&Ns::Path(b.clone())).await.unwrap();
        assert!(!seen_b.links.contains_key("eth0"), "the peer goes with it");

        // A refusal names the op, the link and the namespace.
        let e = net
            .apply(
                &ns,
                &[NetOp::SetLink {
                    name: "nosuch0".into(),
                    set: LinkSet::default(),
                }],
            )
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("link set nosuch0") && text.contains(&a.display().to_string()),
            "{text}"
        );
        crate::net::remove_netns(&a);
        crate::net::remove_netns(&b);
    }
}

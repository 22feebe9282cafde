//! Host networking as plan and apply.
//!
//! What the host's links, addresses, routes and neighbours should be is worked out by pure
//! planners ([`plan`]): they take what is wanted and what was observed and return a list of
//! [`NetOp`]s, and are table-tested without root. A [`HostNet`] executes such a list in one
//! network namespace: [`netlink::NetlinkHostNet`] over rtnetlink sockets (one kept open for the
//! host's namespace, one opened inside a container's namespace for the time of an apply), and
//! [`fake::FakeHostNet`] records what it was asked for tests.
//!
//! Invariants:
//! - Every op is idempotent on the kernel's side: links of a kind are created if missing and
//!   changed in place otherwise, addresses and routes are replaced, deletions of what is
//!   already gone succeed. A pass can therefore be re-run after any failure or agent restart.
//! - Names, not indices, travel in ops: an index is resolved by the executor at the moment of
//!   the call, so a plan never holds a stale one.
//! - No kernel or socket call can hang the agent: each one is bounded by [`OP_TIMEOUT`] and
//!   none blocks an async worker thread.

// The recording fake (STYLE 9), for tests only; no test drives it yet.
pub mod conntrack;
#[cfg(test)]
#[allow(dead_code)]
pub mod fake;
pub mod netlink;
pub mod plan;

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;

/// Bound on every single netlink exchange, namespace switch or `nft` run.
pub const OP_TIMEOUT: Duration = Duration::from_secs(3);

/// Route protocol `ip route` gives to routes it adds (RTPROT_BOOT); ours, unless told.
pub const RTPROT_BOOT: u8 = 3;
/// Route protocol of the routes the kernel makes itself (an address's subnet).
pub const RTPROT_KERNEL: u8 = 2;

/// A MAC address.
pub type Mac = [u8; 6];

/// Formats a MAC the way `ip` prints it.
pub fn fmt_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A network namespace: the agent's own (the host's), or one kept at a path (a container's,
/// see `net::Overlay::netns_path`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ns {
    Host,
    Path(PathBuf),
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ns::Host => f.write_str("host"),
            Ns::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Link attributes to change; `None` leaves one as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkSet {
    pub up: Option<bool>,
    pub mtu: Option<u32>,
    /// The bridge the link becomes a port of.
    pub master: Option<String>,
    pub mac: Option<Mac>,
    pub txqlen: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKind {
    Unicast,
    /// Packets to it fail with "no route" (an encrypted subnet never leaves in clear).
    Unreachable,
    /// Any other type, as observed (local, broadcast, ...); never planned.
    Other,
}

/// An IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub kind: RouteKind,
    pub via: Option<Ipv4Addr>,
    pub dev: Option<String>,
    /// Scope link (a directly reachable destination) instead of universe.
    pub scope_link: bool,
    /// The gateway is on the link even though no address's subnet says so.
    pub onlink: bool,
    /// Route protocol, marking whose route it is (see [`RTPROT_BOOT`]).
    pub proto: u8,
}

impl Route {
    /// A unicast route to `dst` through `dev`, optionally via a gateway.
    pub fn via(dst: Ipv4Net, via: Option<Ipv4Addr>, dev: &str) -> Route {
        Route {
            dst,
            kind: RouteKind::Unicast,
            via,
            dev: Some(dev.to_string()),
            scope_link: false,
            onlink: false,
            proto: RTPROT_BOOT,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == RouteKind::Unreachable {
            f.write_str("unreachable ")?;
        }
        write!(f, "{}", self.dst)?;
        if let Some(v) = self.via {
            write!(f, " via {v}")?;
        }
        if let Some(d) = &self.dev {
            write!(f, " dev {d}")?;
        }
        if self.scope_link {
            f.write_str(" scope link")?;
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        if self.proto != RTPROT_BOOT {
            write!(f, " proto {}", self.proto)?;
        }
        Ok(())
    }
}

/// An IPv4 policy routing rule: packets that match every selector given look up `table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub priority: u32,
    /// The packet's mark (all 32 bits).
    pub fwmark: Option<u32>,
    /// The input interface (`lo` for what the host itself sends).
    pub iif: Option<String>,
    /// UDP to a destination port in this range (inclusive).
    pub udp_dports: Option<(u16, u16)>,
    pub table: u32,
}

/// `ip rule`-like text.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "priority {}", self.priority)?;
        if let Some(i) = &self.iif {
            write!(f, " iif {i}")?;
        }
        if let Some(m) = self.fwmark {
            write!(f, " fwmark {m:#x}")?;
        }
        if let Some((lo, hi)) = self.udp_dports {
            write!(f, " ipproto udp dport {lo}-{hi}")?;
        }
        write!(f, " lookup {}", self.table)
    }
}

/// One change to a namespace's network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetOp {
    /// A bridge, made if missing.
    AddBridge {
        name: String,
    },
    /// A VXLAN device without learning (the forwarding entries are ours), made if missing.
    AddVxlan {
        name: String,
        vni: u32,
        port: u16,
    },
    /// A VXLAN device like [`NetOp::AddVxlan`] whose packets leave from address `local`
    /// (the routing mesh's device: its packets travel inside a network's own tunnel).
    AddVxlanFrom {
        name: String,
        vni: u32,
        port: u16,
        local: Ipv4Addr,
    },
    /// A kernel WireGuard device (fails where the kernel has no WireGuard).
    AddWireguard {
        name: String,
    },
    /// A persistent multi-queue TUN device (for userspace WireGuard), made if missing. Made by
    /// an ioctl on `/dev/net/tun`, so always in the agent's own namespace.
    AddTun {
        name: String,
    },
    /// A veth pair; `peer` is made directly inside `peer_ns` (under its final name there),
    /// so it never appears in this namespace. Fails if `name` exists.
    AddVeth {
        name: String,
        mtu: Option<u32>,
        peer: String,
        peer_ns: Option<PathBuf>,
    },
    /// Deletes a link (a veth takes its peer along); nothing if it is gone already.
    DelLink {
        name: String,
    },
    SetLink {
        name: String,
        set: LinkSet,
    },
    /// Deletes every IPv4 address of a link.
    FlushAddrs {
        dev: String,
    },
    /// Adds an address, or replaces the same one.
    ReplaceAddr {
        dev: String,
        addr: Ipv4Addr,
        prefix: u8,
    },
    ReplaceRoute(Route),
    /// Deletes a route; nothing if it is gone already.
    DelRoute(Route),
    /// A permanent ARP entry.
    ReplaceNeigh {
        dev: String,
        ip: Ipv4Addr,
        mac: Mac,
    },
    /// A permanent forwarding entry of a VXLAN device: frames for `mac` go to `dst`.
    ReplaceFdb {
        dev: String,
        mac: Mac,
        dst: Ipv4Addr,
    },
    /// Adds or replaces a route of routing table `table` (not the main one).
    ReplaceTableRoute {
        table: u32,
        route: Route,
    },
    /// Adds a policy routing rule; nothing if the same rule exists.
    AddRule(Rule),
    /// Deletes a policy routing rule; nothing if it is gone already.
    DelRule(Rule),
    /// Writes `/proc/sys/<key>` (best effort: a missing key is logged, not an error).
    Sysctl {
        key: String,
        value: String,
    },
}

impl NetOp {
    /// The link the op is about, for errors.
    pub fn link(&self) -> &str {
        match self {
            NetOp::AddBridge { name }
            | NetOp::AddVxlan { name, .. }
            | NetOp::AddVxlanFrom { name, .. }
            | NetOp::AddWireguard { name }
            | NetOp::AddTun { name }
            | NetOp::AddVeth { name, .. }
            | NetOp::DelLink { name }
            | NetOp::SetLink { name, .. } => name,
            NetOp::ReplaceAddr { dev, .. }
            | NetOp::FlushAddrs { dev }
            | NetOp::ReplaceNeigh { dev, .. }
            | NetOp::ReplaceFdb { dev, .. } => dev,
            NetOp::ReplaceRoute(r)
            | NetOp::DelRoute(r)
            | NetOp::ReplaceTableRoute { route: r, .. } => r.dev.as_deref().unwrap_or("-"),
            NetOp::AddRule(r) | NetOp::DelRule(r) => r.iif.as_deref().unwrap_or("-"),
            NetOp::Sysctl { key, .. } => key,
        }
    }
}

/// `ip`-like text, for errors and logs.
impl fmt::Display for NetOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetOp::AddBridge { name } => write!(f, "link add {name} type bridge"),
            NetOp::AddVxlan { name, vni, port } => write!(
                f,
                "link add {name} type vxlan id {vni} dstport {port} nolearning"
            ),
            NetOp::AddVxlanFrom {
                name,
                vni,
                port,
                local,
            } => write!(
                f,
                "link add {name} type vxlan id {vni} local {local} dstport {port} nolearning"
            ),
            NetOp::AddWireguard { name } => write!(f, "link add {name} type wireguard"),
            NetOp::AddTun { name } => write!(f, "tuntap add dev {name} mode tun multi_queue"),
            NetOp::AddVeth {
                name,
                mtu,
                peer,
                peer_ns,
            } => {
                write!(f, "link add {name}")?;
                if let Some(m) = mtu {
                    write!(f, " mtu {m}")?;
                }
                write!(f, " type veth peer name {peer}")?;
                if let Some(ns) = peer_ns {
                    write!(f, " netns {}", ns.display())?;
                }
                Ok(())
            }
            NetOp::DelLink { name } => write!(f, "link del {name}"),
            NetOp::SetLink { name, set } => {
                write!(f, "link set {name}")?;
                if let Some(m) = &set.master {
                    write!(f, " master {m}")?;
                }
                if let Some(mac) = &set.mac {
                    write!(f, " address {}", fmt_mac(mac))?;
                }
                if let Some(m) = set.mtu {
                    write!(f, " mtu {m}")?;
                }
                if let Some(q) = set.txqlen {
                    write!(f, " txqueuelen {q}")?;
                }
                match set.up {
                    Some(true) => f.write_str(" up"),
                    Some(false) => f.write_str(" down"),
                    None => Ok(()),
                }
            }
            NetOp::ReplaceAddr { dev, addr, prefix } => {
                write!(f, "addr replace {addr}/{prefix} dev {dev}")
            }
            NetOp::FlushAddrs { dev } => write!(f, "addr flush dev {dev}"),
            NetOp::ReplaceRoute(r) => write!(f, "route replace {r}"),
            NetOp::DelRoute(r) => write!(f, "route del {r}"),
            NetOp::ReplaceNeigh { dev, ip, mac } => write!(
                f,
                "neigh replace {ip} lladdr {} dev {dev} nud permanent",
                fmt_mac(mac)
            ),
            NetOp::ReplaceFdb { dev, mac, dst } => write!(
                f,
                "fdb replace {} dev {dev} dst {dst} self permanent",
                fmt_mac(mac)
            ),
            NetOp::ReplaceTableRoute { table, route } => {
                write!(f, "route replace {route} table {table}")
            }
            NetOp::AddRule(r) => write!(f, "rule add {r}"),
            NetOp::DelRule(r) => write!(f, "rule del {r}"),
            NetOp::Sysctl { key, value } => write!(f, "sysctl {key}={value}"),
        }
    }
}

/// A link as observed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkState {
    pub index: u32,
    /// `bridge`, `vxlan`, `veth`, `wireguard`, `tun`, ... (none for a plain device).
    pub kind: Option<String>,
    pub up: bool,
    pub mtu: u32,
}

/// A route of the main table as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRoute {
    pub dst: Ipv4Net,
    pub kind: RouteKind,
    pub dev: Option<String>,
    pub proto: u8,
}

/// What a namespace holds: its links by name and its IPv4 main-table routes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub links: BTreeMap<String, LinkState>,
    pub routes: Vec<ObservedRoute>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    /// The kernel refused an op (or the socket failed while asking).
    #[error("hostnet: `{op}` (link {link}) in {ns}: {source}")]
    Netlink {
        op: String,
        link: String,
        ns: String,
        source: std::io::Error,
    },
    #[error("hostnet: `{op}` in {ns}: timed out after {}s", .after.as_secs())]
    Timeout {
        op: String,
        ns: String,
        after: Duration,
    },
    #[error("hostnet: namespace {ns}: {source}")]
    Netns { ns: String, source: std::io::Error },
    #[error("hostnet: `{op}`: no link named {link} in {ns}")]
    NoLink {
        op: String,
        link: String,
        ns: String,
    },
    #[error("hostnet: nft: {0}")]
    Nft(String),
}

impl HostNetError {
    /// The kernel's errno, when the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            HostNetError::Netlink { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Who still uses a network namespace, besides its bind mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Occupancy {
    /// A process lives in it (a task still running there, one sharing it).
    pub processes: bool,
    /// A socket of it is open somewhere (TCP in any state, UDP, raw, packet, unix).
    pub sockets: bool,
    /// A TCP connection was ever opened in it: the kernel keeps per-destination TCP metrics
    /// (who it talked to) that would carry over.
    pub tcp_seen: bool,
}

/// The port through which the agent changes host networking.
#[async_trait::async_trait]
pub trait HostNet: Send + Sync {
    /// Links and IPv4 main-table routes of `ns`.
    async fn observe(&self, ns: &Ns) -> Result<Observed, HostNetError>;
    /// Runs `ops` in order in `ns`; stops at the first failure.
    async fn apply(&self, ns: &Ns, ops: &[NetOp]) -> Result<(), HostNetError>;
    /// Replaces nftables table `ip rudder` with `ruleset` in one transaction.
    async fn load_nft(&self, ruleset: &str) -> Result<(), HostNetError>;
    /// Makes a new network namespace, kept alive by a bind mount at `path` (a file it
    /// creates), for [`Ns::Path`].
    async fn create_netns(&self, path: &std::path::Path) -> Result<(), HostNetError>;
    /// Moves the namespace kept at `from` to `to` (a file it creates): `from` is gone after.
    async fn move_netns(
        &self,
        from: &std::path::Path,
        to: &std::path::Path,
    ) -> Result<(), HostNetError>;
    /// Whether a process or a socket still uses the namespace kept at `path`.
    async fn occupancy(&self, path: &std::path::Path) -> Result<Occupancy, HostNetError>;
    /// Deletes the host namespace's conntrack entries that match any of `filters` (Rudder's
    /// own translations to departed backends, see [`conntrack`]); returns how many went.
    async fn delete_conntrack(
        &self,
        filters: &[conntrack::CtFilter],
    ) -> Result<usize, HostNetError>;
}

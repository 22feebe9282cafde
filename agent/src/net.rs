//! The host's side of the overlay networks: bridges, tunnels (WireGuard or VXLAN), routes,
//! nftables, the embedded DNS servers, and each networked container's namespace.
//!
//! The controller sends a [`NetworkMap`] whenever it changes; [`Overlay`] makes the host match
//! it, idempotently, in one reconcile pass (re-run after any agent restart, so nothing depends
//! on what a previous agent process did). The addressing is routed (see
//! `rudder_model::network`): every container has a /32 on each network's interface and reaches
//! everything through its host's bridge, which holds the slice's gateway address. All traffic
//! between containers is therefore routed by a host, so one nftables table per host does the
//! VIP balancing, the isolation between networks, the routing mesh and published ports, and
//! conntrack sees both directions of every connection.
//!
//! Names (Linux allows 15 bytes): bridge `rdb-<net8>`, VXLAN `rdx-<net8>`, WireGuard
//! `rwg-<node8>`, host end of a container's veth `rdv<task10><i>`. A container's namespace is
//! a bind mount at `<data>/netns/<task id>`, so it outlives the agent like the container does.
//!
//! What to change is planned by pure functions (`hostnet::plan`) and executed through the
//! [`HostNet`] port: rtnetlink for links, addresses, routes and neighbours (no process on a
//! container's start path), and one `nft -f` transaction per pass for the nftables table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use rudder_model::network::{NetworkMap, NetworkView, PublishedPort};
use rudder_model::ports::Protocol;
use rudder_model::Task;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::dns::{DnsServer, DnsView, ServiceRecord};
use crate::hostnet::netlink::NetlinkHostNet;
use crate::hostnet::plan::{self, OverlayWanted, Veth};
use crate::hostnet::{HostNet, HostNetError, LinkSet, Mac, NetOp, Ns, Route};
use crate::netpool::{NetnsPool, PoolConfig};
use crate::shim::ContainerDir;
use crate::wg::{KeyPair, Wg, WgPeer};

/// Present in the agent's data dir when IPv4 forwarding was off before the agent turned it
/// on (see [`Overlay::enable_forwarding`]).
pub const FORWARD_MARKER: &str = "ip_forward.rudder";
/// UDP port of VXLAN (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// Connection mark of connections that arrived through the routing mesh (see [`crate::mesh`]).
const MARK_INGRESS: u32 = crate::mesh::MARK_INGRESS;
/// Connection mark of connections to a port published in host mode.
const MARK_HOSTPORT: u32 = 0x5245;

/// Why a host network change failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The kernel refused a link, address, route or rule change.
    #[error("network: {0}")]
    Host(#[from] HostNetError),
    /// A network's DNS server could not start.
    #[error("network: dns on {addr}: {source}")]
    Dns {
        /// The address it was to listen on.
        addr: SocketAddr,
        /// The underlying error.
        source: crate::dns::DnsError,
    },
    /// The local bridge has no address left.
    #[error("network: no free address in the local bridge's {subnet}")]
    BridgeFull {
        /// The bridge's subnet.
        subnet: Ipv4Net,
    },
    /// WireGuard could not be configured.
    #[error("network: {0}")]
    Wg(#[from] crate::wg::WgError),
    /// A file operation failed.
    #[error("network: {op}: {err}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The underlying error.
        err: std::io::Error,
    },
    /// A task needs a network this host has not set up yet.
    #[error("network: task {task}: network {network:?} is not (yet) on this host")]
    NotReady {
        /// The task.
        task: String,
        /// The network's name.
        network: String,
    },
}

/// The name of a network's bridge (`rdb-<id prefix>`).
pub fn bridge_name(net_id: &str) -> String {
    format!("rdb-{}", &net_id[..net_id.len().min(8)])
}
/// The name of a network's VXLAN device (`rdx-<id prefix>`).
pub fn vxlan_name(net_id: &str) -> String {
    format!("rdx-{}", &net_id[..net_id.len().min(8)])
}
/// The name of the WireGuard interface (`rwg-<node id prefix>`).
pub fn wg_name(node_id: &str) -> String {
    format!("rwg-{}", &node_id[..node_id.len().min(8)])
}
pub(crate) fn veth_name(task_id: &str, i: usize) -> String {
    format!("rdv{}{i}", &task_id[..task_id.len().min(10)])
}

/// The VXLAN device MAC of the host whose gateway in the network is `gw`: derived, so no MAC
/// needs to travel through the controller.
pub(crate) fn vtep_mac(vni: u32, gw: Ipv4Addr) -> Mac {
    let o = gw.octets();
    [0x02, vni as u8, o[0], o[1], o[2], o[3]]
}

/// The tunnel that carries network `n` between hosts: the host's WireGuard interface `wg`
/// for an encrypted network, the network's own VXLAN device otherwise.
pub(crate) fn tunnel_of(n: &NetworkView, wg: &str) -> String {
    if n.encrypted {
        wg.to_string()
    } else {
        vxlan_name(&n.id)
    }
}

/// The nftables table for `map`: VIPs, the routing mesh, host-mode ports, isolation between
/// networks, and outbound NAT. `wg` is this host's WireGuard interface (used only when an
/// encrypted network exists). `forward_drop` makes the forward chain's policy drop (when
/// this agent is what made the host a router: see [`Overlay::enable_forwarding`]); either
/// way, nothing goes through Rudder's interfaces that a rule here did not accept. Pure, so it
/// is unit-tested as text.
///
/// Isolation invariants: a network's packets enter a host only through its own bridge or its
/// own tunnel ([`tunnel_of`]), with a source address in its own subnet (checked before
/// conntrack's `established` shortcut, so a forged packet cannot ride another network's flow);
/// VXLAN is decapsulated only from the cluster's hosts, and no container can send VXLAN to them.
pub fn ruleset(
    map: &NetworkMap,
    wg: &str,
    bridge: Option<&LocalBridge>,
    forward_drop: bool,
) -> String {
    let mut pre = Vec::new();
    let mut out_nat = Vec::new();
    let mut post = Vec::new();
    let mut fwd = Vec::new();
    let nets: BTreeMap<&str, &NetworkView> =
        map.networks.iter().map(|n| (n.id.as_str(), n)).collect();
    let bridges: Vec<String> = map.networks.iter().map(|n| bridge_name(&n.id)).collect();
    let tunnels: Vec<String> = map
        .networks
        .iter()
        .map(|n| tunnel_of(n, wg))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // The routing mesh's devices and rules (see `crate::mesh`).
    let mesh_nets = crate::mesh::networks(map, |n| tunnel_of(n, wg));
    let mesh = crate::mesh::rules(&mesh_nets, &bridges);
    let overlay_ifaces: Vec<String> = bridges
        .iter()
        .chain(&tunnels)
        .chain(&mesh.devices)
        .cloned()
        .collect();
    // Cluster hosts' underlay addresses: the only senders of VXLAN we decapsulate.
    let peer_addrs: Vec<String> = map
        .peers
        .iter()
        .map(|p| p.underlay.to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Anti-spoofing, ahead of everything in forward and input: what comes out of a network's
    // bridge or tunnel carries that network's addresses (the WireGuard interface carries
    // every encrypted network's, each peer held to its own slices by its allowed IPs).
    let mut spoof = Vec::new();
    let enc_subnets: Vec<String> = map
        .networks
        .iter()
        .filter(|n| n.encrypted)
        .map(|n| n.subnet.to_string())
        .collect();
    for n in &map.networks {
        spoof.push(format!(
            "iifname \"{}\" ip saddr != {} drop",
            bridge_name(&n.id),
            n.subnet
        ));
        if !n.encrypted {
            let vx = vxlan_name(&n.id);
            spoof.push(format!("iifname \"{vx}\" ip saddr != {} drop", n.subnet));
            spoof.push(format!("iifname \"{vx}\" ip daddr != {} drop", n.subnet));
        }
    }
    if !enc_subnets.is_empty() {
        spoof.push(format!(
            "iifname \"{wg}\" ip saddr != {{ {} }} drop",
            enc_subnets.join(", ")
        ));
    }
    if let Some(b) = bridge {
        spoof.push(format!(
            "iifname \"{BRIDGE}\" ip saddr != {} drop",
            b.subnet
        ));
    }
    spoof.extend(mesh.spoof.iter().cloned());
    let quoted = |names: &[String]| {
        names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let subnets: Vec<String> = map.networks.iter().map(|n| n.subnet.to_string()).collect();
    // Internal networks: nothing leaves them, so nothing of theirs is masqueraded.
    let open_subnets: Vec<String> = map
        .networks
        .iter()
        .filter(|n| !n.internal)
        .map(|n| n.subnet.to_string())
        .collect();
    let mut input = Vec::new();
    let mut walls = Vec::new();
    let numgen = |backends: &[String]| {
        if backends.len() == 1 {
            backends[0].clone()
        } else {
            let items: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {b}"))
                .collect();
            format!(
                "numgen random mod {} map {{ {} }}",
                backends.len(),
                items.join(", ")
            )
        }
    };
    // Each network's resolver (on its gateway) takes queries from its own members only, who
    // reach it through their bridge; everyone else's are dropped (L3).
    let mut dns_in = Vec::new();
    for n in &map.networks {
        for proto in ["udp", "tcp"] {
            dns_in.push(format!(
                "iifname \"{}\" ip saddr {} ip daddr {} {proto} dport 53 accept",
                bridge_name(&n.id),
                n.subnet,
                n.gateway
            ));
        }
    }
    let gateways: Vec<String> = map.networks.iter().map(|n| n.gateway.to_string()).collect();
    if !gateways.is_empty() {
        for proto in ["udp", "tcp"] {
            dns_in.push(format!(
                "ip daddr {{ {} }} {proto} dport 53 drop",
                gateways.join(", ")
            ));
        }
    }
    for n in &map.networks {
        let br = bridge_name(&n.id);
        for s in &n.services {
            let (Some(vip), false) = (s.vip, s.tasks.is_empty()) else {
                continue;
            };
            let backends: Vec<String> = s.tasks.iter().map(|t| t.to_string()).collect();
            pre.push(format!(
                "iifname \"{br}\" ip daddr {vip} dnat to {}",
                numgen(&backends)
            ));
        }
        // Between containers: only within a network, arriving from its local bridge or from
        // its own tunnel (filtered by the sending host, by the anti-spoofing rules above, and
        // for WireGuard by each peer's allowed IPs) — never from another network's tunnel.
        // Out of the bridge, only to the bridge itself or to the network's own tunnel: an
        // encrypted network's packet never leaves in clear, whatever the routes say.
        fwd.push(format!(
            "iifname \"{br}\" oifname {{ \"{br}\", \"{}\" }} ip saddr {s} ip daddr {s} accept",
            tunnel_of(n, wg),
            s = n.subnet
        ));
        fwd.push(format!(
            "iifname \"{}\" oifname \"{br}\" ip saddr {} ip daddr {} accept",
            tunnel_of(n, wg),
            n.subnet,
            n.local_slice
        ));
        if n.internal {
            // Nowhere else: not another network, not the underlay, not the internet, not
            // through a published port (checked before the port marks are accepted, and after
            // DNAT, so the real destination counts), and never under another source address.
            // Matched by interface: a task may forge its source.
            // (Its source address is checked with every network's, ahead of the chain.)
            walls.push(format!(
                "iifname \"{br}\" ip daddr != {s} drop",
                s = n.subnet
            ));
            // Of the hosts, only the local resolver on the gateway (accepted above, with every
            // network's): nothing of this host, and nothing of another host reached through a
            // tunnel at its gateway address.
            input.push(format!("iifname \"{br}\" drop"));
            input.push(format!("ip saddr {} drop", n.subnet));
        }
    }
    let published = |p: &PublishedPort, mark: u32, rules: &mut Vec<String>, local: &str| {
        if p.backends.is_empty() {
            return;
        }
        let proto = match p.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let backends: Vec<String> = p
            .backends
            .iter()
            .map(|b| format!("{b} . {}", p.target))
            .collect();
        let target = if backends.len() == 1 {
            format!("{}:{}", p.backends[0], p.target)
        } else {
            numgen(&backends)
        };
        let ip_kw = if backends.len() == 1 { "" } else { "ip " };
        rules.push(format!(
            "{local}fib daddr type local {proto} dport {} ct mark set {mark:#x} dnat {ip_kw}to {target}",
            p.published
        ));
    };
    let local_out = "ip daddr != 127.0.0.0/8 ";
    for p in &map.ingress {
        published(p, MARK_INGRESS, &mut pre, "");
        published(p, MARK_INGRESS, &mut out_nat, local_out);
    }
    let bridge_ports = bridge.map(|b| b.ports.as_slice()).unwrap_or_default();
    for p in map.host_ports.iter().chain(bridge_ports) {
        published(p, MARK_HOSTPORT, &mut pre, "");
        published(p, MARK_HOSTPORT, &mut out_nat, local_out);
    }
    // The client's address reaches a replica on this host unchanged: the replica's replies are
    // routed by this host, whose conntrack undoes the DNAT. Mesh connections to another host's
    // replica leave from the gateway of the backends' network, so the replies come back
    // through this host (which undoes both translations). An internal network's connections
    // always do: its replicas may route outside addresses through another network.
    let mut snat_nets: BTreeSet<&str> = BTreeSet::new();
    for p in &map.ingress {
        snat_nets.insert(p.network.as_str());
    }
    for id in snat_nets {
        if let Some(n) = nets.get(id) {
            post.push(mesh_snat(n, &crate::mesh::device_name(&n.id)));
        }
    }
    // Nothing bound for an encrypted subnet is masqueraded (it leaves only through WireGuard,
    // or not at all).
    if !enc_subnets.is_empty() {
        post.push(format!("ip daddr {{ {} }} return", enc_subnets.join(", ")));
    }
    if let Some(b) = bridge {
        post.push(format!(
            "ip saddr {} oifname != \"{BRIDGE}\" masquerade",
            b.subnet
        ));
        // Other networks do not get in (published ports were accepted above by their mark).
        fwd.push(format!("oifname \"{BRIDGE}\" iifname != \"{BRIDGE}\" drop"));
    }
    if !open_subnets.is_empty() {
        post.push(format!(
            "ip saddr {{ {} }} oifname != {{ {} }} masquerade",
            open_subnets.join(", "),
            quoted(&overlay_ifaces)
        ));
    }
    if !subnets.is_empty() {
        fwd.push(format!("ip daddr {{ {} }} drop", subnets.join(", ")));
    }
    // The ways out (masqueraded above): from a network that has one, or the local bridge,
    // with its own addresses, to anything that is not an overlay.
    let mut ours = overlay_ifaces.clone();
    if let Some(b) = bridge {
        ours.push(BRIDGE.to_string());
        fwd.push(format!(
            "iifname \"{BRIDGE}\" ip saddr {} oifname != {{ {} }} accept",
            b.subnet,
            quoted(&ours)
        ));
    }
    for n in map.networks.iter().filter(|n| !n.internal) {
        fwd.push(format!(
            "iifname \"{}\" ip saddr {} oifname != {{ {} }} accept",
            bridge_name(&n.id),
            n.subnet,
            quoted(&ours)
        ));
    }
    // Nothing else passes through Rudder's interfaces, in or out (L7).
    if !ours.is_empty() {
        fwd.push(format!("iifname {{ {} }} drop", quoted(&ours)));
        fwd.push(format!("oifname {{ {} }} drop", quoted(&ours)));
    }
    let mut t = String::new();
    t.push_str("table ip rudder {\n");
    let chain = |t: &mut String, name: &str, head: &str, rules: &[String]| {
        t.push_str(&format!("  chain {name} {{\n    {head}\n"));
        for r in rules {
            t.push_str(&format!("    {r}\n"));
        }
        t.push_str("  }\n");
    };
    chain(
        &mut t,
        "prerouting",
        "type nat hook prerouting priority dstnat; policy accept;",
        &pre,
    );
    chain(
        &mut t,
        "output",
        "type nat hook output priority -100; policy accept;",
        &out_nat,
    );
    if !mesh.prerouting.is_empty() {
        chain(
            &mut t,
            "mesh",
            "type filter hook prerouting priority -90; policy accept;",
            &mesh.prerouting,
        );
    }
    chain(
        &mut t,
        "postrouting",
        "type nat hook postrouting priority srcnat; policy accept;",
        &post,
    );
    let mut forward = spoof.clone();
    // And a VXLAN device carries only its own network (never an encrypted one's addresses).
    for n in map.networks.iter().filter(|n| !n.encrypted) {
        forward.push(format!(
            "oifname \"{}\" ip daddr != {} drop",
            vxlan_name(&n.id),
            n.subnet
        ));
    }
    if !peer_addrs.is_empty() {
        // A container (masqueraded to this host's address) never sends VXLAN to the cluster.
        forward.push(format!(
            "ip daddr {{ {} }} udp dport {VXLAN_PORT} drop",
            peer_addrs.join(", ")
        ));
    }
    forward.extend(mesh.forward_head.iter().cloned());
    forward.push("ct state established,related accept".to_string());
    forward.extend(mesh.forward.iter().cloned());
    forward.extend(walls);
    forward.push(format!(
        "ct mark {{ {MARK_INGRESS:#x}, {MARK_HOSTPORT:#x} }} accept"
    ));
    forward.extend(fwd);
    let policy = if forward_drop { "drop" } else { "accept" };
    chain(
        &mut t,
        "forward",
        &format!("type filter hook forward priority filter; policy {policy};"),
        &forward,
    );
    // The host itself (and host-network containers) may answer containers (DNS) and use
    // published ports, but not open connections into the overlays.
    let mut local = vec![
        "ct state established,related accept".to_string(),
        format!("ct mark {{ {MARK_INGRESS:#x}, {MARK_HOSTPORT:#x} }} accept"),
    ];
    local.extend(mesh.output.iter().cloned());
    if !subnets.is_empty() {
        local.push(format!(
            "oifname {{ {} }} ip daddr {{ {} }} drop",
            quoted(&overlay_ifaces),
            subnets.join(", ")
        ));
    }
    if !map.networks.is_empty() {
        // VXLAN is decapsulated (by the kernel, after this hook) only from the cluster's hosts.
        let mut head = spoof;
        head.push(if peer_addrs.is_empty() {
            format!("udp dport {VXLAN_PORT} drop")
        } else {
            format!(
                "udp dport {VXLAN_PORT} ip saddr != {{ {} }} drop",
                peer_addrs.join(", ")
            )
        });
        head.extend(mesh.input.iter().cloned());
        head.push("ct state established,related accept".to_string());
        head.append(&mut dns_in);
        head.append(&mut input);
        input = head;
    }
    if !input.is_empty() {
        chain(
            &mut t,
            "input",
            "type filter hook input priority filter; policy accept;",
            &input,
        );
    }
    chain(
        &mut t,
        "output_filter",
        "type filter hook output priority filter; policy accept;",
        &local,
    );
    t.push_str("}\n");
    t
}

/// The routing mesh's source NAT for network `n`: to its local gateway, for the connections
/// that leave through the network's tunnel (a replica elsewhere answers, reached without the
/// mesh device `dev`); all of them on an internal network.
fn mesh_snat(n: &NetworkView, dev: &str) -> String {
    let remote = if n.internal {
        String::new()
    } else {
        format!(" oifname != {{ \"{}\", \"{dev}\" }}", bridge_name(&n.id))
    };
    format!(
        "ct mark {MARK_INGRESS:#x} ip daddr {}{remote} snat to {}",
        n.subnet, n.gateway
    )
}

/// What a network's resolver answers: each service under its name and its aliases (names
/// are case-insensitive; a service's own name wins over another's alias).
fn dns_view(n: &NetworkView) -> DnsView {
    let record = |s: &rudder_model::network::ServiceEndpoints| ServiceRecord {
        vip: s.vip,
        tasks: s.tasks.clone(),
    };
    let mut services = BTreeMap::new();
    for s in &n.services {
        for a in &s.aliases {
            services.insert(a.to_lowercase(), record(s));
        }
    }
    for s in &n.services {
        services.insert(s.name.to_lowercase(), record(s));
    }
    DnsView { services }
}

/// The host's local bridge (`network_mode: bridge`): Docker's `docker0`, one per host, not
/// routed between hosts.
pub const BRIDGE: &str = "rdr0";
/// The local bridge's subnet unless configured otherwise.
pub const DEFAULT_BRIDGE_SUBNET: &str = "172.31.0.0/16";

/// The local bridge's rules: its subnet and the host-mode ports of the tasks on it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalBridge {
    /// Its subnet.
    pub subnet: Ipv4Net,
    /// The host-mode ports published by tasks on it.
    pub ports: Vec<PublishedPort>,
}

/// What the reconcile pass last did, to skip unchanged work.
#[derive(Default)]
struct Applied {
    nft: String,
    networks: BTreeMap<String, NetworkView>,
    dns: HashMap<String, DnsServer>,
    peers: Vec<WgPeer>,
    /// The last pass had no network to plan and found nothing of an earlier one to remove.
    host_clean: bool,
    /// The map the last full pass applied without error: while it stays the same, a pass
    /// woken by the local bridge (a task joining or leaving it) only redoes the nftables
    /// table, the one thing bridge members change.
    map: Option<NetworkMap>,
}

/// This host's side of the overlay networks: it makes the host match the last network map.
pub struct Overlay {
    node_id: String,
    data_dir: PathBuf,
    agent_exe: PathBuf,
    wg_port: u16,
    key: Mutex<(KeyPair, u64)>,
    /// (public key, epoch) for the session to send up after a rotation.
    key_tx: watch::Sender<(String, u64)>,
    map_tx: watch::Sender<Option<NetworkMap>>,
    /// The last map applied without error (containers wait for their networks here).
    applied_tx: watch::Sender<Option<NetworkMap>>,
    wg: tokio::sync::Mutex<Option<Wg>>,
    upstreams: Vec<SocketAddr>,
    bridge_subnet: Ipv4Net,
    /// Who is on the local bridge (serialises its address allocation too).
    bridge: Mutex<BridgeTable>,
    /// Executes the planned changes (rtnetlink; a fake in tests).
    net: Arc<dyn HostNet>,
    /// `/proc/sys` (a directory of the test's in tests): where IPv4 forwarding is turned on.
    proc_sys: PathBuf,
    /// Bumped when a bridge task comes or goes (its published ports are in the nft table).
    bridge_tx: watch::Sender<u64>,
    /// Namespaces made ahead of time for the local bridge's tasks.
    pool: Arc<NetnsPool>,
    /// The local bridge was made (or found) by an attach, which then skip it.
    bridge_made: std::sync::atomic::AtomicBool,
}

impl Overlay {
    /// Loads (or makes) this host's WireGuard key and starts the reconcile loop.
    pub fn start(
        data_dir: &Path,
        node_id: &str,
        wg_port: u16,
        agent_exe: PathBuf,
    ) -> Result<Arc<Overlay>, NetError> {
        let net = NetlinkHostNet::shared()?;
        Self::start_with(
            data_dir,
            node_id,
            wg_port,
            agent_exe,
            net,
            "/proc/sys".into(),
        )
    }

    /// [`Overlay::start`] over a given [`HostNet`], with `/proc/sys` at `proc_sys`.
    pub fn start_with(
        data_dir: &Path,
        node_id: &str,
        wg_port: u16,
        agent_exe: PathBuf,
        net: Arc<dyn HostNet>,
        proc_sys: PathBuf,
    ) -> Result<Arc<Overlay>, NetError> {
        let pool = PoolConfig::default();
        let key = crate::wg::load_or_create_key(&data_dir.join("wg.key"))?;
        let epoch = std::fs::read_to_string(data_dir.join("wg.epoch"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        std::fs::create_dir_all(crate::rundir::netns_dir(data_dir)).map_err(|err| {
            NetError::Io {
                op: "create netns dir",
                err,
            }
        })?;
        crate::rundir::drop_legacy_pool(data_dir);
        let (key_tx, _) = watch::channel((key.public.to_base64(), epoch));
        let (map_tx, map_rx) = watch::channel(None);
        let (applied_tx, _) = watch::channel(None);
        let (bridge_tx, bridge_rx) = watch::channel(0);
        let upstreams = std::fs::read_to_string("/etc/resolv.conf")
            .map(|t| crate::dns::upstreams_from_resolv_conf(&t))
            .unwrap_or_default();
        let pool = NetnsPool::new(
            net.clone(),
            Ns::Host,
            BRIDGE,
            &crate::rundir::pool_dir(data_dir),
            pool,
        )
        .map_err(|err| NetError::Io {
            op: "create netns pool dir",
            err,
        })?;
        let o = Arc::new(Overlay {
            node_id: node_id.to_string(),
            data_dir: data_dir.to_path_buf(),
            agent_exe,
            wg_port,
            key: Mutex::new((key, epoch)),
            key_tx,
            map_tx,
            applied_tx,
            wg: tokio::sync::Mutex::new(None),
            upstreams,
            bridge_subnet: DEFAULT_BRIDGE_SUBNET.parse().expect("valid subnet"),
            bridge: Mutex::new(BridgeTable::default()),
            net,
            proc_sys,
            bridge_tx,
            pool,
            bridge_made: Default::default(),
        });
        o.pool
            .set_leases(Arc::new(BridgeLeases(Arc::downgrade(&o))));
        tokio::spawn(o.clone().reconcile_loop(map_rx, bridge_rx));
        Ok(o)
    }

    /// Deletes the namespaces the pool holds (the agent is stopping).
    pub async fn shutdown(&self) {
        self.pool.shutdown().await;
    }

    /// The namespace pool (for tests and stats).
    pub fn pool(&self) -> &NetnsPool {
        &self.pool
    }

    /// This host's WireGuard public key and its epoch.
    pub fn public_key(&self) -> (String, u64) {
        self.key_tx.borrow().clone()
    }

    /// The public key, as it changes (rotations).
    pub fn watch_key(&self) -> watch::Receiver<(String, u64)> {
        self.key_tx.subscribe()
    }

    /// Hands over a new network map; the reconcile pass applies it.
    pub fn set_map(&self, mut map: NetworkMap) {
        crate::wg::mtu::fit_map(&mut map, self.wg_port);
        self.map_tx.send_if_modified(|m| {
            if m.as_ref() == Some(&map) {
                false
            } else {
                *m = Some(map);
                true
            }
        });
    }

    async fn reconcile_loop(
        self: Arc<Self>,
        mut rx: watch::Receiver<Option<NetworkMap>>,
        mut bridge_rx: watch::Receiver<u64>,
    ) {
        let mut applied = Applied::default();
        // The last map applied in full: what a new one's departed backends are read from.
        let mut last: Option<NetworkMap> = None;
        loop {
            bridge_rx.borrow_and_update();
            let map = rx.borrow_and_update().clone();
            if let Some(map) = map {
                let start = std::time::Instant::now();
                // A burst of bridge starts wakes this loop once per task: observing and
                // planning the host each time (every link, address and route, a cost that
                // grows with the bridge's veths) competed with the starts for the CPU.
                let bridge_only = applied.map.as_ref() == Some(&map);
                let r = if bridge_only {
                    self.apply_bridge_rules(&map, &mut applied).await
                } else {
                    applied.map = None;
                    self.apply(&map, &mut applied).await
                };
                match r {
                    Ok(()) => {
                        debug!(
                            ms = start.elapsed().as_millis() as u64,
                            bridge_only, "overlay applied"
                        );
                        if !bridge_only {
                            if let Some(prev) = &last {
                                self.purge_departed(prev, &map).await;
                            }
                            last = Some(map.clone());
                            applied.map = Some(map.clone());
                            self.applied_tx.send_replace(Some(map));
                        }
                    }
                    Err(e) => {
                        applied.map = None;
                        warn!(%e, "overlay: applying the network map failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        rx.mark_changed();
                    }
                }
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                r = bridge_rx.changed() => if r.is_err() { return },
            }
        }
    }

    /// Deletes this host's conntrack entries of its translations to backends that `new` no
    /// longer has (see [`crate::churn`]): UDP now, TCP later unless the backend came back.
    /// Runs after `new`'s nftables table is loaded, so a purged flow is balanced again over
    /// the remaining backends. Failures are logged: the entries then expire on their own.
    async fn purge_departed(self: &Arc<Self>, old: &NetworkMap, new: &NetworkMap) {
        let filters = crate::churn::purges(old, new, MARK_HOSTPORT);
        if filters.is_empty() {
            return;
        }
        let (now, later) = crate::churn::now_and_later(&filters);
        match self.net.delete_conntrack(&now).await {
            Ok(n) => debug!(deleted = n, filters = now.len(), "conntrack: purged udp"),
            Err(e) => warn!(%e, "conntrack: purging departed backends failed"),
        }
        if later.is_empty() {
            return;
        }
        let me = self.clone();
        let old = old.clone();
        tokio::spawn(async move {
            tokio::time::sleep(crate::churn::TCP_PURGE_AFTER).await;
            let Some(current) = me.applied_tx.borrow().clone() else {
                return;
            };
            let doomed = crate::churn::still_departed(&later, &old, &current, MARK_HOSTPORT);
            match me.net.delete_conntrack(&doomed).await {
                Ok(n) => debug!(deleted = n, filters = doomed.len(), "conntrack: purged tcp"),
                Err(e) => warn!(%e, "conntrack: purging departed backends failed"),
            }
        });
    }

    async fn rotate_if_asked(&self, epoch: u64) -> Result<Option<KeyPair>, NetError> {
        let current = self.key.lock().expect("key lock").1;
        if epoch <= current {
            return Ok(None);
        }
        let key = crate::wg::generate_key(&self.data_dir.join("wg.key"))?;
        crate::shim::write_atomic(&self.data_dir.join("wg.epoch"), &epoch.to_string()).map_err(
            |err| NetError::Io {
                op: "write key epoch",
                err,
            },
        )?;
        info!(epoch, "new WireGuard key pair");
        *self.key.lock().expect("key lock") = (key.clone(), epoch);
        self.key_tx.send_replace((key.public.to_base64(), epoch));
        Ok(Some(key))
    }

    /// The pass for a change of the local bridge's members under an unchanged map: the
    /// nftables table (their published ports, forwarding) and nothing else of the host.
    async fn apply_bridge_rules(
        &self,
        map: &NetworkMap,
        applied: &mut Applied,
    ) -> Result<(), NetError> {
        let bridge = self.local_bridge();
        if bridge.is_none() && applied.nft.is_empty() {
            return Ok(());
        }
        let forward_drop = self.enable_forwarding();
        let table = ruleset(map, &wg_name(&self.node_id), bridge.as_ref(), forward_drop);
        if table != applied.nft {
            self.net.load_nft(&table).await?;
            applied.nft = table;
        }
        Ok(())
    }

    async fn apply(&self, map: &NetworkMap, applied: &mut Applied) -> Result<(), NetError> {
        let new_key = self.rotate_if_asked(map.key_epoch).await?;
        let bridge = self.local_bridge();
        if map.networks.is_empty()
            && applied.networks.is_empty()
            && applied.nft.is_empty()
            && bridge.is_none()
        {
            return Ok(());
        }
        let forward_drop = self.enable_forwarding();
        let wanted: BTreeMap<String, NetworkView> = map
            .networks
            .iter()
            .map(|n| (n.id.clone(), n.clone()))
            .collect();
        // Networks gone: their devices (and with them their routes) and resolvers.
        let retired: BTreeSet<String> = applied
            .networks
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in &retired {
            applied.dns.remove(id);
        }
        let wg_iface = wg_name(&self.node_id);
        // With no overlay network, once the host was planned clean, a pass (one per bridge
        // task coming or going) has only the nftables table to look at.
        let skip_host = wanted.is_empty() && retired.is_empty() && applied.host_clean;
        let (plan, seen) = if skip_host {
            (plan::OverlayPlan::default(), None)
        } else {
            let seen = self.net.observe(&Ns::Host).await?;
            let plan = plan::overlay(
                &OverlayWanted {
                    map,
                    retired: &retired,
                    wg: &wg_iface,
                },
                &seen,
            );
            (plan, Some(seen))
        };
        self.net.apply(&Ns::Host, &plan.links).await?;

        // Tunnels.
        let encrypted: Vec<&NetworkView> = wanted.values().filter(|n| n.encrypted).collect();
        if !encrypted.is_empty() {
            // One interface for every encrypted network: they all have this host's WireGuard MTU.
            let mtu = encrypted.iter().map(|n| n.mtu).min().unwrap_or(1420);
            let mut guard = self.wg.lock().await;
            if guard.is_none() {
                let key = self.key.lock().expect("key lock").0.clone();
                *guard =
                    Some(Wg::ensure(&wg_iface, self.wg_port, &key, mtu, &self.agent_exe).await?);
            }
            let wg = guard.as_ref().expect("just ensured");
            wg.set_mtu(mtu).await?;
            if let Some(k) = &new_key {
                wg.set_key(k).await?;
            }
            let peers: Vec<WgPeer> = map
                .peers
                .iter()
                .filter(|p| !p.public_key.is_empty())
                .map(|p| WgPeer {
                    public_key: p.public_key.clone(),
                    endpoint: SocketAddr::new(p.underlay.into(), self.wg_port),
                    allowed_ips: encrypted
                        .iter()
                        .filter_map(|n| p.slices.get(&n.id))
                        .map(|s| (s.network(), s.prefix_len()))
                        .collect(),
                })
                .collect();
            if peers != applied.peers || new_key.is_some() {
                wg.set_peers(&peers).await?;
                applied.peers = peers;
            }
        } else if let Some(wg) = self.wg.lock().await.take() {
            wg.shutdown().await;
            applied.peers.clear();
        }
        // Routes through the tunnels (the WireGuard interface exists by now), the encrypted
        // subnets' `unreachable` routes, the VXLAN devices' neighbours and forwarding entries.
        self.net.apply(&Ns::Host, &plan.routes).await?;
        // The routing mesh's devices, tables and rules (over the tunnels' routes).
        if let Some(seen) = &seen {
            let nets = crate::mesh::networks(map, |n| tunnel_of(n, &wg_iface));
            self.net
                .apply(&Ns::Host, &crate::mesh::plan(&nets, seen))
                .await?;
        }

        // nftables: the whole table, atomically, when it changed.
        let table = ruleset(map, &wg_iface, bridge.as_ref(), forward_drop);
        if table != applied.nft {
            self.net.load_nft(&table).await?;
            applied.nft = table;
        }

        // DNS: one server per network, on its gateway.
        for n in wanted.values() {
            let view = dns_view(n);
            let addr = SocketAddr::new(n.gateway.into(), 53);
            let rebind = applied
                .dns
                .get(&n.id)
                .is_none_or(|d| d.local_addr() != addr);
            if rebind {
                applied.dns.remove(&n.id);
                // An internal network's resolver knows only its services.
                let upstreams = if n.internal {
                    Vec::new()
                } else {
                    self.upstreams.clone()
                };
                let server = DnsServer::bind(addr, upstreams)
                    .await
                    .map_err(|source| NetError::Dns { addr, source })?;
                applied.dns.insert(n.id.clone(), server);
            }
            if let Some(d) = applied.dns.get(&n.id) {
                d.set_view(view);
                d.set_clients(n.subnet);
            }
        }
        applied.host_clean = wanted.is_empty();
        applied.networks = wanted;
        Ok(())
    }

    /// Turns IPv4 forwarding on, and tells whether this agent is what made the host a router:
    /// forwarding was off when it first turned it on (recorded in [`FORWARD_MARKER`], so later
    /// starts know). Only then does the forward chain drop what is not Rudder's (as Docker's
    /// FORWARD DROP); a host that already routed keeps routing its own traffic. Deleting the
    /// marker opts out.
    fn enable_forwarding(&self) -> bool {
        let marker = self.data_dir.join(FORWARD_MARKER);
        let path = self.proc_sys.join("net/ipv4/ip_forward");
        let was_off = std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0");
        if was_off && !marker.exists() {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&marker)
                .and_then(|mut f| {
                    f.write_all(
                        b"ip_forward was 0 until rudder-agent turned it on: \
                          the forward chain drops what is not Rudder's\n",
                    )
                });
            match written {
                Ok(()) => info!("ip forwarding turned on; forwarding only Rudder's traffic"),
                Err(e) => {
                    warn!(%e, marker = %marker.display(), "network: cannot record that forwarding was off; the forward chain keeps policy accept")
                }
            }
        }
        if let Err(e) = std::fs::write(&path, "1") {
            debug!(path = %path.display(), %e, "sysctl");
        }
        marker.exists()
    }

    /// The directories that may hold a `bridge_addr` record: every container's, and every
    /// build's (a build's RUN joins the bridge too: `build`).
    fn bridge_record_dirs(&self) -> Vec<PathBuf> {
        ["containers", "builds"]
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(self.data_dir.join(d))
                    .into_iter()
                    .flatten()
            })
            .flatten()
            .map(|e| e.path())
            .collect()
    }

    /// Fills the bridge table from the directories' records, once per agent process (so an
    /// agent restart loses nothing), and drops the members whose record is gone (a stale
    /// directory removed by the worker without a detach).
    fn bridge_table(&self) -> std::sync::MutexGuard<'_, BridgeTable> {
        let mut t = self.bridge.lock().expect("bridge lock");
        if !t.loaded {
            for dir in self.bridge_record_dirs() {
                let Some(addr) = read_bridge_addr(&dir) else {
                    continue;
                };
                let ports = crate::task_record::task_of(&ContainerDir::new(&dir))
                    .map(|task| host_ports(&task, addr))
                    .unwrap_or_default();
                t.members.insert(dir, BridgeMember { addr, ports });
            }
            t.loaded = true;
        }
        t.members
            .retain(|dir, _| ContainerDir::new(dir).has_bridge_addr());
        t
    }

    /// The lowest address of the bridge subnet that no task and no ready namespace has
    /// (the first is the bridge's own).
    fn free_bridge_addr(&self, t: &BridgeTable) -> Option<Ipv4Addr> {
        let used: BTreeSet<Ipv4Addr> = t.members.values().map(|m| m.addr).collect();
        let base = u32::from(self.bridge_subnet.network());
        let size = 1u32 << (32 - self.bridge_subnet.prefix_len());
        (2..size - 1)
            .map(|off| Ipv4Addr::from(base + off))
            .find(|a| !used.contains(a) && !t.leased.contains(a))
    }

    /// The local bridge's rules, from the members of the bridge table. `None` while no task
    /// uses the bridge.
    fn local_bridge(&self) -> Option<LocalBridge> {
        let t = self.bridge_table();
        // Kept while the bridge exists, members or not (as Docker keeps docker0's rules): a
        // table that came and went with its first and last member was loaded twice for every
        // lone `rctl run --network bridge`, on its start path.
        let made = self.bridge_made.load(std::sync::atomic::Ordering::Relaxed);
        if t.members.is_empty() && !made {
            return None;
        }
        Some(LocalBridge {
            subnet: self.bridge_subnet,
            ports: t.members.values().flat_map(|m| m.ports.clone()).collect(),
        })
    }

    /// Puts `task` on the host's local bridge: an address from the bridge subnet (recorded in
    /// `dir/bridge_addr`), a namespace with `eth0` and a default route via the bridge, the
    /// host's resolvers. Returns the namespace's path.
    pub async fn attach_bridge(&self, task: &Task, dir: &Path) -> Result<PathBuf, NetError> {
        self.attach_bridge_with(&task.id, &task.hostname(), &task.name(), dir, |addr| {
            host_ports(task, addr)
        })
        .await
    }

    /// [`Overlay::attach_bridge`] for anything with an id (its namespace, veth and address
    /// record follow it), a hostname and a name for the log: a task, or a build's RUN.
    pub async fn attach_bridge_as(
        &self,
        id: &str,
        hostname: &str,
        name: &str,
        dir: &Path,
    ) -> Result<PathBuf, NetError> {
        self.attach_bridge_with(id, hostname, name, dir, |_| Vec::new())
            .await
    }

    async fn attach_bridge_with(
        &self,
        id: &str,
        hostname: &str,
        name: &str,
        dir: &Path,
        ports: impl FnOnce(Ipv4Addr) -> Vec<PublishedPort>,
    ) -> Result<PathBuf, NetError> {
        let t0 = std::time::Instant::now();
        let gw = Ipv4Addr::from(u32::from(self.bridge_subnet.network()) + 1);
        let prefix = self.bridge_subnet.prefix_len();
        self.enable_forwarding();
        let ns = self.netns_path(id);
        let recorded = read_bridge_addr(dir);
        // A ready namespace from the pool: its veth is made and on the bridge already, and
        // when armed its `eth0` has an address and route, which the task adopts. Not for a
        // task with an address already (a retry keeps it) or a namespace already.
        let pooled = match ns.exists() || recorded.is_some() {
            true => None,
            false => self.pool.take(&ns).await,
        };
        let armed = pooled.as_ref().and_then(|p| p.addr);
        let addr = {
            let mut t = self.bridge_table();
            let addr = match recorded {
                Some(a) => a,
                None => {
                    let a = match armed {
                        Some(a) => {
                            t.leased.remove(&a);
                            a
                        }
                        None => self.free_bridge_addr(&t).ok_or(NetError::BridgeFull {
                            subnet: self.bridge_subnet,
                        })?,
                    };
                    let c = ContainerDir::new(dir);
                    c.make_net_dir()
                        .and_then(|()| {
                            crate::shim::write_atomic(&c.bridge_addr_file(), &a.to_string())
                        })
                        .map_err(|err| NetError::Io {
                            op: "record bridge address",
                            err,
                        })?;
                    a
                }
            };
            let ports = ports(addr);
            t.members
                .insert(dir.to_path_buf(), BridgeMember { addr, ports });
            addr
        };
        let t_alloc = t0.elapsed();
        // The bridge, until an attach made sure of it (again after any failure).
        let bridge_made = self.bridge_made.load(std::sync::atomic::Ordering::Relaxed);
        let mut host_ops = if bridge_made {
            Vec::new()
        } else {
            plan::local_bridge(BRIDGE, gw, prefix)
        };
        let route = Route::via(Ipv4Net::default(), Some(gw), "eth0");
        let t_netns;
        let inside = match &pooled {
            // Armed with the task's address: nothing to do inside.
            Some(p) if p.addr == Some(addr) => {
                t_netns = t0.elapsed();
                Vec::new()
            }
            Some(_) => {
                t_netns = t0.elapsed();
                plan::pooled_inside("eth0", addr, prefix, std::slice::from_ref(&route))
            }
            None => {
                if !ns.exists() {
                    self.net.create_netns(&ns).await?;
                }
                t_netns = t0.elapsed();
                // A namespace taken from the pool before a failed attempt: its veth goes.
                if let Some(old) = self.pool.host_end(&ns) {
                    host_ops.push(NetOp::DelLink { name: old });
                }
                let veth = Veth {
                    host: veth_name(id, 9),
                    inside: "eth0".into(),
                    mtu: None,
                    master: BRIDGE.into(),
                    addr,
                    prefix,
                    routes: vec![route],
                };
                let p = plan::attach(&ns, &[veth]);
                host_ops.extend(p.host);
                self.pool.adopt(&ns, &veth_name(id, 9));
                p.inside
            }
        };
        let applied = match host_ops.is_empty() {
            true => Ok(()),
            false => self.net.apply(&Ns::Host, &host_ops).await,
        };
        if let Err(e) = applied {
            self.bridge_made
                .store(false, std::sync::atomic::Ordering::Relaxed);
            return Err(e.into());
        }
        self.bridge_made
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.pool.start();
        let t_host = t0.elapsed();
        let configured = match inside.is_empty() {
            true => Ok(()),
            false => self.net.apply(&Ns::Path(ns.clone()), &inside).await,
        };
        if let Err(e) = configured {
            self.bridge_made
                .store(false, std::sync::atomic::Ordering::Relaxed);
            return Err(e.into());
        }
        let t_inside = t0.elapsed();
        // The host's resolvers, except loopback ones (unreachable from the container).
        let resolv: String = std::fs::read_to_string("/etc/resolv.conf")
            .unwrap_or_default()
            .lines()
            .filter(|l| !(l.trim_start().starts_with("nameserver") && l.contains(" 127.")))
            .map(|l| format!("{l}\n"))
            .collect();
        write_etc(dir, resolv, addr, hostname)?;
        self.bridge_tx.send_modify(|n| *n += 1);
        let us = |d: Duration| d.as_micros() as u64;
        debug!(
            task = %name,
            pooled = pooled.is_some(),
            armed = armed.is_some(),
            alloc_us = us(t_alloc),
            netns_us = us(t_netns - t_alloc),
            host_us = us(t_host - t_netns),
            inside_us = us(t_inside - t_host),
            total_us = us(t0.elapsed()),
            "bridge attach timings"
        );
        info!(task = %name, %addr, "attached to the local bridge");
        Ok(ns)
    }

    /// Takes `task` off the local bridge: its namespace, veth and address go.
    pub async fn detach_bridge(&self, task: &Task, dir: &Path) {
        // A task that could change its namespace (capabilities, net.* sysctls) never lends it on.
        let may_reconfigure = crate::bundle::caps_reconfigure_network()
            || crate::bundle::options::reconfigures_network(&task.spec);
        self.detach_bridge_with(&task.id, dir, may_reconfigure)
            .await
    }

    /// [`Overlay::detach_bridge`] by id (see [`Overlay::attach_bridge_as`]).
    pub async fn detach_bridge_as(&self, id: &str, dir: &Path) {
        self.detach_bridge_with(id, dir, crate::bundle::caps_reconfigure_network())
            .await
    }

    async fn detach_bridge_with(&self, id: &str, dir: &Path, may_reconfigure: bool) {
        let t0 = std::time::Instant::now();
        let ns = self.netns_path(id);
        // Off the bridge now (its address may go to the next task right away); the pool
        // then scrubs and keeps the namespace, or deletes it, in the background.
        let host_end = self.pool.host_end(&ns).unwrap_or_else(|| veth_name(id, 9));
        let down = NetOp::SetLink {
            name: host_end,
            set: LinkSet {
                up: Some(false),
                ..Default::default()
            },
        };
        if let Err(e) = self.net.apply(&Ns::Host, &[down]).await {
            debug!(%e, "detach from the local bridge");
        }
        let t_link = t0.elapsed();
        self.pool.release(&ns, may_reconfigure).await;
        debug!(
            task = %id,
            down_us = t_link.as_micros() as u64,
            release_us = (t0.elapsed() - t_link).as_micros() as u64,
            "bridge detach timings"
        );
        ContainerDir::new(dir).remove_bridge_addr();
        self.bridge.lock().expect("bridge lock").members.remove(dir);
        self.bridge_tx.send_modify(|n| *n += 1);
    }

    /// Waits (up to 15 s) until every network of `task` is configured on this host, and
    /// returns those networks' views in the task's order.
    async fn networks_for(&self, task: &Task) -> Result<Vec<NetworkView>, NetError> {
        let mut rx = self.applied_tx.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            {
                let map = rx.borrow_and_update();
                if let Some(m) = map.as_ref() {
                    let found: Vec<NetworkView> = task
                        .networks
                        .iter()
                        .filter_map(|a| m.networks.iter().find(|n| n.name == a.network))
                        .cloned()
                        .collect();
                    if found.len() == task.networks.len() {
                        return Ok(found);
                    }
                }
            }
            let missing = task
                .networks
                .first()
                .map(|a| a.network.clone())
                .unwrap_or_default();
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(NetError::NotReady {
                    task: task.name(),
                    network: missing,
                });
            }
        }
    }

    /// Where a task's network namespace is bound: on the run dir's tmpfs
    /// ([`crate::rundir`]), or where an older agent bound it, if it is there.
    pub fn netns_path(&self, task_id: &str) -> PathBuf {
        let [new, legacy] = crate::rundir::netns_paths(&self.data_dir, task_id);
        match legacy.exists() {
            true => legacy,
            false => new,
        }
    }

    /// Gives `task` its network namespace with one interface per network, and writes the
    /// container's resolv.conf and hosts into `dir`. Returns the namespace's path.
    pub async fn attach(&self, task: &Task, dir: &Path) -> Result<PathBuf, NetError> {
        let nets = self.networks_for(task).await?;
        let ns = self.netns_path(&task.id);
        if !ns.exists() {
            self.net.create_netns(&ns).await?;
        }
        // The way out is the first network that has one (an internal network has none; with
        // only internal ones, the first still carries replies to its published ports).
        let exit = nets.iter().position(|n| !n.internal).unwrap_or(0);
        let hosts: Vec<String> = (0..nets.len()).map(|i| veth_name(&task.id, i)).collect();
        let addrs: Vec<Ipv4Addr> = task.networks.iter().map(|a| a.address).collect();
        let p = plan::attach(&ns, &plan::overlay_veths(&hosts, &addrs, &nets, exit));
        self.net.apply(&Ns::Host, &p.host).await?;
        self.net.apply(&Ns::Path(ns.clone()), &p.inside).await?;
        let mut resolv = format!(
            "# Rudder's embedded DNS on network {}\nnameserver {}\n",
            nets[0].name, nets[0].gateway
        );
        // An internal first network's resolver answers only its services (SERVFAIL for the
        // rest, so the client asks on): the way-out network's resolver comes next.
        if exit != 0 {
            resolv.push_str(&format!("nameserver {}\n", nets[exit].gateway));
        }
        resolv.push_str("options ndots:0\n");
        write_etc(dir, resolv, task.networks[0].address, &task.hostname())?;
        info!(task = %task.name(), addresses = ?addrs, "attached to networks");
        Ok(ns)
    }

    /// Removes the task's namespace (its veth pairs go with it).
    pub async fn detach(&self, task: &Task) {
        let ns = self.netns_path(&task.id);
        let hosts: Vec<String> = (0..task.networks.len())
            .map(|i| veth_name(&task.id, i))
            .collect();
        if let Err(e) = self.net.apply(&Ns::Host, &plan::detach(&hosts)).await {
            debug!(%e, "detach from networks");
        }
        remove_netns(&ns);
    }
}

/// The address a container's (or build's) directory records for its local bridge.
fn read_bridge_addr(dir: &Path) -> Option<Ipv4Addr> {
    ContainerDir::new(dir).read_bridge_addr()?.parse().ok()
}

/// The host-mode published ports of a task on the local bridge at `addr`.
fn host_ports(task: &Task, addr: Ipv4Addr) -> Vec<PublishedPort> {
    task.spec
        .ports
        .iter()
        .filter(|p| p.mode == rudder_model::ports::PortMode::Host)
        .map(|p| PublishedPort {
            service: task.service_name.clone(),
            protocol: p.protocol,
            published: p.published_port(),
            target: p.target,
            network: String::new(),
            backends: vec![addr],
        })
        .collect()
}

/// The members of the local bridge, by directory (see [`Overlay::bridge_table`]).
#[derive(Default)]
struct BridgeTable {
    loaded: bool,
    members: BTreeMap<PathBuf, BridgeMember>,
    /// Addresses of the pool's armed namespaces ([`BridgeLeases`]).
    leased: BTreeSet<Ipv4Addr>,
}

/// The bridge's addresses as the namespace pool leases them: one table for tasks and ready
/// namespaces, so no address is ever in two places. Weak: the pool belongs to the overlay.
struct BridgeLeases(std::sync::Weak<Overlay>);

impl crate::netpool::Leases for BridgeLeases {
    fn lease(&self) -> Option<crate::netpool::Lease> {
        let o = self.0.upgrade()?;
        let mut t = o.bridge_table();
        let addr = o.free_bridge_addr(&t)?;
        t.leased.insert(addr);
        Some(crate::netpool::Lease {
            addr,
            prefix: o.bridge_subnet.prefix_len(),
            gw: Ipv4Addr::from(u32::from(o.bridge_subnet.network()) + 1),
        })
    }

    fn give_back(&self, addr: Ipv4Addr) {
        if let Some(o) = self.0.upgrade() {
            o.bridge_table().leased.remove(&addr);
        }
    }
}

struct BridgeMember {
    addr: Ipv4Addr,
    /// Its host-mode published ports (they go into the nftables table).
    ports: Vec<PublishedPort>,
}

/// Drops a container's namespace kept at `path` (see [`Overlay::netns_path`]); what lives in
/// it (veth ends) goes with the last reference.
pub fn remove_netns(path: &Path) {
    if path.exists() {
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(path);
    }
}

/// The container's `/etc/resolv.conf` and `/etc/hosts` (its own address under its hostname),
/// written next to its bundle, from where the bundle bind-mounts them.
fn write_etc(dir: &Path, resolv: String, addr: Ipv4Addr, hostname: &str) -> Result<(), NetError> {
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{addr}\t{hostname}\n"
    );
    let c = ContainerDir::new(dir);
    c.make_net_dir().map_err(|err| NetError::Io {
        op: "make the network files' dir",
        err,
    })?;
    let [(_, resolv_path), (_, hosts_path)] = c.etc_files();
    for (path, text) in [(resolv_path, resolv), (hosts_path, hosts)] {
        std::fs::write(path, text).map_err(|err| NetError::Io {
            op: "write resolv.conf/hosts",
            err,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::network::ServiceEndpoints;

    fn view(id: &str, subnet: &str, slice: &str) -> NetworkView {
        let local: Ipv4Net = slice.parse().unwrap();
        NetworkView {
            id: id.into(),
            name: format!("net-{id}"),
            subnet: subnet.parse().unwrap(),
            encrypted: true,
            internal: false,
            vni: 4096,
            mtu: 1420,
            local_slice: local,
            gateway: rudder_model::network::Network::gateway(local),
            services: vec![ServiceEndpoints {
                name: "web".into(),
                aliases: vec!["www".into()],
                vip: Some("10.50.0.2".parse().unwrap()),
                tasks: vec!["10.50.1.2".parse().unwrap(), "10.50.2.2".parse().unwrap()],
            }],
        }
    }

    #[test]
    fn ruleset_balances_isolates_and_publishes() {
        let map = NetworkMap {
            networks: vec![view("aaaaaaaaaaaa", "10.50.0.0/16", "10.50.1.0/24")],
            ingress: vec![PublishedPort {
                service: "web".into(),
                protocol: Protocol::Tcp,
                published: 8080,
                target: 80,
                network: "aaaaaaaaaaaa".into(),
                backends: vec!["10.50.1.2".parse().unwrap(), "10.50.2.2".parse().unwrap()],
            }],
            ..Default::default()
        };
        let t = ruleset(&map, "rwg-1", None, false);
        for want in [
            "iifname \"rdb-aaaaaaaa\" ip daddr 10.50.0.2 dnat to numgen random mod 2 map { 0 : 10.50.1.2, 1 : 10.50.2.2 }",
            "fib daddr type local tcp dport 8080 ct mark set 0x5244 dnat ip to numgen random mod 2 map { 0 : 10.50.1.2 . 80, 1 : 10.50.2.2 . 80 }",
            // The client's address reaches a local replica; a remote one sees the gateway.
            "ct mark 0x5244 ip daddr 10.50.0.0/16 oifname != { \"rdb-aaaaaaaa\", \"rdm-aaaaaaaa\" } snat to 10.50.1.1",
            "iifname \"rdb-aaaaaaaa\" oifname { \"rdb-aaaaaaaa\", \"rwg-1\" } ip saddr 10.50.0.0/16 ip daddr 10.50.0.0/16 accept",
            "ip daddr { 10.50.0.0/16 } return",
            "iifname \"rwg-1\" oifname \"rdb-aaaaaaaa\" ip saddr 10.50.0.0/16 ip daddr 10.50.1.0/24 accept",
            "ip daddr { 10.50.0.0/16 } drop",
        ] {
            assert!(t.contains(want), "missing {want}\n{t}");
        }
        // M2: an encrypted subnet is never masqueraded (its return comes first).
        let ret = t.find("ip daddr { 10.50.0.0/16 } return").unwrap();
        assert!(ret < t.find("masquerade").unwrap(), "{t}");
        // The kernel accepts it (`nft -c` checks without committing anything).
        let out = std::process::Command::new("nft")
            .args(["-c", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(t.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{t}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A service without tasks has no DNAT rule (nothing to send to).
        let mut empty = map.clone();
        empty.networks[0].services[0].tasks.clear();
        empty.ingress.clear();
        assert!(!ruleset(&empty, "rwg-1", None, false).contains("dnat"));
        // The local bridge: outbound NAT, its host ports, nobody else forwarding into it.
        let b = LocalBridge {
            subnet: DEFAULT_BRIDGE_SUBNET.parse().unwrap(),
            ports: vec![PublishedPort {
                service: "db".into(),
                protocol: Protocol::Udp,
                published: 5353,
                target: 53,
                network: String::new(),
                backends: vec!["172.31.0.2".parse().unwrap()],
            }],
        };
        let t = ruleset(&empty, "rwg-1", Some(&b), true);
        for want in [
            "ip saddr 172.31.0.0/16 oifname != \"rdr0\" masquerade",
            "fib daddr type local udp dport 5353 ct mark set 0x5245 dnat to 172.31.0.2:53",
            "oifname \"rdr0\" iifname != \"rdr0\" drop",
            // L7: its way out, and nothing else through it; forwarding was ours to turn on.
            "iifname \"rdr0\" ip saddr 172.31.0.0/16 oifname != { \"rdb-aaaaaaaa\", \"rwg-1\", \"rdr0\" } accept",
            "iifname { \"rdb-aaaaaaaa\", \"rwg-1\", \"rdr0\" } drop",
            "oifname { \"rdb-aaaaaaaa\", \"rwg-1\", \"rdr0\" } drop",
            "type filter hook forward priority filter; policy drop;",
        ] {
            assert!(t.contains(want), "missing {want}\n{t}");
        }
        // An internal network: no masquerade, nothing forwarded out, of the host only DNS.
        let mut internal = map.clone();
        internal.networks[0].internal = true;
        let t = ruleset(&internal, "rwg-1", None, false);
        assert!(!t.contains("masquerade"), "{t}");
        // The walls come before the published ports' marks are accepted.
        let wall = t.find("ip daddr != 10.50.0.0/16 drop").unwrap();
        assert!(wall < t.find("ct mark { 0x").unwrap(), "{t}");
        for want in [
            "iifname \"rdb-aaaaaaaa\" oifname { \"rdb-aaaaaaaa\", \"rwg-1\" } ip saddr 10.50.0.0/16 ip daddr 10.50.0.0/16 accept",
            "iifname \"rdb-aaaaaaaa\" ip saddr != 10.50.0.0/16 drop",
            "iifname \"rdb-aaaaaaaa\" ip daddr != 10.50.0.0/16 drop",
            "iifname \"rdb-aaaaaaaa\" ip saddr 10.50.0.0/16 ip daddr 10.50.1.1 udp dport 53 accept",
            "iifname \"rdb-aaaaaaaa\" drop",
            "ip saddr 10.50.0.0/16 drop",
            "type filter hook input priority filter;",
            // Every mesh connection of an internal network comes from its gateway.
            "ct mark 0x5244 ip daddr 10.50.0.0/16 snat to 10.50.1.1",
        ] {
            assert!(t.contains(want), "missing {want}\n{t}");
        }
        assert!(nft_accepts(&t), "{t}");
    }

    /// H3: a tunnel feeds only its own network; VXLAN comes only from the cluster's hosts.
    #[test]
    fn ruleset_each_tunnel_feeds_only_its_network() {
        let mut plain = view("pppppppppppp", "10.60.0.0/16", "10.60.1.0/24");
        plain.encrypted = false;
        plain.services.clear();
        let mut secret = view("ssssssssssss", "10.61.0.0/16", "10.61.1.0/24");
        secret.internal = true;
        secret.services.clear();
        let peer = |id: &str, underlay: &str, k: u8| rudder_model::network::Peer {
            node_id: id.into(),
            underlay: underlay.parse().unwrap(),
            public_key: "k".into(),
            slices: [
                (
                    "pppppppppppp".to_string(),
                    format!("10.60.{k}.0/24").parse().unwrap(),
                ),
                (
                    "ssssssssssss".to_string(),
                    format!("10.61.{k}.0/24").parse().unwrap(),
                ),
            ]
            .into(),
        };
        let map = NetworkMap {
            networks: vec![plain, secret],
            peers: vec![peer("h2", "10.213.7.2", 2), peer("h3", "10.213.7.3", 3)],
            ..Default::default()
        };
        let t = ruleset(&map, "rwg-1", None, false);
        for want in [
            "iifname \"rdx-pppppppp\" oifname \"rdb-pppppppp\" ip saddr 10.60.0.0/16 ip daddr 10.60.1.0/24 accept",
            "iifname \"rwg-1\" oifname \"rdb-ssssssss\" ip saddr 10.61.0.0/16 ip daddr 10.61.1.0/24 accept",
            "iifname \"rdx-pppppppp\" ip saddr != 10.60.0.0/16 drop",
            "iifname \"rdx-pppppppp\" ip daddr != 10.60.0.0/16 drop",
            "iifname \"rwg-1\" ip saddr != { 10.61.0.0/16 } drop",
            "iifname \"rdb-pppppppp\" ip saddr != 10.60.0.0/16 drop",
            "oifname \"rdx-pppppppp\" ip daddr != 10.60.0.0/16 drop",
            "udp dport 4789 ip saddr != { 10.213.7.2, 10.213.7.3 } drop",
            // L3: each resolver hears its own members only.
            "iifname \"rdb-pppppppp\" ip saddr 10.60.0.0/16 ip daddr 10.60.1.1 udp dport 53 accept",
            "iifname \"rdb-ssssssss\" ip saddr 10.61.0.0/16 ip daddr 10.61.1.1 tcp dport 53 accept",
            "ip daddr { 10.60.1.1, 10.61.1.1 } udp dport 53 drop",
            "ip daddr { 10.60.1.1, 10.61.1.1 } tcp dport 53 drop",
            "ip daddr { 10.213.7.2, 10.213.7.3 } udp dport 4789 drop",
        ] {
            assert!(t.contains(want), "missing {want}\n{t}");
        }
        // L7: the open network's way out; the internal one has none; nothing else passes
        // through our interfaces; a host that already routed keeps policy accept.
        let ours = "{ \"rdb-pppppppp\", \"rdb-ssssssss\", \"rdx-pppppppp\", \"rwg-1\" }";
        for want in [
            format!("iifname \"rdb-pppppppp\" ip saddr 10.60.0.0/16 oifname != {ours} accept"),
            format!("iifname {ours} drop"),
            format!("oifname {ours} drop"),
            "type filter hook forward priority filter; policy accept;".to_string(),
        ] {
            assert!(t.contains(&want), "missing {want}\n{t}");
        }
        assert!(!t.contains("iifname \"rdb-ssssssss\" ip saddr 10.61.0.0/16 oifname !="));
        let accept = t.find(&format!("oifname != {ours} accept")).unwrap();
        assert!(
            accept
                > t.find("ip daddr { 10.60.0.0/16, 10.61.0.0/16 } drop")
                    .unwrap()
        );
        assert!(accept < t.find(&format!("iifname {ours} drop")).unwrap());
        // No tunnel but its own feeds a bridge; the old rule took every tunnel for every one.
        for line in t.lines().filter(|l| l.contains("oifname \"rdb-ssssssss\"")) {
            assert!(!line.contains("rdx-"), "{line}");
        }
        for line in t.lines().filter(|l| l.contains("oifname \"rdb-pppppppp\"")) {
            assert!(!line.contains("rwg-"), "{line}");
        }
        // The spoofing checks come before conntrack's shortcut, in both chains.
        let fwd = &t[t.find("chain forward").unwrap()..];
        let spoof = fwd.find("iifname \"rdx-pppppppp\" ip saddr != 10.60.0.0/16 drop");
        assert!(
            spoof.unwrap() < fwd.find("ct state established").unwrap(),
            "{t}"
        );
        let input = &t[t.find("chain input").unwrap()..];
        let vx = input.find("udp dport 4789 ip saddr != ").unwrap();
        assert!(vx < input.find("ct state established").unwrap(), "{t}");
        assert!(nft_accepts(&t), "{t}");
        // Without peers, no VXLAN is taken at all.
        let alone = NetworkMap {
            peers: vec![],
            ..map
        };
        assert!(ruleset(&alone, "rwg-1", None, false).contains("udp dport 4789 drop"));
    }

    /// The routing mesh with peers: its device is an overlay interface, the walls and the
    /// anti-spoofing rules stay, and its own rules sit where they must.
    #[test]
    fn ruleset_mesh_keeps_the_walls() {
        let mut plain = view("pppppppppppp", "10.60.0.0/16", "10.60.1.0/24");
        plain.encrypted = false;
        let enc = view("eeeeeeeeeeee", "10.61.0.0/16", "10.61.1.0/24");
        let peer = rudder_model::network::Peer {
            node_id: "h2".into(),
            underlay: "10.213.7.2".parse().unwrap(),
            public_key: "k".into(),
            slices: [
                ("pppppppppppp".to_string(), "10.60.2.0/24".parse().unwrap()),
                ("eeeeeeeeeeee".to_string(), "10.61.2.0/24".parse().unwrap()),
            ]
            .into(),
        };
        let port = |network: &str, published| PublishedPort {
            service: "web".into(),
            protocol: Protocol::Udp,
            published,
            target: 53,
            network: network.into(),
            backends: vec!["10.60.2.2".parse().unwrap()],
        };
        let map = NetworkMap {
            networks: vec![plain, enc],
            peers: vec![peer],
            ingress: vec![port("pppppppppppp", 5353), port("eeeeeeeeeeee", 5354)],
            ..Default::default()
        };
        let t = ruleset(&map, "rwg-1", None, true);
        for want in [
            // The old walls.
            "iifname \"rdx-pppppppp\" ip saddr != 10.60.0.0/16 drop",
            "iifname \"rwg-1\" ip saddr != { 10.61.0.0/16 } drop",
            "iifname \"rdb-pppppppp\" ip saddr != 10.60.0.0/16 drop",
            "udp dport 4789 ip saddr != { 10.213.7.2 } drop",
            // Only what leaves through the tunnel is still source-NATed.
            "ct mark 0x5244 ip daddr 10.60.0.0/16 oifname != { \"rdb-pppppppp\", \"rdm-pppppppp\" } snat to 10.60.1.1",
            // The mesh.
            "type filter hook prerouting priority -90; policy accept;",
            "udp dport 4790 iifname != { \"rdx-pppppppp\", \"rwg-1\" } drop",
            "iifname \"rdm-eeeeeeee\" oifname \"rdb-eeeeeeee\" ip daddr 10.61.1.0/24 ct mark { 0xa3d0201 } accept",
            "udp dport 4790 ip saddr { 10.60.1.1, 10.61.1.1 } accept",
            // Nothing else passes through the mesh devices.
            "iifname { \"rdb-pppppppp\", \"rdb-eeeeeeee\", \"rdx-pppppppp\", \"rwg-1\", \"rdm-pppppppp\", \"rdm-eeeeeeee\" } drop",
        ] {
            assert!(t.contains(want), "missing {want}\n{t}");
        }
        // The mesh's walls come before conntrack's shortcut, in forward and input; its own
        // packets are let out before the host is kept out of the overlays.
        for chain in ["chain forward", "chain input"] {
            let c = &t[t.find(chain).unwrap()..];
            let est = c.find("ct state established").unwrap();
            for rule in [
                "iifname \"rdm-pppppppp\" ct direction original ip daddr != 10.60.1.0/24 drop",
                "iifname \"rdm-eeeeeeee\" ct direction reply ct mark != 0x5244 drop",
                "udp dport 4790 drop",
            ] {
                assert!(c.find(rule).unwrap() < est, "{chain}: {rule}\n{t}");
            }
        }
        let out = &t[t.find("chain output_filter").unwrap()..];
        assert!(out.find("udp dport 4790 ip saddr").unwrap() < out.find("drop").unwrap());
        assert!(nft_accepts(&t), "{t}");
    }

    /// Whether the kernel accepts a ruleset (`nft -c` checks without committing anything).
    fn nft_accepts(t: &str) -> bool {
        use std::io::Write;
        std::process::Command::new("nft")
            .args(["-c", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(t.as_bytes())?;
                c.wait()
            })
            .is_ok_and(|st| st.success())
    }

    #[test]
    fn dns_answers_aliases_and_names_win() {
        let mut n = view("aaaaaaaa", "10.50.0.0/16", "10.50.1.0/24");
        n.services.push(ServiceEndpoints {
            name: "WWW".into(),
            aliases: vec!["Web-Legacy".into(), "web".into()],
            vip: Some("10.50.0.3".parse().unwrap()),
            tasks: vec![],
        });
        let v = dns_view(&n);
        let vip = |name: &str| {
            v.services
                .get(name)
                .and_then(|r| r.vip)
                .map(|a| a.to_string())
        };
        assert_eq!(vip("web").as_deref(), Some("10.50.0.2"));
        assert_eq!(vip("www").as_deref(), Some("10.50.0.3"));
        assert_eq!(vip("web-legacy").as_deref(), Some("10.50.0.3"));
        assert_eq!(v.services.len(), 3);
    }

    /// The local bridge through the port, without root: addresses allocated in order and
    /// freed by a detach, the planned ops, and a new agent process that finds the records.
    #[tokio::test]
    async fn bridge_attach_allocates_plans_and_frees() {
        use crate::hostnet::fake::FakeHostNet;
        let data = tempfile::tempdir().unwrap();
        let proc_sys = data.path().join("proc-sys");
        std::fs::create_dir_all(proc_sys.join("net/ipv4")).unwrap();
        std::fs::write(proc_sys.join("net/ipv4/ip_forward"), "0").unwrap();
        let start = |fake: Arc<FakeHostNet>| {
            Overlay::start_with(
                data.path(),
                "node1",
                51820,
                "/bin/false".into(),
                fake,
                proc_sys.clone(),
            )
            .unwrap()
        };
        let fake = Arc::new(FakeHostNet::new());
        let o = start(fake.clone());
        let dir = |i: usize| {
            let d = data.path().join("containers").join(format!("t{i}"));
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let addr = |i: usize| ContainerDir::new(dir(i)).read_bridge_addr().unwrap();
        let ns0 = o.attach_bridge_as("t0", "h0", "t0", &dir(0)).await.unwrap();
        assert_eq!(ns0, data.path().join("run/netns/t0"));
        assert!(ns0.exists());
        o.attach_bridge_as("t1", "h1", "t1", &dir(1)).await.unwrap();
        assert_eq!(
            (addr(0).as_str(), addr(1).as_str()),
            ("172.31.0.2", "172.31.0.3")
        );
        // The network files are on the run dir, not in the container directory.
        assert!(!dir(0).join("hosts").exists());
        assert!(std::fs::read_to_string(ContainerDir::new(dir(0)).hosts())
            .unwrap()
            .contains("172.31.0.2\th0"));
        // Forwarding was off: turned on, and recorded as ours.
        let fwd = std::fs::read_to_string(proc_sys.join("net/ipv4/ip_forward")).unwrap();
        assert_eq!(fwd, "1");
        assert!(data.path().join(FORWARD_MARKER).exists());
        o.detach_bridge_as("t0", &dir(0)).await;
        assert!(!ns0.exists() && ContainerDir::new(dir(0)).read_bridge_addr().is_none());
        o.attach_bridge_as("t2", "h2", "t2", &dir(2)).await.unwrap();
        assert_eq!(addr(2), "172.31.0.2", "a freed address is taken again");

        let host = fake.ops(&Ns::Host);
        for want in [
            "link add rdr0 type bridge",
            "addr replace 172.31.0.1/16 dev rdr0",
            "link del rdvt09",
            &format!(
                "link add rdvt09 type veth peer name eth0 netns {}",
                ns0.display()
            ),
            "link set rdvt09 master rdr0 up",
        ] {
            assert!(host.iter().any(|o| o == want), "missing {want}: {host:?}");
        }
        assert_eq!(
            fake.ops(&Ns::Path(ns0.clone())),
            [
                "link set lo up",
                "link set eth0 up",
                "addr replace 172.31.0.2/16 dev eth0",
                "route replace 0.0.0.0/0 via 172.31.0.1 dev eth0",
            ]
        );
        // An attach reads nothing of the host (no map yet, so no pass observed it either).
        assert!(!fake
            .calls()
            .iter()
            .any(|c| matches!(c, crate::hostnet::fake::Call::Observe(Ns::Host))));

        // A new agent process finds t1 and t2 from their records.
        let o2 = start(Arc::new(FakeHostNet::new()));
        o2.attach_bridge_as("t3", "h3", "t3", &dir(3))
            .await
            .unwrap();
        assert_eq!(addr(3), "172.31.0.4");
        assert_eq!(
            o2.local_bridge().unwrap().subnet.to_string(),
            "172.31.0.0/16"
        );
    }

    #[test]
    fn names_fit_linux_limits() {
        let id = "0123456789abcdef01234567";
        for n in [
            bridge_name(id),
            vxlan_name(id),
            wg_name(id),
            veth_name(id, 3),
        ] {
            assert!(n.len() <= 15, "{n}");
        }
        assert_eq!(
            crate::hostnet::fmt_mac(&vtep_mac(4096, "10.50.2.1".parse().unwrap())),
            "02:00:0a:32:02:01"
        );
    }
}

//! The routing mesh's way to replicas on other hosts that keeps the client's address.
//!
//! A connection to an ingress-published port is DNATed by the host that took it (the ingress
//! host) to a replica anywhere. A replica on another host used to see the ingress host's
//! gateway (SNAT), because a packet with the client's address cannot cross the overlay as it
//! is: WireGuard drops a source outside the sending peer's allowed IPs, the anti-spoofing
//! walls drop a source outside the network, and the replica's host would send the replies
//! straight to the client instead of back through the ingress host that holds the
//! translation. Here such a packet travels encapsulated once more, inside the network's own
//! tunnel:
//!
//! - Each host has, per non-internal network with ingress ports, a mesh device `rdm-<net>`:
//!   VXLAN (UDP [`MESH_PORT`], the network's VNI) whose packets leave from the host's gateway
//!   address in that network, so the outer packet is an ordinary member of the network (inside
//!   WireGuard's allowed IPs and the walls) and goes through the network's tunnel, encrypted
//!   or not. Peers are reached through permanent neighbour and forwarding entries (MACs
//!   derived from the gateways, as for the VXLAN tunnels).
//! - Ingress host: the original direction of a mesh connection (`ct mark` [`MARK_INGRESS`])
//!   gets packet mark [`MARK_MESH_OUT`]; a rule sends such packets to table
//!   [`TABLE_MESH_OUT`], which routes each peer's slice through the mesh device. Nothing is
//!   source-NATed on that way (only what still leaves through the plain tunnel is, as before).
//! - Replica host: a connection arriving from the mesh device is marked (`ct mark`) with the
//!   sending peer's gateway address (recognised by the inner frame's source MAC); its replies
//!   get that as packet mark, and a rule per peer sends them to a table whose default route is
//!   that peer through the mesh device. The ingress host's conntrack then undoes the DNAT.
//! - VXLAN keeps the inner packet's mark on its own outer packet: the host's VXLAN packets (UDP
//!   [`MESH_PORT`] of the mesh devices, and 4789 of the tunnels of unencrypted networks, which
//!   may carry the former) look up the main table first, so they leave through the tunnel and
//!   never loop into a mesh device.
//!
//! Isolation: only the tunnels carry mesh packets in (UDP [`MESH_PORT`] is taken only through a
//! network's tunnel, from a peer's gateway; no container may send it to a gateway, so none can
//! forge one); what leaves a mesh device goes to the local slice (original direction) or
//! belongs to a connection this host marked (replies). Pure: table-tested below.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rudder_model::network::{Network, NetworkMap, NetworkView};

use crate::hostnet::{LinkSet, Mac, NetOp, Observed, Route, Rule};

/// UDP port of the mesh devices' VXLAN (inside the tunnels only; right after the tunnels'
/// 4789, so one port range holds both).
pub const MESH_PORT: u16 = crate::net::VXLAN_PORT + 1;
/// Connection mark of connections that arrived through the routing mesh (see `net`).
pub const MARK_INGRESS: u32 = 0x5244;
/// Packet mark of a mesh connection's original direction on the ingress host.
pub const MARK_MESH_OUT: u32 = 0x5246;
/// Routing table of the peers' slices through the mesh devices.
pub const TABLE_MESH_OUT: u32 = 0x5246;
/// Priority of the mark rules.
pub const RULE_PRIORITY: u32 = 5245;
/// Priority of the rule that keeps the host's VXLAN packets on the main table.
pub const RULE_PRIORITY_OWN: u32 = 5244;
/// The main routing table.
const TABLE_MAIN: u32 = 254;
/// IPv4 + UDP + VXLAN + Ethernet headers.
const VXLAN_OVERHEAD: u32 = 50;
/// Name prefix of the mesh devices.
const PREFIX: &str = "rdm-";

/// The mesh device of a network (`rdm-<id prefix>`).
pub fn device_name(net_id: &str) -> String {
    format!("{PREFIX}{}", &net_id[..net_id.len().min(8)])
}

/// The mesh device MAC of the host whose gateway in the network is `gw` (derived, like the
/// VXLAN tunnels', but distinct from them).
pub fn mesh_mac(vni: u32, gw: Ipv4Addr) -> Mac {
    let o = gw.octets();
    [0x06, vni as u8, o[0], o[1], o[2], o[3]]
}

/// A peer as the mesh reaches it in one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPeer {
    /// Its slice of the network.
    pub slice: Ipv4Net,
    /// Its gateway in the network (the far end of the mesh device).
    pub gw: Ipv4Addr,
    /// Its mesh device's MAC.
    pub mac: Mac,
    /// Connection mark, packet mark and routing table of its connections' replies (its
    /// gateway address as a number: unique, and stable while the slice is).
    pub mark: u32,
}

/// A network whose ingress ports reach other hosts' replicas through its mesh device.
#[derive(Debug, Clone)]
pub struct MeshNet<'a> {
    pub net: &'a NetworkView,
    /// Its mesh device.
    pub dev: String,
    /// The tunnel that carries its packets between hosts.
    pub tunnel: String,
    pub peers: Vec<MeshPeer>,
}

/// The networks of `map` that get a mesh device: not internal (an internal network's
/// replicas may route outside addresses through another network, so its mesh connections
/// keep the SNAT), with an ingress port, and with peers. `tunnel_of` names a network's tunnel.
pub fn networks<'a>(
    map: &'a NetworkMap,
    tunnel_of: impl Fn(&NetworkView) -> String,
) -> Vec<MeshNet<'a>> {
    map.networks
        .iter()
        .filter(|n| !n.internal && map.ingress.iter().any(|p| p.network == n.id))
        .filter_map(|n| {
            let peers: Vec<MeshPeer> = map
                .peers
                .iter()
                .filter_map(|p| p.slices.get(&n.id))
                .map(|slice| {
                    let gw = Network::gateway(*slice);
                    MeshPeer {
                        slice: *slice,
                        gw,
                        mac: mesh_mac(n.vni, gw),
                        mark: u32::from(gw),
                    }
                })
                .collect();
            (!peers.is_empty()).then(|| MeshNet {
                net: n,
                dev: device_name(&n.id),
                tunnel: tunnel_of(n),
                peers,
            })
        })
        .collect()
}

/// The host's side of the mesh: devices (made or removed), neighbours, forwarding entries,
/// the two kinds of tables and their rules. Run after the tunnels' routes exist.
pub fn plan(nets: &[MeshNet], seen: &Observed) -> Vec<NetOp> {
    let mut ops = Vec::new();
    let wanted: BTreeSet<&str> = nets.iter().map(|m| m.dev.as_str()).collect();
    for name in seen.links.keys() {
        if name.starts_with(PREFIX) && !wanted.contains(name.as_str()) {
            ops.push(NetOp::DelLink { name: name.clone() });
        }
    }
    for m in nets {
        let n = m.net;
        if !seen.links.contains_key(&m.dev) {
            ops.push(NetOp::AddVxlanFrom {
                name: m.dev.clone(),
                vni: n.vni,
                port: MESH_PORT,
                local: n.gateway,
            });
        }
        ops.push(NetOp::SetLink {
            name: m.dev.clone(),
            set: LinkSet {
                up: Some(true),
                mtu: Some(n.mtu.saturating_sub(VXLAN_OVERHEAD)),
                mac: Some(mesh_mac(n.vni, n.gateway)),
                ..Default::default()
            },
        });
        // The inner packets carry the client's address: loose reverse-path checking only,
        // which passes nothing on a device without an address (the gateway's, again: no
        // new address, and its local route stays while the bridge holds it).
        ops.push(NetOp::ReplaceAddr {
            dev: m.dev.clone(),
            addr: n.gateway,
            prefix: 32,
        });
        ops.push(NetOp::Sysctl {
            key: format!("net/ipv4/conf/{}/rp_filter", m.dev),
            value: "2".into(),
        });
        for p in &m.peers {
            let via = |dst: Ipv4Net| Route {
                onlink: true,
                ..Route::via(dst, Some(p.gw), &m.dev)
            };
            ops.push(NetOp::ReplaceNeigh {
                dev: m.dev.clone(),
                ip: p.gw,
                mac: p.mac,
            });
            ops.push(NetOp::ReplaceFdb {
                dev: m.dev.clone(),
                mac: p.mac,
                dst: p.gw,
            });
            ops.push(NetOp::ReplaceTableRoute {
                table: TABLE_MESH_OUT,
                route: via(p.slice),
            });
            ops.push(NetOp::ReplaceTableRoute {
                table: p.mark,
                route: via(Ipv4Net::default()),
            });
            ops.push(NetOp::AddRule(Rule {
                priority: RULE_PRIORITY,
                fwmark: Some(p.mark),
                iif: None,
                udp_dports: None,
                table: p.mark,
            }));
        }
    }
    if !nets.is_empty() {
        ops.push(NetOp::AddRule(Rule {
            priority: RULE_PRIORITY,
            fwmark: Some(MARK_MESH_OUT),
            iif: None,
            udp_dports: None,
            table: TABLE_MESH_OUT,
        }));
        ops.push(NetOp::AddRule(Rule {
            priority: RULE_PRIORITY_OWN,
            fwmark: None,
            iif: Some("lo".into()),
            udp_dports: Some((
                crate::net::VXLAN_PORT.min(MESH_PORT),
                MESH_PORT.max(crate::net::VXLAN_PORT),
            )),
            table: TABLE_MAIN,
        }));
    }
    ops
}

/// The mesh's nftables rules, by where `net::ruleset` puts them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshRules {
    /// Chain `mesh` (filter, prerouting, after DNAT): the marks.
    pub prerouting: Vec<String>,
    /// Ahead of everything in `forward` and `input`.
    pub spoof: Vec<String>,
    /// In `input`, after the anti-spoofing rules, before conntrack's shortcut.
    pub input: Vec<String>,
    /// In `forward`, before conntrack's shortcut (TCP MSS of the narrower way).
    pub forward_head: Vec<String>,
    /// In `forward`, after conntrack's shortcut: new connections out of the mesh devices.
    pub forward: Vec<String>,
    /// In `output_filter`, before the host is kept out of the overlays: the devices' packets.
    pub output: Vec<String>,
    /// The mesh devices (Rudder's interfaces: nothing else passes through them).
    pub devices: Vec<String>,
}

fn set<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", v.join(", "))
}

fn mac_text(mac: &Mac) -> String {
    crate::hostnet::fmt_mac(mac)
}

/// The rules for `nets`; `bridges` are every network's bridges (none of their containers may
/// send to the mesh port of a gateway).
pub fn rules(nets: &[MeshNet], bridges: &[String]) -> MeshRules {
    let mut r = MeshRules::default();
    if nets.is_empty() {
        return r;
    }
    let quoted = |names: &[String]| set(names.iter().map(|n| format!("\"{n}\"")));
    let all_marks: Vec<String> = nets
        .iter()
        .flat_map(|m| m.peers.iter().map(|p| format!("{:#x}", p.mark)))
        .collect();
    let peer_gws: BTreeSet<Ipv4Addr> = nets
        .iter()
        .flat_map(|m| m.peers.iter().map(|p| p.gw))
        .collect();
    let own_gws: BTreeSet<Ipv4Addr> = nets.iter().map(|m| m.net.gateway).collect();
    let tunnels: BTreeSet<String> = nets.iter().map(|m| format!("\"{}\"", m.tunnel)).collect();
    r.devices = nets.iter().map(|m| m.dev.clone()).collect();

    r.prerouting.push(format!(
        "ct direction original ct mark {MARK_INGRESS:#x} meta mark set {MARK_MESH_OUT:#x}"
    ));
    for m in nets {
        for p in &m.peers {
            r.prerouting.push(format!(
                "iifname \"{}\" ether saddr {} ct state new ct mark set {:#x}",
                m.dev,
                mac_text(&p.mac),
                p.mark
            ));
        }
    }
    r.prerouting.push(format!(
        "ct direction reply ct mark {} meta mark set ct mark",
        set(&all_marks)
    ));

    if !bridges.is_empty() {
        let gws = own_gws.iter().chain(&peer_gws);
        r.spoof.push(format!(
            "iifname {} ip daddr {} udp dport {MESH_PORT} drop",
            quoted(bridges),
            set(gws)
        ));
    }
    for m in nets {
        let dev = &m.dev;
        r.spoof
            .push(format!("iifname \"{dev}\" ct state invalid drop"));
        r.spoof
            .push(format!("iifname \"{dev}\" ip daddr {} drop", m.net.gateway));
        r.spoof.push(format!(
            "iifname \"{dev}\" ct direction original ip daddr != {} drop",
            m.net.local_slice
        ));
        r.spoof.push(format!(
            "iifname \"{dev}\" ct direction reply ct mark != {MARK_INGRESS:#x} drop"
        ));
        r.forward.push(format!(
            "iifname \"{dev}\" oifname \"{}\" ip daddr {} ct mark {} accept",
            crate::net::bridge_name(&m.net.id),
            m.net.local_slice,
            set(m.peers.iter().map(|p| format!("{:#x}", p.mark)))
        ));
    }
    r.input.push(format!(
        "udp dport {MESH_PORT} ip saddr != {} drop",
        set(&peer_gws)
    ));
    r.input.push(format!(
        "udp dport {MESH_PORT} iifname != {} drop",
        set(&tunnels)
    ));
    r.forward_head.push(format!(
        "oifname {} tcp flags syn tcp option maxseg size set rt mtu",
        quoted(&r.devices)
    ));
    r.output.push(format!(
        "udp dport {MESH_PORT} ip saddr {} accept",
        set(&own_gws)
    ));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostnet::LinkState;
    use rudder_model::network::{Peer, PublishedPort};
    use rudder_model::ports::Protocol;

    fn net(id: &str, subnet: &str, slice: &str, encrypted: bool, internal: bool) -> NetworkView {
        let local: Ipv4Net = slice.parse().unwrap();
        NetworkView {
            id: id.into(),
            name: id.into(),
            subnet: subnet.parse().unwrap(),
            encrypted,
            internal,
            vni: 4097,
            mtu: 1420,
            local_slice: local,
            gateway: Network::gateway(local),
            services: vec![],
        }
    }

    fn ingress(network: &str) -> PublishedPort {
        PublishedPort {
            service: "web".into(),
            protocol: Protocol::Tcp,
            published: 8080,
            target: 80,
            network: network.into(),
            backends: vec!["10.96.2.2".parse().unwrap()],
        }
    }

    fn map() -> NetworkMap {
        let peer = |id: &str, k: u8| Peer {
            node_id: id.into(),
            underlay: format!("10.213.7.{k}").parse().unwrap(),
            public_key: "k".into(),
            slices: [
                (
                    "wwwwwwwwwwww".to_string(),
                    format!("10.96.{k}.0/24").parse().unwrap(),
                ),
                (
                    "vvvvvvvvvvvv".to_string(),
                    format!("10.97.{k}.0/24").parse().unwrap(),
                ),
                (
                    "iiiiiiiiiiii".to_string(),
                    format!("10.98.{k}.0/24").parse().unwrap(),
                ),
                (
                    "nnnnnnnnnnnn".to_string(),
                    format!("10.99.{k}.0/24").parse().unwrap(),
                ),
            ]
            .into(),
        };
        NetworkMap {
            networks: vec![
                net("wwwwwwwwwwww", "10.96.0.0/16", "10.96.1.0/24", true, false),
                net("vvvvvvvvvvvv", "10.97.0.0/16", "10.97.1.0/24", false, false),
                net("iiiiiiiiiiii", "10.98.0.0/16", "10.98.1.0/24", true, true),
                net("nnnnnnnnnnnn", "10.99.0.0/16", "10.99.1.0/24", true, false),
            ],
            peers: vec![peer("h2", 2), peer("h3", 3)],
            ingress: vec![
                ingress("wwwwwwwwwwww"),
                ingress("vvvvvvvvvvvv"),
                ingress("iiiiiiiiiiii"),
            ],
            ..Default::default()
        }
    }

    fn tunnel(n: &NetworkView) -> String {
        if n.encrypted {
            "rwg-1".into()
        } else {
            crate::net::vxlan_name(&n.id)
        }
    }

    /// Which networks get a device: not internal, with an ingress port, with peers.
    #[test]
    fn mesh_networks() {
        let m = map();
        let nets = networks(&m, tunnel);
        let names: Vec<(&str, &str)> = nets
            .iter()
            .map(|n| (n.dev.as_str(), n.tunnel.as_str()))
            .collect();
        assert_eq!(
            names,
            [("rdm-wwwwwwww", "rwg-1"), ("rdm-vvvvvvvv", "rdx-vvvvvvvv")]
        );
        let p = &nets[0].peers[0];
        assert_eq!(p.gw.to_string(), "10.96.2.1");
        assert_eq!(p.mark, 0x0a60_0201);
        assert_eq!(crate::hostnet::fmt_mac(&p.mac), "06:01:0a:60:02:01");
        let alone = NetworkMap { peers: vec![], ..m };
        assert!(networks(&alone, tunnel).is_empty());
    }

    #[test]
    fn plans_devices_tables_and_rules() {
        let m = map();
        let nets = networks(&m, tunnel);
        let mut seen = Observed::default();
        seen.links
            .insert("rdm-gone0000".into(), LinkState::default());
        seen.links
            .insert("rdm-vvvvvvvv".into(), LinkState::default());
        let ops: Vec<String> = plan(&nets, &seen).iter().map(|o| o.to_string()).collect();
        for want in [
            "link del rdm-gone0000",
            "link add rdm-wwwwwwww type vxlan id 4097 local 10.96.1.1 dstport 4790 nolearning",
            "link set rdm-wwwwwwww address 06:01:0a:60:01:01 mtu 1370 up",
            "addr replace 10.96.1.1/32 dev rdm-wwwwwwww",
            "sysctl net/ipv4/conf/rdm-wwwwwwww/rp_filter=2",
            "neigh replace 10.96.2.1 lladdr 06:01:0a:60:02:01 dev rdm-wwwwwwww nud permanent",
            "fdb replace 06:01:0a:60:02:01 dev rdm-wwwwwwww dst 10.96.2.1 self permanent",
            "route replace 10.96.2.0/24 via 10.96.2.1 dev rdm-wwwwwwww onlink table 21062",
            "route replace 0.0.0.0/0 via 10.96.3.1 dev rdm-wwwwwwww onlink table 174064385",
            "rule add priority 5245 fwmark 0xa600301 lookup 174064385",
            "route replace 10.97.3.0/24 via 10.97.3.1 dev rdm-vvvvvvvv onlink table 21062",
            "rule add priority 5245 fwmark 0x5246 lookup 21062",
            "rule add priority 5244 iif lo ipproto udp dport 4789-4790 lookup 254",
        ] {
            assert!(ops.iter().any(|o| o == want), "missing {want}: {ops:#?}");
        }
        // Present already: not made again; the internal network and the one without ingress
        // ports get nothing.
        assert!(!ops.iter().any(|o| o.contains("link add rdm-vvvvvvvv")));
        assert!(!ops
            .iter()
            .any(|o| o.contains("rdm-iiiiiiii") || o.contains("rdm-nnnnnnnn")));
        // The device exists before anything uses it.
        let add = ops
            .iter()
            .position(|o| o.starts_with("link add rdm-wwwwwwww"));
        let first_use = ops.iter().position(|o| o.contains("dev rdm-wwwwwwww"));
        assert!(add < first_use, "{ops:#?}");
        // Nothing wanted: the devices go, no rules are added.
        let none = plan(&[], &seen);
        assert!(
            none.iter().all(|o| matches!(o, NetOp::DelLink { .. })),
            "{none:?}"
        );
        assert_eq!(none.len(), 2);
    }

    /// The plan against the kernel, twice (idempotent), inside a namespace this test makes.
    /// Needs root.
    #[tokio::test]
    async fn plan_reaches_the_kernel() {
        use crate::hostnet::netlink::NetlinkHostNet;
        use crate::hostnet::{HostNet, Ns};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns");
        let net = NetlinkHostNet::shared().unwrap();
        net.create_netns(&path).await.unwrap();
        let ns = Ns::Path(path.clone());
        let m = map();
        let nets = networks(&m, tunnel);
        let mut ops =
            crate::hostnet::plan::local_bridge("rdb-wwwwwwww", "10.96.1.1".parse().unwrap(), 24);
        ops.extend(plan(&nets[..1], &Observed::default()));
        net.apply(&ns, &ops).await.unwrap();
        let seen = net.observe(&ns).await.unwrap();
        net.apply(&ns, &plan(&nets[..1], &seen)).await.unwrap();
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={}", path.display()))
                .arg("ip")
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let rules = ip(&["rule"]);
        for want in [
            "5244:\tfrom all iif lo ipproto udp dport 4789-4790 lookup main",
            "5245:\tfrom all fwmark 0xa600201 lookup 174064129",
            "5245:\tfrom all fwmark 0x5246 lookup 21062",
        ] {
            assert_eq!(rules.matches(want).count(), 1, "{want}:\n{rules}");
        }
        let routes = ip(&["route", "show", "table", "all"]);
        for want in [
            "10.96.3.0/24 via 10.96.3.1 dev rdm-wwwwwwww table 21062 onlink",
            "default via 10.96.2.1 dev rdm-wwwwwwww table 174064129 onlink",
        ] {
            assert!(routes.contains(want), "{want}:\n{routes}");
        }
        let link = ip(&["-d", "link", "show", "rdm-wwwwwwww"]);
        assert!(link.contains("vxlan id 4097 local 10.96.1.1"), "{link}");
        // Gone from the map: the device goes (its routes with it).
        let seen = net.observe(&ns).await.unwrap();
        net.apply(&ns, &plan(&[], &seen)).await.unwrap();
        assert!(!ip(&["link"]).contains("rdm-"));
        crate::net::remove_netns(&path);
    }

    #[test]
    fn rules_mark_route_and_wall() {
        let m = map();
        let nets = networks(&m, tunnel);
        let bridges = vec!["rdb-wwwwwwww".to_string(), "rdb-vvvvvvvv".to_string()];
        let r = rules(&nets, &bridges);
        let all: Vec<&String> = r
            .prerouting
            .iter()
            .chain(&r.spoof)
            .chain(&r.input)
            .chain(&r.forward_head)
            .chain(&r.forward)
            .chain(&r.output)
            .collect();
        for want in [
            "ct direction original ct mark 0x5244 meta mark set 0x5246",
            "iifname \"rdm-wwwwwwww\" ether saddr 06:01:0a:60:02:01 ct state new ct mark set 0xa600201",
            "ct direction reply ct mark { 0xa600201, 0xa600301, 0xa610201, 0xa610301 } meta mark set ct mark",
            "iifname { \"rdb-wwwwwwww\", \"rdb-vvvvvvvv\" } ip daddr { 10.96.1.1, 10.97.1.1, 10.96.2.1, 10.96.3.1, 10.97.2.1, 10.97.3.1 } udp dport 4790 drop",
            "iifname \"rdm-wwwwwwww\" ct state invalid drop",
            "iifname \"rdm-wwwwwwww\" ip daddr 10.96.1.1 drop",
            "iifname \"rdm-wwwwwwww\" ct direction original ip daddr != 10.96.1.0/24 drop",
            "iifname \"rdm-wwwwwwww\" ct direction reply ct mark != 0x5244 drop",
            "iifname \"rdm-vvvvvvvv\" oifname \"rdb-vvvvvvvv\" ip daddr 10.97.1.0/24 ct mark { 0xa610201, 0xa610301 } accept",
            "udp dport 4790 ip saddr != { 10.96.2.1, 10.96.3.1, 10.97.2.1, 10.97.3.1 } drop",
            "udp dport 4790 iifname != { \"rdx-vvvvvvvv\", \"rwg-1\" } drop",
            "oifname { \"rdm-wwwwwwww\", \"rdm-vvvvvvvv\" } tcp flags syn tcp option maxseg size set rt mtu",
            "udp dport 4790 ip saddr { 10.96.1.1, 10.97.1.1 } accept",
        ] {
            assert!(all.iter().any(|l| *l == want), "missing {want}: {all:#?}");
        }
        assert_eq!(rules(&[], &bridges), MeshRules::default());
    }
}

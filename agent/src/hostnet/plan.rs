//! Pure planners: what to change on the host (or in a container's namespace) to get from
//! what is observed to what is wanted. No I/O; table-tested below.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use rudder_model::network::{Network, NetworkMap, NetworkView};

use super::{LinkSet, NetOp, Observed, Route, RouteKind, RTPROT_KERNEL};
use crate::net::{bridge_name, vtep_mac, vxlan_name, VXLAN_PORT};

/// Route protocol marking the `unreachable` routes of encrypted subnets as ours (an
/// unassigned value in iproute2's `rt_protos`), so a pass removes exactly those it no longer
/// wants and never a route someone else made.
pub const RTPROT_RUDDER: u8 = 213;

/// One veth pair of a container: `host` on the host, a port of `master`; `inside` in the
/// container's namespace with its address and routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veth {
    pub host: String,
    pub inside: String,
    pub mtu: Option<u32>,
    pub master: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub routes: Vec<Route>,
}

/// The ops of an attach: first on the host, then inside the container's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttachPlan {
    pub host: Vec<NetOp>,
    pub inside: Vec<NetOp>,
}

/// The ops inside a namespace from the pool (`netpool`), whose veth and loopback are there
/// already: `inside` up, with `addr` and `routes`.
pub fn pooled_inside(inside: &str, addr: Ipv4Addr, prefix: u8, routes: &[Route]) -> Vec<NetOp> {
    let mut ops = vec![
        NetOp::SetLink {
            name: inside.into(),
            set: LinkSet {
                up: Some(true),
                ..Default::default()
            },
        },
        NetOp::ReplaceAddr {
            dev: inside.into(),
            addr,
            prefix,
        },
    ];
    ops.extend(routes.iter().cloned().map(NetOp::ReplaceRoute));
    ops
}

/// Puts `veths` into the namespace at `ns`. A host end left over from an earlier attempt is
/// deleted first (with its peer), so the plan needs nothing observed.
pub fn attach(ns: &Path, veths: &[Veth]) -> AttachPlan {
    let mut p = AttachPlan::default();
    p.inside.push(NetOp::SetLink {
        name: "lo".into(),
        set: LinkSet {
            up: Some(true),
            ..Default::default()
        },
    });
    for v in veths {
        p.host.push(NetOp::DelLink {
            name: v.host.clone(),
        });
        p.host.push(NetOp::AddVeth {
            name: v.host.clone(),
            mtu: v.mtu,
            peer: v.inside.clone(),
            peer_ns: Some(ns.to_path_buf()),
        });
        p.host.push(NetOp::SetLink {
            name: v.host.clone(),
            set: LinkSet {
                up: Some(true),
                master: Some(v.master.clone()),
                ..Default::default()
            },
        });
        p.inside.push(NetOp::SetLink {
            name: v.inside.clone(),
            set: LinkSet {
                up: Some(true),
                mtu: v.mtu,
                ..Default::default()
            },
        });
        p.inside.push(NetOp::ReplaceAddr {
            dev: v.inside.clone(),
            addr: v.addr,
            prefix: v.prefix,
        });
        p.inside
            .extend(v.routes.iter().cloned().map(NetOp::ReplaceRoute));
    }
    p
}

/// Takes veths away (their peers and the namespace's routes through them go along).
pub fn detach(hosts: &[String]) -> Vec<NetOp> {
    hosts
        .iter()
        .map(|h| NetOp::DelLink { name: h.clone() })
        .collect()
}

/// One interface per network of an overlay task: `eth<i>` with the task's /32, the gateway on
/// the link, the network's subnet via the gateway, and the default route through `exit`.
pub fn overlay_veths(
    hosts: &[String],
    addrs: &[Ipv4Addr],
    nets: &[NetworkView],
    exit: usize,
) -> Vec<Veth> {
    hosts
        .iter()
        .zip(addrs)
        .zip(nets)
        .enumerate()
        .map(|(i, ((host, addr), n))| {
            let dev = format!("eth{i}");
            let mut routes = vec![
                Route {
                    scope_link: true,
                    ..Route::via(Ipv4Net::from(n.gateway), None, &dev)
                },
                Route::via(n.subnet, Some(n.gateway), &dev),
            ];
            if i == exit {
                // Outbound traffic leaves through the host (masqueraded), like
                // docker_gwbridge; it is also the way back for host-mode published ports.
                routes.push(Route::via(Ipv4Net::default(), Some(n.gateway), &dev));
            }
            Veth {
                host: host.clone(),
                inside: dev,
                mtu: Some(n.mtu),
                master: bridge_name(&n.id),
                addr: *addr,
                prefix: 32,
                routes,
            }
        })
        .collect()
}

/// The local bridge itself (made if missing, the gateway's address, up).
pub fn local_bridge(name: &str, gw: Ipv4Addr, prefix: u8) -> Vec<NetOp> {
    vec![
        NetOp::AddBridge { name: name.into() },
        NetOp::ReplaceAddr {
            dev: name.into(),
            addr: gw,
            prefix,
        },
        NetOp::SetLink {
            name: name.into(),
            set: LinkSet {
                up: Some(true),
                ..Default::default()
            },
        },
    ]
}

/// What the overlay pass wants.
pub struct OverlayWanted<'a> {
    pub map: &'a NetworkMap,
    /// Networks configured by an earlier pass and no longer in the map: their devices go.
    pub retired: &'a BTreeSet<String>,
    /// This host's WireGuard interface (carries the encrypted networks).
    pub wg: &'a str,
}

/// The overlay pass in two steps: the devices (before the WireGuard interface is ensured),
/// then the routes, neighbours and forwarding entries (after it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OverlayPlan {
    pub links: Vec<NetOp>,
    pub routes: Vec<NetOp>,
}

/// Plans the host side of the overlay: one bridge per network holding the local slice's
/// gateway, one VXLAN device per clear network, routes to the peers' slices through the
/// network's tunnel, an `unreachable` route per encrypted subnet (so nothing of it leaves
/// in clear), and what each VXLAN device needs to reach the peers' gateways.
pub fn overlay(w: &OverlayWanted, seen: &Observed) -> OverlayPlan {
    let mut p = OverlayPlan::default();
    let has = |name: &str| seen.links.contains_key(name);
    for id in w.retired {
        for dev in [bridge_name(id), vxlan_name(id)] {
            if has(&dev) {
                p.links.push(NetOp::DelLink { name: dev });
            }
        }
    }
    let wanted: BTreeMap<&str, &NetworkView> =
        w.map.networks.iter().map(|n| (n.id.as_str(), n)).collect();
    for n in wanted.values() {
        let br = bridge_name(&n.id);
        if !has(&br) {
            p.links.push(NetOp::AddBridge { name: br.clone() });
        }
        p.links.push(NetOp::SetLink {
            name: br.clone(),
            set: LinkSet {
                up: Some(true),
                mtu: Some(n.mtu),
                ..Default::default()
            },
        });
        p.links.push(NetOp::ReplaceAddr {
            dev: br.clone(),
            addr: n.gateway,
            prefix: n.local_slice.prefix_len(),
        });
        if !n.encrypted {
            let vx = vxlan_name(&n.id);
            if !has(&vx) {
                p.links.push(NetOp::AddVxlan {
                    name: vx.clone(),
                    vni: n.vni,
                    port: VXLAN_PORT,
                });
            }
            p.links.push(NetOp::SetLink {
                name: vx,
                set: LinkSet {
                    up: Some(true),
                    mtu: Some(n.mtu),
                    mac: Some(vtep_mac(n.vni, n.gateway)),
                    ..Default::default()
                },
            });
        }
    }
    for n in wanted.values() {
        p.links.push(NetOp::Sysctl {
            key: format!("net/ipv4/conf/{}/send_redirects", bridge_name(&n.id)),
            value: "0".into(),
        });
    }

    let encrypted: Vec<&NetworkView> = wanted.values().filter(|n| n.encrypted).copied().collect();
    if !encrypted.is_empty() {
        let want: BTreeSet<Ipv4Net> = w
            .map
            .peers
            .iter()
            .flat_map(|peer| encrypted.iter().filter_map(|n| peer.slices.get(&n.id)))
            .copied()
            .collect();
        let gw = |_: &Ipv4Net| None;
        sync_routes(&mut p.routes, seen, w.wg, &want, gw, false);
    }
    // An encrypted subnet is unreachable except through the routes above (the peers' slices)
    // and the local bridge's: both more specific, so they win; whatever else (an unallocated
    // slice, a peer missing from the map) fails here instead of following the default route
    // out in clear.
    let want: BTreeSet<Ipv4Net> = encrypted.iter().map(|n| n.subnet).collect();
    let unreachable = |dst: Ipv4Net| Route {
        dst,
        kind: RouteKind::Unreachable,
        via: None,
        dev: None,
        scope_link: false,
        onlink: false,
        proto: RTPROT_RUDDER,
    };
    for r in &seen.routes {
        if r.kind == RouteKind::Unreachable && r.proto == RTPROT_RUDDER && !want.contains(&r.dst) {
            p.routes.push(NetOp::DelRoute(unreachable(r.dst)));
        }
    }
    p.routes
        .extend(want.iter().map(|d| NetOp::ReplaceRoute(unreachable(*d))));

    let mut fdb = Vec::new();
    for n in wanted.values().filter(|n| !n.encrypted) {
        let vx = vxlan_name(&n.id);
        let mut gws = BTreeMap::new();
        for peer in &w.map.peers {
            let Some(slice) = peer.slices.get(&n.id) else {
                continue;
            };
            let gw = Network::gateway(*slice);
            let mac = vtep_mac(n.vni, gw);
            p.routes.push(NetOp::ReplaceNeigh {
                dev: vx.clone(),
                ip: gw,
                mac,
            });
            fdb.push(NetOp::ReplaceFdb {
                dev: vx.clone(),
                mac,
                dst: peer.underlay,
            });
            gws.insert(*slice, gw);
        }
        let want: BTreeSet<Ipv4Net> = gws.keys().copied().collect();
        sync_routes(
            &mut p.routes,
            seen,
            &vx,
            &want,
            |d| gws.get(d).copied(),
            true,
        );
    }
    p.routes.append(&mut fdb);
    p
}

/// Makes the routes through `dev` (but the kernel's own) exactly `want`, each via `gw(dst)`.
fn sync_routes(
    ops: &mut Vec<NetOp>,
    seen: &Observed,
    dev: &str,
    want: &BTreeSet<Ipv4Net>,
    gw: impl Fn(&Ipv4Net) -> Option<Ipv4Addr>,
    onlink: bool,
) {
    for r in &seen.routes {
        if r.dev.as_deref() == Some(dev)
            && r.proto != RTPROT_KERNEL
            && r.kind == RouteKind::Unicast
            && !want.contains(&r.dst)
        {
            ops.push(NetOp::DelRoute(Route {
                proto: r.proto,
                ..Route::via(r.dst, None, dev)
            }));
        }
    }
    for d in want {
        ops.push(NetOp::ReplaceRoute(Route {
            onlink,
            ..Route::via(*d, gw(d), dev)
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostnet::{LinkState, ObservedRoute};
    use rudder_model::network::Peer;

    fn net(id: &str, subnet: &str, slice: &str, encrypted: bool) -> NetworkView {
        let local: Ipv4Net = slice.parse().unwrap();
        NetworkView {
            id: id.into(),
            name: format!("net-{id}"),
            subnet: subnet.parse().unwrap(),
            encrypted,
            internal: false,
            vni: 4096,
            mtu: 1420,
            local_slice: local,
            gateway: Network::gateway(local),
            services: vec![],
        }
    }

    fn peer(id: &str, underlay: &str, slices: &[(&str, &str)]) -> Peer {
        Peer {
            node_id: id.into(),
            underlay: underlay.parse().unwrap(),
            public_key: "k".into(),
            slices: slices
                .iter()
                .map(|(n, s)| (n.to_string(), s.parse().unwrap()))
                .collect(),
        }
    }

    fn link(name: &str) -> (String, LinkState) {
        (name.to_string(), LinkState::default())
    }

    fn route(dst: &str, kind: RouteKind, dev: Option<&str>, proto: u8) -> ObservedRoute {
        ObservedRoute {
            dst: dst.parse().unwrap(),
            kind,
            dev: dev.map(String::from),
            proto,
        }
    }

    /// Renders ops as `ip`-like lines, which is what the cases compare.
    fn text(ops: &[NetOp]) -> Vec<String> {
        ops.iter().map(|o| o.to_string()).collect()
    }

    struct Case {
        name: &'static str,
        nets: Vec<NetworkView>,
        peers: Vec<Peer>,
        retired: &'static [&'static str],
        seen: Observed,
        links: &'static [&'static str],
        routes: &'static [&'static str],
    }

    #[test]
    fn overlay_plans() {
        let clear = || net("cccccccccccc", "10.60.0.0/16", "10.60.1.0/24", false);
        let secret = || net("ssssssssssss", "10.61.0.0/16", "10.61.1.0/24", true);
        let cases = vec![
            Case {
                name: "nothing wanted, nothing there",
                nets: vec![],
                peers: vec![],
                retired: &[],
                seen: Observed::default(),
                links: &[],
                routes: &[],
            },
            Case {
                name: "a clear network on a fresh host: bridge, vxlan, a peer's slice",
                nets: vec![clear()],
                peers: vec![peer("h2", "10.213.7.2", &[("cccccccccccc", "10.60.2.0/24")])],
                retired: &[],
                seen: Observed::default(),
                links: &[
                    "link add rdb-cccccccc type bridge",
                    "link set rdb-cccccccc mtu 1420 up",
                    "addr replace 10.60.1.1/24 dev rdb-cccccccc",
                    "link add rdx-cccccccc type vxlan id 4096 dstport 4789 nolearning",
                    "link set rdx-cccccccc address 02:00:0a:3c:01:01 mtu 1420 up",
                    "sysctl net/ipv4/conf/rdb-cccccccc/send_redirects=0",
                ],
                routes: &[
                    "neigh replace 10.60.2.1 lladdr 02:00:0a:3c:02:01 dev rdx-cccccccc nud permanent",
                    "route replace 10.60.2.0/24 via 10.60.2.1 dev rdx-cccccccc onlink",
                    "fdb replace 02:00:0a:3c:02:01 dev rdx-cccccccc dst 10.213.7.2 self permanent",
                ],
            },
            Case {
                name: "devices that exist are not made again; a gone peer's route goes",
                nets: vec![clear()],
                peers: vec![],
                retired: &[],
                seen: Observed {
                    links: [link("rdb-cccccccc"), link("rdx-cccccccc")].into(),
                    routes: vec![
                        route("10.60.3.0/24", RouteKind::Unicast, Some("rdx-cccccccc"), 3),
                        route("10.60.0.0/16", RouteKind::Unicast, Some("rdx-cccccccc"), RTPROT_KERNEL),
                    ],
                },
                links: &[
                    "link set rdb-cccccccc mtu 1420 up",
                    "addr replace 10.60.1.1/24 dev rdb-cccccccc",
                    "link set rdx-cccccccc address 02:00:0a:3c:01:01 mtu 1420 up",
                    "sysctl net/ipv4/conf/rdb-cccccccc/send_redirects=0",
                ],
                routes: &["route del 10.60.3.0/24 dev rdx-cccccccc"],
            },
            Case {
                name: "an encrypted network: peers' slices through WireGuard, the subnet unreachable",
                nets: vec![secret()],
                peers: vec![
                    peer("h2", "10.213.7.2", &[("ssssssssssss", "10.61.2.0/24")]),
                    peer("h3", "10.213.7.3", &[]),
                ],
                retired: &[],
                seen: Observed {
                    links: [link("rdb-ssssssss")].into(),
                    routes: vec![
                        route("10.61.9.0/24", RouteKind::Unicast, Some("rwg-me"), 3),
                        route("10.99.0.0/16", RouteKind::Unreachable, None, RTPROT_RUDDER),
                        route("10.98.0.0/16", RouteKind::Unreachable, None, 3),
                    ],
                },
                links: &[
                    "link set rdb-ssssssss mtu 1420 up",
                    "addr replace 10.61.1.1/24 dev rdb-ssssssss",
                    "sysctl net/ipv4/conf/rdb-ssssssss/send_redirects=0",
                ],
                routes: &[
                    "route del 10.61.9.0/24 dev rwg-me",
                    "route replace 10.61.2.0/24 dev rwg-me",
                    "route del unreachable 10.99.0.0/16 proto 213",
                    "route replace unreachable 10.61.0.0/16 proto 213",
                ],
            },
            Case {
                name: "a retired network's devices go, only those that exist",
                nets: vec![],
                peers: vec![],
                retired: &["cccccccccccc", "ssssssssssss"],
                seen: Observed {
                    links: [link("rdb-cccccccc"), link("rdx-cccccccc"), link("rdb-ssssssss")]
                        .into(),
                    routes: vec![],
                },
                links: &[
                    "link del rdb-cccccccc",
                    "link del rdx-cccccccc",
                    "link del rdb-ssssssss",
                ],
                routes: &[],
            },
        ];
        for c in cases {
            let map = NetworkMap {
                networks: c.nets,
                peers: c.peers,
                ..Default::default()
            };
            let retired = c.retired.iter().map(|s| s.to_string()).collect();
            let w = OverlayWanted {
                map: &map,
                retired: &retired,
                wg: "rwg-me",
            };
            let p = overlay(&w, &c.seen);
            assert_eq!(text(&p.links), c.links, "{}: links", c.name);
            assert_eq!(text(&p.routes), c.routes, "{}: routes", c.name);
        }
    }

    #[test]
    fn attach_plans() {
        let ns = Path::new("/data/netns/t1");
        let a = net("aaaaaaaaaaaa", "10.50.0.0/16", "10.50.1.0/24", true);
        let mut b = net("bbbbbbbbbbbb", "10.70.0.0/16", "10.70.1.0/24", false);
        b.mtu = 1450;
        let veths = overlay_veths(
            &["rdvt10".into(), "rdvt11".into()],
            &["10.50.1.2".parse().unwrap(), "10.70.1.9".parse().unwrap()],
            &[a, b],
            1,
        );
        let p = attach(ns, &veths);
        assert_eq!(
            text(&p.host),
            [
                "link del rdvt10",
                "link add rdvt10 mtu 1420 type veth peer name eth0 netns /data/netns/t1",
                "link set rdvt10 master rdb-aaaaaaaa up",
                "link del rdvt11",
                "link add rdvt11 mtu 1450 type veth peer name eth1 netns /data/netns/t1",
                "link set rdvt11 master rdb-bbbbbbbb up",
            ]
        );
        assert_eq!(
            text(&p.inside),
            [
                "link set lo up",
                "link set eth0 mtu 1420 up",
                "addr replace 10.50.1.2/32 dev eth0",
                "route replace 10.50.1.1/32 dev eth0 scope link",
                "route replace 10.50.0.0/16 via 10.50.1.1 dev eth0",
                "link set eth1 mtu 1450 up",
                "addr replace 10.70.1.9/32 dev eth1",
                "route replace 10.70.1.1/32 dev eth1 scope link",
                "route replace 10.70.0.0/16 via 10.70.1.1 dev eth1",
                "route replace 0.0.0.0/0 via 10.70.1.1 dev eth1",
            ]
        );
        // The local bridge: one eth0 with the bridge's prefix and a default route.
        let gw: Ipv4Addr = "172.31.0.1".parse().unwrap();
        let v = Veth {
            host: "rdvb9".into(),
            inside: "eth0".into(),
            mtu: None,
            master: "rdr0".into(),
            addr: "172.31.0.2".parse().unwrap(),
            prefix: 16,
            routes: vec![Route::via(Ipv4Net::default(), Some(gw), "eth0")],
        };
        let p = attach(ns, &[v]);
        assert_eq!(
            text(&p.host),
            [
                "link del rdvb9",
                "link add rdvb9 type veth peer name eth0 netns /data/netns/t1",
                "link set rdvb9 master rdr0 up",
            ]
        );
        assert_eq!(
            text(&p.inside),
            [
                "link set lo up",
                "link set eth0 up",
                "addr replace 172.31.0.2/16 dev eth0",
                "route replace 0.0.0.0/0 via 172.31.0.1 dev eth0",
            ]
        );
        assert_eq!(
            text(&local_bridge("rdr0", gw, 16)),
            [
                "link add rdr0 type bridge",
                "addr replace 172.31.0.1/16 dev rdr0",
                "link set rdr0 up",
            ]
        );
        assert_eq!(text(&detach(&["rdvb9".into()])), ["link del rdvb9"]);
    }
}

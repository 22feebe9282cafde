//! What a host does when a service's replica set changes under live traffic (the routing mesh,
//! host-mode ports and virtual IPs), so that connections to the replicas that stay never
//! notice, and those to a replica that left end quickly instead of hanging.
//!
//! The order of a departure:
//! 1. The controller takes the task out of the network map as soon as it is asked to stop
//!    (an endpoint is a task running and meant to run), and sends the map before the stop.
//! 2. Every host reloads its nftables table: new connections and new UDP flows go only to the
//!    replicas that remain. Then it deletes the conntrack entries of its own translations to
//!    the departed backend ([`purges`]): UDP at once (a flow's next datagram is balanced again
//!    and reaches a replica that stays, instead of following the old translation to a replica
//!    about to die), TCP after [`TCP_PURGE_AFTER`] (an established connection keeps its
//!    replica while it drains; if the replica vanished without closing it, as when its host
//!    is lost, the client's next segment is answered with a reset by a remaining replica
//!    instead of going nowhere).
//! 3. The replica's host waits [`DRAIN`] before the stop signal, the time the other hosts
//!    need for step 2, so no new connection reaches a replica that is exiting.
//!
//! A new replica joins the map only once it runs (and passed its health check when it has
//! one): a service that answers only after a slow start should declare a health check.
//!
//! Safety: a [`CtFilter`] is made only for a backend address inside the network the port or
//! virtual IP belongs to (a map, even a crafted one, cannot point the purge at the host's own
//! flows or anyone else's), and only matches entries that carry the published port's
//! connection mark or were addressed to the service's virtual IP. Pure: table-tested below.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use rudder_model::network::{NetworkMap, NetworkView, PublishedPort};
use rudder_model::ports::Protocol;

use crate::hostnet::conntrack::{CtFilter, CtScope, TCP, UDP};

/// How long a stopping task that other hosts may still send new connections to keeps running
/// before its stop signal: the map has left every host by then (a map pass takes tens of
/// milliseconds; the rest is margin for a loaded host).
pub const DRAIN: Duration = Duration::from_secs(1);

/// How long TCP entries of a departed backend live on before they are deleted (its graceful
/// stop, DRAIN plus the usual grace, has ended by then).
pub const TCP_PURGE_AFTER: Duration = Duration::from_secs(15);

/// Connection mark of ingress (routing mesh) connections.
const MARK_INGRESS: u32 = crate::mesh::MARK_INGRESS;

/// Whether `addr` may be a task of `net`: inside its subnet, not its network or broadcast
/// address, not a gateway (every host's gateway is the first address of a slice).
fn is_task_addr(net: &NetworkView, addr: Ipv4Addr) -> bool {
    net.subnet.contains(&addr)
        && addr != net.subnet.network()
        && addr != net.subnet.broadcast()
        && addr != net.gateway
}

fn proto(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => TCP,
        Protocol::Udp => UDP,
    }
}

/// A published port's identity across maps.
fn port_key(p: &PublishedPort) -> (u8, u16, &str) {
    (proto(p.protocol), p.published, p.network.as_str())
}

/// The conntrack entries to delete when this host goes from map `old` to map `new`: for each
/// published port (ingress or host mode, with its mark) and each virtual IP, the backends
/// `old` had and `new` has not. Backends outside the port's or VIP's network are ignored.
pub fn purges(old: &NetworkMap, new: &NetworkMap, hostport_mark: u32) -> Vec<CtFilter> {
    let mut out = BTreeSet::new();
    let nets: BTreeMap<&str, &NetworkView> = old
        .networks
        .iter()
        .chain(&new.networks)
        .map(|n| (n.id.as_str(), n))
        .collect();
    for (ports, mark) in [
        (&old.ingress, MARK_INGRESS),
        (&old.host_ports, hostport_mark),
    ] {
        let new_ports = if mark == MARK_INGRESS {
            &new.ingress
        } else {
            &new.host_ports
        };
        for p in ports {
            let Some(net) = nets.get(p.network.as_str()) else {
                continue;
            };
            let kept: BTreeSet<Ipv4Addr> = new_ports
                .iter()
                .filter(|q| port_key(q) == port_key(p))
                .flat_map(|q| q.backends.iter().copied())
                .collect();
            for b in &p.backends {
                if kept.contains(b) || !is_task_addr(net, *b) {
                    continue;
                }
                out.insert(CtFilter {
                    proto: Some(proto(p.protocol)),
                    backend: *b,
                    port: Some(p.target),
                    scope: CtScope::Mark {
                        mark,
                        published: p.published,
                    },
                });
            }
        }
    }
    for n in &old.networks {
        for s in &n.services {
            let Some(vip) = s.vip.filter(|v| n.subnet.contains(v)) else {
                continue;
            };
            let kept: BTreeSet<Ipv4Addr> = new
                .networks
                .iter()
                .filter(|m| m.id == n.id)
                .flat_map(|m| &m.services)
                .filter(|t| t.name == s.name && t.vip == s.vip)
                .flat_map(|t| t.tasks.iter().copied())
                .collect();
            for b in &s.tasks {
                if kept.contains(b) || !is_task_addr(n, *b) {
                    continue;
                }
                out.insert(CtFilter {
                    proto: None,
                    backend: *b,
                    port: None,
                    scope: CtScope::Vip(vip),
                });
            }
        }
    }
    out.into_iter().collect()
}

/// `filters` split into those to run now (UDP) and those to run after [`TCP_PURGE_AFTER`]
/// (TCP). A VIP's filter (any protocol) is split into both.
pub fn now_and_later(filters: &[CtFilter]) -> (Vec<CtFilter>, Vec<CtFilter>) {
    let mut now = Vec::new();
    let mut later = Vec::new();
    for f in filters {
        match f.proto {
            Some(UDP) => now.push(*f),
            Some(_) => later.push(*f),
            None => {
                now.push(CtFilter {
                    proto: Some(UDP),
                    ..*f
                });
                later.push(CtFilter {
                    proto: Some(TCP),
                    ..*f
                });
            }
        }
    }
    (now, later)
}

/// Of the deferred `filters`, those whose backend is still absent from `current` (a backend
/// that came back, an address given to a new task of the same service, keeps its entries).
pub fn still_departed(
    filters: &[CtFilter],
    old: &NetworkMap,
    current: &NetworkMap,
    hostport_mark: u32,
) -> Vec<CtFilter> {
    let again = purges(old, current, hostport_mark);
    filters
        .iter()
        .filter(|f| {
            again.iter().any(|g| {
                g.backend == f.backend
                    && g.scope == f.scope
                    && g.port == f.port
                    && g.proto.is_none_or(|p| Some(p) == f.proto)
            })
        })
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::network::{Network, ServiceEndpoints};

    const HOSTPORT: u32 = 0x5245;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(tasks: &[&str]) -> NetworkView {
        let slice = "10.96.1.0/24".parse().unwrap();
        NetworkView {
            id: "nnnnnnnnnnnn".into(),
            name: "mesh".into(),
            subnet: "10.96.0.0/16".parse().unwrap(),
            encrypted: true,
            internal: false,
            vni: 4097,
            mtu: 1420,
            local_slice: slice,
            gateway: Network::gateway(slice),
            services: vec![ServiceEndpoints {
                name: "web".into(),
                aliases: vec![],
                vip: Some(ip("10.96.0.2")),
                tasks: tasks.iter().map(|t| ip(t)).collect(),
            }],
        }
    }

    fn port(protocol: Protocol, published: u16, backends: &[&str]) -> PublishedPort {
        PublishedPort {
            service: "web".into(),
            protocol,
            published,
            target: 80,
            network: "nnnnnnnnnnnn".into(),
            backends: backends.iter().map(|b| ip(b)).collect(),
        }
    }

    fn map(backends: &[&str]) -> NetworkMap {
        NetworkMap {
            networks: vec![net(backends)],
            ingress: vec![
                port(Protocol::Tcp, 8080, backends),
                port(Protocol::Udp, 8081, backends),
            ],
            ..Default::default()
        }
    }

    fn text(fs: &[CtFilter]) -> Vec<String> {
        fs.iter().map(|f| f.to_string()).collect()
    }

    /// Scaling down purges exactly the departed backend's translations: the published ports'
    /// (with their mark) and the VIP's; scaling up or an unchanged map purges nothing.
    #[test]
    fn departed_backends_are_purged() {
        let five = map(&["10.96.1.2", "10.96.1.3", "10.96.2.2"]);
        let two = map(&["10.96.1.2", "10.96.2.2"]);
        assert_eq!(
            text(&purges(&five, &two, HOSTPORT)),
            [
                "any reply-src 10.96.1.3 orig-dst 10.96.0.2",
                "tcp reply-src 10.96.1.3 reply-sport 80 mark 0x5244 orig-dport 8080",
                "udp reply-src 10.96.1.3 reply-sport 80 mark 0x5244 orig-dport 8081",
            ]
        );
        assert!(purges(&two, &five, HOSTPORT).is_empty());
        assert!(purges(&five, &five, HOSTPORT).is_empty());
        // A port unpublished, or the whole network gone: all its backends.
        let gone = NetworkMap::default();
        assert_eq!(purges(&two, &gone, HOSTPORT).len(), 6);
        // Host-mode ports carry their own mark.
        let hp = |b: &[&str]| NetworkMap {
            networks: vec![net(&[])],
            host_ports: vec![port(Protocol::Tcp, 9000, b)],
            ..Default::default()
        };
        assert_eq!(
            text(&purges(&hp(&["10.96.1.2"]), &hp(&[]), HOSTPORT)),
            ["tcp reply-src 10.96.1.2 reply-sport 80 mark 0x5245 orig-dport 9000"]
        );
    }

    /// UDP goes at once, TCP later; a VIP's filter is both.
    #[test]
    fn udp_now_tcp_later() {
        let fs = purges(
            &map(&["10.96.1.2", "10.96.1.3"]),
            &map(&["10.96.1.2"]),
            HOSTPORT,
        );
        let (now, later) = now_and_later(&fs);
        assert_eq!(
            text(&now),
            [
                "udp reply-src 10.96.1.3 orig-dst 10.96.0.2",
                "udp reply-src 10.96.1.3 reply-sport 80 mark 0x5244 orig-dport 8081",
            ]
        );
        assert_eq!(
            text(&later),
            [
                "tcp reply-src 10.96.1.3 orig-dst 10.96.0.2",
                "tcp reply-src 10.96.1.3 reply-sport 80 mark 0x5244 orig-dport 8080",
            ]
        );
        // The backend is back by the time the TCP purge runs: nothing goes.
        let old = map(&["10.96.1.2", "10.96.1.3"]);
        assert!(still_departed(&later, &old, &old, HOSTPORT).is_empty());
        assert_eq!(
            still_departed(&later, &old, &map(&["10.96.1.2"]), HOSTPORT),
            later
        );
    }

    /// A crafted map cannot aim the purge outside Rudder's own translations: backends outside
    /// the port's network (the host, the client, another network, loopback), its gateway and
    /// its network address, and a VIP outside the network are ignored; every filter made is
    /// scoped by Rudder's mark or by the VIP.
    #[test]
    fn crafted_maps_cannot_purge_other_flows() {
        let evil = [
            "10.213.0.254",
            "10.213.0.1",
            "127.0.0.1",
            "10.97.1.2",
            "10.96.1.1",
            "10.96.0.0",
            "10.96.255.255",
            "0.0.0.0",
        ];
        let mut old = map(&evil);
        old.networks[0].services.push(ServiceEndpoints {
            name: "evil".into(),
            aliases: vec![],
            vip: Some(ip("10.213.0.1")),
            tasks: vec![ip("10.96.1.9")],
        });
        // A port claiming a network the map does not have.
        old.ingress.push(PublishedPort {
            network: "unknown00000".into(),
            ..port(Protocol::Udp, 53, &["10.96.1.9"])
        });
        assert_eq!(purges(&old, &NetworkMap::default(), HOSTPORT), []);
        for f in purges(&map(&["10.96.1.2"]), &NetworkMap::default(), HOSTPORT) {
            match f.scope {
                CtScope::Mark { mark, .. } => assert_eq!(mark, MARK_INGRESS),
                CtScope::Vip(v) => assert_eq!(v, ip("10.96.0.2")),
            }
        }
    }
}

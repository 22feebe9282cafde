//! Read-only views of the store that other parts ask for: the network map one node's agent
//! gets, and who uses or holds a volume. They sit above the store (the store's own types never
//! query it), so the model stays layered: node, spec, network, volume types → store → views.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::network::{Network, NetworkMap, NetworkView, Peer, PublishedPort, ServiceEndpoints};
use crate::node::NodeState;
use crate::ports::PortMode;
use crate::store::Store;
use crate::task::TaskState;

/// The network map for `node_id`.
pub fn map_for_node(store: &Store, node_id: &str) -> NetworkMap {
    let mut map = NetworkMap {
        key_epoch: store.overlay_key_epoch,
        ..Default::default()
    };
    if store.networks.is_empty() {
        // No overlay: nothing to configure (and nothing to recompute on every change).
        return map;
    }
    // Tasks that may receive traffic, by (network name, service name).
    let mut endpoints: BTreeMap<(&str, &str), Vec<Ipv4Addr>> = BTreeMap::new();
    for t in store.tasks.values() {
        let node_ok = t
            .node_id
            .as_ref()
            .and_then(|n| store.nodes.get(n))
            .is_some_and(|n| n.state != NodeState::Down);
        if t.desired_state != TaskState::Running || t.status.state != TaskState::Running || !node_ok
        {
            continue;
        }
        for a in &t.networks {
            endpoints
                .entry((a.network.as_str(), t.service_name.as_str()))
                .or_default()
                .push(a.address);
        }
    }
    for net in store.networks.values() {
        let Some(local) = net.node_slice(node_id) else {
            continue;
        };
        let services = store
            .services
            .values()
            .filter(|s| s.spec.networks.contains(&net.spec.name))
            .map(|s| ServiceEndpoints {
                name: s.spec.name.clone(),
                aliases: s.spec.aliases.clone(),
                vip: s.vips.get(&net.spec.name).copied(),
                tasks: endpoints
                    .get(&(net.spec.name.as_str(), s.spec.name.as_str()))
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        map.networks.push(NetworkView {
            id: net.id.clone(),
            name: net.spec.name.clone(),
            subnet: net.subnet,
            encrypted: net.spec.encrypted,
            internal: net.spec.internal,
            vni: net.vni,
            mtu: net.mtu(),
            local_slice: local,
            gateway: Network::gateway(local),
            services,
        });
    }
    for node in store.nodes.values() {
        if node.id == node_id {
            continue;
        }
        let Some(underlay) = node
            .addr
            .parse::<std::net::SocketAddr>()
            .ok()
            .and_then(|a| match a.ip() {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            })
        else {
            continue;
        };
        let slices = store
            .networks
            .values()
            .filter_map(|n| n.node_slice(&node.id).map(|s| (n.id.clone(), s)))
            .collect();
        map.peers.push(Peer {
            node_id: node.id.clone(),
            underlay,
            public_key: node.overlay_key.clone(),
            slices,
        });
    }
    for svc in store.services.values() {
        let Some(first) = svc.spec.networks.first() else {
            continue;
        };
        let Some(net) = store.networks.get(first) else {
            continue;
        };
        let backends = endpoints
            .get(&(first.as_str(), svc.spec.name.as_str()))
            .cloned()
            .unwrap_or_default();
        for p in &svc.spec.ports {
            let mut port = PublishedPort {
                service: svc.spec.name.clone(),
                protocol: p.protocol,
                published: p.published_port(),
                target: p.target,
                network: net.id.clone(),
                backends: backends.clone(),
            };
            match p.mode {
                PortMode::Ingress => map.ingress.push(port),
                PortMode::Host => {
                    // Only this node's tasks, each bound where it runs.
                    port.backends = store
                        .tasks
                        .values()
                        .filter(|t| {
                            t.service_id == svc.id
                                && t.node_id.as_deref() == Some(node_id)
                                && t.desired_state == TaskState::Running
                                && !t.status.state.is_terminal()
                        })
                        .filter_map(|t| t.networks.first().map(|a| a.address))
                        .collect();
                    if !port.backends.is_empty() {
                        map.host_ports.push(port);
                    }
                }
            }
        }
    }
    map
}

/// Services whose spec mounts volume `name`, by name.
pub fn volume_users<'a>(store: &'a Store, name: &str) -> Vec<&'a str> {
    store.volume_users(name)
}

/// Hostnames whose agent reported a copy of volume `name`'s data.
pub fn hosts_with_copy(store: &Store, name: &str) -> Vec<String> {
    let mut hosts: Vec<String> = store
        .volume_copies
        .iter()
        .filter(|(_, names)| names.contains(name))
        .map(|(node, _)| {
            store
                .nodes
                .get(node)
                .map(|n| n.hostname.clone())
                .unwrap_or_else(|| node.clone())
        })
        .collect();
    hosts.sort();
    hosts
}

/// The declared volumes' names, as the dispatcher sends them to every agent: a host deletes
/// its copy of any other volume once no local container mounts it.
pub fn declared_volumes(store: &Store) -> BTreeSet<String> {
    store.volumes.keys().cloned().collect()
}

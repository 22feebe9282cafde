//! Overlay networks: specs, address management (IPAM) and the per-node network map.
//!
//! Addressing is routed, not bridged across hosts (as in flannel or Calico rather than swarm's
//! VXLAN L2): a network's subnet is cut into equal slices; slice 0 holds the services' virtual
//! IPs and every node owns one other slice, in every network. A task gets an address from its
//! node's slice, and the node's bridge for the network holds the slice's first address as the
//! tasks' gateway. Between hosts, the tunnel (WireGuard, or VXLAN when `encrypted: false`)
//! carries each node's slices to it. Because every packet between hosts is routed by both
//! hosts, one place (the host) can balance virtual IPs, filter between networks and publish
//! ports, whatever the tunnel.
//!
//! Invariants (all allocation happens while applying committed commands, so every controller
//! computes the same addresses):
//! - networks' subnets never overlap one another;
//! - a node's slice is the same for as long as the network exists;
//! - an address is held by at most one unfinished task; a freed address is not handed out again
//!   until the slice's cursor wraps, so stale conntrack entries or caches rarely meet a new owner.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::ports::Protocol;
use crate::ValidationError;

/// The pool default subnets come from: one /16 per network. Chosen clear of the usual
/// home/office ranges and of the lab's underlay (10.213.0.0/16).
pub const DEFAULT_POOL: &str = "10.96.0.0/11";

/// MTU inside an encrypted network: 1500 minus WireGuard's 80 bytes (IPv6 underlay worst case).
pub const MTU_WIREGUARD: u32 = 1420;
/// MTU inside an unencrypted network: 1500 minus VXLAN's 50 bytes.
pub const MTU_VXLAN: u32 = 1450;

/// How a network's tasks reach one another across hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkDriver {
    /// An overlay between hosts: WireGuard, or VXLAN when unencrypted.
    #[default]
    Overlay,
}

/// A declared network (`kind: Network`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// The network's name, unique in the cluster.
    pub name: String,
    /// Only `overlay`.
    #[serde(default)]
    pub driver: NetworkDriver,
    /// `A.B.C.D/N` with N between 8 and 24; defaults to the next free /16 of the cluster's
    /// pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// WireGuard between hosts (the default); `false` uses VXLAN, for trusted underlays.
    #[serde(default = "yes")]
    pub encrypted: bool,
    /// No way out (Docker's `--internal`): its tasks reach one another and nothing else — no
    /// route to the hosts or beyond, and the embedded DNS answers only service names.
    #[serde(default, skip_serializing_if = "is_false")]
    pub internal: bool,
    /// Free-form labels, for the user.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn yes() -> bool {
    true
}

impl NetworkSpec {
    /// Checks the name, subnet shape and labels.
    pub fn validate(&self) -> Result<(), ValidationError> {
        crate::spec::validate_name("name", &self.name)?;
        if self.name.len() > 40 {
            return Err(ValidationError::new("name", "at most 40 characters"));
        }
        if let Some(s) = &self.subnet {
            parse_subnet(s).map_err(|m| ValidationError::new("subnet", m))?;
        }
        Ok(())
    }

    /// Whether applying `other` over `self` changes anything but labels (which is refused:
    /// tasks hold addresses in the old subnet).
    pub fn same_shape(&self, other: &NetworkSpec) -> bool {
        self.driver == other.driver
            && self.encrypted == other.encrypted
            && self.internal == other.internal
            && (other.subnet.is_none() || self.subnet == other.subnet)
    }
}

/// Parses a subnet the way a network accepts it.
pub fn parse_subnet(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 subnet like 10.50.0.0/16"))?;
    if net.network() != net.addr() {
        return Err(format!(
            "{s:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    if !(8..=24).contains(&net.prefix_len()) {
        return Err(format!(
            "{s:?}: the prefix must be between /8 and /24 (it is cut into per-host slices)"
        ));
    }
    Ok(net)
}

/// A network in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Generated on creation.
    pub id: String,
    /// The spec as declared.
    pub spec: NetworkSpec,
    /// The subnet in force (the spec's, or the one drawn from the pool).
    pub subnet: Ipv4Net,
    /// VXLAN network identifier (unencrypted networks); unique per network.
    pub vni: u32,
    /// Node id → slice index (1-based; slice 0 holds virtual IPs).
    #[serde(default)]
    pub slices: BTreeMap<String, u32>,
    /// Node id → last host offset handed out in its slice (the allocation cursor).
    #[serde(default)]
    pub cursors: BTreeMap<String, u32>,
    /// Milliseconds since the epoch, stamped by the leader.
    pub created_at: u64,
    /// Raft index of its last write.
    pub version: u64,
}

impl Network {
    /// Prefix length of one slice: 256 slices where the subnet allows, never smaller than a /28.
    pub fn slice_prefix(&self) -> u8 {
        slice_prefix(self.subnet)
    }

    /// How many slices the subnet holds.
    pub fn slice_count(&self) -> u32 {
        1u32 << (self.slice_prefix() - self.subnet.prefix_len())
    }

    /// Slice `i` of the subnet.
    pub fn slice(&self, i: u32) -> Ipv4Net {
        let size = 1u32 << (32 - self.slice_prefix());
        let base = u32::from(self.subnet.network()) + i * size;
        Ipv4Net::new(Ipv4Addr::from(base), self.slice_prefix()).expect("prefix is valid")
    }

    /// The node's slice, once it has one.
    pub fn node_slice(&self, node: &str) -> Option<Ipv4Net> {
        self.slices.get(node).map(|i| self.slice(*i))
    }

    /// The gateway (host bridge) address of a slice: its first host address.
    pub fn gateway(slice: Ipv4Net) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(slice.network()) + 1)
    }

    /// The MTU of the network's interfaces: the underlay's less the tunnel's overhead.
    pub fn mtu(&self) -> u32 {
        if self.spec.encrypted {
            MTU_WIREGUARD
        } else {
            MTU_VXLAN
        }
    }

    /// Gives `node` a slice if it has none (the lowest free one). False when all are taken.
    pub fn ensure_slice(&mut self, node: &str) -> bool {
        if self.slices.contains_key(node) {
            return true;
        }
        let taken: std::collections::BTreeSet<u32> = self.slices.values().copied().collect();
        match (1..self.slice_count()).find(|i| !taken.contains(i)) {
            Some(i) => {
                self.slices.insert(node.to_string(), i);
                true
            }
            None => false,
        }
    }

    /// The next free address of `node`'s slice after its cursor (offsets 2..size-1: the
    /// network address, the gateway and the broadcast address are never handed out).
    pub fn allocate(
        &mut self,
        node: &str,
        used: &std::collections::BTreeSet<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let slice = self.node_slice(node)?;
        let size = 1u32 << (32 - self.slice_prefix());
        let base = u32::from(slice.network());
        let start = self.cursors.get(node).copied().unwrap_or(1);
        let usable = size - 3; // offsets 2..=size-2
        for step in 1..=usable {
            let off = 2 + (start - 1 + step - 1) % usable;
            let addr = Ipv4Addr::from(base + off);
            if !used.contains(&addr) {
                self.cursors.insert(node.to_string(), off);
                return Some(addr);
            }
        }
        None
    }

    /// A virtual IP from slice 0 not in `used` (lowest first; VIPs live as long as services).
    pub fn allocate_vip(&self, used: &std::collections::BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let slice = self.slice(0);
        let size = 1u32 << (32 - self.slice_prefix());
        let base = u32::from(slice.network());
        (2..size - 1)
            .map(|off| Ipv4Addr::from(base + off))
            .find(|a| !used.contains(a))
    }
}

/// Prefix length of one slice of `subnet`: 256 slices where it allows, never smaller than a /28.
pub fn slice_prefix(subnet: Ipv4Net) -> u8 {
    (subnet.prefix_len() + 8).clamp(24, 28)
}

/// The first /16 of the default pool that overlaps none of `taken`.
pub fn next_default_subnet(taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    let pool: Ipv4Net = DEFAULT_POOL.parse().expect("valid pool");
    pool.subnets(16)
        .ok()?
        .find(|c| !taken.iter().any(|t| overlaps(*t, *c)))
}

/// Whether two subnets share any address.
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// One network a task is attached to, with its address there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The network's name.
    pub network: String,
    /// The task's address on it.
    pub address: Ipv4Addr,
}

/// How a service's name resolves on its networks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// The name resolves to one virtual IP that balances connections over healthy tasks.
    #[default]
    Vip,
    /// The name resolves to the healthy tasks' addresses (DNS round robin).
    Dnsrr,
}

impl EndpointMode {
    /// Whether the name resolves to a virtual IP.
    pub fn is_vip(&self) -> bool {
        *self == EndpointMode::Vip
    }
}

// ---- the network map: what one node needs to configure its overlay ----------------------

/// Everything one agent needs for its overlay, computed from the store by `views::map_for_node`
/// and sent whenever it changes. The agent makes its host match it, idempotently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMap {
    /// Bumped by `rctl network rotate-keys`: an agent whose key is older makes a new one.
    pub key_epoch: u64,
    /// The networks with a task on this node, or that it serves ingress ports for.
    pub networks: Vec<NetworkView>,
    /// Every other node with a WireGuard key or an underlay address.
    pub peers: Vec<Peer>,
    /// Ports published in `ingress` mode: every node answers and forwards to a task.
    pub ingress: Vec<PublishedPort>,
    /// Ports published in `host` mode by this node's networked tasks.
    pub host_ports: Vec<PublishedPort>,
}

/// One network as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    /// The network's id.
    pub id: String,
    /// The network's name.
    pub name: String,
    /// The whole subnet.
    pub subnet: Ipv4Net,
    /// WireGuard (true) or VXLAN between hosts.
    pub encrypted: bool,
    /// See [`NetworkSpec::internal`].
    #[serde(default)]
    pub internal: bool,
    /// VXLAN network identifier.
    pub vni: u32,
    /// MTU of its interfaces.
    pub mtu: u32,
    /// This node's slice; the gateway is its first address.
    pub local_slice: Ipv4Net,
    /// The local bridge's address in `local_slice`.
    pub gateway: Ipv4Addr,
    /// Services attached to this network and their reachable tasks.
    pub services: Vec<ServiceEndpoints>,
}

/// One service as its network's DNS and load balancing see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEndpoints {
    /// The service's name.
    pub name: String,
    /// The service's other names on this network (`ServiceSpec::aliases`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Its virtual IP (endpoint mode `vip`).
    pub vip: Option<Ipv4Addr>,
    /// Tasks that are running (health passed, where there is a check) and meant to run.
    pub tasks: Vec<Ipv4Addr>,
}

/// Another node, as the overlay reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The node's id.
    pub node_id: String,
    /// The node's underlay address (tunnel endpoint).
    pub underlay: Ipv4Addr,
    /// WireGuard public key (base64); empty until the agent reported one.
    pub public_key: String,
    /// The peer's slice in each network (by network id).
    pub slices: BTreeMap<String, Ipv4Net>,
}

/// A published port and where it forwards to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The publishing service's name.
    pub service: String,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port on the nodes.
    pub published: u16,
    /// The port on the tasks.
    pub target: u16,
    /// Network (id) the backends are on; its local gateway is the source for forwarded
    /// connections.
    pub network: String,
    /// The tasks' addresses on `network`.
    pub backends: Vec<Ipv4Addr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(subnet: &str) -> Network {
        Network {
            id: "n".into(),
            spec: NetworkSpec {
                name: "n".into(),
                driver: NetworkDriver::Overlay,
                subnet: Some(subnet.into()),
                encrypted: true,
                internal: false,
                labels: Default::default(),
            },
            subnet: subnet.parse().unwrap(),
            vni: 4096,
            slices: Default::default(),
            cursors: Default::default(),
            created_at: 0,
            version: 0,
        }
    }

    #[test]
    fn subnets_are_checked() {
        assert!(parse_subnet("10.50.0.0/16").is_ok());
        for (bad, why) in [
            ("10.50.0.1/16", "host bits"),
            ("10.50.0.0/25", "between /8 and /24"),
            ("10.50.0.0", "not an IPv4 subnet"),
            ("fd00::/64", "not an IPv4 subnet"),
        ] {
            let e = parse_subnet(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn slices_and_addresses() {
        let mut n = net("10.50.0.0/16");
        assert_eq!(n.slice_prefix(), 24);
        assert_eq!(n.slice_count(), 256);
        assert!(n.ensure_slice("a"));
        assert!(n.ensure_slice("b"));
        assert_eq!(n.node_slice("a").unwrap().to_string(), "10.50.1.0/24");
        assert_eq!(n.node_slice("b").unwrap().to_string(), "10.50.2.0/24");
        assert_eq!(
            Network::gateway(n.node_slice("b").unwrap()),
            Ipv4Addr::new(10, 50, 2, 1)
        );
        let mut used = std::collections::BTreeSet::new();
        let a1 = n.allocate("a", &used).unwrap();
        assert_eq!(a1, Ipv4Addr::new(10, 50, 1, 2));
        used.insert(a1);
        let a2 = n.allocate("a", &used).unwrap();
        assert_eq!(a2, Ipv4Addr::new(10, 50, 1, 3));
        // Freed addresses are not reused until the cursor wraps.
        used.remove(&a1);
        assert_eq!(n.allocate("a", &used).unwrap(), Ipv4Addr::new(10, 50, 1, 4));
        assert_eq!(n.allocate_vip(&used).unwrap(), Ipv4Addr::new(10, 50, 0, 2));
    }

    #[test]
    fn small_subnets_get_small_slices_and_run_out() {
        let mut n = net("10.60.0.0/24");
        assert_eq!(n.slice_prefix(), 28);
        assert_eq!(n.slice_count(), 16);
        for i in 0..15 {
            assert!(n.ensure_slice(&format!("node{i}")));
        }
        assert!(!n.ensure_slice("one-too-many"));
        let mut used = std::collections::BTreeSet::new();
        for _ in 0..13 {
            used.insert(n.allocate("node0", &used).unwrap());
        }
        assert_eq!(n.allocate("node0", &used), None, "a /28 holds 13 tasks");
        assert!(used
            .iter()
            .all(|a| n.node_slice("node0").unwrap().contains(a)));
    }

    #[test]
    fn default_subnets_skip_taken_ones() {
        let taken: Vec<Ipv4Net> = vec![
            "10.96.0.0/16".parse().unwrap(),
            "10.97.0.0/20".parse().unwrap(),
        ];
        assert_eq!(
            next_default_subnet(&taken).unwrap().to_string(),
            "10.98.0.0/16"
        );
    }
}

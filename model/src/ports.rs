//! Published ports. In `host` mode a task's port is bound on the node it runs on, so two tasks
//! publishing the same host port can never share a node: the scheduler's port filter keeps them
//! apart. In `ingress` mode (the routing mesh, for services on an overlay network) every node
//! answers on the port and forwards to a healthy task anywhere. Mapping a port (published ≠
//! target) needs the container in its own network namespace, i.e. on a network.

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// A published port's transport protocol.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP, the default.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The lowercase name, as in specs and nftables rules.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// How a published port is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortMode {
    /// Bound on the node where the task runs.
    #[default]
    Host,
    /// Every node answers and forwards to a task (the routing mesh).
    Ingress,
}

/// A port a service publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// Port the container listens on.
    pub target: u16,
    /// Port on the node; defaults to `target`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<u16>,
    /// TCP unless set.
    #[serde(default)]
    pub protocol: Protocol,
    /// Host (only the task's node) or ingress (every node).
    #[serde(default)]
    pub mode: PortMode,
}

impl PortConfig {
    /// The port on the node: `published`, else `target`.
    pub fn published_port(&self) -> u16 {
        self.published.unwrap_or(self.target)
    }
}

/// Host ports (`protocol`, `port`) a spec's tasks hold on their node.
pub fn host_ports(ports: &[PortConfig]) -> impl Iterator<Item = (Protocol, u16)> + '_ {
    ports
        .iter()
        .filter(|p| p.mode == PortMode::Host)
        .map(|p| (p.protocol, p.published_port()))
}

/// Where a service's containers live, as far as publishing ports is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortNet {
    /// The host's network namespace: the container's port is the host's.
    Host,
    /// Only loopback: nothing can be published.
    None,
    /// Own namespace on overlay networks: host ports map to container ports, and the routing
    /// mesh is available (not with DNS round robin, which has no virtual IP to balance).
    Overlay {
        /// The service resolves by DNS round robin (no virtual IP, so no routing mesh).
        dnsrr: bool,
    },
    /// Own namespace on the host's local bridge: host ports map to container ports.
    Bridge,
}

impl From<&crate::spec::NetworkMode> for PortNet {
    fn from(m: &crate::spec::NetworkMode) -> Self {
        match m {
            crate::spec::NetworkMode::Host => PortNet::Host,
            // The shared namespace's owner publishes; a sidecar has nothing of its own.
            crate::spec::NetworkMode::None | crate::spec::NetworkMode::Container(_) => {
                PortNet::None
            }
            crate::spec::NetworkMode::Bridge => PortNet::Bridge,
        }
    }
}

/// Checks `ports` for a service whose containers live in `net`.
pub fn validate(ports: &[PortConfig], net: PortNet) -> Result<(), ValidationError> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let field = |f: &str| format!("ports[{i}].{f}");
        if p.target == 0 {
            return Err(ValidationError::new(field("target"), "must be 1-65535"));
        }
        if p.published == Some(0) {
            return Err(ValidationError::new(field("published"), "must be 1-65535"));
        }
        match net {
            PortNet::None => {
                return Err(ValidationError::new(
                    format!("ports[{i}]"),
                    "network_mode: none has no interface to publish on",
                ))
            }
            PortNet::Host | PortNet::Bridge if p.mode == PortMode::Ingress => {
                return Err(ValidationError::new(
                    field("mode"),
                    "ingress (the routing mesh) needs the service on an overlay network \
                     (`networks:`); without one use mode: host",
                ))
            }
            PortNet::Host if p.published_port() != p.target => {
                return Err(ValidationError::new(
                    field("published"),
                    format!(
                        "{} differs from target {}: with network_mode: host the container's \
                         port is the host's; mapping ports needs the service on a network",
                        p.published_port(),
                        p.target
                    ),
                ))
            }
            PortNet::Overlay { dnsrr: true } if p.mode == PortMode::Ingress => {
                return Err(ValidationError::new(
                    field("mode"),
                    "ingress needs a virtual IP: use endpoint_mode: vip, or mode: host",
                ))
            }
            _ => {}
        }
        if !seen.insert((p.protocol, p.published_port())) {
            return Err(ValidationError::new(
                field("published"),
                format!(
                    "{}/{} is published twice",
                    p.published_port(),
                    p.protocol.as_str()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(target: u16, published: Option<u16>, mode: PortMode) -> PortConfig {
        PortConfig {
            target,
            published,
            protocol: Protocol::Tcp,
            mode,
        }
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            (vec![port(0, None, PortMode::Host)], true, "ports[0].target"),
            (
                vec![port(80, None, PortMode::Ingress)],
                true,
                "ports[0].mode",
            ),
            (
                vec![port(80, Some(8080), PortMode::Host)],
                true,
                "ports[0].published",
            ),
            (vec![port(80, None, PortMode::Host)], false, "ports[0]"),
            (
                vec![
                    port(80, None, PortMode::Host),
                    port(80, Some(80), PortMode::Host),
                ],
                true,
                "ports[1].published",
            ),
        ];
        for (ports, host, field) in cases {
            let net = if host { PortNet::Host } else { PortNet::None };
            assert_eq!(validate(&ports, net).unwrap_err().field, field);
        }
        let overlay = PortNet::Overlay { dnsrr: false };
        validate(&[port(80, Some(8080), PortMode::Ingress)], overlay).unwrap();
        let e = validate(
            &[port(80, None, PortMode::Ingress)],
            PortNet::Overlay { dnsrr: true },
        )
        .unwrap_err();
        assert_eq!(e.field, "ports[0].mode");
        let ok = vec![
            port(80, None, PortMode::Host),
            PortConfig {
                protocol: Protocol::Udp,
                ..port(80, None, PortMode::Host)
            },
        ];
        validate(&ok, PortNet::Host).unwrap();
        assert_eq!(
            host_ports(&ok).collect::<Vec<_>>(),
            [(Protocol::Tcp, 80), (Protocol::Udp, 80)]
        );
    }
}

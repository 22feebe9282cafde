//! Published ports. In `host` mode a task's port is bound on the node it runs on, so two tasks
//! publishing the same host port can never share a node: the scheduler's port filter keeps them
//! apart. The routing mesh (`ingress` mode) and port mapping (published ≠ target, which needs
//! a bridge network) are refused with a clear error until they exist.

use serde::{Deserialize, Serialize};

use crate::ValidationError;

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortMode {
    /// Bound on the node where the task runs.
    #[default]
    Host,
    /// Every node answers and forwards to a task (the routing mesh).
    Ingress,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// Port the container listens on.
    pub target: u16,
    /// Port on the node; defaults to `target`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: PortMode,
}

impl PortConfig {
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

/// Checks `ports` for a service whose containers share the host's network namespace
/// (`host_network`).
pub fn validate(ports: &[PortConfig], host_network: bool) -> Result<(), ValidationError> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let field = |f: &str| format!("ports[{i}].{f}");
        if p.target == 0 {
            return Err(ValidationError::new(field("target"), "must be 1-65535"));
        }
        if p.published == Some(0) {
            return Err(ValidationError::new(field("published"), "must be 1-65535"));
        }
        if p.mode == PortMode::Ingress {
            return Err(ValidationError::new(
                field("mode"),
                "ingress (the routing mesh) is not available yet; use mode: host",
            ));
        }
        if !host_network {
            return Err(ValidationError::new(
                format!("ports[{i}]"),
                "publishing a port needs network_mode: host until bridge networks exist",
            ));
        }
        if p.published_port() != p.target {
            return Err(ValidationError::new(
                field("published"),
                format!(
                    "{} differs from target {}: mapping ports needs a bridge network; with \
                     network_mode: host the container's port is the host's",
                    p.published_port(),
                    p.target
                ),
            ));
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
            assert_eq!(validate(&ports, host).unwrap_err().field, field);
        }
        let ok = vec![
            port(80, None, PortMode::Host),
            PortConfig {
                protocol: Protocol::Udp,
                ..port(80, None, PortMode::Host)
            },
        ];
        validate(&ok, true).unwrap();
        assert_eq!(
            host_ports(&ok).collect::<Vec<_>>(),
            [(Protocol::Tcp, 80), (Protocol::Udp, 80)]
        );
    }
}

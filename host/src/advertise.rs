//! The advertise address when none is configured: the local address the kernel would send
//! from towards the cluster (the join address, a controller) or, failing that, along the
//! default route. Found with a connected UDP socket's local address: `connect` on UDP only
//! looks the route up, so no packet is sent.
//!
//! An address other hosts cannot reach (loopback, unspecified, multicast) is never chosen:
//! with nothing else found, the error names `advertise_addr` and what each target gave.
//! [`choose`] is the decision (pure, table-tested); [`SourceProbe`] is the seam to the kernel.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

use crate::config::HostConfig;

/// Any global address will do: the kernel only picks the route (the default one, as no other
/// covers the documentation range) and its source address; nothing is sent.
pub const DEFAULT_ROUTE_PROBE: &str = "192.0.2.1:9";

/// Why no advertise address could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum AdvertiseError {
    #[error(
        "config: advertise_addr is not set and no address of this host that others can reach \
         was found ({tried}): set advertise_addr in rudder.toml (or --advertise-addr, \
         RUDDER_ADVERTISE_ADDR)"
    )]
    NotFound { tried: String },
}

/// Where to look from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A `host:port` or URL of the cluster (the join address, a controller).
    Addr(String),
    /// The default route.
    DefaultRoute,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(a) => f.write_str(a),
            Target::DefaultRoute => f.write_str("the default route"),
        }
    }
}

/// The kernel's choice of source address towards a `host:port`.
pub trait SourceProbe {
    fn source_towards(&self, target: &str) -> io::Result<IpAddr>;
}

/// The real probe: a UDP socket connected to the target (no traffic).
pub struct UdpProbe;

impl SourceProbe for UdpProbe {
    fn source_towards(&self, target: &str) -> io::Result<IpAddr> {
        let to: SocketAddr = target
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "resolves to no address"))?;
        let any: SocketAddr = if to.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(any)?;
        s.connect(to)?;
        Ok(s.local_addr()?.ip())
    }
}

/// What was chosen, and from where (printed by `init`/`join`, logged by the daemons).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub addr: IpAddr,
    pub towards: Target,
}

impl fmt::Display for Detected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "advertise address {} (this host's source address towards {}; set advertise_addr \
             to choose another)",
            self.addr, self.towards
        )
    }
}

/// `host:port` of a controller URL or address (`http://10.0.0.1:4243/` → `10.0.0.1:4243`);
/// the controller port when it names none.
pub fn target_addr(s: &str) -> String {
    let rest = s.split_once("://").map_or(s, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let has_port = match hostport.rsplit_once(':') {
        // `[v6]:port` or `host:port`; a bare IPv6 address has colons but no brackets.
        Some((h, p)) => p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')),
        None => false,
    };
    if has_port {
        hostport.to_string()
    } else if hostport.contains(':') && !hostport.starts_with('[') {
        format!("[{hostport}]:{}", crate::config::CONTROLLER_PORT)
    } else {
        format!("{hostport}:{}", crate::config::CONTROLLER_PORT)
    }
}

/// Why an address cannot be advertised, if it cannot.
fn unreachable_kind(ip: IpAddr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

/// The first address in `tried` (target, what the kernel answered) that other hosts can
/// reach; else the error listing each. Pure.
pub fn choose(tried: Vec<(Target, io::Result<IpAddr>)>) -> Result<Detected, AdvertiseError> {
    let mut why = Vec::new();
    for (towards, found) in tried {
        match found {
            Ok(addr) => match unreachable_kind(addr) {
                None => return Ok(Detected { addr, towards }),
                Some(kind) => why.push(format!("towards {towards}: {addr} is {kind}")),
            },
            Err(e) => why.push(format!("towards {towards}: {e}")),
        }
    }
    if why.is_empty() {
        why.push("nothing to look towards".into());
    }
    Err(AdvertiseError::NotFound {
        tried: why.join("; "),
    })
}

/// Asks `probe` towards each target in turn, then [`choose`]s.
pub fn detect(probe: &dyn SourceProbe, targets: &[Target]) -> Result<Detected, AdvertiseError> {
    let tried = targets
        .iter()
        .map(|t| {
            let found = match t {
                Target::Addr(a) => probe.source_towards(&target_addr(a)),
                Target::DefaultRoute => probe.source_towards(DEFAULT_ROUTE_PROBE),
            };
            (t.clone(), found)
        })
        .collect();
    choose(tried)
}

/// Whether `c` leaves a daemon without an address to give the others: no `advertise_addr`,
/// and the controller (when `controller`) or the agent (when `agent`) listens on the
/// unspecified address with no advertise address of its own. A daemon that listens on a
/// given address advertises that one.
pub fn needed(c: &HostConfig, controller: bool, agent: bool) -> bool {
    if c.advertise_addr.is_some() {
        return false;
    }
    let ctl = c.controller.clone().unwrap_or_default();
    let controller_needs =
        controller && ctl.advertise.is_none() && ctl.listen.is_none_or(|l| l.ip().is_unspecified());
    let agent_needs = agent && c.agent.listen.is_none();
    controller_needs || agent_needs
}

/// Fills `c.advertise_addr` when [`needed`], looking towards `targets`; what was chosen.
pub fn fill(
    c: &mut HostConfig,
    probe: &dyn SourceProbe,
    targets: &[Target],
    controller: bool,
    agent: bool,
) -> Result<Option<Detected>, AdvertiseError> {
    if !needed(c, controller, agent) {
        return Ok(None);
    }
    let d = detect(probe, targets)?;
    c.advertise_addr = Some(d.addr);
    Ok(Some(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Answers from a table; records what it was asked.
    struct FakeProbe {
        answers: HashMap<String, Result<IpAddr, io::ErrorKind>>,
        asked: std::cell::RefCell<Vec<String>>,
    }

    impl FakeProbe {
        fn new(answers: &[(&str, Result<&str, io::ErrorKind>)]) -> FakeProbe {
            FakeProbe {
                answers: answers
                    .iter()
                    .map(|(t, a)| (t.to_string(), a.map(|ip| ip.parse().unwrap())))
                    .collect(),
                asked: Default::default(),
            }
        }
    }

    impl SourceProbe for FakeProbe {
        fn source_towards(&self, target: &str) -> io::Result<IpAddr> {
            self.asked.borrow_mut().push(target.to_string());
            match self.answers.get(target) {
                Some(Ok(ip)) => Ok(*ip),
                Some(Err(k)) => Err(io::Error::from(*k)),
                None => Err(io::Error::from(io::ErrorKind::NetworkUnreachable)),
            }
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_first_address_others_can_reach_is_chosen() {
        let join = Target::Addr("10.0.0.1:4243".into());
        // (answers, targets, chosen, or words of the refusal)
        type Case = (
            Vec<(&'static str, Result<&'static str, io::ErrorKind>)>,
            Vec<Target>,
            Result<(&'static str, Target), Vec<&'static str>>,
        );
        let cases: Vec<Case> = vec![
            (
                vec![("10.0.0.1:4243", Ok("10.0.0.7"))],
                vec![join.clone(), Target::DefaultRoute],
                Ok(("10.0.0.7", join.clone())),
            ),
            // A controller on this host (loopback) says nothing: the default route does.
            (
                vec![
                    ("127.0.0.1:4243", Ok("127.0.0.1")),
                    (DEFAULT_ROUTE_PROBE, Ok("192.168.1.5")),
                ],
                vec![
                    Target::Addr("http://127.0.0.1:4243".into()),
                    Target::DefaultRoute,
                ],
                Ok(("192.168.1.5", Target::DefaultRoute)),
            ),
            (
                vec![("[2001:db8::1]:4243", Ok("2001:db8::7"))],
                vec![Target::Addr("https://[2001:db8::1]:4243".into())],
                Ok((
                    "2001:db8::7",
                    Target::Addr("https://[2001:db8::1]:4243".into()),
                )),
            ),
            // Nothing usable: the error names the key and each target's answer.
            (
                vec![("127.0.0.1:4243", Ok("127.0.0.1"))],
                vec![Target::Addr("127.0.0.1:4243".into()), Target::DefaultRoute],
                Err(vec![
                    "advertise_addr",
                    "towards 127.0.0.1:4243: 127.0.0.1 is a loopback address",
                    "towards the default route: network unreachable",
                ]),
            ),
            (
                vec![(DEFAULT_ROUTE_PROBE, Ok("0.0.0.0"))],
                vec![Target::DefaultRoute],
                Err(vec!["0.0.0.0 is the unspecified address", "advertise_addr"]),
            ),
            (
                vec![],
                vec![],
                Err(vec!["nothing to look towards", "advertise_addr"]),
            ),
        ];
        for (i, (answers, targets, want)) in cases.into_iter().enumerate() {
            let probe = FakeProbe::new(&answers);
            match (detect(&probe, &targets), want) {
                (Ok(d), Ok((addr, towards))) => {
                    assert_eq!(d.addr, ip(addr), "case {i}");
                    assert_eq!(d.towards, towards, "case {i}");
                }
                (Err(e), Err(words)) => {
                    let e = e.to_string().to_lowercase();
                    for w in words {
                        assert!(e.contains(&w.to_lowercase()), "case {i}: want {w:?}: {e}");
                    }
                }
                (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn controller_urls_become_host_ports() {
        let cases = [
            ("10.0.0.1:4243", "10.0.0.1:4243"),
            ("http://10.0.0.1:4243", "10.0.0.1:4243"),
            ("https://ctl.example:7000/", "ctl.example:7000"),
            ("ctl.example", "ctl.example:4243"),
            ("http://[2001:db8::1]:4243", "[2001:db8::1]:4243"),
            ("2001:db8::1", "[2001:db8::1]:4243"),
        ];
        for (given, want) in cases {
            assert_eq!(target_addr(given), want, "{given}");
        }
    }

    #[test]
    fn only_a_config_without_an_address_to_give_is_filled() {
        let probe = FakeProbe::new(&[(DEFAULT_ROUTE_PROBE, Ok("10.9.9.9"))]);
        let targets = [Target::DefaultRoute];
        let given: HostConfig = crate::config::parse(
            std::path::Path::new("x"),
            "advertise_addr = \"10.1.1.1\"\n[controller]\n",
        )
        .unwrap();
        let listening: HostConfig = crate::config::parse(
            std::path::Path::new("x"),
            "[controller]\nlisten = \"10.2.2.2:4243\"\n[agent]\nlisten = \"10.2.2.2:4245\"\n",
        )
        .unwrap();
        let bare = HostConfig::default();
        let manager: HostConfig =
            crate::config::parse(std::path::Path::new("x"), "[controller]\n").unwrap();
        // (config, controller, agent, filled with)
        let cases = [
            (given, true, true, None),
            (listening.clone(), true, true, None),
            (bare.clone(), false, true, Some("10.9.9.9")),
            (bare, true, false, Some("10.9.9.9")),
            (manager, true, true, Some("10.9.9.9")),
        ];
        for (i, (mut c, controller, agent, want)) in cases.into_iter().enumerate() {
            let before = c.advertise_addr;
            let got = fill(&mut c, &probe, &targets, controller, agent).unwrap();
            assert_eq!(got.map(|d| d.addr), want.map(ip), "case {i}");
            assert_eq!(c.advertise_addr, want.map(ip).or(before), "case {i}");
        }
        // Filled, the daemons advertise it: the controller at its port, the agent listens on it.
        let mut c = HostConfig {
            controller: Some(Default::default()),
            ..Default::default()
        };
        fill(&mut c, &probe, &targets, true, true).unwrap();
        assert_eq!(
            c.controller().unwrap().advertise.as_deref(),
            Some("10.9.9.9:4243")
        );
        assert_eq!(c.agent().unwrap().listen, "10.9.9.9:4245".parse().unwrap());
    }

    #[test]
    fn the_udp_probe_sends_nothing_and_answers_the_route_source() {
        // Towards loopback the kernel answers loopback; no listener is needed, as nothing is
        // sent.
        let got = UdpProbe.source_towards("127.0.0.1:9").unwrap();
        assert!(got.is_loopback(), "{got}");
    }
}

//! Overlay MTUs derived from the underlay's, and path MTU trouble told in words.
//!
//! A tunnel adds its headers to every packet, so an overlay interface must be smaller than the
//! path its packets take between hosts by exactly that overhead: WireGuard 80 bytes (outer IPv6
//! 40 — IPv4's 20 plus room, so one value works over either — UDP 8, WireGuard header 16 and
//! tag 16), VXLAN 50 (outer IPv4 20, UDP 8, VXLAN 8, inner Ethernet 14). Until now both were
//! fixed (1420, 1450: a 1500 underlay); a jumbo-frame underlay was wasted and a smaller one
//! (a cloud's 1460, a tunnel's 1420) fragmented or dropped every full-size packet.
//!
//! Invariants: the overlay MTU is never above `underlay - overhead`, never below IPv4's 576
//! (an underlay too small for that is refused with an error that says so), never above what
//! an IPv4 packet can carry. The underlay MTU of a host is the smallest path MTU to its peers,
//! as the kernel's routes know it (`IP_MTU` of a connected UDP socket: route MTU, interface
//! MTU and any ICMP "fragmentation needed" already learned); with no peer known the classic
//! 1500 is assumed, which gives the old fixed values.
//!
//! Path MTU trouble does not stall anything: the sending kernel fragments tunnel packets once
//! it has learned a smaller path MTU (UDP's default `IP_PMTUDISC_WANT`), and a host routes
//! every container packet, so a container that sends more than the overlay carries gets ICMP
//! "fragmentation needed" from its host. What is checked here is that the paths still carry what the overlay assumed, and a
//! shrunken one is logged once with the peer, both figures and what to do.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// WireGuard's overhead: outer IPv6 (40, which covers IPv4's 20) + UDP 8 + header 16 + tag 16.
pub const WIREGUARD_OVERHEAD: u32 = 80;
/// VXLAN's overhead: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The underlay MTU assumed when no path is known (Ethernet's).
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// The smallest datagram every IPv4 host must accept; an overlay below it is refused.
pub const MIN_OVERLAY_MTU: u32 = 576;
/// The largest IPv4 packet.
pub const MAX_IP_PACKET: u32 = 65535;

/// Why an overlay MTU could not be derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MtuError {
    /// The underlay cannot carry the tunnel's headers and a minimal packet.
    #[error(
        "mtu: underlay MTU {underlay} leaves {tunnel:?} less than {MIN_OVERLAY_MTU} bytes \
         (overhead {overhead}); raise the underlay interface's MTU"
    )]
    TooSmall {
        /// The underlay MTU given.
        underlay: u32,
        /// The tunnel.
        tunnel: Tunnel,
        /// Its overhead.
        overhead: u32,
    },
}

/// The kind of tunnel an overlay network uses between hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// `encrypted: true`.
    WireGuard,
    /// `encrypted: false`.
    Vxlan,
}

impl Tunnel {
    /// The tunnel of a network (`encrypted` or not).
    pub fn of(encrypted: bool) -> Tunnel {
        if encrypted {
            Tunnel::WireGuard
        } else {
            Tunnel::Vxlan
        }
    }

    /// Bytes the tunnel adds to each packet.
    pub fn overhead(self) -> u32 {
        match self {
            Tunnel::WireGuard => WIREGUARD_OVERHEAD,
            Tunnel::Vxlan => VXLAN_OVERHEAD,
        }
    }
}

/// The MTU of an overlay interface over an underlay of MTU `underlay`.
pub fn overlay_mtu(underlay: u32, tunnel: Tunnel) -> Result<u32, MtuError> {
    let overhead = tunnel.overhead();
    let mtu = underlay.saturating_sub(overhead).min(MAX_IP_PACKET);
    if mtu < MIN_OVERLAY_MTU {
        return Err(MtuError::TooSmall {
            underlay,
            tunnel,
            overhead,
        });
    }
    Ok(mtu)
}

/// The underlay MTU of a host: the smallest of its path MTUs to its peers, or
/// [`DEFAULT_UNDERLAY_MTU`] when none is known. Zeros (a probe that found nothing) are ignored.
pub fn underlay_mtu(paths: &[u32]) -> u32 {
    paths
        .iter()
        .copied()
        .filter(|m| *m > 0)
        .min()
        .unwrap_or(DEFAULT_UNDERLAY_MTU)
}

/// The overlay MTU to use for a network on this host: derived from `underlay`, or, when the
/// underlay is too small for any sane overlay, `fallback` (the controller's value), with the
/// reason so the caller can log it.
pub fn network_mtu(underlay: u32, encrypted: bool, fallback: u32) -> (u32, Option<MtuError>) {
    match overlay_mtu(underlay, Tunnel::of(encrypted)) {
        Ok(m) => (m, None),
        Err(e) => (fallback, Some(e)),
    }
}

/// A path that no longer carries what the overlay assumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathShrank {
    /// The peer's endpoint.
    pub peer: SocketAddr,
    /// What the kernel now knows the path carries.
    pub path_mtu: u32,
    /// What the overlay needs it to carry (overlay MTU + overhead).
    pub needed: u32,
}

impl std::fmt::Display for PathShrank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "path MTU to {} is {}, below the {} the overlay needs: full-size overlay packets \
             to it are fragmented on the underlay (slower, and lost where fragments are \
             dropped); lower the underlay interface's MTU to the path's, or fix the path",
            self.peer, self.path_mtu, self.needed
        )
    }
}

/// Pure check of observed path MTUs against what the overlay needs. `reported` holds the last
/// figure reported per peer, so a shrunken path is told once (again only if it changes), and
/// a path that recovered is forgotten. Returns the new findings.
pub fn check_paths(
    needed: u32,
    observed: &[(SocketAddr, u32)],
    reported: &mut HashMap<SocketAddr, u32>,
) -> Vec<PathShrank> {
    let mut out = Vec::new();
    for (peer, mtu) in observed {
        if *mtu == 0 || *mtu >= needed {
            reported.remove(peer);
            continue;
        }
        if reported.insert(*peer, *mtu) != Some(*mtu) {
            out.push(PathShrank {
                peer: *peer,
                path_mtu: *mtu,
                needed,
            });
        }
    }
    reported.retain(|p, _| observed.iter().any(|(o, _)| o == p));
    out
}

/// The kernel's path MTU towards `peer` (route MTU, interface MTU, learned ICMP): `IP_MTU` of
/// a UDP socket connected to it. Sends nothing. Blocks only on local syscalls.
pub fn path_mtu(peer: SocketAddr) -> std::io::Result<u32> {
    let bind: SocketAddr = match peer.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse().map_err(std::io::Error::other)?,
        IpAddr::V6(_) => "[::]:0".parse().map_err(std::io::Error::other)?,
    };
    let sock = std::net::UdpSocket::bind(bind)?;
    sock.connect(peer)?;
    let (level, opt) = match peer.ip() {
        IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which is that large, on a socket
    // this function owns.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            level,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u32::try_from(v).unwrap_or(0))
}

/// Gives each network of `map` this host's MTU for it: derived from the smallest path MTU to
/// the map's peers ([`path_mtu`] to each underlay address, port `port`). The controller's figure
/// stays where the underlay is too small to derive one, with a warning.
pub fn fit_map(map: &mut rudder_model::network::NetworkMap, port: u16) {
    let paths: Vec<u32> = map
        .peers
        .iter()
        .map(|p| path_mtu(SocketAddr::new(p.underlay.into(), port)).unwrap_or(0))
        .collect();
    let underlay = underlay_mtu(&paths);
    for n in &mut map.networks {
        let (mtu, err) = network_mtu(underlay, n.encrypted, n.mtu);
        if let Some(e) = err {
            tracing::warn!(network = %n.name, mtu, "{e}");
        }
        n.mtu = mtu;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_mtu_table() {
        let cases: &[(u32, Tunnel, Result<u32, ()>)] = &[
            (1500, Tunnel::WireGuard, Ok(1420)),
            (1500, Tunnel::Vxlan, Ok(1450)),
            (9000, Tunnel::WireGuard, Ok(8920)),
            (9000, Tunnel::Vxlan, Ok(8950)),
            (1460, Tunnel::WireGuard, Ok(1380)),
            (1420, Tunnel::Vxlan, Ok(1370)),
            (656, Tunnel::WireGuard, Ok(576)),
            (655, Tunnel::WireGuard, Err(())),
            (626, Tunnel::Vxlan, Ok(576)),
            (625, Tunnel::Vxlan, Err(())),
            (0, Tunnel::WireGuard, Err(())),
            (65536, Tunnel::Vxlan, Ok(65486)),
            (u32::MAX, Tunnel::WireGuard, Ok(MAX_IP_PACKET)),
        ];
        for (underlay, tunnel, want) in cases {
            let got = overlay_mtu(*underlay, *tunnel).map_err(|_| ());
            assert_eq!(got, *want, "{underlay} {tunnel:?}");
        }
        let e = overlay_mtu(600, Tunnel::WireGuard).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mtu: underlay MTU 600 leaves WireGuard less than 576 bytes (overhead 80); raise \
             the underlay interface's MTU"
        );
    }

    #[test]
    fn underlay_is_the_smallest_known_path() {
        assert_eq!(underlay_mtu(&[]), 1500);
        assert_eq!(underlay_mtu(&[0]), 1500);
        assert_eq!(underlay_mtu(&[9000, 1500, 0]), 1500);
        assert_eq!(underlay_mtu(&[9000, 9000]), 9000);
        assert_eq!(underlay_mtu(&[65536]), 65536);
    }

    #[test]
    fn network_mtu_falls_back_with_the_reason() {
        assert_eq!(network_mtu(1500, true, 1420), (1420, None));
        assert_eq!(network_mtu(9000, false, 1450), (8950, None));
        let (m, e) = network_mtu(500, true, 1420);
        assert_eq!(m, 1420);
        assert!(matches!(e, Some(MtuError::TooSmall { .. })));
    }

    #[test]
    fn shrunken_paths_are_told_once() {
        let a: SocketAddr = "192.168.0.2:51820".parse().unwrap();
        let b: SocketAddr = "192.168.0.3:51820".parse().unwrap();
        let mut seen = HashMap::new();
        // Both fine.
        assert!(check_paths(1500, &[(a, 1500), (b, 9000)], &mut seen).is_empty());
        // a shrank: told once.
        let f = check_paths(1500, &[(a, 1400), (b, 9000)], &mut seen);
        assert_eq!(
            f,
            vec![PathShrank {
                peer: a,
                path_mtu: 1400,
                needed: 1500
            }]
        );
        assert!(f[0]
            .to_string()
            .contains("path MTU to 192.168.0.2:51820 is 1400"));
        assert!(check_paths(1500, &[(a, 1400), (b, 9000)], &mut seen).is_empty());
        // It changed again: told again.
        assert_eq!(check_paths(1500, &[(a, 1300)], &mut seen).len(), 1);
        // Recovered, then shrank again: told again.
        assert!(check_paths(1500, &[(a, 1500)], &mut seen).is_empty());
        assert_eq!(check_paths(1500, &[(a, 1300)], &mut seen).len(), 1);
        // An unknown figure (0) is no finding; a peer gone is forgotten.
        assert!(check_paths(1500, &[(b, 0)], &mut seen).is_empty());
        assert!(seen.is_empty());
    }

    #[test]
    fn loopback_path_mtu_is_read() {
        // Loopback's MTU (65536 on Linux) through the same call the agent uses for peers.
        let m = path_mtu("127.0.0.1:9".parse().unwrap()).unwrap();
        assert!(m >= 1500, "{m}");
    }
}

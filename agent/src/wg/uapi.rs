//! The userspace device's side of WireGuard's configuration protocol (the text protocol `wg`
//! and [`super`] speak over `/var/run/wireguard/NAME.sock`), pure: a request's lines in, a
//! typed request out; a device's state in, the answer's text out.
//!
//! Only what Rudder and `wg show` use is understood: `private_key`, `listen_port`,
//! `replace_peers`, and per peer `public_key`, `remove`, `update_only`, `endpoint`,
//! `replace_allowed_ips`, `allowed_ip`, `persistent_keepalive_interval`; `fwmark`,
//! `preshared_key` and `protocol_version` are refused rather than silently ignored (errno
//! `EINVAL`), except `protocol_version=1`. Invariants: a request is refused whole (nothing
//! applied) when any line is malformed; requests are limited in size by the caller
//! ([`MAX_REQUEST`]); only IPv4 endpoints and allowed IPs are accepted, as the overlay is
//! IPv4.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Largest request accepted (a set for ~2k peers with a few allowed IPs each).
pub const MAX_REQUEST: usize = 1 << 20;
/// Most peers a device holds.
pub const MAX_PEERS: usize = 16_384;

/// `EINVAL`, the errno of a refused request.
pub const EINVAL: i32 = 22;

/// A `set=1` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// New private key.
    pub private_key: Option<[u8; 32]>,
    /// New listen port.
    pub listen_port: Option<u16>,
    /// Remove every peer first.
    pub replace_peers: bool,
    /// Peer sections in order.
    pub peers: Vec<PeerSet>,
}

/// One `public_key=` section of a set request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    /// The peer's public key.
    pub key: [u8; 32],
    /// Remove the peer.
    pub remove: bool,
    /// Only change an existing peer, never add it.
    pub update_only: bool,
    /// New endpoint.
    pub endpoint: Option<SocketAddrV4>,
    /// Drop the peer's allowed IPs before adding these.
    pub replace_allowed_ips: bool,
    /// Allowed IPs to add, normalized (host bits cleared).
    pub allowed_ips: Vec<(Ipv4Addr, u8)>,
    /// Keepalive interval in seconds (0 is off).
    pub keepalive: Option<u16>,
}

/// A request: get the state, or change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get=1`.
    Get,
    /// `set=1` and what to set.
    Set(SetRequest),
}

/// Parses a request's lines (without the blank line that ends it). `Err` carries a message
/// for the device's log; the answer is `errno=EINVAL`.
pub fn parse(lines: &[&str]) -> Result<Request, String> {
    let (first, rest) = lines.split_first().ok_or("empty request")?;
    match *first {
        "get=1" if rest.is_empty() => return Ok(Request::Get),
        "get=1" => return Err("get=1 takes no arguments".into()),
        "set=1" => {}
        other => return Err(format!("unknown request {other:?}")),
    }
    let mut set = SetRequest::default();
    for line in rest {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line without '=': {line:?}"))?;
        if k == "public_key" {
            if set.peers.len() >= MAX_PEERS {
                return Err(format!("more than {MAX_PEERS} peers"));
            }
            set.peers.push(PeerSet {
                key: hex_key(v)?,
                remove: false,
                update_only: false,
                endpoint: None,
                replace_allowed_ips: false,
                allowed_ips: Vec::new(),
                keepalive: None,
            });
            continue;
        }
        let Some(peer) = set.peers.last_mut() else {
            match k {
                "private_key" => set.private_key = Some(hex_key(v)?),
                "listen_port" => {
                    set.listen_port = Some(v.parse().map_err(|_| format!("bad port {v:?}"))?)
                }
                "replace_peers" => set.replace_peers = bool_value(k, v)?,
                _ => return Err(format!("unsupported device key {k:?}")),
            }
            continue;
        };
        match k {
            "remove" => peer.remove = bool_value(k, v)?,
            "update_only" => peer.update_only = bool_value(k, v)?,
            "endpoint" => {
                peer.endpoint = Some(
                    v.parse()
                        .map_err(|_| format!("bad or non-IPv4 endpoint {v:?}"))?,
                )
            }
            "replace_allowed_ips" => peer.replace_allowed_ips = bool_value(k, v)?,
            "allowed_ip" => {
                let (ip, len) = v
                    .split_once('/')
                    .and_then(|(ip, len)| {
                        Some((ip.parse::<Ipv4Addr>().ok()?, len.parse::<u8>().ok()?))
                    })
                    .filter(|(_, len)| *len <= 32)
                    .ok_or_else(|| format!("bad or non-IPv4 allowed ip {v:?}"))?;
                if peer.allowed_ips.len() >= 1024 {
                    return Err("more than 1024 allowed ips for one peer".into());
                }
                peer.allowed_ips.push((normalize(ip, len), len));
            }
            "persistent_keepalive_interval" => {
                peer.keepalive = Some(v.parse().map_err(|_| format!("bad interval {v:?}"))?)
            }
            "protocol_version" if v == "1" => {}
            _ => return Err(format!("unsupported peer key {k:?}")),
        }
    }
    Ok(Request::Set(set))
}

fn bool_value(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{k}: expected true or false, got {v:?}")),
    }
}

fn hex_key(v: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(v).map_err(|_| format!("bad key {v:?}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("bad key length {v:?}"))
}

/// `ip` with the bits past `len` cleared.
pub fn normalize(ip: Ipv4Addr, len: u8) -> Ipv4Addr {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    Ipv4Addr::from(u32::from(ip) & mask)
}

/// A peer as a get answer shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// Public key.
    pub key: [u8; 32],
    /// Current endpoint (as configured, or where it last sent from).
    pub endpoint: Option<SocketAddrV4>,
    /// Allowed IPs.
    pub allowed_ips: Vec<(Ipv4Addr, u8)>,
    /// Bytes received and sent.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Time since the last handshake, if there was one.
    pub since_handshake: Option<std::time::Duration>,
    /// Keepalive interval (0 is off).
    pub keepalive: u16,
}

/// The body of a get answer (before `errno=0`). `now` is the wall clock in seconds since the
/// epoch, to turn "time since the handshake" into the protocol's absolute time.
pub fn render_get(
    public_key: Option<&[u8; 32]>,
    listen_port: u16,
    peers: &[PeerView],
    now: std::time::Duration,
) -> String {
    let mut s = String::new();
    if let Some(k) = public_key {
        let _ = writeln!(s, "own_public_key={}", hex::encode(k));
    }
    let _ = writeln!(s, "listen_port={listen_port}");
    for p in peers {
        let _ = writeln!(s, "public_key={}", hex::encode(p.key));
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        for (ip, len) in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={ip}/{len}");
        }
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        if let Some(ago) = p.since_handshake {
            let at = now.saturating_sub(ago);
            let _ = writeln!(s, "last_handshake_time_sec={}", at.as_secs());
            let _ = writeln!(s, "last_handshake_time_nsec={}", at.subsec_nanos());
        }
        let _ = writeln!(s, "persistent_keepalive_interval={}", p.keepalive);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> String {
        hex::encode([n; 32])
    }

    #[test]
    fn parses_what_the_agent_sends() {
        let lines = [
            "set=1".to_string(),
            format!("private_key={}", key(1)),
            "listen_port=51820".into(),
            format!("public_key={}", key(2)),
            "remove=true".into(),
            format!("public_key={}", key(3)),
            "endpoint=192.168.0.3:51820".into(),
            "replace_allowed_ips=true".into(),
            "allowed_ip=10.1.2.3/24".into(),
            "allowed_ip=10.9.0.0/16".into(),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let Request::Set(set) = parse(&lines).unwrap() else {
            panic!("not a set")
        };
        assert_eq!(set.private_key, Some([1; 32]));
        assert_eq!(set.listen_port, Some(51820));
        assert_eq!(set.peers.len(), 2);
        assert!(set.peers[0].remove);
        // `remove` does not carry over into the next section (boringtun's quirk).
        assert!(!set.peers[1].remove);
        assert_eq!(
            set.peers[1].endpoint,
            Some("192.168.0.3:51820".parse().unwrap())
        );
        assert!(set.peers[1].replace_allowed_ips);
        assert_eq!(
            set.peers[1].allowed_ips,
            vec![
                (Ipv4Addr::new(10, 1, 2, 0), 24),
                (Ipv4Addr::new(10, 9, 0, 0), 16)
            ]
        );
        assert_eq!(parse(&["get=1"]), Ok(Request::Get));
    }

    #[test]
    fn refuses_malformed_requests() {
        let k = format!("public_key={}", key(1));
        for bad in [
            vec![],
            vec!["get=2"],
            vec!["get=1", "listen_port=1"],
            vec!["set=1", "listen_port=70000"],
            vec!["set=1", "private_key=zz"],
            vec!["set=1", "private_key=0102"],
            vec!["set=1", "fwmark=1"],
            vec!["set=1", "endpoint=1.2.3.4:5"],
            vec!["set=1", "nonsense"],
            vec!["set=1", &k, "endpoint=[::1]:51820"],
            vec!["set=1", &k, "allowed_ip=10.0.0.0/33"],
            vec!["set=1", &k, "allowed_ip=fd00::/64"],
            vec!["set=1", &k, "remove=yes"],
            vec!["set=1", &k, "preshared_key=00"],
            vec!["set=1", &k, "protocol_version=2"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn renders_what_the_agent_parses() {
        let text = render_get(
            Some(&[1; 32]),
            51820,
            &[PeerView {
                key: [2; 32],
                endpoint: Some("192.168.0.2:51820".parse().unwrap()),
                allowed_ips: vec![(Ipv4Addr::new(10, 0, 2, 0), 24)],
                rx_bytes: 10,
                tx_bytes: 20,
                since_handshake: Some(std::time::Duration::from_secs(5)),
                keepalive: 0,
            }],
            std::time::Duration::from_secs(1000),
        );
        let lines: Vec<String> = text.lines().map(String::from).collect();
        let dev = super::super::parse_get(&lines).unwrap();
        assert_eq!(dev.listen_port, Some(51820));
        assert_eq!(dev.peers.len(), 1);
        assert_eq!(
            dev.peers[0].endpoint,
            Some("192.168.0.2:51820".parse().unwrap())
        );
        assert!(text.contains("last_handshake_time_sec=995\n"));
    }
}

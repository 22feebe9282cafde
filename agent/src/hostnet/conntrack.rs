//! Conntrack entries of Rudder's own translations, and their deletion over ctnetlink.
//!
//! When a replica leaves a service, the connections the kernel already translated to it keep
//! their translation: a UDP flow (one client source port) goes on being sent to the gone
//! address for as long as it keeps talking, and a TCP connection whose replica vanished
//! without a word (its host lost) hangs instead of being reset. The agent deletes those
//! entries; the next packet is then a new flow, balanced over the replicas that remain (or,
//! mid-stream TCP, answered with a reset by one of them).
//!
//! What may be deleted is a [`CtFilter`], and it only ever matches entries Rudder made: the
//! reply must come from the departed backend (an address of one of Rudder's networks, checked
//! by whoever builds the filter) and the entry must carry the connection mark of the published
//! port's DNAT, or have been addressed to the service's virtual IP. Nothing else on the host
//! (the agent's own sessions, a container's outbound connections, foreign flows) can match.
//!
//! The codec is pure (table-tested here); [`delete_matching`] dumps the IPv4 table over a
//! `NETLINK_NETFILTER` socket of the calling thread's namespace and deletes each match by its
//! original tuple. A reply is parsed defensively: lengths are checked, a malformed message is
//! an error, never a panic or an out-of-bounds read.

use std::io;
use std::net::Ipv4Addr;

/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET`.
const CT_GET: u16 = (1 << 8) | 1;
/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE`.
const CT_DELETE: u16 = (1 << 8) | 2;
/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW` (what a dump answers with).
const CT_NEW: u16 = 1 << 8;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const AF_INET: u8 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_MARK: u16 = 8;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// IP protocol numbers.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// The largest number of entries one purge deletes (a bound on the work one map change
/// causes; what is left is retried by the next change or expires).
pub const MAX_DELETES: usize = 65_536;

/// One direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

/// A conntrack entry as a dump shows it (IPv4, TCP or UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtEntry {
    pub proto: u8,
    pub orig: Tuple,
    pub reply: Tuple,
    pub mark: u32,
    pub zone: u16,
}

/// How an entry shows that Rudder translated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CtScope {
    /// The connection mark Rudder's published-port DNAT set, and the published port.
    Mark { mark: u32, published: u16 },
    /// Sent to this service virtual IP.
    Vip(Ipv4Addr),
}

/// Which entries to delete: those whose replies come from `backend` (port `port` when
/// given), of protocol `proto` (any when `None`), in `scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtFilter {
    pub proto: Option<u8>,
    pub backend: Ipv4Addr,
    pub port: Option<u16>,
    pub scope: CtScope,
}

impl CtFilter {
    /// Whether `e` is one of the entries this filter deletes.
    pub fn matches(&self, e: &CtEntry) -> bool {
        self.proto.is_none_or(|p| p == e.proto)
            && e.reply.src == self.backend
            && self.port.is_none_or(|p| p == e.reply.sport)
            && match self.scope {
                CtScope::Mark { mark, published } => e.mark == mark && e.orig.dport == published,
                CtScope::Vip(vip) => e.orig.dst == vip,
            }
    }
}

impl std::fmt::Display for CtFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            Some(TCP) => "tcp",
            Some(UDP) => "udp",
            Some(_) => "other",
            None => "any",
        };
        write!(f, "{proto} reply-src {}", self.backend)?;
        if let Some(p) = self.port {
            write!(f, " reply-sport {p}")?;
        }
        match self.scope {
            CtScope::Mark { mark, published } => {
                write!(f, " mark {mark:#x} orig-dport {published}")
            }
            CtScope::Vip(v) => write!(f, " orig-dst {v}"),
        }
    }
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + (align(len) - len), 0);
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn nested(kind: u16, inner: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut body = Vec::new();
    inner(&mut body);
    let mut out = Vec::new();
    push_attr(&mut out, kind | NLA_F_NESTED, &body);
    out
}

/// A netlink message: header, `nfgenmsg` (IPv4), then `attrs`.
fn message(kind: u16, flags: u16, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version (NFNETLINK_V0), resource id (big endian).
    m.extend_from_slice(&[AF_INET, 0, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

/// The request for a dump of the IPv4 table.
pub fn dump_request(seq: u32) -> Vec<u8> {
    message(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, &[])
}

/// The request that deletes `e` (by its original tuple and zone).
pub fn delete_request(seq: u32, e: &CtEntry) -> Vec<u8> {
    let t = e.orig;
    let mut attrs = nested(CTA_TUPLE_ORIG, |b| {
        b.extend(nested(CTA_TUPLE_IP, |ip| {
            push_attr(ip, CTA_IP_V4_SRC, &t.src.octets());
            push_attr(ip, CTA_IP_V4_DST, &t.dst.octets());
        }));
        b.extend(nested(CTA_TUPLE_PROTO, |p| {
            push_attr(p, CTA_PROTO_NUM, &[e.proto]);
            push_attr(p, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
            push_attr(p, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
        }));
    });
    if e.zone != 0 {
        push_attr(&mut attrs, CTA_ZONE, &e.zone.to_be_bytes());
    }
    message(CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, &attrs)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("conntrack: malformed reply: {what}"),
    )
}

/// The attributes of `buf`: (type without flags, payload).
fn attrs(mut buf: &[u8]) -> io::Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return Err(bad("attribute length"));
        }
        out.push((kind, &buf[4..len]));
        buf = &buf[align(len).min(buf.len())..];
    }
    Ok(out)
}

fn tuple(buf: &[u8]) -> io::Result<(Tuple, Option<u8>)> {
    let mut t = Tuple {
        src: Ipv4Addr::UNSPECIFIED,
        dst: Ipv4Addr::UNSPECIFIED,
        sport: 0,
        dport: 0,
    };
    let mut proto = None;
    let addr = |p: &[u8]| -> io::Result<Ipv4Addr> {
        let o: [u8; 4] = p.try_into().map_err(|_| bad("address length"))?;
        Ok(Ipv4Addr::from(o))
    };
    let port = |p: &[u8]| -> io::Result<u16> {
        let o: [u8; 2] = p.try_into().map_err(|_| bad("port length"))?;
        Ok(u16::from_be_bytes(o))
    };
    for (kind, body) in attrs(buf)? {
        match kind {
            CTA_TUPLE_IP => {
                for (k, p) in attrs(body)? {
                    match k {
                        CTA_IP_V4_SRC => t.src = addr(p)?,
                        CTA_IP_V4_DST => t.dst = addr(p)?,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, p) in attrs(body)? {
                    match k {
                        CTA_PROTO_NUM => proto = p.first().copied(),
                        CTA_PROTO_SRC_PORT => t.sport = port(p)?,
                        CTA_PROTO_DST_PORT => t.dport = port(p)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok((t, proto))
}

/// One message of a dump (or of an acknowledgement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtMessage {
    /// A TCP or UDP IPv4 entry (other protocols are skipped).
    Entry(CtEntry),
    /// Another entry, or a message of no interest.
    Skipped,
    /// The end of a dump.
    Done,
    /// An acknowledgement (0) or a refusal (a negative errno).
    Ack(i32),
}

/// The messages in one datagram, each with its sequence number.
pub fn parse(mut buf: &[u8]) -> io::Result<Vec<(u32, CtMessage)>> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if len < 16 || len > buf.len() {
            return Err(bad("message length"));
        }
        let body = &buf[16..len];
        let msg = match kind {
            NLMSG_DONE => CtMessage::Done,
            NLMSG_ERROR => {
                let code: [u8; 4] = body
                    .get(..4)
                    .and_then(|c| c.try_into().ok())
                    .ok_or_else(|| bad("error length"))?;
                CtMessage::Ack(i32::from_ne_bytes(code))
            }
            CT_NEW => entry(body)?.map_or(CtMessage::Skipped, CtMessage::Entry),
            _ => CtMessage::Skipped,
        };
        out.push((seq, msg));
        buf = &buf[align(len).min(buf.len())..];
    }
    Ok(out)
}

/// An entry from a `CT_NEW` body (after the netlink header); `None` unless IPv4 TCP or UDP.
fn entry(body: &[u8]) -> io::Result<Option<CtEntry>> {
    let Some((gen, rest)) = body.split_first_chunk::<4>() else {
        return Err(bad("nfgenmsg"));
    };
    if gen[0] != AF_INET {
        return Ok(None);
    }
    let mut orig = None;
    let mut reply = None;
    let mut mark = 0;
    let mut zone = 0;
    for (kind, p) in attrs(rest)? {
        match kind {
            CTA_TUPLE_ORIG => orig = Some(tuple(p)?),
            CTA_TUPLE_REPLY => reply = Some(tuple(p)?),
            CTA_MARK => {
                let o: [u8; 4] = p.try_into().map_err(|_| bad("mark length"))?;
                mark = u32::from_be_bytes(o);
            }
            CTA_ZONE => {
                let o: [u8; 2] = p.try_into().map_err(|_| bad("zone length"))?;
                zone = u16::from_be_bytes(o);
            }
            _ => {}
        }
    }
    let (Some((orig, Some(proto))), Some((reply, _))) = (orig, reply) else {
        return Ok(None);
    };
    if proto != TCP && proto != UDP {
        return Ok(None);
    }
    Ok(Some(CtEntry {
        proto,
        orig,
        reply,
        mark,
        zone,
    }))
}

/// A ctnetlink socket in the calling thread's namespace, its exchanges bounded by `timeout`.
pub fn open(timeout: std::time::Duration) -> io::Result<netlink_sys::Socket> {
    use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
    let mut s = Socket::new(NETLINK_NETFILTER)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    super::netlink::set_timeouts(&s, timeout)?;
    Ok(s)
}

/// Deletes the IPv4 entries of `s`'s namespace (see [`open`]) that match any of `filters` (at
/// most [`MAX_DELETES`]); returns how many went. Blocking: run it on the blocking pool. An
/// entry already gone by the time of its deletion counts as deleted.
pub fn delete_matching(s: &netlink_sys::Socket, filters: &[CtFilter]) -> io::Result<usize> {
    if filters.is_empty() {
        return Ok(0);
    }
    let mut buf = Vec::with_capacity(64 * 1024);
    // The whole dump first: deleting while the kernel walks the table may skip entries.
    s.send(&dump_request(1), 0)?;
    let mut doomed = Vec::new();
    'dump: loop {
        buf.clear();
        let n = s.recv(&mut buf, 0)?;
        for (seq, m) in parse(&buf[..n.min(buf.len())])? {
            if seq != 1 {
                continue;
            }
            match m {
                CtMessage::Entry(e)
                    if doomed.len() < MAX_DELETES && filters.iter().any(|f| f.matches(&e)) =>
                {
                    doomed.push(e);
                }
                CtMessage::Done => break 'dump,
                CtMessage::Ack(code) if code != 0 => {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                _ => {}
            }
        }
    }
    let mut deleted = 0;
    for (i, e) in doomed.iter().enumerate() {
        let seq = 2 + i as u32;
        s.send(&delete_request(seq, e), 0)?;
        loop {
            buf.clear();
            let n = s.recv(&mut buf, 0)?;
            let acks: Vec<i32> = parse(&buf[..n.min(buf.len())])?
                .into_iter()
                .filter(|(sq, _)| *sq == seq)
                .filter_map(|(_, m)| match m {
                    CtMessage::Ack(c) => Some(c),
                    _ => None,
                })
                .collect();
            match acks.first() {
                None => continue,
                Some(0) => deleted += 1,
                Some(c) if -c == libc::ENOENT => deleted += 1,
                Some(c) => return Err(io::Error::from_raw_os_error(-c)),
            }
            break;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: &str, dst: &str, sport: u16, dport: u16) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
        }
    }

    /// A client's connection to published port 8080 on the host, DNATed to 10.96.2.2:80.
    fn ingress_entry(proto: u8) -> CtEntry {
        CtEntry {
            proto,
            orig: t("10.213.0.254", "10.213.0.1", 40000, 8080),
            reply: t("10.96.2.2", "10.213.0.254", 80, 40000),
            mark: 0x5244,
            zone: 0,
        }
    }

    /// The message a dump answers with for `e` (as the kernel lays it out).
    fn new_message(seq: u32, e: &CtEntry) -> Vec<u8> {
        entry_message(seq, e, true)
    }

    fn entry_message(seq: u32, e: &CtEntry, status: bool) -> Vec<u8> {
        let tup = |kind: u16, t: Tuple| {
            nested(kind, |b| {
                b.extend(nested(CTA_TUPLE_IP, |ip| {
                    push_attr(ip, CTA_IP_V4_SRC, &t.src.octets());
                    push_attr(ip, CTA_IP_V4_DST, &t.dst.octets());
                }));
                b.extend(nested(CTA_TUPLE_PROTO, |p| {
                    push_attr(p, CTA_PROTO_NUM, &[e.proto]);
                    push_attr(p, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
                    push_attr(p, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
                }));
            })
        };
        let mut attrs = tup(CTA_TUPLE_ORIG, e.orig);
        attrs.extend(tup(CTA_TUPLE_REPLY, e.reply));
        if status {
            push_attr(&mut attrs, 3, &2u32.to_be_bytes()); // CTA_STATUS (seen reply), skipped
        }
        push_attr(&mut attrs, CTA_MARK, &e.mark.to_be_bytes());
        message(CT_NEW, 2, seq, &attrs)
    }

    #[test]
    fn entries_round_trip_through_the_codec() {
        let e = ingress_entry(UDP);
        let mut datagram = new_message(7, &e);
        datagram.extend(new_message(7, &ingress_entry(TCP)));
        datagram.extend(message(NLMSG_DONE, 2, 7, &[]));
        let msgs = parse(&datagram).unwrap();
        assert_eq!(
            msgs,
            vec![
                (7, CtMessage::Entry(e)),
                (7, CtMessage::Entry(ingress_entry(TCP))),
                (7, CtMessage::Done)
            ]
        );
        // A deletion names the original tuple, as the kernel would report it.
        let del = delete_request(9, &e);
        assert_eq!(u16::from_ne_bytes([del[4], del[5]]), CT_DELETE);
        assert_eq!(
            del.len(),
            u32::from_ne_bytes(del[..4].try_into().unwrap()) as usize
        );
        let (orig, proto) = match attrs(&del[20..]).unwrap().as_slice() {
            [(CTA_TUPLE_ORIG, body)] => tuple(body).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!((orig, proto), (e.orig, Some(UDP)));
        // An acknowledgement and a refusal.
        let mut ack = message(NLMSG_ERROR, 0, 9, &[]);
        ack.truncate(16);
        ack.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        let n = ack.len() as u32;
        ack[..4].copy_from_slice(&n.to_ne_bytes());
        assert_eq!(
            parse(&ack).unwrap(),
            vec![(9, CtMessage::Ack(-libc::ENOENT))]
        );
    }

    #[test]
    fn filters_match_only_rudders_translations_to_the_backend() {
        let f = CtFilter {
            proto: Some(UDP),
            backend: "10.96.2.2".parse().unwrap(),
            port: Some(80),
            scope: CtScope::Mark {
                mark: 0x5244,
                published: 8080,
            },
        };
        let e = ingress_entry(UDP);
        assert!(f.matches(&e));
        // Another protocol, backend, port, published port, or no mark: not ours to delete.
        assert!(!f.matches(&ingress_entry(TCP)));
        for other in [
            CtEntry {
                reply: t("10.96.2.3", "10.213.0.254", 80, 40000),
                ..e
            },
            CtEntry {
                reply: t("10.96.2.2", "10.213.0.254", 81, 40000),
                ..e
            },
            CtEntry {
                orig: t("10.213.0.254", "10.213.0.1", 40000, 22),
                ..e
            },
            CtEntry { mark: 0, ..e },
            // The backend's own outbound connection (its address is the original source).
            CtEntry {
                orig: t("10.96.2.2", "1.1.1.1", 80, 53),
                reply: t("1.1.1.1", "10.213.0.1", 53, 80),
                ..e
            },
        ] {
            assert!(!f.matches(&other), "{other:?}");
        }
        let vip = CtFilter {
            proto: None,
            backend: "10.96.2.2".parse().unwrap(),
            port: None,
            scope: CtScope::Vip("10.96.0.2".parse().unwrap()),
        };
        let to_vip = CtEntry {
            orig: t("10.96.1.2", "10.96.0.2", 5000, 80),
            reply: t("10.96.2.2", "10.96.1.2", 80, 5000),
            mark: 0,
            ..e
        };
        assert!(vip.matches(&to_vip));
        assert!(vip.matches(&CtEntry {
            proto: TCP,
            ..to_vip
        }));
        // Straight to the task's address (no VIP): not a translation of ours.
        assert!(!vip.matches(&CtEntry {
            orig: t("10.96.1.2", "10.96.2.2", 5000, 80),
            ..to_vip
        }));
        assert_eq!(
            f.to_string(),
            "udp reply-src 10.96.2.2 reply-sport 80 mark 0x5244 orig-dport 8080"
        );
    }

    /// Whatever a (buggy or hostile) peer sends, parsing ends in a value or an error.
    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let good = new_message(3, &ingress_entry(TCP));
        for cut in 0..good.len() {
            let mut b = good[..cut].to_vec();
            if b.len() >= 4 {
                // Claim the full length anyway, or the cut one.
                b[..4].copy_from_slice(&(good.len() as u32).to_ne_bytes());
            }
            let _ = parse(&b);
            let mut c = good[..cut].to_vec();
            if c.len() >= 4 {
                c[..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            }
            let _ = parse(&c);
        }
        // Every byte flipped in turn.
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0xff;
            let _ = parse(&b);
        }
        // An attribute longer than its message.
        let mut b = good.clone();
        b[20..22].copy_from_slice(&0xfff0u16.to_ne_bytes());
        assert!(parse(&b).is_err());
    }

    /// Against the kernel, in a namespace of this test's own: entries made by ctnetlink,
    /// only the matching ones deleted. Needs root.
    #[test]
    fn deletes_only_matching_entries_in_the_kernel() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let f = CtFilter {
                proto: Some(UDP),
                backend: "10.96.2.2".parse().unwrap(),
                port: Some(80),
                scope: CtScope::Mark {
                    mark: 0x5244,
                    published: 8080,
                },
            };
            let gone = ingress_entry(UDP);
            let kept = CtEntry { mark: 0, ..gone };
            let kept = CtEntry {
                orig: t("10.213.0.254", "10.213.0.1", 40001, 8080),
                reply: t("10.96.2.2", "10.213.0.254", 80, 40001),
                ..kept
            };
            for e in [gone, kept] {
                create(&e);
            }
            let s = open(std::time::Duration::from_secs(3)).unwrap();
            assert_eq!(delete_matching(&s, &[f]).unwrap(), 1);
            assert_eq!(delete_matching(&s, &[f]).unwrap(), 0);
            let all = CtFilter {
                scope: CtScope::Mark {
                    mark: 0,
                    published: 8080,
                },
                ..f
            };
            assert_eq!(delete_matching(&s, &[all]).unwrap(), 1);
        })
        .join()
        .unwrap();
    }

    /// Makes `e` in the calling thread's namespace (ctnetlink `CT_NEW`, 60 s).
    fn create(e: &CtEntry) {
        use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
        let mut m = entry_message(1, e, false);
        let mut extra = Vec::new();
        push_attr(&mut extra, 7, &60u32.to_be_bytes()); // CTA_TIMEOUT
        m.extend(extra);
        let n = m.len() as u32;
        m[..4].copy_from_slice(&n.to_ne_bytes());
        // NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
        m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | 0x400).to_ne_bytes());
        let mut s = Socket::new(NETLINK_NETFILTER).unwrap();
        s.bind_auto().unwrap();
        s.connect(&SocketAddr::new(0, 0)).unwrap();
        s.send(&m, 0).unwrap();
        let mut buf = Vec::with_capacity(8192);
        s.recv(&mut buf, 0).unwrap();
        assert_eq!(parse(&buf).unwrap(), vec![(1, CtMessage::Ack(0))]);
    }
}

//! Embedded DNS for overlay networks, as in Docker swarm: the agent runs one server per overlay
//! network on this host, bound to the network's gateway address, so which server received a
//! query tells which network's names it may see. Containers on the network use it as their only
//! resolver.
//!
//! Invariants:
//! - Our names come only from the current [`DnsView`], with TTL 0, and nothing is cached here: an
//!   address the controller removed (task stopped, unhealthy, service deleted) is never handed out
//!   again once [`DnsServer::set_view`] returns.
//! - Every other name is relayed unchanged to the host's resolvers and their reply relayed
//!   unchanged, so a container resolves the outside world exactly as its host does.
//! - No query waits for another: local answers need no I/O besides the reply, and each forwarded
//!   query runs in its own task (over TCP, each connection does).
//!
//! [`answer`] holds every naming decision and is pure; the server around it only moves bytes.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use rand::seq::SliceRandom;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info};

/// The names one overlay network can resolve, as of the controller's latest network map.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DnsView {
    /// Keyed by lower-case service name: DNS names are case-insensitive.
    pub services: BTreeMap<String, ServiceRecord>,
}

/// A service as the resolver answers for it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceRecord {
    /// `None` for `endpoint_mode: dnsrr`, where the service name resolves to its tasks.
    pub vip: Option<Ipv4Addr>,
    /// Only running and healthy tasks: an address here receives traffic.
    pub tasks: Vec<Ipv4Addr>,
}

/// Why the resolver could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The UDP socket could not be bound.
    #[error("dns: binding udp {addr}: {source}")]
    BindUdp {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// The TCP listener could not be bound.
    #[error("dns: binding tcp {addr}: {source}")]
    BindTcp {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
}

/// Tunables of a resolver; the defaults suit production, tests shorten them.
#[derive(Clone, Debug)]
pub struct DnsOptions {
    /// How long each upstream gets before the next is tried. Long enough for a slow recursive
    /// lookup, short enough that the client (glibc waits 5 s) still gets our SERVFAIL.
    pub upstream_timeout: Duration,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            upstream_timeout: Duration::from_secs(2),
        }
    }
}

/// The EDNS payload we advertise and cap UDP replies at: the 2020 DNS flag day value, which
/// avoids IP fragmentation (and the overlay's smaller MTU) on every path.
const UDP_PAYLOAD: u16 = 1232;
/// Forwarded UDP queries in flight per server; beyond this queries are dropped (the client
/// retries) rather than letting a flood of unanswerable names grow tasks and sockets unbounded.
const MAX_FORWARDS: usize = 1024;
/// Open TCP connections per server, for the same reason.
const MAX_TCP_CONNS: usize = 128;
/// An idle TCP client is disconnected after this long (RFC 7766 suggests seconds, not minutes).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What to do with one parsed message.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// A name of ours (or a request we refuse): send this reply.
    Local(Message),
    /// Not ours: relay the query to the host's resolvers.
    Forward,
    /// Not a query (a stray response, say): no reply, so we can neither loop nor reflect.
    Ignore,
}

/// Decides the answer to `request` from `view`; `rng` spreads clients over task addresses.
pub fn answer(view: &DnsView, request: &Message, rng: &mut impl Rng) -> Answer {
    if request.metadata.message_type != MessageType::Query {
        return Answer::Ignore;
    }
    if request.metadata.op_code != OpCode::Query {
        return Answer::Local(reply(request, ResponseCode::NotImp));
    }
    // Every resolver sends exactly one question; anything else we could not answer as a whole.
    let [query] = request.queries.as_slice() else {
        return Answer::Local(reply(request, ResponseCode::FormErr));
    };
    if query.query_class() != DNSClass::IN {
        return Answer::Forward;
    }
    let name = query.name().to_lowercase().to_ascii();
    let Some(mut addrs) = lookup(view, name.trim_end_matches('.')) else {
        return Answer::Forward;
    };
    let mut msg = reply(request, ResponseCode::NoError);
    msg.metadata.authoritative = true;
    // Names we own have only A records: other types get an empty NOERROR ("no such data"),
    // not NXDOMAIN, which would tell the client the A record does not exist either.
    if query.query_type() == RecordType::A {
        addrs.shuffle(rng);
        msg.answers = addrs
            .into_iter()
            .map(|ip| Record::from_rdata(query.name().clone(), 0, RData::A(A(ip))))
            .collect();
    }
    Answer::Local(msg)
}

/// `SERVICE` is its VIP (or its tasks under dnsrr), `tasks.SERVICE` its tasks; `None` for a
/// name that is not ours.
fn lookup(view: &DnsView, name: &str) -> Option<Vec<Ipv4Addr>> {
    if let Some(s) = view.services.get(name) {
        return Some(match s.vip {
            Some(vip) => vec![vip],
            None => s.tasks.clone(),
        });
    }
    let s = view.services.get(name.strip_prefix("tasks.")?)?;
    Some(s.tasks.clone())
}

/// An empty reply to `request` carrying `code`. The question is echoed as sent (resolvers
/// randomizing the case of the name check it), and EDNS is answered with EDNS (RFC 6891).
fn reply(request: &Message, code: ResponseCode) -> Message {
    let mut msg = Message::response(request.metadata.id, request.metadata.op_code);
    msg.metadata = Metadata::response_from_request(&request.metadata);
    msg.metadata.recursion_available = true;
    msg.metadata.response_code = code;
    msg.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_PAYLOAD);
        msg.edns = Some(edns);
    }
    msg
}

/// Encodes `msg` in at most `limit` bytes. A reply that does not fit goes out with TC set and no
/// records, so the client asks again over TCP (a `tasks.` name of a large service).
fn encode(msg: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = msg.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    msg.truncate().to_vec().ok()
}

/// The host's resolvers from resolv.conf text: each `nameserver` line, port 53.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            // A scoped address (`fe80::1%eth0`) does not parse and is skipped: link-local
            // resolvers are not reachable from an overlay's gateway anyway.
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// One network's resolver. Stops when dropped.
pub struct DnsServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    /// The UDP and TCP loops; each owns its in-flight work, so aborting them stops everything.
    loops: [JoinHandle<()>; 2],
}

struct Shared {
    /// Swapped whole by `set_view`; a query clones the `Arc`, so it sees one view throughout and
    /// never holds the lock while doing I/O.
    view: RwLock<Arc<DnsView>>,
    upstreams: Vec<SocketAddr>,
    opts: DnsOptions,
    /// Who may ask (the network's subnet): `None` until [`DnsServer::set_clients`].
    clients: RwLock<Option<ipnet::Ipv4Net>>,
}

impl Shared {
    /// Whether `peer` may ask this resolver (one network's members only).
    fn admits(&self, peer: SocketAddr) -> bool {
        let clients = *self.clients.read().unwrap_or_else(PoisonError::into_inner);
        match (clients, peer.ip()) {
            (None, _) => true,
            (Some(net), IpAddr::V4(ip)) => net.contains(&ip),
            (Some(_), IpAddr::V6(_)) => false,
        }
    }

    fn view(&self) -> Arc<DnsView> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl DnsServer {
    /// Binds `addr` (UDP, plus TCP on the same port) and serves until dropped or shut down.
    /// `upstreams` are the host's resolvers. Must be called within a tokio runtime.
    pub async fn bind(addr: SocketAddr, upstreams: Vec<SocketAddr>) -> Result<Self, DnsError> {
        Self::bind_with(addr, upstreams, DnsOptions::default()).await
    }

    /// [`Self::bind`] with `options`.
    pub async fn bind_with(
        addr: SocketAddr,
        upstreams: Vec<SocketAddr>,
        opts: DnsOptions,
    ) -> Result<Self, DnsError> {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| DnsError::BindUdp { addr, source })?;
        let local_addr = udp
            .local_addr()
            .map_err(|source| DnsError::BindUdp { addr, source })?;
        // TCP takes the port UDP got, so that port 0 (tests) still gives one address for both.
        let tcp = TcpListener::bind(local_addr)
            .await
            .map_err(|source| DnsError::BindTcp {
                addr: local_addr,
                source,
            })?;
        // Forwarding to ourselves would loop until every query timed out.
        let upstreams = upstreams.into_iter().filter(|u| *u != local_addr).collect();
        let shared = Arc::new(Shared {
            view: RwLock::default(),
            upstreams,
            opts,
            clients: RwLock::default(),
        });
        info!(addr = %local_addr, upstreams = ?shared.upstreams, "dns: serving");
        let loops = [
            tokio::spawn(serve_udp(Arc::new(udp), shared.clone())),
            tokio::spawn(serve_tcp(tcp, shared.clone())),
        ];
        Ok(DnsServer {
            local_addr,
            shared,
            loops,
        })
    }

    /// The address the server listens on (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Takes effect for the next query; queries already answered are not recalled, but their
    /// TTL of 0 keeps clients from reusing them.
    pub fn set_view(&self, view: DnsView) {
        *self
            .shared
            .view
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(view);
    }

    /// Answers (and forwards for) only clients inside `clients`, the network's subnet: a
    /// query from anywhere else is dropped unanswered (a reply could reflect to a forged
    /// source). The host's firewall already keeps others away; this holds without it.
    pub fn set_clients(&self, clients: ipnet::Ipv4Net) {
        *self
            .shared
            .clients
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(clients);
    }

    /// Stops serving. The sockets close as soon as the runtime drops the aborted loops, so the
    /// address can be bound again right after (a network recreated on this host).
    pub fn shutdown(self) {}
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for l in &self.loops {
            l.abort();
        }
    }
}

/// What the server does with one packet.
enum Step {
    Drop,
    Reply(Vec<u8>),
    Forward(Message),
}

/// Parses `packet` and answers it from the current view; `tcp` says which size cap applies.
fn step(packet: &[u8], peer: SocketAddr, shared: &Shared, tcp: bool) -> Step {
    if !shared.admits(peer) {
        debug!(%peer, tcp, "dns: refusing a query from outside the network");
        return Step::Drop;
    }
    let Ok(request) = Message::from_vec(packet) else {
        debug!(%peer, len = packet.len(), "dns: dropping malformed packet");
        return Step::Drop;
    };
    let ans = answer(&shared.view(), &request, &mut rand::rng());
    if let Some(q) = request.queries.first() {
        let outcome = match &ans {
            Answer::Local(m) => m.metadata.response_code.to_str(),
            Answer::Forward => "forward",
            Answer::Ignore => "ignore",
        };
        debug!(%peer, tcp, name = %q.name(), qtype = %q.query_type(), outcome, "dns: query");
    }
    match ans {
        Answer::Ignore => Step::Drop,
        Answer::Forward => Step::Forward(request),
        Answer::Local(msg) => match encode(&msg, limit(&request, tcp)) {
            Some(bytes) => Step::Reply(bytes),
            None => Step::Drop,
        },
    }
}

/// The most a reply to `request` may take: what the client offered over UDP (capped at ours),
/// anything over TCP.
fn limit(request: &Message, tcp: bool) -> usize {
    if tcp {
        usize::from(u16::MAX)
    } else {
        usize::from(request.max_payload().min(UDP_PAYLOAD))
    }
}

async fn serve_udp(sock: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut forwards = JoinSet::new();
    let mut buf = vec![0; 65535];
    loop {
        let (len, peer) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(err) => {
                    // Pause so that an error that repeats cannot turn this into a busy loop.
                    debug!(%err, "dns: udp receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            Some(_) = forwards.join_next(), if !forwards.is_empty() => continue,
        };
        match step(&buf[..len], peer, &shared, false) {
            Step::Drop => {}
            Step::Reply(bytes) => {
                if let Err(err) = sock.send_to(&bytes, peer).await {
                    debug!(%peer, %err, "dns: udp send failed");
                }
            }
            Step::Forward(_) if forwards.len() >= MAX_FORWARDS => {
                debug!(%peer, "dns: too many forwarded queries in flight; dropping");
            }
            Step::Forward(request) => {
                let (sock, shared, query) = (sock.clone(), shared.clone(), buf[..len].to_vec());
                forwards.spawn(async move {
                    let bytes = match forward(&query, &shared, false).await {
                        Some(bytes) => bytes,
                        None => match encode(&reply(&request, ResponseCode::ServFail), 512) {
                            Some(bytes) => bytes,
                            None => return,
                        },
                    };
                    if let Err(err) = sock.send_to(&bytes, peer).await {
                        debug!(%peer, %err, "dns: udp send failed");
                    }
                });
            }
        }
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(err) => {
                    // Typically out of file descriptors: give connections time to close.
                    debug!(%err, "dns: tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        if conns.len() >= MAX_TCP_CONNS {
            debug!(%peer, "dns: too many tcp connections; refusing");
            continue;
        }
        if !shared.admits(peer) {
            debug!(%peer, "dns: refusing a tcp connection from outside the network");
            continue;
        }
        conns.spawn(serve_conn(stream, peer, shared.clone()));
    }
}

/// Answers the queries on one connection in order (RFC 7766 allows several) until the client
/// closes it or goes idle.
async fn serve_conn(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read_frame(&mut stream)).await else {
            return;
        };
        let bytes = match step(&query, peer, &shared, true) {
            // Framing is all we could trust in a malformed message: stop reading.
            Step::Drop => return,
            Step::Reply(bytes) => bytes,
            Step::Forward(request) => match forward(&query, &shared, true).await {
                Some(bytes) => bytes,
                None => match encode(&reply(&request, ResponseCode::ServFail), usize::MAX) {
                    Some(bytes) => bytes,
                    None => return,
                },
            },
        };
        if write_frame(&mut stream, &bytes).await.is_err() {
            return;
        }
    }
}

/// Asks each upstream in turn, over the transport the client used so that a large reply is not
/// truncated on its way to a TCP client. `None` when none replied in time.
async fn forward(query: &[u8], shared: &Shared, tcp: bool) -> Option<Vec<u8>> {
    for &upstream in &shared.upstreams {
        let exchange = async {
            if tcp {
                exchange_tcp(query, upstream).await
            } else {
                exchange_udp(query, upstream).await
            }
        };
        match tokio::time::timeout(shared.opts.upstream_timeout, exchange).await {
            Ok(Ok(bytes)) => return Some(bytes),
            Ok(Err(err)) => debug!(%upstream, %err, "dns: upstream failed"),
            Err(_) => debug!(%upstream, "dns: upstream timed out"),
        }
    }
    None
}

async fn exchange_udp(query: &[u8], upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let any: IpAddr = match upstream {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    // A fresh socket per query, connected: the kernel drops datagrams from anyone but the
    // upstream, an unreachable upstream fails at once instead of timing out, and replies to
    // different clients cannot be confused.
    let sock = UdpSocket::bind((any, 0)).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Ignore anything that is not a reply to this query id (a spoofing attempt).
        if n >= 12 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(query: &[u8], upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    write_frame(&mut stream, query).await?;
    read_frame(&mut stream).await
}

/// One DNS message over TCP: a two-byte length, then the message (RFC 1035 4.2.2).
async fn read_frame(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut buf = vec![0; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("dns message too long"))?;
    let mut frame = Vec::with_capacity(2 + msg.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(msg);
    stream.write_all(&frame).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::BTreeSet;
    use std::time::Instant;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn view() -> DnsView {
        let svc = |vip: Option<u8>, tasks: &[u8]| ServiceRecord {
            vip: vip.map(ip),
            tasks: tasks.iter().copied().map(ip).collect(),
        };
        DnsView {
            services: [
                ("web".to_string(), svc(Some(2), &[3, 4, 5])),
                ("db".to_string(), svc(None, &[6, 7])),
                ("idle".to_string(), svc(Some(8), &[])),
                ("gone".to_string(), svc(None, &[])),
            ]
            .into(),
        }
    }

    fn query(name: &str, rtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m
    }

    fn addrs(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    fn sorted(mut v: Vec<Ipv4Addr>) -> Vec<Ipv4Addr> {
        v.sort();
        v
    }

    fn local(a: Answer) -> Message {
        match a {
            Answer::Local(m) => m,
            other => panic!("expected a local answer, got {other:?}"),
        }
    }

    #[test]
    fn answers_from_the_view() {
        use RecordType::{A, AAAA, MX};
        // None: forwarded; Some(addresses): answered locally with NOERROR.
        let cases: &[(&str, RecordType, Option<&[u8]>)] = &[
            ("web", A, Some(&[2])),
            ("web.", A, Some(&[2])),
            ("WeB", A, Some(&[2])),
            ("tasks.web", A, Some(&[3, 4, 5])),
            ("TASKS.Web.", A, Some(&[3, 4, 5])),
            ("web", AAAA, Some(&[])),
            ("tasks.web", AAAA, Some(&[])),
            ("web", MX, Some(&[])),
            ("db", A, Some(&[6, 7])),
            ("tasks.db", A, Some(&[6, 7])),
            ("db", AAAA, Some(&[])),
            ("idle", A, Some(&[8])),
            ("tasks.idle", A, Some(&[])),
            ("gone", A, Some(&[])),
            ("tasks.gone", A, Some(&[])),
            ("example.com", A, None),
            ("web.example.com", A, None),
            ("tasks", A, None),
            ("tasks.", A, None),
            ("tasks.tasks.web", A, None),
            ("nope", AAAA, None),
        ];
        let view = view();
        let mut rng = StdRng::seed_from_u64(1);
        for &(name, rtype, want) in cases {
            let req = query(name, rtype);
            let got = answer(&view, &req, &mut rng);
            let Some(want) = want else {
                assert_eq!(got, Answer::Forward, "{name} {rtype}");
                continue;
            };
            let m = local(got);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
            assert_eq!(m.metadata.id, req.metadata.id, "{name}");
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert!(m.metadata.recursion_available, "{name}");
            assert!(m.metadata.recursion_desired, "{name}");
            assert_eq!(m.queries, req.queries, "question echoed as sent: {name}");
            let want: Vec<Ipv4Addr> = want.iter().copied().map(ip).collect();
            assert_eq!(sorted(addrs(&m)), want, "{name} {rtype}");
            for r in &m.answers {
                assert_eq!(r.ttl, 0, "{name}");
                assert_eq!(&r.name, req.queries[0].name(), "{name}");
            }
        }
    }

    #[test]
    fn task_addresses_are_shuffled_per_answer() {
        let mut view = view();
        let tasks: Vec<Ipv4Addr> = (10..18).map(ip).collect();
        view.services.get_mut("web").unwrap().tasks = tasks.clone();
        view.services.get_mut("db").unwrap().tasks = tasks.clone();
        let mut rng = StdRng::seed_from_u64(7);
        for name in ["tasks.web", "db"] {
            let mut orders = BTreeSet::new();
            for _ in 0..20 {
                let got = addrs(&local(answer(&view, &query(name, RecordType::A), &mut rng)));
                assert_eq!(sorted(got.clone()), tasks, "{name}");
                orders.insert(got);
            }
            assert!(orders.len() > 1, "{name}: always the same order");
        }
    }

    #[test]
    fn refuses_what_is_not_a_plain_query() {
        let view = view();
        let mut rng = StdRng::seed_from_u64(1);
        let mut resp = query("web", RecordType::A);
        resp.metadata.message_type = MessageType::Response;
        assert_eq!(answer(&view, &resp, &mut rng), Answer::Ignore);

        let mut notify = query("web", RecordType::A);
        notify.metadata.op_code = OpCode::Notify;
        let m = local(answer(&view, &notify, &mut rng));
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);

        let empty = Message::query();
        let m = local(answer(&view, &empty, &mut rng));
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);

        let mut two = query("web", RecordType::A);
        two.add_query(Query::query(Name::from_ascii("db").unwrap(), RecordType::A));
        let m = local(answer(&view, &two, &mut rng));
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    }

    #[test]
    fn edns_is_answered_with_edns() {
        let mut req = query("web", RecordType::A);
        req.edns = Some(Edns::new());
        let m = local(answer(&view(), &req, &mut StdRng::seed_from_u64(1)));
        assert_eq!(m.edns.map(|e| e.max_payload()), Some(UDP_PAYLOAD));
        let m = local(answer(
            &view(),
            &query("web", RecordType::A),
            &mut StdRng::seed_from_u64(1),
        ));
        assert!(m.edns.is_none());
    }

    #[test]
    fn oversized_udp_replies_are_truncated() {
        let mut view = view();
        view.services.get_mut("web").unwrap().tasks = (0..200).map(|i| ip(i as u8)).collect();
        let req = query("tasks.web", RecordType::A);
        let m = local(answer(&view, &req, &mut StdRng::seed_from_u64(1)));
        let udp = Message::from_vec(&encode(&m, limit(&req, false)).unwrap()).unwrap();
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        assert_eq!(udp.metadata.id, req.metadata.id);
        let tcp = Message::from_vec(&encode(&m, limit(&req, true)).unwrap()).unwrap();
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 200);
    }

    #[test]
    fn resolv_conf() {
        let text = "# generated\nsearch example.com\nnameserver 10.0.0.53\n\
                    nameserver   2001:db8::1 \n;nameserver 1.1.1.1\nnameserver fe80::1%eth0\n\
                    nameserver bogus\nnameserver\noptions ndots:2\nnameserver 127.0.0.53 # local\n";
        let want: Vec<SocketAddr> = ["10.0.0.53:53", "[2001:db8::1]:53", "127.0.0.53:53"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(upstreams_from_resolv_conf(text), want);
        assert!(upstreams_from_resolv_conf("").is_empty());
    }

    /// A resolver on 127.0.0.1 that answers every A query with 192.0.2.1 (TTL 300) and reports
    /// each reply's bytes.
    async fn fake_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0; 4096];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                let req = Message::from_vec(&buf[..n]).unwrap();
                let mut m = reply(&req, ResponseCode::NoError);
                m.add_answer(Record::from_rdata(
                    req.queries[0].name().clone(),
                    300,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
                ));
                let bytes = m.to_vec().unwrap();
                sock.send_to(&bytes, peer).await.unwrap();
                let _ = tx.send(bytes);
            }
        });
        (addr, rx)
    }

    /// A resolver that never answers.
    async fn silent_upstream() -> (SocketAddr, UdpSocket) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (sock.local_addr().unwrap(), sock)
    }

    async fn server(upstreams: Vec<SocketAddr>) -> DnsServer {
        let opts = DnsOptions {
            upstream_timeout: Duration::from_millis(300),
        };
        DnsServer::bind_with("127.0.0.1:0".parse().unwrap(), upstreams, opts)
            .await
            .unwrap()
    }

    async fn client() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    async fn recv(client: &UdpSocket) -> (Message, Vec<u8>) {
        let mut buf = vec![0; 65535];
        let n = tokio::time::timeout(Duration::from_secs(3), client.recv(&mut buf))
            .await
            .expect("no reply")
            .unwrap();
        buf.truncate(n);
        (Message::from_vec(&buf).unwrap(), buf)
    }

    async fn ask(client: &UdpSocket, server: &DnsServer, req: &Message) -> (Message, Vec<u8>) {
        client
            .send_to(&req.to_vec().unwrap(), server.local_addr())
            .await
            .unwrap();
        let (m, bytes) = recv(client).await;
        assert_eq!(m.metadata.id, req.metadata.id);
        (m, bytes)
    }

    fn one(name: &str, vip: Option<u8>, tasks: &[u8]) -> DnsView {
        DnsView {
            services: [(
                name.to_string(),
                ServiceRecord {
                    vip: vip.map(ip),
                    tasks: tasks.iter().copied().map(ip).collect(),
                },
            )]
            .into(),
        }
    }

    #[tokio::test]
    async fn serves_view_swaps_at_once_and_forwards_the_rest() {
        let (up, mut replies) = fake_upstream().await;
        let srv = server(vec![up]).await;
        let c = client().await;
        let a = |name: &str| query(name, RecordType::A);

        // Before any view: everything is forwarded.
        let (m, bytes) = ask(&c, &srv, &a("web")).await;
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 1)]);
        assert_eq!(bytes, replies.recv().await.unwrap(), "relayed unchanged");
        assert_eq!(m.answers[0].ttl, 300);

        srv.set_view(one("web", Some(2), &[3, 4]));
        let (m, _) = ask(&c, &srv, &a("WEB.")).await;
        assert_eq!(addrs(&m), vec![ip(2)]);
        assert!(m.metadata.recursion_available);
        let (m, _) = ask(&c, &srv, &a("tasks.web")).await;
        assert_eq!(sorted(addrs(&m)), vec![ip(3), ip(4)]);

        // A swap shows on the very next query: no caching anywhere.
        srv.set_view(one("web", None, &[9]));
        let (m, _) = ask(&c, &srv, &a("web")).await;
        assert_eq!(addrs(&m), vec![ip(9)]);
        srv.set_view(DnsView::default());
        let (m, _) = ask(&c, &srv, &a("tasks.web")).await;
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 1)], "forwarded");

        // Garbage is dropped and the server keeps serving.
        c.send_to(b"\x01\x02garbage", srv.local_addr())
            .await
            .unwrap();
        c.send_to(b"", srv.local_addr()).await.unwrap();
        srv.set_view(one("web", Some(2), &[]));
        let (m, _) = ask(&c, &srv, &a("web")).await;
        assert_eq!(addrs(&m), vec![ip(2)]);
    }

    /// L3: a resolver answers its own network's members only; others get no reply at all.
    #[tokio::test]
    async fn answers_only_its_clients() {
        let (up, _replies) = fake_upstream().await;
        let srv = server(vec![up]).await;
        srv.set_view(one("web", Some(2), &[]));
        let c = client().await;
        let req = query("web", RecordType::A);
        srv.set_clients("10.50.0.0/16".parse().unwrap());
        c.send_to(&req.to_vec().unwrap(), srv.local_addr())
            .await
            .unwrap();
        let mut buf = vec![0; 512];
        let r = tokio::time::timeout(Duration::from_millis(500), c.recv(&mut buf)).await;
        assert!(r.is_err(), "answered a client outside the network");
        let forwarded = query("example.com", RecordType::A);
        c.send_to(&forwarded.to_vec().unwrap(), srv.local_addr())
            .await
            .unwrap();
        let r = tokio::time::timeout(Duration::from_millis(500), c.recv(&mut buf)).await;
        assert!(r.is_err(), "forwarded for a client outside the network");
        let mut tcp = TcpStream::connect(srv.local_addr()).await.unwrap();
        let _ = write_frame(&mut tcp, &req.to_vec().unwrap()).await;
        let r = tokio::time::timeout(Duration::from_millis(500), read_frame(&mut tcp)).await;
        assert!(!matches!(r, Ok(Ok(_))), "answered over tcp");
        // Its own members: answered.
        srv.set_clients("127.0.0.0/8".parse().unwrap());
        let (m, _) = ask(&c, &srv, &req).await;
        assert_eq!(addrs(&m), vec![ip(2)]);
    }

    #[tokio::test]
    async fn upstreams_in_order_then_servfail() {
        let (silent, _keep) = silent_upstream().await;
        let (up, _replies) = fake_upstream().await;
        let c = client().await;
        let req = query("example.com", RecordType::A);

        let srv = server(vec![silent, up]).await;
        let start = Instant::now();
        let (m, _) = ask(&c, &srv, &req).await;
        assert_eq!(addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 1)]);
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "asked silent first"
        );

        let srv = server(vec![silent]).await;
        let (m, _) = ask(&c, &srv, &req).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(m.queries[0].name().to_ascii(), "example.com.");

        let srv = server(vec![]).await;
        let (m, _) = ask(&c, &srv, &req).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn a_slow_forward_does_not_stall_local_answers() {
        let (silent, _keep) = silent_upstream().await;
        let srv = server(vec![silent]).await;
        srv.set_view(one("web", Some(2), &[]));
        let c = client().await;
        let slow = query("example.com", RecordType::A);
        let fast = query("web", RecordType::A);
        for req in [&slow, &fast] {
            c.send_to(&req.to_vec().unwrap(), srv.local_addr())
                .await
                .unwrap();
        }
        let (first, _) = recv(&c).await;
        assert_eq!(first.metadata.id, fast.metadata.id);
        assert_eq!(addrs(&first), vec![ip(2)]);
        let (second, _) = recv(&c).await;
        assert_eq!(second.metadata.id, slow.metadata.id);
        assert_eq!(second.metadata.response_code, ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn tcp_carries_what_udp_truncates() {
        let srv = server(vec![]).await;
        let tasks: Vec<u8> = (1..=120).collect();
        srv.set_view(one("web", None, &tasks));
        let req = query("tasks.web", RecordType::A);

        let (m, _) = ask(&client().await, &srv, &req).await;
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());

        let mut stream = TcpStream::connect(srv.local_addr()).await.unwrap();
        for _ in 0..2 {
            write_frame(&mut stream, &req.to_vec().unwrap())
                .await
                .unwrap();
            let m = Message::from_vec(&read_frame(&mut stream).await.unwrap()).unwrap();
            assert_eq!(m.metadata.id, req.metadata.id);
            assert!(!m.metadata.truncation);
            assert_eq!(addrs(&m).len(), 120);
        }
    }

    #[tokio::test]
    async fn shutdown_frees_the_address() {
        let srv = server(vec![]).await;
        let addr = srv.local_addr();
        srv.shutdown();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match DnsServer::bind(addr, vec![]).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("address still taken: {e}"),
            }
        }
    }

    #[test]
    fn errors_name_the_address() {
        let addr: SocketAddr = "10.1.2.3:53".parse().unwrap();
        let e = DnsError::BindUdp {
            addr,
            source: io::Error::from(io::ErrorKind::AddrNotAvailable),
        };
        assert!(e.to_string().starts_with("dns: binding udp 10.1.2.3:53: "));
    }
}

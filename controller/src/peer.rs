//! Controller ↔ controller over gRPC: the raft transport, the server side of it, and forwarding
//! a follower's proposals to the leader.
//!
//! - [`GrpcTransport`] keeps one queue and one long-lived client stream (`RaftPeer/Send`) per
//!   peer, so messages to a peer stay in order and many go in one batch. A snapshot message goes
//!   over its own call (`RaftPeer/Snapshot`) in 1 MiB chunks, so a 100 MB store never has to
//!   fit one gRPC message, and raft hears how it ended (`report_snapshot`).
//! - Peers are found by raft id in `Store::managers` (replicated membership), so a member that
//!   joins later is reachable without configuration.
//! - [`PeerApi`] steps inbound messages into the local node with backpressure (it awaits the
//!   mailbox), answers forwarded proposals on the leader, and adds joining controllers.
//!
//! Invariants: `send` never blocks the Ready loop (full queues drop, raft retransmits); a
//! broken stream reports the peer unreachable and reconnects with backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{ConfChange, Message, MessageType};
use rudder_model::store::ManagerInfo;
use rudder_proto::v1::raft_peer_client::RaftPeerClient;
use rudder_proto::v1::raft_peer_server::RaftPeer;
use rudder_proto::v1::*;
use tokio::sync::mpsc;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::raft_node::{Forwarder, Proposal, RaftError, RaftHandle};
use crate::transport::RaftTransport;

/// Snapshot data per gRPC message.
const SNAPSHOT_CHUNK: usize = 1024 * 1024;
/// Batches queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Metadata key carrying the leader's raft id on a `NotLeader` refusal.
pub const LEADER_ID_KEY: &str = "rudder-leader-id";

/// Dials another controller at `host:port`: mutual TLS with this controller's certificate
/// when `tls` is given (always, in a running controller), plain HTTP/2 otherwise (benches).
pub fn endpoint(
    addr: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true);
    if let Some(t) = tls {
        e = e.tls_config(t.clone())?;
    }
    Ok(e)
}

/// The gRPC address of member `id`, from the replicated membership, else from `hints`.
fn member_addr(raft: &RaftHandle, hints: &Hints, id: u64) -> Option<String> {
    raft.store()
        .managers
        .get(&id)
        .map(|m| m.addr.clone())
        .or_else(|| hints.lock().expect("hints lock").get(&id).cloned())
}

/// Addresses learnt outside the store: a joining controller has an empty store until the
/// leader's snapshot arrives, yet must answer the leader before that.
type Hints = Arc<Mutex<HashMap<u64, String>>>;

/// Sends raft messages to the other controllers.
pub struct GrpcTransport {
    raft: Arc<OnceLock<RaftHandle>>,
    queues: Mutex<HashMap<u64, mpsc::Sender<Vec<Message>>>>,
    hints: Hints,
    tls: SharedTls,
}

/// The TLS peers are dialed with: replaced when the certificate is renewed; each (re)connect
/// reads the current one.
type SharedTls = Arc<std::sync::RwLock<Option<ClientTlsConfig>>>;

fn current(tls: &SharedTls) -> Option<ClientTlsConfig> {
    tls.read().expect("tls lock").clone()
}

impl GrpcTransport {
    /// A transport without TLS (tests and benches).
    pub fn new() -> Arc<Self> {
        Self::with_tls(None)
    }

    /// A transport dialing peers with `tls` (the controller's certificate, server name
    /// `manager.rudder`).
    pub fn with_tls(tls: Option<ClientTlsConfig>) -> Arc<Self> {
        Arc::new(GrpcTransport {
            raft: Default::default(),
            queues: Default::default(),
            hints: Default::default(),
            tls: Arc::new(std::sync::RwLock::new(tls)),
        })
    }

    /// Dials peers with `tls` from now on (a renewed certificate).
    pub fn set_tls(&self, tls: Option<ClientTlsConfig>) {
        *self.tls.write().expect("tls lock") = tls;
    }

    /// Remembers where member `id` is until the store knows.
    pub fn hint(&self, id: u64, addr: String) {
        self.hints.lock().expect("hints lock").insert(id, addr);
    }

    /// Completes the transport with the node it serves (the node needs the transport to start).
    pub fn attach(&self, raft: RaftHandle) {
        let _ = self.raft.set(raft);
    }
}

impl RaftTransport for GrpcTransport {
    fn send(&self, msgs: Vec<Message>) {
        let mut by_peer: HashMap<u64, Vec<Message>> = HashMap::new();
        for m in msgs {
            by_peer.entry(m.to).or_default().push(m);
        }
        let mut queues = self.queues.lock().expect("queues lock");
        for (to, batch) in by_peer {
            let q = queues.entry(to).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                tokio::spawn(peer_loop(
                    to,
                    self.raft.clone(),
                    self.hints.clone(),
                    self.tls.clone(),
                    rx,
                ));
                tx
            });
            if q.try_send(batch).is_err() {
                debug!(to, "raft queue full: dropping messages");
            }
        }
    }
}

/// Delivers everything queued for peer `to`, reconnecting whenever the stream breaks.
async fn peer_loop(
    to: u64,
    raft: Arc<OnceLock<RaftHandle>>,
    hints: Hints,
    tls: SharedTls,
    mut queue: mpsc::Receiver<Vec<Message>>,
) {
    let mut backoff = Duration::from_millis(50);
    // A batch taken from the queue but not yet sent when the stream broke.
    let mut carry: Option<Vec<Message>> = None;
    'reconnect: loop {
        let Some(raft) = raft.get().cloned() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(addr) = member_addr(&raft, &hints, to) else {
            // Not known yet (the membership entry is still being applied): wait, dropping what
            // cannot be delivered anyway.
            while queue.try_recv().is_ok() {}
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let channel = match endpoint(&addr, current(&tls).as_ref()) {
            Ok(e) => match e.connect().await {
                Ok(c) => c,
                Err(e) => {
                    debug!(to, %addr, %e, "raft peer unreachable");
                    raft.report_unreachable(to);
                    while queue.try_recv().is_ok() {}
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            Err(e) => {
                warn!(to, %addr, %e, "bad raft peer address");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        debug!(to, %addr, "raft stream to peer open");
        let mut client = RaftPeerClient::new(channel.clone())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        let (tx, rx) = mpsc::channel::<RaftBatch>(64);
        let call = tokio::spawn(async move {
            client
                .send(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        loop {
            let batch = match carry.take() {
                Some(b) => b,
                None => match queue.recv().await {
                    Some(b) => b,
                    None => return,
                },
            };
            let mut msgs = batch;
            while let Ok(more) = queue.try_recv() {
                msgs.extend(more);
                if msgs.len() >= 4096 {
                    break;
                }
            }
            let (snaps, rest): (Vec<_>, Vec<_>) = msgs
                .into_iter()
                .partition(|m| m.get_msg_type() == MessageType::MsgSnapshot);
            for s in snaps {
                tokio::spawn(send_snapshot(channel.clone(), raft.clone(), s));
            }
            if rest.is_empty() {
                continue;
            }
            let encoded: Vec<Vec<u8>> = rest
                .iter()
                .map(|m| m.write_to_bytes().unwrap_or_default())
                .collect();
            let sizes: Vec<usize> = encoded.iter().map(Vec::len).collect();
            let mut encoded = encoded.into_iter();
            for range in batches_within(&sizes, MAX_BATCH_BYTES) {
                let start = range.start;
                let batch = RaftBatch {
                    msgs: encoded
                        .by_ref()
                        .take(range.len())
                        .filter(|b| !b.is_empty())
                        .collect(),
                };
                if tx.send(batch).await.is_err() || call.is_finished() {
                    // The call ended (peer gone or restarted, or a message it refused): what
                    // was not sent goes again on a new stream.
                    let why = match call.await {
                        Ok(Ok(_)) => "the stream ended".to_string(),
                        Ok(Err(s)) => s.to_string(),
                        Err(e) => e.to_string(),
                    };
                    warn!(to, %why, "raft stream to peer broke; reconnecting");
                    carry = Some(rest[start..].to_vec());
                    raft.report_unreachable(to);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue 'reconnect;
                }
            }
            backoff = Duration::from_millis(50);
        }
    }
}

/// Bytes of raft messages one `RaftBatch` carries at most (the peers' message limit is
/// 64 MiB). Each append holds at least one entry whatever `max_size_per_msg` says, and a pass
/// that creates 10,000 tasks is an entry of several MB: merged by count alone, a follower
/// catching up got batches over the limit, the stream broke on each, the same batch was
/// carried to the next stream, and at 5,000 hosts the leader lost its quorum (issue 20).
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Splits messages of `sizes` bytes, in order, into runs of at most `limit` bytes each; a
/// message bigger than `limit` travels alone. Pure.
fn batches_within(sizes: &[usize], limit: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, n) in sizes.iter().enumerate() {
        if i > start && bytes + n > limit {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Streams one snapshot message in chunks and tells raft how it went.
async fn send_snapshot(channel: Channel, raft: RaftHandle, mut msg: Message) {
    let to = msg.to;
    let data = std::mem::take(&mut msg.mut_snapshot().data);
    let header = match msg.write_to_bytes() {
        Ok(h) => h,
        Err(e) => {
            warn!(to, %e, "cannot encode snapshot message");
            raft.report_snapshot(to, false);
            return;
        }
    };
    let total = data.len();
    let started = std::time::Instant::now();
    // Each chunk is cut when the stream is polled, so the data is not copied whole a second
    // time (a store of 150,000 tasks is a snapshot of about 100 MB).
    let mut header = Some(header);
    let chunks = (0..total.div_ceil(SNAPSHOT_CHUNK).max(1)).map(move |i| {
        let (from, to) = (i * SNAPSHOT_CHUNK, ((i + 1) * SNAPSHOT_CHUNK).min(total));
        SnapshotChunk {
            header: header.take().unwrap_or_default(),
            data: data[from..to].to_vec(),
        }
    });
    let mut client = RaftPeerClient::new(channel);
    let r = client.snapshot(tokio_stream::iter(chunks)).await;
    match r {
        Ok(_) => {
            info!(
                to,
                bytes = total,
                ms = started.elapsed().as_millis() as u64,
                "snapshot sent"
            );
            raft.report_snapshot(to, true);
        }
        Err(e) => {
            warn!(to, %e, "sending snapshot failed");
            raft.report_snapshot(to, false);
        }
    }
}

/// Forwards proposals to the leader's `RaftPeer/Propose`.
pub struct GrpcForwarder {
    raft: RaftHandle,
    channels: Mutex<HashMap<String, Channel>>,
    tls: SharedTls,
}

impl GrpcForwarder {
    /// Forwards to the leader `raft` knows of; `tls` where controllers use it.
    pub fn new(raft: RaftHandle, tls: Option<ClientTlsConfig>) -> Arc<Self> {
        Arc::new(GrpcForwarder {
            raft,
            channels: Default::default(),
            tls: Arc::new(std::sync::RwLock::new(tls)),
        })
    }

    /// Dials the leader with `tls` from now on (a renewed certificate).
    pub fn set_tls(&self, tls: Option<ClientTlsConfig>) {
        *self.tls.write().expect("tls lock") = tls;
        self.channels.lock().expect("channels lock").clear();
    }

    fn channel(&self, addr: &str) -> Result<Channel, RaftError> {
        let mut ch = self.channels.lock().expect("channels lock");
        if let Some(c) = ch.get(addr) {
            return Ok(c.clone());
        }
        let c = endpoint(addr, current(&self.tls).as_ref())
            .map_err(|e| RaftError::Forward(e.to_string()))?
            .connect_lazy();
        ch.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

#[async_trait::async_trait]
impl Forwarder for GrpcForwarder {
    async fn forward(&self, leader: u64, proposal: Proposal) -> Result<u64, RaftError> {
        let addr = member_addr(&self.raft, &Hints::default(), leader)
            .ok_or_else(|| RaftError::Forward(format!("no address for leader {leader}")))?;
        let req = match proposal {
            Proposal::Command(data) => ForwardRequest {
                command: data,
                conf_change: Vec::new(),
            },
            Proposal::Conf(cc) => ForwardRequest {
                command: Vec::new(),
                conf_change: cc
                    .write_to_bytes()
                    .map_err(|e| RaftError::Forward(e.to_string()))?,
            },
        };
        let mut client = RaftPeerClient::new(self.channel(&addr)?);
        match client.propose(req).await {
            Ok(r) => Ok(r.into_inner().index),
            Err(s) => Err(from_status(s)),
        }
    }
}

/// The error a forwarded proposal's refusal stands for.
fn from_status(s: Status) -> RaftError {
    if s.code() == tonic::Code::FailedPrecondition {
        let leader = s
            .metadata()
            .get(LEADER_ID_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return RaftError::NotLeader(leader);
    }
    if s.code() == tonic::Code::DeadlineExceeded {
        return RaftError::Timeout;
    }
    RaftError::Forward(s.message().to_string())
}

fn to_status(e: RaftError) -> Status {
    match e {
        RaftError::NotLeader(l) => {
            let mut s = Status::failed_precondition(e.to_string());
            if let Ok(v) = l.to_string().parse() {
                s.metadata_mut().insert(LEADER_ID_KEY, v);
            }
            s
        }
        RaftError::Timeout => Status::deadline_exceeded(e.to_string()),
        RaftError::Apply(a) => Status::invalid_argument(a.to_string()),
        other => Status::unavailable(other.to_string()),
    }
}

/// The largest snapshot a controller takes in (it is held in memory while it arrives).
pub const MAX_SNAPSHOT: usize = 4 << 30;

/// The `RaftPeer` service. Every call is bound to the caller's certificate (H4): raft
/// messages must come `from` the raft id in its name (`controller-<id>`), forwarded proposals
/// only from current members, and `JoinRaft` only for the caller's own id.
pub struct PeerApi {
    /// The local raft node the service feeds.
    pub raft: RaftHandle,
    /// Whether callers must carry an identity (a guard in front, as `lib::run` serves it). Off
    /// only where a bench serves the raw service.
    pub require_identity: bool,
}

impl PeerApi {
    /// The raft id the caller's certificate names (`None` only without `require_identity`).
    fn caller_id<T>(&self, req: &Request<T>, rpc: &str) -> Result<Option<u64>, Status> {
        let Some(id) = crate::tls::caller(req) else {
            if self.require_identity {
                return Err(Status::unauthenticated(format!(
                    "{rpc}: caller not authenticated"
                )));
            }
            return Ok(None);
        };
        crate::security::controller_raft_id(&id.node)
            .map(Some)
            .ok_or_else(|| {
                warn!(
                    node = id.node,
                    rpc, "raft: refused a manager certificate without a raft id"
                );
                Status::permission_denied(format!(
                    "{rpc}: {} is not a controller's identity (controller-<raft id>)",
                    id.node
                ))
            })
    }

    /// Refuses a message that does not come from the raft id of the caller's certificate.
    fn check_from(&self, caller: Option<u64>, msg: &Message) -> Result<(), Status> {
        match caller {
            Some(id) if id != msg.from => {
                warn!(
                    caller = id,
                    from = msg.from,
                    "raft: refused a message sent in another member's name"
                );
                Err(Status::permission_denied(format!(
                    "raft: a message from {} over controller-{id}'s connection",
                    msg.from
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether `caller` may still speak: not revoked (checked per batch, so a long-lived
    /// stream of a removed member ends).
    fn check_alive(&self, caller: Option<u64>) -> Result<(), Status> {
        match caller {
            Some(id)
                if self
                    .raft
                    .store()
                    .is_revoked("manager", &crate::security::controller_cn(id)) =>
            {
                Err(Status::permission_denied(format!(
                    "raft: controller {id} was removed from the group: its certificates are revoked"
                )))
            }
            _ => Ok(()),
        }
    }
}

fn decode(bytes: &[u8]) -> Result<Message, Status> {
    Message::parse_from_bytes(bytes)
        .map_err(|e| Status::invalid_argument(format!("raft message: {e}")))
}

#[tonic::async_trait]
impl RaftPeer for PeerApi {
    async fn send(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<RaftAck>, Status> {
        let caller = self.caller_id(&req, "RaftPeer/Send")?;
        let mut stream = req.into_inner();
        while let Some(batch) = stream.message().await? {
            self.check_alive(caller)?;
            for b in &batch.msgs {
                let msg = decode(b)?;
                self.check_from(caller, &msg)?;
                self.raft
                    .step(msg)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
            }
        }
        Ok(Response::new(RaftAck {}))
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftAck>, Status> {
        let caller = self.caller_id(&req, "RaftPeer/Snapshot")?;
        self.check_alive(caller)?;
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let mut msg = decode(&first.header)?;
        self.check_from(caller, &msg)?;
        let mut data = first.data;
        while let Some(c) = stream.message().await? {
            // Bounded (M5): a stream that never ends cannot fill this controller's memory.
            if data.len() + c.data.len() > MAX_SNAPSHOT {
                warn!(
                    from = msg.from,
                    limit = MAX_SNAPSHOT,
                    "raft: snapshot too large"
                );
                return Err(Status::resource_exhausted(format!(
                    "raft: snapshot larger than {MAX_SNAPSHOT} bytes"
                )));
            }
            data.extend_from_slice(&c.data);
        }
        info!(from = msg.from, bytes = data.len(), "snapshot received");
        msg.mut_snapshot().data = data.into();
        self.raft
            .step(msg)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(RaftAck {}))
    }

    async fn propose(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<ForwardReply>, Status> {
        if let Some(id) = self.caller_id(&req, "RaftPeer/Propose")? {
            let st = self.raft.status();
            let member = st.voters.contains(&id)
                || st.learners.contains(&id)
                || self.raft.store().managers.contains_key(&id);
            if !member {
                warn!(caller = id, "raft: refused a proposal from a non-member");
                return Err(Status::permission_denied(format!(
                    "raft: controller {id} is not a member of the group; only members forward \
                     proposals"
                )));
            }
        }
        let r = req.into_inner();
        let proposal = if !r.conf_change.is_empty() {
            Proposal::Conf(
                ConfChange::parse_from_bytes(&r.conf_change)
                    .map_err(|e| Status::invalid_argument(format!("conf change: {e}")))?,
            )
        } else {
            Proposal::Command(r.command)
        };
        let index = self.raft.propose_local(proposal).await.map_err(to_status)?;
        Ok(Response::new(ForwardReply { index }))
    }

    async fn join_raft(
        &self,
        req: Request<JoinRaftRequest>,
    ) -> Result<Response<JoinRaftReply>, Status> {
        let caller = self.caller_id(&req, "RaftPeer/JoinRaft")?;
        let r = req.into_inner();
        if let Some(id) = caller.filter(|id| *id != r.raft_id) {
            warn!(
                caller = id,
                asked = r.raft_id,
                "raft: refused a join in another id's name"
            );
            return Err(Status::permission_denied(format!(
                "join: controller-{id}'s certificate cannot join as raft id {}",
                r.raft_id
            )));
        }
        if r.raft_id == 0 || r.addr.is_empty() {
            return Err(Status::invalid_argument(
                "join: raft_id and addr are required",
            ));
        }
        let info = ManagerInfo {
            addr: r.addr,
            registry: r.registry,
        };
        let index = if self.raft.store().managers.get(&r.raft_id) == Some(&info)
            && self.raft.status().voters.contains(&r.raft_id)
        {
            self.raft.store().applied
        } else {
            info!(id = r.raft_id, addr = %info.addr, "controller joining");
            self.raft
                .add_member(r.raft_id, &info)
                .await
                .map_err(to_status)?
        };
        Ok(Response::new(JoinRaftReply {
            index,
            managers: manager_summaries(&self.raft),
        }))
    }
}

/// The controller group as this node knows it: members, their addresses and roles.
pub fn manager_summaries(raft: &RaftHandle) -> Vec<ManagerSummary> {
    let st = raft.status();
    raft.store()
        .managers
        .iter()
        .map(|(id, m)| ManagerSummary {
            raft_id: *id,
            addr: m.addr.clone(),
            registry: m.registry.clone(),
            voter: st.voters.contains(id),
            leader: *id == st.leader_id,
        })
        .collect()
}

/// Asks the controller at `addr` to add this one, retrying until it is a member; tells
/// `transport` where the members are.
pub async fn join(addr: &str, raft_id: u64, me: &ManagerInfo, transport: &GrpcTransport) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let r = async {
            let ch = endpoint(addr, current(&transport.tls).as_ref())
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            RaftPeerClient::new(ch)
                .join_raft(JoinRaftRequest {
                    raft_id,
                    addr: me.addr.clone(),
                    registry: me.registry.clone(),
                })
                .await
                .map_err(|s| s.message().to_string())
        }
        .await;
        match r {
            Ok(reply) => {
                for m in reply.into_inner().managers {
                    transport.hint(m.raft_id, m.addr);
                }
                info!(via = %addr, "joined the controller group");
                return;
            }
            Err(e) => warn!(via = %addr, %e, "join failed; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // One run of three messages is the point of a case.
    #[allow(clippy::single_range_in_vec_init)]
    fn batches_stay_within_the_byte_limit_and_a_big_message_travels_alone() {
        for (sizes, want) in [
            (vec![], vec![]),
            (vec![3, 3, 3], vec![0..3]),
            (vec![4, 4, 4], vec![0..2, 2..3]),
            (vec![20, 1, 1], vec![0..1, 1..3]),
            (vec![1, 20, 1], vec![0..1, 1..2, 2..3]),
            (vec![10, 10], vec![0..1, 1..2]),
        ] {
            assert_eq!(batches_within(&sizes, 10), want, "{sizes:?}");
        }
    }
}

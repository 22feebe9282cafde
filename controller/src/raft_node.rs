//! The Raft node: one task owns the raft-rs `RawNode` and drives it with a single Ready loop in
//! the documented order (send messages → apply snapshot → apply committed → append entries and
//! persist hard state in one transaction → send persisted messages → advance → light ready's
//! messages and committed entries). No business logic lives here: committed commands go to the
//! pure `Store::apply`, and messages to peers go to a [`RaftTransport`].
//!
//! Everything else talks to the node through a [`RaftHandle`]: proposals, reads and inbound peer
//! messages go in over one mailbox (drained fully before each Ready, so one Ready carries many
//! proposals: batching is what makes a durable log fast), and the applied store comes out through
//! a `watch` channel.
//!
//! Invariants:
//! - Only the leader accepts proposals. A follower answers [`RaftError::NotLeader`] with the
//!   leader it knows (0 when none); forwarding writes to the leader over gRPC is the API layer's
//!   job and comes with the gRPC transport.
//! - A proposal is acknowledged (`Ok`) only once its entry is committed and applied on this
//!   node. When leadership is lost its pending proposals fail with `NotLeader`: their outcome is
//!   unknown (the entry may still commit under the next leader), never falsely acknowledged.
//! - [`RaftHandle::read_index`] resolves only when this node has applied up to an index the
//!   leader confirmed with a quorum after the read began (raft-rs `ReadOnlyOption::Safe`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use raft::prelude::{ConfState, Entry, EntryType, HardState, Message};
use raft::{Config, RawNode, StateRole};
use rudder_model::store::{ApplyError, Envelope};
use rudder_model::{Command, Store};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::storage::{RedbStorage, StorageErr};
use crate::transport::RaftTransport;

/// Tick period; elections after 10 ticks, heartbeats every tick: a lost leader is noticed in ≈1 s.
pub const TICK: Duration = Duration::from_millis(100);

/// Election timeout in ticks (raft-rs randomizes each timeout in `[ELECTION_TICKS, 2×)`).
pub const ELECTION_TICKS: usize = 10;

/// How long a caller waits for a proposal or a read before giving up with `Timeout`.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A read whose ReadIndex request got no answer is asked again after this many ticks (raft-rs
/// silently drops a request when there is no leader, or when the leader has not yet committed an
/// entry in its term).
const READ_RETRY_TICKS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("raft: not the leader (leader is {0})")]
    NotLeader(u64),
    #[error("raft: proposal dropped: {0}")]
    Dropped(String),
    #[error("raft: timed out waiting for the proposal to commit")]
    Timeout,
    #[error("raft: node stopped")]
    Stopped,
    #[error("raft: {0} is not supported yet")]
    Unsupported(&'static str),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Storage(#[from] StorageErr),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

/// The durable side of the raft log: raft-rs reads it through [`raft::Storage`]; the Ready loop
/// writes one Ready's entries, hard state and conf state through `persist`, in one transaction.
/// [`RedbStorage`] is the real one; the simulator uses an in-memory log.
pub trait LogStore: raft::Storage + Send + 'static {
    /// Appends `entries` (replacing any suffix from the first one's index) and writes the hard
    /// and conf state, atomically and durably.
    fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        conf_state: Option<&ConfState>,
    ) -> Result<(), RaftError>;

    /// The last persisted hard state.
    fn hard_state(&self) -> HardState;
}

impl LogStore for RedbStorage {
    fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        conf_state: Option<&ConfState>,
    ) -> Result<(), RaftError> {
        Ok(RedbStorage::persist(self, entries, hard_state, conf_state)?)
    }

    fn hard_state(&self) -> HardState {
        RedbStorage::hard_state(self)
    }
}

/// What the rest of the controller may know about consensus.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub applied: u64,
    pub is_leader: bool,
}

type Reply = oneshot::Sender<Result<(), RaftError>>;
type ReadReply = oneshot::Sender<Result<u64, RaftError>>;

enum Msg {
    Propose(Envelope, Reply),
    /// A message from a peer, delivered by the transport.
    Step(Message),
    ReadIndex(ReadReply),
}

/// Cheap to clone; every API handler holds one.
#[derive(Clone)]
pub struct RaftHandle {
    tx: mpsc::Sender<Msg>,
    store: watch::Receiver<Arc<Store>>,
    status: watch::Receiver<RaftStatus>,
}

impl RaftHandle {
    /// Proposes a command and waits until it is committed and applied here. On a follower this
    /// fails at once with `NotLeader(leader)`; the caller (later: the API layer, over gRPC)
    /// forwards to that leader.
    pub async fn propose(&self, cmd: Command) -> Result<(), RaftError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Propose(Envelope::new(cmd), reply))
            .await
            .map_err(|_| RaftError::Stopped)?;
        wait(rx).await?
    }

    /// A linearizable read point: resolves with the ReadIndex once this node (leader or
    /// follower) has applied up to it, so `store()` afterwards reflects every write acknowledged
    /// before the call. Fails with `Timeout` when no quorum confirms the read.
    pub async fn read_index(&self) -> Result<u64, RaftError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::ReadIndex(reply))
            .await
            .map_err(|_| RaftError::Stopped)?;
        wait(rx).await?
    }

    /// Hands a message from a peer to the node, waiting for mailbox space.
    pub async fn step(&self, msg: Message) -> Result<(), RaftError> {
        self.tx
            .send(Msg::Step(msg))
            .await
            .map_err(|_| RaftError::Stopped)
    }

    /// Hands a message from a peer to the node without waiting: when the mailbox is full the
    /// message is dropped (`Dropped`), which raft tolerates like any network loss.
    pub fn try_step(&self, msg: Message) -> Result<(), RaftError> {
        self.tx.try_send(Msg::Step(msg)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RaftError::Dropped("mailbox full".into()),
            mpsc::error::TrySendError::Closed(_) => RaftError::Stopped,
        })
    }

    /// The store as of the last applied entry.
    pub fn store(&self) -> Arc<Store> {
        self.store.borrow().clone()
    }

    pub fn watch_store(&self) -> watch::Receiver<Arc<Store>> {
        self.store.clone()
    }

    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }
}

async fn wait<T>(rx: oneshot::Receiver<T>) -> Result<T, RaftError> {
    match tokio::time::timeout(CALL_TIMEOUT, rx).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(_)) => Err(RaftError::Stopped),
        Err(_) => Err(RaftError::Timeout),
    }
}

/// Starts the node on `storage`, sending to peers through `transport` (a
/// [`NoopTransport`](crate::transport::NoopTransport) for a one-member group), and returns its
/// handle. The loop ends when every handle is gone.
pub fn start<S: LogStore>(
    id: u64,
    storage: S,
    transport: Arc<dyn RaftTransport>,
) -> Result<RaftHandle, RaftError> {
    let cfg = Config {
        id,
        election_tick: ELECTION_TICKS,
        heartbeat_tick: 1,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    cfg.validate()?;
    let logger = crate::slog_bridge::logger();
    let mut node = RawNode::new(&cfg, storage, &logger)?;
    let voters = node
        .raft
        .prs()
        .conf()
        .voters()
        .ids()
        .iter()
        .collect::<Vec<_>>();
    if voters == [id] {
        // A one-member group need not wait an election timeout to lead.
        node.campaign()?;
    }
    let (tx, rx) = mpsc::channel(4096);
    let (store_tx, store_rx) = watch::channel(Arc::new(Store::default()));
    let (status_tx, status_rx) = watch::channel(RaftStatus {
        id,
        ..Default::default()
    });
    let mut driver = Driver {
        node,
        transport,
        store: Store::default(),
        pending: HashMap::new(),
        applied_replies: Vec::new(),
        reads: HashMap::new(),
        next_request: 1,
        nonce: rand::random(),
        ticks: 0,
        store_tx,
        status_tx,
    };
    tokio::spawn(async move {
        if let Err(e) = driver.run(rx).await {
            error!(%e, "raft loop stopped");
        }
    });
    Ok(RaftHandle {
        tx,
        store: store_rx,
        status: status_rx,
    })
}

/// A caller waiting on [`RaftHandle::read_index`].
struct PendingRead {
    reply: ReadReply,
    /// The read index, once the leader confirmed it.
    index: Option<u64>,
    /// Tick at which the ReadIndex request was last sent.
    asked_at: u64,
}

struct Driver<S: LogStore> {
    node: RawNode<S>,
    transport: Arc<dyn RaftTransport>,
    store: Store,
    /// Proposal id (in the entry context) → waiting caller.
    pending: HashMap<u64, Reply>,
    /// Replies for commands applied in this Ready, sent once the store is published.
    applied_replies: Vec<(Reply, Result<(), RaftError>)>,
    /// Read id (in the ReadIndex context) → waiting caller.
    reads: HashMap<u64, PendingRead>,
    next_request: u64,
    /// Random per process, so replayed entries from an earlier run never match a new proposal.
    nonce: u64,
    ticks: u64,
    store_tx: watch::Sender<Arc<Store>>,
    status_tx: watch::Sender<RaftStatus>,
}

impl<S: LogStore> Driver<S> {
    async fn run(&mut self, mut rx: mpsc::Receiver<Msg>) -> Result<(), RaftError> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.on_tick(),
                msg = rx.recv() => match msg {
                    Some(m) => self.handle(m),
                    None => return Ok(()),
                },
            }
            // Drain everything already queued so one Ready carries it all.
            while let Ok(m) = rx.try_recv() {
                self.handle(m);
            }
            self.on_ready()?;
        }
    }

    /// A request context: the process nonce, then a per-request id.
    fn context(&self, id: u64) -> Vec<u8> {
        let mut ctx = self.nonce.to_le_bytes().to_vec();
        ctx.extend_from_slice(&id.to_le_bytes());
        ctx
    }

    /// The request id in `ctx`, if this process made it.
    fn request_id(&self, ctx: &[u8]) -> Option<u64> {
        if ctx.len() == 16 && ctx[..8] == self.nonce.to_le_bytes() {
            Some(u64::from_le_bytes(ctx[8..].try_into().expect("8 bytes")))
        } else {
            None
        }
    }

    fn on_tick(&mut self) {
        self.node.tick();
        self.ticks += 1;
        // Callers that gave up (timed out) no longer wait.
        self.reads.retain(|_, r| !r.reply.is_closed());
        let retry: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_none() && self.ticks - r.asked_at >= READ_RETRY_TICKS)
            .map(|(id, _)| *id)
            .collect();
        for id in retry {
            let ctx = self.context(id);
            self.node.read_index(ctx);
            if let Some(r) = self.reads.get_mut(&id) {
                r.asked_at = self.ticks;
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Propose(env, reply) => {
                if self.node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(RaftError::NotLeader(self.node.raft.leader_id)));
                    return;
                }
                let id = self.next_request;
                self.next_request += 1;
                match self.node.propose(self.context(id), env.encode()) {
                    Ok(()) => {
                        self.pending.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(RaftError::Dropped(e.to_string())));
                    }
                }
            }
            Msg::Step(m) => {
                let (from, kind) = (m.from, m.get_msg_type());
                if let Err(e) = self.node.step(m) {
                    debug!(from, ?kind, %e, "raft message refused");
                }
            }
            Msg::ReadIndex(reply) => {
                let id = self.next_request;
                self.next_request += 1;
                self.node.read_index(self.context(id));
                self.reads.insert(
                    id,
                    PendingRead {
                        reply,
                        index: None,
                        asked_at: self.ticks,
                    },
                );
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), RaftError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut rd = self.node.ready();
        // 1. Messages that need no durable state (a leader's appends and heartbeats) go at once.
        self.send(rd.take_messages());
        // 2. Snapshot: neither the durable log nor the simulator compacts yet, so no leader ever
        //    sends one; installing one arrives with log compaction.
        if !rd.snapshot().is_empty() {
            return Err(RaftError::Unsupported("installing a snapshot"));
        }
        // Confirmed reads: remember their index; they resolve once applied.
        for rs in rd.take_read_states() {
            if let Some(id) = self.request_id(&rs.request_ctx) {
                if let Some(r) = self.reads.get_mut(&id) {
                    r.index.get_or_insert(rs.index);
                }
            }
        }
        // 3. Committed entries.
        let mut changed = self.apply_entries(rd.take_committed_entries());
        // 4. Append entries and persist the hard state together.
        let hs = rd.hs().cloned();
        if !rd.entries().is_empty() || hs.is_some() {
            self.node
                .mut_store()
                .persist(rd.entries(), hs.as_ref(), None)?;
        }
        // 5. Messages that promise durable state (votes, append responses) only now.
        self.send(rd.take_persisted_messages());
        // 6. Advance; the light ready carries what the persisted entries unblocked.
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.node.store().hard_state();
            hs.commit = commit;
            self.node.mut_store().persist(&[], Some(&hs), None)?;
        }
        self.send(light.take_messages());
        changed |= self.apply_entries(light.take_committed_entries());
        self.node.advance_apply();

        if changed {
            self.store_tx.send_replace(Arc::new(self.store.clone()));
        }
        // Only now, with the new store published, tell proposers their command applied: a
        // caller that reads the store next (the control loop does) must see its own write,
        // or it would plan the same change twice.
        for (reply, result) in self.applied_replies.drain(..) {
            let _ = reply.send(result);
        }
        self.resolve_reads();
        let status = RaftStatus {
            id: self.node.raft.id,
            leader_id: self.node.raft.leader_id,
            term: self.node.raft.term,
            applied: self.store.applied,
            is_leader: self.node.raft.state == StateRole::Leader,
        };
        if *self.status_tx.borrow() != status {
            if status.is_leader && !self.status_tx.borrow().is_leader {
                info!(term = status.term, "became leader");
            }
            self.status_tx.send_replace(status);
        }
        if self.node.raft.state != StateRole::Leader && !self.pending.is_empty() {
            // Leadership lost: these proposals may never commit here.
            for (_, reply) in self.pending.drain() {
                let _ = reply.send(Err(RaftError::NotLeader(self.node.raft.leader_id)));
            }
        }
        Ok(())
    }

    fn send(&self, msgs: Vec<Message>) {
        if !msgs.is_empty() {
            self.transport.send(msgs);
        }
    }

    /// Answers every read whose index this node has applied.
    fn resolve_reads(&mut self) {
        let applied = self.store.applied;
        let done: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| i <= applied) || r.reply.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            if let Some(r) = self.reads.remove(&id) {
                if let Some(index) = r.index {
                    let _ = r.reply.send(Ok(index));
                }
            }
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> bool {
        let mut changed = false;
        for e in entries {
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                // Empty entries are a new leader's no-op; conf changes come with membership.
                self.store.applied = e.index;
                continue;
            }
            let result =
                Envelope::decode(&e.data).and_then(|env| self.store.apply(e.index, env.cmd));
            if let Err(err) = &result {
                warn!(index = e.index, %err, "command refused");
                self.store.applied = e.index;
            }
            changed = true;
            if let Some(id) = self.request_id(&e.context) {
                if let Some(reply) = self.pending.remove(&id) {
                    self.applied_replies
                        .push((reply, result.map_err(RaftError::from)));
                }
            }
        }
        changed
    }
}

//! The Raft node: one task owns the raft-rs `RawNode` and drives it with a single Ready loop in
//! the documented order (send messages → apply snapshot → apply committed → append entries and
//! persist hard state in one transaction → send persisted messages → advance). No business logic
//! lives here: committed commands go to the pure `Store::apply`.
//!
//! Everything else talks to the node through a [`RaftHandle`]: proposals go in over a channel
//! (drained fully before each Ready, so one Ready carries many proposals: batching is what makes
//! a durable log fast), and the applied store comes out through a `watch` channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use raft::prelude::{Entry, EntryType};
use raft::{Config, RawNode, StateRole};
use rudder_model::store::{ApplyError, Envelope};
use rudder_model::{Command, Store};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::storage::{RedbStorage, StorageErr};

/// Tick period; elections after 10 ticks, heartbeats every tick: a lost leader is noticed in ≈1 s.
pub const TICK: Duration = Duration::from_millis(100);

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
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Storage(#[from] StorageErr),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
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

enum Msg {
    Propose(Envelope, Reply),
}

/// Cheap to clone; every API handler holds one.
#[derive(Clone)]
pub struct RaftHandle {
    tx: mpsc::Sender<Msg>,
    store: watch::Receiver<Arc<Store>>,
    status: watch::Receiver<RaftStatus>,
}

impl RaftHandle {
    /// Proposes a command and waits until it is committed and applied here.
    pub async fn propose(&self, cmd: Command) -> Result<(), RaftError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Propose(Envelope::new(cmd), reply))
            .await
            .map_err(|_| RaftError::Stopped)?;
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RaftError::Stopped),
            Err(_) => Err(RaftError::Timeout),
        }
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

/// Starts the node on `storage` and returns its handle. The loop ends when every handle is gone.
pub fn start(id: u64, storage: RedbStorage) -> Result<RaftHandle, RaftError> {
    let cfg = Config {
        id,
        election_tick: 10,
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
        store: Store::default(),
        pending: HashMap::new(),
        next_proposal: 1,
        nonce: rand::random(),
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

struct Driver {
    node: RawNode<RedbStorage>,
    store: Store,
    /// Proposal id (in the entry context) → waiting caller.
    pending: HashMap<u64, Reply>,
    next_proposal: u64,
    /// Random per process, so replayed entries from an earlier run never match a new proposal.
    nonce: u64,
    store_tx: watch::Sender<Arc<Store>>,
    status_tx: watch::Sender<RaftStatus>,
}

impl Driver {
    async fn run(&mut self, mut rx: mpsc::Receiver<Msg>) -> Result<(), RaftError> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.node.tick(); }
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

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Propose(env, reply) => {
                if self.node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(RaftError::NotLeader(self.node.raft.leader_id)));
                    return;
                }
                let id = self.next_proposal;
                self.next_proposal += 1;
                let mut ctx = self.nonce.to_le_bytes().to_vec();
                ctx.extend_from_slice(&id.to_le_bytes());
                match self.node.propose(ctx, env.encode()) {
                    Ok(()) => {
                        self.pending.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(RaftError::Dropped(e.to_string())));
                    }
                }
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), RaftError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut rd = self.node.ready();
        // 1. Messages to peers (none in a one-member group; the transport comes with peers).
        let msgs = rd.take_messages();
        if !msgs.is_empty() {
            debug!(n = msgs.len(), "no transport yet: dropping peer messages");
        }
        // 2. Snapshot: not produced while the group has one member.
        // 3. Committed entries.
        let mut changed = self.apply_entries(rd.take_committed_entries());
        // 4. Append entries and persist the hard state together.
        let hs = rd.hs().cloned();
        if !rd.entries().is_empty() || hs.is_some() {
            self.node
                .mut_store()
                .persist(rd.entries(), hs.as_ref(), None)?;
        }
        // 5. Persisted messages would go to peers here.
        let _ = rd.take_persisted_messages();
        // 6. Advance.
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.node.store().hard_state();
            hs.commit = commit;
            self.node.mut_store().persist(&[], Some(&hs), None)?;
        }
        let _ = light.take_messages();
        changed |= self.apply_entries(light.take_committed_entries());
        self.node.advance_apply();

        if changed {
            self.store_tx.send_replace(Arc::new(self.store.clone()));
        }
        let status = RaftStatus {
            id: self.node.raft.id,
            leader_id: self.node.raft.leader_id,
            term: self.node.raft.term,
            applied: self.store.applied,
            is_leader: self.node.raft.state == StateRole::Leader,
        };
        if *self.status_tx.borrow() != status {
            if status.is_leader {
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
            if e.context.len() == 16 && e.context[..8] == self.nonce.to_le_bytes() {
                let id = u64::from_le_bytes(e.context[8..].try_into().expect("8 bytes"));
                if let Some(reply) = self.pending.remove(&id) {
                    let _ = reply.send(result.map_err(RaftError::from));
                }
            }
        }
        changed
    }
}

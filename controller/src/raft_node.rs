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
//! - Only the leader's node accepts proposals. [`RaftHandle::propose`] on a follower hands the
//!   command to a [`Forwarder`] (gRPC to the leader), then waits until this node has applied the
//!   entry, so a caller always reads its own write. While there is no leader it waits a few
//!   seconds for one, then fails with `NotLeader(0)`: "no quorum".
//! - A proposal is acknowledged (`Ok`) only once its entry is committed and applied on this
//!   node. When leadership is lost its pending proposals fail with `NotLeader`: their outcome is
//!   unknown (the entry may still commit under the next leader), never falsely acknowledged.
//! - [`RaftHandle::read_index`] resolves only when this node has applied up to an index the
//!   leader confirmed with a quorum after the read began (raft-rs `ReadOnlyOption::Safe`).
//! - Snapshots: after at least [`SNAPSHOT_EVERY`] applied entries or [`SNAPSHOT_LOG_BYTES`]
//!   of them, and once the log since the last snapshot is at least half the store's size
//!   ([`snapshot_due`]), the node serialises its store (off the
//!   loop, from the published `Arc<Store>`), saves it and compacts the log up to
//!   [`KEEP_ENTRIES`] behind it. The store and the snapshot always agree on the index. A
//!   snapshot that finishes serialising after a newer one was installed from the leader is
//!   dropped.
//! - Entries, terms and votes are written durably before any message that promises them; a
//!   commit index alone (raft-rs's `must_sync` false) is written without waiting for the
//!   disk ([`LogStore::persist_commit`]). Committed entries are applied and published, and
//!   their proposers answered, before the Ready's own appends are written.
//! - Publishing the store after each Ready is a clone of persistent maps (`model::store::Map`):
//!   its cost does not grow with the store.
//! - Membership changes are conf change entries whose context carries the member's addresses;
//!   applying one changes raft's configuration and `Store::managers` at the same index.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, Snapshot,
};
use raft::SnapshotStatus;
use raft::{Config, RawNode, StateRole};
use rudder_model::store::{ApplyError, Envelope, ManagerInfo};
use rudder_model::{Command, Store};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::storage::{RedbStorage, StorageErr};
use crate::transport::RaftTransport;

/// Tick period; elections after 10–20 ticks by default (raft-rs randomizes; [`Options`] sets
/// another timeout), heartbeats every tick: a lost leader is replaced in 0.7–1.5 s, inside the
/// 2 s target even when one election splits.
pub const TICK: Duration = Duration::from_millis(70);

/// Election timeout in ticks (raft-rs randomizes each timeout in `[ELECTION_TICKS, 2×)`).
pub const ELECTION_TICKS: usize = 10;

/// The default election timeout, [`ELECTION_TICKS`] ticks.
pub const ELECTION_TIMEOUT: Duration =
    Duration::from_millis(TICK.as_millis() as u64 * ELECTION_TICKS as u64);

/// The longest election timeout a controller accepts: past it a lost leader leaves the
/// cluster without writes for minutes.
pub const MAX_ELECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Election timeout in ticks for a timeout of `timeout`, rounded up to whole ticks and at
/// least 3 (raft-rs wants it above the heartbeat tick, which is 1).
pub fn election_ticks(timeout: Duration) -> usize {
    let tick = TICK.as_millis();
    (timeout.as_millis().div_ceil(tick) as usize).max(3)
}

/// How a node runs: what [`start_with_options`] takes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Applied entries between two snapshots ([`SNAPSHOT_EVERY`]).
    pub snapshot_every: u64,
    /// Election timeout in ticks ([`ELECTION_TICKS`]; see [`election_ticks`]). Followers
    /// campaign after `[ticks, 2 × ticks)` without a heartbeat, and a leader steps down
    /// (check_quorum) after as long without hearing from a quorum.
    pub election_ticks: usize,
    /// Run the Ready loop, its ticks and what it spawns (the transport's peer streams, the
    /// snapshot serialisation) on a runtime of its own, on its own OS thread, instead of the
    /// caller's: a controller whose runtime serves thousands of agent sessions would otherwise
    /// delay the ticks and heartbeats behind them until followers start elections (issue 20,
    /// 5,000 hosts). Tests on tokio's paused clock keep it on theirs.
    pub own_runtime: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            snapshot_every: SNAPSHOT_EVERY,
            election_ticks: ELECTION_TICKS,
            own_runtime: false,
        }
    }
}

/// How long a caller waits for a proposal or a read before giving up with `Timeout`.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a proposal waits for a leader to be elected before failing with "no quorum".
const LEADER_WAIT: Duration = Duration::from_secs(4);

/// Applied entries between two snapshots.
pub const SNAPSHOT_EVERY: u64 = 20_000;

/// Bytes of entries applied since the last snapshot that make one due even before
/// [`SNAPSHOT_EVERY`] entries: a fleet's big batches (a control-loop pass creating 10,000
/// tasks is about 5 MB) would otherwise grow the log far past the store (issue 20).
pub const SNAPSHOT_LOG_BYTES: usize = 64 << 20;

/// Whether to take a snapshot now: raft asked for one it could not serve (`wanted`), or
/// enough was applied since the last (by count or by bytes) and the log since is at least half
/// the last snapshot's size (so a big store is not serialised over and over).
pub fn snapshot_due(
    wanted: bool,
    applied_since: u64,
    every: u64,
    log_bytes: usize,
    last_snapshot_bytes: usize,
) -> bool {
    wanted
        || ((applied_since >= every || log_bytes >= SNAPSHOT_LOG_BYTES)
            && log_bytes >= last_snapshot_bytes / 2)
}

/// Entries kept in the log behind a snapshot, so a follower that lags by less catches up from
/// the log instead of receiving the whole store.
pub const KEEP_ENTRIES: u64 = 5_000;

/// A Ready that takes at least this long is logged (debug) with where its time went.
const SLOW_READY_MS: u64 = 10;

/// A read whose ReadIndex request got no answer is asked again after this many ticks (raft-rs
/// silently drops a request when there is no leader, or when the leader has not yet committed an
/// entry in its term).
const READ_RETRY_TICKS: u64 = 5;

/// Why a proposal or a raft operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// 0: no leader is known, i.e. no quorum of controllers can be reached.
    #[error("{}", not_leader_message(*.0))]
    NotLeader(u64),
    /// The proposal could not be forwarded to the leader.
    #[error("raft: forwarding to the leader: {0}")]
    Forward(String),
    /// A snapshot could not be made, sent or applied.
    #[error("raft: snapshot: {0}")]
    Snapshot(String),
    /// The proposal was dropped (leadership changed, or it was refused).
    #[error("raft: proposal dropped: {0}")]
    Dropped(String),
    /// The proposal did not commit in time.
    #[error("raft: timed out waiting for the proposal to commit")]
    Timeout,
    /// The raft loop has stopped.
    #[error("raft: node stopped")]
    Stopped,
    /// The command committed but the store refused it.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The raft log failed.
    #[error(transparent)]
    Storage(#[from] StorageErr),
    /// The raft loop's thread or runtime could not be started.
    #[error("raft: cannot start the raft thread: {0}")]
    Thread(std::io::Error),
    /// raft-rs refused the operation.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

fn not_leader_message(leader: u64) -> String {
    if leader == 0 {
        "raft: no leader: a majority of the controllers cannot be reached, so the cluster refuses \
         writes until quorum returns"
            .to_string()
    } else {
        format!("raft: not the leader (leader is {leader})")
    }
}

/// The durable side of the raft log: raft-rs reads it through [`raft::Storage`]; the Ready loop
/// writes one Ready's entries, hard state and conf state through `persist`, in one transaction.
/// [`RedbStorage`] is the real one; the simulator uses an in-memory log.
pub trait LogStore: raft::Storage + Send + 'static {
    /// The latest snapshot with its data, if any.
    fn latest_snapshot(&self) -> Result<Option<Snapshot>, RaftError>;

    /// Keeps `snap` (taken by this node) as the latest snapshot and drops entries before
    /// `compact_to`.
    fn save_snapshot(&self, snap: &Snapshot, compact_to: u64) -> Result<(), RaftError>;

    /// Replaces the log with a snapshot received from the leader.
    fn install_snapshot(&self, snap: &Snapshot) -> Result<(), RaftError>;

    /// Whether raft asked for a snapshot the latest one could not serve; clears the request.
    fn take_snapshot_wanted(&self) -> bool;

    /// Appends `entries` (replacing any suffix from the first one's index) and writes the hard
    /// and conf state, atomically and durably.
    fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        conf_state: Option<&ConfState>,
    ) -> Result<(), RaftError>;

    /// Writes a hard state whose only change is the commit index, without waiting for the
    /// disk (raft-rs's `must_sync` is false for it): a commit index lost in a crash is learnt
    /// again from the leader, and the next durable write makes this one durable too. The
    /// default writes it durably.
    fn persist_commit(&self, hard_state: &HardState) -> Result<(), RaftError> {
        self.persist(&[], Some(hard_state), None)
    }

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

    fn persist_commit(&self, hard_state: &HardState) -> Result<(), RaftError> {
        Ok(RedbStorage::persist_commit(self, hard_state)?)
    }

    fn hard_state(&self) -> HardState {
        RedbStorage::hard_state(self)
    }

    fn latest_snapshot(&self) -> Result<Option<Snapshot>, RaftError> {
        Ok(RedbStorage::latest_snapshot(self)?)
    }

    fn save_snapshot(&self, snap: &Snapshot, compact_to: u64) -> Result<(), RaftError> {
        Ok(RedbStorage::save_snapshot(self, snap, compact_to)?)
    }

    fn install_snapshot(&self, snap: &Snapshot) -> Result<(), RaftError> {
        Ok(RedbStorage::install_snapshot(self, snap)?)
    }

    fn take_snapshot_wanted(&self) -> bool {
        RedbStorage::take_snapshot_wanted(self)
    }
}

/// What a follower hands to the leader: an encoded [`Envelope`], or a membership change.
#[derive(Debug, Clone)]
pub enum Proposal {
    /// An encoded command envelope.
    Command(Vec<u8>),
    /// A membership change.
    Conf(ConfChange),
}

/// Carries a proposal from a follower to the leader (gRPC in the controller) and returns the
/// index at which the leader applied it.
#[async_trait::async_trait]
pub trait Forwarder: Send + Sync + 'static {
    /// Hands `proposal` to raft node `leader`; the index it was applied at.
    async fn forward(&self, leader: u64, proposal: Proposal) -> Result<u64, RaftError>;
}

/// The membership context a conf change carries.
pub fn encode_member(info: &ManagerInfo) -> Vec<u8> {
    serde_json::to_vec(info).expect("manager info serializes")
}

/// What the rest of the controller may know about consensus.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// This controller's raft id.
    pub id: u64,
    /// The leader's raft id; 0 when none is known.
    pub leader_id: u64,
    /// The current term.
    pub term: u64,
    /// The last applied log index.
    pub applied: u64,
    /// Whether this controller leads.
    pub is_leader: bool,
    /// Current voters.
    pub voters: Vec<u64>,
    /// Current learners (replicate, do not vote).
    pub learners: Vec<u64>,
}

/// The index at which the proposal was applied.
type Reply = oneshot::Sender<Result<u64, RaftError>>;
type ReadReply = oneshot::Sender<Result<u64, RaftError>>;

enum Msg {
    Propose(Proposal, Reply),
    /// A message from a peer, delivered by the transport.
    Step(Message),
    ReadIndex(ReadReply),
    /// The transport could not reach a peer / finished sending it a snapshot.
    Unreachable(u64),
    SnapshotSent(u64, bool),
    /// A snapshot serialised off the loop, ready to be saved.
    SnapshotTaken(Snapshot),
}

/// Cheap to clone; every API handler holds one.
#[derive(Clone)]
pub struct RaftHandle {
    tx: mpsc::Sender<Msg>,
    store: watch::Receiver<Arc<Store>>,
    status: watch::Receiver<RaftStatus>,
    forwarder: Arc<std::sync::OnceLock<Arc<dyn Forwarder>>>,
    /// Propose/apply latencies and log size, for `/metrics`.
    metrics: Arc<crate::metrics::RaftMetrics>,
}

impl RaftHandle {
    /// Resolves once the raft loop has ended (it only ends on an error): the controller must
    /// then stop serving.
    pub async fn stopped(&self) {
        self.tx.closed().await
    }

    /// Proposes a command and waits until it is committed and applied here. A follower forwards
    /// it to the leader; while no leader is known the call waits up to [`LEADER_WAIT`].
    pub async fn propose(&self, cmd: Command) -> Result<(), RaftError> {
        self.submit(Proposal::Command(Envelope::new(cmd).encode()))
            .await
            .map(|_| ())
    }

    /// Adds (or re-addresses) a voting member.
    pub async fn add_member(&self, id: u64, info: &ManagerInfo) -> Result<u64, RaftError> {
        let cc = ConfChange {
            change_type: ConfChangeType::AddNode,
            node_id: id,
            context: encode_member(info).into(),
            ..Default::default()
        };
        self.submit(Proposal::Conf(cc)).await
    }

    /// Makes member `id` a voter or a non-voting learner (it keeps replicating and serving).
    pub async fn set_voter(
        &self,
        id: u64,
        info: &ManagerInfo,
        voter: bool,
    ) -> Result<u64, RaftError> {
        let cc = ConfChange {
            change_type: if voter {
                ConfChangeType::AddNode
            } else {
                ConfChangeType::AddLearnerNode
            },
            node_id: id,
            context: encode_member(info).into(),
            ..Default::default()
        };
        self.submit(Proposal::Conf(cc)).await
    }

    /// Removes a member.
    pub async fn remove_member(&self, id: u64) -> Result<u64, RaftError> {
        let cc = ConfChange {
            change_type: ConfChangeType::RemoveNode,
            node_id: id,
            ..Default::default()
        };
        self.submit(Proposal::Conf(cc)).await
    }

    /// Installs the forwarder followers use; the first call wins.
    pub fn set_forwarder(&self, f: Arc<dyn Forwarder>) {
        let _ = self.forwarder.set(f);
    }

    /// Proposes on this node, forwarding to the leader when this node is a follower, and waits
    /// until the entry is applied here. Returns its index.
    pub async fn submit(&self, proposal: Proposal) -> Result<u64, RaftError> {
        let started = tokio::time::Instant::now();
        let r = self.submit_untimed(proposal).await;
        if r.is_ok() {
            self.metrics
                .propose_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        r
    }

    async fn submit_untimed(&self, proposal: Proposal) -> Result<u64, RaftError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let leader = match self.propose_local(proposal.clone()).await {
                Err(RaftError::NotLeader(l)) => l,
                other => return other,
            };
            if leader != 0 {
                if let Some(f) = self.forwarder.get() {
                    match f.forward(leader, proposal.clone()).await {
                        // The leader refused before proposing (it lost leadership): retry.
                        Err(RaftError::NotLeader(_)) => {}
                        Err(e) => return Err(e),
                        Ok(index) => {
                            self.wait_applied(index).await?;
                            return Ok(index);
                        }
                    }
                } else {
                    return Err(RaftError::NotLeader(leader));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RaftError::NotLeader(0));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Proposes on this node only: `NotLeader` on a follower. The leader's side of forwarding.
    pub async fn propose_local(&self, proposal: Proposal) -> Result<u64, RaftError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Propose(proposal, reply))
            .await
            .map_err(|_| RaftError::Stopped)?;
        wait(rx).await?
    }

    /// Waits until this node has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<(), RaftError> {
        let mut w = self.store.clone();
        let r = tokio::time::timeout(CALL_TIMEOUT, async {
            w.wait_for(|s| s.applied >= index).await.map(|_| ())
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(RaftError::Stopped),
            Err(_) => Err(RaftError::Timeout),
        }
    }

    /// Tells raft a peer could not be reached (it then probes instead of streaming appends).
    pub fn report_unreachable(&self, id: u64) {
        let _ = self.tx.try_send(Msg::Unreachable(id));
    }

    /// Tells raft how sending a snapshot to `id` ended.
    pub fn report_snapshot(&self, id: u64, ok: bool) {
        let _ = self.tx.try_send(Msg::SnapshotSent(id, ok));
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

    /// The published store, updated after each batch of commits.
    pub fn watch_store(&self) -> watch::Receiver<Arc<Store>> {
        self.store.clone()
    }

    /// The raft loop's latencies and log size.
    pub fn metrics(&self) -> Arc<crate::metrics::RaftMetrics> {
        self.metrics.clone()
    }

    /// The raft status now.
    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// The raft status, updated as it changes.
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
    start_with(id, storage, transport, SNAPSHOT_EVERY)
}

/// [`start`] with the snapshot period given (tests take snapshots often).
pub fn start_with<S: LogStore>(
    id: u64,
    storage: S,
    transport: Arc<dyn RaftTransport>,
    snapshot_every: u64,
) -> Result<RaftHandle, RaftError> {
    start_with_options(
        id,
        storage,
        transport,
        Options {
            snapshot_every,
            ..Default::default()
        },
    )
}

/// [`start`] with every option given.
pub fn start_with_options<S: LogStore>(
    id: u64,
    storage: S,
    transport: Arc<dyn RaftTransport>,
    opts: Options,
) -> Result<RaftHandle, RaftError> {
    let snapshot_every = opts.snapshot_every;
    // Recovery: the store starts from the latest snapshot; raft then hands over the committed
    // entries after it.
    let mut store = Store::default();
    if let Some(snap) = storage.latest_snapshot()? {
        store = decode_store(&snap)?;
        info!(index = store.applied, "store restored from snapshot");
    }
    let cfg = Config {
        id,
        election_tick: opts.election_ticks.max(3),
        heartbeat_tick: 1,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        applied: store.applied,
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
    let (store_tx, store_rx) = watch::channel(Arc::new(store.clone()));
    let (status_tx, status_rx) = watch::channel(RaftStatus {
        id,
        ..Default::default()
    });
    let metrics: Arc<crate::metrics::RaftMetrics> = Default::default();
    let mut driver = Driver {
        metrics: metrics.clone(),
        node,
        transport,
        last_snapshot: store.applied,
        last_snapshot_bytes: 0,
        log_bytes: 0,
        store,
        snapshot_every: snapshot_every.max(1),
        snapshotting: false,
        self_tx: tx.downgrade(),
        pending: HashMap::new(),
        applied_replies: Vec::new(),
        reads: HashMap::new(),
        next_request: 1,
        nonce: rand::random(),
        ticks: 0,
        store_tx,
        status_tx,
    };
    let run = async move {
        if let Err(e) = driver.run(rx).await {
            error!(%e, "raft loop stopped");
        }
    };
    if opts.own_runtime {
        // Two workers: the peer streams keep moving while the loop persists a batch.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("raft")
            .enable_all()
            .build()
            .map_err(RaftError::Thread)?;
        std::thread::Builder::new()
            .name("raft-loop".into())
            .spawn(move || rt.block_on(run))
            .map_err(RaftError::Thread)?;
    } else {
        tokio::spawn(run);
    }
    Ok(RaftHandle {
        tx,
        store: store_rx,
        status: status_rx,
        forwarder: Default::default(),
        metrics,
    })
}

fn decode_store(snap: &Snapshot) -> Result<Store, RaftError> {
    let what = format!(
        "raft snapshot {}",
        crate::storage::snapshot_file_name(snap.get_metadata())
    );
    let mut store = rudder_model::snapshot::decode(&snap.data, &what)
        .map_err(|e| RaftError::Snapshot(e.to_string()))?;
    store.applied = snap.get_metadata().index;
    store.share_task_specs();
    Ok(store)
}

/// A caller waiting on [`RaftHandle::read_index`].
struct PendingRead {
    reply: ReadReply,
    /// The read index, once the leader confirmed it.
    index: Option<u64>,
    /// Tick at which the ReadIndex request was last sent.
    asked_at: u64,
    /// When it was asked, and how long a quorum took to confirm it (debug timings).
    began: std::time::Instant,
    confirmed_ms: u64,
}

struct Driver<S: LogStore> {
    /// Apply latency and log size are recorded here.
    metrics: Arc<crate::metrics::RaftMetrics>,
    node: RawNode<S>,
    transport: Arc<dyn RaftTransport>,
    store: Store,
    /// Index of the latest snapshot, and the period.
    last_snapshot: u64,
    /// Size of the latest snapshot, and bytes of entries applied since: a snapshot is taken
    /// only once the log since the last one is at least half the store's size, so the cost of
    /// serialising a big store stays proportional to what was written.
    last_snapshot_bytes: usize,
    log_bytes: usize,
    snapshot_every: u64,
    /// A snapshot is being serialised off the loop.
    snapshotting: bool,
    /// For the serialising task to hand its snapshot back (weak: the loop ends with its handles).
    self_tx: mpsc::WeakSender<Msg>,
    /// Proposal id (in the entry context) → waiting caller.
    pending: HashMap<u64, Reply>,
    /// Replies for commands applied in this Ready, sent once the store is published.
    applied_replies: Vec<(Reply, Result<u64, RaftError>)>,
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
            Msg::Propose(proposal, reply) => {
                if self.node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(RaftError::NotLeader(self.node.raft.leader_id)));
                    return;
                }
                let id = self.next_request;
                self.next_request += 1;
                let ctx = self.context(id);
                if matches!(proposal, Proposal::Conf(_)) && self.node.raft.has_pending_conf() {
                    // raft-rs would turn it into an empty entry nobody answers for.
                    let _ = reply.send(Err(RaftError::Dropped(
                        "another membership change is in progress; try again".into(),
                    )));
                    return;
                }
                let r = match proposal {
                    Proposal::Command(data) => self.node.propose(ctx, data),
                    Proposal::Conf(cc) => self.node.propose_conf_change(ctx, cc),
                };
                match r {
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
            Msg::Unreachable(id) => self.node.report_unreachable(id),
            Msg::SnapshotSent(id, ok) => self.node.report_snapshot(
                id,
                if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                },
            ),
            Msg::SnapshotTaken(snap) => {
                self.snapshotting = false;
                let index = snap.get_metadata().index;
                if index <= self.last_snapshot {
                    // A snapshot from the leader was installed while this one was being
                    // serialised: saving it would put older data behind a log that starts
                    // after the installed index.
                    info!(
                        index,
                        current = self.last_snapshot,
                        "stale snapshot dropped"
                    );
                    return;
                }
                let compact_to = index.saturating_sub(KEEP_ENTRIES);
                match self.node.mut_store().save_snapshot(&snap, compact_to) {
                    Ok(()) => {
                        self.last_snapshot = index;
                        self.last_snapshot_bytes = snap.data.len();
                        info!(
                            index,
                            bytes = snap.data.len(),
                            "snapshot saved, log compacted"
                        );
                    }
                    Err(e) => warn!(%e, "snapshot not saved"),
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
                        began: std::time::Instant::now(),
                        confirmed_ms: 0,
                    },
                );
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), RaftError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let began = std::time::Instant::now();
        let mut rd = self.node.ready();
        // 1. Messages that need no durable state (a leader's appends and heartbeats) go at once.
        self.send(rd.take_messages());
        // 2. A snapshot from the leader replaces the log and the store.
        let mut installed = false;
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let store = decode_store(&snap)?;
            self.node.mut_store().install_snapshot(&snap)?;
            info!(
                index = store.applied,
                bytes = snap.data.len(),
                "installed snapshot from the leader"
            );
            self.store = store;
            self.last_snapshot = snap.get_metadata().index;
            self.last_snapshot_bytes = snap.data.len();
            self.log_bytes = 0;
            installed = true;
        }
        // Confirmed reads: remember their index; they resolve once applied.
        for rs in rd.take_read_states() {
            if let Some(id) = self.request_id(&rs.request_ctx) {
                if let Some(r) = self.reads.get_mut(&id) {
                    if r.index.is_none() {
                        r.index = Some(rs.index);
                        r.confirmed_ms = r.began.elapsed().as_millis() as u64;
                    }
                }
            }
        }
        // 3. Committed entries, published with their replies and reads before this Ready's
        // own writes wait for the disk: they are committed, i.e. durable on a quorum already
        // (raft-rs hands out only entries this node has persisted too), so a proposer or the
        // control loop need not wait a second fsync for them (issue 20).
        let changed = self.apply_entries(rd.take_committed_entries())? || installed;
        self.publish(changed);
        let applied_ms = began.elapsed().as_millis() as u64;
        // 4. Append entries and persist the hard state together; a Ready that only moves the
        // commit index is written without waiting for the disk (`must_sync`).
        let hs = rd.hs().cloned();
        let appended = rd.entries().len();
        if !rd.must_sync() && rd.entries().is_empty() {
            if let Some(hs) = &hs {
                self.node.mut_store().persist_commit(hs)?;
            }
        } else if !rd.entries().is_empty() || hs.is_some() {
            self.node
                .mut_store()
                .persist(rd.entries(), hs.as_ref(), None)?;
        }
        let persisted_ms = began.elapsed().as_millis() as u64;
        // 5. Messages that promise durable state (votes, append responses) only now.
        self.send(rd.take_persisted_messages());
        // 6. Advance; the light ready carries what the persisted entries unblocked.
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.node.store().hard_state();
            hs.commit = commit;
            self.node.mut_store().persist_commit(&hs)?;
        }
        self.send(light.take_messages());
        let changed = self.apply_entries(light.take_committed_entries())?;
        self.node.advance_apply();
        self.publish(changed);
        let total_ms = began.elapsed().as_millis() as u64;
        if total_ms >= SLOW_READY_MS {
            // Cumulative times: where a slow commit or read spent its Ready.
            debug!(applied_ms, persisted_ms, total_ms, appended, "slow ready");
        }
        let status = RaftStatus {
            id: self.node.raft.id,
            leader_id: self.node.raft.leader_id,
            term: self.node.raft.term,
            applied: self.store.applied,
            is_leader: self.node.raft.state == StateRole::Leader,
            voters: self.node.raft.prs().conf().voters().ids().iter().collect(),
            learners: {
                let mut l: Vec<u64> = self
                    .node
                    .raft
                    .prs()
                    .conf()
                    .learners()
                    .iter()
                    .copied()
                    .collect();
                l.sort_unstable();
                l
            },
        };
        if *self.status_tx.borrow() != status {
            if status.is_leader && !self.status_tx.borrow().is_leader {
                info!(term = status.term, "became leader");
            }
            self.status_tx.send_replace(status);
        }
        let log = &self.node.raft.raft_log;
        let entries = (log.last_index() + 1).saturating_sub(log.first_index());
        self.metrics
            .log_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.metrics
            .log_since_snapshot_bytes
            .set(i64::try_from(self.log_bytes).unwrap_or(i64::MAX));
        if self.node.raft.state != StateRole::Leader && !self.pending.is_empty() {
            // Leadership lost: these proposals may never commit here.
            for (_, reply) in self.pending.drain() {
                let _ = reply.send(Err(RaftError::NotLeader(self.node.raft.leader_id)));
            }
        }
        self.maybe_snapshot();
        Ok(())
    }

    /// Publishes the store when `changed`, then tells proposers their command applied and
    /// answers the reads now applied. Only in this order: a caller that reads the store next
    /// (the control loop does) must see its own write, or it would plan the same change twice.
    fn publish(&mut self, changed: bool) {
        if changed {
            self.store_tx.send_replace(Arc::new(self.store.clone()));
        }
        for (reply, result) in self.applied_replies.drain(..) {
            let _ = reply.send(result);
        }
        self.resolve_reads();
    }

    /// Starts serialising a snapshot off the loop once enough entries were applied since the
    /// last one. The published store is exactly the applied state at `store.applied`.
    fn maybe_snapshot(&mut self) {
        let applied = self.store.applied;
        if self.snapshotting {
            return;
        }
        let wanted = self.node.store().take_snapshot_wanted() && applied > self.last_snapshot;
        if !snapshot_due(
            wanted,
            applied.saturating_sub(self.last_snapshot),
            self.snapshot_every,
            self.log_bytes,
            self.last_snapshot_bytes,
        ) {
            return;
        }
        self.log_bytes = 0;
        let Ok(term) = self.node.raft.raft_log.term(applied) else {
            return;
        };
        let Some(tx) = self.self_tx.upgrade() else {
            return;
        };
        self.snapshotting = true;
        let store = self.store_tx.borrow().clone();
        debug_assert_eq!(store.applied, applied);
        let conf = self.node.raft.prs().conf().to_conf_state();
        tokio::task::spawn_blocking(move || {
            let mut snap = Snapshot {
                data: rudder_model::snapshot::encode(&store)
                    .expect("the store serializes")
                    .into(),
                ..Default::default()
            };
            let md = snap.mut_metadata();
            md.index = applied;
            md.term = term;
            md.set_conf_state(conf);
            let _ = tx.blocking_send(Msg::SnapshotTaken(snap));
        });
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
                    debug!(
                        confirmed_ms = r.confirmed_ms,
                        applied_ms = r.began.elapsed().as_millis() as u64,
                        "read index"
                    );
                    let _ = r.reply.send(Ok(index));
                }
            }
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<bool, RaftError> {
        let mut changed = false;
        for e in entries {
            self.log_bytes += e.data.len();
            if e.get_entry_type() == EntryType::EntryConfChange {
                self.apply_conf_change(&e)?;
                changed = true;
                continue;
            }
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                // Empty entries are a new leader's no-op.
                self.store.applied = e.index;
                continue;
            }
            let started = std::time::Instant::now();
            let result =
                Envelope::decode(&e.data).and_then(|env| self.store.apply(e.index, env.cmd));
            self.metrics
                .apply_seconds
                .observe(started.elapsed().as_secs_f64());
            if let Err(err) = &result {
                warn!(index = e.index, %err, "command refused");
                self.store.applied = e.index;
            }
            changed = true;
            if let Some(id) = self.request_id(&e.context) {
                if let Some(reply) = self.pending.remove(&id) {
                    self.applied_replies
                        .push((reply, result.map(|_| e.index).map_err(RaftError::from)));
                }
            }
        }
        Ok(changed)
    }

    /// Applies a committed membership change to raft's configuration, persists the new conf
    /// state, and records the member's addresses in the store at the same index.
    fn apply_conf_change(&mut self, e: &Entry) -> Result<(), RaftError> {
        let cc = ConfChange::parse_from_bytes(&e.data)
            .map_err(|err| RaftError::Snapshot(format!("conf change {}: {err}", e.index)))?;
        let result = match self.node.apply_conf_change(&cc) {
            Ok(cs) => {
                self.node.mut_store().persist(&[], None, Some(&cs))?;
                let info = match cc.get_change_type() {
                    ConfChangeType::RemoveNode => None,
                    _ => serde_json::from_slice::<ManagerInfo>(&cc.context).ok(),
                };
                let removed = cc.get_change_type() == ConfChangeType::RemoveNode;
                if info.is_some() || removed {
                    self.store.set_manager(e.index, cc.node_id, info);
                } else {
                    self.store.applied = e.index;
                }
                info!(node = cc.node_id, change = ?cc.get_change_type(), voters = ?cs.voters, "membership changed");
                Ok(e.index)
            }
            Err(err) => {
                warn!(index = e.index, %err, "membership change refused");
                self.store.applied = e.index;
                Err(RaftError::Raft(err))
            }
        };
        if let Some(id) = self.request_id(&e.context) {
            if let Some(reply) = self.pending.remove(&id) {
                self.applied_replies.push((reply, result));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::store::ImageRecord;

    fn write(n: u64) -> Command {
        Command::PutImage {
            repo: "t".into(),
            tag: Some(format!("w{n}")),
            record: ImageRecord {
                digest: format!("sha256:{n:064x}"),
                media_type: "application/test".into(),
            },
        }
    }

    /// A log store whose writes fail once `fail` is set: a disk that went away.
    #[derive(Clone)]
    struct FailingDisk {
        inner: RedbStorage,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl raft::Storage for FailingDisk {
        fn initial_state(&self) -> raft::Result<raft::RaftState> {
            self.inner.initial_state()
        }
        fn entries(
            &self,
            low: u64,
            high: u64,
            max_size: impl Into<Option<u64>>,
            context: raft::GetEntriesContext,
        ) -> raft::Result<Vec<Entry>> {
            self.inner.entries(low, high, max_size, context)
        }
        fn term(&self, idx: u64) -> raft::Result<u64> {
            self.inner.term(idx)
        }
        fn first_index(&self) -> raft::Result<u64> {
            self.inner.first_index()
        }
        fn last_index(&self) -> raft::Result<u64> {
            self.inner.last_index()
        }
        fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
            self.inner.snapshot(request_index, to)
        }
    }

    impl LogStore for FailingDisk {
        fn latest_snapshot(&self) -> Result<Option<Snapshot>, RaftError> {
            LogStore::latest_snapshot(&self.inner)
        }
        fn save_snapshot(&self, snap: &Snapshot, compact_to: u64) -> Result<(), RaftError> {
            LogStore::save_snapshot(&self.inner, snap, compact_to)
        }
        fn install_snapshot(&self, snap: &Snapshot) -> Result<(), RaftError> {
            LogStore::install_snapshot(&self.inner, snap)
        }
        fn take_snapshot_wanted(&self) -> bool {
            LogStore::take_snapshot_wanted(&self.inner)
        }
        fn persist(
            &self,
            entries: &[Entry],
            hard_state: Option<&HardState>,
            conf_state: Option<&ConfState>,
        ) -> Result<(), RaftError> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(RaftError::Storage(crate::storage::StorageErr::Redb(
                    "disk gone".into(),
                )));
            }
            LogStore::persist(&self.inner, entries, hard_state, conf_state)
        }
        fn hard_state(&self) -> HardState {
            LogStore::hard_state(&self.inner)
        }
    }

    /// L8: a storage error ends the raft loop, and the handle says so (the controller then
    /// stops instead of serving a store that no longer follows the log).
    #[tokio::test]
    async fn l8_a_storage_error_is_seen_by_whoever_holds_the_handle() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FailingDisk {
            inner: RedbStorage::open(&dir.path().join("raft.redb"), &[1]).unwrap(),
            fail: Default::default(),
        };
        let h = start(1, disk.clone(), Arc::new(crate::transport::NoopTransport)).unwrap();
        h.propose(write(1)).await.unwrap();
        let stopped = h.clone();
        let watcher = tokio::spawn(async move { stopped.stopped().await });
        disk.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = h.propose(write(2)).await;
        tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the loop's end is seen")
            .unwrap();
    }

    /// A snapshot written by a newer build (format label above this build's) stops the
    /// controller at start, naming the snapshot file and the version, instead of being read as
    /// something it is not.
    #[tokio::test]
    async fn a_snapshot_of_a_newer_format_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let storage = RedbStorage::open(&dir.path().join("raft.redb"), &[1]).unwrap();
        let mut snap = Snapshot {
            data: br#"{"format_version":2,"nodes":{},"from_the_future":true}"#
                .to_vec()
                .into(),
            ..Default::default()
        };
        snap.mut_metadata().index = 7;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().mut_conf_state().voters = vec![1];
        storage.install_snapshot(&snap).unwrap();
        let Err(err) = start(1, storage, Arc::new(crate::transport::NoopTransport)) else {
            panic!("a newer snapshot was read");
        };
        let msg = err.to_string();
        assert!(msg.contains("snap-3-7"), "{msg}");
        assert!(msg.contains("format version 2"), "{msg}");
        // What this build writes is labelled and reads back.
        let ok = Snapshot {
            data: rudder_model::snapshot::encode(&Store::default())
                .unwrap()
                .into(),
            ..Default::default()
        };
        assert!(ok.data.starts_with(b"{\"format_version\":1"));
        assert_eq!(decode_store(&ok).unwrap(), Store::default());
    }

    /// A snapshot serialised before a newer one was installed (here: taken at index 2 and
    /// handed back after the node snapshotted past it) must not replace the newer one.
    #[test]
    fn snapshots_are_due_by_count_or_bytes_once_the_log_is_half_the_store() {
        const MB: usize = 1 << 20;
        // (wanted, applied since, log bytes, last snapshot bytes, due)
        let cases = [
            (false, 100, MB, 0, false),
            (false, SNAPSHOT_EVERY, MB, 0, true),
            (false, SNAPSHOT_EVERY, MB, 4 * MB, false),
            (false, 100, SNAPSHOT_LOG_BYTES, 0, true),
            (false, 100, SNAPSHOT_LOG_BYTES, 100 * MB, true),
            (false, 100, SNAPSHOT_LOG_BYTES, 200 * MB, false),
            (true, 1, 0, 200 * MB, true),
        ];
        for (wanted, since, log, last, due) in cases {
            assert_eq!(
                snapshot_due(wanted, since, SNAPSHOT_EVERY, log, last),
                due,
                "wanted {wanted}, {since} entries, {log} bytes since a {last}-byte snapshot"
            );
        }
    }

    /// The election timeout is given in time and kept in whole ticks, never below the floor
    /// raft-rs needs; the default is the 700 ms the lab's failover tests count on.
    #[test]
    fn election_timeouts_round_up_to_whole_ticks() {
        assert_eq!(election_ticks(ELECTION_TIMEOUT), ELECTION_TICKS);
        assert_eq!(ELECTION_TIMEOUT, Duration::from_millis(700));
        let cases = [(1, 3), (210, 3), (211, 4), (700, 10), (701, 11), (5000, 72)];
        for (ms, ticks) in cases {
            assert_eq!(election_ticks(Duration::from_millis(ms)), ticks, "{ms} ms");
        }
    }

    /// On a runtime of its own the node works as on the caller's (the controller runs it so;
    /// the other tests run it on theirs), and its end is still seen through the handle.
    #[tokio::test]
    async fn a_node_on_its_own_runtime_commits_and_its_end_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FailingDisk {
            inner: RedbStorage::open(&dir.path().join("raft.redb"), &[1]).unwrap(),
            fail: Default::default(),
        };
        let opts = Options {
            own_runtime: true,
            election_ticks: election_ticks(Duration::from_secs(3)),
            ..Default::default()
        };
        let h = start_with_options(
            1,
            disk.clone(),
            Arc::new(crate::transport::NoopTransport),
            opts,
        )
        .unwrap();
        h.propose(write(1)).await.unwrap();
        assert!(h.store().images.get("t").is_some());
        // The status is published apart from the store (a proposal's reply can come first).
        tokio::time::timeout(
            Duration::from_secs(10),
            h.watch_status().wait_for(|s| s.is_leader),
        )
        .await
        .expect("leader")
        .expect("status");
        disk.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = h.propose(write(2)).await;
        tokio::time::timeout(Duration::from_secs(10), h.stopped())
            .await
            .expect("the loop's end is seen");
    }

    #[tokio::test]
    async fn a_stale_snapshot_taken_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let storage = RedbStorage::open(&dir.path().join("raft.redb"), &[1]).unwrap();
        let transport = Arc::new(crate::transport::NoopTransport);
        let h = start_with(1, storage.clone(), transport, 5).unwrap();
        for n in 0..12 {
            h.propose(write(n)).await.unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let current = loop {
            let index = storage
                .latest_snapshot()
                .unwrap()
                .map_or(0, |s| s.get_metadata().index);
            if index >= 10 {
                break index;
            }
            assert!(tokio::time::Instant::now() < deadline, "no snapshot taken");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut stale = Snapshot {
            data: serde_json::to_vec(&Store::default()).unwrap().into(),
            ..Default::default()
        };
        stale.mut_metadata().index = 2;
        stale.mut_metadata().term = 1;
        stale.mut_metadata().mut_conf_state().voters = vec![1];
        h.tx.send(Msg::SnapshotTaken(stale)).await.unwrap();
        // The mailbox is in order: once this write applied, the stale snapshot was handled.
        h.propose(write(100)).await.unwrap();
        let snap = storage.latest_snapshot().unwrap().unwrap();
        assert!(
            snap.get_metadata().index >= current,
            "{:?}",
            snap.get_metadata()
        );
        let store: Store = serde_json::from_slice(&snap.data).unwrap();
        assert!(store.images.get("t").is_some_and(|r| r.len() >= 10));
    }
}

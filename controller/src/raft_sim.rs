//! A simulated Raft cluster for consensus tests (STYLE 14): N real Raft nodes (the production
//! [`raft_node::start`] Ready loop) on in-memory logs, wired by a [`SimNetwork`] that delivers
//! messages through each node's mailbox and can drop links, cut (isolate) nodes, lose messages
//! at a fixed-seed rate, and recover. Tests run on tokio's paused clock, so ticks, elections and
//! timeouts advance deterministically in simulated time and a 2 s failover costs no wall time.
//!
//! Determinism: message loss draws from a seeded RNG. raft-rs randomizes election timeouts with
//! its own thread RNG, so elections are reproducible in distribution, not bit for bit; the tests
//! assert only properties every schedule must satisfy.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::prelude::{ConfState, Entry, HardState, Message, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, StorageError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::raft_node::{self, LogStore, RaftError, RaftHandle, RaftStatus, TICK};
use crate::transport::RaftTransport;

/// The simulator's log: raft-rs's in-memory storage, written in one step per Ready, plus the
/// latest snapshot with its data (raft-rs's own `MemStorage::snapshot` carries none).
#[derive(Clone)]
pub(crate) struct SimStorage {
    mem: MemStorage,
    snap: Arc<Mutex<Option<Snapshot>>>,
    wanted: Arc<std::sync::atomic::AtomicBool>,
}

impl SimStorage {
    /// A member of a new cluster of `voters` (bootstrapped like the real log, from a snapshot
    /// at index 1), or, with no voters, an empty member waiting to join.
    pub(crate) fn new(voters: Vec<u64>) -> Self {
        let s = SimStorage {
            mem: MemStorage::new(),
            snap: Default::default(),
            wanted: Default::default(),
        };
        if !voters.is_empty() {
            s.install_snapshot(&crate::storage::bootstrap_snapshot(&voters))
                .expect("bootstrap snapshot");
        }
        s
    }
}

impl raft::Storage for SimStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }
    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        match &*self.snap.lock().expect("snap lock") {
            Some(s) if crate::storage::snapshot_serves(s, request_index, to) => Ok(s.clone()),
            _ => {
                self.wanted
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Err(raft::Error::Store(
                    StorageError::SnapshotTemporarilyUnavailable,
                ))
            }
        }
    }
}

impl LogStore for SimStorage {
    fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        conf_state: Option<&ConfState>,
    ) -> Result<(), RaftError> {
        let mut core = self.mem.wl();
        core.append(entries)?;
        if let Some(hs) = hard_state {
            core.set_hardstate(hs.clone());
        }
        if let Some(cs) = conf_state {
            core.set_conf_state(cs.clone());
        }
        Ok(())
    }

    fn hard_state(&self) -> HardState {
        self.mem.rl().hard_state().clone()
    }

    fn latest_snapshot(&self) -> Result<Option<Snapshot>, RaftError> {
        Ok(self.snap.lock().expect("snap lock").clone())
    }

    fn save_snapshot(&self, snap: &Snapshot, compact_to: u64) -> Result<(), RaftError> {
        *self.snap.lock().expect("snap lock") = Some(snap.clone());
        let last = raft::Storage::last_index(&self.mem)?;
        self.mem.wl().compact(compact_to.min(last))?;
        Ok(())
    }

    fn take_snapshot_wanted(&self) -> bool {
        self.wanted
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    fn install_snapshot(&self, snap: &Snapshot) -> Result<(), RaftError> {
        *self.snap.lock().expect("snap lock") = Some(snap.clone());
        self.mem.wl().apply_snapshot(snap.clone())?;
        Ok(())
    }
}

#[derive(Default)]
struct NetState {
    nodes: HashMap<u64, RaftHandle>,
    /// Isolated nodes: nothing in or out.
    cut: HashSet<u64>,
    /// Directed links that lose every message.
    dropped: HashSet<(u64, u64)>,
    /// Probability that any other message is lost.
    loss: f64,
    rng: Option<StdRng>,
    delivered: u64,
    lost: u64,
}

/// The simulated network. Delivery is immediate (into the receiver's mailbox) unless a rule or
/// the seeded loss rate drops the message.
pub struct SimNetwork {
    state: Mutex<NetState>,
}

impl SimNetwork {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(SimNetwork {
            state: Mutex::new(NetState {
                rng: Some(StdRng::seed_from_u64(seed)),
                ..Default::default()
            }),
        })
    }

    /// The transport node `from` sends through.
    pub fn transport(self: &Arc<Self>, from: u64) -> Arc<dyn RaftTransport> {
        Arc::new(SimTransport {
            from,
            net: self.clone(),
        })
    }

    fn register(&self, id: u64, handle: RaftHandle) {
        self.lock().nodes.insert(id, handle);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().expect("sim network lock")
    }

    /// Loses every message from `from` to `to` (one direction) until `recover`.
    pub fn drop(&self, from: u64, to: u64) {
        self.lock().dropped.insert((from, to));
    }

    /// Isolates `node`: it neither sends nor receives until `recover`.
    pub fn cut(&self, node: u64) {
        self.lock().cut.insert(node);
    }

    /// Drops every link between the two sides, both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        for &x in a {
            for &y in b {
                self.drop(x, y);
                self.drop(y, x);
            }
        }
    }

    /// Loses each remaining message with probability `p` (seeded).
    pub fn set_loss(&self, p: f64) {
        self.lock().loss = p;
    }

    /// Heals every cut, dropped link and loss rate.
    pub fn recover(&self) {
        let mut s = self.lock();
        s.cut.clear();
        s.dropped.clear();
        s.loss = 0.0;
    }

    /// (delivered, lost) message counts so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.delivered, s.lost)
    }

    fn deliver(&self, from: u64, msgs: Vec<Message>) {
        let mut s = self.lock();
        for m in msgs {
            let to = m.to;
            let mut lost = s.cut.contains(&from)
                || s.cut.contains(&to)
                || s.dropped.contains(&(from, to))
                || !s.nodes.contains_key(&to);
            if !lost && s.loss > 0.0 {
                let p = s.loss;
                lost = s.rng.as_mut().expect("rng").random_bool(p);
            }
            if lost {
                s.lost += 1;
                continue;
            }
            match s.nodes[&to].try_step(m) {
                Ok(()) => s.delivered += 1,
                Err(_) => s.lost += 1,
            }
        }
    }

    /// Forgets every node, breaking the node → transport → network → node handle cycle so the
    /// Ready loops end.
    fn clear(&self) {
        self.lock().nodes.clear();
    }
}

struct SimTransport {
    from: u64,
    net: Arc<SimNetwork>,
}

impl RaftTransport for SimTransport {
    fn send(&self, msgs: Vec<Message>) {
        self.net.deliver(self.from, msgs);
    }
}

/// N Raft nodes (ids 1..=N) on in-memory logs over one [`SimNetwork`], plus an election-safety
/// monitor: no two nodes may ever be leader in the same term.
pub struct SimCluster {
    pub net: Arc<SimNetwork>,
    nodes: Vec<(u64, RaftHandle)>,
    storages: HashMap<u64, SimStorage>,
    snapshot_every: u64,
    /// term → the leader seen in it.
    leaders: Arc<Mutex<HashMap<u64, u64>>>,
    violations: Arc<Mutex<Vec<String>>>,
}

impl SimCluster {
    /// Starts `n` nodes. Each starts (and so ticks) at its own phase within the first tick, as
    /// independent processes do: with every node ticking at the same instant, two followers
    /// would time out in the same instant far more often than on real hosts, and split the vote.
    pub async fn new(n: u64, seed: u64) -> Self {
        Self::with_snapshots(n, seed, raft_node::SNAPSHOT_EVERY).await
    }

    /// [`SimCluster::new`], taking a snapshot every `snapshot_every` applied entries.
    pub async fn with_snapshots(n: u64, seed: u64, snapshot_every: u64) -> Self {
        let net = SimNetwork::new(seed);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7ace);
        let voters: Vec<u64> = (1..=n).collect();
        let leaders = Arc::new(Mutex::new(HashMap::new()));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let mut nodes = Vec::new();
        let mut storages = HashMap::new();
        let slot = TICK / n as u32;
        for &id in &voters {
            if id > 1 {
                // Phases in distinct slots of the tick, jittered by the seed.
                let jitter = rng.random_range(0..slot.as_millis() as u64 / 2 + 1);
                tokio::time::sleep(slot / 2 + Duration::from_millis(jitter)).await;
            }
            let storage = SimStorage::new(voters.clone());
            storages.insert(id, storage.clone());
            let handle = raft_node::start_with(id, storage, net.transport(id), snapshot_every)
                .expect("start raft node");
            net.register(id, handle.clone());
            tokio::spawn(monitor(
                handle.watch_status(),
                leaders.clone(),
                violations.clone(),
            ));
            nodes.push((id, handle));
        }
        SimCluster {
            net,
            nodes,
            storages,
            snapshot_every,
            leaders,
            violations,
        }
    }

    /// Starts node `id` with an empty log, not yet a member: it waits for the leader to add it.
    pub fn spawn_joiner(&mut self, id: u64) -> RaftHandle {
        let storage = SimStorage::new(vec![]);
        self.storages.insert(id, storage.clone());
        let handle =
            raft_node::start_with(id, storage, self.net.transport(id), self.snapshot_every)
                .expect("start raft node");
        self.net.register(id, handle.clone());
        tokio::spawn(monitor(
            handle.watch_status(),
            self.leaders.clone(),
            self.violations.clone(),
        ));
        self.nodes.push((id, handle.clone()));
        handle
    }

    /// The index of node `id`'s latest snapshot (0: none).
    pub fn snapshot_index(&self, id: u64) -> u64 {
        self.storages[&id]
            .latest_snapshot()
            .expect("sim storage")
            .map_or(0, |s| s.get_metadata().index)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|(id, _)| *id).collect()
    }

    pub fn node(&self, id: u64) -> &RaftHandle {
        &self
            .nodes
            .iter()
            .find(|(i, _)| *i == id)
            .expect("node id")
            .1
    }

    pub fn status(&self, id: u64) -> RaftStatus {
        self.node(id).status()
    }

    /// Waits until exactly one of `among` is leader and every one of them follows it in its
    /// term; returns the leader.
    pub async fn wait_leader(&self, among: &[u64], within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        loop {
            let st: Vec<RaftStatus> = among.iter().map(|&id| self.status(id)).collect();
            let leaders: Vec<&RaftStatus> = st.iter().filter(|s| s.is_leader).collect();
            if let [l] = leaders[..] {
                if st.iter().all(|s| s.leader_id == l.id && s.term == l.term) {
                    return Some(l.id);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every node in `ids` has applied at least `index`.
    pub async fn wait_applied(&self, ids: &[u64], index: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if ids.iter().all(|&id| self.status(id).applied >= index) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Panics if two nodes were ever leader in the same term.
    pub fn assert_election_safety(&self) {
        let v = self.violations.lock().expect("violations lock");
        assert!(v.is_empty(), "election safety violated: {v:?}");
        assert!(
            !self.leaders.lock().expect("leaders lock").is_empty(),
            "no leader was ever seen"
        );
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        self.net.clear();
    }
}

async fn monitor(
    mut rx: tokio::sync::watch::Receiver<RaftStatus>,
    leaders: Arc<Mutex<HashMap<u64, u64>>>,
    violations: Arc<Mutex<Vec<String>>>,
) {
    loop {
        let s = rx.borrow_and_update().clone();
        if s.is_leader {
            let prev = *leaders
                .lock()
                .expect("leaders lock")
                .entry(s.term)
                .or_insert(s.id);
            if prev != s.id {
                violations
                    .lock()
                    .expect("violations lock")
                    .push(format!("term {}: leaders {prev} and {}", s.term, s.id));
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use rudder_model::store::ImageRecord;
    use rudder_model::{Command, Store};

    use super::*;
    use crate::raft_node::ELECTION_TICKS;
    use crate::transport::NoopTransport;

    const SEED: u64 = 0x5eed;

    /// Write `n`: a tag in the "sim" repository, so presence is easy to check.
    fn write(n: u64) -> Command {
        Command::PutImage {
            repo: "sim".into(),
            tag: Some(format!("w{n}")),
            record: ImageRecord {
                digest: format!("sha256:{n:064x}"),
                media_type: "application/test".into(),
            },
        }
    }

    fn has(store: &Store, n: u64) -> bool {
        store
            .images
            .get("sim")
            .is_some_and(|refs| refs.contains_key(&format!("w{n}")))
    }

    fn refused(r: &Result<(), RaftError>) -> bool {
        matches!(r, Err(RaftError::NotLeader(_) | RaftError::Timeout))
    }

    /// Proposes writes until `stop`, following `NotLeader` hints (else trying the next node);
    /// returns the acknowledged ones.
    async fn client(
        nodes: Vec<(u64, RaftHandle)>,
        mut target: u64,
        stop: Arc<AtomicBool>,
    ) -> Vec<u64> {
        let mut acked = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let h = &nodes.iter().find(|(id, _)| *id == target).expect("node").1;
            let r = tokio::time::timeout(Duration::from_millis(500), h.propose(write(n))).await;
            match r {
                Ok(Ok(())) => acked.push(n),
                Ok(Err(RaftError::NotLeader(l))) if l != 0 && l != target => target = l,
                _ => {
                    target = target % nodes.len() as u64 + 1;
                    tokio::time::sleep(TICK).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acked
    }

    #[tokio::test(start_paused = true)]
    async fn single_member_leads_at_once_and_serves_reads() {
        let storage = SimStorage::new(vec![1]);
        let h = raft_node::start(1, storage, Arc::new(NoopTransport)).unwrap();
        h.propose(write(1)).await.unwrap();
        let idx = h.read_index().await.unwrap();
        // Index 1 is the leader's no-op, 2 the write.
        assert!(idx >= 2, "index {idx}");
        assert!(h.status().applied >= idx);
        assert!(h.status().is_leader);
        assert!(has(&h.store(), 1));
    }

    #[tokio::test(start_paused = true)]
    async fn three_nodes_elect_exactly_one_leader() {
        let c = SimCluster::new(3, SEED).await;
        let all = c.ids();
        let leader = c
            .wait_leader(&all, Duration::from_secs(3))
            .await
            .expect("a leader within 3 s");
        // Stable: heartbeats keep the same leader in the same term.
        let term = c.status(leader).term;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(c.wait_leader(&all, TICK).await, Some(leader));
        assert_eq!(c.status(leader).term, term);
        let leaders = all.iter().filter(|&&id| c.status(id).is_leader).count();
        assert_eq!(leaders, 1);
        c.assert_election_safety();
    }

    #[tokio::test(start_paused = true)]
    async fn proposals_through_the_leader_commit_on_all() {
        let c = SimCluster::new(3, SEED).await;
        let all = c.ids();
        let leader = c.wait_leader(&all, Duration::from_secs(3)).await.unwrap();
        let follower = *all.iter().find(|&&id| id != leader).unwrap();

        // A follower refuses and names the leader.
        let r = c.node(follower).propose(write(0)).await;
        assert!(
            matches!(r, Err(RaftError::NotLeader(l)) if l == leader),
            "{r:?}"
        );

        let proposals: Vec<_> = (1..=50)
            .map(|n| {
                let h = c.node(leader).clone();
                tokio::spawn(async move { h.propose(write(n)).await })
            })
            .collect();
        for p in proposals {
            p.await.unwrap().unwrap();
        }
        let applied = c.status(leader).applied;
        assert!(c.wait_applied(&all, applied, Duration::from_secs(1)).await);
        for &id in &all {
            let store = c.node(id).store();
            assert!((1..=50).all(|n| has(&store, n)), "node {id} misses writes");
            assert!(!has(&store, 0), "a refused write was applied on {id}");
        }

        // ReadIndex on a follower: afterwards its store reflects every acknowledged write.
        c.node(leader).propose(write(51)).await.unwrap();
        let written = c.status(leader).applied;
        let idx = c.node(follower).read_index().await.unwrap();
        assert!(
            idx >= written,
            "read index {idx} before the write at {written}"
        );
        assert!(c.status(follower).applied >= idx);
        assert!(has(&c.node(follower).store(), 51));
        c.assert_election_safety();
    }

    #[tokio::test(start_paused = true)]
    async fn isolated_leader_loses_no_acknowledged_write_and_catches_up() {
        let c = SimCluster::new(3, SEED).await;
        let all = c.ids();
        let old = c.wait_leader(&all, Duration::from_secs(3)).await.unwrap();
        let rest: Vec<u64> = all.iter().copied().filter(|&id| id != old).collect();

        let stop = Arc::new(AtomicBool::new(false));
        let nodes: Vec<(u64, RaftHandle)> =
            all.iter().map(|&id| (id, c.node(id).clone())).collect();
        let writer = tokio::spawn(client(nodes, old, stop.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;

        // "Kill" the leader mid-stream.
        let cut_at = Instant::now();
        c.net.cut(old);
        let Some(new) = c.wait_leader(&rest, Duration::from_secs(2)).await else {
            let st: Vec<RaftStatus> = all.iter().map(|&id| c.status(id)).collect();
            panic!("no new leader within 2 s of losing the old one: {st:?}");
        };
        let failover = cut_at.elapsed();
        assert_ne!(new, old);
        assert!(
            failover <= Duration::from_secs(2),
            "failover took {failover:?}"
        );
        assert!(
            failover >= TICK * ELECTION_TICKS as u32 / 2,
            "suspiciously fast"
        );

        // The new leader accepts writes; the isolated one refuses them.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = c.node(old).propose(write(1_000_000)).await;
        assert!(refused(&r), "isolated old leader accepted a write: {r:?}");
        assert!(
            !c.status(old).is_leader,
            "check-quorum steps the old leader down"
        );
        let r = tokio::time::timeout(Duration::from_secs(3), c.node(old).read_index()).await;
        assert!(
            !matches!(r, Ok(Ok(_))),
            "isolated node served a fresh read: {r:?}"
        );

        stop.store(true, Ordering::Relaxed);
        let acked = writer.await.unwrap();
        assert!(
            acked.len() > 20,
            "too few writes acknowledged: {}",
            acked.len()
        );
        let store = c.node(new).store();
        let missing: Vec<u64> = acked.iter().copied().filter(|&n| !has(&store, n)).collect();
        assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
        let before = store.images["sim"].len();
        assert!(c.node(new).read_index().await.is_ok());

        // Back on the network, the old leader follows the new one and catches up.
        c.net.recover();
        let leader = c.wait_leader(&all, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            leader, new,
            "a rejoining member must not depose the leader (pre-vote)"
        );
        c.node(new).propose(write(2_000_000)).await.unwrap();
        let applied = c.status(new).applied;
        assert!(c.wait_applied(&all, applied, Duration::from_secs(3)).await);
        for &id in &all {
            let s = c.node(id).store();
            assert!(
                acked.iter().all(|&n| has(&s, n)),
                "node {id} misses a write"
            );
            assert!(!has(&s, 1_000_000), "refused write applied on {id}");
            assert!(has(&s, 2_000_000));
        }
        assert!(c.node(old).store().images["sim"].len() > before);
        c.assert_election_safety();
    }

    #[tokio::test(start_paused = true)]
    async fn a_minority_partition_cannot_commit() {
        let c = SimCluster::new(5, SEED).await;
        let all = c.ids();
        let old = c.wait_leader(&all, Duration::from_secs(3)).await.unwrap();
        let minority: Vec<u64> = vec![old, all.iter().copied().find(|&id| id != old).unwrap()];
        let majority: Vec<u64> = all
            .iter()
            .copied()
            .filter(|id| !minority.contains(id))
            .collect();
        c.net.partition(&minority, &majority);

        let r = c.node(old).propose(write(1)).await;
        assert!(refused(&r), "minority leader committed: {r:?}");
        for &id in &minority {
            let r = c.node(id).propose(write(2)).await;
            assert!(refused(&r), "minority node {id} committed: {r:?}");
            assert!(!c.status(id).is_leader);
        }
        let new = c
            .wait_leader(&majority, Duration::from_secs(3))
            .await
            .expect("majority elects a leader");
        c.node(new).propose(write(3)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        for &id in &minority {
            let s = c.node(id).store();
            assert!(
                !has(&s, 1) && !has(&s, 2) && !has(&s, 3),
                "minority {id} applied"
            );
        }

        c.net.recover();
        assert_eq!(c.wait_leader(&all, Duration::from_secs(5)).await, Some(new));
        c.node(new).propose(write(4)).await.unwrap();
        let applied = c.status(new).applied;
        assert!(c.wait_applied(&all, applied, Duration::from_secs(3)).await);
        for &id in &all {
            let s = c.node(id).store();
            assert!(
                has(&s, 3) && has(&s, 4),
                "node {id} missed a committed write"
            );
            assert!(
                !has(&s, 1) && !has(&s, 2),
                "node {id} applied a refused write"
            );
        }
        c.assert_election_safety();
    }

    #[tokio::test(start_paused = true)]
    async fn five_nodes_tolerate_two_failures() {
        let c = SimCluster::new(5, SEED).await;
        let all = c.ids();
        let old = c.wait_leader(&all, Duration::from_secs(3)).await.unwrap();
        let other = all.iter().copied().find(|&id| id != old).unwrap();
        c.net.cut(old);
        c.net.cut(other);
        let rest: Vec<u64> = all
            .iter()
            .copied()
            .filter(|&id| id != old && id != other)
            .collect();
        let new = c
            .wait_leader(&rest, Duration::from_secs(3))
            .await
            .expect("3 of 5 elect a leader");
        for n in 1..=10 {
            c.node(new).propose(write(n)).await.unwrap();
        }
        let follower = *rest.iter().find(|&&id| id != new).unwrap();
        c.node(follower).read_index().await.unwrap();
        assert!((1..=10).all(|n| has(&c.node(follower).store(), n)));

        // A third failure loses quorum: writes are refused, not lost or half-done.
        c.net.cut(follower);
        let r = c.node(new).propose(write(11)).await;
        assert!(refused(&r), "committed without quorum: {r:?}");

        c.net.recover();
        let leader = c.wait_leader(&all, Duration::from_secs(5)).await.unwrap();
        c.node(leader).propose(write(12)).await.unwrap();
        let applied = c.status(leader).applied;
        assert!(c.wait_applied(&all, applied, Duration::from_secs(3)).await);
        for &id in &all {
            let s = c.node(id).store();
            assert!(
                (1..=10).all(|n| has(&s, n)) && has(&s, 12),
                "node {id} diverged"
            );
        }
        c.assert_election_safety();
    }

    #[tokio::test(start_paused = true)]
    async fn writes_commit_on_all_over_a_lossy_network() {
        let c = SimCluster::new(3, SEED).await;
        let all = c.ids();
        c.net.set_loss(0.2);
        let mut acked = Vec::new();
        for n in 1..=30 {
            // Retry until acknowledged: a lost message may cost a leader or a proposal.
            for _ in 0..20 {
                let Some(l) = c.wait_leader(&all, Duration::from_secs(5)).await else {
                    continue;
                };
                if c.node(l).propose(write(n)).await.is_ok() {
                    acked.push(n);
                    break;
                }
            }
        }
        assert_eq!(acked.len(), 30);
        let (delivered, lost) = c.net.counts();
        assert!(
            lost > 0 && delivered > lost,
            "delivered {delivered}, lost {lost}"
        );
        c.net.recover();
        let l = c.wait_leader(&all, Duration::from_secs(5)).await.unwrap();
        let applied = c.status(l).applied;
        assert!(c.wait_applied(&all, applied, Duration::from_secs(3)).await);
        for &id in &all {
            assert!((1..=30).all(|n| has(&c.node(id).store(), n)), "node {id}");
        }
        c.assert_election_safety();
    }

    /// Forwards a follower's proposals straight to the leader's node, as the gRPC forwarder
    /// does between processes.
    struct SimForwarder(Vec<(u64, RaftHandle)>);

    #[async_trait::async_trait]
    impl raft_node::Forwarder for SimForwarder {
        async fn forward(
            &self,
            leader: u64,
            proposal: raft_node::Proposal,
        ) -> Result<u64, RaftError> {
            let (_, h) = self
                .0
                .iter()
                .find(|(id, _)| *id == leader)
                .ok_or(RaftError::NotLeader(0))?;
            h.propose_local(proposal).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_forwards_writes_and_reads_its_own() {
        let c = SimCluster::new(3, SEED).await;
        let all = c.ids();
        let fwd = Arc::new(SimForwarder(c.nodes.clone()));
        for &id in &all {
            c.node(id).set_forwarder(fwd.clone());
        }
        let leader = c.wait_leader(&all, Duration::from_secs(3)).await.unwrap();
        let follower = *all.iter().find(|&&id| id != leader).unwrap();
        for n in 1..=20 {
            c.node(follower).propose(write(n)).await.unwrap();
            assert!(has(&c.node(follower).store(), n), "write {n} not visible");
        }
        c.assert_election_safety();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lagging_follower_catches_up_from_a_snapshot() {
        let c = SimCluster::with_snapshots(3, SEED, 20).await;
        let all = c.ids();
        let leader = c.wait_leader(&all, Duration::from_secs(3)).await.unwrap();
        let lagging = *all.iter().find(|&&id| id != leader).unwrap();
        c.net.cut(lagging);
        // More than a snapshot period plus the kept tail, so the entries it misses are gone
        // from the leader's log.
        let n = 2 * raft_node::KEEP_ENTRIES + 100;
        let mut tasks = Vec::new();
        for i in 1..=n {
            let h = c.node(leader).clone();
            tasks.push(tokio::spawn(async move { h.propose(write(i)).await }));
            if tasks.len() == 500 {
                for t in tasks.drain(..) {
                    t.await.unwrap().unwrap();
                }
            }
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // Let the last snapshot be taken and saved.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            c.snapshot_index(leader) > raft_node::KEEP_ENTRIES,
            "leader took snapshots"
        );
        c.net.recover();
        let applied = c.status(leader).applied;
        assert!(
            c.wait_applied(&[lagging], applied, Duration::from_secs(5))
                .await
        );
        assert!(
            c.snapshot_index(lagging) > 1,
            "caught up through a snapshot"
        );
        let (a, b) = (c.node(leader).store(), c.node(lagging).store());
        assert_eq!(a.images, b.images);
        c.assert_election_safety();
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_joins_catches_up_and_leaves() {
        let mut c = SimCluster::with_snapshots(1, SEED, 20).await;
        let leader = c.wait_leader(&[1], Duration::from_secs(1)).await.unwrap();
        for i in 1..=50 {
            c.node(leader).propose(write(i)).await.unwrap();
        }
        let joiner = c.spawn_joiner(2);
        let info = rudder_model::store::ManagerInfo {
            addr: "h2:4243".into(),
            registry: "h2:5000".into(),
        };
        c.node(leader).add_member(2, &info).await.unwrap();
        assert_eq!(c.node(leader).store().managers.get(&2), Some(&info));
        for i in 51..=60 {
            c.node(leader).propose(write(i)).await.unwrap();
        }
        let applied = c.status(leader).applied;
        assert!(c.wait_applied(&[2], applied, Duration::from_secs(3)).await);
        let store = joiner.store();
        assert!(
            (1..=60).all(|n| has(&store, n)),
            "the joiner has every write"
        );
        assert_eq!(store.managers.get(&2), Some(&info));
        assert_eq!(c.status(2).voters, vec![1, 2]);

        // Two voters: a write needs both. Remove the joiner, and the leader is alone again.
        c.node(leader).remove_member(2).await.unwrap();
        c.net.cut(2);
        c.node(leader).propose(write(61)).await.unwrap();
        assert!(!c.node(leader).store().managers.contains_key(&2));
        assert_eq!(c.status(leader).voters, vec![1]);
        c.assert_election_safety();
    }
}

//! A pool of ready network namespaces for tasks on the local bridge.
//!
//! Making a namespace and its veth pair takes the kernel's rtnl lock several times, and a
//! namespace's death (`cleanup_net`: device teardown, RCU grace periods) contends with the
//! making of new ones, so a burst of bridge starts after a burst of stops paid for both. The
//! pool keeps namespaces made ahead of time, off the start path, each with its veth pair
//! already made (the host end an up port of the bridge) and loopback up. Each ready namespace
//! is also *armed*: `eth0` is up with an address leased from the bridge ([`Leases`]) and its
//! default route, so a start takes one (a symlink at the task's namespace path, no mount) and
//! adopts its address, with no netlink request at all: under a burst of starts every request
//! waits on the kernel's rtnl lock, which made the attach of the 50th of 50 starts take
//! 100–300 ms. (Without leases, a take sets `eth0` up with its address and route itself.)
//! A released namespace is
//! scrubbed and kept for the next task when that is safe, else deleted in the background,
//! in batches, while no start is going on.
//!
//! Invariants:
//! - A namespace is reused only if [`on_release`] says so: the task could not reconfigure
//!   its network (no CAP_NET_ADMIN, not privileged, no network sysctls), no process and no
//!   socket is left in it, it never carried a TCP connection (the kernel's per-destination
//!   TCP metrics cannot be flushed without a generic-netlink client, so such a namespace is
//!   deleted), and the pool is below its bound. It is then scrubbed (extra
//!   links deleted, `eth0` down — which drops its routes and neighbours — and its addresses
//!   flushed) and checked ([`is_clean`]): only `lo` and `eth0`, no route of the main table.
//!   Anything else, or any error on the way, deletes it.
//! - The host end of a released namespace is set down before its release returns, so an
//!   address handed to the next task never answers from two places.
//! - The pool holds at most `max_idle` namespaces (ready or being scrubbed); its directory
//!   holds nothing else, and is emptied when the pool is made (an agent restart) and on
//!   [`NetnsPool::shutdown`].
//! - The decisions are pure functions ([`on_release`], [`to_make`], [`reap_now`],
//!   [`scrub_ops`], [`is_clean`]), table-tested; the pool's I/O goes through [`HostNet`].

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::hostnet::{plan, HostNet, LinkSet, NetOp, Ns, Observed, Occupancy, Route};

/// The link a pooled namespace's container sees.
pub const INSIDE: &str = "eth0";

/// How many namespaces to keep ready, and how many to hold at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Made ahead of time whenever fewer are ready (0: the pool makes none).
    pub ready_target: usize,
    /// Bound on the namespaces held (ready or being scrubbed); released ones beyond it are
    /// deleted (0: nothing is reused).
    pub max_idle: usize,
    /// Deletions wait until no namespace was taken for this long...
    pub quiet: Duration,
    /// ...or until this many are waiting.
    pub max_pending: usize,
    /// Ready namespaces beyond `ready_target` are deleted after this long without a take.
    pub trim_after: Duration,
    /// How long a take waits for a namespace on its way (being scrubbed or made) before
    /// its task makes one itself.
    pub wait_on_the_way: Duration,
    /// Scrubs run at most this many at a time.
    pub scrubbers: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            ready_target: 4,
            max_idle: 64,
            quiet: Duration::from_millis(500),
            max_pending: 128,
            trim_after: Duration::from_secs(120),
            wait_on_the_way: Duration::from_millis(100),
            scrubbers: 4,
        }
    }
}

/// An address on the bridge for a ready namespace, with what its default route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The namespace's address on the bridge.
    pub addr: Ipv4Addr,
    /// The bridge subnet's prefix length.
    pub prefix: u8,
    /// The bridge's own address: the namespace's default route.
    pub gw: Ipv4Addr,
}

/// Where the pool gets the addresses of its armed namespaces: the bridge's address table, so
/// an address is either a task's, a ready namespace's, or free.
pub trait Leases: Send + Sync {
    /// A free address, reserved until it is given back or handed to a task with its
    /// namespace. `None` when the bridge has none to spare.
    fn lease(&self) -> Option<Lease>;
    /// Frees an address leased earlier; called only once nothing answers on it any more
    /// (its namespace is deleted, or scrubbed with `eth0` down).
    fn give_back(&self, addr: Ipv4Addr);
}

/// A namespace handed to a task by [`NetnsPool::take`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// The host end of its veth.
    pub veth: String,
    /// The address its `eth0` already has (with its default route), now the task's; `None`
    /// when it came unarmed (`eth0` down, no address).
    pub addr: Option<Ipv4Addr>,
}

// ---------------------------------------------------------------------------------------------
// Pure decisions

/// What is known of a namespace when its task lets it go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReleaseFacts {
    /// The task could change its network itself (privileged, CAP_NET_ADMIN, network
    /// sysctls): what it did is not worth hunting down.
    pub may_reconfigure: bool,
    /// Who still uses the namespace.
    pub occupancy: Occupancy,
    /// The pool is shutting down.
    pub closing: bool,
}

/// Why a released namespace is deleted rather than reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Its task could reconfigure its network.
    MayReconfigure,
    /// A process still lives in it.
    ProcessesLeft,
    /// A socket of it is still open.
    SocketsLeft,
    /// It carried TCP connections (the kernel's TCP metrics remember their peers).
    TcpSeen,
    /// The pool holds `max_idle` already.
    PoolFull,
    /// The pool is shutting down.
    Closing,
    /// The scrub failed, or left something ([`is_clean`]).
    NotClean,
    /// Its occupancy could not be read.
    Unknown,
}

/// What becomes of a released namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Scrubbed, checked and kept for the next task.
    Reuse,
    /// Deleted, for this reason.
    Delete(Why),
}

/// Reuse or delete a released namespace, given what is known of it and `held` namespaces
/// already held by a pool of at most `max_idle`.
pub fn on_release(f: &ReleaseFacts, held: usize, max_idle: usize) -> Verdict {
    if f.closing {
        Verdict::Delete(Why::Closing)
    } else if f.may_reconfigure {
        Verdict::Delete(Why::MayReconfigure)
    } else if f.occupancy.processes {
        Verdict::Delete(Why::ProcessesLeft)
    } else if f.occupancy.sockets {
        Verdict::Delete(Why::SocketsLeft)
    } else if f.occupancy.tcp_seen {
        Verdict::Delete(Why::TcpSeen)
    } else if held >= max_idle {
        Verdict::Delete(Why::PoolFull)
    } else {
        Verdict::Reuse
    }
}

/// How many namespaces to make now: up to `target` ready, counting those being made and
/// scrubbed, and never beyond `max_idle` held.
pub fn to_make(
    ready: usize,
    making: usize,
    scrubbing: usize,
    target: usize,
    max_idle: usize,
) -> usize {
    let have = ready + making + scrubbing;
    target.min(max_idle).saturating_sub(have)
}

/// Whether to delete the `pending` namespaces now: when starts have been quiet for `quiet`
/// (the kernel's teardown then competes with nothing), or when too many wait.
pub fn reap_now(pending: usize, since_take: Duration, quiet: Duration, max_pending: usize) -> bool {
    pending > 0 && (since_take >= quiet || pending >= max_pending)
}

/// The ops that bring a used namespace back to how the pool made it: links other than `lo`
/// and [`INSIDE`] deleted, [`INSIDE`] down (its routes and neighbours go with that) and its
/// addresses flushed.
pub fn scrub_ops(seen: &Observed) -> Vec<NetOp> {
    let mut ops: Vec<NetOp> = seen
        .links
        .keys()
        .filter(|n| n.as_str() != "lo" && n.as_str() != INSIDE)
        .map(|n| NetOp::DelLink { name: n.clone() })
        .collect();
    ops.push(NetOp::SetLink {
        name: INSIDE.into(),
        set: LinkSet {
            up: Some(false),
            ..Default::default()
        },
    });
    ops.push(NetOp::FlushAddrs { dev: INSIDE.into() });
    ops
}

/// Whether a scrubbed namespace is as the pool made it: exactly `lo` (up) and a veth
/// [`INSIDE`] (down), and no route in the main table. `Err` says what is left.
pub fn is_clean(seen: &Observed) -> Result<(), String> {
    let names: Vec<&str> = seen.links.keys().map(String::as_str).collect();
    if names != ["eth0", "lo"] {
        return Err(format!("links {names:?}"));
    }
    let eth0 = &seen.links[INSIDE];
    if eth0.kind.as_deref() != Some("veth") || eth0.up {
        return Err(format!("{INSIDE} {eth0:?}"));
    }
    if !seen.links["lo"].up {
        return Err("lo down".into());
    }
    if let Some(r) = seen.routes.first() {
        return Err(format!("route {} dev {:?}", r.dst, r.dev));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The pool

/// A namespace of the pool: where it is kept, the name of its veth's host end, and the
/// address leased to it when armed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    path: PathBuf,
    veth: String,
    addr: Option<Ipv4Addr>,
}

/// A namespace to delete: its host end first (if known), and its leased address to give back
/// after.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reap {
    path: PathBuf,
    veth: Option<String>,
    addr: Option<Ipv4Addr>,
}

impl From<Slot> for Reap {
    fn from(s: Slot) -> Reap {
        Reap {
            path: s.path,
            veth: Some(s.veth),
            addr: s.addr,
        }
    }
}

/// A namespace in a task's hands.
struct Lent {
    /// Its veth's host end.
    veth: String,
    /// Where the pool keeps it, when taken from the pool (the task's path links there);
    /// `None` for one its task made (bind-mounted at the task's path).
    slot: Option<PathBuf>,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Slot>,
    making: usize,
    /// Released, waiting for (or in) their scrub, with whether their task could
    /// reconfigure its network.
    scrub: VecDeque<(Slot, bool)>,
    scrubbing: usize,
    /// Namespaces to delete.
    reap: Vec<Reap>,
    /// Namespaces in tasks' hands, by the path their task uses.
    lent: HashMap<PathBuf, Lent>,
    last_take: Option<Instant>,
    seq: u64,
    started: bool,
    closing: bool,
}

impl State {
    fn held(&self) -> usize {
        self.ready.len() + self.scrub.len() + self.scrubbing
    }
}

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Ready to be taken.
    pub ready: usize,
    /// Taken by tasks (or made by them and known to the pool).
    pub lent: usize,
    /// Waiting for deletion.
    pub pending_delete: usize,
    /// Released, waiting for or in their scrub.
    pub scrubbing: usize,
}

/// The pool of one bridge.
pub struct NetnsPool {
    net: Arc<dyn HostNet>,
    /// The namespace the bridge is in (the host's, in the agent).
    host: Ns,
    bridge: String,
    /// Where the pooled namespaces are kept (bind mounts), nothing else.
    dir: PathBuf,
    cfg: PoolConfig,
    /// Host-end names start with it: `rp` and this process's id, so a restarted agent never
    /// picks a name a live task's veth still has.
    prefix: String,
    st: Mutex<State>,
    wake: Notify,
    /// Notified when a namespace becomes ready.
    readied: Notify,
    /// Addresses for armed namespaces; none until [`NetnsPool::set_leases`].
    leases: Mutex<Option<Arc<dyn Leases>>>,
}

impl NetnsPool {
    /// A pool keeping its namespaces in `dir`; whatever an earlier agent left there is
    /// deleted (a namespace it held was never handed to a task).
    pub fn new(
        net: Arc<dyn HostNet>,
        host: Ns,
        bridge: &str,
        dir: &Path,
        cfg: PoolConfig,
    ) -> std::io::Result<Arc<NetnsPool>> {
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let mut left = 0;
        for e in std::fs::read_dir(dir)?.flatten() {
            crate::net::remove_netns(&e.path());
            left += 1;
        }
        if left > 0 {
            info!(
                left,
                "netns pool: deleted the namespaces an earlier agent kept"
            );
        }
        Ok(Arc::new(NetnsPool {
            net,
            host,
            bridge: bridge.to_string(),
            dir: dir.to_path_buf(),
            cfg,
            prefix: format!("rp{:x}x", std::process::id()),
            st: Mutex::new(State::default()),
            wake: Notify::new(),
            readied: Notify::new(),
            leases: Mutex::new(None),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms the namespaces made or scrubbed from now on with addresses from `leases`.
    pub fn set_leases(&self, leases: Arc<dyn Leases>) {
        *self.leases.lock().unwrap_or_else(|e| e.into_inner()) = Some(leases);
    }

    fn leases(&self) -> Option<Arc<dyn Leases>> {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Hands a released namespace to the scrubber.
    fn queue_scrub(&self, slot: Slot, may_reconfigure: bool) {
        self.state().scrub.push_back((slot, may_reconfigure));
        self.wake.notify_one();
    }

    /// What the pool holds now.
    pub fn stats(&self) -> PoolStats {
        let s = self.state();
        PoolStats {
            ready: s.ready.len(),
            lent: s.lent.len(),
            pending_delete: s.reap.len(),
            scrubbing: s.scrub.len() + s.scrubbing,
        }
    }

    /// Starts the background work (making, scrubbing, deleting), once; called when the
    /// bridge exists.
    pub fn start(self: &Arc<Self>) {
        {
            let mut s = self.state();
            if s.started || s.closing {
                return;
            }
            s.started = true;
        }
        tokio::spawn(self.clone().run());
    }

    /// A ready namespace, moved to `to` (where its task finds it): its veth's host end and,
    /// when armed, its address, which is the task's from now on. `None` when none is ready
    /// (the caller makes one itself).
    pub async fn take(&self, to: &Path) -> Option<Taken> {
        let deadline = Instant::now() + self.cfg.wait_on_the_way;
        let slot = loop {
            // Registered before looking, so a namespace readied in between is not missed.
            let readied = self.readied.notified();
            let (slot, on_the_way) = {
                let mut s = self.state();
                s.last_take = Some(Instant::now());
                let on_the_way = s.making + s.scrub.len() + s.scrubbing > 0;
                (s.ready.pop_front(), on_the_way && !s.closing)
            };
            self.wake.notify_one();
            match slot {
                Some(slot) => break slot,
                // Scrubbing one takes milliseconds; making one on the start path costs more.
                None if on_the_way => {
                    if tokio::time::timeout_at(deadline, readied).await.is_err() {
                        return None;
                    }
                }
                None => return None,
            }
        };
        // A symlink: no mount on the start path (runc opens the namespace through it).
        match std::os::unix::fs::symlink(&slot.path, to) {
            Ok(()) => {
                self.state().lent.insert(
                    to.to_path_buf(),
                    Lent {
                        veth: slot.veth.clone(),
                        slot: Some(slot.path),
                    },
                );
                Some(Taken {
                    veth: slot.veth,
                    addr: slot.addr,
                })
            }
            Err(e) => {
                warn!(%e, "netns pool: cannot hand a namespace over; deleting it");
                self.state().reap.push(slot.into());
                None
            }
        }
    }

    /// Records that the namespace at `path` (made by its task, not taken from the pool) has
    /// its veth's host end named `veth`, so its release can bring it back to the pool.
    pub fn adopt(&self, path: &Path, veth: &str) {
        self.state().lent.insert(
            path.to_path_buf(),
            Lent {
                veth: veth.to_string(),
                slot: None,
            },
        );
    }

    /// The host end of the veth of the namespace a task uses at `path`, if the pool knows it.
    pub fn host_end(&self, path: &Path) -> Option<String> {
        self.state().lent.get(path).map(|l| l.veth.clone())
    }

    /// Lets the namespace at `path` go (its task is gone); `may_reconfigure` says whether
    /// the task could change its network. The path is gone when this returns; the namespace
    /// is scrubbed and kept, or deleted, in the background. The caller has set its host end
    /// down already.
    pub async fn release(&self, path: &Path, may_reconfigure: bool) {
        let lent = self.state().lent.remove(path);
        let Some(Lent { veth, slot }) = lent.filter(|_| path.exists()) else {
            // Unknown to this process (made before a restart): deleted, its veth pair with it.
            crate::net::remove_netns(path);
            return;
        };
        if let Some(slot_path) = slot {
            // Taken from the pool: the task's path is a symlink to where the pool keeps it.
            if let Err(e) = std::fs::remove_file(path) {
                debug!(%e, "netns pool: removing a task's link");
            }
            // Its address went with the task (the bridge table frees it).
            self.queue_scrub(
                Slot {
                    path: slot_path,
                    veth,
                    addr: None,
                },
                may_reconfigure,
            );
            return;
        }
        let slot_path = {
            let mut s = self.state();
            s.seq += 1;
            self.dir.join(format!("r{}", s.seq))
        };
        match self.net.move_netns(path, &slot_path).await {
            Ok(()) => {
                self.queue_scrub(
                    Slot {
                        path: slot_path,
                        veth,
                        addr: None,
                    },
                    may_reconfigure,
                );
            }
            Err(e) => {
                debug!(%e, "netns pool: cannot keep a released namespace; deleting it");
                crate::net::remove_netns(path);
            }
        }
    }

    /// Deletes every namespace the pool holds (ready, being scrubbed or waiting for
    /// deletion) and stops making new ones. Taken ones stay with their tasks.
    pub async fn shutdown(&self) {
        let (ready, scrub, reap) = {
            let mut s = self.state();
            s.closing = true;
            (
                std::mem::take(&mut s.ready),
                std::mem::take(&mut s.scrub),
                std::mem::take(&mut s.reap),
            )
        };
        self.wake.notify_one();
        let all = ready
            .into_iter()
            .map(Reap::from)
            .chain(scrub.into_iter().map(|(s, _)| Reap::from(s)))
            .chain(reap);
        self.delete(all.collect()).await;
        // A scrub or make in flight finds `closing` and deletes its own.
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            crate::net::remove_netns(&e.path());
        }
    }

    /// Deletes namespaces: their host ends first (so they leave the bridge now, even if
    /// something still holds the namespace), in one batch, then their bind mounts (the
    /// kernel tears the namespaces down together); then gives their addresses back.
    async fn delete(&self, all: Vec<Reap>) {
        if all.is_empty() {
            return;
        }
        let ops: Vec<NetOp> = all
            .iter()
            .filter_map(|r| r.veth.clone())
            .map(|name| NetOp::DelLink { name })
            .collect();
        let unplugged = self.net.apply(&self.host, &ops).await;
        if let Err(e) = &unplugged {
            debug!(%e, "netns pool: deleting host ends");
        }
        for r in &all {
            crate::net::remove_netns(&r.path);
        }
        // An address is free once nothing answers on it: its host end is gone, or (if that
        // failed) its namespace's last reference is.
        if let Some(leases) = self.leases() {
            for addr in all.iter().filter_map(|r| r.addr) {
                leases.give_back(addr);
            }
        }
        debug!(n = all.len(), "netns pool: deleted namespaces");
    }

    /// The background loop: scrubs released namespaces, makes ready ones, deletes the
    /// rest when starts are quiet.
    async fn run(self: Arc<Self>) {
        loop {
            if self.state().closing {
                return;
            }
            // Scrubs first (a scrubbed namespace is the cheapest ready one), a few at a time:
            // each mostly waits on the kernel.
            loop {
                let job = {
                    let mut s = self.state();
                    if s.scrubbing >= self.cfg.scrubbers.max(1) {
                        None
                    } else {
                        let j = s.scrub.pop_front();
                        if j.is_some() {
                            s.scrubbing += 1;
                        }
                        j
                    }
                };
                let Some((slot, may_reconfigure)) = job else {
                    break;
                };
                let me = self.clone();
                tokio::spawn(async move {
                    me.scrub(slot, may_reconfigure).await;
                    me.state().scrubbing -= 1;
                    me.wake.notify_one();
                });
            }
            let n = {
                let mut s = self.state();
                let n = to_make(
                    s.ready.len(),
                    s.making,
                    s.scrub.len() + s.scrubbing,
                    self.cfg.ready_target,
                    self.cfg.max_idle,
                );
                s.making += n;
                n
            };
            for _ in 0..n {
                let made = self.make().await;
                let mut s = self.state();
                s.making -= 1;
                match made {
                    Some(slot) if !s.closing => {
                        s.ready.push_back(slot);
                        self.readied.notify_waiters();
                    }
                    Some(slot) => s.reap.push(slot.into()),
                    None => {}
                }
            }
            let (reap, wait) = {
                let mut s = self.state();
                let since = s.last_take.map_or(Duration::MAX, |t| t.elapsed());
                // Idle for long: back down to the target.
                if since >= self.cfg.trim_after {
                    while s.ready.len() > self.cfg.ready_target {
                        if let Some(slot) = s.ready.pop_back() {
                            s.reap.push(slot.into());
                        }
                    }
                }
                if reap_now(s.reap.len(), since, self.cfg.quiet, self.cfg.max_pending) {
                    (std::mem::take(&mut s.reap), None)
                } else if !s.reap.is_empty() {
                    (Vec::new(), Some(self.cfg.quiet.saturating_sub(since)))
                } else if s.ready.len() > self.cfg.ready_target {
                    (Vec::new(), Some(self.cfg.trim_after.saturating_sub(since)))
                } else {
                    (Vec::new(), None)
                }
            };
            self.delete(reap).await;
            match wait {
                Some(d) => {
                    let _ = tokio::time::timeout(
                        d.max(Duration::from_millis(10)),
                        self.wake.notified(),
                    )
                    .await;
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// A new namespace with its veth pair: `eth0` inside, the host end a port of the bridge
    /// (down until a task takes it), loopback up.
    async fn make(&self) -> Option<Slot> {
        let (path, veth) = {
            let mut s = self.state();
            s.seq += 1;
            (
                self.dir.join(format!("n{}", s.seq)),
                format!("{}{:x}", self.prefix, s.seq),
            )
        };
        let host_ops = [
            NetOp::AddVeth {
                name: veth.clone(),
                mtu: None,
                peer: INSIDE.into(),
                peer_ns: Some(path.clone()),
            },
            // Up already: with `eth0` down inside there is no carrier, so nothing flows
            // until a task's attach sets `eth0` up.
            NetOp::SetLink {
                name: veth.clone(),
                set: LinkSet {
                    master: Some(self.bridge.clone()),
                    up: Some(true),
                    ..Default::default()
                },
            },
        ];
        let lease = self.leases().and_then(|l| l.lease());
        let mut inside = vec![NetOp::SetLink {
            name: "lo".into(),
            set: LinkSet {
                up: Some(true),
                ..Default::default()
            },
        }];
        inside.extend(lease.map(arm_ops).unwrap_or_default());
        let t0 = std::time::Instant::now();
        let r = async {
            self.net.create_netns(&path).await?;
            self.net.apply(&self.host, &host_ops).await?;
            self.net.apply(&Ns::Path(path.clone()), &inside).await
        }
        .await;
        let slot = Slot {
            path,
            veth,
            addr: lease.map(|l| l.addr),
        };
        match r {
            Ok(()) => {
                debug!(
                    us = t0.elapsed().as_micros() as u64,
                    armed = slot.addr.is_some(),
                    "netns pool: made a namespace"
                );
                Some(slot)
            }
            Err(e) => {
                warn!(%e, "netns pool: cannot make a namespace");
                self.state().reap.push(slot.into());
                None
            }
        }
    }

    /// Decides on a released namespace and, if it is to be reused, scrubs and checks it.
    async fn scrub(&self, mut slot: Slot, may_reconfigure: bool) {
        let t0 = std::time::Instant::now();
        let occupancy = self.net.occupancy(&slot.path).await;
        let verdict = match &occupancy {
            Ok(o) => {
                let s = self.state();
                on_release(
                    &ReleaseFacts {
                        may_reconfigure,
                        occupancy: *o,
                        closing: s.closing,
                    },
                    s.held() - 1 + s.making,
                    self.cfg.max_idle,
                )
            }
            Err(e) => {
                debug!(%e, "netns pool: occupancy");
                Verdict::Delete(Why::Unknown)
            }
        };
        let verdict = match verdict {
            Verdict::Reuse => match self.scrub_and_check(&mut slot).await {
                Ok(()) => Verdict::Reuse,
                Err(left) => {
                    warn!(%left, "netns pool: a released namespace is not clean after its scrub; deleting it");
                    Verdict::Delete(Why::NotClean)
                }
            },
            v => v,
        };
        debug!(
            ?verdict,
            us = t0.elapsed().as_micros() as u64,
            "netns pool: released namespace"
        );
        let mut s = self.state();
        match verdict {
            Verdict::Reuse if !s.closing => {
                s.ready.push_back(slot);
                self.readied.notify_waiters();
            }
            _ => s.reap.push(slot.into()),
        }
    }

    /// Scrubs, checks, sets the host end up again (as a made one is) and arms it.
    async fn scrub_and_check(&self, slot: &mut Slot) -> Result<(), String> {
        let ns = Ns::Path(slot.path.clone());
        let seen = self.net.observe(&ns).await.map_err(|e| e.to_string())?;
        self.net
            .apply(&ns, &scrub_ops(&seen))
            .await
            .map_err(|e| e.to_string())?;
        let seen = self.net.observe(&ns).await.map_err(|e| e.to_string())?;
        is_clean(&seen)?;
        let up = NetOp::SetLink {
            name: slot.veth.clone(),
            set: LinkSet {
                up: Some(true),
                ..Default::default()
            },
        };
        self.net
            .apply(&self.host, &[up])
            .await
            .map_err(|e| e.to_string())?;
        if let Some(lease) = self.leases().and_then(|l| l.lease()) {
            // Recorded first: on a failure the reap gives it back.
            slot.addr = Some(lease.addr);
            self.net
                .apply(&ns, &arm_ops(lease))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The ops that arm a namespace with `lease`: [`INSIDE`] up with the address and the default
/// route a task on the bridge gets.
pub fn arm_ops(lease: Lease) -> Vec<NetOp> {
    let route = Route::via(ipnet::Ipv4Net::default(), Some(lease.gw), INSIDE);
    plan::pooled_inside(INSIDE, lease.addr, lease.prefix, &[route])
}

#[cfg(test)]
mod tests;

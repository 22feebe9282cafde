//! Raft benchmarks (issue 3): `cargo bench -p rudder-controller --bench raft`.
//!
//! Real raft members in one process, assembled as `lib::run` assembles a controller: each has its
//! own redb log in a temp dir, its own tokio runtime and its own tonic server for `RaftPeer` on
//! 127.0.0.1; they talk real gRPC through `GrpcTransport` and `GrpcForwarder`. A member's runtime
//! is its "process": stopping a member shuts that runtime down, so its Ready loop, peer streams,
//! server socket and redb file all go, as when a controller is killed.
//!
//! 1. Committed writes/s with batching: many concurrent proposers on the leader, a small command
//!    each, p50/p99 per write (a store of constant size, then one that grows with every write).
//! 2. Leader failover: kill the leader, time until a write commits through a new leader (the
//!    writer goes through a surviving member, as a client would); the killed member restarts from
//!    its own data dir between rounds.
//! 3. Snapshot install: grow the store to ~100 MB of JSON, add a fourth member with an empty log,
//!    time until it has applied the leader's index. The leader's latest snapshot predates the new
//!    member, so it takes a fresh one of the whole store and streams it in 1 MiB chunks; the
//!    controller's own log lines give the steps' times.
//! 4. The Ready loop's parts alone (fsync per persist, store clone per Ready, command and message
//!    encoding), to say where the time goes.
//! 5. Encryption at rest (issue 14): committed writes/s of a group whose logs are sealed with
//!    data keys (as `lib::run` runs) against one with plaintext logs, in the same run,
//!    alternating the two (and which goes first) so that drift of the machine hits both; the
//!    ratio is the cost.
//!
//! The members talk mutual TLS with manager certificates from one cluster CA, as `lib::run` sets
//! them up (`RAFT_BENCH_TLS=0`: plain HTTP/2, to see what TLS costs).
//!
//! Every member and the load generator share this machine's cores; on separate hosts each member
//! has the cores to itself, so the figures are a lower bound.
//!
//! Environment: `RAFT_BENCH_PROPOSERS` (default 1024), `RAFT_BENCH_SECS` (measured seconds per
//! throughput run, default 5), `RAFT_BENCH_SNAPSHOT_MB` (default 100), `RAFT_BENCH_ONLY`
//! (`throughput`, `failover`, `snapshot`, `parts` or `at-rest`), `RAFT_BENCH_TLS` (`0`: plain),
//! `RAFT_BENCH_ENCRYPT` (`0`: parts 1–3 with plaintext logs), `RAFT_BENCH_ROUNDS` (at-rest
//! rounds of off/on, default 3),
//! `RAFT_BENCH_SERIES` (print writes per 250 ms), `RAFT_BENCH_DIR` (where the logs go, default
//! /var/tmp), `RUST_LOG` (logs to stderr).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use protobuf::Message as _;
use rudder_controller::crypt::DataKeys;
use rudder_controller::peer::{self, GrpcForwarder, GrpcTransport, PeerApi};
use rudder_controller::raft_node::{self, RaftHandle};
use rudder_controller::storage::RedbStorage;
use rudder_model::store::{ImageRecord, ManagerInfo};
use rudder_model::{Command, Envelope, NodeResources, NodeRole, Store};
use rudder_pki::ca::{ClusterCa, Role};
use rudder_pki::tls::{self, NodeCerts};
use rudder_proto::v1::raft_peer_server::RaftPeerServer;
use tokio::runtime::Runtime;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{ClientTlsConfig, ServerTlsConfig};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// As `lib::run` serves `RaftPeer`: a snapshot chunk or a batch of appends may be large.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Worker threads per member, as a controller on a 2-core host would have.
const MEMBER_THREADS: usize = 2;
const WARMUP: Duration = Duration::from_secs(1);
const FAILOVER_ROUNDS: usize = 5;
/// Images per `Command::Batch` entry while growing the store.
const IMAGES_PER_BATCH: u64 = 500;
const DIGEST: &str = "sha256:5b0bcabd1ed22e9fb1310cf6c2dec7cdef19f0ad69efa1f392e94a4333501270";
const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

// ---------------------------------------------------------------------------------------------
// Members

/// One raft member: what `lib::run` starts for consensus, without the API, registry and loops.
struct Member {
    id: u64,
    dir: PathBuf,
    addr: SocketAddr,
    setup: Setup,
    raft: RaftHandle,
    transport: Arc<GrpcTransport>,
    /// `None` once stopped.
    rt: Option<Runtime>,
}

/// What every member of one group shares.
#[derive(Clone)]
struct Setup {
    snapshot_every: u64,
    /// The cluster CA when the members talk mutual TLS (as `lib::run` always does); `None`:
    /// plain HTTP/2.
    ca: Option<Arc<ClusterCa>>,
    /// Logs sealed with a data key per member (kept in its dir), as `lib::run` opens them.
    encrypt: bool,
}

/// A member's TLS, as a controller gets it: its own key, a manager certificate from the CA.
fn member_tls(ca: &ClusterCa, id: u64) -> anyhow::Result<(ServerTlsConfig, ClientTlsConfig)> {
    let name = format!("controller-{id}");
    let (key, csr) = rudder_pki::ca::node_csr(&name)?;
    let cert = ca.issue(
        &csr,
        Role::Manager,
        &name,
        SystemTime::now(),
        Duration::from_secs(24 * 3600),
    )?;
    let certs = NodeCerts::with_ca(ca, &cert, &key)?;
    Ok((
        tls::server_tls(&certs),
        tls::client_tls(&certs, Role::Manager),
    ))
}

impl Member {
    /// Starts member `id` on `dir` (its log is `dir/raft.redb`), serving `RaftPeer` on `addr`
    /// (port 0: any). A new log bootstraps a group with this member as the only voter when
    /// `bootstrap`, else stays empty until the leader sends a snapshot; an existing log keeps its
    /// own state either way.
    fn start(
        id: u64,
        dir: &Path,
        addr: SocketAddr,
        bootstrap: bool,
        setup: &Setup,
    ) -> anyhow::Result<Member> {
        std::fs::create_dir_all(dir)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(MEMBER_THREADS)
            .thread_name(format!("member-{id}"))
            .enable_all()
            .build()?;
        let path = dir.join("raft.redb");
        let voters: Vec<u64> = if bootstrap { vec![id] } else { vec![] };
        let (server_tls, client_tls) = match &setup.ca {
            Some(ca) => {
                let (s, c) = member_tls(ca, id)?;
                (Some(s), Some(c))
            }
            None => (None, None),
        };
        let (raft, transport, addr) = rt.block_on(async {
            let listener = retry(|| async { tokio::net::TcpListener::bind(addr).await }).await?;
            let addr = listener.local_addr()?;
            // A restarted member's previous runtime may still be closing the file.
            let storage = if setup.encrypt {
                let keys = Arc::new(DataKeys::load_or_create(dir)?);
                retry(|| async { RedbStorage::open_encrypted(&path, &voters, keys.clone()) })
                    .await?
            } else {
                retry(|| async { RedbStorage::open(&path, &voters) }).await?
            };
            let transport = GrpcTransport::with_tls(client_tls.clone());
            let raft = raft_node::start_with(id, storage, transport.clone(), setup.snapshot_every)?;
            transport.attach(raft.clone());
            raft.set_forwarder(GrpcForwarder::new(raft.clone(), client_tls));
            let server = serve(listener, raft.clone(), server_tls);
            tokio::spawn(async move {
                if let Err(e) = server.await {
                    eprintln!("bench: member {id}: raft peer server: {e:#}");
                }
            });
            anyhow::Ok((raft, transport, addr))
        })?;
        Ok(Member {
            id,
            dir: dir.to_path_buf(),
            addr,
            setup: setup.clone(),
            raft,
            transport,
            rt: Some(rt),
        })
    }

    fn info(&self) -> ManagerInfo {
        ManagerInfo {
            addr: self.addr.to_string(),
            // No registry runs here; nothing dials it.
            registry: "127.0.0.1:9".into(),
        }
    }

    fn alive(&self) -> bool {
        self.rt.is_some()
    }

    /// Joins the group through `via`, as `lib::run` does for a new controller.
    fn join(&self, via: SocketAddr) -> anyhow::Result<()> {
        let rt = self.rt.as_ref().context("member stopped")?;
        let (info, transport) = (self.info(), self.transport.clone());
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(30),
                peer::join(&via.to_string(), self.id, &info, &transport),
            )
            .await
        })
        .with_context(|| format!("member {} joining via {via}", self.id))
    }

    /// Kills the member: every task of its runtime is dropped (Ready loop, peer streams, server),
    /// closing its sockets and its log.
    fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }

    /// Starts the stopped member again from its own data dir, on the same address.
    fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        *self = Member::start(self.id, &self.dir, self.addr, false, &self.setup.clone())?;
        Ok(())
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The member's `RaftPeer` server, as `lib::run` serves it: mutual TLS with the member's
/// manager certificate when `tls` is given. (`lib::run` also puts the role guard
/// `security::guard(.., &[Manager], "RaftPeer")` in front; it checks each call once, and a peer
/// stream is one long call, so it is left out here.)
async fn serve(
    listener: tokio::net::TcpListener,
    raft: RaftHandle,
    tls: Option<ServerTlsConfig>,
) -> anyhow::Result<()> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let service = RaftPeerServer::new(PeerApi {
        raft,
        require_identity: false,
    })
    .max_decoding_message_size(MAX_MESSAGE);
    server
        .add_service(service)
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// Retries `f` for up to 5 s (a port or a log file still held by a stopped member).
async fn retry<T, E, F, Fut>(mut f: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The live leader (highest term wins while an old one has not noticed yet).
fn leader(members: &[Member]) -> Option<usize> {
    members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.alive())
        .map(|(i, m)| (i, m.raft.status()))
        .filter(|(_, s)| s.is_leader)
        .max_by_key(|(_, s)| s.term)
        .map(|(i, _)| i)
}

/// Polls `cond` every millisecond for up to `limit`.
async fn wait_until(
    limit: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(t.elapsed())
}

/// Waits until every live member has applied what the leader has.
async fn converged(members: &[Member], limit: Duration) -> anyhow::Result<()> {
    let target = members
        .iter()
        .filter(|m| m.alive())
        .map(|m| m.raft.status().applied)
        .max()
        .unwrap_or(0);
    let rafts: Vec<RaftHandle> = members
        .iter()
        .filter(|m| m.alive())
        .map(|m| m.raft.clone())
        .collect();
    wait_until(limit, "members to converge", || {
        rafts
            .iter()
            .all(|r| r.store().applied >= target && r.status().leader_id != 0)
    })
    .await?;
    Ok(())
}

/// Starts `n` members under `root`: the first bootstraps the group and records its address, the
/// others join one at a time (each caught up before the next, so quorum never waits on one).
fn form(client: &Runtime, root: &Path, n: u64, setup: &Setup) -> anyhow::Result<Vec<Member>> {
    let first = Member::start(1, &root.join("m1"), any_port(), true, setup)?;
    client.block_on(async {
        wait_until(Duration::from_secs(10), "first member to lead", || {
            first.raft.status().is_leader
        })
        .await?;
        first.raft.add_member(1, &first.info()).await?;
        anyhow::Ok(())
    })?;
    let mut members = vec![first];
    for id in 2..=n {
        let m = Member::start(id, &root.join(format!("m{id}")), any_port(), false, setup)?;
        m.join(members[0].addr)?;
        members.push(m);
        client.block_on(converged(&members, Duration::from_secs(30)))?;
    }
    Ok(members)
}

// ---------------------------------------------------------------------------------------------
// Commands

const NODE_ID: &str = "bench-node";

fn put_node() -> Command {
    Command::PutNode {
        id: NODE_ID.into(),
        hostname: "bench".into(),
        addr: "127.0.0.1:1".into(),
        labels: BTreeMap::new(),
        role: NodeRole::Worker,
        resources: NodeResources::default(),
        now: 0,
        cert_not_after: 0,
        host_labels: Default::default(),
    }
}

/// A label write on one node: the store keeps its size.
fn label_write(proposer: usize, n: u64) -> Command {
    Command::UpdateNode {
        id: NODE_ID.into(),
        availability: None,
        labels_add: [(format!("p{proposer}"), n.to_string())].into(),
        labels_rm: vec![],
    }
}

/// A new tag per write (what the registry proposes on a push): the store grows.
fn tag_write(proposer: usize, n: u64) -> Command {
    Command::PutImage {
        repo: "bench/app".into(),
        tag: Some(format!("p{proposer}-{n}")),
        record: ImageRecord {
            digest: DIGEST.into(),
            media_type: MEDIA_TYPE.into(),
        },
    }
}

/// Images `b·IMAGES_PER_BATCH ..` as one log entry, ~1 KB of store JSON each.
fn image_batch(b: u64) -> Command {
    let media_type = format!("{MEDIA_TYPE}; {}", "x".repeat(250));
    Command::Batch(
        (b * IMAGES_PER_BATCH..(b + 1) * IMAGES_PER_BATCH)
            .map(|i| Command::PutImage {
                repo: format!("bench/repo-{}", i / 1000),
                tag: Some(format!("{i:0>100}")),
                record: ImageRecord {
                    digest: format!("sha256:{i:064x}"),
                    media_type: media_type.clone(),
                },
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// 1. Throughput

struct Load {
    writes: usize,
    per_sec: f64,
    /// Writes committed in the slowest and the fastest 250 ms of the window, per second.
    slowest: f64,
    fastest: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    errors: u64,
}

/// `proposers` tasks call `propose` back to back for `WARMUP + measure`; writes that complete
/// inside the measured window count.
async fn load(
    raft: &RaftHandle,
    proposers: usize,
    measure: Duration,
    cmd: fn(usize, u64) -> Command,
) -> anyhow::Result<Load> {
    let from = Instant::now() + WARMUP;
    let to = from + measure;
    let tasks: Vec<_> = (0..proposers)
        .map(|p| {
            let raft = raft.clone();
            tokio::spawn(async move {
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                for n in 0.. {
                    let t = Instant::now();
                    if t >= to {
                        break;
                    }
                    let r = raft.propose(cmd(p, n)).await;
                    let done = Instant::now();
                    match r {
                        Ok(()) if done >= from && done <= to => lat.push((
                            (done - t).as_micros() as u32,
                            (done - from).as_millis() as u32 / 250,
                        )),
                        Ok(()) => {}
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    if lat.is_empty() {
        bail!("no write committed ({errors} errors)");
    }
    let mut buckets = vec![0u64; (measure.as_millis() as usize).div_ceil(250)];
    for (_, b) in &lat {
        if let Some(n) = buckets.get_mut(*b as usize) {
            *n += 1;
        }
    }
    if std::env::var_os("RAFT_BENCH_SERIES").is_some() {
        eprintln!("writes per 250 ms: {buckets:?}");
    }
    let mut lat: Vec<u32> = lat.into_iter().map(|(l, _)| l).collect();
    lat.sort_unstable();
    let pct = |p: f64| Duration::from_micros(lat[((lat.len() - 1) as f64 * p) as usize] as u64);
    Ok(Load {
        writes: lat.len(),
        per_sec: lat.len() as f64 / measure.as_secs_f64(),
        slowest: buckets.iter().min().copied().unwrap_or(0) as f64 * 4.0,
        fastest: buckets.iter().max().copied().unwrap_or(0) as f64 * 4.0,
        p50: pct(0.50),
        p99: pct(0.99),
        max: pct(1.0),
        errors,
    })
}

struct Throughput {
    proposers: usize,
    constant: Load,
    growing: Load,
    /// Tags in the store after the growing run, and what one clone of that store costs.
    tags: usize,
    clone_after: Duration,
}

fn throughput(
    client: &Runtime,
    members: &[Member],
    proposers: usize,
    measure: Duration,
) -> anyhow::Result<Throughput> {
    let raft = members[leader(members).context("no leader")?].raft.clone();
    client.block_on(async {
        raft.propose(put_node()).await?;
        let constant = load(&raft, proposers, measure, label_write).await?;
        converged(members, Duration::from_secs(30)).await?;
        let growing = load(&raft, proposers, measure, tag_write).await?;
        converged(members, Duration::from_secs(30)).await?;
        let store = raft.store();
        let tags = store.images.values().map(|r| r.len()).sum();
        let clone_after = time_clone(&store);
        Ok(Throughput {
            proposers,
            constant,
            growing,
            tags,
            clone_after,
        })
    })
}

/// The median of 5 clones of `store`: what the Ready loop pays per Ready to publish it.
fn time_clone(store: &Store) -> Duration {
    let mut v: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let c = store.clone();
            let d = t.elapsed();
            drop(c);
            d
        })
        .collect();
    median(&mut v)
}

// ---------------------------------------------------------------------------------------------
// 2. Failover

struct Round {
    /// Until a survivor reports itself leader.
    elected: Duration,
    /// Until a write proposed through a survivor is committed and applied.
    committed: Duration,
    /// Until the killed member, restarted, has applied everything again.
    rejoined: Duration,
}

fn failover(client: &Runtime, members: &mut [Member]) -> anyhow::Result<Vec<Round>> {
    let mut rounds = Vec::new();
    for round in 0..FAILOVER_ROUNDS {
        client.block_on(converged(members, Duration::from_secs(30)))?;
        let li = leader(members).context("no leader")?;
        let old_term = members[li].raft.status().term;
        let survivors: Vec<RaftHandle> = members
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != li)
            .map(|(_, m)| m.raft.clone())
            .collect();
        let t0 = Instant::now();
        members[li].stop();
        let (elected, committed) = client.block_on(async {
            let watch = survivors.clone();
            let elected = tokio::spawn(async move {
                wait_until(Duration::from_secs(20), "a new leader", || {
                    watch
                        .iter()
                        .any(|r| r.status().is_leader && r.status().term > old_term)
                })
                .await
                .map(|_| t0.elapsed())
            });
            // The writer goes through one survivor (leader or not) and retries every failure,
            // as a client of that controller would.
            let via = &survivors[round % survivors.len()];
            let mut n = 0;
            let committed = loop {
                n += 1;
                match via.propose(label_write(usize::MAX, n)).await {
                    Ok(()) => break t0.elapsed(),
                    Err(_) if t0.elapsed() < Duration::from_secs(20) => {
                        tokio::time::sleep(Duration::from_millis(1)).await
                    }
                    Err(e) => bail!("no write committed after 20 s: {e}"),
                }
            };
            anyhow::Ok((elected.await??, committed))
        })?;
        let t1 = Instant::now();
        members[li].restart()?;
        client.block_on(converged(members, Duration::from_secs(30)))?;
        rounds.push(Round {
            elected,
            committed,
            rejoined: t1.elapsed(),
        });
    }
    Ok(rounds)
}

// ---------------------------------------------------------------------------------------------
// 3. Snapshot install

struct SnapshotRun {
    grow: Duration,
    entries: u64,
    store_json: usize,
    serialize: Duration,
    clone: Duration,
    /// Small writes/s on the big store (the clone per Ready now dominates).
    big_store_load: Load,
    /// Until `JoinRaft` returned (the conf change is committed).
    joined: Duration,
    /// Until the new member applied the leader's index.
    caught_up: Duration,
    snapshot_file: u64,
    timeline: Vec<(Duration, String)>,
}

fn snapshot(
    client: &Runtime,
    root: &Path,
    setup: &Setup,
    target_mb: u64,
    proposers: usize,
) -> anyhow::Result<SnapshotRun> {
    let mut members = form(client, root, 3, setup)?;
    let raft = members[leader(&members).context("no leader")?].raft.clone();
    // ~985 bytes of store JSON per image (digest entry + tag entry).
    let entries = (target_mb * 1_000_000).div_ceil(985 * IMAGES_PER_BATCH);
    let t = Instant::now();
    client.block_on(async {
        let next = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (raft, next) = (raft.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        let b = next.fetch_add(1, Ordering::Relaxed);
                        if b >= entries {
                            return anyhow::Ok(());
                        }
                        raft.propose(image_batch(b)).await?;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        converged(&members, Duration::from_secs(60)).await
    })?;
    let grow = t.elapsed();
    let store = raft.store();
    let t = Instant::now();
    let store_json = serde_json::to_vec(&*store)?.len();
    let serialize = t.elapsed();
    let clone = time_clone(&store);
    drop(store);
    let big_store_load = client.block_on(async {
        raft.propose(put_node()).await?;
        load(&raft, proposers, Duration::from_secs(2), label_write).await
    })?;
    client.block_on(converged(&members, Duration::from_secs(30)))?;

    timeline().reset();
    let t0 = Instant::now();
    let fourth = Member::start(4, &root.join("m4"), any_port(), false, setup)?;
    fourth.join(members[0].addr)?;
    let joined = t0.elapsed();
    let target = raft.status().applied;
    let new = fourth.raft.clone();
    client.block_on(wait_until(
        Duration::from_secs(90),
        "the fourth member to catch up",
        || new.store().applied >= target,
    ))?;
    let caught_up = t0.elapsed();
    let snapshot_file = std::fs::metadata(fourth.dir.join("raft.snap"))
        .map(|m| m.len())
        .unwrap_or(0);
    let timeline = timeline().take(t0);
    members.push(fourth);
    drop(members);
    Ok(SnapshotRun {
        grow,
        entries,
        store_json,
        serialize,
        clone,
        big_store_load,
        joined,
        caught_up,
        snapshot_file,
        timeline,
    })
}

// ---------------------------------------------------------------------------------------------
// 4. The Ready loop's parts alone

struct Parts {
    /// `File::sync_data` after a 4 KiB write, on the same filesystem.
    fsync: Duration,
    /// `RedbStorage::persist` of N entries (+ hard state), per call.
    persist: Vec<(usize, Duration)>,
    /// Encode on the proposer + decode and apply on each member, per command.
    envelope: Duration,
    decode_apply: Duration,
    /// Raft message encode + decode per entry (protobuf, as the transport does).
    message_per_entry: Duration,
    /// One store clone at N tags.
    clone: Vec<(usize, Duration)>,
}

fn parts(dir: &Path) -> anyhow::Result<Parts> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(dir.join("fsync"))?;
    let mut v: Vec<Duration> = (0..50)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&[7u8; 4096]).expect("write");
            f.sync_data().expect("fsync");
            t.elapsed()
        })
        .collect();
    let fsync = median(&mut v);

    let data = Envelope::new(tag_write(0, 0)).encode();
    let storage = RedbStorage::open(&dir.join("raft.redb"), &[1])?;
    let mut index = 1;
    let mut persist = Vec::new();
    for (batch, calls) in [(1usize, 100), (64, 100), (512, 40), (2048, 10)] {
        let mut v = Vec::new();
        for _ in 0..calls {
            let entries: Vec<raft::prelude::Entry> = (0..batch)
                .map(|_| {
                    index += 1;
                    raft::prelude::Entry {
                        index,
                        term: 1,
                        data: data.clone().into(),
                        context: vec![0; 16].into(),
                        ..Default::default()
                    }
                })
                .collect();
            let hs = raft::prelude::HardState {
                term: 1,
                commit: index,
                ..Default::default()
            };
            let t = Instant::now();
            storage.persist(&entries, Some(&hs), None)?;
            v.push(t.elapsed());
        }
        persist.push((batch, median(&mut v)));
    }

    let n = 20_000u64;
    let t = Instant::now();
    let encoded: Vec<Vec<u8>> = (0..n)
        .map(|i| Envelope::new(tag_write(1, i)).encode())
        .collect();
    let envelope = t.elapsed() / n as u32;
    let mut store = Store::default();
    let t = Instant::now();
    for (i, e) in encoded.iter().enumerate() {
        let env = Envelope::decode(e)?;
        store.apply(i as u64 + 2, env.cmd)?;
    }
    let decode_apply = t.elapsed() / n as u32;

    let entries: Vec<raft::prelude::Entry> = encoded
        .iter()
        .take(4096)
        .enumerate()
        .map(|(i, d)| raft::prelude::Entry {
            index: i as u64,
            term: 1,
            data: d.clone().into(),
            context: vec![0; 16].into(),
            ..Default::default()
        })
        .collect();
    let msg = raft::prelude::Message {
        msg_type: raft::prelude::MessageType::MsgAppend,
        entries: entries.into(),
        ..Default::default()
    };
    let t = Instant::now();
    for _ in 0..10 {
        let bytes = msg.write_to_bytes()?;
        let back = raft::prelude::Message::parse_from_bytes(&bytes)?;
        assert_eq!(back.entries.len(), 4096);
    }
    let message_per_entry = t.elapsed() / (10 * 4096);

    let mut clone = Vec::new();
    let mut store = Store::default();
    let mut i = 0u64;
    for tags in [10_000usize, 100_000, 500_000] {
        while (i as usize) < tags {
            store.apply(i + 2, tag_write(2, i))?;
            i += 1;
        }
        clone.push((tags, time_clone(&store)));
    }
    Ok(Parts {
        fsync,
        persist,
        envelope,
        decode_apply,
        message_per_entry,
        clone,
    })
}

// ---------------------------------------------------------------------------------------------
// Logged milestones

/// The controller's own log lines that mark a snapshot's and an election's progress, with the
/// member (runtime thread) that logged them.
#[derive(Default)]
struct Timeline {
    events: Mutex<Vec<(Instant, String)>>,
}

const MILESTONES: &[&str] = &[
    "snapshot saved, log compacted",
    "snapshot sent",
    "snapshot received",
    "installed snapshot from the leader",
    "sending snapshot failed",
    "membership changed",
];

impl Timeline {
    fn reset(&self) {
        self.events.lock().expect("timeline lock").clear();
    }

    fn take(&self, t0: Instant) -> Vec<(Duration, String)> {
        std::mem::take(&mut *self.events.lock().expect("timeline lock"))
            .into_iter()
            .map(|(t, s)| (t.saturating_duration_since(t0), s))
            .collect()
    }
}

fn timeline() -> &'static Timeline {
    static T: std::sync::OnceLock<Timeline> = std::sync::OnceLock::new();
    T.get_or_init(Timeline::default)
}

struct TimelineLayer;

struct Fields(String, bool);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let m = format!("{value:?}");
            self.1 = MILESTONES.contains(&m.as_str());
            self.0.insert_str(0, &m);
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for TimelineLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if !event.metadata().target().starts_with("rudder_controller") {
            return;
        }
        let mut f = Fields(String::new(), false);
        event.record(&mut f);
        if f.1 {
            let who = std::thread::current().name().unwrap_or("?").to_string();
            timeline()
                .events
                .lock()
                .expect("timeline lock")
                .push((Instant::now(), format!("[{who}] {}", f.0)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn load_line(name: &str, l: &Load) -> String {
    format!(
        "  {name:<34} {:>7.0} writes/s (250 ms windows {:.0}–{:.0})  p50 {:>8}  p99 {:>8}  max {:>8}  ({} writes, {} errors)\n",
        l.per_sec,
        l.slowest,
        l.fastest,
        ms(l.p50),
        ms(l.p99),
        ms(l.max),
        l.writes,
        l.errors
    )
}

/// Part 5: `rounds` × (plaintext group, then encrypted group), the same load on each leader.
fn at_rest(
    client: &Runtime,
    root: &Path,
    setup: &Setup,
    proposers: usize,
    measure: Duration,
    rounds: usize,
) -> anyhow::Result<(Vec<Load>, Vec<Load>)> {
    let plain = form(
        client,
        &root.join("plain"),
        3,
        &Setup {
            encrypt: false,
            ..setup.clone()
        },
    )?;
    let sealed = form(
        client,
        &root.join("sealed"),
        3,
        &Setup {
            encrypt: true,
            ..setup.clone()
        },
    )?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Which group goes first alternates, so that neither always runs second (after the
        // other's compaction and snapshot, say).
        let order = if round % 2 == 0 {
            [(&plain, false), (&sealed, true)]
        } else {
            [(&sealed, true), (&plain, false)]
        };
        for (members, encrypted) in order {
            let raft = members[leader(members).context("no leader")?].raft.clone();
            let l = client.block_on(async {
                raft.propose(put_node()).await?;
                let l = load(&raft, proposers, measure, label_write).await?;
                converged(members, Duration::from_secs(30)).await?;
                anyhow::Ok(l)
            })?;
            if encrypted {
                on.push(l);
            } else {
                off.push(l);
            }
        }
    }
    Ok((off, on))
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    tracing_subscriber::registry()
        .with(TimelineLayer.with_filter(tracing_subscriber::filter::LevelFilter::INFO))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_thread_names(true)
                .with_filter(filter),
        )
        .init();
    let proposers = env_or("RAFT_BENCH_PROPOSERS", 1024usize);
    let measure = Duration::from_secs(env_or("RAFT_BENCH_SECS", 5u64));
    let target_mb = env_or("RAFT_BENCH_SNAPSHOT_MB", 100u64);
    let only = std::env::var("RAFT_BENCH_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only == part;
    // The load generator: its own runtime, like a client process.
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("client")
        .enable_all()
        .build()?;
    let root = tempfile::Builder::new()
        .prefix("rudder-raft-bench-")
        .tempdir_in(std::env::var("RAFT_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))?;
    let tls = std::env::var("RAFT_BENCH_TLS").map_or(true, |v| v != "0");
    let setup = Setup {
        snapshot_every: raft_node::SNAPSHOT_EVERY,
        ca: if tls {
            Some(Arc::new(ClusterCa::generate("bench", SystemTime::now())?))
        } else {
            None
        },
        encrypt: std::env::var("RAFT_BENCH_ENCRYPT").map_or(true, |v| v != "0"),
    };
    let started = Instant::now();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "\n== raft bench: 3 members in one process ({} cores), redb logs in {}, gRPC over 127.0.0.1 ({}) ==",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        root.path().display(),
        if tls { "mutual TLS" } else { "plain HTTP/2" }
    );

    if run("throughput") || run("failover") {
        let mut members = form(&client, &root.path().join("a"), 3, &setup)?;
        if run("throughput") {
            eprintln!("throughput: {proposers} proposers, {measure:?} each after {WARMUP:?}");
            let t = throughput(&client, &members, proposers, measure)?;
            let _ = writeln!(
                report,
                "1. committed writes, {} concurrent proposers on the leader, {measure:?} after {WARMUP:?} warm-up (target 50000/s)",
                t.proposers
            );
            report += &load_line("UpdateNode label (store constant)", &t.constant);
            report += &load_line("PutImage new tag (store grows)", &t.growing);
            let _ = writeln!(
                report,
                "  store after the growing run: {} tags; one clone of it (done per Ready on every member): {}",
                t.tags,
                ms(t.clone_after)
            );
        }
        if run("failover") {
            eprintln!("failover: {FAILOVER_ROUNDS} rounds");
            let mut rounds = failover(&client, &mut members)?;
            let _ = writeln!(
                report,
                "2. leader failover (kill the leader's runtime; write through a survivor; restart it from its dir)"
            );
            for (i, r) in rounds.iter().enumerate() {
                let _ = writeln!(
                    report,
                    "  round {}: new leader after {:>9}, write committed after {:>9}; restarted member caught up in {}",
                    i + 1,
                    ms(r.elected),
                    ms(r.committed),
                    ms(r.rejoined)
                );
            }
            let mut e: Vec<Duration> = rounds.iter().map(|r| r.elected).collect();
            let mut c: Vec<Duration> = rounds.iter_mut().map(|r| r.committed).collect();
            let _ = writeln!(
                report,
                "  median: new leader {}, first write committed {} (election timeout {}–{} ms)",
                ms(median(&mut e)),
                ms(median(&mut c)),
                raft_node::ELECTION_TICKS as u128 * raft_node::TICK.as_millis(),
                2 * raft_node::ELECTION_TICKS as u128 * raft_node::TICK.as_millis(),
            );
        }
    }

    if run("snapshot") {
        eprintln!("snapshot: growing the store to ~{target_mb} MB");
        let s = snapshot(
            &client,
            &root.path().join("b"),
            &setup,
            target_mb,
            proposers,
        )?;
        let mb = |b: usize| b as f64 / 1e6;
        let _ = writeln!(
            report,
            "3. snapshot install (a 4th member with an empty log joins 3; the leader snapshots its store for it)"
        );
        let _ = writeln!(
            report,
            "  store: {:.1} MB JSON after {} entries of {IMAGES_PER_BATCH} images, grown in {}; serialize {}, clone {}",
            mb(s.store_json),
            s.entries,
            ms(s.grow),
            ms(s.serialize),
            ms(s.clone)
        );
        report += &load_line("UpdateNode label on the big store", &s.big_store_load);
        let _ = writeln!(
            report,
            "  4th member: joined (conf change committed) after {}, applied the leader's index after {}: {:.1} MB snapshot file, {:.1} MB/s end to end",
            ms(s.joined),
            ms(s.caught_up),
            s.snapshot_file as f64 / 1e6,
            s.snapshot_file as f64 / 1e6 / s.caught_up.as_secs_f64()
        );
        for (t, line) in &s.timeline {
            let _ = writeln!(report, "    +{:>9}  {line}", ms(*t));
        }
    }

    if run("parts") {
        eprintln!("parts");
        let dir = root.path().join("parts");
        std::fs::create_dir_all(&dir)?;
        let p = parts(&dir)?;
        let _ = writeln!(report, "4. the Ready loop's parts alone");
        let _ = writeln!(report, "  fsync (4 KiB write + sync_data): {}", ms(p.fsync));
        for (n, d) in &p.persist {
            let _ = writeln!(
                report,
                "  RedbStorage::persist of {n:>4} entries + hard state: {:>9} ({:.0} entries/s if one per Ready)",
                ms(*d),
                *n as f64 / d.as_secs_f64()
            );
        }
        let _ = writeln!(
            report,
            "  per command: Envelope encode {}, decode + Store::apply {}; raft message encode + decode per entry {}",
            us(p.envelope),
            us(p.decode_apply),
            us(p.message_per_entry)
        );
        for (n, d) in &p.clone {
            let _ = writeln!(report, "  Store clone at {n:>6} tags: {}", ms(*d));
        }
    }
    if run("at-rest") {
        let rounds = env_or("RAFT_BENCH_ROUNDS", 3usize);
        eprintln!("at-rest: {rounds} rounds of plaintext and encrypted logs");
        let (off, on) = at_rest(
            &client,
            &root.path().join("at-rest"),
            &setup,
            proposers,
            measure,
            rounds,
        )?;
        let _ = writeln!(
            report,
            "5. encryption at rest: UpdateNode label, {proposers} proposers, {measure:?} per run, plaintext and AES-256-GCM logs alternating, each round's first run alternating too (target: encrypted >= 90% of plaintext)"
        );
        for (i, (a, b)) in off.iter().zip(&on).enumerate() {
            report += &load_line(&format!("round {} plaintext log", i + 1), a);
            report += &load_line(&format!("round {} encrypted log", i + 1), b);
        }
        let mean = |v: &[Load]| v.iter().map(|l| l.per_sec).sum::<f64>() / v.len() as f64;
        let (a, b) = (mean(&off), mean(&on));
        // Each round's pair ran back to back, so its ratio is the least disturbed by drift.
        let mut ratios: Vec<f64> = off
            .iter()
            .zip(&on)
            .map(|(a, b)| 100.0 * b.per_sec / a.per_sec)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let _ = writeln!(
            report,
            "  mean: plaintext {a:.0} writes/s, encrypted {b:.0} writes/s: encrypted is {:.1}% of plaintext (median of the rounds' ratios {:.1}%)",
            100.0 * b / a,
            ratios[ratios.len() / 2]
        );
    }
    let _ = writeln!(report, "total bench time {}", ms(started.elapsed()));
    println!("{report}");
    client.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}

//! The dispatcher: every agent keeps one bidirectional stream here. Up: register, heartbeats,
//! batches of task status. Down: a welcome, then the full set of tasks the node should know
//! about, and again whenever what the agent reads of it changes (a task added or removed, a
//! desired state; never the agent's own status reports): to an agent with the
//! "assignment-changes" feature only the tasks that changed and the ids that left
//! (`assignment_changes`), to older agents the whole set.
//!
//! Invariants: status reports are applied only for tasks placed on the reporting node (checked
//! by the state machine); reports from all sessions are batched into one proposal
//! (`status_batch`, which proposes a batch again when it did not commit); a session
//! that ends or misses heartbeats marks its node down (unless a newer session took over).
//!
//! Only the raft leader holds sessions (as in swarmkit): liveness is then judged in one place.
//! A follower refuses a session naming the leader's address (`rudder-leader` metadata); a
//! leader that loses leadership ends its sessions so agents move to the new one. A new leader
//! gives every ready node a grace period to reconnect before marking it down.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use rudder_model::store::StatusUpdate;
use rudder_model::store::{NodeResources, NodeRole};
use rudder_model::{Command, NodeState, TaskStatus};
use rudder_proto::v1::agent_message::Msg as Up;
use rudder_proto::v1::controller_message::Msg as Down;
use rudder_proto::v1::dispatcher_server::Dispatcher;
use rudder_proto::v1::*;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::now_ms;
use crate::raft_node::RaftHandle;

/// Messages a session queues for its agent before its sender waits (see `session`).
const SESSION_QUEUE: usize = 2;

/// The heartbeat period of a fleet of up to [`NODES_PER_SECOND`] nodes.
pub const HEARTBEAT: Duration = Duration::from_millis(1000);
/// Missed heartbeats before a node counts as down.
pub const MISSED_HEARTBEATS: u32 = 3;
/// Heartbeats a second the leader plans for; a bigger fleet beats less often.
pub const NODES_PER_SECOND: usize = 1000;
/// The longest heartbeat period (swarmkit's default period).
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(5);

/// The heartbeat period the leader gives the agents of a fleet of `nodes`: [`HEARTBEAT`] up to
/// [`NODES_PER_SECOND`] nodes, then one more second per such many, at most [`MAX_HEARTBEAT`].
/// A node is down after [`MISSED_HEARTBEATS`] periods, so a lost host is noticed within 3 s up
/// to 1,000 nodes and within 15 s at 5,000.
///
/// Why: at a fixed second, 5,000 sessions send 5,000 heartbeats a second, and when the machine
/// is busy (deploying 150,000 tasks) thousands of them arrive late at once: each late session
/// marks its node down, its tasks are replaced, and the cascade kept a 5,000-host fleet from
/// ever converging (issue 20). Whole seconds, so the period changes only when the fleet crosses
/// a thousand, and each change re-sends the session's welcome.
pub fn heartbeat_period(nodes: usize) -> Duration {
    let secs = nodes.div_ceil(NODES_PER_SECOND).max(1) as u32;
    (HEARTBEAT * secs).min(MAX_HEARTBEAT)
}

pub struct DispatcherApi {
    raft: RaftHandle,
    registry: String,
    status_tx: mpsc::Sender<StatusUpdate>,
    /// node id → generation of its current session (a reconnect supersedes the old stream).
    sessions: Arc<Mutex<HashMap<String, u64>>>,
    /// Where the usage samples on heartbeats go (the autoscaler's and `rctl stats`' source).
    usage: Arc<crate::usage::UsageBook>,
    /// Wakes each session only for the store changes that concern its node.
    fanout: crate::fanout::Fanout,
}

/// While this controller leads: a node that was ready when leadership began but opens no
/// session within the grace period is marked down (its agent may have died with the old leader).
async fn watch_leadership(raft: RaftHandle, sessions: Arc<Mutex<HashMap<String, u64>>>) {
    let mut status = raft.watch_status();
    let mut led_term = 0;
    loop {
        let st = status.borrow_and_update().clone();
        if st.is_leader && st.term != led_term {
            led_term = st.term;
            let (raft, sessions) = (raft.clone(), sessions.clone());
            tokio::spawn(async move {
                // Generations at the start of leadership; a node still at its old generation
                // (or never seen) after the grace period did not reconnect here.
                let before = sessions.lock().expect("sessions lock").clone();
                let period = heartbeat_period(raft.store().nodes.len());
                tokio::time::sleep(period * MISSED_HEARTBEATS * 2).await;
                let st = raft.status();
                if !st.is_leader || st.term != led_term {
                    return;
                }
                let store = raft.store();
                for n in store.nodes.values() {
                    // Looked up again for each node: under load the proposals below take a
                    // while, and a node that opened its session meanwhile must not be marked
                    // down (its session would live on with the node down, its tasks orphaned
                    // and replaced while the host still runs them: issue 20).
                    let now = sessions.lock().expect("sessions lock").get(&n.id).copied();
                    if n.state == NodeState::Ready && now == before.get(&n.id).copied() {
                        warn!(node = %n.id, "no session with the new leader: marking down");
                        let _ = raft
                            .propose(Command::NodeDown {
                                id: n.id.clone(),
                                now: now_ms(),
                            })
                            .await;
                    }
                }
            });
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

impl DispatcherApi {
    pub fn new(raft: RaftHandle, registry: String, usage: Arc<crate::usage::UsageBook>) -> Self {
        let (status_tx, status_rx) = mpsc::channel(8192);
        tokio::spawn(crate::status_batch::run(
            crate::status_batch::RaftSink(raft.clone()),
            status_rx,
        ));
        let sessions: Arc<Mutex<HashMap<String, u64>>> = Default::default();
        tokio::spawn(watch_leadership(raft.clone(), sessions.clone()));
        let fanout = crate::fanout::Fanout::start(&raft);
        DispatcherApi {
            fanout,
            raft,
            registry,
            status_tx,
            sessions,
            usage,
        }
    }
}

/// What the agent reads of an assigned task (`Worker::sync`) after its first sight of it: that
/// it is assigned, and its desired state. (Whether it may be started, `status <= assigned`, is
/// read from the first copy only: the worker never starts a task twice, `Worker::ended`.) So a
/// status report sends nothing down: before, every report (three per start) re-sent the
/// node's whole task list, the JSON of every spec included, and at 1,000 hosts that
/// re-encoding was a fifth of the leader's CPU. A new session sends the whole list once
/// (`last` starts as `None`).
///
/// What a session last told its agent: task id → desired state.
type Told = HashMap<String, rudder_model::TaskState>;

/// Against what the agent was last told, the tasks to send (new, or whose desired state
/// changed), in the order given, and the ids that left the node's set, sorted. An agent with
/// the "assignment-changes" feature is sent only these: before, adding one task to a node
/// re-encoded every task already on it (issue 20).
fn assignment_changes<'a>(
    told: &Told,
    now: &[&'a rudder_model::Task],
) -> (Vec<&'a rudder_model::Task>, Vec<String>) {
    let changed = now
        .iter()
        .filter(|t| told.get(&t.id) != Some(&t.desired_state))
        .copied()
        .collect();
    let present: std::collections::HashSet<&str> = now.iter().map(|t| t.id.as_str()).collect();
    let mut removed: Vec<String> = told
        .keys()
        .filter(|id| !present.contains(id.as_str()))
        .cloned()
        .collect();
    removed.sort();
    (changed, removed)
}

/// The most feature names a registration may carry, and the longest name.
const MAX_FEATURES: usize = 32;
const MAX_FEATURE_LEN: usize = 64;

/// Whether the agent applies assignment changes (`Register.features`); a registration with
/// more or longer names than an agent ever sends is refused, naming the field. Unknown names
/// are ignored: they are a newer agent's.
fn check_features(reg: &Register) -> Result<bool, Status> {
    if reg.features.len() > MAX_FEATURES || reg.features.iter().any(|f| f.len() > MAX_FEATURE_LEN) {
        warn!(node = %reg.node_id, count = reg.features.len(), "dispatcher: refused a registration's features");
        return Err(Status::invalid_argument(format!(
            "dispatcher: register: features: at most {MAX_FEATURES} names of at most {MAX_FEATURE_LEN} bytes"
        )));
    }
    Ok(reg
        .features
        .iter()
        .any(|f| f == rudder_proto::FEATURE_ASSIGNMENT_CHANGES))
}

fn to_status(r: &TaskStatusReport) -> Result<TaskStatus, crate::convert::UnknownEnum> {
    Ok(TaskStatus {
        state: crate::convert::task_state(r.state)?,
        message: r.message.clone(),
        error: r.error.clone(),
        container_id: r.container_id.clone(),
        exit_code: r.has_exit_code.then_some(r.exit_code),
        timestamp: r.timestamp_ms,
    })
}

/// What a promoted node's agent needs to start a controller that joins through this leader.
fn run_controller(store: &rudder_model::Store, me: u64, raft_id: u64) -> Option<RunController> {
    let join = store.managers.get(&me)?.addr.clone();
    let secrets = store.secrets.as_ref()?;
    let tokens = crate::security::from_store(&secrets.join_tokens).ok()?;
    let token = tokens.token(rudder_pki::ca::Role::Manager)?.to_string();
    Some(RunController {
        raft_id,
        join,
        token,
    })
}

/// Longest version string an agent may report.
const MAX_VERSION_LEN: usize = 128;

/// Refuses an agent whose version this controller does not serve (the skew policy,
/// `rudder_model::compat`), saying which side to upgrade.
fn check_version(reg: &Register) -> Result<(), Status> {
    if reg.version.len() > MAX_VERSION_LEN {
        return Err(Status::invalid_argument(format!(
            "dispatcher: version is over {MAX_VERSION_LEN} bytes"
        )));
    }
    let mine = rudder_version::full();
    rudder_model::compat::check_agent(&mine, &reg.version).map_err(|e| {
        warn!(node = %reg.node_id, agent = %reg.version, controller = %mine, %e,
            "dispatcher: refused an agent of an unsupported version");
        Status::failed_precondition(format!("dispatcher: {e}"))
    })
}

/// Refuses a registration that does not match the session's certificate (node id) or
/// connection (address), naming what is wrong; the attempt is logged (C1).
/// The host labels of a registration, checked (grammar, sizes, count). They are the host's
/// own (its config's `[labels]`): the caller's certificate has already been matched with
/// `node_id`, so a host sets only its own, and never the operator's `labels`.
fn check_host_labels(
    node: &str,
    reg: &Register,
) -> Result<std::collections::BTreeMap<String, String>, Status> {
    rudder_model::node::check_host_labels(&reg.labels).map_err(|e| {
        warn!(%node, err = %e, "dispatcher: refused a registration's labels");
        Status::invalid_argument(format!(
            "dispatcher: register: {e} (fix [labels] in the host's rudder.toml)"
        ))
    })?;
    Ok(reg
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

fn check_registration(
    me: &rudder_pki::ca::PeerIdentity,
    reg: &Register,
    remote: Option<std::net::SocketAddr>,
    store: &rudder_model::Store,
) -> Result<(), Status> {
    if reg.node_id != me.node {
        warn!(
            cert = %me.node,
            claimed = %reg.node_id,
            ?remote,
            "dispatcher: refused a session that claims another node's id"
        );
        return Err(Status::permission_denied(format!(
            "dispatcher: this certificate is for node {}, not {}: a node registers only as \
             itself",
            me.node, reg.node_id
        )));
    }
    // A hostname is a node's for good (placement constraints and `--node` name hosts by
    // it): set at the first registration and never changed. That it is never shared, and that
    // one host address is one node's, the store checks when it applies the registration
    // (`Command::PutNode`), where two registrations cannot race.
    if let Some(n) = store.nodes.get(&me.node) {
        if n.hostname != reg.hostname {
            warn!(node = %me.node, was = %n.hostname, claimed = %reg.hostname,
                "dispatcher: refused a change of hostname");
            return Err(Status::permission_denied(format!(
                "dispatcher: node {} registered as {}; a node's hostname does not change \
                 (`rctl node rm` it and join the host anew)",
                me.node, n.hostname
            )));
        }
    }
    if me.node.starts_with(crate::cluster_api::CONTROLLER_PREFIX) {
        return Err(Status::permission_denied(format!(
            "dispatcher: {} is a controller's identity, not an agent's",
            me.node
        )));
    }
    let addr: std::net::SocketAddr = reg.addr.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "dispatcher: register: addr {:?} is not ip:port",
            reg.addr
        ))
    })?;
    if let Some(remote) = remote {
        let same =
            addr.ip() == remote.ip() || (addr.ip().is_loopback() && remote.ip().is_loopback());
        if !same {
            warn!(
                node = %me.node,
                claimed = %addr,
                %remote,
                "dispatcher: refused a session whose address does not match its connection"
            );
            return Err(Status::permission_denied(format!(
                "dispatcher: node {} says it is at {}, but its connection comes from {}: the \
                 agent must listen on the address it connects from (--listen)",
                me.node,
                addr,
                remote.ip()
            )));
        }
    }
    // Known to the cluster: a registered node, or one a current join token admitted. A
    // certificate minted with a token rotated since, and never used, is not (finding of the
    // review: dormant certificates).
    if crate::security::standing(store, me.role, &me.node) == crate::cluster_api::Standing::Unknown
    {
        warn!(node = %me.node, "dispatcher: refused a certificate the cluster has no record of");
        return Err(Status::permission_denied(format!(
            "dispatcher: node {} is not known to this cluster: its certificate was admitted by \
             a join token rotated since, or not at all; join again with a current token",
            me.node
        )));
    }
    still_valid(store, me).map_err(Status::permission_denied)
}

/// Whether a session's identity may go on: not revoked, certificate not expired.
fn still_valid(
    store: &rudder_model::Store,
    me: &rudder_pki::ca::PeerIdentity,
) -> Result<(), String> {
    if store.is_revoked(me.role.as_str(), &me.node) {
        return Err(format!(
            "dispatcher: node {} was removed from the cluster: its certificates are revoked",
            me.node
        ));
    }
    if std::time::SystemTime::now() > me.not_after {
        return Err(format!(
            "dispatcher: node {}'s certificate expired; the agent must renew or re-join",
            me.node
        ));
    }
    Ok(())
}

/// A node's role, from the store: manager when it runs a controller of the group.
fn role_of(store: &rudder_model::Store, node_id: &str, addr: &str) -> NodeRole {
    let runs = match store.nodes.get(node_id) {
        Some(n) => {
            let mut n = n.clone();
            n.addr = addr.to_string();
            store.runs_controller(&n)
        }
        None => {
            let host = |a: &str| a.rsplit_once(':').map_or(a, |(h, _)| h).to_string();
            store.managers.values().any(|m| host(&m.addr) == host(addr))
        }
    };
    if runs {
        NodeRole::Manager
    } else {
        NodeRole::Worker
    }
}

/// Bytes of values per `SecretValues` message, well below the agent's message limit.
const SECRET_CHUNK: usize = 8 << 20;

/// `values` in messages of at most `SECRET_CHUNK` bytes of data (one value each at least), all
/// but the last marked partial; one empty message for none.
fn secret_messages(values: impl Iterator<Item = SecretValue>) -> Vec<SecretValues> {
    let mut out = vec![SecretValues::default()];
    let mut size = 0;
    for v in values {
        if size + v.data.len() > SECRET_CHUNK && size > 0 {
            out.push(SecretValues::default());
            size = 0;
        }
        size += v.data.len();
        out.last_mut().expect("one message").values.push(v);
    }
    let n = out.len();
    for (i, m) in out.iter_mut().enumerate() {
        m.partial = i + 1 < n;
    }
    out
}

/// Records a node's WireGuard public key when it changed.
async fn set_overlay_key(raft: &RaftHandle, node: &str, key: &str) -> Result<(), Status> {
    if raft
        .store()
        .nodes
        .get(node)
        .is_some_and(|n| n.overlay_key == key)
    {
        return Ok(());
    }
    raft.propose(Command::SetOverlayKey {
        node: node.to_string(),
        key: key.to_string(),
    })
    .await
    .map_err(|e| Status::unavailable(e.to_string()))
}

/// Records which volumes a node holds data of, when that changed.
async fn set_volume_copies(
    raft: &RaftHandle,
    node: &str,
    mut volumes: Vec<String>,
) -> Result<(), Status> {
    volumes.sort();
    volumes.dedup();
    let known: Vec<String> = raft
        .store()
        .volume_copies
        .get(node)
        .map(|s| s.iter().cloned().collect())
        .unwrap_or_default();
    if known == volumes {
        return Ok(());
    }
    raft.propose(Command::SetVolumeCopies {
        node: node.to_string(),
        volumes,
    })
    .await
    .map_err(|e| Status::unavailable(e.to_string()))
}

/// Ends a session whose next message cannot be encoded, telling the agent why (it reconnects;
/// sending it an empty payload instead would make it drop what it runs).
async fn fail(
    tx: &mpsc::Sender<Result<ControllerMessage, Status>>,
    e: rudder_model::wire::WireError,
) {
    warn!(%e, "dispatcher: ending a session");
    let _ = tx
        .send(Err(Status::internal(format!("dispatcher: {e}"))))
        .await;
}

type DownStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Dispatcher for DispatcherApi {
    type SessionStream = DownStream;

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let caller = crate::tls::caller_or_refuse(&req, "Dispatcher/Leave")?.clone();
        crate::leave_api::leave(&self.raft, &caller, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<DownStream>, Status> {
        let st = self.raft.status();
        if !st.is_leader {
            let leader = self
                .raft
                .store()
                .managers
                .get(&st.leader_id)
                .map(|m| m.addr.clone());
            let mut s = Status::unavailable(match &leader {
                Some(a) => format!("this controller is not the leader; the leader is at {a}"),
                None => "this controller is not the leader and no leader is known".to_string(),
            });
            if let Some(v) = leader.and_then(|a| a.parse().ok()) {
                s.metadata_mut().insert(rudder_proto::LEADER_METADATA, v);
            }
            return Err(s);
        }
        let term = st.term;
        // Who is calling is what its certificate says (C1); the Register message may only
        // repeat it.
        let caller = crate::tls::caller_or_refuse(&req, "Dispatcher/Session")?.clone();
        let remote = req.remote_addr();
        let mut up = req.into_inner();
        let first = up
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("dispatcher: empty session"))?;
        let Some(Up::Register(reg)) = first.msg else {
            return Err(Status::invalid_argument(
                "dispatcher: the first message must be register",
            ));
        };
        if reg.node_id.is_empty() || reg.hostname.is_empty() {
            return Err(Status::invalid_argument(
                "dispatcher: register needs node_id and hostname",
            ));
        }
        let store = self.raft.store();
        check_registration(&caller, &reg, remote, &store)?;
        check_version(&reg)?;
        let changes = check_features(&reg)?;
        let host_labels = check_host_labels(&caller.node, &reg)?;
        let node_id = reg.node_id.clone();
        // The role is the store's: a node runs a controller because an admin promoted it (or
        // a member listens on its host), never because its agent says so.
        let role = role_of(&store, &node_id, &reg.addr);
        let claimed = crate::convert::node_role(reg.role).unwrap_or(NodeRole::Worker);
        if claimed == NodeRole::Manager && role != NodeRole::Manager {
            // The claim is never trusted; say so, in case it is an attempt.
            warn!(node = %node_id, "dispatcher: an agent claims the manager role; it runs no controller of the group: recorded as worker");
        }
        let resources = NodeResources {
            cpus: reg.cpus_milli,
            memory: reg.memory_bytes,
        };
        let cert_not_after = caller
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let known = store.nodes.get(&node_id);
        let fresh = known.is_none_or(|n| {
            n.state != NodeState::Ready
                || n.addr != reg.addr
                || n.hostname != reg.hostname
                || n.role != role
                || n.resources != resources
                || n.cert_not_after != cert_not_after
                || n.host_labels != host_labels
        });
        if fresh {
            self.raft
                .propose(Command::PutNode {
                    id: node_id.clone(),
                    hostname: reg.hostname.clone(),
                    addr: reg.addr.clone(),
                    labels: known.map(|n| n.labels.clone()).unwrap_or_default(),
                    role,
                    resources,
                    now: now_ms(),
                    cert_not_after,
                    host_labels: host_labels.clone(),
                })
                .await
                .map_err(|e| match e {
                    // The store's check of hostnames and host addresses (one node each): a
                    // refusal, not an outage.
                    crate::raft_node::RaftError::Apply(a) => {
                        warn!(node = %node_id, hostname = %reg.hostname, addr = %reg.addr, err = %a,
                            "dispatcher: refused a registration");
                        Status::permission_denied(format!("dispatcher: {a}"))
                    }
                    e => Status::unavailable(e.to_string()),
                })?;
        }
        if !reg.overlay_public_key.is_empty() {
            set_overlay_key(&self.raft, &node_id, &reg.overlay_public_key).await?;
        }
        if store.node_versions.get(&node_id) != Some(&reg.version) {
            // Only shown (`rctl node ls`): a failure is logged, never the session's end.
            let cmd = Command::SetNodeVersion {
                id: node_id.clone(),
                version: reg.version.clone(),
            };
            if let Err(e) = self.raft.propose(cmd).await {
                warn!(node = %node_id, %e, "dispatcher: the agent's version is not recorded");
            }
        }
        let generation = {
            let mut s = self.sessions.lock().expect("sessions lock");
            let g = s.get(&node_id).copied().unwrap_or(0) + 1;
            s.insert(node_id.clone(), g);
            g
        };
        info!(node = %node_id, hostname = %reg.hostname, addr = %reg.addr, "agent session opened");

        // Room for one message waiting behind the one being written: a sender that finds it
        // full waits, and its next look (after the fan-out's wake, which coalesces) sends the
        // newest set instead of queueing every intermediate one. With 16, a slow agent (or
        // a busy machine) held up to 16 full task lists per session: at 5,000 hosts that was
        // most of the leader's memory (issue 20).
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        // The period this session's agent was last told, in ms: the sender re-welcomes the
        // agent when the fleet's size changes it, and the receiver's deadline follows.
        let period = heartbeat_period(store.nodes.len());
        let period_ms = Arc::new(std::sync::atomic::AtomicU64::new(period.as_millis() as u64));
        let registry = self.registry.clone();
        let welcome = move |store: &rudder_model::Store, period: Duration| ControllerMessage {
            msg: Some(Down::Welcome(Welcome {
                heartbeat_period_ms: period.as_millis() as u32,
                registry: registry.clone(),
                controllers: store.managers.values().map(|m| m.addr.clone()).collect(),
            })),
        };
        let _ = tx.send(Ok(welcome(&store, period))).await;

        // Down: the node's task set, whenever it changes (subscribed before the first look,
        // so no change is missed).
        let fanout = self.fanout.clone();
        let mut wake = fanout.subscribe(&node_id);
        let down_tx = tx.clone();
        let down_node = node_id.clone();
        let me = self.raft.status().id;
        let told = period_ms.clone();
        let sender = tokio::spawn(async move {
            let mut last: Option<Told> = None;
            let mut last_map = None;
            let mut last_volumes = None;
            let mut last_values = None;
            let mut asked_controller = None;
            let mut last_trusted: Option<Vec<String>> = None;
            loop {
                let store = fanout.snapshot();
                let period = heartbeat_period(store.nodes.len());
                if period.as_millis() as u64 != told.load(std::sync::atomic::Ordering::Relaxed) {
                    // The agent beats at once on a welcome, so a shorter deadline from now on
                    // cannot catch it between two periods.
                    if down_tx.send(Ok(welcome(&store, period))).await.is_err() {
                        return;
                    }
                    told.store(
                        period.as_millis() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    info!(node = %down_node, period_ms = period.as_millis() as u64, "heartbeat period changed");
                }
                // A promoted node that does not yet run its controller: tell its agent.
                if let Some(rid) = store.nodes.get(&down_node).and_then(|n| n.controller_id) {
                    if asked_controller != Some(rid) && !store.managers.contains_key(&rid) {
                        if let Some(rc) = run_controller(&store, me, rid) {
                            if down_tx
                                .send(Ok(ControllerMessage {
                                    msg: Some(Down::RunController(rc)),
                                }))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            asked_controller = Some(rid);
                        }
                    }
                }
                // Which controllers the agent may serve: the members, none revoked.
                let trusted: Vec<String> = store
                    .managers
                    .keys()
                    .map(|id| crate::security::controller_cn(*id))
                    .filter(|cn| !store.is_revoked("manager", cn))
                    .collect();
                // (Not before the group is recorded: an empty list would refuse everyone.)
                if !trusted.is_empty() && last_trusted.as_ref() != Some(&trusted) {
                    let msg = Trusted {
                        controllers: trusted.clone(),
                    };
                    if down_tx
                        .send(Ok(ControllerMessage {
                            msg: Some(Down::Trusted(msg)),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    last_trusted = Some(trusted);
                }
                // The overlay first: tasks that join a network need it on the host.
                let map = rudder_model::views::map_for_node(&store, &down_node);
                if last_map.as_ref() != Some(&map) {
                    let msg = match rudder_model::wire::encode("network map", &map) {
                        Ok(map_json) => NetworkMap { map_json },
                        Err(e) => return fail(&down_tx, e).await,
                    };
                    if down_tx
                        .send(Ok(ControllerMessage {
                            msg: Some(Down::NetworkMap(msg)),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    last_map = Some(map);
                }
                // Then the declared volumes: a task's volume is declared before it is placed.
                // (A per-slot volume pinned to another node is not this node's: a stale
                // copy left by a released pin goes.)
                let volumes = rudder_model::slotvol::declared_for(&store, &down_node);
                if last_volumes.as_ref() != Some(&volumes) {
                    let msg = Volumes {
                        names: volumes.iter().cloned().collect(),
                    };
                    if down_tx
                        .send(Ok(ControllerMessage {
                            msg: Some(Down::Volumes(msg)),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    last_volumes = Some(volumes);
                }
                let tasks: Vec<_> = store.tasks_on(&down_node).collect();
                // The values of the secrets and configs its unfinished tasks use, and no
                // others, before the assignments that need them.
                let needed: std::collections::BTreeSet<_> = tasks
                    .iter()
                    .filter(|t| !t.status.state.is_terminal())
                    .flat_map(|t| rudder_model::secret::needs(&t.spec))
                    .collect();
                if last_values.as_ref() != Some(&needed) {
                    let values = needed.iter().filter_map(|(kind, name, version)| {
                        let v = store.secret_value(*kind, name, *version)?;
                        Some(SecretValue {
                            kind: kind.to_string(),
                            name: name.clone(),
                            version: *version,
                            data: v.data.0.clone(),
                        })
                    });
                    for msg in secret_messages(values) {
                        if down_tx
                            .send(Ok(ControllerMessage {
                                msg: Some(Down::SecretValues(msg)),
                            }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    last_values = Some(needed);
                }
                let now: Told = tasks
                    .iter()
                    .map(|t| (t.id.clone(), t.desired_state))
                    .collect();
                if last.as_ref() != Some(&now) {
                    let (send, removed, changes_only) = match &last {
                        Some(told) if changes => {
                            let (send, removed) = assignment_changes(told, &tasks);
                            (send, removed, true)
                        }
                        _ => (tasks.clone(), Vec::new(), false),
                    };
                    let encoded: Result<Vec<Assignment>, _> = send
                        .iter()
                        .map(|t| {
                            Ok(Assignment {
                                task_id: t.id.clone(),
                                desired_state: rudder_proto::v1::TaskState::from(t.desired_state)
                                    .into(),
                                task_json: rudder_model::wire::encode("task", t)?,
                            })
                        })
                        .collect();
                    let msg = match encoded {
                        Ok(tasks) => Assignments {
                            tasks,
                            changes_only,
                            removed,
                        },
                        Err(e) => return fail(&down_tx, e).await,
                    };
                    if down_tx
                        .send(Ok(ControllerMessage {
                            msg: Some(Down::Assignments(msg)),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    last = Some(now);
                }
                if wake.changed().await.is_err() {
                    return;
                }
            }
        });

        // Up: heartbeats and status, with a deadline per message.
        let again = (
            reg.hostname.clone(),
            reg.addr.clone(),
            role,
            resources,
            cert_not_after,
            host_labels,
        );
        let raft = self.raft.clone();
        let status_tx = self.status_tx.clone();
        let sessions = self.sessions.clone();
        let usage = self.usage.clone();
        let mut leadership = self.raft.watch_status();
        tokio::spawn(async move {
            let current_deadline = || {
                Duration::from_millis(period_ms.load(std::sync::atomic::Ordering::Relaxed))
                    * MISSED_HEARTBEATS
            };
            let mut heard = tokio::time::Instant::now();
            loop {
                let deadline = current_deadline();
                let next = tokio::select! {
                    n = tokio::time::timeout(deadline, up.message()) => n,
                    _ = leadership.wait_for(|s| !s.is_leader || s.term != term) => {
                        // Leadership moved: end the session; the agent moves to the new
                        // leader, which judges its liveness from now on.
                        info!(node = %node_id, "no longer the leader: ending agent session");
                        sender.abort();
                        return;
                    }
                };
                if matches!(next, Ok(Ok(Some(_)))) {
                    heard = tokio::time::Instant::now();
                }
                // The identity is checked for the whole session, not only at its start: a
                // removed node or an expired certificate ends it (L5).
                if let Err(why) = still_valid(&raft.store(), &caller) {
                    warn!(node = %node_id, why, "ending agent session");
                    break;
                }
                match next {
                    Ok(Ok(Some(m))) => match m.msg {
                        Some(Up::Heartbeat(h)) => {
                            // A `NodeDown` proposed for an earlier session (missed heartbeats,
                            // a new leader's grace) can commit after this one registered:
                            // the current session then registers its node again.
                            let current = sessions
                                .lock()
                                .expect("sessions lock")
                                .get(&node_id)
                                .copied()
                                == Some(generation);
                            let down = raft
                                .store()
                                .nodes
                                .get(&node_id)
                                .is_some_and(|n| n.state == NodeState::Down);
                            if current && down {
                                warn!(node = %node_id, "node marked down during a live session: registering it again");
                                let (hostname, addr, role, resources, cert_not_after, host_labels) =
                                    again.clone();
                                let labels = raft
                                    .store()
                                    .nodes
                                    .get(&node_id)
                                    .map(|n| n.labels.clone())
                                    .unwrap_or_default();
                                let cmd = Command::PutNode {
                                    id: node_id.clone(),
                                    hostname,
                                    addr,
                                    labels,
                                    role,
                                    resources,
                                    now: now_ms(),
                                    cert_not_after,
                                    host_labels,
                                };
                                if let Err(e) = raft.propose(cmd).await {
                                    warn!(node = %node_id, %e, "could not register the node again");
                                }
                            }
                            if !h.usage.is_empty() {
                                usage.record(&raft.store(), &node_id, &h.usage, now_ms());
                            }
                        }
                        None | Some(Up::Register(_)) => {}
                        Some(Up::OverlayKey(k)) => {
                            info!(node = %node_id, epoch = k.epoch, "new WireGuard key");
                            if let Err(e) = set_overlay_key(&raft, &node_id, &k.public_key).await {
                                warn!(node = %node_id, %e, "could not record the new key");
                            }
                        }
                        Some(Up::VolumeCopies(v)) => {
                            if let Err(e) = set_volume_copies(&raft, &node_id, v.names).await {
                                warn!(node = %node_id, %e, "could not record the volume copies");
                            }
                        }
                        Some(Up::Status(batch)) => {
                            for r in &batch.reports {
                                let status = match to_status(r) {
                                    Ok(s) => s,
                                    Err(e) => {
                                        warn!(node = %node_id, task = %r.task_id, %e, "dispatcher: a status report was dropped");
                                        continue;
                                    }
                                };
                                let _ = status_tx
                                    .send(StatusUpdate {
                                        task_id: r.task_id.clone(),
                                        node_id: node_id.clone(),
                                        status,
                                    })
                                    .await;
                            }
                        }
                    },
                    Ok(Ok(None)) => {
                        info!(node = %node_id, "agent session closed");
                        break;
                    }
                    Ok(Err(e)) => {
                        info!(node = %node_id, %e, "agent session failed");
                        break;
                    }
                    Err(_) => {
                        warn!(node = %node_id, "agent missed {MISSED_HEARTBEATS} heartbeats");
                        break;
                    }
                }
            }
            sender.abort();
            // A closed stream is not yet a lost node: an agent that restarts opens a new
            // session within the heartbeat deadline and keeps its tasks.
            tokio::time::sleep_until(heard + current_deadline()).await;
            let current = sessions
                .lock()
                .expect("sessions lock")
                .get(&node_id)
                .copied();
            if current == Some(generation) {
                if let Err(e) = raft
                    .propose(Command::NodeDown {
                        id: node_id.clone(),
                        now: now_ms(),
                    })
                    .await
                {
                    warn!(node = %node_id, %e, "could not mark node down");
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    fn value(n: usize) -> SecretValue {
        SecretValue {
            kind: "secret".into(),
            name: format!("s{n}"),
            version: 1,
            data: vec![0; 3 << 20],
        }
    }

    #[test]
    fn secret_values_are_split_into_bounded_messages_marked_partial() {
        let one = secret_messages(std::iter::empty());
        assert_eq!(one, vec![SecretValues::default()]);
        let msgs = secret_messages((0..5).map(value));
        assert_eq!(
            msgs.iter().map(|m| m.values.len()).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        assert_eq!(
            msgs.iter().map(|m| m.partial).collect::<Vec<_>>(),
            vec![true, true, false]
        );
    }
}

#[cfg(test)]
mod assignment_tests {
    use super::*;
    use rudder_model::{Task, TaskState};

    fn task(desired: TaskState, state: TaskState) -> Task {
        let mut t: Task = serde_json::from_value(serde_json::json!({
            "id": "t1", "service_id": "s1", "service_name": "web", "slot": 1,
            "spec": {"name": "web", "image": "busybox:latest", "replicas": 1},
            "spec_version": 1, "desired_state": desired,
            "status": {"state": state, "message": "", "error": "", "container_id": "",
                       "timestamp": 0},
            "created_at": 1, "version": 1,
        }))
        .expect("task");
        t.node_id = Some("n1".into());
        t
    }

    fn with_id(id: &str, desired: TaskState, state: TaskState) -> Task {
        let mut t = task(desired, state);
        t.id = id.into();
        t
    }

    /// Only what the agent reads sends a task again: its arrival, a new desired state, its
    /// removal; never its status (the agent's own reports).
    #[test]
    fn only_what_the_agent_reads_is_sent_again() {
        use TaskState::*;
        let told: Told = [("t1".into(), Running), ("t2".into(), Running)].into();
        // (desired, status) of t1 → sent again
        let table = [
            (Running, Preparing, false),
            (Running, Running, false),
            (Running, Failed, false),
            (Shutdown, Running, true),
            (Complete, Assigned, true),
        ];
        for (desired, state, sent) in table {
            let mut t = with_id("t1", desired, state);
            t.version += 7;
            t.status.message = "a report".into();
            let t2 = with_id("t2", Running, Running);
            let (send, removed) = assignment_changes(&told, &[&t, &t2]);
            let ids: Vec<&str> = send.iter().map(|t| t.id.as_str()).collect();
            assert_eq!(ids == ["t1"], sent, "{desired:?} {state:?}: {ids:?}");
            assert!(removed.is_empty());
        }
        // A new task is sent, one gone is named.
        let t3 = with_id("t3", Running, Assigned);
        let t1 = with_id("t1", Running, Running);
        let (send, removed) = assignment_changes(&told, &[&t1, &t3]);
        assert_eq!(
            send.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["t3"]
        );
        assert_eq!(removed, ["t2"]);
        // Nothing told yet: everything is sent.
        let (send, removed) = assignment_changes(&Told::new(), &[&t1, &t3]);
        assert_eq!(send.len(), 2);
        assert!(removed.is_empty());
    }

    fn register(features: Vec<String>) -> Register {
        Register {
            node_id: "n1".into(),
            features,
            ..Default::default()
        }
    }

    /// Only an agent that names the feature gets changes; unknown names are a newer agent's
    /// and ignored; more or longer names than any agent sends refuse the registration.
    #[test]
    fn the_changes_feature_is_read_from_a_bounded_list() {
        let f = |v: &[&str]| check_features(&register(v.iter().map(|s| s.to_string()).collect()));
        assert!(!f(&[]).unwrap());
        assert!(!f(&["from-the-future"]).unwrap());
        assert!(f(&["from-the-future", rudder_proto::FEATURE_ASSIGNMENT_CHANGES]).unwrap());
        let many = vec!["x"; MAX_FEATURES + 1];
        let err = f(&many).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("features"), "{}", err.message());
        let long = "y".repeat(MAX_FEATURE_LEN + 1);
        assert_eq!(
            f(&[&long]).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}

/// Liveness under a paused clock: a one-member raft group on in-memory storage (the real Ready
/// loop), the dispatcher's leadership watch, and time advanced by hand.
#[cfg(test)]
mod liveness_tests {
    use super::*;
    use crate::raft_sim::SimStorage;
    use crate::transport::NoopTransport;

    fn put_node(id: &str) -> Command {
        Command::PutNode {
            id: id.into(),
            hostname: format!("host-{id}"),
            addr: format!("10.0.0.{}:4243", id.len()),
            labels: Default::default(),
            role: NodeRole::Worker,
            resources: NodeResources::default(),
            now: 1,
            cert_not_after: 0,
            host_labels: Default::default(),
        }
    }

    fn state(raft: &RaftHandle, id: &str) -> NodeState {
        raft.store()
            .nodes
            .get(id)
            .expect("node registered")
            .state
            .clone()
    }

    #[test]
    fn the_heartbeat_period_grows_with_the_fleet_in_whole_seconds_up_to_five() {
        for (nodes, secs) in [
            (0, 1),
            (1, 1),
            (1000, 1),
            (1001, 2),
            (2500, 3),
            (5000, 5),
            (20_000, 5),
        ] {
            assert_eq!(
                heartbeat_period(nodes),
                Duration::from_secs(secs),
                "{nodes} nodes"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_ready_node_with_no_session_under_a_new_leader_goes_down_after_the_grace() {
        let raft = crate::raft_node::start(1, SimStorage::new(vec![1]), Arc::new(NoopTransport))
            .expect("start raft");
        raft.propose(put_node("n1")).await.expect("register n1");
        raft.propose(put_node("n22")).await.expect("register n22");
        let d = DispatcherApi::new(raft.clone(), String::new(), Default::default());
        // Let the watch see the leadership and take its "before" picture of the sessions.
        tokio::time::sleep(Duration::from_millis(10)).await;
        // n22 opens a session with this leader (a new generation); n1 never does.
        d.sessions
            .lock()
            .expect("sessions lock")
            .insert("n22".into(), 1);
        let grace = HEARTBEAT * MISSED_HEARTBEATS * 2;
        tokio::time::sleep(grace - Duration::from_millis(500)).await;
        assert_eq!(state(&raft, "n1"), NodeState::Ready, "not before the grace");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            state(&raft, "n1"),
            NodeState::Down,
            "silent node marked down"
        );
        assert_eq!(
            state(&raft, "n22"),
            NodeState::Ready,
            "node with a session kept"
        );
    }
}

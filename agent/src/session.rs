//! The agent's one stream to the controllers: register, heartbeat, report status in batches,
//! receive the assignment set (whole at a session's start, then only its changes when the
//! controller supports that: [`Assigned`]).
//!
//! Only the raft leader serves sessions. The agent keeps a list of controllers (the ones it was
//! configured with plus the ones the last `Welcome` named) and, when a session breaks or is
//! refused, dials the leader a refusal names (`rudder-leader` metadata) at once, else the next
//! controller in the list; it backs off (100 ms doubling to 2 s) only after a whole round of the
//! list failed. Every task's last status is re-sent on a new session so nothing reported is
//! lost. Choosing the next address is pure ([`Controllers`]); the I/O is in [`run`].

use std::sync::Arc;
use std::time::Duration;

use rudder_model::Task;
use rudder_proto::v1::agent_message::Msg as Up;
use rudder_proto::v1::controller_message::Msg as Down;
use rudder_proto::v1::dispatcher_client::DispatcherClient;
use rudder_proto::v1::*;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::worker::Worker;

pub use rudder_proto::LEADER_METADATA;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Who this agent is, as it registers with the controllers.
pub struct Identity {
    /// The node id the agent generated on first start.
    pub node_id: String,
    /// The host's name.
    pub hostname: String,
    /// Where the agent's API listens, `ip:port`.
    pub addr: String,
    /// Capacity offered to the scheduler.
    pub cpus_milli: u64,
    /// Bytes of memory offered to the scheduler.
    pub memory_bytes: u64,
    /// `worker` or `manager`.
    pub role: String,
    /// The host's own labels (its config's `[labels]`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Where a controller started on promotion keeps its data (`None`: never start one).
    pub data_dir: Option<std::path::PathBuf>,
    /// This node's certificate (the latest, as renewals publish it) for mutual TLS towards the
    /// controllers; plain HTTP/2 when `None`.
    pub tls: Option<tokio::sync::watch::Receiver<rudder_pki::tls::NodeCerts>>,
    /// The controllers AgentApi serves, as the leader lists them (`None`: not kept).
    pub trusted: Option<std::sync::Arc<crate::trusted::TrustedControllers>>,
    /// The latest usage samples of the running tasks (`stats`), sent with the next heartbeat
    /// after each new round (`None`: no samples).
    pub usage: Option<tokio::sync::watch::Receiver<Vec<TaskUsage>>>,
    /// What this agent registers as understanding (`Register.features`): [`FEATURES`], or
    /// fewer to act as an older agent (the fleet simulator's before/after runs).
    pub features: Vec<String>,
}

/// Everything this agent understands beyond the oldest protocol it speaks.
pub const FEATURES: &[&str] = &[rudder_proto::FEATURE_ASSIGNMENT_CHANGES];

/// [`FEATURES`], owned, for an [`Identity`].
pub fn features() -> Vec<String> {
    FEATURES.iter().map(|f| f.to_string()).collect()
}

/// The largest message a controller may send down a session.
pub const MAX_DOWN_MESSAGE: usize = 64 * 1024 * 1024;

/// Why a session with a controller ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The node certificate is unusable.
    #[error("session: tls: {0}")]
    Tls(rudder_pki::tls::TlsError),
    /// No controller address was configured.
    #[error("session: no controller address given")]
    NoController,
    /// A controller address does not parse (address, error).
    #[error("session: bad controller address {0:?}: {1}")]
    Address(String, tonic::transport::Error),
    /// No connection could be made.
    #[error("session: cannot connect: {}", rudder_proto::error_chain(.0))]
    Connect(tonic::transport::Error),
    /// The controller refused or ended the session.
    #[error("session: {}", .0.message())]
    Status(#[from] tonic::Status),
    /// The controller closed the stream.
    #[error("session: the stream to the controller closed")]
    Closed,
    /// The worker went away (the agent is stopping).
    #[error("session: the worker's status channel closed")]
    Worker,
    /// The controller's assignments grew past what an agent keeps (count, limit).
    #[error("session: assignments: {0} tasks is over the limit of {1}")]
    TooManyTasks(usize, usize),
}

/// The most tasks an agent keeps assigned: past it the session ends (a controller never places
/// this many on one host; the limit bounds what a run of change messages can make it hold).
pub const MAX_ASSIGNED: usize = 100_000;

/// The node's assignment set as this session has been told it: a whole set replaces it, a
/// `changes_only` set adds and replaces its tasks and drops its `removed` ids. Pure (no I/O),
/// so the merge rules are tested apart from a controller.
#[derive(Default)]
pub struct Assigned {
    tasks: std::collections::HashMap<String, Task>,
}

impl Assigned {
    /// Applies one `Assignments` message. An unreadable task is logged and left out (as a
    /// whole set always did), so a copy the agent holds of it goes too.
    pub fn apply(&mut self, a: &Assignments) -> Result<(), SessionError> {
        if !a.changes_only {
            self.tasks.clear();
        }
        for id in &a.removed {
            self.tasks.remove(id);
        }
        for t in &a.tasks {
            match crate::convert::assignment(t) {
                Ok(task) => {
                    self.tasks.insert(task.id.clone(), task);
                }
                Err(e) => {
                    warn!(task = %t.task_id, %e, "unreadable assignment");
                    self.tasks.remove(&t.task_id);
                }
            }
        }
        if self.tasks.len() > MAX_ASSIGNED {
            return Err(SessionError::TooManyTasks(self.tasks.len(), MAX_ASSIGNED));
        }
        Ok(())
    }

    /// The whole set, for [`Worker::sync`].
    pub fn tasks(&self) -> Vec<Task> {
        self.tasks.values().cloned().collect()
    }
}

impl SessionError {
    /// The leader's `host:port` when a follower refused the session and knows the leader.
    pub fn leader_hint(&self) -> Option<&str> {
        match self {
            SessionError::Status(s) => s
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty()),
            _ => None,
        }
    }
}

/// Parses `--controller`: one URL or a comma-separated list. A bare `host:port` gets `http://`.
pub fn parse_controllers(s: &str) -> Result<Vec<String>, SessionError> {
    let mut out: Vec<String> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let url = to_url(part, "http");
        tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| SessionError::Address(part.to_string(), e))?;
        if !out.contains(&url) {
            out.push(url);
        }
    }
    if out.is_empty() {
        return Err(SessionError::NoController);
    }
    Ok(out)
}

/// `host:port` → `scheme://host:port`; a URL stays as it is (without a trailing `/`).
fn to_url(addr: &str, scheme: &str) -> String {
    let addr = addr.trim().trim_end_matches('/');
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    }
}

/// Where to dial next, and after how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    /// The controller's URL.
    pub addr: String,
    /// How long to wait before dialing.
    pub delay: Duration,
}

/// The controllers this agent knows and its progress through them. Pure: no clock, no I/O.
#[derive(Debug, Clone)]
pub struct Controllers {
    /// From `--controller`; always kept, in order.
    configured: Vec<String>,
    /// From the last `Welcome`; replaced by each one, so removed controllers are forgotten.
    learnt: Vec<String>,
    /// Scheme for addresses learnt as `host:port` (that of the first configured URL).
    scheme: String,
    /// Failed attempts since the last welcome or the last backoff.
    failures: usize,
    /// Leader hints followed in a row; bounded so two stale followers cannot ping-pong the
    /// agent without a pause.
    hops: usize,
    backoff: Duration,
}

impl Controllers {
    /// The controllers given on the command line, in order; none learnt yet.
    pub fn new(configured: Vec<String>) -> Self {
        let scheme = configured
            .first()
            .and_then(|u| u.split_once("://"))
            .map(|(s, _)| s.to_string())
            .unwrap_or_else(|| "http".to_string());
        Controllers {
            configured,
            learnt: Vec::new(),
            scheme,
            failures: 0,
            hops: 0,
            backoff: FIRST_BACKOFF,
        }
    }

    /// Every known address, configured ones first, without duplicates.
    pub fn addrs(&self) -> Vec<String> {
        let mut out = self.configured.clone();
        for a in &self.learnt {
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }

    /// Where to dial first.
    pub fn first(&self) -> Option<String> {
        self.addrs().into_iter().next()
    }

    /// A controller welcomed us: remember the controllers it named (`host:port`), and start
    /// counting failures and backoff afresh.
    pub fn welcomed(&mut self, controllers: &[String]) {
        self.learnt = controllers
            .iter()
            .filter(|c| !c.trim().is_empty())
            .map(|c| to_url(c, &self.scheme))
            .collect();
        self.failures = 0;
        self.hops = 0;
        self.backoff = FIRST_BACKOFF;
    }

    /// The session with `current` broke or was refused, naming `leader` (`host:port`) or not:
    /// follow the hint at once, else take the next controller in the list, pausing only when a
    /// whole round of the list has failed.
    pub fn next(&mut self, current: &str, leader: Option<&str>) -> Next {
        let addrs = self.addrs();
        let round = addrs.len().max(1);
        self.failures += 1;
        if let Some(hint) = leader.map(|l| to_url(l, &self.scheme)) {
            if hint != current && self.hops < round {
                self.hops += 1;
                return Next {
                    addr: hint,
                    delay: Duration::ZERO,
                };
            }
        }
        self.hops = 0;
        let addr = match addrs.iter().position(|a| a == current) {
            Some(i) => addrs[(i + 1) % addrs.len()].clone(),
            None => addrs
                .first()
                .cloned()
                .unwrap_or_else(|| current.to_string()),
        };
        let delay = if self.failures >= round {
            self.failures = 0;
            let d = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            d
        } else {
            Duration::ZERO
        };
        Next { addr, delay }
    }
}

/// Keeps a session with the leader for as long as the agent runs.
pub async fn run(
    controllers: Vec<String>,
    me: Identity,
    worker: Arc<Worker>,
    mut status_rx: mpsc::UnboundedReceiver<TaskStatusReport>,
) {
    let mut book = Controllers::new(controllers);
    let Some(mut addr) = book.first() else {
        warn!("{}", SessionError::NoController);
        return;
    };
    loop {
        let hint = match session(&addr, &mut book, &me, &worker, &mut status_rx).await {
            Ok(()) => {
                info!(controller = %addr, "session ended");
                None
            }
            Err(SessionError::Worker) => {
                info!("worker gone; session loop stops");
                return;
            }
            Err(e) => {
                let hint = e.leader_hint().map(str::to_string);
                warn!(%e, controller = %addr, leader = ?hint, "session failed");
                hint
            }
        };
        let next = book.next(&addr, hint.as_deref());
        if !next.delay.is_zero() {
            info!(
                delay_ms = next.delay.as_millis() as u64,
                "no controller took the session; backing off"
            );
            tokio::time::sleep(next.delay).await;
        }
        addr = next.addr;
    }
}

async fn session(
    controller: &str,
    book: &mut Controllers,
    me: &Identity,
    worker: &Arc<Worker>,
    status_rx: &mut mpsc::UnboundedReceiver<TaskStatusReport>,
) -> Result<(), SessionError> {
    let url = match (&me.tls, controller.strip_prefix("http://")) {
        (Some(_), Some(rest)) => format!("https://{rest}"),
        _ => controller.to_string(),
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| SessionError::Address(controller.to_string(), e))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_keepalive(Some(Duration::from_secs(5)));
    if let Some(certs) = &me.tls {
        // Only a current member of the controller group (as the last trusted leader listed
        // them) may hold this agent's session: a removed controller is refused here.
        let trusted = me.trusted.clone();
        let accept: rudder_pki::tls::AcceptName = Arc::new(move |cn: &str| match &trusted {
            Some(t) => t.admits(cn),
            None => Ok(()),
        });
        endpoint = rudder_pki::tls::member_endpoint(
            endpoint,
            &certs.borrow(),
            rudder_pki::ca::Role::Manager,
            accept,
        )
        .map_err(SessionError::Tls)?;
    }
    let channel = endpoint.connect().await.map_err(SessionError::Connect)?;
    // Assignments carry whole task specs: allow big ones (tonic's default is 4 MiB), so a
    // node with many tasks is not dropped for the size of its task list (M5).
    let mut client = DispatcherClient::new(channel).max_decoding_message_size(MAX_DOWN_MESSAGE);
    let (tx, rx) = mpsc::channel::<AgentMessage>(64);
    let overlay = worker.ctx().overlay.clone();
    let mut key_rx = overlay.as_ref().map(|o| o.watch_key());
    let (overlay_public_key, overlay_key_epoch) = key_rx
        .as_mut()
        .map(|k| k.borrow_and_update().clone())
        .unwrap_or_default();
    tx.send(AgentMessage {
        msg: Some(Up::Register(Register {
            node_id: me.node_id.clone(),
            hostname: me.hostname.clone(),
            addr: me.addr.clone(),
            cpus_milli: me.cpus_milli,
            memory_bytes: me.memory_bytes,
            // A host promoted to run a controller is a manager from then on.
            role: crate::convert::role_to_wire(
                me.role == "manager"
                    || me
                        .data_dir
                        .as_deref()
                        .and_then(crate::manager::running)
                        .is_some(),
            ),
            overlay_public_key,
            overlay_key_epoch,
            version: rudder_version::full(),
            labels: me
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            features: me.features.clone(),
        })),
    })
    .await
    .map_err(|_| SessionError::Closed)?;
    let mut down = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    info!(controller, "session open: connected to the leader");
    let mut copies_rx = worker.ctx().volumes.watch_copies();
    let names = copies_rx.borrow_and_update().iter().cloned().collect();
    tx.send(AgentMessage {
        msg: Some(Up::VolumeCopies(VolumeCopies { names })),
    })
    .await
    .map_err(|_| SessionError::Closed)?;
    let resend = worker.last_statuses();
    if !resend.is_empty() {
        let _ = tx
            .send(AgentMessage {
                msg: Some(Up::Status(StatusBatch { reports: resend })),
            })
            .await;
    }
    let mut heartbeat = tokio::time::interval(Duration::from_millis(1000));
    let mut usage_rx = me.usage.clone();
    let mut secret_values = Vec::new();
    let mut assigned = Assigned::default();
    loop {
        tokio::select! {
            msg = down.message() => {
                let Some(msg) = msg? else {
                    return Ok(());
                };
                match msg.msg {
                    Some(Down::Welcome(w)) => {
                        *worker.ctx().registry.lock().expect("registry lock") = w.registry;
                        book.welcomed(&w.controllers);
                        info!(controller, controllers = ?book.addrs(), "welcomed");
                        heartbeat = tokio::time::interval(Duration::from_millis(
                            u64::from(w.heartbeat_period_ms.max(100)),
                        ));
                    }
                    Some(Down::RunController(rc)) => {
                        if let Some(dir) = &me.data_dir {
                            if let Err(e) = crate::manager::start(dir, &me.addr, &rc) {
                                warn!(%e, "cannot start a controller on this host");
                            }
                        }
                    }
                    Some(Down::NetworkMap(m)) => {
                        match (crate::convert::network_map(&m), &overlay) {
                            (Ok(map), Some(o)) => o.set_map(map),
                            (Err(e), _) => warn!(%e, "unreadable network map"),
                            (Ok(_), None) => {}
                        }
                    }
                    Some(Down::Trusted(t)) => {
                        if let Some(trusted) = &me.trusted {
                            trusted.set(t.controllers);
                        }
                    }
                    Some(Down::Volumes(v)) => {
                        // Deleting copies is file work: off the session's task.
                        let w = worker.clone();
                        tokio::task::spawn_blocking(move || w.ctx().volumes.set_declared(v.names));
                    }
                    Some(Down::SecretValues(v)) => {
                        // Held until the set is complete (see the message's `partial`).
                        secret_values.extend(v.values);
                        if !v.partial {
                            worker.ctx().secrets.set(std::mem::take(&mut secret_values));
                        }
                    }
                    Some(Down::Assignments(a)) => {
                        assigned.apply(&a)?;
                        worker.sync(assigned.tasks());
                    }
                    None => {}
                }
            }
            r = status_rx.recv() => {
                let Some(first) = r else { return Err(SessionError::Worker) };
                let mut reports = vec![first];
                while let Ok(r) = status_rx.try_recv() {
                    reports.push(r);
                }
                tx.send(AgentMessage { msg: Some(Up::Status(StatusBatch { reports })) })
                    .await
                    .map_err(|_| SessionError::Closed)?;
            }
            Ok(()) = async {
                match key_rx.as_mut() {
                    Some(k) => k.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                let (public_key, epoch) = key_rx
                    .as_mut()
                    .map(|k| k.borrow_and_update().clone())
                    .unwrap_or_default();
                tx.send(AgentMessage {
                    msg: Some(Up::OverlayKey(OverlayKey { public_key, epoch })),
                })
                .await
                .map_err(|_| SessionError::Closed)?;
            }
            Ok(()) = copies_rx.changed() => {
                let names = copies_rx.borrow_and_update().iter().cloned().collect();
                tx.send(AgentMessage { msg: Some(Up::VolumeCopies(VolumeCopies { names })) })
                    .await
                    .map_err(|_| SessionError::Closed)?;
            }
            _ = heartbeat.tick() => {
                // Each round of samples rides on one heartbeat.
                let usage = match usage_rx.as_mut() {
                    Some(rx) if rx.has_changed().unwrap_or(false) => rx.borrow_and_update().clone(),
                    _ => Vec::new(),
                };
                tx.send(AgentMessage { msg: Some(Up::Heartbeat(Heartbeat { usage })) })
                    .await
                    .map_err(|_| SessionError::Closed)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "http://10.213.1.1:4243";
    const B: &str = "http://10.213.1.2:4243";
    const C: &str = "http://10.213.1.3:4243";

    fn assignment(id: &str, desired: rudder_model::TaskState) -> Assignment {
        let t = crate::task::fake::task(id);
        Assignment {
            task_id: id.into(),
            desired_state: crate::convert::task_state_to_wire(desired),
            task_json: rudder_model::wire::encode("task", &t).unwrap(),
        }
    }

    fn ids(a: &Assigned) -> Vec<(String, rudder_model::TaskState)> {
        let mut v: Vec<_> = a
            .tasks()
            .into_iter()
            .map(|t| (t.id, t.desired_state))
            .collect();
        v.sort();
        v
    }

    /// A whole set replaces what the session held; a changes-only set adds, replaces and
    /// removes; an unreadable task is dropped (as from a whole set); too many end the session.
    #[test]
    fn assignments_merge_whole_sets_and_changes() {
        use rudder_model::TaskState::{Running, Shutdown};
        let mut a = Assigned::default();
        let whole = |tasks| Assignments {
            tasks,
            changes_only: false,
            removed: vec![],
        };
        a.apply(&whole(vec![
            assignment("t1", Running),
            assignment("t2", Running),
        ]))
        .unwrap();
        assert_eq!(ids(&a), [("t1".into(), Running), ("t2".into(), Running)]);
        a.apply(&Assignments {
            tasks: vec![assignment("t3", Running), assignment("t1", Shutdown)],
            changes_only: true,
            removed: vec!["t2".into(), "never-held".into()],
        })
        .unwrap();
        assert_eq!(ids(&a), [("t1".into(), Shutdown), ("t3".into(), Running)]);
        let mut bad = assignment("t3", Running);
        bad.task_json = "{not json".into();
        a.apply(&Assignments {
            tasks: vec![bad],
            changes_only: true,
            removed: vec![],
        })
        .unwrap();
        assert_eq!(ids(&a), [("t1".into(), Shutdown)]);
        a.apply(&whole(vec![assignment("t9", Running)])).unwrap();
        assert_eq!(ids(&a), [("t9".into(), Running)]);
        // A controller cannot make the agent hold more than MAX_ASSIGNED by sending changes.
        let mut big = Assigned::default();
        for i in 0..MAX_ASSIGNED {
            big.tasks
                .insert(format!("x{i}"), crate::task::fake::task("x"));
        }
        let err = big
            .apply(&Assignments {
                tasks: vec![assignment("one-more", Running)],
                changes_only: true,
                removed: vec![],
            })
            .unwrap_err();
        assert!(
            matches!(err, SessionError::TooManyTasks(_, MAX_ASSIGNED)),
            "{err}"
        );
    }

    fn three() -> Controllers {
        Controllers::new(vec![A.into(), B.into(), C.into()])
    }

    fn at_once(addr: &str) -> Next {
        Next {
            addr: addr.into(),
            delay: Duration::ZERO,
        }
    }

    fn after(addr: &str, ms: u64) -> Next {
        Next {
            addr: addr.into(),
            delay: Duration::from_millis(ms),
        }
    }

    #[test]
    fn parses_one_url_or_a_list() {
        assert_eq!(parse_controllers(A).unwrap(), vec![A]);
        assert_eq!(
            parse_controllers(&format!("{A}, {B},,{C}/")).unwrap(),
            vec![A, B, C]
        );
        assert_eq!(
            parse_controllers("10.213.1.1:4243,10.213.1.1:4243").unwrap(),
            vec![A]
        );
        assert!(matches!(
            parse_controllers(" , "),
            Err(SessionError::NoController)
        ));
        assert!(matches!(
            parse_controllers("http://bad host:1"),
            Err(SessionError::Address(..))
        ));
    }

    #[test]
    fn tries_each_controller_then_backs_off_doubling_to_two_seconds() {
        let mut c = three();
        assert_eq!(c.first().as_deref(), Some(A));
        assert_eq!(c.next(A, None), at_once(B));
        assert_eq!(c.next(B, None), at_once(C));
        assert_eq!(c.next(C, None), after(A, 100));
        assert_eq!(c.next(A, None), at_once(B));
        assert_eq!(c.next(B, None), at_once(C));
        assert_eq!(c.next(C, None), after(A, 200));
        for _ in 0..3 {
            c.next(A, None);
            c.next(B, None);
            c.next(C, None);
        }
        c.next(A, None);
        c.next(B, None);
        assert_eq!(c.next(C, None), after(A, 2000));
    }

    #[test]
    fn a_single_controller_backs_off_after_every_failure() {
        let mut c = Controllers::new(vec![A.into()]);
        assert_eq!(c.next(A, None), after(A, 100));
        assert_eq!(c.next(A, None), after(A, 200));
        assert_eq!(c.next(A, None), after(A, 400));
    }

    #[test]
    fn follows_the_leader_hint_at_once() {
        let mut c = three();
        assert_eq!(c.next(A, Some("10.213.1.3:4243")), at_once(C));
        // The hint need not be in the list.
        let mut c = three();
        assert_eq!(
            c.next(A, Some("10.213.1.9:4243")),
            at_once("http://10.213.1.9:4243")
        );
        // That one failing without a hint: back to the start of the list.
        assert_eq!(c.next("http://10.213.1.9:4243", None), at_once(A));
    }

    #[test]
    fn a_hint_naming_the_refuser_itself_is_ignored() {
        let mut c = three();
        assert_eq!(c.next(B, Some("10.213.1.2:4243")), at_once(C));
    }

    #[test]
    fn stale_hints_cannot_loop_without_a_pause() {
        let mut c = three();
        // A and B each name the other as leader.
        assert_eq!(c.next(A, Some("10.213.1.2:4243")), at_once(B));
        assert_eq!(c.next(B, Some("10.213.1.1:4243")), at_once(A));
        assert_eq!(c.next(A, Some("10.213.1.2:4243")), at_once(B));
        // Three hops in a row: the next step is the list's, and a round has failed.
        assert_eq!(c.next(B, Some("10.213.1.1:4243")), after(C, 100));
    }

    #[test]
    fn a_welcome_adds_controllers_and_resets_the_backoff() {
        let mut c = Controllers::new(vec![A.into()]);
        assert_eq!(c.next(A, None), after(A, 100));
        assert_eq!(c.next(A, None), after(A, 200));
        c.welcomed(&["10.213.1.1:4243".into(), "10.213.1.2:4243".into()]);
        assert_eq!(c.addrs(), vec![A, B]);
        // The leader's session ends: its peer next, and a pause only after both failed.
        assert_eq!(c.next(A, None), at_once(B));
        assert_eq!(c.next(B, None), after(A, 100));
        // A later welcome replaces what was learnt; configured addresses stay.
        c.welcomed(&["10.213.1.3:4243".into()]);
        assert_eq!(c.addrs(), vec![A, C]);
    }

    #[test]
    fn learnt_addresses_take_the_configured_scheme() {
        let mut c = Controllers::new(vec!["https://10.213.1.1:4243".into()]);
        c.welcomed(&["10.213.1.2:4243".into()]);
        assert_eq!(
            c.addrs(),
            vec!["https://10.213.1.1:4243", "https://10.213.1.2:4243"]
        );
    }

    #[test]
    fn the_hint_is_read_from_the_refusal_metadata() {
        let mut s = tonic::Status::unavailable("this controller is not the leader");
        assert_eq!(SessionError::Status(s.clone()).leader_hint(), None);
        s.metadata_mut()
            .insert(LEADER_METADATA, "10.213.1.2:4243".parse().unwrap());
        assert_eq!(
            SessionError::Status(s).leader_hint(),
            Some("10.213.1.2:4243")
        );
        assert_eq!(SessionError::Closed.leader_hint(), None);
    }

    /// Fake controllers on loopback: a follower refusing with a leader hint, leaders that
    /// welcome and then keep or end the session. Checks the hint survives the wire and that
    /// addresses learnt from a welcome are dialled.
    mod wire {
        use std::pin::Pin;

        use rudder_proto::v1::dispatcher_server::{Dispatcher, DispatcherServer};
        use tokio_stream::{Stream, StreamExt};
        use tonic::{Request, Response, Status, Streaming};

        use super::*;

        type Seen = mpsc::UnboundedSender<(u16, AgentMessage)>;

        struct Fake {
            port: u16,
            /// Refuse, naming this leader.
            refuse_for: Option<String>,
            welcome: Vec<String>,
            /// End the session right after the welcome (leadership moved).
            end: bool,
            seen: Seen,
        }

        type DownStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

        #[tonic::async_trait]
        impl Dispatcher for Fake {
            type SessionStream = DownStream;

            async fn session(
                &self,
                req: Request<Streaming<AgentMessage>>,
            ) -> Result<Response<DownStream>, Status> {
                if let Some(leader) = &self.refuse_for {
                    let mut s = Status::unavailable("this controller is not the leader");
                    s.metadata_mut()
                        .insert(LEADER_METADATA, leader.parse().unwrap());
                    return Err(s);
                }
                let mut up = req.into_inner();
                let (seen, port) = (self.seen.clone(), self.port);
                tokio::spawn(async move {
                    while let Ok(Some(m)) = up.message().await {
                        let _ = seen.send((port, m));
                    }
                });
                let welcome = Ok(ControllerMessage {
                    msg: Some(Down::Welcome(Welcome {
                        heartbeat_period_ms: 100,
                        registry: "127.0.0.1:5000".into(),
                        controllers: self.welcome.clone(),
                    })),
                });
                let first = tokio_stream::iter(vec![welcome]);
                Ok(Response::new(if self.end {
                    Box::pin(first)
                } else {
                    Box::pin(first.chain(tokio_stream::pending()))
                }))
            }

            async fn leave(
                &self,
                _req: Request<rudder_proto::v1::LeaveRequest>,
            ) -> Result<Response<rudder_proto::v1::LeaveResponse>, Status> {
                Err(Status::unimplemented("the agent's sessions never leave"))
            }
        }

        async fn listener() -> (tokio::net::TcpListener, u16) {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            (l, port)
        }

        fn serve(l: tokio::net::TcpListener, fake: Fake) {
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(DispatcherServer::new(fake))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
            );
        }

        fn agent(dir: &std::path::Path, controllers: Vec<String>) -> tokio::task::JoinHandle<()> {
            let (status_tx, status_rx) = mpsc::unbounded_channel();
            let worker = Worker::new(crate::worker::Ctx::on_host(crate::worker::Host {
                containers: dir.join("containers"),
                images: rudder_image::store::ImageStore::open(&dir.join("images")).unwrap(),
                runtime: Arc::new(
                    crate::runtime::OciCliRuntime::new(crate::shim::RuntimeCli::new(
                        "true",
                        dir.join("runc"),
                    ))
                    .unwrap(),
                ),
                cgroup_parent: "/rudder-test".into(),
                registry: std::sync::Mutex::new(String::new()),
                registry_tls: None,
                status_tx,
                overlay: None,
                volumes: crate::volume::Volumes::new(dir.join("volumes"), "h1".into()),
                secrets: Default::default(),
            }));
            let me = Identity {
                node_id: "n1".into(),
                hostname: "h1".into(),
                addr: "127.0.0.1:4245".into(),
                cpus_milli: 1000,
                memory_bytes: 1 << 30,
                role: "worker".into(),
                labels: Default::default(),
                tls: None,
                data_dir: None,
                trusted: None,
                usage: None,
                features: features(),
            };
            tokio::spawn(run(controllers, me, worker, status_rx))
        }

        /// The port of the first controller the agent registered with.
        async fn registered(rx: &mut mpsc::UnboundedReceiver<(u16, AgentMessage)>) -> u16 {
            loop {
                let (port, m) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("no registration within 10 s")
                    .unwrap();
                if matches!(m.msg, Some(Up::Register(_))) {
                    return port;
                }
            }
        }

        #[tokio::test]
        async fn a_refusal_leads_to_the_leader() {
            let dir = tempfile::tempdir().unwrap();
            let (seen, mut rx) = mpsc::unbounded_channel();
            let (ll, leader) = listener().await;
            let (fl, follower) = listener().await;
            serve(
                ll,
                Fake {
                    port: leader,
                    refuse_for: None,
                    welcome: vec![],
                    end: false,
                    seen: seen.clone(),
                },
            );
            serve(
                fl,
                Fake {
                    port: follower,
                    refuse_for: Some(format!("127.0.0.1:{leader}")),
                    welcome: vec![],
                    end: false,
                    seen,
                },
            );
            let a = agent(dir.path(), vec![format!("http://127.0.0.1:{follower}")]);
            assert_eq!(registered(&mut rx).await, leader);
            a.abort();
        }

        #[tokio::test]
        async fn a_lost_leader_sends_the_agent_to_a_controller_it_learnt() {
            let dir = tempfile::tempdir().unwrap();
            let (seen, mut rx) = mpsc::unbounded_channel();
            let (l1, first) = listener().await;
            let (l2, second) = listener().await;
            let both = vec![format!("127.0.0.1:{first}"), format!("127.0.0.1:{second}")];
            serve(
                l1,
                Fake {
                    port: first,
                    refuse_for: None,
                    welcome: both.clone(),
                    end: true,
                    seen: seen.clone(),
                },
            );
            serve(
                l2,
                Fake {
                    port: second,
                    refuse_for: None,
                    welcome: both,
                    end: false,
                    seen,
                },
            );
            let a = agent(dir.path(), vec![format!("http://127.0.0.1:{first}")]);
            assert_eq!(registered(&mut rx).await, first);
            assert_eq!(registered(&mut rx).await, second);
            a.abort();
        }
    }
}

//! The controller's Prometheus metrics, served at `/metrics` by `rudder_pki::scrape`.
//!
//! Two kinds:
//! - **state families** ([`state_families`]): nodes, tasks, services, replicas, rollouts and
//!   raft status, computed at scrape time from the committed store by a pure function, so
//!   they are exactly what the store says and every controller (leader or not) reports the
//!   same cluster state;
//! - **instruments** ([`RaftMetrics`], [`RegistryMetrics`], the scheduling-delay histogram of
//!   [`ControllerMetrics`]): latencies and byte counts observed as they happen, which no
//!   store holds. They live as long as the process and only grow (counters, histograms).
//!
//! Names: prefix `rudder_`, a subsystem (`manager`, `raft`, `registry`), base units in the
//! name (`_seconds`, `_bytes`), `_total` only on counters (added by the encoder), states as
//! labels.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use rudder_model::node::{Availability, NodeRole, NodeState};
use rudder_model::update::UpdateState;
use rudder_model::{Store, TaskState};

use crate::raft_node::RaftStatus;

/// Label pairs of one series.
type Labels = Vec<(String, String)>;

/// Every task state, for the label values a dashboard can rely on.
const TASK_STATES: [TaskState; 10] = [
    TaskState::New,
    TaskState::Pending,
    TaskState::Assigned,
    TaskState::Preparing,
    TaskState::Starting,
    TaskState::Running,
    TaskState::Complete,
    TaskState::Failed,
    TaskState::Shutdown,
    TaskState::Rejected,
];

/// Every rollout state.
const ROLLOUT_STATES: [UpdateState; 6] = [
    UpdateState::Updating,
    UpdateState::Paused,
    UpdateState::Completed,
    UpdateState::RollbackStarted,
    UpdateState::RollbackPaused,
    UpdateState::RollbackCompleted,
];

fn node_state(s: &NodeState) -> &'static str {
    match s {
        NodeState::Ready => "ready",
        NodeState::Down => "down",
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

/// Registers the families derived from the committed `store` and this controller's raft
/// `status` into `reg`. Pure: same inputs, same text.
pub fn state_families(store: &Store, status: &RaftStatus, reg: &mut Registry) {
    // Nodes: every combination of state, role and availability, zeros included, so a
    // dashboard sees "0 down" rather than no series.
    let nodes = gauge_family(
        reg,
        "rudder_manager_nodes",
        "Nodes in the store by state, role and availability",
    );
    let mut counts: BTreeMap<(&str, &str, &str), i64> = BTreeMap::new();
    for state in [NodeState::Ready, NodeState::Down] {
        for role in [NodeRole::Worker, NodeRole::Manager] {
            for av in [
                Availability::Active,
                Availability::Pause,
                Availability::Drain,
            ] {
                counts.insert((node_state(&state), role.as_str(), av.as_str()), 0);
            }
        }
    }
    for n in store.nodes.values() {
        *counts
            .entry((
                node_state(&n.state),
                n.role.as_str(),
                n.availability.as_str(),
            ))
            .or_default() += 1;
    }
    for ((state, role, av), n) in counts {
        nodes
            .get_or_create(&labels(&[
                ("state", state),
                ("role", role),
                ("availability", av),
            ]))
            .set(n);
    }

    // Tasks by service and observed state; every state of every service, zeros included.
    let tasks = gauge_family(
        reg,
        "rudder_manager_tasks",
        "Tasks in the store by service and observed state",
    );
    let mut by_service: BTreeMap<&str, BTreeMap<&str, i64>> = BTreeMap::new();
    for s in store.services.values() {
        by_service.entry(s.spec.name.as_str()).or_default();
    }
    for t in store.tasks.values() {
        *by_service
            .entry(t.service_name.as_str())
            .or_default()
            .entry(t.status.state.as_str())
            .or_default() += 1;
    }
    for (service, states) in &by_service {
        for st in TASK_STATES {
            let n = states.get(st.as_str()).copied().unwrap_or(0);
            tasks
                .get_or_create(&labels(&[("service", service), ("state", st.as_str())]))
                .set(n);
        }
    }

    // Replicas and rollouts per service.
    let desired = gauge_family(
        reg,
        "rudder_manager_service_desired_replicas",
        "Tasks a service should run: its replica count, or for a global service the tasks \
         the controller wants running",
    );
    let running = gauge_family(
        reg,
        "rudder_manager_service_running_replicas",
        "Tasks of a service that run and are meant to",
    );
    let rollout = gauge_family(
        reg,
        "rudder_manager_service_rollout",
        "1 for the state of a service's latest rollout, 0 for the others",
    );
    let services = gauge_family(
        reg,
        "rudder_manager_services",
        "Services in the store by mode",
    );
    let mut modes: BTreeMap<String, i64> = BTreeMap::new();
    // One pass over the tasks: (meant to run, meant to and running) per service id.
    let mut replicas: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for t in store.tasks.values() {
        if t.desired_state == TaskState::Running {
            let r = replicas.entry(t.service_id.as_str()).or_default();
            r.0 += 1;
            r.1 += i64::from(t.status.state == TaskState::Running);
        }
    }
    for s in store.services.values() {
        let name = s.spec.name.as_str();
        let mode = serde_json::to_value(s.spec.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        *modes.entry(mode.clone()).or_default() += 1;
        let (wanted, up) = replicas.get(s.id.as_str()).copied().unwrap_or_default();
        let want = if s.spec.mode.is_global() {
            wanted
        } else {
            i64::try_from(s.spec.replicas).unwrap_or(i64::MAX)
        };
        desired
            .get_or_create(&labels(&[("service", name), ("mode", &mode)]))
            .set(want);
        running.get_or_create(&labels(&[("service", name)])).set(up);
        let current = s.update_status.as_ref().map(|u| u.state);
        for st in ROLLOUT_STATES {
            rollout
                .get_or_create(&labels(&[("service", name), ("state", st.as_str())]))
                .set(i64::from(current == Some(st)));
        }
    }
    for (mode, n) in modes {
        services.get_or_create(&labels(&[("mode", &mode)])).set(n);
    }

    // Raft, as this controller sees it.
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        reg.register(name, help, g);
    };
    gauge(
        reg,
        "rudder_raft_leader",
        "1 if this controller leads the raft group, else 0",
        u64::from(status.is_leader),
    );
    gauge(
        reg,
        "rudder_raft_has_leader",
        "1 if this controller knows a leader, else 0",
        u64::from(status.leader_id != 0),
    );
    gauge(
        reg,
        "rudder_raft_term",
        "The current raft term",
        status.term,
    );
    gauge(
        reg,
        "rudder_raft_applied_index",
        "The last log index applied to this controller's store",
        status.applied,
    );
    gauge(
        reg,
        "rudder_raft_voters",
        "Voting members of the raft group",
        status.voters.len() as u64,
    );
    gauge(
        reg,
        "rudder_raft_learners",
        "Non-voting members of the raft group",
        status.learners.len() as u64,
    );
}

/// Latencies and log size the raft loop observes.
#[derive(Clone, Debug)]
pub struct RaftMetrics {
    /// From a proposal's submission to its application here (forwarding included).
    pub propose_seconds: Histogram,
    /// Applying one committed command to the store.
    pub apply_seconds: Histogram,
    /// Entries in the log (since the last compaction).
    pub log_entries: Gauge,
    /// Bytes of entries applied since the last snapshot.
    pub log_since_snapshot_bytes: Gauge,
}

impl Default for RaftMetrics {
    fn default() -> Self {
        Self {
            // 0.5 ms .. ~16 s.
            propose_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            // 1 µs .. ~33 ms: applying is a map update.
            apply_seconds: Histogram::new(exponential_buckets(0.000_001, 2.0, 16)),
            log_entries: Gauge::default(),
            log_since_snapshot_bytes: Gauge::default(),
        }
    }
}

impl RaftMetrics {
    fn register(&self, reg: &mut Registry) {
        reg.register(
            "rudder_raft_propose_seconds",
            "Time from submitting a proposal to its application on this controller",
            self.propose_seconds.clone(),
        );
        reg.register(
            "rudder_raft_apply_seconds",
            "Time to apply one committed command to the store",
            self.apply_seconds.clone(),
        );
        reg.register(
            "rudder_raft_log_entries",
            "Entries in the raft log since its last compaction",
            self.log_entries.clone(),
        );
        reg.register(
            "rudder_raft_log_since_snapshot_bytes",
            "Bytes of log entries applied since the last snapshot",
            self.log_since_snapshot_bytes.clone(),
        );
    }
}

/// Bytes the registry moved, counted as its request and response bodies pass.
#[derive(Clone, Debug, Default)]
pub struct RegistryMetrics {
    /// Request bodies (pushes: blob uploads and manifests).
    pub received_bytes: Counter,
    /// Response bodies (pulls).
    pub sent_bytes: Counter,
}

impl RegistryMetrics {
    fn register(&self, reg: &mut Registry) {
        reg.register(
            "rudder_registry_received_bytes",
            "Bytes of request bodies the registry received (pushes)",
            self.received_bytes.clone(),
        );
        reg.register(
            "rudder_registry_sent_bytes",
            "Bytes of response bodies the registry sent (pulls)",
            self.sent_bytes.clone(),
        );
    }
}

/// Counts the body bytes of every registry request and response (an axum middleware).
pub async fn count_registry_bytes(
    axum::extract::State(m): axum::extract::State<Arc<RegistryMetrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use http_body_util::BodyExt;
    let counting = |c: Counter| {
        move |frame: http_body::Frame<bytes::Bytes>| {
            if let Some(d) = frame.data_ref() {
                c.inc_by(d.len() as u64);
            }
            frame
        }
    };
    let (parts, body) = req.into_parts();
    let body = axum::body::Body::new(body.map_frame(counting(m.received_bytes.clone())));
    let resp = next
        .run(axum::extract::Request::from_parts(parts, body))
        .await;
    let (parts, body) = resp.into_parts();
    let body = axum::body::Body::new(body.map_frame(counting(m.sent_bytes.clone())));
    axum::response::Response::from_parts(parts, body)
}

/// Everything the controller's `/metrics` serves, and the instruments the rest of it records
/// into. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    /// The raft loop's.
    pub raft: Arc<RaftMetrics>,
    /// The registry's.
    pub registry: Arc<RegistryMetrics>,
    /// From a task's creation (pending) to its first `running` report.
    pub scheduling_delay_seconds: Histogram,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self {
            raft: Default::default(),
            registry: Default::default(),
            // 50 ms .. ~27 min: image pulls can take minutes.
            scheduling_delay_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
        }
    }
}

impl ControllerMetrics {
    /// The exposition text: the state families of `store`/`status` and the instruments.
    pub fn render(&self, store: &Store, status: &RaftStatus) -> String {
        let mut reg = Registry::default();
        state_families(store, status, &mut reg);
        self.raft.register(&mut reg);
        self.registry.register(&mut reg);
        reg.register(
            "rudder_manager_scheduling_delay_seconds",
            "Time from a task's creation (pending) to its first running report",
            self.scheduling_delay_seconds.clone(),
        );
        encode(&reg)
    }
}

/// The Prometheus text (0.0.4) of `reg`.
pub fn encode(reg: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, reg);
    out
}

/// Observes the scheduling delay of tasks as they first reach `running`, from the committed
/// store (the leader's creation stamp, the node's running stamp). Tasks already running when
/// this starts are history: not observed again after a restart.
///
/// Each published store is compared with the previous one through the maps' own diff, which
/// skips what they share: the cost is what changed. (It used to walk every task and look each
/// one up in a set of those seen, on every controller after every applied batch: at 1,000
/// hosts and 30,000 tasks that was the largest share of all three controllers' CPU, and the
/// scheduling delay it measures grew with it; issue 20.)
pub async fn observe_scheduling(raft: crate::raft_node::RaftHandle, m: ControllerMetrics) {
    let mut rx = raft.watch_store();
    let mut prev = rx.borrow_and_update().clone();
    while rx.changed().await.is_ok() {
        let store = rx.borrow_and_update().clone();
        for secs in newly_running(&prev, &store) {
            m.scheduling_delay_seconds.observe(secs);
        }
        prev = store;
    }
}

/// The delays, in seconds, of the tasks that reached running between `old` and `new` (0 when
/// the node's clock is behind the leader's). A task counts once: when its `running_at` is first
/// set. Pure.
pub fn newly_running(old: &Store, new: &Store) -> Vec<f64> {
    use imbl::ordmap::DiffItem;
    let delay = |t: &rudder_model::Task| {
        t.running_at
            .map(|at| at.saturating_sub(t.created_at) as f64 / 1000.0)
    };
    old.tasks
        .diff(&new.tasks)
        .filter_map(|d| match d {
            DiffItem::Add(_, t) => delay(t),
            DiffItem::Update {
                old: (_, a),
                new: (_, b),
            } if a.running_at.is_none() => delay(b),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::node::Node;
    use rudder_model::store::{Service, Task, TaskStatus};
    use rudder_model::update::UpdateStatus;

    fn node(id: &str, state: NodeState, role: NodeRole, av: Availability) -> Node {
        Node {
            id: id.into(),
            hostname: id.into(),
            addr: String::new(),
            labels: Default::default(),
            role,
            availability: av,
            resources: Default::default(),
            state,
            updated_at: 0,
            version: 0,
            controller_id: None,
            host_labels: Default::default(),
            overlay_key: String::new(),
            cert_not_after: 0,
        }
    }

    fn spec(name: &str, replicas: u64) -> serde_json::Value {
        serde_json::json!({"name": name, "image": "busybox:latest", "replicas": replicas})
    }

    fn service(id: &str, name: &str, replicas: u64, rollout: Option<UpdateState>) -> Service {
        let mut s: Service = serde_json::from_value(serde_json::json!({
            "id": id, "spec": spec(name, replicas), "spec_version": 1, "created_at": 0,
            "updated_at": 0, "version": 1,
        }))
        .unwrap();
        s.update_status = rollout.map(|state| UpdateStatus {
            state,
            message: String::new(),
            started_at: 0,
            completed_at: None,
        });
        s
    }

    fn task(id: &str, svc: &Service, desired: TaskState, state: TaskState) -> Task {
        let mut t: Task = serde_json::from_value(serde_json::json!({
            "id": id, "service_id": svc.id, "service_name": svc.spec.name, "slot": 1,
            "spec": svc.spec, "spec_version": 1, "desired_state": desired,
            "status": {"state": state, "message": "", "error": "", "container_id": "",
                       "timestamp": 0},
            "created_at": 1_000, "version": 1,
        }))
        .unwrap();
        t.status = TaskStatus { state, ..t.status };
        t
    }

    fn render(store: &Store, status: &RaftStatus) -> String {
        let mut reg = Registry::default();
        state_families(store, status, &mut reg);
        encode(&reg)
    }

    fn store() -> Store {
        let mut s = Store::default();
        for n in [
            node(
                "a",
                NodeState::Ready,
                NodeRole::Manager,
                Availability::Active,
            ),
            node(
                "b",
                NodeState::Ready,
                NodeRole::Worker,
                Availability::Active,
            ),
            node("c", NodeState::Down, NodeRole::Worker, Availability::Drain),
        ] {
            s.nodes.insert(n.id.clone(), n);
        }
        let web = service("s1", "web", 3, Some(UpdateState::Updating));
        let db = service("s2", "db", 1, None);
        let mut mon = service("s3", "mon", 0, None);
        mon.spec.mode = rudder_model::spec::ServiceMode::Global;
        for t in [
            task("t1", &web, TaskState::Running, TaskState::Running),
            task("t2", &web, TaskState::Running, TaskState::Running),
            task("t3", &web, TaskState::Running, TaskState::Pending),
            task("t4", &web, TaskState::Shutdown, TaskState::Running),
            task("t5", &db, TaskState::Running, TaskState::Failed),
            task("t6", &mon, TaskState::Running, TaskState::Running),
            task("t7", &mon, TaskState::Running, TaskState::Preparing),
        ] {
            s.tasks.insert(t.id.clone(), t);
        }
        s.services.insert(web.id.clone(), web);
        s.services.insert(db.id.clone(), db);
        s.services.insert(mon.id.clone(), mon);
        s
    }

    #[test]
    fn families_from_the_store() {
        let status = RaftStatus {
            id: 1,
            leader_id: 1,
            term: 7,
            applied: 42,
            is_leader: true,
            voters: vec![1, 2, 3],
            learners: vec![],
        };
        let text = render(&store(), &status);
        let cases = [
            (r#"rudder_manager_nodes{state="ready",role="manager",availability="active"} 1"#),
            (r#"rudder_manager_nodes{state="ready",role="worker",availability="active"} 1"#),
            (r#"rudder_manager_nodes{state="down",role="worker",availability="drain"} 1"#),
            (r#"rudder_manager_nodes{state="down",role="manager",availability="pause"} 0"#),
            (r#"rudder_manager_tasks{service="web",state="running"} 3"#),
            (r#"rudder_manager_tasks{service="web",state="pending"} 1"#),
            (r#"rudder_manager_tasks{service="web",state="failed"} 0"#),
            (r#"rudder_manager_tasks{service="db",state="failed"} 1"#),
            (r#"rudder_manager_service_desired_replicas{service="web",mode="replicated"} 3"#),
            (r#"rudder_manager_service_running_replicas{service="web"} 2"#),
            (r#"rudder_manager_service_running_replicas{service="db"} 0"#),
            (r#"rudder_manager_service_rollout{service="web",state="updating"} 1"#),
            (r#"rudder_manager_service_rollout{service="web",state="paused"} 0"#),
            (r#"rudder_manager_service_rollout{service="db",state="updating"} 0"#),
            (r#"rudder_manager_services{mode="replicated"} 2"#),
            (r#"rudder_manager_services{mode="global"} 1"#),
            (r#"rudder_manager_service_desired_replicas{service="mon",mode="global"} 2"#),
            (r#"rudder_manager_service_running_replicas{service="mon"} 1"#),
            ("rudder_raft_leader 1"),
            ("rudder_raft_has_leader 1"),
            ("rudder_raft_term 7"),
            ("rudder_raft_applied_index 42"),
            ("rudder_raft_voters 3"),
            ("# TYPE rudder_manager_nodes gauge"),
        ];
        for want in cases {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
        // States are labels, never part of a name; no counter here, so no `_total`.
        assert!(!text.contains("_total"), "{text}");
    }

    #[test]
    fn an_empty_store_still_has_every_family() {
        let text = render(&Store::default(), &RaftStatus::default());
        for name in [
            "rudder_manager_nodes{",
            "rudder_raft_leader 0",
            "rudder_raft_term 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(!text.contains("rudder_manager_tasks{"), "{text}");
    }

    #[test]
    fn instruments_are_rendered_with_units_and_totals() {
        let m = ControllerMetrics::default();
        m.registry.received_bytes.inc_by(10);
        m.raft.propose_seconds.observe(0.002);
        m.scheduling_delay_seconds.observe(1.5);
        let text = m.render(&Store::default(), &RaftStatus::default());
        for want in [
            "rudder_registry_received_bytes_total 10",
            "rudder_registry_sent_bytes_total 0",
            "# TYPE rudder_raft_propose_seconds histogram",
            "rudder_raft_propose_seconds_count 1",
            "rudder_manager_scheduling_delay_seconds_count 1",
            "rudder_manager_scheduling_delay_seconds_sum 1.5",
            "rudder_raft_log_entries 0",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
    }

    #[test]
    fn scheduling_delay_counts_each_task_once() {
        let s = store();
        assert!(newly_running(&s, &s).is_empty());
        let mut next = s.clone();
        next.tasks.get_mut("t1").unwrap().running_at = Some(3_500);
        assert_eq!(newly_running(&s, &next), vec![2.5]);
        // Already running: a later change to the task is not a second start.
        let mut later = next.clone();
        later.tasks.get_mut("t1").unwrap().status.message = "still".into();
        assert!(newly_running(&next, &later).is_empty());
        // A node clock behind the leader's: no negative delay.
        later.tasks.get_mut("t2").unwrap().running_at = Some(10);
        assert_eq!(newly_running(&next, &later), vec![0.0]);
        // A task that arrives already running (a snapshot installed) counts once too.
        let mut fresh = Store::default();
        fresh.tasks.insert("t1".into(), next.tasks["t1"].clone());
        assert_eq!(newly_running(&Store::default(), &fresh), vec![2.5]);
    }
}

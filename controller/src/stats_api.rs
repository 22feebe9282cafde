//! Usage of tasks in the Control API.
//!
//! `StatsStream` (`rctl stats`): live usage read by the tasks' hosts. The request's targets
//! are resolved against the store ([`select`]); each host with selected running tasks is
//! asked for a stream of their samples (`AgentApi.TaskStats`, mutual TLS as every relay);
//! a [`Merger`] (pure) keeps each task's latest sample and makes the frame sent to the
//! caller every interval, with every selected task (a row without a sample says so).
//! Bounds: at most [`MAX_TARGETS`] targets and [`MAX_TASKS`] rows; the caller's stream
//! holds at most [`CLIENT_BACKLOG`] frames, past which the caller is dropped (and with it the
//! hosts' streams): a reader that stops reading never grows this controller's memory.
//!
//! `Top` (`rctl top`): the processes of one running task, asked of its host.
//!
//! `Stats` (the leader's usage book, which the autoscaler decides on) and the autoscaler's
//! part of service summaries: the latest heartbeat sample per running task, and the recorded
//! scale decisions in wire form.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use rudder_model::{Store, Task, TaskState};
use rudder_proto::v1::{
    AutoscaleDecision, LiveTaskStats, StatsFrame, StatsResponse, StatsStreamRequest, TaskStats,
    TaskStatsRequest, TaskTopRequest, TopRequest, TopResponse,
};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{debug, info};

use crate::agents::AgentAt;
use crate::context::ApiContext;

use crate::raft_node::RaftHandle;
use crate::usage::UsageBook;

/// The latest sample of each running task of `service` (every service when empty). Samples
/// reach only the leader: a follower says so rather than answer with nothing.
pub fn stats(
    raft: &RaftHandle,
    book: &UsageBook,
    service: &str,
    now: u64,
) -> Result<StatsResponse, Status> {
    if !raft.status().is_leader {
        return Err(Status::failed_precondition(
            "usage samples are kept by the leader only: ask the leader (rctl cluster info)",
        ));
    }
    let store = raft.store();
    if !service.is_empty() {
        crate::resolve::find_service(&store, service)?;
    }
    Ok(StatsResponse {
        tasks: running(&store, service)
            .filter_map(|t| {
                let s = book.latest(&t.id)?;
                let node = t
                    .node_id
                    .as_ref()
                    .and_then(|n| store.nodes.get(n))
                    .map(|n| n.hostname.clone())
                    .unwrap_or_default();
                Some(TaskStats {
                    task_id: t.id.clone(),
                    name: t.name(),
                    node,
                    cpu_milli: s.cpu_millis,
                    memory_bytes: s.memory_bytes,
                    age_ms: now.saturating_sub(s.at),
                })
            })
            .collect(),
    })
}

fn running<'a>(store: &'a Store, service: &'a str) -> impl Iterator<Item = &'a rudder_model::Task> {
    store.tasks.values().filter(move |t| {
        (service.is_empty() || t.service_name == service)
            && t.desired_state == TaskState::Running
            && t.status.state == TaskState::Running
    })
}

/// A service's recorded decisions, oldest first, for its summary.
pub fn decisions(svc: &rudder_model::Service) -> Vec<AutoscaleDecision> {
    svc.autoscale_decisions
        .iter()
        .map(|d| AutoscaleDecision {
            at_ms: d.at,
            from: d.from,
            to: d.to,
            reason: d.reason.clone(),
        })
        .collect()
}

/// The most targets one request may name.
pub const MAX_TARGETS: usize = 256;
/// The most tasks one stream shows (more are left out, with a warning).
pub const MAX_TASKS: usize = 4096;
/// Frames held for a caller that does not read them; one more and it is dropped.
pub const CLIENT_BACKLOG: usize = 4;
/// How long the first frame waits for hosts that have not answered, past one interval.
const FIRST_FRAME_GRACE: Duration = Duration::from_secs(5);
/// How long a host may take to list a task's processes.
const TOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The tasks a stats request shows, sorted by name: those its targets name (services, or
/// tasks by id, id prefix, name, `SERVICE.SLOT`), every task when it names none; running
/// ones only unless `all`. Pure.
pub fn select<'a>(
    store: &'a Store,
    targets: &[String],
    all: bool,
) -> Result<Vec<&'a Task>, Status> {
    if targets.len() > MAX_TARGETS {
        return Err(Status::invalid_argument(format!(
            "stats: at most {MAX_TARGETS} services or tasks per request"
        )));
    }
    let mut picked: Vec<&Task> = if targets.is_empty() {
        store.tasks.values().collect()
    } else {
        let mut v = Vec::new();
        for t in targets {
            if t.is_empty() || t.len() > 256 {
                return Err(Status::invalid_argument("stats: empty or overlong name"));
            }
            let named = crate::resolve::resolve_tasks(store, t);
            if named.is_empty() {
                // `SERVICE.SLOT`, or a clear not-found.
                v.push(crate::resolve::one_task(store, t).map_err(|_| {
                    Status::not_found(format!("stats: no service or task named {t:?}"))
                })?);
            } else {
                v.extend(named);
            }
        }
        v
    };
    picked.retain(|t| all || (is_running(t)));
    picked.sort_by_key(|t| (t.name(), t.id.clone()));
    picked.dedup_by(|a, b| a.id == b.id);
    Ok(picked)
}

fn is_running(t: &Task) -> bool {
    t.status.state == TaskState::Running && t.desired_state == TaskState::Running
}

/// Each selected task's latest sample, from the streams of their hosts. Pure.
#[derive(Debug)]
pub struct Merger {
    /// One row per selected task, in order: the task's name, node and state filled in.
    rows: Vec<LiveTaskStats>,
    /// task id → index in `rows`, for tasks whose host is asked.
    asked: HashMap<String, usize>,
    /// Hosts that have not answered yet (node id).
    waiting: HashSet<String>,
    /// Hosts that could not be read: hostname → why.
    warnings: BTreeMap<String, String>,
}

impl Merger {
    /// Rows for `tasks`; returns the merger and, per node id, its agent and the task ids to
    /// ask it for. A running task with no known node is a row without a sample.
    pub fn new(
        store: &Store,
        tasks: &[&Task],
    ) -> (Merger, BTreeMap<String, (AgentAt, Vec<String>)>) {
        let mut m = Merger {
            rows: Vec::with_capacity(tasks.len()),
            asked: HashMap::new(),
            waiting: HashSet::new(),
            warnings: BTreeMap::new(),
        };
        let mut ask: BTreeMap<String, (AgentAt, Vec<String>)> = BTreeMap::new();
        for t in tasks {
            let node = t.node_id.as_ref().and_then(|n| store.nodes.get(n));
            m.rows.push(LiveTaskStats {
                task_id: t.id.clone(),
                name: t.name(),
                node: node.map(|n| n.hostname.clone()).unwrap_or_default(),
                state: t.status.state.as_str().to_string(),
                ..Default::default()
            });
            if let (true, Some(n)) = (is_running(t), node) {
                m.asked.insert(t.id.clone(), m.rows.len() - 1);
                ask.entry(n.id.clone())
                    .or_insert_with(|| (AgentAt::from(n), Vec::new()))
                    .1
                    .push(t.id.clone());
            }
        }
        m.waiting = ask.keys().cloned().collect();
        (m, ask)
    }

    /// A frame from node `node`'s host: its samples replace the ones before (a sample for a
    /// task not asked of it is ignored).
    pub fn frame(&mut self, node: &str, host: &str, frame: StatsFrame) {
        self.waiting.remove(node);
        self.warnings.remove(host);
        // A task its host no longer reads (it stopped): no sample now.
        let present: HashSet<&str> = frame.tasks.iter().map(|s| s.task_id.as_str()).collect();
        for &i in self.asked.values() {
            let row = &mut self.rows[i];
            if row.node == host && !present.contains(row.task_id.as_str()) {
                *row = LiveTaskStats {
                    task_id: std::mem::take(&mut row.task_id),
                    name: std::mem::take(&mut row.name),
                    node: std::mem::take(&mut row.node),
                    state: std::mem::take(&mut row.state),
                    ..Default::default()
                };
            }
        }
        for s in frame.tasks {
            let Some(&i) = self.asked.get(&s.task_id) else {
                continue;
            };
            let row = &mut self.rows[i];
            if row.node != host {
                continue;
            }
            *row = LiveTaskStats {
                task_id: std::mem::take(&mut row.task_id),
                name: std::mem::take(&mut row.name),
                node: std::mem::take(&mut row.node),
                state: std::mem::take(&mut row.state),
                sampled: true,
                ..s
            };
        }
    }

    /// Node `node`'s host failed or ended its stream (`why`, for the user).
    pub fn failed(&mut self, node: &str, host: &str, why: String) {
        self.waiting.remove(node);
        self.warnings.insert(host.to_string(), why);
    }

    /// Whether every asked host has answered (or failed).
    pub fn complete(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The frame to send now.
    pub fn snapshot(&self, extra: &[String]) -> StatsFrame {
        StatsFrame {
            tasks: self.rows.clone(),
            warnings: extra
                .iter()
                .cloned()
                .chain(self.warnings.iter().map(|(h, w)| format!("host {h}: {w}")))
                .collect(),
        }
    }
}

/// What a host's stream said.
enum FromHost {
    Frame(String, String, StatsFrame),
    Failed(String, String, String),
}

pub type FrameStream = Pin<Box<dyn Stream<Item = Result<StatsFrame, Status>> + Send>>;

/// `StatsStream`: see the module doc.
pub fn stats_stream(api: &ApiContext, req: StatsStreamRequest) -> Result<FrameStream, Status> {
    let interval = match req.interval_ms {
        0 => Duration::from_secs(1),
        ms => Duration::from_millis(u64::from(ms))
            .clamp(Duration::from_millis(500), Duration::from_secs(10)),
    };
    let store = api.raft.store();
    let mut tasks = select(&store, &req.targets, req.all)?;
    let mut extra = Vec::new();
    if tasks.len() > MAX_TASKS {
        extra.push(format!(
            "showing {MAX_TASKS} of {} tasks: name services or tasks to see others",
            tasks.len()
        ));
        tasks.truncate(MAX_TASKS);
    }
    let (mut merger, ask) = Merger::new(&store, &tasks);
    drop(store);
    let (host_tx, mut host_rx) = mpsc::channel::<FromHost>(64);
    for (node, (at, ids)) in ask {
        let (dialer, tx) = (api.agents.clone(), host_tx.clone());
        let host_req = TaskStatsRequest {
            task_ids: ids,
            interval_ms: interval.as_millis() as u32,
            once: req.once,
        };
        tokio::spawn(async move {
            let failed = |why: String| FromHost::Failed(node.clone(), at.host.clone(), why);
            let mut stream = match dialer.dial(&at).await {
                Ok(mut c) => match c.task_stats(host_req).await {
                    Ok(s) => s.into_inner(),
                    Err(s) => {
                        let _ = tx.send(failed(s.message().to_string())).await;
                        return;
                    }
                },
                Err(s) => {
                    let _ = tx.send(failed(s.message().to_string())).await;
                    return;
                }
            };
            loop {
                let msg = match stream.next().await {
                    Some(Ok(f)) => FromHost::Frame(node.clone(), at.host.clone(), f),
                    Some(Err(s)) => failed(s.message().to_string()),
                    None => break,
                };
                // The caller is gone: drop the host's stream too.
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(host_tx);
    let (out_tx, out_rx) = mpsc::channel(CLIENT_BACKLOG);
    let once = req.once;
    tokio::spawn(async move {
        let first_deadline = tokio::time::Instant::now() + interval + FIRST_FRAME_GRACE;
        let mut started = false;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hosts_open = true;
        loop {
            let send_now = tokio::select! {
                m = host_rx.recv(), if hosts_open => {
                    match m {
                        Some(FromHost::Frame(node, host, f)) => merger.frame(&node, &host, f),
                        Some(FromHost::Failed(node, host, why)) => merger.failed(&node, &host, why),
                        None => hosts_open = false,
                    }
                    // The first frame goes out as soon as every host has answered.
                    !started && merger.complete()
                }
                _ = tick.tick() => {
                    started || merger.complete() || tokio::time::Instant::now() >= first_deadline
                }
            };
            if !send_now {
                continue;
            }
            started = true;
            match out_tx.try_send(Ok(merger.snapshot(&extra))) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    info!("stats: a caller fell {CLIENT_BACKLOG} frames behind; dropped");
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    debug!("stats: the caller went away");
                    return;
                }
            }
            if once {
                return;
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
        out_rx,
    )))
}

/// `Top`: the processes of a running task, from its host.
pub async fn top(api: &ApiContext, req: TopRequest) -> Result<TopResponse, Status> {
    let store = api.raft.store();
    let (task, at) = crate::resolve::running_task(&store, &req.task)?;
    let (id, name) = (task.id.clone(), task.name());
    drop(store);
    let ask = async {
        let mut client = api.agents.dial_kept(&at, Some(TOP_TIMEOUT)).await?;
        client
            .task_top(TaskTopRequest {
                task_id: id.clone(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| crate::agents::relay_error(&at, &name, s))
    };
    let mut resp = tokio::time::timeout(TOP_TIMEOUT, ask).await.map_err(|_| {
        Status::deadline_exceeded(format!(
            "top: host {} ({}) did not answer within {TOP_TIMEOUT:?}",
            at.host, at.addr
        ))
    })??;
    resp.task_id = id;
    resp.name = name;
    resp.node = at.host;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::store::NodeResources;
    use rudder_model::{Command, ServiceSpec};
    use serde_json::json;

    /// Nodes n1 (h1), n2 (h2); service web: web.1 running on n1, web.2 running on n2, web.3
    /// failed; service api: api.1 running on n1.
    fn store() -> Store {
        let mut s = Store::default();
        for (i, n) in ["n1", "n2"].iter().enumerate() {
            s.apply(
                1 + i as u64,
                Command::PutNode {
                    id: n.to_string(),
                    hostname: format!("h{}", i + 1),
                    addr: format!("10.0.0.{}:1", i + 1),
                    labels: Default::default(),
                    role: Default::default(),
                    resources: NodeResources {
                        cpus: 1000,
                        memory: 1 << 30,
                    },
                    now: 1,
                    cert_not_after: 0,
                    host_labels: Default::default(),
                },
            )
            .unwrap();
        }
        let mut index = 3;
        let mut tasks = Vec::new();
        for (svc, slots) in [
            (
                "web",
                vec![
                    (1, "running", "n1"),
                    (2, "running", "n2"),
                    (3, "failed", "n1"),
                ],
            ),
            ("api", vec![(1, "running", "n1")]),
        ] {
            let spec: ServiceSpec =
                serde_json::from_value(json!({"name": svc, "image": "busybox"})).unwrap();
            s.apply(
                index,
                Command::PutService {
                    id: format!("{svc}-id"),
                    spec: Box::new(spec.clone()),
                    now: 0,
                },
            )
            .unwrap();
            index += 1;
            for (slot, state, node) in slots {
                tasks.push(
                    serde_json::from_value::<Task>(json!({
                        "id": format!("{svc}{slot}xxxx"), "service_id": format!("{svc}-id"),
                        "service_name": svc, "slot": slot, "spec": spec, "spec_version": 1,
                        "node_id": node, "desired_state": "running",
                        "status": {"state": state, "timestamp": 0}, "created_at": slot,
                        "version": 0,
                    }))
                    .unwrap(),
                );
            }
        }
        s.apply(index, Command::CreateTasks { tasks }).unwrap();
        s
    }

    fn names(tasks: &[&Task]) -> Vec<String> {
        tasks.iter().map(|t| t.name()).collect()
    }

    #[test]
    fn select_names_services_and_tasks() {
        let s = store();
        let sel = |targets: &[&str], all: bool| {
            let t: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
            select(&s, &t, all).map(|v| names(&v))
        };
        assert_eq!(
            sel(&[], false).unwrap(),
            ["api.1.api1xxxx", "web.1.web1xxxx", "web.2.web2xxxx"]
        );
        assert_eq!(sel(&["web"], true).unwrap().len(), 3);
        assert_eq!(
            sel(&["web.2", "web"], false).unwrap().len(),
            2,
            "no duplicates"
        );
        assert_eq!(sel(&["api1"], false).unwrap(), ["api.1.api1xxxx"]);
        let e = sel(&["nope"], false).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("no service or task named \"nope\""));
        let many = vec!["web"; MAX_TARGETS + 1];
        assert_eq!(
            sel(&many, false).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    fn sample(id: &str, cpu: f64) -> LiveTaskStats {
        LiveTaskStats {
            task_id: id.into(),
            cpu_percent: cpu,
            memory_bytes: 1,
            pids: 1,
            ..Default::default()
        }
    }

    #[test]
    fn the_merger_keeps_each_tasks_latest_sample_from_its_own_host() {
        let s = store();
        let tasks = select(&s, &[], true).unwrap();
        let (mut m, ask) = Merger::new(&s, &tasks);
        // The failed task is shown, not asked for.
        assert_eq!(ask.keys().collect::<Vec<_>>(), ["n1", "n2"]);
        assert_eq!(ask["n1"].1, ["api1xxxx", "web1xxxx"]);
        assert_eq!(ask["n2"].0.host, "h2");
        assert!(!m.complete());
        m.frame(
            "n1",
            "h1",
            StatsFrame {
                // A sample of a task on another host is ignored.
                tasks: vec![sample("web1xxxx", 99.0), sample("web2xxxx", 5.0)],
                warnings: vec![],
            },
        );
        assert!(!m.complete());
        m.failed("n2", "h2", "cannot reach host h2".into());
        assert!(m.complete());
        let f = m.snapshot(&[]);
        let row = |name: &str| f.tasks.iter().find(|t| t.name.starts_with(name)).unwrap();
        assert!(row("web.1").sampled && row("web.1").cpu_percent == 99.0);
        assert_eq!(
            (row("web.1").node.as_str(), row("web.1").state.as_str()),
            ("h1", "running")
        );
        assert!(!row("web.2").sampled, "{f:?}");
        assert!(!row("web.3").sampled);
        assert_eq!(row("web.3").state, "failed");
        // api.1 was left out of h1's frame: it stopped being read there.
        assert!(!row("api.1").sampled);
        assert_eq!(f.warnings, ["host h2: cannot reach host h2"]);
        // The next frame replaces the sample; a host that answers again has no warning.
        m.frame(
            "n2",
            "h2",
            StatsFrame {
                tasks: vec![sample("web2xxxx", 5.0)],
                warnings: vec![],
            },
        );
        let f = m.snapshot(&["note".into()]);
        assert_eq!(f.warnings, ["note"]);
        assert!(f.tasks.iter().any(|t| t.task_id == "web2xxxx" && t.sampled));
    }
}

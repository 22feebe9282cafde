//! Cluster events (`rctl events`): what changed between two committed stores, as a list of
//! events a person reads (service created, task failed with its reason, node down, rollout
//! paused, leader elected), and the filters a reader narrows them with.
//!
//! Invariants:
//! - Pure: events are a function of two stores (or two leadership observations) and a
//!   fallback time; no clock, randomness or I/O. Every controller applies the same log, so a
//!   follower derives the same events as the leader.
//! - Each event carries the raft index of the write it comes from (the object's `version`,
//!   else the newer store's `applied`): every event of `diff(a, b)` has an index in
//!   `(a.applied, b.applied]`, and the list is sorted by index, so events of consecutive diffs
//!   are ordered and `--since INDEX` resumes without a gap or a repeat.
//! - A diff sees net changes: a task that went `preparing → starting → running` between two
//!   stores shows as one `running` event (from `preparing`). Callers diff every store they
//!   are handed, so this only happens when several commits are published at once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::{Store, Task};
use crate::update::UpdateState;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// A service's spec: created, updated, removed.
    Service,
    /// A service's rollout: started, paused, completed, rollback_started, rolled_back, …
    Rollout,
    /// A node: registered, up, down, its availability or role, removed.
    Node,
    /// A task: created, a new state (with its reason), stop requested.
    Task,
    /// The raft leader: elected.
    Leader,
}

impl EventType {
    /// The lowercase name, as `--filter type=` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Service => "service",
            EventType::Rollout => "rollout",
            EventType::Node => "node",
            EventType::Task => "task",
            EventType::Leader => "leader",
        }
    }

    /// Parses [`EventType::as_str`]'s names.
    pub fn parse(s: &str) -> Option<EventType> {
        [
            EventType::Service,
            EventType::Rollout,
            EventType::Node,
            EventType::Task,
            EventType::Leader,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// One thing that happened in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Raft index of the write it comes from: `--since INDEX` resumes after it.
    pub index: u64,
    /// Milliseconds since the epoch: the leader's stamp on the object (the time the
    /// observing controller applied it when the object carries none, e.g. a removal).
    pub at: u64,
    /// What it is about.
    pub kind: EventType,
    /// What happened: `created`, `updated`, `removed`, a task state (`running`, `failed`),
    /// `up`, `down`, an availability (`drain`), a rollout state, `elected`.
    pub action: String,
    /// The object's id (task, service or node id; the raft id of a leader).
    pub id: String,
    /// The object's name as `rctl` shows it (task name, service name, hostname).
    pub name: String,
    /// The service it concerns, if any (filters: `service=`).
    pub service: String,
    /// The node (hostname) it concerns, if any (filters: `node=`).
    pub node: String,
    /// Why, when known: a task's error or message, a rollout's message.
    pub message: String,
    /// Details: a task's `from` state and `exit_code`, a node's `from` availability, …
    pub attributes: BTreeMap<String, String>,
}

impl Event {
    fn new(index: u64, at: u64, kind: EventType, action: &str) -> Event {
        Event {
            index,
            at,
            kind,
            action: action.to_string(),
            id: String::new(),
            name: String::new(),
            service: String::new(),
            node: String::new(),
            message: String::new(),
            attributes: BTreeMap::new(),
        }
    }

    fn attr(mut self, k: &str, v: impl Into<String>) -> Event {
        self.attributes.insert(k.to_string(), v.into());
        self
    }
}

/// The events that take `before` to `after` (`after` applied later than `before`), sorted by
/// index. `now` stamps the events whose object carries no time of its own (removals).
pub fn diff(before: &Store, after: &Store, now: u64) -> Vec<Event> {
    let mut out = Vec::new();
    // The index of a write whose object is gone, or carries no version.
    let latest = after.applied;
    let clamp = |v: u64| {
        if v > before.applied && v <= after.applied {
            v
        } else {
            latest
        }
    };
    let hostname = |id: &str| {
        after
            .nodes
            .get(id)
            .or_else(|| before.nodes.get(id))
            .map_or_else(|| id.to_string(), |n| n.hostname.clone())
    };

    for d in before.services.diff(&after.services) {
        use imbl::ordmap::DiffItem;
        match d {
            DiffItem::Add(name, s) => {
                out.push(service_created(name, s, clamp(s.version)));
                rollout(
                    &mut out,
                    name,
                    &s.id,
                    None,
                    s.update_status.as_ref(),
                    clamp(s.version),
                );
            }
            DiffItem::Update {
                old: (_, o),
                new: (name, s),
            } => {
                if o.id != s.id {
                    // Removed and created again between the two stores.
                    let mut gone = Event::new(clamp(s.version), now, EventType::Service, "removed");
                    gone.id = o.id.clone();
                    gone.name = name.clone();
                    gone.service = name.clone();
                    out.push(gone);
                    out.push(service_created(name, s, clamp(s.version)));
                } else if o.spec != s.spec {
                    let mut e = Event::new(
                        clamp(s.version),
                        s.updated_at,
                        EventType::Service,
                        "updated",
                    );
                    e.id = s.id.clone();
                    e.name = name.clone();
                    e.service = name.clone();
                    if o.spec.replicas != s.spec.replicas {
                        e = e
                            .attr("replicas.from", o.spec.replicas.to_string())
                            .attr("replicas", s.spec.replicas.to_string());
                    }
                    if o.spec.image != s.spec.image {
                        e = e
                            .attr("image.from", o.spec.image.clone())
                            .attr("image", s.spec.image.clone());
                    }
                    out.push(e);
                }
                let old = if o.id == s.id {
                    o.update_status.as_ref()
                } else {
                    None
                };
                rollout(
                    &mut out,
                    name,
                    &s.id,
                    old,
                    s.update_status.as_ref(),
                    clamp(s.version),
                );
            }
            DiffItem::Remove(name, s) => {
                let mut e = Event::new(latest, now, EventType::Service, "removed");
                e.id = s.id.clone();
                e.name = name.clone();
                e.service = name.clone();
                out.push(e);
            }
        }
    }

    for d in before.nodes.diff(&after.nodes) {
        use imbl::ordmap::DiffItem;
        match d {
            DiffItem::Add(id, n) => {
                let mut e = Event::new(
                    clamp(n.version),
                    n.updated_at,
                    EventType::Node,
                    "registered",
                );
                e.id = id.clone();
                e.name = n.hostname.clone();
                e.node = n.hostname.clone();
                e = e.attr("availability", n.availability.as_str());
                out.push(e);
            }
            DiffItem::Update {
                old: (_, o),
                new: (id, n),
            } => {
                let base = |action: &str| {
                    let mut e = Event::new(clamp(n.version), n.updated_at, EventType::Node, action);
                    e.id = id.clone();
                    e.name = n.hostname.clone();
                    e.node = n.hostname.clone();
                    e
                };
                if o.state != n.state {
                    let action = match n.state {
                        crate::node::NodeState::Ready => "up",
                        crate::node::NodeState::Down => "down",
                    };
                    out.push(base(action));
                }
                if o.availability != n.availability {
                    out.push(base(n.availability.as_str()).attr("from", o.availability.as_str()));
                }
                if o.role != n.role {
                    out.push(base("role").attr("role", n.role.as_str()));
                }
            }
            DiffItem::Remove(id, n) => {
                let mut e = Event::new(latest, now, EventType::Node, "removed");
                e.id = id.clone();
                e.name = n.hostname.clone();
                e.node = n.hostname.clone();
                out.push(e);
            }
        }
    }

    for d in before.tasks.diff(&after.tasks) {
        use imbl::ordmap::DiffItem;
        match d {
            DiffItem::Add(_, t) => {
                let mut e = task_event(t, clamp(t.version), t.created_at, "created", &hostname);
                e = e.attr("state", t.status.state.as_str());
                out.push(e);
                if t.status.state > crate::task::TaskState::Pending {
                    out.push(state_event(t, None, clamp(t.version), &hostname));
                }
            }
            DiffItem::Update {
                old: (_, o),
                new: (_, t),
            } => {
                if o.status.state != t.status.state {
                    out.push(state_event(t, Some(o), clamp(t.version), &hostname));
                } else if t.status.state == crate::task::TaskState::Pending
                    && o.status.message != t.status.message
                    && !t.status.message.is_empty()
                {
                    // Still pending, for a new reason (the scheduler explains why).
                    out.push(state_event(t, Some(o), clamp(t.version), &hostname));
                }
                if o.desired_state != t.desired_state
                    && t.desired_state == crate::task::TaskState::Shutdown
                {
                    let at = t.stop_requested_at.unwrap_or(now);
                    out.push(task_event(
                        t,
                        clamp(t.version),
                        at,
                        "stop_requested",
                        &hostname,
                    ));
                }
            }
            // Old tasks are pruned from the history: not an event anyone acts on.
            DiffItem::Remove(..) => {}
        }
    }
    out.sort_by_key(|e| e.index);
    out
}

fn task_event(
    t: &Task,
    index: u64,
    at: u64,
    action: &str,
    hostname: &dyn Fn(&str) -> String,
) -> Event {
    let mut e = Event::new(index, at, EventType::Task, action);
    e.id = t.id.clone();
    e.name = t.name();
    e.service = t.service_name.clone();
    e.node = t.node_id.as_deref().map(hostname).unwrap_or_default();
    e
}

/// A task reached a new state: the action is the state, the message its reason.
fn state_event(
    t: &Task,
    old: Option<&Task>,
    index: u64,
    hostname: &dyn Fn(&str) -> String,
) -> Event {
    let mut e = task_event(
        t,
        index,
        t.status.timestamp,
        t.status.state.as_str(),
        hostname,
    );
    e.message = if t.status.error.is_empty() {
        t.status.message.clone()
    } else {
        t.status.error.clone()
    };
    if let Some(o) = old {
        e = e.attr("from", o.status.state.as_str());
    }
    if let Some(code) = t.status.exit_code {
        e = e.attr("exit_code", code.to_string());
    }
    e
}

/// The rollout event for a service whose update status went from `old` to `new`.
fn rollout(
    out: &mut Vec<Event>,
    name: &str,
    id: &str,
    old: Option<&crate::update::UpdateStatus>,
    new: Option<&crate::update::UpdateStatus>,
    index: u64,
) {
    let Some(new) = new else { return };
    let same = old.is_some_and(|o| o.state == new.state && o.started_at == new.started_at);
    if same {
        return;
    }
    let action = match new.state {
        UpdateState::Updating => "started",
        UpdateState::Paused => "paused",
        UpdateState::Completed => "completed",
        UpdateState::RollbackStarted => "rollback_started",
        UpdateState::RollbackPaused => "rollback_paused",
        UpdateState::RollbackCompleted => "rolled_back",
    };
    let at = new.completed_at.unwrap_or(new.started_at);
    let mut e = Event::new(index, at, EventType::Rollout, action);
    e.id = id.to_string();
    e.name = name.to_string();
    e.service = name.to_string();
    e.message = new.message.clone();
    out.push(e);
}

/// What a controller knows of leadership: the term and its leader (0: none known).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Leadership {
    /// Raft term.
    pub term: u64,
    /// Raft id of the leader; 0 when none is known.
    pub leader: u64,
}

/// The event for a change of leadership seen at `index` and `now`: a new leader known (a
/// controller losing sight of the leader is no event: the next leader's election is).
pub fn leader_change(before: Leadership, after: Leadership, index: u64, now: u64) -> Option<Event> {
    if after.leader == 0 || (before.leader == after.leader && before.term == after.term) {
        return None;
    }
    let mut e = Event::new(index, now, EventType::Leader, "elected");
    e.id = after.leader.to_string();
    e.name = format!("controller-{}", after.leader);
    e.message = format!("controller {} leads term {}", after.leader, after.term);
    e = e.attr("term", after.term.to_string());
    if before.leader != 0 && before.leader != after.leader {
        e = e.attr("from", before.leader.to_string());
    }
    Some(e)
}

/// Why a filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Not `KEY=VALUE`.
    #[error("events: filter {0:?}: expected KEY=VALUE (service=, node=, type=, event=, task=)")]
    Syntax(String),
    /// A key no event has.
    #[error("events: filter {0:?}: unknown key (service, node, type, event, task)")]
    Key(String),
    /// `type=` of no event type.
    #[error("events: filter type={0:?}: expected service, rollout, node, task or leader")]
    Type(String),
    /// Too many filters, or one too long.
    #[error("events: at most {MAX_FILTERS} filters of at most {MAX_FILTER_LEN} bytes each")]
    TooMany,
}

/// The most filters one reader gives.
pub const MAX_FILTERS: usize = 32;
/// The longest filter.
pub const MAX_FILTER_LEN: usize = 256;

/// What a reader wants to see: values of one key are alternatives (`type=task type=node`),
/// different keys must all match (as `docker events --filter`). Empty: everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    services: Vec<String>,
    nodes: Vec<String>,
    types: Vec<EventType>,
    actions: Vec<String>,
    tasks: Vec<String>,
}

impl Filter {
    /// Parses `KEY=VALUE` filters: `service=web`, `node=h1`, `type=task`, `event=failed`,
    /// `task=web.1` (a task name or id prefix).
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Filter, FilterError> {
        if filters.len() > MAX_FILTERS || filters.iter().any(|f| f.as_ref().len() > MAX_FILTER_LEN)
        {
            return Err(FilterError::TooMany);
        }
        let mut f = Filter::default();
        for s in filters {
            let s = s.as_ref();
            let (k, v) = s
                .split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .ok_or_else(|| FilterError::Syntax(s.to_string()))?;
            match k {
                "service" => f.services.push(v.to_string()),
                "node" => f.nodes.push(v.to_string()),
                "type" => f
                    .types
                    .push(EventType::parse(v).ok_or_else(|| FilterError::Type(v.to_string()))?),
                "event" | "action" => f.actions.push(v.to_string()),
                "task" => f.tasks.push(v.to_string()),
                _ => return Err(FilterError::Key(k.to_string())),
            }
        }
        Ok(f)
    }

    /// Whether `e` passes.
    pub fn matches(&self, e: &Event) -> bool {
        let any = |list: &[String], f: &dyn Fn(&str) -> bool| {
            list.is_empty() || list.iter().any(|v| f(v))
        };
        any(&self.services, &|v| e.service == v)
            && any(&self.nodes, &|v| e.node == v)
            && (self.types.is_empty() || self.types.contains(&e.kind))
            && any(&self.actions, &|v| e.action == v)
            && any(&self.tasks, &|v| {
                e.kind == EventType::Task && (e.name.starts_with(v) || e.id.starts_with(v))
            })
    }
}

/// The `created` event of service `name` (raft index `index`), at its creation.
fn service_created(name: &str, s: &crate::store::Service, index: u64) -> Event {
    let mut e = Event::new(index, s.created_at, EventType::Service, "created");
    e.id = s.id.clone();
    e.name = name.to_string();
    e.service = name.to_string();
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Availability, Node, NodeState};
    use crate::store::{Service, TaskStatus};
    use crate::task::TaskState;
    use crate::update::UpdateStatus;

    fn service(name: &str, replicas: u64, version: u64) -> Service {
        let mut spec: crate::ServiceSpec =
            serde_json::from_value(serde_json::json!({"name": name, "image": "busybox"}))
                .expect("spec");
        spec.replicas = replicas;
        Service {
            id: format!("id-{name}"),
            spec,
            spec_version: version,
            created_at: 1000,
            updated_at: 2000,
            version,
            previous_spec: None,
            update_status: None,
            vips: Default::default(),
            rebalance: None,
            autoscale_decisions: Vec::new(),
        }
    }

    fn node(id: &str, host: &str, version: u64) -> Node {
        let mut n: Node = serde_json::from_value(serde_json::json!({
            "id": id, "hostname": host, "addr": "10.0.0.1:1", "role": "worker",
            "state": "Ready",
            "updated_at": 500, "version": version,
        }))
        .expect("node");
        n.availability = Availability::Active;
        n
    }

    fn task(id: &str, svc: &Service, state: TaskState, version: u64) -> Task {
        Task {
            id: id.to_string(),
            service_id: svc.id.clone(),
            service_name: svc.spec.name.clone(),
            slot: 1,
            spec: svc.spec.clone().into(),
            spec_version: svc.spec_version,
            node_id: Some("n1".into()),
            target_node: None,
            desired_state: TaskState::Running,
            status: TaskStatus {
                state,
                message: String::new(),
                error: String::new(),
                container_id: String::new(),
                exit_code: None,
                timestamp: 3000,
            },
            running_at: None,
            stop_requested_at: None,
            networks: Vec::new(),
            created_at: 1500,
            version,
            image_digest: None,
        }
    }

    fn store(applied: u64) -> Store {
        let mut s = Store {
            applied,
            ..Default::default()
        };
        s.nodes.insert("n1".into(), node("n1", "h1", 1));
        s
    }

    fn summary(events: &[Event]) -> Vec<(u64, &'static str, String, String)> {
        events
            .iter()
            .map(|e| (e.index, e.kind.as_str(), e.action.clone(), e.name.clone()))
            .collect()
    }

    #[test]
    fn table_of_changes() {
        let web = service("web", 2, 5);
        struct Case {
            name: &'static str,
            before: Store,
            after: Store,
            want: Vec<(u64, &'static str, &'static str, &'static str)>,
        }
        let base = {
            let mut s = store(10);
            s.services.insert("web".into(), web.clone());
            s.tasks
                .insert("t1".into(), task("t1", &web, TaskState::Running, 6));
            s
        };
        let with = |f: &dyn Fn(&mut Store)| {
            let mut s = base.clone();
            s.applied = 20;
            f(&mut s);
            s
        };
        let cases = vec![
            Case {
                name: "nothing changed",
                before: base.clone(),
                after: with(&|_| {}),
                want: vec![],
            },
            Case {
                name: "service created with a pending task",
                before: store(10),
                after: {
                    let mut s = store(20);
                    let mut w = web.clone();
                    w.version = 12;
                    s.services.insert("web".into(), w.clone());
                    let mut t = task("t1", &w, TaskState::Pending, 13);
                    t.node_id = None;
                    s.tasks.insert("t1".into(), t);
                    s
                },
                want: vec![
                    (12, "service", "created", "web"),
                    (13, "task", "created", "web.1.t1"),
                ],
            },
            Case {
                name: "scaled: an update with replicas",
                before: base.clone(),
                after: with(&|s| {
                    let w = s.services.get_mut("web").expect("web");
                    w.spec.replicas = 3;
                    w.version = 15;
                }),
                want: vec![(15, "service", "updated", "web")],
            },
            Case {
                name: "task failed, then the service removed",
                before: base.clone(),
                after: with(&|s| {
                    let t = s.tasks.get_mut("t1").expect("t1");
                    t.status.state = TaskState::Failed;
                    t.status.error = "exit 137".into();
                    t.version = 14;
                    s.services.remove("web");
                }),
                want: vec![
                    (14, "task", "failed", "web.1.t1"),
                    (20, "service", "removed", "web"),
                ],
            },
            Case {
                name: "node down then drained",
                before: base.clone(),
                after: with(&|s| {
                    let n = s.nodes.get_mut("n1").expect("n1");
                    n.state = NodeState::Down;
                    n.availability = Availability::Drain;
                    n.version = 18;
                }),
                want: vec![(18, "node", "down", "h1"), (18, "node", "drain", "h1")],
            },
            Case {
                name: "stop requested",
                before: base.clone(),
                after: with(&|s| {
                    let t = s.tasks.get_mut("t1").expect("t1");
                    t.desired_state = TaskState::Shutdown;
                    t.version = 11;
                }),
                want: vec![(11, "task", "stop_requested", "web.1.t1")],
            },
            Case {
                name: "rollout started then paused",
                before: with(&|s| {
                    s.applied = 10;
                    s.services.get_mut("web").expect("web").update_status = Some(UpdateStatus {
                        state: UpdateState::Updating,
                        message: String::new(),
                        started_at: 1,
                        completed_at: None,
                    });
                }),
                after: with(&|s| {
                    let w = s.services.get_mut("web").expect("web");
                    w.version = 16;
                    w.update_status = Some(UpdateStatus {
                        state: UpdateState::Paused,
                        message: "task web.1 failed".into(),
                        started_at: 1,
                        completed_at: None,
                    });
                }),
                want: vec![(16, "rollout", "paused", "web")],
            },
            Case {
                name: "a version outside the diff's range takes the newer store's index",
                before: base.clone(),
                after: with(&|s| {
                    s.tasks.get_mut("t1").expect("t1").status.state = TaskState::Shutdown;
                }),
                want: vec![(20, "task", "shutdown", "web.1.t1")],
            },
        ];
        for c in cases {
            let got = diff(&c.before, &c.after, 99);
            let want: Vec<_> = c
                .want
                .iter()
                .map(|(i, k, a, n)| (*i, *k, a.to_string(), n.to_string()))
                .collect();
            assert_eq!(summary(&got), want, "{}", c.name);
            for e in &got {
                assert!(
                    e.index > c.before.applied && e.index <= c.after.applied,
                    "{}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn a_failed_task_carries_its_reason_and_previous_state() {
        let web = service("web", 1, 5);
        let mut before = store(10);
        before
            .tasks
            .insert("t1".into(), task("t1", &web, TaskState::Running, 6));
        let mut after = before.clone();
        after.applied = 11;
        let t = after.tasks.get_mut("t1").expect("t1");
        t.status.state = TaskState::Failed;
        t.status.error = "container exited with code 137".into();
        t.status.exit_code = Some(137);
        t.version = 11;
        let got = diff(&before, &after, 0);
        assert_eq!(got.len(), 1);
        let e = &got[0];
        assert_eq!((e.service.as_str(), e.node.as_str()), ("web", "h1"));
        assert_eq!(e.message, "container exited with code 137");
        assert_eq!(e.attributes["from"], "running");
        assert_eq!(e.attributes["exit_code"], "137");
        assert_eq!(e.at, 3000);
    }

    #[test]
    fn leadership() {
        let none = Leadership::default();
        let l1 = Leadership { term: 2, leader: 1 };
        let l3 = Leadership { term: 3, leader: 3 };
        assert!(leader_change(l1, l1, 5, 0).is_none());
        assert!(leader_change(l1, none, 5, 0).is_none());
        let e = leader_change(none, l1, 5, 7).expect("elected");
        assert_eq!((e.index, e.at, e.action.as_str()), (5, 7, "elected"));
        let e = leader_change(l1, l3, 9, 0).expect("changed");
        assert_eq!(e.attributes["from"], "1");
        assert_eq!(e.message, "controller 3 leads term 3");
    }

    #[test]
    fn filters() {
        let mut e = Event::new(1, 0, EventType::Task, "failed");
        e.service = "web".into();
        e.node = "h1".into();
        e.name = "web.1.abc".into();
        let ok = |f: &[&str]| Filter::parse(f).expect("filter").matches(&e);
        assert!(ok(&[]));
        assert!(ok(&["service=web"]));
        assert!(ok(&["service=db", "service=web"]));
        assert!(!ok(&["service=db"]));
        assert!(ok(&["service=web", "node=h1", "type=task", "event=failed"]));
        assert!(!ok(&["service=web", "node=h2"]));
        assert!(!ok(&["type=node"]));
        assert!(ok(&["task=web.1"]));
        assert!(!ok(&["event=running"]));
        assert_eq!(
            Filter::parse(&["nope"]),
            Err(FilterError::Syntax("nope".into()))
        );
        assert_eq!(Filter::parse(&["x=1"]), Err(FilterError::Key("x".into())));
        assert_eq!(
            Filter::parse(&["type=thing"]),
            Err(FilterError::Type("thing".into()))
        );
        let many: Vec<String> = (0..=MAX_FILTERS).map(|i| format!("service={i}")).collect();
        assert_eq!(Filter::parse(&many), Err(FilterError::TooMany));
    }
}

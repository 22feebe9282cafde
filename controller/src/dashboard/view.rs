//! What the dashboard's page shows, as JSON shapes computed from the committed store by a pure
//! function ([`overview`]): services with their replicas and rollout, tasks with their states
//! and reasons, nodes, networks, volumes, and secrets and configs as metadata only (a value, or
//! a digest of one, never leaves here).
//!
//! Every string is data: the page puts them in the DOM as text, never as markup.

use std::collections::BTreeMap;

use rudder_model::node::NodeState;
use rudder_model::{Store, TaskState};
use serde::Serialize;

/// At most this many tasks are sent (the newest first): the page is for looking, `rctl ps`
/// for everything.
pub const MAX_TASKS: usize = 2_000;

/// The whole page's data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overview {
    /// The raft index the store was read at: the page shows how fresh it is.
    pub applied: u64,
    /// By name.
    pub services: Vec<ServiceView>,
    /// By hostname.
    pub nodes: Vec<NodeView>,
    /// By service, then slot, then newest first.
    pub tasks: Vec<TaskView>,
    /// Tasks left out beyond [`MAX_TASKS`].
    pub tasks_omitted: usize,
    /// By name.
    pub networks: Vec<NetworkView>,
    /// By name.
    pub volumes: Vec<VolumeView>,
    /// Secrets then configs, by name.
    pub secrets: Vec<SecretView>,
}

/// One service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceView {
    pub id: String,
    pub name: String,
    pub image: String,
    /// `replicated`, `global`, `replicated-job`, …
    pub mode: String,
    /// Its replica count; for a global service, the tasks the controller wants running.
    pub desired: u64,
    /// Tasks meant to run that run.
    pub running: u64,
    /// The latest rollout's state (`updating`, `completed`, `rollback_started`, …), if any.
    pub rollout: Option<String>,
    pub rollout_message: String,
    pub labels: BTreeMap<String, String>,
    /// Whether `rctl scale` applies (replicated, not autoscaled).
    pub scalable: bool,
    /// Whether there is a previous spec to roll back to.
    pub can_rollback: bool,
}

/// One task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskView {
    pub id: String,
    /// `SERVICE.SLOT.ID-PREFIX`, as `rctl ps` shows it.
    pub name: String,
    pub service: String,
    pub slot: u64,
    /// Node id, if placed.
    pub node_id: Option<String>,
    pub desired_state: String,
    pub state: String,
    /// Why it is in that state (`rctl ps` MESSAGE / ERROR).
    pub message: String,
    pub error: String,
    /// When the state was last reported (ms).
    pub updated_at: u64,
}

/// One node (a column of task cards on the page).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    pub id: String,
    pub hostname: String,
    pub role: String,
    pub state: String,
    pub availability: String,
    pub addr: String,
    pub labels: BTreeMap<String, String>,
}

/// One overlay network.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkView {
    pub name: String,
    pub driver: String,
    pub subnet: String,
    pub encrypted: bool,
}

/// One named volume.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VolumeView {
    pub name: String,
    pub driver: String,
    pub labels: BTreeMap<String, String>,
}

/// A secret's or config's metadata: never its value or digest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecretView {
    /// `secret` or `config`.
    pub kind: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Its latest version number.
    pub latest: u64,
    pub versions: usize,
    pub updated_at: u64,
}

/// The lowercase serde name of a unit enum (`"replicated"`), or empty.
fn serde_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn node_state(s: &NodeState) -> &'static str {
    match s {
        NodeState::Ready => "ready",
        NodeState::Down => "down",
    }
}

/// The page's data from `store`. Pure.
pub fn overview(store: &Store) -> Overview {
    // (meant to run, meant to and running) per service id, as the metrics count them.
    let mut replicas: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for t in store.tasks.values() {
        if t.desired_state == TaskState::Running {
            let r = replicas.entry(t.service_id.as_str()).or_default();
            r.0 += 1;
            r.1 += u64::from(t.status.state == TaskState::Running);
        }
    }
    let mut services: Vec<ServiceView> = store
        .services
        .values()
        .map(|s| {
            let (wanted, up) = replicas.get(s.id.as_str()).copied().unwrap_or_default();
            let global = s.spec.mode.is_global();
            ServiceView {
                id: s.id.clone(),
                name: s.spec.name.clone(),
                image: s.spec.image.clone(),
                mode: serde_name(&s.spec.mode),
                desired: if global { wanted } else { s.spec.replicas },
                running: up,
                rollout: s
                    .update_status
                    .as_ref()
                    .map(|u| u.state.as_str().to_string()),
                rollout_message: s
                    .update_status
                    .as_ref()
                    .map(|u| u.message.clone())
                    .unwrap_or_default(),
                labels: s.spec.labels.clone(),
                scalable: !global && !s.spec.mode.is_job() && s.spec.autoscale.is_none(),
                can_rollback: s.previous_spec.is_some() && !s.spec.mode.is_job(),
            }
        })
        .collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));

    let mut nodes: Vec<NodeView> = store
        .nodes
        .values()
        .map(|n| NodeView {
            id: n.id.clone(),
            hostname: n.hostname.clone(),
            role: n.role.as_str().to_string(),
            state: node_state(&n.state).to_string(),
            availability: n.availability.as_str().to_string(),
            addr: n.addr.clone(),
            labels: n.labels.clone(),
        })
        .collect();
    nodes.sort_by(|a, b| a.hostname.cmp(&b.hostname).then(a.id.cmp(&b.id)));

    let mut tasks: Vec<TaskView> = store
        .tasks
        .values()
        .map(|t| TaskView {
            id: t.id.clone(),
            name: t.name(),
            service: t.service_name.clone(),
            slot: t.slot,
            node_id: t.node_id.clone(),
            desired_state: t.desired_state.as_str().to_string(),
            state: t.status.state.as_str().to_string(),
            message: t.status.message.clone(),
            error: t.status.error.clone(),
            updated_at: t.status.timestamp.max(t.created_at),
        })
        .collect();
    // Newest first, so that the cut keeps what matters now.
    tasks.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(a.id.cmp(&b.id)));
    let tasks_omitted = tasks.len().saturating_sub(MAX_TASKS);
    tasks.truncate(MAX_TASKS);
    tasks.sort_by(|a, b| {
        (a.service.as_str(), a.slot)
            .cmp(&(b.service.as_str(), b.slot))
            .then(b.updated_at.cmp(&a.updated_at))
            .then(a.id.cmp(&b.id))
    });

    let networks = store
        .networks
        .values()
        .map(|n| NetworkView {
            name: n.spec.name.clone(),
            driver: serde_name(&n.spec.driver),
            subnet: n.subnet.to_string(),
            encrypted: n.spec.encrypted,
        })
        .collect();
    let volumes = store
        .volumes
        .values()
        .map(|v| VolumeView {
            name: v.spec.name.clone(),
            driver: serde_name(&v.spec.driver),
            labels: v.spec.labels.clone(),
        })
        .collect();
    let secrets = store
        .secret_objects
        .values()
        .chain(store.config_objects.values())
        .map(|o| {
            let m = o.meta();
            SecretView {
                kind: m.kind.as_str().to_string(),
                name: m.name,
                labels: m.labels,
                latest: m.latest,
                versions: m.versions.len(),
                updated_at: m.updated_at,
            }
        })
        .collect();

    Overview {
        applied: store.applied,
        services,
        nodes,
        tasks,
        tasks_omitted,
        networks,
        volumes,
        secrets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::node::{Availability, Node, NodeRole};
    use rudder_model::store::{Service, Task};
    use rudder_model::update::{UpdateState, UpdateStatus};

    fn service(id: &str, name: &str, replicas: u64) -> Service {
        serde_json::from_value(serde_json::json!({
            "id": id, "spec": {"name": name, "image": "busybox:latest", "replicas": replicas,
                               "labels": {"team": "<script>alert(1)</script>"}},
            "spec_version": 1, "created_at": 0, "updated_at": 0, "version": 1,
        }))
        .unwrap()
    }

    fn task(id: &str, svc: &Service, slot: u64, desired: TaskState, state: TaskState) -> Task {
        serde_json::from_value(serde_json::json!({
            "id": id, "service_id": svc.id, "service_name": svc.spec.name, "slot": slot,
            "spec": svc.spec, "spec_version": 1, "desired_state": desired, "node_id": "n1",
            "status": {"state": state, "message": "started", "error": "", "container_id": "",
                       "timestamp": 5_000},
            "created_at": 1_000, "version": 1,
        }))
        .unwrap()
    }

    fn node(id: &str, host: &str) -> Node {
        Node {
            id: id.into(),
            hostname: host.into(),
            addr: "10.0.0.1:4244".into(),
            labels: Default::default(),
            role: NodeRole::Worker,
            availability: Availability::Drain,
            resources: Default::default(),
            state: NodeState::Ready,
            updated_at: 0,
            version: 0,
            controller_id: None,
            host_labels: Default::default(),
            overlay_key: String::new(),
            cert_not_after: 0,
        }
    }

    fn store() -> Store {
        let mut s = Store::default();
        let mut web = service("s1", "web", 3);
        web.update_status = Some(UpdateStatus {
            state: UpdateState::Updating,
            message: "update in progress".into(),
            started_at: 0,
            completed_at: None,
        });
        web.previous_spec = Some(web.spec.clone());
        let mut mon = service("s2", "mon", 0);
        mon.spec.mode = rudder_model::spec::ServiceMode::Global;
        for t in [
            task("t1", &web, 1, TaskState::Running, TaskState::Running),
            task("t2", &web, 2, TaskState::Running, TaskState::Pending),
            task("t3", &web, 3, TaskState::Shutdown, TaskState::Running),
            task("t4", &mon, 0, TaskState::Running, TaskState::Running),
        ] {
            s.tasks.insert(t.id.clone(), t);
        }
        s.services.insert(web.spec.name.clone(), web);
        s.services.insert(mon.spec.name.clone(), mon);
        s.nodes.insert("n2".into(), node("n2", "zeta"));
        s.nodes.insert("n1".into(), node("n1", "alpha"));
        s.applied = 42;
        s
    }

    #[test]
    fn services_show_replicas_and_rollouts() {
        let o = overview(&store());
        assert_eq!(o.applied, 42);
        let names: Vec<&str> = o.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["mon", "web"]);
        let web = &o.services[1];
        assert_eq!((web.desired, web.running), (3, 1));
        assert_eq!(web.rollout.as_deref(), Some("updating"));
        assert_eq!(web.rollout_message, "update in progress");
        assert_eq!(web.mode, "replicated");
        assert!(web.scalable && web.can_rollback);
        // Strings stay data: the page escapes them.
        assert_eq!(web.labels["team"], "<script>alert(1)</script>");
        let mon = &o.services[0];
        assert_eq!((mon.desired, mon.running, mon.scalable), (1, 1, false));
        assert_eq!(mon.mode, "global");
        assert!(!mon.can_rollback && mon.rollout.is_none());
    }

    #[test]
    fn tasks_and_nodes_are_listed_in_order() {
        let o = overview(&store());
        let ids: Vec<&str> = o.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["t4", "t1", "t2", "t3"]);
        let t2 = &o.tasks[2];
        assert_eq!(
            (
                t2.state.as_str(),
                t2.desired_state.as_str(),
                t2.message.as_str()
            ),
            ("pending", "running", "started")
        );
        assert_eq!(t2.node_id.as_deref(), Some("n1"));
        assert_eq!(o.tasks_omitted, 0);
        let hosts: Vec<&str> = o.nodes.iter().map(|n| n.hostname.as_str()).collect();
        assert_eq!(hosts, ["alpha", "zeta"]);
        assert_eq!(
            (o.nodes[0].availability.as_str(), o.nodes[0].state.as_str()),
            ("drain", "ready")
        );
    }

    #[test]
    fn an_empty_store_is_an_empty_page() {
        let o = overview(&Store::default());
        assert!(o.services.is_empty() && o.tasks.is_empty() && o.secrets.is_empty());
        let json = serde_json::to_value(&o).unwrap();
        for key in [
            "services", "nodes", "tasks", "networks", "volumes", "secrets",
        ] {
            assert!(json[key].is_array(), "{key}");
        }
    }
}

//! Which nodes a store change concerns, for the dispatcher's fan-out of assignments.
//!
//! Every agent session sends its node the tasks placed there whenever they change. Finding a
//! node's tasks by scanning the whole task table, in every session, on every applied batch,
//! costs hosts × tasks per change (30 million comparisons at 1,000 hosts and 30,000 tasks, for
//! each status batch): the controller saturates its cores and loses its raft leadership
//! (issue 20). A node's tasks come from the store's own node → tasks index
//! ([`Store::tasks_on`]); [`changed`] says which nodes a change concerns from the store maps'
//! own diff, which skips the structure two snapshots share, so a change costs what changed.
//!
//! Invariants: pure; a node is reported whenever a task placed on it (before or after the change) was
//! added or removed, or changed in what a session reads of it (`session_reads_differ`: not
//! the agent's own non-final status reports); `all` is set when a table a session reads besides the tasks
//! changed (a session also sends its node the network map, volumes, secret values and trusted
//! controllers, which depend on other tables: see [`same_for_sessions`]), or when tasks changed
//! and an overlay network exists (a node's network map lists the running tasks of every service
//! on its networks).

use std::collections::BTreeSet;

use imbl::ordmap::DiffItem;

use crate::store::{Store, Task};

/// What one store change concerns.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changed {
    /// Every node: something besides their own tasks changed.
    pub all: bool,
    /// Nodes whose tasks changed.
    pub nodes: BTreeSet<String>,
}

impl Changed {
    /// Whether the change concerns `node`.
    pub fn concerns(&self, node: &str) -> bool {
        self.all || self.nodes.contains(node)
    }
}

/// Which nodes the change from `old` to `new` concerns.
pub fn changed(old: &Store, new: &Store) -> Changed {
    let mut changed = Changed::default();
    let mut any_task = false;
    let touch = |t: &Task, c: &mut Changed| {
        if let Some(n) = &t.node_id {
            c.nodes.insert(n.clone());
        }
    };
    for d in old.tasks.diff(&new.tasks) {
        match d {
            DiffItem::Add(_, t) | DiffItem::Remove(_, t) => {
                any_task |= t.node_id.is_some();
                touch(t, &mut changed)
            }
            DiffItem::Update {
                old: (_, a),
                new: (_, b),
            } => {
                // A network map lists placed tasks only.
                any_task |= a.node_id.is_some() || b.node_id.is_some();
                if session_reads_differ(a, b) {
                    touch(a, &mut changed);
                    touch(b, &mut changed);
                }
            }
        }
    }
    changed.all = !same_for_sessions(old, new) || (!new.networks.is_empty() && any_task);
    changed
}

/// Whether a session reads two versions of a task differently: its node, its desired state,
/// whether it finished (the values of its secrets stop being sent) or its spec (which values it
/// needs). The rest of its status is the agent's own report, which is never sent back (see the
/// dispatcher's `assignment_changes`): three reports per start each woke the node's session for
/// nothing (issue 20).
fn session_reads_differ(a: &Task, b: &Task) -> bool {
    a.node_id != b.node_id
        || a.desired_state != b.desired_state
        || a.status.state.is_terminal() != b.status.state.is_terminal()
        || (!crate::shared::Shared::same(&a.spec, &b.spec) && a.spec != b.spec)
}

/// Whether `a` and `b` are the same for every session apart from their tasks: they differ at
/// most in their tasks, applied index and the tables no session reads (images, agent versions,
/// stacks, admitted identities), and, while neither has an overlay network, their services (a
/// session reads services only for its node's network map). Cheap when they share structure
/// (the maps compare shared subtrees by pointer).
///
/// Every `Apply` writes the services table: when that woke all 1,000 sessions of a fleet, each
/// re-read its node's tasks, network map, volumes and secrets, and that was half of the
/// leader's CPU while services were being deployed (issue 20).
pub(crate) fn same_for_sessions(a: &Store, b: &Store) -> bool {
    let mut a = a.clone();
    a.tasks = b.tasks.clone();
    a.applied = b.applied;
    a.images = b.images.clone();
    a.node_versions = b.node_versions.clone();
    a.stacks = b.stacks.clone();
    a.admitted = b.admitted.clone();
    if a.networks.is_empty() && b.networks.is_empty() {
        a.services = b.services.clone();
    }
    a == *b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Command, NodeResources, NodeRole};

    fn put_node(id: &str, ip: u8) -> Command {
        Command::PutNode {
            id: id.into(),
            hostname: format!("host-{id}"),
            addr: format!("10.0.0.{ip}:4243"),
            labels: Default::default(),
            role: NodeRole::Worker,
            resources: NodeResources::default(),
            now: 1,
            cert_not_after: 0,
            host_labels: Default::default(),
        }
    }

    fn ids(s: &Store, node: &str) -> Vec<String> {
        s.tasks_on(node).map(|t| t.id.clone()).collect()
    }

    /// A node's tasks by a scan of the task table, for comparison.
    fn scanned(s: &Store, node: &str) -> Vec<String> {
        s.tasks
            .values()
            .filter(|t| t.node_id.as_deref() == Some(node))
            .map(|t| t.id.clone())
            .collect()
    }

    /// Creations, placements, status changes and deletions name the nodes they concern (and the
    /// store's index follows them as a scan would); changes elsewhere are flagged.
    #[test]
    fn changes_name_the_nodes_concerned() {
        let mut s = Store::default();
        let mut idx = 0;
        let mut apply = |s: &mut Store, c: Command| {
            idx += 1;
            s.apply(idx, c).unwrap();
        };
        apply(&mut s, put_node("n1", 1));
        apply(&mut s, put_node("n2", 2));
        let spec = crate::spec::tests_support::spec("web", 4);
        apply(
            &mut s,
            Command::PutService {
                id: "svc-web".into(),
                spec: Box::new(spec),
                now: 1,
            },
        );
        let mut prev = s.clone();
        let mut ids_n = 0;
        let mut new_id = || {
            ids_n += 1;
            format!("t{ids_n:03}")
        };
        // Create and place: both nodes concerned; the service's update status changed too.
        let batch = crate::reconcile::plan_pass(&s, 10, &mut new_id).unwrap();
        apply(&mut s, batch);
        let c = changed(&prev, &s);
        assert_eq!(ids(&s, "n1"), scanned(&s, "n1"));
        assert_eq!(
            c.nodes,
            BTreeSet::from(["n1".to_string(), "n2".to_string()])
        );
        assert_eq!(ids(&s, "n1").len(), 2);
        assert_eq!(ids(&s, "n1"), scanned(&s, "n1"));
        prev = s.clone();
        // The agent's own report of a start concerns nobody: the session sends nothing for it.
        let t = s.tasks_on("n1").next().unwrap().clone();
        let report = |state, at| Command::UpdateStatus {
            updates: vec![crate::store::StatusUpdate::of(&t, "n1", state, at)],
        };
        apply(&mut s, report(crate::TaskState::Running, 20));
        assert_eq!(changed(&prev, &s), Changed::default());
        prev = s.clone();
        // Its end concerns n1 only (the values of its secrets are no longer sent).
        apply(&mut s, report(crate::TaskState::Failed, 21));
        let c = changed(&prev, &s);
        assert_eq!(
            c,
            Changed {
                all: false,
                nodes: BTreeSet::from(["n1".to_string()])
            }
        );
        assert!(c.concerns("n1") && !c.concerns("n2"));
        prev = s.clone();
        // A node change concerns every node; no task changed.
        apply(
            &mut s,
            Command::NodeDown {
                id: "n2".into(),
                now: 30,
            },
        );
        let c = changed(&prev, &s);
        assert!(c.all);
        assert_eq!(c.nodes, BTreeSet::from(["n2".to_string()]), "orphaned");
        prev = s.clone();
        // Deletion: gone from the index.
        apply(
            &mut s,
            Command::DeleteTasks {
                ids: vec![t.id.clone()],
            },
        );
        let c = changed(&prev, &s);
        assert_eq!(c.nodes, BTreeSet::from(["n1".to_string()]));
        assert_eq!(ids(&s, "n1"), scanned(&s, "n1"));
        assert!(!ids(&s, "n1").contains(&t.id));
        // No change at all: nothing concerned.
        let c = changed(&s, &s.clone());
        assert_eq!(c, Changed::default());
    }

    /// A new desired state concerns the task's node; with an overlay network, the agent's own
    /// reports reach every session (network maps list the running tasks), but a change to a
    /// task no node holds does not.
    #[test]
    fn desired_states_concern_their_node_and_networks_hear_every_placed_report() {
        let mut s = Store::default();
        let mut idx = 0;
        let mut apply = |s: &mut Store, c: Command| {
            idx += 1;
            s.apply(idx, c).unwrap();
        };
        apply(&mut s, put_node("n1", 1));
        let spec = crate::spec::tests_support::spec("web", 1);
        apply(
            &mut s,
            Command::PutService {
                id: "svc-web".into(),
                spec: Box::new(spec),
                now: 1,
            },
        );
        let mut n = 0;
        let mut new_id = || {
            n += 1;
            format!("t{n:03}")
        };
        let batch = crate::reconcile::plan_pass(&s, 10, &mut new_id).unwrap();
        apply(&mut s, batch);
        let t = s.tasks_on("n1").next().expect("placed on n1").clone();
        let report = |state, at| Command::UpdateStatus {
            updates: vec![crate::store::StatusUpdate::of(&t, "n1", state, at)],
        };
        // Stopping it concerns n1.
        let prev = s.clone();
        apply(
            &mut s,
            Command::SetDesired {
                updates: vec![(t.id.clone(), crate::TaskState::Shutdown)],
                now: 20,
            },
        );
        assert_eq!(
            changed(&prev, &s),
            Changed {
                all: false,
                nodes: BTreeSet::from(["n1".to_string()])
            }
        );
        // With a network, a report of a placed task wakes every session.
        apply(
            &mut s,
            Command::PutNetwork {
                id: "net-front".into(),
                spec: serde_json::from_value(serde_json::json!({"name": "front"}))
                    .expect("network spec"),
                now: 21,
            },
        );
        let prev = s.clone();
        apply(&mut s, report(crate::TaskState::Running, 22));
        let c = changed(&prev, &s);
        assert!(c.all && c.nodes.is_empty(), "{c:?}");
        // A task waiting for a node is on no network map.
        let prev = s.clone();
        let mut waiting = t.clone();
        waiting.id = "t-waiting".into();
        waiting.node_id = None;
        apply(
            &mut s,
            Command::CreateTasks {
                tasks: vec![waiting],
            },
        );
        assert_eq!(changed(&prev, &s), Changed::default());
    }

    /// A service written without a task change (every `Apply`) wakes no session while no
    /// overlay network exists, since no session reads services then; once one exists, a
    /// service's change reaches every node's network map.
    #[test]
    fn a_service_change_wakes_sessions_only_when_networks_read_it() {
        let mut s = Store::default();
        s.apply(1, put_node("n1", 1)).unwrap();
        let put = |name: &str, idx: u64, s: &mut Store| {
            let spec = crate::spec::tests_support::spec(name, 0);
            s.apply(
                idx,
                Command::PutService {
                    id: format!("svc-{name}"),
                    spec: Box::new(spec),
                    now: idx,
                },
            )
            .unwrap();
        };
        let prev = s.clone();
        put("web", 2, &mut s);
        assert_eq!(changed(&prev, &s), Changed::default());
        // Tables no session reads: no wake either.
        let prev = s.clone();
        s.node_versions.insert("n1".into(), "0.1.0".into());
        assert_eq!(changed(&prev, &s), Changed::default());
        // With an overlay network, the same kind of change wakes everyone.
        let mut with_net = s.clone();
        with_net
            .apply(
                3,
                Command::PutNetwork {
                    id: "net-front".into(),
                    spec: serde_json::from_value(serde_json::json!({"name": "front"}))
                        .expect("network spec"),
                    now: 3,
                },
            )
            .unwrap();
        let prev = with_net.clone();
        put("api", 4, &mut with_net);
        assert!(changed(&prev, &with_net).all);
    }
}

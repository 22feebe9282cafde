//! The scheduler: a pure function from (nodes, tasks already placed, pending tasks) to
//! decisions. Filters drop nodes that cannot take a task; a score then spreads a service's tasks
//! over the nodes that remain. An unplaceable task comes back with a reason a human can act on.
//!
//! Invariant: decisions are deterministic for the same input (ties break on node id), so a test
//! or a replay sees the same placement.

use std::collections::BTreeMap;

use crate::store::{Node, NodeState, Task};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Assign { task_id: String, node_id: String },
    Unplaceable { task_id: String, reason: String },
}

/// Per-node load the score looks at, updated as decisions are made within one pass.
#[derive(Default, Clone)]
struct Load {
    total: usize,
    by_service: BTreeMap<String, usize>,
}

/// Places `pending` (in the order given) onto `nodes`, counting `placed` as existing load.
pub fn schedule<'a>(
    nodes: &BTreeMap<String, Node>,
    placed: impl IntoIterator<Item = &'a Task>,
    pending: &[&Task],
) -> Vec<Decision> {
    let mut load: BTreeMap<&str, Load> = nodes
        .values()
        .filter(|n| n.state == NodeState::Ready)
        .map(|n| (n.id.as_str(), Load::default()))
        .collect();
    for t in placed {
        if let Some(l) = t.node_id.as_deref().and_then(|n| load.get_mut(n)) {
            l.total += 1;
            *l.by_service.entry(t.service_id.clone()).or_default() += 1;
        }
    }
    let mut out = Vec::with_capacity(pending.len());
    for t in pending {
        // Spread: fewest tasks of this service, then fewest tasks overall, then node id.
        let best = load
            .iter()
            .min_by_key(|(id, l)| {
                (
                    l.by_service.get(&t.service_id).copied().unwrap_or(0),
                    l.total,
                    *id,
                )
            })
            .map(|(id, _)| *id);
        match best {
            Some(node) => {
                let l = load.get_mut(node).expect("chosen from the map");
                l.total += 1;
                *l.by_service.entry(t.service_id.clone()).or_default() += 1;
                out.push(Decision::Assign {
                    task_id: t.id.clone(),
                    node_id: node.to_string(),
                });
            }
            None => out.push(Decision::Unplaceable {
                task_id: t.id.clone(),
                reason: explain_no_nodes(nodes),
            }),
        }
    }
    out
}

fn explain_no_nodes(nodes: &BTreeMap<String, Node>) -> String {
    if nodes.is_empty() {
        "no nodes have joined the cluster".into()
    } else {
        format!("no node is ready ({} down)", nodes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests_support::spec;
    use crate::store::TaskStatus;
    use crate::task::TaskState;

    fn node(id: &str, state: NodeState) -> (String, Node) {
        (
            id.into(),
            Node {
                id: id.into(),
                hostname: id.into(),
                addr: String::new(),
                labels: Default::default(),
                state,
                updated_at: 0,
                version: 0,
            },
        )
    }

    fn task(id: &str, svc: &str, node: Option<&str>) -> Task {
        Task {
            id: id.into(),
            service_id: svc.into(),
            service_name: svc.into(),
            slot: 1,
            spec: spec(svc, 1),
            spec_version: 1,
            node_id: node.map(Into::into),
            desired_state: TaskState::Running,
            status: TaskStatus {
                state: TaskState::Pending,
                message: String::new(),
                error: String::new(),
                container_id: String::new(),
                exit_code: None,
                timestamp: 0,
            },
            created_at: 0,
            version: 0,
        }
    }

    fn counts(d: &[Decision]) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for x in d {
            if let Decision::Assign { node_id, .. } = x {
                *m.entry(node_id.clone()).or_default() += 1;
            }
        }
        m
    }

    #[test]
    fn spreads_evenly() {
        let nodes: BTreeMap<_, _> = [
            node("a", NodeState::Ready),
            node("b", NodeState::Ready),
            node("c", NodeState::Ready),
        ]
        .into();
        let pending: Vec<Task> = (0..6)
            .map(|i| task(&format!("t{i}"), "web", None))
            .collect();
        let refs: Vec<&Task> = pending.iter().collect();
        let d = schedule(&nodes, [], &refs);
        assert_eq!(counts(&d).values().copied().collect::<Vec<_>>(), [2, 2, 2]);
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            nodes: Vec<(String, Node)>,
            placed: Vec<Task>,
            pending: usize,
            want: Vec<(&'static str, usize)>,
            unplaceable: Option<&'static str>,
        }
        let cases = vec![
            Case {
                name: "down nodes are skipped",
                nodes: vec![node("a", NodeState::Down), node("b", NodeState::Ready)],
                placed: vec![],
                pending: 3,
                want: vec![("b", 3)],
                unplaceable: None,
            },
            Case {
                name: "existing load of the same service evens out first",
                nodes: vec![node("a", NodeState::Ready), node("b", NodeState::Ready)],
                placed: vec![task("x", "web", Some("a")), task("y", "web", Some("a"))],
                pending: 2,
                want: vec![("b", 2)],
                unplaceable: None,
            },
            Case {
                name: "other services' load breaks ties",
                nodes: vec![node("a", NodeState::Ready), node("b", NodeState::Ready)],
                placed: vec![task("x", "db", Some("a"))],
                pending: 1,
                want: vec![("b", 1)],
                unplaceable: None,
            },
            Case {
                name: "no nodes",
                nodes: vec![],
                placed: vec![],
                pending: 1,
                want: vec![],
                unplaceable: Some("no nodes have joined"),
            },
            Case {
                name: "all down",
                nodes: vec![node("a", NodeState::Down)],
                placed: vec![],
                pending: 1,
                want: vec![],
                unplaceable: Some("no node is ready (1 down)"),
            },
        ];
        for c in cases {
            let nodes: BTreeMap<_, _> = c.nodes.into_iter().collect();
            let pending: Vec<Task> = (0..c.pending)
                .map(|i| task(&format!("p{i}"), "web", None))
                .collect();
            let refs: Vec<&Task> = pending.iter().collect();
            let d = schedule(&nodes, c.placed.iter(), &refs);
            let want: BTreeMap<String, usize> = c
                .want
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            assert_eq!(counts(&d), want, "{}", c.name);
            if let Some(frag) = c.unplaceable {
                assert!(
                    d.iter().all(|x| matches!(x, Decision::Unplaceable { reason, .. } if reason.contains(frag))),
                    "{}: {d:?}",
                    c.name
                );
            }
        }
    }
}

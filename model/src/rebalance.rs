//! Rebalancing: moving a replicated service's tasks so they spread evenly again over the nodes
//! that may run them, e.g. after a node joined or came back (the scheduler only places new
//! tasks; nothing moves a running one by itself).
//!
//! - [`plan`] is the pure planner: given each eligible node's tasks (slot, movable), room for
//!   more and spread-preference labels, which slots move. Greedy and deterministic: while some
//!   node with a movable task holds at least two more tasks than a node with room (comparing
//!   their label branches first, as the scheduler's preferences spread), its highest slot moves
//!   there. A binpack service is not rebalanced (it fills nodes on purpose).
//! - [`plan_service`] builds that input from the store: eligible nodes are ready, active and
//!   pass the constraints; a node's room is how many more of the service's tasks the
//!   scheduler's filters accept there (reservations, host ports, `max_replicas_per_node`); a
//!   slot pinned by its per-slot volume (`crate::slotvol`) does not move.
//! - The moves are carried out as a rolling update: the service records the slots in
//!   [`RebalanceStatus`] and the reconciler treats those slots' tasks created before the
//!   rebalance started as outdated ([`moves`]), so they are replaced under the service's
//!   `update_config` (parallelism, delay, order, the health gate); the scheduler's spread puts
//!   each replacement on the emptiest node. [`progress`] records completion.
//! - `rebalance: auto` on a service does the same when a node becomes eligible (joins, comes
//!   back ready, is made active again), once the service runs all its replicas ([`auto`]).
//!
//! Invariants: pure (time comes in as an argument); a rebalance never changes the spec or the
//! replica count, only which node a slot's task runs on; a rebalance never starts while a
//! rollout or another rebalance is in progress.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::scheduler::{NodeInfo, Pipeline};
use crate::spec::ServiceMode;
use crate::store::{Availability, Command, NodeState, Service, Store, Task};
use crate::task::TaskState;

/// `rebalance:` on a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RebalanceMode {
    /// Only `rctl rebalance` moves tasks.
    #[default]
    Manual,
    /// Also when a node becomes eligible (joins or comes back ready).
    Auto,
}

impl RebalanceMode {
    /// Whether this is the default (not written in specs).
    pub fn is_manual(&self) -> bool {
        *self == RebalanceMode::Manual
    }
}

/// The service's last rebalance, as `rctl describe` shows it. System-owned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceStatus {
    /// The slots being (or that were) moved; empty when none was ever needed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<u64>,
    /// When it started (leader's clock, ms since the epoch): the slots' tasks created before
    /// are the ones to move.
    #[serde(default)]
    pub started_at: u64,
    /// When the last moved slot ran again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<u64>,
    /// What started it and the spread before (and, once completed, after).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// `rebalance: auto`: the eligible nodes when last looked, to notice one that is new.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes_seen: Vec<String>,
}

impl RebalanceStatus {
    /// Whether its moves are still being carried out.
    pub fn in_progress(&self) -> bool {
        !self.slots.is_empty() && self.completed_at.is_none()
    }
}

/// Why a service cannot be rebalanced now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RebalanceError {
    /// Only replicated services are spread (a global service has one task per node already).
    #[error(
        "rebalance: service {0:?} is not a replicated service (a global service runs one task \
         per eligible node already)"
    )]
    NotReplicated(String),
    /// Binpack fills the fullest node on purpose.
    #[error(
        "rebalance: service {0:?} uses the binpack strategy, which fills the fullest node on \
         purpose: there is nothing to spread"
    )]
    Binpack(String),
    /// A rollout or a rebalance is on.
    #[error("rebalance: service {0:?} is {1}; try again once it is over")]
    Busy(String, &'static str),
    /// Not every slot runs: moving tasks now would race the scheduler.
    #[error(
        "rebalance: service {service:?} runs {running} of {desired} replicas; try again once \
         all run"
    )]
    NotConverged {
        /// The service.
        service: String,
        /// Slots whose task runs.
        running: usize,
        /// Replicas.
        desired: u64,
    },
}

/// One eligible node as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoad {
    /// The node (its id or name: the planner only compares them).
    pub node: String,
    /// The service's tasks there: (slot, may move).
    pub tasks: Vec<(u64, bool)>,
    /// How many more of the service's tasks the node may take.
    pub room: usize,
    /// The node's values of the service's spread-preference labels, in order (`""` where it
    /// lacks one); empty without preferences.
    pub path: Vec<String>,
}

/// One planned move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The slot whose task moves.
    pub slot: u64,
    /// Where it runs.
    pub from: String,
    /// Where it should go (the scheduler's spread picks it; this is what the planner expects).
    pub to: String,
}

/// Which slots move so the service's tasks spread evenly over `loads` (pure, deterministic).
///
/// With placement preferences, nodes carry their label values (`path`) and the spread is
/// judged level by level, as the scheduler places: a move is worth making between two nodes
/// when, at the first level where their paths differ, the giving branch holds at least two
/// more tasks than the receiving one (at the node level: the nodes themselves). Moves that fix
/// a higher level come first; then the largest gap; then the emptier receiver; ties break on
/// the order of `loads`. Each move lowers the imbalance of the highest level it touches without
/// changing those above, so the loop ends.
pub fn plan(loads: &[NodeLoad]) -> Vec<Move> {
    let n = loads.len();
    let mut count: Vec<usize> = loads.iter().map(|l| l.tasks.len()).collect();
    let mut room: Vec<usize> = loads.iter().map(|l| l.room).collect();
    // Movable slots per node, highest last (popped first).
    let mut movable: Vec<Vec<u64>> = loads
        .iter()
        .map(|l| {
            let mut s: Vec<u64> = l.tasks.iter().filter(|t| t.1).map(|t| t.0).collect();
            s.sort_unstable();
            s
        })
        .collect();
    // Tasks under the first `len` labels of node `i`'s path (all of it plus the node: `None`).
    let under = |count: &[usize], i: usize, len: Option<usize>| -> usize {
        match len {
            None => count[i],
            Some(len) => (0..n)
                .filter(|&j| loads[j].path.get(..len) == loads[i].path.get(..len))
                .map(|j| count[j])
                .sum(),
        }
    };
    let mut moves = Vec::new();
    loop {
        // The best move, smallest key first: (level, larger gap, fuller giver, emptier
        // receiver, from, to).
        type Key = (
            usize,
            std::cmp::Reverse<usize>,
            std::cmp::Reverse<usize>,
            usize,
            usize,
            usize,
        );
        let mut best: Option<Key> = None;
        for from in (0..n).filter(|&i| !movable[i].is_empty()) {
            for to in (0..n).filter(|&i| i != from && room[i] > 0) {
                let (a, b) = (&loads[from].path, &loads[to].path);
                let level = (0..a.len().max(b.len()))
                    .find(|&d| a.get(d) != b.get(d))
                    .unwrap_or(a.len().max(b.len()));
                let len = (level < a.len().max(b.len())).then_some(level + 1);
                let (g_from, g_to) = (under(&count, from, len), under(&count, to, len));
                if g_from < g_to + 2 {
                    continue;
                }
                let cand: Key = (
                    level,
                    std::cmp::Reverse(g_from - g_to),
                    std::cmp::Reverse(count[from]),
                    count[to],
                    from,
                    to,
                );
                if best.is_none_or(|b| cand < b) {
                    best = Some(cand);
                }
            }
        }
        let Some((_, _, _, _, from, to)) = best else {
            break;
        };
        let slot = movable[from].pop().expect("non-empty");
        count[from] -= 1;
        count[to] += 1;
        room[to] -= 1;
        moves.push(Move {
            slot,
            from: loads[from].node.clone(),
            to: loads[to].node.clone(),
        });
    }
    moves
}

/// Whether a node may run the service's tasks at all (as global services see it).
fn eligible(service: &Service, n: &crate::Node) -> bool {
    n.state == NodeState::Ready
        && n.availability == Availability::Active
        && service
            .spec
            .placement
            .constraints
            .iter()
            .all(|c| c.matches(n))
}

/// The service's running, current tasks (one per slot, the newest).
fn running<'a>(service: &Service, tasks: &[&'a Task]) -> BTreeMap<u64, &'a Task> {
    let mut by_slot: BTreeMap<u64, &Task> = BTreeMap::new();
    for t in tasks.iter().copied().filter(|t| {
        t.desired_state == TaskState::Running
            && t.status.state == TaskState::Running
            && t.slot >= 1
            && t.slot <= service.spec.replicas
    }) {
        let e = by_slot.entry(t.slot).or_insert(t);
        if t.created_at > e.created_at {
            *e = t;
        }
    }
    by_slot
}

/// A planned rebalance of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The moves (empty: balanced already, as far as constraints and pins allow).
    pub moves: Vec<Move>,
    /// Tasks per eligible node (by hostname) now.
    pub before: BTreeMap<String, usize>,
    /// The eligible nodes' ids, sorted.
    pub eligible: Vec<String>,
}

impl Planned {
    /// `h1 4 → 2, h2 0 → 2` (or `h1 2, h2 2` when nothing moves).
    pub fn spread(&self, hostname: impl Fn(&str) -> String) -> String {
        let mut after = self.before.clone();
        for m in &self.moves {
            if let Some(c) = after.get_mut(&hostname(&m.from)) {
                *c -= 1;
            }
            *after.entry(hostname(&m.to)).or_default() += 1;
        }
        self.before
            .iter()
            .map(|(h, b)| match after.get(h) {
                Some(a) if a != b => format!("{h} {b} → {a}"),
                _ => format!("{h} {b}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Plans a rebalance of `service` over the store's nodes (see the module doc).
pub fn plan_service(store: &Store, service: &Service) -> Result<Planned, RebalanceError> {
    let name = || service.spec.name.clone();
    if service.spec.mode != ServiceMode::Replicated {
        return Err(RebalanceError::NotReplicated(name()));
    }
    if service.spec.placement.strategy == crate::spec::Strategy::Binpack {
        return Err(RebalanceError::Binpack(name()));
    }
    if service
        .update_status
        .as_ref()
        .is_some_and(|u| u.state.is_in_progress() || u.state.is_paused())
    {
        return Err(RebalanceError::Busy(name(), "updating"));
    }
    if service.rebalance.as_ref().is_some_and(|r| r.in_progress()) {
        return Err(RebalanceError::Busy(name(), "rebalancing"));
    }
    let tasks: Vec<&Task> = store.tasks_of(&service.id).collect();
    let run = running(service, &tasks);
    let live = tasks
        .iter()
        .filter(|t| t.desired_state == TaskState::Running && !t.status.state.is_terminal())
        .count();
    if run.len() as u64 != service.spec.replicas || live != run.len() {
        return Err(RebalanceError::NotConverged {
            service: name(),
            running: run.len(),
            desired: service.spec.replicas,
        });
    }
    // Room per node, by the scheduler's own filters, with every placed task counted.
    let mut infos: BTreeMap<&str, NodeInfo> = store
        .nodes
        .values()
        .filter(|n| eligible(service, n))
        .map(|n| (n.id.as_str(), NodeInfo::new(n)))
        .collect();
    for t in store.tasks.values().filter(|t| t.holds_resources()) {
        if let Some(i) = t.node_id.as_deref().and_then(|n| infos.get_mut(n)) {
            i.add(t);
        }
    }
    let sample = run.values().next().copied();
    let mut loads = Vec::new();
    let mut before = BTreeMap::new();
    for (id, info) in &mut infos {
        let on: Vec<(u64, bool)> = run
            .values()
            .filter(|t| t.node_id.as_deref() == Some(*id))
            .map(|t| (t.slot, crate::slotvol::pin(store, t).is_none()))
            .collect();
        let mut room = 0;
        if let Some(sample) = sample {
            let pipeline = Pipeline::for_task(sample);
            while room < run.len() && pipeline.check(info) {
                info.add(sample);
                room += 1;
            }
        }
        before.insert(info.node.hostname.clone(), on.len());
        let path = service
            .spec
            .placement
            .preferences
            .iter()
            .map(|p| info.node.labels.get(p.label()).cloned().unwrap_or_default())
            .collect();
        loads.push(NodeLoad {
            node: id.to_string(),
            tasks: on,
            room,
            path,
        });
    }
    Ok(Planned {
        moves: plan(&loads),
        before,
        eligible: infos.keys().map(|k| k.to_string()).collect(),
    })
}

/// Whether task `t` of `service` is to be moved by the rebalance in progress: the reconciler
/// then treats it as outdated, and the rollout replaces it.
pub fn moves(service: &Service, t: &Task) -> bool {
    service.rebalance.as_ref().is_some_and(|r| {
        r.in_progress() && t.created_at < r.started_at && r.slots.contains(&t.slot)
    })
}

/// The command that starts rebalancing `service` as planned, or `None` when nothing moves.
pub fn start(
    store: &Store,
    service: &Service,
    planned: &Planned,
    why: &str,
    now: u64,
) -> Option<Command> {
    if planned.moves.is_empty() {
        return None;
    }
    let host = |id: &str| {
        store
            .nodes
            .get(id)
            .map_or(id.to_string(), |n| n.hostname.clone())
    };
    let mut slots: Vec<u64> = planned.moves.iter().map(|m| m.slot).collect();
    slots.sort_unstable();
    Some(Command::SetRebalance {
        service: service.spec.name.clone(),
        if_started_at: service.rebalance.as_ref().map(|r| r.started_at),
        status: RebalanceStatus {
            message: format!(
                "{why}: moving slot{} {} ({})",
                if slots.len() == 1 { "" } else { "s" },
                slots
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                planned.spread(host)
            ),
            slots,
            started_at: now,
            completed_at: None,
            nodes_seen: planned.eligible.clone(),
        },
    })
}

/// The command that records the end of `service`'s rebalance, once every moved slot runs a
/// task created since it started (or is gone, scaled down).
pub fn progress(store: &Store, service: &Service, tasks: &[&Task], now: u64) -> Option<Command> {
    let r = service.rebalance.as_ref().filter(|r| r.in_progress())?;
    let run = running(service, tasks);
    let done = r.slots.iter().all(|s| {
        *s > service.spec.replicas || run.get(s).is_some_and(|t| t.created_at >= r.started_at)
    });
    let old_live = tasks
        .iter()
        .any(|t| moves(service, t) && !t.status.state.is_terminal());
    if !done || old_live {
        return None;
    }
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for t in run.values() {
        let node = t.node_id.as_deref().unwrap_or_default();
        let host = store.nodes.get(node).map_or(node, |n| n.hostname.as_str());
        *spread.entry(host.to_string()).or_default() += 1;
    }
    let after: Vec<String> = spread.iter().map(|(h, n)| format!("{h} {n}")).collect();
    let mut status = r.clone();
    status.completed_at = Some(now);
    status.message = format!("{}; completed: {}", r.message, after.join(", "));
    Some(Command::SetRebalance {
        service: service.spec.name.clone(),
        if_started_at: Some(r.started_at),
        status,
    })
}

/// `rebalance: auto`: when a node became eligible since the service last looked, and the
/// service runs all its replicas with no rollout on, the command that starts the rebalance
/// (or only records the nodes seen, when nothing needs to move or a node left).
pub fn auto(store: &Store, service: &Service, now: u64) -> Option<Command> {
    if service.spec.rebalance != RebalanceMode::Auto || service.spec.mode != ServiceMode::Replicated
    {
        return None;
    }
    let seen: BTreeSet<&str> = service
        .rebalance
        .as_ref()
        .map(|r| r.nodes_seen.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let now_eligible: BTreeSet<&str> = store
        .nodes
        .values()
        .filter(|n| eligible(service, n))
        .map(|n| n.id.as_str())
        .collect();
    if now_eligible == seen {
        return None;
    }
    let record = || {
        let mut status = service.rebalance.clone().unwrap_or_default();
        status.nodes_seen = now_eligible.iter().map(|s| s.to_string()).collect();
        Command::SetRebalance {
            service: service.spec.name.clone(),
            if_started_at: service.rebalance.as_ref().map(|r| r.started_at),
            status,
        }
    };
    if now_eligible.is_subset(&seen) {
        // Only losses: nothing to spread to; remember, so the node's return is noticed.
        return Some(record());
    }
    match plan_service(store, service) {
        // Busy or not all running yet: look again on a later pass.
        Err(_) => None,
        Ok(planned) => {
            let joined: Vec<String> = now_eligible
                .difference(&seen)
                .map(|id| {
                    store
                        .nodes
                        .get(*id)
                        .map_or(id.to_string(), |n| n.hostname.clone())
                })
                .collect();
            let why = format!("auto, node {} ready", joined.join(", "));
            Some(start(store, service, &planned, &why, now).unwrap_or_else(record))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(node: &str, slots: &[u64], pinned: &[u64], room: usize) -> NodeLoad {
        NodeLoad {
            node: node.into(),
            tasks: slots.iter().map(|s| (*s, !pinned.contains(s))).collect(),
            room,
            path: Vec::new(),
        }
    }

    fn zoned(zone: &str, l: NodeLoad) -> NodeLoad {
        NodeLoad {
            path: vec![zone.to_string()],
            ..l
        }
    }

    #[test]
    fn planner_table() {
        type Case = (
            &'static str,
            Vec<NodeLoad>,
            Vec<(u64, &'static str, &'static str)>,
        );
        let cases: Vec<Case> = vec![
            (
                "4 on one node, 2 nodes: 2 move",
                vec![load("a", &[1, 2, 3, 4], &[], 9), load("b", &[], &[], 9)],
                vec![(4, "a", "b"), (3, "a", "b")],
            ),
            (
                "balanced already",
                vec![load("a", &[1, 2], &[], 9), load("b", &[3, 4], &[], 9)],
                vec![],
            ),
            (
                "off by one is balanced",
                vec![load("a", &[1, 2, 3], &[], 9), load("b", &[4, 5], &[], 9)],
                vec![],
            ),
            (
                "three nodes, one new",
                vec![
                    load("a", &[1, 2, 3], &[], 9),
                    load("b", &[4, 5, 6], &[], 9),
                    load("c", &[], &[], 9),
                ],
                vec![(3, "a", "c"), (6, "b", "c")],
            ),
            (
                "pinned slots stay",
                vec![load("a", &[1, 2, 3, 4], &[3, 4], 9), load("b", &[], &[], 9)],
                vec![(2, "a", "b"), (1, "a", "b")],
            ),
            (
                "all pinned: nothing moves",
                vec![load("a", &[1, 2, 3], &[1, 2, 3], 9), load("b", &[], &[], 9)],
                vec![],
            ),
            (
                "room limits the receiver",
                vec![
                    load("a", &[1, 2, 3, 4, 5, 6], &[], 0),
                    load("b", &[], &[], 1),
                ],
                vec![(6, "a", "b")],
            ),
            (
                "no room anywhere",
                vec![load("a", &[1, 2, 3, 4], &[], 0), load("b", &[], &[], 0)],
                vec![],
            ),
            ("one node", vec![load("a", &[1, 2, 3], &[], 9)], vec![]),
            (
                "zones first: the lone node of the empty zone gets half",
                vec![
                    zoned("x", load("a", &[1, 2], &[], 9)),
                    zoned("x", load("b", &[3, 4], &[], 9)),
                    zoned("y", load("c", &[], &[], 9)),
                ],
                vec![(2, "a", "c"), (4, "b", "c")],
            ),
            (
                "zones balanced, nodes inside a zone are not",
                vec![
                    zoned("x", load("a", &[1, 2], &[], 9)),
                    zoned("x", load("b", &[], &[], 9)),
                    zoned("y", load("c", &[3, 4], &[], 9)),
                ],
                vec![(2, "a", "b")],
            ),
            (
                "even nodes across uneven zones stay: the zones are even",
                vec![
                    zoned("x", load("a", &[1], &[], 9)),
                    zoned("x", load("b", &[2], &[], 9)),
                    zoned("y", load("c", &[3, 4], &[], 9)),
                ],
                vec![],
            ),
            ("no nodes", vec![], vec![]),
            (
                "a full node gives to the emptiest first",
                vec![
                    load("a", &[1, 2, 3, 4, 5], &[], 9),
                    load("b", &[6], &[], 9),
                    load("c", &[], &[], 9),
                ],
                vec![(5, "a", "c"), (4, "a", "b"), (3, "a", "c")],
            ),
        ];
        for (what, loads, want) in cases {
            let got: Vec<(u64, String, String)> = plan(&loads)
                .into_iter()
                .map(|m| (m.slot, m.from, m.to))
                .collect();
            let want: Vec<(u64, String, String)> = want
                .into_iter()
                .map(|(s, f, t)| (s, f.to_string(), t.to_string()))
                .collect();
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn spread_text() {
        let p = Planned {
            moves: vec![Move {
                slot: 4,
                from: "n1".into(),
                to: "n2".into(),
            }],
            before: [("h1".to_string(), 3), ("h2".to_string(), 1)].into(),
            eligible: vec![],
        };
        assert_eq!(p.spread(|id| id.replace('n', "h")), "h1 3 → 2, h2 1 → 2");
    }
}

//! The scheduler: a pure function from (nodes, tasks already placed, pending tasks) to
//! decisions, built as a pipeline (as in swarmkit): filters drop the nodes that cannot take a
//! task, then a score picks among the rest — spread preferences over node labels first, then the
//! service's strategy (spread or binpack). An unplaceable task comes back with a reason a human
//! can act on, counting the nodes each filter turned away.
//!
//! How a pass runs: the per-node view ([`NodeInfo`]) is built once from the placed tasks and
//! updated as decisions are made. Pending tasks are grouped by (service, spec version, target
//! node): tasks of a group have the same spec, so the filters run once per group over all nodes;
//! each passing node goes into a heap ordered by its score, and placing a task pops the best node,
//! re-checks it (resources and the per-node cap change as tasks land) and pushes it back with
//! its new score. A node that fails the re-check is dropped for the rest of the group: within a
//! group, a node's load only grows.
//!
//! Invariant: decisions are deterministic for the same input (ties break on node id), so a test
//! or a replay sees the same placement.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

// The node loads are counted again from every placed task on each pass that places something
// (30,000 tasks at 1,000 hosts): std's SipHash of the ids was a tenth of the leader's CPU then
// (issue 20). The keys are our own ids, not an attacker's choice of many colliding ones.
use rustc_hash::{FxHashMap, FxHashSet};

use crate::ports::{host_ports, Protocol};
use crate::spec::{human_bytes, human_cpus, Constraint, Strategy};
use crate::store::{Availability, Node, NodeState, Task};

/// What the scheduler decides for one pending task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run the task on this node.
    Assign {
        /// The task.
        task_id: String,
        /// The node chosen.
        node_id: String,
    },
    /// No node fits; `reason` says which filters rejected how many nodes.
    Unplaceable {
        /// The task.
        task_id: String,
        /// Why no node fits.
        reason: String,
    },
}

/// A node as the filters and scores see it: the node and the load its active tasks put on it.
#[derive(Debug, Clone)]
pub struct NodeInfo<'a> {
    /// The node.
    pub node: &'a Node,
    /// Active tasks on the node, all services.
    pub tasks: usize,
    /// Active tasks on the node, by service id.
    pub by_service: FxHashMap<&'a str, usize>,
    /// Sum of the cpu reservations (millicpus) of the node's active tasks.
    pub reserved_cpus: u64,
    /// Sum of the memory reservations (bytes) of the node's active tasks.
    pub reserved_memory: u64,
    /// Host-mode ports the node's active tasks hold.
    pub host_ports: FxHashSet<(Protocol, u16)>,
    /// Names of the services with an active task on the node.
    pub service_names: FxHashSet<&'a str>,
}

impl<'a> NodeInfo<'a> {
    /// A node with no load counted yet.
    pub fn new(node: &'a Node) -> Self {
        NodeInfo {
            node,
            tasks: 0,
            by_service: FxHashMap::default(),
            reserved_cpus: 0,
            reserved_memory: 0,
            host_ports: FxHashSet::default(),
            service_names: FxHashSet::default(),
        }
    }

    /// Active tasks of this service on the node (for spreading).
    pub fn service_tasks(&self, service_id: &str) -> usize {
        self.by_service.get(service_id).copied().unwrap_or(0)
    }

    /// Counts `t` as running here.
    pub fn add(&mut self, t: &'a Task) {
        self.tasks += 1;
        *self.by_service.entry(t.service_id.as_str()).or_default() += 1;
        let r = &t.spec.resources.reservations;
        self.reserved_cpus += r.cpus;
        self.reserved_memory += r.memory;
        self.host_ports.extend(host_ports(&t.spec.ports));
        self.service_names.insert(t.service_name.as_str());
    }
}

/// One reason a node may not take a task. `set_task` says whether the filter applies to the task
/// at all (and remembers what it needs of it); `check` is then asked per node; `explain` turns the
/// number of nodes it turned away into words.
pub trait Filter {
    /// Whether the filter applies to `task` (and its group); remembers what it needs of it.
    fn set_task(&mut self, task: &Task) -> bool;
    /// Whether `node` may take the task.
    fn check(&self, node: &NodeInfo) -> bool;
    /// Why `nodes_failed` nodes were turned away, for the task's pending message.
    fn explain(&self, nodes_failed: usize) -> String;
}

/// `1 node` / `3 nodes`.
fn nodes(n: usize) -> String {
    if n == 1 {
        "1 node".into()
    } else {
        format!("{n} nodes")
    }
}

/// Picks the verb form for `n` subjects: `verb(n, "has", "have")`.
fn verb(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// The node's agent is connected (heartbeating).
struct ReadyFilter;

impl Filter for ReadyFilter {
    fn set_task(&mut self, _: &Task) -> bool {
        true
    }
    fn check(&self, n: &NodeInfo) -> bool {
        n.node.state == NodeState::Ready
    }
    fn explain(&self, failed: usize) -> String {
        format!("{} down", nodes(failed))
    }
}

/// The operator has not paused or drained the node.
struct AvailabilityFilter;

impl Filter for AvailabilityFilter {
    fn set_task(&mut self, _: &Task) -> bool {
        true
    }
    fn check(&self, n: &NodeInfo) -> bool {
        n.node.availability == Availability::Active
    }
    fn explain(&self, failed: usize) -> String {
        format!(
            "{} not available for new tasks (paused or drained)",
            nodes(failed)
        )
    }
}

/// One placement constraint (the pipeline holds one filter per constraint, so the reason names the
/// constraint that failed).
struct ConstraintFilter {
    index: usize,
    constraint: Option<Constraint>,
}

impl Filter for ConstraintFilter {
    fn set_task(&mut self, t: &Task) -> bool {
        self.constraint = t.spec.placement.constraints.get(self.index).cloned();
        self.constraint.is_some()
    }
    fn check(&self, n: &NodeInfo) -> bool {
        self.constraint.as_ref().is_none_or(|c| c.matches(n.node))
    }
    fn explain(&self, failed: usize) -> String {
        let c = self.constraint.as_ref().map(|c| c.to_string());
        format!(
            "{} {} constraint {}",
            nodes(failed),
            verb(failed, "fails", "fail"),
            c.unwrap_or_default()
        )
    }
}

/// Free cpu (capacity minus reservations) covers the task's cpu reservation.
#[derive(Default)]
struct CpuFilter {
    need: u64,
}

impl Filter for CpuFilter {
    fn set_task(&mut self, t: &Task) -> bool {
        self.need = t.spec.resources.reservations.cpus;
        self.need > 0
    }
    fn check(&self, n: &NodeInfo) -> bool {
        let cap = n.node.resources.cpus;
        cap == 0 || cap.saturating_sub(n.reserved_cpus) >= self.need
    }
    fn explain(&self, failed: usize) -> String {
        format!(
            "{} {} insufficient cpu: {} needed",
            nodes(failed),
            verb(failed, "has", "have"),
            human_cpus(self.need)
        )
    }
}

/// Free memory (capacity minus reservations) covers the task's memory reservation.
#[derive(Default)]
struct MemoryFilter {
    need: u64,
}

impl Filter for MemoryFilter {
    fn set_task(&mut self, t: &Task) -> bool {
        self.need = t.spec.resources.reservations.memory;
        self.need > 0
    }
    fn check(&self, n: &NodeInfo) -> bool {
        let cap = n.node.resources.memory;
        cap == 0 || cap.saturating_sub(n.reserved_memory) >= self.need
    }
    fn explain(&self, failed: usize) -> String {
        format!(
            "{} {} insufficient memory: {} needed",
            nodes(failed),
            verb(failed, "has", "have"),
            human_bytes(self.need)
        )
    }
}

/// Host-mode published ports must be free on the node.
#[derive(Default)]
struct HostPortFilter {
    need: Vec<(Protocol, u16)>,
}

impl Filter for HostPortFilter {
    fn set_task(&mut self, t: &Task) -> bool {
        self.need = host_ports(&t.spec.ports).collect();
        !self.need.is_empty()
    }
    fn check(&self, n: &NodeInfo) -> bool {
        !self.need.iter().any(|p| n.host_ports.contains(p))
    }
    fn explain(&self, failed: usize) -> String {
        let ports: Vec<String> = self
            .need
            .iter()
            .map(|(proto, port)| format!("{port}/{}", proto.as_str()))
            .collect();
        format!(
            "{} {} host port {} in use",
            nodes(failed),
            verb(failed, "has", "have"),
            ports.join(", ")
        )
    }
}

/// `placement.max_replicas_per_node`.
#[derive(Default)]
struct MaxReplicasFilter {
    service: String,
    max: u64,
}

impl Filter for MaxReplicasFilter {
    fn set_task(&mut self, t: &Task) -> bool {
        self.service.clone_from(&t.service_id);
        self.max = t.spec.placement.max_replicas_per_node;
        self.max > 0
    }
    fn check(&self, n: &NodeInfo) -> bool {
        (n.service_tasks(&self.service) as u64) < self.max
    }
    fn explain(&self, failed: usize) -> String {
        format!(
            "{} already {} {} of this service (max_replicas_per_node)",
            nodes(failed),
            verb(failed, "runs", "run"),
            if self.max == 1 {
                "1 task".to_string()
            } else {
                format!("{} tasks", self.max)
            }
        )
    }
}

/// `network_mode: container:X`: only where a task of X runs (its namespace is shared).
#[derive(Default)]
struct SharedNetnsFilter {
    service: String,
}

impl Filter for SharedNetnsFilter {
    fn set_task(&mut self, t: &Task) -> bool {
        match t.spec.network_mode.shared_service() {
            Some(s) => {
                self.service = s.to_string();
                true
            }
            None => false,
        }
    }
    fn check(&self, n: &NodeInfo) -> bool {
        n.service_names.contains(self.service.as_str())
    }
    fn explain(&self, failed: usize) -> String {
        format!(
            "{} {} no task of {} (network_mode: container:{})",
            nodes(failed),
            verb(failed, "runs", "run"),
            self.service,
            self.service
        )
    }
}

/// A per-slot volume pins the task to the node holding its data (`crate::slotvol`). First in
/// the pipeline, so the reason counts every other node against it and says how to release it.
struct SlotVolumeFilter {
    pin: crate::slotvol::Pin,
    /// The pinned node's hostname (its id when it has left the cluster).
    host: String,
}

impl Filter for SlotVolumeFilter {
    fn set_task(&mut self, _: &Task) -> bool {
        true
    }
    fn check(&self, n: &NodeInfo) -> bool {
        n.node.id == self.pin.node_id
    }
    fn explain(&self, failed: usize) -> String {
        let v = &self.pin.volume;
        format!(
            "{} {} not hold volume {v} of slot {}, which is on {} \
             (`rctl volume rm {v}` releases the slot, without its data)",
            nodes(failed),
            verb(failed, "does", "do"),
            self.pin.slot,
            self.host
        )
    }
}

/// The filters that apply to one task (and every task of its group), in order.
pub struct Pipeline {
    filters: Vec<Box<dyn Filter>>,
}

impl Pipeline {
    /// The filters `t`'s spec calls for: readiness and availability, then its constraints,
    /// resources and ports.
    pub fn for_task(t: &Task) -> Self {
        let mut all: Vec<Box<dyn Filter>> =
            vec![Box::new(ReadyFilter), Box::new(AvailabilityFilter)];
        for index in 0..t.spec.placement.constraints.len() {
            all.push(Box::new(ConstraintFilter {
                index,
                constraint: None,
            }));
        }
        all.push(Box::<CpuFilter>::default());
        all.push(Box::<MemoryFilter>::default());
        all.push(Box::<HostPortFilter>::default());
        all.push(Box::<MaxReplicasFilter>::default());
        all.push(Box::<SharedNetnsFilter>::default());
        all.retain_mut(|f| f.set_task(t));
        Pipeline { filters: all }
    }

    /// Whether every filter accepts the node.
    pub fn check(&self, n: &NodeInfo) -> bool {
        self.filters.iter().all(|f| f.check(n))
    }

    /// Why none of `infos` can take the task: per filter, the nodes it was the first to reject.
    pub fn explain<'b, 'a: 'b>(&self, infos: impl IntoIterator<Item = &'b NodeInfo<'a>>) -> String {
        let mut failed = vec![0usize; self.filters.len()];
        let mut seen = 0;
        for n in infos {
            seen += 1;
            if let Some(i) = self.filters.iter().position(|f| !f.check(n)) {
                failed[i] += 1;
            }
        }
        if seen == 0 {
            return "no nodes have joined the cluster".into();
        }
        let parts: Vec<String> = self
            .filters
            .iter()
            .zip(&failed)
            .filter(|(_, n)| **n > 0)
            .map(|(f, n)| f.explain(*n))
            .collect();
        if parts.is_empty() {
            "no suitable node".into()
        } else {
            format!("no suitable node ({})", parts.join("; "))
        }
    }
}

/// Heap order of a node inside a group; smaller is better. The last part is the node's index,
/// which follows node ids, so ties break on node id.
type Score = (u64, u64, usize);

fn score(strategy: Strategy, n: &NodeInfo, service: &str, need: (u64, u64), idx: usize) -> Score {
    match strategy {
        Strategy::Spread => (n.service_tasks(service) as u64, n.tasks as u64, idx),
        Strategy::Binpack => {
            // Share of the node's capacity reserved once the task lands (parts per million, cpu
            // plus memory); unknown capacity counts as empty. The fullest node that fits wins.
            let share = |reserved: u64, need: u64, cap: u64| {
                (reserved + need)
                    .saturating_mul(1_000_000)
                    .checked_div(cap)
                    .unwrap_or(0)
            };
            let used = share(n.reserved_cpus, need.0, n.node.resources.cpus)
                + share(n.reserved_memory, need.1, n.node.resources.memory);
            (u64::MAX - used, u64::MAX - n.tasks as u64, idx)
        }
    }
}

/// Candidate nodes that share the same values of the preference labels.
struct Leaf<'a> {
    /// Label values, one per preference (`""` where the node lacks the label).
    path: Vec<&'a str>,
    /// For each preference level, the index of this leaf's prefix in the group's counters.
    prefixes: Vec<usize>,
    heap: BinaryHeap<Reverse<Score>>,
}

/// Places `pending` onto `nodes`, counting `placed` (the active tasks) as existing load. Returns
/// one decision per pending task, in the order given.
pub fn schedule<'a>(
    nodes: &'a crate::store::Map<String, Node>,
    placed: impl IntoIterator<Item = &'a Task>,
    pending: &[&'a Task],
) -> Vec<Decision> {
    schedule_pinned(nodes, placed, pending, &[])
}

/// [`schedule`], where `pins[i]` (when given) confines `pending[i]` to the node holding its
/// slot's volume.
pub fn schedule_pinned<'a>(
    nodes: &'a crate::store::Map<String, Node>,
    placed: impl IntoIterator<Item = &'a Task>,
    pending: &[&'a Task],
    pins: &[Option<crate::slotvol::Pin>],
) -> Vec<Decision> {
    let pin_of = |i: usize| pins.get(i).and_then(Option::as_ref);
    let mut infos: Vec<NodeInfo<'a>> = nodes.values().map(NodeInfo::new).collect();
    let index: FxHashMap<&str, usize> = nodes
        .keys()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    for t in placed {
        if let Some(&i) = t.node_id.as_deref().and_then(|n| index.get(n)) {
            infos[i].add(t);
        }
    }

    // Group pending tasks that share a spec (and, for global services, a node).
    let mut groups: Vec<Vec<usize>> = Vec::new();
    type GroupKey<'k> = (&'k str, u64, Option<&'k str>, Option<&'k str>);
    let mut group_of: HashMap<GroupKey, usize> = HashMap::new();
    for (i, t) in pending.iter().enumerate() {
        let key = (
            t.service_id.as_str(),
            t.spec_version,
            t.target_node.as_deref(),
            pin_of(i).map(|p| p.volume.as_str()),
        );
        let g = *group_of.entry(key).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }

    let mut out: Vec<Option<Decision>> = vec![None; pending.len()];
    for members in groups {
        let first = pending[members[0]];
        let mut pipeline = Pipeline::for_task(first);
        if let Some(pin) = pin_of(members[0]) {
            let host = nodes
                .get(&pin.node_id)
                .map_or(pin.node_id.as_str(), |n| n.hostname.as_str());
            pipeline.filters.insert(
                0,
                Box::new(SlotVolumeFilter {
                    pin: pin.clone(),
                    host: host.to_string(),
                }),
            );
        }
        let candidates: Vec<usize> = match first.target_node.as_deref() {
            Some(target) => match index.get(target) {
                Some(&i) => vec![i],
                None => {
                    let reason = format!("node {target} has left the cluster");
                    for &m in &members {
                        out[m] = Some(unplaceable(pending[m], &reason));
                    }
                    continue;
                }
            },
            None => (0..infos.len()).collect(),
        };
        let placements = place_group(&pipeline, first, &candidates, &mut infos, members.len());
        let mut reason = None;
        for (k, &m) in members.iter().enumerate() {
            let t = pending[m];
            out[m] = Some(match placements.get(k) {
                Some(&i) => Decision::Assign {
                    task_id: t.id.clone(),
                    node_id: infos[i].node.id.clone(),
                },
                None => {
                    let reason = reason.get_or_insert_with(|| {
                        let why = pipeline.explain(candidates.iter().map(|&i| &infos[i]));
                        match first.target_node.as_deref() {
                            Some(_) if !candidates.is_empty() => format!(
                                "global task cannot run on node {}: {why}",
                                infos[candidates[0]].node.hostname
                            ),
                            _ => why,
                        }
                    });
                    unplaceable(t, reason)
                }
            });
        }
    }
    out.into_iter()
        .map(|d| d.expect("every pending task gets a decision"))
        .collect()
}

fn unplaceable(t: &Task, reason: &str) -> Decision {
    Decision::Unplaceable {
        task_id: t.id.clone(),
        reason: reason.to_string(),
    }
}

/// Chooses nodes for up to `count` tasks like `task` (the tasks of its group), in order, and adds
/// their load to `infos` as it goes.
fn place_group<'a>(
    pipeline: &Pipeline,
    task: &'a Task,
    candidates: &[usize],
    infos: &mut [NodeInfo<'a>],
    count: usize,
) -> Vec<usize> {
    let placement = &task.spec.placement;
    let service = task.service_id.as_str();
    let need = (
        task.spec.resources.reservations.cpus,
        task.spec.resources.reservations.memory,
    );
    let labels: Vec<&str> = placement.preferences.iter().map(|p| p.label()).collect();
    let path_of = |n: &'a Node| -> Vec<&'a str> {
        labels
            .iter()
            .map(|l| n.labels.get(*l).map(String::as_str).unwrap_or(""))
            .collect()
    };

    // Leaves of the preference tree (one leaf when there are no preferences) and the number of
    // this service's tasks under each prefix.
    let mut leaves: Vec<Leaf<'a>> = Vec::new();
    let mut leaf_of: HashMap<Vec<&'a str>, usize> = HashMap::new();
    let mut prefix_ids: HashMap<Vec<&'a str>, usize> = HashMap::new();
    let mut counts: Vec<usize> = Vec::new();
    for &i in candidates {
        let n = &infos[i];
        if !pipeline.check(n) {
            continue;
        }
        let path = path_of(n.node);
        let leaf = match leaf_of.get(&path) {
            Some(&l) => l,
            None => {
                let prefixes = (1..=path.len())
                    .map(|len| {
                        *prefix_ids.entry(path[..len].to_vec()).or_insert_with(|| {
                            counts.push(0);
                            counts.len() - 1
                        })
                    })
                    .collect();
                leaves.push(Leaf {
                    path: path.clone(),
                    prefixes,
                    heap: BinaryHeap::new(),
                });
                leaf_of.insert(path, leaves.len() - 1);
                leaves.len() - 1
            }
        };
        leaves[leaf]
            .heap
            .push(Reverse(score(placement.strategy, n, service, need, i)));
    }
    if !labels.is_empty() {
        // Existing tasks of the service count wherever they run, even on nodes that cannot take
        // more: a full zone is still a zone that has its share.
        for n in infos.iter() {
            if n.service_tasks(service) == 0 {
                continue;
            }
            let path = path_of(n.node);
            for len in 1..=path.len() {
                if let Some(&p) = prefix_ids.get(&path[..len]) {
                    counts[p] += n.service_tasks(service);
                }
            }
        }
    }

    let mut chosen = Vec::with_capacity(count);
    while chosen.len() < count {
        // The leaf with the fewest tasks at the first level, then the next, ties on label value.
        let best = leaves
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.heap.is_empty())
            .min_by(|(_, a), (_, b)| compare_leaves(a, b, &counts))
            .map(|(i, _)| i);
        let Some(l) = best else { break };
        let Some(Reverse((_, _, i))) = leaves[l].heap.pop() else {
            continue;
        };
        let info = &mut infos[i];
        if !pipeline.check(info) {
            // Load only grows within a group: this node is out for the rest of it.
            continue;
        }
        info.add(task);
        chosen.push(i);
        for &p in &leaves[l].prefixes {
            counts[p] += 1;
        }
        let s = score(placement.strategy, info, service, need, i);
        leaves[l].heap.push(Reverse(s));
    }
    chosen
}

fn compare_leaves(a: &Leaf, b: &Leaf, counts: &[usize]) -> Ordering {
    for level in 0..a.path.len() {
        let o = counts[a.prefixes[level]]
            .cmp(&counts[b.prefixes[level]])
            .then_with(|| a.path[level].cmp(b.path[level]));
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::spec::tests_support::spec;
    use crate::spec::{Placement, Preference, Resources, ServiceSpec};
    use crate::store::{NodeResources, NodeRole, TaskStatus};
    use crate::task::TaskState;

    const GI: u64 = 1 << 30;

    /// A ready, active worker `id` with hostname `h-<id>`; `labels` as `k=v,k=v`.
    fn node(id: &str, labels: &str) -> Node {
        Node {
            id: id.into(),
            hostname: format!("h-{id}"),
            addr: String::new(),
            labels: labels
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect(),
            role: NodeRole::Worker,
            availability: Availability::Active,
            resources: NodeResources::default(),
            state: NodeState::Ready,
            updated_at: 0,
            version: 0,
            controller_id: None,
            host_labels: Default::default(),
            overlay_key: String::new(),
            cert_not_after: 0,
        }
    }

    fn with(mut n: Node, f: impl FnOnce(&mut Node)) -> Node {
        f(&mut n);
        n
    }

    fn sized(id: &str, cpus: u64, memory: u64) -> Node {
        with(node(id, ""), |n| {
            n.resources = NodeResources { cpus, memory }
        })
    }

    fn task(id: &str, spec: &ServiceSpec, node: Option<&str>) -> Task {
        Task {
            id: id.into(),
            service_id: spec.name.clone(),
            service_name: spec.name.clone(),
            slot: 1,
            spec: spec.clone().into(),
            spec_version: 1,
            node_id: node.map(Into::into),
            target_node: None,
            desired_state: TaskState::Running,
            status: TaskStatus {
                state: TaskState::Pending,
                message: String::new(),
                error: String::new(),
                container_id: String::new(),
                exit_code: None,
                timestamp: 0,
            },
            running_at: None,
            stop_requested_at: None,
            networks: Vec::new(),
            created_at: 0,
            version: 0,
            image_digest: None,
        }
    }

    fn svc(name: &str, f: impl FnOnce(&mut ServiceSpec)) -> ServiceSpec {
        let mut s = spec(name, 1);
        f(&mut s);
        s
    }

    fn constrained(cs: &[&str]) -> ServiceSpec {
        svc("web", |s| {
            s.placement.constraints = cs.iter().map(|c| c.parse().unwrap()).collect()
        })
    }

    fn reserving(cpus: u64, memory: u64) -> ServiceSpec {
        svc("web", |s| {
            s.resources = Resources {
                reservations: crate::spec::Reservations { cpus, memory },
                ..Default::default()
            }
        })
    }

    fn run(nodes: &[Node], placed: &[Task], pending: &[Task]) -> Vec<Decision> {
        let nodes: crate::store::Map<String, Node> =
            nodes.iter().map(|n| (n.id.clone(), n.clone())).collect();
        let refs: Vec<&Task> = pending.iter().collect();
        schedule(&nodes, placed, &refs)
    }

    fn pending(spec: &ServiceSpec, n: usize) -> Vec<Task> {
        (0..n)
            .map(|i| task(&format!("{}-p{i}", spec.name), spec, None))
            .collect()
    }

    /// Node id → tasks assigned, for the decisions.
    fn counts(d: &[Decision]) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for x in d {
            if let Decision::Assign { node_id, .. } = x {
                *m.entry(node_id.clone()).or_default() += 1;
            }
        }
        m
    }

    fn reasons(d: &[Decision]) -> Vec<&str> {
        d.iter()
            .filter_map(|x| match x {
                Decision::Unplaceable { reason, .. } => Some(reason.as_str()),
                _ => None,
            })
            .collect()
    }

    struct Case {
        name: &'static str,
        nodes: Vec<Node>,
        placed: Vec<Task>,
        spec: ServiceSpec,
        pending: usize,
        /// Expected assignments per node id.
        want: Vec<(&'static str, usize)>,
        /// The exact reason of every unplaceable task, if any.
        reason: Option<&'static str>,
    }

    fn check(cases: Vec<Case>) {
        for c in cases {
            let d = run(&c.nodes, &c.placed, &pending(&c.spec, c.pending));
            assert_eq!(d.len(), c.pending, "{}", c.name);
            let want: BTreeMap<String, usize> =
                c.want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            assert_eq!(counts(&d), want, "{}: {d:?}", c.name);
            let placed: usize = want.values().sum();
            let r = reasons(&d);
            assert_eq!(r.len(), c.pending - placed, "{}", c.name);
            if let Some(reason) = c.reason {
                assert!(r.iter().all(|x| *x == reason), "{}: {r:?}", c.name);
            }
        }
    }

    #[test]
    fn filters() {
        let web = spec("web", 1);
        check(vec![
            Case {
                name: "no nodes",
                nodes: vec![],
                placed: vec![],
                spec: web.clone(),
                pending: 1,
                want: vec![],
                reason: Some("no nodes have joined the cluster"),
            },
            Case {
                name: "down nodes are skipped",
                nodes: vec![
                    with(node("a", ""), |n| n.state = NodeState::Down),
                    node("b", ""),
                ],
                placed: vec![],
                spec: web.clone(),
                pending: 3,
                want: vec![("b", 3)],
                reason: None,
            },
            Case {
                name: "all down",
                nodes: vec![with(node("a", ""), |n| n.state = NodeState::Down)],
                placed: vec![],
                spec: web.clone(),
                pending: 1,
                want: vec![],
                reason: Some("no suitable node (1 node down)"),
            },
            Case {
                name: "paused and drained nodes take nothing new",
                nodes: vec![
                    with(node("a", ""), |n| n.availability = Availability::Pause),
                    with(node("b", ""), |n| n.availability = Availability::Drain),
                    node("c", ""),
                ],
                placed: vec![],
                spec: web.clone(),
                pending: 2,
                want: vec![("c", 2)],
                reason: None,
            },
            Case {
                name: "availability reason",
                nodes: vec![
                    with(node("a", ""), |n| n.availability = Availability::Pause),
                    with(node("b", ""), |n| n.availability = Availability::Drain),
                    with(node("c", ""), |n| n.state = NodeState::Down),
                ],
                placed: vec![],
                spec: web.clone(),
                pending: 1,
                want: vec![],
                reason: Some(
                    "no suitable node (1 node down; 2 nodes not available for new tasks \
                     (paused or drained))",
                ),
            },
            Case {
                name: "label constraint",
                nodes: vec![node("a", "zone=a"), node("b", "zone=b"), node("c", "")],
                placed: vec![],
                spec: constrained(&["node.labels.zone==b"]),
                pending: 2,
                want: vec![("b", 2)],
                reason: None,
            },
            Case {
                name: "host label constraint reads the host's labels, not the operator's",
                nodes: vec![
                    with(node("a", "disk=ssd"), |n| {
                        n.host_labels.insert("disk".into(), "hdd".into());
                    }),
                    with(node("b", ""), |n| {
                        n.host_labels.insert("disk".into(), "ssd".into());
                    }),
                    node("c", "disk=ssd"),
                ],
                placed: vec![],
                spec: constrained(&["engine.labels.disk==ssd"]),
                pending: 2,
                want: vec![("b", 2)],
                reason: None,
            },
            Case {
                name: "negative constraints match nodes without the label",
                nodes: vec![node("a", "zone=a"), node("b", "zone=b"), node("c", "")],
                placed: vec![],
                spec: constrained(&["node.labels.zone!=a"]),
                pending: 2,
                want: vec![("b", 1), ("c", 1)],
                reason: None,
            },
            Case {
                name: "role and hostname constraints",
                nodes: vec![
                    with(node("a", ""), |n| n.role = NodeRole::Manager),
                    with(node("b", ""), |n| n.role = NodeRole::Manager),
                    node("c", ""),
                ],
                placed: vec![],
                spec: constrained(&["node.role==manager", "node.hostname!=h-a"]),
                pending: 2,
                want: vec![("b", 2)],
                reason: None,
            },
            Case {
                name: "node id constraint",
                nodes: vec![node("a", ""), node("b", "")],
                placed: vec![],
                spec: constrained(&["node.id==a"]),
                pending: 1,
                want: vec![("a", 1)],
                reason: None,
            },
            Case {
                name: "constraint reason names each failing constraint",
                nodes: vec![
                    node("a", "zone=a"),
                    node("b", "zone=a"),
                    node("c", "zone=b"),
                    with(node("d", "zone=b"), |n| n.state = NodeState::Down),
                ],
                placed: vec![],
                spec: constrained(&["node.labels.zone==b", "node.role==manager"]),
                pending: 1,
                want: vec![],
                reason: Some(
                    "no suitable node (1 node down; 2 nodes fail constraint \
                     node.labels.zone==b; 1 node fails constraint node.role==manager)",
                ),
            },
            Case {
                name: "memory reservations fill nodes",
                nodes: vec![sized("a", 0, 4 * GI), sized("b", 0, 2 * GI)],
                placed: vec![],
                spec: reserving(0, GI),
                pending: 7,
                want: vec![("a", 4), ("b", 2)],
                reason: Some("no suitable node (2 nodes have insufficient memory: 1 GiB needed)"),
            },
            Case {
                name: "reservations of placed tasks count; unknown capacity is unlimited",
                nodes: vec![sized("a", 0, 4 * GI), sized("b", 0, 0)],
                placed: vec![task("x", &reserving(0, 3 * GI), Some("a"))],
                spec: reserving(0, 2 * GI),
                pending: 3,
                want: vec![("b", 3)],
                reason: None,
            },
            Case {
                name: "cpu reservations",
                nodes: vec![sized("a", 2000, 0), sized("b", 1000, 0)],
                placed: vec![],
                spec: reserving(1500, 0),
                pending: 2,
                want: vec![("a", 1)],
                reason: Some("no suitable node (2 nodes have insufficient cpu: 1.5 cpus needed)"),
            },
            Case {
                name: "max replicas per node",
                nodes: vec![node("a", ""), node("b", "")],
                placed: vec![task("x", &web, Some("a"))],
                spec: svc("web", |s| s.placement.max_replicas_per_node = 2),
                pending: 4,
                want: vec![("a", 1), ("b", 2)],
                reason: Some(
                    "no suitable node (2 nodes already run 2 tasks of this service \
                     (max_replicas_per_node))",
                ),
            },
            Case {
                name: "host ports: one task per node, and not where another service holds it",
                nodes: vec![node("a", ""), node("b", ""), node("c", "")],
                placed: vec![task(
                    "x",
                    &svc("db", |s| s.ports = vec![port(8080)]),
                    Some("c"),
                )],
                spec: svc("web", |s| s.ports = vec![port(8080)]),
                pending: 3,
                want: vec![("a", 1), ("b", 1)],
                reason: Some("no suitable node (3 nodes have host port 8080/tcp in use)"),
            },
        ]);
    }

    fn port(p: u16) -> crate::ports::PortConfig {
        crate::ports::PortConfig {
            target: p,
            published: None,
            protocol: Protocol::Tcp,
            mode: crate::ports::PortMode::Host,
        }
    }

    #[test]
    fn scores() {
        let web = spec("web", 1);
        let db = spec("db", 1);
        let binpack = |cpus, memory| {
            svc("web", |s| {
                s.placement.strategy = Strategy::Binpack;
                s.resources.reservations.cpus = cpus;
                s.resources.reservations.memory = memory;
            })
        };
        check(vec![
            Case {
                name: "spread evens out",
                nodes: vec![node("a", ""), node("b", ""), node("c", "")],
                placed: vec![],
                spec: web.clone(),
                pending: 6,
                want: vec![("a", 2), ("b", 2), ("c", 2)],
                reason: None,
            },
            Case {
                name: "spread: existing load of the same service first",
                nodes: vec![node("a", ""), node("b", "")],
                placed: vec![task("x", &web, Some("a")), task("y", &web, Some("a"))],
                spec: web.clone(),
                pending: 2,
                want: vec![("b", 2)],
                reason: None,
            },
            Case {
                name: "spread: other services' load breaks ties",
                nodes: vec![node("a", ""), node("b", "")],
                placed: vec![task("x", &db, Some("a"))],
                spec: web.clone(),
                pending: 1,
                want: vec![("b", 1)],
                reason: None,
            },
            Case {
                name: "binpack fills the fullest node that fits",
                nodes: vec![sized("a", 4000, 0), sized("b", 4000, 0)],
                placed: vec![task("x", &reserving(1000, 0), Some("b"))],
                spec: binpack(1000, 0),
                pending: 4,
                want: vec![("a", 1), ("b", 3)],
                reason: None,
            },
            Case {
                name: "binpack weighs share of capacity: the small node fills first",
                nodes: vec![sized("a", 0, 16 * GI), sized("b", 0, 4 * GI)],
                placed: vec![],
                spec: binpack(0, GI),
                pending: 5,
                want: vec![("a", 1), ("b", 4)],
                reason: None,
            },
            Case {
                name: "binpack without reservations packs by task count",
                nodes: vec![node("a", ""), node("b", "")],
                placed: vec![task("x", &db, Some("b"))],
                spec: binpack(0, 0),
                pending: 3,
                want: vec![("b", 3)],
                reason: None,
            },
        ]);
    }

    #[test]
    fn spread_preferences() {
        let by = |labels: &[&str]| {
            svc("web", |s| {
                s.placement = Placement {
                    preferences: labels
                        .iter()
                        .map(|l| Preference {
                            spread: format!("node.labels.{l}"),
                        })
                        .collect(),
                    ..Default::default()
                }
            })
        };
        let web = by(&["zone"]);
        check(vec![
            Case {
                name: "zones get equal shares whatever their size",
                nodes: vec![
                    node("a1", "zone=a"),
                    node("a2", "zone=a"),
                    node("a3", "zone=a"),
                    node("b1", "zone=b"),
                ],
                placed: vec![],
                spec: web.clone(),
                pending: 6,
                want: vec![("a1", 1), ("a2", 1), ("a3", 1), ("b1", 3)],
                reason: None,
            },
            Case {
                name: "nodes without the label form their own branch",
                nodes: vec![node("a1", "zone=a"), node("a2", "zone=a"), node("x", "")],
                placed: vec![],
                spec: web.clone(),
                pending: 4,
                want: vec![("a1", 1), ("a2", 1), ("x", 2)],
                reason: None,
            },
            Case {
                name: "existing tasks count, even on a full node",
                nodes: vec![sized("a1", 0, GI), with(node("b1", "zone=b"), |_| {})]
                    .into_iter()
                    .map(|n| {
                        if n.id == "a1" {
                            with(n, |n| {
                                n.labels.insert("zone".into(), "a".into());
                            })
                        } else {
                            n
                        }
                    })
                    .collect(),
                placed: vec![task("x", &web, Some("a1")), task("y", &web, Some("a1"))],
                spec: svc("web", |s| {
                    s.placement = web.placement.clone();
                    s.resources.reservations.memory = GI;
                }),
                pending: 1,
                want: vec![("b1", 1)],
                reason: None,
            },
            Case {
                name: "two levels: zone, then rack",
                nodes: vec![
                    node("a1", "zone=a,rack=1"),
                    node("a2", "zone=a,rack=1"),
                    node("a3", "zone=a,rack=2"),
                    node("b1", "zone=b,rack=1"),
                ],
                placed: vec![],
                spec: by(&["zone", "rack"]),
                pending: 4,
                want: vec![("a1", 1), ("a3", 1), ("b1", 2)],
                reason: None,
            },
            Case {
                name: "a full branch gives way to the next",
                nodes: vec![sized("a1", 0, GI), sized("b1", 0, 8 * GI)]
                    .into_iter()
                    .map(|n| {
                        let zone = if n.id == "a1" { "a" } else { "b" };
                        with(n, |n| {
                            n.labels.insert("zone".into(), zone.into());
                        })
                    })
                    .collect(),
                placed: vec![],
                spec: svc("web", |s| {
                    s.placement = web.placement.clone();
                    s.resources.reservations.memory = GI;
                }),
                pending: 4,
                want: vec![("a1", 1), ("b1", 3)],
                reason: None,
            },
        ]);
    }

    #[test]
    fn global_tasks_only_go_to_their_node() {
        let mut web = reserving(0, 2 * GI);
        web.mode = crate::spec::ServiceMode::Global;
        let nodes = [sized("a", 0, 4 * GI), sized("b", 0, GI)];
        let mut ts: Vec<Task> = ["a", "b", "gone"]
            .iter()
            .map(|n| {
                let mut t = task(&format!("t-{n}"), &web, None);
                t.slot = 0;
                t.target_node = Some(n.to_string());
                t
            })
            .collect();
        ts.push(task("replicated", &spec("db", 1), None));
        let d = run(&nodes, &[], &ts);
        assert_eq!(
            d,
            vec![
                Decision::Assign {
                    task_id: "t-a".into(),
                    node_id: "a".into()
                },
                Decision::Unplaceable {
                    task_id: "t-b".into(),
                    reason: "global task cannot run on node h-b: no suitable node (1 node has \
                             insufficient memory: 2 GiB needed)"
                        .into()
                },
                Decision::Unplaceable {
                    task_id: "t-gone".into(),
                    reason: "node gone has left the cluster".into()
                },
                // Spread counts the global task placed on `a` in the same pass.
                Decision::Assign {
                    task_id: "replicated".into(),
                    node_id: "b".into()
                },
            ]
        );
    }

    #[test]
    fn groups_share_node_state_and_keep_input_order() {
        let web = spec("web", 1);
        let db = reserving(0, GI);
        let db = svc("db", |s| s.resources = db.resources);
        let nodes = [sized("a", 0, GI), sized("b", 0, GI)];
        // Interleaved services: decisions come back in input order.
        let ts = vec![
            task("w1", &web, None),
            task("d1", &db, None),
            task("w2", &web, None),
            task("d2", &db, None),
            task("d3", &db, None),
        ];
        let d = run(&nodes, &[], &ts);
        let ids: Vec<&str> = d
            .iter()
            .map(|x| match x {
                Decision::Assign { task_id, .. } | Decision::Unplaceable { task_id, .. } => {
                    task_id.as_str()
                }
            })
            .collect();
        assert_eq!(ids, ["w1", "d1", "w2", "d2", "d3"]);
        // web first: one on each node; then db fills each node's 1 GiB; the third db is refused.
        assert_eq!(counts(&d), [("a".into(), 2), ("b".into(), 2)].into());
        assert_eq!(
            reasons(&d),
            ["no suitable node (2 nodes have insufficient memory: 1 GiB needed)"]
        );
    }

    #[test]
    fn deterministic() {
        let nodes: Vec<Node> = (0..20)
            .map(|i| node(&format!("n{i:02}"), &format!("zone=z{}", i % 3)))
            .collect();
        let web = svc("web", |s| {
            s.placement.preferences = vec![Preference {
                spread: "node.labels.zone".into(),
            }]
        });
        let ts = pending(&web, 50);
        assert_eq!(run(&nodes, &[], &ts), run(&nodes, &[], &ts));
    }
}

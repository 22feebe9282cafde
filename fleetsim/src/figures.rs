//! The figures and checks of a run, pure: percentiles of delays, and whether the tasks the
//! controller lists have converged (every replica slot runs exactly one task where it should)
//! or break the invariant that no slot ever runs two tasks once converged; the split of a
//! scheduling delay into its stages.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rudder_agent::hollow::Timeline;
use rudder_proto::v1::{TaskState, TaskSummary};

/// The `p`-th percentile (0..=100) of `values` by nearest rank; `None` when empty.
pub fn percentile(values: &[u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// p50, p90, p99 and max of `values` in one line (`-` when empty).
pub fn summary(values: &[u64]) -> String {
    let f = |p| percentile(values, p).map_or("-".to_string(), |v| v.to_string());
    format!(
        "p50 {} / p90 {} / p99 {} / max {} ms (n={})",
        f(50.0),
        f(90.0),
        f(99.0),
        f(100.0),
        values.len()
    )
}

/// Seconds with millisecond precision, for printing.
pub fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// What the fleet should run: replicas per service name, and the image each service's
/// running tasks must have (after a rolling update of some or all of them).
#[derive(Debug, Clone, Default)]
pub struct Want {
    /// Service name → replicas.
    pub replicas: BTreeMap<String, u64>,
    /// Service name → image: a running task of another image does not count (a service not
    /// named here: any image counts).
    pub images: BTreeMap<String, String>,
}

impl Want {
    /// `replicas`, every service of `image` when given.
    pub fn of(replicas: BTreeMap<String, u64>, image: Option<&str>) -> Want {
        let images = image.map_or_else(BTreeMap::new, |i| {
            replicas
                .keys()
                .map(|n| (n.clone(), i.to_string()))
                .collect()
        });
        Want { replicas, images }
    }

    /// Total tasks wanted.
    pub fn total(&self) -> u64 {
        self.replicas.values().sum()
    }

    /// Whether a running task of `service` with `image` counts.
    pub fn image_ok(&self, service: &str, image: &str) -> bool {
        self.images.get(service).is_none_or(|i| i == image)
    }
}

/// How far the listed tasks are from [`Want`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotView {
    /// Slots with exactly one good running task.
    pub good: u64,
    /// Slots with two or more tasks the controller counts as running (any node, any image).
    pub doubled: Vec<(String, u64)>,
    /// Running tasks on excluded nodes (lost or drained hosts), or of another image.
    pub misplaced: u64,
}

/// Looks at `tasks` (as `ListTasks` gives them) against `want`; tasks on `excluded` nodes do
/// not count as good, and count as misplaced when the controller still has them running.
pub fn slots(tasks: &[TaskSummary], want: &Want, excluded: &BTreeSet<String>) -> SlotView {
    let running = TaskState::Running as i32;
    let mut per_slot: BTreeMap<(&str, u64), (u64, u64)> = BTreeMap::new();
    let mut view = SlotView::default();
    for t in tasks.iter().filter(|t| t.state == running) {
        let Some(&replicas) = want.replicas.get(&t.service) else {
            continue;
        };
        let e = per_slot.entry((t.service.as_str(), t.slot)).or_default();
        e.0 += 1;
        let placed_ok = !excluded.contains(&t.node_id);
        let image_ok = want.image_ok(&t.service, &t.image);
        if placed_ok && image_ok && (1..=replicas).contains(&t.slot) {
            e.1 += 1;
        } else {
            view.misplaced += 1;
        }
    }
    for ((service, slot), (all, good)) in per_slot {
        if all > 1 {
            view.doubled.push((service.to_string(), slot));
        }
        if good == 1 && all == 1 {
            view.good += 1;
        }
    }
    view
}

/// Wanted slots without a good running task (at most `limit`), and every listed task of
/// each, one line a slot: for a report of why a wait did not converge.
pub fn missing(
    tasks: &[TaskSummary],
    want: &Want,
    excluded: &BTreeSet<String>,
    limit: usize,
) -> Vec<String> {
    let running = TaskState::Running as i32;
    let good: BTreeSet<(&str, u64)> = tasks
        .iter()
        .filter(|t| t.state == running && !excluded.contains(&t.node_id))
        .filter(|t| want.image_ok(&t.service, &t.image))
        .map(|t| (t.service.as_str(), t.slot))
        .collect();
    let mut out = Vec::new();
    for (service, replicas) in &want.replicas {
        for slot in 1..=*replicas {
            if good.contains(&(service.as_str(), slot)) {
                continue;
            }
            if out.len() == limit {
                return out;
            }
            let attempts: Vec<String> = tasks
                .iter()
                .filter(|t| t.service == *service && t.slot == slot)
                .map(|t| {
                    format!(
                        "{} on {} {:?}/{:?} {:?}",
                        &t.id[..t.id.len().min(8)],
                        t.node_id,
                        TaskState::try_from(t.state).unwrap_or(TaskState::Unspecified),
                        TaskState::try_from(t.desired_state).unwrap_or(TaskState::Unspecified),
                        t.message
                    )
                })
                .collect();
            out.push(format!("{service}.{slot}: [{}]", attempts.join("; ")));
        }
    }
    out
}

impl SlotView {
    /// Every wanted slot runs exactly one good task and nothing runs where it should not.
    pub fn converged(&self, want: &Want) -> bool {
        self.good == want.total() && self.doubled.is_empty() && self.misplaced == 0
    }
}

/// The hosts' own truth: of the containers that run on the hosts (`running`: task ids),
/// how many belong to a wanted slot, and which slots run more than one.
pub fn fleet_slots<'a>(
    running: impl IntoIterator<Item = &'a str>,
    tasks: &[TaskSummary],
    want: &Want,
) -> (u64, Vec<(String, u64)>) {
    let by_id: BTreeMap<&str, &TaskSummary> = tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut per_slot: BTreeMap<(&str, u64), u64> = BTreeMap::new();
    let mut n = 0;
    for id in running {
        let Some(t) = by_id.get(id) else { continue };
        if want.replicas.contains_key(&t.service) {
            n += 1;
            *per_slot.entry((t.service.as_str(), t.slot)).or_default() += 1;
        }
    }
    let doubled = per_slot
        .into_iter()
        .filter(|(_, c)| *c > 1)
        .map(|((s, slot), _)| (s.to_string(), slot))
        .collect();
    (n, doubled)
}

/// A scheduling delay split at what the hosts recorded ([`Timeline`]), each list in ms over
/// the running tasks that have a timeline and an apply time:
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stages {
    /// The apply began → the leader's control loop created the task (the `Apply` call's read
    /// index and commit, and the loop's reaction to the new spec).
    pub apply_to_created: Vec<u64>,
    /// Created → its host's worker saw it (the pass's plan, the placement's commit, the
    /// fan-out to the session and the assignment's trip).
    pub created_to_seen: Vec<u64>,
    /// Seen → the runtime's start was called (the agent's preparation).
    pub seen_to_start: Vec<u64>,
    /// Start called → `running` as the controller recorded it (the start latency).
    pub start_to_running: Vec<u64>,
}

impl Stages {
    /// The stages of the `running` tasks of `tasks`, from the apply time of their service
    /// (`applied_at`) and their host's timeline (`timelines`, by task id).
    pub fn of(
        tasks: &[TaskSummary],
        applied_at: &BTreeMap<String, u64>,
        timelines: &BTreeMap<String, Timeline>,
    ) -> Stages {
        let mut s = Stages::default();
        let running = TaskState::Running as i32;
        for t in tasks.iter().filter(|t| t.state == running) {
            let (Some(&at), Some(tl)) = (applied_at.get(&t.service), timelines.get(&t.id)) else {
                continue;
            };
            let Some(start) = tl.start_ms else { continue };
            s.apply_to_created.push(tl.created_ms.saturating_sub(at));
            s.created_to_seen
                .push(tl.seen_ms.saturating_sub(tl.created_ms));
            s.seen_to_start.push(start.saturating_sub(tl.seen_ms));
            s.start_to_running
                .push(t.timestamp_ms.saturating_sub(start));
        }
        s
    }

    /// One line a stage.
    pub fn lines(&self) -> Vec<String> {
        [
            (
                "apply -> created by the control loop",
                &self.apply_to_created,
            ),
            ("created -> seen by its host", &self.created_to_seen),
            ("seen -> start (agent prepares)", &self.seen_to_start),
            ("start -> running (start latency)", &self.start_to_running),
        ]
        .into_iter()
        .map(|(what, v)| format!("{what}: {}", summary(v)))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(service: &str, slot: u64, node: &str, state: TaskState, image: &str) -> TaskSummary {
        TaskSummary {
            service: service.into(),
            slot,
            node_id: node.into(),
            state: state as i32,
            image: image.into(),
            ..Default::default()
        }
    }

    fn want(image: Option<&str>) -> Want {
        Want::of([("a".to_string(), 2), ("b".to_string(), 1)].into(), image)
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&[7], 1.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[30, 10, 20], 0.0), Some(10));
        assert!(summary(&[]).starts_with("p50 - "));
    }

    #[test]
    fn converged_when_every_slot_runs_once_where_it_should() {
        use TaskState::*;
        let mut tasks = vec![
            task("a", 1, "n1", Running, "x"),
            task("a", 2, "n2", Running, "x"),
            task("b", 1, "n1", Running, "x"),
            // History and other services do not count.
            task("a", 1, "n3", Shutdown, "x"),
            task("c", 1, "n3", Running, "x"),
        ];
        let none = BTreeSet::new();
        let v = slots(&tasks, &want(None), &none);
        assert!(v.converged(&want(None)), "{v:?}");
        // A slot still starting: not yet.
        tasks[1].state = Starting as i32;
        assert!(!slots(&tasks, &want(None), &none).converged(&want(None)));
    }

    #[test]
    fn a_slot_running_twice_is_reported_and_not_converged() {
        use TaskState::*;
        let tasks = vec![
            task("a", 1, "n1", Running, "x"),
            task("a", 1, "n2", Running, "x"),
            task("a", 2, "n2", Running, "x"),
            task("b", 1, "n1", Running, "x"),
        ];
        let v = slots(&tasks, &want(None), &BTreeSet::new());
        assert_eq!(v.doubled, vec![("a".to_string(), 1)]);
        assert!(!v.converged(&want(None)));
    }

    #[test]
    fn the_hosts_view_finds_a_slot_running_on_two_hosts() {
        use TaskState::*;
        let mut tasks = vec![
            task("a", 1, "n1", Running, "x"),
            task("a", 1, "n2", Orphaned, "x"),
            task("a", 2, "n2", Running, "x"),
        ];
        for (i, t) in tasks.iter_mut().enumerate() {
            t.id = format!("t{i}");
        }
        let (n, doubled) = fleet_slots(["t0", "t1", "t2", "gone"], &tasks, &want(None));
        assert_eq!((n, doubled), (3, vec![("a".to_string(), 1)]));
        let (n, doubled) = fleet_slots(["t0", "t2"], &tasks, &want(None));
        assert_eq!((n, doubled.len()), (2, 0));
    }

    #[test]
    fn missing_slots_are_named_with_their_attempts() {
        use TaskState::*;
        let tasks = vec![
            task("a", 1, "n1", Running, "x"),
            task("a", 2, "n2", Orphaned, "x"),
            task("b", 1, "n2", Running, "x"),
        ];
        let lost: BTreeSet<String> = ["n2".to_string()].into();
        let m = missing(&tasks, &want(None), &lost, 10);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(
            m[0].starts_with("a.2: [") && m[0].contains("Orphaned"),
            "{m:?}"
        );
        assert!(m[1].starts_with("b.1: ["), "{m:?}");
        assert_eq!(missing(&tasks, &want(None), &lost, 1).len(), 1);
    }

    #[test]
    fn tasks_on_excluded_nodes_or_of_the_old_image_are_misplaced() {
        use TaskState::*;
        let tasks = vec![
            task("a", 1, "n1", Running, "x"),
            task("a", 2, "n2", Running, "x"),
            task("b", 1, "n1", Running, "y"),
        ];
        let lost: BTreeSet<String> = ["n2".to_string()].into();
        let v = slots(&tasks, &want(None), &lost);
        assert_eq!((v.good, v.misplaced), (2, 1));
        assert!(!v.converged(&want(None)));
        let v = slots(&tasks, &want(Some("y")), &BTreeSet::new());
        assert_eq!((v.good, v.misplaced), (1, 2));
        // Only b rolled to y: a's tasks of x still count.
        let mut partly = want(None);
        partly.images.insert("b".into(), "y".into());
        let v = slots(&tasks, &partly, &BTreeSet::new());
        assert_eq!((v.good, v.misplaced), (3, 0));
    }

    #[test]
    fn stages_split_each_running_task_s_delay_at_its_host_s_timeline() {
        use TaskState::*;
        let mut tasks = vec![
            task("a", 1, "n1", Running, "x"),
            task("a", 2, "n1", Starting, "x"),
            task("b", 1, "n1", Running, "x"),
            task("c", 1, "n1", Running, "x"),
        ];
        for (i, t) in tasks.iter_mut().enumerate() {
            t.id = format!("t{i}");
            t.timestamp_ms = 1_200;
        }
        let applied: BTreeMap<String, u64> =
            [("a".to_string(), 1_000), ("b".to_string(), 1_100)].into();
        let tl = |created_ms, seen_ms, start_ms| Timeline {
            created_ms,
            seen_ms,
            start_ms,
            started_ms: None,
        };
        let timelines: BTreeMap<String, Timeline> = [
            ("t0".to_string(), tl(1_010, 1_030, Some(1_040))),
            // Not running yet, not started, or of a service applied elsewhere: left out.
            ("t1".to_string(), tl(1_010, 1_030, Some(1_040))),
            ("t2".to_string(), tl(1_110, 1_120, None)),
            ("t3".to_string(), tl(1_110, 1_120, Some(1_130))),
        ]
        .into();
        let s = Stages::of(&tasks, &applied, &timelines);
        assert_eq!(
            s,
            Stages {
                apply_to_created: vec![10],
                created_to_seen: vec![20],
                seen_to_start: vec![10],
                start_to_running: vec![160],
            }
        );
        assert_eq!(s.lines().len(), 4);
    }
}

//! The chaos soak's pure checks: replicated slots with more than one running task, and resource
//! trends (RSS, open fds) that grow like a leak. Data in, findings out; the soak samples.

use std::collections::BTreeMap;
use std::time::Duration;

/// A task as the controller lists it (the fields the checks need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskView {
    /// Task id (its container dir's name on its host).
    pub id: String,
    /// Service name.
    pub service: String,
    /// Slot of a replicated service.
    pub slot: u64,
    /// Host name it is assigned to.
    pub node: String,
    /// Observed state is running.
    pub running: bool,
    /// Desired state is running.
    pub desired_running: bool,
}

/// `(service, slot)` pairs with more than one task both observed and desired running, in the
/// controller's view, with those tasks' ids.
pub fn double_running_slots(tasks: &[TaskView]) -> BTreeMap<(String, u64), Vec<String>> {
    let mut by_slot: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
    for t in tasks.iter().filter(|t| t.running && t.desired_running) {
        by_slot
            .entry((t.service.clone(), t.slot))
            .or_default()
            .push(t.id.clone());
    }
    by_slot.retain(|_, ids| ids.len() > 1);
    by_slot
}

/// `(service, slot)` pairs with more than one live container on the hosts (`live`: task ids
/// whose container's init is alive, from every host), whatever the controller believes.
pub fn double_live_slots(
    tasks: &[TaskView],
    live: &[String],
) -> BTreeMap<(String, u64), Vec<String>> {
    let by_id: BTreeMap<&str, &TaskView> = tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut by_slot: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
    for id in live {
        if let Some(t) = by_id.get(id.as_str()) {
            by_slot
                .entry((t.service.clone(), t.slot))
                .or_default()
                .push(id.clone());
        }
    }
    by_slot.retain(|_, ids| ids.len() > 1);
    by_slot
}

/// One resource sample of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Time since the soak began.
    pub at: Duration,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// First, last and peak of one process's samples, and whether it looks like a leak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trend {
    /// What the process is (`controller h1 (pid 123)`).
    pub who: String,
    /// First sample.
    pub first: Sample,
    /// Last sample.
    pub last: Sample,
    /// Peak RSS, KiB.
    pub max_rss_kib: u64,
    /// Peak fds.
    pub max_fds: u64,
    /// Why it is judged a leak, if it is.
    pub leak: Option<String>,
}

/// When growth counts as a leak.
#[derive(Debug, Clone, Copy)]
pub struct LeakRule {
    /// Last over first above this factor…
    pub factor: u64,
    /// …and above first by more than this many KiB of RSS…
    pub rss_slack_kib: u64,
    /// …or this many fds.
    pub fd_slack: u64,
    /// Series shorter than this are reported, never judged (a process restarted late).
    pub min_span: Duration,
}

impl Default for LeakRule {
    fn default() -> Self {
        Self {
            factor: 2,
            rss_slack_kib: 64 * 1024,
            fd_slack: 64,
            min_span: Duration::from_secs(30),
        }
    }
}

/// The trend of each process's samples (`who` → samples in time order); processes with fewer
/// than two samples are left out.
pub fn trends(series: &BTreeMap<String, Vec<Sample>>, rule: LeakRule) -> Vec<Trend> {
    series
        .iter()
        .filter(|(_, s)| s.len() >= 2)
        .map(|(who, s)| {
            let (first, last) = (s[0], s[s.len() - 1]);
            let max_rss_kib = s.iter().map(|x| x.rss_kib).max().unwrap_or(0);
            let max_fds = s.iter().map(|x| x.fds).max().unwrap_or(0);
            let judged = last.at.saturating_sub(first.at) >= rule.min_span;
            let grew = |a: u64, b: u64, slack: u64| b > a * rule.factor && b > a + slack;
            let leak = if !judged {
                None
            } else if grew(first.rss_kib, last.rss_kib, rule.rss_slack_kib) {
                Some(format!(
                    "rss {} → {} KiB over {:?}",
                    first.rss_kib,
                    last.rss_kib,
                    last.at - first.at
                ))
            } else if grew(first.fds, last.fds, rule.fd_slack) {
                Some(format!(
                    "fds {} → {} over {:?}",
                    first.fds,
                    last.fds,
                    last.at - first.at
                ))
            } else {
                None
            };
            Trend {
                who: who.clone(),
                first,
                last,
                max_rss_kib,
                max_fds,
                leak,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, slot: u64, running: bool, desired: bool) -> TaskView {
        TaskView {
            id: id.into(),
            service: "web".into(),
            slot,
            node: "h1".into(),
            running,
            desired_running: desired,
        }
    }

    #[test]
    fn two_running_tasks_of_one_slot_are_found_and_a_stopping_one_is_not() {
        let tasks = [
            task("a", 1, true, true),
            task("b", 1, true, true),
            task("c", 2, true, true),
            task("d", 2, true, false), // being replaced: not a double
        ];
        let d = double_running_slots(&tasks);
        assert_eq!(d.len(), 1);
        assert_eq!(d[&("web".to_string(), 1)], vec!["a", "b"]);
        // On the hosts, a container the controller no longer wants still counts.
        let live = ["c".to_string(), "d".to_string(), "a".to_string()];
        let d = double_live_slots(&tasks, &live);
        assert_eq!(d.keys().collect::<Vec<_>>(), vec![&("web".to_string(), 2)]);
    }

    fn s(at: u64, rss_kib: u64, fds: u64) -> Sample {
        Sample {
            at: Duration::from_secs(at),
            rss_kib,
            fds,
        }
    }

    #[test]
    fn flat_or_small_growth_is_no_leak_and_clear_growth_is() {
        let mut m = BTreeMap::new();
        m.insert(
            "flat".to_string(),
            vec![s(0, 30_000, 20), s(60, 35_000, 25)],
        );
        // Tripled, but 20 MiB is inside the slack.
        m.insert(
            "small".to_string(),
            vec![s(0, 10_000, 10), s(60, 30_000, 30)],
        );
        m.insert(
            "rss".to_string(),
            vec![s(0, 40_000, 20), s(60, 200_000, 20)],
        );
        m.insert(
            "fds".to_string(),
            vec![s(0, 40_000, 20), s(60, 40_000, 500)],
        );
        // Short-lived: reported, not judged.
        m.insert(
            "short".to_string(),
            vec![s(0, 1_000, 1), s(5, 900_000, 900)],
        );
        m.insert("one".to_string(), vec![s(0, 1, 1)]);
        let t = trends(&m, LeakRule::default());
        let leaks: Vec<&str> = t
            .iter()
            .filter(|t| t.leak.is_some())
            .map(|t| t.who.as_str())
            .collect();
        assert_eq!(leaks, vec!["fds", "rss"]);
        assert_eq!(t.len(), 5);
        let rss = t.iter().find(|t| t.who == "rss").unwrap();
        assert_eq!((rss.max_rss_kib, rss.max_fds), (200_000, 20));
    }
}

//! The chaos soak's fault schedule: a pure function of a seed and the lab's shape, so a failing
//! run is replayed exactly by giving its seed back (`RUDDER_CHAOS_SEED`).
//!
//! Invariants of every plan:
//! - At most one fault at a time touches the control plane (a controller killed or paused, or a
//!   manager host's link cut or lossy): with 3 controllers a quorum always exists, so every
//!   unavailability the clients see is the cluster's doing, not the plan's.
//! - One fault at a time per host, and at most [`MAX_CONCURRENT`] at once overall.
//! - Every fault is healed (restart, SIGCONT, link up, loss removed) before the plan's end.

use std::time::Duration;

/// Faults running at once, at most.
pub const MAX_CONCURRENT: usize = 2;

/// A small, fast, seedable generator (SplitMix64): the plan must not depend on a crate's
/// algorithm choices across versions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi` (`lo` when `hi <= lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// Which process a kill or pause hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proc {
    /// `rudder-controller` (manager hosts only).
    Controller,
    /// `rudder-agent`.
    Agent,
}

/// One fault; `host` is the 0-based lab host index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// SIGKILL, then a restart with the same data dir when the fault ends.
    Kill {
        /// Host index.
        host: usize,
        /// Which process.
        proc: Proc,
    },
    /// SIGSTOP, then SIGCONT when the fault ends: a hung process with its sockets open.
    Pause {
        /// Host index.
        host: usize,
        /// Which process.
        proc: Proc,
    },
    /// The host's underlay link down, then up.
    CutLink {
        /// Host index.
        host: usize,
    },
    /// Random loss of `percent` % of the host's underlay packets (both ways), then none.
    Loss {
        /// Host index.
        host: usize,
        /// Share of packets dropped.
        percent: u8,
    },
}

impl Fault {
    /// The host it hits.
    pub fn host(&self) -> usize {
        match *self {
            Fault::Kill { host, .. }
            | Fault::Pause { host, .. }
            | Fault::CutLink { host }
            | Fault::Loss { host, .. } => host,
        }
    }
    /// Whether it takes a controller away (fully or partly) while it lasts.
    pub fn hits_control_plane(&self, managers: usize) -> bool {
        match *self {
            Fault::Kill { proc, .. } | Fault::Pause { proc, .. } => proc == Proc::Controller,
            Fault::CutLink { host } | Fault::Loss { host, .. } => host < managers,
        }
    }
    /// A short name for reports: `kill-controller`, `cut-link`, …
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill {
                proc: Proc::Controller,
                ..
            } => "kill -9 controller",
            Fault::Kill {
                proc: Proc::Agent, ..
            } => "kill -9 agent",
            Fault::Pause {
                proc: Proc::Controller,
                ..
            } => "SIGSTOP controller",
            Fault::Pause {
                proc: Proc::Agent, ..
            } => "SIGSTOP agent",
            Fault::CutLink { .. } => "link down",
            Fault::Loss { .. } => "packet loss",
        }
    }
}

/// A fault, when it starts and how long it lasts (both from the start of the soak).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// When it begins.
    pub at: Duration,
    /// How long until it is healed.
    pub hold: Duration,
    /// What.
    pub fault: Fault,
}

impl Planned {
    /// When it is healed.
    pub fn end(&self) -> Duration {
        self.at + self.hold
    }
}

/// The shape of the lab a plan is for, and its pacing.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Hosts in the lab.
    pub hosts: usize,
    /// The first `managers` hosts run controllers.
    pub managers: usize,
    /// How long faults are injected.
    pub duration: Duration,
    /// Gap between fault starts, in seconds (uniform in this range).
    pub gap_secs: (u64, u64),
    /// How long a fault lasts, in seconds (uniform in this range).
    pub hold_secs: (u64, u64),
}

/// The seeded fault schedule for `shape`, sorted by start. Every fault ends by
/// `shape.duration`.
pub fn plan(seed: u64, shape: Shape) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let mut out: Vec<Planned> = Vec::new();
    let mut t = Duration::from_secs(rng.range(1, shape.gap_secs.1.max(1)));
    while t < shape.duration {
        let active: Vec<&Planned> = out.iter().filter(|p| p.end() > t).collect();
        let hold = Duration::from_secs(rng.range(shape.hold_secs.0, shape.hold_secs.1));
        if active.len() < MAX_CONCURRENT && t + hold <= shape.duration {
            let control_busy = active
                .iter()
                .any(|p| p.fault.hits_control_plane(shape.managers));
            let candidates: Vec<Fault> = candidates(&mut rng, shape)
                .into_iter()
                .filter(|f| !active.iter().any(|p| p.fault.host() == f.host()))
                .filter(|f| !(control_busy && f.hits_control_plane(shape.managers)))
                .collect();
            if !candidates.is_empty() {
                let pick = candidates[rng.range(0, candidates.len() as u64 - 1) as usize];
                out.push(Planned {
                    at: t,
                    hold,
                    fault: pick,
                });
            }
        }
        t += Duration::from_secs(rng.range(shape.gap_secs.0, shape.gap_secs.1));
    }
    out
}

/// Every fault that could hit `shape`, with a fresh loss share each.
fn candidates(rng: &mut Rng, shape: Shape) -> Vec<Fault> {
    let mut v = Vec::new();
    for host in 0..shape.hosts {
        let manager = host < shape.managers;
        for proc in [Proc::Controller, Proc::Agent] {
            if proc == Proc::Controller && !manager {
                continue;
            }
            v.push(Fault::Kill { host, proc });
            v.push(Fault::Pause { host, proc });
        }
        v.push(Fault::CutLink { host });
        v.push(Fault::Loss {
            host,
            percent: rng.range(10, 40) as u8,
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(secs: u64) -> Shape {
        Shape {
            hosts: 4,
            managers: 3,
            duration: Duration::from_secs(secs),
            gap_secs: (2, 6),
            hold_secs: (2, 8),
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_plan_and_another_seed_another() {
        assert_eq!(plan(42, shape(300)), plan(42, shape(300)));
        assert_ne!(plan(42, shape(300)), plan(43, shape(300)));
    }

    #[test]
    fn plans_keep_a_quorum_and_one_fault_per_host() {
        for seed in 0..200 {
            let p = plan(seed, shape(300));
            assert!(!p.is_empty());
            for (i, a) in p.iter().enumerate() {
                assert!(a.end() <= Duration::from_secs(300), "seed {seed}: {a:?}");
                let overlapping: Vec<&Planned> = p
                    .iter()
                    .enumerate()
                    .filter(|&(j, b)| j != i && b.at < a.end() && a.at < b.end())
                    .map(|(_, b)| b)
                    .collect();
                // Pairwise overlap bounds the number active at any instant only loosely, so
                // check at `a.at`: the plan's own rule.
                let at_start: Vec<&&Planned> = overlapping
                    .iter()
                    .filter(|b| b.at <= a.at && b.end() > a.at)
                    .collect();
                assert!(at_start.len() < MAX_CONCURRENT, "seed {seed}: {p:?}");
                for b in &overlapping {
                    assert_ne!(a.fault.host(), b.fault.host(), "seed {seed}: {a:?} {b:?}");
                    assert!(
                        !(a.fault.hits_control_plane(3) && b.fault.hits_control_plane(3)),
                        "seed {seed}: two control-plane faults at once: {a:?} {b:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_kind_of_fault_occurs_in_a_long_plan() {
        let p = plan(7, shape(3600));
        let kinds: std::collections::BTreeSet<&str> = p.iter().map(|p| p.fault.kind()).collect();
        assert_eq!(kinds.len(), 6, "{kinds:?}");
        assert!(p.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[test]
    fn workers_never_get_controller_faults() {
        for seed in 0..50 {
            for p in plan(seed, shape(300)) {
                if let Fault::Kill { host, proc } | Fault::Pause { host, proc } = p.fault {
                    assert!(proc == Proc::Agent || host < 3, "{p:?}");
                }
            }
        }
    }
}

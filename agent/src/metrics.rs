//! The agent's Prometheus metrics, served at `/metrics` by `rudder_pki::scrape`: its tasks by
//! state, and per running task the cpu time and memory of its cgroup (the [`StatsSource`]
//! `rctl stats` reads), block I/O bytes (the cgroup's io counters) and network bytes (the
//! interfaces of the container's network namespace).
//!
//! Everything is read at scrape time ([`collect`]) and turned into families by a pure
//! function ([`task_families`]). Counters are the kernel's cumulative counters, so they only
//! reset when a task's cgroup is made anew (a new task id).
//!
//! A task on the host's network (`network: host`) has no network counters of its own: none
//! are reported for it, rather than the host's.

use std::path::{Path, PathBuf};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rudder_proto::v1::TaskState;
use std::sync::atomic::AtomicU64;

use crate::stats::{Counters, StatsError, StatsSource};

/// The most a cgroup or proc file read here may hold.
const MAX_FILE: u64 = 256 * 1024;

/// Byte counters beyond cpu and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoCounters {
    /// Bytes read from block devices.
    pub block_read_bytes: u64,
    /// Bytes written to block devices.
    pub block_write_bytes: u64,
    /// Bytes received and sent on the task's own network interfaces (loopback excluded);
    /// `None` when the task shares the host's network namespace.
    pub network: Option<(u64, u64)>,
}

/// The port for block and network counters by task id.
pub trait IoSource: Send + Sync {
    /// The counters of task `task_id` now.
    fn read_io(&self, task_id: &str) -> Result<IoCounters, StatsError>;
}

/// One running task's readings.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSample {
    /// The task id.
    pub task: String,
    /// Its service's name (empty when unknown).
    pub service: String,
    /// Cpu time and memory, if the cgroup could be read.
    pub counters: Option<Counters>,
    /// Block and network bytes, if they could be read.
    pub io: Option<IoCounters>,
}

type Labels = Vec<(String, String)>;

/// The agent's families from its tasks' states (lowercase names, with their counts) and the
/// samples of its running tasks. Pure.
pub fn task_families(states: &[(String, i64)], samples: &[TaskSample], reg: &mut Registry) {
    let tasks = Family::<Labels, Gauge>::default();
    reg.register(
        "rudder_agent_tasks",
        "Tasks this agent holds, by last observed state",
        tasks.clone(),
    );
    for (state, n) in states {
        tasks
            .get_or_create(&vec![("state".to_string(), state.clone())])
            .set(*n);
    }
    let counter = |reg: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Counter<f64, AtomicU64>>::default();
        reg.register(name, help, f.clone());
        f
    };
    let cpu = counter(
        reg,
        "rudder_agent_task_cpu_seconds",
        "Cpu time a running task's cgroup used",
    );
    let memory = Family::<Labels, Gauge>::default();
    reg.register(
        "rudder_agent_task_memory_bytes",
        "Memory a running task uses, without inactive page cache (its working set)",
        memory.clone(),
    );
    let read = counter(
        reg,
        "rudder_agent_task_block_read_bytes",
        "Bytes a running task read from block devices",
    );
    let written = counter(
        reg,
        "rudder_agent_task_block_write_bytes",
        "Bytes a running task wrote to block devices",
    );
    let rx = counter(
        reg,
        "rudder_agent_task_network_receive_bytes",
        "Bytes a running task received on its network interfaces (loopback excluded)",
    );
    let tx = counter(
        reg,
        "rudder_agent_task_network_transmit_bytes",
        "Bytes a running task sent on its network interfaces (loopback excluded)",
    );
    for s in samples {
        let l: Labels = vec![
            ("service".to_string(), s.service.clone()),
            ("task".to_string(), s.task.clone()),
        ];
        if let Some(c) = s.counters {
            cpu.get_or_create(&l).inc_by(c.cpu_ns as f64 / 1e9);
            memory
                .get_or_create(&l)
                .set(i64::try_from(c.memory_bytes).unwrap_or(i64::MAX));
        }
        if let Some(io) = s.io {
            read.get_or_create(&l).inc_by(io.block_read_bytes as f64);
            written
                .get_or_create(&l)
                .inc_by(io.block_write_bytes as f64);
            if let Some((r, t)) = io.network {
                rx.get_or_create(&l).inc_by(r as f64);
                tx.get_or_create(&l).inc_by(t as f64);
            }
        }
    }
}

/// The lowercase name of a reported state (`running`).
fn state_name(state: i32) -> String {
    TaskState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("TASK_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unspecified".into())
}

/// Reads everything [`task_families`] needs from the worker's last statuses and the sources,
/// and renders the exposition text. Blocking (cgroup and proc files).
pub fn collect(
    statuses: &[rudder_proto::v1::TaskStatusReport],
    service_of: &dyn Fn(&str) -> String,
    stats: &dyn StatsSource,
    io: &dyn IoSource,
) -> String {
    let mut states: std::collections::BTreeMap<String, i64> = Default::default();
    let mut samples = Vec::new();
    for r in statuses {
        *states.entry(state_name(r.state)).or_default() += 1;
        if r.state == TaskState::Running as i32 {
            samples.push(TaskSample {
                task: r.task_id.clone(),
                service: service_of(&r.task_id),
                counters: stats.read(&r.task_id).ok(),
                io: io.read_io(&r.task_id).ok(),
            });
        }
    }
    samples.sort_by(|a, b| a.task.cmp(&b.task));
    let states: Vec<(String, i64)> = states.into_iter().collect();
    let mut reg = Registry::default();
    task_families(&states, &samples, &mut reg);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &reg);
    out
}

/// Block and network counters from the cgroup filesystem under `root` (v1 or v2) and the
/// container's `/proc/<pid>/net/dev`.
pub struct CgroupIo {
    /// The same cgroup paths as `rctl stats` reads.
    cgroups: crate::stats::CgroupStats,
    proc: PathBuf,
}

impl CgroupIo {
    /// Counters of the cgroups `<parent>/<task id>` under `root`, pids looked up in `proc`.
    pub fn new(root: impl Into<PathBuf>, parent: &str, proc: impl Into<PathBuf>) -> Self {
        Self {
            cgroups: crate::stats::CgroupStats::new(root, parent),
            proc: proc.into(),
        }
    }

    fn path(&self, controller: &str, task_id: &str) -> PathBuf {
        self.cgroups.path(controller, task_id)
    }
}

fn read_small(path: &Path) -> Result<String, StatsError> {
    crate::stats::read_small(path, MAX_FILE)
}

/// Read and written bytes from cgroup v2 `io.stat` (`8:0 rbytes=.. wbytes=..`). Pure.
pub fn parse_io_stat(text: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("rbytes=") {
            r = r.saturating_add(v.parse().unwrap_or(0));
        } else if let Some(v) = field.strip_prefix("wbytes=") {
            w = w.saturating_add(v.parse().unwrap_or(0));
        }
    }
    (r, w)
}

/// Read and written bytes from cgroup v1 `blkio.throttle.io_service_bytes`
/// (`8:0 Read 4096`; the device-less `Total` line is skipped). Pure.
pub fn parse_blkio(text: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(_dev), Some(op), Some(v)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0);
        match op {
            "Read" => r = r.saturating_add(v),
            "Write" => w = w.saturating_add(v),
            _ => {}
        }
    }
    (r, w)
}

/// Received and sent bytes of every interface but `lo` in `/proc/<pid>/net/dev`. Pure.
pub fn parse_net_dev(text: &str) -> (u64, u64) {
    let (mut rx, mut tx) = (0u64, 0u64);
    for line in text.lines().skip(2) {
        let Some((iface, rest)) = line.split_once(':') else {
            continue;
        };
        if iface.trim() == "lo" {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if v.len() >= 9 {
            rx = rx.saturating_add(v[0]);
            tx = tx.saturating_add(v[8]);
        }
    }
    (rx, tx)
}

impl IoSource for CgroupIo {
    fn read_io(&self, task_id: &str) -> Result<IoCounters, StatsError> {
        let v1 = self.path("blkio", task_id);
        let (dir, (r, w)) = if v1.is_dir() {
            let blk = read_small(&v1.join("blkio.throttle.io_service_bytes"))
                .map(|t| parse_blkio(&t))
                .unwrap_or_default();
            (self.path("cpuacct", task_id), blk)
        } else {
            let v2 = self.path("", task_id);
            let blk = read_small(&v2.join("io.stat"))
                .map(|t| parse_io_stat(&t))
                .unwrap_or_default();
            (v2, blk)
        };
        let procs = read_small(&dir.join("cgroup.procs"))?;
        let network = procs
            .lines()
            .next()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .and_then(|pid| {
                let ns = |p: &Path| std::fs::read_link(p.join("ns/net")).ok();
                let task_ns = ns(&self.proc.join(pid.to_string()))?;
                // The host's namespace: the counters would be the host's, not the task's.
                if Some(&task_ns) == ns(&self.proc.join("self")).as_ref() {
                    return None;
                }
                read_small(&self.proc.join(pid.to_string()).join("net/dev"))
                    .ok()
                    .map(|t| parse_net_dev(&t))
            });
        Ok(IoCounters {
            block_read_bytes: r,
            block_write_bytes: w,
            network,
        })
    }
}

/// A recording fake: scripted counters per task; every read is recorded.
/// The fake `IoSource`.
#[cfg(test)]
pub type FakeIo = crate::stats::FakeReadings<IoCounters>;

#[cfg(test)]
impl IoSource for FakeIo {
    fn read_io(&self, task_id: &str) -> Result<IoCounters, StatsError> {
        self.reading(task_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::FakeStats;
    use rudder_proto::v1::TaskStatusReport;

    fn report(id: &str, state: TaskState) -> TaskStatusReport {
        TaskStatusReport {
            task_id: id.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn families_of_running_tasks() {
        let stats = FakeStats::default();
        stats.counters.lock().unwrap().insert(
            "t1".into(),
            Counters {
                cpu_ns: 2_500_000_000,
                memory_bytes: 4096,
            },
        );
        let io = FakeIo::default();
        io.counters.lock().unwrap().insert(
            "t1".into(),
            IoCounters {
                block_read_bytes: 10,
                block_write_bytes: 20,
                network: Some((300, 400)),
            },
        );
        io.counters.lock().unwrap().insert(
            "t2".into(),
            IoCounters {
                block_read_bytes: 1,
                block_write_bytes: 2,
                network: None,
            },
        );
        let statuses = [
            report("t1", TaskState::Running),
            report("t2", TaskState::Running),
            report("t3", TaskState::Failed),
        ];
        let text = collect(&statuses, &|id| format!("svc-{id}"), &stats, &io);
        let l1 = r#"{service="svc-t1",task="t1"}"#;
        let l2 = r#"{service="svc-t2",task="t2"}"#;
        for want in [
            r#"rudder_agent_tasks{state="running"} 2"#.to_string(),
            r#"rudder_agent_tasks{state="failed"} 1"#.to_string(),
            format!("rudder_agent_task_cpu_seconds_total{l1} 2.5"),
            format!("rudder_agent_task_memory_bytes{l1} 4096"),
            format!("rudder_agent_task_block_read_bytes_total{l1} 10.0"),
            format!("rudder_agent_task_block_write_bytes_total{l1} 20.0"),
            format!("rudder_agent_task_network_receive_bytes_total{l1} 300.0"),
            format!("rudder_agent_task_network_transmit_bytes_total{l1} 400.0"),
            format!("rudder_agent_task_block_write_bytes_total{l2} 2.0"),
            "# TYPE rudder_agent_task_cpu_seconds_total counter".to_string(),
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
        // t2 has no cgroup counters (the fake has none) and shares the host's network.
        assert!(!text.contains(&format!("rudder_agent_task_cpu_seconds_total{l2}")));
        assert!(!text.contains(&format!("network_receive_bytes_total{l2}")));
        // Only running tasks are read.
        assert_eq!(*io.reads.lock().unwrap(), vec!["t1", "t2"]);
    }

    #[test]
    fn parses_kernel_counters() {
        assert_eq!(
            parse_io_stat("8:0 rbytes=100 wbytes=200 rios=1 wios=2\n253:0 rbytes=1 wbytes=2\n"),
            (101, 202)
        );
        assert_eq!(
            parse_blkio(
                "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 1\n8:0 Total 12288\nTotal 12288\n"
            ),
            (4096, 8192)
        );
        let dev = "Inter-|   Receive                                                |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo:     500       5    0    0    0     0          0         0      500       5    0    0    0     0       0          0\n  \
            eth0:    1000      10    0    0    0     0          0         0     2000      20    0    0    0     0       0          0\n";
        assert_eq!(parse_net_dev(dev), (1000, 2000));
    }

    #[test]
    fn cgroup_io_reads_a_v2_layout_and_a_private_netns() {
        let d = tempfile::tempdir().unwrap();
        let cg = d.path().join("cg/rudder/t1");
        std::fs::create_dir_all(&cg).unwrap();
        std::fs::write(cg.join("io.stat"), "8:0 rbytes=7 wbytes=9\n").unwrap();
        std::fs::write(cg.join("cgroup.procs"), "42\n").unwrap();
        let proc = d.path().join("proc");
        std::fs::create_dir_all(proc.join("42/ns")).unwrap();
        std::fs::create_dir_all(proc.join("42/net")).unwrap();
        std::fs::create_dir_all(proc.join("self/ns")).unwrap();
        std::os::unix::fs::symlink("net:[1]", proc.join("42/ns/net")).unwrap();
        std::os::unix::fs::symlink("net:[2]", proc.join("self/ns/net")).unwrap();
        std::fs::write(
            proc.join("42/net/dev"),
            "h\nh\n eth0: 5 0 0 0 0 0 0 0 6 0 0 0 0 0 0 0\n",
        )
        .unwrap();
        let src = CgroupIo::new(d.path().join("cg"), "/rudder", &proc);
        let io = src.read_io("t1").unwrap();
        assert_eq!(
            io,
            IoCounters {
                block_read_bytes: 7,
                block_write_bytes: 9,
                network: Some((5, 6)),
            }
        );
        // The host's namespace: no network counters.
        std::fs::remove_file(proc.join("self/ns/net")).unwrap();
        std::os::unix::fs::symlink("net:[1]", proc.join("self/ns/net")).unwrap();
        assert_eq!(src.read_io("t1").unwrap().network, None);
        assert!(src.read_io("gone").is_err());
    }
}

//! Usage samples of running tasks: every [`SAMPLE_PERIOD`] the agent reads each running task's
//! cgroup counters (cumulative cpu time, memory in use) through the [`StatsSource`] port, turns
//! the cpu counter into a rate ([`Sampler`], pure), and publishes the latest sample set on a
//! watch channel; the session sends it with its next heartbeat. The controller keeps them (soft
//! state) for the autoscaler and `rctl stats`.
//!
//! Where the counters are: a task's cgroup is `<cgroup parent>/<task id>` (see `bundle`). On a
//! cgroup v1 host (this lab, also the hybrid layout whose unified tree has no controllers) cpu
//! time is `cpuacct/<path>/cpuacct.usage` (ns) and memory `memory/<path>/memory.usage_in_bytes`
//! less `total_inactive_file` from `memory.stat`; on a cgroup v2 host `<path>/cpu.stat`'s
//! `usage_usec` and `memory.current` less `inactive_file` (the working set, as kubelet counts
//! it: page cache the kernel can drop is not usage).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rudder_proto::v1::{LiveTaskStats, TaskUsage};
use tokio::sync::watch;
use tracing::debug;

use crate::worker::Worker;

/// How often running tasks are sampled.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(2);
/// The most a cgroup file read here may hold (`memory.stat` is about 1 KiB).
const MAX_STAT_FILE: u64 = 64 * 1024;

/// One reading of a task's cgroup counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// CPU time used since the cgroup was made, nanoseconds.
    pub cpu_ns: u64,
    /// Memory in use without the inactive page cache, bytes.
    pub memory_bytes: u64,
}

/// Why a task's counters could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// A counter file could not be read (path, error).
    #[error("stats: cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// A counter file does not hold what it should (path).
    #[error("stats: unexpected content in {0}")]
    Parse(PathBuf),
}

/// The port: a task's counters by task id.
pub trait StatsSource: Send + Sync {
    /// The counters of task `task_id`'s cgroup now.
    fn read(&self, task_id: &str) -> Result<Counters, StatsError>;
}

/// Reads the counters from the cgroup filesystem under `root` (`/sys/fs/cgroup`), v1 or v2.
pub struct CgroupStats {
    root: PathBuf,
    parent: String,
}

impl CgroupStats {
    /// Counters of the cgroups `<parent>/<task id>` under `root`.
    pub fn new(root: impl Into<PathBuf>, parent: &str) -> CgroupStats {
        CgroupStats {
            root: root.into(),
            parent: parent.trim_matches('/').to_string(),
        }
    }

    /// `<root>/<controller>/<parent>/<task id>` (no controller: the unified hierarchy).
    pub(crate) fn path(&self, controller: &str, task_id: &str) -> PathBuf {
        let mut p = self.root.clone();
        if !controller.is_empty() {
            p.push(controller);
        }
        if !self.parent.is_empty() {
            p.push(&self.parent);
        }
        p.join(task_id)
    }
}

/// A kernel counter file, at most `max` bytes of it.
pub(crate) fn read_small(path: &Path, max: u64) -> Result<String, StatsError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| StatsError::Read(path.to_path_buf(), e))?;
    let mut s = String::new();
    f.take(max)
        .read_to_string(&mut s)
        .map_err(|e| StatsError::Read(path.to_path_buf(), e))?;
    Ok(s)
}

fn read_u64(path: &Path) -> Result<u64, StatsError> {
    read_small(path, MAX_STAT_FILE)?
        .trim()
        .parse()
        .map_err(|_| StatsError::Parse(path.to_path_buf()))
}

/// The value of `key` in a `key value` per line file (`memory.stat`, `cpu.stat`).
fn stat_key(path: &Path, key: &str) -> Result<u64, StatsError> {
    read_small(path, MAX_STAT_FILE)?
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
        .ok_or_else(|| StatsError::Parse(path.to_path_buf()))
}

impl StatsSource for CgroupStats {
    fn read(&self, task_id: &str) -> Result<Counters, StatsError> {
        let v1 = self.path("cpuacct", task_id);
        if v1.is_dir() {
            let cpu_ns = read_u64(&v1.join("cpuacct.usage"))?;
            let mem = self.path("memory", task_id);
            let usage = read_u64(&mem.join("memory.usage_in_bytes"))?;
            let inactive = stat_key(&mem.join("memory.stat"), "total_inactive_file").unwrap_or(0);
            return Ok(Counters {
                cpu_ns,
                memory_bytes: usage.saturating_sub(inactive),
            });
        }
        let v2 = self.path("", task_id);
        let cpu_ns = stat_key(&v2.join("cpu.stat"), "usage_usec")?.saturating_mul(1000);
        let usage = read_u64(&v2.join("memory.current"))?;
        let inactive = stat_key(&v2.join("memory.stat"), "inactive_file").unwrap_or(0);
        Ok(Counters {
            cpu_ns,
            memory_bytes: usage.saturating_sub(inactive),
        })
    }
}

/// Turns successive counter readings into samples: cpu as a rate over the time between two
/// readings. Pure: the caller passes the (monotonic) time of each round.
#[derive(Default)]
pub struct Sampler {
    /// task id → (time of the last reading in ms, cpu ns then).
    last: HashMap<String, (u64, u64)>,
}

impl Sampler {
    /// Reads every task of `running` at `now_ms` and returns a sample for each task read twice
    /// (the first reading only starts its rate). Tasks no longer running are forgotten.
    pub fn round(
        &mut self,
        source: &dyn StatsSource,
        running: &[String],
        now_ms: u64,
    ) -> Vec<TaskUsage> {
        self.last.retain(|id, _| running.contains(id));
        let mut out = Vec::new();
        for id in running {
            let c = match source.read(id) {
                Ok(c) => c,
                Err(e) => {
                    // A task just started or just ended has no cgroup: normal, hence debug.
                    debug!(task = %id, %e, "no usage sample");
                    self.last.remove(id);
                    continue;
                }
            };
            if let Some((at, cpu)) = self.last.insert(id.clone(), (now_ms, c.cpu_ns)) {
                let ms = now_ms.saturating_sub(at);
                if ms == 0 {
                    continue;
                }
                // ns per ms of wall time / 1000 = thousandths of a cpu.
                let cpu_milli = c.cpu_ns.saturating_sub(cpu) / ms / 1000;
                out.push(TaskUsage {
                    task_id: id.clone(),
                    cpu_milli,
                    memory_bytes: c.memory_bytes,
                });
            }
        }
        out
    }
}

/// Samples the worker's running tasks every `period` until the receiver side is gone.
pub async fn run(
    worker: Arc<Worker>,
    source: Arc<dyn StatsSource>,
    period: Duration,
    out: watch::Sender<Vec<TaskUsage>>,
) {
    let mut sampler = Sampler::default();
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let running: Vec<String> = worker
            .last_statuses()
            .into_iter()
            .filter(|r| r.state == rudder_proto::v1::TaskState::Running as i32)
            .map(|r| r.task_id)
            .collect();
        let now = start.elapsed().as_millis() as u64;
        let src = source.clone();
        let Ok((s, samples)) = tokio::task::spawn_blocking(move || {
            let samples = sampler.round(src.as_ref(), &running, now);
            (sampler, samples)
        })
        .await
        else {
            return;
        };
        sampler = s;
        if out.send(samples).is_err() {
            return;
        }
    }
}

// ---- live usage for `rctl stats` (AgentApi.TaskStats) ------------------------------------

/// The most tasks one `TaskStats` call may name.
pub const MAX_LIVE_TASKS: usize = 4096;
/// The bounds of a live stream's interval.
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);
pub const MAX_INTERVAL: Duration = Duration::from_secs(10);
/// Frames a live stream may hold for a caller that does not read them: one more and the
/// caller is dropped (a slow reader never grows the agent's memory).
pub const LIVE_BACKLOG: usize = 2;

/// Everything `rctl stats` shows of one task at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LiveCounters {
    /// Cumulative cpu time and the working set.
    pub counters: Counters,
    /// The cgroup's memory limit (`None`: it has none).
    pub memory_limit: Option<u64>,
    /// Processes and threads in the cgroup.
    pub pids: u64,
    /// Block and network bytes.
    pub io: crate::metrics::IoCounters,
}

/// The port for live readings by task id.
pub trait LiveSource: Send + Sync {
    /// The counters of task `task_id` now.
    fn read_live(&self, task_id: &str) -> Result<LiveCounters, StatsError>;
    /// The host's memory, shown as the limit of a task without one.
    fn host_memory(&self) -> u64;
}

/// Live readings from the cgroup filesystem (v1 or v2) and the containers' `/proc/<pid>/net/dev`.
pub struct CgroupLive {
    stats: CgroupStats,
    io: crate::metrics::CgroupIo,
    host_memory: u64,
}

impl CgroupLive {
    /// Readings of the cgroups `<parent>/<task id>` under `root`, pids looked up in `proc`.
    pub fn new(
        root: impl Into<PathBuf>,
        parent: &str,
        proc: impl Into<PathBuf>,
        host_memory: u64,
    ) -> CgroupLive {
        let root = root.into();
        CgroupLive {
            stats: CgroupStats::new(root.clone(), parent),
            io: crate::metrics::CgroupIo::new(root, parent, proc),
            host_memory,
        }
    }
}

/// A cgroup memory limit file's value: v1 writes a huge page-aligned number when there is no
/// limit, v2 writes `max`. Pure.
pub fn parse_memory_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    let v: u64 = t.parse().ok()?;
    // v1's "unlimited" is LONG_MAX rounded down to a page.
    (v < (1u64 << 62)).then_some(v)
}

impl LiveSource for CgroupLive {
    fn read_live(&self, task_id: &str) -> Result<LiveCounters, StatsError> {
        let counters = self.stats.read(task_id)?;
        let s = &self.stats;
        let v1 = s.path("memory", task_id).is_dir();
        let (limit_file, pids_file) = if v1 {
            (
                s.path("memory", task_id).join("memory.limit_in_bytes"),
                s.path("pids", task_id).join("pids.current"),
            )
        } else {
            let d = s.path("", task_id);
            (d.join("memory.max"), d.join("pids.current"))
        };
        let memory_limit = read_small(&limit_file, MAX_STAT_FILE)
            .ok()
            .and_then(|t| parse_memory_limit(&t));
        let pids = match read_u64(&pids_file) {
            Ok(n) => n,
            // No pids controller: count the processes.
            Err(_) => {
                let dir = if v1 {
                    s.path("cpuacct", task_id)
                } else {
                    s.path("", task_id)
                };
                read_small(&dir.join("cgroup.procs"), 1 << 20)
                    .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count() as u64)
                    .unwrap_or(0)
            }
        };
        use crate::metrics::IoSource;
        let io = self.io.read_io(task_id).unwrap_or_default();
        Ok(LiveCounters {
            counters,
            memory_limit,
            pids,
            io,
        })
    }

    fn host_memory(&self) -> u64 {
        self.host_memory
    }
}

/// CPU as a percentage of one cpu (100 = one cpu busy) from two readings of cumulative cpu
/// time `wall_ns` apart. Pure.
pub fn cpu_percent(before_ns: u64, after_ns: u64, wall_ns: u64) -> f64 {
    if wall_ns == 0 {
        return 0.0;
    }
    after_ns.saturating_sub(before_ns) as f64 * 100.0 / wall_ns as f64
}

/// A live sample in wire form: `cpu` is the percentage over the last interval. Pure.
pub fn live_sample(task_id: &str, c: &LiveCounters, cpu: f64, host_memory: u64) -> LiveTaskStats {
    let limit = c
        .memory_limit
        .filter(|l| host_memory == 0 || *l < host_memory)
        .unwrap_or(host_memory);
    LiveTaskStats {
        task_id: task_id.to_string(),
        cpu_percent: cpu,
        memory_bytes: c.counters.memory_bytes,
        memory_limit_bytes: limit,
        has_network: c.io.network.is_some(),
        net_rx_bytes: c.io.network.map_or(0, |n| n.0),
        net_tx_bytes: c.io.network.map_or(0, |n| n.1),
        block_read_bytes: c.io.block_read_bytes,
        block_write_bytes: c.io.block_write_bytes,
        pids: c.pids,
        sampled: true,
        ..Default::default()
    }
}

/// Successive live readings of a set of tasks: each round's samples carry the cpu rate since
/// the previous round. Pure: the caller passes the (monotonic) time of each round in ns.
#[derive(Default)]
pub struct LiveSampler {
    /// task id → (time of the last reading, cpu ns then).
    last: HashMap<String, (u64, u64)>,
}

impl LiveSampler {
    /// Reads every task of `ids` at `now_ns`; a task read for the first time (or unreadable)
    /// gives no sample, its rate starts here.
    pub fn round(
        &mut self,
        source: &dyn LiveSource,
        ids: &[String],
        now_ns: u64,
    ) -> Vec<LiveTaskStats> {
        let mut out = Vec::new();
        for id in ids {
            let c = match source.read_live(id) {
                Ok(c) => c,
                Err(e) => {
                    debug!(task = %id, %e, "no live sample");
                    self.last.remove(id);
                    continue;
                }
            };
            let prev = self.last.insert(id.clone(), (now_ns, c.counters.cpu_ns));
            if let Some((at, cpu)) = prev {
                let pct = cpu_percent(cpu, c.counters.cpu_ns, now_ns.saturating_sub(at));
                out.push(live_sample(id, &c, pct, source.host_memory()));
            }
        }
        out
    }
}

/// Why a live request is refused.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("stats: at most {MAX_LIVE_TASKS} tasks per request")]
    TooMany,
    #[error("stats: bad task id {0:?}")]
    BadId(String),
}

/// The frames of a live stream of `ids`: the first after one interval (a rate needs two
/// readings), then one per interval, or only the first when `once`. The stream ends when
/// the receiver is dropped, or falls [`LIVE_BACKLOG`] frames behind.
pub fn live(
    source: Arc<dyn LiveSource>,
    ids: Vec<String>,
    interval: Duration,
    once: bool,
) -> Result<tokio::sync::mpsc::Receiver<rudder_proto::v1::StatsFrame>, LiveError> {
    if ids.len() > MAX_LIVE_TASKS {
        return Err(LiveError::TooMany);
    }
    if let Some(bad) = ids
        .iter()
        .find(|id| id.is_empty() || id.len() > 128 || id.contains('/') || id.contains(".."))
    {
        return Err(LiveError::BadId(bad.clone()));
    }
    let interval = interval.clamp(MIN_INTERVAL, MAX_INTERVAL);
    let (tx, rx) = tokio::sync::mpsc::channel(LIVE_BACKLOG);
    tokio::spawn(async move {
        let mut sampler = LiveSampler::default();
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            tick.tick().await;
            let now = start.elapsed().as_nanos() as u64;
            let (src, list) = (source.clone(), ids.clone());
            let Ok((s, tasks)) = tokio::task::spawn_blocking(move || {
                let tasks = sampler.round(src.as_ref(), &list, now);
                (sampler, tasks)
            })
            .await
            else {
                return;
            };
            sampler = s;
            if std::mem::take(&mut first) {
                continue;
            }
            let frame = rudder_proto::v1::StatsFrame {
                tasks,
                warnings: Vec::new(),
            };
            match tx.try_send(frame) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    debug!("stats: a live reader fell behind; dropped");
                    return;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
            }
            if once {
                return;
            }
        }
    });
    Ok(rx)
}

/// A recording fake of a per-task reading source (`StatsSource`, `metrics::IoSource`):
/// scripted readings per task; every read is recorded.
#[cfg(test)]
pub struct FakeReadings<T> {
    /// task id → the reading the next read returns (absent: the cgroup is missing).
    pub counters: std::sync::Mutex<HashMap<String, T>>,
    /// Every task id read, in order.
    pub reads: std::sync::Mutex<Vec<String>>,
}

#[cfg(test)]
impl<T> Default for FakeReadings<T> {
    fn default() -> Self {
        FakeReadings {
            counters: Default::default(),
            reads: Default::default(),
        }
    }
}

#[cfg(test)]
impl<T: Copy> FakeReadings<T> {
    /// Records the read of `task_id` and returns its scripted reading.
    pub fn reading(&self, task_id: &str) -> Result<T, StatsError> {
        self.reads.lock().unwrap().push(task_id.to_string());
        self.counters
            .lock()
            .unwrap()
            .get(task_id)
            .copied()
            .ok_or_else(|| {
                StatsError::Read(
                    PathBuf::from(task_id),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                )
            })
    }
}

/// The fake `StatsSource`.
#[cfg(test)]
pub type FakeStats = FakeReadings<Counters>;

#[cfg(test)]
impl StatsSource for FakeStats {
    fn read(&self, task_id: &str) -> Result<Counters, StatsError> {
        self.reading(task_id)
    }
}

/// The fake `LiveSource`.
#[cfg(test)]
pub type FakeLive = FakeReadings<LiveCounters>;

#[cfg(test)]
impl LiveSource for FakeLive {
    fn read_live(&self, task_id: &str) -> Result<LiveCounters, StatsError> {
        self.reading(task_id)
    }
    fn host_memory(&self) -> u64 {
        1 << 30
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(cpu_ns: u64, limit: Option<u64>) -> LiveCounters {
        LiveCounters {
            counters: Counters {
                cpu_ns,
                memory_bytes: 4096,
            },
            memory_limit: limit,
            pids: 3,
            io: crate::metrics::IoCounters {
                block_read_bytes: 1,
                block_write_bytes: 2,
                network: Some((10, 20)),
            },
        }
    }

    #[test]
    fn cpu_percent_is_cpu_time_over_wall_time() {
        for (before, after, wall, want) in [
            (0, 1_000_000_000, 1_000_000_000, 100.0),
            (0, 500_000_000, 1_000_000_000, 50.0),
            (1_000, 2_000_001_000, 1_000_000_000, 200.0),
            // A counter that went back (a new cgroup): no negative cpu.
            (5_000, 1_000, 1_000_000_000, 0.0),
            (0, 1_000, 0, 0.0),
        ] {
            assert_eq!(
                cpu_percent(before, after, wall),
                want,
                "{before} {after} {wall}"
            );
        }
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None);
        assert_eq!(parse_memory_limit("536870912\n"), Some(512 << 20));
        assert_eq!(parse_memory_limit("junk"), None);
    }

    #[test]
    fn live_rounds_give_rates_and_limits() {
        let fake = FakeLive::default();
        let ids = vec!["a".to_string(), "b".to_string()];
        fake.counters
            .lock()
            .unwrap()
            .insert("a".into(), live(0, Some(256 << 20)));
        fake.counters
            .lock()
            .unwrap()
            .insert("b".into(), live(0, None));
        let mut s = LiveSampler::default();
        assert!(
            s.round(&fake, &ids, 0).is_empty(),
            "a rate needs two readings"
        );
        fake.counters
            .lock()
            .unwrap()
            .insert("a".into(), live(750_000_000, Some(256 << 20)));
        fake.counters
            .lock()
            .unwrap()
            .insert("b".into(), live(0, Some(1 << 40)));
        let out = s.round(&fake, &ids, 1_000_000_000);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].task_id, "a");
        assert_eq!(out[0].cpu_percent, 75.0);
        assert_eq!(out[0].memory_limit_bytes, 256 << 20);
        // No limit, or one above the host's memory: the host's memory.
        assert_eq!(out[1].memory_limit_bytes, 1 << 30);
        assert_eq!(
            (
                out[0].pids,
                out[0].net_rx_bytes,
                out[0].net_tx_bytes,
                out[0].block_write_bytes
            ),
            (3, 10, 20, 2)
        );
        assert!(out[0].has_network && out[0].sampled);
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_stream_is_bounded_and_ends_with_its_reader() {
        let fake = Arc::new(FakeLive::default());
        fake.counters
            .lock()
            .unwrap()
            .insert("a".into(), live(0, None));
        let src: Arc<dyn LiveSource> = fake.clone();
        assert!(matches!(
            super::live(
                src.clone(),
                vec!["../x".into()],
                Duration::from_secs(1),
                false
            ),
            Err(LiveError::BadId(_))
        ));
        assert!(matches!(
            super::live(
                src.clone(),
                vec!["a".into(); MAX_LIVE_TASKS + 1],
                Duration::from_secs(1),
                false
            ),
            Err(LiveError::TooMany)
        ));
        // Once: one frame after one interval, then the end.
        let mut rx =
            super::live(src.clone(), vec!["a".into()], Duration::from_secs(1), true).unwrap();
        let f = rx.recv().await.unwrap();
        assert_eq!(f.tasks.len(), 1);
        assert!(rx.recv().await.is_none());
        // A reader that does not read: dropped after LIVE_BACKLOG frames, not buffered on.
        let mut rx = super::live(src, vec!["a".into()], Duration::from_secs(1), false).unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let mut n = 0;
        while rx.recv().await.is_some() {
            n += 1;
        }
        assert_eq!(n, LIVE_BACKLOG);
    }

    #[test]
    fn cpu_is_a_rate_between_two_readings() {
        let fake = FakeStats::default();
        let set = |id: &str, cpu_ns: u64, mem: u64| {
            fake.counters.lock().unwrap().insert(
                id.into(),
                Counters {
                    cpu_ns,
                    memory_bytes: mem,
                },
            );
        };
        let mut s = Sampler::default();
        let running = vec!["a".to_string(), "b".to_string()];
        set("a", 1_000_000_000, 10);
        // b has no cgroup yet.
        assert!(
            s.round(&fake, &running, 0).is_empty(),
            "first reading: no rate"
        );
        // 1 s of cpu over 2 s: half a cpu.
        set("a", 2_000_000_000, 20);
        set("b", 5_000_000_000, 30);
        let out = s.round(&fake, &running, 2_000);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (
                out[0].task_id.as_str(),
                out[0].cpu_milli,
                out[0].memory_bytes
            ),
            ("a", 500, 20)
        );
        // b: 3 cpus busy over 1 s.
        set("b", 8_000_000_000, 30);
        let out = s.round(&fake, &running, 3_000);
        let b = out.iter().find(|u| u.task_id == "b").unwrap();
        assert_eq!(b.cpu_milli, 3000);
        // a stopped running: forgotten, and no longer read.
        fake.reads.lock().unwrap().clear();
        let out = s.round(&fake, &["b".to_string()], 4_000);
        assert_eq!(out.len(), 1);
        assert_eq!(*fake.reads.lock().unwrap(), vec!["b".to_string()]);
        assert!(!s.last.contains_key("a"));
    }

    #[test]
    fn cgroup_v1_and_v2_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // v1: cpuacct and memory hierarchies.
        let cpu = root.join("cpuacct/rudder/t1");
        let mem = root.join("memory/rudder/t1");
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(cpu.join("cpuacct.usage"), "123456789\n").unwrap();
        std::fs::write(mem.join("memory.usage_in_bytes"), "10485760\n").unwrap();
        std::fs::write(
            mem.join("memory.stat"),
            "cache 1\ntotal_inactive_file 4194304\ntotal_rss 5\n",
        )
        .unwrap();
        let src = CgroupStats::new(root, "/rudder/");
        assert_eq!(
            src.read("t1").unwrap(),
            Counters {
                cpu_ns: 123_456_789,
                memory_bytes: 6 << 20
            }
        );
        // v2: one tree.
        let v2 = root.join("rudder/t2");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cpu.stat"), "usage_usec 2500\nuser_usec 2000\n").unwrap();
        std::fs::write(v2.join("memory.current"), "8192\n").unwrap();
        std::fs::write(v2.join("memory.stat"), "anon 1\ninactive_file 4096\n").unwrap();
        assert_eq!(
            src.read("t2").unwrap(),
            Counters {
                cpu_ns: 2_500_000,
                memory_bytes: 4096
            }
        );
        let e = src.read("gone").unwrap_err();
        assert!(e.to_string().starts_with("stats: cannot read"), "{e}");
        std::fs::write(cpu.join("cpuacct.usage"), "lots\n").unwrap();
        let e = src.read("t1").unwrap_err();
        assert!(e.to_string().contains("unexpected content"), "{e}");
    }
}

//! `rctl top`: the processes of a task's container, read from `/proc` for the pids its cgroup
//! lists (`cgroup.procs`); no `ps` is run. The [`ProcessSource`] port reads the files
//! ([`ProcFs`] on a host, `FakeProcesses` in tests); parsing them ([`parse_stat`],
//! [`parse_status`]) and making a row of them ([`process`]) are pure.
//!
//! Invariants: at most [`MAX_PROCESSES`] rows (the answer says where it was cut); every file
//! read is size-limited; a process that exits between the listing and the read is left out,
//! not an error.

use std::path::PathBuf;

use rudder_proto::v1::{ProcessInfo, TopResponse};

use crate::stats::CgroupStats;

/// The most processes listed for one task.
pub const MAX_PROCESSES: usize = 2048;
/// The most of a `/proc/<pid>` file read (`status` is about 1.5 KiB).
const MAX_PROC_FILE: u64 = 16 * 1024;
/// The most of a command line kept.
const MAX_CMDLINE: u64 = 4096;

/// Why a task's processes could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("top: bad task id {0:?}")]
    BadId(String),
    /// The task has no cgroup here (not running on this host).
    #[error("top: task {0} has no cgroup on this host (not running here?)")]
    NoCgroup(String),
    #[error("top: cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("top: unexpected content in {0}")]
    Parse(String),
}

/// The files of one process, as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcFiles {
    pub stat: String,
    pub status: String,
    /// NUL-separated arguments (empty for kernel threads and zombies).
    pub cmdline: Vec<u8>,
}

/// The host's clock as `ps` uses it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcClock {
    /// Seconds since boot (`/proc/uptime`).
    pub uptime_s: f64,
    /// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
    pub ticks: u64,
}

/// The port: the pids of a task's cgroup and the files of a pid.
pub trait ProcessSource: Send + Sync {
    /// The processes in task `task_id`'s cgroup.
    fn pids(&self, task_id: &str) -> Result<Vec<u32>, TopError>;
    /// Process `pid`'s files (`Err` when it is gone).
    fn files(&self, pid: u32) -> Result<ProcFiles, TopError>;
    /// Now, for cpu percentages.
    fn clock(&self) -> Result<ProcClock, TopError>;
}

/// What `/proc/<pid>/stat` says that top shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    /// User and system time, clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// Start after boot, clock ticks.
    pub starttime: u64,
}

/// `/proc/<pid>/stat`: `pid (comm) state ppid ...`; comm may hold spaces and parentheses, so
/// the fields after it are found from its last `)`. Pure.
pub fn parse_stat(text: &str) -> Result<Stat, TopError> {
    let bad = || {
        TopError::Parse(format!(
            "stat {:?}",
            text.chars().take(80).collect::<String>()
        ))
    };
    let open = text.find('(').ok_or_else(bad)?;
    let close = text.rfind(')').ok_or_else(bad)?;
    if close < open {
        return Err(bad());
    }
    let comm = text[open + 1..close].to_string();
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // f[0] is field 3 (state); field n is f[n - 3].
    let num = |n: usize| -> Result<u64, TopError> {
        f.get(n - 3).and_then(|v| v.parse().ok()).ok_or_else(bad)
    };
    Ok(Stat {
        comm,
        state: f.first().and_then(|s| s.chars().next()).ok_or_else(bad)?,
        ppid: u32::try_from(num(4)?).map_err(|_| bad())?,
        utime: num(14)?,
        stime: num(15)?,
        starttime: num(22)?,
    })
}

/// What `/proc/<pid>/status` says that top shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Real uid.
    pub uid: u32,
    /// Resident memory, bytes (0 for kernel threads).
    pub rss_bytes: u64,
    /// The pid in the innermost pid namespace (`NSpid`'s last), if the kernel says.
    pub ns_pid: Option<u32>,
}

/// `/proc/<pid>/status` (`Key:\tvalue` lines). Pure.
pub fn parse_status(text: &str) -> Result<Status, TopError> {
    let mut st = Status::default();
    let mut uid = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k {
            "Uid" => uid = v.split_whitespace().next().and_then(|u| u.parse().ok()),
            "VmRSS" => {
                let kb: u64 = v
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                st.rss_bytes = kb.saturating_mul(1024);
            }
            "NSpid" => st.ns_pid = v.split_whitespace().last().and_then(|p| p.parse().ok()),
            _ => {}
        }
    }
    st.uid = uid.ok_or_else(|| TopError::Parse("status without Uid".into()))?;
    Ok(st)
}

/// One row of top from a process's files. Pure.
pub fn process(
    host_pid: u32,
    files: &ProcFiles,
    clock: ProcClock,
) -> Result<ProcessInfo, TopError> {
    let stat = parse_stat(&files.stat)?;
    let status = parse_status(&files.status)?;
    let ticks = clock.ticks.max(1);
    let cpu_ticks = stat.utime.saturating_add(stat.stime);
    let alive_s = clock.uptime_s - stat.starttime as f64 / ticks as f64;
    let cpu_s = cpu_ticks as f64 / ticks as f64;
    let cpu_percent = if alive_s > 0.0 {
        cpu_s * 100.0 / alive_s
    } else {
        0.0
    };
    let args: Vec<String> = files
        .cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let command = if args.is_empty() {
        format!("[{}]", stat.comm)
    } else {
        args.join(" ")
    };
    Ok(ProcessInfo {
        host_pid,
        pid: status.ns_pid.unwrap_or(0),
        ppid: stat.ppid,
        uid: status.uid,
        state: stat.state.to_string(),
        rss_bytes: status.rss_bytes,
        cpu_time_ms: cpu_ticks.saturating_mul(1000) / ticks,
        cpu_percent,
        command,
    })
}

/// The processes of task `task_id`, sorted by host pid.
pub fn top(source: &dyn ProcessSource, task_id: &str) -> Result<TopResponse, TopError> {
    if task_id.is_empty() || task_id.len() > 128 || task_id.contains('/') || task_id.contains("..")
    {
        return Err(TopError::BadId(task_id.into()));
    }
    let mut pids = source.pids(task_id)?;
    pids.sort_unstable();
    pids.dedup();
    let truncated_at = if pids.len() > MAX_PROCESSES {
        pids.truncate(MAX_PROCESSES);
        MAX_PROCESSES as u32
    } else {
        0
    };
    let clock = source.clock()?;
    let processes = pids
        .into_iter()
        .filter_map(|pid| {
            // Gone since the listing, or unreadable: not a row.
            let files = source.files(pid).ok()?;
            process(pid, &files, clock)
                .map_err(|e| tracing::debug!(pid, %e, "top: skipped"))
                .ok()
        })
        .collect();
    Ok(TopResponse {
        task_id: task_id.into(),
        processes,
        truncated_at,
        ..Default::default()
    })
}

/// Reads the cgroup filesystem under `root` (v1 or v2) and `proc`.
pub struct ProcFs {
    cgroups: CgroupStats,
    proc: PathBuf,
}

impl ProcFs {
    /// Pids of the cgroups `<parent>/<task id>` under `root`, their files in `proc`.
    pub fn new(root: impl Into<PathBuf>, parent: &str, proc: impl Into<PathBuf>) -> ProcFs {
        ProcFs {
            cgroups: CgroupStats::new(root, parent),
            proc: proc.into(),
        }
    }

    fn read(&self, path: PathBuf, max: u64) -> Result<Vec<u8>, TopError> {
        use std::io::Read;
        let f = std::fs::File::open(&path).map_err(|e| TopError::Read(path.clone(), e))?;
        let mut out = Vec::new();
        f.take(max)
            .read_to_end(&mut out)
            .map_err(|e| TopError::Read(path, e))?;
        Ok(out)
    }
}

impl ProcessSource for ProcFs {
    fn pids(&self, task_id: &str) -> Result<Vec<u32>, TopError> {
        let v1 = self.cgroups.path("cpuacct", task_id);
        let dir = if v1.is_dir() {
            v1
        } else {
            self.cgroups.path("", task_id)
        };
        if !dir.is_dir() {
            return Err(TopError::NoCgroup(task_id.into()));
        }
        // A pid is at most 8 bytes with its newline.
        let text = self.read(dir.join("cgroup.procs"), (MAX_PROCESSES as u64 + 1) * 8)?;
        Ok(String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    fn files(&self, pid: u32) -> Result<ProcFiles, TopError> {
        let dir = self.proc.join(pid.to_string());
        let text = |name: &str| {
            self.read(dir.join(name), MAX_PROC_FILE)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        Ok(ProcFiles {
            stat: text("stat")?,
            status: text("status")?,
            cmdline: self.read(dir.join("cmdline"), MAX_CMDLINE)?,
        })
    }

    fn clock(&self) -> Result<ProcClock, TopError> {
        let path = self.proc.join("uptime");
        let text = self.read(path.clone(), 256)?;
        let uptime_s = String::from_utf8_lossy(&text)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| TopError::Parse(path.display().to_string()))?;
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(100);
        Ok(ProcClock { uptime_s, ticks })
    }
}

/// A recording fake: scripted pids per task and files per pid; every read is recorded.
#[cfg(test)]
#[derive(Default)]
pub struct FakeProcesses {
    pub pids: std::collections::HashMap<String, Vec<u32>>,
    pub files: std::collections::HashMap<u32, ProcFiles>,
    pub reads: std::sync::Mutex<Vec<u32>>,
}

#[cfg(test)]
impl ProcessSource for FakeProcesses {
    fn pids(&self, task_id: &str) -> Result<Vec<u32>, TopError> {
        self.pids
            .get(task_id)
            .cloned()
            .ok_or_else(|| TopError::NoCgroup(task_id.into()))
    }
    fn files(&self, pid: u32) -> Result<ProcFiles, TopError> {
        self.reads.lock().unwrap().push(pid);
        self.files.get(&pid).cloned().ok_or_else(|| {
            TopError::Read(
                PathBuf::from(pid.to_string()),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })
    }
    fn clock(&self) -> Result<ProcClock, TopError> {
        Ok(ProcClock {
            uptime_s: 1000.0,
            ticks: 100,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat line for `comm` started at `start` ticks with `utime`+`stime` ticks of cpu.
    fn stat_line(
        pid: u32,
        comm: &str,
        state: char,
        ppid: u32,
        cpu: (u64, u64),
        start: u64,
    ) -> String {
        format!(
            "{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 {} {} 0 0 20 0 1 0 \
             {start} 1234567 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0",
            cpu.0, cpu.1
        )
    }

    #[test]
    fn stat_lines() {
        struct Case {
            line: String,
            want: Result<(&'static str, char, u32, u64, u64, u64), ()>,
        }
        let cases = [
            Case {
                line: stat_line(42, "sh", 'R', 1, (150, 50), 9000),
                want: Ok(("sh", 'R', 1, 150, 50, 9000)),
            },
            // A comm with spaces and parentheses: the fields start after the last ')'.
            Case {
                line: stat_line(7, "a) (b c", 'S', 3, (1, 2), 3),
                want: Ok(("a) (b c", 'S', 3, 1, 2, 3)),
            },
            Case {
                line: stat_line(8, "", 'Z', 3, (0, 0), 0),
                want: Ok(("", 'Z', 3, 0, 0, 0)),
            },
            Case {
                line: "12 (short) S 1 2".into(),
                want: Err(()),
            },
            Case {
                line: "no parens at all".into(),
                want: Err(()),
            },
            Case {
                line: "1 (x) S notanumber 1 1 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 5".into(),
                want: Err(()),
            },
        ];
        for c in cases {
            let got = parse_stat(&c.line)
                .map(|s| (s.comm, s.state, s.ppid, s.utime, s.stime, s.starttime))
                .map_err(|_| ());
            let want = c.want.map(|w| (w.0.to_string(), w.1, w.2, w.3, w.4, w.5));
            assert_eq!(got, want, "{}", c.line);
        }
    }

    #[test]
    fn status_files() {
        let full =
            "Name:\tsh\nState:\tS (sleeping)\nNSpid:\t4242\t1\nUid:\t1000\t1000\t1000\t1000\n\
                    VmRSS:\t    1536 kB\n";
        let cases: [(&str, Option<Status>); 4] = [
            (
                full,
                Some(Status {
                    uid: 1000,
                    rss_bytes: 1536 * 1024,
                    ns_pid: Some(1),
                }),
            ),
            // A kernel thread: no VmRSS; an old kernel: no NSpid.
            (
                "Name:\tkthreadd\nUid:\t0\t0\t0\t0\n",
                Some(Status {
                    uid: 0,
                    rss_bytes: 0,
                    ns_pid: None,
                }),
            ),
            // The host's namespace only: NSpid has one value.
            (
                "NSpid:\t77\nUid:\t5\t5\t5\t5\n",
                Some(Status {
                    uid: 5,
                    rss_bytes: 0,
                    ns_pid: Some(77),
                }),
            ),
            ("Name:\tx\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_status(text).ok(), want, "{text}");
        }
    }

    #[test]
    fn a_row_has_ps_columns() {
        let files = ProcFiles {
            // 150 + 50 ticks of cpu over a life from tick 80000 (800 s) to 1000 s: 1%.
            stat: stat_line(4242, "sh", 'R', 4000, (150, 50), 80_000),
            status: "NSpid:\t4242\t1\nUid:\t0\t0\t0\t0\nVmRSS:\t100 kB\n".into(),
            cmdline: b"sh\0-c\0while :; do :; done\0".to_vec(),
        };
        let clock = ProcClock {
            uptime_s: 1000.0,
            ticks: 100,
        };
        let p = process(4242, &files, clock).unwrap();
        assert_eq!(
            (
                p.host_pid,
                p.pid,
                p.ppid,
                p.uid,
                p.state.as_str(),
                p.rss_bytes
            ),
            (4242, 1, 4000, 0, "R", 102_400)
        );
        assert_eq!(p.cpu_time_ms, 2000);
        assert!((p.cpu_percent - 1.0).abs() < 1e-9, "{}", p.cpu_percent);
        assert_eq!(p.command, "sh -c while :; do :; done");
        // No command line: the name in brackets, as ps.
        let z = ProcFiles {
            cmdline: Vec::new(),
            ..files
        };
        assert_eq!(process(4242, &z, clock).unwrap().command, "[sh]");
    }

    #[test]
    fn top_lists_the_cgroups_processes_and_skips_the_gone() {
        let mut fake = FakeProcesses::default();
        fake.pids.insert("t1".into(), vec![30, 10, 20, 10]);
        for pid in [10, 30] {
            fake.files.insert(
                pid,
                ProcFiles {
                    stat: stat_line(pid, "sleep", 'S', 1, (0, 0), 1),
                    status: "Uid:\t0\t0\t0\t0\n".into(),
                    cmdline: b"sleep\x001000\x00".to_vec(),
                },
            );
        }
        let r = top(&fake, "t1").unwrap();
        let pids: Vec<u32> = r.processes.iter().map(|p| p.host_pid).collect();
        assert_eq!(pids, vec![10, 30], "20 exited meanwhile");
        assert_eq!(*fake.reads.lock().unwrap(), vec![10, 20, 30]);
        assert_eq!(r.truncated_at, 0);
        assert!(matches!(top(&fake, "../x"), Err(TopError::BadId(_))));
        let e = top(&fake, "gone").unwrap_err();
        assert!(
            e.to_string().starts_with("top: task gone has no cgroup"),
            "{e}"
        );
    }

    #[test]
    fn top_is_cut_at_its_bound() {
        let mut fake = FakeProcesses::default();
        fake.pids
            .insert("t".into(), (1..=MAX_PROCESSES as u32 + 5).collect());
        let r = top(&fake, "t").unwrap();
        assert_eq!(r.truncated_at as usize, MAX_PROCESSES);
        assert_eq!(fake.reads.lock().unwrap().len(), MAX_PROCESSES);
    }

    #[test]
    fn procfs_reads_a_v2_cgroup_and_proc() {
        let d = tempfile::tempdir().unwrap();
        let cg = d.path().join("cg/rudder/t1");
        std::fs::create_dir_all(&cg).unwrap();
        std::fs::write(cg.join("cgroup.procs"), "42\n43\n").unwrap();
        let proc = d.path().join("proc");
        std::fs::create_dir_all(proc.join("42")).unwrap();
        std::fs::write(proc.join("42/stat"), stat_line(42, "sh", 'S', 1, (1, 1), 1)).unwrap();
        std::fs::write(proc.join("42/status"), "Uid:\t0\t0\t0\t0\n").unwrap();
        std::fs::write(proc.join("42/cmdline"), b"sh\0").unwrap();
        std::fs::write(proc.join("uptime"), "123.45 678.9\n").unwrap();
        let src = ProcFs::new(d.path().join("cg"), "/rudder", &proc);
        assert_eq!(src.pids("t1").unwrap(), vec![42, 43]);
        assert!((src.clock().unwrap().uptime_s - 123.45).abs() < 1e-9);
        let r = top(&src, "t1").unwrap();
        assert_eq!(r.processes.len(), 1, "43 has no /proc entry");
        assert_eq!(r.processes[0].command, "sh");
        assert!(matches!(src.pids("t2"), Err(TopError::NoCgroup(_))));
    }
}

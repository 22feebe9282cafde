//! [`FakeRuntime`]: a [`ContainerRuntime`] that records every call and plays scripted results,
//! for unit tests without root (built under `cfg(test)` or the `fake` feature).
//!
//! Containers are entries in a map: `start` makes one running (pid 1000, 1001, …), `kill`
//! with TERM/KILL/INT/HUP/QUIT ends it with 128+signal (unless [`FakeRuntime::ignore_signals`]),
//! [`FakeRuntime::exit`] ends it with a code, `wait` returns once it ended. Any verb can be made
//! to fail once with [`FakeRuntime::fail_next`]. Attached processes (`exec_attached`,
//! `run_attached`) are real host processes: the exec's argv itself, so a session can be tested
//! end to end, and a scripted `sh` for a foreground run.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use super::{spawn_attached, ContainerRuntime, ContainerState, ExecIo, RunState, RuntimeError};

/// One call the fake received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `start`.
    Start {
        /// The container id.
        id: String,
        /// The container directory.
        dir: PathBuf,
    },
    /// `run_attached` (a foreground run).
    RunAttached {
        /// The container id.
        id: String,
        /// The bundle run.
        bundle: PathBuf,
    },
    /// `wait`.
    Wait {
        /// The container id.
        id: String,
    },
    /// `kill`, with the signal's name.
    Kill {
        /// The container id.
        id: String,
        /// The signal's name.
        signal: String,
    },
    /// `exec`.
    Exec {
        /// The container id.
        id: String,
        /// The command.
        cmd: Vec<String>,
    },
    /// `exec_attached`.
    ExecAttached {
        /// The container id.
        id: String,
        /// The command.
        argv: Vec<String>,
        /// Whether on a terminal.
        tty: bool,
    },
    /// `pause`.
    Pause {
        /// The container id.
        id: String,
    },
    /// `resume`.
    Resume {
        /// The container id.
        id: String,
    },
    /// `delete`.
    Delete {
        /// The container id.
        id: String,
    },
    /// `list`.
    List,
    /// `state`.
    State {
        /// The container id.
        id: String,
    },
}

impl Call {
    /// The verb, as [`FakeRuntime::fail_next`] names it.
    pub fn verb(&self) -> &'static str {
        match self {
            Call::Start { .. } => "start",
            Call::RunAttached { .. } => "run",
            Call::Wait { .. } => "wait",
            Call::Kill { .. } => "kill",
            Call::Exec { .. } => "exec",
            Call::ExecAttached { .. } => "exec_attached",
            Call::Pause { .. } => "pause",
            Call::Resume { .. } => "resume",
            Call::Delete { .. } => "delete",
            Call::List => "list",
            Call::State { .. } => "state",
        }
    }
}

struct Container {
    pid: u32,
    paused: bool,
    /// `None` while it runs; its exit code once it ended.
    exit: watch::Sender<Option<i32>>,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    containers: BTreeMap<String, Container>,
    next_pid: u32,
    failures: HashMap<&'static str, VecDeque<String>>,
    exec_results: VecDeque<(i32, String)>,
    run_results: VecDeque<(i32, String)>,
    ignore_signals: bool,
}

/// A recording, scriptable [`ContainerRuntime`].
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

impl FakeRuntime {
    /// A runtime with no containers and no scripted results.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake runtime lock")
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The verbs called so far, in order (`["start", "wait", "kill", …]`).
    pub fn verbs(&self) -> Vec<&'static str> {
        self.lock().calls.iter().map(Call::verb).collect()
    }

    /// The next call of `verb` fails with `stderr` (queued: one failure per call).
    pub fn fail_next(&self, verb: &'static str, stderr: impl Into<String>) {
        self.lock()
            .failures
            .entry(verb)
            .or_default()
            .push_back(stderr.into());
    }

    /// The next `exec` returns this code and output (else `(0, "")`).
    pub fn push_exec_result(&self, code: i32, output: impl Into<String>) {
        self.lock().exec_results.push_back((code, output.into()));
    }

    /// The next `run_attached` prints `output` and exits with `code` (else `(0, "")`).
    pub fn push_run_result(&self, code: i32, output: impl Into<String>) {
        self.lock().run_results.push_back((code, output.into()));
    }

    /// Signals no longer end containers (a process that ignores TERM).
    pub fn ignore_signals(&self, ignore: bool) {
        self.lock().ignore_signals = ignore;
    }

    /// Container `id` exits with `code` (a no-op for an unknown or ended container).
    pub fn exit(&self, id: &str, code: i32) {
        if let Some(c) = self.lock().containers.get(id) {
            c.exit
                .send_if_modified(|e| e.is_none() && e.replace(code).is_none());
        }
    }

    /// Whether container `id` exists and has not ended.
    pub fn is_running(&self, id: &str) -> bool {
        self.lock()
            .containers
            .get(id)
            .is_some_and(|c| c.exit.borrow().is_none())
    }

    /// Records `call`, then fails it if a failure is queued for its verb.
    fn record(&self, call: Call) -> Result<(), RuntimeError> {
        let mut s = self.lock();
        let verb = call.verb();
        s.calls.push(call);
        match s.failures.get_mut(verb).and_then(VecDeque::pop_front) {
            Some(stderr) => Err(RuntimeError::Command {
                cmd: format!("fake {verb}"),
                stderr,
            }),
            None => Ok(()),
        }
    }

    fn add(&self, id: &str) -> u32 {
        let mut s = self.lock();
        let pid = 1000 + s.next_pid;
        s.next_pid += 1;
        let (exit, _) = watch::channel(None);
        s.containers.insert(
            id.to_string(),
            Container {
                pid,
                paused: false,
                exit,
            },
        );
        pid
    }
}

fn signal_number(signal: &str) -> Option<i32> {
    let name = signal.trim_start_matches("SIG");
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "TERM" => libc::SIGTERM,
        n => return n.parse().ok().filter(|n| *n > 0 && *n < 65),
    })
}

#[async_trait::async_trait]
impl ContainerRuntime for FakeRuntime {
    fn name(&self) -> &str {
        "fake"
    }

    async fn start(&self, id: &str, dir: &Path) -> Result<u32, RuntimeError> {
        self.record(Call::Start {
            id: id.into(),
            dir: dir.into(),
        })?;
        Ok(self.add(id))
    }

    fn run_attached(&self, id: &str, bundle: &Path) -> Result<tokio::process::Child, RuntimeError> {
        self.record(Call::RunAttached {
            id: id.into(),
            bundle: bundle.into(),
        })?;
        let (code, output) = self.lock().run_results.pop_front().unwrap_or_default();
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "printf '%s' \"$1\"; exit \"$2\"", "sh"])
            .arg(output)
            .arg(code.to_string());
        spawn_attached(cmd, ExecIo::Pipes { stdin: false }).map_err(|err| RuntimeError::Io {
            op: "fake run",
            err,
        })
    }

    async fn wait(&self, id: &str, _dir: &Path) -> Result<i32, RuntimeError> {
        self.record(Call::Wait { id: id.into() })?;
        let mut rx = match self.lock().containers.get(id) {
            Some(c) => c.exit.subscribe(),
            None => return Err(RuntimeError::NotFound(id.into())),
        };
        let code = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| RuntimeError::Start("fake: container forgotten".into()))?;
        Ok(code.unwrap_or(-1))
    }

    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.record(Call::Kill {
            id: id.into(),
            signal: signal.into(),
        })?;
        let ignore = self.lock().ignore_signals;
        if !self.is_running(id) {
            return Err(RuntimeError::NotFound(id.into()));
        }
        let fatal = signal_number(signal).filter(|n| {
            [
                libc::SIGHUP,
                libc::SIGINT,
                libc::SIGQUIT,
                libc::SIGKILL,
                libc::SIGTERM,
            ]
            .contains(n)
        });
        match fatal {
            // KILL cannot be ignored.
            Some(n) if !ignore || n == libc::SIGKILL => self.exit(id, 128 + n),
            _ => {}
        }
        Ok(())
    }

    async fn exec(
        &self,
        id: &str,
        _dir: &Path,
        cmd: &[String],
        _timeout: Duration,
    ) -> Result<(i32, String), RuntimeError> {
        self.record(Call::Exec {
            id: id.into(),
            cmd: cmd.to_vec(),
        })?;
        if !self.is_running(id) {
            return Err(RuntimeError::NotFound(id.into()));
        }
        Ok(self.lock().exec_results.pop_front().unwrap_or_default())
    }

    fn exec_attached(
        &self,
        id: &str,
        process: &Path,
        io: ExecIo,
    ) -> Result<tokio::process::Child, RuntimeError> {
        // The process file's args and terminal; run here, as this user.
        let p: serde_json::Value = std::fs::read(process)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let argv: Vec<String> = p["args"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let tty = p["terminal"].as_bool().unwrap_or(false);
        self.record(Call::ExecAttached {
            id: id.into(),
            argv: argv.clone(),
            tty,
        })?;
        let Some((prog, args)) = argv.split_first() else {
            return Err(RuntimeError::Start("fake: no command".into()));
        };
        let mut cmd = std::process::Command::new(prog);
        cmd.args(args);
        spawn_attached(cmd, io).map_err(|err| RuntimeError::Io {
            op: "fake exec",
            err,
        })
    }

    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.record(Call::Pause { id: id.into() })?;
        match self.lock().containers.get_mut(id) {
            Some(c) => c.paused = true,
            None => return Err(RuntimeError::NotFound(id.into())),
        }
        Ok(())
    }

    async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.record(Call::Resume { id: id.into() })?;
        match self.lock().containers.get_mut(id) {
            Some(c) => c.paused = false,
            None => return Err(RuntimeError::NotFound(id.into())),
        }
        Ok(())
    }

    async fn delete(&self, id: &str, _dir: &Path) -> Result<(), RuntimeError> {
        self.record(Call::Delete { id: id.into() })?;
        self.exit(id, 128 + libc::SIGKILL);
        self.lock().containers.remove(id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        self.record(Call::List)?;
        Ok(self.lock().containers.keys().cloned().collect())
    }

    async fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        self.record(Call::State { id: id.into() })?;
        let s = self.lock();
        let c = s
            .containers
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        let ended = c.exit.borrow().is_some();
        Ok(ContainerState {
            status: match (ended, c.paused) {
                (true, _) => RunState::Stopped,
                (false, true) => RunState::Paused,
                (false, false) => RunState::Running,
            },
            pid: if ended { 0 } else { c.pid },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn containers_start_end_and_are_recorded() {
        let rt = FakeRuntime::new();
        let dir = Path::new("/nowhere");
        assert_eq!(rt.start("a", dir).await.unwrap(), 1000);
        assert_eq!(rt.list().await.unwrap(), ["a"]);
        rt.pause("a").await.unwrap();
        assert_eq!(rt.state("a").await.unwrap().status, RunState::Paused);
        rt.resume("a").await.unwrap();
        rt.ignore_signals(true);
        rt.kill("a", "TERM").await.unwrap();
        assert!(rt.is_running("a"), "TERM is ignored");
        rt.kill("a", "KILL").await.unwrap();
        assert_eq!(rt.wait("a", dir).await.unwrap(), 137);
        assert_eq!(
            rt.state("a").await.unwrap(),
            ContainerState {
                status: RunState::Stopped,
                pid: 0
            }
        );
        rt.delete("a", dir).await.unwrap();
        assert!(matches!(
            rt.state("a").await,
            Err(RuntimeError::NotFound(_))
        ));
        assert_eq!(
            rt.verbs(),
            [
                "start", "list", "pause", "state", "resume", "kill", "kill", "wait", "state",
                "delete", "state"
            ]
        );
    }

    #[tokio::test]
    async fn scripted_failures_results_and_exits() {
        let rt = std::sync::Arc::new(FakeRuntime::new());
        rt.fail_next("start", "no such image");
        let e = rt.start("a", Path::new("/")).await.unwrap_err();
        assert!(e.to_string().contains("no such image"), "{e}");
        rt.start("a", Path::new("/")).await.unwrap();
        let waiter = {
            let rt = rt.clone();
            tokio::spawn(async move { rt.wait("a", Path::new("/")).await })
        };
        rt.exit("a", 3);
        assert_eq!(waiter.await.unwrap().unwrap(), 3);
        rt.start("b", Path::new("/")).await.unwrap();
        rt.push_exec_result(1, "unhealthy");
        let cmd = ["check".to_string()];
        let got = rt
            .exec("b", Path::new("/c"), &cmd, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(got, (1, "unhealthy".to_string()));
        assert_eq!(
            rt.exec("b", Path::new("/c"), &cmd, Duration::from_secs(1))
                .await
                .unwrap(),
            (0, String::new())
        );
    }

    #[tokio::test]
    async fn attached_runs_are_real_processes() {
        let rt = FakeRuntime::new();
        rt.push_run_result(2, "step output");
        let mut child = rt.run_attached("build-x", Path::new("/b")).unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        assert_eq!(out, "step output");
        assert_eq!(child.wait().await.unwrap().code(), Some(2));
        let process = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(process.path(), r#"{"args":["echo","hi"]}"#).unwrap();
        let child = rt
            .exec_attached("c", process.path(), ExecIo::Pipes { stdin: false })
            .unwrap();
        let out = child.wait_with_output().await.unwrap();
        assert_eq!(out.stdout, b"hi\n");
    }
}

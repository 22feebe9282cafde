//! Health checks: probes run against a task's container, and the monitor that turns their
//! results into "healthy now" (the task may count as running) or "unhealthy" (it must stop).
//!
//! TCP and HTTP probes connect from inside the container's network namespace — a short-lived
//! thread enters it with setns — so they reach the container's own loopback whatever its
//! network mode. Exec probes run through the OCI runtime's exec, as the container's own process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use rudder_model::health::{HealthCheck, Probe};

use crate::runtime::{ContainerRuntime, RuntimeError};

/// Why a probe failed: what a human needs to see (the probe's output or error), and what the
/// monitor counts as one failure.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("exec probe: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("exec probe exited {code}: {output}")]
    Exited { code: i32, output: String },
    #[error("tcp probe to port {port}: {err}")]
    Connect { port: u16, err: std::io::Error },
    #[error("http probe: {0}")]
    HttpIo(std::io::Error),
    #[error("http probe: not an HTTP answer: {0:?}")]
    NotHttp(String),
    #[error("http probe GET {path} answered {code}")]
    HttpStatus { path: String, code: u16 },
    #[error("container pid: unknown")]
    NoPid,
    #[error("{what}: {err}")]
    Namespace { what: &'static str, err: String },
    #[error("health check has no probe")]
    NoProbe,
}

/// Runs one probe.
pub async fn probe(
    rt: &dyn ContainerRuntime,
    id: &str,
    dir: &Path,
    check: &HealthCheck,
) -> Result<(), ProbeError> {
    let timeout = Duration::from_millis(check.timeout);
    match check.probe() {
        Some(Probe::Exec(cmd)) => {
            let (code, output) = rt.exec(id, dir, cmd, timeout).await?;
            if code == 0 {
                Ok(())
            } else {
                Err(ProbeError::Exited {
                    code,
                    output: output.trim().chars().take(200).collect(),
                })
            }
        }
        Some(Probe::Tcp { port }) => {
            in_netns(dir, move || connect(port, timeout).map(|_| ())).await
        }
        Some(Probe::Http { port, path }) => {
            let path = path.to_string();
            in_netns(dir, move || http_get(port, &path, timeout)).await
        }
        None => Err(ProbeError::NoProbe),
    }
}

fn connect(port: u16, timeout: Duration) -> Result<TcpStream, ProbeError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, timeout).map_err(|err| ProbeError::Connect { port, err })
}

fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(), ProbeError> {
    let deadline = Instant::now() + timeout;
    let mut s = connect(port, timeout)?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let _ = s.set_write_timeout(Some(left()));
    let _ = s.set_read_timeout(Some(left()));
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: rudder-health\r\nConnection: close\r\n\r\n"
    )
    .map_err(ProbeError::HttpIo)?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(ProbeError::HttpIo)?;
    let line = String::from_utf8_lossy(&head[..n]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ProbeError::NotHttp(line.lines().next().unwrap_or_default().into()))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(ProbeError::HttpStatus {
            path: path.into(),
            code,
        })
    }
}

/// Runs `f` on a fresh thread that has joined the network namespace of the container whose
/// init pid is in `dir/pid`. setns changes only the calling thread, so the thread is dedicated.
async fn in_netns<F>(dir: &Path, f: F) -> Result<(), ProbeError>
where
    F: FnOnce() -> Result<(), ProbeError> + Send + 'static,
{
    let ns_err = |what| {
        move |e: &dyn std::fmt::Display| ProbeError::Namespace {
            what,
            err: e.to_string(),
        }
    };
    let pid = crate::shim::ContainerDir::new(dir)
        .read_pid()
        .ok_or(ProbeError::NoPid)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("health-probe".into())
        .spawn(move || {
            let r = (|| {
                let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
                    .map_err(|e| ns_err("container network namespace")(&e))?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| ns_err("enter container network namespace")(&e))?;
                f()
            })();
            let _ = tx.send(r);
        })
        .map_err(|e| ns_err("probe thread")(&e))?;
    rx.await
        .unwrap_or_else(|_| Err(ns_err("probe thread")(&"died")))
}

/// What one probe result means for the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthEvent {
    /// The first passing probe: the task counts as running from now on.
    Healthy,
    /// `retries` failures in a row outside the start period: the task must stop. The last
    /// failure, for a human.
    Unhealthy(String),
}

/// The pure core of the monitor: counts failures and knows the start period. No I/O, no
/// clock of its own: time since start is passed in.
#[derive(Debug, Clone, Default)]
pub struct HealthState {
    healthy_once: bool,
    failures: u32,
}

impl HealthState {
    /// Whether a probe has passed since the container started.
    #[cfg(test)]
    pub fn is_healthy_once(&self) -> bool {
        self.healthy_once
    }

    /// Folds in one probe result, `since_start` after the container started.
    pub fn observe(
        &mut self,
        check: &HealthCheck,
        result: Result<(), ProbeError>,
        since_start: Duration,
    ) -> Option<HealthEvent> {
        match result {
            Ok(()) => {
                self.failures = 0;
                if self.healthy_once {
                    None
                } else {
                    self.healthy_once = true;
                    Some(HealthEvent::Healthy)
                }
            }
            Err(e) => {
                let in_start_period =
                    !self.healthy_once && since_start < Duration::from_millis(check.start_period);
                if in_start_period {
                    return None;
                }
                self.failures += 1;
                (self.failures >= check.retries).then(|| HealthEvent::Unhealthy(e.to_string()))
            }
        }
    }
}

/// A resumable monitor of one container: probes every `interval` and returns at each
/// [`HealthEvent`]; calling [`Monitor::next_event`] again goes on where it stopped.
pub struct Monitor {
    check: HealthCheck,
    state: HealthState,
    started: tokio::time::Instant,
    first: bool,
}

impl Monitor {
    pub fn new(check: HealthCheck, started: tokio::time::Instant) -> Monitor {
        Monitor {
            check,
            state: HealthState::default(),
            started,
            first: true,
        }
    }

    /// Probes until something changes. A container frozen for a commit (its `dir` holds
    /// [`crate::exec::PAUSED_FILE`]) cannot answer; that is not a failure.
    pub async fn next_event(
        &mut self,
        rt: &dyn ContainerRuntime,
        clock: &dyn crate::task::ports::Clock,
        id: &str,
        dir: &Path,
    ) -> HealthEvent {
        let interval = Duration::from_millis(self.check.interval);
        loop {
            if !self.first {
                clock.sleep(interval).await;
            }
            self.first = false;
            if crate::shim::ContainerDir::new(dir).paused_marker().exists() {
                continue;
            }
            let result = probe(rt, id, dir, &self.check).await;
            let since = clock.instant().saturating_duration_since(self.started);
            if let Some(ev) = self.state.observe(&self.check, result, since) {
                return ev;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed probe whose message is `output`.
    fn fail(output: &str) -> Result<(), ProbeError> {
        Err(ProbeError::Exited {
            code: 1,
            output: output.into(),
        })
    }

    fn check(retries: u32, start_period: u64) -> HealthCheck {
        HealthCheck {
            exec: Some(vec!["true".into()]),
            http: None,
            tcp: None,
            interval: 1000,
            timeout: 500,
            retries,
            start_period,
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn first_pass_is_healthy_once_and_only_once() {
        let c = check(3, 0);
        let mut h = HealthState::default();
        assert_eq!(h.observe(&c, Ok(()), S), Some(HealthEvent::Healthy));
        assert_eq!(h.observe(&c, Ok(()), 2 * S), None);
        assert!(h.is_healthy_once());
    }

    #[test]
    fn retries_failures_in_a_row_make_it_unhealthy() {
        let c = check(3, 0);
        let mut h = HealthState::default();
        assert_eq!(h.observe(&c, fail("a"), S), None);
        assert_eq!(h.observe(&c, fail("b"), S), None);
        // A pass in between resets the count.
        assert_eq!(h.observe(&c, Ok(()), S), Some(HealthEvent::Healthy));
        assert_eq!(h.observe(&c, fail("c"), S), None);
        assert_eq!(h.observe(&c, fail("d"), S), None);
        assert_eq!(
            h.observe(&c, fail("e"), S),
            Some(HealthEvent::Unhealthy(fail("e").unwrap_err().to_string()))
        );
    }

    #[test]
    fn failures_in_the_start_period_do_not_count_until_healthy() {
        let c = check(1, 10_000);
        let mut h = HealthState::default();
        for _ in 0..5 {
            assert_eq!(h.observe(&c, fail("slow"), 5 * S), None);
        }
        // Past the start period one failure is enough (retries 1).
        assert_eq!(
            h.observe(&c, fail("late"), 11 * S),
            Some(HealthEvent::Unhealthy(
                fail("late").unwrap_err().to_string()
            ))
        );
        // Once healthy, the start period no longer shields failures.
        let mut h = HealthState::default();
        assert_eq!(h.observe(&c, Ok(()), S), Some(HealthEvent::Healthy));
        assert_eq!(
            h.observe(&c, fail("x"), 2 * S),
            Some(HealthEvent::Unhealthy(fail("x").unwrap_err().to_string()))
        );
    }
}

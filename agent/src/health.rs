//! Health checks: probes run against a task's container, and the monitor that turns their
//! results into "healthy now" (the task may count as running) or "unhealthy" (it must stop).
//!
//! TCP and HTTP probes connect from inside the container's network namespace — a short-lived
//! thread enters it with setns — so they reach the container's own loopback whatever its
//! network mode. Exec probes run through the OCI runtime (`runc exec`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use rudder_model::health::{HealthCheck, Probe};

use crate::runtime::ContainerRuntime;

/// Runs one probe. `Err` carries what a human needs to see (the probe's output or error).
pub async fn probe(
    rt: &dyn ContainerRuntime,
    id: &str,
    dir: &Path,
    check: &HealthCheck,
) -> Result<(), String> {
    let timeout = Duration::from_millis(check.timeout);
    match check.probe() {
        Some(Probe::Exec(cmd)) => {
            let (code, output) = rt.exec(id, cmd, timeout).await.map_err(|e| e.to_string())?;
            if code == 0 {
                Ok(())
            } else {
                Err(format!(
                    "exec probe exited {code}: {}",
                    output.trim().chars().take(200).collect::<String>()
                ))
            }
        }
        Some(Probe::Tcp { port }) => {
            in_netns(dir, move || connect(port, timeout).map(|_| ())).await
        }
        Some(Probe::Http { port, path }) => {
            let path = path.to_string();
            in_netns(dir, move || http_get(port, &path, timeout)).await
        }
        None => Err("health check has no probe".into()),
    }
}

fn connect(port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("tcp probe to port {port}: {e}"))
}

fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(), String> {
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
    .map_err(|e| format!("http probe: {e}"))?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(|e| format!("http probe: {e}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("http probe: not an HTTP answer: {:?}", line.lines().next()))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("http probe GET {path} answered {code}"))
    }
}

/// Runs `f` on a fresh thread that has joined the network namespace of the container whose
/// init pid is in `dir/pid`. setns changes only the calling thread, so the thread is dedicated.
async fn in_netns<F>(dir: &Path, f: F) -> Result<(), String>
where
    F: FnOnce() -> Result<(), String> + Send + 'static,
{
    let pid = crate::shim::ContainerDir::new(dir)
        .read_pid()
        .ok_or("container pid: unknown")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("health-probe".into())
        .spawn(move || {
            let r = (|| {
                let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
                    .map_err(|e| format!("container network namespace: {e}"))?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("enter container network namespace: {e}"))?;
                f()
            })();
            let _ = tx.send(r);
        })
        .map_err(|e| format!("probe thread: {e}"))?;
    rx.await.unwrap_or_else(|_| Err("probe thread died".into()))
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
        result: Result<(), String>,
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
                (self.failures >= check.retries).then_some(HealthEvent::Unhealthy(e))
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
        assert_eq!(h.observe(&c, Err("a".into()), S), None);
        assert_eq!(h.observe(&c, Err("b".into()), S), None);
        // A pass in between resets the count.
        assert_eq!(h.observe(&c, Ok(()), S), Some(HealthEvent::Healthy));
        assert_eq!(h.observe(&c, Err("c".into()), S), None);
        assert_eq!(h.observe(&c, Err("d".into()), S), None);
        assert_eq!(
            h.observe(&c, Err("e".into()), S),
            Some(HealthEvent::Unhealthy("e".into()))
        );
    }

    #[test]
    fn failures_in_the_start_period_do_not_count_until_healthy() {
        let c = check(1, 10_000);
        let mut h = HealthState::default();
        for _ in 0..5 {
            assert_eq!(h.observe(&c, Err("slow".into()), 5 * S), None);
        }
        // Past the start period one failure is enough (retries 1).
        assert_eq!(
            h.observe(&c, Err("late".into()), 11 * S),
            Some(HealthEvent::Unhealthy("late".into()))
        );
        // Once healthy, the start period no longer shields failures.
        let mut h = HealthState::default();
        assert_eq!(h.observe(&c, Ok(()), S), Some(HealthEvent::Healthy));
        assert_eq!(
            h.observe(&c, Err("x".into()), 2 * S),
            Some(HealthEvent::Unhealthy("x".into()))
        );
    }
}

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

/// Probes every `interval` until the check fails `retries` times in a row (outside the start
/// period). Calls `on_healthy` once, at the first passing probe. Returns the last failure.
pub async fn monitor(
    rt: &dyn ContainerRuntime,
    id: &str,
    dir: &Path,
    check: &HealthCheck,
    mut on_healthy: impl FnMut(),
) -> String {
    let started = Instant::now();
    let start_period = Duration::from_millis(check.start_period);
    let interval = Duration::from_millis(check.interval);
    let mut healthy_once = false;
    let mut failures = 0u32;
    loop {
        // A container frozen for a commit cannot answer; that is not a failure.
        if crate::shim::ContainerDir::new(dir).paused_marker().exists() {
            tokio::time::sleep(interval).await;
            continue;
        }
        match probe(rt, id, dir, check).await {
            Ok(()) => {
                failures = 0;
                if !healthy_once {
                    healthy_once = true;
                    on_healthy();
                }
            }
            Err(e) => {
                let in_start_period = !healthy_once && started.elapsed() < start_period;
                if !in_start_period {
                    failures += 1;
                    if failures >= check.retries {
                        return e;
                    }
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

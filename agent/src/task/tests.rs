//! The task lifecycle against the fakes, on tokio's paused clock, without root.

use std::time::Duration;

use rudder_model::health::HealthCheck;
use rudder_model::spec::NetworkMode;
use rudder_model::{Task, TaskState, TaskStatus};
use tokio::sync::{mpsc, watch};

use super::fake::{self, Fakes};
use super::{step, Phase, TaskCtx};
use crate::runtime::ContainerRuntime;

/// One task being driven on its own tokio task, as the worker does.
struct Run {
    statuses: mpsc::UnboundedReceiver<TaskStatus>,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<Phase>,
    _dir: tempfile::TempDir,
}

impl Run {
    fn start(f: &Fakes, task: Task, adopted: bool) -> Run {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(f, task, adopted, dir)
    }

    fn start_in(f: &Fakes, task: Task, adopted: bool, dir: tempfile::TempDir) -> Run {
        let (stop, stop_rx) = watch::channel(false);
        let (tx, statuses) = mpsc::unbounded_channel();
        let mut cx = TaskCtx::new(f.ports(), dir.path().to_path_buf(), stop_rx, adopted);
        let done = tokio::spawn(async move {
            let mut sent: Option<TaskStatus> = None;
            while !cx.phase.is_done() {
                let s = match step(&task, &mut cx).await {
                    Ok(s) => s,
                    Err(e) => e.status(&task, cx.ports.clock.now_ms()),
                };
                let changed = sent.as_ref().is_none_or(|a| {
                    (a.state, &a.message, &a.error, a.exit_code)
                        != (s.state, &s.message, &s.error, s.exit_code)
                });
                if changed {
                    let _ = tx.send(s.clone());
                    sent = Some(s);
                }
            }
            cx.phase
        });
        Run {
            statuses,
            stop,
            done,
            _dir: dir,
        }
    }

    /// The next reported status as `(state, message, error, exit code)`.
    async fn next(&mut self) -> (TaskState, String, String, Option<i32>) {
        let s = tokio::time::timeout(Duration::from_secs(3600), self.statuses.recv())
            .await
            .expect("a status within an hour of simulated time")
            .expect("a status");
        (s.state, s.message, s.error, s.exit_code)
    }

    async fn next_state(&mut self) -> (TaskState, String) {
        let (s, m, _, _) = self.next().await;
        (s, m)
    }

    async fn end(mut self) -> (Phase, Vec<TaskStatus>) {
        let phase = self.done.await.unwrap();
        let mut rest = Vec::new();
        while let Ok(s) = self.statuses.try_recv() {
            rest.push(s);
        }
        (phase, rest)
    }
}

fn s(state: TaskState, message: &str) -> (TaskState, String) {
    (state, message.to_string())
}

fn exec_check(retries: u32, start_period: u64) -> HealthCheck {
    HealthCheck {
        exec: Some(vec!["check".into()]),
        http: None,
        tcp: None,
        interval: 1000,
        timeout: 500,
        retries,
        start_period,
    }
}

#[tokio::test(start_paused = true)]
async fn happy_path_prepares_in_order_runs_and_completes() {
    let f = Fakes::new(false);
    let mut r = Run::start(&f, fake::task("t1"), false);
    assert_eq!(
        r.next_state().await,
        s(TaskState::Preparing, "pulling image")
    );
    assert_eq!(r.next_state().await, s(TaskState::Starting, "starting"));
    assert_eq!(r.next_state().await, s(TaskState::Running, "running"));
    f.runtime.exit("t1", 0);
    assert_eq!(
        r.next().await,
        (TaskState::Complete, "exited".into(), String::new(), Some(0))
    );
    let (phase, rest) = r.end().await;
    assert_eq!(phase, Phase::Cleaned);
    assert!(rest.is_empty(), "nothing reported after the end: {rest:?}");
    assert_eq!(
        f.journal.calls(),
        [
            "images.pull busybox:latest",
            "mounts.prepare",
            "mounts.rootfs",
            // Host network: no namespace, nothing attached.
            "mounts.netns ",
            "mounts.write_bundle",
            "runtime.delete t1",
            "runtime.start t1",
            // Cleanup: runtime record, root filesystem, writable layer.
            "runtime.delete t1",
            "mounts.unmount",
            "mounts.discard_layer",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_pull_failure_rejects_with_nothing_to_undo() {
    let f = Fakes::new(true);
    *f.images.fail.lock().unwrap() = Some("manifest unknown".into());
    let mut r = Run::start(&f, fake::task("t1"), false);
    assert_eq!(
        r.next_state().await,
        s(TaskState::Preparing, "pulling image")
    );
    let (state, message, error, _) = r.next().await;
    assert_eq!(
        (state, message.as_str()),
        (TaskState::Rejected, "image not available")
    );
    assert_eq!(error, "manifest unknown");
    assert_eq!(r.end().await.0, Phase::Done);
    assert_eq!(f.journal.calls(), ["images.pull busybox:latest"]);
}

#[tokio::test(start_paused = true)]
async fn a_start_failure_fails_the_task_and_cleans_up() {
    let f = Fakes::new(true);
    f.runtime.fail_next("start", "exec: no such file");
    let mut t = fake::task("t1");
    t.spec.network_mode = NetworkMode::Bridge;
    let mut r = Run::start(&f, t, false);
    assert_eq!(
        r.next_state().await,
        s(TaskState::Preparing, "pulling image")
    );
    assert_eq!(r.next_state().await, s(TaskState::Starting, "starting"));
    let (state, message, error, code) = r.next().await;
    assert_eq!(
        (state, message.as_str()),
        (TaskState::Failed, "failed to start")
    );
    assert!(error.contains("exec: no such file"), "{error}");
    assert_eq!(code, None);
    let (phase, rest) = r.end().await;
    assert_eq!(phase, Phase::Cleaned);
    assert!(rest.is_empty(), "{rest:?}");
    let calls = f.journal.calls();
    let start = calls.iter().position(|c| c == "runtime.start t1").unwrap();
    assert_eq!(
        calls[start + 1..],
        [
            "runtime.delete t1",
            "mounts.unmount",
            "net.detach_bridge t1",
            "mounts.discard_layer"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn exit_codes_map_to_complete_failed_and_out_of_memory() {
    for (code, oom, want) in [
        (0, false, (TaskState::Complete, "exited", "")),
        (3, false, (TaskState::Failed, "exited", "exit code 3")),
        (
            137,
            true,
            (
                TaskState::Failed,
                "out of memory",
                "killed by the OOM killer: memory limit 0 bytes reached (exit code 137)",
            ),
        ),
    ] {
        let f = Fakes::new(false);
        let dir = tempfile::tempdir().unwrap();
        if oom {
            crate::shim::ContainerDir::new(dir.path())
                .mark_oom_killed()
                .unwrap();
        }
        let mut r = Run::start_in(&f, fake::task("t1"), false, dir);
        while r.next_state().await != s(TaskState::Running, "running") {}
        f.runtime.exit("t1", code);
        let (state, message, error, got) = r.next().await;
        assert_eq!(
            (state, message.as_str(), error.as_str()),
            want,
            "exit code {code}"
        );
        assert_eq!(got, Some(code));
        r.end().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_health_check_gates_running_until_the_first_pass() {
    let f = Fakes::new(false);
    let mut t = fake::task("t1");
    t.spec.healthcheck = Some(exec_check(3, 0));
    // Two failures (fewer than `retries`), then a pass.
    for (code, out) in [(1, "no"), (1, "no"), (0, "")] {
        f.runtime.push_exec_result(code, out);
    }
    let t0 = tokio::time::Instant::now();
    let mut r = Run::start(&f, t, false);
    assert_eq!(
        r.next_state().await,
        s(TaskState::Preparing, "pulling image")
    );
    assert_eq!(r.next_state().await, s(TaskState::Starting, "starting"));
    assert_eq!(
        r.next_state().await,
        s(TaskState::Starting, "waiting for health check")
    );
    assert_eq!(
        r.next_state().await,
        s(TaskState::Running, "running (healthy)")
    );
    // Probes at 0, 1 s and 2 s: healthy at the third.
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(f.journal.of("runtime.exec").len(), 3);
    f.runtime.exit("t1", 0);
    assert_eq!(r.next_state().await, s(TaskState::Complete, "exited"));
    r.end().await;
}

#[tokio::test(start_paused = true)]
async fn an_unhealthy_task_is_stopped_and_failed_after_retries() {
    let f = Fakes::new(false);
    let mut t = fake::task("t1");
    t.spec.healthcheck = Some(exec_check(3, 0));
    for (code, out) in [(0, ""), (1, "down"), (1, "down"), (1, "still down")] {
        f.runtime.push_exec_result(code, out);
    }
    let mut r = Run::start(&f, t, false);
    while r.next_state().await != s(TaskState::Running, "running (healthy)") {}
    let (state, message, error, code) = r.next().await;
    assert_eq!((state, message.as_str()), (TaskState::Failed, "unhealthy"));
    assert_eq!(error, "unhealthy: exec probe exited 1: still down");
    assert_eq!(code, Some(143));
    assert!(f
        .journal
        .calls()
        .contains(&"runtime.kill t1 TERM".to_string()));
    assert_eq!(r.end().await.0, Phase::Cleaned);
}

#[tokio::test(start_paused = true)]
async fn failures_in_the_start_period_do_not_count() {
    let f = Fakes::new(false);
    let mut t = fake::task("t1");
    // One failure is enough, but not within the first 5 s.
    t.spec.healthcheck = Some(exec_check(1, 5000));
    for _ in 0..20 {
        f.runtime.push_exec_result(1, "booting");
    }
    let t0 = tokio::time::Instant::now();
    let mut r = Run::start(&f, t, false);
    while r.next_state().await != s(TaskState::Starting, "waiting for health check") {}
    let (state, ..) = r.next().await;
    assert_eq!(state, TaskState::Failed);
    // Probes at 0..=4 s are inside the start period; the one at 5 s counts.
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert_eq!(f.journal.of("runtime.exec").len(), 6);
    r.end().await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_sends_term_then_kill_after_the_grace_period() {
    let f = Fakes::new(false);
    f.runtime.ignore_signals(true);
    let mut t = fake::task("t1");
    t.spec.stop_grace_period = 7;
    let mut r = Run::start(&f, t, false);
    while r.next_state().await != s(TaskState::Running, "running") {}
    let t0 = tokio::time::Instant::now();
    r.stop.send_replace(true);
    assert_eq!(
        r.next().await,
        (
            TaskState::Shutdown,
            "stopped".into(),
            String::new(),
            Some(137)
        )
    );
    assert_eq!(t0.elapsed(), Duration::from_secs(7));
    assert_eq!(
        f.journal.of("runtime.kill"),
        ["runtime.kill t1 TERM", "runtime.kill t1 KILL"]
    );
    r.end().await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_sends_the_services_stop_signal() {
    for (stop_signal, sent, code) in [
        (Some("SIGINT"), "INT", 130),
        (Some("quit"), "QUIT", 131),
        (Some("10"), "USR1", 137),
        (None, "TERM", 143),
    ] {
        let f = Fakes::new(false);
        let mut t = fake::task("t1");
        t.spec.stop_signal = stop_signal.map(String::from);
        t.spec.stop_grace_period = 3;
        let mut r = Run::start(&f, t, false);
        while r.next_state().await != s(TaskState::Running, "running") {}
        r.stop.send_replace(true);
        let (state, _, _, exit) = r.next().await;
        assert_eq!(
            (state, exit),
            (TaskState::Shutdown, Some(code)),
            "{stop_signal:?}"
        );
        let kills = f.journal.of("runtime.kill");
        assert_eq!(
            kills[0],
            format!("runtime.kill t1 {sent}"),
            "{stop_signal:?}"
        );
        r.end().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_stop_honoured_within_the_grace_period_sends_no_kill() {
    let f = Fakes::new(false);
    let mut r = Run::start(&f, fake::task("t1"), false);
    while r.next_state().await != s(TaskState::Running, "running") {}
    let t0 = tokio::time::Instant::now();
    r.stop.send_replace(true);
    assert_eq!(
        r.next().await,
        (
            TaskState::Shutdown,
            "stopped".into(),
            String::new(),
            Some(143)
        )
    );
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(f.journal.of("runtime.kill"), ["runtime.kill t1 TERM"]);
    r.end().await;
}

/// A task with an overlay address drains first: no signal before every host had
/// `churn::DRAIN` to take it out of its balancing; then the usual TERM.
#[tokio::test(start_paused = true)]
async fn a_networked_task_drains_before_its_stop_signal() {
    let f = Fakes::new(true);
    let mut t = fake::task("t1");
    t.networks = vec![fake::attachment("front")];
    let mut r = Run::start(&f, t, false);
    while r.next_state().await != s(TaskState::Running, "running") {}
    let t0 = tokio::time::Instant::now();
    r.stop.send_replace(true);
    let (state, _, _, exit) = r.next().await;
    assert_eq!((state, exit), (TaskState::Shutdown, Some(143)));
    assert_eq!(t0.elapsed(), crate::churn::DRAIN);
    assert_eq!(f.journal.of("runtime.kill"), ["runtime.kill t1 TERM"]);
    r.end().await;
}

/// A networked task that exits by itself while it drains is not signalled at all.
#[tokio::test(start_paused = true)]
async fn an_exit_during_the_drain_sends_no_signal() {
    let f = Fakes::new(true);
    let mut t = fake::task("t1");
    t.networks = vec![fake::attachment("front")];
    let mut r = Run::start(&f, t, false);
    while r.next_state().await != s(TaskState::Running, "running") {}
    r.stop.send_replace(true);
    tokio::time::sleep(crate::churn::DRAIN / 2).await;
    f.runtime.exit("t1", 0);
    let (state, _, _, exit) = r.next().await;
    assert_eq!((state, exit), (TaskState::Shutdown, Some(0)));
    assert!(f.journal.of("runtime.kill").is_empty());
    r.end().await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_before_start_ends_the_task_without_a_container() {
    let f = Fakes::new(false);
    let dir = tempfile::tempdir().unwrap();
    let (stop, stop_rx) = watch::channel(true);
    let task = fake::task("t1");
    let mut cx = TaskCtx::new(f.ports(), dir.path().to_path_buf(), stop_rx, false);
    let mut seen = Vec::new();
    while !cx.phase.is_done() {
        let st = step(&task, &mut cx).await.unwrap();
        seen.push((st.state, st.message));
    }
    drop(stop);
    assert_eq!(
        seen,
        [
            s(TaskState::Preparing, "pulling image"),
            s(TaskState::Preparing, "pulling image"),
            s(TaskState::Shutdown, "stopped before start"),
        ]
    );
    assert_eq!(cx.phase, Phase::Done);
    assert_eq!(f.journal.calls(), ["images.pull busybox:latest"]);
}

#[tokio::test(start_paused = true)]
async fn an_adopted_running_container_is_watched_not_restarted() {
    let f = Fakes::new(false);
    // Started by the agent process before this one.
    f.runtime
        .start("t1", std::path::Path::new("/c/t1"))
        .await
        .unwrap();
    let mut r = Run::start(&f, fake::task("t1"), true);
    assert_eq!(
        r.next_state().await,
        s(TaskState::Running, "running (re-adopted)")
    );
    f.runtime.exit("t1", 2);
    assert_eq!(r.next_state().await, s(TaskState::Failed, "exited"));
    r.end().await;
    assert!(f.journal.of("images").is_empty());
    assert!(f.journal.of("runtime.start").is_empty());
    assert_eq!(
        f.runtime.verbs().iter().filter(|v| **v == "start").count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn an_adopted_container_that_exited_meanwhile_reports_its_exit_only() {
    let f = Fakes::new(false);
    let dir = tempfile::tempdir().unwrap();
    // Started by the agent process before this one, ended since (the shim wrote its code).
    f.runtime.start("t1", dir.path()).await.unwrap();
    f.runtime.exit("t1", 0);
    crate::shim::ContainerDir::new(dir.path())
        .write_exit_code(0)
        .unwrap();
    let r = Run::start_in(&f, fake::task("t1"), true, dir);
    let (phase, seen) = r.end().await;
    assert_eq!(phase, Phase::Cleaned);
    let seen: Vec<_> = seen.into_iter().map(|s| (s.state, s.message)).collect();
    assert_eq!(seen, [s(TaskState::Complete, "exited")]);
    assert_eq!(
        f.journal.calls(),
        [
            "runtime.delete t1",
            "mounts.unmount",
            "mounts.discard_layer"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn cleanup_releases_networks_after_the_rootfs_and_before_the_layer() {
    let f = Fakes::new(true);
    let mut t = fake::task("t1");
    t.networks = vec![fake::attachment("front")];
    let mut r = Run::start(&f, t, false);
    while r.next_state().await != s(TaskState::Running, "running") {}
    f.runtime.exit("t1", 0);
    r.end().await;
    let calls = f.journal.calls();
    assert!(
        calls.contains(&"mounts.netns /netns/t1".to_string()),
        "{calls:?}"
    );
    assert_eq!(
        calls[calls.len() - 4..],
        [
            "runtime.delete t1",
            "mounts.unmount",
            "net.detach_networks t1",
            "mounts.discard_layer"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_network_failure_undoes_the_attach_and_the_rootfs() {
    let f = Fakes::new(true);
    *f.networks.fail.lock().unwrap() = true;
    let mut t = fake::task("t1");
    t.networks = vec![fake::attachment("front")];
    let mut r = Run::start(&f, t, false);
    r.next().await;
    let (state, message, error, _) = r.next().await;
    assert_eq!(
        (state, message.as_str()),
        (TaskState::Rejected, "cannot attach to networks")
    );
    assert_eq!(error, "injected networks");
    assert_eq!(r.end().await.0, Phase::Done);
    assert_eq!(
        f.journal.calls()[3..],
        [
            "net.attach_networks t1",
            "net.detach_networks t1",
            "mounts.unmount"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn networks_without_an_overlay_are_rejected() {
    let f = Fakes::new(false);
    let mut t = fake::task("t1");
    t.networks = vec![fake::attachment("front")];
    let mut r = Run::start(&f, t, false);
    r.next().await;
    let (state, message, error, _) = r.next().await;
    assert_eq!(
        (state, message.as_str(), error.as_str()),
        (TaskState::Rejected, "no overlay support on this host", "")
    );
    assert_eq!(f.journal.calls().last().unwrap(), "mounts.unmount");
    r.end().await;
}

#[tokio::test(start_paused = true)]
async fn mount_and_bundle_failures_reject_and_undo() {
    for (op, message, undo) in [
        ("prepare", "cannot prepare mounts", vec![]),
        ("rootfs", "cannot prepare container", vec!["mounts.unmount"]),
        (
            "write_bundle",
            "cannot prepare container",
            vec!["mounts.unmount", "net.detach_bridge t1"],
        ),
    ] {
        let f = Fakes::new(true);
        f.mounts.fail.lock().unwrap().insert(op);
        let mut t = fake::task("t1");
        t.spec.network_mode = NetworkMode::Bridge;
        let mut r = Run::start(&f, t, false);
        r.next().await;
        let (state, got, error, _) = r.next().await;
        assert_eq!(
            (state, got.as_str()),
            (TaskState::Rejected, message),
            "{op}"
        );
        assert!(error.contains("injected"), "{op}: {error}");
        assert_eq!(r.end().await.0, Phase::Done);
        let calls = f.journal.calls();
        let failed = calls
            .iter()
            .position(|c| *c == format!("mounts.{op}"))
            .unwrap();
        assert_eq!(calls[failed + 1..], undo, "{op}");
        assert!(f.journal.of("runtime").is_empty(), "{op}");
    }
}

#[test]
fn predicates_follow_the_phase() {
    assert!(Phase::Created.can_start());
    assert!(!Phase::NetworksAttached.can_start());
    assert!(Phase::Running.has_container() && Phase::Adopted.has_container());
    assert!(!Phase::Created.has_container());
    assert!(Phase::RootfsReady.needs_cleanup() && !Phase::MountsReady.needs_cleanup());
    assert!(Phase::Cleaned.is_done() && Phase::Done.is_done() && !Phase::Exited.is_done());
}

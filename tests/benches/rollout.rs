//! Rolling-update benchmark on a one-host lab (issue 16; run as root, after
//! `cargo build --release --workspace --bins`: `cargo bench -p rudder-tests --bench rollout`).
//!
//! A service of 10 replicas is updated (a new image tag) with parallelism 2, stop-first, stop
//! grace 10 s, Swarm's defaults otherwise (5 s monitor), timed end to end as `rctl apply` waits
//! for the rollout to complete — as `docker service update` waits for convergence. Twice:
//! with a PID 1 that exits on SIGTERM (init-like: each batch takes about a container start),
//! and with one that ignores it (each batch lives out the whole grace: about 5 × 10 s). Printed
//! beside Swarm's figures for the same services, measured on this machine.
//!
//! `ROLLOUT_BENCH_GRACE` (seconds) and `ROLLOUT_BENCH_REPLICAS` shrink it for a quick run.

use std::time::{Duration, Instant};

use rudder_tests::{lab_with_busybox, running_tasks, wait_for, LabGuard};

/// Swarm's rolling updates of the same services on this machine (issue 16), in seconds.
const SWARM_INIT: f64 = 13.8;
const SWARM_NO_INIT: f64 = 63.7;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn manifest(name: &str, image: &str, replicas: u64, grace: u64, command: &str) -> String {
    format!(
        "kind: Service\nname: {name}\nimage: {image}\nreplicas: {replicas}\n\
         stop_grace_period: {grace}\ncommand: {command}\n\
         update_config: {{parallelism: 2}}\n"
    )
}

/// Creates `name`, waits until it runs, then times the update to `busybox:v2`.
fn rollout(
    lab: &LabGuard,
    dir: &std::path::Path,
    name: &str,
    command: &str,
    replicas: u64,
    grace: u64,
) -> anyhow::Result<Duration> {
    let file = dir.join(format!("{name}.yaml"));
    let apply = |image: &str| -> anyhow::Result<()> {
        std::fs::write(&file, manifest(name, image, replicas, grace, command))?;
        lab.rctl(&["apply", "-f", file.to_str().unwrap()])?;
        Ok(())
    };
    apply("busybox:latest")?;
    wait_for(Duration::from_secs(60), "v1 running", || {
        let n = running_tasks(&lab.tasks(name)?).len() as u64;
        Ok((n == replicas).then_some(()))
    })?;
    let t = Instant::now();
    apply("busybox:v2")?;
    let took = t.elapsed();
    let tasks = lab.tasks(name)?;
    let running = running_tasks(&tasks);
    assert_eq!(running.len() as u64, replicas);
    assert!(running.iter().all(|t| t["image"] == "busybox:v2"));
    lab.rctl(&["rm", name])?;
    Ok(took)
}

fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let grace = knob("ROLLOUT_BENCH_GRACE", 10);
    let replicas = knob("ROLLOUT_BENCH_REPLICAS", 10);
    let (lab, tmp) = lab_with_busybox("brl", 1)?;
    let tar = tmp.path().join("busybox.tar");
    lab.rctl(&["image", "import", tar.to_str().unwrap(), "busybox:v2"])?;

    let init = rollout(
        &lab,
        tmp.path(),
        "withinit",
        "[\"/bin/sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1; done\"]",
        replicas,
        grace,
    )?;
    let no_init = rollout(
        &lab,
        tmp.path(),
        "noinit",
        "[\"sleep\", \"100000\"]",
        replicas,
        grace,
    )?;
    let batches = replicas.div_ceil(2);
    println!(
        "rolling update, {replicas} replicas, parallelism 2, stop-first, stop grace {grace} s, \
         monitor 5 s, one host (rctl apply until completed):"
    );
    println!(
        "  PID 1 exits on SIGTERM:  {:6.1} s   (Swarm on this machine: {SWARM_INIT} s)",
        init.as_secs_f64()
    );
    println!(
        "  PID 1 ignores SIGTERM:   {:6.1} s   (Swarm on this machine: {SWARM_NO_INIT} s; \
         {batches} batches x {grace} s grace = {} s)",
        no_init.as_secs_f64(),
        batches * grace
    );
    Ok(())
}

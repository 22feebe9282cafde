//! Autoscaler reaction time on a two-host lab (issue 16; run as root, after
//! `cargo build --release --workspace --bins`: `cargo bench -p rudder-tests --bench autoscale`;
//! or on the debug binaries: `cargo test -p rudder-tests --bench autoscale -- --bench`).
//!
//! The service of `tests/autoscale.rs` (min 1, max 3, cpu_percent 50 of a 0.1 cpu reservation,
//! a 4 s averaging window, no scale-up delay, 10 s scale-down delay) idles at 1 replica; then
//! its task starts burning cpu (a file made through `rctl exec`), and the time from that moment
//! to 3 replicas running is the reaction time: the agent's sample period (2 s), the next
//! heartbeat (1 s), the autoscaler's pass (1 s), the raft commit, placement and the new
//! containers' start. Each round then stops the load and waits for the scale-down.
//!
//! `AUTOSCALE_BENCH_ROUNDS` sets the number of rounds (default 6), spread over the phases of
//! the sample period.

use std::time::{Duration, Instant};

use rudder_tests::{lab_with_busybox, sh, wait_for, BURN_MANIFEST};

fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let rounds: usize = std::env::var("AUTOSCALE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
        .max(1);
    let (lab, tmp) = lab_with_busybox("bas", 2)?;
    lab.apply(tmp.path(), "burn.yaml", BURN_MANIFEST)?;
    let mut ups = Vec::new();
    let mut downs = Vec::new();
    for round in 0..rounds {
        let task = wait_for(Duration::from_secs(90), "1 replica, idle", || {
            let r = lab.running_of("burn")?;
            Ok((r.len() == 1).then(|| r[0].clone()))
        })?;
        // A few idle samples first, so the window starts quiet; each round starts the load at
        // another point of the 2 s sample period (else every round would time the same phase).
        std::thread::sleep(Duration::from_millis(
            6000 + (round as u64 * 2000 / rounds as u64),
        ));
        let name = task["name"].as_str().unwrap_or_default().to_string();
        sh(&lab, &name, "touch /tmp/burn")?;
        let t0 = Instant::now();
        wait_for(Duration::from_secs(60), "3 replicas running", || {
            Ok((lab.running_of("burn")?.len() == 3).then_some(()))
        })?;
        let up = t0.elapsed();
        sh(&lab, &name, "rm /tmp/burn")?;
        let t1 = Instant::now();
        wait_for(Duration::from_secs(90), "back to 1 replica", || {
            Ok((lab.running_of("burn")?.len() == 1).then_some(()))
        })?;
        let down = t1.elapsed();
        println!(
            "round {}: load start → 3 running {:.1} s; load stop → 1 running {:.1} s",
            round + 1,
            up.as_secs_f64(),
            down.as_secs_f64()
        );
        ups.push(up.as_secs_f64());
        downs.push(down.as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "autoscale reaction (median of {rounds}): scale-up {:.1} s (min {:.1}, max {:.1}); \
         scale-down {:.1} s (10 s delay)",
        median(&mut ups.clone()),
        ups.iter().copied().fold(f64::INFINITY, f64::min),
        ups.iter().copied().fold(0.0, f64::max),
        median(&mut downs)
    );
    lab.rctl(&["rm", "burn"])?;
    Ok(())
}

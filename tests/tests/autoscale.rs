//! Autoscaling over a real two-host lab (issue 16): a service whose first task burns cpu while
//! a file exists in its container scales from 1 to 3 replicas once the file is made, and back to
//! 1 after it is removed and the scale-down delay has passed. The samples come from the agents'
//! cgroup readings (both hosts report: `rctl stats` shows every task), the decisions are in
//! `rctl describe`, and a manual `rctl scale` is refused while the service autoscales.

use std::time::{Duration, Instant};

use rudder_tests::{lab_with_busybox, sh, wait_for, BURN_MANIFEST};

#[test]
fn scales_up_under_cpu_load_and_back_down() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("as", 2)?;
    lab.apply(tmp.path(), "burn.yaml", BURN_MANIFEST)?;
    let first = wait_for(Duration::from_secs(60), "burn running", || {
        Ok(lab.running_of("burn")?.first().cloned())
    })?;
    let name = first["name"].as_str().unwrap().to_string();
    // Samples reach the leader: rctl stats shows the idle task.
    let idle = wait_for(Duration::from_secs(20), "a usage sample", || {
        let v: serde_json::Value = serde_json::from_str(&lab.rctl(&["stats", "burn", "--json"])?)?;
        Ok(v.as_array().and_then(|a| a.first()).cloned())
    })?;
    assert!(idle["cpu_milli"].as_u64().unwrap() < 50, "{idle}");
    assert!(idle["memory_bytes"].as_u64().unwrap() > 0, "{idle}");
    // Idle: stays at 1.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(lab.running_of("burn")?.len(), 1);

    sh(&lab, &name, "touch /tmp/burn")?;
    let t0 = Instant::now();
    wait_for(Duration::from_secs(40), "3 replicas running", || {
        Ok((lab.running_of("burn")?.len() == 3).then_some(()))
    })?;
    eprintln!(
        "reaction: {:?} from load start to 3 replicas running",
        t0.elapsed()
    );
    let tasks = lab.running_of("burn")?;
    let mut nodes: Vec<&str> = tasks.iter().filter_map(|t| t["node"].as_str()).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 2, "spread over both hosts: {tasks:?}");
    let describe = lab.rctl(&["describe", "burn"])?;
    assert!(
        describe.contains("→3: cpu") && describe.contains("of reservation over 4s, target 50%"),
        "{describe}"
    );
    // Both hosts' agents report samples for their tasks.
    let stats = wait_for(Duration::from_secs(20), "samples of all 3 tasks", || {
        let v: serde_json::Value = serde_json::from_str(&lab.rctl(&["stats", "burn", "--json"])?)?;
        Ok((v.as_array().map_or(0, Vec::len) == 3).then_some(v))
    })?;
    let hot = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str() == Some(name.as_str()))
        .expect("the burning task");
    // Up to its 0.5 cpu limit, less when the machine is busy; far above the idle tasks' anyway.
    assert!(hot["cpu_milli"].as_u64().unwrap() > 100, "{stats}");
    let refused = lab.rctl(&["scale", "burn=2"]).unwrap_err().to_string();
    assert!(
        refused.contains("is autoscaled (1 to 3 replicas)"),
        "{refused}"
    );

    sh(&lab, &name, "rm /tmp/burn")?;
    let t1 = Instant::now();
    wait_for(Duration::from_secs(40), "back to 1 replica", || {
        Ok((lab.running_of("burn")?.len() == 1).then_some(()))
    })?;
    let down = t1.elapsed();
    eprintln!("scale-down: {down:?} after the load stopped");
    assert!(
        down >= Duration::from_secs(8),
        "the 10 s delay was not kept: {down:?}"
    );
    let describe = lab.rctl(&["describe", "burn"])?;
    // Down in one step or two, as the averaged load falls through the delay.
    assert!(describe.contains("→1: cpu"), "{describe}");
    eprintln!("{describe}");
    Ok(())
}

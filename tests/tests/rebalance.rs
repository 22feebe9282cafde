//! Rebalancing over a real 2-host lab: a 4-replica service deployed while h2 is down runs all
//! on h1; when h2 comes back nothing moves by itself, and `rctl rebalance` spreads it to 2/2 as
//! a rolling update (`rctl describe` shows the last rebalance). A service with
//! `rebalance: auto` does the same without the command when h2 comes back.

use std::collections::BTreeMap;
use std::time::Duration;

use rudder_tests::{lab, lab_with_busybox, running_tasks, wait_for, LabGuard};
use serde_json::Value;

fn service(name: &str, auto: bool) -> String {
    format!(
        "kind: Service\nname: {name}\nimage: busybox:latest\nreplicas: 4\n\
         stop_grace_period: 1\ncommand: [\"/bin/sleep\", \"1000000\"]\n{}",
        if auto { "rebalance: auto\n" } else { "" }
    )
}

fn node_state(lab: &LabGuard, hostname: &str) -> anyhow::Result<String> {
    let nodes: Vec<Value> = serde_json::from_str(&lab.rctl(&["get", "nodes", "-o", "json"])?)?;
    Ok(nodes
        .iter()
        .find(|n| n["hostname"] == hostname)
        .and_then(|n| n["state"].as_str())
        .unwrap_or("missing")
        .to_string())
}

/// Running tasks per host, once the service runs exactly its 4 replicas.
fn spread(lab: &LabGuard, name: &str) -> anyhow::Result<Option<BTreeMap<String, usize>>> {
    let t = lab.tasks(name)?;
    let run = running_tasks(&t);
    let live = t.iter().filter(|t| t["desired_state"] == "running").count();
    if run.len() != 4 || live != 4 {
        return Ok(None);
    }
    let mut m = BTreeMap::new();
    for t in run {
        *m.entry(t["node"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    Ok(Some(m))
}

fn wait_spread(lab: &LabGuard, name: &str, want: &[(&str, usize)]) -> anyhow::Result<()> {
    let want: BTreeMap<String, usize> = want.iter().map(|(h, n)| (h.to_string(), *n)).collect();
    wait_for(
        Duration::from_secs(90),
        &format!("{name} at {want:?}"),
        || Ok(spread(lab, name)?.filter(|s| *s == want)),
    )?;
    Ok(())
}

/// Takes h2's agent down and waits until the controller says so.
fn h2_down(lab: &LabGuard) -> anyhow::Result<()> {
    lab.kill9_agent(lab.host_index("h2"))?;
    wait_for(Duration::from_secs(30), "h2 down", || {
        Ok((node_state(lab, "h2")? == "down").then_some(()))
    })
}

fn h2_back(lab: &mut LabGuard) -> anyhow::Result<()> {
    let idx = lab.host_index("h2");
    lab.restart(idx, lab::Role::Agent, true)?;
    wait_for(Duration::from_secs(30), "h2 ready", || {
        Ok((node_state(lab, "h2")? == "ready").then_some(()))
    })
}

#[test]
fn rebalance_spreads_after_a_host_returns() -> anyhow::Result<()> {
    let (mut lab, tmp) = lab_with_busybox("rb", 2)?;
    h2_down(&lab)?;
    lab.apply(tmp.path(), "web.yaml", &service("web", false))?;
    wait_spread(&lab, "web", &[("h1", 4)])?;
    h2_back(&mut lab)?;
    // Nothing moves by itself.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(spread(&lab, "web")?, Some([("h1".to_string(), 4)].into()));

    let before: Vec<String> = lab
        .tasks("web")?
        .iter()
        .filter(|t| t["desired_state"] == "running")
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let out = lab.rctl(&["rebalance", "web", "--timeout", "120"])?;
    assert!(
        out.contains("moving slots 3, 4 (h1 4 → 2, h2 0 → 2)"),
        "{out}"
    );
    assert!(out.contains("completed: h1 2, h2 2"), "{out}");
    wait_spread(&lab, "web", &[("h1", 2), ("h2", 2)])?;
    // Two slots moved (replaced), two kept their tasks.
    let now: Vec<Value> = lab.tasks("web")?;
    let kept = running_tasks(&now)
        .iter()
        .filter(|t| before.iter().any(|b| t["id"] == b.as_str()))
        .count();
    assert_eq!(kept, 2, "{now:#?}");
    let describe = lab.rctl(&["describe", "web"])?;
    assert!(
        describe.contains("Rebalance: completed: rctl rebalance: moving slots 3, 4"),
        "{describe}"
    );
    // Balanced: a second rebalance moves nothing.
    let out = lab.rctl(&["rebalance", "web"])?;
    assert!(out.contains("balanced already"), "{out}");

    // `rebalance: auto`: h2 goes down (its tasks come to h1) and back; the auto service
    // spreads again without the command, the manual one stays where it is.
    lab.apply(tmp.path(), "auto.yaml", &service("auto", true))?;
    wait_spread(&lab, "auto", &[("h1", 2), ("h2", 2)])?;
    h2_down(&lab)?;
    wait_spread(&lab, "auto", &[("h1", 4)])?;
    wait_spread(&lab, "web", &[("h1", 4)])?;
    h2_back(&mut lab)?;
    wait_spread(&lab, "auto", &[("h1", 2), ("h2", 2)])?;
    let describe = lab.rctl(&["describe", "auto"])?;
    assert!(
        describe.contains("auto, node h2 ready: moving slots"),
        "{describe}"
    );
    assert_eq!(spread(&lab, "web")?, Some([("h1".to_string(), 4)].into()));
    Ok(())
}

//! Self-healing over a real 3-host lab: lose one host's agent — SIGKILL (its stream closes) or
//! SIGSTOP (the stream stays open and heartbeats stop, as a hung or cut-off host). Its
//! containers keep running (they belong to their shims), but the controller marks the node down
//! and replaces its tasks on the other hosts within the target (≤ 10 s). When the agent comes
//! back (restarted, or resumed), the containers of the replaced tasks are stopped, the host is
//! ready again, and exactly 6 tasks run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rudder_tests::{busybox_rootfs, lab, pid_alive, running_tasks, wait_for, LabGuard};
use serde_json::Value;

const REPLICAS: usize = 6;
/// Node lost → its tasks running elsewhere (docs: targets).
const REPLACE_TARGET: Duration = Duration::from_secs(10);

const WEB: &str = "kind: Service\nname: web\nimage: busybox:latest\n\
command: [\"/bin/sh\", \"-c\", \"echo up; exec sleep 100000\"]\n\
replicas: 6\nstop_grace_period: 1\n";

fn per_node(tasks: &[&Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in tasks {
        *m.entry(t["node"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    m
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

#[derive(Clone, Copy, Debug)]
enum Loss {
    /// SIGKILL, then a new agent process on the same data dir.
    Killed,
    /// SIGSTOP, then SIGCONT: the same process wakes up to a cluster that went on without it.
    Frozen,
}

#[test]
fn killed_agent_tasks_are_replaced_and_stale_containers_stopped() -> anyhow::Result<()> {
    node_loss("nl", Loss::Killed)
}

#[test]
fn frozen_agent_tasks_are_replaced_and_stale_containers_stopped() -> anyhow::Result<()> {
    node_loss("nf", Loss::Frozen)
}

fn node_loss(prefix: &str, how: Loss) -> anyhow::Result<()> {
    let name = format!("{prefix}{}", std::process::id() % 100000);
    let mut lab = LabGuard::up(&name, 3)?;
    let tmp = tempfile::tempdir()?;
    let tar = tmp.path().join("busybox.tar");
    busybox_rootfs(&tar)?;
    lab.rctl(&["image", "import", tar.to_str().unwrap(), "busybox:latest"])?;

    lab.apply(tmp.path(), "web.yaml", WEB)?;
    let tasks = wait_for(Duration::from_secs(90), "6 running tasks", || {
        let t = lab.tasks("web")?;
        Ok((running_tasks(&t).len() == REPLICAS).then_some(t))
    })?;
    let run = running_tasks(&tasks);
    assert_eq!(
        per_node(&run).values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{:?}",
        per_node(&run)
    );

    // The containers of h3, by task id: (container pid, shim pid).
    let lost = "h3";
    let mut stale: BTreeMap<String, (i32, i32)> = BTreeMap::new();
    for t in run.iter().filter(|t| t["node"] == lost) {
        let pid = lab.task_pid(t, "pid").expect("container pid");
        let shim = lab.task_pid(t, "shim.pid").expect("shim pid");
        assert!(pid_alive(pid) && pid_alive(shim), "{t}");
        stale.insert(t["id"].as_str().unwrap().to_string(), (pid, shim));
    }
    assert_eq!(stale.len(), 2);

    // Lose h3's agent.
    let idx = lab.host_index(lost);
    let killed = Instant::now();
    match how {
        Loss::Killed => lab.kill9_agent(idx)?,
        Loss::Frozen => lab.signal_agent(idx, "STOP")?,
    };
    let replaced = wait_for(Duration::from_secs(30), "6 running tasks off h3", || {
        let t = lab.tasks("web")?;
        let r = running_tasks(&t);
        Ok((r.len() == REPLICAS && r.iter().all(|t| t["node"] != lost)).then_some(t))
    })?;
    let took = killed.elapsed();
    eprintln!("node loss ({how:?}): h3's tasks running elsewhere {took:?} after losing its agent");
    assert!(
        took <= REPLACE_TARGET,
        "replacement took {took:?} (target {REPLACE_TARGET:?})"
    );
    assert_eq!(node_state(&lab, lost)?, "down");
    let run = running_tasks(&replaced);
    assert_eq!(
        per_node(&run).values().copied().collect::<Vec<_>>(),
        [3, 3],
        "{:?}",
        per_node(&run)
    );
    for id in stale.keys() {
        let old = replaced
            .iter()
            .find(|t| t["id"] == id.as_str())
            .expect("lost task kept in history");
        assert_ne!(old["desired_state"], "running", "{old}");
    }
    // Nobody told them to stop: h3's containers still run, with nobody watching.
    for (id, (pid, shim)) in &stale {
        assert!(
            pid_alive(*pid) && pid_alive(*shim),
            "{id} died with the agent"
        );
    }

    // h3 comes back: the containers of the replaced tasks are stopped.
    match how {
        Loss::Killed => lab.restart(idx, lab::Role::Agent, true)?,
        Loss::Frozen => lab.signal_agent(idx, "CONT")?,
    };
    let back = Instant::now();
    wait_for(Duration::from_secs(15), "stale containers stopped", || {
        Ok(stale
            .values()
            .all(|(pid, shim)| !pid_alive(*pid) && !pid_alive(*shim))
            .then_some(()))
    })?;
    eprintln!(
        "node loss ({how:?}): stale containers on h3 stopped {:?} after its agent came back",
        back.elapsed()
    );
    wait_for(Duration::from_secs(15), "h3 ready", || {
        Ok((node_state(&lab, lost)? == "ready").then_some(()))
    })?;

    // Converged: exactly 6 running tasks, each a live container, and it stays so.
    let watch = Instant::now();
    let mut last = Vec::new();
    while watch.elapsed() < Duration::from_secs(5) {
        let t = lab.tasks("web")?;
        let r = running_tasks(&t);
        assert_eq!(r.len(), REPLICAS, "{t:#?}");
        last = r.into_iter().cloned().collect();
        std::thread::sleep(Duration::from_millis(250));
    }
    for t in &last {
        assert_ne!(t["node"], lost, "{t}");
        let pid = lab.task_pid(t, "pid").expect("container pid");
        assert!(pid_alive(pid), "{t}");
    }
    // Their overlay mounts are gone too.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    for id in stale.keys() {
        let dir = lab.host(lost).data_dir.join("containers").join(id);
        assert!(
            !mounts.contains(dir.to_str().unwrap()),
            "rootfs of {id} still mounted"
        );
    }
    assert_eq!(node_state(&lab, lost)?, "ready");
    Ok(())
}

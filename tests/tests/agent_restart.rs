//! Agent restart over a real 2-host lab: SIGKILL an agent, let one of its containers exit while
//! it is down, start it again. Containers outlive the agent (they belong to their shims), so
//! nothing restarts or gets replaced; the exit that happened meanwhile is reported with its code;
//! logs of that host's tasks, the finished one included, are still served.
//!
//! The agent stays down for less than the dispatcher's heartbeat deadline (3 missed heartbeats
//! of 1 s): that is a restart, not the loss of the node (see node_loss.rs).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use rudder_tests::{busybox_rootfs, lab, pid_alive, running_tasks, wait_for, LabGuard};
use serde_json::Value;

const LONG: &str = "kind: Service\nname: long\nimage: busybox:latest\n\
command: [\"/bin/sh\", \"-c\", \"echo started; exec sleep 100000\"]\n\
replicas: 4\nstop_grace_period: 1\n";

const PROBE: &str = "kind: Service\nname: probe\nimage: busybox:latest\n\
command: [\"/bin/sh\", \"-c\", \"exec sleep 100000\"]\nreplicas: 2\nstop_grace_period: 1\n";

/// Exits by itself with code 3 after `SHORT_LIFE`, and is not restarted.
const SHORT: &str = "kind: Service\nname: short\nimage: busybox:latest\n\
command: [\"/bin/sh\", \"-c\", \"echo short-begin; sleep 8; exit 3\"]\n\
replicas: 1\nstop_grace_period: 1\nrestart: {condition: none}\n";
const SHORT_LIFE: Duration = Duration::from_secs(8);
/// How long before the short container's exit its agent is killed.
const KILL_AHEAD: Duration = Duration::from_millis(1500);
/// The dispatcher's heartbeat deadline: a longer absence is a lost node.
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(3);

fn ids(tasks: &[&Value]) -> Vec<String> {
    let mut v: Vec<String> = tasks
        .iter()
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn agent_restart_keeps_containers_and_reports_exits() -> anyhow::Result<()> {
    let name = format!("ar{}", std::process::id() % 100000);
    let mut lab = LabGuard::up(&name, 2)?;
    let tmp = tempfile::tempdir()?;
    let tar = tmp.path().join("busybox.tar");
    busybox_rootfs(&tar)?;
    lab.rctl(&["image", "import", tar.to_str().unwrap(), "busybox:latest"])?;

    lab.apply(tmp.path(), "long.yaml", LONG)?;
    let long = wait_for(Duration::from_secs(90), "4 long tasks running", || {
        let t = lab.tasks("long")?;
        Ok((running_tasks(&t).len() == 4).then_some(t))
    })?;
    let long = running_tasks(&long)
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    // The short-lived task goes second so that it is still young when the agent is killed.
    lab.apply(tmp.path(), "short.yaml", SHORT)?;
    let short = wait_for(Duration::from_secs(60), "short task running", || {
        let t = lab.tasks("short")?;
        Ok(running_tasks(&t).first().map(|t| (*t).clone()))
    })?;
    let short_pid = wait_for(Duration::from_secs(10), "short pid file", || {
        Ok(lab.task_pid(&short, "pid"))
    })?;
    // runc writes the pid file as the container starts: its exit is due SHORT_LIFE later.
    let pid_file = lab
        .host(short["node"].as_str().unwrap())
        .data_dir
        .join("containers")
        .join(short["id"].as_str().unwrap())
        .join("pid");
    let since_start = SystemTime::now()
        .duration_since(std::fs::metadata(&pid_file)?.modified()?)
        .unwrap_or_default();
    let until_kill = (SHORT_LIFE - KILL_AHEAD)
        .checked_sub(since_start)
        .expect("short task took too long to be seen running");

    // Kill the agent of the host the short task landed on.
    let victim = short["node"].as_str().unwrap().to_string();
    let victim_index = lab.host_index(&victim);
    let mut before: BTreeMap<String, (String, i32, i32)> = BTreeMap::new();
    for t in &long {
        let pid = lab.task_pid(t, "pid").expect("container pid");
        let shim = lab.task_pid(t, "shim.pid").expect("shim pid");
        assert!(pid_alive(pid) && pid_alive(shim), "{t}");
        before.insert(
            t["id"].as_str().unwrap().to_string(),
            (t["node"].as_str().unwrap().to_string(), pid, shim),
        );
    }
    let on_victim = before.values().filter(|(n, ..)| *n == victim).count();
    assert!(on_victim > 0, "no long task on {victim}: {before:?}");
    std::thread::sleep(until_kill);
    let killed = lab.kill9_agent(victim_index)?;
    let killed_at = Instant::now();
    assert!(
        pid_alive(short_pid),
        "short container exited before its agent was killed"
    );
    eprintln!("killed agent {killed} on {victim}; {on_victim} long tasks and the short task there");

    // The short container exits while its agent is down.
    wait_for(Duration::from_secs(30), "short container exit", || {
        Ok((!pid_alive(short_pid)).then_some(()))
    })?;
    for (id, (node, pid, shim)) in &before {
        assert!(
            pid_alive(*pid) && pid_alive(*shim),
            "{id} on {node} died with its agent"
        );
    }
    let down_for = killed_at.elapsed();
    assert!(
        down_for < HEARTBEAT_DEADLINE,
        "agent down {down_for:?}: too slow a machine for a restart within the heartbeat deadline"
    );
    let restarted_at = Instant::now();
    let new_pid = lab.restart(victim_index, lab::Role::Agent, true)?;
    assert_ne!(new_pid, killed);

    // The exit that happened meanwhile is reported, with its code.
    let failed = wait_for(Duration::from_secs(30), "short task failed", || {
        let t = lab.tasks("short")?;
        Ok(t.iter().find(|t| t["state"] == "failed").cloned())
    })
    .map_err(|e| anyhow::anyhow!("{e}; short tasks: {:?}", lab.tasks("short")))?;
    eprintln!(
        "agent down {down_for:?}; exit reported {:?} after the restart",
        restarted_at.elapsed()
    );
    assert_eq!(failed["id"], short["id"], "{failed}");
    assert_eq!(failed["exit_code"], 3, "{failed}");
    assert_eq!(failed["node"], victim.as_str(), "{failed}");

    // Stay a while past the dispatcher's heartbeat deadline: nothing restarts or is replaced.
    std::thread::sleep(Duration::from_secs(5));
    let tasks = lab.tasks("long")?;
    let run = running_tasks(&tasks);
    assert_eq!(
        ids(&run),
        before.keys().cloned().collect::<Vec<_>>(),
        "long tasks changed: {tasks:#?}"
    );
    assert_eq!(tasks.len(), 4, "replacement tasks created: {tasks:#?}");
    for t in &run {
        let (node, pid, shim) = &before[t["id"].as_str().unwrap()];
        assert_eq!(t["node"], node.as_str(), "{t}");
        assert_eq!(
            lab.task_pid(t, "pid"),
            Some(*pid),
            "container restarted: {t}"
        );
        assert_eq!(
            lab.task_pid(t, "shim.pid"),
            Some(*shim),
            "shim replaced: {t}"
        );
        assert!(pid_alive(*pid) && pid_alive(*shim), "{t}");
    }
    let short_tasks = lab.tasks("short")?;
    assert_eq!(short_tasks.len(), 1, "short restarted: {short_tasks:#?}");

    // The restarted agent takes new work (and syncs its assignment set again).
    lab.apply(tmp.path(), "probe.yaml", PROBE)?;
    let probe = wait_for(Duration::from_secs(60), "2 probe tasks running", || {
        let t = lab.tasks("probe")?;
        Ok((running_tasks(&t).len() == 2).then_some(t))
    })?;
    assert!(
        probe.iter().any(|t| t["node"] == victim.as_str()),
        "no probe task on {victim}: {probe:#?}"
    );

    // Logs are still served for the restarted host's tasks, the finished one included.
    let logs = lab.rctl(&["logs", "long"])?;
    assert_eq!(logs.matches("started").count(), 4, "{logs}");
    let logs = lab.rctl(&["logs", "short"])?;
    assert!(
        logs.contains("short-begin"),
        "log of the finished task lost: {logs:?}"
    );

    // The host shows ready.
    let nodes: Vec<Value> = serde_json::from_str(&lab.rctl(&["get", "nodes", "-o", "json"])?)?;
    let node = nodes
        .iter()
        .find(|n| n["hostname"] == victim.as_str())
        .expect("node listed");
    assert_eq!(node["state"], "ready", "{node}");
    Ok(())
}

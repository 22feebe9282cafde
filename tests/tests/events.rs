//! `rctl events` over a real lab (issue 18): a live stream opened before anything happens sees
//! the service created and scaled, its tasks start, a node drained and the tasks stopped
//! there, and a killed container fail with its exit code; `--since INDEX --until INDEX`
//! replays exactly the part of that stream between the two indexes (no gap, no repeat), and
//! `--filter` narrows it.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use rudder_tests::{bin, lab_with_busybox, running_tasks, wait_for, LabGuard};
use serde_json::Value;

/// A background `rctl events`, killed (that pid) when dropped.
struct Follower {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl Follower {
    fn start(lab: &LabGuard, dir: &std::path::Path, args: &[&str]) -> anyhow::Result<Follower> {
        let out = dir.join("events.jsonl");
        let child = Command::new(bin("rctl"))
            .arg("--context")
            .arg(&lab.lab.context_path)
            .args(["events", "-o", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(dir.join("events.err"))?)
            .spawn()
            .context("run rctl events")?;
        Ok(Follower { child, out })
    }

    /// The events received so far.
    fn events(&self) -> anyhow::Result<Vec<Value>> {
        parse(&std::fs::read_to_string(&self.out)?)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse(text: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("event line {l:?}")))
        .collect()
}

fn find<'a>(events: &'a [Value], ty: &str, action: &str, name: &str) -> Option<&'a Value> {
    events
        .iter()
        .find(|e| e["type"] == ty && e["action"] == action && e["name"].as_str() == Some(name))
}

fn has(events: &[Value], ty: &str, action: &str, pred: impl Fn(&Value) -> bool) -> bool {
    events
        .iter()
        .any(|e| e["type"] == ty && e["action"] == action && pred(e))
}

#[test]
fn events_follow_the_cluster_and_resume() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("ev", 2)?;
    // From the start of the controller's history: nothing is missed however late it connects.
    let live = Follower::start(&lab, tmp.path(), &["--since", "0"])?;

    lab.apply(
        tmp.path(),
        "web.yaml",
        "kind: Service\nname: web\nimage: busybox:latest\nreplicas: 2\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"100000\"]\n",
    )?;
    wait_for(Duration::from_secs(60), "web running", || {
        Ok((running_tasks(&lab.tasks("web")?).len() == 2).then_some(()))
    })?;
    lab.rctl(&["scale", "web=3"])?;
    wait_for(Duration::from_secs(60), "web scaled", || {
        Ok((running_tasks(&lab.tasks("web")?).len() == 3).then_some(()))
    })?;
    let h2 = &lab.lab.hosts[1].name;
    lab.rctl(&["node", "update", h2, "--availability", "drain"])?;
    let tasks = wait_for(Duration::from_secs(60), "drained", || {
        let t = lab.tasks("web")?;
        let r = running_tasks(&t);
        Ok((r.len() == 3 && r.iter().all(|t| t["node"] != h2.as_str()))
            .then(|| r.into_iter().cloned().collect::<Vec<_>>()))
    })?;

    // Kill one container from outside: its task fails with the signal's exit code.
    let victim = &tasks[0];
    let pid = lab.task_pid(victim, "pid").context("container pid")?;
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    anyhow::ensure!(st.success(), "kill {pid}");
    let victim_name = victim["name"].as_str().context("name")?.to_string();
    let events = wait_for(
        Duration::from_secs(60),
        "failed and shutdown events",
        || {
            let ev = live.events()?;
            let stopped = |state| has(&ev, "task", state, |e| e["node"] == h2.as_str());
            let done = find(&ev, "task", "failed", &victim_name).is_some()
                && (stopped("shutdown") || stopped("complete"));
            Ok(done.then_some(ev))
        },
    )?;

    // What the live stream saw.
    let failed = find(&events, "task", "failed", &victim_name).expect("failed");
    assert_eq!(failed["attributes"]["from"], "running", "{failed}");
    assert_eq!(failed["attributes"]["exit_code"], "137", "{failed}");
    assert_eq!(failed["service"], "web");
    assert!(
        find(&events, "service", "created", "web").is_some(),
        "{events:#?}"
    );
    assert!(
        has(&events, "service", "updated", |e| e["attributes"]
            ["replicas"]
            == "3"),
        "{events:#?}"
    );
    assert!(
        has(&events, "task", "running", |e| e["service"] == "web"),
        "{events:#?}"
    );
    let drain = find(&events, "node", "drain", h2).expect("drain event");
    assert_eq!(drain["attributes"]["from"], "active");
    assert!(
        has(&events, "task", "stop_requested", |e| e["node"]
            == h2.as_str()),
        "tasks on the drained node were asked to stop: {events:#?}"
    );
    assert!(
        has(&events, "task", "shutdown", |e| e["node"] == h2.as_str())
            || has(&events, "task", "complete", |e| e["node"] == h2.as_str()),
        "{events:#?}"
    );
    // Indexes never go back.
    let idx: Vec<u64> = events
        .iter()
        .map(|e| e["index"].as_u64().unwrap_or(0))
        .collect();
    assert!(idx.windows(2).all(|w| w[0] <= w[1]), "{idx:?}");

    // `--since` the drain: exactly what the live stream saw after it, up to the failure.
    let from = drain["index"].as_u64().context("index")?;
    let to = failed["index"].as_u64().context("index")?;
    let replay = parse(&lab.rctl(&[
        "events",
        "-o",
        "json",
        "--since",
        &from.to_string(),
        "--until",
        &to.to_string(),
    ])?)?;
    let seen: Vec<&Value> = events
        .iter()
        .filter(|e| {
            let i = e["index"].as_u64().unwrap_or(0);
            i > from && i <= to
        })
        .collect();
    assert!(!replay.is_empty());
    assert_eq!(replay.iter().collect::<Vec<_>>(), seen);
    assert!(find(&replay, "task", "failed", &victim_name).is_some());

    // A filter: only the node's events.
    let nodes = parse(&lab.rctl(&[
        "events",
        "-o",
        "json",
        "--since",
        "0",
        "--until",
        &to.to_string(),
        "--filter",
        &format!("node={h2}"),
        "--filter",
        "type=node",
    ])?)?;
    assert!(!nodes.is_empty());
    assert!(nodes
        .iter()
        .all(|e| e["type"] == "node" && e["node"] == h2.as_str()));
    assert!(find(&nodes, "node", "drain", h2).is_some());

    // A bad filter is refused with a message that says what is expected.
    let err = lab
        .rctl(&["events", "--filter", "colour=red"])
        .expect_err("refused");
    assert!(err.to_string().contains("unknown key"), "{err}");
    drop(live);
    lab.rctl(&["rm", "web"])?;
    Ok(())
}

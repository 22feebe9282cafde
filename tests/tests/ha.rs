//! The replicated control plane over a real lab: three controllers (one per host, each in its
//! own network namespace) in one raft group over gRPC, durable logs on disk.
//!
//! - Kill the leader while a client issues acknowledged writes: a new leader takes writes, and
//!   every acknowledged write is on every controller afterwards; then restart every controller
//!   at once: the state is intact.
//! - Cut one manager's underlay link: the majority goes on, the cut member refuses writes with a
//!   clear error, and once the link returns it catches up.
//!
//! A write here is a node label (`rctl node update h3 --label-add wN=1`): a real replicated
//! command that is cheap to check.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rudder_tests::{bin, lab, wait_for, LabGuard};
use serde_json::Value;

/// `rctl` against one controller (`--controller URL`), optionally from inside a host's netns.
fn rctl_at(
    lab: &LabGuard,
    netns: Option<&str>,
    url: &str,
    args: &[&str],
) -> anyhow::Result<String> {
    let rctl = bin("rctl");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&rctl);
            c
        }
        None => Command::new(&rctl),
    };
    let out = cmd
        .arg("--context")
        .arg(&lab.lab.context_path)
        .args(["--controller", url])
        .args(args)
        .output()
        .context("run rctl")?;
    if !out.status.success() {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn info(lab: &LabGuard, url: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&rctl_at(
        lab,
        None,
        url,
        &["cluster", "info", "-o", "json"],
    )?)?)
}

/// Waits until every controller reports the same leader and 3 voters; returns the leader's
/// host index.
fn settled_leader(lab: &LabGuard, urls: &[String]) -> anyhow::Result<usize> {
    wait_for(Duration::from_secs(30), "one leader, three voters", || {
        let infos = urls
            .iter()
            .map(|u| info(lab, u))
            .collect::<anyhow::Result<Vec<Value>>>()?;
        let leader = infos[0]["leader_id"].as_u64().unwrap_or(0);
        let voters = |i: &Value| {
            i["managers"]
                .as_array()
                .map_or(0, |m| m.iter().filter(|m| m["voter"] == true).count())
        };
        Ok((leader != 0
            && infos
                .iter()
                .all(|i| i["leader_id"] == leader && voters(i) == 3))
        .then(|| leader as usize - 1))
    })
}

/// The `w*` labels of node h3 as seen by controller `url`.
fn labels(lab: &LabGuard, url: &str) -> anyhow::Result<BTreeSet<String>> {
    let nodes: Vec<Value> =
        serde_json::from_str(&rctl_at(lab, None, url, &["get", "nodes", "-o", "json"])?)?;
    Ok(nodes
        .iter()
        .find(|n| n["hostname"] == "h3")
        .and_then(|n| n["labels"].as_object())
        .map(|l| l.keys().filter(|k| k.starts_with('w')).cloned().collect())
        .unwrap_or_default())
}

/// Issues writes through any live controller until stopped; records the acknowledged ones and
/// when each was acknowledged.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(lab: &LabGuard) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let ctx = lab.lab.context_path.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let label = format!("w{n}");
                let ok = Command::new(bin("rctl"))
                    .arg("--context")
                    .arg(&ctx)
                    .args(["node", "update", "h3", "--label-add", &format!("{label}=1")])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    a.lock().unwrap().push((label, Instant::now()));
                }
            }
        });
        Writer {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> Vec<(String, Instant)> {
        self.acked.lock().unwrap().clone()
    }

    fn finish(mut self) -> Vec<(String, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.acked()
    }
}

fn ha_lab(prefix: &str, nodes: u32) -> anyhow::Result<(LabGuard, Vec<String>)> {
    let lab = LabGuard::up_with(
        &format!("{prefix}{}", std::process::id() % 100000),
        nodes,
        3,
    )?;
    let urls = lab.lab.controller_urls();
    assert_eq!(urls.len(), 3);
    Ok((lab, urls))
}

#[test]
fn killing_the_leader_loses_no_acknowledged_write_and_restarts_keep_state() -> anyhow::Result<()> {
    let (mut lab, urls) = ha_lab("hk", 3)?;
    let leader = settled_leader(&lab, &urls)?;

    let writer = Writer::start(&lab);
    wait_for(Duration::from_secs(10), "writes before the kill", || {
        Ok((writer.acked().len() >= 10).then_some(()))
    })?;
    lab.lab.kill(leader, lab::Role::Controller)?;
    let killed = Instant::now();
    let first_after = wait_for(Duration::from_secs(15), "a write after the kill", || {
        Ok(writer
            .acked()
            .iter()
            .find(|(_, at)| *at > killed)
            .map(|(_, at)| *at - killed))
    })?;
    // Issue 3's figure; the benchmark reports it too.
    println!("leader killed → next acknowledged write: {first_after:?}");
    std::thread::sleep(Duration::from_millis(500));
    let acked: BTreeSet<String> = writer.finish().into_iter().map(|(l, _)| l).collect();
    assert!(acked.len() > 10);

    // The old leader comes back as a follower and catches up; every controller has every
    // acknowledged write.
    lab.restart(leader, lab::Role::Controller, true)?;
    for url in &urls {
        wait_for(
            Duration::from_secs(15),
            "acknowledged writes everywhere",
            || {
                let have = labels(&lab, url)?;
                Ok(acked.is_subset(&have).then_some(()))
            },
        )
        .with_context(|| format!("controller {url}"))?;
    }

    // Every controller down at once, then up again: the state is on disk.
    for i in 0..3 {
        lab.lab.kill(i, lab::Role::Controller)?;
    }
    for i in 0..3 {
        lab.restart(i, lab::Role::Controller, true)?;
    }
    settled_leader(&lab, &urls)?;
    for url in &urls {
        let have = wait_for(Duration::from_secs(15), "state after restart", || {
            Ok(Some(labels(&lab, url)?).filter(|h| acked.is_subset(h)))
        })?;
        assert!(acked.is_subset(&have));
    }
    // And the cluster still takes writes.
    lab.rctl(&["node", "update", "h3", "--label-add", "after=1"])?;
    Ok(())
}

#[test]
fn a_cut_manager_refuses_writes_and_catches_up() -> anyhow::Result<()> {
    let (lab, urls) = ha_lab("hp", 3)?;
    let leader = settled_leader(&lab, &urls)?;
    let cut = (leader + 1) % 3;
    let live: Vec<&String> = urls
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != cut)
        .map(|(_, u)| u)
        .collect();

    lab.lab.set_link(cut, false)?;
    // The majority goes on.
    for n in 1..=20 {
        let label = format!("w{n}=1");
        rctl_at(
            &lab,
            None,
            live[n % 2],
            &["node", "update", "h3", "--label-add", &label],
        )?;
    }
    // The cut member refuses, saying why.
    let host = &lab.lab.hosts[cut];
    let err = rctl_at(
        &lab,
        Some(&host.netns),
        &urls[cut],
        &["node", "update", "h3", "--label-add", "cut=1"],
    )
    .expect_err("a cut member must refuse writes")
    .to_string();
    assert!(
        err.contains("leader") || err.contains("quorum"),
        "unclear refusal: {err}"
    );

    lab.lab.set_link(cut, true)?;
    let want: BTreeSet<String> = (1..=20).map(|n| format!("w{n}")).collect();
    wait_for(Duration::from_secs(20), "the cut member catches up", || {
        let have = labels(&lab, &urls[cut])?;
        Ok(want.is_subset(&have).then_some(()))
    })?;
    assert!(
        !labels(&lab, &urls[leader])?.contains("cut"),
        "a refused write was applied"
    );

    // Demote the member that was cut: it keeps replicating but no longer votes; promote it
    // back.
    let name = lab.lab.hosts[cut].name.clone();
    let voter = |lab: &LabGuard| -> anyhow::Result<bool> {
        let i = info(lab, &urls[leader])?;
        Ok(i["managers"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["raft_id"] == cut as u64 + 1))
            .map(|m| m["voter"] == true)
            .unwrap_or(false))
    };
    lab.rctl(&["node", "demote", &name])?;
    assert!(!voter(&lab)?, "{name} still votes after demote");
    lab.rctl(&["node", "update", "h3", "--label-add", "while-demoted=1"])?;
    wait_for(Duration::from_secs(10), "the learner replicating", || {
        Ok(labels(&lab, &urls[cut])?
            .contains("while-demoted")
            .then_some(()))
    })?;
    lab.rctl(&["node", "promote", &name])?;
    assert!(voter(&lab)?, "{name} does not vote after promote");
    Ok(())
}

/// Five controllers lose two (the leader among them) and go on; the two come back and catch up.
#[test]
fn five_controllers_survive_losing_two() -> anyhow::Result<()> {
    let mut lab = LabGuard::up_with(&format!("h5{}", std::process::id() % 100000), 5, 5)?;
    let urls = lab.lab.controller_urls();
    assert_eq!(urls.len(), 5);
    wait_for(Duration::from_secs(30), "five voters and a leader", || {
        let i = info(&lab, &urls[0])?;
        let voters = i["managers"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["voter"] == true).count());
        Ok((voters == 5 && i["leader_id"].as_u64().unwrap_or(0) != 0).then_some(()))
    })?;
    let leader = info(&lab, &urls[0])?["leader_id"].as_u64().unwrap_or(1) as usize - 1;
    let other = (leader + 1) % 5;
    lab.lab.kill(leader, lab::Role::Controller)?;
    lab.lab.kill(other, lab::Role::Controller)?;
    let live: Vec<&String> = urls
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader && *i != other)
        .map(|(_, u)| u)
        .collect();
    // Three of five are a majority: writes go on (after the election).
    for n in 1..=10 {
        let label = format!("w{n}=1");
        wait_for(
            Duration::from_secs(10),
            "a write with two controllers down",
            || {
                Ok(rctl_at(
                    &lab,
                    None,
                    live[n % 3],
                    &["node", "update", "h3", "--label-add", &label],
                )
                .ok())
            },
        )?;
    }
    lab.restart(leader, lab::Role::Controller, true)?;
    lab.restart(other, lab::Role::Controller, true)?;
    let want: BTreeSet<String> = (1..=10).map(|n| format!("w{n}")).collect();
    for i in [leader, other] {
        // 60 s, not 20: on a loaded CI machine a returning controller has been seen to
        // take longer than 20 s (twice in four runs, never in isolation); still under
        // investigation. It must catch up all the same.
        let caught_up = wait_for(
            Duration::from_secs(60),
            "a returning controller catching up",
            || Ok(want.is_subset(&labels(&lab, &urls[i])?).then_some(())),
        );
        if let Err(e) = caught_up {
            // What each controller believes (term, leader, applied index, members), and the
            // returning one's log tail: the next failure says why instead of only that.
            let mut why = format!("{e}\n");
            for (j, u) in urls.iter().enumerate() {
                let seen = info(&lab, u).map_or_else(|e| e.to_string(), |v| v.to_string());
                why.push_str(&format!("controller {j}: {seen}\n"));
            }
            let log = lab.lab.hosts[i].controller_log();
            let tail: Vec<String> = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(40)
                .map(str::to_string)
                .collect();
            why.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            anyhow::bail!(why);
        }
    }
    Ok(())
}

/// Promotion grows the group the way swarm does: one controller, two workers promoted; each
/// worker's agent starts a controller that joins with the manager token. Then the first
/// controller can die and the promoted two keep the cluster writable.
#[test]
fn promoting_workers_grows_the_controller_group() -> anyhow::Result<()> {
    let lab = LabGuard::up_with(&format!("hg{}", std::process::id() % 100000), 3, 1)?;
    let first = lab.lab.controller_url();
    wait_for(Duration::from_secs(20), "three ready nodes", || {
        let nodes: Vec<Value> = serde_json::from_str(&lab.rctl(&["get", "nodes", "-o", "json"])?)?;
        Ok((nodes.iter().filter(|n| n["state"] == "ready").count() == 3).then_some(()))
    })?;
    lab.rctl(&["node", "promote", "h2"])?;
    lab.rctl(&["node", "promote", "h3"])?;
    wait_for(Duration::from_secs(30), "three voting controllers", || {
        let i = info(&lab, &first)?;
        let voters = i["managers"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["voter"] == true).count());
        Ok((voters == 3).then_some(()))
    })?;
    let promoted: Vec<String> = lab.lab.hosts[1..]
        .iter()
        .map(|h| format!("http://{}:4243", h.addr))
        .collect();
    lab.lab.kill(0, lab::Role::Controller)?;
    for n in 1..=5 {
        let label = format!("p{n}=1");
        wait_for(
            Duration::from_secs(10),
            "a write without the first controller",
            || {
                Ok(rctl_at(
                    &lab,
                    None,
                    &promoted[n % 2],
                    &["node", "update", "h3", "--label-add", &label],
                )
                .ok())
            },
        )?;
    }
    let nodes: Vec<Value> = serde_json::from_str(&rctl_at(
        &lab,
        None,
        &promoted[0],
        &["get", "nodes", "-o", "json"],
    )?)?;
    let h3 = nodes.iter().find(|n| n["hostname"] == "h3").expect("h3");
    assert!(h3["labels"].get("p5").is_some(), "{h3}");
    assert_eq!(h3["role"], "manager", "a promoted host is a manager: {h3}");
    Ok(())
}

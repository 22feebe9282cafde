//! Honest stop-first over a real one-host lab: containers whose PID 1 ignores SIGTERM live out
//! their stop grace, and a slot's new container starts only after its old one has exited.
//! `web` publishes a host-mode port, which only one task per host may hold: its update must not
//! fail or hold up a task on the port. `batch` has three slots updated one at a time:
//! in every batch the old container's exit precedes the new container's start, watched on the
//! containers' own processes while the update runs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rudder_tests::{lab_with_busybox, pid_alive, running_tasks, wait_for};

fn manifests(image: &str) -> String {
    format!(
        "kind: Service\nname: web\nimage: {image}\nreplicas: 1\nstop_grace_period: 1\n\
         ports: [{{target: 8080, mode: host}}]\n\
         command: [\"/bin/sh\", \"-c\", \"trap '' TERM; mkdir -p /tmp/w; \
         echo $VERSION > /tmp/w/index.html; httpd -f -p 8080 -h /tmp/w & wait\"]\n\
         env: {{VERSION: \"{image}\"}}\nrestart: {{delay: 1}}\n---\n\
         kind: Service\nname: batch\nimage: {image}\nreplicas: 3\nstop_grace_period: 1\n\
         command: [\"sleep\", \"100000\"]\n\
         update_config: {{monitor: 1s}}\n"
    )
}

#[test]
fn stop_first_stops_the_old_container_before_starting_the_new() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("sf", 1)?;
    let tar = tmp.path().join("busybox.tar");
    lab.rctl(&["image", "import", tar.to_str().unwrap(), "busybox:v2"])?;
    lab.apply(tmp.path(), "v1.yaml", &manifests("busybox:latest"))?;
    for (svc, n) in [("web", 1), ("batch", 3)] {
        wait_for(Duration::from_secs(30), &format!("{svc} running"), || {
            Ok((running_tasks(&lab.tasks(svc)?).len() == n).then_some(()))
        })?;
    }

    lab.apply(tmp.path(), "v2.yaml", &manifests("busybox:v2"))?;
    // Every task's container pid once seen (its directory may go once it ended).
    let mut pids: BTreeMap<String, i32> = BTreeMap::new();
    // Slots seen with their old container still alive after it was asked to stop.
    let mut stopping_seen: BTreeSet<(String, u64)> = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = true;
        for svc in ["web", "batch"] {
            let tasks = lab.tasks(svc)?;
            for t in &tasks {
                let id = t["id"].as_str().unwrap().to_string();
                if let Some(pid) = lab.task_pid(t, "pid") {
                    pids.entry(id).or_insert(pid);
                }
            }
            let alive = |t: &serde_json::Value| {
                pids.get(t["id"].as_str().unwrap())
                    .is_some_and(|p| pid_alive(*p))
            };
            let mut slots: BTreeMap<u64, Vec<&serde_json::Value>> = BTreeMap::new();
            for t in &tasks {
                slots
                    .entry(t["slot"].as_u64().unwrap())
                    .or_default()
                    .push(t);
            }
            for (slot, ts) in &slots {
                let old_alive: Vec<_> = ts
                    .iter()
                    .filter(|t| t["image"] == "busybox:latest" && alive(t))
                    .collect();
                let new_alive = ts.iter().any(|t| t["image"] == "busybox:v2" && alive(t));
                assert!(
                    old_alive.is_empty() || !new_alive,
                    "{svc} slot {slot}: old and new containers at once: {ts:#?}"
                );
                if old_alive.iter().any(|t| t["desired_state"] == "shutdown") {
                    stopping_seen.insert((svc.to_string(), *slot));
                }
            }
            let running = running_tasks(&tasks);
            done &=
                running.len() == slots.len() && running.iter().all(|t| t["image"] == "busybox:v2");
            // No task failed or was rejected, on the port or otherwise.
            assert!(
                tasks
                    .iter()
                    .all(|t| t["state"] != "failed" && t["state"] != "rejected"),
                "{svc}: {tasks:#?}"
            );
        }
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "update not done in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each old container did live out part of its grace while watched: the check above saw it.
    assert!(stopping_seen.len() >= 3, "{stopping_seen:?}");
    // The new web serves on the port.
    let web = running_tasks(&lab.tasks("web")?)[0].clone();
    wait_for(Duration::from_secs(10), "the new web serving", || {
        let (ok, out) = rudder_tests::exec(
            &lab,
            &web,
            &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"],
        )?;
        Ok((ok && out.contains("v2")).then_some(()))
    })?;
    Ok(())
}

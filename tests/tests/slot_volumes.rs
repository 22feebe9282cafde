//! Per-slot volumes over a real 2-host lab: `source: "data-{{.Task.Slot}}"` gives each replica
//! slot its own volume on the host its first task landed on. A file written in slot 1's volume
//! is still there after a spec update (the slot stays on its host), scaling down keeps a slot's
//! volume and scaling back up reuses it, `rctl volume ls` names each volume's slot, other
//! template fields are refused, and a slot whose host is down waits with the reason until the
//! operator releases it with `rctl volume rm`.

use std::time::Duration;

use rudder_tests::{exec, lab, lab_with_busybox, running_tasks, wait_for, LabGuard};
use serde_json::Value;

fn db(env: &str, replicas: u64) -> String {
    format!(
        "kind: Service\nname: db\nimage: busybox:latest\nreplicas: {replicas}\n\
         stop_grace_period: 1\ncommand: [\"/bin/sleep\", \"1000000\"]\n\
         env:\n  GEN: \"{env}\"\n\
         mounts:\n  - source: \"data-{{{{ .Task.Slot }}}}\"\n    target: /data\n"
    )
}

/// The running task of each slot, once exactly `n` slots run (and nothing else is on its way).
fn slots(lab: &LabGuard, n: usize, what: &str) -> anyhow::Result<Vec<Value>> {
    wait_for(Duration::from_secs(90), what, || {
        let t = lab.tasks("db")?;
        let run: Vec<Value> = running_tasks(&t).into_iter().cloned().collect();
        let live = t.iter().filter(|t| t["desired_state"] == "running").count();
        Ok((run.len() == n && live == n).then(|| {
            let mut run = run;
            run.sort_by_key(|t| t["slot"].as_u64());
            run
        }))
    })
}

fn volumes(lab: &LabGuard) -> anyhow::Result<Vec<Value>> {
    Ok(serde_json::from_str(
        &lab.rctl(&["volume", "ls", "-o", "json"])?,
    )?)
}

fn read(lab: &LabGuard, t: &Value) -> anyhow::Result<String> {
    let (ok, out) = exec(lab, t, &["cat", "/data/marker"])?;
    anyhow::ensure!(ok, "cat /data/marker in {}: {out}", t["name"]);
    Ok(out.trim().to_string())
}

#[test]
fn per_slot_volumes_follow_their_slot() -> anyhow::Result<()> {
    let (mut lab, tmp) = lab_with_busybox("sv", 2)?;

    // Another template field is refused, naming it.
    let bad = db("0", 2).replace(".Task.Slot", ".Task.ID");
    let path = tmp.path().join("bad.yaml");
    std::fs::write(&path, bad)?;
    let e = lab
        .rctl(&["apply", "--detach", "-f", path.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mounts[0].source") && e.contains(".Task.ID"),
        "{e}"
    );

    let out = lab.apply(tmp.path(), "db.yaml", &db("1", 2))?;
    assert!(
        !out.contains("volume/"),
        "a template declares no volume: {out}"
    );
    let first = slots(&lab, 2, "2 slots running")?;
    let host = |t: &Value| t["node"].as_str().unwrap().to_string();
    let (h1, h2) = (host(&first[0]), host(&first[1]));
    assert_ne!(h1, h2, "spread over the two hosts: {first:?}");
    for (t, text) in first.iter().zip(["one", "two"]) {
        let (ok, out) = exec(
            &lab,
            t,
            &["sh", "-c", &format!("echo {text} > /data/marker")],
        )?;
        assert!(ok, "{out}");
    }
    let on_disk = lab.host(&h1).data_dir.join("volumes/data-1/_data/marker");
    assert_eq!(std::fs::read_to_string(&on_disk)?, "one\n");

    // `rctl volume ls`: each slot's volume, its owner and its host.
    let listed = wait_for(Duration::from_secs(20), "copies reported", || {
        let v = volumes(&lab)?;
        let hosts = |n: &str| {
            v.iter()
                .find(|v| v["name"] == n)
                .map(|v| v["hosts"].clone())
        };
        Ok((hosts("data-1") == Some(serde_json::json!([h1.clone()]))
            && hosts("data-2") == Some(serde_json::json!([h2.clone()])))
        .then_some(v))
    })?;
    for (slot, v) in listed.iter().filter(|v| v["owner"].is_object()).enumerate() {
        assert_eq!(v["owner"]["service"], "db");
        assert_eq!(v["owner"]["slot"], slot as u64 + 1);
    }
    let table = lab.rctl(&["volume", "ls"])?;
    for (name, h, owner) in [("data-1", &h1, "db.1"), ("data-2", &h2, "db.2")] {
        assert!(
            table
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == [name, "local", h.as_str(), "-", owner]),
            "{table}"
        );
    }
    // In use: refused, naming the task.
    let e = lab
        .rctl(&["volume", "rm", "data-1"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("in use by task db.1"), "{e}");

    // A spec update replaces both tasks; each slot stays on its host, with its data.
    lab.apply(tmp.path(), "db.yaml", &db("2", 2))?;
    let updated = wait_for(Duration::from_secs(90), "both slots updated", || {
        let s = slots(&lab, 2, "2 slots running")?;
        Ok(s.iter()
            .zip(&first)
            .all(|(a, b)| a["id"] != b["id"])
            .then_some(s))
    })?;
    assert_eq!(
        (host(&updated[0]), host(&updated[1])),
        (h1.clone(), h2.clone())
    );
    assert_eq!(read(&lab, &updated[0])?, "one");
    assert_eq!(read(&lab, &updated[1])?, "two");

    // Scale to 1: slot 2's volume stays; back to 2: slot 2 reuses it on its host.
    lab.rctl(&["scale", "db=1"])?;
    slots(&lab, 1, "1 slot running")?;
    assert!(volumes(&lab)?.iter().any(|v| v["name"] == "data-2"));
    lab.rctl(&["scale", "db=2"])?;
    let back = slots(&lab, 2, "2 slots running again")?;
    assert_eq!(host(&back[1]), h2);
    assert_eq!(read(&lab, &back[1])?, "two");

    // Slot 2's host goes down: its slot waits for it, saying why.
    let idx = lab.host_index(&h2);
    lab.kill9_agent(idx)?;
    let why = wait_for(Duration::from_secs(30), "slot 2 pending", || {
        let t = lab.tasks("db")?;
        Ok(t.iter()
            .find(|t| t["slot"] == 2 && t["desired_state"] == "running" && t["state"] == "pending")
            .map(|t| t["message"].as_str().unwrap_or_default().to_string()))
    })?;
    assert!(
        why.contains("volume data-2") && why.contains("rctl volume rm data-2"),
        "{why}"
    );
    assert!(why.contains("1 node down"), "{why}");
    // The operator lets it go: slot 2 runs on the other host, with a new, empty volume.
    lab.rctl(&["volume", "rm", "data-2"])?;
    let moved = slots(&lab, 2, "slot 2 moved")?;
    assert_eq!((host(&moved[0]), host(&moved[1])), (h1.clone(), h1.clone()));
    let (ok, out) = exec(&lab, &moved[1], &["ls", "-A", "/data"])?;
    assert!(ok && out.trim().is_empty(), "{out}");
    // When the old host comes back, its stale copy of data-2 goes.
    lab.restart(idx, lab::Role::Agent, true)?;
    let stale = lab.host(&h2).data_dir.join("volumes/data-2");
    wait_for(Duration::from_secs(60), "stale copy deleted", || {
        Ok((!stale.exists()).then_some(()))
    })?;
    Ok(())
}

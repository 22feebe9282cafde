//! Rolling updates over a real lab: a good update replaces every task in batches and completes;
//! an update whose new tasks never become healthy is rolled back automatically, and the old
//! tasks that were still healthy are never touched (same task ids, same container pids).

use std::collections::BTreeMap;
use std::time::Duration;

use rudder_tests::{lab_with_busybox, running_tasks, wait_for};

fn manifest(image: &str, marker: &str) -> String {
    format!(
        "kind: Service\nname: web\nimage: {image}\nreplicas: 6\nstop_grace_period: 1\n\
         command: [\"/bin/sh\", \"-c\", \"{marker}; exec sleep 100000\"]\n\
         env: {{VERSION: \"{image}\"}}\n\
         healthcheck:\n  exec: [\"test\", \"-f\", \"/tmp/ok\"]\n  interval: 300ms\n  retries: 3\n\
         restart: {{delay: 1}}\n\
         update_config: {{parallelism: 2, monitor: 1s, failure_action: rollback}}\n"
    )
}

#[test]
fn rolling_update_and_automatic_rollback() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("ro", 3)?;
    let tar = tmp.path().join("busybox.tar");
    lab.rctl(&["image", "import", tar.to_str().unwrap(), "busybox:v2"])?;
    let file = tmp.path().join("web.yaml");
    let apply = |image: &str, marker: &str| {
        std::fs::write(&file, manifest(image, marker))?;
        lab.rctl(&["apply", "-f", file.to_str().unwrap()])
    };
    let services = || -> anyhow::Result<serde_json::Value> {
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&lab.rctl(&["get", "services", "-o", "json"])?)?;
        Ok(v.into_iter().find(|s| s["name"] == "web").unwrap())
    };

    // Create, then a good update: apply waits for the whole rollout.
    apply("busybox:latest", "touch /tmp/ok")?;
    let v1: Vec<String> = running_tasks(&lab.tasks("web")?)
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(v1.len(), 6);
    apply("busybox:v2", "touch /tmp/ok")?;
    let tasks = lab.tasks("web")?;
    let v2 = running_tasks(&tasks);
    assert_eq!(v2.len(), 6);
    assert!(v2.iter().all(|t| t["image"] == "busybox:v2"));
    assert!(v2
        .iter()
        .all(|t| !v1.contains(&t["id"].as_str().unwrap().to_string())));
    assert_eq!(services()?["update"]["state"], "completed");

    // Record the healthy v2 tasks and their container pids.
    let before: BTreeMap<String, i32> = v2
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_string(),
                lab.task_pid(t, "pid").unwrap(),
            )
        })
        .collect();

    // Applies a bad spec, expects an automatic rollback whose reason mentions `why`, and
    // returns the tasks once 6 healthy v2 tasks run again.
    let bad_update = |image: &str, marker: &str, why: &str| -> anyhow::Result<Vec<_>> {
        let err = apply(image, marker).unwrap_err().to_string();
        assert!(err.contains("rolled back"), "{err}");
        let svc = services()?;
        assert_eq!(svc["update"]["state"], "rollback_completed", "{svc}");
        let message = svc["update"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{svc}");
        wait_for(Duration::from_secs(30), "6 healthy v2 tasks", || {
            let t = lab.tasks("web")?;
            let ok = running_tasks(&t).len() == 6
                && running_tasks(&t).iter().all(|t| t["image"] == "busybox:v2");
            Ok(ok.then_some(t))
        })
    };

    // A bad update: the new tasks never become healthy (nothing creates /tmp/ok).
    let tasks = bad_update("busybox:latest", "true", "unhealthy")?;
    // Parallelism 2: only the first batch was touched; the other 4 old tasks kept running.
    let kept: Vec<_> = running_tasks(&tasks)
        .into_iter()
        .filter(|t| before.contains_key(t["id"].as_str().unwrap()))
        .collect();
    assert_eq!(kept.len(), 4, "{tasks:#?}");
    for t in kept {
        let id = t["id"].as_str().unwrap();
        assert_eq!(
            lab.task_pid(t, "pid"),
            Some(before[id]),
            "task {id} restarted"
        );
    }
    // The failed attempts are in the history, reported unhealthy.
    assert!(tasks
        .iter()
        .any(|t| t["state"] == "failed" && t["error"].as_str().unwrap().contains("unhealthy")));

    // A bad image: rejected new tasks, rolled back the same way; the old tasks stay.
    let running_ids = |t: &[serde_json::Value]| -> Vec<String> {
        running_tasks(t)
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = running_ids(&tasks);
    let tasks = bad_update("nosuch:1", "touch /tmp/ok", "nosuch")?;
    let after = running_ids(&tasks);
    assert!(
        before.iter().filter(|id| after.contains(id)).count() >= 4,
        "{before:?} {after:?}"
    );
    Ok(())
}

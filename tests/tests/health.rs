//! Health checks over a real lab: a task counts as running only once its probe passes (exec,
//! tcp and http probes, the latter two from inside the container's own network namespace),
//! and a task whose probe keeps failing is stopped, reported failed as unhealthy, and replaced.

use std::time::Duration;

use rudder_tests::{lab_with_busybox, running_tasks, wait_for};

#[test]
fn health_gates_running_and_replaces_unhealthy_tasks() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("hc", 2)?;

    // exec probe: ready only after the container made /tmp/ready (3 s after start).
    lab.apply(
        tmp.path(),
        "slow.yaml",
        "kind: Service\nname: slow\nimage: busybox:latest\nreplicas: 2\n\
         command: [\"/bin/sh\", \"-c\", \"sleep 3; touch /tmp/ready; exec sleep 100000\"]\n\
         healthcheck:\n  exec: [\"test\", \"-f\", \"/tmp/ready\"]\n  interval: 300ms\n  retries: 30\n",
    )?;
    // While the probe fails, the tasks are started but not running.
    wait_for(
        Duration::from_secs(30),
        "slow tasks waiting for health",
        || {
            let t = lab.tasks("slow")?;
            let waiting = t.len() == 2
                && t.iter().all(|t| {
                    t["state"] == "starting" && t["message"].as_str().unwrap().contains("health")
                });
            Ok(waiting.then_some(()))
        },
    )?;
    wait_for(Duration::from_secs(30), "slow tasks healthy", || {
        Ok((running_tasks(&lab.tasks("slow")?).len() == 2).then_some(()))
    })?;

    // tcp and http probes, in containers with their own network namespace (port 8080 in each).
    lab.apply(
        tmp.path(),
        "web.yaml",
        "kind: Service\nname: web\nimage: busybox:latest\nreplicas: 2\nnetwork_mode: none\n\
         command: [\"/bin/sh\", \"-c\", \"echo ok > /tmp/index.html; exec httpd -f -p 8080 -h /tmp\"]\n\
         healthcheck:\n  http: {port: 8080, path: /index.html}\n  interval: 300ms\n  retries: 10\n\
         ---\nkind: Service\nname: tcp\nimage: busybox:latest\nreplicas: 2\nnetwork_mode: none\n\
         command: [\"/bin/sh\", \"-c\", \"mkdir -p /tmp/w; exec httpd -f -p 9090 -h /tmp/w\"]\n\
         healthcheck:\n  tcp: {port: 9090}\n  interval: 300ms\n  retries: 10\n",
    )?;
    for svc in ["web", "tcp"] {
        wait_for(Duration::from_secs(30), "probed services healthy", || {
            Ok((running_tasks(&lab.tasks(svc)?).len() == 2).then_some(()))
        })?;
    }

    // A probe that never passes: the task is stopped, reported unhealthy, and replaced.
    lab.apply(
        tmp.path(),
        "sick.yaml",
        "kind: Service\nname: sick\nimage: busybox:latest\nreplicas: 1\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"100000\"]\n\
         healthcheck:\n  http: {port: 8081}\n  interval: 200ms\n  timeout: 200ms\n  retries: 2\n\
         restart: {delay: 1}\n",
    )?;
    let failed = wait_for(Duration::from_secs(40), "unhealthy task replaced", || {
        let t = lab.tasks("sick")?;
        let failed: Vec<_> = t
            .iter()
            .filter(|t| t["state"] == "failed")
            .cloned()
            .collect();
        Ok((failed.len() >= 2).then_some(failed))
    })?;
    for t in &failed {
        let err = t["error"].as_str().unwrap();
        assert!(err.contains("unhealthy") && err.contains("8081"), "{err}");
    }
    // Never counted as running.
    let svcs: Vec<serde_json::Value> =
        serde_json::from_str(&lab.rctl(&["get", "services", "-o", "json"])?)?;
    let sick = svcs.iter().find(|s| s["name"] == "sick").unwrap();
    assert_eq!(sick["replicas"]["running"], 0, "{sick}");
    Ok(())
}

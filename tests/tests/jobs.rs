//! Jobs on a real two-host lab: a replicated-job runs its completions at most `parallelism` at a
//! time and completes; a failing task is retried per its restart policy (and a job whose
//! retries run out fails); a global-job runs once on each host; `rctl ps` and `rctl describe`
//! show the progress; `rctl apply` waits for a job; `rctl run` is a job (`rctl ps` shows it
//! complete), and the cluster removes a `--rm` job whose client was killed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rudder_tests::{lab_with_busybox, wait_for};

/// The jobs; `flaky` keeps its first run's mark in `marks` (a host directory bound in, the same
/// on both lab hosts), so exactly its first run fails.
fn manifests(marks: &str) -> String {
    format!(
        "\
kind: Service\nname: batch\nimage: busybox:latest\nmode: replicated-job\n\
completions: 4\nparallelism: 2\nstop_grace_period: 1\n\
command: [\"sh\", \"-c\", \"sleep 2; exit 0\"]\n---\n\
kind: Service\nname: flaky\nimage: busybox:latest\nmode: replicated-job\nstop_grace_period: 1\n\
restart: {{condition: on-failure, delay: 1}}\n\
mounts: [{{type: bind, source: {marks}, target: /data}}]\n\
command: [\"sh\", \"-c\", \"if [ -e /data/once ]; then exit 0; fi; touch /data/once; exit 3\"]\n\
---\n\
kind: Service\nname: doomed\nimage: busybox:latest\nmode: replicated-job\nstop_grace_period: 1\n\
restart: {{condition: on-failure, delay: 1, max_attempts: 1}}\n\
command: [\"sh\", \"-c\", \"exit 5\"]\n---\n\
kind: Service\nname: everywhere\nimage: busybox:latest\nmode: global-job\nstop_grace_period: 1\n\
command: [\"sh\", \"-c\", \"hostname; exit 0\"]\n"
    )
}

fn state(t: &serde_json::Value) -> &str {
    t["state"].as_str().unwrap_or_default()
}

/// Tasks that may hold a container: meant to run, placed and not ended.
fn active(tasks: &[serde_json::Value]) -> usize {
    tasks
        .iter()
        .filter(|t| {
            t["desired_state"] == "running"
                && matches!(state(t), "assigned" | "preparing" | "starting" | "running")
        })
        .count()
}

#[test]
fn jobs_run_to_completion() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("jb", 2)?;
    let marks = tmp.path().join("marks");
    std::fs::create_dir(&marks)?;
    let manifests = manifests(marks.to_str().unwrap());
    lab.apply(tmp.path(), "jobs.yaml", &manifests)?;

    // batch: four completions, never more than two at once.
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        let tasks = lab.tasks("batch")?;
        most = most.max(active(&tasks));
        let complete: Vec<&serde_json::Value> =
            tasks.iter().filter(|t| state(t) == "complete").collect();
        if complete.len() == 4 {
            break tasks;
        }
        assert!(Instant::now() < deadline, "batch not complete: {tasks:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(most, 2, "at most parallelism 2 at once, and it was used");
    let slots: BTreeSet<u64> = done
        .iter()
        .filter(|t| state(t) == "complete")
        .map(|t| t["slot"].as_u64().unwrap())
        .collect();
    assert_eq!(slots, BTreeSet::from([1, 2, 3, 4]));
    assert_eq!(done.len(), 4, "no task beyond the completions: {done:#?}");
    let ps = lab.rctl(&["ps", "batch"])?;
    assert!(
        ps.contains("batch: job complete: 4/4 completed, 0 running, 0 failed"),
        "{ps}"
    );
    let describe = lab.rctl(&["describe", "batch"])?;
    assert!(
        describe.contains("Job:       complete: 4/4 completed"),
        "{describe}"
    );

    // flaky: the first run fails, the retry completes, and the job is complete.
    let tasks = wait_for(Duration::from_secs(60), "flaky complete", || {
        let t = lab.tasks("flaky")?;
        Ok(t.iter().any(|t| state(t) == "complete").then_some(t))
    })?;
    assert_eq!(tasks.len(), 2, "{tasks:#?}");
    let failed = tasks.iter().find(|t| state(t) == "failed").expect("failed");
    assert_eq!(failed["exit_code"], 3, "{failed}");
    let ps = lab.rctl(&["ps", "flaky"])?;
    assert!(
        ps.contains("flaky: job complete: 1/1 completed, 0 running, 1 failed"),
        "{ps}"
    );

    // doomed: one retry (max_attempts 1), then the job has failed and nothing more runs.
    wait_for(Duration::from_secs(60), "doomed failed", || {
        let ps = lab.rctl(&["ps", "doomed"])?;
        Ok(ps
            .contains("doomed: job failed: 0/1 completed, 0 running, 2 failed")
            .then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let tasks = lab.tasks("doomed")?;
    assert_eq!(tasks.len(), 2, "{tasks:#?}");
    assert!(tasks.iter().all(|t| state(t) == "failed"), "{tasks:#?}");

    // everywhere: once on each host.
    let tasks = wait_for(Duration::from_secs(60), "everywhere complete", || {
        let t = lab.tasks("everywhere")?;
        let n = t.iter().filter(|t| state(t) == "complete").count();
        Ok((n == 2).then_some(t))
    })?;
    let nodes: BTreeSet<&str> = tasks.iter().map(|t| t["node"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 2, "{tasks:#?}");
    assert_eq!(tasks.len(), 2, "{tasks:#?}");
    let describe = lab.rctl(&["describe", "everywhere"])?;
    assert!(
        describe.contains("Job:       complete: 2/2 completed, 0 running, 0 failed (global)"),
        "{describe}"
    );

    // Re-applying the same manifests changes nothing; changing batch runs it again.
    lab.apply(tmp.path(), "jobs.yaml", &manifests)?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lab.tasks("batch")?.len(), 4);
    assert_eq!(lab.tasks("everywhere")?.len(), 2);
    let again = manifests.replace("completions: 4", "completions: 2");
    lab.apply(tmp.path(), "jobs2.yaml", &again)?;
    let old: BTreeSet<String> = done
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    wait_for(Duration::from_secs(60), "batch run again", || {
        let t = lab.tasks("batch")?;
        let new_done = t
            .iter()
            .filter(|t| state(t) == "complete" && !old.contains(t["id"].as_str().unwrap()))
            .count();
        Ok((new_done == 2 && t.len() == 2).then_some(()))
    })?;

    // Without --detach, rctl apply waits for a job to complete, and says when it failed.
    let quick = "kind: Service\nname: quick\nimage: busybox:latest\nmode: replicated-job\n\
                 completions: 2\nparallelism: 2\ncommand: [\"true\"]\n";
    std::fs::write(tmp.path().join("quick.yaml"), quick)?;
    let quick_file = tmp.path().join("quick.yaml");
    lab.rctl(&["apply", "-f", quick_file.to_str().unwrap()])?;
    let tasks = lab.tasks("quick")?;
    assert_eq!(tasks.iter().filter(|t| state(t) == "complete").count(), 2);
    let bad = "kind: Service\nname: bad\nimage: busybox:latest\nmode: replicated-job\n\
               restart: {condition: none}\ncommand: [\"false\"]\n";
    std::fs::write(tmp.path().join("bad.yaml"), bad)?;
    let bad_file = tmp.path().join("bad.yaml");
    let err = lab
        .rctl(&["apply", "-f", bad_file.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("job bad failed: failed: 0/1 completed, 0 running, 1 failed"),
        "{err}"
    );

    // rctl run is a job: its output, then the job shows complete.
    let out = lab.rctl(&["run", "--name", "once", "busybox:latest", "echo", "hello"])?;
    assert_eq!(out, "hello\n");
    let ps = lab.rctl(&["ps", "once"])?;
    assert!(ps.contains("once: job complete: 1/1 completed"), "{ps}");
    lab.rctl(&["rm", "once"])?;

    // rctl run --rm whose client is killed mid-run: the cluster removes the job itself once
    // it has ended and its grace has passed (model::job::AUTO_REMOVE_GRACE_MS).
    let mut client = std::process::Command::new(rudder_tests::bin("rctl"))
        .arg("--context")
        .arg(&lab.lab.context_path)
        .args([
            "run",
            "--rm",
            "--name",
            "orphan",
            "busybox:latest",
            "sleep",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    wait_for(Duration::from_secs(30), "orphan started", || {
        Ok(lab
            .tasks("orphan")
            .ok()
            .filter(|t| !t.is_empty())
            .map(|_| ()))
    })?;
    client.kill()?;
    client.wait()?;
    wait_for(
        Duration::from_secs(40),
        "orphan removed by the cluster",
        || {
            let ls = lab.rctl(&["get", "services"])?;
            Ok((!ls.contains("orphan")).then_some(()))
        },
    )?;
    Ok(())
}

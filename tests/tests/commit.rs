//! `rctl commit` on a real lab (two hosts, the controller on h1): a busybox container on h1 is
//! changed (a file written, one of the image's files deleted, a directory made) and committed;
//! a service from the new image runs on h2 and sees exactly those changes with the rest of
//! busybox intact. That container is changed again — a directory of the first commit deleted
//! and made anew (an opaque directory) — and committed from h2 (relayed host to host); a third
//! service on h1 sees the two layers stacked, with the config that commit's `--change`s set.
//! The first commit pauses the running container (the default) and thaws it after; the second
//! leaves it running (`--pause=false`). Refusals: an unknown task, a bad reference, a change
//! that is not config and a finished task whose container is gone, each with its reason,
//! before anything is stored.

use std::time::Duration;

use anyhow::Context;
use rudder_tests::{lab_with_busybox, pinned_service, running_on, running_tasks, sh, wait_for};

#[test]
fn commit_makes_a_container_an_image_other_hosts_run() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("cm", 2)?;
    lab.apply(
        tmp.path(),
        "src.yaml",
        &format!(
            "{}---\nkind: Service\nname: done\nimage: busybox:latest\n\
             command: [\"/bin/sh\", \"-c\", \"echo bye\"]\nrestart:\n  condition: none\n",
            pinned_service("src", "busybox:latest", "h1")
        ),
    )?;
    let src = running_on(&lab, "src", "h1")?;
    sh(
        &lab,
        &src,
        "echo committed > /etc/motd && rm /bin/vi && mkdir -p /opt/a/b && echo 1 > /opt/a/old",
    )?;

    // ---- refusals ----
    let err = lab
        .rctl(&["commit", "nosuchtask", "box:v2"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no task named \"nosuchtask\""), "{err}");
    let err = lab
        .rctl(&["commit", &src, "Bad:Name"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid reference \"Bad:Name\""), "{err}");
    let err = lab
        .rctl(&["commit", "--change", "RUN rm -rf /", &src, "box:v2"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--change \"RUN rm -rf /\": RUN cannot be applied by a commit"),
        "{err}"
    );
    let done = wait_for(Duration::from_secs(60), "done complete", || {
        let t = lab.tasks("done")?;
        Ok(t.iter()
            .find(|t| t["state"] == "complete")
            .and_then(|t| t["name"].as_str().map(str::to_string)))
    })?;
    let err = lab
        .rctl(&["commit", &done, "box:v2"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("its container is gone"), "{err}");

    // ---- commit on h1, run on h2 ----
    let out = lab.rctl(&["commit", &src, "box:v2"])?;
    assert!(out.starts_with("box:v2 sha256:"), "{out}");
    assert!(out.contains("1 deleted"), "{out}");
    lab.apply(
        tmp.path(),
        "copy.yaml",
        &pinned_service("copy", "box:v2", "h2"),
    )?;
    let copy = running_on(&lab, "copy", "h2")?;
    assert_eq!(sh(&lab, &copy, "cat /etc/motd")?, "committed\n");
    assert_eq!(sh(&lab, &copy, "cat /opt/a/old")?, "1\n");
    assert_eq!(
        sh(&lab, &copy, "test -d /opt/a/b && echo dir")?.trim(),
        "dir"
    );
    let err = sh(&lab, &copy, "ls /bin/vi").unwrap_err().to_string();
    assert!(err.contains("No such file"), "{err}");
    // The rest of busybox, and the image's config (PATH from the import), are intact.
    assert_eq!(
        sh(&lab, &copy, "echo $((6*7)) | grep 4 | wc -l; echo $PATH")?,
        "1\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
    assert_eq!(sh(&lab, &copy, "ls /bin/less /bin/sed")?.lines().count(), 2);
    // The source is untouched by its commit, and running again after its pause.
    assert_eq!(sh(&lab, &src, "cat /etc/motd")?, "committed\n");
    let log = std::fs::read_to_string(lab.host("h1").agent_log())?;
    assert!(log.contains("paused=true"), "h1's agent log: {log}");

    // ---- a second layer, committed on h2: a directory deleted and made anew ----
    sh(
        &lab,
        &copy,
        "rm -rf /opt/a && mkdir /opt/a && echo 2 > /opt/a/new",
    )?;
    let out = lab.rctl(&[
        "commit",
        "--pause=false",
        "-c",
        "CMD [\"cat\", \"/opt/a/new\"]",
        "--change",
        "ENV STAGE=three",
        "-m",
        "second layer",
        "-a",
        "ops <ops@example.com>",
        &copy,
        "box:v3",
    ])?;
    assert!(out.starts_with("box:v3 sha256:"), "{out}");
    let log = std::fs::read_to_string(lab.host("h2").agent_log())?;
    assert!(log.contains("paused=false"), "h2's agent log: {log}");
    // The changed command runs when none is given.
    assert_eq!(lab.rctl(&["run", "--rm", "--node", "h1", "box:v3"])?, "2\n");
    // What the commit said is in the image: `image inspect` and `image history`.
    let v: serde_json::Value = serde_json::from_str(&lab.rctl(&["image", "inspect", "box:v3"])?)?;
    assert_eq!(v["author"], "ops <ops@example.com>");
    assert_eq!(v["config"]["Cmd"], serde_json::json!(["cat", "/opt/a/new"]));
    assert!(
        v["config"]["Env"].to_string().contains("STAGE=three"),
        "{v}"
    );
    assert_eq!(v["layers"].as_array().map(Vec::len), Some(3), "{v}");
    let history = lab.rctl(&["image", "history", "box:v3"])?;
    let newest = history.lines().nth(1).context("a history row")?;
    assert!(
        newest.contains("rctl commit") && newest.contains("second layer"),
        "{history}"
    );
    let e = lab
        .rctl(&["image", "inspect", "box:nope"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("image box:nope not found in the cluster registry"),
        "{e}"
    );
    lab.apply(
        tmp.path(),
        "third.yaml",
        &pinned_service("third", "box:v3", "h1"),
    )?;
    let third = running_on(&lab, "third", "h1")?;
    assert_eq!(sh(&lab, &third, "ls /opt/a")?, "new\n");
    assert_eq!(
        sh(&lab, &third, "cat /opt/a/new /etc/motd")?,
        "2\ncommitted\n"
    );
    assert!(sh(&lab, &third, "test -e /bin/vi").is_err());
    assert_eq!(sh(&lab, &third, "echo $STAGE")?, "three\n");
    assert_eq!(sh(&lab, &third, "echo ok")?, "ok\n");
    let tasks = lab.tasks("third")?;
    let t = running_tasks(&tasks);
    let task = t.first().context("third runs")?;
    assert_eq!(task["node"], "h1");
    Ok(())
}

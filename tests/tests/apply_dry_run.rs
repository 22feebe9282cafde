//! `rctl apply --dry-run` and `rctl diff` on a real one-host lab: a running service changed in
//! image and replicas is reported as updated with those two fields and nothing changes (same
//! task, same image); `diff` exits 1 then, 0 once the file matches; a compose file previews
//! its stack without deploying it. `rctl completion bash` and `rctl man` print something
//! usable.

use std::process::Command;

use anyhow::Context;
use rudder_tests::{bin, lab_with_busybox, running_tasks, LabGuard};

fn manifest(image: &str, replicas: u32) -> String {
    format!(
        "kind: Service\nname: web\nimage: {image}\nreplicas: {replicas}\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"1000000\"]\n"
    )
}

/// `rctl diff -f FILE`: its exit code and stdout.
fn diff(lab: &LabGuard, file: &str) -> anyhow::Result<(Option<i32>, String)> {
    let out = Command::new(bin("rctl"))
        .arg("--context")
        .arg(&lab.lab.context_path)
        .args(["diff", "-f", file])
        .output()
        .context("run rctl diff")?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// The ids and images of `web`'s running tasks.
fn web_tasks(lab: &LabGuard) -> anyhow::Result<Vec<(String, String)>> {
    Ok(running_tasks(&lab.tasks("web")?)
        .iter()
        .map(|t| (t["id"].to_string(), t["image"].to_string()))
        .collect())
}

#[test]
fn dry_run_and_diff_report_changes_and_change_nothing() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("dr", 1)?;
    let file = tmp.path().join("web.yaml");
    let path = file.to_str().context("utf-8 path")?;
    std::fs::write(&file, manifest("busybox:latest", 1))?;
    lab.rctl(&["apply", "-f", path])?;
    let before = web_tasks(&lab)?;
    assert_eq!(before.len(), 1, "{before:?}");

    // Nothing differs yet.
    let (code, out) = diff(&lab, path)?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("service/web unchanged"), "{out}");

    // A new image and replica count: both ways say so, field by field.
    std::fs::write(&file, manifest("busybox:v2", 3))?;
    let dry = lab.rctl(&["apply", "--dry-run", "-f", path])?;
    let (code, out) = diff(&lab, path)?;
    assert_eq!(code, Some(1), "{out}");
    for text in [&dry, &out] {
        for want in [
            "service/web updated",
            r#"  image: "busybox:latest" -> "busybox:v2""#,
            "  replicas: 1 -> 3",
        ] {
            assert!(text.contains(want), "{want:?} in:\n{text}");
        }
    }
    // And nothing changed: the same one task, on the old image, and `rctl ps` agrees.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(web_tasks(&lab)?, before);
    let ps = lab.rctl(&["ps", "web"])?;
    assert!(!ps.contains("busybox:v2"), "{ps}");

    // A compose file: its stack's objects are previewed, the stack is not deployed.
    let compose = tmp.path().join("compose.yaml");
    std::fs::write(
        &compose,
        "name: drystack\nservices:\n  api:\n    image: busybox:latest\n    command: [\"sleep\", \"1000\"]\n",
    )?;
    let out = lab.rctl(&[
        "apply",
        "-f",
        compose.to_str().context("utf-8 path")?,
        "--dry-run",
    ])?;
    assert!(out.contains("service/drystack-api created"), "{out}");
    let stacks = lab.rctl(&["stack", "ls"])?;
    assert!(!stacks.contains("drystack"), "{stacks}");
    assert!(lab.tasks("drystack-api").map_or(true, |t| t.is_empty()));
    // Deployed, then a version that changes one service and drops the other: the preview
    // names the removal too, and `diff` of a compose file exits 1.
    std::fs::write(
        &compose,
        "name: drystack\nservices:\n  api:\n    image: busybox:latest\n    command: [\"sleep\", \"1000\"]\n\
         \x20 worker:\n    image: busybox:latest\n    command: [\"sleep\", \"1000\"]\n",
    )?;
    let compose_path = compose.to_str().context("utf-8 path")?;
    lab.rctl(&["apply", "--detach", "-f", compose_path])?;
    std::fs::write(
        &compose,
        "name: drystack\nservices:\n  api:\n    image: busybox:v3\n    command: [\"sleep\", \"1000\"]\n",
    )?;
    let (code, out) = diff(&lab, compose_path)?;
    assert_eq!(code, Some(1), "{out}");
    for want in [
        "service/drystack-api updated",
        r#"  image: "busybox:latest" -> "busybox:v3""#,
        "service/drystack-worker removed",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
    let services = lab.rctl(&["stack", "services", "drystack"])?;
    assert!(services.contains("drystack-worker"), "{services}");

    // Completions and the man page.
    let bash = lab.rctl(&["completion", "bash"])?;
    assert!(bash.contains("apply") && bash.contains("rctl"), "{bash}");
    let man = lab.rctl(&["man"])?;
    assert!(man.contains(".TH") && man.contains("apply"), "{man}");
    Ok(())
}

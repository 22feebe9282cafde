//! Docker's default seccomp profile on a real lab: a task's processes (and `rctl exec`'s) run
//! filtered (`Seccomp: 2`) and cannot make a user namespace; a RUN step likewise; a service
//! with `security_opt: [seccomp=unconfined]` runs without the filter.

use rudder_tests::{lab_with_busybox, pinned_service, running_task};

#[test]
fn tasks_and_run_steps_are_confined() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("sc", 1)?;
    let host = lab.lab.hosts[0].name.clone();
    lab.apply(
        tmp.path(),
        "box.yaml",
        &pinned_service("box", "busybox:latest", &host),
    )?;
    let mut free = pinned_service("free", "busybox:latest", &host);
    free.push_str("security_opt: [\"seccomp=unconfined\"]\n");
    lab.apply(tmp.path(), "free.yaml", &free)?;
    let boxed = running_task(&lab, "box")?;
    let boxed = boxed["name"].as_str().unwrap();
    let free = running_task(&lab, "free")?;
    let free = free["name"].as_str().unwrap();
    let mode =
        |task: &str| lab.rctl(&["exec", task, "--", "grep", "Seccomp:", "/proc/self/status"]);

    assert_eq!(mode(boxed)?.split_whitespace().nth(1), Some("2"));
    let e = lab
        .rctl(&["exec", boxed, "--", "unshare", "-U", "-r", "true"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unshare"), "{e}");
    // The opt-out runs as before this profile existed.
    assert_eq!(mode(free)?.split_whitespace().nth(1), Some("0"));
    lab.rctl(&["exec", free, "--", "unshare", "-U", "-r", "true"])?;

    // A RUN step.
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx)?;
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:latest\n\
         RUN echo \"run $(grep Seccomp: /proc/self/status)\"; \
             if unshare -U -r true; then echo run-unshare-ok; else echo run-unshare-refused; fi\n",
    )?;
    let out = lab.rctl(&["build", "-t", "sc:1", ctx.to_str().unwrap()])?;
    let seccomp = out
        .lines()
        .find_map(|l| l.split("run Seccomp:").nth(1))
        .map(str::trim);
    assert_eq!(seccomp, Some("2"), "{out}");
    assert!(out.contains("run-unshare-refused"), "{out}");
    Ok(())
}

//! Resource limits over a real lab: cpu, memory and pids limits land in the container's cgroups,
//! and a container killed by the OOM killer is reported as such.

use std::time::Duration;

use rudder_tests::{lab_with_busybox, running_tasks, wait_for};

#[test]
fn limits_reach_cgroups_and_oom_is_reported() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("li", 1)?;

    lab.apply(
        tmp.path(),
        "lim.yaml",
        "kind: Service\nname: lim\nimage: busybox:latest\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"100000\"]\n\
         resources:\n  limits: {cpus: 0.5, memory: 64M, pids: 50}\n",
    )?;
    let t = wait_for(Duration::from_secs(30), "lim running", || {
        let t = lab.tasks("lim")?;
        Ok(running_tasks(&t).first().map(|t| (*t).clone()))
    })?;
    let host = lab.host("h1");
    let cg = format!("{}/{}", host.cgroup_parent, t["id"].as_str().unwrap());
    let read = |p: String| std::fs::read_to_string(&p).map(|s| s.trim().to_string());
    // cgroup v1 hierarchy here; a pure v2 host has the same numbers in cpu.max etc.
    if std::path::Path::new("/sys/fs/cgroup/memory").exists() {
        assert_eq!(
            read(format!("/sys/fs/cgroup/memory{cg}/memory.limit_in_bytes"))?,
            "67108864"
        );
        assert_eq!(read(format!("/sys/fs/cgroup/pids{cg}/pids.max"))?, "50");
        assert_eq!(
            read(format!("/sys/fs/cgroup/cpu{cg}/cpu.cfs_quota_us"))?,
            "50000"
        );
        assert_eq!(
            read(format!("/sys/fs/cgroup/cpu{cg}/cpu.cfs_period_us"))?,
            "100000"
        );
    } else {
        assert_eq!(read(format!("/sys/fs/cgroup{cg}/memory.max"))?, "67108864");
        assert_eq!(read(format!("/sys/fs/cgroup{cg}/pids.max"))?, "50");
        assert_eq!(read(format!("/sys/fs/cgroup{cg}/cpu.max"))?, "50000 100000");
    }

    // tail keeps a newline-free stream in memory until the 32 MiB limit is hit.
    lab.apply(
        tmp.path(),
        "oom.yaml",
        "kind: Service\nname: oom\nimage: busybox:latest\n\
         command: [\"/bin/sh\", \"-c\", \"head -c 500m /dev/zero | tail\"]\n\
         resources:\n  limits: {memory: 32M}\nrestart: {condition: none}\n",
    )?;
    let t = wait_for(Duration::from_secs(60), "oom task failed", || {
        let t = lab.tasks("oom")?;
        Ok(t.into_iter().find(|t| t["state"] == "failed"))
    })?;
    let err = t["error"].as_str().unwrap();
    assert!(err.contains("OOM") && err.contains("32 MiB"), "{t}");
    assert_eq!(t["message"], "out of memory");
    Ok(())
}

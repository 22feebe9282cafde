//! A read-only bind mount is read-only all the way down (audit L1): with `ro` alone the
//! runtime makes only the top mount read-only, so a submount of the bound directory (in the
//! audit's example `/proc` under a bound `/`) stayed writable from the container.

use std::process::Command;

use rudder_tests::{exec, lab_with_busybox, running_task};

/// Unmounts the test's tmpfs, also when the test fails.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn l1_a_readonly_bind_is_readonly_below_too() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("l1", 1)?;
    let host = tmp.path().join("host");
    let sub = host.join("sub");
    std::fs::create_dir_all(&sub)?;
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&sub)
        .status()?;
    anyhow::ensure!(ok.success(), "mount a tmpfs for the test");
    let _mounted = Mounted(sub.clone());
    let yaml = format!(
        "kind: Service\nname: ro\nimage: busybox:latest\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"1000000\"]\n\
         mounts: [{{type: bind, source: {}, target: /host, readonly: true}}]\n",
        host.display()
    );
    lab.apply(tmp.path(), "ro.yaml", &yaml)?;
    let task = running_task(&lab, "ro")?;
    let (top, out) = exec(&lab, &task, &["touch", "/host/x"])?;
    assert!(!top, "the bound directory is read-only: {out}");
    let (below, out) = exec(&lab, &task, &["touch", "/host/sub/x"])?;
    assert!(!below, "and so is a mount below it: {out}");
    assert!(out.contains("Read-only"), "{out}");
    assert!(!sub.join("x").exists());
    Ok(())
}

//! Volume copy-up is crash-safe (audit M7) on a real lab: a copy left with the fill marker (an
//! agent or host that died mid-fill) is not taken as the volume's data: the next task's start
//! empties it and fills it again from its image.

use rudder_tests::{lab_with_busybox, pinned_service, running_task};

#[test]
fn a_half_filled_volume_is_filled_again() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("vf", 1)?;
    let host = lab.lab.hosts[0].clone();
    // What a fill interrupted by a crash leaves: part of the copy, and the marker.
    let vol = host.data_dir.join("volumes").join("halfvol");
    std::fs::create_dir_all(vol.join("_data"))?;
    std::fs::write(vol.join("_data").join("half-copied"), "partial\n")?;
    std::fs::write(vol.join(".filling"), "")?;

    let mut svc = pinned_service("fill", "busybox:latest", &host.name);
    svc.push_str("mounts: [{type: volume, source: halfvol, target: /etc}]\n");
    lab.apply(tmp.path(), "fill.yaml", &svc)?;
    let task = running_task(&lab, "fill")?;
    let name = task["name"].as_str().unwrap();
    let ls = lab.rctl(&["exec", name, "--", "ls", "/etc"])?;
    assert!(ls.lines().any(|l| l == "passwd"), "{ls}");
    assert!(!ls.contains("half-copied"), "{ls}");
    assert!(!vol.join(".filling").exists());
    Ok(())
}

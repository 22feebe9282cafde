//! Volumes and mounts over a real lab: data in a named volume outlives its service and comes
//! back when the service is applied again on the same host; a read-only bind mount is readable
//! and not writable; a tmpfs has its size; a bind of a missing host path rejects the task with
//! the reason (and disturbs nothing else); a volume in use cannot be removed; `rctl volume`
//! creates, lists, inspects and removes, and a removed volume's copy leaves its host. An empty
//! volume is filled from the image at its target (links and modes kept), unless `nocopy`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rudder_tests::{exec, lab_with_busybox, running_task, wait_for, LabGuard};

/// `rctl volume ls -o json`, by name.
fn volumes(lab: &LabGuard) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(serde_json::from_str(
        &lab.rctl(&["volume", "ls", "-o", "json"])?,
    )?)
}

fn keeper(bind_src: &Path) -> String {
    format!(
        "kind: Service\nname: keeper\nimage: busybox:latest\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"1000000\"]\n\
         placement:\n  constraints: [\"node.hostname==h2\"]\n\
         mounts:\n\
         \x20 - type: volume\n    source: data\n    target: /data\n\
         \x20 - {{type: bind, source: {}, target: /in, readonly: true}}\n\
         \x20 - {{type: tmpfs, target: /scratch, tmpfs_size: 16M}}\n",
        bind_src.display()
    )
}

#[test]
fn volumes_binds_and_tmpfs() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("vo", 2)?;
    let h2_data = lab.host("h2").data_dir.clone();
    let bind_src = tmp.path().join("bindsrc");
    std::fs::create_dir_all(&bind_src)?;
    std::fs::write(bind_src.join("hello.txt"), "from the host\n")?;

    // An explicit volume, and one the service declares by mounting it.
    let out = lab.rctl(&["volume", "create", "shared", "--label", "team=a"])?;
    assert!(out.contains("volume/shared created"), "{out}");
    let e = lab
        .rctl(&["volume", "create", "shared"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("volume \"shared\" already exists"), "{e}");
    let out = lab.apply(tmp.path(), "keeper.yaml", &keeper(&bind_src))?;
    assert!(out.contains("volume/data created"), "{out}");
    assert!(out.contains("service/keeper created"), "{out}");
    let t = running_task(&lab, "keeper")?;
    assert_eq!(t["node"], "h2");

    // Named volume: written inside, lands in the host's copy.
    let (ok, out) = exec(&lab, &t, &["sh", "-c", "echo persisted > /data/marker"])?;
    assert!(ok, "{out}");
    let marker = h2_data.join("volumes/data/_data/marker");
    assert_eq!(std::fs::read_to_string(&marker)?, "persisted\n");

    // Read-only bind: readable, not writable.
    let (ok, out) = exec(&lab, &t, &["cat", "/in/hello.txt"])?;
    assert!(ok && out.trim() == "from the host", "{out}");
    let (ok, out) = exec(&lab, &t, &["touch", "/in/new"])?;
    assert!(!ok && out.contains("Read-only file system"), "{out}");
    assert!(!bind_src.join("new").exists());

    // tmpfs of 16 MiB.
    let (ok, mounts) = exec(&lab, &t, &["cat", "/proc/mounts"])?;
    assert!(ok, "{mounts}");
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some("/scratch"))
        .with_context(|| format!("no /scratch mount: {mounts}"))?;
    assert!(
        line.starts_with("tmpfs /scratch tmpfs ") && line.contains("size=16384k"),
        "{line}"
    );
    let (ok, df) = exec(&lab, &t, &["df", "-k", "/scratch"])?;
    assert!(ok && df.contains("16384"), "{df}");

    // The listing: h2 holds a copy, keeper mounts it; `shared` is unused and nowhere yet.
    let listed = wait_for(Duration::from_secs(20), "h2's copy reported", || {
        let v = volumes(&lab)?;
        let data = v.iter().find(|v| v["name"] == "data").cloned();
        Ok(data.filter(|d| d["hosts"] == serde_json::json!(["h2"])))
    })?;
    assert_eq!(listed["services"], serde_json::json!(["keeper"]));
    let shared: serde_json::Value =
        serde_json::from_str(&lab.rctl(&["volume", "inspect", "shared"])?)?;
    assert_eq!(shared["labels"], serde_json::json!({"team": "a"}));
    assert_eq!(shared["driver"], "local");
    assert_eq!(shared["hosts"], serde_json::json!([]));
    let table = lab.rctl(&["volume", "ls"])?;
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["data", "local", "h2", "keeper", "-"]),
        "{table}"
    );

    // In use: refused, naming the service.
    let e = lab.rctl(&["volume", "rm", "data"]).unwrap_err().to_string();
    assert!(
        e.contains("volume \"data\" is in use by service(s) keeper"),
        "{e}"
    );

    // A bind of a missing host path: that task is rejected with the reason; keeper runs on.
    let missing = format!("/nope-{}", std::process::id());
    let bad = format!(
        "kind: Service\nname: badbind\nimage: busybox:latest\n\
         command: [\"/bin/sleep\", \"1000000\"]\n\
         placement:\n  constraints: [\"node.hostname==h2\"]\n\
         mounts:\n  - {{type: bind, source: {missing}, target: /x}}\n"
    );
    let path = tmp.path().join("bad.yaml");
    std::fs::write(&path, &bad)?;
    let e = lab
        .rctl(&["apply", "--timeout", "60", "-f", path.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    let want = format!("bind mount source {missing} does not exist on h2");
    assert!(e.contains(&want), "{e}");
    let rejected = lab.tasks("badbind")?;
    assert!(
        rejected
            .iter()
            .any(|t| t["state"] == "rejected" && t["error"].as_str().unwrap().contains(&want)),
        "{rejected:?}"
    );
    let still = running_task(&lab, "keeper")?;
    assert_eq!(still["id"], t["id"], "keeper undisturbed");
    lab.rctl(&["rm", "badbind"])?;

    // Empty volumes get the image's files at their targets, as in Docker: busybox's /bin (its
    // links kept; the command runs from the copy), /tmp with its mode; `nocopy` stays empty.
    let filler = "kind: Service\nname: filler\nimage: busybox:latest\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"1000000\"]\n\
         placement:\n  constraints: [\"node.hostname==h1\"]\n\
         mounts:\n\
         \x20 - {source: tools, target: /bin, readonly: true}\n\
         \x20 - {source: scratchvol, target: /tmp}\n\
         \x20 - {source: blank, target: /etc, nocopy: true}\n";
    lab.apply(tmp.path(), "filler.yaml", filler)?;
    let f = running_task(&lab, "filler")?;
    let h1_volumes = lab.host("h1").data_dir.join("volumes");
    let tools = h1_volumes.join("tools/_data");
    assert!(tools.join("busybox").is_file());
    assert_eq!(std::fs::read_link(tools.join("sh"))?, Path::new("busybox"));
    let tmp_mode = std::fs::metadata(h1_volumes.join("scratchvol/_data"))?
        .permissions()
        .mode();
    assert_eq!(tmp_mode & 0o7777, 0o1777);
    assert_eq!(
        std::fs::read_dir(h1_volumes.join("blank/_data"))?.count(),
        0
    );
    let (ok, out) = exec(&lab, &f, &["sh", "-c", "ls -A /etc; echo x > /bin/new"])?;
    assert!(!ok && out.contains("Read-only file system"), "{out}");
    assert!(!out.contains("passwd"), "{out}");
    // A filled volume is not filled again: what a task changed there stays.
    std::fs::write(h1_volumes.join("scratchvol/_data/mine"), "kept")?;
    std::fs::remove_file(tools.join("vi"))?;
    lab.rctl(&["rm", "filler"])?;
    let f_dir = lab
        .host("h1")
        .data_dir
        .join("containers")
        .join(f["id"].as_str().unwrap());
    wait_for(Duration::from_secs(60), "filler's container gone", || {
        Ok((!f_dir.exists()).then_some(()))
    })?;
    lab.apply(tmp.path(), "filler.yaml", filler)?;
    let f2 = running_task(&lab, "filler")?;
    let (ok, out) = exec(&lab, &f2, &["sh", "-c", "cat /tmp/mine; ls /bin/vi"])?;
    assert!(!ok && out.starts_with("kept"), "{out}");
    lab.rctl(&["rm", "filler"])?;
    for v in ["tools", "scratchvol", "blank"] {
        wait_for(Duration::from_secs(30), "filler's volumes unused", || {
            Ok(lab.rctl(&["volume", "rm", v]).ok())
        })?;
    }

    // Remove the service: the copy stays; apply it again on h2: the data is back.
    lab.rctl(&["rm", "keeper"])?;
    let old_dir = h2_data.join("containers").join(t["id"].as_str().unwrap());
    wait_for(Duration::from_secs(60), "keeper's container gone", || {
        Ok((!old_dir.exists()).then_some(()))
    })?;
    assert_eq!(std::fs::read_to_string(&marker)?, "persisted\n");
    let out = lab.apply(tmp.path(), "keeper.yaml", &keeper(&bind_src))?;
    assert!(!out.contains("volume/"), "the volume exists already: {out}");
    let t2 = running_task(&lab, "keeper")?;
    assert_ne!(t2["id"], t["id"]);
    let (ok, out) = exec(&lab, &t2, &["cat", "/data/marker"])?;
    assert!(ok && out.trim() == "persisted", "{out}");

    // Unused volumes go: from the store, and from the hosts.
    lab.rctl(&["volume", "rm", "shared"])?;
    lab.rctl(&["rm", "keeper"])?;
    wait_for(Duration::from_secs(30), "data no longer in use", || {
        Ok(lab.rctl(&["volume", "rm", "data"]).ok())
    })?;
    let names: Vec<serde_json::Value> = volumes(&lab)?.iter().map(|v| v["name"].clone()).collect();
    assert!(names.is_empty(), "{names:?}");
    let copy = h2_data.join("volumes/data");
    wait_for(Duration::from_secs(60), "h2's copy deleted", || {
        Ok((!copy.exists()).then_some(()))
    })?;
    let e = lab
        .rctl(&["volume", "inspect", "data"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
    Ok(())
}

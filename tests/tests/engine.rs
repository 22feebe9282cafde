//! Into running containers on a real lab (two hosts; the controller on h1, so every call to
//! h2's task is relayed host to host): `rctl exec` with and without stdin, on a terminal, with
//! the command's exit code as rctl's; exec into a finished task refused without disturbing
//! anything; `rctl cp` of a file and a directory both ways with their bytes checked, symlinks
//! and `..` that point out of the container never reaching the host, a missing path refused
//! with nothing written; `rctl inspect` showing the container's pids and the task's address.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::Context;
use rudder_tests::{bin, lab_with_busybox, running_tasks, wait_for, LabGuard};

/// `rctl ARGS` with `stdin` fed to it (then closed); the whole outcome, exit code included.
fn rctl_io(lab: &LabGuard, args: &[&str], stdin: &[u8]) -> anyhow::Result<Output> {
    let mut child = Command::new(bin("rctl"))
        .arg("--context")
        .arg(&lab.lab.context_path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut pipe = child.stdin.take().context("stdin")?;
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&data);
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs `sh -c script` in `task`; its stdout, which must come with exit code 0.
fn sh(lab: &LabGuard, task: &str, script: &str) -> anyhow::Result<String> {
    lab.rctl(&["exec", task, "--", "sh", "-c", script])
}

#[test]
fn exec_cp_and_inspect_across_hosts() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("en", 2)?;
    lab.apply(
        tmp.path(),
        "box.yaml",
        "kind: Network\nname: enet\n---\n\
         kind: Service\nname: box\nimage: busybox:latest\nreplicas: 2\nnetworks: [enet]\n\
         stop_grace_period: 1\nplacement:\n  max_replicas_per_node: 1\n\
         command: [\"/bin/sleep\", \"1000000\"]\n---\n\
         kind: Service\nname: done\nimage: busybox:latest\n\
         command: [\"/bin/sh\", \"-c\", \"echo bye\"]\nrestart:\n  condition: none\n",
    )?;
    let boxes = wait_for(Duration::from_secs(60), "box running on both hosts", || {
        let t = lab.tasks("box")?;
        let r: Vec<serde_json::Value> = running_tasks(&t).into_iter().cloned().collect();
        Ok((r.len() == 2).then_some(r))
    })?;
    let done = wait_for(Duration::from_secs(60), "done complete", || {
        let t = lab.tasks("done")?;
        Ok(t.iter().find(|t| t["state"] == "complete").cloned())
    })?;
    let on = |host: &str| -> anyhow::Result<serde_json::Value> {
        boxes
            .iter()
            .find(|t| t["node"] == host)
            .cloned()
            .with_context(|| format!("a box task on {host}"))
    };
    let (b1, b2) = (on("h1")?, on("h2")?);
    let t2 = b2["name"].as_str().context("name")?.to_string();
    let t1 = b1["name"].as_str().context("name")?.to_string();

    // ---- exec ----
    // On both hosts, by name and by id prefix.
    assert_eq!(sh(&lab, &t1, "echo $((6*7))")?.trim(), "42");
    let prefix = &b2["id"].as_str().context("id")?[..10];
    assert_eq!(
        lab.rctl(&["exec", prefix, "--", "echo", "hi"])?.trim(),
        "hi"
    );
    // Stdout and stderr apart; the exit code is rctl's.
    let out = rctl_io(
        &lab,
        &[
            "exec",
            &t2,
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        b"",
    )?;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    // --env over the task's environment, --workdir over its directory; a bad entry is
    // refused by name before anything runs.
    let out = lab.rctl(&[
        "exec",
        "-e",
        "FOO=bar baz",
        "-w",
        "/tmp",
        &t2,
        "--",
        "sh",
        "-c",
        "echo \"$FOO|$PWD\"",
    ])?;
    assert_eq!(out.trim(), "bar baz|/tmp");
    let out = rctl_io(&lab, &["exec", "-w", "tmp", &t2, "--", "true"], b"")?;
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("--workdir"),
        "{}",
        text(&out.stderr)
    );
    // Stdin, to its end.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let out = rctl_io(&lab, &["exec", "-i", &t2, "--", "cat"], &big)?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stdout == big, "stdin came back whole through cat");
    let out = rctl_io(&lab, &["exec", "-i", &t2, "--", "wc", "-l"], b"a\nb\nc\n")?;
    assert_eq!(text(&out.stdout).trim(), "3");
    // Without -i the command's stdin is empty.
    let out = rctl_io(&lab, &["exec", &t2, "--", "wc", "-c"], b"ignored")?;
    assert_eq!(text(&out.stdout).trim(), "0");
    // On a terminal (the container's own pty: a controlling terminal, default size here,
    // where rctl's stdin is no terminal; runc sizes it just after the command starts).
    let out = rctl_io(
        &lab,
        &[
            "exec",
            "-t",
            &t2,
            "--",
            "sh",
            "-c",
            "tty; sleep 1; stty size; exec 3</dev/tty && exit 4",
        ],
        b"",
    )?;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stdout));
    let o = text(&out.stdout);
    assert!(o.contains("/dev/pts/") && o.contains("24 80"), "{o:?}");
    let out = rctl_io(
        &lab,
        &["exec", "-it", &t2, "--", "sh"],
        b"echo sum=$((2+3))\nexit 7\n",
    )?;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("sum=5"), "{}", text(&out.stdout));
    // A command that cannot start is the runtime's exit code, not a hang.
    let out = rctl_io(&lab, &["exec", &t2, "--", "/no/such/binary"], b"")?;
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "{:?}",
        out.status
    );
    // Into a finished task: refused by name and state; the running ones are untouched.
    let done_name = done["name"].as_str().context("name")?;
    let err = lab
        .rctl(&["exec", done_name, "--", "true"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "task {done_name} is not running (state: complete)"
        )),
        "{err}"
    );
    let err = lab.rctl(&["exec", "nosuchtask", "--", "true"]).unwrap_err();
    assert!(err.to_string().contains("no task named"), "{err}");
    let now = lab.tasks("box")?;
    let ids = |v: &[&serde_json::Value]| {
        let mut ids: Vec<String> = v.iter().map(|t| t["id"].to_string()).collect();
        ids.sort();
        ids
    };
    assert_eq!(
        ids(&running_tasks(&now)),
        ids(&boxes.iter().collect::<Vec<_>>())
    );

    // ---- cp ----
    let local = tmp.path().join("local");
    std::fs::create_dir_all(local.join("tree/sub/deeper"))?;
    std::fs::write(local.join("tree/a.txt"), b"alpha\n")?;
    std::fs::write(local.join("tree/sub/deeper/big.bin"), &big)?;
    std::os::unix::fs::symlink("a.txt", local.join("tree/link"))?;
    std::fs::write(local.join("one.txt"), b"just one file\n")?;
    // A directory in: into an existing directory, under its own name.
    lab.rctl(&["cp", path(&local.join("tree")), &format!("{t2}:/tmp")])?;
    assert_eq!(sh(&lab, &t2, "cat /tmp/tree/a.txt")?, "alpha\n");
    assert_eq!(sh(&lab, &t2, "readlink /tmp/tree/link")?.trim(), "a.txt");
    assert_eq!(
        sh(&lab, &t2, "wc -c < /tmp/tree/sub/deeper/big.bin")?.trim(),
        big.len().to_string()
    );
    // A file in, under a new name.
    lab.rctl(&[
        "cp",
        path(&local.join("one.txt")),
        &format!("{t2}:/tmp/renamed.txt"),
    ])?;
    assert_eq!(sh(&lab, &t2, "cat /tmp/renamed.txt")?, "just one file\n");
    // Made in the container, out again: a directory and a file, byte for byte.
    sh(
        &lab,
        &t2,
        "mkdir -p /data/x && echo made-inside > /data/x/m.txt && ln -s m.txt /data/x/l",
    )?;
    let back = tmp.path().join("back");
    std::fs::create_dir(&back)?;
    lab.rctl(&["cp", &format!("{t2}:/tmp/tree"), path(&back)])?;
    assert_eq!(std::fs::read(back.join("tree/sub/deeper/big.bin"))?, big);
    assert_eq!(std::fs::read(back.join("tree/a.txt"))?, b"alpha\n");
    lab.rctl(&["cp", &format!("{t2}:/data/x"), path(&back.join("xcopy"))])?;
    assert_eq!(std::fs::read(back.join("xcopy/m.txt"))?, b"made-inside\n");
    assert_eq!(
        std::fs::read_link(back.join("xcopy/l"))?,
        Path::new("m.txt")
    );
    lab.rctl(&[
        "cp",
        &format!("{t2}:/tmp/renamed.txt"),
        path(&back.join("r.txt")),
    ])?;
    assert_eq!(std::fs::read(back.join("r.txt"))?, b"just one file\n");
    // The container's own mounts are what is copied: /etc/hosts is bind-mounted by the agent
    // (the task is on a network) and is not in the image.
    lab.rctl(&["cp", &format!("{t2}:/etc/hosts"), path(&back.join("hosts"))])?;
    let hosts = std::fs::read_to_string(back.join("hosts"))?;
    assert_eq!(hosts, sh(&lab, &t2, "cat /etc/hosts")?);
    assert!(!hosts.is_empty());
    // A directory's contents (`DIR/.`).
    lab.rctl(&["cp", &format!("{t2}:/data/x/."), path(&back.join("flat"))])?;
    assert_eq!(std::fs::read(back.join("flat/m.txt"))?, b"made-inside\n");

    // Links out of the container resolve inside it: no host file is read or written.
    let host = tmp.path().join("host-secret");
    std::fs::create_dir(&host)?;
    std::fs::write(host.join("secret"), b"HOST-ONLY-SECRET\n")?;
    let hostdir = path(&host);
    sh(
        &lab,
        &t2,
        &format!("ln -s {hostdir} /leakdir && ln -s {hostdir}/secret /leakfile && mkdir /ld && ln -s {hostdir}/secret /ld/s"),
    )?;
    let leak = tmp.path().join("leak");
    for (src, follow) in [
        (format!("{t2}:/leakdir/secret"), false),
        (format!("{t2}:/leakfile"), true),
        (format!("{t2}:/../../../../../..{hostdir}/secret"), false),
    ] {
        let mut args = vec!["cp"];
        if follow {
            args.push("-L");
        }
        args.extend([src.as_str(), path(&leak)]);
        let err = lab.rctl(&args).unwrap_err().to_string();
        assert!(err.contains(&format!("no such file in {t2}")), "{err}");
        assert!(!leak.exists(), "nothing written for {src}");
    }
    // A link copied out stays a link; what it names on the host is not copied.
    lab.rctl(&["cp", &format!("{t2}:/ld"), path(&leak)])?;
    assert!(std::fs::symlink_metadata(leak.join("s"))?
        .file_type()
        .is_symlink());
    // Writing through such a link does not reach the host either.
    let _ = lab.rctl(&[
        "cp",
        path(&local.join("one.txt")),
        &format!("{t2}:/leakdir/"),
    ]);
    let _ = lab.rctl(&[
        "cp",
        path(&local.join("one.txt")),
        &format!("{t2}:/leakdir/x"),
    ]);
    let names: Vec<_> = std::fs::read_dir(&host)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
    assert_eq!(std::fs::read(host.join("secret"))?, b"HOST-ONLY-SECRET\n");

    // A missing path: refused by name, nothing written.
    let nope = tmp.path().join("nope");
    let err = lab
        .rctl(&["cp", &format!("{t2}:/etc/nope"), path(&nope)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("no such file in {t2}: /etc/nope")),
        "{err}"
    );
    assert!(!nope.exists());
    let err = lab
        .rctl(&["cp", path(&nope), &format!("{t2}:/tmp/")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no such file or directory"), "{err}");
    // A finished task: no copy either way.
    let err = lab
        .rctl(&["cp", &format!("{done_name}:/etc"), path(&nope)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not running (state: complete)"), "{err}");

    // ---- inspect ----
    let v: serde_json::Value = serde_json::from_str(&lab.rctl(&["inspect", &t2])?)?;
    assert_eq!(v["name"], t2.as_str());
    assert_eq!(v["node"]["hostname"], "h2");
    assert_eq!(v["state"], "running");
    assert_eq!(v["task"]["spec"]["image"], "busybox:latest");
    let pid = lab.task_pid(&b2, "pid").context("pid file")?;
    let shim = lab.task_pid(&b2, "shim.pid").context("shim.pid file")?;
    assert_eq!(v["container"]["pid"], pid);
    assert_eq!(v["container"]["shim_pid"], shim);
    assert_eq!(v["container"]["running"], true);
    let rootfs = v["container"]["rootfs"].as_str().context("rootfs")?;
    assert!(
        Path::new(rootfs).join("tmp/tree/a.txt").exists(),
        "{rootfs}"
    );
    let addr = v["networks"][0]["address"].as_str().context("address")?;
    assert_eq!(v["networks"][0]["network"], "enet");
    let ip = sh(&lab, &t2, "ip addr")?;
    assert!(ip.contains(&format!("inet {addr}/32")), "{addr} in {ip}");
    // A finished task still inspects (from the store, and its host's record).
    let v: serde_json::Value = serde_json::from_str(&lab.rctl(&["inspect", done_name])?)?;
    assert_eq!(v["state"], "complete");

    // A host that does not answer (its agent frozen): an error within seconds, not a hang.
    let h2 = lab.host_index("h2");
    lab.signal_agent(h2, "STOP")?;
    let started = std::time::Instant::now();
    let exec = lab.rctl(&["exec", &t2, "--", "true"]);
    let took = started.elapsed();
    lab.signal_agent(h2, "CONT")?;
    let err = exec.unwrap_err().to_string();
    eprintln!("exec into a frozen host: {took:?}: {err}");
    assert!(took < Duration::from_secs(15), "{took:?}: {err}");
    assert!(
        err.contains("cannot reach host h2") || err.contains("is not running"),
        "{err}"
    );
    Ok(())
}

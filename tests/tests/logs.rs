//! `rctl logs` over a real lab: `--tail N` gives the last N lines, `-f` streams new output as
//! the container writes it, and a followed log ends by itself when its container exits.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rudder_tests::{bin, lab_with_busybox, running_tasks, wait_for};

#[test]
fn tail_and_follow() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("lg", 2)?;
    lab.apply(
        tmp.path(),
        "count.yaml",
        "kind: Service\nname: count\nimage: busybox:latest\nstop_grace_period: 1\n\
         command: [\"/bin/sh\", \"-c\", \"for i in 1 2 3 4 5; do echo line$i; done; i=0; \
         while true; do i=$((i+1)); echo tick$i; sleep 0.2; done\"]\n\
         ---\nkind: Service\nname: short\nimage: busybox:latest\nrestart: {condition: none}\n\
         command: [\"/bin/sh\", \"-c\", \"echo first; sleep 2; echo last\"]\n",
    )?;
    wait_for(Duration::from_secs(30), "count running", || {
        Ok((running_tasks(&lab.tasks("count")?).len() == 1).then_some(()))
    })?;

    let out = lab.rctl(&["logs", "count", "--tail", "2", "--no-prefix"])?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("tick") || l.starts_with("line")),
        "{out}"
    );

    // Follow: new ticks keep arriving on a stream that stays open.
    let rctl = || {
        let mut c = Command::new(bin("rctl"));
        c.arg("--context").arg(&lab.lab.context_path);
        c
    };
    let mut child = rctl()
        .args(["logs", "-f", "count", "--tail", "1", "--no-prefix"])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().unwrap();
    let seen = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take(6)
            .collect::<Vec<String>>()
    });
    let start = Instant::now();
    while !seen.is_finished() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let seen = seen.join().unwrap();
    assert_eq!(seen.len(), 6, "{seen:?}");
    let n = |l: &String| l.trim_start_matches("tick").parse::<u32>().unwrap_or(0);
    assert!(
        seen.windows(2).all(|w| n(&w[1]) == n(&w[0]) + 1),
        "{seen:?}"
    );

    // A followed log ends by itself once its container has exited.
    wait_for(Duration::from_secs(30), "short started", || {
        let t = lab.tasks("short")?;
        Ok(t.iter()
            .any(|t| t["state"] == "running" || t["state"] == "complete")
            .then_some(()))
    })?;
    let t = Instant::now();
    let out = rctl()
        .args(["logs", "-f", "short", "--no-prefix"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["first", "last"],
        "{text}"
    );
    assert!(t.elapsed() < Duration::from_secs(20));
    Ok(())
}

/// `--timestamps`, rotation by size (`logging`), a followed log that crosses a rotation, and
/// `rctl run` streaming a one-off container's output and exiting with its code.
#[test]
fn timestamps_rotation_and_run() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("lr", 1)?;
    // ~60 bytes per record: 4 KiB files rotate every ~60 lines.
    lab.apply(
        tmp.path(),
        "chatty.yaml",
        "kind: Service\nname: chatty\nimage: busybox:latest\nstop_grace_period: 1\n\
         logging: {max_size: 4K, max_file: 2}\n\
         command: [\"/bin/sh\", \"-c\", \"i=0; while [ $i -lt 200 ]; do i=$((i+1)); echo line$i; done; \
         while true; do i=$((i+1)); echo line$i; sleep 0.05; done\"]\n",
    )?;
    let task = wait_for(Duration::from_secs(30), "chatty running", || {
        Ok(running_tasks(&lab.tasks("chatty")?)
            .first()
            .map(|t| (*t).clone()))
    })?;
    // Follow across at least one rotation: the numbers keep coming without a gap.
    let mut child = Command::new(bin("rctl"))
        .args(["--context"])
        .arg(&lab.lab.context_path)
        .args(["logs", "-f", "--no-prefix", "--tail", "1", "chatty"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut numbers = Vec::new();
    let mut line = String::new();
    while numbers.len() < 120 && reader.read_line(&mut line)? > 0 {
        if let Some(n) = line.trim().strip_prefix("line") {
            numbers.push(n.parse::<u64>()?);
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "no line lost or repeated across rotations: {numbers:?}"
    );
    let dir = lab
        .host(task["node"].as_str().unwrap())
        .data_dir
        .join("containers")
        .join(task["id"].as_str().unwrap());
    assert!(dir.join("log.1").exists(), "rotated");
    assert!(!dir.join("log.2").exists(), "max_file: 2 keeps two files");
    assert!(std::fs::metadata(dir.join("log"))?.len() <= 4096);

    let out = lab.rctl(&["logs", "-t", "--no-prefix", "--tail", "3", "chatty"])?;
    for l in out.lines() {
        let (ts, rest) = l.split_once(' ').unwrap();
        assert!(
            ts.len() == 30 && ts.ends_with('Z') && ts.contains('T'),
            "{l}"
        );
        assert!(rest.starts_with("line"), "{l}");
    }

    // rctl run: output streamed, exit code passed on, --rm removes it.
    let out = Command::new(bin("rctl"))
        .args(["--context"])
        .arg(&lab.lab.context_path)
        .args([
            "run",
            "--rm",
            "--name",
            "once",
            "busybox:latest",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("out") && text.contains("err"), "{text}");
    wait_for(Duration::from_secs(10), "once removed", || {
        Ok((!lab.rctl(&["get", "services"])?.contains("once")).then_some(()))
    })?;
    Ok(())
}

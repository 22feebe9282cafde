//! `rctl stats` and `rctl top` over a real lab (issue 18), two hosts: a service burning a cpu
//! pinned on h1, an idle one on h2. `stats --no-stream -o json` shows the busy task at 50% or
//! more of a cpu and the idle one near 0, both with memory and pids (samples from both hosts'
//! agents, merged by the controller); the table has docker's columns; without `--no-stream`
//! and with stdout not a terminal, one table per refresh and no escape codes; `top` lists the
//! container's shell (pid 1 in the container) and the idle task's sleep; a worker certificate
//! is refused both.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use rudder_tests::{bin, lab_with_busybox, running_tasks, wait_for, LabGuard};
use serde_json::Value;

/// A background `rctl`, killed (that pid) when dropped.
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn running_name(lab: &LabGuard, service: &str) -> anyhow::Result<String> {
    wait_for(
        Duration::from_secs(90),
        &format!("{service} running"),
        || {
            let t = lab.tasks(service)?;
            Ok(running_tasks(&t)
                .first()
                .and_then(|t| t["name"].as_str().map(String::from)))
        },
    )
}

fn row<'a>(rows: &'a [Value], name: &str) -> anyhow::Result<&'a Value> {
    rows.iter()
        .find(|r| r["name"] == name)
        .with_context(|| format!("no row {name} in {rows:?}"))
}

#[test]
fn stats_and_top_read_the_tasks_hosts() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("sta", 2)?;
    let dir = tmp.path();
    lab.apply(
        dir,
        "busy.yaml",
        "kind: Service\nname: busy\nimage: busybox:latest\nstop_grace_period: 1\n\
         placement: {constraints: [\"node.hostname==h1\"]}\n\
         command: [\"/bin/sh\", \"-c\", \"while :; do :; done\"]\n",
    )?;
    lab.apply(
        dir,
        "idle.yaml",
        &rudder_tests::pinned_service("idle", "busybox:latest", "h2"),
    )?;
    let busy = running_name(&lab, "busy")?;
    let idle = running_name(&lab, "idle")?;

    // One snapshot as JSON: the busy loop near a whole cpu (at least half of one on a busy
    // machine), the sleeper near none.
    let t0 = std::time::Instant::now();
    let rows: Vec<Value> = wait_for(Duration::from_secs(60), "busy at >= 50%", || {
        let rows: Vec<Value> =
            serde_json::from_str(&lab.rctl(&["stats", "--no-stream", "-o", "json"])?)?;
        let ok = row(&rows, &busy)
            .ok()
            .and_then(|r| r["cpu_percent"].as_f64())
            .is_some_and(|c| c >= 50.0);
        eprintln!("stats: {rows:?}");
        Ok(ok.then_some(rows))
    })?;
    eprintln!("first good snapshot after {:?}", t0.elapsed());
    let (b, i) = (row(&rows, &busy)?, row(&rows, &idle)?);
    assert_eq!(
        (b["node"].as_str(), i["node"].as_str()),
        (Some("h1"), Some("h2"))
    );
    assert!(i["cpu_percent"].as_f64().context("idle cpu")? < 10.0, "{i}");
    for r in [b, i] {
        assert_eq!(r["state"], "running", "{r}");
        assert!(r["memory_bytes"].as_u64().context("memory")? > 0, "{r}");
        assert!(
            r["memory_limit_bytes"].as_u64() > r["memory_bytes"].as_u64(),
            "{r}"
        );
        assert!(r["pids"].as_u64().context("pids")? >= 1, "{r}");
    }
    // Only what is named; an unknown name is an error that says so.
    let only: Vec<Value> =
        serde_json::from_str(&lab.rctl(&["stats", "busy", "--no-stream", "-o", "json"])?)?;
    assert_eq!(only.len(), 1, "{only:?}");
    let e = lab.rctl(&["stats", "nope", "--no-stream"]).unwrap_err();
    assert!(e.to_string().contains("no service or task named"), "{e}");
    let yaml = lab.rctl(&["stats", "idle", "--no-stream", "-o", "yaml"])?;
    assert!(yaml.contains(&format!("name: {idle}")), "{yaml}");

    // The table, docker's columns.
    let table = lab.rctl(&["stats", "--no-stream"])?;
    let header = table.lines().next().context("no header")?;
    for col in [
        "TASK",
        "NODE",
        "CPU %",
        "MEM USAGE / LIMIT",
        "MEM %",
        "NET I/O",
        "BLOCK I/O",
        "PIDS",
    ] {
        assert!(header.contains(col), "{table}");
    }
    assert!(table.contains(&busy) && table.contains(&idle), "{table}");
    let formatted = lab.rctl(&[
        "stats",
        "idle",
        "--no-stream",
        "--format",
        "{{.Name}}={{.PIDs}}",
    ])?;
    assert!(formatted.starts_with(&format!("{idle}=")), "{formatted}");

    // Live, stdout a file: a table per refresh (about one a second), no escape codes.
    let out = dir.join("live.txt");
    let live = Background(
        Command::new(bin("rctl"))
            .arg("--context")
            .arg(&lab.lab.context_path)
            .args(["stats", "busy", "idle"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(dir.join("live.err"))?)
            .spawn()
            .context("run rctl stats")?,
    );
    let text = wait_for(Duration::from_secs(20), "3 live tables", || {
        let t = std::fs::read_to_string(&out)?;
        Ok((t.lines().filter(|l| l.starts_with("TASK")).count() >= 3).then_some(t))
    })?;
    drop(live);
    assert!(!text.contains('\x1b'), "{text:?}");
    assert!(text.contains(&busy), "{text}");

    // top: the shell of the busy container, pid 1 inside it; the sleeper on the other host.
    let top = lab.rctl(&["top", &busy])?;
    assert!(
        top.lines().next().is_some_and(|h| h.starts_with("PID")),
        "{top}"
    );
    assert!(top.contains("while :; do :; done"), "{top}");
    let j: Value = serde_json::from_str(&lab.rctl(&["top", &busy, "-o", "json"])?)?;
    let procs = j["processes"].as_array().context("processes")?;
    assert!(
        procs
            .iter()
            .any(|p| p["pid"] == 1 && p["command"].as_str().is_some_and(|c| c.contains("sh"))),
        "{j}"
    );
    assert_eq!(j["node"], "h1");
    let top = lab.rctl(&["top", &idle])?;
    assert!(top.contains("sleep 1000000"), "{top}");

    worker_is_refused(&lab, dir, &busy)?;
    Ok(())
}

/// `rctl stats|top` with an agent's (worker) certificate: refused by the Control service's
/// guard, like every read of the Control API.
fn worker_is_refused(lab: &LabGuard, dir: &std::path::Path, task: &str) -> anyhow::Result<()> {
    let certs = lab.lab.hosts[1].data_dir.join("certs");
    let ctx = dir.join("agent-context.json");
    let v = serde_json::json!({
        "controllers": lab.lab.controller_urls(),
        "registry": lab.lab.registry(),
        "ca": certs.join("ca.pem"),
        "cert": certs.join("node.pem"),
        "key": certs.join("node-key.pem"),
    });
    std::fs::write(&ctx, serde_json::to_vec(&v)?)?;
    for args in [&["stats", "--no-stream"][..], &["top", task]] {
        let out = Command::new(bin("rctl"))
            .arg("--context")
            .arg(&ctx)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} with a worker certificate");
        assert!(
            err.contains("Control is for admin certificates") && err.contains("worker"),
            "{args:?}: {err}"
        );
    }
    std::fs::remove_file(&ctx)?;
    Ok(())
}

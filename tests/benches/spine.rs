//! Spine benchmarks (run as root: `cargo bench -p rudder-tests --bench spine`).
//!
//! 1. Container create → running → exit of `/bin/true` through the agent's runtime layer
//!    (shim + `runc run --detach` + wait + delete) against raw `runc run` of the same bundle.
//! 2. `rctl apply` of 6 and of 100 replicas → all running on a 3-host lab (cold: first pull;
//!    warm: layers cached).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rudder_agent::bundle::{write_config, ContainerDir};
use rudder_agent::runtime::{ContainerRuntime, OciCliRuntime};
use rudder_tests::{bin, busybox_rootfs, running_tasks, wait_for, LabGuard};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn task_json(id: &str) -> rudder_model::Task {
    serde_json::from_value(serde_json::json!({
        "id": id, "service_id": "s", "service_name": "bench", "slot": 1,
        "spec": {"name": "bench", "image": "busybox", "command": ["/bin/true"]},
        "spec_version": 1, "node_id": "n", "desired_state": "running",
        "status": {"state": "assigned", "timestamp": 0}, "created_at": 0, "version": 1
    }))
    .expect("task json")
}

fn runtime_bench(iterations: usize) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("rudder-bench-")
        .tempdir_in("/var/tmp")?;
    let tar = work.path().join("busybox.tar");
    busybox_rootfs(&tar)?;
    let c = ContainerDir::new(work.path().join("c"));
    std::fs::create_dir_all(c.rootfs())?;
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(c.rootfs())
        .status()?;
    anyhow::ensure!(st.success(), "untar busybox");
    write_config(
        &c,
        &task_json("bench"),
        &Default::default(),
        &rudder_agent::bundle::HostSpec {
            cgroup_parent: "/rudder-bench",
            seccomp_bpf: None,
        },
        None,
        &[],
        &[],
    )?;
    let root = work.path().join("runc");
    std::fs::create_dir_all(&root)?;
    let cli = rudder_tests::runtime_cli(&root);
    let runc = cli.binary.clone();

    let rt = OciCliRuntime {
        cli: cli.clone(),
        self_exe: bin("rudder-agent"),
        exit_pipes: Default::default(),
    };
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Interleaved, so background load affects both sides alike.
    let mut raw = Vec::new();
    let mut to_exit = Vec::new();
    let mut to_clean = Vec::new();
    for i in 0..iterations {
        // Raw `runc run`: create + start + wait + delete in one process.
        let t = Instant::now();
        let st = cli
            .run_foreground(&format!("raw{i}"), &c.bundle())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        raw.push(t.elapsed());
        anyhow::ensure!(st.success(), "runc run failed");

        // Through the agent's runtime layer: shim, `run --detach`, exit via the shim's pipe.
        for f in ["exit", "pid", "shim.pid", "log", "runc.log"] {
            let _ = std::fs::remove_file(c.dir.join(f));
        }
        let id = format!("agent{i}");
        let t = Instant::now();
        let code = tokio.block_on(async {
            rt.start(&id, &c.dir).await?;
            rt.wait(&id, &c.dir).await
        })?;
        to_exit.push(t.elapsed());
        tokio.block_on(rt.delete(&id, &c.dir))?;
        to_clean.push(t.elapsed());
        anyhow::ensure!(code == 0, "exit code {code}");
    }
    let (r, e, d) = (median(raw), median(to_exit), median(to_clean));
    println!(
        "runtime: raw `{runc} run` median {:.1} ms (create+start+exit+delete in one process), n={iterations}"
    , ms(r));
    println!(
        "runtime: agent layer create->running->exit observed median {:.1} ms, ratio {:.2}x (target <= 1.3x); \
         until the runtime record is also deleted {:.1} ms, ratio {:.2}x",
        ms(e),
        e.as_secs_f64() / r.as_secs_f64(),
        ms(d),
        d.as_secs_f64() / r.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(Path::new("/sys/fs/cgroup/unified/rudder-bench"));
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let _ = std::fs::remove_dir(h.path().join("rudder-bench"));
    }
    Ok(())
}

fn apply_bench() -> anyhow::Result<()> {
    let lab = LabGuard::up(&format!("bn{}", std::process::id() % 100000), 3)?;
    let tmp = tempfile::tempdir()?;
    let tar = tmp.path().join("busybox.tar");
    busybox_rootfs(&tar)?;
    lab.rctl(&["image", "import", tar.to_str().unwrap(), "busybox:latest"])?;
    let file = tmp.path().join("hello.yaml");
    let rounds = [
        (6, "cold (image pulled)"),
        (6, "warm (layers cached)"),
        (100, "warm (layers cached)"),
    ];
    for (replicas, round) in rounds {
        std::fs::write(
            &file,
            format!(
                "kind: Service\nname: hello\nimage: busybox:latest\nstop_grace_period: 1\n\
                 command: [\"/bin/sleep\", \"100000\"]\nreplicas: {replicas}\n"
            ),
        )?;
        let t = Instant::now();
        // apply waits until every replica runs.
        lab.rctl(&["apply", "-f", file.to_str().unwrap()])?;
        let n = running_tasks(&lab.tasks("hello")?).len();
        anyhow::ensure!(n == replicas, "{n} running after apply returned");
        println!(
            "apply {replicas} replicas on 3 hosts -> all running, {round}: {:.2} s",
            t.elapsed().as_secs_f64()
        );
        lab.rctl(&["rm", "hello"])?;
        wait_for(Duration::from_secs(120), "tasks reaped", || {
            Ok(lab.rctl(&["ps", "-o", "json"])?.trim() == "[]").map(|b| b.then_some(()))
        })?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` would run us with no flag: skip then.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    runtime_bench(30)?;
    apply_bench()?;
    Ok(())
}

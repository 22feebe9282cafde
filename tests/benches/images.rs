//! Image benchmarks on a one-host lab (issue 7; run as root, after
//! `cargo build --release --workspace --bins`: `cargo bench -p rudder-tests --bench images`).
//!
//! 1. Build cache: a 10-step Dockerfile (FROM busybox, then ENV, WORKDIR, COPY ×2, RUN ×2,
//!    LABEL, EXPOSE, CMD) is built once, then rebuilt unchanged 7 times. Each rebuild is timed
//!    end to end: the `rctl build` process, the context sent, every step found in the host's
//!    cache, the blob checks against the cluster registry and the manifest recorded (target
//!    ≤ 1 s). Then one rebuild after the second COPY's input changed, and one `--no-cache`.
//! 2. A pull that has the base already: a service from the built image starts on a host that
//!    has busybox; the agent's log says what the pull moved (only the new layers).
//!
//! Registry throughput (100 MB layer, push and pull over loopback) and layer sharing in the
//! content store are in `cargo bench -p rudder-controller --bench registry`.

use std::fs;
use std::time::{Duration, Instant};

use rudder_tests::{lab_with_busybox, LabGuard};

const REBUILDS: usize = 7;

const DOCKERFILE: &str = "FROM busybox:latest
ENV APP=/app MODE=bench
WORKDIR /app
COPY static/ /app/static/
COPY config.txt /app/config.txt
RUN echo built > /app/built && mkdir -p /var/cache/app
RUN dd if=/dev/zero of=/app/blob bs=1024 count=512 2>/dev/null
LABEL bench=images
EXPOSE 8080
CMD [\"cat\", \"/app/config.txt\"]
";

fn stats(v: &[Duration]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn timed(lab: &LabGuard, args: &[&str]) -> anyhow::Result<(Duration, String)> {
    let t = Instant::now();
    let out = lab.rctl(args)?;
    Ok((t.elapsed(), out))
}

fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let (lab, tmp) = lab_with_busybox("bim", 2)?;
    let ctx = tmp.path().join("ctx");
    fs::create_dir_all(ctx.join("static"))?;
    fs::write(ctx.join("Dockerfile"), DOCKERFILE)?;
    for i in 0..50 {
        fs::write(ctx.join(format!("static/file{i}.txt")), format!("{i}\n"))?;
    }
    fs::write(ctx.join("config.txt"), "v1\n")?;
    let c = ctx.to_str().unwrap();

    let (first, out) = timed(&lab, &["build", "-t", "bench:1", c])?;
    let steps = out.lines().filter(|l| l.starts_with("Step ")).count();
    println!(
        "first build ({steps} steps, nothing cached): {:.0} ms",
        first.as_secs_f64() * 1000.0
    );
    let mut times = Vec::new();
    for _ in 0..REBUILDS {
        let (d, out) = timed(&lab, &["build", "-t", "bench:1", c])?;
        let cached = out.matches("---> Using cache").count();
        assert_eq!(cached + 1, steps, "every step but FROM cached:\n{out}");
        times.push(d);
    }
    let (med, min, max) = stats(&times);
    println!(
        "fully cached rebuild, {REBUILDS} runs, end to end: median {med:.0} ms (min {min:.0}, max {max:.0}); target <= 1000 ms"
    );
    fs::write(ctx.join("config.txt"), "v2\n")?;
    let (d, out) = timed(&lab, &["build", "-t", "bench:2", "--node", "h1", c])?;
    let new_layers: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("---> layer"))
        .collect();
    println!(
        "rebuild after changing config.txt (steps 5-10 run again, {} cached): {:.0} ms",
        out.matches("---> Using cache").count(),
        d.as_secs_f64() * 1000.0
    );
    let (d, _) = timed(&lab, &["build", "-t", "bench:3", "--no-cache", c])?;
    println!("--no-cache build: {:.0} ms", d.as_secs_f64() * 1000.0);

    // h2 has busybox (a container ran from it), then pulls the built image: only what the
    // build added moves. Steps 2-4 were cached in that build; their layers are new to h2 too.
    lab.rctl(&["run", "--rm", "--node", "h2", "busybox:latest", "true"])?;
    let t = Instant::now();
    let run = lab.rctl(&["run", "--rm", "--node", "h2", "bench:2"])?;
    assert!(run.contains("v2"), "{run}");
    println!(
        "rctl run --rm --node h2 bench:2 (pull + start, busybox already on h2): {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    println!("layers bench:2's build made (the first build made the other new ones):");
    for l in new_layers {
        println!("  {}", l.trim());
    }
    let log = fs::read_to_string(lab.host("h2").agent_log()).unwrap_or_default();
    for l in log
        .lines()
        .filter(|l| l.contains("pulled image") && l.contains("bytes_fetched"))
    {
        // The agent logs without colours when its output is not a terminal.
        let field = |k: &str| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or("?")
                .trim_end_matches(['}', ':'])
                .to_string()
        };
        println!(
            "h2 pulled {} ({} layers): {} bytes moved",
            field("image="),
            field("layers="),
            field("bytes_fetched=")
        );
    }
    Ok(())
}

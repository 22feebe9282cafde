//! A service's runtime options on a real lab, checked from inside its container through
//! `rctl exec`: capabilities (`CapEff`), `ulimit -n`, `/etc/hosts` and `/etc/resolv.conf`, a
//! read-only root, a sysctl of its own network namespace, /dev/shm's size, and tini as PID 1
//! that reaps an orphaned zombie (a service without `init` keeps it) and forwards SIGTERM and
//! the service's `stop_signal` to the command. On an overlay network, Rudder's resolver stays
//! the first nameserver. A net.* sysctl does not leak into the next task's pooled namespace.

use std::time::{Duration, Instant};

use rudder_tests::{lab_with_busybox, running_task, sh, wait_for, LabGuard};

/// An orphan (`sleep 1`, its parent gone) is re-parented to PID 1, which must reap it; the
/// command then waits forever in `sleep` (which never reaps) as PID 1 without an init.
const ZOMBIE_MAKER: &str = "command: [\"/bin/sh\", \"-c\", \
     \"/bin/sh -c '/bin/sleep 1 & exit 0'; exec /bin/sleep 1000000\"]\n";

fn zombies(lab: &LabGuard, task: &str) -> anyhow::Result<usize> {
    let out = sh(
        lab,
        task,
        "for s in /proc/[0-9]*/status; do grep -q '^State:.*Z' $s 2>/dev/null && echo Z; done; true",
    )?;
    Ok(out.lines().filter(|l| l.trim() == "Z").count())
}

/// The task of `service` that ended with an exit code, once there is one.
fn ended(lab: &LabGuard, service: &str) -> anyhow::Result<serde_json::Value> {
    wait_for(
        Duration::from_secs(60),
        &format!("a task of {service} to end"),
        || {
            Ok(lab
                .tasks(service)?
                .into_iter()
                .find(|t| t["exit_code"].is_i64()))
        },
    )
}

#[test]
fn runtime_options_inside_the_container() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("ro", 1)?;
    let host = lab.lab.hosts[0].name.clone();
    let pin = format!("placement: {{constraints: [\"node.hostname=={host}\"]}}\n");
    let manifest = |extra: &str| {
        format!(
            "kind: Service\nname: knobs\nimage: busybox:latest\n{pin}{ZOMBIE_MAKER}{extra}\
             stop_grace_period: 30\nstop_signal: SIGINT\ninit: true\n\
             cap_drop: [ALL]\ncap_add: [NET_ADMIN, KILL]\n\
             sysctls:\n  net.core.somaxconn: 1234\n  kernel.shmmni: 2345\n\
             read_only: true\n\
             ulimits:\n  nofile: {{soft: 1111, hard: 2222}}\n  nproc: 300\n\
             extra_hosts: [\"db.example:10.1.2.3\"]\n\
             dns: 10.9.9.9\ndns_search: [corp.example]\ndns_opt: [ndots:3]\n\
             shm_size: 32M\n\
             ---\n\
             kind: Service\nname: bare\nimage: busybox:latest\n{pin}{ZOMBIE_MAKER}\
             stop_grace_period: 1\n"
        )
    };
    lab.apply(tmp.path(), "knobs.yaml", &manifest(""))?;
    let knobs = running_task(&lab, "knobs")?;
    let knobs = knobs["name"].as_str().unwrap().to_string();
    let bare = running_task(&lab, "bare")?;
    let bare = bare["name"].as_str().unwrap().to_string();
    let run = |script: &str| sh(&lab, &knobs, script);

    // Capabilities: only NET_ADMIN (12) and KILL (5).
    let cap = run("grep CapEff: /proc/self/status")?;
    assert_eq!(
        cap.split_whitespace().nth(1),
        Some(format!("{:016x}", (1u64 << 12) | (1 << 5)).as_str()),
        "{cap}"
    );
    let cap_bare = sh(&lab, &bare, "grep CapEff: /proc/self/status")?;
    assert_eq!(
        cap_bare.split_whitespace().nth(1),
        Some("00000000a80425fb"),
        "Docker's default set: {cap_bare}"
    );
    // Limits.
    assert_eq!(run("ulimit -n")?.trim(), "1111");
    assert_eq!(run("ulimit -Hn")?.trim(), "2222");
    assert_eq!(run("ulimit -u")?.trim(), "300");
    // Namespaced sysctls.
    assert_eq!(run("cat /proc/sys/net/core/somaxconn")?.trim(), "1234");
    assert_eq!(run("cat /proc/sys/kernel/shmmni")?.trim(), "2345");
    // /etc files.
    let hosts = run("cat /etc/hosts")?;
    assert!(hosts.contains("10.1.2.3\tdb.example"), "{hosts}");
    assert!(hosts.contains("localhost"), "{hosts}");
    let resolv = run("cat /etc/resolv.conf")?;
    let servers: Vec<&str> = resolv
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect();
    assert_eq!(
        servers,
        ["10.9.9.9"],
        "off the overlay, dns replaces: {resolv}"
    );
    assert!(resolv.contains("search corp.example\n"), "{resolv}");
    assert!(resolv.contains("ndots:3"), "{resolv}");
    // A read-only root; /dev/shm writable, of the size asked.
    let e = run("touch /written").unwrap_err().to_string();
    assert!(e.contains("Read-only file system"), "{e}");
    run("touch /dev/shm/ok")?;
    let shm = run("df -k /dev/shm | tail -1")?;
    assert_eq!(shm.split_whitespace().nth(1), Some("32768"), "{shm}");
    // tini is PID 1 and reaps the orphan; without init, the zombie stays.
    let pid1 = run("tr '\\0' ' ' </proc/1/cmdline")?;
    assert!(pid1.starts_with("/sbin/docker-init -- /bin/sh"), "{pid1}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(zombies(&lab, &knobs)?, 0, "tini reaped it");
    assert_eq!(zombies(&lab, &bare)?, 1, "no init, no reaping");

    // SIGTERM to PID 1 reaches the command (sleep dies of it: 128+15), well before any grace.
    lab.rctl(&["exec", &knobs, "--", "kill", "-TERM", "1"])?;
    let first = ended(&lab, "knobs")?;
    assert_eq!(first["exit_code"], 143, "{first}");

    // The replacement is stopped (by an update) with the service's stop_signal, forwarded to
    // the command: 128+SIGINT, long before the 30 s grace.
    let second = wait_for(Duration::from_secs(60), "a second knobs task", || {
        let t = lab.tasks("knobs")?;
        Ok(t.into_iter()
            .find(|t| t["state"] == "running" && t["name"] != first["name"]))
    })?;
    let t0 = Instant::now();
    lab.apply(tmp.path(), "knobs.yaml", &manifest("env: {ROLL: \"2\"}\n"))?;
    let stopped = wait_for(Duration::from_secs(60), "knobs stopped", || {
        let t = lab.tasks("knobs")?;
        match t
            .iter()
            .find(|t| t["name"] == second["name"] && t["exit_code"].is_i64())
        {
            Some(t) => Ok(Some(t.clone())),
            None => anyhow::bail!("{}", serde_json::to_string(&t)?),
        }
    })?;
    assert_eq!(stopped["exit_code"], 130, "{stopped}");
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());

    // The namespace that had somaxconn 1234 is not lent to the next task.
    lab.apply(
        tmp.path(),
        "plain.yaml",
        &format!(
            "kind: Service\nname: plain\nimage: busybox:latest\n{pin}\
             command: [\"/bin/sleep\", \"1000000\"]\nstop_grace_period: 1\nreplicas: 3\n"
        ),
    )?;
    let plain = wait_for(Duration::from_secs(60), "plain running", || {
        let t = lab.tasks("plain")?;
        let names: Vec<String> = t
            .iter()
            .filter(|t| t["state"] == "running")
            .map(|t| t["name"].as_str().unwrap_or_default().to_string())
            .collect();
        Ok((names.len() == 3).then_some(names))
    })?;
    for p in &plain {
        let v = sh(&lab, p, "cat /proc/sys/net/core/somaxconn")?;
        assert_ne!(v.trim(), "1234", "{p}");
    }
    Ok(())
}

#[test]
fn overlay_keeps_rudders_resolver_first() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("rn", 1)?;
    lab.apply(
        tmp.path(),
        "net.yaml",
        "kind: Network\nname: front\n---\n\
         kind: Service\nname: web\nimage: busybox:latest\nnetworks: [front]\n\
         command: [\"/bin/sleep\", \"1000000\"]\nstop_grace_period: 1\n\
         dns: [10.9.9.9]\ndns_opt: [ndots:2]\nextra_hosts: [\"db.example:10.1.2.3\"]\n\
         sysctls: {net.ipv4.tcp_syncookies: 0}\n",
    )?;
    let web = running_task(&lab, "web")?;
    let web = web["name"].as_str().unwrap().to_string();
    let resolv = sh(&lab, &web, "cat /etc/resolv.conf")?;
    let servers: Vec<&str> = resolv
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect();
    assert_eq!(servers.len(), 2, "{resolv}");
    assert_ne!(servers[0], "10.9.9.9", "Rudder's resolver first: {resolv}");
    assert_eq!(servers[1], "10.9.9.9", "{resolv}");
    assert!(resolv.contains("options ndots:2\n"), "{resolv}");
    // Service discovery still answers through it.
    let found = sh(&lab, &web, &format!("nslookup web {}", servers[0]))?;
    assert!(
        found.lines().filter(|l| l.starts_with("Address")).count() >= 2,
        "{found}"
    );
    let hosts = sh(&lab, &web, "cat /etc/hosts")?;
    assert!(hosts.contains("10.1.2.3\tdb.example"), "{hosts}");
    assert_eq!(
        sh(&lab, &web, "cat /proc/sys/net/ipv4/tcp_syncookies")?.trim(),
        "0"
    );
    Ok(())
}

//! Prometheus metrics over a real lab (one controller, two agents): the controller's and the
//! agents' `/metrics` over HTTPS with the admin certificate Prometheus would hold; refused
//! without a certificate, with a worker certificate and with a revoked admin certificate;
//! served over plain HTTP only where `--metrics-addr` asked for it; the text checked by
//! Debian's `promtool check metrics`, the shipped scrape config by `promtool check config`.
//! The Grafana dashboard we ship references only metrics that are exposed here.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use rudder_tests::{lab_with_busybox_args, running_tasks, wait_for};

const CONTROLLER_METRICS: u16 = 4246;
const AGENT_METRICS: u16 = 4247;
const PLAIN_METRICS: u16 = 4248;

/// A client identity: CA, certificate and key (PEM).
struct Identity {
    ca: String,
    cert: String,
    key: String,
}

/// `GET /metrics` over TLS at `addr`, expecting a server certificate of `server_name`,
/// presenting `who` if given. Returns the whole HTTP answer, or the I/O or TLS error.
fn scrape_tls(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &str,
    who: Option<&Identity>,
) -> anyhow::Result<String> {
    // A client presenting an identity trusts the CA that identity came with.
    let ca = who.map_or(ca_pem, |w| w.ca.as_str());
    let who = who.map(|w| (w.cert.as_str(), w.key.as_str()));
    let mut tls = rudder_tests::tls_connect(addr, server_name, ca, who, Duration::from_secs(10))?;
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: rudder\r\n\r\n")?;
    let mut out = String::new();
    tls.read_to_string(&mut out)?;
    Ok(out)
}

/// `GET /metrics` over plain HTTP.
fn scrape_plain(addr: SocketAddr) -> anyhow::Result<String> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: rudder\r\n\r\n")?;
    let mut out = String::new();
    tcp.read_to_string(&mut out)?;
    Ok(out)
}

/// The body of a 200 answer.
fn body(answer: &str) -> anyhow::Result<&str> {
    anyhow::ensure!(
        answer.starts_with("HTTP/1.1 200 OK\r\n"),
        "not a 200: {answer}"
    );
    answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("no body")
}

/// The value of the sample line `series` (name and labels exactly), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// `promtool check metrics` (Debian's `prometheus` package) on `text`: the exposition parses
/// and passes its lint (naming, units, `_total` on counters only).
fn promtool_check(text: &str) -> anyhow::Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool (package prometheus, see .ci/install-deps)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "promtool check metrics failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The metric names a Grafana dashboard's queries reference (`rudder_…` words in `expr`).
fn dashboard_metrics(path: &Path) -> anyhow::Result<Vec<String>> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&json, &mut exprs);
    anyhow::ensure!(!exprs.is_empty(), "no queries in {}", path.display());
    let mut names = Vec::new();
    for e in exprs {
        for (i, _) in e.match_indices("rudder_") {
            let name: String = e[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

#[test]
fn metrics_over_https_with_admin_certificates() -> anyhow::Result<()> {
    let plain = format!("0.0.0.0:{PLAIN_METRICS}");
    let (lab, tmp) = lab_with_busybox_args("met", 2, 1, &["--metrics-addr", &plain])?;
    lab.apply(
        tmp.path(),
        "web.yaml",
        "kind: Service\nname: web\nimage: busybox:latest\nreplicas: 2\n\
         command: [\"/bin/sh\", \"-c\", \"dd if=/dev/urandom of=/tmp/f bs=1k count=256; \
         exec sleep 100000\"]\n",
    )?;
    wait_for(Duration::from_secs(60), "web running", || {
        Ok((running_tasks(&lab.tasks("web")?).len() == 2).then_some(()))
    })?;

    let h1 = &lab.lab.hosts[0];
    let admin_dir = h1.controller_data_dir().join("admin");
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| p.display().to_string());
    let admin = Identity {
        ca: read(&admin_dir.join("ca.pem"))?,
        cert: read(&admin_dir.join("admin.pem"))?,
        key: read(&admin_dir.join("admin-key.pem"))?,
    };
    let controller = SocketAddr::from((h1.addr, CONTROLLER_METRICS));

    // The controller: the cluster's state, raft, the registry and scheduling delays.
    let text = wait_for(Duration::from_secs(30), "controller metrics", || {
        let a = scrape_tls(controller, "manager.rudder", &admin.ca, Some(&admin))?;
        let t = body(&a)?.to_string();
        let ok = value(
            &t,
            r#"rudder_manager_service_running_replicas{service="web"}"#,
        ) == Some(2.0)
            && value(&t, "rudder_manager_scheduling_delay_seconds_count") >= Some(2.0);
        Ok(ok.then_some(t))
    })?;
    for (series, at_least) in [
        (
            r#"rudder_manager_service_desired_replicas{service="web",mode="replicated"}"#,
            2.0,
        ),
        (
            r#"rudder_manager_tasks{service="web",state="running"}"#,
            2.0,
        ),
        (
            r#"rudder_manager_nodes{state="ready",role="manager",availability="active"}"#,
            1.0,
        ),
        (
            r#"rudder_manager_nodes{state="ready",role="worker",availability="active"}"#,
            1.0,
        ),
        ("rudder_raft_leader", 1.0),
        ("rudder_raft_term", 1.0),
        ("rudder_raft_log_entries", 1.0),
        ("rudder_raft_propose_seconds_count", 1.0),
        ("rudder_raft_apply_seconds_count", 1.0),
        // The busybox image was pushed through the registry and pulled from it.
        ("rudder_registry_received_bytes_total", 100_000.0),
        ("rudder_registry_sent_bytes_total", 100_000.0),
    ] {
        let v = value(&text, series).with_context(|| format!("no {series} in\n{text}"))?;
        assert!(
            v >= at_least,
            "{series} = {v}, expected >= {at_least}\n{text}"
        );
    }
    promtool_check(&text)?;

    // The agents: per-task usage of the two web tasks, wherever they run.
    let mut agents = String::new();
    let mut cpu_series = 0;
    wait_for(Duration::from_secs(30), "agent task metrics", || {
        agents.clear();
        cpu_series = 0;
        for h in &lab.lab.hosts {
            let a = scrape_tls(
                SocketAddr::from((h.addr, AGENT_METRICS)),
                "worker.rudder",
                &admin.ca,
                Some(&admin),
            )?;
            let t = body(&a)?;
            promtool_check(t)?;
            cpu_series += t
                .lines()
                .filter(|l| l.starts_with(r#"rudder_agent_task_cpu_seconds_total{service="web""#))
                .count();
            agents.push_str(t);
        }
        Ok((cpu_series == 2
            && agents.contains("rudder_agent_task_network_receive_bytes_total{service=\"web\""))
        .then_some(()))
    })?;
    for name in [
        "rudder_agent_task_memory_bytes{service=\"web\"",
        "rudder_agent_task_block_write_bytes_total{service=\"web\"",
        "rudder_agent_task_network_transmit_bytes_total{service=\"web\"",
        "rudder_agent_tasks{state=\"running\"}",
    ] {
        assert!(agents.contains(name), "no {name} in\n{agents}");
    }

    // Refused: no client certificate (the handshake fails), a worker's certificate (403).
    let none = scrape_tls(controller, "manager.rudder", &admin.ca, None);
    assert!(
        none.as_ref().map_or(true, |a| !a.contains("rudder_")),
        "served without a client certificate: {none:?}"
    );
    let h2 = &lab.lab.hosts[1];
    let worker_certs = rudder_pki::tls::NodeCerts::load(&h2.data_dir.join("certs"))?;
    let worker = Identity {
        ca: admin.ca.clone(),
        cert: worker_certs.cert_pem().to_string(),
        key: worker_certs.key_pem().to_string(),
    };
    for addr in [controller, SocketAddr::from((h2.addr, AGENT_METRICS))] {
        let server = if addr == controller {
            "manager.rudder"
        } else {
            "worker.rudder"
        };
        let a = scrape_tls(addr, server, &admin.ca, Some(&worker))?;
        assert!(a.starts_with("HTTP/1.1 403"), "{addr}: {a}");
        assert!(
            a.contains("worker certificate") && !a.contains("rudder_manager"),
            "{a}"
        );
    }

    // An admin identity of Prometheus's own scrapes until it is revoked.
    let out = tmp.path().join("prom");
    lab.rctl(&[
        "cluster",
        "admin-cert",
        "prom",
        "--out",
        out.to_str().context("utf-8 path")?,
    ])?;
    let prom = Identity {
        ca: read(&out.join("ca.pem"))?,
        cert: read(&out.join("prom.pem"))?,
        key: read(&out.join("prom-key.pem"))?,
    };
    body(&scrape_tls(
        controller,
        "manager.rudder",
        &admin.ca,
        Some(&prom),
    )?)?;
    lab.rctl(&["cluster", "revoke-admin", "prom"])?;
    let revoked = scrape_tls(controller, "manager.rudder", &admin.ca, Some(&prom))?;
    assert!(
        revoked.starts_with("HTTP/1.1 403") && revoked.contains("revoked"),
        "{revoked}"
    );

    // Plain HTTP only where --metrics-addr asked for it: the controller here, not the agents.
    let p = scrape_plain(SocketAddr::from((h1.addr, PLAIN_METRICS)))?;
    assert!(body(&p)?.contains("rudder_raft_term"), "{p}");
    assert!(scrape_plain(SocketAddr::from((h2.addr, PLAIN_METRICS))).is_err());

    // Every metric the shipped dashboard queries is exposed by a controller or an agent.
    let dashboard = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/observability/grafana-rudder.json");
    let exposed = format!("{text}{agents}");
    for name in dashboard_metrics(&dashboard)? {
        let found = exposed.lines().any(|l| {
            l.strip_prefix(&name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        });
        assert!(found, "the dashboard queries {name}, which nothing exposes");
    }

    // The shipped scrape configuration is valid, pointed at this lab's admin files.
    let shipped = std::fs::read_to_string(dashboard.with_file_name("prometheus.yml"))?;
    let local = shipped
        .replace("prometheus.pem", "admin.pem")
        .replace("prometheus-key.pem", "admin-key.pem")
        .replace(
            "/etc/prometheus/rudder/",
            &format!("{}/", admin_dir.display()),
        );
    let cfg = tmp.path().join("prometheus.yml");
    std::fs::write(&cfg, local)?;
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(&cfg)
        .output()?;
    assert!(
        out.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

//! Mutual TLS and join tokens over a real lab: every connection is TLS with certificates from
//! the cluster CA, and each service admits only its roles.
//!
//! - `rctl` (admin certificate) gets the join tokens.
//! - An agent's (worker) certificate cannot call the Control API.
//! - A controller that joins with a worker token gets a worker certificate, and the raft
//!   service refuses it: it never becomes a member.
//! - After `--rotate`, the old worker token admits nobody.
//! - A client with a certificate from another CA, or with none, cannot talk to a controller.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rudder_pki::ca::{self, ClusterCa, Role};
use rudder_tests::{bin, wait_for, LabGuard};
use serde_json::Value;

/// A context file for `rctl` with the given credentials (PEM files), or none.
fn context(
    dir: &Path,
    name: &str,
    lab: &LabGuard,
    creds: Option<(&Path, &Path, &Path)>,
) -> std::path::PathBuf {
    let mut v = serde_json::json!({
        "controllers": lab.lab.controller_urls(),
        "registry": lab.lab.registry(),
    });
    if let Some((ca, cert, key)) = creds {
        v["ca"] = ca.to_string_lossy().into();
        v["cert"] = cert.to_string_lossy().into();
        v["key"] = key.to_string_lossy().into();
    }
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    p
}

fn rctl_with(ctx: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin("rctl"))
        .arg("--context")
        .arg(ctx)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// Starts `bin ARGS` inside `netns`, output to `log`; killed by the caller.
fn spawn_in(netns: &str, bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::File::create(log)?;
    Ok(Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(bin)
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()?)
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn roles_tokens_and_foreign_certificates_are_refused() -> anyhow::Result<()> {
    let lab = LabGuard::up_with(&format!("sec{}", std::process::id() % 100000), 3, 1)?;
    let tmp = tempfile::tempdir()?;

    // The admin gets tokens; they pin this cluster's CA.
    let worker_token = lab
        .rctl(&["cluster", "join-token", "worker", "-q"])?
        .trim()
        .to_string();
    assert!(worker_token.starts_with("RDR1-"), "{worker_token}");
    assert_eq!(
        worker_token, lab.lab.worker_token,
        "the token the lab's agents joined with"
    );

    // An agent's certificate is a worker's: the Control API refuses it.
    let certs = lab.lab.hosts[1].data_dir.join("certs");
    wait_for(Duration::from_secs(15), "the agent's certificate", || {
        Ok(certs.join("node.pem").exists().then_some(()))
    })?;
    let agent_ctx = context(
        tmp.path(),
        "agent.json",
        &lab,
        Some((
            &certs.join("ca.pem"),
            &certs.join("node.pem"),
            &certs.join("node-key.pem"),
        )),
    );
    let err = rctl_with(&agent_ctx, &["get", "services"]).expect_err("worker cert on Control");
    assert!(
        err.contains("Control is for admin certificates") && err.contains("worker"),
        "{err}"
    );
    let err = rctl_with(&agent_ctx, &["cluster", "join-token", "manager"])
        .expect_err("worker cert asking for tokens");
    assert!(err.contains("admin"), "{err}");
    // The streaming task watch (what `rctl run` waits on) is Control too: refused the same.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let watch = rt.block_on(async {
        let ctx = rudder_ctl::context::load(&agent_ctx)?;
        let mut c = rudder_ctl::connect(&ctx).await?;
        anyhow::Ok(
            c.watch_tasks(rudder_proto::v1::ListTasksRequest {
                service: String::new(),
            })
            .await,
        )
    })?;
    let Err(err) = watch else {
        panic!("a worker certificate opened a task watch");
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // A controller joining with a worker token gets no certificate at all: controller names
    // (`controller-<raft id>`) are for manager tokens only (and raft would refuse a worker).
    let h2 = &lab.lab.hosts[1];
    let cdir = tmp.path().join("c2");
    let log = tmp.path().join("c2.log");
    let args: Vec<String> = vec![
        "--data-dir".into(),
        cdir.to_string_lossy().into(),
        "--listen".into(),
        format!("{}:4243", h2.addr),
        "--registry-listen".into(),
        format!("{}:5000", h2.addr),
        "--raft-id".into(),
        "2".into(),
        "--join".into(),
        lab.lab.first_controller_addr().to_string(),
        "--token".into(),
        worker_token.clone(),
    ];
    let c2 = Killed(spawn_in(&h2.netns, &bin("rudder-controller"), &args, &log)?);
    wait_for(
        Duration::from_secs(15),
        "the join refusing a worker token for a controller",
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text
                .contains("are for controllers (a manager join token)")
                .then_some(()))
        },
    )?;
    drop(c2);
    let info: Value = serde_json::from_str(&lab.rctl(&["cluster", "info", "-o", "json"])?)?;
    assert_eq!(info["managers"].as_array().map(Vec::len), Some(1), "{info}");

    // Rotation: the old worker token admits nobody.
    let new_token = lab
        .rctl(&["cluster", "join-token", "worker", "--rotate", "-q"])?
        .trim()
        .to_string();
    assert_ne!(new_token, worker_token);
    let h3 = &lab.lab.hosts[2];
    let alog = tmp.path().join("a.log");
    let aargs: Vec<String> = vec![
        "--data-dir".into(),
        tmp.path().join("a").to_string_lossy().into(),
        "--controller".into(),
        lab.lab.controller_url(),
        "--listen".into(),
        format!("{}:4299", h3.addr),
        "--hostname".into(),
        "late".into(),
        "--token".into(),
        worker_token,
    ];
    let agent = Killed(spawn_in(&h3.netns, &bin("rudder-agent"), &aargs, &alog)?);
    wait_for(Duration::from_secs(15), "the old token refused", || {
        let text = std::fs::read_to_string(&alog).unwrap_or_default();
        Ok(text.contains("rotated or never existed").then_some(()))
    })?;
    drop(agent);

    // A token with a time to live stops admitting once it is over.
    let short = lab
        .rctl(&[
            "cluster",
            "join-token",
            "worker",
            "--rotate",
            "--ttl",
            "1s",
            "-q",
        ])?
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let elog = tmp.path().join("e.log");
    let mut eargs = aargs.clone();
    *eargs.last_mut().expect("token arg") = short;
    eargs[1] = tmp.path().join("e").to_string_lossy().into();
    let expired = Killed(spawn_in(&h3.netns, &bin("rudder-agent"), &eargs, &elog)?);
    wait_for(Duration::from_secs(15), "the expired token refused", || {
        let text = std::fs::read_to_string(&elog).unwrap_or_default();
        Ok(text.contains("join token expired").then_some(()))
    })?;
    drop(expired);

    // A certificate from another CA, even an admin one, does not get through the handshake.
    let now = SystemTime::now();
    let foreign = ClusterCa::generate("other", now)?;
    let (key, csr) = ca::node_csr("admin")?;
    let cert = foreign.issue(&csr, Role::Admin, "admin", now, Duration::from_secs(3600))?;
    let dir = tmp.path();
    std::fs::write(dir.join("fca.pem"), foreign.cert_pem())?;
    std::fs::write(dir.join("fadmin.pem"), cert)?;
    std::fs::write(dir.join("fadmin-key.pem"), key)?;
    // Trusting our CA but presenting the foreign certificate: refused by the server.
    let admin = lab.lab.hosts[0].controller_data_dir().join("admin");
    let fctx = context(
        dir,
        "foreign.json",
        &lab,
        Some((
            &admin.join("ca.pem"),
            &dir.join("fadmin.pem"),
            &dir.join("fadmin-key.pem"),
        )),
    );
    let err = rctl_with(&fctx, &["get", "services"]).expect_err("foreign certificate");
    assert!(
        err.trim().len() > 20,
        "rctl failed without saying why: {err}"
    );
    // No certificate at all: plain HTTP/2 to a TLS server gets nowhere.
    let bare = context(dir, "bare.json", &lab, None);
    rctl_with(&bare, &["get", "services"]).expect_err("no certificate");

    // Nothing above disturbed the cluster.
    lab.rctl(&["get", "services"])
        .context("admin still served")?;
    Ok(())
}

/// Certificates renew on their own: with 20 s certificates, the agent's is replaced within
/// about 16 s, and the agent keeps working with the new one (a new session after the
/// controller restarts is made with it).
#[test]
fn certificates_renew_on_their_own() -> anyhow::Result<()> {
    let mut lab = LabGuard::up_args(
        &format!("ren{}", std::process::id() % 100000),
        2,
        1,
        &["--node-cert-validity", "20"],
    )?;
    let pem = lab.lab.hosts[1].data_dir.join("certs").join("node.pem");
    let first = wait_for(Duration::from_secs(15), "the agent's certificate", || {
        Ok(std::fs::read_to_string(&pem).ok())
    })?;
    let (_, first_expiry) = ca::cert_validity(&first)?;
    let renewed = wait_for(Duration::from_secs(30), "a renewed certificate", || {
        let now = std::fs::read_to_string(&pem).unwrap_or_default();
        Ok((!now.is_empty() && now != first).then_some(now))
    })?;
    let (_, expiry) = ca::cert_validity(&renewed)?;
    assert!(expiry > first_expiry, "the new certificate lasts longer");

    // A fresh session with the renewed certificate: restart the controller; the agent
    // opens a new session, and the new leader keeps it ready.
    let agent_log = lab.lab.hosts[1].agent_log();
    let sessions = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("session open")
            .count()
    };
    let before = sessions(&agent_log);
    lab.restart(0, rudder_tests::lab::Role::Controller, true)?;
    wait_for(Duration::from_secs(20), "a new session", || {
        Ok((sessions(&agent_log) > before).then_some(()))
    })?;
    // Past the new leader's grace period, h2 is still ready: its session is alive.
    std::thread::sleep(Duration::from_secs(7));
    let nodes: Vec<Value> = serde_json::from_str(&lab.rctl(&["get", "nodes", "-o", "json"])?)?;
    assert!(
        nodes
            .iter()
            .any(|n| n["hostname"] == "h2" && n["state"] == "ready"),
        "{nodes:?}"
    );
    let log = std::fs::read_to_string(lab.lab.hosts[1].agent_log())?;
    assert!(log.contains("node certificate renewed"), "agent log: {log}");
    Ok(())
}

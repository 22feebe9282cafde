//! The operator's path (issue 21) on a real lab: the lab sets up every host with `rudder init`
//! (h1) and `rudder join` (h2 as a manager, h3 and h4 as workers) and starts the daemons with
//! `--config`; this checks the files those commands wrote, the refusals of `rudder join` and
//! `rudder config check` (bad token, unknown token, unreachable address, a host already in a
//! cluster, an unknown key with its line, a token in a file others can read), and `rudder
//! leave`: a worker drains and is removed, a manager leaves the raft group, the last manager
//! is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use rudder_tests::{bin, lab_with_busybox_managers, wait_for, LabGuard};
use serde_json::Value;

/// `rudder ARGS` (bounded by `timeout`), the token in the environment; (success, stdout,
/// stderr).
fn rudder(args: &[&str], token: Option<&str>) -> anyhow::Result<(bool, String, String)> {
    let mut c = Command::new("timeout");
    c.arg("180")
        .arg(bin("rudder"))
        .args(args)
        .env_remove("RUDDER_JOIN_TOKEN")
        .stdin(Stdio::null());
    if let Some(t) = token {
        c.env("RUDDER_JOIN_TOKEN", t);
    }
    let out = c.output().context("run rudder")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn nodes(lab: &LabGuard) -> anyhow::Result<Vec<Value>> {
    Ok(serde_json::from_str(
        &lab.rctl(&["node", "ls", "-o", "json"])?,
    )?)
}

fn hostnames(lab: &LabGuard) -> anyhow::Result<Vec<String>> {
    let mut h: Vec<String> = nodes(lab)?
        .iter()
        .filter_map(|n| n["hostname"].as_str().map(str::to_string))
        .collect();
    h.sort();
    Ok(h)
}

fn write_mode(p: &Path, text: &str, m: u32) -> anyhow::Result<()> {
    std::fs::write(p, text)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))?;
    Ok(())
}

#[test]
fn init_join_leave_and_the_config_file() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox_managers("bs", 4, 2)?;
    let hosts = lab.lab.hosts.clone();
    let first = lab.lab.first_controller_addr().to_string();
    let (worker_token, manager_token) =
        (lab.lab.worker_token.clone(), lab.lab.manager_token.clone());

    // What init and join wrote: one private file per host, the role each token gave.
    let mut checks = Vec::new();
    for h in &hosts {
        let cfg = h.config_path();
        assert_eq!(mode(&cfg), 0o600, "{}", cfg.display());
        let (ok, out, err) = rudder(&["config", "check", "--config", path(&cfg)], None)?;
        assert!(ok, "config check {}: {err}", h.name);
        let text = std::fs::read_to_string(&cfg)?;
        for t in [&worker_token, &manager_token] {
            assert!(
                !text.contains(t.as_str()) && !out.contains(t.as_str()),
                "token in {}",
                cfg.display()
            );
        }
        checks.push(out);
    }
    assert!(
        checks[0].contains("raft_id=1") && checks[0].contains("role=manager"),
        "{}",
        checks[0]
    );
    assert!(
        checks[1].contains("raft_id=2") && checks[1].contains(&format!("join={first}")),
        "{}",
        checks[1]
    );
    let token_file = hosts[1].dir().join("join.token");
    assert_eq!(mode(&token_file), 0o600);
    assert_eq!(std::fs::read_to_string(&token_file)?.trim(), manager_token);
    for c in &checks[2..] {
        assert!(
            c.contains("role=worker") && c.contains("controller: none"),
            "{c}"
        );
        assert!(
            c.contains("join token: none"),
            "a worker keeps no token: {c}"
        );
    }
    wait_for(Duration::from_secs(60), "four ready nodes", || {
        Ok((nodes(&lab)?
            .iter()
            .filter(|n| n["state"] == "ready")
            .count()
            == 4)
            .then_some(()))
    })?;

    // Refusals of `rudder join`: nothing is written for a join that fails.
    let spare = tmp.path().join("spare");
    let spare_cfg = spare.join("rudder.toml");
    let join = |token: &str, addr: &str, cfg: &Path| {
        rudder(
            &[
                "join",
                "--start",
                "none",
                "--config",
                path(cfg),
                "--data-dir",
                path(&spare),
                addr,
            ],
            Some(token),
        )
    };
    let (ok, _, err) = join("RDR1-nope", &first, &spare_cfg)?;
    assert!(!ok && err.contains("bad join token"), "{err}");
    let fingerprint = worker_token.split('-').nth(1).context("token shape")?;
    let unknown = format!("RDR1-{fingerprint}-{}", "0".repeat(48));
    let (ok, _, err) = join(&unknown, &first, &spare_cfg)?;
    assert!(!ok && err.contains("not valid here"), "{err}");
    let (ok, _, err) = join(&worker_token, "127.0.0.1:1", &spare_cfg)?;
    assert!(!ok && err.contains("cannot reach the controller"), "{err}");
    assert!(!spare_cfg.exists(), "a failed join wrote its config");
    let (ok, _, err) = join(&worker_token, &first, &hosts[2].config_path())?;
    assert!(!ok && err.contains("already part of a cluster"), "{err}");
    // Without --advertise-addr: the address this host reaches the controller from, printed
    // and written (the root namespace reaches the lab from its root address).
    let (ok, out, err) = join(&worker_token, &first, &spare_cfg)?;
    assert!(ok, "{err}");
    let root = lab.lab.root_addr().to_string();
    assert!(
        out.contains(&format!(
            "advertise address {root} (this host's source address towards {first}"
        )),
        "{out}"
    );
    let written = std::fs::read_to_string(&spare_cfg)?;
    assert!(
        written.contains(&format!("advertise_addr = \"{root}\"")),
        "{written}"
    );

    // Refusals of the config itself, by `rudder config check` and by the daemons.
    let bad = tmp.path().join("bad.toml");
    write_mode(&bad, "data_dir = \"/x\"\n\n[agent]\nwg_prot = 1\n", 0o600)?;
    let (ok, _, err) = rudder(&["config", "check", "--config", path(&bad)], None)?;
    assert!(
        !ok && err.contains("bad.toml:4:") && err.contains("wg_prot"),
        "{err}"
    );
    let out = Command::new("timeout")
        .args(["30", path(&bin("rudder-agent")), "--config", path(&bad)])
        .stdin(Stdio::null())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.toml:4:"),
        "{err}"
    );
    let tok = tmp.path().join("tok.toml");
    write_mode(&tok, "[join]\ntoken = \"RDR1-sekrit\"\n", 0o644)?;
    let (ok, _, err) = rudder(&["config", "check", "--config", path(&tok)], None)?;
    assert!(
        !ok && err.contains("holds a join token") && err.contains("0644"),
        "{err}"
    );
    std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600))?;
    let (ok, out, err) = rudder(&["config", "check", "--config", path(&tok)], None)?;
    assert!(
        ok && !out.contains("sekrit") && out.contains("<redacted>"),
        "{out}{err}"
    );

    // A worker leaves: its tasks move, then it is gone.
    lab.apply(
        tmp.path(),
        "spread.yaml",
        "kind: Service\nname: spread\nimage: busybox:latest\nreplicas: 4\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"1000000\"]\n",
    )?;
    wait_for(Duration::from_secs(90), "4 spread tasks", || {
        Ok((lab.running_of("spread")?.len() == 4).then_some(()))
    })?;
    let ctx = lab.lab.context_path.clone();
    let leave = |cfg: &Path| {
        rudder(
            &[
                "leave",
                "--start",
                "none",
                "--config",
                path(cfg),
                "--context",
                path(&ctx),
            ],
            None,
        )
    };
    // A worker asks with its own certificate (no admin credentials: no --context).
    let (ok, out, err) = rudder(
        &[
            "leave",
            "--start",
            "none",
            "--config",
            path(&hosts[3].config_path()),
        ],
        None,
    )?;
    assert!(ok, "worker leave: {out}{err}");
    let running = lab.running_of("spread")?;
    assert!(running.iter().all(|t| t["node"] != "h4"), "{running:?}");
    assert_eq!(hostnames(&lab)?, ["h1", "h2", "h3"]);
    lab.lab.kill(3, rudder_tests::lab::Role::Agent)?;
    wait_for(Duration::from_secs(90), "4 spread tasks again", || {
        Ok((lab.running_of("spread")?.len() == 4).then_some(()))
    })?;

    // A manager leaves: the raft group shrinks to one.
    let (ok, out, err) = leave(&hosts[1].config_path())?;
    assert!(ok, "manager leave: {out}{err}");
    let info: Value = serde_json::from_str(&lab.rctl(&["cluster", "info", "-o", "json"])?)?;
    let managers = info["managers"].as_array().context("managers")?;
    assert_eq!(managers.len(), 1, "{info}");
    assert_eq!(hostnames(&lab)?, ["h1", "h3"]);
    lab.lab.kill(1, rudder_tests::lab::Role::Agent)?;
    lab.lab.kill(1, rudder_tests::lab::Role::Controller)?;

    // The last manager may not leave, and is left as it was (not drained).
    let (ok, _, err) = leave(&hosts[0].config_path())?;
    assert!(!ok && err.contains("only manager"), "{err}");
    let h1 = nodes(&lab)?
        .into_iter()
        .find(|n| n["hostname"] == "h1")
        .context("h1 listed")?;
    assert_eq!(h1["availability"], "active", "{h1}");
    Ok(())
}

//! The control plane at rest (issue 14), over a real lab of three controllers:
//!
//! - after `rctl local up` and a service whose environment holds a random marker, no file under
//!   any controller's data dir holds the marker, the CA key (no PEM private key but the node's
//!   own and the first controller's admin key; the CA key is only in `ca-key.sealed`), or a
//!   join token (neither whole nor its secret);
//! - `rctl cluster rotate-data-key` gives every controller a new data key, re-encrypts, deletes
//!   the old key; the controllers restart from their re-encrypted logs with the service intact,
//!   and still nothing is in the clear.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use rudder_tests::lab;
use rudder_tests::{wait_for, LabGuard};
use serde_json::Value;

/// Every file under `dir` holding `needle`.
fn files_with(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return hits;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            hits.extend(files_with(&p, needle));
        } else if meta.is_file() {
            if let Ok(b) = std::fs::read(&p) {
                if b.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p);
                }
            }
        }
    }
    hits
}

fn token(lab: &LabGuard, role: &str) -> anyhow::Result<String> {
    Ok(lab
        .rctl(&["cluster", "join-token", role, "-q"])?
        .trim()
        .to_string())
}

/// Fails naming every plaintext found under the controllers' data dirs.
fn nothing_in_the_clear(lab: &LabGuard, marker: &str) -> anyhow::Result<()> {
    let mut needles: Vec<(String, String)> = vec![("the env marker".into(), marker.into())];
    for role in ["worker", "manager"] {
        let t = token(lab, role)?;
        let secret = t.rsplit('-').next().context("token secret")?.to_string();
        anyhow::ensure!(secret.len() >= 16, "token secret {secret:?}");
        needles.push((format!("the {role} token"), t));
        needles.push((format!("the {role} token's secret"), secret));
    }
    let mut found = Vec::new();
    for h in &lab.lab.hosts {
        let dir = h.controller_data_dir();
        if !dir.exists() {
            continue;
        }
        for (what, n) in &needles {
            for f in files_with(&dir, n.as_bytes()) {
                found.push(format!("{what} in {}", f.display()));
            }
        }
        // Private keys: the node's own (certs/node-key.pem) and the admin's; never the CA's.
        for f in files_with(&dir, b"PRIVATE KEY") {
            let rel = f.strip_prefix(&dir)?.to_string_lossy().into_owned();
            if rel != "certs/node-key.pem" && rel != "admin/admin-key.pem" {
                found.push(format!("a private key in {}", f.display()));
            }
        }
    }
    anyhow::ensure!(found.is_empty(), "in the clear: {found:#?}");
    Ok(())
}

fn service_env(lab: &LabGuard) -> anyhow::Result<Option<String>> {
    let out = lab.rctl(&["get", "services", "-o", "json"])?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(v.to_string().contains("MARKER").then_some(out))
}

#[test]
fn the_control_plane_at_rest_holds_no_plaintext_and_rotates_its_keys() -> anyhow::Result<()> {
    let mut lab = LabGuard::up_with(&format!("atr{}", std::process::id() % 100000), 3, 3)?;
    let tmp = tempfile::tempdir()?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let marker = format!("MARKER{nanos:x}{:08x}", std::process::id());
    lab.apply(
        tmp.path(),
        "svc.yaml",
        &format!(
            "kind: Service\nname: atrest\nimage: busybox:latest\ncommand: [\"sleep\", \"100000\"]\nenv:\n  SECRET: {marker}\nreplicas: 1\n"
        ),
    )?;
    // Every controller has the service (and so the marker) in its log.
    wait_for(
        Duration::from_secs(30),
        "the service on every controller",
        || service_env(&lab),
    )?;
    // Let the log reach every member's disk.
    std::thread::sleep(Duration::from_secs(2));
    let first = lab.lab.hosts[0].controller_data_dir().join("certs");
    assert!(!first.join("ca-key.pem").exists(), "no CA key in clear");
    assert!(first.join("ca-key.sealed").exists());
    assert!(
        !lab.lab.hosts[0]
            .controller_data_dir()
            .join("admin/worker.token")
            .exists(),
        "the token hand-off files are gone"
    );
    nothing_in_the_clear(&lab, &marker)?;

    let keyring = |i: usize| -> anyhow::Result<Value> {
        let p = lab.lab.hosts[i]
            .controller_data_dir()
            .join("certs/raft-dek");
        Ok(serde_json::from_slice(&std::fs::read(&p)?)?)
    };
    let before: Vec<Value> = (0..3).map(keyring).collect::<Result<_, _>>()?;
    let out = lab.rctl(&["cluster", "rotate-data-key"])?;
    assert_eq!(out.matches("the old key deleted").count(), 3, "{out}");
    for (i, old) in before.iter().enumerate() {
        let now = keyring(i)?;
        assert_eq!(
            now["previous"],
            serde_json::json!([]),
            "{i}: old key deleted"
        );
        assert_ne!(
            now["current"]["key"], old["current"]["key"],
            "{i}: a new key"
        );
        assert_eq!(now["current"]["id"], 2);
    }
    // Every controller reads its re-encrypted log with the new key alone.
    for i in 0..3 {
        lab.restart(i, lab::Role::Controller, false)?;
    }
    wait_for(
        Duration::from_secs(60),
        "the service after the restarts",
        || Ok(service_env(&lab).ok().flatten()),
    )?;
    nothing_in_the_clear(&lab, &marker)?;
    let log = std::fs::read_to_string(lab.lab.hosts[0].controller_log())?;
    assert!(log.contains("retired the old data keys"), "controller log");
    Ok(())
}

//! Secrets at rest and in process listings, over a real lab (SECURITY-AUDIT C2, H1):
//!
//! - no process of the lab carries a join token on its command line (`/proc/<pid>/cmdline` is
//!   readable by every local user): not the agents, not a controller that joined, not the
//!   controller a promoted host's agent starts;
//! - `lab.json` (which keeps the tokens) and `context.json` are 0600 in a 0700 lab dir;
//! - a controller's data dir is 0700 and its raft log and snapshots 0600;
//! - `rctl cluster join-token` suggests the environment form, not `--token`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use rudder_tests::{wait_for, LabGuard};
use serde_json::Value;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every process whose command line holds `needle`: (pid, command line).
fn cmdlines_with(needle: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(needle) {
            out.push((name, line));
        }
    }
    out
}

#[test]
fn join_tokens_stay_out_of_command_lines_and_lab_files_are_private() -> anyhow::Result<()> {
    let lab = LabGuard::up_with(&format!("sk{}", std::process::id() % 100000), 3, 2)?;
    let dir = lab.lab.dir.clone();
    let (worker, manager) = (lab.lab.worker_token.clone(), lab.lab.manager_token.clone());
    assert!(worker.starts_with("RDR1-") && manager.starts_with("RDR1-"));

    wait_for(Duration::from_secs(30), "three ready nodes", || {
        let nodes: Vec<Value> = serde_json::from_str(&lab.rctl(&["get", "nodes", "-o", "json"])?)?;
        Ok((nodes.iter().filter(|n| n["state"] == "ready").count() == 3).then_some(()))
    })?;
    // h3's agent starts a controller that joins with the manager token it was sent.
    lab.rctl(&["node", "promote", "h3"])?;
    let promoted = lab.lab.hosts[2].data_dir.join("controller");
    let needle = promoted.to_string_lossy().into_owned();
    wait_for(
        Duration::from_secs(30),
        "the promoted host's controller",
        || {
            Ok(cmdlines_with(&needle)
                .iter()
                .any(|(_, l)| l.contains("rudder-controller"))
                .then_some(()))
        },
    )?;

    // The lab's own processes are running (so the scan below sees them)...
    let lab_dir = dir.to_string_lossy().into_owned();
    let ours = cmdlines_with(&lab_dir);
    assert!(
        ours.iter()
            .filter(|(_, l)| l.contains("rudder-agent"))
            .count()
            >= 3
            && ours
                .iter()
                .filter(|(_, l)| l.contains("rudder-controller"))
                .count()
                >= 3,
        "{ours:#?}"
    );
    // ...and none of them, nor anything else, shows a token.
    for token in [&worker, &manager] {
        let leaks = cmdlines_with(token);
        assert!(leaks.is_empty(), "token in a command line: {leaks:#?}");
    }
    let leaks: Vec<_> = ours
        .into_iter()
        .filter(|(_, l)| l.contains("RDR1-"))
        .collect();
    assert!(leaks.is_empty(), "token in a lab command line: {leaks:#?}");

    assert_eq!(mode(&dir), 0o700, "lab dir");
    assert_eq!(mode(&dir.join("lab.json")), 0o600, "lab.json");
    assert_eq!(mode(&lab.lab.context_path), 0o600, "context.json");
    for host in &lab.lab.hosts[..2] {
        let c = host.controller_data_dir();
        assert_eq!(mode(&c), 0o700, "{}", c.display());
        assert_eq!(mode(&c.join("raft.redb")), 0o600);
        assert_eq!(mode(&c.join("admin")), 0o700);
        assert_eq!(mode(&c.join("registry")), 0o700);
        assert_eq!(mode(&c.join("snapshots")), 0o700);
        for f in std::fs::read_dir(c.join("snapshots"))?.flatten() {
            assert_eq!(mode(&f.path()), 0o600, "{}", f.path().display());
        }
    }
    wait_for(
        Duration::from_secs(30),
        "the promoted controller's log",
        || Ok(promoted.join("raft.redb").exists().then_some(())),
    )?;
    assert_eq!(mode(&promoted), 0o700);
    assert_eq!(mode(&promoted.join("raft.redb")), 0o600);

    let hint = lab.rctl(&["cluster", "join-token", "worker"])?;
    assert!(hint.contains("RUDDER_JOIN_TOKEN=RDR1-"), "{hint}");
    assert!(!hint.contains("--token"), "{hint}");
    Ok(())
}

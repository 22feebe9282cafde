//! Autolock (issue 14), over a real lab of three controllers:
//!
//! - `rctl cluster autolock on` prints an unlock key; every controller's keyring file is then
//!   wrapped with it (it no longer holds the raw data key);
//! - a restarted controller comes up locked: `rctl` against it says so, while `rctl get
//!   services` through the others works; a wrong key is refused and it stays locked;
//! - `rctl cluster unlock` with the right key brings it back: three members, caught up.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rudder_tests::lab;
use rudder_tests::{bin, wait_for, LabGuard};
use serde_json::Value;

struct Started(std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `rctl --context CTX --controller URL ARGS` with `stdin`: (success, stdout, stderr).
fn rctl_at(lab: &LabGuard, url: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = Command::new(bin("rctl"))
        .arg("--context")
        .arg(&lab.lab.context_path)
        .args(["--controller", url])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rctl");
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    let out = child.wait_with_output().expect("rctl output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wrapped(dir: &Path) -> bool {
    std::fs::read(dir.join("certs/raft-dek"))
        .map(|b| b.starts_with(rudder_pki::crypt::WRAPPED_MAGIC))
        .unwrap_or(false)
}

#[test]
fn a_restarted_controller_stays_locked_until_unlocked() -> anyhow::Result<()> {
    let lab = LabGuard::up_with(&format!("alk{}", std::process::id() % 100000), 3, 3)?;
    let tmp = tempfile::tempdir()?;
    lab.apply(
        tmp.path(),
        "svc.yaml",
        "kind: Service\nname: locked\nimage: busybox:latest\ncommand: [\"sleep\", \"100000\"]\nreplicas: 1\n",
    )?;
    let h2 = lab.lab.hosts[1].clone();
    let data = h2.controller_data_dir();
    let plain: Value = serde_json::from_slice(&std::fs::read(data.join("certs/raft-dek"))?)?;
    let raw_dek = plain["current"]["key"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(raw_dek.len(), 64);

    let key = lab.rctl(&["cluster", "autolock", "on"])?.trim().to_string();
    assert!(key.starts_with("RDRKEK-"), "{key}");
    assert_eq!(
        lab.rctl(&["cluster", "unlock-key", "-q"])?.trim(),
        key,
        "the same key shown again"
    );
    for h in &lab.lab.hosts[..3] {
        let d = h.controller_data_dir();
        wait_for(Duration::from_secs(20), "every keyring wrapped", || {
            Ok(wrapped(&d).then_some(()))
        })?;
    }
    let file = std::fs::read(data.join("certs/raft-dek"))?;
    let dek: Vec<u8> = (0..raw_dek.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&raw_dek[i..i + 2], 16))
        .collect::<Result<_, _>>()?;
    assert!(
        !file
            .windows(16)
            .any(|w| w == &raw_dek.as_bytes()[..16] || w == &dek[..16]),
        "the wrapped keyring holds the raw data key"
    );

    // Controller 2 restarts: locked.
    lab.lab.kill(1, lab::Role::Controller)?;
    let log = tmp.path().join("c2.log");
    let f = std::fs::File::create(&log)?;
    let first = lab.lab.hosts[0].controller_addr().to_string();
    let _c2 = Started(
        Command::new("ip")
            .args(["netns", "exec", &h2.netns])
            .arg(bin("rudder-controller"))
            .args(["--data-dir", &data.to_string_lossy()])
            .args(["--listen", &h2.controller_addr().to_string()])
            .args(["--registry-listen", &format!("{}:5000", h2.addr)])
            .args(["--raft-id", "2", "--node-name", &h2.name])
            .args(["--join", &first])
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?,
    );
    let url = format!("http://{}", h2.controller_addr());
    wait_for(Duration::from_secs(20), "the controller locked", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text
            .contains("locked: run `rctl cluster unlock")
            .then_some(()))
    })?;
    let (ok, _, err) = wait_for(Duration::from_secs(10), "rctl reaching it", || {
        let r = rctl_at(&lab, &url, &["get", "services"], "");
        Ok((!r.2.contains("unavailable")).then_some(r))
    })?;
    assert!(!ok && err.contains("this controller is locked"), "{err}");
    // Through the others the cluster works.
    let (ok, out, err) = rctl_at(&lab, &format!("http://{first}"), &["get", "services"], "");
    assert!(ok && out.contains("locked"), "{out}{err}");
    // A wrong key is refused; it stays locked.
    let wrong = format!("RDRKEK-{}", "ab".repeat(32));
    let (ok, _, err) = rctl_at(&lab, &url, &["cluster", "unlock"], &wrong);
    assert!(!ok && err.contains("does not open"), "{err}");
    let (ok, _, err) = rctl_at(&lab, &url, &["cluster", "info"], "");
    assert!(!ok && err.contains("locked"), "{err}");
    // The right key brings it back.
    let (ok, _, err) = rctl_at(&lab, &url, &["cluster", "unlock"], &format!("{key}\n"));
    assert!(ok, "{err}");
    let leader_applied = || -> anyhow::Result<u64> {
        let v: Value = serde_json::from_str(&lab.rctl(&["cluster", "info", "-o", "json"])?)?;
        Ok(v["applied"].as_u64().unwrap_or(0))
    };
    let target = leader_applied()?;
    wait_for(
        Duration::from_secs(30),
        "the unlocked controller caught up",
        || {
            let (ok, out, _) = rctl_at(&lab, &url, &["cluster", "info", "-o", "json"], "");
            if !ok {
                return Ok(None);
            }
            let v: Value = serde_json::from_str(&out)?;
            let members = v["managers"].as_array().map(|m| m.len()).unwrap_or(0);
            let applied = v["applied"].as_u64().unwrap_or(0);
            Ok((members == 3 && applied >= target).then_some(()))
        },
    )?;
    let (ok, out, err) = rctl_at(&lab, &url, &["get", "services"], "");
    assert!(ok && out.contains("locked"), "{out}{err}");
    assert!(wrapped(&data), "still wrapped after the unlock");
    let text = std::fs::read_to_string(&log)?;
    assert!(
        text.contains("unlock refused: a wrong unlock key"),
        "{text}"
    );
    assert!(text.contains("unlocked: the keyring is open"), "{text}");
    // Rotation: a new key, every keyring re-wrapped with it.
    let before: Vec<Vec<u8>> = lab.lab.hosts[..3]
        .iter()
        .map(|h| std::fs::read(h.controller_data_dir().join("certs/raft-dek")))
        .collect::<Result<_, _>>()?;
    let new_key = lab
        .rctl(&["cluster", "unlock-key", "--rotate", "-q"])?
        .trim()
        .to_string();
    assert!(
        new_key.starts_with("RDRKEK-") && new_key != key,
        "{new_key}"
    );
    for (h, old) in lab.lab.hosts[..3].iter().zip(&before) {
        let p = h.controller_data_dir().join("certs/raft-dek");
        wait_for(Duration::from_secs(20), "every keyring re-wrapped", || {
            let now = std::fs::read(&p)?;
            Ok((&now != old && now.starts_with(rudder_pki::crypt::WRAPPED_MAGIC)).then_some(()))
        })?;
    }
    // Off: every keyring unwrapped again.
    lab.rctl(&["cluster", "autolock", "off"])?;
    for h in &lab.lab.hosts[..3] {
        let d = h.controller_data_dir();
        wait_for(Duration::from_secs(20), "every keyring unwrapped", || {
            Ok((!wrapped(&d)).then_some(()))
        })?;
    }
    Ok(())
}

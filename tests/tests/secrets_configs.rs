//! Secrets and configs over a real lab (issue 14):
//!
//! - a secret reaches only the host that runs a task using it: the other hosts' data dirs and
//!   the mount table hold nothing of it; on the task's host it is on a tmpfs;
//! - the container reads the value at `/run/secrets/NAME` with the reference's uid, gid and
//!   mode, a config at its target, and an `env_from_secret` value in its environment;
//! - no plaintext (nor its base64, as the store keeps it) is in any lab data dir or log file,
//!   nor in the command line or environment of any lab process outside the containers;
//! - `rctl secret update` rolls the service and the new container reads the new value;
//! - `rctl secret rm` is refused while a service uses the secret; a value over 500 KiB and a
//!   service referencing a missing secret are refused with the reason;
//! - `rctl secret inspect|ls` and `rctl inspect` show metadata only.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rudder_tests::{exec, lab_with_busybox_managers, running_tasks, wait_for, LabGuard};

fn random_value(tag: &str) -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("urandom");
    format!(
        "{tag}-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

fn base64(data: &[u8]) -> String {
    const B: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The needles for `values`: each plaintext, and its base64 without padding.
fn needles(values: &[&str]) -> Vec<Vec<u8>> {
    values
        .iter()
        .flat_map(|v| {
            [
                v.as_bytes().to_vec(),
                base64(v.as_bytes())
                    .trim_end_matches('=')
                    .as_bytes()
                    .to_vec(),
            ]
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every regular file below `dir` on `dir`'s own file system (tmpfs and overlay mounts below
/// it are memory or the containers' view, not the host's disk), searched for `needles`.
fn search_disk(dir: &Path, needles: &[Vec<u8>], found: &mut Vec<String>) {
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return;
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.dev() != root.dev() {
                continue;
            }
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                if let Ok(bytes) = std::fs::read(&p) {
                    for n in needles {
                        if contains(&bytes, n) {
                            found.push(format!(
                                "{} holds {:?}",
                                p.display(),
                                String::from_utf8_lossy(n)
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// The command lines and environments of every process that is not inside one of the lab's
/// containers (whose environment rightly holds an `env_from_secret` value).
fn search_processes(lab: &LabGuard, needles: &[Vec<u8>], found: &mut Vec<String>) {
    let parents: Vec<String> = lab
        .lab
        .hosts
        .iter()
        .map(|h| h.cgroup_parent.clone())
        .collect();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if parents.iter().any(|p| cgroup.contains(p.as_str())) {
            continue;
        }
        for file in ["cmdline", "environ"] {
            let bytes = std::fs::read(e.path().join(file)).unwrap_or_default();
            for n in needles {
                if contains(&bytes, n) {
                    let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                    found.push(format!(
                        "/proc/{name}/{file} ({}) holds {:?}",
                        String::from_utf8_lossy(&cmd).replace('\0', " "),
                        String::from_utf8_lossy(n)
                    ));
                }
            }
        }
    }
}

fn assert_nowhere(lab: &LabGuard, values: &[&str]) {
    let needles = needles(values);
    let mut found = Vec::new();
    search_disk(&lab.lab.dir, &needles, &mut found);
    search_processes(lab, &needles, &mut found);
    assert!(found.is_empty(), "plaintexts found:\n{}", found.join("\n"));
}

/// The tmpfs mounts (mount points) below the data dir `dir`, other than the agent's run dir
/// (`<data>/run`, a tmpfs on every host for namespaces and network files, never a secret).
fn tmpfs_below(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    let run = dir.join("run").display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&prefix)))
        .filter(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("tmpfs "))
        })
        .map(|l| l.split(' ').nth(4).unwrap_or_default().to_string())
        .filter(|m| *m != run)
        .collect()
}

fn app(extra: &str) -> String {
    format!(
        "kind: Service\nname: app\nimage: busybox:latest\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"1000000\"]\n\
         placement:\n  constraints: [\"node.hostname==h2\"]\n\
         secrets:\n  - source: dbpw\n    uid: 1000\n    gid: 1001\n    mode: 0400\n\
         configs:\n  - source: appconf\n    target: /etc/app.conf\n    uid: root\n\
         env_from_secret:\n  DB_PASSWORD: envpw\n{extra}"
    )
}

/// The running task of `app` whose container reads `want` at /run/secrets/dbpw.
fn task_reading(lab: &LabGuard, want: &str) -> anyhow::Result<serde_json::Value> {
    wait_for(
        Duration::from_secs(90),
        &format!("app reading {want}"),
        || {
            for t in running_tasks(&lab.tasks("app")?) {
                let (ok, out) = exec(lab, t, &["cat", "/run/secrets/dbpw"])?;
                if ok && out == want {
                    return Ok(Some(t.clone()));
                }
            }
            Ok(None)
        },
    )
}

#[test]
fn secrets_and_configs_reach_only_their_tasks_and_never_a_disk() -> anyhow::Result<()> {
    // Three controllers: values (up to the 500 KiB limit) replicate through raft.
    let (lab, tmp) = lab_with_busybox_managers("sc", 3, 3)?;
    let (s1, s2, c1, e1) = (
        random_value("dbpw1"),
        random_value("dbpw2"),
        random_value("conf"),
        random_value("envpw"),
    );
    let all = [s1.as_str(), s2.as_str(), c1.as_str(), e1.as_str()];
    let file = |name: &str, value: &str| -> anyhow::Result<String> {
        let p = tmp.path().join(name);
        std::fs::write(&p, value)?;
        Ok(p.to_str().context("utf-8")?.to_string())
    };

    // Created from a file and from stdin; an over-size value is refused before it is sent.
    let out = lab.rctl(&["secret", "create", "dbpw", &file("s1", &s1)?])?;
    assert!(out.contains("secret/dbpw created (version 1)"), "{out}");
    let out = lab.rctl_with(&["secret", "create", "envpw", "-"], &[], Some(&e1))?;
    assert!(out.contains("created"), "{out}");
    let limit = file("limit", &"y".repeat(500 * 1024))?;
    let out = lab.rctl(&["secret", "create", "limit", &limit])?;
    assert!(out.contains("created"), "{out}");
    let big = file("big", &"x".repeat(500 * 1024 + 1))?;
    let e = lab
        .rctl(&["secret", "create", "big", &big])
        .unwrap_err()
        .to_string();
    assert!(e.contains("500 KiB"), "{e}");
    let e = lab
        .rctl(&["secret", "create", "dbpw", &big])
        .unwrap_err()
        .to_string();
    assert!(e.contains("500 KiB"), "{e}");

    // A service referencing a missing secret is refused, naming the field.
    let e = lab
        .apply(
            tmp.path(),
            "bad.yaml",
            &app("").replace("source: dbpw", "source: nope"),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("secrets[0].source: secret \"nope\" not found"),
        "{e}"
    );

    // The config comes in the same manifest as the service.
    let manifest = format!(
        "kind: Config\nname: appconf\ndata: \"{c1}\"\n---\n{}",
        app("")
    );
    let out = lab.apply(tmp.path(), "app.yaml", &manifest)?;
    assert!(out.contains("config/appconf created"), "{out}");
    assert!(out.contains("service/app created"), "{out}");
    std::fs::remove_file(tmp.path().join("app.yaml"))?;
    let t = task_reading(&lab, &s1)?;
    assert_eq!(t["node"], "h2");

    // Owner and mode as referenced; read-only; the config at its target; the env value.
    let (ok, out) = exec(&lab, &t, &["stat", "-c", "%u %g %a", "/run/secrets/dbpw"])?;
    assert!(ok && out.trim() == "1000 1001 400", "{out}");
    let (ok, out) = exec(&lab, &t, &["stat", "-c", "%u %a", "/etc/app.conf"])?;
    assert!(ok && out.trim() == "0 444", "{out}");
    let (ok, out) = exec(&lab, &t, &["cat", "/etc/app.conf"])?;
    assert!(ok && out == c1, "{out}");
    let (ok, out) = exec(&lab, &t, &["sh", "-c", "echo x > /run/secrets/dbpw"])?;
    assert!(!ok && out.contains("Read-only"), "{out}");
    let (ok, out) = exec(&lab, &t, &["cat", "/proc/1/environ"])?;
    assert!(ok && out.contains(&format!("DB_PASSWORD={e1}")), "{out}");

    // Only h2 has a tmpfs for it; the others have nothing.
    let h2 = lab.host("h2").data_dir.clone();
    assert_eq!(tmpfs_below(&h2).len(), 1, "{:?}", tmpfs_below(&h2));
    for h in ["h1", "h3"] {
        let d = lab.host(h).data_dir.clone();
        assert!(tmpfs_below(&d).is_empty(), "{h}: {:?}", tmpfs_below(&d));
    }

    // Metadata only, everywhere rctl shows things.
    let inspect = lab.rctl(&["secret", "inspect", "dbpw"])?;
    assert!(
        inspect.contains("\"version\": 1") && inspect.contains("sha256:"),
        "{inspect}"
    );
    let shown = [
        inspect,
        lab.rctl(&["secret", "ls", "-o", "json"])?,
        lab.rctl(&["get", "services", "-o", "json"])?,
        lab.rctl(&["inspect", t["name"].as_str().context("name")?])?,
        lab.rctl(&["ps", "app", "-o", "json"])?,
    ];
    for out in &shown {
        for n in needles(&all) {
            assert!(!contains(out.as_bytes(), &n), "{out}");
        }
    }
    let e = lab
        .rctl(&["secret", "inspect", "dbpw", "--data"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("never shown"), "{e}");
    let out = lab.rctl(&["config", "inspect", "appconf", "--data"])?;
    assert_eq!(out, c1);

    // In use: removal refused, naming the service.
    let e = lab.rctl(&["secret", "rm", "dbpw"]).unwrap_err().to_string();
    assert!(e.contains("in use by service(s) app"), "{e}");

    // Rotation rolls the service; the new container reads the new value.
    let out = lab.rctl(&["secret", "update", "dbpw", &file("s2", &s2)?])?;
    assert!(out.contains("secret/dbpw updated (version 2)"), "{out}");
    let t2 = task_reading(&lab, &s2)?;
    assert_ne!(t2["id"], t["id"]);
    wait_for(Duration::from_secs(60), "one tmpfs on h2", || {
        Ok((tmpfs_below(&h2).len() == 1).then_some(()))
    })?;
    // Version 1 stays while the service's previous spec (a rollback) resolves to it.
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.rctl(&["secret", "inspect", "dbpw"])?)?;
    let kept: Vec<u64> = inspect["versions"]
        .as_array()
        .context("versions")?
        .iter()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    assert_eq!(kept, vec![1, 2], "{inspect}");

    for f in ["s1", "s2", "big", "limit"] {
        std::fs::remove_file(tmp.path().join(f))?;
    }
    assert_nowhere(&lab, &all);

    // Once the service is gone, its tmpfs is too, and the secret can go.
    lab.rctl(&["rm", "app"])?;
    wait_for(Duration::from_secs(60), "app's tmpfs gone", || {
        Ok(tmpfs_below(&h2).is_empty().then_some(()))
    })?;
    wait_for(Duration::from_secs(30), "dbpw removable", || {
        Ok(lab.rctl(&["secret", "rm", "dbpw"]).ok().map(|_| ()))
    })?;
    let out = lab.rctl(&["secret", "ls"])?;
    assert!(!out.contains("dbpw") && out.contains("envpw"), "{out}");
    let ls: serde_json::Value = serde_json::from_str(&lab.rctl(&["secret", "ls", "-o", "json"])?)?;
    let sizes: Vec<u64> = ls
        .as_array()
        .context("list")?
        .iter()
        .filter(|s| s["name"] == "limit")
        .filter_map(|s| s["versions"][0]["size"].as_u64())
        .collect();
    assert_eq!(sizes, vec![500 * 1024], "{ls}");
    assert_nowhere(&lab, &all);
    Ok(())
}

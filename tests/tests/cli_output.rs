//! `-o json|yaml` on every listing and `inspect` of rctl, on a real one-host lab: each parses
//! (serde_json / serde_yaml) to the same value and names the objects made; `rctl get KIND`
//! lists every kind under its singular and plural names; `rctl run -d` prints a name that
//! `ps`, `logs`, `exec` and `rm` take; a piped `rctl image import` draws no progress bar.

use std::process::{Command, Stdio};

use anyhow::Context;
use rudder_tests::{bin, lab_with_busybox, wait_for, LabGuard};
use serde_json::Value;

/// `rctl ARGS -o json` and `-o yaml`, both parsed; they must agree.
fn both(lab: &LabGuard, args: &[&str]) -> anyhow::Result<Value> {
    let json = lab.rctl(&[args, &["-o", "json"]].concat())?;
    let yaml = lab.rctl(&[args, &["-o", "yaml"]].concat())?;
    let j: Value =
        serde_json::from_str(&json).with_context(|| format!("{args:?} -o json: {json}"))?;
    let y: Value =
        serde_yaml::from_str(&yaml).with_context(|| format!("{args:?} -o yaml: {yaml}"))?;
    // Listings that carry ages or live counts may move between the two calls; names do not.
    assert_eq!(names(&j), names(&y), "{args:?}: json and yaml disagree");
    Ok(j)
}

/// Every `name`/`hostname`/`repository` value anywhere in `v`, sorted.
fn names(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if matches!(k.as_str(), "name" | "hostname" | "repository") {
                        if let Some(s) = x.as_str() {
                            out.push(s.to_string());
                        }
                    }
                    walk(x, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(v, &mut out);
    out.sort();
    out
}

fn has(v: &Value, name: &str) -> bool {
    names(v).iter().any(|n| n == name)
}

#[test]
fn every_listing_and_inspect_prints_json_and_yaml() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("out", 1)?;
    let host = lab.lab.hosts[0].name.clone();
    let p = |f: &str| tmp.path().join(f).to_string_lossy().into_owned();
    std::fs::write(
        p("objs.yaml"),
        "kind: Network\nname: backnet\n---\nkind: Volume\nname: datavol\n---\n\
         kind: Service\nname: web\nimage: busybox:latest\nstop_grace_period: 1\n\
         networks: [backnet]\ncommand: [\"/bin/sleep\", \"1000000\"]\n",
    )?;
    lab.rctl(&["apply", "-f", &p("objs.yaml")])?;
    std::fs::write(p("value"), "s3cret-value")?;
    lab.rctl(&["secret", "create", "dbpw", &p("value")])?;
    lab.rctl(&["config", "create", "appconf", &p("value")])?;
    std::fs::write(
        p("compose.yaml"),
        "services:\n  api:\n    image: busybox:latest\n    command: [\"sleep\", \"1000000\"]\n",
    )?;
    lab.rctl(&["stack", "deploy", "-c", &p("compose.yaml"), "shop"])?;
    let task = rudder_tests::running_task(&lab, "web")?;
    let task_name = task["name"].as_str().context("task name")?.to_string();

    // Listings: each through its own command and through `get`.
    for (args, want) in [
        (vec!["ps"], task_name.as_str()),
        (vec!["get", "tasks"], task_name.as_str()),
        (vec!["get", "services"], "web"),
        (vec!["get", "svc"], "shop-api"),
        (vec!["get", "nodes"], host.as_str()),
        (vec!["node", "ls"], host.as_str()),
        (vec!["get", "networks"], "backnet"),
        (vec!["network", "ls"], "backnet"),
        (vec!["get", "volume"], "datavol"),
        (vec!["volume", "ls"], "datavol"),
        (vec!["get", "secrets"], "dbpw"),
        (vec!["secret", "ls"], "dbpw"),
        (vec!["get", "configs"], "appconf"),
        (vec!["config", "ls"], "appconf"),
        (vec!["get", "stacks"], "shop"),
        (vec!["stack", "ls"], "shop"),
        (vec!["stack", "services", "shop"], "shop-api"),
        (vec!["image", "ls"], "busybox"),
        (vec!["image", "history", "busybox:latest"], ""),
    ] {
        let v = both(&lab, &args)?;
        assert!(v.is_array() || v.is_object(), "{args:?}: {v}");
        if !want.is_empty() {
            assert!(has(&v, want), "{args:?} lacks {want}: {v}");
        }
    }
    let stack_ps = both(&lab, &["stack", "ps", "shop"])?;
    assert!(
        stack_ps.to_string().contains("shop-api"),
        "stack ps: {stack_ps}"
    );

    // Inspects (JSON by default, as before) and describe.
    for (args, want) in [
        (vec!["inspect", task_name.as_str()], "web"),
        (vec!["describe", "web"], "web"),
        (vec!["node", "inspect", host.as_str()], host.as_str()),
        (vec!["network", "inspect", "backnet"], "backnet"),
        (vec!["volume", "inspect", "datavol"], "datavol"),
        (vec!["secret", "inspect", "dbpw"], "dbpw"),
        (vec!["config", "inspect", "appconf"], "appconf"),
    ] {
        let v = both(&lab, &args)?;
        assert!(v.is_object(), "{args:?}: {v}");
        assert!(v.to_string().contains(want), "{args:?} lacks {want}: {v}");
    }
    let default: Value = serde_json::from_str(&lab.rctl(&["network", "inspect", "backnet"])?)?;
    assert_eq!(default["name"], "backnet", "inspect prints JSON by default");
    let image = both(&lab, &["image", "inspect", "busybox:latest"])?;
    assert!(image["digest"]
        .as_str()
        .is_some_and(|d| d.starts_with("sha256:")));
    // A secret's value is never shown, in any form.
    for args in [
        vec!["secret", "inspect", "dbpw", "-o", "yaml"],
        vec!["secret", "ls", "-o", "yaml"],
        vec!["get", "secrets", "-o", "json"],
    ] {
        let out = lab.rctl(&args)?;
        assert!(!out.contains("s3cret-value"), "{args:?}: {out}");
    }

    // The cluster and its events (a YAML document per event).
    let info = both(&lab, &["cluster", "info"])?;
    let applied = info["applied"].as_u64().context("applied")?.to_string();
    let events = lab.rctl(&["events", "-o", "yaml", "--since", "0", "--until", &applied])?;
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&events)
        .map(|d| serde::Deserialize::deserialize(d).map_err(anyhow::Error::from))
        .collect::<anyhow::Result<_>>()?;
    assert!(
        docs.iter()
            .any(|e| e["type"] == "service" && e["service"] == "web"),
        "{events}"
    );

    // Tables stay the default.
    let nets = lab.rctl(&["get", "net"])?;
    assert!(nets.starts_with("ID") && nets.contains("backnet"), "{nets}");

    // A piped import draws no progress bar: no escape codes, no carriage returns.
    let out = Command::new(bin("rctl"))
        .arg("--context")
        .arg(&lab.lab.context_path)
        .args(["image", "import", &p("busybox.tar"), "again:1"])
        .stdin(Stdio::null())
        .output()?;
    assert!(out.status.success(), "{out:?}");
    for stream in [&out.stdout, &out.stderr] {
        assert!(
            !stream.contains(&0x1b) && !stream.contains(&b'\r'),
            "{}",
            String::from_utf8_lossy(stream)
        );
    }
    Ok(())
}

#[test]
fn run_detached_prints_a_name_that_ps_logs_exec_and_rm_take() -> anyhow::Result<()> {
    let (lab, _tmp) = lab_with_busybox("rund", 1)?;
    let printed = lab.rctl(&[
        "run",
        "-d",
        "-e",
        "GREETING=hello-from-run",
        "-l",
        "team=cli",
        "-w",
        "/tmp",
        "--tmpfs",
        "/scratch",
        "busybox:latest",
        "sh",
        "-c",
        "echo $GREETING; exec sleep 1000000",
    ])?;
    let name = printed.trim();
    assert!(name.starts_with("run-"), "{printed:?}");
    let ps: Value = serde_json::from_str(&lab.rctl(&["ps", name, "-o", "json"])?)?;
    assert_eq!(ps[0]["service"], name, "{ps}");
    wait_for(
        std::time::Duration::from_secs(30),
        "the job's output",
        || {
            Ok(lab
                .rctl(&["logs", name])?
                .contains("hello-from-run")
                .then_some(()))
        },
    )?;
    let pwd = lab.rctl(&[
        "exec",
        name,
        "--",
        "sh",
        "-c",
        "pwd; grep -c /scratch /proc/mounts",
    ])?;
    assert_eq!(
        pwd.split_whitespace().collect::<Vec<_>>(),
        ["/tmp", "1"],
        "{pwd}"
    );
    let rm = lab.rctl(&["rm", name])?;
    assert!(rm.contains(name), "{rm}");
    let svcs: Value = serde_json::from_str(&lab.rctl(&["get", "svc", "-o", "json"])?)?;
    assert!(!has(&svcs, name), "{svcs}");
    Ok(())
}

#[test]
fn run_interactive_streams_stdin_to_the_command_and_cleans_up() -> anyhow::Result<()> {
    let (lab, _tmp) = lab_with_busybox("runi", 1)?;
    let mut child = Command::new(bin("rctl"))
        .arg("--context")
        .arg(&lab.lab.context_path)
        .args([
            "run",
            "-i",
            "--name",
            "asker",
            "-e",
            "SUFFIX=from-env",
            "busybox:latest",
            "sh",
            "-c",
            "read line; echo \"$line $SUFFIX\"; exit 4",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, b"hello-stdin\n")?;
    let out = child.wait_with_output()?;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello-stdin from-env\n"
    );
    let out = Command::new(bin("rctl"))
        .arg("--context")
        .arg(&lab.lab.context_path)
        .args(["run", "-i", "--name", "asker2", "busybox:latest", "cat"])
        .stdin(std::fs::File::open("/etc/hostname")?)
        .output()?;
    let want = std::fs::read_to_string("/etc/hostname")?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    wait_for(
        std::time::Duration::from_secs(30),
        "the jobs removed",
        || {
            let svcs: Value = serde_json::from_str(&lab.rctl(&["get", "svc", "-o", "json"])?)?;
            Ok((!has(&svcs, "asker") && !has(&svcs, "asker2")).then_some(()))
        },
    )?;
    Ok(())
}

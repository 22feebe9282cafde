//! The spine, end to end over a real 3-host lab: import an image, apply a service of 6 replicas,
//! check real containers in the right hosts' namespaces and cgroups, logs, scale down, bad
//! input, a missing image, controller restart with state intact, removal, and a clean teardown.

use std::collections::BTreeMap;
use std::time::Duration;

use rudder_tests::{busybox_rootfs, ns_inode, pid_alive, running_tasks, wait_for, LabGuard};
use serde_json::Value;

#[test]
fn spine_end_to_end() -> anyhow::Result<()> {
    let name = format!("sp{}", std::process::id() % 100000);
    let mut lab = LabGuard::up(&name, 3)?;
    let tmp = tempfile::tempdir()?;

    // Image without internet: a rootfs tarball into the cluster registry.
    let tar = tmp.path().join("busybox.tar");
    busybox_rootfs(&tar)?;
    lab.rctl(&["image", "import", tar.to_str().unwrap(), "busybox:latest"])?;

    // Archives as standard tools write them (OCI archive, docker-save tarball), loaded back.
    let registry = lab.lab.registry();
    // The cluster registry speaks mutual TLS: skopeo presents the admin certificate (its
    // cert-dir layout: *.crt trusted CAs, *.cert + *.key the client identity). The server's
    // name is the role name `manager.rudder`, not the IP dialed, hence tls-verify=false here.
    let certs = tmp.path().join("certs.d");
    std::fs::create_dir_all(&certs)?;
    let admin = lab.lab.hosts[0].controller_data_dir().join("admin");
    std::fs::copy(admin.join("ca.pem"), certs.join("ca.crt"))?;
    std::fs::copy(admin.join("admin.pem"), certs.join("client.cert"))?;
    std::fs::copy(admin.join("admin-key.pem"), certs.join("client.key"))?;
    for (transport, file, name) in [
        ("oci-archive", "oci.tar", "fromoci:v1"),
        ("docker-archive", "docker.tar", "fromdocker:v1"),
    ] {
        let path = tmp.path().join(file);
        let st = std::process::Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "--src-cert-dir",
            ])
            .arg(&certs)
            .arg(format!("docker://{registry}/busybox:latest"))
            .arg(format!("{transport}:{}:{name}", path.display()))
            .status()?;
        assert!(st.success(), "skopeo copy to {transport}");
        let out = lab.rctl(&["image", "load", path.to_str().unwrap()])?;
        assert!(out.contains(name), "{out}");
    }

    // Apply 6 replicas (of the image that went through a docker-save tarball).
    let marker = format!("marker-{}", std::process::id());
    let manifest = |replicas: u32| {
        format!(
            "kind: Service\nname: hello\nimage: fromdocker:v1\ncommand: [\"/bin/sh\", \"-c\", \"echo $GREETING; exec sleep 100000\"]\nenv:\n  GREETING: {marker}\nreplicas: {replicas}\n"
        )
    };
    let file = tmp.path().join("hello.yaml");
    std::fs::write(&file, manifest(6))?;
    // apply waits until the replicas run.
    let out = lab.rctl(&["apply", "-f", file.to_str().unwrap()])?;
    assert!(out.contains("service/hello created"), "{out}");
    assert_eq!(running_tasks(&lab.tasks("hello")?).len(), 6);

    let tasks = wait_for(Duration::from_secs(90), "6 running tasks", || {
        let t = lab.tasks("hello")?;
        Ok((running_tasks(&t).len() == 6).then_some(t))
    })?;
    let run = running_tasks(&tasks);
    // Spread: two per host.
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for t in &run {
        *per_node
            .entry(t["node"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{per_node:?}"
    );

    // Real containers: a live process in its own network namespace on its host's bridge (the
    // default network mode; the agent keeps it at `<data>/run/netns/<task>`), and in its host's
    // cgroup parent.
    let mut pids = Vec::new();
    for t in &run {
        let pid = lab.task_pid(t, "pid").expect("pid file");
        assert!(pid_alive(pid), "container {pid} not alive");
        let host = lab.host(t["node"].as_str().unwrap());
        let own = host
            .data_dir
            .join("run")
            .join("netns")
            .join(t["id"].as_str().unwrap())
            .display()
            .to_string();
        assert_eq!(
            ns_inode(&format!("/proc/{pid}/ns/net")),
            ns_inode(&own),
            "container of {} not in its namespace on {}",
            t["name"],
            host.name
        );
        assert_ne!(
            ns_inode(&format!("/proc/{pid}/ns/net")),
            ns_inode(&format!("/run/netns/{}", host.netns)),
            "bridge mode: not the host's namespace"
        );
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        assert!(
            cg.contains(&host.cgroup_parent),
            "cgroup {cg} lacks {}",
            host.cgroup_parent
        );
        pids.push(pid);
    }

    // Logs reach rctl.
    let logs = wait_for(Duration::from_secs(20), "logs of 6 tasks", || {
        let l = lab.rctl(&["logs", "hello"])?;
        Ok((l.matches(&marker).count() == 6).then_some(l))
    })?;
    assert!(logs.lines().all(|l| l.starts_with("hello.")), "{logs}");

    // `get services` shows desired and running.
    let svcs: Vec<Value> = serde_json::from_str(&lab.rctl(&["get", "services", "-o", "json"])?)?;
    assert_eq!(svcs[0]["replicas"]["desired"], 6);
    assert_eq!(svcs[0]["replicas"]["running"], 6);

    // Bad input names file, line and field; nothing changes.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: Service\nname: hello\nimage: busybox:latest\nreplicas: six\n",
    )?;
    let err = lab
        .rctl(&["apply", "-f", bad.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.yaml:4") && err.contains("replicas"),
        "{err}"
    );
    std::fs::write(
        &bad,
        "kind: Service\nname: hello\nimage: busybox:latest\nreplics: 2\n",
    )?;
    let err = lab
        .rctl(&["apply", "-f", bad.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.yaml:4") && err.contains("replics"),
        "{err}"
    );
    assert_eq!(running_tasks(&lab.tasks("hello")?).len(), 6);

    // A missing image: the task is rejected with the reason, the cluster goes on.
    let ghost = tmp.path().join("ghost.yaml");
    std::fs::write(
        &ghost,
        "kind: Service\nname: ghost\nimage: nosuch:1.0\nreplicas: 1\n",
    )?;
    // Without --detach, apply itself reports the rejection and fails.
    let err = lab
        .rctl(&["apply", "-f", ghost.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("rejected") && err.contains("nosuch"), "{err}");
    let rejected = wait_for(Duration::from_secs(30), "ghost rejected", || {
        let t = lab.tasks("ghost")?;
        Ok(t.iter().find(|t| t["state"] == "rejected").cloned())
    })?;
    assert!(
        rejected["error"].as_str().unwrap().contains("nosuch"),
        "{rejected}"
    );
    let table = lab.rctl(&["ps", "ghost"])?;
    assert!(
        table.contains("rejected") && table.contains("nosuch"),
        "{table}"
    );
    lab.rctl(&["rm", "ghost"])?;

    // Scale down to 2: four containers stop, two keep running untouched.
    std::fs::write(&file, manifest(2))?;
    let out = lab.rctl(&["apply", "-f", file.to_str().unwrap()])?;
    assert!(out.contains("service/hello updated"), "{out}");
    let tasks = wait_for(Duration::from_secs(60), "2 running tasks", || {
        let t = lab.tasks("hello")?;
        let r = running_tasks(&t);
        let stopped = t.iter().filter(|t| t["state"] == "shutdown").count();
        Ok((r.len() == 2 && stopped + r.len() == t.len()).then_some(t))
    })?;
    let kept: Vec<i32> = running_tasks(&tasks)
        .iter()
        .map(|t| lab.task_pid(t, "pid").unwrap())
        .collect();
    for pid in &pids {
        assert_eq!(pid_alive(*pid), kept.contains(pid), "pid {pid}");
    }

    // Restart the controller: the state is still there, from its durable log.
    lab.restart(0, rudder_tests::lab::Role::Controller, false)?;
    let tasks = wait_for(Duration::from_secs(30), "state after restart", || {
        let t = lab.tasks("hello")?;
        Ok((running_tasks(&t).len() == 2).then_some(t))
    })?;
    assert_eq!(running_tasks(&tasks).len(), 2);

    // Remove: every container stops.
    lab.rctl(&["rm", "hello"])?;
    wait_for(Duration::from_secs(30), "containers gone", || {
        Ok(kept.iter().all(|p| !pid_alive(*p)).then_some(()))
    })?;
    let svcs: Vec<Value> = serde_json::from_str(&lab.rctl(&["get", "services", "-o", "json"])?)?;
    assert!(svcs.is_empty());

    // Teardown leaves nothing behind.
    let lab_dir = lab.lab.dir.clone();
    let netns: Vec<String> = lab.lab.hosts.iter().map(|h| h.netns.clone()).collect();
    let cgroup = format!("rudder-{name}-");
    drop(lab);
    let ns_list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()?
            .stdout,
    )?;
    for ns in netns {
        assert!(!ns_list.contains(&ns), "netns {ns} left");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(!mounts.contains(lab_dir.to_str().unwrap()), "mounts left");
    assert!(!lab_dir.exists(), "state dir left");
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        for e in std::fs::read_dir(h.path()).into_iter().flatten().flatten() {
            assert!(
                !e.file_name().to_string_lossy().starts_with(&cgroup),
                "cgroup {} left",
                e.path().display()
            );
        }
    }
    Ok(())
}

//! Placement over a real lab: constraints on node labels (the operator's and the host's own,
//! from its rudder.toml), global services following eligible nodes, and drain moving tasks off
//! a node while the service keeps its replicas.

use std::time::Duration;

use rudder_tests::{lab, lab_with_busybox, running_tasks, wait_for};

fn on(tasks: &[serde_json::Value], node: &str) -> usize {
    running_tasks(tasks)
        .iter()
        .filter(|t| t["node"] == node)
        .count()
}

#[test]
fn constraints_global_and_drain() -> anyhow::Result<()> {
    let (mut lab, tmp) = lab_with_busybox("pl", 3)?;
    lab.rctl(&["node", "update", "h1", "--label-add", "zone=a"])?;
    lab.rctl(&["node", "update", "h2", "--label-add", "zone=a"])?;
    lab.rctl(&["node", "update", "h3", "--label-add", "zone=b"])?;

    // h3's own labels, from its config file: sent when its agent registers, kept apart from
    // the operator's (zone=b stays), matched by engine.labels constraints.
    let cfg = lab.host("h3").config_path();
    let text = std::fs::read_to_string(&cfg)?;
    std::fs::write(
        &cfg,
        format!("{text}\n[labels]\nzone = \"x\"\ndisk = \"ssd\"\n"),
    )?;
    let h3 = lab.host_index("h3");
    lab.restart(h3, lab::Role::Agent, false)?;
    let node = wait_for(Duration::from_secs(30), "h3's host labels", || {
        let nodes: Vec<serde_json::Value> =
            serde_json::from_str(&lab.rctl(&["node", "ls", "-o", "json"])?)?;
        Ok(nodes
            .into_iter()
            .find(|n| n["hostname"] == "h3" && n["host_labels"]["disk"] == "ssd"))
    })?;
    assert_eq!(node["host_labels"]["zone"], "x", "{node}");
    assert_eq!(node["labels"], serde_json::json!({"zone": "b"}), "{node}");
    let table = lab.rctl(&["node", "ls"])?;
    assert!(
        table.contains("HOST LABELS") && table.contains("disk=ssd,zone=x"),
        "{table}"
    );
    lab.apply(
        tmp.path(),
        "ssd.yaml",
        "kind: Service\nname: ssd\nimage: busybox:latest\nreplicas: 2\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"100000\"]\n\
         placement: {constraints: [\"engine.labels.disk==ssd\", \"node.labels.zone==b\"]}\n",
    )?;
    wait_for(Duration::from_secs(30), "ssd placed on h3", || {
        let t = lab.tasks("ssd")?;
        Ok((on(&t, "h3") == 2).then_some(()))
    })?;
    // The host's zone is not the operator's: no node has both.
    lab.apply(
        tmp.path(),
        "x.yaml",
        "kind: Service\nname: zx\nimage: busybox:latest\nreplicas: 1\n\
         command: [\"/bin/sleep\", \"100000\"]\n\
         placement: {constraints: [\"node.labels.zone==x\"]}\n",
    )?;
    let pending = wait_for(Duration::from_secs(20), "zx pending", || {
        let t = lab.tasks("zx")?;
        Ok(t.first()
            .filter(|t| t["state"] == "pending")
            .map(|t| t["message"].as_str().unwrap_or("").to_string()))
    })?;
    assert!(
        pending.contains("fail constraint node.labels.zone==x"),
        "{pending}"
    );
    lab.rctl(&["rm", "ssd"])?;
    lab.rctl(&["rm", "zx"])?;

    // A constraint nobody meets: pending with a reason that says why.
    lab.apply(
        tmp.path(),
        "c.yaml",
        "kind: Service\nname: zc\nimage: busybox:latest\nreplicas: 2\ncommand: [\"/bin/sleep\", \"100000\"]\n\
         placement: {constraints: [\"node.labels.zone==c\"]}\n",
    )?;
    let pending = wait_for(Duration::from_secs(20), "pending with reason", || {
        let t = lab.tasks("zc")?;
        Ok(t.first()
            .filter(|t| t["state"] == "pending")
            .map(|t| t["message"].as_str().unwrap().to_string()))
    })?;
    assert!(
        pending.contains("3 nodes fail constraint node.labels.zone==c"),
        "{pending}"
    );
    // A label appears: the tasks are placed without any new apply.
    lab.rctl(&["node", "update", "h3", "--label-add", "zone=c"])?;
    wait_for(Duration::from_secs(30), "zc placed on h3", || {
        let t = lab.tasks("zc")?;
        Ok((on(&t, "h3") == 2).then_some(()))
    })?;
    lab.rctl(&["rm", "zc"])?;
    lab.rctl(&["node", "update", "h3", "--label-add", "zone=b"])?;

    // Constraint zone==a: only h1 and h2.
    lab.apply(
        tmp.path(),
        "a.yaml",
        "kind: Service\nname: za\nimage: busybox:latest\nreplicas: 4\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"100000\"]\nplacement: {constraints: [\"node.labels.zone==a\"]}\n",
    )?;
    let t = wait_for(Duration::from_secs(30), "za running", || {
        let t = lab.tasks("za")?;
        Ok((running_tasks(&t).len() == 4).then_some(t))
    })?;
    assert_eq!((on(&t, "h1"), on(&t, "h2"), on(&t, "h3")), (2, 2, 0));

    // Global: one task per node, following availability.
    lab.apply(
        tmp.path(),
        "g.yaml",
        "kind: Service\nname: agent\nimage: busybox:latest\nmode: global\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"100000\"]\n",
    )?;
    wait_for(Duration::from_secs(30), "global on 3 nodes", || {
        let t = lab.tasks("agent")?;
        Ok(
            (["h1", "h2", "h3"].iter().all(|n| on(&t, n) == 1) && running_tasks(&t).len() == 3)
                .then_some(()),
        )
    })?;

    // Drain h1: za's tasks move to h2 (the only other zone=a node), the global task leaves h1.
    lab.rctl(&["node", "update", "h1", "--availability", "drain"])?;
    let (za, global) = wait_for(Duration::from_secs(40), "drained h1", || {
        let za = lab.tasks("za")?;
        let g = lab.tasks("agent")?;
        let done = running_tasks(&za).len() == 4
            && on(&za, "h1") == 0
            && on(&g, "h1") == 0
            && running_tasks(&g).len() == 2;
        Ok(done.then_some((za, g)))
    })?;
    assert_eq!(on(&za, "h2"), 4);
    assert_eq!((on(&global, "h2"), on(&global, "h3")), (1, 1));
    let nodes: Vec<serde_json::Value> =
        serde_json::from_str(&lab.rctl(&["node", "ls", "-o", "json"])?)?;
    let h1 = nodes.iter().find(|n| n["hostname"] == "h1").unwrap();
    assert_eq!(h1["availability"], "drain");
    assert_eq!(h1["tasks"], 0);

    // Back to active: the global service returns to h1.
    lab.rctl(&["node", "update", "h1", "--availability", "active"])?;
    wait_for(Duration::from_secs(30), "global back on h1", || {
        let g = lab.tasks("agent")?;
        Ok((on(&g, "h1") == 1).then_some(()))
    })?;

    // A host-mode port: one task per node; the fourth waits with the reason; each node answers.
    lab.apply(
        tmp.path(),
        "p.yaml",
        "kind: Service\nname: web\nimage: busybox:latest\nreplicas: 4\nstop_grace_period: 1\n\
         command: [\"/bin/sh\", \"-c\", \"mkdir -p /tmp/w; echo hi > /tmp/w/index.html; exec httpd -f -p 8080 -h /tmp/w\"]\n\
         ports: [{target: 8080, mode: host}]\n",
    )?;
    let t = wait_for(
        Duration::from_secs(30),
        "3 web tasks and a pending one",
        || {
            let t = lab.tasks("web")?;
            let pending = t.iter().find(|t| t["state"] == "pending").cloned();
            Ok((running_tasks(&t).len() == 3).then_some(()).and(pending))
        },
    )?;
    let reason = t["message"].as_str().unwrap();
    assert!(
        reason.contains("3 nodes have host port 8080/tcp in use"),
        "{reason}"
    );
    for h in &lab.lab.hosts {
        let mut s = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from((h.addr, 8080)),
            Duration::from_secs(2),
        )?;
        use std::io::{Read, Write};
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        assert!(
            body.starts_with("HTTP/1.") && body.contains("hi"),
            "{}: {body}",
            h.name
        );
    }
    Ok(())
}

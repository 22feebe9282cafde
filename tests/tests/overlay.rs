//! Overlay networks over a real lab: containers on three hosts reach a service by name through
//! its virtual IP (WireGuard between hosts, boringtun in userspace here), connections spread
//! over the replicas, other networks and the host cannot get in, the underlay carries only
//! WireGuard (or VXLAN for `encrypted: false`), the routing mesh answers on every host, a
//! stopped replica leaves DNS and the VIP at once, and agent and controller restarts do not
//! disturb the overlay.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use rudder_tests::{exec, lab_with_busybox, running_tasks, wait_for, LabGuard};

const SERVER: &str = "[\"/bin/sh\", \"-c\", \"mkdir -p /www; hostname > /www/index.html; \
                      head -c 200000 /dev/zero | tr '\\\\0' x >> /www/big; \
                      echo PLAINTEXT-MARKER-1234 >> /www/big; exec httpd -f -p 80 -h /www\"]";

/// `wget -qO- URL` in the container (busybox's own timeout: its wget's -T crashes).
fn fetch(lab: &LabGuard, task: &serde_json::Value, url: &str) -> anyhow::Result<Option<String>> {
    let (ok, out) = exec(lab, task, &["timeout", "5", "wget", "-qO-", url])?;
    Ok(ok.then(|| out.trim().to_string()))
}

/// Addresses `name` resolves to inside the container.
fn resolve(lab: &LabGuard, task: &serde_json::Value, name: &str) -> anyhow::Result<Vec<String>> {
    let (_, out) = exec(lab, task, &["nslookup", name])?;
    // busybox prints the server first ("Address: 10.96.1.1:53"), then the answers.
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("Address:"))
        .map(|a| a.trim().to_string())
        .filter(|a| !a.contains(':'))
        .collect())
}

fn running(lab: &LabGuard, service: &str, n: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    wait_for(
        Duration::from_secs(60),
        &format!("{service} running"),
        || {
            let t = lab.tasks(service)?;
            let r: Vec<serde_json::Value> = running_tasks(&t).into_iter().cloned().collect();
            Ok((r.len() == n).then_some(r))
        },
    )
}

/// A packet capture on host `netns`'s underlay interface while `during` runs; returns the
/// raw pcap bytes and tcpdump's one-line summaries.
fn capture(netns: &str, filter: &str, during: impl FnOnce()) -> anyhow::Result<(Vec<u8>, String)> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("cap.pcap");
    let mut child = Command::new("ip")
        .args([
            "netns", "exec", netns, "tcpdump", "-i", "eth0", "-U", "-n", "-s", "0", "-w",
        ])
        .arg(&file)
        .arg(filter)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(800));
    during();
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    child.wait()?;
    let raw = std::fs::read(&file)?;
    let text = Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(&file)
        .stderr(Stdio::null())
        .output()?;
    Ok((raw, String::from_utf8_lossy(&text.stdout).into_owned()))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn encrypted_overlay_dns_vip_mesh_and_restarts() -> anyhow::Result<()> {
    let (mut lab, tmp) = lab_with_busybox("ov", 3)?;
    lab.apply(
        tmp.path(),
        "web.yaml",
        &format!(
            "kind: Network\nname: backend\n---\nkind: Network\nname: other\n---\n\
             kind: Service\nname: web\nimage: busybox:latest\nreplicas: 2\nnetworks: [backend]\n\
             stop_grace_period: 1\nplacement:\n  constraints: [\"node.hostname!=h1\"]\n  \
             max_replicas_per_node: 1\ncommand: {SERVER}\n\
             ports:\n  - {{target: 80, published: 8080, mode: ingress}}\n---\n\
             kind: Service\nname: client\nimage: busybox:latest\nnetworks: [backend, other]\n\
             placement:\n  constraints: [\"node.hostname==h1\"]\ncommand: [\"/bin/sleep\", \"1000000\"]\n---\n\
             kind: Service\nname: outsider\nimage: busybox:latest\nnetworks: [other]\n\
             placement:\n  constraints: [\"node.hostname==h1\"]\ncommand: [\"/bin/sleep\", \"1000000\"]\n"
        ),
    )?;
    let web = running(&lab, "web", 2)?;
    let client = running(&lab, "client", 1)?.remove(0);
    let outsider = running(&lab, "outsider", 1)?.remove(0);
    let names: BTreeSet<String> = web
        .iter()
        .map(|t| t["id"].as_str().unwrap()[..12].to_string())
        .collect();

    // By name, through the VIP: both replicas answer (on h2 and h3, over WireGuard).
    let vip = resolve(&lab, &client, "web")?;
    assert_eq!(vip.len(), 1, "one virtual IP: {vip:?}");
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        if let Some(body) = fetch(&lab, &client, "http://web/")? {
            seen.insert(body);
        }
        if seen == names {
            break;
        }
    }
    assert_eq!(seen, names, "connections spread over both replicas");
    let tasks_web = resolve(&lab, &client, "tasks.web")?;
    assert_eq!(tasks_web.len(), 2, "{tasks_web:?}");

    // Not on the network: neither by VIP nor by task address; nor from the host itself.
    assert_eq!(
        fetch(&lab, &outsider, &format!("http://{}/", vip[0]))?,
        None
    );
    assert_eq!(
        fetch(&lab, &outsider, &format!("http://{}/", tasks_web[0]))?,
        None
    );
    assert!(
        resolve(&lab, &outsider, "web")?.is_empty(),
        "web is not a name on network other"
    );
    let h1 = lab.host("h1").netns.clone();
    let host_try = Command::new("ip")
        .args([
            "netns", "exec", &h1, "timeout", "3", "busybox", "wget", "-qO-",
        ])
        .arg(format!("http://{}/", tasks_web[0]))
        .output()?;
    assert!(
        !host_try.status.success(),
        "the host cannot open connections into the overlay"
    );

    // The underlay carries only WireGuard between the hosts' overlays: the payload's marker
    // never appears in clear, and no HTTP crosses it.
    let (raw, text) = capture(
        &h1,
        "not tcp port 4243 and not tcp port 4245 and not tcp port 5000",
        || {
            for _ in 0..4 {
                let _ = fetch(&lab, &client, "http://web/big");
            }
        },
    )?;
    assert!(
        text.contains(".51820: UDP"),
        "WireGuard packets seen:\n{text}"
    );
    assert!(
        !contains(&raw, b"PLAINTEXT-MARKER-1234"),
        "payload in clear on the underlay"
    );
    assert!(
        text.lines().all(|l| l.contains(".51820")
            || l.contains("ARP")
            || l.contains("ICMP6")
            || l.trim().is_empty()),
        "only WireGuard on the underlay:\n{text}"
    );

    // The routing mesh: host 1 (no replica) answers on 8080 and reaches the replica on h3.
    let on_h3: String = web
        .iter()
        .find(|t| t["node"] == "h3")
        .map(|t| t["id"].as_str().unwrap()[..12].to_string())
        .context("a replica on h3")?;
    let h1_addr = lab.host("h1").addr;
    let mut reached = false;
    for _ in 0..30 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.host("h2").netns,
                "timeout",
                "5",
                "busybox",
                "wget",
                "-qO-",
            ])
            .arg(format!("http://{h1_addr}:8080/"))
            .output()?;
        if String::from_utf8_lossy(&out.stdout).trim() == on_h3 {
            reached = true;
            break;
        }
    }
    assert!(reached, "h1:8080 reached the replica on h3");

    // Restarts: an agent (kill -9), then the controller; the overlay keeps answering.
    let both = |lab: &LabGuard, what: &str| -> anyhow::Result<()> {
        let mut seen = BTreeSet::new();
        let after = wait_for(Duration::from_secs(30), what, || {
            let (ok, out) = exec(
                lab,
                &client,
                &["timeout", "5", "wget", "-qO-", "http://web/"],
            )?;
            if ok {
                seen.insert(out.trim().to_string());
            }
            anyhow::ensure!(seen == names, "seen {seen:?}; last: {out}");
            Ok(Some(()))
        });
        if after.is_err() {
            eprintln!("{}", lab.rctl(&["ps"])?);
        }
        after
    };
    lab.restart(lab.host_index("h2"), rudder_tests::lab::Role::Agent, true)?;
    both(&lab, "both replicas after an agent restart")?;
    // (Let the restarted agent's session settle before the controller goes away, so the old
    // controller cannot judge the node lost while it stops.)
    wait_for(Duration::from_secs(10), "h2 ready", || {
        let nodes: serde_json::Value =
            serde_json::from_str(&lab.rctl(&["node", "ls", "-o", "json"])?)?;
        Ok(nodes
            .as_array()
            .is_some_and(|n| {
                n.iter()
                    .any(|n| n["hostname"] == "h2" && n["state"] == "ready")
            })
            .then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(4));
    lab.restart(0, rudder_tests::lab::Role::Controller, false)?;
    both(&lab, "both replicas after a controller restart")?;

    // Key rotation: every host makes a new key pair; peers follow and traffic goes on.
    let key_file = lab.host("h1").data_dir.join("wg.key");
    let before = std::fs::read_to_string(&key_file)?;
    lab.rctl(&["network", "rotate-keys"])?;
    wait_for(Duration::from_secs(10), "h1's key replaced", || {
        Ok((std::fs::read_to_string(&key_file)? != before).then_some(()))
    })?;
    both(&lab, "both replicas after key rotation")?;

    // One interface per network, each with the encapsulation's MTU.
    for eth in ["eth0", "eth1"] {
        let (_, link) = exec(&lab, &client, &["ip", "link", "show", eth])?;
        assert!(link.contains("mtu 1420"), "{link}");
    }

    // A replica stops: DNS and the VIP drop it at once (the bench measures how fast).
    let victim = web.iter().find(|t| t["node"] == "h3").unwrap().clone();
    let addr = tasks_web_addr(&lab, &client, &names, &victim)?;
    let pid = lab.task_pid(&victim, "pid").context("victim pid")?;
    let t0 = Instant::now();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    wait_for(Duration::from_secs(5), "stopped replica out of DNS", || {
        Ok((!resolve(&lab, &client, "tasks.web")?.contains(&addr)).then_some(()))
    })?;
    eprintln!("stopped replica left DNS after {:?}", t0.elapsed());
    let survivor = names
        .iter()
        .find(|n| **n != victim["id"].as_str().unwrap()[..12])
        .unwrap()
        .clone();
    for _ in 0..6 {
        assert_eq!(
            fetch(&lab, &client, "http://web/")?.as_deref(),
            Some(survivor.as_str())
        );
    }
    lab.rctl(&["rm", "web", "client", "outsider"])?;
    let err = lab.rctl(&["network", "rm", "backend"]);
    // The services are going away asynchronously; the network goes once nothing uses it.
    let _ = err;
    drop(tmp);
    Ok(())
}

/// The overlay address of `victim` as `tasks.web` lists it (its container reports its own).
fn tasks_web_addr(
    lab: &LabGuard,
    client: &serde_json::Value,
    _names: &BTreeSet<String>,
    victim: &serde_json::Value,
) -> anyhow::Result<String> {
    let (_, out) = exec(lab, victim, &["ip", "-4", "-o", "addr", "show", "eth0"])?;
    let addr = out
        .split_whitespace()
        .find(|w| w.contains('/'))
        .and_then(|w| w.split('/').next())
        .context("victim address")?
        .to_string();
    assert!(resolve(lab, client, "tasks.web")?.contains(&addr));
    Ok(addr)
}

#[test]
fn unencrypted_network_uses_vxlan_and_dnsrr() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("vx", 2)?;
    lab.apply(
        tmp.path(),
        "plain.yaml",
        &format!(
            "kind: Network\nname: plain\nencrypted: false\nsubnet: 10.150.0.0/16\n---\n\
             kind: Service\nname: pweb\nimage: busybox:latest\nendpoint_mode: dnsrr\n\
             networks: [plain]\naliases: [legacy-web]\nplacement:\n  constraints: [\"node.hostname==h2\"]\ncommand: {SERVER}\n\
             ports:\n  - {{target: 80, published: 8081, mode: host}}\n---\n\
             kind: Service\nname: pclient\nimage: busybox:latest\nnetworks: [plain]\n\
             placement:\n  constraints: [\"node.hostname==h1\"]\ncommand: [\"/bin/sleep\", \"1000000\"]\n"
        ),
    )?;
    let server = running(&lab, "pweb", 1)?.remove(0);
    let client = running(&lab, "pclient", 1)?.remove(0);
    // dnsrr: the name is the task's own address (no VIP), in the declared subnet.
    let addrs = resolve(&lab, &client, "pweb")?;
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    assert!(
        addrs[0].starts_with("10.150.") && !addrs[0].starts_with("10.150.0."),
        "{addrs:?}"
    );
    // An alias answers as the name does.
    assert_eq!(resolve(&lab, &client, "legacy-web")?, addrs);
    assert_eq!(resolve(&lab, &client, "tasks.legacy-web")?, addrs);
    let (raw, text) = capture(&lab.host("h1").netns, "udp", || {
        let body = fetch(&lab, &client, "http://pweb/big").ok().flatten();
        assert!(body.is_some_and(|b| b.ends_with("PLAINTEXT-MARKER-1234")));
    })?;
    assert!(
        text.contains(".4789: VXLAN"),
        "VXLAN on the underlay:\n{text}"
    );
    assert!(
        contains(&raw, b"PLAINTEXT-MARKER-1234"),
        "VXLAN does not encrypt"
    );
    let (_, link) = exec(&lab, &client, &["ip", "link", "show", "eth0"])?;
    assert!(link.contains("mtu 1450"), "{link}");

    // A host-mode port answers only where the task runs (h2), mapped to the container's 80.
    let get = |host: &str| -> anyhow::Result<Option<String>> {
        let addr = lab.host(host).addr;
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.host("h1").netns,
                "timeout",
                "3",
                "busybox",
                "wget",
                "-qO-",
            ])
            .arg(format!("http://{addr}:8081/"))
            .output()?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()))
    };
    let name = server["id"].as_str().unwrap()[..12].to_string();
    assert_eq!(get("h2")?, Some(name));
    assert_eq!(get("h1")?, None, "host mode binds only where a task runs");

    // Bad input: a network in use, an unknown network, a changed subnet; nothing is disturbed.
    let e = lab
        .rctl(&["network", "rm", "plain"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("in use by service(s) pclient, pweb"), "{e}");
    let e = lab
        .apply(
            tmp.path(),
            "bad.yaml",
            "kind: Service\nname: lost\nimage: busybox:latest\nnetworks: [nowhere]\n",
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("networks[0]") && e.contains("\"nowhere\" does not exist"),
        "{e}"
    );
    let e = lab
        .apply(
            tmp.path(),
            "bad2.yaml",
            "kind: Network\nname: plain\nencrypted: false\nsubnet: 10.151.0.0/16\n",
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot change"), "{e}");
    let e = lab
        .apply(
            tmp.path(),
            "bad3.yaml",
            "kind: Service\nname: impostor\nimage: busybox:latest\nnetworks: [plain]\n\
             aliases: [pweb]\n",
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "aliases[0]: \"pweb\" is already a name of service \"pweb\" on network \"plain\""
        ),
        "{e}"
    );
    assert_eq!(
        get("h2")?,
        Some(server["id"].as_str().unwrap()[..12].to_string())
    );
    let _ = Path::new("/");
    Ok(())
}

/// `internal: true`: tasks on the network reach one another (across hosts, by name), and
/// nothing else: not a server outside the lab's hosts that a task on an ordinary network
/// reaches, not their host's own ports. The flag cannot change once the network exists.
#[test]
fn internal_network_has_no_way_out() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("in", 2)?;
    let web = rudder_tests::WebServer::start(lab.lab.root_addr())?;
    web.put("/", b"outside\n");
    let sleeper = |name: &str, net: &str| {
        format!(
            "kind: Service\nname: {name}\nimage: busybox:latest\nnetworks: [{net}]\n\
             placement:\n  constraints: [\"node.hostname==h1\"]\n\
             command: [\"/bin/sleep\", \"1000000\"]\n"
        )
    };
    lab.apply(
        tmp.path(),
        "walled.yaml",
        &format!(
            "kind: Network\nname: walled\ninternal: true\nsubnet: 10.152.0.0/16\n---\n\
             kind: Network\nname: open\nsubnet: 10.153.0.0/16\n---\n\
             kind: Service\nname: iweb\nimage: busybox:latest\nnetworks: [walled]\n\
             placement:\n  constraints: [\"node.hostname==h2\"]\ncommand: {SERVER}\n---\n{}---\n{}",
            sleeper("inside", "walled"),
            sleeper("outside", "open")
        ),
    )?;
    running(&lab, "iweb", 1)?;
    let inside = running(&lab, "inside", 1)?.remove(0);
    let outside = running(&lab, "outside", 1)?.remove(0);
    let out_url = format!("http://{}/", web.addr);
    assert_eq!(fetch(&lab, &outside, &out_url)?.as_deref(), Some("outside"));
    // Within the network, across hosts, by name: yes.
    let body = fetch(&lab, &inside, "http://iweb/big")?;
    assert!(body.is_some_and(|b| b.ends_with("PLAINTEXT-MARKER-1234")));
    // Out of it: no.
    assert_eq!(fetch(&lab, &inside, &out_url)?, None);
    // Nor its host's other addresses: the other network's resolver, on h1 itself, answers a
    // task of that network but not one on the internal network.
    let (_, conf) = exec(&lab, &outside, &["cat", "/etc/resolv.conf"])?;
    let open_gw = conf
        .lines()
        .find_map(|l| l.strip_prefix("nameserver "))
        .context("a nameserver in resolv.conf")?
        .trim()
        .to_string();
    let ask = |task: &serde_json::Value| {
        exec(
            &lab,
            task,
            &["timeout", "3", "nslookup", "outside", &open_gw],
        )
    };
    let (ok, out) = ask(&outside)?;
    assert!(ok && out.contains("10.153."), "{out}");
    let (ok, out) = ask(&inside)?;
    assert!(!ok && !out.contains("10.153."), "{out}");

    let e = lab
        .apply(
            tmp.path(),
            "open-up.yaml",
            "kind: Network\nname: walled\nsubnet: 10.152.0.0/16\n",
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot change") && e.contains("internal"), "{e}");
    Ok(())
}

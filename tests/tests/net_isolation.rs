//! Isolation between overlay networks over a real lab, against the attacks of the security
//! audit: a VXLAN datagram crafted by hand (from the underlay, from a cluster host, from a
//! container) reaches no network but the one whose tunnel it came through, and only from a
//! cluster host (H3).

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use anyhow::Context;
use rudder_tests::{exec, lab_with_busybox, running_tasks, wait_for, LabGuard};

fn running_one(lab: &LabGuard, service: &str) -> anyhow::Result<serde_json::Value> {
    wait_for(
        Duration::from_secs(60),
        &format!("{service} running"),
        || {
            let t = lab.tasks(service)?;
            Ok(running_tasks(&t).first().map(|t| (*t).clone()))
        },
    )
}

/// The task's address on its first network (`eth0`).
fn addr_of(lab: &LabGuard, task: &serde_json::Value) -> anyhow::Result<Ipv4Addr> {
    let (_, out) = exec(lab, task, &["ip", "-4", "-o", "addr", "show", "eth0"])?;
    out.split_whitespace()
        .find(|w| w.contains('/'))
        .and_then(|w| w.split('/').next())
        .context("an address on eth0")?
        .parse()
        .context("an IPv4 address")
}

/// The gateway of the /24 slice holding `a` (networks here are /16s, cut into /24s).
fn slice_gateway(a: Ipv4Addr) -> Ipv4Addr {
    let o = a.octets();
    Ipv4Addr::new(o[0], o[1], o[2], 1)
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One VXLAN datagram (what the audit's `vxlan_inject.py` builds): VXLAN header with `vni`,
/// an Ethernet frame to the VXLAN device MAC of the host whose gateway is `gw` (derived as
/// the agent derives it), and an IPv4/UDP packet `src` -> `dst:dport` carrying `payload`.
fn vxlan_datagram(
    vni: u32,
    gw: Ipv4Addr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no UDP checksum
    udp.extend_from_slice(payload);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + udp.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut pkt = vec![0x08, 0, 0, 0];
    pkt.extend_from_slice(&(vni << 8).to_be_bytes());
    pkt.extend_from_slice(&[0x02, vni as u8]);
    pkt.extend_from_slice(&gw.octets());
    pkt.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    pkt.extend_from_slice(&ip);
    pkt.extend_from_slice(&udp);
    pkt
}

/// A UDP socket bound to `bind` inside the network namespace at `ns` (`/proc/PID/ns/net` or
/// `/run/netns/NAME`): made on a thread that enters the namespace and ends, so the test
/// process stays where it is; the socket keeps its namespace for its whole life.
fn socket_in(ns: &str, bind: &str) -> anyhow::Result<UdpSocket> {
    let (ns, bind) = (ns.to_string(), bind.to_string());
    std::thread::spawn(move || -> anyhow::Result<UdpSocket> {
        let f = std::fs::File::open(&ns).with_context(|| format!("open {ns}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {ns}"))?;
        let s = UdpSocket::bind(&bind)?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// The network namespace of `task`'s container.
fn task_ns(lab: &LabGuard, task: &serde_json::Value) -> anyhow::Result<String> {
    let pid = lab.task_pid(task, "pid").context("the task's pid")?;
    Ok(format!("/proc/{pid}/ns/net"))
}

/// Everything `sock` receives within `window`, as text.
fn received(sock: &UdpSocket, window: Duration) -> String {
    let start = std::time::Instant::now();
    let mut all = String::new();
    let mut buf = [0u8; 2048];
    while start.elapsed() < window {
        if let Ok(n) = sock.recv(&mut buf) {
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    all
}

/// H3: a VXLAN datagram for the unencrypted network `plain`, carrying a packet to a task of
/// the internal, encrypted network `secret`, reaches nothing — sent from the underlay (the
/// lab's root address), from a task of `plain` (masqueraded to its host's address), or from
/// a cluster host itself — while the same datagram format into `plain` from a cluster host
/// does arrive, and ordinary traffic of both networks crosses hosts.
#[test]
fn vxlan_datagrams_feed_only_their_own_network() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("nh", 2)?;
    let svc = |name: &str, net: &str, host: &str, cmd: &str| {
        format!(
            "kind: Service\nname: {name}\nimage: busybox:latest\nnetworks: [{net}]\n\
             placement: {{constraints: [\"node.hostname=={host}\"]}}\n\
             command: [\"/bin/sh\", \"-c\", \"{cmd}\"]\n"
        )
    };
    let sleep = "exec sleep 1000000";
    lab.apply(
        tmp.path(),
        "h3.yaml",
        &format!(
            "kind: Network\nname: plain\nencrypted: false\nsubnet: 10.170.0.0/16\n---\n\
             kind: Network\nname: secret\ninternal: true\nsubnet: 10.171.0.0/16\n---\n\
             {}---\n{}---\n{}---\n{}",
            svc("victim", "secret", "h2", sleep),
            svc(
                "pvictim",
                "plain",
                "h2",
                "mkdir -p /www; echo plain-ok > /www/index.html; exec httpd -f -p 80 -h /www"
            ),
            svc("attacker", "plain", "h1", sleep),
            svc("sclient", "secret", "h1", sleep),
        ),
    )?;
    let victim = running_one(&lab, "victim")?;
    let pvictim = running_one(&lab, "pvictim")?;
    let attacker = running_one(&lab, "attacker")?;
    let sclient = running_one(&lab, "sclient")?;
    let (victim_addr, pvictim_addr) = (addr_of(&lab, &victim)?, addr_of(&lab, &pvictim)?);
    let (attacker_addr, sclient_addr) = (addr_of(&lab, &attacker)?, addr_of(&lab, &sclient)?);
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.rctl(&["network", "inspect", "plain"])?)?;
    let vni = inspect["vni"].as_u64().context("plain's vni")? as u32;
    let h2 = lab.host("h2").addr;
    let plain_gw_h2 = slice_gateway(pvictim_addr);
    // The listeners: UDP 9999 in the victim's container (secret) and in pvictim's (plain).
    let secret_rx = socket_in(&task_ns(&lab, &victim)?, "0.0.0.0:9999")?;
    let plain_rx = socket_in(&task_ns(&lab, &pvictim)?, "0.0.0.0:9999")?;
    let h1_ns = format!("/run/netns/{}", lab.host("h1").netns);
    let from_h1 = socket_in(&h1_ns, "0.0.0.0:0")?;

    // The datagram format is right: into `plain` itself, from a cluster host, it arrives.
    let control = vxlan_datagram(
        vni,
        plain_gw_h2,
        attacker_addr,
        pvictim_addr,
        9999,
        b"vxlan-format-ok\n",
    );
    wait_for(
        Duration::from_secs(15),
        "the crafted datagram in plain",
        || {
            from_h1.send_to(&control, (h2, 4789))?;
            Ok(received(&plain_rx, Duration::from_millis(300))
                .contains("vxlan-format-ok")
                .then_some(()))
        },
    )?;

    // Each attack: a datagram to h2's VXLAN device of `plain`, its inner packet to the victim
    // on `secret`, from an address of `secret` in h1's slice (as if a task there sent it).
    let evil = vxlan_datagram(
        vni,
        plain_gw_h2,
        sclient_addr,
        victim_addr,
        9999,
        b"injected-across-networks\n",
    );
    // From the underlay (the lab's root address): not a cluster host.
    let from_root = UdpSocket::bind((lab.lab.root_addr(), 0))?;
    // From a task of `plain` on h1 (masqueraded to h1's own address).
    let from_task = socket_in(&task_ns(&lab, &attacker)?, "0.0.0.0:0")?;
    for _ in 0..3 {
        from_root.send_to(&evil, (h2, 4789))?;
        from_task.send_to(&evil, (h2, 4789))?;
        // From h1 itself, a cluster host: through `plain`'s tunnel, into `secret`.
        from_h1.send_to(&evil, (h2, 4789))?;
    }
    let seen = received(&secret_rx, Duration::from_secs(2));
    assert!(
        !seen.contains("injected"),
        "a VXLAN datagram of plain reached secret: {seen:?}"
    );

    // Ordinary traffic still crosses hosts on both networks: WireGuard for `secret`, VXLAN
    // for `plain`.
    let legit = socket_in(&task_ns(&lab, &sclient)?, "0.0.0.0:0")?;
    wait_for(Duration::from_secs(15), "secret's own datagram", || {
        legit.send_to(b"legit-secret", (victim_addr, 9999))?;
        Ok(received(&secret_rx, Duration::from_millis(300))
            .contains("legit-secret")
            .then_some(()))
    })?;
    let (ok, body) = exec(
        &lab,
        &attacker,
        &[
            "timeout",
            "5",
            "wget",
            "-qO-",
            &format!("http://{pvictim_addr}/"),
        ],
    )?;
    assert!(ok && body.contains("plain-ok"), "{body}");
    Ok(())
}

/// Packets on `netns`'s underlay interface (`eth0`) matching `filter`, captured while
/// `during` runs (tcpdump's one-line summaries).
fn capture(netns: &str, filter: &str, during: impl FnOnce()) -> anyhow::Result<String> {
    use std::process::{Command, Stdio};
    let child = Command::new("ip")
        .args([
            "netns", "exec", netns, "tcpdump", "-i", "eth0", "-l", "-n", "-s", "0",
        ])
        .arg(filter)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(800));
    during();
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// M2: with a default route on the host, as a real host has, a task of an encrypted network
/// sending to an address of its subnet outside every node's slice gets nothing onto the
/// underlay (the old agent sent it there, masqueraded, in clear); the same task's ordinary
/// outbound traffic still leaves.
#[test]
fn encrypted_traffic_never_leaves_in_clear() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("nm", 2)?;
    lab.apply(
        tmp.path(),
        "m2.yaml",
        "kind: Network\nname: sec\nsubnet: 10.172.0.0/16\n---\n\
         kind: Service\nname: cli\nimage: busybox:latest\nnetworks: [sec]\n\
         placement: {constraints: [\"node.hostname==h1\"]}\n\
         command: [\"/bin/sleep\", \"1000000\"]\n",
    )?;
    let cli = running_one(&lab, "cli")?;
    let h1 = lab.host("h1").netns.clone();
    let root = lab.lab.root_addr();
    let st = std::process::Command::new("ip")
        .args(["-n", &h1, "route", "replace", "default", "via"])
        .arg(root.to_string())
        .status()?;
    anyhow::ensure!(st.success(), "default route on h1");
    let tx = socket_in(&task_ns(&lab, &cli)?, "0.0.0.0:0")?;
    // 10.172.200.0/24 is nobody's slice (two hosts hold 1 and 2).
    let stray: Ipv4Addr = "10.172.200.5".parse()?;
    let seen = capture(&h1, "udp port 9999", || {
        for _ in 0..3 {
            let _ = tx.send_to(b"secret-in-clear", (stray, 9999));
            let _ = tx.send_to(b"ordinary-outbound", (root, 9999));
            std::thread::sleep(Duration::from_millis(100));
        }
    })?;
    // The capture works and the way out is open: the ordinary datagram left, masqueraded.
    assert!(
        seen.contains(&format!("> {root}.9999")),
        "outbound datagram on the underlay:\n{seen}"
    );
    assert!(
        !seen.contains(&stray.to_string()),
        "encrypted-network traffic on the underlay in clear:\n{seen}"
    );
    Ok(())
}

/// L3: a network's resolver answers its own members only. A task of network `a` asking the
/// resolver of network `b` on its own host (b's gateway there) gets no answer, neither for
/// b's names nor for a name it would forward; b's members get theirs.
#[test]
fn resolvers_answer_only_their_members() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("nd", 2)?;
    let sleeper = |name: &str, net: &str| {
        format!(
            "kind: Service\nname: {name}\nimage: busybox:latest\nnetworks: [{net}]\n\
             placement: {{constraints: [\"node.hostname==h1\"]}}\n\
             command: [\"/bin/sleep\", \"1000000\"]\n"
        )
    };
    lab.apply(
        tmp.path(),
        "l3.yaml",
        &format!(
            "kind: Network\nname: a\nsubnet: 10.173.0.0/16\n---\n\
             kind: Network\nname: b\nsubnet: 10.174.0.0/16\n---\n{}---\n{}",
            sleeper("acli", "a"),
            sleeper("bsvc", "b"),
        ),
    )?;
    let acli = running_one(&lab, "acli")?;
    let bsvc = running_one(&lab, "bsvc")?;
    let b_gw = slice_gateway(addr_of(&lab, &bsvc)?).to_string();
    let ask = |task: &serde_json::Value, name: &str| {
        exec(&lab, task, &["timeout", "3", "nslookup", name, &b_gw])
    };
    // b's own member: answered.
    let (ok, out) = ask(&bsvc, "bsvc")?;
    assert!(ok && out.contains("10.174."), "{out}");
    // a's task: nothing, for b's names or for anything else.
    let (ok, out) = ask(&acli, "bsvc")?;
    assert!(
        !ok && !out.contains("10.174."),
        "a resolved b's names: {out}"
    );
    let (ok, out) = ask(&acli, "localhost.invalid")?;
    assert!(
        !ok && !out.contains("NXDOMAIN"),
        "b's resolver answered a: {out}"
    );
    // a's own resolver still answers a's task.
    let (ok, out) = exec(&lab, &acli, &["timeout", "3", "nslookup", "acli"])?;
    assert!(ok && out.contains("10.173."), "{out}");
    Ok(())
}

/// A network namespace this test made; removed (with its veth end) when dropped.
struct TestNetns(String);

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let st = std::process::Command::new("ip").args(args).status()?;
    anyhow::ensure!(st.success(), "ip {}: {st}", args.join(" "));
    Ok(())
}

/// L7: a host whose forwarding Rudder turned on routes only Rudder's traffic. Behind h1 sits
/// a network of the host's own (a veth into a namespace made here); h2 routes it via h1. h1
/// itself reaches it, but h1 does not forward h2's datagram to it (the old agent did: policy
/// accept with ip_forward on).
#[test]
fn host_forwards_only_rudders_traffic() -> anyhow::Result<()> {
    let (mut lab, tmp) = lab_with_busybox("nf", 2)?;
    lab.apply(
        tmp.path(),
        "l7.yaml",
        "kind: Network\nname: o\nsubnet: 10.175.0.0/16\n---\n\
         kind: Service\nname: s\nimage: busybox:latest\nnetworks: [o]\n\
         placement: {constraints: [\"node.hostname==h1\"]}\n\
         command: [\"/bin/sleep\", \"1000000\"]\n",
    )?;
    running_one(&lab, "s")?;
    let h1 = lab.host("h1").clone();
    let marker = h1.data_dir.join(rudder_agent::net::FORWARD_MARKER);
    if !marker.exists() {
        // The lab's namespaces inherited forwarding from the root namespace: make h1 a host
        // that did not route before its agent came.
        ip(&[
            "netns",
            "exec",
            &h1.netns,
            "sh",
            "-c",
            "echo 0 > /proc/sys/net/ipv4/ip_forward",
        ])?;
        lab.restart(lab.host_index("h1"), rudder_tests::lab::Role::Agent, false)?;
        wait_for(Duration::from_secs(20), "h1's table loaded again", || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &h1.netns, "nft", "list", "chain", "ip"])
                .args(["rudder", "forward"])
                .output()?;
            Ok((out.status.success() && lab_forwarding_on(&h1.netns)).then_some(()))
        })?;
    }
    let ns = TestNetns(format!("rdt-l7-{}", std::process::id() % 100000));
    ip(&["netns", "add", &ns.0])?;
    ip(&[
        "-n", &h1.netns, "link", "add", "rdtl7a", "type", "veth", "peer", "name", "rdtl7b",
        "netns", &ns.0,
    ])?;
    ip(&[
        "-n",
        &h1.netns,
        "addr",
        "add",
        "10.250.7.1/24",
        "dev",
        "rdtl7a",
    ])?;
    ip(&["-n", &h1.netns, "link", "set", "rdtl7a", "up"])?;
    ip(&["-n", &ns.0, "addr", "add", "10.250.7.2/24", "dev", "rdtl7b"])?;
    ip(&["-n", &ns.0, "link", "set", "rdtl7b", "up"])?;
    ip(&["-n", &ns.0, "route", "add", "default", "via", "10.250.7.1"])?;
    let h1_addr = h1.addr.to_string();
    ip(&[
        "-n",
        &lab.host("h2").netns,
        "route",
        "replace",
        "10.250.7.0/24",
        "via",
        &h1_addr,
    ])?;
    let rx = socket_in(&format!("/run/netns/{}", ns.0), "0.0.0.0:9999")?;
    let behind: Ipv4Addr = "10.250.7.2".parse()?;
    // h1 itself reaches its own network.
    let from_h1 = socket_in(&format!("/run/netns/{}", h1.netns), "0.0.0.0:0")?;
    from_h1.send_to(b"from-h1", (behind, 9999))?;
    assert!(received(&rx, Duration::from_secs(1)).contains("from-h1"));
    // h2's datagram would have to be forwarded by h1: it is not.
    let from_h2 = socket_in(&format!("/run/netns/{}", lab.host("h2").netns), "0.0.0.0:0")?;
    for _ in 0..3 {
        from_h2.send_to(b"routed-by-h1", (behind, 9999))?;
    }
    let seen = received(&rx, Duration::from_secs(1));
    assert!(
        !seen.contains("routed-by-h1"),
        "h1 routed traffic that is not Rudder's"
    );
    assert!(marker.exists(), "{} recorded", marker.display());
    Ok(())
}

/// Whether IPv4 forwarding is on in `netns`.
fn lab_forwarding_on(netns: &str) -> bool {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "cat",
            "/proc/sys/net/ipv4/ip_forward",
        ])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "1")
}

//! The routing mesh keeps the client's address: a client on the underlay (the lab's root
//! namespace, `10.213.k.254`) connects to a host's ingress-published port, and the replica that
//! answers reports the source address it saw, for TCP and for UDP.
//!
//! The replica runs `peerecho`, a tiny static server compiled here from C and added to the
//! busybox image: on each TCP connection and each UDP datagram it answers
//! `<peer address> <hostname>`.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use rudder_tests::{lab_with_busybox, running_on, wait_for, LabGuard};

const PEERECHO_C: &str = r#"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
  int port = argc > 1 ? atoi(argv[1]) : 7, one = 1;
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  int t = socket(AF_INET, SOCK_STREAM, 0), u = socket(AF_INET, SOCK_DGRAM, 0);
  setsockopt(t, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(t, (void *)&a, sizeof a) || listen(t, 128) || bind(u, (void *)&a, sizeof a)) {
    perror("peerecho: bind");
    return 1;
  }
  char host[64] = "?", out[160], buf[512];
  gethostname(host, sizeof host - 1);
  for (;;) {
    fd_set r;
    FD_ZERO(&r);
    FD_SET(t, &r);
    FD_SET(u, &r);
    if (select((t > u ? t : u) + 1, &r, 0, 0, 0) < 0) continue;
    struct sockaddr_in p;
    socklen_t l = sizeof p;
    if (FD_ISSET(t, &r)) {
      int c = accept(t, (void *)&p, &l);
      if (c >= 0) {
        int n = snprintf(out, sizeof out, "%s %s\n", inet_ntoa(p.sin_addr), host);
        if (write(c, out, n) < 0) perror("peerecho: write");
        close(c);
      }
    }
    l = sizeof p;
    if (FD_ISSET(u, &r) && recvfrom(u, buf, sizeof buf, 0, (void *)&p, &l) >= 0) {
      int n = snprintf(out, sizeof out, "%s %s\n", inet_ntoa(p.sin_addr), host);
      sendto(u, out, n, 0, (void *)&p, l);
    }
  }
}
"#;

/// What the replica behind `to` (TCP) answers: `<address it saw> <its hostname>`.
fn tcp_peer(to: SocketAddrV4) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.trim().to_string()).filter(|o| !o.is_empty())
}

/// What the replica behind `to` (UDP) answers to one datagram.
fn udp_peer(to: SocketAddrV4) -> Option<String> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.send_to(b"?", to).ok()?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// Asks through `host`'s ingress ports (TCP `tcp`, UDP `udp`) until `replica` answers, and
/// checks it saw `client`.
fn assert_sees(
    host: Ipv4Addr,
    (tcp, udp): (u16, u16),
    replica: &str,
    client: Ipv4Addr,
) -> anyhow::Result<()> {
    for (proto, port, ask) in [
        ("tcp", tcp, tcp_peer as fn(SocketAddrV4) -> Option<String>),
        ("udp", udp, udp_peer),
    ] {
        let to = SocketAddrV4::new(host, port);
        let answer = wait_for(
            Duration::from_secs(40),
            &format!("{proto} {to} answered"),
            || Ok(ask(to)),
        )?;
        let (seen, hostname) = answer.split_once(' ').context("answer")?;
        if hostname != replica {
            bail!("{proto} {to}: answered by {hostname}, not {replica}");
        }
        assert_eq!(
            seen,
            client.to_string(),
            "{proto} through {to}: the replica {replica} saw {seen}, not the client's {client}"
        );
    }
    Ok(())
}

/// A replica on the host that took the connection, and one on another host behind an
/// encrypted (WireGuard) and an unencrypted (VXLAN) network, each see the client's address,
/// for TCP and UDP; every host answers for every port.
#[test]
fn replicas_see_the_client_address() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("msl", 2)?;
    lab.import_c_tool(tmp.path(), "peerecho", PEERECHO_C)?;
    let service = |name: &str, network: &str, host: &str, tcp: u16| {
        format!(
            "---\nkind: Service\nname: {name}\nimage: peerecho:latest\nnetworks: [{network}]\n\
             stop_grace_period: 1\nplacement: {{constraints: [\"node.hostname=={host}\"]}}\n\
             command: [\"/bin/peerecho\", \"7\"]\nports:\n\
             \x20 - {{target: 7, published: {tcp}, mode: ingress}}\n\
             \x20 - {{target: 7, published: {}, protocol: udp, mode: ingress}}\n",
            tcp + 1
        )
    };
    lab.apply(
        tmp.path(),
        "echo.yaml",
        &format!(
            "kind: Network\nname: mesh\n---\nkind: Network\nname: plain\nencrypted: false\n{}{}{}",
            service("local", "mesh", "h1", 9001),
            service("remote", "mesh", "h2", 9003),
            service("plain", "plain", "h2", 9005),
        ),
    )?;
    let client = lab.lab.root_addr();
    for (name, host, ports) in [
        ("local", "h1", (9001, 9002)),
        ("remote", "h2", (9003, 9004)),
        ("plain", "h2", (9005, 9006)),
    ] {
        let task = running_on(&lab, name, host)?;
        let (_, hostname) = replica_hostname(&lab, &task)?;
        for via in ["h1", "h2"] {
            eprintln!("{name} (on {host}) through {via}");
            if let Err(e) = assert_sees(lab.host(via).addr, ports, &hostname, client) {
                diagnose(&lab);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Prints each host's mesh state (devices and their counters, rules, tables, nftables).
fn diagnose(lab: &LabGuard) {
    if let Some(secs) = std::env::var("MESH_HOLD").ok().and_then(|s| s.parse().ok()) {
        eprintln!("holding the lab for {secs}s");
        std::thread::sleep(Duration::from_secs(secs));
    }
    for h in ["h1", "h2"] {
        let ns = &lab.host(h).netns;
        for cmd in [
            "ip -s -d link show type vxlan",
            "ip rule",
            "ip route show table all type unicast",
            "nft list ruleset",
        ] {
            let mut args = vec!["netns", "exec", ns.as_str()];
            args.extend(cmd.split(' '));
            if let Ok(out) = Command::new("ip").args(&args).output() {
                eprintln!(
                    "== {h}: {cmd}\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// The hostname the replica named `task` answers with (its container's hostname).
fn replica_hostname(lab: &LabGuard, task: &str) -> anyhow::Result<(String, String)> {
    let out = rudder_tests::sh(lab, task, "hostname")?;
    Ok((task.to_string(), out.trim().to_string()))
}

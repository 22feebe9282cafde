//! Local networks over a real lab: `network_mode: bridge` (an address on the host's bridge,
//! outbound NAT, a host port mapped to a container port, no way into overlay networks) and
//! `network_mode: none` (loopback only).

use std::process::Command;

use anyhow::Context;
use rudder_tests::{exec, lab_with_busybox, running_task};

#[test]
fn bridge_maps_ports_and_nats_and_none_is_loopback_only() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("br", 2)?;
    lab.apply(
        tmp.path(),
        "b.yaml",
        "kind: Network\nname: secret\n---\n\
         kind: Service\nname: inside\nimage: busybox:latest\nnetworks: [secret]\n\
         placement: {constraints: [\"node.hostname==h2\"]}\n\
         command: [\"/bin/sh\", \"-c\", \"mkdir -p /www; echo inside > /www/index.html; exec httpd -f -p 80 -h /www\"]\n---\n\
         kind: Service\nname: bweb\nimage: busybox:latest\nnetwork_mode: bridge\n\
         placement: {constraints: [\"node.hostname==h2\"]}\n\
         command: [\"/bin/sh\", \"-c\", \"mkdir -p /www; hostname > /www/index.html; exec httpd -f -p 80 -h /www\"]\n\
         ports: [{target: 80, published: 8082, mode: host}]\n---\n\
         kind: Service\nname: alone\nimage: busybox:latest\nnetwork_mode: none\n\
         command: [\"/bin/sleep\", \"1000000\"]\n---\n\
         kind: Service\nname: side\nimage: busybox:latest\nnetwork_mode: \"container:bweb\"\n\
         command: [\"/bin/sleep\", \"1000000\"]\n",
    )?;
    let bweb = running_task(&lab, "bweb")?;
    let inside = running_task(&lab, "inside")?;
    let alone = running_task(&lab, "alone")?;
    let (h1, h2) = (lab.host("h1").addr, lab.host("h2").addr);

    // The mapped port answers on h2's address, from another host and from h2 itself.
    let name = bweb["id"].as_str().unwrap()[..12].to_string();
    for from in ["h1", "h2"] {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.host(from).netns,
                "timeout",
                "3",
                "busybox",
                "wget",
                "-qO-",
            ])
            .arg(format!("http://{h2}:8082/"))
            .output()?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            name,
            "from {from}"
        );
    }
    // An address on the bridge subnet; outbound connections leave through the host (NAT).
    let (_, addr) = exec(&lab, &bweb, &["ip", "-4", "-o", "addr", "show", "eth0"])?;
    assert!(addr.contains("inet 172.31."), "{addr}");
    let (ok, out) = exec(
        &lab,
        &bweb,
        &["sh", "-c", &format!("echo | nc -w 3 {h1} 4245 >/dev/null")],
    )?;
    assert!(ok, "outbound to another host: {out}");
    // No way into an overlay network from the bridge.
    let (_, ip) = exec(&lab, &inside, &["ip", "-4", "-o", "addr", "show", "eth0"])?;
    let overlay_addr = ip
        .split_whitespace()
        .find(|w| w.contains('/'))
        .and_then(|w| w.split('/').next())
        .context("overlay address")?
        .to_string();
    let (ok, _) = exec(
        &lab,
        &bweb,
        &[
            "timeout",
            "3",
            "wget",
            "-qO-",
            &format!("http://{overlay_addr}/"),
        ],
    )?;
    assert!(!ok, "the bridge cannot reach the overlay");
    // container:bweb: the sidecar is placed with bweb and shares its namespace (localhost).
    let side = running_task(&lab, "side")?;
    assert_eq!(side["node"], "h2");
    let (ok, out) = exec(
        &lab,
        &side,
        &["timeout", "3", "wget", "-qO-", "http://127.0.0.1/"],
    )?;
    assert!(ok, "{out}");
    assert_eq!(out.trim(), name);
    let e = lab
        .apply(
            tmp.path(),
            "bad.yaml",
            "kind: Service\nname: odd\nimage: busybox:latest\nnetwork_mode: container\n",
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains(":4:") && e.contains("network_mode"), "{e}");
    // none: loopback only.
    let (_, links) = exec(&lab, &alone, &["ip", "-o", "link"])?;
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo"), "{links}");
    Ok(())
}

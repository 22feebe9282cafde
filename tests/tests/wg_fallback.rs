//! The userspace WireGuard data path without offloads: `RUDDER_WG_OFFLOAD=0` in the agents'
//! environment (what a kernel that refuses `IFF_VNET_HDR`/`TUNSETOFFLOAD`, `UDP_SEGMENT` and
//! `UDP_GRO` leaves: one packet per syscall). Containers on two hosts still talk over the
//! encrypted network, a megabyte of random bytes arrives intact, and the TUN device shows
//! it was attached without the virtio header. (The offload path is what every other lab
//! test, `overlay` among them, runs on.)

use std::process::Command;
use std::time::Duration;

use rudder_tests::{exec, lab_with_busybox, running_tasks, wait_for, LabGuard};

fn running(lab: &LabGuard, service: &str) -> anyhow::Result<serde_json::Value> {
    wait_for(
        Duration::from_secs(60),
        &format!("{service} running"),
        || {
            let t = lab.tasks(service)?;
            Ok(running_tasks(&t).first().map(|t| (*t).clone()))
        },
    )
}

#[test]
fn encrypted_network_without_offloads() -> anyhow::Result<()> {
    // This file's only test: the lab's agents (and their WireGuard children) inherit it.
    std::env::set_var("RUDDER_WG_OFFLOAD", "0");
    std::env::set_var("RUDDER_WG_BACKEND", "userspace");
    let (lab, tmp) = lab_with_busybox("wgf", 2)?;
    lab.apply(
        tmp.path(),
        "wg.yaml",
        "kind: Network\nname: sealed\n---\n\
         kind: Service\nname: files\nimage: busybox:latest\nnetworks: [sealed]\n\
         placement:\n  constraints: [\"node.hostname==h2\"]\n\
         command: [\"/bin/sh\", \"-c\", \"mkdir -p /www; head -c 1048576 /dev/urandom > /www/blob; \
         md5sum /www/blob | cut -d' ' -f1 > /www/sum; exec httpd -f -p 80 -h /www\"]\n---\n\
         kind: Service\nname: client\nimage: busybox:latest\nnetworks: [sealed]\n\
         placement:\n  constraints: [\"node.hostname==h1\"]\ncommand: [\"/bin/sleep\", \"1000000\"]\n",
    )?;
    let files = running(&lab, "files")?;
    let client = running(&lab, "client")?;
    let (_, want) = wait_for(Duration::from_secs(30), "the blob's sum", || {
        let (ok, out) = exec(&lab, &files, &["cat", "/www/sum"])?;
        Ok((ok && out.trim().len() == 32).then_some((ok, out.trim().to_string())))
    })?;
    let got =
        wait_for(Duration::from_secs(60), "the blob over WireGuard", || {
            let (ok, out) = exec(
                &lab,
                &client,
                &[
                    "sh",
                    "-c",
                    "timeout 20 wget -qO- http://tasks.files/blob | md5sum | cut -d' ' -f1",
                ],
            )?;
            Ok((ok && out.trim() != "d41d8cd98f00b204e9800998ecf8427e")
                .then(|| out.trim().to_string()))
        })?;
    assert_eq!(got, want, "the megabyte arrived intact");

    // Both hosts' TUN devices were attached without the virtio header.
    for host in ["h1", "h2"] {
        let netns = lab.host(host).netns.clone();
        let out = Command::new("ip")
            .args([
                "netns", "exec", &netns, "ip", "-d", "link", "show", "type", "tun",
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("vnet_hdr off"),
            "{host}: TUN without offloads:\n{text}"
        );
    }
    Ok(())
}

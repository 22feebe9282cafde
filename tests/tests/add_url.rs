//! `ADD <url>` cannot reach what only the build host can (audit M8), on a real lab: loopback,
//! link-local (the cloud metadata address), the host's own and the cluster's other hosts'
//! addresses are refused, written as such or reached through a redirect, with the Dockerfile
//! line and the URL in the error. No request is sent to any of them: the refusals happen before
//! connecting. `--allow-cluster-urls` lets a build reach the cluster's hosts.

use std::io::{Read, Write};

use rudder_tests::lab_with_busybox;

/// A server on `ip` that answers every request with a redirect to `to`.
fn redirector(ip: std::net::Ipv4Addr, to: String) -> anyhow::Result<std::net::SocketAddr> {
    let l = std::net::TcpListener::bind((ip, 0))?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut buf = [0u8; 2048];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n"
            );
        }
    });
    Ok(addr)
}

#[test]
fn add_refuses_local_and_metadata_addresses() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("au", 2)?;
    let own = lab.lab.hosts[0].addr;
    let other = lab.lab.hosts[1].addr;
    let hop = redirector(lab.lab.root_addr(), "http://127.0.0.1:9/secret".into())?;
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx)?;
    let cases = [
        (
            "http://127.0.0.1:9/x".to_string(),
            "127.0.0.1 is a loopback address",
        ),
        ("http://[::1]:9/x".to_string(), "::1 is a loopback address"),
        (
            "http://169.254.169.254/latest/meta-data/x".to_string(),
            "169.254.169.254 is a link-local address",
        ),
        (
            format!("http://{own}:4245/x"),
            "is an address of this cluster's hosts",
        ),
        (
            format!("http://{other}:4245/x"),
            "is an address of this cluster's hosts",
        ),
        (format!("http://{hop}/x"), "127.0.0.1 is a loopback address"),
    ];
    // `ADD url` on h1, with extra build flags; the build's error.
    let build_adding = |url: &str, flags: &[&str]| -> anyhow::Result<String> {
        std::fs::write(
            ctx.join("Dockerfile"),
            format!("FROM busybox:latest\nADD {url} /x\n"),
        )?;
        let mut args = vec!["build", "-t", "ssrf:1", "--node", "h1"];
        args.extend_from_slice(flags);
        args.push(ctx.to_str().unwrap());
        Ok(lab.rctl(&args).unwrap_err().to_string())
    };
    for (url, why) in cases {
        let e = build_adding(&url, &[])?;
        assert!(e.contains(&format!("line 2: ADD {url}: ")), "{e}");
        assert!(e.contains(why), "{url}: {e}");
    }
    // Allowed by the admin: the other host is asked (its agent speaks TLS, so the fetch fails
    // for another reason than a refusal).
    let url = format!("http://{other}:4245/x");
    let e = build_adding(&url, &["--allow-cluster-urls"])?;
    assert!(e.contains(&format!("line 2: ADD {url}: ")), "{e}");
    assert!(!e.contains("may not fetch from"), "{e}");
    Ok(())
}

//! The web dashboard over a real lab (one controller, two agents), driven by a real browser:
//! Debian's `chromium` headless logs in with a token from `rctl dashboard token` (the
//! `/login?token=` URL, which sets the session cookie and redirects to the page), and the test
//! checks the DOM after the page's JavaScript ran (the service names are there; a label
//! holding `<script>` shows as text) and a screenshot (a valid, non-blank PNG, kept at
//! `target/dashboard-screenshot.png`). The HTTP API is checked directly too: no cookie is 401,
//! a worker certificate 403, an expired or reused token 401, a POST without the CSRF header
//! 403, and a scale through the API changes the service.
//!
//! The browser does not know the lab's CA, so chromium runs with `--ignore-certificate-errors`
//! here only; the direct HTTP checks verify the server certificate against the cluster CA.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rudder_tests::{bin_dir, lab_with_busybox_args, running_tasks, wait_for};

const DASHBOARD: u16 = 4249;

/// A client identity: CA, certificate and key (PEM).
struct Identity {
    cert: String,
    key: String,
}

/// One HTTP/1.1 exchange over TLS (server certificate checked against `ca_pem`), presenting
/// `who` if given. Returns the status code and the whole answer.
fn https(
    addr: SocketAddr,
    ca_pem: &str,
    who: Option<&Identity>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let who = who.map(|w| (w.cert.as_str(), w.key.as_str()));
    let mut tls =
        rudder_tests::tls_connect(addr, "manager.rudder", ca_pem, who, Duration::from_secs(15))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: rudder\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    tls.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    // A close without TLS close_notify is fine here: the answer is complete.
    let _ = tls.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {out:?}"))?;
    Ok((code, out))
}

/// The session cookie a `Set-Cookie` header of `answer` sets.
fn session_cookie(answer: &str) -> Option<String> {
    answer.lines().find_map(|l| {
        let v = l
            .strip_prefix("set-cookie: ")
            .or_else(|| l.strip_prefix("Set-Cookie: "))?;
        v.split(';').next().map(str::to_string)
    })
}

/// Runs chromium headless with `args` then `url`, in a process group of its own, killed
/// (the whole group) if it has not finished within `limit`. Returns its stdout.
fn chromium(profile: &Path, args: &[&str], url: &str, limit: Duration) -> anyhow::Result<String> {
    let out_path = profile.join("stdout");
    let err_path = profile.join("stderr");
    let mut child = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            // The lab CA is not in chromium's store; this test only (see the module doc).
            "--ignore-certificate-errors",
            "--window-size=1400,1000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.join("profile").display()
        ))
        .args(args)
        .arg(url)
        .env("HOME", profile)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .process_group(0)
        .spawn()
        .context("chromium (Debian package chromium, see .ci/install-deps)")?;
    let pid = child.id() as i32;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if start.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Whatever happened, no chromium process of ours outlives this call.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let Some(status) = status else {
        anyhow::bail!("chromium did not finish within {limit:?}: {stderr}");
    };
    anyhow::ensure!(status.success(), "chromium failed ({status}): {stderr}");
    Ok(std::fs::read_to_string(&out_path)?)
}

/// Checks that `png` is a PNG of `width`×`height` whose pixels are not all alike: the IHDR
/// says so and the decompressed scanlines hold many distinct byte values.
fn check_png(png: &[u8], width: u32, height: u32) -> anyhow::Result<()> {
    anyhow::ensure!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let mut pos = 8;
    let mut idat = Vec::new();
    let mut dims = None;
    while pos + 8 <= png.len() {
        let len = u32::from_be_bytes(png[pos..pos + 4].try_into()?) as usize;
        let kind = &png[pos + 4..pos + 8];
        let data = png
            .get(pos + 8..pos + 8 + len)
            .context("truncated PNG chunk")?;
        match kind {
            b"IHDR" => {
                dims = Some((
                    u32::from_be_bytes(data[0..4].try_into()?),
                    u32::from_be_bytes(data[4..8].try_into()?),
                ))
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        pos += 12 + len;
    }
    anyhow::ensure!(dims == Some((width, height)), "PNG size {dims:?}");
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..]).read_to_end(&mut raw)?;
    let mut seen = [false; 256];
    raw.iter().for_each(|b| seen[*b as usize] = true);
    let distinct = seen.iter().filter(|s| **s).count();
    let nonzero = raw.iter().filter(|b| **b != 0).count();
    anyhow::ensure!(
        distinct > 32 && nonzero > raw.len() / 100,
        "the screenshot looks blank ({distinct} distinct bytes, {nonzero} non-zero of {})",
        raw.len()
    );
    Ok(())
}

fn token(lab: &rudder_tests::LabGuard, ttl: &str) -> anyhow::Result<String> {
    Ok(lab
        .rctl(&["dashboard", "token", "--ttl", ttl])?
        .trim()
        .to_string())
}

#[test]
fn dashboard_in_a_browser() -> anyhow::Result<()> {
    let listen = format!("0.0.0.0:{DASHBOARD}");
    let (lab, tmp) = lab_with_busybox_args("dash", 2, 1, &["--dashboard-listen", &listen])?;
    lab.apply(
        tmp.path(),
        "web.yaml",
        "kind: Service\nname: web\nimage: busybox:latest\nreplicas: 2\n\
         labels:\n  team: \"<script>alert(1)</script>\"\n\
         command: [\"/bin/sh\", \"-c\", \"echo hello-from-web; exec sleep 100000\"]\n",
    )?;
    lab.apply(
        tmp.path(),
        "api.yaml",
        "kind: Service\nname: api\nimage: busybox:latest\nreplicas: 1\n\
         command: [\"/bin/sh\", \"-c\", \"exec sleep 100000\"]\n",
    )?;
    wait_for(Duration::from_secs(60), "web and api running", || {
        let ok = running_tasks(&lab.tasks("web")?).len() == 2
            && running_tasks(&lab.tasks("api")?).len() == 1;
        Ok(ok.then_some(()))
    })?;

    let h1 = &lab.lab.hosts[0];
    let addr = SocketAddr::from((h1.addr, DASHBOARD));
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| p.display().to_string());
    let admin_dir = h1.controller_data_dir().join("admin");
    let ca = read(&admin_dir.join("ca.pem"))?;
    let admin = Identity {
        cert: read(&admin_dir.join("admin.pem"))?,
        key: read(&admin_dir.join("admin-key.pem"))?,
    };
    let get = |path: &str, who: Option<&Identity>, cookie: Option<&str>| {
        let c = cookie.map(|c| ("Cookie", c));
        https(addr, &ca, who, "GET", path, c.as_slice(), "")
    };

    // Refusals: no cookie, a worker certificate, an expired token, a token used twice.
    let (code, a) = get("/api/state", None, None)?;
    assert_eq!(code, 401, "{a}");
    assert!(a.contains("rctl dashboard token"), "{a}");
    for header in [
        "content-security-policy: default-src 'self'",
        "frame-ancestors 'none'",
        "x-content-type-options: nosniff",
    ] {
        assert!(a.to_lowercase().contains(header), "no {header} in {a}");
    }
    let (code, a) = get("/", None, None)?;
    assert!(
        code == 303 && a.to_lowercase().contains("location: /login"),
        "{a}"
    );
    let worker_certs = rudder_pki::tls::NodeCerts::load(&lab.lab.hosts[1].data_dir.join("certs"))?;
    let worker = Identity {
        cert: worker_certs.cert_pem().to_string(),
        key: worker_certs.key_pem().to_string(),
    };
    let (code, a) = get("/api/state", Some(&worker), None)?;
    assert!(code == 403 && a.contains("worker certificate"), "{a}");
    let short = token(&lab, "1s")?;
    std::thread::sleep(Duration::from_millis(1500));
    let (code, a) = get(&format!("/login?token={short}"), None, None)?;
    assert!(code == 401 && a.contains("expired"), "{a}");
    let t = token(&lab, "5m")?;
    let (code, a) = get(&format!("/login?token={t}"), None, None)?;
    assert_eq!(code, 303, "{a}");
    let cookie = session_cookie(&a).context("no session cookie")?;
    assert!(a.contains("HttpOnly") && a.contains("SameSite=Strict") && a.contains("Secure"));
    let (code, a) = get(&format!("/login?token={t}"), None, None)?;
    assert!(code == 401 && a.contains("already used"), "{a}");

    // The API with the session: state, then a scale (refused without the CSRF header).
    let (code, a) = get("/api/state", None, Some(&cookie))?;
    assert_eq!(code, 200, "{a}");
    assert!(
        a.contains("\"name\":\"web\"") && a.contains("\"name\":\"api\""),
        "{a}"
    );
    let (_, s) = get("/api/session", None, Some(&cookie))?;
    let body = s.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let session: serde_json::Value = serde_json::from_str(body).context("session json")?;
    let csrf = session["csrf"].as_str().context("csrf")?.to_string();
    let post_scale = |headers: &[(&str, &str)]| {
        https(
            addr,
            &ca,
            None,
            "POST",
            "/api/services/api/scale",
            headers,
            r#"{"replicas":2}"#,
        )
    };
    let json = ("Content-Type", "application/json");
    let (code, a) = post_scale(&[("Cookie", &cookie), json])?;
    assert!(code == 403 && a.contains("x-rudder-csrf"), "{a}");
    let (code, a) = post_scale(&[("Cookie", &cookie), json, ("X-Rudder-Csrf", &csrf)])?;
    assert_eq!(code, 200, "{a}");
    wait_for(Duration::from_secs(60), "api scaled to 2", || {
        Ok((running_tasks(&lab.tasks("api")?).len() == 2).then_some(()))
    })?;
    // An admin certificate is enough on its own.
    let (code, a) = get("/api/state", Some(&admin), None)?;
    assert_eq!(code, 200, "{a}");

    // The browser: log in through the URL `rctl dashboard open` prints, let the page's
    // JavaScript render, dump the DOM.
    let url = lab.rctl(&["dashboard", "open"])?.trim().to_string();
    assert!(
        url.starts_with(&format!(
            "https://{}:{DASHBOARD}/login?token=rdt1.",
            h1.addr
        )),
        "{url}"
    );
    let profile = tempfile::tempdir()?;
    // Virtual time: the page has rendered its state well before 700 ms of it, and opens its
    // event stream (which never ends, so would hold the budget) only after 1 s of it.
    let budget = ["--virtual-time-budget=700"];
    let dom = chromium(
        profile.path(),
        &[&budget[..], &["--dump-dom"]].concat(),
        &url,
        Duration::from_secs(90),
    )?;
    for want in [">web<", ">api<", ">2/2<", "raft index"] {
        assert!(dom.contains(want), "no {want} in the rendered page:\n{dom}");
    }
    // The label is text, not markup.
    assert!(
        dom.contains("team=&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{dom}"
    );
    assert!(!dom.contains("<script>alert"), "{dom}");

    // The screenshot, with a fresh token (each logs in once).
    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    let url = lab.rctl(&["dashboard", "open"])?.trim().to_string();
    let profile = tempfile::tempdir()?;
    let arg = format!("--screenshot={}", shot.display());
    chromium(
        profile.path(),
        &[&budget[..], &[arg.as_str()]].concat(),
        &url,
        Duration::from_secs(90),
    )?;
    let png = std::fs::read(&shot).with_context(|| shot.display().to_string())?;
    check_png(&png, 1400, 1000)?;
    println!("dashboard screenshot: {}", shot.display());
    Ok(())
}

/// `target/dashboard-screenshot.png`, kept after the test for people to look at.
fn screenshot_path() -> PathBuf {
    bin_dir()
        .parent()
        .map_or_else(bin_dir, Path::to_path_buf)
        .join("dashboard-screenshot.png")
}

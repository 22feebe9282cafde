//! Packaging (issue 21): the systemd units pass `systemd-analyze verify` and keep the interface
//! `rudder init`/`join` rely on; `scripts/release.sh` in its fast mode packages the debug
//! binaries into a .deb with the right layout, modes, dependencies and maintainer scripts, and a
//! tarball with checksums; `scripts/install.sh` installs that tarball into a temporary root
//! twice with the same result (the second run changes nothing and says so) and refuses a
//! tarball whose checksum does not match. Nothing on the real machine is touched.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rudder_tests::{bin, bin_dir};

const BINS: [&str; 5] = [
    "rudder",
    "rudder-controller",
    "rudder-agent",
    "rudder-shim",
    "rctl",
];
const UNITS: [&str; 2] = ["rudder-controller.service", "rudder-agent.service"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cmd` (stdin closed), asserts success, returns stdout and stderr.
fn run(cmd: &mut Command) -> (String, String) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{cmd:?} failed: {so}\n{se}");
    (so, se)
}

fn unit(name: &str) -> String {
    std::fs::read_to_string(repo().join("packaging/systemd").join(name)).unwrap()
}

#[test]
fn units_pass_systemd_analyze_verify() {
    // verify checks that ExecStart's binary exists: point a copy at the built ones.
    let dir = tempfile::tempdir().unwrap();
    for (u, b) in UNITS.iter().zip(["rudder-controller", "rudder-agent"]) {
        let text = unit(u).replace(&format!("/usr/bin/{b} "), &format!("{} ", bin(b).display()));
        assert!(
            text.contains(&bin(b).display().to_string()),
            "{u}: no ExecStart"
        );
        std::fs::write(dir.path().join(u), text).unwrap();
    }
    let paths: Vec<PathBuf> = UNITS.iter().map(|u| dir.path().join(u)).collect();
    let (out, err) = run(Command::new("systemd-analyze").arg("verify").args(&paths));
    // verify exits 0 on unknown keys and misplaced options: any word from it is a finding.
    assert_eq!(
        format!("{out}{err}").trim(),
        "",
        "systemd-analyze verify findings"
    );
}

#[test]
fn units_keep_the_bootstrap_interface() {
    let c = unit("rudder-controller.service");
    let a = unit("rudder-agent.service");
    assert!(c.contains("\nExecStart=/usr/bin/rudder-controller --config /etc/rudder/rudder.toml\n"));
    assert!(a.contains("\nExecStart=/usr/bin/rudder-agent --config /etc/rudder/rudder.toml\n"));
    for text in [&c, &a] {
        for want in [
            "\nType=notify\n",
            "\nRestart=on-failure\n",
            "\nStandardOutput=journal\n",
        ] {
            assert!(text.contains(want), "missing {want:?}");
        }
    }
    // Containers and their shims outlive an agent restart.
    for want in [
        "\nKillMode=process\n",
        "\nDelegate=yes\n",
        "\nTasksMax=infinity\n",
    ] {
        assert!(a.contains(want), "agent unit lacks {want:?}");
    }
    for bad in [
        "\nProtectSystem=",
        "\nPrivateTmp=",
        "\nNoNewPrivileges=",
        "\nSystemCallFilter=",
    ] {
        assert!(!a.contains(bad), "agent unit must not set {bad:?}");
    }
    for want in [
        "\nProtectSystem=strict\n",
        "\nReadWritePaths=/var/lib/rudder\n",
        "\nNoNewPrivileges=yes\n",
        "\nCapabilityBoundingSet=\n",
    ] {
        assert!(c.contains(want), "controller unit lacks {want:?}");
    }
}

/// `path -> "mode size sha256"` for every entry below `root`.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let mode = m.permissions().mode() & 0o7777;
            let what = if m.is_dir() {
                stack.push(p);
                format!("dir {mode:o}")
            } else {
                let (sum, _) = run(Command::new("sha256sum").arg(&p));
                let sum = sum.split_whitespace().next().unwrap_or("").to_string();
                format!("file {mode:o} {} {sum}", m.len())
            };
            out.insert(rel, what);
        }
    }
    out
}

#[test]
fn release_packages_debug_binaries_and_install_runs_twice() {
    for b in BINS {
        bin(b);
    }
    let tmp = tempfile::tempdir().unwrap();
    let dist = tmp.path().join("dist");
    run(Command::new(repo().join("scripts/release.sh"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .args(["--arch", "amd64", "--out"])
        .arg(&dist));
    let version = env!("CARGO_PKG_VERSION");
    let deb = dist.join(format!("rudder_{version}_amd64.deb"));
    let tgz = dist.join(format!("rudder-{version}-amd64.tar.gz"));
    run(Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&dist));

    // The package: fields and dependencies.
    let (info, _) = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for want in [
        "Package: rudder\n",
        &format!("Version: {version}\n"),
        "Architecture: amd64\n",
        "Depends: runc | crun, nftables\n",
    ] {
        assert!(info.contains(want), "dpkg-deb -I lacks {want:?}:\n{info}");
    }
    // No conffile: `rudder init`/`join` write the configuration.
    assert!(!info.contains("conffiles"), "{info}");
    // Its files: root-owned, binaries 0755 in /usr/bin (the agent finds rudder-shim next to
    // itself), units 0644.
    let (contents, _) = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let files: BTreeMap<&str, (&str, &str)> = contents
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((*f.get(5)?, (*f.first()?, *f.get(1)?)))
        })
        .collect();
    for b in BINS {
        let path = format!("./usr/bin/{b}");
        assert_eq!(
            files.get(path.as_str()),
            Some(&("-rwxr-xr-x", "root/root")),
            "{path}"
        );
    }
    for u in UNITS {
        let path = format!("./lib/systemd/system/{u}");
        assert_eq!(
            files.get(path.as_str()),
            Some(&("-rw-r--r--", "root/root")),
            "{path}"
        );
    }
    assert!(files.keys().all(|p| !p.starts_with("./etc/")), "{contents}");
    // Maintainer scripts: reload systemd, never start or enable a service.
    let ctl = tmp.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl));
    let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
    assert!(postinst.contains("systemctl daemon-reload"), "{postinst}");
    assert!(
        postinst.contains("install -d -m 0700 /etc/rudder"),
        "{postinst}"
    );
    for s in ["postinst", "prerm", "postrm"] {
        let text = std::fs::read_to_string(ctl.join(s)).unwrap();
        // Only `systemctl daemon-reload` and `stop` (on removal) are ever run.
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            for word in ["start", "enable", "restart", "invoke-rc.d"] {
                let called = line.split_whitespace().any(|w| w == word);
                assert!(!called, "{s} runs {word}: {line}");
            }
        }
        let mode = std::fs::metadata(ctl.join(s)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{s}");
    }

    // install.sh twice into a temporary root: same tree, the second run says nothing changed.
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let install = |root: &Path, tarball: &Path| {
        let mut c = Command::new(repo().join("scripts/install.sh"));
        c.arg("--root").arg(root).arg("--from").arg(tarball);
        c
    };
    let (first, _) = run(&mut install(&root, &tgz));
    assert!(first.contains("wrote /usr/bin/rudder-agent"), "{first}");
    let after_first = tree(&root);
    let (second, _) = run(&mut install(&root, &tgz));
    assert!(second.contains("nothing to change"), "{second}");
    assert!(
        !second.contains("wrote") && !second.contains("created"),
        "{second}"
    );
    assert_eq!(tree(&root), after_first);
    for (path, want) in [
        ("usr/bin/rudder-agent", "file 755"),
        ("usr/bin/rudder-shim", "file 755"),
        ("lib/systemd/system/rudder-agent.service", "file 644"),
        ("etc/rudder", "dir 700"),
        ("var/lib/rudder", "dir 700"),
    ] {
        let got = after_first
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing"));
        assert!(got.starts_with(want), "{path}: {got}");
    }
    // A loosened directory is fixed, and only that is reported.
    std::fs::set_permissions(
        root.join("etc/rudder"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let (third, _) = run(&mut install(&root, &tgz));
    assert!(third.contains("set /etc/rudder to mode 700"), "{third}");
    assert!(third.contains("1 changes"), "{third}");

    // A tarball that does not match SHA256SUMS is refused, and nothing is installed.
    let bad_dir = tmp.path().join("bad");
    std::fs::create_dir(&bad_dir).unwrap();
    let bad = bad_dir.join(tgz.file_name().unwrap());
    let mut bytes = std::fs::read(&tgz).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&bad, bytes).unwrap();
    std::fs::copy(dist.join("SHA256SUMS"), bad_dir.join("SHA256SUMS")).unwrap();
    let clean = tmp.path().join("clean");
    std::fs::create_dir(&clean).unwrap();
    let out = install(&clean, &bad).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("checksum mismatch") && err.contains("refusing"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&clean).unwrap().count(), 0);
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The next datagram on `sock`, or None after `secs`.
fn next_datagram(sock: &std::os::unix::net::UnixDatagram, secs: u64) -> Option<String> {
    sock.set_read_timeout(Some(std::time::Duration::from_secs(secs)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// What systemd sees of a `Type=notify` controller: READY=1 only once its API accepts, then
/// STOPPING=1 on SIGTERM; its children never see NOTIFY_SOCKET (checked in `rudder-sdnotify`).
#[test]
fn controller_tells_systemd_ready_then_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    let api = free_port();
    let mut child = Command::new(bin("rudder-controller"))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--registry-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", "off"])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let ready = next_datagram(&sock, 60);
    let accepting = std::net::TcpStream::connect(("127.0.0.1", api)).is_ok();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopping = next_datagram(&sock, 30);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(tmp.path().join("log")).unwrap_or_default();
    let ready = ready.unwrap_or_else(|| panic!("no READY=1 in 60 s; log:\n{log}"));
    assert_eq!(
        ready,
        format!("READY=1\nSTATUS=serving the API on 127.0.0.1:{api}\n")
    );
    assert!(accepting, "ready but the API port refused");
    assert_eq!(
        stopping.as_deref(),
        Some("STOPPING=1\nSTATUS=stopping\n"),
        "{log}"
    );
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
}

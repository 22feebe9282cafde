//! `rctl image tag/push/pull` and `rctl login` against Debian's `docker-registry` (the
//! reference distribution registry 2.8), started by the test on 127.0.0.1 with htpasswd basic
//! auth and plain HTTP, next to a one-host lab. rctl runs on this machine and moves the bytes
//! itself (rctl ↔ that registry, rctl ↔ the cluster registry), so loopback is where both meet.
//!
//! Shown: a wrong password is refused at login and at push; busybox tagged with the registry's
//! host and pushed (needs `--insecure`, says so without it); a second push moves nothing; an
//! image put straight into that registry is pulled (bytes move), runs as a service, and a
//! second pull moves 0 bytes; a commit of that service (one new file) pushes only the new
//! layer and config; a missing tag, an image not in the cluster, a name without a registry
//! and a logged-out push fail with errors that say what to do.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context as _;
use rudder_tests::{lab_with_busybox, running_task, DistributionRegistry, LabGuard};

const USER: &str = "tester";
const PASS: &str = "s3cret-pw";

/// A `docker-registry` with htpasswd basic auth for `USER`.
fn start_registry() -> anyhow::Result<DistributionRegistry> {
    let htpasswd = Command::new("htpasswd")
        .args(["-Bbn", USER, PASS])
        .output()
        .context("run htpasswd (apt-get install apache2-utils; see .ci/install-deps)")?;
    anyhow::ensure!(htpasswd.status.success(), "htpasswd failed");
    DistributionRegistry::start(
        "auth:\n  htpasswd:\n    realm: rudder-test\n    path: {dir}/htpasswd\n",
        &[("htpasswd", &htpasswd.stdout)],
    )
}

/// `rctl ARGS` against the lab with credentials under `config` (RUDDER_CONFIG) and `stdin` fed
/// in: stdout, or an error with stderr.
fn rctl(lab: &LabGuard, config: &Path, args: &[&str], stdin: &str) -> anyhow::Result<String> {
    lab.rctl_with(args, &[("RUDDER_CONFIG", config)], Some(stdin))
}

fn counts(line: &str) -> (u64, u64, u64) {
    let inner = line
        .rsplit_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no counts in {line:?}"));
    let nums: Vec<u64> = inner
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(nums.len(), 3, "{line:?}");
    (nums[0], nums[1], nums[2])
}

fn err_of(r: anyhow::Result<String>) -> String {
    match r {
        Ok(out) => panic!("expected an error, got {out:?}"),
        Err(e) => e.to_string(),
    }
}

/// Puts `repo:tag` into the outside registry directly (not through the cluster): busybox plus
/// `/marker`, so its layer is one the cluster has never seen.
fn seed_outside(host: &str, rootfs: &Path, reference: &str, marker: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tar = dir.path().join("seed.tar");
    std::fs::copy(rootfs, &tar)?;
    std::fs::write(dir.path().join("marker"), marker)?;
    let st = Command::new("tar")
        .arg("-rf")
        .arg(&tar)
        .arg("-C")
        .arg(dir.path())
        .arg("marker")
        .status()?;
    anyhow::ensure!(st.success(), "tar -rf failed");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = rudder_image::RegistryClient::remote(
            host,
            true,
            Some(rudder_image::Credentials::new(USER, PASS)),
        )?;
        let reference = rudder_image::Reference::parse(reference)?;
        rudder_image::import_rootfs(&client, &tar, &reference).await?;
        anyhow::Ok(())
    })
}

#[test]
fn push_and_pull_between_the_cluster_and_a_distribution_registry() -> anyhow::Result<()> {
    let started = Instant::now();
    let registry = start_registry()?;
    let (lab, tmp) = lab_with_busybox("img", 1)?;
    let host = registry.host();
    let config: PathBuf = tmp.path().join("rudder-config");
    let run = |args: &[&str]| rctl(&lab, &config, args, "");

    // ---- login: a wrong password is refused before anything is stored ----
    let login = ["login", &host, "-u", USER, "--password-stdin", "--insecure"];
    let err = err_of(rctl(&lab, &config, &login, "wrong\n"));
    assert!(
        err.contains(&format!(
            "{host}: authentication failed (run rctl login {host})"
        )),
        "{err}"
    );
    assert!(!config.join("auth.json").exists());
    rctl(&lab, &config, &login, &format!("{PASS}\n"))?;
    let mode = std::fs::metadata(config.join("auth.json"))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "auth.json holds a password");

    // ---- tag + push busybox ----
    let v1 = format!("{host}/team/bb:v1");
    let out = run(&["image", "tag", "busybox:latest", &v1])?;
    assert!(out.starts_with("team/bb:v1 sha256:"), "{out}");
    let err = err_of(run(&["image", "push", &v1]));
    assert!(
        err.contains("tls handshake failed") && err.contains("pass --insecure"),
        "{err}"
    );
    let out = run(&["image", "push", &v1, "--insecure"])?;
    eprint!("{out}");
    assert!(out.starts_with(&format!("pushed {v1} sha256:")), "{out}");
    let (bytes, moved, there) = counts(&out);
    assert_eq!((moved, there), (2, 0), "{out}");
    let busybox_bytes = bytes;
    assert!(busybox_bytes > 100_000, "{out}");
    let out = run(&["image", "push", &v1, "--insecure"])?;
    eprint!("{out}");
    assert_eq!(counts(&out), (0, 0, 2), "nothing travels twice: {out}");

    // ---- refusals before any traffic to the registry ----
    let missing = format!("{host}/team/nothere:v1");
    let err = err_of(run(&["image", "push", &missing, "--insecure"]));
    assert!(
        err.contains(&format!(
            "image {missing} not found in the cluster registry"
        )),
        "{err}"
    );
    let err = err_of(run(&["image", "push", "team/bb:v1", "--insecure"]));
    assert!(err.contains("name the registry to push to"), "{err}");

    // ---- pull an image the cluster has never seen; run it ----
    seed_outside(
        &host,
        &tmp.path().join("busybox.tar"),
        "fresh/app:v1",
        "from-outside",
    )?;
    let remote_app = format!("{host}/fresh/app:v1");
    let err = err_of(run(&[
        "image",
        "pull",
        &format!("{host}/fresh/app:nope"),
        "--insecure",
    ]));
    assert!(
        err.contains(&format!(
            "pull {host}/fresh/app:nope: manifest unknown (tag nope not found)"
        )),
        "{err}"
    );
    let out = run(&["image", "pull", &remote_app, "--insecure"])?;
    eprint!("{out}");
    assert!(
        out.starts_with(&format!("pulled {remote_app} as fresh/app:v1 sha256:")),
        "{out}"
    );
    let (bytes, moved, there) = counts(&out);
    assert_eq!((moved, there), (2, 0), "{out}");
    assert!(bytes > 100_000, "{out}");
    let out = run(&["image", "pull", &remote_app, "--insecure"])?;
    eprint!("{out}");
    assert_eq!(
        counts(&out),
        (0, 0, 2),
        "a second pull moves 0 bytes: {out}"
    );

    lab.apply(
        tmp.path(),
        "app.yaml",
        "kind: Service\nname: app\nimage: fresh/app:v1\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"1000000\"]\n",
    )?;
    let task = running_task(&lab, "app")?;
    let name = task["name"].as_str().context("task name")?.to_string();
    let marker = lab.rctl(&["exec", &name, "--", "cat", "/marker"])?;
    assert_eq!(marker, "from-outside");

    // ---- one new layer: only it (and the new config) travel ----
    lab.rctl(&["exec", &name, "--", "sh", "-c", "echo added > /added.txt"])?;
    lab.rctl(&["commit", &name, "fresh/app:v2"])?;
    let v2 = format!("{host}/fresh/app:v2");
    let out = run(&["image", "push", &v2, "--insecure"])?;
    eprint!("{out}");
    let (bytes, moved, there) = counts(&out);
    assert_eq!(
        (moved, there),
        (2, 1),
        "new layer + config; base already there: {out}"
    );
    assert!(bytes < 20_000, "only the small new layer: {out}");

    // ---- credentials: a stored wrong password, then none ----
    let wrong = format!(
        "{{\"auths\":{{\"{host}\":{{\"auth\":\"{}\"}}}}}}",
        rudder_image::Credentials::new(USER, "wrong").encode()
    );
    std::fs::write(config.join("auth.json"), wrong)?;
    let err = err_of(run(&["image", "push", &v1, "--insecure"]));
    assert!(
        err.contains(&format!(
            "{host}: authentication failed (run rctl login {host})"
        )),
        "{err}"
    );
    run(&["logout", &host])?;
    let err = err_of(run(&["image", "pull", &remote_app, "--insecure"]));
    assert!(
        err.contains(&format!(
            "{host}: authentication required (run rctl login {host})"
        )),
        "{err}"
    );
    eprintln!("images test took {:?}", started.elapsed());
    Ok(())
}

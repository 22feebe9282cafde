//! The cluster registry with the tools people push with, on a real one-host lab (the test runs
//! in the root network namespace and reaches the registry on h1's underlay address, as rctl
//! does). skopeo presents the admin certificate and copies busybox OUT of the registry into an
//! OCI layout, adds a layer to it, copies it back IN under a new name, copies it across
//! repositories (a blob mount), inspects it, lists its tags, copies it out again byte for byte
//! and deletes the copy; podman (when it works here) pulls that image, then imports a rootfs
//! with a file of its own, pushes it (a layer the registry has never seen) and pulls it back;
//! services run from both pushed images and read the files that were added. With curl: a blob
//! whose digest does not match is refused and leaves neither a blob nor an upload file on the
//! controller's disk; a chunked upload (PATCH with Content-Range, a 416 for an out-of-order
//! chunk, a closing PUT) stores its blob.
//!
//! Everything the test makes (lab, temp dirs with podman's storage) is removed when it ends,
//! also on failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use rudder_tests::{lab_with_busybox, running_tasks, wait_for, LabGuard};
use serde_json::{json, Value};

/// What the layer added to busybox holds; a service reads it back.
const MARKER_PATH: &str = "etc/pushed-by-skopeo";
/// The file podman's image has on top of busybox's rootfs.
const PODMAN_MARKER: &str = "etc/pushed-by-podman";

/// The admin's client certificate in the cert-dir layout of containers/image (skopeo, podman):
/// `*.crt` are trusted CAs, `*.cert` with the `*.key` of the same stem the client identity.
fn cert_dir(lab: &LabGuard, dir: &Path) -> anyhow::Result<PathBuf> {
    let certs = dir.join("certs.d");
    std::fs::create_dir_all(&certs)?;
    let admin = lab.lab.hosts[0].controller_data_dir().join("admin");
    std::fs::copy(admin.join("ca.pem"), certs.join("ca.crt"))?;
    std::fs::copy(admin.join("admin.pem"), certs.join("client.cert"))?;
    std::fs::copy(admin.join("admin-key.pem"), certs.join("client.key"))?;
    Ok(certs)
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

/// Runs a command that must succeed; its stdout.
fn check(cmd: &mut Command) -> anyhow::Result<String> {
    let out = run(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// skopeo with the admin certificate for whichever side is the cluster registry, verifying
/// the registry's certificate against the cluster CA (`ca.crt` in the cert dir) and by the
/// address it dials: the registry's certificate names its addresses (IP SANs).
fn skopeo(certs: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy").arg(args[0]);
    let c = certs.to_str().unwrap_or_default();
    match args[0] {
        "copy" => {
            cmd.args(["--quiet", "--src-tls-verify=true", "--dest-tls-verify=true"]);
            cmd.args(["--src-cert-dir", c, "--dest-cert-dir", c]);
        }
        _ => {
            cmd.args(["--tls-verify=true", "--cert-dir", c]);
        }
    }
    cmd.args(&args[1..]);
    cmd
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let out = check(Command::new("sha256sum").arg(path))?;
    let hex = out.split_whitespace().next().context("sha256sum output")?;
    Ok(format!("sha256:{hex}"))
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Writes `bytes` as a blob of an OCI layout; returns its digest and size.
fn put_blob(layout: &Path, bytes: &[u8]) -> anyhow::Result<(String, usize)> {
    let tmp = layout.join("blob.tmp");
    std::fs::write(&tmp, bytes)?;
    let digest = sha256_file(&tmp)?;
    std::fs::rename(&tmp, blob_path(layout, &digest))?;
    Ok((digest, bytes.len()))
}

/// Adds a gzipped layer holding `MARKER_PATH` (content `marker`) to the one image of the OCI
/// layout `layout`, tagged `tag` afterwards. Returns the new layer's digest.
fn add_layer(layout: &Path, work: &Path, tag: &str, marker: &str) -> anyhow::Result<String> {
    let tree = work.join("layer-tree");
    let file = tree.join(MARKER_PATH);
    std::fs::create_dir_all(file.parent().context("marker dir")?)?;
    std::fs::write(&file, marker)?;
    let tar = work.join("layer.tar");
    check(
        Command::new("tar")
            .arg("--numeric-owner")
            .arg("--owner=0")
            .arg("--group=0")
            .arg("-C")
            .arg(&tree)
            .arg("-cf")
            .arg(&tar)
            .arg("etc"),
    )?;
    let diff_id = sha256_file(&tar)?;
    check(Command::new("gzip").arg("-n").arg("-f").arg(&tar))?;
    let layer = std::fs::read(work.join("layer.tar.gz"))?;
    let (layer_d, layer_len) = put_blob(layout, &layer)?;

    let mut index = read_json(&layout.join("index.json"))?;
    let desc = index["manifests"][0].clone();
    let mut manifest = read_json(&blob_path(
        layout,
        desc["digest"].as_str().context("digest")?,
    ))?;
    let config_d = manifest["config"]["digest"].as_str().context("config")?;
    let mut config = read_json(&blob_path(layout, config_d))?;
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .context("diff_ids")?
        .push(json!(diff_id));
    let (config_d, config_len) = put_blob(layout, &serde_json::to_vec(&config)?)?;
    manifest["config"]["digest"] = json!(config_d);
    manifest["config"]["size"] = json!(config_len);
    let layer_type = "application/vnd.oci.image.layer.v1.tar+gzip";
    manifest["layers"]
        .as_array_mut()
        .context("layers")?
        .push(json!({"mediaType": layer_type, "digest": layer_d, "size": layer_len}));
    let (manifest_d, manifest_len) = put_blob(layout, &serde_json::to_vec(&manifest)?)?;
    index["manifests"] = json!([{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_d,
        "size": manifest_len,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]);
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(layer_d)
}

/// A curl against the registry with the admin certificate, verifying the server by the address
/// it dials (the registry's certificate names it). Returns (status, headers lowercased, body).
struct Curl {
    base: String,
    certs: PathBuf,
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    }

    fn error_code(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

impl Curl {
    fn new(lab: &LabGuard, certs: &Path) -> Self {
        Curl {
            base: format!("https://{}", lab.lab.registry()),
            certs: certs.to_path_buf(),
        }
    }

    /// `method path` with extra curl args (headers, body); `path` may be a relative Location.
    fn send(&self, method: &str, path: &str, extra: &[&str]) -> anyhow::Result<Reply> {
        let headers = tempfile::NamedTempFile::new()?;
        // HEAD through -I, so that curl does not wait for a body.
        let verb: &[&str] = if method == "HEAD" {
            &["-I"]
        } else {
            &["-X", method]
        };
        let out = check(
            Command::new("curl")
                .args(["-sS", "--max-time", "20"])
                .args(verb)
                .arg("--cacert")
                .arg(self.certs.join("ca.crt"))
                .arg("--cert")
                .arg(self.certs.join("client.cert"))
                .arg("--key")
                .arg(self.certs.join("client.key"))
                .arg("-D")
                .arg(headers.path())
                .args(extra)
                .arg(format!("{}{path}", self.base)),
        )?;
        let raw = std::fs::read_to_string(headers.path())?;
        let mut lines = raw.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status line in {raw:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Ok(Reply {
            status,
            headers,
            body: out.into_bytes(),
        })
    }
}

/// Files in a directory (0 if it does not exist).
fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Removes, when dropped, the empty directories podman's network code makes under /run (it
/// has no option to put them elsewhere), unless they were there before.
struct PodmanRunDirs {
    made: bool,
}

/// Where podman's network code keeps its run state as root.
const PODMAN_RUN_DIR: &str = "/run/containers";

impl PodmanRunDirs {
    fn note() -> Self {
        Self {
            made: !Path::new(PODMAN_RUN_DIR).exists(),
        }
    }
}

impl Drop for PodmanRunDirs {
    fn drop(&mut self) {
        if self.made {
            // remove_dir only removes empty directories: anything else podman left is kept.
            let _ = std::fs::remove_dir(Path::new(PODMAN_RUN_DIR).join("networks"));
            let _ = std::fs::remove_dir(PODMAN_RUN_DIR);
        }
    }
}

/// podman with all of its state under `root` (removed with the temp dir), the admin
/// certificate, and nothing from the host's storage or events.
fn podman(root: &Path, certs: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("podman");
    cmd.arg("--root")
        .arg(root.join("root"))
        .arg("--runroot")
        .arg(root.join("run"))
        .arg("--tmpdir")
        .arg(root.join("tmp"))
        .arg("--network-config-dir")
        .arg(root.join("net"))
        .args(["--storage-driver", "vfs", "--events-backend", "none"])
        .arg(args[0]);
    if matches!(args[0], "push" | "pull") {
        cmd.arg("--tls-verify=true").arg("--cert-dir").arg(certs);
    }
    cmd.args(&args[1..]);
    cmd
}

/// podman against the cluster registry: pulls `pull` (an image skopeo pushed), imports
/// `rootfs` (a tarball) as `to` and pushes it (a layer podman compresses itself, so its bytes
/// are new to the registry and travel through an upload), drops everything from its storage and
/// pulls `to` back. `Ok(false)`, with the reason printed, when podman cannot work on this
/// machine at all.
fn podman_round_trip(
    root: &Path,
    certs: &Path,
    pull: &str,
    rootfs: &Path,
    to: &str,
) -> anyhow::Result<bool> {
    let probe = run(&mut podman(root, certs, &["images"]));
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            eprintln!(
                "SKIP podman: `podman images` fails here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return Ok(false);
        }
        Err(err) => {
            eprintln!("SKIP podman: not installed ({err:#})");
            return Ok(false);
        }
    }
    check(&mut podman(root, certs, &["pull", "--quiet", pull]))?;
    let tar = rootfs.to_str().context("utf-8 path")?;
    check(&mut podman(root, certs, &["import", "--quiet", tar, to]))?;
    check(&mut podman(root, certs, &["push", "--quiet", to]))?;
    check(&mut podman(root, certs, &["rmi", "--all", "--force"]))?;
    let id = check(&mut podman(root, certs, &["pull", "--quiet", to]))?;
    ensure!(
        !id.trim().is_empty(),
        "podman pull {to} printed no image id"
    );
    Ok(true)
}

fn service(name: &str, image: &str) -> String {
    format!(
        "kind: Service\nname: {name}\nimage: {image}\nstop_grace_period: 1\n\
         command: [\"/bin/sleep\", \"1000000\"]\n---\n"
    )
}

#[test]
fn skopeo_podman_and_curl_against_the_cluster_registry() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("rg", 1)?;
    let registry = lab.lab.registry();
    let certs = cert_dir(&lab, tmp.path())?;
    let reg = |image: &str| format!("docker://{registry}/{image}");
    let sk = |args: &[&str]| check(&mut skopeo(&certs, args));

    // ---- skopeo: out, a layer added, in, across repositories ----
    let layout = tmp.path().join("layout");
    let oci = |tag: &str| format!("oci:{}:{tag}", layout.display());
    sk(&["copy", &reg("busybox:latest"), &oci("src")])?;
    let marker = format!("pushed {}", std::process::id());
    let layer = add_layer(&layout, tmp.path(), "v1", &marker)?;
    sk(&["copy", &oci("v1"), &reg("pushed:v1")])?;
    // Again, every blob already there: skopeo skips them and must still succeed.
    sk(&["copy", &oci("v1"), &reg("pushed:v1")])?;
    sk(&["copy", &reg("pushed:v1"), &reg("pushed:v2")])?;
    // Into another repository of the same registry: skopeo asks to mount the blobs it knows
    // are there (`?mount=&from=`).
    sk(&["copy", &reg("pushed:v1"), &reg("lab/copy:1")])?;

    let inspect: Value = serde_json::from_str(&sk(&["inspect", &reg("pushed:v1")])?)?;
    let layers = inspect["Layers"].as_array().context("Layers")?;
    assert_eq!(layers.last(), Some(&json!(layer)), "{inspect}");
    let tags: Value = serde_json::from_str(&sk(&["list-tags", &reg("pushed")])?)?;
    assert_eq!(tags["Tags"], json!(["v1", "v2"]), "{tags}");
    let tags: Value = serde_json::from_str(&sk(&["list-tags", &reg("lab/copy")])?)?;
    assert_eq!(tags["Tags"], json!(["1"]), "{tags}");

    // Out again: the same layer, byte for byte.
    let out = tmp.path().join("out");
    let out_ref = format!("oci:{}:1", out.display());
    sk(&["copy", &reg("lab/copy:1"), &out_ref])?;
    assert_eq!(
        std::fs::read(blob_path(&out, &layer))?,
        std::fs::read(blob_path(&layout, &layer))?
    );

    // Delete the copy (by its manifest digest, as skopeo does): gone from that repository
    // only.
    sk(&["delete", &reg("lab/copy:1")])?;
    let gone = run(&mut skopeo(&certs, &["inspect", &reg("lab/copy:1")]))?;
    assert!(!gone.status.success(), "lab/copy:1 still inspectable");
    let gone = run(&mut skopeo(&certs, &["list-tags", &reg("lab/copy")]))?;
    assert!(!gone.status.success(), "lab/copy still has tags");
    sk(&["inspect", &reg("pushed:v1")])?;

    // ---- podman: pull; import, push and pull back an image of its own ----
    // busybox's rootfs with a file of podman's own appended.
    let rootfs = tmp.path().join("podman-rootfs.tar");
    std::fs::copy(tmp.path().join("busybox.tar"), &rootfs)?;
    let tree = tmp.path().join("podman-tree");
    std::fs::create_dir_all(tree.join("etc"))?;
    std::fs::write(tree.join(PODMAN_MARKER), &marker)?;
    check(
        Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&tree)
            .arg("-rf")
            .arg(&rootfs)
            .arg(format!("./{PODMAN_MARKER}")),
    )?;
    let _run_dirs = PodmanRunDirs::note();
    let podman_ok = podman_round_trip(
        &tmp.path().join("podman"),
        &certs,
        &format!("{registry}/pushed:v1"),
        &rootfs,
        &format!("{registry}/podman:v1"),
    )?;
    if podman_ok {
        let pushed = sk(&["inspect", &reg("podman:v1")])?;
        let pushed: Value = serde_json::from_str(&pushed)?;
        let podman_layers = pushed["Layers"].as_array().context("Layers")?;
        assert_eq!(podman_layers.len(), 1, "{pushed}");
        assert!(!layers.contains(&podman_layers[0]), "{pushed}");
    }

    // ---- services from the pushed images ----
    let mut yaml = service("fromskopeo", "pushed:v1");
    let mut services = vec![("fromskopeo", MARKER_PATH)];
    if podman_ok {
        yaml.push_str(&service("frompodman", "podman:v1"));
        services.push(("frompodman", PODMAN_MARKER));
    }
    lab.apply(tmp.path(), "svc.yaml", &yaml)?;
    for (svc, file) in services {
        let task = wait_for(Duration::from_secs(30), &format!("{svc} running"), || {
            let t = lab.tasks(svc)?;
            Ok(running_tasks(&t)
                .first()
                .and_then(|t| t["name"].as_str().map(str::to_owned)))
        })?;
        let read = lab.rctl(&["exec", &task, "--", "cat", &format!("/{file}")])?;
        assert_eq!(read, marker, "{svc}");
    }

    // ---- curl: a wrong digest stores nothing; a chunked upload ----
    let curl = Curl::new(&lab, &certs);
    let root = lab.lab.hosts[0].controller_data_dir().join("registry");
    let blobs_before = count_files(&root.join("blobs/sha256"));
    let payload = tmp.path().join("payload");
    std::fs::write(&payload, format!("not what was announced {marker}"))?;
    let actual = sha256_file(&payload)?;
    let claimed = format!("sha256:{}", "ab".repeat(32));
    let data = format!("@{}", payload.display());
    let resp = curl.send(
        "POST",
        &format!("/v2/curl/blobs/uploads/?digest={claimed}"),
        &[
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &data,
        ],
    )?;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.error_code(), "DIGEST_INVALID");
    // Through POST + PUT as well.
    let start = curl.send("POST", "/v2/curl/blobs/uploads/", &[])?;
    assert_eq!(start.status, 202);
    let location = start.header("location").to_owned();
    let resp = curl.send(
        "PUT",
        &format!("{location}?digest={claimed}"),
        &["--data-binary", &data],
    )?;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.error_code(), "DIGEST_INVALID");
    for d in [&claimed, &actual] {
        let head = curl.send("HEAD", &format!("/v2/curl/blobs/{d}"), &[])?;
        assert_eq!(head.status, 404, "{d}");
    }
    assert_eq!(count_files(&root.join("blobs/sha256")), blobs_before);
    assert_eq!(
        count_files(&root.join("uploads")),
        0,
        "an upload file was left"
    );

    // Chunked: two PATCHes with Content-Range, one out of order (416), a closing PUT.
    let start = curl.send(
        "POST",
        "/v2/curl/blobs/uploads/",
        &["-H", "Content-Length: 0"],
    )?;
    assert_eq!(start.status, 202);
    let mut location = start.header("location").to_owned();
    for (range, chunk, status, want) in [
        ("0-5", "chunk-", 202, "0-5"),
        ("9-11", "zzz", 416, "0-5"),
        ("6-10", "of-it", 202, "0-10"),
    ] {
        let resp = curl.send(
            "PATCH",
            &location,
            &[
                "-H",
                &format!("Content-Range: {range}"),
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                chunk,
            ],
        )?;
        assert_eq!(resp.status, status, "PATCH {range}");
        assert_eq!(resp.header("range"), want, "PATCH {range}");
        location = resp.header("location").to_owned();
    }
    let whole = tmp.path().join("whole");
    std::fs::write(&whole, "chunk-of-it")?;
    let digest = sha256_file(&whole)?;
    let resp = curl.send("PUT", &format!("{location}?digest={digest}"), &[])?;
    assert_eq!(resp.status, 201);
    assert_eq!(resp.header("docker-content-digest"), digest);
    let resp = curl.send("GET", &format!("/v2/curl/blobs/{digest}"), &[])?;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"chunk-of-it");
    assert_eq!(count_files(&root.join("uploads")), 0);
    drop(lab);
    Ok(())
}

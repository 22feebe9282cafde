//! `rctl image ls|rm|prune` on a real lab (two hosts, the controller on h1): two images
//! committed over the busybox base share its layer, and `image ls` counts that layer once on
//! disk; removing an image a service uses is refused with the service's name; once the service
//! is gone, `rm` + `prune` delete exactly that image's own blobs from the registry and from the
//! host that ran it, while the other image still runs as a new service; blobs uploaded moments
//! before a prune survive it (the grace period an in-flight push relies on).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use rudder_tests::{
    lab_with_busybox, lab_with_busybox_managers, pinned_service, running_on, sh, wait_for, LabGuard,
};
use serde_json::Value;

/// The prune grace period the test uses: long enough for the fresh upload to stay, short
/// enough not to wait long for the rest to age.
const GRACE: Duration = Duration::from_secs(8);

/// `rctl image ls -o json` plus `extra`.
fn ls(lab: &LabGuard, extra: &[&str]) -> anyhow::Result<Value> {
    let mut args = vec!["image", "ls", "-o", "json"];
    args.extend_from_slice(extra);
    Ok(serde_json::from_str(&lab.rctl(&args)?)?)
}

/// The listed image named `repo` (first row), if any.
fn image<'a>(listing: &'a Value, repo: &str) -> Option<&'a Value> {
    listing["images"]
        .as_array()?
        .iter()
        .find(|i| i["repository"] == repo)
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// Where blob `digest` lives under a content root (`<root>/blobs/sha256/<hex>`).
fn blob(root: &Path, digest: &str) -> PathBuf {
    root.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The config and layer digests of the manifest stored at `path`.
fn manifest_blobs(path: &Path) -> anyhow::Result<Vec<String>> {
    let m: Value = serde_json::from_slice(&std::fs::read(path).context("read manifest")?)?;
    let mut out = vec![m["config"]["digest"]
        .as_str()
        .context("config")?
        .to_string()];
    for l in m["layers"].as_array().context("layers")? {
        out.push(l["digest"].as_str().context("layer")?.to_string());
    }
    Ok(out)
}

/// The chain ids (what unpacked layer dirs are named after) of the image whose
/// [`manifest_blobs`] these are, from its config in `registry`.
fn chain_ids(registry: &Path, blobs: &[String]) -> anyhow::Result<Vec<String>> {
    let config = std::fs::read(blob(registry, &blobs[0])).context("read config")?;
    let diff_ids = rudder_image::oci::diff_ids(&config)?;
    Ok(rudder_image::digest::chain_ids(&diff_ids)?)
}

/// Sleeps until `since` is more than the grace period ago.
fn age_past_grace(since: Instant) {
    let wait = (GRACE + Duration::from_millis(500)).saturating_sub(since.elapsed());
    std::thread::sleep(wait);
}

/// Writes a one-file root filesystem tarball whose file holds `text`; returns its path.
fn tiny_rootfs(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::write(root.join("etc").join(name), text)?;
    let tar_path = dir.join(format!("{name}.tar"));
    let mut b = tar::Builder::new(std::fs::File::create(&tar_path)?);
    b.append_dir_all(".", &root)?;
    b.finish()?;
    Ok(tar_path)
}

#[test]
fn image_ls_rm_prune_share_refuse_and_collect() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("ig", 2)?;
    let registry = lab.host("h1").controller_data_dir().join("registry");
    let h2_store = lab.host("h2").data_dir.join("images");

    // ---- two images over busybox: each a layer of its own (random bytes: incompressible) ----
    lab.apply(
        tmp.path(),
        "src.yaml",
        &pinned_service("src", "busybox:latest", "h1"),
    )?;
    let src = running_on(&lab, "src", "h1")?;
    sh(&lab, &src, "head -c 300000 /dev/urandom > /one.bin")?;
    lab.rctl(&["commit", &src, "one:v1"])?;
    let one_stored = Instant::now();
    sh(
        &lab,
        &src,
        "rm /one.bin && head -c 200000 /dev/urandom > /two.bin",
    )?;
    lab.rctl(&["commit", &src, "two:v1"])?;

    // ---- ls: the base layer is shared by all three, stored once ----
    let l = ls(&lab, &[])?;
    assert_eq!(num(&l["image_count"]), 3, "{l:#}");
    let bb = image(&l, "busybox").context("busybox listed")?;
    let one = image(&l, "one").context("one listed")?.clone();
    let two = image(&l, "two").context("two listed")?;
    let base = num(&bb["shared"]);
    assert!(base > 100_000, "busybox's layer is shared: {bb}");
    for i in [bb, &one, two] {
        assert_eq!(num(&i["shared"]), base, "{i}");
        assert_eq!(
            num(&i["size"]),
            num(&i["shared"]) + num(&i["unique"]),
            "{i}"
        );
        assert_eq!(
            i["tag"],
            if i["repository"] == "busybox" {
                "latest"
            } else {
                "v1"
            }
        );
        // Commits record when they were made (the import of a bare rootfs does not).
        if i["repository"] != "busybox" {
            assert!(
                i["created"].as_str().is_some_and(|c| c.starts_with("20")),
                "{i}"
            );
        }
    }
    assert!(num(&one["unique"]) > 300_000, "{one}");
    assert!(num(&two["unique"]) > 200_000, "{two}");
    // Without sharing, the base layer would be stored three times.
    assert_eq!(
        num(&l["undeduplicated_bytes"]) - num(&l["disk_bytes"]),
        2 * base,
        "{l:#}"
    );
    assert_eq!(num(&l["reclaimable_bytes"]), 0, "{l:#}");
    let table = lab.rctl(&["image", "ls"])?;
    eprintln!("{table}");
    assert!(
        table.starts_with("REPOSITORY  TAG     DIGEST        CREATED"),
        "{table}"
    );
    assert!(
        table.contains("3 images, 9 blobs, ") && table.contains(" reclaimable by rctl image prune"),
        "{table}"
    );
    let one_digest = one["digest"].as_str().context("digest")?.to_string();
    let one_blobs = manifest_blobs(&blob(&registry, &one_digest))?;
    let two_blobs = manifest_blobs(&blob(&registry, two["digest"].as_str().context("digest")?))?;
    assert_eq!(one_blobs[1], two_blobs[1], "both over busybox's layer");
    let (one_chain, two_chain) = (
        chain_ids(&registry, &one_blobs)?,
        chain_ids(&registry, &two_blobs)?,
    );

    // ---- both run on h2; its content store shares the base too ----
    lab.apply(
        tmp.path(),
        "use.yaml",
        &format!(
            "{}---\n{}",
            pinned_service("useone", "one:v1", "h2"),
            pinned_service("usetwo", "two:v1", "h2")
        ),
    )?;
    running_on(&lab, "useone", "h2")?;
    let usetwo = running_on(&lab, "usetwo", "h2")?;
    let one_pulled = Instant::now();
    let h = ls(&lab, &["--node", "h2"])?;
    let hone = image(&h, "one").context("one on h2")?;
    assert_eq!(hone["digest"], one_digest.as_str());
    assert!(hone["tasks"].to_string().contains("useone"), "{hone}");
    assert!(num(&hone["unpacked"]) > 300_000, "{hone}");
    assert_eq!(num(&hone["shared"]), base, "{hone}");
    assert_eq!(num(&h["image_count"]), 2, "{h:#}");
    assert_eq!(num(&h["layers"]), 3, "{h:#}");

    // ---- rm: refused while used, unknown names change nothing ----
    let err = lab
        .rctl(&["image", "rm", "one:v1"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("image one:v1 is used by service useone"),
        "{err}"
    );
    let err = lab
        .rctl(&["image", "rm", "two:v1", "nosuch:v9"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("image nosuch:v9 not found"), "{err}");
    assert_eq!(num(&ls(&lab, &[])?["image_count"]), 3);

    lab.rctl(&["rm", "useone"])?;
    let out = lab.rctl(&["image", "rm", "one:v1"])?;
    assert!(
        out.contains("Untagged: one:v1") && out.contains(&format!("Deleted: {one_digest}")),
        "{out}"
    );
    let l = ls(&lab, &["--all"])?;
    assert!(image(&l, "one").is_none(), "{l:#}");
    assert_eq!(num(&l["image_count"]), 2);
    // One's config and layer, and its manifest, are garbage now; its blobs are still here.
    assert!(num(&l["reclaimable_bytes"]) > 300_000, "{l:#}");
    for d in one_blobs.iter().chain([&one_digest]) {
        assert!(blob(&registry, d).is_file(), "{d} stays until a prune");
    }
    // h2 forgets useone's container once it has stopped.
    wait_for(Duration::from_secs(30), "useone gone from h2", || {
        let h = ls(&lab, &["--node", "h2"])?;
        Ok(image(&h, "")
            .is_some_and(|i| {
                i["digest"] == one_digest.as_str() && i["tasks"] == Value::Array(vec![])
            })
            .then_some(()))
    })?;

    // ---- an upload moments ago (pushed, then untagged before any manifest could matter) ----
    age_past_grace(one_stored.min(one_pulled));
    let fresh_tar = tiny_rootfs(tmp.path(), "fresh", "just uploaded\n")?;
    lab.rctl(&[
        "image",
        "import",
        fresh_tar.to_str().context("utf-8")?,
        "fresh:v1",
    ])?;
    let fresh = ls(&lab, &[])?;
    let fresh_digest = image(&fresh, "fresh").context("fresh listed")?["digest"]
        .as_str()
        .context("digest")?
        .to_string();
    let fresh_blobs = manifest_blobs(&blob(&registry, &fresh_digest))?;
    lab.rctl(&["image", "rm", "fresh:v1"])?;

    // ---- prune ----
    let grace = format!("{}s", GRACE.as_secs());
    let out = lab.rctl(&["image", "prune", "--grace", &grace])?;
    eprintln!("{out}");
    assert!(
        out.contains("controller h1: removed 3 blobs, ") && out.contains("(3 recent kept)"),
        "{out}"
    );
    assert!(out.contains("host h2: removed 1 image, 1 layer, "), "{out}");
    assert!(
        out.contains("host h1: removed 0 images, 0 layers, 0 B"),
        "{out}"
    );
    // The registry lost exactly one's own blobs; the base, two's and the fresh upload stay.
    assert!(!blob(&registry, &one_digest).exists());
    assert!(!blob(&registry, &one_blobs[0]).exists());
    assert!(!blob(&registry, &one_blobs[2]).exists());
    for d in two_blobs.iter().chain(&fresh_blobs).chain([&fresh_digest]) {
        assert!(blob(&registry, d).is_file(), "{d} kept");
    }
    // h2's content store lost one's manifest, config, layer blob and unpacked layer.
    assert!(!blob(&h2_store, &one_digest).exists());
    assert!(!blob(&h2_store, &one_blobs[2]).exists());
    let layer_dir = |d: &str| {
        h2_store
            .join("layers")
            .join(d.trim_start_matches("sha256:"))
    };
    assert!(!layer_dir(&one_chain[1]).exists());
    for d in &two_chain {
        assert!(layer_dir(d).is_dir(), "{d} is usetwo's, still mounted");
    }
    assert_eq!(sh(&lab, &usetwo, "wc -c < /two.bin")?.trim(), "200000");
    let l = ls(&lab, &[])?;
    assert_eq!(num(&l["image_count"]), 2, "{l:#}");

    // ---- the other image still runs as a new service, on a host that never pulled it ----
    lab.apply(
        tmp.path(),
        "again.yaml",
        &pinned_service("again", "two:v1", "h1"),
    )?;
    let again = running_on(&lab, "again", "h1")?;
    assert_eq!(
        sh(
            &lab,
            &again,
            "wc -c < /two.bin; cat /bin/sh >/dev/null && echo ok"
        )?,
        "200000\nok\n"
    );
    Ok(())
}

/// With two managers, a prune reaches both registries: each deletes its own copy of an
/// unreferenced image's blobs, and keeps the base image's.
#[test]
fn prune_collects_on_every_manager() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox_managers("ih", 2, 2)?;
    let registries: Vec<PathBuf> = ["h1", "h2"]
        .iter()
        .map(|h| lab.host(h).controller_data_dir().join("registry"))
        .collect();
    let tar = tiny_rootfs(tmp.path(), "gone", "soon gone\n")?;
    lab.rctl(&["image", "import", tar.to_str().context("utf-8")?, "gone:v1"])?;
    let l = ls(&lab, &[])?;
    let digest = image(&l, "gone").context("gone listed")?["digest"]
        .as_str()
        .context("digest")?
        .to_string();
    let busybox = image(&l, "busybox").context("busybox listed")?["digest"]
        .as_str()
        .context("digest")?
        .to_string();
    // Both managers hold every blob of both images (replicated ahead of need).
    let mut all = Vec::new();
    for d in [&digest, &busybox] {
        let blobs = wait_for(Duration::from_secs(30), "manifest stored", || {
            Ok(registries
                .iter()
                .find(|r| blob(r, d).is_file())
                .and_then(|r| manifest_blobs(&blob(r, d)).ok()))
        })?;
        all.push((d.clone(), blobs));
    }
    wait_for(Duration::from_secs(30), "blobs replicated", || {
        Ok(all
            .iter()
            .all(|(m, blobs)| {
                registries
                    .iter()
                    .all(|r| blobs.iter().chain([m]).all(|d| blob(r, d).is_file()))
            })
            .then_some(()))
    })?;

    lab.rctl(&["image", "rm", "gone:v1"])?;
    let out = lab.rctl(&["image", "prune", "--grace", "0"])?;
    eprintln!("{out}");
    for c in ["h1", "h2"] {
        assert!(
            out.contains(&format!("controller {c}: removed 3 blobs, ")),
            "{out}"
        );
    }
    for r in &registries {
        let (gone, gone_blobs) = &all[0];
        for d in gone_blobs.iter().chain([gone]) {
            assert!(!blob(r, d).exists(), "{d} removed from {}", r.display());
        }
        let (bb, bb_blobs) = &all[1];
        for d in bb_blobs.iter().chain([bb]) {
            assert!(blob(r, d).is_file(), "{d} kept in {}", r.display());
        }
    }
    Ok(())
}

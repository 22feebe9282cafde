//! `rctl build` with the Dockerfile features real projects use, on a real lab host:
//! `RUN --mount` of every type (cache kept across builds and out of the image, secrets from
//! `--secret` that reach no layer, history or cache key, nor another build through a shared
//! cache, read-only and `rw` binds of the context that cannot leave it, tmpfs), `RUN
//! --network=none`, `COPY`/`ADD` here-documents, `COPY --parents` and `--exclude`, and
//! `ADD --checksum` (a mismatch names its line).

use std::fs;
use std::io::Read;
use std::path::Path;

use rudder_tests::{lab_with_busybox, LabGuard, WebServer};

const SECRET: &str = "s3cret-value";

const MOUNTS: &str = r#"FROM busybox:latest
RUN --mount=type=cache,target=/cache,id=counter,sharing=locked,mode=0700 echo x >> /cache/log && wc -l < /cache/log | tr -d ' ' > /count && stat -c %a /cache > /cache-mode
RUN --mount=type=secret,id=token,required stat -c %a /run/secrets/token > /secret-mode && wc -c < /run/secrets/token | tr -d ' ' > /secret-len
RUN --mount=type=secret,id=token,target=/etc/app/token,mode=0440,uid=1000 --mount=type=secret,id=token,env=TOKEN test "$TOKEN" = "$(cat /etc/app/token)" && stat -c '%a %u' /etc/app/token > /secret-owner
RUN --mount=type=secret,id=absent true
RUN --mount=type=bind,source=src,target=/src cat /src/data.txt > /bound && (touch /src/new 2>/dev/null && echo writable || echo read-only) > /bind-ro
RUN --mount=type=bind,source=src,target=/src,rw touch /src/new && echo rw-ok > /bind-rw
RUN --mount=type=tmpfs,target=/scratch,size=1m --mount=type=tmpfs,target=/scratch2 grep -q ' /scratch tmpfs' /proc/mounts && echo tmpfs-ok > /tmpfs
RUN --network=none ip -o link | grep -vc ' lo:' > /links || true
CMD ["sh", "-c", "cat /count /cache-mode /secret-mode /secret-len /secret-owner /bound /bind-ro /bind-rw /tmpfs /links; ls /cache /src /scratch /run/secrets /etc/app 2>&1 | grep -c 'No such file'"]
"#;

fn build(lab: &LabGuard, args: &[&str]) -> anyhow::Result<String> {
    let mut a = vec!["build"];
    a.extend_from_slice(args);
    lab.rctl(&a)
}

/// Whether any file under `dir` (gzip blobs decompressed) holds `needle`.
fn found_under(dir: &Path, needle: &[u8]) -> anyhow::Result<Vec<String>> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let meta = fs::symlink_metadata(&p)?;
            if meta.is_dir() {
                stack.push(p);
                continue;
            }
            if !meta.is_file() {
                continue;
            }
            let raw = fs::read(&p)?;
            let mut plain = Vec::new();
            if let Ok(mut r) = rudder_image::layer::decompressed(&raw[..]) {
                let _ = r.read_to_end(&mut plain);
            }
            let has = |b: &[u8]| b.windows(needle.len()).any(|w| w == needle);
            if has(&raw) || has(&plain) {
                hits.push(p.display().to_string());
            }
        }
    }
    Ok(hits)
}

#[test]
fn run_mounts_secrets_and_network() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("bm", 1)?;
    let ctx = tmp.path().join("mounts");
    fs::create_dir_all(ctx.join("src"))?;
    fs::write(ctx.join("Dockerfile"), MOUNTS)?;
    fs::write(ctx.join("src/data.txt"), "bound data\n")?;
    let secret = tmp.path().join("token.txt");
    fs::write(&secret, SECRET)?;
    let c = ctx.to_str().unwrap();
    let s = format!("id=token,src={}", secret.display());
    let out = build(&lab, &["-t", "mounts:1", "--secret", &s, c])?;
    assert!(!out.contains(SECRET), "{out}");
    let run = lab.rctl(&["run", "--rm", "mounts:1"])?;
    assert_eq!(
        run,
        "1\n700\n400\n12\n440 1000\nbound data\nread-only\nrw-ok\ntmpfs-ok\n0\n5\n"
    );
    // The cache outlives the build; the mount points and secrets never reach the image.
    build(&lab, &["-t", "mounts:2", "--no-cache", "--secret", &s, c])?;
    let run = lab.rctl(&["run", "--rm", "mounts:2"])?;
    assert!(run.starts_with("2\n700\n"), "{run}");
    // A secret is not a cache input: a changed secret reuses every step.
    fs::write(&secret, "another-value")?;
    let out = build(&lab, &["-t", "mounts:3", "--secret", &s, c])?;
    assert_eq!(out.matches("---> Using cache").count(), 9, "{out}");
    fs::write(&secret, SECRET)?;

    // A secret stored in the cluster, by name.
    let stored = tmp.path().join("stored.txt");
    fs::write(&stored, "from-the-cluster")?;
    lab.rctl(&["secret", "create", "buildpw", stored.to_str().unwrap()])?;
    let named = tmp.path().join("named");
    fs::create_dir_all(&named)?;
    fs::write(
        named.join("Dockerfile"),
        "FROM busybox:latest\nRUN --mount=type=secret,id=pw,required wc -c < /run/secrets/pw | tr -d ' ' > /len\nCMD [\"cat\", \"/len\"]\n",
    )?;
    let n = named.to_str().unwrap();
    build(
        &lab,
        &["-t", "named:1", "--secret", "id=pw,name=buildpw", n],
    )?;
    assert_eq!(lab.rctl(&["run", "--rm", "named:1"])?, "16\n");
    let e = build(&lab, &["-t", "named:2", "--secret", "id=pw,name=nope", n])
        .unwrap_err()
        .to_string();
    assert!(e.contains("the cluster has no secret \"nope\""), "{e}");

    // A required secret that was not given fails its step, by line.
    let e = build(&lab, &["-t", "mounts:4", "--no-cache", c])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("RUN --mount (line 3): secret \"token\" is required"),
        "{e}"
    );

    // One build's secret does not reach another through a shared cache: the mount point the
    // runtime made in the cache dir goes with the step.
    let with = tmp.path().join("with-secret");
    fs::create_dir_all(&with)?;
    fs::write(
        with.join("Dockerfile"),
        "FROM busybox:latest\nRUN --mount=type=cache,target=/shared,id=shared --mount=type=secret,id=token,target=/shared/token test -s /shared/token && echo a > /shared/marker\n",
    )?;
    build(
        &lab,
        &["-t", "with:1", "--secret", &s, with.to_str().unwrap()],
    )?;
    let without = tmp.path().join("without");
    fs::create_dir_all(&without)?;
    fs::write(
        without.join("Dockerfile"),
        "FROM busybox:latest\nRUN --mount=type=cache,target=/shared,id=shared (cat /shared/token 2>&1; ls /shared) > /seen\nCMD [\"cat\", \"/seen\"]\n",
    )?;
    build(&lab, &["-t", "without:1", without.to_str().unwrap()])?;
    let seen = lab.rctl(&["run", "--rm", "without:1"])?;
    assert!(!seen.contains(SECRET), "{seen}");
    assert!(
        seen.ends_with("marker\n") && !seen.contains("token\n"),
        "{seen}"
    );

    // On the host: cache dirs under a 0700 dir; the secret in no blob (layers, configs and
    // their history), no cache entry, no cache dir.
    let data = &lab.host("h1").data_dir;
    let mounts = data.join("build-cache/mounts");
    let mode = fs::metadata(&mounts)?.permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );
    for (dir, secret) in [
        ("images", SECRET),
        ("build-cache", SECRET),
        ("builds", SECRET),
        ("images", "from-the-cluster"),
        ("build-cache", "from-the-cluster"),
    ] {
        let hits = found_under(&data.join(dir), secret.as_bytes())?;
        assert!(hits.is_empty(), "the secret is in {hits:?}");
    }
    let inspect = lab.rctl(&["image", "inspect", "mounts:1"])?;
    assert!(!inspect.contains(SECRET), "{inspect}");

    // A bind source cannot leave the context, by `..` or by a symlink.
    let esc = tmp.path().join("escape");
    fs::create_dir_all(&esc)?;
    std::os::unix::fs::symlink("/etc", esc.join("hostetc"))?;
    fs::write(
        esc.join("Dockerfile"),
        "FROM busybox:latest\nRUN --mount=type=bind,source=../../../etc,target=/x cat /x/passwd\n",
    )?;
    let e = build(&lab, &["-t", "esc:1", esc.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("RUN --mount (line 2): source \"../../../etc\" leaves the build context"),
        "{e}"
    );
    fs::write(
        esc.join("Dockerfile"),
        "FROM busybox:latest\nRUN --mount=type=bind,source=hostetc/passwd,target=/x cat /x\n",
    )?;
    let e = build(&lab, &["-t", "esc:2", esc.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("RUN --mount (line 2): source \"hostetc/passwd\""),
        "{e}"
    );
    assert!(!e.contains("root:x:0"), "{e}");
    Ok(())
}

#[test]
fn copy_heredocs_parents_exclude_and_checksums() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("bh", 1)?;
    let web = WebServer::start(lab.lab.root_addr())?;
    let body = b"hello from the web\n";
    web.put("/files/hello.txt", body);
    let sum = rudder_image::digest::of_bytes(body);
    let a = web.addr;
    let ctx = tmp.path().join("copy");
    for d in ["pkg/a", "top", "docs/skip", "docs/sub"] {
        fs::create_dir_all(ctx.join(d))?;
    }
    for f in [
        "pkg/a/one.txt",
        "pkg/a/two.txt",
        "pkg/a/no.md",
        "top/x.txt",
        "docs/readme.md",
        "docs/guide.txt",
        "docs/skip/inner.txt",
        "docs/sub/deep.md",
    ] {
        fs::write(ctx.join(f), f)?;
    }
    let dockerfile = format!(
        "FROM busybox:latest\n\
         ARG WHO=world\n\
         COPY <<EOF /etc/greeting\n\
         hello $WHO\n\
         EOF\n\
         COPY <<-\"A\" <<B /conf/\n\
         \tliteral $WHO\n\
         \tA\n\
         second\n\
         B\n\
         ADD <<EOF /added.txt\n\
         added\n\
         EOF\n\
         COPY --parents ./pkg/./a/*.txt ./top/x.txt /tree/\n\
         COPY --exclude=*.md --exclude=skip docs/ /docs/\n\
         ADD --checksum={sum} http://{a}/files/hello.txt /web/\n\
         CMD [\"sh\", \"-c\", \"cat /etc/greeting /conf/A /conf/B /added.txt; find /tree /docs -type f | sort; cat /web/hello.txt\"]\n"
    );
    fs::write(ctx.join("Dockerfile"), &dockerfile)?;
    let c = ctx.to_str().unwrap();
    build(&lab, &["-t", "copies:1", c])?;
    let run = lab.rctl(&["run", "--rm", "copies:1"])?;
    assert_eq!(
        run,
        "hello world\nliteral $WHO\nsecond\nadded\n/docs/guide.txt\n/docs/sub/deep.md\n\
         /tree/a/one.txt\n/tree/a/two.txt\n/tree/top/x.txt\nhello from the web\n"
    );
    // Same inputs: every step reused; an excluded file changing does not rebuild.
    fs::write(ctx.join("docs/readme.md"), "changed")?;
    let out = build(&lab, &["-t", "copies:1", c])?;
    assert_eq!(out.matches("---> Using cache").count(), 8, "{out}");

    // Other bytes than the checksum names: the step fails, by line.
    web.put("/files/hello.txt", b"tampered\n");
    let e = build(&lab, &["-t", "copies:2", "--no-cache", c])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("line 16: ADD http://{a}/files/hello.txt: checksum mismatch: the Dockerfile expects {sum}")),
        "{e}"
    );
    Ok(())
}

/// `sharing=locked`: two builds at once that use the same cache take turns; each RUN would
/// fail if the other were inside the cache at the same time.
#[test]
fn cache_mounts_are_used_one_run_at_a_time() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("bl", 1)?;
    let mut dirs = Vec::new();
    for i in 0..2 {
        let d = tmp.path().join(format!("lock{i}"));
        fs::create_dir_all(&d)?;
        fs::write(
            d.join("Dockerfile"),
            format!(
                "FROM busybox:latest\nRUN --mount=type=cache,target=/c,id=turns,sharing=locked \
                 mkdir /c/busy && sleep 3 && rmdir /c/busy && echo build-{i} > /done\n"
            ),
        )?;
        dirs.push(d.to_str().unwrap().to_string());
    }
    let started = std::time::Instant::now();
    let outs: Vec<anyhow::Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let lab = &lab;
                let tag = format!("turns:{i}");
                s.spawn(move || build(lab, &["-t", &tag, "--no-cache", d]))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("build thread"))
            .collect()
    });
    let outs: Vec<String> = outs.into_iter().collect::<anyhow::Result<_>>()?;
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(6),
        "the RUNs overlapped: {outs:?}"
    );
    assert!(
        outs.iter()
            .any(|o| o.contains(" ---> waiting for cache \"turns\"")),
        "{outs:?}"
    );
    Ok(())
}

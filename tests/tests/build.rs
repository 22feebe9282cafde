//! `rctl build` on a real lab (two hosts): a two-stage Dockerfile using every instruction is
//! built on a host of the cluster, and the image runs as a service on the other host with its
//! files, owner, env, working dir, user and command. The same build again reuses every step
//! and gives the same digest; a changed file rebuilds from its COPY on; `--no-cache` rebuilds
//! everything. Refusals: a malformed Dockerfile (its line, before anything is sent), a RUN that
//! fails (its line and exit code, nothing tagged), a missing COPY source. `ADD <url>` fetches
//! from a web server the test runs on the lab's root address.

use std::fs;
use std::path::{Path, PathBuf};

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use rudder_tests::{bin, lab_with_busybox, wait_for, LabGuard, WebServer, LAST_MODIFIED};

const DOCKERFILE: &str = r#"# A comment, then a global ARG used by FROM.
ARG BASE=busybox
FROM ${BASE}:latest AS tools
RUN mkdir -p /out && \
    echo built-in-stage-one > /out/tool.txt
# A RUN has its own network namespace on the host's bridge, and a resolv.conf.
RUN ip -4 addr show eth0 | grep -q 'inet 172\.31\.' && test -s /etc/resolv.conf && echo on-the-bridge

FROM busybox:latest
ARG GREETING=hello
ENV APP_HOME=/app \
    MODE=prod
LABEL org.example.name="build test" version=1
WORKDIR ${APP_HOME}/data
COPY --chown=1000:1000 files/ ./files/
COPY *.txt ${APP_HOME}/
COPY link.txt /app/linked.txt
ADD bundle.tar /opt/
COPY --from=tools /out/tool.txt /opt/tool.txt
RUN echo "${GREETING} from $MODE" > /app/greeting && rm /bin/vi
RUN ["/bin/sh", "-c", "echo exec-form > /app/exec.txt"]
USER 1000
EXPOSE 8080/tcp
VOLUME /app/data
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat /app/greeting; id -u; pwd; cat /app/top.txt /app/linked.txt /app/exec.txt /opt/tool.txt /opt/inner/packed.txt; ls -n /app/data/files; echo sub-owner=$(stat -c %u:%g /app/data/files/sub); test -e /bin/vi || echo no-vi; test -e /app/secret.key || echo no-secret"]
"#;

fn context(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir.join("files/sub"))?;
    fs::write(dir.join("Dockerfile"), DOCKERFILE)?;
    fs::write(dir.join("top.txt"), "top-file\n")?;
    std::os::unix::fs::symlink("top.txt", dir.join("link.txt"))?;
    fs::write(dir.join("files/a.conf"), "a\n")?;
    fs::write(dir.join("files/sub/b.conf"), "b\n")?;
    fs::write(dir.join("secret.key"), "do not send\n")?;
    fs::write(dir.join(".dockerignore"), "# keys stay home\n*.key\n")?;
    // A tar for ADD to unpack.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(7);
    b.append_data(&mut h, "inner/packed.txt", &b"packed\n"[..])?;
    fs::write(dir.join("bundle.tar"), b.into_inner()?)?;
    Ok(())
}

/// A context directory `name` under `tmp` holding `dockerfile`.
fn dockerfile_context(tmp: &Path, name: &str, dockerfile: &str) -> anyhow::Result<PathBuf> {
    let dir = tmp.join(name);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("Dockerfile"), dockerfile)?;
    Ok(dir)
}

fn build(lab: &LabGuard, args: &[&str]) -> anyhow::Result<String> {
    let mut a = vec!["build"];
    a.extend_from_slice(args);
    lab.rctl(&a)
}

fn digest_of(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("Successfully built "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn build_caches_and_runs_anywhere() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("bd", 2)?;
    let ctx = tmp.path().join("ctx");
    context(&ctx)?;
    let ctx_s = ctx.to_str().unwrap();

    // ---- the first build: every step runs ----
    let out = build(&lab, &["-t", "app:1", "--node", "h1", ctx_s])?;
    eprintln!("first build:\n{out}");
    assert!(out.contains("Step 1/"), "{out}");
    assert!(out.contains("RUN echo \"${GREETING} from $MODE\""), "{out}");
    assert!(!out.contains("Using cache"), "{out}");
    assert!(out.contains("\non-the-bridge\n"), "{out}");
    let first = digest_of(&out);
    assert!(first.starts_with("sha256:"), "{out}");

    // ---- the image runs on the other host ----
    let run = lab.rctl(&["run", "--rm", "--node", "h2", "app:1"])?;
    for want in [
        "hello from prod",
        "1000",
        "/app/data",
        "top-file",
        "exec-form",
        "built-in-stage-one",
        "packed",
        "no-vi",
        "no-secret",
        "sub-owner=1000:1000",
    ] {
        assert!(run.contains(want), "missing {want:?} in:\n{run}");
    }
    assert!(
        run.contains("1000     1000") || run.contains("1000 1000"),
        "--chown: {run}"
    );

    // ---- the same build: all cached, same image ----
    let out = build(&lab, &["-t", "app:1", ctx_s])?;
    eprintln!("cached build:\n{out}");
    let steps = out.lines().filter(|l| l.starts_with("Step ")).count();
    let cached = out.matches("---> Using cache").count();
    assert_eq!(
        cached + 2,
        steps,
        "every step but the two FROMs is cached:\n{out}"
    );
    assert_eq!(digest_of(&out), first, "{out}");

    // ---- a changed input: rebuilt from that COPY on ----
    fs::write(ctx.join("top.txt"), "top-file-2\n")?;
    let out = build(&lab, &["-t", "app:2", ctx_s])?;
    let before = out.split("COPY *.txt").next().unwrap();
    let after = out.split("COPY *.txt").nth(1).unwrap();
    assert!(before.matches("Using cache").count() >= 5, "{out}");
    assert!(!after.contains("Using cache"), "{out}");
    assert_ne!(digest_of(&out), first);

    // ---- --no-cache ----
    let out = build(&lab, &["-t", "app:3", "--no-cache", ctx_s])?;
    assert!(!out.contains("Using cache"), "{out}");

    // ---- FROM scratch, COPY --from an earlier stage; --target ----
    let small = dockerfile_context(
        tmp.path(),
        "small",
        "FROM busybox:latest AS src\nRUN echo staged > /staged\n\
         FROM scratch\nCOPY --from=src /bin/busybox /bin/busybox\n\
         COPY --from=src /staged /staged\n\
         ENTRYPOINT [\"/bin/busybox\"]\nCMD [\"cat\", \"/staged\"]\n",
    )?;
    let s = small.to_str().unwrap();
    build(&lab, &["-t", "tiny:1", s])?;
    let run = lab.rctl(&["run", "--rm", "tiny:1"])?;
    assert!(run.contains("staged"), "{run}");
    let run = lab.rctl(&["run", "--rm", "tiny:1", "ls", "/"])?;
    // Only what was copied, plus the runtime's mount points (dev, proc, sys, etc).
    assert!(
        run.contains("bin") && !run.contains("usr") && !run.contains("var"),
        "{run}"
    );
    build(&lab, &["-t", "tiny:src", "--target", "src", s])?;
    let run = lab.rctl(&["run", "--rm", "tiny:src", "cat", "/staged"])?;
    assert!(run.contains("staged"), "{run}");

    // ---- ^C: the running step's container goes, and nothing is tagged ----
    let slow = dockerfile_context(
        tmp.path(),
        "slow",
        "FROM busybox:latest\nRUN echo started && sleep 600\n",
    )?;
    let mut child = Command::new(bin("rctl"))
        .arg("--context")
        .arg(&lab.lab.context_path)
        .args([
            "build",
            "-t",
            "slow:1",
            "--node",
            "h1",
            slow.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(l) = lines.next().transpose()? {
        if l == "started" {
            break;
        }
    }
    let runtime = rudder_tests::runtime_cli(&lab.host("h1").runtime_root);
    let build_containers = || -> anyhow::Result<usize> {
        let out = runtime.list().output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("build-"))
            .count())
    };
    assert_eq!(build_containers()?, 1, "the RUN runs in a container");
    child.kill()?;
    child.wait()?;
    wait_for(Duration::from_secs(10), "the RUN container gone", || {
        Ok((build_containers()? == 0).then_some(()))
    })?;
    let err = lab
        .rctl(&["run", "--rm", "slow:1", "true"])
        .unwrap_err()
        .to_string();
    assert!(!err.is_empty());

    // ---- refusals ----
    let bad = dockerfile_context(tmp.path(), "bad", "FROM busybox\nRUN true\nCOPPY a b\n")?;
    let err = build(&lab, &["-t", "bad:1", bad.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("COPPY"), "{err}");

    fs::write(
        bad.join("Dockerfile"),
        "FROM busybox\nRUN echo a\nRUN exit 3\n",
    )?;
    let err = build(&lab, &["-t", "bad:1", bad.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 3") && err.contains("3"), "{err}");
    let err = lab
        .rctl(&["run", "--rm", "bad:1", "true"])
        .unwrap_err()
        .to_string();
    assert!(!err.is_empty());

    fs::write(bad.join("Dockerfile"), "FROM busybox\nCOPY nope.txt /\n")?;
    let err = build(&lab, &["-t", "bad:1", bad.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.txt"), "{err}");
    Ok(())
}

/// `ADD <url>`: fetched by the building host, named after the URL's last segment or as the
/// destination says, mode 0600 with the server's Last-Modified, an archive left packed. The
/// cache follows the bytes: the same bytes reuse the step, changed ones rebuild it. A URL the
/// server does not have fails the build with its line and the server's answer.
#[test]
fn add_fetches_urls() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("bu", 1)?;
    let web = WebServer::start(lab.lab.root_addr())?;
    web.put("/files/hello.txt", b"hello from the web\n");
    web.put("/files/data.tar", b"not unpacked");
    web.put("/files/my%20file%5B1%5D.txt", b"odd name\n");
    let a = web.addr;
    let ctx = dockerfile_context(
        tmp.path(),
        "urls",
        &format!(
            "FROM busybox:latest\n\
             ADD http://{a}/files/hello.txt /srv/\n\
             ADD http://{a}/files/hello.txt?v=1 /srv/renamed.txt\n\
             ADD http://{a}/files/data.tar /srv/archives/\n\
             ADD http://user:s3cret@{a}/files/my%20file%5B1%5D.txt /srv/\n\
             CMD [\"sh\", \"-c\", \"cat /srv/hello.txt /srv/renamed.txt; \
             stat -c '%a %Y' /srv/hello.txt; ls /srv/archives; cat '/srv/my file[1].txt'\"]\n"
        ),
    )?;
    let c = ctx.to_str().unwrap();
    let out = build(&lab, &["-t", "web:1", c])?;
    assert!(
        out.contains(&format!(" ---> fetched http://{a}/files/hello.txt (")),
        "{out}"
    );
    assert!(!out.contains("Using cache"), "{out}");
    // Credentials in a URL are not repeated (the step line shows the Dockerfile as written,
    // where a secret would come from a build arg, unsubstituted).
    assert!(
        out.contains(&format!(
            " ---> fetched http://{a}/files/my%20file%5B1%5D.txt ("
        )),
        "{out}"
    );
    assert_eq!(out.matches("s3cret").count(), 1, "{out}");
    let run = lab.rctl(&["run", "--rm", "web:1"])?;
    assert_eq!(
        run,
        format!(
            "hello from the web\nhello from the web\n600 {}\ndata.tar\nodd name\n",
            LAST_MODIFIED.1
        )
    );

    // Same bytes: every ADD is reused. New bytes at the first URL: that step on rebuilds.
    let out = build(&lab, &["-t", "web:1", c])?;
    assert_eq!(out.matches("---> Using cache").count(), 5, "{out}");
    web.put("/files/hello.txt", b"changed\n");
    let out = build(&lab, &["-t", "web:2", c])?;
    assert_eq!(out.matches("---> Using cache").count(), 0, "{out}");
    let run = lab.rctl(&["run", "--rm", "web:2"])?;
    assert!(run.starts_with("changed\nchanged\n"), "{run}");

    // A URL the server does not have.
    fs::write(
        ctx.join("Dockerfile"),
        format!("FROM busybox:latest\nADD http://{a}/nope.txt /srv/\n"),
    )?;
    let e = build(&lab, &["-t", "web:3", c]).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "line 2: ADD http://{a}/nope.txt: the server answered 404 Not Found"
        )),
        "{e}"
    );
    Ok(())
}

/// ONBUILD: a base image records its triggers; a build FROM it runs them first (with the
/// child's context, cached like other steps), and the child does not pass them on.
#[test]
fn onbuild_triggers_run_in_children_only() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("bo", 1)?;
    let base = dockerfile_context(
        tmp.path(),
        "base",
        "FROM busybox:latest\nONBUILD COPY app.txt /app/\n\
         ONBUILD RUN echo triggered > /app/run.txt\n",
    )?;
    let out = build(&lab, &["-t", "base:1", base.to_str().unwrap()])?;
    assert!(!out.contains("# Executing"), "{out}");

    let child = dockerfile_context(
        tmp.path(),
        "child",
        "FROM base:1\nCMD [\"cat\", \"/app/app.txt\", \"/app/run.txt\"]\n",
    )?;
    fs::write(child.join("app.txt"), "from the child's context\n")?;
    let c = child.to_str().unwrap();
    let out = build(&lab, &["-t", "child:1", c])?;
    assert!(out.contains("# Executing 2 build trigger(s)"), "{out}");
    assert!(out.contains(" ---> trigger: COPY app.txt /app/"), "{out}");
    let run = lab.rctl(&["run", "--rm", "child:1"])?;
    assert_eq!(run, "from the child's context\ntriggered\n");
    let out = build(&lab, &["-t", "child:1", c])?;
    assert_eq!(out.matches("---> Using cache").count(), 3, "{out}");
    // A trigger that fails is named.
    fs::remove_file(child.join("app.txt"))?;
    let e = build(&lab, &["-t", "child:2", c]).unwrap_err().to_string();
    assert!(
        e.contains("FROM base:1 (line 1): ONBUILD COPY app.txt /app/: ")
            && e.contains("file not found in build context"),
        "{e}"
    );

    // A grandchild runs no trigger: the child did not inherit them.
    let grand = dockerfile_context(
        tmp.path(),
        "grand",
        "FROM child:1\nRUN test ! -e /app/again\n",
    )?;
    let out = build(&lab, &["-t", "grand:1", grand.to_str().unwrap()])?;
    assert!(!out.contains("# Executing"), "{out}");
    Ok(())
}

/// Two byte-identical layers in one image (the same file copied twice to the same place) are
/// unpacked twice, keyed by chain id: one directory twice in `lowerdir` failed the next step's
/// mount, and `rctl run` of the image, with `ELOOP`.
#[test]
fn identical_layers_stack() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("bi", 1)?;
    let ctx = dockerfile_context(
        tmp.path(),
        "twice",
        "FROM busybox:latest\nRUN mkdir -p /x\nRUN mkdir -p /x\n\
         COPY a.txt /a.txt\nCOPY a.txt /a.txt\nRUN test -d /x && echo stacked > /b.txt\n\
         CMD [\"cat\", \"/a.txt\", \"/b.txt\"]\n",
    )?;
    fs::write(ctx.join("a.txt"), "same bytes\n")?;
    build(&lab, &["-t", "twice:1", ctx.to_str().unwrap()])?;
    // The image really holds one layer twice.
    let inspect = lab.rctl(&["image", "inspect", "twice:1"])?;
    let v: serde_json::Value = serde_json::from_str(&inspect)?;
    let layers: Vec<String> = v[0]["layers"]
        .as_array()
        .or_else(|| v["layers"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str().map(str::to_string))
        .collect();
    let unique: std::collections::BTreeSet<&String> = layers.iter().collect();
    assert!(unique.len() < layers.len(), "no repeated layer: {inspect}");
    let run = lab.rctl(&["run", "--rm", "twice:1"])?;
    assert_eq!(run, "same bytes\nstacked\n");
    Ok(())
}

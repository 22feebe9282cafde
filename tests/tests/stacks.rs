//! Compose stacks on a real 2-host lab: `rctl stack deploy` of a busybox compose file (with a
//! `.env`, a secret from a file, a healthcheck reading it, placement, a compose name with
//! `_`), a client on the other host reaching the server by its compose name over the stack's
//! default network, then `stack ls|services|ps`; a second version (a service changed, one
//! removed, one added) and `stack rollback` to the first; `stack rm`. A worker certificate is
//! refused by the stack API.

use std::time::Duration;

use anyhow::Context;
use rudder_tests::{exec, lab_with_busybox, running_tasks, wait_for, LabGuard};

fn running_one(lab: &LabGuard, service: &str) -> anyhow::Result<serde_json::Value> {
    wait_for(
        Duration::from_secs(90),
        &format!("{service} running"),
        || {
            let t = lab.tasks(service)?;
            Ok(running_tasks(&t).first().map(|t| (*t).clone()))
        },
    )
}

const COMPOSE: &str = r#"x-pinned: &pinned
  restart: always
services:
  web_server:
    image: "busybox:${TAG:-missing}"
    command: sh -c "mkdir -p /www && cat /run/secrets/db_pw > /www/index.html && exec httpd -f -p 80 -h /www"
    secrets: [db_pw]
    healthcheck:
      test: ["CMD", "test", "-s", "/run/secrets/db_pw"]
      interval: 1s
      timeout: 2s
    deploy:
      placement:
        constraints: ["node.hostname == h2"]
    stop_grace_period: 1s
    container_name: ignored
  client:
    <<: *pinned
    image: busybox:latest
    command: ["sleep", "1000000"]
    deploy:
      placement:
        constraints: ["node.hostname == h1"]
    stop_grace_period: 1s
secrets:
  db_pw:
    file: ./pw.txt
"#;

#[test]
fn a_compose_stack_deploys_resolves_names_and_is_removed() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("st", 2)?;
    let dir = tmp.path();
    std::fs::write(dir.join("compose.yaml"), COMPOSE)?;
    std::fs::write(dir.join(".env"), "TAG=latest\n")?;
    std::fs::write(dir.join("pw.txt"), "s3cret-from-file\n")?;
    let file = dir.join("compose.yaml");
    let file = file.to_str().context("utf-8 path")?;

    // `stack config` resolves .env and names without a cluster round trip.
    let config = lab.rctl(&["stack", "config", "-c", file, "shop"])?;
    for want in [
        "name: shop-web-server",
        "image: busybox:latest",
        "- web-server",
        "name: shop-default",
        "name: shop-db_pw",
    ] {
        assert!(config.contains(want), "{want:?} in:\n{config}");
    }

    let out = lab.rctl(&["stack", "deploy", "--detach", "-c", file, "shop"])?;
    assert!(out.contains("service/shop-web-server"), "{out}");
    let web = running_one(&lab, "shop-web-server")?;
    assert_eq!(web["node"], "h2");
    let client = running_one(&lab, "shop-client")?;
    assert_eq!(client["node"], "h1");

    // The client (h1) reaches the server (h2) by its compose name over the stack network
    // (busybox's wget -T crashes: `timeout` bounds it).
    let mut last = String::new();
    let body = wait_for(Duration::from_secs(60), "web-server by name", || {
        let (ok, out) = exec(
            &lab,
            &client,
            &["timeout", "5", "wget", "-qO-", "http://web-server/"],
        )?;
        last = out.clone();
        Ok((ok && out.contains("s3cret-from-file")).then_some(out))
    })
    .map_err(|e| {
        let diag: Vec<String> = [
            vec!["nslookup", "web-server"],
            vec!["nslookup", "shop-web-server"],
            vec!["timeout", "5", "wget", "-qO-", "http://shop-web-server/"],
            vec!["cat", "/etc/resolv.conf"],
            vec!["ip", "addr"],
        ]
        .iter()
        .map(|c| format!("{c:?}: {:?}", exec(&lab, &client, c)))
        .collect();
        let w = exec(&lab, &web, &["cat", "/www/index.html"]);
        e.context(format!("last: {last}\n{}\nweb: {w:?}", diag.join("\n")))
    })?;
    assert!(body.contains("s3cret-from-file"), "{body}");

    let ls = lab.rctl(&["stack", "ls"])?;
    assert!(
        ls.lines()
            .any(|l| l.starts_with("shop") && l.ends_with('2')),
        "{ls}"
    );
    let services = lab.rctl(&["stack", "services", "shop"])?;
    assert!(
        services.contains("shop-client") && services.contains("web_server"),
        "{services}"
    );
    let ps: serde_json::Value =
        serde_json::from_str(&lab.rctl(&["stack", "ps", "shop", "-o", "json"])?)?;
    assert!(ps.as_array().is_some_and(|t| t.len() >= 2), "{ps}");

    // Deploying again changes nothing.
    let again = lab.rctl(&["stack", "deploy", "--detach", "-c", file, "shop"])?;
    assert!(
        again.lines().all(|l| l.ends_with("unchanged")),
        "a second deploy is idempotent: {again}"
    );
    let ls: serde_json::Value = serde_json::from_str(&lab.rctl(&["stack", "ls", "-o", "json"])?)?;
    let v1 = ls[0]["version"].as_u64().context("a stack version")?;
    assert!(ls[0]["previous_version"].is_null(), "{ls}");

    // The stack API is Control: a worker (agent) certificate is refused.
    worker_is_refused(&lab, dir)?;

    // Version 2: web_server changed, client removed, extra added.
    let v2 = COMPOSE
        .replace(
            "    secrets: [db_pw]\n",
            "    secrets: [db_pw]\n    environment:\n      STACK_V: \"2\"\n",
        )
        .replace("  client:\n", "  extra:\n");
    std::fs::write(dir.join("compose.yaml"), &v2)?;
    let out = lab.rctl(&["stack", "deploy", "--timeout", "120", "-c", file, "shop"])?;
    for want in [
        "service/shop-web-server updated",
        "service/shop-extra created",
        "service/shop-client removed",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
    let names = |lab: &LabGuard| -> anyhow::Result<Vec<String>> {
        let v: serde_json::Value =
            serde_json::from_str(&lab.rctl(&["stack", "services", "shop", "-o", "json"])?)?;
        let mut n: Vec<String> = v
            .as_array()
            .context("a list")?
            .iter()
            .filter_map(|s| s["name"].as_str().map(String::from))
            .collect();
        n.sort();
        Ok(n)
    };
    assert_eq!(names(&lab)?, ["shop-extra", "shop-web-server"]);
    let env_of_web = |lab: &LabGuard| -> anyhow::Result<String> {
        let web = running_one(lab, "shop-web-server")?;
        Ok(exec(lab, &web, &["sh", "-c", "echo v=$STACK_V"])?.1)
    };
    assert!(env_of_web(&lab)?.contains("v=2"));
    let ls: serde_json::Value = serde_json::from_str(&lab.rctl(&["stack", "ls", "-o", "json"])?)?;
    assert_eq!(ls[0]["previous_version"].as_u64(), Some(v1), "{ls}");

    // Rollback: the whole stack returns to version 1.
    let out = lab.rctl(&["stack", "rollback", "--timeout", "120", "shop"])?;
    for want in [
        "service/shop-web-server updated",
        "service/shop-client created",
        "service/shop-extra removed",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
    assert_eq!(names(&lab)?, ["shop-client", "shop-web-server"]);
    wait_for(Duration::from_secs(60), "web-server back at v1", || {
        Ok(env_of_web(&lab)?.trim().ends_with("v=").then_some(()))
    })?;
    running_one(&lab, "shop-client")?;
    std::fs::write(dir.join("compose.yaml"), COMPOSE)?;

    let rm = lab.rctl(&["stack", "rm", "shop"])?;
    assert!(rm.contains("service/shop-client removed"), "{rm}");
    assert!(rm.contains("network/shop-default removed"), "{rm}");
    assert!(rm.contains("secret/shop-db_pw removed"), "{rm}");
    let services = lab.rctl(&["get", "services"])?;
    assert!(!services.contains("shop-"), "{services}");
    assert!(!lab.rctl(&["stack", "ls"])?.contains("shop"));

    // `rctl apply -f` takes the compose file too: the stack is named after its directory.
    let dir2 = dir.join("Shop_2");
    std::fs::create_dir(&dir2)?;
    for f in ["compose.yaml", ".env", "pw.txt"] {
        std::fs::copy(dir.join(f), dir2.join(f))?;
    }
    let file2 = dir2.join("compose.yaml");
    let out = lab.rctl(&[
        "apply",
        "--detach",
        "-f",
        file2.to_str().context("utf-8 path")?,
    ])?;
    assert!(out.contains("service/shop-2-web-server created"), "{out}");
    running_one(&lab, "shop-2-client")?;
    assert!(lab.rctl(&["stack", "ls"])?.contains("shop-2"));
    lab.rctl(&["stack", "rm", "shop-2"])?;
    Ok(())
}

/// `rctl stack ls|rollback` with the agent's (worker) certificate: refused by the Control
/// service's guard, like every write RPC.
fn worker_is_refused(lab: &LabGuard, dir: &std::path::Path) -> anyhow::Result<()> {
    let certs = lab.lab.hosts[1].data_dir.join("certs");
    let ctx = dir.join("agent-context.json");
    let v = serde_json::json!({
        "controllers": lab.lab.controller_urls(),
        "registry": lab.lab.registry(),
        "ca": certs.join("ca.pem"),
        "cert": certs.join("node.pem"),
        "key": certs.join("node-key.pem"),
    });
    std::fs::write(&ctx, serde_json::to_vec(&v)?)?;
    for args in [
        &["stack", "ls"][..],
        &["stack", "rollback", "--detach", "shop"],
    ] {
        let out = std::process::Command::new(rudder_tests::bin("rctl"))
            .arg("--context")
            .arg(&ctx)
            .args(args)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} with a worker certificate");
        assert!(
            err.contains("Control is for admin certificates") && err.contains("worker"),
            "{args:?}: {err}"
        );
    }
    std::fs::remove_file(&ctx)?;
    Ok(())
}

const DEPENDS: &str = r#"services:
  db:
    image: busybox:latest
    command: sh -c "sleep 6; touch /tmp/ready; mkdir -p /www; echo db > /www/index.html; exec httpd -f -p 80 -h /www"
    healthcheck:
      test: ["CMD", "test", "-f", "/tmp/ready"]
      interval: 1s
      timeout: 2s
      start_period: 20s
      retries: 10
    stop_grace_period: 1s
  migrate:
    image: busybox:latest
    command: ["sh", "-c", "sleep 2"]
    deploy:
      mode: replicated-job
  web:
    image: busybox:latest
    command: ["sleep", "1000000"]
    depends_on:
      db:
        condition: service_healthy
        restart: true
      migrate:
        condition: service_completed_successfully
    stop_grace_period: 1s
"#;

/// `depends_on` on a real lab: deployed detached (no client waits), the web service's task stays
/// pending with the reason until the db is healthy and the migration job completed, then runs.
#[test]
fn depends_on_holds_dependents_until_their_dependencies_are_ready() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("sd", 1)?;
    let file = tmp.path().join("compose.yaml");
    std::fs::write(&file, DEPENDS)?;
    let file = file.to_str().context("utf-8 path")?;
    let out = lab.rctl(&["stack", "deploy", "--detach", "-c", file, "dep"])?;
    assert!(out.contains("service/dep-web created"), "{out}");

    // Held with its reason while db is starting (its check passes after ~6 s).
    let reason = wait_for(Duration::from_secs(60), "web held", || {
        let t = lab.tasks("dep-web")?;
        Ok(t.first()
            .and_then(|t| t["message"].as_str())
            .filter(|m| m.starts_with("waiting for dep-"))
            .map(String::from))
    })?;
    assert!(
        reason == "waiting for dep-db: not healthy"
            || reason.starts_with("waiting for dep-migrate: not completed"),
        "{reason}"
    );
    let web = lab.tasks("dep-web")?;
    assert_eq!(web[0]["node"], "", "not placed while held: {web:?}");

    let web = running_one(&lab, "dep-web").map_err(|e| {
        let all: Vec<String> = ["dep-web", "dep-db", "dep-migrate"]
            .iter()
            .map(|s| format!("{s}: {:?}", lab.tasks(s)))
            .collect();
        e.context(all.join("\n"))
    })?;
    // By then the dependencies hold: db runs (healthy) and the job completed.
    let db = running_tasks(&lab.tasks("dep-db")?)
        .first()
        .map(|t| (*t).clone())
        .context("db running when web runs")?;
    assert!(
        db["timestamp_ms"].as_u64() <= web["timestamp_ms"].as_u64(),
        "db {db} / web {web}"
    );
    let migrate = lab.tasks("dep-migrate")?;
    assert!(
        migrate.iter().any(|t| t["state"] == "complete"),
        "{migrate:?}"
    );
    lab.rctl(&["stack", "rm", "dep"])?;
    Ok(())
}

const BUILT: &str = r#"services:
  app:
    build:
      context: ./app
      dockerfile: build/Dockerfile
      target: final
      args:
        GREETING: hello-from-compose
    command: ["sleep", "1000000"]
    stop_grace_period: 1s
"#;

const DOCKERFILE: &str = "FROM busybox:latest AS base\nARG GREETING=unset\nRUN echo \"$GREETING\" > /greeting\nFROM base AS final\nRUN echo final > /stage\nFROM base AS other\nRUN echo other > /stage\n";

/// `build:` on a real lab: `stack deploy` builds the image (context, dockerfile, target, args)
/// into the cluster registry through `rctl build` and pins the service to the built digest.
#[test]
fn build_in_a_compose_file_is_built_and_pinned_by_digest() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("sb", 1)?;
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("app/build"))?;
    std::fs::write(dir.join("app/build/Dockerfile"), DOCKERFILE)?;
    std::fs::write(dir.join("compose.yaml"), BUILT)?;
    let file = dir.join("compose.yaml");
    let file = file.to_str().context("utf-8 path")?;

    let config = lab.rctl(&["stack", "config", "-c", file, "bs"])?;
    assert!(config.contains("image: bs-app:latest"), "{config}");
    let out = lab.rctl(&["stack", "deploy", "--detach", "-c", file, "bs"])?;
    assert!(out.contains("Successfully built sha256:"), "{out}");
    let digest = out
        .lines()
        .find_map(|l| l.strip_prefix("Successfully built "))
        .and_then(|l| l.split_whitespace().next())
        .context("the digest")?
        .to_string();
    let task = running_one(&lab, "bs-app")?;
    assert_eq!(task["image"], format!("bs-app@{digest}"), "{task}");
    let (ok, greeting) = exec(&lab, &task, &["cat", "/greeting", "/stage"])?;
    assert!(ok, "{greeting}");
    assert_eq!(greeting, "hello-from-compose\nfinal\n");

    // The same files again: the build is cached and the same digest, so nothing changes.
    let again = lab.rctl(&["stack", "deploy", "--detach", "-c", file, "bs"])?;
    assert!(again.contains("service/bs-app unchanged"), "{again}");
    lab.rctl(&["stack", "rm", "bs"])?;
    Ok(())
}

/// The compose corpus (`tests/fixtures/compose/*/compose.yaml`).
fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/compose")
        .join(name)
        .join("compose.yaml")
}

/// Every file of the corpus converts (no cluster needed), with the warnings it should give and
/// no other.
#[test]
fn the_compose_corpus_converts() -> anyhow::Result<()> {
    for (name, want, warnings) in [
        (
            "webdb",
            &[
                "name: c-db",
                "name: c-web",
                "condition: service_healthy",
                "target: /run/secrets/app_db_password",
                "DB_EXPECTED: s3cret-db",
                "published: 18080",
            ][..],
            &["name "][..],
        ),
        (
            "jobs",
            &[
                "mode: replicated-job",
                "mode: global",
                "condition: service_completed_successfully",
                "service: c-agent",
                "name: c-app_conf",
            ][..],
            &[][..],
        ),
        (
            "keys",
            &[
                "subnet: 10.77.0.0/24",
                "API_MODE: prod",
                "LOG_LEVEL: debug",
                "FROM_SHELL: from-the-shell",
                "order: start-first",
                "max_file: 3",
                "- api-v1",
                "tier: api",
                "replicas: 3",
            ][..],
            &[
                "version ",
                "services.api_server ",
                "services.api_server.ports[1] ",
                "services.api_server.volumes[2] ",
                "services.api_server.container_name ",
                "services.api_server.restart ",
            ][..],
        ),
    ] {
        let out = std::process::Command::new(rudder_tests::bin("rctl"))
            .args(["stack", "config", "-c"])
            .arg(fixture(name))
            .arg("c")
            .env("FROM_SHELL", "from-the-shell")
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        for w in want {
            assert!(stdout.contains(w), "{name}: {w:?} in:\n{stdout}");
        }
        let got: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("warning: "))
            .collect();
        assert_eq!(got.len(), warnings.len(), "{name}: {stderr}");
        for w in warnings {
            assert!(
                got.iter().any(|l| l.starts_with(&format!("warning: {w}"))),
                "{name}: {w:?} in {got:?}"
            );
        }
    }
    Ok(())
}

/// The corpus on a real lab: the web + database + secret application (both healthchecks read
/// the secret file; web waits for the database to be healthy) serves what the database
/// answered, and the jobs file starts its app only after its migration completed.
#[test]
fn the_compose_corpus_deploys() -> anyhow::Result<()> {
    let (lab, _tmp) = lab_with_busybox("sc", 2)?;
    let webdb = fixture("webdb");
    let webdb = webdb.to_str().context("utf-8 path")?;
    lab.rctl(&["stack", "deploy", "--timeout", "120", "-c", webdb, "webdb"])?;
    let db = running_one(&lab, "webdb-db")?;
    assert_eq!(
        db["state"], "running",
        "the db's secret-reading healthcheck passed"
    );
    let web = wait_for(Duration::from_secs(60), "both web replicas", || {
        let t = lab.tasks("webdb-web")?;
        let r = running_tasks(&t);
        Ok((r.len() == 2).then(|| r[0].clone()))
    })?;
    let (ok, body) = exec(&lab, &web, &["wget", "-qO-", "http://127.0.0.1/"])?;
    assert!(ok && body.contains("db-ok"), "{body}");
    let (ok, mode) = exec(
        &lab,
        &web,
        &["stat", "-c", "%a", "/run/secrets/app_db_password"],
    )?;
    assert!(ok && mode.trim() == "400", "{mode}");

    let jobs = fixture("jobs");
    let jobs = jobs.to_str().context("utf-8 path")?;
    lab.rctl(&["stack", "deploy", "--detach", "-c", jobs, "jobs"])?;
    let app = running_one(&lab, "jobs-app")?;
    let migrate = lab.tasks("jobs-migrate")?;
    assert!(
        migrate.iter().any(|t| t["state"] == "complete"),
        "app runs only after the migration completed: {migrate:?}"
    );
    let (ok, conf) = exec(&lab, &app, &["cat", "/etc/app.conf"])?;
    assert!(ok && conf == "mode=cluster\n", "{conf}");

    lab.rctl(&["stack", "rm", "jobs"])?;
    lab.rctl(&["stack", "rm", "webdb"])?;
    Ok(())
}

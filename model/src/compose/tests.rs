use std::collections::BTreeMap;

use super::interpolate::{interpolate, parse_env_file, shell_split, InterpolateError};
use super::*;
use crate::spec::{RestartCondition, ServiceMode};
use crate::volume::MountType;

fn run_with(
    files: &[(&str, &str)],
    dotenv: Option<&str>,
    env: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> Result<Stack, ComposeError> {
    let sources: Vec<Source> = files
        .iter()
        .map(|(n, t)| Source {
            name: n.to_string(),
            text: t.to_string(),
        })
        .collect();
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let fs: BTreeMap<String, String> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    convert(&Input {
        stack: "app",
        sources: &sources,
        dotenv,
        env: &env,
        files: &fs,
    })
}

fn run(text: &str) -> Result<Stack, ComposeError> {
    run_with(&[("compose.yaml", text)], None, &[], &[])
}

fn service(stack: &Stack, name: &str) -> crate::ServiceSpec {
    stack
        .manifests
        .iter()
        .find_map(|m| match m {
            Manifest::Service(s) if s.name == name => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no service {name} in {:?}", stack.manifests))
}

/// One service `web` (image busybox) with `body` as its extra keys (indented by 4).
fn web(body: &str) -> crate::ServiceSpec {
    let text = format!("services:\n  web:\n    image: busybox\n{body}");
    let s = run(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    service(&s, "app-web")
}

#[test]
fn interpolation_forms() {
    let vars: BTreeMap<String, String> = [("A", "x"), ("E", ""), ("B_2", "y")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (input, want) in [
        ("$A", "x"),
        ("${A}", "x"),
        ("a${A}b$B_2-c", "axby-c"),
        ("${U:-d}", "d"),
        ("${E:-d}", "d"),
        ("${E-d}", ""),
        ("${U-d}", "d"),
        ("${A:-d}", "x"),
        ("${U:-${A}z}", "xz"),
        ("$$A", "$A"),
        ("cost $5", "cost $5"),
        ("${A:+alt}", "alt"),
        ("${U:+alt}", ""),
        ("${U}", ""),
        ("${E:?no}", "ERR"),
        ("${E?no}", ""),
        ("${U?gone}", "ERR"),
    ] {
        let mut unset = Vec::new();
        let got = interpolate(input, &vars, &mut unset);
        match got {
            Ok(s) => assert_eq!(s, want, "{input}"),
            Err(InterpolateError::Required { .. }) => assert_eq!(want, "ERR", "{input}"),
            Err(e) => panic!("{input}: {e}"),
        }
    }
    let mut unset = Vec::new();
    interpolate("$U ${U} ${W}", &vars, &mut unset).unwrap();
    assert_eq!(unset, ["U", "W"]);
    assert!(matches!(
        interpolate("${A", &vars, &mut unset),
        Err(InterpolateError::Syntax(_))
    ));
    assert!(matches!(
        interpolate("${A%x}", &vars, &mut unset),
        Err(InterpolateError::Syntax(_))
    ));
}

#[test]
fn env_files_and_shell_words() {
    let parsed =
        parse_env_file("# c\nA=1\nexport B = two \nC='lit $x'\nD=\"q\\\"d\"\nE=v # comment\nF\n\n")
            .unwrap();
    assert_eq!(
        parsed,
        [
            ("A".to_string(), Some("1".to_string())),
            ("B".into(), Some("two".into())),
            ("C".into(), Some("lit $x".into())),
            ("D".into(), Some("q\"d".into())),
            ("E".into(), Some("v".into())),
            ("F".into(), None),
        ]
    );
    assert!(parse_env_file("BAD KEY=1").is_err());
    for (s, want) in [
        ("echo hi", vec!["echo", "hi"]),
        ("sh -c 'echo a b'", vec!["sh", "-c", "echo a b"]),
        ("a\\ b \"c \\\"d\\\"\"", vec!["a b", "c \"d\""]),
        ("  x   y ", vec!["x", "y"]),
        ("''", vec![""]),
    ] {
        assert_eq!(shell_split(s).unwrap(), want, "{s}");
    }
    assert!(shell_split("'open").is_err());
}

#[test]
fn dotenv_and_process_env_feed_interpolation() {
    let text = "services:\n  web:\n    image: \"busybox:${TAG:-1}\"\n    environment:\n      MODE: $MODE\n      PRICE: $$5\n";
    let s = run_with(
        &[("c.yaml", text)],
        Some("TAG=2\nMODE=dotenv\n"),
        &[("MODE", "shell")],
        &[],
    )
    .unwrap();
    let w = service(&s, "app-web");
    assert_eq!(w.image, "busybox:2");
    assert_eq!(
        w.env["MODE"], "shell",
        "the process environment wins over .env"
    );
    assert_eq!(w.env["PRICE"], "$5");
    let e = run_with(
        &[("c.yaml", "services:\n  web:\n    image: ${IMG:?set IMG}\n")],
        None,
        &[],
        &[],
    )
    .unwrap_err();
    assert_eq!((e.field.as_str(), e.line), ("services.web.image", 3), "{e}");
    assert!(e.message.contains("set IMG"), "{e}");
    // Unset without default: empty, with a warning.
    let s = run("services:\n  web:\n    image: busybox\n    environment: [X=$NOPE]\n").unwrap();
    assert!(
        s.warnings.iter().any(|w| w.contains("NOPE")),
        "{:?}",
        s.warnings
    );
}

#[test]
fn anchors_merge_keys_and_extensions() {
    let text = "x-common: &common\n  image: busybox\n  environment:\n    A: \"1\"\nservices:\n  a:\n    <<: *common\n    x-note: ignored\n  b:\n    <<: *common\n    environment:\n      B: \"2\"\n";
    let s = run(text).unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert_eq!(service(&s, "app-a").env["A"], "1");
    assert_eq!(service(&s, "app-b").image, "busybox");
    assert_eq!(
        service(&s, "app-b").env.get("B").map(String::as_str),
        Some("2")
    );
}

#[test]
fn override_files_merge_per_the_spec() {
    let base = "services:\n  web:\n    image: busybox\n    command: [a, b]\n    environment: [A=1, B=2]\n    ports: [\"80:80\"]\n    volumes: [\"data:/data\"]\nvolumes:\n  data: {}\n  other: {}\n";
    let over = "services:\n  web:\n    image: busybox:2\n    command: [c]\n    environment:\n      B: \"3\"\n    ports: [\"81:81\"]\n    volumes: [\"other:/data:ro\"]\n";
    let s = run_with(&[("a.yaml", base), ("b.yaml", over)], None, &[], &[]).unwrap();
    let w = service(&s, "app-web");
    assert_eq!(w.image, "busybox:2");
    assert_eq!(w.command.as_deref(), Some(&["c".to_string()][..]));
    assert_eq!((w.env["A"].as_str(), w.env["B"].as_str()), ("1", "3"));
    assert_eq!(w.ports.len(), 2);
    assert_eq!(w.mounts.len(), 1, "volumes merge by target");
    assert_eq!(
        (w.mounts[0].source.as_str(), w.mounts[0].readonly),
        ("app-other", true)
    );
    // An error in the override names the override file.
    let bad = "services:\n  web:\n    ports:\n      - \"x:80\"\n";
    let e = run_with(&[("a.yaml", base), ("b.yaml", bad)], None, &[], &[]).unwrap_err();
    assert_eq!((e.file.as_str(), e.line), ("b.yaml", 3), "{e}");
}

#[test]
fn names_map_predictably() {
    let text = "services:\n  payment_gateway:\n    image: x\n    volumes: [\"db_data:/d\"]\n    secrets: [db_pw]\nvolumes:\n  db_data: {}\nsecrets:\n  db_pw:\n    environment: PW\nnetworks:\n  Back.End: {}\n";
    let s = run_with(&[("c.yaml", text)], None, &[("PW", "s3")], &[]).unwrap();
    let names: Vec<(&str, &str)> = s.manifests.iter().map(|m| (m.kind(), m.name())).collect();
    assert_eq!(
        names,
        [
            ("Network", "app-default"),
            ("Network", "app-back-end"),
            ("Volume", "app-db-data"),
            ("Secret", "app-db_pw"),
            ("Service", "app-payment-gateway"),
        ]
    );
    let svc = service(&s, "app-payment-gateway");
    assert_eq!(svc.aliases, ["payment-gateway"]);
    assert_eq!(svc.networks, ["app-default"]);
    assert_eq!(svc.labels[STACK_LABEL], "app");
    assert_eq!(svc.labels[SERVICE_LABEL], "payment_gateway");
    assert_eq!(svc.secrets[0].source, "app-db_pw");
    assert_eq!(svc.secrets[0].target.as_deref(), Some("db_pw"));
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("reachable as \"payment-gateway\"")));
    // Two names that collide are refused.
    let e = run("services:\n  a_b:\n    image: x\n  a-b:\n    image: x\n").unwrap_err();
    assert!(e.message.contains("rename one"), "{e}");
}

#[test]
fn keys_to_fields() {
    // command / entrypoint
    let w = web("    command: echo \"hello world\"\n    entrypoint: [\"/bin/sh\", \"-c\"]\n");
    assert_eq!(w.command.unwrap(), ["echo", "hello world"]);
    assert_eq!(w.entrypoint.unwrap(), ["/bin/sh", "-c"]);
    // environment list and map, env_file under it
    let text = "services:\n  web:\n    image: x\n    env_file: [web.env, {path: missing.env, required: false}]\n    environment: [A=1, C]\n";
    let s = run_with(
        &[("c.yaml", text)],
        None,
        &[("C", "from-shell")],
        &[("web.env", "A=0\nB=2\n")],
    )
    .unwrap();
    let w = service(&s, "app-web");
    assert_eq!(
        w.env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>(),
        ["A=1", "B=2", "C=from-shell"]
    );
    // ports
    let w = web("    ports:\n      - \"8080:80\"\n      - \"127.0.0.1:53:53/udp\"\n      - \"9000-9001:7000-7001\"\n      - target: 443\n        published: 8443\n        mode: host\n");
    let p: Vec<(u16, Option<u16>, &str, PortModeS)> = w
        .ports
        .iter()
        .map(|p| {
            (
                p.target,
                p.published,
                p.protocol.as_str(),
                PortModeS(p.mode),
            )
        })
        .collect();
    use crate::ports::PortMode::{Host, Ingress};
    assert_eq!(
        p,
        [
            (80, Some(8080), "tcp", PortModeS(Ingress)),
            (53, Some(53), "udp", PortModeS(Ingress)),
            (7000, Some(9000), "tcp", PortModeS(Ingress)),
            (7001, Some(9001), "tcp", PortModeS(Ingress)),
            (443, Some(8443), "tcp", PortModeS(Host)),
        ]
    );
    // volumes: named, bind, tmpfs, anonymous
    let text = "services:\n  web:\n    image: x\n    volumes:\n      - data:/data:ro\n      - /srv/www:/www\n      - type: tmpfs\n        target: /cache\n        tmpfs:\n          size: 64M\n      - /scratch\n      - type: volume\n        source: data\n        target: /d2\n        volume:\n          nocopy: true\n    tmpfs: [\"/run:size=1M\"]\nvolumes:\n  data:\n";
    let w = service(&run(text).unwrap(), "app-web");
    let m: Vec<(MountType, &str, &str, bool)> = w
        .mounts
        .iter()
        .map(|m| (m.typ, m.source.as_str(), m.target.as_str(), m.readonly))
        .collect();
    assert_eq!(
        m,
        [
            (MountType::Volume, "app-data", "/data", true),
            (MountType::Bind, "/srv/www", "/www", false),
            (MountType::Tmpfs, "", "/cache", false),
            (
                MountType::Volume,
                "app-web-3-{{.Task.Slot}}",
                "/scratch",
                false
            ),
            (MountType::Volume, "app-data", "/d2", false),
            (MountType::Tmpfs, "", "/run", false),
        ]
    );
    assert_eq!(w.mounts[2].tmpfs_size, 64 << 20);
    assert!(w.mounts[4].nocopy);
    assert_eq!(w.mounts[5].tmpfs_size, 1 << 20);
    // networks: map with aliases, external, internal, ipam
    let text = "services:\n  web:\n    image: x\n    networks:\n      front:\n        aliases: [www]\n      shared:\nnetworks:\n  front:\n    internal: true\n    ipam:\n      config:\n        - subnet: 10.77.0.0/16\n  shared:\n    external: true\n    name: corp-net\n";
    let s = run(text).unwrap();
    let w = service(&s, "app-web");
    assert_eq!(w.networks, ["app-front", "corp-net"]);
    assert_eq!(w.aliases, ["web", "www"]);
    let Some(Manifest::Network(n)) = s.manifests.iter().find(|m| m.name() == "app-front") else {
        panic!()
    };
    assert!(n.internal);
    assert_eq!(n.subnet.as_deref(), Some("10.77.0.0/16"));
    assert!(!s
        .manifests
        .iter()
        .any(|m| m.name() == "corp-net" || m.name() == "app-default"));
    // healthcheck forms and durations
    let w = web("    healthcheck:\n      test: [\"CMD\", \"true\"]\n      interval: 1m30s\n      timeout: 5s\n      retries: 2\n      start_period: 500ms\n");
    let h = w.healthcheck.unwrap();
    assert_eq!(h.exec.unwrap(), ["true"]);
    assert_eq!(
        (h.interval, h.timeout, h.retries, h.start_period),
        (90_000, 5_000, 2, 500)
    );
    let w = web("    healthcheck:\n      test: wget -q localhost\n");
    assert_eq!(
        w.healthcheck.unwrap().exec.unwrap(),
        ["/bin/sh", "-c", "wget -q localhost"]
    );
    let w = web("    healthcheck:\n      test: [\"CMD-SHELL\", \"cat /x\"]\n");
    assert_eq!(
        w.healthcheck.unwrap().exec.unwrap(),
        ["/bin/sh", "-c", "cat /x"]
    );
    assert!(web("    healthcheck:\n      test: [\"NONE\"]\n")
        .healthcheck
        .is_none());
    assert!(web("    healthcheck:\n      disable: true\n")
        .healthcheck
        .is_none());
    // restart and deploy.restart_policy
    assert_eq!(
        web("    restart: \"no\"\n").restart.condition,
        RestartCondition::None
    );
    let w = web("    restart: on-failure:3\n");
    assert_eq!(
        (w.restart.condition, w.restart.max_attempts),
        (RestartCondition::OnFailure, 3)
    );
    let text = "services:\n  web:\n    image: x\n    restart: always\n    deploy:\n      restart_policy:\n        condition: on-failure\n        delay: 2s\n        window: 1m\n";
    let s = run(text).unwrap();
    let w = service(&s, "app-web");
    assert_eq!(
        (w.restart.condition, w.restart.delay, w.restart.window),
        (RestartCondition::OnFailure, 2000, 60_000)
    );
    assert!(
        s.warnings
            .iter()
            .any(|x| x.contains("services.web.restart (compose.yaml:4): conflicts")),
        "{:?}",
        s.warnings
    );
    // deploy
    let w = web("    deploy:\n      mode: replicated\n      replicas: 3\n      endpoint_mode: dnsrr\n      labels: [team=a]\n      resources:\n        limits:\n          cpus: \"0.5\"\n          memory: 64M\n          pids: 50\n        reservations:\n          memory: 32M\n      placement:\n        constraints: [\"node.role == worker\"]\n        preferences:\n          - spread: node.labels.zone\n        max_replicas_per_node: 2\n      update_config:\n        parallelism: 2\n        delay: 10s\n        order: start-first\n        failure_action: rollback\n      rollback_config:\n        parallelism: 1\n");
    assert_eq!(w.replicas, 3);
    assert_eq!(w.endpoint_mode, crate::network::EndpointMode::Dnsrr);
    assert_eq!(w.labels["team"], "a");
    assert_eq!(
        (
            w.resources.limits.cpus,
            w.resources.limits.memory,
            w.resources.limits.pids
        ),
        (500, 64 << 20, 50)
    );
    assert_eq!(w.resources.reservations.memory, 32 << 20);
    assert_eq!(w.placement.constraints[0].to_string(), "node.role==worker");
    assert_eq!(w.placement.max_replicas_per_node, 2);
    assert_eq!(
        (w.update_config.parallelism, w.update_config.delay),
        (2, 10_000)
    );
    assert_eq!(
        w.update_config.order,
        crate::update::UpdateOrder::StartFirst
    );
    assert_eq!(w.rollback_config.parallelism, 1);
    let w = web("    deploy:\n      mode: replicated-job\n      replicas: 4\n");
    assert_eq!(
        (w.mode, w.completions, w.parallelism),
        (ServiceMode::ReplicatedJob, Some(4), Some(4))
    );
    assert_eq!(w.restart.condition, RestartCondition::OnFailure);
    assert_eq!(
        web("    deploy:\n      mode: global-job\n").mode,
        ServiceMode::GlobalJob
    );
    assert_eq!(
        web("    deploy:\n      mode: global\n").mode,
        ServiceMode::Global
    );
    // The simple keys.
    let w = web("    user: \"1000:1000\"\n    working_dir: /app\n    hostname: h1\n    stop_grace_period: 1m30s\n    labels:\n      a: b\n    logging:\n      driver: json-file\n      options:\n        max-size: 10m\n        max-file: \"3\"\n    network_mode: host\n");
    assert_eq!(w.user.as_deref(), Some("1000:1000"));
    assert_eq!(w.workdir.as_deref(), Some("/app"));
    assert_eq!(w.hostname.as_deref(), Some("h1"));
    assert_eq!(w.stop_grace_period, 90);
    assert_eq!(w.labels["a"], "b");
    assert_eq!((w.logging.max_size, w.logging.max_file), (10 << 20, 3));
    assert_eq!(w.network_mode, crate::spec::NetworkMode::Host);
    assert!(w.networks.is_empty());
    // secrets and configs: file, environment, external; long form
    let text = "services:\n  web:\n    image: x\n    secrets:\n      - source: pw\n        target: db-password\n        mode: 0400\n      - ext\n    configs:\n      - conf\nsecrets:\n  pw:\n    file: ./pw.txt\n  ext:\n    external: true\nconfigs:\n  conf:\n    environment: CONF\n";
    let s = run_with(&[("c.yaml", text)], None, &[("CONF", "k=v")], &[]).unwrap();
    let w = service(&s, "app-web");
    assert_eq!(w.secrets[0].source, "app-pw");
    assert_eq!(w.secrets[0].target.as_deref(), Some("db-password"));
    assert_eq!(w.secrets[0].mode, Some(0o400));
    assert_eq!(w.secrets[1].source, "ext");
    assert_eq!(w.configs[0].source, "app-conf");
    assert_eq!(w.configs[0].target.as_deref(), Some("/conf"));
    let Some(Manifest::Secret(pw)) = s.manifests.iter().find(|m| m.name() == "app-pw") else {
        panic!()
    };
    assert_eq!(pw.file.as_deref(), Some("./pw.txt"));
    let Some(Manifest::Config(c)) = s.manifests.iter().find(|m| m.name() == "app-conf") else {
        panic!()
    };
    assert_eq!(c.data.as_ref().unwrap().0, "k=v");
    assert!(
        !to_yaml(&s.manifests).contains("k=v"),
        "values are not printed"
    );
}

#[derive(Debug, PartialEq, Eq)]
struct PortModeS(crate::ports::PortMode);

#[test]
fn unsupported_keys_warn_once_each() {
    let text = "version: \"3.8\"\nservices:\n  web:\n    image: x\n    container_name: w\n    links: [db]\n    devices: [/dev/fuse]\n    pid: host\n    profiles: [debug]\n    frobnicate: 1\n  db:\n    image: x\n";
    let s = run(text).unwrap();
    for key in [
        "version",
        "container_name",
        "links",
        "devices",
        "pid",
        "profiles",
        "frobnicate",
    ] {
        let n = s
            .warnings
            .iter()
            .filter(|w| {
                w.starts_with(&format!("services.web.{key} ")) || w.starts_with(&format!("{key} "))
            })
            .count();
        assert_eq!(n, 1, "{key}: {:?}", s.warnings);
    }
    assert!(
        s.warnings
            .iter()
            .any(|w| w.starts_with("services.web.devices (compose.yaml:7)")),
        "{:?}",
        s.warnings
    );
}

#[test]
fn errors_name_the_key_and_line() {
    for (text, field, line, words) in [
        ("services:\n  web:\n    image: x\n    ports:\n      - \"80:x\"\n", "services.web.ports[0]", 4, "not a port"),
        ("services:\n  web:\n    image: x\n    volumes:\n      - ./html:/www\n", "services.web.volumes[0]", 4, "relative bind"),
        ("services:\n  web:\n    image: x\n    volumes:\n      - nope:/d\n", "services.web.volumes[0]", 4, "not declared"),
        ("services:\n  web:\n    image: x\n    networks: [ghost]\n", "services.web.networks.ghost", 4, "not declared"),
        ("services:\n  web:\n    image: x\n    deploy:\n      replicas: many\n", "services.web.deploy.replicas", 5, "expected a number"),
        ("services:\n  web:\n    image: x\n    deploy:\n      mode: sometimes\n", "services.web.deploy.mode", 5, "unknown variant"),
        ("services:\n  web:\n    image: x\n    deploy:\n      update_config:\n        order: sideways\n", "services.web.deploy.update_config.order", 6, "unknown variant"),
        ("services:\n  web:\n    image: x\n    deploy:\n      mode: global\n    volumes: [/anon]\n", "services.web.volumes[0]", 6, "replicated"),
        ("services:\n  web:\n    build: https://github.com/x/y.git\n", "services.web.build", 3, "remote build context"),
        ("services:\n  web:\n    build:\n      context: .\n      dockerfile: ../Dockerfile\n", "services.web.build.dockerfile", 5, "inside the build context"),
        ("services:\n  web:\n    image: x\n    healthcheck:\n      interval: soon\n      test: [CMD, \"true\"]\n", "services.web.healthcheck.interval", 5, "not a duration"),
        ("services:\n  web:\n    image: x\n    secrets: [missing]\n", "services.web.secrets[0]", 4, "not declared"),
        ("services:\n  web:\n    image: x\n    restart: sometimes\n", "services.web.restart", 4, "expected no"),
        ("services:\n  web:\n    image: x\n    ports:\n      - \"80-81:90\"\n", "services.web.ports[0]", 4, "ranges differ"),
        ("services: [a]\n", "services", 1, "mapping"),
        ("services:\n  web:\n    image: [x\n", ".", 4, ""),
        ("services:\n  web:\n    image: \"x\"\n    deploy:\n      resources:\n        reservations:\n          memory: 2G\n        limits:\n          memory: 1G\n", "services.web", 2, "reserves 2 GiB"),
    ] {
        let e = run(text).unwrap_err();
        assert_eq!((e.field.as_str(), e.line), (field, line), "{e}\n{text}");
        assert!(e.message.contains(words), "{e}");
        assert!(e.to_string().starts_with("compose: compose.yaml:"), "{e}");
    }
}

#[test]
fn compose_files_are_told_from_manifests() {
    assert!(is_compose("services:\n  a:\n    image: x\n"));
    assert!(!is_compose("kind: Service\nname: a\nimage: x\n"));
    assert!(!is_compose("kind: Network\nname: n\n"));
    assert_eq!(
        default_stack_name("services: {}\n", "My_Project"),
        "my-project"
    );
    assert_eq!(
        default_stack_name("name: shop\nservices: {}\n", "x"),
        "shop"
    );
    assert_eq!(dns_name("db_data"), "db-data");
}

#[test]
fn printed_manifests_parse_back() {
    let text = "services:\n  web:\n    image: busybox\n    command: [sleep, \"1000\"]\n    ports: [\"8080:80\"]\n    volumes: [\"data:/d\"]\n    healthcheck:\n      test: [CMD, \"true\"]\n  db:\n    image: busybox\nvolumes:\n  data:\n";
    let s = run(text).unwrap();
    let yaml = to_yaml(&s.manifests);
    let back = crate::manifest::parse("out.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(back, s.manifests);
}

/// Shapes of public compose files: they convert, with warnings for what Rudder does not do.
#[test]
fn corpus_of_common_shapes() {
    let wordpress = r#"
version: "3.9"
services:
  db:
    image: mysql:8.0
    command: '--default-authentication-plugin=mysql_native_password'
    volumes:
      - db_data:/var/lib/mysql
    restart: always
    environment:
      - MYSQL_ROOT_PASSWORD_FILE=/run/secrets/db_root_password
      - MYSQL_DATABASE=wordpress
    secrets:
      - db_root_password
    expose:
      - 3306
  wordpress:
    depends_on:
      db:
        condition: service_healthy
    image: wordpress:latest
    ports:
      - "8000:80"
    restart: unless-stopped
    environment:
      WORDPRESS_DB_HOST: db:3306
      WORDPRESS_DB_NAME: wordpress
      WORDPRESS_DEBUG: true
    healthcheck:
      test: curl -f http://localhost || exit 1
      interval: 1m30s
      timeout: 10s
      retries: 3
      start_period: 40s
    logging:
      driver: "json-file"
      options:
        max-size: "200k"
        max-file: "10"
secrets:
  db_root_password:
    file: db_root_password.txt
volumes:
  db_data: {}
"#;
    let s = run(wordpress).unwrap_or_else(|e| panic!("{e}"));
    let wp = service(&s, "app-wordpress");
    assert_eq!(wp.env["WORDPRESS_DEBUG"], "true");
    assert_eq!(wp.env["WORDPRESS_DB_HOST"], "db:3306");
    assert_eq!(wp.logging.max_file, 10);
    let db = service(&s, "app-db");
    assert_eq!(
        db.command.unwrap(),
        ["--default-authentication-plugin=mysql_native_password"]
    );
    assert_eq!(db.aliases, ["db"]);
    assert_eq!(
        wp.depends_on,
        [crate::depends::Dependency {
            service: "app-db".into(),
            condition: crate::depends::Condition::Healthy,
            required: true,
        }]
    );
    // db has no healthcheck: said once.
    assert!(
        s.warnings
            .iter()
            .any(|w| w.starts_with("services.wordpress.depends_on.db")
                && w.contains("no healthcheck"))
    );
    assert!(s
        .warnings
        .iter()
        .any(|w| w.starts_with("services.db.expose")));

    let voting = r#"
services:
  redis:
    image: redis:alpine
    networks:
      - frontend
    deploy:
      replicas: 1
      update_config:
        parallelism: 2
        delay: 10s
      restart_policy:
        condition: on-failure
  vote:
    image: dockersamples/examplevotingapp_vote:before
    ports:
      - 5000:80
    networks:
      - frontend
    deploy:
      replicas: 2
      update_config:
        parallelism: 2
      restart_policy:
        condition: on-failure
  visualizer:
    image: dockersamples/visualizer:stable
    ports:
      - "8080:8080"
    stop_grace_period: 1m30s
    volumes:
      - "/var/run/docker.sock:/var/run/docker.sock"
    deploy:
      placement:
        constraints: [node.role == manager]
  worker:
    image: dockersamples/examplevotingapp_worker
    networks:
      - frontend
      - backend
    deploy:
      mode: replicated
      replicas: 1
      labels: [APP=VOTING]
      restart_policy:
        condition: on-failure
        delay: 10s
        max_attempts: 3
        window: 120s
networks:
  frontend:
  backend:
"#;
    let s = run(voting).unwrap_or_else(|e| panic!("{e}"));
    let w = service(&s, "app-worker");
    assert_eq!(w.networks, ["app-frontend", "app-backend"]);
    assert_eq!((w.restart.max_attempts, w.restart.window), (3, 120_000));
    assert_eq!(w.labels["APP"], "VOTING");
    let v = service(&s, "app-visualizer");
    assert_eq!(v.stop_grace_period, 90);
    assert_eq!(v.networks, ["app-default"]);
    assert_eq!(v.mounts[0].typ, MountType::Bind);
    assert_eq!(service(&s, "app-vote").ports[0].published, Some(5000));

    // A renamed default network is used by the services without `networks:`.
    let s = run("services:\n  a:\n    image: x\nnetworks:\n  default:\n    name: corp\n    external: true\n").unwrap();
    assert_eq!(service(&s, "app-a").networks, ["corp"]);
    assert!(!s.manifests.iter().any(|m| m.kind() == "Network"));
}

#[test]
fn depends_on_short_and_long_forms_cycles_and_unknown_services() {
    use crate::depends::{Condition, Dependency};
    let text = "services:\n  web_app:\n    image: x\n    depends_on:\n      db:\n        condition: service_healthy\n        restart: true\n      migrate:\n        condition: service_completed_successfully\n      metrics:\n        required: false\n  db:\n    image: x\n    healthcheck:\n      test: [\"CMD\", \"true\"]\n  migrate:\n    image: x\n    depends_on: [db]\n    deploy:\n      mode: replicated-job\n";
    let s = run(text).unwrap_or_else(|e| panic!("{e}"));
    let dep = |service: &str, condition, required| Dependency {
        service: service.into(),
        condition,
        required,
    };
    assert_eq!(
        service(&s, "app-web-app").depends_on,
        [
            dep("app-db", Condition::Healthy, true),
            dep("app-migrate", Condition::CompletedSuccessfully, true),
            dep("app-metrics", Condition::Started, false),
        ]
    );
    assert_eq!(
        service(&s, "app-migrate").depends_on,
        [dep("app-db", Condition::Started, true)]
    );
    assert!(
        s.warnings
            .iter()
            .any(|w| w.starts_with("services.web_app.depends_on.metrics")),
        "{:?}",
        s.warnings
    );
    // Services come in start order.
    let order: Vec<&str> = s
        .manifests
        .iter()
        .filter_map(|m| match m {
            crate::Manifest::Service(sp) => Some(sp.name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(order, ["app-db", "app-migrate", "app-web-app"]);

    for (text, field, message) in [
        (
            "services:\n  a:\n    image: x\n    depends_on: [b]\n  b:\n    image: x\n    depends_on: [c]\n  c:\n    image: x\n    depends_on: [a]\n",
            "services.a.depends_on",
            "dependency cycle: a -> b -> c -> a",
        ),
        (
            "services:\n  a:\n    image: x\n    depends_on: [nope]\n",
            "services.a.depends_on.nope",
            "no service \"nope\"",
        ),
        (
            "services:\n  a:\n    image: x\n    depends_on: [a]\n",
            "services.a.depends_on",
            "itself",
        ),
        (
            "services:\n  a:\n    image: x\n    depends_on:\n      b: {condition: service_ready}\n  b:\n    image: x\n",
            "services.a.depends_on.b.condition",
            "service_healthy",
        ),
    ] {
        let e = run(text).expect_err(field);
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(message), "{e}");
    }
}

#[test]
fn build_short_and_long_forms_name_the_image_to_build() {
    let text = "services:\n  web_app:\n    build: ./web\n  api:\n    image: registry.local/api:2\n    build:\n      context: api\n      dockerfile: docker/Dockerfile.prod\n      target: runtime\n      args:\n        MODE: prod\n        FROM_ENV:\n      cache_from: [x]\n";
    let s = run(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.builds.len(), 2);
    let web = &s.builds[0];
    assert_eq!(
        (
            web.service.as_str(),
            web.compose_name.as_str(),
            web.tag.as_str()
        ),
        ("app-web-app", "web_app", "app-web-app:latest")
    );
    assert_eq!(web.context, "./web");
    assert_eq!(web.dockerfile, None);
    assert_eq!(service(&s, "app-web-app").image, "app-web-app:latest");
    let api = &s.builds[1];
    assert_eq!(api.tag, "registry.local/api:2");
    assert_eq!(api.context, "api");
    assert_eq!(api.dockerfile.as_deref(), Some("docker/Dockerfile.prod"));
    assert_eq!(api.target.as_deref(), Some("runtime"));
    assert_eq!(api.args["MODE"].as_deref(), Some("prod"));
    assert_eq!(api.args["FROM_ENV"], None);
    assert!(s
        .warnings
        .iter()
        .any(|w| w.starts_with("services.api.build.cache_from")));
}

#[test]
fn runtime_options_map_to_the_spec() {
    let s = web(concat!(
        "    stop_signal: SIGINT\n",
        "    init: true\n",
        "    cap_add: [NET_ADMIN, SYS_PTRACE]\n",
        "    cap_drop: [MKNOD]\n",
        "    sysctls:\n      - net.core.somaxconn=1024\n      - kernel.shmmni=100\n",
        "    read_only: true\n",
        "    ulimits:\n      nproc: 65535\n      nofile:\n        soft: 20000\n        hard: 40000\n",
        "    extra_hosts: [\"somehost:162.242.195.82\", \"other=50.31.209.229\", \"v6:::1\"]\n",
        "    dns: 10.0.0.53\n",
        "    dns_search: [example.com, corp]\n",
        "    dns_opt: [ndots:2, use-vc]\n",
        "    shm_size: 128M\n",
        "    privileged: false\n",
    ));
    assert_eq!(s.stop_signal.as_deref(), Some("SIGINT"));
    assert!(s.init && s.read_only && !s.privileged);
    assert_eq!(s.cap_add, ["NET_ADMIN", "SYS_PTRACE"]);
    assert_eq!(s.cap_drop, ["MKNOD"]);
    assert_eq!(
        s.sysctls.get("net.core.somaxconn").map(String::as_str),
        Some("1024")
    );
    assert_eq!(
        s.sysctls.get("kernel.shmmni").map(String::as_str),
        Some("100")
    );
    let u = |n: &str| s.ulimits.get(n).map(|u| (u.soft, u.hard));
    assert_eq!(
        (u("nproc"), u("nofile")),
        (Some((65535, 65535)), Some((20000, 40000)))
    );
    assert_eq!(
        s.extra_hosts,
        ["somehost:162.242.195.82", "other:50.31.209.229", "v6:::1"]
    );
    assert_eq!(s.dns, ["10.0.0.53"]);
    assert_eq!(s.dns_search, ["example.com", "corp"]);
    assert_eq!(s.dns_opt, ["ndots:2", "use-vc"]);
    assert_eq!(s.shm_size, 128 << 20);
    // The map forms of sysctls and extra_hosts.
    let s = web(
        "    sysctls:\n      net.ipv4.tcp_syncookies: 0\n    extra_hosts:\n      db: 10.0.0.5\n",
    );
    assert_eq!(
        s.sysctls.get("net.ipv4.tcp_syncookies").map(String::as_str),
        Some("0")
    );
    assert_eq!(s.extra_hosts, ["db:10.0.0.5"]);
}

#[test]
fn runtime_option_errors_name_the_key_and_line() {
    for (body, field, line, words) in [
        (
            "    cap_add: [NET_ADMIN, FLY]\n",
            "services.web.cap_add[1]",
            4,
            "not a Linux capability",
        ),
        (
            "    sysctls:\n      vm.swappiness: 10\n",
            "services.web.sysctls.vm.swappiness",
            4,
            "not a namespaced sysctl",
        ),
        (
            "    network_mode: host\n    sysctls: {net.core.somaxconn: 1}\n",
            "services.web.sysctls.net.core.somaxconn",
            5,
            "network_mode: host",
        ),
        (
            "    stop_signal: SIGNOPE\n",
            "services.web.stop_signal",
            4,
            "not a signal",
        ),
        (
            "    ulimits:\n      nofile: {soft: 10, hard: 5}\n",
            "services.web.ulimits.nofile",
            5,
            "above the hard",
        ),
        (
            "    ulimits:\n      nofile: {soft: 10}\n",
            "services.web.ulimits.nofile",
            5,
            "soft and hard",
        ),
        (
            "    extra_hosts: [\"db\"]\n",
            "services.web.extra_hosts[0]",
            4,
            "HOST:IP",
        ),
        (
            "    dns: [dns.google]\n",
            "services.web.dns[0]",
            4,
            "not an IP address",
        ),
        (
            "    shm_size: lots\n",
            "services.web.shm_size",
            4,
            "unknown unit",
        ),
        (
            "    privileged: true\n",
            "services.web.privileged",
            4,
            "cap_add",
        ),
        ("    init: maybe\n", "services.web.init", 4, "true or false"),
    ] {
        let text = format!("services:\n  web:\n    image: x\n{body}");
        let e = run(&text).unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert_eq!(e.line, line, "{e}");
        assert!(e.message.contains(words), "{e}");
    }
}

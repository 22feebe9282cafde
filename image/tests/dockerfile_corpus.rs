//! Real-world Dockerfile shapes (`tests/fixtures/dockerfiles/`) parsed and stepped through as
//! a build on this host would, with the image config fields they set checked against
//! docker's documented semantics: MAINTAINER is the config's `author` (no label), the
//! platform ARGs are the host's (`linux/<arch>`), a trailing `\\` ends its instruction, a
//! repeated identical step parses as two steps.

use std::collections::BTreeMap;
use std::path::Path;

use rudder_image::dockerfile::{
    parse, resolve_from, with_host_platform_args, Action, Settings, StageBuilder,
};
use rudder_image::oci::host_architecture;

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dockerfiles")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A RUN step's argv and environment.
type RunStep = (Vec<String>, Vec<String>);

/// Steps through the last stage; returns the RUN steps and the settings.
fn run_last_stage(text: &str) -> (Vec<RunStep>, Settings) {
    let df = parse(text).expect("parses");
    let args = with_host_platform_args(BTreeMap::new());
    let stage = df.stages.last().expect("a stage");
    let mut b = StageBuilder::new(&df.global_args, &args, Settings::default());
    let mut runs = Vec::new();
    for s in &stage.steps {
        if let Action::Run { argv, env, .. } = b.step(s).expect("step") {
            runs.push((argv, env));
        }
    }
    (runs, b.into_settings())
}

#[test]
fn every_fixture_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dockerfiles");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        n += 1;
    }
    assert!(n >= 4, "the corpus is there");
}

#[test]
fn go_cross_compile_sees_the_host_platform() {
    let text = fixture("go-cross.Dockerfile");
    let df = parse(&text).unwrap();
    let args = with_host_platform_args(BTreeMap::new());
    assert_eq!(
        resolve_from(&df.stages[0], &df.global_args, &args).unwrap(),
        "golang:1.22-alpine"
    );
    let mut b = StageBuilder::new(&df.global_args, &args, Settings::default());
    let mut envs = Vec::new();
    for s in &df.stages[0].steps {
        if let Action::Run { env, .. } = b.step(s).unwrap() {
            envs.push(env);
        }
    }
    let arch = host_architecture();
    let last = envs.last().unwrap();
    assert!(last.contains(&format!("TARGETARCH={arch}")), "{last:?}");
    assert!(last.contains(&"TARGETOS=linux".to_string()), "{last:?}");
    // Only declared ARGs reach RUN.
    assert!(
        !last.iter().any(|e| e.starts_with("BUILDPLATFORM=")),
        "{last:?}"
    );
}

#[test]
fn legacy_python_sets_author_and_keeps_repeated_steps() {
    let text = fixture("legacy-python.Dockerfile");
    let (runs, s) = run_last_stage(&text);
    assert_eq!(s.author.as_deref(), Some("Jane Doe <jane@example.com>"));
    assert!(
        s.labels.is_empty(),
        "MAINTAINER is no label: {:?}",
        s.labels
    );
    let mkdirs = runs
        .iter()
        .filter(|(argv, _)| argv.last().is_some_and(|c| c == "mkdir -p /app"))
        .count();
    assert_eq!(mkdirs, 2);
    assert_eq!(s.working_dir, "/app");
    assert!(s.exposed_ports.contains("8000/tcp"));
    let mut config = serde_json::json!({});
    s.write_to(&mut config);
    assert_eq!(config["author"], "Jane Doe <jane@example.com>");
    assert_eq!(
        config["config"]["Env"],
        serde_json::json!(["PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"])
    );
}

#[test]
fn trailing_escaped_backslash_ends_the_instruction() {
    let text = fixture("trailing-backslash.Dockerfile");
    let df = parse(&text).unwrap();
    assert_eq!(df.stages[0].steps.len(), 4, "{:?}", df.stages[0].steps);
    let (runs, s) = run_last_stage(&text);
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].0.last().unwrap(), "echo next");
    // ENV processes escapes: `\\` is one backslash.
    assert_eq!(s.env_value("WIN_PATH"), Some("C:\\Tools\\"));
}

#[test]
fn arch_switch_gets_target_args() {
    let text = fixture("arch-switch.Dockerfile");
    let (runs, _) = run_last_stage(&text);
    let env = &runs[0].1;
    let arch = host_architecture();
    assert!(env.contains(&format!("TARGETARCH={arch}")), "{env:?}");
    assert!(
        env.contains(&format!("TARGETPLATFORM=linux/{arch}")),
        "{env:?}"
    );
}

#[test]
fn buildkit_mounts_heredocs_and_copy_flags() {
    use rudder_image::dockerfile::{MountKind, RunNetwork, Sharing};
    let text = fixture("buildkit-mounts.Dockerfile");
    let df = parse(&text).unwrap();
    let args = with_host_platform_args(BTreeMap::new());
    let mut actions = Vec::new();
    for stage in &df.stages {
        let mut b = StageBuilder::new(&df.global_args, &args, Settings::default());
        for s in &stage.steps {
            actions.push(b.step(s).unwrap_or_else(|e| panic!("{e}")));
        }
    }
    let runs: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Run {
                mounts, network, ..
            } => Some((mounts, network)),
            _ => None,
        })
        .collect();
    // Relative bind targets are under WORKDIR; a cache's id is its target unless named.
    let (m, _) = runs[0];
    assert_eq!(m[0].id.as_deref(), Some("/go/pkg/mod"));
    assert_eq!(m[1].target, "/src/go.sum");
    assert!(m[1].readonly);
    let (m, _) = runs[1];
    assert_eq!(
        (m[1].id.as_deref(), m[1].sharing),
        (Some("gobuild"), Sharing::Locked)
    );
    assert_eq!(
        (m[2].target.as_str(), m[2].source.as_deref()),
        ("/src", None)
    );
    let (m, net) = runs[2];
    assert_eq!(*net, RunNetwork::None);
    assert_eq!(
        (m[0].kind, m[0].size_bytes()),
        (MountKind::Tmpfs, Some(256 << 20))
    );
    assert!(!m[1].readonly, "rw");
    let (m, _) = runs[3];
    assert_eq!(
        (m[0].kind, m[0].target.as_str(), m[0].required),
        (MountKind::Secret, "/root/.npmrc", true)
    );
    assert_eq!(
        (m[1].target.as_str(), m[1].env.as_deref()),
        ("", Some("SENTRY_AUTH_TOKEN"))
    );
    // The heredoc RUN is a plain script.
    assert!(runs[4].0.is_empty());
    let copies: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Copy {
                srcs,
                dest,
                parents,
                excludes,
                checksum,
                heredocs,
                ..
            } => Some((srcs, dest, parents, excludes, checksum, heredocs)),
            _ => None,
        })
        .collect();
    let (srcs, dest, parents, excludes, _, _) = copies[0];
    assert_eq!(
        (srcs.as_slice(), dest.as_str()),
        (&["web/./dist/".to_string()][..], "/web/")
    );
    assert!(*parents);
    assert_eq!(excludes, &["*.map"]);
    let (_, dest, _, _, checksum, _) = copies[1];
    assert_eq!(dest, "/sbin/tini");
    assert!(checksum.as_deref().unwrap().starts_with("sha256:24454f83"));
    let (srcs, dest, _, _, _, heredocs) = copies[2];
    assert!(srcs.is_empty());
    assert_eq!(dest, "/etc/app/config.toml");
    assert_eq!(heredocs[0].data, "listen = \":8080\"\n");
}

//! Manifests: multi-document YAML files of `kind:`-tagged objects, as `rctl apply -f` reads them.
//!
//! Invariants: a file is accepted whole or not at all; every error names the file, line, column
//! and field. `kind` must be the first key of each document: that lets the rest of the document
//! stream straight into the typed spec, so serde_yaml's line numbers survive (buffering the
//! document into a generic value first would lose them).

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::network::NetworkSpec;
use crate::spec::ServiceSpec;
use crate::volume::VolumeSpec;

/// One document of a manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // a handful per file; boxing would only add noise
pub enum Manifest {
    /// `kind: Service`.
    Service(ServiceSpec),
    /// `kind: Network`.
    Network(NetworkSpec),
    /// `kind: Volume`.
    Volume(VolumeSpec),
    /// `kind: Secret`.
    Secret(crate::secret::SecretSpec),
    /// `kind: Config`: a secret that is not secret (shown in full by `inspect`).
    Config(crate::secret::SecretSpec),
}

impl Manifest {
    /// The document's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Manifest::Service(_) => "Service",
            Manifest::Network(_) => "Network",
            Manifest::Volume(_) => "Volume",
            Manifest::Secret(_) => "Secret",
            Manifest::Config(_) => "Config",
        }
    }
    /// The document's `name`.
    pub fn name(&self) -> &str {
        match self {
            Manifest::Service(s) => &s.name,
            Manifest::Network(n) => &n.name,
            Manifest::Volume(v) => &v.name,
            Manifest::Secret(s) | Manifest::Config(s) => &s.name,
        }
    }
}

/// A manifest problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {field}: {message}")]
pub struct ManifestError {
    /// The file the document came from (`-` for stdin).
    pub file: String,
    /// 1-based; 0 when the YAML parser gave no location.
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub column: usize,
    /// Dotted path of the field at fault (`.` for the document itself).
    pub field: String,
    /// What is wrong, for a user to read.
    pub message: String,
}

const KINDS: &[&str] = &["Service", "Network", "Volume", "Secret", "Config"];

/// Parses every document of `text`. `file` is only used in error messages.
pub fn parse(file: &str, text: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut out = Vec::new();
    for (n, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let parsed: Result<Option<Manifest>, _> =
            serde_path_to_error::deserialize(doc).map(|d: Doc| d.0);
        match parsed {
            Ok(Some(m)) => {
                let validated = match &m {
                    Manifest::Service(s) => s.validate(),
                    Manifest::Network(n) => n.validate(),
                    Manifest::Volume(v) => v.validate(),
                    Manifest::Secret(s) | Manifest::Config(s) => s.validate(),
                };
                {
                    validated.map_err(|v| {
                        let (line, column) = locate_key(text, n, &v.field);
                        ManifestError {
                            file: file.to_string(),
                            line,
                            column,
                            field: v.field.clone(),
                            message: v.message.clone(),
                        }
                    })?;
                }
                out.push(m)
            }
            Ok(None) => {}
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let (line, column) = inner
                    .location()
                    .map(|l| (l.line(), l.column()))
                    .unwrap_or((0, 0));
                // serde_yaml prefixes its own message with the path; keep only the reason.
                let mut message = inner.to_string();
                if let Some(i) = message.find(" at line ") {
                    message.truncate(i);
                }
                if let Some(rest) = message.strip_prefix(&format!("{path}: ")) {
                    message = rest.to_string();
                } else if let Some((prefix, rest)) = message.split_once(": ") {
                    // Errors inside a nested mapping carry the mapping's path.
                    if path.starts_with(prefix) {
                        message = rest.to_string();
                    }
                }
                let field = match unknown_field(&message) {
                    Some(f) if path == "." => f,
                    _ => path,
                };
                return Err(ManifestError {
                    file: file.to_string(),
                    line,
                    column,
                    field,
                    message,
                });
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for m in &out {
        if !seen.insert((m.kind(), m.name().to_string())) {
            return Err(ManifestError {
                file: file.to_string(),
                line: 0,
                column: 0,
                field: "name".into(),
                message: format!("{} {:?} is declared twice", m.kind(), m.name()),
            });
        }
    }
    Ok(out)
}

/// For "unknown field `x`, expected …" the field at fault is `x`, not its parent.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// Best-effort position of a top-level key in document `doc` (validation errors come after
/// parsing, when serde's locations are gone); for `key[i]` and `key[i].sub`, of that list item
/// (or its key) when the list is written one `- ` item per line.
fn locate_key(text: &str, doc: usize, field: &str) -> (usize, usize) {
    let key = field.split(['.', '[']).next().unwrap_or(field);
    let lines: Vec<&str> = text.lines().collect();
    let mut current = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("---") && i > 0 {
            current += 1;
            continue;
        }
        if current == doc && line.starts_with(&format!("{key}:")) {
            return match locate_item(&lines[i..], &field[key.len()..]) {
                Some((l, c)) => (i + l + 1, c),
                None => (i + 1, 1),
            };
        }
    }
    (0, 0)
}

/// In the block of a top-level key (`block[0]` is the key's line), the 0-based line and the
/// 1-based column of `rest` = `[i]` or `[i].sub`.
fn locate_item(block: &[&str], rest: &str) -> Option<(usize, usize)> {
    let (index, after) = rest.strip_prefix('[')?.split_once(']')?;
    let index: usize = index.parse().ok()?;
    let sub = after.strip_prefix('.').filter(|s| !s.contains(['.', '[']));
    let indent = |l: &str| l.len() - l.trim_start().len();
    let is_item = |t: &str| t == "-" || t.starts_with("- ");
    let mut items = Vec::new();
    let mut end = block.len();
    for (n, l) in block.iter().enumerate().skip(1) {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if l.starts_with("---") || (indent(l) == 0 && !is_item(t)) {
            end = n;
            break;
        }
        // Items are the `- ` lines at the first item's indentation (deeper ones are nested).
        if is_item(t)
            && items
                .first()
                .is_none_or(|&f: &usize| indent(block[f]) == indent(l))
        {
            items.push(n);
        }
    }
    let start = *items.get(index)?;
    let stop = items.get(index + 1).copied().unwrap_or(end);
    let Some(sub) = sub else {
        return Some((start, indent(block[start]) + 3));
    };
    for (n, l) in block.iter().enumerate().take(stop).skip(start) {
        // The item's first line holds a key after its `- `.
        let offset = if n == start { indent(l) + 2 } else { indent(l) };
        if l.get(offset..)
            .is_some_and(|t| t.starts_with(&format!("{sub}:")))
        {
            return Some((n, offset + 1));
        }
    }
    Some((start, indent(block[start]) + 3))
}

struct Doc(Option<Manifest>);

impl<'de> de::Deserialize<'de> for Doc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocVisitor)
    }
}

struct DocVisitor;

impl<'de> Visitor<'de> for DocVisitor {
    type Value = Doc;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping whose first key is `kind`")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Doc, E> {
        Ok(Doc(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
        let key: Option<String> = map.next_key()?;
        match key.as_deref() {
            Some("kind") => {}
            Some(other) => {
                return Err(de::Error::custom(format!(
                    "the first key of a document must be `kind` (one of {}), found `{other}`",
                    KINDS.join(", ")
                )))
            }
            None => return Ok(Doc(None)),
        }
        let kind: String = map.next_value()?;
        let rest = de::value::MapAccessDeserializer::new(map);
        match kind.as_str() {
            "Service" => Ok(Doc(Some(Manifest::Service(de::Deserialize::deserialize(
                rest,
            )?)))),
            "Network" => Ok(Doc(Some(Manifest::Network(de::Deserialize::deserialize(
                rest,
            )?)))),
            "Volume" => Ok(Doc(Some(Manifest::Volume(de::Deserialize::deserialize(
                rest,
            )?)))),
            "Secret" => Ok(Doc(Some(Manifest::Secret(de::Deserialize::deserialize(
                rest,
            )?)))),
            "Config" => Ok(Doc(Some(Manifest::Config(de::Deserialize::deserialize(
                rest,
            )?)))),
            other => Err(de::Error::custom(format!(
                "unknown kind `{other}`, expected one of {}",
                KINDS.join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "kind: Service\nname: hello\nimage: hello:latest\ncommand: [\"/bin/sh\", \"-c\", \"echo hi; sleep 1000\"]\nenv:\n  GREETING: hi\nreplicas: 6\n";

    #[test]
    fn the_example_manifests_parse() {
        for (name, text) in [
            ("hello.yaml", include_str!("../../manifests/hello.yaml")),
            ("web.yaml", include_str!("../../manifests/web.yaml")),
        ] {
            parse(name, text).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn parses_networks_and_names_bad_fields() {
        let text = "kind: Network\nname: backend\nsubnet: 10.50.0.0/16\n---\nkind: Network\nname: plain\nencrypted: false\n---\nkind: Service\nname: web\nimage: x\nnetworks: [backend]\nports:\n  - target: 80\n    published: 8080\n    mode: ingress\n";
        let docs = parse("f.yaml", text).unwrap();
        assert_eq!(docs.len(), 3);
        match &docs[1] {
            Manifest::Network(n) => assert!(!n.encrypted),
            other => panic!("{other:?}"),
        }
        let e = parse("f.yaml", "kind: Network\nname: a\nsubnet: 10.50.0.1/16\n").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "subnet"), "{e}");
        assert!(e.message.contains("host bits"), "{e}");
        let e = parse("f.yaml", "kind: Network\nname: a\nencrypted: maybe\n").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "encrypted"), "{e}");
        let e = parse(
            "f.yaml",
            "kind: Service\nname: a\nimage: x\nports:\n  - target: 80\n    mode: ingress\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "ports[0].mode", "{e}");
        let e = parse("f.yaml", "kind: Network\nname: a\ninternal: sure\n").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "internal"), "{e}");
        // Aliases: names on networks, valid, not the service's own.
        for (yaml, field, words) in [
            (
                "aliases: [db]\n",
                "aliases[0]",
                "list the service's networks",
            ),
            (
                "networks: [n]\naliases: [db, Bad_Name]\n",
                "aliases[1]",
                "not a valid name",
            ),
            (
                "networks: [n]\naliases: [a]\n",
                "aliases[0]",
                "the service's name",
            ),
        ] {
            let e = parse(
                "f.yaml",
                &format!("kind: Service\nname: a\nimage: x\n{yaml}"),
            )
            .unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(words), "{e}");
        }
    }

    #[test]
    fn parses_a_service() {
        let m = parse("hello.yaml", HELLO).unwrap();
        assert_eq!(m.len(), 1);
        let Manifest::Service(s) = &m[0] else {
            panic!("not a service")
        };
        assert_eq!(s.name, "hello");
        assert_eq!(s.replicas, 6);
        assert_eq!(s.env["GREETING"], "hi");
        assert_eq!(s.command.as_ref().unwrap().len(), 3);
    }

    #[test]
    fn multi_document() {
        let text = format!("{HELLO}---\nkind: Service\nname: other\nimage: x\n---\n");
        let m = parse("f.yaml", &text).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].name(), "other");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            // (text, line, field, message fragment)
            (
                "kind: Service\nname: a\nimage: x\nreplics: 3\n",
                4,
                "replics",
                "unknown field",
            ),
            (
                "kind: Service\nname: a\nimage: x\nreplicas: six\n",
                4,
                "replicas",
                "invalid type",
            ),
            (
                "kind: Service\nname: a\nreplicas: 2\n",
                1,
                ".",
                "missing field `image`",
            ),
            (
                "kind: Service\nname: a\nimage: x\nenv:\n  A: [1]\n",
                5,
                "env.A",
                "invalid type",
            ),
            ("kind: Servis\nname: a\n", 1, ".", "unknown kind"),
            ("name: a\nkind: Service\n", 1, ".", "first key"),
            (
                "kind: Service\nname: Bad_Name\nimage: x\n",
                2,
                "name",
                "not a valid name",
            ),
            (
                "kind: Service\nname: a\nimage: x\nrestart:\n  condition: sometimes\n",
                5,
                "restart.condition",
                "unknown variant",
            ),
        ];
        for (text, line, field, frag) in cases {
            let e = parse("svc.yaml", text).unwrap_err();
            assert_eq!(e.file, "svc.yaml");
            assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
            assert!(e.message.contains(frag), "{e}");
        }
    }

    #[test]
    fn resources_placement_and_mode() {
        let text = "kind: Service\nname: a\nimage: x\nmode: global\nresources:\n  reservations:\n    cpus: 0.5\n    memory: 256Mi\n  limits:\n    cpus: \"2\"\n    memory: 1073741824\n    pids: 100\nplacement:\n  constraints: [\"node.labels.zone==a\", \"node.role!=manager\"]\n  preferences:\n    - spread: node.labels.rack\n  max_replicas_per_node: 2\n  strategy: binpack\n";
        let m = parse("f.yaml", text).unwrap();
        let Manifest::Service(s) = &m[0] else {
            panic!("not a service")
        };
        assert_eq!(s.mode, crate::spec::ServiceMode::Global);
        assert_eq!(s.resources.reservations.cpus, 500);
        assert_eq!(s.resources.reservations.memory, 256 << 20);
        assert_eq!(s.resources.limits.cpus, 2000);
        assert_eq!(s.resources.limits.memory, 1 << 30);
        assert_eq!(s.resources.limits.pids, 100);
        assert_eq!(s.placement.constraints.len(), 2);
        assert_eq!(s.placement.constraints[1].to_string(), "node.role!=manager");
        assert_eq!(s.placement.preferences[0].label(), "rack");
        assert_eq!(s.placement.max_replicas_per_node, 2);
        assert_eq!(s.placement.strategy, crate::spec::Strategy::Binpack);
        let text = "kind: Service\nname: a\nimage: x\nupdate_config:\n  parallelism: 2\n  delay: 10s\n  order: start-first\n  failure_action: rollback\n  monitor: 30s\n  max_failure_ratio: 0.2\nrollback_config:\n  parallelism: 0\n  failure_action: continue\n";
        let Manifest::Service(s) = &parse("f.yaml", text).unwrap()[0] else {
            panic!("not a service")
        };
        let u = &s.update_config;
        assert_eq!((u.parallelism, u.delay, u.monitor), (2, 10_000, 30_000));
        assert_eq!(u.order, crate::update::UpdateOrder::StartFirst);
        assert_eq!(u.failure_action, crate::update::FailureAction::Rollback);
        assert_eq!(u.max_failure_ratio.per_mille(), 200);
        assert_eq!(s.rollback_config.parallelism, 0);
        assert_eq!(
            s.rollback_config.failure_action,
            crate::update::FailureAction::Continue
        );
        // A plain manifest gets the defaults.
        let Manifest::Service(s) = &parse("f.yaml", HELLO).unwrap()[0] else {
            panic!("not a service")
        };
        assert_eq!(s.mode, crate::spec::ServiceMode::Replicated);
        assert_eq!(s.placement, Default::default());
    }

    #[test]
    fn resource_and_placement_errors_name_the_field() {
        let head = "kind: Service\nname: a\nimage: x\n";
        let cases = [
            (
                "resources:\n  reservations:\n    memory: 12X\n",
                6,
                "resources.reservations.memory",
                "unknown unit",
            ),
            (
                "resources:\n  limits:\n    cpus: lots\n",
                6,
                "resources.limits.cpus",
                "not a number of cpus",
            ),
            (
                "resources:\n  reservations:\n    gpus: 1\n",
                6,
                "resources.reservations.gpus",
                "unknown field `gpus`",
            ),
            (
                "placement:\n  constraints:\n    - node.labels.zone==a\n    - zone=a\n",
                7,
                "placement.constraints[1]",
                "expected KEY==VALUE",
            ),
            (
                "update_config:\n  parallelism: 2\n  order: sideways\n",
                6,
                "update_config.order",
                "unknown variant",
            ),
            (
                "rollback_config:\n  monitor: soon\n",
                5,
                "rollback_config.monitor",
                "not a duration",
            ),
            (
                "update_config:\n  max_failure_ratio: 2\n",
                4,
                "update_config.max_failure_ratio",
                "not between 0 and 1",
            ),
            (
                "placement:\n  strategy: pack\n",
                5,
                "placement.strategy",
                "unknown variant",
            ),
            ("mode: both\n", 4, "mode", "unknown variant"),
            (
                "placement:\n  preferences:\n    - spread: zone\n",
                4,
                "placement.preferences[0].spread",
                "node.labels.<name>",
            ),
            (
                "resources:\n  reservations:\n    memory: 2Gi\n  limits:\n    memory: 1Gi\n",
                4,
                "resources.reservations.memory",
                "reserves 2 GiB but the limit is 1 GiB",
            ),
        ];
        for (tail, line, field, frag) in cases {
            let e = parse("svc.yaml", &format!("{head}{tail}")).unwrap_err();
            assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
            assert!(e.message.contains(frag), "{e}");
        }
    }

    #[test]
    fn duplicate_names_refused() {
        let text = format!("{HELLO}---\n{HELLO}");
        let e = parse("f.yaml", &text).unwrap_err();
        assert!(e.message.contains("declared twice"), "{e}");
    }

    #[test]
    fn parses_secrets_configs_and_references() {
        let text = "kind: Secret\nname: db-pw\ndata: hunter2\n---\nkind: Config\nname: nginx.conf\nfile: nginx.conf\n---\nkind: Service\nname: web\nimage: x\nsecrets:\n  - source: db-pw\n    uid: www-data\n    mode: 0400\n  - source: db-pw:2\n    target: old-pw\nconfigs:\n  - source: nginx.conf\n    target: /etc/nginx/nginx.conf\n    gid: 101\nenv_from_secret:\n  DB_PASSWORD: db-pw\n";
        let docs = parse("f.yaml", text).unwrap();
        let Manifest::Secret(sec) = &docs[0] else {
            panic!()
        };
        assert_eq!(sec.data.as_ref().unwrap().0, "hunter2");
        assert!(
            !format!("{docs:?}").contains("hunter2"),
            "values are redacted in Debug"
        );
        let Manifest::Service(svc) = &docs[2] else {
            panic!()
        };
        assert_eq!(svc.secrets[0].mode, Some(0o400));
        assert_eq!(svc.secrets[0].uid.as_deref(), Some("www-data"));
        assert_eq!(svc.configs[0].gid.as_deref(), Some("101"));
        assert_eq!(
            svc.secrets[1].target_path(crate::secret::ObjectKind::Secret),
            "/run/secrets/old-pw"
        );
        // The spec's JSON round-trips (modes as octal digits) and holds no value.
        let json = serde_json::to_string(svc).unwrap();
        assert_eq!(
            &serde_json::from_str::<crate::ServiceSpec>(&json).unwrap(),
            svc
        );
        assert!(!json.contains("hunter2"));
        for (yaml, line, field, words) in [
            (
                "secrets:\n  - source: db:0\n",
                5,
                "secrets[0].source",
                "version",
            ),
            (
                "configs:\n  - source: c\n    target: rel\n",
                6,
                "configs[0].target",
                "absolute",
            ),
            (
                "secrets:\n  - source: a\n  - source: b\n    target: /run/secrets/a\n",
                7,
                "secrets[1].target",
                "another",
            ),
            (
                "env: {PW: x}\nenv_from_secret:\n  PW: pw\n",
                5,
                "env_from_secret.PW",
                "also set in env",
            ),
            (
                "secrets:\n  - source: a\n    mode: 0999\n",
                5,
                "secrets[0].mode",
                "octal",
            ),
        ] {
            let e = parse(
                "f.yaml",
                &format!("kind: Service\nname: a\nimage: x\n{yaml}"),
            )
            .unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert_eq!(e.line, line, "{e}");
            assert!(e.message.contains(words), "{e}");
        }
        let big = format!(
            "kind: Secret\nname: big\ndata: {}\n",
            "x".repeat(crate::secret::MAX_DATA + 1)
        );
        let e = parse("f.yaml", &big).unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("data", 3), "{e}");
        assert!(
            !e.to_string().contains("xxxx"),
            "the value is not in the error"
        );
        let Manifest::Secret(s) =
            &parse("f.yaml", "kind: Secret\nname: n\ndata: 98765\n").unwrap()[0]
        else {
            panic!()
        };
        assert_eq!(s.data.as_ref().unwrap().0, "98765");
        let e = parse("f.yaml", "kind: Secret\nname: n\ndata: [\"hidden-987\"]\n").unwrap_err();
        assert_eq!(e.field, "data", "{e}");
        assert!(!e.to_string().contains("hidden-987"), "{e}");
        let e = parse("f.yaml", "kind: Secret\nname: a:1\ndata: x\n").unwrap_err();
        assert_eq!(e.field, "name", "{e}");
    }

    #[test]
    fn runtime_options_parse_in_both_compose_forms() {
        let text = "kind: Service\nname: a\nimage: x\nstop_signal: SIGQUIT\ninit: true\n\
            cap_add: [NET_ADMIN]\ncap_drop: [ALL]\nsysctls:\n  net.core.somaxconn: 1024\n\
            read_only: true\nulimits:\n  nofile: {soft: 1024, hard: 2048}\n  nproc: 512\n\
            extra_hosts: [\"db:10.0.0.5\"]\ndns: 10.0.0.53\ndns_search: corp\n\
            dns_opt: [ndots:2]\nshm_size: 128M\n";
        let m = parse("svc.yaml", text).unwrap();
        let Manifest::Service(s) = &m[0] else {
            panic!("not a service")
        };
        assert_eq!(s.stop_signal.as_deref(), Some("SIGQUIT"));
        assert!(s.init && s.read_only);
        assert_eq!((s.cap_add.len(), s.cap_drop.len()), (1, 1));
        assert_eq!(s.sysctls["net.core.somaxconn"], "1024");
        assert_eq!(
            (s.ulimits["nofile"].soft, s.ulimits["nofile"].hard),
            (1024, 2048)
        );
        assert_eq!(
            (s.ulimits["nproc"].soft, s.ulimits["nproc"].hard),
            (512, 512)
        );
        assert_eq!(s.extra_hosts, ["db:10.0.0.5"]);
        assert_eq!(
            (s.dns.as_slice(), s.dns_search.as_slice()),
            (&["10.0.0.53".to_string()][..], &["corp".to_string()][..])
        );
        assert_eq!(s.shm_size, 128 << 20);
    }

    #[test]
    fn runtime_option_errors_name_line_and_field() {
        let head = "kind: Service\nname: a\nimage: x\n";
        for (tail, line, field, frag) in [
            (
                "cap_add:\n  - CHOWN\n  - FLY\n",
                6,
                "cap_add[1]",
                "not a Linux capability",
            ),
            (
                "sysctls:\n  kernel.pid_max: 10\n",
                4,
                "sysctls.kernel.pid_max",
                "namespaced",
            ),
            (
                "network_mode: host\nsysctls:\n  net.core.somaxconn: 1\n",
                5,
                "sysctls.net.core.somaxconn",
                "host",
            ),
            (
                "ulimits:\n  nofile: {soft: 1}\n",
                5,
                "ulimits.nofile",
                "soft and hard",
            ),
            (
                "ulimits:\n  nofile: {soft: 9, hard: 1}\n",
                4,
                "ulimits.nofile",
                "above the hard",
            ),
            ("stop_signal: SIGNOPE\n", 4, "stop_signal", "not a signal"),
            ("extra_hosts:\n  - db:x\n", 5, "extra_hosts[0]", "not an IP"),
            ("dns: [dns.google]\n", 4, "dns[0]", "not an IP"),
            ("shm_size: lots\n", 4, "shm_size", "unknown unit"),
            ("privileged: true\n", 4, "privileged", "cap_add"),
            ("read_only: yes please\n", 4, "read_only", "invalid type"),
        ] {
            let e = parse("svc.yaml", &format!("{head}{tail}")).unwrap_err();
            assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
            assert!(e.message.contains(frag), "{e}");
        }
    }
}

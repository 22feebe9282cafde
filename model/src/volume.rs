//! Volumes and mounts: what a service's containers see besides their image.
//!
//! A service lists `mounts:`, each one of three types (Docker's and compose's long syntax):
//! - `volume`: a named volume (`kind: Volume`, driver `local`), whose data lives on each host
//!   under `<agent data>/volumes/<name>/_data`, made when a task first mounts it there. A host's
//!   copy outlives the tasks and the services that used it, until the volume is removed. An
//!   empty copy first gets what the image holds at the target, as Docker does (`nocopy: true`
//!   leaves it empty).
//! - `bind`: a host path, which must exist on the host the task lands on (else the task is
//!   rejected there, saying so).
//! - `tmpfs`: memory, optionally capped (`tmpfs_size`, written like memory sizes: `64M`).
//!
//! Invariants:
//! - A volume is declared before any task mounts it: applying a service that names an
//!   undeclared volume declares it (as Docker does), in the same log entry, so every volume a
//!   current spec mounts is in the store.
//! - A volume some service's spec mounts cannot be removed. Removing one deletes it from the
//!   store; each agent then deletes its copy once no local container mounts it.
//! - Mount targets are absolute, normalised paths, each at most once per service.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// What a mount attaches at its target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountType {
    /// A named volume (`source` is its name).
    #[default]
    Volume,
    /// A path of the host (`source`, absolute).
    Bind,
    /// A filesystem in memory (no `source`).
    Tmpfs,
}

impl MountType {
    /// The lowercase name, as written in specs.
    pub fn as_str(self) -> &'static str {
        match self {
            MountType::Volume => "volume",
            MountType::Bind => "bind",
            MountType::Tmpfs => "tmpfs",
        }
    }
}

/// One entry of a service's `mounts:`. YAML: `{type: volume, source: data, target: /data}`;
/// `readonly: true` (compose's spelling `read_only` is accepted too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// `volume` (the default, as in `docker --mount`), `bind` or `tmpfs`.
    #[serde(rename = "type", default)]
    pub typ: MountType,
    /// The volume's name, or the host path of a bind mount; none for a tmpfs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// Absolute path inside the container.
    pub target: String,
    /// Mounted read-only: the container cannot write there.
    #[serde(default, alias = "read_only", skip_serializing_if = "is_false")]
    pub readonly: bool,
    /// tmpfs only: the most bytes it holds (0: the kernel's default, half the host's memory).
    /// Written like memory sizes: an integer, or `64M`, `1G`.
    #[serde(default, with = "crate::spec::bytes", skip_serializing_if = "is_zero")]
    pub tmpfs_size: u64,
    /// Volumes only: do not copy the image's files at the target into an empty volume
    /// (Docker's `volume-nocopy`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub nocopy: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Mount {
    /// The volume this mount names, if it is a volume mount.
    pub fn volume(&self) -> Option<&str> {
        (self.typ == MountType::Volume).then_some(self.source.as_str())
    }
}

/// `/a//b/./c/` → `/a/b/c`: the form targets are compared in.
pub fn normalize_path(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// Why `p` cannot be a mount path (target, or bind source), if it cannot.
fn path_problem(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return Some(format!("must be an absolute path (e.g. /data), not {p:?}"));
    }
    if p.split('/').any(|c| c == "..") {
        return Some(format!("{p:?}: '..' is not allowed in a mount path"));
    }
    if p.chars().any(|c| c.is_control()) {
        return Some(format!("{p:?}: control characters are not allowed"));
    }
    None
}

/// Checks a service's `mounts`; errors name the entry (`mounts[1].target`).
pub fn validate_mounts(mounts: &[Mount]) -> Result<(), ValidationError> {
    let mut targets: BTreeMap<String, usize> = BTreeMap::new();
    for (i, m) in mounts.iter().enumerate() {
        let field = |f: &str| format!("mounts[{i}].{f}");
        if let Some(why) = path_problem(&m.target) {
            return Err(ValidationError::new(field("target"), why));
        }
        let target = normalize_path(&m.target);
        if target == "/" {
            return Err(ValidationError::new(
                field("target"),
                "cannot mount over the container's root (\"/\")",
            ));
        }
        if let Some(first) = targets.insert(target.clone(), i) {
            return Err(ValidationError::new(
                field("target"),
                format!("{target:?} is already the target of mounts[{first}]"),
            ));
        }
        match m.typ {
            MountType::Volume => {
                if m.source.is_empty() {
                    return Err(ValidationError::new(
                        field("source"),
                        "a volume mount needs the volume's name",
                    ));
                }
                crate::slotvol::validate_source(&field("source"), &m.source)?;
            }
            MountType::Bind => {
                if m.source.is_empty() {
                    return Err(ValidationError::new(
                        field("source"),
                        "a bind mount needs the host path to mount",
                    ));
                }
                if let Some(why) = path_problem(&m.source) {
                    return Err(ValidationError::new(field("source"), why));
                }
            }
            MountType::Tmpfs => {
                if !m.source.is_empty() {
                    return Err(ValidationError::new(
                        field("source"),
                        "a tmpfs has no source (omit it)",
                    ));
                }
            }
        }
        if m.nocopy && m.typ != MountType::Volume {
            return Err(ValidationError::new(
                field("nocopy"),
                format!(
                    "only a volume is filled from the image (this mount is a {})",
                    m.typ.as_str()
                ),
            ));
        }
        if m.tmpfs_size > 0 && m.typ != MountType::Tmpfs {
            return Err(ValidationError::new(
                field("tmpfs_size"),
                format!(
                    "only a tmpfs has a size (this mount is a {})",
                    m.typ.as_str()
                ),
            ));
        }
    }
    Ok(())
}

/// Where a volume's data lives. Only `local`: a directory on each host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeDriver {
    /// A directory on each host.
    #[default]
    Local,
}

/// A declared volume (`kind: Volume`, `rctl volume create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// The volume's name, unique in the cluster.
    pub name: String,
    /// Where its data lives.
    #[serde(default)]
    pub driver: VolumeDriver,
    /// Free-form labels, for the user.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl VolumeSpec {
    /// The spec a service's mount declares implicitly.
    pub fn named(name: &str) -> VolumeSpec {
        VolumeSpec {
            name: name.to_string(),
            driver: VolumeDriver::Local,
            labels: BTreeMap::new(),
        }
    }

    /// Checks the name and label keys.
    pub fn validate(&self) -> Result<(), ValidationError> {
        crate::spec::validate_name("name", &self.name)?;
        for k in self.labels.keys() {
            if k.is_empty() || k.contains('=') || k.chars().any(char::is_whitespace) {
                return Err(ValidationError::new(
                    format!("labels.{k}"),
                    "label keys are non-empty, without '=' or spaces",
                ));
            }
        }
        Ok(())
    }
}

/// A volume in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// The spec as declared.
    pub spec: VolumeSpec,
    /// Milliseconds since the epoch, stamped by the leader.
    pub created_at: u64,
    /// Raft index of its last write: bumps on every change.
    pub version: u64,
    /// Per-slot volumes only (`source: "data-{{.Task.Slot}}"`, see `crate::slotvol`): the
    /// service slot that owns it and the node holding its data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<crate::slotvol::SlotOwner>,
}

/// Names of the volumes a service's spec mounts. A per-slot source (`data-{{.Task.Slot}}`) is
/// no name: each slot's volume is declared when its task is placed (`crate::slotvol`).
pub fn volumes_of(spec: &crate::ServiceSpec) -> impl Iterator<Item = &str> + '_ {
    spec.mounts
        .iter()
        .filter_map(Mount::volume)
        .filter(|v| !crate::slotvol::is_templated(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{parse, Manifest};

    fn m(typ: MountType, source: &str, target: &str) -> Mount {
        Mount {
            typ,
            source: source.into(),
            target: target.into(),
            readonly: false,
            tmpfs_size: 0,
            nocopy: false,
        }
    }

    #[test]
    fn mounts_are_checked_with_their_field() {
        use MountType::*;
        let ok = vec![
            m(Volume, "data", "/data"),
            m(Bind, "/etc", "/host/etc"),
            Mount {
                tmpfs_size: 64 << 20,
                ..m(Tmpfs, "", "/scratch")
            },
        ];
        validate_mounts(&ok).unwrap();
        let cases: Vec<(Vec<Mount>, &str, &str)> = vec![
            (
                vec![m(Volume, "a", "/a"), m(Volume, "b", "data")],
                "mounts[1].target",
                "must be an absolute path",
            ),
            (vec![m(Volume, "a", "/")], "mounts[0].target", "root"),
            (
                vec![m(Volume, "a", "/x/../etc")],
                "mounts[0].target",
                "'..'",
            ),
            (
                vec![m(Volume, "a", "/data"), m(Tmpfs, "", "/data/")],
                "mounts[1].target",
                "already the target of mounts[0]",
            ),
            (
                vec![m(Volume, "Bad_Name", "/d")],
                "mounts[0].source",
                "not a valid name",
            ),
            (
                vec![m(Volume, "", "/d")],
                "mounts[0].source",
                "needs the volume's name",
            ),
            (
                vec![m(Bind, "relative/path", "/d")],
                "mounts[0].source",
                "absolute path",
            ),
            (vec![m(Bind, "", "/d")], "mounts[0].source", "host path"),
            (vec![m(Tmpfs, "x", "/d")], "mounts[0].source", "no source"),
            (
                vec![Mount {
                    tmpfs_size: 1,
                    ..m(Volume, "a", "/d")
                }],
                "mounts[0].tmpfs_size",
                "only a tmpfs",
            ),
            (
                vec![Mount {
                    nocopy: true,
                    ..m(Bind, "/etc", "/d")
                }],
                "mounts[0].nocopy",
                "only a volume",
            ),
        ];
        for (mounts, field, frag) in cases {
            let e = validate_mounts(&mounts).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(frag), "{e}");
        }
    }

    #[test]
    fn mounts_parse_from_yaml_with_lines() {
        let text = "kind: Service\nname: a\nimage: x\nmounts:\n  - type: volume\n    source: data\n    target: /data\n  - {type: bind, source: /etc, target: /cfg, readonly: true}\n  - type: tmpfs\n    target: /tmp\n    tmpfs_size: 64M\n  - source: more\n    target: /more\n    read_only: true\n";
        let docs = parse("f.yaml", text).unwrap();
        let Manifest::Service(s) = &docs[0] else {
            panic!("not a service")
        };
        assert_eq!(s.mounts.len(), 4);
        assert_eq!(s.mounts[1].typ, MountType::Bind);
        assert!(s.mounts[1].readonly);
        assert_eq!(s.mounts[2].tmpfs_size, 64 << 20);
        assert_eq!(s.mounts[3].typ, MountType::Volume, "volume is the default");
        assert!(s.mounts[3].readonly, "compose's read_only is accepted");
        // JSON keeps the YAML names and omits defaults.
        let json = serde_json::to_value(&s.mounts).unwrap();
        assert_eq!(
            json[1],
            serde_json::json!({"type": "bind", "source": "/etc", "target": "/cfg", "readonly": true})
        );
        assert_eq!(
            json[2],
            serde_json::json!({"type": "tmpfs", "target": "/tmp", "tmpfs_size": 67108864})
        );
        let back: Vec<Mount> = serde_json::from_value(json).unwrap();
        assert_eq!(back, s.mounts);

        let head = "kind: Service\nname: a\nimage: x\n";
        let cases = [
            (
                "mounts:\n  - {source: a, target: /a}\n  - source: b\n    target: rel\n",
                7,
                "mounts[1].target",
                "must be an absolute path",
            ),
            (
                "mounts:\n  - type: nfs\n    target: /a\n",
                5,
                "mounts[0].type",
                "unknown variant",
            ),
            (
                "mounts:\n  - type: tmpfs\n    target: /a\n    tmpfs_size: 12X\n",
                7,
                "mounts[0].tmpfs_size",
                "unknown unit",
            ),
            (
                "mounts:\n  - type: bind\n    target: /a\n    size: 1\n",
                7,
                "mounts[0].size",
                "unknown field",
            ),
            (
                "replicas: 1\nmounts:\n- type: tmpfs\n  target: /a\n- type: tmpfs\n  source: x\n  target: /b\n",
                9,
                "mounts[1].source",
                "no source",
            ),
        ];
        for (tail, line, field, frag) in cases {
            let e = parse("svc.yaml", &format!("{head}{tail}")).unwrap_err();
            assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
            assert!(e.message.contains(frag), "{e}");
        }
    }

    #[test]
    fn volume_documents_parse_and_validate() {
        let docs = parse(
            "v.yaml",
            "kind: Volume\nname: data\nlabels:\n  team: a\n---\nkind: Volume\nname: plain\n",
        )
        .unwrap();
        let Manifest::Volume(v) = &docs[0] else {
            panic!("not a volume")
        };
        assert_eq!((v.name.as_str(), v.driver), ("data", VolumeDriver::Local));
        assert_eq!(v.labels["team"], "a");
        let e = parse("v.yaml", "kind: Volume\nname: d\ndriver: nfs\n").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "driver"), "{e}");
        assert!(e.message.contains("expected `local`"), "{e}");
        let e = parse("v.yaml", "kind: Volume\nname: Data\n").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "name"), "{e}");
    }

    #[test]
    fn mounts_affect_tasks() {
        let a = crate::spec::tests_support::spec("web", 1);
        let mut b = a.clone();
        b.mounts.push(m(MountType::Tmpfs, "", "/t"));
        assert!(!a.same_task_spec(&b));
        let mut c = b.clone();
        c.mounts[0].readonly = true;
        assert!(!b.same_task_spec(&c));
    }

    #[test]
    fn store_declares_refuses_and_removes_volumes() {
        use crate::store::{ApplyError, Command, NodeRole};
        let mut s = crate::Store::default();
        let mut i = 0;
        let mut apply = |s: &mut crate::Store, c: Command| {
            i += 1;
            s.apply(i, c)
        };
        let mut web = crate::spec::tests_support::spec("web", 1);
        web.mounts = vec![
            m(MountType::Volume, "data", "/data"),
            m(MountType::Tmpfs, "", "/tmp"),
        ];
        let put = |spec: &crate::ServiceSpec| Command::PutService {
            id: "s1".into(),
            spec: Box::new(spec.clone()),
            now: 5,
        };
        // Applying the service declares its volume.
        apply(&mut s, put(&web)).unwrap();
        assert_eq!(s.volumes["data"].spec, VolumeSpec::named("data"));
        assert_eq!(s.volumes["data"].created_at, 5);
        assert_eq!(s.volume_users("data"), vec!["web"]);
        // Declaring it explicitly changes its labels only.
        let mut labelled = VolumeSpec::named("data");
        labelled.labels.insert("team".into(), "a".into());
        apply(
            &mut s,
            Command::PutVolume {
                spec: labelled.clone(),
                now: 9,
            },
        )
        .unwrap();
        assert_eq!(s.volumes["data"].spec, labelled);
        assert_eq!(s.volumes["data"].created_at, 5);
        // In use: refused, naming the service.
        let e = apply(
            &mut s,
            Command::RemoveVolume {
                name: "data".into(),
            },
        )
        .unwrap_err();
        assert!(matches!(&e, ApplyError::Volume { message, .. } if message.contains("web")));
        // Agents report their copies; the listing names hosts.
        apply(
            &mut s,
            Command::PutNode {
                id: "n2".into(),
                hostname: "h2".into(),
                addr: "a".into(),
                labels: Default::default(),
                role: NodeRole::Worker,
                resources: Default::default(),
                now: 0,
                cert_not_after: 0,
                host_labels: Default::default(),
            },
        )
        .unwrap();
        apply(
            &mut s,
            Command::SetVolumeCopies {
                node: "n2".into(),
                volumes: vec!["data".into()],
            },
        )
        .unwrap();
        assert_eq!(
            crate::views::hosts_with_copy(&s, "data"),
            vec!["h2".to_string()]
        );
        // Once the service is gone (or no longer mounts it), it can be removed.
        let mut plain = web.clone();
        plain.mounts.remove(0);
        apply(&mut s, put(&plain)).unwrap();
        assert!(s.volume_users("data").is_empty());
        // A rollback to a spec that mounts a removed volume declares it again.
        apply(
            &mut s,
            Command::RemoveVolume {
                name: "data".into(),
            },
        )
        .unwrap();
        assert!(crate::views::declared_volumes(&s).is_empty());
        apply(
            &mut s,
            Command::Rollback {
                service: "web".into(),
                now: 20,
                reason: String::new(),
                if_spec_version: None,
            },
        )
        .unwrap();
        assert_eq!(s.volumes["data"].created_at, 20);
        apply(&mut s, Command::RemoveService { name: "web".into() }).unwrap();
        apply(
            &mut s,
            Command::RemoveVolume {
                name: "data".into(),
            },
        )
        .unwrap();
        assert!(matches!(
            apply(
                &mut s,
                Command::RemoveVolume {
                    name: "data".into()
                }
            ),
            Err(ApplyError::NotFound { kind: "volume", .. })
        ));
        apply(
            &mut s,
            Command::SetVolumeCopies {
                node: "n2".into(),
                volumes: vec![],
            },
        )
        .unwrap();
        assert!(s.volume_copies.is_empty());
    }

    #[test]
    fn paths_normalise() {
        assert_eq!(normalize_path("/a//b/./c/"), "/a/b/c");
        assert_eq!(normalize_path("/"), "/");
    }
}

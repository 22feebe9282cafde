//! Per-slot volumes: a volume mount whose source is templated on the task's slot
//! (`source: "data-{{.Task.Slot}}"`, Swarm's Go-template spelling, spaces inside the braces
//! allowed) gives each replica slot its own named volume: `data-1`, `data-2`, ...
//!
//! Semantics:
//! - A slot's volume is declared in the store when a task of the slot is first placed, owned by
//!   (service, slot) and pinned to the node it was placed on (`Volume::owner`). The agent makes
//!   the copy there on first use, as for any volume.
//! - Later tasks of the slot (restarts, rolling updates, scaling back up) are placed only on that
//!   node: the scheduler adds the pin as a filter, which explains itself like the others. If the
//!   node is down the slot stays pending with that reason.
//! - The operator releases a pin by removing the volume (`rctl volume rm data-1`), refused while
//!   a live task on a node mounts it. The slot's next task then goes anywhere and declares the
//!   volume again (empty) where it lands. The old node's agent deletes its copy once it sees the
//!   volume undeclared.
//! - Scaling down or removing the service keeps the volumes (as Docker keeps named volumes).
//!
//! Invariants: only `{{.Task.Slot}}` is a template field (anything else is refused, naming the
//! field); a templated source is never a volume name by itself (`volume::volumes_of` skips it),
//! so applying a service declares no per-slot volume; pins are read from the store only, so the
//! scheduler stays a pure function of its inputs.

use serde::{Deserialize, Serialize};

use crate::store::{Store, Task};
use crate::volume::{Mount, MountType};
use crate::ValidationError;

/// The one template field a mount source may use.
pub const SLOT_FIELD: &str = ".Task.Slot";

/// Which slot of which service a per-slot volume belongs to, and where its data is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotOwner {
    /// The service's name.
    pub service: String,
    /// The replica slot (1-based).
    pub slot: u64,
    /// The node the slot's first task was placed on, which holds the data: the slot's later
    /// tasks are placed only there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Why a source's template is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{{` without its `}}`.
    #[error("slotvol: unclosed template in {0:?} (expected {{{{.Task.Slot}}}})")]
    Unclosed(String),
    /// A field other than `.Task.Slot`.
    #[error(
        "slotvol: template field {0:?} is not supported in a volume source; only \
         {{{{.Task.Slot}}}} is (one volume per replica slot)"
    )]
    Field(String),
    /// More than one template.
    #[error("slotvol: {0:?} uses more than one template; use {{{{.Task.Slot}}}} once")]
    Repeated(String),
}

/// Splits a source around its slot template: `Some((prefix, suffix))`, or `None` when it has
/// no template.
pub fn parse(source: &str) -> Result<Option<(&str, &str)>, TemplateError> {
    let Some(open) = source.find("{{") else {
        if source.contains("}}") {
            return Err(TemplateError::Unclosed(source.to_string()));
        }
        return Ok(None);
    };
    let rest = &source[open + 2..];
    let close = rest
        .find("}}")
        .ok_or_else(|| TemplateError::Unclosed(source.to_string()))?;
    let field = rest[..close].trim();
    if field != SLOT_FIELD {
        return Err(TemplateError::Field(field.to_string()));
    }
    let suffix = &rest[close + 2..];
    if suffix.contains("{{") || suffix.contains("}}") {
        return Err(TemplateError::Repeated(source.to_string()));
    }
    Ok(Some((&source[..open], suffix)))
}

/// Whether a volume source is templated per slot.
pub fn is_templated(source: &str) -> bool {
    source.contains("{{")
}

/// The source as slot `slot` sees it (an untemplated or invalid source is returned as is).
pub fn render(source: &str, slot: u64) -> String {
    match parse(source) {
        Ok(Some((prefix, suffix))) => format!("{prefix}{slot}{suffix}"),
        _ => source.to_string(),
    }
}

/// Checks a templated volume source: a known field, and a valid volume name for every slot.
pub fn validate_source(field: &str, source: &str) -> Result<(), ValidationError> {
    match parse(source) {
        Err(e) => Err(ValidationError::new(
            field,
            e.to_string().trim_start_matches("slotvol: ").to_string(),
        )),
        Ok(None) => crate::spec::validate_name(field, source),
        // The longest slot (replicas are at most 10000) must still make a valid name.
        Ok(Some((prefix, suffix))) => {
            crate::spec::validate_name(field, &format!("{prefix}10000{suffix}")).map_err(|_| {
                ValidationError::new(
                    field,
                    format!(
                        "{source:?} does not make a valid volume name for each slot \
                         (lowercase letters, digits and '-', at most 63 characters)"
                    ),
                )
            })
        }
    }
}

/// Checks what the rest of the spec must be for per-slot volumes: a replicated service (a
/// global task has no slot).
pub fn validate_spec(spec: &crate::ServiceSpec) -> Result<(), ValidationError> {
    if spec.mode != crate::spec::ServiceMode::Replicated {
        if let Some(i) = spec
            .mounts
            .iter()
            .position(|m| m.typ == MountType::Volume && is_templated(&m.source))
        {
            return Err(ValidationError::new(
                format!("mounts[{i}].source"),
                "{{.Task.Slot}} needs a replicated service (a global task has no slot)",
            ));
        }
    }
    Ok(())
}

/// The task's mounts with per-slot sources rendered for its slot: what the agent mounts.
pub fn task_mounts(task: &Task) -> Vec<Mount> {
    task.spec
        .mounts
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if m.typ == MountType::Volume && is_templated(&m.source) {
                m.source = render(&m.source, task.slot);
            }
            m
        })
        .collect()
}

/// Names of the per-slot volumes a task mounts (rendered), in mount order.
pub fn slot_volumes(task: &Task) -> Vec<String> {
    if task.slot == 0 {
        return Vec::new();
    }
    task.spec
        .mounts
        .iter()
        .filter(|m| m.typ == MountType::Volume && is_templated(&m.source))
        .map(|m| render(&m.source, task.slot))
        .collect()
}

/// Where a pending task must go because a volume of its slot lives there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The volume that pins the slot.
    pub volume: String,
    /// The slot.
    pub slot: u64,
    /// The node holding the volume's data.
    pub node_id: String,
}

/// The pin of `task`, if a volume of its slot is owned by the slot and placed on a node.
pub fn pin(store: &Store, task: &Task) -> Option<Pin> {
    slot_volumes(task).into_iter().find_map(|name| {
        let owner = store.volumes.get(&name)?.owner.as_ref()?;
        let node_id = owner.node.clone()?;
        Some(Pin {
            volume: name,
            slot: task.slot,
            node_id,
        })
    })
}

/// A task that still uses volume `name` on a node (placed and not ended), as `rctl ps` names
/// it, with its node's hostname: removing the volume is refused meanwhile.
pub fn live_user(store: &Store, name: &str) -> Option<String> {
    store.tasks.values().find_map(|t| {
        let node = t.node_id.as_deref()?;
        let live = !t.status.state.is_terminal();
        (live && slot_volumes(t).iter().any(|v| v == name)).then(|| {
            let host = store.nodes.get(node).map_or(node, |n| n.hostname.as_str());
            format!("{} on {host}", t.name())
        })
    })
}

/// The volumes node `node` may keep a copy of: every declared one, except per-slot volumes
/// whose data is on another node (so a copy left behind by a released pin is deleted there).
pub fn declared_for(store: &Store, node: &str) -> std::collections::BTreeSet<String> {
    store
        .volumes
        .values()
        .filter(|v| {
            v.owner
                .as_ref()
                .and_then(|o| o.node.as_deref())
                .is_none_or(|n| n == node)
        })
        .map(|v| v.spec.name.clone())
        .collect()
}

impl Store {
    /// Task `task_id` was placed: declare its slot's volumes not declared yet, owned by the
    /// slot and pinned to the task's node, and pin those declared without a node.
    pub(crate) fn claim_slot_volumes(&mut self, index: u64, task_id: &str, now: u64) {
        let Some(t) = self.tasks.get(task_id) else {
            return;
        };
        let Some(node) = t.node_id.clone() else {
            return;
        };
        let (service, slot) = (t.service_name.clone(), t.slot);
        for name in slot_volumes(t) {
            let owner = || SlotOwner {
                service: service.clone(),
                slot,
                node: Some(node.clone()),
            };
            match self.volumes.get(&name) {
                None => {
                    self.volumes.insert(
                        name.clone(),
                        crate::volume::Volume {
                            spec: crate::volume::VolumeSpec::named(&name),
                            created_at: now,
                            version: index,
                            owner: Some(owner()),
                        },
                    );
                }
                Some(v) => {
                    // Already pinned: kept. Declared by hand and mounted whole by some service:
                    // shared, not the slot's, so never pinned.
                    let pinned = v.owner.as_ref().is_some_and(|o| o.node.is_some());
                    let shared = v.owner.is_none() && !self.volume_users(&name).is_empty();
                    if !pinned && !shared {
                        if let Some(v) = self.volumes.get_mut(&name) {
                            v.owner = Some(owner());
                            v.version = index;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Command, NodeRole};

    #[test]
    fn templates_parse_render_and_refuse() {
        type Want = Result<Option<(&'static str, &'static str)>, &'static str>;
        let cases: Vec<(&str, Want)> = vec![
            ("data", Ok(None)),
            ("data-{{.Task.Slot}}", Ok(Some(("data-", "")))),
            ("data-{{ .Task.Slot }}-x", Ok(Some(("data-", "-x")))),
            ("{{.Task.Slot}}", Ok(Some(("", "")))),
            ("data-{{.Task.ID}}", Err(".Task.ID")),
            ("data-{{.Node.Hostname}}", Err(".Node.Hostname")),
            ("data-{{.Task.Slot", Err("unclosed")),
            ("data-}}", Err("unclosed")),
            ("{{.Task.Slot}}-{{.Task.Slot}}", Err("more than one")),
        ];
        for (src, want) in cases {
            match (parse(src), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{src}"),
                (Err(e), Err(frag)) => assert!(e.to_string().contains(frag), "{src}: {e}"),
                (got, want) => panic!("{src}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(render("data-{{ .Task.Slot }}", 3), "data-3");
        assert_eq!(render("plain", 3), "plain");
    }

    #[test]
    fn sources_validate_with_the_field() {
        let cases = [
            ("data-{{.Task.Slot}}", None),
            ("data-{{ .Task.Slot }}", None),
            ("data-{{.Task.Name}}", Some("template field \".Task.Name\"")),
            ("Data-{{.Task.Slot}}", Some("valid volume name")),
            (
                "data-{{.Task.Slot}}-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                Some("valid volume name"),
            ),
            ("data", None),
            ("Bad", Some("not a valid name")),
        ];
        for (src, want) in cases {
            let got = validate_source("mounts[0].source", src);
            match want {
                None => assert!(got.is_ok(), "{src}: {got:?}"),
                Some(frag) => {
                    let e = got.unwrap_err();
                    assert_eq!(e.field, "mounts[0].source");
                    assert!(e.message.contains(frag), "{src}: {e}");
                }
            }
        }
        // Through the manifest: the error names the field and the line.
        let e = crate::manifest::parse(
            "s.yaml",
            "kind: Service\nname: db\nimage: x\nmounts:\n  - source: \"d-{{.Task.ID}}\"\n    target: /d\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "mounts[0].source", "{e}");
        assert!(e.message.contains(".Task.ID"), "{e}");
        let mut g = crate::spec::tests_support::spec("db", 1);
        g.mode = crate::spec::ServiceMode::Global;
        g.mounts = vec![mount("d-{{.Task.Slot}}")];
        let e = g.validate().unwrap_err();
        assert!(e.message.contains("replicated"), "{e}");
    }

    fn mount(source: &str) -> Mount {
        Mount {
            typ: MountType::Volume,
            source: source.into(),
            target: "/d".into(),
            readonly: false,
            tmpfs_size: 0,
            nocopy: false,
        }
    }

    fn node(s: &mut Store, idx: &mut u64, id: &str) {
        *idx += 1;
        s.apply(
            *idx,
            Command::PutNode {
                id: id.into(),
                hostname: format!("h-{id}"),
                addr: format!("a-{id}"),
                labels: Default::default(),
                role: NodeRole::Worker,
                resources: Default::default(),
                now: 0,
                cert_not_after: 0,
                host_labels: Default::default(),
            },
        )
        .unwrap();
    }

    #[test]
    fn slot_volumes_are_declared_on_placement_and_pin_the_slot() {
        let (mut s, mut idx) = (Store::default(), 0);
        node(&mut s, &mut idx, "n1");
        node(&mut s, &mut idx, "n2");
        let mut db = crate::spec::tests_support::spec("db", 2);
        db.mounts = vec![mount("data-{{.Task.Slot}}")];
        idx += 1;
        s.apply(
            idx,
            Command::PutService {
                id: "s1".into(),
                spec: Box::new(db),
                now: 1,
            },
        )
        .unwrap();
        assert!(
            s.volumes.is_empty(),
            "a template declares nothing by itself"
        );
        // Converge: two tasks, placed, each slot's volume declared where it landed.
        let mut ids = 0;
        let mut now = 10;
        let mut step = |s: &mut Store, idx: &mut u64, now: u64| {
            let cmd = crate::reconcile::plan_pass(s, now, &mut || {
                ids += 1;
                format!("t{ids}")
            });
            if let Some(c) = cmd {
                *idx += 1;
                s.apply(*idx, c).unwrap();
            }
        };
        step(&mut s, &mut idx, now);
        let placed: Vec<(u64, String)> = s
            .tasks
            .values()
            .map(|t| (t.slot, t.node_id.clone().unwrap()))
            .collect();
        assert_eq!(placed.len(), 2);
        for (slot, n) in &placed {
            let v = &s.volumes[&format!("data-{slot}")];
            assert_eq!(
                v.owner,
                Some(SlotOwner {
                    service: "db".into(),
                    slot: *slot,
                    node: Some(n.clone())
                })
            );
        }
        let slot1_node = placed.iter().find(|p| p.0 == 1).unwrap().1.clone();
        // Removing the volume is refused while slot 1's task lives on its node.
        idx += 1;
        let e = s
            .apply(
                idx,
                Command::RemoveVolume {
                    name: "data-1".into(),
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("db.1"), "{e}");
        // Slot 1's node goes down: the replacement stays pending, saying why.
        idx += 1;
        s.apply(
            idx,
            Command::NodeDown {
                id: slot1_node.clone(),
                now,
            },
        )
        .unwrap();
        now += 1000;
        step(&mut s, &mut idx, now);
        let pending: Vec<&Task> = s
            .tasks
            .values()
            .filter(|t| t.slot == 1 && t.node_id.is_none())
            .collect();
        assert_eq!(pending.len(), 1);
        let why = &pending[0].status.message;
        assert!(
            why.contains("volume data-1") && why.contains("rctl volume rm data-1"),
            "{why}"
        );
        assert!(why.contains("1 node down"), "{why}");
        // The operator releases the pin: the slot goes elsewhere with a new volume there.
        idx += 1;
        s.apply(
            idx,
            Command::RemoveVolume {
                name: "data-1".into(),
            },
        )
        .unwrap();
        now += 1000;
        step(&mut s, &mut idx, now);
        let t1 = s
            .tasks
            .values()
            .find(|t| t.slot == 1 && t.desired_state == crate::TaskState::Running)
            .unwrap();
        let other = t1.node_id.clone().unwrap();
        assert_ne!(other, slot1_node);
        assert_eq!(
            s.volumes["data-1"].owner.as_ref().unwrap().node,
            Some(other)
        );
    }

    #[test]
    fn task_mounts_render_the_slot() {
        let mut spec = crate::spec::tests_support::spec("db", 1);
        spec.mounts = vec![mount("data-{{ .Task.Slot }}"), mount("shared")];
        spec.mounts[1].target = "/s".into();
        let t = Task {
            id: "t".into(),
            service_id: "s".into(),
            service_name: "db".into(),
            slot: 4,
            spec: spec.into(),
            spec_version: 1,
            node_id: None,
            target_node: None,
            desired_state: crate::TaskState::Running,
            status: crate::TaskStatus {
                state: crate::TaskState::Pending,
                message: String::new(),
                error: String::new(),
                container_id: String::new(),
                exit_code: None,
                timestamp: 0,
            },
            running_at: None,
            stop_requested_at: None,
            networks: Vec::new(),
            created_at: 0,
            version: 0,
            image_digest: None,
        };
        let m = task_mounts(&t);
        assert_eq!(m[0].source, "data-4");
        assert_eq!(m[1].source, "shared");
        assert_eq!(slot_volumes(&t), vec!["data-4".to_string()]);
    }
}

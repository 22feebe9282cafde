//! Stacks: a compose application as one object of the replicated store, so that `rctl stack
//! rollback` returns the whole application to the version deployed before, and `rctl stack
//! ls|ps|services` read what was deployed rather than guessing from labels.
//!
//! A stack keeps its current version (the resolved manifests as deployed: services, networks,
//! volumes, and its secrets and configs by name and digest; values stay in their own objects)
//! and the version before it. Deploying a version that differs makes the current one the
//! previous one; rolling back swaps them.
//!
//! Invariants:
//! - Pure: plans take the store, `now` and an id source, and return one command (a batch that
//!   changes the objects and records the stack in the same log entry).
//! - A deploy removes the services of the stack's current version that the new version no
//!   longer declares (so that a rollback can re-create them); networks, volumes, secrets and
//!   configs are never removed by a deploy (tasks may still hold them; `stack rm` removes them).
//! - A stack version is at most [`MAX_STACK_BYTES`] of JSON and [`MAX_STACK_OBJECTS`] objects.

use serde::{Deserialize, Serialize};

use crate::apply::{self, ApplyResult, Manifests};
use crate::network::NetworkSpec;
use crate::secret::ObjectKind;
use crate::spec::ServiceSpec;
use crate::store::{ApplyError, Command, Store};
use crate::volume::VolumeSpec;

/// Largest stack version (its JSON), checked by the API and again when applied.
pub const MAX_STACK_BYTES: usize = 1 << 20;
/// Most objects (services, networks, volumes, secrets and configs) in one stack version.
pub const MAX_STACK_OBJECTS: usize = 1000;

/// A secret or config of a stack version: its value lives in its own object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Secret or config.
    pub kind: ObjectKind,
    /// Its name.
    pub name: String,
    /// `sha256:<hex>` of the value deployed.
    pub digest: String,
}

/// What one deploy declared: the resolved manifests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackSpec {
    /// Services, as given (references unresolved).
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Networks.
    #[serde(default)]
    pub networks: Vec<NetworkSpec>,
    /// Volumes declared explicitly.
    #[serde(default)]
    pub volumes: Vec<VolumeSpec>,
    /// Secrets and configs, by name and digest.
    #[serde(default)]
    pub objects: Vec<ObjectRef>,
}

impl StackSpec {
    /// The version `m` declares (secret values left out).
    pub fn of(m: &Manifests) -> StackSpec {
        StackSpec {
            services: m.services.clone(),
            networks: m.networks.clone(),
            volumes: m.volumes.clone(),
            objects: m
                .secrets
                .iter()
                .map(|s| ObjectRef {
                    kind: s.kind,
                    name: s.name.clone(),
                    digest: s.digest.clone(),
                })
                .collect(),
        }
    }

    /// Whether `name` is one of its services.
    pub fn has_service(&self, name: &str) -> bool {
        self.services.iter().any(|s| s.name == name)
    }

    /// Refuses a version over the limits.
    pub fn check(&self, stack: &str) -> Result<(), StackError> {
        let count =
            self.services.len() + self.networks.len() + self.volumes.len() + self.objects.len();
        if count > MAX_STACK_OBJECTS {
            return Err(StackError::TooLarge {
                name: stack.to_string(),
                what: format!("{count} objects (at most {MAX_STACK_OBJECTS})"),
            });
        }
        let bytes = serde_json::to_vec(self)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if bytes > MAX_STACK_BYTES {
            return Err(StackError::TooLarge {
                name: stack.to_string(),
                what: format!("{bytes} bytes of manifests (at most {MAX_STACK_BYTES})"),
            });
        }
        Ok(())
    }
}

/// One deployed version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackVersion {
    /// Raft index of the deploy (or rollback) that put it in force.
    pub version: u64,
    /// Milliseconds since the epoch, stamped by the leader.
    pub deployed_at: u64,
    /// What it declared.
    pub spec: StackSpec,
}

/// A stack in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stack {
    /// Its name (a Rudder name; its objects carry `rudder.stack=NAME`).
    pub name: String,
    /// The version in force.
    pub current: StackVersion,
    /// The version deployed before it, which `rctl stack rollback` returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<StackVersion>,
    /// Milliseconds since the epoch, stamped by the leader.
    pub created_at: u64,
    /// Raft index of its last write.
    pub version: u64,
}

/// Why a stack operation is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StackError {
    /// No such stack object.
    #[error("stack: {0:?} not found (see `rctl stack ls`)")]
    NotFound(String),
    /// Rollback with nothing to return to.
    #[error("stack: {0:?} has no previous version to roll back to")]
    NoPrevious(String),
    /// Over [`MAX_STACK_BYTES`] or [`MAX_STACK_OBJECTS`].
    #[error("stack: {name:?} is too large: {what}")]
    TooLarge {
        /// The stack.
        name: String,
        /// What is over which limit.
        what: String,
    },
    /// Services that depend on one another in a circle.
    #[error("stack: {name:?}: dependency cycle: {cycle}")]
    Cycle {
        /// The stack.
        name: String,
        /// The services, `a -> b -> a`.
        cycle: String,
    },
    /// A bad stack name.
    #[error("stack: name {0:?} must be 1-63 lowercase letters, digits or '-'")]
    BadName(String),
    /// The objects' commands were refused by the store (checked on a copy).
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// What a deploy or rollback does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackPlan {
    /// Per object, as `rctl apply` reports them.
    pub results: Vec<ApplyResult>,
    /// Services of the stack's version in force that the new version drops (removed).
    pub removed: Vec<String>,
    /// The one command to propose (objects, removals, then the stack record).
    pub command: Command,
}

/// Checks a stack name (as service names: a DNS label).
pub fn check_name(name: &str) -> Result<(), StackError> {
    crate::spec::validate_name("stack", name).map_err(|_| StackError::BadName(name.to_string()))
}

/// `rctl stack deploy NAME`: applies `m` as `rctl apply` does, removes the services the
/// version in force has and `m` no longer declares, and records `m` as the stack's version.
pub fn deploy_plan(
    store: &Store,
    name: &str,
    m: Manifests,
    now: u64,
    new_id: &mut dyn FnMut() -> String,
) -> Result<StackPlan, StackError> {
    check_name(name)?;
    let spec = StackSpec::of(&m);
    spec.check(name)?;
    if let Some(cycle) = crate::depends::find_cycle(&spec.services) {
        return Err(StackError::Cycle {
            name: name.to_string(),
            cycle: cycle.join(" -> "),
        });
    }
    let record = |spec| Command::PutStack {
        name: name.to_string(),
        spec: Box::new(spec),
        now,
    };
    plan_to(store, name, m, spec, record, now, new_id)
}

/// `rctl stack rollback NAME`: returns every object to the previous version (changed services
/// reverted, added ones removed, removed ones re-created) and swaps the stack's versions.
/// Secrets and configs keep their latest values (a stack keeps digests, not values).
pub fn rollback_plan(
    store: &Store,
    name: &str,
    now: u64,
    new_id: &mut dyn FnMut() -> String,
) -> Result<StackPlan, StackError> {
    let stack = store
        .stacks
        .get(name)
        .ok_or_else(|| StackError::NotFound(name.to_string()))?;
    let prev = stack
        .previous
        .as_ref()
        .ok_or_else(|| StackError::NoPrevious(name.to_string()))?;
    let m = Manifests {
        secrets: Vec::new(),
        networks: prev.spec.networks.clone(),
        volumes: prev.spec.volumes.clone(),
        services: prev.spec.services.clone(),
    };
    plan_to(
        store,
        name,
        m,
        prev.spec.clone(),
        |_| Command::RollbackStack {
            name: name.to_string(),
            now,
        },
        now,
        new_id,
    )
}

/// The plan that brings the stack's objects to `m` (whose record is `spec`), ending with the
/// command `record` makes of `spec`.
fn plan_to(
    store: &Store,
    name: &str,
    m: Manifests,
    spec: StackSpec,
    record: impl FnOnce(StackSpec) -> Command,
    now: u64,
    new_id: &mut dyn FnMut() -> String,
) -> Result<StackPlan, StackError> {
    let p = apply::plan(store, m, now, new_id)?;
    let mut cmds = match p.command {
        Some(Command::Batch(c)) => c,
        Some(c) => vec![c],
        None => Vec::new(),
    };
    let removed: Vec<String> = store
        .stacks
        .get(name)
        .map(|s| {
            s.current
                .spec
                .services
                .iter()
                .filter(|svc| !spec.has_service(&svc.name))
                .filter(|svc| store.services.contains_key(&svc.name))
                .map(|svc| svc.name.clone())
                .collect()
        })
        .unwrap_or_default();
    for r in &removed {
        cmds.push(Command::RemoveService { name: r.clone() });
    }
    cmds.push(record(spec));
    Ok(StackPlan {
        results: p.results,
        removed,
        command: Command::Batch(cmds),
    })
}

/// `rctl stack rm NAME`: removes the stack's services and its record (its networks, secrets and
/// configs are removed by the client once no task holds them). `None` when there is no record.
pub fn remove_plan(store: &Store, name: &str) -> Option<(Vec<String>, Command)> {
    let stack = store.stacks.get(name)?;
    let services: Vec<String> = stack
        .current
        .spec
        .services
        .iter()
        .map(|s| s.name.clone())
        .filter(|s| store.services.contains_key(s))
        .collect();
    let mut cmds: Vec<Command> = services
        .iter()
        .map(|s| Command::RemoveService { name: s.clone() })
        .collect();
    cmds.push(Command::RemoveStack {
        name: name.to_string(),
    });
    Some((services, Command::Batch(cmds)))
}

/// Applies `PutStack` to `store` at `index`: a version that differs from the one in force
/// replaces it, which becomes the previous one.
pub(crate) fn put(
    store: &mut Store,
    index: u64,
    name: String,
    spec: StackSpec,
    now: u64,
) -> Result<(), ApplyError> {
    spec.check(&name).map_err(|e| ApplyError::Stack {
        name: name.clone(),
        message: e.to_string(),
    })?;
    let fresh = StackVersion {
        version: index,
        deployed_at: now,
        spec,
    };
    match store.stacks.get_mut(&name) {
        Some(s) if s.current.spec == fresh.spec => {}
        Some(s) => {
            s.previous = Some(std::mem::replace(&mut s.current, fresh));
            s.version = index;
        }
        None => {
            store.stacks.insert(
                name.clone(),
                Stack {
                    name,
                    current: fresh,
                    previous: None,
                    created_at: now,
                    version: index,
                },
            );
        }
    }
    Ok(())
}

/// Applies `RollbackStack`: the previous version is in force again (as of `index`), and the
/// one rolled back from becomes the previous one.
pub(crate) fn rollback(
    store: &mut Store,
    index: u64,
    name: &str,
    now: u64,
) -> Result<(), ApplyError> {
    let s = store
        .stacks
        .get_mut(name)
        .ok_or_else(|| ApplyError::NotFound {
            kind: "stack",
            name: name.to_string(),
        })?;
    let mut back = s.previous.take().ok_or_else(|| ApplyError::Stack {
        name: name.to_string(),
        message: "no previous version to roll back to".into(),
    })?;
    back.version = index;
    back.deployed_at = now;
    s.previous = Some(std::mem::replace(&mut s.current, back));
    s.version = index;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{Action, Kind};

    fn svc(name: &str, image: &str) -> ServiceSpec {
        serde_json::from_value(serde_json::json!({"name": name, "image": image})).unwrap()
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id{n}")
        }
    }

    fn run(store: &mut Store, p: StackPlan) {
        let index = store.applied + 1;
        store.apply(index, p.command).unwrap();
    }

    fn deploy(store: &mut Store, services: Vec<ServiceSpec>) -> StackPlan {
        let m = Manifests {
            services,
            ..Default::default()
        };
        let p = deploy_plan(store, "shop", m, 5, &mut ids()).unwrap();
        run(store, p.clone());
        p
    }

    fn images(store: &Store) -> Vec<(String, String)> {
        store
            .services
            .values()
            .map(|s| (s.spec.name.clone(), s.spec.image.clone()))
            .collect()
    }

    #[test]
    fn rollback_reverts_changed_removes_added_and_recreates_removed_services() {
        let mut store = Store::default();
        deploy(&mut store, vec![svc("web", "web:1"), svc("db", "db:1")]);
        let v1 = store.stacks["shop"].current.version;
        assert!(store.stacks["shop"].previous.is_none());

        // v2: web changed, db dropped, cache added.
        let p = deploy(&mut store, vec![svc("web", "web:2"), svc("cache", "c:1")]);
        assert_eq!(p.removed, vec!["db".to_string()]);
        assert_eq!(
            images(&store),
            vec![
                ("cache".into(), "c:1".into()),
                ("web".into(), "web:2".into())
            ]
        );
        let s = &store.stacks["shop"];
        assert_eq!(s.previous.as_ref().map(|p| p.version), Some(v1));
        assert!(s.current.version > v1);

        let p = rollback_plan(&store, "shop", 9, &mut ids()).unwrap();
        assert_eq!(p.removed, vec!["cache".to_string()]);
        let created: Vec<_> = p
            .results
            .iter()
            .filter(|r| r.kind == Kind::Service)
            .map(|r| (r.name.as_str(), r.action))
            .collect();
        assert_eq!(
            created,
            vec![("web", Action::Updated), ("db", Action::Created)]
        );
        run(&mut store, p);
        assert_eq!(
            images(&store),
            vec![("db".into(), "db:1".into()), ("web".into(), "web:1".into())]
        );
        let s = &store.stacks["shop"];
        assert!(s.current.spec.has_service("db") && !s.current.spec.has_service("cache"));
        assert!(s.previous.as_ref().unwrap().spec.has_service("cache"));

        // Rolling back again returns to v2 (a rollback is a version like any other).
        let p = rollback_plan(&store, "shop", 10, &mut ids()).unwrap();
        run(&mut store, p);
        assert_eq!(
            images(&store),
            vec![
                ("cache".into(), "c:1".into()),
                ("web".into(), "web:2".into())
            ]
        );
    }

    #[test]
    fn an_unchanged_deploy_keeps_the_previous_version() {
        let mut store = Store::default();
        deploy(&mut store, vec![svc("web", "web:1")]);
        deploy(&mut store, vec![svc("web", "web:2")]);
        let before = store.stacks["shop"].clone();
        let p = deploy(&mut store, vec![svc("web", "web:2")]);
        assert!(p.results.iter().all(|r| r.action == Action::Unchanged));
        let after = &store.stacks["shop"];
        assert_eq!(after.current, before.current);
        assert_eq!(after.previous, before.previous);
    }

    #[test]
    fn refusals_name_the_stack() {
        let mut store = Store::default();
        assert_eq!(
            rollback_plan(&store, "shop", 1, &mut ids()).unwrap_err(),
            StackError::NotFound("shop".into())
        );
        deploy(&mut store, vec![svc("web", "web:1")]);
        assert_eq!(
            rollback_plan(&store, "shop", 1, &mut ids()).unwrap_err(),
            StackError::NoPrevious("shop".into())
        );
        let bad = deploy_plan(&store, "Shop_1", Manifests::default(), 1, &mut ids());
        assert!(matches!(bad, Err(StackError::BadName(_))));
        let many = Manifests {
            services: (0..=MAX_STACK_OBJECTS)
                .map(|i| svc(&format!("s{i}"), "x"))
                .collect(),
            ..Default::default()
        };
        let err = deploy_plan(&store, "big", many, 1, &mut ids()).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        let huge = Manifests {
            services: vec![svc("s", &"x".repeat(MAX_STACK_BYTES))],
            ..Default::default()
        };
        let err = deploy_plan(&store, "big", huge, 1, &mut ids()).unwrap_err();
        assert!(err.to_string().contains("bytes"), "{err}");
        let mut a = svc("a", "x");
        let mut b = svc("b", "x");
        let on = |s: &str| crate::depends::Dependency {
            service: s.into(),
            condition: Default::default(),
            required: true,
        };
        a.depends_on = vec![on("b")];
        b.depends_on = vec![on("a")];
        let circle = Manifests {
            services: vec![a, b],
            ..Default::default()
        };
        let err = deploy_plan(&store, "loop", circle, 1, &mut ids()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "stack: \"loop\": dependency cycle: a -> b -> a"
        );
    }

    #[test]
    fn remove_takes_the_services_and_the_record() {
        let mut store = Store::default();
        deploy(&mut store, vec![svc("web", "web:1"), svc("db", "db:1")]);
        let (services, cmd) = remove_plan(&store, "shop").unwrap();
        assert_eq!(services, vec!["web".to_string(), "db".to_string()]);
        let index = store.applied + 1;
        store.apply(index, cmd).unwrap();
        assert!(store.stacks.is_empty() && store.services.is_empty());
        assert!(remove_plan(&store, "shop").is_none());
    }

    #[test]
    fn a_store_written_before_stacks_existed_loads() {
        let mut store = Store::default();
        deploy(&mut store, vec![svc("web", "web:1")]);
        let mut json = serde_json::to_value(&store).unwrap();
        json.as_object_mut().unwrap().remove("stacks");
        let old: Store = serde_json::from_value(json).unwrap();
        assert!(old.stacks.is_empty());
        assert!(old.services.contains_key("web"));
        // And an empty stack table is not written, so older builds read newer stores too.
        let empty = serde_json::to_value(Store::default()).unwrap();
        assert!(empty.get("stacks").is_none());
    }
}

//! `rctl apply` as a plan: what a set of manifests changes in the store (created, updated,
//! unchanged per object) and the one command that makes the change.
//!
//! Invariants:
//! - The rules live in the state machine only: the plan is checked by applying its commands to
//!   a copy of the store (imbl shares the copy's structure, so it is cheap), so the API refuses
//!   exactly what `Store::apply` would, with the store's message.
//! - Pure: no clock, randomness or I/O; `now` and new ids are given by the caller (the leader).
//! - A file is applied whole: one `Command::Batch`, secrets and configs first, then networks
//!   and volumes, then services (which may use any of them).

use std::collections::BTreeMap;

use crate::network::NetworkSpec;
use crate::secret::{ObjectKind, SecretData};
use crate::spec::ServiceSpec;
use crate::store::{ApplyError, Command, Store};
use crate::volume::{volumes_of, VolumeSpec};

/// What `rctl apply` sends: every document of the files, decoded and validated on their own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifests {
    /// Secrets and configs, applied first (services reference them).
    pub secrets: Vec<SecretPut>,
    /// Networks, applied before the services that attach to them.
    pub networks: Vec<NetworkSpec>,
    /// Volumes declared explicitly.
    pub volumes: Vec<VolumeSpec>,
    /// Services, applied last.
    pub services: Vec<ServiceSpec>,
}

/// A secret or config value to store (a new version when it differs from the latest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretPut {
    /// Secret or config.
    pub kind: ObjectKind,
    /// Its name.
    pub name: String,
    /// Its labels (replaced on every put).
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub data: SecretData,
    /// `sha256:<hex>` of `data`, computed by the caller (the model has no hash functions).
    pub digest: String,
}

/// What applying an object does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The object did not exist.
    Created,
    /// The object existed and changes.
    Updated,
    /// The object is as declared already.
    Unchanged,
}

impl Action {
    /// The lowercase word `rctl apply` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Updated => "updated",
            Action::Unchanged => "unchanged",
        }
    }
}

/// The kinds of document a manifest holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `kind: Secret`.
    Secret,
    /// `kind: Config`.
    Config,
    /// `kind: Network`.
    Network,
    /// `kind: Volume`.
    Volume,
    /// `kind: Service`.
    Service,
}

impl Kind {
    /// As in a manifest's `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Secret => "Secret",
            Kind::Config => "Config",
            Kind::Network => "Network",
            Kind::Volume => "Volume",
            Kind::Service => "Service",
        }
    }
}

/// One object of the apply and what happens to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyResult {
    /// What kind of object.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// What applying does to it.
    pub action: Action,
    /// For an updated service, network or volume: the fields that change (JSON form of the
    /// spec, see [`crate::diff`]). Empty otherwise (a secret's value is never shown).
    pub changes: Vec<crate::diff::Change>,
}

/// The field changes from `old` to `new` in their JSON form.
fn spec_changes<T: serde::Serialize>(old: &T, new: &T) -> Vec<crate::diff::Change> {
    let json = |v: &T| serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
    crate::diff::diff(&json(old), &json(new))
}

/// What an apply does: one result per object (volumes the services mount and nobody declared
/// included, as created), and the command to propose (`None` when nothing changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// One per object, in apply order.
    pub results: Vec<ApplyResult>,
    /// The command to propose; `None` when nothing changes.
    pub command: Option<Command>,
}

/// What storing `put` would do to its object.
pub fn secret_action(store: &Store, put: &SecretPut) -> Action {
    match store.objects(put.kind).get(&put.name) {
        None => Action::Created,
        Some(o)
            if o.labels == put.labels
                && o.versions.get(&o.latest).map(|v| &v.data) == Some(&put.data) =>
        {
            Action::Unchanged
        }
        Some(_) => Action::Updated,
    }
}

/// The command that stores `put`.
pub fn secret_command(put: SecretPut, now: u64) -> Command {
    Command::PutSecret {
        kind: put.kind,
        name: put.name,
        labels: put.labels,
        data: put.data,
        digest: put.digest,
        now,
    }
}

/// Plans an apply of `m` against `store`, and checks it by applying it to a copy: the first
/// command the state machine refuses is the error.
pub fn plan(
    store: &Store,
    m: Manifests,
    now: u64,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Plan, ApplyError> {
    let mut results = Vec::new();
    let mut cmds = Vec::new();
    let mut push = |kind: Kind, name: &str, action: Action, changes| {
        results.push(ApplyResult {
            kind,
            name: name.to_string(),
            action,
            changes,
        })
    };
    for put in m.secrets {
        let kind = match put.kind {
            ObjectKind::Secret => Kind::Secret,
            ObjectKind::Config => Kind::Config,
        };
        let action = secret_action(store, &put);
        push(kind, &put.name, action, Vec::new());
        if action != Action::Unchanged {
            cmds.push(secret_command(put, now));
        }
    }
    for spec in m.networks {
        let (action, changes) = match store.networks.get(&spec.name) {
            None => (Action::Created, Vec::new()),
            Some(n) if n.spec.labels == spec.labels && n.spec.same_shape(&spec) => {
                (Action::Unchanged, Vec::new())
            }
            Some(n) => (Action::Updated, spec_changes(&n.spec, &spec)),
        };
        push(Kind::Network, &spec.name, action, changes);
        if action != Action::Unchanged {
            cmds.push(Command::PutNetwork {
                id: new_id(),
                spec,
                now,
            });
        }
    }
    for spec in &m.volumes {
        let (action, changes) = match store.volumes.get(&spec.name) {
            None => (Action::Created, Vec::new()),
            Some(v) if v.spec == *spec => (Action::Unchanged, Vec::new()),
            Some(v) => (Action::Updated, spec_changes(&v.spec, spec)),
        };
        push(Kind::Volume, &spec.name, action, changes);
        if action != Action::Unchanged {
            cmds.push(Command::PutVolume {
                spec: spec.clone(),
                now,
            });
        }
    }
    // Volumes the services mount that neither exist nor come in this apply: their service's
    // `PutService` declares them (as Docker does); reported as created.
    let mut implicit: Vec<&str> = Vec::new();
    for svc in &m.services {
        for v in volumes_of(svc) {
            if !store.volumes.contains_key(v)
                && !m.volumes.iter().any(|d| d.name == v)
                && !implicit.contains(&v)
            {
                implicit.push(v);
            }
        }
    }
    for v in implicit {
        push(Kind::Volume, v, Action::Created, Vec::new());
    }
    // Checked against the store as it will be once the objects above are in it.
    let mut dry = store.clone();
    let mut index = store.applied;
    for c in &cmds {
        index += 1;
        dry.apply(index, c.clone())?;
    }
    for spec in m.services {
        // Compared as the store would keep it: references resolved to versions.
        let mut resolved = spec.clone();
        dry.resolve_refs(&mut resolved);
        crate::autoscale::keep_replicas(
            dry.services.get(&spec.name).map(|s| &s.spec),
            &mut resolved,
        );
        let (action, changes) = match dry.services.get(&spec.name) {
            None => (Action::Created, Vec::new()),
            Some(s) if s.spec == resolved => (Action::Unchanged, Vec::new()),
            Some(s) => (Action::Updated, spec_changes(&s.spec, &resolved)),
        };
        push(Kind::Service, &spec.name, action, changes);
        if action != Action::Unchanged {
            let cmd = Command::PutService {
                id: new_id(),
                spec: Box::new(spec),
                now,
            };
            index += 1;
            dry.apply(index, cmd.clone())?;
            cmds.push(cmd);
        }
    }
    Ok(Plan {
        results,
        command: (!cmds.is_empty()).then_some(Command::Batch(cmds)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, aliases: &[&str]) -> ServiceSpec {
        serde_json::from_value(serde_json::json!({
            "name": name, "image": "x", "networks": ["back"], "aliases": aliases,
        }))
        .unwrap()
    }

    fn network(name: &str, subnet: Option<&str>) -> NetworkSpec {
        serde_json::from_value(serde_json::json!({"name": name, "subnet": subnet})).unwrap()
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id{n}")
        }
    }

    /// Applies `m` as the API does: plan, then the command.
    fn apply(store: &mut Store, m: Manifests) -> Result<Vec<(Kind, String, Action)>, ApplyError> {
        let p = plan(store, m, 7, &mut ids())?;
        if let Some(c) = p.command {
            let index = store.applied + 1;
            store.apply(index, c)?;
        }
        Ok(p.results
            .into_iter()
            .map(|r| (r.kind, r.name, r.action))
            .collect())
    }

    fn with_back() -> Store {
        let mut store = Store::default();
        let m = Manifests {
            networks: vec![network("back", Some("10.50.0.0/16"))],
            services: vec![spec("db", &["postgres"])],
            ..Default::default()
        };
        apply(&mut store, m).unwrap();
        store
    }

    #[test]
    fn results_say_created_updated_unchanged_and_implicit_volumes() {
        let mut store = with_back();
        let mut web = spec("web", &[]);
        web.mounts = serde_json::from_value(serde_json::json!([
            {"type": "volume", "source": "data", "target": "/d"}
        ]))
        .unwrap();
        let m = Manifests {
            networks: vec![network("back", None)],
            services: vec![spec("db", &["postgres", "pg"]), web],
            ..Default::default()
        };
        let got = apply(&mut store, m.clone()).unwrap();
        assert_eq!(
            got,
            vec![
                (Kind::Network, "back".into(), Action::Unchanged),
                (Kind::Volume, "data".into(), Action::Created),
                (Kind::Service, "db".into(), Action::Updated),
                (Kind::Service, "web".into(), Action::Created),
            ]
        );
        assert!(store.volumes.contains_key("data"));
        // Again: nothing changes, nothing is proposed.
        let p = plan(&store, m, 8, &mut ids()).unwrap();
        assert!(p.command.is_none());
        assert!(p.results.iter().all(|r| r.action == Action::Unchanged));
    }

    #[test]
    fn an_updated_service_says_which_fields_change() {
        let store = with_back();
        let mut db = spec("db", &["postgres"]);
        db.image = "y".into();
        db.replicas = 3;
        let m = Manifests {
            services: vec![db],
            ..Default::default()
        };
        let p = plan(&store, m, 8, &mut ids()).unwrap();
        let changes: Vec<String> = p.results[0].changes.iter().map(|c| c.to_string()).collect();
        assert_eq!(p.results[0].action, Action::Updated);
        assert_eq!(changes, vec![r#"image: "x" -> "y""#, "replicas: 1 -> 3"]);
    }

    #[test]
    fn the_store_rules_refuse_with_their_message() {
        let store = with_back();
        let try_plan = |m: Manifests| plan(&store, m, 7, &mut ids()).unwrap_err().to_string();
        // An alias that is another service's name or alias; a name that is another's alias.
        for (svc, words) in [
            (
                spec("api", &["db"]),
                "aliases[0]: \"db\" is already a name of service \"db\"",
            ),
            (
                spec("api", &["postgres"]),
                "\"postgres\" is already a name of service \"db\"",
            ),
            (
                spec("postgres", &[]),
                "its name is already an alias of service \"db\"",
            ),
        ] {
            let e = try_plan(Manifests {
                services: vec![svc],
                ..Default::default()
            });
            assert!(e.contains(words) && e.contains("network \"back\""), "{e}");
        }
        // Within one apply too.
        let e = try_plan(Manifests {
            services: vec![spec("a", &["x"]), spec("b", &["x"])],
            ..Default::default()
        });
        assert!(e.contains("\"x\" is already a name of service"), "{e}");
        // A network that does not exist, unless it comes in the same apply.
        let mut lost = spec("lost", &[]);
        lost.networks = vec!["nowhere".into()];
        let e = try_plan(Manifests {
            services: vec![lost.clone()],
            ..Default::default()
        });
        assert!(
            e.contains("networks[0]") && e.contains("\"nowhere\" does not exist"),
            "{e}"
        );
        plan(
            &store,
            Manifests {
                networks: vec![network("nowhere", None)],
                services: vec![lost],
                ..Default::default()
            },
            7,
            &mut ids(),
        )
        .unwrap();
        // A network's shape, and overlapping subnets.
        let mut enc = network("back", None);
        enc.encrypted = !enc.encrypted;
        let e = try_plan(Manifests {
            networks: vec![enc],
            ..Default::default()
        });
        assert!(e.contains("cannot change once it exists"), "{e}");
        let e = try_plan(Manifests {
            networks: vec![network("front", Some("10.50.1.0/24"))],
            ..Default::default()
        });
        assert!(
            e.contains("subnet: 10.50.1.0/24 overlaps network \"back\""),
            "{e}"
        );
        // A secret that does not exist, unless it comes in the same apply.
        let mut uses: ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": "s", "image": "x", "secrets": [{"source": "pw"}],
        }))
        .unwrap();
        let e = try_plan(Manifests {
            services: vec![uses.clone()],
            ..Default::default()
        });
        assert!(
            e.contains("secrets[0].source: secret \"pw\" not found"),
            "{e}"
        );
        let pw = SecretPut {
            kind: ObjectKind::Secret,
            name: "pw".into(),
            labels: BTreeMap::new(),
            data: SecretData(b"x".to_vec()),
            digest: "sha256:0".into(),
        };
        plan(
            &store,
            Manifests {
                secrets: vec![pw],
                services: vec![uses.clone()],
                ..Default::default()
            },
            7,
            &mut ids(),
        )
        .unwrap();
        uses.secrets[0].source = "pw:2".into();
        assert!(try_plan(Manifests {
            services: vec![uses],
            ..Default::default()
        })
        .contains("not found"));
    }
}

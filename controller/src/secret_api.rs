//! The Control API's secrets and configs (`rctl secret|config …`, and `kind: Secret|Config`
//! documents in `rctl apply`).
//!
//! Invariants: a secret's value never leaves this module towards a client (metadata only: a
//! config's value only when asked); no value is logged or put in an error message (errors name
//! the object and the size); sizes are checked here before any raft proposal, and again when the
//! command is applied.

use rudder_model::secret::{self, ObjectKind, SecretData};
use rudder_model::{Command, ServiceSpec, Store};
use rudder_proto::v1::{
    InspectSecretRequest, InspectSecretResponse, ListSecretsRequest, ListSecretsResponse,
    PutSecretRequest, PutSecretResponse, RemoveSecretRequest, SecretSummary,
};
use sha2::Digest;
use tonic::Status;
use tracing::info;

use crate::api::raft_status;
use crate::now_ms;
use crate::raft_node::RaftHandle;

fn kind_of(kind: &str) -> Result<ObjectKind, Status> {
    ObjectKind::parse(kind).ok_or_else(|| {
        Status::invalid_argument(format!(
            "secrets: kind {kind:?} is neither \"secret\" nor \"config\""
        ))
    })
}

/// Checks a put and turns it into its command (`None` when nothing would change) and action.
pub(crate) fn put_command(
    store: &Store,
    req: PutSecretRequest,
) -> Result<(Option<Command>, &'static str), Status> {
    let kind = kind_of(&req.kind)?;
    secret::validate_object_name("name", &req.name)
        .map_err(|e| Status::invalid_argument(format!("{kind} {:?}: {e}", req.name)))?;
    secret::check_size("data", req.data.len())
        .map_err(|e| Status::invalid_argument(format!("{kind} {:?}: {e}", req.name)))?;
    let existing = store.objects(kind).get(&req.name);
    match (req.mode.as_str(), existing) {
        ("create", Some(o)) => {
            return Err(Status::already_exists(format!(
                "{kind} {:?} already exists (version {}); use `rctl {kind} update` for a new \
                 version",
                req.name, o.latest
            )))
        }
        ("update", None) => {
            return Err(Status::not_found(format!(
                "{kind} {:?} not found; create it with `rctl {kind} create`",
                req.name
            )))
        }
        ("" | "create" | "update", _) => {}
        (other, _) => {
            return Err(Status::invalid_argument(format!(
                "secrets: mode {other:?} is not create, update or empty"
            )))
        }
    }
    let labels: std::collections::BTreeMap<String, String> = req.labels.into_iter().collect();
    let action = match existing {
        None => "created",
        Some(o)
            if o.labels == labels
                && o.versions.get(&o.latest).map(|v| &v.data.0) == Some(&req.data) =>
        {
            return Ok((None, "unchanged"))
        }
        Some(_) => "updated",
    };
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&req.data)));
    Ok((
        Some(Command::PutSecret {
            kind,
            name: req.name,
            labels,
            data: SecretData(req.data),
            digest,
            now: now_ms(),
        }),
        action,
    ))
}

pub(crate) async fn put(
    raft: &RaftHandle,
    req: PutSecretRequest,
) -> Result<PutSecretResponse, Status> {
    let store = raft.store();
    let kind = kind_of(&req.kind)?;
    let name = req.name.clone();
    let (cmd, action) = put_command(&store, req)?;
    let mut rolled = Vec::new();
    if let Some(cmd) = cmd {
        info!(%kind, name = %name, action, "put");
        raft.propose(cmd).await.map_err(raft_status)?;
        let after = raft.store();
        // The unpinned users whose spec moved to the new version (their rollout started).
        rolled = after
            .services
            .values()
            .filter(|s| secret::uses(&s.spec, kind, &name))
            .filter(|s| store.services.get(&s.spec.name).map(|b| &b.spec) != Some(&s.spec))
            .map(|s| s.spec.name.clone())
            .collect();
    }
    let version = raft
        .store()
        .objects(kind)
        .get(&name)
        .map(|o| o.latest)
        .unwrap_or(0);
    Ok(PutSecretResponse {
        action: action.into(),
        version,
        rolled,
    })
}

fn summary(store: &Store, o: &secret::SecretObject) -> SecretSummary {
    SecretSummary {
        meta_json: serde_json::to_string(&o.meta()).unwrap_or_default(),
        services: store
            .services
            .values()
            .filter(|s| secret::uses(&s.spec, o.kind, &o.name))
            .map(|s| s.spec.name.clone())
            .collect(),
    }
}

pub(crate) fn list(store: &Store, req: ListSecretsRequest) -> Result<ListSecretsResponse, Status> {
    let kind = kind_of(&req.kind)?;
    Ok(ListSecretsResponse {
        items: store
            .objects(kind)
            .values()
            .map(|o| summary(store, o))
            .collect(),
    })
}

pub(crate) fn inspect(
    store: &Store,
    req: InspectSecretRequest,
) -> Result<InspectSecretResponse, Status> {
    let kind = kind_of(&req.kind)?;
    if req.with_data && kind == ObjectKind::Secret {
        return Err(Status::permission_denied(
            "secret values are never shown; only the tasks that use a secret receive it",
        ));
    }
    let o = store.objects(kind).get(&req.name).ok_or_else(|| {
        Status::not_found(format!(
            "{kind} {:?} not found (see `rctl {kind} ls`)",
            req.name
        ))
    })?;
    let data = if req.with_data {
        o.versions
            .get(&o.latest)
            .map(|v| v.data.0.clone())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(InspectSecretResponse {
        summary: Some(summary(store, o)),
        data,
    })
}

pub(crate) async fn remove(raft: &RaftHandle, req: RemoveSecretRequest) -> Result<(), Status> {
    let kind = kind_of(&req.kind)?;
    let store = raft.store();
    if !store.objects(kind).contains_key(&req.name) {
        return Err(Status::not_found(format!(
            "{kind} {:?} not found (see `rctl {kind} ls`)",
            req.name
        )));
    }
    let users = store.secret_users(kind, &req.name);
    if !users.is_empty() {
        return Err(Status::failed_precondition(format!(
            "{kind} {:?} is in use by service(s) {}; remove them or take it out of their specs \
             first",
            req.name,
            users.join(", ")
        )));
    }
    info!(%kind, name = %req.name, "removing");
    raft.propose(Command::RemoveSecret {
        kind,
        name: req.name,
    })
    .await
    .map_err(raft_status)
}

/// Every secret and config the specs reference must exist (with the pinned version, if any),
/// in the store or among `incoming` (created by the same apply). The error names the service,
/// the field and what to do.
pub(crate) fn check_refs(
    store: &Store,
    specs: &[ServiceSpec],
    incoming: &[(ObjectKind, String)],
) -> Result<(), String> {
    for spec in specs {
        let fields = spec
            .secrets
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    format!("secrets[{i}].source"),
                    ObjectKind::Secret,
                    &r.source,
                )
            })
            .chain(spec.configs.iter().enumerate().map(|(i, r)| {
                (
                    format!("configs[{i}].source"),
                    ObjectKind::Config,
                    &r.source,
                )
            }))
            .chain(
                spec.env_from_secret
                    .iter()
                    .map(|(k, s)| (format!("env_from_secret.{k}"), ObjectKind::Secret, s)),
            );
        for (field, kind, source) in fields {
            let (name, pin) = secret::parse_source(&field, source)
                .map_err(|e| format!("service {:?}: {e}", spec.name))?;
            let object = store.objects(kind).get(&name);
            let fresh = incoming.iter().any(|(k, n)| *k == kind && *n == name);
            match (object, pin) {
                (None, _) if fresh && pin.is_none_or(|p| p == 1) => {}
                (None, _) => {
                    return Err(format!(
                        "service {:?}: {field}: {kind} {name:?} not found (create it with `rctl \
                         {kind} create {name} FILE`)",
                        spec.name
                    ))
                }
                (Some(o), Some(p)) if !o.versions.contains_key(&p) => {
                    return Err(format!(
                        "service {:?}: {field}: {kind} {name:?} has no version {p} (kept: {})",
                        spec.name,
                        o.versions
                            .keys()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, data: &[u8], mode: &str) -> PutSecretRequest {
        PutSecretRequest {
            kind: "secret".into(),
            name: name.into(),
            labels: Default::default(),
            data: data.to_vec(),
            mode: mode.into(),
        }
    }

    #[test]
    fn puts_are_checked_before_they_are_proposed() {
        let mut store = Store::default();
        let e = put_command(&store, req("big", &vec![0; secret::MAX_DATA + 1], "")).unwrap_err();
        assert!(e.message().contains("500 KiB"), "{e:?}");
        assert!(e.message().contains("\"big\""), "{e:?}");
        let e = put_command(&store, req("x", b"v", "update")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let (cmd, action) = put_command(&store, req("db", b"pw-value", "create")).unwrap();
        assert_eq!(action, "created");
        let cmd = cmd.unwrap();
        assert!(
            !format!("{cmd:?}").contains("pw-value"),
            "commands print redacted"
        );
        store.apply(1, cmd).unwrap();
        let e = put_command(&store, req("db", b"other", "create")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        let (cmd, action) = put_command(&store, req("db", b"pw-value", "")).unwrap();
        assert_eq!((cmd, action), (None, "unchanged"));
        let e = inspect(
            &store,
            InspectSecretRequest {
                kind: "secret".into(),
                name: "db".into(),
                with_data: true,
            },
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let r = inspect(
            &store,
            InspectSecretRequest {
                kind: "secret".into(),
                name: "db".into(),
                with_data: false,
            },
        )
        .unwrap();
        let json = r.summary.unwrap().meta_json;
        assert!(!json.contains("pw-value") && r.data.is_empty(), "{json}");
        // A service may reference it; a missing one is refused naming the field.
        let mut spec = serde_json::from_str::<ServiceSpec>(
            r#"{"name": "web", "image": "x", "secrets": [{"source": "db"}],
                "env_from_secret": {"PW": "nope"}}"#,
        )
        .unwrap();
        let e = check_refs(&store, std::slice::from_ref(&spec), &[]).unwrap_err();
        assert!(
            e.contains("env_from_secret.PW: secret \"nope\" not found"),
            "{e}"
        );
        check_refs(
            &store,
            std::slice::from_ref(&spec),
            &[(ObjectKind::Secret, "nope".into())],
        )
        .unwrap();
        spec.env_from_secret.clear();
        spec.secrets[0].source = "db:4".into();
        let e = check_refs(&store, &[spec], &[]).unwrap_err();
        assert!(
            e.contains("secrets[0].source") && e.contains("no version 4"),
            "{e}"
        );
    }
}

//! The Control API's secrets and configs (`rctl secret|config …`, and `kind: Secret|Config`
//! documents in `rctl apply`).
//!
//! Invariants: a secret's value never leaves this module towards a client (metadata only: a
//! config's value only when asked); no value is logged or put in an error message (errors name
//! the object and the size); sizes are checked here before any raft proposal, and again when the
//! command is applied.

use rudder_model::apply::{secret_action, secret_command, Action};
use rudder_model::secret::{self, ObjectKind};
use rudder_model::{Command, Store};
use rudder_proto::v1::{
    InspectSecretRequest, InspectSecretResponse, ListSecretsRequest, ListSecretsResponse,
    PutSecretRequest, PutSecretResponse, RemoveSecretRequest, SecretSummary,
};
use tonic::Status;
use tracing::info;

use crate::convert::{self, object_kind as kind_of, raft_status};
use crate::now_ms;
use crate::raft_node::RaftHandle;

/// Checks a put and turns it into its command (`None` when nothing would change) and action.
fn put_command(store: &Store, req: PutSecretRequest) -> Result<(Option<Command>, Action), Status> {
    let (put, mode) = convert::secret_put(req)?;
    let kind = put.kind;
    let existing = store.objects(kind).get(&put.name);
    match (mode.as_str(), existing) {
        ("create", Some(o)) => {
            return Err(Status::already_exists(format!(
                "{kind} {:?} already exists (version {}); use `rctl {kind} update` for a new \
                 version",
                put.name, o.latest
            )))
        }
        ("update", None) => {
            return Err(Status::not_found(format!(
                "{kind} {:?} not found; create it with `rctl {kind} create`",
                put.name
            )))
        }
        ("" | "create" | "update", _) => {}
        (other, _) => {
            return Err(Status::invalid_argument(format!(
                "secrets: mode {other:?} is not create, update or empty"
            )))
        }
    }
    let action = secret_action(store, &put);
    if action == Action::Unchanged {
        return Ok((None, action));
    }
    Ok((Some(secret_command(put, now_ms())), action))
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
        info!(%kind, name = %name, action = action.as_str(), "put");
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
        action: rudder_proto::v1::Action::from(action).into(),
        version,
        rolled,
    })
}

fn summary(store: &Store, o: &secret::SecretObject) -> Result<SecretSummary, Status> {
    Ok(SecretSummary {
        meta_json: convert::json("secret metadata", &o.meta())?,
        services: store
            .services
            .values()
            .filter(|s| secret::uses(&s.spec, o.kind, &o.name))
            .map(|s| s.spec.name.clone())
            .collect(),
    })
}

pub(crate) fn list(store: &Store, req: ListSecretsRequest) -> Result<ListSecretsResponse, Status> {
    let kind = kind_of(&req.kind)?;
    Ok(ListSecretsResponse {
        items: store
            .objects(kind)
            .values()
            .map(|o| summary(store, o))
            .collect::<Result<_, _>>()?,
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
        summary: Some(summary(store, o)?),
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
        assert_eq!(action, Action::Created);
        let cmd = cmd.unwrap();
        assert!(
            !format!("{cmd:?}").contains("pw-value"),
            "commands print redacted"
        );
        store.apply(1, cmd).unwrap();
        let e = put_command(&store, req("db", b"other", "create")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        let (cmd, action) = put_command(&store, req("db", b"pw-value", "")).unwrap();
        assert_eq!((cmd, action), (None, Action::Unchanged));
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
        let mut spec = serde_json::from_str::<rudder_model::ServiceSpec>(
            r#"{"name": "web", "image": "x", "secrets": [{"source": "db"}],
                "env_from_secret": {"PW": "nope"}}"#,
        )
        .unwrap();
        let e = store.check_service(&spec).unwrap_err().to_string();
        assert!(
            e.contains("env_from_secret.PW: secret \"nope\" not found"),
            "{e}"
        );
        spec.env_from_secret.clear();
        spec.secrets[0].source = "db:4".into();
        let e = store.check_service(&spec).unwrap_err().to_string();
        assert!(
            e.contains("secrets[0].source") && e.contains("no version 4"),
            "{e}"
        );
    }
}

//! `Control.Commit`: a task's container changes become a new image in the cluster registry.
//!
//! The task's agent (`AgentApi.Commit`) makes the layer from the container's upper dir and
//! sends it after a header naming the base image (manifest and config bytes) and the layer's
//! digests. This controller stores the layer blob (verified against its digest and size as it
//! streams in), derives the new config and manifest (`rudder_image::commit::derive`), stores
//! the config, and records the manifest and its tag through the same path a registry push takes
//! (`registry::store_manifest`: every referenced blob present first — base layers missing here
//! are read through from the other managers — then the record through raft). Agents never push:
//! their worker certificates may not.
//!
//! Invariants: a bad reference, a bad `--change`, an unknown task and a task on no host are
//! refused before any host is dialled; the tag moves only once the manifest and all its blobs are on this
//! controller's disk; a layer that does not hash to what the agent announced is refused.

use bytes::Bytes;
use futures::StreamExt;
use rudder_image::commit::{derive, parse_changes, CommitMeta, NewLayer};
use rudder_image::{ImageError, Reference};
use rudder_proto::v1::commit_chunk::Msg;
use rudder_proto::v1::{CommitLayerRequest, CommitRequest, CommitResponse};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::agents::AgentAt;
use crate::context::ApiContext;
use crate::registry::{replicate_to_majority, store_manifest, Digest, RegistryError};
use crate::resolve::one_task;

/// What goes into the new image's history.
const CREATED_BY: &str = "rctl commit";

/// The repository and tag `reference` names, or why it cannot be committed to.
pub fn target(reference: &str) -> Result<(String, String), Status> {
    let r = Reference::parse(reference).map_err(|e| match e {
        ImageError::InvalidReference { reference, reason } => {
            Status::invalid_argument(format!("invalid reference {reference:?}: {reason}"))
        }
        other => Status::invalid_argument(other.to_string()),
    })?;
    if r.digest.is_some() {
        return Err(Status::invalid_argument(format!(
            "invalid reference {reference:?}: a commit is stored under a tag, not a digest"
        )));
    }
    let tag = r.tag.unwrap_or_else(|| "latest".into());
    crate::registry::names::validate_name(&r.repository)
        .and_then(|()| crate::registry::names::validate_tag(&tag))
        .map_err(|e| Status::invalid_argument(format!("invalid reference {reference:?}: {e}")))?;
    Ok((r.repository, tag))
}

/// A registry failure while storing what `what` (`commit`, `build`) made, as a status.
pub(crate) fn registry_status(what: &str, e: RegistryError) -> Status {
    match e {
        RegistryError::ManifestBlobUnknown(d) => Status::failed_precondition(format!(
            "{what}: blob {d} of the base image is in no controller's registry"
        )),
        RegistryError::DigestMismatch { .. } => {
            Status::data_loss(format!("{what}: a blob arrived damaged: {e}"))
        }
        // Not `unavailable`: that would read as this controller being down.
        RegistryError::NoQuorum { .. } => Status::failed_precondition(format!("{what}: {e}")),
        other => Status::internal(format!("{what}: {other}")),
    }
}

pub async fn commit(
    api: &ApiContext,
    req: Request<CommitRequest>,
) -> Result<Response<CommitResponse>, Status> {
    let req = req.into_inner();
    let (repo, tag) = target(&req.reference)?;
    // Bad changes are refused before the host does any work.
    parse_changes(&req.changes).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let meta = CommitMeta {
        changes: req.changes.clone(),
        message: req.message.clone(),
        author: req.author.clone(),
    };
    let (task_id, name, at) = {
        let store = api.raft.store();
        let t = one_task(&store, &req.task)?;
        let node = t
            .node_id
            .as_ref()
            .and_then(|n| store.nodes.get(n))
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "task {} is on no host (state: {}); nothing to commit",
                    t.name(),
                    t.status.state
                ))
            })?;
        (t.id.clone(), t.name(), AgentAt::from(node))
    };
    let mut client = api.agents.dial(&at).await?;
    info!(task = %name, host = %at.host, image = %format!("{repo}:{tag}"), "commit");
    let on_task = |s: Status| Status::new(s.code(), format!("{name}: {}", s.message()));
    let mut stream = client
        .commit(CommitLayerRequest {
            task_id: task_id.clone(),
            no_pause: req.no_pause,
        })
        .await
        .map_err(on_task)?
        .into_inner();
    let header = match stream.message().await.map_err(on_task)? {
        Some(rudder_proto::v1::CommitChunk {
            msg: Some(Msg::Header(h)),
        }) => h,
        _ => {
            return Err(Status::internal(format!(
                "{name}: the host sent no commit header"
            )))
        }
    };
    if rudder_image::digest::of_bytes(&header.base_manifest) != header.base_digest {
        return Err(Status::internal(format!(
            "{name}: the host's copy of the base manifest does not hash to {}",
            header.base_digest
        )));
    }
    let layer = NewLayer {
        digest: header.layer_digest.clone(),
        size: header.layer_size,
        diff_id: header.diff_id.clone(),
    };
    let image = derive(
        &header.base_manifest,
        &header.base_config,
        &layer,
        &header.created,
        CREATED_BY,
        &meta,
    )
    .map_err(|e| Status::failed_precondition(format!("{name}: {e}")))?;
    let layer_digest = Digest::parse(&layer.digest)
        .map_err(|e| Status::internal(format!("{name}: layer digest: {e}")))?;

    // The layer, checked against its digest and size as it arrives.
    let body = stream.map(|m| match m {
        Ok(rudder_proto::v1::CommitChunk {
            msg: Some(Msg::Data(d)),
        }) => Ok(Bytes::from(d)),
        Ok(_) => Err("a second commit header".to_string()),
        Err(s) => Err(s.message().to_string()),
    });
    let state = &api.images;
    state
        .blobs()
        .put_stream(&layer_digest, Some(layer.size), body)
        .await
        .map_err(|e| registry_status("commit", e))?;
    // As for a push: the new blobs are acknowledged once a majority of managers hold them.
    let config = state
        .blobs()
        .put_bytes(&image.config)
        .await
        .map_err(|e| registry_status("commit", e))?;
    for d in [&layer_digest, &config] {
        replicate_to_majority(state, &repo, d)
            .await
            .map_err(|e| registry_status("commit", e))?;
    }
    let digest = store_manifest(
        state,
        &repo,
        Some(&tag),
        &image.manifest,
        Some(&image.media_type),
        true,
    )
    .await
    .map_err(|e| registry_status("commit", e))?;
    info!(task = %name, image = %format!("{repo}:{tag}"), %digest, size = image.size, "committed");
    Ok(Response::new(CommitResponse {
        reference: format!("{repo}:{tag}"),
        digest: digest.to_string(),
        layer_digest: layer.digest,
        layer_size: layer.size,
        size: image.size,
        changed: header.changed,
        deleted: header.deleted,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_a_repository_and_a_tag() {
        assert_eq!(
            target("box:v2").unwrap(),
            ("box".to_string(), "v2".to_string())
        );
        assert_eq!(
            target("lib/box").unwrap(),
            ("lib/box".to_string(), "latest".to_string())
        );
        let e = target("Bad:Name").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().starts_with("invalid reference \"Bad:Name\""),
            "{}",
            e.message()
        );
        let digest = format!("box@sha256:{}", "a".repeat(64));
        assert!(target(&digest)
            .unwrap_err()
            .message()
            .contains("not a digest"));
    }
}

//! The registry's tag store over Raft: manifests and tags are small and must survive the loss
//! of a controller, so they are replicated; blobs stay on disk.

use rudder_model::store::ImageRecord;
use rudder_model::Command;

use crate::raft_node::RaftHandle;
use crate::registry::{ManifestRef, RegistryError, TagStore};

pub struct RaftTagStore {
    pub raft: RaftHandle,
}

#[async_trait::async_trait]
impl TagStore for RaftTagStore {
    async fn put(
        &self,
        repo: &str,
        tag: Option<&str>,
        digest: &str,
        media_type: &str,
    ) -> Result<(), RegistryError> {
        self.raft
            .propose(Command::PutImage {
                repo: repo.to_string(),
                tag: tag.map(str::to_string),
                record: ImageRecord {
                    digest: digest.to_string(),
                    media_type: media_type.to_string(),
                },
            })
            .await
            .map_err(|e| RegistryError::TagStore(e.to_string()))
    }

    fn resolve(&self, repo: &str, reference: &str) -> Option<ManifestRef> {
        let store = self.raft.store();
        let r = store.images.get(repo)?.get(reference)?;
        Some(ManifestRef {
            digest: r.digest.clone(),
            media_type: r.media_type.clone(),
        })
    }

    fn tags(&self, repo: &str) -> Vec<String> {
        let store = self.raft.store();
        store
            .images
            .get(repo)
            .map(|refs| {
                refs.keys()
                    .filter(|k| !k.starts_with("sha256:"))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn repositories(&self) -> Vec<String> {
        self.raft.store().images.keys().cloned().collect()
    }

    async fn delete(&self, repo: &str, reference: &str) -> Result<bool, RegistryError> {
        if self.resolve(repo, reference).is_none() {
            return Ok(false);
        }
        self.raft
            .propose(Command::DeleteImage {
                repo: repo.to_string(),
                reference: reference.to_string(),
            })
            .await
            .map_err(|e| RegistryError::TagStore(e.to_string()))?;
        Ok(true)
    }
}

//! The seam between the registry and wherever tags live.
//!
//! In a cluster, which manifests belong to which repository and what each tag points at are
//! replicated through Raft by the controller; the registry only sees [`TagStore`]. A
//! standalone registry and the tests use [`MemTagStore`].
//!
//! Invariants every implementation keeps: a repository exists exactly while it holds at least
//! one manifest; a tag always points at a manifest of its own repository; deleting a manifest
//! by digest also deletes every tag pointing at it; `tags` and `repositories` come back sorted
//! (pagination relies on it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::names::is_digest_reference;
use super::RegistryError;

/// What a tag or digest reference resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestRef {
    /// `sha256:<hex>` of the manifest bytes, which live in the blob store under that digest.
    pub digest: String,
    /// The media type the manifest was pushed with; served back as Content-Type.
    pub media_type: String,
}

/// Maps `repository` + tag-or-digest to manifests. Object safe; shared as `Arc<dyn TagStore>`.
#[async_trait::async_trait]
pub trait TagStore: Send + Sync + 'static {
    /// Records that `repo@digest` exists with `media_type` and, when `tag` is given, that
    /// `repo:tag` points at it (moving the tag if it pointed elsewhere). Durable once `Ok`
    /// (the raft implementation waits for commit).
    async fn put(
        &self,
        repo: &str,
        tag: Option<&str>,
        digest: &str,
        media_type: &str,
    ) -> Result<(), RegistryError>;

    /// Resolves a tag or a digest within `repo`.
    fn resolve(&self, repo: &str, reference: &str) -> Option<ManifestRef>;

    /// The tags of `repo`, sorted; empty if the repository is unknown.
    fn tags(&self, repo: &str) -> Vec<String>;

    /// Every repository holding at least one manifest, sorted.
    fn repositories(&self) -> Vec<String>;

    /// Deletes a tag (the manifest stays) or a manifest by digest (its tags go with it).
    /// Returns whether anything was there.
    async fn delete(&self, repo: &str, reference: &str) -> Result<bool, RegistryError>;
}

#[derive(Default, Debug)]
struct Repo {
    /// digest → media type.
    manifests: BTreeMap<String, String>,
    /// tag → digest (always a key of `manifests`).
    tags: BTreeMap<String, String>,
}

/// In-memory [`TagStore`] behind a mutex: for tests and a single-node registry.
#[derive(Default, Debug)]
pub struct MemTagStore {
    repos: Mutex<BTreeMap<String, Repo>>,
}

impl MemTagStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Repo>> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // breaks the invariants (each update is a single insert/remove), so poisoning is moot.
        self.repos.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl TagStore for MemTagStore {
    async fn put(
        &self,
        repo: &str,
        tag: Option<&str>,
        digest: &str,
        media_type: &str,
    ) -> Result<(), RegistryError> {
        let mut repos = self.lock();
        let r = repos.entry(repo.to_owned()).or_default();
        r.manifests.insert(digest.to_owned(), media_type.to_owned());
        if let Some(tag) = tag {
            r.tags.insert(tag.to_owned(), digest.to_owned());
        }
        Ok(())
    }

    fn resolve(&self, repo: &str, reference: &str) -> Option<ManifestRef> {
        let repos = self.lock();
        let r = repos.get(repo)?;
        let digest = if is_digest_reference(reference) {
            reference
        } else {
            r.tags.get(reference)?.as_str()
        };
        let media_type = r.manifests.get(digest)?;
        Some(ManifestRef {
            digest: digest.to_owned(),
            media_type: media_type.clone(),
        })
    }

    fn tags(&self, repo: &str) -> Vec<String> {
        self.lock()
            .get(repo)
            .map(|r| r.tags.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn repositories(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    async fn delete(&self, repo: &str, reference: &str) -> Result<bool, RegistryError> {
        let mut repos = self.lock();
        let Some(r) = repos.get_mut(repo) else {
            return Ok(false);
        };
        let found = if is_digest_reference(reference) {
            let found = r.manifests.remove(reference).is_some();
            r.tags.retain(|_, d| d != reference);
            found
        } else {
            r.tags.remove(reference).is_some()
        };
        if r.manifests.is_empty() {
            repos.remove(repo);
        }
        Ok(found)
    }
}

/// Sorted-set helper shared by `tags/list` and `_catalog`: the page after `last`, at most `n`.
/// Returns the page and whether more entries follow.
pub(crate) fn paginate(
    all: Vec<String>,
    last: Option<&str>,
    n: Option<usize>,
) -> (Vec<String>, bool) {
    let set: BTreeSet<String> = all.into_iter().collect();
    let mut rest: Box<dyn Iterator<Item = String>> = match last {
        Some(last) => Box::new(set.into_iter().filter(move |t| t.as_str() > last)),
        None => Box::new(set.into_iter()),
    };
    match n {
        None => (rest.collect(), false),
        Some(n) => {
            let page: Vec<String> = rest.by_ref().take(n).collect();
            let more = rest.next().is_some();
            (page, more)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[tokio::test]
    async fn mem_store_tags_and_digests() {
        let s = MemTagStore::new();
        s.put("a/b", Some("v1"), D1, "m1").await.unwrap();
        s.put("a/b", Some("v2"), D1, "m1").await.unwrap();
        s.put("a/b", None, D2, "m2").await.unwrap();
        assert_eq!(s.resolve("a/b", "v1").unwrap().digest, D1);
        assert_eq!(s.resolve("a/b", D2).unwrap().media_type, "m2");
        assert_eq!(s.resolve("other", D2), None);
        assert_eq!(s.tags("a/b"), ["v1", "v2"]);
        // Moving a tag.
        s.put("a/b", Some("v2"), D2, "m2").await.unwrap();
        assert_eq!(s.resolve("a/b", "v2").unwrap().digest, D2);
        // Deleting a tag keeps the manifest; deleting a digest drops its tags.
        assert!(s.delete("a/b", "v2").await.unwrap());
        assert!(s.resolve("a/b", D2).is_some());
        assert!(s.delete("a/b", D1).await.unwrap());
        assert_eq!(s.tags("a/b"), Vec::<String>::new());
        assert_eq!(s.repositories(), ["a/b"]);
        assert!(s.delete("a/b", D2).await.unwrap());
        assert!(s.repositories().is_empty());
        assert!(!s.delete("a/b", D2).await.unwrap());
    }

    #[test]
    fn pagination() {
        let all = || {
            vec![
                "c".to_owned(),
                "a".to_owned(),
                "b".to_owned(),
                "d".to_owned(),
            ]
        };
        assert_eq!(
            paginate(all(), None, None),
            (vec!["a".into(), "b".into(), "c".into(), "d".into()], false)
        );
        assert_eq!(
            paginate(all(), None, Some(2)),
            (vec!["a".into(), "b".into()], true)
        );
        assert_eq!(
            paginate(all(), Some("b"), Some(2)),
            (vec!["c".into(), "d".into()], false)
        );
        assert_eq!(paginate(all(), Some("d"), Some(2)), (vec![], false));
        assert_eq!(paginate(all(), None, Some(0)), (vec![], true));
    }
}

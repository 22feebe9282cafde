//! `rctl image ls/rm/prune` in the Control API, and the `RegistryGc` service managers call on
//! each other.
//!
//! - **ls** lists the cluster registry's manifest records with their sizes from this
//!   controller's registry (`registry::gc::inventory` + `rudder_image::usage`), or relays to a
//!   host's agent (`AgentApi.ListHostImages`) for its content store.
//! - **rm** removes tags through raft, and a manifest record with its last tag, in one
//!   proposal; a removal that would leave a service's image unresolvable is refused with the
//!   service's name unless forced; an unknown reference refuses the whole call before anything
//!   is proposed. Blobs stay: that is prune's job.
//! - **prune** takes a read index (so every manager collects against a store holding at least
//!   every record acknowledged before the call), then asks every manager to collect its blobs
//!   (`RegistryGc.CollectBlobs`, this one directly) and every host's agent to collect its
//!   content store (`AgentApi.PruneHostImages`), all at once. A place that cannot be reached or
//!   collected is reported with its error; the others still are.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::future::join_all;
use rudder_image::usage;
use rudder_image::Reference;
use rudder_model::{Command, NodeState, Store};
use rudder_proto::v1::registry_gc_client::RegistryGcClient;
use rudder_proto::v1::registry_gc_server::RegistryGc;
use rudder_proto::v1::{
    CollectBlobsRequest, ImageSummary, ListImagesRequest, ListImagesResponse, PruneImagesRequest,
    PruneImagesResponse, PruneResult, RemoveImagesRequest, RemoveImagesResponse, RemovedImage,
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::agents::AgentAt;
use crate::context::ApiContext;
use crate::convert::raft_status;
use crate::raft_node::RaftHandle;
use crate::registry::gc::{self, GcError, Record};
use crate::registry::RegistryState;
use crate::resolve::find_node;

/// Blobs younger than this survive a prune unless the caller says otherwise: long enough for
/// any push to get from its first blob to its manifest.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);
/// How long one place may take to collect.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a host may take to list its content store.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// Every manifest record in the store.
pub fn records(store: &Store) -> Vec<Record> {
    store
        .images
        .iter()
        .flat_map(|(repo, refs)| {
            refs.iter().map(move |(reference, r)| Record {
                repo: repo.clone(),
                reference: reference.clone(),
                digest: r.digest.clone(),
                media_type: r.media_type.clone(),
            })
        })
        .collect()
}

fn is_digest(reference: &str) -> bool {
    reference.starts_with("sha256:")
}

/// How a controller is named in output: its host's name when a node runs it (a promoted
/// node records the raft id; the first controllers share their host's address), else its
/// address.
fn controller_name(store: &Store, raft_id: u64) -> String {
    let host = |addr: &str| addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string();
    let addr = store.managers.get(&raft_id).map(|m| m.addr.clone());
    store
        .nodes
        .values()
        .find(|n| n.controller_id == Some(raft_id))
        .or_else(|| {
            let ip = host(addr.as_deref()?);
            store.nodes.values().find(|n| host(&n.addr) == ip)
        })
        .map(|n| n.hostname.clone())
        .or(addr)
        .unwrap_or_else(|| format!("raft id {raft_id}"))
}

fn gc_status(e: GcError) -> Status {
    match e {
        GcError::ManifestMissing { .. } => Status::failed_precondition(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

pub async fn list(
    api: &ApiContext,
    req: Request<ListImagesRequest>,
) -> Result<Response<ListImagesResponse>, Status> {
    let req = req.into_inner();
    if !req.node.is_empty() {
        return list_host(api, req).await;
    }
    let store = api.raft.store();
    let records = records(&store);
    let inv = gc::inventory(&api.images, &records)
        .await
        .map_err(gc_status)?;
    let images = inv.images();
    let per_image = usage::usage(&images);
    let totals = usage::totals(&images, &inv.on_disk, &inv.manifest_digests());
    let mut created: HashMap<String, String> = HashMap::new();
    for (digest, m) in &inv.manifests {
        if let Some(cfg) = &m.config {
            if let Some(c) = gc::created(&api.images, cfg).await {
                created.insert(digest.clone(), c);
            }
        }
    }
    // Tags per manifest per repository, to tell untagged manifests.
    let mut tagged: BTreeSet<(&str, &str)> = BTreeSet::new();
    for r in records.iter().filter(|r| !is_digest(&r.reference)) {
        tagged.insert((&r.repo, &r.digest));
    }
    let mut rows = Vec::new();
    for r in &records {
        let tag = if !is_digest(&r.reference) {
            r.reference.clone()
        } else if req.all && !tagged.contains(&(r.repo.as_str(), r.digest.as_str())) {
            String::new()
        } else {
            continue;
        };
        let u = per_image.get(&r.digest).copied().unwrap_or_default();
        rows.push(ImageSummary {
            repository: r.repo.clone(),
            tag,
            digest: r.digest.clone(),
            created: created.get(&r.digest).cloned().unwrap_or_default(),
            size: u.size,
            shared: u.shared,
            unique: u.unique,
            unpacked: 0,
            tasks: vec![],
        });
    }
    rows.sort_by(|a, b| (&a.repository, &a.tag).cmp(&(&b.repository, &b.tag)));
    Ok(Response::new(ListImagesResponse {
        images: rows,
        place: format!(
            "controller {}",
            controller_name(&store, api.raft.status().id)
        ),
        image_count: totals.images,
        blobs: totals.blobs,
        disk_bytes: totals.disk_bytes,
        undeduplicated_bytes: totals.undeduplicated_bytes,
        reclaimable_bytes: totals.reclaimable_bytes,
        layers: 0,
        unpacked_bytes: 0,
    }))
}

/// One host's content store, from its agent.
async fn list_host(
    api: &ApiContext,
    req: ListImagesRequest,
) -> Result<Response<ListImagesResponse>, Status> {
    let at: AgentAt = {
        let store = api.raft.store();
        find_node(&store, &req.node)?.into()
    };
    let host = at.host.clone();
    let mut client = api.agents.dial(&at).await?;
    let call = client.list_host_images(ListImagesRequest {
        all: req.all,
        node: String::new(),
    });
    let mut resp = tokio::time::timeout(LIST_TIMEOUT, call)
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!("host {host} did not list its images in time"))
        })?
        .map_err(|s| Status::new(s.code(), format!("host {host}: {}", s.message())))?
        .into_inner();
    resp.place = format!("host {host}");
    Ok(Response::new(resp))
}

/// What removing `reference` takes away: (repo, keys of the repo's map, manifest digest,
/// whether the manifest record goes).
struct Removal {
    given: String,
    repo: String,
    keys: BTreeSet<String>,
    digest: String,
    manifest_removed: bool,
}

fn plan_removal(store: &Store, given: &str) -> Result<Removal, Status> {
    let not_found = || Status::not_found(format!("image {given} not found"));
    let r = Reference::parse(given).map_err(|_| not_found())?;
    let refs = store.images.get(&r.repository).ok_or_else(not_found)?;
    match (&r.digest, &r.tag) {
        (Some(d), _) => {
            let rec = refs.get(d).ok_or_else(not_found)?;
            let mut keys: BTreeSet<String> = refs
                .iter()
                .filter(|(_, x)| x.digest == rec.digest)
                .map(|(k, _)| k.clone())
                .collect();
            keys.insert(d.clone());
            Ok(Removal {
                given: given.to_string(),
                repo: r.repository.clone(),
                keys,
                digest: rec.digest.clone(),
                manifest_removed: true,
            })
        }
        (None, tag) => {
            let tag = tag.clone().unwrap_or_else(|| "latest".into());
            let rec = refs.get(&tag).ok_or_else(not_found)?;
            let other_tags = refs
                .iter()
                .any(|(k, x)| *k != tag && !is_digest(k) && x.digest == rec.digest);
            let mut keys: BTreeSet<String> = [tag].into();
            if !other_tags {
                keys.insert(rec.digest.clone());
            }
            Ok(Removal {
                given: given.to_string(),
                repo: r.repository.clone(),
                keys,
                digest: rec.digest.clone(),
                manifest_removed: !other_tags,
            })
        }
    }
}

/// Services whose image resolves through one of the removed keys: by digest when the spec
/// pins one (it wins when pulling), else by tag.
fn users_of(store: &Store, removals: &[Removal]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for svc in store.services.values() {
        let Ok(r) = Reference::parse(&svc.spec.image) else {
            continue;
        };
        let key = r
            .digest
            .clone()
            .unwrap_or_else(|| r.tag.clone().unwrap_or_else(|| "latest".into()));
        for rm in removals {
            if rm.repo == r.repository && rm.keys.contains(&key) {
                out.entry(rm.given.clone())
                    .or_default()
                    .push(svc.spec.name.clone());
            }
        }
    }
    out
}

pub async fn remove(
    api: &ApiContext,
    req: Request<RemoveImagesRequest>,
) -> Result<Response<RemoveImagesResponse>, Status> {
    let req = req.into_inner();
    if req.references.is_empty() {
        return Err(Status::invalid_argument(
            "image rm: name at least one image",
        ));
    }
    let store = api.raft.store();
    let removals = req
        .references
        .iter()
        .map(|r| plan_removal(&store, r))
        .collect::<Result<Vec<_>, _>>()?;
    if !req.force {
        if let Some((image, services)) = users_of(&store, &removals).into_iter().next() {
            return Err(Status::failed_precondition(format!(
                "image {image} is used by service {} (remove the service first, or use --force)",
                services.join(", ")
            )));
        }
    }
    let mut cmds = Vec::new();
    for rm in &removals {
        // Tags first: deleting the manifest by digest takes every tag on it with it.
        for key in rm.keys.iter().filter(|k| !is_digest(k)) {
            cmds.push(Command::DeleteImage {
                repo: rm.repo.clone(),
                reference: key.clone(),
            });
        }
        if rm.manifest_removed {
            cmds.push(Command::DeleteImage {
                repo: rm.repo.clone(),
                reference: rm.digest.clone(),
            });
        }
    }
    api.raft
        .propose(Command::Batch(cmds))
        .await
        .map_err(raft_status)?;
    info!(images = ?req.references, force = req.force, "images removed");
    Ok(Response::new(RemoveImagesResponse {
        removed: removals
            .into_iter()
            .map(|rm| RemovedImage {
                reference: rm.given,
                digest: rm.digest,
                manifest_removed: rm.manifest_removed,
            })
            .collect(),
    }))
}

fn grace_of(grace_ms: Option<u64>) -> Duration {
    grace_ms.map_or(DEFAULT_GRACE, Duration::from_millis)
}

/// One place's collection, given [`COLLECT_TIMEOUT`] to finish; a failure or a timeout is
/// reported for that place.
async fn within_timeout(
    place: String,
    call: impl std::future::Future<Output = Result<PruneResult, String>>,
) -> PruneResult {
    match tokio::time::timeout(COLLECT_TIMEOUT, call).await {
        Ok(Ok(mut r)) => {
            r.place = place;
            r
        }
        Ok(Err(e)) => failed(place, e),
        Err(_) => failed(place, format!("did not finish within {COLLECT_TIMEOUT:?}")),
    }
}

fn failed(place: String, error: String) -> PruneResult {
    PruneResult {
        place,
        error,
        ..Default::default()
    }
}

/// Collects this manager's blobs against its current store.
async fn collect_here(raft: &RaftHandle, registry: &RegistryState, grace: Duration) -> PruneResult {
    let store = raft.store();
    let place = format!("controller {}", controller_name(&store, raft.status().id));
    match gc::collect(registry, &records(&store), grace).await {
        Ok(r) => PruneResult {
            place,
            blobs: r.blobs,
            bytes: r.bytes,
            kept_young: r.kept_young,
            ..Default::default()
        },
        Err(e) => {
            warn!(%e, "registry collection failed");
            failed(place, e.to_string())
        }
    }
}

pub async fn prune(
    api: &ApiContext,
    req: Request<PruneImagesRequest>,
) -> Result<Response<PruneImagesResponse>, Status> {
    let grace_ms = req.into_inner().grace_ms;
    let grace = grace_of(grace_ms);
    let applied = api.raft.read_index().await.map_err(raft_status)?;
    let store = api.raft.store();
    let me = api.raft.status().id;
    let manager_tls = api
        .agents
        .certs()
        .map(|c| rudder_pki::tls::client_tls(&c, rudder_pki::ca::Role::Manager));

    // Every member, and this controller even before its address is recorded.
    let mut members: BTreeMap<u64, String> = store
        .managers
        .iter()
        .map(|(id, m)| (*id, m.addr.clone()))
        .collect();
    members.entry(me).or_default();
    let managers = members.into_iter().map(|(id, addr)| {
        let tls = manager_tls.clone();
        let place = format!("controller {}", controller_name(&store, id));
        async move {
            if id == me {
                return collect_here(&api.raft, &api.images, grace).await;
            }
            let call = async {
                let endpoint = crate::peer::endpoint(&addr, tls.as_ref()).map_err(|e| {
                    format!("cannot reach {addr}: {}", rudder_proto::error_chain(&e))
                })?;
                let channel = endpoint.connect().await.map_err(|e| {
                    format!("cannot reach {addr}: {}", rudder_proto::error_chain(&e))
                })?;
                RegistryGcClient::new(channel)
                    .collect_blobs(CollectBlobsRequest { grace_ms, applied })
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| s.message().to_string())
            };
            within_timeout(place, call).await
        }
    });
    let hosts = store
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Ready)
        .map(|n| {
            let at = AgentAt::from(n);
            async move {
                let place = format!("host {}", at.host);
                let call = async {
                    let mut client = api
                        .agents
                        .dial(&at)
                        .await
                        .map_err(|s| s.message().to_string())?;
                    client
                        .prune_host_images(PruneImagesRequest { grace_ms })
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| s.message().to_string())
                };
                within_timeout(place, call).await
            }
        });
    let (mut controllers, mut hosts) = tokio::join!(join_all(managers), join_all(hosts));
    controllers.sort_by(|a, b| a.place.cmp(&b.place));
    hosts.sort_by(|a, b| a.place.cmp(&b.place));
    controllers.extend(hosts);
    info!(grace_ms = grace.as_millis() as u64, "images pruned");
    Ok(Response::new(PruneImagesResponse {
        results: controllers,
    }))
}

/// `RegistryGc`: served by every controller, for the manager fanning a prune out.
pub struct RegistryGcApi {
    pub raft: RaftHandle,
    pub registry: RegistryState,
}

#[tonic::async_trait]
impl RegistryGc for RegistryGcApi {
    async fn collect_blobs(
        &self,
        req: Request<CollectBlobsRequest>,
    ) -> Result<Response<PruneResult>, Status> {
        let req = req.into_inner();
        // Records acknowledged before the prune must be in the store we collect against.
        self.raft.wait_applied(req.applied).await.map_err(|e| {
            Status::unavailable(format!("not caught up to index {}: {e}", req.applied))
        })?;
        Ok(Response::new(
            collect_here(&self.raft, &self.registry, grace_of(req.grace_ms)).await,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::store::ImageRecord;

    fn store_with(images: &[(&str, &str, &str)], services: &[(&str, &str)]) -> Store {
        let mut s = Store::default();
        let mut index = 1;
        for (repo, tag, digest) in images {
            s.apply(
                index,
                Command::PutImage {
                    repo: repo.to_string(),
                    tag: (!tag.is_empty()).then(|| tag.to_string()),
                    record: ImageRecord {
                        digest: digest.to_string(),
                        media_type: "m".into(),
                    },
                },
            )
            .unwrap();
            index += 1;
        }
        for (name, image) in services {
            let spec: rudder_model::ServiceSpec = serde_json::from_value(serde_json::json!({
                "name": name, "image": image
            }))
            .unwrap();
            s.apply(
                index,
                Command::PutService {
                    id: format!("id-{name}"),
                    spec: Box::new(spec),
                    now: 0,
                },
            )
            .unwrap();
            index += 1;
        }
        s
    }

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn removal_takes_the_manifest_with_its_last_tag() {
        let (a, b) = (d('a'), d('b'));
        let s = store_with(
            &[("box", "v1", &a), ("box", "v2", &a), ("box", "v3", &b)],
            &[],
        );
        let one = plan_removal(&s, "box:v1").unwrap();
        assert_eq!(one.keys, ["v1".to_string()].into());
        assert!(!one.manifest_removed);
        let last = plan_removal(&s, "box:v3").unwrap();
        assert_eq!(last.keys, ["v3".to_string(), b.clone()].into());
        assert!(last.manifest_removed);
        let by_digest = plan_removal(&s, &format!("box@{a}")).unwrap();
        assert_eq!(
            by_digest.keys,
            ["v1".to_string(), "v2".to_string(), a.clone()].into()
        );
        for unknown in ["box:nope", "nobox", &format!("box@{}", d('c')), "Bad Name"] {
            let e = plan_removal(&s, unknown).err().unwrap();
            assert_eq!(e.code(), tonic::Code::NotFound);
            assert_eq!(e.message(), format!("image {unknown} not found"));
        }
    }

    #[test]
    fn a_service_resolving_to_a_removed_key_is_a_user() {
        let (a, b) = (d('a'), d('b'));
        let s = store_with(
            &[("box", "v1", &a), ("box", "latest", &b), ("box", "v2", &a)],
            &[
                ("web", "box:v1"),
                ("pinned", &format!("box@{b}")),
                ("plain", "box"),
                ("other", "busybox:v1"),
            ],
        );
        let rm = |r: &str| vec![plan_removal(&s, r).unwrap()];
        assert_eq!(users_of(&s, &rm("box:v1"))["box:v1"], ["web"]);
        // v2 shares v1's manifest, which stays: nobody is affected.
        assert!(users_of(&s, &rm("box:v2")).is_empty());
        // latest is box's last tag on b: the plain and the pinned service lose their image.
        assert_eq!(
            users_of(&s, &rm("box:latest"))["box:latest"],
            ["pinned", "plain"]
        );
        assert_eq!(
            users_of(&s, &rm(&format!("box@{a}")))[&format!("box@{a}")],
            ["web"]
        );
    }
}

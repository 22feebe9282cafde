//! `Control.Build`: `rctl build` runs on one host of the cluster and its result lands in the
//! cluster registry.
//!
//! The first input names the image and carries the Dockerfile; the rest is the build context
//! (a tar). This controller picks the host (the one asked for, else the first ready, active
//! node by hostname, so that repeated builds meet their cache), opens `AgentApi.Build` there
//! and relays the inputs. The host answers with progress lines, which are relayed as they
//! come; then each blob the cluster registry lacks (a `BuildBlob` header, then its bytes),
//! which is stored here, verified against its digest and size as it streams in; then the
//! image's config and manifest, recorded under the tag through `registry::store_manifest`,
//! the path a registry push takes. Agents never push: their worker certificates may not.
//!
//! Invariants: a bad reference and an unknown host are refused before any host is dialled;
//! the tag moves only once the manifest and every blob it names are on this controller's disk
//! (blobs elsewhere are read through from the other managers); a blob that does not hash to
//! what the host announced is refused, and the build fails.

use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use rudder_model::store::{Availability, NodeState};
use rudder_proto::v1::build_input::Msg as In;
use rudder_proto::v1::build_output::Msg as Out;
use rudder_proto::v1::{BuildInput, BuildOutput, BuildResult};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::agents::AgentAt;
use crate::commit_api::target;
use crate::context::ApiContext;
use crate::registry::{replicate_to_majority, store_manifest, Digest, RegistryError};

pub type BuildStream = Pin<Box<dyn Stream<Item = Result<BuildOutput, Status>> + Send>>;

fn registry_status(e: RegistryError) -> Status {
    crate::commit_api::registry_status("build", e)
}

/// The host a build runs on: `wanted` (hostname or node id) when given, else the first ready,
/// active node running a controller, else the first ready, active node, by hostname.
fn pick_host(store: &rudder_model::store::Store, wanted: &str) -> Result<AgentAt, Status> {
    let usable = |n: &&rudder_model::store::Node| n.state == NodeState::Ready;
    if !wanted.is_empty() {
        // By id or hostname; a hostname two nodes claim is refused as ambiguous.
        let n = crate::resolve::find_node(store, wanted)
            .map_err(|s| Status::new(s.code(), format!("build: {}", s.message())))?;
        if !usable(&n) {
            return Err(Status::failed_precondition(format!(
                "build: node {} is down",
                n.hostname
            )));
        }
        return Ok(n.into());
    }
    let mut nodes: Vec<_> = store
        .nodes
        .values()
        .filter(usable)
        .filter(|n| n.availability == Availability::Active)
        .collect();
    // Hosts that run a controller first (the cluster trusts them with its CA already), so that
    // no worker can attract every build by its name; then by hostname, the same each time.
    nodes.sort_by_key(|n| (!store.runs_controller(n), n.hostname.clone()));
    nodes
        .first()
        .map(|n| AgentAt::from(*n))
        .ok_or_else(|| Status::failed_precondition("build: no ready node to build on"))
}

/// The IP addresses of the cluster's nodes and controllers (agent, gRPC and registry hosts).
fn cluster_addresses(store: &rudder_model::store::Store) -> Vec<String> {
    let host = |a: &str| -> Option<String> {
        let h = a.rsplit_once(':').map_or(a, |(h, _)| h);
        let h = h.trim_start_matches('[').trim_end_matches(']');
        h.parse::<std::net::IpAddr>().ok().map(|ip| ip.to_string())
    };
    let mut out: Vec<String> = store
        .nodes
        .values()
        .filter_map(|n| host(&n.addr))
        .chain(
            store
                .managers
                .values()
                .flat_map(|m| [host(&m.addr), host(&m.registry)])
                .flatten(),
        )
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `--secret id=X,name=NAME`: the newest value of the cluster's secret NAME, for this build
/// only (an admin could read it through a service anyway; it is never stored with the image).
fn fill_cluster_secrets(
    store: &rudder_model::store::Store,
    secrets: &mut [rudder_proto::v1::BuildSecret],
) -> Result<(), Status> {
    for s in secrets.iter_mut().filter(|s| !s.name.is_empty()) {
        let value = store
            .objects(rudder_model::secret::ObjectKind::Secret)
            .get(&s.name)
            .and_then(|o| o.versions.get(&o.latest))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "build: --secret id={}: the cluster has no secret {:?}",
                    s.id, s.name
                ))
            })?;
        s.data = value.data.0.clone();
    }
    Ok(())
}

pub async fn build(
    api: &ApiContext,
    req: Request<Streaming<BuildInput>>,
) -> Result<Response<BuildStream>, Status> {
    let mut inputs = req.into_inner();
    let mut params = match inputs.message().await? {
        Some(BuildInput {
            msg: Some(In::Params(p)),
        }) => p,
        _ => {
            return Err(Status::invalid_argument(
                "build: the first input must name the image",
            ))
        }
    };
    let (repo, tag) = target(&params.reference)?;
    fill_cluster_secrets(&api.raft.store(), &mut params.secrets)?;
    let at = pick_host(&api.raft.store(), &params.node)?;
    let host = at.host.clone();
    params.registry = api.registry.clone();
    // `ADD <url>` may not reach into the cluster (M8): every host's and controller's address,
    // unless the admin allowed it for this build.
    params.cluster_addresses = if params.allow_cluster_urls {
        Vec::new()
    } else {
        cluster_addresses(&api.raft.store())
    };
    // While it builds, the host may pull any base image (workers otherwise pull only their
    // tasks' images); the lease ends with the relay below.
    let lease = api.pull_leases.grant(&at.id);
    let mut client = api.agents.dial(&at).await?;
    info!(image = %format!("{repo}:{tag}"), %host, no_cache = params.no_cache, "build");

    // The host's inputs: the parameters, then the context as it arrives from rctl.
    let (in_tx, in_rx) = mpsc::channel::<BuildInput>(16);
    in_tx
        .send(BuildInput {
            msg: Some(In::Params(params)),
        })
        .await
        .map_err(|_| Status::internal("build: input channel closed"))?;
    tokio::spawn(async move {
        while let Some(Ok(m)) = inputs.next().await {
            if in_tx.send(m).await.is_err() {
                return;
            }
        }
    });
    let on_host = move |s: Status| Status::new(s.code(), s.message().to_string());
    let mut outputs = client
        .build(tokio_stream::wrappers::ReceiverStream::new(in_rx))
        .await
        .map_err(on_host)?
        .into_inner();

    let (tx, rx) = mpsc::channel::<Result<BuildOutput, Status>>(16);
    let state = api.images.clone();
    tokio::spawn(async move {
        let result = relay(&state, &mut outputs, &tx, &repo, &tag, &host).await;
        drop(lease);
        let msg = match result {
            Ok(r) => Ok(BuildOutput {
                msg: Some(Out::Result(r)),
            }),
            Err(s) => {
                warn!(image = %format!("{repo}:{tag}"), %host, error = %s.message(), "build failed");
                Err(s)
            }
        };
        let _ = tx.send(msg).await;
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

/// Relays the host's progress to `tx`, stores its blobs and finally the image.
async fn relay(
    state: &crate::registry::RegistryState,
    outputs: &mut Streaming<BuildOutput>,
    tx: &mpsc::Sender<Result<BuildOutput, Status>>,
    repo: &str,
    tag: &str,
    host: &str,
) -> Result<BuildResult, Status> {
    let on_host = |s: Status| Status::new(s.code(), s.message().to_string());
    loop {
        // rctl going away (^C) stops the build, as docker's does, even while a step is
        // silent: returning drops the host's stream, which tells the host.
        let next = tokio::select! {
            m = outputs.message() => m,
            () = tx.closed() => return Err(Status::cancelled("build: the client went away")),
        };
        let msg = next
            .map_err(on_host)?
            .and_then(|m| m.msg)
            .ok_or_else(|| Status::internal(format!("build: host {host} ended the build early")))?;
        match msg {
            Out::Progress(line) => {
                tx.send(Ok(BuildOutput {
                    msg: Some(Out::Progress(line)),
                }))
                .await
                .map_err(|_| Status::cancelled("build: the client went away"))?;
            }
            Out::Blob(b) => {
                let digest = Digest::parse(&b.digest)
                    .map_err(|e| Status::internal(format!("build: blob digest: {e}")))?;
                store_blob(state, outputs, &digest, b.size, host).await?;
                // As for a push: acknowledged once a majority of managers hold it.
                replicate_to_majority(state, repo, &digest)
                    .await
                    .map_err(registry_status)?;
            }
            Out::Image(image) => {
                let config = state
                    .blobs()
                    .put_bytes(&image.config)
                    .await
                    .map_err(registry_status)?;
                replicate_to_majority(state, repo, &config)
                    .await
                    .map_err(registry_status)?;
                let digest = store_manifest(
                    state,
                    repo,
                    Some(tag),
                    &image.manifest,
                    Some(&image.media_type),
                    true,
                )
                .await
                .map_err(registry_status)?;
                let size = rudder_image::oci::Manifest::parse(&image.manifest)
                    .map(|m| m.blobs().map(|d| d.size).sum())
                    .unwrap_or(0);
                info!(image = %format!("{repo}:{tag}"), %digest, %host, steps = image.steps, cached = image.cached, "built");
                return Ok(BuildResult {
                    reference: format!("{repo}:{tag}"),
                    digest: digest.to_string(),
                    steps: image.steps,
                    cached: image.cached,
                    size,
                    node: host.to_string(),
                    bytes_sent: image.bytes_sent,
                });
            }
            Out::Data(_) | Out::Result(_) => {
                return Err(Status::internal(format!(
                    "build: host {host} sent data out of order"
                )))
            }
        }
    }
}

/// Stores the blob whose `size` bytes come next on `outputs`.
async fn store_blob(
    state: &crate::registry::RegistryState,
    outputs: &mut Streaming<BuildOutput>,
    digest: &Digest,
    size: u64,
    host: &str,
) -> Result<(), Status> {
    let (data_tx, data_rx) = mpsc::channel::<Result<Bytes, String>>(8);
    let blobs = state.blobs().clone();
    let d = digest.clone();
    let put = tokio::spawn(async move {
        blobs
            .put_stream(
                &d,
                Some(size),
                tokio_stream::wrappers::ReceiverStream::new(data_rx),
            )
            .await
    });
    let mut got = 0u64;
    while got < size {
        match outputs.message().await {
            Ok(Some(BuildOutput {
                msg: Some(Out::Data(d)),
            })) => {
                got += d.len() as u64;
                if data_tx.send(Ok(Bytes::from(d))).await.is_err() {
                    break;
                }
            }
            Ok(_) => {
                let _ = data_tx
                    .send(Err(format!("host {host} sent a short blob")))
                    .await;
                break;
            }
            Err(s) => {
                let _ = data_tx.send(Err(s.message().to_string())).await;
                break;
            }
        }
    }
    drop(data_tx);
    put.await
        .map_err(|e| Status::internal(format!("build: {e}")))?
        .map_err(registry_status)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::store::{Node, Store};

    fn node(id: &str, host: &str, state: NodeState, availability: Availability) -> Node {
        let mut n: Node = serde_json::from_value(serde_json::json!({
            "id": id, "hostname": host, "addr": format!("{host}:4245"),
            "state": "Ready", "updated_at": 0, "version": 1
        }))
        .unwrap();
        n.state = state;
        n.availability = availability;
        n
    }

    #[test]
    fn builds_go_to_the_first_ready_active_host_or_the_one_named() {
        let mut s = Store::default();
        for n in [
            node("n3", "h3", NodeState::Ready, Availability::Active),
            node("n1", "h1", NodeState::Down, Availability::Active),
            node("n2", "h2", NodeState::Ready, Availability::Active),
            node("n0", "h0", NodeState::Ready, Availability::Drain),
        ] {
            s.nodes.insert(n.id.clone(), n);
        }
        assert_eq!(pick_host(&s, "").unwrap().host, "h2");
        assert_eq!(pick_host(&s, "n3").unwrap().host, "h3");
        assert_eq!(pick_host(&s, "h3").unwrap().addr, "h3:4245");
        assert!(pick_host(&s, "h1").unwrap_err().message().contains("down"));
        assert_eq!(
            pick_host(&s, "h9").unwrap_err().code(),
            tonic::Code::NotFound
        );
        // A host that runs a controller goes first, whatever a worker calls itself.
        s.nodes.insert(
            "n0".into(),
            node("n0", "0", NodeState::Ready, Availability::Active),
        );
        assert_eq!(pick_host(&s, "").unwrap().host, "0");
        s.set_manager(
            1,
            1,
            Some(rudder_model::store::ManagerInfo {
                addr: "h3:4243".into(),
                registry: "h3:5000".into(),
            }),
        );
        assert_eq!(pick_host(&s, "").unwrap().host, "h3");
    }
}

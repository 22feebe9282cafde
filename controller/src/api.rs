//! The Control API that `rctl` speaks. Converts between wire messages and model types, and maps
//! errors to `tonic::Status` with messages a user can act on. Writes go through Raft; reads come
//! from the last applied store.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use rudder_model::spec::ServiceMode;
use rudder_model::{Command, TaskState};
use rudder_proto::v1::control_server::Control;
use rudder_proto::v1::*;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::agents::{AgentAt, AgentDialer};
use crate::context::ApiContext;
use crate::convert::{self, node_summary, raft_status};
use crate::resolve::{find_node, resolve_tasks};
use crate::{new_id, now_ms};

/// The `Control` service: decodes requests, asks the model, proposes through raft, and hands
/// the relays (exec, cp, commit, images, build) to their modules.
pub struct ControlApi {
    ctx: ApiContext,
    /// Open `WatchTasks` streams, bounded so that watchers cannot pin unbounded memory.
    watches: crate::watch_api::Watches,
    /// This controller's cluster events (`Events`), following its applied store.
    events: std::sync::Arc<crate::events_api::EventHub>,
}

impl ControlApi {
    /// Also starts following the applied store for `Events` (needs a tokio runtime).
    pub fn new(ctx: ApiContext) -> Self {
        ControlApi {
            events: crate::events_api::EventHub::start(&ctx.raft),
            ctx,
            watches: Default::default(),
        }
    }
}

impl std::ops::Deref for ControlApi {
    type Target = ApiContext;
    fn deref(&self) -> &ApiContext {
        &self.ctx
    }
}

/// A fresh autolock unlock key, as the store records it.
fn new_unlock_key() -> Result<rudder_model::store::UnlockKeyText, Status> {
    let k = crate::crypt::UnlockKey::generate()
        .map_err(|e| Status::internal(format!("autolock: {e}")))?;
    Ok(rudder_model::store::UnlockKeyText(k.encode()))
}

/// How long fetching a task's log (without following) may take.
const LOGS_TIMEOUT: Duration = Duration::from_secs(30);

/// Size of one backup message (well under gRPC's default 4 MiB limit).
const BACKUP_CHUNK: usize = 1024 * 1024;
type BackupStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send>>;
type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlApi {
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let req = req.into_inner();
        let dry_run = req.dry_run;
        let began = std::time::Instant::now();
        let manifests = convert::manifests(req)?;
        if !dry_run {
            // The plan is computed from this controller's store: it must hold every write
            // acknowledged before this call, or a lagging controller finds a spec "unchanged"
            // that a newer write changed, proposes nothing and acknowledges a lost write (the
            // chaos soak caught it after a partition healed).
            self.raft.read_index().await.map_err(raft_status)?;
        }
        let read_ms = began.elapsed().as_millis() as u64;
        let store = self.raft.store();
        let plan = rudder_model::apply::plan(&store, manifests, now_ms(), &mut new_id)
            .map_err(convert::apply_status)?;
        let plan_ms = began.elapsed().as_millis() as u64;
        if dry_run {
            // The same plan, reported and not proposed: `rctl apply --dry-run`, `rctl diff`.
            return Ok(Response::new(ApplyResponse {
                results: plan.results.iter().map(convert::apply_result).collect(),
            }));
        }
        for r in &plan.results {
            if r.action != rudder_model::apply::Action::Unchanged {
                info!(kind = r.kind.as_str(), name = %r.name, action = r.action.as_str(), "apply");
            }
        }
        if let Some(cmd) = plan.command {
            // One entry: a file is applied whole.
            self.raft.propose(cmd).await.map_err(raft_status)?;
        }
        // Cumulative: the read index, the plan, the commit (issue 20's stage figures).
        debug!(
            read_ms,
            plan_ms,
            commit_ms = began.elapsed().as_millis() as u64,
            "apply timings"
        );
        Ok(Response::new(ApplyResponse {
            results: plan.results.iter().map(convert::apply_result).collect(),
        }))
    }

    async fn remove_service(
        &self,
        req: Request<RemoveServiceRequest>,
    ) -> Result<Response<RemoveServiceResponse>, Status> {
        let name = req.into_inner().name;
        crate::resolve::find_service(&self.raft.store(), &name)?;
        self.raft
            .propose(Command::RemoveService { name })
            .await
            .map_err(raft_status)?;
        Ok(Response::new(RemoveServiceResponse {}))
    }

    async fn list_services(
        &self,
        req: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        if req.into_inner().linearizable {
            self.raft.read_index().await.map_err(raft_status)?;
        }
        let store = self.raft.store();
        // One pass over the tasks, not one per service: at 1,500 services and 150,000 tasks
        // (issue 20) the per-service scans made this call take seconds.
        let mut by_service: std::collections::HashMap<&str, Vec<&rudder_model::Task>> =
            std::collections::HashMap::new();
        for t in store.tasks.values() {
            by_service.entry(t.service_id.as_str()).or_default().push(t);
        }
        let services = store
            .services
            .values()
            .map(|s| -> Result<ServiceSummary, Status> {
                let tasks = by_service.get(s.id.as_str()).map_or(&[][..], Vec::as_slice);
                let job = rudder_model::job::progress(s, tasks, &store.nodes);
                Ok(ServiceSummary {
                    id: s.id.clone(),
                    name: s.spec.name.clone(),
                    image: s.spec.image.clone(),
                    desired: if let Some(p) = job {
                        p.total
                    } else if s.spec.mode == ServiceMode::Global {
                        tasks
                            .iter()
                            .filter(|t| t.desired_state == TaskState::Running)
                            .count() as u64
                    } else {
                        s.spec.replicas
                    },
                    global: s.spec.mode.is_global(),
                    job: job.map(JobProgress::from),
                    update_state: rudder_proto::v1::UpdateState::from(
                        s.update_status.as_ref().map(|u| u.state),
                    )
                    .into(),
                    update_message: s
                        .update_status
                        .as_ref()
                        .map(|u| u.message.clone())
                        .unwrap_or_default(),
                    spec_version: s.spec_version,
                    running: tasks
                        .iter()
                        .filter(|t| {
                            t.desired_state == TaskState::Running
                                && t.status.state == TaskState::Running
                        })
                        .count() as u64,
                    version: s.version,
                    spec_json: convert::json("service spec", &s.spec)?,
                    rebalance_message: s
                        .rebalance
                        .as_ref()
                        .map(|r| r.message.clone())
                        .unwrap_or_default(),
                    rebalance_started_ms: s.rebalance.as_ref().map_or(0, |r| r.started_at),
                    rebalance_completed_ms: s
                        .rebalance
                        .as_ref()
                        .and_then(|r| r.completed_at)
                        .unwrap_or(0),
                    autoscale_decisions: crate::stats_api::decisions(s),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Response::new(ListServicesResponse { services }))
    }

    async fn list_tasks(
        &self,
        req: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let service = req.into_inner().service;
        let store = self.raft.store();
        // 150,000 tasks take a second to list: not on an async worker, where the agents'
        // sessions and the inbound raft messages wait for it.
        let tasks =
            tokio::task::spawn_blocking(move || crate::watch_api::task_list(&store, &service))
                .await
                .map_err(|e| Status::internal(format!("list tasks: {e}")))??;
        Ok(Response::new(ListTasksResponse { tasks }))
    }

    type WatchTasksStream = crate::watch_api::WatchTasksStream;

    async fn watch_tasks(
        &self,
        req: Request<ListTasksRequest>,
    ) -> Result<Response<Self::WatchTasksStream>, Status> {
        let service = req.into_inner().service;
        crate::watch_api::watch_tasks(&self.raft, &self.watches, service).map(Response::new)
    }

    async fn list_nodes(
        &self,
        _req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let store = self.raft.store();
        let mut nodes: Vec<&rudder_model::Node> = store.nodes.values().collect();
        nodes.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        let nodes = nodes.into_iter().map(|n| node_summary(&store, n)).collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn update_node(
        &self,
        req: Request<UpdateNodeRequest>,
    ) -> Result<Response<NodeSummary>, Status> {
        let req = req.into_inner();
        let store = self.raft.store();
        let node = find_node(&store, &req.node)?;
        let availability =
            rudder_proto::model::availability(req.availability).map_err(convert::unknown_status)?;
        for k in req.labels_add.keys().chain(req.labels_rm.iter()) {
            if k.is_empty() || k.contains('=') || k.chars().any(char::is_whitespace) {
                return Err(Status::invalid_argument(format!(
                    "label {k:?}: keys are non-empty, without '=' or spaces"
                )));
            }
        }
        let id = node.id.clone();
        self.raft
            .propose(Command::UpdateNode {
                id: id.clone(),
                availability,
                labels_add: req.labels_add.into_iter().collect(),
                labels_rm: req.labels_rm,
            })
            .await
            .map_err(raft_status)?;
        let store = self.raft.store();
        let node = store
            .nodes
            .get(&id)
            .ok_or_else(|| Status::not_found("node vanished"))?;
        Ok(Response::new(node_summary(&store, node)))
    }

    async fn scale(&self, req: Request<ScaleRequest>) -> Result<Response<ScaleResponse>, Status> {
        let req = req.into_inner();
        // The whole spec is written back with the new count: read it only once every write
        // acknowledged before this call is applied here, or a lagging controller would put an
        // older spec back (see `apply`).
        self.raft.read_index().await.map_err(raft_status)?;
        let store = self.raft.store();
        let svc = crate::resolve::find_service(&store, &req.service)?;
        if svc.spec.mode == ServiceMode::Global {
            return Err(Status::failed_precondition(format!(
                "service {:?} is global: it runs one task per eligible node and cannot be scaled",
                req.service
            )));
        }
        if svc.spec.mode.is_job() {
            return Err(Status::failed_precondition(format!(
                "service {:?} is a job: change its completions or parallelism and apply it \
                 (a new iteration)",
                req.service
            )));
        }
        if let Some(a) = &svc.spec.autoscale {
            // The autoscaler owns the count: a manual one would be undone at its next pass.
            return Err(Status::failed_precondition(format!(
                "service {:?} is autoscaled ({} to {} replicas): change autoscale.min and \
                 autoscale.max (rctl apply), or remove autoscale to scale by hand",
                req.service, a.min, a.max
            )));
        }
        let mut spec = svc.spec.clone();
        spec.replicas = req.replicas;
        spec.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if spec != svc.spec {
            self.raft
                .propose(Command::PutService {
                    id: svc.id.clone(),
                    spec: Box::new(spec),
                    now: now_ms(),
                })
                .await
                .map_err(raft_status)?;
        }
        Ok(Response::new(ScaleResponse {}))
    }

    async fn stats(&self, req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let service = req.into_inner().service;
        crate::stats_api::stats(&self.raft, &self.usage, &service, now_ms()).map(Response::new)
    }

    async fn rollback(
        &self,
        req: Request<RollbackRequest>,
    ) -> Result<Response<RollbackResponse>, Status> {
        let service = req.into_inner().service;
        let store = self.raft.store();
        let svc = crate::resolve::find_service(&store, &service)?;
        if svc.spec.mode.is_job() {
            return Err(Status::failed_precondition(format!(
                "service {service:?} is a job: it has no rollout to roll back; apply the spec \
                 to run (a new iteration)"
            )));
        }
        let Some(previous) = &svc.previous_spec else {
            return Err(Status::failed_precondition(format!(
                "service {service:?} has no previous spec to roll back to"
            )));
        };
        // The names it would take back must still be free (another service may have taken
        // an alias it dropped).
        store.check_service(previous).map_err(|m| {
            Status::failed_precondition(format!("cannot roll back {service:?}: {m}"))
        })?;
        self.raft
            .propose(Command::Rollback {
                service,
                now: now_ms(),
                reason: String::new(),
                if_spec_version: None,
            })
            .await
            .map_err(raft_status)?;
        Ok(Response::new(RollbackResponse {}))
    }

    async fn rebalance(
        &self,
        req: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        let service = req.into_inner().service;
        let store = self.raft.store();
        let svc = crate::resolve::find_service(&store, &service)?;
        let planned = rudder_model::rebalance::plan_service(&store, svc)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let Some(cmd) =
            rudder_model::rebalance::start(&store, svc, &planned, "rctl rebalance", now_ms())
        else {
            let host = |id: &str| {
                store
                    .nodes
                    .get(id)
                    .map_or(id.to_string(), |n| n.hostname.clone())
            };
            return Ok(Response::new(RebalanceResponse {
                slots: Vec::new(),
                message: format!(
                    "balanced already over the eligible nodes ({})",
                    planned.spread(host)
                ),
            }));
        };
        let Command::SetRebalance { status, .. } = &cmd else {
            return Err(Status::internal("rebalance: unexpected plan"));
        };
        let resp = RebalanceResponse {
            slots: status.slots.clone(),
            message: status.message.clone(),
        };
        info!(service = %service, message = %resp.message, "rebalancing");
        self.raft.propose(cmd).await.map_err(raft_status)?;
        Ok(Response::new(resp))
    }

    type LogsStream = LogStream;
    type ExecStream = crate::exec_api::ExecStream;
    type CopyFromStream = crate::exec_api::TarStream;

    async fn exec(
        &self,
        req: Request<tonic::Streaming<ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        crate::exec_api::exec(self, req).await
    }

    async fn copy_from(
        &self,
        req: Request<CopyFromRequest>,
    ) -> Result<Response<Self::CopyFromStream>, Status> {
        crate::exec_api::copy_from(self, req).await
    }

    async fn copy_to(
        &self,
        req: Request<tonic::Streaming<CopyToInput>>,
    ) -> Result<Response<CopyToResponse>, Status> {
        crate::exec_api::copy_to(self, req).await
    }

    async fn inspect(
        &self,
        req: Request<InspectRequest>,
    ) -> Result<Response<InspectResponse>, Status> {
        crate::exec_api::inspect(self, req).await
    }

    async fn commit(
        &self,
        req: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        crate::commit_api::commit(self, req).await
    }

    async fn list_images(
        &self,
        req: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        crate::image_api::list(self, req).await
    }

    async fn remove_images(
        &self,
        req: Request<RemoveImagesRequest>,
    ) -> Result<Response<RemoveImagesResponse>, Status> {
        crate::image_api::remove(self, req).await
    }

    async fn prune_images(
        &self,
        req: Request<PruneImagesRequest>,
    ) -> Result<Response<PruneImagesResponse>, Status> {
        crate::image_api::prune(self, req).await
    }

    type BuildStream = crate::build_api::BuildStream;
    type BackupStream = BackupStream;

    async fn build(
        &self,
        req: Request<tonic::Streaming<rudder_proto::v1::BuildInput>>,
    ) -> Result<Response<Self::BuildStream>, Status> {
        crate::build_api::build(self, req).await
    }

    async fn deploy_stack(
        &self,
        req: Request<DeployStackRequest>,
    ) -> Result<Response<DeployStackResponse>, Status> {
        crate::stack_api::deploy(&self.raft, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_stacks(
        &self,
        _req: Request<ListStacksRequest>,
    ) -> Result<Response<ListStacksResponse>, Status> {
        crate::stack_api::list(&self.raft.store()).map(Response::new)
    }

    async fn rollback_stack(
        &self,
        req: Request<RollbackStackRequest>,
    ) -> Result<Response<DeployStackResponse>, Status> {
        crate::stack_api::rollback(&self.raft, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn remove_stack(
        &self,
        req: Request<RemoveStackRequest>,
    ) -> Result<Response<RemoveStackResponse>, Status> {
        crate::stack_api::remove(&self.raft, req.into_inner())
            .await
            .map(Response::new)
    }

    type EventsStream = crate::events_api::EventStream;

    async fn events(
        &self,
        req: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        self.events.subscribe(req.into_inner()).map(Response::new)
    }

    async fn dashboard_token(
        &self,
        req: Request<DashboardTokenRequest>,
    ) -> Result<Response<DashboardTokenResponse>, Status> {
        let caller = req.extensions().get::<crate::ca::PeerIdentity>().cloned();
        crate::dashboard::token_rpc(
            &self.raft.store(),
            caller.as_ref(),
            req.into_inner(),
            self.dashboard_port,
            now_ms(),
        )
        .map(Response::new)
    }

    type StatsStreamStream = crate::stats_api::FrameStream;

    async fn stats_stream(
        &self,
        req: Request<StatsStreamRequest>,
    ) -> Result<Response<Self::StatsStreamStream>, Status> {
        crate::stats_api::stats_stream(&self.ctx, req.into_inner()).map(Response::new)
    }

    async fn top(&self, req: Request<TopRequest>) -> Result<Response<TopResponse>, Status> {
        crate::stats_api::top(&self.ctx, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn logs(&self, req: Request<LogsRequest>) -> Result<Response<LogStream>, Status> {
        let LogsRequest {
            target,
            tail,
            follow,
            timestamps,
        } = req.into_inner();
        let store = self.raft.store();
        let tasks = resolve_tasks(&store, &target);
        if tasks.is_empty() {
            return Err(Status::not_found(format!(
                "no service or task named {target:?}"
            )));
        }
        let mut sources = Vec::new();
        for t in tasks {
            let at = t
                .node_id
                .as_ref()
                .and_then(|n| store.nodes.get(n))
                .map(AgentAt::from);
            if let Some(addr) = at {
                let req = TaskLogsRequest {
                    task_id: t.id.clone(),
                    tail,
                    follow,
                    timestamps,
                };
                sources.push((req, t.name(), addr));
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let agents = self.agents.clone();
        let forward = move |(req, name, addr): (TaskLogsRequest, String, AgentAt),
                            tx: LogSender| {
            let agents = agents.clone();
            async move {
                if let Err(e) = forward_logs(req, &name, &addr, &agents, &tx).await {
                    warn!(task = %name, %e, "logs unavailable");
                    let _ = tx
                        .send(Ok(LogChunk {
                            task: name.clone(),
                            data: Vec::new(),
                            warning: format!(
                                "logs of {name} unavailable from {} ({}): {e}",
                                addr.host, addr.addr
                            ),
                            ..Default::default()
                        }))
                        .await;
                }
            }
        };
        if follow {
            // Every task streams at once; each ends when its container exits.
            for s in sources {
                tokio::spawn(forward(s, tx.clone()));
            }
        } else {
            // One task after the other, so each task's output stays together.
            tokio::spawn(async move {
                for s in sources {
                    forward(s, tx.clone()).await;
                }
            });
        }
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn set_manager_role(
        &self,
        req: Request<SetManagerRoleRequest>,
    ) -> Result<Response<ClusterInfoResponse>, Status> {
        let r = req.into_inner();
        let store = self.raft.store();
        let node = find_node(&store, &r.node)?;
        let host = node
            .addr
            .rsplit_once(':')
            .map_or(node.addr.as_str(), |(h, _)| h);
        let member = store
            .managers
            .iter()
            .find(|(_, m)| m.addr.rsplit_once(':').map(|(h, _)| h) == Some(host));
        let Some((&id, info)) = member else {
            if !r.voter {
                return Err(Status::failed_precondition(format!(
                    "{} runs no controller: it is a worker already",
                    node.hostname
                )));
            }
            if node.state != rudder_model::NodeState::Ready {
                return Err(Status::failed_precondition(format!(
                    "{} is {:?}: its agent must be connected to start a controller there",
                    node.hostname, node.state
                )));
            }
            if node.controller_id.is_some() {
                return self.cluster_info(Request::new(ClusterInfoRequest {})).await;
            }
            // A fresh raft id, never one a member had (ids of removed members are not
            // reused while anything still records them).
            let st = self.raft.status();
            let next = store
                .managers
                .keys()
                .copied()
                .chain(st.voters.iter().copied())
                .chain(st.learners.iter().copied())
                .chain(store.nodes.values().filter_map(|n| n.controller_id))
                .max()
                .unwrap_or(0)
                + 1;
            info!(node = %node.hostname, raft_id = next, "promoting: a controller starts there");
            self.raft
                .propose(Command::SetNodeController {
                    id: node.id.clone(),
                    raft_id: Some(next),
                })
                .await
                .map_err(raft_status)?;
            return self.cluster_info(Request::new(ClusterInfoRequest {})).await;
        };
        let st = self.raft.status();
        if !r.voter && st.voters == [id] {
            return Err(Status::failed_precondition(format!(
                "{} runs the only voting controller; promote another one first",
                node.hostname
            )));
        }
        info!(node = %node.hostname, raft_id = id, voter = r.voter, "changing manager role");
        self.raft
            .set_voter(id, &info.clone(), r.voter)
            .await
            .map_err(raft_status)?;
        self.cluster_info(Request::new(ClusterInfoRequest {})).await
    }

    async fn remove_manager(
        &self,
        req: Request<RemoveManagerRequest>,
    ) -> Result<Response<ClusterInfoResponse>, Status> {
        let id = req.into_inner().raft_id;
        let st = self.raft.status();
        if !st.voters.contains(&id) && !st.learners.contains(&id) {
            return Err(Status::not_found(format!(
                "no controller with raft id {id}"
            )));
        }
        if st.voters == [id] {
            return Err(Status::failed_precondition(
                "that is the only voting controller; the cluster would have none",
            ));
        }
        info!(raft_id = id, "removing a controller");
        let node = self
            .raft
            .store()
            .node_of_controller(id)
            .map(|n| n.id.clone());
        self.raft.remove_member(id).await.map_err(raft_status)?;
        // The removed controller's certificates stop working at once, it may never join
        // again under its id (H4), and its host is asked to run nothing more (C1).
        let mut cmds = vec![Command::Revoke {
            id: rudder_model::store::identity_key("manager", &crate::security::controller_cn(id)),
            reason: "removed from the controller group".into(),
            now: now_ms(),
        }];
        if let Some(n) = node {
            // No longer a manager host (placement's `node.role`), and no controller to start.
            cmds.push(Command::SetNodeController {
                id: n,
                raft_id: None,
            });
        }
        self.raft
            .propose(Command::Batch(cmds))
            .await
            .map_err(raft_status)?;
        self.cluster_info(Request::new(ClusterInfoRequest {})).await
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        let admin = crate::tls::caller(&req)
            .map(|c| c.node.clone())
            .unwrap_or_default();
        let r = req.into_inner();
        self.raft.read_index().await.map_err(raft_status)?;
        let store = self.raft.store();
        let node = find_node(&store, &r.node)?;
        if store.runs_controller(node) {
            let member =
                node.controller_id
                    .filter(|id| store.managers.contains_key(id))
                    .or_else(|| {
                        store.managers.keys().copied().find(|id| {
                            store.node_of_controller(*id).map(|n| &n.id) == Some(&node.id)
                        })
                    });
            if let Some(id) = member {
                return Err(Status::failed_precondition(format!(
                    "{} runs controller {id} of the group: `rctl cluster rm-manager {id}` first",
                    node.hostname
                )));
            }
        }
        if node.state == rudder_model::NodeState::Ready && !r.force {
            return Err(Status::failed_precondition(format!(
                "{} is ready: stop its agent first, or remove it anyway with --force (its \
                 certificates are revoked and its tasks move elsewhere)",
                node.hostname
            )));
        }
        let (id, hostname) = (node.id.clone(), node.hostname.clone());
        warn!(node = %id, %hostname, %admin, force = r.force, "removing a node; its certificates are revoked");
        self.raft
            .propose(Command::RemoveNode {
                id: id.clone(),
                now: now_ms(),
            })
            .await
            .map_err(raft_status)?;
        Ok(Response::new(RemoveNodeResponse { id, hostname }))
    }

    async fn list_networks(
        &self,
        _req: Request<ListNetworksRequest>,
    ) -> Result<Response<ListNetworksResponse>, Status> {
        let store = self.raft.store();
        Ok(Response::new(ListNetworksResponse {
            networks_json: store
                .networks
                .values()
                .map(|n| convert::json("network", n))
                .collect::<Result<_, _>>()?,
        }))
    }

    async fn remove_network(
        &self,
        req: Request<RemoveNetworkRequest>,
    ) -> Result<Response<RemoveNetworkResponse>, Status> {
        let name = req.into_inner().name;
        let store = self.raft.store();
        if !store.networks.contains_key(&name) {
            return Err(Status::not_found(format!("network {name:?} not found")));
        }
        let users: Vec<&str> = store
            .services
            .values()
            .filter(|s| s.spec.networks.contains(&name))
            .map(|s| s.spec.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(Status::failed_precondition(format!(
                "network {name:?} is in use by service(s) {}; remove them or take the network \
                 out of their specs first",
                users.join(", ")
            )));
        }
        self.raft
            .propose(Command::RemoveNetwork { name })
            .await
            .map_err(raft_status)?;
        Ok(Response::new(RemoveNetworkResponse {}))
    }

    async fn rotate_network_keys(
        &self,
        _req: Request<RotateNetworkKeysRequest>,
    ) -> Result<Response<RotateNetworkKeysResponse>, Status> {
        self.raft
            .propose(Command::RotateOverlayKeys)
            .await
            .map_err(raft_status)?;
        Ok(Response::new(RotateNetworkKeysResponse {
            epoch: self.raft.store().overlay_key_epoch,
        }))
    }

    async fn rotate_data_key(
        &self,
        req: Request<RotateDataKeyRequest>,
    ) -> Result<Response<RotateDataKeyResponse>, Status> {
        let Some(at_rest) = &self.at_rest else {
            return Err(Status::unimplemented(
                "rotate-data-key: this controller keeps no data at rest",
            ));
        };
        let (key_id, old_key_deleted) =
            at_rest
                .rotate(req.into_inner().wait)
                .await
                .map_err(|e| match e {
                    crate::crypt::CryptError::RotationInProgress(_) => {
                        Status::failed_precondition(e.to_string())
                    }
                    e => Status::internal(format!("rotate-data-key: {e}")),
                })?;
        let raft_id = self.raft.status().id;
        info!(raft_id, key_id, old_key_deleted, "rotated the data key");
        Ok(Response::new(RotateDataKeyResponse {
            raft_id,
            key_id,
            old_key_deleted,
        }))
    }

    async fn set_autolock(
        &self,
        req: Request<SetAutolockRequest>,
    ) -> Result<Response<UnlockKeyResponse>, Status> {
        let on = req.into_inner().on;
        self.raft.read_index().await.map_err(raft_status)?;
        let key = match (on, self.raft.store().unlock_key.clone()) {
            // Already on: the key stays (rotation is `unlock-key --rotate`).
            (true, Some(k)) => Some(k),
            (true, None) => Some(new_unlock_key()?),
            (false, _) => None,
        };
        self.raft
            .propose(Command::SetUnlockKey { key: key.clone() })
            .await
            .map_err(raft_status)?;
        info!(on, "autolock set");
        Ok(Response::new(UnlockKeyResponse {
            unlock_key: key.map(|k| k.0).unwrap_or_default(),
        }))
    }

    async fn unlock_key(
        &self,
        req: Request<UnlockKeyRequest>,
    ) -> Result<Response<UnlockKeyResponse>, Status> {
        let rotate = req.into_inner().rotate;
        self.raft.read_index().await.map_err(raft_status)?;
        let Some(mut key) = self.raft.store().unlock_key.clone() else {
            return Err(Status::failed_precondition(
                "unlock-key: autolock is off; turn it on with `rctl cluster autolock on`",
            ));
        };
        if rotate {
            key = new_unlock_key()?;
            self.raft
                .propose(Command::SetUnlockKey {
                    key: Some(key.clone()),
                })
                .await
                .map_err(raft_status)?;
            info!("rotated the unlock key");
        }
        Ok(Response::new(UnlockKeyResponse { unlock_key: key.0 }))
    }

    async fn backup(
        &self,
        req: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let key = rudder_pki::backup::BackupKey::from_bytes(&req.into_inner().key)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Consistent: every write acknowledged before this call is in the copy.
        let index = self.raft.read_index().await.map_err(raft_status)?;
        let store = self.raft.store();
        let file = tokio::task::spawn_blocking(move || {
            let plain = rudder_model::snapshot::encode(&store)
                .map_err(|e| Status::internal(format!("backup: {e}")))?;
            rudder_pki::backup::seal(&key, plain).map_err(|e| Status::internal(e.to_string()))
        })
        .await
        .map_err(|e| Status::internal(format!("backup: {e}")))??;
        let total = file.len() as u64;
        info!(index, bytes = total, "backup taken");
        let chunks: Vec<Result<BackupChunk, Status>> = file
            .chunks(BACKUP_CHUNK)
            .enumerate()
            .map(|(i, c)| {
                Ok(BackupChunk {
                    data: c.to_vec(),
                    index: if i == 0 { index } else { 0 },
                    total: if i == 0 { total } else { 0 },
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn list_volumes(
        &self,
        _req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let store = self.raft.store();
        Ok(Response::new(ListVolumesResponse {
            volumes: store
                .volumes
                .values()
                .map(|v| -> Result<VolumeSummary, Status> {
                    Ok(VolumeSummary {
                        volume_json: convert::json("volume", v)?,
                        hosts: rudder_model::views::hosts_with_copy(&store, &v.spec.name),
                        services: store
                            .volume_users(&v.spec.name)
                            .into_iter()
                            .map(String::from)
                            .collect(),
                    })
                })
                .collect::<Result<_, _>>()?,
        }))
    }

    async fn put_secret(
        &self,
        req: Request<PutSecretRequest>,
    ) -> Result<Response<PutSecretResponse>, Status> {
        crate::secret_api::put(&self.raft, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_secrets(
        &self,
        req: Request<ListSecretsRequest>,
    ) -> Result<Response<ListSecretsResponse>, Status> {
        crate::secret_api::list(&self.raft.store(), req.into_inner()).map(Response::new)
    }

    async fn inspect_secret(
        &self,
        req: Request<InspectSecretRequest>,
    ) -> Result<Response<InspectSecretResponse>, Status> {
        crate::secret_api::inspect(&self.raft.store(), req.into_inner()).map(Response::new)
    }

    async fn remove_secret(
        &self,
        req: Request<RemoveSecretRequest>,
    ) -> Result<Response<RemoveSecretResponse>, Status> {
        crate::secret_api::remove(&self.raft, req.into_inner()).await?;
        Ok(Response::new(RemoveSecretResponse {}))
    }

    async fn remove_volume(
        &self,
        req: Request<RemoveVolumeRequest>,
    ) -> Result<Response<RemoveVolumeResponse>, Status> {
        let name = req.into_inner().name;
        let store = self.raft.store();
        if !store.volumes.contains_key(&name) {
            return Err(Status::not_found(format!(
                "volume {name:?} not found (see `rctl volume ls`)"
            )));
        }
        let users = store.volume_users(&name);
        if !users.is_empty() {
            return Err(Status::failed_precondition(format!(
                "volume {name:?} is in use by service(s) {}; remove them or take the volume out \
                 of their mounts first",
                users.join(", ")
            )));
        }
        if let Some(task) = rudder_model::slotvol::live_user(&store, &name) {
            return Err(Status::failed_precondition(format!(
                "volume {name:?} is in use by task {task}; scale the service down (or wait \
                 for the task to end) before removing it"
            )));
        }
        info!(volume = %name, "removing");
        self.raft
            .propose(Command::RemoveVolume { name })
            .await
            .map_err(raft_status)?;
        Ok(Response::new(RemoveVolumeResponse {}))
    }

    async fn cluster_info(
        &self,
        _req: Request<ClusterInfoRequest>,
    ) -> Result<Response<ClusterInfoResponse>, Status> {
        let s = self.raft.status();
        let managers = crate::peer::manager_summaries(&self.raft);
        Ok(Response::new(ClusterInfoResponse {
            raft_id: s.id,
            leader_id: s.leader_id,
            term: s.term,
            applied: s.applied,
            registry: self.registry.clone(),
            managers,
            version: rudder_version::full(),
        }))
    }
}

type LogSender = tokio::sync::mpsc::Sender<Result<LogChunk, Status>>;

/// Streams one task's log from its agent. Bounded in time (unless following) so a dead host
/// never hangs the caller.
async fn forward_logs(
    req: TaskLogsRequest,
    name: &str,
    at: &AgentAt,
    agents: &AgentDialer,
    tx: &LogSender,
) -> Result<(), String> {
    let per_call = (!req.follow).then_some(LOGS_TIMEOUT);
    let dialed = agents.dial_kept(at, per_call).await;
    let mut client = dialed.map_err(|e| e.message().to_string())?;
    let mut stream = client
        .task_logs(req)
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|e| e.message().to_string())?
    {
        let chunk = LogChunk {
            task: name.to_string(),
            ..chunk
        };
        if tx.send(Ok(chunk)).await.is_err() {
            break;
        }
    }
    Ok(())
}

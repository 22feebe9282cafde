//! The Control API that `rctl` speaks. Converts between wire messages and model types, and maps
//! errors to `tonic::Status` with messages a user can act on. Writes go through Raft; reads come
//! from the last applied store.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use rudder_model::network::NetworkSpec;
use rudder_model::spec::ServiceMode;
use rudder_model::volume::VolumeSpec;
use rudder_model::{Availability, Command, ServiceSpec, Store, Task, TaskState};
use rudder_proto::v1::agent_api_client::AgentApiClient;
use rudder_proto::v1::control_server::Control;
use rudder_proto::v1::*;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::raft_node::{RaftError, RaftHandle};
use crate::{new_id, now_ms};

pub struct ControlApi {
    pub raft: RaftHandle,
    pub registry: String,
    /// How to reach agents (mutual TLS, server name `worker.rudder`); plain when `None`.
    /// (Replaced when this controller's certificate is renewed.)
    /// This controller's certificates (latest renewal), to dial agents and other controllers;
    /// `None` only in tests without TLS.
    pub agent_tls: std::sync::Arc<std::sync::RwLock<Option<rudder_pki::tls::NodeCerts>>>,
    /// This controller's registry, where `Commit` stores images.
    pub images: crate::registry::RegistryState,
    /// Nodes running a build, which may pull any image from the registry meanwhile.
    pub pull_leases: std::sync::Arc<crate::registry::tls::PullLeases>,
    /// This controller's data at rest and its data key (`RotateDataKey`); `None` in tests
    /// without a data dir.
    pub at_rest: Option<std::sync::Arc<crate::security::AtRest>>,
}

/// A fresh autolock unlock key, as the store records it.
fn new_unlock_key() -> Result<rudder_model::store::UnlockKeyText, Status> {
    let k = crate::crypt::UnlockKey::generate()
        .map_err(|e| Status::internal(format!("autolock: {e}")))?;
    Ok(rudder_model::store::UnlockKeyText(k.encode()))
}

pub(crate) fn raft_status(e: RaftError) -> Status {
    match e {
        RaftError::NotLeader(_) => Status::unavailable(e.to_string()),
        RaftError::Timeout => Status::deadline_exceeded(e.to_string()),
        RaftError::Apply(rudder_model::store::ApplyError::NotFound { .. }) => {
            Status::not_found(e.to_string())
        }
        RaftError::Apply(rudder_model::store::ApplyError::Volume { .. })
        | RaftError::Apply(rudder_model::store::ApplyError::Secret { .. }) => {
            Status::failed_precondition(e.to_string())
        }
        other => Status::internal(other.to_string()),
    }
}

/// Refuses, before anything is proposed, what the state machine would reject or what would
/// leave tasks without an address: a network whose shape changes, overlapping subnets, a
/// service on a network that neither exists nor comes in the same apply, and a name (service
/// or alias) that another service already has on a shared network.
fn check_networks(
    store: &Store,
    networks: &[NetworkSpec],
    services: &[ServiceSpec],
) -> Result<(), String> {
    use rudder_model::network::{overlaps, parse_subnet};
    let mut taken: Vec<(String, ipnet::Ipv4Net)> = store
        .networks
        .values()
        .map(|n| (n.spec.name.clone(), n.subnet))
        .collect();
    for spec in networks {
        if let Some(existing) = store.networks.get(&spec.name) {
            if !existing.spec.same_shape(spec) {
                return Err(format!(
                    "network {:?}: driver, subnet, encrypted and internal cannot change once \
                     it exists (it is {}, {}{}); remove it first",
                    spec.name,
                    existing.subnet,
                    if existing.spec.encrypted {
                        "encrypted"
                    } else {
                        "unencrypted"
                    },
                    if existing.spec.internal {
                        ", internal"
                    } else {
                        ""
                    }
                ));
            }
            continue;
        }
        if let Some(s) = &spec.subnet {
            let net =
                parse_subnet(s).map_err(|m| format!("network {:?}: subnet: {m}", spec.name))?;
            if let Some((other, o)) = taken.iter().find(|(_, o)| overlaps(*o, net)) {
                return Err(format!(
                    "network {:?}: subnet: {net} overlaps network {other:?} ({o})",
                    spec.name
                ));
            }
            taken.push((spec.name.clone(), net));
        }
    }
    for svc in services {
        for (i, n) in svc.networks.iter().enumerate() {
            if !store.networks.contains_key(n) && !networks.iter().any(|s| s.name == *n) {
                return Err(format!(
                    "service {:?}: networks[{i}]: network {n:?} does not exist (declare it with \
                     `kind: Network` or see `rctl network ls`)",
                    svc.name
                ));
            }
        }
    }
    // Names on a network (services and their aliases) are unique: DNS answers one of them.
    let others = store
        .services
        .values()
        .map(|s| &s.spec)
        .filter(|s| !services.iter().any(|a| a.name == s.name))
        .chain(services.iter());
    let others: Vec<&ServiceSpec> = others.collect();
    for svc in services {
        for o in others.iter().filter(|o| o.name != svc.name) {
            let Some(net) = svc.networks.iter().find(|n| o.networks.contains(n)) else {
                continue;
            };
            let taken = |name: &str| {
                o.name.eq_ignore_ascii_case(name)
                    || o.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
            };
            if let Some((i, a)) = svc.aliases.iter().enumerate().find(|(_, a)| taken(a)) {
                return Err(format!(
                    "service {:?}: aliases[{i}]: {a:?} is already a name of service {:?} on \
                     network {net:?}",
                    svc.name, o.name
                ));
            }
            if o.aliases.iter().any(|a| a.eq_ignore_ascii_case(&svc.name)) {
                return Err(format!(
                    "service {:?}: its name is already an alias of service {:?} on network \
                     {net:?}",
                    svc.name, o.name
                ));
            }
        }
    }
    Ok(())
}

/// Volumes the services mount that neither exist nor come in this apply: applying the
/// services declares them (as Docker does), reported as created.
fn implicit_volumes(
    store: &Store,
    declared: &[VolumeSpec],
    services: &[ServiceSpec],
) -> Vec<VolumeSpec> {
    let mut out: Vec<VolumeSpec> = Vec::new();
    for svc in services {
        for v in rudder_model::volume::volumes_of(svc) {
            if !store.volumes.contains_key(v)
                && !declared.iter().chain(out.iter()).any(|d| d.name == v)
            {
                out.push(VolumeSpec::named(v));
            }
        }
    }
    out
}

pub fn task_summary(store: &Store, t: &Task) -> TaskSummary {
    let node = t
        .node_id
        .as_ref()
        .and_then(|n| store.nodes.get(n))
        .map(|n| n.hostname.clone())
        .unwrap_or_default();
    TaskSummary {
        id: t.id.clone(),
        name: t.name(),
        service: t.service_name.clone(),
        slot: t.slot,
        node_id: t.node_id.clone().unwrap_or_default(),
        node,
        desired_state: t.desired_state.to_string(),
        state: t.status.state.to_string(),
        message: t.status.message.clone(),
        error: t.status.error.clone(),
        container_id: t.status.container_id.clone(),
        has_exit_code: t.status.exit_code.is_some(),
        exit_code: t.status.exit_code.unwrap_or(0),
        timestamp_ms: t.status.timestamp,
        image: t.spec.image.clone(),
    }
}

/// A node by id, unique id prefix or hostname.
pub(crate) fn find_node<'a>(store: &'a Store, key: &str) -> Result<&'a rudder_model::Node, Status> {
    if let Some(n) = store.nodes.get(key) {
        return Ok(n);
    }
    let matches: Vec<_> = store
        .nodes
        .values()
        .filter(|n| n.hostname == key || (key.len() >= 4 && n.id.starts_with(key)))
        .collect();
    match matches.as_slice() {
        [n] => Ok(n),
        [] => Err(Status::not_found(format!("no node {key:?}"))),
        _ => Err(Status::invalid_argument(format!(
            "{key:?} names {} nodes; use the node id",
            matches.len()
        ))),
    }
}

pub fn node_summary(store: &Store, n: &rudder_model::Node) -> NodeSummary {
    let active: Vec<&Task> = store.tasks_on(&n.id).filter(|t| t.is_active()).collect();
    NodeSummary {
        id: n.id.clone(),
        hostname: n.hostname.clone(),
        addr: n.addr.clone(),
        state: format!("{:?}", n.state).to_lowercase(),
        tasks: active.len() as u64,
        availability: n.availability.as_str().to_string(),
        role: n.role.as_str().to_string(),
        labels: n.labels.clone().into_iter().collect(),
        cpus_milli: n.resources.cpus,
        memory_bytes: n.resources.memory,
        reserved_cpus_milli: active
            .iter()
            .map(|t| t.spec.resources.reservations.cpus)
            .sum(),
        reserved_memory_bytes: active
            .iter()
            .map(|t| t.spec.resources.reservations.memory)
            .sum(),
        cert_not_after_ms: n.cert_not_after,
    }
}

/// Tasks a logs/exec target names: a service's tasks, or one task by id, id prefix or name.
pub fn resolve_tasks<'a>(store: &'a Store, target: &str) -> Vec<&'a Task> {
    if let Some(svc) = store.services.get(target) {
        let mut v: Vec<&Task> = store.tasks_of(&svc.id).collect();
        v.sort_by_key(|t| (t.slot, t.created_at));
        return v;
    }
    store
        .tasks
        .values()
        .filter(|t| {
            t.id == target || t.name() == target || (target.len() >= 4 && t.id.starts_with(target))
        })
        .collect()
}

/// Size of one backup message (well under gRPC's default 4 MiB limit).
const BACKUP_CHUNK: usize = 1024 * 1024;
type BackupStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send>>;
type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlApi {
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let req = req.into_inner();
        let mut specs = Vec::new();
        for (i, json) in req.service_specs_json.iter().enumerate() {
            let spec: ServiceSpec = serde_json::from_str(json)
                .map_err(|e| Status::invalid_argument(format!("service #{}: {e}", i + 1)))?;
            spec.validate()
                .map_err(|e| Status::invalid_argument(format!("service {:?}: {e}", spec.name)))?;
            specs.push(spec);
        }
        let mut networks = Vec::new();
        for (i, json) in req.network_specs_json.iter().enumerate() {
            let spec: NetworkSpec = serde_json::from_str(json)
                .map_err(|e| Status::invalid_argument(format!("network #{}: {e}", i + 1)))?;
            spec.validate()
                .map_err(|e| Status::invalid_argument(format!("network {:?}: {e}", spec.name)))?;
            networks.push(spec);
        }
        let mut volumes = Vec::new();
        for (i, json) in req.volume_specs_json.iter().enumerate() {
            let spec: VolumeSpec = serde_json::from_str(json)
                .map_err(|e| Status::invalid_argument(format!("volume #{}: {e}", i + 1)))?;
            spec.validate()
                .map_err(|e| Status::invalid_argument(format!("volume {:?}: {e}", spec.name)))?;
            volumes.push(spec);
        }
        let store = self.raft.store();
        check_networks(&store, &networks, &specs).map_err(Status::invalid_argument)?;
        let incoming: Vec<_> = req
            .secrets
            .iter()
            .filter_map(|s| {
                rudder_model::secret::ObjectKind::parse(&s.kind).map(|k| (k, s.name.clone()))
            })
            .collect();
        crate::secret_api::check_refs(&store, &specs, &incoming)
            .map_err(Status::failed_precondition)?;
        let mut results = Vec::new();
        let mut cmds = Vec::new();
        // Secrets and configs first: the services below may use their new versions.
        for mut put in req.secrets {
            put.mode = String::new();
            let (kind, name) = (put.kind.clone(), put.name.clone());
            let (cmd, action) = crate::secret_api::put_command(&store, put)?;
            results.push(ApplyResult {
                kind: if kind == "config" { "Config" } else { "Secret" }.into(),
                name: name.clone(),
                action: action.into(),
            });
            if let Some(cmd) = cmd {
                info!(%kind, %name, action, "apply");
                cmds.push(cmd);
            }
        }
        for spec in networks {
            let action = match store.networks.get(&spec.name) {
                None => "created",
                Some(n) if n.spec.labels == spec.labels => "unchanged",
                Some(_) => "updated",
            };
            results.push(ApplyResult {
                kind: "Network".into(),
                name: spec.name.clone(),
                action: action.into(),
            });
            if action != "unchanged" {
                info!(network = %spec.name, action, "apply");
                cmds.push(Command::PutNetwork {
                    id: new_id(),
                    spec,
                    now: now_ms(),
                });
            }
        }
        for spec in volumes
            .iter()
            .cloned()
            .chain(implicit_volumes(&store, &volumes, &specs))
        {
            let action = match store.volumes.get(&spec.name) {
                None => "created",
                Some(v) if v.spec == spec || !volumes.contains(&spec) => "unchanged",
                Some(_) => "updated",
            };
            results.push(ApplyResult {
                kind: "Volume".into(),
                name: spec.name.clone(),
                action: action.into(),
            });
            // Implicit ones are declared by their service's `PutService`.
            if action != "unchanged" && volumes.contains(&spec) {
                info!(volume = %spec.name, action, "apply");
                cmds.push(Command::PutVolume {
                    spec,
                    now: now_ms(),
                });
            }
        }
        for spec in specs {
            // Compared as the store would keep it: references resolved to versions.
            let mut resolved = spec.clone();
            store.resolve_refs(&mut resolved);
            let action = match store.services.get(&spec.name) {
                None => "created",
                Some(s) if s.spec == resolved => "unchanged",
                Some(_) => "updated",
            };
            results.push(ApplyResult {
                kind: "Service".into(),
                name: spec.name.clone(),
                action: action.into(),
            });
            if action != "unchanged" {
                info!(service = %spec.name, action, "apply");
                cmds.push(Command::PutService {
                    id: new_id(),
                    spec: Box::new(spec),
                    now: now_ms(),
                });
            }
        }
        if !cmds.is_empty() {
            // One entry: a file is applied whole.
            self.raft
                .propose(Command::Batch(cmds))
                .await
                .map_err(raft_status)?;
        }
        Ok(Response::new(ApplyResponse { results }))
    }

    async fn remove_service(
        &self,
        req: Request<RemoveServiceRequest>,
    ) -> Result<Response<RemoveServiceResponse>, Status> {
        let name = req.into_inner().name;
        if !self.raft.store().services.contains_key(&name) {
            return Err(Status::not_found(format!("service {name:?} not found")));
        }
        self.raft
            .propose(Command::RemoveService { name })
            .await
            .map_err(raft_status)?;
        Ok(Response::new(RemoveServiceResponse {}))
    }

    async fn list_services(
        &self,
        _req: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let store = self.raft.store();
        let services = store
            .services
            .values()
            .map(|s| ServiceSummary {
                id: s.id.clone(),
                name: s.spec.name.clone(),
                image: s.spec.image.clone(),
                desired: if s.spec.mode == ServiceMode::Global {
                    store
                        .tasks_of(&s.id)
                        .filter(|t| t.desired_state == TaskState::Running)
                        .count() as u64
                } else {
                    s.spec.replicas
                },
                global: s.spec.mode == ServiceMode::Global,
                update_state: s
                    .update_status
                    .as_ref()
                    .map(|u| u.state.as_str().to_string())
                    .unwrap_or_default(),
                update_message: s
                    .update_status
                    .as_ref()
                    .map(|u| u.message.clone())
                    .unwrap_or_default(),
                spec_version: s.spec_version,
                running: store
                    .tasks_of(&s.id)
                    .filter(|t| {
                        t.desired_state == TaskState::Running
                            && t.status.state == TaskState::Running
                    })
                    .count() as u64,
                version: s.version,
                spec_json: serde_json::to_string(&s.spec).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(ListServicesResponse { services }))
    }

    async fn list_tasks(
        &self,
        req: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let service = req.into_inner().service;
        let store = self.raft.store();
        let mut tasks: Vec<&Task> = if service.is_empty() {
            store.tasks.values().collect()
        } else {
            let svc = store
                .services
                .get(&service)
                .ok_or_else(|| Status::not_found(format!("service {service:?} not found")))?;
            store.tasks_of(&svc.id).collect()
        };
        tasks.sort_by(|a, b| {
            (&a.service_name, a.slot, std::cmp::Reverse(a.created_at)).cmp(&(
                &b.service_name,
                b.slot,
                std::cmp::Reverse(b.created_at),
            ))
        });
        let tasks = tasks.into_iter().map(|t| task_summary(&store, t)).collect();
        Ok(Response::new(ListTasksResponse { tasks }))
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
        let availability = match req.availability.as_str() {
            "" => None,
            a => Some(a.parse::<Availability>().map_err(|_| {
                Status::invalid_argument(format!(
                    "availability: {a:?} is not one of active, pause, drain"
                ))
            })?),
        };
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
        let store = self.raft.store();
        let svc = store
            .services
            .get(&req.service)
            .ok_or_else(|| Status::not_found(format!("service {:?} not found", req.service)))?;
        if svc.spec.mode == ServiceMode::Global {
            return Err(Status::failed_precondition(format!(
                "service {:?} is global: it runs one task per eligible node and cannot be scaled",
                req.service
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

    async fn rollback(
        &self,
        req: Request<RollbackRequest>,
    ) -> Result<Response<RollbackResponse>, Status> {
        let service = req.into_inner().service;
        let store = self.raft.store();
        let svc = store
            .services
            .get(&service)
            .ok_or_else(|| Status::not_found(format!("service {service:?} not found")))?;
        let Some(previous) = &svc.previous_spec else {
            return Err(Status::failed_precondition(format!(
                "service {service:?} has no previous spec to roll back to"
            )));
        };
        // The names it would take back must still be free (another service may have taken
        // an alias it dropped).
        check_networks(&store, &[], std::slice::from_ref(previous)).map_err(|m| {
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
                .map(crate::exec_api::AgentAt::from);
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
        let tls = self.agent_tls.read().expect("agent tls lock").clone();
        let forward =
            move |(req, name, addr): (TaskLogsRequest, String, crate::exec_api::AgentAt),
                  tx: LogSender| {
                let tls = tls.clone();
                async move {
                    if let Err(e) = forward_logs(req, &name, &addr, tls, &tx).await {
                        warn!(task = %name, %e, "logs unavailable");
                        let _ = tx
                            .send(Ok(LogChunk {
                                task: name.clone(),
                                data: Vec::new(),
                                warning: format!(
                                    "logs of {name} unavailable from {} ({}): {e}",
                                    addr.host, addr.addr
                                ),
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
                .map(|n| serde_json::to_string(n).unwrap_or_default())
                .collect(),
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
            let plain = serde_json::to_vec(&*store)
                .map_err(|e| Status::internal(format!("backup: serialize the store: {e}")))?;
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
                .map(|v| VolumeSummary {
                    volume_json: serde_json::to_string(v).unwrap_or_default(),
                    hosts: rudder_model::volume::hosts_with_copy(&store, &v.spec.name),
                    services: rudder_model::volume::users(&store, &v.spec.name)
                        .into_iter()
                        .map(String::from)
                        .collect(),
                })
                .collect(),
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
        let users = rudder_model::volume::users(&store, &name);
        if !users.is_empty() {
            return Err(Status::failed_precondition(format!(
                "volume {name:?} is in use by service(s) {}; remove them or take the volume out \
                 of their mounts first",
                users.join(", ")
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
        }))
    }
}

type LogSender = tokio::sync::mpsc::Sender<Result<LogChunk, Status>>;

/// Streams one task's log from its agent. Bounded in time (unless following) so a dead host
/// never hangs the caller.
async fn forward_logs(
    req: TaskLogsRequest,
    name: &str,
    at: &crate::exec_api::AgentAt,
    tls: Option<rudder_pki::tls::NodeCerts>,
    tx: &LogSender,
) -> Result<(), String> {
    let mut endpoint = crate::exec_api::agent_endpoint(tls.as_ref(), at)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_keepalive(Some(Duration::from_secs(5)));
    if !req.follow {
        endpoint = endpoint.timeout(Duration::from_secs(30));
    }
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut client = AgentApiClient::new(channel);
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

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::store::Command;

    fn spec(name: &str, aliases: &[&str]) -> ServiceSpec {
        serde_json::from_value(serde_json::json!({
            "name": name, "image": "x", "networks": ["back"], "aliases": aliases,
        }))
        .unwrap()
    }

    #[test]
    fn names_are_unique_on_a_network() {
        let mut store = Store::default();
        let net: NetworkSpec = serde_json::from_value(serde_json::json!({"name": "back"})).unwrap();
        store
            .apply(
                1,
                Command::PutNetwork {
                    id: "n1".into(),
                    spec: net,
                    now: 0,
                },
            )
            .unwrap();
        store
            .apply(
                2,
                Command::PutService {
                    id: "s1".into(),
                    spec: Box::new(spec("db", &["postgres"])),
                    now: 0,
                },
            )
            .unwrap();
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
            let e = check_networks(&store, &[], &[svc]).unwrap_err();
            assert!(e.contains(words) && e.contains("network \"back\""), "{e}");
        }
        // Within one apply too; and a service may keep its own aliases.
        let e = check_networks(&store, &[], &[spec("a", &["x"]), spec("b", &["x"])]).unwrap_err();
        assert!(e.contains("\"x\" is already a name of service"), "{e}");
        check_networks(&store, &[], &[spec("db", &["postgres", "pg"])]).unwrap();
    }
}

//! The Control API's stacks (`rctl stack deploy|ls|services|ps|rollback|rm`): a thin edge over
//! `rudder_model::stack`, whose plans are pure. Every write is one raft entry (the objects'
//! commands and the stack record together). Served on the Control service, so only admin
//! certificates reach it (see `security`); names and sizes are checked here before anything is
//! proposed, and again when the command is applied.

use rudder_model::stack::{self, StackError, StackPlan};
use rudder_proto::v1::{
    DeployStackRequest, DeployStackResponse, ListStacksResponse, RemoveStackRequest,
    RemoveStackResponse, RollbackStackRequest,
};
use tonic::Status;
use tracing::info;

use crate::convert::{self, raft_status};
use crate::raft_node::RaftHandle;
use crate::{new_id, now_ms};

/// The `Status` a stack refusal becomes.
fn status(e: StackError) -> Status {
    match e {
        StackError::NotFound(_) => Status::not_found(e.to_string()),
        StackError::NoPrevious(_) => Status::failed_precondition(e.to_string()),
        StackError::TooLarge { .. } | StackError::BadName(_) | StackError::Cycle { .. } => {
            Status::invalid_argument(e.to_string())
        }
        StackError::Apply(a) => convert::apply_status(a),
    }
}

/// Proposes `plan` and reports it with the stack's versions afterwards.
async fn run(
    raft: &RaftHandle,
    name: &str,
    plan: StackPlan,
) -> Result<DeployStackResponse, Status> {
    for r in &plan.results {
        if r.action != rudder_model::apply::Action::Unchanged {
            info!(stack = name, kind = r.kind.as_str(), name = %r.name, action = r.action.as_str(), "stack");
        }
    }
    for s in &plan.removed {
        info!(stack = name, service = %s, "stack: service removed");
    }
    raft.propose(plan.command).await.map_err(raft_status)?;
    let store = raft.store();
    let s = store.stacks.get(name);
    Ok(DeployStackResponse {
        results: plan.results.iter().map(convert::apply_result).collect(),
        removed_services: plan.removed,
        version: s.map_or(0, |s| s.current.version),
        previous_version: s.and_then(|s| s.previous.as_ref()).map_or(0, |p| p.version),
    })
}

pub(crate) async fn deploy(
    raft: &RaftHandle,
    req: DeployStackRequest,
) -> Result<DeployStackResponse, Status> {
    stack::check_name(&req.name).map_err(status)?;
    let apply = req
        .apply
        .ok_or_else(|| Status::invalid_argument("stack: no manifests"))?;
    let dry_run = apply.dry_run;
    let manifests = convert::manifests(apply)?;
    let store = raft.store();
    let plan =
        stack::deploy_plan(&store, &req.name, manifests, now_ms(), &mut new_id).map_err(status)?;
    if dry_run {
        // What the deploy would do; nothing is proposed (`rctl apply --dry-run`, `rctl diff`).
        let s = store.stacks.get(&req.name);
        return Ok(DeployStackResponse {
            results: plan.results.iter().map(convert::apply_result).collect(),
            removed_services: plan.removed,
            version: s.map_or(0, |s| s.current.version),
            previous_version: s.and_then(|s| s.previous.as_ref()).map_or(0, |p| p.version),
        });
    }
    drop(store);
    run(raft, &req.name, plan).await
}

pub(crate) async fn rollback(
    raft: &RaftHandle,
    req: RollbackStackRequest,
) -> Result<DeployStackResponse, Status> {
    stack::check_name(&req.name).map_err(status)?;
    let plan =
        stack::rollback_plan(&raft.store(), &req.name, now_ms(), &mut new_id).map_err(status)?;
    info!(stack = %req.name, "stack: rollback");
    run(raft, &req.name, plan).await
}

pub(crate) fn list(store: &rudder_model::Store) -> Result<ListStacksResponse, Status> {
    Ok(ListStacksResponse {
        stacks_json: store
            .stacks
            .values()
            .map(|s| convert::json("stack", s))
            .collect::<Result<_, _>>()?,
    })
}

pub(crate) async fn remove(
    raft: &RaftHandle,
    req: RemoveStackRequest,
) -> Result<RemoveStackResponse, Status> {
    stack::check_name(&req.name).map_err(status)?;
    let Some((services, cmd)) = stack::remove_plan(&raft.store(), &req.name) else {
        return Ok(RemoveStackResponse {
            removed_services: Vec::new(),
            found: false,
        });
    };
    info!(stack = %req.name, "stack: removed");
    raft.propose(cmd).await.map_err(raft_status)?;
    Ok(RemoveStackResponse {
        removed_services: services,
        found: true,
    })
}

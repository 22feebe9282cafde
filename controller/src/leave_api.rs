//! `Dispatcher/Leave`: a worker leaves with its own certificate (`rudder leave` on a host that
//! has no admin credentials). The same two steps as the admin path (`UpdateNode` to drain,
//! then `RemoveNode`), limited to the caller's own node:
//!
//! - the node is the one the caller's certificate names; a request naming another is refused
//!   (identity comes from the certificate, the message may only repeat it);
//! - a controller's identity, or a node whose host runs a controller of the group, is refused:
//!   a manager leaves with an admin certificate, which also takes its controller out of the
//!   raft group after the quorum check;
//! - removal needs the node drained first (a first call with `remove: false`), so that a
//!   stolen worker certificate can at worst take its own host out, never skip the drain.

use rudder_model::node::{Availability, Node};
use rudder_model::{Command, Store, TaskState};
use rudder_pki::ca::PeerIdentity;
use rudder_proto::v1::{LeaveRequest, LeaveResponse};
use tonic::Status;
use tracing::{info, warn};

use crate::convert::raft_status;
use crate::now_ms;
use crate::raft_node::RaftHandle;

/// The caller's node, if it may leave by itself; the refusal otherwise. Pure.
pub fn leaving_node<'a>(
    caller: &PeerIdentity,
    req: &LeaveRequest,
    store: &'a Store,
) -> Result<&'a Node, Status> {
    if !req.node_id.is_empty() && req.node_id != caller.node {
        return Err(Status::permission_denied(format!(
            "leave: this certificate is for node {}, not {}: a node leaves only for itself \
             (an admin removes others: rctl node rm)",
            caller.node, req.node_id
        )));
    }
    if caller
        .node
        .starts_with(crate::cluster_api::CONTROLLER_PREFIX)
    {
        return Err(Status::permission_denied(format!(
            "leave: {} is a controller's identity, not a node's",
            caller.node
        )));
    }
    let node = store
        .nodes
        .get(&caller.node)
        .ok_or_else(|| Status::not_found(format!("leave: no node {} here", caller.node)))?;
    if store.runs_controller(node) {
        return Err(Status::failed_precondition(format!(
            "leave: {} runs a controller of the group: a manager leaves with an admin \
             certificate (rudder leave --context FILE), which takes its controller out of \
             the raft group first",
            node.hostname
        )));
    }
    if req.remove && node.availability != Availability::Drain {
        return Err(Status::failed_precondition(format!(
            "leave: {} is not drained: drain it first (a leave request without remove)",
            node.hostname
        )));
    }
    Ok(node)
}

/// Tasks on `node` that still hold its resources: assigned, preparing, starting or running.
pub fn live_tasks(store: &Store, node: &str) -> u64 {
    store
        .tasks_on(node)
        .filter(|t| {
            matches!(
                t.status.state,
                TaskState::Assigned
                    | TaskState::Preparing
                    | TaskState::Starting
                    | TaskState::Running
            )
        })
        .count() as u64
}

/// Serves one `Leave` call from `caller`.
pub async fn leave(
    raft: &RaftHandle,
    caller: &PeerIdentity,
    req: LeaveRequest,
) -> Result<LeaveResponse, Status> {
    // Decide on what every write acknowledged so far says (a drain just made elsewhere).
    raft.read_index().await.map_err(raft_status)?;
    let store = raft.store();
    let node = leaving_node(caller, &req, &store).inspect_err(|e| {
        warn!(cert = %caller.node, claimed = %req.node_id, remove = req.remove, err = %e.message(),
            "leave: refused");
    })?;
    let (id, hostname) = (node.id.clone(), node.hostname.clone());
    if req.remove {
        warn!(node = %id, %hostname, "leave: the node removes itself; its certificates are revoked");
        raft.propose(Command::RemoveNode {
            id: id.clone(),
            now: now_ms(),
        })
        .await
        .map_err(raft_status)?;
        return Ok(LeaveResponse {
            node_id: id,
            hostname,
            live_tasks: 0,
        });
    }
    if node.availability != Availability::Drain {
        info!(node = %id, %hostname, "leave: the node drains itself");
        raft.propose(Command::UpdateNode {
            id: id.clone(),
            availability: Some(Availability::Drain),
            labels_add: Default::default(),
            labels_rm: Vec::new(),
        })
        .await
        .map_err(raft_status)?;
    }
    let live_tasks = live_tasks(&raft.store(), &id);
    Ok(LeaveResponse {
        node_id: id,
        hostname,
        live_tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::node::NodeRole;
    use rudder_model::store::ManagerInfo;
    use rudder_pki::ca::Role;

    fn caller(node: &str, role: Role) -> PeerIdentity {
        PeerIdentity {
            role,
            node: node.into(),
            not_before: std::time::SystemTime::UNIX_EPOCH,
            not_after: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    fn store() -> Store {
        let mut s = Store::default();
        for (i, id) in ["a", "b", "m"].iter().enumerate() {
            s.apply(
                i as u64 + 1,
                Command::PutNode {
                    id: id.to_string(),
                    hostname: format!("h-{id}"),
                    addr: format!("10.0.0.{}:4245", i + 1),
                    labels: Default::default(),
                    role: NodeRole::Worker,
                    resources: Default::default(),
                    now: 1,
                    cert_not_after: 0,
                    host_labels: Default::default(),
                },
            )
            .unwrap();
        }
        // A controller listens on m's host: m is a manager host.
        s.set_manager(
            10,
            1,
            Some(ManagerInfo {
                addr: "10.0.0.3:4243".into(),
                registry: "10.0.0.3:5000".into(),
            }),
        );
        s.apply(
            11,
            Command::UpdateNode {
                id: "b".into(),
                availability: Some(Availability::Drain),
                labels_add: Default::default(),
                labels_rm: Vec::new(),
            },
        )
        .unwrap();
        s
    }

    #[test]
    fn a_node_leaves_only_for_itself() {
        let s = store();
        let req = |node: &str, remove: bool| LeaveRequest {
            node_id: node.into(),
            remove,
        };
        // (caller, request, the node allowed, or the refusal's code and words)
        type Want = Result<&'static str, (tonic::Code, &'static str)>;
        let cases: Vec<(PeerIdentity, LeaveRequest, Want)> = vec![
            (caller("a", Role::Worker), req("", false), Ok("a")),
            (caller("a", Role::Worker), req("a", false), Ok("a")),
            // Worker a's certificate cannot make b leave, drained or not, drain or remove.
            (
                caller("a", Role::Worker),
                req("b", false),
                Err((
                    tonic::Code::PermissionDenied,
                    "certificate is for node a, not b",
                )),
            ),
            (
                caller("a", Role::Worker),
                req("b", true),
                Err((tonic::Code::PermissionDenied, "leaves only for itself")),
            ),
            // Removal only after the drain.
            (
                caller("a", Role::Worker),
                req("a", true),
                Err((tonic::Code::FailedPrecondition, "not drained")),
            ),
            (caller("b", Role::Worker), req("b", true), Ok("b")),
            // A manager host takes the admin path; a controller is no node.
            (
                caller("m", Role::Manager),
                req("", false),
                Err((tonic::Code::FailedPrecondition, "runs a controller")),
            ),
            (
                caller("controller-1", Role::Manager),
                req("", false),
                Err((tonic::Code::PermissionDenied, "controller's identity")),
            ),
            (
                caller("gone", Role::Worker),
                req("", false),
                Err((tonic::Code::NotFound, "no node gone")),
            ),
        ];
        for (i, (who, r, want)) in cases.into_iter().enumerate() {
            match (leaving_node(&who, &r, &s), want) {
                (Ok(n), Ok(id)) => assert_eq!(n.id, id, "case {i}"),
                (Err(e), Err((code, words))) => {
                    assert_eq!(e.code(), code, "case {i}: {e:?}");
                    assert!(e.message().contains(words), "case {i}: {e:?}");
                }
                (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
            }
        }
    }
}

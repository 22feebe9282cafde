//! Finding what a request names in the store: services (by name), tasks (by id, id prefix, name, `SERVICE.SLOT` or
//! service) and nodes (by id, id prefix or hostname). Pure lookups over a store snapshot; the
//! errors are the `Status` a caller can act on (what matched, what to name instead).

use rudder_model::{Node, Service, Store, Task, TaskState};
use tonic::Status;

use crate::agents::AgentAt;

/// A service by name.
pub fn find_service<'a>(store: &'a Store, name: &str) -> Result<&'a Service, Status> {
    store
        .services
        .get(name)
        .ok_or_else(|| Status::not_found(format!("service {name:?} not found")))
}

/// A node by id, unique id prefix or hostname.
pub fn find_node<'a>(store: &'a Store, key: &str) -> Result<&'a Node, Status> {
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

/// The one task `target` names: by id, name or id prefix, `SERVICE.SLOT` (its running
/// task, else its latest), or a service with exactly one running task.
pub fn one_task<'a>(store: &'a Store, target: &str) -> Result<&'a Task, Status> {
    let mut tasks = resolve_tasks(store, target);
    if tasks.is_empty() {
        if let Some(t) = by_slot(store, target) {
            tasks.push(t);
        }
    }
    match tasks.as_slice() {
        [] => Err(Status::not_found(format!(
            "no task named {target:?} (see `rctl ps`)"
        ))),
        [t] => Ok(t),
        many => {
            let running: Vec<&&Task> = many
                .iter()
                .filter(|t| {
                    t.status.state == TaskState::Running && t.desired_state == TaskState::Running
                })
                .collect();
            if store.services.contains_key(target) && running.len() == 1 {
                return Ok(running[0]);
            }
            let names: Vec<String> = running.iter().map(|t| t.name()).collect();
            Err(Status::invalid_argument(format!(
                "{target:?} names {} tasks; name one{}",
                many.len(),
                if names.is_empty() {
                    String::new()
                } else {
                    format!(" (running: {})", names.join(", "))
                }
            )))
        }
    }
}

/// `SERVICE.SLOT`: the slot's running task, else its most recent one.
fn by_slot<'a>(store: &'a Store, target: &str) -> Option<&'a Task> {
    let (service, slot) = target.rsplit_once('.')?;
    let slot: u64 = slot.parse().ok()?;
    let svc = store.services.get(service)?;
    let mut tasks: Vec<&Task> = store.tasks_of(&svc.id).filter(|t| t.slot == slot).collect();
    tasks.sort_by_key(|t| {
        (
            t.status.state == TaskState::Running && t.desired_state == TaskState::Running,
            t.created_at,
        )
    });
    tasks.pop()
}

/// A task that must be running, and its host's agent.
pub fn running_task<'a>(store: &'a Store, target: &str) -> Result<(&'a Task, AgentAt), Status> {
    let t = one_task(store, target)?;
    if t.status.state != TaskState::Running {
        return Err(Status::failed_precondition(format!(
            "task {} is not running (state: {})",
            t.name(),
            t.status.state
        )));
    }
    let node = t
        .node_id
        .as_ref()
        .and_then(|n| store.nodes.get(n))
        .ok_or_else(|| Status::failed_precondition(format!("task {} has no node", t.name())))?;
    Ok((t, node.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_model::{Command, ServiceSpec};
    use serde_json::json;

    /// Service web: slot 1 has a finished and a running task, slot 2 a failed one.
    fn store() -> Store {
        let mut s = Store::default();
        let spec: ServiceSpec =
            serde_json::from_value(json!({"name": "web", "image": "busybox", "replicas": 2}))
                .unwrap();
        s.apply(
            1,
            Command::PutService {
                id: "svc".into(),
                spec: Box::new(spec.clone()),
                now: 0,
            },
        )
        .unwrap();
        let task = |id: &str, slot: u64, state: &str, created: u64| -> Task {
            serde_json::from_value(json!({
                "id": id, "service_id": "svc", "service_name": "web", "slot": slot,
                "spec": spec, "spec_version": 1, "node_id": null, "desired_state": "running",
                "status": {"state": state, "timestamp": 0}, "created_at": created, "version": 0,
            }))
            .unwrap()
        };
        let tasks = vec![
            task("aaaa1111", 1, "complete", 1),
            task("bbbb2222", 1, "running", 2),
            task("cccc3333", 2, "failed", 3),
        ];
        s.apply(2, Command::CreateTasks { tasks }).unwrap();
        s
    }

    #[test]
    fn a_task_is_named_by_name_id_prefix_slot_or_its_service() {
        let s = store();
        let id = |target: &str| one_task(&s, target).map(|t| t.id.clone());
        assert_eq!(id("web.1.bbbb2222").unwrap(), "bbbb2222");
        assert_eq!(id("aaaa").unwrap(), "aaaa1111");
        // A slot: its running task, else its latest.
        assert_eq!(id("web.1").unwrap(), "bbbb2222");
        assert_eq!(id("web.2").unwrap(), "cccc3333");
        // A service with one running task.
        assert_eq!(id("web").unwrap(), "bbbb2222");
        assert_eq!(id("nope").unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(id("web.3").unwrap_err().code(), tonic::Code::NotFound);
    }

    #[test]
    fn a_task_that_is_not_running_is_refused_with_its_state() {
        let s = store();
        let e = running_task(&s, "web.2").unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            e.message(),
            "task web.2.cccc3333 is not running (state: failed)"
        );
        // Running, but not placed: nowhere to go.
        let e = running_task(&s, "web.1").unwrap_err();
        assert_eq!(e.message(), "task web.1.bbbb2222 has no node");
    }
}

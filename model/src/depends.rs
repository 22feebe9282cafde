//! `depends_on`: a service's new tasks wait until the services it depends on are started,
//! healthy or completed (compose's `service_started`, `service_healthy`,
//! `service_completed_successfully`). The reconciler's pass holds such tasks pending, with the
//! reason visible in `rctl ps` ("waiting for shop-db: not healthy"), until the condition holds;
//! it is part of the control loop, so it holds whether or not a client is still connected.
//!
//! Invariants:
//! - Pure: conditions are read from a store snapshot.
//! - Only tasks not yet placed wait: a task already placed is never stopped because a
//!   dependency went away (compose's `restart` on dependencies is accepted and not enforced).
//! - A dependency that does not exist holds its dependents (`required: true`, the default) or
//!   is ignored (`required: false`).
//! - A cycle is refused where services are declared together (compose files, stacks), naming
//!   the services in it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::spec::ServiceSpec;
use crate::store::{Service, Store};
use crate::task::TaskState;
use crate::ValidationError;

/// Most dependencies one service may have.
pub const MAX_DEPENDENCIES: usize = 100;

/// What a dependent waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    /// A task of the dependency runs (or, a job, has run).
    #[default]
    #[serde(rename = "service_started")]
    Started,
    /// A task of the dependency runs and passed its health check (a dependency without a
    /// check: runs).
    #[serde(rename = "service_healthy")]
    Healthy,
    /// The dependency completed: a job whose every completion exited 0, or a service with a
    /// task of its current spec that exited 0.
    #[serde(rename = "service_completed_successfully")]
    CompletedSuccessfully,
}

impl Condition {
    /// Compose's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Started => "service_started",
            Condition::Healthy => "service_healthy",
            Condition::CompletedSuccessfully => "service_completed_successfully",
        }
    }

    fn is_default(&self) -> bool {
        *self == Condition::Started
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// One entry of a service's `depends_on`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    /// The service depended on (its Rudder name).
    pub service: String,
    /// What to wait for.
    #[serde(default, skip_serializing_if = "Condition::is_default")]
    pub condition: Condition,
    /// `false`: a missing dependency is not waited for.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub required: bool,
}

/// Checks a spec's dependencies on their own: valid names, not itself, no duplicates.
pub fn validate(spec: &ServiceSpec) -> Result<(), ValidationError> {
    if spec.depends_on.len() > MAX_DEPENDENCIES {
        return Err(ValidationError::new(
            "depends_on",
            format!("at most {MAX_DEPENDENCIES} dependencies"),
        ));
    }
    for (i, d) in spec.depends_on.iter().enumerate() {
        let field = format!("depends_on[{i}]");
        crate::spec::validate_name(&field, &d.service)?;
        if d.service == spec.name {
            return Err(ValidationError::new(
                field,
                "a service cannot depend on itself",
            ));
        }
        if spec.depends_on[..i].iter().any(|o| o.service == d.service) {
            return Err(ValidationError::new(
                field,
                format!("{:?} is listed twice", d.service),
            ));
        }
    }
    Ok(())
}

/// Why a dependency does not hold yet, or `None` when it does.
fn unmet(store: &Store, d: &Dependency) -> Option<String> {
    let Some(svc) = store.services.get(&d.service) else {
        return d.required.then(|| "no such service".to_string());
    };
    let tasks: Vec<&crate::Task> = store.tasks_of(&svc.id).collect();
    let any = |f: &dyn Fn(&crate::Task) -> bool| tasks.iter().any(|t| f(t));
    let running = |t: &crate::Task| t.status.state == TaskState::Running;
    match d.condition {
        Condition::Started => {
            let started = |t: &crate::Task| {
                running(t)
                    || t.status.state == TaskState::Complete
                    || (t.status.state == TaskState::Starting && !t.status.container_id.is_empty())
            };
            (!any(&started)).then(|| "not started".to_string())
        }
        // A task with a health check reports `running` only once its check passed.
        Condition::Healthy => (!any(&running)).then(|| {
            if svc.spec.healthcheck.is_some() {
                "not healthy".to_string()
            } else {
                "not running".to_string()
            }
        }),
        Condition::CompletedSuccessfully => completed(store, svc, &tasks),
    }
}

fn completed(store: &Store, svc: &Service, tasks: &[&crate::Task]) -> Option<String> {
    if let Some(p) = crate::job::progress(svc, tasks, &store.nodes) {
        return match p.state {
            crate::job::JobState::Complete => None,
            crate::job::JobState::Failed => Some("failed (it will not complete)".into()),
            crate::job::JobState::Running => Some(format!(
                "not completed ({}/{} completions)",
                p.completed, p.total
            )),
        };
    }
    let done = tasks
        .iter()
        .any(|t| t.spec_version == svc.spec_version && t.status.state == TaskState::Complete);
    (!done).then(|| "not completed".to_string())
}

/// Why `spec`'s new tasks must wait (`waiting for DEP: REASON`, the first unmet dependency),
/// or `None` when they may be placed.
pub fn waiting(store: &Store, spec: &ServiceSpec) -> Option<String> {
    spec.depends_on
        .iter()
        .find_map(|d| unmet(store, d).map(|why| format!("waiting for {}: {why}", d.service)))
}

/// A dependency cycle among `specs`, as the services in it (first one repeated at the end:
/// `a -> b -> a`), or `None`. Dependencies on services outside `specs` are not followed.
pub fn find_cycle(specs: &[ServiceSpec]) -> Option<Vec<String>> {
    let edges: BTreeMap<&str, Vec<&str>> = specs
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.depends_on.iter().map(|d| d.service.as_str()).collect(),
            )
        })
        .collect();
    // Depth-first, three colours: `path` is the grey stack, `done` the black set.
    fn visit<'a>(
        n: &'a str,
        edges: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if done.contains(n) {
            return None;
        }
        if let Some(at) = path.iter().position(|p| *p == n) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        path.push(n);
        for next in edges.get(n).into_iter().flatten() {
            if edges.contains_key(next) {
                if let Some(c) = visit(next, edges, path, done) {
                    return Some(c);
                }
            }
        }
        path.pop();
        done.insert(n);
        None
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        if let Some(c) = visit(n, &edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// `specs` in an order where every service comes after those it depends on (stable
/// otherwise), for display and for creating them in order. Assumes no cycle.
pub fn start_order(specs: &[ServiceSpec]) -> Vec<String> {
    let names: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut placed: Vec<String> = Vec::new();
    let mut left: Vec<&ServiceSpec> = specs.iter().collect();
    while !left.is_empty() {
        let before = left.len();
        left.retain(|s| {
            let ready = s
                .depends_on
                .iter()
                .all(|d| !names.contains(d.service.as_str()) || placed.contains(&d.service));
            if ready {
                placed.push(s.name.clone());
            }
            !ready
        });
        if left.len() == before {
            // A cycle: the rest in their order.
            placed.extend(left.iter().map(|s| s.name.clone()));
            break;
        }
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, deps: &[(&str, Condition)]) -> ServiceSpec {
        let mut s: ServiceSpec =
            serde_json::from_value(serde_json::json!({"name": name, "image": "x"})).unwrap();
        s.depends_on = deps
            .iter()
            .map(|(d, c)| Dependency {
                service: d.to_string(),
                condition: *c,
                required: true,
            })
            .collect();
        s
    }

    #[test]
    fn cycles_name_their_services_and_order_follows_dependencies() {
        use Condition::Started as S;
        let ok = [
            spec("web", &[("db", S), ("cache", S)]),
            spec("db", &[("migrate", S)]),
            spec("cache", &[]),
            spec("migrate", &[("outside", S)]),
        ];
        assert_eq!(find_cycle(&ok), None);
        assert_eq!(start_order(&ok), ["cache", "migrate", "db", "web"]);
        let bad = [
            spec("a", &[("b", S)]),
            spec("b", &[("c", S)]),
            spec("c", &[("a", S)]),
            spec("d", &[]),
        ];
        assert_eq!(
            find_cycle(&bad),
            Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
    }

    #[test]
    fn validation_refuses_self_duplicates_and_bad_names() {
        use Condition::Started as S;
        assert!(validate(&spec("a", &[("a", S)])).is_err());
        assert!(validate(&spec("a", &[("b", S), ("b", S)])).is_err());
        assert!(validate(&spec("a", &[("B_x", S)])).is_err());
        assert!(validate(&spec("a", &[("b", S)])).is_ok());
    }

    #[test]
    fn conditions_serialize_with_compose_names() {
        let d: Dependency = serde_json::from_value(
            serde_json::json!({"service": "db", "condition": "service_healthy"}),
        )
        .unwrap();
        assert_eq!(d.condition, Condition::Healthy);
        assert!(d.required);
        let back = serde_json::to_value(&d).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"service": "db", "condition": "service_healthy"})
        );
    }
}

//! Scheduler throughput: 1,000 nodes (zones, racks, resources, a few managers) and 10,000 pending
//! tasks over 100 services with constraints, reservations, preferences and both strategies.
//! Prints `scheduler: N placements in X ms = Y placements/s` (the median of several runs).
//!
//! Run with `cargo bench -p rudder-model --bench scheduler`; without `--bench` it does nothing.

use std::time::{Duration, Instant};

use rudder_model::scheduler::{schedule, Decision};
use rudder_model::{Availability, Node, NodeResources, NodeRole, NodeState, ServiceSpec, Task};

const NODES: usize = 1_000;
const SERVICES: usize = 100;
const TASKS_PER_SERVICE: usize = 100;
const RUNS: usize = 7;

fn nodes() -> rudder_model::store::Map<String, Node> {
    (0..NODES)
        .map(|i| {
            let id = format!("node-{i:04}");
            let labels = [
                ("zone".to_string(), format!("z{}", i % 5)),
                ("rack".to_string(), format!("r{}", i % 40)),
                (
                    "disk".to_string(),
                    if i.is_multiple_of(3) { "ssd" } else { "hdd" }.to_string(),
                ),
            ]
            .into();
            let node = Node {
                id: id.clone(),
                hostname: format!("host-{i:04}"),
                addr: String::new(),
                labels,
                role: if i < 5 {
                    NodeRole::Manager
                } else {
                    NodeRole::Worker
                },
                availability: if i % 100 == 7 {
                    Availability::Drain
                } else {
                    Availability::Active
                },
                resources: NodeResources {
                    cpus: 16_000,
                    memory: 64 << 30,
                },
                state: if i % 250 == 3 {
                    NodeState::Down
                } else {
                    NodeState::Ready
                },
                updated_at: 0,
                version: 0,
                controller_id: None,
                host_labels: Default::default(),
                overlay_key: String::new(),
                cert_not_after: 0,
            };
            (id, node)
        })
        .collect()
}

/// Service `s`: every fourth constrained, every third reserving, every fifth spread over zones,
/// every tenth binpacked, every seventh capped per node.
fn service(s: usize) -> ServiceSpec {
    let mut constraints = vec![];
    if s.is_multiple_of(4) {
        constraints.push(format!("node.labels.zone==z{}", s % 5));
    }
    if s % 4 == 1 {
        constraints.push("node.role!=manager".to_string());
        constraints.push("node.labels.disk==ssd".to_string());
    }
    let mut placement = serde_json::json!({ "constraints": constraints });
    if s.is_multiple_of(5) {
        placement["preferences"] = serde_json::json!([{ "spread": "node.labels.zone" }]);
    }
    if s % 10 == 3 {
        placement["strategy"] = "binpack".into();
    }
    if s.is_multiple_of(7) {
        placement["max_replicas_per_node"] = 1.into();
    }
    let mut spec = serde_json::json!({
        "name": format!("svc-{s:03}"),
        "image": "busybox",
        "replicas": TASKS_PER_SERVICE,
        "placement": placement,
    });
    if s.is_multiple_of(3) {
        spec["resources"] =
            serde_json::json!({ "reservations": { "cpus": 0.25, "memory": "256Mi" } });
    }
    serde_json::from_value(spec).expect("bench spec")
}

fn tasks() -> Vec<Task> {
    let mut out = Vec::with_capacity(SERVICES * TASKS_PER_SERVICE);
    for s in 0..SERVICES {
        let spec = service(s);
        for slot in 1..=TASKS_PER_SERVICE {
            let t = serde_json::json!({
                "id": format!("task-{s:03}-{slot:03}"),
                "service_id": format!("sid-{s:03}"),
                "service_name": spec.name,
                "slot": slot,
                "spec": spec,
                "spec_version": 1,
                "node_id": null,
                "desired_state": "running",
                "status": { "state": "pending", "timestamp": 0 },
                "created_at": 0,
                "version": 0,
            });
            out.push(serde_json::from_value(t).expect("bench task"));
        }
    }
    out
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let nodes = nodes();
    let tasks = tasks();
    let pending: Vec<&Task> = tasks.iter().collect();
    let mut times: Vec<Duration> = Vec::new();
    let mut placed = 0;
    let mut unplaceable = 0;
    for _ in 0..RUNS {
        let start = Instant::now();
        let d = schedule(&nodes, [], &pending);
        times.push(start.elapsed());
        placed = d
            .iter()
            .filter(|x| matches!(x, Decision::Assign { .. }))
            .count();
        unplaceable = d.len() - placed;
    }
    times.sort();
    let median = times[times.len() / 2];
    let ms = median.as_secs_f64() * 1000.0;
    println!(
        "scheduler: {placed} placements in {ms:.1} ms = {:.0} placements/s \
         ({NODES} nodes, {} tasks over {SERVICES} services, {unplaceable} unplaceable; \
         median of {RUNS} runs, best {:.1} ms)",
        placed as f64 / median.as_secs_f64(),
        tasks.len(),
        times[0].as_secs_f64() * 1000.0
    );
}

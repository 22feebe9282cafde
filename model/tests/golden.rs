//! Golden files of the replicated formats (`tests/golden/v<N>/raft/`): a raft log entry of every
//! command kind, the snapshot of the store those entries build, a membership change's context,
//! and the task as the agent records it and as the dispatcher sends it.
//!
//! The files of a version were written once, by the build that introduced that version, and are
//! never rewritten: every later build must read them and get the values below. Generate the
//! files of a NEW version (see `tests/golden/README.md`) with
//! `RUDDER_UPDATE_GOLDEN=1 cargo test -p rudder-model --test golden`, which writes only files
//! that do not exist yet.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rudder_model::store::ManagerInfo;
use rudder_model::{Command, Envelope, Store, Task, TaskState};
use serde_json::json;

/// The golden files of format version `v` of the replicated data.
fn dir(v: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/golden/v{v}/raft"))
}

/// Writes `bytes` to `name` when generation is asked for and the file does not exist; returns
/// the file's bytes either way.
fn golden(v: u32, name: &str, bytes: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
    let path = dir(v).join(name);
    if std::env::var_os("RUDDER_UPDATE_GOLDEN").is_some() && !path.exists() {
        std::fs::create_dir_all(dir(v)).unwrap();
        std::fs::write(&path, bytes()).unwrap();
    }
    std::fs::read(&path).unwrap_or_else(|e| panic!("golden file {}: {e}", path.display()))
}

fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// A fixed time (2026-01-01T00:00:00Z, ms): no golden file holds a real clock's value.
const T0: u64 = 1_767_225_600_000;

fn spec(image: &str) -> serde_json::Value {
    json!({"name": "web", "image": image, "replicas": 1})
}

fn task() -> Task {
    from(json!({
        "id": "web.1.t0000000001",
        "service_id": "s0000000001",
        "service_name": "web",
        "slot": 1,
        "spec": spec("busybox:1"),
        "spec_version": 3,
        "node_id": null,
        "desired_state": "running",
        "status": {"state": "new", "timestamp": T0},
        "created_at": T0,
        "version": 0,
    }))
}

/// Every command kind, in an order in which each applies to the store the ones before built.
/// Entry `i` (from 1) is the log entry at raft index `i`. The snapshot is taken after
/// [`SNAPSHOT_AT`] entries; the rest remove what the first ones made.
fn commands() -> Vec<(&'static str, Command)> {
    let labels = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    vec![
        (
            "set-secrets",
            from(json!({"SetSecrets": {"secrets": {
                "ca_cert_pem": "golden test value, not a certificate",
                "ca_key_pem": "golden test value, not a key",
                "join_tokens": {"fingerprint": "sha256:00", "manager": "test-manager-secret",
                                "worker": "test-worker-secret"}}}})),
        ),
        (
            "put-node",
            Command::PutNode {
                id: "n1".into(),
                hostname: "host1".into(),
                addr: "10.0.0.1:4244".into(),
                labels: labels("zone", "a"),
                role: Default::default(),
                resources: from(json!({"cpus": 2000, "memory": 1073741824u64})),
                now: T0,
                cert_not_after: T0 + 86_400_000,
                host_labels: Default::default(),
            },
        ),
        (
            "update-node",
            Command::UpdateNode {
                id: "n1".into(),
                availability: None,
                labels_add: labels("disk", "ssd"),
                labels_rm: vec![],
            },
        ),
        (
            "set-node-controller",
            Command::SetNodeController {
                id: "n1".into(),
                raft_id: Some(1),
            },
        ),
        (
            "admit",
            Command::Admit {
                role: "worker".into(),
                id: "n2".into(),
                now: T0,
            },
        ),
        (
            "revoke-admitted",
            Command::RevokeAdmitted {
                role: "worker".into(),
                now: T0 + 1,
            },
        ),
        (
            "revoke",
            Command::Revoke {
                id: "admin:mallory".into(),
                reason: "golden".into(),
                now: T0 + 2,
            },
        ),
        (
            "put-network",
            Command::PutNetwork {
                id: "net0000000001".into(),
                spec: from(json!({"name": "front", "subnet": "10.100.0.0/24"})),
                now: T0,
            },
        ),
        (
            "put-volume",
            Command::PutVolume {
                spec: from(json!({"name": "data"})),
                now: T0,
            },
        ),
        (
            "put-secret",
            from(
                json!({"PutSecret": {"kind": "secret", "name": "db-password",
                "labels": {}, "data": "dGVzdA==", "digest": "sha256:test", "now": T0}}),
            ),
        ),
        (
            "put-service",
            Command::PutService {
                id: "s0000000001".into(),
                spec: Box::new(from(spec("busybox:1"))),
                now: T0,
            },
        ),
        (
            "put-service",
            Command::PutService {
                id: "s0000000001".into(),
                spec: Box::new(from(spec("busybox:2"))),
                now: T0 + 10,
            },
        ),
        (
            "rollback",
            Command::Rollback {
                service: "web".into(),
                now: T0 + 20,
                reason: "golden".into(),
                if_spec_version: None,
            },
        ),
        (
            "create-tasks",
            Command::CreateTasks {
                tasks: vec![task()],
            },
        ),
        (
            "assign-tasks",
            Command::AssignTasks {
                assignments: vec![("web.1.t0000000001".into(), "n1".into())],
                now: T0 + 30,
            },
        ),
        (
            "set-pending",
            Command::SetPending {
                task_id: "web.1.t0000000001".into(),
                reason: "golden".into(),
                now: T0 + 31,
            },
        ),
        (
            "set-desired",
            Command::SetDesired {
                updates: vec![("web.1.t0000000001".into(), TaskState::Running)],
                now: T0 + 32,
            },
        ),
        (
            "update-status",
            from(
                json!({"UpdateStatus": {"updates": [{"task_id": "web.1.t0000000001",
                "node_id": "n1", "status": {"state": "running", "container_id": "c1",
                "timestamp": T0 + 40}}]}}),
            ),
        ),
        (
            "set-update-status",
            from(
                json!({"SetUpdateStatus": {"service": "web", "spec_version": 13,
                "status": {"state": "completed", "message": "golden", "started_at": T0,
                "completed_at": T0 + 50}}}),
            ),
        ),
        (
            "set-rebalance",
            from(
                json!({"SetRebalance": {"service": "web", "if_started_at": null,
                "status": {"slots": [1], "started_at": T0 + 51}}}),
            ),
        ),
        (
            "autoscale",
            from(json!({"Autoscale": {"service": "web",
                "decision": {"at": T0 + 52, "from": 1, "to": 1, "reason": "golden"}}})),
        ),
        (
            "put-image",
            from(json!({"PutImage": {"repo": "web", "tag": "v1",
                "record": {"digest": format!("sha256:{}", "ab".repeat(32)),
                "media_type": "application/vnd.oci.image.manifest.v1+json"}}})),
        ),
        (
            "set-overlay-key",
            Command::SetOverlayKey {
                node: "n1".into(),
                key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            },
        ),
        ("rotate-overlay-keys", Command::RotateOverlayKeys),
        (
            "set-volume-copies",
            Command::SetVolumeCopies {
                node: "n1".into(),
                volumes: vec!["data".into()],
            },
        ),
        (
            "set-unlock-key",
            from(json!({"SetUnlockKey": {"key": "RDRKEK-golden-test-value"}})),
        ),
        (
            "put-stack",
            from(json!({"PutStack": {"name": "shop", "spec": {"services": [
                {"name": "shop_api", "image": "busybox:1"}]}, "now": T0 + 60}})),
        ),
        (
            "put-stack",
            from(json!({"PutStack": {"name": "shop", "spec": {"services": [
                {"name": "shop_api", "image": "busybox:2"}]}, "now": T0 + 61}})),
        ),
        (
            "rollback-stack",
            Command::RollbackStack {
                name: "shop".into(),
                now: T0 + 62,
            },
        ),
        (
            "batch",
            Command::Batch(vec![
                Command::PutNode {
                    id: "n2".into(),
                    hostname: "host2".into(),
                    addr: "10.0.0.2:4244".into(),
                    labels: BTreeMap::new(),
                    role: Default::default(),
                    resources: Default::default(),
                    now: T0 + 70,
                    cert_not_after: 0,
                    host_labels: Default::default(),
                },
                Command::NodeDown {
                    id: "n2".into(),
                    now: T0 + 71,
                },
            ]),
        ),
        // The snapshot is taken here; what follows removes.
        (
            "delete-image",
            Command::DeleteImage {
                repo: "web".into(),
                reference: "v1".into(),
            },
        ),
        (
            "remove-stack",
            Command::RemoveStack {
                name: "shop".into(),
            },
        ),
        (
            "delete-tasks",
            Command::DeleteTasks {
                ids: vec!["web.1.t0000000001".into()],
            },
        ),
        (
            "remove-service",
            Command::RemoveService { name: "web".into() },
        ),
        (
            "remove-secret",
            from(json!({"RemoveSecret": {"kind": "secret", "name": "db-password"}})),
        ),
        (
            "remove-volume",
            Command::RemoveVolume {
                name: "data".into(),
            },
        ),
        (
            "remove-network",
            Command::RemoveNetwork {
                name: "front".into(),
            },
        ),
        (
            "node-down",
            Command::NodeDown {
                id: "n1".into(),
                now: T0 + 80,
            },
        ),
        (
            "remove-node",
            Command::RemoveNode {
                id: "n2".into(),
                now: T0 + 81,
            },
        ),
    ]
}

/// Entries applied before the snapshot was taken.
const SNAPSHOT_AT: usize = 30;

/// The variant's name, as serde writes it (`PutService`), for checking a file holds its kind.
fn kind(cmd: &Command) -> String {
    let v = serde_json::to_value(cmd).unwrap();
    match v {
        serde_json::Value::String(s) => s,
        serde_json::Value::Object(m) => m.keys().next().unwrap().clone(),
        other => panic!("unexpected command shape {other}"),
    }
}

fn entry_name(i: usize, kind: &str) -> String {
    format!("entry-{:02}-{kind}.json", i + 1)
}

/// Every golden v1 log entry decodes into the command it was written from, and each kind of
/// command is among them.
#[test]
fn v1_log_entries_of_every_kind_decode() {
    let cmds = commands();
    for (i, (name, cmd)) in cmds.iter().enumerate() {
        let bytes = golden(1, &entry_name(i, name), || {
            Envelope::new(cmd.clone()).encode()
        });
        let env =
            Envelope::decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", entry_name(i, name)));
        assert_eq!(&env.cmd, cmd, "{}", entry_name(i, name));
    }
    let mut kinds: Vec<String> = cmds.iter().map(|(_, c)| kind(c)).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds.len(),
        37,
        "one entry of every command kind: {kinds:?}"
    );
}

/// Replaying the golden log builds exactly the golden snapshot's store, and the rest of the log
/// applies on top of that snapshot.
#[test]
fn v1_snapshot_equals_the_replayed_log() {
    let cmds = commands();
    let mut store = Store::default();
    for (i, (name, _)) in cmds.iter().enumerate().take(SNAPSHOT_AT) {
        let bytes = std::fs::read(dir(1).join(entry_name(i, name))).unwrap();
        let env = Envelope::decode(&bytes).unwrap();
        store
            .apply(i as u64 + 1, env.cmd)
            .unwrap_or_else(|e| panic!("entry {}: {e}", i + 1));
    }
    let snap = golden(1, "snapshot.json", || serde_json::to_vec(&store).unwrap());
    // Read as controllers read snapshots: v1 files have no format label, so they are version 1.
    assert_eq!(
        rudder_model::format::version_of(&snap, "snapshot.json").unwrap(),
        1
    );
    let mut read = rudder_model::snapshot::decode(&snap, "snapshot.json").unwrap();
    assert_eq!(read, store);
    assert_eq!(read.applied, SNAPSHOT_AT as u64);
    let web = read.services.get("web").expect("service web");
    assert_eq!(web.spec.image, "busybox:1", "rolled back to the first spec");
    let t = read.tasks.get("web.1.t0000000001").expect("the task");
    assert_eq!(t.status.state, TaskState::Running);
    assert_eq!(t.node_id.as_deref(), Some("n1"));
    assert_eq!(read.nodes.get("n1").unwrap().labels.len(), 2);
    assert!(read.stacks.contains_key("shop"));
    for (i, (name, _)) in cmds.iter().enumerate().skip(SNAPSHOT_AT) {
        let bytes = std::fs::read(dir(1).join(entry_name(i, name))).unwrap();
        read.apply(i as u64 + 1, Envelope::decode(&bytes).unwrap().cmd)
            .unwrap_or_else(|e| panic!("entry {}: {e}", i + 1));
    }
    assert!(read.services.is_empty() && read.tasks.is_empty());
}

/// A membership change's context (a controller's addresses), as raft conf changes carry it.
#[test]
fn v1_member_context_decodes() {
    let info = ManagerInfo {
        addr: "10.0.0.1:4243".into(),
        registry: "10.0.0.1:5000".into(),
    };
    let bytes = golden(1, "member.json", || serde_json::to_vec(&info).unwrap());
    let read: ManagerInfo = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(read, info);
}

/// The task the agent records in `<data>/containers/<id>/task.json`, and the same task as the
/// dispatcher sends it (`task_json`, in the wire envelope).
#[test]
fn v1_task_record_and_wire_task_decode() {
    let mut t = task();
    t.node_id = Some("n1".into());
    t.status.state = TaskState::Running;
    let agent = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/v1/agent");
    if std::env::var_os("RUDDER_UPDATE_GOLDEN").is_some() && !agent.join("task.json").exists() {
        std::fs::create_dir_all(&agent).unwrap();
        std::fs::write(agent.join("task.json"), serde_json::to_vec(&t).unwrap()).unwrap();
    }
    let record = std::fs::read(agent.join("task.json")).unwrap();
    // Read as the agent reads its records: v1 files have no format label, so they are version 1.
    assert_eq!(
        rudder_model::format::version_of(&record, "task.json").unwrap(),
        1
    );
    let read = rudder_model::task_record::decode(&record, "task.json").unwrap();
    assert_eq!(read, t);
    let wire = golden(1, "wire-task.json", || {
        rudder_model::wire::encode("task", &t).unwrap().into_bytes()
    });
    let read: Task =
        rudder_model::wire::decode("task", std::str::from_utf8(&wire).unwrap()).unwrap();
    assert_eq!(read, t);
}

//! The agent's record of a task it started, `<data>/containers/<id>/task.json`: the [`Task`] as
//! assigned, read back after an agent restart to adopt the containers its shims kept running
//! (and by metrics, logs, ports and `exec`). The task's JSON with a format label first
//! ([`crate::format`]): records without one (every agent before labels, the golden
//! `tests/golden/v1/agent/task.json`) are version 1; a newer version is refused by file name and
//! version; version 1 with a label still reads in an agent from before labels (a downgrade).

use crate::format::{self, FormatError};
use crate::store::Task;

/// The newest task record format this build reads, and the one it writes.
pub const TASK_RECORD_FORMAT: u64 = 1;

/// The record of `task`, labelled [`TASK_RECORD_FORMAT`].
pub fn encode(task: &Task) -> Result<Vec<u8>, FormatError> {
    format::encode("a task record", task, TASK_RECORD_FORMAT, false)
}

/// The task in record `bytes` (read from `file`, which errors name).
pub fn decode(bytes: &[u8], file: &str) -> Result<Task, FormatError> {
    format::decode(bytes, TASK_RECORD_FORMAT, file).map(|(task, _)| task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        serde_json::from_value(serde_json::json!({
            "id": "web.1.t1", "service_id": "s1", "service_name": "web", "slot": 1,
            "spec": {"name": "web", "image": "busybox:1", "replicas": 1},
            "spec_version": 1, "node_id": "n1", "desired_state": "running",
            "status": {"state": "running", "timestamp": 1}, "created_at": 1, "version": 0,
        }))
        .unwrap()
    }

    #[test]
    fn records_are_labelled_and_read_back_also_by_readers_without_labels() {
        let bytes = encode(&task()).unwrap();
        assert!(bytes.starts_with(br#"{"format_version":1,"id":"web.1.t1""#));
        assert_eq!(decode(&bytes, "task.json").unwrap(), task());
        let old: Task = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(old, task());
        let unlabelled = serde_json::to_vec(&task()).unwrap();
        assert_eq!(decode(&unlabelled, "task.json").unwrap(), task());
    }

    #[test]
    fn a_newer_record_is_refused_naming_the_file_and_version() {
        let mut v = serde_json::to_value(task()).unwrap();
        v["slot"] = serde_json::json!("renamed in v2");
        let bytes = format::encode("t", &v, 2, false).unwrap();
        let err = decode(&bytes, "/data/containers/web.1.t1/task.json").unwrap_err();
        assert!(matches!(err, FormatError::Newer { found: 2, .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("/data/containers/web.1.t1/task.json") && msg.contains("version 2"),
            "{msg}"
        );
    }
}

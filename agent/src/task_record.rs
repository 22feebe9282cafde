//! The task record in a container dir (`task.json`, format in [`rudder_model::task_record`]):
//! written when the agent starts a task, read back to adopt containers after a restart and to
//! name a container's service (metrics, images, ports, exec).

use rudder_model::format::FormatError;
use rudder_model::Task;

use crate::shim::ContainerDir;

/// The record's task: `None` when there is no record (or it is over the size limit),
/// `Some(Err)` when it is from a newer agent or does not parse (the error names the file).
pub fn read(dir: &ContainerDir) -> Option<Result<Task, FormatError>> {
    let bytes = dir.read_task()?;
    Some(rudder_model::task_record::decode(
        &bytes,
        &dir.task_file().display().to_string(),
    ))
}

/// [`read`], for readers that only want a task they can use.
pub fn task_of(dir: &ContainerDir) -> Option<Task> {
    read(dir)?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_from_a_newer_agent_is_refused_by_path_and_version() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ContainerDir::new(tmp.path().join("c1"));
        std::fs::create_dir_all(&dir.dir).unwrap();
        assert!(read(&dir).is_none());
        std::fs::write(dir.task_file(), br#"{"format_version":2,"id":"x"}"#).unwrap();
        let err = read(&dir).unwrap().unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
        assert!(
            err.contains(&dir.task_file().display().to_string()),
            "{err}"
        );
        assert!(task_of(&dir).is_none());
        // The golden v1 record (no label) reads.
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/golden/v1/agent/task.json");
        std::fs::copy(golden, dir.task_file()).unwrap();
        assert_eq!(task_of(&dir).unwrap().id, "web.1.t0000000001");
    }
}

//! Secrets and configs on the host: the values this node's tasks use, held in memory only (as
//! the controller last sent them over the node's session), and materialised per task on a
//! tmpfs that is the task's bundle directory.
//!
//! Invariants:
//! - No value is ever written to the agent's disk or logged: `Values` prints only counts, the
//!   task's tmpfs (`nosuid,nodev,noexec`, mode 0700, sized to its values plus room for
//!   `config.json`) holds the value files and the bundle's `config.json` (which carries the
//!   `env_from_secret` values), and it is unmounted when the task's container goes
//!   (`bundle::unmount_rootfs`).
//! - Each value file is bind-mounted read-only into the container at its target, owned by the
//!   reference's uid/gid (names resolved in the container's own passwd and group files) with
//!   its mode.

use std::collections::HashMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::mount::{mount, MsFlags};
use rudder_model::secret::{self, ObjectKind};
use rudder_model::Task;

use crate::bundle::ContainerDir;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets: {kind} {name:?} version {version} was not delivered to this node")]
    Missing {
        kind: ObjectKind,
        name: String,
        version: u64,
    },
    #[error("secrets: mount a tmpfs at {path}: {err}")]
    Mount { path: String, err: nix::Error },
    #[error("secrets: {op}: {err}")]
    Io {
        op: &'static str,
        err: std::io::Error,
    },
    #[error("secrets: {field}: {err}")]
    User {
        field: String,
        err: crate::user::UserError,
    },
}

type Key = (ObjectKind, String, u64);

/// The values the controller sent for this node's tasks; replaced whole by each message.
#[derive(Default, Clone)]
pub struct Values {
    inner: Arc<Mutex<HashMap<Key, Arc<Vec<u8>>>>>,
}

impl std::fmt::Debug for Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "Values(<{n} redacted>)")
    }
}

impl Values {
    pub fn set(&self, values: Vec<rudder_proto::v1::SecretValue>) {
        let map = values
            .into_iter()
            .filter_map(|v| {
                let kind = ObjectKind::parse(&v.kind)?;
                Some(((kind, v.name, v.version), Arc::new(v.data)))
            })
            .collect();
        *self.inner.lock().expect("secret values lock") = map;
    }

    fn get(
        &self,
        kind: ObjectKind,
        name: &str,
        version: u64,
    ) -> Result<Arc<Vec<u8>>, SecretsError> {
        self.inner
            .lock()
            .expect("secret values lock")
            .get(&(kind, name.to_string(), version))
            .cloned()
            .ok_or_else(|| SecretsError::Missing {
                kind,
                name: name.to_string(),
                version,
            })
    }
}

/// Whether the task uses any secret or config (its bundle then lives on a tmpfs).
pub fn uses_any(task: &Task) -> bool {
    !secret::refs_of(&task.spec).is_empty()
}

/// Room on the tmpfs besides the values: `config.json`, an exec's process file.
const BUNDLE_ROOM: usize = 4 << 20;

/// Mounts the task's bundle dir as a private tmpfs sized for the values it will hold. Must
/// come before the root filesystem is mounted below it. A bundle already on a tmpfs (a retry)
/// is kept.
pub fn mount_bundle(c: &ContainerDir, task: &Task, values: &Values) -> Result<(), SecretsError> {
    let mut size = BUNDLE_ROOM;
    for (kind, name, version) in secret::needs(&task.spec) {
        size += values.get(kind, &name, version)?.len();
    }
    let bundle = c.bundle();
    crate::datadir::private_dir(&bundle).map_err(|err| SecretsError::Io {
        op: "create the bundle dir",
        err,
    })?;
    if is_tmpfs(&bundle) {
        return Ok(());
    }
    mount(
        Some("tmpfs"),
        &bundle,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("mode=0700,size={size}").as_str()),
    )
    .map_err(|err| SecretsError::Mount {
        path: bundle.display().to_string(),
        err,
    })
}

/// Whether `path` is the mount point of a tmpfs.
pub(crate) fn is_tmpfs(path: &Path) -> bool {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.get(4) == Some(&p.as_str())
                    && f.iter()
                        .skip_while(|x| **x != "-")
                        .nth(1)
                        .is_some_and(|t| *t == "tmpfs")
            })
        })
        .unwrap_or(false)
}

/// A task's value mounts (for `config.json`) and `env_from_secret` variables.
pub type Materialised = (Vec<oci_spec::runtime::Mount>, Vec<(String, String)>);

/// Writes the task's value files into its bundle tmpfs (after the root filesystem is mounted:
/// owner names resolve in it) and returns the read-only bind mounts for `config.json` and the
/// environment values for `env_from_secret`.
pub fn materialise(
    c: &ContainerDir,
    task: &Task,
    values: &Values,
) -> Result<Materialised, SecretsError> {
    let spec = &task.spec;
    let version = |kind: ObjectKind, source: &str| {
        spec.resolved_refs
            .get(&secret::ref_key(kind, source))
            .copied()
            .unwrap_or(0)
    };
    let dir = c.bundle().join("secrets");
    crate::datadir::private_dir(&dir).map_err(|err| SecretsError::Io {
        op: "create the secrets dir",
        err,
    })?;
    let mut mounts = Vec::new();
    let refs = spec
        .secrets
        .iter()
        .map(|r| (ObjectKind::Secret, r))
        .chain(spec.configs.iter().map(|r| (ObjectKind::Config, r)));
    for (i, (kind, r)) in refs.enumerate() {
        let data = values.get(kind, r.name(), version(kind, &r.source))?;
        let (uid, gid) = owner(&c.rootfs(), kind, i, r)?;
        let file: PathBuf = dir.join(format!("{i}"));
        write_file(&file, &data, r.file_mode(), uid, gid)?;
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(r.target_path(kind))
                .typ("bind")
                .source(file)
                .options(
                    ["rbind", "ro", "nosuid", "nodev", "noexec", "rprivate"]
                        .map(String::from)
                        .to_vec(),
                )
                .build()
                .map_err(|e| SecretsError::Io {
                    op: "build a mount",
                    err: std::io::Error::other(e.to_string()),
                })?,
        );
    }
    let mut env = Vec::new();
    for (var, source) in &spec.env_from_secret {
        let name = source.split(':').next().unwrap_or(source);
        let data = values.get(
            ObjectKind::Secret,
            name,
            version(ObjectKind::Secret, source),
        )?;
        env.push((var.clone(), String::from_utf8_lossy(&data).into_owned()));
    }
    Ok((mounts, env))
}

/// The file's owner: numbers as written, names looked up in the container's files.
fn owner(
    rootfs: &Path,
    kind: ObjectKind,
    i: usize,
    r: &secret::FileRef,
) -> Result<(u32, u32), SecretsError> {
    let field = |f: &str| format!("{kind}s[{i}].{f}");
    let uid = match r.uid.as_deref() {
        None => 0,
        Some(u) => match u.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                crate::user::resolve_in_rootfs(rootfs, u)
                    .map_err(|err| SecretsError::User {
                        field: field("uid"),
                        err,
                    })?
                    .uid
            }
        },
    };
    let gid = match r.gid.as_deref() {
        None => 0,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                crate::user::resolve_in_rootfs(rootfs, &format!("0:{g}"))
                    .map_err(|err| SecretsError::User {
                        field: field("gid"),
                        err,
                    })?
                    .gid
            }
        },
    };
    Ok((uid, gid))
}

fn write_file(path: &Path, data: &[u8], mode: u32, uid: u32, gid: u32) -> Result<(), SecretsError> {
    use std::io::Write;
    let io = |op| move |err| SecretsError::Io { op, err };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io("create a value file"))?;
    f.write_all(data).map_err(io("write a value file"))?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io("chown a value file"))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod a value file"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn values_are_redacted_and_files_get_owner_mode_and_read_only_mounts() {
        let values = Values::default();
        values.set(vec![
            rudder_proto::v1::SecretValue {
                kind: "secret".into(),
                name: "db".into(),
                version: 2,
                data: b"pw-1234".to_vec(),
            },
            rudder_proto::v1::SecretValue {
                kind: "config".into(),
                name: "app.conf".into(),
                version: 1,
                data: b"k=v".to_vec(),
            },
        ]);
        assert!(!format!("{values:?}").contains("pw-1234"));
        let tmp = tempfile::tempdir().unwrap();
        let c = ContainerDir::new(tmp.path());
        std::fs::create_dir_all(c.rootfs().join("etc")).unwrap();
        std::fs::write(
            c.rootfs().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:33:34::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(c.rootfs().join("etc/group"), "root:x:0:\nconf:x:77:\n").unwrap();
        let mut task: Task = serde_json::from_value(serde_json::json!({
            "id": "t1", "service_id": "s", "service_name": "s", "slot": 1,
            "spec": {"name": "s", "image": "x",
                     "secrets": [{"source": "db", "uid": "web", "mode": "0400"}],
                     "configs": [{"source": "app.conf", "target": "/etc/app.conf", "gid": "conf"}],
                     "env_from_secret": {"PW": "db"},
                     "resolved_refs": {"secret:db": 2, "config:app.conf": 1}},
            "spec_version": 1, "node_id": "n", "desired_state": "running",
            "status": {"state": "new", "timestamp": 0}, "created_at": 0, "version": 0
        }))
        .unwrap();
        assert!(uses_any(&task));
        let (mounts, env) = materialise(&c, &task, &values).unwrap();
        assert_eq!(env, vec![("PW".to_string(), "pw-1234".to_string())]);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].destination(), Path::new("/run/secrets/db"));
        assert!(mounts[0]
            .options()
            .as_ref()
            .unwrap()
            .contains(&"ro".to_string()));
        let f = mounts[0].source().clone().unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"pw-1234");
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o400, 33, 0));
        assert_eq!(mounts[1].destination(), Path::new("/etc/app.conf"));
        let m = std::fs::metadata(mounts[1].source().as_ref().unwrap()).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o444, 0, 77));
        // A version not delivered rejects the task, naming it (and no value).
        task.spec.resolved_refs.insert("secret:db".into(), 3);
        let e = materialise(&c, &task, &values).unwrap_err().to_string();
        assert_eq!(
            e,
            "secrets: secret \"db\" version 3 was not delivered to this node"
        );
    }
}

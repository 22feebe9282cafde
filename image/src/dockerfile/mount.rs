//! RUN's flags: `--mount=type=…,key=value,…` (BuildKit's CSV syntax, repeatable) and
//! `--network=default|none`.
//!
//! Parsing checks the shape (a known type, the keys that type takes, booleans, `sharing`)
//! and keeps values as written; [`RunMount::resolved`] substitutes them when the step runs
//! (BuildKit expands build args in mount options) and checks what depends on them (modes,
//! ids, sizes), making targets absolute against WORKDIR. Nothing here does I/O: what a mount
//! means on a host (a per-node cache dir, a secret file, a bind of the context) is the
//! executor's.

use super::DockerfileError;

/// Where secrets are mounted when the mount names no target: `/run/secrets/<id>`.
pub const SECRETS_DIR: &str = "/run/secrets";

/// The most `--mount` flags one RUN may carry.
const MAX_MOUNTS: usize = 32;

/// What a `--mount` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// Files of the context, or of a stage or image (`from=`): read-only unless `rw` (then
    /// writes are thrown away with the step).
    Bind,
    /// A directory kept on the building host across builds (compiler and package caches),
    /// never part of a layer.
    Cache,
    /// An empty tmpfs.
    Tmpfs,
    /// A file from `rctl build --secret`, never part of a layer or of the cache key.
    Secret,
}

/// `sharing=` of a cache mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// BuildKit: concurrent writers. Here one RUN at a time uses a cache (as `locked`).
    #[default]
    Shared,
    /// BuildKit: a second user gets another directory. Here: as `locked`.
    Private,
    /// One RUN at a time uses the cache; others wait.
    Locked,
}

/// `RUN --network=`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunNetwork {
    /// The step's own namespace on the host's bridge (what every RUN gets by default).
    #[default]
    Default,
    /// A network namespace with only a loopback interface.
    None,
}

/// One `--mount`. Fields a type does not take stay at their defaults.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunMount {
    /// `type=` (default `bind`).
    pub kind: MountKind,
    /// `target=` (`dst=`, `destination=`): absolute once resolved. A secret's defaults to
    /// `/run/secrets/<id>`.
    pub target: String,
    /// `source=` (`src=`): a path in the context or in `from` (bind, cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `from=`: a stage or image (bind, cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `id=`: a cache's identity (default: its target) or the secret's name (default: the
    /// target's file name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// bind: `rw` (default read-only); cache: `ro`.
    pub readonly: bool,
    /// cache: `sharing=`.
    pub sharing: Sharing,
    /// cache (default 0755), secret (default 0400): `mode=`, octal, as written until resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// cache, secret: `uid=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// cache, secret: `gid=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<String>,
    /// tmpfs: `size=` (bytes, or with a k/m/g suffix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// secret: `required` (a missing secret fails the step; else the mount is skipped).
    pub required: bool,
    /// secret: `env=NAME`: also (or, without a target, only) given as this variable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

/// A mount option's value as a boolean (`ro`, `ro=true`, `ro=false`).
fn boolean(key: &str, value: Option<&str>, line: usize) -> Result<bool, DockerfileError> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(v) => Err(DockerfileError::new(
            line,
            format!("RUN --mount: {key}={v:?}: expected true or false"),
        )),
    }
}

/// Parses the `--mount` values of one RUN (line `line`).
pub(super) fn parse_mounts(values: &[&str], line: usize) -> Result<Vec<RunMount>, DockerfileError> {
    if values.len() > MAX_MOUNTS {
        return Err(DockerfileError::new(
            line,
            format!(
                "RUN has {} --mount flags: at most {MAX_MOUNTS}",
                values.len()
            ),
        ));
    }
    values.iter().map(|v| parse_mount(v, line)).collect()
}

fn parse_mount(value: &str, line: usize) -> Result<RunMount, DockerfileError> {
    let err = |m: String| DockerfileError::new(line, format!("RUN --mount={value}: {m}"));
    let fields: Vec<(String, Option<String>)> = value
        .split(',')
        .filter(|f| !f.trim().is_empty())
        .map(|f| match f.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(unquote(v.trim()))),
            None => (f.trim().to_ascii_lowercase(), None),
        })
        .collect();
    let kind =
        match fields.iter().find(|(k, _)| k == "type") {
            None => MountKind::Bind,
            Some((_, v)) => match v.as_deref().unwrap_or_default() {
                "bind" => MountKind::Bind,
                "cache" => MountKind::Cache,
                "tmpfs" => MountKind::Tmpfs,
                "secret" => MountKind::Secret,
                "ssh" => return Err(err(
                    "type=ssh is not supported (no SSH agent is forwarded to builds); use a secret"
                        .into(),
                )),
                other => {
                    return Err(err(format!(
                        "unknown mount type {other:?} (bind, cache, tmpfs or secret)"
                    )))
                }
            },
        };
    let allowed: &[&str] = match kind {
        MountKind::Bind => &["source", "from", "readonly", "rw"],
        MountKind::Cache => &[
            "id", "source", "from", "readonly", "sharing", "mode", "uid", "gid",
        ],
        MountKind::Tmpfs => &["size"],
        MountKind::Secret => &["id", "required", "mode", "uid", "gid", "env"],
    };
    let mut m = RunMount {
        kind,
        target: String::new(),
        source: None,
        from: None,
        id: None,
        readonly: kind == MountKind::Bind,
        sharing: Sharing::Shared,
        mode: None,
        uid: None,
        gid: None,
        size: None,
        required: false,
        env: None,
    };
    for (key, v) in &fields {
        let key = match key.as_str() {
            "dst" | "destination" => "target",
            "src" => "source",
            "ro" => "readonly",
            "readwrite" => "rw",
            k => k,
        };
        if key == "type" {
            continue;
        }
        if key != "target" && !allowed.contains(&key) {
            return Err(err(
                format!("{key:?} is not an option of a {kind:?} mount").to_lowercase()
            ));
        }
        let needs_value = || {
            v.clone()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| err(format!("{key} needs a value ({key}=...)")))
        };
        match key {
            "target" => m.target = needs_value()?,
            "source" => m.source = Some(needs_value()?),
            "from" => m.from = Some(needs_value()?),
            "id" => m.id = Some(needs_value()?),
            "readonly" => m.readonly = boolean(key, v.as_deref(), line)?,
            "rw" => m.readonly = !boolean(key, v.as_deref(), line)?,
            "required" => m.required = boolean(key, v.as_deref(), line)?,
            "mode" => m.mode = Some(needs_value()?),
            "uid" => m.uid = Some(needs_value()?),
            "gid" => m.gid = Some(needs_value()?),
            "size" => m.size = Some(needs_value()?),
            "env" => m.env = Some(needs_value()?),
            "sharing" => {
                m.sharing = match needs_value()?.as_str() {
                    "shared" => Sharing::Shared,
                    "private" => Sharing::Private,
                    "locked" => Sharing::Locked,
                    other => {
                        return Err(err(format!(
                            "sharing={other:?}: expected shared, private or locked"
                        )))
                    }
                }
            }
            _ => unreachable!("checked against the allowed keys"),
        }
    }
    if m.target.is_empty() && kind != MountKind::Secret {
        return Err(err("a target is required (target=/path)".into()));
    }
    if kind == MountKind::Secret && m.id.is_none() && m.target.is_empty() {
        return Err(err(
            "a secret mount needs an id or a target (id=NAME)".into()
        ));
    }
    Ok(m)
}

fn unquote(v: &str) -> String {
    let q = v.len() >= 2
        && ((v.starts_with('"') && v.ends_with('"')) || (v.starts_with('\'') && v.ends_with('\'')));
    if q {
        v[1..v.len() - 1].to_string()
    } else {
        v.to_string()
    }
}

/// An octal mode (at most 07777).
fn octal(what: &str, v: &str, line: usize) -> Result<u32, DockerfileError> {
    u32::from_str_radix(v, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            DockerfileError::new(
                line,
                format!("RUN --mount: {what}={v:?}: not an octal mode"),
            )
        })
}

/// A size in bytes: a number, optionally with a k, m or g suffix (binary, as docker reads
/// tmpfs sizes), `b` allowed after it.
pub(super) fn parse_size(v: &str) -> Option<u64> {
    let lower = v.trim().to_ascii_lowercase();
    let lower = lower.strip_suffix('b').unwrap_or(&lower);
    let (num, mult) = match lower.chars().last()? {
        'k' => (&lower[..lower.len() - 1], 1u64 << 10),
        'm' => (&lower[..lower.len() - 1], 1 << 20),
        'g' => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

impl RunMount {
    /// The mount with its values substituted by `expand` and checked; targets made absolute
    /// against `workdir`; a secret's id and target defaulted (`/run/secrets/<id>`).
    pub(super) fn resolved(
        &self,
        workdir: &str,
        line: usize,
        expand: &dyn Fn(&str, &str) -> Result<String, DockerfileError>,
    ) -> Result<RunMount, DockerfileError> {
        let opt = |what: &str, v: &Option<String>| -> Result<Option<String>, DockerfileError> {
            v.as_ref().map(|v| expand(what, v)).transpose()
        };
        let mut m = self.clone();
        m.source = opt("RUN --mount source", &self.source)?;
        m.from = opt("RUN --mount from", &self.from)?;
        m.id = opt("RUN --mount id", &self.id)?;
        m.env = opt("RUN --mount env", &self.env)?;
        let target = expand("RUN --mount target", &self.target)?;
        let bad = |m: String| DockerfileError::new(line, format!("RUN --mount: {m}"));
        if m.kind == MountKind::Secret {
            if m.id.is_none() {
                let name = target.rsplit('/').next().unwrap_or_default();
                if name.is_empty() {
                    return Err(bad(format!("target {target:?} names no file")));
                }
                m.id = Some(name.to_string());
            }
            let id = m.id.clone().unwrap_or_default();
            let valid = !id.is_empty()
                && id.len() <= 128
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !id.starts_with('.');
            if !valid {
                return Err(bad(format!(
                    "secret id {id:?}: use letters, digits, '-', '_' and '.'"
                )));
            }
            if let Some(e) = &m.env {
                let ok = e
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && e.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    return Err(bad(format!("env={e:?} is not a variable name")));
                }
            }
            m.target = if target.is_empty() && m.env.is_some() {
                String::new()
            } else if target.is_empty() {
                format!("{SECRETS_DIR}/{id}")
            } else {
                super::stage::absolute(workdir, &target)
            };
        } else {
            m.target = super::stage::absolute(workdir, &target);
        }
        if m.target == "/" {
            return Err(bad("the target cannot be /".into()));
        }
        if let Some(mode) = &self.mode {
            let v = expand("RUN --mount mode", mode)?;
            m.mode = Some(format!("{:o}", octal("mode", &v, line)?));
        }
        for (what, field, v) in [
            ("uid", &mut m.uid, &self.uid),
            ("gid", &mut m.gid, &self.gid),
        ] {
            if let Some(raw) = v {
                let n = expand(&format!("RUN --mount {what}"), raw)?;
                let id: u32 = n
                    .parse()
                    .map_err(|_| bad(format!("{what}={n:?}: not a number")))?;
                *field = Some(id.to_string());
            }
        }
        if let Some(size) = &self.size {
            let v = expand("RUN --mount size", size)?;
            let n =
                parse_size(&v).ok_or_else(|| bad(format!("size={v:?}: not a size (like 64m)")))?;
            m.size = Some(n.to_string());
        }
        if m.kind == MountKind::Cache && m.id.is_none() {
            m.id = Some(m.target.clone());
        }
        Ok(m)
    }

    /// The numeric mode once resolved (`default` when none was given).
    pub fn mode_or(&self, default: u32) -> u32 {
        self.mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or(default)
    }

    /// The numeric uid and gid once resolved (0 when not given).
    pub fn owner(&self) -> (u32, u32) {
        let n = |v: &Option<String>| v.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
        (n(&self.uid), n(&self.gid))
    }

    /// The tmpfs size in bytes once resolved.
    pub fn size_bytes(&self) -> Option<u64> {
        self.size.as_deref().and_then(|s| s.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::test_util::*;
    use crate::dockerfile::*;

    fn mounts_of(text: &str) -> (Vec<RunMount>, RunNetwork) {
        let (actions, _) = run_stage(text, &[("V", "/v")]);
        match actions.into_iter().last() {
            Some(Action::Run {
                mounts, network, ..
            }) => (mounts, network),
            other => panic!("not a RUN: {other:?}"),
        }
    }

    #[test]
    fn every_mount_type_parses_and_resolves() {
        let (m, net) = mounts_of(
            "FROM scratch\nARG V\nWORKDIR /src\nRUN --network=none \\\n --mount=type=cache,target=/root/.cache,id=go,sharing=locked,mode=0700,uid=1000,gid=1000 \\\n --mount=type=cache,dst=${V}/c,ro \\\n --mount=type=secret,id=token \\\n --mount=type=secret,id=npm,target=.npmrc,required,mode=0440,env=NPM \\\n --mount=type=bind,source=go.mod,target=go.mod \\\n --mount=from=builder,src=/out,target=/in,rw \\\n --mount=type=tmpfs,target=/tmp,size=64m \\\n  make\n",
        );
        assert_eq!(net, RunNetwork::None);
        assert_eq!(m.len(), 7);
        assert_eq!(
            (m[0].kind, m[0].target.as_str()),
            (MountKind::Cache, "/root/.cache")
        );
        assert_eq!(m[0].id.as_deref(), Some("go"));
        assert_eq!(m[0].sharing, Sharing::Locked);
        assert_eq!((m[0].mode_or(0o755), m[0].owner()), (0o700, (1000, 1000)));
        assert!(!m[0].readonly);
        // A cache's id defaults to its target; variables are substituted.
        assert_eq!(m[1].target, "/v/c");
        assert_eq!(m[1].id.as_deref(), Some("/v/c"));
        assert!(m[1].readonly);
        assert_eq!(m[2].target, "/run/secrets/token");
        assert_eq!((m[2].required, m[2].mode_or(0o400)), (false, 0o400));
        // Relative targets are under WORKDIR.
        assert_eq!(m[3].target, "/src/.npmrc");
        assert_eq!(m[3].env.as_deref(), Some("NPM"));
        assert!(m[3].required);
        assert_eq!(m[3].mode_or(0o400), 0o440);
        assert_eq!(
            (m[4].kind, m[4].target.as_str()),
            (MountKind::Bind, "/src/go.mod")
        );
        assert!(m[4].readonly, "a bind is read-only by default");
        assert_eq!(m[5].from.as_deref(), Some("builder"));
        assert!(!m[5].readonly);
        assert_eq!(m[6].size_bytes(), Some(64 << 20));
        // A secret's id defaults to its target's name.
        let (m, _) = mounts_of("FROM scratch\nRUN --mount=type=secret,target=/etc/key make\n");
        assert_eq!(m[0].id.as_deref(), Some("key"));
        // Plain RUN: the action is unchanged (and so are existing cache keys).
        let (actions, _) = run_stage("FROM scratch\nRUN make\n", &[]);
        let json = serde_json::to_string(&actions[0]).unwrap();
        assert!(
            !json.contains("mounts") && !json.contains("network"),
            "{json}"
        );
    }

    #[test]
    fn mount_errors_name_the_line() {
        let cases: &[(&str, &str)] = &[
            ("RUN --mount=type=ssh make", "RUN --mount=type=ssh: type=ssh is not supported (no SSH agent is forwarded to builds); use a secret"),
            ("RUN --mount=type=nfs,target=/x make", "RUN --mount=type=nfs,target=/x: unknown mount type \"nfs\" (bind, cache, tmpfs or secret)"),
            ("RUN --mount=type=cache make", "RUN --mount=type=cache: a target is required (target=/path)"),
            ("RUN --mount=type=tmpfs,target=/x,id=a make", "RUN --mount=type=tmpfs,target=/x,id=a: \"id\" is not an option of a tmpfs mount"),
            ("RUN --mount=type=cache,target=/x,sharing=all make", "RUN --mount=type=cache,target=/x,sharing=all: sharing=\"all\": expected shared, private or locked"),
            ("RUN --mount=type=secret make", "RUN --mount=type=secret: a secret mount needs an id or a target (id=NAME)"),
            ("RUN --mount=type=bind,target=/x,ro=maybe make", "RUN --mount: readonly=\"maybe\": expected true or false"),
            ("RUN --mount=type=cache,target=/x,id= make", "RUN --mount=type=cache,target=/x,id=: id needs a value (id=...)"),
            ("RUN --network=host make", "RUN --network=host is refused: a build step on the host's network could reach the services listening on the host; use the default network"),
        ];
        for (run, message) in cases {
            let e = err_of(&format!("FROM scratch\n\n{run}\n"));
            assert_eq!((e.line, e.message.as_str()), (3, *message), "{run}");
        }
        let step_err = |text: &str| {
            let df = parse(text).unwrap();
            let mut b = StageBuilder::new(&[], &BTreeMap::new(), Settings::default());
            let mut last = Ok(Action::Config);
            for s in &df.stages[0].steps {
                last = b.step(s);
            }
            last.unwrap_err()
        };
        let e = step_err("FROM scratch\nRUN --mount=type=cache,target=/x,mode=999 make\n");
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "RUN --mount: mode=\"999\": not an octal mode")
        );
        let e = step_err("FROM scratch\nRUN --mount=type=secret,id=../x make\n");
        assert_eq!(
            e.message,
            "RUN --mount: secret id \"../x\": use letters, digits, '-', '_' and '.'"
        );
        let e = step_err("FROM scratch\nRUN --mount=type=tmpfs,target=/t,size=lots make\n");
        assert_eq!(
            e.message,
            "RUN --mount: size=\"lots\": not a size (like 64m)"
        );
        let e = step_err("FROM scratch\nRUN --mount=type=cache,target=/,id=x make\n");
        assert_eq!(e.message, "RUN --mount: the target cannot be /");
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("2kb"), Some(2048));
    }
}

//! `build:` in compose files: what `rctl stack deploy` builds (through `rctl build`, into the
//! cluster registry) before deploying, and the service whose image it becomes. The short form
//! is the context directory; the long form takes `context`, `dockerfile`, `target` and `args`
//! (other keys are warned). Paths stay as written (relative to the compose file's directory,
//! the Dockerfile relative to the context): the client resolves and reads them. A remote
//! context (a URL) is refused.

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::{key_str, ComposeError, Cx};

/// One image to build for a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    /// The service's Rudder name.
    pub service: String,
    /// The service's compose name.
    pub compose_name: String,
    /// The reference to store the image under: the service's `image:`, else
    /// `STACK-SERVICE:latest`. The deployed service is pinned to the built digest.
    pub tag: String,
    /// The context directory, relative to the compose file's directory (or absolute).
    pub context: String,
    /// The Dockerfile, relative to the context; `None`: `Dockerfile`.
    pub dockerfile: Option<String>,
    /// The stage to build.
    pub target: Option<String>,
    /// `ARG` values; `None`: taken from the environment (as `--build-arg KEY`).
    pub args: BTreeMap<String, Option<String>>,
}

/// Reads a service's `build:` (at `field`) for the service `service` (Rudder name)
/// `compose_name`, stored under `tag`.
pub(crate) fn parse(
    cx: &mut Cx,
    field: &str,
    v: &Value,
    service: &str,
    compose_name: &str,
    tag: &str,
) -> Result<Build, ComposeError> {
    let mut b = Build {
        service: service.to_string(),
        compose_name: compose_name.to_string(),
        tag: tag.to_string(),
        context: ".".into(),
        dockerfile: None,
        target: None,
        args: BTreeMap::new(),
    };
    let text = |cx: &Cx, f: &str, v: &Value| -> Result<String, ComposeError> {
        match v {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(cx.err(f, "expected a non-empty string")),
        }
    };
    match v {
        Value::String(_) => b.context = text(cx, field, v)?,
        Value::Mapping(m) => {
            for (k, val) in m {
                let k = key_str(k);
                let f = format!("{field}.{k}");
                match k.as_str() {
                    "context" => b.context = text(cx, &f, val)?,
                    "dockerfile" => b.dockerfile = Some(text(cx, &f, val)?),
                    "target" => b.target = Some(text(cx, &f, val)?),
                    "args" => b.args = super::service::kv(cx, &f, val)?,
                    _ => cx.warn(&f, "not supported by Rudder's builds; ignored"),
                }
            }
        }
        _ => return Err(cx.err(field, "expected a context directory or a mapping")),
    }
    if b.context.contains("://") || b.context.starts_with("git@") {
        return Err(cx.err(
            field,
            "a remote build context is not supported: clone it and give its directory",
        ));
    }
    if let Some(d) = &b.dockerfile {
        if std::path::Path::new(d).is_absolute() || d.split('/').any(|p| p == "..") {
            // The Dockerfile travels inside the context: it must be in it.
            return Err(cx.err(
                &format!("{field}.dockerfile"),
                "must be a path inside the build context",
            ));
        }
    }
    Ok(b)
}

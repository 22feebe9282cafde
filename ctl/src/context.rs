//! Where the cluster is: a context file written by `rctl local up` (or by hand), so `rctl` needs
//! no flags. Precedence: `--controller`/`--registry` flags, then `$RUDDER_CONTEXT`, then
//! `~/.rudder/context.json`.
//!
//! A cluster has several controllers and any live one serves rctl, so a context names them all
//! (`controllers`); `controller` (one URL) is still read and written for older files and tools.
//!
//! The file carries a format label first (`"format_version": 1`, see [`rudder_model::format`]):
//! files without one (`rctl local up` before labels, hand-written ones) are version 1, and a
//! newer version is refused with the file's path instead of being half read.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Context {
    #[serde(default)]
    pub name: String,
    /// gRPC URL of a controller, e.g. `http://10.213.1.1:4243`. Used when `controllers` is
    /// empty; kept so context files from before multi-controller clusters still work.
    #[serde(default)]
    pub controller: String,
    /// gRPC URLs of every controller, tried in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
    /// Registry `host:port`.
    pub registry: String,
    /// The cluster CA and this user's admin certificate and key (PEM files): every controller
    /// speaks mutual TLS and serves the Control API to admin certificates only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// The PEM texts of a context's credentials.
pub struct Credentials {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl Context {
    /// Reads the credentials the context names (`None` when it names none).
    pub fn credentials(&self) -> anyhow::Result<Option<Credentials>> {
        let (Some(ca), Some(cert), Some(key)) = (&self.ca, &self.cert, &self.key) else {
            return Ok(None);
        };
        // Never half of a renewal: `rctl` renews the pair under an exclusive lock on this
        // file (`cmd::admin::renew_if_due`), and reads it under a shared one.
        let _pair = std::fs::OpenOptions::new()
            .read(true)
            .open(cert.with_extension("renew.lock"))
            .ok()
            .and_then(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockShared).ok());
        let read = |p: &PathBuf, what: &str| {
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("context: reading the {what} {}: {e}", p.display()))
        };
        Ok(Some(Credentials {
            ca: read(ca, "cluster ca")?,
            cert: read(cert, "admin certificate")?,
            key: read(key, "admin key")?,
        }))
    }
}

impl Context {
    /// The controller URLs to try, in order: `controllers`, else `controller`.
    pub fn controller_urls(&self) -> Vec<String> {
        let listed: Vec<&str> = if self.controllers.is_empty() {
            vec![self.controller.as_str()]
        } else {
            self.controllers.iter().map(String::as_str).collect()
        };
        let mut out = Vec::new();
        for c in listed {
            if let Some(url) = to_url(c) {
                if !out.contains(&url) {
                    out.push(url);
                }
            }
        }
        out
    }
}

/// `host:port` → `http://host:port`; a URL stays as it is (without a trailing `/`); blank → none.
fn to_url(addr: &str) -> Option<String> {
    let addr = addr.trim().trim_end_matches('/');
    if addr.is_empty() {
        None
    } else if addr.contains("://") {
        Some(addr.to_string())
    } else {
        Some(format!("http://{addr}"))
    }
}

/// Parses `--controller`: one URL or a comma-separated list (`http://10.213.1.1:4243,
/// http://10.213.1.2:4243`); a bare `host:port` gets `http://`.
pub fn parse_controllers(s: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for url in s.split(',').filter_map(to_url) {
        if !out.contains(&url) {
            out.push(url);
        }
    }
    if out.is_empty() {
        anyhow::bail!("--controller {s:?} names no controller");
    }
    Ok(out)
}

/// The default context path: `~/.rudder/context.json`.
pub fn default_path() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".rudder").join("context.json")
}

pub fn load(path: &Path) -> anyhow::Result<Context> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "no cluster context at {} ({e}); run `rctl local up` or pass --controller",
            path.display()
        )
    })?;
    let what = format!("context file {}", path.display());
    let (ctx, _) = rudder_model::format::decode(text.as_bytes(), CONTEXT_FORMAT, &what)?;
    Ok(ctx)
}

/// The newest context file format this build reads, and the one it writes.
pub const CONTEXT_FORMAT: u64 = 1;

pub fn save(path: &Path, ctx: &Context) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        path,
        rudder_model::format::encode("a context", ctx, CONTEXT_FORMAT, true)?,
    )?;
    Ok(())
}

/// Removes the controller at `addr` (`host:port`) from `ctx`'s controllers; whether it was
/// there.
pub fn forget_controller(ctx: &mut Context, addr: &str) -> bool {
    let is_it = |u: &str| {
        u.split_once("://")
            .map_or(u, |(_, rest)| rest)
            .trim_end_matches('/')
            == addr
    };
    let before = ctx.controllers.len();
    ctx.controllers.retain(|u| !is_it(u));
    let mut changed = ctx.controllers.len() != before;
    if is_it(&ctx.controller) {
        ctx.controller = ctx.controllers.first().cloned().unwrap_or_default();
        changed = true;
    }
    changed
}

/// The context file `rctl` reads: `--context`, else `$RUDDER_CONTEXT`, else the default.
pub fn path(context: Option<&Path>) -> PathBuf {
    context
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("RUDDER_CONTEXT").map(PathBuf::from))
        .unwrap_or_else(default_path)
}

/// Resolves the context from flags, environment and files.
pub fn resolve(
    controller: Option<&str>,
    registry: Option<&str>,
    context: Option<&Path>,
) -> anyhow::Result<Context> {
    let path = context
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("RUDDER_CONTEXT").map(PathBuf::from))
        .unwrap_or_else(default_path);
    if let Some(c) = controller {
        // The context file, when there is one, still supplies the credentials.
        let base = load(&path).ok();
        let controllers = parse_controllers(c)?;
        let first = controllers[0].clone();
        let registry = registry.map(str::to_string).unwrap_or_else(|| {
            // Same host as the first controller, registry port.
            let host = first
                .split_once("://")
                .map_or(first.as_str(), |(_, rest)| rest)
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_else(|| first.clone());
            format!("{host}:5000")
        });
        return Ok(Context {
            name: String::new(),
            controller: first,
            controllers,
            registry,
            ca: base.as_ref().and_then(|b| b.ca.clone()),
            cert: base.as_ref().and_then(|b| b.cert.clone()),
            key: base.as_ref().and_then(|b| b.key.clone()),
        });
    }
    let mut ctx = load(&path)?;
    if let Some(r) = registry {
        ctx.registry = r.to_string();
    }
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "http://10.213.1.1:4243";
    const B: &str = "http://10.213.1.2:4243";

    #[test]
    fn saved_contexts_are_labelled_and_newer_ones_refused_by_path() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("context.json");
        let ctx: Context =
            serde_json::from_str(&format!(r#"{{"controllers":["{A}"],"registry":"r:5000"}}"#))
                .unwrap();
        save(&path, &ctx).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\n  \"format_version\": 1,\n"), "{text}");
        assert_eq!(load(&path).unwrap().controller_urls(), [A]);
        let newer = text.replace("\"format_version\": 1", "\"format_version\": 2");
        std::fs::write(&path, newer).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("format version 2"), "{err}");
    }

    #[test]
    fn a_removed_controller_leaves_the_context() {
        let mut ctx = resolve(Some(&format!("{A},{B}")), None, None).unwrap();
        assert!(forget_controller(&mut ctx, "10.213.1.1:4243"));
        assert_eq!(ctx.controllers, vec![B]);
        assert_eq!(ctx.controller, B);
        assert!(!forget_controller(&mut ctx, "10.213.1.9:4243"));
    }

    #[test]
    fn controller_flag_takes_one_url_or_a_list() {
        assert_eq!(parse_controllers(A).unwrap(), vec![A]);
        assert_eq!(
            parse_controllers(&format!("{A}, {B}/,")).unwrap(),
            vec![A, B]
        );
        assert_eq!(
            parse_controllers("10.213.1.1:4243,10.213.1.2:4243,10.213.1.1:4243").unwrap(),
            vec![A, B]
        );
        assert!(parse_controllers(" , ").is_err());
    }

    #[test]
    fn flag_context_keeps_both_fields_and_derives_the_registry() {
        let ctx = resolve(Some(&format!("{A},{B}")), None, None).unwrap();
        assert_eq!(ctx.controller, A);
        assert_eq!(ctx.controllers, vec![A, B]);
        assert_eq!(ctx.registry, "10.213.1.1:5000");
        assert_eq!(ctx.controller_urls(), vec![A, B]);
        let ctx = resolve(Some(A), Some("r:5000"), None).unwrap();
        assert_eq!(ctx.registry, "r:5000");
    }

    #[test]
    fn context_files_old_and_new() {
        let old: Context =
            serde_json::from_str(&format!(r#"{{"controller":"{A}","registry":"r:5000"}}"#))
                .unwrap();
        assert_eq!(old.controller_urls(), vec![A]);
        let new: Context = serde_json::from_str(&format!(
            r#"{{"controller":"{A}","controllers":["{A}","10.213.1.2:4243"],"registry":"r:5000"}}"#
        ))
        .unwrap();
        assert_eq!(new.controller_urls(), vec![A, B]);
        let only_list: Context =
            serde_json::from_str(&format!(r#"{{"controllers":["{B}"],"registry":"r:5000"}}"#))
                .unwrap();
        assert_eq!(only_list.controller_urls(), vec![B]);
    }

    #[test]
    fn context_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("context.json");
        let ctx = resolve(Some(&format!("{A},{B}")), None, None).unwrap();
        save(&path, &ctx).unwrap();
        let back = resolve(None, None, Some(&path)).unwrap();
        assert_eq!(back.controller_urls(), vec![A, B]);
        assert_eq!(back.controller, A);
    }
}

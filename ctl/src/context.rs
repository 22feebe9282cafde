//! Where the cluster is: a context file written by `rctl local up` (or by hand), so `rctl` needs
//! no flags. Precedence: `--controller`/`--registry` flags, then `$RUDDER_CONTEXT`, then
//! `~/.rudder/context.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Context {
    #[serde(default)]
    pub name: String,
    /// gRPC URL of a controller, e.g. `http://10.213.1.1:4243`.
    pub controller: String,
    /// Registry `host:port`.
    pub registry: String,
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
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("context file {}: {e}", path.display()))
}

pub fn save(path: &Path, ctx: &Context) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(ctx)?)?;
    Ok(())
}

/// Resolves the context from flags, environment and files.
pub fn resolve(
    controller: Option<&str>,
    registry: Option<&str>,
    context: Option<&Path>,
) -> anyhow::Result<Context> {
    if let Some(c) = controller {
        let registry = registry.map(str::to_string).unwrap_or_else(|| {
            // Same host as the controller, registry port.
            let host = c
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_else(|| c.to_string());
            format!("{host}:5000")
        });
        return Ok(Context {
            name: String::new(),
            controller: c.to_string(),
            registry,
        });
    }
    let path = context
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("RUDDER_CONTEXT").map(PathBuf::from))
        .unwrap_or_else(default_path);
    let mut ctx = load(&path)?;
    if let Some(r) = registry {
        ctx.registry = r.to_string();
    }
    Ok(ctx)
}

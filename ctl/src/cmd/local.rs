//! `rctl local up|down`: a multi-host lab on this machine (network namespaces on a private
//! underlay bridge, an agent per host, a controller on the first), see `crate::lab`.

use std::path::PathBuf;

use crate::context::{self, Context};
use crate::lab;

pub fn lab_root() -> PathBuf {
    std::env::var_os("RUDDER_LAB_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/rudder-lab"))
}

/// Finds a sibling binary of `rctl` (same build directory), else relies on PATH.
pub fn sibling_bin(name: &str) -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            for d in [Some(dir), dir.parent()].into_iter().flatten() {
                let p = d.join(name);
                if p.is_file() {
                    return p;
                }
            }
        }
    }
    PathBuf::from(name)
}

pub struct UpArgs {
    pub name: String,
    pub nodes: u32,
    pub managers: u32,
    pub runtime: String,
    pub set_default_context: bool,
}

pub fn up(a: UpArgs) -> anyhow::Result<lab::Lab> {
    let cfg = lab::LabConfig {
        name: a.name,
        nodes: a.nodes,
        managers: a.managers,
        root: lab_root(),
        agent_bin: sibling_bin("rudder-agent"),
        controller_bin: sibling_bin("rudder-controller"),
        runtime: a.runtime,
        extra_agent_args: vec![],
    };
    let lab = lab::up(&cfg)?;
    if a.set_default_context {
        let ctx: Context = context::load(&lab.context_path)?;
        context::save(&context::default_path(), &ctx)?;
    }
    Ok(lab)
}

pub fn down(name: &str) -> anyhow::Result<()> {
    let report = lab::down(&lab_root(), name)?;
    println!("{report}");
    // Forget the default context if it pointed at this lab.
    if let Ok(ctx) = context::load(&context::default_path()) {
        if ctx.name == name {
            let _ = std::fs::remove_file(context::default_path());
        }
    }
    Ok(())
}

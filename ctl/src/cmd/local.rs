//! `rctl local up|down`: a multi-host lab on this machine (network namespaces on a private
//! underlay bridge, an agent per host, a controller on the first), see the `rudder-lab` crate.

use std::path::PathBuf;

use rudder_lab as lab;

use crate::context::{self, Context};

pub fn lab_root() -> PathBuf {
    lab::default_root()
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
        agent_bin: lab::sibling_binary("rudder-agent"),
        controller_bin: lab::sibling_binary("rudder-controller"),
        rudder_bin: Some(lab::sibling_binary("rudder")),
        runtime: a.runtime,
        extra_agent_args: vec![],
        extra_controller_args: vec![],
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

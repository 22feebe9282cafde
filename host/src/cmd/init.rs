//! `rudder init`: makes this host the first of a new cluster, as `docker swarm init` does.
//! Writes the config (a controller with raft id 1 and an agent), prepares the data dirs,
//! starts both units (or leaves that to the caller with `--start none`, as the lab does),
//! waits until the controller serves, joins the agent, and prints the join commands.
//!
//! The cluster CA and the join tokens are the controller's own (it makes them at its first
//! start and writes the tokens once into `<controller data>/admin/`); `init` only reads that
//! hand-off, and removes it once printed: `rctl cluster join-token` shows them again.

use std::path::Path;

use anyhow::{bail, Context as _};

use super::{HostOpts, Start};
use crate::advertise::{self, Target};
use crate::config::{self, HostConfig};

/// Written by the first controller (the controller's `security::ADMIN_DIR` and token files).
const ADMIN_DIR: &str = "admin";
const WORKER_TOKEN_FILE: &str = "worker.token";
const MANAGER_TOKEN_FILE: &str = "manager.token";

/// The config `init` writes: the flags over the file, with a controller of raft id 1.
pub fn plan(opts: &HostOpts, file: HostConfig) -> anyhow::Result<HostConfig> {
    let mut c = config::merge(&[opts.layer(true), file]);
    let ctl = c.controller.get_or_insert_with(Default::default);
    if ctl.join.is_some() {
        bail!("the config names a controller to join ([controller] join): that is `rudder join`");
    }
    ctl.raft_id.get_or_insert(1);
    c.agent.role = Some(config::Role::Manager);
    let advertise = c.controller()?.advertise;
    if let Some(a) = advertise {
        c.agent
            .controllers
            .get_or_insert_with(|| vec![format!("http://{a}")]);
    }
    c.validate()?;
    Ok(c)
}

/// Runs `rudder init`.
pub fn run(opts: &HostOpts) -> anyhow::Result<()> {
    let start = opts.start.resolve()?;
    let file = super::existing(&opts.config)?;
    let opts = &super::with_advertise(
        opts,
        &file,
        &[Target::DefaultRoute],
        true,
        &advertise::UdpProbe,
    )?;
    let c = plan(opts, file)?;
    super::refuse_member(&c)?;
    super::write_config(&opts.config, &c)?;
    let ctl = c.controller()?;
    let advertise = ctl
        .advertise
        .clone()
        .unwrap_or_else(|| ctl.listen.to_string());
    let cfg = opts.config.display();
    if start == Start::None {
        println!(
            "Wrote {cfg}. Start the controller (rudder-controller --config {cfg}); it makes the \
             cluster and writes its join tokens to {}. Then start the agent (rudder-agent \
             --config {cfg}) with the worker token in RUDDER_JOIN_TOKEN.",
            ctl.data_dir.join(ADMIN_DIR).display()
        );
        return Ok(());
    }
    super::systemctl(&["enable", "--now", super::CONTROLLER_UNIT])?;
    super::wait_controller(&c)?;
    let admin = ctl.data_dir.join(ADMIN_DIR);
    let worker = read_token(&admin.join(WORKER_TOKEN_FILE))?;
    let manager = read_token(&admin.join(MANAGER_TOKEN_FILE))?;
    super::join_agent(&c.agent()?.data_dir, &advertise, &worker)?;
    super::systemctl(&["enable", "--now", super::AGENT_UNIT])?;
    // Printed once; outside the store's encryption they must not stay on disk.
    for f in [WORKER_TOKEN_FILE, MANAGER_TOKEN_FILE] {
        let _ = std::fs::remove_file(admin.join(f));
    }
    println!("{}", join_commands(&advertise, &worker, &manager, &admin));
    Ok(())
}

/// What `init` prints: the two join commands and where the admin credentials are.
pub fn join_commands(advertise: &str, worker: &str, manager: &str, admin: &Path) -> String {
    format!(
        "Cluster initialised; this host runs a controller and an agent.\n\n\
         To add a worker, run on it:\n    rudder join --token {worker} {advertise}\n\n\
         To add a manager (3 or 5 in all tolerate 1 or 2 failures), run on it:\n    \
         rudder join --token {manager} {advertise}\n\n\
         Admin credentials (rctl): {admin}/ca.pem, admin.pem, admin-key.pem; \
         `rctl cluster join-token worker|manager` prints the tokens again.",
        admin = admin.display()
    )
}

/// Reads a token file the controller wrote, waiting briefly for it to appear.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
            _ if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(200))
            }
            Ok(_) => bail!("{} is empty", path.display()),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "reading {} (the controller writes it at its first start only)",
                        path.display()
                    )
                })
            }
        }
    }
}

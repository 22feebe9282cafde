//! `rudder join --token T ADDR`: adds this host to the cluster of the controller at `ADDR`, as
//! `docker swarm join` does. The token decides the role: the agent joins with it here (the
//! token pins the cluster CA; the controller answers with a certificate of the token's role),
//! so a bad token or an unreachable address is an error before anything is written. A worker
//! keeps no token; a manager's controller joins the raft group on its first start with the
//! token from a 0600 file beside the config.

use anyhow::Context as _;

use super::{HostOpts, Start};
use crate::advertise::{self, Target};
use crate::config::{self, HostConfig};

/// `rudder join`'s own flags beside the host ones.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinOpts {
    /// The join token (`rudder init` printed it; `rctl cluster join-token worker|manager`).
    /// Prefer RUDDER_JOIN_TOKEN: a command line is readable by every local user.
    #[arg(long, env = rudder_pki::ca::TOKEN_ENV, hide_env_values = true)]
    pub token: String,
    /// gRPC `host:port` of a controller of the cluster.
    pub addr: String,
    #[command(flatten)]
    pub host: HostOpts,
}

/// The config `join` writes for a host of `role`, the flags over the file.
pub fn plan(
    opts: &JoinOpts,
    file: HostConfig,
    role: rudder_pki::ca::Role,
    token_file: &std::path::Path,
) -> anyhow::Result<HostConfig> {
    let manager = role == rudder_pki::ca::Role::Manager;
    let mut c = config::merge(&[opts.host.layer(manager), file]);
    c.agent
        .controllers
        .get_or_insert_with(|| vec![format!("http://{}", opts.addr)]);
    c.join = Default::default();
    if manager {
        let ctl = c.controller.get_or_insert_with(Default::default);
        ctl.join = Some(opts.addr.clone());
        // Never 1 (the first controller's); a clash is refused by the CA (the id is taken).
        ctl.raft_id
            .get_or_insert_with(|| rand::random_range(2..=u64::from(u16::MAX)));
        c.agent.role = Some(config::Role::Manager);
        c.join.token_file = Some(token_file.to_path_buf());
    } else {
        c.controller = None;
        c.agent.role = Some(config::Role::Worker);
    }
    c.validate()?;
    Ok(c)
}

/// Runs `rudder join`.
pub fn run(opts: &JoinOpts) -> anyhow::Result<()> {
    rudder_pki::ca::Token::parse(&opts.token).map_err(|e| {
        anyhow::anyhow!(
            "bad join token: {e} (copy it whole from `rudder init` or `rctl cluster join-token`)"
        )
    })?;
    let start = opts.host.start.resolve()?;
    let file = super::existing(&opts.host.config)?;
    // Whatever the role, neither daemon may have joined anything yet.
    let probe = config::merge(&[opts.host.layer(true), file.clone()]);
    super::refuse_member(&probe)?;
    super::reachable(&opts.addr)?;
    // A manager token makes a controller too: look for an address either role can use.
    let host = super::with_advertise(
        &opts.host,
        &file,
        &[Target::Addr(opts.addr.clone())],
        true,
        &advertise::UdpProbe,
    )?;
    let opts = &JoinOpts {
        host,
        ..opts.clone()
    };
    let agent_dir = probe.agent()?.data_dir;
    let role = super::join_agent(&agent_dir, &opts.addr, &opts.token)?;
    let dir = opts
        .host
        .config
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let token_file = dir.join(super::JOIN_TOKEN_FILE);
    let c = plan(opts, file, role, &token_file)?;
    if c.controller.is_some() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            super::make_dir(&dir, 0o755)?;
        }
        rudder_pki::ca::write_atomic(&token_file, opts.token.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", token_file.display()))?;
    }
    super::write_config(&opts.host.config, &c)?;
    let what = if c.controller.is_some() {
        "a manager (controller and agent)"
    } else {
        "a worker"
    };
    match start {
        Start::None => {
            println!(
                "Joined as {what}; wrote {cfg}. Start {} with --config {cfg}.",
                if c.controller.is_some() {
                    "rudder-controller and rudder-agent"
                } else {
                    "rudder-agent"
                },
                cfg = opts.host.config.display()
            );
        }
        _ => {
            if c.controller.is_some() {
                super::systemctl(&["enable", "--now", super::CONTROLLER_UNIT])?;
                super::wait_controller(&c)?;
            }
            super::systemctl(&["enable", "--now", super::AGENT_UNIT])?;
            println!("This host joined the cluster as {what}.");
        }
    }
    Ok(())
}

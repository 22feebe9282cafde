//! `rudder config check [--config PATH]`: the effective host config (the file under the
//! `RUDDER_*` environment, defaults filled in, tokens redacted), or what is wrong with it.

use std::path::Path;

use crate::config::{self, HostConfig};

/// The text `rudder config check` prints for a config that is fine.
pub fn render(c: &HostConfig) -> Result<String, config::ConfigError> {
    let agent = c.agent()?;
    let mut out = String::new();
    out.push_str("# the file and RUDDER_* variables, merged (tokens redacted)\n");
    out.push_str(&c.redacted().to_toml()?);
    out.push_str("\n# effective settings, defaults filled in\n");
    if c.controller.is_some() {
        let ctl = c.controller()?;
        out.push_str(&format!(
            "# controller: data_dir={} listen={} advertise={} registry={} raft_id={} join={} \
             metrics={} dashboard={}\n",
            ctl.data_dir.display(),
            ctl.listen,
            ctl.advertise.as_deref().unwrap_or("(listen)"),
            ctl.registry_listen,
            ctl.raft_id,
            ctl.join.as_deref().unwrap_or("-"),
            config::Listen(ctl.metrics_listen),
            config::Listen(ctl.dashboard_listen),
        ));
    } else {
        out.push_str("# controller: none on this host (no [controller] section)\n");
    }
    out.push_str(&format!(
        "# agent: data_dir={} role={} controllers={} listen={} runtime={} cgroup_parent={} \
         wg_port={} metrics={}\n",
        agent.data_dir.display(),
        agent.role.as_str(),
        agent.controllers.join(","),
        agent.listen,
        agent.runtime,
        agent.cgroup_parent,
        agent.wg_port,
        config::Listen(agent.metrics_listen),
    ));
    out.push_str(&format!(
        "# join token: {}\n",
        match c.token()? {
            None => "none".to_string(),
            Some(config::TokenSource::Inline(_)) => config::REDACTED.to_string(),
            Some(config::TokenSource::File(p)) => format!("from {}", p.display()),
        }
    ));
    Ok(out)
}

/// Loads `path` under the environment and prints the result; an error is the caller's exit
/// status.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let c = config::resolve(HostConfig::default(), Some(path), std::env::vars())?;
    print!("{}", render(&c)?);
    Ok(())
}

//! `rudder`: sets up a host of a Rudder cluster. `init` on the first host, `join` on the
//! others, `leave` to take one out, `config check` to see what the daemons will read.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use rudder_host::{cmd, config};

#[derive(Parser)]
#[command(
    name = "rudder",
    version,
    about = "Set up a Rudder host: init, join, leave"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make this host the first of a new cluster (a controller and an agent), and print the
    /// commands that join the others.
    Init(cmd::HostOpts),
    /// Join this host to a cluster: a worker or a manager, as the token says.
    Join(cmd::join::JoinOpts),
    /// Take this host out of its cluster: drain, leave the raft group (managers), remove.
    Leave(cmd::leave::LeaveOpts),
    /// The host config file.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the effective config (file, then RUDDER_* variables, defaults filled in; tokens
    /// redacted), or its errors with their lines; exits non-zero on an error.
    Check {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

fn main() {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::Init(opts) => cmd::init::run(&opts),
        Cmd::Join(opts) => {
            // Read by clap already; children (systemctl) must not inherit it.
            std::env::remove_var(rudder_pki::ca::TOKEN_ENV);
            cmd::join::run(&opts)
        }
        Cmd::Leave(opts) => cmd::leave::run(&opts),
        Cmd::Config(ConfigCmd::Check { config }) => cmd::config_check::run(&config),
    };
    if let Err(e) = result {
        eprintln!("rudder: {e:#}");
        std::process::exit(1);
    }
}

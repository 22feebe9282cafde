//! `rudder-fleetsim`: parses flags, installs tracing, runs the scenarios
//! ([`rudder_fleetsim::run`]) and exits non-zero when a phase did not converge or a slot ran
//! twice once converged.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use rudder_agent::hollow::Behaviour;

#[derive(Parser)]
#[command(
    name = "rudder-fleetsim",
    version,
    about = "Hollow agents in one process against a real controller group"
)]
struct Args {
    /// Hollow hosts (S2 of issue 20: 5000).
    #[arg(long, env = "FLEETSIM_HOSTS", default_value_t = 100)]
    hosts: usize,
    /// Tasks in all (S2: 150000).
    #[arg(long, env = "FLEETSIM_TASKS", default_value_t = 3000)]
    tasks: u64,
    /// Replicas per service.
    #[arg(long, env = "FLEETSIM_PER_SERVICE", default_value_t = 100)]
    per_service: u64,
    /// Controllers in the group.
    #[arg(long, env = "FLEETSIM_CONTROLLERS", default_value_t = 3)]
    controllers: u64,
    /// How long a hollow start takes, in milliseconds.
    #[arg(long, env = "FLEETSIM_START_MS", default_value_t = 50)]
    start_ms: u64,
    /// Share of starts that fail (0..=1).
    #[arg(long, env = "FLEETSIM_FAIL_RATE", default_value_t = 0.0)]
    fail_rate: f64,
    /// Seed of the failure draws.
    #[arg(long, env = "FLEETSIM_SEED", default_value_t = 1)]
    seed: u64,
    /// Run the churn scenarios (hosts lost and back, rolling update, drain).
    #[arg(long, env = "FLEETSIM_CHURN")]
    churn: bool,
    /// Share of hosts lost, and drained, in the churn scenarios.
    #[arg(long, env = "FLEETSIM_CHURN_SHARE", default_value_t = 0.05)]
    churn_share: f64,
    /// Rounds of hosts lost and returning in the churn scenarios, one a minute.
    #[arg(long, env = "FLEETSIM_CHURN_MINUTES", default_value_t = 1)]
    churn_minutes: u64,
    /// Tasks the churn's rolling update rolls (whole services); 0: all (issue 20: 10000).
    #[arg(long, env = "FLEETSIM_UPDATE_TASKS", default_value_t = 0)]
    update_tasks: u64,
    /// Hosts the churn drains; 0: the churn share of them (issue 20: 500).
    #[arg(long, env = "FLEETSIM_DRAIN_HOSTS", default_value_t = 0)]
    drain_hosts: usize,
    /// Add a controller at the end and time its snapshot install.
    #[arg(long, env = "FLEETSIM_JOIN_MEMBER")]
    join_member: bool,
    /// Kill the leader at the end and time the failover.
    #[arg(long, env = "FLEETSIM_FAILOVER")]
    failover: bool,
    /// `rudder-controller` (default: next to this binary, else on PATH).
    #[arg(long, env = "FLEETSIM_CONTROLLER_BIN")]
    controller_bin: Option<PathBuf>,
    /// Where the run's temporary directory goes.
    #[arg(long, env = "FLEETSIM_DIR", default_value = "/var/tmp")]
    dir: PathBuf,
    /// Milliseconds between reads of the task list while waiting.
    #[arg(long, env = "FLEETSIM_POLL_MS", default_value_t = 200)]
    poll_ms: u64,
    /// Seconds any one wait may take.
    #[arg(long, env = "FLEETSIM_TIMEOUT", default_value_t = 300)]
    timeout: u64,
    /// Seconds the invariant is watched after each convergence.
    #[arg(long, env = "FLEETSIM_HOLD", default_value_t = 3)]
    hold: u64,
    /// S1 applies the services one at a time, this many a second, each task's delay counted
    /// from its own service's apply (0: all at once).
    #[arg(long, env = "FLEETSIM_RATE", default_value_t = 0.0)]
    rate: f64,
    /// The controllers' raft election timeout in milliseconds (their default: 700).
    #[arg(long, env = "FLEETSIM_ELECTION_TIMEOUT_MS")]
    election_timeout_ms: Option<u64>,
    /// The controllers' log filter.
    #[arg(long, env = "FLEETSIM_CONTROLLER_LOG", default_value = "warn")]
    controller_log: String,
    /// Keep the run's directory (controller logs and data) after a successful run.
    #[arg(long, env = "FLEETSIM_KEEP")]
    keep: bool,
    /// The hollow hosts register as agents older than assignment changes, so the controller
    /// sends each the whole task set whenever it changes (the before of a before/after run).
    #[arg(long, env = "FLEETSIM_FULL_ASSIGNMENTS")]
    full_assignments: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let cfg = rudder_fleetsim::Config {
        hosts: a.hosts,
        tasks: a.tasks,
        per_service: a.per_service,
        controllers: a.controllers,
        behaviour: Behaviour {
            start_latency: Duration::from_millis(a.start_ms),
            fail_rate: a.fail_rate,
            run_for: None,
            seed: a.seed,
            full_assignments: a.full_assignments,
        },
        churn: a.churn,
        churn_share: a.churn_share,
        churn_minutes: a.churn_minutes,
        update_tasks: a.update_tasks,
        drain_hosts: a.drain_hosts,
        join_member: a.join_member,
        failover: a.failover,
        controller_bin: a
            .controller_bin
            .unwrap_or_else(rudder_fleetsim::controller_bin),
        dir: a.dir,
        poll: Duration::from_millis(a.poll_ms),
        timeout: Duration::from_secs(a.timeout),
        hold: Duration::from_secs(a.hold),
        controller_log: a.controller_log,
        keep: a.keep,
        rate: a.rate,
        election_timeout_ms: a.election_timeout_ms,
    };
    // On ^C the run's future is dropped, and with it the controller group (killed by pid)
    // and the run's directory.
    let report = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            tokio::select! {
                r = rudder_fleetsim::run(cfg) => r,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("fleetsim: interrupted"),
            }
        })?;
    if !report.violations.is_empty() {
        anyhow::bail!("{} invariant violations", report.violations.len());
    }
    Ok(())
}

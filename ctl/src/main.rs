//! `rctl`: parses flags and dispatches to one module per command (`rudder_ctl::cmd`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use rudder_ctl::cmd;
use rudder_ctl::context;
use rudder_ctl::output::OutputFormat;

#[derive(Parser)]
#[command(
    name = "rctl",
    version,
    about = "Rudder: run services as containers across hosts"
)]
struct Cli {
    /// Controller URL, or a comma-separated list tried in order (default: from the context
    /// file).
    #[arg(long, global = true, env = "RUDDER_CONTROLLER")]
    controller: Option<String>,
    /// Registry host:port (default: from the context file).
    #[arg(long, global = true, env = "RUDDER_REGISTRY")]
    registry: Option<String>,
    /// Context file (default: $RUDDER_CONTEXT, else ~/.rudder/context.json).
    #[arg(long, global = true)]
    context: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or update what the manifest files declare.
    Apply {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Return at once instead of waiting for the services to converge.
        #[arg(short, long)]
        detach: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print what would change (created, updated with the fields that change, unchanged)
        /// and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print what `rctl apply -f FILE` would change; exit 1 when something would, 0 when
    /// nothing would, 2 on an error (like `kubectl diff`).
    Diff {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// Print a shell completion script: `source <(rctl completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print rctl's man page (roff): `rctl man > rctl.1; man ./rctl.1`.
    Man,
    /// List tasks (all services, or one).
    Ps {
        service: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List objects: services (svc), nodes, tasks, networks (net), volumes, secrets, configs,
    /// stacks; singular names too.
    Get {
        #[arg(value_enum)]
        kind: cmd::get::Kind,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Print the output of a service's or a task's containers.
    Logs {
        target: String,
        /// Do not prefix lines with the task name.
        #[arg(long)]
        no_prefix: bool,
        /// Only the last N lines of each task.
        #[arg(long, default_value_t = 0)]
        tail: u32,
        /// Keep streaming new output until the containers exit.
        #[arg(short, long)]
        follow: bool,
        /// Show when each line was written (RFC 3339, UTC).
        #[arg(short, long)]
        timestamps: bool,
    },
    /// Run a one-off container somewhere in the cluster, stream its output and exit with its
    /// exit code (like `docker run`; `-d` prints its name and returns).
    Run(cmd::run::RunArgs),
    /// Remove services (their containers are stopped and removed).
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Go back to a service's previous spec.
    Rollback {
        service: String,
        #[arg(short, long)]
        detach: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Spread a replicated service's tasks evenly again over its eligible nodes (a rolling
    /// update under its update_config); slots pinned by a per-slot volume stay.
    Rebalance {
        service: String,
        #[arg(short, long)]
        detach: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Show a service: spec, rollout state, tasks with their messages.
    Describe {
        service: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Run a command in a running task's container and exit with its exit code:
    /// `rctl exec -it web.1.abc -- sh`.
    Exec {
        /// Stream stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Run the command on a terminal (stdout and stderr arrive merged).
        #[arg(short, long)]
        tty: bool,
        /// Run as this user (`user[:group]`, names or numbers, looked up in the container's
        /// /etc/passwd and /etc/group) instead of the task's.
        #[arg(short, long)]
        user: Option<String>,
        /// Set KEY=VALUE in the command's environment (repeatable); KEY alone takes this
        /// machine's value.
        #[arg(short, long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Run in this directory of the container (absolute) instead of the task's.
        #[arg(short, long)]
        workdir: Option<String>,
        /// A task as `rctl ps` shows it, its id or an id prefix (or a service with one
        /// running task).
        task: String,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Copy files or directories between a running task's container and this machine:
    /// `rctl cp TASK:PATH LOCAL`, `rctl cp LOCAL TASK:PATH` (`-`: a tar on stdout/stdin).
    Cp {
        src: String,
        dest: String,
        /// When the source is a symlink, copy what it points to.
        #[arg(short = 'L', long)]
        follow_link: bool,
    },
    /// Show a task as JSON: spec, status, node, network addresses, and its container as its
    /// host knows it (pids, paths).
    Inspect {
        task: String,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Json)]
        output: OutputFormat,
    },
    /// Make a task's container changes a new image in the cluster registry, over the task's
    /// image: `rctl commit web.1 web:patched`.
    Commit(cmd::commit::CommitArgs),
    /// Build an image from a Dockerfile on a host of the cluster and store it in the
    /// cluster registry: `rctl build -t app:1 .`.
    Build(cmd::build::BuildArgs),
    /// Set the replica count of services: `rctl scale web=3 api=2`.
    Scale {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Live usage of running tasks, like `docker stats` (CPU 100% = one cpu): `rctl stats web`.
    Stats(cmd::stats::StatsArgs),
    /// The processes of a task's container: `rctl top web.1`.
    Top(cmd::top::TopArgs),
    /// What happens in the cluster, live: services, rollouts, tasks (with reasons), nodes,
    /// leader changes. Each line has its raft index; `--since INDEX` resumes after it.
    Events {
        /// Replay from here first: a raft index (42), a time ago (10m) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Stop here (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// KEY=VALUE: service=, node=, type= (service, rollout, node, task, leader),
        /// event= (created, failed, down, drain, …), task=. Repeatable: one key's values are
        /// alternatives, different keys must all match.
        #[arg(short, long = "filter")]
        filter: Vec<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// The web dashboard: `rctl dashboard token`, `rctl dashboard open`.
    Dashboard {
        #[command(subcommand)]
        cmd: cmd::dashboard::DashboardCmd,
    },
    /// Cluster hosts: list, inspect, set availability and labels.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// The controller group: `rctl cluster info`.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Overlay networks: list, inspect, remove, rotate WireGuard keys.
    Network {
        #[command(subcommand)]
        cmd: NetworkCmd,
    },
    /// Compose files as stacks: deploy, config, ls, services, ps, rollback, rm.
    Stack {
        #[command(subcommand)]
        cmd: StackCmd,
    },
    /// Named volumes: create, list, inspect, remove.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Secrets: values services mount at /run/secrets/NAME (never shown back).
    Secret {
        #[command(subcommand)]
        cmd: SecretCmd,
    },
    /// Configs: values services mount as files (shown with `inspect --data`).
    Config {
        #[command(subcommand)]
        cmd: SecretCmd,
    },
    /// Images in the cluster registry.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Store credentials for a registry outside the cluster (checked first):
    /// `rctl login 10.0.0.9:5001 -u me --password-stdin`.
    Login {
        /// host[:port], as image names start.
        host: String,
        #[arg(short, long)]
        username: Option<String>,
        /// Read the password from stdin (else it is asked for on the terminal).
        #[arg(long)]
        password_stdin: bool,
        /// The registry speaks plain http (no TLS at all).
        #[arg(long)]
        insecure: bool,
    },
    /// Forget the credentials stored for a registry.
    Logout { host: String },
    /// A multi-host lab on this machine.
    Local {
        #[command(subcommand)]
        cmd: LocalCmd,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List nodes.
    Ls {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Show one node (id, id prefix or hostname) as JSON.
    Inspect {
        node: String,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Json)]
        output: OutputFormat,
    },
    /// Make the controller on NODE a voting member of the group.
    Promote { node: String },
    /// Make the controller on NODE a non-voting member (it still replicates and serves).
    Demote { node: String },
    /// Remove a node from the cluster for good: its certificates are revoked at once and its
    /// tasks move elsewhere. A ready node needs --force; a controller host needs rm-manager first.
    Rm {
        node: String,
        #[arg(short, long)]
        force: bool,
    },
    /// Change a node's availability or labels.
    Update {
        node: String,
        #[arg(long, value_parser = ["active", "pause", "drain"])]
        availability: Option<String>,
        /// KEY=VALUE (repeatable).
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        /// KEY (repeatable).
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// List networks.
    Ls {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Show one network (name or id prefix) as JSON, with every host's slice.
    Inspect {
        network: String,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Json)]
        output: OutputFormat,
    },
    /// Remove networks (refused while a service uses one).
    Rm {
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Every host makes a new WireGuard key pair; peers are updated everywhere.
    RotateKeys,
}

#[derive(Subcommand)]
enum SecretCmd {
    /// Create from FILE (`-`: stdin), at most 500 KiB.
    Create {
        name: String,
        file: PathBuf,
        /// KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// A new version from FILE (`-`: stdin); services using it unpinned roll to it.
    Update {
        name: String,
        file: PathBuf,
        /// KEY=VALUE (repeatable); replaces the labels.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// List names, latest versions, sizes and the services using each.
    Ls {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Metadata as JSON (versions, sizes, digests); never a secret's value.
    Inspect {
        name: String,
        /// Configs only: print the latest value.
        #[arg(long)]
        data: bool,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Json)]
        output: OutputFormat,
    },
    /// Remove (refused while a service uses it).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum StackCmd {
    /// Deploy (create or update) a stack from compose files: one new stack version (services
    /// the new version drops are removed; `stack rollback` returns to the previous version).
    Deploy {
        /// Compose file, then override files (repeatable, merged in order).
        #[arg(short = 'c', long = "compose-file", required = true)]
        files: Vec<PathBuf>,
        name: String,
        #[arg(short, long)]
        detach: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Print the Rudder manifests the compose files resolve to (nothing is sent).
    Config {
        #[arg(short = 'c', long = "compose-file", required = true)]
        files: Vec<PathBuf>,
        name: String,
    },
    /// List stacks with their versions.
    Ls {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List a stack's services.
    Services {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List a stack's tasks.
    Ps {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Roll the whole stack back to its previously deployed version.
    Rollback {
        name: String,
        #[arg(short, long)]
        detach: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Remove a stack's services, networks, secrets and configs (volumes stay).
    Rm {
        name: String,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Declare a volume (driver local: each host keeps its own copy of the data).
    Create {
        name: String,
        /// KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// List volumes, with the hosts holding a copy and the services mounting each.
    Ls {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Show one volume as JSON.
    Inspect {
        volume: String,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Json)]
        output: OutputFormat,
    },
    /// Remove volumes (refused while a service mounts one); hosts delete their copies.
    Rm {
        #[arg(required = true)]
        volumes: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Make an image from a root filesystem tarball.
    Import { tar: PathBuf, name: String },
    /// Load an OCI archive or a docker-save tarball.
    Load {
        file: PathBuf,
        /// Name for images the archive leaves untagged.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Give an image of the cluster registry another name: `rctl image tag busybox
    /// 10.0.0.9:5001/team/bb:v1` (stored as team/bb:v1; the host says where a push goes).
    Tag { source: String, target: String },
    /// Copy an image from the cluster registry to the registry its name starts with:
    /// `rctl image push 10.0.0.9:5001/team/bb:v1`.
    Push {
        reference: String,
        /// The registry speaks plain http (no TLS at all).
        #[arg(long)]
        insecure: bool,
    },
    /// Copy an image from the registry its name starts with into the cluster registry (as
    /// REPOSITORY:TAG): `rctl image pull 10.0.0.9:5001/team/bb:v1`.
    Pull {
        reference: String,
        /// The registry speaks plain http (no TLS at all).
        #[arg(long)]
        insecure: bool,
    },
    /// Show an image of the cluster registry as JSON: digest, config (env, command, labels,
    /// ...), author, layers.
    Inspect {
        reference: String,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Json)]
        output: OutputFormat,
    },
    /// Show how an image was made, newest step first: each history entry with its layer.
    History {
        reference: String,
        /// Do not shorten the CREATED BY column.
        #[arg(long)]
        no_trunc: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List images with their size, the bytes they share with other images and their own.
    Ls {
        /// Also manifests no tag points at.
        #[arg(short, long)]
        all: bool,
        /// One host's content store instead (node id, id prefix or hostname).
        #[arg(long)]
        node: Option<String>,
        /// Names only.
        #[arg(short, long)]
        quiet: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Remove names from the cluster registry (a manifest with its last name); refused while
    /// a service uses the image unless --force. `rctl image prune` frees the bytes.
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
        #[arg(short, long)]
        force: bool,
    },
    /// Delete unused blobs on every manager and unused images on every host.
    Prune {
        /// Keep blobs younger than this (an upload in progress): 10m unless given (e.g. 30s).
        #[arg(long, value_parser = parse_grace)]
        grace: Option<std::time::Duration>,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// The controllers, which one leads, and the raft term.
    Info {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Remove a controller from the group (by raft id, see `rctl cluster info`); its
    /// certificates are revoked.
    RmManager { raft_id: u64 },
    /// Issue a certificate for another admin identity NAME and write it, its key and a context
    /// file into --out. With --ca-dir (a manager's <data dir>/certs), sign offline: the way back
    /// in when every admin certificate expired.
    AdminCert {
        name: String,
        /// Lifetime (e.g. 12h, 30d); default 90 days, at most 365 days.
        #[arg(long)]
        ttl: Option<String>,
        /// Directory for NAME.pem, NAME-key.pem, ca.pem and NAME.context.json (made 0700).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Sign with the CA key in this directory instead of asking a controller.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
    },
    /// Revoke an admin identity: its certificates are refused from the next request on.
    RevokeAdmin { name: String },
    /// Print (or rotate) the token a new host joins with.
    JoinToken {
        #[arg(value_parser = ["worker", "manager"])]
        role: String,
        /// Replace the token: the old one stops admitting new hosts.
        #[arg(long)]
        rotate: bool,
        /// With --rotate: the new token admits only this long (e.g. 1h, 30m).
        #[arg(long)]
        ttl: Option<String>,
        /// Print only the token.
        #[arg(short, long)]
        quiet: bool,
    },
    /// A new data-encryption key on every controller (each encrypts its raft log, snapshots and
    /// CA key at rest with its own key); the old records are re-encrypted and the old key
    /// deleted.
    RotateDataKey {
        /// Return once the new keys are in use, before the old records are re-encrypted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Autolock: with `on`, every controller keeps its keyring wrapped with an unlock key
    /// (printed once: keep it safe); a restarted controller stays locked until `rctl cluster
    /// unlock`. `off` unwraps them again.
    Autolock {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Print (or rotate) the autolock unlock key; a rotated one replaces the old at once.
    UnlockKey {
        #[arg(long)]
        rotate: bool,
        /// Print only the key.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Unlock a locked controller (name it with --controller): the unlock key is read from
    /// --key-file, else from stdin.
    Unlock {
        #[arg(long)]
        key_file: Option<std::path::PathBuf>,
    },
    /// A consistent, encrypted copy of the whole store (services, networks, volumes, secrets,
    /// the CA) written to FILE; restore with `rudder-controller --restore FILE`. Prints a
    /// fresh key once unless --key-file names one.
    Backup {
        file: std::path::PathBuf,
        /// File holding the backup key (64 hex characters, mode 0600).
        #[arg(long)]
        key_file: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum LocalCmd {
    /// Build the lab: N hosts in network namespaces, agents on all, controllers (one raft
    /// group) on the first M.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Hosts that also run a controller: 1, or 3 / 5 for a replicated control plane.
        #[arg(long, default_value_t = 1)]
        managers: u32,
        #[arg(long, default_value = "rudder")]
        name: String,
        #[arg(long, default_value = "auto")]
        runtime: String,
        /// Do not make this lab the default context (~/.rudder/context.json).
        #[arg(long)]
        no_default_context: bool,
    },
    /// Remove every trace of the lab.
    Down {
        #[arg(long, default_value = "rudder")]
        name: String,
    },
}

/// `--grace 30s`, `--grace 0` (everything unused, however recent).
fn parse_grace(s: &str) -> Result<std::time::Duration, String> {
    rudder_model::duration::parse(s).map(std::time::Duration::from_millis)
}

fn main() {
    // Like other command-line tools, end quietly when the reader of our output goes away
    // (`rctl describe web | head`). SIGPIPE stays ignored (Rust's default): with its default
    // action, a TLS peer closing a connection mid-write would kill rctl without a word. So a
    // print into a closed pipe panics, and this hook turns exactly that panic into exit 0.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
    if let Err(e) = real_main() {
        // `rctl logs … | head` closing the pipe is not an error.
        let broken_pipe = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
        if broken_pipe {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RCTL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A closed stderr (`rctl … 2>&1 | head`) must not panic the task that logged: the
        // subscriber would report its write error with `eprintln!`, which panics then, and a
        // panicked connection task leaves rctl waiting forever.
        .log_internal_errors(false)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ctx = || {
        context::resolve(
            cli.controller.as_deref(),
            cli.registry.as_deref(),
            cli.context.as_deref(),
        )
    };
    match &cli.cmd {
        Cmd::Apply {
            files,
            dry_run: true,
            ..
        } => rt.block_on(cmd::apply::preview(&ctx()?, files)).map(|_| ()),
        Cmd::Diff { files } => match rt.block_on(cmd::apply::preview(&ctx()?, files)) {
            Ok(changes) => std::process::exit(i32::from(changes)),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        },
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into a buffer first: clap_complete panics on a write error, and `| head` must
            // end quietly (a broken pipe is handled as an io::Error in `main`).
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "rctl", &mut out);
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
            Ok(())
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
            Ok(())
        }
        Cmd::Apply {
            files,
            detach,
            timeout,
            dry_run: false,
        } => rt.block_on(cmd::apply::run(
            &ctx()?,
            files,
            *detach,
            std::time::Duration::from_secs(*timeout),
        )),
        Cmd::Ps { service, output } => {
            rt.block_on(cmd::ps::run(&ctx()?, service.as_deref(), *output))
        }
        Cmd::Get { kind, output } => rt.block_on(cmd::get::run(&ctx()?, *kind, *output)),
        Cmd::Logs {
            target,
            no_prefix,
            tail,
            follow,
            timestamps,
        } => rt.block_on(cmd::logs::run(
            &ctx()?,
            target,
            !no_prefix,
            *tail,
            *follow,
            *timestamps,
        )),
        Cmd::Rm { services } => rt.block_on(cmd::rm::run(&ctx()?, services)),
        Cmd::Run(args) => {
            let code = rt.block_on(cmd::run::run(&ctx()?, args))?;
            std::process::exit(code)
        }
        Cmd::Rollback {
            service,
            detach,
            timeout,
        } => rt.block_on(cmd::rollback::run(
            &ctx()?,
            service,
            *detach,
            std::time::Duration::from_secs(*timeout),
        )),
        Cmd::Rebalance {
            service,
            detach,
            timeout,
        } => rt.block_on(cmd::rebalance::run(
            &ctx()?,
            service,
            *detach,
            std::time::Duration::from_secs(*timeout),
        )),
        Cmd::Describe { service, output } => {
            rt.block_on(cmd::describe::run(&ctx()?, service, *output))
        }
        Cmd::Exec {
            interactive,
            tty,
            user,
            env,
            workdir,
            task,
            command,
        } => {
            let code = rt.block_on(cmd::exec::run(
                &ctx()?,
                task,
                command,
                cmd::exec::ExecOptions {
                    interactive: *interactive,
                    tty: *tty,
                    user: user.as_deref(),
                    env,
                    workdir: workdir.as_deref(),
                },
            ))?;
            std::process::exit(code)
        }
        Cmd::Cp {
            src,
            dest,
            follow_link,
        } => rt.block_on(cmd::cp::run(&ctx()?, src, dest, *follow_link)),
        Cmd::Inspect { task, output } => rt.block_on(cmd::inspect::run(&ctx()?, task, *output)),
        Cmd::Commit(args) => rt.block_on(cmd::commit::run(&ctx()?, args)),
        Cmd::Build(args) => rt.block_on(cmd::build::run(&ctx()?, args)),
        Cmd::Scale { services } => rt.block_on(cmd::scale::run(&ctx()?, services)),
        Cmd::Stats(args) => rt.block_on(cmd::stats::run(&ctx()?, args)),
        Cmd::Top(args) => rt.block_on(cmd::top::run(&ctx()?, args)),
        Cmd::Dashboard { cmd } => rt.block_on(cmd::dashboard::run(&ctx()?, cmd)),
        Cmd::Events {
            since,
            until,
            filter,
            output,
        } => rt.block_on(cmd::events::run(
            &ctx()?,
            since.as_deref(),
            until.as_deref(),
            filter,
            *output,
        )),
        Cmd::Cluster {
            cmd: ClusterCmd::Info { output },
        } => rt.block_on(cmd::cluster::info(&ctx()?, *output)),
        Cmd::Cluster {
            cmd:
                ClusterCmd::JoinToken {
                    role,
                    rotate,
                    ttl,
                    quiet,
                },
        } => rt.block_on(cmd::cluster::join_token(
            &ctx()?,
            role,
            *rotate,
            ttl.as_deref(),
            *quiet,
        )),
        Cmd::Node {
            cmd: NodeCmd::Ls { output },
        } => rt.block_on(cmd::node::ls(&ctx()?, *output)),
        Cmd::Node {
            cmd: NodeCmd::Inspect { node, output },
        } => rt.block_on(cmd::node::inspect(&ctx()?, node, *output)),
        Cmd::Node {
            cmd: NodeCmd::Promote { node },
        } => rt.block_on(cmd::cluster::set_voter(&ctx()?, node, true)),
        Cmd::Node {
            cmd: NodeCmd::Demote { node },
        } => rt.block_on(cmd::cluster::set_voter(&ctx()?, node, false)),
        Cmd::Network { cmd } => {
            let ctx = ctx()?;
            match cmd {
                NetworkCmd::Ls { output } => rt.block_on(cmd::network::ls(&ctx, *output)),
                NetworkCmd::Inspect { network, output } => {
                    rt.block_on(cmd::network::inspect(&ctx, network, *output))
                }
                NetworkCmd::Rm { networks } => rt.block_on(cmd::network::rm(&ctx, networks)),
                NetworkCmd::RotateKeys => rt.block_on(cmd::network::rotate_keys(&ctx)),
            }
        }
        Cmd::Secret { cmd } | Cmd::Config { cmd } => {
            let ctx = ctx()?;
            let kind = if matches!(cli.cmd, Cmd::Secret { .. }) {
                "secret"
            } else {
                "config"
            };
            match cmd {
                SecretCmd::Create { name, file, labels } => {
                    rt.block_on(cmd::secret::put(&ctx, kind, "create", name, file, labels))
                }
                SecretCmd::Update { name, file, labels } => {
                    rt.block_on(cmd::secret::put(&ctx, kind, "update", name, file, labels))
                }
                SecretCmd::Ls { output } => rt.block_on(cmd::secret::ls(&ctx, kind, *output)),
                SecretCmd::Inspect { name, data, output } => {
                    rt.block_on(cmd::secret::inspect(&ctx, kind, name, *data, *output))
                }
                SecretCmd::Rm { names } => rt.block_on(cmd::secret::rm(&ctx, kind, names)),
            }
        }
        Cmd::Stack { cmd } => match cmd {
            StackCmd::Config { files, name } => cmd::stack::config(files, name),
            StackCmd::Deploy {
                files,
                name,
                detach,
                timeout,
            } => rt.block_on(cmd::stack::deploy(
                &ctx()?,
                files,
                name,
                *detach,
                std::time::Duration::from_secs(*timeout),
            )),
            StackCmd::Ls { output } => rt.block_on(cmd::stack::ls(&ctx()?, *output)),
            StackCmd::Services { name, output } => {
                rt.block_on(cmd::stack::services(&ctx()?, name, *output))
            }
            StackCmd::Ps { name, output } => rt.block_on(cmd::stack::ps(&ctx()?, name, *output)),
            StackCmd::Rollback {
                name,
                detach,
                timeout,
            } => rt.block_on(cmd::stack::rollback(
                &ctx()?,
                name,
                *detach,
                std::time::Duration::from_secs(*timeout),
            )),
            StackCmd::Rm { name, timeout } => rt.block_on(cmd::stack::rm(
                &ctx()?,
                name,
                std::time::Duration::from_secs(*timeout),
            )),
        },
        Cmd::Volume { cmd } => {
            let ctx = ctx()?;
            match cmd {
                VolumeCmd::Create { name, labels } => {
                    rt.block_on(cmd::volume::create(&ctx, name, labels))
                }
                VolumeCmd::Ls { output } => rt.block_on(cmd::volume::ls(&ctx, *output)),
                VolumeCmd::Inspect { volume, output } => {
                    rt.block_on(cmd::volume::inspect(&ctx, volume, *output))
                }
                VolumeCmd::Rm { volumes } => rt.block_on(cmd::volume::rm(&ctx, volumes)),
            }
        }
        Cmd::Cluster {
            cmd: ClusterCmd::RmManager { raft_id },
        } => {
            // Only a context from a file is updated (not one made of --controller).
            let file = cli
                .controller
                .is_none()
                .then(|| context::path(cli.context.as_deref()));
            rt.block_on(cmd::cluster::remove_manager(
                &ctx()?,
                *raft_id,
                file.as_deref(),
            ))
        }
        Cmd::Cluster {
            cmd:
                ClusterCmd::AdminCert {
                    name,
                    ttl,
                    out,
                    ca_dir,
                },
        } => {
            // Offline signing needs no controller (and maybe no working context).
            let c = if ca_dir.is_some() {
                ctx().ok()
            } else {
                Some(ctx()?)
            };
            rt.block_on(async {
                let issued = cmd::admin::admin_cert(
                    c.as_ref(),
                    name,
                    ttl.as_deref(),
                    out,
                    ca_dir.as_deref(),
                )
                .await?;
                println!(
                    "admin identity {name}: use it with rctl --context {}",
                    issued.context.display()
                );
                Ok(())
            })
        }
        Cmd::Cluster {
            cmd: ClusterCmd::RevokeAdmin { name },
        } => rt.block_on(cmd::admin::revoke_admin(&ctx()?, name)),
        Cmd::Cluster {
            cmd: ClusterCmd::RotateDataKey { no_wait },
        } => rt.block_on(cmd::cluster::rotate_data_key(&ctx()?, !*no_wait)),
        Cmd::Cluster {
            cmd: ClusterCmd::Autolock { state },
        } => rt.block_on(cmd::cluster::autolock(&ctx()?, state == "on")),
        Cmd::Cluster {
            cmd: ClusterCmd::UnlockKey { rotate, quiet },
        } => rt.block_on(cmd::cluster::unlock_key(&ctx()?, *rotate, *quiet)),
        Cmd::Cluster {
            cmd: ClusterCmd::Unlock { key_file },
        } => rt.block_on(cmd::cluster::unlock(&ctx()?, key_file.as_deref())),
        Cmd::Cluster {
            cmd: ClusterCmd::Backup { file, key_file },
        } => rt.block_on(cmd::cluster::backup(&ctx()?, file, key_file.as_deref())),
        Cmd::Node {
            cmd: NodeCmd::Rm { node, force },
        } => rt.block_on(cmd::node::rm(&ctx()?, node, *force)),
        Cmd::Node {
            cmd:
                NodeCmd::Update {
                    node,
                    availability,
                    label_add,
                    label_rm,
                },
        } => rt.block_on(cmd::node::update(
            &ctx()?,
            node,
            availability.as_deref(),
            label_add,
            label_rm,
        )),
        Cmd::Image {
            cmd: ImageCmd::Import { tar, name },
        } => rt.block_on(cmd::image::import(&ctx()?, tar, name)),
        Cmd::Image {
            cmd: ImageCmd::Load { file, tag },
        } => rt.block_on(cmd::image::load(&ctx()?, file, tag.as_deref())),
        Cmd::Image {
            cmd: ImageCmd::Tag { source, target },
        } => rt.block_on(cmd::image::tag(&ctx()?, source, target)),
        Cmd::Image {
            cmd: ImageCmd::Inspect { reference, output },
        } => rt.block_on(cmd::image_inspect::inspect(&ctx()?, reference, *output)),
        Cmd::Image {
            cmd:
                ImageCmd::History {
                    reference,
                    no_trunc,
                    output,
                },
        } => rt.block_on(cmd::image_inspect::history(
            &ctx()?,
            reference,
            *no_trunc,
            *output,
        )),
        Cmd::Image {
            cmd: ImageCmd::Push {
                reference,
                insecure,
            },
        } => rt.block_on(cmd::image::push(&ctx()?, reference, *insecure)),
        Cmd::Image {
            cmd: ImageCmd::Pull {
                reference,
                insecure,
            },
        } => rt.block_on(cmd::image::pull(&ctx()?, reference, *insecure)),
        Cmd::Image {
            cmd:
                ImageCmd::Ls {
                    all,
                    node,
                    quiet,
                    output,
                },
        } => rt.block_on(cmd::image_ls::ls(
            &ctx()?,
            *all,
            node.as_deref(),
            *quiet,
            *output,
        )),
        Cmd::Image {
            cmd: ImageCmd::Rm { references, force },
        } => rt.block_on(cmd::image_ls::rm(&ctx()?, references, *force)),
        Cmd::Image {
            cmd: ImageCmd::Prune { grace },
        } => rt.block_on(cmd::image_ls::prune(&ctx()?, *grace)),
        Cmd::Login {
            host,
            username,
            password_stdin,
            insecure,
        } => rt.block_on(cmd::login::login(
            host,
            username.as_deref(),
            *password_stdin,
            *insecure,
        )),
        Cmd::Logout { host } => cmd::login::logout(host),
        Cmd::Local {
            cmd:
                LocalCmd::Up {
                    nodes,
                    managers,
                    name,
                    runtime,
                    no_default_context,
                },
        } => {
            let lab = cmd::local::up(cmd::local::UpArgs {
                name: name.clone(),
                nodes: *nodes,
                managers: *managers,
                runtime: runtime.clone(),
                set_default_context: !no_default_context,
            })?;
            println!("lab {} is up: {} hosts", lab.name, lab.hosts.len());
            for h in &lab.hosts {
                println!("  {}  {}  netns {}", h.name, h.addr, h.netns);
            }
            println!("context: {}", lab.context_path.display());
            Ok(())
        }
        Cmd::Local {
            cmd: LocalCmd::Down { name },
        } => cmd::local::down(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_completions_and_man_page_are_sound() {
        Cli::command().debug_assert();
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "rctl", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("apply") && text.contains("dry-run"),
                "{shell}"
            );
        }
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut man)
            .unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(man.contains(".TH rctl 1"), "{man}");
    }
}

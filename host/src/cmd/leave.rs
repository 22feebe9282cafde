//! `rudder leave`: takes this host out of its cluster. The node is drained (its tasks move
//! elsewhere) and, on a manager, its controller leaves the raft group — refused when the
//! managers left could not form a quorum, unless `--force`; then the units stop and the node
//! is removed (its certificates revoked).
//!
//! Who asks: a worker asks with its own node certificate (`Dispatcher/Leave`, which serves
//! only the node the certificate names); a manager needs an admin certificate (the Control
//! API: its controller leaves the raft group too), its own when it made the cluster
//! (`rudder init`), else an rctl context (`--context`, which a worker may pass as well).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rudder_proto::v1::control_client::ControlClient;
use rudder_proto::v1::dispatcher_client::DispatcherClient;
use rudder_proto::v1::{
    Availability, ClusterInfoRequest, LeaveRequest, ListTasksRequest, RemoveManagerRequest,
    RemoveNodeRequest, TaskState, UpdateNodeRequest,
};
use tonic::transport::{Channel, ClientTlsConfig};

use super::Start;
use crate::config::{self, HostConfig};

/// `rudder leave`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaveOpts {
    /// This host's config file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Leave even when the managers left would have no quorum, and do not wait for the drain.
    #[arg(long)]
    pub force: bool,
    /// Who stops the daemons: systemd, or `none` (the caller stops them).
    #[arg(long, value_enum, default_value = "auto")]
    pub start: Start,
    /// An rctl context file with admin credentials [default: a worker uses its own node
    /// certificate; a manager its controller's admin files when it has them, else
    /// $RUDDER_CONTEXT, else ~/.rudder/context.json].
    #[arg(long)]
    pub context: Option<PathBuf>,
    /// How long to wait for the node's tasks to stop, in seconds.
    #[arg(long, default_value_t = 120)]
    pub drain_timeout: u64,
}

/// Admin credentials and where the controllers are.
struct Admin {
    controllers: Vec<String>,
    ca: String,
    cert: String,
    key: String,
}

impl Admin {
    fn tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .domain_name(rudder_pki::ca::Role::Manager.server_name())
    }
}

/// Who asks the controllers to let this host go.
enum Credentials {
    /// An admin certificate: the Control API.
    Admin(Admin),
    /// This worker's own node certificate: `Dispatcher/Leave`, for this node only.
    Node {
        controllers: Vec<String>,
        tls: ClientTlsConfig,
    },
}

impl Credentials {
    fn controllers(&self) -> &[String] {
        match self {
            Credentials::Admin(a) => &a.controllers,
            Credentials::Node { controllers, .. } => controllers,
        }
    }

    fn tls(&self) -> ClientTlsConfig {
        match self {
            Credentials::Admin(a) => a.tls(),
            Credentials::Node { tls, .. } => tls.clone(),
        }
    }
}

/// A connection that can drain, count and remove this node.
enum Leaver {
    Admin(ControlClient<Channel>),
    Node(DispatcherClient<Channel>),
}

impl Leaver {
    async fn connect(creds: &Credentials, skip_last: Option<&str>) -> anyhow::Result<Leaver> {
        let ch = connect(creds.controllers(), creds.tls(), skip_last).await?;
        Ok(match creds {
            Credentials::Admin(_) => Leaver::Admin(ControlClient::new(ch)),
            Credentials::Node { .. } => Leaver::Node(DispatcherClient::new(ch)),
        })
    }

    /// Sets the node to drain (its tasks move elsewhere); returns how many tasks still hold
    /// it when the answer says (`Dispatcher/Leave` does, so the first count needs no second
    /// call).
    async fn drain(&mut self, node_id: &str) -> anyhow::Result<Option<usize>> {
        Ok(match self {
            Leaver::Admin(c) => {
                c.update_node(UpdateNodeRequest {
                    node: node_id.to_string(),
                    availability: Availability::Drain.into(),
                    ..Default::default()
                })
                .await
                .map_err(status)?;
                None
            }
            Leaver::Node(c) => Some(node_leave(c, node_id, false).await?),
        })
    }

    /// How many of the node's tasks still hold it (assigned, preparing, starting, running).
    async fn live_tasks(&mut self, node_id: &str) -> anyhow::Result<usize> {
        match self {
            Leaver::Admin(c) => {
                let tasks = c
                    .list_tasks(ListTasksRequest::default())
                    .await
                    .map_err(status)?
                    .into_inner()
                    .tasks;
                Ok(tasks
                    .iter()
                    .filter(|t| t.node_id == node_id)
                    .filter(|t| {
                        matches!(
                            TaskState::try_from(t.state),
                            Ok(TaskState::Assigned
                                | TaskState::Preparing
                                | TaskState::Starting
                                | TaskState::Running)
                        )
                    })
                    .count())
            }
            Leaver::Node(c) => node_leave(c, node_id, false).await,
        }
    }

    /// Removes the node: its certificates are revoked.
    async fn remove(&mut self, node_id: &str) -> anyhow::Result<()> {
        match self {
            Leaver::Admin(c) => {
                c.remove_node(RemoveNodeRequest {
                    node: node_id.to_string(),
                    force: true,
                })
                .await
                .map_err(status)?;
            }
            Leaver::Node(c) => {
                node_leave(c, node_id, true).await?;
            }
        }
        Ok(())
    }
}

/// `Dispatcher/Leave` for this node: drains it (and with `remove`, removes it); returns how
/// many of its tasks still hold it.
async fn node_leave(
    c: &mut DispatcherClient<Channel>,
    node_id: &str,
    remove: bool,
) -> anyhow::Result<usize> {
    let r = c
        .leave(LeaveRequest {
            node_id: node_id.to_string(),
            remove,
        })
        .await
        .map_err(status)?
        .into_inner();
    Ok(r.live_tasks as usize)
}

/// The fields of an rctl context file `leave` uses.
#[derive(serde::Deserialize)]
struct ContextFile {
    #[serde(default)]
    controller: String,
    #[serde(default)]
    controllers: Vec<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

fn read(p: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading the {what} {}", p.display()))
}

fn from_context(path: &Path) -> anyhow::Result<Admin> {
    let text = read(path, "context")?;
    let ctx: ContextFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an rctl context", path.display()))?;
    let (Some(ca), Some(cert), Some(key)) = (&ctx.ca, &ctx.cert, &ctx.key) else {
        bail!(
            "{} names no admin certificate (ca, cert, key)",
            path.display()
        );
    };
    let mut controllers = ctx.controllers.clone();
    if controllers.is_empty() && !ctx.controller.is_empty() {
        controllers.push(ctx.controller.clone());
    }
    Ok(Admin {
        controllers,
        ca: read(ca, "cluster ca")?,
        cert: read(cert, "admin certificate")?,
        key: read(key, "admin key")?,
    })
}

/// The credentials `leave` uses: `--context` when given; a worker's own node certificate;
/// a manager's admin certificate.
fn credentials(opts: &LeaveOpts, c: &HostConfig) -> anyhow::Result<Credentials> {
    if opts.context.is_none() && c.controller.is_none() {
        let agent = c.agent()?;
        let dir = agent.data_dir.join("certs");
        let certs = rudder_pki::tls::NodeCerts::load(&dir).map_err(|e| {
            anyhow::anyhow!(
                "reading this node's certificate in {}: {e} (or pass --context with an admin \
                 certificate)",
                dir.display()
            )
        })?;
        return Ok(Credentials::Node {
            controllers: agent.controllers,
            tls: rudder_pki::tls::client_tls(&certs, rudder_pki::ca::Role::Manager),
        });
    }
    admin(opts, c).map(Credentials::Admin)
}

fn admin(opts: &LeaveOpts, c: &HostConfig) -> anyhow::Result<Admin> {
    if let Some(p) = &opts.context {
        return from_context(p);
    }
    if c.controller.is_some() {
        let dir = c.controller()?.data_dir.join("admin");
        if dir.join("admin.pem").exists() {
            return Ok(Admin {
                controllers: c.agent()?.controllers,
                ca: read(&dir.join("ca.pem"), "cluster ca")?,
                cert: read(&dir.join("admin.pem"), "admin certificate")?,
                key: read(&dir.join("admin-key.pem"), "admin key")?,
            });
        }
    }
    let path = match std::env::var_os("RUDDER_CONTEXT") {
        Some(p) => PathBuf::from(p),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".rudder/context.json")
        }
    };
    if path.exists() {
        return from_context(&path);
    }
    bail!(
        "leaving needs an admin certificate to drain and remove this node: pass --context \
         <an rctl context file> (this host has none of its own)"
    )
}

async fn connect(
    controllers: &[String],
    tls: ClientTlsConfig,
    skip_last: Option<&str>,
) -> anyhow::Result<Channel> {
    // This host's own controller last: it is about to leave.
    let mut urls = controllers.to_vec();
    if let Some(me) = skip_last {
        urls.sort_by_key(|u| u.contains(me));
    }
    let mut failures = Vec::new();
    for url in &urls {
        let https = match url.split_once("://") {
            Some((_, rest)) => format!("https://{rest}"),
            None => format!("https://{url}"),
        };
        let ep = tonic::transport::Endpoint::from_shared(https)?
            .connect_timeout(Duration::from_secs(2))
            .tls_config(tls.clone())?;
        match tokio::time::timeout(Duration::from_secs(4), ep.connect()).await {
            Ok(Ok(ch)) => return Ok(ch),
            Ok(Err(e)) => failures.push(format!("{url}: {}", rudder_proto::error_chain(&e))),
            Err(_) => failures.push(format!("{url}: timed out")),
        }
    }
    bail!("cannot reach a controller: {}", failures.join("; "))
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// Whether a manager may leave: `voters` of the group (with `me` among them) and how many of
/// the others answer. Leaving must leave a group that still has a quorum.
pub fn quorum_check(voters: usize, reachable_others: usize) -> Result<(), String> {
    if voters <= 1 {
        return Err(
            "this is the cluster's only manager: leaving would end the cluster (promote another \
             one first)"
                .into(),
        );
    }
    let remaining = voters - 1;
    let quorum = remaining / 2 + 1;
    if reachable_others < quorum {
        return Err(format!(
            "the {remaining} managers left need {quorum} to agree but only {reachable_others} \
             answer: leaving now would break the quorum (--force to leave anyway)"
        ));
    }
    Ok(())
}

fn answers(addr: &str) -> bool {
    addr.to_socket_addrs()
        .map(|mut it| {
            it.any(|a: SocketAddr| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
        })
        .unwrap_or(false)
}

/// Runs `rudder leave`.
pub fn run(opts: &LeaveOpts) -> anyhow::Result<()> {
    let c = config::load(&opts.config)?;
    let agent = c.agent()?;
    let node_id = std::fs::read_to_string(agent.data_dir.join("node_id"))
        .map(|s| s.trim().to_string())
        .map_err(|_| {
            anyhow::anyhow!(
                "this host has not joined a cluster (no node id in {})",
                agent.data_dir.display()
            )
        })?;
    let start = opts.start.resolve()?;
    let creds = credentials(opts, &c)?;
    let me = c.controller.as_ref().map(|_| c.controller()).transpose()?;
    let skip_last = me.as_ref().and_then(|m| m.advertise.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut leaver = Leaver::connect(&creds, skip_last.as_deref()).await?;
        // Before anything changes: a manager that may not leave is not drained either.
        if let (Some(ctl), Leaver::Admin(client)) = (&me, &mut leaver) {
            let info = client
                .cluster_info(ClusterInfoRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let voters: Vec<_> = info.managers.iter().filter(|m| m.voter).collect();
            let voter = voters.iter().any(|m| m.raft_id == ctl.raft_id);
            if voter {
                let others = voters
                    .iter()
                    .filter(|m| m.raft_id != ctl.raft_id)
                    .filter(|m| answers(&m.addr))
                    .count();
                if let Err(why) = quorum_check(voters.len(), others) {
                    if !opts.force || voters.len() <= 1 {
                        bail!("{why}");
                    }
                    eprintln!("warning: {why}");
                }
            }
        }
        let mut counted = leaver.drain(&node_id).await?;
        println!("draining this node ({node_id})");
        let deadline = Instant::now() + Duration::from_secs(opts.drain_timeout);
        loop {
            let live = match counted.take() {
                Some(n) => n,
                None => leaver.live_tasks(&node_id).await?,
            };
            if live == 0 || opts.force {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{live} tasks still run on this node after {}s; try again, or --force",
                    opts.drain_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let (Some(ctl), Leaver::Admin(client)) = (&me, &mut leaver) {
            client
                .remove_manager(RemoveManagerRequest {
                    raft_id: ctl.raft_id,
                })
                .await
                .map_err(status)?;
            println!("controller {} left the raft group", ctl.raft_id);
        }
        anyhow::Ok(())
    })?;
    if start == Start::Systemd {
        if me.is_some() {
            super::systemctl(&["disable", "--now", super::CONTROLLER_UNIT])?;
        }
        super::systemctl(&["disable", "--now", super::AGENT_UNIT])?;
    }
    rt.block_on(async {
        let mut leaver = Leaver::connect(&creds, skip_last.as_deref()).await?;
        leaver.remove(&node_id).await
    })?;
    println!("this node ({node_id}) left the cluster");
    if start == Start::Systemd {
        // The certificates are revoked: a later `rudder join` starts afresh.
        let _ = std::fs::remove_dir_all(agent.data_dir.join("certs"));
        let _ = std::fs::remove_file(agent.data_dir.join("node_id"));
        if let Some(ctl) = &me {
            let _ = std::fs::remove_dir_all(&ctl.data_dir);
        }
    } else {
        println!(
            "stop the daemons; before this host joins again, remove {} and {}",
            agent.data_dir.join("certs").display(),
            agent.data_dir.join("node_id").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::quorum_check;

    #[test]
    fn a_manager_may_leave_only_a_group_that_keeps_its_quorum() {
        // (voters including me, others that answer, allowed)
        let cases = [
            (1, 0, false),
            (2, 1, true),
            (2, 0, false),
            (3, 2, true),
            (3, 1, false),
            (5, 3, true),
            (5, 2, false),
        ];
        for (voters, others, ok) in cases {
            assert_eq!(
                quorum_check(voters, others).is_ok(),
                ok,
                "{voters} voters, {others} answer"
            );
        }
    }
}

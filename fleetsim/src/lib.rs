//! `rudder-fleetsim`: many hollow agents ([`rudder_agent::hollow`]) in one process against a
//! real controller group (real `rudder-controller` processes, real raft, gRPC with mutual TLS),
//! driving scenarios and printing figures (issue 20):
//!
//! - **S1** — `hosts` hosts join, `tasks` tasks are applied (in services of `per_service`
//!   replicas): scheduling delay from the apply to `running` as the controller records it
//!   (p50/p90/p99), time until every slot runs, controller memory, disk, `ps` and
//!   `get services` latency.
//! - **S3 churn** (`churn`) — a share of the hosts is cut off and comes back, a rolling update
//!   of every service, a drain of a share of the hosts: time to converge after each, and the
//!   check that once converged no replica slot runs twice, neither as the controller lists the
//!   tasks nor as the hosts really run them.
//! - **Snapshot install** (`join_member`) — one more controller joins the group: its log is
//!   empty, so the leader sends it a snapshot; time until it has applied the leader's index
//!   of the moment it was started (transfer and install), and the snapshot's size.
//! - **Failover** (`failover`) — the leader process is killed (SIGKILL, by its pid): time until
//!   a write is served again.
//!
//! S2 of the issue is S1 with `--hosts 5000 --tasks 150000 --join-member --failover`.
//!
//! Everything this run starts lives in a temporary directory under `dir` and is removed at
//! the end; the controllers are ours and are killed by pid.

pub mod figures;
pub mod fleet;
pub mod group;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use futures::StreamExt as _;
use rudder_agent::hollow::Behaviour;
use rudder_proto::v1::control_client::ControlClient;
use rudder_proto::v1::{
    ApplyRequest, Availability, ClusterInfoRequest, ListNodesRequest, ListServicesRequest,
    ListTasksRequest, NodeState, TaskSummary, UpdateNodeRequest,
};
use tonic::transport::Channel;

use figures::{fleet_slots, secs, slots, summary, Stages, Want};
use fleet::Fleet;
use group::Group;

/// The largest task list the admin client accepts (a `ListTasks` of 150,000 tasks).
const MAX_LIST: usize = 1 << 30;

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Hollow hosts.
    pub hosts: usize,
    /// Tasks in all (rounded up to whole services).
    pub tasks: u64,
    /// Replicas per service.
    pub per_service: u64,
    /// Controllers in the group.
    pub controllers: u64,
    /// How the hosts' "containers" behave.
    pub behaviour: Behaviour,
    /// Run the churn scenarios (S3).
    pub churn: bool,
    /// Share of hosts lost and returning, and share drained, in the churn scenarios (0..1).
    pub churn_share: f64,
    /// Rounds of hosts lost and returning, one a minute (each round cuts off other hosts);
    /// at least 1.
    pub churn_minutes: u64,
    /// Tasks the rolling update rolls (whole services, the first ones); 0: every task.
    pub update_tasks: u64,
    /// Hosts drained; 0: the churn share of them.
    pub drain_hosts: usize,
    /// Add a controller to the group and time its snapshot install.
    pub join_member: bool,
    /// Kill the leader at the end and time the failover.
    pub failover: bool,
    /// `rudder-controller`.
    pub controller_bin: PathBuf,
    /// Where the run's temporary directory goes.
    pub dir: PathBuf,
    /// How often the task list is read while waiting.
    pub poll: Duration,
    /// How long any one wait may take.
    pub timeout: Duration,
    /// How long the invariant is watched after each convergence.
    pub hold: Duration,
    /// The controllers' `RUST_LOG`.
    pub controller_log: String,
    /// Keep the run's directory (the controllers' logs and data) after a run that succeeded,
    /// to read what `controller_log` asked them to say.
    pub keep: bool,
    /// S1 applies the services one at a time at this many per second, and each task's delay
    /// counts from its own service's apply (as classic Swarm's figures count each container
    /// from its own request); 0: all services in one apply, every delay from that apply.
    pub rate: f64,
    /// The controllers' raft election timeout (`--election-timeout-ms`; `None`: theirs,
    /// 700 ms).
    pub election_timeout_ms: Option<u64>,
}

impl Config {
    /// Checks the sizes make sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.hosts == 0 || self.tasks == 0 || self.per_service == 0 {
            bail!("fleetsim: hosts, tasks and replicas per service must be at least 1");
        }
        if self.controllers == 0 {
            bail!("fleetsim: at least one controller");
        }
        if !(0.0..=1.0).contains(&self.behaviour.fail_rate)
            || !(0.0..1.0).contains(&self.churn_share)
        {
            bail!("fleetsim: the failure rate is in 0..=1 and the churn share in 0..1");
        }
        if self.drain_hosts >= self.hosts && self.churn {
            bail!("fleetsim: --drain-hosts must leave at least one host undrained");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            bail!("fleetsim: the apply rate is a number of services per second, 0 or more");
        }
        Ok(())
    }

    /// The services to apply: name → replicas.
    pub fn services(&self) -> BTreeMap<String, u64> {
        let n = self.tasks.div_ceil(self.per_service);
        (0..n)
            .map(|i| {
                let left = self.tasks - i * self.per_service;
                (format!("sim-{i:05}"), left.min(self.per_service))
            })
            .collect()
    }
}

/// What a run measured; `lines` is the printed report.
#[derive(Debug, Default)]
pub struct Report {
    /// Everything measured, one figure a line.
    pub lines: Vec<String>,
    /// Whether every phase converged.
    pub converged: bool,
    /// Slots seen running twice after a convergence (controller's list or hosts), with the
    /// phase: must be empty.
    pub violations: Vec<String>,
}

impl Report {
    fn say(&mut self, line: String) {
        println!("{line}");
        self.lines.push(line);
    }
}

type Client = ControlClient<Channel>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Raises this process's open-file limit to its hard limit: every hollow host holds a
/// connection (and each controller inherits the limit for its side of them).
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

async fn admin(group: &Group) -> anyhow::Result<Client> {
    admin_to(group, group.urls()).await
}

/// An admin client of the controllers at `urls` only.
async fn admin_to(group: &Group, urls: Vec<String>) -> anyhow::Result<Client> {
    let ctx = rudder_ctl::context::Context {
        name: "fleetsim".into(),
        controller: String::new(),
        controllers: urls,
        registry: String::new(),
        ca: Some(group.admin_dir.join("ca.pem")),
        cert: Some(group.admin_dir.join("admin.pem")),
        key: Some(group.admin_dir.join("admin-key.pem")),
    };
    Ok(rudder_ctl::connect(&ctx)
        .await?
        .max_decoding_message_size(MAX_LIST))
}

/// A client of one follower (the first member that is not `leader`), for the run's own reads:
/// polling 30,000-task lists five times a second is the harness's load, not the fleet's, and
/// would otherwise fall on the leader it measures. The leader itself when it is alone.
async fn observer(group: &Group, leader: u64) -> anyhow::Result<Client> {
    let url = group
        .members
        .iter()
        .find(|m| m.raft_id != leader && m.pid().is_some())
        .map(|m| m.url());
    match url {
        Some(url) => admin_to(group, vec![url]).await,
        None => admin(group).await,
    }
}

/// Applies the services of `want` one at a time, `rate` per second; returns when each apply
/// began (ms since the epoch), by service, and how long each `Apply` call took (ms).
async fn paced_apply(
    c: &mut Client,
    want: &Want,
    image: &str,
    rate: f64,
) -> anyhow::Result<(BTreeMap<String, u64>, Vec<u64>)> {
    let began = Instant::now();
    let mut at = BTreeMap::new();
    let mut calls = Vec::new();
    for (i, (name, replicas)) in want.replicas.iter().enumerate() {
        tokio::time::sleep_until((began + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        at.insert(name.clone(), now_ms());
        let call = Instant::now();
        c.apply(ApplyRequest {
            service_specs_json: vec![service_json(name, *replicas, image)?],
            ..Default::default()
        })
        .await
        .context("fleetsim: apply")?;
        calls.push(call.elapsed().as_millis() as u64);
    }
    Ok((at, calls))
}

async fn tasks(c: &mut Client) -> anyhow::Result<Vec<TaskSummary>> {
    Ok(c.list_tasks(ListTasksRequest::default())
        .await?
        .into_inner()
        .tasks)
}

fn service_json(name: &str, replicas: u64, image: &str) -> anyhow::Result<String> {
    let spec: rudder_model::ServiceSpec = serde_json::from_value(serde_json::json!({
        "name": name,
        "image": image,
        "replicas": replicas,
        "network_mode": "host",
        "stop_grace_period": 1,
        "update_config": {
            "parallelism": (replicas / 5).max(1),
            "monitor": "1s",
        },
    }))?;
    Ok(rudder_model::wire::encode("service", &spec)?)
}

async fn apply(c: &mut Client, want: &Want, image: &str) -> anyhow::Result<()> {
    let specs = want
        .replicas
        .iter()
        .map(|(n, r)| service_json(n, *r, image))
        .collect::<anyhow::Result<Vec<_>>>()?;
    c.apply(ApplyRequest {
        service_specs_json: specs,
        ..Default::default()
    })
    .await
    .context("fleetsim: apply")?;
    Ok(())
}

/// Waits until the controller lists `n` ready nodes.
async fn wait_nodes(c: &mut Client, n: usize, cfg: &Config) -> anyhow::Result<()> {
    let deadline = Instant::now() + cfg.timeout;
    loop {
        let nodes = c.list_nodes(ListNodesRequest {}).await?.into_inner().nodes;
        let ready = nodes
            .iter()
            .filter(|n| n.state == NodeState::Ready as i32)
            .count();
        if ready >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "fleetsim: {ready} of {n} hosts ready after {:?}",
                cfg.timeout
            );
        }
        tokio::time::sleep(cfg.poll).await;
    }
}

/// What a wait for convergence saw.
struct Converged {
    took: Duration,
    tasks: Vec<TaskSummary>,
}

/// Waits until the controller's list and the hosts agree that every wanted slot runs once,
/// away from `excluded` nodes. What hosts that are `cut_off` still run is not looked at (a
/// host cut off from the controllers cannot be told to stop).
async fn converge(
    c: &mut Client,
    fleet: &Fleet,
    want: &Want,
    excluded: &BTreeSet<String>,
    cut_off: &BTreeSet<String>,
    cfg: &Config,
) -> anyhow::Result<Converged> {
    let began = Instant::now();
    loop {
        let list = tasks(c).await?;
        let view = slots(&list, want, excluded);
        let running = fleet.running_ids(cut_off);
        let (on_hosts, doubled) = fleet_slots(running.iter().map(String::as_str), &list, want);
        if view.converged(want) && on_hosts == want.total() && doubled.is_empty() {
            return Ok(Converged {
                took: began.elapsed(),
                tasks: list,
            });
        }
        if began.elapsed() > cfg.timeout {
            bail!(
                "fleetsim: not converged after {:?}: {} of {} slots good, {} misplaced, {} \
                 doubled in the list; {} running on the hosts, {} slots doubled there; \
                 missing: {}",
                cfg.timeout,
                view.good,
                want.total(),
                view.misplaced,
                view.doubled.len(),
                on_hosts,
                doubled.len(),
                figures::missing(&list, want, excluded, 5).join(" | ")
            );
        }
        tokio::time::sleep(cfg.poll).await;
    }
}

/// Watches for `cfg.hold` that no slot runs twice (list or hosts); returns what was seen.
async fn hold(
    c: &mut Client,
    fleet: &Fleet,
    want: &Want,
    cfg: &Config,
    phase: &str,
) -> anyhow::Result<Vec<String>> {
    let end = Instant::now() + cfg.hold;
    let mut seen = BTreeSet::new();
    loop {
        let list = tasks(c).await?;
        let view = slots(&list, want, &BTreeSet::new());
        let running = fleet.running_ids(&BTreeSet::new());
        let (_, doubled) = fleet_slots(running.iter().map(String::as_str), &list, want);
        for (s, slot) in view.doubled {
            seen.insert(format!("{phase}: {s}.{slot} listed running twice"));
        }
        for (s, slot) in doubled {
            seen.insert(format!("{phase}: {s}.{slot} running on two hosts"));
        }
        if Instant::now() >= end {
            return Ok(seen.into_iter().collect());
        }
        tokio::time::sleep(cfg.poll).await;
    }
}

impl Fleet {
    /// Every host's task timelines, by task id.
    pub fn timelines(&self) -> BTreeMap<String, rudder_agent::hollow::Timeline> {
        self.hosts.iter().flat_map(|h| h.timelines()).collect()
    }

    /// The running task ids of every host but those of `except` (node ids).
    pub fn running_ids(&self, except: &BTreeSet<String>) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|h| !except.contains(&h.spec().node_id))
            .flat_map(|h| h.running_ids())
            .collect()
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Memory and disk of every controller, the leader marked.
async fn resources(c: &mut Client, group: &Group) -> anyhow::Result<String> {
    let leader = c
        .cluster_info(ClusterInfoRequest {})
        .await?
        .into_inner()
        .leader_id;
    let parts: Vec<String> = group
        .members
        .iter()
        .filter(|m| m.pid().is_some())
        .map(|m| {
            let d = m.disk();
            format!(
                "c{}{}: RSS {}, CPU {}, disk {} (raft log {}, snapshots {})",
                m.raft_id,
                if m.raft_id == leader { " (leader)" } else { "" },
                m.rss_bytes().map_or("-".into(), mib),
                m.cpu_seconds().map_or("-".into(), |s| format!("{s:.1} s")),
                mib(d.total),
                mib(d.raft_log),
                mib(d.snapshots)
            )
        })
        .collect();
    Ok(parts.join("; "))
}

/// Runs the scenarios `cfg` asks for and returns what they measured.
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
    cfg.validate()?;
    let nofile = raise_nofile();
    let mut r = Report::default();
    std::fs::create_dir_all(&cfg.dir)?;
    let dir = tempfile::Builder::new()
        .prefix("fleetsim-")
        .tempdir_in(&cfg.dir)?;
    r.say(format!(
        "fleetsim: {} controllers (election timeout {}), {} hosts, {} tasks (start latency \
         {:?}, failure rate {}), open-file limit {nofile}, data in {}",
        cfg.controllers,
        cfg.election_timeout_ms
            .map_or("default".to_string(), |ms| format!("{ms} ms")),
        cfg.hosts,
        cfg.tasks,
        cfg.behaviour.start_latency,
        cfg.behaviour.fail_rate,
        dir.path().display()
    ));
    let (bin, path, n, log) = (
        cfg.controller_bin.clone(),
        dir.path().to_path_buf(),
        cfg.controllers,
        cfg.controller_log.clone(),
    );
    let args = cfg
        .election_timeout_ms
        .map(|ms| vec!["--election-timeout-ms".to_string(), ms.to_string()])
        .unwrap_or_default();
    let group =
        tokio::task::spawn_blocking(move || Group::start_with(&bin, &path, n, &log, args)).await?;
    let result = match group {
        Ok(group) => scenarios(&cfg, group, dir.path(), &mut r).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        // Kept for the controllers' logs (c<i>.log); the group is gone already.
        let kept = dir.keep();
        return Err(e.context(format!(
            "fleetsim: the run's directory (controller logs) is kept in {}",
            kept.display()
        )));
    }
    if cfg.keep {
        let kept = dir.keep();
        r.say(format!(
            "the run's directory (controller logs c<i>.log) is kept in {}",
            kept.display()
        ));
    }
    Ok(r)
}

/// Joins the hosts and runs the scenarios against `group`, adding to `r`.
async fn scenarios(
    cfg: &Config,
    mut group: Group,
    dir: &std::path::Path,
    r: &mut Report,
) -> anyhow::Result<()> {
    let cfg = cfg.clone();
    let mut c = admin(&group).await?;

    // Hosts.
    let began = Instant::now();
    let fleet = Fleet::join(
        cfg.hosts,
        &group.urls(),
        &group.worker_token,
        &cfg.behaviour,
        &dir.join("hosts"),
    )
    .await?;
    let joined = began.elapsed();
    wait_nodes(&mut c, cfg.hosts, &cfg).await?;
    r.say(format!(
        "hosts: {} joined in {}, all ready after {}",
        cfg.hosts,
        secs(joined),
        secs(began.elapsed())
    ));

    // S1: apply, time to running.
    let mut want = Want::of(cfg.services(), Some("sim:1"));
    let leader = c
        .cluster_info(ClusterInfoRequest {})
        .await?
        .into_inner()
        .leader_id;
    let mut obs = observer(&group, leader).await?;
    let t0 = now_ms();
    let began = Instant::now();
    let (applied_at, calls) = if cfg.rate > 0.0 {
        paced_apply(&mut c, &want, "sim:1", cfg.rate).await?
    } else {
        apply(&mut c, &want, "sim:1").await?;
        let at = want.replicas.keys().map(|n| (n.clone(), t0)).collect();
        (at, vec![began.elapsed().as_millis() as u64])
    };
    let applied = began.elapsed();
    let done = converge(
        &mut obs,
        &fleet,
        &want,
        &BTreeSet::new(),
        &BTreeSet::new(),
        &cfg,
    )
    .await?;
    let delays: Vec<u64> = done
        .tasks
        .iter()
        .filter(|t| t.state == rudder_proto::v1::TaskState::Running as i32)
        .filter_map(|t| Some(t.timestamp_ms.saturating_sub(*applied_at.get(&t.service)?)))
        .collect();
    r.say(format!(
        "S1 apply of {} services {} took {}; converged after {}",
        want.replicas.len(),
        if cfg.rate > 0.0 {
            format!("one at a time, {} a second,", cfg.rate)
        } else {
            "at once".to_string()
        },
        secs(applied),
        secs(done.took + applied)
    ));
    r.say(format!(
        "S1 scheduling delay apply->running (controller's record{}): {}",
        if cfg.rate > 0.0 {
            ", each task from its service's apply"
        } else {
            ""
        },
        summary(&delays)
    ));
    r.say(format!("S1 Apply calls: {}", summary(&calls)));
    let stages = Stages::of(&done.tasks, &applied_at, &fleet.timelines());
    for line in stages.lines() {
        r.say(format!("S1 stage {line}"));
    }
    r.say(format!(
        "S1 controllers: {}",
        resources(&mut c, &group).await?
    ));
    // Timed on the leader, as a user's `rctl ps` would be.
    let began = Instant::now();
    let n = tasks(&mut c).await?.len();
    let ps = began.elapsed();
    let began = Instant::now();
    c.list_services(ListServicesRequest::default()).await?;
    r.say(format!(
        "S1 `rctl ps` (ListTasks, {n} tasks) {}; `rctl get services` (ListServices) {}",
        secs(ps),
        secs(began.elapsed())
    ));
    r.violations
        .extend(hold(&mut obs, &fleet, &want, &cfg, "S1").await?);

    if cfg.churn {
        churn(&mut c, &mut obs, &fleet, &mut want, &cfg, r).await?;
    }
    if cfg.join_member {
        join_member(&mut c, &mut group, &cfg, r).await?;
    }
    if cfg.failover {
        failover(&mut c, &mut group, &cfg, r).await?;
    }
    r.converged = true;
    if r.violations.is_empty() {
        r.say("invariant: no slot ran twice once converged".into());
    } else {
        for v in r.violations.clone() {
            r.say(format!("invariant broken: {v}"));
        }
    }
    drop(fleet);
    drop(group);
    Ok(())
}

/// The hosts of round `round` of losses: `k` of `n`, spread evenly, each round shifted by one
/// so that successive rounds cut off other hosts.
pub fn lost_in_round(n: usize, k: usize, round: usize) -> Vec<usize> {
    let k = k.clamp(1, n);
    let step = n / k;
    (0..k).map(|i| (i * step + round) % n).collect()
}

/// S3: hosts lost and returning (one round a minute), a rolling update, a drain.
async fn churn(
    c: &mut Client,
    obs: &mut Client,
    fleet: &Fleet,
    want: &mut Want,
    cfg: &Config,
    r: &mut Report,
) -> anyhow::Result<()> {
    let n = cfg.hosts;
    let k = ((n as f64 * cfg.churn_share).ceil() as usize).clamp(1, n - 1);
    let none = BTreeSet::new();

    // Lost and returning, a round a minute.
    let began = Instant::now();
    let (mut lost_s, mut back_s) = (Vec::new(), Vec::new());
    for round in 0..cfg.churn_minutes.max(1) {
        tokio::time::sleep_until((began + Duration::from_secs(60 * round)).into()).await;
        let chosen = lost_in_round(n, k, round as usize);
        let ids: BTreeSet<String> = chosen
            .iter()
            .map(|&i| fleet.hosts[i].spec().node_id.clone())
            .collect();
        for &i in &chosen {
            fleet.hosts[i].disconnect();
        }
        let lost = converge(obs, fleet, want, &ids, &ids, cfg).await?;
        for &i in &chosen {
            fleet.hosts[i].connect();
        }
        let back = converge(obs, fleet, want, &none, &none, cfg).await?;
        r.say(format!(
            "S3 minute {}: {k} hosts lost, their tasks replaced after {} (heartbeat timeout \
             included); back, stale tasks stopped, converged after {}",
            round + 1,
            secs(lost.took),
            secs(back.took)
        ));
        lost_s.push(lost.took.as_millis() as u64);
        back_s.push(back.took.as_millis() as u64);
        r.violations.extend(
            hold(
                obs,
                fleet,
                want,
                cfg,
                &format!("minute {}, hosts back", round + 1),
            )
            .await?,
        );
    }
    if lost_s.len() > 1 {
        r.say(format!(
            "S3 {} rounds of {k} hosts lost: replaced {}; back and converged {}",
            lost_s.len(),
            summary(&lost_s),
            summary(&back_s)
        ));
    }

    // Rolling update of the first services, `update_tasks` tasks (all when 0).
    let mut rolled = BTreeMap::new();
    for (name, replicas) in &want.replicas {
        if cfg.update_tasks > 0 && rolled.values().sum::<u64>() >= cfg.update_tasks {
            break;
        }
        rolled.insert(name.clone(), *replicas);
    }
    let update = Want::of(rolled, Some("sim:2"));
    want.images.extend(update.images.clone());
    let began = Instant::now();
    apply(c, &update, "sim:2").await?;
    let done = converge(obs, fleet, want, &none, &none, cfg).await?;
    r.say(format!(
        "S3 rolling update of {} tasks ({} services) converged after {}",
        update.total(),
        update.replicas.len(),
        secs(began.elapsed().max(done.took))
    ));
    r.violations
        .extend(hold(obs, fleet, want, cfg, "after the rolling update").await?);

    // Drain, the requests sent a few at once.
    let d = if cfg.drain_hosts == 0 {
        k
    } else {
        cfg.drain_hosts
    };
    let ids: BTreeSet<String> = lost_in_round(n, d, 0)
        .into_iter()
        .map(|i| fleet.hosts[i].spec().node_id.clone())
        .collect();
    let began = Instant::now();
    let sent: Vec<anyhow::Result<()>> = futures::stream::iter(ids.iter().cloned())
        .map(|id| {
            let c = c.clone();
            async move {
                let req = UpdateNodeRequest {
                    node: id,
                    availability: Availability::Drain as i32,
                    ..Default::default()
                };
                retrying(cfg.timeout, || {
                    let (mut c, req) = (c.clone(), req.clone());
                    async move { c.update_node(req).await }
                })
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(DRAIN_PARALLELISM)
        .collect()
        .await;
    sent.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let requested = began.elapsed();
    let drained = converge(obs, fleet, want, &ids, &none, cfg).await?;
    r.say(format!(
        "S3 drain of {} hosts converged after {} (requests sent in {})",
        ids.len(),
        secs(began.elapsed().max(drained.took)),
        secs(requested)
    ));
    r.violations
        .extend(hold(obs, fleet, want, cfg, "after the drain").await?);
    Ok(())
}

/// Drain requests in flight at once.
const DRAIN_PARALLELISM: usize = 16;

/// Whether a refused request may succeed when sent again: the group is between leaders (no
/// leader yet, or a follower that cannot forward), or a proposal timed out under load. Any
/// other refusal (a bad request) is final.
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Aborted
    )
}

/// Sends `call` until it succeeds, a refusal is not [`transient`], or `within` has passed. An
/// operator's `rctl node update` is retried by hand the same way; the churn scenario must not
/// abort because an election fell in the middle of its drain.
async fn retrying<T, F, Fut>(within: Duration, mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The log filter of a controller added by [`join_member`]: its snapshot's arrival and
/// install are logged (info) with their sizes.
const JOINER_LOG: &str = "warn,rudder_controller::raft_node=info,rudder_controller::peer=info";

/// Starts one more controller, joining through the leader, and times until it has applied
/// the leader's index of the moment it started: its log is empty, so that is a snapshot sent
/// (in chunks), received, saved and decoded, then the entries after it.
async fn join_member(
    c: &mut Client,
    group: &mut Group,
    cfg: &Config,
    r: &mut Report,
) -> anyhow::Result<()> {
    let info = c.cluster_info(ClusterInfoRequest {}).await?.into_inner();
    let Some(via) = group.member_mut(info.leader_id).map(|m| m.addr) else {
        bail!("fleetsim: no leader to join through");
    };
    let began = Instant::now();
    let id = group.add(via, JOINER_LOG)?;
    let url = group
        .member_mut(id)
        .map(|m| m.url())
        .context("fleetsim: the new member")?;
    let mut applied = 0;
    loop {
        let attempt = async {
            let mut c = admin_to(group, vec![url.clone()]).await?;
            anyhow::Ok(c.cluster_info(ClusterInfoRequest {}).await?.into_inner())
        };
        if let Ok(Ok(ci)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            applied = ci.applied;
            if applied >= info.applied {
                break;
            }
        }
        if began.elapsed() > cfg.timeout {
            bail!(
                "fleetsim: c{id} applied {applied} of {} after {:?}",
                info.applied,
                cfg.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = began.elapsed();
    let Some(m) = group.member_mut(id) else {
        bail!("fleetsim: c{id} is gone");
    };
    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    let said = |what: &str| {
        log.lines()
            .find(|l| l.contains(what))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("bytes=")))
            .map_or("-".to_string(), |w| mib(w[6..].parse().unwrap_or(0)))
    };
    r.say(format!(
        "snapshot install: c{id} joined through c{} and applied index {} after {} \
         (snapshot received {}, installed {}); c{id} RSS {}, disk {}",
        info.leader_id,
        info.applied,
        secs(took),
        said("snapshot received"),
        said("installed snapshot"),
        m.rss_bytes().map_or("-".into(), mib),
        mib(m.disk().total),
    ));
    r.say(format!("S2 controllers: {}", resources(c, group).await?));
    Ok(())
}

/// Kills the leader and times until a write is served again.
async fn failover(
    c: &mut Client,
    group: &mut Group,
    cfg: &Config,
    r: &mut Report,
) -> anyhow::Result<()> {
    let leader = c
        .cluster_info(ClusterInfoRequest {})
        .await?
        .into_inner()
        .leader_id;
    let Some(m) = group.member_mut(leader) else {
        bail!("fleetsim: no leader to kill (leader id {leader})");
    };
    let pid = m.pid();
    let began = Instant::now();
    m.kill();
    let killed = began.elapsed();
    let probe = Want::of([("sim-probe".to_string(), 0)].into(), None);
    let mut tries = 0u32;
    loop {
        tries += 1;
        // A fresh connection each time: the one we had may be to the dead leader.
        let attempt = async {
            let mut c = admin(group).await?;
            apply(&mut c, &probe, "sim:probe").await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => break,
            _ if began.elapsed() > cfg.timeout => {
                bail!(
                    "fleetsim: no write served {:?} after the leader died",
                    cfg.timeout
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    r.say(format!(
        "failover: leader c{leader} (pid {}) killed; a write was served again after {} ({} tries; kill took {})",
        pid.map_or("-".into(), |p| p.to_string()),
        secs(began.elapsed()),
        tries,
        secs(killed)
    ));
    *c = admin(group).await?;
    Ok(())
}

/// `rudder-controller` next to this executable (or one directory up, for test binaries in
/// `target/*/deps`), else on PATH.
pub fn controller_bin() -> PathBuf {
    const NAME: &str = "rudder-controller";
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(|d| d.join(NAME))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each round cuts off `k` distinct hosts spread over the fleet, and the next round
    /// other ones.
    #[test]
    fn rounds_of_losses_are_spread_and_shifted() {
        assert_eq!(lost_in_round(20, 4, 0), [0, 5, 10, 15]);
        assert_eq!(lost_in_round(20, 4, 1), [1, 6, 11, 16]);
        assert_eq!(lost_in_round(20, 4, 19), [19, 4, 9, 14]);
        let half = lost_in_round(1000, 500, 0);
        assert_eq!(half.iter().collect::<BTreeSet<_>>().len(), 500);
        assert!(half.iter().all(|i| i % 2 == 0));
        assert_eq!(lost_in_round(3, 0, 0), [0]);
    }
}

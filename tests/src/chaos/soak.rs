//! The chaos soak (issue 20): a real lab (3 controllers and agents on 4 hosts, each in its own
//! network namespace) that for a bounded time is hit by seeded faults ([`plan`]) — kill -9 and
//! restart of controllers and agents, link cuts, packet loss, SIGSTOP/SIGCONT — while clients
//! write and read registers, scale and update services through the real gRPC API. Then the
//! faults stop and the invariants are checked and printed as a report:
//!
//! 1. No acknowledged write lost: every register's history (invoke/ok/unknown, monotonic
//!    timestamps) is linearizable ([`crate::linearizability`]); final reads from every
//!    controller close each history.
//! 2. Once converged, no replicated slot has two running tasks, in the controller's view or on
//!    the hosts (live container inits), over a quiet window.
//! 3. Everything converges within a bound after the faults stop: every node ready, every
//!    service running as declared, the last acknowledged scale in force.
//! 4. No leaked namespaces, mounts, cgroups or processes once the lab is torn down.
//! 5. RSS and open fds of every long-lived process (controllers, agents, shims) stay flat.
//!
//! The bench `chaos` runs it for `RUDDER_CHAOS_SECONDS` (default 300); the lab test
//! `chaos_short` for 60 s in CI. `RUDDER_CHAOS_SEED` replays a run (the seed is printed first).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rudder_proto::v1::control_client::ControlClient;
use rudder_proto::v1::{ApplyRequest, ListServicesRequest, ListTasksRequest, ScaleRequest};
use tonic::transport::Channel;

use super::check::{self, Sample, TaskView};
use super::plan::{self, Fault, Planned, Proc, Rng, Shape};
use crate::lab::{self, Lab, Role};
use crate::linearizability::{self, Action, Op};
use crate::{bin, lab_runtime, lab_with_busybox_managers};

/// Label of a register service holding the register's value.
const REGISTER_LABEL: &str = "chaos.v";
/// How long one client call may take before its outcome is unknown.
const CALL_TIMEOUT: Duration = Duration::from_secs(8);
/// Replicas of `web` the soak starts with.
const WEB_REPLICAS: u64 = 3;

/// What a soak run does; [`Config::from_env`] reads the knobs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Seed of the fault plan and the clients' choices.
    pub seed: u64,
    /// How long faults are injected.
    pub duration: Duration,
    /// Hosts in the lab (the first 3 run controllers).
    pub hosts: u32,
    /// Register clients.
    pub clients: usize,
    /// Registers (one service each).
    pub registers: usize,
    /// Bound on convergence once the faults stop.
    pub converge_bound: Duration,
    /// Lab name prefix (the pid is appended).
    pub prefix: String,
}

impl Config {
    /// `RUDDER_CHAOS_SECONDS` (else `default_secs`), `RUDDER_CHAOS_SEED` (else from the clock),
    /// `RUDDER_CHAOS_CLIENTS` (4), `RUDDER_CHAOS_CONVERGE_SECONDS` (120).
    pub fn from_env(prefix: &str, default_secs: u64) -> Config {
        let knob = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let seed = knob("RUDDER_CHAOS_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        Config {
            seed,
            duration: Duration::from_secs(knob("RUDDER_CHAOS_SECONDS").unwrap_or(default_secs)),
            hosts: 4,
            clients: knob("RUDDER_CHAOS_CLIENTS").unwrap_or(4) as usize,
            registers: 3,
            converge_bound: Duration::from_secs(
                knob("RUDDER_CHAOS_CONVERGE_SECONDS").unwrap_or(120),
            ),
            prefix: prefix.to_string(),
        }
    }
}

/// The soak's result: the printed report and the invariants that failed.
#[derive(Debug)]
pub struct Outcome {
    /// The report (tables of faults, operations, checker verdict, convergence, resources).
    pub report: String,
    /// One line per broken invariant; empty when all held.
    pub failures: Vec<String>,
}

/// How a client operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome3 {
    Ok,
    /// Definitely not applied (never reached a controller).
    Fail,
    /// Sent; the answer never came or was an error: may or may not have applied.
    Unknown,
}

/// A fault as executed: what, when it began and was healed, and the first error.
type Executed = (Planned, Duration, Duration, Option<String>);

#[derive(Default)]
struct Shared {
    /// Register history.
    history: Mutex<Vec<Op>>,
    /// (operation kind, outcome) → count.
    outcomes: Mutex<BTreeMap<(&'static str, Outcome3), u64>>,
    /// Scales of `web`: (replicas, outcome) in issue order (one writer).
    scales: Mutex<Vec<(u64, Outcome3)>>,
    /// Faults as executed: (kind, started, healed, error).
    faults: Mutex<Vec<Executed>>,
    /// Resource samples per process.
    samples: Mutex<BTreeMap<String, Vec<Sample>>>,
    /// Controller-view double-running observations during the chaos (transient, reported).
    transient_doubles: AtomicU64,
    stop_clients: AtomicBool,
    stop_sampler: AtomicBool,
}

impl Shared {
    fn count(&self, kind: &'static str, o: Outcome3) {
        *lock(&self.outcomes).entry((kind, o)).or_default() += 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the soak and returns its report; errors only when the lab cannot be built or driven.
pub fn run(cfg: &Config) -> anyhow::Result<Outcome> {
    println!(
        "chaos: seed {} (replay with RUDDER_CHAOS_SEED={}), {:?} of faults, {} hosts",
        cfg.seed, cfg.seed, cfg.duration, cfg.hosts
    );
    let (guard, tmp) = lab_with_busybox_managers(&cfg.prefix, cfg.hosts, 3)?;
    let ctx = rudder_ctl::context::load(&guard.lab.context_path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut failures = Vec::new();
    let mut report = String::new();

    // Set-up: registers with a known value, and the workload services, all running.
    let registers: Vec<String> = (0..cfg.registers).map(|i| format!("reg{i}")).collect();
    let mut initial = BTreeMap::new();
    rt.block_on(async {
        let mut c = rudder_ctl::connect(&ctx).await?;
        for r in &registers {
            apply(&mut c, &register_manifest(r, 0)).await?;
            initial.insert(r.clone(), 0u64);
        }
        apply(&mut c, &web_manifest(WEB_REPLICAS)).await?;
        apply(&mut c, &upd_manifest(0)).await?;
        anyhow::Ok(())
    })?;
    crate::wait_for(Duration::from_secs(120), "workload running", || {
        rt.block_on(converged(&ctx, cfg.hosts as usize))
            .map(|c| c.ok().then_some(()))
    })?;

    let shared = Arc::new(Shared::default());
    let start = Instant::now();
    let lab = Arc::new(Mutex::new(guard.lab.clone()));

    // Clients and the sampler on the runtime; the faults on a thread of their own (restarts
    // block).
    let mut client_tasks = Vec::new();
    for i in 0..cfg.clients {
        let (ctx, shared, regs) = (ctx.clone(), shared.clone(), registers.clone());
        let seed = cfg.seed ^ (0xC0FFEE + i as u64);
        client_tasks.push(rt.spawn(register_client(i, ctx, shared, regs, seed, start)));
    }
    client_tasks.push(rt.spawn(workload_client(
        ctx.clone(),
        shared.clone(),
        cfg.seed ^ 0xBEEF,
    )));
    let sampler = {
        let (shared, lab, ctx) = (shared.clone(), lab.clone(), ctx.clone());
        let dir = guard.lab.dir.clone();
        rt.spawn(sampler(shared, lab, ctx, dir, start))
    };

    let shape = Shape {
        hosts: cfg.hosts as usize,
        managers: 3,
        duration: cfg.duration,
        gap_secs: (2, 6),
        hold_secs: (2, 8),
    };
    let planned = plan::plan(cfg.seed, shape);
    let faulter = {
        let (shared, lab) = (shared.clone(), lab.clone());
        std::thread::spawn(move || run_faults(&planned, &lab, &shared, start))
    };
    let fault_result = faulter
        .join()
        .map_err(|_| anyhow::anyhow!("fault thread panicked"))?;
    let faults_over = start.elapsed();
    if let Err(e) = &fault_result {
        failures.push(format!("fault injection failed: {e:#}"));
    }

    // Faults over: the clients stop, then convergence is timed.
    shared.stop_clients.store(true, Ordering::Relaxed);
    for t in client_tasks {
        let _ = rt.block_on(t);
    }
    let converge_start = Instant::now();
    let mut last = String::new();
    let converged_in = loop {
        match rt.block_on(converged(&ctx, cfg.hosts as usize)) {
            Ok(c) if c.ok() => break Some(converge_start.elapsed()),
            Ok(c) => last = c.why,
            Err(e) => last = format!("{e:#}"),
        }
        if converge_start.elapsed() > cfg.converge_bound {
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    match converged_in {
        Some(_) => {}
        None => failures.push(format!(
            "(3) not converged {:?} after the faults stopped: {last}",
            cfg.converge_bound
        )),
    }

    // Final reads from every controller close each register's history.
    let urls = guard.lab.controller_urls();
    rt.block_on(final_reads(&ctx, &urls, &registers, &shared, start));
    // (2) over a quiet window: no slot with two running tasks, in the controller's view or on
    // the hosts.
    let quiet = Duration::from_secs(10);
    let quiet_end = Instant::now() + quiet;
    let mut doubles = BTreeSet::new();
    while Instant::now() < quiet_end {
        let hosts = lock(&lab).clone();
        match rt.block_on(slot_check(&ctx, &hosts)) {
            Ok(found) => doubles.extend(found),
            Err(e) => {
                doubles.insert(format!("cannot check: {e:#}"));
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    for d in &doubles {
        failures.push(format!("(2) after convergence: {d}"));
    }
    // The last acknowledged scale is in force (unless a later one's outcome is unknown).
    if let Err(e) = rt.block_on(check_last_scale(&ctx, &shared)) {
        failures.push(format!("(1) scale: {e:#}"));
    }
    // Processes on the hosts that nothing accounts for (before teardown).
    let strays = rt.block_on(stray_processes(&ctx, &lock(&lab).clone()));
    match &strays {
        Ok(s) if !s.is_empty() => failures.push(format!("(4) stray processes: {}", s.join("; "))),
        Ok(_) => {}
        Err(e) => failures.push(format!("(4) cannot list processes: {e:#}")),
    }
    shared.stop_sampler.store(true, Ordering::Relaxed);
    let _ = rt.block_on(sampler);

    // (1) Linearizability.
    let history = lock(&shared.history).clone();
    let checked_at = Instant::now();
    let lin =
        linearizability::check_with_initial(&history, &initial, linearizability::Limits::default());
    let check_took = checked_at.elapsed();
    for k in lin.violations() {
        failures.push(format!(
            "(1) register {} is not linearizable: {}",
            k.key,
            describe_violation(k)
        ));
    }
    for k in lin.unknown() {
        failures.push(format!(
            "(1) register {}: the checker gave up after {} steps",
            k.key, k.steps
        ));
    }

    // (5) Resource trends.
    let trends = check::trends(&lock(&shared.samples), check::LeakRule::default());
    for t in trends.iter().filter(|t| t.leak.is_some()) {
        failures.push(format!(
            "(5) {} grows: {}",
            t.who,
            t.leak.as_deref().unwrap_or("")
        ));
    }

    // (4) Teardown leaves nothing.
    let name = guard.lab.name.clone();
    let root = guard.root.clone();
    let dir = guard.lab.dir.clone();
    // The guard's own `down` on drop finds nothing left after this one.
    let down = lab::down(&root, &name);
    let leaks = leftovers(&name, &dir);
    if let Err(e) = &down {
        failures.push(format!("(4) teardown: {e}"));
    }
    for l in &leaks {
        failures.push(format!("(4) leaked after teardown: {l}"));
    }
    drop(guard);
    drop(tmp);

    // The report.
    let faults = lock(&shared.faults).clone();
    let _ = writeln!(
        report,
        "chaos soak: seed {}, {:?} of faults ({} injected), {} register clients on {} registers",
        cfg.seed,
        faults_over,
        faults.len(),
        cfg.clients,
        cfg.registers
    );
    let _ = writeln!(report, "\nfaults injected:");
    let mut by_kind: BTreeMap<&str, (u64, Duration, u64)> = BTreeMap::new();
    for (p, started, healed, err) in &faults {
        let e = by_kind.entry(p.fault.kind()).or_default();
        e.0 += 1;
        e.1 += healed.saturating_sub(*started);
        e.2 += u64::from(err.is_some());
    }
    let _ = writeln!(
        report,
        "  {:<20} {:>6} {:>12} {:>7}",
        "kind", "count", "total held", "errors"
    );
    for (k, (n, held, errs)) in &by_kind {
        let _ = writeln!(
            report,
            "  {k:<20} {n:>6} {:>11.1}s {errs:>7}",
            held.as_secs_f64()
        );
    }
    for (p, _, _, err) in faults.iter().filter(|f| f.3.is_some()) {
        let _ = writeln!(
            report,
            "  error: {:?} at {:?}: {}",
            p.fault,
            p.at,
            err.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(report, "\noperations by outcome:");
    let _ = writeln!(
        report,
        "  {:<10} {:>6} {:>6} {:>8}",
        "op", "ok", "fail", "unknown"
    );
    let outcomes = lock(&shared.outcomes).clone();
    let kinds: BTreeSet<&str> = outcomes.keys().map(|(k, _)| *k).collect();
    for k in kinds {
        let n = |o| outcomes.get(&(k, o)).copied().unwrap_or(0);
        let _ = writeln!(
            report,
            "  {k:<10} {:>6} {:>6} {:>8}",
            n(Outcome3::Ok),
            n(Outcome3::Fail),
            n(Outcome3::Unknown)
        );
    }
    let _ = writeln!(
        report,
        "\nlinearizability (Wing–Gong + memo), {} register operations, checked in {:?}:",
        history.len(),
        check_took
    );
    for k in &lin.keys {
        let v = match &k.verdict {
            linearizability::Verdict::Ok { .. } => "linearizable".to_string(),
            linearizability::Verdict::Violation { .. } => "VIOLATION".to_string(),
            linearizability::Verdict::Unknown => "unknown (step limit)".to_string(),
        };
        let _ = writeln!(
            report,
            "  {:<6} {:>5} ops {:>9} steps  {v}",
            k.key,
            k.ops.len(),
            k.steps
        );
    }
    let _ = writeln!(
        report,
        "\nconvergence after the faults stopped: {}",
        match converged_in {
            Some(d) => format!("{:.1}s (bound {:?})", d.as_secs_f64(), cfg.converge_bound),
            None => format!("NOT within {:?}", cfg.converge_bound),
        }
    );
    let _ = writeln!(
        report,
        "slots with two running tasks: {} after convergence ({quiet:?} quiet window), {} \
         transient observations during the faults (controller view)",
        doubles.len(),
        shared.transient_doubles.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        report,
        "leftovers after teardown: {}",
        if leaks.is_empty() {
            "none".to_string()
        } else {
            leaks.join(", ")
        }
    );
    let _ = writeln!(report, "\nresources (first → last, max):");
    let _ = writeln!(
        report,
        "  {:<34} {:>22} {:>16}",
        "process", "rss MiB", "fds"
    );
    for t in &trends {
        let mib = |k: u64| k as f64 / 1024.0;
        let _ = writeln!(
            report,
            "  {:<34} {:>6.1} → {:>6.1} ({:>6.1}) {:>4} → {:>4} ({:>4}){}",
            t.who,
            mib(t.first.rss_kib),
            mib(t.last.rss_kib),
            mib(t.max_rss_kib),
            t.first.fds,
            t.last.fds,
            t.max_fds,
            if t.leak.is_some() { "  LEAK" } else { "" }
        );
    }
    let _ = writeln!(
        report,
        "\nverdict: {}",
        if failures.is_empty() {
            "all invariants held".to_string()
        } else {
            format!(
                "{} invariant failure(s):\n  {}",
                failures.len(),
                failures.join("\n  ")
            )
        }
    );
    Ok(Outcome { report, failures })
}

fn describe_violation(k: &linearizability::KeyReport) -> String {
    let linearizability::Verdict::Violation { longest, stuck_at } = &k.verdict else {
        return String::new();
    };
    let show = |i: &usize| {
        let o = &k.ops[*i];
        format!(
            "client {} {:?} [{:.3}s, {}]",
            o.client,
            o.action,
            o.invoke as f64 / 1e9,
            o.ret
                .map(|r| format!("{:.3}s", r as f64 / 1e9))
                .unwrap_or_else(|| "?".into())
        )
    };
    let tail: Vec<String> = longest.iter().rev().take(3).rev().map(show).collect();
    let stuck: Vec<String> = stuck_at.iter().map(show).collect();
    format!(
        "linearized {} ops, ending … {}; none of these could go next: {}",
        longest.len(),
        tail.join(", "),
        stuck.join(", ")
    )
}

// ---- manifests --------------------------------------------------------------------------------

fn register_manifest(name: &str, value: u64) -> String {
    format!(
        "kind: Service\nname: {name}\nimage: busybox:latest\nreplicas: 0\n\
         labels: {{{REGISTER_LABEL}: \"{value}\"}}\ncommand: [\"/bin/sleep\", \"1000000\"]\n"
    )
}

fn web_manifest(replicas: u64) -> String {
    format!(
        "kind: Service\nname: web\nimage: busybox:latest\nreplicas: {replicas}\n\
         stop_grace_period: 1\ncommand: [\"/bin/sleep\", \"1000000\"]\n"
    )
}

fn upd_manifest(generation: u64) -> String {
    format!(
        "kind: Service\nname: upd\nimage: busybox:latest\nreplicas: 2\nstop_grace_period: 1\n\
         env: {{GEN: \"{generation}\"}}\ncommand: [\"/bin/sleep\", \"1000000\"]\n"
    )
}

async fn apply(c: &mut ControlClient<Channel>, yaml: &str) -> anyhow::Result<()> {
    let mut specs = Vec::new();
    for m in rudder_model::manifest::parse("chaos", yaml)? {
        match m {
            rudder_model::manifest::Manifest::Service(s) => {
                specs.push(rudder_model::wire::encode("service", &s)?)
            }
            _ => anyhow::bail!("chaos: only services are applied"),
        }
    }
    c.apply(ApplyRequest {
        service_specs_json: specs,
        ..Default::default()
    })
    .await
    .map_err(rudder_ctl::status_err)?;
    Ok(())
}

// ---- clients ----------------------------------------------------------------------------------

/// A client channel that prefers controller `home` and fails over to the others.
async fn connect_preferring(
    ctx: &rudder_ctl::context::Context,
    home: usize,
) -> anyhow::Result<ControlClient<Channel>> {
    let mut ctx = ctx.clone();
    let mut urls = ctx.controller_urls();
    if !urls.is_empty() {
        let n = home % urls.len();
        urls.rotate_left(n);
    }
    ctx.controllers = urls;
    tokio::time::timeout(Duration::from_secs(10), rudder_ctl::connect(&ctx))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))?
}

fn nanos(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// Reads a register: `Some(value)`, or `None` when the service is missing or unlabelled.
async fn read_register(c: &mut ControlClient<Channel>, name: &str) -> anyhow::Result<Option<u64>> {
    let services = c
        .list_services(ListServicesRequest { linearizable: true })
        .await
        .map_err(rudder_ctl::status_err)?
        .into_inner()
        .services;
    let Some(s) = services.iter().find(|s| s.name == name) else {
        return Ok(None);
    };
    let spec: rudder_model::ServiceSpec = rudder_model::wire::decode("service spec", &s.spec_json)?;
    Ok(spec.labels.get(REGISTER_LABEL).and_then(|v| v.parse().ok()))
}

async fn register_client(
    id: usize,
    ctx: rudder_ctl::context::Context,
    shared: Arc<Shared>,
    registers: Vec<String>,
    seed: u64,
    start: Instant,
) {
    let mut rng = Rng::new(seed);
    let mut client: Option<ControlClient<Channel>> = None;
    let mut seq = 0u64;
    while !shared.stop_clients.load(Ordering::Relaxed) {
        if client.is_none() {
            match connect_preferring(&ctx, id).await {
                Ok(c) => client = Some(c),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let key = registers[rng.range(0, registers.len() as u64 - 1) as usize].clone();
        let write = rng.chance(50);
        let invoke = nanos(start);
        if write {
            seq += 1;
            // Unique per client and operation; never 0 (the initial value).
            let value = ((id as u64 + 1) << 32) | seq;
            let r =
                tokio::time::timeout(CALL_TIMEOUT, apply(c, &register_manifest(&key, value))).await;
            let ret = nanos(start);
            let ok = matches!(r, Ok(Ok(())));
            let outcome = if ok { Outcome3::Ok } else { Outcome3::Unknown };
            shared.count("write", outcome);
            lock(&shared.history).push(Op {
                key,
                client: id,
                invoke,
                ret: ok.then_some(ret),
                action: Action::Write(value),
            });
            if !ok {
                client = None;
            }
        } else {
            let r = tokio::time::timeout(CALL_TIMEOUT, read_register(c, &key)).await;
            let ret = nanos(start);
            match r {
                Ok(Ok(v)) => {
                    shared.count("read", Outcome3::Ok);
                    lock(&shared.history).push(Op {
                        key,
                        client: id,
                        invoke,
                        ret: Some(ret),
                        action: Action::Read(v),
                    });
                }
                _ => {
                    // A failed read tells nothing: left out of the history.
                    shared.count("read", Outcome3::Fail);
                    client = None;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.range(20, 200))).await;
    }
}

/// Scales `web` and rolls `upd` (a new env value: a rolling update) now and then.
async fn workload_client(ctx: rudder_ctl::context::Context, shared: Arc<Shared>, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut client: Option<ControlClient<Channel>> = None;
    let mut generation = 0;
    while !shared.stop_clients.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.range(1000, 3000))).await;
        if client.is_none() {
            match connect_preferring(&ctx, rng.range(0, 2) as usize).await {
                Ok(c) => client = Some(c),
                Err(_) => {
                    shared.count("connect", Outcome3::Fail);
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let ok = if rng.chance(60) {
            let replicas = rng.range(1, 4);
            let r = tokio::time::timeout(
                CALL_TIMEOUT,
                c.scale(ScaleRequest {
                    service: "web".into(),
                    replicas,
                }),
            )
            .await;
            let ok = matches!(r, Ok(Ok(_)));
            let o = if ok { Outcome3::Ok } else { Outcome3::Unknown };
            shared.count("scale", o);
            lock(&shared.scales).push((replicas, o));
            ok
        } else {
            generation += 1;
            let r = tokio::time::timeout(CALL_TIMEOUT, apply(c, &upd_manifest(generation))).await;
            let ok = matches!(r, Ok(Ok(())));
            shared.count("update", if ok { Outcome3::Ok } else { Outcome3::Unknown });
            ok
        };
        if !ok {
            client = None;
        }
    }
}

/// One read of every register from each controller, once the cluster converged: a lost
/// acknowledged write shows here at the latest.
async fn final_reads(
    ctx: &rudder_ctl::context::Context,
    urls: &[String],
    registers: &[String],
    shared: &Shared,
    start: Instant,
) {
    for (i, _) in urls.iter().enumerate() {
        let mut one = ctx.clone();
        one.controllers = vec![urls[i].clone()];
        let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(10), rudder_ctl::connect(&one)).await
        else {
            shared.count("final read", Outcome3::Fail);
            continue;
        };
        for key in registers {
            let invoke = nanos(start);
            if let Ok(Ok(v)) = tokio::time::timeout(CALL_TIMEOUT, read_register(&mut c, key)).await
            {
                shared.count("final read", Outcome3::Ok);
                lock(&shared.history).push(Op {
                    key: key.clone(),
                    client: 1000 + i,
                    invoke,
                    ret: Some(nanos(start)),
                    action: Action::Read(v),
                });
            } else {
                shared.count("final read", Outcome3::Fail);
            }
        }
    }
}

// ---- convergence and slots ---------------------------------------------------------------------

struct Convergence {
    why: String,
}

impl Convergence {
    fn ok(&self) -> bool {
        self.why.is_empty()
    }
}

/// Every node ready and every service running as declared (no update in progress), as the
/// first controller that answers sees it.
async fn converged(
    ctx: &rudder_ctl::context::Context,
    hosts: usize,
) -> anyhow::Result<Convergence> {
    let mut c = connect_preferring(ctx, 0).await?;
    let mut why = Vec::new();
    let nodes = rudder_ctl::nodes(&mut c).await?;
    let ready = nodes
        .iter()
        .filter(|n| n.state == rudder_proto::v1::NodeState::Ready as i32)
        .count();
    if ready < hosts {
        why.push(format!("{ready}/{hosts} nodes ready"));
    }
    for s in rudder_ctl::services(&mut c).await? {
        if s.running != s.desired {
            why.push(format!("{}: {}/{} running", s.name, s.running, s.desired));
        }
    }
    let tasks = all_tasks(&mut c).await?;
    let doubles = check::double_running_slots(&tasks);
    if !doubles.is_empty() {
        why.push(format!("double-running slots {doubles:?}"));
    }
    Ok(Convergence {
        why: why.join("; "),
    })
}

async fn all_tasks(c: &mut ControlClient<Channel>) -> anyhow::Result<Vec<TaskView>> {
    let running = rudder_proto::v1::TaskState::Running as i32;
    let tasks = c
        .list_tasks(ListTasksRequest {
            service: String::new(),
        })
        .await
        .map_err(rudder_ctl::status_err)?
        .into_inner()
        .tasks;
    Ok(tasks
        .into_iter()
        .map(|t| TaskView {
            id: t.id,
            service: t.service,
            slot: t.slot,
            node: t.node,
            running: t.state == running,
            desired_running: t.desired_state == running,
        })
        .collect())
}

/// Task ids whose container init is alive, on every host (the pid file in the task's container
/// dir, checked in /proc).
fn live_containers(lab: &Lab) -> Vec<String> {
    let mut out = Vec::new();
    for h in &lab.hosts {
        let Ok(entries) = std::fs::read_dir(h.data_dir.join("containers")) else {
            continue;
        };
        for e in entries.flatten() {
            let pid = std::fs::read_to_string(e.path().join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            if pid.is_some_and(|p| p > 1 && crate::pid_alive(p)) {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// Slots with two running tasks (controller view) or two live containers (hosts).
async fn slot_check(ctx: &rudder_ctl::context::Context, lab: &Lab) -> anyhow::Result<Vec<String>> {
    let mut c = connect_preferring(ctx, 0).await?;
    let tasks = all_tasks(&mut c).await?;
    let mut out = Vec::new();
    for ((svc, slot), ids) in check::double_running_slots(&tasks) {
        out.push(format!(
            "{svc} slot {slot}: running tasks {ids:?} (controller)"
        ));
    }
    for ((svc, slot), ids) in check::double_live_slots(&tasks, &live_containers(lab)) {
        out.push(format!(
            "{svc} slot {slot}: live containers {ids:?} (hosts)"
        ));
    }
    Ok(out)
}

async fn check_last_scale(
    ctx: &rudder_ctl::context::Context,
    shared: &Shared,
) -> anyhow::Result<()> {
    let scales = lock(&shared.scales).clone();
    let Some(last_ok) = scales.iter().rposition(|(_, o)| *o == Outcome3::Ok) else {
        return Ok(());
    };
    let mut allowed: BTreeSet<u64> = BTreeSet::from([scales[last_ok].0]);
    allowed.extend(scales[last_ok + 1..].iter().map(|(r, _)| *r));
    let mut c = connect_preferring(ctx, 0).await?;
    let web = rudder_ctl::services(&mut c)
        .await?
        .into_iter()
        .find(|s| s.name == "web")
        .context("service web is gone")?;
    anyhow::ensure!(
        allowed.contains(&web.desired),
        "web has {} replicas; the last acknowledged scale set {} (later, unknown: {:?})",
        web.desired,
        scales[last_ok].0,
        &scales[last_ok + 1..]
    );
    Ok(())
}

// ---- faults ------------------------------------------------------------------------------------

fn role(p: Proc) -> Role {
    match p {
        Proc::Controller => Role::Controller,
        Proc::Agent => Role::Agent,
    }
}

fn begin(lab: &Mutex<Lab>, f: Fault) -> anyhow::Result<()> {
    let l = lock(lab).clone();
    match f {
        Fault::Kill { host, proc } => l.kill(host, role(proc))?,
        Fault::Pause { host, proc } => {
            l.pause(host, role(proc), true)?;
        }
        Fault::CutLink { host } => l.set_link(host, false)?,
        Fault::Loss { host, percent } => l.set_loss(host, percent)?,
    }
    Ok(())
}

fn heal(lab: &Mutex<Lab>, f: Fault) -> anyhow::Result<()> {
    let mut l = lock(lab).clone();
    match f {
        Fault::Kill { host, proc } => {
            let b = match proc {
                Proc::Controller => bin("rudder-controller"),
                Proc::Agent => bin("rudder-agent"),
            };
            let r = l.restart(host, role(proc), &b, &lab_runtime(), true);
            // Record the new pid even when the controller was slow to listen.
            lock(lab).hosts[host] = l.hosts[host].clone();
            r?;
        }
        Fault::Pause { host, proc } => {
            l.pause(host, role(proc), false)?;
        }
        Fault::CutLink { host } => l.set_link(host, true)?,
        Fault::Loss { host, .. } => l.set_loss(host, 0)?,
    }
    Ok(())
}

/// Runs `planned` in real time from `start`; every fault begun is healed, also on error.
fn run_faults(
    planned: &[Planned],
    lab: &Mutex<Lab>,
    shared: &Shared,
    start: Instant,
) -> anyhow::Result<()> {
    // (time, is_heal, index): heals before begins at the same instant.
    let mut events: Vec<(Duration, bool, usize)> = Vec::new();
    for (i, p) in planned.iter().enumerate() {
        events.push((p.at, false, i));
        events.push((p.end(), true, i));
    }
    events.sort_by_key(|&(t, begin, i)| (t, !begin, i));
    let mut begun: BTreeMap<usize, (Duration, Option<String>)> = BTreeMap::new();
    let mut first_error = None;
    for (at, is_heal, i) in events {
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let p = planned[i];
        if !is_heal {
            let r = begin(lab, p.fault);
            let err = r.as_ref().err().map(|e| format!("{e:#}"));
            println!(
                "chaos: {:>6.1}s {} on h{} for {:?}{}",
                start.elapsed().as_secs_f64(),
                p.fault.kind(),
                p.fault.host() + 1,
                p.hold,
                err.as_deref()
                    .map(|e| format!(" (failed: {e})"))
                    .unwrap_or_default()
            );
            begun.insert(i, (start.elapsed(), err));
        } else if let Some((began, err)) = begun.remove(&i) {
            let r = heal(lab, p.fault);
            let healed = start.elapsed();
            let err = err.or_else(|| r.as_ref().err().map(|e| format!("heal: {e:#}")));
            if let (Some(e), None) = (&err, &first_error) {
                first_error = Some(format!("{:?}: {e}", p.fault));
            }
            lock(&shared.faults).push((p, began, healed, err));
        }
    }
    match first_error {
        Some(e) => anyhow::bail!(e),
        None => Ok(()),
    }
}

// ---- resources and leaks -----------------------------------------------------------------------

/// `(rss KiB, fds)` of `pid`.
fn usage(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

/// Every process whose command line mentions the lab dir: (pid, program name, cmdline).
fn lab_processes(dir: &Path) -> Vec<(i32, String, String)> {
    let marker = format!("{}/", dir.display());
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if !cmd.contains(&marker) || !crate::pid_alive(pid) {
            continue;
        }
        let prog = cmd
            .split_whitespace()
            .next()
            .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
            .unwrap_or_default();
        out.push((pid, prog, cmd));
    }
    out
}

/// Samples every 2 s: RSS and fds of controllers, agents and shims; and, during the faults,
/// how often the controller shows a slot running twice (transient, reported only).
async fn sampler(
    shared: Arc<Shared>,
    lab: Arc<Mutex<Lab>>,
    ctx: rudder_ctl::context::Context,
    dir: PathBuf,
    start: Instant,
) {
    while !shared.stop_sampler.load(Ordering::Relaxed) {
        let l = lock(&lab).clone();
        let mut procs: Vec<(String, i32)> = Vec::new();
        for h in &l.hosts {
            if let Some(p) = h.controller_pid {
                procs.push((format!("controller {} (pid {p})", h.name), p));
            }
            if let Some(p) = h.agent_pid {
                procs.push((format!("agent {} (pid {p})", h.name), p));
            }
        }
        for (pid, prog, _) in lab_processes(&dir) {
            if prog.contains("shim") {
                procs.push((format!("{prog} (pid {pid})"), pid));
            }
        }
        let at = start.elapsed();
        {
            let mut samples = lock(&shared.samples);
            for (who, pid) in procs {
                if let Some((rss_kib, fds)) = usage(pid) {
                    samples
                        .entry(who)
                        .or_default()
                        .push(Sample { at, rss_kib, fds });
                }
            }
        }
        if !shared.stop_clients.load(Ordering::Relaxed) {
            if let Ok(Ok(mut c)) =
                tokio::time::timeout(Duration::from_secs(3), connect_preferring(&ctx, 0)).await
            {
                if let Ok(Ok(t)) =
                    tokio::time::timeout(Duration::from_secs(3), all_tasks(&mut c)).await
                {
                    let n = check::double_running_slots(&t).len() as u64;
                    shared.transient_doubles.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Lab processes nothing accounts for, once converged: anything but the recorded controllers
/// and agents, one shim per live container, and the hosts' userspace WireGuard.
async fn stray_processes(
    ctx: &rudder_ctl::context::Context,
    lab: &Lab,
) -> anyhow::Result<Vec<String>> {
    let mut c = connect_preferring(ctx, 0).await?;
    let tasks = all_tasks(&mut c).await?;
    let wanted: BTreeSet<&str> = tasks
        .iter()
        .filter(|t| t.desired_running)
        .map(|t| t.id.as_str())
        .collect();
    let recorded: BTreeSet<i32> = lab
        .hosts
        .iter()
        .flat_map(|h| [h.controller_pid, h.agent_pid])
        .flatten()
        .collect();
    let mut out = Vec::new();
    for (pid, prog, cmd) in lab_processes(&lab.dir) {
        if recorded.contains(&pid) {
            continue;
        }
        if prog.contains("shim") {
            // A shim names its container dir `…/containers/<task id>`.
            let task = cmd
                .split_whitespace()
                .find_map(|a| a.split("/containers/").nth(1))
                .map(|rest| rest.split('/').next().unwrap_or(rest));
            if task.is_some_and(|t| wanted.contains(t)) {
                continue;
            }
        }
        if prog.contains("wg") || prog.contains("wireguard") {
            continue;
        }
        out.push(format!(
            "pid {pid}: {}",
            cmd.chars().take(160).collect::<String>()
        ));
    }
    Ok(out)
}

/// What is left of lab `name` after `down`: network namespaces, cgroups, mounts under its
/// dir, processes naming its dir.
fn leftovers(name: &str, dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let prefix = format!("rdr-{name}-");
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix) {
                out.push(format!("netns {n}"));
            }
        }
    }
    let cg = format!("rudder-{name}-h");
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&cg) {
                out.push(format!("cgroup /sys/fs/cgroup/{n}"));
            }
        }
    }
    let d = dir.display().to_string();
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
        for l in mounts.lines() {
            if let Some(mp) = l.split_whitespace().nth(4) {
                if mp == d || mp.starts_with(&format!("{d}/")) {
                    out.push(format!("mount {mp}"));
                }
            }
        }
    }
    for (pid, prog, _) in lab_processes(dir) {
        out.push(format!("process {pid} ({prog})"));
    }
    if dir.exists() {
        out.push(format!("dir {}", dir.display()));
    }
    out
}

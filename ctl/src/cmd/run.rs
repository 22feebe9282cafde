//! `rctl run [FLAGS] IMAGE [CMD…]`: a one-off container, like `docker run`. It is a job of one
//! completion that is never retried (`replicated-job`, restart `none`: the cluster places,
//! starts, logs and reports it like any task, and `rctl ps` shows the job complete or failed);
//! rctl streams its output and exits with the container's exit code. `--rm` removes the job
//! afterwards; the job is also marked `auto_remove`, so the cluster removes it a little later if
//! this client is killed first.
//!
//! The flags are Docker's (`-d`, `--name`, `-p`, `-v`, `--tmpfs`, `--mount`, `--network`, `-w`,
//! `-u`, `--entrypoint`, `-e`, `--env-file`, `-l`, `--rm`) plus `--node`. [`spec`] turns them
//! into the job's [`ServiceSpec`] without I/O; `-d` prints the name the job runs under, which
//! `rctl ps`, `logs`, `exec` and `rm` all take.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use rudder_model::spec::{RestartCondition, ServiceSpec};
use rudder_model::TaskState;
use rudder_proto::v1::{
    ApplyRequest, ListTasksRequest, ListTasksResponse, LogsRequest, RemoveServiceRequest,
    TaskSummary,
};

use crate::Client;

use crate::context::Context;

/// `.env` files above this are not environment files.
const MAX_ENV_FILE: u64 = 1 << 20;

#[derive(clap::Args, Debug, Default)]
pub struct RunArgs {
    /// Run in the background: print the job's name (which `rctl ps`, `logs`, `exec` and `rm`
    /// take) once its container runs, and return.
    #[arg(short, long)]
    pub detach: bool,
    /// Remove it (the job behind it) when it ends; should this client die first, the
    /// cluster removes it 10 s after it ended.
    #[arg(long)]
    pub rm: bool,
    /// Run on this host (hostname, as `rctl node ls` shows it).
    #[arg(long)]
    pub node: Option<String>,
    /// Name of the job behind it (default: run-<random>).
    #[arg(long)]
    pub name: Option<String>,
    /// KEY=VALUE, or KEY alone to take this machine's value (repeatable).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Read KEY=VALUE lines from a file (repeatable; --env wins).
    #[arg(long)]
    pub env_file: Vec<PathBuf>,
    /// KEY=VALUE label on the job (repeatable).
    #[arg(short, long)]
    pub label: Vec<String>,
    /// Publish a port on the node it runs on: [HOST_PORT:]CONTAINER_PORT[/tcp|/udp]
    /// (repeatable).
    #[arg(short, long)]
    pub publish: Vec<String>,
    /// Mount a named volume (NAME:/path[:ro]) or a host path (/host/path:/path[:ro])
    /// (repeatable).
    #[arg(short, long)]
    pub volume: Vec<String>,
    /// Mount a tmpfs: /path[:size=64m][,ro] (repeatable).
    #[arg(long)]
    pub tmpfs: Vec<String>,
    /// Docker's long form: type=volume|bind|tmpfs,source=…,target=…[,readonly][,tmpfs-size=…]
    /// (repeatable).
    #[arg(long)]
    pub mount: Vec<String>,
    /// bridge (default), host, none, container:TASK_OR_SERVICE, or an overlay network's name.
    #[arg(long)]
    pub network: Option<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// user[:group], names or numbers.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Replace the image's ENTRYPOINT (the command gives its arguments; without one, the
    /// image's CMD does, unlike Docker).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Stream stdin to the command (with -t: on a terminal). The job then holds its container
    /// open with `sleep` and the command runs in it through exec, which the image needs.
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a terminal.
    #[arg(short, long)]
    pub tty: bool,
    pub image: String,
    /// The command (replaces the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `[HOST:]CONTAINER[/PROTO]`, published on the task's node (Docker's `-p`).
pub fn parse_publish(s: &str) -> anyhow::Result<serde_json::Value> {
    let (ports, proto) = match s.rsplit_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some((_, other)) => anyhow::bail!("-p {s:?}: protocol {other:?} is not tcp or udp"),
        None => (s, "tcp"),
    };
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| anyhow::anyhow!("-p {s:?}: {p:?} is not a port (1-65535)"))
    };
    let parts: Vec<&str> = ports.split(':').collect();
    let (published, target) = match parts.as_slice() {
        [t] => (None, port(t)?),
        [h, t] => (Some(port(h)?), port(t)?),
        _ => anyhow::bail!(
            "-p {s:?}: expected [HOST_PORT:]CONTAINER_PORT[/PROTO] (no host address: a port is \
             published on every address of the node)"
        ),
    };
    let mut v = serde_json::json!({"target": target, "protocol": proto, "mode": "host"});
    if let Some(p) = published {
        v["published"] = p.into();
    }
    Ok(v)
}

/// `NAME:/path[:ro|rw]` (a named volume) or `/host:/path[:ro|rw]` (a bind mount).
pub fn parse_volume(s: &str) -> anyhow::Result<serde_json::Value> {
    let parts: Vec<&str> = s.split(':').collect();
    let (source, target, readonly) = match parts.as_slice() {
        [src, dst] => (*src, *dst, false),
        [src, dst, "ro"] => (*src, *dst, true),
        [src, dst, "rw"] => (*src, *dst, false),
        [_, _, opt] => anyhow::bail!("-v {s:?}: option {opt:?} is not ro or rw"),
        [_] => anyhow::bail!(
            "-v {s:?}: name the volume (NAME:{s}) or the host path (/host/path:{s}); use \
             --tmpfs for scratch space"
        ),
        _ => anyhow::bail!("-v {s:?}: expected SOURCE:TARGET[:ro]"),
    };
    if !target.starts_with('/') {
        anyhow::bail!("-v {s:?}: the target {target:?} is not an absolute path");
    }
    if source.is_empty() {
        anyhow::bail!("-v {s:?}: the source is empty");
    }
    let typ = if source.starts_with('/') {
        "bind"
    } else {
        "volume"
    };
    Ok(serde_json::json!({"type": typ, "source": source, "target": target, "readonly": readonly}))
}

/// `/path[:size=64m][,ro]` (Docker's `--tmpfs`, whose options follow a colon).
pub fn parse_tmpfs(s: &str) -> anyhow::Result<serde_json::Value> {
    let (target, opts) = s.split_once(':').unwrap_or((s, ""));
    if !target.starts_with('/') {
        anyhow::bail!("--tmpfs {s:?}: the target {target:?} is not an absolute path");
    }
    let mut v = serde_json::json!({"type": "tmpfs", "target": target});
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        match o.split_once('=') {
            Some(("size", size)) => v["tmpfs_size"] = size.into(),
            None if o == "ro" => v["readonly"] = true.into(),
            None if o == "rw" => {}
            _ => anyhow::bail!("--tmpfs {s:?}: option {o:?} is not size=N, ro or rw"),
        }
    }
    Ok(v)
}

/// Docker's `--mount type=…,source=…,target=…[,readonly][,tmpfs-size=…][,volume-nocopy]`.
pub fn parse_mount(s: &str) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::json!({"type": "volume"});
    for o in s.split(',').filter(|o| !o.is_empty()) {
        let (k, val) = o.split_once('=').unwrap_or((o, ""));
        match (k, val) {
            ("type", t @ ("volume" | "bind" | "tmpfs")) => v["type"] = t.into(),
            ("type", t) => anyhow::bail!("--mount {s:?}: type {t:?} is not volume, bind or tmpfs"),
            ("source" | "src", src) => v["source"] = src.into(),
            ("target" | "destination" | "dst", dst) => v["target"] = dst.into(),
            ("readonly" | "ro", "" | "true" | "1") => v["readonly"] = true.into(),
            ("readonly" | "ro", "false" | "0") => {}
            ("tmpfs-size", size) => v["tmpfs_size"] = size.into(),
            ("volume-nocopy", "" | "true" | "1") => v["nocopy"] = true.into(),
            _ => anyhow::bail!("--mount {s:?}: unknown option {o:?}"),
        }
    }
    if !v["target"].as_str().is_some_and(|t| t.starts_with('/')) {
        anyhow::bail!("--mount {s:?}: target=/absolute/path is needed");
    }
    Ok(v)
}

/// `KEY=VALUE` into `env`; `KEY` alone takes this machine's value (skipped when unset, as
/// Docker does).
fn put_env(env: &mut BTreeMap<String, String>, what: &str, kv: &str) -> anyhow::Result<()> {
    match kv.split_once('=') {
        Some(("", _)) => anyhow::bail!("{what} {kv:?}: the name is empty"),
        Some((k, v)) => {
            env.insert(k.to_string(), v.to_string());
        }
        None if kv.is_empty() => anyhow::bail!("{what}: empty"),
        None => {
            if let Ok(v) = std::env::var(kv) {
                env.insert(kv.to_string(), v);
            }
        }
    }
    Ok(())
}

/// The environment: each `--env-file` in order (its text given by `read`), then `--env`.
fn environment(
    a: &RunArgs,
    read: impl Fn(&std::path::Path) -> anyhow::Result<String>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for f in &a.env_file {
        let text = read(f)?;
        let lines = rudder_model::compose::interpolate::parse_env_file(&text)
            .map_err(|e| anyhow::anyhow!("--env-file {}: {e}", f.display()))?;
        for (k, v) in lines {
            match v {
                Some(v) => {
                    env.insert(k, v);
                }
                None => put_env(&mut env, "--env-file", &k)?,
            }
        }
    }
    for kv in &a.env {
        put_env(&mut env, "--env", kv)?;
    }
    Ok(env)
}

fn read_env_file(p: &std::path::Path) -> anyhow::Result<String> {
    let f =
        std::fs::File::open(p).map_err(|e| anyhow::anyhow!("--env-file {}: {e}", p.display()))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_ENV_FILE + 1), &mut text)
        .map_err(|e| anyhow::anyhow!("--env-file {}: {e}", p.display()))?;
    if text.len() as u64 > MAX_ENV_FILE {
        anyhow::bail!("--env-file {}: over 1 MiB", p.display());
    }
    Ok(text)
}

/// The job's spec from the flags (no I/O: `env_file` reads the `--env-file`s).
pub fn spec(
    a: &RunArgs,
    name: &str,
    read_env: impl Fn(&std::path::Path) -> anyhow::Result<String>,
) -> anyhow::Result<ServiceSpec> {
    let mut spec = serde_json::json!({
        "name": name,
        "image": a.image,
        "mode": "replicated-job",
        "restart": {"condition": "none"},
        "stop_grace_period": 2,
    });
    if a.rm {
        // The cluster removes it too, should this client die before it can (see `run`).
        spec["auto_remove"] = true.into();
    }
    if !a.command.is_empty() {
        spec["command"] = serde_json::json!(a.command);
    }
    if let Some(e) = &a.entrypoint {
        if e.is_empty() {
            anyhow::bail!("--entrypoint \"\": name the program to run instead of the image's");
        }
        // Unlike Docker, the image's CMD still follows it when no command is given (a spec
        // cannot clear CMD): give the command, even a single argument.
        spec["entrypoint"] = serde_json::json!([e]);
    }
    if let Some(n) = &a.node {
        spec["placement"] = serde_json::json!({"constraints": [format!("node.hostname=={n}")]});
    }
    match a.network.as_deref() {
        None => {}
        Some(m @ ("host" | "bridge" | "none")) => spec["network_mode"] = m.into(),
        Some(c) if c.starts_with("container:") => {
            if c.len() == "container:".len() {
                anyhow::bail!("--network container: name the task or service to share with");
            }
            spec["network_mode"] = c.into();
        }
        Some(overlay) => spec["networks"] = serde_json::json!([overlay]),
    }
    if let Some(w) = &a.workdir {
        spec["workdir"] = w.as_str().into();
    }
    if let Some(u) = &a.user {
        spec["user"] = u.as_str().into();
    }
    let env = environment(a, read_env)?;
    if !env.is_empty() {
        spec["env"] = serde_json::json!(env);
    }
    let mut labels = BTreeMap::new();
    for kv in &a.label {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k.is_empty() {
            anyhow::bail!("--label {kv:?}: the name is empty");
        }
        labels.insert(k.to_string(), v.to_string());
    }
    if !labels.is_empty() {
        spec["labels"] = serde_json::json!(labels);
    }
    let ports = a
        .publish
        .iter()
        .map(|p| parse_publish(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !ports.is_empty() {
        spec["ports"] = ports.into();
    }
    let mut mounts = Vec::new();
    for v in &a.volume {
        mounts.push(parse_volume(v)?);
    }
    for t in &a.tmpfs {
        mounts.push(parse_tmpfs(t)?);
    }
    for m in &a.mount {
        mounts.push(parse_mount(m)?);
    }
    if !mounts.is_empty() {
        spec["mounts"] = mounts.into();
    }
    let spec: ServiceSpec =
        serde_json::from_value(spec).map_err(|e| anyhow::anyhow!("run: {e}"))?;
    debug_assert_eq!(spec.restart.condition, RestartCondition::None);
    debug_assert_eq!(rudder_model::job::completions(&spec), 1);
    spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(spec)
}

/// Runs the container; returns its exit code (`-d`: 0 once it runs).
pub async fn run(ctx: &Context, a: &RunArgs) -> anyhow::Result<i32> {
    let name = match &a.name {
        Some(n) => n.clone(),
        None => format!("run-{:06x}", rand_suffix()),
    };
    let mut spec = spec(a, &name, read_env_file)?;
    let attach = (a.interactive || a.tty) && !a.detach;
    let process = if attach {
        // The job's own process only holds the container open; the command runs in it through
        // exec, which streams stdin and gives a terminal (see `attached`).
        let (entrypoint, cmd) = super::image_inspect::entrypoint_and_cmd(ctx, &a.image).await?;
        let process = attached_process(a, entrypoint, cmd)?;
        spec.entrypoint = Some(KEEP_OPEN.iter().map(|s| s.to_string()).collect());
        spec.command = None;
        Some(process)
    } else {
        None
    };
    // One connection for the whole run: apply, the task watch, the logs and the removal
    // share it (each new mutual-TLS connection costs a handshake and a credentials read).
    let mut client = crate::connect(ctx).await?;
    client
        .apply(ApplyRequest {
            service_specs_json: vec![crate::convert::to_json("service", &spec)?],
            ..Default::default()
        })
        .await
        .map_err(crate::status_err)?;
    if a.detach {
        return detached(&mut client, &name).await;
    }
    let result = match process {
        Some(process) => {
            let r = attached(ctx, &mut client, &name, &process, a).await;
            // The container only held open for the command: it goes with it, as `--rm` would.
            let _ = client
                .remove_service(RemoveServiceRequest { name: name.clone() })
                .await;
            return r;
        }
        None => follow(&mut client, &name).await,
    };
    if a.rm {
        let _ = client
            .remove_service(RemoveServiceRequest { name: name.clone() })
            .await;
    }
    result
}

/// What the job runs under `-i`/`-t` instead of its command: a process that only keeps the
/// container open (most images have `sleep`; one without cannot run `-it`).
const KEEP_OPEN: [&str; 2] = ["sleep", "2147483647"];

/// The command `-i`/`-t` runs in the container, as Docker would start it: the entrypoint
/// (`--entrypoint`, else the image's) then the arguments (the command line's, else the image's
/// CMD).
pub fn attached_process(
    a: &RunArgs,
    image_entrypoint: Vec<String>,
    image_cmd: Vec<String>,
) -> anyhow::Result<Vec<String>> {
    let mut process = match &a.entrypoint {
        Some(e) => vec![e.clone()],
        None => image_entrypoint,
    };
    if a.command.is_empty() {
        if a.entrypoint.is_none() {
            process.extend(image_cmd);
        }
    } else {
        process.extend(a.command.iter().cloned());
    }
    if process.is_empty() {
        anyhow::bail!("run {}: the image names no command; give one", a.image);
    }
    Ok(process)
}

/// `-i`/`-t`: waits for the container, runs the command in it with stdin and/or a terminal,
/// and returns its exit code.
async fn attached(
    ctx: &Context,
    client: &mut Client,
    name: &str,
    process: &[String],
    a: &RunArgs,
) -> anyhow::Result<i32> {
    let mut watch = TaskWatch::start(client, name).await?;
    let t = watch
        .until(|s| s >= TaskState::Running, Duration::from_secs(120))
        .await?;
    if crate::convert::task_state(t.state) != Some(TaskState::Running) {
        anyhow::bail!(
            "{}: {} {} {} (run -i/-t keeps the container open with `sleep`: the image needs it)",
            t.name,
            crate::convert::task_state_name(t.state),
            t.message,
            t.error
        );
    }
    super::exec::run(
        ctx,
        &t.id,
        process,
        super::exec::ExecOptions {
            interactive: a.interactive,
            tty: a.tty,
            ..Default::default()
        },
    )
    .await
}

/// `-d`: waits for the container to start (a refusal is an error, as `docker run -d` reports
/// one), then prints the job's name.
async fn detached(client: &mut Client, name: &str) -> anyhow::Result<i32> {
    let mut watch = TaskWatch::start(client, name).await?;
    let t = watch
        .until(|s| s >= TaskState::Running, Duration::from_secs(120))
        .await?;
    match crate::convert::task_state(t.state) {
        Some(TaskState::Rejected | TaskState::Failed) if !t.has_exit_code => {
            anyhow::bail!(
                "{}: {} {} {}",
                t.name,
                crate::convert::task_state_name(t.state),
                t.message,
                t.error
            )
        }
        _ => {}
    }
    println!("{name}");
    Ok(0)
}

/// The newest task of a service, as committed changes arrive (`WatchTasks`: no polling).
struct TaskWatch {
    service: String,
    stream: tonic::Streaming<ListTasksResponse>,
}

impl TaskWatch {
    async fn start(client: &mut Client, service: &str) -> anyhow::Result<TaskWatch> {
        let stream = client
            .watch_tasks(ListTasksRequest {
                service: service.to_string(),
            })
            .await
            .map_err(crate::status_err)?
            .into_inner();
        Ok(TaskWatch {
            service: service.to_string(),
            stream,
        })
    }

    /// The service's newest task once `until` holds for its state (or it is terminal).
    async fn until(
        &mut self,
        until: impl Fn(TaskState) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<TaskSummary> {
        let mut newest: Option<TaskSummary> = None;
        let wait = async {
            while let Some(list) = self.stream.message().await.map_err(crate::status_err)? {
                if let Some(t) = list.tasks.into_iter().max_by_key(|t| t.timestamp_ms) {
                    let state = crate::convert::task_state(t.state);
                    if state.is_some_and(|s| until(s) || s.is_terminal()) {
                        return Ok(t);
                    }
                    newest = Some(t);
                }
            }
            anyhow::bail!("{}: the service was removed", self.service)
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => match &newest {
                Some(t) => anyhow::bail!(
                    "{}: still {} ({})",
                    t.name,
                    crate::convert::task_state_name(t.state),
                    t.message
                ),
                None => anyhow::bail!("{}: no task was created", self.service),
            },
        }
    }
}

/// Waits for the task to start, streams its output, then returns its exit code.
async fn follow(client: &mut Client, name: &str) -> anyhow::Result<i32> {
    let mut watch = TaskWatch::start(client, name).await?;
    let started = watch
        .until(|s| s >= TaskState::Running, Duration::from_secs(120))
        .await?;
    if crate::convert::task_state(started.state) == Some(TaskState::Rejected) {
        anyhow::bail!(
            "{}: rejected: {} {}",
            started.name,
            started.message,
            started.error
        );
    }
    let mut stream = client
        .logs(LogsRequest {
            target: started.id.clone(),
            tail: 0,
            follow: true,
            timestamps: false,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let mut out = std::io::stdout();
    let mut exit_code = None;
    while let Some(chunk) = stream.message().await.map_err(crate::status_err)? {
        if !chunk.warning.is_empty() {
            eprintln!("warning: {}", chunk.warning);
            continue;
        }
        if chunk.has_exit_code {
            exit_code = Some(chunk.exit_code);
        }
        out.write_all(&chunk.data)?;
        out.flush()?;
    }
    // The log's end carries the exit code: no need to wait for the agent's report of it
    // to be committed and watched.
    if let Some(code) = exit_code {
        return Ok(code);
    }
    let done = if crate::convert::task_state(started.state).is_some_and(|s| s.is_terminal()) {
        started
    } else {
        watch
            .until(|s| s.is_terminal(), Duration::from_secs(30))
            .await?
    };
    if crate::convert::task_state(done.state) == Some(TaskState::Failed) && !done.has_exit_code {
        anyhow::bail!("{}: {} {}", done.name, done.message, done.error);
    }
    Ok(if done.has_exit_code {
        done.exit_code
    } else {
        0
    })
}

fn rand_suffix() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ std::process::id().rotate_left(12)) & 0xff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use rudder_model::spec::NetworkMode;
    use rudder_model::volume::MountType;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(argv: &[&str]) -> RunArgs {
        Cli::try_parse_from(std::iter::once("run").chain(argv.iter().copied()))
            .unwrap()
            .run
    }

    fn spec_of(argv: &[&str]) -> anyhow::Result<ServiceSpec> {
        spec(&parse(argv), "job", |_| {
            Ok("A=from-file\nB=from-file\n# note\n".to_string())
        })
    }

    #[test]
    fn detach_and_name() {
        let a = parse(&["-d", "--name", "web", "busybox", "sleep", "60"]);
        assert!(a.detach);
        assert_eq!(a.name.as_deref(), Some("web"));
        assert_eq!(a.command, ["sleep", "60"]);
        let s = spec_of(&["--rm", "busybox"]).unwrap();
        assert!(s.auto_remove);
    }

    #[test]
    fn interactive_and_tty_flags_combine() {
        let a = parse(&["-it", "busybox", "sh"]);
        assert!(a.interactive && a.tty);
    }

    #[test]
    fn attached_runs_what_docker_would_start() {
        let image = |e: &[&str], c: &[&str]| {
            (
                e.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                c.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        let run = |argv: &[&str], (e, c): (Vec<String>, Vec<String>)| {
            attached_process(&parse(argv), e, c)
        };
        assert_eq!(
            run(&["-it", "busybox"], image(&[], &["sh"])).unwrap(),
            ["sh"]
        );
        assert_eq!(
            run(
                &["-i", "redis", "--port", "1"],
                image(&["entry"], &["redis-server"])
            )
            .unwrap(),
            ["entry", "--port", "1"]
        );
        assert_eq!(
            run(
                &["-t", "--entrypoint", "bash", "img"],
                image(&["entry"], &["x"])
            )
            .unwrap(),
            ["bash"]
        );
        assert!(run(&["-it", "scratch"], image(&[], &[])).is_err());
    }

    #[test]
    fn publish_ports() {
        let s = spec_of(&["-p", "8080:80", "-p", "53/udp", "busybox"]).unwrap();
        assert_eq!(s.ports[0].target, 80);
        assert_eq!(s.ports[0].published, Some(8080));
        assert_eq!(s.ports[1].published_port(), 53);
        assert_eq!(s.ports[1].protocol, rudder_model::ports::Protocol::Udp);
        assert_eq!(s.ports[0].mode, rudder_model::ports::PortMode::Host);
        assert!(parse_publish("1.2.3.4:80:80").is_err());
        assert!(parse_publish("80/sctp").is_err());
        assert!(parse_publish("x:80").is_err());
        assert!(parse_publish("0").is_err());
    }

    #[test]
    fn volumes_named_bind_and_tmpfs() {
        let s = spec_of(&[
            "-v",
            "data:/data",
            "-v",
            "/srv/www:/www:ro",
            "--tmpfs",
            "/scratch:size=64m",
            "--mount",
            "type=tmpfs,target=/t2,tmpfs-size=1m",
            "busybox",
        ])
        .unwrap();
        assert_eq!(s.mounts[0].typ, MountType::Volume);
        assert_eq!(s.mounts[0].source, "data");
        assert_eq!(s.mounts[1].typ, MountType::Bind);
        assert!(s.mounts[1].readonly);
        assert_eq!(s.mounts[2].typ, MountType::Tmpfs);
        assert_eq!(s.mounts[2].tmpfs_size, 64 << 20);
        assert_eq!(s.mounts[3].target, "/t2");
        assert!(parse_volume("/only").is_err());
        assert!(parse_volume("data:relative").is_err());
        assert!(parse_volume("data:/d:zz").is_err());
        assert!(parse_tmpfs("rel").is_err());
        assert!(parse_mount("type=bind,source=/x").is_err());
    }

    #[test]
    fn network_modes_and_overlays() {
        for (flag, mode) in [
            ("host", NetworkMode::Host),
            ("bridge", NetworkMode::Bridge),
            ("none", NetworkMode::None),
            ("container:web", NetworkMode::Container("web".into())),
        ] {
            assert_eq!(
                spec_of(&["--network", flag, "busybox"])
                    .unwrap()
                    .network_mode,
                mode
            );
        }
        let s = spec_of(&["--network", "backend", "busybox"]).unwrap();
        assert_eq!(s.networks, ["backend"]);
        assert_eq!(s.network_mode, NetworkMode::Bridge);
        assert!(spec_of(&["--network", "container:", "busybox"]).is_err());
    }

    #[test]
    fn workdir_user_and_entrypoint() {
        let s = spec_of(&[
            "-w",
            "/app",
            "-u",
            "1000:1000",
            "--entrypoint",
            "/bin/sh",
            "busybox",
            "-c",
            "id",
        ])
        .unwrap();
        assert_eq!(s.workdir.as_deref(), Some("/app"));
        assert_eq!(s.user.as_deref(), Some("1000:1000"));
        assert_eq!(s.entrypoint, Some(vec!["/bin/sh".to_string()]));
        assert_eq!(s.command, Some(vec!["-c".to_string(), "id".to_string()]));
        assert!(spec_of(&["--entrypoint", "", "busybox"]).is_err());
    }

    #[test]
    fn env_env_file_and_labels() {
        std::env::set_var("RUDDER_RUN_TEST_VAR", "local");
        let s = spec_of(&[
            "--env-file",
            "x.env",
            "-e",
            "B=flag",
            "-e",
            "RUDDER_RUN_TEST_VAR",
            "-e",
            "RUDDER_RUN_TEST_UNSET",
            "-l",
            "team=a",
            "--label",
            "flag",
            "busybox",
        ])
        .unwrap();
        assert_eq!(s.env["A"], "from-file");
        assert_eq!(s.env["B"], "flag", "--env wins over --env-file");
        assert_eq!(s.env["RUDDER_RUN_TEST_VAR"], "local");
        assert!(!s.env.contains_key("RUDDER_RUN_TEST_UNSET"));
        assert_eq!(s.labels["team"], "a");
        assert_eq!(s.labels["flag"], "");
        assert!(spec_of(&["-e", "=x", "busybox"]).is_err());
    }

    #[test]
    fn node_pins_the_placement() {
        let s = spec_of(&["--node", "h2", "busybox"]).unwrap();
        assert_eq!(s.placement.constraints.len(), 1);
    }

    #[test]
    fn an_env_file_over_the_limit_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("big.env");
        std::fs::write(&f, vec![b'#'; (MAX_ENV_FILE + 10) as usize]).unwrap();
        let e = read_env_file(&f).unwrap_err();
        assert!(e.to_string().contains("over 1 MiB"), "{e}");
    }
}

//! One compose service to one Rudder `ServiceSpec`, key by key. Keys Rudder has no field for
//! are warned about, once each; values Rudder refuses are errors naming the compose key.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use super::{interpolate, key_str, truthy, ComposeError, Cx, SERVICE_LABEL};
use crate::health::HealthCheck;
use crate::ports::{PortConfig, PortMode, Protocol};
use crate::secret::FileRef;
use crate::spec::{NetworkMode, RestartCondition, RestartPolicy, ServiceMode, ServiceSpec};
use crate::volume::{Mount, MountType};

/// Keys with no meaning in a cluster: warned, ignored.
const CLUSTER_MEANINGLESS: &[&str] = &[
    "container_name",
    "links",
    "external_links",
    "profiles",
    "cgroup_parent",
    "stdin_open",
    "tty",
    "pull_policy",
];

/// Keys a later Rudder may honour: warned, ignored.
const NOT_YET: &[&str] = &[
    "devices",
    "pid",
    "ipc",
    "platform",
    "domainname",
    "mac_address",
    "group_add",
    "oom_score_adj",
    "userns_mode",
    "isolation",
    "runtime",
    "storage_opt",
    "annotations",
];

/// The target path of a `volumes`/`secrets`/`configs` item, for merging overrides.
pub(crate) fn item_target(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => {
            let parts: Vec<&str> = s.split(':').collect();
            Some(match parts.len() {
                1 => parts[0].to_string(),
                _ => parts[1].to_string(),
            })
        }
        Value::Mapping(m) => m
            .get("target")
            .or_else(|| m.get("source"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// A scalar as compose reads it into a string (`8080`, `true`, `0.5`); `None` for null.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `environment`-like values: `[K=V, K]` or `{K: V, K: null}`.
pub(crate) fn kv(
    cx: &Cx,
    field: &str,
    v: &Value,
) -> Result<BTreeMap<String, Option<String>>, ComposeError> {
    let mut out = BTreeMap::new();
    match v {
        Value::Null => {}
        Value::Sequence(s) => {
            for (i, item) in s.iter().enumerate() {
                let t = scalar(item)
                    .ok_or_else(|| cx.err(&format!("{field}[{i}]"), "expected KEY=VALUE or KEY"))?;
                match t.split_once('=') {
                    Some((k, v)) => out.insert(k.to_string(), Some(v.to_string())),
                    None => out.insert(t, None),
                };
            }
        }
        Value::Mapping(m) => {
            for (k, val) in m {
                let k = key_str(k);
                let value = match val {
                    Value::Null => None,
                    other => Some(scalar(other).ok_or_else(|| {
                        cx.err(
                            &format!("{field}.{k}"),
                            "expected a string, number or boolean",
                        )
                    })?),
                };
                out.insert(k, value);
            }
        }
        _ => return Err(cx.err(field, "expected a list of KEY=VALUE or a mapping")),
    }
    Ok(out)
}

/// A string or a list of strings.
fn strings(cx: &Cx, field: &str, v: &Value) -> Result<Vec<String>, ComposeError> {
    match v {
        Value::Sequence(s) => s
            .iter()
            .enumerate()
            .map(|(i, x)| {
                scalar(x).ok_or_else(|| cx.err(&format!("{field}[{i}]"), "expected a string"))
            })
            .collect(),
        other => scalar(other)
            .map(|s| vec![s])
            .ok_or_else(|| cx.err(field, "expected a string or a list of strings")),
    }
}

/// Deserializes a compose value into a Rudder type whose fields match compose's.
fn typed<T: serde::de::DeserializeOwned>(
    cx: &Cx,
    field: &str,
    v: &Value,
) -> Result<T, ComposeError> {
    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        let f = if path == "." {
            field.to_string()
        } else {
            format!("{field}.{path}")
        };
        cx.err(&f, e.into_inner().to_string())
    })
}

fn duration(cx: &Cx, field: &str, v: &Value) -> Result<u64, ComposeError> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .filter(|s| *s >= 0.0)
            .map(|s| (s * 1000.0).round() as u64)
            .ok_or_else(|| cx.err(field, "not a duration")),
        other => {
            let s = scalar(other).unwrap_or_default();
            // Compose also takes microseconds (`us`): rounded up to a millisecond.
            if let Some(us) = s.strip_suffix("us").and_then(|n| n.parse::<u64>().ok()) {
                return Ok(us.div_ceil(1000));
            }
            crate::duration::parse(&s).map_err(|e| cx.err(field, e))
        }
    }
}

/// Converts the service `name`'s definition.
pub(crate) fn convert(cx: &mut Cx, name: &str, def: &Value) -> Result<ServiceSpec, ComposeError> {
    let base = format!("services.{name}");
    let Value::Mapping(def) = def else {
        return Err(cx.err(&base, "expected a mapping"));
    };
    let rname = cx.dns(&base, name)?;
    let image = match def.get("image").and_then(scalar) {
        Some(i) => i,
        // Built by `rctl stack deploy`, stored under this name.
        None if def.contains_key("build") => format!("{rname}:latest"),
        None => return Err(cx.err(&base, "`image:` is required")),
    };
    let mut seed = Mapping::new();
    seed.insert("name".into(), rname.clone().into());
    seed.insert("image".into(), image.clone().into());
    let mut spec: ServiceSpec =
        serde_yaml::from_value(Value::Mapping(seed)).map_err(|e| cx.err(&base, e.to_string()))?;
    spec.labels = cx.labels();
    spec.labels.insert(SERVICE_LABEL.into(), name.to_string());
    let alias = super::dns_name(name);
    if alias != name {
        cx.warn(
            &base,
            format!("reachable as {alias:?} on the stack's networks (DNS names have no '_', '.' or capitals)"),
        );
    }
    let f = |k: &str| format!("{base}.{k}");
    // deploy first: the mode decides how anonymous volumes are made.
    let mut restart_from: Option<RestartPolicy> = None;
    if let Some(d) = def.get("deploy") {
        deploy(cx, &f("deploy"), d, &mut spec)?;
        if let Some(rp) = d.get("restart_policy") {
            restart_from = Some(typed(cx, &f("deploy.restart_policy"), rp)?);
        }
    }
    let mut networks_given = false;
    let mut env_file_vars: BTreeMap<String, String> = BTreeMap::new();
    let mut environment: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in def {
        let k = key_str(k);
        let field = f(&k);
        match k.as_str() {
            "image" | "deploy" => {}
            "build" => {
                let b = super::build::parse(cx, &field, v, &rname, name, &image)?;
                cx.builds.push(b);
            }
            "command" | "entrypoint" => {
                let words = match v {
                    Value::Null => continue,
                    Value::Sequence(_) => strings(cx, &field, v)?,
                    other => {
                        let s = scalar(other).unwrap_or_default();
                        interpolate::shell_split(&s).map_err(|e| cx.err(&field, e))?
                    }
                };
                if k == "command" {
                    spec.command = Some(words);
                } else {
                    spec.entrypoint = Some(words);
                }
            }
            "environment" => {
                for (ek, ev) in kv(cx, &field, v)? {
                    // `KEY` alone takes the value from the environment; unset: left out.
                    if let Some(val) = ev.or_else(|| cx.vars.get(&ek).cloned()) {
                        environment.insert(ek, val);
                    }
                }
            }
            "env_file" => {
                let items: Vec<(String, bool)> = match v {
                    Value::Sequence(s) => s
                        .iter()
                        .map(|i| match i {
                            Value::Mapping(m) => (
                                m.get("path").and_then(scalar).unwrap_or_default(),
                                m.get("required").is_none_or(|r| truthy(Some(r))),
                            ),
                            other => (scalar(other).unwrap_or_default(), true),
                        })
                        .collect(),
                    other => vec![(scalar(other).unwrap_or_default(), true)],
                };
                for (path, required) in items {
                    match cx.files.read(&path) {
                        Ok(text) => {
                            if text.len() > super::MAX_FILE {
                                return Err(cx.err(&field, format!("{path}: over 1 MiB")));
                            }
                            for (ek, ev) in interpolate::parse_env_file(&text)
                                .map_err(|e| cx.err(&field, format!("{path}: {e}")))?
                            {
                                if let Some(val) = ev.or_else(|| cx.vars.get(&ek).cloned()) {
                                    env_file_vars.insert(ek, val);
                                }
                            }
                        }
                        Err(e) if required => return Err(cx.err(&field, e)),
                        Err(_) => {}
                    }
                }
            }
            "ports" => {
                for (i, p) in v.as_sequence().into_iter().flatten().enumerate() {
                    spec.ports.extend(ports(cx, &format!("{field}[{i}]"), p)?);
                }
            }
            "expose" => cx.warn(
                &field,
                "informational only: every port is reachable on the stack's networks",
            ),
            "volumes" => {
                for (i, item) in v.as_sequence().into_iter().flatten().enumerate() {
                    let m = volume(cx, &format!("{field}[{i}]"), item, name, i, spec.mode)?;
                    spec.mounts.push(m);
                }
            }
            "tmpfs" => {
                for (i, t) in strings(cx, &field, v)?.into_iter().enumerate() {
                    let (target, opts) = t.split_once(':').unwrap_or((&t, ""));
                    let mut m = Mount {
                        typ: MountType::Tmpfs,
                        source: String::new(),
                        target: target.to_string(),
                        readonly: false,
                        tmpfs_size: 0,
                        nocopy: false,
                    };
                    for o in opts.split(',').filter(|o| !o.is_empty()) {
                        match o.split_once('=') {
                            Some(("size", s)) => {
                                m.tmpfs_size = crate::spec::parse_bytes(s)
                                    .map_err(|e| cx.err(&format!("{field}[{i}]"), e))?
                            }
                            _ => cx.warn(
                                &format!("{field}[{i}]"),
                                format!("option {o:?} not supported; ignored"),
                            ),
                        }
                    }
                    spec.mounts.push(m);
                }
            }
            "networks" => {
                networks_given = true;
                service_networks(cx, &field, v, &mut spec)?;
            }
            "network_mode" => match v.as_str().unwrap_or_default() {
                "host" => spec.network_mode = NetworkMode::Host,
                "none" => spec.network_mode = NetworkMode::None,
                "bridge" => spec.network_mode = NetworkMode::Bridge,
                other => match other.strip_prefix("service:") {
                    Some(s) => spec.network_mode = NetworkMode::Container(cx.dns(&field, s)?),
                    None => {
                        return Err(cx.err(
                            &field,
                            format!("{other:?}: expected host, none, bridge or service:NAME"),
                        ))
                    }
                },
            },
            "healthcheck" => spec.healthcheck = healthcheck(cx, &field, v)?,
            "restart" => {
                let s = scalar(v).unwrap_or_default();
                let mut p = RestartPolicy::default();
                match s.as_str() {
                    "no" | "false" => p.condition = RestartCondition::None,
                    "always" | "unless-stopped" => p.condition = RestartCondition::Any,
                    other => match other.strip_prefix("on-failure") {
                        Some(rest) => {
                            p.condition = RestartCondition::OnFailure;
                            if let Some(n) = rest.strip_prefix(':') {
                                p.max_attempts = n.parse().map_err(|_| {
                                    cx.err(&field, format!("{other:?}: expected on-failure:N"))
                                })?;
                            }
                        }
                        None => {
                            return Err(cx.err(
                                &field,
                                format!(
                                "{other:?}: expected no, always, on-failure[:N] or unless-stopped"
                            ),
                            ))
                        }
                    },
                }
                match &restart_from {
                    Some(d)
                        if d.condition != p.condition
                            || (p.max_attempts != 0 && p.max_attempts != d.max_attempts) =>
                    {
                        cx.warn(&field, "conflicts with deploy.restart_policy, which wins")
                    }
                    Some(_) => {}
                    None => spec.restart = p,
                }
            }
            "secrets" | "configs" => {
                let secret = k == "secrets";
                for (i, item) in v.as_sequence().into_iter().flatten().enumerate() {
                    let r = file_ref(cx, &format!("{field}[{i}]"), item, secret)?;
                    if secret {
                        spec.secrets.push(r);
                    } else {
                        spec.configs.push(r);
                    }
                }
            }
            "user" => spec.user = scalar(v),
            "working_dir" => spec.workdir = scalar(v),
            "hostname" => spec.hostname = scalar(v),
            "stop_grace_period" => spec.stop_grace_period = duration(cx, &field, v)?.div_ceil(1000),
            "labels" => {
                for (lk, lv) in kv(cx, &field, v)? {
                    spec.labels.insert(lk, lv.unwrap_or_default());
                }
            }
            "logging" => logging(cx, &field, v, &mut spec)?,
            "security_opt" => {
                for o in strings(cx, &field, v)? {
                    match o.as_str() {
                        "seccomp=unconfined" | "seccomp:unconfined" => {
                            spec.security_opt.push("seccomp=unconfined".into())
                        }
                        other => cx.warn(&field, format!("{other:?} not supported; ignored")),
                    }
                }
            }
            "scale" => {
                if def.get("deploy").and_then(|d| d.get("replicas")).is_none() {
                    spec.replicas = v
                        .as_u64()
                        .ok_or_else(|| cx.err(&field, "expected a number"))?;
                }
            }
            "mem_limit" | "mem_reservation" | "memswap_limit" | "cpus" | "pids_limit"
            | "cpu_shares" | "cpu_quota" | "cpuset" => {
                let s = scalar(v).unwrap_or_default();
                match k.as_str() {
                    "mem_limit" if spec.resources.limits.memory == 0 => {
                        spec.resources.limits.memory =
                            crate::spec::parse_bytes(&s).map_err(|e| cx.err(&field, e))?
                    }
                    "mem_reservation" if spec.resources.reservations.memory == 0 => {
                        spec.resources.reservations.memory =
                            crate::spec::parse_bytes(&s).map_err(|e| cx.err(&field, e))?
                    }
                    "cpus" if spec.resources.limits.cpus == 0 => {
                        spec.resources.limits.cpus =
                            crate::spec::parse_cpus(&s).map_err(|e| cx.err(&field, e))?
                    }
                    "pids_limit" if spec.resources.limits.pids == 0 => {
                        spec.resources.limits.pids =
                            s.parse().map_err(|_| cx.err(&field, "expected a number"))?
                    }
                    "mem_limit" | "mem_reservation" | "cpus" | "pids_limit" => {
                        cx.warn(&field, "deploy.resources sets it too, and wins")
                    }
                    _ => cx.warn(
                        &field,
                        "not supported by Rudder (use deploy.resources); ignored",
                    ),
                }
            }
            "stop_signal" | "init" | "cap_add" | "cap_drop" | "sysctls" | "read_only"
            | "ulimits" | "extra_hosts" | "dns" | "dns_search" | "dns_opt" | "shm_size"
            | "privileged" => runtime_option(cx, &field, k.as_str(), v, &mut spec)?,
            "depends_on" => {
                let deps = super::depends::parse(cx, &field, v)?;
                cx.depends.insert(name.to_string(), deps);
            }
            k if CLUSTER_MEANINGLESS.contains(&k) => {
                cx.warn(&field, "has no meaning in a cluster; ignored")
            }
            k if NOT_YET.contains(&k) => cx.warn(&field, "not supported by Rudder yet; ignored"),
            _ => cx.warn(&field, "not supported by Rudder; ignored"),
        }
    }
    // env_file first, `environment` over it (compose's precedence).
    env_file_vars.extend(environment);
    spec.env = env_file_vars;
    if !networks_given
        && !matches!(
            spec.network_mode,
            NetworkMode::Host | NetworkMode::None | NetworkMode::Container(_)
        )
    {
        // The stack's `default` network, unless the file declares (or renames) it.
        let net = match cx.networks.get("default") {
            Some(n) => n.clone(),
            None => {
                cx.default_used = true;
                format!("{}-default", cx.stack)
            }
        };
        spec.networks.push(net);
    }
    if !spec.networks.is_empty() && !spec.aliases.contains(&alias) {
        spec.aliases.insert(0, alias);
    }
    // The runtime options' fields are named as compose names them: point at the key itself.
    crate::runtime_options::validate(&spec)
        .map_err(|e| cx.err(&format!("{base}.{}", e.field), e.message))?;
    Ok(spec)
}

/// The service's container runtime options (`crate::runtime_options`), in compose's forms.
fn runtime_option(
    cx: &Cx,
    field: &str,
    key: &str,
    v: &Value,
    spec: &mut ServiceSpec,
) -> Result<(), ComposeError> {
    let flag = |v: &Value| {
        v.as_bool()
            .ok_or_else(|| cx.err(field, "expected true or false"))
    };
    match key {
        "stop_signal" => {
            spec.stop_signal =
                Some(scalar(v).ok_or_else(|| cx.err(field, "expected a signal name"))?)
        }
        "init" => spec.init = flag(v)?,
        "read_only" => spec.read_only = flag(v)?,
        "privileged" => spec.privileged = flag(v)?,
        "cap_add" => spec.cap_add = strings(cx, field, v)?,
        "cap_drop" => spec.cap_drop = strings(cx, field, v)?,
        "dns" => spec.dns = strings(cx, field, v)?,
        "dns_search" => spec.dns_search = strings(cx, field, v)?,
        "dns_opt" => spec.dns_opt = strings(cx, field, v)?,
        "sysctls" => {
            for (k, val) in kv(cx, field, v)? {
                let val = val.ok_or_else(|| cx.err(&format!("{field}.{k}"), "expected a value"))?;
                spec.sysctls.insert(k, val);
            }
        }
        "ulimits" => spec.ulimits = typed(cx, field, v)?,
        "shm_size" => {
            let s = scalar(v).ok_or_else(|| cx.err(field, "expected a size such as 64M"))?;
            spec.shm_size = crate::spec::parse_bytes(&s).map_err(|e| cx.err(field, e))?;
        }
        "extra_hosts" => {
            // `["HOST:IP"]`, `["HOST=IP"]` (compose 2.x) or `{HOST: IP}`; stored as HOST:IP.
            spec.extra_hosts = match v {
                Value::Mapping(m) => m
                    .iter()
                    .map(|(h, ip)| format!("{}:{}", key_str(h), scalar(ip).unwrap_or_default()))
                    .collect(),
                other => strings(cx, field, other)?
                    .into_iter()
                    .map(|e| match e.split_once('=') {
                        Some((h, ip)) => format!("{h}:{ip}"),
                        None => e,
                    })
                    .collect(),
            };
        }
        _ => {}
    }
    Ok(())
}

fn deploy(cx: &mut Cx, field: &str, v: &Value, spec: &mut ServiceSpec) -> Result<(), ComposeError> {
    let Value::Mapping(m) = v else {
        return Err(cx.err(field, "expected a mapping"));
    };
    for (k, val) in m {
        let k = key_str(k);
        let f = format!("{field}.{k}");
        match k.as_str() {
            "mode" => spec.mode = typed::<ServiceMode>(cx, &f, val)?,
            "replicas" => {
                spec.replicas = val
                    .as_u64()
                    .ok_or_else(|| cx.err(&f, "expected a number"))?
            }
            "resources" => {
                let mut r = val.clone();
                if let Value::Mapping(rm) = &mut r {
                    for side in ["limits", "reservations"] {
                        if let Some(Value::Mapping(s)) = rm.get_mut(side) {
                            for extra in ["devices", "generic_resources"] {
                                if s.remove(extra).is_some() {
                                    cx.warn(
                                        &format!("{f}.{side}.{extra}"),
                                        "not supported by Rudder yet; ignored",
                                    );
                                }
                            }
                        }
                    }
                }
                spec.resources = typed(cx, &f, &r)?;
            }
            "restart_policy" => spec.restart = typed(cx, &f, val)?,
            "placement" => spec.placement = typed(cx, &f, val)?,
            "update_config" => spec.update_config = typed(cx, &f, val)?,
            "rollback_config" => spec.rollback_config = typed(cx, &f, val)?,
            "endpoint_mode" => spec.endpoint_mode = typed(cx, &f, val)?,
            "labels" => {
                for (lk, lv) in kv(cx, &f, val)? {
                    spec.labels.insert(lk, lv.unwrap_or_default());
                }
            }
            _ => cx.warn(&f, "not supported by Rudder; ignored"),
        }
    }
    if spec.mode == ServiceMode::ReplicatedJob {
        // Swarm's stack deploy: `replicas` tasks to complete, as many at a time.
        if m.contains_key("replicas") {
            spec.completions = Some(spec.replicas);
            spec.parallelism = Some(spec.replicas);
        }
        spec.replicas = 1;
        if spec.restart == RestartPolicy::default() {
            spec.restart.condition = RestartCondition::OnFailure;
        }
    }
    if spec.mode.is_global() && m.contains_key("replicas") {
        cx.warn(
            &format!("{field}.replicas"),
            "a global service runs one task per node; ignored",
        );
    }
    if spec.mode.is_global() {
        spec.replicas = 1;
    }
    if spec.mode == ServiceMode::GlobalJob && spec.restart == RestartPolicy::default() {
        spec.restart.condition = RestartCondition::OnFailure;
    }
    Ok(())
}

fn port_range(cx: &Cx, field: &str, s: &str) -> Result<(u16, u16), ComposeError> {
    let parse = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| cx.err(field, format!("{p:?} is not a port")))
    };
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (parse(a)?, parse(b)?);
            if b < a {
                return Err(cx.err(field, format!("{s:?}: the range ends before it starts")));
            }
            Ok((a, b))
        }
        None => {
            let p = parse(s)?;
            Ok((p, p))
        }
    }
}

fn ports(cx: &mut Cx, field: &str, v: &Value) -> Result<Vec<PortConfig>, ComposeError> {
    let port = |target, published, protocol, mode| PortConfig {
        target,
        published,
        protocol,
        mode,
    };
    if let Value::Mapping(m) = v {
        let mut protocol = Protocol::Tcp;
        let mut mode = PortMode::Ingress;
        let mut target = None;
        let mut published = None;
        for (k, val) in m {
            let k = key_str(k);
            let f = format!("{field}.{k}");
            let s = scalar(val).unwrap_or_default();
            match k.as_str() {
                "target" => target = Some(port_range(cx, &f, &s)?),
                "published" => published = Some(port_range(cx, &f, &s)?),
                "protocol" => protocol = typed(cx, &f, val)?,
                "mode" => mode = typed(cx, &f, val)?,
                "host_ip" => cx.warn(&f, "Rudder publishes on every address of the node; ignored"),
                "name" | "app_protocol" => {}
                _ => cx.warn(&f, "not supported by Rudder; ignored"),
            }
        }
        let (t, t2) = target.ok_or_else(|| cx.err(field, "`target` is required"))?;
        return expand(cx, field, (t, t2), published, protocol, mode, &port);
    }
    let s = scalar(v).ok_or_else(|| cx.err(field, "expected a port such as \"8080:80\""))?;
    let (body, protocol) = match s.rsplit_once('/') {
        Some((b, "tcp")) => (b.to_string(), Protocol::Tcp),
        Some((b, "udp")) => (b.to_string(), Protocol::Udp),
        Some((_, p)) => {
            return Err(cx.err(
                field,
                format!("protocol {p:?}: Rudder publishes tcp and udp"),
            ))
        }
        None => (s.clone(), Protocol::Tcp),
    };
    // [HOST_IP:][PUBLISHED:]TARGET, HOST_IP possibly in brackets (IPv6).
    let (host_ip, rest) = if let Some(r) = body.strip_prefix('[') {
        let (ip, rest) = r
            .split_once("]:")
            .ok_or_else(|| cx.err(field, "unclosed [ in the host address"))?;
        (Some(ip.to_string()), rest.to_string())
    } else {
        let parts: Vec<&str> = body.split(':').collect();
        match parts.len() {
            3 => (
                Some(parts[0].to_string()),
                format!("{}:{}", parts[1], parts[2]),
            ),
            1 | 2 => (None, body.clone()),
            _ => {
                return Err(cx.err(
                    field,
                    format!("{s:?}: expected [HOST_IP:][PUBLISHED:]TARGET[/PROTOCOL]"),
                ))
            }
        }
    };
    if host_ip.is_some() {
        cx.warn(
            field,
            "Rudder publishes on every address of the node; the host address is ignored",
        );
    }
    let (published, target) = match rest.split_once(':') {
        Some((p, t)) if !p.is_empty() => {
            (Some(port_range(cx, field, p)?), port_range(cx, field, t)?)
        }
        Some((_, t)) => (None, port_range(cx, field, t)?),
        None => (None, port_range(cx, field, &rest)?),
    };
    expand(
        cx,
        field,
        target,
        published,
        protocol,
        PortMode::Ingress,
        &port,
    )
}

fn expand(
    cx: &mut Cx,
    field: &str,
    target: (u16, u16),
    published: Option<(u16, u16)>,
    protocol: Protocol,
    mode: PortMode,
    port: &dyn Fn(u16, Option<u16>, Protocol, PortMode) -> PortConfig,
) -> Result<Vec<PortConfig>, ComposeError> {
    let n = target.1 - target.0;
    match published {
        None => {
            cx.warn(field, "no published port: Rudder publishes it on the same port number (Docker would pick one)");
            Ok((target.0..=target.1)
                .map(|t| port(t, None, protocol, mode))
                .collect())
        }
        Some((p0, p1)) if p1 - p0 == n => Ok((0..=n)
            .map(|i| port(target.0 + i, Some(p0 + i), protocol, mode))
            .collect()),
        Some(_) => Err(cx.err(field, "the published and target ranges differ in length")),
    }
}

fn volume(
    cx: &mut Cx,
    field: &str,
    v: &Value,
    service: &str,
    index: usize,
    mode: ServiceMode,
) -> Result<Mount, ComposeError> {
    let mut m = Mount {
        typ: MountType::Volume,
        source: String::new(),
        target: String::new(),
        readonly: false,
        tmpfs_size: 0,
        nocopy: false,
    };
    match v {
        Value::String(s) => {
            let parts: Vec<&str> = s.split(':').collect();
            let (source, target, opts) = match parts.as_slice() {
                [t] => ("", *t, ""),
                [s, t] => (*s, *t, ""),
                [s, t, o] => (*s, *t, *o),
                _ => return Err(cx.err(field, format!("{s:?}: expected [SOURCE:]TARGET[:MODE]"))),
            };
            m.source = source.to_string();
            m.target = target.to_string();
            for o in opts.split(',').filter(|o| !o.is_empty()) {
                match o {
                    "ro" => m.readonly = true,
                    "rw" => {}
                    "nocopy" => m.nocopy = true,
                    other => cx.warn(field, format!("mode {other:?} not supported; ignored")),
                }
            }
            // Paths are binds (relative ones are refused below); anything else names a volume.
            if source.starts_with(['/', '.', '~']) {
                m.typ = MountType::Bind;
            }
        }
        Value::Mapping(map) => {
            for (k, val) in map {
                let k = key_str(k);
                let f = format!("{field}.{k}");
                match k.as_str() {
                    "type" => {
                        m.typ = match val.as_str() {
                            Some("volume") => MountType::Volume,
                            Some("bind") => MountType::Bind,
                            Some("tmpfs") => MountType::Tmpfs,
                            other => {
                                return Err(cx.err(
                                    &f,
                                    format!("{other:?}: Rudder mounts volume, bind and tmpfs"),
                                ))
                            }
                        }
                    }
                    "source" => m.source = scalar(val).unwrap_or_default(),
                    "target" => m.target = scalar(val).unwrap_or_default(),
                    "read_only" => m.readonly = truthy(Some(val)),
                    "volume" => {
                        for (vk, vv) in val.as_mapping().into_iter().flatten() {
                            match key_str(vk).as_str() {
                                "nocopy" => m.nocopy = truthy(Some(vv)),
                                other => cx.warn(
                                    &format!("{f}.{other}"),
                                    "not supported by Rudder; ignored",
                                ),
                            }
                        }
                    }
                    "tmpfs" => {
                        for (tk, tv) in val.as_mapping().into_iter().flatten() {
                            match key_str(tk).as_str() {
                                "size" => {
                                    m.tmpfs_size =
                                        crate::spec::parse_bytes(&scalar(tv).unwrap_or_default())
                                            .map_err(|e| cx.err(&format!("{f}.size"), e))?
                                }
                                other => cx.warn(
                                    &format!("{f}.{other}"),
                                    "not supported by Rudder; ignored",
                                ),
                            }
                        }
                    }
                    "consistency" => {}
                    _ => cx.warn(&f, "not supported by Rudder; ignored"),
                }
            }
        }
        _ => return Err(cx.err(field, "expected \"SOURCE:TARGET[:MODE]\" or a mapping")),
    }
    match m.typ {
        MountType::Bind if !m.source.starts_with('/') => {
            return Err(cx.err(
                field,
                format!(
                    "relative bind {:?}: a cluster has no project directory on its nodes; use a \
                     named volume, a config (`configs:`) for a single file, or an absolute host path",
                    m.source
                ),
            ))
        }
        MountType::Volume if m.source.is_empty() => {
            if mode != ServiceMode::Replicated {
                return Err(cx.err(
                    field,
                    "an anonymous volume needs a replicated service (one volume per slot): \
                     declare a named volume",
                ));
            }
            // One volume per replica slot (per-slot volumes), named after the service.
            m.source = format!("{}-{}-{index}-{{{{.Task.Slot}}}}", cx.stack, super::dns_name(service));
            cx.warn(field, format!("anonymous volume: each replica slot gets its own volume {:?}", m.source));
        }
        MountType::Volume => {
            let Some(n) = cx.volumes.get(&m.source) else {
                return Err(cx.err(
                    field,
                    format!("volume {:?} is not declared in the top-level `volumes:`", m.source),
                ));
            };
            m.source = n.clone();
        }
        _ => {}
    }
    Ok(m)
}

fn service_networks(
    cx: &mut Cx,
    field: &str,
    v: &Value,
    spec: &mut ServiceSpec,
) -> Result<(), ComposeError> {
    let entries: Vec<(String, Option<&Value>)> = match v {
        Value::Sequence(s) => s
            .iter()
            .map(|n| (scalar(n).unwrap_or_default(), None))
            .collect(),
        Value::Mapping(m) => m.iter().map(|(k, d)| (key_str(k), Some(d))).collect(),
        _ => return Err(cx.err(field, "expected a list or a mapping of networks")),
    };
    for (n, d) in entries {
        let f = format!("{field}.{n}");
        let rname = match cx.networks.get(&n) {
            Some(r) => r.clone(),
            None if n == "default" => {
                cx.default_used = true;
                format!("{}-default", cx.stack)
            }
            None => {
                return Err(cx.err(
                    &f,
                    format!("network {n:?} is not declared in the top-level `networks:`"),
                ))
            }
        };
        spec.networks.push(rname);
        for (k, val) in d.and_then(Value::as_mapping).into_iter().flatten() {
            let k = key_str(k);
            match k.as_str() {
                "aliases" => {
                    for a in strings(cx, &format!("{f}.aliases"), val)? {
                        let a = super::dns_name(&a);
                        if !spec.aliases.contains(&a) {
                            spec.aliases.push(a);
                        }
                    }
                }
                "priority" => {}
                _ => cx.warn(&format!("{f}.{k}"), "not supported by Rudder; ignored"),
            }
        }
    }
    Ok(())
}

fn healthcheck(cx: &mut Cx, field: &str, v: &Value) -> Result<Option<HealthCheck>, ComposeError> {
    let Value::Mapping(m) = v else {
        return Err(cx.err(field, "expected a mapping"));
    };
    if truthy(m.get("disable")) {
        return Ok(None);
    }
    let mut h = HealthCheck {
        exec: None,
        http: None,
        tcp: None,
        interval: 30_000,
        timeout: 30_000,
        retries: 3,
        start_period: 0,
    };
    for (k, val) in m {
        let k = key_str(k);
        let f = format!("{field}.{k}");
        match k.as_str() {
            "test" => {
                let words = match val {
                    Value::Sequence(_) => strings(cx, &f, val)?,
                    other => vec!["CMD-SHELL".into(), scalar(other).unwrap_or_default()],
                };
                match words.first().map(String::as_str) {
                    Some("NONE") => return Ok(None),
                    Some("CMD") if words.len() > 1 => h.exec = Some(words[1..].to_vec()),
                    Some("CMD-SHELL") if words.len() > 1 => {
                        h.exec = Some(vec!["/bin/sh".into(), "-c".into(), words[1..].join(" ")])
                    }
                    _ => return Err(cx.err(
                        &f,
                        "expected [\"CMD\", ...], [\"CMD-SHELL\", \"...\"], [\"NONE\"] or a string",
                    )),
                }
            }
            "interval" => h.interval = duration(cx, &f, val)?,
            "timeout" => h.timeout = duration(cx, &f, val)?,
            "start_period" => h.start_period = duration(cx, &f, val)?,
            "retries" => {
                h.retries = val
                    .as_u64()
                    .and_then(|r| u32::try_from(r).ok())
                    .ok_or_else(|| cx.err(&f, "expected a number"))?
            }
            "disable" => {}
            _ => cx.warn(&f, "not supported by Rudder yet; ignored"),
        }
    }
    if h.exec.is_none() {
        // Compose inherits the image's check when only timings are given; Rudder has no
        // image checks, so there is nothing to time.
        cx.warn(
            field,
            "no `test`: Rudder runs no image health check; ignored",
        );
        return Ok(None);
    }
    Ok(Some(h))
}

fn logging(
    cx: &mut Cx,
    field: &str,
    v: &Value,
    spec: &mut ServiceSpec,
) -> Result<(), ComposeError> {
    let Value::Mapping(m) = v else {
        return Err(cx.err(field, "expected a mapping"));
    };
    if let Some(d) = m.get("driver").and_then(Value::as_str) {
        if !matches!(d, "json-file" | "local") {
            cx.warn(
                &format!("{field}.driver"),
                format!("{d:?}: Rudder keeps json-file-like rotated logs; ignored"),
            );
        }
    }
    for (k, val) in m
        .get("options")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
    {
        let k = key_str(k);
        let f = format!("{field}.options.{k}");
        let s = scalar(val).unwrap_or_default();
        match k.as_str() {
            "max-size" => {
                spec.logging.max_size = crate::spec::parse_bytes(&s).map_err(|e| cx.err(&f, e))?
            }
            "max-file" => {
                spec.logging.max_file = s.parse().map_err(|_| cx.err(&f, "expected a number"))?
            }
            _ => cx.warn(&f, "not supported by Rudder; ignored"),
        }
    }
    Ok(())
}

fn file_ref(cx: &mut Cx, field: &str, v: &Value, secret: bool) -> Result<FileRef, ComposeError> {
    let names = if secret { &cx.secrets } else { &cx.configs };
    let what = if secret { "secrets" } else { "configs" };
    let mut map = match v {
        Value::Mapping(m) => m.clone(),
        other => {
            let mut m = Mapping::new();
            m.insert("source".into(), other.clone());
            m
        }
    };
    let source = map
        .get("source")
        .and_then(scalar)
        .ok_or_else(|| cx.err(field, "`source` is required"))?;
    let rname = names.get(&source).cloned().ok_or_else(|| {
        cx.err(
            field,
            format!("{source:?} is not declared in the top-level `{what}:`"),
        )
    })?;
    if !map.contains_key("target") {
        // Compose's default paths use the compose name, not the stack-prefixed one.
        let t = if secret {
            source.clone()
        } else {
            format!("/{source}")
        };
        map.insert("target".into(), t.into());
    }
    map.insert("source".into(), rname.into());
    typed(cx, field, &Value::Mapping(map))
}

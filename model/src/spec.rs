//! User-owned specs: what a user declares. The system never rewrites a spec; it derives tasks
//! from it, and each task carries a frozen copy of the spec it was made from. The same types serve YAML manifests, the API (as JSON inside protobuf envelopes) and
//! the replicated store, so a field added here is accepted everywhere at once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::node::Node;
use crate::update::UpdateConfig;
use crate::ValidationError;

/// A declared service: a container spec plus how many copies run and how they restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Unique name; also the DNS name later. `[a-z0-9][a-z0-9-]*`, at most 63 characters.
    pub name: String,
    /// Free-form labels, for the user.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Desired copies for replicated services. Defaults to 1.
    #[serde(default = "one")]
    pub replicas: u64,
    // Container fields sit flat in the service (as in compose files); see `ContainerSpec`.
    // (serde's `flatten` would lose line numbers and `deny_unknown_fields`, so no nesting.)
    /// Image reference in the cluster registry: `NAME[:TAG]` or `NAME@sha256:…`.
    pub image: String,
    /// Replaces the image's ENTRYPOINT when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's CMD when set (Docker semantics: args to the entrypoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Appended to `command` (or to the image's CMD when `command` is unset).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment, merged over the image's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The working directory; the image's when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// `user[:group]` inside the container, each a name (looked up in the container's
    /// /etc/passwd and /etc/group) or a number, as Docker's `--user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The container's hostname; the task id's first 12 characters when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `bridge` (the default) puts the container on the host's local bridge; `host` shares the
    /// host's network namespace; `none` gives it only loopback; `container:X` shares a task's.
    /// With `networks`, the task gets its own namespace on those networks instead of the
    /// bridge.
    #[serde(default)]
    pub network_mode: NetworkMode,
    /// Seconds between SIGTERM and SIGKILL when the task stops.
    #[serde(default = "default_grace")]
    pub stop_grace_period: u64,
    /// When and how a finished task is replaced.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// `replicated` (`replicas` copies) or `global` (one task per eligible node; `replicas` is
    /// ignored); `replicated-job` and `global-job` run tasks to completion (see `crate::job`).
    #[serde(default, skip_serializing_if = "ServiceMode::is_replicated")]
    pub mode: ServiceMode,
    /// `replicated-job` only: tasks that must exit 0 for the job to be complete (Swarm's
    /// `total_completions`); unset: `parallelism`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completions: Option<u64>,
    /// `replicated-job` only: tasks run at a time, at most (Swarm's `max_concurrent`); unset: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u64>,
    /// Jobs only: the cluster removes the job once it is complete or failed, after a grace
    /// for its client to read the result (`crate::job::AUTO_REMOVE_GRACE_MS`). `rctl run
    /// --rm` sets it and removes the job itself when done; this covers a client that died.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_remove: bool,
    /// Reservations decide placement; limits are enforced by the container's cgroups.
    #[serde(default, skip_serializing_if = "Resources::is_unset")]
    pub resources: Resources,
    /// Where tasks may run and how they are spread.
    #[serde(default, skip_serializing_if = "Placement::is_unset")]
    pub placement: Placement,
    /// Published ports: `mode: host` binds on the task's node, `mode: ingress` (the routing
    /// mesh, networked services only) on every node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::ports::PortConfig>,
    /// Overlay networks (by name) the tasks join; the task then gets its own network
    /// namespace with one interface per network. The first network carries published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Other names the service answers to on its networks (the embedded DNS: `ALIAS` and
    /// `tasks.ALIAS`, as its own name), like Docker's network aliases. Unique on each network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// How the service's name resolves on its networks: `vip` (default) or `dnsrr`.
    #[serde(default, skip_serializing_if = "crate::network::EndpointMode::is_vip")]
    pub endpoint_mode: crate::network::EndpointMode,
    /// Named volumes, host paths (bind) and tmpfs mounted into the containers
    /// (see `crate::volume`). A named volume not declared yet is declared by applying the
    /// service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::volume::Mount>,
    /// Secrets mounted as files (default `/run/secrets/NAME`, 0444, root), read-only, from a
    /// tmpfs: `source: NAME` follows the latest version, `source: NAME:V` pins version V.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::secret::FileRef>,
    /// Configs mounted as files (default `/NAME`), as secrets are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<crate::secret::FileRef>,
    /// Environment variables whose value is a secret's (`VAR: NAME` or `VAR: NAME:V`), so that
    /// `env` holds no password. Set over `env` and the image's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_from_secret: BTreeMap<String, String>,
    /// System-owned: the version each reference above resolves to (`secret:SOURCE` →
    /// version), written by the store whenever the spec is put or a referenced object gets a
    /// new version; anything a user writes here is replaced. A change rolls the tasks.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resolved_refs: BTreeMap<String, u64>,
    /// Rotation of each task's output log (Docker's json-file `max-size` and `max-file`).
    #[serde(default, skip_serializing_if = "Logging::is_default")]
    pub logging: Logging,
    /// Docker's `--security-opt`: only `seccomp=unconfined` (run without the default seccomp
    /// profile, which otherwise confines every task).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_opt: Vec<String>,
    /// The signal that asks the task to stop (`SIGINT`, `QUIT`, `15`), then SIGKILL after
    /// `stop_grace_period`; SIGTERM when unset. See `crate::runtime_options`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Runs a tiny init (tini) as PID 1 that reaps zombies and forwards signals to the command,
    /// like Docker's `--init`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub init: bool,
    /// Capabilities over Docker's default set (`NET_ADMIN`, `ALL`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Capabilities taken from the default set (`ALL`: all but those in `cap_add`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// Namespaced kernel parameters set in the container's own namespaces (`net.*`,
    /// `kernel.shm*`, ...); host-wide ones are refused.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "crate::runtime_options::sysctl_map"
    )]
    pub sysctls: BTreeMap<String, String>,
    /// The root filesystem is mounted read-only (volumes, tmpfs and /dev/shm stay writable).
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// Resource limits of the container's processes (`nofile`, `nproc`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ulimits: BTreeMap<String, crate::runtime_options::Ulimit>,
    /// `HOST:IP` lines added to the container's /etc/hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<String>,
    /// Nameservers for the container's resolv.conf. On overlay networks Rudder's own resolver
    /// stays first (service discovery); elsewhere they replace the host's.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "crate::runtime_options::one_or_many"
    )]
    pub dns: Vec<String>,
    /// Search domains for the container's resolv.conf (replace the host's).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "crate::runtime_options::one_or_many"
    )]
    pub dns_search: Vec<String>,
    /// Resolver options (`ndots:2`) added to the container's resolv.conf.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_opt: Vec<String>,
    /// Size of /dev/shm in bytes (`64M`); 0: the runtime's 64 MiB.
    #[serde(default, with = "bytes", skip_serializing_if = "is_zero")]
    pub shm_size: u64,
    /// Refused when true (see `crate::runtime_options::validate`); present so a manifest that
    /// says it gets a clear refusal rather than "unknown field".
    #[serde(default, skip_serializing_if = "is_false")]
    pub privileged: bool,
    /// Probe that gates `running` and replaces unhealthy tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<crate::health::HealthCheck>,
    /// How a change to the fields above rolls out over the running tasks.
    #[serde(default, skip_serializing_if = "UpdateConfig::is_default")]
    pub update_config: UpdateConfig,
    /// How a rollback (by hand, or as an update's failure action) rolls out.
    #[serde(default, skip_serializing_if = "UpdateConfig::is_default")]
    pub rollback_config: UpdateConfig,
    /// `auto`: spread the tasks again when a node joins or comes back (see
    /// `crate::rebalance`); `manual` (the default): only `rctl rebalance` does.
    #[serde(
        default,
        skip_serializing_if = "crate::rebalance::RebalanceMode::is_manual"
    )]
    pub rebalance: crate::rebalance::RebalanceMode,
    /// The replica count follows the tasks' cpu/memory usage (see `crate::autoscale`); `replicas`
    /// is then only the first count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<crate::autoscale::Autoscale>,
    /// Services whose condition (started, healthy, completed) this one's new tasks wait for
    /// (see `crate::depends`); not part of the task spec, so changing it restarts nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<crate::depends::Dependency>,
}

fn one() -> u64 {
    1
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_grace() -> u64 {
    10
}

/// Where a task's network namespace comes from. Written as a string in YAML and JSON:
/// `host`, `none`, `bridge` or `container:<service or task>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NetworkMode {
    /// The host's own network namespace.
    Host,
    /// Loopback only.
    None,
    /// Own namespace on the host's local bridge (`rdr0`): an address from the host's bridge
    /// subnet, outbound NAT, and host-mode published ports mapped to container ports. The
    /// default, as in Docker; a task on `networks` gets its namespace on those instead.
    #[default]
    Bridge,
    /// Share the namespace of a running task of this service (or of this task: a name as
    /// `rctl ps` shows it), like a pod's sidecar: the task is placed on that task's node.
    Container(String),
}

impl NetworkMode {
    /// The service whose task's namespace is shared, for `container:` (a task name
    /// `SERVICE.SLOT.ID` names its service first).
    pub fn shared_service(&self) -> Option<&str> {
        match self {
            NetworkMode::Container(t) => t.split('.').next(),
            _ => None,
        }
    }
}

impl Serialize for NetworkMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            NetworkMode::Host => s.serialize_str("host"),
            NetworkMode::None => s.serialize_str("none"),
            NetworkMode::Bridge => s.serialize_str("bridge"),
            NetworkMode::Container(t) => s.serialize_str(&format!("container:{t}")),
        }
    }
}

impl<'de> Deserialize<'de> for NetworkMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor (rather than parsing a String afterwards) keeps the YAML position.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = NetworkMode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("host, bridge, none or container:<service or task>")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NetworkMode, E> {
                match v {
                    "host" => Ok(NetworkMode::Host),
                    "none" => Ok(NetworkMode::None),
                    "bridge" => Ok(NetworkMode::Bridge),
                    other => match other.strip_prefix("container:") {
                        Some(t) if !t.is_empty() && !t.contains(char::is_whitespace) => {
                            Ok(NetworkMode::Container(t.to_string()))
                        }
                        _ => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                    },
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// When a finished task's slot gets a new task (Swarm's semantics, with exponential backoff).
/// Durations are milliseconds; YAML takes a number of seconds (`delay: 5`, as before durations
/// were accepted) or a string (`delay: 500ms`, `window: 2m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// Which endings are followed by a replacement.
    #[serde(default)]
    pub condition: RestartCondition,
    /// Wait after a task ends before its replacement starts, for the first of a run of crashes.
    /// The n-th consecutive crash of a slot waits `delay * 2^(n-1)`, capped at `max_delay`, so a
    /// crash loop backs off instead of hammering the node. (A crash is a run of the current
    /// spec that ended on its own within `CRASH_RUN_MS` of starting, or never started; a longer
    /// run ends the streak, so a task that serves for a while and then fails waits `delay`.)
    #[serde(default = "default_delay", with = "crate::duration")]
    pub delay: u64,
    /// Ceiling of the backoff.
    #[serde(
        default = "default_max_delay",
        with = "crate::duration",
        skip_serializing_if = "is_default_max_delay"
    )]
    pub max_delay: u64,
    /// Restarts allowed before the slot gives up; 0 means unlimited. With a `window`, only the
    /// runs that ended within `window` before the latest one count.
    #[serde(default)]
    pub max_attempts: u64,
    /// Span over which `max_attempts` is counted; 0 means the slot's whole history (of the
    /// current spec).
    #[serde(default, with = "crate::duration", skip_serializing_if = "is_zero")]
    pub window: u64,
}

/// A run shorter than this (from `running` to its end) counts as a crash for the backoff.
pub const CRASH_RUN_MS: u64 = 10_000;

fn default_delay() -> u64 {
    5_000
}

fn default_max_delay() -> u64 {
    60_000
}

// Fields added later are not written at their defaults, so stored specs stay as they were.
fn is_default_max_delay(ms: &u64) -> bool {
    *ms == default_max_delay()
}

/// Upper bound of `restart.max_attempts`: a slot keeps that many finished tasks to count them.
pub const MAX_RESTART_ATTEMPTS: u64 = 100;

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            condition: RestartCondition::Any,
            delay: default_delay(),
            max_delay: default_max_delay(),
            max_attempts: 0,
            window: 0,
        }
    }
}

impl RestartPolicy {
    /// The wait before the `n`-th consecutive restart (1-based): `delay * 2^(n-1)`, at most
    /// `max_delay` (but never less than `delay`, should `max_delay` be set below it).
    pub fn backoff(&self, n: u32) -> u64 {
        let factor = 1u64.checked_shl(n.saturating_sub(1)).unwrap_or(u64::MAX);
        self.delay
            .saturating_mul(factor)
            .min(self.max_delay.max(self.delay))
    }
}

/// Which task endings are followed by a replacement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    /// Never: a finished task stays finished.
    None,
    /// Only when it failed (exited non-zero, or could not start).
    OnFailure,
    /// Always, the default (a service is meant to keep running).
    #[default]
    Any,
}

/// How many tasks a service has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceMode {
    /// `replicas` tasks, the default.
    #[default]
    Replicated,
    /// One task per node that passes the filters, following nodes as they join and leave.
    Global,
    /// Tasks run to completion, `parallelism` at a time, until `completions` exited 0.
    ReplicatedJob,
    /// One task per eligible node, run once to completion on each (nodes that join get one).
    GlobalJob,
}

impl ServiceMode {
    fn is_replicated(&self) -> bool {
        *self == ServiceMode::Replicated
    }

    /// Whether tasks run to completion rather than keep running.
    pub fn is_job(self) -> bool {
        matches!(self, ServiceMode::ReplicatedJob | ServiceMode::GlobalJob)
    }

    /// Whether tasks are one per eligible node (`target_node`) rather than slots.
    pub fn is_global(self) -> bool {
        matches!(self, ServiceMode::Global | ServiceMode::GlobalJob)
    }
}

/// Resource reservations and limits. Zero means "not set" everywhere.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// What the scheduler sets aside on a node for each task.
    #[serde(default)]
    pub reservations: Reservations,
    /// What each task may use at most (cgroup limits).
    #[serde(default)]
    pub limits: Limits,
}

impl Resources {
    fn is_unset(&self) -> bool {
        *self == Resources::default()
    }
}

/// What the scheduler sets aside on a node for each task: a task is placed only where the node's
/// capacity minus the reservations of its active tasks covers these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservations {
    /// Millicpus. YAML/JSON: a decimal number of cpus (`0.5`), or a string (`"0.5"`, `"500m"`).
    #[serde(default, with = "cpus", skip_serializing_if = "is_zero")]
    pub cpus: u64,
    /// Bytes. YAML/JSON: an integer, or a string with a suffix K, M, G, T — powers of 1024, as
    /// in Docker and compose files (Ki, Mi, Gi, Ti mean the same), e.g. `"256M"`.
    #[serde(default, with = "bytes", skip_serializing_if = "is_zero")]
    pub memory: u64,
}

/// Hard limits enforced by the container's cgroups (not used for placement).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Millicpus, written like `reservations.cpus`; becomes the cgroup cpu quota.
    #[serde(default, with = "cpus", skip_serializing_if = "is_zero")]
    pub cpus: u64,
    /// Bytes, written like `reservations.memory`; exceeding it gets the task OOM-killed.
    #[serde(default, with = "bytes", skip_serializing_if = "is_zero")]
    pub memory: u64,
    /// Maximum number of processes in the container.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pids: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Placement: hard constraints on nodes, soft spread preferences, a per-node cap and the score.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Every constraint must hold on a node for a task to be placed there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// Spread tasks evenly over the values of a node label first (in order: the first preference
    /// splits, the next splits each branch), then apply the strategy inside a branch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferences: Vec<Preference>,
    /// At most this many active tasks of the service on one node; 0 means no limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_replicas_per_node: u64,
    /// How nodes that pass the filters are scored.
    #[serde(default, skip_serializing_if = "Strategy::is_spread")]
    pub strategy: Strategy,
}

impl Placement {
    fn is_unset(&self) -> bool {
        *self == Placement::default()
    }
}

/// A placement preference: spread tasks evenly over a node label's values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preference {
    /// `node.labels.<name>`.
    pub spread: String,
}

impl Preference {
    /// The label name the preference spreads over (validated to exist).
    pub fn label(&self) -> &str {
        self.spread.strip_prefix("node.labels.").unwrap_or("")
    }
}

/// How the scheduler scores the nodes that pass the filters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Fewest tasks of this service, then fewest tasks overall.
    #[default]
    Spread,
    /// The node with the most reserved already (that still fits), keeping others free.
    Binpack,
}

impl Strategy {
    fn is_spread(&self) -> bool {
        *self == Strategy::Spread
    }
}

/// A placement constraint such as `node.labels.zone==a`, parsed when the spec is read, so a bad
/// one is refused with its field (`placement.constraints[i]`) and never reaches the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    /// What the constraint looks at.
    pub key: ConstraintKey,
    /// Equal or not equal.
    pub op: ConstraintOp,
    /// The value compared with.
    pub value: String,
}

/// The node attribute a constraint compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConstraintKey {
    /// `node.id`.
    NodeId,
    /// `node.hostname`.
    Hostname,
    /// `worker` or `manager`.
    Role,
    /// `node.labels.<name>`: the operator's labels.
    Label(String),
    /// `engine.labels.<name>`: the host's own labels (`[labels]` in its rudder.toml), as in
    /// Swarm. A host sets them itself, so constraints that must hold against a compromised
    /// host use `node.labels`.
    HostLabel(String),
}

/// A constraint's comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstraintOp {
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
}

impl Constraint {
    /// Whether `node` satisfies the constraint. A missing label never equals a value.
    pub fn matches(&self, node: &Node) -> bool {
        let actual = match &self.key {
            ConstraintKey::NodeId => Some(node.id.as_str()),
            ConstraintKey::Hostname => Some(node.hostname.as_str()),
            ConstraintKey::Role => Some(node.role.as_str()),
            ConstraintKey::Label(k) => node.labels.get(k).map(String::as_str),
            ConstraintKey::HostLabel(k) => node.host_labels.get(k).map(String::as_str),
        };
        let equal = actual == Some(self.value.as_str());
        match self.op {
            ConstraintOp::Eq => equal,
            ConstraintOp::Ne => !equal,
        }
    }
}

impl std::str::FromStr for Constraint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (at, op) = match (s.find("=="), s.find("!=")) {
            (Some(a), Some(b)) if b < a => (b, ConstraintOp::Ne),
            (Some(a), _) => (a, ConstraintOp::Eq),
            (None, Some(b)) => (b, ConstraintOp::Ne),
            (None, None) => {
                return Err(format!(
                    "{s:?}: expected KEY==VALUE or KEY!=VALUE (e.g. node.labels.zone==a)"
                ))
            }
        };
        let key = s[..at].trim();
        let value = s[at + 2..].trim();
        if value.is_empty() || value.contains("==") || value.contains("!=") {
            return Err(format!(
                "{s:?}: expected one non-empty value after the operator"
            ));
        }
        let key = match key {
            "node.id" => ConstraintKey::NodeId,
            "node.hostname" => ConstraintKey::Hostname,
            "node.role" => {
                if value != "worker" && value != "manager" {
                    return Err(format!("{s:?}: node.role is worker or manager"));
                }
                ConstraintKey::Role
            }
            k => match (
                k.strip_prefix("node.labels."),
                k.strip_prefix("engine.labels."),
            ) {
                (Some(label), _) if !label.is_empty() => ConstraintKey::Label(label.to_string()),
                (_, Some(label)) if !label.is_empty() => {
                    ConstraintKey::HostLabel(label.to_string())
                }
                _ => {
                    return Err(format!(
                        "{s:?}: unknown key {k:?} (expected node.id, node.hostname, node.role, \
                         node.labels.<name> or engine.labels.<name>)"
                    ))
                }
            },
        };
        Ok(Constraint {
            key,
            op,
            value: value.to_string(),
        })
    }
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            ConstraintKey::NodeId => f.write_str("node.id")?,
            ConstraintKey::Hostname => f.write_str("node.hostname")?,
            ConstraintKey::Role => f.write_str("node.role")?,
            ConstraintKey::Label(k) => write!(f, "node.labels.{k}")?,
            ConstraintKey::HostLabel(k) => write!(f, "engine.labels.{k}")?,
        }
        let op = match self.op {
            ConstraintOp::Eq => "==",
            ConstraintOp::Ne => "!=",
        };
        write!(f, "{op}{}", self.value)
    }
}

impl Serialize for Constraint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Constraint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Parsing inside the visitor lets the YAML parser locate the error at the string itself.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Constraint;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a constraint such as \"node.labels.zone==a\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Constraint, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// `cpus` fields: millicpus inside, decimal cpus outside.
mod cpus {
    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(millis: &u64, s: S) -> Result<S::Ok, S::Error> {
        if millis.is_multiple_of(1000) {
            s.serialize_u64(millis / 1000)
        } else {
            s.serialize_f64(*millis as f64 / 1000.0)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(CpusVisitor)
    }

    /// Parses `0.5`, `2` or `500m` into millicpus.
    pub fn parse(s: &str) -> Result<u64, String> {
        let s = s.trim();
        if let Some(m) = s.strip_suffix('m') {
            return m
                .parse::<u64>()
                .map_err(|_| format!("{s:?} is not a number of millicpus"));
        }
        let f: f64 = s
            .parse()
            .map_err(|_| format!("{s:?} is not a number of cpus (e.g. 0.5)"))?;
        from_f64(f)
    }

    fn from_f64(f: f64) -> Result<u64, String> {
        if !f.is_finite() || !(0.0..=1_000_000.0).contains(&f) {
            return Err(format!("{f} is not a number of cpus between 0 and 1000000"));
        }
        Ok((f * 1000.0).round() as u64)
    }

    struct CpusVisitor;

    impl Visitor<'_> for CpusVisitor {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number of cpus such as 0.5, or a string such as \"500m\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            from_f64(v as f64).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            from_f64(v as f64).map_err(E::custom)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            from_f64(v).map_err(E::custom)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse(v).map_err(E::custom)
        }
    }
}

/// Memory fields: bytes inside, an integer or a suffixed string outside.
pub(crate) mod bytes {
    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(BytesVisitor)
    }

    /// Parses `1073741824`, `512Mi`, `1.5G`, `4GiB` into bytes.
    pub fn parse(s: &str) -> Result<u64, String> {
        let t = s.trim();
        let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" => 1,
            // Docker and compose read `256M` as MiB; `Mi` is accepted for Kubernetes habits.
            "k" | "ki" => 1 << 10,
            "m" | "mi" => 1 << 20,
            "g" | "gi" => 1 << 30,
            "t" | "ti" => 1 << 40,
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?} (use bytes, or K, M, G, T, Ki, Mi, Gi, Ti)"
                ))
            }
        };
        let bad = || format!("{s:?} is not an amount of memory (e.g. 512Mi, 2G, 1048576)");
        if num.is_empty() {
            return Err(bad());
        }
        if let Ok(n) = num.parse::<u64>() {
            return n.checked_mul(mult).ok_or_else(bad);
        }
        let f: f64 = num.parse().map_err(|_| bad())?;
        let v = f * mult as f64;
        if !v.is_finite() || v >= u64::MAX as f64 {
            return Err(bad());
        }
        Ok(v.round() as u64)
    }

    struct BytesVisitor;

    impl Visitor<'_> for BytesVisitor {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes as an integer, or a string such as \"512Mi\" or \"2G\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom("must not be negative"))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            if v >= 0.0 && v.fract() == 0.0 && v < u64::MAX as f64 {
                Ok(v as u64)
            } else {
                Err(E::custom(format!("{v} is not a whole number of bytes")))
            }
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse(v).map_err(E::custom)
        }
    }
}

pub use bytes::parse as parse_bytes;
pub use cpus::parse as parse_cpus;

/// `4 GiB`, `256 MiB`, `1.5 GiB`, `1000 bytes`: memory for people.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (size, unit) in UNITS {
        if b >= size {
            let v = b as f64 / size as f64;
            return if b.is_multiple_of(size) {
                format!("{} {unit}", b / size)
            } else {
                format!("{v:.1} {unit}")
            };
        }
    }
    format!("{b} bytes")
}

/// `0.5 cpus`, `2 cpus`: millicpus for people.
pub fn human_cpus(millis: u64) -> String {
    let unit = if millis == 1000 { "cpu" } else { "cpus" };
    if millis.is_multiple_of(1000) {
        format!("{} {unit}", millis / 1000)
    } else {
        format!("{} {unit}", millis as f64 / 1000.0)
    }
}

impl ServiceSpec {
    /// Semantic checks serde cannot express. Returns the first problem with its field path.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name("name", &self.name)?;
        if self.image.trim().is_empty() {
            return Err(ValidationError::new("image", "must not be empty"));
        }
        if self.image.chars().any(char::is_whitespace) {
            return Err(ValidationError::new("image", "must not contain spaces"));
        }
        if self.replicas > 10_000 {
            return Err(ValidationError::new("replicas", "at most 10000"));
        }
        if let Some(h) = &self.healthcheck {
            h.validate()?;
        }
        crate::job::validate(self)?;
        crate::depends::validate(self)?;
        if let Some(svc) = self.network_mode.shared_service() {
            if svc == self.name {
                return Err(ValidationError::new(
                    "network_mode",
                    "a service cannot share its own tasks' namespace",
                ));
            }
            validate_name("network_mode", svc)?;
        }
        for (i, n) in self.networks.iter().enumerate() {
            validate_name(&format!("networks[{i}]"), n)?;
            if self.networks[..i].contains(n) {
                return Err(ValidationError::new(
                    format!("networks[{i}]"),
                    format!("{n:?} is listed twice"),
                ));
            }
        }
        for (i, a) in self.aliases.iter().enumerate() {
            let field = format!("aliases[{i}]");
            validate_name(&field, a)?;
            if self.networks.is_empty() {
                return Err(ValidationError::new(
                    field,
                    "aliases are names on overlay networks: list the service's networks",
                ));
            }
            if a.eq_ignore_ascii_case(&self.name) || self.aliases[..i].contains(a) {
                return Err(ValidationError::new(
                    field,
                    format!("{a:?} is the service's name or listed twice"),
                ));
            }
        }
        if !self.networks.is_empty()
            && matches!(
                self.network_mode,
                NetworkMode::None | NetworkMode::Host | NetworkMode::Container(_)
            )
        {
            return Err(ValidationError::new(
                "network_mode",
                "host, none and container: cannot be combined with networks (a task on \
                 networks has its own namespace on them)",
            ));
        }
        crate::ports::validate(
            &self.ports,
            if self.networks.is_empty() {
                crate::ports::PortNet::from(&self.network_mode)
            } else {
                crate::ports::PortNet::Overlay {
                    dnsrr: self.endpoint_mode == crate::network::EndpointMode::Dnsrr,
                }
            },
        )?;
        crate::volume::validate_mounts(&self.mounts)?;
        crate::slotvol::validate_spec(self)?;
        crate::secret::validate_refs(&self.secrets, &self.configs, &self.env_from_secret)?;
        if let Some(k) = self
            .env_from_secret
            .keys()
            .find(|k| self.env.contains_key(*k))
        {
            return Err(ValidationError::new(
                format!("env_from_secret.{k}"),
                "also set in env: give it one value",
            ));
        }
        self.update_config.validate("update_config")?;
        if self.logging.max_size != 0 && self.logging.max_size < 1024 {
            return Err(ValidationError::new(
                "logging.max_size",
                "at least 1K (a log file holds at least a few lines)",
            ));
        }
        if self.logging.max_file > 100 {
            return Err(ValidationError::new("logging.max_file", "at most 100"));
        }
        self.rollback_config.validate("rollback_config")?;
        crate::runtime_options::validate(self)?;
        if let Some(a) = &self.autoscale {
            a.validate(self)?;
        }
        if self.restart.max_attempts > MAX_RESTART_ATTEMPTS {
            return Err(ValidationError::new(
                "restart.max_attempts",
                format!("at most {MAX_RESTART_ATTEMPTS} (0 for unlimited)"),
            ));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') {
                return Err(ValidationError::new(
                    format!("env.{k}"),
                    "a variable name must be non-empty and contain no '='",
                ));
            }
        }
        if let Some(user) = &self.user {
            // Names resolve in the container's /etc/passwd and /etc/group on the node.
            let part_ok = |p: &str| {
                !p.is_empty()
                    && p.len() <= 64
                    && !p.starts_with('-')
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'))
            };
            let ok = user.split(':').all(part_ok) && user.split(':').count() <= 2;
            if !ok {
                return Err(ValidationError::new(
                    "user",
                    "must be user or user:group, each a name or a number \
                     (e.g. nobody, 1000:1000, app:staff)",
                ));
            }
        }
        for (i, opt) in self.security_opt.iter().enumerate() {
            if opt != "seccomp=unconfined" {
                return Err(ValidationError::new(
                    format!("security_opt[{i}]"),
                    format!(
                        "{:?} is not supported (the only one is seccomp=unconfined)",
                        opt.chars().take(64).collect::<String>()
                    ),
                ));
            }
        }
        if let Some(cmd) = &self.command {
            if cmd.is_empty() && self.args.is_empty() {
                return Err(ValidationError::new(
                    "command",
                    "must not be an empty list (omit it to use the image's)",
                ));
            }
        }
        let (r, l) = (&self.resources.reservations, &self.resources.limits);
        if l.cpus > 0 && r.cpus > l.cpus {
            return Err(ValidationError::new(
                "resources.reservations.cpus",
                format!(
                    "reserves {} but the limit is {}",
                    human_cpus(r.cpus),
                    human_cpus(l.cpus)
                ),
            ));
        }
        if l.memory > 0 && r.memory > l.memory {
            return Err(ValidationError::new(
                "resources.reservations.memory",
                format!(
                    "reserves {} but the limit is {}",
                    human_bytes(r.memory),
                    human_bytes(l.memory)
                ),
            ));
        }
        for (i, p) in self.placement.preferences.iter().enumerate() {
            if p.label().is_empty() {
                return Err(ValidationError::new(
                    format!("placement.preferences[{i}].spread"),
                    format!("{:?}: expected node.labels.<name>", p.spread),
                ));
            }
        }
        Ok(())
    }
}

impl ServiceSpec {
    /// Whether a task made from `self` still matches `other`: every field but `replicas`,
    /// `completions`, `parallelism` (a job's: any change starts a new iteration anyway),
    /// `update_config`, `rollback_config`, `endpoint_mode` and `aliases` is equal. A task whose frozen spec does not match
    /// its service's is outdated and gets replaced by the rollout; changing only those three
    /// fields replaces nothing. (Destructured in full so a new field must be classified here.)
    pub fn same_task_spec(&self, other: &ServiceSpec) -> bool {
        let ServiceSpec {
            name,
            labels,
            replicas: _,
            image,
            entrypoint,
            command,
            args,
            env,
            workdir,
            user,
            hostname,
            network_mode,
            stop_grace_period,
            restart,
            mode,
            completions: _,
            parallelism: _,
            auto_remove: _, // what happens after the job, not how its tasks run
            resources,
            placement,
            healthcheck,
            ports,
            networks,
            aliases,
            endpoint_mode,
            mounts,
            secrets,
            configs,
            env_from_secret,
            resolved_refs,
            logging,
            security_opt,
            stop_signal,
            init,
            cap_add,
            cap_drop,
            sysctls,
            read_only,
            ulimits,
            extra_hosts,
            dns,
            dns_search,
            dns_opt,
            shm_size,
            privileged,
            update_config: _,
            rollback_config: _,
            rebalance: _,
            autoscale: _,  // the replica count only
            depends_on: _, // when new tasks may be placed, not what they run
        } = self;
        *name == other.name
            && *image == other.image
            && *entrypoint == other.entrypoint
            && *command == other.command
            && *args == other.args
            && *env == other.env
            && *workdir == other.workdir
            && *user == other.user
            && *hostname == other.hostname
            && *network_mode == other.network_mode
            && *stop_grace_period == other.stop_grace_period
            && *restart == other.restart
            && *mode == other.mode
            && *resources == other.resources
            && *placement == other.placement
            && *healthcheck == other.healthcheck
            && *ports == other.ports
            && *networks == other.networks
            && *mounts == other.mounts
            && *secrets == other.secrets
            && *configs == other.configs
            && *env_from_secret == other.env_from_secret
            && *resolved_refs == other.resolved_refs
            && *logging == other.logging
            && *security_opt == other.security_opt
            && *stop_signal == other.stop_signal
            && *init == other.init
            && *cap_add == other.cap_add
            && *cap_drop == other.cap_drop
            && *sysctls == other.sysctls
            && *read_only == other.read_only
            && *ulimits == other.ulimits
            && *extra_hosts == other.extra_hosts
            && *dns == other.dns
            && *dns_search == other.dns_search
            && *dns_opt == other.dns_opt
            && *shm_size == other.shm_size
            && *privileged == other.privileged
            && { let _ = endpoint_mode; true } // balancing only: no task changes
            && { let _ = aliases; true } // names in DNS only: no task changes
            && *labels == other.labels
    }
}

/// Log rotation: the shim starts a new file when the current one would pass `max_size`
/// (bytes; YAML takes `10M` like memory sizes) and keeps `max_file` files. 0 means the
/// default (10 MiB, 3 files).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    /// Bytes before the log rotates; 0: the default.
    #[serde(default, with = "bytes", skip_serializing_if = "is_zero")]
    pub max_size: u64,
    /// Files kept; 0: the default.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub max_file: u32,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

impl Logging {
    /// Whether nothing is set (the shim's defaults apply).
    pub fn is_default(&self) -> bool {
        *self == Logging::default()
    }
}

/// Names of services and nodes: DNS labels.
pub fn validate_name(field: &str, name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "{name:?} is not a valid name (lowercase letters, digits and '-', 1-63 characters)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        tests_support::spec("web", 2)
    }

    #[test]
    fn restart_durations_take_seconds_or_strings() {
        for (yaml, want) in [
            // Plain numbers are seconds, as before `delay` took durations.
            ("delay: 1", (1000, 60_000, 0)),
            ("delay: 0.5", (500, 60_000, 0)),
            (
                "delay: 250ms\nmax_delay: 2m\nwindow: 1m30s",
                (250, 120_000, 90_000),
            ),
            ("{}", (5000, 60_000, 0)),
        ] {
            let p: RestartPolicy = serde_yaml::from_str(yaml).unwrap();
            assert_eq!((p.delay, p.max_delay, p.window), want, "{yaml}");
            let back: RestartPolicy =
                serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
            assert_eq!(back, p);
        }
        // Defaults of the new fields are not written.
        let json = serde_json::to_value(RestartPolicy::default()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"condition": "any", "delay": "5s", "max_attempts": 0})
        );
        assert!(serde_yaml::from_str::<RestartPolicy>("delay: 5x").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        type Mutate = Box<dyn Fn(&mut ServiceSpec)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (Box::new(|s| s.name = "Web".into()), "name"),
            (Box::new(|s| s.image = " ".into()), "image"),
            (Box::new(|s| s.replicas = 20_000), "replicas"),
            (
                Box::new(|s| s.restart.max_attempts = 101),
                "restart.max_attempts",
            ),
            (Box::new(|s| s.user = Some("root:wheel:x".into())), "user"),
            (
                Box::new(|s| s.security_opt = vec!["apparmor=x".into()]),
                "security_opt[0]",
            ),
            (Box::new(|s| s.command = Some(vec![])), "command"),
            (
                Box::new(|s| {
                    s.env.insert("A=B".into(), "x".into());
                }),
                "env.A=B",
            ),
        ];
        let cases: Vec<(Mutate, &str)> = cases
            .into_iter()
            .chain::<Vec<(Mutate, &str)>>(vec![
                (
                    Box::new(|s| {
                        s.resources.reservations.memory = 2 << 30;
                        s.resources.limits.memory = 1 << 30;
                    }),
                    "resources.reservations.memory",
                ),
                (
                    Box::new(|s| {
                        s.resources.reservations.cpus = 2000;
                        s.resources.limits.cpus = 500;
                    }),
                    "resources.reservations.cpus",
                ),
                (
                    Box::new(|s| {
                        s.placement.preferences = vec![
                            Preference {
                                spread: "node.labels.zone".into(),
                            },
                            Preference {
                                spread: "node.hostname".into(),
                            },
                        ]
                    }),
                    "placement.preferences[1].spread",
                ),
                (
                    Box::new(|s| {
                        s.update_config.max_failure_ratio = crate::update::FailureRatio(1001)
                    }),
                    "update_config.max_failure_ratio",
                ),
                (
                    Box::new(|s| {
                        s.rollback_config.failure_action = crate::update::FailureAction::Rollback
                    }),
                    "rollback_config.failure_action",
                ),
            ])
            .collect();
        for (mutate, field) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = s.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        spec().validate().unwrap();
    }

    #[test]
    fn task_specs_ignore_replicas_and_update_configs() {
        let a = spec();
        let mut b = a.clone();
        b.replicas = 9;
        b.update_config.parallelism = 4;
        b.rollback_config.delay = 1000;
        assert!(a.same_task_spec(&b) && b.same_task_spec(&a));
        let mut c = a.clone();
        c.image = "other".into();
        assert!(!a.same_task_spec(&c));
        let mut d = a.clone();
        d.env.insert("K".into(), "v".into());
        assert!(!a.same_task_spec(&d));
    }

    #[test]
    fn constraints_parse_and_print() {
        let ok = [
            ("node.labels.zone==a", "node.labels.zone==a"),
            ("node.role == manager", "node.role==manager"),
            ("node.hostname!=h2", "node.hostname!=h2"),
            ("node.id==abc", "node.id==abc"),
            ("engine.labels.disk == ssd", "engine.labels.disk==ssd"),
        ];
        for (text, shown) in ok {
            let c: Constraint = text.parse().unwrap();
            assert_eq!(c.to_string(), shown);
        }
        let bad = [
            ("node.labels.zone=a", "expected KEY==VALUE"),
            ("node.labels.==a", "unknown key"),
            ("engine.labels.==a", "unknown key"),
            ("engine.zone==a", "unknown key"),
            ("node.role==boss", "worker or manager"),
            ("node.id==", "non-empty value"),
            ("node.id==a==b", "one non-empty value"),
        ];
        for (text, frag) in bad {
            let e = text.parse::<Constraint>().unwrap_err();
            assert!(e.contains(frag), "{text}: {e}");
        }
        let mut n = crate::node::Node {
            id: "n1".into(),
            hostname: "h1".into(),
            addr: String::new(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            role: crate::node::NodeRole::Manager,
            availability: Default::default(),
            resources: Default::default(),
            state: crate::node::NodeState::Ready,
            updated_at: 0,
            version: 0,
            controller_id: None,
            host_labels: [("zone".to_string(), "b".to_string())].into(),
            overlay_key: String::new(),
            cert_not_after: 0,
        };
        let m = |c: &str, n: &crate::node::Node| c.parse::<Constraint>().unwrap().matches(n);
        assert!(m("node.labels.zone==a", &n));
        // The host's labels and the operator's are apart: the same key, two values.
        assert!(m("engine.labels.zone==b", &n) && !m("engine.labels.zone==a", &n));
        assert!(!m("node.labels.zone==b", &n));
        assert!(m("engine.labels.disk!=ssd", &n) && !m("engine.labels.disk==ssd", &n));
        assert!(!m("node.labels.zone!=a", &n));
        assert!(!m("node.labels.disk==ssd", &n));
        assert!(m("node.labels.disk!=ssd", &n));
        assert!(m("node.role==manager", &n));
        assert!(m("node.hostname!=h2", &n));
        n.role = crate::node::NodeRole::Worker;
        assert!(m("node.role==worker", &n) && m("node.id==n1", &n));
    }

    #[test]
    fn quantities() {
        for (text, bytes) in [
            ("1048576", 1 << 20),
            ("512Mi", 512 << 20),
            ("512MiB", 512 << 20),
            ("2G", 2 << 30),
            ("1.5Gi", 3 << 29),
            ("4gi", 4 << 30),
            ("10k", 10 << 10),
        ] {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text}");
        }
        for bad in ["", "Mi", "12X", "-1", "1.2.3M"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        for (text, millis) in [("0.5", 500), ("2", 2000), ("250m", 250), ("0.001", 1)] {
            assert_eq!(parse_cpus(text), Ok(millis), "{text}");
        }
        for bad in ["-1", "x", "1e9", "NaN"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
        assert_eq!(human_bytes(4 << 30), "4 GiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(100), "100 bytes");
        assert_eq!(human_cpus(1500), "1.5 cpus");
        assert_eq!(human_cpus(1000), "1 cpu");
    }

    #[test]
    fn new_fields_round_trip_through_json() {
        let mut s = spec();
        s.mode = ServiceMode::Global;
        s.resources.reservations = Reservations {
            cpus: 500,
            memory: 256 << 20,
        };
        s.resources.limits = Limits {
            cpus: 1500,
            memory: 1 << 30,
            pids: 100,
        };
        s.placement = Placement {
            constraints: vec!["node.labels.zone==a".parse().unwrap()],
            preferences: vec![Preference {
                spread: "node.labels.rack".into(),
            }],
            max_replicas_per_node: 2,
            strategy: Strategy::Binpack,
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""cpus":0.5"#), "{json}");
        assert_eq!(serde_json::from_str::<ServiceSpec>(&json).unwrap(), s);
        // Defaults are not written, so older readers and stored specs stay unchanged.
        let plain = serde_json::to_value(spec()).unwrap();
        for key in [
            "resources",
            "placement",
            "mode",
            "update_config",
            "rollback_config",
        ] {
            assert!(plain.get(key).is_none(), "{key}: {plain}");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A minimal valid spec for tests.
    pub fn spec(name: &str, replicas: u64) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            labels: Default::default(),
            replicas,
            image: "busybox:latest".into(),
            entrypoint: None,
            command: None,
            args: vec![],
            env: Default::default(),
            workdir: None,
            user: None,
            hostname: None,
            network_mode: NetworkMode::Host,
            stop_grace_period: 10,
            restart: Default::default(),
            mode: ServiceMode::Replicated,
            completions: None,
            parallelism: None,
            auto_remove: false,
            resources: Default::default(),
            placement: Default::default(),
            healthcheck: None,
            ports: vec![],
            logging: Default::default(),
            security_opt: vec![],
            stop_signal: None,
            init: false,
            cap_add: vec![],
            cap_drop: vec![],
            sysctls: Default::default(),
            read_only: false,
            ulimits: Default::default(),
            extra_hosts: vec![],
            dns: vec![],
            dns_search: vec![],
            dns_opt: vec![],
            shm_size: 0,
            privileged: false,
            networks: vec![],
            endpoint_mode: Default::default(),
            aliases: vec![],
            mounts: vec![],
            secrets: vec![],
            configs: vec![],
            env_from_secret: Default::default(),
            resolved_refs: Default::default(),
            update_config: Default::default(),
            rollback_config: Default::default(),
            rebalance: Default::default(),
            autoscale: None,
            depends_on: Vec::new(),
        }
    }
}

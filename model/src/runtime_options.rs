//! A service's container runtime options, as Docker and compose files name them: the stop
//! signal, an init process, capabilities, namespaced sysctls, a read-only root, resource limits
//! (`ulimits`), `/etc/hosts` and `/etc/resolv.conf` entries and the size of `/dev/shm`.
//!
//! This module holds their value types, their serde forms (the compose forms too, so a manifest
//! takes what a compose file writes) and their validation; the agent turns them into the OCI
//! config (`rudder_agent::bundle`). Invariant: a spec that passes [`validate`] yields an OCI
//! config the runtime accepts: every capability, signal, sysctl and limit name is a known one.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Serialize, Serializer};

use crate::spec::{NetworkMode, ServiceSpec};
use crate::ValidationError;

/// Linux capability names without their `CAP_` prefix (the set the OCI runtimes know).
pub const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETGID",
    "SETFCAP",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

/// Docker's default capability set, every container's unless `cap_add`/`cap_drop` change it.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// `net_admin`, `CAP_NET_ADMIN` → `NET_ADMIN`; `all` → `ALL`; `None` for an unknown name.
pub fn capability(name: &str) -> Option<String> {
    let up = name.trim().to_ascii_uppercase();
    let bare = up.strip_prefix("CAP_").unwrap_or(&up);
    (bare == "ALL" || CAPABILITIES.contains(&bare)).then(|| bare.to_string())
}

/// The container's capabilities (names without `CAP_`), by Docker's rules: `ALL` in `add` is
/// every capability but those dropped; `ALL` in `drop` leaves only those added; otherwise the
/// defaults less `drop`, plus `add` (an added capability wins over the same one dropped).
/// Unknown names are skipped ([`validate`] refuses them earlier).
pub fn effective_capabilities(add: &[String], drop: &[String]) -> Vec<String> {
    let add: Vec<String> = add.iter().filter_map(|c| capability(c)).collect();
    let drop: Vec<String> = drop.iter().filter_map(|c| capability(c)).collect();
    let has = |l: &[String], c: &str| l.iter().any(|x| x == c);
    let mut caps: Vec<String> = if has(&add, "ALL") {
        CAPABILITIES
            .iter()
            .filter(|c| !has(&drop, c))
            .map(|c| c.to_string())
            .collect()
    } else if has(&drop, "ALL") {
        add.clone()
    } else {
        let mut v: Vec<String> = DEFAULT_CAPABILITIES
            .iter()
            .filter(|c| !has(&drop, c))
            .map(|c| c.to_string())
            .collect();
        v.extend(add.iter().cloned());
        v
    };
    caps.retain(|c| c != "ALL");
    let mut seen = std::collections::BTreeSet::new();
    caps.retain(|c| seen.insert(c.clone()));
    caps
}

/// Signal names (without `SIG`) and numbers, as `kill -l` lists them on Linux.
const SIGNALS: &[(&str, u8)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// `SIGINT`, `int`, `2` → `INT` (the form the runtimes' `kill` takes); `None` if unknown.
pub fn signal(name: &str) -> Option<&'static str> {
    let up = name.trim().to_ascii_uppercase();
    let bare = up.strip_prefix("SIG").unwrap_or(&up);
    SIGNALS
        .iter()
        .find(|(n, num)| *n == bare || bare.parse::<u8>().ok() == Some(*num))
        .map(|(n, _)| *n)
}

/// Resource limits `ulimits` may set (`setrlimit`'s `RLIMIT_*`, lowercase, as Docker names them).
pub const ULIMITS: &[&str] = &[
    "as",
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

/// No limit (`RLIM_INFINITY`); written `-1` or `unlimited`.
pub const UNLIMITED: u64 = u64::MAX;

/// One `ulimits` entry. YAML/JSON: a number (soft and hard alike, compose's short form) or
/// `{soft: N, hard: N}`; `-1` or `unlimited` means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ulimit {
    /// What the process gets; it may raise it up to `hard`.
    pub soft: u64,
    /// The ceiling.
    pub hard: u64,
}

fn limit_value(v: &serde_yaml::Value) -> Option<u64> {
    match v {
        serde_yaml::Value::Number(n) => n
            .as_u64()
            .or_else(|| (n.as_i64() == Some(-1)).then_some(UNLIMITED)),
        serde_yaml::Value::String(s) => parse_limit(s),
        _ => None,
    }
}

fn parse_limit(s: &str) -> Option<u64> {
    match s.trim() {
        "-1" | "unlimited" | "infinity" => Some(UNLIMITED),
        t => t.parse().ok(),
    }
}

impl Serialize for Ulimit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let n = |v: u64| -> i64 {
            if v == UNLIMITED {
                -1
            } else {
                v.min(i64::MAX as u64) as i64
            }
        };
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("soft", &n(self.soft))?;
        m.serialize_entry("hard", &n(self.hard))?;
        m.end()
    }
}

impl<'de> serde::Deserialize<'de> for Ulimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ulimit;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, -1 (unlimited), or {soft: N, hard: N}")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ulimit, E> {
                Ok(Ulimit { soft: v, hard: v })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ulimit, E> {
                match v {
                    -1 => Ok(Ulimit {
                        soft: UNLIMITED,
                        hard: UNLIMITED,
                    }),
                    v => u64::try_from(v)
                        .map(|v| Ulimit { soft: v, hard: v })
                        .map_err(|_| E::custom(format!("{v}: a limit is -1 or not negative"))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ulimit, E> {
                let n = parse_limit(v)
                    .ok_or_else(|| E::custom(format!("{v:?} is not a number or unlimited")))?;
                Ok(Ulimit { soft: n, hard: n })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ulimit, A::Error> {
                let (mut soft, mut hard) = (None, None);
                while let Some(k) = map.next_key::<String>()? {
                    let v: serde_yaml::Value = map.next_value()?;
                    let n = limit_value(&v).ok_or_else(|| {
                        de::Error::custom(format!("{k}: expected a number, -1 or unlimited"))
                    })?;
                    match k.as_str() {
                        "soft" => soft = Some(n),
                        "hard" => hard = Some(n),
                        other => {
                            return Err(de::Error::unknown_field(other, &["soft", "hard"]));
                        }
                    }
                }
                match (soft, hard) {
                    (Some(soft), Some(hard)) => Ok(Ulimit { soft, hard }),
                    _ => Err(de::Error::custom("both soft and hard are needed")),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Serde for `sysctls`: a mapping whose values may be numbers (`net.core.somaxconn: 1024`), or
/// compose's list form `["KEY=VALUE"]`.
pub(crate) mod sysctl_map {
    use super::*;

    pub fn serialize<S: Serializer>(m: &BTreeMap<String, String>, s: S) -> Result<S::Ok, S::Error> {
        m.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, String>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BTreeMap<String, String>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of sysctl names to values, or a list of NAME=VALUE")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(k) = map.next_key::<String>()? {
                    let v: serde_yaml::Value = map.next_value()?;
                    let v = match v {
                        serde_yaml::Value::String(s) => s,
                        serde_yaml::Value::Number(n) => n.to_string(),
                        serde_yaml::Value::Bool(b) => b.to_string(),
                        _ => return Err(de::Error::custom(format!("{k}: expected a value"))),
                    };
                    out.insert(k, v);
                }
                Ok(out)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(item) = seq.next_element::<String>()? {
                    let (k, v) = item.split_once('=').ok_or_else(|| {
                        de::Error::custom(format!("{item:?}: expected NAME=VALUE"))
                    })?;
                    out.insert(k.trim().to_string(), v.trim().to_string());
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// Serde for `dns` and `dns_search`: one string or a list of them, as compose writes either.
pub(crate) mod one_or_many {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<String>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
                Ok(vec![v.to_string()])
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// Which namespace a sysctl belongs to; `None`: the host's (refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlScope {
    /// `net.*`: the container's network namespace.
    Net,
    /// `kernel.msg*`, `kernel.sem`, `kernel.shm*`, `fs.mqueue.*`: its IPC namespace.
    Ipc,
    /// `kernel.domainname`: its UTS namespace.
    Uts,
}

/// The namespace a sysctl is set in, for the namespaced ones a container may set.
pub fn sysctl_scope(key: &str) -> Option<SysctlScope> {
    const IPC: &[&str] = &[
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    let ok_chars = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        && !key.contains("..")
        && !key.ends_with('.');
    if !ok_chars {
        None
    } else if key.starts_with("net.") {
        Some(SysctlScope::Net)
    } else if IPC.contains(&key) || key.starts_with("fs.mqueue.") {
        Some(SysctlScope::Ipc)
    } else if key == "kernel.domainname" {
        Some(SysctlScope::Uts)
    } else {
        None
    }
}

/// `HOST:IP` (Docker's form; an IPv6 address may be in brackets), split and checked.
pub fn extra_host(entry: &str) -> Result<(String, IpAddr), String> {
    let (host, ip) = entry
        .split_once(':')
        .ok_or_else(|| format!("{entry:?}: expected HOST:IP (e.g. db.local:10.0.0.5)"))?;
    let ip_text = ip.trim().trim_start_matches('[').trim_end_matches(']');
    if ip_text == "host-gateway" {
        return Err(format!(
            "{entry:?}: host-gateway is not supported: give the host's address"
        ));
    }
    let ip: IpAddr = ip_text
        .parse()
        .map_err(|_| format!("{entry:?}: {ip_text:?} is not an IP address"))?;
    if !dns_name(host.trim()) {
        return Err(format!("{entry:?}: {host:?} is not a host name"));
    }
    Ok((host.trim().to_string(), ip))
}

/// Letters, digits, `-`, `_` and dots, at most 253 characters, no empty label.
fn dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// Upper bounds on list sizes (every input a size limit).
const MAX_ITEMS: usize = 64;

fn too_many<T>(field: &str, v: &[T], max: usize) -> Result<(), ValidationError> {
    if v.len() > max {
        return Err(ValidationError::new(
            field,
            format!("at most {max} entries"),
        ));
    }
    Ok(())
}

/// Checks the runtime options of `s`; errors name the field (`cap_add[1]`, `sysctls.KEY`).
pub fn validate(s: &ServiceSpec) -> Result<(), ValidationError> {
    if let Some(sig) = &s.stop_signal {
        if signal(sig).is_none() {
            return Err(ValidationError::new(
                "stop_signal",
                format!(
                    "{:?} is not a signal (e.g. SIGTERM, SIGINT, SIGQUIT, or a number 1-31)",
                    short(sig)
                ),
            ));
        }
    }
    for (name, list) in [("cap_add", &s.cap_add), ("cap_drop", &s.cap_drop)] {
        too_many(name, list, MAX_ITEMS)?;
        for (i, c) in list.iter().enumerate() {
            if capability(c).is_none() {
                return Err(ValidationError::new(
                    format!("{name}[{i}]"),
                    format!(
                        "{:?} is not a Linux capability (e.g. NET_ADMIN, SYS_PTRACE, ALL)",
                        short(c)
                    ),
                ));
            }
        }
    }
    if s.sysctls.len() > MAX_ITEMS {
        return Err(ValidationError::new(
            "sysctls",
            format!("at most {MAX_ITEMS} entries"),
        ));
    }
    for (k, v) in &s.sysctls {
        let field = format!("sysctls.{k}");
        match sysctl_scope(k) {
            None => {
                return Err(ValidationError::new(
                    field,
                    "not a namespaced sysctl: a container may set net.*, kernel.msg*, \
                     kernel.sem, kernel.shm*, fs.mqueue.* and kernel.domainname only",
                ))
            }
            Some(SysctlScope::Net) => match &s.network_mode {
                NetworkMode::Host if s.networks.is_empty() => {
                    return Err(ValidationError::new(
                        field,
                        "net.* sysctls are refused with network_mode: host (they would \
                         change the host's network)",
                    ))
                }
                NetworkMode::Container(_) if s.networks.is_empty() => {
                    return Err(ValidationError::new(
                        field,
                        "net.* sysctls are refused with network_mode: container: (they would \
                         change the other task's network)",
                    ))
                }
                _ => {}
            },
            Some(_) => {}
        }
        if v.is_empty() || v.len() > 256 || v.contains(['\n', '\0']) {
            return Err(ValidationError::new(
                field,
                "the value must be 1-256 characters on one line",
            ));
        }
    }
    for (name, u) in &s.ulimits {
        let field = format!("ulimits.{name}");
        if !ULIMITS.contains(&name.as_str()) {
            return Err(ValidationError::new(
                field,
                format!("unknown limit (one of {})", ULIMITS.join(", ")),
            ));
        }
        if u.soft > u.hard {
            return Err(ValidationError::new(
                field,
                format!("soft limit {} is above the hard limit {}", u.soft, u.hard),
            ));
        }
    }
    too_many("extra_hosts", &s.extra_hosts, MAX_ITEMS)?;
    for (i, h) in s.extra_hosts.iter().enumerate() {
        extra_host(h).map_err(|e| ValidationError::new(format!("extra_hosts[{i}]"), e))?;
    }
    too_many("dns", &s.dns, 3)?;
    for (i, d) in s.dns.iter().enumerate() {
        if d.parse::<IpAddr>().is_err() {
            return Err(ValidationError::new(
                format!("dns[{i}]"),
                format!("{:?} is not an IP address", short(d)),
            ));
        }
    }
    too_many("dns_search", &s.dns_search, 6)?;
    for (i, d) in s.dns_search.iter().enumerate() {
        if d != "." && !dns_name(d.trim_end_matches('.')) {
            return Err(ValidationError::new(
                format!("dns_search[{i}]"),
                format!("{:?} is not a domain name", short(d)),
            ));
        }
    }
    too_many("dns_opt", &s.dns_opt, 16)?;
    for (i, o) in s.dns_opt.iter().enumerate() {
        let ok = !o.is_empty()
            && o.len() <= 64
            && o.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.'));
        if !ok {
            return Err(ValidationError::new(
                format!("dns_opt[{i}]"),
                format!(
                    "{:?} is not a resolver option (e.g. ndots:2, use-vc, timeout:1)",
                    short(o)
                ),
            ));
        }
    }
    if s.shm_size != 0 && s.shm_size < 4096 {
        return Err(ValidationError::new("shm_size", "at least 4K"));
    }
    if s.privileged {
        return Err(ValidationError::new(
            "privileged",
            "not supported: Rudder never gives a task the whole host; grant what it needs with \
             cap_add (e.g. NET_ADMIN, SYS_ADMIN) and sysctls",
        ));
    }
    Ok(())
}

/// At most 64 characters of a user's value, for messages.
fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests_support::spec;

    #[test]
    fn names_normalise() {
        assert_eq!(capability("net_admin").as_deref(), Some("NET_ADMIN"));
        assert_eq!(capability("CAP_SYS_PTRACE").as_deref(), Some("SYS_PTRACE"));
        assert_eq!(capability("all").as_deref(), Some("ALL"));
        assert_eq!(capability("NET_ADMINS"), None);
        for (s, want) in [
            ("SIGINT", Some("INT")),
            ("quit", Some("QUIT")),
            ("9", Some("KILL")),
            ("SIGRTMIN", None),
            ("0", None),
        ] {
            assert_eq!(signal(s), want, "{s}");
        }
    }

    #[test]
    fn capabilities_follow_dockers_rules() {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let caps = |add: &[&str], drop: &[&str]| effective_capabilities(&v(add), &v(drop));
        let defaults = v(DEFAULT_CAPABILITIES);
        assert_eq!(caps(&[], &[]), defaults);
        let c = caps(&["NET_ADMIN"], &["MKNOD"]);
        assert!(c.contains(&"NET_ADMIN".into()) && !c.contains(&"MKNOD".into()));
        assert_eq!(c.len(), defaults.len());
        assert_eq!(caps(&["NET_ADMIN"], &["ALL"]), v(&["NET_ADMIN"]));
        assert_eq!(caps(&[], &["ALL"]), Vec::<String>::new());
        let all = caps(&["ALL"], &["SYS_ADMIN"]);
        assert_eq!(all.len(), CAPABILITIES.len() - 1);
        assert!(!all.contains(&"SYS_ADMIN".into()));
        // Added wins over dropped (Docker's order: drop, then add).
        assert!(caps(&["chown"], &["CAP_CHOWN"]).contains(&"CHOWN".into()));
    }

    #[test]
    fn ulimits_take_both_compose_forms() {
        for (yaml, want) in [
            ("1024", (1024, 1024)),
            ("{soft: 1024, hard: 4096}", (1024, 4096)),
            ("-1", (UNLIMITED, UNLIMITED)),
            ("{soft: 10, hard: unlimited}", (10, UNLIMITED)),
        ] {
            let u: Ulimit = serde_yaml::from_str(yaml).unwrap();
            assert_eq!((u.soft, u.hard), want, "{yaml}");
            let back: Ulimit = serde_json::from_str(&serde_json::to_string(&u).unwrap()).unwrap();
            assert_eq!(back, u, "{yaml}");
        }
        for bad in ["{soft: 1}", "{soft: 1, hard: 2, x: 3}", "-5", "lots"] {
            assert!(serde_yaml::from_str::<Ulimit>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sysctl_scopes() {
        for (k, want) in [
            ("net.core.somaxconn", Some(SysctlScope::Net)),
            (
                "net.ipv4.ip_unprivileged_port_start",
                Some(SysctlScope::Net),
            ),
            ("kernel.shmmax", Some(SysctlScope::Ipc)),
            ("kernel.msgmax", Some(SysctlScope::Ipc)),
            ("fs.mqueue.msg_max", Some(SysctlScope::Ipc)),
            ("kernel.domainname", Some(SysctlScope::Uts)),
            ("kernel.hostname", None),
            ("vm.swappiness", None),
            ("kernel.pid_max", None),
            ("net..x", None),
            ("net.core.x\n", None),
        ] {
            assert_eq!(sysctl_scope(k), want, "{k}");
        }
    }

    #[test]
    fn extra_hosts_parse() {
        let ok = |e: &str| extra_host(e).map(|(h, ip)| (h, ip.to_string()));
        assert_eq!(ok("db:10.0.0.5"), Ok(("db".into(), "10.0.0.5".into())));
        assert_eq!(ok("v6:::1"), Ok(("v6".into(), "::1".into())));
        assert_eq!(ok("v6:[fe80::1]"), Ok(("v6".into(), "fe80::1".into())));
        for bad in [
            "db",
            "db:x",
            "bad host:1.2.3.4",
            "h:host-gateway",
            ":1.2.3.4",
        ] {
            assert!(extra_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        type Mutate = Box<dyn Fn(&mut ServiceSpec)>;
        let cases: Vec<(Mutate, &str, &str)> = vec![
            (
                Box::new(|s| s.stop_signal = Some("SIGFOO".into())),
                "stop_signal",
                "not a signal",
            ),
            (
                Box::new(|s| s.cap_add = vec!["CHOWN".into(), "NET_FOO".into()]),
                "cap_add[1]",
                "not a Linux capability",
            ),
            (
                Box::new(|s| s.cap_drop = vec!["x".into()]),
                "cap_drop[0]",
                "capability",
            ),
            (
                Box::new(|s| {
                    s.sysctls.insert("vm.swappiness".into(), "1".into());
                }),
                "sysctls.vm.swappiness",
                "not a namespaced sysctl",
            ),
            (
                Box::new(|s| {
                    s.network_mode = NetworkMode::Host;
                    s.sysctls.insert("net.core.somaxconn".into(), "1".into());
                }),
                "sysctls.net.core.somaxconn",
                "network_mode: host",
            ),
            (
                Box::new(|s| {
                    s.network_mode = NetworkMode::Container("db".into());
                    s.sysctls.insert("net.core.somaxconn".into(), "1".into());
                }),
                "sysctls.net.core.somaxconn",
                "container:",
            ),
            (
                Box::new(|s| {
                    s.sysctls.insert("kernel.shmmax".into(), "a\nb".into());
                }),
                "sysctls.kernel.shmmax",
                "one line",
            ),
            (
                Box::new(|s| {
                    s.ulimits
                        .insert("files".into(), Ulimit { soft: 1, hard: 1 });
                }),
                "ulimits.files",
                "unknown limit",
            ),
            (
                Box::new(|s| {
                    s.ulimits
                        .insert("nofile".into(), Ulimit { soft: 9, hard: 1 });
                }),
                "ulimits.nofile",
                "above the hard limit",
            ),
            (
                Box::new(|s| s.extra_hosts = vec!["db:1.2.3.4".into(), "db".into()]),
                "extra_hosts[1]",
                "HOST:IP",
            ),
            (
                Box::new(|s| s.dns = vec!["resolver".into()]),
                "dns[0]",
                "not an IP address",
            ),
            (
                Box::new(|s| s.dns = vec!["1.1.1.1".into(); 4]),
                "dns",
                "at most 3",
            ),
            (
                Box::new(|s| s.dns_search = vec!["a..b".into()]),
                "dns_search[0]",
                "domain",
            ),
            (
                Box::new(|s| s.dns_opt = vec!["ndots 2".into()]),
                "dns_opt[0]",
                "resolver option",
            ),
            (Box::new(|s| s.shm_size = 100), "shm_size", "4K"),
            (
                Box::new(|s| s.privileged = true),
                "privileged",
                "not supported",
            ),
        ];
        for (mutate, field, words) in cases {
            let mut s = spec("web", 1);
            s.network_mode = NetworkMode::Bridge;
            mutate(&mut s);
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(words), "{e}");
        }
        let mut s = spec("web", 1);
        s.network_mode = NetworkMode::Bridge;
        s.stop_signal = Some("SIGQUIT".into());
        s.cap_add = vec!["NET_ADMIN".into()];
        s.cap_drop = vec!["ALL".into()];
        s.sysctls.insert("net.core.somaxconn".into(), "1024".into());
        s.sysctls.insert("kernel.shmmni".into(), "100".into());
        s.ulimits
            .insert("nofile".into(), Ulimit { soft: 1, hard: 2 });
        s.extra_hosts = vec!["db:10.0.0.5".into()];
        s.dns = vec!["10.0.0.53".into()];
        s.dns_search = vec!["example.com".into()];
        s.dns_opt = vec!["ndots:2".into()];
        s.shm_size = 1 << 26;
        s.validate().unwrap();
        // A host-network task on overlay networks is refused elsewhere, not for its sysctls.
        s.network_mode = NetworkMode::Host;
        assert_eq!(
            s.validate().unwrap_err().field,
            "sysctls.net.core.somaxconn"
        );
    }

    #[test]
    fn specs_stored_before_these_options_still_decode() {
        // A spec as an older Rudder stored it: none of the fields above.
        let old = r#"{"name":"web","replicas":2,"image":"busybox:latest","network_mode":"bridge",
            "stop_grace_period":10,"restart":{"condition":"any","delay":"5s","max_attempts":0}}"#;
        let s: ServiceSpec = serde_json::from_str(old).unwrap();
        assert_eq!(
            (
                s.stop_signal.clone(),
                s.init,
                s.read_only,
                s.shm_size,
                s.privileged
            ),
            (None, false, false, 0, false)
        );
        assert!(s.cap_add.is_empty() && s.sysctls.is_empty() && s.ulimits.is_empty());
        assert!(s.extra_hosts.is_empty() && s.dns.is_empty() && s.dns_opt.is_empty());
        // Unset, they are not written: what older versions stored stays byte-identical.
        let json = serde_json::to_value(&s).unwrap();
        for key in [
            "stop_signal",
            "init",
            "cap_add",
            "sysctls",
            "ulimits",
            "dns",
            "shm_size",
        ] {
            assert!(json.get(key).is_none(), "{key}: {json}");
        }
        // Set, they round-trip.
        let mut t = s.clone();
        t.stop_signal = Some("SIGINT".into());
        t.init = true;
        t.cap_add = vec!["NET_ADMIN".into()];
        t.sysctls.insert("net.core.somaxconn".into(), "512".into());
        t.read_only = true;
        t.ulimits.insert(
            "nofile".into(),
            Ulimit {
                soft: 100,
                hard: UNLIMITED,
            },
        );
        t.extra_hosts = vec!["db:10.0.0.5".into()];
        t.dns = vec!["10.0.0.53".into()];
        t.dns_search = vec!["corp".into()];
        t.dns_opt = vec!["ndots:1".into()];
        t.shm_size = 1 << 27;
        let back: ServiceSpec = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        assert!(!t.same_task_spec(&s), "a runtime option changes the task");
    }
}

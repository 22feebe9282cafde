//! Compose files to Rudder manifests: what `rctl stack deploy|config` and `rctl apply -f
//! compose.yaml` run before the ordinary apply path. Pure: the caller reads the files (the
//! compose files, `.env`, `env_file:`s through [`Files`]) and passes the process environment.
//!
//! Pipeline: each file is parsed (YAML anchors and `<<:` merge keys resolved), its string values
//! interpolated (`interpolate`), its `x-*` extension fields dropped; the files are merged in order
//! (`merge`, per the compose spec); then `convert` turns services, networks, volumes, secrets
//! and configs into the same [`Manifest`]s `rctl apply` reads, and validates them as apply does.
//!
//! Names (deterministic, documented in ARCHITECTURE.md "Compose files and stacks"): an object
//! `N` of stack `S` becomes `S-n`, where `n` is `N` lowercased with every character outside
//! `[a-z0-9-]` turned into `-` for services, networks and volumes (DNS labels: `db_data` →
//! `S-db-data`), and `N` as written for secrets and configs (their names allow `_` and `.`).
//! A top-level object with `name:` or `external: true` keeps that name, unprefixed. Two compose
//! names mapping to one Rudder name are refused. Every object carries the label
//! `rudder.stack=S`; services also `rudder.stack.service=N`.
//!
//! Invariants: a key Rudder cannot honour yields exactly one warning naming it (never a silent
//! drop); every error names the compose key path (`services.web.ports[1]`) and, when found, the
//! line in the file that holds it.

pub mod build;
mod depends;
pub mod interpolate;
mod service;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use crate::manifest::Manifest;
use crate::network::NetworkSpec;
use crate::secret::{SecretSpec, SecretText};
use crate::volume::VolumeSpec;

/// The label every object of a stack carries, whose value is the stack's name.
pub const STACK_LABEL: &str = "rudder.stack";
/// The label a stack's service carries, whose value is its name in the compose file.
pub const SERVICE_LABEL: &str = "rudder.stack.service";
/// Largest compose, override or `.env` file read.
pub const MAX_FILE: usize = 1 << 20;

/// A compose problem, located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("compose: {file}:{line}: {field}: {message}")]
pub struct ComposeError {
    /// The file the key was found in (the last file that sets it), or the first file.
    pub file: String,
    /// 1-based line of the key; 0 when not found.
    pub line: usize,
    /// Dotted compose key path (`services.web.deploy.replicas`), `.` for the file itself.
    pub field: String,
    /// What is wrong, for a user to act on.
    pub message: String,
}

/// One compose file as read by the caller.
#[derive(Debug, Clone)]
pub struct Source {
    /// Its path as the user gave it (for messages).
    pub name: String,
    /// Its text.
    pub text: String,
}

/// Reads files a compose file refers to (`env_file:`), relative to the project directory (the
/// first compose file's). The real one reads the disk; tests use a map.
pub trait Files {
    /// The file's text, or why it cannot be read.
    fn read(&self, path: &str) -> Result<String, String>;
}

impl Files for BTreeMap<String, String> {
    fn read(&self, path: &str) -> Result<String, String> {
        self.get(path)
            .cloned()
            .ok_or_else(|| format!("{path}: no such file"))
    }
}

/// What the conversion needs besides the files.
pub struct Input<'a> {
    /// The stack's name (a Rudder name: lowercase letters, digits, `-`).
    pub stack: &'a str,
    /// The compose file, then override files, in order.
    pub sources: &'a [Source],
    /// The `.env` file beside the first compose file, if any.
    pub dotenv: Option<&'a str>,
    /// The process environment: wins over `.env`.
    pub env: &'a BTreeMap<String, String>,
    /// `env_file:` reader.
    pub files: &'a dyn Files,
}

/// The conversion's result.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Networks, volumes, secrets, configs, then services, in the files' order.
    pub manifests: Vec<Manifest>,
    /// One line per key not honoured (without a `warning:` prefix).
    pub warnings: Vec<String>,
    /// Images `rctl stack deploy` builds first (`build:`); each service's image is then
    /// pinned to its build's digest.
    pub builds: Vec<build::Build>,
}

/// Whether a YAML text looks like a compose file rather than a Rudder manifest: a mapping with
/// a top-level `services:` key and no `kind:`.
pub fn is_compose(text: &str) -> bool {
    let mut services = false;
    for line in text.lines() {
        if line.starts_with("kind:") {
            return false;
        }
        if line.starts_with("services:") {
            services = true;
        }
    }
    services
}

/// The stack name for a compose file applied without one (`rctl apply -f`): its top-level
/// `name:` if any, else the directory's name, as compose's project name, made a Rudder name.
pub fn default_stack_name(text: &str, dir_name: &str) -> String {
    let top = serde_yaml::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_string));
    let n = dns_name(top.as_deref().unwrap_or(dir_name));
    if n.is_empty() {
        "stack".into()
    } else {
        n
    }
}

/// `payment_gateway` → `payment-gateway`: lowercase, `[a-z0-9-]` only, no `-` at the ends.
pub fn dns_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.trim_matches('-').to_string()
}

/// Converts the files to manifests. See the module doc.
pub fn convert(input: &Input) -> Result<Stack, ComposeError> {
    let first = input
        .sources
        .first()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    let bare = |field: &str, message: String| ComposeError {
        file: first.clone(),
        line: 0,
        field: field.into(),
        message,
    };
    crate::spec::validate_name("stack", input.stack).map_err(|e| bare("stack", e.message))?;
    if input.stack.len() > 40 {
        return Err(bare(
            "stack",
            "a stack name has at most 40 characters (it prefixes every name)".into(),
        ));
    }
    if input.sources.is_empty() {
        return Err(bare(".", "no compose file given".into()));
    }
    // Variables: `.env`, then the process environment over it.
    let mut vars = BTreeMap::new();
    if let Some(text) = input.dotenv {
        if text.len() > MAX_FILE {
            return Err(bare(".env", "over 1 MiB".into()));
        }
        for (k, v) in interpolate::parse_env_file(text).map_err(|e| bare(".env", e))? {
            if let Some(v) = v {
                vars.insert(k, v);
            }
        }
    }
    vars.extend(input.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut warnings = Vec::new();
    let mut merged: Option<Value> = None;
    for src in input.sources {
        let at = |field: &str, message: String, line: usize| ComposeError {
            file: src.name.clone(),
            line,
            field: field.into(),
            message,
        };
        if src.text.len() > MAX_FILE {
            return Err(at(".", "over 1 MiB".into(), 0));
        }
        let mut v: Value = serde_yaml::from_str(&src.text).map_err(|e| {
            let line = e.location().map(|l| l.line()).unwrap_or(0);
            let mut m = e.to_string();
            if let Some(i) = m.find(" at line ") {
                m.truncate(i);
            }
            at(".", m, line)
        })?;
        v.apply_merge()
            .map_err(|e| at(".", format!("merge key: {e}"), 0))?;
        let Value::Mapping(map) = &mut v else {
            return Err(at(
                ".",
                "a compose file is a mapping (services: ...)".into(),
                1,
            ));
        };
        strip_extensions(map, 0);
        let mut unset = Vec::new();
        interpolate_value(&mut v, &mut String::new(), &vars, &mut unset).map_err(
            |(path, message)| {
                let line = locate(&src.text, &path);
                at(&path, message, line)
            },
        )?;
        for u in unset {
            warnings.push(format!(
                "{}: variable {u} is not set: using an empty string",
                src.name
            ));
        }
        merged = Some(match merged {
            None => v,
            Some(base) => merge(base, v, ""),
        });
    }
    let root = merged.unwrap_or(Value::Null);
    let mut cx = Cx {
        stack: input.stack.to_string(),
        sources: input.sources,
        vars,
        files: input.files,
        warnings,
        networks: BTreeMap::new(),
        volumes: BTreeMap::new(),
        secrets: BTreeMap::new(),
        configs: BTreeMap::new(),
        default_used: false,
        depends: BTreeMap::new(),
        builds: Vec::new(),
    };
    let out = cx.convert(&root)?;
    Ok(Stack {
        manifests: out,
        warnings: cx.warnings,
        builds: cx.builds,
    })
}

/// Drops `x-*` keys at the top and inside each top-level section's entries.
fn strip_extensions(map: &mut Mapping, depth: usize) {
    map.retain(|k, _| !k.as_str().is_some_and(|k| k.starts_with("x-")));
    if depth < 2 {
        for (_, v) in map.iter_mut() {
            if let Value::Mapping(m) = v {
                strip_extensions(m, depth + 1);
            }
        }
    }
}

fn interpolate_value(
    v: &mut Value,
    path: &mut String,
    vars: &BTreeMap<String, String>,
    unset: &mut Vec<String>,
) -> Result<(), (String, String)> {
    match v {
        Value::String(s) => {
            *s = interpolate::interpolate(s, vars, unset)
                .map_err(|e| (path.clone(), e.to_string()))?;
        }
        Value::Sequence(seq) => {
            for (i, item) in seq.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                interpolate_value(item, path, vars, unset)?;
                path.truncate(len);
            }
        }
        Value::Mapping(m) => {
            for (k, item) in m.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key_str(k));
                interpolate_value(item, path, vars, unset)?;
                path.truncate(len);
            }
        }
        Value::Tagged(t) => interpolate_value(&mut t.value, path, vars, unset)?,
        _ => {}
    }
    Ok(())
}

pub(crate) fn key_str(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => "?".into(),
    }
}

/// Keys whose sequences an override replaces rather than extends.
const REPLACED: &[&str] = &["command", "entrypoint", "test"];
/// Keys whose list form is a map (`K=V`): merged as maps.
const MAP_LISTS: &[&str] = &["environment", "labels", "sysctls", "extra_hosts", "args"];
/// Keys whose items are merged by mount target.
const BY_TARGET: &[&str] = &["volumes", "secrets", "configs"];

/// Merges an override into a base, per the compose spec: mappings key by key, scalars and
/// `command`/`entrypoint`/`healthcheck.test` replaced, `environment`-like lists as maps,
/// `volumes`/`secrets`/`configs` by target, other sequences appended without duplicates.
pub(crate) fn merge(base: Value, over: Value, key: &str) -> Value {
    match (base, over) {
        (Value::Mapping(mut b), Value::Mapping(o)) => {
            for (k, ov) in o {
                let ks = key_str(&k);
                let nv = match b.remove(&k) {
                    Some(bv) => merge(bv, ov, &ks),
                    None => ov,
                };
                b.insert(k, nv);
            }
            Value::Mapping(b)
        }
        (b, o) if MAP_LISTS.contains(&key) => match (as_map(&b), as_map(&o)) {
            (Some(mut bm), Some(om)) => {
                bm.extend(om);
                Value::Mapping(bm)
            }
            _ => o,
        },
        (Value::Sequence(b), Value::Sequence(o)) if !REPLACED.contains(&key) => {
            let mut out = b;
            for item in o {
                if BY_TARGET.contains(&key) {
                    let t = service::item_target(&item);
                    if t.is_some() {
                        out.retain(|x| service::item_target(x) != t);
                    }
                }
                if !out.contains(&item) {
                    out.push(item);
                }
            }
            Value::Sequence(out)
        }
        (_, o) => o,
    }
}

/// A `K=V` list or a map, as a map (values as written; `K` alone maps to null).
fn as_map(v: &Value) -> Option<Mapping> {
    match v {
        Value::Mapping(m) => Some(m.clone()),
        Value::Sequence(s) => {
            let mut m = Mapping::new();
            for item in s {
                let t = item.as_str()?;
                match t.split_once('=') {
                    Some((k, v)) => m.insert(Value::from(k), Value::from(v)),
                    None => m.insert(Value::from(t), Value::Null),
                };
            }
            Some(m)
        }
        Value::Null => Some(Mapping::new()),
        _ => None,
    }
}

/// Line (1-based) of a dotted key path in `text`, following indentation; 0 when not found.
/// Index segments (`[i]`) are skipped: the line is then the list's key.
pub(crate) fn locate(text: &str, path: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut start = 0;
    let mut parent: Option<usize> = None;
    let mut found = 0;
    for seg in path.split('.') {
        let seg = seg.split('[').next().unwrap_or(seg);
        if seg.is_empty() {
            continue;
        }
        let mut hit = None;
        for (i, l) in lines.iter().enumerate().skip(start) {
            let t = l.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if parent.is_some_and(|p| indent(l) <= p) && !t.starts_with("- ") {
                break;
            }
            let t = t.strip_prefix("- ").unwrap_or(t);
            let quoted = |q: char| t.starts_with(&format!("{q}{seg}{q}:"));
            if t.starts_with(&format!("{seg}:")) || quoted('"') || quoted('\'') {
                hit = Some(i);
                break;
            }
        }
        match hit {
            Some(i) => {
                found = i + 1;
                start = i + 1;
                parent = Some(indent(lines[i]));
            }
            None => break,
        }
    }
    found
}

/// Conversion state: names of the top-level objects and the warnings so far.
pub(crate) struct Cx<'a> {
    pub(crate) stack: String,
    sources: &'a [Source],
    pub(crate) vars: BTreeMap<String, String>,
    pub(crate) files: &'a dyn Files,
    pub(crate) warnings: Vec<String>,
    /// Compose network name → Rudder name.
    pub(crate) networks: BTreeMap<String, String>,
    /// Compose volume name → Rudder name.
    pub(crate) volumes: BTreeMap<String, String>,
    /// Compose secret name → Rudder name.
    pub(crate) secrets: BTreeMap<String, String>,
    /// Compose config name → Rudder name.
    pub(crate) configs: BTreeMap<String, String>,
    /// Whether some service joins the stack's default network.
    pub(crate) default_used: bool,
    /// Compose service name → its `depends_on`, by compose names (resolved once every service
    /// is converted).
    pub(crate) depends: BTreeMap<String, Vec<crate::depends::Dependency>>,
    /// Images to build (`build:`), in the services' order.
    pub(crate) builds: Vec<build::Build>,
}

impl Cx<'_> {
    /// An error at `field`, located in the last file that holds it.
    pub(crate) fn err(&self, field: &str, message: impl Into<String>) -> ComposeError {
        let mut file = self.sources[0].name.clone();
        let mut line = 0;
        for s in self.sources.iter().rev() {
            let l = locate(&s.text, field);
            if l > 0 {
                file = s.name.clone();
                line = l;
                break;
            }
        }
        ComposeError {
            file,
            line,
            field: field.into(),
            message: message.into(),
        }
    }

    /// One warning about `field`.
    pub(crate) fn warn(&mut self, field: &str, message: impl std::fmt::Display) {
        let at = self
            .sources
            .iter()
            .rev()
            .find_map(|s| {
                let l = locate(&s.text, field);
                (l > 0).then(|| format!(" ({}:{l})", s.name))
            })
            .unwrap_or_default();
        self.warnings.push(format!("{field}{at}: {message}"));
    }

    pub(crate) fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(STACK_LABEL.to_string(), self.stack.clone())])
    }

    /// `S-n` for a service, network or volume named `name` in the compose file.
    pub(crate) fn dns(&self, field: &str, name: &str) -> Result<String, ComposeError> {
        let n = dns_name(name);
        if n.is_empty() {
            return Err(self.err(
                field,
                format!("{name:?} has no letter or digit to name it by"),
            ));
        }
        let full = format!("{}-{n}", self.stack);
        crate::spec::validate_name(field, &full).map_err(|e| self.err(field, e.message))?;
        Ok(full)
    }

    fn convert(&mut self, root: &Value) -> Result<Vec<Manifest>, ComposeError> {
        let Value::Mapping(top) = root else {
            return Err(self.err(".", "a compose file is a mapping (services: ...)"));
        };
        for (k, _) in top {
            let k = key_str(k);
            match k.as_str() {
                "services" | "networks" | "volumes" | "secrets" | "configs" => {}
                "version" => self.warn("version", "obsolete in the compose specification; ignored"),
                "name" => self.warn(
                    "name",
                    format!(
                        "the stack's name is {:?} (given to rctl); ignored",
                        self.stack
                    ),
                ),
                other => self.warn(other, "not supported by Rudder; ignored"),
            }
        }
        let mut out = Vec::new();
        self.networks_section(top.get("networks"), &mut out)?;
        self.volumes_section(top.get("volumes"), &mut out)?;
        self.secrets_section("secrets", top.get("secrets"), &mut out)?;
        self.secrets_section("configs", top.get("configs"), &mut out)?;
        let Some(Value::Mapping(services)) = top.get("services") else {
            return Err(self.err("services", "a compose file needs a `services:` mapping"));
        };
        let mut specs = Vec::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (name, def) in services {
            let name = key_str(name);
            let spec = service::convert(self, &name, def)?;
            spec.validate().map_err(|e| {
                self.err(
                    &format!("services.{name}"),
                    format!("as Rudder's service field {}: {}", e.field, e.message),
                )
            })?;
            if let Some(other) = seen.insert(spec.name.clone(), name.clone()) {
                return Err(self.err(
                    &format!("services.{name}"),
                    format!(
                        "maps to the Rudder name {:?} as service {other:?} does: rename one",
                        spec.name
                    ),
                ));
            }
            specs.push(spec);
        }
        for spec in &mut specs {
            if let Some(deps) = seen.get(&spec.name).and_then(|c| self.depends.remove(c)) {
                spec.depends_on = deps;
            }
        }
        depends::check(self, &mut specs, &seen)?;
        // Dependencies first, so that `stack config` reads in start order.
        let order = crate::depends::start_order(&specs);
        specs.sort_by_key(|s| order.iter().position(|n| *n == s.name));
        if self.default_used && !self.networks.contains_key("default") {
            out.insert(
                0,
                Manifest::Network(NetworkSpec {
                    name: format!("{}-default", self.stack),
                    driver: Default::default(),
                    subnet: None,
                    encrypted: true,
                    internal: false,
                    labels: self.labels(),
                }),
            );
        }
        out.extend(specs.into_iter().map(Manifest::Service));
        // Every object was validated as `rctl apply` validates it, so `stack config` shows
        // only what apply accepts.
        Ok(out)
    }

    /// The named definitions of a top-level section (`networks`, `volumes`): each name, its
    /// key path for errors, and its mapping (empty when the name is given with nothing).
    fn definitions(
        &self,
        section: &str,
        v: Option<&Value>,
    ) -> Result<Vec<(String, String, Mapping)>, ComposeError> {
        let Some(v) = v else { return Ok(Vec::new()) };
        let Value::Mapping(m) = v else {
            return Err(self.err(
                section,
                format!(
                    "expected a mapping of {} names",
                    section.trim_end_matches('s')
                ),
            ));
        };
        let mut out = Vec::with_capacity(m.len());
        for (name, def) in m {
            let name = key_str(name);
            let field = format!("{section}.{name}");
            let def = match def {
                Value::Mapping(d) => d.clone(),
                Value::Null => Mapping::new(),
                _ => return Err(self.err(&field, "expected a mapping or nothing")),
            };
            out.push((name, field, def));
        }
        Ok(out)
    }

    fn networks_section(
        &mut self,
        v: Option<&Value>,
        out: &mut Vec<Manifest>,
    ) -> Result<(), ComposeError> {
        for (name, field, def) in self.definitions("networks", v)? {
            let def = &def;
            let explicit = def.get("name").and_then(Value::as_str).map(str::to_string);
            if truthy(def.get("external")) {
                let n = explicit.unwrap_or_else(|| name.clone());
                self.networks.insert(name, n);
                continue;
            }
            let rname = match explicit {
                Some(n) => n,
                None => self.dns(&field, &name)?,
            };
            let mut spec = NetworkSpec {
                name: rname.clone(),
                driver: Default::default(),
                subnet: None,
                encrypted: true,
                internal: false,
                labels: self.labels(),
            };
            for (k, val) in def {
                let k = key_str(k);
                let f = format!("{field}.{k}");
                match k.as_str() {
                    "name" | "external" | "attachable" => {}
                    "driver" => match val.as_str() {
                        Some("overlay") | None => {}
                        Some(d) => self.warn(
                            &f,
                            format!("driver {d:?} is not Rudder's: the network is an overlay"),
                        ),
                    },
                    "driver_opts" => {
                        if let Value::Mapping(o) = val {
                            for (ok, _) in o {
                                let ok = key_str(ok);
                                if ok != "encrypted" {
                                    self.warn(
                                        &format!("{f}.{ok}"),
                                        "not supported by Rudder; ignored",
                                    );
                                }
                            }
                        }
                    }
                    "internal" => spec.internal = truthy(Some(val)),
                    "labels" => {
                        for (lk, lv) in service::kv(self, &f, val)? {
                            spec.labels.insert(lk, lv.unwrap_or_default());
                        }
                    }
                    "ipam" => {
                        let configs = val.get("config").and_then(Value::as_sequence);
                        for (i, c) in configs.into_iter().flatten().enumerate() {
                            let cf = format!("{f}.config[{i}]");
                            if let Value::Mapping(c) = c {
                                for (ck, cv) in c {
                                    match (key_str(ck).as_str(), i) {
                                        ("subnet", 0) => {
                                            spec.subnet = cv.as_str().map(str::to_string)
                                        }
                                        (other, _) => self.warn(
                                            &format!("{cf}.{other}"),
                                            "Rudder takes one subnet per network; ignored",
                                        ),
                                    }
                                }
                            }
                        }
                        if val.get("driver").is_some() {
                            self.warn(&format!("{f}.driver"), "not supported by Rudder; ignored");
                        }
                    }
                    _ => self.warn(&f, "not supported by Rudder; ignored"),
                }
            }
            spec.validate()
                .map_err(|e| self.err(&field, format!("{}: {}", e.field, e.message)))?;
            self.networks.insert(name, rname);
            out.push(Manifest::Network(spec));
        }
        Ok(())
    }

    fn volumes_section(
        &mut self,
        v: Option<&Value>,
        out: &mut Vec<Manifest>,
    ) -> Result<(), ComposeError> {
        for (name, field, def) in self.definitions("volumes", v)? {
            let def = &def;
            let explicit = def.get("name").and_then(Value::as_str).map(str::to_string);
            if truthy(def.get("external")) {
                self.volumes.insert(name.clone(), explicit.unwrap_or(name));
                continue;
            }
            let rname = match explicit {
                Some(n) => n,
                None => self.dns(&field, &name)?,
            };
            let mut spec = VolumeSpec::named(&rname);
            spec.labels = self.labels();
            for (k, val) in def {
                let k = key_str(k);
                let f = format!("{field}.{k}");
                match k.as_str() {
                    "name" | "external" => {}
                    "driver" if val.as_str() == Some("local") => {}
                    "labels" => {
                        for (lk, lv) in service::kv(self, &f, val)? {
                            spec.labels.insert(lk, lv.unwrap_or_default());
                        }
                    }
                    _ => self.warn(
                        &f,
                        "not supported by Rudder (volumes are local directories); ignored",
                    ),
                }
            }
            spec.validate()
                .map_err(|e| self.err(&field, format!("{}: {}", e.field, e.message)))?;
            if self.volumes.values().any(|n| n == &rname) {
                return Err(self.err(&field, format!("maps to {rname:?} as another volume does")));
            }
            self.volumes.insert(name, rname);
            out.push(Manifest::Volume(spec));
        }
        Ok(())
    }

    fn secrets_section(
        &mut self,
        section: &str,
        v: Option<&Value>,
        out: &mut Vec<Manifest>,
    ) -> Result<(), ComposeError> {
        let Some(v) = v else { return Ok(()) };
        let Value::Mapping(m) = v else {
            return Err(self.err(section, "expected a mapping of names"));
        };
        for (name, def) in m {
            let name = key_str(name);
            let field = format!("{section}.{name}");
            let Value::Mapping(def) = def else {
                return Err(self.err(
                    &field,
                    "expected a mapping (file:, environment: or external:)",
                ));
            };
            let explicit = def.get("name").and_then(Value::as_str).map(str::to_string);
            let names = if section == "secrets" {
                &mut self.secrets
            } else {
                &mut self.configs
            };
            if truthy(def.get("external")) {
                names.insert(name.clone(), explicit.unwrap_or(name));
                continue;
            }
            let rname = explicit.unwrap_or_else(|| format!("{}-{name}", self.stack));
            names.insert(name.clone(), rname.clone());
            let mut spec = SecretSpec {
                name: rname,
                labels: self.labels(),
                data: None,
                file: None,
            };
            for (k, val) in def {
                let k = key_str(k);
                let f = format!("{field}.{k}");
                match k.as_str() {
                    "name" | "external" => {}
                    "file" => spec.file = val.as_str().map(str::to_string),
                    "environment" => {
                        let var = val.as_str().unwrap_or_default();
                        let value = self.vars.get(var).cloned().ok_or_else(|| {
                            self.err(
                                &f,
                                format!("variable {var} is not set (in the environment or .env)"),
                            )
                        })?;
                        spec.data = Some(SecretText(value));
                    }
                    "content" => spec.data = val.as_str().map(|s| SecretText(s.to_string())),
                    "labels" => {
                        for (lk, lv) in service::kv(self, &f, val)? {
                            spec.labels.insert(lk, lv.unwrap_or_default());
                        }
                    }
                    _ => self.warn(&f, "not supported by Rudder; ignored"),
                }
            }
            spec.validate()
                .map_err(|e| self.err(&field, format!("{}: {}", e.field, e.message)))?;
            out.push(if section == "secrets" {
                Manifest::Secret(spec)
            } else {
                Manifest::Config(spec)
            });
        }
        Ok(())
    }
}

/// `true`, `"true"`, `yes`: compose's booleans (also `external: {name: x}`, the old form).
pub(crate) fn truthy(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => matches!(s.as_str(), "true" | "yes" | "1"),
        Some(Value::Mapping(_)) => true,
        _ => false,
    }
}

/// The manifests as YAML documents, as `rctl apply -f` reads them. Secret and config values
/// are never printed: a `data` value is replaced by a comment.
pub fn to_yaml(manifests: &[Manifest]) -> String {
    let mut out = String::new();
    for m in manifests {
        out.push_str("---\n");
        let mut map = Mapping::new();
        map.insert("kind".into(), m.kind().into());
        let body = match m {
            Manifest::Service(s) => serde_yaml::to_value(s).ok(),
            Manifest::Network(n) => serde_yaml::to_value(n).ok(),
            Manifest::Volume(v) => serde_yaml::to_value(v).ok(),
            Manifest::Secret(s) | Manifest::Config(s) => {
                let mut b = Mapping::new();
                b.insert("name".into(), s.name.clone().into());
                b.insert(
                    "labels".into(),
                    serde_yaml::to_value(&s.labels).unwrap_or(Value::Null),
                );
                if let Some(f) = &s.file {
                    b.insert("file".into(), f.clone().into());
                }
                Some(Value::Mapping(b))
            }
        };
        if let Some(Value::Mapping(b)) = body {
            map.extend(b);
        }
        out.push_str(&serde_yaml::to_string(&Value::Mapping(map)).unwrap_or_default());
        if let Manifest::Secret(s) | Manifest::Config(s) = m {
            if let Some(d) = &s.data {
                out.push_str(&format!("# data: <{} bytes, not shown>\n", d.0.len()));
            }
        }
    }
    out
}

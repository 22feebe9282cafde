//! The Dockerfile front end: [`parse`] turns a Dockerfile into stages of [`Step`]s, and a
//! [`StageBuilder`] walks one stage's steps in order, keeping the image [`Settings`] and the
//! variables in scope, and tells the executor what each step means ([`Action`]).
//!
//! The rules are docker's (BuildKit's parser and its shell-word expansion), so a Dockerfile
//! that builds with `docker build` means the same here:
//! - instructions are case-insensitive; `#` lines are comments, also between continuation lines;
//!   the escape character (`\`, or `` ` `` with the `# escape=` parser directive) ends a line
//!   that continues on the next;
//! - RUN/CMD/ENTRYPOINT take a JSON array (exec form) or a string (shell form; an invalid
//!   JSON array is shell form too, as in docker), SHELL only a JSON array, COPY/ADD/VOLUME
//!   either a JSON array or words;
//! - variables (`$V`, `${V}`, `${V:-default}`, `${V:+alt}`, …) are substituted in ENV, ARG,
//!   LABEL, WORKDIR, USER, EXPOSE, VOLUME, STOPSIGNAL, COPY/ADD and FROM — never in
//!   RUN/CMD/ENTRYPOINT, whose shell does that with the environment RUN is given.
//!
//! Invariants: parsing keeps arguments exactly as written (quotes and `$` references intact),
//! because what they mean depends on the variables in scope when the step runs; substitution
//! happens only in [`StageBuilder::step`] and [`resolve_from`]. Nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet};

/// A Dockerfile that cannot be parsed, or a step that cannot be applied. `line` is the 1-based
/// line of the instruction's first line (0: not about a line, e.g. a base image's config).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {message}")]
pub struct DockerfileError {
    pub line: usize,
    pub message: String,
}

impl DockerfileError {
    fn new(line: usize, message: impl Into<String>) -> DockerfileError {
        DockerfileError {
            line,
            message: message.into(),
        }
    }
}

/// The shell of shell-form RUN/CMD/ENTRYPOINT when neither SHELL nor the base image set one.
pub const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// Build args docker hands to RUN without an ARG declaring them (and never persists), so that
/// builds behind a proxy work unchanged.
pub const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// The platform args BuildKit predefines: usable in FROM without an ARG, and inside a stage
/// once declared (`ARG TARGETARCH`). The executor passes them in the build args
/// ([`platform_args`]); they never count as unused.
pub const PLATFORM_ARGS: [&str; 8] = [
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
];

/// The [`PLATFORM_ARGS`] for building on and for one platform (`linux`, `amd64`, variant or
/// ""), to merge under the user's build args (which win).
pub fn platform_args(os: &str, arch: &str, variant: &str) -> BTreeMap<String, String> {
    let platform = if variant.is_empty() {
        format!("{os}/{arch}")
    } else {
        format!("{os}/{arch}/{variant}")
    };
    let mut args = BTreeMap::new();
    for side in ["TARGET", "BUILD"] {
        args.insert(format!("{side}PLATFORM"), platform.clone());
        args.insert(format!("{side}OS"), os.to_string());
        args.insert(format!("{side}ARCH"), arch.to_string());
        args.insert(format!("{side}VARIANT"), variant.to_string());
    }
    args
}

/// Build args that are used without an ARG naming them (proxy and platform args).
fn predefined(name: &str) -> bool {
    PROXY_ARGS.contains(&name) || PLATFORM_ARGS.contains(&name)
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The ARGs before the first FROM: the only variables FROM (and `COPY --from`) can use, and
    /// the defaults a stage's value-less `ARG NAME` picks up.
    pub global_args: Vec<ArgDecl>,
    /// At least one.
    pub stages: Vec<Stage>,
    /// The escape character in effect (`\`, or `` ` `` by the `# escape=` directive).
    pub escape: char,
}

/// `ARG NAME[=default]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    pub name: String,
    /// As written (quotes and `$` references intact): substituted when the ARG is applied.
    pub default: Option<String>,
    pub line: usize,
}

/// One `FROM` and the steps up to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// 0-based position in the file: what `COPY --from=<index>` names.
    pub index: usize,
    /// `FROM x AS name`, lowercased (stage names are case-insensitive).
    pub name: Option<String>,
    /// The base as written, unsubstituted: see [`resolve_from`].
    pub from: String,
    pub line: usize,
    pub steps: Vec<Step>,
    /// The file's escape character, needed to substitute `from`.
    pub escape: char,
}

/// One instruction of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The 1-based line the instruction starts on.
    pub line: usize,
    /// The instruction as written (continuations joined, comments dropped): shown as progress.
    /// An `ARG A B` with several names becomes one step per name, each with this same text.
    pub text: String,
    pub instr: Instr,
    /// The file's escape character, needed to substitute this step's arguments.
    pub escape: char,
}

/// An instruction with its arguments as written (see the module invariants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instr {
    Arg(ArgDecl),
    Env(Vec<(String, String)>),
    /// Also `MAINTAINER x`, as `maintainer=x` (what docker recommends instead of it).
    Label(Vec<(String, String)>),
    Workdir(String),
    User(String),
    /// Words as written; one may expand to several ports (`EXPOSE $PORTS`, ranges).
    Expose(Vec<String>),
    Volume(Vec<String>),
    Cmd(Command),
    Entrypoint(Command),
    Run(Command),
    Copy(CopySpec),
    Add(CopySpec),
    Shell(Vec<String>),
    StopSignal(String),
    /// `HEALTHCHECK [--interval=…] CMD …` or `HEALTHCHECK NONE`: replaces the image's check.
    Healthcheck(Healthcheck),
    /// `ONBUILD INSTRUCTION`: the instruction as written (checked, not substituted), recorded in
    /// the image and run by builds that start FROM it.
    Onbuild(String),
}

/// RUN/CMD/ENTRYPOINT arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run by the shell (SHELL, default `/bin/sh -c`).
    Shell(String),
    /// A JSON array: the argv itself.
    Exec(Vec<String>),
}

/// COPY/ADD arguments, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// At least one.
    pub srcs: Vec<String>,
    pub dest: String,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    /// A stage name, a stage index or an image (COPY only).
    pub from: Option<String>,
}

/// The image settings a build carries from step to step: the `config` object of an OCI image
/// config.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// `K=V`, in order; a later ENV of the same name replaces the entry in place.
    pub env: Vec<String>,
    pub user: String,
    /// Empty means `/`.
    pub working_dir: String,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    /// `80/tcp`.
    pub exposed_ports: BTreeSet<String>,
    pub volumes: BTreeSet<String>,
    pub labels: BTreeMap<String, String>,
    /// Empty means [`DEFAULT_SHELL`].
    pub shell: Vec<String>,
    pub stop_signal: Option<String>,
    /// HEALTHCHECK; `None`: none set (the image has no `Healthcheck`).
    #[serde(default)]
    pub healthcheck: Option<Healthcheck>,
    /// ONBUILD triggers, as written, in order (the image config's `OnBuild`).
    #[serde(default)]
    pub onbuild: Vec<String>,
}

/// An image's health check (the `Healthcheck` object of an image config). Durations are in
/// nanoseconds, as in the image config; 0 means "the runtime's default".
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Healthcheck {
    /// `["NONE"]` (disables an inherited check), `["CMD", argv…]` or `["CMD-SHELL", command]`.
    pub test: Vec<String>,
    pub interval: u64,
    pub timeout: u64,
    pub start_period: u64,
    pub start_interval: u64,
    /// Consecutive failures before unhealthy; 0: the default.
    pub retries: u64,
}

impl Settings {
    /// From an image config blob's `config` object (PascalCase: Env, User, WorkingDir, Cmd,
    /// Entrypoint, ExposedPorts `{"80/tcp":{}}`, Volumes `{"/d":{}}`, Labels, StopSignal,
    /// Shell); nulls and absence are empty. Unknown fields are ignored. Errors (line 0) name
    /// the field that has the wrong type.
    pub fn from_config_json(config_blob: &[u8]) -> Result<Settings, DockerfileError> {
        let blob: serde_json::Value = serde_json::from_slice(config_blob)
            .map_err(|e| DockerfileError::new(0, format!("image config: invalid JSON: {e}")))?;
        let config = match blob.get("config") {
            None | Some(serde_json::Value::Null) => return Ok(Settings::default()),
            Some(serde_json::Value::Object(m)) => m,
            Some(_) => {
                return Err(DockerfileError::new(
                    0,
                    "image config: \"config\" is not an object",
                ))
            }
        };
        Ok(Settings {
            env: json_strings(config, "Env")?.unwrap_or_default(),
            user: json_string(config, "User")?.unwrap_or_default(),
            working_dir: json_string(config, "WorkingDir")?.unwrap_or_default(),
            cmd: json_strings(config, "Cmd")?,
            entrypoint: json_strings(config, "Entrypoint")?,
            exposed_ports: json_keys(config, "ExposedPorts")?,
            volumes: json_keys(config, "Volumes")?,
            labels: json_labels(config)?,
            shell: json_strings(config, "Shell")?.unwrap_or_default(),
            stop_signal: json_string(config, "StopSignal")?.filter(|s| !s.is_empty()),
            healthcheck: json_healthcheck(config)?,
            onbuild: json_strings(config, "OnBuild")?.unwrap_or_default(),
        })
    }

    /// Writes these settings into an image config JSON value's `config` object (creating it),
    /// keeping the fields it does not model (ArgsEscaped, …). Empty
    /// settings are removed rather than written as empty values, as docker does.
    pub fn write_to(&self, image_config: &mut serde_json::Value) {
        use serde_json::{json, Map, Value};
        if !image_config.is_object() {
            *image_config = Value::Object(Map::new());
        }
        let Value::Object(root) = image_config else {
            return;
        };
        let config = root
            .entry("config")
            .or_insert_with(|| Value::Object(Map::new()));
        if !config.is_object() {
            *config = Value::Object(Map::new());
        }
        let Value::Object(config) = config else {
            return;
        };
        let mut set = |key: &str, value: Option<Value>| match value {
            Some(v) => {
                config.insert(key.to_string(), v);
            }
            None => {
                config.remove(key);
            }
        };
        let set_of = |items: &BTreeSet<String>| {
            (!items.is_empty())
                .then(|| Value::Object(items.iter().map(|k| (k.clone(), json!({}))).collect()))
        };
        set("Env", (!self.env.is_empty()).then(|| json!(self.env)));
        set("User", (!self.user.is_empty()).then(|| json!(self.user)));
        set(
            "WorkingDir",
            (!self.working_dir.is_empty()).then(|| json!(self.working_dir)),
        );
        set("Cmd", self.cmd.as_ref().map(|c| json!(c)));
        set("Entrypoint", self.entrypoint.as_ref().map(|e| json!(e)));
        set("ExposedPorts", set_of(&self.exposed_ports));
        set("Volumes", set_of(&self.volumes));
        set(
            "Labels",
            (!self.labels.is_empty()).then(|| json!(self.labels)),
        );
        set("Shell", (!self.shell.is_empty()).then(|| json!(self.shell)));
        set("StopSignal", self.stop_signal.as_ref().map(|s| json!(s)));
        set(
            "OnBuild",
            (!self.onbuild.is_empty()).then(|| json!(self.onbuild)),
        );
        set(
            "Healthcheck",
            self.healthcheck.as_ref().map(|h| {
                let mut o = Map::new();
                o.insert("Test".into(), json!(h.test));
                for (k, v) in [
                    ("Interval", h.interval),
                    ("Timeout", h.timeout),
                    ("StartPeriod", h.start_period),
                    ("StartInterval", h.start_interval),
                    ("Retries", h.retries),
                ] {
                    if v != 0 {
                        o.insert(k.into(), json!(v));
                    }
                }
                Value::Object(o)
            }),
        );
    }

    /// The shell shell-form commands run with: SHELL's, else [`DEFAULT_SHELL`].
    pub fn shell_or_default(&self) -> Vec<String> {
        if self.shell.is_empty() {
            DEFAULT_SHELL.iter().map(|s| s.to_string()).collect()
        } else {
            self.shell.clone()
        }
    }

    /// The value of environment variable `name` (the last `name=` entry).
    pub fn env_value(&self, name: &str) -> Option<&str> {
        env_lookup(&self.env, name)
    }
}

fn json_type_error(field: &str, want: &str) -> DockerfileError {
    DockerfileError::new(
        0,
        format!("image config: config field {field:?} is not {want}"),
    )
}

fn json_string(
    config: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<Option<String>, DockerfileError> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(json_type_error(field, "a string")),
    }
}

fn json_strings(
    config: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<Option<Vec<String>>, DockerfileError> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| json_type_error(field, "an array of strings"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(json_type_error(field, "an array of strings")),
    }
}

fn json_keys(
    config: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<BTreeSet<String>, DockerfileError> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(BTreeSet::new()),
        Some(serde_json::Value::Object(m)) => Ok(m.keys().cloned().collect()),
        Some(_) => Err(json_type_error(field, "an object")),
    }
}

fn json_labels(
    config: &serde_json::Map<String, serde_json::Value>,
) -> Result<BTreeMap<String, String>, DockerfileError> {
    match config.get("Labels") {
        None | Some(serde_json::Value::Null) => Ok(BTreeMap::new()),
        Some(serde_json::Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(json_type_error("Labels", "an object of strings")),
            })
            .collect(),
        Some(_) => Err(json_type_error("Labels", "an object of strings")),
    }
}

fn json_healthcheck(
    config: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<Healthcheck>, DockerfileError> {
    let h = match config.get("Healthcheck") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Object(h)) => h,
        Some(_) => return Err(json_type_error("Healthcheck", "an object")),
    };
    let number = |field: &str| -> Result<u64, DockerfileError> {
        match h.get(field) {
            None | Some(serde_json::Value::Null) => Ok(0),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| json_type_error(&format!("Healthcheck.{field}"), "a number")),
        }
    };
    Ok(Some(Healthcheck {
        test: json_strings(h, "Test")
            .map_err(|_| json_type_error("Healthcheck.Test", "an array of strings"))?
            .unwrap_or_default(),
        interval: number("Interval")?,
        timeout: number("Timeout")?,
        start_period: number("StartPeriod")?,
        start_interval: number("StartInterval")?,
        retries: number("Retries")?,
    }))
}

fn env_lookup<'a>(env: &'a [String], name: &str) -> Option<&'a str> {
    env.iter().rev().find_map(|e| match e.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if e == name => Some(""),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Parses a Dockerfile. Every error names the 1-based line of the offending instruction.
pub fn parse(text: &str) -> Result<Dockerfile, DockerfileError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.lines().collect();
    let escape = parse_directives(&lines)?;
    let mut global_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    let mut last_line = 0;
    for Logical {
        line,
        text: joined,
        heredocs,
    } in logical_lines(&lines, escape)?
    {
        last_line = line;
        let text = joined.trim();
        let (keyword, rest) = match text.find(char::is_whitespace) {
            Some(p) => (&text[..p], text[p..].trim_start()),
            None => (text, ""),
        };
        let lower = keyword.to_ascii_lowercase();
        let (flags, rest) = Flags::extract(rest, line)?;
        if lower == "from" {
            stages.push(parse_from(&flags, rest, line, escape, &stages)?);
            continue;
        }
        let instrs = if heredocs.is_empty() {
            parse_instruction(keyword, &lower, flags, rest, line, escape)?
        } else if lower == "run" {
            flags.check("RUN", &[], &["mount", "network", "security"], line)?;
            vec![Instr::Run(Command::Shell(heredoc_command(
                rest, &heredocs, line,
            )?))]
        } else {
            return Err(DockerfileError::new(
                line,
                format!(
                    "{} from a here-document (<<{}) is not supported",
                    lower.to_ascii_uppercase(),
                    heredocs[0].name
                ),
            ));
        };
        match stages.last_mut() {
            None if lower == "arg" => {
                global_args.extend(instrs.into_iter().filter_map(|i| match i {
                    Instr::Arg(a) => Some(a),
                    _ => None,
                }));
            }
            None => {
                return Err(DockerfileError::new(
                    line,
                    format!(
                        "{} before the first FROM (only ARG may come before FROM)",
                        lower.to_ascii_uppercase()
                    ),
                ))
            }
            Some(stage) => stage.steps.extend(instrs.into_iter().map(|instr| Step {
                line,
                text: text.to_string(),
                instr,
                escape,
            })),
        }
    }
    if stages.is_empty() {
        let message = if last_line == 0 {
            "the Dockerfile is empty: it needs a FROM instruction"
        } else {
            "no FROM instruction: a Dockerfile needs at least one build stage"
        };
        return Err(DockerfileError::new(last_line.max(1), message));
    }
    Ok(Dockerfile {
        global_args,
        stages,
        escape,
    })
}

/// Reads the parser directives at the top of the file (`# escape=…`, `# syntax=…`,
/// `# check=…`) and returns the escape character. As in docker, directives end at the first
/// line that is not one (a comment, a blank line, an instruction, an unknown directive).
fn parse_directives(lines: &[&str]) -> Result<char, DockerfileError> {
    let mut escape = '\\';
    let mut seen = BTreeSet::new();
    for (i, raw) in lines.iter().enumerate() {
        let Some(body) = raw.trim_start().strip_prefix('#') else {
            break;
        };
        let Some((key, value)) = body.split_once('=') else {
            break;
        };
        let key = key.trim();
        let valid_name = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && key.chars().all(|c| c.is_ascii_alphanumeric());
        let key = key.to_ascii_lowercase();
        let value = value.trim();
        if !valid_name || value.is_empty() || !["escape", "syntax", "check"].contains(&&*key) {
            break;
        }
        if !seen.insert(key.clone()) {
            return Err(DockerfileError::new(
                i + 1,
                format!("only one {key} parser directive can be used"),
            ));
        }
        if key == "escape" {
            escape = match value {
                "\\" => '\\',
                "`" => '`',
                _ => {
                    return Err(DockerfileError::new(
                        i + 1,
                        format!("invalid escape token {value:?}: it must be ` or \\"),
                    ))
                }
            };
        }
    }
    Ok(escape)
}

fn is_comment(raw: &str) -> bool {
    raw.trim_start().starts_with('#')
}

/// Strips a trailing escape character (optionally followed by blanks): the line continues.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    match trimmed.strip_suffix(escape) {
        Some(rest) => (rest, false),
        None => (line, true),
    }
}

/// One instruction as read from the file.
struct Logical {
    /// The 1-based line it starts on.
    line: usize,
    /// Continuation lines joined.
    text: String,
    /// The here-documents of a RUN/COPY/ADD, in order.
    heredocs: Vec<Heredoc>,
}

/// `<<NAME` (or `<<-NAME`: leading tabs stripped) and the lines up to `NAME`.
struct Heredoc {
    name: String,
    chomp: bool,
    /// The body, each line ending in `\n`.
    data: String,
}

/// The here-document markers among the words of `args` (`<<EOF`, `<<-EOF`, `<<"EOF"`), as
/// BuildKit finds them: a word that starts with `<<` (not inside quotes).
fn heredoc_markers(args: &str, escape: char) -> Vec<(String, bool)> {
    parse_words(args, escape)
        .into_iter()
        .filter_map(|w| {
            let body = w.strip_prefix("<<")?;
            let (chomp, body) = match body.strip_prefix('-') {
                Some(b) => (true, b),
                None => (false, body),
            };
            let name = body.trim().trim_matches(|c| c == '"' || c == '\'');
            let valid = !name.is_empty() && !name.contains(['<', '>', '|', '&', ';', '(', ')']);
            valid.then(|| (name.to_string(), chomp))
        })
        .collect()
}

/// A RUN with here-documents as the shell command BuildKit gives the shell: a RUN that is only
/// `<<EOF` runs the body as the script; otherwise the command line and the bodies (with their
/// terminators) go to the shell, which handles the here-documents itself.
fn heredoc_command(
    args: &str,
    heredocs: &[Heredoc],
    line: usize,
) -> Result<String, DockerfileError> {
    let args = args.trim();
    if let [only] = heredocs {
        let marker = format!("<<{}", if only.chomp { "-" } else { "" });
        let bare = args
            .strip_prefix(&marker)
            .map(|n| n.trim().trim_matches(|c| c == '"' || c == '\'') == only.name)
            .unwrap_or(false);
        if bare {
            if only.data.starts_with("#!") {
                return Err(DockerfileError::new(
                    line,
                    "RUN with a here-document script that starts with #! is not supported: run the interpreter explicitly (RUN python3 <<EOF)",
                ));
            }
            return Ok(if only.chomp {
                only.data
                    .lines()
                    .map(|l| format!("{}\n", l.trim_start_matches('\t')))
                    .collect()
            } else {
                only.data.clone()
            });
        }
    }
    let mut full = args.to_string();
    for h in heredocs {
        full.push('\n');
        full.push_str(&h.data);
        full.push_str(&h.name);
    }
    Ok(full)
}

/// Joins continuation lines into instructions, dropping comments and blank lines (also those
/// between continuation lines, as docker does), and reads the here-documents of RUN, COPY and
/// ADD (their lines are taken as they are).
fn logical_lines(lines: &[&str], escape: char) -> Result<Vec<Logical>, DockerfileError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let first = lines[i].trim_start();
        i += 1;
        let start = i;
        if first.is_empty() || is_comment(first) {
            continue;
        }
        let (part, mut ended) = trim_continuation(first, escape);
        let mut joined = part.to_string();
        while !ended && i < lines.len() {
            let raw = lines[i];
            i += 1;
            if is_comment(raw) || raw.trim().is_empty() {
                continue;
            }
            let (part, e) = trim_continuation(raw, escape);
            joined.push_str(part);
            ended = e;
        }
        if joined.trim().is_empty() {
            continue;
        }
        let mut heredocs = Vec::new();
        let text = joined.trim();
        let (keyword, args) = text.split_at(text.find(char::is_whitespace).unwrap_or(text.len()));
        if ["run", "copy", "add"].contains(&keyword.to_ascii_lowercase().as_str()) {
            for (name, chomp) in heredoc_markers(args, escape) {
                let mut data = String::new();
                loop {
                    let Some(raw) = lines.get(i) else {
                        return Err(DockerfileError::new(
                            start,
                            format!("unterminated here-document: no line {name:?} after it"),
                        ));
                    };
                    i += 1;
                    let end = if chomp {
                        raw.trim_start_matches('\t')
                    } else {
                        raw
                    };
                    if end == name {
                        break;
                    }
                    data.push_str(raw);
                    data.push('\n');
                }
                heredocs.push(Heredoc { name, chomp, data });
            }
        }
        out.push(Logical {
            line: start,
            text: joined,
            heredocs,
        });
    }
    Ok(out)
}

/// The `--name[=value]` flags at the start of an instruction's arguments.
#[derive(Debug, Default)]
struct Flags {
    /// (name without dashes, value), in order.
    items: Vec<(String, Option<String>)>,
}

impl Flags {
    fn extract(rest: &str, line: usize) -> Result<(Flags, &str), DockerfileError> {
        let mut flags = Flags::default();
        let mut rest = rest.trim_start();
        while let Some(body) = rest.strip_prefix("--") {
            let end = body.find(char::is_whitespace).unwrap_or(body.len());
            let word = &body[..end];
            rest = body[end..].trim_start();
            if word.is_empty() {
                // A bare `--` ends the flags.
                break;
            }
            let (name, value) = match word.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (word, None),
            };
            if flags.items.iter().any(|(n, _)| n == name) {
                return Err(DockerfileError::new(
                    line,
                    format!("duplicate flag \"--{name}\""),
                ));
            }
            flags.items.push((name.to_string(), value));
        }
        Ok((flags, rest))
    }

    /// Fails on a flag `instr` does not take; `unsupported` ones get their own message.
    fn check(
        &self,
        instr: &str,
        allowed: &[&str],
        unsupported: &[&str],
        line: usize,
    ) -> Result<(), DockerfileError> {
        for (name, _) in &self.items {
            if allowed.contains(&name.as_str()) {
                continue;
            }
            let message = if unsupported.contains(&name.as_str()) {
                format!("flag \"--{name}\" of {instr} is not supported")
            } else {
                format!("unknown flag \"--{name}\" for {instr}")
            };
            return Err(DockerfileError::new(line, message));
        }
        Ok(())
    }

    /// A string flag's value; `--name` without `=value` is an error.
    fn string(&self, name: &str, line: usize) -> Result<Option<String>, DockerfileError> {
        match self.items.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, Some(v))) => Ok(Some(v.clone())),
            Some((_, None)) => Err(DockerfileError::new(
                line,
                format!("flag \"--{name}\" needs a value (--{name}=...)"),
            )),
        }
    }

    /// A boolean flag (`--link`, `--link=true`).
    fn boolean(&self, name: &str, line: usize) -> Result<bool, DockerfileError> {
        match self.items.iter().find(|(n, _)| n == name) {
            None => Ok(false),
            Some((_, None)) => Ok(true),
            Some((_, Some(v))) => match v.to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(DockerfileError::new(
                    line,
                    format!("flag \"--{name}\" expects true or false, not {v:?}"),
                )),
            },
        }
    }
}

fn parse_from(
    flags: &Flags,
    rest: &str,
    line: usize,
    escape: char,
    stages: &[Stage],
) -> Result<Stage, DockerfileError> {
    // The platform is accepted and ignored: a build runs on, and for, the host's platform.
    flags.check("FROM", &["platform"], &[], line)?;
    flags.string("platform", line)?;
    let words = parse_words(rest, escape);
    let (from, name) = match words.as_slice() {
        [] => {
            return Err(DockerfileError::new(
                line,
                "FROM requires at least one argument (FROM image [AS name])",
            ))
        }
        [from] => (from.clone(), None),
        [from, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
            (from.clone(), Some(name.to_ascii_lowercase()))
        }
        _ => {
            return Err(DockerfileError::new(
                line,
                format!(
                "FROM requires either one or three arguments (FROM image [AS name]), got {rest:?}"
            ),
            ))
        }
    };
    if let Some(name) = &name {
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
        if !valid {
            return Err(DockerfileError::new(
                line,
                format!(
                    "invalid stage name {name:?}: it must start with a letter and contain only letters, digits, '-', '_' and '.'"
                ),
            ));
        }
        if let Some(other) = stages.iter().find(|s| s.name.as_ref() == Some(name)) {
            return Err(DockerfileError::new(
                line,
                format!(
                    "duplicate stage name {name:?} (first used on line {})",
                    other.line
                ),
            ));
        }
    }
    Ok(Stage {
        index: stages.len(),
        name,
        from,
        line,
        steps: Vec::new(),
        escape,
    })
}

/// Parses every instruction but FROM. Returns several for `ARG A B`.
fn parse_instruction(
    keyword: &str,
    lower: &str,
    flags: Flags,
    rest: &str,
    line: usize,
    escape: char,
) -> Result<Vec<Instr>, DockerfileError> {
    let name = lower.to_ascii_uppercase();
    let err = |message: String| DockerfileError::new(line, message);
    let at_least_one = || err(format!("{name} requires at least one argument"));
    let exactly_one = || err(format!("{name} requires exactly one argument"));
    match lower {
        "run" => flags.check(&name, &[], &["mount", "network", "security"], line)?,
        "copy" => flags.check(
            &name,
            &["from", "chown", "chmod", "link"],
            &["parents", "exclude"],
            line,
        )?,
        "add" => {
            if flags.items.iter().any(|(n, _)| n == "from") {
                return Err(err(
                    "ADD does not support --from (use COPY --from=<stage|image>)".into(),
                ));
            }
            flags.check(
                &name,
                &["chown", "chmod", "link"],
                &["checksum", "keep-git-dir", "exclude"],
                line,
            )?
        }
        "healthcheck" => flags.check(
            &name,
            &[
                "interval",
                "timeout",
                "start-period",
                "start-interval",
                "retries",
            ],
            &[],
            line,
        )?,
        "onbuild" => {
            flags.check(&name, &[], &[], line)?;
            let trigger = rest.trim();
            if trigger.is_empty() {
                return Err(exactly_one());
            }
            let keyword = trigger.split_whitespace().next().unwrap_or_default();
            let kw = keyword.to_ascii_lowercase();
            if matches!(kw.as_str(), "onbuild" | "from" | "maintainer") {
                return Err(err(format!(
                    "{} isn't allowed as an ONBUILD trigger",
                    kw.to_ascii_uppercase()
                )));
            }
            // Checked now, run later: a trigger that does not parse is this line's error.
            let (trigger_flags, trigger_rest) = Flags::extract(&trigger[keyword.len()..], line)?;
            parse_instruction(keyword, &kw, trigger_flags, trigger_rest, line, escape)?;
            return Ok(vec![Instr::Onbuild(trigger.to_string())]);
        }
        "arg" | "env" | "label" | "workdir" | "user" | "expose" | "volume" | "cmd"
        | "entrypoint" | "shell" | "stopsignal" | "maintainer" => {
            flags.check(&name, &[], &[], line)?
        }
        _ => return Err(err(format!("unknown instruction {keyword:?}"))),
    }
    let rest = rest.trim();
    let instr = match lower {
        "arg" => {
            let words = parse_words(rest, escape);
            if words.is_empty() {
                return Err(at_least_one());
            }
            return words
                .into_iter()
                .map(|w| {
                    let (n, default) = match w.split_once('=') {
                        Some((n, v)) => (n.to_string(), Some(v.to_string())),
                        None => (w, None),
                    };
                    if n.is_empty() {
                        return Err(err("ARG names can not be blank".into()));
                    }
                    Ok(Instr::Arg(ArgDecl {
                        name: n,
                        default,
                        line,
                    }))
                })
                .collect();
        }
        "env" => Instr::Env(parse_name_values(&name, rest, line, escape)?),
        "label" => Instr::Label(parse_name_values(&name, rest, line, escape)?),
        "maintainer" => {
            if rest.is_empty() {
                return Err(exactly_one());
            }
            Instr::Label(vec![("maintainer".into(), literal(rest, escape))])
        }
        "workdir" | "user" | "stopsignal" => {
            if rest.is_empty() {
                return Err(exactly_one());
            }
            let value = rest.to_string();
            match lower {
                "workdir" => Instr::Workdir(value),
                "user" => Instr::User(value),
                _ => Instr::StopSignal(value),
            }
        }
        "expose" => {
            let words = parse_words(rest, escape);
            if words.is_empty() {
                return Err(at_least_one());
            }
            Instr::Expose(words)
        }
        "volume" => {
            let words = parse_list(&name, rest, line, escape)?;
            if words.is_empty() {
                return Err(at_least_one());
            }
            Instr::Volume(words)
        }
        "run" | "cmd" | "entrypoint" => {
            let command = match json_array(rest) {
                Json::Array(argv) => {
                    if argv.is_empty() && lower == "run" {
                        return Err(at_least_one());
                    }
                    Command::Exec(argv)
                }
                Json::NotStrings => {
                    return Err(err(format!(
                        "{name}: the JSON form must be an array of strings: {rest}"
                    )))
                }
                Json::Invalid if rest.is_empty() => return Err(at_least_one()),
                Json::Invalid => Command::Shell(rest.to_string()),
            };
            match lower {
                "run" => Instr::Run(command),
                "cmd" => Instr::Cmd(command),
                _ => Instr::Entrypoint(command),
            }
        }
        "healthcheck" => Instr::Healthcheck(parse_healthcheck(&flags, rest, line)?),
        "shell" => match json_array(rest) {
            Json::Array(argv) if argv.is_empty() => return Err(at_least_one()),
            Json::Array(argv) => Instr::Shell(argv),
            _ => {
                return Err(err(format!(
                    "SHELL requires the arguments to be in JSON form (an array of strings), got {rest:?}"
                )))
            }
        },
        "copy" | "add" => {
            let mut words = parse_list(&name, rest, line, escape)?;
            match words.len() {
                0 => return Err(err(format!("{name} requires at least two arguments: source(s) and destination"))),
                1 => {
                    return Err(err(format!(
                        "{name} requires at least two arguments, but only one was provided ({:?}): the destination could not be determined",
                        words[0]
                    )))
                }
                _ => {}
            }
            flags.boolean("link", line)?;
            let dest = words.pop().unwrap_or_default();
            let spec = CopySpec {
                srcs: words,
                dest,
                chown: flags.string("chown", line)?,
                chmod: flags.string("chmod", line)?,
                from: flags.string("from", line)?,
            };
            if lower == "copy" {
                Instr::Copy(spec)
            } else {
                Instr::Add(spec)
            }
        }
        _ => return Err(err(format!("unknown instruction {keyword:?}"))),
    };
    Ok(vec![instr])
}

/// `HEALTHCHECK [--interval=D] [--timeout=D] [--start-period=D] [--start-interval=D]
/// [--retries=N] CMD command` or `HEALTHCHECK NONE`; durations as Go writes them (`30s`,
/// `1m30s`, `500ms`), at least 1ms unless 0.
fn parse_healthcheck(
    flags: &Flags,
    rest: &str,
    line: usize,
) -> Result<Healthcheck, DockerfileError> {
    let err = |message: String| DockerfileError::new(line, message);
    let (kind, args) = match rest.find(char::is_whitespace) {
        Some(p) => (&rest[..p], rest[p..].trim()),
        None => (rest, ""),
    };
    match kind.to_ascii_uppercase().as_str() {
        "" => Err(err(
            "HEALTHCHECK requires at least one argument (CMD … or NONE)".into(),
        )),
        "NONE" => {
            if !args.is_empty() || !flags.items.is_empty() {
                return Err(err("HEALTHCHECK NONE takes no arguments or flags".into()));
            }
            Ok(Healthcheck {
                test: vec!["NONE".into()],
                ..Healthcheck::default()
            })
        }
        "CMD" => {
            let test = match json_array(args) {
                Json::Array(argv) if !argv.is_empty() => {
                    let mut test = vec!["CMD".to_string()];
                    test.extend(argv);
                    test
                }
                Json::Invalid if !args.is_empty() => vec!["CMD-SHELL".into(), args.to_string()],
                Json::NotStrings => {
                    return Err(err(format!(
                        "HEALTHCHECK: the JSON form must be an array of strings: {args}"
                    )))
                }
                _ => return Err(err("HEALTHCHECK CMD requires a command".into())),
            };
            let duration = |name: &str| -> Result<u64, DockerfileError> {
                let Some(v) = flags.string(name, line)? else {
                    return Ok(0);
                };
                let ns = go_duration(&v).ok_or_else(|| {
                    err(format!(
                        "HEALTHCHECK --{name}={v}: not a duration (like 30s, 1m30s, 500ms)"
                    ))
                })?;
                if ns != 0 && ns < 1_000_000 {
                    return Err(err(format!(
                        "HEALTHCHECK --{name}={v} cannot be less than 1ms"
                    )));
                }
                Ok(ns)
            };
            let retries = match flags.string("retries", line)? {
                None => 0,
                Some(r) => r.parse::<u64>().map_err(|_| {
                    err(format!(
                        "HEALTHCHECK --retries={r}: not a non-negative number"
                    ))
                })?,
            };
            Ok(Healthcheck {
                test,
                interval: duration("interval")?,
                timeout: duration("timeout")?,
                start_period: duration("start-period")?,
                start_interval: duration("start-interval")?,
                retries,
            })
        }
        _ => Err(err(format!(
            "unknown type {kind:?} in HEALTHCHECK (try CMD or NONE)"
        ))),
    }
}

/// A Go duration (`1h2m3.5s`, `500ms`, `0`) in nanoseconds; `None` when malformed or huge.
fn go_duration(s: &str) -> Option<u64> {
    if s == "0" {
        return Some(0);
    }
    let mut rest = s;
    let mut total: u64 = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..num_end];
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let scale: u64 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() {
            return None;
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut value = whole.checked_mul(scale)?;
        let mut unit_part = scale;
        for d in frac.chars() {
            unit_part /= 10;
            value = value.checked_add(u64::from(d.to_digit(10)?) * unit_part)?;
        }
        total = total.checked_add(value)?;
    }
    Some(total)
}

/// `ENV`/`LABEL`: `K=V K2="v 2"`, or the legacy `K the rest of the line`.
fn parse_name_values(
    name: &str,
    rest: &str,
    line: usize,
    escape: char,
) -> Result<Vec<(String, String)>, DockerfileError> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else {
        return Err(DockerfileError::new(
            line,
            format!("{name} requires at least one argument"),
        ));
    };
    if !first.contains('=') {
        let Some(p) = rest.find(char::is_whitespace) else {
            return Err(DockerfileError::new(
                line,
                format!("{name} must have two arguments ({name} key value, or {name} key=value), got {rest:?}"),
            ));
        };
        return Ok(vec![(
            rest[..p].to_string(),
            rest[p..].trim_start().to_string(),
        )]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some(("", _)) => Err(DockerfileError::new(
                line,
                format!("{name} names can not be blank: {w:?}"),
            )),
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(DockerfileError::new(
                line,
                format!("{name}: can't find = in {w:?}; it must be of the form name=value"),
            )),
        })
        .collect()
}

/// COPY/ADD/VOLUME: a JSON array when it starts with `[` (malformed: an error), else words.
fn parse_list(
    name: &str,
    rest: &str,
    line: usize,
    escape: char,
) -> Result<Vec<String>, DockerfileError> {
    if rest.starts_with('[') {
        match json_array(rest) {
            Json::Array(items) => Ok(items),
            Json::NotStrings | Json::Invalid => Err(DockerfileError::new(
                line,
                format!("{name}: malformed JSON array (want [\"a\", \"b\"]): {rest}"),
            )),
        }
    } else {
        Ok(parse_words(rest, escape))
    }
}

enum Json {
    Array(Vec<String>),
    NotStrings,
    Invalid,
}

fn json_array(rest: &str) -> Json {
    if !rest.starts_with('[') {
        return Json::Invalid;
    }
    match serde_json::from_str::<serde_json::Value>(rest) {
        Ok(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|i| match i {
                serde_json::Value::String(s) => Some(s),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map_or(Json::NotStrings, Json::Array),
        _ => Json::Invalid,
    }
}

/// Splits on whitespace outside quotes, keeping quotes and escapes in the words (they are
/// removed by substitution), like BuildKit's `parseWords`.
fn parse_words(rest: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    // Whether the word had quotes: `""` is a word, even if empty.
    let mut keep_empty = false;
    let mut quote: Option<char> = None;
    let mut chars = rest.chars().peekable();
    while let Some(ch) = chars.next() {
        match quote {
            None => {
                if ch.is_whitespace() {
                    if keep_empty || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    keep_empty = false;
                    continue;
                }
                if ch == '\'' || ch == '"' {
                    quote = Some(ch);
                    keep_empty = true;
                }
                if ch == escape {
                    match chars.next() {
                        // A lone escape at the very end is dropped.
                        None => continue,
                        Some(next) => {
                            word.push(ch);
                            word.push(next);
                            continue;
                        }
                    }
                }
                word.push(ch);
            }
            Some(q) => {
                if ch == q {
                    quote = None;
                } else if ch == escape && q != '\'' {
                    match chars.next() {
                        None => continue,
                        Some(next) => {
                            word.push(ch);
                            word.push(next);
                            continue;
                        }
                    }
                }
                word.push(ch);
            }
        }
    }
    if keep_empty || !word.is_empty() {
        words.push(word);
    }
    words
}

/// `s` escaped so that substitution gives it back unchanged.
fn literal(s: &str, escape: char) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '$' || c == '"' || c == '\'' || c == escape {
            out.push(escape);
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Substitution (BuildKit's shell-word lexer)
// ---------------------------------------------------------------------------------------------

/// Processes one word as docker does: quotes removed (`'…'` literal, `"…"` with `$`
/// expansion), the escape character escaping the next one, `$VAR`, `${VAR}`,
/// `${VAR:-word}`, `${VAR-word}`, `${VAR:+word}`, `${VAR+word}`, `${VAR:?msg}`, `${VAR?msg}`
/// expanded from `lookup` (undefined: empty). Errors are messages without a line.
/// Instructions outside a Dockerfile (an ONBUILD trigger, a `commit --change`): `text` parsed
/// as the lines after a `FROM`; the steps it makes (several for `ARG A B`), numbered from 1.
pub fn parse_instructions(text: &str) -> Result<Vec<Step>, DockerfileError> {
    let parsed = parse(&format!("FROM scratch\n{text}\n")).map_err(|mut e| {
        e.line = e.line.saturating_sub(1);
        e
    })?;
    let [stage] = <[Stage; 1]>::try_from(parsed.stages)
        .map_err(|_| DockerfileError::new(1, "FROM cannot be used here"))?;
    Ok(stage
        .steps
        .into_iter()
        .map(|mut s| {
            s.line -= 1;
            s
        })
        .collect())
}

/// Whether an ADD source is fetched from the web (`http://` or `https://`) rather than taken
/// from the context.
pub fn is_url(src: &str) -> bool {
    let lower = src.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

pub fn substitute(
    word: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut lexer = Lexer {
        chars: word.chars().collect(),
        pos: 0,
        escape,
        lookup,
    };
    lexer
        .until(None)
        .map_err(|e| format!("failed to process {word:?}: {e}"))
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    /// Processes up to (and consuming) `stop`, or to the end.
    fn until(&mut self, stop: Option<char>) -> Result<String, String> {
        let mut out = String::new();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.pos += 1;
                return Ok(out);
            }
            match ch {
                '\'' => out.push_str(&self.single_quoted()?),
                '"' => out.push_str(&self.double_quoted()?),
                '$' => out.push_str(&self.dollar()?),
                c if c == self.escape => {
                    self.pos += 1;
                    match self.next() {
                        Some(next) => out.push(next),
                        // A trailing escape is dropped.
                        None => break,
                    }
                }
                c => {
                    self.pos += 1;
                    out.push(c);
                }
            }
        }
        match stop {
            Some(s) => Err(format!(
                "unexpected end of statement while looking for matching {s}"
            )),
            None => Ok(out),
        }
    }

    fn single_quoted(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    )
                }
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quoted(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    )
                }
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('$') => out.push_str(&self.dollar()?),
                Some(c) => {
                    self.pos += 1;
                    if c == self.escape {
                        match self.peek() {
                            // Ignored at the very end (the quote is then unterminated).
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.escape => {
                                self.pos += 1;
                                out.push(n);
                                continue;
                            }
                            // Other escapes are kept as written inside double quotes.
                            Some(_) => {}
                        }
                    }
                    out.push(c);
                }
            }
        }
    }

    /// A variable name: letters, digits, `_`; or digits (positional), or one special
    /// character (`$@ $* $# $? $- $$ $! $0`), which are never set here.
    fn name(&mut self) -> String {
        let mut name = String::new();
        match self.peek() {
            Some(c) if c.is_ascii_digit() => {
                while let Some(c) = self.peek().filter(char::is_ascii_digit) {
                    self.pos += 1;
                    name.push(c);
                }
                return name;
            }
            Some(c) if "@*#?-$!".contains(c) => {
                self.pos += 1;
                name.push(c);
                return name;
            }
            _ => {}
        }
        while let Some(c) = self.peek().filter(|c| c.is_alphanumeric() || *c == '_') {
            self.pos += 1;
            name.push(c);
        }
        name
    }

    fn dollar(&mut self) -> Result<String, String> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok((self.lookup)(&name).unwrap_or_default());
        }
        self.pos += 1;
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            _ => {}
        }
        let name = self.name();
        if name.is_empty() {
            return Err("syntax error: bad substitution".into());
        }
        let value = (self.lookup)(&name);
        let (colon, modifier) = match self.next() {
            None => return Err("syntax error: missing '}'".into()),
            Some('}') => return Ok(value.unwrap_or_default()),
            Some(':') => (true, self.next()),
            Some(c) => (false, Some(c)),
        };
        let modifier = match modifier {
            Some(m @ ('-' | '+' | '?')) => m,
            Some(m) => {
                return Err(format!(
                    "unsupported modifier ({}{m}) in substitution",
                    if colon { ":" } else { "" }
                ))
            }
            None => return Err("syntax error: missing '}'".into()),
        };
        let word = self.until(Some('}'))?;
        // With a colon, an empty value counts as unset.
        let set = match &value {
            Some(v) => !(colon && v.is_empty()),
            None => false,
        };
        match modifier {
            '-' => Ok(if set { value.unwrap_or_default() } else { word }),
            '+' => Ok(if set { word } else { String::new() }),
            _ => {
                if set {
                    Ok(value.unwrap_or_default())
                } else if !word.is_empty() {
                    Err(format!("{name}: {word}"))
                } else if value.is_some() {
                    Err(format!("{name}: is not allowed to be empty"))
                } else {
                    Err(format!("{name}: is not allowed to be unset"))
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stages: FROM, ARG scope, steps
// ---------------------------------------------------------------------------------------------

/// The global ARGs' values: a build arg if given, else the default substituted against the
/// global ARGs before it; `None`: declared without a value.
fn meta_values(
    global_args: &[ArgDecl],
    build_args: &BTreeMap<String, String>,
    escape: char,
) -> Result<Vec<(String, Option<String>)>, DockerfileError> {
    // The platform args are predefined in the global scope (FROM --platform=$BUILDPLATFORM),
    // as in BuildKit, when the executor passes them.
    let mut values: Vec<(String, Option<String>)> = PLATFORM_ARGS
        .iter()
        .filter_map(|n| build_args.get(*n).map(|v| (n.to_string(), Some(v.clone()))))
        .collect();
    for arg in global_args {
        let value = match (build_args.get(&arg.name), &arg.default) {
            (Some(v), _) => Some(v.clone()),
            (None, Some(default)) => {
                let lookup = |n: &str| var_lookup(&values, n);
                Some(
                    substitute(default, escape, &lookup)
                        .map_err(|m| DockerfileError::new(arg.line, m))?,
                )
            }
            (None, None) => None,
        };
        set_var(&mut values, &arg.name, value);
    }
    Ok(values)
}

fn var_lookup(vars: &[(String, Option<String>)], name: &str) -> Option<String> {
    vars.iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.clone())
}

fn set_var(vars: &mut Vec<(String, Option<String>)>, name: &str, value: Option<String>) {
    match vars.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = value,
        None => vars.push((name.to_string(), value)),
    }
}

/// The FROM of `stage`, with global ARGs (defaults overridden by build args) substituted.
/// Whether the result names an earlier stage rather than an image: [`Dockerfile::base_stage`].
pub fn resolve_from(
    stage: &Stage,
    global_args: &[ArgDecl],
    build_args: &BTreeMap<String, String>,
) -> Result<String, DockerfileError> {
    let meta = meta_values(global_args, build_args, stage.escape)?;
    let lookup = |n: &str| var_lookup(&meta, n);
    let from = substitute(&stage.from, stage.escape, &lookup)
        .map_err(|m| DockerfileError::new(stage.line, format!("FROM: {m}")))?;
    if from.trim().is_empty() {
        return Err(DockerfileError::new(
            stage.line,
            format!("FROM: base name ({}) should not be blank", stage.from),
        ));
    }
    Ok(from)
}

/// Substitutes `COPY --from`'s value: only global ARGs are visible there (the stage a build
/// depends on must be known before any stage runs), as in docker.
fn resolve_copy_from(
    from: &str,
    line: usize,
    escape: char,
    meta: &[(String, Option<String>)],
) -> Result<String, DockerfileError> {
    let lookup = |n: &str| var_lookup(meta, n);
    let value = substitute(from, escape, &lookup)
        .map_err(|m| DockerfileError::new(line, format!("--from: {m}")))?;
    if value.is_empty() {
        return Err(DockerfileError::new(
            line,
            format!("--from={from} is empty after substitution"),
        ));
    }
    Ok(value)
}

/// What a `COPY --from` (or a FROM) refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The stage with this index.
    Stage(usize),
    /// An image reference.
    Image(String),
}

impl Dockerfile {
    /// The stage a build of `target` (a stage name, case-insensitive) ends with; `None`: the
    /// last stage (as `docker build` without `--target`).
    pub fn target(&self, target: Option<&str>) -> Result<usize, DockerfileError> {
        match target {
            None => self
                .stages
                .len()
                .checked_sub(1)
                .ok_or_else(|| DockerfileError::new(0, "the Dockerfile has no stages")),
            Some(t) => {
                let t = t.to_ascii_lowercase();
                self.stages
                    .iter()
                    .find(|s| s.name.as_deref() == Some(t.as_str()))
                    .map(|s| s.index)
                    .ok_or_else(|| {
                        DockerfileError::new(0, format!("target stage {t:?} could not be found"))
                    })
            }
        }
    }

    /// Whether stage `index`'s resolved FROM names an earlier stage (`FROM builder`): only
    /// earlier ones count, so `FROM alpine AS alpine` is the image.
    pub fn base_stage(&self, index: usize, resolved_from: &str) -> Option<usize> {
        let name = resolved_from.to_ascii_lowercase();
        self.stages
            .iter()
            .take(index)
            .find(|s| s.name.as_deref() == Some(name.as_str()))
            .map(|s| s.index)
    }

    /// What a resolved `COPY --from` value names: a stage by name, else a stage by index,
    /// else an image. Naming the stage the COPY is in (`current`) is an error.
    pub fn copy_source(
        &self,
        current: usize,
        from: &str,
        line: usize,
    ) -> Result<Source, DockerfileError> {
        let lower = from.to_ascii_lowercase();
        let found = match self
            .stages
            .iter()
            .find(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            Some(s) => Some(s.index),
            None => from
                .parse::<usize>()
                .ok()
                .filter(|i| *i < self.stages.len()),
        };
        match found {
            Some(i) if i == current => Err(DockerfileError::new(
                line,
                format!("COPY --from={from} refers to its own stage"),
            )),
            Some(i) => Ok(Source::Stage(i)),
            None => {
                if from.parse::<usize>().is_ok() {
                    return Err(DockerfileError::new(
                        line,
                        format!(
                            "COPY --from={from}: there is no stage {from} (the Dockerfile has {})",
                            self.stages.len()
                        ),
                    ));
                }
                Ok(Source::Image(from.to_string()))
            }
        }
    }

    /// The stages that depend on each other through FROM and `COPY --from`.
    fn dependencies(
        &self,
        index: usize,
        build_args: &BTreeMap<String, String>,
    ) -> Result<Vec<usize>, DockerfileError> {
        let stage = &self.stages[index];
        let mut deps = Vec::new();
        let from = resolve_from(stage, &self.global_args, build_args)?;
        if let Some(base) = self.base_stage(index, &from) {
            deps.push(base);
        }
        let meta = meta_values(&self.global_args, build_args, self.escape)?;
        for step in &stage.steps {
            if let Instr::Copy(CopySpec { from: Some(f), .. }) = &step.instr {
                let f = resolve_copy_from(f, step.line, step.escape, &meta)?;
                if let Source::Stage(i) = self.copy_source(index, &f, step.line)? {
                    deps.push(i);
                }
            }
        }
        Ok(deps)
    }

    /// The stages to build for `target`, each after the stages it depends on (FROM an
    /// earlier stage, `COPY --from`); stages `target` does not need are skipped, as BuildKit
    /// does. A dependency cycle is an error.
    pub fn build_order(
        &self,
        target: usize,
        build_args: &BTreeMap<String, String>,
    ) -> Result<Vec<usize>, DockerfileError> {
        // 0: unvisited, 1: in progress, 2: done.
        let mut state = vec![0u8; self.stages.len()];
        let mut order = Vec::new();
        // Iterative depth-first search: (stage, its dependencies, next one to visit).
        let mut stack: Vec<(usize, Vec<usize>, usize)> = Vec::new();
        if target >= self.stages.len() {
            return Err(DockerfileError::new(
                0,
                format!(
                    "there is no stage {target} (the Dockerfile has {})",
                    self.stages.len()
                ),
            ));
        }
        state[target] = 1;
        stack.push((target, self.dependencies(target, build_args)?, 0));
        while let Some((index, deps, next)) = stack.last_mut() {
            if let Some(&dep) = deps.get(*next) {
                *next += 1;
                match state[dep] {
                    0 => {
                        state[dep] = 1;
                        let d = self.dependencies(dep, build_args)?;
                        stack.push((dep, d, 0));
                    }
                    1 => {
                        let s = &self.stages[dep];
                        return Err(DockerfileError::new(
                            s.line,
                            format!(
                                "circular dependency detected on stage {}",
                                s.name.clone().unwrap_or_else(|| s.index.to_string())
                            ),
                        ));
                    }
                    _ => {}
                }
            } else {
                state[*index] = 2;
                order.push(*index);
                stack.pop();
            }
        }
        Ok(order)
    }

    /// Build args that no ARG in the file declares (docker warns about them); the proxy args
    /// ([`PROXY_ARGS`]) are always used.
    pub fn unused_build_args(&self, build_args: &BTreeMap<String, String>) -> Vec<String> {
        let mut declared: BTreeSet<&str> =
            self.global_args.iter().map(|a| a.name.as_str()).collect();
        for stage in &self.stages {
            for step in &stage.steps {
                if let Instr::Arg(a) = &step.instr {
                    declared.insert(&a.name);
                }
            }
        }
        build_args
            .keys()
            .filter(|k| !declared.contains(k.as_str()) && !predefined(k))
            .cloned()
            .collect()
    }
}

/// What the executor does for one step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Action {
    /// Only the settings changed (see [`StageBuilder::settings`]).
    Config,
    /// argv: shell form -> settings.shell + [cmd]; exec form as is. env: settings.env plus the
    /// ARGs in scope (as K=V; ENV wins over ARG) and any proxy build args: the environment
    /// RUN sees (never persisted in the image).
    Run { argv: Vec<String>, env: Vec<String> },
    /// dest made absolute against the working dir (a trailing '/' kept, and added for `.`: it
    /// means "into this directory"). unpack: ADD (local tar archives are unpacked). from: the
    /// `--from` value substituted with global ARGs; resolve it with
    /// [`Dockerfile::copy_source`]. chmod is validated octal.
    Copy {
        srcs: Vec<String>,
        dest: String,
        chown: Option<String>,
        chmod: Option<String>,
        from: Option<String>,
        unpack: bool,
    },
}

/// Per-stage variable state while executing a stage's steps in order.
#[derive(Debug, Clone)]
pub struct StageBuilder {
    global_args: Vec<ArgDecl>,
    build_args: BTreeMap<String, String>,
    /// The stage's ARGs in scope, in declaration order; `None`: declared without a value.
    args: Vec<(String, Option<String>)>,
    settings: Settings,
    /// Whether this stage set CMD: an ENTRYPOINT then keeps it, otherwise it clears the base
    /// image's CMD (docker's rule).
    cmd_set: bool,
}

impl StageBuilder {
    pub fn new(
        global_args: &[ArgDecl],
        build_args: &BTreeMap<String, String>,
        base: Settings,
    ) -> StageBuilder {
        StageBuilder {
            global_args: global_args.to_vec(),
            build_args: build_args.clone(),
            args: Vec::new(),
            settings: base,
            cmd_set: false,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Consumes the builder: the settings to write into the image config.
    pub fn into_settings(self) -> Settings {
        self.settings
    }

    /// Build args that no ARG declared, globally or in this stage so far (docker warns about
    /// them). The proxy args ([`PROXY_ARGS`]) count as used.
    pub fn unused_build_args(&self) -> Vec<String> {
        self.build_args
            .keys()
            .filter(|k| {
                !self.global_args.iter().any(|a| &a.name == *k)
                    && !self.args.iter().any(|(n, _)| n == *k)
                    && !predefined(k)
            })
            .cloned()
            .collect()
    }

    /// A variable's value for substitution: ENV wins over ARG.
    fn lookup(&self, name: &str) -> Option<String> {
        self.settings
            .env_value(name)
            .map(str::to_string)
            .or_else(|| var_lookup(&self.args, name))
    }

    fn expand(&self, step: &Step, what: &str, word: &str) -> Result<String, DockerfileError> {
        let lookup = |n: &str| self.lookup(n);
        substitute(word, step.escape, &lookup)
            .map_err(|m| DockerfileError::new(step.line, format!("{what}: {m}")))
    }

    /// The environment RUN sees.
    fn run_env(&self) -> Vec<String> {
        let mut env = self.settings.env.clone();
        for (name, value) in &self.args {
            if let Some(v) = value {
                if self.settings.env_value(name).is_none() {
                    env.push(format!("{name}={v}"));
                }
            }
        }
        for proxy in PROXY_ARGS {
            if let Some(v) = self.build_args.get(proxy) {
                let declared = self.args.iter().any(|(n, _)| n == proxy);
                if !declared && self.settings.env_value(proxy).is_none() {
                    env.push(format!("{proxy}={v}"));
                }
            }
        }
        env
    }

    fn argv(&self, command: &Command) -> Vec<String> {
        match command {
            Command::Exec(argv) => argv.clone(),
            Command::Shell(cmd) => {
                let mut argv = self.settings.shell_or_default();
                argv.push(cmd.clone());
                argv
            }
        }
    }

    /// The KEY=VALUE pairs of an ENV or LABEL (`what`), both sides substituted with the
    /// variables from before the step; a key that substitutes to nothing is an error.
    fn expand_pairs(
        &self,
        step: &Step,
        what: &str,
        pairs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, DockerfileError> {
        let mut expanded = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            let key = self.expand(step, &format!("{what} name"), k)?;
            if key.is_empty() {
                return Err(DockerfileError::new(
                    step.line,
                    format!("{what} name {k:?} is empty after substitution"),
                ));
            }
            let value = self.expand(step, &format!("{what} {key}"), v)?;
            expanded.push((key, value));
        }
        Ok(expanded)
    }

    /// Applies one step. Metadata steps (ARG ENV LABEL WORKDIR USER EXPOSE VOLUME CMD
    /// ENTRYPOINT SHELL STOPSIGNAL) update the settings and return [`Action::Config`];
    /// RUN/COPY/ADD return what to do, all variables substituted.
    pub fn step(&mut self, step: &Step) -> Result<Action, DockerfileError> {
        let line = step.line;
        match &step.instr {
            Instr::Arg(decl) => {
                let value = if let Some(v) = self.build_args.get(&decl.name) {
                    Some(v.clone())
                } else if let Some(default) = &decl.default {
                    Some(self.expand(step, &format!("ARG {}", decl.name), default)?)
                } else {
                    let meta = meta_values(&self.global_args, &self.build_args, step.escape)?;
                    var_lookup(&meta, &decl.name)
                };
                set_var(&mut self.args, &decl.name, value);
            }
            Instr::Env(pairs) => {
                // All values are substituted with the variables from before this ENV, as in
                // docker (`ENV A=1 B=$A` gives B the old A).
                let expanded = self.expand_pairs(step, "ENV", pairs)?;
                for (key, value) in expanded {
                    let entry = format!("{key}={value}");
                    let prefix = format!("{key}=");
                    match self
                        .settings
                        .env
                        .iter_mut()
                        .find(|e| e.starts_with(&prefix) || **e == key)
                    {
                        Some(slot) => *slot = entry,
                        None => self.settings.env.push(entry),
                    }
                }
            }
            Instr::Label(pairs) => {
                let expanded = self.expand_pairs(step, "LABEL", pairs)?;
                self.settings.labels.extend(expanded);
            }
            Instr::Workdir(raw) => {
                let dir = self.expand(step, "WORKDIR", raw)?;
                if dir.is_empty() {
                    return Err(DockerfileError::new(
                        line,
                        format!("WORKDIR {raw:?} is empty after substitution"),
                    ));
                }
                self.settings.working_dir = absolute(&self.settings.working_dir, &dir);
            }
            Instr::User(raw) => {
                let user = self.expand(step, "USER", raw)?;
                if user.is_empty() {
                    return Err(DockerfileError::new(
                        line,
                        format!("USER {raw:?} is empty after substitution"),
                    ));
                }
                self.settings.user = user;
            }
            Instr::Expose(words) => {
                let mut ports = Vec::new();
                for w in words {
                    let expanded = self.expand(step, "EXPOSE", w)?;
                    for spec in expanded.split_whitespace() {
                        ports.extend(
                            port_spec(spec)
                                .map_err(|m| DockerfileError::new(line, format!("EXPOSE: {m}")))?,
                        );
                    }
                }
                self.settings.exposed_ports.extend(ports);
            }
            Instr::Volume(words) => {
                let mut volumes = Vec::new();
                for w in words {
                    let v = self.expand(step, "VOLUME", w)?;
                    if v.trim().is_empty() {
                        return Err(DockerfileError::new(
                            line,
                            format!("VOLUME specified can not be an empty string ({w:?})"),
                        ));
                    }
                    volumes.push(v);
                }
                self.settings.volumes.extend(volumes);
            }
            Instr::Cmd(command) => {
                self.settings.cmd = Some(self.argv(command));
                self.cmd_set = true;
            }
            Instr::Entrypoint(command) => {
                self.settings.entrypoint = Some(self.argv(command));
                if !self.cmd_set {
                    self.settings.cmd = None;
                }
            }
            Instr::Shell(shell) => self.settings.shell = shell.clone(),
            Instr::Healthcheck(h) => self.settings.healthcheck = Some(h.clone()),
            Instr::Onbuild(trigger) => self.settings.onbuild.push(trigger.clone()),
            Instr::StopSignal(raw) => {
                let signal = self.expand(step, "STOPSIGNAL", raw)?;
                if !valid_signal(&signal) {
                    return Err(DockerfileError::new(
                        line,
                        format!("STOPSIGNAL: invalid signal {signal:?}"),
                    ));
                }
                self.settings.stop_signal = Some(signal);
            }
            Instr::Run(command) => {
                return Ok(Action::Run {
                    argv: self.argv(command),
                    env: self.run_env(),
                })
            }
            Instr::Copy(spec) => return self.copy(step, "COPY", spec, false),
            Instr::Add(spec) => return self.copy(step, "ADD", spec, true),
        }
        Ok(Action::Config)
    }

    fn copy(
        &self,
        step: &Step,
        name: &str,
        spec: &CopySpec,
        unpack: bool,
    ) -> Result<Action, DockerfileError> {
        let line = step.line;
        let mut srcs = Vec::with_capacity(spec.srcs.len());
        for s in &spec.srcs {
            let src = self.expand(step, &format!("{name} source"), s)?;
            if is_url(&src) && !unpack {
                return Err(DockerfileError::new(
                    line,
                    format!("COPY source can't be a URL ({src:?}); ADD fetches URLs"),
                ));
            }
            srcs.push(src);
        }
        if srcs.iter().any(|s| is_url(s)) && !srcs.iter().all(|s| is_url(s)) {
            return Err(DockerfileError::new(
                line,
                "ADD takes either URLs or files of the context, not both (use two ADDs)",
            ));
        }
        let raw_dest = self.expand(step, &format!("{name} destination"), &spec.dest)?;
        if raw_dest.is_empty() {
            return Err(DockerfileError::new(
                line,
                format!(
                    "{name} destination {:?} is empty after substitution",
                    spec.dest
                ),
            ));
        }
        let into_dir = raw_dest.ends_with('/')
            || raw_dest == "."
            || raw_dest == ".."
            || raw_dest.ends_with("/.")
            || raw_dest.ends_with("/..");
        let mut dest = absolute(&self.settings.working_dir, &raw_dest);
        if into_dir && !dest.ends_with('/') {
            dest.push('/');
        }
        if srcs.len() > 1 && !dest.ends_with('/') {
            return Err(DockerfileError::new(
                line,
                format!("When using {name} with more than one source file, the destination must be a directory and end with a / ({raw_dest:?})"),
            ));
        }
        let chown = match &spec.chown {
            Some(c) => Some(self.expand(step, "--chown", c)?),
            None => None,
        };
        let chmod = match &spec.chmod {
            Some(c) => {
                let mode = self.expand(step, "--chmod", c)?;
                let octal = !mode.is_empty()
                    && mode.len() <= 4
                    && mode.chars().all(|c| ('0'..='7').contains(&c));
                if !octal {
                    return Err(DockerfileError::new(
                        line,
                        format!("invalid --chmod={mode}: want an octal mode like 755"),
                    ));
                }
                Some(mode)
            }
            None => None,
        };
        let from = match &spec.from {
            Some(f) => {
                let meta = meta_values(&self.global_args, &self.build_args, step.escape)?;
                Some(resolve_copy_from(f, line, step.escape, &meta)?)
            }
            None => None,
        };
        Ok(Action::Copy {
            srcs,
            dest,
            chown,
            chmod,
            from,
            unpack,
        })
    }
}

/// `path` made absolute against `base` (empty: `/`) and cleaned lexically (`..` stops at
/// `/`); no trailing slash except for `/` itself.
fn absolute(base: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", if base.is_empty() { "/" } else { base })
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `80`, `80/udp`, `8000-8010/tcp` -> `["80/tcp"]`, … (protocol lowercased, tcp by default).
fn port_spec(spec: &str) -> Result<Vec<String>, String> {
    if spec.contains(':') {
        return Err(format!(
            "{spec:?}: EXPOSE takes container ports only (publishing is done when running)"
        ));
    }
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    if !["tcp", "udp", "sctp"].contains(&proto.as_str()) {
        return Err(format!(
            "{spec:?}: invalid protocol {proto:?} (tcp, udp or sctp)"
        ));
    }
    let port = |s: &str| {
        s.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{spec:?}: invalid port {s:?}"))
    };
    let (first, last) = match ports.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(ports)?;
            (p, p)
        }
    };
    if last < first {
        return Err(format!("{spec:?}: invalid range"));
    }
    Ok((first..=last).map(|p| format!("{p}/{proto}")).collect())
}

/// A signal docker accepts: a number, or a name with or without `SIG` (any case).
fn valid_signal(signal: &str) -> bool {
    if let Ok(n) = signal.parse::<u32>() {
        return (1..=64).contains(&n);
    }
    let upper = signal.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    const NAMES: [&str; 34] = [
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
    ];
    if NAMES.contains(&name) || name == "RTMIN" || name == "RTMAX" {
        return true;
    }
    let offset = |s: &str| s.parse::<u32>().is_ok_and(|n| (1..=30).contains(&n));
    name.strip_prefix("RTMIN+").is_some_and(offset)
        || name.strip_prefix("RTMAX-").is_some_and(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn err_of(text: &str) -> DockerfileError {
        match parse(text) {
            Ok(d) => panic!("expected an error for {text:?}, got {d:?}"),
            Err(e) => e,
        }
    }

    /// Runs every step of the last stage, returning the actions.
    fn run_stage(text: &str, build_args: &[(&str, &str)]) -> (Vec<Action>, Settings) {
        let df = parse(text).expect("parse");
        let stage = df.stages.last().expect("a stage");
        let mut b = StageBuilder::new(&df.global_args, &args(build_args), Settings::default());
        let actions = stage
            .steps
            .iter()
            .map(|s| b.step(s).expect("step"))
            .collect();
        (actions, b.into_settings())
    }

    fn sub(word: &str, vars: &[(&str, &str)]) -> Result<String, String> {
        let vars = args(vars);
        substitute(word, '\\', &|n: &str| vars.get(n).cloned())
    }

    #[test]
    fn every_instruction_parses() {
        let df = parse(
            r#"ARG BASE=alpine
FROM $BASE AS build
arg VERSION=1
ENV A=1 B="two words"
ENV LEGACY some value
LABEL org.opencontainers.image.title="x" k=v
Label legacy the value
WORKDIR /src
USER nobody:nogroup
EXPOSE 80 443/udp
VOLUME ["/data", "/logs"]
VOLUME /cache
CMD ["run", "--fast"]
ENTRYPOINT /bin/app
RUN echo hi
COPY --chown=1:2 --chmod=644 a b /dst/
ADD ["x.tar", "/opt/"]
SHELL ["/bin/bash", "-c"]
STOPSIGNAL SIGTERM
MAINTAINER someone <s@example.com>
"#,
        )
        .unwrap();
        assert_eq!(df.escape, '\\');
        assert_eq!(
            df.global_args,
            vec![ArgDecl {
                name: "BASE".into(),
                default: Some("alpine".into()),
                line: 1
            }]
        );
        assert_eq!(df.stages.len(), 1);
        let st = &df.stages[0];
        assert_eq!(
            (st.index, st.name.as_deref(), st.from.as_str(), st.line),
            (0, Some("build"), "$BASE", 2)
        );
        let instrs: Vec<&Instr> = st.steps.iter().map(|s| &s.instr).collect();
        let kv = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let strings = |p: &[&str]| -> Vec<String> { p.iter().map(|s| s.to_string()).collect() };
        let want = vec![
            Instr::Arg(ArgDecl {
                name: "VERSION".into(),
                default: Some("1".into()),
                line: 3,
            }),
            Instr::Env(kv(&[("A", "1"), ("B", "\"two words\"")])),
            Instr::Env(kv(&[("LEGACY", "some value")])),
            Instr::Label(kv(&[
                ("org.opencontainers.image.title", "\"x\""),
                ("k", "v"),
            ])),
            Instr::Label(kv(&[("legacy", "the value")])),
            Instr::Workdir("/src".into()),
            Instr::User("nobody:nogroup".into()),
            Instr::Expose(strings(&["80", "443/udp"])),
            Instr::Volume(strings(&["/data", "/logs"])),
            Instr::Volume(strings(&["/cache"])),
            Instr::Cmd(Command::Exec(strings(&["run", "--fast"]))),
            Instr::Entrypoint(Command::Shell("/bin/app".into())),
            Instr::Run(Command::Shell("echo hi".into())),
            Instr::Copy(CopySpec {
                srcs: strings(&["a", "b"]),
                dest: "/dst/".into(),
                chown: Some("1:2".into()),
                chmod: Some("644".into()),
                from: None,
            }),
            Instr::Add(CopySpec {
                srcs: strings(&["x.tar"]),
                dest: "/opt/".into(),
                chown: None,
                chmod: None,
                from: None,
            }),
            Instr::Shell(strings(&["/bin/bash", "-c"])),
            Instr::StopSignal("SIGTERM".into()),
            Instr::Label(kv(&[("maintainer", "someone <s@example.com>")])),
        ];
        assert_eq!(instrs, want.iter().collect::<Vec<_>>());
        assert_eq!(st.steps[0].line, 3);
        assert_eq!(st.steps[1].text, "ENV A=1 B=\"two words\"");
    }

    #[test]
    fn continuations_comments_and_blank_lines() {
        let df = parse(
            "# a comment\n\nFROM scratch\nRUN apt-get update && \\\n    # a comment inside\n\n    apt-get install -y \\\n      curl\n   # trailing\nCMD [\"a\"] \\   \n",
        )
        .unwrap();
        let st = &df.stages[0];
        assert_eq!(st.line, 3);
        assert_eq!(st.steps.len(), 2);
        assert_eq!(st.steps[0].line, 4);
        assert_eq!(
            st.steps[0].text,
            "RUN apt-get update &&     apt-get install -y       curl"
        );
        assert_eq!(
            st.steps[0].instr,
            Instr::Run(Command::Shell(
                "apt-get update &&     apt-get install -y       curl".into()
            ))
        );
        // A continuation at the end of the file just ends the instruction.
        assert_eq!(st.steps[1].line, 10);
        assert_eq!(
            st.steps[1].instr,
            Instr::Cmd(Command::Exec(vec!["a".into()]))
        );
    }

    #[test]
    fn crlf_and_bom() {
        let df = parse("\u{feff}FROM scratch\r\nENV A=1 \\\r\n  B=2\r\n").unwrap();
        assert_eq!(
            df.stages[0].steps[0].instr,
            Instr::Env(vec![("A".into(), "1".into()), ("B".into(), "2".into())])
        );
    }

    #[test]
    fn escape_directive() {
        let text = "# escape=`\n# syntax=docker/dockerfile:1\nFROM scratch\nCOPY C:\\src\\ C:\\dst\\\nRUN dir `\n  c:\\\nENV P=`$HOME\\\n";
        let df = parse(text).unwrap();
        assert_eq!(df.escape, '`');
        let st = &df.stages[0];
        assert_eq!(st.escape, '`');
        assert_eq!(st.steps[1].text, "RUN dir   c:\\");
        let (actions, settings) = run_stage(text, &[]);
        assert_eq!(
            actions[0],
            Action::Copy {
                srcs: vec!["C:\\src\\".into()],
                // Backslashes are ordinary characters with ` as the escape.
                dest: "/C:\\dst\\".into(),
                chown: None,
                chmod: None,
                from: None,
                unpack: false,
            }
        );
        assert_eq!(settings.env, vec!["P=$HOME\\".to_string()]);

        // Directives only count at the very top.
        let df = parse("FROM scratch\n# escape=`\nRUN a \\\n  b\n").unwrap();
        assert_eq!(df.escape, '\\');
        assert_eq!(df.stages[0].steps[0].text, "RUN a   b");
        let df = parse("# hello\n# escape=`\nFROM scratch\n").unwrap();
        assert_eq!(df.escape, '\\');
        let df = parse("\n# escape=`\nFROM scratch\n").unwrap();
        assert_eq!(df.escape, '\\');
        let df = parse("#ESCAPE = `\nFROM scratch\n").unwrap();
        assert_eq!(df.escape, '`');

        let e = err_of("# escape=x\nFROM scratch\n");
        assert_eq!(e.line, 1);
        assert!(e.message.contains("invalid escape token \"x\""), "{e}");
        let e = err_of("# escape=`\n# escape=\\\nFROM scratch\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("only one escape"), "{e}");
    }

    #[test]
    fn case_insensitive_instructions_and_as() {
        let df = parse("from alpine as Builder\nrUn true\nFrOm builder\n").unwrap();
        assert_eq!(df.stages[0].name.as_deref(), Some("builder"));
        assert_eq!(
            df.stages[0].steps[0].instr,
            Instr::Run(Command::Shell("true".into()))
        );
        assert_eq!(df.stages[1].from, "builder");
        assert_eq!(df.base_stage(1, "Builder"), Some(0));
    }

    #[test]
    fn exec_and_shell_forms() {
        let df = parse(concat!(
            "FROM scratch\n",
            "RUN [\"echo\", \"a b\"]\n",
            "RUN [not json\n",
            "CMD [\"unterminated\"\n",
            "ENTRYPOINT []\n",
            "CMD []\n",
            "RUN [ \"x\" ]\n",
        ))
        .unwrap();
        let i: Vec<&Instr> = df.stages[0].steps.iter().map(|s| &s.instr).collect();
        assert_eq!(
            *i[0],
            Instr::Run(Command::Exec(vec!["echo".into(), "a b".into()]))
        );
        assert_eq!(*i[1], Instr::Run(Command::Shell("[not json".into())));
        assert_eq!(
            *i[2],
            Instr::Cmd(Command::Shell("[\"unterminated\"".into()))
        );
        assert_eq!(*i[3], Instr::Entrypoint(Command::Exec(vec![])));
        assert_eq!(*i[4], Instr::Cmd(Command::Exec(vec![])));
        assert_eq!(*i[5], Instr::Run(Command::Exec(vec!["x".into()])));

        let e = err_of("FROM scratch\nRUN [\"a\", 1]\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("array of strings"), "{e}");
        let e = err_of("FROM scratch\nCOPY [\"a\", \"b\"\n");
        assert_eq!(e.line, 2);
        assert!(e.message.starts_with("COPY: malformed JSON array"), "{e}");
        let e = err_of("FROM scratch\nVOLUME [/data]\n");
        assert!(e.message.starts_with("VOLUME: malformed JSON array"), "{e}");
        let e = err_of("FROM scratch\nSHELL /bin/bash -c\n");
        assert!(
            e.message
                .contains("SHELL requires the arguments to be in JSON form"),
            "{e}"
        );
        let e = err_of("FROM scratch\nSHELL []\n");
        assert_eq!(e.message, "SHELL requires at least one argument");
        let e = err_of("FROM scratch\nRUN []\n");
        assert_eq!(e.message, "RUN requires at least one argument");
    }

    #[test]
    fn copy_flags_and_words() {
        let df = parse(concat!(
            "FROM scratch AS one\n",
            "FROM scratch\n",
            "COPY --from=one --link /a \"with space\" /dst/\n",
            "COPY --from=0 [\"/x y\", \"/z\"]\n",
            "ADD --chown=app --link=false src.tar /\n",
        ))
        .unwrap();
        let steps = &df.stages[1].steps;
        assert_eq!(
            steps[0].instr,
            Instr::Copy(CopySpec {
                srcs: vec!["/a".into(), "\"with space\"".into()],
                dest: "/dst/".into(),
                chown: None,
                chmod: None,
                from: Some("one".into()),
            })
        );
        assert_eq!(
            steps[1].instr,
            Instr::Copy(CopySpec {
                srcs: vec!["/x y".into()],
                dest: "/z".into(),
                chown: None,
                chmod: None,
                from: Some("0".into()),
            })
        );
        let Instr::Add(spec) = &steps[2].instr else {
            panic!("not ADD: {:?}", steps[2].instr)
        };
        assert_eq!(spec.chown.as_deref(), Some("app"));
    }

    #[test]
    fn errors_name_the_line_and_thing() {
        let cases: &[(&str, usize, &str)] = &[
            ("FROM scratch\nRUN x\n\n\nCOPPY a b\n", 5, "unknown instruction \"COPPY\""),
            ("ARG A\nRUN echo\nFROM scratch\n", 2, "RUN before the first FROM (only ARG may come before FROM)"),
            ("FROM scratch\nCOPY onlyone\n", 2, "COPY requires at least two arguments, but only one was provided (\"onlyone\"): the destination could not be determined"),
            ("FROM scratch\nCOPY\n", 2, "COPY requires at least two arguments: source(s) and destination"),
            ("FROM\n", 1, "FROM requires at least one argument (FROM image [AS name])"),
            ("FROM a b\n", 1, "FROM requires either one or three arguments (FROM image [AS name]), got \"a b\""),
            ("FROM a to b\n", 1, "FROM requires either one or three arguments (FROM image [AS name]), got \"a to b\""),
            ("FROM scratch\nENV\n", 2, "ENV requires at least one argument"),
            ("FROM scratch\nENV ONLY\n", 2, "ENV must have two arguments (ENV key value, or ENV key=value), got \"ONLY\""),
            ("FROM scratch\nENV A=1 B\n", 2, "ENV: can't find = in \"B\"; it must be of the form name=value"),
            ("FROM scratch\nENV =1\n", 2, "ENV names can not be blank: \"=1\""),
            ("FROM scratch\nLABEL\n", 2, "LABEL requires at least one argument"),
            ("FROM scratch\nWORKDIR\n", 2, "WORKDIR requires exactly one argument"),
            ("FROM scratch\nWORKDIR   \n", 2, "WORKDIR requires exactly one argument"),
            ("FROM scratch\nUSER\n", 2, "USER requires exactly one argument"),
            ("FROM scratch\nSTOPSIGNAL\n", 2, "STOPSIGNAL requires exactly one argument"),
            ("FROM scratch\nEXPOSE\n", 2, "EXPOSE requires at least one argument"),
            ("FROM scratch\nVOLUME\n", 2, "VOLUME requires at least one argument"),
            ("FROM scratch\nARG\n", 2, "ARG requires at least one argument"),
            ("FROM scratch\nARG =x\n", 2, "ARG names can not be blank"),
            ("FROM scratch\nRUN\n", 2, "RUN requires at least one argument"),
            ("FROM scratch\nCMD\n", 2, "CMD requires at least one argument"),
            ("FROM scratch\nADD --from=x a b\n", 2, "ADD does not support --from (use COPY --from=<stage|image>)"),
            ("FROM scratch\nCOPY --form=x a b\n", 2, "unknown flag \"--form\" for COPY"),
            ("FROM scratch\nCOPY --from a b\n", 2, "flag \"--from\" needs a value (--from=...)"),
            ("FROM scratch\nCOPY --from=a --from=b a b\n", 2, "duplicate flag \"--from\""),
            ("FROM scratch\nRUN --mount=type=cache,target=/x make\n", 2, "flag \"--mount\" of RUN is not supported"),
            ("FROM scratch\nENV --x=1 A=1\n", 2, "unknown flag \"--x\" for ENV"),
            ("FROM --foo=bar scratch\n", 1, "unknown flag \"--foo\" for FROM"),
            ("FROM scratch\nONBUILD ONBUILD RUN true\n", 2, "ONBUILD isn't allowed as an ONBUILD trigger"),
            ("FROM scratch\nONBUILD FROM x\n", 2, "FROM isn't allowed as an ONBUILD trigger"),
            ("FROM scratch\nONBUILD\n", 2, "ONBUILD requires exactly one argument"),
            ("FROM scratch\nONBUILD COPY\n", 2, "COPY requires at least two arguments: source(s) and destination"),
            ("FROM scratch\nHEALTHCHECK\n", 2, "HEALTHCHECK requires at least one argument (CMD … or NONE)"),
            ("FROM scratch\nHEALTHCHECK RUN x\n", 2, "unknown type \"RUN\" in HEALTHCHECK (try CMD or NONE)"),
            ("FROM scratch\nHEALTHCHECK NONE x\n", 2, "HEALTHCHECK NONE takes no arguments or flags"),
            ("FROM scratch\nHEALTHCHECK CMD\n", 2, "HEALTHCHECK CMD requires a command"),
            ("FROM scratch\nHEALTHCHECK --interval=10 CMD x\n", 2, "HEALTHCHECK --interval=10: not a duration (like 30s, 1m30s, 500ms)"),
            ("FROM scratch\nHEALTHCHECK --timeout=10us CMD x\n", 2, "HEALTHCHECK --timeout=10us cannot be less than 1ms"),
            ("FROM scratch\nHEALTHCHECK --retries=-1 CMD x\n", 2, "HEALTHCHECK --retries=-1: not a non-negative number"),
            ("FROM scratch\nHEALTHCHECK --exec=x CMD x\n", 2, "unknown flag \"--exec\" for HEALTHCHECK"),
            ("FROM a AS x\nFROM b AS X\n", 2, "duplicate stage name \"x\" (first used on line 1)"),
            ("FROM a AS 1x\n", 1, "invalid stage name \"1x\": it must start with a letter and contain only letters, digits, '-', '_' and '.'"),
            ("", 1, "the Dockerfile is empty: it needs a FROM instruction"),
            ("# only\n\n   \n", 1, "the Dockerfile is empty: it needs a FROM instruction"),
            ("ARG A\n\nARG B\n", 3, "no FROM instruction: a Dockerfile needs at least one build stage"),
            ("FROM scratch\nCOPY \\\n  --chown \\\n  a b\n", 2, "flag \"--chown\" needs a value (--chown=...)"),
        ];
        for (text, line, message) in cases {
            let e = err_of(text);
            assert_eq!(
                (e.line, e.message.as_str()),
                (*line, *message),
                "for {text:?}"
            );
        }
        assert_eq!(
            err_of("FROM scratch\nCOPPY a b\n").to_string(),
            "Dockerfile line 2: unknown instruction \"COPPY\""
        );
    }

    #[test]
    fn from_platform_is_accepted() {
        let df = parse("FROM --platform=$BUILDPLATFORM golang AS build\n").unwrap();
        assert_eq!(df.stages[0].from, "golang");
        assert_eq!(df.stages[0].name.as_deref(), Some("build"));
    }

    #[test]
    fn substitution_forms() {
        let vars = [("A", "a"), ("E", ""), ("SP", "x y")];
        let cases: &[(&str, &str)] = &[
            ("$A", "a"),
            ("${A}", "a"),
            ("pre${A}post", "preapost"),
            ("$A$A", "aa"),
            ("$UNSET", ""),
            ("${UNSET}", ""),
            ("${UNSET:-def}", "def"),
            ("${E:-def}", "def"),
            ("${E-def}", ""),
            ("${UNSET-def}", "def"),
            ("${A:-def}", "a"),
            ("${A:+alt}", "alt"),
            ("${E:+alt}", ""),
            ("${E+alt}", "alt"),
            ("${UNSET:+alt}", ""),
            ("${UNSET:-$A}", "a"),
            ("${UNSET:-\"x}y\"}", "x}y"),
            ("\\$A", "$A"),
            ("'$A'", "$A"),
            ("\"$A b\"", "a b"),
            ("\"\\$A\"", "$A"),
            ("\"a\\nb\"", "a\\nb"),
            ("a\\ b", "a b"),
            ("$", "$"),
            ("a$", "a$"),
            ("$-x", "x"),
            ("$1x", "x"),
            ("${SP}", "x y"),
            ("\\", ""),
            ("a\\\\b", "a\\b"),
            ("'it''s'", "its"),
            ("\"\"", ""),
        ];
        for (word, want) in cases {
            assert_eq!(sub(word, &vars).as_deref(), Ok(*want), "for {word:?}");
        }
        let bad: &[(&str, &str)] = &[
            ("${A", "missing '}'"),
            ("${", "missing '}'"),
            ("${}", "bad substitution"),
            ("${:-x}", "bad substitution"),
            ("${A:x}", "unsupported modifier (:x)"),
            ("${A%x}", "unsupported modifier (%)"),
            ("${A:-x", "looking for matching }"),
            ("'abc", "matching single-quote"),
            ("\"abc", "matching double-quote"),
            ("${UNSET:?needs a value}", "UNSET: needs a value"),
            ("${E:?}", "E: is not allowed to be empty"),
            ("${UNSET?}", "UNSET: is not allowed to be unset"),
        ];
        for (word, want) in bad {
            let e = sub(word, &vars).expect_err(word);
            assert!(e.contains(want), "for {word:?}: {e}");
            assert!(e.starts_with(&format!("failed to process {word:?}")), "{e}");
        }
        assert_eq!(sub("${E?}", &vars).as_deref(), Ok(""));
    }

    #[test]
    fn substitution_in_steps() {
        let (actions, s) = run_stage(
            concat!(
                "FROM scratch\n",
                "ARG DIR=/srv\n",
                "ARG UNSET_ARG\n",
                "ENV APP=myapp HOME_DIR=$DIR/home\n",
                "ENV A=1 B=$A\n",
                "ENV A=2\n",
                "LABEL \"name\"=\"$APP\" dir=${DIR}\n",
                "WORKDIR $DIR\n",
                "WORKDIR ${APP}\n",
                "USER ${USER_NAME:-app}\n",
                "EXPOSE ${PORT:-8080} $PORTS\n",
                "VOLUME $DIR/data \"/with space\"\n",
                "STOPSIGNAL ${SIG:-SIGQUIT}\n",
                "RUN echo $APP\n",
                "CMD echo $APP\n",
                "COPY --chown=${APP}:${APP} $APP.conf ${UNSET_ARG:-conf}/ ./\n",
                "ENV EMPTY=\n",
            ),
            &[("PORTS", "1000 2000/udp")],
        );
        assert_eq!(
            s.env,
            vec![
                "APP=myapp".to_string(),
                "HOME_DIR=/srv/home".into(),
                // Replaced in place; B saw the A from before its ENV (unset then).
                "A=2".into(),
                "B=".into(),
                "EMPTY=".into(),
            ]
        );
        assert_eq!(s.labels, args(&[("name", "myapp"), ("dir", "/srv")]));
        assert_eq!(s.working_dir, "/srv/myapp");
        assert_eq!(s.user, "app");
        assert_eq!(
            s.exposed_ports
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            vec!["8080/tcp"]
        );
        assert_eq!(
            s.volumes.iter().map(String::as_str).collect::<Vec<_>>(),
            vec!["/srv/data", "/with space"]
        );
        assert_eq!(s.stop_signal.as_deref(), Some("SIGQUIT"));
        // Not substituted: the shell does it.
        assert_eq!(
            actions[12],
            Action::Run {
                argv: vec!["/bin/sh".into(), "-c".into(), "echo $APP".into()],
                env: vec![
                    "APP=myapp".into(),
                    "HOME_DIR=/srv/home".into(),
                    "A=2".into(),
                    "B=".into(),
                    "DIR=/srv".into(),
                ],
            }
        );
        assert_eq!(
            s.cmd,
            Some(vec!["/bin/sh".into(), "-c".into(), "echo $APP".into()])
        );
        assert_eq!(
            actions[14],
            Action::Copy {
                srcs: vec!["myapp.conf".into(), "conf/".into()],
                dest: "/srv/myapp/".into(),
                chown: Some("myapp:myapp".into()),
                chmod: None,
                from: None,
                unpack: false,
            }
        );
        // PORTS was given but never declared: unused.
        let df = parse("FROM scratch\nARG X\nEXPOSE $PORTS\n").unwrap();
        let all = args(&[("PORTS", "1"), ("X", "1"), ("http_proxy", "p")]);
        assert_eq!(df.unused_build_args(&all), vec!["PORTS".to_string()]);
        let mut b = StageBuilder::new(&df.global_args, &all, Settings::default());
        assert_eq!(b.unused_build_args(), vec!["PORTS".to_string(), "X".into()]);
        for step in &df.stages[0].steps {
            b.step(step).unwrap();
        }
        assert_eq!(b.unused_build_args(), vec!["PORTS".to_string()]);
        assert!(b.settings().exposed_ports.is_empty());
    }

    #[test]
    fn expose_forms() {
        let (_, s) = run_stage(
            "FROM scratch\nARG PORTS=\"7000 7001/UDP\"\nEXPOSE 80 53/udp 9000-9002/tcp 132/sctp $PORTS\n",
            &[],
        );
        assert_eq!(
            s.exposed_ports.into_iter().collect::<Vec<_>>(),
            vec![
                "132/sctp", "53/udp", "7000/tcp", "7001/udp", "80/tcp", "9000/tcp", "9001/tcp",
                "9002/tcp"
            ]
        );
        for bad in ["0", "70000", "80/http", "9-1", "x", "8080:80", "80/"] {
            let df = parse(&format!("FROM scratch\nEXPOSE {bad}\n")).unwrap();
            let mut b = StageBuilder::new(&[], &BTreeMap::new(), Settings::default());
            let e = b.step(&df.stages[0].steps[0]).expect_err(bad);
            assert_eq!(e.line, 2);
            assert!(e.message.starts_with("EXPOSE: "), "{e}");
        }
    }

    #[test]
    fn arg_scoping_across_stages() {
        let text = concat!(
            "ARG VERSION=1.0\n",
            "ARG IMAGE=alpine:${VERSION}\n",
            "ARG ONLY_GLOBAL=g\n",
            "FROM ${IMAGE} AS first\n",
            "RUN echo\n",
            "ARG VERSION\n",
            "RUN echo\n",
            "ARG LOCAL=l-$VERSION\n",
            "ENV FROM_GLOBAL=\"${ONLY_GLOBAL:-not visible}\"\n",
            "RUN echo\n",
            "FROM scratch\n",
            "ARG VERSION=2.0\n",
            "ENV V=$VERSION L=${LOCAL:-none}\n",
        );
        let df = parse(text).unwrap();
        assert_eq!(df.global_args.len(), 3);
        let none = BTreeMap::new();
        assert_eq!(
            resolve_from(&df.stages[0], &df.global_args, &none).unwrap(),
            "alpine:1.0"
        );
        let overridden = args(&[("VERSION", "3.1")]);
        assert_eq!(
            resolve_from(&df.stages[0], &df.global_args, &overridden).unwrap(),
            "alpine:3.1"
        );
        assert_eq!(
            resolve_from(
                &df.stages[0],
                &df.global_args,
                &args(&[("IMAGE", "busybox")])
            )
            .unwrap(),
            "busybox"
        );

        let run_env = |build_args: &BTreeMap<String, String>| {
            let mut b = StageBuilder::new(&df.global_args, build_args, Settings::default());
            let mut envs = Vec::new();
            for s in &df.stages[0].steps {
                if let Action::Run { env, .. } = b.step(s).unwrap() {
                    envs.push(env);
                }
            }
            (envs, b.into_settings())
        };
        let (envs, s) = run_env(&none);
        // A global ARG is not visible in a stage until re-declared.
        assert_eq!(envs[0], Vec::<String>::new());
        assert_eq!(envs[1], vec!["VERSION=1.0".to_string()]);
        assert_eq!(
            envs[2],
            vec![
                "FROM_GLOBAL=not visible".to_string(),
                "VERSION=1.0".into(),
                "LOCAL=l-1.0".into()
            ]
        );
        assert_eq!(s.env, vec!["FROM_GLOBAL=not visible".to_string()]);
        let (envs, _) = run_env(&overridden);
        assert_eq!(envs[1], vec!["VERSION=3.1".to_string()]);

        // The second stage does not see the first stage's ARGs; its own default applies,
        // and a build arg overrides it.
        let (_, s) = run_stage(text, &[]);
        assert_eq!(s.env, vec!["V=2.0".to_string(), "L=none".into()]);
        let (_, s) = run_stage(text, &[("VERSION", "9")]);
        assert_eq!(s.env, vec!["V=9".to_string(), "L=none".into()]);
    }

    #[test]
    fn env_wins_over_arg_and_proxy_args() {
        let (actions, _) = run_stage(
            "FROM scratch\nENV X=env\nARG X=arg\nARG Y=y\nRUN [\"env\"]\nARG X\nENV Z=$X\nRUN true\n",
            &[("http_proxy", "http://proxy:3128"), ("X", "cli")],
        );
        assert_eq!(
            actions[3],
            Action::Run {
                argv: vec!["env".into()],
                env: vec![
                    "X=env".into(),
                    "Y=y".into(),
                    "http_proxy=http://proxy:3128".into()
                ],
            }
        );
        let Action::Run { env, .. } = &actions[6] else {
            panic!()
        };
        assert_eq!(env[..2], ["X=env".to_string(), "Z=env".into()]);
    }

    #[test]
    fn workdir_resolution() {
        let (_, s) = run_stage(
            "FROM scratch\nWORKDIR a\nWORKDIR b/c/\nWORKDIR ../d\nWORKDIR ./e//f\n",
            &[],
        );
        assert_eq!(s.working_dir, "/a/b/d/e/f");
        let (_, s) = run_stage("FROM scratch\nWORKDIR /x\nWORKDIR /y/../../z\n", &[]);
        assert_eq!(s.working_dir, "/z");
        let base = Settings {
            working_dir: "/base".into(),
            ..Settings::default()
        };
        let df =
            parse("FROM scratch\nWORKDIR rel\nCOPY a .\nCOPY a b\nCOPY a /abs/../c/\nCOPY a b/.\n")
                .unwrap();
        let mut b = StageBuilder::new(&[], &BTreeMap::new(), base);
        let steps = &df.stages[0].steps;
        assert_eq!(b.step(&steps[0]).unwrap(), Action::Config);
        let dest = |a: Action| match a {
            Action::Copy { dest, .. } => dest,
            other => panic!("{other:?}"),
        };
        assert_eq!(dest(b.step(&steps[1]).unwrap()), "/base/rel/");
        assert_eq!(dest(b.step(&steps[2]).unwrap()), "/base/rel/b");
        assert_eq!(dest(b.step(&steps[3]).unwrap()), "/c/");
        assert_eq!(dest(b.step(&steps[4]).unwrap()), "/base/rel/b/");
        let e = run_err("FROM scratch\nARG E\nWORKDIR $E\n");
        assert_eq!(
            (e.line, e.message.as_str()),
            (3, "WORKDIR \"$E\" is empty after substitution")
        );
    }

    fn run_err(text: &str) -> DockerfileError {
        let df = parse(text).expect("parse");
        let stage = df.stages.last().unwrap();
        let mut b = StageBuilder::new(&df.global_args, &BTreeMap::new(), Settings::default());
        for s in &stage.steps {
            if let Err(e) = b.step(s) {
                return e;
            }
        }
        panic!("no step failed in {text:?}")
    }

    #[test]
    fn step_errors() {
        let cases: &[(&str, usize, &str)] = &[
            ("FROM scratch\nCOPY a b /notdir\n", 2, "When using COPY with more than one source file, the destination must be a directory and end with a / (\"/notdir\")"),
            ("FROM scratch\nCOPY --chmod=rwx a /\n", 2, "invalid --chmod=rwx: want an octal mode like 755"),
            ("FROM scratch\nCOPY --chmod=8 a /\n", 2, "invalid --chmod=8: want an octal mode like 755"),
            ("FROM scratch\nADD https://example.com/x a.txt /\n", 2, "ADD takes either URLs or files of the context, not both (use two ADDs)"),
            ("FROM scratch\nCOPY http://example.com/x /\n", 2, "COPY source can't be a URL (\"http://example.com/x\"); ADD fetches URLs"),
            ("FROM scratch\n\nENV A=${B\n", 3, "ENV A: failed to process \"${B\": syntax error: missing '}'"),
            ("FROM scratch\nLABEL a=\"x\n", 2, "LABEL a: failed to process \"\\\"x\": unexpected end of statement while looking for matching double-quote"),
            ("FROM scratch\nSTOPSIGNAL SIGNOPE\n", 2, "STOPSIGNAL: invalid signal \"SIGNOPE\""),
            ("FROM scratch\nSTOPSIGNAL 0\n", 2, "STOPSIGNAL: invalid signal \"0\""),
            ("FROM scratch\nVOLUME \"\"\n", 2, "VOLUME specified can not be an empty string (\"\\\"\\\"\")"),
            ("FROM scratch\nUSER ${NOBODY}\n", 2, "USER \"${NOBODY}\" is empty after substitution"),
            ("FROM scratch\nCOPY a ${D:?required}\n", 2, "COPY destination: failed to process \"${D:?required}\": D: required"),
            ("FROM scratch\nCOPY --from=$NONE a /\n", 2, "--from=$NONE is empty after substitution"),
        ];
        for (text, line, message) in cases {
            let e = run_err(text);
            assert_eq!(
                (e.line, e.message.as_str()),
                (*line, *message),
                "for {text:?}"
            );
        }
        for ok in ["SIGKILL", "kill", "9", "RTMIN+3", "SIGRTMAX-1", "usr1"] {
            let (_, s) = run_stage(&format!("FROM scratch\nSTOPSIGNAL {ok}\n"), &[]);
            assert_eq!(s.stop_signal.as_deref(), Some(ok));
        }
    }

    #[test]
    fn cmd_entrypoint_shell_rules() {
        let base = Settings {
            cmd: Some(vec!["base-cmd".into()]),
            ..Settings::default()
        };
        let df = parse("FROM scratch\nSHELL [\"/bin/bash\", \"-xc\"]\nENTRYPOINT run.sh\nRUN ls\n")
            .unwrap();
        let mut b = StageBuilder::new(&[], &BTreeMap::new(), base.clone());
        let steps = &df.stages[0].steps;
        b.step(&steps[0]).unwrap();
        b.step(&steps[1]).unwrap();
        // ENTRYPOINT clears an inherited CMD ...
        assert_eq!(b.settings().cmd, None);
        assert_eq!(
            b.settings().entrypoint,
            Some(vec!["/bin/bash".into(), "-xc".into(), "run.sh".into()])
        );
        assert_eq!(
            b.step(&steps[2]).unwrap(),
            Action::Run {
                argv: vec!["/bin/bash".into(), "-xc".into(), "ls".into()],
                env: vec![]
            }
        );
        // ... but not one this stage set.
        let df = parse("FROM scratch\nCMD [\"x\"]\nENTRYPOINT [\"e\"]\n").unwrap();
        let mut b = StageBuilder::new(&[], &BTreeMap::new(), base);
        for s in &df.stages[0].steps {
            assert_eq!(b.step(s).unwrap(), Action::Config);
        }
        assert_eq!(b.settings().cmd, Some(vec!["x".into()]));
        assert_eq!(b.settings().entrypoint, Some(vec!["e".into()]));
    }

    #[test]
    fn add_unpacks_and_copy_does_not() {
        let (actions, _) = run_stage(
            "FROM scratch\nWORKDIR /app\nADD --chown=1:1 --chmod=0755 a.tar.gz ./\nCOPY [\"a b\", \"c\"]\n",
            &[],
        );
        assert_eq!(
            actions[1],
            Action::Copy {
                srcs: vec!["a.tar.gz".into()],
                dest: "/app/".into(),
                chown: Some("1:1".into()),
                chmod: Some("0755".into()),
                from: None,
                unpack: true,
            }
        );
        assert_eq!(
            actions[2],
            Action::Copy {
                srcs: vec!["a b".into()],
                dest: "/app/c".into(),
                chown: None,
                chmod: None,
                from: None,
                unpack: false,
            }
        );
    }

    #[test]
    fn multi_stage_from_names_and_indices() {
        let text = concat!(
            "ARG TOOLS=tools\n",
            "FROM golang AS build\n",
            "RUN go build\n",
            "FROM alpine AS tools\n",
            "FROM build AS test\n",
            "COPY --from=0 /out /out\n",
            "FROM alpine AS alpine\n",
            "COPY --from=BUILD /out /bin/\n",
            "COPY --from=$TOOLS /t /t\n",
            "COPY --from=busybox:latest /bin/busybox /bin/\n",
        );
        let df = parse(text).unwrap();
        assert_eq!(df.stages.len(), 4);
        // Stage names are not substituted.
        assert_eq!(df.stages[1].name.as_deref(), Some("tools"));
        let none = BTreeMap::new();
        assert_eq!(df.target(None).unwrap(), 3);
        assert_eq!(df.target(Some("TEST")).unwrap(), 2);
        assert_eq!(
            df.target(Some("nope")).unwrap_err().message,
            "target stage \"nope\" could not be found"
        );
        // FROM build: the earlier stage; FROM alpine AS alpine: the image.
        assert_eq!(
            df.base_stage(
                2,
                &resolve_from(&df.stages[2], &df.global_args, &none).unwrap()
            ),
            Some(0)
        );
        assert_eq!(df.base_stage(3, "alpine"), None);
        assert_eq!(df.copy_source(3, "build", 8).unwrap(), Source::Stage(0));
        assert_eq!(df.copy_source(3, "1", 8).unwrap(), Source::Stage(1));
        assert_eq!(
            df.copy_source(3, "busybox:latest", 8).unwrap(),
            Source::Image("busybox:latest".into())
        );
        assert_eq!(
            df.copy_source(3, "alpine", 8).unwrap_err().message,
            "COPY --from=alpine refers to its own stage"
        );
        assert_eq!(
            df.copy_source(3, "7", 8).unwrap_err().message,
            "COPY --from=7: there is no stage 7 (the Dockerfile has 4)"
        );

        // --from substitutes global ARGs only, build args overriding them.
        let mut b = StageBuilder::new(&df.global_args, &none, Settings::default());
        let froms: Vec<Option<String>> = df.stages[3]
            .steps
            .iter()
            .map(|s| match b.step(s).unwrap() {
                Action::Copy { from, .. } => from,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            froms,
            vec![
                Some("BUILD".to_string()),
                Some("tools".into()),
                Some("busybox:latest".into())
            ]
        );

        // Only what the target needs, dependencies first.
        assert_eq!(df.build_order(3, &none).unwrap(), vec![0, 1, 3]);
        assert_eq!(df.build_order(2, &none).unwrap(), vec![0, 2]);
        assert_eq!(df.build_order(1, &none).unwrap(), vec![1]);
        let renamed = args(&[("TOOLS", "test")]);
        assert_eq!(df.build_order(3, &renamed).unwrap(), vec![0, 2, 3]);
    }

    #[test]
    fn build_order_detects_cycles() {
        let df =
            parse("FROM scratch AS a\nCOPY --from=b / /\nFROM scratch AS b\nCOPY --from=a / /\n")
                .unwrap();
        let e = df.build_order(1, &BTreeMap::new()).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (3, "circular dependency detected on stage b")
        );
        let df = parse("FROM scratch AS a\nCOPY --from=a / /\n").unwrap();
        let e = df.build_order(0, &BTreeMap::new()).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "COPY --from=a refers to its own stage")
        );
    }

    #[test]
    fn resolve_from_errors() {
        let df = parse("ARG IMG\nFROM $IMG\nFROM ${X:?set-X}\n").unwrap();
        let none = BTreeMap::new();
        let e = resolve_from(&df.stages[0], &df.global_args, &none).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "FROM: base name ($IMG) should not be blank")
        );
        assert_eq!(
            resolve_from(&df.stages[0], &df.global_args, &args(&[("IMG", "debian")])).unwrap(),
            "debian"
        );
        let e = resolve_from(&df.stages[1], &df.global_args, &none).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.ends_with("X: set-X"), "{e}");
        // An undeclared build arg is not visible in FROM.
        assert_eq!(
            resolve_from(&df.stages[1], &df.global_args, &args(&[("X", "x")]))
                .unwrap_err()
                .line,
            3
        );
    }

    #[test]
    fn several_args_in_one_instruction() {
        let df = parse("ARG A=1 B\nFROM scratch\nARG C=\"x y\" D\n").unwrap();
        assert_eq!(
            df.global_args
                .iter()
                .map(|a| (a.name.as_str(), a.default.as_deref()))
                .collect::<Vec<_>>(),
            vec![("A", Some("1")), ("B", None)]
        );
        let steps = &df.stages[0].steps;
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].text, steps[1].text);
        assert_eq!(
            steps[0].instr,
            Instr::Arg(ArgDecl {
                name: "C".into(),
                default: Some("\"x y\"".into()),
                line: 3
            })
        );
    }

    #[test]
    fn words_keep_quotes_and_escapes() {
        assert_eq!(
            parse_words("a  \"b c\" 'd e'f g\\ h", '\\'),
            vec!["a", "\"b c\"", "'d e'f", "g\\ h"]
        );
        assert_eq!(parse_words("\"\" x", '\\'), vec!["\"\"", "x"]);
        assert_eq!(parse_words("a\\", '\\'), vec!["a"]);
        assert_eq!(parse_words("'a\\' b", '\\'), vec!["'a\\'", "b"]);
        assert_eq!(parse_words("x`  y", '`'), vec!["x` ", "y"]);
        assert_eq!(literal("a$b\"c'd\\e", '\\'), "a\\$b\\\"c\\'d\\\\e");
        assert_eq!(
            sub(&literal("a$b\"c'd\\e", '\\'), &[("b", "X")]).unwrap(),
            "a$b\"c'd\\e"
        );
    }

    #[test]
    fn settings_json_round_trip() {
        let blob = br#"{
            "architecture": "amd64",
            "config": {
                "Env": ["PATH=/usr/bin", "A=1"],
                "User": "app",
                "WorkingDir": "/w",
                "Cmd": null,
                "Entrypoint": ["/e"],
                "ExposedPorts": {"80/tcp": {}},
                "Volumes": {"/d": {}},
                "Labels": {"k": "v"},
                "StopSignal": "SIGINT",
                "Shell": ["/bin/ash", "-c"],
                "Healthcheck": {"Test": ["NONE"]},
                "OnBuild": null,
                "ArgsEscaped": true
            },
            "rootfs": {"type": "layers", "diff_ids": []}
        }"#;
        let s = Settings::from_config_json(blob).unwrap();
        assert_eq!(s.env, vec!["PATH=/usr/bin".to_string(), "A=1".into()]);
        assert_eq!(s.env_value("A"), Some("1"));
        assert_eq!(s.user, "app");
        assert_eq!(s.working_dir, "/w");
        assert_eq!(s.cmd, None);
        assert_eq!(s.entrypoint, Some(vec!["/e".into()]));
        assert!(s.exposed_ports.contains("80/tcp") && s.volumes.contains("/d"));
        assert_eq!(s.labels, args(&[("k", "v")]));
        assert_eq!(s.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(
            s.shell_or_default(),
            vec!["/bin/ash".to_string(), "-c".into()]
        );

        let mut config: serde_json::Value = serde_json::from_slice(blob).unwrap();
        let mut changed = s.clone();
        changed.cmd = Some(vec!["serve".into()]);
        changed.labels.clear();
        changed.user.clear();
        changed.write_to(&mut config);
        let c = &config["config"];
        assert_eq!(c["Cmd"], serde_json::json!(["serve"]));
        assert!(c.get("Labels").is_none() && c.get("User").is_none());
        assert_eq!(c["Healthcheck"], serde_json::json!({"Test": ["NONE"]}));
        assert_eq!(c["ArgsEscaped"], serde_json::json!(true));
        assert_eq!(c["ExposedPorts"], serde_json::json!({"80/tcp": {}}));
        assert_eq!(config["architecture"], "amd64");
        let back = Settings::from_config_json(&serde_json::to_vec(&config).unwrap()).unwrap();
        assert_eq!(back, changed);

        // No config at all, nulls everywhere: empty settings; written into a bare value.
        assert_eq!(
            Settings::from_config_json(b"{}").unwrap(),
            Settings::default()
        );
        assert_eq!(
            Settings::from_config_json(br#"{"config":{"Env":null,"Labels":null,"Shell":null}}"#)
                .unwrap(),
            Settings::default()
        );
        assert_eq!(
            Settings::default().shell_or_default(),
            vec!["/bin/sh".to_string(), "-c".into()]
        );
        let mut v = serde_json::Value::Null;
        s.write_to(&mut v);
        assert_eq!(
            Settings::from_config_json(&serde_json::to_vec(&v).unwrap()).unwrap(),
            s
        );

        let e = Settings::from_config_json(br#"{"config":{"Env":"A=1"}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Dockerfile line 0: image config: config field \"Env\" is not an array of strings"
        );
        assert_eq!(Settings::from_config_json(b"not json").unwrap_err().line, 0);
    }

    #[test]
    fn base_settings_carry_into_the_stage() {
        let base = Settings {
            env: vec!["PATH=/usr/bin".into()],
            ..Settings::default()
        };
        let df = parse("FROM scratch\nENV PATH=/opt/bin:$PATH\nRUN x\n").unwrap();
        let mut b = StageBuilder::new(&[], &BTreeMap::new(), base);
        b.step(&df.stages[0].steps[0]).unwrap();
        assert_eq!(b.settings().env, vec!["PATH=/opt/bin:/usr/bin".to_string()]);
        assert_eq!(
            b.step(&df.stages[0].steps[1]).unwrap(),
            Action::Run {
                argv: vec!["/bin/sh".into(), "-c".into(), "x".into()],
                env: vec!["PATH=/opt/bin:/usr/bin".into()]
            }
        );
    }

    #[test]
    fn healthcheck() {
        let (_, s) = run_stage(
            "FROM scratch\nHEALTHCHECK --interval=1m30s --timeout=2.5s --start-period=100ms --start-interval=1s --retries=3 CMD curl -f http://localhost/ || exit 1\n",
            &[],
        );
        let h = s.healthcheck.clone().unwrap();
        assert_eq!(
            h,
            Healthcheck {
                test: vec![
                    "CMD-SHELL".into(),
                    "curl -f http://localhost/ || exit 1".into()
                ],
                interval: 90_000_000_000,
                timeout: 2_500_000_000,
                start_period: 100_000_000,
                start_interval: 1_000_000_000,
                retries: 3,
            }
        );
        let mut v = serde_json::json!({});
        s.write_to(&mut v);
        assert_eq!(
            v["config"]["Healthcheck"],
            serde_json::json!({"Test": ["CMD-SHELL", "curl -f http://localhost/ || exit 1"],
                "Interval": 90_000_000_000u64, "Timeout": 2_500_000_000u64,
                "StartPeriod": 100_000_000u64, "StartInterval": 1_000_000_000u64, "Retries": 3})
        );
        assert_eq!(
            Settings::from_config_json(&serde_json::to_vec(&v).unwrap()).unwrap(),
            s
        );

        let (_, s) = run_stage(
            "FROM scratch\nhealthcheck cmd [\"/bin/check\", \"-q\"]\nHEALTHCHECK none\n",
            &[],
        );
        assert_eq!(s.healthcheck.unwrap().test, vec!["NONE".to_string()]);
        let (_, s) = run_stage(
            "FROM scratch\nHEALTHCHECK CMD [\"/bin/check\", \"-q\"]\n",
            &[],
        );
        let h = s.healthcheck.unwrap();
        assert_eq!(
            h.test,
            vec!["CMD".to_string(), "/bin/check".into(), "-q".into()]
        );
        assert_eq!((h.interval, h.retries), (0, 0));

        for (d, ns) in [
            ("0", 0),
            ("1h", 3_600_000_000_000),
            ("1.5m", 90_000_000_000),
            ("3ms", 3_000_000),
            (".5s", 500_000_000),
            ("2us", 2_000),
        ] {
            assert_eq!(go_duration(d), Some(ns), "{d}");
        }
        for bad in ["", "1", "s", "1x", "1.s.", "-1s"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn run_heredocs() {
        let df = parse(concat!(
            "FROM scratch\n",
            "RUN <<EOF\n",
            "set -e\n",
            "# not a comment here\n",
            "\n",
            "echo one\n",
            "EOF\n",
            "RUN cat <<-END > /f && \\\n",
            "  cat <<'X' >> /f\n",
            "\tindented $HOME\n",
            "\tEND\n",
            "literal\n",
            "X\n",
            "RUN <<-EOF\n",
            "\t\techo tabs\n",
            "\tEOF\n",
            "RUN echo \"<<NOT\" a heredoc\n",
        ))
        .unwrap();
        let cmds: Vec<&Instr> = df.stages[0].steps.iter().map(|s| &s.instr).collect();
        assert_eq!(
            *cmds[0],
            Instr::Run(Command::Shell(
                "set -e\n# not a comment here\n\necho one\n".into()
            ))
        );
        assert_eq!(df.stages[0].steps[0].text, "RUN <<EOF");
        assert_eq!(
            *cmds[1],
            Instr::Run(Command::Shell(
                "cat <<-END > /f &&   cat <<'X' >> /f\n\tindented $HOME\nEND\nliteral\nX".into()
            ))
        );
        assert_eq!(df.stages[0].steps[1].line, 8);
        assert_eq!(*cmds[2], Instr::Run(Command::Shell("echo tabs\n".into())));
        assert_eq!(df.stages[0].steps[3].line, 17);
        assert_eq!(
            *cmds[3],
            Instr::Run(Command::Shell("echo \"<<NOT\" a heredoc".into()))
        );

        let e = err_of("FROM scratch\nRUN <<EOF\necho\n");
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "unterminated here-document: no line \"EOF\" after it")
        );
        let e = err_of("FROM scratch\nCOPY <<EOF /etc/x\nbody\nEOF\n");
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "COPY from a here-document (<<EOF) is not supported")
        );
        let e = err_of("FROM scratch\nRUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\n");
        assert!(e.message.contains("#! is not supported"), "{e}");
    }

    #[test]
    fn platform_args_are_predefined() {
        let text = "FROM --platform=$BUILDPLATFORM golang:${TARGETOS:-none} AS b\nARG TARGETARCH\nRUN echo\nFROM scratch\nRUN echo\n";
        let df = parse(text).unwrap();
        let mut build_args = platform_args("linux", "arm64", "v8");
        build_args.insert("TARGETOS".into(), "custom".into());
        assert_eq!(build_args["TARGETPLATFORM"], "linux/arm64/v8");
        assert_eq!(build_args["BUILDARCH"], "arm64");
        assert_eq!(
            resolve_from(&df.stages[0], &df.global_args, &build_args).unwrap(),
            "golang:custom"
        );
        assert_eq!(
            resolve_from(&df.stages[0], &df.global_args, &BTreeMap::new()).unwrap(),
            "golang:none"
        );
        let env_of = |stage: usize| {
            let mut b = StageBuilder::new(&df.global_args, &build_args, Settings::default());
            let mut env = None;
            for s in &df.stages[stage].steps {
                if let Action::Run { env: e, .. } = b.step(s).unwrap() {
                    env = Some(e);
                }
            }
            env.unwrap()
        };
        // Visible in a stage only once declared.
        assert_eq!(env_of(0), vec!["TARGETARCH=arm64".to_string()]);
        assert_eq!(env_of(1), Vec::<String>::new());
        assert!(df.unused_build_args(&build_args).is_empty());
        assert_eq!(df.target(None).unwrap(), 1);
        assert!(df.build_order(5, &build_args).is_err());
    }

    #[test]
    fn onbuild_triggers_are_recorded_as_written_and_round_trip() {
        let df = parse("FROM scratch\nONBUILD COPY ${SRC:-.} /app/\nonbuild RUN make\n").unwrap();
        let steps = &df.stages[0].steps;
        assert_eq!(
            steps[0].instr,
            Instr::Onbuild("COPY ${SRC:-.} /app/".into())
        );
        assert_eq!(steps[1].instr, Instr::Onbuild("RUN make".into()));
        let mut b = StageBuilder::new(&[], &BTreeMap::new(), Settings::default());
        for s in steps {
            assert_eq!(b.step(s).unwrap(), Action::Config);
        }
        let settings = b.into_settings();
        assert_eq!(settings.onbuild, ["COPY ${SRC:-.} /app/", "RUN make"]);
        let mut config = serde_json::json!({"config": {"Env": ["A=1"]}});
        settings.write_to(&mut config);
        assert_eq!(
            config["config"]["OnBuild"],
            serde_json::json!(["COPY ${SRC:-.} /app/", "RUN make"])
        );
        let back = Settings::from_config_json(&serde_json::to_vec(&config).unwrap()).unwrap();
        assert_eq!(back.onbuild, settings.onbuild);
        // A trigger parses back into the step it stands for.
        let t = parse_instructions(&back.onbuild[0]).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].line, 1);
        assert!(matches!(&t[0].instr, Instr::Copy(c) if c.dest == "/app/"));
        let e = parse_instructions("FROM x").unwrap_err();
        assert_eq!(e.message, "FROM cannot be used here");
        let e = parse_instructions("COPY").unwrap_err();
        assert_eq!(e.line, 1, "{e}");
    }
}

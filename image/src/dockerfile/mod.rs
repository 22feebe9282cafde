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
//!
//! Layout, in the order a Dockerfile goes through it: `lines` (directives, continuations,
//! here-documents) → `parse` (instructions into [`Stage`]s of [`Step`]s, using `lex` to split
//! words) → `stage` (ARG scope, FROM and `COPY --from` resolution, build order, the
//! [`StageBuilder`], using `lex` to substitute) over `settings` (the image config it edits).

use std::collections::BTreeMap;

mod lex;
mod lines;
mod mount;
mod parse;
mod settings;
mod stage;

pub use lex::substitute;
pub use mount::{MountKind, RunMount, RunNetwork, Sharing, SECRETS_DIR};
pub use parse::{parse, parse_instructions};
pub use settings::{Healthcheck, Settings};
pub use stage::{is_url, resolve_from, Action, Source, StageBuilder};

/// A Dockerfile that cannot be parsed, or a step that cannot be applied. `line` is the 1-based
/// line of the instruction's first line (0: not about a line, e.g. a base image's config).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {message}")]
pub struct DockerfileError {
    /// The 1-based line (0: not about a line).
    pub line: usize,
    /// What is wrong, for a user to read.
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

/// The user's build args over this host's [`platform_args`] (Rudder builds for the host it
/// builds on: `linux/amd64` on an x86-64 host, variant `v7` for 32-bit arm as BuildKit
/// reports it, else none). A build arg of the same name wins, as in BuildKit.
pub fn with_host_platform_args(user: BTreeMap<String, String>) -> BTreeMap<String, String> {
    let arch = crate::oci::host_architecture();
    let variant = if arch == "arm" { "v7" } else { "" };
    let mut args = platform_args("linux", arch, variant);
    args.extend(user);
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
    /// The variable's name, as written (case-sensitive).
    pub name: String,
    /// As written (quotes and `$` references intact): substituted when the ARG is applied.
    pub default: Option<String>,
    /// The 1-based line of the ARG.
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
    /// The 1-based line of the FROM.
    pub line: usize,
    /// The stage's instructions after FROM, in order.
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
    /// The instruction and its arguments, as written.
    pub instr: Instr,
    /// The file's escape character, needed to substitute this step's arguments.
    pub escape: char,
}

/// An instruction with its arguments as written (see the module invariants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instr {
    /// `ARG NAME[=default]`.
    Arg(ArgDecl),
    /// `ENV K=V …` (or the legacy `ENV K V`).
    Env(Vec<(String, String)>),
    /// `LABEL k=v …`.
    Label(Vec<(String, String)>),
    /// `MAINTAINER text` (deprecated): the image config's `author`, as docker sets it; no
    /// variable substitution, as in docker.
    Maintainer(String),
    /// `WORKDIR path`, relative to the previous one.
    Workdir(String),
    /// `USER user[:group]`.
    User(String),
    /// Words as written; one may expand to several ports (`EXPOSE $PORTS`, ranges).
    Expose(Vec<String>),
    /// `VOLUME path …`.
    Volume(Vec<String>),
    /// `CMD`: the default command.
    Cmd(Command),
    /// `ENTRYPOINT`: the command CMD's words are appended to.
    Entrypoint(Command),
    /// `RUN [--mount=…]… [--network=…]`: a command run in a container of the image so far.
    Run(RunSpec),
    /// `COPY src… dest`.
    Copy(CopySpec),
    /// `ADD src… dest`: also fetches URLs and unpacks local tar archives.
    Add(CopySpec),
    /// `SHELL ["sh", "-c"]`: the shell of later shell-form commands.
    Shell(Vec<String>),
    /// `STOPSIGNAL signal`.
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

impl Instr {
    /// A plain `RUN command` (no flags).
    pub fn run(command: Command) -> Instr {
        Instr::Run(RunSpec {
            command,
            mounts: Vec::new(),
            network: RunNetwork::Default,
        })
    }
}

/// RUN's arguments and flags, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// What to run.
    pub command: Command,
    /// `--mount=…` (repeatable), values unsubstituted.
    pub mounts: Vec<RunMount>,
    /// `--network=default|none`.
    pub network: RunNetwork,
}

/// A `COPY <<NAME` / `ADD <<NAME` here-document: a file named NAME with the body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeredocFile {
    /// The delimiter: the file's name.
    pub name: String,
    /// The body (leading tabs already stripped for `<<-`).
    pub data: String,
    /// Whether variables in the body are substituted (an unquoted delimiter, as in BuildKit).
    pub expand: bool,
}

/// COPY/ADD arguments, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopySpec {
    /// At least one.
    pub srcs: Vec<String>,
    /// The destination, relative to WORKDIR unless absolute.
    pub dest: String,
    /// `--chown=user[:group]`.
    pub chown: Option<String>,
    /// `--chmod=mode`, octal.
    pub chmod: Option<String>,
    /// A stage name, a stage index or an image (COPY only).
    pub from: Option<String>,
    /// `--parents`: keep the sources' directories (below a `/./` pivot, if any).
    pub parents: bool,
    /// `--exclude=PATTERN` (repeatable), as written.
    pub excludes: Vec<String>,
    /// `ADD --checksum=sha256:…` of a URL, as written.
    pub checksum: Option<String>,
    /// `<<NAME` sources: files made from here-documents.
    pub heredocs: Vec<HeredocFile>,
}

/// Helpers the tests of every submodule share.
#[cfg(test)]
mod test_util {
    use super::*;

    pub(super) fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub(super) fn err_of(text: &str) -> DockerfileError {
        match parse(text) {
            Ok(d) => panic!("expected an error for {text:?}, got {d:?}"),
            Err(e) => e,
        }
    }

    /// Runs every step of the last stage, returning the actions.
    pub(super) fn run_stage(text: &str, build_args: &[(&str, &str)]) -> (Vec<Action>, Settings) {
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

    pub(super) fn sub(word: &str, vars: &[(&str, &str)]) -> Result<String, String> {
        let vars = args(vars);
        substitute(word, '\\', &|n: &str| vars.get(n).cloned())
    }
}

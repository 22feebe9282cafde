//! Stages at build time: the values of ARGs in scope, FROM and `COPY --from` resolved against
//! the global ARGs, the order stages build in, and the [`StageBuilder`] that applies one stage's
//! steps in order, substituting variables, and tells the executor what each step means
//! ([`Action`]).

use std::collections::{BTreeMap, BTreeSet};

use super::lex::substitute;
use super::{
    predefined, ArgDecl, Command, CopySpec, Dockerfile, DockerfileError, HeredocFile, Instr,
    RunMount, RunNetwork, Settings, Stage, Step, PLATFORM_ARGS, PROXY_ARGS,
};

/// Whether an ADD source is fetched from the web (`http://` or `https://`) rather than taken
/// from the context.
pub fn is_url(src: &str) -> bool {
    let lower = src.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

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
    Run {
        /// The command to run.
        argv: Vec<String>,
        /// Its environment, `K=V`.
        env: Vec<String>,
        /// `--mount`s, substituted, targets absolute. Left out of the JSON when empty, so a
        /// plain RUN's cache key is what it was before mounts existed.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        mounts: Vec<RunMount>,
        /// `--network`.
        #[serde(skip_serializing_if = "is_default_network")]
        network: RunNetwork,
    },
    /// dest made absolute against the working dir (a trailing '/' kept, and added for `.`: it
    /// means "into this directory"). unpack: ADD (local tar archives are unpacked). from: the
    /// `--from` value substituted with global ARGs; resolve it with
    /// [`Dockerfile::copy_source`]. chmod is validated octal.
    Copy {
        /// The sources, substituted: context paths or patterns, or URLs (ADD).
        srcs: Vec<String>,
        /// The absolute destination.
        dest: String,
        /// `--chown`, substituted.
        chown: Option<String>,
        /// `--chmod`, substituted.
        chmod: Option<String>,
        /// `--from`, substituted.
        from: Option<String>,
        /// ADD: unpack local tar archives.
        unpack: bool,
        /// `--parents`: sources keep their directories (below a `/./` pivot).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        parents: bool,
        /// `--exclude` patterns, substituted.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        excludes: Vec<String>,
        /// `ADD --checksum`, substituted (`sha256:` and 64 hex digits).
        #[serde(skip_serializing_if = "Option::is_none")]
        checksum: Option<String>,
        /// Here-document sources (bodies substituted unless quoted); `srcs` is then empty.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        heredocs: Vec<HeredocFile>,
    },
}

fn is_default_network(n: &RunNetwork) -> bool {
    *n == RunNetwork::Default
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
    /// A builder for one stage, starting from the base image's settings (`base`), with the
    /// file's global ARGs and the build's `--build-arg`s.
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

    /// The settings so far.
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

    /// A here-document's body with its variables substituted (`$V`, `${V…}`; `\$` is a
    /// literal `$`), quotes and other escapes kept as they are: it is a file, not a word.
    fn expand_text(&self, step: &Step, what: &str, text: &str) -> Result<String, DockerfileError> {
        let mut out = String::with_capacity(text.len());
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == step.escape && chars.peek().is_some_and(|(_, n)| *n == '$') {
                out.push('$');
                chars.next();
                continue;
            }
            if c != '$' {
                out.push(c);
                continue;
            }
            match chars.peek().map(|(_, n)| *n) {
                Some('{') => {
                    let mut depth = 0;
                    let mut end = None;
                    for (j, d) in text[i + 1..].char_indices() {
                        match d {
                            '{' => depth += 1,
                            '}' => {
                                depth -= 1;
                                if depth == 0 {
                                    end = Some(i + 1 + j);
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    let Some(end) = end else {
                        out.push(c);
                        continue;
                    };
                    out.push_str(&self.expand(step, what, &text[i..=end])?);
                    while chars.peek().is_some_and(|(j, _)| *j <= end) {
                        chars.next();
                    }
                }
                Some(n) if n.is_ascii_alphabetic() || n == '_' => {
                    let mut name = String::new();
                    while let Some((_, n)) = chars.peek() {
                        if !(n.is_ascii_alphanumeric() || *n == '_') {
                            break;
                        }
                        name.push(*n);
                        chars.next();
                    }
                    out.push_str(&self.lookup(&name).unwrap_or_default());
                }
                _ => out.push(c),
            }
        }
        Ok(out)
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
            Instr::Maintainer(text) => self.settings.author = Some(text.clone()),
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
            Instr::Run(run) => {
                let workdir = self.settings.working_dir.clone();
                let expand = |what: &str, w: &str| self.expand(step, what, w);
                let mounts = run
                    .mounts
                    .iter()
                    .map(|m| m.resolved(&workdir, line, &expand))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(Action::Run {
                    argv: self.argv(&run.command),
                    env: self.run_env(),
                    mounts,
                    network: run.network,
                });
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
        let excludes = spec
            .excludes
            .iter()
            .map(|e| self.expand(step, "--exclude", e))
            .collect::<Result<Vec<_>, _>>()?;
        let checksum = match &spec.checksum {
            Some(c) => {
                let c = self.expand(step, "--checksum", c)?;
                let hex = c.strip_prefix("sha256:").unwrap_or_default();
                if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(DockerfileError::new(
                        line,
                        format!("ADD --checksum={c}: expected sha256: and 64 hex digits"),
                    ));
                }
                if !srcs.iter().all(|s| is_url(s)) {
                    return Err(DockerfileError::new(
                        line,
                        "ADD --checksum is only for a URL source",
                    ));
                }
                Some(format!("sha256:{}", hex.to_ascii_lowercase()))
            }
            None => None,
        };
        let heredocs = spec
            .heredocs
            .iter()
            .map(|h| {
                let data = if h.expand {
                    self.expand_text(step, &format!("{name} <<{}", h.name), &h.data)?
                } else {
                    h.data.clone()
                };
                Ok(HeredocFile {
                    name: h.name.clone(),
                    data,
                    expand: h.expand,
                })
            })
            .collect::<Result<Vec<_>, DockerfileError>>()?;
        Ok(Action::Copy {
            srcs,
            dest,
            chown,
            chmod,
            from,
            unpack,
            parents: spec.parents,
            excludes,
            checksum,
            heredocs,
        })
    }
}

/// `path` made absolute against `base` (empty: `/`) and cleaned lexically (`..` stops at
/// `/`); no trailing slash except for `/` itself.
pub(super) fn absolute(base: &str, path: &str) -> String {
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
    use crate::dockerfile::test_util::*;
    use crate::dockerfile::*;

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
                mounts: Vec::new(),
                network: RunNetwork::Default,
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
                parents: false,
                excludes: Vec::new(),
                checksum: None,
                heredocs: Vec::new(),
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
                mounts: Vec::new(),
                network: RunNetwork::Default,
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
                env: vec![],
                mounts: Vec::new(),
                network: RunNetwork::Default,
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
                parents: false,
                excludes: Vec::new(),
                checksum: None,
                heredocs: Vec::new(),
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
                parents: false,
                excludes: Vec::new(),
                checksum: None,
                heredocs: Vec::new(),
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
                env: vec!["PATH=/opt/bin:/usr/bin".into()],
                mounts: Vec::new(),
                network: RunNetwork::Default,
            }
        );
    }

    #[test]
    fn maintainer_sets_the_author_not_a_label() {
        let (_, s) = run_stage(
            "FROM scratch\nMAINTAINER Jane <j@example.com> $NOT_EXPANDED\n",
            &[],
        );
        assert_eq!(
            s.author.as_deref(),
            Some("Jane <j@example.com> $NOT_EXPANDED")
        );
        assert!(s.labels.is_empty());
        // Docker writes it as the config's top-level `author`, and a child inherits it.
        let mut config = serde_json::json!({"architecture": "amd64"});
        s.write_to(&mut config);
        assert_eq!(config["author"], "Jane <j@example.com> $NOT_EXPANDED");
        assert!(config["config"].get("author").is_none());
        let back = Settings::from_config_json(&serde_json::to_vec(&config).unwrap()).unwrap();
        assert_eq!(back.author, s.author);
        // Settings without an author serialize as before (cache keys unchanged).
        let plain = serde_json::to_string(&Settings::default()).unwrap();
        assert!(!plain.contains("author"), "{plain}");
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

        // What the executor passes: the host's platform under the user's args.
        let host = with_host_platform_args(BTreeMap::from([("TARGETOS".into(), "x".into())]));
        assert_eq!(host["TARGETOS"], "x");
        assert_eq!(host["BUILDOS"], "linux");
        assert_eq!(host["TARGETARCH"], crate::oci::host_architecture());
        assert_eq!(
            host["TARGETPLATFORM"],
            format!("linux/{}", crate::oci::host_architecture())
        );
        assert_eq!(host.len(), 8);
    }
}

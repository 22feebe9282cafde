//! The parser: each logical instruction (see `lines`) becomes an [`Instr`], its arguments kept
//! exactly as written (see the module invariants of `dockerfile`), and FROMs open [`Stage`]s.
//! Checks everything that does not depend on variables: flags, argument counts, JSON forms,
//! stage names, HEALTHCHECK durations.

use super::lex::parse_words;
use super::lines::{logical_lines, parse_directives, Heredoc, Logical};
use super::{
    ArgDecl, Command, CopySpec, Dockerfile, DockerfileError, Healthcheck, Instr, Stage, Step,
};

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
        let instrs = if heredocs.is_empty() || lower == "copy" || lower == "add" {
            parse_instruction(keyword, &lower, flags, rest, line, escape, &heredocs)?
        } else if lower == "run" {
            let (mounts, network) = run_flags(&flags, line)?;
            vec![Instr::Run(super::RunSpec {
                command: Command::Shell(heredoc_command(rest, &heredocs, line)?),
                mounts,
                network,
            })]
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

/// Flags an instruction may carry more than once (`RUN --mount … --mount …`).
const REPEATABLE_FLAGS: [&str; 2] = ["mount", "exclude"];

/// RUN's flags: `--mount` (repeatable, see `mount`) and `--network`. `default` is what every
/// RUN gets anyway (its own network namespace on the host's bridge), `none` a namespace with
/// only loopback; `host` is refused: a step on the host's network would reach what listens on
/// the host's loopback (the agent's and controller's ports). `--security` is not supported.
fn run_flags(
    flags: &Flags,
    line: usize,
) -> Result<(Vec<super::RunMount>, super::RunNetwork), DockerfileError> {
    flags.check("RUN", &["network", "mount"], &["security"], line)?;
    let network = match flags.string("network", line)?.as_deref() {
        None | Some("default") => super::RunNetwork::Default,
        Some("none") => super::RunNetwork::None,
        Some("host") => return Err(DockerfileError::new(
            line,
            "RUN --network=host is refused: a build step on the host's network could reach the services listening on the host; use the default network",
        )),
        Some(other) => return Err(DockerfileError::new(
            line,
            format!("RUN --network={other:?}: expected default, none or host"),
        )),
    };
    let mounts = flags.strings("mount", line)?;
    let mounts: Vec<&str> = mounts.iter().map(String::as_str).collect();
    Ok((super::mount::parse_mounts(&mounts, line)?, network))
}

/// COPY/ADD sources from here-documents: each `<<NAME` word among `words` becomes a file
/// NAME with its body (leading tabs stripped for `<<-`; variables substituted unless the
/// delimiter is quoted, as in BuildKit). The other words stay.
fn heredoc_sources(
    name: &str,
    words: Vec<String>,
    heredocs: &[Heredoc],
    line: usize,
) -> Result<(Vec<String>, Vec<super::HeredocFile>), DockerfileError> {
    let mut files = Vec::new();
    let mut rest = Vec::new();
    for w in words {
        let Some(marker) = w.strip_prefix("<<") else {
            rest.push(w);
            continue;
        };
        let marker = marker.strip_prefix('-').unwrap_or(marker);
        let quoted = marker.starts_with(['"', '\'']);
        let bare = marker.trim_matches(|c| c == '"' || c == '\'');
        let Some(h) = heredocs.iter().find(|h| h.name == bare) else {
            rest.push(w);
            continue;
        };
        if bare.contains('/') || bare == "." || bare == ".." {
            return Err(DockerfileError::new(
                line,
                format!("{name} <<{bare}: a here-document's name is the file's name and cannot hold '/'"),
            ));
        }
        let data = if h.chomp {
            h.data
                .lines()
                .map(|l| format!("{}\n", l.trim_start_matches('\t')))
                .collect()
        } else {
            h.data.clone()
        };
        files.push(super::HeredocFile {
            name: bare.to_string(),
            data,
            expand: !quoted,
        });
    }
    Ok((rest, files))
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
            // `--mount` and `--exclude` may be given several times, as in BuildKit.
            if !REPEATABLE_FLAGS.contains(&name) && flags.items.iter().any(|(n, _)| n == name) {
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

    /// Every value of a repeatable flag, in order; one without `=value` is an error.
    fn strings(&self, name: &str, line: usize) -> Result<Vec<String>, DockerfileError> {
        self.items
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| {
                v.clone().ok_or_else(|| {
                    DockerfileError::new(
                        line,
                        format!("flag \"--{name}\" needs a value (--{name}=...)"),
                    )
                })
            })
            .collect()
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
    heredocs: &[Heredoc],
) -> Result<Vec<Instr>, DockerfileError> {
    let name = lower.to_ascii_uppercase();
    let err = |message: String| DockerfileError::new(line, message);
    let at_least_one = || err(format!("{name} requires at least one argument"));
    let exactly_one = || err(format!("{name} requires exactly one argument"));
    match lower {
        "run" => {
            run_flags(&flags, line)?;
        }
        "copy" => flags.check(
            &name,
            &["from", "chown", "chmod", "link", "parents", "exclude"],
            &[],
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
                &["chown", "chmod", "link", "checksum", "exclude"],
                &["keep-git-dir"],
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
            parse_instruction(keyword, &kw, trigger_flags, trigger_rest, line, escape, &[])?;
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
            Instr::Maintainer(rest.to_string())
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
                "run" => {
                    let (mounts, network) = run_flags(&flags, line)?;
                    Instr::Run(super::RunSpec {
                        command,
                        mounts,
                        network,
                    })
                }
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
            let words = parse_list(&name, rest, line, escape)?;
            let (mut words, files) = heredoc_sources(&name, words, heredocs, line)?;
            if !files.is_empty() {
                if words.len() != 1 {
                    return Err(err(format!(
                        "{name} from here-documents takes only a destination after them (copy other files with another {name})"
                    )));
                }
                if files.len() > 1 && !words[0].ends_with('/') {
                    return Err(err(format!(
                        "When using {name} with more than one source file, the destination must be a directory and end with a / ({:?})",
                        words[0]
                    )));
                }
                words.insert(0, String::new());
            }
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
            if !files.is_empty() {
                words.clear();
            }
            let checksum = flags.string("checksum", line)?;
            if let Some(c) = &checksum {
                let hex = c.strip_prefix("sha256:").unwrap_or_default();
                let valid = hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit() || c == '$');
                if !valid && !c.contains('$') {
                    return Err(err(format!(
                        "ADD --checksum={c}: expected sha256: and 64 hex digits"
                    )));
                }
                if words.len() != 1 {
                    return Err(err("ADD --checksum takes exactly one source URL".into()));
                }
            }
            let spec = CopySpec {
                srcs: words,
                dest,
                chown: flags.string("chown", line)?,
                chmod: flags.string("chmod", line)?,
                from: flags.string("from", line)?,
                parents: flags.boolean("parents", line)?,
                excludes: flags.strings("exclude", line)?,
                checksum,
                heredocs: files,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::test_util::*;
    use crate::dockerfile::*;

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
            Instr::run(Command::Shell("echo hi".into())),
            Instr::Copy(CopySpec {
                srcs: strings(&["a", "b"]),
                dest: "/dst/".into(),
                chown: Some("1:2".into()),
                chmod: Some("644".into()),
                from: None,
                ..Default::default()
            }),
            Instr::Add(CopySpec {
                srcs: strings(&["x.tar"]),
                dest: "/opt/".into(),
                chown: None,
                chmod: None,
                from: None,
                ..Default::default()
            }),
            Instr::Shell(strings(&["/bin/bash", "-c"])),
            Instr::StopSignal("SIGTERM".into()),
            Instr::Maintainer("someone <s@example.com>".into()),
        ];
        assert_eq!(instrs, want.iter().collect::<Vec<_>>());
        assert_eq!(st.steps[0].line, 3);
        assert_eq!(st.steps[1].text, "ENV A=1 B=\"two words\"");
    }

    #[test]
    fn case_insensitive_instructions_and_as() {
        let df = parse("from alpine as Builder\nrUn true\nFrOm builder\n").unwrap();
        assert_eq!(df.stages[0].name.as_deref(), Some("builder"));
        assert_eq!(
            df.stages[0].steps[0].instr,
            Instr::run(Command::Shell("true".into()))
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
            Instr::run(Command::Exec(vec!["echo".into(), "a b".into()]))
        );
        assert_eq!(*i[1], Instr::run(Command::Shell("[not json".into())));
        assert_eq!(
            *i[2],
            Instr::Cmd(Command::Shell("[\"unterminated\"".into()))
        );
        assert_eq!(*i[3], Instr::Entrypoint(Command::Exec(vec![])));
        assert_eq!(*i[4], Instr::Cmd(Command::Exec(vec![])));
        assert_eq!(*i[5], Instr::run(Command::Exec(vec!["x".into()])));

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
                ..Default::default()
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
                ..Default::default()
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
            ("FROM scratch\nRUN --network=host make\n", 2, "RUN --network=host is refused: a build step on the host's network could reach the services listening on the host; use the default network"),
            ("FROM scratch\nRUN --network=bridge make\n", 2, "RUN --network=\"bridge\": expected default, none or host"),
            ("FROM scratch\nRUN --security=insecure make\n", 2, "flag \"--security\" of RUN is not supported"),
            ("FROM scratch\nADD --checksum=md5:abc http://x/y /\n", 2, "ADD --checksum=md5:abc: expected sha256: and 64 hex digits"),
            ("FROM scratch\nADD --checksum=sha256:0000000000000000000000000000000000000000000000000000000000000000 http://x/a http://x/b /d/\n", 2, "ADD --checksum takes exactly one source URL"),
            ("FROM scratch\nCOPY --exclude a b\n", 2, "flag \"--exclude\" needs a value (--exclude=...)"),
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
        let df = parse("FROM scratch\nRUN --network=default echo hi\n").unwrap();
        assert_eq!(
            df.stages[0].steps[0].instr,
            Instr::run(Command::Shell("echo hi".into()))
        );
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

    #[test]
    fn copy_parents_exclude_and_add_checksum() {
        let sum = "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824";
        let text = format!(
            "FROM scratch\nARG PAT=*.md\nCOPY --parents --exclude=${{PAT}} --exclude=*.tmp ./a/./b/*.txt /dst/\nADD --checksum={sum} http://example.com/x.tgz /x.tgz\nRUN --mount=type=tmpfs,target=/a --mount=type=tmpfs,target=/b make\n"
        );
        let (actions, _) = run_stage(&text, &[]);
        let Action::Copy {
            srcs,
            parents,
            excludes,
            ..
        } = &actions[1]
        else {
            panic!("{:?}", actions[1])
        };
        assert_eq!(srcs, &["./a/./b/*.txt"]);
        assert!(*parents);
        assert_eq!(excludes, &["*.md", "*.tmp"]);
        let Action::Copy { checksum, .. } = &actions[2] else {
            panic!("{:?}", actions[2])
        };
        assert_eq!(checksum.as_deref(), Some(sum.to_ascii_lowercase().as_str()));
        // Two --mount flags are two mounts, not a "duplicate flag".
        let Action::Run { mounts, .. } = &actions[3] else {
            panic!("{:?}", actions[3])
        };
        assert_eq!(mounts.len(), 2);
        // A checksum is for URLs only.
        let df = parse(&format!("FROM scratch\nADD --checksum={sum} local.tgz /\n")).unwrap();
        let mut b = StageBuilder::new(&[], &BTreeMap::new(), Settings::default());
        let e = b.step(&df.stages[0].steps[0]).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "ADD --checksum is only for a URL source")
        );
    }
}

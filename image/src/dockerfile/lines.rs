//! From the file's physical lines to instructions: the parser directives at the top
//! (`# escape=`), continuation lines joined, comments and blank lines dropped (also between
//! continuation lines, as docker does), and the here-documents of RUN/COPY/ADD read as they
//! are. Each [`Logical`] instruction keeps the 1-based line it starts on, for errors.

use std::collections::BTreeSet;

use super::lex::parse_words;
use super::DockerfileError;

/// Reads the parser directives at the top of the file (`# escape=…`, `# syntax=…`,
/// `# check=…`) and returns the escape character. As in docker, directives end at the first
/// line that is not one (a comment, a blank line, an instruction, an unknown directive).
pub(super) fn parse_directives(lines: &[&str]) -> Result<char, DockerfileError> {
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
/// An escaped escape character (`\\` at the end) is a literal one and ends the line, as in
/// docker: only an odd run of escape characters at the end continues the line.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    let run = trimmed.chars().rev().take_while(|c| *c == escape).count();
    match trimmed.strip_suffix(escape) {
        Some(rest) if run % 2 == 1 => (rest, false),
        _ => (line, true),
    }
}

/// One instruction as read from the file.
pub(super) struct Logical {
    /// The 1-based line it starts on.
    pub(super) line: usize,
    /// Continuation lines joined.
    pub(super) text: String,
    /// The here-documents of a RUN/COPY/ADD, in order.
    pub(super) heredocs: Vec<Heredoc>,
}

/// `<<NAME` (or `<<-NAME`: leading tabs stripped) and the lines up to `NAME`.
pub(super) struct Heredoc {
    pub(super) name: String,
    pub(super) chomp: bool,
    /// The body, each line ending in `\n`.
    pub(super) data: String,
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

/// Joins continuation lines into instructions, dropping comments and blank lines (also those
/// between continuation lines, as docker does), and reads the here-documents of RUN, COPY and
/// ADD (their lines are taken as they are).
pub(super) fn logical_lines(lines: &[&str], escape: char) -> Result<Vec<Logical>, DockerfileError> {
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

#[cfg(test)]
mod tests {
    use crate::dockerfile::test_util::*;
    use crate::dockerfile::*;

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
            Instr::run(Command::Shell(
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
    fn an_escaped_escape_at_the_end_ends_the_line() {
        // `\\` at the end is a literal backslash: the next line is an instruction of its own.
        let df = parse("FROM scratch\nRUN echo a\\\\\nRUN echo b \\\\\\\n  c\n").unwrap();
        let st = &df.stages[0];
        assert_eq!(st.steps.len(), 2, "{:?}", st.steps);
        assert_eq!(
            st.steps[0].instr,
            Instr::run(Command::Shell("echo a\\\\".into()))
        );
        // Three: an escaped backslash, then a continuation.
        assert_eq!(st.steps[1].line, 3);
        assert_eq!(
            st.steps[1].instr,
            Instr::run(Command::Shell("echo b \\\\  c".into()))
        );
        let df = parse("# escape=`\nFROM scratch\nRUN echo ``\nRUN echo b\n").unwrap();
        assert_eq!(df.stages[0].steps.len(), 2);
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
                parents: false,
                excludes: Vec::new(),
                checksum: None,
                heredocs: Vec::new(),
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
            Instr::run(Command::Shell(
                "set -e\n# not a comment here\n\necho one\n".into()
            ))
        );
        assert_eq!(df.stages[0].steps[0].text, "RUN <<EOF");
        assert_eq!(
            *cmds[1],
            Instr::run(Command::Shell(
                "cat <<-END > /f &&   cat <<'X' >> /f\n\tindented $HOME\nEND\nliteral\nX".into()
            ))
        );
        assert_eq!(df.stages[0].steps[1].line, 8);
        assert_eq!(*cmds[2], Instr::run(Command::Shell("echo tabs\n".into())));
        assert_eq!(df.stages[0].steps[3].line, 17);
        assert_eq!(
            *cmds[3],
            Instr::run(Command::Shell("echo \"<<NOT\" a heredoc".into()))
        );

        let e = err_of("FROM scratch\nRUN <<EOF\necho\n");
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "unterminated here-document: no line \"EOF\" after it")
        );
        let e = err_of("FROM scratch\nCOPY <<EOF a.txt /etc/x\nbody\nEOF\n");
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "COPY from here-documents takes only a destination after them (copy other files with another COPY)")
        );
        let e = err_of("FROM scratch\nCOPY <<A <<B /etc/x\na\nA\nb\nB\n");
        assert!(
            e.message.contains("must be a directory and end with a /"),
            "{e}"
        );
        let e = err_of("FROM scratch\nRUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\n");
        assert!(e.message.contains("#! is not supported"), "{e}");
    }

    #[test]
    fn copy_and_add_heredocs() {
        let text = "FROM scratch\nARG NAME=world\nCOPY <<EOF /etc/hello\nhello $NAME ${NAME:-x} \\$HOME \"q\"\nEOF\nCOPY <<-\"ONE\" <<TWO /conf/\n\tkeep $NAME\n\tONE\nsecond\nTWO\nADD <<EOF /a.txt\nadded\nEOF\nRUN true\n";
        let df = parse(text).unwrap();
        let steps = &df.stages[0].steps;
        assert_eq!(steps[2].line, 6);
        assert_eq!(steps[4].line, 14);
        let (actions, _) = run_stage(text, &[]);
        let Action::Copy {
            srcs,
            dest,
            heredocs,
            ..
        } = &actions[1]
        else {
            panic!("{:?}", actions[1])
        };
        assert!(srcs.is_empty());
        assert_eq!(dest, "/etc/hello");
        assert_eq!(heredocs[0].name, "EOF");
        // Variables are substituted; quotes and other characters stay as written.
        assert_eq!(heredocs[0].data, "hello world world $HOME \"q\"\n");
        let Action::Copy { dest, heredocs, .. } = &actions[2] else {
            panic!("{:?}", actions[2])
        };
        assert_eq!(dest, "/conf/");
        // `<<-` strips leading tabs; a quoted delimiter keeps `$` as written.
        assert_eq!(
            heredocs
                .iter()
                .map(|h| (h.name.as_str(), h.data.as_str()))
                .collect::<Vec<_>>(),
            [("ONE", "keep $NAME\n"), ("TWO", "second\n")]
        );
        let Action::Copy {
            unpack, heredocs, ..
        } = &actions[3]
        else {
            panic!("{:?}", actions[3])
        };
        assert!(*unpack);
        assert_eq!(heredocs[0].data, "added\n");
    }
}

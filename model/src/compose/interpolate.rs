//! Compose variable interpolation, applied to every string value (never to keys) after the YAML
//! is parsed: `$VAR`, `${VAR}`, `${VAR:-default}` (unset or empty), `${VAR-default}` (unset),
//! `${VAR:?error}` / `${VAR?error}` (refuse), `${VAR:+alt}` / `${VAR+alt}`, and `$$` for a
//! literal `$`. Defaults may themselves hold `${...}`. Pure: the variables come in a map.

use std::collections::BTreeMap;

/// Why a string could not be interpolated (the caller adds the key path and line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    /// `${VAR:?msg}` or `${VAR?msg}` with VAR unset (or empty for `:?`).
    #[error("required variable {var} is missing a value: {message}")]
    Required {
        /// The variable.
        var: String,
        /// The message written after `?`.
        message: String,
    },
    /// `${` without its `}`, or a bad name inside.
    #[error("invalid interpolation format in {0:?}")]
    Syntax(String),
}

/// Interpolates `s` with `vars`; unset variables without a default become empty strings (and
/// are listed in `unset`, so the caller can warn as compose does).
pub fn interpolate(
    s: &str,
    vars: &BTreeMap<String, String>,
    unset: &mut Vec<String>,
) -> Result<String, InterpolateError> {
    if !s.contains('$') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c != '$' {
            out.push(c);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('$') => {
                out.push('$');
                i += 2;
            }
            Some('{') => {
                // Find the matching brace (defaults may nest `${...}`).
                let mut depth = 0;
                let mut end = None;
                for (j, &ch) in chars.iter().enumerate().skip(i + 1) {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = Some(j);
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let end = end.ok_or_else(|| InterpolateError::Syntax(s.to_string()))?;
                let inner: String = chars[i + 2..end].iter().collect();
                out.push_str(&braced(&inner, s, vars, unset)?);
                i = end + 1;
            }
            Some(&n) if n == '_' || n.is_ascii_alphabetic() => {
                let mut j = i + 1;
                while j < chars.len() && (chars[j] == '_' || chars[j].is_ascii_alphanumeric()) {
                    j += 1;
                }
                let name: String = chars[i + 1..j].iter().collect();
                out.push_str(&lookup(&name, vars, unset));
                i = j;
            }
            // A lone `$` (end of string, `$ `, `$1`) stays as written, as compose does.
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    Ok(out)
}

fn lookup(name: &str, vars: &BTreeMap<String, String>, unset: &mut Vec<String>) -> String {
    match vars.get(name) {
        Some(v) => v.clone(),
        None => {
            if !unset.iter().any(|u| u == name) {
                unset.push(name.to_string());
            }
            String::new()
        }
    }
}

fn braced(
    inner: &str,
    whole: &str,
    vars: &BTreeMap<String, String>,
    unset: &mut Vec<String>,
) -> Result<String, InterpolateError> {
    let name_end = inner
        .find(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
        .unwrap_or(inner.len());
    let name = &inner[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(InterpolateError::Syntax(whole.to_string()));
    }
    let rest = &inner[name_end..];
    let value = vars.get(name);
    let set = value.is_some();
    let nonempty = value.is_some_and(|v| !v.is_empty());
    let (op, arg) = if rest.is_empty() {
        return Ok(lookup(name, vars, unset));
    } else if let Some(a) = rest.strip_prefix(":-") {
        (":-", a)
    } else if let Some(a) = rest.strip_prefix(":?") {
        (":?", a)
    } else if let Some(a) = rest.strip_prefix(":+") {
        (":+", a)
    } else if let Some(a) = rest.strip_prefix('-') {
        ("-", a)
    } else if let Some(a) = rest.strip_prefix('?') {
        ("?", a)
    } else if let Some(a) = rest.strip_prefix('+') {
        ("+", a)
    } else {
        return Err(InterpolateError::Syntax(whole.to_string()));
    };
    let current = || value.cloned().unwrap_or_default();
    Ok(match op {
        ":-" if nonempty => current(),
        "-" if set => current(),
        ":-" | "-" => interpolate(arg, vars, unset)?,
        ":?" if nonempty => current(),
        "?" if set => current(),
        ":?" | "?" => {
            return Err(InterpolateError::Required {
                var: name.to_string(),
                message: interpolate(arg, vars, unset)?,
            })
        }
        ":+" if nonempty => interpolate(arg, vars, unset)?,
        "+" if set => interpolate(arg, vars, unset)?,
        _ => String::new(),
    })
}

/// Parses a `.env` / `env_file` text: `KEY=VALUE` lines, `#` comments, blank lines, an optional
/// `export ` prefix, values in single quotes (literal) or double quotes (`\n`, `\"` escapes),
/// unquoted values cut at ` #`. A line `KEY` alone (no `=`) yields `None` (take it from the
/// environment, as compose does).
pub fn parse_env_file(text: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let t = t.strip_prefix("export ").unwrap_or(t).trim_start();
        let (key, value) = match t.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (t, None),
        };
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(format!("line {}: expected KEY=VALUE", n + 1));
        }
        let value = value.map(|v| {
            if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
                v[1..v.len() - 1].to_string()
            } else if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
                v[1..v.len() - 1]
                    .replace("\\n", "\n")
                    .replace("\\\"", "\"")
                    .replace("\\\\", "\\")
            } else {
                match v.find(" #") {
                    Some(i) => v[..i].trim_end().to_string(),
                    None => v.to_string(),
                }
            }
        });
        out.push((key.to_string(), value));
    }
    Ok(out)
}

/// Splits a command string as a POSIX shell would split words (quotes and backslashes), without
/// running a shell: compose's string form of `command`/`entrypoint`.
pub fn shell_split(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => cur.push(ch),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => cur.push(ch),
                            Some('\n') => {}
                            Some(ch) => {
                                cur.push('\\');
                                cur.push(ch);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(ch) => cur.push(ch),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') => {}
                    Some(ch) => cur.push(ch),
                    None => return Err("trailing backslash".into()),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

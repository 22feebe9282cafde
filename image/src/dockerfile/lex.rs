//! The shell-word lexer (BuildKit's `shell/lex.go`): [`parse_words`] splits an instruction's
//! arguments into words, keeping quotes and escapes as written, and [`substitute`] processes one
//! such word when its step runs: quotes removed, escapes applied, `$VAR`/`${VAR…}` expanded from
//! the variables in scope. [`literal`] is the inverse: a string escaped so that substitution
//! gives it back unchanged.

/// Splits on whitespace outside quotes, keeping quotes and escapes in the words (they are
/// removed by substitution), like BuildKit's `parseWords`.
pub(super) fn parse_words(rest: &str, escape: char) -> Vec<String> {
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

/// Processes one word as docker does: quotes removed (`'…'` literal, `"…"` with `$`
/// expansion), the escape character escaping the next one, `$VAR`, `${VAR}`,
/// `${VAR:-word}`, `${VAR-word}`, `${VAR:+word}`, `${VAR+word}`, `${VAR:?msg}`, `${VAR?msg}`
/// expanded from `lookup` (undefined: empty). Errors are messages without a line.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::test_util::*;

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
    fn words_keep_quotes_and_escapes() {
        assert_eq!(
            parse_words("a  \"b c\" 'd e'f g\\ h", '\\'),
            vec!["a", "\"b c\"", "'d e'f", "g\\ h"]
        );
        assert_eq!(parse_words("\"\" x", '\\'), vec!["\"\"", "x"]);
        assert_eq!(parse_words("a\\", '\\'), vec!["a"]);
        assert_eq!(parse_words("'a\\' b", '\\'), vec!["'a\\'", "b"]);
        assert_eq!(parse_words("x`  y", '`'), vec!["x` ", "y"]);
    }
}

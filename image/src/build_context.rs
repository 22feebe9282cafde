//! The build context, on both ends of a build: [`pack_context`] tars a context directory for
//! upload (what `.dockerignore` excludes left out, [`DockerIgnore`]), and [`expand_sources`]
//! finds the files a COPY/ADD source pattern names in an unpacked context or a stage's rootfs.
//!
//! Patterns follow docker: Go's `filepath.Match` (`*` and `?` never match `/`, `[...]`
//! classes, `\` escapes), plus `**` (any number of directories) in `.dockerignore`.
//!
//! Invariants: [`expand_sources`] only ever returns paths under its root (`..` is cleaned
//! lexically first, symlinks below the root are never followed while matching); packing never
//! follows a symlink, never blocks on a FIFO, and writes each file's size as it was stat'ed.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a build context could not be read or a COPY source not matched.
#[derive(Debug, thiserror::Error)]
pub enum BuildContextError {
    /// A COPY without sources.
    #[error("COPY failed: no source files were specified")]
    NoSources,
    /// A COPY source that matches nothing in the context.
    #[error("COPY failed: file not found in build context: {0:?}")]
    NotFound(String),
    /// A source pattern that is not a valid glob.
    #[error("COPY failed: bad source pattern {pattern:?}: {reason}")]
    BadPattern {
        /// The pattern as written.
        pattern: String,
        /// Why.
        reason: String,
    },
    /// The build context is not a directory.
    #[error("build context: {0} is not a directory")]
    NotADirectory(String),
    /// Reading the context failed.
    #[error("build context: {op} {path}: {source}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The path concerned.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BuildContextError {
    let path = path.display().to_string();
    move |source| BuildContextError::Io { op, path, source }
}

// ---------------------------------------------------------------------------------------------
// Glob patterns
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    /// `*`: any run of characters but `/`.
    Star,
    /// `?`: one character but `/`.
    One,
    /// `[...]`, `[^...]`: one character in (or not in) the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `**/` or a `**` followed by more pattern: nothing, or anything ending in `/`.
    AnyDirs,
    /// A trailing `**`: anything.
    AnyTail,
}

/// Compiles a Go `filepath.Match` pattern; `double_star`: `**` as in `.dockerignore`.
fn compile(pattern: &str, double_star: bool) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if double_star && chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                toks.push(if i == chars.len() {
                    Tok::AnyTail
                } else {
                    Tok::AnyDirs
                });
            }
            '*' => toks.push(Tok::Star),
            '?' => toks.push(Tok::One),
            '\\' => match chars.get(i) {
                Some(&n) => {
                    i += 1;
                    toks.push(Tok::Lit(n));
                }
                None => toks.push(Tok::Lit('\\')),
            },
            '[' => {
                let negated = chars.get(i) == Some(&'^');
                if negated {
                    i += 1;
                }
                let mut ranges = Vec::new();
                loop {
                    let one = |i: &mut usize| -> Result<char, String> {
                        let c = *chars
                            .get(*i)
                            .ok_or_else(|| "unterminated character class".to_string())?;
                        *i += 1;
                        if c == '\\' {
                            let e = *chars
                                .get(*i)
                                .ok_or_else(|| "unterminated character class".to_string())?;
                            *i += 1;
                            return Ok(e);
                        }
                        Ok(c)
                    };
                    match chars.get(i) {
                        None => return Err("unterminated character class".into()),
                        Some(']') => {
                            i += 1;
                            break;
                        }
                        Some(_) => {}
                    }
                    let lo = one(&mut i)?;
                    let hi = if chars.get(i) == Some(&'-') && chars.get(i + 1) != Some(&']') {
                        i += 1;
                        one(&mut i)?
                    } else {
                        lo
                    };
                    if hi < lo {
                        return Err(format!("bad range {lo}-{hi} in character class"));
                    }
                    ranges.push((lo, hi));
                }
                if ranges.is_empty() {
                    return Err("empty character class".into());
                }
                toks.push(Tok::Class { negated, ranges });
            }
            c => toks.push(Tok::Lit(c)),
        }
    }
    Ok(toks)
}

/// Whether `toks` match all of `text`.
fn matches(toks: &[Tok], text: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let n = text.len();
    // next[j]: toks[i+1..] match text[j..]; computed from the last token back.
    let mut next = vec![false; n + 1];
    next[n] = true;
    for tok in toks.iter().rev() {
        let mut cur = vec![false; n + 1];
        // For AnyDirs: whether some k > j with text[k-1] == '/' has next[k].
        let mut dirs_after = false;
        for j in (0..=n).rev() {
            let here = text.get(j).copied();
            cur[j] = match tok {
                Tok::Lit(c) => here == Some(*c) && next[j + 1],
                Tok::One => here.is_some_and(|h| h != '/') && next[j + 1],
                Tok::Class { negated, ranges } => {
                    here.is_some_and(|h| {
                        ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&h)) != *negated
                    }) && next[j + 1]
                }
                Tok::Star => next[j] || (here.is_some_and(|h| h != '/') && cur[j + 1]),
                Tok::AnyTail => next[j] || (here.is_some() && cur[j + 1]),
                Tok::AnyDirs => {
                    if here == Some('/') && next[j + 1] {
                        dirs_after = true;
                    }
                    next[j] || dirs_after
                }
            };
        }
        next = cur;
    }
    next[0]
}

/// Go's `filepath.Clean` for `/`-separated paths: no empty or `.` components, `..` applied
/// (kept at the start of a relative path, dropped at the root), `.` for nothing.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&p) if p != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            c => parts.push(c),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

// ---------------------------------------------------------------------------------------------
// .dockerignore
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct IgnorePattern {
    /// `!pattern`: re-includes what it matches.
    exception: bool,
    /// As cleaned, for messages.
    text: String,
    toks: Vec<Tok>,
    /// Per path component, for "could this match below that directory".
    components: Vec<Component>,
}

#[derive(Debug, Clone)]
enum Component {
    /// Contains `**`: may stand for any number of components.
    Any,
    Glob(Vec<Tok>),
}

/// .dockerignore: Go filepath.Match patterns per path (relative to the context root,
/// cleaned), `**` matching any number of directories, `!` exceptions, last match wins,
/// comments and blank lines ignored; a directory that is excluded excludes its contents
/// unless an exception could re-include something beneath it.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<IgnorePattern>,
}

impl DockerIgnore {
    /// Parses a `.dockerignore`. A malformed pattern (an unterminated `[`) matches literally
    /// and is logged, rather than failing the whole build.
    pub fn parse(text: &str) -> DockerIgnore {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut ignore = DockerIgnore::default();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (exception, pattern) = match line.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, line),
            };
            if pattern.is_empty() {
                continue;
            }
            ignore.push(exception, pattern);
        }
        ignore
    }

    fn push(&mut self, exception: bool, pattern: &str) {
        let mut text = clean(pattern);
        if text.len() > 1 && text.starts_with('/') {
            text.remove(0);
        }
        let toks = compile(&text, true).unwrap_or_else(|reason| {
            tracing::warn!(pattern = %text, %reason, "dockerignore: malformed pattern, matched literally");
            text.chars().map(Tok::Lit).collect()
        });
        let components = text
            .split('/')
            .map(|c| {
                if c.contains("**") {
                    Component::Any
                } else {
                    Component::Glob(
                        compile(c, false).unwrap_or_else(|_| c.chars().map(Tok::Lit).collect()),
                    )
                }
            })
            .collect();
        self.patterns.push(IgnorePattern {
            exception,
            text,
            toks,
            components,
        });
    }

    /// Adds an exception for exactly `rel_path` (glob characters escaped): what is always
    /// sent, like the Dockerfile.
    fn always_include(&mut self, rel_path: &str) {
        let mut escaped = String::new();
        for c in rel_path.chars() {
            if "*?[]\\".contains(c) {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        self.push(true, &escaped);
    }

    /// Whether the patterns exclude `rel_path` (relative to the context root): it or one of
    /// its parent directories is matched by a pattern, and the last pattern that matches it
    /// (or a parent) is not an exception.
    pub fn is_excluded(&self, rel_path: &str) -> bool {
        let path = clean(rel_path);
        let path = path.trim_start_matches('/');
        if path.is_empty() || path == "." {
            return false;
        }
        let parents: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
        let mut excluded = false;
        for p in &self.patterns {
            // Only a pattern that could change the outcome is evaluated.
            if p.exception != excluded {
                continue;
            }
            let hit = matches(&p.toks, path) || parents.iter().any(|d| matches(&p.toks, d));
            if hit {
                excluded = !p.exception;
            }
        }
        excluded
    }

    /// Whether some exception could re-include a path strictly beneath the directory
    /// `rel_dir`: only then is an excluded directory walked.
    pub fn could_reinclude_below(&self, rel_dir: &str) -> bool {
        let dir = clean(rel_dir);
        let dir: Vec<&str> = dir
            .trim_start_matches('/')
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        self.patterns
            .iter()
            .filter(|p| p.exception)
            .any(|p| could_match_below(&p.components, &dir))
    }

    /// The patterns, as cleaned (`!` for exceptions).
    pub fn patterns(&self) -> Vec<String> {
        self.patterns
            .iter()
            .map(|p| format!("{}{}", if p.exception { "!" } else { "" }, p.text))
            .collect()
    }
}

fn could_match_below(pattern: &[Component], dir: &[&str]) -> bool {
    match (pattern.first(), dir.first()) {
        (None, _) => false,
        (Some(Component::Any), _) => true,
        // The pattern has components left for what lies below the directory.
        (Some(Component::Glob(_)), None) => true,
        (Some(Component::Glob(toks)), Some(d)) => {
            matches(toks, d) && could_match_below(&pattern[1..], &dir[1..])
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------------------------

/// What [`pack_context`] packed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextSummary {
    /// Regular files and symlinks (directories not counted).
    pub files: u64,
    /// Bytes of regular file content.
    pub bytes: u64,
}

/// One member to pack.
struct Entry {
    path: PathBuf,
    name: String,
    meta: fs::Metadata,
}

/// Tars the context directory (relative paths, no leading '/', ownership and modes and mtimes
/// kept, symlinks as symlinks), skipping what `.dockerignore` in `dir` excludes; the
/// `dockerfile` path (relative to dir, if inside it) and `.dockerignore` are always included.
/// Returns how many files and bytes were packed. Sockets, FIFOs and devices are skipped.
pub fn pack_context(
    dir: &Path,
    dockerfile: Option<&Path>,
    out: impl Write,
) -> Result<ContextSummary, BuildContextError> {
    let meta = fs::metadata(dir).map_err(io_err("stat", dir))?;
    if !meta.is_dir() {
        return Err(BuildContextError::NotADirectory(dir.display().to_string()));
    }
    let ignore_path = dir.join(".dockerignore");
    let mut ignore = match fs::read(&ignore_path) {
        Ok(bytes) => DockerIgnore::parse(&String::from_utf8_lossy(&bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => DockerIgnore::default(),
        Err(e) => return Err(io_err("read", &ignore_path)(e)),
    };
    ignore.always_include(".dockerignore");
    if let Some(df) = dockerfile.and_then(|p| context_relative(dir, p)) {
        ignore.always_include(&df);
    }
    let mut entries = Vec::new();
    walk(dir, "", &ignore, &mut entries)?;

    let mut summary = ContextSummary::default();
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&e.meta, tar::HeaderMode::Complete);
        let ft = e.meta.file_type();
        if ft.is_dir() {
            h.set_size(0);
            b.append_data(&mut h, &e.name, io::empty())
                .map_err(io_err("write context archive", &e.path))?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&e.path).map_err(io_err("read link", &e.path))?;
            h.set_size(0);
            b.append_link(&mut h, &e.name, &target)
                .map_err(io_err("write context archive", &e.path))?;
            summary.files += 1;
        } else {
            // No blocking open (a FIFO swapped in), no following a swapped-in symlink.
            let f = match fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
                .open(&e.path)
            {
                Ok(f) => f,
                // Removed meanwhile: as if it had never been there.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io_err("open", &e.path)(err)),
            };
            let meta = f.metadata().map_err(io_err("stat", &e.path))?;
            if !meta.is_file() {
                continue;
            }
            h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let size = meta.len();
            // Exactly `size` bytes, even if the file changes while it is read.
            let data = f.take(size).chain(io::repeat(0)).take(size);
            b.append_data(&mut h, &e.name, data)
                .map_err(io_err("write context archive", &e.path))?;
            summary.files += 1;
            summary.bytes += size;
        }
    }
    b.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(io_err("write context archive", dir))?;
    tracing::debug!(dir = %dir.display(), files = summary.files, bytes = summary.bytes, "packed build context");
    Ok(summary)
}

/// `dockerfile` relative to `dir` (`/`-separated), if it lies inside it (lexically).
fn context_relative(dir: &Path, dockerfile: &Path) -> Option<String> {
    let rel = if dockerfile.is_absolute() {
        let dir = if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            std::env::current_dir().ok()?.join(dir)
        };
        let d = clean(&dir.to_string_lossy());
        let f = clean(&dockerfile.to_string_lossy());
        f.strip_prefix(&format!("{}/", d.trim_end_matches('/')))?
            .to_string()
    } else {
        clean(&dockerfile.to_string_lossy())
    };
    (rel != "." && !rel.starts_with("../") && rel != "..").then_some(rel)
}

/// Collects the members under `dir` (named `rel/...`), sorted, parents before children.
fn walk(
    dir: &Path,
    rel: &str,
    ignore: &DockerIgnore,
    entries: &mut Vec<Entry>,
) -> Result<(), BuildContextError> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        names.push(e.map_err(io_err("read directory", dir))?.file_name());
    }
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let name = name.to_string_lossy();
        let member = if rel.is_empty() {
            name.into_owned()
        } else {
            format!("{rel}/{name}")
        };
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("stat", &path)(e)),
        };
        let excluded = ignore.is_excluded(&member);
        let ft = meta.file_type();
        if ft.is_dir() {
            if !excluded {
                entries.push(Entry {
                    path: path.clone(),
                    name: member.clone(),
                    meta,
                });
                walk(&path, &member, ignore, entries)?;
            } else if ignore.could_reinclude_below(&member) {
                // Only sent if something beneath it is.
                let mut below = Vec::new();
                walk(&path, &member, ignore, &mut below)?;
                if !below.is_empty() {
                    entries.push(Entry {
                        path,
                        name: member,
                        meta,
                    });
                    entries.append(&mut below);
                }
            }
        } else if excluded {
            continue;
        } else if ft.is_file() || ft.is_symlink() {
            entries.push(Entry {
                path,
                name: member,
                meta,
            });
        } else {
            tracing::debug!(path = %path.display(), "build context: skipping a special file");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// COPY/ADD sources
// ---------------------------------------------------------------------------------------------

fn has_meta(component: &str) -> bool {
    component.contains(['*', '?', '[', '\\'])
}

/// The files a COPY/ADD source pattern names inside an unpacked context (or a stage's rootfs)
/// at `root`: Go filepath.Match globbing per path component (`*`, `?`, `[...]`); a pattern
/// naming a directory yields that directory. Never escapes root (`..` components are cleaned
/// lexically like docker: `../x` == `x`), symlinks below root are not followed for matching
/// (a final component that is a symlink yields the symlink). Results are sorted per
/// component, like Go's `filepath.Glob`.
pub fn expand_sources(root: &Path, pattern: &str) -> Result<Vec<PathBuf>, BuildContextError> {
    if pattern.trim().is_empty() {
        return Err(BuildContextError::NoSources);
    }
    let mut components: Vec<&str> = Vec::new();
    for c in pattern.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                components.pop();
            }
            c => components.push(c),
        }
    }
    let mut current = vec![root.to_path_buf()];
    for (i, comp) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        let mut next = Vec::new();
        let glob = if has_meta(comp) {
            Some(
                compile(comp, false).map_err(|reason| BuildContextError::BadPattern {
                    pattern: pattern.to_string(),
                    reason,
                })?,
            )
        } else {
            None
        };
        for dir in &current {
            let candidates: Vec<PathBuf> = match &glob {
                None => vec![dir.join(comp)],
                Some(toks) => {
                    let mut names = Vec::new();
                    let rd = match fs::read_dir(dir) {
                        Ok(rd) => rd,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(io_err("read directory", dir)(e)),
                    };
                    for e in rd {
                        let name = e.map_err(io_err("read directory", dir))?.file_name();
                        if matches(toks, &name.to_string_lossy()) {
                            names.push(name);
                        }
                    }
                    names.sort();
                    names.into_iter().map(|n| dir.join(n)).collect()
                }
            };
            for c in candidates {
                match fs::symlink_metadata(&c) {
                    // An intermediate component must be a real directory.
                    Ok(m) if last || m.is_dir() => next.push(c),
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == io::ErrorKind::NotFound
                            || e.raw_os_error() == Some(libc::ENOTDIR) => {}
                    Err(e) => return Err(io_err("stat", &c)(e)),
                }
            }
        }
        current = next;
        if current.is_empty() {
            return Err(BuildContextError::NotFound(pattern.to_string()));
        }
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn write(root: &Path, rel: &str, body: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, body).unwrap();
    }

    /// Packs `dir` and lists the archive: name -> (entry type, mode, size).
    fn pack_list(
        dir: &Path,
        dockerfile: Option<&Path>,
    ) -> (ContextSummary, BTreeMap<String, (tar::EntryType, u32, u64)>) {
        let mut out = Vec::new();
        let summary = pack_context(dir, dockerfile, &mut out).unwrap();
        let mut ar = tar::Archive::new(&out[..]);
        let mut list = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            list.insert(
                e.path()
                    .unwrap()
                    .to_string_lossy()
                    .trim_end_matches('/')
                    .to_string(),
                (h.entry_type(), h.mode().unwrap(), h.size().unwrap()),
            );
        }
        (summary, list)
    }

    #[test]
    fn glob_matching() {
        let cases: &[(&str, &str, bool)] = &[
            ("*.go", "a.go", true),
            ("*.go", "dir/a.go", false),
            ("*", ".hidden", true),
            ("a?c", "abc", true),
            ("a?c", "a/c", false),
            ("[a-c]x", "bx", true),
            ("[^a-c]x", "bx", false),
            ("[^a-c]x", "dx", true),
            ("[\\]]", "]", true),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("dir/*", "dir/x", true),
            ("dir/*", "dir/x/y", false),
        ];
        for (p, text, want) in cases {
            assert_eq!(
                matches(&compile(p, false).unwrap(), text),
                *want,
                "{p} vs {text}"
            );
        }
        let doubles: &[(&str, &str, bool)] = &[
            ("**/*.go", "a.go", true),
            ("**/*.go", "x/y/a.go", true),
            ("**/*.go", "x/y/a.goo", false),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/y/b", true),
            ("a/**/b", "a/x/y/c", false),
            ("a/**", "a/x/y", true),
            ("a/**", "a", false),
            ("**", "anything/at/all", true),
            ("**/node_modules", "node_modules", true),
            ("**/node_modules", "pkg/node_modules", true),
        ];
        for (p, text, want) in doubles {
            assert_eq!(
                matches(&compile(p, true).unwrap(), text),
                *want,
                "{p} vs {text}"
            );
        }
        assert_eq!(
            compile("[a", false),
            Err("unterminated character class".into())
        );
        assert_eq!(compile("[]", false), Err("empty character class".into()));
        assert_eq!(clean("./a//b/../c/"), "a/c");
        assert_eq!(clean("/../a"), "/a");
        assert_eq!(clean("../a"), "../a");
        assert_eq!(clean(""), ".");
    }

    #[test]
    fn dockerignore_patterns() {
        let ignore = DockerIgnore::parse(
            "# comment\n\n  *.log  \n/build\nnode_modules\n**/*.tmp\n!keep.log\ndocs/**\n!docs/README.md\nsecret?.txt\n# !ignored.log\n",
        );
        assert_eq!(
            ignore.patterns(),
            vec![
                "*.log",
                "build",
                "node_modules",
                "**/*.tmp",
                "!keep.log",
                "docs/**",
                "!docs/README.md",
                "secret?.txt"
            ]
        );
        let cases: &[(&str, bool)] = &[
            ("a.log", true),
            ("keep.log", false),
            ("sub/a.log", false),
            ("build", true),
            ("build/out/x", true),
            ("src/build", false),
            ("node_modules/x/y.js", true),
            ("x.tmp", true),
            ("deep/er/x.tmp", true),
            ("docs", false),
            ("docs/a.md", true),
            ("docs/README.md", false),
            ("secret1.txt", true),
            ("secret12.txt", false),
            ("./a.log", true),
            ("/build/x", true),
            ("src/main.rs", false),
            (".", false),
        ];
        for (path, want) in cases {
            assert_eq!(ignore.is_excluded(path), *want, "{path}");
        }
        // Last match wins, exceptions re-include below an excluded directory.
        let ignore = DockerIgnore::parse("vendor\n!vendor/keep\nvendor/keep/drop\n");
        assert!(ignore.is_excluded("vendor/other"));
        assert!(!ignore.is_excluded("vendor/keep"));
        assert!(!ignore.is_excluded("vendor/keep/file"));
        assert!(ignore.is_excluded("vendor/keep/drop"));
        assert!(ignore.could_reinclude_below("vendor"));
        assert!(!ignore.could_reinclude_below("vendor/keep/drop"));
        // Everything excluded, then some things back.
        let ignore = DockerIgnore::parse("*\n!src\n!**/*.rs\n");
        assert!(ignore.is_excluded("README.md"));
        assert!(!ignore.is_excluded("src/x/y.txt"));
        assert!(!ignore.is_excluded("other/lib.rs"));
        assert!(ignore.is_excluded("other/lib.c"));
        assert!(ignore.could_reinclude_below("other"));
        let ignore = DockerIgnore::parse("target\n!src/main.rs\n");
        assert!(!ignore.could_reinclude_below("target"));
        // Malformed patterns match literally instead of failing.
        let ignore = DockerIgnore::parse("[oops\n");
        assert!(ignore.is_excluded("[oops"));
        assert!(!DockerIgnore::parse("").is_excluded("a"));
    }

    #[test]
    fn pack_context_honours_dockerignore() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "Dockerfile", "FROM scratch\n");
        write(
            dir,
            ".dockerignore",
            "*.log\n.git\nbuild\n!build/keep\nDockerfile\n.dockerignore\nci/\n",
        );
        write(dir, "src/main.rs", "fn main() {}\n");
        write(dir, "debug.log", "noise");
        write(dir, ".git/HEAD", "ref");
        write(dir, "build/out.o", "obj");
        write(dir, "build/keep/me.txt", "kept");
        write(dir, "ci/Dockerfile.ci", "FROM scratch\n");
        fs::set_permissions(dir.join("src/main.rs"), fs::Permissions::from_mode(0o751)).unwrap();
        symlink("src/main.rs", dir.join("link")).unwrap();
        symlink("/nonexistent", dir.join("dangling")).unwrap();

        let (summary, list) = pack_list(dir, Some(Path::new("Dockerfile")));
        let names: Vec<&str> = list.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            vec![
                ".dockerignore",
                "Dockerfile",
                "build",
                "build/keep",
                "build/keep/me.txt",
                "dangling",
                "link",
                "src",
                "src/main.rs"
            ]
        );
        assert_eq!(list["src/main.rs"].0, tar::EntryType::Regular);
        assert_eq!(list["src/main.rs"].1 & 0o7777, 0o751);
        assert_eq!(list["src/main.rs"].2, 13);
        assert_eq!(list["link"].0, tar::EntryType::Symlink);
        assert_eq!(list["build"].0, tar::EntryType::Directory);
        let bytes = (13 + 4 + 13 + fs::metadata(dir.join(".dockerignore")).unwrap().len()) as u64;
        assert_eq!(summary, ContextSummary { files: 6, bytes });

        // The Dockerfile is always sent, even from an excluded directory, absolute or not.
        let (_, list) = pack_list(dir, Some(&dir.join("ci/Dockerfile.ci")));
        assert!(list.contains_key("ci/Dockerfile.ci"), "{list:?}");
        assert!(list.contains_key("ci"));
        assert!(!list.contains_key("Dockerfile"));
        // Outside the context: nothing extra.
        let (_, list) = pack_list(dir, Some(Path::new("../elsewhere/Dockerfile")));
        assert!(!list.contains_key("Dockerfile"));

        // Links are archived with their targets, not followed; mtimes kept.
        let mut out = Vec::new();
        pack_context(dir, None, &mut out).unwrap();
        let mut ar = tar::Archive::new(&out[..]);
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let path = e.path().unwrap().into_owned();
            assert!(!path.is_absolute());
            if path == Path::new("link") {
                assert_eq!(e.link_name().unwrap().unwrap(), Path::new("src/main.rs"));
            }
            if path == Path::new("src/main.rs") {
                let mtime = fs::metadata(dir.join("src/main.rs")).unwrap();
                use std::os::unix::fs::MetadataExt;
                assert_eq!(e.header().mtime().unwrap() as i64, mtime.mtime());
                assert_eq!(e.header().uid().unwrap(), mtime.uid() as u64);
            }
        }
    }

    #[test]
    fn pack_context_without_dockerignore_and_errors() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "a/b/c.txt", "x");
        let (summary, list) = pack_list(tmp.path(), None);
        assert_eq!(
            list.keys().collect::<Vec<_>>(),
            vec!["a", "a/b", "a/b/c.txt"]
        );
        assert_eq!(summary, ContextSummary { files: 1, bytes: 1 });
        let e = pack_context(&tmp.path().join("a/b/c.txt"), None, Vec::new()).unwrap_err();
        assert!(e.to_string().ends_with("c.txt is not a directory"), "{e}");
        let e = pack_context(&tmp.path().join("missing"), None, Vec::new()).unwrap_err();
        assert!(e.to_string().starts_with("build context: stat "), "{e}");
    }

    #[test]
    fn expand_sources_globs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for f in [
            "a.txt",
            "b.txt",
            "c.md",
            ".hidden.txt",
            "dir/x.txt",
            "dir/sub/y.txt",
            "other/x.txt",
        ] {
            write(root, f, f);
        }
        symlink("dir", root.join("linkdir")).unwrap();
        symlink("a.txt", root.join("linkfile")).unwrap();
        let rel = |pattern: &str| -> Vec<String> {
            expand_sources(root, pattern)
                .unwrap()
                .into_iter()
                .map(|p| {
                    let r = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                    if r.is_empty() {
                        ".".into()
                    } else {
                        r
                    }
                })
                .collect()
        };
        assert_eq!(rel("a.txt"), vec!["a.txt"]);
        assert_eq!(rel("*.txt"), vec![".hidden.txt", "a.txt", "b.txt"]);
        assert_eq!(rel("[ab].txt"), vec!["a.txt", "b.txt"]);
        assert_eq!(rel("?.md"), vec!["c.md"]);
        assert_eq!(rel("dir"), vec!["dir"]);
        assert_eq!(rel("dir/"), vec!["dir"]);
        assert_eq!(rel("*/x.txt"), vec!["dir/x.txt", "other/x.txt"]);
        assert_eq!(rel("dir/*"), vec!["dir/sub", "dir/x.txt"]);
        assert_eq!(rel("."), vec!["."]);
        assert_eq!(rel("/"), vec!["."]);
        assert_eq!(rel("../../a.txt"), vec!["a.txt"]);
        assert_eq!(rel("/dir/../b.txt"), vec!["b.txt"]);
        assert_eq!(rel("./dir/./sub/y.txt"), vec!["dir/sub/y.txt"]);
        // A symlink is a match itself, but is never walked through.
        assert_eq!(rel("linkfile"), vec!["linkfile"]);
        assert_eq!(rel("linkdir"), vec!["linkdir"]);
        assert!(matches!(
            expand_sources(root, "linkdir/x.txt"),
            Err(BuildContextError::NotFound(p)) if p == "linkdir/x.txt"
        ));
        assert!(matches!(
            expand_sources(root, "l*/x.txt"),
            Err(BuildContextError::NotFound(_))
        ));

        assert_eq!(
            expand_sources(root, "nope.txt").unwrap_err().to_string(),
            "COPY failed: file not found in build context: \"nope.txt\""
        );
        assert_eq!(
            expand_sources(root, "a.txt/x").unwrap_err().to_string(),
            "COPY failed: file not found in build context: \"a.txt/x\""
        );
        assert_eq!(
            expand_sources(root, "*.rs").unwrap_err().to_string(),
            "COPY failed: file not found in build context: \"*.rs\""
        );
        assert_eq!(
            expand_sources(root, "").unwrap_err().to_string(),
            "COPY failed: no source files were specified"
        );
        assert_eq!(
            expand_sources(root, "[a.txt").unwrap_err().to_string(),
            "COPY failed: bad source pattern \"[a.txt\": unterminated character class"
        );
    }
}

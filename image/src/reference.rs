//! Image references: `[registry/]repository[:tag][@digest]`, following the grammar docker and the
//! distribution spec use. Invariants of a parsed [`Reference`]: the repository is lowercase path
//! components, the tag (if any) is a valid tag, the digest (if any) is a valid sha256 digest, and
//! at least one of tag and digest is set (the tag defaults to `latest`).
//!
//! The first path component is taken as a registry only when it looks like a host (contains `.`
//! or `:`, or is `localhost`), exactly as docker decides it; `lib/busybox` is a repository.

use std::fmt;
use std::str::FromStr;

use crate::{digest, ImageError, Result};

/// The tag used when a reference names neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]` when the reference names one; the registry a client talks to is chosen by
    /// the caller, this is informational.
    pub registry: Option<String>,
    /// Repository path within the registry, e.g. `hello` or `lib/busybox`.
    pub repository: String,
    /// The tag, when the reference names one (`latest` is not assumed here).
    pub tag: Option<String>,
    /// `sha256:<hex>`; when set it wins over the tag for fetching (it pins the content).
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `hello`, `hello:latest`, `lib/busybox:1.0`, `10.0.0.1:5000/hello:v1`,
    /// `hello@sha256:<64 hex>`.
    pub fn parse(input: &str) -> Result<Reference> {
        let bad = |reason: &str| ImageError::InvalidReference {
            reference: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(bad("empty"));
        }
        if input.len() > 512 {
            return Err(bad("too long"));
        }

        let (name, digest) = match input.split_once('@') {
            Some((name, digest)) => {
                digest::validate(digest).map_err(|_| bad("digest must be sha256:<64 hex>"))?;
                (name, Some(digest.to_string()))
            }
            None => (input, None),
        };

        // A ':' after the last '/' separates the tag; one before it belongs to a registry port.
        let (name, tag) = match name.rfind(':') {
            Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
            _ => (name, None),
        };
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(bad(
                    "tag must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
                ));
            }
        }

        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !valid_registry(first) {
                    return Err(bad("invalid registry host"));
                }
                (Some(first.to_string()), rest)
            }
            _ => (None, name),
        };
        if repository.is_empty() {
            return Err(bad("missing repository name"));
        }
        if repository.len() > 255 {
            return Err(bad("repository name longer than 255 characters"));
        }
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad("repository name must be lowercase"));
        }
        if !repository.split('/').all(valid_component) {
            return Err(bad(
                "repository components must be [a-z0-9] separated by '.', '_', '__' or '-'",
            ));
        }

        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference {
            registry,
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// What goes after `/manifests/` in a registry URL: the digest when pinned, else the tag.
    pub fn reference_str(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// The same repository with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Reference> {
        if !valid_tag(tag) {
            return Err(ImageError::InvalidReference {
                reference: format!("{}:{tag}", self.repository),
                reason: "invalid tag".to_string(),
            });
        }
        Ok(Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        })
    }

    /// `repository:tag` or `repository@digest`, without the registry: how the reference reads
    /// within one registry (used in error messages and reports).
    pub fn short(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("{}@{d}", self.repository),
            (None, Some(t)) => format!("{}:{t}", self.repository),
            (None, None) => self.repository.clone(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(registry) = &self.registry {
            write!(f, "{registry}/")?;
        }
        f.write_str(&self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Reference> {
        Reference::parse(s)
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
pub(crate) fn valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A repository path: 1-255 characters, lowercase components separated by '/'.
pub(crate) fn valid_repository(repository: &str) -> bool {
    !repository.is_empty() && repository.len() <= 255 && repository.split('/').all(valid_component)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(&bytes[0]) || !alnum(&bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(&bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(&bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `host[:port]`, where host may be a bracketed IPv6 address and port is numeric.
fn valid_registry(registry: &str) -> bool {
    let (host, port) = match registry.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (registry, None),
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    !host.is_empty()
        && port_ok
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// input, registry, repository, tag, digest, reference_str
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        &'a str,
    );

    #[test]
    fn parses_table() {
        let digest_ref = format!("hello@{D}");
        let both = format!("localhost/a/b:v2@{D}");
        let cases: Vec<Case> = vec![
            ("hello", None, "hello", Some("latest"), None, "latest"),
            (
                "hello:latest",
                None,
                "hello",
                Some("latest"),
                None,
                "latest",
            ),
            (
                "lib/busybox:1.0",
                None,
                "lib/busybox",
                Some("1.0"),
                None,
                "1.0",
            ),
            (
                "10.0.0.1:5000/hello:v1",
                Some("10.0.0.1:5000"),
                "hello",
                Some("v1"),
                None,
                "v1",
            ),
            (
                "127.0.0.1:5000/hello",
                Some("127.0.0.1:5000"),
                "hello",
                Some("latest"),
                None,
                "latest",
            ),
            (
                "registry.example.com/team/app",
                Some("registry.example.com"),
                "team/app",
                Some("latest"),
                None,
                "latest",
            ),
            (&digest_ref, None, "hello", None, Some(D), D),
            (&both, Some("localhost"), "a/b", Some("v2"), Some(D), D),
            (
                "my-app_x.y__z:V_1.0-rc",
                None,
                "my-app_x.y__z",
                Some("V_1.0-rc"),
                None,
                "V_1.0-rc",
            ),
        ];
        for (input, registry, repository, tag, digest, reference_str) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry.as_deref(), registry, "{input}");
            assert_eq!(r.repository, repository, "{input}");
            assert_eq!(r.tag.as_deref(), tag, "{input}");
            assert_eq!(r.digest.as_deref(), digest, "{input}");
            assert_eq!(r.reference_str(), reference_str, "{input}");
            // Display round-trips through parse.
            assert_eq!(Reference::parse(&r.to_string()).unwrap(), r, "{input}");
        }
    }

    #[test]
    fn refuses_bad_references() {
        for input in [
            "",
            "Hello",
            "hello:",
            "hello:-x",
            "hello@sha256:abc",
            "hello@md5:0123",
            "/hello",
            "hello/",
            "a//b",
            "-hello",
            "hello..x",
            "hello:a/b",
            "10.0.0.1:5000/",
            "héllo",
        ] {
            assert!(
                Reference::parse(input).is_err(),
                "{input:?} should be refused"
            );
        }
    }

    #[test]
    fn error_message_names_the_reference() {
        let err = Reference::parse("Hello").unwrap_err().to_string();
        assert!(
            err.starts_with("image: invalid reference \"Hello\""),
            "{err}"
        );
    }

    #[test]
    fn display_and_short() {
        let r = Reference::parse("10.0.0.1:5000/hello:v1").unwrap();
        assert_eq!(r.to_string(), "10.0.0.1:5000/hello:v1");
        assert_eq!(r.short(), "hello:v1");
        assert_eq!(r.with_tag("v2").unwrap().short(), "hello:v2");
    }
}

//! Secrets and configs: small named blobs that services mount as files (and, for secrets, take
//! environment values from), versioned so that a new value rolls the services using it.
//!
//! Invariants:
//! - A value is at most `MAX_DATA` bytes (Swarm's 500 KiB), checked where it enters (manifest,
//!   API) and again when a command is applied.
//! - A value never appears in `Debug` output (`<redacted N bytes>`), so neither tracing nor an
//!   error message can print it. Specs and tasks hold only references (`SecretRef`, the
//!   `env_from_secret` names and the resolved version numbers), never values.
//! - Versions count from 1. A service's reference `NAME` follows the latest version, `NAME:V`
//!   pins version V. The store resolves each reference to a version number written into the
//!   spec's system-owned `resolved_refs`; a new version changes that number in every unpinned
//!   user's spec, which starts a rolling update. A version is kept while it is the latest or a
//!   service spec (current or previous) or an unfinished task resolves to it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// Largest value of a secret or config, in bytes (Swarm's limit).
pub const MAX_DATA: usize = 500 * 1024;

/// References per list (`secrets`, `configs`, `env_from_secret`) of one service.
pub const MAX_REFS: usize = 64;

/// Where a secret is mounted when its reference names no target.
pub const SECRETS_DIR: &str = "/run/secrets";

/// Secret or config: the same object with different defaults and visibility (a config's value
/// may be shown to an admin; a secret's never leaves the store except to its tasks' nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectKind {
    /// A secret: its value is never shown.
    Secret,
    /// A config: its value may be shown to an admin.
    Config,
}

impl ObjectKind {
    /// The lowercase name, as in commands and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Secret => "secret",
            ObjectKind::Config => "config",
        }
    }
    /// The kind named `s` (`secret`, `config`).
    pub fn parse(s: &str) -> Option<ObjectKind> {
        match s {
            "secret" => Some(ObjectKind::Secret),
            "config" => Some(ObjectKind::Config),
            _ => None,
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value's bytes. `Debug` prints only the length; serde writes base64 (the store travels as
/// JSON in raft entries and snapshots).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData(pub Vec<u8>);

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0.len())
    }
}

impl Serialize for SecretData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64_encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for SecretData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        base64_decode(&s)
            .map(SecretData)
            .ok_or_else(|| serde::de::Error::custom("secret data: invalid base64"))
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| B64.iter().position(|&b| b == c).map(|v| v as u32);
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (i, q) in s.chunks(4).enumerate() {
        let last = i == s.len() / 4 - 1;
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Text written in a manifest's `data:`; redacted in `Debug` like `SecretData`. A YAML number
/// or boolean is taken as written; a wrong type is refused without echoing the value.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretText(pub String);

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SecretText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("text")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretText, E> {
                Ok(SecretText(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SecretText, E> {
                Ok(SecretText(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SecretText, E> {
                Ok(SecretText(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<SecretText, E> {
                Ok(SecretText(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<SecretText, E> {
                Ok(SecretText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0.len())
    }
}

/// A `kind: Secret` or `kind: Config` document. Its value is `data` (text, as written) or the
/// contents of `file` (relative to the manifest's directory, read by `rctl`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// The object's name, unique per kind.
    pub name: String,
    /// Free-form labels, for the user.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The value, as written in the manifest.
    #[serde(default)]
    pub data: Option<SecretText>,
    /// A file holding the value, relative to the manifest.
    #[serde(default)]
    pub file: Option<String>,
}

impl SecretSpec {
    /// Checks the name, that exactly one of `data` and `file` is set, and the labels.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_object_name("name", &self.name)?;
        match (&self.data, &self.file) {
            (Some(_), Some(_)) => Err(ValidationError::new(
                "file",
                "give either `data` or `file`, not both",
            )),
            (None, None) => Err(ValidationError::new(
                "data",
                "the value is missing: give `data` (text) or `file` (a path)",
            )),
            (Some(d), None) => check_size("data", d.0.len()),
            (None, Some(f)) if f.is_empty() => {
                Err(ValidationError::new("file", "must not be empty"))
            }
            (None, Some(_)) => Ok(()),
        }
    }
}

/// Refuses a value over `MAX_DATA`, naming `field`.
pub fn check_size(field: &str, len: usize) -> Result<(), ValidationError> {
    if len > MAX_DATA {
        return Err(ValidationError::new(
            field,
            format!(
                "{len} bytes is over the limit of {MAX_DATA} bytes (500 KiB) for a secret or config"
            ),
        ));
    }
    Ok(())
}

/// Names as Swarm allows them, without `:` (which pins a version in a reference):
/// `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 64 characters.
pub fn validate_object_name(field: &str, name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "{name:?} is not a valid name (letters, digits, '_', '.' and '-', starting with a letter or digit, 1-64 characters)"
            ),
        ))
    }
}

/// `NAME` (follows the latest version) or `NAME:V` (pins version V ≥ 1).
pub fn parse_source(field: &str, source: &str) -> Result<(String, Option<u64>), ValidationError> {
    let (name, pin) = match source.split_once(':') {
        Some((n, v)) => {
            let v: u64 = v.parse().ok().filter(|v| *v >= 1).ok_or_else(|| {
                ValidationError::new(
                    field,
                    format!("{source:?}: the version after ':' must be a number from 1"),
                )
            })?;
            (n, Some(v))
        }
        None => (source, None),
    };
    validate_object_name(field, name)?;
    Ok((name.to_string(), pin))
}

/// How a service mounts a secret or config into its containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    /// `NAME` or `NAME:VERSION` (see the module doc).
    pub source: String,
    /// Path in the container. Secrets: default `/run/secrets/NAME`, a relative path is below
    /// `/run/secrets`. Configs: default `/NAME`; must be absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Owner: a number or a name looked up in the container's /etc/passwd (default 0).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_or_number"
    )]
    pub uid: Option<String>,
    /// Group: a number or a name looked up in the container's /etc/group (default 0).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_or_number"
    )]
    pub gid: Option<String>,
    /// Permission bits, written as octal digits (`0440` or `"0440"`); default 0444.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "octal_mode",
        serialize_with = "serialize_mode"
    )]
    pub mode: Option<u32>,
}

impl FileRef {
    /// The referenced object's name (without a pinned version).
    pub fn name(&self) -> &str {
        self.source.split(':').next().unwrap_or(&self.source)
    }

    /// The absolute path in the container.
    pub fn target_path(&self, kind: ObjectKind) -> String {
        match (&self.target, kind) {
            (Some(t), _) if t.starts_with('/') => t.clone(),
            (Some(t), _) => format!("{SECRETS_DIR}/{t}"),
            (None, ObjectKind::Secret) => format!("{SECRETS_DIR}/{}", self.name()),
            (None, ObjectKind::Config) => format!("/{}", self.name()),
        }
    }

    /// The file's permission bits: `mode`, else 0444.
    pub fn file_mode(&self) -> u32 {
        self.mode.unwrap_or(0o444)
    }

    fn validate(&self, field: &str, kind: ObjectKind) -> Result<(), ValidationError> {
        parse_source(&format!("{field}.source"), &self.source)?;
        if let Some(t) = &self.target {
            let f = format!("{field}.target");
            if t.is_empty() || t.contains('\0') {
                return Err(ValidationError::new(f, "must be a path"));
            }
            if kind == ObjectKind::Config && !t.starts_with('/') {
                return Err(ValidationError::new(f, "must be an absolute path"));
            }
            if t.split('/').any(|c| c == "..") {
                return Err(ValidationError::new(f, "must not contain '..'"));
            }
            if t.trim_end_matches('/').is_empty() {
                return Err(ValidationError::new(f, "must not be /"));
            }
        }
        for (name, v) in [("uid", &self.uid), ("gid", &self.gid)] {
            if let Some(v) = v {
                let ok = !v.is_empty()
                    && v.len() <= 32
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
                if !ok {
                    return Err(ValidationError::new(
                        format!("{field}.{name}"),
                        format!("{v:?} is not a number or a user/group name"),
                    ));
                }
            }
        }
        if self.mode.is_some_and(|m| m > 0o777) {
            return Err(ValidationError::new(
                format!("{field}.mode"),
                "at most 0777 (no setuid, setgid or sticky bits)",
            ));
        }
        Ok(())
    }
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        S(String),
        N(u64),
    }
    Ok(Option::<V>::deserialize(d)?.map(|v| match v {
        V::S(s) => s,
        V::N(n) => n.to_string(),
    }))
}

/// `0440`, `440` and `"0440"` all mean 0o440 (as chmod reads them); JSON round trips carry
/// the octal digits as a string.
fn octal_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        S(String),
        N(u64),
    }
    let digits = match Option::<V>::deserialize(d)? {
        None => return Ok(None),
        Some(V::S(s)) => s,
        Some(V::N(n)) => n.to_string(),
    };
    u32::from_str_radix(digits.trim_start_matches("0o"), 8)
        .map(Some)
        .map_err(|_| {
            serde::de::Error::custom(format!(
                "{digits:?} is not a mode: write octal digits, e.g. 0440"
            ))
        })
}

/// Serializes a mode as its octal digits, so `octal_mode` reads it back.
fn serialize_mode<S: serde::Serializer>(mode: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match mode {
        Some(m) => s.serialize_str(&format!("0{m:o}")),
        None => s.serialize_none(),
    }
}

/// Checks a service's `secrets`, `configs` and `env_from_secret`.
pub fn validate_refs(
    secrets: &[FileRef],
    configs: &[FileRef],
    env_from_secret: &BTreeMap<String, String>,
) -> Result<(), ValidationError> {
    for (field, n) in [
        ("secrets", secrets.len()),
        ("configs", configs.len()),
        ("env_from_secret", env_from_secret.len()),
    ] {
        if n > MAX_REFS {
            return Err(ValidationError::new(
                field,
                format!("{n} references: at most {MAX_REFS}"),
            ));
        }
    }
    let mut targets = std::collections::BTreeSet::new();
    for (field, kind, refs) in [
        ("secrets", ObjectKind::Secret, secrets),
        ("configs", ObjectKind::Config, configs),
    ] {
        for (i, r) in refs.iter().enumerate() {
            let f = format!("{field}[{i}]");
            r.validate(&f, kind)?;
            if !targets.insert(r.target_path(kind)) {
                return Err(ValidationError::new(
                    format!("{f}.target"),
                    format!(
                        "{} is the target of another secret or config",
                        r.target_path(kind)
                    ),
                ));
            }
        }
    }
    for (k, v) in env_from_secret {
        let f = format!("env_from_secret.{k}");
        let ok = !k.is_empty()
            && !k.contains('=')
            && !k.contains('\0')
            && !k.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            return Err(ValidationError::new(
                f,
                "not a valid environment variable name",
            ));
        }
        parse_source(&f, v)?;
    }
    Ok(())
}

/// The key a reference resolves under in `ServiceSpec::resolved_refs`: `secret:SOURCE` or
/// `config:SOURCE` (the source as written, pin included).
pub fn ref_key(kind: ObjectKind, source: &str) -> String {
    format!("{kind}:{source}")
}

/// Every (kind, source) a spec references.
pub fn refs_of(spec: &crate::ServiceSpec) -> Vec<(ObjectKind, &str)> {
    let mut out: Vec<(ObjectKind, &str)> = Vec::new();
    out.extend(
        spec.secrets
            .iter()
            .map(|r| (ObjectKind::Secret, r.source.as_str())),
    );
    out.extend(
        spec.configs
            .iter()
            .map(|r| (ObjectKind::Config, r.source.as_str())),
    );
    out.extend(
        spec.env_from_secret
            .values()
            .map(|s| (ObjectKind::Secret, s.as_str())),
    );
    out
}

/// Whether `spec` references object `name` of `kind` (any version).
pub fn uses(spec: &crate::ServiceSpec, kind: ObjectKind, name: &str) -> bool {
    refs_of(spec)
        .iter()
        .any(|(k, s)| *k == kind && s.split(':').next() == Some(name))
}

/// The (kind, name, version) values a task of `spec` needs, from its resolved references.
pub fn needs(spec: &crate::ServiceSpec) -> Vec<(ObjectKind, String, u64)> {
    let mut out: Vec<(ObjectKind, String, u64)> = refs_of(spec)
        .into_iter()
        .map(|(k, s)| {
            let v = spec.resolved_refs.get(&ref_key(k, s)).copied().unwrap_or(0);
            (k, s.split(':').next().unwrap_or(s).to_string(), v)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A secret or config in the store: its versions, newest last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretObject {
    /// Secret or config.
    pub kind: ObjectKind,
    /// Its name, unique per kind.
    pub name: String,
    /// Free-form labels, for the user.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The versions still kept (see the module doc), by number.
    pub versions: BTreeMap<u64, SecretVersion>,
    /// The newest version's number (never reused, even after older ones are dropped).
    pub latest: u64,
    /// Milliseconds since the epoch, stamped by the leader.
    pub created_at: u64,
    /// Milliseconds since the epoch, stamped by the leader.
    pub updated_at: u64,
    /// Raft index of the last change.
    pub version: u64,
}

/// One value of a secret or config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersion {
    /// The value.
    pub data: SecretData,
    /// `sha256:<hex>` of the data, stamped by the proposer.
    pub digest: String,
    /// Milliseconds since the epoch, stamped by the leader.
    pub created_at: u64,
}

/// What `inspect` and `ls` show: everything but the values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMeta {
    /// Secret or config.
    pub kind: ObjectKind,
    /// Its name.
    pub name: String,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The newest version's number.
    pub latest: u64,
    /// Milliseconds since the epoch.
    pub created_at: u64,
    /// Milliseconds since the epoch.
    pub updated_at: u64,
    /// The versions kept, oldest first.
    pub versions: Vec<VersionMeta>,
}

/// One version, without its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    /// Its number.
    pub version: u64,
    /// The value's size in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the value.
    pub digest: String,
    /// Milliseconds since the epoch.
    pub created_at: u64,
}

impl SecretObject {
    /// Everything but the values, for `inspect` and `ls`.
    pub fn meta(&self) -> SecretMeta {
        SecretMeta {
            kind: self.kind,
            name: self.name.clone(),
            labels: self.labels.clone(),
            latest: self.latest,
            created_at: self.created_at,
            updated_at: self.updated_at,
            versions: self
                .versions
                .iter()
                .map(|(v, d)| VersionMeta {
                    version: *v,
                    size: d.data.0.len() as u64,
                    digest: d.digest.clone(),
                    created_at: d.created_at,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for n in 0..20 {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let s = base64_encode(&data);
            assert_eq!(base64_decode(&s).unwrap(), data, "{s}");
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert!(base64_decode("a===").is_none());
        assert!(base64_decode("aGV").is_none());
    }

    #[test]
    fn values_never_show_in_debug_or_json_of_metadata() {
        let d = SecretData(b"hunter2-very-secret".to_vec());
        assert_eq!(format!("{d:?}"), "<redacted 19 bytes>");
        let o = SecretObject {
            kind: ObjectKind::Secret,
            name: "db".into(),
            labels: Default::default(),
            versions: [(
                1,
                SecretVersion {
                    data: d,
                    digest: "sha256:x".into(),
                    created_at: 1,
                },
            )]
            .into(),
            latest: 1,
            created_at: 1,
            updated_at: 1,
            version: 1,
        };
        assert!(!format!("{o:?}").contains("hunter2"));
        let meta = serde_json::to_string(&o.meta()).unwrap();
        assert!(
            !meta.contains("hunter2") && !meta.contains("aHVudGVy"),
            "{meta}"
        );
        assert!(meta.contains("\"size\":19"), "{meta}");
        let t = SecretText("hunter2".into());
        assert_eq!(format!("{t:?}"), "<redacted 7 bytes>");
    }

    #[test]
    fn sources_names_and_sizes() {
        assert_eq!(parse_source("s", "db").unwrap(), ("db".into(), None));
        assert_eq!(parse_source("s", "db:3").unwrap(), ("db".into(), Some(3)));
        for bad in ["db:0", "db:x", ":3", "a/b", "-a", ""] {
            let e = parse_source("secrets[0].source", bad).unwrap_err();
            assert_eq!(e.field, "secrets[0].source", "{bad}");
        }
        let many: BTreeMap<String, String> = (0..=MAX_REFS)
            .map(|i| (format!("V{i}"), "s".into()))
            .collect();
        let e = validate_refs(&[], &[], &many).unwrap_err();
        assert_eq!(e.field, "env_from_secret");
        assert!(check_size("data", MAX_DATA).is_ok());
        let e = check_size("data", MAX_DATA + 1).unwrap_err();
        assert_eq!(e.field, "data");
        assert!(e.message.contains("500 KiB"), "{e}");
    }

    #[test]
    fn targets_default_per_kind() {
        let r = FileRef {
            source: "db:2".into(),
            target: None,
            uid: None,
            gid: None,
            mode: None,
        };
        assert_eq!(r.target_path(ObjectKind::Secret), "/run/secrets/db");
        assert_eq!(r.target_path(ObjectKind::Config), "/db");
        assert_eq!(r.file_mode(), 0o444);
        let r = FileRef {
            target: Some("pw".into()),
            ..r
        };
        assert_eq!(r.target_path(ObjectKind::Secret), "/run/secrets/pw");
    }
}

//! User-owned specs: what a user declares. The system never rewrites a spec; it derives tasks
//! from it, and each task carries a frozen copy of the spec it was made from. The same types serve YAML manifests, the API (as JSON inside protobuf envelopes) and
//! the replicated store, so a field added here is accepted everywhere at once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// A declared service: a container spec plus how many copies run and how they restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Unique name; also the DNS name later. `[a-z0-9][a-z0-9-]*`, at most 63 characters.
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Desired copies for replicated services. Defaults to 1.
    #[serde(default = "one")]
    pub replicas: u64,
    // Container fields sit flat in the service (as in compose files); see `ContainerSpec`.
    // (serde's `flatten` would lose line numbers and `deny_unknown_fields`, so no nesting.)
    /// Image reference in the cluster registry: `NAME[:TAG]` or `NAME@sha256:…`.
    pub image: String,
    /// Replaces the image's ENTRYPOINT when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's CMD when set (Docker semantics: args to the entrypoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Appended to `command` (or to the image's CMD when `command` is unset).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment, merged over the image's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// `uid[:gid]` (numeric) inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `host` shares the host's network namespace; `none` gives the container only loopback.
    #[serde(default)]
    pub network_mode: NetworkMode,
    /// Seconds between SIGTERM and SIGKILL when the task stops.
    #[serde(default = "default_grace")]
    pub stop_grace_period: u64,
    #[serde(default)]
    pub restart: RestartPolicy,
}

fn one() -> u64 {
    1
}

fn default_grace() -> u64 {
    10
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    #[default]
    Host,
    None,
}

/// When a finished task's slot gets a new task (Swarm's semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    #[serde(default)]
    pub condition: RestartCondition,
    /// Seconds to wait after a task ends before its replacement starts.
    #[serde(default = "default_delay")]
    pub delay: u64,
    /// 0 means unlimited.
    #[serde(default)]
    pub max_attempts: u64,
}

fn default_delay() -> u64 {
    5
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            condition: RestartCondition::Any,
            delay: default_delay(),
            max_attempts: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    None,
    OnFailure,
    #[default]
    Any,
}

impl ServiceSpec {
    /// Semantic checks serde cannot express. Returns the first problem with its field path.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name("name", &self.name)?;
        if self.image.trim().is_empty() {
            return Err(ValidationError::new("image", "must not be empty"));
        }
        if self.image.chars().any(char::is_whitespace) {
            return Err(ValidationError::new("image", "must not contain spaces"));
        }
        if self.replicas > 10_000 {
            return Err(ValidationError::new("replicas", "at most 10000"));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') {
                return Err(ValidationError::new(
                    format!("env.{k}"),
                    "a variable name must be non-empty and contain no '='",
                ));
            }
        }
        if let Some(user) = &self.user {
            let ok = user
                .split(':')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
                && user.split(':').count() <= 2;
            if !ok {
                return Err(ValidationError::new(
                    "user",
                    "must be numeric uid or uid:gid (e.g. 1000:1000)",
                ));
            }
        }
        if let Some(cmd) = &self.command {
            if cmd.is_empty() && self.args.is_empty() {
                return Err(ValidationError::new(
                    "command",
                    "must not be an empty list (omit it to use the image's)",
                ));
            }
        }
        Ok(())
    }
}

/// Names of services and nodes: DNS labels.
pub fn validate_name(field: &str, name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "{name:?} is not a valid name (lowercase letters, digits and '-', 1-63 characters)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        tests_support::spec("web", 2)
    }

    #[test]
    fn validation_names_the_field() {
        type Mutate = Box<dyn Fn(&mut ServiceSpec)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (Box::new(|s| s.name = "Web".into()), "name"),
            (Box::new(|s| s.image = " ".into()), "image"),
            (Box::new(|s| s.replicas = 20_000), "replicas"),
            (Box::new(|s| s.user = Some("root".into())), "user"),
            (Box::new(|s| s.command = Some(vec![])), "command"),
            (
                Box::new(|s| {
                    s.env.insert("A=B".into(), "x".into());
                }),
                "env.A=B",
            ),
        ];
        for (mutate, field) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = s.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        spec().validate().unwrap();
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A minimal valid spec for tests.
    pub fn spec(name: &str, replicas: u64) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            labels: Default::default(),
            replicas,
            image: "busybox:latest".into(),
            entrypoint: None,
            command: None,
            args: vec![],
            env: Default::default(),
            workdir: None,
            user: None,
            hostname: None,
            network_mode: NetworkMode::Host,
            stop_grace_period: 10,
            restart: Default::default(),
        }
    }
}

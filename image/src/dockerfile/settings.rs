//! The image settings a build carries from step to step (the `config` object of an OCI image
//! config), read from a base image's config blob and written back into the built image's.

use std::collections::{BTreeMap, BTreeSet};

use super::{DockerfileError, DEFAULT_SHELL};

/// The image settings a build carries from step to step: the `config` object of an OCI image
/// config.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// `K=V`, in order; a later ENV of the same name replaces the entry in place.
    pub env: Vec<String>,
    /// USER; empty means root.
    pub user: String,
    /// Empty means `/`.
    pub working_dir: String,
    /// CMD; `None`: not set (ENTRYPOINT clears an inherited one).
    pub cmd: Option<Vec<String>>,
    /// ENTRYPOINT; `None`: not set.
    pub entrypoint: Option<Vec<String>>,
    /// `80/tcp`.
    pub exposed_ports: BTreeSet<String>,
    /// VOLUME paths.
    pub volumes: BTreeSet<String>,
    /// LABELs.
    pub labels: BTreeMap<String, String>,
    /// MAINTAINER: the image config's top-level `author` (not in its `config` object; an
    /// inherited one is kept, as docker does). Not serialized when unset, so cache keys of
    /// builds without it stay as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Empty means [`DEFAULT_SHELL`].
    pub shell: Vec<String>,
    /// STOPSIGNAL, as written (a name or a number).
    pub stop_signal: Option<String>,
    /// HEALTHCHECK; `None`: none set (the image has no `Healthcheck`).
    #[serde(default)]
    pub healthcheck: Option<Healthcheck>,
    /// ONBUILD triggers, as written, in order (the image config's `OnBuild`).
    #[serde(default)]
    pub onbuild: Vec<String>,
}

/// An image's health check (the `Healthcheck` object of an image config). Durations are in
/// nanoseconds, as in the image config; 0 means "the runtime's default".
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Healthcheck {
    /// `["NONE"]` (disables an inherited check), `["CMD", argv…]` or `["CMD-SHELL", command]`.
    pub test: Vec<String>,
    /// Time between checks.
    pub interval: u64,
    /// Time a check may take before it counts as failed.
    pub timeout: u64,
    /// Startup time during which failures do not count.
    pub start_period: u64,
    /// Time between checks during the start period.
    pub start_interval: u64,
    /// Consecutive failures before unhealthy; 0: the default.
    pub retries: u64,
}

impl Settings {
    /// From an image config blob's `config` object (PascalCase: Env, User, WorkingDir, Cmd,
    /// Entrypoint, ExposedPorts `{"80/tcp":{}}`, Volumes `{"/d":{}}`, Labels, StopSignal,
    /// Shell); nulls and absence are empty. Unknown fields are ignored. Errors (line 0) name
    /// the field that has the wrong type.
    pub fn from_config_json(config_blob: &[u8]) -> Result<Settings, DockerfileError> {
        let blob: serde_json::Value = serde_json::from_slice(config_blob)
            .map_err(|e| DockerfileError::new(0, format!("image config: invalid JSON: {e}")))?;
        let author = match blob.get("author") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()).filter(|s| !s.is_empty()),
            Some(_) => {
                return Err(DockerfileError::new(
                    0,
                    "image config: \"author\" is not a string",
                ))
            }
        };
        let config = match blob.get("config") {
            None | Some(serde_json::Value::Null) => {
                return Ok(Settings {
                    author,
                    ..Settings::default()
                })
            }
            Some(serde_json::Value::Object(m)) => m,
            Some(_) => {
                return Err(DockerfileError::new(
                    0,
                    "image config: \"config\" is not an object",
                ))
            }
        };
        Ok(Settings {
            env: json_strings(config, "Env")?.unwrap_or_default(),
            user: json_string(config, "User")?.unwrap_or_default(),
            working_dir: json_string(config, "WorkingDir")?.unwrap_or_default(),
            cmd: json_strings(config, "Cmd")?,
            entrypoint: json_strings(config, "Entrypoint")?,
            exposed_ports: json_keys(config, "ExposedPorts")?,
            volumes: json_keys(config, "Volumes")?,
            labels: json_labels(config)?,
            author,
            shell: json_strings(config, "Shell")?.unwrap_or_default(),
            stop_signal: json_string(config, "StopSignal")?.filter(|s| !s.is_empty()),
            healthcheck: json_healthcheck(config)?,
            onbuild: json_strings(config, "OnBuild")?.unwrap_or_default(),
        })
    }

    /// Writes these settings into an image config JSON value's `config` object (creating it),
    /// keeping the fields it does not model (ArgsEscaped, …). Empty
    /// settings are removed rather than written as empty values, as docker does.
    pub fn write_to(&self, image_config: &mut serde_json::Value) {
        use serde_json::{json, Map, Value};
        if !image_config.is_object() {
            *image_config = Value::Object(Map::new());
        }
        let Value::Object(root) = image_config else {
            return;
        };
        if let Some(a) = &self.author {
            root.insert("author".into(), json!(a));
        }
        let config = root
            .entry("config")
            .or_insert_with(|| Value::Object(Map::new()));
        if !config.is_object() {
            *config = Value::Object(Map::new());
        }
        let Value::Object(config) = config else {
            return;
        };
        let mut set = |key: &str, value: Option<Value>| match value {
            Some(v) => {
                config.insert(key.to_string(), v);
            }
            None => {
                config.remove(key);
            }
        };
        let set_of = |items: &BTreeSet<String>| {
            (!items.is_empty())
                .then(|| Value::Object(items.iter().map(|k| (k.clone(), json!({}))).collect()))
        };
        set("Env", (!self.env.is_empty()).then(|| json!(self.env)));
        set("User", (!self.user.is_empty()).then(|| json!(self.user)));
        set(
            "WorkingDir",
            (!self.working_dir.is_empty()).then(|| json!(self.working_dir)),
        );
        set("Cmd", self.cmd.as_ref().map(|c| json!(c)));
        set("Entrypoint", self.entrypoint.as_ref().map(|e| json!(e)));
        set("ExposedPorts", set_of(&self.exposed_ports));
        set("Volumes", set_of(&self.volumes));
        set(
            "Labels",
            (!self.labels.is_empty()).then(|| json!(self.labels)),
        );
        set("Shell", (!self.shell.is_empty()).then(|| json!(self.shell)));
        set("StopSignal", self.stop_signal.as_ref().map(|s| json!(s)));
        set(
            "OnBuild",
            (!self.onbuild.is_empty()).then(|| json!(self.onbuild)),
        );
        set(
            "Healthcheck",
            self.healthcheck.as_ref().map(|h| {
                let mut o = Map::new();
                o.insert("Test".into(), json!(h.test));
                for (k, v) in [
                    ("Interval", h.interval),
                    ("Timeout", h.timeout),
                    ("StartPeriod", h.start_period),
                    ("StartInterval", h.start_interval),
                    ("Retries", h.retries),
                ] {
                    if v != 0 {
                        o.insert(k.into(), json!(v));
                    }
                }
                Value::Object(o)
            }),
        );
    }

    /// The shell shell-form commands run with: SHELL's, else [`DEFAULT_SHELL`].
    pub fn shell_or_default(&self) -> Vec<String> {
        if self.shell.is_empty() {
            DEFAULT_SHELL.iter().map(|s| s.to_string()).collect()
        } else {
            self.shell.clone()
        }
    }

    /// The value of environment variable `name` (the last `name=` entry).
    pub fn env_value(&self, name: &str) -> Option<&str> {
        env_lookup(&self.env, name)
    }
}

fn json_type_error(field: &str, want: &str) -> DockerfileError {
    DockerfileError::new(
        0,
        format!("image config: config field {field:?} is not {want}"),
    )
}

fn json_string(
    config: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<Option<String>, DockerfileError> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(json_type_error(field, "a string")),
    }
}

fn json_strings(
    config: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<Option<Vec<String>>, DockerfileError> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| json_type_error(field, "an array of strings"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(json_type_error(field, "an array of strings")),
    }
}

fn json_keys(
    config: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<BTreeSet<String>, DockerfileError> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(BTreeSet::new()),
        Some(serde_json::Value::Object(m)) => Ok(m.keys().cloned().collect()),
        Some(_) => Err(json_type_error(field, "an object")),
    }
}

fn json_labels(
    config: &serde_json::Map<String, serde_json::Value>,
) -> Result<BTreeMap<String, String>, DockerfileError> {
    match config.get("Labels") {
        None | Some(serde_json::Value::Null) => Ok(BTreeMap::new()),
        Some(serde_json::Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(json_type_error("Labels", "an object of strings")),
            })
            .collect(),
        Some(_) => Err(json_type_error("Labels", "an object of strings")),
    }
}

fn json_healthcheck(
    config: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<Healthcheck>, DockerfileError> {
    let h = match config.get("Healthcheck") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Object(h)) => h,
        Some(_) => return Err(json_type_error("Healthcheck", "an object")),
    };
    let number = |field: &str| -> Result<u64, DockerfileError> {
        match h.get(field) {
            None | Some(serde_json::Value::Null) => Ok(0),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| json_type_error(&format!("Healthcheck.{field}"), "a number")),
        }
    };
    Ok(Some(Healthcheck {
        test: json_strings(h, "Test")
            .map_err(|_| json_type_error("Healthcheck.Test", "an array of strings"))?
            .unwrap_or_default(),
        interval: number("Interval")?,
        timeout: number("Timeout")?,
        start_period: number("StartPeriod")?,
        start_interval: number("StartInterval")?,
        retries: number("Retries")?,
    }))
}

fn env_lookup<'a>(env: &'a [String], name: &str) -> Option<&'a str> {
    env.iter().rev().find_map(|e| match e.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if e == name => Some(""),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::test_util::*;

    #[test]
    fn settings_json_round_trip() {
        let blob = br#"{
            "architecture": "amd64",
            "config": {
                "Env": ["PATH=/usr/bin", "A=1"],
                "User": "app",
                "WorkingDir": "/w",
                "Cmd": null,
                "Entrypoint": ["/e"],
                "ExposedPorts": {"80/tcp": {}},
                "Volumes": {"/d": {}},
                "Labels": {"k": "v"},
                "StopSignal": "SIGINT",
                "Shell": ["/bin/ash", "-c"],
                "Healthcheck": {"Test": ["NONE"]},
                "OnBuild": null,
                "ArgsEscaped": true
            },
            "rootfs": {"type": "layers", "diff_ids": []}
        }"#;
        let s = Settings::from_config_json(blob).unwrap();
        assert_eq!(s.env, vec!["PATH=/usr/bin".to_string(), "A=1".into()]);
        assert_eq!(s.env_value("A"), Some("1"));
        assert_eq!(s.user, "app");
        assert_eq!(s.working_dir, "/w");
        assert_eq!(s.cmd, None);
        assert_eq!(s.entrypoint, Some(vec!["/e".into()]));
        assert!(s.exposed_ports.contains("80/tcp") && s.volumes.contains("/d"));
        assert_eq!(s.labels, args(&[("k", "v")]));
        assert_eq!(s.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(
            s.shell_or_default(),
            vec!["/bin/ash".to_string(), "-c".into()]
        );

        let mut config: serde_json::Value = serde_json::from_slice(blob).unwrap();
        let mut changed = s.clone();
        changed.cmd = Some(vec!["serve".into()]);
        changed.labels.clear();
        changed.user.clear();
        changed.write_to(&mut config);
        let c = &config["config"];
        assert_eq!(c["Cmd"], serde_json::json!(["serve"]));
        assert!(c.get("Labels").is_none() && c.get("User").is_none());
        assert_eq!(c["Healthcheck"], serde_json::json!({"Test": ["NONE"]}));
        assert_eq!(c["ArgsEscaped"], serde_json::json!(true));
        assert_eq!(c["ExposedPorts"], serde_json::json!({"80/tcp": {}}));
        assert_eq!(config["architecture"], "amd64");
        let back = Settings::from_config_json(&serde_json::to_vec(&config).unwrap()).unwrap();
        assert_eq!(back, changed);

        // No config at all, nulls everywhere: empty settings; written into a bare value.
        assert_eq!(
            Settings::from_config_json(b"{}").unwrap(),
            Settings::default()
        );
        assert_eq!(
            Settings::from_config_json(br#"{"config":{"Env":null,"Labels":null,"Shell":null}}"#)
                .unwrap(),
            Settings::default()
        );
        assert_eq!(
            Settings::default().shell_or_default(),
            vec!["/bin/sh".to_string(), "-c".into()]
        );
        let mut v = serde_json::Value::Null;
        s.write_to(&mut v);
        assert_eq!(
            Settings::from_config_json(&serde_json::to_vec(&v).unwrap()).unwrap(),
            s
        );

        let e = Settings::from_config_json(br#"{"config":{"Env":"A=1"}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Dockerfile line 0: image config: config field \"Env\" is not an array of strings"
        );
        assert_eq!(Settings::from_config_json(b"not json").unwrap_err().line, 0);
    }
}

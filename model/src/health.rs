//! Health checks: how an agent decides a container is ready and still well. A task with a
//! check counts as `running` only after its first passing probe; `retries` failures in a row
//! make it unhealthy, and the agent stops it (reported `failed`) so the restart policy and
//! rolling updates see it as a failure.

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// Exactly one probe kind (`exec`, `http` or `tcp`) plus timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Command run inside the container; exit 0 means healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    /// HTTP GET to the container; a 2xx or 3xx answer means healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    /// A TCP connection that opens means healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    /// Time between probes.
    #[serde(default = "default_interval", with = "crate::duration")]
    pub interval: u64,
    /// A probe slower than this fails.
    #[serde(default = "default_timeout", with = "crate::duration")]
    pub timeout: u64,
    /// Consecutive failures that make the task unhealthy.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Failures during this time after start do not count (slow starters).
    #[serde(default, with = "crate::duration")]
    pub start_period: u64,
}

/// `http: {port, path}`: healthy when a GET answers 2xx or 3xx.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// The container port to connect to.
    pub port: u16,
    /// The request path; `/` by default.
    #[serde(default = "default_path")]
    pub path: String,
}

/// `tcp: {port}`: healthy when a connection opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    /// The container port to connect to.
    pub port: u16,
}

fn default_interval() -> u64 {
    30_000
}
fn default_timeout() -> u64 {
    30_000
}
fn default_retries() -> u32 {
    3
}
fn default_path() -> String {
    "/".into()
}

/// Which probe a check runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe<'a> {
    /// Run this argv in the container; exit 0 is healthy.
    Exec(&'a [String]),
    /// GET `path` on `port`.
    Http {
        /// The container port.
        port: u16,
        /// The request path.
        path: &'a str,
    },
    /// Connect to `port`.
    Tcp {
        /// The container port.
        port: u16,
    },
}

impl HealthCheck {
    /// The one probe the check sets; `None` when it sets none or several (see [`Self::validate`]).
    pub fn probe(&self) -> Option<Probe<'_>> {
        match (&self.exec, &self.http, &self.tcp) {
            (Some(cmd), None, None) => Some(Probe::Exec(cmd)),
            (None, Some(h), None) => Some(Probe::Http {
                port: h.port,
                path: &h.path,
            }),
            (None, None, Some(t)) => Some(Probe::Tcp { port: t.port }),
            _ => None,
        }
    }

    /// Checks that exactly one probe is set and the numbers are usable.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let kinds = [self.exec.is_some(), self.http.is_some(), self.tcp.is_some()]
            .iter()
            .filter(|k| **k)
            .count();
        if kinds != 1 {
            return Err(ValidationError::new(
                "healthcheck",
                "set exactly one of exec, http, tcp",
            ));
        }
        if let Some(cmd) = &self.exec {
            if cmd.is_empty() || cmd[0].is_empty() {
                return Err(ValidationError::new(
                    "healthcheck.exec",
                    "needs a command, e.g. [\"/bin/sh\", \"-c\", \"test -f /ready\"]",
                ));
            }
        }
        if let Some(h) = &self.http {
            if !h.path.starts_with('/') {
                return Err(ValidationError::new(
                    "healthcheck.http.path",
                    "must start with '/'",
                ));
            }
        }
        if self.interval < 100 {
            return Err(ValidationError::new(
                "healthcheck.interval",
                "at least 100ms",
            ));
        }
        if self.timeout == 0 {
            return Err(ValidationError::new(
                "healthcheck.timeout",
                "must be more than zero",
            ));
        }
        if self.retries == 0 {
            return Err(ValidationError::new("healthcheck.retries", "at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_probe_kind_and_sane_timing() {
        let base: HealthCheck =
            serde_json::from_value(serde_json::json!({"tcp": {"port": 80}, "interval": "1s"}))
                .unwrap();
        base.validate().unwrap();
        assert_eq!(base.interval, 1000);
        assert_eq!(base.timeout, 30_000);
        assert_eq!(base.probe(), Some(Probe::Tcp { port: 80 }));
        let mut two = base.clone();
        two.exec = Some(vec!["true".into()]);
        assert_eq!(two.validate().unwrap_err().field, "healthcheck");
        let mut fast = base.clone();
        fast.interval = 10;
        assert_eq!(fast.validate().unwrap_err().field, "healthcheck.interval");
        let http: HealthCheck =
            serde_json::from_value(serde_json::json!({"http": {"port": 8080, "path": "x"}}))
                .unwrap();
        assert_eq!(http.validate().unwrap_err().field, "healthcheck.http.path");
    }
}

//! Version skew between controllers and agents: what a rolling upgrade may mix.
//!
//! Policy: a controller serves agents of its own minor version and of the one before (same
//! major). Controllers are upgraded first, then agents, so an agent is never newer than the
//! controllers it talks to; one newer than the controller is refused ("upgrade the
//! controllers first"), one more than a minor version behind is refused ("upgrade the agent").
//! Patch versions and commits never matter. An agent that reports no version at all comes from
//! a build before versions were reported, which is release [`UNREPORTED`].
//!
//! Pure: versions in, verdict out (the dispatcher turns a refusal into the session's error).

/// The release of builds that did not report a version yet.
pub const UNREPORTED: Version = Version {
    major: 0,
    minor: 1,
    patch: 0,
};

/// A release version, `major.minor.patch` (build metadata such as `+<commit>` is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Incompatible releases.
    pub major: u64,
    /// Releases that may mix with the one before.
    pub minor: u64,
    /// Fixes.
    pub patch: u64,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Why versions cannot work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkewError {
    /// A version string that is not `major.minor.patch[-pre][+build]`.
    #[error("compat: version {0:?} is not major.minor.patch")]
    Malformed(String),
    /// The agent is newer than the controller.
    #[error("compat: agent version {agent} is newer than the controller's {controller}: upgrade the controllers first")]
    AgentNewer {
        /// The agent's version.
        agent: Version,
        /// The controller's version.
        controller: Version,
    },
    /// The agent is more than one minor version behind (or of another major version).
    #[error("compat: agent version {agent} is too old for controller {controller} (it serves {controller_major}.{oldest_minor} and later): upgrade the agent")]
    AgentTooOld {
        /// The agent's version.
        agent: Version,
        /// The controller's version.
        controller: Version,
        /// The controller's major version.
        controller_major: u64,
        /// The oldest minor version the controller serves.
        oldest_minor: u64,
    },
}

/// Parses `major.minor.patch`, ignoring a pre-release (`-…`) or build (`+…`) suffix; an empty
/// string is [`UNREPORTED`].
pub fn parse(s: &str) -> Result<Version, SkewError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(UNREPORTED);
    }
    let bad = || SkewError::Malformed(s.chars().take(64).collect());
    let core = s.split(['+', '-']).next().unwrap_or_default();
    let mut parts = core.split('.').map(|p| p.parse::<u64>().map_err(|_| bad()));
    let v = Version {
        major: parts.next().ok_or_else(bad)??,
        minor: parts.next().ok_or_else(bad)??,
        patch: parts.next().ok_or_else(bad)??,
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(v)
}

/// Whether a controller at `controller` serves an agent reporting `agent` (see the module doc).
pub fn check_agent(controller: &str, agent: &str) -> Result<(), SkewError> {
    let c = parse(controller)?;
    let a = parse(agent)?;
    if (a.major, a.minor) > (c.major, c.minor) {
        return Err(SkewError::AgentNewer {
            agent: a,
            controller: c,
        });
    }
    let oldest_minor = c.minor.saturating_sub(1);
    if a.major != c.major || a.minor < oldest_minor {
        return Err(SkewError::AgentTooOld {
            agent: a,
            controller: c,
            controller_major: c.major,
            oldest_minor,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_table() {
        // (controller, agent, accepted)
        let cases = [
            ("0.1.0+abc", "0.1.0+def", true),
            ("0.1.0", "", true),
            ("0.2.0", "", true),
            ("0.3.0", "", false),
            ("0.2.3", "0.1.9", true),
            ("0.2.0", "0.2.7-rc1", true),
            ("0.3.0", "0.1.0", false),
            ("0.1.0", "0.2.0", false),
            ("0.1.5", "0.1.6", true),
            ("1.0.0", "0.9.0", false),
            ("2.4.0", "2.3.1", true),
            ("2.4.0", "1.4.0", false),
            ("2.0.0", "3.0.0", false),
        ];
        for (c, a, ok) in cases {
            assert_eq!(check_agent(c, a).is_ok(), ok, "controller {c}, agent {a}");
        }
    }

    #[test]
    fn refusals_say_what_to_upgrade() {
        let e = check_agent("0.2.0", "0.3.0").unwrap_err().to_string();
        assert!(e.contains("upgrade the controllers first"), "{e}");
        let e = check_agent("0.4.0", "0.2.0").unwrap_err().to_string();
        assert!(e.contains("upgrade the agent") && e.contains("0.3"), "{e}");
        assert!(matches!(
            check_agent("0.1.0", "banana"),
            Err(SkewError::Malformed(_))
        ));
        assert!(check_agent("0.1.0", "1.2").is_err());
        assert!(check_agent("0.1.0", "1.2.3.4").is_err());
    }
}

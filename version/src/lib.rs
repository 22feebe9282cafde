//! This build's version, as agents and controllers report it (`rctl node ls`, `rctl cluster
//! info`) and as the skew policy (`rudder_model::compat`) compares it.
//!
//! Its own crate, with no dependencies, so that the build script that stamps the git commit
//! (rerun whenever HEAD moves) rebuilds only what reports the version.

/// The release version (the workspace's crate version), e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit built from (12 hex digits), or `unknown` outside a git checkout.
pub const COMMIT: &str = env!("RUDDER_GIT_COMMIT");

/// `VERSION+COMMIT` (semver build metadata), e.g. `0.1.0+0123456789ab`: what is reported.
pub fn full() -> String {
    format!("{VERSION}+{COMMIT}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn full_is_version_plus_commit() {
        let f = super::full();
        assert!(f.starts_with(super::VERSION));
        assert!(f.ends_with(super::COMMIT));
        assert!(!super::COMMIT.is_empty());
    }
}

//! Which controllers this agent serves (audit H4 on the agent side). AgentApi admits manager
//! certificates only; of those, only the current members of the controller group, as the
//! leader last listed them (`Trusted`, over the session). A controller removed with
//! `rctl cluster rm-manager` is revoked, drops off the list, and is refused here at its next
//! request, even while its certificate is still valid.
//!
//! Invariants:
//! - The list is kept in `<data>/trusted-controllers.json` (0600, written by rename), so an
//!   agent that restarts refuses a removed controller before its first session, too.
//! - The same list decides which controllers the agent's session may talk to: a removed
//!   controller that still holds a valid certificate (and even leads a group of its own) is
//!   refused in the TLS handshake, so it can neither take the agent's sessions nor hand it a
//!   list of its own.
//! - Before any list is known (a new agent), every manager certificate is admitted, as the
//!   CA alone decides then.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use rudder_pki::ca::PeerIdentity;
use tracing::{info, warn};

/// The list and where it is kept.
#[derive(Debug)]
pub struct TrustedControllers {
    path: PathBuf,
    names: RwLock<Option<BTreeSet<String>>>,
}

impl TrustedControllers {
    /// Loads the list kept at `path` (none yet when the file is missing or unreadable).
    pub fn load(path: &Path) -> Self {
        let names = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<BTreeSet<String>>(&b).ok());
        TrustedControllers {
            path: path.to_path_buf(),
            names: RwLock::new(names),
        }
    }

    /// Replaces the list (and its file, when it changed).
    pub fn set(&self, names: impl IntoIterator<Item = String>) {
        let names: BTreeSet<String> = names.into_iter().collect();
        let mut cur = self.names.write().unwrap_or_else(|p| p.into_inner());
        if cur.as_ref() == Some(&names) {
            return;
        }
        info!(controllers = ?names, "trusted controllers");
        let bytes = serde_json::to_vec(&names).unwrap_or_default();
        if let Err(e) = rudder_pki::ca::write_atomic(&self.path, &bytes, 0o600) {
            warn!(%e, "the trusted controllers are not kept across restarts");
        }
        *cur = Some(names);
    }

    /// Whether the controller named `cn` is a current member (or no list is known yet).
    pub fn admits(&self, cn: &str) -> Result<(), String> {
        let names = self.names.read().unwrap_or_else(|p| p.into_inner());
        match names.as_ref() {
            Some(n) if !n.contains(cn) => Err(format!(
                "{cn} is not a member of the controller group (removed?)"
            )),
            _ => Ok(()),
        }
    }

    /// Admits `caller` to AgentApi if it is a current member (or no list is known yet).
    pub fn check(&self, caller: &PeerIdentity) -> Result<(), tonic::Status> {
        self.admits(&caller.node).map_err(|why| {
            warn!(
                node = caller.node,
                "agent api: refused a controller that is not a member"
            );
            tonic::Status::permission_denied(format!("AgentApi: {why}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_pki::ca::Role;
    use std::os::unix::fs::PermissionsExt;

    fn id(node: &str) -> PeerIdentity {
        PeerIdentity {
            role: Role::Manager,
            node: node.into(),
            not_before: std::time::SystemTime::now(),
            not_after: std::time::SystemTime::now(),
        }
    }

    #[test]
    fn only_listed_controllers_and_the_list_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("trusted-controllers.json");
        let t = TrustedControllers::load(&path);
        // Nothing known yet: the CA decides alone.
        t.check(&id("controller-9")).unwrap();
        t.set(["controller-1".to_string(), "controller-2".to_string()]);
        t.check(&id("controller-2")).unwrap();
        let err = t.check(&id("controller-3")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // controller-2 removed; a restarted agent remembers.
        t.set(["controller-1".to_string()]);
        let again = TrustedControllers::load(&path);
        assert!(again.check(&id("controller-2")).is_err());
        again.check(&id("controller-1")).unwrap();
    }
}

//! The cluster PKI wired into a controller: where its certificates come from, where the CA and
//! join tokens are kept (the replicated store), and which role may call which service.
//!
//! - The first controller of a cluster creates the CA, a manager certificate for itself and an
//!   admin certificate for `rctl` (written to `<data>/admin/`, with the initial join tokens, as
//!   `docker swarm init` prints its join commands), then records the CA and tokens in the
//!   store once it leads.
//! - A joining controller presents a manager join token to `Cluster/Join` over a connection
//!   that pins the CA by the token's fingerprint, and receives its manager certificate.
//! - Every gRPC service checks the caller's certificate role: Control is for admins,
//!   Dispatcher for agents (worker or manager certificates), RaftPeer for managers; the
//!   Cluster service checks per call (Join needs only a token).
//!
//! The CA key and the token secrets live in the raft log and snapshots in the clear, on the
//! managers' disks only (0700 data dirs); encrypting them at rest is still to do.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rudder_model::store::ClusterSecrets;
use rudder_model::Command;
use tracing::{info, warn};

use crate::ca::{self, ClusterCa, JoinTokens, Role, Token};
use crate::cluster_api::{
    CaSecrets, ClusterError, SecretsStore, Standing, CONTROLLER_PREFIX, NODE_CERT_VALIDITY,
};
use crate::raft_node::RaftHandle;
use crate::tls::{self, NodeCerts};

/// Files `rctl` needs, written by the first controller into `<data>/admin/`.
pub const ADMIN_DIR: &str = "admin";
pub const ADMIN_CERT_FILE: &str = "admin.pem";
pub const ADMIN_KEY_FILE: &str = "admin-key.pem";
pub const WORKER_TOKEN_FILE: &str = "worker.token";
pub const MANAGER_TOKEN_FILE: &str = "manager.token";

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("security: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("security: {0}")]
    Ca(#[from] ca::CaError),
    #[error("security: join token: {0}")]
    Token(#[from] ca::TokenError),
    #[error("security: joining needs a manager join token (--token); ask an admin for `rctl cluster join-token manager`")]
    NoToken,
    #[error("security: joining via {addr}: {msg}")]
    Join { addr: String, msg: String },
    #[error(
        "security: this controller's certificate expired; restart it with --join \
         <a live controller> and RUDDER_JOIN_TOKEN=<manager token> to be re-admitted"
    )]
    Expired,
    #[error("security: writing {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// This controller's certificates, and — for the first controller of a new cluster — the
/// secrets to record in the store once it leads.
pub struct Bootstrap {
    pub certs: NodeCerts,
    pub initial: Option<ClusterSecrets>,
}

/// Loads this controller's certificates from `<data>/certs`, or makes them: a new cluster
/// (`join` is `None`) creates its CA; a joining controller asks `join` with `token`.
/// A certificate that expired while the controller was off (H5) is replaced: by the CA key
/// kept beside it (the first controller), else by re-joining through `rejoin_via` with
/// `token` and proof of the old key.
pub async fn controller_certs(
    data_dir: &Path,
    node_id: &str,
    join: Option<&str>,
    rejoin_via: Option<&str>,
    token: Option<&str>,
) -> Result<Bootstrap, SecurityError> {
    let dir = data_dir.join("certs");
    if let Some(certs) = NodeCerts::load_if_present(&dir)? {
        if certs.identity(SystemTime::now()).is_ok() {
            return Ok(Bootstrap {
                certs,
                initial: None,
            });
        }
        warn!("this controller's certificate expired while it was off; replacing it");
        let fresh = if let Some(ca) = certs.cluster_ca()? {
            let (key, csr) = ca::node_csr(node_id)?;
            let cert = ca.issue(
                &csr,
                Role::Manager,
                node_id,
                SystemTime::now(),
                NODE_CERT_VALIDITY,
            )?;
            NodeCerts::with_ca(&ca, &cert, &key)?
        } else {
            let (Some(addr), Some(token)) = (rejoin_via, token) else {
                return Err(SecurityError::Expired);
            };
            rudder_pki::join::rejoin_cluster(&format!("https://{addr}"), token, &certs)
                .await
                .map_err(|e| SecurityError::Join {
                    addr: addr.to_string(),
                    msg: e.to_string(),
                })?
        };
        fresh.save(&dir)?;
        return Ok(Bootstrap {
            certs: fresh,
            initial: None,
        });
    }
    match join {
        None => init_cluster(data_dir, &dir, node_id),
        Some(addr) => {
            let token = token.ok_or(SecurityError::NoToken)?;
            let certs = rudder_pki::join::join_cluster(&format!("https://{addr}"), token, node_id)
                .await
                .map_err(|e| SecurityError::Join {
                    addr: addr.to_string(),
                    msg: e.to_string(),
                })?;
            certs.save(&dir)?;
            Ok(Bootstrap {
                certs,
                initial: None,
            })
        }
    }
}

fn init_cluster(data_dir: &Path, dir: &Path, node_id: &str) -> Result<Bootstrap, SecurityError> {
    let now = SystemTime::now();
    let ca = ClusterCa::generate("rudder", now)?;
    let (key, csr) = ca::node_csr(node_id)?;
    let cert = ca.issue(&csr, Role::Manager, node_id, now, NODE_CERT_VALIDITY)?;
    let certs = NodeCerts::with_ca(&ca, &cert, &key)?;
    // The admin identity for rctl, and the tokens to hand out.
    let (admin_key, csr) = ca::node_csr("admin")?;
    let admin = ca.issue(&csr, Role::Admin, "admin", now, NODE_CERT_VALIDITY)?;
    let tokens = JoinTokens::generate(ca.fingerprint());
    let admin_dir = data_dir.join(ADMIN_DIR);
    std::fs::create_dir_all(&admin_dir).map_err(|e| SecurityError::Io(admin_dir.clone(), e))?;
    for (file, data, mode) in [
        (ca::CA_CERT_FILE, ca.cert_pem().to_string(), 0o644),
        (ADMIN_CERT_FILE, admin, 0o644),
        (ADMIN_KEY_FILE, admin_key, 0o600),
        (
            WORKER_TOKEN_FILE,
            tokens
                .token(Role::Worker)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            0o600,
        ),
        (
            MANAGER_TOKEN_FILE,
            tokens
                .token(Role::Manager)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            0o600,
        ),
    ] {
        ca::write_atomic(&admin_dir.join(file), data.as_bytes(), mode)?;
    }
    // The node's own files last: their presence means init is complete.
    certs.save(dir)?;
    info!(fingerprint = ca.fingerprint(), "created the cluster ca");
    let initial = ClusterSecrets {
        ca_cert_pem: ca.cert_pem().to_string(),
        ca_key_pem: ca.key_pem().to_string(),
        join_tokens: serde_json::to_value(&tokens).expect("join tokens serialize"),
    };
    Ok(Bootstrap {
        certs,
        initial: Some(initial),
    })
}

/// Records the first controller's CA and tokens in the store once it leads (only if no
/// secrets are there yet).
pub async fn record_initial_secrets(raft: RaftHandle, secrets: ClusterSecrets) {
    loop {
        if raft.store().secrets.is_some() {
            return;
        }
        match raft
            .propose(Command::SetSecrets {
                secrets: secrets.clone(),
                if_absent: true,
            })
            .await
        {
            Ok(()) => {
                info!("recorded the cluster ca and join tokens");
                return;
            }
            Err(e) => warn!(%e, "cluster secrets not recorded yet"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The CA and tokens from the replicated store.
pub struct RaftSecrets {
    pub raft: RaftHandle,
}

impl RaftSecrets {
    async fn current(&self) -> Result<ClusterSecrets, ClusterError> {
        // Fresh: a token rotated through another manager must be refused here at once.
        self.raft
            .read_index()
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        self.raft
            .store()
            .secrets
            .clone()
            .ok_or(ClusterError::NotInitialized)
    }

    fn tokens(s: &ClusterSecrets) -> Result<JoinTokens, ClusterError> {
        serde_json::from_value(s.join_tokens.clone())
            .map_err(|e| ClusterError::Unavailable(format!("stored join tokens: {e}")))
    }
}

#[async_trait::async_trait]
impl SecretsStore for RaftSecrets {
    async fn ca(&self) -> Result<CaSecrets, ClusterError> {
        let s = self.current().await?;
        Ok(CaSecrets {
            cert_pem: s.ca_cert_pem,
            key_pem: s.ca_key_pem,
        })
    }

    async fn join_tokens(&self) -> Result<JoinTokens, ClusterError> {
        Self::tokens(&self.current().await?)
    }

    async fn rotate_join_token(
        &self,
        role: Role,
        ttl: Option<Duration>,
    ) -> Result<Token, ClusterError> {
        let mut s = self.current().await?;
        let mut tokens = Self::tokens(&s)?;
        let token = tokens
            .rotate_with_ttl(role, ttl, SystemTime::now())
            .ok_or_else(|| ClusterError::NoTokenForRole(role.to_string()))?;
        s.join_tokens = serde_json::to_value(&tokens).expect("join tokens serialize");
        self.raft
            .propose(Command::SetSecrets {
                secrets: s,
                if_absent: false,
            })
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        Ok(token)
    }

    async fn standing(&self, id: &str) -> Result<Standing, ClusterError> {
        self.raft
            .read_index()
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        Ok(standing(&self.raft.store(), id))
    }

    async fn revoke(&self, id: &str, reason: &str) -> Result<(), ClusterError> {
        self.raft
            .propose(Command::Revoke {
                id: id.to_string(),
                reason: reason.to_string(),
                now: crate::now_ms(),
            })
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))
    }
}

/// Where identity `id` (a certificate CN) stands in `store`: `controller-<raft id>` is a member
/// while that id is in the controller group; any other id while a node of that id is registered.
pub fn standing(store: &rudder_model::Store, id: &str) -> Standing {
    if store.is_revoked(id) {
        return Standing::Revoked;
    }
    let member = match controller_raft_id(id) {
        Some(raft_id) => store.managers.contains_key(&raft_id),
        None => store.nodes.contains_key(id),
    };
    if member {
        Standing::Member
    } else {
        Standing::Unknown
    }
}

/// The raft id in a controller's certificate name (`controller-<raft id>`).
pub fn controller_raft_id(cn: &str) -> Option<u64> {
    cn.strip_prefix(CONTROLLER_PREFIX)?.parse().ok()
}

/// A controller's certificate name for `raft_id`.
pub fn controller_cn(raft_id: u64) -> String {
    format!("{CONTROLLER_PREFIX}{raft_id}")
}

/// The per-request check behind every guarded service: a revoked identity is refused at its
/// next request, whatever its certificate's validity (H4, L5).
pub fn not_revoked(raft: RaftHandle) -> tls::IdentityCheck {
    std::sync::Arc::new(move |id: &ca::PeerIdentity| {
        if raft.store().is_revoked(&id.node) {
            warn!(node = id.node, role = %id.role, "refused a revoked certificate");
            return Err(tonic::Status::permission_denied(format!(
                "{} was removed from the cluster: its certificates are revoked",
                id.node
            )));
        }
        Ok(())
    })
}

pub use crate::tls::{guard, guard_checked};

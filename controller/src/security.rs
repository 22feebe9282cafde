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
//! At rest, the CA key and the token secrets exist only inside the data-key encryption
//! ([`crate::crypt`]): in the raft log and snapshots, which [`crate::storage`] seals, and — on
//! the first controller, which needs its CA to re-issue its own expired certificate before raft
//! runs — in `certs/ca-key.sealed` ([`crypt::SEALED_CA_KEY_FILE`]), sealed with the same key (never `ca-key.pem` in clear; one
//! left by an earlier version is sealed and removed at start). The initial join tokens in
//! `admin/*.token` are a one-time hand-off to whoever set the cluster up (`rctl local up` reads
//! and deletes them); the controller deletes any left on its next start, after which
//! `rctl cluster join-token` is the way to get them. [`AtRest`] re-encrypts all of it after a
//! data key rotation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rudder_model::store::ClusterSecrets;
use rudder_model::Command;
use tracing::{info, warn};

use crate::ca::{self, ClusterCa, JoinTokens, Role, Token};
use crate::cluster_api::{
    CaSecrets, ClusterError, SecretsStore, Standing, CONTROLLER_PREFIX, NODE_CERT_VALIDITY,
};
use crate::crypt::{self, CryptError, DataKeys};
use crate::raft_node::RaftHandle;
use crate::storage::RedbStorage;
use crate::tls::{self, NodeCerts};

/// Autolock: keeps this controller's keyring file wrapped with the store's unlock key (or
/// unwrapped when there is none), rewriting it whenever that key changes.
pub async fn follow_autolock(raft: RaftHandle, keys: Arc<DataKeys>) {
    let mut store = raft.watch_store();
    loop {
        let want = store.borrow_and_update().unlock_key.clone();
        let kek = match want
            .as_ref()
            .map(|k| crypt::UnlockKey::parse(&k.0))
            .transpose()
        {
            Ok(k) => k,
            Err(e) => {
                warn!(%e, "autolock: the store's unlock key does not parse; keyring unchanged");
                if store.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        let on = kek.is_some();
        let k2 = keys.clone();
        match tokio::task::spawn_blocking(move || k2.set_unlock_key(kek)).await {
            Ok(Ok(true)) if on => info!("autolock: keyring wrapped with the unlock key"),
            Ok(Ok(true)) => info!("autolock: off; keyring unwrapped"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(%e, "autolock: rewriting the keyring"),
            Err(e) => warn!(%e, "autolock: keyring task"),
        }
        if store.changed().await.is_err() {
            return;
        }
    }
}

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
    #[error("security: {0}")]
    Crypt(#[from] CryptError),
    #[error("security: {0}")]
    Storage(#[from] crate::storage::StorageErr),
    #[error("security: join tokens: {0}")]
    Tokens(#[from] serde_json::Error),
}

/// The store's typed copy of the join tokens (`JoinTokenSecrets` has `JoinTokens`'s layout,
/// whose fields are private to the pki crate: the one conversion goes through that layout).
fn to_store(t: &JoinTokens) -> Result<rudder_model::store::JoinTokenSecrets, serde_json::Error> {
    serde_json::from_value(serde_json::to_value(t)?)
}

/// The join tokens the store records.
pub(crate) fn from_store(
    t: &rudder_model::store::JoinTokenSecrets,
) -> Result<JoinTokens, serde_json::Error> {
    serde_json::from_value(serde_json::to_value(t)?)
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
    keys: &DataKeys,
    node_id: &str,
    join: Option<&str>,
    rejoin_via: Option<&str>,
    token: Option<&str>,
) -> Result<Bootstrap, SecurityError> {
    let dir = data_dir.join("certs");
    if let Some(certs) = NodeCerts::load_if_present(&dir)? {
        let certs = seal_legacy_ca_key(&dir, keys, certs)?;
        remove_token_files(data_dir);
        if certs.identity(SystemTime::now()).is_ok() {
            return Ok(Bootstrap {
                certs,
                initial: None,
            });
        }
        warn!("this controller's certificate expired while it was off; replacing it");
        let fresh = if let Some(ca) = sealed_ca(&dir, keys, &certs)? {
            let (key, csr) = ca::node_csr(node_id)?;
            let cert = ca.issue(
                &csr,
                Role::Manager,
                node_id,
                SystemTime::now(),
                NODE_CERT_VALIDITY,
            )?;
            NodeCerts::new(ca.cert_pem(), &cert, &key, None)?
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
        None => init_cluster(data_dir, &dir, keys, node_id),
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

fn init_cluster(
    data_dir: &Path,
    dir: &Path,
    keys: &DataKeys,
    node_id: &str,
) -> Result<Bootstrap, SecurityError> {
    let now = SystemTime::now();
    let ca = ClusterCa::generate("rudder", now)?;
    let (key, csr) = ca::node_csr(node_id)?;
    let cert = ca.issue(&csr, Role::Manager, node_id, now, NODE_CERT_VALIDITY)?;
    // The CA key only sealed: the node's certificate files hold none.
    let certs = NodeCerts::new(ca.cert_pem(), &cert, &key, None)?;
    crypt::seal_ca_key(dir, keys, ca.key_pem())?;
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
        join_tokens: to_store(&tokens)?,
    };
    Ok(Bootstrap {
        certs,
        initial: Some(initial),
    })
}

/// A controller restored from a backup (`--restore`): its manager certificate `node_id` from
/// the restored CA (the key is in the backup's store secrets), the CA key sealed beside it, and
/// a fresh admin certificate in `<data>/admin/` so an operator can get back in. The join
/// tokens stay those of the store (`rctl cluster join-token`).
pub fn restore_certs(
    data_dir: &Path,
    keys: &DataKeys,
    node_id: &str,
    secrets: &ClusterSecrets,
) -> Result<NodeCerts, SecurityError> {
    let dir = data_dir.join("certs");
    std::fs::create_dir_all(&dir).map_err(|e| SecurityError::Io(dir.clone(), e))?;
    crate::storage::private_dir(&dir).map_err(|e| SecurityError::Io(dir.clone(), e))?;
    let now = SystemTime::now();
    let ca = ClusterCa::from_pem(&secrets.ca_cert_pem, &secrets.ca_key_pem)?;
    let (key, csr) = ca::node_csr(node_id)?;
    let cert = ca.issue(&csr, Role::Manager, node_id, now, NODE_CERT_VALIDITY)?;
    let certs = NodeCerts::new(ca.cert_pem(), &cert, &key, None)?;
    crypt::seal_ca_key(&dir, keys, ca.key_pem())?;
    let (admin_key, csr) = ca::node_csr("admin")?;
    let admin = ca.issue(&csr, Role::Admin, "admin", now, NODE_CERT_VALIDITY)?;
    let admin_dir = data_dir.join(ADMIN_DIR);
    std::fs::create_dir_all(&admin_dir).map_err(|e| SecurityError::Io(admin_dir.clone(), e))?;
    for (file, data, mode) in [
        (ca::CA_CERT_FILE, ca.cert_pem().to_string(), 0o644),
        (ADMIN_CERT_FILE, admin, 0o644),
        (ADMIN_KEY_FILE, admin_key, 0o600),
    ] {
        ca::write_atomic(&admin_dir.join(file), data.as_bytes(), mode)?;
    }
    certs.save(&dir)?;
    info!(
        fingerprint = ca.fingerprint(),
        node = node_id,
        "restored the cluster ca from a backup"
    );
    Ok(certs)
}

/// A certs dir from before the CA key was sealed: seals `ca-key.pem` into
/// [`SEALED_CA_KEY_FILE`] and removes it (by saving the certificates without the key).
fn seal_legacy_ca_key(
    dir: &Path,
    keys: &DataKeys,
    certs: NodeCerts,
) -> Result<NodeCerts, SecurityError> {
    let Some(ca) = certs.cluster_ca()? else {
        return Ok(certs);
    };
    crypt::seal_ca_key(dir, keys, ca.key_pem())?;
    let without = NodeCerts::new(ca.cert_pem(), certs.cert_pem(), certs.key_pem(), None)?;
    without.save(dir)?;
    info!("sealed the ca key with the data key and removed ca-key.pem");
    Ok(without)
}

/// The CA with its key from the sealed CA key file, if this controller keeps it.
fn sealed_ca(
    dir: &Path,
    keys: &DataKeys,
    certs: &NodeCerts,
) -> Result<Option<ClusterCa>, SecurityError> {
    match crypt::open_sealed_ca_key(dir, keys)? {
        Some(key) => Ok(Some(ClusterCa::from_pem(certs.ca().pem(), &key)?)),
        None => Ok(None),
    }
}

/// Deletes the initial join tokens the first controller handed out in `admin/` (they are in
/// the store; `rctl cluster join-token` reads them from there).
fn remove_token_files(data_dir: &Path) {
    for f in [WORKER_TOKEN_FILE, MANAGER_TOKEN_FILE] {
        let p = data_dir.join(ADMIN_DIR).join(f);
        match std::fs::remove_file(&p) {
            Ok(()) => info!(file = %p.display(), "removed the initial join token file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %p.display(), %e, "initial join token file not removed"),
        }
    }
}

/// The controller's data at rest: its log and sealed CA key, and the keyring they are sealed
/// with. [`AtRest::rotate`] makes a new data key; [`AtRest::reencrypt`] then rewrites every
/// record under it and retires the old key.
pub struct AtRest {
    pub storage: RedbStorage,
    pub keys: Arc<DataKeys>,
    pub certs_dir: PathBuf,
    /// One re-encryption pass at a time.
    pass: tokio::sync::Mutex<()>,
}

/// How often a pass is repeated when records written with the old key raced it.
const REENCRYPT_ROUNDS: usize = 10;

impl AtRest {
    pub fn new(storage: RedbStorage, keys: Arc<DataKeys>, certs_dir: PathBuf) -> Arc<Self> {
        Arc::new(AtRest {
            storage,
            keys,
            certs_dir,
            pass: Default::default(),
        })
    }

    /// Makes a new data key (refused while a previous rotation is still re-encrypting) and
    /// re-encrypts in the background; `wait`: until that finished. Returns the new key's id and
    /// whether the old key is deleted yet.
    pub async fn rotate(self: &Arc<Self>, wait: bool) -> Result<(u32, bool), CryptError> {
        let id = self.keys.rotate()?;
        let pass = tokio::spawn(self.clone().reencrypt());
        if wait {
            let _ = pass.await;
        }
        Ok((id, self.keys.previous_ids().is_empty()))
    }

    /// Rewrites every record not under the current key (plaintext from before encryption, or
    /// an older key), then retires the older keys. Run at start (an upgrade, or a rotation a
    /// restart interrupted) and after each rotation.
    pub async fn reencrypt(self: Arc<Self>) {
        let _pass = self.pass.lock().await;
        let me = self.clone();
        let r = tokio::task::spawn_blocking(move || me.reencrypt_blocking()).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(%e, "data key re-encryption failed; the old key is kept"),
            Err(e) => warn!(%e, "data key re-encryption task failed"),
        }
    }

    fn reencrypt_blocking(&self) -> Result<(), SecurityError> {
        for _ in 0..REENCRYPT_ROUNDS {
            let done = self.storage.reencrypt()?;
            let ca = crypt::reseal_ca_key(&self.certs_dir, &self.keys)?;
            if done.entries > 0 || done.snapshot || ca {
                info!(
                    entries = done.entries,
                    snapshot = done.snapshot,
                    ca_key = ca,
                    key = self.keys.current_id(),
                    "re-encrypted records under the current data key"
                );
            }
            let stale = self.storage.stale_records()?;
            if stale == 0 {
                let retired = self.keys.retire()?;
                if !retired.is_empty() {
                    info!(
                        ?retired,
                        key = self.keys.current_id(),
                        "retired the old data keys"
                    );
                }
                return Ok(());
            }
        }
        warn!("records under an old data key remain; it is kept until the next pass");
        Ok(())
    }
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
        from_store(&s.join_tokens)
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
        s.join_tokens = to_store(&tokens)
            .map_err(|e| ClusterError::Unavailable(format!("join tokens: {e}")))?;
        // The new token, and the end of every identity the old one admitted that never
        // registered (a certificate minted with a leaked token dies with it).
        self.raft
            .propose(Command::Batch(vec![
                Command::SetSecrets {
                    secrets: s,
                    if_absent: false,
                },
                Command::RevokeAdmitted {
                    role: role.to_string(),
                    now: crate::now_ms(),
                },
            ]))
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        Ok(token)
    }

    async fn standing(&self, role: Role, id: &str) -> Result<Standing, ClusterError> {
        self.raft
            .read_index()
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        Ok(standing(&self.raft.store(), role, id))
    }

    async fn admit(&self, role: Role, id: &str) -> Result<(), ClusterError> {
        self.raft
            .propose(Command::Admit {
                role: role.to_string(),
                id: id.to_string(),
                now: crate::now_ms(),
            })
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))
    }

    async fn revoke(&self, role: Role, id: &str, reason: &str) -> Result<(), ClusterError> {
        self.raft
            .propose(Command::Revoke {
                id: rudder_model::store::identity_key(role.as_str(), id),
                reason: reason.to_string(),
                now: crate::now_ms(),
            })
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))
    }
}

/// Where identity `id` (a certificate CN) of `role` stands in `store`: `controller-<raft id>`
/// is a member while that id is in the controller group; a worker or manager node id while a
/// node of that id is registered; any, while a join token's admission of it waits.
pub fn standing(store: &rudder_model::Store, role: Role, id: &str) -> Standing {
    if store.is_revoked(role.as_str(), id) {
        return Standing::Revoked;
    }
    let member = match (role, controller_raft_id(id)) {
        (Role::Manager, Some(raft_id)) => store.managers.contains_key(&raft_id),
        // Another node's hostname counts as taken too: commands find a node by id or by
        // hostname, and an id that is someone's hostname would answer for it.
        (Role::Worker | Role::Manager, _) => {
            store.nodes.contains_key(id) || store.nodes.values().any(|n| n.hostname == id)
        }
        (Role::Admin, _) => false,
    };
    if member {
        Standing::Member
    } else if store
        .admitted
        .contains_key(&rudder_model::store::identity_key(role.as_str(), id))
    {
        Standing::Admitted
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
        if raft.store().is_revoked(id.role.as_str(), &id.node) {
            warn!(node = id.node, role = %id.role, "refused a revoked certificate");
            return Err(tonic::Status::permission_denied(format!(
                "{} was removed from the cluster: its certificates are revoked",
                id.node
            )));
        }
        Ok(())
    })
}

pub use crate::tls::guard_checked;

#[cfg(test)]
mod at_rest_tests {
    use super::*;

    /// Files under `dir` holding `needle`, relative to `dir`.
    fn holding(dir: &Path, needle: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(
                    holding(&p, needle)
                        .into_iter()
                        .map(|r| format!("{}/{r}", p.file_name().unwrap().to_string_lossy())),
                );
            } else if std::fs::read(&p)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                out.push(p.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
        out.sort();
        out
    }

    /// Replaces the node certificate in `certs` with one that expired yesterday.
    fn expire(certs: &Path, ca: &ClusterCa) {
        let (key, csr) = ca::node_csr("controller-1").unwrap();
        let past = SystemTime::now() - Duration::from_secs(3 * 86400);
        let cert = ca
            .issue(
                &csr,
                Role::Manager,
                "controller-1",
                past,
                Duration::from_secs(86400),
            )
            .unwrap();
        NodeCerts::new(ca.cert_pem(), &cert, &key, None)
            .unwrap()
            .save(certs)
            .unwrap();
    }

    #[tokio::test]
    async fn the_first_controller_keeps_its_ca_key_only_sealed_and_reissues_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        crate::storage::prepare_data_dir(&data).unwrap();
        let certs = data.join("certs");
        let keys = DataKeys::load_or_create(&certs).unwrap();
        let boot = controller_certs(&data, &keys, "controller-1", None, None, None)
            .await
            .unwrap();
        assert!(boot.initial.is_some());
        assert!(!certs.join(ca::CA_KEY_FILE).exists());
        assert!(certs.join(crypt::SEALED_CA_KEY_FILE).exists());
        assert_eq!(
            holding(&data, b"PRIVATE KEY"),
            ["admin/admin-key.pem", "certs/node-key.pem"]
        );
        // The token files are there for the first rctl only.
        assert!(data.join(ADMIN_DIR).join(WORKER_TOKEN_FILE).exists());

        // Off longer than its certificate: re-issued with the sealed CA key.
        let ca = crypt::load_sealed_ca(&certs).unwrap().unwrap();
        expire(&certs, &ca);
        let boot = controller_certs(&data, &keys, "controller-1", None, None, None)
            .await
            .unwrap();
        assert!(boot.certs.identity(SystemTime::now()).is_ok());
        assert!(!data.join(ADMIN_DIR).join(WORKER_TOKEN_FILE).exists());
        assert!(!data.join(ADMIN_DIR).join(MANAGER_TOKEN_FILE).exists());
        assert!(!certs.join(ca::CA_KEY_FILE).exists());

        // Without its data key the sealed CA key is useless: the restart cannot re-issue.
        expire(&certs, &ca);
        let other = DataKeys::ephemeral().unwrap();
        let err = controller_certs(&data, &other, "controller-1", None, None, None)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("ca-key.sealed"), "{err}");
    }

    #[tokio::test]
    async fn a_ca_key_left_in_clear_by_an_earlier_version_is_sealed_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        crate::storage::prepare_data_dir(&data).unwrap();
        let certs = data.join("certs");
        let ca = ClusterCa::generate("old", SystemTime::now()).unwrap();
        let (key, csr) = ca::node_csr("controller-1").unwrap();
        let cert = ca
            .issue(
                &csr,
                Role::Manager,
                "controller-1",
                SystemTime::now(),
                NODE_CERT_VALIDITY,
            )
            .unwrap();
        NodeCerts::with_ca(&ca, &cert, &key)
            .unwrap()
            .save(&certs)
            .unwrap();
        assert!(certs.join(ca::CA_KEY_FILE).exists());
        let keys = DataKeys::load_or_create(&certs).unwrap();
        controller_certs(&data, &keys, "controller-1", None, None, None)
            .await
            .unwrap();
        assert!(!certs.join(ca::CA_KEY_FILE).exists());
        assert_eq!(holding(&data, b"PRIVATE KEY"), ["certs/node-key.pem"]);
        let sealed = crypt::load_sealed_ca(&certs).unwrap().unwrap();
        assert_eq!(sealed.key_pem(), ca.key_pem());
    }
}

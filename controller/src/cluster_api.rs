//! The Cluster service: nodes join with a join token and a CSR, admins read and rotate join
//! tokens, and nodes renew their certificates (DESIGN.md §3 "CA and tokens").
//!
//! Invariants:
//! - `Join` is the only RPC served to a caller without a client certificate (see
//!   [`crate::tls`]); it is authorized by the join token alone, and the role it grants is the
//!   token's. Nothing in the request chooses the role.
//! - `Renew` reissues the role and node id of the certificate the caller presented; the CSR
//!   contributes only its public key.
//! - `JoinToken` is for admin certificates only.
//! - The CA key and the join tokens live behind [`SecretsStore`], so that every manager serves
//!   the same CA and a rotated token stops working on all of them.
//! - Certificates are issued at the wall clock (`SystemTime::now()`): TLS checks validity
//!   against it too.

use std::fmt;
use std::sync::Arc;
#[cfg(test)]
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rudder_proto::v1::cluster_server::Cluster;
use rudder_proto::v1::{
    AdminCertRequest, AdminCertResponse, JoinRequest, JoinResponse, JoinTokenRequest,
    JoinTokenResponse, RenewRequest, RenewResponse,
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::ca::{CaError, ClusterCa, JoinTokens, Role, Token, TokenError};
use crate::tls::authorize;

/// Lifetime of a node certificate issued by `Join` or `Renew`; nodes renew at 50–80 % of it
/// ([`crate::ca::renew_at`]).
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Longest lifetime `rctl cluster admin-cert --ttl` may ask for.
pub const MAX_ADMIN_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Controllers' certificates are named `controller-<raft id>`.
pub const CONTROLLER_PREFIX: &str = "controller-";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cluster: malformed join token ({0}); pass the whole RDR1-... token printed by \
         `rctl cluster join-token <role>`"
    )]
    TokenMalformed(&'static str),
    #[error(
        "cluster: the join token is for another cluster (its ca fingerprint is not this \
         cluster's); check the controller address, or ask this cluster's admin for \
         `rctl cluster join-token <role>`"
    )]
    TokenOtherCluster,
    #[error(
        "cluster: the join token is not valid here: it was rotated or never existed; ask an \
         admin for a current one with `rctl cluster join-token worker` (or `manager`)"
    )]
    TokenRejected,
    #[error(
        "cluster: the {0} join token expired; ask an admin for a current one with \
         `rctl cluster join-token {0}`"
    )]
    TokenExpired(Role),
    #[error("cluster: role: no join token for role {0}: want worker or manager")]
    NoTokenForRole(String),
    #[error("cluster: invalid certificate request: {0}")]
    BadCsr(CaError),
    #[error("cluster: invalid node id: {0}")]
    BadNodeId(CaError),
    #[error("cluster: ca: {0}")]
    Ca(CaError),
    #[error("cluster: the cluster ca is not initialized yet")]
    NotInitialized,
    #[error("cluster: secrets store unavailable: {0}")]
    Unavailable(String),
    #[error(
        "cluster: {0} was removed from the cluster and its certificates are revoked; a \
         removed node cannot come back under the same id (delete the node's data dir to \
         join as a new node)"
    )]
    Revoked(String),
    #[error(
        "cluster: node id {0} belongs to a node of this cluster already; only that node can \
         be re-admitted under it (with its old certificate and key)"
    )]
    IdTaken(String),
    #[error("cluster: re-admission of {id} refused: {why}")]
    BadPrevious { id: String, why: String },
    #[error("cluster: {0}")]
    Reserved(String),
    #[error("cluster: {0} is not a node of this cluster (removed?); join again with a join token")]
    NotMember(String),
    #[error(
        "cluster: a {0} join token cannot issue a manager certificate; join with a manager \
         token (`rctl cluster join-token manager`)"
    )]
    RoleAboveToken(Role),
}

impl From<TokenError> for ClusterError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Malformed(why) => ClusterError::TokenMalformed(why),
            TokenError::WrongCa => ClusterError::TokenOtherCluster,
            TokenError::Unknown => ClusterError::TokenRejected,
            TokenError::Expired(r) => ClusterError::TokenExpired(r),
        }
    }
}

impl From<CaError> for ClusterError {
    fn from(e: CaError) -> Self {
        match e {
            CaError::Csr(_) | CaError::Pem(_) => ClusterError::BadCsr(e),
            CaError::NodeId(_) => ClusterError::BadNodeId(e),
            CaError::Token(t) => t.into(),
            other => ClusterError::Ca(other),
        }
    }
}

impl From<ClusterError> for Status {
    fn from(e: ClusterError) -> Status {
        let msg = e.to_string();
        match e {
            ClusterError::TokenMalformed(_)
            | ClusterError::NoTokenForRole(_)
            | ClusterError::BadCsr(_)
            | ClusterError::BadNodeId(_) => Status::invalid_argument(msg),
            ClusterError::TokenOtherCluster
            | ClusterError::TokenRejected
            | ClusterError::TokenExpired(_) => Status::unauthenticated(msg),
            ClusterError::NotInitialized => Status::failed_precondition(msg),
            ClusterError::Revoked(_)
            | ClusterError::IdTaken(_)
            | ClusterError::BadPrevious { .. }
            | ClusterError::NotMember(_)
            | ClusterError::RoleAboveToken(_) => Status::permission_denied(msg),
            ClusterError::Reserved(_) => Status::invalid_argument(msg),
            ClusterError::Unavailable(_) => Status::unavailable(msg),
            ClusterError::Ca(_) => Status::internal(msg),
        }
    }
}

/// The cluster CA's certificate and signing key, both PEM.
#[derive(Clone)]
pub struct CaSecrets {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CaSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("CaSecrets").finish_non_exhaustive()
    }
}

impl From<&ClusterCa> for CaSecrets {
    fn from(ca: &ClusterCa) -> Self {
        CaSecrets {
            cert_pem: ca.cert_pem().to_owned(),
            key_pem: ca.key_pem().to_owned(),
        }
    }
}

/// The cluster secrets the Cluster service needs, shared by all managers.
///
/// The Raft-backed implementation keeps the CA (certificate and key PEM) and the
/// [`JoinTokens`] in the replicated store, written once at cluster init:
/// - `ca` and `join_tokens` read the applied store after a `read_index()`, so that a token
///   rotated through another manager is refused here at once; before init they return
///   [`ClusterError::NotInitialized`].
/// - `rotate_join_token` runs on the leader: it copies the current tokens, calls
///   [`JoinTokens::rotate`] (the new secret is drawn there, so applying the command stays
///   pure), proposes the whole `JoinTokens`, and returns the new token only once the proposal
///   has applied. On a follower, and when raft fails or times out, it returns
///   [`ClusterError::Unavailable`] saying which manager leads.
/// - The key and the token secrets are secrets: they go into the log and snapshots only
///   encrypted (DESIGN.md §3 "Secrets") and are never logged.
#[async_trait::async_trait]
pub trait SecretsStore: Send + Sync + 'static {
    /// The cluster CA with its signing key.
    async fn ca(&self) -> Result<CaSecrets, ClusterError>;
    /// The current join tokens.
    async fn join_tokens(&self) -> Result<JoinTokens, ClusterError>;
    /// Replaces `role`'s join token everywhere and returns the new one; the old one stops
    /// working. `role` is worker or manager.
    /// `ttl`: the new token admits only for that long (none: until rotated again).
    async fn rotate_join_token(
        &self,
        role: Role,
        ttl: Option<Duration>,
    ) -> Result<Token, ClusterError>;
    /// Where the identity `id` (a certificate CN) of `role` stands in the cluster, freshly read.
    async fn standing(&self, role: Role, id: &str) -> Result<Standing, ClusterError>;
    /// Records that a join token admitted `id` as `role` (before its certificate is issued):
    /// rotating that token revokes it unless it registered by then.
    async fn admit(&self, role: Role, id: &str) -> Result<(), ClusterError>;
    /// Revokes `id` of `role` for good: refused at every request from now on, never issued
    /// again.
    async fn revoke(&self, role: Role, id: &str, reason: &str) -> Result<(), ClusterError>;
}

/// Where a certificate identity stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Never seen: a join may take it.
    Unknown,
    /// Issued by a join token, not yet registered: it may hold sessions and renew; a join may
    /// issue it again (its holder lost the reply).
    Admitted,
    /// A node or controller of the cluster: only the holder of its key may take it again.
    Member,
    /// Removed: refused everywhere, never issued again.
    Revoked,
}

/// Secrets held in this process only: for tests and single-process harnesses. Nothing
/// survives a restart and other managers do not see rotations.
#[cfg(test)]
pub struct MemorySecrets {
    ca: CaSecrets,
    tokens: Mutex<JoinTokens>,
    /// Identities that count as members, the admitted and the revoked ones (`role:cn`).
    members: Mutex<std::collections::BTreeSet<String>>,
    admitted: Mutex<std::collections::BTreeSet<String>>,
    revoked: Mutex<std::collections::BTreeSet<String>>,
}

#[cfg(test)]
impl MemorySecrets {
    /// Holds `ca` and fresh join tokens for it.
    pub fn new(ca: &ClusterCa) -> Self {
        MemorySecrets {
            ca: ca.into(),
            tokens: Mutex::new(JoinTokens::generate(ca.fingerprint())),
            members: Default::default(),
            admitted: Default::default(),
            revoked: Default::default(),
        }
    }

    /// Records `id` as a member (what registering does in a real cluster), of any role.
    pub fn add_member(&self, id: &str) {
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        for role in Role::ALL {
            m.insert(rudder_model::store::identity_key(role.as_str(), id));
        }
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, JoinTokens> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
#[cfg(test)]
impl SecretsStore for MemorySecrets {
    async fn ca(&self) -> Result<CaSecrets, ClusterError> {
        Ok(self.ca.clone())
    }

    async fn join_tokens(&self) -> Result<JoinTokens, ClusterError> {
        Ok(self.tokens().clone())
    }

    async fn rotate_join_token(
        &self,
        role: Role,
        ttl: Option<Duration>,
    ) -> Result<Token, ClusterError> {
        self.tokens()
            .rotate_with_ttl(role, ttl, SystemTime::now())
            .ok_or_else(|| ClusterError::NoTokenForRole(role.to_string()))
    }

    async fn standing(&self, role: Role, id: &str) -> Result<Standing, ClusterError> {
        let key = rudder_model::store::identity_key(role.as_str(), id);
        let has = |m: &Mutex<std::collections::BTreeSet<String>>| {
            m.lock().unwrap_or_else(|p| p.into_inner()).contains(&key)
        };
        Ok(if has(&self.revoked) {
            Standing::Revoked
        } else if has(&self.members) {
            Standing::Member
        } else if has(&self.admitted) {
            Standing::Admitted
        } else {
            Standing::Unknown
        })
    }

    async fn admit(&self, role: Role, id: &str) -> Result<(), ClusterError> {
        self.admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rudder_model::store::identity_key(role.as_str(), id));
        Ok(())
    }

    async fn revoke(&self, role: Role, id: &str, _reason: &str) -> Result<(), ClusterError> {
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rudder_model::store::identity_key(role.as_str(), id));
        Ok(())
    }
}

/// The Cluster gRPC service. Serve it behind [`crate::tls::server_tls`].
pub struct ClusterApi {
    secrets: Arc<dyn SecretsStore>,
    validity: Duration,
    /// This controller's copy of the CA certificate: callers and tokens are checked against it
    /// before anything costs a raft read or a CA key parse (L9).
    local_ca: Option<crate::ca::CaCert>,
}

impl ClusterApi {
    pub fn new(secrets: Arc<dyn SecretsStore>) -> Self {
        ClusterApi {
            secrets,
            validity: NODE_CERT_VALIDITY,
            local_ca: None,
        }
    }

    /// Checks certificates and token fingerprints against `ca` first, so that a caller
    /// without a valid certificate or token costs no raft read (L9).
    pub fn with_local_ca(mut self, ca: crate::ca::CaCert) -> Self {
        self.local_ca = Some(ca);
        self
    }

    /// The admin behind `req`: a certificate of this cluster's CA (checked against the local
    /// copy first, then the store's), of an admin identity that is not revoked.
    async fn admin_caller<T: Send + Sync>(
        &self,
        req: &Request<T>,
        rpc: &str,
    ) -> Result<String, Status> {
        self.precheck(req, &[Role::Admin], rpc)?;
        let ca = self.cluster_ca().await?;
        let admin = authorize(req, ca.cert(), &[Role::Admin], rpc)?.node;
        if self.secrets.standing(Role::Admin, &admin).await? == Standing::Revoked {
            return Err(log_refusal(rpc, ClusterError::Revoked(admin)));
        }
        Ok(admin)
    }

    /// The cheap checks before the store is read: the caller's certificate against the local
    /// copy of the CA.
    fn precheck<T>(&self, req: &Request<T>, roles: &[Role], rpc: &str) -> Result<(), Status> {
        match &self.local_ca {
            Some(ca) => authorize(req, ca, roles, rpc).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Issues certificates valid for `validity` instead of [`NODE_CERT_VALIDITY`].
    pub fn with_validity(mut self, validity: Duration) -> Self {
        self.validity = validity;
        self
    }

    async fn cluster_ca(&self) -> Result<ClusterCa, ClusterError> {
        let s = self.secrets.ca().await?;
        Ok(ClusterCa::from_pem(&s.cert_pem, &s.key_pem)?)
    }

    async fn admit(&self, req: JoinRequest) -> Result<JoinResponse, ClusterError> {
        // A malformed token or one of another cluster is refused before any raft read.
        if let Some(local) = &self.local_ca {
            let t = Token::parse(&req.token)?;
            if t.fingerprint != local.fingerprint() {
                return Err(ClusterError::TokenOtherCluster);
            }
        }
        let token_role = self
            .secrets
            .join_tokens()
            .await?
            .verify_at(&req.token, SystemTime::now())?;
        let role = issued_role(token_role, req.role())?;
        let ca = self.cluster_ca().await?;
        let id = req.node_id.as_str();
        // Controllers are `controller-<raft id>`: only a manager token names one.
        if id.starts_with(CONTROLLER_PREFIX) && role != Role::Manager {
            return Err(ClusterError::Reserved(format!(
                "node ids starting with {CONTROLLER_PREFIX:?} are for controllers (a manager \
                 join token)"
            )));
        }
        // A node id is whoever first registered it: another join may not take it over (C1).
        match self.secrets.standing(role, id).await? {
            Standing::Revoked => return Err(ClusterError::Revoked(id.to_string())),
            Standing::Unknown | Standing::Admitted => {}
            Standing::Member => {
                if req.previous_cert_pem.is_empty() {
                    return Err(ClusterError::IdTaken(id.to_string()));
                }
                let bad = |why: String| ClusterError::BadPrevious {
                    id: id.to_string(),
                    why,
                };
                let prev = crate::ca::previous_identity(&req.previous_cert_pem, ca.cert())
                    .map_err(|e| bad(e.to_string()))?;
                if prev.node != id {
                    return Err(bad(format!("the old certificate is for {}", prev.node)));
                }
                if !crate::ca::csr_has_key_of(&req.csr_pem, &req.previous_cert_pem)? {
                    return Err(bad(
                        "the request is not signed with the old certificate's key".into(),
                    ));
                }
                info!(node = id, %role, "cluster: node re-admitted with its old key");
            }
        }
        // Recorded before the certificate exists: a rotation of this token revokes it unless
        // it registers first (a certificate minted with a leaked token cannot be kept for later).
        self.secrets.admit(role, id).await?;
        let cert_pem = ca.issue(&req.csr_pem, role, id, SystemTime::now(), self.validity)?;
        info!(node = id, %role, "cluster: node joined");
        Ok(JoinResponse {
            cert_pem,
            ca_pem: ca.cert_pem().to_owned(),
            role: proto_role(role).into(),
            token_role: proto_role(token_role).into(),
        })
    }

    /// A certificate for another admin identity, or its revocation (`rctl cluster admin-cert`).
    async fn admin_cert_for(
        &self,
        caller: &str,
        req: AdminCertRequest,
    ) -> Result<AdminCertResponse, ClusterError> {
        let name = req.name.as_str();
        if name.starts_with(CONTROLLER_PREFIX) {
            return Err(ClusterError::Reserved(format!(
                "admin names may not start with {CONTROLLER_PREFIX:?}"
            )));
        }
        let ca = self.cluster_ca().await?;
        if req.revoke {
            if name == caller {
                return Err(ClusterError::Reserved(format!(
                    "{name} is the identity making this call: revoke it with another admin \
                     identity, so the cluster keeps one"
                )));
            }
            self.secrets
                .revoke(
                    Role::Admin,
                    name,
                    &format!("admin identity revoked by {caller}"),
                )
                .await?;
            warn!(admin = name, by = caller, "cluster: admin identity revoked");
            return Ok(AdminCertResponse {
                cert_pem: String::new(),
                ca_pem: ca.cert_pem().to_owned(),
            });
        }
        match self.secrets.standing(Role::Admin, name).await? {
            Standing::Revoked => return Err(ClusterError::Revoked(name.to_string())),
            Standing::Member | Standing::Admitted => {
                return Err(ClusterError::IdTaken(name.to_string()))
            }
            Standing::Unknown => {}
        }
        let ttl = match req.ttl_seconds {
            0 => self.validity,
            s => Duration::from_secs(s).min(MAX_ADMIN_VALIDITY),
        };
        // Recorded, so the name is not issued twice (and a revocation names one holder).
        self.secrets.admit(Role::Admin, name).await?;
        let cert_pem = ca.issue(&req.csr_pem, Role::Admin, name, SystemTime::now(), ttl)?;
        info!(
            admin = name,
            by = caller,
            ?ttl,
            "cluster: issued an admin certificate"
        );
        Ok(AdminCertResponse {
            cert_pem,
            ca_pem: ca.cert_pem().to_owned(),
        })
    }

    async fn token_for(&self, req: JoinTokenRequest) -> Result<JoinTokenResponse, ClusterError> {
        let role = match rudder_proto::v1::NodeRole::try_from(req.role) {
            Ok(rudder_proto::v1::NodeRole::Worker) => Role::Worker,
            Ok(rudder_proto::v1::NodeRole::Manager) => Role::Manager,
            Ok(other) => return Err(ClusterError::NoTokenForRole(other.as_str_name().into())),
            Err(_) => return Err(ClusterError::NoTokenForRole(req.role.to_string())),
        };
        let token = if req.rotate {
            let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds));
            self.secrets.rotate_join_token(role, ttl).await?
        } else {
            self.secrets
                .join_tokens()
                .await?
                .token(role)
                .ok_or_else(|| ClusterError::NoTokenForRole(role.to_string()))?
        };
        Ok(JoinTokenResponse {
            token: token.to_string(),
        })
    }
}

/// The role a join's certificate carries: the token's, or a lesser one the node asked for (a
/// manager host's agent asks for a worker certificate, because controllers dial agents as
/// workers). Asking for more than the token gives is refused.
fn issued_role(token: Role, asked: rudder_proto::v1::NodeRole) -> Result<Role, ClusterError> {
    use rudder_proto::v1::NodeRole;
    match (token, asked) {
        (_, NodeRole::Unspecified) => Ok(token),
        (Role::Manager | Role::Worker, NodeRole::Worker) => Ok(Role::Worker),
        (Role::Manager, NodeRole::Manager) => Ok(Role::Manager),
        (_, NodeRole::Manager | NodeRole::Worker) => Err(ClusterError::RoleAboveToken(token)),
    }
}

fn proto_role(role: Role) -> rudder_proto::v1::NodeRole {
    match role {
        Role::Manager => rudder_proto::v1::NodeRole::Manager,
        _ => rudder_proto::v1::NodeRole::Worker,
    }
}

fn log_refusal(rpc: &str, e: ClusterError) -> Status {
    warn!(rpc, err = %e, "cluster: refused");
    e.into()
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        self.admit(req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| log_refusal("Cluster/Join", e))
    }

    async fn join_token(
        &self,
        req: Request<JoinTokenRequest>,
    ) -> Result<Response<JoinTokenResponse>, Status> {
        const RPC: &str = "Cluster/JoinToken";
        let admin = self.admin_caller(&req, RPC).await?;
        let req = req.into_inner();
        info!(
            admin,
            role = ?rudder_proto::v1::NodeRole::try_from(req.role),
            rotate = req.rotate,
            "cluster: join token"
        );
        self.token_for(req)
            .await
            .map(Response::new)
            .map_err(|e| log_refusal(RPC, e))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        const RPC: &str = "Cluster/Renew";
        self.precheck(&req, &Role::ALL, RPC)?;
        let ca = self.cluster_ca().await?;
        let caller = authorize(&req, ca.cert(), &Role::ALL, RPC)?;
        // A renewal keeps the lifetime the identity was given (an admin certificate made
        // for 30 s stays a 30 s one), never more than the cluster's.
        let validity = caller.lifetime().min(self.validity);
        let crate::ca::PeerIdentity { role, node, .. } = caller;
        // Only identities that are still part of the cluster renew (H4): a removed node, a
        // removed controller or a revoked admin gets nothing more.
        let standing = self
            .secrets
            .standing(role, &node)
            .await
            .map_err(|e| log_refusal(RPC, e))?;
        match (standing, role) {
            (Standing::Revoked, _) => return Err(log_refusal(RPC, ClusterError::Revoked(node))),
            (Standing::Unknown, Role::Worker | Role::Manager) => {
                return Err(log_refusal(RPC, ClusterError::NotMember(node)))
            }
            _ => {}
        }
        let cert_pem = ca
            .issue(
                &req.get_ref().csr_pem,
                role,
                &node,
                SystemTime::now(),
                validity,
            )
            .map_err(|e| log_refusal(RPC, e.into()))?;
        info!(node, %role, "cluster: renewed node certificate");
        Ok(Response::new(RenewResponse { cert_pem }))
    }
    async fn admin_cert(
        &self,
        req: Request<AdminCertRequest>,
    ) -> Result<Response<AdminCertResponse>, Status> {
        const RPC: &str = "Cluster/AdminCert";
        let caller = self.admin_caller(&req, RPC).await?;
        self.admin_cert_for(&caller, req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| log_refusal(RPC, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{cert_validity, node_csr, peer_role, verify_ca_pin};
    use crate::tls::{client_tls, client_tls_pinned, join_endpoint, server_tls, NodeCerts};
    use rudder_proto::v1::cluster_client::ClusterClient;
    use rudder_proto::v1::cluster_server::ClusterServer;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use std::net::SocketAddr;
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Server};
    use tonic::Code;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// A controller (manager "m1") serving the Cluster service over mutual TLS on 127.0.0.1.
    struct Harness {
        ca: ClusterCa,
        secrets: Arc<MemorySecrets>,
        addr: SocketAddr,
    }

    impl Harness {
        async fn start() -> Harness {
            let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
            let (cert, key) = issue(&ca, Role::Manager, "m1");
            let certs = NodeCerts::with_ca(&ca, &cert, &key).unwrap();
            let secrets = Arc::new(MemorySecrets::new(&ca));
            let addr = serve(&certs, secrets.clone()).await;
            Harness { ca, secrets, addr }
        }

        fn endpoint(&self) -> Endpoint {
            Endpoint::from_shared(format!("https://{}", self.addr)).unwrap()
        }

        fn token(&self, role: Role) -> String {
            self.secrets
                .tokens()
                .token(role)
                .expect("worker and manager have tokens")
                .to_string()
        }

        /// A client presenting a certificate of `role` issued by this cluster's CA.
        async fn client_as(&self, role: Role, id: &str) -> ClusterClient<Channel> {
            let (cert, key) = issue(&self.ca, role, id);
            let certs = NodeCerts::new(self.ca.cert_pem(), &cert, &key, None).unwrap();
            self.client(client_tls(&certs, Role::Manager))
                .await
                .unwrap()
        }

        async fn client(
            &self,
            tls: ClientTlsConfig,
        ) -> Result<ClusterClient<Channel>, tonic::transport::Error> {
            let channel = self.endpoint().tls_config(tls)?.connect().await?;
            Ok(ClusterClient::new(channel))
        }
    }

    async fn serve(certs: &NodeCerts, secrets: Arc<MemorySecrets>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::builder()
            .tls_config(server_tls(certs))
            .unwrap()
            .add_service(ClusterServer::new(ClusterApi::new(secrets)))
            .serve_with_incoming(TcpIncoming::from(listener));
        tokio::spawn(server);
        addr
    }

    fn issue(ca: &ClusterCa, role: Role, id: &str) -> (String, String) {
        let (key, csr) = node_csr(id).unwrap();
        let cert = ca.issue(&csr, role, id, SystemTime::now(), DAY).unwrap();
        (cert, key)
    }

    fn identity(ca: &ClusterCa, cert_pem: &str) -> (Role, String) {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        peer_role(&der, ca.cert(), SystemTime::now()).unwrap()
    }

    fn join_req(token: &str, csr_pem: &str, node_id: &str) -> JoinRequest {
        JoinRequest {
            token: token.to_string(),
            csr_pem: csr_pem.to_string(),
            node_id: node_id.to_string(),
            previous_cert_pem: String::new(),
            role: 0,
        }
    }

    /// Joins over a connection that pins the CA by the token's fingerprint, as a new node does.
    async fn join_pinned(
        h: &Harness,
        token: &str,
        node_id: &str,
    ) -> Result<(NodeCerts, i32), Status> {
        let pin = Token::parse(token).unwrap();
        let channel = join_endpoint(h.endpoint(), &pin)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (key, csr) = node_csr(node_id).unwrap();
        let resp = ClusterClient::new(channel)
            .join(join_req(token, &csr, node_id))
            .await?
            .into_inner();
        let ca = verify_ca_pin(&resp.ca_pem, &pin.fingerprint).unwrap();
        let certs = NodeCerts::new(ca.pem(), &resp.cert_pem, &key, None).unwrap();
        Ok((certs, resp.role))
    }

    #[tokio::test]
    async fn worker_joins_over_pinned_connection_then_calls_with_its_cert() {
        let h = Harness::start().await;
        let (certs, role) = join_pinned(&h, &h.token(Role::Worker), "w1").await.unwrap();
        assert_eq!(role, i32::from(rudder_proto::v1::NodeRole::Worker));
        assert_eq!(
            certs.identity(SystemTime::now()).unwrap(),
            (Role::Worker, "w1".to_string())
        );
        let (not_before, not_after) = cert_validity(certs.cert_pem()).unwrap();
        assert_eq!(
            not_after.duration_since(not_before).unwrap(),
            NODE_CERT_VALIDITY + crate::ca::CLOCK_SKEW
        );

        // The new certificate opens an authenticated connection (and renews once the node
        // registered).
        h.secrets.add_member("w1");
        let mut client = h.client(client_tls(&certs, Role::Manager)).await.unwrap();
        let (_, csr) = node_csr("w1").unwrap();
        let renewed = client
            .renew(RenewRequest { csr_pem: csr })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            identity(&h.ca, &renewed.cert_pem),
            (Role::Worker, "w1".into())
        );
    }

    #[tokio::test]
    async fn worker_cert_cannot_call_admin_rpc() {
        let h = Harness::start().await;
        let mut worker = h.client_as(Role::Worker, "w1").await;
        let err = worker
            .join_token(JoinTokenRequest {
                role: rudder_proto::v1::NodeRole::Worker.into(),
                rotate: true,
                ttl_seconds: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(
            err.message(),
            "Cluster/JoinToken is for admin certificates; node w1 presented a worker certificate"
        );
        // Nothing was rotated.
        let mut admin = h.client_as(Role::Admin, "admin").await;
        let current = admin
            .join_token(JoinTokenRequest {
                role: rudder_proto::v1::NodeRole::Worker.into(),
                rotate: false,
                ttl_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(current.token, h.token(Role::Worker));
        // A manager certificate is not an admin's either.
        let mut manager = h.client_as(Role::Manager, "m2").await;
        let err = manager
            .join_token(JoinTokenRequest {
                role: rudder_proto::v1::NodeRole::Manager.into(),
                rotate: false,
                ttl_seconds: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        // No join token for a role that is not a node's (unspecified, or a value this
        // controller does not know).
        for role in [0, 7] {
            let err = admin
                .join_token(JoinTokenRequest {
                    role,
                    rotate: false,
                    ttl_seconds: 0,
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
        }
        let err = admin
            .join_token(JoinTokenRequest {
                role: 0,
                rotate: false,
                ttl_seconds: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn manager_token_yields_manager_cert_and_bad_tokens_are_refused() {
        let h = Harness::start().await;
        let (certs, role) = join_pinned(&h, &h.token(Role::Manager), "m2")
            .await
            .unwrap();
        assert_eq!(role, i32::from(rudder_proto::v1::NodeRole::Manager));
        assert_eq!(
            certs.identity(SystemTime::now()).unwrap(),
            (Role::Manager, "m2".to_string())
        );

        // The tokens below are refused by the server, so send them over a connection that
        // already trusts the CA (a node pinning another fingerprint would not even connect).
        let mut anon = h.client(client_tls_pinned(h.ca.cert())).await.unwrap();
        let (_, csr) = node_csr("n1").unwrap();
        let worker = h.token(Role::Worker);

        let garbled = format!("{}x", &worker[..worker.len() - 1]);
        let err = anon.join(join_req(&garbled, &csr, "n1")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("malformed join token"), "{err:?}");

        let other = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let foreign = worker.replace(h.ca.fingerprint(), other.fingerprint());
        let err = anon.join(join_req(&foreign, &csr, "n1")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("another cluster"), "{err:?}");

        let mut admin = h.client_as(Role::Admin, "admin").await;
        let rotated = admin
            .join_token(JoinTokenRequest {
                role: rudder_proto::v1::NodeRole::Worker.into(),
                rotate: true,
                ttl_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        assert_ne!(rotated, worker);
        let err = anon.join(join_req(&worker, &csr, "n1")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(
            err.message()
                .contains("rotated or never existed; ask an admin for a current one with `rctl cluster join-token worker`"),
            "{err:?}"
        );
        // The new token works; the manager token was left alone.
        join_pinned(&h, &rotated, "n1").await.unwrap();
        join_pinned(&h, &h.token(Role::Manager), "m3")
            .await
            .unwrap();

        // The role comes from the token (a request may only ask for less; see
        // `a_join_may_ask_for_less_than_its_token_never_more`).
        let err = anon.join(join_req("", &csr, "n1")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = anon
            .join(join_req(&rotated, "not a csr", "n1"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = anon
            .join(join_req(&rotated, &csr, "bad/id"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    /// A manager host's agent joins with the manager token but must be dialable as a worker;
    /// a worker token can never buy a manager certificate, whatever the request says.
    #[tokio::test]
    async fn a_join_may_ask_for_less_than_its_token_never_more() {
        use rudder_proto::v1::NodeRole;
        let h = Harness::start().await;
        let join_as = |token: String, id: &'static str, role: NodeRole| {
            let endpoint = h.endpoint();
            async move {
                let pin = Token::parse(&token).unwrap();
                let channel = join_endpoint(endpoint, &pin)
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let (key, csr) = node_csr(id).unwrap();
                let mut req = join_req(&token, &csr, id);
                req.role = role.into();
                let resp = ClusterClient::new(channel).join(req).await?.into_inner();
                let ca = verify_ca_pin(&resp.ca_pem, &pin.fingerprint).unwrap();
                let certs = NodeCerts::new(ca.pem(), &resp.cert_pem, &key, None).unwrap();
                Ok::<_, Status>((certs.names().unwrap().role, resp.role, resp.token_role))
            }
        };
        let manager = h.token(Role::Manager);
        let worker = h.token(Role::Worker);
        let (role, said, token_role) = join_as(manager.clone(), "m-agent", NodeRole::Worker)
            .await
            .unwrap();
        assert_eq!((role, said), (Role::Worker, i32::from(NodeRole::Worker)));
        assert_eq!(
            token_role,
            i32::from(NodeRole::Manager),
            "the agent learns its host's role"
        );
        let (role, _, _) = join_as(manager, "m-ctl", NodeRole::Manager).await.unwrap();
        assert_eq!(role, Role::Manager);
        let err = join_as(worker.clone(), "w-up", NodeRole::Manager)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(
            err.message().contains("with a manager token"),
            "{}",
            err.message()
        );
        let (role, _, _) = join_as(worker, "w1", NodeRole::Unspecified).await.unwrap();
        assert_eq!(role, Role::Worker);
    }

    #[test]
    fn issued_role_table() {
        use rudder_proto::v1::NodeRole as N;
        for (token, asked, want) in [
            (Role::Worker, N::Unspecified, Some(Role::Worker)),
            (Role::Worker, N::Worker, Some(Role::Worker)),
            (Role::Worker, N::Manager, None),
            (Role::Manager, N::Unspecified, Some(Role::Manager)),
            (Role::Manager, N::Worker, Some(Role::Worker)),
            (Role::Manager, N::Manager, Some(Role::Manager)),
        ] {
            assert_eq!(
                issued_role(token, asked).ok(),
                want,
                "{token} asking {asked:?}"
            );
        }
    }

    #[tokio::test]
    async fn joining_node_refuses_a_server_of_another_cluster() {
        let h = Harness::start().await;
        let other = ClusterCa::generate("test", SystemTime::now()).unwrap();
        // A token pinning another CA: the client refuses the server before sending anything.
        let token = JoinTokens::generate(other.fingerprint())
            .token(Role::Worker)
            .unwrap();
        let result = join_endpoint(h.endpoint(), &token).unwrap().connect().await;
        let err = result.expect_err("the server's ca is not the pinned one");
        let mut chain = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(e) = source {
            chain = format!("{chain}: {e}");
            source = e.source();
        }
        assert!(chain.contains("does not match the join token"), "{chain}");
    }

    #[tokio::test]
    async fn client_cert_from_another_ca_cannot_connect() {
        let h = Harness::start().await;
        let other = ClusterCa::generate("test", SystemTime::now()).unwrap();
        // Same cluster name, so the same issuer name: only the signature tells them apart.
        let (cert, key) = issue(&other, Role::Admin, "evil");
        let certs = NodeCerts::new(other.cert_pem(), &cert, &key, None).unwrap();
        // The client trusts the real CA, so only its own certificate is wrong.
        let tls = ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(h.ca.cert_pem()))
            .identity(tonic::transport::Identity::from_pem(
                certs.cert_pem(),
                certs.key_pem(),
            ))
            .domain_name(Role::Manager.server_name());
        // With TLS 1.3 the client may finish its side of the handshake before the server
        // refuses its certificate, so the refusal shows on connect or on the first call.
        let (_, csr) = node_csr("evil").unwrap();
        let refused = match h.client(tls).await {
            Err(_) => true,
            Ok(mut c) => {
                // A valid join token: only the handshake can make this fail.
                let err = c
                    .join(join_req(&h.token(Role::Worker), &csr, "evil"))
                    .await
                    .unwrap_err();
                assert!(
                    matches!(err.code(), Code::Unavailable | Code::Unknown),
                    "{err:?}"
                );
                true
            }
        };
        assert!(refused);
    }

    #[tokio::test]
    async fn client_without_cert_reaches_join_only() {
        let h = Harness::start().await;
        let mut anon = h.client(client_tls_pinned(h.ca.cert())).await.unwrap();
        let err = anon
            .join_token(JoinTokenRequest {
                role: rudder_proto::v1::NodeRole::Worker.into(),
                rotate: false,
                ttl_seconds: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err
            .message()
            .starts_with("Cluster/JoinToken needs a client certificate"));
        let (_, csr) = node_csr("n1").unwrap();
        let err = anon
            .renew(RenewRequest {
                csr_pem: csr.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let joined = anon
            .join(join_req(&h.token(Role::Worker), &csr, "n1"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            identity(&h.ca, &joined.cert_pem),
            (Role::Worker, "n1".into())
        );
    }

    #[tokio::test]
    async fn renew_keeps_role_and_node_id() {
        let h = Harness::start().await;
        for (role, id) in [
            (Role::Manager, "m2"),
            (Role::Admin, "ops"),
            (Role::Worker, "w9"),
        ] {
            let (cert, key) = issue(&h.ca, role, id);
            h.secrets.add_member(id);
            let old = NodeCerts::new(h.ca.cert_pem(), &cert, &key, None).unwrap();
            let mut client = h.client(client_tls(&old, Role::Manager)).await.unwrap();
            // The CSR's own name is ignored: only its public key is used.
            let (new_key, csr) = node_csr("someone-else").unwrap();
            let renewed = client
                .renew(RenewRequest { csr_pem: csr })
                .await
                .unwrap()
                .into_inner();
            let new = old.renewed(&renewed.cert_pem, &new_key).unwrap();
            assert_eq!(
                new.identity(SystemTime::now()).unwrap(),
                (role, id.to_string())
            );
            assert_ne!(new.cert_pem(), old.cert_pem());
            // The renewed certificate is a full lifetime of the old one (a day here), not what
            // was left of it, and not more.
            let (_, not_after) = cert_validity(new.cert_pem()).unwrap();
            assert!(not_after > SystemTime::now() + DAY - Duration::from_secs(60));
            assert!(not_after <= SystemTime::now() + DAY + Duration::from_secs(1));
        }
    }

    #[tokio::test]
    async fn h4_removed_or_unknown_identities_do_not_renew() {
        let h = Harness::start().await;
        let mut worker = h.client_as(Role::Worker, "gone").await;
        let (_, csr) = node_csr("gone").unwrap();
        // Never registered (or removed from the store): nothing to renew.
        let err = worker
            .renew(RenewRequest {
                csr_pem: csr.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message().contains("not a node of this cluster"),
            "{}",
            err.message()
        );
        // Revoked: refused, and named as such.
        h.secrets.add_member("gone");
        h.secrets
            .revoke(Role::Worker, "gone", "test")
            .await
            .unwrap();
        let err = worker
            .renew(RenewRequest { csr_pem: csr })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("revoked"), "{}", err.message());
        // A revoked admin renews nothing either.
        h.secrets
            .revoke(Role::Admin, "lost-laptop", "test")
            .await
            .unwrap();
        let mut admin = h.client_as(Role::Admin, "lost-laptop").await;
        let (_, csr) = node_csr("lost-laptop").unwrap();
        assert!(admin.renew(RenewRequest { csr_pem: csr }).await.is_err());
    }

    #[tokio::test]
    async fn c1_a_join_cannot_take_a_members_id_and_h5_its_owner_is_readmitted() {
        let h = Harness::start().await;
        let token = h.token(Role::Worker);
        // n1 joins and registers (as its first session would record it).
        let (n1, _) = join_pinned(&h, &token, "n1").await.unwrap();
        h.secrets.add_member("n1");
        // Anyone else with the worker token asking for n1's id is refused.
        let err = join_pinned(&h, &token, "n1").await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message().contains("belongs to a node"),
            "{}",
            err.message()
        );
        // With a certificate for n1 but another key: refused.
        let pin = Token::parse(&token).unwrap();
        let anon = || async {
            ClusterClient::new(
                join_endpoint(h.endpoint(), &pin)
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            )
        };
        let (_, other_csr) = node_csr("n1").unwrap();
        let mut req = join_req(&token, &other_csr, "n1");
        req.previous_cert_pem = n1.cert_pem().to_string();
        let err = anon().await.join(req).await.unwrap_err();
        assert!(
            err.message()
                .contains("not signed with the old certificate's key"),
            "{}",
            err.message()
        );
        // n1 itself, with its old key (its certificate expired while it was off): re-admitted
        // under its id.
        let expired = {
            let (key, csr) = node_csr("n1").unwrap();
            let old =
                h.ca.issue(&csr, Role::Worker, "n1", SystemTime::now() - 10 * DAY, DAY)
                    .unwrap();
            NodeCerts::new(h.ca.cert_pem(), &old, &key, None).unwrap()
        };
        assert!(expired.identity(SystemTime::now()).is_err());
        let mut req = join_req(
            &token,
            &crate::ca::node_csr_with_key("n1", expired.key_pem()).unwrap(),
            "n1",
        );
        req.previous_cert_pem = expired.cert_pem().to_string();
        let back = anon().await.join(req).await.unwrap().into_inner();
        assert_eq!(identity(&h.ca, &back.cert_pem), (Role::Worker, "n1".into()));
        // A revoked id never comes back, proof or not.
        h.secrets.revoke(Role::Worker, "n1", "test").await.unwrap();
        let mut req = join_req(
            &token,
            &crate::ca::node_csr_with_key("n1", expired.key_pem()).unwrap(),
            "n1",
        );
        req.previous_cert_pem = expired.cert_pem().to_string();
        let err = anon().await.join(req).await.unwrap_err();
        assert!(err.message().contains("revoked"), "{}", err.message());
        // Controller names need a manager token.
        let err = join_pinned(&h, &token, "controller-7").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn h5_admins_issue_and_revoke_admin_identities() {
        let h = Harness::start().await;
        let mut admin = h.client_as(Role::Admin, "admin").await;
        let (key, csr) = node_csr("ops").unwrap();
        let got = admin
            .admin_cert(AdminCertRequest {
                name: "ops".into(),
                csr_pem: csr,
                ttl_seconds: 3600,
                revoke: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(identity(&h.ca, &got.cert_pem), (Role::Admin, "ops".into()));
        let (nb, na) = cert_validity(&got.cert_pem).unwrap();
        assert!(
            na.duration_since(nb).unwrap() <= Duration::from_secs(3600) + crate::ca::CLOCK_SKEW
        );
        let ops = NodeCerts::new(h.ca.cert_pem(), &got.cert_pem, &key, None).unwrap();
        // A worker cannot ask for one.
        let mut worker = h.client_as(Role::Worker, "w1").await;
        let (_, csr) = node_csr("evil").unwrap();
        let err = worker
            .admin_cert(AdminCertRequest {
                name: "evil".into(),
                csr_pem: csr,
                ttl_seconds: 0,
                revoke: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        // Nobody revokes themselves (the cluster keeps an admin); another admin may.
        let revoke = |name: &str| AdminCertRequest {
            name: name.into(),
            csr_pem: String::new(),
            ttl_seconds: 0,
            revoke: true,
        };
        assert!(admin.admin_cert(revoke("admin")).await.is_err());
        admin.admin_cert(revoke("ops")).await.unwrap();
        let mut ops = h.client(client_tls(&ops, Role::Manager)).await.unwrap();
        let err = ops
            .join_token(JoinTokenRequest {
                role: rudder_proto::v1::NodeRole::Worker.into(),
                rotate: false,
                ttl_seconds: 0,
            })
            .await
            .unwrap_err();
        assert!(err.message().contains("revoked"), "{}", err.message());
    }

    /// A store that must not be touched: every call panics.
    struct Untouchable;

    #[async_trait::async_trait]
    impl SecretsStore for Untouchable {
        async fn ca(&self) -> Result<CaSecrets, ClusterError> {
            panic!("read the store")
        }
        async fn join_tokens(&self) -> Result<JoinTokens, ClusterError> {
            panic!("read the store")
        }
        async fn rotate_join_token(
            &self,
            _: Role,
            _: Option<Duration>,
        ) -> Result<Token, ClusterError> {
            panic!("read the store")
        }
        async fn standing(&self, _: Role, _: &str) -> Result<Standing, ClusterError> {
            panic!("read the store")
        }
        async fn admit(&self, _: Role, _: &str) -> Result<(), ClusterError> {
            panic!("read the store")
        }
        async fn revoke(&self, _: Role, _: &str, _: &str) -> Result<(), ClusterError> {
            panic!("read the store")
        }
    }

    #[tokio::test]
    async fn l9_garbage_is_refused_before_the_store_is_read() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let other = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let api = ClusterApi::new(Arc::new(Untouchable)).with_local_ca(ca.cert().clone());
        let foreign = JoinTokens::generate(other.fingerprint())
            .token(Role::Worker)
            .unwrap()
            .to_string();
        let (_, csr) = node_csr("n1").unwrap();
        let err = api
            .join(Request::new(join_req(&foreign, &csr, "n1")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let err = api
            .join(Request::new(join_req("RDR1-garbage", &csr, "n1")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        // No client certificate: refused before the CA key is read.
        let err = api
            .renew(Request::new(RenewRequest { csr_pem: csr }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    #[test]
    fn errors_map_to_actionable_statuses() {
        let s: Status = ClusterError::Unavailable("not the leader; try m2".into()).into();
        assert_eq!(s.code(), Code::Unavailable);
        let s: Status = ClusterError::NotInitialized.into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        let s: Status = ClusterError::from(TokenError::Unknown).into();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert!(s.message().contains("rctl cluster join-token"));
    }
}

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
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rudder_proto::v1::cluster_server::Cluster;
use rudder_proto::v1::{
    JoinRequest, JoinResponse, JoinTokenRequest, JoinTokenResponse, RenewRequest, RenewResponse,
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::ca::{CaError, ClusterCa, JoinTokens, Role, Token, TokenError};
use crate::tls::authorize;

/// Lifetime of a node certificate issued by `Join` or `Renew`; nodes renew at 50–80 % of it
/// ([`crate::ca::renew_at`]).
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

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
    #[error("cluster: no join token for role {0:?}: want worker or manager")]
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
}

/// Secrets held in this process only: for tests and single-process harnesses. Nothing
/// survives a restart and other managers do not see rotations.
pub struct MemorySecrets {
    ca: CaSecrets,
    tokens: Mutex<JoinTokens>,
}

impl MemorySecrets {
    /// Holds `ca` and fresh join tokens for it.
    pub fn new(ca: &ClusterCa) -> Self {
        MemorySecrets {
            ca: ca.into(),
            tokens: Mutex::new(JoinTokens::generate(ca.fingerprint())),
        }
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, JoinTokens> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
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
}

/// The Cluster gRPC service. Serve it behind [`crate::tls::server_tls`].
pub struct ClusterApi {
    secrets: Arc<dyn SecretsStore>,
    validity: Duration,
}

impl ClusterApi {
    pub fn new(secrets: Arc<dyn SecretsStore>) -> Self {
        ClusterApi {
            secrets,
            validity: NODE_CERT_VALIDITY,
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
        let role = self
            .secrets
            .join_tokens()
            .await?
            .verify_at(&req.token, SystemTime::now())?;
        let ca = self.cluster_ca().await?;
        let cert_pem = ca.issue(
            &req.csr_pem,
            role,
            &req.node_id,
            SystemTime::now(),
            self.validity,
        )?;
        info!(node = req.node_id, %role, "cluster: node joined");
        Ok(JoinResponse {
            cert_pem,
            ca_pem: ca.cert_pem().to_owned(),
            role: role.to_string(),
        })
    }

    async fn token_for(&self, req: JoinTokenRequest) -> Result<JoinTokenResponse, ClusterError> {
        let role = match req.role.parse::<Role>() {
            Ok(r @ (Role::Worker | Role::Manager)) => r,
            _ => return Err(ClusterError::NoTokenForRole(req.role)),
        };
        let token = if req.rotate {
            let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds));
            self.secrets.rotate_join_token(role, ttl).await?
        } else {
            self.secrets
                .join_tokens()
                .await?
                .token(role)
                .ok_or(ClusterError::NoTokenForRole(req.role))?
        };
        Ok(JoinTokenResponse {
            token: token.to_string(),
        })
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
        let ca = self.cluster_ca().await?;
        let (_, admin) = authorize(&req, ca.cert(), &[Role::Admin], RPC)?;
        let req = req.into_inner();
        info!(
            admin,
            role = req.role,
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
        let ca = self.cluster_ca().await?;
        let (role, node) = authorize(&req, ca.cert(), &Role::ALL, RPC)?;
        let cert_pem = ca
            .issue(
                &req.get_ref().csr_pem,
                role,
                &node,
                SystemTime::now(),
                self.validity,
            )
            .map_err(|e| log_refusal(RPC, e.into()))?;
        info!(node, %role, "cluster: renewed node certificate");
        Ok(Response::new(RenewResponse { cert_pem }))
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
        }
    }

    /// Joins over a connection that pins the CA by the token's fingerprint, as a new node does.
    async fn join_pinned(
        h: &Harness,
        token: &str,
        node_id: &str,
    ) -> Result<(NodeCerts, String), Status> {
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
        assert_eq!(role, "worker");
        assert_eq!(
            certs.identity(SystemTime::now()).unwrap(),
            (Role::Worker, "w1".to_string())
        );
        let (not_before, not_after) = cert_validity(certs.cert_pem()).unwrap();
        assert_eq!(
            not_after.duration_since(not_before).unwrap(),
            NODE_CERT_VALIDITY + crate::ca::CLOCK_SKEW
        );

        // The new certificate opens an authenticated connection.
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
                role: "worker".into(),
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
                role: "worker".into(),
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
                role: "manager".into(),
                rotate: false,
                ttl_seconds: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        // Admins get no join token for their own role.
        let err = admin
            .join_token(JoinTokenRequest {
                role: "admin".into(),
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
        assert_eq!(role, "manager");
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
                role: "worker".into(),
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

        // The role comes from the token: no request field can ask for another.
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
                role: "worker".into(),
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
            // The renewed certificate is the full 90 days, not what was left of the old one.
            let (_, not_after) = cert_validity(new.cert_pem()).unwrap();
            assert!(not_after > SystemTime::now() + 89 * DAY);
        }
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

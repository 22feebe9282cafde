//! Mutual TLS for Rudder's gRPC services: a node's security directory ([`NodeCerts`]), tonic
//! server and client TLS configs built from it, the pinned-CA connection a joining node uses
//! before it has a certificate ([`join_endpoint`]), and [`authorize`], which every RPC handler
//! calls to learn the caller's role (DESIGN.md §3 "CA and tokens"; certificates come from
//! [`crate::ca`]).
//!
//! Invariants:
//! - Servers ask for a client certificate but do not require one, so that `Cluster/Join` can be
//!   reached by a node that has none yet. A certificate that is presented must chain to the
//!   cluster CA, or the handshake fails. Every other RPC therefore calls [`authorize`], which
//!   refuses a caller without a certificate (`unauthenticated`) or with a role the RPC does not
//!   allow (`permission_denied`).
//! - Servers send their certificate followed by the CA certificate, so a joining node that knows
//!   only the CA fingerprint (from its join token) can check the server before it sends the
//!   token's secret: [`join_endpoint`] accepts a server only if the chain contains the CA with
//!   that fingerprint and the server certificate verifies against it for `manager.rudder`.
//! - Clients dial with the server's [`Role::server_name`], so only a manager certificate can
//!   answer as a controller.
//! - Private keys on disk (`node-key.pem`, `ca-key.pem`) are mode 0600 in a 0700 directory;
//!   `node.pem` is written last, so its presence means the set is complete.

use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{KeyPair, PublicKeyData};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};
use tracing::{debug, warn};

use crate::ca::{
    self, CaCert, CaError, ClusterCa, PeerIdentity, Role, Token, CA_CERT_FILE, CA_KEY_FILE,
};

/// The node's certificate (PEM) inside its security directory.
pub const NODE_CERT_FILE: &str = "node.pem";
/// The node's private key (PKCS#8 PEM), mode 0600.
pub const NODE_KEY_FILE: &str = "node-key.pem";
/// A TLS handshake that takes longer than this is dropped, so idle half-open connections cannot
/// pile up on a server.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node's TLS identity could not be loaded, saved or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key is invalid.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A file could not be read or written (what, path, error).
    #[error("tls: {0} {1}: {2}")]
    Io(&'static str, PathBuf, std::io::Error),
    /// The node key does not belong to the node certificate.
    #[error("tls: node key does not match the node certificate")]
    KeyMismatch,
    /// tonic could not build a transport with this identity.
    #[error("tls: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A node's security material: the cluster CA certificate, the node's certificate and key, and
/// on managers the CA's signing key. Stored in one directory (see [`NodeCerts::save`]).
#[derive(Clone)]
pub struct NodeCerts {
    ca: CaCert,
    cert_pem: String,
    key_pem: String,
    /// Only managers hold it; they issue certificates on `Join` and `Renew`.
    ca_key_pem: Option<String>,
}

impl fmt::Debug for NodeCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the keys.
        f.debug_struct("NodeCerts")
            .field("ca", &self.ca.fingerprint())
            .field("has_ca_key", &self.ca_key_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl NodeCerts {
    /// Checks that the PEMs parse, that `key_pem` belongs to `cert_pem`, and that `ca_key_pem`
    /// (if any) belongs to the CA. Does not check validity times: see [`NodeCerts::identity`].
    pub fn new(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        ca_key_pem: Option<&str>,
    ) -> Result<Self, TlsError> {
        let ca = CaCert::from_pem(ca_pem)?;
        let cert_der = first_cert(cert_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CaError::Cert(e.to_string()))?;
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(TlsError::KeyMismatch);
        }
        if let Some(ca_key) = ca_key_pem {
            ClusterCa::from_pem(ca_pem, ca_key)?;
        }
        Ok(NodeCerts {
            ca,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            ca_key_pem: ca_key_pem.map(str::to_owned),
        })
    }

    /// The certificates of a manager that also holds the CA (e.g. the first controller, which
    /// created it).
    pub fn with_ca(ca: &ClusterCa, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        NodeCerts::new(ca.cert_pem(), cert_pem, key_pem, Some(ca.key_pem()))
    }

    /// Reads a directory written by [`NodeCerts::save`]; `ca-key.pem` is optional.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let ca_pem = read(dir, CA_CERT_FILE)?;
        let cert_pem = read(dir, NODE_CERT_FILE)?;
        let key_pem = read_secret(dir, NODE_KEY_FILE)?;
        let ca_key_pem = match read_secret(dir, CA_KEY_FILE) {
            Ok(k) => Some(k),
            Err(TlsError::Io(_, _, e)) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let certs = NodeCerts::new(&ca_pem, &cert_pem, &key_pem, ca_key_pem.as_deref())?;
        debug!(dir = %dir.display(), ca = %certs.ca.fingerprint(), "tls: loaded node certificates");
        Ok(certs)
    }

    /// Like [`NodeCerts::load`], but `None` when the directory holds no node certificate yet
    /// (the node has to join first).
    pub fn load_if_present(dir: &Path) -> Result<Option<Self>, TlsError> {
        match fs::metadata(dir.join(NODE_CERT_FILE)) {
            Ok(_) => NodeCerts::load(dir).map(Some),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TlsError::Io("stat", dir.join(NODE_CERT_FILE), e)),
        }
    }

    /// Writes `ca.pem`, `node-key.pem` (0600), `ca-key.pem` (0600, managers only; removed
    /// otherwise, e.g. after a demotion) and last `node.pem` into `dir` (created 0700), each
    /// file atomically.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        fs::create_dir_all(dir).map_err(|e| TlsError::Io("create", dir.to_owned(), e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| TlsError::Io("chmod", dir.to_owned(), e))?;
        ca::write_atomic(&dir.join(CA_CERT_FILE), self.ca.pem().as_bytes(), 0o644)?;
        ca::write_atomic(&dir.join(NODE_KEY_FILE), self.key_pem.as_bytes(), 0o600)?;
        let ca_key = dir.join(CA_KEY_FILE);
        match &self.ca_key_pem {
            Some(k) => ca::write_atomic(&ca_key, k.as_bytes(), 0o600)?,
            None => match fs::remove_file(&ca_key) {
                Ok(()) => debug!(path = %ca_key.display(), "tls: removed ca key"),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(TlsError::Io("remove", ca_key, e)),
            },
        }
        ca::write_atomic(&dir.join(NODE_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        debug!(dir = %dir.display(), "tls: saved node certificates");
        Ok(())
    }

    /// The same CA (and CA key), with a renewed certificate and its new key.
    pub fn renewed(&self, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        NodeCerts::new(self.ca.pem(), cert_pem, key_pem, self.ca_key_pem.as_deref())
    }

    /// The role and node id this node's certificate carries, if it is valid at `now`.
    pub fn identity(&self, now: SystemTime) -> Result<(Role, String), TlsError> {
        Ok(ca::peer_role(&first_cert(&self.cert_pem)?, &self.ca, now)?)
    }

    /// Who the certificate names, whether or not it is still valid (it is not verified here).
    pub fn names(&self) -> Result<PeerIdentity, TlsError> {
        Ok(ca::names_of(&first_cert(&self.cert_pem)?)?)
    }

    /// The cluster CA certificate this node trusts.
    pub fn ca(&self) -> &CaCert {
        &self.ca
    }

    /// The node's certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The node's private key as PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The cluster CA with its signing key, on managers.
    pub fn cluster_ca(&self) -> Result<Option<ClusterCa>, TlsError> {
        match &self.ca_key_pem {
            Some(key) => Ok(Some(ClusterCa::from_pem(self.ca.pem(), key)?)),
            None => Ok(None),
        }
    }
}

/// Server TLS for every Rudder gRPC server: presents the node certificate (followed by the CA
/// certificate, for joining nodes) and verifies client certificates against the cluster CA.
/// A client certificate is optional at the TLS level; handlers call [`authorize`].
pub fn server_tls(certs: &NodeCerts) -> ServerTlsConfig {
    let mut chain = certs.cert_pem.clone();
    if !chain.ends_with('\n') {
        chain.push('\n');
    }
    chain.push_str(certs.ca.pem());
    ServerTlsConfig::new()
        .identity(Identity::from_pem(chain, &certs.key_pem))
        .client_ca_root(Certificate::from_pem(certs.ca.pem()))
        .client_auth_optional(true)
        .timeout(HANDSHAKE_TIMEOUT)
}

/// Client TLS for a node with a certificate, dialing a server of `server_role` (controllers
/// are [`Role::Manager`]; a controller dials an agent as [`Role::Worker`]).
pub fn client_tls(certs: &NodeCerts, server_role: Role) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(certs.ca.pem()))
        .identity(Identity::from_pem(&certs.cert_pem, &certs.key_pem))
        .domain_name(server_role.server_name())
        .timeout(HANDSHAKE_TIMEOUT)
}

/// Client TLS without a client certificate, trusting only `ca` and dialing a controller. Take
/// `ca` from [`ca::verify_ca_pin`] (checked against a join token's fingerprint) or from the
/// node's own security directory, never from an unchecked source. Such a client can reach
/// `Cluster/Join` and nothing else.
pub fn client_tls_pinned(ca: &CaCert) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name(Role::Manager.server_name())
        .timeout(HANDSHAKE_TIMEOUT)
}

/// TLS for a node that holds only a join token: `endpoint` (an `https://` URI of a controller)
/// accepts the server only if its chain carries the CA with the token's fingerprint and its
/// certificate verifies against that CA as `manager.rudder`. Send `Cluster/Join` over it, then
/// check the returned `ca_pem` with [`ca::verify_ca_pin`] too.
pub fn join_endpoint(endpoint: Endpoint, token: &Token) -> Result<Endpoint, TlsError> {
    let tls = ClientTlsConfig::new()
        .domain_name(Role::Manager.server_name())
        .timeout(HANDSHAKE_TIMEOUT);
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: token.fingerprint.clone(),
        provider: ca::provider(),
    });
    Ok(endpoint.tls_config_with_verifier(tls, verifier)?)
}

/// Which role and node the caller of `rpc` (e.g. `"Cluster/JoinToken"`, named in refusals) is,
/// if its client certificate is from the cluster CA and its role is one of `allowed`.
/// No certificate (or one that does not verify) → `unauthenticated`; a role not in `allowed` →
/// `permission_denied`. Only works behind a server configured with [`server_tls`].
pub fn authorize<T>(
    req: &Request<T>,
    ca: &CaCert,
    allowed: &[Role],
    rpc: &str,
) -> Result<PeerIdentity, Status> {
    let certs = req.peer_certs();
    let leaf = certs.as_deref().and_then(|c| c.first());
    authorize_cert(
        leaf.map(|c| c.as_ref()),
        ca,
        allowed,
        rpc,
        SystemTime::now(),
    )
}

/// The caller's identity as a [`guard`] recorded it on the request.
pub fn caller<T>(req: &Request<T>) -> Option<&PeerIdentity> {
    req.extensions().get::<PeerIdentity>()
}

/// [`caller`], or `unauthenticated` when no guard ran (a wiring mistake, never a client's).
pub fn caller_or_refuse<'a, T>(req: &'a Request<T>, rpc: &str) -> Result<&'a PeerIdentity, Status> {
    caller(req).ok_or_else(|| Status::unauthenticated(format!("{rpc}: caller not authenticated")))
}

pub(crate) fn authorize_cert(
    leaf: Option<&[u8]>,
    ca: &CaCert,
    allowed: &[Role],
    rpc: &str,
    now: SystemTime,
) -> Result<PeerIdentity, Status> {
    let Some(leaf) = leaf else {
        return Err(Status::unauthenticated(format!(
            "{rpc} needs a client certificate from this cluster's ca; \
             join the cluster with a join token first"
        )));
    };
    let id = ca::peer_identity(leaf, ca, now).map_err(|e| {
        warn!(rpc, err = %e, "tls: refused client certificate");
        Status::unauthenticated(format!("{rpc}: client certificate refused: {e}"))
    })?;
    if !allowed.contains(&id.role) {
        let want = allowed
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(" or ");
        warn!(rpc, node = id.node, role = %id.role, "tls: permission denied");
        return Err(Status::permission_denied(format!(
            "{rpc} is for {want} certificates; node {} presented a {} certificate",
            id.node, id.role
        )));
    }
    Ok(id)
}

/// Client TLS for dialing one particular node: the server must hold a certificate of `role`
/// from the cluster CA whose CN is `node`. A controller dials an agent this way, so an agent
/// that registered another node's address cannot answer for it.
pub fn node_endpoint(
    endpoint: Endpoint,
    certs: &NodeCerts,
    role: Role,
    node: &str,
) -> Result<Endpoint, TlsError> {
    let want = node.to_string();
    member_endpoint(
        endpoint,
        certs,
        role,
        Arc::new(move |got: &str| {
            if got == want {
                Ok(())
            } else {
                Err(format!(
                    "the server's certificate is for node {got}, not {want}: another host \
                     answers at this node's address"
                ))
            }
        }),
    )
}

/// Says whether a server's certificate name (CN) is one this client may talk to, and why not.
pub type AcceptName = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Client TLS for dialing any server of `role` from the cluster CA whose CN `accept` admits:
/// an agent dials only the current members of the controller group, so a removed controller
/// (whose certificate is still valid) cannot take its sessions.
pub fn member_endpoint(
    endpoint: Endpoint,
    certs: &NodeCerts,
    role: Role,
    accept: AcceptName,
) -> Result<Endpoint, TlsError> {
    let tls = ClientTlsConfig::new()
        .identity(Identity::from_pem(&certs.cert_pem, &certs.key_pem))
        .domain_name(role.server_name())
        .timeout(HANDSHAKE_TIMEOUT);
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(certs.ca.der().to_vec()))
        .map_err(CaError::Tls)?;
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), ca::provider())
        .build()
        .map_err(|e| CaError::Verifier(e.to_string()))?;
    let verifier = Arc::new(NodeVerifier {
        inner,
        role,
        accept,
    });
    Ok(endpoint.tls_config_with_verifier(tls, verifier)?)
}

/// Verifies a server against the cluster CA (webpki, as any client would), then that its
/// certificate is of the expected role and names a node `accept` admits.
struct NodeVerifier {
    inner: Arc<WebPkiServerVerifier>,
    role: Role,
    accept: AcceptName,
}

impl fmt::Debug for NodeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeVerifier")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let who = ca::names_of(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        let verdict = if who.role != self.role {
            Err(format!(
                "the server's certificate is a {} certificate, not a {}'s",
                who.role, self.role
            ))
        } else {
            (self.accept)(&who.node)
        };
        if let Err(why) = verdict {
            warn!(got = who.node, role = %who.role, why, "tls: server refused");
            return Err(CertificateError::Other(OtherError(Arc::new(Refused(why)))).into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(thiserror::Error)]
#[error("{0}")]
struct Refused(String);

impl fmt::Debug for Refused {
    // rustls shows a certificate error's cause with `Debug`: make it the message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Verifies a server against the CA a join token pinned by fingerprint; the server sends that
/// CA in its chain (see [`server_tls`]).
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c)) == self.fingerprint)
        else {
            debug!("tls: server did not present the pinned ca");
            return Err(CertificateError::Other(OtherError(Arc::new(PinError))).into());
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(thiserror::Error)]
#[error("the server's cluster ca does not match the join token's fingerprint (another cluster?)")]
struct PinError;

impl fmt::Debug for PinError {
    // rustls shows a certificate error's cause with `Debug`: make it the message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    Ok(CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| CaError::Pem("certificate"))?)
}

fn read(dir: &Path, name: &str) -> Result<String, TlsError> {
    let p = dir.join(name);
    fs::read_to_string(&p).map_err(|e| TlsError::Io("read", p, e))
}

/// Reads a private key, warning when others can read it.
fn read_secret(dir: &Path, name: &str) -> Result<String, TlsError> {
    let p = dir.join(name);
    let meta = fs::metadata(&p).map_err(|e| TlsError::Io("read", p.clone(), e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(path = %p.display(), "tls: private key is readable by others; chmod 600 it");
    }
    read(dir, name)
}

/// A tonic interceptor admitting callers whose certificate has one of `roles`; `service` names
/// the service in refusals. The caller's [`PeerIdentity`] goes with the request ([`caller`]).
pub fn guard(
    ca: Arc<CaCert>,
    roles: &'static [Role],
    service: &'static str,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    guard_checked(ca, roles, service, Arc::new(|_: &PeerIdentity| Ok(())))
}

/// A further check of an authenticated caller, on every request (e.g. "not revoked").
pub type IdentityCheck = Arc<dyn Fn(&PeerIdentity) -> Result<(), Status> + Send + Sync>;

/// [`guard`], with `check` run on every request after the certificate verified.
pub fn guard_checked(
    ca: Arc<CaCert>,
    roles: &'static [Role],
    service: &'static str,
    check: IdentityCheck,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut req: Request<()>| {
        let id = authorize(&req, &ca, roles, service)?;
        check(&id)?;
        req.extensions_mut().insert(id);
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::node_csr;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn issued(ca: &ClusterCa, role: Role, id: &str) -> (String, String) {
        let (key, csr) = node_csr(id).unwrap();
        let cert = ca.issue(&csr, role, id, SystemTime::now(), DAY).unwrap();
        (cert, key)
    }

    fn der(cert_pem: &str) -> Vec<u8> {
        first_cert(cert_pem).unwrap().to_vec()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn save_and_load_keep_certs_and_protect_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("security");
        assert!(NodeCerts::load_if_present(&dir).unwrap().is_none());

        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let (cert, key) = issued(&ca, Role::Manager, "m1");
        let certs = NodeCerts::with_ca(&ca, &cert, &key).unwrap();
        certs.save(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(NODE_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(NODE_CERT_FILE)), 0o644);

        let back = NodeCerts::load_if_present(&dir).unwrap().unwrap();
        assert_eq!(back.cert_pem(), cert);
        assert_eq!(back.ca().fingerprint(), ca.fingerprint());
        assert_eq!(
            back.identity(SystemTime::now()).unwrap(),
            (Role::Manager, "m1".to_string())
        );
        let loaded_ca = back
            .cluster_ca()
            .unwrap()
            .expect("a manager keeps the ca key");
        assert_eq!(loaded_ca.fingerprint(), ca.fingerprint());

        // Saved again without the CA key (a demoted manager): the key file goes away.
        let worker = NodeCerts::new(ca.cert_pem(), &cert, &key, None).unwrap();
        worker.save(&dir).unwrap();
        assert!(!dir.join(CA_KEY_FILE).exists());
        assert!(NodeCerts::load(&dir)
            .unwrap()
            .cluster_ca()
            .unwrap()
            .is_none());
    }

    #[test]
    fn mismatched_keys_are_refused() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let other = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let (cert, _) = issued(&ca, Role::Worker, "w1");
        let (_, other_key) = issued(&ca, Role::Worker, "w2");
        assert!(matches!(
            NodeCerts::new(ca.cert_pem(), &cert, &other_key, None),
            Err(TlsError::KeyMismatch)
        ));
        let (cert, key) = issued(&ca, Role::Manager, "m1");
        assert!(matches!(
            NodeCerts::new(ca.cert_pem(), &cert, &key, Some(other.key_pem())),
            Err(TlsError::Ca(CaError::KeyMismatch))
        ));
        // The Debug form never shows key material.
        let certs = NodeCerts::with_ca(&ca, &cert, &key).unwrap();
        let shown = format!("{certs:?}");
        assert!(!shown.contains("PRIVATE") && shown.contains(ca.fingerprint()));
    }

    #[test]
    fn node_verifier_accepts_only_the_node_it_dials() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let other = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.cert().der().to_vec()))
            .unwrap();
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), ca::provider())
            .build()
            .unwrap();
        let verifier = |node: &str| {
            let want = node.to_string();
            NodeVerifier {
                inner: inner.clone(),
                role: Role::Worker,
                accept: Arc::new(move |got: &str| {
                    if got == want {
                        Ok(())
                    } else {
                        Err(format!(
                            "the server's certificate is for node {got}, not {want}"
                        ))
                    }
                }),
            }
        };
        let name = ServerName::try_from("worker.rudder").unwrap();
        let now = UnixTime::now();
        let check = |v: &NodeVerifier, pem: &str| {
            v.verify_server_cert(&first_cert(pem).unwrap(), &[], &name, &[], now)
        };
        let (w1, _) = issued(&ca, Role::Worker, "n1");
        check(&verifier("n1"), &w1).unwrap();
        // Another node's certificate (C1: an agent that registered n1's address) is refused.
        let (w2, _) = issued(&ca, Role::Worker, "n2");
        let err = check(&verifier("n1"), &w2).unwrap_err().to_string();
        assert!(err.contains("node n2, not n1"), "{err}");
        // A manager certificate named n1 is not an agent.
        let (m1, _) = issued(&ca, Role::Manager, "n1");
        assert!(check(&verifier("n1"), &m1).is_err());
        // A certificate of another CA never verifies.
        let (foreign, _) = issued(&other, Role::Worker, "n1");
        assert!(check(&verifier("n1"), &foreign).is_err());
    }

    #[test]
    fn an_expired_certificate_proves_its_identity_only_with_its_own_key() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let long_ago = SystemTime::now() - 10 * DAY;
        let (key, csr) = node_csr("n1").unwrap();
        let old = ca.issue(&csr, Role::Worker, "n1", long_ago, DAY).unwrap();
        let certs = NodeCerts::new(ca.cert_pem(), &old, &key, None).unwrap();
        assert!(certs.identity(SystemTime::now()).is_err(), "expired");
        let who = ca::previous_identity(&old, ca.cert()).unwrap();
        assert_eq!((who.role, who.node.as_str()), (Role::Worker, "n1"));
        let same_key = ca::node_csr_with_key("n1", &key).unwrap();
        assert!(ca::csr_has_key_of(&same_key, &old).unwrap());
        let (_, other_key) = node_csr("n1").unwrap();
        assert!(!ca::csr_has_key_of(&other_key, &old).unwrap());
        // Not from this CA: no identity at all.
        let foreign = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let (k2, csr2) = node_csr("n1").unwrap();
        let theirs = foreign
            .issue(&csr2, Role::Worker, "n1", long_ago, DAY)
            .unwrap();
        assert!(ca::previous_identity(&theirs, ca.cert()).is_err());
        let _ = k2;
    }

    #[test]
    fn guard_records_the_identity_and_runs_the_check() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let (cert, _) = issued(&ca, Role::Worker, "w1");
        let id = authorize_cert(
            Some(&der(&cert)),
            ca.cert(),
            &[Role::Worker],
            "x",
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(id.node, "w1");
        assert!(id.not_after > SystemTime::now());
        let mut req = Request::new(());
        assert!(caller(&req).is_none());
        req.extensions_mut().insert(id.clone());
        assert_eq!(caller(&req), Some(&id));
    }

    #[test]
    fn authorize_cert_checks_presence_ca_and_role() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let other = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let now = SystemTime::now();
        let rpc = "Cluster/JoinToken";

        let err = authorize_cert(None, ca.cert(), &[Role::Admin], rpc, now).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains(rpc), "{}", err.message());

        let (foreign, _) = issued(&other, Role::Admin, "a1");
        let err =
            authorize_cert(Some(&der(&foreign)), ca.cert(), &[Role::Admin], rpc, now).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);

        let (worker, _) = issued(&ca, Role::Worker, "w1");
        let err =
            authorize_cert(Some(&der(&worker)), ca.cert(), &[Role::Admin], rpc, now).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            err.message(),
            "Cluster/JoinToken is for admin certificates; node w1 presented a worker certificate"
        );

        let (manager, _) = issued(&ca, Role::Manager, "m1");
        let got = authorize_cert(
            Some(&der(&manager)),
            ca.cert(),
            &[Role::Manager, Role::Admin],
            rpc,
            now,
        )
        .unwrap();
        assert_eq!((got.role, got.node.as_str()), (Role::Manager, "m1"));

        // Expired by the time of the call.
        let err = authorize_cert(
            Some(&der(&manager)),
            ca.cert(),
            &[Role::Manager],
            rpc,
            now + 2 * DAY,
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}

//! Cluster certificate authority, node certificates and join tokens (DESIGN.md §3 "CA and
//! tokens").
//!
//! The first controller creates a [`ClusterCa`] (self-signed, ECDSA P-256, ten years). A joining
//! node learns the CA fingerprint from its join token ([`Token::parse`]), pins the CA certificate
//! it is sent against it ([`verify_ca_pin`]), generates its own key and CSR ([`node_csr`]), and
//! receives a node certificate from [`ClusterCa::issue`] carrying its [`Role`]. Every connection
//! then speaks mutual TLS with [`server_config`] / [`client_config`], and the API layer asks
//! [`peer_role`] which role the peer holds before serving a manager or admin RPC.
//!
//! Invariants:
//! - A node's private key never leaves the node: the CA signs CSRs and sees only public keys.
//! - The CA alone decides what a node certificate says. Of a CSR it keeps only the public key
//!   (after checking the CSR's self-signature); the subject, SANs, key usages and validity come
//!   from [`ClusterCa::issue`]'s arguments, so a worker cannot ask for a manager certificate.
//! - A node certificate names its role three times, consistently: Subject OU = role, CN = node
//!   id, and exactly one SAN URI `rudder://role/<role>/node/<id>`. [`peer_role`] accepts a
//!   certificate only if it chains to the cluster CA, is valid at the given instant, allows
//!   client auth, and all three agree.
//! - A node certificate also carries the DNS name [`Role::server_name`] of its role, so a client
//!   dialing `manager.rudder` only accepts a server holding a manager certificate: an agent
//!   cannot pose as a controller.
//! - Join tokens are `RDR1-<sha256 of the CA cert DER, hex>-<secret>`; one secret per joinable
//!   role (worker, manager; never admin). Rotating a role's secret invalidates its old token
//!   at once. Secrets are compared in constant time.
//! - Nothing here reads the clock or does I/O, except [`ClusterCa::save`] / [`ClusterCa::load`];
//!   the current time is always an argument. Key material comes from the OS-seeded CSPRNG;
//!   only the renewal jitter ([`renew_at`]) takes a caller's RNG.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tracing::{debug, info};

/// Lifetime of a cluster CA certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long before "now", so a peer whose clock runs a little behind
/// accepts them at once.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// File names inside the directory given to [`ClusterCa::save`] / [`ClusterCa::load`].
pub const CA_CERT_FILE: &str = "ca.pem";
/// See [`CA_CERT_FILE`]: the CA's private key, mode 0600.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Join token prefix; the digit is the token format version.
pub const TOKEN_PREFIX: &str = "RDR1";
/// The environment variable agents and controllers take a join token from (never argv: a
/// command line is readable by every local user).
pub const TOKEN_ENV: &str = "RUDDER_JOIN_TOKEN";
/// Bytes of randomness in a join token secret (hex-encoded in the token).
const SECRET_BYTES: usize = 24;
/// Longest node id accepted (it goes into the CN and a URI).
const MAX_NODE_ID: usize = 64;
const SAN_URI_PREFIX: &str = "rudder://role/";

/// Why a CA, certificate or key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A key pair or certificate could not be generated.
    #[error("ca: generate: {0}")]
    Generate(rcgen::Error),
    /// A certificate signing request is invalid.
    #[error("ca: invalid csr: {0}")]
    Csr(rcgen::Error),
    /// The CA could not sign a certificate.
    #[error("ca: sign certificate: {0}")]
    Sign(rcgen::Error),
    /// A private key could not be parsed.
    #[error("ca: bad key: {0}")]
    Key(rcgen::Error),
    /// The PEM holds no block of the kind named.
    #[error("ca: bad pem: no {0} found")]
    Pem(&'static str),
    /// A certificate could not be parsed or is not usable.
    #[error("ca: bad certificate: {0}")]
    Cert(String),
    /// A node id outside 1-64 of `[A-Za-z0-9._-]`.
    #[error("ca: invalid node id {0:?}: want 1-64 of [A-Za-z0-9._-]")]
    NodeId(String),
    /// The certificate does not chain to the cluster CA.
    #[error("ca: certificate is not trusted by the cluster ca: {0}")]
    Untrusted(rustls::Error),
    /// The certificate carries no Rudder role, or an unknown one.
    #[error("ca: certificate carries no valid rudder role: {0}")]
    NoRole(String),
    /// The CA a peer presents is not the one the join token pins.
    #[error("ca: ca certificate fingerprint {actual} does not match pinned {expected}")]
    PinMismatch {
        /// The pinned fingerprint.
        expected: String,
        /// The fingerprint presented.
        actual: String,
    },
    /// The private key does not belong to the CA certificate.
    #[error("ca: private key does not match the ca certificate")]
    KeyMismatch,
    /// A file could not be read or written (what, path, error).
    #[error("ca: {0} {1}: {2}")]
    Io(&'static str, PathBuf, std::io::Error),
    /// rustls refused a configuration.
    #[error("ca: tls config: {0}")]
    Tls(#[from] rustls::Error),
    /// A certificate verifier could not be built.
    #[error("ca: tls verifier: {0}")]
    Verifier(String),
    /// A join token is malformed, for another cluster, or refused.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A token file readable by group or others (path, mode): refused, since it is a secret.
    #[error("ca: token file {0} is mode {1:o}, readable by others: refusing it (chmod 600 it)")]
    TokenFileOpen(PathBuf, u32),
}

/// What a certificate holder may do. Workers (agents) run tasks; managers (controllers) run the
/// raft group and serve the APIs; admins (`rctl`) call the Control API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An agent: runs tasks.
    Worker,
    /// A controller: runs the raft group and serves the APIs.
    Manager,
    /// An administrator (`rctl`): calls the Control API.
    Admin,
}

impl Role {
    /// Every role, for tables and checks that go over all of them.
    pub const ALL: [Role; 3] = [Role::Worker, Role::Manager, Role::Admin];

    /// The role's name, as in certificates (`rudder://role/<name>`) and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Manager => "manager",
            Role::Admin => "admin",
        }
    }

    /// The DNS name every certificate of this role carries; TLS clients dial with it as the
    /// server name (e.g. agents and controllers dial controllers as `manager.rudder`).
    pub fn server_name(self) -> &'static str {
        match self {
            Role::Worker => "worker.rudder",
            Role::Manager => "manager.rudder",
            Role::Admin => "admin.rudder",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = CaError;
    fn from_str(s: &str) -> Result<Self, CaError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| CaError::NoRole(format!("unknown role {s:?}")))
    }
}

/// The public half of the cluster CA: what every node holds to verify peers.
#[derive(Debug, Clone)]
pub struct CaCert {
    pem: String,
    der: CertificateDer<'static>,
    fingerprint: String,
    /// Built once: verifies client certificates (chain to this CA, validity, client-auth EKU).
    client_verifier: Arc<dyn ClientCertVerifier>,
    roots: Arc<RootCertStore>,
}

impl CaCert {
    /// Parses a CA certificate (PEM). Does not pin it: see [`verify_ca_pin`].
    pub fn from_pem(pem: &str) -> Result<Self, CaError> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| CaError::Pem("certificate"))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| CaError::Cert(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(CaError::Cert("not a ca certificate".into()));
        }
        let mut roots = RootCertStore::empty();
        roots
            .add(der.clone())
            .map_err(|e| CaError::Cert(e.to_string()))?;
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| CaError::Verifier(e.to_string()))?;
        Ok(CaCert {
            pem: pem.to_owned(),
            fingerprint: fingerprint_der(&der),
            der,
            client_verifier,
            roots,
        })
    }

    /// The certificate as PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The certificate as DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// SHA-256 of the certificate's DER, lowercase hex (64 characters).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// The cluster CA with its signing key. Only managers hold one.
pub struct ClusterCa {
    cert: CaCert,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("ClusterCa")
            .field("fingerprint", &self.cert.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Creates a new self-signed CA (ECDSA P-256) valid from `now` (minus [`CLOCK_SKEW`]) for
    /// [`CA_VALIDITY`].
    pub fn generate(cluster_name: &str, now: SystemTime) -> Result<Self, CaError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, cluster_name);
        dn.push(
            DnType::CommonName,
            format!("rudder cluster ca {cluster_name}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = to_offset(now.checked_sub(CLOCK_SKEW).unwrap_or(now));
        params.not_after = to_offset(now + CA_VALIDITY);
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        let cert = CaCert::from_pem(&cert.pem())?;
        info!(cluster = cluster_name, fingerprint = %cert.fingerprint, "ca: created cluster ca");
        let key_pem = key.serialize_pem();
        Ok(ClusterCa {
            cert,
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Rebuilds a CA from its certificate and key (both PEM), checking that they belong together.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let cert = CaCert::from_pem(cert_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.der)
            .map_err(|e| CaError::Cert(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(CaError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert.der, key).map_err(CaError::Key)?;
        Ok(ClusterCa {
            cert,
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// Writes [`CA_CERT_FILE`] and [`CA_KEY_FILE`] (mode 0600) into `dir`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        fs::create_dir_all(dir).map_err(|e| CaError::Io("create", dir.to_owned(), e))?;
        write_atomic(&dir.join(CA_CERT_FILE), self.cert.pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join(CA_KEY_FILE), self.key_pem.as_bytes(), 0o600)?;
        debug!(dir = %dir.display(), "ca: saved");
        Ok(())
    }

    /// Reads what [`ClusterCa::save`] wrote.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let p = dir.join(name);
            fs::read_to_string(&p).map_err(|e| CaError::Io("read", p, e))
        };
        let ca = ClusterCa::from_pem(&read(CA_CERT_FILE)?, &read(CA_KEY_FILE)?)?;
        info!(dir = %dir.display(), fingerprint = %ca.cert.fingerprint, "ca: loaded cluster ca");
        Ok(ca)
    }

    /// The CA's certificate.
    pub fn cert(&self) -> &CaCert {
        &self.cert
    }

    /// The CA's certificate as PEM, what nodes pin and trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert.pem
    }

    /// The SHA-256 fingerprint of the CA certificate: what join tokens pin.
    pub fn fingerprint(&self) -> &str {
        &self.cert.fingerprint
    }

    /// The CA's private key (PKCS#8 PEM), for a manager's security dir and the replicated
    /// store. Secret: never log it or send it to a non-manager.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Signs a node's CSR (PEM) into a node certificate (PEM) for `role` and `node_id`, valid
    /// from `now` (minus [`CLOCK_SKEW`]) for `validity`. Only the CSR's public key is used.
    pub fn issue(
        &self,
        csr_pem: &str,
        role: Role,
        node_id: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<String, CaError> {
        self.issue_for_addresses(csr_pem, role, node_id, now, validity, &[])
    }

    /// [`ClusterCa::issue`], also naming the IP addresses a server is reached at (IP SANs), so
    /// that standard TLS clients (skopeo, podman, docker) verify it by the address they dial.
    pub fn issue_for_addresses(
        &self,
        csr_pem: &str,
        role: Role,
        node_id: &str,
        now: SystemTime,
        validity: Duration,
        ips: &[std::net::IpAddr],
    ) -> Result<String, CaError> {
        check_node_id(node_id)?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::Csr)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        dn.push(DnType::CommonName, node_id);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::URI(role_uri(role, node_id).try_into().map_err(CaError::Sign)?),
            SanType::DnsName(role.server_name().try_into().map_err(CaError::Sign)?),
        ];
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = to_offset(now.checked_sub(CLOCK_SKEW).unwrap_or(now));
        params.not_after = to_offset(now + validity);
        // Whatever the CSR asked for is discarded here.
        csr.params = params;
        let cert = csr.signed_by(&self.issuer).map_err(CaError::Sign)?;
        info!(node = node_id, %role, "ca: issued node certificate");
        Ok(cert.pem())
    }
}

/// For the joining side: a fresh P-256 key (PKCS#8 PEM, keep it on the node) and a CSR (PEM)
/// to send to the CA.
pub fn node_csr(node_id: &str) -> Result<(String, String), CaError> {
    check_node_id(node_id)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(CaError::Generate)?;
    let csr_pem = csr.pem().map_err(CaError::Generate)?;
    Ok((key.serialize_pem(), csr_pem))
}

/// Who a certificate from the cluster CA names: its role, node id (CN) and end of validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The role the certificate grants.
    pub role: Role,
    /// The node id: the certificate's CN (`controller-<raft id>` for controllers).
    pub node: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity: when renewal must have happened.
    pub not_after: SystemTime,
}

impl PeerIdentity {
    /// The lifetime the certificate was issued for (without the [`CLOCK_SKEW`] backdating).
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before + CLOCK_SKEW)
            .unwrap_or_default()
    }
}

/// A CSR for `node_id` made with an existing key (PKCS#8 PEM): a node that re-joins after its
/// certificate expired proves with it that it holds the key of its old certificate.
pub fn node_csr_with_key(node_id: &str, key_pem: &str) -> Result<String, CaError> {
    check_node_id(node_id)?;
    let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(CaError::Generate)?;
    csr.pem().map_err(CaError::Generate)
}

/// Verifies that `cert_der` (a peer's end-entity certificate) chains to `ca`, is valid at `now`
/// and allows client auth, and returns the role and node id it carries.
pub fn peer_role(cert_der: &[u8], ca: &CaCert, now: SystemTime) -> Result<(Role, String), CaError> {
    peer_identity(cert_der, ca, now).map(|p| (p.role, p.node))
}

/// [`peer_role`], with the certificate's end of validity.
pub fn peer_identity(
    cert_der: &[u8],
    ca: &CaCert,
    now: SystemTime,
) -> Result<PeerIdentity, CaError> {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let der = CertificateDer::from(cert_der);
    ca.client_verifier
        .verify_client_cert(&der, &[], UnixTime::since_unix_epoch(since_epoch))
        .map_err(CaError::Untrusted)?;
    names_of(cert_der)
}

/// Who an earlier certificate of this cluster names, expired or not: it must have been
/// signed by `ca` (checked at an instant inside its own validity). A node that was off longer
/// than its certificate's lifetime proves with it, and with a CSR of the same key
/// ([`csr_has_key_of`]), that it is the node it was.
pub fn previous_identity(cert_pem: &str, ca: &CaCert) -> Result<PeerIdentity, CaError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|_| CaError::Pem("certificate"))?;
    let (nb, na) = cert_validity(cert_pem)?;
    let inside = (nb + CLOCK_SKEW).min(na);
    peer_identity(&der, ca, inside)
}

/// Whether the CSR (whose self-signature proves possession of its key) is for the same key as
/// `cert_pem`.
pub fn csr_has_key_of(csr_pem: &str, cert_pem: &str) -> Result<bool, CaError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::Csr)?;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|_| CaError::Pem("certificate"))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| CaError::Cert(e.to_string()))?;
    let theirs: &[u8] = &cert.public_key().subject_public_key.data;
    Ok(bool::from(csr.public_key.der_bytes().ct_eq(theirs)))
}

/// The role, node id and end of validity a certificate names (not verified here).
pub fn names_of(cert_der: &[u8]) -> Result<PeerIdentity, CaError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| CaError::Cert(e.to_string()))?;
    let one = |it: &mut dyn Iterator<Item = Option<String>>, what: &str| {
        let v: Vec<_> = it.collect();
        match v.as_slice() {
            [Some(s)] => Ok(s.clone()),
            _ => Err(CaError::NoRole(format!("want exactly one subject {what}"))),
        }
    };
    let ou = one(
        &mut cert
            .subject()
            .iter_organizational_unit()
            .map(|a| a.as_str().ok().map(str::to_owned)),
        "ou",
    )?;
    let cn = one(
        &mut cert
            .subject()
            .iter_common_name()
            .map(|a| a.as_str().ok().map(str::to_owned)),
        "cn",
    )?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CaError::Cert(e.to_string()))?
        .ok_or_else(|| CaError::NoRole("no subject alternative names".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with(SAN_URI_PREFIX) => {
                Some(*u)
            }
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(CaError::NoRole("want exactly one rudder:// uri".into()));
    };
    let role: Role = ou.parse()?;
    if *uri != role_uri(role, &cn) {
        return Err(CaError::NoRole(format!(
            "uri {uri} disagrees with ou={ou} cn={cn}"
        )));
    }
    Ok(PeerIdentity {
        role,
        node: cn,
        not_before: from_unix(cert.validity().not_before.timestamp()),
        not_after: from_unix(cert.validity().not_after.timestamp()),
    })
}

/// Checks that `ca_pem` is the CA whose fingerprint a join token pinned, and returns it.
pub fn verify_ca_pin(ca_pem: &str, fingerprint: &str) -> Result<CaCert, CaError> {
    let ca = CaCert::from_pem(ca_pem)?;
    if !bool::from(ca.fingerprint.as_bytes().ct_eq(fingerprint.as_bytes())) {
        return Err(CaError::PinMismatch {
            expected: fingerprint.to_owned(),
            actual: ca.fingerprint,
        });
    }
    Ok(ca)
}

/// Validity window of a certificate (PEM), to feed [`renew_at`].
pub fn cert_validity(cert_pem: &str) -> Result<(SystemTime, SystemTime), CaError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|_| CaError::Pem("certificate"))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| CaError::Cert(e.to_string()))?;
    let v = cert.validity();
    Ok((
        from_unix(v.not_before.timestamp()),
        from_unix(v.not_after.timestamp()),
    ))
}

/// When to renew a certificate valid from `not_before` to `not_after`: a uniformly random
/// point between 50 % and 80 % of its lifetime, so a fleet does not renew all at once.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, rng: &mut impl Rng) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let fraction = rng.random_range(0.5..=0.8);
    not_before + lifetime.mul_f64(fraction)
}

/// A parsed join token: the CA fingerprint to pin and the role secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The CA fingerprint the joining node pins before it trusts anything the controller sends.
    pub fingerprint: String,
    /// The role secret (hex) the controller checks.
    pub secret: String,
}

/// Why a join token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format (the part named is wrong).
    #[error("ca: malformed join token: {0}")]
    Malformed(&'static str),
    /// The token pins another CA.
    #[error("ca: join token is for another cluster (ca fingerprint differs)")]
    WrongCa,
    /// No role has this secret (never issued, or rotated).
    #[error("ca: join token is unknown or was rotated")]
    Unknown,
    /// The token of this role has expired.
    #[error("ca: join token for {0} expired")]
    Expired(Role),
}

impl Token {
    /// Parses `RDR1-<64 hex>-<48 hex>`; checks the shape only.
    pub fn parse(s: &str) -> Result<Token, TokenError> {
        let mut parts = s.trim().split('-');
        let (Some(prefix), Some(fp), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("want RDR1-<fingerprint>-<secret>"));
        };
        if prefix != TOKEN_PREFIX {
            return Err(TokenError::Malformed("unknown prefix or version"));
        }
        if !is_lower_hex(fp, 64) {
            return Err(TokenError::Malformed(
                "fingerprint is not 64 hex characters",
            ));
        }
        if !is_lower_hex(secret, SECRET_BYTES * 2) {
            return Err(TokenError::Malformed(
                "secret has the wrong length or characters",
            ));
        }
        Ok(Token {
            fingerprint: fp.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}-{}-{}", self.fingerprint, self.secret)
    }
}

/// The cluster's current join secrets, one per joinable role. Serializable so managers can
/// replicate it through the store.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokens {
    fingerprint: String,
    worker: String,
    manager: String,
    /// When each token stops admitting (seconds since the epoch); none: until rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    worker_expires: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manager_expires: Option<u64>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl fmt::Debug for JoinTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secrets.
        f.debug_struct("JoinTokens")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl JoinTokens {
    /// Fresh worker and manager secrets for the CA with this fingerprint.
    pub fn generate(fingerprint: &str) -> Self {
        JoinTokens {
            fingerprint: fingerprint.to_owned(),
            worker: new_secret(),
            manager: new_secret(),
            worker_expires: None,
            manager_expires: None,
        }
    }

    /// The token to hand out for `role` (`None` for admin: admins get a certificate at init,
    /// never a token).
    pub fn token(&self, role: Role) -> Option<Token> {
        let secret = match role {
            Role::Worker => &self.worker,
            Role::Manager => &self.manager,
            Role::Admin => return None,
        };
        Some(Token {
            fingerprint: self.fingerprint.clone(),
            secret: secret.clone(),
        })
    }

    /// Replaces `role`'s secret; its previous token stops working. Returns the new token
    /// (`None` for admin, which has none).
    pub fn rotate(&mut self, role: Role) -> Option<Token> {
        self.rotate_with_ttl(role, None, SystemTime::now())
    }

    /// [`JoinTokens::rotate`], the new token admitting only until `now + ttl` (when given).
    pub fn rotate_with_ttl(
        &mut self,
        role: Role,
        ttl: Option<Duration>,
        now: SystemTime,
    ) -> Option<Token> {
        let expires = ttl.map(|t| unix(now + t));
        match role {
            Role::Worker => {
                self.worker = new_secret();
                self.worker_expires = expires;
            }
            Role::Manager => {
                self.manager = new_secret();
                self.manager_expires = expires;
            }
            Role::Admin => return None,
        }
        info!(%role, ?ttl, "ca: rotated join token");
        self.token(role)
    }

    /// The role a presented token grants, checked against the clock.
    pub fn verify_at(&self, token: &str, now: SystemTime) -> Result<Role, TokenError> {
        let role = self.verify(token)?;
        let expires = match role {
            Role::Worker => self.worker_expires,
            Role::Manager => self.manager_expires,
            Role::Admin => None,
        };
        if expires.is_some_and(|e| unix(now) >= e) {
            debug!(%role, "ca: refused expired join token");
            return Err(TokenError::Expired(role));
        }
        Ok(role)
    }

    /// The role a presented token grants, ignoring expiry (see [`JoinTokens::verify_at`]).
    pub fn verify(&self, token: &str) -> Result<Role, TokenError> {
        let t = Token::parse(token)?;
        if t.fingerprint != self.fingerprint {
            return Err(TokenError::WrongCa);
        }
        // Compare against both secrets, always, in constant time.
        let worker = t.secret.as_bytes().ct_eq(self.worker.as_bytes());
        let manager = t.secret.as_bytes().ct_eq(self.manager.as_bytes());
        if bool::from(worker) {
            Ok(Role::Worker)
        } else if bool::from(manager) {
            Ok(Role::Manager)
        } else {
            debug!("ca: refused unknown join token");
            Err(TokenError::Unknown)
        }
    }
}

/// A rustls server config presenting `cert_pem`/`key_pem` and requiring a client certificate
/// signed by `ca`.
pub fn server_config(
    ca: &CaCert,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ServerConfig, CaError> {
    let (chain, key) = identity(cert_pem, key_pem)?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(ca.client_verifier.clone())
        .with_single_cert(chain, key)?;
    Ok(cfg)
}

/// A rustls client config trusting only the CA in `ca_pem` and presenting `cert_pem`/`key_pem`.
/// Dial with the server's [`Role::server_name`] as the server name.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ClientConfig, CaError> {
    let ca = CaCert::from_pem(ca_pem)?;
    let (chain, key) = identity(cert_pem, key_pem)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(ca.roots.clone(), provider())
        .build()
        .map_err(|e| CaError::Verifier(e.to_string()))?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    Ok(cfg)
}

fn identity(
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CaError::Pem("certificate"))?;
    if chain.is_empty() {
        return Err(CaError::Pem("certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| CaError::Pem("private key"))?;
    Ok((chain, key))
}

/// The one crypto provider used everywhere (ring, as tonic's `tls-ring`), so nothing depends on
/// a process-wide default being installed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn role_uri(role: Role, node_id: &str) -> String {
    format!("{SAN_URI_PREFIX}{role}/node/{node_id}")
}

fn check_node_id(id: &str) -> Result<(), CaError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_NODE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CaError::NodeId(id.to_owned()))
    }
}

fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn new_secret() -> String {
    hex::encode(rand::random::<[u8; SECRET_BYTES]>())
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A positive 127-bit random serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = rand::random::<[u8; 16]>();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // keep it 16 bytes long, never a leading zero
    SerialNumber::from_slice(&bytes)
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Reads a join token from `path` (`--token-file`), refusing a file others could read.
pub fn read_token_file(path: &Path) -> Result<String, CaError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e| CaError::Io("read token file", path.to_owned(), e);
    let mode = fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(CaError::TokenFileOpen(path.to_owned(), mode & 0o777));
    }
    Ok(fs::read_to_string(path).map_err(io)?.trim().to_string())
}

/// Writes `data` to `path` with `mode` through a temporary file renamed into place, so a reader
/// never sees a partial key or certificate.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    // A name of its own: two writers of the same file (two `rctl` renewing the admin
    // certificate at once) must never write into each other's temporary file.
    let tmp = path.with_extension(format!("tmp-{}", hex::encode(rand::random::<[u8; 8]>())));
    let io = |op, e| CaError::Io(op, path.to_owned(), e);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    f.write_all(data).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    fs::rename(&tmp, path).map_err(|e| io("rename", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        fs::write(&p, "RDR1-x\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_token_file(&p).unwrap_err().to_string();
        assert!(err.contains("readable by others"), "{err}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "RDR1-x");
    }
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn now() -> SystemTime {
        // A fixed instant (2026-01-01T00:00:00Z): tests never read the clock.
        UNIX_EPOCH + Duration::from_secs(1_767_225_600)
    }

    fn issued(ca: &ClusterCa, role: Role, id: &str) -> (String, String) {
        let (key, csr) = node_csr(id).unwrap();
        let cert = ca.issue(&csr, role, id, now(), 90 * DAY).unwrap();
        (cert, key)
    }

    fn der_of(cert_pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn issue_and_peer_role_round_trip_for_each_role() {
        let ca = ClusterCa::generate("prod", now()).unwrap();
        for role in Role::ALL {
            let (cert, _) = issued(&ca, role, "node-1");
            let got = peer_role(&der_of(&cert), ca.cert(), now() + DAY).unwrap();
            assert_eq!(got, (role, "node-1".to_string()));
        }
    }

    #[test]
    fn csr_cannot_choose_its_role() {
        let ca = ClusterCa::generate("prod", now()).unwrap();
        // A CSR whose subject claims to be a manager still gets the role the CA chose.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["manager.rudder".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "manager");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let cert = ca.issue(&csr, Role::Worker, "w1", now(), DAY).unwrap();
        let (role, id) = peer_role(&der_of(&cert), ca.cert(), now()).unwrap();
        assert_eq!((role, id.as_str()), (Role::Worker, "w1"));
    }

    #[test]
    fn peer_role_refuses_other_ca_expired_and_ca_cert() {
        let ca = ClusterCa::generate("prod", now()).unwrap();
        let other = ClusterCa::generate("prod", now()).unwrap();
        let (cert, _) = issued(&other, Role::Manager, "m1");
        let err = peer_role(&der_of(&cert), ca.cert(), now()).unwrap_err();
        assert!(matches!(err, CaError::Untrusted(_)), "{err}");

        let (cert, _) = issued(&ca, Role::Manager, "m1");
        let err = peer_role(&der_of(&cert), ca.cert(), now() + 91 * DAY).unwrap_err();
        assert!(matches!(err, CaError::Untrusted(_)), "{err}");

        let err = peer_role(ca.cert().der(), ca.cert(), now()).unwrap_err();
        assert!(matches!(err, CaError::Untrusted(_)), "{err}");
    }

    #[test]
    fn issue_refuses_bad_node_id_and_garbage_csr() {
        let ca = ClusterCa::generate("prod", now()).unwrap();
        let (_, csr) = node_csr("n").unwrap();
        for bad in ["", "a/b", "x y", &"a".repeat(65)] {
            assert!(matches!(
                ca.issue(&csr, Role::Worker, bad, now(), DAY),
                Err(CaError::NodeId(_))
            ));
        }
        assert!(matches!(
            ca.issue("not a csr", Role::Worker, "n", now(), DAY),
            Err(CaError::Csr(_))
        ));
    }

    #[test]
    fn save_and_load_keep_the_ca_and_protect_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("prod", now()).unwrap();
        ca.save(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = ClusterCa::load(dir.path()).unwrap();
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        // The loaded CA signs certificates the original CA's cert verifies.
        let (cert, _) = issued(&loaded, Role::Worker, "w1");
        assert_eq!(
            peer_role(&der_of(&cert), ca.cert(), now()).unwrap().0,
            Role::Worker
        );
        // A key from another CA is refused.
        let other = ClusterCa::generate("prod", now()).unwrap();
        assert!(matches!(
            ClusterCa::from_pem(ca.cert_pem(), &other.key_pem),
            Err(CaError::KeyMismatch)
        ));
    }

    #[test]
    fn ca_is_valid_ten_years_and_fingerprint_is_sha256_hex() {
        let ca = ClusterCa::generate("prod", now()).unwrap();
        let (nb, na) = cert_validity(ca.cert_pem()).unwrap();
        assert_eq!(nb, now() - CLOCK_SKEW);
        assert_eq!(na, now() + CA_VALIDITY);
        assert_eq!(ca.fingerprint().len(), 64);
        assert_eq!(
            ca.fingerprint(),
            hex::encode(Sha256::digest(ca.cert().der()))
        );
    }

    #[test]
    fn ca_pin() {
        let ca = ClusterCa::generate("prod", now()).unwrap();
        let other = ClusterCa::generate("prod", now()).unwrap();
        assert_eq!(
            verify_ca_pin(ca.cert_pem(), ca.fingerprint())
                .unwrap()
                .fingerprint(),
            ca.fingerprint()
        );
        assert!(matches!(
            verify_ca_pin(other.cert_pem(), ca.fingerprint()),
            Err(CaError::PinMismatch { .. })
        ));
    }

    #[test]
    fn join_tokens_verify_roles() {
        let ca = ClusterCa::generate("prod", now()).unwrap();
        let tokens = JoinTokens::generate(ca.fingerprint());
        let worker = tokens.token(Role::Worker).unwrap();
        let manager = tokens.token(Role::Manager).unwrap();
        assert_ne!(worker, manager);
        assert!(tokens.token(Role::Admin).is_none());
        assert_eq!(tokens.verify(&worker.to_string()), Ok(Role::Worker));
        assert_eq!(tokens.verify(&manager.to_string()), Ok(Role::Manager));
        // A joining node learns the fingerprint to pin from the token.
        let parsed = Token::parse(&worker.to_string()).unwrap();
        assert_eq!(parsed.fingerprint, ca.fingerprint());
        verify_ca_pin(ca.cert_pem(), &parsed.fingerprint).unwrap();
    }

    #[test]
    fn join_token_for_another_ca_is_refused() {
        let ca = ClusterCa::generate("prod", now()).unwrap();
        let other = ClusterCa::generate("prod", now()).unwrap();
        let tokens = JoinTokens::generate(ca.fingerprint());
        let mut foreign = tokens.token(Role::Worker).unwrap();
        foreign.fingerprint = other.fingerprint().to_owned();
        assert_eq!(
            tokens.verify(&foreign.to_string()),
            Err(TokenError::WrongCa)
        );
    }

    #[test]
    fn rotated_token_is_refused() {
        let mut tokens = JoinTokens::generate(&"ab".repeat(32));
        let old_worker = tokens.token(Role::Worker).unwrap().to_string();
        let manager = tokens.token(Role::Manager).unwrap().to_string();
        let new_worker = tokens.rotate(Role::Worker).unwrap().to_string();
        assert_ne!(old_worker, new_worker);
        assert_eq!(tokens.verify(&old_worker), Err(TokenError::Unknown));
        assert_eq!(tokens.verify(&new_worker), Ok(Role::Worker));
        // Rotating one role leaves the other alone.
        assert_eq!(tokens.verify(&manager), Ok(Role::Manager));
        assert!(tokens.rotate(Role::Admin).is_none());
        // Round trip through serde (how managers would replicate it).
        let json = serde_json::to_string(&tokens).unwrap();
        let back: JoinTokens = serde_json::from_str(&json).unwrap();
        assert_eq!(back.verify(&new_worker), Ok(Role::Worker));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let tokens = JoinTokens::generate(&"ab".repeat(32));
        let good = tokens.token(Role::Worker).unwrap();
        let fp = &good.fingerprint;
        let s = &good.secret;
        for bad in [
            String::new(),
            "RDR1".to_string(),
            format!("RDR2-{fp}-{s}"),
            format!("RDR1-{fp}"),
            format!("RDR1-{fp}-{s}-x"),
            format!("RDR1-{}-{s}", &fp[1..]),
            format!("RDR1-{fp}-{}", &s[1..]),
            format!("RDR1-{fp}-{}", s.to_uppercase()),
            format!("RDR1-{}-{s}", "zz".repeat(32)),
        ] {
            assert!(
                matches!(tokens.verify(&bad), Err(TokenError::Malformed(_))),
                "{bad:?}"
            );
        }
        // Surrounding whitespace (a pasted token) is fine.
        assert_eq!(tokens.verify(&format!(" {good}\n")), Ok(Role::Worker));
    }

    #[test]
    fn renew_at_stays_within_50_to_80_percent() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let nb = now();
        let na = nb + 100 * DAY;
        let (mut lo, mut hi) = (na, nb);
        for _ in 0..1000 {
            let t = renew_at(nb, na, &mut rng);
            assert!(t >= nb + 50 * DAY && t <= nb + 80 * DAY, "{t:?}");
            lo = lo.min(t);
            hi = hi.max(t);
        }
        // Jittered, not a constant.
        assert!(hi.duration_since(lo).unwrap() > 20 * DAY);
        // A degenerate window renews at once.
        assert_eq!(renew_at(nb, nb, &mut rng), nb);
        assert_eq!(renew_at(na, nb, &mut rng), na);
    }

    /// Runs one TLS handshake over 127.0.0.1; the server sends "ok" once it accepted the
    /// client. Returns the server's view (peer certificate or error) and what the client read.
    async fn handshake(
        server: rustls::ServerConfig,
        client: rustls::ClientConfig,
        server_name: &'static str,
    ) -> (Result<Vec<u8>, std::io::Error>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await?;
            let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
            tls.write_all(b"ok").await?;
            tls.shutdown().await?;
            Ok(peer)
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(server_name).unwrap();
        let mut read = Vec::new();
        if let Ok(mut tls) = connector.connect(name, tcp).await {
            let _ = tls.read_to_end(&mut read).await;
        }
        (srv.await.unwrap(), read)
    }

    #[tokio::test]
    async fn tls_handshake_with_ca_signed_client_cert() {
        let ca = ClusterCa::generate("prod", SystemTime::now()).unwrap();
        let (scert, skey) = issued_now(&ca, Role::Manager, "m1");
        let (ccert, ckey) = issued_now(&ca, Role::Worker, "w1");
        let server = server_config(ca.cert(), &scert, &skey).unwrap();
        let client = client_config(ca.cert_pem(), &ccert, &ckey).unwrap();
        let (peer, read) = handshake(server, client, Role::Manager.server_name()).await;
        let peer = peer.expect("server accepted the client");
        assert_eq!(read, b"ok");
        // The API layer's view of the peer.
        assert_eq!(
            peer_role(&peer, ca.cert(), SystemTime::now()).unwrap(),
            (Role::Worker, "w1".to_string())
        );
    }

    #[tokio::test]
    async fn tls_handshake_fails_with_client_cert_from_another_ca() {
        let ca = ClusterCa::generate("prod", SystemTime::now()).unwrap();
        let other = ClusterCa::generate("prod", SystemTime::now()).unwrap();
        let (scert, skey) = issued_now(&ca, Role::Manager, "m1");
        // Same cluster name, so same issuer DN: only the signature tells them apart.
        let (ccert, ckey) = issued_now(&other, Role::Manager, "evil");
        let server = server_config(ca.cert(), &scert, &skey).unwrap();
        // The client trusts the real CA (so only the client cert is wrong).
        let client = client_config(ca.cert_pem(), &ccert, &ckey).unwrap();
        let (peer, read) = handshake(server, client, Role::Manager.server_name()).await;
        let err = peer.expect_err("server must refuse a foreign client cert");
        assert!(
            err.to_string().contains("invalid peer certificate"),
            "{err}"
        );
        assert!(read.is_empty());
    }

    #[tokio::test]
    async fn tls_client_refuses_worker_posing_as_manager_and_foreign_server() {
        let ca = ClusterCa::generate("prod", SystemTime::now()).unwrap();
        let other = ClusterCa::generate("prod", SystemTime::now()).unwrap();
        let (ccert, ckey) = issued_now(&ca, Role::Worker, "w1");
        // A server holding a worker certificate cannot answer as manager.rudder.
        let (wcert, wkey) = issued_now(&ca, Role::Worker, "w2");
        let server = server_config(ca.cert(), &wcert, &wkey).unwrap();
        let client = client_config(ca.cert_pem(), &ccert, &ckey).unwrap();
        let (peer, read) = handshake(server, client, Role::Manager.server_name()).await;
        assert!(peer.is_err() && read.is_empty());
        // A server from another CA is refused.
        let (fcert, fkey) = issued_now(&other, Role::Manager, "m9");
        let server = server_config(other.cert(), &fcert, &fkey).unwrap();
        let client = client_config(ca.cert_pem(), &ccert, &ckey).unwrap();
        let (peer, read) = handshake(server, client, Role::Manager.server_name()).await;
        assert!(peer.is_err() && read.is_empty());
    }

    /// TLS checks validity against the real clock, so these certificates start now.
    fn issued_now(ca: &ClusterCa, role: Role, id: &str) -> (String, String) {
        let (key, csr) = node_csr(id).unwrap();
        let cert = ca.issue(&csr, role, id, SystemTime::now(), DAY).unwrap();
        (cert, key)
    }

    #[test]
    fn a_token_with_a_ttl_expires() {
        let mut t = JoinTokens::generate(&"a".repeat(64));
        let now = SystemTime::now();
        let tok = t
            .rotate_with_ttl(Role::Worker, Some(Duration::from_secs(60)), now)
            .unwrap()
            .to_string();
        assert_eq!(t.verify_at(&tok, now), Ok(Role::Worker));
        assert_eq!(
            t.verify_at(&tok, now + Duration::from_secs(61)),
            Err(TokenError::Expired(Role::Worker))
        );
        // The manager token has no ttl; a plain rotation clears the worker's.
        let m = t.token(Role::Manager).unwrap().to_string();
        assert_eq!(
            t.verify_at(&m, now + Duration::from_secs(3600)),
            Ok(Role::Manager)
        );
        let tok = t.rotate(Role::Worker).unwrap().to_string();
        assert_eq!(
            t.verify_at(&tok, now + Duration::from_secs(3600)),
            Ok(Role::Worker)
        );
        let back: JoinTokens = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }
}

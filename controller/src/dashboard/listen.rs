//! The dashboard's HTTPS listener: the controller's node certificate (followed across
//! renewals) as server certificate, and a client certificate that is *optional* (a browser
//! usually has none) but, when presented, must chain to the cluster CA; its identity travels
//! with the connection as axum `ConnectInfo<Client>`.
//!
//! Invariants: handshakes run in tasks of their own under [`HANDSHAKE_TIMEOUT`], at most
//! [`MAX_HANDSHAKES`] at once; a certificate from another CA fails the handshake; a
//! certificate that chains but carries no valid role is refused (connection dropped).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rudder_pki::ca::{self, CaError, PeerIdentity};
use rudder_pki::tls::NodeCerts;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// A client must finish its TLS handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes run at once.
pub const MAX_HANDSHAKES: usize = 64;

/// Who is on the other end of a dashboard connection.
#[derive(Clone, Debug)]
pub struct Client {
    /// Its address.
    pub addr: SocketAddr,
    /// The certificate it presented, if any (verified against the cluster CA).
    pub cert: Option<PeerIdentity>,
}

/// The TLS server configuration for `certs`: their node certificate, client certificates from
/// their CA optional. ALPN offers h2 and http/1.1.
pub fn server_config(certs: &NodeCerts) -> Result<rustls::ServerConfig, CaError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(certs.cert_pem().as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| CaError::Verifier(format!("dashboard: node certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(certs.key_pem().as_bytes())
        .map_err(|e| CaError::Verifier(format!("dashboard: node key: {e}")))?;
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(certs.ca().der().to_vec()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), ca::provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| CaError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(ca::provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Accepts TCP connections and yields those that completed a TLS handshake.
pub struct DashListener {
    tcp: TcpListener,
    certs: watch::Receiver<NodeCerts>,
    current: (NodeCerts, TlsAcceptor),
    handshakes: JoinSet<Option<DashConn>>,
}

impl DashListener {
    /// Serves on `tcp` with the latest of `certs`.
    pub fn new(tcp: TcpListener, mut certs: watch::Receiver<NodeCerts>) -> Result<Self, CaError> {
        let c = certs.borrow_and_update().clone();
        let acceptor = TlsAcceptor::from(Arc::new(server_config(&c)?));
        Ok(Self {
            tcp,
            certs,
            current: (c, acceptor),
            handshakes: JoinSet::new(),
        })
    }

    /// The acceptor for the latest certificate (rebuilt after a renewal).
    fn latest(&mut self) -> (NodeCerts, TlsAcceptor) {
        if self.certs.has_changed().unwrap_or(false) {
            let c = self.certs.borrow_and_update().clone();
            match server_config(&c) {
                Ok(cfg) => self.current = (c, TlsAcceptor::from(Arc::new(cfg))),
                Err(e) => warn!(%e, "dashboard: keeps the old certificate"),
            }
        }
        self.current.clone()
    }
}

impl Listener for DashListener {
    type Io = DashConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (DashConn, SocketAddr) {
        loop {
            let room = self.handshakes.len() < MAX_HANDSHAKES;
            tokio::select! {
                (tcp, addr) = Listener::accept(&mut self.tcp), if room => {
                    let (certs, acceptor) = self.latest();
                    self.handshakes.spawn(handshake(acceptor, certs, tcp, addr));
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(conn)) = done {
                        let addr = conn.who.addr;
                        return (conn, addr);
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    certs: NodeCerts,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Option<DashConn> {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(err)) => {
            debug!(%addr, %err, "dashboard: tls handshake failed");
            return None;
        }
        Err(_) => {
            debug!(%addr, "dashboard: tls handshake timed out");
            return None;
        }
    };
    let cert = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        None => None,
        Some(leaf) => match ca::peer_identity(leaf, certs.ca(), SystemTime::now()) {
            Ok(id) => Some(id),
            Err(err) => {
                warn!(%addr, %err, "dashboard: client certificate refused");
                return None;
            }
        },
    };
    Some(DashConn {
        stream,
        who: Client { addr, cert },
    })
}

/// A TLS connection and the dashboard client on the other end.
pub type DashConn = crate::tls_conn::TlsConn<Client>;

impl Connected<IncomingStream<'_, DashListener>> for Client {
    fn connect_info(stream: IncomingStream<'_, DashListener>) -> Self {
        stream.io().who.clone()
    }
}

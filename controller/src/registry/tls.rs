//! Mutual TLS for the registry: every connection to it, from agents, `rctl` and the other
//! managers, presents a certificate from the cluster CA, and the role that certificate carries
//! decides what the connection may do.
//!
//! [`serve_tls`] accepts TCP connections, runs each TLS handshake in a task of its own under
//! [`HANDSHAKE_TIMEOUT`], and hands axum only connections whose client certificate verified;
//! the role and node id read from it ([`Peer`]) travel with the connection as axum
//! `ConnectInfo` to the `authorize` middleware. [`RegistryTls::peer_client`] is the client a
//! manager reads blobs through with from the other managers' registries.
//!
//! Invariants:
//! - no request reaches a handler without a client certificate that chains to the cluster CA
//!   and whose role [`ca::peer_role`] read;
//! - GET and HEAD (pull) are open to every role; any other method (push, delete, and methods
//!   the registry does not know) needs a manager or admin certificate, else 403 `DENIED`;
//! - a client that has not finished its handshake within the timeout is dropped, and at most
//!   [`MAX_HANDSHAKES`] handshakes run at once, so slow clients cannot hold the listener;
//! - the node certificate can be replaced while serving ([`RegistryTls::renew`]); every
//!   handshake after that, as server or as peer client, presents the new one;
//! - as a client, a manager accepts a peer only with a manager certificate
//!   ([`Role::server_name`]) from the same CA, whatever address it dialed.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{peers, RegistryError};
use crate::ca::{self, CaCert, CaError, Role};
use crate::tls::NodeCerts;

/// A client must finish its TLS handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes run at once; further connections wait in the kernel's
/// backlog until one finishes.
pub const MAX_HANDSHAKES: usize = 256;

/// Who is on the other end of a registry connection, from its verified client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The role from the certificate.
    pub role: Role,
    /// The node id (certificate CN), for logs and refusals.
    pub node: String,
    /// The peer's address.
    pub addr: SocketAddr,
    /// The end of the certificate's validity: checked at every request, since a connection
    /// may outlive it.
    pub not_after: SystemTime,
}

/// What the cluster says about a caller beyond its certificate, asked at every request.
pub trait AccessPolicy: Send + Sync + 'static {
    /// Whether certificates of `role` naming `node` were revoked (`rctl node rm`,
    /// `rm-manager`, `revoke-admin`).
    fn revoked(&self, role: Role, node: &str) -> bool;
    /// Whether worker `node` may read repository `repo`: the image of a task placed on it, or
    /// anything while it runs a build an admin asked for.
    fn worker_may_read(&self, node: &str, repo: &str) -> bool;
}

/// The policy of a registry on its own (tests): nothing is revoked, workers read everything.
struct Open;

impl AccessPolicy for Open {
    fn revoked(&self, _: Role, _: &str) -> bool {
        false
    }
    fn worker_may_read(&self, _: &str, _: &str) -> bool {
        true
    }
}

/// Nodes that run a build right now, and so may pull any base image for it. A lease ends when
/// its guard is dropped (the build ended, however it ended).
#[derive(Debug, Default)]
pub struct PullLeases(std::sync::Mutex<std::collections::HashMap<String, usize>>);

impl PullLeases {
    /// Counts one more pull of `node`'s, until the lease is dropped.
    pub fn grant(self: &Arc<Self>, node: &str) -> PullLease {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.to_string())
            .or_default() += 1;
        PullLease {
            leases: self.clone(),
            node: node.to_string(),
        }
    }

    /// Whether `node` has a pull in progress.
    pub fn held(&self, node: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .is_some_and(|n| *n > 0)
    }
}

/// One build's permission for its node to pull any repository.
#[derive(Debug)]
pub struct PullLease {
    leases: Arc<PullLeases>,
    node: String,
}

impl Drop for PullLease {
    fn drop(&mut self) {
        let mut m = self.leases.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.node) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.node);
            }
        }
    }
}

/// This manager's TLS identity for the registry: the cluster CA and the node certificate,
/// which [`RegistryTls::renew`] replaces in place. Cheap to clone; clones share the
/// certificate.
#[derive(Clone)]
pub struct RegistryTls {
    ca: CaCert,
    identity: Arc<Identity>,
    server: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    policy: Arc<dyn AccessPolicy>,
}

impl std::fmt::Debug for RegistryTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryTls")
            .field("ca", &self.ca.fingerprint())
            .finish_non_exhaustive()
    }
}

impl RegistryTls {
    /// Serves `certs`'s node certificate and requires client certificates from its CA. ALPN
    /// offers h2 and http/1.1.
    pub fn new(certs: &NodeCerts) -> Result<Self, CaError> {
        let ca = certs.ca().clone();
        let identity = Arc::new(Identity(RwLock::new(certified_key(certs)?)));
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca)?, ca::provider())
            .build()
            .map_err(|e| CaError::Verifier(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(ca::provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(identity.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            ca,
            identity,
            server: Arc::new(server),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            policy: Arc::new(Open),
        })
    }

    /// Asks `policy` at every request (revocation, what workers may read). Without one,
    /// nothing is revoked and workers read every repository.
    pub fn with_policy(mut self, policy: Arc<dyn AccessPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// Presents `certs`'s (renewed) node certificate from now on, as server and as peer client.
    /// The CA must stay the same.
    pub fn renew(&self, certs: &NodeCerts) -> Result<(), CaError> {
        if certs.ca().fingerprint() != self.ca.fingerprint() {
            return Err(CaError::PinMismatch {
                expected: self.ca.fingerprint().to_owned(),
                actual: certs.ca().fingerprint().to_owned(),
            });
        }
        let key = certified_key(certs)?;
        *self.identity.0.write().unwrap_or_else(|p| p.into_inner()) = key;
        debug!("registry: tls certificate replaced");
        Ok(())
    }

    /// An HTTPS client for the other managers' registries (`https://host:port`): presents this
    /// node's certificate and accepts only a server holding a manager certificate from the
    /// cluster CA.
    pub fn peer_client(&self) -> Result<reqwest::Client, RegistryError> {
        let err = |e: &dyn std::fmt::Display| RegistryError::PeerClient(format!("tls: {e}"));
        let roots = roots(&self.ca).map_err(|e| err(&e))?;
        let inner = WebPkiServerVerifier::builder_with_provider(roots, ca::provider())
            .build()
            .map_err(|e| err(&e))?;
        let verifier = Arc::new(rudder_image::FixedNameVerifier::new(
            inner,
            ServerName::try_from(Role::Manager.server_name()).map_err(|e| err(&e))?,
        ));
        let mut config = rustls::ClientConfig::builder_with_provider(ca::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(&e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(self.identity.clone());
        // The client is built without HTTP/2.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        peers::client_builder()
            .use_preconfigured_tls(config)
            .build()
            .map_err(|e| err(&e))
    }

    #[cfg(test)]
    pub(crate) fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }
}

/// Serves the registry over mutual TLS on `listener` until `shutdown` completes, then drains
/// in-flight requests. Pulls are open to every cluster certificate; pushes and deletes need a
/// manager or admin one.
pub async fn serve_tls(
    listener: TcpListener,
    state: super::RegistryState,
    tls: RegistryTls,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RegistryError> {
    let addr = listener
        .local_addr()
        .map_err(RegistryError::io("registry listener address"))?;
    tracing::info!(%addr, "registry listening (mutual tls)");
    let listener = TlsListener {
        tcp: listener,
        acceptor: TlsAcceptor::from(tls.server.clone()),
        ca: tls.ca.clone(),
        timeout: tls.handshake_timeout,
        handshakes: JoinSet::new(),
    };
    let app = super::routes(state, true)
        .layer(axum::Extension(Policy(tls.policy.clone())))
        .into_make_service_with_connect_info::<Peer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(RegistryError::io("serve registry"))
}

/// The policy as a request extension, for [`authorize`].
#[derive(Clone)]
struct Policy(Arc<dyn AccessPolicy>);

/// Per request: the certificate is still valid and not revoked; managers and admins read and
/// write; workers read only the repositories the policy grants them (L4, L5), never the
/// catalog, and write nothing.
pub(crate) async fn authorize(req: Request, next: Next) -> Response {
    let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<Peer>>() else {
        // Only served behind `serve_tls`, which always sets it; refuse rather than trust.
        return denied("registry: no client certificate on this connection".into());
    };
    let policy = req
        .extensions()
        .get::<Policy>()
        .map(|p| p.0.clone())
        .unwrap_or_else(|| Arc::new(Open));
    match allowed(
        peer,
        req.method(),
        req.uri().path(),
        policy.as_ref(),
        SystemTime::now(),
    ) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            warn!(node = %peer.node, role = %peer.role, method = %req.method(),
                path = req.uri().path(), why, "registry: request refused");
            denied(why)
        }
    }
}

/// The decision of [`authorize`], without the HTTP around it.
fn allowed(
    peer: &Peer,
    method: &Method,
    path: &str,
    policy: &dyn AccessPolicy,
    now: SystemTime,
) -> Result<(), String> {
    if now > peer.not_after {
        return Err(format!(
            "registry: node {}'s certificate expired during this connection",
            peer.node
        ));
    }
    if policy.revoked(peer.role, &peer.node) {
        return Err(format!(
            "registry: {} was removed from the cluster: its certificates are revoked",
            peer.node
        ));
    }
    let read = matches!(*method, Method::GET | Method::HEAD);
    match peer.role {
        Role::Manager | Role::Admin => Ok(()),
        Role::Worker if !read => Err(format!(
            "registry: {method} (push or delete) needs a manager or admin certificate; node {} \
             presented a worker certificate",
            peer.node
        )),
        Role::Worker => {
            let rest = path.trim_start_matches("/v2").trim_matches('/');
            if rest.is_empty() {
                return Ok(());
            }
            let repo = ["/manifests/", "/blobs/", "/tags/"]
                .iter()
                .find_map(|sep| rest.split_once(sep).map(|(r, _)| r));
            match repo {
                Some(repo) if policy.worker_may_read(&peer.node, repo) => Ok(()),
                Some(repo) => Err(format!(
                    "registry: node {} runs no task of {repo}: workers pull only their tasks' \
                     images",
                    peer.node
                )),
                None => Err(format!(
                    "registry: {path} is for managers and admins (node {} is a worker)",
                    peer.node
                )),
            }
        }
    }
}

/// The distribution spec's `DENIED` error.
fn denied(message: String) -> Response {
    let body = serde_json::json!({
        "errors": [{ "code": "DENIED", "message": message, "detail": null }]
    });
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
}

/// Accepts TCP connections and yields those that completed a mutual TLS handshake with a
/// certificate carrying a valid role.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    ca: CaCert,
    timeout: Duration,
    /// Handshakes under way, each in its own task; dropped (and aborted) with the listener.
    handshakes: JoinSet<Option<TlsConn>>,
}

impl Listener for TlsListener {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsConn, SocketAddr) {
        loop {
            let room = self.handshakes.len() < MAX_HANDSHAKES;
            tokio::select! {
                // axum's accept logs and backs off on errors such as EMFILE.
                (tcp, addr) = Listener::accept(&mut self.tcp), if room => {
                    let acceptor = self.acceptor.clone();
                    let (ca, timeout) = (self.ca.clone(), self.timeout);
                    self.handshakes.spawn(handshake(acceptor, ca, timeout, tcp, addr));
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

/// Completes the TLS handshake within `timeout` and reads the client certificate's role.
async fn handshake(
    acceptor: TlsAcceptor,
    ca: CaCert,
    timeout: Duration,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Option<TlsConn> {
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            debug!(%addr, %err, "registry: tls handshake failed");
            return None;
        }
        Err(_) => {
            debug!(%addr, ?timeout, "registry: tls handshake timed out");
            return None;
        }
    };
    // The verifier required a certificate from the CA; read which role it gives.
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    match ca::peer_identity(leaf, &ca, SystemTime::now()) {
        Ok(id) => {
            debug!(%addr, role = %id.role, node = id.node, "registry: tls connection");
            Some(TlsConn {
                stream,
                who: Peer {
                    role: id.role,
                    node: id.node,
                    addr,
                    not_after: id.not_after,
                },
            })
        }
        Err(err) => {
            warn!(%addr, %err, "registry: client certificate refused");
            None
        }
    }
}

/// A TLS connection and the registry peer on the other end.
type TlsConn = crate::tls_conn::TlsConn<Peer>;

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.io().who.clone()
    }
}

/// The node certificate and key, presented as server and as client; replaced on renewal.
#[derive(Debug)]
struct Identity(RwLock<Arc<CertifiedKey>>);

impl Identity {
    fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn certified_key(certs: &NodeCerts) -> Result<Arc<CertifiedKey>, CaError> {
    let chain = CertificateDer::pem_slice_iter(certs.cert_pem().as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CaError::Pem("certificate"))?;
    if chain.is_empty() {
        return Err(CaError::Pem("certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(certs.key_pem().as_bytes())
        .map_err(|_| CaError::Pem("private key"))?;
    Ok(Arc::new(CertifiedKey::from_der(
        chain,
        key,
        &ca::provider(),
    )?))
}

fn roots(ca: &CaCert) -> Result<Arc<RootCertStore>, CaError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec()))?;
    Ok(Arc::new(roots))
}

#[cfg(test)]
mod tests {
    //! Real TLS on 127.0.0.1 with certificates from a fresh cluster CA, driven by the registry
    //! client agents and `rctl` use.

    use std::time::Duration;

    use rudder_image::{ClientTls, ImageError, RegistryClient};
    use serde_json::json;
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::ca::{node_csr, ClusterCa};
    use crate::registry::{BlobStore, MemTagStore, RegistryState, StaticPeers, TagStore};

    const DAY: Duration = Duration::from_secs(24 * 3600);
    const REPO: &str = "library/app";

    fn node_certs(ca: &ClusterCa, role: Role, id: &str) -> NodeCerts {
        let (key, csr) = node_csr(id).unwrap();
        let cert = ca.issue(&csr, role, id, SystemTime::now(), DAY).unwrap();
        NodeCerts::new(ca.cert_pem(), &cert, &key, None).unwrap()
    }

    struct Server {
        addr: SocketAddr,
        tls: RegistryTls,
        _dir: tempfile::TempDir,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    impl Server {
        async fn start(tls: RegistryTls) -> Self {
            Self::start_with(tls, Arc::new(MemTagStore::new()), None).await
        }

        /// A TLS registry over its own blob directory; reads through from `peers` (if any)
        /// over mutual TLS.
        async fn start_with(
            tls: RegistryTls,
            tags: Arc<dyn TagStore>,
            peers: Option<Vec<String>>,
        ) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let blobs = BlobStore::open(dir.path().join("registry")).unwrap();
            let mut state = RegistryState::new(blobs, tags);
            if let Some(peers) = peers {
                state = state
                    .with_tls_peers(Arc::new(StaticPeers(peers)), &tls)
                    .unwrap();
            }
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let served = tls.clone();
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stopped.await;
                };
                serve_tls(listener, state, served, shutdown).await.unwrap();
            });
            Self {
                addr,
                tls,
                _dir: dir,
                _stop: stop,
            }
        }

        /// The registry client, presenting `certs` and trusting `ca_pem`.
        fn client_trusting(&self, ca_pem: &str, certs: &NodeCerts) -> RegistryClient {
            let tls = ClientTls {
                ca_pem: ca_pem.to_owned(),
                cert_pem: certs.cert_pem().to_owned(),
                key_pem: certs.key_pem().to_owned(),
                server_name: Role::Manager.server_name().to_owned(),
            };
            RegistryClient::with_tls(&self.addr.to_string(), &tls).unwrap()
        }

        fn client(&self, certs: &NodeCerts) -> RegistryClient {
            self.client_trusting(certs.ca().pem(), certs)
        }

        fn https(&self, path: &str) -> String {
            format!(
                "https://{}:{}{path}",
                Role::Manager.server_name(),
                self.addr.port()
            )
        }

        /// A plain reqwest client with `config`, resolving the manager name to this server.
        fn reqwest(&self, config: rustls::ClientConfig) -> reqwest::Client {
            reqwest::Client::builder()
                .use_preconfigured_tls(config)
                .resolve(Role::Manager.server_name(), self.addr)
                .build()
                .unwrap()
        }
    }

    struct Image {
        config: Vec<u8>,
        layer: Vec<u8>,
        manifest: Vec<u8>,
    }

    impl Image {
        fn new(layer: &[u8]) -> Self {
            let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
            let manifest = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": rudder_image::digest::of_bytes(&config),
                    "size": config.len(),
                },
                "layers": [{
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": rudder_image::digest::of_bytes(layer),
                    "size": layer.len(),
                }],
            }))
            .unwrap();
            Self {
                config,
                layer: layer.to_vec(),
                manifest,
            }
        }

        async fn push(&self, client: &RegistryClient) -> Result<String, ImageError> {
            for blob in [&self.config, &self.layer] {
                let digest = rudder_image::digest::of_bytes(blob);
                client.push_blob(REPO, &digest, blob.clone()).await?;
            }
            let media_type = "application/vnd.oci.image.manifest.v1+json";
            client
                .push_manifest(REPO, "v1", media_type, self.manifest.clone())
                .await
        }

        /// Pulls `REPO:v1` and checks it is this image, layer bytes included.
        async fn pull_and_check(&self, client: &RegistryClient) {
            let (_, manifest, _) = client.get_manifest(REPO, "v1").await.unwrap();
            assert_eq!(manifest, self.manifest);
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("layer");
            let digest = rudder_image::digest::of_bytes(&self.layer);
            client.get_blob_to_file(REPO, &digest, &dest).await.unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), self.layer);
        }
    }

    /// Whether a client error is a refused TLS handshake (reported as a TLS or a connection
    /// failure, depending on where the client's HTTP stack notices it).
    fn refused_handshake(err: &ImageError) -> bool {
        matches!(err, ImageError::Http { .. } | ImageError::Tls { .. })
    }

    fn denied(err: ImageError) -> String {
        match err {
            ImageError::Registry {
                status: 403,
                code,
                message,
                ..
            } if code == "DENIED" => message,
            other => panic!("want 403 DENIED, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn admin_pushes_and_worker_pulls() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let server =
            Server::start(RegistryTls::new(&node_certs(&ca, Role::Manager, "m1")).unwrap()).await;
        let admin = server.client(&node_certs(&ca, Role::Admin, "admin"));
        let image = Image::new(b"layer bytes, pushed over tls");
        let digest = image.push(&admin).await.unwrap();
        assert_eq!(digest, rudder_image::digest::of_bytes(&image.manifest));
        assert!(admin.base().starts_with("https://127.0.0.1:"));

        image
            .pull_and_check(&server.client(&node_certs(&ca, Role::Worker, "w1")))
            .await;
        image.pull_and_check(&admin).await;

        // A manager may push too (an image replicated or pushed through a controller).
        let manager = server.client(&node_certs(&ca, Role::Manager, "m2"));
        Image::new(b"another layer").push(&manager).await.unwrap();
    }

    #[tokio::test]
    async fn worker_can_pull_but_not_push_or_delete() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let server =
            Server::start(RegistryTls::new(&node_certs(&ca, Role::Manager, "m1")).unwrap()).await;
        let image = Image::new(b"some layer");
        image
            .push(&server.client(&node_certs(&ca, Role::Admin, "admin")))
            .await
            .unwrap();

        let worker_certs = node_certs(&ca, Role::Worker, "w1");
        let worker = server.client(&worker_certs);
        image.pull_and_check(&worker).await;
        let message = denied(Image::new(b"a new layer").push(&worker).await.unwrap_err());
        assert!(
            message.contains("node w1 presented a worker certificate"),
            "{message}"
        );
        // Nothing of the refused push was stored: the manifest is unchanged.
        let (_, manifest, _) = worker.get_manifest(REPO, "v1").await.unwrap();
        assert_eq!(manifest, image.manifest);

        // Pushing a manifest whose blobs exist is refused as well, and so is a delete; the
        // refusal carries the distribution spec's error body and API version header.
        let err = worker
            .push_manifest(
                REPO,
                "v2",
                "application/vnd.oci.image.manifest.v1+json",
                image.manifest.clone(),
            )
            .await
            .unwrap_err();
        denied(err);
        let config = ca::client_config(
            ca.cert_pem(),
            worker_certs.cert_pem(),
            worker_certs.key_pem(),
        )
        .unwrap();
        let http = server.reqwest(config);
        let digest = rudder_image::digest::of_bytes(&image.manifest);
        let resp = http
            .delete(server.https(&format!("/v2/{REPO}/manifests/{digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::FORBIDDEN);
        assert_eq!(
            resp.headers()["docker-distribution-api-version"],
            "registry/2.0"
        );
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "DENIED");
        image.pull_and_check(&worker).await;
    }

    #[tokio::test]
    async fn handshake_needs_a_certificate_from_the_cluster_ca() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let other = ClusterCa::generate("other", SystemTime::now()).unwrap();
        let server =
            Server::start(RegistryTls::new(&node_certs(&ca, Role::Manager, "m1")).unwrap()).await;
        let admin = node_certs(&ca, Role::Admin, "admin");

        // The control: the same kind of client with the cluster's admin certificate gets in.
        let with_cert =
            ca::client_config(ca.cert_pem(), admin.cert_pem(), admin.key_pem()).unwrap();
        let resp = server
            .reqwest(with_cert)
            .get(server.https("/v2/"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK);

        // No client certificate: the server ends the handshake.
        let no_cert = rustls::ClientConfig::builder_with_provider(ca::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(ca.cert()).unwrap())
            .with_no_client_auth();
        let err = server
            .reqwest(no_cert)
            .get(server.https("/v2/"))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_connect() || err.is_request(), "{err:?}");

        // A certificate from another cluster's CA (trusting this cluster's CA as a server).
        let foreign = node_certs(&other, Role::Admin, "admin");
        let err = server
            .client_trusting(ca.cert_pem(), &foreign)
            .get_manifest(REPO, "v1")
            .await
            .unwrap_err();
        assert!(refused_handshake(&err), "{err:?}");

        // A client of the other cluster does not trust this server either.
        let err = server
            .client(&foreign)
            .get_manifest(REPO, "v1")
            .await
            .unwrap_err();
        assert!(refused_handshake(&err), "{err:?}");
    }

    #[tokio::test]
    async fn clients_accept_only_a_manager_certificate() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        // A registry serving a worker certificate (an agent posing as a controller).
        let server =
            Server::start(RegistryTls::new(&node_certs(&ca, Role::Worker, "w9")).unwrap()).await;
        let admin = server.client(&node_certs(&ca, Role::Admin, "admin"));
        let err = admin.get_manifest(REPO, "v1").await.unwrap_err();
        assert!(refused_handshake(&err), "{err:?}");
    }

    #[tokio::test]
    async fn slow_handshakes_time_out_without_blocking_others() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let tls = RegistryTls::new(&node_certs(&ca, Role::Manager, "m1"))
            .unwrap()
            .with_handshake_timeout(Duration::from_millis(300));
        let server = Server::start(tls).await;
        // Connects and never says a word.
        let mut silent = TcpStream::connect(server.addr).await.unwrap();

        // Meanwhile others are served.
        let admin = server.client(&node_certs(&ca, Role::Admin, "admin"));
        assert!(admin
            .get_manifest(REPO, "v1")
            .await
            .unwrap_err()
            .is_not_found());

        // Then the server hangs up on the silent one.
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .expect("the server closes a silent connection after the handshake timeout");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn renewed_certificate_is_served_to_new_connections() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let server =
            Server::start(RegistryTls::new(&node_certs(&ca, Role::Manager, "m1")).unwrap()).await;
        let admin = node_certs(&ca, Role::Admin, "admin");
        let served_cert = || async {
            let config =
                ca::client_config(ca.cert_pem(), admin.cert_pem(), admin.key_pem()).unwrap();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tcp = TcpStream::connect(server.addr).await.unwrap();
            let name = ServerName::try_from(Role::Manager.server_name()).unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
        };
        let first = served_cert().await;

        let renewed = node_certs(&ca, Role::Manager, "m1");
        server.tls.renew(&renewed).unwrap();
        let second = served_cert().await;
        assert_ne!(first, second);
        let want = CertificateDer::from_pem_slice(renewed.cert_pem().as_bytes()).unwrap();
        assert_eq!(second, want.to_vec());

        // Certificates of another CA are refused: clients would stop trusting the server.
        let other = ClusterCa::generate("other", SystemTime::now()).unwrap();
        let err = server
            .tls
            .renew(&node_certs(&other, Role::Manager, "m1"))
            .unwrap_err();
        assert!(matches!(err, CaError::PinMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn managers_read_through_from_each_other_over_tls() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let tags: Arc<dyn TagStore> = Arc::new(MemTagStore::new());
        let a_tls = RegistryTls::new(&node_certs(&ca, Role::Manager, "m1")).unwrap();
        let a = Server::start_with(a_tls, tags.clone(), None).await;
        let b_tls = RegistryTls::new(&node_certs(&ca, Role::Manager, "m2")).unwrap();
        let peers = vec![format!("https://{}", a.addr)];
        let b = Server::start_with(b_tls, tags, Some(peers)).await;

        let image = Image::new(b"pushed to m1 only");
        image
            .push(&a.client(&node_certs(&ca, Role::Admin, "admin")))
            .await
            .unwrap();
        // The worker asks m2, which fetches the manifest and layer from m1 over mutual TLS.
        image
            .pull_and_check(&b.client(&node_certs(&ca, Role::Worker, "w1")))
            .await;
    }

    /// A push to one of two managers is acknowledged only once the other holds its blobs too:
    /// the copy travels over mutual TLS under the manager's own certificate, which may push.
    #[tokio::test]
    async fn uploads_reach_a_majority_over_tls() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let tags: Arc<dyn TagStore> = Arc::new(MemTagStore::new());
        let b_tls = RegistryTls::new(&node_certs(&ca, Role::Manager, "m2")).unwrap();
        let b = Server::start_with(b_tls, tags.clone(), None).await;
        let a_tls = RegistryTls::new(&node_certs(&ca, Role::Manager, "m1")).unwrap();
        let peers = vec![format!("https://{}", b.addr)];
        let a = Server::start_with(a_tls, tags, Some(peers)).await;

        let image = Image::new(b"pushed to m1, on m2 before the ack");
        image
            .push(&a.client(&node_certs(&ca, Role::Admin, "admin")))
            .await
            .unwrap();
        // m2 has no peers to read through from: the blobs are on its own disk.
        let worker = b.client(&node_certs(&ca, Role::Worker, "w1"));
        let dir = tempfile::tempdir().unwrap();
        for (i, blob) in [&image.config, &image.layer].into_iter().enumerate() {
            let dest = dir.path().join(i.to_string());
            let digest = rudder_image::digest::of_bytes(blob);
            worker.get_blob_to_file(REPO, &digest, &dest).await.unwrap();
            assert_eq!(&std::fs::read(&dest).unwrap(), blob);
        }
    }
}

#[cfg(test)]
mod policy_tests {
    //! The per-request decision (L4, L5, H4), table-driven.

    use super::*;

    struct Policy {
        revoked: &'static [&'static str],
        /// (worker, repository) pairs the cluster grants.
        grants: &'static [(&'static str, &'static str)],
    }

    impl AccessPolicy for Policy {
        fn revoked(&self, _: Role, node: &str) -> bool {
            self.revoked.contains(&node)
        }
        fn worker_may_read(&self, node: &str, repo: &str) -> bool {
            self.grants.contains(&(node, repo))
        }
    }

    fn peer(role: Role, node: &str, not_after: SystemTime) -> Peer {
        Peer {
            role,
            node: node.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            not_after,
        }
    }

    #[test]
    fn workers_read_only_their_tasks_images_and_nobody_revoked_or_expired_gets_in() {
        let now = SystemTime::now();
        let later = now + Duration::from_secs(60);
        let policy = Policy {
            revoked: &["gone"],
            grants: &[("w1", "lib/app")],
        };
        let check = |p: &Peer, m: Method, path: &str| allowed(p, &m, path, &policy, now);
        let w1 = peer(Role::Worker, "w1", later);
        // Its task's repository: manifests, blobs and tags.
        check(&w1, Method::GET, "/v2/").unwrap();
        check(&w1, Method::GET, "/v2/lib/app/manifests/1").unwrap();
        check(&w1, Method::HEAD, "/v2/lib/app/blobs/sha256:00").unwrap();
        check(&w1, Method::GET, "/v2/lib/app/tags/list").unwrap();
        // Anything else is refused, naming why.
        let e = check(&w1, Method::GET, "/v2/other/manifests/1").unwrap_err();
        assert!(e.contains("runs no task of other"), "{e}");
        let e = check(&w1, Method::GET, "/v2/_catalog").unwrap_err();
        assert!(e.contains("managers and admins"), "{e}");
        let e = check(&w1, Method::PUT, "/v2/lib/app/manifests/1").unwrap_err();
        assert!(e.contains("push or delete"), "{e}");
        // Managers and admins read and write everything.
        for role in [Role::Manager, Role::Admin] {
            let p = peer(role, "m", later);
            check(&p, Method::GET, "/v2/_catalog").unwrap();
            check(&p, Method::PUT, "/v2/x/manifests/1").unwrap();
        }
        // A revoked identity, whatever its role, gets nothing more on its open connection.
        let e = check(&peer(Role::Admin, "gone", later), Method::GET, "/v2/").unwrap_err();
        assert!(e.contains("revoked"), "{e}");
        // Nor does a certificate that expired since the handshake.
        let old = peer(Role::Manager, "m", now - Duration::from_secs(1));
        let e = check(&old, Method::GET, "/v2/").unwrap_err();
        assert!(e.contains("expired"), "{e}");
    }

    #[test]
    fn a_pull_lease_lasts_as_long_as_its_build() {
        let leases: Arc<PullLeases> = Default::default();
        assert!(!leases.held("w1"));
        let a = leases.grant("w1");
        let b = leases.grant("w1");
        drop(a);
        assert!(leases.held("w1"));
        drop(b);
        assert!(!leases.held("w1"));
    }
}

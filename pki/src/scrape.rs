//! The metrics endpoint every controller and agent serves: Prometheus text exposition over
//! HTTPS with a client certificate from the cluster CA ([`serve_https`]), and optionally over
//! plain HTTP on an address the operator chose ([`serve_plain`]).
//!
//! It speaks just enough HTTP/1.x for a scraper: one request per connection, answered and
//! closed. What is served comes from a `render` function the caller passes; this module knows
//! nothing about metrics.
//!
//! Invariants:
//! - over HTTPS, a client without a certificate from the cluster CA never completes the
//!   handshake; one whose certificate `admit` refuses (workers, revoked admins) gets 403 with
//!   the reason, and nothing is rendered for it;
//! - only `GET /metrics` (with or without a query) is answered with metrics: other paths get
//!   404, other methods 405;
//! - the request head must arrive within [`HEADER_TIMEOUT`] and fit in [`MAX_REQUEST_HEAD`]
//!   bytes (else 408 / 431 and the connection is closed); a request body is never read;
//! - at most [`MAX_CONNECTIONS`] connections are served at once; further ones wait in the
//!   kernel's backlog; every connection ends within [`CONNECTION_DEADLINE`];
//! - the server certificate follows renewals: each handshake uses the latest one.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::ca::{self, PeerIdentity, Role};
use crate::tls::NodeCerts;

/// A client must send its whole request head within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A client must finish its TLS handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a request head (request line and headers) may be.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// At most this many connections are served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Every connection is closed after this, whatever it is doing (a slow reader of the answer).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(60);
/// The content type of the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the endpoint could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The listener failed (what, error).
    #[error("metrics: {0}: {1}")]
    Io(&'static str, io::Error),
    /// The TLS configuration could not be built from the node certificate.
    #[error("metrics: tls: {0}")]
    Tls(#[from] ca::CaError),
}

/// Renders the exposition text at each scrape. Runs on a blocking thread: it may read files.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Decides, per HTTPS request, whether the certificate's holder may scrape: `Err` carries the
/// reason returned to it.
pub type Admit = Arc<dyn Fn(&PeerIdentity) -> Result<(), String> + Send + Sync>;

/// The role rule both binaries share: administrators (Prometheus holds an admin certificate)
/// and managers may scrape; workers may not. A worker certificate lives on every host that
/// runs workloads, the least trusted machines of a cluster, and the metrics name every
/// service, node and task: a worker has no need to read them, so a compromised one does not
/// learn the cluster's shape from them.
pub fn role_may_scrape(role: Role) -> Result<(), String> {
    match role {
        Role::Admin | Role::Manager => Ok(()),
        Role::Worker => Err(
            "metrics: a worker certificate may not scrape; use an admin certificate \
             (rctl cluster admin-cert) for Prometheus"
                .into(),
        ),
    }
}

/// What a request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`.
    Metrics,
    /// Another path.
    NotFound,
    /// Another method.
    MethodNotAllowed,
    /// Not an HTTP/1.x request line.
    BadRequest,
}

/// Reads the request line of `head` (pure).
pub fn route(head: &[u8]) -> Route {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return Route::BadRequest;
    }
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

/// Where the request head ends (just past the blank line), if it has arrived.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Why a request head could not be read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    TooLarge,
    TimedOut,
    Closed,
}

async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = head_end(&buf) {
                buf.truncate(end);
                return Ok(());
            }
            if buf.len() > MAX_REQUEST_HEAD {
                return Err(HeadError::TooLarge);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err(HeadError::Closed),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    match tokio::time::timeout(HEADER_TIMEOUT, read).await {
        Ok(Ok(())) if buf.len() <= MAX_REQUEST_HEAD => Ok(buf),
        Ok(Ok(())) => Err(HeadError::TooLarge),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(HeadError::TimedOut),
    }
}

fn response(status: &str, content_type: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn plain(status: &str, body: &str) -> Vec<u8> {
    response(
        status,
        "text/plain; charset=utf-8",
        &format!("{body}\n"),
        "",
    )
}

/// Serves one request on `stream`: `refusal` (from [`Admit`]) answers 403 before anything
/// is rendered.
async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    render: Render,
    refusal: Option<String>,
) {
    let reply = match read_head(&mut stream).await {
        Err(HeadError::Closed) => return,
        Err(HeadError::TimedOut) => plain(
            "408 Request Timeout",
            "metrics: the request head did not arrive in time",
        ),
        Err(HeadError::TooLarge) => plain(
            "431 Request Header Fields Too Large",
            &format!("metrics: the request head exceeds {MAX_REQUEST_HEAD} bytes"),
        ),
        Ok(head) => match (route(&head), refusal) {
            (Route::BadRequest, _) => plain("400 Bad Request", "metrics: not an HTTP/1.x request"),
            (_, Some(why)) => plain("403 Forbidden", &why),
            (Route::NotFound, None) => plain("404 Not Found", "metrics: only /metrics is served"),
            (Route::MethodNotAllowed, None) => response(
                "405 Method Not Allowed",
                "text/plain; charset=utf-8",
                "metrics: only GET is served\n",
                "Allow: GET\r\n",
            ),
            (Route::Metrics, None) => match tokio::task::spawn_blocking(move || render()).await {
                Ok(text) => response("200 OK", CONTENT_TYPE, &text, ""),
                Err(e) => {
                    warn!(%e, "metrics: rendering failed");
                    plain(
                        "500 Internal Server Error",
                        "metrics: rendering failed; see the log",
                    )
                }
            },
        },
    };
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}

/// A `--metrics-listen` value: an address, or `off`. Both binaries' flags parse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<std::net::SocketAddr>);

/// Parses a [`Listen`] (clap `value_parser`).
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (an address such as 0.0.0.0:4246, or off)"))
}

/// Serves `/metrics` at `https` (certificates from `certs`, holders admitted by `admit`) and
/// at `plain`, each in a task of its own, until `stop` turns true. A listener that cannot be
/// bound is logged and skipped: metrics are not worth refusing to run.
pub async fn spawn_listeners(
    https: Option<std::net::SocketAddr>,
    plain: Option<std::net::SocketAddr>,
    certs: watch::Receiver<NodeCerts>,
    admit: Admit,
    render: Render,
    stop: &watch::Receiver<bool>,
) {
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(addr) = https {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                let (render, stop) = (render.clone(), stop.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_https(l, certs, admit, render, stopped(stop)).await {
                        tracing::error!(%e, "metrics endpoint stopped");
                    }
                });
            }
            Err(e) => tracing::error!(%addr, %e, "metrics: cannot listen (https); not served"),
        }
    }
    if let Some(addr) = plain {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                let stop = stop.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_plain(l, render, stopped(stop)).await {
                        tracing::error!(%e, "metrics endpoint stopped");
                    }
                });
            }
            Err(e) => tracing::error!(%addr, %e, "metrics: cannot listen (plain http); not served"),
        }
    }
}

/// The next connection with its slot (one of [`MAX_CONNECTIONS`]), or `None` once
/// `shutdown` completes. A failed accept (EMFILE and the like) backs off rather than spins.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<(
    tokio::sync::OwnedSemaphorePermit,
    tokio::net::TcpStream,
    std::net::SocketAddr,
)> {
    let permit = slots.clone().acquire_owned().await.ok()?;
    loop {
        tokio::select! {
            _ = &mut shutdown => return None,
            r = listener.accept() => match r {
                Ok((tcp, peer)) => return Some((permit, tcp, peer)),
                Err(e) => {
                    debug!(%e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Serves `render` over plain HTTP on `listener` until `shutdown` completes. Anyone who
/// reaches the address may scrape: bind it where only the scraper can.
pub async fn serve_plain(
    listener: TcpListener,
    render: Render,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ScrapeError> {
    let addr = listener
        .local_addr()
        .map_err(|e| ScrapeError::Io("listener address", e))?;
    info!(%addr, "metrics listening (plain http)");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let Some((permit, tcp, peer)) = accept(&listener, &slots, shutdown.as_mut()).await else {
            return Ok(());
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if tokio::time::timeout(CONNECTION_DEADLINE, serve_conn(tcp, render, None))
                .await
                .is_err()
            {
                debug!(%peer, "metrics: connection deadline passed");
            }
        });
    }
}

/// The TLS server configuration for the latest node certificate, rebuilt when it changes.
struct Acceptors {
    certs: watch::Receiver<NodeCerts>,
    current: (NodeCerts, TlsAcceptor),
}

impl Acceptors {
    fn new(mut certs: watch::Receiver<NodeCerts>) -> Result<Self, ScrapeError> {
        let c = certs.borrow_and_update().clone();
        let acceptor = acceptor(&c)?;
        Ok(Self {
            certs,
            current: (c, acceptor),
        })
    }

    fn latest(&mut self) -> (NodeCerts, TlsAcceptor) {
        if self.certs.has_changed().unwrap_or(false) {
            let c = self.certs.borrow_and_update().clone();
            match acceptor(&c) {
                Ok(a) => self.current = (c, a),
                Err(e) => warn!(%e, "metrics: keeps the old certificate"),
            }
        }
        self.current.clone()
    }
}

fn acceptor(certs: &NodeCerts) -> Result<TlsAcceptor, ScrapeError> {
    let mut cfg = ca::server_config(certs.ca(), certs.cert_pem(), certs.key_pem())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves `render` over HTTPS on `listener` until `shutdown` completes: the server presents
/// the latest of `certs` and requires a client certificate from the same CA, which `admit`
/// then accepts or refuses (403).
pub async fn serve_https(
    listener: TcpListener,
    certs: watch::Receiver<NodeCerts>,
    admit: Admit,
    render: Render,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ScrapeError> {
    let addr = listener
        .local_addr()
        .map_err(|e| ScrapeError::Io("listener address", e))?;
    let mut acceptors = Acceptors::new(certs)?;
    info!(%addr, "metrics listening (https, client certificate required)");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let Some((permit, tcp, peer)) = accept(&listener, &slots, shutdown.as_mut()).await else {
            return Ok(());
        };
        let (certs, acceptor) = acceptors.latest();
        let (render, admit) = (render.clone(), admit.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let serve = async {
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            debug!(%peer, %e, "metrics: tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "metrics: tls handshake timed out");
                            return;
                        }
                    };
                let refusal = match stream.get_ref().1.peer_certificates() {
                    Some([leaf, ..]) => {
                        match ca::peer_identity(leaf, certs.ca(), SystemTime::now()) {
                            Ok(id) => admit(&id).err().inspect(|why| {
                                warn!(%peer, node = %id.node, role = %id.role, why,
                                    "metrics: scrape refused");
                            }),
                            Err(e) => Some(format!("metrics: client certificate refused: {e}")),
                        }
                    }
                    _ => Some("metrics: no client certificate".to_string()),
                };
                serve_conn(stream, render, refusal).await;
            };
            if tokio::time::timeout(CONNECTION_DEADLINE, serve)
                .await
                .is_err()
            {
                debug!(%peer, "metrics: connection deadline passed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{node_csr, ClusterCa};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[test]
    fn a_listen_flag_is_an_address_or_off() {
        assert_eq!(parse_listen("off"), Ok(Listen(None)));
        assert_eq!(
            parse_listen("127.0.0.1:4246"),
            Ok(Listen(Some("127.0.0.1:4246".parse().unwrap())))
        );
        let e = parse_listen("4246").unwrap_err();
        assert!(e.contains("\"4246\"") && e.contains("or off"), "{e}");
    }

    #[test]
    fn routes_only_get_metrics() {
        let cases: &[(&[u8], Route)] = &[
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Route::Metrics),
            (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", Route::Metrics),
            (b"GET / HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"GET /metrics/ HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Route::MethodNotAllowed),
            (b"HEAD /metrics HTTP/1.1\r\n\r\n", Route::MethodNotAllowed),
            (b"GET /metrics HTTP/2.0\r\n\r\n", Route::BadRequest),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", Route::BadRequest),
            (b"GET http://x/metrics HTTP/1.1\r\n\r\n", Route::BadRequest),
            (b"\xff\xfe\r\n\r\n", Route::BadRequest),
            (b"", Route::BadRequest),
        ];
        for (head, want) in cases {
            assert_eq!(route(head), *want, "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn workers_may_not_scrape() {
        assert!(role_may_scrape(Role::Admin).is_ok());
        assert!(role_may_scrape(Role::Manager).is_ok());
        let why = role_may_scrape(Role::Worker).unwrap_err();
        assert!(why.contains("worker certificate"), "{why}");
    }

    async fn plain_server() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let render: Render = Arc::new(|| "rudder_up 1\n".to_string());
        tokio::spawn(serve_plain(l, render, std::future::pending()));
        addr
    }

    async fn exchange(addr: std::net::SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn plain_listener_answers_and_refuses() {
        let addr = plain_server().await;
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains(CONTENT_TYPE) && ok.ends_with("rudder_up 1\n"),
            "{ok}"
        );
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET"),
            "{post}"
        );
        let other = exchange(addr, b"GET /debug HTTP/1.1\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD + 10));
        let big = exchange(addr, &big).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_request_head_times_out() {
        let addr = plain_server().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let mut out = String::new();
        let read = tokio::time::timeout(HEADER_TIMEOUT * 2, s.read_to_string(&mut out));
        read.await.expect("closed by the server").unwrap();
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    }

    fn issue(ca: &ClusterCa, role: Role, node: &str) -> NodeCerts {
        let (key, csr) = node_csr(node).unwrap();
        let now = SystemTime::now();
        let cert = ca
            .issue(&csr, role, node, now, Duration::from_secs(3600))
            .unwrap();
        NodeCerts::with_ca(ca, &cert, &key).unwrap()
    }

    async fn tls_get(
        addr: std::net::SocketAddr,
        ca: &ClusterCa,
        client: Option<&NodeCerts>,
    ) -> Result<String, String> {
        let roots = {
            let mut r = rustls::RootCertStore::empty();
            r.add(rustls::pki_types::CertificateDer::from(
                ca.cert().der().to_vec(),
            ))
            .unwrap();
            r
        };
        let builder = rustls::ClientConfig::builder_with_provider(ca::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let cfg = match client {
            Some(c) => ca::client_config(ca.cert_pem(), c.cert_pem(), c.key_pem()).unwrap(),
            None => builder.with_no_client_auth(),
        };
        let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(Role::Manager.server_name()).unwrap();
        let mut s = conn.connect(name, tcp).await.map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[tokio::test]
    async fn https_requires_an_admitted_client_certificate() {
        let ca = ClusterCa::generate("test", SystemTime::now()).unwrap();
        let server = issue(&ca, Role::Manager, "controller-1");
        let (_tx, rx) = watch::channel(server);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let render: Render = Arc::new(|| "rudder_up 1\n".to_string());
        let admit: Admit = Arc::new(|id| role_may_scrape(id.role));
        tokio::spawn(serve_https(l, rx, admit, render, std::future::pending()));

        let admin = issue(&ca, Role::Admin, "admin-1");
        let ok = tls_get(addr, &ca, Some(&admin)).await.unwrap();
        assert!(
            ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("rudder_up 1\n"),
            "{ok}"
        );

        let worker = issue(&ca, Role::Worker, "node-1");
        let refused = tls_get(addr, &ca, Some(&worker)).await.unwrap();
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
        assert!(!refused.contains("rudder_up"), "{refused}");

        // No certificate: the handshake (or the first read after it) fails.
        let none = tls_get(addr, &ca, None).await;
        assert!(
            none.is_err() || none.as_ref().is_ok_and(|s| s.is_empty()),
            "{none:?}"
        );

        // A certificate from another CA: the same.
        let other = ClusterCa::generate("other", SystemTime::now()).unwrap();
        let stranger = issue(&other, Role::Admin, "admin-2");
        let cfg = ca::client_config(other.cert_pem(), stranger.cert_pem(), stranger.key_pem());
        assert!(cfg.is_ok());
        let r = tls_get(addr, &ca, Some(&stranger)).await;
        assert!(
            r.is_err() || r.as_ref().is_ok_and(|s| s.is_empty()),
            "{r:?}"
        );
    }
}

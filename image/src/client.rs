//! A client for the OCI distribution spec v2: enough to push, pull and copy images (blob
//! HEAD/GET/upload/cross-repository mount, manifest GET/PUT). It speaks plain HTTP
//! ([`RegistryClient::new`], for tests and registries reached with `--insecure`), mutual TLS
//! ([`RegistryClient::with_tls`], for the cluster's own registry, which refuses anything else),
//! or HTTPS checked against the system's CA store ([`RegistryClient::with_system_roots`], for
//! any other registry). [`RegistryClient::remote`] picks between the last two for a host named
//! in an image reference.
//!
//! Every request answers a 401 once through the client's [`Authenticator`] (Basic, or a Bearer
//! token from the registry's token service; see `auth`), then remembers the scheme so that
//! later requests carry credentials from the start. Clones share that memory.
//!
//! Invariants: repository names and digests are validated before they go into a URL; a blob
//! fetched to a file is hashed while it streams and only renamed into place when its digest
//! matches; registry errors become [`ImageError::Registry`] naming what was asked for. A
//! mutual-TLS client trusts only the CA it is given (never the web PKI or the system store) and
//! accepts a server only if its certificate carries the configured server name, whatever
//! address was dialed; a system-roots client does ordinary web PKI checks against the host
//! dialed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Body, Response, StatusCode, Url};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tracing::{debug, info};

use crate::auth::{Authenticator, Credentials, Scope};
use crate::oci::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use crate::reference::{valid_repository, valid_tag};
use crate::{digest, ImageError, Result};

/// Manifests larger than this are refused (the spec asks registries to accept 4 MiB).
const MAX_MANIFEST_BYTES: usize = 8 << 20;
/// A registry that does not accept the connection within this is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client needs to reach a registry that speaks mutual TLS (the cluster's own), all PEM.
#[derive(Clone)]
pub struct ClientTls {
    /// The one CA to trust: the cluster CA. Nothing else is trusted.
    pub ca_pem: String,
    /// This node's certificate, presented to the registry, which decides by its role what the
    /// client may do (workers pull; managers and admins also push).
    pub cert_pem: String,
    /// The certificate's private key.
    pub key_pem: String,
    /// The name the registry's certificate must carry, whatever address is dialed: registries
    /// are dialed by IP, and Rudder's certificates name a role (`manager.rudder`), not a host.
    pub server_name: String,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Where the bytes of a blob to upload come from.
#[derive(Debug, Clone)]
pub enum BlobSource {
    /// Bytes held in memory (manifests, configs).
    Bytes(Vec<u8>),
    /// A whole file (a blob of the content store).
    File(PathBuf),
    /// `len` bytes at `offset` of a file: a member of an uncompressed tar archive, uploaded
    /// without extracting it first.
    FileRange {
        /// The archive file.
        path: PathBuf,
        /// Where the member's bytes start.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
}

impl From<Vec<u8>> for BlobSource {
    fn from(bytes: Vec<u8>) -> Self {
        BlobSource::Bytes(bytes)
    }
}

impl From<PathBuf> for BlobSource {
    fn from(path: PathBuf) -> Self {
        BlobSource::File(path)
    }
}

impl From<&Path> for BlobSource {
    fn from(path: &Path) -> Self {
        BlobSource::File(path.to_path_buf())
    }
}

impl BlobSource {
    /// The request body and its length.
    async fn into_body(self) -> Result<(Body, u64)> {
        match self {
            BlobSource::Bytes(bytes) => {
                let len = bytes.len() as u64;
                Ok((Body::from(bytes), len))
            }
            BlobSource::File(path) => {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| ImageError::io_path("open", &path, e))?;
                let len = file
                    .metadata()
                    .await
                    .map_err(|e| ImageError::io_path("stat", &path, e))?
                    .len();
                Ok((Body::from(file), len))
            }
            BlobSource::FileRange { path, offset, len } => {
                let mut file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| ImageError::io_path("open", &path, e))?;
                file.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(|e| ImageError::io_path("seek in", &path, e))?;
                let reader = tokio::io::AsyncReadExt::take(file, len);
                let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 << 10);
                Ok((Body::wrap_stream(stream), len))
            }
        }
    }
}

/// A registry at one base URL.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    /// `http://host:port` or `https://host:port`, no trailing slash; also how the registry is
    /// named in errors.
    base: String,
    http: reqwest::Client,
    /// Answers this registry's 401s; shared by clones so a token is fetched once per scope.
    auth: Arc<Authenticator>,
}

impl RegistryClient {
    /// A plain-HTTP client. `base` is `http://10.213.1.1:5000` or `127.0.0.1:5000` (http:// is
    /// added when missing).
    pub fn new(base: &str) -> Result<RegistryClient> {
        let base = normalize_base(base, "http", HTTPS_NEEDS_TLS)?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ImageError::Http {
                registry: base.clone(),
                source: e,
            })?;
        Ok(RegistryClient::assemble(base, http))
    }

    /// A client speaking mutual TLS with `tls`'s certificates. `base` is
    /// `https://10.213.1.1:5000` or `10.213.1.1:5000` (https:// is added when missing).
    pub fn with_tls(base: &str, tls: &ClientTls) -> Result<RegistryClient> {
        let base = normalize_base(
            base,
            "https",
            "the cluster registry speaks https only; drop http:// or use https://",
        )?;
        let config = tls_config(tls).map_err(|detail| ImageError::Tls {
            registry: base.clone(),
            detail,
        })?;
        RegistryClient::with_rustls(base, config)
    }

    /// An HTTPS client that trusts the system's CA store (`/etc/ssl/certs`, or what
    /// `SSL_CERT_FILE`/`SSL_CERT_DIR` name), for registries outside the cluster. `base` is
    /// `registry.example.com`, `host:port` or `https://host:port`.
    pub fn with_system_roots(base: &str) -> Result<RegistryClient> {
        let base = normalize_base(
            base,
            "https",
            "an https client; use a plain-http client (--insecure) for http://",
        )?;
        let config = system_tls_config().map_err(|detail| ImageError::Tls {
            registry: base.clone(),
            detail,
        })?;
        RegistryClient::with_rustls(base, config)
    }

    /// A client for the registry `host` (`host[:port]`, as an image reference names it):
    /// HTTPS with the system's roots, or plain HTTP when `insecure`. `--insecure` never means
    /// "HTTPS without verification": a registry with a private CA is trusted by adding that CA
    /// to the system store, as for curl.
    pub fn remote(
        host: &str,
        insecure: bool,
        credentials: Option<Credentials>,
    ) -> Result<RegistryClient> {
        let client = if insecure {
            RegistryClient::new(host)?
        } else {
            RegistryClient::with_system_roots(host)?
        };
        Ok(client.with_credentials(credentials))
    }

    /// The same client answering 401s with `credentials` (a fresh token cache).
    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> RegistryClient {
        self.auth = Arc::new(Authenticator::new(self.base.clone(), credentials));
        self
    }

    /// A web client for a build's `ADD <url>`: https verified against the system's roots
    /// (as [`RegistryClient::with_system_roots`]), plain http as it is.
    pub fn web() -> Result<reqwest::Client> {
        Self::web_builder()?.build().map_err(|e| ImageError::Http {
            registry: "web".into(),
            source: e,
        })
    }

    /// [`RegistryClient::web`]'s settings, for a caller that adds its own (address checks,
    /// redirect policy, total timeout).
    pub fn web_builder() -> Result<reqwest::ClientBuilder> {
        let config = system_tls_config().map_err(|detail| ImageError::Tls {
            registry: "web".into(),
            detail,
        })?;
        Ok(reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // A server that stops sending for this long has stalled.
            .read_timeout(std::time::Duration::from_secs(60))
            .use_preconfigured_tls(config))
    }

    fn with_rustls(base: String, config: rustls::ClientConfig) -> Result<RegistryClient> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .use_preconfigured_tls(config)
            .build()
            .map_err(|e| ImageError::Http {
                registry: base.clone(),
                source: e,
            })?;
        Ok(RegistryClient::assemble(base, http))
    }

    fn assemble(base: String, http: reqwest::Client) -> RegistryClient {
        let auth = Arc::new(Authenticator::new(base.clone(), None));
        RegistryClient { base, http, auth }
    }

    /// The base URL, e.g. `http://127.0.0.1:5000`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /v2/`: is this a registry, and do our credentials (if any) get us in? Used by
    /// `rctl login` to check a password before storing it.
    pub async fn ping(&self) -> Result<()> {
        let url = self.url("/v2/")?;
        let resp = self
            .send(&Scope::Registry, || self.http.get(url.clone()))
            .await?;
        if !resp.status().is_success() {
            return Err(self.error(resp, "/v2/".into(), "api").await);
        }
        Ok(())
    }

    /// Does the registry hold this blob in this repository?
    pub async fn blob_exists(&self, repo: &str, digest: &str) -> Result<bool> {
        let url = self.blob_url(repo, digest)?;
        let resp = self
            .send(&Scope::Pull(repo.to_string()), || {
                self.http.head(url.clone())
            })
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.error(resp, format!("{repo}@{digest}"), "blob").await),
        }
    }

    /// Uploads a blob unless the registry already has it. Returns whether it was uploaded.
    /// The upload is monolithic: POST to open a session, PUT the bytes with `?digest=`.
    pub async fn push_blob(
        &self,
        repo: &str,
        digest: &str,
        source: impl Into<BlobSource>,
    ) -> Result<bool> {
        if self.blob_exists(repo, digest).await? {
            debug!(repo, digest, "blob already in registry");
            return Ok(false);
        }
        let (body, len) = source.into().into_body().await?;
        self.upload_blob(repo, digest, body, len).await?;
        Ok(true)
    }

    /// Uploads `len` bytes of `body` as blob `digest` (whether or not the registry has it
    /// already): POST opens a session, one PUT with `?digest=` fills and closes it. The POST
    /// settles authentication first, since a streamed body cannot be sent twice.
    pub async fn upload_blob(&self, repo: &str, digest: &str, body: Body, len: u64) -> Result<()> {
        let mut put = self
            .start_upload(repo, digest, None)
            .await?
            .ok_or_else(|| {
                ImageError::invalid("upload", "registry mounted a blob nobody asked to mount")
            })?;
        put.query_pairs_mut().append_pair("digest", digest);
        let subject = format!("{repo}@{digest}");
        let req = self
            .http
            .put(put)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, len)
            .body(body);
        let resp = self.send_once(&Scope::Push(repo.to_string()), req).await?;
        if !resp.status().is_success() {
            return Err(self.error(resp, subject, "blob").await);
        }
        info!(repo, digest, bytes = len, "pushed blob");
        Ok(())
    }

    /// Asks the registry to make blob `digest` of repository `from` part of `repo` without
    /// sending its bytes (a cross-repository mount). `true` when it did; `false` when it
    /// cannot (unknown blob, or mounts unsupported), and then the session it opened instead
    /// is cancelled.
    pub async fn mount_blob(&self, repo: &str, digest: &str, from: &str) -> Result<bool> {
        check_repo(from)?;
        match self.start_upload(repo, digest, Some(from)).await? {
            None => {
                debug!(repo, digest, from, "mounted blob");
                Ok(true)
            }
            Some(session) => {
                // Best effort: an abandoned session is garbage-collected by the registry.
                let _ = self
                    .send(&Scope::Push(repo.to_string()), || {
                        self.http.delete(session.clone())
                    })
                    .await;
                Ok(false)
            }
        }
    }

    /// POSTs `/v2/<repo>/blobs/uploads/` (with `?mount=&from=` when mounting). `None`: the
    /// registry answered 201, the blob is mounted; `Some(url)`: an upload session to PUT to.
    async fn start_upload(
        &self,
        repo: &str,
        digest: &str,
        mount_from: Option<&str>,
    ) -> Result<Option<Url>> {
        digest::validate(digest)?;
        check_repo(repo)?;
        let subject = format!("{repo}@{digest}");
        let mut start = self.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        if let Some(from) = mount_from {
            start
                .query_pairs_mut()
                .append_pair("mount", digest)
                .append_pair("from", from);
        }
        let resp = self
            .send(&Scope::Push(repo.to_string()), || {
                self.http.post(start.clone()).header(CONTENT_LENGTH, 0)
            })
            .await?;
        if mount_from.is_some() && resp.status() == StatusCode::CREATED {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.error(resp, subject, "blob upload").await);
        }
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ImageError::Registry {
                status: resp.status().as_u16(),
                code: String::new(),
                message: "upload started without a location header".into(),
                subject: subject.clone(),
                registry: self.base.clone(),
            })?;
        // Location may be absolute, absolute-path or relative: resolve against the POST URL.
        let session = start.join(location).map_err(|e| ImageError::Registry {
            status: resp.status().as_u16(),
            code: String::new(),
            message: format!("bad upload location {location:?}: {e}"),
            subject: subject.clone(),
            registry: self.base.clone(),
        })?;
        Ok(Some(session))
    }

    /// Puts a manifest (or index) under a tag or digest; returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> Result<String> {
        let digest = digest::of_bytes(&bytes);
        let url = self.manifest_url(repo, reference)?;
        let resp = self
            .send(&Scope::Push(repo.to_string()), || {
                self.http
                    .put(url.clone())
                    .header(CONTENT_TYPE, media_type)
                    .body(bytes.clone())
            })
            .await?;
        if !resp.status().is_success() {
            return Err(self.error(resp, subject(repo, reference), "manifest").await);
        }
        info!(repo, reference, %digest, "pushed manifest");
        Ok(digest)
    }

    /// Fetches a manifest or index: (media type, bytes, digest). A manifest asked for by digest
    /// is checked against it.
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(String, Vec<u8>, String)> {
        let url = self.manifest_url(repo, reference)?;
        let accept = [
            OCI_MANIFEST,
            OCI_INDEX,
            DOCKER_MANIFEST,
            DOCKER_MANIFEST_LIST,
        ]
        .join(", ");
        let resp = self
            .send(&Scope::Pull(repo.to_string()), || {
                self.http.get(url.clone()).header(ACCEPT, accept.as_str())
            })
            .await?;
        let subject = subject(repo, reference);
        if !resp.status().is_success() {
            return Err(self.error(resp, subject, "manifest").await);
        }
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let bytes = self
            .read_capped(resp, MAX_MANIFEST_BYTES, "manifest", &subject)
            .await?;
        let digest = digest::of_bytes(&bytes);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest {subject}"),
                expected: reference.to_string(),
                actual: digest,
            });
        }
        debug!(repo, reference, %media_type, %digest, "fetched manifest");
        Ok((media_type, bytes, digest))
    }

    /// Streams a blob into `dest` (through a temporary file in the same directory, renamed into
    /// place once its sha256 matches). Returns the number of bytes written.
    pub async fn get_blob_to_file(&self, repo: &str, digest: &str, dest: &Path) -> Result<u64> {
        let mut resp = self.open_blob(repo, digest).await?;
        let dir = dest.parent().unwrap_or_else(|| Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(dir)
            .map_err(|e| ImageError::io_path("create temporary file in", dir, e))?;
        let std_file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| ImageError::io_path("open", tmp.path(), e))?;
        let mut out =
            tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(std_file));
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.http_err(e))? {
            hasher.update(&chunk);
            written += chunk.len() as u64;
            out.write_all(&chunk)
                .await
                .map_err(|e| ImageError::io_path("write", tmp.path(), e))?;
        }
        out.flush()
            .await
            .map_err(|e| ImageError::io_path("write", tmp.path(), e))?;
        let actual = digest::finish(hasher);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {repo}@{digest} from {}", self.base),
                expected: digest.to_string(),
                actual,
            });
        }
        // Durable before it becomes visible under its content address: a crash must not leave
        // a truncated file that looks complete.
        let file = out.into_inner();
        file.sync_data()
            .await
            .map_err(|e| ImageError::io_path("sync", tmp.path(), e))?;
        drop(file);
        tmp.persist(dest)
            .map_err(|e| ImageError::io_path("rename into", dest, e.error))?;
        debug!(repo, digest, bytes = written, dest = %dest.display(), "fetched blob");
        Ok(written)
    }

    /// A response body in memory; more than `max` bytes is refused (`kind` `subject` is too
    /// large), so a hostile server cannot make the client hold an unbounded body.
    async fn read_capped(
        &self,
        mut resp: Response,
        max: usize,
        kind: &str,
        subject: &str,
    ) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.http_err(e))? {
            if bytes.len() + chunk.len() > max {
                return Err(ImageError::invalid(
                    kind,
                    format!("{subject} is larger than {max} bytes"),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// A small blob (an image config) in memory, checked against its digest; more than `max`
    /// bytes is refused.
    pub async fn get_blob_bytes(&self, repo: &str, digest: &str, max: usize) -> Result<Vec<u8>> {
        let resp = self.open_blob(repo, digest).await?;
        let bytes = self
            .read_capped(resp, max, "blob", &format!("{repo}@{digest}"))
            .await?;
        let actual = digest::of_bytes(&bytes);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {repo}@{digest} from {}", self.base),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// `GET` a blob: the successful response, its body not yet read (the caller streams it
    /// and checks the digest).
    pub(crate) async fn open_blob(&self, repo: &str, digest: &str) -> Result<Response> {
        let url = self.blob_url(repo, digest)?;
        let resp = self
            .send(&Scope::Pull(repo.to_string()), || {
                self.http.get(url.clone())
            })
            .await?;
        if !resp.status().is_success() {
            return Err(self.error(resp, format!("{repo}@{digest}"), "blob").await);
        }
        Ok(resp)
    }

    /// Is `other` the same registry (same base URL)? Then blobs can be mounted across
    /// repositories instead of copied.
    pub fn same_registry(&self, other: &RegistryClient) -> bool {
        self.base == other.base
    }

    fn url(&self, path: &str) -> Result<Url> {
        Url::parse(&format!("{}{path}", self.base)).map_err(|e| ImageError::InvalidRegistry {
            address: self.base.clone(),
            reason: e.to_string(),
        })
    }

    fn blob_url(&self, repo: &str, digest: &str) -> Result<Url> {
        check_repo(repo)?;
        digest::validate(digest)?;
        self.url(&format!("/v2/{repo}/blobs/{digest}"))
    }

    fn manifest_url(&self, repo: &str, reference: &str) -> Result<Url> {
        check_repo(repo)?;
        if reference.starts_with("sha256:") {
            digest::validate(reference)?;
        } else if !valid_tag(reference) {
            return Err(ImageError::InvalidReference {
                reference: format!("{repo}:{reference}"),
                reason: "invalid tag".into(),
            });
        }
        self.url(&format!("/v2/{repo}/manifests/{reference}"))
    }

    /// Sends the request `make` builds, with what is known of the registry's authentication;
    /// a 401 is answered (see `auth`) and the request rebuilt and sent once more. A second
    /// 401 is an authentication failure.
    async fn send(
        &self,
        scope: &Scope,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Response> {
        let known = self.auth.header_for(&self.http, scope).await?;
        let sent_basic = known.as_ref().is_some_and(is_basic);
        let resp = self.send_with(make(), known).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let answer = self
            .auth
            .answer(&self.http, scope, resp.headers(), sent_basic)
            .await?;
        let resp = self.send_with(make(), Some(answer)).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(self.auth.failed().into());
        }
        Ok(resp)
    }

    /// Sends a request that cannot be rebuilt (a streamed body) with what is known of the
    /// registry's authentication; a 401 is an authentication failure.
    async fn send_once(&self, scope: &Scope, req: reqwest::RequestBuilder) -> Result<Response> {
        let known = self.auth.header_for(&self.http, scope).await?;
        let resp = self.send_with(req, known).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(self.auth.failed().into());
        }
        Ok(resp)
    }

    async fn send_with(
        &self,
        mut req: reqwest::RequestBuilder,
        auth: Option<HeaderValue>,
    ) -> Result<Response> {
        if let Some(h) = auth {
            req = req.header(AUTHORIZATION, h);
        }
        req.send().await.map_err(|e| self.http_err(e))
    }

    /// A transport error; a failed TLS handshake becomes [`ImageError::Tls`] with rustls's
    /// reason (often: the registry speaks plain HTTP).
    fn http_err(&self, source: reqwest::Error) -> ImageError {
        if let Some(reason) = tls_failure(&source) {
            return ImageError::Tls {
                registry: self.base.clone(),
                detail: format!("handshake failed: {reason}"),
            };
        }
        ImageError::Http {
            registry: self.base.clone(),
            source,
        }
    }

    /// Turns an unsuccessful response into an error, preferring the spec's JSON error code
    /// ("MANIFEST_UNKNOWN" → "manifest unknown") over the bare status.
    async fn error(&self, resp: Response, subject: String, kind: &str) -> ImageError {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            errors: Vec<Entry>,
        }
        #[derive(Deserialize)]
        struct Entry {
            #[serde(default)]
            code: String,
            #[serde(default)]
            message: String,
        }
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let first = serde_json::from_slice::<Body>(&body)
            .ok()
            .and_then(|b| b.errors.into_iter().next());
        let (code, message) = match first {
            Some(e) if !e.code.is_empty() => {
                let mut message = e.code.to_ascii_lowercase().replace('_', " ");
                // Keep the registry's own words when they add something beyond the code.
                let extra = e.message.trim().to_ascii_lowercase();
                if !extra.is_empty() && extra != message {
                    message = format!("{message} ({})", e.message.trim());
                }
                (e.code, message)
            }
            _ => {
                let message = match status {
                    StatusCode::NOT_FOUND => format!("{kind} unknown"),
                    StatusCode::UNAUTHORIZED => "unauthorized".to_string(),
                    StatusCode::FORBIDDEN => "denied".to_string(),
                    StatusCode::METHOD_NOT_ALLOWED => "unsupported operation".to_string(),
                    StatusCode::TOO_MANY_REQUESTS => "too many requests".to_string(),
                    s => format!("{kind} request failed with http {}", s.as_u16()),
                };
                (String::new(), message)
            }
        };
        ImageError::Registry {
            status: status.as_u16(),
            code,
            message,
            subject,
            registry: self.base.clone(),
        }
    }
}

/// Why a plain-HTTP client refuses an https:// base.
const HTTPS_NEEDS_TLS: &str =
    "https needs a client built with tls (the cluster's certificates or the system's roots)";

fn is_basic(h: &HeaderValue) -> bool {
    h.as_bytes().starts_with(b"Basic ")
}

/// The rustls error under a reqwest error, if the failure was the TLS handshake.
fn tls_failure(err: &reqwest::Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // io::Error hides a custom inner error from `source()` (and connectors nest them:
        // Other(InvalidData(rustls))); look inside.
        cur = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// `scheme://host[:port]` from `host[:port]` or `scheme://host[:port][/]`; the other scheme is
/// refused, for the reason given.
fn normalize_base(base: &str, scheme: &str, other_scheme: &str) -> Result<String> {
    let bad = |reason: &str| ImageError::InvalidRegistry {
        address: base.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = base.trim();
    let prefix = format!("{scheme}://");
    let other = if scheme == "http" {
        "https://"
    } else {
        "http://"
    };
    if trimmed.starts_with(other) {
        return Err(bad(other_scheme));
    }
    let authority = trimmed
        .strip_prefix(&prefix)
        .unwrap_or(trimmed)
        .trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(bad(&format!("want host[:port], optionally after {prefix}")));
    }
    let with_scheme = format!("{prefix}{authority}");
    let url = Url::parse(&with_scheme).map_err(|e| bad(&e.to_string()))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("missing host"));
    }
    if url.path() != "/" || url.query().is_some() {
        return Err(bad("want only scheme, host and port"));
    }
    Ok(with_scheme)
}

/// A rustls client config for registries outside the cluster: the system's CA store, the
/// host dialed checked against the certificate, no client certificate. HTTP/1.1 only.
fn system_tls_config() -> std::result::Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(format!(
            "no usable CA certificate in the system store (install ca-certificates){why}"
        ));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A rustls client config that trusts only `tls.ca_pem`, presents `tls.cert_pem`, and checks
/// the server's certificate against `tls.server_name`. HTTP/1.1 only (the client is built
/// without HTTP/2).
fn tls_config(tls: &ClientTls) -> std::result::Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = CertificateDer::from_pem_slice(tls.ca_pem.as_bytes())
        .map_err(|e| format!("ca certificate: {e}"))?;
    let mut roots = RootCertStore::empty();
    roots.add(ca).map_err(|e| format!("ca certificate: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("client certificate: {e}"))?;
    if chain.is_empty() {
        return Err("client certificate: no certificate in the pem".into());
    }
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .map_err(|e| format!("client key: {e}"))?;
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| format!("server name {:?}: {e}", tls.server_name))?;
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("server verifier: {e}"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FixedNameVerifier { inner, name }))
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Full WebPKI verification of the server against the given roots, except that the name
/// checked is always the configured one rather than the host dialed (cluster registries are
/// dialed by IP; their certificates name a role). Also used by the controller's peer client.
#[derive(Debug)]
pub struct FixedNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl FixedNameVerifier {
    /// Checks certificates with `inner`, always against `name`.
    pub fn new(inner: Arc<WebPkiServerVerifier>, name: ServerName<'static>) -> Self {
        FixedNameVerifier { inner, name }
    }
}

impl ServerCertVerifier for FixedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialed: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn check_repo(repo: &str) -> Result<()> {
    if valid_repository(repo) {
        Ok(())
    } else {
        Err(ImageError::InvalidReference {
            reference: repo.to_string(),
            reason: "invalid repository name".into(),
        })
    }
}

/// `repo:tag` or `repo@digest`, as users write it.
fn subject(repo: &str, reference: &str) -> String {
    if reference.starts_with("sha256:") {
        format!("{repo}@{reference}")
    } else {
        format!("{repo}:{reference}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_base() {
        for (input, want) in [
            ("127.0.0.1:5000", "http://127.0.0.1:5000"),
            ("http://10.213.1.1:5000/", "http://10.213.1.1:5000"),
            ("localhost", "http://localhost"),
        ] {
            assert_eq!(RegistryClient::new(input).unwrap().base(), want);
        }
        for bad in ["https://x:5000", "http://", "http://x:5000/v2/", ""] {
            assert!(RegistryClient::new(bad).is_err(), "{bad:?}");
        }
    }

    /// A CA and a certificate it signed for `name`, with the certificate's key (all PEM).
    fn ca_and_cert(name: &str) -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca_cert.pem(), cert.pem(), key.serialize_pem())
    }

    #[test]
    fn tls_client_wants_https_and_usable_pem() {
        let (ca_pem, cert_pem, key_pem) = ca_and_cert("manager.rudder");
        let tls = ClientTls {
            ca_pem,
            cert_pem,
            key_pem,
            server_name: "manager.rudder".into(),
        };
        for (input, want) in [
            ("127.0.0.1:5000", "https://127.0.0.1:5000"),
            ("https://10.213.1.1:5000/", "https://10.213.1.1:5000"),
        ] {
            assert_eq!(RegistryClient::with_tls(input, &tls).unwrap().base(), want);
        }
        let err = RegistryClient::with_tls("http://127.0.0.1:5000", &tls).unwrap_err();
        assert!(err.to_string().contains("https only"), "{err}");
        let err = RegistryClient::new("https://127.0.0.1:5000").unwrap_err();
        assert!(err.to_string().contains("certificates"), "{err}");

        // The key is never shown.
        assert!(!format!("{tls:?}").contains("PRIVATE"));

        let (_, _, other_key) = ca_and_cert("manager.rudder");
        for (what, broken) in [
            (
                "ca certificate",
                ClientTls {
                    ca_pem: "junk".into(),
                    ..tls.clone()
                },
            ),
            (
                "client certificate",
                ClientTls {
                    cert_pem: String::new(),
                    ..tls.clone()
                },
            ),
            (
                "client key",
                ClientTls {
                    key_pem: "junk".into(),
                    ..tls.clone()
                },
            ),
            (
                "client certificate and key",
                ClientTls {
                    key_pem: other_key,
                    ..tls.clone()
                },
            ),
            (
                "server name",
                ClientTls {
                    server_name: "not a name!".into(),
                    ..tls.clone()
                },
            ),
        ] {
            match RegistryClient::with_tls("127.0.0.1:5000", &broken) {
                Err(ImageError::Tls { detail, .. }) => {
                    assert!(detail.starts_with(what), "{what}: {detail}")
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_unsafe_urls() {
        let c = RegistryClient::new("127.0.0.1:5000").unwrap();
        assert!(c.blob_url("../x", &digest::of_bytes(b"")).is_err());
        assert!(c.blob_url("hello", "sha256:../../x").is_err());
        assert!(c.manifest_url("hello", "a/b").is_err());
        assert_eq!(
            c.manifest_url("lib/hello", "v1").unwrap().as_str(),
            "http://127.0.0.1:5000/v2/lib/hello/manifests/v1"
        );
    }
}

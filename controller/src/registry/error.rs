//! Registry errors and their mapping onto the distribution spec's HTTP error model.
//!
//! Invariant: every failure a client can see leaves through [`RegistryError::into_response`],
//! which always answers with the spec's JSON body `{"errors":[{"code","message","detail"}]}`
//! and the status the spec assigns to that code; every code sent with a 4xx is one of the
//! spec's table (which clients may switch on), and an unknown blob's `detail` names its
//! digest. Server-side faults (I/O, tag store) are logged here, once, at `warn`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Everything that can go wrong in the registry: client mistakes (mapped to 4xx with a spec
/// error code) and server faults (5xx).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// BLOB_UNKNOWN: no blob with this digest.
    #[error("registry: blob unknown: {0}")]
    BlobUnknown(String),
    /// BLOB_UPLOAD_UNKNOWN: no upload with this id.
    #[error("registry: blob upload unknown: {0}")]
    UploadUnknown(String),
    /// BLOB_UPLOAD_INVALID: the upload cannot go on.
    #[error("registry: blob upload invalid: {0}")]
    UploadInvalid(String),
    /// A chunk did not start where the upload currently ends.
    #[error("registry: chunk starts at byte {start} but the upload holds {size} bytes")]
    RangeInvalid {
        /// Where the client said the chunk starts.
        start: u64,
        /// How many bytes the upload holds; the client should resume from here.
        size: u64,
        /// The upload's location, echoed back so the client can resume.
        location: String,
    },
    /// A chunk's Content-Range header is not `<start>-<end>` (the spec answers 416, as for an
    /// out-of-order chunk, so the client learns where to resume).
    #[error("registry: Content-Range {value:?} is not <start>-<end>")]
    ContentRangeMalformed {
        /// The header as sent.
        value: String,
        /// How many bytes the upload holds; the client should resume from here.
        size: u64,
        /// The upload's location, echoed back so the client can resume.
        location: String,
    },
    /// A declared length (Content-Length, Content-Range) disagrees with the bytes sent.
    #[error("registry: size invalid: {0}")]
    SizeInvalid(String),
    /// DIGEST_INVALID: not a valid digest.
    #[error("registry: digest invalid: {0}")]
    DigestInvalid(String),
    /// DIGEST_INVALID: the content does not have the digest given.
    #[error("registry: digest mismatch: client said {expected}, content hashes to {actual}")]
    DigestMismatch {
        /// The digest given.
        expected: String,
        /// The digest of the content.
        actual: String,
    },
    /// MANIFEST_UNKNOWN: no manifest with this reference.
    #[error("registry: manifest unknown: {0}")]
    ManifestUnknown(String),
    /// MANIFEST_INVALID: the manifest does not parse or breaks the spec.
    #[error("registry: manifest invalid: {0}")]
    ManifestInvalid(String),
    /// MANIFEST_BLOB_UNKNOWN: the manifest references a blob not held.
    #[error("registry: manifest references blob {0} which this registry does not hold")]
    ManifestBlobUnknown(String),
    /// NAME_INVALID: not a valid repository name.
    #[error("registry: name invalid: {0}")]
    NameInvalid(String),
    /// TAG_INVALID: not a valid tag.
    #[error("registry: tag invalid: {0}")]
    TagInvalid(String),
    /// SIZE_INVALID: over a size limit.
    #[error("registry: payload too large: {0}")]
    TooLarge(String),
    /// Too many uploads are open at once; the client should retry later.
    #[error("registry: too many uploads in progress: {0}")]
    TooManyUploads(String),
    /// Taking the bytes would leave the registry's disk below its free-space floor.
    #[error("registry: not enough disk space: {0}")]
    DiskFull(String),
    /// UNSUPPORTED: a request this registry does not serve.
    #[error("registry: unsupported: {0}")]
    Unsupported(String),
    /// 404 without a spec code (an unknown path).
    #[error("registry: no such endpoint: {0}")]
    NotFound(String),
    /// 405: the path exists but not with this method.
    #[error("registry: method {0} not allowed here")]
    MethodNotAllowed(String),
    /// The request body broke off or could not be read.
    #[error("registry: reading request body: {0}")]
    Body(String),
    /// The replicated tag store refused or could not commit (e.g. no raft leader).
    #[error("registry: tag store: {0}")]
    TagStore(String),
    /// A finished blob could not be given to a majority of the managers in time, so the
    /// upload is not acknowledged (the client should retry once more managers are up).
    #[error(
        "registry: blob {digest} is held by {held} of {total} managers but {needed} must hold \
         it before an upload is acknowledged: {why}"
    )]
    NoQuorum {
        /// The blob.
        digest: String,
        /// Managers holding the blob, this one included.
        held: usize,
        /// A majority of `total`.
        needed: usize,
        /// Managers in the cluster, this one included.
        total: usize,
        /// What went wrong with the peers that did not take it.
        why: String,
    },
    /// The HTTP client for peer registries could not be built.
    #[error("registry: peer client: {0}")]
    PeerClient(String),
    /// A local file operation failed (5xx).
    #[error("registry: {op}: {source}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl RegistryError {
    /// Builds a closure for `map_err` that tags an I/O error with the operation that failed.
    pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { op, source }
    }

    /// The spec's error code and HTTP status for this error.
    pub fn code_and_status(&self) -> (&'static str, StatusCode) {
        use RegistryError::*;
        match self {
            BlobUnknown(_) => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
            UploadUnknown(_) => ("BLOB_UPLOAD_UNKNOWN", StatusCode::NOT_FOUND),
            UploadInvalid(_) | Body(_) => ("BLOB_UPLOAD_INVALID", StatusCode::BAD_REQUEST),
            RangeInvalid { .. } | ContentRangeMalformed { .. } => {
                ("BLOB_UPLOAD_INVALID", StatusCode::RANGE_NOT_SATISFIABLE)
            }
            SizeInvalid(_) => ("SIZE_INVALID", StatusCode::BAD_REQUEST),
            DigestInvalid(_) | DigestMismatch { .. } => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
            ManifestUnknown(_) => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND),
            ManifestInvalid(_) => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST),
            ManifestBlobUnknown(_) => ("MANIFEST_BLOB_UNKNOWN", StatusCode::BAD_REQUEST),
            NameInvalid(_) => ("NAME_INVALID", StatusCode::BAD_REQUEST),
            // The spec's code table has no tag code; the reference is part of the manifest push.
            TagInvalid(_) => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST),
            TooLarge(_) => ("SIZE_INVALID", StatusCode::PAYLOAD_TOO_LARGE),
            TooManyUploads(_) => ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS),
            DiskFull(_) => ("UNAVAILABLE", StatusCode::INSUFFICIENT_STORAGE),
            Unsupported(_) => ("UNSUPPORTED", StatusCode::BAD_REQUEST),
            NotFound(_) => ("NAME_UNKNOWN", StatusCode::NOT_FOUND),
            MethodNotAllowed(_) => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED),
            TagStore(_) | NoQuorum { .. } => ("UNAVAILABLE", StatusCode::SERVICE_UNAVAILABLE),
            PeerClient(_) | Io { .. } => ("UNKNOWN", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (code, status) = self.code_and_status();
        if status.is_server_error() {
            tracing::warn!(err = %self, "registry request failed");
        } else {
            tracing::debug!(err = %self, "registry request refused");
        }
        // The spec's detail for an unknown blob names it, so a client can tell which of a
        // manifest's blobs is missing without parsing the message.
        let detail = match &self {
            RegistryError::BlobUnknown(digest) | RegistryError::ManifestBlobUnknown(digest) => {
                serde_json::json!({ "digest": digest })
            }
            _ => serde_json::Value::Null,
        };
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": self.to_string(), "detail": detail }]
        });
        let mut resp = (status, axum::Json(body)).into_response();
        if let RegistryError::RangeInvalid { size, location, .. }
        | RegistryError::ContentRangeMalformed { size, location, .. } = &self
        {
            let headers = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&super::http::range_value(*size)) {
                headers.insert(header::RANGE, v);
            }
            if let Ok(v) = HeaderValue::from_str(location) {
                headers.insert(header::LOCATION, v);
            }
        }
        resp
    }
}

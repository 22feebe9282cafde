//! The crate's single error type. Messages are lowercase, prefixed "image: ", and name the thing
//! that failed (reference, digest, path, registry) so that a user can act on them unchanged.

use std::path::Path;

/// Everything that can go wrong in `rudder-image`.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A reference that does not parse.
    #[error("image: invalid reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why.
        reason: String,
    },

    /// A digest that is not `sha256:<64 lowercase hex>`.
    #[error("image: invalid digest {0:?} (want sha256:<64 lowercase hex>)")]
    InvalidDigest(String),

    /// Content whose digest is not the one it was asked for by.
    #[error("image: digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was being handled.
        what: String,
        /// The digest expected.
        expected: String,
        /// The digest computed.
        actual: String,
    },

    /// A registry address that is not `host[:port]`.
    #[error("image: invalid registry address {address:?}: {reason}")]
    InvalidRegistry {
        /// The address as given.
        address: String,
        /// Why.
        reason: String,
    },

    /// The registry answered, but with an error (from its JSON error body or its status code).
    #[error("image: {message}: {subject} (registry {registry})")]
    Registry {
        /// The HTTP status.
        status: u16,
        /// The distribution-spec error code, e.g. `MANIFEST_UNKNOWN`, or empty.
        code: String,
        /// The registry's message.
        message: String,
        /// What was asked for: `repo:tag`, `repo@digest`.
        subject: String,
        /// The registry, `host[:port]`.
        registry: String,
    },

    /// The TLS material for a registry client is unusable (bad PEM, key not matching).
    #[error("image: tls for registry {registry}: {detail}")]
    Tls {
        /// The registry, `host[:port]`.
        registry: String,
        /// Why.
        detail: String,
    },

    /// The registry could not be reached or the connection broke.
    #[error("image: registry {registry}: {source}")]
    Http {
        /// The registry, `host[:port]`.
        registry: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },

    /// A local file operation failed.
    #[error("image: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON document could not be read or written.
    #[error("image: {context}: {source}")]
    Json {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },

    /// Something valid the crate does not handle (a media type, a layer format).
    #[error("image: unsupported {what}: {detail}")]
    Unsupported {
        /// What was being handled.
        what: String,
        /// Why.
        detail: String,
    },

    /// A manifest, index or config that does not follow the image spec.
    #[error("image: invalid {what}: {detail}")]
    Invalid {
        /// What was being handled.
        what: String,
        /// Why.
        detail: String,
    },

    /// An archive that is neither an OCI layout nor a docker-save tarball, or is incomplete.
    #[error("image: archive {path}: {detail}")]
    Archive {
        /// The path concerned.
        path: String,
        /// Why.
        detail: String,
    },

    /// A layer entry that would land outside the layer directory, or cannot be represented.
    #[error("image: layer entry {path:?} refused: {reason}")]
    UnsafeEntry {
        /// The path concerned.
        path: String,
        /// Why.
        reason: String,
    },

    /// A layer refused as a whole: it would expand beyond a limit of the content store.
    #[error("image: layer {layer} refused: {reason}")]
    LayerRefused {
        /// The layer's digest.
        layer: String,
        /// Why.
        reason: String,
    },

    /// A blocking task (unpacking, hashing) panicked or was cancelled.
    #[error("image: background task failed: {0}")]
    Task(String),

    /// A registry refused our credentials or its challenge could not be answered.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, ImageError>;

impl ImageError {
    /// True when the registry said the manifest or blob does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ImageError::Registry { status: 404, .. })
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    /// An I/O error about one path: "image: <doing> <path>: <os error>".
    pub(crate) fn io_path(doing: &str, path: &Path, source: std::io::Error) -> Self {
        ImageError::Io {
            context: format!("{doing} {}", path.display()),
            source,
        }
    }

    pub(crate) fn json(context: impl Into<String>, source: serde_json::Error) -> Self {
        ImageError::Json {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, detail: impl Into<String>) -> Self {
        ImageError::Invalid {
            what: what.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn archive(path: &Path, detail: impl Into<String>) -> Self {
        ImageError::Archive {
            path: path.display().to_string(),
            detail: detail.into(),
        }
    }

    pub(crate) fn task(err: tokio::task::JoinError) -> Self {
        ImageError::Task(err.to_string())
    }
}

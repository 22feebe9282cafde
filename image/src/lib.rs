//! OCI images for Rudder: parsing image references, talking to an OCI distribution-spec registry
//! (mutual TLS for the cluster's own; plain HTTP or HTTPS with the system's roots, with basic
//! or bearer-token authentication, for any other), copying images between registries
//! (`transfer`: `rctl image tag/push/pull`), turning local archives (root filesystem
//! tarballs, OCI image layouts, docker-save tarballs) into pushed images, and the per-host content
//! store that pulls images and unpacks each layer once for overlayfs. Also the tar archives
//! `rctl cp` moves in and out of containers (`copy`), packed and unpacked by the same rules on
//! both ends.
//!
//! Invariants shared by every module:
//! - content is addressed by `sha256:<64 lowercase hex>` digests, and a digest is validated
//!   ([`digest::validate`]) before it ever becomes part of a path or URL;
//! - anything written to a content-addressed path is written to a temporary file or directory on
//!   the same filesystem first and renamed into place once complete and verified, so a path that
//!   exists is always complete.

#![warn(missing_docs)]

pub mod archive;
pub mod auth;
pub mod build_context;
pub mod client;
pub mod commit;
pub mod copy;
pub mod digest;
pub mod dockerfile;
mod error;
pub mod layer;
pub mod oci;
pub mod reference;
pub mod store;
pub mod transfer;
pub mod usage;

pub use archive::{import_rootfs, load_archive, Archive, ImportReport, LoadedImage};
pub use auth::{AuthError, AuthFile, Credentials};
pub use client::{BlobSource, ClientTls, FixedNameVerifier, RegistryClient};
pub use error::{ImageError, Result};
pub use reference::Reference;
pub use store::{ImageConfig, ImageStore, PulledImage};
pub use transfer::{copy_image, CopyOptions, TransferError, TransferReport};

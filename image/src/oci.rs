//! The parts of the OCI image spec (and the docker v2 equivalents registries still serve) that
//! Rudder reads and writes: media types, descriptors, manifests, indexes and the image config.
//!
//! Manifests are always kept and pushed as the exact bytes they came in (their digest is over
//! those bytes); these types are for reading them, and for writing the ones we create. Parsing
//! validates every descriptor digest, so digests taken from a manifest are safe to use in paths.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{digest, ImageError, Result};

/// Media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed OCI layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a gzip OCI layer (what Rudder writes).
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a docker v2 schema 2 manifest (read like an OCI one).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of a docker manifest list (read like an OCI index).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Annotation naming a manifest in an OCI layout's index.json (often only the tag).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation containerd and docker (25+) put next to it with the full image name.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The `PATH` images get when they do not set one (the value docker and buildkit use).
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether a manifest-like document is an image manifest or an index of manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// An image manifest: a config and layers.
    Manifest,
    /// An index: manifests, one per platform.
    Index,
}

impl ManifestKind {
    /// Classifies by media type, falling back to the document's own `mediaType` field and
    /// shape when the media type is generic or absent (some servers send application/json).
    pub fn detect(media_type: &str, bytes: &[u8]) -> Result<ManifestKind> {
        match media_type {
            OCI_MANIFEST | DOCKER_MANIFEST => return Ok(ManifestKind::Manifest),
            OCI_INDEX | DOCKER_MANIFEST_LIST => return Ok(ManifestKind::Index),
            _ => {}
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            schema_version: Option<u32>,
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
            config: Option<serde_json::Value>,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| ImageError::json("parse manifest", e))?;
        match probe.media_type.as_deref() {
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => return Ok(ManifestKind::Manifest),
            Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => return Ok(ManifestKind::Index),
            _ => {}
        }
        if probe.schema_version == Some(1) {
            return Err(ImageError::Unsupported {
                what: "manifest".into(),
                detail: "docker schema 1 manifests are obsolete; re-push the image".into(),
            });
        }
        if probe.manifests.is_some() {
            Ok(ManifestKind::Index)
        } else if probe.config.is_some() {
            Ok(ManifestKind::Manifest)
        } else {
            Err(ImageError::Unsupported {
                what: "manifest media type".into(),
                detail: media_type.to_string(),
            })
        }
    }
}

/// A content descriptor: what a manifest or index says about one blob or manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the target is (a manifest, a config, a layer's compression).
    pub media_type: String,
    /// The target's `sha256:` digest, validated before use.
    pub digest: String,
    /// The target's size in bytes: a fetch reads no more.
    pub size: u64,
    /// In an index: the platform the manifest is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Free-form annotations (e.g. the ref name in an OCI layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    /// A descriptor without platform or annotations.
    pub fn new(media_type: &str, digest: String, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            platform: None,
            annotations: None,
        }
    }

    /// The value of annotation `key`, if set.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

/// The platform an index entry is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// GOARCH name: `amd64`, `arm64`, … (see [`host_architecture`]).
    pub architecture: String,
    /// GOOS name: `linux`.
    pub os: String,
    /// CPU variant (`v7` for arm), when it matters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (OCI or docker v2 schema 2; same shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's media type (optional in OCI, set by docker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image config blob.
    pub config: Descriptor,
    /// The layer blobs, bottom first.
    pub layers: Vec<Descriptor>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Manifest {
    /// An OCI manifest for a config and layers.
    pub fn oci(config: Descriptor, layers: Vec<Descriptor>) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_string()),
            config,
            layers,
            annotations: None,
        }
    }

    /// Parses a manifest and validates all its digests.
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ImageError::json("parse manifest", e))?;
        if manifest.schema_version != 2 {
            return Err(ImageError::invalid(
                "manifest",
                format!("schemaVersion {} (want 2)", manifest.schema_version),
            ));
        }
        digest::validate(&manifest.config.digest)?;
        for layer in &manifest.layers {
            digest::validate(&layer.digest)?;
        }
        Ok(manifest)
    }

    /// Every blob the manifest references: config first, then layers bottom-up.
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }

    /// The manifest as JSON, as it is pushed (its digest is over these bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serializes")
    }
}

/// An image index (OCI) or manifest list (docker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// The index's media type (optional in OCI, set by docker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// One manifest per platform (or per tag, in an OCI layout).
    pub manifests: Vec<Descriptor>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Index {
    /// Parses an index and validates all its digests.
    pub fn parse(bytes: &[u8]) -> Result<Index> {
        let index: Index =
            serde_json::from_slice(bytes).map_err(|e| ImageError::json("parse index", e))?;
        for m in &index.manifests {
            digest::validate(&m.digest)?;
        }
        Ok(index)
    }

    /// The entry for this host's platform (linux and our architecture), else the first entry.
    /// Entries without a platform count as a match only through the "first" fallback.
    pub fn pick_platform(&self) -> Option<&Descriptor> {
        let arch = host_architecture();
        self.manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .or_else(|| self.manifests.first())
    }
}

/// The OCI (GOARCH) name of the architecture this binary runs on.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// `rootfs.diff_ids` of an image config blob (the uncompressed digests of its layers, bottom
/// first); an absent list is empty.
pub fn diff_ids(config: &[u8]) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        rootfs: Option<RootFs>,
    }
    #[derive(Deserialize)]
    struct RootFs {
        #[serde(default)]
        diff_ids: Option<Vec<String>>,
    }
    let file: File =
        serde_json::from_slice(config).map_err(|e| ImageError::json("parse image config", e))?;
    Ok(file.rootfs.and_then(|r| r.diff_ids).unwrap_or_default())
}

/// What a container needs from an image config (`config` object of the image config JSON).
/// Absent fields are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`: prepended to the command.
    pub entrypoint: Vec<String>,
    /// `Cmd`: the default command or arguments.
    pub cmd: Vec<String>,
    /// `Env`: `K=V` entries.
    pub env: Vec<String>,
    /// `WorkingDir`; empty means `/`.
    pub working_dir: String,
    /// `User`: `uid[:gid]` or a name; empty means root.
    pub user: String,
}

impl ImageConfig {
    /// Reads the runtime defaults from an image config blob.
    pub fn from_json(bytes: &[u8]) -> Result<ImageConfig> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            config: Option<Runtime>,
        }
        // Docker writes `null` for empty lists, hence Option everywhere.
        #[derive(Deserialize, Default)]
        #[serde(rename_all = "PascalCase")]
        struct Runtime {
            #[serde(default)]
            entrypoint: Option<Vec<String>>,
            #[serde(default)]
            cmd: Option<Vec<String>>,
            #[serde(default)]
            env: Option<Vec<String>>,
            #[serde(default)]
            working_dir: Option<String>,
            #[serde(default)]
            user: Option<String>,
        }
        let file: File =
            serde_json::from_slice(bytes).map_err(|e| ImageError::json("parse image config", e))?;
        let rt = file.config.unwrap_or_default();
        Ok(ImageConfig {
            entrypoint: rt.entrypoint.unwrap_or_default(),
            cmd: rt.cmd.unwrap_or_default(),
            env: rt.env.unwrap_or_default(),
            working_dir: rt.working_dir.unwrap_or_default(),
            user: rt.user.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_config_handles_nulls_and_absence() {
        let c = ImageConfig::from_json(
            br#"{"architecture":"amd64","config":{"Cmd":["sh"],"Entrypoint":null,"Env":["A=1"],"WorkingDir":"/w","User":"1000:1000"}}"#,
        )
        .unwrap();
        assert_eq!(c.cmd, vec!["sh"]);
        assert!(c.entrypoint.is_empty());
        assert_eq!(c.env, vec!["A=1"]);
        assert_eq!(c.working_dir, "/w");
        assert_eq!(c.user, "1000:1000");
        assert_eq!(
            ImageConfig::from_json(b"{}").unwrap(),
            ImageConfig::default()
        );
    }

    #[test]
    fn detects_kind_from_body_when_media_type_is_generic() {
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(
            ManifestKind::detect("application/json", index).unwrap(),
            ManifestKind::Index
        );
        let v1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(ManifestKind::detect("", v1).is_err());
    }

    #[test]
    fn pick_platform_prefers_host() {
        let d = |arch: &str, n: u8| Descriptor {
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: None,
            }),
            ..Descriptor::new(OCI_MANIFEST, format!("sha256:{}", hex::encode([n; 32])), 1)
        };
        let index = Index {
            schema_version: 2,
            media_type: Some(OCI_INDEX.into()),
            manifests: vec![d("s390x", 1), d(host_architecture(), 2)],
            annotations: None,
        };
        assert_eq!(
            index.pick_platform().unwrap().digest,
            index.manifests[1].digest
        );
    }
}

//! Images made from a container's changes (`rctl commit`): the base image's manifest and
//! config plus one new layer become a new config and manifest. Pure: bytes in, bytes out; the
//! caller says when the layer was made.
//!
//! Invariants: the base config is kept as it is (env, cmd, entrypoint, working dir, labels and
//! every field this crate does not know), except that `rootfs.diff_ids` gains the new layer's
//! diff_id, `history` gains one entry and `created` becomes the layer's time; the manifest keeps
//! its media types and annotations, its config descriptor points at the new config and its
//! layers gain the new one (typed in the manifest's own family, OCI or docker). A base whose
//! config does not hash to its manifest's descriptor, or lists as many diff_ids as the manifest
//! has layers, is refused.
//!
//! What `docker commit` lets a user add ([`CommitMeta`]) goes on top: `--change` instructions
//! (the config-only ones: CMD, ENTRYPOINT, ENV, …; each checked before any work by
//! [`parse_changes`]) edit the config as a Dockerfile step would, `--message` becomes the new
//! history entry's comment and `--author` the config's `author`.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::dockerfile::{Instr, Settings, StageBuilder, Step};
use crate::oci::{Manifest, DOCKER_MANIFEST, OCI_LAYER_TAR_GZIP, OCI_MANIFEST};
use crate::{digest, ImageError, Result};

/// The docker media type of a gzip layer (for bases with docker v2 manifests).
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The layer a commit adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLayer {
    /// Digest and size of the gzip blob.
    pub digest: String,
    /// Size of the gzip blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
}

/// The committed image: a config and a manifest to store, config first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// The image config JSON.
    pub config: Vec<u8>,
    /// The config's digest.
    pub config_digest: String,
    /// The image manifest JSON.
    pub manifest: Vec<u8>,
    /// The manifest's digest: the committed image's id.
    pub manifest_digest: String,
    /// The manifest's media type, for the registry.
    pub media_type: String,
    /// The config and every layer blob, as the manifest describes them.
    pub size: u64,
}

/// What a commit says besides its layer, as `docker commit` takes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitMeta {
    /// Dockerfile instructions applied to the config, in order (`--change`).
    pub changes: Vec<String>,
    /// The new history entry's comment (`--message`).
    pub message: String,
    /// The config's `author` (`--author`).
    pub author: String,
}

/// The instructions `--change` takes: those that only set the config (docker's list).
pub const CHANGE_INSTRUCTIONS: &[&str] = &[
    "CMD",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// Parses each change as one Dockerfile instruction from [`CHANGE_INSTRUCTIONS`]; an error
/// names the change as written.
pub fn parse_changes(changes: &[String]) -> Result<Vec<Step>> {
    let mut steps = Vec::with_capacity(changes.len());
    for change in changes {
        let bad = |detail: String| ImageError::invalid(format!("--change {change:?}"), detail);
        if change.trim().is_empty() {
            return Err(bad("it is empty".into()));
        }
        let parsed = crate::dockerfile::parse_instructions(change).map_err(|e| bad(e.message))?;
        let [step] = parsed.as_slice() else {
            return Err(bad("give one instruction per --change".into()));
        };
        let config_only = matches!(
            step.instr,
            Instr::Cmd(_)
                | Instr::Entrypoint(_)
                | Instr::Env(_)
                | Instr::Expose(_)
                | Instr::Healthcheck(_)
                | Instr::Label(_)
                | Instr::Onbuild(_)
                | Instr::StopSignal(_)
                | Instr::User(_)
                | Instr::Volume(_)
                | Instr::Workdir(_)
        );
        if !config_only {
            let keyword = change.split_whitespace().next().unwrap_or_default();
            return Err(bad(format!(
                "{} cannot be applied by a commit; it takes {}",
                keyword.to_ascii_uppercase(),
                CHANGE_INSTRUCTIONS.join(", ")
            )));
        }
        steps.push(step.clone());
    }
    Ok(steps)
}

/// `config` (a whole image config) with `changes` applied, as a build applies its steps.
fn apply_changes(config: &mut Value, base_config: &[u8], changes: &[String]) -> Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let settings =
        Settings::from_config_json(base_config).map_err(|e| invalid(e.message.clone()))?;
    let mut builder = StageBuilder::new(&[], &BTreeMap::new(), settings);
    for (step, change) in parse_changes(changes)?.iter().zip(changes) {
        builder
            .step(step)
            .map_err(|e| ImageError::invalid(format!("--change {change:?}"), e.message))?;
    }
    builder.into_settings().write_to(config);
    Ok(())
}

fn invalid(detail: impl Into<String>) -> ImageError {
    ImageError::invalid("base image", detail.into())
}

/// The image `base_manifest` + `base_config` with `layer` on top and `meta` applied; `created`
/// (RFC 3339) and `created_by` go into its history.
pub fn derive(
    base_manifest: &[u8],
    base_config: &[u8],
    layer: &NewLayer,
    created: &str,
    created_by: &str,
    meta: &CommitMeta,
) -> Result<Derived> {
    digest::validate(&layer.digest)?;
    digest::validate(&layer.diff_id)?;
    // Validates the shape and every digest; the edit below works on the JSON itself so that
    // fields this crate does not model survive.
    let parsed = Manifest::parse(base_manifest)?;
    if digest::of_bytes(base_config) != parsed.config.digest {
        return Err(invalid(format!(
            "its config does not hash to {}",
            parsed.config.digest
        )));
    }
    let mut config: Value = serde_json::from_slice(base_config)
        .map_err(|e| ImageError::json("parse image config", e))?;
    apply_changes(&mut config, base_config, &meta.changes)?;
    let cfg = config
        .as_object_mut()
        .ok_or_else(|| invalid("its config is not a JSON object"))?;
    let rootfs = cfg
        .entry("rootfs")
        .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
    let diff_ids = rootfs
        .as_object_mut()
        .ok_or_else(|| invalid("rootfs is not an object"))?
        .entry("diff_ids")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .ok_or_else(|| invalid("rootfs.diff_ids is not an array"))?;
    if diff_ids.len() != parsed.layers.len() {
        return Err(invalid(format!(
            "its config lists {} diff_ids for {} layers",
            diff_ids.len(),
            parsed.layers.len()
        )));
    }
    diff_ids.push(Value::String(layer.diff_id.clone()));
    let history = cfg.entry("history").or_insert_with(|| json!([]));
    if history.is_null() {
        *history = json!([]);
    }
    history
        .as_array_mut()
        .ok_or_else(|| invalid("history is not an array"))?
        .push(history_entry(created, created_by, meta));
    cfg.insert("created".into(), Value::String(created.into()));
    if !meta.author.is_empty() {
        cfg.insert("author".into(), Value::String(meta.author.clone()));
    }
    let config = serde_json::to_vec(&config).expect("config serializes");
    let config_digest = digest::of_bytes(&config);

    let mut manifest: Value =
        serde_json::from_slice(base_manifest).map_err(|e| ImageError::json("parse manifest", e))?;
    let m = manifest
        .as_object_mut()
        .ok_or_else(|| invalid("its manifest is not a JSON object"))?;
    let media_type = parsed
        .media_type
        .clone()
        .unwrap_or_else(|| OCI_MANIFEST.to_string());
    let layer_type = if media_type == DOCKER_MANIFEST {
        DOCKER_LAYER_GZIP
    } else {
        OCI_LAYER_TAR_GZIP
    };
    let desc = m
        .get_mut("config")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| invalid("its manifest has no config descriptor"))?;
    desc.insert("digest".into(), Value::String(config_digest.clone()));
    desc.insert("size".into(), json!(config.len()));
    let mut new_layer = Map::new();
    new_layer.insert("mediaType".into(), Value::String(layer_type.into()));
    new_layer.insert("digest".into(), Value::String(layer.digest.clone()));
    new_layer.insert("size".into(), json!(layer.size));
    m.get_mut("layers")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| invalid("its manifest has no layers array"))?
        .push(Value::Object(new_layer));
    let manifest = serde_json::to_vec(&manifest).expect("manifest serializes");
    let size = config.len() as u64 + parsed.layers.iter().map(|l| l.size).sum::<u64>() + layer.size;
    Ok(Derived {
        manifest_digest: digest::of_bytes(&manifest),
        manifest,
        config,
        config_digest,
        media_type,
        size,
    })
}

fn history_entry(created: &str, created_by: &str, meta: &CommitMeta) -> Value {
    let mut entry = json!({"created": created, "created_by": created_by});
    for (key, value) in [("author", &meta.author), ("comment", &meta.message)] {
        if !value.is_empty() {
            entry[key] = Value::String(value.clone());
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Descriptor, OCI_CONFIG};
    use crate::ImageConfig;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn base(media_type: Option<&str>) -> (Vec<u8>, Vec<u8>) {
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "Entrypoint": ["/init"],
                       "WorkingDir": "/srv", "Labels": {"k": "v"}},
            "rootfs": {"type": "layers", "diff_ids": [d('a')]},
            "history": [{"created_by": "rudder import"}],
            "unknown_field": 7,
        }))
        .unwrap();
        let mut m = Manifest::oci(
            Descriptor::new(OCI_CONFIG, digest::of_bytes(&config), config.len() as u64),
            vec![Descriptor::new(OCI_LAYER_TAR_GZIP, d('b'), 100)],
        );
        m.media_type = media_type.map(str::to_string);
        (m.to_bytes(), config)
    }

    fn none() -> CommitMeta {
        CommitMeta::default()
    }

    fn layer() -> NewLayer {
        NewLayer {
            digest: d('c'),
            size: 10,
            diff_id: d('e'),
        }
    }

    #[test]
    fn adds_the_layer_and_keeps_the_base_config() {
        let (manifest, config) = base(Some(OCI_MANIFEST));
        let out = derive(
            &manifest,
            &config,
            &layer(),
            "2026-01-02T03:04:05Z",
            "rctl commit",
            &none(),
        )
        .unwrap();
        assert_eq!(out.media_type, OCI_MANIFEST);
        assert_eq!(out.config_digest, digest::of_bytes(&out.config));
        assert_eq!(out.manifest_digest, digest::of_bytes(&out.manifest));
        assert_eq!(out.size, out.config.len() as u64 + 100 + 10);

        let m = Manifest::parse(&out.manifest).unwrap();
        assert_eq!(m.config.digest, out.config_digest);
        assert_eq!(m.config.media_type, OCI_CONFIG);
        let layers: Vec<_> = m
            .layers
            .iter()
            .map(|l| (l.digest.clone(), l.size))
            .collect();
        assert_eq!(layers, [(d('b'), 100), (d('c'), 10)]);
        assert_eq!(m.layers[1].media_type, OCI_LAYER_TAR_GZIP);

        let c: Value = serde_json::from_slice(&out.config).unwrap();
        assert_eq!(c["rootfs"]["diff_ids"], json!([d('a'), d('e')]));
        assert_eq!(
            c["history"],
            json!([{"created_by": "rudder import"},
                   {"created": "2026-01-02T03:04:05Z", "created_by": "rctl commit"}])
        );
        assert_eq!(c["created"], "2026-01-02T03:04:05Z");
        assert_eq!(c["unknown_field"], 7);
        assert_eq!(c["config"]["Labels"]["k"], "v");
        let rt = ImageConfig::from_json(&out.config).unwrap();
        assert_eq!(rt, ImageConfig::from_json(&config).unwrap());
        assert_eq!(rt.working_dir, "/srv");
    }

    #[test]
    fn docker_bases_get_a_docker_layer_and_untyped_ones_oci() {
        let (manifest, config) = base(Some(DOCKER_MANIFEST));
        let out = derive(&manifest, &config, &layer(), "t", "rctl commit", &none()).unwrap();
        assert_eq!(out.media_type, DOCKER_MANIFEST);
        let m = Manifest::parse(&out.manifest).unwrap();
        assert_eq!(m.layers[1].media_type, DOCKER_LAYER_GZIP);
        let (manifest, config) = base(None);
        let out = derive(&manifest, &config, &layer(), "t", "rctl commit", &none()).unwrap();
        assert_eq!(out.media_type, OCI_MANIFEST);
    }

    #[test]
    fn refuses_inconsistent_bases() {
        let (manifest, config) = base(None);
        // A config that is not the manifest's.
        let mut other = config.clone();
        other.push(b' ');
        let e = derive(&manifest, &other, &layer(), "t", "x", &none()).unwrap_err();
        assert!(e.to_string().contains("does not hash"), "{e}");
        // diff_ids that do not match the layers.
        let config2 = serde_json::to_vec(&json!({"rootfs": {"diff_ids": []}})).unwrap();
        let m2 = Manifest::oci(
            Descriptor::new(OCI_CONFIG, digest::of_bytes(&config2), config2.len() as u64),
            vec![Descriptor::new(OCI_LAYER_TAR_GZIP, d('b'), 1)],
        );
        let e = derive(&m2.to_bytes(), &config2, &layer(), "t", "x", &none()).unwrap_err();
        assert!(e.to_string().contains("0 diff_ids for 1 layers"), "{e}");
        // A bad layer digest.
        let bad = NewLayer {
            digest: "sha256:nope".into(),
            ..layer()
        };
        assert!(derive(&manifest, &config, &bad, "t", "x", &none()).is_err());
    }

    #[test]
    fn changes_message_and_author_edit_the_config() {
        let (manifest, config) = base(None);
        let meta = CommitMeta {
            changes: vec![
                "CMD [\"serve\", \"--port\", \"80\"]".into(),
                "ENV A=2 B=$A".into(),
                "EXPOSE 80".into(),
                "label k=w".into(),
                "WORKDIR sub".into(),
                "USER nobody".into(),
            ],
            message: "hot fix".into(),
            author: "ops <ops@example.com>".into(),
        };
        let out = derive(&manifest, &config, &layer(), "t", "rctl commit", &meta).unwrap();
        let c: Value = serde_json::from_slice(&out.config).unwrap();
        let cfg = &c["config"];
        assert_eq!(cfg["Cmd"], json!(["serve", "--port", "80"]));
        // ENV substitutes with the values from before it, as in a Dockerfile.
        assert_eq!(cfg["Env"], json!(["PATH=/bin", "A=2", "B=1"]));
        assert_eq!(cfg["ExposedPorts"], json!({"80/tcp": {}}));
        assert_eq!(cfg["Labels"], json!({"k": "w"}));
        assert_eq!(cfg["WorkingDir"], "/srv/sub");
        assert_eq!(cfg["User"], "nobody");
        assert_eq!(cfg["Entrypoint"], json!(["/init"]));
        assert_eq!(c["author"], "ops <ops@example.com>");
        assert_eq!(
            c["history"][1],
            json!({"created": "t", "created_by": "rctl commit",
                   "author": "ops <ops@example.com>", "comment": "hot fix"})
        );
        assert_eq!(c["unknown_field"], 7);
    }

    #[test]
    fn changes_that_are_not_config_are_refused_by_name() {
        for (change, words) in [
            (
                "RUN rm -rf /",
                "RUN cannot be applied by a commit; it takes CMD, ENTRYPOINT",
            ),
            ("COPY a b", "COPY cannot be applied"),
            ("FROM busybox", "FROM cannot be used here"),
            ("CMD a\nENV b=c", "one instruction per --change"),
            ("  ", "it is empty"),
            ("FROB x", "FROB"),
            ("ENV", "ENV"),
        ] {
            let e = parse_changes(&[change.to_string()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("--change {change:?}")), "{e}");
            assert!(e.contains(words), "{change:?}: {e}");
        }
        assert_eq!(
            parse_changes(&["CMD x".into(), "user 1".into()])
                .unwrap()
                .len(),
            2
        );
    }
}

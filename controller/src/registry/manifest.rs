//! Pure parsing of pushed manifests: which media type they have and which blobs they need.
//!
//! The registry stores manifest bytes verbatim (their digest is over exactly those bytes);
//! this module only reads them to decide the media type and the list of digests that must
//! already be present before the manifest is accepted.
//!
//! Invariants: a manifest whose `mediaType` field contradicts the request's Content-Type is
//! refused; every digest returned by [`parse`] is a valid sha256 digest; foreign layers (those
//! carrying `urls`) and `subject` are not required to be present, as the spec allows.

use serde_json::Value;

use super::names::Digest;
use super::RegistryError;

/// Largest manifest accepted, as the spec suggests.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of a docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of a docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What the registry needs to know about a pushed manifest.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedManifest {
    /// The media type to store and serve back as Content-Type.
    pub media_type: String,
    /// Blobs (configs, layers, child manifests) that must exist for the push to succeed.
    pub references: Vec<Digest>,
    /// Those references that are manifests themselves (an index's `manifests`), whose own
    /// references a replica must follow too.
    pub children: Vec<Digest>,
}

/// Parses manifest `bytes` pushed with `content_type` (if the client sent one).
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<ParsedManifest, RegistryError> {
    let invalid = |why: String| RegistryError::ManifestInvalid(why);
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| invalid("not a JSON object".into()))?;

    match obj.get("schemaVersion").map(Value::as_u64) {
        None | Some(Some(2)) => {}
        Some(Some(1)) => {
            return Err(RegistryError::Unsupported(
                "schema 1 manifests are not supported".into(),
            ))
        }
        Some(v) => return Err(invalid(format!("schemaVersion {v:?} is not 2"))),
    }

    let field = match obj.get("mediaType") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(invalid("mediaType is not a string".into())),
    };
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or_default().trim())
        .filter(|c| !c.is_empty() && *c != "application/octet-stream");
    let media_type = match (header, field) {
        (Some(h), Some(f)) if h != f => {
            return Err(invalid(format!(
                "Content-Type {h} contradicts mediaType {f}"
            )))
        }
        (Some(t), _) | (None, Some(t)) => t.to_owned(),
        (None, None) if obj.contains_key("manifests") => OCI_INDEX.to_owned(),
        (None, None) if obj.contains_key("config") => OCI_MANIFEST.to_owned(),
        (None, None) => return Err(invalid("no Content-Type and no mediaType".into())),
    };
    if media_type.starts_with("application/vnd.docker.distribution.manifest.v1+") {
        return Err(RegistryError::Unsupported(
            "schema 1 manifests are not supported".into(),
        ));
    }

    let is_index = media_type == OCI_INDEX || media_type == DOCKER_LIST;
    let is_image = media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST;
    if is_index && !obj.get("manifests").is_some_and(Value::is_array) {
        return Err(invalid(format!("{media_type} needs a manifests array")));
    }
    if is_image
        && !(obj.get("config").is_some_and(Value::is_object)
            && obj.get("layers").is_some_and(Value::is_array))
    {
        return Err(invalid(format!(
            "{media_type} needs a config object and a layers array"
        )));
    }

    let mut references = Vec::new();
    let mut children = Vec::new();
    if let Some(config) = obj.get("config") {
        references.push(descriptor_digest(config, "config")?);
    }
    for key in ["layers", "manifests", "blobs"] {
        let Some(list) = obj.get(key) else { continue };
        let list = list
            .as_array()
            .ok_or_else(|| invalid(format!("{key} is not an array")))?;
        for d in list {
            let foreign = d
                .get("urls")
                .and_then(Value::as_array)
                .is_some_and(|u| !u.is_empty());
            let digest = descriptor_digest(d, key)?;
            if foreign {
                continue;
            }
            if key == "manifests" {
                children.push(digest.clone());
            }
            references.push(digest);
        }
    }
    if let Some(subject) = obj.get("subject") {
        descriptor_digest(subject, "subject")?;
    }
    Ok(ParsedManifest {
        media_type,
        references,
        children,
    })
}

fn descriptor_digest(d: &Value, what: &str) -> Result<Digest, RegistryError> {
    let s = d.get("digest").and_then(Value::as_str).ok_or_else(|| {
        RegistryError::ManifestInvalid(format!("a {what} descriptor has no digest"))
    })?;
    Digest::parse(s).map_err(|e| RegistryError::ManifestInvalid(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_manifest_references() {
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "x", "digest": d('a'), "size": 1},
            "layers": [
                {"mediaType": "x", "digest": d('b'), "size": 1},
                {"mediaType": "x", "digest": d('c'), "size": 1, "urls": ["http://x"]},
            ],
            "subject": {"mediaType": "x", "digest": d('e'), "size": 1},
        });
        let bytes = serde_json::to_vec(&m).unwrap();
        let p = parse(&bytes, Some(OCI_MANIFEST)).unwrap();
        assert_eq!(p.media_type, OCI_MANIFEST);
        let refs: Vec<_> = p.references.iter().map(Digest::to_string).collect();
        assert_eq!(refs, [d('a'), d('b')]);
        assert!(p.children.is_empty());
        // mediaType alone suffices; a contradicting header does not.
        assert_eq!(parse(&bytes, None).unwrap().media_type, OCI_MANIFEST);
        assert!(parse(&bytes, Some(DOCKER_MANIFEST)).is_err());
    }

    #[test]
    fn index_and_inference() {
        let m = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": d('f'), "size": 1}],
        });
        let p = parse(&serde_json::to_vec(&m).unwrap(), None).unwrap();
        assert_eq!(p.media_type, OCI_INDEX);
        assert_eq!(p.references, [Digest::parse(&d('f')).unwrap()]);
        assert_eq!(p.children, p.references);
    }

    #[test]
    fn refusals() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"not json", Some(OCI_MANIFEST)),
            (b"[]", Some(OCI_MANIFEST)),
            (br#"{"schemaVersion":2}"#, None),
            (br#"{"schemaVersion":3,"config":{}}"#, None),
            (
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
                None,
            ),
            (
                br#"{"schemaVersion":2,"config":{"digest":"sha256:zz"},"layers":[]}"#,
                None,
            ),
            (br#"{"schemaVersion":1,"fsLayers":[]}"#, None),
        ];
        for (bytes, ct) in cases {
            assert!(
                parse(bytes, *ct).is_err(),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}

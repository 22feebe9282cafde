//! The layer cache: layers and cache entries by step key, and the image a stage builds up.

use super::*;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct LayerRef {
    pub(super) digest: String,
    pub(super) diff_id: String,
    pub(super) size: u64,
    pub(super) media_type: String,
}

/// A cache entry: what a step produced, and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CacheEntry {
    pub(super) layer: Option<LayerRef>,
    pub(super) created: String,
}

/// The image a stage has built so far.
#[derive(Debug, Clone)]
pub(super) struct StageImage {
    pub(super) layers: Vec<LayerRef>,
    /// The whole image config (the base's, with this build's changes applied at the end).
    pub(super) config: Value,
    pub(super) settings: Settings,
    pub(super) history: Vec<Value>,
    pub(super) created: Option<String>,
    /// The cache key of the last step.
    pub(super) key: String,
}

impl StageImage {
    pub(super) fn scratch() -> StageImage {
        StageImage {
            layers: Vec::new(),
            config: json!({
                "architecture": rudder_image::oci::host_architecture(),
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": []},
                "history": [],
            }),
            settings: Settings::default(),
            history: Vec::new(),
            created: None,
            key: hex::encode(Sha256::digest(b"scratch")),
        }
    }

    /// The final config blob: settings, diff_ids, history and time written in.
    pub(super) fn config_bytes(&self) -> Vec<u8> {
        let mut config = self.config.clone();
        self.settings.write_to(&mut config);
        if let Some(obj) = config.as_object_mut() {
            obj.insert(
                "rootfs".into(),
                json!({"type": "layers", "diff_ids": self.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()}),
            );
            obj.insert("history".into(), Value::Array(self.history.clone()));
            if let Some(c) = &self.created {
                obj.insert("created".into(), Value::String(c.clone()));
            }
        }
        serde_json::to_vec(&config).expect("config serializes")
    }
}

pub(super) fn chain(key: &str, parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// Records a step's result in the image.
pub(super) fn apply(
    image: &mut StageImage,
    step: &dockerfile::Step,
    entry: CacheEntry,
    key: String,
) {
    let mut h = json!({"created": entry.created, "created_by": step.text});
    match entry.layer {
        Some(l) => image.layers.push(l),
        None => {
            h["empty_layer"] = Value::Bool(true);
        }
    }
    image.history.push(h);
    image.created = Some(entry.created);
    image.key = key;
}

impl Run<'_> {
    /// A cache entry whose layer (if any) is still on this host.
    pub(super) async fn cached(&self, file: &Path) -> Option<CacheEntry> {
        let entry: CacheEntry = serde_json::from_slice(&fs::read(file).ok()?).ok()?;
        // The layer is unpacked (under its chain id) when a later step mounts it.
        if let Some(l) = &entry.layer {
            if !self.b.images.has_blob(&l.digest) {
                return None;
            }
        }
        Some(entry)
    }
}

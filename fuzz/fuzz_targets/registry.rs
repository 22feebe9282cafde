//! The cluster registry's request inputs: the `/v2/...` path router, repository names, tags,
//! digests, and pushed manifests (JSON with a content type). The input's first byte picks the
//! content type; the rest is the path (as text) and the manifest body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rudder_controller::registry::{http::parse_route, manifest, names};

const TYPES: [Option<&str>; 4] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let _ = manifest::parse(body, TYPES[pick as usize % TYPES.len()]);
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = parse_route(text);
        let _ = names::validate_name(text);
        let _ = names::validate_tag(text);
        let _ = names::Digest::parse(text);
        let _ = names::is_digest_reference(text);
    }
});

//! `rctl apply -f`'s manifest parser (YAML from users, validated per kind): any text either
//! parses into manifests or fails with an error naming the field; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = rudder_model::manifest::parse("fuzz.yaml", text) {
        // Errors render (they are what the user reads).
        let _ = e.to_string();
    }
});

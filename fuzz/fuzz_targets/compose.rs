//! Compose files (`rctl stack deploy`): interpolation, overrides and conversion to manifests.
//! The input is split at a NUL into the compose file and an override file.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use rudder_model::compose::{convert, Input, Source};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(2, '\0');
    let mut sources = vec![Source {
        name: "compose.yaml".into(),
        text: parts.next().unwrap_or_default().into(),
    }];
    if let Some(o) = parts.next() {
        sources.push(Source {
            name: "compose.override.yaml".into(),
            text: o.into(),
        });
    }
    let env = BTreeMap::from([("TAG".to_string(), "1".to_string())]);
    let files: BTreeMap<String, String> = BTreeMap::new();
    let input = Input {
        stack: "fuzz",
        sources: &sources,
        dotenv: Some("A=1\n"),
        env: &env,
        files: &files,
    };
    if let Ok(stack) = convert(&input) {
        let _ = rudder_model::compose::to_yaml(&stack.manifests);
    }
});

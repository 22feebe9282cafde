//! `rctl build`'s Dockerfile parser (lexer, line continuations, heredocs, instructions,
//! `RUN --mount` options): any text parses or fails with an error naming the line.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = rudder_image::dockerfile::parse(text) {
        let _ = e.to_string();
    }
    let _ = rudder_image::dockerfile::parse_instructions(text);
});

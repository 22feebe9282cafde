//! The layer unpacker: a tar stream from a registry or a pushed image is untrusted. Whatever it
//! holds, unpacking stays inside the destination (no file appears beside it) and never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rudder_image::layer::{unpack_limited, LayerLimits};

fuzz_target!(|data: &[u8]| {
    let Ok(root) = tempfile::tempdir() else {
        return;
    };
    let dest = root.path().join("dest");
    if std::fs::create_dir(&dest).is_err() {
        return;
    }
    let limits = LayerLimits {
        max_bytes: 1 << 20,
        min_free: 0,
    };
    let _ = unpack_limited(data, &dest, "fuzz", &limits);
    // Nothing escaped: the temp root holds only `dest`.
    let names: Vec<_> = std::fs::read_dir(root.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec![std::ffi::OsString::from("dest")], "escaped the destination");
});

//! Compiles proto/ with the vendored protoc, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/rudder.proto");
    // The descriptor set too: a test renders it as text and diffs it against the checked-in
    // snapshot (rudder.pb.txt), so a change to the wire contract is seen in review.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("rudder_descriptor.bin"))
        .compile_protos(&["proto/rudder.proto"], &["proto"])?;
    Ok(())
}

//! Compiles the wire formats in proto/ with a vendored protoc, so a build
//! needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let include = protoc_bin_vendored::include_path()?;
    prost_build::Config::new()
        .btree_map(["."])
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        .compile_protos(&["proto/tecate.proto", "proto/omni.proto"], &[std::path::PathBuf::from("proto"), include])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

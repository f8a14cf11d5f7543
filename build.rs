//! Compiles the wire formats in proto/ with a vendored protoc, so a build
//! needs no system protobuf compiler, and generates the Omni service's gRPC
//! server and client (tonic) plus the descriptor set server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let include = protoc_bin_vendored::include_path()?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.btree_map(["."]).protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("omni_descriptor.bin"))
        // One module per package, nested as the packages are, so the service's
        // references to tecate.v1 resolve.
        .include_file("protos.rs")
        // Small first buffers per stream (see `proto::OmniCodec`).
        .codec_path("crate::proto::OmniCodec")
        .compile_with_config(
            config,
            &["proto/tecate.proto", "proto/omni.proto", "proto/omni/v1/service.proto"].map(std::path::PathBuf::from),
            &[std::path::PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

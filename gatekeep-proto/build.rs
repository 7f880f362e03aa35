//! Compiles `proto/gatekeep/v1/*.proto` with protox (pure Rust, no system `protoc`) and
//! generates the prost messages and tonic clients and servers from the descriptors.

use std::path::PathBuf;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = ["types.proto", "agent.proto", "review.proto"]
        .map(|name| root.join("gatekeep/v1").join(name));
    for file in &files {
        println!("cargo::rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&root]).context("failed to parse the protos")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
        .context("failed to generate code from the protos")?;
    Ok(())
}

//! Builds the eBPF object (`gatekeep-ebpf`, nightly, bpfel-unknown-none) so
//! the agent can embed it from `OUT_DIR`.
//!
//! Set `AYA_BUILD_SKIP=1` to skip it (fast `cargo check`/clippy); the agent
//! then embeds an empty object and says so when it tries to load it.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
    let object = std::path::Path::new(&out_dir).join("gatekeep");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // Keep any object a previous build left; otherwise an empty stand-in.
        if !object.exists() {
            std::fs::write(&object, []).context("failed to write the empty eBPF stand-in")?;
        }
        return Ok(());
    }
    let package = aya_build::Package {
        name: "gatekeep-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../gatekeep-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "failed to build the eBPF programs; run `cargo xtask setup` (nightly rust-src and bpf-linker), \
         or set AYA_BUILD_SKIP=1 to build user space only",
    )
}

//! `cargo xtask lint`: the house rules CI enforces, each a command that fails the run:
//! rustfmt (`--check`), no import cycles among a crate's modules (`module_cycles`), clippy
//! with `-D warnings` on every target, and cargo-deny (licences, bans, sources, and
//! advisories where the `RustSec` database can be fetched).

use std::process::Command;

use anyhow::{Context as _, Result};
use clap::Args;
use xtask::{cargo, probe, run_cmd, workspace_root};

use crate::{module_cycles, setup};

#[derive(Debug, Args)]
pub struct Options {
    /// Fail when the `RustSec` advisory database cannot be fetched, instead of saying so and
    /// going on (these build machines reach crates.io but not the database's git host).
    #[arg(long)]
    pub require_advisories: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    setup::lint_tools()?;
    // rustfmt.toml groups imports (std / external / crate), a nightly-only option; the
    // stable rustfmt ignores it with a warning and would accept ungrouped imports.
    run_cmd(
        Command::new("rustup")
            .current_dir(workspace_root())
            .args(["run", "nightly", "cargo", "fmt", "--all", "--check"]),
    )
    .context("the code is not formatted: run `cargo +nightly fmt --all`")?;

    let cycles = module_cycles::check(&cargo::workspace_crate_roots()?)?;
    if !cycles.is_empty() {
        for cycle in &cycles {
            eprintln!("[lint] import cycle: {cycle}");
        }
        anyhow::bail!(
            "{} import cycle(s) among modules (above): move what both sides need into a \
             module below them, or make one side stop using the other",
            cycles.len()
        );
    }

    // The default members: every host crate. gatekeep-ebpf builds only for the BPF target
    // with the nightly; AYA_BUILD_SKIP keeps the agent's build script from building it
    // (clippy needs no kernel object).
    run_cmd(cargo::cargo().env("AYA_BUILD_SKIP", "1").args([
        "clippy",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found problems (above)")?;

    run_cmd(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["deny", "--locked", "check", "licenses", "bans", "sources"]),
    )
    .context(
        "cargo-deny refused the dependency graph (above); deny.toml says why each rule exists",
    )?;

    let fetched = probe(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["deny", "fetch", "db"]),
    )
    .is_some();
    if fetched {
        run_cmd(Command::new("cargo").current_dir(workspace_root()).args([
            "deny",
            "--locked",
            "check",
            "--disable-fetch",
            "advisories",
        ]))
        .context("a dependency has a security advisory (above)")?;
    } else if opts.require_advisories {
        anyhow::bail!(
            "cannot fetch the RustSec advisory database (github.com/RustSec/advisory-db): \
             check the network, or drop --require-advisories"
        );
    } else {
        eprintln!(
            "[lint] ADVISORIES NOT CHECKED: the RustSec advisory database \
             (github.com/RustSec/advisory-db) cannot be fetched from this machine; \
             `cargo deny check advisories` runs wherever it can"
        );
    }
    eprintln!("[lint] rustfmt, module cycles, clippy and cargo-deny: clean");
    Ok(())
}

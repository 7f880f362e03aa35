//! `cargo xtask test [--no-vm]`: the whole test suite, as CI runs it: native tests, then
//! the in-VM tests.

use std::time::Instant;

use anyhow::{Context as _, Result};
use clap::Args;
use xtask::{cargo, run_cmd};

use crate::vm_test;

#[derive(Debug, Args)]
pub struct Options {
    /// Run only the native tests.
    #[arg(long)]
    pub no_vm: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    let started = Instant::now();
    // gatekeep-ebpf only builds for the BPF target (the agent's build script builds it).
    run_cmd(cargo::cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "gatekeep-ebpf",
        "--locked",
    ]))
    .context("native tests failed")?;
    let native = started.elapsed();

    let vm = if opts.no_vm {
        None
    } else {
        let started = Instant::now();
        vm_test::run(&vm_test::Options::default()).context("VM tests failed")?;
        Some(started.elapsed())
    };

    eprintln!("[test] summary:");
    eprintln!(
        "[test]   native tests: passed ({:.0} s)",
        native.as_secs_f64()
    );
    match vm {
        Some(took) => eprintln!(
            "[test]   VM tests:     passed ({:.0} s)",
            took.as_secs_f64()
        ),
        None => eprintln!("[test]   VM tests:     skipped (--no-vm)"),
    }
    Ok(())
}

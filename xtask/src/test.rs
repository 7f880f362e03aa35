//! `cargo xtask test [--no-vm]`: the whole test suite, as CI runs it: native tests, then
//! the in-VM tests, then one summary line.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use xtask::{TestCounts, cargo, run_cmd_lines};

use crate::{fuzz, vm_test};

#[derive(Debug, Args)]
pub struct Options {
    /// Run only the native tests.
    #[arg(long)]
    pub no_vm: bool,
    /// Skip the short run of every fuzz target (`cargo xtask fuzz`) after the native tests.
    #[arg(long)]
    pub no_fuzz: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    let started = Instant::now();
    let mut native = TestCounts::default();
    // gatekeep-ebpf only builds for the BPF target (the agent's build script builds it).
    let result = run_cmd_lines(
        cargo::cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "gatekeep-ebpf",
            "--locked",
        ]),
        &mut |line| native.observe(line),
    );
    eprintln!(
        "[test] native tests: {native} ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    if let Err(err) = result {
        // A build error fails the run without a failed test line.
        if native.failed == 0 {
            native.failed = 1;
        }
        summary(native, None);
        return Err(err.context("native tests failed"));
    }

    if !opts.no_fuzz {
        let started = Instant::now();
        let result = fuzz::smoke();
        eprintln!(
            "[test] fuzz targets: {} ({:.0} s)",
            if result.is_ok() { "no crash" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        );
        if let Err(err) = result {
            native.failed += 1;
            summary(native, None);
            return Err(err.context("a fuzz target failed"));
        }
    }

    if opts.no_vm {
        eprintln!("[test] VM tests: not run (--no-vm)");
        summary(native, None);
        return Ok(());
    }
    let started = Instant::now();
    let mut vm = TestCounts::default();
    let result = vm_test::run_counted(&vm_test::Options::default(), &mut vm);
    let took = started.elapsed().as_secs_f64();
    eprintln!("[test] VM tests: {vm} ({took:.0} s)");
    if let Err(err) = result {
        // A panic, hang or crash can fail the suite without a failed test line.
        if vm.failed == 0 {
            eprintln!("[test] the VM run failed outside any test: counted as 1 failure");
            vm.failed = 1;
        }
        summary(native, Some(vm));
        return Err(err.context("VM tests failed"));
    }
    summary(native, Some(vm));
    Ok(())
}

/// Prints the closing tally (on stdout, with the test output).
fn summary(native: TestCounts, vm: Option<TestCounts>) {
    let total = native.plus(vm.unwrap_or_default());
    println!("summary: {total}");
}
